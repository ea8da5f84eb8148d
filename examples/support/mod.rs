//! What the daemon benchmarks (`bench_sync`, `bench_fallback`) share: the daemon they run (this
//! executable again, with `--daemon`), the synthetic cluster's manifests, and reading the
//! daemon's metrics and memory, and the source it reads the cluster from ([`source`]). Included
//! with `#[path]`; not an example of its own.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use clap::Parser;
use ipvs_proxy::flags::Cli;

pub mod cluster;
pub mod source;

pub use cluster::{ENDPOINTS, endpoint, service_yaml};

/// The daemon, as `ipvs-proxy FLAGS` runs it.
fn run_daemon(flags: &[String]) -> ExitCode {
    // As `main` does: the allocator is part of what is measured.
    ipvs_proxy::allocator::tune();
    let cli =
        Cli::parse_from(std::iter::once("ipvs-proxy").chain(flags.iter().map(String::as_str)));
    let (config, _) = match ipvs_proxy::config::ProxyConfig::resolve(&cli.flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipvs-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    ipvs_proxy::logging::init(config.verbosity, config.log_format);
    match ipvs_proxy::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon, this executable run again with `--daemon FLAGS…`; stopped and reaped on drop.
///
/// `BENCH_HEAPTRACK=DIR` runs it under heaptrack (`heaptrack -o DIR/heaptrack.daemon.<pid>`),
/// to find where its bytes go: stopped with SIGTERM then, so that heaptrack writes its file.
pub struct Daemon {
    child: Child,
    /// The daemon's own process: the child, or heaptrack's child.
    pid: u32,
    profiled: bool,
}

impl Daemon {
    /// Starts the daemon with `flags`, its output (without colours) to `log`, logging with
    /// `filter` (`info`: as operators run it) unless `RUST_LOG` says otherwise, and with the
    /// image's glibc tunables unless `GLIBC_TUNABLES` is set (empty: glibc's defaults).
    pub fn start(flags: &[String], log: &std::fs::File, filter: &str) -> anyhow::Result<Daemon> {
        let exe = std::env::current_exe()?;
        let profile = std::env::var_os("BENCH_HEAPTRACK");
        let mut command = match &profile {
            Some(dir) => {
                let mut c = Command::new("heaptrack");
                c.arg("-o")
                    .arg(std::path::Path::new(dir).join("heaptrack.daemon"))
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let child = command
            .arg("--daemon")
            .args(flags)
            .env("NO_COLOR", "1")
            // The heap as the image runs the daemon's, unless this run says otherwise.
            .env(
                "GLIBC_TUNABLES",
                std::env::var("GLIBC_TUNABLES")
                    .unwrap_or_else(|_| ipvs_proxy::allocator::GLIBC_TUNABLES.into()),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| filter.into()),
            )
            .stderr(log.try_clone()?)
            .stdout(log.try_clone()?)
            .spawn()?;
        let mut daemon = Daemon {
            pid: child.id(),
            child,
            profiled: profile.is_some(),
        };
        if daemon.profiled {
            daemon.pid = profiled_child(daemon.pid)?;
        }
        Ok(daemon)
    }

    /// The daemon's process id, for its `/proc` status.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// The program heaptrack (the script `pid`, which starts its recorder too) runs: its child
/// running this executable, once it is started.
fn profiled_child(pid: u32) -> anyhow::Result<u32> {
    let exe = std::env::current_exe()?;
    let children = format!("/proc/{pid}/task/{pid}/children");
    for _ in 0..1000 {
        let found = std::fs::read_to_string(&children).unwrap_or_default();
        let daemon = found
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
            .find(|c| std::fs::read_link(format!("/proc/{c}/exe")).is_ok_and(|e| e == exe));
        if let Some(child) = daemon {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("heaptrack started nothing")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.profiled {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The value of an unlabelled metric, from `/metrics` at `address`.
pub fn metric(address: &str, name: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// The benchmark's entry: `--daemon FLAGS…` runs the daemon (this executable re-run by
/// `bench`), anything else runs `bench` with the arguments.
pub fn main(name: &str, bench: fn(&[String]) -> anyhow::Result<()>) -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--daemon") {
        return run_daemon(&args[2..]);
    }
    match bench(&args[1..]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Moves this thread, and every process it starts from now on, into a new network namespace
/// with `lo` up, so each measurement starts from an empty kernel: no IPVS table, link, ipset or
/// rule of another. A flush is not enough: the kernel keeps deleted real servers in a trash
/// list for up to two minutes and searches that list on every real-server add, which slowed
/// whichever side ran second several times over.
#[allow(unsafe_code, reason = "unshare(2) has no safe wrapper in std")]
pub fn fresh_netns() -> anyhow::Result<()> {
    use anyhow::{Context as _, ensure};
    // SAFETY: unshare takes no pointers; it only changes this thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    ensure!(status.success(), "ip link set lo up: {status}");
    Ok(())
}

/// One section of `ipvs-proxy plan FLAGS --only SECTION` (ipvs, addresses, ipsets, iptables):
/// what the daemon run with the same flags programs, in the kernel tools' formats.
pub fn plan(flags: impl IntoIterator<Item = String>, section: &str) -> anyhow::Result<String> {
    use ipvs_proxy::flags::{Command as CliCommand, LogFormat};
    let mut argv = vec!["ipvs-proxy".to_owned(), "plan".into()];
    argv.extend(flags);
    argv.extend(["--only".into(), section.into()]);
    let Some(CliCommand::Plan(plan)) = Cli::parse_from(argv).command else {
        anyhow::bail!("not a plan command");
    };
    ipvs_proxy::logging::init(0, LogFormat::Text);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = ipvs_proxy::plan::run(&plan, &mut out, &mut err);
    anyhow::ensure!(
        status == ipvs_proxy::plan::EXIT_OK,
        "plan --only {section}: {}",
        String::from_utf8_lossy(&err)
    );
    Ok(String::from_utf8(out)?)
}
