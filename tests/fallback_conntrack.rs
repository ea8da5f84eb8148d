//! Conntrack cleanup with the iptables fallback, on the host: the VM test's scenario
//! (`tests/vm_conntrack.rs`) in a network namespace of the test's own, where the daemon finds
//! no IPVS and runs kube-proxy's iptables rules; and a client whose flow began before its
//! Service had an endpoint. Needs root, `iptables` and `conntrack`.
#![allow(unsafe_code)]

#[allow(
    dead_code,
    reason = "the host test uses the pods and the daemon, not the IPVS readers"
)]
mod support;
#[path = "support/udp_flow.rs"]
mod udp_flow;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use support::{Daemon, Pod, TempDir, run, wait_until};
use udp_flow::{
    Client, METRICS, VIP, conntrack_reply_sources, dns, reconciled_ipv4, replace_the_endpoint,
};

/// Moves this test's thread (and every process and socket it makes) into a new network
/// namespace with `lo` up and the ClusterIP on it: local, as kube-ipvs0 makes it in IPVS
/// mode, so the client has a route.
fn enter_new_netns() {
    // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET moves only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) needs root: {}",
        std::io::Error::last_os_error()
    );
    run("/bin/ip", &["link", "set", "lo", "up"]);
    run(
        "/bin/ip",
        &["addr", "add", &format!("{VIP}/32"), "dev", "lo"],
    );
}

/// Whether kube-proxy's rules DNAT the Service to `ip` and to none of `others`.
fn dnat_only_to(ip: Ipv4Addr, others: &[Ipv4Addr]) -> bool {
    let nat = run("iptables-save", &["-t", "nat"]);
    let dnat = |ip: Ipv4Addr| nat.contains(&format!("--to-destination {ip}:8080"));
    dnat(ip) && others.iter().all(|&o| o == ip || !dnat(o))
}

/// The daemon on `dir`, without a full sync during the test: the partial syncs of the
/// changes must clean on their own.
fn start(dir: &TempDir, logs: &TempDir) -> Daemon {
    Daemon::start(
        dir.path(),
        &logs.path().join("daemon.log"),
        &[
            "--ipvs-sync-period",
            "5m",
            "--iptables-sync-period",
            "5m",
            "--metrics-bind-address",
            METRICS,
        ],
    )
}

#[test]
fn fallback_a_replaced_udp_endpoint_answers_the_same_client_within_one_sync() {
    enter_new_netns();
    let tag = std::process::id() % 10_000;
    let old = Pod::start(&format!("cto{tag}"), Ipv4Addr::new(10, 244, 1, 5));
    let new = Pod::start(&format!("ctn{tag}"), Ipv4Addr::new(10, 244, 2, 7));
    let dir = TempDir::new("fallback-conntrack-manifests");
    let logs = TempDir::new("fallback-conntrack-logs");
    dir.write("dns.yaml", &dns(&[old.ip]).yaml());
    let daemon = start(&dir, &logs);

    let pods = [old.ip, new.ip];
    let after = replace_the_endpoint(&dir, &daemon, &old, &new, |ip| dnat_only_to(ip, &pods));
    println!(
        "iptables: the new endpoint first answered {:.3} s after it was programmed",
        after.as_secs_f64()
    );
    let (runs, deleted) = reconciled_ipv4();
    assert!(
        runs >= 2.0 && deleted >= 1.0,
        "/metrics counts the runs ({runs}) and the deleted entry ({deleted})"
    );
}

/// kube-proxy's "a UDP Service went from no endpoint to some": a flow that began before the
/// Service had an endpoint was never DNATed, and every datagram refreshes it, so without the
/// cleanup its client would never reach the endpoint.
#[test]
fn fallback_a_flow_older_than_the_services_first_endpoint_reaches_it_within_one_sync() {
    enter_new_netns();
    let tag = std::process::id() % 10_000;
    let pod = Pod::start(&format!("ctf{tag}"), Ipv4Addr::new(10, 244, 3, 9));
    // Conntrack on, as on any node (a namespace tracks nothing until a rule needs it): a rule
    // that only counts.
    run(
        "iptables",
        &[
            "-t",
            "mangle",
            "-A",
            "OUTPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
        ],
    );
    let client = Client::start(SocketAddr::from((VIP.parse::<Ipv4Addr>().unwrap(), 53)));
    wait_until(
        "the client's flow, answered by nobody but the ClusterIP itself",
        || conntrack_reply_sources() == [VIP],
        || format!("conntrack: {:?}", conntrack_reply_sources()),
    );

    let dir = TempDir::new("fallback-conntrack-first-manifests");
    let logs = TempDir::new("fallback-conntrack-first-logs");
    dir.write("dns.yaml", &dns(&[pod.ip]).yaml());
    let daemon = start(&dir, &logs);
    let log = || {
        format!(
            "conntrack: {:?}\ndaemon log:\n{}",
            conntrack_reply_sources(),
            daemon.log()
        )
    };
    wait_until(
        "the rules to DNAT to the pod",
        || dnat_only_to(pod.ip, &[]),
        log,
    );
    let programmed = Instant::now();
    wait_until(
        "the pod to answer the client's old flow",
        || {
            client
                .answers_since(programmed)
                .iter()
                .any(|(_, n)| *n == pod.name)
        },
        log,
    );
    assert_eq!(
        conntrack_reply_sources(),
        [pod.ip.to_string()],
        "conntrack -L: the flow now goes to the pod"
    );
    let (_, deleted) = reconciled_ipv4();
    assert!(
        deleted >= 1.0,
        "/metrics counts the un-NATed entry deleted: {deleted}"
    );
}
