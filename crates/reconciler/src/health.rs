//! kube-proxy's health semantics: what `/healthz` and `/livez` answer, from when changes were
//! queued and when a sync last applied them.
//!
//! The proxier is healthy unless a change has been waiting longer than the health timeout
//! (twice the sync period, as kube-proxy sets it) without a sync that applied it; before the
//! first sync, a change is pending by definition (the initial state), so a proxy that never
//! manages to sync turns unhealthy. `/healthz` additionally requires a first sync to have
//! completed (a proxy that has not programmed the node yet must not receive load-balancer
//! traffic) and the node to be eligible (not being deleted); `/livez` requires neither, so a
//! proxy still waiting for a slow initial list is not restarted before the timeout.
//!
//! As kube-proxy's `QueuedUpdate` is called from its event handlers, not its proxier, a change
//! is recorded as queued where a source hands it over ([`crate::pending`]), not by the sync
//! thread: a change is either waiting in the queue or taken by the loop, and the oldest of
//! either counts. A sync thread that blocks therefore turns unhealthy however it blocks.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// What `/healthz` and `/livez` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// No change has waited longer than the timeout.
    pub healthy: bool,
    /// At least one sync has completed.
    pub synced: bool,
    pub node_eligible: bool,
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
}

#[derive(Debug)]
struct State {
    timeout: Duration,
    last_updated: Option<SystemTime>,
    /// The oldest change waiting in the queue, not yet taken by the loop.
    waiting: Option<SystemTime>,
    /// The oldest change the loop has taken and not yet applied.
    taken: Option<SystemTime>,
    node_eligible: bool,
}

/// Shared, cheap to clone; the queue and the sync loop write, the HTTP servers read.
#[derive(Debug, Clone)]
pub struct Health {
    state: Arc<Mutex<State>>,
}

impl HealthReport {
    /// `/healthz`: serve traffic only from a proxy that has programmed the node, keeps up with
    /// changes, and runs on a node that is staying.
    #[must_use]
    pub fn healthz_ok(&self) -> bool {
        self.healthy && self.synced && self.node_eligible
    }

    /// `/livez`: restart only a proxy that stopped keeping up.
    #[must_use]
    pub fn livez_ok(&self) -> bool {
        self.healthy
    }
}

impl Health {
    /// A proxy that has not synced yet: its initial state counts as queued from `started`.
    #[must_use]
    pub fn new(timeout: Duration, started: SystemTime) -> Health {
        Health {
            state: Arc::new(Mutex::new(State {
                timeout,
                last_updated: None,
                waiting: None,
                taken: Some(started),
                node_eligible: true,
            })),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A change arrived in the queue; the kernel does not reflect it yet.
    pub fn queued(&self, now: SystemTime) {
        self.with(|s| {
            s.waiting.get_or_insert(now);
        });
    }

    /// The loop took every change waiting in the queue.
    pub fn taken(&self) {
        self.with(|s| {
            if let Some(waiting) = s.waiting.take() {
                s.taken = Some(s.taken.map_or(waiting, |t| t.min(waiting)));
            }
        });
    }

    /// A sync applied every change the loop had taken (changes still in the queue stay
    /// pending).
    pub fn synced(&self, now: SystemTime) {
        self.with(|s| {
            s.last_updated = Some(now);
            s.taken = None;
        });
    }

    /// The changes the loop took need no sync (they changed nothing the kernel shows).
    pub fn caught_up(&self) {
        self.with(|s| s.taken = None);
    }

    /// Whether this node should receive load-balancer traffic (false while it is deleted).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.with(|s| s.node_eligible = eligible);
    }

    /// Whether the proxy keeps up, asked at any time: what kube-proxy's service health servers
    /// report as `serviceProxyHealthy` (node eligibility is `/healthz`'s alone).
    pub fn probe(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let health = self.clone();
        move || health.report(SystemTime::now()).healthy
    }

    #[must_use]
    pub fn report(&self, now: SystemTime) -> HealthReport {
        self.with(|s| {
            let oldest = match (s.waiting, s.taken) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let stale = oldest
                .is_some_and(|queued| now.duration_since(queued).unwrap_or_default() >= s.timeout);
            HealthReport {
                healthy: !stale,
                synced: s.last_updated.is_some(),
                node_eligible: s.node_eligible,
                last_updated: s.last_updated,
                current_time: now,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_says_whether_a_change_waited_too_long() {
        let health = Health::new(Duration::ZERO, SystemTime::now());
        let probe = health.probe();
        assert!(!probe(), "the initial state waited past a zero timeout");
        health.synced(SystemTime::now());
        assert!(probe());
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;
    const TIMEOUT: Duration = Duration::from_secs(60);

    fn at(secs: u64) -> SystemTime {
        T0 + Duration::from_secs(secs)
    }

    #[test]
    fn healthy_while_waiting_for_the_first_sync_until_the_timeout() {
        let health = Health::new(TIMEOUT, T0);
        let early = health.report(at(59));
        assert!(early.livez_ok());
        assert!(!early.healthz_ok(), "not ready before the first sync");
        assert!(!health.report(at(60)).healthy);
        assert!(!health.report(at(1)).synced);
    }

    #[test]
    fn a_change_older_than_the_timeout_makes_it_unhealthy_and_a_sync_recovers() {
        let health = Health::new(TIMEOUT, T0);
        health.synced(at(1));
        assert!(
            health.report(at(500)).healthy,
            "nothing pending: healthy however old the last sync"
        );
        health.queued(at(600));
        health.queued(at(630)); // a later change does not reset the age of the oldest
        assert!(health.report(at(659)).healthy);
        assert!(!health.report(at(660)).healthy);
        health.taken();
        assert!(!health.report(at(660)).healthy, "taken is not applied");
        health.synced(at(661));
        let report = health.report(at(662));
        assert!(report.healthy);
        assert_eq!(report.last_updated, Some(at(661)));
    }

    #[test]
    fn a_change_queued_during_a_sync_stays_pending_after_it() {
        let health = Health::new(TIMEOUT, T0);
        health.synced(at(1));
        health.queued(at(10));
        health.taken();
        // The sync of what was taken runs; another change arrives meanwhile.
        health.queued(at(20));
        health.synced(at(30));
        assert!(health.report(at(79)).healthy);
        assert!(
            !health.report(at(80)).healthy,
            "the change of 20 s is not applied"
        );
        health.taken();
        health.synced(at(81));
        assert!(health.report(at(500)).healthy);
    }

    #[test]
    fn changes_that_need_no_sync_leave_nothing_pending() {
        let health = Health::new(TIMEOUT, T0);
        health.synced(at(1));
        health.queued(at(10));
        health.taken();
        health.caught_up();
        let report = health.report(at(500));
        assert!(report.healthy);
        assert_eq!(report.last_updated, Some(at(1)));
    }

    #[test]
    fn a_blocked_loop_turns_unhealthy_after_the_timeout_from_the_first_change_it_missed() {
        // Two sync periods of 5 s: kube-proxy's health timeout.
        let health = Health::new(Duration::from_secs(10), T0);
        health.synced(at(1));
        // The loop blocks from 2 s on; changes keep arriving, none is taken.
        for t in 3..30 {
            health.queued(at(t));
        }
        assert!(health.report(at(12)).healthy);
        assert!(!health.report(at(13)).livez_ok());
        assert!(!health.report(at(13)).healthz_ok());
    }

    #[test]
    fn node_eligibility_is_reported_separately() {
        let health = Health::new(TIMEOUT, T0);
        health.synced(at(1));
        health.set_node_eligible(false);
        let report = health.report(at(2));
        assert!(report.livez_ok());
        assert!(!report.healthz_ok());
    }
}
