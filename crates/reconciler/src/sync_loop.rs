//! The sync loop: folds source updates into the cluster state, coalesces changes, and syncs
//! the kernel — the changed Services at most every `--ipvs-min-sync-period`, everything (after
//! re-reading the kernel) every `--ipvs-sync-period`, and draining real servers every second.
//! After a sync a backend failed as a whole, a full sync follows soon to repair it; a Service
//! the kernel refused is retried on its own, with backoff ([`crate::retries`]). A periodic
//! full sync the engine can run off the loop's thread ([`Engine::start_resync`]) holds no
//! change back: the loop goes on syncing them until the engine resumes.
//!
//! It runs on its own thread ([`SyncLoop::run`]): kernel calls are blocking and quick, and a
//! sync must never wait behind HTTP or watch traffic. Time is a parameter of
//! [`SyncLoop::tick`], so the loop's decisions are tested without sleeping.
//!
//! What the loop learns is reported to an [`Observer`] (the daemon's health, metrics and
//! service health servers); the loop neither serves nor stores them.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use inet::Family;
use tokio::sync::watch;

use crate::conntrack::{ConntrackKernel, Frontends, Reconciled, Reconciler};
use crate::engine::Engine;
use crate::model::{Endpoint, ServiceName, ServiceType, TrafficPolicy};
use crate::pending::{self, Keyed};
use crate::plan::{DetectLocal, PlanWarning, Planner};
use crate::retries::Retries;
use crate::settings::Settings;
use crate::state::{Affected, ClusterState};
use crate::sync::{Counts, IptablesRules, SyncError, SyncReport};

/// How often draining real servers are checked for remaining connections.
pub const DRAIN_INTERVAL: Duration = Duration::from_secs(1);
/// After a sync that left the kernel unlike the mirror, a full sync follows this soon.
pub const REPAIR_DELAY: Duration = Duration::from_secs(1);
/// In NodeCIDR mode, how long the first sync waits for the Node's podCIDRs before the loop
/// gives up (kube-proxy's `timeoutForNodePodCIDR`).
pub const POD_CIDR_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the loop ended by itself: the process should exit non-zero so that its pod restarts,
/// as kube-proxy exits. In NodeCIDR mode the local traffic rules depend on the Node's
/// podCIDRs, which kube-proxy reads once: their change, or their not coming, ends it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Restart(pub String);

/// What a source sends the loop. Every source — the manifest directory, the Kubernetes API
/// watchers — speaks this, so the loop cannot tell them apart. `E` is the source's batch of
/// object changes, folded into the state by the function the loop is given.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceUpdate<E> {
    /// Changes to fold in, applied together (one sync sees all of them or none). A relist
    /// arrives as one batch: applies for what is listed, deletes for what no longer is.
    Events(E),
    /// Every initial list is complete. The loop programs nothing before this: programming
    /// a partial view would delete live Services on every node.
    InitialSyncDone,
    /// Whether this node should receive load-balancer traffic: false while its Node is being
    /// deleted (deletionTimestamp set), is tainted `ToBeDeletedByClusterAutoscaler`, or is gone.
    /// kube-proxy's /healthz fails then, so that load balancers drain the node first. Sent by
    /// the Kubernetes API source when it first knows and whenever it changes; a source that
    /// never sends it leaves the node eligible.
    NodeEligible(bool),
    /// The node's own addresses as the kernel has them now, and `kube-ipvs0`'s index: sent by
    /// the daemon's address monitor at start and whenever they change. NodePorts follow them;
    /// a `kube-ipvs0` that went brings a full sync at once, which makes it again.
    LocalAddresses(netif::NodeAddresses),
}

/// What folding one batch of changes into the state did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Folded {
    /// What the batch changed in the state.
    pub affected: Affected,
    /// Service applies and deletes in the batch (kube-proxy's service changes).
    pub service_changes: u64,
    /// EndpointSlice applies and deletes in the batch.
    pub endpoint_changes: u64,
    /// Per EndpointSlice change in the batch, when the change behind it happened: the slice's
    /// `endpoints.kubernetes.io/last-change-trigger-time`, `None` when it has none (a
    /// manifest, a delete) and the loop counts from the change's arrival instead.
    pub endpoint_triggers: Vec<Option<SystemTime>>,
}

/// One finished sync, as health and metrics see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncRecord {
    pub full: bool,
    /// How long the sync took.
    pub took: Duration,
    /// When it ended.
    pub finished: SystemTime,
    /// kube-proxy's network programming latency, one per EndpointSlice change the sync applied:
    /// from its trigger time (or its arrival, when the slice had none) to the sync's end.
    /// Empty when it applied none, or failed as a whole.
    pub programming_latencies: Vec<Duration>,
    /// Whether the sync could read and write the kernel. A Service the kernel refused does
    /// not make it unhealthy; a backend that failed as a whole does.
    pub healthy: bool,
    /// The IP families it programmed: kube-proxy runs one proxier per family and labels their
    /// metrics `ip_family`; one sync here programs them all.
    pub families: Vec<inet::Family>,
    /// The iptables proxier's rules after it ([`SyncReport::iptables_rules`]).
    pub iptables_rules: Vec<IptablesRules>,
}

/// A Service's health-check node port, as the service health servers serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHealth {
    pub service: ServiceName,
    /// `spec.healthCheckNodePort` and the Service's ready endpoints on this node (distinct
    /// addresses over its ports, as kube-proxy counts them); `None` when the Service is gone
    /// or needs no health check (only a LoadBalancer with `externalTrafficPolicy: Local` does).
    pub port: Option<(u16, usize)>,
}

/// What the service health servers should serve after a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthChecks {
    /// Where to listen: the NodePort addresses when `--nodeport-addresses` is set; empty for
    /// every address.
    pub addresses: Vec<IpAddr>,
    /// After a partial sync, the Services it synced; after a full sync, every Service that
    /// has a health check.
    pub services: Vec<ServiceHealth>,
    /// Set after a full sync: a Service not listed has no health check.
    pub complete: bool,
}

/// Where the loop reports what it learns: the daemon's health, metrics and service health
/// servers.
pub trait Observer: Send {
    /// The node's eligibility for load-balancer traffic.
    fn node_eligible(&self, eligible: bool);
    /// A batch of changes arrived at `at`, for the proxiers of `families`; `pending` are the
    /// service and endpoint changes now waiting for a sync, this batch included. (Health
    /// learns of changes where they are queued, [`crate::pending`], not here.)
    fn queued(&self, folded: &Folded, pending: (u64, u64), at: SystemTime, families: &[Family]);
    /// A sync ended; nothing is pending any more.
    fn synced(&self, record: &SyncRecord);
    /// The changes taken since the last sync that applied everything changed nothing: the
    /// kernel is up to date without a sync.
    fn caught_up(&self);
    /// Errors of a sync or a drain, each once; `partial` for those of a partial sync;
    /// `families` those the proxy programs (an error naming none, [`SyncError::family`], is
    /// of them all).
    fn errors(&self, errors: &[SyncError], partial: bool, families: &[Family]);
    /// The errors just logged: each failing Service's when it is new or changed (not at every
    /// retry), and every error no Service is to blame for.
    fn reported(&self, _errors: &[&SyncError]) {}
    /// What the engine has programmed.
    fn counts(&self, counts: Counts);
    /// Service ports with a Local traffic policy and no ready endpoint on this node
    /// (internal, external) of `family`, counted after each full sync for every family.
    fn no_local_endpoints(&self, family: Family, internal: u64, external: u64);
    /// The health-check node ports after a sync: of the Services it synced, or all of them.
    fn health_checks(&self, checks: &HealthChecks);
    /// Stale conntrack entries of one family were reconciled after a sync.
    fn conntrack_reconciled(&self, _reconciled: &Reconciled) {}
}

/// One sync's outcome.
struct Outcome {
    full: bool,
    report: SyncReport,
    warnings: Vec<PlanWarning>,
    /// The Services a partial sync synced.
    synced: BTreeSet<ServiceName>,
}

/// The loop's state.
pub struct SyncLoop<E> {
    settings: Settings,
    engine: Box<dyn Engine>,
    fold: fn(&mut ClusterState, E) -> Folded,
    observer: Box<dyn Observer>,
    planner: Planner,
    state: ClusterState,
    /// The kernel's addresses, once the daemon has said them.
    local: Option<netif::NodeAddresses>,
    /// `kube-ipvs0` was deleted: the engine makes it again and binds its addresses.
    rebind_due: bool,
    initial_sync_done: bool,
    dirty: BTreeSet<ServiceName>,
    /// When the loop started: trigger times before it are of changes an earlier run applied.
    started: SystemTime,
    /// When each EndpointSlice change not yet applied happened ([`Folded::endpoint_triggers`]).
    triggers: Vec<SystemTime>,
    /// A change was folded in that no sync has applied yet (a sync that failed as a whole
    /// applied nothing).
    behind: bool,
    pending: (u64, u64),
    last_sync: Option<Instant>,
    next_full: Option<Instant>,
    next_drain: Instant,
    /// Warnings already logged, per Service they are about, so a persistent one is said once,
    /// not every sync; a Service's are dropped when a sync finds it without them (or gone).
    reported: HashMap<ServiceName, BTreeSet<String>>,
    /// The Services the kernel refused, retried on their own.
    retries: Retries,
    /// Where stale UDP and SCTP conntrack entries are deleted after each sync, if anywhere.
    conntrack: Option<Reconciler>,
    /// In NodeCIDR mode, since when the first sync has waited for the Node's podCIDRs.
    pod_cidr_wait: Option<Instant>,
    /// Set when the loop must end for the process to restart.
    restart: Option<Restart>,
}

impl<E> std::fmt::Debug for SyncLoop<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLoop")
            .field("services", &self.state.service_count())
            .field("dirty", &self.dirty.len())
            .finish_non_exhaustive()
    }
}

impl<C: Keyed> SyncLoop<Vec<C>> {
    /// Runs until `stop` turns true or every source is gone, or until the process must
    /// restart ([`Restart`]). Blocking: call it on its own thread.
    pub fn run(
        mut self,
        runtime: &tokio::runtime::Handle,
        mut updates: pending::Receiver<C>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), Restart> {
        loop {
            let wait = self.next_deadline().map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            let received = runtime.block_on(async {
                // Changes first: a periodic full sync's comparison, due again at once while
                // it lasts, takes turns with them instead of racing them.
                tokio::select! {
                    biased;
                    open = updates.wait() => Some(open),
                    () = tokio::time::sleep(wait) => None,
                    _ = stop.changed() => Some(false),
                }
            });
            match received {
                Some(true) => self.take_all(&mut updates),
                Some(false) => break,
                None => {}
            }
            if *stop.borrow() {
                break;
            }
            self.tick(Instant::now());
            if let Some(restart) = self.restart.take() {
                tracing::error!(%restart, "restarting");
                return Err(restart);
            }
        }
        tracing::info!("sync loop stopped; the kernel state is left in place");
        Ok(())
    }

    /// Folds in everything queued (it all joins the next sync). If none of it changed
    /// anything and the last sync applied everything before, health hears that nothing is
    /// pending.
    pub fn take_all(&mut self, updates: &mut pending::Receiver<C>) {
        while let Some(taken) = updates.take() {
            for update in taken {
                self.receive(update);
            }
        }
        if !self.behind && self.last_sync.is_some() {
            self.observer.caught_up();
        }
    }
}

impl<E> SyncLoop<E> {
    /// A loop over `engine` that folds each batch of changes into its state with `fold` and
    /// reports to `observer`. It programs nothing before [`SourceUpdate::InitialSyncDone`].
    #[must_use]
    pub fn new(
        settings: Settings,
        mut engine: Box<dyn Engine>,
        fold: fn(&mut ClusterState, E) -> Folded,
        observer: Box<dyn Observer>,
    ) -> Self {
        let state = ClusterState::new();
        let planner = Planner::new(settings.plan_config(&state));
        engine.reconfigure(&planner.config);
        SyncLoop {
            settings,
            engine,
            fold,
            observer,
            planner,
            state,
            local: None,
            rebind_due: false,
            initial_sync_done: false,
            dirty: BTreeSet::new(),
            started: SystemTime::now(),
            triggers: Vec::new(),
            behind: false,
            pending: (0, 0),
            last_sync: None,
            next_full: None,
            next_drain: Instant::now(),
            reported: HashMap::new(),
            retries: Retries::default(),
            conntrack: None,
            pod_cidr_wait: None,
            restart: None,
        }
    }

    /// Deletes stale conntrack entries in `table` after each sync ([`crate::conntrack`]).
    #[must_use]
    pub fn with_conntrack(mut self, table: Box<dyn ConntrackKernel>) -> Self {
        self.conntrack = Some(Reconciler::new(table));
        self
    }

    /// The cluster as the loop knows it.
    #[must_use]
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Why the loop must end for the process to restart, once it must.
    #[must_use]
    pub fn restart(&self) -> Option<&Restart> {
        self.restart.as_ref()
    }

    /// When the loop next has something to do, if anything.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.initial_sync_done {
            return None;
        }
        if self.lacks_pod_cidrs() {
            return self.pod_cidr_wait.map(|since| since + POD_CIDR_TIMEOUT);
        }
        let mut deadline = self.next_full;
        let mut consider = |t: Instant| deadline = Some(deadline.map_or(t, |d| d.min(t)));
        if self.rebind_due {
            consider(Instant::now());
        }
        if !self.dirty.is_empty() {
            consider(
                self.last_sync
                    .map_or_else(Instant::now, |l| l + self.settings.min_sync_period),
            );
        }
        if self.engine.counts().draining > 0 {
            consider(self.next_drain);
        }
        if let Some(resume) = self.engine.resume_at() {
            consider(resume);
        }
        if let Some(due) = self.retries.next_due() {
            let min = self.settings.min_sync_period;
            consider(self.last_sync.map_or(due, |l| due.max(l + min)));
        }
        deadline
    }

    /// Folds one source update into the state.
    pub fn receive(&mut self, update: SourceUpdate<E>) {
        match update {
            SourceUpdate::NodeEligible(eligible) => {
                tracing::info!(eligible, "node eligibility for load-balancer traffic");
                self.observer.node_eligible(eligible);
            }
            SourceUpdate::InitialSyncDone => {
                if !self.initial_sync_done {
                    tracing::info!(
                        services = self.state.service_count(),
                        "initial state complete"
                    );
                }
                self.initial_sync_done = true;
            }
            SourceUpdate::LocalAddresses(local) => {
                let known = self.local.as_ref().and_then(|l| l.excluded_index);
                if known.is_some_and(|index| local.excluded_index != Some(index)) {
                    tracing::warn!("kube-ipvs0 was deleted; making it again");
                    self.rebind_due = true;
                }
                self.local = Some(local);
                self.reconfigure();
            }
            SourceUpdate::Events(events) => {
                let folded = (self.fold)(&mut self.state, events);
                if folded.affected.is_empty() {
                    return;
                }
                self.pending.0 += folded.service_changes;
                self.pending.1 += folded.endpoint_changes;
                let arrived = SystemTime::now();
                // As kube-proxy, a change made before the proxy started is not timed: its
                // latency would be the restart's.
                let started = self.started;
                let triggers = folded
                    .endpoint_triggers
                    .iter()
                    .map(|t| t.unwrap_or(arrived));
                self.triggers.extend(triggers.filter(|t| *t >= started));
                self.behind = true;
                let families = &self.planner.config.families;
                self.observer
                    .queued(&folded, self.pending, arrived, families);
                let Affected { services, nodes } = folded.affected;
                if nodes || self.needs_new_family(&services) {
                    self.reconfigure();
                }
                self.dirty.extend(services);
            }
        }
    }

    /// Whether a changed Service brings a family the planner does not program yet.
    fn needs_new_family(&self, services: &[ServiceName]) -> bool {
        services
            .iter()
            .filter_map(|s| self.state.service(s))
            .flatten()
            .any(|p| {
                p.cluster_ips
                    .iter()
                    .any(|ip| !self.planner.config.families.contains(&Family::of(*ip)))
            })
    }

    /// Node facts or families changed: every Service is planned again, with a full sync.
    fn reconfigure(&mut self) {
        if self.replan() {
            self.next_full = Some(Instant::now());
        }
    }

    /// Plans with the node facts and families the state has now, if they changed; says whether
    /// they did.
    fn replan(&mut self) -> bool {
        let config = self
            .settings
            .plan_config_with(&self.state, self.local.as_ref());
        let old = &self.planner.config;
        if config.node_addresses == old.node_addresses
            && config.families == old.families
            && config.node_port_ips == old.node_port_ips
            && config.node_zone == old.node_zone
            && config.node_pod_cidrs == old.node_pod_cidrs
        {
            return false;
        }
        if config.node_pod_cidrs != old.node_pod_cidrs {
            if !old.node_pod_cidrs.is_empty() {
                // As kube-proxy's NodePodCIDRHandler: the rules were made for the old ones.
                self.restart = Some(Restart(format!(
                    "detect-local-mode NodeCIDR: the Node's podCIDRs changed from {:?} to {:?}",
                    old.node_pod_cidrs, config.node_pod_cidrs
                )));
                return false;
            }
            tracing::info!(node = %config.node_name, pod_cidrs = ?config.node_pod_cidrs, "the Node's podCIDRs tell local traffic (detect-local-mode NodeCIDR)");
        }
        tracing::info!(node = %config.node_name, zone = ?config.node_zone, addresses = ?config.node_addresses, node_ports = ?config.node_port_ips, families = ?config.families, "node facts changed");
        self.engine.reconfigure(&config);
        self.planner = Planner::new(config);
        true
    }

    /// In NodeCIDR mode, whether the Node's podCIDRs are still unknown: nothing is
    /// programmed before them, as kube-proxy creates no proxier before them.
    fn lacks_pod_cidrs(&self) -> bool {
        self.settings.plan.detect_local == DetectLocal::NodeCidr
            && self.planner.config.node_pod_cidrs.is_empty()
    }

    /// Whether the first sync still waits for the Node's podCIDRs at `now` (see
    /// [`SyncLoop::lacks_pod_cidrs`]); after [`POD_CIDR_TIMEOUT`] the loop asks to restart.
    fn awaits_pod_cidrs(&mut self, now: Instant) -> bool {
        if !self.lacks_pod_cidrs() {
            return false;
        }
        let node = &self.settings.plan.node_name;
        let since = *self.pod_cidr_wait.get_or_insert_with(|| {
            tracing::info!(%node, "watching for the Node, awaiting podCIDR allocation (detect-local-mode NodeCIDR)");
            now
        });
        if now >= since + POD_CIDR_TIMEOUT {
            self.restart = Some(Restart(format!(
                "timeout waiting for the podCIDR allocation of Node {node:?} to configure detect-local-mode NodeCIDR"
            )));
        }
        true
    }

    /// Syncs what is due at `now`.
    pub fn tick(&mut self, now: Instant) {
        if !self.initial_sync_done || self.restart.is_some() || self.awaits_pod_cidrs(now) {
            return;
        }
        if std::mem::take(&mut self.rebind_due) {
            let report = self.engine.rebind();
            tracing::info!(
                addresses_added = report.addresses_added,
                errors = report.errors.len(),
                "kube-ipvs0 made again"
            );
            self.observer
                .errors(&report.errors, false, &self.planner.config.families);
            if report.needs_full_sync() {
                self.next_full = Some(now);
            }
        }
        let mut full_due = self.next_full.is_none_or(|t| now >= t);
        if full_due && self.last_sync.is_some() {
            // Families may have moved with the Services; a replan makes the engine sync all.
            self.replan();
            if self.engine.start_resync(now) {
                // The engine looks for drift off this thread; changes go on meanwhile.
                self.next_full = Some(now + self.settings.sync_period);
                full_due = false;
                self.report_all();
                self.reconcile_conntrack(true, &BTreeSet::new());
            }
        }
        let retry: Vec<ServiceName> = self.retries.due(now).cloned().collect();
        if !retry.is_empty() {
            tracing::debug!(
                services = retry.len(),
                "retrying Services the kernel refused"
            );
            self.dirty.extend(retry);
        }
        let partial_due = !self.dirty.is_empty()
            && self
                .last_sync
                .is_none_or(|l| now >= l + self.settings.min_sync_period);
        if full_due || partial_due {
            let started = Instant::now();
            let outcome = if full_due {
                self.full_sync(now)
            } else {
                self.partial_sync(now)
            };
            self.finish(outcome, started.elapsed(), now);
        }
        if self.engine.resume_at().is_some_and(|t| now >= t)
            && let Some(report) = self.engine.resume(&self.state, &self.planner, now)
        {
            self.resumed(&report, now);
        }
        if self.engine.counts().draining > 0 && now >= self.next_drain {
            let report = self.engine.drain(now);
            if report.drained > 0 {
                tracing::info!(deleted = report.drained, "drained real servers deleted");
            }
            self.observer
                .errors(&report.errors, false, &self.planner.config.families);
            self.next_drain = now + DRAIN_INTERVAL;
            self.observer.counts(self.engine.counts());
        }
    }

    fn full_sync(&mut self, now: Instant) -> Outcome {
        // Families may have moved with the Services; replan all.
        self.replan();
        self.dirty.clear();
        let (report, warnings) = self.engine.full_sync(&self.state, &self.planner, now);
        self.next_full = Some(now + self.settings.sync_period);
        Outcome {
            full: true,
            report,
            warnings,
            synced: BTreeSet::new(),
        }
    }

    fn partial_sync(&mut self, now: Instant) -> Outcome {
        let dirty = std::mem::take(&mut self.dirty);
        let (report, warnings) = self
            .engine
            .partial_sync(&self.state, &self.planner, &dirty, now);
        Outcome {
            full: false,
            report,
            warnings,
            synced: dirty,
        }
    }

    /// What a full sync left running ([`Engine::resume`]) did: its errors are reported as a
    /// full sync's, a Service the kernel refused is retried on its own (as after any sync),
    /// and a backend failing as a whole brings a full sync soon.
    fn resumed(&mut self, report: &SyncReport, now: Instant) {
        // Only its errors count: the Services it compared without one keep their own retries.
        let cap = self.settings.sync_period;
        let to_log = self.retries.record(|_| false, &report.errors, now, cap);
        for error in &to_log {
            tracing::error!(backend = error.backend(), kind = error.kind(), "{error}");
        }
        self.observer.reported(&to_log);
        self.observer
            .errors(&report.errors, false, &self.planner.config.families);
        if report.needs_full_sync() {
            let repair = now + REPAIR_DELAY.max(self.settings.min_sync_period);
            self.next_full = Some(self.next_full.map_or(repair, |t| t.min(repair)));
        }
    }

    fn finish(&mut self, outcome: Outcome, took: Duration, now: Instant) {
        let Outcome {
            full,
            report,
            warnings,
            synced,
        } = outcome;
        self.report_warnings(full, &synced, warnings);
        let cap = self.settings.sync_period;
        let synced_now = |name: &ServiceName| full || synced.contains(name);
        let to_log = self.retries.record(synced_now, &report.errors, now, cap);
        for error in &to_log {
            tracing::error!(backend = error.backend(), kind = error.kind(), "{error}");
        }
        self.observer.reported(&to_log);
        let families = &self.planner.config.families;
        self.observer.errors(&report.errors, !full, families);
        tracing::info!(
            full,
            services = report.services,
            failing = self.retries.len(),
            ipvs_ops = report.ipvs_ops,
            addresses_added = report.addresses_added,
            addresses_removed = report.addresses_removed,
            set_entries_added = report.set_entries_added,
            set_entries_removed = report.set_entries_removed,
            errors = report.errors.len(),
            took_ms = took.as_secs_f64() * 1000.0,
            "synced"
        );
        let healthy = report.errors.iter().all(|e| e.service.is_some());
        let finished = SystemTime::now();
        // Taken by every sync, as kube-proxy's change tracker hands them over: a sync that
        // failed as a whole programmed nothing to time.
        let triggers = std::mem::take(&mut self.triggers);
        let programming_latencies = if healthy {
            let since = |t: SystemTime| finished.duration_since(t).unwrap_or_default();
            triggers.into_iter().map(since).collect()
        } else {
            Vec::new()
        };
        self.observer.synced(&SyncRecord {
            full,
            took,
            finished,
            programming_latencies,
            healthy,
            families: self.planner.config.families.clone(),
            iptables_rules: report.iptables_rules.clone(),
        });
        if healthy {
            self.behind = false;
            self.reconcile_conntrack(full, &synced);
        }
        self.pending = (0, 0);
        if report.needs_full_sync() {
            let repair = now + REPAIR_DELAY.max(self.settings.min_sync_period);
            self.next_full = Some(self.next_full.map_or(repair, |t| t.min(repair)));
        }
        self.last_sync = Some(now);
        self.observer.counts(self.engine.counts());
        if full {
            self.report_all();
        } else {
            self.observer
                .health_checks(&self.health_checks(false, &synced));
        }
    }

    /// What a full sync reports of every Service: the Service ports without local endpoints
    /// and every health check. A walk over every Service: done with full syncs only, so a
    /// one-Service change costs the same whatever the cluster's size.
    fn report_all(&mut self) {
        for &family in &self.planner.config.families {
            let (internal, external) = self.no_local_endpoints(family);
            self.observer.no_local_endpoints(family, internal, external);
        }
        self.observer
            .health_checks(&self.health_checks(true, &BTreeSet::new()));
    }

    /// Deletes the stale conntrack entries of the Services synced (all after a full sync), once
    /// the kernel forwards their new flows to the new endpoints. A sync of no UDP or SCTP
    /// Service lists nothing.
    fn reconcile_conntrack(&mut self, full: bool, synced: &BTreeSet<ServiceName>) {
        let Some(reconciler) = self.conntrack.as_mut() else {
            return;
        };
        let state = &self.state;
        let frontends = if full {
            Frontends::new(state, state.services_any_order().map(|(_, ports)| ports))
        } else {
            Frontends::new(state, synced.iter().filter_map(|name| state.service(name)))
        };
        if frontends.is_empty() {
            return;
        }
        for reconciled in reconciler.run(&frontends) {
            self.observer.conntrack_reconciled(&reconciled);
        }
    }

    /// Logs the warnings not logged before, and keeps what was logged for the Services the sync
    /// planned (all after a full sync) to what it found now, so a Service that is gone or
    /// fixed leaves nothing behind.
    fn report_warnings(
        &mut self,
        full: bool,
        synced: &BTreeSet<ServiceName>,
        warnings: Vec<PlanWarning>,
    ) {
        let mut found: HashMap<ServiceName, BTreeSet<String>> = HashMap::new();
        for warning in warnings {
            let service = match &warning {
                PlanWarning::UnknownScheduler { service, .. } => service.clone(),
                PlanWarning::VirtualServerConflict { dropped, .. } => dropped.service.clone(),
            };
            let text = warning.to_string();
            let known = self.reported.get(&service);
            if !known.is_some_and(|k| k.contains(&text)) {
                tracing::warn!("{text}");
            }
            found.entry(service).or_default().insert(text);
        }
        if full {
            self.reported = found;
            return;
        }
        for service in synced {
            self.reported.remove(service);
        }
        for (service, texts) in found {
            self.reported.entry(service).or_default().extend(texts);
        }
    }

    /// The health-check ports of the Services in `synced`, or (`full`) of every Service: as
    /// with the partial sync itself, the cost follows the change, not the cluster.
    fn health_checks(&self, full: bool, synced: &BTreeSet<ServiceName>) -> HealthChecks {
        let filter = &self.settings.node_port_filter;
        let addresses = if filter.cidrs.is_empty() && !filter.primary {
            Vec::new()
        } else {
            self.planner.config.node_port_ips.clone()
        };
        let services = if full {
            let mut all: Vec<ServiceHealth> = self
                .state
                .services_any_order()
                .map(|(name, _)| self.service_health(name))
                .filter(|h| h.port.is_some())
                .collect();
            all.sort_unstable_by(|a, b| a.service.cmp(&b.service));
            all
        } else {
            synced
                .iter()
                .map(|name| self.service_health(name))
                .collect()
        };
        HealthChecks {
            addresses,
            services,
            complete: full,
        }
    }

    /// kube-proxy's `NeedsHealthCheck` and `LocalReadyEndpoints` for one Service.
    fn service_health(&self, name: &ServiceName) -> ServiceHealth {
        let ports = self.state.service(name).unwrap_or_default();
        let port = ports
            .iter()
            .filter(|p| {
                p.service_type == ServiceType::LoadBalancer
                    && p.external_traffic_policy == TrafficPolicy::Local
            })
            .find_map(|p| p.health_check_node_port)
            .map(|hc| {
                let mut ips: Vec<IpAddr> = ports
                    .iter()
                    .flat_map(|p| self.state.endpoints(&p.name))
                    .filter(Endpoint::is_local_and_ready)
                    .map(|e| e.ip)
                    .collect();
                ips.sort_unstable();
                ips.dedup();
                (hc, ips.len())
            });
        ServiceHealth {
            service: name.clone(),
            port,
        }
    }

    /// kube-proxy's `sync_proxy_rules_no_local_endpoints_total` of `family`'s proxier: the
    /// Service ports with a ClusterIP of `family`, a Local policy and no endpoint of `family`
    /// on this node.
    fn no_local_endpoints(&self, family: Family) -> (u64, u64) {
        let (mut internal, mut external) = (0, 0);
        for (_, ports) in self.state.services_any_order() {
            for port in ports {
                let (int_local, ext_local) =
                    (port.internal_policy_local(), port.external_policy_local());
                let of_family = port.cluster_ips.iter().any(|ip| Family::of(*ip) == family);
                if !of_family || (!int_local && !ext_local) {
                    continue;
                }
                let has_local = self
                    .state
                    .endpoints(&port.name)
                    .iter()
                    .any(|e| Family::of(e.ip) == family && e.is_local_and_ready());
                if !has_local {
                    internal += u64::from(int_local);
                    external += u64::from(ext_local);
                }
            }
        }
        (internal, external)
    }
}

#[cfg(test)]
#[path = "sync_loop_tests.rs"]
mod tests;
