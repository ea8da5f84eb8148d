//! The kernel backends the sync engine is handed: the `ipvs` handle, the `kube-ipvs0` link and
//! the ipvs-mode netfilter state (ipsets, and the small iptables rule set that uses them).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use iptables::ipset::SetOp;
use iptables::ipvs_mode::{self, KubeSet};
use iptables::{Family, Runner, SetEntry, SetPatch, Table};
use reconciler::model::Protocol;
use reconciler::plan::{Plan, PlanConfig};
use reconciler::sync::{AddressKernel, BackendError, IpvsKernel, NetfilterEntry, NetfilterKernel};

/// The real IPVS table.
#[derive(Debug)]
pub struct KernelIpvs(pub ipvs::Handle);

impl IpvsKernel for KernelIpvs {
    fn dump(
        &mut self,
    ) -> Result<Vec<(ipvs::VirtualServer, Vec<ipvs::RealServerEntry>)>, ipvs::Error> {
        Ok(self
            .0
            .dump()?
            .into_iter()
            .map(|e| (e.service.server, e.real_servers))
            .collect())
    }

    fn real_servers(
        &mut self,
        key: &ipvs::ServiceKey,
    ) -> Result<Vec<ipvs::RealServerEntry>, ipvs::Error> {
        self.0.real_servers(key)
    }

    fn apply(&mut self, ops: &[ipvs::Op]) -> Vec<Result<(), ipvs::Error>> {
        self.0.apply(ops)
    }
}

/// The real `kube-ipvs0`.
#[derive(Debug)]
pub struct KernelAddresses(pub netif::DummyLink);

fn per_address(
    addrs: &[IpAddr],
    result: Result<Vec<netif::AddressResult>, netif::Error>,
) -> Vec<Result<(), BackendError>> {
    match result {
        Ok(results) => results
            .into_iter()
            .map(|r| r.map(drop).map_err(Into::into))
            .collect(),
        Err(e) => {
            let message = e.to_string();
            addrs.iter().map(|_| Err(message.clone().into())).collect()
        }
    }
}

impl AddressKernel for KernelAddresses {
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, BackendError> {
        Ok(self.0.addresses()?)
    }

    fn add(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>> {
        if addrs.is_empty() {
            return Vec::new();
        }
        let result = self.0.add(addrs);
        per_address(addrs, result)
    }

    fn remove(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>> {
        if addrs.is_empty() {
            return Vec::new();
        }
        let result = self.0.remove(addrs);
        per_address(addrs, result)
    }
}

/// kube-proxy's ipvs-mode netfilter state: the KUBE-* ipsets and the fixed chains that match
/// on them. Member changes are `ipset add`/`del` lines in one `ipset restore`; the chains are
/// rewritten only when what they imply changes (a set turns empty or non-empty, a
/// LoadBalancer out-filter comes or goes), and on every full sync.
#[derive(Debug)]
pub struct IpvsNetfilter {
    runner: Runner,
    config: PlanConfig,
    sets: BTreeMap<(Family, KubeSet), BTreeSet<SetEntry>>,
    no_node_access: BTreeSet<(IpAddr, Protocol, u16)>,
}

impl IpvsNetfilter {
    #[must_use]
    pub fn new(runner: Runner, config: PlanConfig) -> Self {
        IpvsNetfilter {
            runner,
            config,
            sets: BTreeMap::new(),
            no_node_access: BTreeSet::new(),
        }
    }

    fn as_plan(&self) -> Plan {
        let mut plan = Plan::empty(&self.config.families);
        for (key, entries) in &self.sets {
            plan.sets.insert(*key, entries.clone());
        }
        plan.lb_no_node_access.clone_from(&self.no_node_access);
        plan
    }

    /// Rewrites the proxy's chains of every family; jumps from built-in chains are added only
    /// where `iptables-save` does not show them already.
    fn write_rules(&self) -> Result<(), BackendError> {
        let plan = self.as_plan();
        for &family in &self.config.families {
            let mut ruleset = ipvs_mode::ruleset(&plan.rule_input(&self.config, family));
            let saved = self.runner.save(family, None)?;
            for table in [Table::Nat, Table::Filter, Table::Mangle, Table::Raw] {
                let Some(patch) = ruleset.tables.get_mut(&table) else {
                    continue;
                };
                let jumps = std::mem::take(&mut patch.insert_jumps);
                saved.add_missing_jumps(table, &jumps, &mut ruleset);
            }
            self.runner.apply(family, &ruleset)?;
        }
        Ok(())
    }

    fn emptiness(&self) -> BTreeSet<(Family, KubeSet)> {
        self.sets
            .iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(k, _)| *k)
            .collect()
    }
}

impl NetfilterKernel for IpvsNetfilter {
    fn full(&mut self, entries: &BTreeSet<NetfilterEntry>) -> Result<(), BackendError> {
        self.sets.clear();
        for &family in &self.config.families {
            for set in KubeSet::ALL {
                self.sets.insert((family, set), BTreeSet::new());
            }
        }
        self.no_node_access.clear();
        for entry in entries {
            match entry {
                NetfilterEntry::Set { family, set, entry } => {
                    self.sets.entry((*family, *set)).or_default().insert(*entry);
                }
                NetfilterEntry::NoNodeAccess { ip, protocol, port } => {
                    self.no_node_access.insert((*ip, *protocol, *port));
                }
            }
        }
        // Each set is refilled in a twin and swapped in, so traffic never meets a half-filled
        // set; sets must exist before the rules that name them.
        // `create` of an existing set with other parameters fails even with -exist: create only
        // what is missing, and clear a twin a killed run may have left.
        let existing: BTreeSet<String> = self.runner.ipset_names()?.into_iter().collect();
        let mut patch = SetPatch::default();
        for (&(family, set), entries) in &self.sets {
            patch.refill(&existing, &set.to_ipset(family, entries));
        }
        self.runner.ipset_restore(&patch)?;
        self.write_rules()
    }

    fn partial(
        &mut self,
        added: &[NetfilterEntry],
        removed: &[NetfilterEntry],
    ) -> Result<(), BackendError> {
        let before = (self.emptiness(), self.no_node_access.clone());
        let mut patch = SetPatch::default();
        for entry in removed {
            match entry {
                NetfilterEntry::Set { family, set, entry } => {
                    if let Some(s) = self.sets.get_mut(&(*family, *set)) {
                        s.remove(entry);
                    }
                    patch.ops.push(SetOp::Del(set.name(*family), *entry));
                }
                NetfilterEntry::NoNodeAccess { ip, protocol, port } => {
                    self.no_node_access.remove(&(*ip, *protocol, *port));
                }
            }
        }
        for entry in added {
            match entry {
                NetfilterEntry::Set { family, set, entry } => {
                    self.sets.entry((*family, *set)).or_default().insert(*entry);
                    patch.ops.push(SetOp::Add(set.name(*family), *entry));
                }
                NetfilterEntry::NoNodeAccess { ip, protocol, port } => {
                    self.no_node_access.insert((*ip, *protocol, *port));
                }
            }
        }
        if !patch.is_empty() {
            self.runner.ipset_restore(&patch)?;
        }
        if (self.emptiness(), self.no_node_access.clone()) != before {
            self.write_rules()?;
        }
        Ok(())
    }
}

impl reconciler::engine::Reconfigure for IpvsNetfilter {
    /// Node facts changed (addresses, families): the next full sync renders with these.
    fn reconfigure(&mut self, config: &PlanConfig) {
        self.config = config.clone();
    }
}
