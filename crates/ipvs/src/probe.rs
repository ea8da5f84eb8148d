//! kube-proxy's start-up check, done for real, and the mode choice that follows from it.
//!
//! One probe: the "IPVS" family resolves, and a virtual server with the configured scheduler
//! can be added and deleted (which also loads the scheduler's module). The probe is a
//! firewall-mark service, so no address is ever claimed.
//!
//! The choice does not guess: IPVS is [`Absent`] only when the kernel says so for certain (no
//! "IPVS" family and `modprobe ip_vs` fails, or the kernel has no module for the scheduler).
//! Any other failure (a timeout, EPERM, a socket error) says nothing about IPVS: it is
//! retried with backoff and logged each time, never taken for "no IPVS", which would leave
//! the previous run's virtual servers and `kube-ipvs0` unmanaged.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Family, Handle, Scheduler, ServiceKey, VirtualServer};

/// Firewall marks the probe may use, highest first: far from any a user or kube-proxy sets.
const PROBE_MARKS: std::ops::Range<u32> = 0x7fff_ff00..0x7fff_ff10;

/// The first retry of a failed probe; each next one waits twice as long, up to [`RETRY_CAP`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two probes.
const RETRY_CAP: Duration = Duration::from_secs(30);
/// How long `modprobe ip_vs` may run before it is killed (and counted as failed).
const MODPROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why IPVS cannot be used on this node: what the kernel said for certain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Absent {
    /// No "IPVS" generic-netlink family, and the module could not be loaded.
    #[error(
        "the kernel has no \"IPVS\" generic netlink family and `modprobe ip_vs` failed: {modprobe}"
    )]
    NoModule {
        /// What modprobe said (or why it could not run).
        modprobe: String,
    },
    /// IPVS is there but the scheduler's module is not.
    #[error("{0}")]
    Scheduler(#[source] Error),
}

/// What one probe found.
#[derive(Debug)]
enum Verdict<H> {
    Ready(H),
    Absent(Absent),
    /// The probe failed in a way that says nothing about IPVS.
    Retry(Error),
}

impl Handle {
    /// A handle in this network namespace, once a probe virtual server with `scheduler` was
    /// added and deleted (`ipvsadm -A -f MARK -s SCHED`, then `-D`). A mark already in use is
    /// skipped; if all are, the last refusal is returned.
    pub fn probe(scheduler: Scheduler) -> Result<Handle, Error> {
        let mut handle = Handle::new()?;
        let mut refused = Error::NotAvailable;
        for mark in PROBE_MARKS.rev() {
            let probe = VirtualServer::new(
                ServiceKey::Fwmark {
                    family: Family::V4,
                    mark,
                },
                scheduler,
            );
            match handle.add_service(&probe) {
                Ok(()) => {
                    if let Err(e) = handle.delete_service(&probe.key) {
                        tracing::warn!(error = %e, "deleting the IPVS probe service");
                    }
                    return Ok(handle);
                }
                Err(e @ Error::AlreadyExists { .. }) => refused = e,
                Err(e) => return Err(e),
            }
        }
        Err(refused)
    }
}

/// Probes until the answer is certain: a handle when IPVS with `scheduler` works, [`Absent`]
/// when the kernel has no IPVS or no such scheduler. Other failures are logged and retried
/// ([`FIRST_RETRY`] doubling to [`RETRY_CAP`]) for as long as they last; blocking.
pub fn probe_until_known(scheduler: Scheduler) -> Result<Handle, Absent> {
    until_known(
        || attempt(|| Handle::probe(scheduler), load_ip_vs),
        std::thread::sleep,
    )
}

/// One probe; when the family is missing, loads `ip_vs` with `load` and probes once more.
fn attempt<H>(
    mut probe: impl FnMut() -> Result<H, Error>,
    load: impl FnOnce() -> Result<(), String>,
) -> Verdict<H> {
    let judge = |result| match result {
        Ok(handle) => Verdict::Ready(handle),
        Err(e @ Error::SchedulerMissing { .. }) => Verdict::Absent(Absent::Scheduler(e)),
        Err(e) => Verdict::Retry(e),
    };
    match probe() {
        Err(Error::NotAvailable) => {
            if let Err(modprobe) = load() {
                return Verdict::Absent(Absent::NoModule { modprobe });
            }
            tracing::info!("loaded the ip_vs module");
            judge(probe())
        }
        other => judge(other),
    }
}

fn until_known<H>(
    mut attempt: impl FnMut() -> Verdict<H>,
    mut sleep: impl FnMut(Duration),
) -> Result<H, Absent> {
    let mut delay = FIRST_RETRY;
    for attempts in 1u32.. {
        match attempt() {
            Verdict::Ready(handle) => return Ok(handle),
            Verdict::Absent(why) => return Err(why),
            Verdict::Retry(error) => {
                tracing::error!(
                    %error,
                    attempts,
                    retry_in = ?delay,
                    "probing IPVS failed; this does not show that IPVS is missing, so it is retried rather than falling back"
                );
                sleep(delay);
                delay = (delay * 2).min(RETRY_CAP);
            }
        }
    }
    unreachable!("the attempts never run out")
}

/// `modprobe ip_vs`, killed after [`MODPROBE_TIMEOUT`]; its stderr (or why it could not
/// run) when it fails.
fn load_ip_vs() -> Result<(), String> {
    let mut child = Command::new("modprobe")
        .arg("ip_vs")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run modprobe: {e}"))?;
    let deadline = Instant::now() + MODPROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {MODPROBE_TIMEOUT:?}; killed"));
            }
            Err(e) => return Err(format!("waiting for modprobe: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    Err(format!("{status}: {}", stderr.trim()))
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn scheduler_missing() -> Error {
        Error::SchedulerMissing {
            object: "-A -f 2147483407 -s twos".into(),
            scheduler: "twos".into(),
        }
    }

    #[test]
    fn no_family_and_no_module_is_absent() {
        let verdict = attempt::<()>(
            || Err(Error::NotAvailable),
            || Err("FATAL: Module ip_vs not found".into()),
        );
        let Verdict::Absent(why) = verdict else {
            panic!("{verdict:?}");
        };
        assert!(why.to_string().contains("Module ip_vs not found"), "{why}");
    }

    #[test]
    fn no_family_then_the_module_loads_is_ready() {
        let mut probes = 0;
        let verdict = attempt(
            || {
                probes += 1;
                if probes == 1 {
                    Err(Error::NotAvailable)
                } else {
                    Ok("handle")
                }
            },
            || Ok(()),
        );
        assert!(matches!(verdict, Verdict::Ready("handle")), "{verdict:?}");
    }

    #[test]
    fn a_missing_scheduler_is_absent() {
        let verdict = attempt::<()>(|| Err(scheduler_missing()), || unreachable!());
        assert!(
            matches!(verdict, Verdict::Absent(Absent::Scheduler(_))),
            "{verdict:?}"
        );
    }

    #[test]
    fn other_failures_say_nothing_about_ipvs_and_are_retried() {
        let failures = [
            Error::Timeout(Duration::from_secs(5)),
            Error::PermissionDenied {
                object: "-A -f 2147483407 -s rr".into(),
            },
            Error::Io(io::Error::from_raw_os_error(libc::EPERM)),
        ];
        for failure in failures {
            let text = failure.to_string();
            let mut once = Some(failure);
            let verdict = attempt::<()>(|| Err(once.take().unwrap()), || unreachable!());
            assert!(matches!(verdict, Verdict::Retry(_)), "{text}: {verdict:?}");
        }
        // The module loaded and the family is still missing: not certain either.
        let verdict = attempt::<()>(|| Err(Error::NotAvailable), || Ok(()));
        assert!(matches!(verdict, Verdict::Retry(_)), "{verdict:?}");
    }

    #[test]
    fn retries_back_off_until_the_answer_is_certain() {
        let mut answers = vec![
            Verdict::Ready("handle"),
            Verdict::Retry(Error::Timeout(Duration::from_secs(5))),
            Verdict::Retry(Error::Timeout(Duration::from_secs(5))),
        ];
        let mut slept = Vec::new();
        let got = until_known(|| answers.pop().unwrap(), |d| slept.push(d));
        assert!(matches!(got, Ok("handle")));
        assert_eq!(slept, [FIRST_RETRY, 2 * FIRST_RETRY]);

        let mut answers: Vec<Verdict<()>> = (0..10)
            .map(|_| Verdict::Retry(Error::Timeout(Duration::from_secs(5))))
            .collect();
        answers.insert(0, Verdict::Absent(Absent::Scheduler(scheduler_missing())));
        let mut slept = Vec::new();
        let got = until_known(|| answers.pop().unwrap(), |d| slept.push(d));
        assert!(matches!(got, Err(Absent::Scheduler(_))));
        assert_eq!(slept.len(), 10);
        assert_eq!(slept.last(), Some(&RETRY_CAP));
    }
}
