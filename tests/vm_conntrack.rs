//! Conntrack cleanup with the IPVS proxier, in the VM: a UDP client keeps its flow to a
//! ClusterIP while the endpoint behind it is replaced (`cargo xtask vm-test -p ipvs-proxy --
//! conntrack`). The same scenario for the iptables fallback runs on the host
//! (`tests/fallback_conntrack.rs`).
//!
//! In IPVS mode the kernel also drops the entry itself: with `expire_nodest_conn` and
//! `vs.conntrack` set, it expires the connections to a deleted real server, and their
//! conntrack entries with them, so this test passes without the reconciler as well (seen once,
//! with the reconciler disabled; with it, it usually finds nothing left to delete). It proves
//! the user's view in this mode and that the reconciler runs; the fallback's tests are the
//! ones that fail without the reconciler.

#[allow(dead_code, reason = "the scenario uses a few of the helpers")]
mod support;
#[path = "support/udp_flow.rs"]
mod udp_flow;

use std::net::Ipv4Addr;

use support::{Daemon, Kernel, Pod, TempDir, ipvs_lines_of};
use udp_flow::{METRICS, VIP, dns, reconciled_ipv4, replace_the_endpoint};

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn conntrack_a_replaced_udp_endpoint_answers_the_same_client_within_one_sync() {
    let _kernel = Kernel::take();
    let old = Pod::start("ct-old", Ipv4Addr::new(10, 244, 1, 5));
    let new = Pod::start("ct-new", Ipv4Addr::new(10, 244, 2, 7));
    let dir = TempDir::new("conntrack-manifests");
    let logs = TempDir::new("conntrack-logs");
    dir.write("dns.yaml", &dns(&[old.ip]).yaml());
    // No full sync during the test: the partial sync of the change must clean on its own.
    let daemon = Daemon::start(
        dir.path(),
        &logs.path().join("daemon.log"),
        &[
            "--ipvs-sync-period",
            "5m",
            "--metrics-bind-address",
            METRICS,
        ],
    );

    let service = format!("-u {VIP}:53");
    let after = replace_the_endpoint(&dir, &daemon, &old, &new, |ip| {
        ipvs_lines_of(&service)
            == [
                format!("-A {service} -s rr"),
                format!("-a {service} -r {ip}:8080 -m -w 1"),
            ]
    });
    let (runs, deleted) = reconciled_ipv4();
    println!(
        "IPVS: the new endpoint first answered {:.3} s after it was programmed; the reconciler ran {runs} times and deleted {deleted} entries",
        after.as_secs_f64()
    );
    // The full sync at start and the partial sync of the change both list (the deletion is
    // raced by the kernel's own, above, so it is not asserted).
    assert!(runs >= 2.0, "the reconciler ran after both syncs: {runs}");
}
