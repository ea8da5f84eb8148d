//! The sync engine: keeps the kernel equal to the plan, touching only what changed.
//!
//! It keeps a mirror of what it programmed (virtual servers with their real servers, the
//! addresses on `kube-ipvs0`, the ipset entries) and, for each changed Service, diffs that
//! Service's new target against the mirror and hands each backend the smallest list of
//! operations. A full sync re-reads the kernel first, so drift (a virtual server deleted by
//! hand, a real server left at weight 0 by a previous run) is repaired, and nothing the proxy
//! does not own is touched.
//!
//! Ownership: a virtual server is the proxy's when its address is bound to `kube-ipvs0`, or it
//! is one the plan wants, or one this process programmed — and it is not inside
//! `--ipvs-exclude-cidrs`. Firewall-mark services are never the proxy's.
//!
//! Removed TCP real servers drain: weight 0 first, deleted once their active and inactive
//! connections reach 0 or the drain timeout passes. UDP and SCTP ones are deleted at once, as
//! kube-proxy does (their "connections" are only timers).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use iptables::Family;
use iptables::ipvs_mode::KubeSet;
use ipvs::{Op, RealServer, RealServerEntry, ServiceKey, VirtualServer};

use crate::ipvs_state::RealServer as PlannedRealServer;
use crate::model::{Protocol, ServiceName};
use crate::plan::ServicePlan;

/// How many IPVS operations a full sync collects before sending them.
pub const OPS_PER_BATCH: usize = 4096;

/// An error from a backend other than IPVS, boxed: the engine only reports it.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// The kernel's IPVS table, as the engine needs it.
pub trait IpvsKernel {
    /// Every virtual server with its real servers (`ipvsadm -Ln`).
    fn dump(&mut self) -> Result<Vec<(VirtualServer, Vec<RealServerEntry>)>, ipvs::Error>;
    /// The real servers of one virtual server, with their connection counts.
    fn real_servers(&mut self, key: &ServiceKey) -> Result<Vec<RealServerEntry>, ipvs::Error>;
    /// Applies a batch; one result per operation, in order.
    fn apply(&mut self, ops: &[Op]) -> Vec<Result<(), ipvs::Error>>;
}

/// The addresses bound to `kube-ipvs0`.
pub trait AddressKernel {
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, BackendError>;
    /// One result per address, in order.
    fn add(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>>;
    /// One result per address, in order.
    fn remove(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>>;
}

/// The ipsets and the small iptables rule set that uses them.
pub trait NetfilterKernel {
    /// Makes every proxy set hold exactly the `Set` members of `entries`, and rewrites the
    /// proxy's chains.
    fn full(&mut self, entries: &BTreeSet<NetfilterEntry>) -> Result<(), BackendError>;
    /// Adds and deletes members; rewrites the chains only if the rules they imply changed (a
    /// set became empty or non-empty, a LoadBalancer out-filter came or went).
    fn partial(
        &mut self,
        added: &[NetfilterEntry],
        removed: &[NetfilterEntry],
    ) -> Result<(), BackendError>;
}

/// One fact the ipvs-mode netfilter state is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NetfilterEntry {
    /// A member of one of kube-proxy's ipsets (`ipset add KUBE-CLUSTER-IP 10.96.0.10,tcp:80`).
    Set {
        family: Family,
        set: KubeSet,
        entry: iptables::SetEntry,
    },
    /// A LoadBalancer (ip, protocol, port) the node itself may not reach: a
    /// KUBE-IPVS-OUT-FILTER rule.
    NoNodeAccess {
        ip: IpAddr,
        protocol: Protocol,
        port: u16,
    },
}

impl fmt::Display for NetfilterEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetfilterEntry::Set { family, set, entry } => {
                write!(f, "{} {entry}", set.name(*family))
            }
            NetfilterEntry::NoNodeAccess { ip, protocol, port } => {
                write!(f, "out-filter {ip},{protocol}:{port}")
            }
        }
    }
}

/// Everything one Service puts into the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceTarget {
    pub virtual_servers: Vec<(VirtualServer, Vec<RealServer>)>,
    /// Addresses for `kube-ipvs0`.
    pub addresses: Vec<IpAddr>,
    pub netfilter: Vec<NetfilterEntry>,
}

impl ServiceTarget {
    fn is_empty(&self) -> bool {
        self.virtual_servers.is_empty() && self.addresses.is_empty() && self.netfilter.is_empty()
    }
}

impl From<ServicePlan> for ServiceTarget {
    fn from(plan: ServicePlan) -> Self {
        ServiceTarget {
            virtual_servers: plan
                .virtual_servers
                .iter()
                .map(|v| {
                    (
                        v.virtual_server.to_ipvs(),
                        v.real_servers
                            .iter()
                            .map(PlannedRealServer::to_ipvs)
                            .collect(),
                    )
                })
                .collect(),
            addresses: plan.addresses.into_iter().collect(),
            netfilter: plan
                .set_entries
                .into_iter()
                .map(|(family, set, entry)| NetfilterEntry::Set { family, set, entry })
                .chain(
                    plan.lb_no_node_access
                        .into_iter()
                        .map(|(ip, protocol, port)| NetfilterEntry::NoNodeAccess {
                            ip,
                            protocol,
                            port,
                        }),
                )
                .collect(),
        }
    }
}

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// How long a removed TCP real server may drain before it is deleted with connections left.
    pub drain_timeout: Duration,
    /// Virtual servers inside these ranges are never touched (`--ipvs-exclude-cidrs`).
    pub exclude_cidrs: Vec<IpNet>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            // IPVS's own idle timeout for established TCP: a connection silent that long is gone.
            drain_timeout: Duration::from_secs(900),
            exclude_cidrs: Vec::new(),
        }
    }
}

/// Something that went wrong in a sync, attributed to a Service where one is to blame.
#[derive(Debug)]
pub struct SyncError {
    pub service: Option<ServiceName>,
    /// `ipvs`, `addresses` or `netfilter`.
    pub backend: &'static str,
    /// A short machine-readable kind, for metrics (`already_exists`, `scheduler_missing`, ...).
    pub kind: &'static str,
    pub message: String,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.service {
            Some(svc) => write!(f, "service {svc}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub services: usize,
    pub ipvs_ops: usize,
    pub addresses_added: usize,
    pub addresses_removed: usize,
    pub set_entries_added: usize,
    pub set_entries_removed: usize,
    /// Real servers deleted after draining.
    pub drained: usize,
    pub errors: Vec<SyncError>,
}

impl SyncReport {
    /// Whether the kernel may now differ from the mirror, so a full sync should follow.
    #[must_use]
    pub fn needs_full_sync(&self) -> bool {
        !self.errors.is_empty()
    }
}

/// What a Service holds in the kernel, by identity only: its real servers live in the
/// kernel mirror, not twice.
#[derive(Debug, Clone, Default)]
struct Footprint {
    keys: Vec<ServiceKey>,
    addresses: Vec<IpAddr>,
    netfilter: Vec<NetfilterEntry>,
}

#[derive(Debug, Clone)]
struct KernelVs {
    server: VirtualServer,
    real: RealSet,
}

/// A virtual server's real servers, sorted by address: a tenth of a hash map's memory for the
/// handful a Service has, and the mirror holds one per virtual server of the node.
#[derive(Debug, Clone, Default)]
struct RealSet(Vec<RealServer>);

impl RealSet {
    fn find(&self, addr: &SocketAddr) -> Result<usize, usize> {
        self.0.binary_search_by(|r| r.addr.cmp(addr))
    }

    fn get(&self, addr: &SocketAddr) -> Option<&RealServer> {
        self.find(addr).ok().map(|i| &self.0[i])
    }

    fn get_mut(&mut self, addr: &SocketAddr) -> Option<&mut RealServer> {
        self.find(addr).ok().map(|i| &mut self.0[i])
    }

    fn insert(&mut self, rs: RealServer) {
        match self.find(&rs.addr) {
            Ok(i) => self.0[i] = rs,
            Err(i) => self.0.insert(i, rs),
        }
    }

    fn remove(&mut self, addr: &SocketAddr) -> Option<RealServer> {
        self.find(addr).ok().map(|i| self.0.remove(i))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Room for `n` more without growing past them (a new virtual server's first fill).
    fn reserve_exact(&mut self, n: usize) {
        self.0.reserve_exact(n);
    }

    fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.0.iter().map(|r| r.addr)
    }
}

impl FromIterator<RealServer> for RealSet {
    fn from_iter<T: IntoIterator<Item = RealServer>>(iter: T) -> Self {
        let mut v: Vec<RealServer> = iter.into_iter().collect();
        v.sort_by_key(|r| r.addr);
        v.dedup_by_key(|r| r.addr);
        v.shrink_to_fit();
        RealSet(v)
    }
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub virtual_servers: usize,
    pub real_servers: usize,
    pub draining: usize,
}

/// The engine. Backends are handed in; it opens nothing itself.
#[derive(Debug)]
pub struct Syncer<I, A, N> {
    ipvs: I,
    addresses: A,
    netfilter: N,
    options: SyncOptions,
    /// What each Service contributed at the last sync.
    services: HashMap<ServiceName, Footprint>,
    /// The proxy's virtual servers as the kernel has them.
    kernel: HashMap<ServiceKey, KernelVs>,
    owner: HashMap<ServiceKey, ServiceName>,
    address_refs: HashMap<IpAddr, u32>,
    bound: HashSet<IpAddr>,
    set_refs: HashMap<NetfilterEntry, u32>,
    /// Real servers at weight 0, with the instant they are deleted regardless.
    draining: HashMap<(ServiceKey, SocketAddr), Instant>,
}

/// The operations of one sync, collected before anything is sent.
#[derive(Default)]
struct Pending {
    ops: Vec<Op>,
    /// The Service each op is for, to name it in errors.
    op_owner: Vec<Option<ServiceName>>,
    add_addrs: BTreeSet<IpAddr>,
    del_addrs: BTreeSet<IpAddr>,
    add_entries: BTreeSet<NetfilterEntry>,
    del_entries: BTreeSet<NetfilterEntry>,
    errors: Vec<SyncError>,
}

impl Pending {
    fn push(&mut self, op: Op, owner: Option<&ServiceName>) {
        self.ops.push(op);
        self.op_owner.push(owner.cloned());
    }
}

fn ipvs_error_kind(e: &ipvs::Error) -> &'static str {
    match e {
        ipvs::Error::NotAvailable => "not_available",
        ipvs::Error::PermissionDenied { .. } => "permission_denied",
        ipvs::Error::AlreadyExists { .. } => "already_exists",
        ipvs::Error::NoSuchService { .. } => "no_such_service",
        ipvs::Error::NoSuchDestination { .. } => "no_such_destination",
        ipvs::Error::SchedulerMissing { .. } => "scheduler_missing",
        ipvs::Error::InvalidArgument { .. } => "invalid_argument",
        ipvs::Error::Timeout(_) => "timeout",
        ipvs::Error::Unconfirmed { .. } => "unconfirmed",
        _ => "other",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn is_tcp(key: &ServiceKey) -> bool {
    matches!(
        key,
        ServiceKey::Addr {
            protocol: ipvs::Protocol::Tcp,
            ..
        }
    )
}

impl<I: IpvsKernel, A: AddressKernel, N: NetfilterKernel> Syncer<I, A, N> {
    pub fn new(ipvs: I, addresses: A, netfilter: N, options: SyncOptions) -> Self {
        Syncer {
            ipvs,
            addresses,
            netfilter,
            options,
            services: HashMap::new(),
            kernel: HashMap::new(),
            owner: HashMap::new(),
            address_refs: HashMap::new(),
            bound: HashSet::new(),
            set_refs: HashMap::new(),
            draining: HashMap::new(),
        }
    }

    /// The IPVS backend, for callers that need to read the kernel directly.
    pub fn ipvs_mut(&mut self) -> &mut I {
        &mut self.ipvs
    }

    /// The netfilter backend, to hand it new node facts.
    pub fn netfilter_mut(&mut self) -> &mut N {
        &mut self.netfilter
    }

    #[must_use]
    pub fn counts(&self) -> Counts {
        Counts {
            virtual_servers: self.kernel.len(),
            real_servers: self.kernel.values().map(|vs| vs.real.len()).sum(),
            draining: self.draining.len(),
        }
    }

    fn excluded(&self, ip: IpAddr) -> bool {
        self.options
            .exclude_cidrs
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// Re-reads the kernel, then programs every Service in `targets` and removes whatever the
    /// proxy owns that no Service wants. Used at start (adopting a previous run's state without
    /// flushing it) and every `--ipvs-sync-period`.
    ///
    /// Targets are taken one at a time and IPVS operations go out every [`OPS_PER_BATCH`], so
    /// neither the plan of the whole node nor all its operations are ever in memory at once.
    pub fn full_sync(
        &mut self,
        targets: impl IntoIterator<Item = (ServiceName, ServiceTarget)>,
        now: Instant,
    ) -> SyncReport {
        let started = Instant::now();
        let mut report = SyncReport::default();
        let unclaimed = match self.read_kernel() {
            Ok(unclaimed) => unclaimed,
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        };
        let read = started.elapsed();

        let mut pending = Pending::default();
        for (name, target) in targets {
            report.services += 1;
            self.plan_service(&name, target, now, &mut pending);
            if pending.ops.len() >= OPS_PER_BATCH {
                self.execute_ipvs(&mut pending, &mut report);
            }
        }
        // Whatever the proxy owns that no Service claimed; what it never owned leaves the
        // mirror untouched.
        let orphans: Vec<ServiceKey> = self
            .kernel
            .keys()
            .filter(|k| !self.owner.contains_key(k))
            .copied()
            .collect();
        for key in orphans {
            self.kernel.remove(&key);
            if !unclaimed.contains(&key) {
                self.draining.retain(|(k, _), _| *k != key);
                pending.push(Op::DeleteService(key), None);
            }
        }
        for ip in &self.bound {
            if !self.address_refs.contains_key(ip) {
                pending.del_addrs.insert(*ip);
            }
        }
        pending.add_entries.clear();
        pending.del_entries.clear();
        let planned = started.elapsed();
        let entries: BTreeSet<NetfilterEntry> = self.set_refs.keys().cloned().collect();
        if let Err(e) = self.netfilter.full(&entries) {
            pending.errors.push(SyncError {
                service: None,
                backend: "netfilter",
                kind: "restore",
                message: format!("restoring ipsets and iptables rules: {e}"),
            });
        } else {
            report.set_entries_added = entries.len();
        }
        drop(entries);
        let netfilter = started.elapsed();
        self.execute(pending, &mut report);
        tracing::debug!(
            read_kernel_ms = ms(read),
            plan_and_ipvs_ms = ms(planned.saturating_sub(read)),
            netfilter_ms = ms(netfilter.saturating_sub(planned)),
            rest_ms = ms(started.elapsed().saturating_sub(netfilter)),
            "full sync phases"
        );
        report
    }

    /// Reads the IPVS table and `kube-ipvs0`'s addresses and makes them the mirror, with no
    /// Service's claim on any of it yet. Returns the virtual servers the proxy does not own
    /// unless a Service claims them (see the module's notes): they are dropped from the mirror,
    /// never deleted, if none does.
    fn read_kernel(&mut self) -> Result<HashSet<ServiceKey>, SyncError> {
        let dump = self.ipvs.dump().map_err(|e| SyncError {
            service: None,
            backend: "ipvs",
            kind: ipvs_error_kind(&e),
            message: format!("reading the IPVS table: {e}"),
        })?;
        let bound = self.addresses.list().map_err(|e| SyncError {
            service: None,
            backend: "addresses",
            kind: "list",
            message: format!("listing kube-ipvs0 addresses: {e}"),
        })?;
        let mut unclaimed = HashSet::new();
        let mut kernel = HashMap::with_capacity(dump.len());
        for (server, entries) in dump {
            let ServiceKey::Addr { addr, .. } = server.key else {
                continue;
            };
            if self.excluded(addr.ip()) {
                continue;
            }
            if !bound.contains(&addr.ip()) && !self.kernel.contains_key(&server.key) {
                unclaimed.insert(server.key);
            }
            let real = entries.into_iter().map(|r| r.server).collect();
            kernel.insert(server.key, KernelVs { server, real });
        }
        self.kernel = kernel;
        self.services.clear();
        self.owner.clear();
        self.address_refs.clear();
        self.set_refs.clear();
        self.bound = bound.into_iter().collect();
        let kernel = &self.kernel;
        self.draining.retain(|(key, addr), _| {
            kernel
                .get(key)
                .is_some_and(|vs| vs.real.get(addr).is_some_and(|r| r.weight == 0))
        });
        Ok(unclaimed)
    }

    /// Programs the changed Services only. A Service that is gone has an empty target.
    pub fn sync(&mut self, changes: Vec<(ServiceName, ServiceTarget)>, now: Instant) -> SyncReport {
        let mut report = SyncReport {
            services: changes.len(),
            ..SyncReport::default()
        };
        let mut pending = Pending::default();
        for (name, target) in changes {
            self.plan_service(&name, target, now, &mut pending);
        }
        let added: Vec<NetfilterEntry> = std::mem::take(&mut pending.add_entries)
            .into_iter()
            .collect();
        let removed: Vec<NetfilterEntry> = std::mem::take(&mut pending.del_entries)
            .into_iter()
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            match self.netfilter.partial(&added, &removed) {
                Ok(()) => {
                    report.set_entries_added = added.len();
                    report.set_entries_removed = removed.len();
                }
                Err(e) => pending.errors.push(SyncError {
                    service: None,
                    backend: "netfilter",
                    kind: "restore",
                    message: format!("updating ipsets: {e}"),
                }),
            }
        }
        self.execute(pending, &mut report);
        report
    }

    /// Deletes draining real servers whose connections have ended or whose time is up.
    pub fn drain(&mut self, now: Instant) -> SyncReport {
        let mut report = SyncReport::default();
        let mut by_service: HashMap<ServiceKey, Vec<SocketAddr>> = HashMap::new();
        for (key, addr) in self.draining.keys() {
            by_service.entry(*key).or_default().push(*addr);
        }
        let mut pending = Pending::default();
        for (key, addrs) in by_service {
            let reals = match self.ipvs.real_servers(&key) {
                Ok(r) => r,
                Err(e) => {
                    pending.errors.push(SyncError {
                        service: self.owner.get(&key).cloned(),
                        backend: "ipvs",
                        kind: ipvs_error_kind(&e),
                        message: format!("reading real servers of {key}: {e}"),
                    });
                    continue;
                }
            };
            for addr in addrs {
                let deadline = self.draining[&(key, addr)];
                let done = match reals.iter().find(|r| r.server.addr == addr) {
                    None => true,
                    Some(r) => {
                        r.connections.active + r.connections.inactive == 0 || now >= deadline
                    }
                };
                if done {
                    self.draining.remove(&(key, addr));
                    if let Some(vs) = self.kernel.get_mut(&key)
                        && vs.real.remove(&addr).is_some()
                    {
                        pending.push(Op::DeleteDest(key, addr), self.owner.get(&key));
                        report.drained += 1;
                    }
                }
            }
        }
        self.execute(pending, &mut report);
        report
    }

    fn plan_service(
        &mut self,
        name: &ServiceName,
        new: ServiceTarget,
        now: Instant,
        p: &mut Pending,
    ) {
        let old = self.services.remove(name).unwrap_or_default();

        let new_keys: HashSet<ServiceKey> =
            new.virtual_servers.iter().map(|(vs, _)| vs.key).collect();
        for (vs, reals) in &new.virtual_servers {
            match self.owner.get(&vs.key) {
                Some(other) if other != name => {
                    p.errors.push(SyncError {
                        service: Some(name.clone()),
                        backend: "ipvs",
                        kind: "conflict",
                        message: format!(
                            "virtual server {} is already used by service {other}",
                            vs.key
                        ),
                    });
                    continue;
                }
                _ => {}
            }
            self.owner.insert(vs.key, name.clone());
            self.reconcile_virtual_server(name, vs, reals, now, p);
        }
        for key in &old.keys {
            if !new_keys.contains(key) && self.owner.get(key) == Some(name) {
                self.owner.remove(key);
                if self.kernel.remove(key).is_some() {
                    self.draining.retain(|(k, _), _| k != key);
                    p.push(Op::DeleteService(*key), Some(name));
                }
            }
        }

        let old_addrs: HashSet<IpAddr> = old.addresses.iter().copied().collect();
        let new_addrs: HashSet<IpAddr> = new.addresses.iter().copied().collect();
        for ip in new_addrs.difference(&old_addrs) {
            let refs = self.address_refs.entry(*ip).or_insert(0);
            *refs += 1;
            if *refs == 1 {
                p.del_addrs.remove(ip);
                if !self.bound.contains(ip) {
                    p.add_addrs.insert(*ip);
                }
            }
        }
        for ip in old_addrs.difference(&new_addrs) {
            if let Some(refs) = self.address_refs.get_mut(ip) {
                *refs -= 1;
                if *refs == 0 {
                    self.address_refs.remove(ip);
                    p.add_addrs.remove(ip);
                    if self.bound.contains(ip) {
                        p.del_addrs.insert(*ip);
                    }
                }
            }
        }

        let old_entries: HashSet<&NetfilterEntry> = old.netfilter.iter().collect();
        let new_entries: HashSet<&NetfilterEntry> = new.netfilter.iter().collect();
        for e in new_entries.difference(&old_entries) {
            let refs = self.set_refs.entry((*e).clone()).or_insert(0);
            *refs += 1;
            if *refs == 1 && !p.del_entries.remove(*e) {
                p.add_entries.insert((*e).clone());
            }
        }
        for e in old_entries.difference(&new_entries) {
            if let Some(refs) = self.set_refs.get_mut(*e) {
                *refs -= 1;
                if *refs == 0 {
                    self.set_refs.remove(*e);
                    if !p.add_entries.remove(*e) {
                        p.del_entries.insert((*e).clone());
                    }
                }
            }
        }

        if !new.is_empty() {
            let footprint = Footprint {
                keys: new
                    .virtual_servers
                    .into_iter()
                    .map(|(vs, _)| vs.key)
                    .collect(),
                addresses: new.addresses,
                netfilter: new.netfilter,
            };
            self.services.insert(name.clone(), footprint);
        }
    }

    fn reconcile_virtual_server(
        &mut self,
        name: &ServiceName,
        vs: &VirtualServer,
        reals: &[RealServer],
        now: Instant,
        p: &mut Pending,
    ) {
        let key = vs.key;
        let entry = self.kernel.entry(key).or_insert_with(|| {
            p.push(Op::AddService(vs.clone()), Some(name));
            KernelVs {
                server: vs.clone(),
                real: RealSet::default(),
            }
        });
        if entry.server != *vs {
            p.push(Op::UpdateService(vs.clone()), Some(name));
            entry.server = vs.clone();
        }
        let wanted: HashMap<SocketAddr, &RealServer> = reals.iter().map(|r| (r.addr, r)).collect();
        if entry.real.len() == 0 {
            entry.real.reserve_exact(reals.len());
        }
        for rs in reals {
            match entry.real.get(&rs.addr) {
                None => p.push(Op::AddDest(key, *rs), Some(name)),
                Some(have) if have != rs => p.push(Op::UpdateDest(key, *rs), Some(name)),
                Some(_) => {}
            }
            entry.real.insert(*rs);
            self.draining.remove(&(key, rs.addr));
        }
        let gone: Vec<SocketAddr> = entry
            .real
            .addrs()
            .filter(|a| !wanted.contains_key(a))
            .collect();
        for addr in gone {
            if self.draining.contains_key(&(key, addr)) {
                continue;
            }
            if is_tcp(&key) {
                let rs = entry.real.get_mut(&addr).expect("listed above");
                if rs.weight != 0 {
                    rs.weight = 0;
                    p.push(Op::UpdateDest(key, *rs), Some(name));
                }
                self.draining
                    .insert((key, addr), now + self.options.drain_timeout);
            } else {
                entry.real.remove(&addr);
                p.push(Op::DeleteDest(key, addr), Some(name));
            }
        }
    }

    /// Sends the collected operations and records what failed.
    fn execute(&mut self, mut p: Pending, report: &mut SyncReport) {
        self.execute_ipvs(&mut p, report);
        self.execute_addresses(p, report);
    }

    /// Sends the IPVS operations collected so far and forgets them.
    fn execute_ipvs(&mut self, p: &mut Pending, report: &mut SyncReport) {
        if !p.ops.is_empty() {
            let started = Instant::now();
            let results = self.ipvs.apply(&p.ops);
            tracing::debug!(
                ops = p.ops.len(),
                took_ms = ms(started.elapsed()),
                "ipvs batch applied"
            );
            report.ipvs_ops += p.ops.len();
            for ((result, op), owner) in results.into_iter().zip(&p.ops).zip(&p.op_owner) {
                if let Err(e) = result {
                    // The mirror assumed success; forget what failed so the next sync retries it.
                    match op {
                        Op::AddService(vs) => {
                            self.kernel.remove(&vs.key);
                        }
                        Op::AddDest(key, rs) => {
                            if let Some(vs) = self.kernel.get_mut(key) {
                                vs.real.remove(&rs.addr);
                            }
                        }
                        _ => {}
                    }
                    p.errors.push(SyncError {
                        service: owner.clone(),
                        backend: "ipvs",
                        kind: ipvs_error_kind(&e),
                        message: e.to_string(),
                    });
                }
            }
            p.ops.clear();
            p.op_owner.clear();
        }
    }

    /// Binds and unbinds the collected addresses, then records every error of the sync.
    fn execute_addresses(&mut self, mut p: Pending, report: &mut SyncReport) {
        let started = Instant::now();
        let add: Vec<IpAddr> = p.add_addrs.into_iter().collect();
        for (ip, result) in add.iter().zip(self.addresses.add(&add)) {
            match result {
                Ok(()) => {
                    self.bound.insert(*ip);
                    report.addresses_added += 1;
                }
                Err(e) => p.errors.push(SyncError {
                    service: None,
                    backend: "addresses",
                    kind: "add",
                    message: format!("binding {ip} to kube-ipvs0: {e}"),
                }),
            }
        }
        let del: Vec<IpAddr> = p.del_addrs.into_iter().collect();
        for (ip, result) in del.iter().zip(self.addresses.remove(&del)) {
            match result {
                Ok(()) => {
                    self.bound.remove(ip);
                    report.addresses_removed += 1;
                }
                Err(e) => p.errors.push(SyncError {
                    service: None,
                    backend: "addresses",
                    kind: "remove",
                    message: format!("unbinding {ip} from kube-ipvs0: {e}"),
                }),
            }
        }
        if !add.is_empty() || !del.is_empty() {
            tracing::debug!(
                added = add.len(),
                removed = del.len(),
                took_ms = ms(started.elapsed()),
                "kube-ipvs0 addresses synced"
            );
        }
        report.errors.append(&mut p.errors);
    }
}

#[cfg(test)]
mod tests;
