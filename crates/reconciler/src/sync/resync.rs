//! The periodic full sync, off the loop's thread.
//!
//! The full sync at start (and after a backend failed as a whole, or node facts changed)
//! reads the kernel on the loop's thread and plans every Service. The periodic one needs
//! neither: partial syncs keep the mirror equal to the plan, so what it is for is drift, a
//! kernel no longer as the mirror says (a virtual server deleted by hand, a set member gone).
//! [`Syncer::start_resync`] starts a thread of its own that lists `kube-ipvs0`, dumps the
//! IPVS table (on several sockets), rewrites the few ipvs-mode chains and reads the sets, and
//! returns at once; changes keep being synced meanwhile, and every object they write is
//! noted. The reader hands each virtual server over a bounded channel as soon as it is read,
//! and [`Syncer::finish_resync`] compares it with the mirror as it comes, so the table is
//! never held whole beside the mirror; once the read is done it compares the rest (the mirror's
//! virtual servers the kernel lacks, the addresses, the set members). What was written since
//! the read began is skipped (the mirror is newer there, as with the iptables proxier's
//! `Proxier::check`), and only what differs is written. The comparison runs on the loop's
//! thread (the mirror is there) in slices of [`SLICE`], each sending what it found, so a change
//! waits for one slice at most.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iptables::ipvs_mode::{KubeSet, RuleInput};
use ipvs::{Op, ServiceKey};

use super::kernel::{Reader, ServerSink, SetsRead};
use super::mirror::KernelVs;
use super::report::SyncError;
use super::{
    AddressKernel, IpvsKernel, NetfilterEntry, NetfilterKernel, Pending, SyncReport, Syncer, ms,
};
use crate::error::Error;

/// How often the loop looks for what the reader sent, while it reads.
const POLL: Duration = Duration::from_millis(10);
/// How long one slice of the comparison may hold the loop: at 10,000 Services the whole
/// comparison takes about a second in the emulator.
const SLICE: Duration = Duration::from_millis(5);
/// How many objects are compared between looks at the clock.
const STRIDE: usize = 32;
/// How many virtual servers the reader may be ahead of the comparison (a few hundred KiB):
/// the loop takes what came every [`POLL`], and the reader reads one or two a millisecond in
/// the emulator, so it seldom waits.
const AHEAD: usize = 1024;

/// A periodic full sync's kernel read, running, then the comparison of what is left.
#[derive(Debug)]
pub(super) struct Resync {
    stage: Stage,
    started: Instant,
    next_poll: Instant,
    /// The chains the reader wrote, as the mirror had them when it began.
    rules: Vec<RuleInput>,
    /// What syncs wrote since the read began.
    touched: Touched,
    /// What the comparison did so far.
    report: SyncReport,
    /// The loop's time spent comparing so far.
    comparing: Duration,
    /// When the read ended, once a comparison of all of it is done.
    read_done: Option<Instant>,
}

#[derive(Debug)]
enum Stage {
    Reading(Box<Stream>),
    Comparing(Box<Comparison>),
}

/// What the reader thread sends, in this order.
#[derive(Debug)]
enum Read {
    /// `kube-ipvs0`'s addresses: whether a virtual server of the kernel's is the proxy's
    /// depends on them.
    Addresses(BTreeSet<IpAddr>),
    /// One virtual server of the kernel's, with its real servers.
    Server(KernelVs),
    Sets(SetsRead),
}

/// The read under way: each virtual server is compared as it comes.
#[derive(Debug)]
struct Stream {
    thread: JoinHandle<Result<(), SyncError>>,
    from: Receiver<Read>,
    addresses: BTreeSet<IpAddr>,
    /// The mirror's virtual servers the kernel was found to hold.
    seen: HashSet<ServiceKey>,
    sets: Option<SetsRead>,
}

/// The read done: what is left to compare with it.
#[derive(Debug)]
struct Comparison {
    /// `kube-ipvs0`'s addresses as read, sorted.
    addresses: Vec<IpAddr>,
    /// The sets' members as read, sorted (empty when the sets were written whole).
    entries: Vec<NetfilterEntry>,
    /// How far the walks over `addresses` and `entries` have come.
    next_address: usize,
    next_entry: usize,
    /// What the mirror holds and the read lacks, the next last (seldom any).
    lacking: Vec<Item>,
    /// The chains are compared after everything else.
    rules_left: bool,
    /// When the read ended.
    read_done: Instant,
}

/// One object of the mirror's that the read lacks.
#[derive(Debug)]
enum Item {
    VirtualServer(ServiceKey),
    Address(IpAddr),
    Entry(NetfilterEntry),
}

/// The objects written since a read began: the read may predate them, so they are not
/// compared with it.
#[derive(Debug, Default)]
struct Touched {
    keys: HashSet<ServiceKey>,
    addresses: HashSet<IpAddr>,
    entries: HashSet<NetfilterEntry>,
}

/// How far one slice took the read.
enum Taken {
    /// Everything sent so far is compared; the reader goes on.
    Waiting,
    /// The slice's time is up.
    Sliced,
    /// The reader is done.
    Ended,
}

/// The netfilter writes one slice found.
#[derive(Default)]
struct SetWrites {
    added: Vec<NetfilterEntry>,
    removed: Vec<NetfilterEntry>,
    rules: Option<Vec<RuleInput>>,
}

/// Counts what one slice compared, and says when its time is up.
struct Slice {
    started: Instant,
    done: usize,
}

impl Slice {
    fn new() -> Slice {
        Slice {
            started: Instant::now(),
            done: 0,
        }
    }

    /// One more object compared; whether the slice's time is up.
    fn over(&mut self) -> bool {
        self.done += 1;
        self.done.is_multiple_of(STRIDE) && self.started.elapsed() >= SLICE
    }
}

/// How much nicer than the loop's thread the read's is.
const READ_NICENESS: libc::c_int = 10;

/// Lowers the calling thread's priority by [`READ_NICENESS`] (to at most 19), and with it
/// that of the threads and processes it starts, which inherit it: called first on the
/// threads that read the kernel for a periodic full sync (here, with the IPVS dump's
/// threads and `ipset save`; the fallback's, with `iptables-save`). Where the CPUs are busy
/// (two of them, the read's threads and tools on both), a change that arrives during the
/// read runs first, at the loop's CPU share, instead of waiting its turn behind the read;
/// an idle CPU still runs the read at full speed. A refusal leaves the priority as it was.
#[allow(
    unsafe_code,
    reason = "getpriority(2) and setpriority(2) have no safe wrapper in std"
)]
pub(crate) fn yield_to_the_loop() {
    // SAFETY: on Linux PRIO_PROCESS with `who` 0 reads and sets the calling thread's nice
    // value (the kernel's `current`), not the process's. No memory is passed. errno is
    // cleared first, as getpriority's -1 can be a value.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            return;
        }
        libc::setpriority(libc::PRIO_PROCESS, 0, (nice + READ_NICENESS).min(19));
    }
}

/// Runs the reads, sending what each found; on the reader's thread. A send fails only when
/// the loop dropped the read (a full sync began meanwhile): the IPVS read then stops early.
fn read(
    ipvs: Reader<(), ipvs::Error>,
    addresses: Reader<BTreeSet<IpAddr>>,
    netfilter: Reader<SetsRead>,
    to: &SyncSender<Read>,
) -> Result<(), SyncError> {
    let fail = |e| SyncError::new(None, e);
    let addresses = addresses().map_err(|e| fail(Error::ListAddresses(e)))?;
    if to.send(Read::Addresses(addresses)).is_err() {
        return Ok(());
    }
    ipvs().map_err(|e| fail(Error::ReadIpvs(e)))?;
    let mut sets = netfilter().map_err(|e| fail(Error::RestoreNetfilter(e)))?;
    sets.entries.sort_unstable();
    // The loop may be gone (a full sync began): nothing is left to do either way.
    let _ = to.send(Read::Sets(sets));
    Ok(())
}

/// The sink the IPVS reader hands each virtual server to: kept without its counters, in the
/// mirror's shape, on the reader's thread, and sent to the loop. Firewall-mark services are
/// never the proxy's.
fn server_sink(to: SyncSender<Read>) -> ServerSink {
    Box::new(move |entry| {
        if !matches!(entry.server.key, ServiceKey::Addr { .. }) {
            return true;
        }
        let server = KernelVs::read(entry.server, entry.real_servers.into_iter().collect());
        to.send(Read::Server(server)).is_ok()
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
        let (to, from) = mpsc::sync_channel(AHEAD);
        let (Some(ipvs), Some(addresses), Some(netfilter)) = (
            self.ipvs.reader(server_sink(to.clone())),
            self.addresses.reader(),
            self.netfilter.reader(rules.clone()),
        ) else {
            return false;
        };
        let spawned = std::thread::Builder::new()
            .name("kernel-read".into())
            .spawn(move || {
                yield_to_the_loop();
                read(ipvs, addresses, netfilter, &to)
            });
        match spawned {
            Ok(thread) => {
                tracing::debug!("full sync: reading the kernel off the loop's thread");
                let stream = Stream {
                    thread,
                    from,
                    addresses: BTreeSet::new(),
                    seen: HashSet::new(),
                    sets: None,
                };
                self.resync = Some(Resync {
                    stage: Stage::Reading(Box::new(stream)),
                    started: now,
                    next_poll: now + POLL,
                    rules,
                    touched: Touched::default(),
                    report: SyncReport {
                        services: self.services.len(),
                        ..SyncReport::default()
                    },
                    comparing: Duration::ZERO,
                    read_done: None,
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

    /// Compares one slice of what the reader sent, or of what is left once it is done, with
    /// the mirror, leaving out what was written since the read began, and writes what differs
    /// there. `None` while the read runs or objects are left to compare ([`Syncer::resync_due`]
    /// says when to call again); what the whole did when done.
    pub fn finish_resync(&mut self, now: Instant) -> Option<SyncReport> {
        let mut resync = self.resync.take()?;
        let mut slice = Slice::new();
        let mut p = Pending::default();
        let mut writes = SetWrites::default();
        let mut stage = resync.stage;
        // When to come back and where the comparison stands, or `None` when the whole is
        // done (or the read failed).
        let left = loop {
            stage = match stage {
                Stage::Reading(mut stream) => {
                    match self.take_read(&mut stream, &resync.touched, &mut p, &mut slice) {
                        Taken::Waiting => break Some((now + POLL, Stage::Reading(stream))),
                        Taken::Sliced => break Some((now, Stage::Reading(stream))),
                        Taken::Ended => match self.end_read(*stream, &mut resync.report) {
                            Some(comparison) => Stage::Comparing(Box::new(comparison)),
                            None => break None,
                        },
                    }
                }
                Stage::Comparing(mut comparison) => {
                    let (touched, rules) = (&resync.touched, &resync.rules);
                    let (p, writes, slice) = (&mut p, &mut writes, &mut slice);
                    if self.compare_rest(&mut comparison, touched, rules, p, writes, slice) {
                        break Some((now, Stage::Comparing(comparison)));
                    }
                    resync.read_done = Some(comparison.read_done);
                    break None;
                }
            };
        };
        let report = &mut resync.report;
        let SetWrites {
            added,
            removed,
            rules,
        } = writes;
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
        resync.comparing += slice.started.elapsed();
        if let Some((next, stage)) = left
            && !report.needs_full_sync()
        {
            resync.stage = stage;
            resync.next_poll = next;
            self.resync = Some(resync);
            return None;
        }
        let Some(read_done) = resync.read_done.filter(|_| !report.needs_full_sync()) else {
            // The read failed, or a write did as a whole: the next period runs a full sync.
            self.verified = false;
            return Some(self.end_resync(resync.report, resync.touched));
        };
        self.verified = true;
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
            compare_cpu_ms = ms(resync.comparing),
            "full sync checked the kernel"
        );
        Some(self.end_resync(resync.report, resync.touched))
    }

    /// The read and its comparison are dropped by now; with the writes noted meanwhile, what
    /// they held is released ([`super::SyncOptions::release_memory`]). What the whole did.
    fn end_resync(&self, report: SyncReport, touched: Touched) -> SyncReport {
        drop(touched);
        self.release_memory();
        report
    }

    /// Compares what the reader sent so far, as the slice's time allows.
    fn take_read(
        &mut self,
        stream: &mut Stream,
        touched: &Touched,
        p: &mut Pending,
        slice: &mut Slice,
    ) -> Taken {
        loop {
            match stream.from.try_recv() {
                Ok(Read::Addresses(addresses)) => stream.addresses = addresses,
                Ok(Read::Server(have)) => {
                    let key = have.server.key;
                    if self.kernel.contains_key(&key) {
                        stream.seen.insert(key);
                        self.compare_mirror(key, Some(&have), touched, p);
                    } else {
                        self.compare_kernel(key, &stream.addresses, touched, p);
                    }
                    if slice.over() {
                        return Taken::Sliced;
                    }
                }
                Ok(Read::Sets(sets)) => stream.sets = Some(sets),
                Err(TryRecvError::Empty) => return Taken::Waiting,
                Err(TryRecvError::Disconnected) => return Taken::Ended,
            }
        }
    }

    /// The reader is done: lists what is left to compare, or says why it cannot (the read
    /// failed: the report says so, and the next period runs a full sync).
    fn end_read(&mut self, stream: Stream, report: &mut SyncReport) -> Option<Comparison> {
        let failed = match stream.thread.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => {
                let panicked = std::io::Error::other("the kernel read panicked");
                Some(SyncError::new(
                    None,
                    Error::ReadIpvs(ipvs::Error::Io(panicked)),
                ))
            }
        };
        let read_done = Instant::now();
        let sets = stream.sets.filter(|_| failed.is_none());
        let Some(SetsRead { entries, sets }) = sets else {
            report.errors.extend(failed);
            return None;
        };
        let Stream {
            addresses, seen, ..
        } = stream;
        // A set of the proxy's missing: the sets are written whole, as a full sync writes them.
        let missing = self
            .rules
            .families
            .iter()
            .flat_map(|&f| KubeSet::ALL.map(|set| (f, set)))
            .any(|set| !sets.contains(&set));
        let mut lacking = Vec::new();
        let entries = if missing {
            match self.write_netfilter() {
                Ok(written) => report.set_entries_added = written,
                Err(e) => report
                    .errors
                    .push(SyncError::new(None, Error::RestoreNetfilter(e))),
            }
            Vec::new()
        } else {
            let is_lacking = |e: &&NetfilterEntry| {
                matches!(e, NetfilterEntry::Set { .. }) && entries.binary_search(e).is_err()
            };
            let wanted = self.set_refs.keys().filter(is_lacking);
            lacking.extend(wanted.cloned().map(Item::Entry));
            entries
        };
        let addresses: Vec<IpAddr> = addresses.into_iter().collect();
        let unbound = self.address_refs.keys();
        let unbound = unbound.filter(|ip| addresses.binary_search(ip).is_err());
        lacking.extend(unbound.copied().map(Item::Address));
        let unseen = self.kernel.keys().filter(|k| !seen.contains(k));
        lacking.extend(unseen.copied().map(Item::VirtualServer));
        drop(seen);
        Some(Comparison {
            addresses,
            entries,
            next_address: 0,
            next_entry: 0,
            lacking,
            rules_left: true,
            read_done,
        })
    }

    /// Compares what is left once the read is done, as the slice's time allows; whether some
    /// is still left.
    fn compare_rest(
        &mut self,
        comparison: &mut Comparison,
        touched: &Touched,
        rules_read: &[RuleInput],
        p: &mut Pending,
        writes: &mut SetWrites,
        slice: &mut Slice,
    ) -> bool {
        let c = comparison;
        while let Some(item) = c.lacking.pop() {
            match item {
                Item::VirtualServer(key) => self.compare_mirror(key, None, touched, p),
                Item::Address(ip) => self.compare_address(ip, &c.addresses, touched, p),
                Item::Entry(e) => self.compare_entry(&e, &c.entries, touched, writes),
            }
            if slice.over() {
                return true;
            }
        }
        while let Some(&ip) = c.addresses.get(c.next_address) {
            c.next_address += 1;
            self.compare_address(ip, &c.addresses, touched, p);
            if slice.over() {
                return true;
            }
        }
        while let Some(e) = c.entries.get(c.next_entry) {
            c.next_entry += 1;
            self.compare_entry(e, &c.entries, touched, writes);
            if slice.over() {
                return true;
            }
        }
        if std::mem::take(&mut c.rules_left) {
            let now_rules = self.rule_inputs();
            writes.rules = (now_rules != rules_read).then_some(now_rules);
        }
        false
    }

    /// One virtual server of the mirror, against what the kernel has of it (`have`): put back
    /// where the kernel lost or changed it or its real servers, its extra real servers deleted.
    fn compare_mirror(
        &mut self,
        key: ServiceKey,
        have: Option<&KernelVs>,
        touched: &Touched,
        p: &mut Pending,
    ) {
        if touched.keys.contains(&key) {
            return;
        }
        let Some(vs) = self.kernel.get(&key) else {
            return;
        };
        let owner = vs.owner.as_ref();
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
                None => p.push(Op::AddDest(key, want), owner),
                Some(found) if found != want => p.push(Op::UpdateDest(key, want), owner),
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

    /// One virtual server of the kernel's that the mirror does not hold: deleted if it is the
    /// proxy's (by `kube-ipvs0`'s addresses as read).
    fn compare_kernel(
        &self,
        key: ServiceKey,
        bound: &BTreeSet<IpAddr>,
        touched: &Touched,
        p: &mut Pending,
    ) {
        let ServiceKey::Addr { addr, .. } = key else {
            return;
        };
        let ours = bound.contains(&addr.ip()) || self.is_node_port(addr);
        if ours && !touched.keys.contains(&key) && !self.excluded(addr.ip()) {
            p.push(Op::DeleteService(key), None);
        }
    }

    /// One address: bound if a Service holds it, unbound otherwise.
    fn compare_address(&mut self, ip: IpAddr, read: &[IpAddr], touched: &Touched, p: &mut Pending) {
        if touched.addresses.contains(&ip) {
            return;
        }
        let bound = read.binary_search(&ip).is_ok();
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
        e: &NetfilterEntry,
        read: &[NetfilterEntry],
        touched: &Touched,
        writes: &mut SetWrites,
    ) {
        let NetfilterEntry::Set { family, .. } = e else {
            return;
        };
        if touched.entries.contains(e) || !self.rules.families.contains(family) {
            return;
        }
        match (self.set_refs.contains_key(e), read.binary_search(e).is_ok()) {
            (true, false) => writes.added.push(e.clone()),
            (false, true) => writes.removed.push(e.clone()),
            _ => {}
        }
    }
}
