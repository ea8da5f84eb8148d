//! The loop's decisions with an in-memory engine and observer: what syncs when.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::engine::Engine;
use crate::model::{
    Conditions, Endpoint, EndpointPort, EndpointSlice, Hints, NodeFacts, Protocol, ServicePort,
    ServicePortName, ServiceType, TrafficPolicy,
};
use crate::plan::{DetectLocal, NodePortFilter, PlanConfig};

/// One call the loop made on its engine.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Full,
    Partial(Vec<String>),
    Drain,
    Reconfigure(Vec<IpAddr>),
    Rebind,
    Resume,
    Resync,
}

#[derive(Debug, Default)]
struct Shared {
    calls: Vec<Call>,
    /// The next syncs fail with these errors (a `None` service: the backend as a whole).
    fail_next: Vec<Option<&'static str>>,
    draining: usize,
    /// Work a sync left running: when it wants resuming, and whether it then fails.
    resume_at: Option<(Instant, bool)>,
    /// Periodic full syncs read the kernel off the loop's thread.
    resyncs: bool,
    synced: Vec<SyncRecord>,
    queued: Vec<(u64, u64)>,
    errors: usize,
    /// Errors reported as logged (a failing Service's once per change of error).
    reported: usize,
    eligible: Vec<bool>,
    health_checks: Vec<HealthChecks>,
    /// Services planned with an unknown scheduler annotation: a warning each time they sync.
    odd_scheduler: BTreeSet<&'static str>,
    caught_up: usize,
    /// `no_local_endpoints` reports: (family, internal, external).
    no_local: Vec<(inet::Family, u64, u64)>,
}

#[derive(Debug, Clone, Default)]
struct Log(Arc<Mutex<Shared>>);

impl Log {
    fn with<T>(&self, f: impl FnOnce(&mut Shared) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn take_calls(&self) -> Vec<Call> {
        self.with(|s| std::mem::take(&mut s.calls))
    }
}

struct FakeEngine(Log);

impl FakeEngine {
    /// The planner's warnings for the Services synced that exist and have an odd scheduler.
    fn warnings<'a>(
        &self,
        state: &ClusterState,
        synced: impl Iterator<Item = &'a ServiceName>,
    ) -> Vec<PlanWarning> {
        let odd = self.0.with(|s| s.odd_scheduler.clone());
        synced
            .filter(|name| odd.contains(&*name.name) && state.service(name).is_some())
            .map(|service| PlanWarning::UnknownScheduler {
                service: service.clone(),
                value: "odd".into(),
                fallback: ipvs::Scheduler::RoundRobin,
            })
            .collect()
    }

    /// A sync of `synced` (every Service: `None`) fails with the next of `fail_next` if that
    /// is the backend's failure or one of the Services synced.
    fn report(&self, synced: Option<&BTreeSet<ServiceName>>) -> SyncReport {
        let mut report = SyncReport::default();
        let failure = self.0.with(|s| {
            let next = s.fail_next.last()?;
            let applies = match (next, synced) {
                (None, _) | (Some(_), None) => true,
                (Some(n), Some(synced)) => synced.contains(&ServiceName::new("ns", n)),
            };
            if applies { s.fail_next.pop() } else { None }
        });
        if let Some(service) = failure {
            let service = service.map(|n| ServiceName::new("ns", n));
            let error = crate::Error::Ipvs(ipvs::Error::NotAvailable);
            report.errors.push(SyncError::new(service.as_ref(), error));
        }
        report
    }
}

impl Engine for FakeEngine {
    fn full_sync(
        &mut self,
        state: &ClusterState,
        _planner: &Planner,
        _now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        self.0.with(|s| s.calls.push(Call::Full));
        let warnings = self.warnings(state, state.services().map(|(name, _)| name));
        (self.report(None), warnings)
    }

    fn partial_sync(
        &mut self,
        state: &ClusterState,
        _planner: &Planner,
        dirty: &BTreeSet<ServiceName>,
        _now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        let names = dirty.iter().map(|n| n.name.to_string()).collect();
        self.0.with(|s| s.calls.push(Call::Partial(names)));
        (self.report(Some(dirty)), self.warnings(state, dirty.iter()))
    }

    fn drain(&mut self, _now: Instant) -> SyncReport {
        self.0.with(|s| {
            s.calls.push(Call::Drain);
            s.draining = s.draining.saturating_sub(1);
        });
        SyncReport::default()
    }

    fn counts(&self) -> Counts {
        Counts {
            draining: self.0.with(|s| s.draining),
            ..Counts::default()
        }
    }

    fn reconfigure(&mut self, config: &PlanConfig) {
        let addrs = config.node_addresses.clone();
        self.0.with(|s| s.calls.push(Call::Reconfigure(addrs)));
    }

    fn rebind(&mut self) -> SyncReport {
        self.0.with(|s| s.calls.push(Call::Rebind));
        SyncReport::default()
    }

    fn start_resync(&mut self, _now: Instant) -> bool {
        self.0.with(|s| {
            if s.resyncs {
                s.calls.push(Call::Resync);
            }
            s.resyncs
        })
    }

    fn resume_at(&self) -> Option<Instant> {
        self.0.with(|s| s.resume_at.map(|(at, _)| at))
    }

    fn resume(
        &mut self,
        _state: &ClusterState,
        _planner: &Planner,
        _now: Instant,
    ) -> Option<SyncReport> {
        let (_, fails) = self.0.with(|s| s.resume_at.take())?;
        self.0.with(|s| s.calls.push(Call::Resume));
        let mut report = SyncReport::default();
        if fails {
            let error = crate::Error::Ipvs(ipvs::Error::NotAvailable);
            report.errors.push(SyncError::new(None, error));
        }
        Some(report)
    }
}

impl Observer for Log {
    fn node_eligible(&self, eligible: bool) {
        self.with(|s| s.eligible.push(eligible));
    }

    fn queued(&self, _: &Folded, pending: (u64, u64), _: SystemTime, _: &[inet::Family]) {
        self.with(|s| s.queued.push(pending));
    }

    fn synced(&self, record: &SyncRecord) {
        self.with(|s| s.synced.push(record.clone()));
    }

    fn caught_up(&self) {
        self.with(|s| s.caught_up += 1);
    }

    fn errors(&self, errors: &[SyncError], _partial: bool, _: &[inet::Family]) {
        self.with(|s| s.errors += errors.len());
    }

    fn reported(&self, errors: &[&SyncError]) {
        self.with(|s| s.reported += errors.len());
    }

    fn counts(&self, _counts: Counts) {}

    fn no_local_endpoints(&self, family: inet::Family, internal: u64, external: u64) {
        self.with(|s| s.no_local.push((family, internal, external)));
    }

    fn health_checks(&self, checks: &HealthChecks) {
        self.with(|s| s.health_checks.push(checks.clone()));
    }
}

/// What a test source sends: a Service (re)defined with this ClusterIP, this node's addresses,
/// or its zone label.
enum Change {
    Service(&'static str, &'static str),
    Node(&'static str),
    Zone(&'static str),
    /// node-a's `spec.podCIDRs`.
    PodCidrs(&'static [&'static str]),
    /// A LoadBalancer Service with `externalTrafficPolicy: Local` and this health-check port.
    LocalLoadBalancer(&'static str, u16),
    /// The Service's one slice: its endpoints' (address, node, ready).
    Endpoints(&'static str, Vec<(&'static str, &'static str, bool)>),
    /// The Service's one slice, with one ready endpoint, annotated with this trigger time.
    Triggered(&'static str, std::time::SystemTime),
    Removed(&'static str),
}

impl crate::pending::Keyed for Change {
    type Key = (&'static str, &'static str);
    fn key(&self) -> Self::Key {
        match self {
            Change::Service(name, _)
            | Change::LocalLoadBalancer(name, _)
            | Change::Removed(name) => ("service", name),
            Change::Endpoints(name, _) | Change::Triggered(name, _) => ("slice", name),
            Change::Node(_) | Change::Zone(_) | Change::PodCidrs(_) => ("node", "node-a"),
        }
    }
}

fn local_load_balancer(name: &str, health_check_node_port: u16) -> ServicePort {
    ServicePort {
        service_type: ServiceType::LoadBalancer,
        node_port: Some(31000),
        health_check_node_port: Some(health_check_node_port),
        external_traffic_policy: TrafficPolicy::Local,
        ..port(name, "10.96.1.1")
    }
}

fn slice(name: &str, endpoints: &[(&str, &str, bool)]) -> EndpointSlice {
    let endpoints = endpoints.iter().map(|(ip, node, ready)| Endpoint {
        ip: ip.parse().unwrap(),
        port: 8080,
        conditions: Conditions {
            ready: *ready,
            ..Conditions::default()
        },
        // node-a is this node (the settings' node name).
        local: *node == "node-a",
        hints: Hints::default(),
    });
    EndpointSlice {
        service: ServiceName::new("ns", name),
        ports: vec![EndpointPort {
            name: "p".into(),
            protocol: Protocol::Tcp,
            endpoints: endpoints.collect(),
        }],
    }
}

fn port(name: &str, cluster_ip: &str) -> ServicePort {
    let name = ServicePortName {
        service: ServiceName::new("ns", name),
        port: "p".into(),
        protocol: Protocol::Tcp,
    };
    ServicePort::cluster_ip(name, 80, &[cluster_ip.parse().unwrap()])
}

fn fold(state: &mut ClusterState, changes: Vec<Change>) -> Folded {
    let mut folded = Folded::default();
    for change in changes {
        match change {
            Change::Service(name, ip) => {
                folded.service_changes += 1;
                let name_ = ServiceName::new("ns", name);
                folded
                    .affected
                    .services
                    .extend(state.upsert_service(name_, vec![port(name, ip)]));
            }
            Change::LocalLoadBalancer(name, hc) => {
                folded.service_changes += 1;
                let name_ = ServiceName::new("ns", name);
                let ports = vec![local_load_balancer(name, hc)];
                folded
                    .affected
                    .services
                    .extend(state.upsert_service(name_, ports));
            }
            Change::Endpoints(name, endpoints) => {
                folded.endpoint_changes += 1;
                let slice_name = ("ns".into(), format!("{name}-1").into());
                let affected = state.upsert_slice(slice_name, slice(name, &endpoints));
                folded.affected.services.extend(affected);
                folded.endpoint_triggers.push(None);
            }
            Change::Triggered(name, at) => {
                folded.endpoint_changes += 1;
                let slice_name = ("ns".into(), format!("{name}-1").into());
                let endpoints = [("10.244.0.9", "node-a", true)];
                let affected = state.upsert_slice(slice_name, slice(name, &endpoints));
                folded.affected.services.extend(affected);
                folded.endpoint_triggers.push(Some(at));
            }
            Change::Removed(name) => {
                folded.service_changes += 1;
                let name = ServiceName::new("ns", name);
                folded.affected.services.extend(state.remove_service(&name));
            }
            Change::Node(addr) => {
                folded.affected.nodes |= state.upsert_node(NodeFacts {
                    name: "node-a".into(),
                    addresses: vec![addr.parse().unwrap()],
                    zone: None,
                    pod_cidrs: Vec::new(),
                });
            }
            Change::PodCidrs(cidrs) => {
                let mut node = state.node("node-a").cloned().unwrap_or_default();
                node.name = "node-a".into();
                node.pod_cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
                folded.affected.nodes |= state.upsert_node(node);
            }
            Change::Zone(zone) => {
                let mut node = state.node("node-a").cloned().unwrap_or_default();
                node.name = "node-a".into();
                node.zone = Some(zone.into());
                folded.affected.nodes |= state.upsert_node(node);
            }
        }
    }
    folded
}

const MIN: Duration = Duration::from_secs(2);
const PERIOD: Duration = Duration::from_secs(30);

fn looped() -> (SyncLoop<Vec<Change>>, Log) {
    looped_with(MIN)
}

fn looped_with(min_sync_period: Duration) -> (SyncLoop<Vec<Change>>, Log) {
    looped_detecting(min_sync_period, DetectLocal::default())
}

fn looped_detecting(
    min_sync_period: Duration,
    detect_local: DetectLocal,
) -> (SyncLoop<Vec<Change>>, Log) {
    let log = Log::default();
    let settings = Settings {
        plan: PlanConfig {
            node_name: "node-a".into(),
            detect_local,
            ..PlanConfig::default()
        },
        sync_period: PERIOD,
        min_sync_period,
        ..Settings::default()
    };
    let sync_loop = SyncLoop::new(
        settings,
        Box::new(FakeEngine(log.clone())),
        fold,
        Box::new(log.clone()),
    );
    log.take_calls();
    (sync_loop, log)
}

fn services(names: &[&str]) -> Call {
    Call::Partial(names.iter().map(|n| (*n).to_owned()).collect())
}

/// A loop that has received its initial state and made its first full sync at `t0`.
fn started() -> (SyncLoop<Vec<Change>>, Log, Instant) {
    let (mut l, log) = looped();
    let t0 = Instant::now();
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "web",
        "10.96.0.10",
    )]));
    l.receive(SourceUpdate::InitialSyncDone);
    l.tick(t0);
    assert_eq!(log.take_calls(), vec![Call::Full]);
    log.with(|s| s.queued.clear());
    (l, log, t0)
}

#[test]
fn nothing_is_programmed_before_the_initial_state_is_complete() {
    let (mut l, log) = looped();
    let t0 = Instant::now();
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "web",
        "10.96.0.10",
    )]));
    l.tick(t0);
    l.tick(t0 + PERIOD * 3);
    assert_eq!(log.take_calls(), vec![]);
    assert_eq!(l.next_deadline(), None);
    l.receive(SourceUpdate::InitialSyncDone);
    l.tick(t0 + PERIOD * 3);
    assert_eq!(log.take_calls(), vec![Call::Full]);
}

#[test]
fn changes_arriving_together_are_coalesced_into_one_partial_sync() {
    let (mut l, log, t0) = started();
    for (name, ip) in [("a", "10.96.0.1"), ("b", "10.96.0.2"), ("a", "10.96.0.3")] {
        l.receive(SourceUpdate::Events(vec![Change::Service(name, ip)]));
    }
    assert_eq!(log.with(|s| s.queued.clone()), vec![(1, 0), (2, 0), (3, 0)]);
    l.tick(t0 + MIN);
    assert_eq!(log.take_calls(), vec![services(&["a", "b"])]);
    // Nothing new: nothing to do until the next full sync.
    l.tick(t0 + MIN * 2);
    assert_eq!(log.take_calls(), vec![]);
    assert_eq!(l.next_deadline(), Some(t0 + PERIOD));
}

#[test]
fn a_change_that_changes_nothing_is_not_queued() {
    let (mut l, log, t0) = started();
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "web",
        "10.96.0.10",
    )]));
    assert!(log.with(|s| s.queued.is_empty()));
    l.tick(t0 + MIN);
    assert_eq!(log.take_calls(), vec![]);
}

#[test]
fn the_min_sync_period_is_honoured() {
    let (mut l, log, t0) = started();
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "a",
        "10.96.0.1",
    )]));
    assert_eq!(l.next_deadline(), Some(t0 + MIN));
    l.tick(t0 + MIN / 2);
    assert_eq!(
        log.take_calls(),
        vec![],
        "synced before the min sync period"
    );
    l.tick(t0 + MIN);
    assert_eq!(log.take_calls(), vec![services(&["a"])]);
    // The next change waits for a min period after that sync, not after the first.
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "b",
        "10.96.0.2",
    )]));
    l.tick(t0 + MIN + MIN / 2);
    assert_eq!(log.take_calls(), vec![]);
    assert_eq!(l.next_deadline(), Some(t0 + MIN * 2));
    l.tick(t0 + MIN * 2);
    assert_eq!(log.take_calls(), vec![services(&["b"])]);
}

#[test]
fn a_full_sync_runs_every_sync_period() {
    let (mut l, log, t0) = started();
    l.tick(t0 + PERIOD.saturating_sub(Duration::from_millis(1)));
    assert_eq!(log.take_calls(), vec![]);
    l.tick(t0 + PERIOD);
    assert_eq!(log.take_calls(), vec![Call::Full]);
    assert_eq!(l.next_deadline(), Some(t0 + PERIOD * 2));
    // A change pending when the full sync is due is part of it.
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "a",
        "10.96.0.1",
    )]));
    l.tick(t0 + PERIOD * 2);
    assert_eq!(log.take_calls(), vec![Call::Full]);
    l.tick(t0 + PERIOD * 2 + MIN);
    assert_eq!(log.take_calls(), vec![]);
}

#[test]
fn a_periodic_full_sync_the_engine_runs_off_the_loop_holds_no_change_back() {
    let (mut l, log, t0) = started();
    log.with(|s| s.resyncs = true);
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "a",
        "10.96.0.1",
    )]));
    log.with(|s| s.health_checks.clear());
    l.tick(t0 + PERIOD);
    assert_eq!(
        log.take_calls(),
        vec![Call::Resync, services(&["a"])],
        "the change pending is synced at once, not dropped for the full sync"
    );
    assert_eq!(l.next_deadline(), Some(t0 + PERIOD * 2));
    let complete = log.with(|s| s.health_checks.iter().filter(|h| h.complete).count());
    assert_eq!(
        complete, 1,
        "every health check is reported, as after a full sync"
    );
    // An engine that cannot (its mirror is in doubt) gets a full sync.
    log.with(|s| s.resyncs = false);
    l.tick(t0 + PERIOD * 2);
    assert_eq!(log.take_calls(), vec![Call::Full]);
}

#[test]
fn a_failed_sync_is_repaired_by_a_full_sync_soon_after() {
    let (mut l, log, t0) = started();
    // The backend as a whole failed (no Service to blame): the mirror may be wrong anywhere.
    log.with(|s| s.fail_next.push(None));
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "a",
        "10.96.0.1",
    )]));
    l.tick(t0 + MIN);
    assert_eq!(log.take_calls(), vec![services(&["a"])]);
    let repair = t0 + MIN + REPAIR_DELAY.max(MIN);
    assert_eq!(l.next_deadline(), Some(repair));
    l.tick(t0 + (MIN + REPAIR_DELAY.max(MIN)).saturating_sub(Duration::from_millis(1)));
    assert_eq!(log.take_calls(), vec![]);
    l.tick(repair);
    assert_eq!(log.take_calls(), vec![Call::Full]);
    // Repaired: back to the sync period.
    assert_eq!(l.next_deadline(), Some(repair + PERIOD));
    assert_eq!(log.with(|s| s.errors), 1);
}

#[test]
fn only_a_backend_failure_makes_a_sync_unhealthy() {
    let (mut l, log, t0) = started();
    // `fail_next` pops from the end: first a Service's error, then the backend's.
    log.with(|s| s.fail_next = vec![None, Some("a")]);
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "a",
        "10.96.0.1",
    )]));
    l.tick(t0 + MIN);
    // The refused Service's retry, which the backend's failure then spoils.
    l.tick(t0 + MIN * 2);
    let healthy: Vec<bool> = log.with(|s| s.synced.iter().map(|r| r.healthy).collect());
    assert_eq!(healthy, vec![true, true, false]);
    let full: Vec<bool> = log.with(|s| s.synced.iter().map(|r| r.full).collect());
    assert_eq!(full, vec![true, false, false]);
    // The backend's failure brings a full sync.
    l.tick(t0 + MIN * 2 + REPAIR_DELAY.max(MIN));
    assert_eq!(log.with(|s| s.synced.last().map(|r| r.full)), Some(true));
}

#[test]
fn a_refused_service_is_retried_on_its_own_with_backoff_and_never_forces_a_full_sync() {
    let (mut l, log) = looped_with(Duration::ZERO);
    let t0 = Instant::now();
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "web",
        "10.96.0.10",
    )]));
    l.receive(SourceUpdate::InitialSyncDone);
    l.tick(t0);
    log.take_calls();
    // `odd` is refused four times, then accepted.
    log.with(|s| s.fail_next = vec![Some("odd"); 4]);
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "odd",
        "10.96.0.20",
    )]));
    l.tick(t0);
    assert_eq!(log.take_calls(), vec![services(&["odd"])]);
    let mut at = t0;
    let others = ["10.96.0.31", "10.96.0.32", "10.96.0.34", "10.96.0.38"];
    for (delay, other) in [1, 2, 4, 8].into_iter().zip(others) {
        let due = at + Duration::from_secs(delay);
        assert_eq!(l.next_deadline(), Some(due), "retry after {delay} s");
        l.tick(due.checked_sub(Duration::from_millis(1)).unwrap());
        assert_eq!(log.take_calls(), vec![], "retried before its backoff");
        // Another Service's change meanwhile goes through at once, on its own.
        l.receive(SourceUpdate::Events(vec![Change::Service("other", other)]));
        l.tick(due.checked_sub(Duration::from_millis(1)).unwrap());
        assert_eq!(log.take_calls(), vec![services(&["other"])]);
        l.tick(due);
        assert_eq!(log.take_calls(), vec![services(&["odd"])]);
        at = due;
    }
    // Four refusals with the same error: reported (logged, and an Event) once.
    assert_eq!(log.with(|s| (s.errors, s.reported)), (4, 1));
    // The fifth try went through: no more retries, and never a full sync in between.
    assert_eq!(l.next_deadline(), Some(t0 + PERIOD));
    assert!(log.with(|s| s.synced.iter().skip(1).all(|r| !r.full)));
    // The backoff is capped at the sync period.
    log.with(|s| s.fail_next = vec![Some("odd"); 10]);
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "odd",
        "10.96.0.21",
    )]));
    let mut at = at + Duration::from_secs(1);
    l.tick(at);
    for _ in 0..8 {
        let due = l.next_deadline().unwrap();
        assert!(
            due.saturating_duration_since(at) <= PERIOD,
            "{:?}",
            due - at
        );
        at = due;
        l.tick(at);
    }
}

#[test]
fn the_programming_latency_counts_from_each_endpoint_changes_trigger_time() {
    use std::time::SystemTime;
    let (mut l, log, t0) = started();
    let latencies = |l: &mut SyncLoop<Vec<Change>>, at: Instant| {
        l.tick(at);
        log.with(|s| s.synced.last().cloned())
            .unwrap()
            .programming_latencies
    };
    // Changed before the proxy started: an earlier run's change, not timed (as kube-proxy).
    let before = SystemTime::now() - Duration::from_secs(3600);
    l.receive(SourceUpdate::Events(vec![Change::Triggered("web", before)]));
    assert_eq!(latencies(&mut l, t0 + MIN), vec![]);
    // Timed from the annotation, not from its arrival at the loop.
    let changed = SystemTime::now();
    std::thread::sleep(Duration::from_millis(200));
    l.receive(SourceUpdate::Events(vec![
        Change::Triggered("api", changed),
        Change::Endpoints("db", vec![("10.244.0.7", "node-a", true)]),
    ]));
    let both = latencies(&mut l, t0 + MIN * 2);
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(both[0] >= Duration::from_millis(200), "{both:?}");
    // Without the annotation, from the change's arrival.
    assert!(both[1] < Duration::from_millis(200), "{both:?}");
    // A Service change is no EndpointSlice change, and a periodic full sync applies none.
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "a",
        "10.96.0.1",
    )]));
    assert_eq!(latencies(&mut l, t0 + MIN * 3), vec![]);
    assert_eq!(latencies(&mut l, t0 + PERIOD * 2), vec![]);
    // A sync that failed as a whole programmed nothing to time.
    log.with(|s| s.fail_next.push(None));
    l.receive(SourceUpdate::Events(vec![Change::Triggered(
        "cache",
        SystemTime::now(),
    )]));
    let record = {
        l.tick(t0 + PERIOD * 2 + MIN);
        log.with(|s| s.synced.last().cloned()).unwrap()
    };
    assert!(!record.healthy, "{record:?}");
    assert_eq!(record.programming_latencies, vec![]);
}

#[test]
fn work_a_sync_left_running_is_resumed_when_due_and_its_failure_brings_a_full_sync() {
    let (mut l, log, t0) = started();
    let due = t0 + Duration::from_millis(10);
    log.with(|s| s.resume_at = Some((due, false)));
    assert_eq!(l.next_deadline(), Some(due));
    l.tick(t0 + Duration::from_millis(5));
    assert_eq!(log.take_calls(), vec![], "not due yet");
    l.tick(due);
    assert_eq!(log.take_calls(), vec![Call::Resume]);
    assert_eq!(l.next_deadline(), Some(t0 + PERIOD), "nothing left running");

    log.with(|s| s.resume_at = Some((due, true)));
    l.tick(due);
    assert_eq!(log.take_calls(), vec![Call::Resume]);
    assert_eq!(log.with(|s| s.errors), 1, "its error is reported");
    let repair = due + REPAIR_DELAY.max(MIN);
    assert_eq!(l.next_deadline(), Some(repair), "a full sync repairs soon");
    l.tick(repair);
    assert_eq!(log.take_calls(), vec![Call::Full]);
}

#[test]
fn draining_real_servers_are_checked_every_drain_interval_while_any_drain() {
    let (mut l, log, t0) = started();
    log.with(|s| s.draining = 2);
    assert!(l.next_deadline().is_some_and(|d| d <= t0), "a drain is due");
    l.tick(t0);
    assert_eq!(log.take_calls(), vec![Call::Drain]);
    l.tick(t0 + DRAIN_INTERVAL / 2);
    assert_eq!(
        log.take_calls(),
        vec![],
        "drained again within the interval"
    );
    assert_eq!(l.next_deadline(), Some(t0 + DRAIN_INTERVAL));
    l.tick(t0 + DRAIN_INTERVAL);
    assert_eq!(log.take_calls(), vec![Call::Drain]);
    // Nothing left draining: no more drain ticks.
    l.tick(t0 + DRAIN_INTERVAL * 2);
    assert_eq!(log.take_calls(), vec![]);
    assert_eq!(l.next_deadline(), Some(t0 + PERIOD));
}

#[test]
fn new_node_addresses_reconfigure_the_engine_and_sync_everything() {
    let (mut l, log, t0) = started();
    l.receive(SourceUpdate::Events(vec![Change::Node("192.168.1.10")]));
    assert_eq!(
        log.take_calls(),
        vec![Call::Reconfigure(vec!["192.168.1.10".parse().unwrap()])]
    );
    l.tick(t0 + MIN);
    assert_eq!(log.take_calls(), vec![Call::Full]);
    // The same facts again change nothing.
    l.receive(SourceUpdate::Events(vec![Change::Node("192.168.1.10")]));
    l.tick(t0 + MIN * 2);
    assert_eq!(log.take_calls(), vec![]);
}

fn local(addresses: &[&str], dummy: Option<u32>) -> SourceUpdate<Vec<Change>> {
    SourceUpdate::LocalAddresses(netif::NodeAddresses {
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        excluded_index: dummy,
    })
}

#[test]
fn a_new_local_address_replans_with_a_full_sync_and_link_local_ones_do_not() {
    let (mut l, log, t0) = started();
    l.receive(local(&["127.0.0.1", "192.168.10.7"], Some(7)));
    assert_eq!(log.take_calls(), vec![Call::Reconfigure(vec![])]);
    assert_eq!(
        l.planner.config.node_port_ips,
        ["192.168.10.7".parse::<IpAddr>().unwrap()]
    );
    l.tick(t0 + MIN);
    assert_eq!(log.take_calls(), vec![Call::Full]);
    // A new pod's veth brings an IPv6 link-local address: no NodePort there, nothing to do.
    l.receive(local(&["127.0.0.1", "192.168.10.7", "fe80::1"], Some(7)));
    l.tick(t0 + MIN * 2);
    assert_eq!(log.take_calls(), vec![]);
}

#[test]
fn a_deleted_kube_ipvs0_is_rebound_at_once_without_a_full_sync() {
    let (mut l, log, t0) = started();
    l.receive(local(&["192.168.10.7"], Some(7)));
    l.tick(t0 + MIN);
    log.take_calls();
    l.receive(local(&["192.168.10.7"], None));
    assert!(l.next_deadline().is_some_and(|d| d <= Instant::now()));
    let now = (t0 + MIN * 2).max(Instant::now());
    l.tick(now);
    assert_eq!(log.take_calls(), vec![Call::Rebind]);
    // Made again, with a new index: that is not another loss.
    l.receive(local(&["192.168.10.7"], Some(8)));
    l.tick(now + MIN);
    assert_eq!(log.take_calls(), vec![]);
}

#[test]
fn a_new_zone_label_replans_everything_for_the_zone_hints() {
    let (mut l, log, t0) = started();
    l.receive(SourceUpdate::Events(vec![Change::Zone("zone-a")]));
    assert_eq!(log.take_calls(), vec![Call::Reconfigure(vec![])]);
    l.tick(t0 + MIN);
    assert_eq!(log.take_calls(), vec![Call::Full]);
}

#[test]
fn a_service_of_a_new_family_reconfigures_the_engine() {
    let (mut l, log, t0) = started();
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "v6", "fd00::10",
    )]));
    assert_eq!(log.take_calls(), vec![Call::Reconfigure(vec![])]);
    l.tick(t0 + MIN);
    assert_eq!(log.take_calls(), vec![Call::Full]);
}

#[test]
fn node_eligibility_goes_to_the_observer() {
    let (mut l, log) = looped();
    l.receive(SourceUpdate::NodeEligible(false));
    l.receive(SourceUpdate::NodeEligible(true));
    assert_eq!(log.with(|s| s.eligible.clone()), vec![false, true]);
}

/// A reported health check: the Service's name, its port and local endpoints.
type Reported = (String, Option<(u16, usize)>);

/// The health-check ports the last sync reported, and whether the list was complete.
fn last_health_checks(log: &Log) -> (Vec<Reported>, bool) {
    let checks = log.with(|s| s.health_checks.last().cloned()).unwrap();
    let services = checks.services.iter();
    let named = services.map(|h| (h.service.name.to_string(), h.port));
    (named.collect(), checks.complete)
}

#[test]
fn health_checks_are_reported_for_the_synced_services_only_and_for_all_after_a_full_sync() {
    let (mut l, log, t0) = started();
    let names: Vec<&'static str> = (0..50)
        .map(|i| format!("lb-{i:02}").leak() as &str)
        .collect();
    let lbs = names.iter().zip(30_000..);
    l.receive(SourceUpdate::Events(
        lbs.map(|(n, hc)| Change::LocalLoadBalancer(n, hc))
            .collect(),
    ));
    l.tick(t0 + MIN);
    let (reported, complete) = last_health_checks(&log);
    assert_eq!(reported.len(), 50);
    assert!(!complete);
    assert_eq!(reported[7], ("lb-07".to_owned(), Some((30_007, 0))));

    // One Service's endpoints change: only it is reported, whatever the cluster's size.
    let endpoints = vec![
        ("10.244.0.5", "node-a", true),
        ("10.244.0.6", "node-a", false),
        ("10.244.1.5", "node-b", true),
    ];
    l.receive(SourceUpdate::Events(vec![Change::Endpoints(
        "lb-07", endpoints,
    )]));
    l.tick(t0 + MIN * 2);
    let only_lb7 = vec![("lb-07".to_owned(), Some((30_007, 1)))];
    assert_eq!(last_health_checks(&log), (only_lb7, false));

    // Its local endpoint moves to another node.
    let endpoints = vec![("10.244.0.5", "node-b", true)];
    l.receive(SourceUpdate::Events(vec![Change::Endpoints(
        "lb-07", endpoints,
    )]));
    l.tick(t0 + MIN * 3);
    let lb7_empty = vec![("lb-07".to_owned(), Some((30_007, 0)))];
    assert_eq!(last_health_checks(&log), (lb7_empty, false));

    l.receive(SourceUpdate::Events(vec![Change::Removed("lb-03")]));
    l.tick(t0 + MIN * 4);
    assert_eq!(
        last_health_checks(&log),
        (vec![("lb-03".to_owned(), None)], false)
    );

    // A full sync lists every Service with a health check (not the ClusterIP "web"), complete.
    l.tick(t0 + PERIOD);
    assert_eq!(log.take_calls().last(), Some(&Call::Full));
    let (reported, complete) = last_health_checks(&log);
    assert!(complete);
    assert_eq!(reported.len(), 49);
    assert!(
        reported
            .iter()
            .all(|(n, p)| n.starts_with("lb-") && p.is_some())
    );
    assert!(!reported.iter().any(|(n, _)| n == "lb-03"));
}

#[test]
fn health_checks_listen_on_every_address_unless_nodeport_addresses_is_set() {
    for (filter, expected) in [
        (NodePortFilter::default(), vec![]),
        (
            NodePortFilter {
                cidrs: vec!["192.168.1.0/24".parse().unwrap()],
                primary: false,
            },
            vec!["192.168.1.10".parse::<IpAddr>().unwrap()],
        ),
    ] {
        let (mut l, log) = looped();
        l.settings.node_port_filter = filter;
        l.receive(SourceUpdate::Events(vec![
            Change::Node("192.168.1.10"),
            Change::LocalLoadBalancer("lb", 30_000),
        ]));
        l.receive(SourceUpdate::InitialSyncDone);
        l.tick(Instant::now());
        let checks = log.with(|s| s.health_checks.last().cloned()).unwrap();
        assert_eq!(checks.addresses, expected);
    }
}

#[test]
fn a_warning_is_remembered_while_its_service_has_it_and_forgotten_when_it_goes() {
    let (mut l, log, t0) = started();
    log.with(|s| s.odd_scheduler.insert("odd"));
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "odd",
        "10.96.0.11",
    )]));
    l.tick(t0 + MIN);
    let odd = ServiceName::new("ns", "odd");
    assert_eq!(l.reported.get(&odd).map(BTreeSet::len), Some(1));
    // Synced again with the same warning: still one, said once.
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "odd",
        "10.96.0.12",
    )]));
    l.tick(t0 + 2 * MIN);
    assert_eq!(l.reported.get(&odd).map(BTreeSet::len), Some(1));
    // A full sync keeps what it finds.
    l.tick(t0 + PERIOD);
    assert_eq!(l.reported.keys().collect::<Vec<_>>(), [&odd]);
    l.receive(SourceUpdate::Events(vec![Change::Removed("odd")]));
    l.tick(t0 + PERIOD + MIN);
    assert!(l.reported.is_empty(), "{:?}", l.reported);
}

#[test]
fn changes_that_change_nothing_are_caught_up_only_after_a_sync_applied_everything() {
    let (tx, mut updates) = crate::pending::channel::<Change>(None);
    let (mut l, log, t0) = started();
    let caught_up = || log.with(|s| s.caught_up);
    let send = |change| tx.send(SourceUpdate::Events(vec![change])).unwrap();
    // The same Service again: nothing to apply.
    send(Change::Service("web", "10.96.0.10"));
    l.take_all(&mut updates);
    assert_eq!(caught_up(), 1);
    // A real change, and a sync that fails as a whole: it is not applied.
    send(Change::Service("web", "10.96.0.20"));
    l.take_all(&mut updates);
    log.with(|s| s.fail_next.push(None));
    l.tick(t0 + MIN);
    send(Change::Service("web", "10.96.0.20"));
    l.take_all(&mut updates);
    assert_eq!(caught_up(), 1, "the failed sync applied nothing");
    // The repair sync goes through; then a no-op is caught up again.
    l.tick(t0 + 2 * MIN);
    assert_eq!(log.take_calls().last(), Some(&Call::Full));
    send(Change::Service("web", "10.96.0.20"));
    l.take_all(&mut updates);
    assert_eq!(caught_up(), 2);
}

#[test]
fn no_local_endpoints_are_counted_per_family_after_each_full_sync() {
    let (mut l, log, t0) = started();
    log.with(|s| s.no_local.clear());
    l.receive(SourceUpdate::Events(vec![Change::LocalLoadBalancer(
        "lb", 32000,
    )]));
    l.tick(t0 + PERIOD);
    // Only the IPv4 proxier exists: its Local LoadBalancer has no endpoint on this node.
    let last = |log: &Log| log.with(|s| std::mem::take(&mut s.no_local));
    assert_eq!(last(&log), vec![(inet::Family::V4, 0, 1)]);
    // An endpoint elsewhere does not count; a ready one here does.
    l.receive(SourceUpdate::Events(vec![Change::Endpoints(
        "lb",
        vec![("10.244.1.5", "node-b", true)],
    )]));
    l.tick(t0 + PERIOD * 2);
    assert_eq!(last(&log), vec![(inet::Family::V4, 0, 1)]);
    l.receive(SourceUpdate::Events(vec![Change::Endpoints(
        "lb",
        vec![("10.244.0.5", "node-a", true)],
    )]));
    l.tick(t0 + PERIOD * 3);
    assert_eq!(last(&log), vec![(inet::Family::V4, 0, 0)]);
}

/// As kube-proxy in NodeCIDR mode: nothing is programmed before the Node has podCIDRs (the
/// rules are made from them), then they are fixed: a change ends the loop for the process to
/// restart, as does their not coming within five minutes.
#[test]
fn node_cidr_mode_waits_for_the_pod_cidrs_and_restarts_when_they_change() {
    let (mut l, log) = looped_detecting(MIN, DetectLocal::NodeCidr);
    let t0 = Instant::now();
    l.receive(SourceUpdate::Events(vec![Change::Service(
        "web",
        "10.96.0.10",
    )]));
    l.receive(SourceUpdate::InitialSyncDone);
    l.tick(t0);
    l.tick(t0 + PERIOD);
    assert_eq!(log.take_calls(), vec![], "synced without podCIDRs");
    assert_eq!(l.next_deadline(), Some(t0 + POD_CIDR_TIMEOUT));

    l.receive(SourceUpdate::Events(vec![Change::PodCidrs(&[
        "10.244.1.0/24",
    ])]));
    l.tick(t0 + PERIOD);
    assert_eq!(log.take_calls().last(), Some(&Call::Full));
    assert_eq!(l.restart(), None);
    // The same podCIDRs again change nothing.
    l.receive(SourceUpdate::Events(vec![Change::PodCidrs(&[
        "10.244.1.0/24",
    ])]));
    l.tick(t0 + PERIOD + MIN);
    assert_eq!(l.restart(), None);

    l.receive(SourceUpdate::Events(vec![Change::PodCidrs(&[
        "10.244.2.0/24",
    ])]));
    let restart = l.restart().expect("a restart").to_string();
    assert!(
        restart.contains("10.244.1.0/24") && restart.contains("10.244.2.0/24"),
        "{restart}"
    );
    l.tick(t0 + PERIOD * 2);
    assert_eq!(log.take_calls(), vec![], "synced with changed podCIDRs");

    // Never given any: the loop gives up after the timeout.
    let (mut l, log) = looped_detecting(MIN, DetectLocal::NodeCidr);
    l.receive(SourceUpdate::InitialSyncDone);
    l.tick(t0);
    assert_eq!(l.restart(), None);
    l.tick(t0 + POD_CIDR_TIMEOUT);
    assert!(l.restart().is_some());
    assert_eq!(log.take_calls(), vec![]);
}

/// In the other modes the podCIDRs are not read: their change costs nothing.
#[test]
fn pod_cidrs_are_ignored_outside_node_cidr_mode() {
    let (mut l, log, t0) = started();
    l.receive(SourceUpdate::Events(vec![Change::PodCidrs(&[
        "10.244.1.0/24",
    ])]));
    l.receive(SourceUpdate::Events(vec![Change::PodCidrs(&[
        "10.244.2.0/24",
    ])]));
    l.tick(t0 + MIN);
    assert_eq!(log.take_calls(), vec![]);
    assert_eq!(l.restart(), None);
}
