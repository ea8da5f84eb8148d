//! The synthetic cluster every daemon benchmark writes as manifests (`bench_sync`,
//! `bench_fallback`, and `controllers`' `bench_manifests`, which includes this file alone).

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Endpoints per Service.
pub const ENDPOINTS: u32 = 10;

/// Service `i`: ClusterIP 10.96.0.0/12 + i + 1, port 80/TCP, ten endpoints from 10.128.0.0/10.
/// `moved` replaces the last endpoint's address.
pub fn service_yaml(i: u32, moved: Option<Ipv4Addr>) -> String {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1);
    let mut endpoints = String::new();
    for j in 0..ENDPOINTS {
        let ip = match moved {
            Some(ip) if j == ENDPOINTS - 1 => ip,
            _ => endpoint(i, j),
        };
        let _ = writeln!(
            endpoints,
            "  - addresses: [{ip}]\n    conditions: {{ready: true}}\n    nodeName: node-{}",
            j % 3
        );
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: bench\nspec:\n  clusterIP: {vip}\n  ports:\n    - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-x\n  namespace: bench\n  labels:\n    kubernetes.io/service-name: svc-{i}\naddressType: IPv4\nports:\n  - {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n{endpoints}"
    )
}

/// Endpoint `j` of Service `i`.
pub fn endpoint(i: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * ENDPOINTS + j + 1)
}
