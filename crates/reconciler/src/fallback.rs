//! The iptables proxier as the fallback of ipvs mode: converting the model to the
//! `iptables::proxier` input (the daemon decides at start which proxier runs).
//!
//! `ipvs-proxy plan --proxy-mode iptables` prints [`plan_iptables`]; the daemon, when it runs
//! the fallback, keeps an [`iptables::proxier::Proxier`] per family and calls its `sync_full`
//! with [`service_specs`] and its `sync_services` with [`changed_service_specs`] (the Services
//! that changed, one at a time through [`service_specs_of`]).

use iptables::Family;
use iptables::proxier::{Backend, ProxierConfig, ServiceSpec, render};

use crate::model::{ServiceName, ServicePort, SessionAffinity, TrafficPolicy};
use crate::plan::{PlanConfig, Topology};
use crate::render::save_header;
use crate::state::ClusterState;

/// The model's service ports, with their endpoints, as the iptables proxier takes them, for
/// a full sync: every Service's [`service_specs_of`], sorted by name and protocol.
/// `node` is this node's name (for its zone, which the topology hints are read against).
#[must_use]
pub fn service_specs(state: &ClusterState, node: &str) -> Vec<ServiceSpec> {
    let mut specs: Vec<ServiceSpec> = state
        .services_any_order()
        .flat_map(|(_, ports)| ports.iter().map(|sp| port_spec(state, sp, node)))
        .collect();
    specs.sort_by(|a, b| (&a.name, a.protocol).cmp(&(&b.name, b.protocol)));
    specs
}

/// Every Service's ports as the iptables proxier takes them, converted one at a time as a
/// full sync renders them (`Proxier::sync_full_each`), in the state's order, with the sum of
/// their endpoints, which that sync needs first.
pub fn each_service_spec<'a>(
    state: &'a ClusterState,
    node: &'a str,
) -> (usize, impl Iterator<Item = ServiceSpec> + 'a) {
    let endpoints = state
        .services_any_order()
        .flat_map(|(_, ports)| ports)
        .map(|sp| state.endpoints(&sp.name).len())
        .sum();
    let ports = state.services().flat_map(|(_, ports)| ports);
    (endpoints, ports.map(move |sp| port_spec(state, sp, node)))
}

/// One Service's ports as the iptables proxier takes them, for a partial sync
/// (`Proxier::sync_services`, under `service.to_string()`): empty when the Service is gone
/// from `state` or was skipped (headless, ExternalName, another proxy's), which the proxier
/// reads as removed.
#[must_use]
pub fn service_specs_of(
    state: &ClusterState,
    service: &ServiceName,
    node: &str,
) -> Vec<ServiceSpec> {
    let mut specs: Vec<ServiceSpec> = state
        .service(service)
        .unwrap_or_default()
        .iter()
        .map(|sp| port_spec(state, sp, node))
        .collect();
    specs.sort_by(|a, b| (&a.name, a.protocol).cmp(&(&b.name, b.protocol)));
    specs
}

/// The Services of `dirty` as `Proxier::sync_services` takes them: kube-proxy's
/// `namespace/name` and [`service_specs_of`].
#[must_use]
pub fn changed_service_specs<'a>(
    state: &ClusterState,
    dirty: impl IntoIterator<Item = &'a ServiceName>,
    node: &str,
) -> Vec<(String, Vec<ServiceSpec>)> {
    dirty
        .into_iter()
        .map(|name| (name.to_string(), service_specs_of(state, name, node)))
        .collect()
}

/// One service port and its endpoints, each marked with whether the topology hints let this
/// node use it (decided per family, as each family's proxier sees only its own endpoints).
fn port_spec(state: &ClusterState, sp: &ServicePort, node: &str) -> ServiceSpec {
    let zone = state.node(node).and_then(|n| n.zone.as_deref());
    let endpoints = state.endpoints(&sp.name);
    let topology = |family: Family| {
        let of_family = endpoints.iter().filter(|e| Family::of(e.ip) == family);
        Topology::from_hints(of_family, zone)
    };
    let (v4, v6) = (topology(Family::V4), topology(Family::V6));
    let backends = endpoints
        .iter()
        .map(|e| Backend {
            addr: std::net::SocketAddr::new(e.ip, e.port),
            ready: e.conditions.ready,
            serving: e.conditions.serving,
            terminating: e.conditions.terminating,
            local: e.local,
            in_topology: match Family::of(e.ip) {
                Family::V4 => v4,
                Family::V6 => v6,
            }
            .admits(e, zone),
        })
        .collect();
    ServiceSpec {
        name: sp.name.to_string(),
        protocol: sp.name.protocol,
        port: sp.port,
        cluster_ips: sp.cluster_ips.to_vec(),
        external_ips: sp.external_ips.to_vec(),
        load_balancer_ips: sp.load_balancer_ips.to_vec(),
        source_ranges: sp.load_balancer_source_ranges.to_vec(),
        node_port: sp.node_port,
        health_check_node_port: sp.health_check_node_port,
        affinity_seconds: match sp.session_affinity {
            SessionAffinity::ClientIp { timeout_seconds } => Some(timeout_seconds),
            SessionAffinity::None => None,
        },
        external_local: sp.external_traffic_policy == TrafficPolicy::Local,
        internal_local: sp.internal_traffic_policy == TrafficPolicy::Local,
        backends,
    }
}

/// What `plan --proxy-mode iptables` prints for one family: the proxier's chains as
/// `iptables-save` prints them (sorted, deterministic).
#[must_use]
pub fn plan_iptables(state: &ClusterState, node: &str, config: &ProxierConfig) -> String {
    let specs = service_specs(state, node);
    render(config, &specs).save_text(config)
}

/// What `plan --proxy-mode iptables` prints: kube-proxy's iptables-mode rules for every family,
/// each under its `iptables-save` header (the IPv4 header only with `headers`, which `--only`
/// turns off).
#[must_use]
pub fn plan_iptables_mode(state: &ClusterState, config: &PlanConfig, headers: bool) -> String {
    let mut text = String::new();
    for &family in &config.families {
        if headers || family == Family::V6 {
            text.push_str(save_header(family));
        }
        let proxier = proxier_config(config, family);
        text.push_str(&plan_iptables(state, &config.node_name, &proxier));
    }
    text
}

/// The proxier configuration for `family` from the planning settings: the flags', and the
/// NodePort addresses of `family` when `--nodeport-addresses` is set (each gets its own jump
/// to KUBE-NODEPORTS, as upstream's iptables mode writes; none when no address matches),
/// otherwise every local address (`-m addrtype --dst-type LOCAL`).
#[must_use]
pub fn proxier_config(config: &PlanConfig, family: Family) -> ProxierConfig {
    let node_port_addresses = (!config.node_ports_everywhere).then(|| {
        config
            .node_port_ips
            .iter()
            .copied()
            .filter(|a| Family::of(*a) == family)
            .collect()
    });
    ProxierConfig {
        family,
        masquerade_bit: config.masquerade_bit,
        masquerade_all: config.masquerade_all,
        local: config.local_detector(family),
        localhost_node_ports: config.localhost_node_ports,
        node_port_addresses,
        ..ProxierConfig::default()
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::model::{Protocol, ServicePortName};

    fn port(service: &str, port: &str, number: u16) -> ServicePort {
        let name = ServicePortName {
            service: ServiceName::new("ns", service),
            port: port.into(),
            protocol: Protocol::Tcp,
        };
        ServicePort::cluster_ip(name, number, &["10.96.0.1".parse().unwrap()])
    }

    #[test]
    fn one_service_converts_as_in_the_full_list() {
        let mut state = ClusterState::new();
        let a = ServiceName::new("ns", "a");
        state.upsert_service(
            a.clone(),
            vec![port("a", "https", 443), port("a", "http", 80)],
        );
        state.upsert_service(ServiceName::new("ns", "b"), vec![port("b", "", 53)]);
        let all = service_specs(&state, "node-a");
        let of_a = service_specs_of(&state, &a, "node-a");
        let names: Vec<&str> = of_a.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["ns/a:http", "ns/a:https"]);
        assert_eq!(of_a[..], all[..2]);
        let changed =
            changed_service_specs(&state, [&a, &ServiceName::new("ns", "gone")], "node-a");
        assert_eq!(changed[0], ("ns/a".to_owned(), of_a));
        assert_eq!(
            changed[1],
            ("ns/gone".to_owned(), Vec::new()),
            "gone: no ports"
        );
    }

    /// A state with node-a in `zone` and Service web (NodePort 30080, `etp`) whose endpoints
    /// 10.244.1.5 (node-b) and 10.244.2.5 (node-a) are hinted for zone-a and zone-b when
    /// `hinted`.
    fn zoned(zone: Option<&str>, hinted: bool, etp: TrafficPolicy) -> ClusterState {
        use crate::model::{Conditions, Endpoint, EndpointPort, EndpointSlice, Hints, NodeFacts};
        let mut state = ClusterState::new();
        state.upsert_node(NodeFacts {
            name: "node-a".into(),
            addresses: vec!["192.168.56.10".parse().unwrap()],
            zone: zone.map(Into::into),
            pod_cidrs: Vec::new(),
        });
        let ep = |ip: &str, node: &str, zone: &str| Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            conditions: Conditions::default(),
            local: node == "node-a",
            hints: if hinted {
                Hints::new([zone], [], "node-a")
            } else {
                Hints::default()
            },
        };
        let web = ServiceName::new("ns", "web");
        state.upsert_slice(
            ("ns".into(), "web-1".into()),
            EndpointSlice {
                service: web.clone(),
                ports: vec![EndpointPort {
                    name: "".into(),
                    protocol: Protocol::Tcp,
                    endpoints: vec![
                        ep("10.244.1.5", "node-b", "zone-a"),
                        ep("10.244.2.5", "node-a", "zone-b"),
                    ]
                    .into(),
                }],
            },
        );
        let mut sp = port("web", "", 80);
        sp.node_port = Some(30080);
        sp.external_traffic_policy = etp;
        state.upsert_service(web, vec![sp]);
        state
    }

    fn rules(state: &ClusterState) -> String {
        plan_iptables(state, "node-a", &ProxierConfig::default())
    }

    #[test]
    fn hints_for_the_nodes_zone_leave_the_other_zones_endpoints_out() {
        let text = rules(&zoned(Some("zone-a"), true, TrafficPolicy::Cluster));
        assert!(text.contains("--to-destination 10.244.1.5:8080"), "{text}");
        assert!(!text.contains("10.244.2.5"), "zone-b's endpoint: {text}");
    }

    #[test]
    fn hints_that_are_not_used_leave_the_rules_as_without_hints() {
        let cluster = TrafficPolicy::Cluster;
        let without = rules(&zoned(None, false, cluster));
        assert!(without.contains("10.244.2.5:8080"), "{without}");
        assert_eq!(
            rules(&zoned(None, true, cluster)),
            without,
            "node without a zone"
        );
        assert_eq!(
            rules(&zoned(Some("zone-a"), false, cluster)),
            without,
            "endpoints without hints"
        );
    }

    #[test]
    fn external_policy_local_keeps_a_local_endpoint_hinted_for_another_zone() {
        let text = rules(&zoned(Some("zone-a"), true, TrafficPolicy::Local));
        let jumps = |chain: &str| -> Vec<&str> {
            text.lines()
                .filter(|l| l.starts_with(&format!("-A {chain}-")) && l.contains(" -> "))
                .filter_map(|l| l.split(" -> ").nth(1)?.split('"').next())
                .collect()
        };
        assert_eq!(
            jumps("KUBE-SVC"),
            ["10.244.1.5:8080"],
            "ClusterIP: zone-a's\n{text}"
        );
        assert_eq!(
            jumps("KUBE-SVL"),
            ["10.244.2.5:8080"],
            "NodePort: the local one"
        );
    }

    /// A rule with its `-m comment --comment "..."` left out.
    fn without_comment(rule: &str) -> String {
        let (head, rest) = rule
            .split_once(" -m comment --comment \"")
            .unwrap_or((rule, "\""));
        let tail = rest.split_once('"').map_or("", |(_, tail)| tail);
        format!("{head}{tail}")
    }

    /// Upstream's iptables mode: one jump to KUBE-NODEPORTS per matching address when
    /// `--nodeport-addresses` is set (none when nothing matched), else `addrtype LOCAL`, which
    /// leaves out IPv6 loopback, and IPv4's without `--iptables-localhost-nodeports`.
    #[test]
    fn nodeport_addresses_give_one_jump_each_and_unset_gives_addrtype_local() {
        let state = zoned(None, false, TrafficPolicy::Cluster);
        let jumps_with = |localhost: bool, everywhere: bool, ips: &[&str]| -> Vec<String> {
            let config = PlanConfig {
                node_name: "node-a".into(),
                node_port_ips: ips.iter().map(|a| a.parse().unwrap()).collect(),
                node_ports_everywhere: everywhere,
                families: vec![Family::V4, Family::V6],
                localhost_node_ports: localhost,
                ..PlanConfig::default()
            };
            plan_iptables_mode(&state, &config, true)
                .lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.ends_with("-j KUBE-NODEPORTS"))
                .map(without_comment)
                .collect()
        };
        let jumps = |everywhere: bool, ips: &[&str]| jumps_with(true, everywhere, ips);
        assert_eq!(
            jumps(true, &["192.168.56.10"]),
            [
                "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
                "-A KUBE-SERVICES ! -d ::1/128 -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
            ],
            "unset: every local address, both families"
        );
        assert_eq!(
            jumps_with(false, true, &["192.168.56.10"]),
            [
                "-A KUBE-SERVICES ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
                "-A KUBE-SERVICES ! -d ::1/128 -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
            ],
            "--iptables-localhost-nodeports=false"
        );
        assert_eq!(
            jumps(false, &["192.168.10.7", "fd00::7"]),
            [
                "-A KUBE-SERVICES -d 192.168.10.7/32 -j KUBE-NODEPORTS",
                "-A KUBE-SERVICES -d fd00::7/128 -j KUBE-NODEPORTS"
            ]
        );
        assert!(
            jumps(false, &[]).is_empty(),
            "set, nothing matched: no jump"
        );
    }

    #[test]
    fn empty_state_plans_only_the_base_chains() {
        let text = plan_iptables(&ClusterState::new(), "node-a", &ProxierConfig::default());
        assert!(text.contains("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"));
        assert!(!text.contains("KUBE-SVC-"));
    }
}
