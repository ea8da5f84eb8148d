//! kube-proxy's ipvs-mode netfilter rules, proven with real traffic in the VM: clients in
//! network namespaces joined to the node (the VM's root namespace) by veth pairs reach pods
//! through NodePorts, LoadBalancer IPs and ClusterIPs, and the pods' own view of each
//! connection (`ss`) shows whether it was masqueraded. Runs only in the VM:
//! `cargo xtask vm-test -p ipvs-proxy -- netfilter_`.

#[allow(
    dead_code,
    reason = "the shared support module serves several test files"
)]
mod support;

use std::fs::File;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    Connection, DAEMON, Daemon, Kernel, POD_PORT, Pod, TempDir, ipset_members, ipvs_lines, run,
    wait_until,
};

/// The node's address on the first client link, given to the daemon by `--node-ip`.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 10);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 20);
/// A second client on its own link, for what the first one may do and it may not.
const NODE_IP_2: Ipv4Addr = Ipv4Addr::new(192, 168, 57, 10);
const CLIENT_IP_2: Ipv4Addr = Ipv4Addr::new(192, 168, 57, 20);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

/// A client outside the cluster: a network namespace whose `eth0` is `me/24`, joined by a veth
/// pair to the node, which holds `node/24` on its end and is the client's default gateway.
struct Client {
    name: String,
}

impl Client {
    fn start(name: &str, node: Ipv4Addr, me: Ipv4Addr) -> Client {
        // The node's end is `NAME-n`, within the 15 bytes of a link name.
        assert!(name.len() <= 12, "client name {name:?} is too long");
        let client = Client {
            name: name.to_owned(),
        };
        let quiet = |args: &[&str]| {
            let _ = Command::new("/bin/ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["netns", "del", name]);
        quiet(&["link", "del", &client.link()]);
        let link = client.link();
        run("/bin/ip", &["netns", "add", name]);
        run(
            "/bin/ip",
            &[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", name,
            ],
        );
        run(
            "/bin/ip",
            &["addr", "add", &format!("{node}/24"), "dev", &link],
        );
        run("/bin/ip", &["link", "set", &link, "up"]);
        let ns = |args: &[&str]| {
            let mut full = vec!["-n", name];
            full.extend_from_slice(args);
            run("/bin/ip", &full);
        };
        ns(&["addr", "add", &format!("{me}/24"), "dev", "eth0"]);
        ns(&["link", "set", "lo", "up"]);
        ns(&["link", "set", "eth0", "up"]);
        ns(&["route", "add", "default", "via", &node.to_string()]);
        client
    }

    fn link(&self) -> String {
        format!("{}-n", self.name)
    }

    fn connect(&self, to: SocketAddr) -> std::io::Result<Connection> {
        connect_from(&self.name, to)
    }

    fn ask(&self, to: SocketAddr) -> std::io::Result<String> {
        self.connect(to)?.ask()
    }

    /// How a connection attempt ends within `limit`, and how long it took.
    fn try_connect(&self, to: SocketAddr, limit: Duration) -> (std::io::Result<()>, Duration) {
        in_netns(&self.name, || {
            let start = Instant::now();
            let result = TcpStream::connect_timeout(&to, limit).map(|_| ());
            (result, start.elapsed())
        })
    }
}

/// Runs `f` on a thread inside the network namespace `ns`: sockets it makes belong there.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            enter_netns(&ns);
            f()
        })
        .join()
        .expect("the namespace thread panicked")
    })
}

/// A TCP connection from the namespace `ns`, kept open.
fn connect_from(ns: &str, to: SocketAddr) -> std::io::Result<Connection> {
    in_netns(ns, || Connection::open(to))
}

impl Drop for Client {
    fn drop(&mut self) {
        for args in [
            vec!["netns", "del", self.name.as_str()],
            vec!["link", "del", &self.link()],
        ] {
            let _ = Command::new("/bin/ip")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[allow(
    unsafe_code,
    reason = "setns(2) has no safe wrapper in our dependencies"
)]
fn enter_netns(ns: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the whole call; setns only changes this thread's
    // network namespace, and the thread was made for this and ends with its work.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The peers of the established connections to a pod's server, as the pod sees them
/// (`ss -N POD -tn state established`).
fn peers_seen_by(pod: &Pod) -> Vec<IpAddr> {
    run("ss", &["-N", &pod.name, "-Htn", "state", "established"])
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // Recv-Q Send-Q Local:Port Peer:Port
            let local: SocketAddr = cols.get(2)?.parse().ok()?;
            let peer: SocketAddr = cols.get(3)?.parse().ok()?;
            (local.port() == POD_PORT).then_some(peer.ip())
        })
        .collect()
}

/// The node's own IPv4 addresses (`ip -o -4 addr`).
fn node_addresses() -> Vec<IpAddr> {
    run("/bin/ip", &["-o", "-4", "addr", "show"])
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// Writes a sysctl under `/proc/sys`.
fn set_sysctl(path: &str, value: &str) {
    let file = format!("/proc/sys/{path}");
    std::fs::write(&file, value).unwrap_or_else(|e| panic!("writing {file}: {e}"));
}

/// `iptables-save` of the flavour the daemon chose (both, as it may be either).
fn saved_rules() -> String {
    ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .map(|tool| {
            Command::new(tool)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What is worth seeing when a wait fails.
fn kernel_state(daemon: &Daemon) -> String {
    format!(
        "ipvsadm -Sn:\n{}\niptables-save:\n{}\ndaemon log:\n{}",
        ipvs_lines().join("\n"),
        saved_rules(),
        daemon.log()
    )
}

/// Waits until a client in the namespace `ns` is answered by `pod` at `to` (the daemon has
/// synced).
fn wait_answered(ns: &str, to: SocketAddr, pod: &Pod, daemon: &Daemon) {
    wait_until(
        &format!("{to} to answer {} from {ns}", pod.name),
        || {
            connect_from(ns, to)
                .and_then(|mut c| c.ask())
                .is_ok_and(|name| name == pod.name)
        },
        || kernel_state(daemon),
    );
}

/// A Service and its one-endpoint slice (the endpoint on node-a, this node), as manifests.
/// `spec` holds the Service's spec lines after `clusterIP` (type, policies, source ranges),
/// `status` its status block, if any.
fn service(name: &str, cluster_ip: &str, ports: &str, spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {cluster_ip}\n{spec}  ports:\n{ports}{status}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - {{name: tcp, port: {POD_PORT}, protocol: TCP}}\nendpoints:\n  - addresses: [{POD_IP}]\n    conditions: {{ready: true}}\n    nodeName: node-a\n"
    )
}

fn tcp_port(port: u16, node_port: Option<u16>) -> String {
    let node_port = node_port.map_or(String::new(), |p| format!(", nodePort: {p}"));
    format!("    - {{name: tcp, port: {port}, targetPort: {POD_PORT}, protocol: TCP{node_port}}}\n")
}

/// A pod, the manifest directory and the daemon's log folder of one test.
struct Setup {
    pod: Pod,
    dir: TempDir,
    logs: TempDir,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        Setup {
            pod: Pod::start(&format!("{tag}-pod"), POD_IP),
            dir: TempDir::new(&format!("nf-{tag}-manifests")),
            logs: TempDir::new(&format!("nf-{tag}-logs")),
        }
    }

    fn start(&self) -> Daemon {
        Daemon::start(
            self.dir.path(),
            &self.logs.path().join("daemon.log"),
            &["--node-ip", &NODE_IP.to_string()],
        )
    }
}

/// NodePort through IPVS: a client off the node reaches NODE_IP:NODEPORT; with
/// `externalTrafficPolicy: Cluster` the pod sees the node as the source (KUBE-NODE-PORT →
/// KUBE-MARK-MASQ → KUBE-POSTROUTING MASQUERADE), with `Local` the client's own address
/// (KUBE-NODE-PORT-LOCAL-TCP returns before the mark).
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn netfilter_nodeport_masquerades_unless_the_traffic_policy_is_local() {
    let _kernel = Kernel::take();
    let setup = Setup::new("nfnp");
    let client = Client::start("nfnp-cli", NODE_IP, CLIENT_IP);
    setup.dir.write(
        "np.yaml",
        &service(
            "np",
            "10.96.0.30",
            &tcp_port(80, Some(30080)),
            "  type: NodePort\n",
            "",
        ),
    );
    setup.dir.write(
        "np-local.yaml",
        &service(
            "np-local",
            "10.96.0.31",
            &tcp_port(80, Some(30081)),
            "  type: NodePort\n  externalTrafficPolicy: Local\n",
            "",
        ),
    );
    // The pod answers an off-link client it sees unmasqueraded through its default route,
    // which has no gateway: the node answers ARP for it, as CNI plugins arrange.
    let proxy_arp = format!("net/ipv4/conf/veth-{}/proxy_arp", setup.pod.name);
    set_sysctl(&proxy_arp, "1");
    let daemon = setup.start();

    let cluster = SocketAddr::from((NODE_IP, 30080));
    wait_answered(&client.name, cluster, &setup.pod, &daemon);
    assert!(
        ipset_members("KUBE-NODE-PORT-TCP").contains(&"30080".to_owned()),
        "{}",
        kernel_state(&daemon)
    );
    let mut conn = client.connect(cluster).expect("connecting to the NodePort");
    assert_eq!(conn.ask().expect("asking"), setup.pod.name);
    let peers = peers_seen_by(&setup.pod);
    let node = node_addresses();
    assert!(
        !peers.is_empty() && peers.iter().all(|p| node.contains(p)),
        "with externalTrafficPolicy=Cluster the pod sees the node ({node:?}) as the source, saw {peers:?}\n{}",
        kernel_state(&daemon)
    );
    conn.reset();

    let local = SocketAddr::from((NODE_IP, 30081));
    wait_answered(&client.name, local, &setup.pod, &daemon);
    assert_eq!(
        ipset_members("KUBE-NODE-PORT-LOCAL-TCP"),
        vec!["30081".to_owned()],
        "{}",
        kernel_state(&daemon)
    );
    let mut conn = client
        .connect(local)
        .expect("connecting to the Local NodePort");
    assert_eq!(conn.ask().expect("asking"), setup.pod.name);
    let peers = peers_seen_by(&setup.pod);
    assert_eq!(
        peers,
        vec![IpAddr::V4(CLIENT_IP)],
        "with externalTrafficPolicy=Local the pod sees the client's own address\n{}",
        kernel_state(&daemon)
    );
    conn.reset();
}

/// KUBE-IPVS-FILTER: a VIP on kube-ipvs0 is a local address, so without the filter every port
/// the node listens on would answer on it too (kubernetes#72236). A port no Service uses is
/// rejected at once, from off the node and from the node; the Service's port answers.
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn netfilter_vip_rejects_ports_no_service_uses_at_once() {
    let _kernel = Kernel::take();
    let setup = Setup::new("nfflt");
    let client = Client::start("nfflt-cli", NODE_IP, CLIENT_IP);
    setup.dir.write(
        "flt.yaml",
        &service("flt", "10.96.0.40", &tcp_port(80, None), "", ""),
    );
    // A server of the node's own, on every address.
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 9099)).expect("binding :9099");
    let daemon = setup.start();

    let vip = Ipv4Addr::new(10, 96, 0, 40);
    wait_answered(
        &client.name,
        SocketAddr::from((vip, 80)),
        &setup.pod,
        &daemon,
    );

    // The node's server is there, on the node's address...
    let (on_node, _) = client.try_connect(SocketAddr::from((NODE_IP, 9099)), PATIENCE_CONNECT);
    assert!(
        on_node.is_ok(),
        "the node's own server answers on {NODE_IP}: {on_node:?}"
    );
    // ... but not through the VIP: refused (ICMP port unreachable), not left to time out.
    let closed = SocketAddr::from((vip, 9099));
    let (result, took) = client.try_connect(closed, PATIENCE_CONNECT);
    assert!(
        matches!(&result, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "{closed} from the client: {result:?} after {took:?}\n{}",
        kernel_state(&daemon)
    );
    assert!(took < Duration::from_secs(2), "refused only after {took:?}");
    let start = Instant::now();
    let from_node = TcpStream::connect_timeout(&closed, PATIENCE_CONNECT);
    assert!(
        matches!(&from_node, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "{closed} from the node: {from_node:?} after {:?}",
        start.elapsed()
    );
    assert!(
        saved_rules().contains(
            "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT"
        ),
        "{}",
        kernel_state(&daemon)
    );
    drop(listener);
}

/// How long a connection attempt may take before it counts as dropped.
const PATIENCE_CONNECT: Duration = Duration::from_secs(3);

/// loadBalancerSourceRanges: the LoadBalancer IP answers a client inside the ranges and
/// drops (silently) one outside them (KUBE-LOAD-BALANCER-FW → KUBE-SOURCE-RANGES-FIREWALL,
/// KUBE-LOAD-BALANCER-SOURCE-CIDR); widening the ranges lets the second one in.
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn netfilter_load_balancer_source_ranges_allow_and_drop() {
    let _kernel = Kernel::take();
    let setup = Setup::new("nflb");
    let inside = Client::start("nflb-in", NODE_IP, CLIENT_IP);
    let outside = Client::start("nflb-out", NODE_IP_2, CLIENT_IP_2);
    let lb = |ranges: &str| {
        service(
            "lb",
            "10.96.0.50",
            &tcp_port(80, Some(30090)),
            &format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [{ranges}]\n"),
            "status:\n  loadBalancer:\n    ingress:\n      - ip: 192.0.2.50\n",
        )
    };
    setup.dir.write("lb.yaml", &lb("192.168.56.0/24"));
    let daemon = setup.start();

    let ingress = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 50), 80));
    wait_answered(&inside.name, ingress, &setup.pod, &daemon);
    assert_eq!(
        ipset_members("KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        vec!["192.0.2.50,tcp:80,192.168.56.0/24".to_owned()],
        "{}",
        kernel_state(&daemon)
    );
    let (result, took) = outside.try_connect(ingress, PATIENCE_CONNECT);
    assert!(
        matches!(&result, Err(e) if e.kind() == ErrorKind::TimedOut),
        "a client outside loadBalancerSourceRanges is dropped, got {result:?} after {took:?}\n{}",
        kernel_state(&daemon)
    );
    // Its way to the node is fine otherwise: the rule was what kept it out.
    setup
        .dir
        .write("lb.yaml", &lb("192.168.56.0/24, 192.168.57.0/24"));
    wait_answered(&outside.name, ingress, &setup.pod, &daemon);
    assert!(inside.ask(ingress).is_ok_and(|n| n == setup.pod.name));
}

/// loadBalancerSourceRanges that leave out the node's address keep the node itself out too
/// (kube-proxy's KUBE-IPVS-OUT-FILTER: the node's own connections to the LoadBalancer IP are
/// dropped), while ranges that include it let it in (KUBE-LOAD-BALANCER-SOURCE-IP).
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn netfilter_load_balancer_source_ranges_without_the_node_drop_the_node() {
    let _kernel = Kernel::take();
    let setup = Setup::new("nflbn");
    let inside = Client::start("nflbn-in", NODE_IP, CLIENT_IP);
    let outside = Client::start("nflbn-out", NODE_IP_2, CLIENT_IP_2);
    let lb = |name: &str, cluster_ip: &str, ingress: &str, ranges: &str| {
        service(
            name,
            cluster_ip,
            &tcp_port(80, None),
            &format!(
                "  type: LoadBalancer\n  allocateLoadBalancerNodePorts: false\n  loadBalancerSourceRanges: [{ranges}]\n"
            ),
            &format!("status:\n  loadBalancer:\n    ingress:\n      - ip: {ingress}\n"),
        )
    };
    // The node (--node-ip 192.168.56.10) is inside the first one's ranges, not the second's.
    setup.dir.write(
        "with.yaml",
        &lb("with", "10.96.0.52", "192.0.2.52", "192.168.56.0/24"),
    );
    setup.dir.write(
        "without.yaml",
        &lb("without", "10.96.0.53", "192.0.2.53", "192.168.57.0/24"),
    );
    let daemon = setup.start();

    let with = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 52), 80));
    let without = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 53), 80));
    wait_answered(&inside.name, with, &setup.pod, &daemon);
    wait_answered(&outside.name, without, &setup.pod, &daemon);
    let (result, _) = inside.try_connect(without, PATIENCE_CONNECT);
    assert!(
        matches!(&result, Err(e) if e.kind() == ErrorKind::TimedOut),
        "{without} drops a client outside its ranges, got {result:?}"
    );

    // The node itself.
    let mut conn = Connection::open(with).expect("the node reaches the LB whose ranges hold it");
    assert_eq!(conn.ask().expect("asking"), setup.pod.name);
    conn.reset();
    let start = Instant::now();
    let result = TcpStream::connect_timeout(&without, PATIENCE_CONNECT);
    assert!(
        matches!(&result, Err(e) if e.kind() == ErrorKind::TimedOut),
        "the node's own connection to {without} is dropped, got {result:?} after {:?}\n{}",
        start.elapsed(),
        kernel_state(&daemon)
    );
    // `ipvs-proxy plan` prints the rule as iptables-save shows it.
    let planned = run(
        DAEMON,
        &[
            "plan",
            "--only",
            "iptables",
            "--manifests",
            &setup.dir.path().display().to_string(),
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--node-ip",
            &NODE_IP.to_string(),
        ],
    );
    let out_filter: Vec<&str> = planned
        .lines()
        .filter(|l| l.starts_with("-A KUBE-IPVS-OUT-FILTER"))
        .collect();
    assert_eq!(
        out_filter,
        vec![
            "-A KUBE-IPVS-OUT-FILTER -s 192.0.2.53/32 -m ipvs --vproto 6 --vaddr 192.0.2.53 --vport 80 -j DROP"
        ],
        "{planned}"
    );
    let saved = saved_rules();
    let missing: Vec<&str> = planned
        .lines()
        .filter(|l| l.starts_with("-A ") && !saved.lines().any(|s| s == *l))
        .collect();
    assert!(
        missing.is_empty(),
        "planned rules iptables-save does not show:\n{}\n{}",
        missing.join("\n"),
        kernel_state(&daemon)
    );
    assert!(
        saved.lines().any(|l| l == out_filter[0]),
        "iptables-save shows the planned rule {:?}\n{}",
        out_filter[0],
        kernel_state(&daemon)
    );
}

/// A pod reaching itself through its own ClusterIP (hairpin): KUBE-LOOP-BACK masquerades the
/// connection, so the pod sees it come from the node and its replies go back through IPVS.
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn netfilter_pod_reaches_itself_through_its_cluster_ip() {
    let _kernel = Kernel::take();
    let setup = Setup::new("nfhp");
    setup.dir.write(
        "hp.yaml",
        &service("hp", "10.96.0.60", &tcp_port(80, None), "", ""),
    );
    let daemon = setup.start();
    // The pod as a client of its own Service.
    let vip = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 60), 80));
    wait_answered(&setup.pod.name, vip, &setup.pod, &daemon);
    assert_eq!(
        ipset_members("KUBE-LOOP-BACK"),
        vec![format!("{POD_IP},tcp:{POD_PORT},{POD_IP}")]
    );
    let mut conn = connect_from(&setup.pod.name, vip).expect("connecting to itself");
    assert_eq!(conn.ask().expect("asking"), setup.pod.name);
    let peers = peers_seen_by(&setup.pod);
    let node = node_addresses();
    assert!(
        !peers.is_empty() && peers.iter().all(|p| node.contains(p)),
        "the pod sees the node ({node:?}) as the source of its own hairpin connection, saw {peers:?}\n{}",
        kernel_state(&daemon)
    );
    conn.reset();
}

/// `--detect-local-mode NodeCIDR` in IPVS mode: the Node's podCIDR (10.244.1.0/24), not
/// `--cluster-cidr` (10.244.0.0/16), tells local traffic. A ClusterIP connection from inside
/// it reaches the pod with its own source; one from another node's pod range (inside the
/// cluster CIDR) is masqueraded, the pod seeing the node. The rule is upstream's
/// `! -s PODCIDR … KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ`.
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn netfilter_node_cidr_mode_masquerades_cluster_ip_traffic_from_outside_the_pod_cidr_only() {
    let _kernel = Kernel::take();
    let setup = Setup::new("nfnc");
    let local_ip = Ipv4Addr::new(10, 244, 1, 20);
    let other_ip = Ipv4Addr::new(10, 244, 2, 20);
    let local = Client::start("nfnc-in", Ipv4Addr::new(10, 244, 1, 1), local_ip);
    let other = Client::start("nfnc-out", Ipv4Addr::new(10, 244, 2, 1), other_ip);
    setup.dir.write(
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec:\n  podCIDR: 10.244.1.0/24\n  podCIDRs: [10.244.1.0/24]\n",
    );
    setup.dir.write(
        "nc.yaml",
        &service("nc", "10.96.0.70", &tcp_port(80, None), "", ""),
    );
    // The pod answers unmasqueraded clients through its default route, which has no
    // gateway: the node answers ARP for them, as CNI plugins arrange.
    set_sysctl(
        &format!("net/ipv4/conf/veth-{}/proxy_arp", setup.pod.name),
        "1",
    );
    let daemon = Daemon::start(
        setup.dir.path(),
        &setup.logs.path().join("daemon.log"),
        &[
            "--node-ip",
            &NODE_IP.to_string(),
            "--detect-local-mode",
            "NodeCIDR",
        ],
    );
    let vip = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 70), 80));
    wait_answered(&local.name, vip, &setup.pod, &daemon);
    let rule = "-A KUBE-SERVICES ! -s 10.244.1.0/24 -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ";
    assert!(
        saved_rules().lines().any(|l| l == rule),
        "no `{rule}`\n{}",
        kernel_state(&daemon)
    );

    let mut conn = local.connect(vip).expect("connecting from the pod CIDR");
    assert_eq!(conn.ask().expect("asking"), setup.pod.name);
    assert_eq!(
        peers_seen_by(&setup.pod),
        vec![IpAddr::V4(local_ip)],
        "from inside the node's podCIDR the pod sees the client itself\n{}",
        kernel_state(&daemon)
    );
    conn.reset();

    wait_answered(&other.name, vip, &setup.pod, &daemon);
    let mut conn = other
        .connect(vip)
        .expect("connecting from another pod CIDR");
    assert_eq!(conn.ask().expect("asking"), setup.pod.name);
    let peers = peers_seen_by(&setup.pod);
    let node = node_addresses();
    assert!(
        !peers.is_empty()
            && peers
                .iter()
                .all(|p| node.contains(p) && *p != IpAddr::V4(other_ip)),
        "from outside the node's podCIDR the pod sees the node ({node:?}), saw {peers:?}\n{}",
        kernel_state(&daemon)
    );
    conn.reset();
}

/// A daemon with its metrics server on `metrics`; killed on drop.
struct MetricsDaemon(Child);

impl Drop for MetricsDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on `addr`: the response body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned()))
}

/// In the VM IPVS works, so the daemon runs the IPVS proxier, says so, and `/proxyMode` on
/// the metrics address answers `ipvs` (the host's fallback is tests/fallback_daemon.rs).
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn netfilter_in_the_vm_the_ipvs_proxier_runs_not_the_fallback() {
    let _kernel = Kernel::take();
    let dir = TempDir::new("nf-mode-manifests");
    let logs = TempDir::new("nf-mode-logs");
    let log = logs.path().join("daemon.log");
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, 10349));
    let out = File::create(&log).expect("creating the log");
    let daemon = MetricsDaemon(
        Command::new(DAEMON)
            .arg("--manifests")
            .arg(dir.path())
            .args(["--hostname-override", "node-a"])
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .args(["--metrics-bind-address", &metrics.to_string()])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(out.try_clone().expect("cloning the log"))
            .stderr(out)
            .spawn()
            .expect("starting ipvs-proxy"),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut mode = String::new();
    wait_until(
        "/proxyMode to answer",
        || {
            http_get(metrics, "/proxyMode").is_ok_and(|body| {
                mode = body;
                true
            })
        },
        read_log,
    );
    assert_eq!(mode.trim(), "ipvs", "{}", read_log());
    let text = read_log();
    assert!(
        text.lines()
            .any(|l| l.contains("running the IPVS proxier") && l.contains("mode=\"ipvs\"")),
        "the log says the IPVS proxier runs:\n{text}"
    );
    assert!(
        !text.contains("IPVS is unavailable"),
        "no fallback in the VM:\n{text}"
    );
    drop(daemon);
}
