//! One test per behaviour of the desired state, in the spirit of kube-proxy's ipvs proxier
//! tests: a small cluster in, the kernel state out.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use iptables::{Family, SetEntry};
use proptest::prelude::*;

use super::*;
use crate::model::{
    Conditions, EndpointPort, EndpointSlice, Hints, ServiceType, SessionAffinity, TrafficPolicy,
};

const NODE: &str = "node-a";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn svc(name: &str, cluster_ips: &[&str], port: u16) -> ServicePort {
    let name = ServicePortName {
        service: ServiceName::new("ns", name),
        port: "p".into(),
        protocol: Protocol::Tcp,
    };
    let ips: Vec<IpAddr> = cluster_ips.iter().map(|s| ip(s)).collect();
    ServicePort::cluster_ip(name, port, &ips)
}

/// (address, ready, serving, terminating, node)
fn ep(addr: &str, ready: bool, serving: bool, terminating: bool, node: &str) -> Endpoint {
    Endpoint {
        ip: ip(addr),
        port: 8080,
        conditions: Conditions {
            ready,
            serving,
            terminating,
        },
        local: node == NODE,
        hints: Hints::default(),
    }
}

fn ready(addr: &str, node: &str) -> Endpoint {
    ep(addr, true, true, false, node)
}

fn config() -> PlanConfig {
    PlanConfig {
        node_name: NODE.into(),
        node_addresses: vec![ip("192.168.56.10"), ip("fd00:56::10")],
        node_port_ips: vec![ip("192.168.56.10"), ip("fd00:56::10")],
        families: vec![Family::V4, Family::V6],
        ..PlanConfig::default()
    }
}

fn plan_with(cfg: PlanConfig, services: Vec<(ServicePort, Vec<Endpoint>)>) -> Plan {
    let mut state = ClusterState::new();
    for (i, (port, eps)) in services.into_iter().enumerate() {
        let name = port.name.service.clone();
        state.upsert_slice(
            (name.namespace.clone(), format!("slice-{i}").into()),
            EndpointSlice {
                service: name.clone(),
                ports: vec![EndpointPort {
                    name: port.name.port.clone(),
                    protocol: port.name.protocol,
                    endpoints: eps.into(),
                }],
            },
        );
        state.upsert_service(name, vec![port]);
    }
    Planner::new(cfg).plan(&state)
}

fn plan(services: Vec<(ServicePort, Vec<Endpoint>)>) -> Plan {
    plan_with(config(), services)
}

/// The real servers of the virtual server at `addr:port/tcp`, as "ip:port" strings.
fn reals(plan: &Plan, addr: &str, port: u16) -> Vec<String> {
    let key = (ip(addr), port, Protocol::Tcp);
    let vs = plan
        .virtual_servers
        .get(&key)
        .unwrap_or_else(|| panic!("no virtual server {addr}:{port}\n{}", plan.render_ipvsadm()));
    vs.real_servers.iter().map(|r| r.addr.to_string()).collect()
}

fn set(plan: &Plan, family: Family, set: KubeSet) -> Vec<String> {
    plan.sets[&(family, set)]
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn cluster_ip_gets_a_virtual_server_a_bound_address_and_a_set_entry() {
    let p = plan(vec![(
        svc("web", &["10.96.0.20"], 80),
        vec![ready("10.244.1.5", NODE)],
    )]);
    assert_eq!(
        p.render_ipvsadm(),
        "-A -t 10.96.0.20:80 -s rr\n-a -t 10.96.0.20:80 -r 10.244.1.5:8080 -m -w 1\n"
    );
    assert_eq!(p.render_addresses(), "10.96.0.20/32\n");
    assert_eq!(
        set(&p, Family::V4, KubeSet::ClusterIp),
        ["10.96.0.20,tcp:80"]
    );
    assert_eq!(set(&p, Family::V4, KubeSet::IpvsIps), ["10.96.0.20"]);
}

#[test]
fn endpoint_selection_follows_kube_proxys_ready_then_terminating_rule() {
    // (case, endpoints, expected real servers)
    let cases: Vec<(&str, Vec<Endpoint>, Vec<&str>)> = vec![
        (
            "ready endpoints only, when any is ready",
            vec![
                ready("10.244.1.1", NODE),
                ep("10.244.1.2", false, true, true, NODE),
                ep("10.244.1.3", false, false, false, NODE),
            ],
            vec!["10.244.1.1:8080"],
        ),
        (
            "serving and terminating ones when none is ready",
            vec![
                ep("10.244.1.2", false, true, true, NODE),
                ep("10.244.1.3", false, false, true, NODE),
                ep("10.244.1.4", false, false, false, NODE),
            ],
            vec!["10.244.1.2:8080"],
        ),
        (
            "no endpoints: a virtual server without real servers",
            vec![],
            vec![],
        ),
        (
            "duplicate endpoints collapse",
            vec![ready("10.244.1.1", NODE), ready("10.244.1.1", "node-b")],
            vec!["10.244.1.1:8080"],
        ),
    ];
    for (case, eps, want) in cases {
        let p = plan(vec![(svc("web", &["10.96.0.20"], 80), eps)]);
        assert_eq!(reals(&p, "10.96.0.20", 80), want, "{case}");
    }
}

#[test]
fn dual_stack_service_gets_one_virtual_server_per_family_with_that_familys_endpoints() {
    let p = plan(vec![(
        svc("api", &["10.96.0.4", "fd00:10:96::4"], 9090),
        vec![ready("10.244.1.50", NODE), ready("fd00:10:244::50", NODE)],
    )]);
    assert_eq!(reals(&p, "10.96.0.4", 9090), ["10.244.1.50:8080"]);
    assert_eq!(reals(&p, "fd00:10:96::4", 9090), ["[fd00:10:244::50]:8080"]);
    assert_eq!(
        set(&p, Family::V6, KubeSet::ClusterIp),
        ["fd00:10:96::4,tcp:9090"]
    );
    assert!(p.render_addresses().contains("fd00:10:96::4/128"));
}

#[test]
fn single_stack_service_is_not_programmed_in_the_other_family() {
    let mut s = svc("web", &["10.96.0.20"], 80);
    s.node_port = Some(30080);
    s.external_ips = Arc::from([ip("fd00:1::1")]);
    let p = plan(vec![(s, vec![ready("fd00:10:244::1", NODE)])]);
    assert!(p.virtual_servers.keys().all(|k| k.0.is_ipv4()));
    assert!(set(&p, Family::V6, KubeSet::NodePortTcp).is_empty());
}

#[test]
fn external_ips_get_bound_virtual_servers_and_the_external_set_by_policy() {
    for (policy, set_name, other) in [
        (
            TrafficPolicy::Cluster,
            KubeSet::ExternalIp,
            KubeSet::ExternalIpLocal,
        ),
        (
            TrafficPolicy::Local,
            KubeSet::ExternalIpLocal,
            KubeSet::ExternalIp,
        ),
    ] {
        let mut s = svc("legacy", &["10.96.30.7"], 8443);
        s.external_ips = Arc::from([ip("198.51.100.50")]);
        s.external_traffic_policy = policy;
        let p = plan(vec![(s, vec![ready("10.244.1.40", NODE)])]);
        assert_eq!(reals(&p, "198.51.100.50", 8443), ["10.244.1.40:8080"]);
        assert!(p.addresses.contains(&ip("198.51.100.50")));
        assert_eq!(set(&p, Family::V4, set_name), ["198.51.100.50,tcp:8443"]);
        assert!(set(&p, Family::V4, other).is_empty());
    }
}

#[test]
fn external_ip_that_is_a_node_address_is_served_but_not_bound() {
    let mut s = svc("legacy", &["10.96.30.7"], 8443);
    s.external_ips = Arc::from([ip("192.168.56.10")]);
    let p = plan(vec![(s, vec![ready("10.244.1.40", NODE)])]);
    assert_eq!(reals(&p, "192.168.56.10", 8443), ["10.244.1.40:8080"]);
    assert!(!p.addresses.contains(&ip("192.168.56.10")));
    assert!(!set(&p, Family::V4, KubeSet::IpvsIps).contains(&"192.168.56.10".to_owned()));
}

fn load_balancer(ranges: &[&str]) -> ServicePort {
    let mut s = svc("ingress", &["10.96.20.1"], 80);
    s.service_type = ServiceType::LoadBalancer;
    s.node_port = Some(30800);
    s.load_balancer_ips = Arc::from([ip("198.51.100.100")]);
    s.load_balancer_source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
    s
}

#[test]
fn load_balancer_ingress_ip_gets_a_bound_virtual_server_and_the_lb_set() {
    let p = plan(vec![(load_balancer(&[]), vec![ready("10.244.1.30", NODE)])]);
    assert_eq!(reals(&p, "198.51.100.100", 80), ["10.244.1.30:8080"]);
    assert!(p.addresses.contains(&ip("198.51.100.100")));
    assert_eq!(
        set(&p, Family::V4, KubeSet::LoadBalancer),
        ["198.51.100.100,tcp:80"]
    );
    assert!(set(&p, Family::V4, KubeSet::LoadBalancerFw).is_empty());
}

#[test]
fn source_ranges_fill_the_firewall_sets_and_let_the_node_in_only_when_covered() {
    // (ranges, node allowed)
    for (ranges, node_allowed) in [
        (&["203.0.113.0/24", "192.168.56.0/24"][..], true),
        (&["203.0.113.0/24"][..], false),
    ] {
        let p = plan(vec![(
            load_balancer(ranges),
            vec![ready("10.244.1.30", NODE)],
        )]);
        assert_eq!(
            set(&p, Family::V4, KubeSet::LoadBalancerFw),
            ["198.51.100.100,tcp:80"]
        );
        assert_eq!(
            set(&p, Family::V4, KubeSet::LoadBalancerSourceCidr).len(),
            ranges.len()
        );
        assert_eq!(
            set(&p, Family::V4, KubeSet::LoadBalancerSourceIp),
            if node_allowed {
                vec!["198.51.100.100,tcp:80,198.51.100.100".to_owned()]
            } else {
                vec![]
            }
        );
        let out_filter = p.render_iptables(&config(), Family::V4);
        assert_eq!(
            out_filter.contains(
                "-A KUBE-IPVS-OUT-FILTER -s 198.51.100.100/32 -m ipvs --vproto 6 --vaddr 198.51.100.100 --vport 80 -j DROP"
            ),
            !node_allowed,
            "{ranges:?}\n{out_filter}"
        );
    }
}

#[test]
fn node_port_is_served_on_every_node_address_without_binding_it() {
    let p = plan(vec![(load_balancer(&[]), vec![ready("10.244.1.30", NODE)])]);
    assert_eq!(reals(&p, "192.168.56.10", 30800), ["10.244.1.30:8080"]);
    assert!(!p.addresses.contains(&ip("192.168.56.10")));
    assert_eq!(set(&p, Family::V4, KubeSet::NodePortTcp), ["30800"]);
    // IPv4-only Service: no IPv6 NodePort even though the node has an IPv6 address.
    assert!(!p.virtual_servers.keys().any(|k| k.0 == ip("fd00:56::10")));
}

#[test]
fn sctp_node_port_set_holds_node_address_and_port() {
    let mut s = load_balancer(&[]);
    s.name.protocol = Protocol::Sctp;
    let p = plan(vec![(s, vec![])]);
    assert_eq!(
        set(&p, Family::V4, KubeSet::NodePortSctp),
        ["192.168.56.10,sctp:30800"]
    );
}

#[test]
fn node_port_without_node_addresses_is_left_out() {
    let cfg = PlanConfig {
        node_port_ips: vec![],
        ..config()
    };
    let p = plan_with(cfg, vec![(load_balancer(&[]), vec![])]);
    assert!(set(&p, Family::V4, KubeSet::NodePortTcp).is_empty());
    assert!(!p.virtual_servers.keys().any(|k| k.1 == 30800));
}

#[test]
fn scheduler_comes_from_the_flag_or_the_annotation_and_unknown_names_fall_back() {
    let cfg = PlanConfig {
        scheduler: Scheduler::WeightedLeastConnection,
        ..config()
    };
    // (annotation, expected scheduler, warned)
    for (choice, want, warned) in [
        (SchedulerChoice::Default, "wlc", false),
        (SchedulerChoice::from_annotation("lc"), "lc", false),
        (SchedulerChoice::from_annotation(" sh "), "sh", false),
        (SchedulerChoice::from_annotation("fastest"), "wlc", true),
    ] {
        let mut s = svc("web", &["10.96.0.20"], 80);
        s.scheduler = choice;
        let p = plan_with(
            cfg.clone(),
            vec![(s, vec![]), (svc("other", &["10.96.0.21"], 80), vec![])],
        );
        assert!(
            p.render_ipvsadm()
                .starts_with(&format!("-A -t 10.96.0.20:80 -s {want}\n"))
        );
        // The rest keeps working with the default.
        assert!(p.render_ipvsadm().contains("-A -t 10.96.0.21:80 -s wlc\n"));
        assert_eq!(!p.warnings.is_empty(), warned);
        if warned {
            let w = p.warnings[0].to_string();
            assert!(w.contains("ns/web") && w.contains("fastest"), "{w}");
        }
    }
}

#[test]
fn client_ip_affinity_makes_every_virtual_server_persistent() {
    let mut s = load_balancer(&[]);
    s.session_affinity = SessionAffinity::ClientIp {
        timeout_seconds: 10_800,
    };
    let p = plan(vec![(s, vec![])]);
    for vs in p.virtual_servers.values() {
        assert!(
            vs.virtual_server.to_string().ends_with(" -p 10800"),
            "{}",
            vs.virtual_server
        );
    }
}

#[test]
fn maglev_scheduler_hashes_on_source_port_as_kube_proxy_sets_it() {
    let cfg = PlanConfig {
        scheduler: Scheduler::Maglev,
        ..config()
    };
    let p = plan_with(cfg, vec![(svc("web", &["10.96.0.20"], 80), vec![])]);
    assert_eq!(p.render_ipvsadm(), "-A -t 10.96.0.20:80 -s mh -b mh-port\n");
}

#[test]
fn external_traffic_policy_local_uses_local_endpoints_on_external_vips_only() {
    let mut s = load_balancer(&[]);
    s.external_traffic_policy = TrafficPolicy::Local;
    s.external_ips = Arc::from([ip("198.51.100.50")]);
    let eps = vec![ready("10.244.1.30", NODE), ready("10.244.2.31", "node-b")];
    let p = plan(vec![(s, eps)]);
    let both = ["10.244.1.30:8080", "10.244.2.31:8080"];
    assert_eq!(reals(&p, "10.96.20.1", 80), both, "ClusterIP uses all");
    for (vip, port) in [
        ("198.51.100.100", 80),
        ("198.51.100.50", 80),
        ("192.168.56.10", 30800),
    ] {
        assert_eq!(reals(&p, vip, port), ["10.244.1.30:8080"], "{vip}");
    }
    assert_eq!(set(&p, Family::V4, KubeSet::NodePortLocalTcp), ["30800"]);
    assert_eq!(
        set(&p, Family::V4, KubeSet::LoadBalancerLocal),
        ["198.51.100.100,tcp:80"]
    );
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_falls_back_to_all_endpoints() {
    // kube-proxy ipvs (PR 97081): pods on this node can still reach the Service through its
    // external VIPs; external clients' packets are not SNATed (KUBE-*-LOCAL RETURN) so replies
    // from another node never reach them, which in effect drops them.
    let mut s = load_balancer(&[]);
    s.external_traffic_policy = TrafficPolicy::Local;
    let p = plan(vec![(s, vec![ready("10.244.2.31", "node-b")])]);
    assert_eq!(reals(&p, "198.51.100.100", 80), ["10.244.2.31:8080"]);
    assert_eq!(reals(&p, "192.168.56.10", 30800), ["10.244.2.31:8080"]);
}

#[test]
fn internal_traffic_policy_local_without_local_endpoints_has_no_real_servers() {
    let mut s = svc("web", &["10.96.0.20"], 80);
    s.internal_traffic_policy = TrafficPolicy::Local;
    let p = plan(vec![(s.clone(), vec![ready("10.244.2.31", "node-b")])]);
    assert_eq!(reals(&p, "10.96.0.20", 80), Vec::<String>::new());
    let p = plan(vec![(
        s,
        vec![ready("10.244.2.31", "node-b"), ready("10.244.1.5", NODE)],
    )]);
    assert_eq!(reals(&p, "10.96.0.20", 80), ["10.244.1.5:8080"]);
}

#[test]
fn loop_back_set_holds_every_local_endpoint_for_hairpin_masquerade() {
    let p = plan(vec![(
        svc("web", &["10.96.0.20"], 80),
        vec![ready("10.244.1.5", NODE), ready("10.244.2.7", "node-b")],
    )]);
    assert_eq!(
        set(&p, Family::V4, KubeSet::LoopBack),
        ["10.244.1.5,tcp:8080,10.244.1.5"]
    );
}

#[test]
fn health_check_node_port_is_opened_by_its_set() {
    let mut s = load_balancer(&[]);
    s.health_check_node_port = Some(32000);
    let p = plan(vec![(s, vec![])]);
    assert_eq!(set(&p, Family::V4, KubeSet::HealthCheckNodePort), ["32000"]);
}

#[test]
fn empty_cluster_still_has_every_set_and_the_fixed_rules() {
    let p = plan(vec![]);
    assert_eq!(p.sets.len(), 2 * KubeSet::ALL.len());
    assert!(p.virtual_servers.is_empty());
    let rules = p.render_iptables(&config(), Family::V4);
    assert!(rules.contains("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"));
    assert!(!rules.contains("KUBE-CLUSTER-IP src,dst"), "{rules}");
}

/// kube-proxy's ipvs mode masquerades ClusterIP traffic that its local detector calls not
/// local (`IfNotLocal`), every source with --masquerade-all, and without a detector for the
/// family (no CIDR of it) the node's own traffic from a VIP (`src,dst`).
#[test]
fn cluster_ip_masquerade_rule_follows_each_detect_local_mode() {
    let prefix = "-A KUBE-SERVICES ";
    let rest = "-m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP";
    let cidrs = |c: &[&str]| c.iter().map(|c| c.parse().unwrap()).collect::<Vec<_>>();
    for (all, detect_local, pod_cidrs, want) in [
        (
            true,
            DetectLocal::ClusterCidr(cidrs(&["10.244.0.0/16"])),
            vec![],
            format!("{prefix}{rest} dst,dst -j KUBE-MARK-MASQ"),
        ),
        (
            false,
            DetectLocal::ClusterCidr(cidrs(&["fd00::/48", "10.244.0.0/16"])),
            vec![],
            format!("{prefix}! -s 10.244.0.0/16 {rest} dst,dst -j KUBE-MARK-MASQ"),
        ),
        (
            false,
            DetectLocal::NodeCidr,
            cidrs(&["10.244.3.0/24", "10.244.4.0/24"]),
            format!("{prefix}! -s 10.244.3.0/24 {rest} dst,dst -j KUBE-MARK-MASQ"),
        ),
        (
            false,
            DetectLocal::BridgeInterface("cbr0".into()),
            vec![],
            format!("{prefix}! -i cbr0 {rest} dst,dst -j KUBE-MARK-MASQ"),
        ),
        (
            false,
            DetectLocal::InterfaceNamePrefix("veth".into()),
            vec![],
            format!("{prefix}! -i veth+ {rest} dst,dst -j KUBE-MARK-MASQ"),
        ),
        (
            false,
            DetectLocal::ClusterCidr(cidrs(&["fd00::/48"])),
            vec![],
            format!("{prefix}{rest} src,dst -j KUBE-MARK-MASQ"),
        ),
        (
            false,
            DetectLocal::NodeCidr,
            vec![],
            format!("{prefix}{rest} src,dst -j KUBE-MARK-MASQ"),
        ),
    ] {
        let cfg = PlanConfig {
            masquerade_all: all,
            detect_local: detect_local.clone(),
            node_pod_cidrs: pod_cidrs,
            ..config()
        };
        let p = plan_with(cfg.clone(), vec![(svc("web", &["10.96.0.20"], 80), vec![])]);
        let rules = p.render_iptables(&cfg, Family::V4);
        let masq: Vec<&str> = rules
            .lines()
            .filter(|l| l.contains("masquerade purpose"))
            .collect();
        assert_eq!(masq, [want.as_str()], "{all} {detect_local:?}");
    }
}

#[test]
fn masquerade_bit_sets_the_mark_everywhere() {
    let cfg = PlanConfig {
        masquerade_bit: 15,
        ..config()
    };
    let rules = plan_with(cfg.clone(), vec![]).render_iptables(&cfg, Family::V4);
    assert!(rules.contains("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x8000/0x8000"));
    assert!(rules.contains("-m mark ! --mark 0x8000/0x8000 -j RETURN"));
    assert!(!rules.contains("0x4000"));
}

#[test]
fn ipvs_filter_rejects_new_connections_to_a_vip_on_an_unused_port() {
    let rules = plan(vec![]).render_iptables(&config(), Family::V6);
    assert!(rules.contains(
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-6-IPVS-IPS dst -j REJECT --reject-with icmp6-port-unreachable"
    ));
    assert!(rules.contains(
        "-A INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER"
    ));
}

#[test]
fn ipsets_are_sized_from_their_content_without_a_65536_cap() {
    let mut p = Plan::empty(&[Family::V4]);
    let entries: BTreeSet<SetEntry> = (0..70_000u32)
        .map(|i| {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a60_0000 + i));
            SetEntry::IpPort(addr, iptables::Protocol::Tcp, 80)
        })
        .collect();
    p.sets.insert((Family::V4, KubeSet::ClusterIp), entries);
    let text = p.render_ipsets();
    let create = text
        .lines()
        .find(|l| l.starts_with("create KUBE-CLUSTER-IP "))
        .unwrap();
    let maxelem: u32 = create.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(maxelem >= 70_000, "{create}");
}

#[test]
fn conflicting_virtual_server_keeps_the_first_service_and_warns() {
    let mut a = svc("a", &["10.96.0.1"], 80);
    a.external_ips = Arc::from([ip("198.51.100.7")]);
    let mut b = svc("b", &["10.96.0.2"], 80);
    b.external_ips = Arc::from([ip("198.51.100.7")]);
    let p = plan(vec![
        (a, vec![ready("10.244.1.1", NODE)]),
        (b, vec![ready("10.244.1.2", NODE)]),
    ]);
    assert_eq!(reals(&p, "198.51.100.7", 80), ["10.244.1.1:8080"]);
    assert!(matches!(
        p.warnings[0],
        PlanWarning::VirtualServerConflict { .. }
    ));
}

#[test]
fn node_port_addresses_filter_by_cidr_and_primary_and_skip_loopback() {
    let addrs = [
        ip("127.0.0.1"),
        ip("192.168.56.10"),
        ip("10.0.2.15"),
        ip("fd00:56::10"),
        ip("fd00:99::1"),
    ];
    // (filter, expected)
    for (filter, want) in [
        (
            NodePortFilter::default(),
            vec!["192.168.56.10", "10.0.2.15", "fd00:56::10", "fd00:99::1"],
        ),
        (
            NodePortFilter {
                cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                primary: false,
            },
            vec!["10.0.2.15"],
        ),
        (
            NodePortFilter {
                cidrs: vec![],
                primary: true,
            },
            vec!["192.168.56.10", "fd00:56::10"],
        ),
    ] {
        let got: Vec<String> = node_port_addresses(&addrs, None, &filter)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, want, "{filter:?}");
    }
}

/// The kernel's addresses, as upstream's ipvs mode uses them: every link's but loopback and
/// IPv6 link-local with no filter; the CIDR matches among them; `primary` from the node's.
#[test]
fn node_port_addresses_from_the_kernel_follow_upstreams_rules() {
    let node = [ip("192.168.56.10"), ip("fd00:56::10")];
    let local: BTreeSet<IpAddr> = [
        "127.0.0.1",
        "::1",
        "169.254.3.3",
        "fe80::1",
        "10.0.2.15",
        "192.168.10.7",
        "192.168.56.10",
        "fd00:56::10",
    ]
    .iter()
    .map(|a| ip(a))
    .collect();
    let cidrs = |c: &[&str]| NodePortFilter {
        cidrs: c.iter().map(|c| c.parse().unwrap()).collect(),
        primary: false,
    };
    // (what, node, filter, expected)
    let cases: [(&str, &[IpAddr], NodePortFilter, Vec<&str>); 6] = [
        (
            "unset: every local address but loopback and IPv6 link-local; the node's first",
            &node,
            NodePortFilter::default(),
            vec![
                "192.168.56.10",
                "fd00:56::10",
                "10.0.2.15",
                "169.254.3.3",
                "192.168.10.7",
            ],
        ),
        (
            "unset, no Node addresses: the kernel's alone",
            &[],
            NodePortFilter::default(),
            vec![
                "10.0.2.15",
                "169.254.3.3",
                "192.168.10.7",
                "192.168.56.10",
                "fd00:56::10",
            ],
        ),
        (
            "a CIDR: the local addresses inside it",
            &node,
            cidrs(&["192.168.10.0/24"]),
            vec!["192.168.10.7"],
        ),
        (
            "a CIDR that covers loopback still never gives it",
            &node,
            cidrs(&["0.0.0.0/0"]),
            vec!["192.168.56.10", "10.0.2.15", "169.254.3.3", "192.168.10.7"],
        ),
        (
            "a CIDR no local address is in: none, not every address",
            &node,
            cidrs(&["203.0.113.0/24"]),
            vec![],
        ),
        (
            "primary and a CIDR: the node's primary of each family, then the matches",
            &node,
            NodePortFilter {
                cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                primary: true,
            },
            vec!["192.168.56.10", "fd00:56::10", "10.0.2.15"],
        ),
    ];
    for (what, node, filter, want) in cases {
        let got: Vec<String> = node_port_addresses(node, Some(&local), &filter)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn built_in_chains_list_prepended_jumps_last_first() {
    let rules = plan(vec![]).render_iptables(&config(), Family::V4);
    let input: Vec<&str> = rules
        .lines()
        .filter(|l| l.starts_with("-A INPUT"))
        .collect();
    assert!(input[0].ends_with("-j KUBE-IPVS-FILTER"));
    assert!(input[2].ends_with("-j KUBE-NODE-PORT"));
    let rs = iptables::ipvs_mode::ruleset(&plan(vec![]).rule_input(&config(), Family::V4));
    assert_eq!(rs.tables[&iptables::Table::Filter].insert_jumps.len(), 6);
}

// Properties.

fn arb_cluster() -> impl Strategy<Value = Vec<(ServicePort, Vec<Endpoint>)>> {
    let service = (
        0u8..40,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(
            (
                0u8..200,
                0u8..4,
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            ),
            0..6,
        ),
    );
    prop::collection::vec(service, 0..12).prop_map(|services| {
        services
            .into_iter()
            .enumerate()
            .map(|(i, (n, node_port, local, v6, eps))| {
                let mut ips = vec![format!("10.96.0.{n}")];
                if v6 {
                    ips.push(format!("fd00:10:96::{n:x}"));
                }
                let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
                let mut s = svc(&format!("s{i}"), &refs, 80 + u16::from(n % 3));
                if node_port {
                    s.node_port = Some(30000 + u16::from(n));
                    s.load_balancer_ips = Arc::from([ip(&format!("198.51.100.{n}"))]);
                }
                if local {
                    s.external_traffic_policy = TrafficPolicy::Local;
                }
                let eps = eps
                    .into_iter()
                    .map(|(a, node, r, sv, t)| {
                        let addr = if a % 2 == 0 {
                            format!("10.244.{node}.{a}")
                        } else {
                            format!("fd00:10:244::{a:x}")
                        };
                        ep(&addr, r, sv, t, &format!("node-{}", (b'a' + node) as char))
                    })
                    .collect();
                (s, eps)
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn plan_is_deterministic(cluster in arb_cluster()) {
        let render = |c: Vec<(ServicePort, Vec<Endpoint>)>| {
            let p = plan(c);
            (p.render_ipvsadm(), p.render_addresses(), p.render_ipsets(), p.render_iptables(&config(), Family::V4))
        };
        let mut reversed = cluster.clone();
        reversed.reverse();
        prop_assert_eq!(render(cluster.clone()), render(cluster.clone()));
        // The order objects arrive in does not matter (services are planned in name order;
        // conflicting VIPs go to the first by name either way).
        prop_assert_eq!(render(cluster).0, render(reversed).0);
    }

    #[test]
    fn every_real_server_belongs_to_a_bound_vip_or_a_node_address(cluster in arb_cluster()) {
        let cfg = config();
        let p = plan(cluster);
        for (key, vs) in &p.virtual_servers {
            let vip_ok = p.addresses.contains(&key.0) || cfg.node_port_ips.contains(&key.0);
            prop_assert!(vip_ok, "{:?} neither bound nor a node address", key);
            for rs in &vs.real_servers {
                prop_assert_eq!(rs.addr.is_ipv4(), key.0.is_ipv4());
            }
        }
    }
}

#[test]
fn planned_virtual_servers_print_as_ipvsadm_save() {
    let mut sctp = svc("sctp", &["10.96.0.11"], 80);
    sctp.name.protocol = Protocol::Sctp;
    sctp.session_affinity = SessionAffinity::ClientIp {
        timeout_seconds: 10800,
    };
    let mut udp = svc("udp", &["fd00::10"], 80);
    udp.name.protocol = Protocol::Udp;
    udp.scheduler = SchedulerChoice::Named(Scheduler::LeastConnection);
    let web = svc("web", &["10.96.0.10"], 80);
    let p = plan(vec![
        (sctp, vec![]),
        (udp, vec![]),
        (web, vec![ready("10.244.1.5", NODE)]),
    ]);
    assert_eq!(
        p.render_ipvsadm(),
        "-A -t 10.96.0.10:80 -s rr\n\
         -a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1\n\
         -A --sctp-service 10.96.0.11:80 -s rr -p 10800\n\
         -A -u [fd00::10]:80 -s lc\n"
    );
}

/// A ready endpoint on `node` with the given zone and node hints (none of either: no hints),
/// as the proxy on NODE reads them.
fn hinted(addr: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Endpoint {
    Endpoint {
        hints: Hints::new(zones.iter().copied(), nodes.iter().copied(), NODE),
        ..ready(addr, node)
    }
}

/// `hinted`, with the conditions changed.
fn with(mut e: Endpoint, ready: bool, serving: bool, terminating: bool) -> Endpoint {
    e.conditions = Conditions {
        ready,
        serving,
        terminating,
    };
    e
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one table, as kube-proxy's TestCategorizeEndpoints"
)]
fn endpoint_choice_applies_topology_hints_as_kube_proxys_categorize_endpoints() {
    use TrafficPolicy::{Cluster, Local};
    struct Case {
        name: &'static str,
        /// (internalTrafficPolicy, externalTrafficPolicy); a NodePort when ETP is Local or
        /// ITP is Local with ETP Cluster, so that both policies matter.
        policies: (TrafficPolicy, TrafficPolicy),
        zone: Option<&'static str>,
        endpoints: Vec<Endpoint>,
        cluster: Vec<&'static str>,
        local: Vec<&'static str>,
    }
    let four = |zones: [&'static str; 4]| -> Vec<Endpoint> {
        (0..4)
            .map(|i| hinted(&format!("10.1.2.{}", i + 3), "node-b", &[zones[i]], &[]))
            .collect()
    };
    let all4 = vec!["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"];
    let cases = vec![
        Case {
            name: "zone hints for the node's zone: only those endpoints",
            policies: (Cluster, Cluster),
            zone: Some("zone-a"),
            endpoints: four(["zone-a", "zone-b", "zone-c", "zone-a"]),
            cluster: vec!["10.1.2.3", "10.1.2.6"],
            local: vec![],
        },
        Case {
            name: "one ready endpoint without a hint: all endpoints",
            policies: (Cluster, Cluster),
            zone: Some("zone-a"),
            endpoints: {
                let mut e = four(["zone-a", "zone-b", "zone-c", "zone-a"]);
                e[2].hints = Hints::default();
                e
            },
            cluster: all4.clone(),
            local: vec![],
        },
        Case {
            name: "node without a zone label: all endpoints",
            policies: (Cluster, Cluster),
            zone: None,
            endpoints: four(["zone-a", "zone-b", "zone-c", "zone-a"]),
            cluster: all4.clone(),
            local: vec![],
        },
        Case {
            name: "no endpoint hinted for the node's zone: all endpoints",
            policies: (Cluster, Cluster),
            zone: Some("zone-d"),
            endpoints: four(["zone-a", "zone-b", "zone-c", "zone-a"]),
            cluster: all4.clone(),
            local: vec![],
        },
        Case {
            name: "an unready endpoint in the zone is left out, the ready one kept",
            policies: (Cluster, Cluster),
            zone: Some("zone-a"),
            endpoints: {
                let mut e = four(["zone-a", "zone-b", "zone-c", "zone-a"]);
                e[3] = with(e[3], false, false, false);
                e
            },
            cluster: vec!["10.1.2.3"],
            local: vec![],
        },
        Case {
            name: "an unready endpoint without hints does not turn hints off",
            policies: (Cluster, Cluster),
            zone: Some("zone-a"),
            endpoints: {
                let mut e = four(["zone-a", "zone-b", "zone-c", "zone-a"]);
                e[1] = with(hinted("10.1.2.4", "node-b", &[], &[]), false, false, false);
                e
            },
            cluster: vec!["10.1.2.3", "10.1.2.6"],
            local: vec![],
        },
        Case {
            name: "only unready endpoints in the node's zone: all ready endpoints",
            policies: (Cluster, Cluster),
            zone: Some("zone-a"),
            endpoints: {
                let mut e = four(["zone-a", "zone-b", "zone-c", "zone-a"]);
                e[0] = with(e[0], false, false, false);
                e[3] = with(e[3], false, false, false);
                e
            },
            cluster: vec!["10.1.2.4", "10.1.2.5"],
            local: vec![],
        },
        Case {
            name: "several zones per endpoint: any endpoint naming the node's zone",
            policies: (Cluster, Cluster),
            zone: Some("zone-c"),
            endpoints: vec![
                hinted("10.1.2.3", "node-b", &["zone-a", "zone-b", "zone-c"], &[]),
                hinted("10.1.2.4", "node-b", &["zone-b", "zone-c"], &[]),
                hinted("10.1.2.5", "node-b", &["zone-b", "zone-d"], &[]),
                hinted("10.1.2.6", "node-b", &["zone-c"], &[]),
            ],
            cluster: vec!["10.1.2.3", "10.1.2.4", "10.1.2.6"],
            local: vec![],
        },
        Case {
            name: "PreferSameNode: node hints for this node win over zone hints",
            policies: (Cluster, Cluster),
            zone: Some("zone-a"),
            endpoints: vec![
                hinted("10.1.2.3", NODE, &["zone-a"], &[NODE]),
                hinted("10.1.2.4", "node-b", &["zone-a"], &["node-b"]),
                hinted("10.1.2.5", "node-c", &["zone-b"], &["node-c"]),
            ],
            cluster: vec!["10.1.2.3"],
            local: vec![],
        },
        Case {
            name: "PreferSameNode needs no zone label",
            policies: (Cluster, Cluster),
            zone: None,
            endpoints: vec![
                hinted("10.1.2.3", NODE, &[], &[NODE]),
                hinted("10.1.2.4", "node-b", &[], &["node-b"]),
            ],
            cluster: vec!["10.1.2.3"],
            local: vec![],
        },
        Case {
            name: "PreferSameNode, no endpoint for this node: the zone hints",
            policies: (Cluster, Cluster),
            zone: Some("zone-a"),
            endpoints: vec![
                hinted("10.1.2.4", "node-b", &["zone-a"], &["node-b"]),
                hinted("10.1.2.5", "node-c", &["zone-b"], &["node-c"]),
            ],
            cluster: vec!["10.1.2.4"],
            local: vec![],
        },
        Case {
            name: "node hints on some endpoints only: the zone hints",
            policies: (Cluster, Cluster),
            zone: Some("zone-b"),
            endpoints: vec![
                hinted("10.1.2.3", NODE, &["zone-a"], &[NODE]),
                hinted("10.1.2.5", "node-c", &["zone-b"], &[]),
            ],
            cluster: vec!["10.1.2.5"],
            local: vec![],
        },
        Case {
            name: "none ready: every serving-and-terminating endpoint, hints ignored",
            policies: (Cluster, Cluster),
            zone: Some("zone-a"),
            endpoints: vec![
                with(
                    hinted("10.1.2.3", NODE, &["zone-a"], &[]),
                    false,
                    true,
                    true,
                ),
                with(
                    hinted("10.1.2.4", "node-b", &["zone-b"], &[]),
                    false,
                    true,
                    true,
                ),
                with(
                    hinted("10.1.2.5", "node-b", &["zone-a"], &[]),
                    false,
                    false,
                    true,
                ),
            ],
            cluster: vec!["10.1.2.3", "10.1.2.4"],
            local: vec![],
        },
        Case {
            name: "externalTrafficPolicy Local: local endpoints ignore the hints",
            policies: (Cluster, Local),
            zone: Some("zone-a"),
            endpoints: vec![
                hinted("10.1.2.3", NODE, &["zone-a"], &[]),
                hinted("10.1.2.4", NODE, &["zone-b"], &[]),
                hinted("10.1.2.5", "node-b", &["zone-c"], &[]),
                hinted("10.1.2.6", "node-b", &["zone-a"], &[]),
            ],
            cluster: vec!["10.1.2.3", "10.1.2.6"],
            local: vec!["10.1.2.3", "10.1.2.4"],
        },
        Case {
            name: "internalTrafficPolicy Local, externalTrafficPolicy Cluster: cluster filtered",
            policies: (Local, Cluster),
            zone: Some("zone-a"),
            endpoints: vec![
                hinted("10.1.2.3", NODE, &["zone-a"], &[]),
                hinted("10.1.2.4", NODE, &["zone-b"], &[]),
                hinted("10.1.2.5", "node-b", &["zone-c"], &[]),
                hinted("10.1.2.6", "node-b", &["zone-a"], &[]),
            ],
            cluster: vec!["10.1.2.3", "10.1.2.6"],
            local: vec!["10.1.2.3", "10.1.2.4"],
        },
        Case {
            name: "both policies Local: no cluster endpoints, local ones unfiltered",
            policies: (Local, Local),
            zone: Some("zone-a"),
            endpoints: vec![
                hinted("10.1.2.4", NODE, &["zone-b"], &[]),
                hinted("10.1.2.6", "node-b", &["zone-a"], &[]),
            ],
            cluster: vec![],
            local: vec!["10.1.2.4"],
        },
    ];
    for case in cases {
        let mut port = svc("web", &["10.96.0.1"], 80);
        (port.internal_traffic_policy, port.external_traffic_policy) = case.policies;
        if case.policies != (Cluster, Cluster) {
            port.node_port = Some(30080);
        }
        let eps: Vec<&Endpoint> = case.endpoints.iter().collect();
        let choice = EndpointChoice::new(&port, &eps, case.zone);
        let addrs = |v: &[&Endpoint]| -> Vec<String> {
            let mut a: Vec<String> = v.iter().map(|e| e.ip.to_string()).collect();
            a.sort();
            a
        };
        assert_eq!(
            addrs(&choice.cluster),
            case.cluster,
            "{}: cluster",
            case.name
        );
        assert_eq!(addrs(&choice.local), case.local, "{}: local", case.name);
    }
}

#[test]
fn zone_a_node_gets_only_zone_a_real_servers_for_a_fully_hinted_service() {
    let mut hinted_svc = svc("web", &["10.96.0.20"], 80);
    hinted_svc.node_port = Some(30080);
    let eps = vec![
        hinted("10.244.1.5", "node-b", &["zone-a"], &[]),
        hinted("10.244.2.5", "node-c", &["zone-b"], &[]),
        hinted("10.244.3.5", "node-d", &["zone-a"], &[]),
    ];
    let partly = svc("api", &["10.96.0.21"], 80);
    let partly_eps = vec![
        hinted("10.244.1.6", "node-b", &["zone-a"], &[]),
        hinted("10.244.2.6", "node-c", &[], &[]),
    ];
    let cfg = PlanConfig {
        node_zone: Some("zone-a".into()),
        ..config()
    };
    let p = plan_with(
        cfg.clone(),
        vec![(hinted_svc.clone(), eps.clone()), (partly, partly_eps)],
    );
    let zone_a = ["10.244.1.5:8080", "10.244.3.5:8080"];
    assert_eq!(reals(&p, "10.96.0.20", 80), zone_a);
    assert_eq!(
        reals(&p, "192.168.56.10", 30080),
        zone_a,
        "NodePort, ETP Cluster"
    );
    assert_eq!(
        reals(&p, "10.96.0.21", 80),
        ["10.244.1.6:8080", "10.244.2.6:8080"],
        "one endpoint without a hint: all"
    );
    let elsewhere = plan_with(
        PlanConfig {
            node_zone: Some("zone-b".into()),
            ..cfg
        },
        vec![(hinted_svc, eps)],
    );
    assert_eq!(reals(&elsewhere, "10.96.0.20", 80), ["10.244.2.5:8080"]);
}
