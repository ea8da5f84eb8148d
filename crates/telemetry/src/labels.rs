//! The label sets kube-proxy's metrics share.

use prometheus_client::encoding::EncodeLabelSet;

/// `ip_family`: which of kube-proxy's per-family proxiers a sample is of (`IPv4`, `IPv6`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IpFamilyLabel {
    pub ip_family: &'static str,
}

impl IpFamilyLabel {
    /// For a family by Kubernetes' name for it (`v1.IPFamily`).
    #[must_use]
    pub fn new(ip_family: &'static str) -> IpFamilyLabel {
        IpFamilyLabel { ip_family }
    }
}

/// `sync_proxy_rules_iptables_total`'s and `_last`'s: the table (`filter`, `nat`) and family.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: &'static str,
    pub ip_family: &'static str,
}

/// `sync_proxy_rules_no_local_endpoints_total`'s: the family, and which traffic policy
/// (`internal`, `external`) is Local.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    pub ip_family: &'static str,
    pub traffic_policy: &'static str,
}
