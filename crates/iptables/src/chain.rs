//! Chain names and which of them belong to the proxy.
//!
//! The proxy owns a fixed list of KUBE-* chains plus the per-Service chains whose names start
//! with a hashed prefix (KUBE-SVC-, KUBE-SEP-, …). Everything else — built-in chains, a user's
//! chains, and the KUBE-* chains kubelet owns (KUBE-FIREWALL in filter, KUBE-KUBELET-CANARY,
//! KUBE-IPTABLES-HINT) — is never flushed or deleted. The iptables mode writes one of kubelet's
//! chains as kube-proxy does (filter's KUBE-FIREWALL, [`KUBELET_CHAINS_WRITTEN`]), and deletes
//! it never.

use crate::table::Table;

/// `KUBE-SERVICES` (nat and filter): the Services' entry chain, from PREROUTING and OUTPUT.
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
/// `KUBE-EXTERNAL-SERVICES` (filter, iptables mode).
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
/// `KUBE-FORWARD` (filter).
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
/// `KUBE-NODEPORTS` (iptables mode; ipvs mode spells it [`KUBE_NODE_PORT`]).
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
/// `KUBE-NODE-PORT` (ipvs mode).
pub const KUBE_NODE_PORT: &str = "KUBE-NODE-PORT";
/// `KUBE-PROXY-FIREWALL` (filter): loadBalancerSourceRanges.
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// `KUBE-POSTROUTING` (nat): SNAT of marked traffic.
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
/// `KUBE-MARK-MASQ` (nat): marks traffic for SNAT.
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
/// `KUBE-PROXY-CANARY` (iptables mode): tells kube-proxy its rules were flushed.
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// `KUBE-LOAD-BALANCER` (nat, ipvs mode).
pub const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
/// `KUBE-FIREWALL` in nat (ipvs mode); filter's KUBE-FIREWALL is kubelet's, which the
/// iptables mode also writes ([`KUBELET_CHAINS_WRITTEN`]).
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";
/// `KUBE-SOURCE-RANGES-FIREWALL` (filter, ipvs mode).
pub const KUBE_SOURCE_RANGES_FIREWALL: &str = "KUBE-SOURCE-RANGES-FIREWALL";
/// `KUBE-IPVS-FILTER` (filter, ipvs mode): a VIP answers only on its Services' ports.
pub const KUBE_IPVS_FILTER: &str = "KUBE-IPVS-FILTER";
/// `KUBE-IPVS-OUT-FILTER` (filter, ipvs mode): LoadBalancers the node may not reach.
pub const KUBE_IPVS_OUT_FILTER: &str = "KUBE-IPVS-OUT-FILTER";

/// Chains kube-proxy's iptables mode creates with fixed names, per table.
pub const IPTABLES_MODE_CHAINS: &[(Table, &str)] = &[
    (Table::Filter, KUBE_SERVICES),
    (Table::Filter, KUBE_EXTERNAL_SERVICES),
    (Table::Filter, KUBE_FORWARD),
    (Table::Filter, KUBE_NODEPORTS),
    (Table::Filter, KUBE_PROXY_FIREWALL),
    (Table::Nat, KUBE_SERVICES),
    (Table::Nat, KUBE_NODEPORTS),
    (Table::Nat, KUBE_POSTROUTING),
    (Table::Nat, KUBE_MARK_MASQ),
    (Table::Nat, KUBE_PROXY_CANARY),
    (Table::Filter, KUBE_PROXY_CANARY),
    (Table::Mangle, KUBE_PROXY_CANARY),
];

/// Chains kube-proxy's ipvs mode creates with fixed names, per table (its `iptablesChains`);
/// [`crate::ipvs_mode::ruleset`] writes each of them whole.
pub const IPVS_MODE_CHAINS: &[(Table, &str)] = &[
    (Table::Nat, KUBE_SERVICES),
    (Table::Nat, KUBE_POSTROUTING),
    (Table::Nat, KUBE_NODE_PORT),
    (Table::Nat, KUBE_LOAD_BALANCER),
    (Table::Nat, KUBE_MARK_MASQ),
    (Table::Filter, KUBE_FORWARD),
    (Table::Filter, KUBE_NODE_PORT),
    (Table::Filter, KUBE_PROXY_FIREWALL),
    (Table::Filter, KUBE_SOURCE_RANGES_FIREWALL),
    (Table::Filter, KUBE_IPVS_FILTER),
    (Table::Filter, KUBE_IPVS_OUT_FILTER),
];

/// Chains of kube-proxy's ipvs mode that the proxy owns but does not write: removed by
/// cleanup, never rewritten. In ipvs mode the nat table's KUBE-FIREWALL is kube-proxy's
/// (loadBalancerSourceRanges); the filter table's KUBE-FIREWALL is kubelet's and is not listed.
pub const IPVS_MODE_UNWRITTEN_CHAINS: &[(Table, &str)] = &[(Table::Nat, KUBE_FIREWALL)];

/// kubelet's chains that kube-proxy's iptables mode writes too: filter's KUBE-FIREWALL, whose
/// "block incoming localnet connections" rule it writes with `localhostNodePorts` (kubelet
/// writes the same rule). Written whole like the proxy's own chains, never deleted: kube-proxy's
/// cleanup leaves it to kubelet, and so does ours.
pub const KUBELET_CHAINS_WRITTEN: &[(Table, &str)] = &[(Table::Filter, KUBE_FIREWALL)];

/// Prefixes of the per-Service chains (names hashed from the service port name).
pub const SERVICE_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    // Written by kube-proxy before 1.25; removed on sight.
    "KUBE-XLB-",
];

/// The longest chain name the kernel accepts (XT_EXTENSION_MAXNAMELEN - 1).
pub const MAX_CHAIN_NAME_LEN: usize = 28;

/// Whether the chain `name` in `table` is one the proxy creates and may flush or delete.
#[must_use]
pub fn is_proxy_chain(table: Table, name: &str) -> bool {
    is_service_chain(name)
        || IPTABLES_MODE_CHAINS
            .iter()
            .chain(IPVS_MODE_CHAINS)
            .chain(IPVS_MODE_UNWRITTEN_CHAINS)
            .any(|&(t, n)| t == table && n == name)
}

/// Whether the proxy may write (flush and fill) the chain `name` in `table` and jump to it: its
/// own chains and [`KUBELET_CHAINS_WRITTEN`]. Only [`is_proxy_chain`]s are ever deleted.
#[must_use]
pub fn may_write_chain(table: Table, name: &str) -> bool {
    is_proxy_chain(table, name) || KUBELET_CHAINS_WRITTEN.contains(&(table, name))
}

/// Whether `name` is a per-Service chain (KUBE-SVC-…, KUBE-SEP-…, …).
#[must_use]
pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}
