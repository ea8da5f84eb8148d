//! Kubernetes objects → the reconciler's model, with kube-proxy's filtering.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use reconciler::model::{
    Conditions, Endpoint, EndpointPort, EndpointSlice as SliceModel, Hints, NodeFacts, Protocol,
    SchedulerChoice, ServiceName, ServicePort, ServicePortName, ServiceType, SessionAffinity,
    TrafficPolicy, address_list, network_list,
};
use reconciler::plan::{KUBE_ROUTER_SCHEDULER_ANNOTATION, SCHEDULER_ANNOTATION};
use reconciler::state::SliceName;

use crate::intern::intern;

/// Services with this label belong to another proxy (kube-proxy ignores them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label kube-proxy's EndpointSlice watch excludes (headless Services' slices).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The annotation kube-proxy reads when `spec.loadBalancerSourceRanges` is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// The node label with its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The most virtual servers one Service may ask for: its VIPs (cluster, external and load
/// balancer IPs) times its ports. A Service past it is rejected whole, so that one object
/// cannot make a sync program without end. See `docs/model.md` for why this number.
pub const MAX_VIRTUAL_SERVERS_PER_SERVICE: usize = 1000;

/// Why a Service produces no ServicePorts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skipped {
    #[error("headless (clusterIP: None)")]
    Headless,
    #[error("type ExternalName")]
    ExternalName,
    #[error("labelled {SERVICE_PROXY_NAME_LABEL}={0}: served by another proxy")]
    OtherProxy(String),
    #[error("no clusterIP")]
    NoClusterIp,
    #[error(
        "{vips} VIPs × {ports} ports are {} virtual servers, more than the {MAX_VIRTUAL_SERVERS_PER_SERVICE} a Service may have",
        vips.saturating_mul(*ports)
    )]
    TooManyVirtualServers { vips: usize, ports: usize },
}

/// The Service's namespace and name (`default` when the manifest leaves the namespace out).
#[must_use]
pub fn service_name(svc: &Service) -> ServiceName {
    ServiceName {
        namespace: intern(svc.metadata.namespace.as_deref().unwrap_or("default")),
        // Shared with its EndpointSlices' references to it.
        name: intern(svc.metadata.name.as_deref().unwrap_or("")),
    }
}

fn parse_ips(values: &[String], what: &str, svc: &ServiceName) -> Arc<[IpAddr]> {
    let ips: Vec<IpAddr> = values
        .iter()
        .filter_map(|v| {
            let ip = v.trim().parse::<IpAddr>().ok();
            if ip.is_none() {
                tracing::warn!(service = %svc, value = %v, "ignoring invalid {what}");
            }
            ip
        })
        .collect();
    address_list(ips)
}

/// One `ServicePort` per port of `svc`, or why the Service is skipped.
#[allow(
    clippy::too_many_lines,
    reason = "one pass over the Service's fields, in the order the model lists them"
)]
pub fn service_ports(svc: &Service) -> Result<Vec<ServicePort>, Skipped> {
    let name = service_name(svc);
    if let Some(proxy) = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
    {
        return Err(Skipped::OtherProxy(proxy.clone()));
    }
    let Some(spec) = &svc.spec else {
        return Err(Skipped::NoClusterIp);
    };
    let service_type = match spec.type_.as_deref() {
        Some("ExternalName") => return Err(Skipped::ExternalName),
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        _ => ServiceType::ClusterIp,
    };
    let cluster_ip_strings: Vec<String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec.cluster_ip.iter().cloned().collect(),
    };
    if cluster_ip_strings.first().map(String::as_str) == Some("None") {
        return Err(Skipped::Headless);
    }
    let cluster_ips = parse_ips(&cluster_ip_strings, "clusterIP", &name);
    if cluster_ips.is_empty() {
        return Err(Skipped::NoClusterIp);
    }
    let external_ips = parse_ips(
        spec.external_ips.as_deref().unwrap_or_default(),
        "externalIP",
        &name,
    );
    // VIP-mode ingresses only: `ipMode: Proxy` means the load balancer proxies, so the node
    // must not capture its address (kube-proxy skips them too).
    let ingress: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| {
            ing.iter()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.clone())
                .collect()
        })
        .unwrap_or_default();
    let load_balancer_ips = parse_ips(&ingress, "loadBalancer ingress IP", &name);
    let annotations = svc.metadata.annotations.as_ref();
    let mut range_strings: Vec<String> =
        spec.load_balancer_source_ranges.clone().unwrap_or_default();
    if range_strings.is_empty()
        && let Some(a) = annotations.and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
    {
        range_strings = a.split(',').map(str::to_owned).collect();
    }
    let load_balancer_source_ranges: Vec<IpNet> = range_strings
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let net = s.parse::<IpNet>().ok().map(|n| n.trunc());
            if net.is_none() {
                tracing::warn!(service = %name, value = %s, "ignoring invalid loadBalancerSourceRange");
            }
            net
        })
        .collect();
    let load_balancer_source_ranges = network_list(load_balancer_source_ranges);
    let policy = |p: Option<&str>| {
        if p == Some("Local") {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        }
    };
    let session_affinity = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(SessionAffinity::DEFAULT_TIMEOUT_SECONDS);
        SessionAffinity::ClientIp {
            timeout_seconds: timeout,
        }
    } else {
        SessionAffinity::None
    };
    let scheduler = annotations
        .and_then(|a| {
            a.get(SCHEDULER_ANNOTATION)
                .or_else(|| a.get(KUBE_ROUTER_SCHEDULER_ANNOTATION))
        })
        .map_or(SchedulerChoice::Default, |v| {
            SchedulerChoice::from_annotation(v)
        });
    let externally_typed = matches!(
        service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    let health_check_node_port = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);

    let mut out = Vec::new();
    for p in spec.ports.as_deref().unwrap_or_default() {
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(other) => {
                tracing::warn!(service = %name, protocol = other, "ignoring port with unknown protocol");
                continue;
            }
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
            tracing::warn!(service = %name, port = p.port, "ignoring invalid port");
            continue;
        };
        out.push(ServicePort {
            name: ServicePortName {
                service: name.clone(),
                port: intern(p.name.as_deref().unwrap_or("")),
                protocol,
            },
            service_type,
            port,
            cluster_ips: cluster_ips.clone(),
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            node_port: p
                .node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| externally_typed && *n != 0),
            health_check_node_port,
            session_affinity,
            external_traffic_policy: policy(spec.external_traffic_policy.as_deref()),
            internal_traffic_policy: policy(spec.internal_traffic_policy.as_deref()),
            scheduler: scheduler.clone(),
        });
    }
    let vips = cluster_ips.len() + external_ips.len() + load_balancer_ips.len();
    if vips.saturating_mul(out.len()) > MAX_VIRTUAL_SERVERS_PER_SERVICE {
        return Err(Skipped::TooManyVirtualServers {
            vips,
            ports: out.len(),
        });
    }
    Ok(out)
}

/// The annotation the EndpointSlice controller sets to when the change behind a slice's update
/// happened (a Pod's or the Service's), which kube-proxy's network programming latency counts
/// from.
pub const LAST_CHANGE_TRIGGER_TIME_ANNOTATION: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";

/// The slice's `endpoints.kubernetes.io/last-change-trigger-time` (RFC 3339, as the controller
/// writes it in UTC); `None` without it, or, logged, when it cannot be read.
#[must_use]
pub fn last_change_trigger_time(slice: &EndpointSlice) -> Option<std::time::SystemTime> {
    let annotations = slice.metadata.annotations.as_ref()?;
    let value = annotations.get(LAST_CHANGE_TRIGGER_TIME_ANNOTATION)?;
    humantime::parse_rfc3339_weak(value)
        .inspect_err(|e| {
            let (namespace, name) = slice_name(slice);
            tracing::warn!(%namespace, %name, value, "EndpointSlice annotation {LAST_CHANGE_TRIGGER_TIME_ANNOTATION}: {e}; its change is timed from its arrival");
        })
        .ok()
}

/// The slice's identity (namespace, name).
#[must_use]
pub fn slice_name(slice: &EndpointSlice) -> SliceName {
    (
        intern(slice.metadata.namespace.as_deref().unwrap_or("default")),
        slice.metadata.name.as_deref().unwrap_or("").into(),
    )
}

/// An endpoint's address, conditions, whether it is on this node, and its hints, before it is
/// paired with a port.
type Address = (IpAddr, Conditions, bool, Hints);

/// The model of an EndpointSlice as the proxy on the node named `node` sees it (which of its
/// endpoints are local, which node hints name this node); `None` when it names no Service or
/// holds FQDNs.
#[must_use]
pub fn endpoint_slice(slice: &EndpointSlice, node: &str) -> Option<SliceModel> {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))?;
    if slice.address_type == "FQDN" {
        return None;
    }
    let (namespace, _) = slice_name(slice);
    let service = ServiceName {
        namespace,
        name: intern(service),
    };
    // kube-proxy too decides `IsLocal` as it reads the slice, from its own node name; the
    // endpoints' node and zone names are not kept (nothing else reads them).
    let addrs: Vec<Address> = slice
        .endpoints
        .iter()
        .filter_map(|e| {
            // kube-proxy uses the first address of an endpoint.
            let ip = e.addresses.first()?.parse::<IpAddr>().ok()?;
            let c = e.conditions.as_ref();
            let conditions = Conditions {
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving).unwrap_or(true),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            };
            let local = e.node_name.as_deref() == Some(node);
            let hints = e.hints.as_ref().map_or_else(Hints::default, |h| {
                Hints::new(
                    h.for_zones.iter().flatten().map(|z| z.name.as_str()),
                    h.for_nodes.iter().flatten().map(|n| n.name.as_str()),
                    node,
                )
            });
            Some((ip, conditions, local, hints))
        })
        .collect();
    let listed = slice.ports.as_deref().unwrap_or_default();
    // Kept in the state: room for the ports listed, not the four a filtered collect starts
    // with (120 bytes more a slice).
    let mut ports = Vec::with_capacity(listed.len());
    ports.extend(listed.iter().filter_map(|p| {
        let port = u16::try_from(p.port?).ok().filter(|p| *p != 0)?;
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(_) => return None,
        };
        Some(EndpointPort {
            name: intern(p.name.as_deref().unwrap_or("")),
            protocol,
            endpoints: addrs
                .iter()
                .map(|&(ip, conditions, local, hints)| Endpoint {
                    ip,
                    port,
                    conditions,
                    local,
                    hints,
                })
                .collect(),
        })
    }));
    Some(SliceModel { service, ports })
}

/// A Node's facts: its name, InternalIP addresses then ExternalIP ones, and its zone.
#[must_use]
pub fn node_facts(node: &Node) -> NodeFacts {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|addrs| {
            let of = |kind: &'static str| {
                addrs
                    .iter()
                    .filter(move |a| a.type_ == kind)
                    .filter_map(|a| a.address.parse::<IpAddr>().ok())
            };
            let mut v: Vec<IpAddr> = of("InternalIP").chain(of("ExternalIP")).collect();
            let mut seen = Vec::new();
            v.retain(|a| {
                let new = !seen.contains(a);
                seen.push(*a);
                new
            });
            v
        })
        .unwrap_or_default();
    let name = node.metadata.name.as_deref().unwrap_or("");
    NodeFacts {
        name: intern(name),
        pod_cidrs: pod_cidrs(node, name),
        addresses,
        zone: node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .map(|z| intern(z)),
    }
}

/// `spec.podCIDRs`, or `spec.podCIDR` when the list is empty (what older clusters and
/// hand-written manifests set). A value that is not a CIDR is logged with the Node and left
/// out.
fn pod_cidrs(node: &Node, name: &str) -> Vec<IpNet> {
    let spec = node.spec.as_ref();
    let listed = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let values = if listed.is_empty() {
        spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect()
    } else {
        listed
    };
    values
        .iter()
        .filter_map(|v| {
            let cidr = v.parse::<IpNet>().ok();
            if cidr.is_none() {
                tracing::warn!(node = name, value = %v, "Node spec.podCIDRs holds a value that is not a CIDR; ignored");
            }
            cidr
        })
        .collect()
}
