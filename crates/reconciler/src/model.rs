//! The proxy's own model of the cluster: what kube-proxy calls a `ServicePort` and an
//! `Endpoint`, plus the facts about this node. No Kubernetes types: the controllers convert
//! API objects into these.
//!
//! Strings are shared (`Arc<str>`) and per-Service address lists are shared between the ports
//! of one Service (`Arc<[..]>`), so 10,000 Services × 10 endpoints stay a few megabytes.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

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

/// `endpoints[].hints`, as this node reads them: the zones and nodes the EndpointSlice
/// controller meant an endpoint for (it sets them for `trafficDistribution` and the
/// `topology-mode` annotation; the proxy reads only the hints, as kube-proxy does).
///
/// No pointers: the node hints are reduced where the slice is converted, against this node's
/// name (fixed for the process), and the zone hints are an id ([`ZoneHints`]), because this
/// node's zone can change while the proxy runs (a Node label update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hints {
    /// `forZones[].name`; `None` when it lists none.
    pub zones: Option<ZoneHints>,
    /// Whether `forNodes` lists any node (`trafficDistribution: PreferSameNode`).
    pub for_nodes: bool,
    /// Whether one of the nodes it lists is this node.
    pub for_this_node: bool,
}

impl Hints {
    /// The hints of an endpoint hinted for `zones` and `nodes`, as the proxy on `this_node`
    /// reads them.
    #[must_use]
    pub fn new<'a>(
        zones: impl IntoIterator<Item = &'a str>,
        nodes: impl IntoIterator<Item = &'a str>,
        this_node: &str,
    ) -> Hints {
        let (mut for_nodes, mut for_this_node) = (false, false);
        for node in nodes {
            for_nodes = true;
            for_this_node |= node == this_node;
        }
        Hints {
            zones: ZoneHints::of(zones),
            for_nodes,
            for_this_node,
        }
    }

    /// Whether it lists any zone or node.
    #[must_use]
    pub fn any(&self) -> bool {
        self.zones.is_some() || self.for_nodes
    }
}

/// One `forZones` list, as an id in the process's table of the distinct lists seen, so that
/// an endpoint holds no pointer and a slice's endpoints are freed without being read.
///
/// The table is never pruned: it holds each distinct list ever seen, once. Lists are few: with
/// `trafficDistribution: PreferClose` each endpoint names its own zone (one list per zone),
/// and topology-aware hints add the few zone combinations the EndpointSlice controller makes.
/// Equal lists have one id; ids order by when their list was first seen, not by its names.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZoneHints(NonZeroU32);

/// The distinct zone lists, by id (id 1 is the first), and the id of each.
#[derive(Default)]
struct ZoneLists {
    lists: Vec<Arc<[Box<str>]>>,
    ids: HashMap<Arc<[Box<str>]>, ZoneHints>,
}

static ZONE_LISTS: LazyLock<RwLock<ZoneLists>> = LazyLock::new(RwLock::default);

impl ZoneHints {
    /// The id of the list `zones`; `None` when it is empty.
    #[must_use]
    pub fn of<'a>(zones: impl IntoIterator<Item = &'a str>) -> Option<ZoneHints> {
        let zones: Box<[Box<str>]> = zones.into_iter().map(Box::from).collect();
        if zones.is_empty() {
            return None;
        }
        let known = |table: &ZoneLists| table.ids.get(&zones[..]).copied();
        if let Some(id) = known(&ZONE_LISTS.read().unwrap_or_else(PoisonError::into_inner)) {
            return Some(id);
        }
        let mut table = ZONE_LISTS.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = known(&table) {
            return Some(id);
        }
        // Past 2³² − 1 distinct lists (never), an endpoint would read as hinted for no zone.
        let id = ZoneHints(NonZeroU32::new(u32::try_from(table.lists.len() + 1).ok()?)?);
        let list: Arc<[Box<str>]> = zones.into();
        table.lists.push(list.clone());
        table.ids.insert(list, id);
        Some(id)
    }

    /// The zones it lists.
    #[must_use]
    pub fn zones(self) -> Arc<[Box<str>]> {
        let table = ZONE_LISTS.read().unwrap_or_else(PoisonError::into_inner);
        table.lists[self.index()].clone()
    }

    /// Whether it lists `zone`.
    #[must_use]
    pub fn contains(self, zone: &str) -> bool {
        let table = ZONE_LISTS.read().unwrap_or_else(PoisonError::into_inner);
        table.lists[self.index()].iter().any(|z| **z == *zone)
    }

    fn index(self) -> usize {
        // Made by `of`, so in the table; u32 fits in usize on every target the proxy runs on.
        self.0.get() as usize - 1
    }
}

impl fmt::Debug for ZoneHints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.zones().iter()).finish()
    }
}

/// One backend address of one port: kube-proxy's `Endpoint`.
///
/// 32 bytes and nothing to drop: at 10,000 Services × 10 endpoints the model holds 100,000 of
/// them, and a change reads a slice's worth and frees the old slice's without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub conditions: Conditions,
    /// Whether it runs on this node: its `endpoints[].nodeName` is this node's name, as the
    /// source that converted it knows it (kube-proxy's `IsLocal`, from its hostname). The
    /// endpoint's node and zone are not kept: nothing else reads them.
    pub local: bool,
    /// Its topology hints (none for most endpoints).
    pub hints: Hints,
}

const _: () = assert!(!std::mem::needs_drop::<Endpoint>());

impl Endpoint {
    /// Whether it runs on this node and is ready: what kube-proxy counts as a local endpoint
    /// for its health checks and its no-local-endpoints metric.
    #[must_use]
    pub fn is_local_and_ready(&self) -> bool {
        self.local && self.conditions.ready
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
    fn an_endpoint_takes_32_bytes() {
        assert_eq!(std::mem::size_of::<Endpoint>(), 32);
    }

    #[test]
    fn equal_zone_lists_have_one_id_that_answers_for_their_zones() {
        let a = ZoneHints::of(["model-test-a", "model-test-b"]).unwrap();
        assert_eq!(ZoneHints::of(["model-test-a", "model-test-b"]), Some(a));
        assert_ne!(ZoneHints::of(["model-test-a"]), Some(a));
        assert!(a.contains("model-test-b") && !a.contains("model-test-c"));
        assert_eq!(ZoneHints::of([]), None, "no zones, no hints");
        let hints = Hints::new(["model-test-a"], ["node-b", "node-a"], "node-a");
        assert!(hints.for_nodes && hints.for_this_node && hints.any());
        assert!(!Hints::new([], ["node-b"], "node-a").for_this_node);
    }
}
