//! `cargo xtask vm`: run a command as root in a VM whose kernel has IPVS.
//!
//! The host kernel has neither IPVS nor dummy links and cannot load modules, so every
//! kernel claim is checked in Debian's cloud kernel under qemu (TCG, no network card).
//! The kernel and a base initramfs are cached under `target/vm/`; each boot appends a small
//! archive with the command and the project's files, so a cached boot takes seconds.

mod cpio;
mod host;
mod initramfs;
mod kernel;
mod qemu;

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

pub use host::{ensure, ensure_packages};
pub use initramfs::RunFiles;
pub use qemu::Outcome;

/// Settings of one boot, shared by `vm`, `vm-test` and `bench`.
#[derive(Debug, clap::Args)]
pub struct VmOptions {
    /// Copy this host file or folder into the VM at the same absolute path (repeatable).
    #[arg(long = "include", value_name = "PATH")]
    pub includes: Vec<PathBuf>,
    /// Kill the VM after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// The VM's memory.
    #[arg(long, value_name = "MiB", default_value_t = 2048)]
    pub memory: u32,
    /// Show the kernel's boot messages and /init's own output.
    #[arg(long)]
    pub verbose: bool,
}

/// Host environment variables passed on to the command.
const FORWARDED_ENV: &[&str] = &[
    "RUST_LOG",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "RUST_TEST_THREADS",
    "NO_COLOR",
];
/// And every host variable whose name starts with this: benchmarks' options.
const FORWARDED_PREFIX: &str = "BENCH_";

/// Exit status when the VM itself failed (crashed, printed no exit marker).
pub const EXIT_VM_FAILED: i32 = 125;
/// Exit status when the VM was killed at the timeout, like timeout(1).
pub const EXIT_TIMED_OUT: i32 = 124;

/// One boot: the files to bring and the shell command to run in `cwd`.
#[derive(Debug)]
pub struct Run<'a> {
    pub options: &'a VmOptions,
    pub default_timeout: Duration,
    /// The workspace's target directory; the cache lives in `target/vm/`.
    pub target_dir: &'a Path,
    pub files: RunFiles,
    pub cwd: PathBuf,
}

impl Run<'_> {
    /// Boots the VM, streams the command's output (each line offered to `on_line`, which
    /// says whether to print it) and returns how it ended.
    pub fn boot(mut self, on_line: &mut dyn FnMut(&str) -> bool) -> Result<Outcome> {
        let cache = self.target_dir.join("vm");
        fs::create_dir_all(&cache)?;
        let (kernel, base) = {
            // One builder at a time; the others wait, then find the cache ready.
            let lock = File::create(cache.join("lock"))?;
            if lock.try_lock().is_err() {
                eprintln!(
                    "vm: waiting for another run to finish preparing {}",
                    cache.display()
                );
                lock.lock().context("locking the VM cache")?;
            }
            let packages = host::ensure_packages()?;
            let kernel = kernel::ensure(&cache)?;
            // Opened under the lock: a concurrent run with another recipe may replace it.
            let base = File::open(initramfs::ensure_base(&cache, &kernel, &packages)?)?;
            (kernel, base)
        };

        remove_abandoned_runs(&cache);
        let nonce = nonce();
        let run_dir = TempDir(cache.join(format!("run-{nonce}")));
        fs::create_dir_all(&run_dir.0)?;
        let mut env = String::new();
        let _ = writeln!(env, "XTASK_NONCE={nonce}");
        let _ = writeln!(env, "XTASK_VERBOSE={}", u8::from(self.options.verbose));
        let _ = writeln!(
            env,
            "XTASK_CWD={}",
            shell_quote(&self.cwd.to_string_lossy())
        );
        // Colours only when a person is watching.
        let term = std::env::var("TERM")
            .ok()
            .filter(|_| std::io::stdout().is_terminal());
        let _ = writeln!(
            env,
            "export TERM={}",
            shell_quote(term.as_deref().unwrap_or("dumb"))
        );
        for (name, value) in std::env::vars() {
            if FORWARDED_ENV.contains(&name.as_str()) || name.starts_with(FORWARDED_PREFIX) {
                let _ = writeln!(env, "export {name}={}", shell_quote(&value));
            }
        }
        self.files.env = env;
        for include in &self.options.includes {
            // Physical paths, like the working directory the command starts in.
            let path = fs::canonicalize(include)
                .with_context(|| format!("--include {}", include.display()))?;
            self.files.includes.push(path);
        }
        let initrd = run_dir.0.join("initrd.cpio");
        initramfs::write_run_initrd(base, &self.files, &initrd)?;

        let timeout = self
            .options
            .timeout
            .map_or(self.default_timeout, Duration::from_secs);
        let outcome = qemu::run(
            &qemu::Boot {
                kernel: &kernel.vmlinuz,
                initrd: &initrd,
                memory_mib: self.options.memory,
                timeout,
                verbose: self.options.verbose,
                nonce: &nonce,
            },
            on_line,
        )?;
        match outcome {
            Outcome::Exited(_) => {}
            Outcome::Crashed => {
                eprintln!("vm: the VM stopped without reporting the command's exit status");
            }
            Outcome::TimedOut => {
                eprintln!(
                    "vm: timed out after {} s; killed the VM (raise it with --timeout SECS)",
                    timeout.as_secs()
                );
            }
        }
        Ok(outcome)
    }
}

impl Outcome {
    /// The exit status xtask passes on.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exited(status) => *status,
            Outcome::Crashed => EXIT_VM_FAILED,
            Outcome::TimedOut => EXIT_TIMED_OUT,
        }
    }
}

/// A shell command line running `argv` as given (no further expansion).
pub fn shell_command(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| shell_quote(arg))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes a string for sh: `it's` becomes `'it'\''s'`.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{:x}",
        std::process::id(),
        initramfs::fnv1a(&nanos.to_le_bytes())
    )
}

/// Removes the folders of runs whose xtask was killed (Ctrl-C skips destructors).
fn remove_abandoned_runs(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A folder removed when the run ends, however it ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_reach_the_shell_word_for_word() {
        let argv = ["sh", "-c", "echo it's $HOME"].map(String::from);
        assert_eq!(shell_command(&argv), r"'sh' '-c' 'echo it'\''s $HOME'");
    }
}
