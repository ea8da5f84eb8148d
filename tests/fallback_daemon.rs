//! On a kernel without IPVS (this host's), the daemon says so and runs kube-proxy's iptables
//! rules instead; with `--ipvs-fallback=exit` it exits. Run in a network namespace the test
//! makes, so the host's own rules are never touched.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod netns;

use netns::{Netns, examples, exited_within, extra_service, in_netns};

const PROXY: &str = env!("CARGO_BIN_EXE_ipvs-proxy");

fn saved_nat(ns: &Netns) -> String {
    let out = ns.exec(&["iptables-save", "-t", "nat"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts the daemon in `ns` on the manifests in `dir` as node-a, without HTTP servers,
/// with `extra` flags; its log is read back by [`stop`].
fn start_daemon(ns: &Netns, dir: &str, extra: &[&str]) -> std::process::Child {
    ns.exec(&[PROXY, "--manifests", dir, "--hostname-override", "node-a"])
        .args(extra)
        .args([
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Stops the daemon with SIGTERM, checks it exits cleanly, and returns what it logged.
fn stop(daemon: &mut std::process::Child) -> String {
    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().unwrap().success(), "stops cleanly on SIGTERM");
    read_log(daemon)
}

/// Everything the daemon wrote on stderr (once it has exited).
fn read_log(daemon: &mut std::process::Child) -> String {
    let mut log = String::new();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    log
}

#[test]
fn without_ipvs_the_daemon_says_why_and_runs_the_iptables_proxier() {
    let ns = Netns::new("fallback");
    let mut daemon = start_daemon(&ns, &examples(), &[]);
    let start = Instant::now();
    // The web Service's chain appears once the first sync is done.
    while !saved_nat(&ns).contains("-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no iptables rules for web:\n{}",
            saved_nat(&ns)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = stop(&mut daemon);
    assert!(
        log.lines().any(|l| l.contains("IPVS is unavailable")
            && l.contains("mode=\"iptables\"")
            && l.contains("generic netlink family")
            && l.contains("`modprobe ip_vs` failed")),
        "the log says which mode runs and why (no family, and the module would not load):\n{log}"
    );
    let nat = saved_nat(&ns);
    assert!(nat.contains(":KUBE-SVC-"), "{nat}");
    assert!(
        nat.contains("-m statistic --mode random --probability 0.33333333349"),
        "three endpoints share web:\n{nat}"
    );
    assert!(nat.contains("-j MASQUERADE"), "{nat}");
}

#[test]
fn without_ipvs_and_with_fallback_exit_the_daemon_exits_with_the_reason() {
    let ns = Netns::new("noexit");
    let out = ns
        .exec(&[PROXY, "--manifests", &examples(), "--ipvs-fallback=exit"])
        .args([
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("IPVS is unavailable"), "{log}");
    assert!(!saved_nat(&ns).contains("KUBE-"), "nothing programmed");
}

/// Polls `iptables-save -t nat` until `done` holds of it (30 s at most).
fn wait_for_nat(ns: &Netns, what: &str, done: impl Fn(&str) -> bool) {
    let start = Instant::now();
    while !done(&saved_nat(ns)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}:\n{}",
            saved_nat(ns)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_service_added_and_removed_is_synced_alone_by_the_iptables_proxier() {
    let dir = std::env::temp_dir().join(format!("ipvs-proxy-fallback-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        Path::new(&examples()).join("web.yaml"),
        dir.join("web.yaml"),
    )
    .unwrap();
    let ns = Netns::new("fallback-partial");
    // No full resync during the test: every change after the first sync is partial.
    let mut daemon = start_daemon(&ns, &dir.display().to_string(), &["--ipvs-sync-period=1h"]);
    let web = "-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp";
    let extra = "-A KUBE-SERVICES -d 10.96.77.7/32 -p tcp";
    wait_for_nat(&ns, "no iptables rules for web", |nat| nat.contains(web));
    let before = saved_nat(&ns);

    std::fs::write(dir.join("extra.yaml"), extra_service(&["10.244.1.77"])).unwrap();
    wait_for_nat(&ns, "the added Service has no rule", |nat| {
        nat.contains(extra)
    });
    let with = saved_nat(&ns);
    assert!(
        with.contains("-j DNAT --to-destination 10.244.1.77:8080"),
        "{with}"
    );
    std::fs::remove_file(dir.join("extra.yaml")).unwrap();
    wait_for_nat(&ns, "the removed Service's rule stays", |nat| {
        !nat.contains(extra)
    });
    let after = saved_nat(&ns);
    assert_eq!(
        proxy_nat_lines(&after),
        proxy_nat_lines(&before),
        "removing the Service left what was there before it"
    );

    let log = stop(&mut daemon);
    let _ = std::fs::remove_dir_all(&dir);
    let syncs: Vec<&str> = log.lines().filter(|l| l.contains(" synced")).collect();
    assert!(
        syncs.iter().filter(|l| l.contains("full=false")).count() >= 2,
        "the add and the removal were partial syncs:\n{log}"
    );
    assert_eq!(
        syncs.iter().filter(|l| l.contains("full=true")).count(),
        1,
        "only the first sync was full:\n{log}"
    );
}

#[test]
fn the_daemon_exits_when_its_config_file_changes_for_its_pod_to_restart() {
    let ns = Netns::new("cfgwatch");
    let config = std::env::temp_dir().join(format!("ipvs-proxy-watch-{}.yaml", std::process::id()));
    // kubeadm's zeros, in iptables mode: neither sync period may become a busy loop.
    let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                mode: iptables\niptables:\n  syncPeriod: 0s\n  minSyncPeriod: 0s\n\
                healthzBindAddress: 127.0.0.1:0\nmetricsBindAddress: 127.0.0.1:0\n";
    std::fs::write(&config, text).unwrap();
    let mut daemon = ns
        .exec(&[
            PROXY,
            "--manifests",
            &examples(),
            "--hostname-override",
            "node-a",
        ])
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_nat(&ns, "web's rules", |nat| {
        nat.contains("-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp")
    });
    std::fs::write(&config, format!("{text}clusterCIDR: 10.244.0.0/16\n")).unwrap();
    let status = exited_within(&mut daemon, Duration::from_secs(20))
        .expect("still running after the change");
    std::fs::remove_file(&config).unwrap();
    let log = read_log(&mut daemon);
    assert!(!status.success(), "exits non-zero:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("--config file") && l.contains("changed")),
        "says why:\n{log}"
    );
}

/// The proxy's lines of an `iptables-save -t nat`, counters dropped, sorted.
fn proxy_nat_lines(nat: &str) -> Vec<String> {
    let mut lines: Vec<String> = nat
        .lines()
        .filter(|l| l.contains("KUBE-"))
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
        .collect();
    lines.sort();
    lines
}

/// Runs the daemon on a directory holding `manifests` as one file until `extra`'s rule is in,
/// and returns its proxy nat lines and its log.
fn run_on_manifests(tag: &str, manifests: &str) -> (Vec<String>, String) {
    let dir = std::env::temp_dir().join(format!("ipvs-proxy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("services.yaml"), manifests).unwrap();
    let ns = Netns::new(tag);
    let mut daemon = start_daemon(&ns, &dir.display().to_string(), &[]);
    wait_for_nat(&ns, "no iptables rules for extra", |nat| {
        nat.contains("-A KUBE-SERVICES -d 10.96.77.7/32 -p tcp")
    });
    let log = stop(&mut daemon);
    let _ = std::fs::remove_dir_all(&dir);
    (proxy_nat_lines(&saved_nat(&ns)), log)
}

#[test]
fn services_with_a_newline_or_300_bytes_in_their_name_are_refused_by_name_and_the_rest_is_synced() {
    let long = "a".repeat(300);
    let bad = format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: \"evil\\nCOMMIT\\n*nat\", namespace: default}}
spec:
  clusterIP: 10.96.88.8
  ports: [{{name: http, port: 80, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: {long}, namespace: default}}
spec:
  clusterIP: 10.96.88.9
  ports: [{{name: http, port: 80, protocol: TCP}}]
"
    );
    let (alone, _) = run_on_manifests("limits-good", &extra_service(&["10.244.1.77"]));
    let (with_bad, daemon_log) = run_on_manifests(
        "limits-bad",
        &format!("{}{bad}", extra_service(&["10.244.1.77"])),
    );
    assert!(
        alone.iter().any(|l| l.contains("10.244.1.77:8080")),
        "{alone:#?}"
    );
    assert_eq!(
        with_bad, alone,
        "the nat table holds exactly the valid Service's rules"
    );
    let refused = |name: &str| {
        daemon_log.lines().any(|l| {
            l.contains("WARN")
                && l.contains("manifest skipped")
                && l.contains(&format!("Service \"default/{name}\": metadata.name"))
        })
    };
    assert!(
        refused("evil\\nCOMMIT\\n*nat"),
        "the newline name is logged:\n{daemon_log}"
    );
    assert!(refused(&long), "the 300-byte name is logged:\n{daemon_log}");
}

/// One line asked of `to` from inside `ns`: what answered, or the error.
fn ask_from(ns: &str, to: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    in_netns(ns, || {
        let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"who\n")?;
        let mut line = String::new();
        std::io::BufReader::new(stream).read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    })
}

const NODE_PORT_WEB: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.5]
    conditions: {ready: true}
    nodeName: node-a
";

/// The node's NodePort jumps in nat KUBE-SERVICES, comments left out.
fn node_port_jumps(nat: &str) -> Vec<String> {
    nat.lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.ends_with("-j KUBE-NODEPORTS"))
        .map(|l| l.replace(" -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"", ""))
        .collect()
}

/// Upstream's iptables mode: with `--nodeport-addresses`, one jump to KUBE-NODEPORTS per
/// matching address of the node (followed as addresses come), and no `addrtype LOCAL` one; a
/// connection to a matching address reaches the pod, one to another address does not.
#[test]
fn nodeport_addresses_restrict_the_fallbacks_node_port_rules_and_traffic() {
    let lab = OnePod::new(
        "np",
        &["10.244.1.1/24", "192.168.10.7/24", "192.168.20.7/24"],
    );
    let node = &lab.node;
    let dir = std::env::temp_dir().join(format!("ipvs-proxy-np-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), NODE_PORT_WEB).unwrap();
    let mut daemon = start_daemon(
        node,
        &dir.display().to_string(),
        &[
            "--nodeport-addresses",
            "192.168.10.0/24",
            "--cluster-cidr",
            "10.244.0.0/16",
        ],
    );
    let only_10_7 = ["-A KUBE-SERVICES -d 192.168.10.7/32 -j KUBE-NODEPORTS"];
    wait_for_nat(node, "a NodePort jump for 192.168.10.7", |nat| {
        node_port_jumps(nat) == only_10_7
    });
    let nat = saved_nat(node);
    assert!(nat.contains("--dport 30080"), "{nat}");
    assert_eq!(
        ask_from(&node.0, "192.168.10.7:30080".parse().unwrap()).expect("the matching address"),
        "pod"
    );
    assert!(
        ask_from(&node.0, "192.168.20.7:30080".parse().unwrap()).is_err(),
        "no NodePort outside --nodeport-addresses"
    );

    // A new matching address gets its jump.
    ip(&[
        "-n",
        &node.0,
        "addr",
        "add",
        "192.168.10.8/24",
        "dev",
        "vpod",
    ]);
    wait_for_nat(node, "a NodePort jump for the new 192.168.10.8", |nat| {
        node_port_jumps(nat).len() == 2
    });
    assert_eq!(
        ask_from(&node.0, "192.168.10.8:30080".parse().unwrap()).expect("the new address"),
        "pod"
    );

    let log = stop(&mut daemon);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!log.contains("ERROR"), "{log}");
}

/// `ip ARGS…`, which must succeed.
fn ip(args: &[&str]) {
    let ok = Command::new("ip").args(args).status().unwrap().success();
    assert!(ok, "ip {args:?}");
}

/// A node namespace with one "pod" namespace (10.244.1.5, answering `pod` on :8080, routed
/// through 10.244.1.1) behind the veth `vpod`, whose node side has `node_addresses` (10.244.1.1
/// among them); the server stops when the pod goes.
struct OnePod {
    node: Netns,
    pod: Netns,
    server: Option<std::thread::JoinHandle<()>>,
}

impl OnePod {
    fn new(tag: &str, node_addresses: &[&str]) -> OnePod {
        let node = Netns::new(&format!("{tag}-node"));
        let pod = Netns::new(&format!("{tag}-pod"));
        ip(&[
            "-n", &node.0, "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns",
            &pod.0,
        ]);
        for address in node_addresses {
            ip(&["-n", &node.0, "addr", "add", address, "dev", "vpod"]);
        }
        ip(&["-n", &node.0, "link", "set", "vpod", "up"]);
        ip(&["-n", &pod.0, "addr", "add", "10.244.1.5/24", "dev", "eth0"]);
        ip(&["-n", &pod.0, "link", "set", "eth0", "up"]);
        ip(&["-n", &pod.0, "route", "add", "default", "via", "10.244.1.1"]);
        let listener = in_netns(&pod.0, || {
            std::net::TcpListener::bind("0.0.0.0:8080").unwrap()
        });
        let server = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut line = String::new();
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                if reader.read_line(&mut line).is_ok() && line == "quit\n" {
                    return;
                }
                let _ = stream.write_all(b"pod\n");
            }
        });
        OnePod {
            node,
            pod,
            server: Some(server),
        }
    }
}

impl Drop for OnePod {
    fn drop(&mut self) {
        // The server's last connection tells it to stop.
        let _ = in_netns(&self.pod.0, || {
            use std::io::Write;
            std::net::TcpStream::connect("10.244.1.5:8080").and_then(|mut s| s.write_all(b"quit\n"))
        });
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// Upstream's iptables mode with `--iptables-localhost-nodeports` (the default): a NodePort
/// answers on 127.0.0.1 too, `route_localnet` is set, and KUBE-FIREWALL drops what reaches
/// 127.0.0.0/8 from off the node; with `=false` 127.0.0.1 does not answer (the jump to
/// KUBE-NODEPORTS skips 127.0.0.0/8) while the node's other addresses still do.
#[test]
fn localhost_node_ports_answer_on_127_0_0_1_only_when_enabled() {
    let dir = std::env::temp_dir().join(format!("ipvs-proxy-lnp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), NODE_PORT_WEB).unwrap();
    let loopback = "127.0.0.1:30080".parse().unwrap();
    let node_address = "10.244.1.1:30080".parse().unwrap();
    for (tag, flags, answered) in [
        ("lnp-on", &[][..], true),
        (
            "lnp-off",
            &["--iptables-localhost-nodeports=false"][..],
            false,
        ),
    ] {
        let lab = OnePod::new(tag, &["10.244.1.1/24"]);
        let mut daemon = start_daemon(&lab.node, &dir.display().to_string(), flags);
        wait_for_nat(&lab.node, "the NodePort's rule", |nat| {
            nat.contains("--dport 30080")
        });
        let route_localnet = lab
            .node
            .exec(&["sysctl", "-n", "net.ipv4.conf.all.route_localnet"])
            .output()
            .unwrap();
        let route_localnet = String::from_utf8_lossy(&route_localnet.stdout)
            .trim()
            .to_owned();
        let filter = lab
            .node
            .exec(&["iptables-save", "-t", "filter"])
            .output()
            .unwrap();
        let filter = String::from_utf8_lossy(&filter.stdout).into_owned();
        let blocks = filter.lines().any(|l| {
            l == "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        });
        let from_loopback = ask_from(&lab.node.0, loopback);
        let from_node_address = ask_from(&lab.node.0, node_address);
        let log = stop(&mut daemon);
        assert_eq!(
            from_node_address.ok().as_deref(),
            Some("pod"),
            "{tag}: the node's address\n{log}"
        );
        if answered {
            assert_eq!(from_loopback.ok().as_deref(), Some("pod"), "{tag}\n{log}");
            assert_eq!(route_localnet, "1", "{tag}");
            assert!(blocks, "{tag}: no KUBE-FIREWALL rule:\n{filter}");
        } else {
            assert!(from_loopback.is_err(), "{tag}: 127.0.0.1 answered");
            assert_eq!(route_localnet, "0", "{tag}");
            assert!(!filter.contains("KUBE-FIREWALL"), "{tag}:\n{filter}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Node node-a with `spec.podCIDR(s)` = `cidr` (none when empty).
fn node_a(cidr: &str) -> String {
    let spec = if cidr.is_empty() {
        String::new()
    } else {
        format!("spec: {{podCIDR: {cidr}, podCIDRs: [{cidr}]}}\n")
    };
    format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\n{spec}")
}

/// As kube-proxy with `--detect-local-mode NodeCIDR`: nothing is programmed while the Node
/// has no podCIDR (the log says it waits), then the rules use it (`! -s PODCIDR`, not
/// `--cluster-cidr`), and when it changes the daemon exits non-zero for its pod to restart.
#[test]
fn node_cidr_mode_waits_for_the_pod_cidr_and_exits_when_it_changes() {
    let dir = std::env::temp_dir().join(format!("ipvs-proxy-nodecidr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), NODE_PORT_WEB).unwrap();
    std::fs::write(dir.join("node.yaml"), node_a("")).unwrap();
    let ns = Netns::new("nodecidr");
    let mut daemon = start_daemon(
        &ns,
        &dir.display().to_string(),
        &[
            "--detect-local-mode",
            "NodeCIDR",
            "--cluster-cidr",
            "10.244.0.0/16",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !saved_nat(&ns).contains("KUBE-"),
        "programmed before the podCIDR:\n{}",
        saved_nat(&ns)
    );

    // Written whole by a rename, so the source never reads it half-written.
    let write = |text: &str| {
        std::fs::write(dir.join(".node.tmp"), text).unwrap();
        std::fs::rename(dir.join(".node.tmp"), dir.join("node.yaml")).unwrap();
    };
    write(&node_a("10.244.1.0/24"));
    let masq = "! -s 10.244.1.0/24 -d 10.96.0.20/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ";
    wait_for_nat(&ns, "the podCIDR's masquerade rule", |nat| {
        nat.contains(masq)
    });
    assert!(
        !saved_nat(&ns).contains("10.244.0.0/16"),
        "{}",
        saved_nat(&ns)
    );
    assert!(daemon.try_wait().unwrap().is_none(), "exited");

    write(&node_a("10.244.9.0/24"));
    let status = exited_within(&mut daemon, Duration::from_secs(20))
        .expect("still running after the podCIDR changed");
    let log = read_log(&mut daemon);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        log.lines().any(|l| l.contains("awaiting podCIDR")),
        "says it waits:\n{log}"
    );
    assert!(!status.success(), "exits non-zero:\n{log}");
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("10.244.1.0/24")
            && l.contains("10.244.9.0/24")),
        "says why:\n{log}"
    );
}

/// Lines in `path` (0 when it does not exist).
fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Writes into `bin` an `iptables-nft-save` that notes each call in `calls` and, while `slow`
/// exists, sleeps 6 s before running the real one.
fn slow_save_wrapper(bin: &Path, slow: &Path, calls: &Path) {
    let real = Command::new("sh")
        .args(["-c", "command -v iptables-nft-save"])
        .output()
        .unwrap();
    let real = String::from_utf8_lossy(&real.stdout).trim().to_owned();
    assert!(!real.is_empty(), "iptables-nft-save is installed");
    let wrapper = bin.join("iptables-nft-save");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$@\" >> {c}\nif [ -e {s} ]; then sleep 6; fi\nexec {real} \"$@\"\n",
            s = slow.display(),
            c = calls.display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .args(["755", &wrapper.display().to_string()])
        .status()
        .unwrap();
}

/// A periodic full sync of a kernel nothing else wrote to reads nothing (nf_tables'
/// generation tells); one after another tool's commit reads the kernel, and while that read
/// takes seconds (the daemon's `iptables-nft-save` is a wrapper that sleeps first) a change is
/// synced at once, and the check that ends the read keeps it and repairs nothing.
#[test]
fn a_change_during_a_slow_periodic_full_sync_is_synced_at_once() {
    let base = std::env::temp_dir().join(format!("ipvs-proxy-slow-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (dir, bin) = (base.join("manifests"), base.join("bin"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(
        Path::new(&examples()).join("web.yaml"),
        dir.join("web.yaml"),
    )
    .unwrap();
    let (slow, calls) = (base.join("slow"), base.join("calls"));
    slow_save_wrapper(&bin, &slow, &calls);

    let ns = Netns::new("slow-save");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let mut daemon = ns
        .exec(&[PROXY, "--manifests", &dir.display().to_string()])
        .args(["--hostname-override", "node-a", "--proxy-mode", "iptables"])
        .args([
            "--iptables-sync-period",
            "1s",
            "--iptables-min-sync-period",
            "0s",
        ])
        .args(["--healthz-bind-address", "127.0.0.1:0"])
        .args(["--metrics-bind-address", "127.0.0.1:0"])
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_nat(&ns, "no iptables rules for web", |nat| {
        nat.contains("-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp")
    });
    let first = lines_in(&calls);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        lines_in(&calls),
        first,
        "periodic full syncs of an untouched kernel read it"
    );

    // Another tool commits: the next periodic full sync reads, slowly.
    std::fs::write(&slow, "").unwrap();
    let ok = ns
        .exec(&["iptables-nft", "-t", "filter", "-N", "USER-CHAIN"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "iptables-nft -N USER-CHAIN");
    let start = Instant::now();
    while lines_in(&calls) == first {
        assert!(start.elapsed() < Duration::from_secs(5), "no kernel read");
        std::thread::sleep(Duration::from_millis(20));
    }
    let extra = "-A KUBE-SERVICES -d 10.96.77.7/32 -p tcp";
    let start = Instant::now();
    std::fs::write(dir.join("extra.yaml"), extra_service(&["10.244.1.77"])).unwrap();
    wait_for_nat(&ns, "the added Service has no rule", |nat| {
        nat.contains(extra)
    });
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the change waited {took:?} for the read"
    );
    // The read ends and is checked; the change made after it began stays.
    std::fs::remove_file(&slow).unwrap();
    std::thread::sleep(Duration::from_secs(7));
    let nat = saved_nat(&ns);
    assert!(nat.contains(extra), "{nat}");
    let log = stop(&mut daemon);
    let _ = std::fs::remove_dir_all(&base);
    let checks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("full sync checked the kernel"))
        .collect();
    assert!(
        checks.iter().any(|l| l.contains("unchanged=true")),
        "no check skipped the read:\n{log}"
    );
    assert!(
        checks.iter().any(|l| !l.contains("unchanged=true")),
        "no check read the kernel:\n{log}"
    );
    assert!(
        checks.iter().all(|l| l.contains("chains_repaired=0")),
        "a check rewrote rules:\n{log}"
    );
}
