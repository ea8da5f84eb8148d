//! The proxy's own model of the cluster: what kube-proxy calls a `ServicePort` and an
//! `Endpoint`, plus the facts about this node. No Kubernetes types: the controllers convert
//! API objects into these.
//!
//! Strings are shared (`Arc<str>`) and per-Service address lists are shared between the ports
//! of one Service (`Arc<[..]>`), so 10,000 Services × 10 endpoints stay a few megabytes.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use ipnet::IpNet;

pub use ipvs::Scheduler;

pub use inet::Protocol;

/// A Service's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceName {
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one Service: kube-proxy's `ServicePortName` (namespace/name:port, protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub service: ServiceName,
    /// The port's name; empty for a Service's single unnamed port.
    pub port: Arc<str>,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// As kube-proxy prints it: `ns/name:port` (`ns/name` when the port has no name).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// `spec.type`, for the types a proxy programs (ExternalName is never converted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum ServiceType {
    #[default]
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// `sessionAffinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum SessionAffinity {
    #[default]
    None,
    /// `ClientIP`, with `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800).
    ClientIp { timeout_seconds: u32 },
}

impl SessionAffinity {
    /// kube-proxy's default sticky time: three hours.
    pub const DEFAULT_TIMEOUT_SECONDS: u32 = 10_800;
}

/// The scheduler a Service asks for through an annotation.
///
/// Kept unresolved in the model so that the planner, which picks the scheduler, is the one
/// place that reports an unknown name (naming the Service) and falls back to the default.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum SchedulerChoice {
    /// No annotation: `--ipvs-scheduler`.
    #[default]
    Default,
    /// A scheduler the kernel knows.
    Named(Scheduler),
    /// An annotation the kernel would not understand; the raw value, for the report.
    Unknown(Arc<str>),
}

impl SchedulerChoice {
    /// Parses an annotation value (surrounding white space ignored).
    #[must_use]
    pub fn from_annotation(value: &str) -> Self {
        match value.trim().parse::<Scheduler>() {
            Ok(s) => SchedulerChoice::Named(s),
            Err(_) => SchedulerChoice::Unknown(value.into()),
        }
    }
}

/// The one empty address list every Service without external IPs (or load-balancer ingress
/// IPs) shares: an empty `Arc<[_]>` of its own still allocates its counts, 32 bytes a list.
static NO_ADDRESSES: LazyLock<Arc<[IpAddr]>> = LazyLock::new(|| Arc::from([]));
/// The same for the source ranges, which most Services leave empty.
static NO_NETWORKS: LazyLock<Arc<[IpNet]>> = LazyLock::new(|| Arc::from([]));

/// `list` as a Service's shared address list ([`NO_ADDRESSES`] when empty).
#[must_use]
pub fn address_list(list: Vec<IpAddr>) -> Arc<[IpAddr]> {
    shared_or_empty(list, &NO_ADDRESSES)
}

/// `list` as a Service's shared list of source ranges ([`NO_NETWORKS`] when empty).
#[must_use]
pub fn network_list(list: Vec<IpNet>) -> Arc<[IpNet]> {
    shared_or_empty(list, &NO_NETWORKS)
}

/// `list` as a shared list, or `empty`'s when it has nothing.
fn shared_or_empty<T>(list: Vec<T>, empty: &LazyLock<Arc<[T]>>) -> Arc<[T]> {
    if list.is_empty() {
        Arc::clone(empty)
    } else {
        list.into()
    }
}

/// One (Service, port): everything the proxy programs for it.
///
/// Address lists are per Service, shared by its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub service_type: ServiceType,
    /// `spec.ports[].port`.
    pub port: u16,
    /// `spec.clusterIPs`: one per family, primary first.
    pub cluster_ips: Arc<[IpAddr]>,
    /// `spec.externalIPs`.
    pub external_ips: Arc<[IpAddr]>,
    /// `status.loadBalancer.ingress[].ip` (VIP mode only: `ipMode: Proxy` ingresses are left out).
    pub load_balancer_ips: Arc<[IpAddr]>,
    /// `spec.loadBalancerSourceRanges`.
    pub load_balancer_source_ranges: Arc<[IpNet]>,
    /// `spec.ports[].nodePort`, for NodePort and LoadBalancer types.
    pub node_port: Option<u16>,
    /// `spec.healthCheckNodePort` (LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
    pub session_affinity: SessionAffinity,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub scheduler: SchedulerChoice,
}

impl ServicePort {
    /// A plain ClusterIP port: no external addresses, no affinity, Cluster traffic policies,
    /// the default scheduler.
    #[must_use]
    pub fn cluster_ip(name: ServicePortName, port: u16, cluster_ips: &[IpAddr]) -> ServicePort {
        ServicePort {
            name,
            service_type: ServiceType::ClusterIp,
            port,
            cluster_ips: cluster_ips.into(),
            external_ips: NO_ADDRESSES.clone(),
            load_balancer_ips: NO_ADDRESSES.clone(),
            load_balancer_source_ranges: NO_NETWORKS.clone(),
            node_port: None,
            health_check_node_port: None,
            session_affinity: SessionAffinity::None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            scheduler: SchedulerChoice::Default,
        }
    }

    /// Whether traffic from outside the cluster can reach it (externalIPs, LoadBalancer IPs or
    /// a NodePort): only then does `externalTrafficPolicy` mean anything.
    #[must_use]
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// `externalTrafficPolicy: Local` on a Service that is externally reachable.
    #[must_use]
    pub fn external_policy_local(&self) -> bool {
        self.externally_accessible() && self.external_traffic_policy == TrafficPolicy::Local
    }

    /// `internalTrafficPolicy: Local`.
    #[must_use]
    pub fn internal_policy_local(&self) -> bool {
        self.internal_traffic_policy == TrafficPolicy::Local
    }
}

/// The conditions of an endpoint (`endpoints[].conditions`), with the API's defaults applied
/// (a missing `ready` or `serving` is true, a missing `terminating` false).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "the three EndpointSlice conditions"
)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions {
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

/// `endpoints[].hints`: the zones and nodes the EndpointSlice controller meant an endpoint for
/// (it sets them for `trafficDistribution` and the `topology-mode` annotation; the proxy reads
/// only the hints, as kube-proxy does).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hints {
    /// `forZones[].name`.
    pub zones: Box<[Arc<str>]>,
    /// `forNodes[].name` (`trafficDistribution: PreferSameNode`).
    pub nodes: Box<[Arc<str>]>,
}

/// Where an endpoint runs: `endpoints[].nodeName` and `endpoints[].zone`. A cluster has about
/// as many pairs as nodes, so the sources keep one shared copy of each
/// (`controllers::intern`), and an endpoint one pointer for both.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Placement {
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
}

impl Placement {
    /// A placement of its own on `node` in `zone` (the sources share theirs); `None` when
    /// neither is known.
    #[must_use]
    pub fn of(node: Option<&str>, zone: Option<&str>) -> Option<Arc<Placement>> {
        (node.is_some() || zone.is_some()).then(|| {
            Arc::new(Placement {
                node: node.map(Into::into),
                zone: zone.map(Into::into),
            })
        })
    }
}

/// One backend address of one port: kube-proxy's `Endpoint`.
///
/// 40 bytes: at 10,000 Services × 10 endpoints the model holds 100,000 of them, and a change
/// reads and drops a slice's worth.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub conditions: Conditions,
    /// Its node, which decides whether the endpoint is local to this node, and its zone;
    /// `None` when the slice names neither.
    pub placement: Option<Arc<Placement>>,
    /// Its topology hints; `None` without any (most endpoints, and no allocation for them).
    /// Shared by the endpoints of a slice that have the same hints, and by the slice's ports.
    pub hints: Option<Arc<Hints>>,
}

impl Endpoint {
    /// `endpoints[].nodeName`.
    #[must_use]
    pub fn node_name(&self) -> Option<&str> {
        self.placement.as_deref()?.node.as_deref()
    }

    /// `endpoints[].zone`.
    #[must_use]
    pub fn zone(&self) -> Option<&str> {
        self.placement.as_deref()?.zone.as_deref()
    }

    /// Whether it runs on the node named `node`.
    #[must_use]
    pub fn is_local(&self, node: &str) -> bool {
        self.node_name() == Some(node)
    }

    /// Whether it runs on `node` and is ready: what kube-proxy counts as a local endpoint for
    /// its health checks and its no-local-endpoints metric.
    #[must_use]
    pub fn is_local_and_ready(&self, node: &str) -> bool {
        self.is_local(node) && self.conditions.ready
    }

    /// `hints.forZones`; empty without hints.
    #[must_use]
    pub fn zone_hints(&self) -> &[Arc<str>] {
        self.hints.as_deref().map_or(&[], |h| &h.zones)
    }

    /// `hints.forNodes`; empty without hints.
    #[must_use]
    pub fn node_hints(&self) -> &[Arc<str>] {
        self.hints.as_deref().map_or(&[], |h| &h.nodes)
    }
}

/// One port of an EndpointSlice, with the endpoints that serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    /// Matches the Service port of the same name (empty for an unnamed port).
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub endpoints: Arc<[Endpoint]>,
}

/// An EndpointSlice, reduced to what the proxy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// From the `kubernetes.io/service-name` label.
    pub service: ServiceName,
    pub ports: Vec<EndpointPort>,
}

/// Facts about one node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    pub name: Arc<str>,
    /// `status.addresses`: InternalIP ones first, then ExternalIP, each in the API's order
    /// (kube-proxy's primary-address order).
    pub addresses: Vec<IpAddr>,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<Arc<str>>,
    /// `spec.podCIDRs` (`spec.podCIDR` when the list is empty): NodeCIDR mode's local
    /// traffic.
    pub pod_cidrs: Vec<IpNet>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_takes_40_bytes() {
        assert_eq!(std::mem::size_of::<Endpoint>(), 40);
    }
}
