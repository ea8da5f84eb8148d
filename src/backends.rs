//! The kernel backends the sync engine is handed: the `ipvs` handle and the ipvs-mode netfilter
//! state (ipsets, and the small iptables rule set that uses them); `kube-ipvs0` is netif's
//! `DummyLink` as it is.

use iptables::ipset::SetOp;
use iptables::ipvs_mode::{self, KubeSet, RuleInput};
use iptables::{Family, Runner, SetEntry, SetHeader, SetPatch};
use reconciler::sync::{
    BackendError, IpvsKernel, IpvsTable, NetfilterEntry, NetfilterKernel, Reader, ServerSink,
    SetsRead, WantedEntries,
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
        entries: &WantedEntries<'_>,
        rules: &[RuleInput],
    ) -> Result<(), BackendError> {
        let sets: Vec<(Family, KubeSet)> = rules
            .iter()
            .flat_map(|input| KubeSet::ALL.map(|set| (input.family, set)))
            .collect();
        let headers: Vec<SetHeader> = sets
            .iter()
            .map(|&(family, set)| set.header(family, entries.members(family, set)))
            .collect();
        let members = entries.iter().filter_map(|e| match e {
            NetfilterEntry::Set { family, set, entry } => {
                Some((sets.iter().position(|s| *s == (*family, *set))?, entry))
            }
            NetfilterEntry::NoNodeAccess { .. } => None,
        });
        let holds = |i: usize, entry: &SetEntry| {
            let (family, set) = sets[i];
            entries.contains(&NetfilterEntry::Set {
                family,
                set,
                entry: *entry,
            })
        };
        // Sets must exist before the rules that name them.
        self.0
            .ipset_restore_between(&self.0.ipset_save()?, &headers, members, holds)?;
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

    fn reader(&self, rules: Vec<RuleInput>) -> Option<Reader<SetsRead>> {
        let netfilter = KernelNetfilter(self.0.clone());
        Some(Box::new(move || {
            netfilter.write_rules(&rules)?;
            let mut entries = Vec::new();
            let headers = netfilter.0.ipset_save_each(&mut |header, entry| {
                if let Some((set, family)) = KubeSet::from_name(&header.name) {
                    entries.push(NetfilterEntry::Set { family, set, entry });
                }
            })?;
            let sets = headers.iter().filter_map(|h| KubeSet::from_name(&h.name));
            let sets = sets.map(|(set, family)| (family, set)).collect();
            Ok(SetsRead { entries, sets })
        }))
    }
}
