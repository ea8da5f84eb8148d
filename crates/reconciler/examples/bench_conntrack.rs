//! What the conntrack reconciler costs at N UDP flows to one Service, in a fresh network
//! namespace of its own: listing them when none is stale (what a sync of a UDP Service pays),
//! and deleting them all when their endpoint is gone, against the `conntrack` tool doing the
//! same (`conntrack -L`, `conntrack -D`). Needs root, `iptables` and `conntrack`.
//!
//! `cargo run --release -p reconciler --example bench_conntrack [FLOWS]`, or in the VM
//! `cargo xtask bench conntrack [FLOWS]`. Last lines:
//! `bench conntrack_list 10000 ours=…s floor=…s ratio=…` and `bench conntrack_delete 10000 …`.
#![allow(
    unsafe_code,
    reason = "unshare(2) for a namespace of the benchmark's own"
)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use conntrack::Conntrack;
use inet::Family;
use reconciler::ClusterState;
use reconciler::conntrack::{Frontends, reconcile};
use reconciler::model::{
    Conditions, Endpoint, EndpointPort, EndpointSlice, Hints, Protocol, ServiceName, ServicePort,
    ServicePortName,
};

const VIP: &str = "10.96.0.10";

fn run(tool: &str, args: &[&str]) {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{tool} {args:?} failed");
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

/// The `dns` Service at VIP:53 with one endpoint at `endpoint`:5353.
fn state(endpoint: &str) -> ClusterState {
    let service = ServiceName::new("bench", "dns");
    let name = ServicePortName {
        service: service.clone(),
        port: "dns".into(),
        protocol: Protocol::Udp,
    };
    let mut state = ClusterState::new();
    let vip: IpAddr = VIP.parse().unwrap();
    state.upsert_service(
        service.clone(),
        vec![ServicePort::cluster_ip(name, 53, &[vip])],
    );
    let endpoint = Endpoint {
        ip: endpoint.parse().unwrap(),
        port: 5353,
        conditions: Conditions::default(),
        local: false,
        hints: Hints::default(),
    };
    let slice = EndpointSlice {
        service,
        ports: vec![EndpointPort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            endpoints: vec![endpoint].into(),
        }],
    };
    state.upsert_slice(("bench".into(), "dns-1".into()), slice);
    state
}

/// N flows from N distinct client addresses and ports to VIP:53, DNATed to 127.0.0.1:5353.
fn make_flows(n: usize) {
    for i in 0..n {
        let (host, port) = (1 + i / 50_000, 10_000 + i % 50_000);
        let host = u8::try_from(host).expect("at most 12 million flows");
        let port = u16::try_from(port).expect("a port");
        let client = UdpSocket::bind(SocketAddr::from(([127, 0, 1, host], port))).unwrap();
        client.send_to(b"x", (VIP, 53)).unwrap();
    }
}

fn count(table: &mut Conntrack) -> usize {
    table.dump(Family::V4, Protocol::Udp).unwrap().len()
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    // SAFETY: unshare(2) takes no pointers; the process is single-threaded here, so all of
    // it (and the tools it runs) moves to the new namespace.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare needs root"
    );
    run("ip", &["link", "set", "lo", "up"]);
    run("ip", &["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    let dnat =
        "-t nat -A OUTPUT -d 10.96.0.10 -p udp --dport 53 -j DNAT --to-destination 127.0.0.1:5353";
    run("iptables", &dnat.split(' ').collect::<Vec<_>>());
    // Bound, never read: the flows' packets are queued or dropped, not answered with ICMP.
    let _endpoint = UdpSocket::bind("127.0.0.1:5353").unwrap();
    let mut table = Conntrack::open().unwrap();
    make_flows(n);
    assert!(count(&mut table) >= n, "every flow has its entry");

    // Nothing stale: a list and a decision per sync of the Service.
    let serving = state("127.0.0.1");
    let frontends = Frontends::new(&serving, serving.services().map(|(_, p)| p));
    let ours = timed(|| {
        let done = reconcile(&mut table, &frontends);
        assert!(done.errors.is_empty() && done.families.iter().all(|r| r.deleted == 0));
    });
    let floor = timed(|| run("conntrack", &["-L", "-p", "udp"]));
    print_case("conntrack_list", n, ours, floor);

    // All stale: the endpoint moved.
    let moved = state("127.0.0.2");
    let frontends = Frontends::new(&moved, moved.services().map(|(_, p)| p));
    let ours = timed(|| {
        let done = reconcile(&mut table, &frontends);
        assert!(done.families.iter().map(|r| r.deleted).sum::<u64>() >= n as u64);
    });
    assert_eq!(count(&mut table), 0);
    make_flows(n);
    let floor = timed(|| run("conntrack", &["-D", "-p", "udp", "--orig-dst", VIP]));
    assert_eq!(count(&mut table), 0, "conntrack -D deleted them all too");
    print_case("conntrack_delete", n, ours, floor);
}

fn print_case(name: &str, n: usize, ours: Duration, floor: Duration) {
    let (ours, floor) = (ours.as_secs_f64(), floor.as_secs_f64());
    println!(
        "bench {name} {n} ours={ours:.4}s floor={floor:.4}s ratio={:.2}",
        ours / floor
    );
}
