//! Conntrack cleanup with the iptables fallback, on the host: the VM test's scenario
//! (`tests/vm_conntrack.rs`) in a network namespace of the test's own, where the daemon finds
//! no IPVS and runs kube-proxy's iptables rules. Needs root, `iptables` and `conntrack`.
#![allow(unsafe_code)]

#[allow(
    dead_code,
    reason = "the host test uses the pods and the daemon, not the IPVS readers"
)]
mod support;
#[path = "support/udp_flow.rs"]
mod udp_flow;

use std::net::Ipv4Addr;

use support::{Daemon, Pod, TempDir, run};
use udp_flow::{VIP, dns, replace_the_endpoint};

#[test]
fn fallback_a_replaced_udp_endpoint_answers_the_same_client_within_one_sync() {
    // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET moves only this test's thread, and
    // with it every process and socket the test makes, into a namespace of its own.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) needs root: {}",
        std::io::Error::last_os_error()
    );
    run("/bin/ip", &["link", "set", "lo", "up"]);
    // The ClusterIP is local, as kube-ipvs0 makes it in IPVS mode: a route for the client.
    run(
        "/bin/ip",
        &["addr", "add", &format!("{VIP}/32"), "dev", "lo"],
    );
    let tag = std::process::id() % 10_000;
    let old = Pod::start(&format!("cto{tag}"), Ipv4Addr::new(10, 244, 1, 5));
    let new = Pod::start(&format!("ctn{tag}"), Ipv4Addr::new(10, 244, 2, 7));
    let dir = TempDir::new("fallback-conntrack-manifests");
    let logs = TempDir::new("fallback-conntrack-logs");
    dir.write("dns.yaml", &dns(&[old.ip]).yaml());
    let daemon = Daemon::start(
        dir.path(),
        &logs.path().join("daemon.log"),
        &["--ipvs-sync-period", "5m", "--iptables-sync-period", "5m"],
    );

    let after = replace_the_endpoint(&dir, &daemon, &old, &new, |ip| {
        let nat = run("iptables-save", &["-t", "nat"]);
        let dnat = |ip: Ipv4Addr| nat.contains(&format!("--to-destination {ip}:8080"));
        dnat(ip)
            && [old.ip, new.ip]
                .into_iter()
                .filter(|&other| other != ip)
                .all(|other| !dnat(other))
    });
    println!(
        "iptables: the new endpoint first answered {:.3} s after it was programmed",
        after.as_secs_f64()
    );
}
