//! Chain names and which of them belong to the proxy.
//!
//! The proxy owns a fixed list of KUBE-* chains plus the per-Service chains whose names start
//! with a hashed prefix (KUBE-SVC-, KUBE-SEP-, …). Everything else — built-in chains, a user's
//! chains, and the KUBE-* chains kubelet owns (KUBE-FIREWALL in filter, KUBE-KUBELET-CANARY,
//! KUBE-IPTABLES-HINT) — is never flushed or deleted.

use crate::table::Table;

/// Chains kube-proxy's iptables mode creates with fixed names, per table.
pub const IPTABLES_MODE_CHAINS: &[(Table, &str)] = &[
    (Table::Filter, "KUBE-SERVICES"),
    (Table::Filter, "KUBE-EXTERNAL-SERVICES"),
    (Table::Filter, "KUBE-FORWARD"),
    (Table::Filter, "KUBE-NODEPORTS"),
    (Table::Filter, "KUBE-PROXY-FIREWALL"),
    (Table::Nat, "KUBE-SERVICES"),
    (Table::Nat, "KUBE-NODEPORTS"),
    (Table::Nat, "KUBE-POSTROUTING"),
    (Table::Nat, "KUBE-MARK-MASQ"),
    (Table::Nat, "KUBE-PROXY-CANARY"),
    (Table::Filter, "KUBE-PROXY-CANARY"),
    (Table::Mangle, "KUBE-PROXY-CANARY"),
];

/// Chains kube-proxy's ipvs mode creates with fixed names, per table.
pub const IPVS_MODE_CHAINS: &[(Table, &str)] = &[
    (Table::Nat, "KUBE-SERVICES"),
    (Table::Nat, "KUBE-POSTROUTING"),
    (Table::Nat, "KUBE-NODE-PORT"),
    (Table::Nat, "KUBE-LOAD-BALANCER"),
    (Table::Nat, "KUBE-MARK-MASQ"),
    // In ipvs mode the nat table's KUBE-FIREWALL is kube-proxy's (loadBalancerSourceRanges);
    // the filter table's KUBE-FIREWALL is kubelet's and is not listed.
    (Table::Nat, "KUBE-FIREWALL"),
    (Table::Filter, "KUBE-FORWARD"),
    (Table::Filter, "KUBE-NODE-PORT"),
    (Table::Filter, "KUBE-PROXY-FIREWALL"),
    (Table::Filter, "KUBE-SOURCE-RANGES-FIREWALL"),
    (Table::Filter, "KUBE-IPVS-FILTER"),
    (Table::Filter, "KUBE-IPVS-OUT-FILTER"),
];

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
            .any(|&(t, n)| t == table && n == name)
}

/// Whether `name` is a per-Service chain (KUBE-SVC-…, KUBE-SEP-…, …).
#[must_use]
pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}
