//! Running the tools: one `iptables-restore` / `ipset restore` process per apply, fed on stdin.
//!
//! A [`Runner`] is bound to one iptables flavour (legacy or nft) and, optionally, to a named
//! network namespace (`ip netns exec NAME …`), which is how the tests program a "node".
//!
//! Every wait is bounded. `iptables-restore` waits for the xtables lock as kube-proxy's does
//! (`-w 5 -W 100000`: at most 5 s, trying every 0.1 s), and every tool is killed, with what it
//! forked, once it has run [`TOOL_TIMEOUT`]: a sync that cannot finish fails, it is not
//! waited on.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Error;
use crate::ipset::{IpSet, SaveParser, SaveSets, SetEntry, SetHeader, SetPatch, write_between};
use crate::ipvs_mode::is_proxy_set;
use crate::process;
use crate::ruleset::Ruleset;
use crate::saved::Saved;
use crate::table::{Family, FamilyNames as _, Table};

/// The most lines ([`Ruleset::line_count`]) one `iptables-nft-restore` is given; larger
/// rulesets are split ([`Ruleset::split`]). About 300 Services of 10 endpoints. At 10,000
/// Services × 10 endpoints (iptables 1.8.9, kernel 6.18, 2 busy cores), a first full sync took
/// 8.8 s in parts of 5,000 lines, 10.4 s of 10,000, 13.8 s of 20,000 and 21.6 s of 40,000
/// (one part costs lines × chains), while a resync over the existing rules took 37.6, 28.0,
/// 33.5 and 44.2 s (each part's commit re-validates every rule reachable from the built-in
/// chains, about 0.3 s).
pub(crate) const NFT_RESTORE_LINES: usize = 10_000;

/// How long any one tool may run before it is killed and its call fails. Far above what a
/// tool needs (a full restore of 10,000 Services took 5 s with iptables-legacy, an
/// `iptables-nft-save` of them 6 s, on a busy host), so that it only stops a tool that hangs.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// kube-proxy's `-w 5 -W 100000` (pkg/util/iptables, for iptables ≥ 1.6.2): wait at most 5 s
/// for the xtables lock, trying every 100,000 µs. Only iptables-legacy takes the lock, so it
/// gets both (iptables 1.8.9 ignores `-W` with a notice on stderr, older ones poll every
/// second without it); iptables-nft accepts `-w` and ignores it (nf_tables commits are
/// atomic), and is given `-w 5` alone, without the notice.
const LEGACY_LOCK_WAIT: [&str; 4] = ["-w", "5", "-W", "100000"];
const NFT_LOCK_WAIT: [&str; 2] = ["-w", "5"];

/// Which iptables backend the tools program: the legacy x_tables or nf_tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavour {
    /// `iptables-legacy*` (`xtables-legacy-multi`)
    Legacy,
    /// `iptables-nft*` (`xtables-nft-multi`)
    Nft,
}

impl Flavour {
    /// Both flavours.
    pub const ALL: [Flavour; 2] = [Flavour::Legacy, Flavour::Nft];

    /// `legacy` or `nft`, as in the tool names.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Flavour::Legacy => "legacy",
            Flavour::Nft => "nft",
        }
    }

    /// The tool for `family` and `verb` (`save`, `restore`), e.g. `ip6tables-nft-restore`.
    #[must_use]
    pub fn tool(self, family: Family, verb: &str) -> String {
        format!("{}-{}-{verb}", family.tool(), self.as_str())
    }

    /// The flags that bound the wait for the xtables lock.
    fn lock_wait(self) -> &'static [&'static str] {
        match self {
            Flavour::Legacy => &LEGACY_LOCK_WAIT,
            Flavour::Nft => &NFT_LOCK_WAIT,
        }
    }
}

/// Runs the netfilter tools, in the current network namespace or a named one.
#[derive(Debug, Clone)]
pub struct Runner {
    flavour: Flavour,
    netns: Option<String>,
}

impl Runner {
    /// A runner for `flavour` in the current network namespace.
    #[must_use]
    pub fn new(flavour: Flavour) -> Runner {
        Runner {
            flavour,
            netns: None,
        }
    }

    /// The same runner, running every tool inside the named network namespace
    /// (`ip netns exec NAME`).
    #[must_use]
    pub fn in_netns(mut self, name: impl Into<String>) -> Runner {
        self.netns = Some(name.into());
        self
    }

    /// The flavour this runner programs.
    #[must_use]
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// A runner of the other flavour in the same namespace.
    #[must_use]
    pub fn with_flavour(&self, flavour: Flavour) -> Runner {
        Runner {
            flavour,
            netns: self.netns.clone(),
        }
    }

    fn command(&self, program: &str, args: &[&str]) -> (Command, String) {
        let mut cmd;
        if let Some(ns) = &self.netns {
            cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, program]);
        } else {
            cmd = Command::new(program);
        }
        cmd.args(args);
        (
            cmd,
            format!("{program} {}", args.join(" "))
                .trim_end()
                .to_owned(),
        )
    }

    /// Runs `program`, killed after [`TOOL_TIMEOUT`].
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        let (mut cmd, tool) = self.command(program, args);
        let out =
            process::run(&mut cmd, stdin.map(str::as_bytes), TOOL_TIMEOUT).map_err(|source| {
                Error::Spawn {
                    tool: tool.clone(),
                    source,
                }
            })?;
        ended(tool, out.status, &out.stderr, out.timed_out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Feeds `input` to `iptables-restore -w 5 --noflush` (or the ip6tables one): one process,
    /// one atomic commit per table, the xtables lock waited for 5 s at most.
    pub fn restore(&self, family: Family, input: &str) -> Result<(), Error> {
        let tool = self.flavour.tool(family, "restore");
        let mut args = self.flavour.lock_wait().to_vec();
        args.push("--noflush");
        self.run(&tool, &args, Some(input)).map(drop)
    }

    /// Checks `ruleset` only touches the proxy's chains, then applies it with one
    /// [`Runner::restore`] (with iptables-nft, a large ruleset with several, see
    /// [`Ruleset::split`]). An empty ruleset runs nothing.
    pub fn apply(&self, family: Family, ruleset: &Ruleset) -> Result<(), Error> {
        ruleset.check_ownership()?;
        if ruleset.is_empty() {
            return Ok(());
        }
        if self.must_split(ruleset) {
            self.apply_owned(family, ruleset.clone()).map(drop)
        } else {
            self.restore_one(family, ruleset).map(drop)
        }
    }

    /// [`Runner::apply`] of a ruleset it may take apart, without checking ownership again:
    /// the bytes of input sent and the number of restores run.
    pub(crate) fn apply_owned(
        &self,
        family: Family,
        ruleset: Ruleset,
    ) -> Result<(usize, usize), Error> {
        let parts = if self.must_split(&ruleset) {
            ruleset.split(NFT_RESTORE_LINES)
        } else {
            vec![ruleset]
        };
        let mut bytes = 0;
        for (i, part) in parts.iter().enumerate() {
            bytes += self.restore_one(family, part)?;
            if parts.len() > 1 {
                tracing::debug!(
                    part = i + 1,
                    of = parts.len(),
                    "iptables-nft-restore in parts"
                );
            }
        }
        Ok((bytes, parts.len()))
    }

    fn must_split(&self, ruleset: &Ruleset) -> bool {
        self.flavour == Flavour::Nft && ruleset.line_count() > NFT_RESTORE_LINES
    }

    fn restore_one(&self, family: Family, ruleset: &Ruleset) -> Result<usize, Error> {
        let input = ruleset.render();
        tracing::debug!(
            flavour = self.flavour.as_str(),
            ?family,
            rules = ruleset.rule_count(),
            bytes = input.len(),
            "iptables-restore"
        );
        self.restore(family, &input)?;
        Ok(input.len())
    }

    /// `iptables-save` (all tables, or one with `-t`), as text.
    pub fn save_text(&self, family: Family, table: Option<Table>) -> Result<String, Error> {
        let tool = self.flavour.tool(family, "save");
        match table {
            Some(t) => self.run(&tool, &["-t", t.as_str()], None),
            None => self.run(&tool, &[], None),
        }
    }

    /// The nf_tables generation of the namespace this runner programs
    /// ([`crate::generation::nft_generation`]); `None` for iptables-legacy, for a runner bound
    /// to a named namespace (the tools run there, this process does not), or when unreadable.
    #[must_use]
    pub fn nft_generation(&self) -> Option<u32> {
        if self.flavour != Flavour::Nft || self.netns.is_some() {
            return None;
        }
        crate::generation::nft_generation()
    }

    /// `iptables-save` of every table, each line handed to `line` as the tool prints it, so
    /// that a large table is never held whole (the proxier hashes it chain by chain).
    pub fn save_each_line(&self, family: Family, line: &mut dyn FnMut(&str)) -> Result<(), Error> {
        self.each_line(&self.flavour.tool(family, "save"), &[], line)
    }

    /// Runs `program args`, each line it prints handed to `line` (without its newline).
    fn each_line(
        &self,
        program: &str,
        args: &[&str],
        line: &mut dyn FnMut(&str),
    ) -> Result<(), Error> {
        use std::io::BufRead as _;
        let (mut cmd, tool) = self.command(program, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let spawn = |source| Error::Spawn {
            tool: tool.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn)?;
        let deadline = process::Deadline::start(&child, TOOL_TIMEOUT);
        let stdout = child.stdout.take().expect("stdout was piped");
        let mut reader = std::io::BufReader::with_capacity(1 << 16, stdout);
        let mut buf = String::new();
        loop {
            buf.clear();
            match reader.read_line(&mut buf) {
                Ok(0) => break,
                Ok(_) => line(buf.trim_end_matches('\n')),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(spawn(e));
                }
            }
        }
        let out = child.wait_with_output().map_err(spawn)?;
        ended(tool, out.status, &out.stderr, deadline.disarm())
    }

    /// Starts `iptables-restore -w 5 --noflush` (or the ip6tables one; the lock waited for as
    /// by [`Runner::restore`]) to be fed while the input is produced ([`RestoreStream`]), so a
    /// large restore is never built whole. Killed, like every tool, after [`TOOL_TIMEOUT`].
    pub fn restore_stream(&self, family: Family) -> Result<RestoreStream, Error> {
        let program = self.flavour.tool(family, "restore");
        let mut args = self.flavour.lock_wait().to_vec();
        args.push("--noflush");
        self.stream(&program, &args)
    }

    /// Starts `program args` to be fed on stdin ([`RestoreStream`]).
    fn stream(&self, program: &str, args: &[&str]) -> Result<RestoreStream, Error> {
        let (mut cmd, tool) = self.command(program, args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            tool: tool.clone(),
            source,
        })?;
        let deadline = process::Deadline::start(&child, TOOL_TIMEOUT);
        let stdin = child.stdin.take().expect("stdin was piped");
        Ok(RestoreStream {
            child,
            deadline,
            stdin: Some(std::io::BufWriter::with_capacity(1 << 16, stdin)),
            tool,
            bytes: 0,
        })
    }

    /// `iptables-save`, parsed into chains and rules per table.
    pub fn save(&self, family: Family, table: Option<Table>) -> Result<Saved, Error> {
        Ok(Saved::parse(&self.save_text(family, table)?))
    }

    /// Feeds `patch` to `ipset restore -exist`, after checking it only touches the proxy's sets.
    pub fn ipset_restore(&self, patch: &SetPatch) -> Result<(), Error> {
        patch.check_ownership(is_proxy_set)?;
        if patch.is_empty() {
            return Ok(());
        }
        self.run("ipset", &["restore", "-exist"], Some(&patch.render()))
            .map(drop)
    }

    /// Makes each of `wanted` (the proxy's sets only) hold exactly its members, given the sets
    /// `ipset save` read (`kernel`): the input [`write_between`] writes, fed to `ipset restore
    /// -exist` as it is written (never held whole), which runs only if there is something to
    /// write. The bytes sent.
    pub fn ipset_restore_between<'e>(
        &self,
        kernel: &[IpSet],
        wanted: &[SetHeader],
        members: impl IntoIterator<Item = (usize, &'e SetEntry)>,
        holds: impl Fn(usize, &SetEntry) -> bool,
    ) -> Result<usize, Error> {
        if let Some(set) = wanted.iter().find(|s| !is_proxy_set(&s.name)) {
            return Err(Error::SetNotOwned(set.name.clone()));
        }
        let mut out = LazyStream {
            runner: self,
            stream: None,
            failed: None,
        };
        let written = write_between(&mut out, kernel, wanted, members, holds);
        if let Some(e) = out.failed {
            return Err(e);
        }
        debug_assert!(written.is_ok(), "only a failed start fails the writing");
        out.stream.map_or(Ok(0), RestoreStream::finish)
    }

    /// Every ipset in the namespace with its entries (`ipset save`, read by
    /// [`crate::ipset::parse_save`]).
    pub fn ipset_save(&self) -> Result<Vec<IpSet>, Error> {
        let mut sets = SaveSets::default();
        self.each_line("ipset", &["save"], &mut |line| sets.line(line))?;
        Ok(sets.finish())
    }

    /// `ipset save` read as it is printed, never held whole: each member of every set handed
    /// to `each` with its set's header; the sets, in the order printed.
    pub fn ipset_save_each(
        &self,
        each: &mut dyn FnMut(&SetHeader, SetEntry),
    ) -> Result<Vec<SetHeader>, Error> {
        let mut parser = SaveParser::default();
        self.each_line("ipset", &["save"], &mut |line| {
            if let Some((i, entry)) = parser.line(line) {
                each(&parser.headers[i], entry);
            }
        })?;
        Ok(parser.headers)
    }

    /// The names of every ipset in the namespace (`ipset list -n`).
    pub fn ipset_names(&self) -> Result<Vec<String>, Error> {
        let out = self.run("ipset", &["list", "-n"], None)?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

/// A running `iptables-restore` or `ipset restore` fed piece by piece ([`Runner::restore_stream`],
/// [`Runner::ipset_restore_between`]).
#[derive(Debug)]
pub struct RestoreStream {
    child: std::process::Child,
    deadline: process::Deadline,
    stdin: Option<std::io::BufWriter<std::process::ChildStdin>>,
    tool: String,
    bytes: usize,
}

impl RestoreStream {
    /// Sends `text`. A tool that exited early (it refused a line) stops taking input; what it
    /// said is reported by [`RestoreStream::finish`].
    pub fn write(&mut self, text: &str) {
        self.bytes += text.len();
        if let Some(stdin) = &mut self.stdin
            && let Err(e) = stdin.write_all(text.as_bytes())
        {
            tracing::debug!(tool = %self.tool, error = %e, "writing to the tool's stdin failed");
            self.stdin = None;
        }
    }

    /// Closes the input and waits for the tool: the bytes sent.
    pub fn finish(mut self) -> Result<usize, Error> {
        if let Some(mut stdin) = self.stdin.take()
            && let Err(e) = stdin.flush()
        {
            tracing::debug!(tool = %self.tool, error = %e, "writing to the tool's stdin failed");
        }
        let tool = self.tool;
        let out = self
            .child
            .wait_with_output()
            .map_err(|source| Error::Spawn {
                tool: tool.clone(),
                source,
            })?;
        ended(tool, out.status, &out.stderr, self.deadline.disarm())?;
        Ok(self.bytes)
    }
}

/// `ipset restore -exist` started at the first text written to it, so that a restore with
/// nothing to say runs nothing.
struct LazyStream<'r> {
    runner: &'r Runner,
    stream: Option<RestoreStream>,
    /// The start failed: nothing more is written.
    failed: Option<Error>,
}

impl std::fmt::Write for LazyStream<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        if self.failed.is_some() {
            return Err(std::fmt::Error);
        }
        if self.stream.is_none() {
            match self.runner.stream("ipset", &["restore", "-exist"]) {
                Ok(stream) => self.stream = Some(stream),
                Err(e) => {
                    self.failed = Some(e);
                    return Err(std::fmt::Error);
                }
            }
        }
        if let Some(stream) = &mut self.stream {
            stream.write(text);
        }
        Ok(())
    }
}

/// How a tool ended, as the caller's result: killed at its bound, failed, or done.
fn ended(
    tool: String,
    status: std::process::ExitStatus,
    stderr: &[u8],
    timed_out: bool,
) -> Result<(), Error> {
    let stderr = String::from_utf8_lossy(stderr).trim().to_owned();
    if timed_out {
        return Err(Error::Timeout {
            tool,
            after: TOOL_TIMEOUT,
            stderr,
        });
    }
    if !status.success() {
        return Err(Error::Tool {
            tool,
            status,
            stderr,
        });
    }
    Ok(())
}

/// Decides which flavour the node uses, as kube-proxy's iptables wrapper does: the flavour
/// holding kubelet's `KUBE-IPTABLES-HINT` or `KUBE-KUBELET-CANARY` chain (nft checked first,
/// in the mangle table); failing that, the flavour with more rules (`-A` lines) over both
/// families, nft on a tie.
#[must_use]
pub fn detect_flavour(netns: Option<&str>) -> Flavour {
    let runner = |f| {
        let r = Runner::new(f);
        match netns {
            Some(ns) => r.in_netns(ns),
            None => r,
        }
    };
    let nft = runner(Flavour::Nft);
    let legacy = runner(Flavour::Legacy);
    let hint = |text: &str| {
        text.lines().any(|l| {
            l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY ")
        })
    };
    let texts = |r: &Runner, table: Option<Table>| -> Vec<String> {
        Family::ALL
            .iter()
            .filter_map(|f| r.save_text(*f, table).ok())
            .collect()
    };
    if texts(&nft, Some(Table::Mangle)).iter().any(|t| hint(t)) {
        return Flavour::Nft;
    }
    // Without `-t`: asking legacy for the mangle table would create it in the kernel.
    let legacy_all = texts(&legacy, None);
    if legacy_all.iter().any(|t| hint(t)) {
        return Flavour::Legacy;
    }
    let rules = |texts: &[String]| {
        texts
            .iter()
            .flat_map(|t| t.lines())
            .filter(|l| l.starts_with('-'))
            .count()
    };
    let nft_rules = rules(&texts(&nft, None));
    let legacy_rules = rules(&legacy_all);
    tracing::debug!(
        legacy_rules,
        nft_rules,
        "no kubelet hint chain; choosing the flavour with more rules"
    );
    if legacy_rules > nft_rules {
        Flavour::Legacy
    } else {
        Flavour::Nft
    }
}
