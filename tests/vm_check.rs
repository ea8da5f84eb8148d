//! `ipvs-proxy check` against the real kernel, in the VM: after the daemon synced it finds
//! nothing; a virtual server deleted by hand (`ipvsadm -D`) and a real server added by hand
//! (`ipvsadm -a`) are reported in `ipvsadm -Sn` lines, a rule added to one of its chains in an
//! `iptables-save` line; another tool's virtual server and chain are not.
//! Runs only in the VM: `cargo xtask vm-test -p ipvs-proxy -- check`.

#[allow(
    dead_code,
    reason = "check needs the daemon and the kernel readers, not the pods"
)]
mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use support::{Daemon, Kernel, ServiceSpec, TempDir, run, wait_until};

/// `ipvs-proxy check` with the daemon's source flags: (exit status, stdout, stderr).
fn check(manifests: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(support::DAEMON)
        .arg("check")
        .arg("--manifests")
        .arg(manifests)
        .args(["--hostname-override", "node-a"])
        .args(["--cluster-cidr", "10.244.0.0/16"])
        .output()
        .expect("running ipvs-proxy check");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8 output");
    (out.status.code(), text(out.stdout), text(out.stderr))
}

fn service<'a>(name: &'a str, vip: &'a str, endpoints: &'a [Ipv4Addr]) -> ServiceSpec<'a> {
    ServiceSpec {
        name,
        vip,
        port: 80,
        protocols: &["TCP"],
        endpoints,
        scheduler: None,
        affinity_seconds: None,
    }
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn check_finds_nothing_after_a_sync_and_reports_hand_edits_but_not_foreign_servers() {
    let _kernel = Kernel::take();
    let dir = TempDir::new("check-manifests");
    let logs = TempDir::new("check-logs");
    let pods = [
        Ipv4Addr::new(10, 244, 1, 5),
        Ipv4Addr::new(10, 244, 2, 7),
        Ipv4Addr::new(10, 244, 3, 9),
    ];
    dir.write("web.yaml", &service("web", "10.96.0.20", &pods).yaml());
    dir.write("api.yaml", &service("api", "10.96.0.21", &pods[..1]).yaml());
    // No full sync during the test: what is changed by hand stays changed.
    let daemon = Daemon::start(
        dir.path(),
        &logs.path().join("daemon.log"),
        &["--ipvs-sync-period", "600s"],
    );
    wait_until(
        "the first full sync",
        || !daemon.full_syncs().is_empty(),
        || daemon.log(),
    );

    let started = Instant::now();
    let (status, out, err) = check(dir.path());
    let ours = started.elapsed();
    let started = Instant::now();
    run("ipvsadm", &["-Sn"]);
    run("/bin/ip", &["addr", "show", "kube-ipvs0"]);
    run("ipset", &["save"]);
    run("iptables-nft-save", &[]);
    let floor = started.elapsed();
    eprintln!(
        "check after a sync: {:.3}s (ipvsadm -Sn, ip addr, ipset save and iptables-save: {:.3}s)",
        ours.as_secs_f64(),
        floor.as_secs_f64()
    );
    assert_eq!(
        (status, out.as_str()),
        (Some(0), ""),
        "check after the daemon synced\nstderr: {err}\nipvsadm -Sn:\n{}\ndaemon log:\n{}",
        run("ipvsadm", &["-Sn"]),
        daemon.log()
    );

    // Another tool's virtual server, on an address the proxy never bound.
    run("ipvsadm", &["-A", "-t", "10.99.0.1:80", "-s", "wlc"]);
    run(
        "ipvsadm",
        &["-a", "-t", "10.99.0.1:80", "-r", "10.244.9.9:80", "-m"],
    );
    // And another tool's chain, jumped to from a built-in chain.
    run("iptables-nft", &["-t", "nat", "-N", "MY-CHAIN"]);
    run(
        "iptables-nft",
        &["-t", "nat", "-A", "PREROUTING", "-j", "MY-CHAIN"],
    );
    let (status, out, err) = check(dir.path());
    assert_eq!(
        (status, out.as_str()),
        (Some(0), ""),
        "a foreign virtual server and chain are not the proxy's\nstderr: {err}"
    );

    run("ipvsadm", &["-D", "-t", "10.96.0.20:80"]);
    run(
        "ipvsadm",
        &[
            "-a",
            "-t",
            "10.96.0.21:80",
            "-r",
            "10.244.9.9:8080",
            "-m",
            "-w",
            "1",
        ],
    );
    let rule = ["-A", "KUBE-SERVICES", "-s", "10.0.0.0/8", "-j", "RETURN"];
    run("iptables-nft", &[&["-t", "nat"][..], &rule].concat());
    let (status, out, err) = check(dir.path());
    assert_eq!(
        out,
        "# ipvsadm -Sn\n\
         + -A -t 10.96.0.20:80 -s rr\n\
         + -a -t 10.96.0.20:80 -r 10.244.1.5:8080 -m -w 1\n\
         + -a -t 10.96.0.20:80 -r 10.244.2.7:8080 -m -w 1\n\
         + -a -t 10.96.0.20:80 -r 10.244.3.9:8080 -m -w 1\n\
         - -a -t 10.96.0.21:80 -r 10.244.9.9:8080 -m -w 1\n\
         # iptables-save -t nat\n\
         - -A KUBE-SERVICES -s 10.0.0.0/8 -j RETURN\n",
        "stderr: {err}"
    );
    assert_eq!(status, Some(1), "check exits 1 when the kernel differs");
}
