//! The daemon end to end, in the VM: `ipvs-proxy --manifests DIR` on a real IPVS kernel, with
//! "pods" (network namespaces with a server that answers with its own name) behind ClusterIPs,
//! checked the way an operator would (`ipvsadm -Sn`, `ip addr`, `ipset list`) and with real
//! TCP and UDP traffic. Runs only in the VM: `cargo xtask vm-test -p ipvs-proxy -- daemon`.
//! The tests share the VM's kernel and take turns (a lock); each resets the kernel before and
//! after itself.

mod support;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::{
    Connection, Daemon, Kernel, Pod, ServiceSpec, TempDir, ask_tcp, ask_udp, ipset_members,
    ipvs_lines, ipvs_lines_of, kube_ipvs0_addresses, run, wait_until,
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 9);

/// Three pods, a manifest directory and a place for the daemon's log.
struct Cluster {
    pods: Vec<Pod>,
    dir: TempDir,
    logs: TempDir,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        Cluster {
            pods: vec![
                Pod::start(&format!("{tag}-a"), POD_A),
                Pod::start(&format!("{tag}-b"), POD_B),
                Pod::start(&format!("{tag}-c"), POD_C),
            ],
            dir: TempDir::new(&format!("{tag}-manifests")),
            logs: TempDir::new(&format!("{tag}-logs")),
        }
    }

    fn names(&self, which: &[usize]) -> BTreeSet<String> {
        which.iter().map(|&i| self.pods[i].name.clone()).collect()
    }

    fn start(&self, extra: &[&str]) -> Daemon {
        Daemon::start(self.dir.path(), &self.logs.path().join("daemon.log"), extra)
    }
}

fn web(endpoints: &[Ipv4Addr]) -> ServiceSpec<'_> {
    ServiceSpec {
        name: "web",
        vip: "10.96.0.20",
        port: 80,
        protocols: &["TCP"],
        endpoints,
        scheduler: None,
        affinity_seconds: None,
    }
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 96, 0, 20), port))
}

/// Waits until the `ipvsadm -Sn` lines of `service` are exactly `want`.
fn wait_for_ipvs(daemon: &Daemon, service: &str, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    wait_until(
        &format!("ipvsadm -Sn to show {service} as {want:#?}"),
        || ipvs_lines_of(service) == want,
        || {
            format!(
                "ipvsadm -Sn:\n{}\ndaemon log:\n{}",
                ipvs_lines().join("\n"),
                daemon.log()
            )
        },
    );
}

/// The pods that answered `n` new TCP connections.
fn tcp_answers(to: SocketAddr, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| ask_tcp(to).unwrap_or_else(|e| panic!("TCP request {i} to {to}: {e}")))
        .collect()
}

fn tcp_answer_list(to: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| ask_tcp(to).unwrap_or_else(|e| panic!("TCP request {i} to {to}: {e}")))
        .collect()
}

const WEB_ABC: [&str; 4] = [
    "-A -t 10.96.0.20:80 -s rr",
    "-a -t 10.96.0.20:80 -r 10.244.1.5:8080 -m -w 1",
    "-a -t 10.96.0.20:80 -r 10.244.2.7:8080 -m -w 1",
    "-a -t 10.96.0.20:80 -r 10.244.3.9:8080 -m -w 1",
];

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_three_endpoints_answer_over_tcp_and_udp() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("three");
    let spec = ServiceSpec {
        protocols: &["TCP", "UDP"],
        ..web(&[POD_A, POD_B, POD_C])
    };
    cluster.dir.write("web.yaml", &spec.yaml());
    let daemon = cluster.start(&[]);

    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);
    wait_for_ipvs(
        &daemon,
        "-u 10.96.0.20:80",
        &[
            "-A -u 10.96.0.20:80 -s rr",
            "-a -u 10.96.0.20:80 -r 10.244.1.5:8080 -m -w 1",
            "-a -u 10.96.0.20:80 -r 10.244.2.7:8080 -m -w 1",
            "-a -u 10.96.0.20:80 -r 10.244.3.9:8080 -m -w 1",
        ],
    );
    assert_eq!(kube_ipvs0_addresses(), ["10.96.0.20/32"]);
    assert_eq!(
        ipset_members("KUBE-CLUSTER-IP"),
        ["10.96.0.20,tcp:80", "10.96.0.20,udp:80"]
    );

    let all = cluster.names(&[0, 1, 2]);
    assert_eq!(tcp_answers(vip(80), 6), all, "TCP: every pod answers");
    let udp: BTreeSet<String> = (0..6)
        .map(|i| ask_udp(vip(80)).unwrap_or_else(|e| panic!("UDP request {i}: {e}")))
        .collect();
    assert_eq!(udp, all, "UDP: every pod answers");
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_scale_down_drains_the_removed_endpoint() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("drain");
    cluster
        .dir
        .write("web.yaml", &web(&[POD_A, POD_B, POD_C]).yaml());
    let daemon = cluster.start(&[]);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);

    // An open connection, to whichever pod: that pod is the one scaled away.
    let mut open = Connection::open(vip(80)).expect("connecting to the ClusterIP");
    let first = open.ask().expect("asking on the open connection");
    let gone = cluster
        .pods
        .iter()
        .position(|p| p.name == first)
        .unwrap_or_else(|| panic!("unknown answer {first:?}"));
    let kept: Vec<usize> = (0..3).filter(|&i| i != gone).collect();
    let gone_ip = cluster.pods[gone].ip;
    let kept_ips: Vec<Ipv4Addr> = kept.iter().map(|&i| cluster.pods[i].ip).collect();
    cluster.dir.write("web.yaml", &web(&kept_ips).yaml());

    let mut draining: Vec<String> = WEB_ABC.iter().map(|s| (*s).to_owned()).collect();
    for line in &mut draining {
        if line.contains(&format!("-r {gone_ip}:")) {
            *line = line.replace("-w 1", "-w 0");
        }
    }
    let draining: Vec<&str> = draining.iter().map(String::as_str).collect();
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &draining);

    assert_eq!(
        open.ask().expect("the draining connection keeps working"),
        first
    );
    assert_eq!(
        tcp_answers(vip(80), 6),
        cluster.names(&kept),
        "new connections go only to the two kept pods"
    );
    // Still there while the connection lives.
    std::thread::sleep(Duration::from_secs(2));
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &draining);
    assert_eq!(open.ask().expect("still working"), first);

    open.reset();
    let after: Vec<String> = WEB_ABC
        .iter()
        .filter(|l| !l.contains(&format!("-r {gone_ip}:")))
        .map(|s| (*s).to_owned())
        .collect();
    let after: Vec<&str> = after.iter().map(String::as_str).collect();
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &after);
    assert_eq!(tcp_answers(vip(80), 6), cluster.names(&kept));
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_follows_port_scheduler_and_affinity_edits() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("edit");
    let endpoints = [POD_A, POD_B, POD_C];
    cluster.dir.write("web.yaml", &web(&endpoints).yaml());
    let daemon = cluster.start(&[]);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);

    // The port.
    let moved = ServiceSpec {
        port: 81,
        ..web(&endpoints)
    };
    cluster.dir.write("web.yaml", &moved.yaml());
    let web81: Vec<String> = WEB_ABC.iter().map(|l| l.replace(":80 ", ":81 ")).collect();
    let web81: Vec<&str> = web81.iter().map(String::as_str).collect();
    wait_for_ipvs(&daemon, "-t 10.96.0.20:81", &web81);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &[]);
    assert_eq!(
        ipset_members("KUBE-CLUSTER-IP"),
        ["10.96.0.20,tcp:81"],
        "the set follows the port"
    );
    assert_eq!(tcp_answers(vip(81), 6), cluster.names(&[0, 1, 2]));

    // The scheduler.
    let lc = ServiceSpec {
        scheduler: Some("lc"),
        ..moved
    };
    cluster.dir.write("web.yaml", &lc.yaml());
    let web81_lc: Vec<String> = web81.iter().map(|l| l.replace("-s rr", "-s lc")).collect();
    let web81_lc: Vec<&str> = web81_lc.iter().map(String::as_str).collect();
    wait_for_ipvs(&daemon, "-t 10.96.0.20:81", &web81_lc);

    // ClientIP affinity, back on rr: every connection from this client lands on one pod.
    let sticky = ServiceSpec {
        scheduler: None,
        affinity_seconds: Some(600),
        ..lc
    };
    cluster.dir.write("web.yaml", &sticky.yaml());
    let web81_p: Vec<String> = web81
        .iter()
        .map(|l| l.replace("-s rr", "-s rr -p 600"))
        .collect();
    let web81_p: Vec<&str> = web81_p.iter().map(String::as_str).collect();
    wait_for_ipvs(&daemon, "-t 10.96.0.20:81", &web81_p);
    let answers = tcp_answer_list(vip(81), 6);
    assert_eq!(
        answers.iter().collect::<BTreeSet<_>>().len(),
        1,
        "with ClientIP affinity one pod answers every connection: {answers:?}"
    );
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_deleted_service_leaves_nothing() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("delete");
    cluster
        .dir
        .write("web.yaml", &web(&[POD_A, POD_B, POD_C]).yaml());
    let other = ServiceSpec {
        name: "other",
        vip: "10.96.0.30",
        ..web(&[POD_A])
    };
    cluster.dir.write("other.yaml", &other.yaml());
    let daemon = cluster.start(&[]);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);
    wait_for_ipvs(
        &daemon,
        "-t 10.96.0.30:80",
        &[
            "-A -t 10.96.0.30:80 -s rr",
            "-a -t 10.96.0.30:80 -r 10.244.1.5:8080 -m -w 1",
        ],
    );
    assert_eq!(kube_ipvs0_addresses(), ["10.96.0.20/32", "10.96.0.30/32"]);

    cluster.dir.remove("web.yaml");
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &[]);
    wait_until(
        "the VIP to leave kube-ipvs0",
        || kube_ipvs0_addresses() == ["10.96.0.30/32"],
        || format!("{:?}\n{}", kube_ipvs0_addresses(), daemon.log()),
    );
    assert_eq!(ipset_members("KUBE-CLUSTER-IP"), ["10.96.0.30,tcp:80"]);
    assert_eq!(
        ipvs_lines(),
        [
            "-A -t 10.96.0.30:80 -s rr",
            "-a -t 10.96.0.30:80 -r 10.244.1.5:8080 -m -w 1",
        ],
        "the other Service is untouched"
    );
    assert!(
        ask_tcp(vip(80)).is_err(),
        "nothing answers on the deleted ClusterIP"
    );
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_restart_after_sigkill_keeps_connections() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("restart");
    cluster
        .dir
        .write("web.yaml", &web(&[POD_A, POD_B, POD_C]).yaml());
    let dns = ServiceSpec {
        name: "dns",
        vip: "10.96.0.10",
        port: 53,
        protocols: &["TCP", "UDP"],
        ..web(&[POD_B])
    };
    cluster.dir.write("dns.yaml", &dns.yaml());
    let mut daemon = cluster.start(&[]);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);
    wait_for_ipvs(
        &daemon,
        "-u 10.96.0.10:53",
        &[
            "-A -u 10.96.0.10:53 -s rr",
            "-a -u 10.96.0.10:53 -r 10.244.2.7:8080 -m -w 1",
        ],
    );
    let planned = plan_ipvs(&cluster);
    assert_eq!(ipvs_lines(), planned);

    // Three connections that talk all along, one per pod.
    let mut open: Vec<(Connection, String)> = (0..3)
        .map(|_| {
            let mut c = Connection::open(vip(80)).expect("connecting");
            let who = c.ask().expect("first answer");
            (c, who)
        })
        .collect();
    let talk = |open: &mut Vec<(Connection, String)>, when: &str| {
        for (c, who) in open.iter_mut() {
            let answer = c
                .ask()
                .unwrap_or_else(|e| panic!("connection to {who} broke {when}: {e}"));
            assert_eq!(&answer, who, "{when}");
        }
    };

    daemon.kill();
    talk(&mut open, "after SIGKILL");
    let daemon = cluster.start(&[]);
    wait_until(
        "the restarted daemon's first sync",
        || daemon.log().matches("synced").count() >= 2,
        || daemon.log(),
    );
    talk(&mut open, "after the restart");
    assert_eq!(
        ipvs_lines(),
        planned,
        "no duplicate or missing virtual server"
    );
    assert_eq!(kube_ipvs0_addresses(), ["10.96.0.10/32", "10.96.0.20/32"]);
    // And it still follows changes.
    cluster.dir.write("web.yaml", &web(&[POD_A, POD_B]).yaml());
    wait_until(
        "POD_C to drain after the restart",
        || {
            ipvs_lines_of("-t 10.96.0.20:80")
                .iter()
                .any(|l| l.contains("-r 10.244.3.9:8080 -m -w 0"))
        },
        || format!("{:#?}\n{}", ipvs_lines(), daemon.log()),
    );
    talk(&mut open, "after the change");
}

/// What `ipvs-proxy plan --only ipvs` says the cluster's IPVS table should be, sorted.
fn plan_ipvs(cluster: &Cluster) -> Vec<String> {
    let dir = cluster.dir.path().to_string_lossy().into_owned();
    let mut lines: Vec<String> = run(
        support::DAEMON,
        &[
            "plan",
            "--manifests",
            &dir,
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--only",
            "ipvs",
        ],
    )
    .lines()
    .map(str::to_owned)
    .collect();
    lines.sort();
    lines
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_full_resync_restores_its_own_and_leaves_others() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("resync");
    cluster
        .dir
        .write("web.yaml", &web(&[POD_A, POD_B, POD_C]).yaml());
    // Services of other shapes, to see that a full resync of an unchanged kernel does nothing.
    let sticky = ServiceSpec {
        name: "sticky",
        vip: "10.96.0.31",
        protocols: &["TCP", "UDP"],
        affinity_seconds: Some(600),
        ..web(&[POD_A, POD_B])
    };
    cluster.dir.write("sticky.yaml", &sticky.yaml());
    let hashed = ServiceSpec {
        name: "hashed",
        vip: "10.96.0.32",
        scheduler: Some("sh"),
        ..web(&[POD_C])
    };
    cluster.dir.write("hashed.yaml", &hashed.yaml());
    let daemon = cluster.start(&["--ipvs-sync-period", "2s"]);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);
    let planned = plan_ipvs(&cluster);
    wait_until(
        "the whole plan in the kernel",
        || ipvs_lines() == planned,
        || format!("{:#?}\n{planned:#?}", ipvs_lines()),
    );

    // Someone else's virtual server, on an address the proxy never bound.
    run("ipvsadm", &["-A", "-t", "10.99.0.1:80", "-s", "wlc"]);
    run(
        "ipvsadm",
        &[
            "-a",
            "-t",
            "10.99.0.1:80",
            "-r",
            "10.244.9.9:80",
            "-m",
            "-w",
            "3",
        ],
    );
    // And one of the proxy's, deleted by hand.
    run("ipvsadm", &["-D", "-t", "10.96.0.20:80"]);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);
    // Two more full resyncs, to be sure the foreign one survives them and nothing flaps.
    let seen = daemon.full_syncs().len();
    wait_until(
        "two more full resyncs",
        || daemon.full_syncs().len() >= seen + 2,
        || daemon.log(),
    );
    assert_eq!(
        ipvs_lines_of("-t 10.99.0.1:80"),
        [
            "-A -t 10.99.0.1:80 -s wlc",
            "-a -t 10.99.0.1:80 -r 10.244.9.9:80 -m -w 3",
        ],
        "the foreign virtual server is untouched\n{}",
        daemon.log()
    );
    let mut all = planned.clone();
    all.extend(ipvs_lines_of("-t 10.99.0.1:80"));
    all.sort();
    assert_eq!(ipvs_lines(), all);
    let last = daemon.full_syncs().pop().expect("a full sync");
    assert!(
        last.contains("ipvs_ops=0") && last.contains("addresses_added=0"),
        "a full resync of an unchanged kernel sends nothing: {last}"
    );
    assert_eq!(tcp_answers(vip(80), 6), cluster.names(&[0, 1, 2]));
}

/// A change made while a periodic full sync reads the kernel (on its own thread) lands, is
/// not undone by that older read, and the reads still repair what was changed by hand.
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_changes_during_full_resyncs_land_and_the_resyncs_still_repair_drift() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("during");
    cluster
        .dir
        .write("web.yaml", &web(&[POD_A, POD_B, POD_C]).yaml());
    // Enough Services that each read of the kernel takes a while: with a period of a second,
    // one runs much of the time.
    let bulk_endpoints: Vec<Ipv4Addr> = (1..=10).map(|i| Ipv4Addr::new(10, 245, 0, i)).collect();
    for i in 0..1000_u32 {
        let name = format!("bulk-{i}");
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i).to_string();
        let spec = ServiceSpec {
            name: &name,
            vip: &vip,
            ..web(&bulk_endpoints)
        };
        cluster.dir.write(&format!("{name}.yaml"), &spec.yaml());
    }
    let daemon = cluster.start(&["--ipvs-sync-period", "1s"]);
    let planned = plan_ipvs(&cluster);
    wait_until(
        "the whole plan in the kernel",
        || ipvs_lines() == planned,
        || daemon.log(),
    );
    let checked = |daemon: &Daemon| -> Vec<String> {
        daemon
            .full_syncs()
            .into_iter()
            .filter(|l| l.contains("checked the kernel"))
            .collect()
    };
    wait_until(
        "a periodic full sync",
        || !checked(&daemon).is_empty(),
        || daemon.log(),
    );

    // One of the proxy's virtual servers deleted by hand, then a change every 50 ms for 3 s,
    // ending with all three pods.
    run("ipvsadm", &["-D", "-t", "10.97.0.7:80"]);
    let endpoint_sets: [&[Ipv4Addr]; 4] = [
        &[POD_A],
        &[POD_A, POD_B],
        &[POD_B, POD_C],
        &[POD_A, POD_B, POD_C],
    ];
    for k in 0..60 {
        let endpoints = endpoint_sets[k % endpoint_sets.len()];
        cluster.dir.write("web.yaml", &web(endpoints).yaml());
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);
    // Two more reads after the last change: neither undoes it, and the deleted one is back.
    let seen = checked(&daemon).len();
    wait_until(
        "two more periodic full syncs",
        || checked(&daemon).len() >= seen + 2,
        || daemon.log(),
    );
    assert_eq!(ipvs_lines(), planned, "{}", daemon.log());
    let skipped = checked(&daemon)
        .iter()
        .filter(|l| !l.contains("skipped=0 "))
        .count();
    assert!(
        skipped > 0,
        "no change was made while a read ran, so this proved nothing:\n{}",
        daemon.log()
    );
    assert_eq!(tcp_answers(vip(80), 6), cluster.names(&[0, 1, 2]));
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_reports_a_malformed_manifest_and_keeps_working() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("bad");
    cluster
        .dir
        .write("web.yaml", &web(&[POD_A, POD_B, POD_C]).yaml());
    let mut daemon = cluster.start(&[]);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);

    cluster.dir.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n  spec: [unclosed\n",
    );
    wait_until(
        "the daemon to report broken.yaml",
        || {
            daemon
                .log()
                .lines()
                .any(|l| l.contains("broken.yaml") && l.contains("WARN"))
        },
        || daemon.log(),
    );
    assert!(daemon.alive(), "the daemon is still running");
    assert_eq!(ipvs_lines(), WEB_ABC, "nothing changed in the kernel");

    // Everything else keeps working: an edit is followed (the removed real server has no
    // connections, so it goes at once), traffic flows.
    cluster.dir.write("web.yaml", &web(&[POD_A, POD_B]).yaml());
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC[..3]);
    let other = ServiceSpec {
        name: "other",
        vip: "10.96.0.30",
        ..web(&[POD_C])
    };
    cluster.dir.write("other.yaml", &other.yaml());
    wait_for_ipvs(
        &daemon,
        "-t 10.96.0.30:80",
        &[
            "-A -t 10.96.0.30:80 -s rr",
            "-a -t 10.96.0.30:80 -r 10.244.3.9:8080 -m -w 1",
        ],
    );
    assert_eq!(
        ask_tcp(SocketAddr::from((Ipv4Addr::new(10, 96, 0, 30), 80))).expect("other answers"),
        cluster.pods[2].name
    );
}

fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_owned()
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_sets_kube_proxys_conntrack_sysctls_and_oom_score_adj() {
    let _kernel = Kernel::take();
    let sysctls = [
        "nf_conntrack_max",
        "nf_conntrack_tcp_timeout_established",
        "nf_conntrack_tcp_timeout_close_wait",
        "nf_conntrack_tcp_be_liberal",
        "nf_conntrack_udp_timeout",
    ]
    .map(|name| format!("/proc/sys/net/netfilter/{name}"));
    let saved: Vec<String> = sysctls.iter().map(|p| read_proc(p)).collect();

    // --init-only does the sysctl work and exits.
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_ipvs-proxy"))
        .args(["--init-only", "--conntrack-tcp-timeout-established=12h"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert_eq!(read_proc(&sysctls[1]), "43200");

    let cluster = Cluster::new("ct");
    cluster.dir.write("web.yaml", &web(&[POD_A]).yaml());
    let daemon = cluster.start(&[
        "--conntrack-min=200000",
        "--conntrack-tcp-timeout-close-wait=2h",
        "--conntrack-tcp-be-liberal",
        "--conntrack-udp-timeout=45s",
    ]);
    wait_for_ipvs(
        &daemon,
        "-t 10.96.0.20:80",
        &[
            "-A -t 10.96.0.20:80 -s rr",
            "-a -t 10.96.0.20:80 -r 10.244.1.5:8080 -m -w 1",
        ],
    );
    let read: Vec<String> = sysctls.iter().map(|p| read_proc(p)).collect();
    // Two CPUs × 32768 is below the minimum, so the minimum; 24 h established by default.
    assert_eq!(
        read,
        ["200000", "86400", "7200", "1", "45"],
        "{}",
        daemon.log()
    );
    let hashsize: u32 = read_proc("/sys/module/nf_conntrack/parameters/hashsize")
        .parse()
        .unwrap();
    assert!(hashsize >= 50000, "hashsize {hashsize} for 200000 entries");
    assert_eq!(
        read_proc(&format!("/proc/{}/oom_score_adj", daemon.pid())),
        "-999"
    );

    drop(daemon);
    for (path, value) in sysctls.iter().zip(saved) {
        std::fs::write(path, value).unwrap();
    }
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_retries_a_refused_service_on_its_own_without_full_syncs() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("refuse");
    cluster.dir.write("web.yaml", &web(&[POD_A, POD_B]).yaml());
    // The VM's 6.1 kernel has no `twos` scheduler (it came in 6.7): every attempt is refused.
    let odd = ServiceSpec {
        name: "odd",
        vip: "10.96.0.21",
        scheduler: Some("twos"),
        ..web(&[POD_A])
    };
    cluster.dir.write("odd.yaml", &odd.yaml());
    let daemon = cluster.start(&["--ipvs-sync-period", "10s"]);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC[..3]);
    let started = std::time::Instant::now();

    // Meanwhile another Service's change lands at once.
    std::thread::sleep(Duration::from_secs(3));
    cluster
        .dir
        .write("web.yaml", &web(&[POD_A, POD_B, POD_C]).yaml());
    let changed = std::time::Instant::now();
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);
    assert!(
        changed.elapsed() < Duration::from_secs(5),
        "the change waited {:?}",
        changed.elapsed()
    );

    if let Some(rest) = Duration::from_secs(21).checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    let log = daemon.log();
    // The first sync and one each period: a refused Service brings none of its own (it used to
    // bring one every second).
    let full = daemon.full_syncs().len();
    assert!(
        full <= 3,
        "{full} full syncs in 21 s with a 10 s period:\n{log}"
    );
    // Retried with backoff, and said once.
    let retries = log
        .lines()
        .filter(|l| l.contains(" synced ") && l.contains("full=false") && l.contains("failing=1"))
        .count();
    assert!((2..=8).contains(&retries), "{retries} retries:\n{log}");
    let said = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("service default/odd"))
        .count();
    assert_eq!(said, 1, "the refusal is logged once:\n{log}");
    assert_eq!(ipvs_lines_of("-t 10.96.0.21:80"), Vec::<String>::new());
    assert_eq!(tcp_answers(vip(80), 6), cluster.names(&[0, 1, 2]));
}

/// The status `GET path` answers on `addr`, if it answers within 2 s.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: node-a\r\n\r\n").ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// Another process holding the xtables lock as iptables-legacy takes it: an
/// `iptables-legacy-restore` that has begun a table and waits for the rest of its input.
struct XtablesLock(std::process::Child);

impl XtablesLock {
    fn hold() -> XtablesLock {
        use std::io::Write as _;
        let child = std::process::Command::new("iptables-legacy-restore")
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("starting iptables-legacy-restore");
        // Owned at once, so that a failure below still kills it (and frees the lock).
        let mut lock = XtablesLock(child);
        let stdin = lock.0.stdin.as_mut().expect("stdin was piped");
        stdin.write_all(b"*filter\n").expect("beginning a table");
        stdin.flush().expect("flushing");
        // The lock is taken once the table line is read. The probe changes nothing: with the
        // lock free it fails at once (no such chain, status 1), with it held after 1 s (4).
        // (Without `-w`, iptables-legacy 1.8.9 waits for the lock for ever.)
        wait_until(
            "iptables-legacy-restore to hold the xtables lock",
            || {
                let probe = std::process::Command::new("iptables-legacy")
                    .args(["-w", "1", "-t", "filter", "-X", "NO-SUCH-CHAIN"])
                    .output()
                    .expect("running iptables-legacy");
                probe.status.code() == Some(4)
            },
            String::new,
        );
        lock
    }

    /// Ends the held table (an empty commit) and waits for the holder to exit.
    fn release(mut self) {
        use std::io::Write as _;
        let mut stdin = self.0.stdin.take().expect("stdin was piped");
        stdin.write_all(b"COMMIT\n").expect("ending the table");
        drop(stdin);
        let status = self.0.wait().expect("waiting for the lock holder");
        assert!(status.success(), "the lock holder failed: {status}");
    }
}

impl Drop for XtablesLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn daemon_livez_fails_while_the_xtables_lock_is_held_and_recovers_when_it_is_released() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("xtlock");
    cluster
        .dir
        .write("web.yaml", &web(&[POD_A, POD_B, POD_C]).yaml());
    // kubelet's hint chain makes the daemon choose iptables-legacy, which takes the lock.
    run(
        "iptables-legacy",
        &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
    );
    let healthz = SocketAddr::from((Ipv4Addr::LOCALHOST, 20256));
    // A node address, without which no NodePort is planned: the VM has no NIC, so the NodePort
    // address is the primary one given here rather than one read from the kernel.
    let daemon = cluster.start(&[
        "--ipvs-sync-period",
        "5s",
        "--healthz-bind-address",
        &healthz.to_string(),
        "--node-ip",
        "192.168.58.10",
        "--nodeport-addresses",
        "primary",
    ]);
    wait_for_ipvs(&daemon, "-t 10.96.0.20:80", &WEB_ABC);
    assert!(
        daemon.log().contains("flavour=\"legacy\""),
        "{}",
        daemon.log()
    );
    wait_until(
        "/livez to answer 200",
        || http_status(healthz, "/livez") == Some(200),
        || daemon.log(),
    );

    // A first NodePort Service needs the ipvs mode's rules rewritten while another process
    // holds the lock: every sync fails after waiting 5 s for it.
    let lock = XtablesLock::hold();
    let nodeport = ServiceSpec {
        name: "np",
        vip: "10.96.0.30",
        ..web(&[POD_A])
    }
    .yaml()
    .replace(
        "spec:\n  clusterIP:",
        "spec:\n  type: NodePort\n  clusterIP:",
    )
    .replace(
        "protocol: TCP}\n---",
        "protocol: TCP, nodePort: 30080}\n---",
    );
    cluster.dir.write("np.yaml", &nodeport);
    let changed = std::time::Instant::now();
    wait_until(
        "/livez to answer 503",
        || http_status(healthz, "/livez") == Some(503),
        || daemon.log(),
    );
    let unhealthy_after = changed.elapsed();
    eprintln!(
        "xtables lock held: /livez 503 {unhealthy_after:?} after the change (health timeout 10 s)"
    );
    // Two sync periods from the change's arrival, plus the emulator's slack.
    assert!(
        unhealthy_after <= Duration::from_secs(12),
        "503 only after {unhealthy_after:?}"
    );
    assert_eq!(http_status(healthz, "/healthz"), Some(503));
    let nat = run("iptables-legacy-save", &["-t", "nat"]);
    assert!(!nat.contains("KUBE-NODE-PORT-TCP"), "{nat}");
    let log = daemon.log();
    assert!(
        log.contains("iptables-legacy-restore") && log.contains("xtables lock"),
        "the failure names the tool and the lock:\n{log}"
    );

    lock.release();
    let released = std::time::Instant::now();
    let nat = || run("iptables-legacy-save", &["-t", "nat"]);
    wait_until(
        "the NodePort rules to land",
        || nat().contains("KUBE-NODE-PORT-TCP"),
        || format!("{}\n{}", nat(), daemon.log()),
    );
    wait_until(
        "/livez to answer 200 again",
        || http_status(healthz, "/livez") == Some(200),
        || daemon.log(),
    );
    eprintln!(
        "xtables lock released: rules landed and /livez 200 {:?} later",
        released.elapsed()
    );
    assert_eq!(http_status(healthz, "/healthz"), Some(200));
    assert_eq!(ipset_members("KUBE-NODE-PORT-TCP"), ["30080"]);
}
