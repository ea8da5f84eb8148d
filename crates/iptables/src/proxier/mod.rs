//! kube-proxy's iptables mode, the fallback when IPVS is missing: KUBE-SERVICES → KUBE-SVC-* →
//! KUBE-SEP-* with `statistic` probabilities, KUBE-EXT-* / KUBE-SVL-* for the traffic policies,
//! KUBE-FW-* for loadBalancerSourceRanges, ClientIP affinity with `recent`, REJECT and DROP in
//! the filter table for Services without (local) endpoints.
//!
//! The input is plain data ([`ServiceSpec`], [`Backend`], [`ProxierConfig`]), not Kubernetes
//! objects; the reconciler converts its model. [`render`] is pure (what `plan` prints);
//! [`Proxier`] keeps what it last applied and sends only the chains that changed; its full
//! syncs compare every chain with the kernel ([`KernelChains`]) and write only those that
//! differ.

mod full;
mod kernel;
mod names;
mod render;
mod sync;

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

pub use kernel::{Fingerprint, KernelChains};
pub use names::{
    endpoint_chain, external_chain, firewall_chain, local_chain, name_hash, service_chain, sha256,
};
pub use render::{Rendered, ServiceRules, render, render_service};
pub use sync::{Proxier, RuleCounts, SyncPlan, SyncStats, service_name};

use crate::local::LocalDetector;
use crate::rule::Protocol;
use crate::table::Family;

/// One endpoint of a service port, with the conditions kube-proxy chooses by.
#[allow(
    clippy::struct_excessive_bools,
    reason = "EndpointSlice's own conditions, named as the API names them"
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Where DNAT sends traffic.
    pub addr: SocketAddr,
    /// EndpointSlice `ready`.
    pub ready: bool,
    /// EndpointSlice `serving`.
    pub serving: bool,
    /// EndpointSlice `terminating`.
    pub terminating: bool,
    /// The endpoint runs on this node.
    pub local: bool,
    /// The Service's topology hints let this node use it for Cluster traffic policies
    /// (kube-proxy's `availableForTopology`); true when the hints are not in use. The caller
    /// clears it only when another ready endpoint of the family keeps it set, as kube-proxy
    /// uses hints only then; Local policies ignore it.
    pub in_topology: bool,
}

impl Backend {
    /// A ready, serving endpoint.
    #[must_use]
    pub fn ready(addr: SocketAddr, local: bool) -> Backend {
        Backend {
            addr,
            ready: true,
            serving: true,
            terminating: false,
            local,
            in_topology: true,
        }
    }
}

/// One service port as the iptables proxier needs it (kube-proxy's `ServicePort` plus its
/// endpoints).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceSpec {
    /// kube-proxy's service port name: `namespace/name:port` (`namespace/name` when unnamed).
    pub name: String,
    /// The protocol.
    pub protocol: Protocol,
    /// The service port.
    pub port: u16,
    /// ClusterIPs (those of other families are ignored).
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`.
    pub source_ranges: Vec<IpNet>,
    /// The NodePort, if any.
    pub node_port: Option<u16>,
    /// `healthCheckNodePort` (externalTrafficPolicy=Local LoadBalancers).
    pub health_check_node_port: Option<u16>,
    /// ClientIP affinity timeout, when affinity is on.
    pub affinity_seconds: Option<u32>,
    /// externalTrafficPolicy=Local.
    pub external_local: bool,
    /// internalTrafficPolicy=Local.
    pub internal_local: bool,
    /// Every endpoint of the port; the proxier picks the usable ones.
    pub backends: Vec<Backend>,
}

impl ServiceSpec {
    /// A ClusterIP service port with no endpoints yet.
    #[must_use]
    pub fn cluster_ip(
        name: impl Into<String>,
        protocol: Protocol,
        ip: IpAddr,
        port: u16,
    ) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            protocol,
            port,
            cluster_ips: vec![ip],
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            node_port: None,
            health_check_node_port: None,
            affinity_seconds: None,
            external_local: false,
            internal_local: false,
            backends: Vec::new(),
        }
    }

    /// Whether traffic can reach this port from outside the cluster network.
    #[must_use]
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// The key the proxier tracks a service port by: name and protocol.
    #[must_use]
    pub fn key(&self) -> (String, Protocol) {
        (self.name.clone(), self.protocol)
    }
}

/// Node-wide settings of the iptables proxier (kube-proxy's flags of the same meaning).
#[allow(
    clippy::struct_excessive_bools,
    reason = "kube-proxy's own flags, each a yes or no"
)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxierConfig {
    /// The family this proxier programs (dual-stack runs one per family).
    pub family: Family,
    /// `--masquerade-bit` (default 14 → mark 0x4000).
    pub masquerade_bit: u8,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// How this family's pod traffic is told (`--detect-local-mode`): other sources to a
    /// ClusterIP are masqueraded, pod sources to an external destination short-circuit the
    /// Local policy. Neither rule is written without a detector.
    pub local: LocalDetector,
    /// `--iptables-localhost-nodeports`: NodePorts answer on 127.0.0.0/8 too (the daemon sets
    /// `route_localnet` for it), and KUBE-FIREWALL drops what reaches 127.0.0.0/8 from off the
    /// node. When false the jump to KUBE-NODEPORTS skips 127.0.0.0/8. As upstream, it applies
    /// to IPv4 only and not with `node_port_addresses` ([`ProxierConfig::localhost_node_ports`]).
    pub localhost_node_ports: bool,
    /// `--nodeport-addresses` resolved to this node's addresses of the family, one jump to
    /// KUBE-NODEPORTS each (none when no address matched); `None` when the flag is unset:
    /// every local address (`-m addrtype --dst-type LOCAL`).
    pub node_port_addresses: Option<Vec<IpAddr>>,
    /// MASQUERADE with `--random-fully` (iptables ≥ 1.6.2).
    pub random_fully: bool,
    /// Drop `ctstate INVALID` in KUBE-FORWARD (kube-proxy does unless
    /// `nf_conntrack_tcp_be_liberal` is set).
    pub drop_invalid: bool,
    /// Above this many endpoints in all, per-rule comments are left out (kube-proxy's
    /// large-cluster mode, 1000).
    pub large_cluster_endpoints: usize,
}

impl Default for ProxierConfig {
    fn default() -> Self {
        ProxierConfig {
            family: Family::V4,
            masquerade_bit: 14,
            masquerade_all: false,
            local: LocalDetector::NotImplemented,
            localhost_node_ports: true,
            node_port_addresses: None,
            random_fully: true,
            drop_invalid: true,
            large_cluster_endpoints: 1000,
        }
    }
}

impl ProxierConfig {
    /// Whether NodePorts answer on IPv4 loopback: `localhost_node_ports` for IPv4 with every
    /// local address serving NodePorts. Upstream turns it off when `--nodeport-addresses`
    /// leaves loopback out; ours never serves NodePorts on a loopback address it lists.
    #[must_use]
    pub fn localhost_node_ports(&self) -> bool {
        self.localhost_node_ports && self.family == Family::V4 && self.node_port_addresses.is_none()
    }
}
