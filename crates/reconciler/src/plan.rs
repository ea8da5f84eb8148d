//! The desired kernel state: from the model and the node's configuration, exactly what
//! kube-proxy's ipvs mode programs — IPVS virtual and real servers, the addresses bound to
//! `kube-ipvs0`, the KUBE-* ipsets and the small ipvs-mode iptables rule set.
//!
//! Planning is per Service ([`Planner::plan_service`]) so that a sync engine can recompute just
//! the Services that changed; [`Plan`] is the union of the Service plans plus the fixed rules.
//! Semantics decisions are in `docs/model.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use iptables::ipvs_mode::{KubeSet, RuleInput};
use iptables::{Family, LocalDetector, SetEntry};
use ipvs::{RealServer, ServiceFlags, ServiceKey, VirtualServer};

use crate::model::{
    Endpoint, Hints, Protocol, Scheduler, SchedulerChoice, ServiceName, ServicePort,
    ServicePortName, SessionAffinity,
};
use crate::state::ClusterState;

/// Annotation that picks a Service's IPVS scheduler (ours).
pub const SCHEDULER_ANNOTATION: &str = "ipvs-proxy.io/scheduler";
/// kube-router's annotation for the same, accepted so its users can migrate.
pub const KUBE_ROUTER_SCHEDULER_ANNOTATION: &str = "kube-router.io/service.scheduler";

/// The node and flag settings planning depends on.
#[allow(
    clippy::struct_excessive_bools,
    reason = "kube-proxy's own flags, each a yes or no"
)]
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// `--ipvs-scheduler`.
    pub scheduler: Scheduler,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--iptables-masquerade-bit`.
    pub masquerade_bit: u8,
    /// `--detect-local-mode` and what it reads: how traffic from this node's pods is told.
    pub detect_local: DetectLocal,
    /// The Node's `spec.podCIDRs` (filled in from the cluster in NodeCIDR mode only).
    pub node_pod_cidrs: Vec<IpNet>,
    /// `--iptables-localhost-nodeports` (the iptables fallback's; IPv4 only).
    pub localhost_node_ports: bool,
    /// This node's name: endpoints with this `nodeName` are local.
    pub node_name: Arc<str>,
    /// This node's `topology.kubernetes.io/zone`, for the endpoints' zone hints.
    pub node_zone: Option<Arc<str>>,
    /// Every address of this node, primary of each family first. Used to recognise an
    /// externalIP or LoadBalancer IP that is already a node address (not bound to kube-ipvs0)
    /// and for the "node may reach its own LoadBalancer" source-range check.
    pub node_addresses: Vec<IpAddr>,
    /// The addresses NodePorts are served on (see [`node_port_addresses`]).
    pub node_port_ips: Vec<IpAddr>,
    /// `--nodeport-addresses` is unset: NodePorts are for every local address. The iptables
    /// fallback then matches `-m addrtype --dst-type LOCAL` instead of each of
    /// `node_port_ips`, as upstream's iptables mode does.
    pub node_ports_everywhere: bool,
    /// The families programmed (kube-proxy runs one proxier per family).
    pub families: Vec<Family>,
    /// Whether `MASQUERADE` gets `--random-fully` (iptables ≥ 1.6.2 has it).
    pub random_fully: bool,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            scheduler: Scheduler::RoundRobin,
            masquerade_all: false,
            masquerade_bit: 14,
            detect_local: DetectLocal::default(),
            node_pod_cidrs: Vec::new(),
            localhost_node_ports: true,
            node_name: "".into(),
            node_zone: None,
            node_addresses: Vec::new(),
            node_port_ips: Vec::new(),
            node_ports_everywhere: true,
            families: vec![Family::V4],
            random_fully: true,
        }
    }
}

impl PlanConfig {
    /// The node's primary address of `family` (kube-proxy's `nodeIP`).
    #[must_use]
    pub fn primary_ip(&self, family: Family) -> Option<IpAddr> {
        self.node_addresses
            .iter()
            .chain(&self.node_port_ips)
            .copied()
            .find(|a| Family::of(*a) == family)
    }

    /// What the ipvs-mode rules of `family` are rendered from: these settings, the sets of
    /// `family` that have members, and the LoadBalancer out-filter entries.
    #[must_use]
    pub fn rule_input(
        &self,
        family: Family,
        non_empty: BTreeSet<KubeSet>,
        no_node_access: BTreeSet<(IpAddr, Protocol, u16)>,
    ) -> RuleInput {
        RuleInput {
            family,
            masquerade_mark: iptables::masquerade_mark(self.masquerade_bit),
            masquerade_all: self.masquerade_all,
            local: self.local_detector(family),
            random_fully: self.random_fully,
            non_empty,
            no_node_access,
        }
    }

    /// The local traffic detector of `family`, as kube-proxy's `getLocalDetectors` picks it:
    /// the first CIDR of the family (`--cluster-cidr`, or the Node's podCIDRs), or the pod
    /// interface for both families; not implemented without a CIDR of the family.
    #[must_use]
    pub fn local_detector(&self, family: Family) -> LocalDetector {
        let first_of = |cidrs: &[IpNet]| {
            cidrs
                .iter()
                .find(|n| Family::of(n.addr()) == family)
                .map_or(LocalDetector::NotImplemented, |n| LocalDetector::Cidr(*n))
        };
        match &self.detect_local {
            DetectLocal::ClusterCidr(cidrs) => first_of(cidrs),
            DetectLocal::NodeCidr => first_of(&self.node_pod_cidrs),
            DetectLocal::BridgeInterface(name) => LocalDetector::bridge(name),
            DetectLocal::InterfaceNamePrefix(prefix) => LocalDetector::interface_prefix(prefix),
        }
    }
}

/// `--detect-local-mode` with the setting each mode reads (kube-proxy's `detectLocalMode`,
/// `clusterCIDR` and `detectLocal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectLocal {
    /// `ClusterCIDR`: sources inside `--cluster-cidr` are local.
    ClusterCidr(Vec<IpNet>),
    /// `NodeCIDR`: sources inside the Node's `spec.podCIDRs` are local
    /// ([`PlanConfig::node_pod_cidrs`]).
    NodeCidr,
    /// `BridgeInterface`: traffic entering on `--pod-bridge-interface` is local.
    BridgeInterface(String),
    /// `InterfaceNamePrefix`: traffic entering on an interface whose name starts with
    /// `--pod-interface-name-prefix` is local.
    InterfaceNamePrefix(String),
}

impl Default for DetectLocal {
    /// kube-proxy's default: ClusterCIDR, with no `--cluster-cidr`.
    fn default() -> Self {
        DetectLocal::ClusterCidr(Vec::new())
    }
}

/// `--nodeport-addresses`, in the model's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePortFilter {
    /// Addresses inside these ranges.
    pub cidrs: Vec<IpNet>,
    /// `primary`: the node's primary address of each family.
    pub primary: bool,
}

/// The addresses NodePorts are served on, as kube-proxy's ipvs mode picks them.
///
/// `node` are the node's addresses as the cluster says (`--node-ip`, else the Node object's;
/// primary of each family first), `local` the kernel's addresses on every link but
/// `kube-ipvs0` when known (the daemon follows them; `ipvs-proxy plan` does not read them).
/// - no filter: every `local` address but loopback and IPv6 link-local (upstream's
///   `GetAllLocalAddressesExcept` with its `isValidForSet`), or every `node` address when
///   `local` is unknown;
/// - CIDRs: the `local` (else `node`) addresses inside one of them;
/// - `primary`: the first `node` address of each family.
///
/// Loopback is never used: IPVS cannot serve it. Upstream's CIDR match also takes
/// `kube-ipvs0`'s own addresses (Service VIPs); ours does not, as a NodePort on a ClusterIP is
/// never what a CIDR of node addresses means. `node` addresses come first, in their order
/// (the primary first), then the others, sorted; no duplicates.
#[must_use]
pub fn node_port_addresses(
    node: &[IpAddr],
    local: Option<&BTreeSet<IpAddr>>,
    filter: &NodePortFilter,
) -> Vec<IpAddr> {
    let all = filter.cidrs.is_empty() && !filter.primary;
    let candidates: Vec<IpAddr> = match local {
        // The node's addresses that are local keep their place (the primary first).
        Some(local) => node
            .iter()
            .filter(|a| local.contains(a))
            .chain(local.iter().filter(|a| !node.contains(a)))
            .copied()
            .collect(),
        None => node.to_vec(),
    };
    let mut out: Vec<IpAddr> = Vec::new();
    let push = |out: &mut Vec<IpAddr>, addr: IpAddr| {
        if !addr.is_loopback() && !out.contains(&addr) {
            out.push(addr);
        }
    };
    if filter.primary {
        for family in Family::ALL {
            if let Some(&primary) = node
                .iter()
                .find(|a| !a.is_loopback() && Family::of(**a) == family)
            {
                push(&mut out, primary);
            }
        }
    }
    for addr in candidates {
        let matches = if all {
            !is_ipv6_link_local(addr)
        } else {
            filter.cidrs.iter().any(|c| c.contains(&addr))
        };
        if matches {
            push(&mut out, addr);
        }
    }
    // The primary of each family first, whichever way it was found.
    out.sort_by_key(|a| node.iter().position(|n| n == a).unwrap_or(usize::MAX));
    out
}

/// fe80::/10: a link's own address, which upstream never serves NodePorts on.
fn is_ipv6_link_local(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// Something planning noticed that an operator should hear about; planning went on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PlanWarning {
    /// A Service's scheduler annotation names no IPVS scheduler; the default is used.
    UnknownScheduler {
        service: ServiceName,
        value: Arc<str>,
        fallback: Scheduler,
    },
    /// Two Service ports claim the same virtual server; the first (by name) keeps it.
    VirtualServerConflict {
        key: VipOrder,
        kept: ServicePortName,
        dropped: ServicePortName,
    },
}

impl fmt::Display for PlanWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanWarning::UnknownScheduler {
                service,
                value,
                fallback,
            } => write!(
                f,
                "service {service}: unknown IPVS scheduler {value:?} in annotation; using {fallback} (known: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh, fo, ovf, twos)"
            ),
            PlanWarning::VirtualServerConflict { key, kept, dropped } => write!(
                f,
                "virtual server {}:{}/{} is claimed by {kept} and {dropped}; keeping {kept}",
                key.0, key.1, key.2
            ),
        }
    }
}

/// Where a planned virtual server listens, in the order `plan` prints them: address, port,
/// protocol.
pub type VipOrder = (IpAddr, u16, Protocol);

/// One virtual server with its real servers and the Service port it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedVirtualServer {
    pub virtual_server: VirtualServer,
    /// Sorted by address, unique.
    pub real_servers: Vec<RealServer>,
    pub owner: ServicePortName,
    /// Whether the address is bound to kube-ipvs0 (false for NodePorts and for externalIPs or
    /// LoadBalancer IPs that already belong to the node).
    pub bound: bool,
}

impl PlannedVirtualServer {
    /// Its place in the plan's order.
    #[must_use]
    pub fn order(&self) -> VipOrder {
        match self.virtual_server.key {
            ServiceKey::Addr { protocol, addr } => (addr.ip(), addr.port(), protocol),
            // The planner makes none; were there one, it would sort first.
            ServiceKey::Fwmark { family, .. } => {
                let any = match family {
                    Family::V4 => IpAddr::from([0u8; 4]),
                    Family::V6 => IpAddr::from([0u8; 16]),
                };
                (any, 0, Protocol::Tcp)
            }
        }
    }
}

/// Everything one Service contributes to the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePlan {
    pub virtual_servers: Vec<PlannedVirtualServer>,
    /// Addresses to bind to kube-ipvs0.
    pub addresses: BTreeSet<IpAddr>,
    /// Entries per set and family.
    pub set_entries: BTreeSet<(Family, KubeSet, SetEntry)>,
    /// LoadBalancer (ip, protocol, port) the node itself must not reach (source ranges that do
    /// not include the node): KUBE-IPVS-OUT-FILTER rules.
    pub lb_no_node_access: BTreeSet<(IpAddr, Protocol, u16)>,
    pub warnings: Vec<PlanWarning>,
}

/// The whole desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub virtual_servers: BTreeMap<VipOrder, PlannedVirtualServer>,
    /// kube-ipvs0's addresses.
    pub addresses: BTreeSet<IpAddr>,
    /// Every set of every planned family (empty ones included), with its entries.
    pub sets: BTreeMap<(Family, KubeSet), BTreeSet<SetEntry>>,
    pub lb_no_node_access: BTreeSet<(IpAddr, Protocol, u16)>,
    pub warnings: Vec<PlanWarning>,
}

impl Plan {
    /// An empty plan with every set of `families` present.
    #[must_use]
    pub fn empty(families: &[Family]) -> Self {
        let mut plan = Plan::default();
        for &family in families {
            for set in KubeSet::ALL {
                plan.sets.insert((family, set), BTreeSet::new());
            }
        }
        plan
    }

    /// Adds one Service's plan. A virtual server already claimed keeps its first owner.
    pub fn insert(&mut self, service: ServicePlan) {
        for vs in service.virtual_servers {
            let key = vs.order();
            if let Some(existing) = self.virtual_servers.get(&key) {
                self.warnings.push(PlanWarning::VirtualServerConflict {
                    key,
                    kept: existing.owner.clone(),
                    dropped: vs.owner,
                });
                continue;
            }
            self.virtual_servers.insert(key, vs);
        }
        self.addresses.extend(service.addresses);
        for (family, set, entry) in service.set_entries {
            self.sets.entry((family, set)).or_default().insert(entry);
        }
        self.lb_no_node_access.extend(service.lb_no_node_access);
        self.warnings.extend(service.warnings);
    }

    /// The facts the ipvs-mode rules of `family` are rendered from
    /// ([`iptables::ipvs_mode::ruleset`]): which sets are non-empty, the out-filter entries,
    /// and the masquerade settings of `config`.
    #[must_use]
    pub fn rule_input(&self, config: &PlanConfig, family: Family) -> RuleInput {
        let non_empty = self
            .sets
            .iter()
            .filter(|((f, _), entries)| *f == family && !entries.is_empty())
            .map(|((_, set), _)| *set)
            .collect();
        config.rule_input(family, non_empty, self.lb_no_node_access.clone())
    }

    /// The number of real servers over all virtual servers.
    #[must_use]
    pub fn real_server_count(&self) -> usize {
        self.virtual_servers
            .values()
            .map(|v| v.real_servers.len())
            .sum()
    }
}

/// Computes plans from the model.
#[derive(Debug, Clone)]
pub struct Planner {
    pub config: PlanConfig,
}

/// Which endpoints the hints let this node use (kube-proxy's topology mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// No usable hints: every endpoint.
    All,
    /// Those hinted for this node (`forNodes`, `trafficDistribution: PreferSameNode`).
    SameNode,
    /// Those hinted for this node's zone (`forZones`).
    SameZone,
}

impl Topology {
    /// kube-proxy 1.36's choice from the hints of the ready endpoints (of one family): node
    /// hints when every ready endpoint has some and one names this node; else zone hints when
    /// every ready endpoint has some and one names this node's zone (so the zone must be
    /// known); else none. Only the hints count, not the Service's `trafficDistribution` or
    /// annotation: the EndpointSlice controller sets hints only when those ask for them.
    /// Whether a hint names this node was settled when the slice was converted ([`Hints`]).
    #[must_use]
    pub fn from_hints<'a>(
        endpoints: impl IntoIterator<Item = &'a Endpoint>,
        zone: Option<&str>,
    ) -> Topology {
        let (mut any_ready, mut all_nodes, mut for_node, mut all_zones, mut for_zone) =
            (false, true, false, true, false);
        for e in endpoints.into_iter().filter(|e| e.conditions.ready) {
            any_ready = true;
            let hints = e.hints;
            all_nodes &= hints.for_nodes;
            for_node |= hints.for_this_node;
            all_zones &= hints.zones.is_some();
            for_zone = for_zone || admits_zone(hints, zone);
        }
        if any_ready && all_nodes && for_node {
            Topology::SameNode
        } else if any_ready && all_zones && for_zone {
            Topology::SameZone
        } else {
            Topology::All
        }
    }

    /// Whether `endpoint` may serve this node (kube-proxy's `availableForTopology`).
    #[must_use]
    pub fn admits(self, endpoint: &Endpoint, zone: Option<&str>) -> bool {
        match self {
            Topology::All => true,
            Topology::SameNode => endpoint.hints.for_this_node,
            Topology::SameZone => admits_zone(endpoint.hints, zone),
        }
    }
}

/// Whether `hints` name `zone`, this node's zone (`None` when its Node has no zone label).
fn admits_zone(hints: Hints, zone: Option<&str>) -> bool {
    hints
        .zones
        .zip(zone)
        .is_some_and(|(hinted, z)| hinted.contains(z))
}

/// Which endpoints serve a virtual server: kube-proxy's `CategorizeEndpoints`.
#[derive(Debug)]
struct EndpointChoice<'a> {
    /// For Cluster traffic policies: ready endpoints the topology admits, else
    /// serving-and-terminating ones (empty when the port never uses a Cluster policy).
    cluster: Vec<&'a Endpoint>,
    /// For Local traffic policies: this node's ready endpoints, else its
    /// serving-and-terminating ones; hints do not apply (empty when never used).
    local: Vec<&'a Endpoint>,
}

impl<'a> EndpointChoice<'a> {
    /// The choice for `port` among `eps` (the endpoints of one family) on this node, in
    /// `zone`.
    fn new(port: &ServicePort, eps: &[&'a Endpoint], zone: Option<&str>) -> Self {
        let internal_local = port.internal_policy_local();
        let external_local = port.external_policy_local();
        let uses_cluster = !internal_local || (port.externally_accessible() && !external_local);
        let uses_local = internal_local || external_local;
        let cluster = if uses_cluster {
            let topology = Topology::from_hints(eps.iter().copied(), zone);
            usable(eps, |e| topology.admits(e, zone))
        } else {
            Vec::new()
        };
        let local = if uses_local {
            let local: Vec<&Endpoint> = eps.iter().copied().filter(|e| e.local).collect();
            usable(&local, |_| true)
        } else {
            Vec::new()
        };
        EndpointChoice { cluster, local }
    }

    /// kube-proxy ipvs: node-local VIPs use the local endpoints, and fall back to the cluster
    /// endpoints when there are none (see docs/model.md).
    fn for_vip(&self, only_local: bool) -> &[&Endpoint] {
        if only_local && !self.local.is_empty() {
            &self.local
        } else {
            &self.cluster
        }
    }
}

/// Ready endpoints the topology `admits`; when there are none, the serving-and-terminating
/// ones, whatever their hints (a topology other than [`Topology::All`] always admits a ready
/// endpoint, so this happens only when none is ready).
fn usable<'a>(eps: &[&'a Endpoint], admits: impl Fn(&Endpoint) -> bool) -> Vec<&'a Endpoint> {
    // Sized for all: growing a Vec reallocates, and at 100,000 Services the allocator hands
    // out memory that has left the cache.
    let mut ready: Vec<&Endpoint> = Vec::with_capacity(eps.len());
    ready.extend(
        eps.iter()
            .copied()
            .filter(|e| e.conditions.ready && admits(e)),
    );
    if !ready.is_empty() {
        return ready;
    }
    eps.iter()
        .copied()
        .filter(|e| e.conditions.serving && e.conditions.terminating)
        .collect()
}

impl Planner {
    #[must_use]
    pub fn new(config: PlanConfig) -> Self {
        Planner { config }
    }

    /// The whole plan for `state`, Services in name order.
    #[must_use]
    pub fn plan(&self, state: &ClusterState) -> Plan {
        let mut plan = Plan::empty(&self.config.families);
        for (_, ports) in state.services() {
            plan.insert(self.plan_service(ports, |p| state.endpoints(p)));
        }
        plan.finish(&self.config.families);
        plan
    }

    /// The scheduler for a Service, and a warning if its annotation was not understood.
    fn scheduler(&self, port: &ServicePort) -> (Scheduler, Option<PlanWarning>) {
        match &port.scheduler {
            SchedulerChoice::Default => (self.config.scheduler, None),
            SchedulerChoice::Named(s) => (*s, None),
            SchedulerChoice::Unknown(value) => (
                self.config.scheduler,
                Some(PlanWarning::UnknownScheduler {
                    service: port.name.service.clone(),
                    value: value.clone(),
                    fallback: self.config.scheduler,
                }),
            ),
        }
    }

    /// What the ports of one Service contribute. `endpoints` gives a port's endpoints
    /// (normally [`ClusterState::endpoints`]).
    pub fn plan_service(
        &self,
        ports: &[ServicePort],
        endpoints: impl Fn(&ServicePortName) -> Vec<Endpoint>,
    ) -> ServicePlan {
        let mut out = ServicePlan::default();
        for port in ports {
            let (scheduler, warning) = self.scheduler(port);
            if let Some(w) = warning
                && !out.warnings.contains(&w)
            {
                out.warnings.push(w);
            }
            let eps = endpoints(&port.name);
            for &family in &self.config.families {
                self.plan_port_family(port, scheduler, &eps, family, &mut out);
            }
        }
        out
    }

    #[allow(
        clippy::too_many_lines,
        reason = "one pass over a port's VIPs, in kube-proxy's order, reads best in one place"
    )]
    fn plan_port_family(
        &self,
        port: &ServicePort,
        scheduler: Scheduler,
        eps: &[Endpoint],
        family: Family,
        out: &mut ServicePlan,
    ) {
        let of_family = |ip: &&IpAddr| Family::of(**ip) == family;
        // kube-proxy's per-family proxier skips a Service with no ClusterIP of its family.
        let Some(&cluster_ip) = port.cluster_ips.iter().find(of_family) else {
            return;
        };
        let proto = port.name.protocol;
        let mut fam_eps: Vec<&Endpoint> = Vec::with_capacity(eps.len());
        fam_eps.extend(eps.iter().filter(|e| Family::of(e.ip) == family));

        // Hairpin: a local endpoint reaching its own Service is masqueraded.
        for e in fam_eps.iter().filter(|e| e.local) {
            out.set_entries.insert((
                family,
                KubeSet::LoopBack,
                SetEntry::IpPortIp(e.ip, proto, e.port, e.ip),
            ));
        }

        let internal_local = port.internal_policy_local();
        let external_local = port.external_policy_local();
        let choice = EndpointChoice::new(port, &fam_eps, self.config.node_zone.as_deref());

        let virtual_server = |address: IpAddr, vport: u16| {
            let key = ServiceKey::Addr {
                protocol: port.name.protocol,
                addr: SocketAddr::new(address, vport),
            };
            let mut vs = VirtualServer::new(key, scheduler);
            if let SessionAffinity::ClientIp { timeout_seconds } = port.session_affinity {
                vs = vs.with_persistence(timeout_seconds);
            }
            // kube-proxy hashes on the source port too with the mh scheduler (`-b mh-port`).
            if scheduler == Scheduler::Maglev {
                vs.flags = ServiceFlags::SH_PORT;
            }
            vs
        };
        let add_vs =
            |out: &mut ServicePlan, address: IpAddr, vport: u16, only_local: bool, bound: bool| {
                let mut real_servers: Vec<RealServer> = choice
                    .for_vip(only_local)
                    .iter()
                    .map(|e| RealServer::masquerade(SocketAddr::new(e.ip, e.port)))
                    .collect();
                real_servers.sort_unstable_by_key(|r| r.addr);
                real_servers.dedup_by_key(|r| r.addr);
                out.virtual_servers.push(PlannedVirtualServer {
                    virtual_server: virtual_server(address, vport),
                    real_servers,
                    owner: port.name.clone(),
                    bound,
                });
                if bound {
                    out.addresses.insert(address);
                    out.set_entries
                        .insert((family, KubeSet::IpvsIps, SetEntry::Ip(address)));
                }
            };

        // ClusterIP.
        out.set_entries.insert((
            family,
            KubeSet::ClusterIp,
            SetEntry::IpPort(cluster_ip, proto, port.port),
        ));
        add_vs(out, cluster_ip, port.port, internal_local, true);

        // externalIPs.
        for &ip in port.external_ips.iter().filter(of_family) {
            let set = if external_local {
                KubeSet::ExternalIpLocal
            } else {
                KubeSet::ExternalIp
            };
            out.set_entries
                .insert((family, set, SetEntry::IpPort(ip, proto, port.port)));
            let bind = !self.config.node_addresses.contains(&ip);
            add_vs(out, ip, port.port, external_local, bind);
        }

        // LoadBalancer ingress IPs.
        let ranges: Vec<IpNet> = port
            .load_balancer_source_ranges
            .iter()
            .copied()
            .filter(|n| Family::of(n.addr()) == family)
            .collect();
        for &ip in port.load_balancer_ips.iter().filter(of_family) {
            let entry = SetEntry::IpPort(ip, proto, port.port);
            out.set_entries
                .insert((family, KubeSet::LoadBalancer, entry));
            if external_local {
                out.set_entries
                    .insert((family, KubeSet::LoadBalancerLocal, entry));
            }
            if !ranges.is_empty() {
                out.set_entries
                    .insert((family, KubeSet::LoadBalancerFw, entry));
                let node_ip = self.config.primary_ip(family);
                let mut allow_from_node = false;
                for net in &ranges {
                    out.set_entries.insert((
                        family,
                        KubeSet::LoadBalancerSourceCidr,
                        SetEntry::IpPortNet(ip, proto, port.port, *net),
                    ));
                    allow_from_node |= node_ip.is_some_and(|n| net.contains(&n));
                }
                if allow_from_node {
                    out.set_entries.insert((
                        family,
                        KubeSet::LoadBalancerSourceIp,
                        SetEntry::IpPortIp(ip, proto, port.port, ip),
                    ));
                } else {
                    out.lb_no_node_access
                        .insert((ip, port.name.protocol, port.port));
                }
            }
            let bind = !self.config.node_addresses.contains(&ip);
            add_vs(out, ip, port.port, external_local, bind);
        }

        // NodePort on every node address of the family.
        let node_ips: Vec<IpAddr> = self
            .config
            .node_port_ips
            .iter()
            .copied()
            .filter(|a| Family::of(*a) == family)
            .collect();
        if let Some(node_port) = port.node_port
            && !node_ips.is_empty()
        {
            let (set, local_set) = match port.name.protocol {
                Protocol::Tcp => (KubeSet::NodePortTcp, KubeSet::NodePortLocalTcp),
                Protocol::Udp => (KubeSet::NodePortUdp, KubeSet::NodePortLocalUdp),
                Protocol::Sctp => (KubeSet::NodePortSctp, KubeSet::NodePortLocalSctp),
            };
            let entries: Vec<SetEntry> = if port.name.protocol == Protocol::Sctp {
                node_ips
                    .iter()
                    .map(|ip| SetEntry::IpPort(*ip, proto, node_port))
                    .collect()
            } else {
                vec![SetEntry::Port(node_port)]
            };
            for e in entries {
                out.set_entries.insert((family, set, e));
                if external_local {
                    out.set_entries.insert((family, local_set, e));
                }
            }
            for ip in node_ips {
                add_vs(out, ip, node_port, external_local, false);
            }
        }

        if let Some(hc) = port.health_check_node_port {
            out.set_entries
                .insert((family, KubeSet::HealthCheckNodePort, SetEntry::Port(hc)));
        }
    }
}

impl Plan {
    /// Makes sure every set of `families` is present (the plan of an empty cluster still has
    /// its sets and rules).
    pub fn finish(&mut self, families: &[Family]) {
        for &family in families {
            for set in KubeSet::ALL {
                self.sets.entry((family, set)).or_default();
            }
        }
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
