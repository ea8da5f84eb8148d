//! On a kernel without IPVS (this host's), the daemon says so and runs kube-proxy's iptables
//! rules instead; with `--ipvs-fallback=exit` it exits. Run in a network namespace the test
//! makes, so the host's own rules are never touched.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PROXY: &str = env!("CARGO_BIN_EXE_ipvs-proxy");

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("ipvsproxy-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name} (these tests need root)");
        Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        Netns(name)
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0]).args(args);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn examples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/examples")
        .display()
        .to_string()
}

fn saved_nat(ns: &Netns) -> String {
    let out = ns.exec(&["iptables-save", "-t", "nat"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn without_ipvs_the_daemon_says_why_and_runs_the_iptables_proxier() {
    let ns = Netns::new("fallback");
    let mut daemon = ns
        .exec(&[
            PROXY,
            "--manifests",
            &examples(),
            "--hostname-override",
            "node-a",
        ])
        .args([
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().unwrap().success(), "stops cleanly on SIGTERM");
    let mut log = String::new();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.lines().any(|l| l.contains("IPVS is unavailable")
            && l.contains("mode=\"iptables\"")
            && l.contains("generic netlink family")),
        "the log says which mode runs and why:\n{log}"
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
