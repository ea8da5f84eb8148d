//! The kernel backends the sync engine is handed: the `ipvs` handle and the ipvs-mode netfilter
//! state (ipsets, and the small iptables rule set that uses them); `kube-ipvs0` is netif's
//! `DummyLink` as it is.

use std::collections::{BTreeMap, BTreeSet};

use iptables::ipset::SetOp;
use iptables::ipvs_mode::{self, KubeSet, RuleInput};
use iptables::{Family, IpSet, Runner, SetEntry, SetPatch};
use reconciler::sync::{
    BackendError, IpvsKernel, IpvsTable, NetfilterEntry, NetfilterKernel, Reader, ServerSink,
};

/// The real IPVS table.
#[derive(Debug)]
pub struct KernelIpvs(pub ipvs::Handle);

impl IpvsKernel for KernelIpvs {
    fn dump(&mut self) -> Result<IpvsTable, ipvs::Error> {
        self.0.dump()
    }

    fn reader(&self, each: ServerSink) -> Option<Reader<(), ipvs::Error>> {
        let timeout = self.0.timeout();
        Some(Box::new(move || {
            ipvs::Handle::with_timeout(timeout)?.dump_each(ipvs::DUMP_SOCKETS, each)
        }))
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

/// kube-proxy's ipvs-mode netfilter state: the KUBE-* ipsets and the fixed chains that match
/// on them. It only writes; the sync engine keeps what the sets hold and says when the chains
/// change.
#[derive(Debug)]
pub struct KernelNetfilter(pub Runner);

impl KernelNetfilter {
    /// Rewrites the proxy's chains of each family where they differ from `iptables-save`.
    fn write_rules(&self, rules: &[RuleInput]) -> Result<(), BackendError> {
        for input in rules {
            ipvs_mode::write_rules(&self.0, input)?;
        }
        Ok(())
    }
}

impl NetfilterKernel for KernelNetfilter {
    fn full(
        &mut self,
        entries: &BTreeSet<NetfilterEntry>,
        rules: &[RuleInput],
    ) -> Result<(), BackendError> {
        let mut sets: BTreeMap<(Family, KubeSet), BTreeSet<SetEntry>> = BTreeMap::new();
        for input in rules {
            for set in KubeSet::ALL {
                sets.insert((input.family, set), BTreeSet::new());
            }
        }
        for entry in entries {
            if let NetfilterEntry::Set { family, set, entry } = entry {
                sets.entry((*family, *set)).or_default().insert(*entry);
            }
        }
        let wanted: Vec<IpSet> = sets
            .iter()
            .map(|(&(f, set), e)| set.to_ipset(f, e))
            .collect();
        drop(sets);
        // Sets must exist before the rules that name them.
        let patch = SetPatch::between(&self.0.ipset_save()?, &wanted);
        self.0.ipset_restore(&patch)?;
        self.write_rules(rules)
    }

    fn partial(
        &mut self,
        added: &[NetfilterEntry],
        removed: &[NetfilterEntry],
        rules: Option<&[RuleInput]>,
    ) -> Result<(), BackendError> {
        let mut patch = SetPatch::default();
        for entry in removed {
            if let NetfilterEntry::Set { family, set, entry } = entry {
                patch.ops.push(SetOp::Del(set.name(*family), *entry));
            }
        }
        for entry in added {
            if let NetfilterEntry::Set { family, set, entry } = entry {
                patch.ops.push(SetOp::Add(set.name(*family), *entry));
            }
        }
        if !patch.is_empty() {
            self.0.ipset_restore(&patch)?;
        }
        if let Some(rules) = rules {
            self.write_rules(rules)?;
        }
        Ok(())
    }

    fn reader(&self, rules: Vec<RuleInput>) -> Option<Reader<Vec<IpSet>>> {
        let netfilter = KernelNetfilter(self.0.clone());
        Some(Box::new(move || {
            netfilter.write_rules(&rules)?;
            Ok(netfilter.0.ipset_save()?)
        }))
    }
}
