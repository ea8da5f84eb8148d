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
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

/// Shared, cheap to clone; the sync loop writes, the HTTP server reads.
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
                oldest_pending: Some(started),
                node_eligible: true,
            })),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A change arrived that the kernel does not reflect yet.
    pub fn queued(&self, now: SystemTime) {
        self.with(|s| {
            s.oldest_pending.get_or_insert(now);
        });
    }

    /// A sync applied everything that was queued when it started.
    pub fn synced(&self, now: SystemTime) {
        self.with(|s| {
            s.last_updated = Some(now);
            s.oldest_pending = None;
        });
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
            let stale = s
                .oldest_pending
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
        health.synced(at(661));
        let report = health.report(at(662));
        assert!(report.healthy);
        assert_eq!(report.last_updated, Some(at(661)));
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
