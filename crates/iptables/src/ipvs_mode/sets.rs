//! The KUBE-* ipsets of kube-proxy's ipvs mode, with kube-proxy's names, types and comments
//! (pkg/proxy/ipvs/ipset.go), so `ipset list` and runbooks read the same. These are the only
//! sets the proxy owns ([`is_proxy_set`]).

use std::collections::BTreeSet;

use crate::ipset::{IpSet, MAX_SET_NAME_LEN, SetEntry, SetHeader, SetType};
use crate::rule::Protocol;
use crate::table::Family;

/// Whether `name` is a set the proxy owns: one of kube-proxy's ipvs-mode sets
/// ([`KubeSet`], IPv4 `KUBE-…` or IPv6 `KUBE-6-…`), or its temporary swap twin (`KUBE~…`).
#[must_use]
pub fn is_proxy_set(name: &str) -> bool {
    name.strip_prefix("KUBE-")
        .or_else(|| name.strip_prefix("KUBE~"))
        .and_then(KubeSet::from_suffix)
        .is_some()
}

/// One of the ipvs-mode sets. Order is kube-proxy's `ipsetInfo` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KubeSet {
    LoopBack,
    ClusterIp,
    ExternalIp,
    ExternalIpLocal,
    LoadBalancer,
    LoadBalancerFw,
    LoadBalancerLocal,
    LoadBalancerSourceIp,
    LoadBalancerSourceCidr,
    NodePortTcp,
    NodePortLocalTcp,
    NodePortUdp,
    NodePortLocalUdp,
    NodePortSctp,
    NodePortLocalSctp,
    HealthCheckNodePort,
    IpvsIps,
}

impl KubeSet {
    /// Every set, in kube-proxy's order.
    pub const ALL: [KubeSet; 17] = [
        KubeSet::LoopBack,
        KubeSet::ClusterIp,
        KubeSet::ExternalIp,
        KubeSet::ExternalIpLocal,
        KubeSet::LoadBalancer,
        KubeSet::LoadBalancerFw,
        KubeSet::LoadBalancerLocal,
        KubeSet::LoadBalancerSourceIp,
        KubeSet::LoadBalancerSourceCidr,
        KubeSet::NodePortTcp,
        KubeSet::NodePortLocalTcp,
        KubeSet::NodePortUdp,
        KubeSet::NodePortLocalUdp,
        KubeSet::NodePortSctp,
        KubeSet::NodePortLocalSctp,
        KubeSet::HealthCheckNodePort,
        KubeSet::IpvsIps,
    ];

    /// The IPv4 name.
    #[must_use]
    pub fn base_name(self) -> &'static str {
        match self {
            KubeSet::LoopBack => "KUBE-LOOP-BACK",
            KubeSet::ClusterIp => "KUBE-CLUSTER-IP",
            KubeSet::ExternalIp => "KUBE-EXTERNAL-IP",
            KubeSet::ExternalIpLocal => "KUBE-EXTERNAL-IP-LOCAL",
            KubeSet::LoadBalancer => "KUBE-LOAD-BALANCER",
            KubeSet::LoadBalancerFw => "KUBE-LOAD-BALANCER-FW",
            KubeSet::LoadBalancerLocal => "KUBE-LOAD-BALANCER-LOCAL",
            KubeSet::LoadBalancerSourceIp => "KUBE-LOAD-BALANCER-SOURCE-IP",
            KubeSet::LoadBalancerSourceCidr => "KUBE-LOAD-BALANCER-SOURCE-CIDR",
            KubeSet::NodePortTcp => "KUBE-NODE-PORT-TCP",
            KubeSet::NodePortLocalTcp => "KUBE-NODE-PORT-LOCAL-TCP",
            KubeSet::NodePortUdp => "KUBE-NODE-PORT-UDP",
            KubeSet::NodePortLocalUdp => "KUBE-NODE-PORT-LOCAL-UDP",
            KubeSet::NodePortSctp => "KUBE-NODE-PORT-SCTP-HASH",
            KubeSet::NodePortLocalSctp => "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
            KubeSet::HealthCheckNodePort => "KUBE-HEALTH-CHECK-NODE-PORT",
            KubeSet::IpvsIps => "KUBE-IPVS-IPS",
        }
    }

    /// The name in `family`: IPv6 sets are `KUBE-6-…`, cut to the kernel's 31 characters, as
    /// kube-proxy names them (`KUBE-6-LOAD-BALANCER-SOURCE-CID`).
    #[must_use]
    pub fn name(self, family: Family) -> String {
        match family {
            Family::V4 => self.base_name().to_owned(),
            Family::V6 => {
                let mut n = self.base_name().replacen("KUBE-", "KUBE-6-", 1);
                n.truncate(MAX_SET_NAME_LEN);
                n
            }
        }
    }

    /// The set and family a name is (the inverse of [`KubeSet::name`]), if it is one of these.
    #[must_use]
    pub fn from_name(name: &str) -> Option<(KubeSet, Family)> {
        KubeSet::from_suffix(name.strip_prefix("KUBE-")?)
    }

    /// The set and family of a name without its `KUBE-` (or a swap twin's `KUBE~`) prefix.
    pub(crate) fn from_suffix(suffix: &str) -> Option<(KubeSet, Family)> {
        let base = |set: KubeSet| &set.base_name()["KUBE-".len()..];
        if let Some(found) = KubeSet::ALL.into_iter().find(|&set| base(set) == suffix) {
            return Some((found, Family::V4));
        }
        let rest = suffix.strip_prefix("6-")?;
        // An IPv6 name is cut to the kernel's length, as in `name`.
        let room = MAX_SET_NAME_LEN - "KUBE-6-".len();
        KubeSet::ALL
            .into_iter()
            .find(|&set| {
                let base = base(set);
                &base[..base.len().min(room)] == rest
            })
            .map(|set| (set, Family::V6))
    }

    /// The protocol of a NodePort set (`KUBE-NODE-PORT-TCP`, `KUBE-NODE-PORT-LOCAL-SCTP-HASH`, …).
    #[must_use]
    pub fn node_port_protocol(self) -> Option<Protocol> {
        match self {
            KubeSet::NodePortTcp | KubeSet::NodePortLocalTcp => Some(Protocol::Tcp),
            KubeSet::NodePortUdp | KubeSet::NodePortLocalUdp => Some(Protocol::Udp),
            KubeSet::NodePortSctp | KubeSet::NodePortLocalSctp => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The ipset type.
    #[must_use]
    pub fn set_type(self) -> SetType {
        match self {
            KubeSet::LoopBack | KubeSet::LoadBalancerSourceIp => SetType::HashIpPortIp,
            KubeSet::LoadBalancerSourceCidr => SetType::HashIpPortNet,
            KubeSet::NodePortTcp
            | KubeSet::NodePortLocalTcp
            | KubeSet::NodePortUdp
            | KubeSet::NodePortLocalUdp
            | KubeSet::HealthCheckNodePort => SetType::BitmapPort,
            KubeSet::IpvsIps => SetType::HashIp,
            _ => SetType::HashIpPort,
        }
    }

    /// kube-proxy's comment, used in the iptables rules that match the set.
    #[must_use]
    pub fn comment(self) -> &'static str {
        match self {
            KubeSet::LoopBack => {
                "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"
            }
            KubeSet::ClusterIp => "Kubernetes service cluster ip + port for masquerade purpose",
            KubeSet::ExternalIp => {
                "Kubernetes service external ip + port for masquerade and filter purpose"
            }
            KubeSet::ExternalIpLocal => {
                "Kubernetes service external ip + port with externalTrafficPolicy=local"
            }
            KubeSet::LoadBalancer => "Kubernetes service lb portal",
            KubeSet::LoadBalancerFw => {
                "Kubernetes service load balancer ip + port for load balancer with sourceRange"
            }
            KubeSet::LoadBalancerLocal => {
                "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"
            }
            KubeSet::LoadBalancerSourceIp => {
                "Kubernetes service load balancer ip + port + source IP for packet filter purpose"
            }
            KubeSet::LoadBalancerSourceCidr => {
                "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"
            }
            KubeSet::NodePortTcp => "Kubernetes nodeport TCP port for masquerade purpose",
            KubeSet::NodePortLocalTcp => {
                "Kubernetes nodeport TCP port with externalTrafficPolicy=local"
            }
            KubeSet::NodePortUdp => "Kubernetes nodeport UDP port for masquerade purpose",
            KubeSet::NodePortLocalUdp => {
                "Kubernetes nodeport UDP port with externalTrafficPolicy=local"
            }
            KubeSet::NodePortSctp => {
                "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"
            }
            KubeSet::NodePortLocalSctp => {
                "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"
            }
            KubeSet::HealthCheckNodePort => "Kubernetes health check node port",
            KubeSet::IpvsIps => "Addresses on the ipvs interface",
        }
    }

    /// The set's `create` parameters for `len` members, sized from them as [`KubeSet::to_ipset`]
    /// sizes a set.
    #[must_use]
    pub fn header(self, family: Family, len: usize) -> SetHeader {
        SetHeader::sized(self.name(family), self.set_type(), family, len)
    }

    /// The set with its entries, sized from them (no fixed 65536 cap).
    #[must_use]
    pub fn to_ipset(self, family: Family, entries: &BTreeSet<SetEntry>) -> IpSet {
        IpSet {
            header: self.header(family, entries.len()),
            entries: entries.clone(),
        }
    }
}

/// The NodePorts the proxy serves, from its sets as `ipset save` read them:
/// `(protocol, port)`. `--cleanup` deletes the virtual servers on them.
#[must_use]
pub fn node_ports(sets: &[IpSet]) -> BTreeSet<(Protocol, u16)> {
    sets.iter()
        .filter_map(|set| Some((KubeSet::from_name(set.name())?.0.node_port_protocol()?, set)))
        // bitmap:port entries are `30080`; the SCTP hash sets' are `10.0.0.1,sctp:30080`.
        .flat_map(|(protocol, set)| {
            set.entries.iter().filter_map(move |entry| match entry {
                SetEntry::Port(port) | SetEntry::IpPort(_, _, port) => Some((protocol, *port)),
                _ => None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_set_names_are_kube_proxys_truncated_names() {
        assert_eq!(KubeSet::ClusterIp.name(Family::V6), "KUBE-6-CLUSTER-IP");
        assert_eq!(
            KubeSet::LoadBalancerSourceCidr.name(Family::V6),
            "KUBE-6-LOAD-BALANCER-SOURCE-CID"
        );
        for set in KubeSet::ALL {
            assert!(set.name(Family::V6).len() <= 31);
        }
    }

    #[test]
    fn every_name_reads_back_as_its_set_and_family() {
        for set in KubeSet::ALL {
            for family in Family::ALL {
                assert_eq!(KubeSet::from_name(&set.name(family)), Some((set, family)));
            }
        }
        assert_eq!(KubeSet::from_name("KUBE-6-LOAD-BALANCER-SOURCE"), None);
        assert_eq!(KubeSet::from_name("KUBE-6-LOAD-BALANCER-SOURCE-CIDR"), None);
        assert_eq!(KubeSet::from_name("KUBE-SOMETHING-ELSE"), None);
        assert_eq!(KubeSet::from_name("my-blocklist"), None);
    }
}
