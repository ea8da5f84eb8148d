//! The iptables proxier with real TCP traffic between network namespaces on the host:
//! a client, a "node" holding the rules, and three backend "pods" behind veth pairs.
//!
//! Needs root (it creates network namespaces); skips with a message otherwise. Every address
//! lives only inside the namespaces the test creates, and a guard deletes them even on failure.
//! Backends and the client are this test binary itself, re-run inside a namespace with
//! `ip netns exec` and selected by an environment variable (the `helper_*` tests).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use iptables::proxier::{Backend, Proxier, ProxierConfig, ServiceSpec, service_name};
use iptables::{Family, Flavour, Protocol, Runner, cleanup, detect_flavour};

const SERVE_ENV: &str = "IPTABLES_TEST_SERVE";
const CLIENT_ENV: &str = "IPTABLES_TEST_CLIENT";

/// Backend "pod": answers each connection on :8080 with its name and the peer address it saw.
/// Exits when its stdin closes (the test dropped it).
#[test]
fn helper_backend_server() {
    let Ok(name) = std::env::var(SERVE_ENV) else {
        return;
    };
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let listener = TcpListener::bind("0.0.0.0:8080").expect("bind :8080");
    // libtest has printed "test helper_backend_server ... " without a newline.
    println!("\nREADY");
    std::io::stdout().flush().unwrap();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let peer = conn
            .peer_addr()
            .map(|p| p.ip().to_string())
            .unwrap_or_default();
        let _ = writeln!(conn, "{name} {peer}");
    }
}

/// Client: `ADDR COUNT` → COUNT sequential connections, one `RESP <name> <peer>` or
/// `ERR <kind> <millis>` line each.
#[test]
fn helper_client() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let (addr, count) = spec.split_once(' ').unwrap();
    let addr: SocketAddr = addr.parse().unwrap();
    let count: usize = count.parse().unwrap();
    println!();
    for _ in 0..count {
        let start = Instant::now();
        let line = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut text = String::new();
                match s.read_to_string(&mut text) {
                    Ok(_) => format!("RESP {}", text.trim()),
                    Err(e) => format!("ERR {:?} {}", e.kind(), start.elapsed().as_millis()),
                }
            }
            Err(e) => format!("ERR {:?} {}", e.kind(), start.elapsed().as_millis()),
        };
        println!("{line}");
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespaces of one scenario; deleted on drop, servers stopped first.
struct Lab {
    node: String,
    client: String,
    pods: Vec<String>,
    servers: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in self.pods.iter().chain([&self.node, &self.client]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

static LABS: AtomicU32 = AtomicU32::new(0);

const NODE_IP: &str = "192.0.2.1";
const CLIENT_IP: &str = "192.0.2.2";

impl Lab {
    #[allow(
        clippy::too_many_lines,
        reason = "the topology reads best as one list of ip commands"
    )]
    fn new(tag: &str) -> Lab {
        let id = format!(
            "ipt{}-{}{}",
            std::process::id(),
            tag,
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            node: format!("{id}-node"),
            client: format!("{id}-client"),
            pods: (0..3).map(|i| format!("{id}-pod{i}")).collect(),
            servers: Vec::new(),
        };
        for ns in lab.pods.iter().chain([&lab.node, &lab.client]) {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let node = lab.node.clone();
        // No ICMP redirects: VIPs without endpoints are forwarded back out towards the client,
        // and a redirect would use up the per-host ICMP budget REJECT's answer needs.
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        ] {
            sh(&["ip", "netns", "exec", &node, "sysctl", "-qw", setting]);
        }
        // client <-> node
        sh(&[
            "ip",
            "-n",
            &node,
            "link",
            "add",
            "nc0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &lab.client,
        ]);
        sh(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "nc0",
        ]);
        sh(&["ip", "-n", &node, "link", "set", "nc0", "up"]);
        sh(&[
            "ip",
            "-n",
            &lab.client,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &lab.client, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &lab.client,
            "route",
            "add",
            "default",
            "via",
            NODE_IP,
        ]);
        // Unrouted service VIPs leave the node towards the client (as to a default gateway),
        // so they cross FORWARD, where kube-proxy's filter rules sit.
        sh(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            "10.96.0.0/16",
            "via",
            CLIENT_IP,
        ]);
        // node <-> pods
        for (i, pod) in lab.pods.iter().enumerate() {
            let link = format!("np{i}");
            sh(&[
                "ip", "-n", &node, "link", "add", &link, "type", "veth", "peer", "name", "eth0",
                "netns", pod,
            ]);
            sh(&[
                "ip",
                "-n",
                &node,
                "addr",
                "add",
                &format!("10.244.{i}.1/24"),
                "dev",
                &link,
            ]);
            sh(&["ip", "-n", &node, "link", "set", &link, "up"]);
            sh(&[
                "ip",
                "-n",
                pod,
                "addr",
                "add",
                &format!("10.244.{i}.2/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", pod, "link", "set", "eth0", "up"]);
            sh(&[
                "ip",
                "-n",
                pod,
                "route",
                "add",
                "default",
                "via",
                &format!("10.244.{i}.1"),
            ]);
        }
        let exe = std::env::current_exe().unwrap();
        for (i, pod) in lab.pods.clone().iter().enumerate() {
            let mut child = Command::new("ip")
                .args(["netns", "exec", pod])
                .arg(&exe)
                .args([
                    "helper_backend_server",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(SERVE_ENV, format!("pod{i}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            lab.servers.push(child);
            assert!(
                lines.any(|l| l.is_ok_and(|l| l.trim() == "READY")),
                "backend pod{i} did not start"
            );
        }
        lab
    }

    /// `count` connections from the client namespace to `addr`.
    fn requests(&self, addr: &str, count: usize) -> Vec<String> {
        Lab::requests_from(&self.client, addr, count)
    }

    /// `count` connections from namespace `ns` (the client's or a pod's) to `addr`.
    fn requests_from(ns: &str, addr: &str, count: usize) -> Vec<String> {
        eprintln!("{ns}: {count} requests to {addr}");
        let exe = std::env::current_exe().unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&exe)
            .args([
                "helper_client",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CLIENT_ENV, format!("{addr} {count}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("RESP ") || l.starts_with("ERR "))
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), count, "client output: {text}");
        lines
    }

    /// Per backend name, how many answers; and the peer addresses the backends saw.
    fn tally(lines: &[String]) -> (BTreeMap<String, usize>, Vec<String>) {
        let mut counts = BTreeMap::new();
        let mut peers = Vec::new();
        for l in lines {
            let mut w = l.split(' ');
            assert_eq!(w.next(), Some("RESP"), "failed request: {l}");
            *counts.entry(w.next().unwrap().to_owned()).or_insert(0) += 1;
            peers.push(w.next().unwrap_or("").to_owned());
        }
        (counts, peers)
    }

    fn ipt(&self, flavour: Flavour, args: &[&str]) {
        let tool = format!("iptables-{}", flavour.as_str());
        let mut full = vec!["ip", "netns", "exec", &self.node, &tool];
        full.extend_from_slice(args);
        sh(&full);
    }

    fn save(&self, flavour: Flavour) -> String {
        sh_out(&[
            "ip",
            "netns",
            "exec",
            &self.node,
            &format!("iptables-{}-save", flavour.as_str()),
        ])
    }
}

fn backend(i: u8, local: bool) -> Backend {
    Backend::ready(SocketAddr::new(IpAddr::from([10, 244, i, 2]), 8080), local)
}

fn services(web_backends: &[u8]) -> Vec<ServiceSpec> {
    let all = |s: &mut ServiceSpec, which: &[u8]| {
        // pod0 and pod1 run on this node; pod2 stands for a pod on another node.
        s.backends = which.iter().map(|&i| backend(i, i < 2)).collect();
    };
    let mut web =
        ServiceSpec::cluster_ip("test/web:http", Protocol::Tcp, [10, 96, 0, 10].into(), 80);
    web.node_port = Some(30080);
    all(&mut web, web_backends);
    let mut local =
        ServiceSpec::cluster_ip("test/local:http", Protocol::Tcp, [10, 96, 0, 11].into(), 80);
    local.node_port = Some(30081);
    local.external_local = true;
    all(&mut local, &[0, 1, 2]);
    let mut sticky = ServiceSpec::cluster_ip(
        "test/sticky:http",
        Protocol::Tcp,
        [10, 96, 0, 12].into(),
        80,
    );
    sticky.affinity_seconds = Some(10_800);
    all(&mut sticky, &[0, 1, 2]);
    let mut empty =
        ServiceSpec::cluster_ip("test/empty:http", Protocol::Tcp, [10, 96, 0, 13].into(), 80);
    empty.node_port = Some(30083);
    vec![web, local, sticky, empty]
}

/// The Services whose ports differ from `before` to `after`, as `Proxier::sync_services`
/// takes them (a Service gone has no ports).
fn changes(before: &[ServiceSpec], after: &[ServiceSpec]) -> Vec<(String, Vec<ServiceSpec>)> {
    let by_service = |specs: &[ServiceSpec]| {
        let mut out: BTreeMap<String, Vec<ServiceSpec>> = BTreeMap::new();
        for s in specs {
            out.entry(service_name(&s.name).to_owned())
                .or_default()
                .push(s.clone());
        }
        out
    };
    let (before, after) = (by_service(before), by_service(after));
    let mut changed: Vec<(String, Vec<ServiceSpec>)> = before
        .keys()
        .filter(|name| !after.contains_key(*name))
        .map(|name| (name.clone(), Vec::new()))
        .collect();
    changed.extend(
        after
            .into_iter()
            .filter(|(name, ports)| before.get(name) != Some(ports)),
    );
    changed
}

const USER_RULES: [(&str, &str); 2] = [
    ("nat", "-A POSTROUTING -j USER-NAT"),
    ("filter", "-A INPUT -j USER-FILTER"),
];

fn assert_user_rules(lab: &Lab, flavour: Flavour, when: &str) {
    let saved = lab.save(flavour);
    for (_, rule) in USER_RULES {
        assert!(
            saved.lines().any(|l| l == rule),
            "{when}: user rule `{rule}` is gone:\n{saved}"
        );
    }
    for line in [
        ":USER-NAT - [0:0]",
        ":USER-FILTER - [0:0]",
        "-A USER-NAT -d 203.0.113.7/32 -j RETURN",
        "-A USER-FILTER -s 203.0.113.7/32 -j ACCEPT",
    ] {
        assert!(
            saved
                .lines()
                .any(|l| l.starts_with(line.split(" [").next().unwrap())),
            "{when}: `{line}` is gone:\n{saved}"
        );
    }
}

#[allow(
    clippy::too_many_lines,
    reason = "one scenario, checked step by step on the same lab"
)]
fn scenario(flavour: Flavour) {
    if !is_root() {
        eprintln!("skipping: needs root to create network namespaces");
        return;
    }
    let lab = Lab::new(flavour.as_str());
    // A user's own chains and rules, in nat and filter, before the proxy runs.
    for (table, chain, rule) in [
        ("nat", "USER-NAT", "-d 203.0.113.7/32 -j RETURN"),
        ("filter", "USER-FILTER", "-s 203.0.113.7/32 -j ACCEPT"),
    ] {
        lab.ipt(flavour, &["-t", table, "-N", chain]);
        let mut args = vec!["-t", table, "-A", chain];
        args.extend(rule.split(' '));
        lab.ipt(flavour, &args);
    }
    for (table, rule) in USER_RULES {
        let mut args = vec!["-t", table];
        args.extend(rule.split(' '));
        lab.ipt(flavour, &args);
    }

    let runner = Runner::new(flavour).in_netns(&lab.node);
    let config = ProxierConfig {
        local: iptables::LocalDetector::Cidr("10.244.0.0/16".parse().unwrap()),
        ..ProxierConfig::default()
    };
    let mut proxier = Proxier::new(config);
    let stats = proxier
        .sync_full(&runner, &services(&[0, 1, 2]))
        .expect("full sync");
    assert!(stats.full);
    assert_user_rules(&lab, flavour, "after the first sync");
    // A second full sync adds no duplicate jumps.
    proxier
        .sync_full(&runner, &services(&[0, 1, 2]))
        .expect("second full sync");
    let saved = lab.save(flavour);
    let portals = saved
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING") && l.ends_with("-j KUBE-SERVICES"))
        .count();
    assert_eq!(portals, 1, "jump duplicated:\n{saved}");

    // ClusterIP: 300 requests spread over the three backends.
    let (counts, _) = Lab::tally(&lab.requests("10.96.0.10:80", 300));
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (pod, n) in &counts {
        assert!(
            (60..=141).contains(n),
            "{pod} got {n} of 300 (want 20%..47%): {counts:?}"
        );
    }

    // NodePort, Cluster policy: the backend sees the node (SNAT), not the client.
    let (counts, peers) = Lab::tally(&lab.requests(&format!("{NODE_IP}:30080"), 60));
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        peers
            .iter()
            .all(|p| p.starts_with("10.244.") && p.ends_with(".1")),
        "{peers:?}"
    );

    // NodePort, externalTrafficPolicy=Local: the real client address, local endpoints only.
    let (counts, peers) = Lab::tally(&lab.requests(&format!("{NODE_IP}:30081"), 60));
    assert!(
        !counts.contains_key("pod2"),
        "a remote endpoint served Local traffic: {counts:?}"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(peers.iter().all(|p| p == CLIENT_IP), "{peers:?}");

    // ClientIP affinity: one client, one backend.
    let (counts, _) = Lab::tally(&lab.requests("10.96.0.12:80", 30));
    assert_eq!(counts.len(), 1, "affinity broken: {counts:?}");

    // No endpoints: refused at once, for the ClusterIP and the NodePort.
    for addr in ["10.96.0.13:80".to_owned(), format!("{NODE_IP}:30083")] {
        let lines = lab.requests(&addr, 1);
        let w: Vec<&str> = lines[0].split(' ').collect();
        if w[1] != "ConnectionRefused" {
            eprintln!(
                "{}",
                sh_out(&[
                    "ip",
                    "netns",
                    "exec",
                    &lab.node,
                    &format!("iptables-{}-save", flavour.as_str()),
                    "-c"
                ])
            );
            eprintln!(
                "{}",
                sh_out(&["ip", "netns", "exec", &lab.node, "nstat", "-az"])
            );
            eprintln!(
                "{}",
                sh_out(&[
                    "ip",
                    "netns",
                    "exec",
                    &lab.node,
                    "sysctl",
                    "-a",
                    "--pattern",
                    "redirects"
                ])
            );
        }
        assert_eq!(&w[..2], ["ERR", "ConnectionRefused"], "{addr}: {lines:?}");
        assert!(
            w[2].parse::<u64>().unwrap() < 1000,
            "{addr}: not at once: {lines:?}"
        );
    }

    // Partial sync: pod2 leaves the web Service; only its chains change.
    let (before, after) = (services(&[0, 1, 2]), services(&[0, 1]));
    let stats = proxier
        .sync_services(&runner, changes(&before, &after), || &after)
        .expect("partial sync");
    assert!(!stats.full);
    assert_eq!(stats.changed_services, 1);
    assert_eq!(
        (stats.chains_written, stats.chains_deleted),
        (1, 1),
        "{stats:?}"
    );
    let (counts, _) = Lab::tally(&lab.requests("10.96.0.10:80", 60));
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["pod0", "pod1"]
    );
    assert_user_rules(&lab, flavour, "after a partial sync");

    // The Service gains endpoints: the REJECT goes, traffic flows.
    let mut specs = services(&[0, 1]);
    specs[3].backends = vec![backend(1, true)];
    proxier
        .sync_services(&runner, changes(&after, &specs), || &specs)
        .expect("partial sync");
    let (counts, _) = Lab::tally(&lab.requests("10.96.0.13:80", 5));
    assert_eq!(counts.get("pod1"), Some(&5));

    // Cleanup: every KUBE-* chain of ours is gone, the user's rules stay.
    let report = cleanup(&runner);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let saved = lab.save(flavour);
    let left: Vec<&str> = saved.lines().filter(|l| l.contains("KUBE-")).collect();
    assert!(only_kubelets_firewall(&left), "left behind:\n{saved}");
    assert_user_rules(&lab, flavour, "after cleanup");
    let lines = lab.requests("10.96.0.10:80", 1);
    assert!(
        lines[0].starts_with("ERR"),
        "service still answers after cleanup: {lines:?}"
    );
}

#[test]
fn fallback_proxier_serves_real_traffic_with_iptables_legacy() {
    scenario(Flavour::Legacy);
}

#[test]
fn fallback_proxier_serves_real_traffic_with_iptables_nft() {
    scenario(Flavour::Nft);
}

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn flavour_detection_follows_kubelets_hint_then_rule_counts() {
    if !is_root() {
        eprintln!("skipping: needs root to create network namespaces");
        return;
    }
    let lab_ns = format!("ipt{}-detect", std::process::id());
    sh(&["ip", "netns", "add", &lab_ns]);
    let ns = Ns(lab_ns);
    assert_eq!(
        detect_flavour(Some(&ns.0)),
        Flavour::Nft,
        "empty: nft on a tie"
    );
    let legacy = |args: &[&str]| {
        let mut full = vec!["ip", "netns", "exec", &ns.0, "iptables-legacy"];
        full.extend_from_slice(args);
        sh(&full);
    };
    legacy(&["-A", "INPUT", "-s", "203.0.113.1/32", "-j", "ACCEPT"]);
    assert_eq!(
        detect_flavour(Some(&ns.0)),
        Flavour::Legacy,
        "more legacy rules"
    );
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        "iptables-nft",
        "-t",
        "mangle",
        "-N",
        "KUBE-IPTABLES-HINT",
    ]);
    assert_eq!(
        detect_flavour(Some(&ns.0)),
        Flavour::Nft,
        "kubelet's hint wins"
    );
    let _ = Family::V4;
}

/// `count` ClusterIP Services of 10 endpoints, every tenth with a NodePort.
fn many_services(count: u16) -> Vec<ServiceSpec> {
    (0..count)
        .map(|i| {
            let [hi, lo] = i.to_be_bytes();
            let mut s = ServiceSpec::cluster_ip(
                format!("many/svc-{i}:http"),
                Protocol::Tcp,
                [10, 96, hi, lo].into(),
                80,
            );
            s.node_port = (i % 10 == 0).then_some(30_000 + i / 10);
            s.backends = (0..10u8)
                .map(|e| {
                    let addr = SocketAddr::new(IpAddr::from([10, 200 + e, hi, lo]), 8080);
                    Backend::ready(addr, e % 3 == 0)
                })
                .collect();
            s
        })
        .collect()
}

/// The proxy's lines of `iptables-save` (no comments, no counters), sorted.
/// Whether `lines` (of `iptables-save`) are only kubelet's KUBE-FIREWALL, which the proxier
/// writes with localhost NodePorts and, as kube-proxy's cleanup, leaves to kubelet.
fn only_kubelets_firewall(lines: &[impl AsRef<str>]) -> bool {
    lines.iter().all(|l| {
        let l = l.as_ref();
        l.starts_with(":KUBE-FIREWALL ")
            || l == "-A INPUT -j KUBE-FIREWALL"
            || l == "-A OUTPUT -j KUBE-FIREWALL"
            || l.starts_with("-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 ")
    })
}

fn proxy_lines(node: &str, flavour: Flavour) -> Vec<String> {
    let saved = sh_out(&[
        "ip",
        "netns",
        "exec",
        node,
        &format!("iptables-{}-save", flavour.as_str()),
    ]);
    let mut lines: Vec<String> = saved
        .lines()
        .filter(|l| l.contains("KUBE-"))
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
        .collect();
    lines.sort();
    lines
}

/// A large iptables-nft restore goes in parts (one costs lines × chains in iptables 1.8);
/// the parts leave exactly the rules one iptables-legacy restore writes, delete stale
/// chains, and clean up completely.
#[test]
fn large_nft_restores_in_parts_program_what_one_restore_does() {
    if !is_root() {
        eprintln!("skipping: needs root to create network namespaces");
        return;
    }
    let nft = Ns(format!("ipt{}-parts-nft", std::process::id()));
    let legacy = Ns(format!("ipt{}-parts-legacy", std::process::id()));
    for ns in [&nft, &legacy] {
        sh(&["ip", "netns", "add", &ns.0]);
    }
    let config = ProxierConfig {
        local: iptables::LocalDetector::Cidr("10.192.0.0/10".parse().unwrap()),
        ..ProxierConfig::default()
    };
    let runs: Vec<(Runner, Proxier, &str)> = [(Flavour::Nft, &nft), (Flavour::Legacy, &legacy)]
        .into_iter()
        .map(|(f, ns)| {
            (
                Runner::new(f).in_netns(&ns.0),
                Proxier::new(config.clone()),
                ns.0.as_str(),
            )
        })
        .collect();
    let mut runs = runs;
    let mut before: Vec<ServiceSpec> = Vec::new();
    let mut one_in_one_out = many_services(401);
    one_in_one_out.remove(7);
    for (step, specs, full, parts) in [
        ("first full sync", many_services(1000), true, true),
        (
            "partial sync removing 600 Services",
            many_services(400),
            false,
            true,
        ),
        (
            "partial sync adding one Service, removing one",
            one_in_one_out,
            false,
            false,
        ),
        (
            "full sync removing 100 more",
            many_services(300),
            true,
            true,
        ),
    ] {
        let mut restores = Vec::new();
        for (runner, proxier, _) in &mut runs {
            let stats = if full {
                proxier.sync_full(runner, &specs)
            } else {
                proxier.sync_services(runner, changes(&before, &specs), || &specs)
            }
            .expect(step);
            restores.push(stats.restores);
        }
        assert_eq!(restores[0] > 1, parts, "{step}: nft restores: {restores:?}");
        assert_eq!(restores[1], 1, "{step}: legacy split: {restores:?}");
        let nft_lines = proxy_lines(runs[0].2, Flavour::Nft);
        let legacy_lines = proxy_lines(runs[1].2, Flavour::Legacy);
        assert!(nft_lines.len() > 300 * 30, "{step}: {}", nft_lines.len());
        if nft_lines != legacy_lines {
            let only_nft: Vec<_> = nft_lines
                .iter()
                .filter(|l| !legacy_lines.contains(l))
                .take(5)
                .collect();
            let only_legacy: Vec<_> = legacy_lines
                .iter()
                .filter(|l| !nft_lines.contains(l))
                .take(5)
                .collect();
            panic!(
                "{step}: nft and legacy differ: only nft {only_nft:?}, only legacy {only_legacy:?}"
            );
        }
        if !full {
            // What the partial sync left is what a full sync writes (in another order).
            let (runner, proxier, node) = &mut runs[1];
            proxier.sync_full(runner, &specs).expect(step);
            assert!(
                proxy_lines(node, Flavour::Legacy) == legacy_lines,
                "{step}: a full sync changed the rules"
            );
        }
        before = specs;
    }
    for (runner, _, node) in &runs {
        let report = cleanup(runner);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(report.chains > 3000, "{}", report.chains);
        let left = proxy_lines(node, runner.flavour());
        assert!(only_kubelets_firewall(&left), "left behind: {left:?}");
    }
}

/// kube-proxy's interface detectors with real traffic: ClusterIP traffic entering on an
/// interface that is not the pods' is masqueraded (the backend sees the node's address),
/// traffic entering on the pods' is not (the backend sees the pod's own). The client comes in
/// on `nc0`, the pods on `np0`…`np2`.
#[test]
fn interface_detectors_masquerade_cluster_ip_traffic_from_other_interfaces_only() {
    if !is_root() {
        eprintln!("skipping: needs root to create network namespaces");
        return;
    }
    let lab = Lab::new("ifdetect");
    let flavour = detect_flavour(Some(&lab.node));
    let runner = Runner::new(flavour).in_netns(&lab.node);
    // One Service whose only endpoint is pod0, so pod1 never reaches itself (a hairpin,
    // which is masqueraded whatever the detector).
    let mut web =
        ServiceSpec::cluster_ip("test/web:http", Protocol::Tcp, [10, 96, 0, 10].into(), 80);
    web.backends = vec![backend(0, true)];
    let seen_by_pod0 = |from: &str| {
        let lines = Lab::requests_from(from, "10.96.0.10:80", 3);
        let (counts, mut peers) = Lab::tally(&lines);
        assert_eq!(counts.get("pod0"), Some(&3), "{lines:?}");
        peers.dedup();
        peers
    };
    let (client, pod1) = (lab.client.clone(), lab.pods[1].clone());
    // (detector, the source pod0 sees from the client, from pod1)
    for (local, from_client, from_pod1) in [
        // The pods' interfaces np0…np2 are local: the client's traffic is masqueraded.
        (
            iptables::LocalDetector::interface_prefix("np"),
            "10.244.0.1",
            "10.244.1.2",
        ),
        // Only the client's link is local: pod1's traffic is masqueraded.
        (
            iptables::LocalDetector::bridge("nc0"),
            CLIENT_IP,
            "10.244.0.1",
        ),
    ] {
        let config = ProxierConfig {
            local: local.clone(),
            ..ProxierConfig::default()
        };
        Proxier::new(config.clone())
            .sync_full(&runner, std::slice::from_ref(&web))
            .expect("full sync");
        // A restart reads back exactly what it would write (KUBE-FIREWALL too): nothing.
        let again = Proxier::new(config)
            .sync_full(&runner, std::slice::from_ref(&web))
            .expect("full sync after a restart");
        assert_eq!(
            (again.chains_written, again.rules),
            (0, 0),
            "{local:?}: {again:?}"
        );
        assert_eq!(
            seen_by_pod0(&client),
            [from_client],
            "{local:?}, from the client"
        );
        assert_eq!(seen_by_pod0(&pod1), [from_pod1], "{local:?}, from pod1");
    }
    let report = cleanup(&runner);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}
