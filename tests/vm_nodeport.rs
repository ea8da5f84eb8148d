//! NodePort addresses from the kernel and no leaks, end to end in the VM: the daemon on a
//! manifest directory serves a NodePort on every address of the node's links (dummy links of
//! the tests' own, as the VM has no NIC) as they come and go, or on the `--nodeport-addresses`
//! matches; removes a stale NodePort after a restart; makes `kube-ipvs0` again when it is
//! deleted; leaves an excluded address bound. Checked with `ipvsadm -Sn`, `ip addr` and real
//! TCP connections. Runs only in the VM:
//! `cargo xtask vm-test -p ipvs-proxy -- nodeport kube_ipvs0 excluded_address`.

#[allow(
    dead_code,
    reason = "the shared support module serves several test files"
)]
mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    Daemon, Kernel, POD_PORT, Pod, ServiceSpec, TempDir, ask_tcp, ipvs_lines, kube_ipvs0_addresses,
    run, wait_until,
};

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const NODE_PORT: u16 = 30_080;
/// Inside the `--nodeport-addresses` of the filtered test.
const INSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 7);
/// Outside it.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 20, 7);

/// A dummy link of the test's own, up, deleted on drop.
struct Link(&'static str);

impl Link {
    fn add(name: &'static str) -> Link {
        let link = Link(name);
        link.delete();
        run("/bin/ip", &["link", "add", name, "type", "dummy"]);
        run("/bin/ip", &["link", "set", name, "up"]);
        link
    }

    fn add_address(&self, ip: Ipv4Addr) {
        run(
            "/bin/ip",
            &["addr", "add", &format!("{ip}/32"), "dev", self.0],
        );
    }

    fn del_address(&self, ip: Ipv4Addr) {
        run(
            "/bin/ip",
            &["addr", "del", &format!("{ip}/32"), "dev", self.0],
        );
    }

    fn delete(&self) {
        let _ = Command::new("/bin/ip")
            .args(["link", "del", self.0])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A NodePort Service `name` at `cluster_ip`:80 and NODE_PORT, with POD behind it.
fn node_port_service(name: &str, cluster_ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: NodePort
  clusterIP: {cluster_ip}
  ports:
    - {{name: tcp, port: 80, targetPort: {POD_PORT}, protocol: TCP, nodePort: {NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abcde
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
  - {{name: tcp, port: {POD_PORT}, protocol: TCP}}
endpoints:
  - addresses: [{POD}]
    conditions: {{ready: true}}
    nodeName: node-a
"
    )
}

/// The `ipvsadm -Sn` virtual servers on NODE_PORT, as `-A -t IP:PORT -s rr` lines, sorted.
fn node_port_servers() -> Vec<String> {
    ipvs_lines()
        .into_iter()
        .filter(|l| l.starts_with("-A ") && l.contains(&format!(":{NODE_PORT} ")))
        .collect()
}

fn line(ip: Ipv4Addr) -> String {
    format!("-A -t {ip}:{NODE_PORT} -s rr")
}

/// Waits until the NodePort virtual servers are exactly those on `ips`; returns how long.
fn wait_for_node_ports(daemon: &Daemon, ips: &[Ipv4Addr]) -> Duration {
    let started = Instant::now();
    let mut want: Vec<String> = ips.iter().map(|ip| line(*ip)).collect();
    want.sort();
    wait_until(
        &format!("NodePort virtual servers {want:?}"),
        || node_port_servers() == want,
        || {
            format!(
                "ipvsadm -Sn:\n{}\nlog:\n{}",
                ipvs_lines().join("\n"),
                daemon.log()
            )
        },
    );
    started.elapsed()
}

/// How long the daemon's last full sync took, by its own log (`took_ms=`): the floor an
/// address change is compared with, as it is served by one full sync.
fn last_full_sync(daemon: &Daemon) -> Duration {
    daemon
        .full_syncs()
        .last()
        .and_then(|l| {
            l.split("took_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .map_or(Duration::ZERO, |ms: f64| {
            Duration::from_secs_f64(ms / 1000.0)
        })
}

struct Setup {
    pod: Pod,
    dir: TempDir,
    logs: TempDir,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let setup = Setup {
            pod: Pod::start(&format!("{tag}-p"), POD),
            dir: TempDir::new(&format!("{tag}-manifests")),
            logs: TempDir::new(&format!("{tag}-logs")),
        };
        setup
            .dir
            .write("web.yaml", &node_port_service("web", "10.96.0.20"));
        setup
    }

    fn start(&self, extra: &[&str]) -> Daemon {
        Daemon::start(self.dir.path(), &self.logs.path().join("daemon.log"), extra)
    }
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn nodeport_follows_the_addresses_of_the_nodes_links() {
    let _kernel = Kernel::take();
    let setup = Setup::new("npall");
    let link = Link::add("npall0");
    link.add_address(INSIDE);
    let daemon = setup.start(&[]);
    // The Node object has no addresses here: the kernel's are used (loopback never).
    wait_for_node_ports(&daemon, &[INSIDE]);
    assert_eq!(
        ask_tcp(SocketAddr::from((INSIDE, NODE_PORT))).expect("the NodePort answers"),
        setup.pod.name
    );

    // A second address gets the NodePort within one sync of its own, and answers.
    link.add_address(OUTSIDE);
    let took = wait_for_node_ports(&daemon, &[INSIDE, OUTSIDE]);
    eprintln!(
        "nodeport: an added address served after {took:?} (polled; its full sync took {:?})",
        last_full_sync(&daemon)
    );
    assert_eq!(
        ask_tcp(SocketAddr::from((OUTSIDE, NODE_PORT))).expect("the new address answers"),
        setup.pod.name
    );
    let full = daemon.full_syncs().len();
    assert!(full >= 2, "the change brought a sync:\n{}", daemon.log());

    // A removed address loses it.
    link.del_address(INSIDE);
    let took = wait_for_node_ports(&daemon, &[OUTSIDE]);
    eprintln!("nodeport: a removed address dropped after {took:?}");
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn nodeport_addresses_restrict_the_node_ports_to_their_matches() {
    let _kernel = Kernel::take();
    let setup = Setup::new("npcidr");
    let link = Link::add("npcidr0");
    link.add_address(INSIDE);
    link.add_address(OUTSIDE);
    let daemon = setup.start(&["--nodeport-addresses", "192.168.10.0/24"]);
    wait_for_node_ports(&daemon, &[INSIDE]);
    assert_eq!(
        ask_tcp(SocketAddr::from((INSIDE, NODE_PORT))).expect("the matching address answers"),
        setup.pod.name
    );
    assert!(
        ask_tcp(SocketAddr::from((OUTSIDE, NODE_PORT))).is_err(),
        "nothing serves the NodePort outside --nodeport-addresses"
    );

    // A new matching address joins; a new one outside does not.
    let later = Ipv4Addr::new(192, 168, 10, 8);
    link.add_address(later);
    link.add_address(Ipv4Addr::new(192, 168, 30, 8));
    wait_for_node_ports(&daemon, &[INSIDE, later]);
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn nodeport_of_a_service_deleted_while_the_daemon_was_down_is_removed_at_restart() {
    let _kernel = Kernel::take();
    let setup = Setup::new("npleak");
    let link = Link::add("npleak0");
    link.add_address(INSIDE);
    let mut daemon = setup.start(&[]);
    wait_for_node_ports(&daemon, &[INSIDE]);

    daemon.kill();
    setup.dir.remove("web.yaml");
    // Another Service, so the restarted daemon has something to program.
    let other = ServiceSpec {
        name: "other",
        vip: "10.96.0.21",
        port: 80,
        protocols: &["TCP"],
        endpoints: &[POD],
        scheduler: None,
        affinity_seconds: None,
    };
    setup.dir.write("other.yaml", &other.yaml());
    let daemon = setup.start(&[]);
    wait_until(
        "the restarted daemon's first sync",
        || daemon.log().matches(" synced ").count() >= 2,
        || daemon.log(),
    );
    wait_for_node_ports(&daemon, &[]);
    let lines = ipvs_lines();
    assert!(
        !lines.iter().any(|l| l.contains("10.96.0.20:80")),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"-A -t 10.96.0.21:80 -s rr".to_owned()),
        "{lines:#?}"
    );
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn deleted_kube_ipvs0_is_made_again_and_every_cluster_ip_answers_within_two_seconds() {
    let _kernel = Kernel::take();
    let setup = Setup::new("npdel");
    let other = ServiceSpec {
        name: "other",
        vip: "10.96.0.21",
        port: 80,
        protocols: &["TCP"],
        endpoints: &[POD],
        scheduler: None,
        affinity_seconds: None,
    };
    setup.dir.write("other.yaml", &other.yaml());
    let daemon = setup.start(&[]);
    let vips = [
        SocketAddr::from(([10, 96, 0, 20], 80)),
        SocketAddr::from(([10, 96, 0, 21], 80)),
    ];
    wait_until(
        "both ClusterIPs to answer",
        || vips.iter().all(|v| ask_tcp(*v).is_ok()),
        || daemon.log(),
    );

    run("/bin/ip", &["link", "del", "kube-ipvs0"]);
    let deleted = Instant::now();
    wait_until(
        "every ClusterIP to answer again",
        || {
            vips.iter()
                .all(|v| ask_tcp(*v).is_ok_and(|who| who == setup.pod.name))
        },
        || {
            format!(
                "ip addr: {:?}\nlog:\n{}",
                kube_ipvs0_addresses(),
                daemon.log()
            )
        },
    );
    let took = deleted.elapsed();
    eprintln!(
        "nodeport: kube-ipvs0 deleted, every ClusterIP answered again after {took:?} (polled; a full sync took {:?} here)",
        last_full_sync(&daemon)
    );
    assert!(
        took < Duration::from_secs(2),
        "answered again only after {took:?}:\n{}",
        daemon.log()
    );
    assert_eq!(kube_ipvs0_addresses(), ["10.96.0.20/32", "10.96.0.21/32"]);
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn excluded_address_on_kube_ipvs0_stays_bound_across_full_syncs() {
    let _kernel = Kernel::take();
    let setup = Setup::new("npexcl");
    run("/bin/ip", &["link", "add", "kube-ipvs0", "type", "dummy"]);
    run(
        "/bin/ip",
        &["addr", "add", "10.100.0.1/32", "dev", "kube-ipvs0"],
    );
    let daemon = setup.start(&[
        "--ipvs-exclude-cidrs",
        "10.100.0.0/16",
        "--ipvs-sync-period",
        "1s",
    ]);
    wait_until(
        "three full syncs",
        || daemon.full_syncs().len() >= 3,
        || daemon.log(),
    );
    assert_eq!(kube_ipvs0_addresses(), ["10.100.0.1/32", "10.96.0.20/32"]);
}
