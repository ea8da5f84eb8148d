//! Kubernetes objects → model, and the manifest-directory source.

use std::path::Path;

use controllers::manifests::{Snapshot, parse_into, read_dir};
use controllers::source::{Event, Kind, Model, Object};
use reconciler::model::{
    Protocol, Scheduler, SchedulerChoice, ServiceType, SessionAffinity, TrafficPolicy,
};
use reconciler::{ClusterState, ServiceName, ServicePortName};

fn parse(text: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    parse_into(Path::new("test.yaml"), text, &mut snap);
    snap
}

/// The node the tests' proxy runs on.
const NODE: &str = "node-a";

fn state(text: &str) -> ClusterState {
    state_on(text, NODE)
}

/// The state of the proxy on `node`.
fn state_on(text: &str, node: &str) -> ClusterState {
    let snap = parse(text);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mut st = ClusterState::new();
    controllers::apply_all(&mut st, snap.events(node));
    st
}

const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, annotations: {ipvs-proxy.io/scheduler: lc}}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.20, 'fd00::20']
  externalIPs: [198.51.100.50]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [' 203.0.113.0/24 ']
  sessionAffinity: ClientIP
  ports:
    - {name: http, port: 80, nodePort: 30080}
    - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.100}, {ip: 198.51.100.101, ipMode: Proxy}, {hostname: lb.example.com}]
";

#[test]
fn service_converts_to_one_service_port_per_port_with_every_field() {
    let st = state(WEB);
    let ports = st.service(&ServiceName::new("shop", "web")).unwrap();
    assert_eq!(ports.len(), 2);
    let p = &ports[0];
    assert_eq!(&*p.name.port, "http");
    assert_eq!(p.name.protocol, Protocol::Tcp);
    assert_eq!(ports[1].name.protocol, Protocol::Udp);
    assert_eq!(p.service_type, ServiceType::LoadBalancer);
    assert_eq!(p.cluster_ips.len(), 2);
    assert_eq!(p.external_ips[0].to_string(), "198.51.100.50");
    // ipMode: Proxy and hostname-only ingresses are not VIPs.
    assert_eq!(p.load_balancer_ips.len(), 1);
    assert_eq!(
        p.load_balancer_source_ranges[0].to_string(),
        "203.0.113.0/24"
    );
    assert_eq!(p.node_port, Some(30080));
    assert_eq!(p.health_check_node_port, Some(32000));
    assert_eq!(
        p.session_affinity,
        SessionAffinity::ClientIp {
            timeout_seconds: 10_800
        }
    );
    assert_eq!(p.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(p.internal_traffic_policy, TrafficPolicy::Local);
    assert_eq!(
        p.scheduler,
        SchedulerChoice::Named(Scheduler::LeastConnection)
    );
    // Address lists are shared between the ports of one Service.
    assert!(std::sync::Arc::ptr_eq(
        &p.cluster_ips,
        &ports[1].cluster_ips
    ));
}

#[test]
fn services_kube_proxy_skips_are_skipped() {
    // (case, manifest)
    for (case, doc) in [
        ("headless", "spec: {clusterIP: None, ports: [{port: 80}]}"),
        (
            "ExternalName",
            "spec: {type: ExternalName, externalName: x.example.com}",
        ),
        ("no ClusterIP", "spec: {ports: [{port: 80}]}"),
        (
            "another proxy's",
            "metadata: {name: s, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        ),
    ] {
        let text = if doc.starts_with("metadata") {
            format!("apiVersion: v1\nkind: Service\n{doc}\n")
        } else {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\n{doc}\n")
        };
        assert_eq!(state(&text).service_count(), 0, "{case}");
    }
}

#[test]
fn kube_router_scheduler_annotation_is_accepted_and_unknown_names_are_kept_for_the_report() {
    for (annotation, want) in [
        (
            "kube-router.io/service.scheduler: sh",
            SchedulerChoice::Named(Scheduler::SourceHashing),
        ),
        (
            "ipvs-proxy.io/scheduler: fastest",
            SchedulerChoice::Unknown("fastest".into()),
        ),
    ] {
        let st = state(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, annotations: {{{annotation}}}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
        ));
        let ports = st.service(&ServiceName::new("default", "s")).unwrap();
        assert_eq!(ports[0].scheduler, want);
    }
}

#[test]
fn client_ip_timeout_is_taken_from_the_config() {
    let st = state(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: 10.96.0.1\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  ports: [{port: 80}]\n",
    );
    let ports = st.service(&ServiceName::new("default", "s")).unwrap();
    assert_eq!(
        ports[0].session_affinity,
        SessionAffinity::ClientIp {
            timeout_seconds: 60
        }
    );
}

#[test]
fn endpoint_slices_match_ports_by_name_and_default_their_conditions() {
    let st = state(
        r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-a, zone: z1}
  - {addresses: [10.244.2.7], conditions: {ready: false, serving: true, terminating: true}}
",
    );
    let port = ServicePortName {
        service: ServiceName::new("shop", "web"),
        port: "dns".into(),
        protocol: Protocol::Udp,
    };
    let eps = st.endpoints(&port);
    assert_eq!(eps.len(), 2);
    assert_eq!(eps[0].port, 5353);
    assert!(eps[0].conditions.ready && !eps[0].conditions.terminating);
    assert!(eps[0].local, "on node-a, this node");
    assert!(!eps[1].conditions.ready && eps[1].conditions.terminating);
    assert!(!eps[1].local, "on no node");
    let elsewhere = state_on(
        r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.1.5], nodeName: node-a, zone: z1}]
",
        "node-b",
    );
    assert!(
        !elsewhere.endpoints(&port)[0].local,
        "node-a's, seen from node-b"
    );
    let wrong_protocol = ServicePortName {
        protocol: Protocol::Tcp,
        ..port
    };
    assert!(st.endpoints(&wrong_protocol).is_empty());
}

const HINTED: &str = r"
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
status: {addresses: [{type: InternalIP, address: 192.168.56.10}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  trafficDistribution: PreferSameZone
  ports: [{name: http, port: 80}, {name: alt, port: 81}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: alt, port: 8081}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-b, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
  - {addresses: [10.244.2.5], nodeName: node-c, zone: zone-b, hints: {forZones: [{name: zone-b}]}}
  - addresses: [10.244.3.5]
    nodeName: node-d
    zone: zone-a
    hints: {forZones: [{name: zone-a}], forNodes: [{name: node-d}]}
  - {addresses: [10.244.4.5], nodeName: node-e, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
  - {addresses: [10.244.5.5], conditions: {ready: false}, hints: {}}
";

#[test]
fn endpoint_hints_are_read_against_this_node() {
    let port = |name: &str| ServicePortName {
        service: ServiceName::new("shop", "web"),
        port: name.into(),
        protocol: Protocol::Tcp,
    };
    let st = state(HINTED);
    let (http, alt) = (st.endpoints(&port("http")), st.endpoints(&port("alt")));
    let zones = |i: usize| -> Vec<String> {
        let list = http[i].hints.zones.map(|z| z.zones().to_vec());
        list.unwrap_or_default()
            .into_iter()
            .map(String::from)
            .collect()
    };
    assert_eq!(zones(0), ["zone-a"]);
    assert_eq!(zones(1), ["zone-b"]);
    assert_eq!(zones(2), ["zone-a"]);
    assert!(!http[0].hints.for_nodes);
    let d = http[2].hints;
    assert!(
        d.for_nodes && !d.for_this_node,
        "node-d's hint, seen from node-a"
    );
    assert!(!http[4].hints.any(), "empty hints are no hints");
    assert_eq!(
        http[0].hints, alt[0].hints,
        "the same for the slice's ports"
    );
    assert_eq!(
        http[0].hints.zones, http[3].hints.zones,
        "one id for equal lists"
    );
    assert_ne!(http[0].hints.zones, http[1].hints.zones);

    let on_d = state_on(HINTED, "node-d").endpoints(&port("http"));
    assert!(on_d[2].hints.for_this_node && on_d[2].local, "node-d's own");
    assert!(!on_d[0].hints.for_this_node && !on_d[0].local);
}

#[test]
fn a_zone_a_node_plans_only_the_zone_a_endpoints_of_a_hinted_slice() {
    let st = state(HINTED);
    let settings = reconciler::Settings {
        plan: reconciler::PlanConfig {
            node_name: "node-a".into(),
            ..reconciler::PlanConfig::default()
        },
        ..reconciler::Settings::default()
    };
    let config = settings.plan_config(&st);
    assert_eq!(config.node_zone.as_deref(), Some("zone-a"));
    let ipvsadm = reconciler::Planner::new(config).plan(&st).render_ipvsadm();
    assert!(
        ipvsadm.contains("-a -t 10.96.0.20:80 -r 10.244.1.5:8080"),
        "{ipvsadm}"
    );
    assert!(
        ipvsadm.contains("-a -t 10.96.0.20:80 -r 10.244.3.5:8080"),
        "{ipvsadm}"
    );
    assert!(
        ipvsadm.contains("-a -t 10.96.0.20:80 -r 10.244.4.5:8080"),
        "{ipvsadm}"
    );
    assert!(
        !ipvsadm.contains("10.244.2.5"),
        "zone-b's endpoint: {ipvsadm}"
    );
}

#[test]
fn node_addresses_list_internal_ips_before_external_ones() {
    let st = state(
        r"
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}
status:
  addresses:
    - {type: ExternalIP, address: 198.51.100.10}
    - {type: Hostname, address: node-a}
    - {type: InternalIP, address: 192.168.56.10}
",
    );
    let n = st.node("node-a").unwrap();
    let addrs: Vec<String> = n.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(addrs, ["192.168.56.10", "198.51.100.10"]);
    assert_eq!(n.zone.as_deref(), Some("z1"));
}

#[test]
fn node_pod_cidrs_come_from_pod_cidrs_else_pod_cidr() {
    let cidrs = |yaml: &str| {
        let st = state(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\nspec: {yaml}\n"
        ));
        let n = st.node("node-a").unwrap();
        n.pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cidrs("{podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, 'fd00:10:244:1::/64']}"),
        ["10.244.1.0/24", "fd00:10:244:1::/64"]
    );
    assert_eq!(cidrs("{podCIDR: 10.244.2.0/24}"), ["10.244.2.0/24"]);
    assert_eq!(
        cidrs("{podCIDRs: [10.244.3.0/24, not-a-cidr]}"),
        ["10.244.3.0/24"]
    );
    assert!(cidrs("{}").is_empty());
}

#[test]
fn multi_document_files_and_lists_load_and_other_kinds_are_ignored() {
    let snap = parse(
        r"
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
---
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}
  - {apiVersion: v1, kind: Node, metadata: {name: n}}
---
",
    );
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let kinds: Vec<Kind> = snap.objects.keys().map(|k| k.kind).collect();
    assert_eq!(kinds, [Kind::Service, Kind::Node]);
}

#[test]
fn malformed_document_is_reported_with_file_and_index_and_the_rest_loads() {
    let snap = parse(
        r"
apiVersion: v1
kind: Service
metadata: {name: good}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad}
spec: {ports: [{port: eighty}]}
---
apiVersion: v1
kind: Service
spec: {clusterIP: 10.96.0.3}
---
apiVersion: v1
kind: Node
metadata: {name: n}
",
    );
    assert_eq!(snap.objects.len(), 2);
    let errs: Vec<String> = snap.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].starts_with("test.yaml: document 1: invalid Service"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].starts_with("test.yaml: document 2: Service without metadata.name"),
        "{}",
        errs[1]
    );
}

#[test]
fn yaml_syntax_error_keeps_documents_before_it() {
    let snap = parse("apiVersion: v1\nkind: Node\nmetadata: {name: n}\n---\nkind: [unclosed\n");
    assert_eq!(snap.objects.len(), 1);
    assert_eq!(snap.errors[0].document, 1);
}

#[test]
fn rereading_yields_only_the_differences_as_events() {
    let before = parse(
        "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: b}\n",
    );
    let after = parse(
        "apiVersion: v1\nkind: Node\nmetadata: {name: b, labels: {x: y}}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: c}\n",
    );
    let events = after.events_since(&before, NODE);
    assert_eq!(events.len(), 3);
    assert!(matches!(&events[0], Event::Delete(k) if &*k.name == "a"));
    assert!(
        events[1..]
            .iter()
            .all(|e| matches!(e, Event::Apply(Model::Node { .. })))
    );
    assert!(after.events_since(&after, NODE).is_empty());
}

#[test]
fn service_that_becomes_headless_is_removed_from_the_state() {
    let mut st = state(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
    );
    let headless = parse(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: None, ports: [{port: 80}]}\n",
    );
    let affected = controllers::apply_all(&mut st, headless.events(NODE));
    assert_eq!(affected.services, [ServiceName::new("default", "s")]);
    assert_eq!(st.service_count(), 0);
}

#[test]
fn the_shipped_examples_load_without_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/examples");
    let snap = read_dir(&dir).unwrap();
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    assert!(snap.files >= 5);
}

#[test]
fn unreadable_directory_is_an_error() {
    assert!(read_dir(Path::new("/nonexistent/manifests")).is_err());
}

#[test]
fn names_the_api_server_would_refuse_reject_their_object_by_name_and_field() {
    let long = "a".repeat(300);
    let svc = |meta: &str, port: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {meta}\n\
             spec: {{clusterIP: 10.96.0.9, ports: [{{name: {port}, port: 80}}]}}\n"
        )
    };
    let slice = |meta: &str, port: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {meta}\n\
             addressType: IPv4\nports: [{{name: {port}, port: 80}}]\nendpoints: []\n"
        )
    };
    let cases = [
        (
            svc(r#"{name: "bad\nname"}"#, "http"),
            r#"Service "default/bad\nname": metadata.name "bad\nname" must be a DNS-1123 label"#,
        ),
        (
            svc(&format!("{{name: {long}}}"), "http"),
            "metadata.name \"aaaa",
        ),
        (
            svc("{name: web, namespace: Shop}", "http"),
            r#"Service "Shop/web": metadata.namespace "Shop""#,
        ),
        (
            svc("{name: web}", "a--b"),
            r#"Service "default/web": spec.ports[0].name "a--b" must not"#,
        ),
        (
            svc("{name: web}", "'80'"),
            r#"spec.ports[0].name "80" must contain at least one letter"#,
        ),
        (
            slice(
                "{name: web_1, labels: {kubernetes.io/service-name: web}}",
                "http",
            ),
            r#"EndpointSlice "default/web_1": metadata.name "web_1" must be a DNS-1123 subdomain"#,
        ),
        (
            slice(
                r#"{name: web-1, labels: {kubernetes.io/service-name: "a\nb"}}"#,
                "http",
            ),
            r#"metadata.labels[kubernetes.io/service-name] "a\nb""#,
        ),
        (
            slice("{name: web-1}", "Http"),
            r#"EndpointSlice "default/web-1": ports[0].name "Http""#,
        ),
        (
            "apiVersion: v1\nkind: Node\nmetadata: {name: Node-A}\n".to_owned(),
            r#"Node "Node-A": metadata.name"#,
        ),
    ];
    let good = svc("{name: good}", "http");
    for (doc, expected) in &cases {
        let snap = parse(&format!("{good}---\n{doc}"));
        let errs: Vec<String> = snap.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 1, "{doc}: {errs:?}");
        assert!(errs[0].contains(expected), "{doc}: {}", errs[0]);
        assert!(!errs[0].contains('\n'), "one log line: {}", errs[0]);
        assert_eq!(snap.objects.len(), 1, "the good Service still loads");
    }
    // Names as long as the rules allow load.
    let ok = parse(&format!(
        "{}---\n{}",
        svc(&format!("{{name: {}}}", "a".repeat(63)), "abcdefghijklmno"),
        slice(&format!("{{name: {}}}", "b".repeat(253)), "x-1")
    ));
    assert!(ok.errors.is_empty(), "{:?}", ok.errors);
}

#[test]
fn a_service_over_the_virtual_server_cap_is_rejected_and_one_at_it_loads() {
    use controllers::convert::{MAX_VIRTUAL_SERVERS_PER_SERVICE, Skipped, service_ports};
    let service = |ports: usize| -> k8s_openapi::api::core::v1::Service {
        let ports: Vec<String> = (1..=ports).map(|p| format!("{{port: {p}}}")).collect();
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: big}}\n\
             spec: {{clusterIPs: [10.96.0.1, 'fd00::1'], ports: [{}]}}\n",
            ports.join(", ")
        );
        serde_yaml::from_str(&text).unwrap()
    };
    let at = service(MAX_VIRTUAL_SERVERS_PER_SERVICE / 2);
    assert_eq!(
        service_ports(&at).unwrap().len(),
        MAX_VIRTUAL_SERVERS_PER_SERVICE / 2
    );
    let over = service(MAX_VIRTUAL_SERVERS_PER_SERVICE / 2 + 1);
    let err = service_ports(&over).unwrap_err();
    assert_eq!(
        err,
        Skipped::TooManyVirtualServers {
            vips: 2,
            ports: 501
        }
    );
    assert_eq!(
        err.to_string(),
        "2 VIPs × 501 ports are 1002 virtual servers, more than the 1000 a Service may have"
    );
    let mut st = ClusterState::new();
    controllers::apply_all(
        &mut st,
        [Event::apply(&Object::Service(Box::new(over)), NODE)],
    );
    assert!(
        st.service(&ServiceName::new("default", "big")).is_none(),
        "held as absent"
    );
}

#[test]
fn odd_service_and_slice_fields_convert_without_panicking() {
    let svc: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(
        "metadata: {}\nspec: {clusterIPs: ['', 'x'], ports: [{port: -1}, {port: 70000}, \
         {port: 80, protocol: '', nodePort: -5}], sessionAffinity: ClientIP, \
         sessionAffinityConfig: {clientIP: {timeoutSeconds: -1}}}\n",
    )
    .unwrap();
    assert!(controllers::convert::service_ports(&svc).is_err());
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_yaml::from_str(
        "metadata: {labels: {kubernetes.io/service-name: ''}}\naddressType: IPv4\n\
         ports: [{port: -1}, {}]\nendpoints: [{addresses: []}, {addresses: ['::x']}]\n",
    )
    .unwrap();
    let model = controllers::convert::endpoint_slice(&slice, NODE).unwrap();
    assert!(model.ports.is_empty());
}

#[test]
fn each_endpoint_slice_change_carries_its_last_change_trigger_time() {
    use std::time::{Duration, SystemTime};
    let snap = parse(
        r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2026-12-01T13:00:00.25Z'}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-2
  namespace: shop
  labels: {kubernetes.io/service-name: web}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: 'yesterday'}
addressType: IPv4
endpoints: [{addresses: [10.244.1.6]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.7]}]
",
    );
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let mut events = snap.events(NODE);
    events.push(Event::Delete(controllers::source::ObjectKey {
        kind: Kind::EndpointSlice,
        namespace: "shop".into(),
        name: "db-1".into(),
    }));
    let mut folded = controllers::source::fold(&mut ClusterState::new(), events);
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_130_000_250);
    // The slice whose annotation cannot be read, the one without, the delete; the annotated.
    folded.endpoint_triggers.sort();
    assert_eq!(folded.endpoint_triggers, vec![None, None, None, Some(at)]);
    assert_eq!(folded.endpoint_changes, 4);
}
