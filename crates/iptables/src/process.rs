//! One tool run with a bound: its stdin written, its stdout and stderr read, and the whole
//! process group killed if it has not exited in time.
//!
//! Each pipe has its own thread, so a tool that stops reading its input (an `iptables-restore`
//! waiting for the xtables lock while 100 KB of rules wait in the pipe) or that fills its
//! output cannot block the caller past the bound. The tool runs in a process group of its own
//! and the whole group is killed, so a child it forked (a shell's `sleep`) cannot keep the
//! pipes open after it.
#![allow(unsafe_code)]

use std::io::{self, Read, Write as _};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use std::os::unix::process::CommandExt as _;

/// What a tool did.
#[derive(Debug)]
pub(crate) struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// It was killed when the bound passed.
    pub timed_out: bool,
}

/// Runs `cmd` with `stdin` (or none) as its input, killed with its process group after
/// `timeout`. Fails only when it cannot be started or waited for.
pub(crate) fn run(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<Finished> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd.spawn()?;
    let group = child.id();
    let input = child.stdin.take();
    let mut stdout = child.stdout.take().expect("stdout was piped");
    let mut stderr = child.stderr.take().expect("stderr was piped");
    std::thread::scope(|s| {
        if let (Some(mut pipe), Some(bytes)) = (input, stdin) {
            s.spawn(move || {
                // The tool exited early (or was killed); its stderr says why.
                if let Err(e) = pipe.write_all(bytes) {
                    tracing::debug!(error = %e, "writing to the tool's stdin failed");
                }
            });
        }
        let out = s.spawn(move || read_all(&mut stdout));
        let err = s.spawn(move || read_all(&mut stderr));
        let (exited, exit) = mpsc::channel::<()>();
        let watchdog = s.spawn(move || {
            let late = exit.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout);
            if late {
                kill_group(group);
            }
            late
        });
        let status = child.wait();
        let _ = exited.send(());
        let timed_out = watchdog.join().unwrap_or(false);
        Ok(Finished {
            status: status?,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
            timed_out,
        })
    })
}

/// The bound of a tool whose pipes the caller streams itself ([`crate::Runner::save_each_line`],
/// [`crate::RestoreStream`]): a watchdog thread kills the tool's process group once `timeout`
/// passes, unless [`Deadline::disarm`] (the tool exited) came first. The tool must have been
/// started with `process_group(0)`.
#[derive(Debug)]
pub(crate) struct Deadline {
    exited: Option<mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<bool>>,
}

impl Deadline {
    pub(crate) fn start(child: &std::process::Child, timeout: Duration) -> Deadline {
        let group = child.id();
        let (exited, exit) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let late = exit.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout);
            if late {
                kill_group(group);
            }
            late
        });
        Deadline {
            exited: Some(exited),
            watchdog: Some(watchdog),
        }
    }

    /// Stops the watchdog: whether it had killed the tool.
    pub(crate) fn disarm(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        if let Some(exited) = self.exited.take() {
            let _ = exited.send(());
        }
        self.watchdog
            .take()
            .is_some_and(|w| w.join().unwrap_or(false))
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_all(pipe: &mut impl Read) -> Vec<u8> {
    let mut bytes = Vec::new();
    // A read error ends the output; what was read so far is what the tool said.
    let _ = pipe.read_to_end(&mut bytes);
    bytes
}

/// SIGKILL to the process group `group` (the tool and anything it forked).
fn kill_group(group: u32) {
    let Ok(group) = libc::pid_t::try_from(group) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. The group is the
    // tool's own (process_group(0) made its pid the group id); it outlived its bound, so it is
    // not reaped unless it exited in this very instant, when the kill finds no group.
    let rc = unsafe { libc::kill(-group, libc::SIGKILL) };
    if rc != 0 {
        tracing::warn!(
            group,
            error = %io::Error::last_os_error(),
            "killing a tool that outlived its bound"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn a_tool_that_exits_is_read_whole() {
        let input = "line\n".repeat(100_000);
        let done = run(
            &mut sh("wc -l; echo said >&2; exit 3"),
            Some(input.as_bytes()),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&done.stdout).trim(), "100000");
        assert_eq!(done.stderr, b"said\n");
        assert_eq!(done.status.code(), Some(3));
        assert!(!done.timed_out);
    }

    #[test]
    fn a_hung_tool_and_what_it_forked_are_killed_at_the_bound() {
        // The shell forks `sleep`, which holds the pipes; a megabyte of input is never read.
        let input = vec![b'x'; 1 << 20];
        let started = Instant::now();
        let done = run(
            &mut sh("sleep 30; echo never"),
            Some(&input),
            Duration::from_millis(500),
        )
        .unwrap();
        let took = started.elapsed();
        assert!(done.timed_out);
        assert!(!done.status.success());
        assert!(done.stdout.is_empty());
        assert!(took < Duration::from_secs(10), "returned after {took:?}");
    }
}
