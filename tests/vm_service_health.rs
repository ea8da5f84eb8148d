//! The service health servers end to end, in the VM: the daemon on a manifest directory with
//! a LoadBalancer Service of `externalTrafficPolicy: Local`, probed on the node's address and
//! the Service's `healthCheckNodePort` as a cloud load balancer probes every node. Runs only in
//! the VM: `cargo xtask vm-test -p ipvs-proxy -- service_health`.

#[allow(
    dead_code,
    reason = "the shared support module serves several test files"
)]
mod support;

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Daemon, Kernel, POD_PORT, TempDir, run, wait_until};

/// This node's address, on a dummy link of the test's own, given to the daemon by `--node-ip`.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 58, 10);
const LINK: &str = "hcnode0";
const HEALTH_CHECK_NODE_PORT: u16 = 32_100;

/// The node's address on `LINK`, removed on drop.
struct NodeAddress;

impl NodeAddress {
    fn add() -> NodeAddress {
        let _ = Command::new("/bin/ip")
            .args(["link", "del", LINK])
            .stderr(Stdio::null())
            .status();
        run("/bin/ip", &["link", "add", LINK, "type", "dummy"]);
        run(
            "/bin/ip",
            &["addr", "add", &format!("{NODE_IP}/32"), "dev", LINK],
        );
        run("/bin/ip", &["link", "set", LINK, "up"]);
        NodeAddress
    }
}

impl Drop for NodeAddress {
    fn drop(&mut self) {
        let _ = Command::new("/bin/ip")
            .args(["link", "del", LINK])
            .stderr(Stdio::null())
            .status();
    }
}

/// The LoadBalancer Service and its slice, whose one ready endpoint runs on `node`.
fn manifests(node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: shop
  namespace: default
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.60
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_CHECK_NODE_PORT}
  ports:
    - {{name: tcp, port: 80, targetPort: {POD_PORT}, protocol: TCP, nodePort: 30100}}
status:
  loadBalancer:
    ingress:
      - ip: 192.0.2.60
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: shop-abcde
  namespace: default
  labels:
    kubernetes.io/service-name: shop
addressType: IPv4
ports:
  - {{name: tcp, port: {POD_PORT}, protocol: TCP}}
endpoints:
  - addresses: [10.244.1.5]
    conditions: {{ready: true}}
    nodeName: {node}
"
    )
}

/// A load balancer's probe: `GET /` on the node's health-check port; (status, body).
fn probe() -> std::io::Result<(u16, String)> {
    let to = SocketAddr::from((NODE_IP, HEALTH_CHECK_NODE_PORT));
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {NODE_IP}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

fn wait_for_probe(
    what: &str,
    daemon: &Daemon,
    mut ok: impl FnMut(&std::io::Result<(u16, String)>) -> bool,
) {
    wait_until(
        what,
        || ok(&probe()),
        || format!("probe: {:?}\ndaemon log:\n{}", probe(), daemon.log()),
    );
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn service_health_answers_for_local_endpoints_and_closes_with_the_service() {
    let _kernel = Kernel::take();
    let _node = NodeAddress::add();
    let dir = TempDir::new("svchealth-manifests");
    let logs = TempDir::new("svchealth-logs");
    dir.write("shop.yaml", &manifests("node-a"));
    let daemon = Daemon::start(
        dir.path(),
        &logs.path().join("daemon.log"),
        &["--node-ip", &NODE_IP.to_string()],
    );

    wait_for_probe(
        "200 with one local endpoint",
        &daemon,
        |r| matches!(r, Ok((200, body)) if body.contains(r#""localEndpoints":1"#)),
    );
    let (_, body) = probe().unwrap();
    assert_eq!(
        body,
        r#"{"service":{"namespace":"default","name":"shop"},"localEndpoints":1,"serviceProxyHealthy":true}"#
    );

    // The endpoint moves to another node: this node has none left.
    dir.write("shop.yaml", &manifests("node-b"));
    wait_for_probe(
        "503 with no local endpoint",
        &daemon,
        |r| matches!(r, Ok((503, body)) if body.contains(r#""localEndpoints":0"#)),
    );

    dir.remove("shop.yaml");
    wait_for_probe(
        "the port to refuse connections",
        &daemon,
        |r| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
    );
}
