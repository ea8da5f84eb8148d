//! The proxier loop: folds source updates into the cluster state, coalesces changes, and syncs
//! the kernel — the changed Services at most every `--ipvs-min-sync-period`, everything (after
//! re-reading the kernel) every `--ipvs-sync-period`, and draining real servers every second.
//!
//! It runs on its own thread: kernel calls are blocking and quick, and a sync must never wait
//! behind HTTP or watch traffic.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use controllers::{Event, Kind, Object, SourceUpdate, apply_all};
use iptables::proxier::Proxier;
use iptables::{Family, Runner};
use reconciler::fallback::{changed_service_specs, proxier_config, service_specs};
use reconciler::model::ServiceName;
use reconciler::plan::{PlanConfig, PlanWarning, Planner};
use reconciler::state::ClusterState;
use reconciler::sync::{
    AddressKernel, Counts, IpvsKernel, NetfilterKernel, ServiceTarget, SyncError, SyncReport,
    Syncer,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::health::Health;
use crate::metrics::{KernelErrorLabel, Metrics, TrafficPolicyLabel};
use crate::plan::plan_config;

/// How often draining real servers are checked for remaining connections.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);
/// After a sync that left the kernel unlike the mirror, a full sync follows this soon.
const REPAIR_DELAY: Duration = Duration::from_secs(1);

/// What the ipvs-mode netfilter backend needs to hear beyond member changes: node facts.
pub trait Reconfigure {
    fn reconfigure(&mut self, config: &PlanConfig);
}

/// A proxier the loop drives: the IPVS one, or kube-proxy's iptables rules.
pub trait Engine: Send {
    /// Re-reads the kernel and programs every Service.
    fn full_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>);
    /// Programs the Services in `dirty` (a Service gone from `state` is removed).
    fn partial_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        dirty: &BTreeSet<ServiceName>,
        now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>);
    /// Deletes drained real servers; nothing for engines that do not drain.
    fn drain(&mut self, _now: Instant) -> SyncReport {
        SyncReport::default()
    }
    fn counts(&self) -> Counts {
        Counts::default()
    }
    /// Node facts or families changed.
    fn reconfigure(&mut self, _config: &PlanConfig) {}
}

/// The IPVS proxier: the sync engine over the kernel's IPVS, `kube-ipvs0` and netfilter.
#[derive(Debug)]
pub struct IpvsEngine<I, A, N>(pub Syncer<I, A, N>);

impl<I, A, N> Engine for IpvsEngine<I, A, N>
where
    I: IpvsKernel + Send,
    A: AddressKernel + Send,
    N: NetfilterKernel + Reconfigure + Send,
{
    fn full_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        let mut warnings = Vec::new();
        // Planned one Service at a time as the engine takes them: the whole node's plan is
        // never in memory at once.
        let targets = state.services().map(|(name, ports)| {
            let plan = planner.plan_service(ports, |p| state.endpoints(p));
            warnings.extend(plan.warnings.iter().cloned());
            (name.clone(), ServiceTarget::from(plan))
        });
        let report = self.0.full_sync(targets, now);
        (report, warnings)
    }

    fn partial_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        dirty: &BTreeSet<ServiceName>,
        now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        let mut warnings = Vec::new();
        let targets = targets(planner, state, dirty.iter(), &mut warnings);
        (self.0.sync(targets, now), warnings)
    }

    fn drain(&mut self, now: Instant) -> SyncReport {
        self.0.drain(now)
    }

    fn counts(&self) -> Counts {
        self.0.counts()
    }

    fn reconfigure(&mut self, config: &PlanConfig) {
        self.0.netfilter_mut().reconfigure(config);
    }
}

/// kube-proxy's iptables proxier: the fallback when IPVS is missing, or `--proxy-mode=iptables`.
/// One rule set per family; a partial sync rewrites only the chains of changed Services.
#[derive(Debug)]
pub struct IptablesEngine {
    runner: Runner,
    masquerade_bit: u8,
    masquerade_all: bool,
    proxiers: Vec<Proxier>,
}

impl IptablesEngine {
    #[must_use]
    pub fn new(runner: Runner, config: &ProxyConfig) -> Self {
        IptablesEngine {
            runner,
            masquerade_bit: config.masquerade_bit,
            masquerade_all: config.masquerade_all,
            proxiers: Vec::new(),
        }
    }

    /// Syncs every family: all Services after re-reading the kernel (`dirty` is `None`), or
    /// only those in `dirty`.
    fn sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        dirty: Option<&BTreeSet<ServiceName>>,
    ) -> SyncReport {
        if self.proxiers.len() != planner.config.families.len() {
            self.reconfigure(&planner.config);
        }
        let node = &*planner.config.node_name;
        // Converted once for all families; every Service only if a sync is full.
        let changed = dirty.map(|dirty| changed_service_specs(state, dirty, node));
        let all = std::cell::OnceCell::new();
        let all = || all.get_or_init(|| service_specs(state, node)).as_slice();
        let mut report = SyncReport {
            services: state.service_count(),
            ..SyncReport::default()
        };
        // Each family's proxier takes the addresses of its own family from every spec.
        for proxier in &mut self.proxiers {
            let family = proxier.config().family;
            let synced = match &changed {
                Some(changed) => {
                    let changed = changed.iter().map(|(name, ports)| (name, ports));
                    proxier.sync_services(&self.runner, changed, all)
                }
                None => proxier.sync_full(&self.runner, all()),
            };
            match synced {
                Ok(written) => {
                    tracing::debug!(
                        ?family,
                        chains = written.chains_written,
                        deleted = written.chains_deleted,
                        rules = written.rules,
                        "iptables-restore"
                    );
                }
                Err(e) => report.errors.push(SyncError {
                    service: None,
                    backend: "iptables",
                    kind: "restore",
                    message: format!("{family:?} rules: {e}"),
                }),
            }
        }
        report
    }
}

impl Engine for IptablesEngine {
    fn full_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        _now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        (self.sync(state, planner, None), Vec::new())
    }

    fn partial_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        dirty: &BTreeSet<ServiceName>,
        _now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        (self.sync(state, planner, Some(dirty)), Vec::new())
    }

    fn reconfigure(&mut self, config: &PlanConfig) {
        self.proxiers = config
            .families
            .iter()
            .map(|&family| {
                Proxier::new(proxier_config(
                    family,
                    self.masquerade_bit,
                    self.masquerade_all,
                    config.cluster_cidr(family),
                ))
            })
            .collect();
    }
}

/// What each of `names` should have in the kernel now (an empty target for a Service gone).
fn targets<'a>(
    planner: &Planner,
    state: &ClusterState,
    names: impl Iterator<Item = &'a ServiceName>,
    warnings: &mut Vec<PlanWarning>,
) -> Vec<(ServiceName, ServiceTarget)> {
    names
        .map(|name| {
            let target = match state.service(name) {
                Some(ports) => {
                    let plan = planner.plan_service(ports, |p| state.endpoints(p));
                    warnings.extend(plan.warnings.iter().cloned());
                    ServiceTarget::from(plan)
                }
                None => ServiceTarget::default(),
            };
            (name.clone(), target)
        })
        .collect()
}

/// One sync's outcome, for logs, metrics and health.
struct Outcome {
    full: bool,
    report: SyncReport,
    warnings: Vec<PlanWarning>,
}

/// The loop's state.
pub struct ProxierLoop {
    config: ProxyConfig,
    engine: Box<dyn Engine>,
    planner: Planner,
    state: ClusterState,
    health: Health,
    metrics: Arc<Metrics>,
    initial_sync_done: bool,
    dirty: BTreeSet<ServiceName>,
    /// When the oldest change not yet applied arrived.
    oldest_pending: Option<Instant>,
    pending_service_changes: i64,
    pending_endpoint_changes: i64,
    last_sync: Option<Instant>,
    next_full: Option<Instant>,
    next_drain: Instant,
    /// Warnings already logged, so a persistent one is said once, not every sync.
    reported: BTreeSet<String>,
}

impl std::fmt::Debug for ProxierLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxierLoop")
            .field("services", &self.state.service_count())
            .field("dirty", &self.dirty.len())
            .finish_non_exhaustive()
    }
}

impl ProxierLoop {
    #[must_use]
    pub fn new(
        config: ProxyConfig,
        mut engine: Box<dyn Engine>,
        health: Health,
        metrics: Arc<Metrics>,
    ) -> Self {
        let state = ClusterState::new();
        let planner = Planner::new(plan_config(&config, &state));
        engine.reconfigure(&planner.config);
        ProxierLoop {
            config,
            engine,
            planner,
            state,
            health,
            metrics,
            initial_sync_done: false,
            dirty: BTreeSet::new(),
            oldest_pending: None,
            pending_service_changes: 0,
            pending_endpoint_changes: 0,
            last_sync: None,
            next_full: None,
            next_drain: Instant::now(),
            reported: BTreeSet::new(),
        }
    }

    /// Runs until `stop` turns true or every source is gone. Blocking: call it on its own thread.
    pub fn run(
        mut self,
        runtime: &tokio::runtime::Handle,
        mut updates: UnboundedReceiver<SourceUpdate>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let wait = self.next_deadline().map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            let received = runtime.block_on(async {
                tokio::select! {
                    update = updates.recv() => Some(update),
                    () = tokio::time::sleep(wait) => None,
                    _ = stop.changed() => Some(None),
                }
            });
            match received {
                Some(Some(update)) => {
                    self.receive(update);
                    // Everything already queued joins this sync.
                    while let Ok(update) = updates.try_recv() {
                        self.receive(update);
                    }
                }
                Some(None) => break,
                None => {}
            }
            if *stop.borrow() {
                break;
            }
            self.tick(Instant::now());
        }
        tracing::info!("proxier stopped; the kernel state is left in place");
    }

    fn next_deadline(&self) -> Option<Instant> {
        if !self.initial_sync_done {
            return None;
        }
        let mut deadline = self.next_full;
        let mut consider = |t: Instant| deadline = Some(deadline.map_or(t, |d| d.min(t)));
        if !self.dirty.is_empty() {
            consider(
                self.last_sync
                    .map_or_else(Instant::now, |l| l + self.config.min_sync_period),
            );
        }
        if self.engine.counts().draining > 0 {
            consider(self.next_drain);
        }
        deadline
    }

    /// Folds one source update into the state.
    pub fn receive(&mut self, update: SourceUpdate) {
        match update {
            SourceUpdate::NodeEligible(eligible) => {
                tracing::info!(eligible, "node eligibility for load-balancer traffic");
                self.health.set_node_eligible(eligible);
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
            SourceUpdate::Events(events) => {
                let mut services = 0;
                let mut endpoints = 0;
                for e in &events {
                    match e {
                        Event::Apply(Object::Service(_)) => services += 1,
                        Event::Apply(Object::EndpointSlice(_)) => endpoints += 1,
                        Event::Delete(k) if k.kind == Kind::Service => services += 1,
                        Event::Delete(k) if k.kind == Kind::EndpointSlice => endpoints += 1,
                        _ => {}
                    }
                }
                let affected = apply_all(&mut self.state, events);
                if affected.is_empty() {
                    return;
                }
                self.metrics.service_changes_total.inc_by(services);
                self.metrics.endpoint_changes_total.inc_by(endpoints);
                self.pending_service_changes += i64::try_from(services).unwrap_or(i64::MAX);
                self.pending_endpoint_changes += i64::try_from(endpoints).unwrap_or(i64::MAX);
                self.metrics
                    .service_changes_pending
                    .set(self.pending_service_changes);
                self.metrics
                    .endpoint_changes_pending
                    .set(self.pending_endpoint_changes);
                self.oldest_pending.get_or_insert_with(Instant::now);
                let now = SystemTime::now();
                self.health.queued(now);
                self.metrics
                    .last_queued_timestamp
                    .set(crate::metrics::unix_seconds(now));
                if affected.nodes || self.needs_new_family(&affected.services) {
                    self.reconfigure();
                }
                self.dirty.extend(affected.services);
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
        let config = plan_config(&self.config, &self.state);
        if config.node_addresses != self.planner.config.node_addresses
            || config.families != self.planner.config.families
            || config.node_port_ips != self.planner.config.node_port_ips
        {
            tracing::info!(node = %config.node_name, addresses = ?config.node_addresses, families = ?config.families, "node facts changed");
            self.engine.reconfigure(&config);
            self.planner = Planner::new(config);
            self.next_full = Some(Instant::now());
        }
    }

    /// Syncs what is due at `now`.
    pub fn tick(&mut self, now: Instant) {
        if !self.initial_sync_done {
            return;
        }
        let full_due = self.next_full.is_none_or(|t| now >= t);
        let partial_due = !self.dirty.is_empty()
            && self
                .last_sync
                .is_none_or(|l| now >= l + self.config.min_sync_period);
        if full_due || partial_due {
            let started = Instant::now();
            let outcome = if full_due {
                self.full_sync(now)
            } else {
                self.partial_sync(now)
            };
            self.finish(outcome, started.elapsed(), now);
        }
        if self.engine.counts().draining > 0 && now >= self.next_drain {
            let report = self.engine.drain(now);
            if report.drained > 0 {
                tracing::info!(deleted = report.drained, "drained real servers deleted");
            }
            self.count_errors(&report);
            self.next_drain = now + DRAIN_INTERVAL;
            self.update_gauges();
        }
    }

    fn full_sync(&mut self, now: Instant) -> Outcome {
        // Families and node-port addresses may have moved with the Services; replan all.
        let config = plan_config(&self.config, &self.state);
        if config.families != self.planner.config.families
            || config.node_port_ips != self.planner.config.node_port_ips
        {
            self.engine.reconfigure(&config);
            self.planner = Planner::new(config);
        }
        self.dirty.clear();
        let (report, warnings) = self.engine.full_sync(&self.state, &self.planner, now);
        self.next_full = Some(now + self.config.sync_period);
        Outcome {
            full: true,
            report,
            warnings,
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
        }
    }

    fn finish(&mut self, outcome: Outcome, took: Duration, now: Instant) {
        let Outcome {
            full,
            report,
            warnings,
        } = outcome;
        for warning in warnings {
            let text = warning.to_string();
            if self.reported.insert(text.clone()) {
                tracing::warn!("{text}");
            }
        }
        for error in &report.errors {
            tracing::error!(backend = error.backend, kind = error.kind, "{error}");
        }
        self.count_errors(&report);
        tracing::info!(
            full,
            services = report.services,
            ipvs_ops = report.ipvs_ops,
            addresses_added = report.addresses_added,
            addresses_removed = report.addresses_removed,
            set_entries_added = report.set_entries_added,
            set_entries_removed = report.set_entries_removed,
            errors = report.errors.len(),
            took_ms = took.as_secs_f64() * 1000.0,
            "synced"
        );
        let wall = SystemTime::now();
        self.metrics.observe_sync(took, full, wall);
        if let Some(oldest) = self.oldest_pending.take() {
            self.metrics
                .network_programming_duration
                .observe(now.saturating_duration_since(oldest).as_secs_f64() + took.as_secs_f64());
        }
        self.pending_service_changes = 0;
        self.pending_endpoint_changes = 0;
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
        // A sync that could not read or write the kernel at all leaves the node unhealthy;
        // one Service the kernel refused does not take the node out of load balancers.
        if report.errors.iter().all(|e| e.service.is_some()) {
            self.health.synced(wall);
        }
        if report.needs_full_sync() {
            let repair = now + REPAIR_DELAY.max(self.config.min_sync_period);
            self.next_full = Some(self.next_full.map_or(repair, |t| t.min(repair)));
        }
        self.last_sync = Some(now);
        self.update_gauges();
        if full {
            // A walk over every Service: done with full syncs only, so a one-Service change
            // costs the same whatever the cluster's size.
            self.update_no_local_endpoints();
        }
    }

    fn count_errors(&self, report: &SyncReport) {
        for e in &report.errors {
            if matches!(e.backend, "iptables" | "netfilter") {
                self.metrics.iptables_restore_failures.inc();
            }
            self.metrics
                .kernel_operation_errors
                .get_or_create(&KernelErrorLabel {
                    backend: e.backend,
                    kind: e.kind.to_owned(),
                })
                .inc();
        }
    }

    fn update_gauges(&self) {
        let counts = self.engine.counts();
        let as_gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics
            .virtual_servers
            .set(as_gauge(counts.virtual_servers));
        self.metrics.real_servers.set(as_gauge(counts.real_servers));
        self.metrics
            .real_servers_draining
            .set(as_gauge(counts.draining));
    }

    /// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`: Services with a Local policy
    /// and no endpoint on this node.
    fn update_no_local_endpoints(&self) {
        let node = &*self.planner.config.node_name;
        let (mut internal, mut external) = (0i64, 0i64);
        for (_, ports) in self.state.services() {
            for port in ports {
                let (int_local, ext_local) =
                    (port.internal_policy_local(), port.external_policy_local());
                if !int_local && !ext_local {
                    continue;
                }
                let has_local = self
                    .state
                    .endpoints(&port.name)
                    .iter()
                    .any(|e| e.is_local(node) && e.conditions.ready);
                if !has_local {
                    internal += i64::from(int_local);
                    external += i64::from(ext_local);
                }
            }
        }
        let family = &self.metrics.no_local_endpoints;
        family
            .get_or_create(&TrafficPolicyLabel {
                traffic_policy: "internal",
            })
            .set(internal);
        family
            .get_or_create(&TrafficPolicyLabel {
                traffic_policy: "external",
            })
            .set(external);
    }
}
