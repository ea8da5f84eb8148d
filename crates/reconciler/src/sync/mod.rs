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
//! is on a node address (the node's or the NodePort addresses) with a port inside the NodePort
//! range (upstream's rule, so a NodePort whose Service went while the proxy was down is
//! removed after the restart), or it is one the plan wants, or one this process programmed —
//! and it is not inside `--ipvs-exclude-cidrs`. Firewall-mark services are never the proxy's.
//! Addresses on `kube-ipvs0` inside `--ipvs-exclude-cidrs` are never unbound.
//!
//! Removed TCP real servers drain: weight 0 first, deleted once their active and inactive
//! connections reach 0 or the drain timeout passes. UDP and SCTP ones are deleted at once, as
//! kube-proxy does (their "connections" are only timers).
//!
//! - [`kernel`]: the backend traits the engine is handed, and the netfilter facts it keeps.
//! - [`target`]: a Service's plan converted into kernel values (`ipvs` virtual and real servers,
//!   addresses, set entries).
//! - `mirror`: what the engine believes the kernel holds; `diff`: one Service's target against
//!   the mirror, as operations; `send`: the operations sent, and the mirror corrected where the
//!   kernel refused one.
//! - `resync`: the periodic full sync, which reads the kernel off the loop's thread and
//!   repairs only what differs from the mirror.

mod diff;
pub mod kernel;
mod mirror;
mod report;
mod resync;
mod send;
pub mod target;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use iptables::Family;
use iptables::ipvs_mode::{KubeSet, RuleInput};
use ipvs::{Op, RealServer, ServiceKey, VirtualServer};

pub use self::kernel::{
    AddressKernel, BackendError, IpvsKernel, IpvsTable, NetfilterEntry, NetfilterKernel, Reader,
    ServerSink, SetsRead, WantedEntries,
};
use self::mirror::{Footprint, KernelVs};
pub use self::report::{Counts, IptablesRules, SyncError, SyncReport};
use self::resync::Resync;
pub(crate) use self::resync::yield_to_the_loop;
pub use self::target::ServiceTarget;
use crate::error::Error;
use crate::model::{Protocol, ServiceName};
use crate::plan::PlanConfig;

/// How many IPVS operations a full sync collects before sending them.
pub const OPS_PER_BATCH: usize = 4096;

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// How long a removed TCP real server may drain before it is deleted with connections left.
    pub drain_timeout: Duration,
    /// Virtual servers and `kube-ipvs0` addresses inside these ranges are never touched
    /// (`--ipvs-exclude-cidrs`).
    pub exclude_cidrs: Vec<IpNet>,
    /// The cluster's NodePort range (kube-apiserver's `--service-node-port-range`): a virtual
    /// server on a node address with a port inside it is the proxy's.
    pub node_port_range: RangeInclusive<u16>,
    /// Called before and after a full sync, after each of its batches of operations, and once
    /// a periodic one's read and comparison has dropped what it held: the daemon hands glibc's
    /// `malloc_trim`
    /// here, which the crates cannot call (they forbid unsafe code), so that the freed pages
    /// go back to the kernel instead of staying in RSS until reused.
    pub release_memory: Option<fn()>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            // IPVS's own idle timeout for established TCP: a connection silent that long is gone.
            drain_timeout: Duration::from_secs(900),
            exclude_cidrs: Vec::new(),
            // kube-apiserver's default.
            node_port_range: 30000..=32767,
            release_memory: None,
        }
    }
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
    /// The real servers of `kernel`, counted as they come and go: metrics read it after every
    /// sync, and a walk over the mirror would make a one-endpoint change cost the cluster.
    real_servers: usize,
    /// Virtual servers a Service claims that the kernel refused to add, so that they are not
    /// in `kernel`: still that Service's until it lets them go, so that no other Service takes
    /// them before its retry. Usually empty; every other claim is its virtual server's
    /// ([`KernelVs::owner`]).
    refused: HashMap<ServiceKey, ServiceName>,
    address_refs: HashMap<IpAddr, u32>,
    bound: HashSet<IpAddr>,
    set_refs: HashMap<NetfilterEntry, u32>,
    /// Members per non-empty set: which rules the chains hold depends on it.
    set_sizes: HashMap<(Family, KubeSet), usize>,
    /// The settings the ipvs-mode rules are rendered with, and the families programmed.
    rules: PlanConfig,
    /// Real servers at weight 0, with the instant they are deleted regardless.
    draining: HashMap<(ServiceKey, SocketAddr), Instant>,
    /// The mirror was built from a read of the kernel and no sync since failed as a whole, so
    /// a periodic full sync need only look for drift ([`Syncer::start_resync`]).
    verified: bool,
    /// A periodic full sync's kernel read, running.
    resync: Option<Resync>,
}

/// The operations of one sync, collected before anything is sent.
#[derive(Default)]
struct Pending {
    ops: Vec<Op>,
    /// The Service each op is for, to name it in errors.
    op_owner: Vec<Option<ServiceName>>,
    /// For an update, what the mirror held before it, restored if the kernel refuses it.
    op_undo: Vec<Option<Undo>>,
    add_addrs: BTreeSet<IpAddr>,
    del_addrs: BTreeSet<IpAddr>,
    add_entries: BTreeSet<NetfilterEntry>,
    del_entries: BTreeSet<NetfilterEntry>,
    errors: Vec<SyncError>,
}

/// What an update replaced in the mirror: put back when the kernel refuses the update, so the
/// Service's retry sends it again.
#[derive(Debug)]
enum Undo {
    Server(VirtualServer),
    Dest(ServiceKey, RealServer),
}

impl Pending {
    fn push(&mut self, op: Op, owner: Option<&ServiceName>) {
        self.ops.push(op);
        self.op_owner.push(owner.cloned());
        self.op_undo.push(None);
    }

    /// Frees the room beyond the operations collected (a full sync's batches).
    fn shrink_ops(&mut self) {
        self.ops.shrink_to_fit();
        self.op_owner.shrink_to_fit();
        self.op_undo.shrink_to_fit();
    }

    fn push_update(&mut self, op: Op, owner: Option<&ServiceName>, undo: Undo) {
        self.push(op, owner);
        if let Some(last) = self.op_undo.last_mut() {
            *last = Some(undo);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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
            real_servers: 0,
            refused: HashMap::new(),
            address_refs: HashMap::new(),
            bound: HashSet::new(),
            set_refs: HashMap::new(),
            set_sizes: HashMap::new(),
            rules: PlanConfig::default(),
            draining: HashMap::new(),
            verified: false,
            resync: None,
        }
    }

    /// Node facts or families changed: rules are rendered with `config` from now on (at once
    /// with the next full sync, which the loop runs after this).
    pub fn reconfigure(&mut self, config: &PlanConfig) {
        self.rules = config.clone();
        // Every Service is planned again, by a full sync that reads the kernel first; a
        // periodic read in flight was for the old settings.
        self.verified = false;
        self.resync = None;
    }

    /// Writes the sets whole, from the mirror's members, and the chains: the entries written.
    fn write_netfilter(&mut self) -> Result<usize, BackendError> {
        let rules = self.rule_inputs();
        let wanted = WantedEntries {
            refs: &self.set_refs,
            sizes: &self.set_sizes,
        };
        self.netfilter.full(&wanted, &rules)?;
        Ok(wanted.len())
    }

    fn non_empty_sets(&self) -> BTreeSet<(Family, KubeSet)> {
        self.set_sizes.keys().copied().collect()
    }

    /// What the ipvs-mode rules of each family are rendered from, as the mirror has it.
    fn rule_inputs(&self) -> Vec<RuleInput> {
        let non_empty = self.non_empty_sets();
        let no_node_access: BTreeSet<(IpAddr, Protocol, u16)> = self
            .set_refs
            .keys()
            .filter_map(|e| match e {
                NetfilterEntry::NoNodeAccess { ip, protocol, port } => {
                    Some((*ip, *protocol, *port))
                }
                NetfilterEntry::Set { .. } => None,
            })
            .collect();
        self.rules
            .families
            .iter()
            .map(|&family| {
                let sets = non_empty
                    .iter()
                    .filter(|(f, _)| *f == family)
                    .map(|(_, s)| *s)
                    .collect();
                self.rules.rule_input(family, sets, no_node_access.clone())
            })
            .collect()
    }

    /// The IPVS backend, for callers that need to read the kernel directly.
    pub fn ipvs_mut(&mut self) -> &mut I {
        &mut self.ipvs
    }

    /// The netfilter backend.
    pub fn netfilter_mut(&mut self) -> &mut N {
        &mut self.netfilter
    }

    #[must_use]
    pub fn counts(&self) -> Counts {
        Counts {
            virtual_servers: self.kernel.len(),
            real_servers: self.real_servers,
            draining: self.draining.len(),
        }
    }

    /// The Service that claims `key`, if any.
    fn owner(&self, key: &ServiceKey) -> Option<&ServiceName> {
        match self.kernel.get(key) {
            Some(vs) => vs.owner.as_ref(),
            None => self.refused.get(key),
        }
    }

    /// Drops a virtual server and its real servers from the mirror; says whether it was there.
    fn forget_virtual_server(&mut self, key: &ServiceKey) -> bool {
        let Some(vs) = self.kernel.remove(key) else {
            return false;
        };
        self.real_servers -= vs.real.len();
        true
    }

    /// What a full sync or a read freed goes back to the kernel ([`SyncOptions::release_memory`]).
    fn release_memory(&self) {
        if let Some(release) = self.options.release_memory {
            let started = Instant::now();
            release();
            tracing::debug!(took_ms = ms(started.elapsed()), "memory released");
        }
    }

    fn excluded(&self, ip: IpAddr) -> bool {
        self.options
            .exclude_cidrs
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// Whether `addr` is where a NodePort of this node would be: a node address (as the plan's
    /// settings have them) and a port inside the NodePort range.
    fn is_node_port(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip();
        self.options.node_port_range.contains(&addr.port())
            && (self.rules.node_port_ips.contains(&ip) || self.rules.node_addresses.contains(&ip))
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
        // A periodic read in flight is older than this one.
        self.resync = None;
        // What came before is freed (the source's first read, decoded on its own threads, or
        // that read in flight): released first, so that the mirror built next does not come
        // on top of it.
        self.release_memory();
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
            self.diff_service(&name, target, now, &mut pending);
            // The sets are written whole below, from the mirror: the entries the diff
            // collected (20,000 at 10,000 Services) are not kept meanwhile.
            pending.add_entries.clear();
            pending.del_entries.clear();
            if pending.ops.len() >= OPS_PER_BATCH {
                self.execute_ipvs(&mut pending, &mut report);
                // What the batch's sending and the Services' plans freed is returned as the
                // mirror grows, not only once it is whole (2 ms a batch in the emulator).
                self.release_memory();
            }
        }
        // Whatever the proxy owns that no Service claimed; what it never owned leaves the
        // mirror untouched.
        let orphans: Vec<ServiceKey> = self
            .kernel
            .iter()
            .filter(|(_, vs)| vs.owner.is_none())
            .map(|(k, _)| *k)
            .collect();
        for key in orphans {
            self.forget_virtual_server(&key);
            if !unclaimed.contains(&key) {
                self.draining.retain(|(k, _), _| *k != key);
                pending.push(Op::DeleteService(key), None);
            }
        }
        drop(unclaimed);
        // The batches' room (4,096 operations with their owners and undos: 1.7 MiB) is not
        // kept through the restore below, which copies every set entry and renders them; the
        // last batch goes right before the addresses, after the restore, as before.
        pending.shrink_ops();
        for ip in &self.bound {
            if !self.address_refs.contains_key(ip) {
                pending.del_addrs.insert(*ip);
            }
        }
        let planned = started.elapsed();
        match self.write_netfilter() {
            Ok(written) => report.set_entries_added = written,
            Err(e) => pending
                .errors
                .push(SyncError::new(None, Error::RestoreNetfilter(e))),
        }
        let netfilter = started.elapsed();
        self.execute(pending, &mut report);
        tracing::debug!(
            read_kernel_ms = ms(read),
            plan_and_ipvs_ms = ms(planned.saturating_sub(read)),
            netfilter_ms = ms(netfilter.saturating_sub(planned)),
            rest_ms = ms(started.elapsed().saturating_sub(netfilter)),
            "full sync phases"
        );
        self.verified = !report.needs_full_sync();
        self.release_memory();
        report
    }

    /// Reads the IPVS table and `kube-ipvs0`'s addresses and makes them the mirror, with no
    /// Service's claim on any of it yet. Returns the virtual servers the proxy does not own
    /// unless a Service claims them (see the module's notes): they are dropped from the mirror,
    /// never deleted, if none does.
    fn read_kernel(&mut self) -> Result<HashSet<ServiceKey>, SyncError> {
        let dump = self
            .ipvs
            .dump()
            .map_err(|e| SyncError::new(None, Error::ReadIpvs(e)))?;
        let bound = self
            .addresses
            .list()
            .map_err(|e| SyncError::new(None, Error::ListAddresses(e)))?;
        let mut unclaimed = HashSet::new();
        let mut kernel = HashMap::with_capacity(dump.len());
        for entry in dump {
            let server = entry.service.server;
            let ServiceKey::Addr { addr, .. } = server.key else {
                continue;
            };
            if self.excluded(addr.ip()) {
                continue;
            }
            if !bound.contains(&addr.ip())
                && !self.is_node_port(addr)
                && !self.kernel.contains_key(&server.key)
            {
                unclaimed.insert(server.key);
            }
            let real = entry.real_servers.into_iter().map(|r| r.server).collect();
            kernel.insert(server.key, KernelVs::read(server, real));
        }
        self.real_servers = kernel.values().map(|vs| vs.real.len()).sum();
        self.kernel = kernel;
        self.services.clear();
        self.refused.clear();
        self.address_refs.clear();
        self.set_refs.clear();
        self.set_sizes.clear();
        self.bound = bound.into_iter().collect();
        let kernel = &self.kernel;
        self.draining.retain(|(key, addr), _| {
            kernel
                .get(key)
                .is_some_and(|vs| vs.real.get(addr).is_some_and(|r| r.weight == 0))
        });
        Ok(unclaimed)
    }

    /// `kube-ipvs0` was deleted under the proxy: lists it (which makes it again, see
    /// [`AddressKernel::list`]) and binds every address a Service holds, touching nothing
    /// else, so every ClusterIP answers again at the cost of one address batch, whatever the
    /// number of Services.
    pub fn rebind(&mut self) -> SyncReport {
        let mut report = SyncReport::default();
        match self.addresses.list() {
            Ok(bound) => self.bound = bound.into_iter().collect(),
            Err(e) => {
                report
                    .errors
                    .push(SyncError::new(None, Error::ListAddresses(e)));
                return report;
            }
        }
        let pending = Pending {
            add_addrs: self
                .address_refs
                .keys()
                .filter(|ip| !self.bound.contains(ip))
                .copied()
                .collect(),
            ..Pending::default()
        };
        self.execute(pending, &mut report);
        report
    }

    /// Programs the changed Services only. A Service that is gone has an empty target.
    pub fn sync(&mut self, changes: Vec<(ServiceName, ServiceTarget)>, now: Instant) -> SyncReport {
        let mut report = SyncReport {
            services: changes.len(),
            ..SyncReport::default()
        };
        let mut pending = Pending::default();
        let non_empty = self.non_empty_sets();
        for (name, target) in changes {
            self.diff_service(&name, target, now, &mut pending);
        }
        // The chains change only when a set turns empty or non-empty, or an out-filter comes
        // or goes.
        let rules_changed = non_empty != self.non_empty_sets()
            || pending
                .add_entries
                .iter()
                .chain(&pending.del_entries)
                .any(|e| matches!(e, NetfilterEntry::NoNodeAccess { .. }));
        let rules = rules_changed.then(|| self.rule_inputs());
        self.note_written(&pending);
        let added: Vec<NetfilterEntry> = std::mem::take(&mut pending.add_entries)
            .into_iter()
            .collect();
        let removed: Vec<NetfilterEntry> = std::mem::take(&mut pending.del_entries)
            .into_iter()
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            match self.netfilter.partial(&added, &removed, rules.as_deref()) {
                Ok(()) => {
                    report.set_entries_added = added.len();
                    report.set_entries_removed = removed.len();
                }
                Err(e) => pending
                    .errors
                    .push(SyncError::new(None, Error::UpdateSets(e))),
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
                    pending.errors.push(SyncError::new(
                        self.owner(&key),
                        Error::ReadRealServers { key, source: e },
                    ));
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
                        self.real_servers -= 1;
                        pending.push(Op::DeleteDest(key, addr), vs.owner.as_ref());
                        report.drained += 1;
                    }
                }
            }
        }
        self.execute(pending, &mut report);
        report
    }
}

#[cfg(test)]
mod tests;
