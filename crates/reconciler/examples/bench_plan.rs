//! Plans a synthetic cluster: 10,000 Services (ClusterIP, every tenth a NodePort) × 10
//! endpoints each, and prints the time to compute the plan.
//!
//! `cargo run --release -p reconciler --example bench_plan [SERVICES]`
//! Last line: `bench plan 10000 ours=0.12s`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use iptables::Family;
use reconciler::model::{
    Conditions, Endpoint, EndpointPort, EndpointSlice, Hints, Protocol, SchedulerChoice,
    ServiceName, ServicePort, ServicePortName, ServiceType, SessionAffinity, TrafficPolicy,
};
use reconciler::{ClusterState, PlanConfig, Planner};

fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

fn main() {
    let services: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let mut state = ClusterState::new();
    for i in 0..services {
        let name = ServiceName::new("bench", &format!("svc-{i}"));
        let nodeport = i % 10 == 0;
        let port = ServicePort {
            name: ServicePortName {
                service: name.clone(),
                port: "http".into(),
                protocol: Protocol::Tcp,
            },
            service_type: if nodeport {
                ServiceType::NodePort
            } else {
                ServiceType::ClusterIp
            },
            port: 80,
            cluster_ips: Arc::from([v4(0x0a60_0000 + i)]),
            external_ips: Arc::from([]),
            load_balancer_ips: Arc::from([]),
            load_balancer_source_ranges: Arc::from([]),
            node_port: nodeport.then(|| 30000 + u16::try_from(i / 10 % 2700).unwrap_or(0)),
            health_check_node_port: None,
            session_affinity: SessionAffinity::None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            scheduler: SchedulerChoice::Default,
        };
        let endpoints: Vec<Endpoint> = (0..10)
            .map(|e| Endpoint {
                ip: v4(0x0af4_0000 + i * 10 + e),
                port: 8080,
                conditions: Conditions::default(),
                // On node-0, this node, for one in 50.
                local: (i + e).is_multiple_of(50),
                hints: Hints::default(),
            })
            .collect();
        state.upsert_slice(
            ("bench".into(), format!("svc-{i}-abcde").into()),
            EndpointSlice {
                service: name.clone(),
                ports: vec![EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    endpoints: endpoints.into(),
                }],
            },
        );
        state.upsert_service(name, vec![port]);
    }
    let config = PlanConfig {
        node_name: "node-0".into(),
        node_addresses: vec![v4(0xc0a8_380a)],
        node_port_ips: vec![v4(0xc0a8_380a)],
        families: vec![Family::V4],
        ..PlanConfig::default()
    };
    let planner = Planner::new(config.clone());

    let start = Instant::now();
    let plan = planner.plan(&state);
    let plan_time = start.elapsed();

    let start = Instant::now();
    let text = plan.render_ipvsadm().len()
        + plan.render_addresses().len()
        + plan.render_ipsets().len()
        + plan.render_iptables(&config, Family::V4).len();
    let rendered = start.elapsed();

    println!(
        "{} virtual servers, {} real servers, {} addresses; plan {:.3}s, render {:.3}s ({} bytes)",
        plan.virtual_servers.len(),
        plan.real_server_count(),
        plan.addresses.len(),
        plan_time.as_secs_f64(),
        rendered.as_secs_f64(),
        text
    );
    println!("bench plan {services} ours={:.2}s", plan_time.as_secs_f64());
}
