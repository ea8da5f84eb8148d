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
//! `Proxier::check`), and writes only what differs. The comparison runs on the loop's thread
//! (the mirror is there) in slices of [`SLICE`], each sending what it found, so a change
//! waits for one slice at most.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iptables::Family;
use iptables::ipvs_mode::{KubeSet, RuleInput};
use ipvs::{Op, ServiceKey};

use super::kernel::{IpvsServers, Reader};
use super::mirror::KernelVs;
use super::report::SyncError;
use super::{
    AddressKernel, IpvsKernel, NetfilterEntry, NetfilterKernel, Pending, SyncReport, Syncer, ms,
};
use crate::error::Error;

/// How often the loop looks whether the read is done.
const POLL: Duration = Duration::from_millis(10);
/// How long one slice of the comparison may hold the loop: at 10,000 Services the whole
/// comparison takes about a second in the emulator.
const SLICE: Duration = Duration::from_millis(5);
/// How many objects are compared between looks at the clock.
const STRIDE: usize = 32;

/// A periodic full sync's kernel read, running, then its comparison with the mirror.
#[derive(Debug)]
pub(super) struct Resync {
    stage: Stage,
    started: Instant,
    next_poll: Instant,
    /// The chains the reader wrote, as the mirror had them when it began.
    rules: Vec<RuleInput>,
    /// What syncs wrote since the read began.
    touched: Touched,
}

#[derive(Debug)]
enum Stage {
    Reading(JoinHandle<Result<KernelRead, SyncError>>),
    Comparing(Box<Comparison>),
}

/// A comparison under way: the read, what is left to compare, and what was done so far.
#[derive(Debug)]
struct Comparison {
    read: KernelRead,
    /// Objects left to compare, the next last.
    todo: Vec<Item>,
    report: SyncReport,
    /// When the read ended, and the loop's time spent comparing so far.
    read_done: Instant,
    comparing: Duration,
}

/// One object to compare with the read.
#[derive(Debug)]
enum Item {
    /// A virtual server of the mirror.
    Mirror(ServiceKey),
    /// A virtual server of the kernel's.
    Kernel(ServiceKey),
    Address(IpAddr),
    Entry(NetfilterEntry),
    /// The chains, after everything else.
    Rules,
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
    ipvs: Reader<IpvsServers, ipvs::Error>,
    addresses: Reader<BTreeSet<IpAddr>>,
    netfilter: Reader<Vec<iptables::IpSet>>,
) -> Result<KernelRead, SyncError> {
    let fail = |e| SyncError::new(None, e);
    let table = ipvs().map_err(|e| fail(Error::ReadIpvs(e)))?;
    let ipvs = table
        .into_iter()
        // Firewall-mark services are never the proxy's.
        .filter(|(server, _)| matches!(server.key, ServiceKey::Addr { .. }))
        .map(|(server, real)| {
            let real = real.into_iter().collect();
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
                    stage: Stage::Reading(thread),
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

    /// When to call [`Syncer::finish_resync`], while a read or its comparison runs.
    #[must_use]
    pub fn resync_due(&self) -> Option<Instant> {
        self.resync.as_ref().map(|r| r.next_poll)
    }

    /// Notes what `p` writes, while a read or its comparison runs.
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

    /// Once the read is done: compares one slice of it with the mirror, leaving out what was
    /// written since it began, and writes what differs there. `None` while the read runs or
    /// objects are left to compare (it is due again at once); what the whole did when done.
    pub fn finish_resync(&mut self, now: Instant) -> Option<SyncReport> {
        let mut resync = self.resync.take()?;
        let mut comparison = match resync.stage {
            Stage::Reading(thread) if !thread.is_finished() => {
                resync.stage = Stage::Reading(thread);
                resync.next_poll = now + POLL;
                self.resync = Some(resync);
                return None;
            }
            Stage::Reading(thread) => match self.begin_comparison(thread) {
                Ok(comparison) => Box::new(comparison),
                Err(report) => return Some(report),
            },
            Stage::Comparing(comparison) => comparison,
        };
        let slice = Instant::now();
        let mut p = Pending::default();
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let mut rules = None;
        let mut done = 0;
        while let Some(item) = comparison.todo.pop() {
            let read = &comparison.read;
            let touched = &resync.touched;
            match item {
                Item::Mirror(key) => self.compare_mirror(key, read, touched, &mut p),
                Item::Kernel(key) => self.compare_kernel(key, read, touched, &mut p),
                Item::Address(ip) => self.compare_address(ip, read, touched, &mut p),
                Item::Entry(e) => self.compare_entry(e, read, touched, &mut added, &mut removed),
                Item::Rules => {
                    let now_rules = self.rule_inputs();
                    rules = (now_rules != resync.rules).then_some(now_rules);
                }
            }
            done += 1;
            if done % STRIDE == 0 && slice.elapsed() >= SLICE {
                break;
            }
        }
        let report = &mut comparison.report;
        if !added.is_empty() || !removed.is_empty() || rules.is_some() {
            match self.netfilter.partial(&added, &removed, rules.as_deref()) {
                Ok(()) => {
                    report.set_entries_added += added.len();
                    report.set_entries_removed += removed.len();
                }
                Err(e) => p.errors.push(SyncError::new(None, Error::UpdateSets(e))),
            }
        }
        self.execute(p, report);
        comparison.comparing += slice.elapsed();
        if !comparison.todo.is_empty() && !report.needs_full_sync() {
            resync.stage = Stage::Comparing(comparison);
            resync.next_poll = now;
            self.resync = Some(resync);
            return None;
        }
        let Comparison {
            report,
            read_done,
            comparing,
            ..
        } = *comparison;
        self.verified = !report.needs_full_sync();
        let touched = &resync.touched;
        tracing::info!(
            ipvs_ops = report.ipvs_ops,
            addresses_added = report.addresses_added,
            addresses_removed = report.addresses_removed,
            set_entries_added = report.set_entries_added,
            set_entries_removed = report.set_entries_removed,
            skipped = touched.keys.len() + touched.addresses.len() + touched.entries.len(),
            errors = report.errors.len(),
            read_ms = ms(read_done.saturating_duration_since(resync.started)),
            compare_ms = ms(Instant::now().saturating_duration_since(read_done)),
            compare_cpu_ms = ms(comparing),
            "full sync checked the kernel"
        );
        Some(report)
    }

    /// Takes the read and lists what to compare; a read that failed is the report.
    fn begin_comparison(
        &mut self,
        thread: JoinHandle<Result<KernelRead, SyncError>>,
    ) -> Result<Comparison, SyncReport> {
        let mut report = SyncReport {
            services: self.services.len(),
            ..SyncReport::default()
        };
        let read = match thread.join() {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                report.errors.push(e);
                self.verified = false;
                return Err(report);
            }
            Err(_) => {
                let panicked = std::io::Error::other("the kernel read panicked");
                let e = Error::ReadIpvs(ipvs::Error::Io(panicked));
                report.errors.push(SyncError::new(None, e));
                self.verified = false;
                return Err(report);
            }
        };
        let read_done = Instant::now();
        let mut todo = vec![Item::Rules];
        // A set of the proxy's missing: the sets are written whole, as a full sync writes them.
        let missing = self
            .rules
            .families
            .iter()
            .flat_map(|&f| KubeSet::ALL.map(|set| (f, set)))
            .any(|set| !read.sets.contains(&set));
        if missing {
            let entries: BTreeSet<NetfilterEntry> = self.set_refs.keys().cloned().collect();
            match self.netfilter.full(&entries, &self.rule_inputs()) {
                Ok(()) => report.set_entries_added = entries.len(),
                Err(e) => report
                    .errors
                    .push(SyncError::new(None, Error::RestoreNetfilter(e))),
            }
        } else {
            let is_member = |e: &&NetfilterEntry| matches!(e, NetfilterEntry::Set { .. });
            todo.extend(read.entries.iter().cloned().map(Item::Entry));
            let wanted = self.set_refs.keys().filter(is_member);
            todo.extend(wanted.cloned().map(Item::Entry));
        }
        todo.extend(read.addresses.iter().copied().map(Item::Address));
        todo.extend(self.address_refs.keys().copied().map(Item::Address));
        todo.extend(read.ipvs.keys().copied().map(Item::Kernel));
        todo.extend(self.kernel.keys().copied().map(Item::Mirror));
        Ok(Comparison {
            read,
            todo,
            report,
            read_done,
            comparing: read_done.elapsed(),
        })
    }

    /// One virtual server of the mirror: put back where the kernel lost or changed it or its
    /// real servers, its extra real servers deleted.
    fn compare_mirror(
        &mut self,
        key: ServiceKey,
        read: &KernelRead,
        touched: &Touched,
        p: &mut Pending,
    ) {
        if touched.keys.contains(&key) {
            return;
        }
        let Some(vs) = self.kernel.get(&key) else {
            return;
        };
        let owner = self.owner.get(&key);
        let have = read.ipvs.get(&key);
        match have {
            None => p.push(Op::AddService(vs.server.clone()), owner),
            Some(have) if have.server != vs.server => {
                p.push(Op::UpdateService(vs.server.clone()), owner);
            }
            Some(_) => {}
        }
        // Draining real servers the kernel no longer has are done draining.
        let mut drained: Vec<SocketAddr> = Vec::new();
        for addr in vs.real.addrs() {
            let want = vs.real.get(&addr).expect("listed");
            match have.and_then(|h| h.real.get(&addr)) {
                None if self.draining.contains_key(&(key, addr)) => drained.push(addr),
                None => p.push(Op::AddDest(key, *want), owner),
                Some(found) if found != want => p.push(Op::UpdateDest(key, *want), owner),
                Some(_) => {}
            }
        }
        for addr in have.iter().flat_map(|h| h.real.addrs()) {
            if vs.real.get(&addr).is_none() {
                p.push(Op::DeleteDest(key, addr), owner);
            }
        }
        for addr in drained {
            self.draining.remove(&(key, addr));
            if let Some(vs) = self.kernel.get_mut(&key)
                && vs.real.remove(&addr).is_some()
            {
                self.real_servers -= 1;
            }
        }
    }

    /// One virtual server of the kernel's: deleted if it is the proxy's and the mirror does
    /// not hold it.
    fn compare_kernel(
        &self,
        key: ServiceKey,
        read: &KernelRead,
        touched: &Touched,
        p: &mut Pending,
    ) {
        let ServiceKey::Addr { addr, .. } = key else {
            return;
        };
        let ours = read.addresses.contains(&addr.ip()) || self.is_node_port(addr);
        if ours
            && !self.kernel.contains_key(&key)
            && !touched.keys.contains(&key)
            && !self.excluded(addr.ip())
        {
            p.push(Op::DeleteService(key), None);
        }
    }

    /// One address: bound if a Service holds it, unbound otherwise.
    fn compare_address(
        &mut self,
        ip: IpAddr,
        read: &KernelRead,
        touched: &Touched,
        p: &mut Pending,
    ) {
        if touched.addresses.contains(&ip) {
            return;
        }
        let bound = read.addresses.contains(&ip);
        if bound {
            self.bound.insert(ip);
        } else {
            self.bound.remove(&ip);
        }
        match (self.address_refs.contains_key(&ip), bound) {
            (true, false) => {
                p.add_addrs.insert(ip);
            }
            (false, true) => {
                p.del_addrs.insert(ip);
            }
            _ => {}
        }
    }

    /// One set member: added if a Service holds it, deleted otherwise (in the sets of the
    /// families programmed).
    fn compare_entry(
        &self,
        e: NetfilterEntry,
        read: &KernelRead,
        touched: &Touched,
        added: &mut Vec<NetfilterEntry>,
        removed: &mut Vec<NetfilterEntry>,
    ) {
        let NetfilterEntry::Set { family, .. } = &e else {
            return;
        };
        if touched.entries.contains(&e) || !self.rules.families.contains(family) {
            return;
        }
        match (self.set_refs.contains_key(&e), read.entries.contains(&e)) {
            (true, false) => added.push(e),
            (false, true) => removed.push(e),
            _ => {}
        }
    }
}
