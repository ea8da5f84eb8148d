//! The periodic full sync, off the loop's thread.
//!
//! The full sync at start (and after a backend failed as a whole, or node facts changed)
//! reads the kernel on the loop's thread and plans every Service. The periodic one needs
//! neither: partial syncs keep the mirror equal to the plan, so what it is for is drift, a
//! kernel no longer as the mirror says (a virtual server deleted by hand, a set member gone).
//! [`Syncer::start_resync`] reads the IPVS table (on several sockets), `kube-ipvs0` and the
//! sets on a thread of its own, which also rewrites the few ipvs-mode chains, and returns at
//! once; changes keep being synced meanwhile, and every object they write is noted. When the
//! read is done, [`Syncer::finish_resync`] compares it with the mirror, skipping what was
//! written since the read began (the mirror is newer there, as with the iptables proxier's
//! `Proxier::check`), and writes only what differs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iptables::Family;
use iptables::ipvs_mode::{KubeSet, RuleInput};
use ipvs::{Op, ServiceKey};

use super::kernel::{IpvsTable, Reader};
use super::mirror::KernelVs;
use super::report::SyncError;
use super::{
    AddressKernel, IpvsKernel, NetfilterEntry, NetfilterKernel, Pending, SyncReport, Syncer, ms,
};
use crate::error::Error;

/// How often the loop looks whether the read is done.
const POLL: Duration = Duration::from_millis(10);

/// A periodic full sync's kernel read, running.
#[derive(Debug)]
pub(super) struct Resync {
    thread: JoinHandle<Result<KernelRead, SyncError>>,
    started: Instant,
    next_poll: Instant,
    /// The chains the reader wrote, as the mirror had them when it began.
    rules: Vec<RuleInput>,
    /// What syncs wrote since the read began.
    touched: Touched,
}

/// The objects written since a read began: the read may predate them, so they are not
/// compared with it.
#[derive(Debug, Default)]
struct Touched {
    keys: HashSet<ServiceKey>,
    addresses: HashSet<IpAddr>,
    entries: HashSet<NetfilterEntry>,
}

/// What the reader found, in the mirror's shapes (built on the reader's thread).
#[derive(Debug)]
struct KernelRead {
    ipvs: HashMap<ServiceKey, KernelVs>,
    addresses: BTreeSet<IpAddr>,
    /// The members of the proxy's sets.
    entries: HashSet<NetfilterEntry>,
    /// The proxy's sets that exist.
    sets: HashSet<(Family, KubeSet)>,
}

/// Runs the three reads; on the reader's thread.
fn read(
    ipvs: Reader<IpvsTable, ipvs::Error>,
    addresses: Reader<BTreeSet<IpAddr>>,
    netfilter: Reader<Vec<iptables::IpSet>>,
) -> Result<KernelRead, SyncError> {
    let fail = |e| SyncError::new(None, e);
    let table = ipvs().map_err(|e| fail(Error::ReadIpvs(e)))?;
    let ipvs = table
        .into_iter()
        // Firewall-mark services are never the proxy's.
        .filter(|e| matches!(e.service.server.key, ServiceKey::Addr { .. }))
        .map(|e| {
            let real = e.real_servers.into_iter().map(|r| r.server).collect();
            let server = e.service.server;
            (server.key, KernelVs { server, real })
        })
        .collect();
    let addresses = addresses().map_err(|e| fail(Error::ListAddresses(e)))?;
    let mut entries = HashSet::new();
    let mut sets = HashSet::new();
    for ipset in netfilter().map_err(|e| fail(Error::RestoreNetfilter(e)))? {
        let Some((set, family)) = KubeSet::from_name(ipset.name()) else {
            continue;
        };
        sets.insert((family, set));
        entries.extend(ipset.entries.into_iter().map(|entry| NetfilterEntry::Set {
            family,
            set,
            entry,
        }));
    }
    Ok(KernelRead {
        ipvs,
        addresses,
        entries,
        sets,
    })
}

impl<I: IpvsKernel, A: AddressKernel, N: NetfilterKernel> Syncer<I, A, N> {
    /// A periodic full sync: starts the kernel read on its own thread and says so, or says it
    /// cannot (the mirror was not built from a read, or a sync since failed as a whole; a
    /// backend cannot read off its thread), and the caller runs [`Syncer::full_sync`]. A read
    /// still running counts as started: the next period's is that one.
    pub fn start_resync(&mut self, now: Instant) -> bool {
        if !self.verified {
            return false;
        }
        if self.resync.is_some() {
            return true;
        }
        let rules = self.rule_inputs();
        let (Some(ipvs), Some(addresses), Some(netfilter)) = (
            self.ipvs.reader(),
            self.addresses.reader(),
            self.netfilter.reader(rules.clone()),
        ) else {
            return false;
        };
        let spawned = std::thread::Builder::new()
            .name("kernel-read".into())
            .spawn(move || read(ipvs, addresses, netfilter));
        match spawned {
            Ok(thread) => {
                tracing::debug!("full sync: reading the kernel off the loop's thread");
                self.resync = Some(Resync {
                    thread,
                    started: now,
                    next_poll: now + POLL,
                    rules,
                    touched: Touched::default(),
                });
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "no thread for the kernel read; reading it on the loop's");
                false
            }
        }
    }

    /// When to call [`Syncer::finish_resync`], while a read runs.
    #[must_use]
    pub fn resync_due(&self) -> Option<Instant> {
        self.resync.as_ref().map(|r| r.next_poll)
    }

    /// Notes what `p` writes, while a read runs.
    pub(super) fn note_written(&mut self, p: &Pending) {
        let Some(resync) = &mut self.resync else {
            return;
        };
        let touched = &mut resync.touched;
        touched.keys.extend(p.ops.iter().map(|op| *op.service()));
        touched
            .addresses
            .extend(p.add_addrs.iter().chain(&p.del_addrs));
        touched
            .entries
            .extend(p.add_entries.iter().chain(&p.del_entries).cloned());
    }

    /// Once the read is done: compares it with the mirror, leaving out what was written since
    /// it began, and writes what differs. `None` while it runs.
    pub fn finish_resync(&mut self, now: Instant) -> Option<SyncReport> {
        let resync = self.resync.take()?;
        if !resync.thread.is_finished() {
            self.resync = Some(Resync {
                next_poll: now + POLL,
                ..resync
            });
            return None;
        }
        let compared = Instant::now();
        let mut report = SyncReport {
            services: self.services.len(),
            ..SyncReport::default()
        };
        let read = match resync.thread.join() {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                report.errors.push(e);
                self.verified = false;
                return Some(report);
            }
            Err(_) => {
                let panicked = std::io::Error::other("the kernel read panicked");
                let e = Error::ReadIpvs(ipvs::Error::Io(panicked));
                report.errors.push(SyncError::new(None, e));
                self.verified = false;
                return Some(report);
            }
        };
        let touched = &resync.touched;
        let mut p = Pending::default();
        self.repair_ipvs(&read, touched, &mut p);
        self.repair_addresses(&read, touched, &mut p);
        self.repair_sets(&read, touched, &resync.rules, &mut report, &mut p);
        self.execute(p, &mut report);
        self.verified = !report.needs_full_sync();
        tracing::info!(
            ipvs_ops = report.ipvs_ops,
            addresses_added = report.addresses_added,
            addresses_removed = report.addresses_removed,
            set_entries_added = report.set_entries_added,
            set_entries_removed = report.set_entries_removed,
            skipped = touched.keys.len() + touched.addresses.len() + touched.entries.len(),
            errors = report.errors.len(),
            read_ms = ms(compared.saturating_duration_since(resync.started)),
            compare_ms = ms(compared.elapsed()),
            "full sync checked the kernel"
        );
        Some(report)
    }

    /// Virtual and real servers: the mirror's put back where the kernel lost or changed them,
    /// the proxy's that the mirror does not hold deleted.
    fn repair_ipvs(&mut self, read: &KernelRead, touched: &Touched, p: &mut Pending) {
        // Draining real servers the kernel no longer has are done draining.
        let mut drained: Vec<(ServiceKey, SocketAddr)> = Vec::new();
        for (key, vs) in &self.kernel {
            if touched.keys.contains(key) {
                continue;
            }
            let owner = self.owner.get(key);
            let have = read.ipvs.get(key);
            match have {
                None => p.push(Op::AddService(vs.server.clone()), owner),
                Some(have) if have.server != vs.server => {
                    p.push(Op::UpdateService(vs.server.clone()), owner);
                }
                Some(_) => {}
            }
            for addr in vs.real.addrs() {
                let want = vs.real.get(&addr).expect("listed");
                match have.and_then(|h| h.real.get(&addr)) {
                    None if self.draining.contains_key(&(*key, addr)) => {
                        drained.push((*key, addr));
                    }
                    None => p.push(Op::AddDest(*key, *want), owner),
                    Some(found) if found != want => p.push(Op::UpdateDest(*key, *want), owner),
                    Some(_) => {}
                }
            }
            for addr in have.iter().flat_map(|h| h.real.addrs()) {
                if vs.real.get(&addr).is_none() {
                    p.push(Op::DeleteDest(*key, addr), owner);
                }
            }
        }
        for (key, addr) in drained {
            self.draining.remove(&(key, addr));
            if let Some(vs) = self.kernel.get_mut(&key)
                && vs.real.remove(&addr).is_some()
            {
                self.real_servers -= 1;
            }
        }
        for key in read.ipvs.keys() {
            let ServiceKey::Addr { addr, .. } = key else {
                continue;
            };
            let ours = read.addresses.contains(&addr.ip()) || self.is_node_port(*addr);
            if ours
                && !self.kernel.contains_key(key)
                && !touched.keys.contains(key)
                && !self.excluded(addr.ip())
            {
                p.push(Op::DeleteService(*key), None);
            }
        }
    }

    /// `kube-ipvs0`: what the Services hold bound, nothing else.
    fn repair_addresses(&mut self, read: &KernelRead, touched: &Touched, p: &mut Pending) {
        let untouched = |ip: &&IpAddr| !touched.addresses.contains(*ip);
        self.bound
            .retain(|ip| !untouched(&ip) || read.addresses.contains(ip));
        self.bound.extend(read.addresses.iter().filter(untouched));
        let missing = self.address_refs.keys().filter(untouched);
        p.add_addrs
            .extend(missing.filter(|ip| !read.addresses.contains(*ip)));
        let extra = read.addresses.iter().filter(untouched);
        p.del_addrs
            .extend(extra.filter(|ip| !self.address_refs.contains_key(*ip)));
    }

    /// The sets: only the members that differ are added and deleted, and the chains are
    /// written again only if they changed since the reader wrote them. A set of the proxy's
    /// that is missing brings the full write of a full sync.
    fn repair_sets(
        &mut self,
        read: &KernelRead,
        touched: &Touched,
        written: &[RuleInput],
        report: &mut SyncReport,
        p: &mut Pending,
    ) {
        let families = self.rules.families.clone();
        let rules = self.rule_inputs();
        let missing = families
            .iter()
            .flat_map(|&f| KubeSet::ALL.map(|set| (f, set)))
            .any(|set| !read.sets.contains(&set));
        if missing {
            let entries: BTreeSet<NetfilterEntry> = self.set_refs.keys().cloned().collect();
            match self.netfilter.full(&entries, &rules) {
                Ok(()) => report.set_entries_added = entries.len(),
                Err(e) => p
                    .errors
                    .push(SyncError::new(None, Error::RestoreNetfilter(e))),
            }
            return;
        }
        let is_member = |e: &&NetfilterEntry| matches!(e, NetfilterEntry::Set { .. });
        let added: Vec<NetfilterEntry> = self
            .set_refs
            .keys()
            .filter(is_member)
            .filter(|e| !read.entries.contains(*e) && !touched.entries.contains(*e))
            .cloned()
            .collect();
        let removed: Vec<NetfilterEntry> = read
            .entries
            .iter()
            .filter(|e| match e {
                NetfilterEntry::Set { family, .. } => families.contains(family),
                NetfilterEntry::NoNodeAccess { .. } => false,
            })
            .filter(|e| !self.set_refs.contains_key(*e) && !touched.entries.contains(*e))
            .cloned()
            .collect();
        let rules = (rules != written).then_some(rules);
        if added.is_empty() && removed.is_empty() && rules.is_none() {
            return;
        }
        match self.netfilter.partial(&added, &removed, rules.as_deref()) {
            Ok(()) => {
                report.set_entries_added = added.len();
                report.set_entries_removed = removed.len();
            }
            Err(e) => p.errors.push(SyncError::new(None, Error::UpdateSets(e))),
        }
    }
}
