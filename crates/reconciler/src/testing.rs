//! In-memory kernels that answer as the real ones do (EEXIST, ESRCH, ENOENT, ...), for the
//! engine's tests and for benchmarks that run the real sync loop without a kernel
//! (`examples/bench_change.rs`). What they prove is proven against the real kernel in the VM
//! tests too. They check their callers as tests want: a netfilter write that removes an absent
//! entry panics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use iptables::ipvs_mode::{KubeSet, RuleInput};
use ipvs::{Connections, Op, RealServerEntry, Scheduler, ServiceKey, Stats, VirtualServer};

use crate::sync::{
    AddressKernel, BackendError, IpvsKernel, IpvsTable, NetfilterEntry, NetfilterKernel, Reader,
    ServerSink, SetsRead, WantedEntries,
};

/// A virtual server with its real servers.
pub type FakeVirtualServer = (VirtualServer, BTreeMap<SocketAddr, RealServerEntry>);

/// The IPVS table (`ipvsadm`).
#[derive(Debug, Default)]
pub struct FakeIpvs {
    /// Every virtual server with its real servers, by key. A hash table, as the kernel's
    /// (`ip_vs_svc_table`): a tree's search would put cache misses of its own into every
    /// operation of `bench change`, which the kernel does not make. Reads and `save` sort.
    pub table: HashMap<ServiceKey, FakeVirtualServer>,
    /// Every operation applied, as an `ipvsadm` line (none when `quiet`).
    pub log: Vec<String>,
    /// The size of each `apply` call.
    pub batches: Vec<usize>,
    /// Keep no log: a benchmark's millions of operations would fill memory and cost time.
    pub quiet: bool,
}

fn object(op: &Op) -> String {
    op.to_string()
}

impl IpvsKernel for FakeIpvs {
    fn dump(&mut self) -> Result<IpvsTable, ipvs::Error> {
        Ok(self.snapshot())
    }

    /// The table as it is when the read begins, handed over one virtual server at a time.
    fn reader(&self, each: ServerSink) -> Option<Reader<(), ipvs::Error>> {
        let table = self.snapshot();
        Some(Box::new(move || {
            for entry in table {
                let entry = ipvs::ConfigEntry {
                    server: entry.service.server,
                    real_servers: entry.real_servers.into_iter().map(|r| r.server).collect(),
                };
                if !each(entry) {
                    break;
                }
            }
            Ok(())
        }))
    }

    fn real_servers(&mut self, key: &ServiceKey) -> Result<Vec<RealServerEntry>, ipvs::Error> {
        Ok(self
            .table
            .get(key)
            .map(|(_, r)| r.values().cloned().collect())
            .unwrap_or_default())
    }

    fn apply(&mut self, ops: &[Op]) -> Vec<Result<(), ipvs::Error>> {
        self.batches.push(ops.len());
        ops.iter()
            .map(|op| {
                if !self.quiet {
                    self.log.push(op.to_string());
                }
                match op {
                    Op::AddService(vs) => {
                        if vs.scheduler == Scheduler::TwoRandomChoices {
                            return Err(ipvs::Error::SchedulerMissing {
                                object: object(op),
                                scheduler: "twos".into(),
                            });
                        }
                        if self.table.contains_key(&vs.key) {
                            return Err(ipvs::Error::AlreadyExists { object: object(op) });
                        }
                        self.table.insert(vs.key, (vs.clone(), BTreeMap::new()));
                    }
                    Op::UpdateService(vs) => {
                        if vs.scheduler == Scheduler::TwoRandomChoices {
                            return Err(ipvs::Error::SchedulerMissing {
                                object: object(op),
                                scheduler: "twos".into(),
                            });
                        }
                        let Some(e) = self.table.get_mut(&vs.key) else {
                            return Err(ipvs::Error::NoSuchService { object: object(op) });
                        };
                        e.0 = vs.clone();
                    }
                    Op::DeleteService(key) => {
                        if self.table.remove(key).is_none() {
                            return Err(ipvs::Error::NoSuchService { object: object(op) });
                        }
                    }
                    Op::AddDest(key, rs) | Op::UpdateDest(key, rs) => {
                        let Some(e) = self.table.get_mut(key) else {
                            return Err(ipvs::Error::NoSuchService { object: object(op) });
                        };
                        // One search of the real servers, as the kernel walks its list once.
                        match (op, e.1.get_mut(&rs.addr)) {
                            (Op::AddDest(..), Some(_)) => {
                                return Err(ipvs::Error::AlreadyExists { object: object(op) });
                            }
                            (Op::UpdateDest(..), None) => {
                                return Err(ipvs::Error::NoSuchDestination { object: object(op) });
                            }
                            (_, Some(have)) => have.server = *rs,
                            (_, None) => {
                                e.1.insert(
                                    rs.addr,
                                    RealServerEntry {
                                        server: *rs,
                                        connections: Connections::default(),
                                        stats: Stats::default(),
                                    },
                                );
                            }
                        }
                    }
                    Op::DeleteDest(key, addr) => {
                        let Some(e) = self.table.get_mut(key) else {
                            return Err(ipvs::Error::NoSuchService { object: object(op) });
                        };
                        if e.1.remove(addr).is_none() {
                            return Err(ipvs::Error::NoSuchDestination { object: object(op) });
                        }
                    }
                    _ => unreachable!("no other ops are made"),
                }
                Ok(())
            })
            .collect()
    }
}

impl FakeIpvs {
    /// The virtual servers in key order, as `ipvsadm -Sn` would list them here.
    fn sorted(&self) -> impl Iterator<Item = &FakeVirtualServer> {
        let mut all: Vec<&FakeVirtualServer> = self.table.values().collect();
        all.sort_unstable_by_key(|(vs, _)| vs.key);
        all.into_iter()
    }

    fn snapshot(&self) -> IpvsTable {
        self.sorted()
            .map(|(vs, r)| ipvs::TableEntry {
                service: ipvs::VirtualServerEntry {
                    server: vs.clone(),
                    stats: Stats::default(),
                },
                real_servers: r.values().cloned().collect(),
            })
            .collect()
    }

    /// The table as `ipvsadm -Sn` lines.
    #[must_use]
    pub fn save(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (vs, reals) in self.sorted() {
            out.push(vs.to_string());
            for r in reals.values() {
                out.push(r.server.line(&vs.key).to_string());
            }
        }
        out
    }

    /// Sets a real server's connection counts, as traffic would.
    pub fn set_connections(
        &mut self,
        key: &ServiceKey,
        addr: SocketAddr,
        active: u32,
        inactive: u32,
    ) {
        let entry = self.table.get_mut(key).unwrap().1.get_mut(&addr).unwrap();
        entry.connections = Connections {
            active,
            inactive,
            persistent: 0,
        };
    }
}

/// `kube-ipvs0`'s addresses.
#[derive(Debug, Default)]
pub struct FakeAddresses {
    /// The addresses bound.
    pub bound: BTreeSet<IpAddr>,
    /// How many add and remove calls were made.
    pub calls: usize,
}

impl AddressKernel for FakeAddresses {
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, BackendError> {
        Ok(self.bound.clone())
    }
    /// The addresses as they are when the read begins.
    fn reader(&self) -> Option<Reader<BTreeSet<IpAddr>>> {
        let bound = self.bound.clone();
        Some(Box::new(move || Ok(bound)))
    }
    fn add(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>> {
        self.calls += 1;
        addrs
            .iter()
            .map(|a| {
                self.bound.insert(*a);
                Ok(())
            })
            .collect()
    }
    fn remove(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>> {
        self.calls += 1;
        addrs
            .iter()
            .map(|a| {
                self.bound.remove(a);
                Ok(())
            })
            .collect()
    }
}

/// The ipsets and the ipvs-mode chains.
#[derive(Debug, Default)]
pub struct FakeNetfilter {
    /// What the sets and out-filter rules hold.
    pub entries: BTreeSet<NetfilterEntry>,
    /// How many full writes were made.
    pub full_syncs: usize,
    /// The rules of each write, as the chains would hold them.
    pub rule_writes: Vec<Vec<RuleInput>>,
}

impl NetfilterKernel for FakeNetfilter {
    fn full(
        &mut self,
        entries: &WantedEntries<'_>,
        rules: &[RuleInput],
    ) -> Result<(), BackendError> {
        self.full_syncs += 1;
        self.entries = entries.iter().cloned().collect();
        self.rule_writes.push(rules.to_vec());
        Ok(())
    }
    fn partial(
        &mut self,
        added: &[NetfilterEntry],
        removed: &[NetfilterEntry],
        rules: Option<&[RuleInput]>,
    ) -> Result<(), BackendError> {
        for e in removed {
            assert!(self.entries.remove(e), "removing an absent entry {e}");
        }
        for e in added {
            assert!(self.entries.insert(e.clone()), "adding a present entry {e}");
        }
        self.rule_writes.extend(rules.map(<[RuleInput]>::to_vec));
        Ok(())
    }
    /// Every set of the families of `rules` as it is when the read begins (the out-filter
    /// rules are chains, not sets; the chains' write is not recorded).
    fn reader(&self, rules: Vec<RuleInput>) -> Option<Reader<SetsRead>> {
        let read = SetsRead {
            entries: self
                .entries
                .iter()
                .filter(|e| matches!(e, NetfilterEntry::Set { .. }))
                .cloned()
                .collect(),
            sets: rules
                .iter()
                .flat_map(|r| KubeSet::ALL.map(|set| (r.family, set)))
                .collect(),
        };
        Some(Box::new(move || Ok(read)))
    }
}
