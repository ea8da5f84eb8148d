//! `ipvs-proxy --cleanup` in the VM: it removes what the proxy programmed — its virtual
//! servers (ClusterIP and NodePort ones), `kube-ipvs0`, its chains and sets in both iptables
//! flavours — and leaves a foreign virtual server, chain and set where they are. Twice.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROXY: &str = env!("CARGO_BIN_EXE_ipvs-proxy");

fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("running sh");
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything this test made, removed even when it fails.
struct Cleanup(Option<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.0.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let _ = Command::new("sh")
            .args([
                "-c",
                "ipvsadm -C; ip link del node0; ip link del kube-ipvs0; \
                 iptables -t nat -D PREROUTING -j MY-CHAIN; iptables -t nat -F MY-CHAIN; iptables -t nat -X MY-CHAIN; \
                 ipset destroy my-set; true",
            ])
            .status();
        let _ = Command::new(PROXY).arg("--cleanup").status();
    }
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cleanup_succeeds() {
    let status = Command::new(PROXY).arg("--cleanup").status().unwrap();
    assert!(
        status.success(),
        "ipvs-proxy --cleanup exited with {status}"
    );
}

fn kube_chains() -> String {
    let saved =
        sh("iptables-nft-save; ip6tables-nft-save; iptables-legacy-save; ip6tables-legacy-save");
    saved
        .lines()
        .filter(|l| l.contains("KUBE-"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn cleanup_removes_only_what_the_proxy_programmed_and_can_run_twice() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/examples");
    // node-a's InternalIP, made local so its NodePort virtual servers are the node's.
    sh(
        "ip link add node0 type dummy && ip addr add 192.168.56.10/32 dev node0 && ip link set node0 up",
    );
    let daemon = Command::new(PROXY)
        .args([
            "--manifests",
            examples.to_str().unwrap(),
            "--hostname-override",
            "node-a",
        ])
        .args([
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Cleanup(Some(daemon));
    wait_for("the proxy to program the examples", || {
        let saved = sh("ipvsadm -Sn");
        saved.contains("-A -t 10.96.0.20:80") && saved.contains("-A -t 192.168.56.10:30080")
    });
    wait_for("the proxy's ipsets", || {
        sh("ipset list -n").contains("KUBE-CLUSTER-IP")
    });
    let mut daemon = guard.0.take().unwrap();
    sh(&format!("kill -TERM {}", daemon.id()));
    assert!(daemon.wait().unwrap().success());

    // Foreign state: a virtual server on the node address (not a NodePort), one elsewhere, a
    // user's chain with a jump from a built-in chain, a user's set.
    sh(
        "ipvsadm -A -t 192.168.56.10:22 -s rr && ipvsadm -A -t 203.0.113.5:80 -s wrr \
        && ipvsadm -a -t 203.0.113.5:80 -r 10.1.1.1:80 -m",
    );
    sh(
        "iptables -t nat -N MY-CHAIN && iptables -t nat -A MY-CHAIN -j RETURN && iptables -t nat -A PREROUTING -j MY-CHAIN",
    );
    sh("ipset create my-set hash:ip && ipset add my-set 10.1.1.1");

    for round in ["first", "second"] {
        cleanup_succeeds();
        let ipvs = sh("ipvsadm -Sn");
        assert_eq!(
            ipvs.lines().collect::<Vec<_>>(),
            [
                "-A -t 192.168.56.10:22 -s rr",
                "-A -t 203.0.113.5:80 -s wrr",
                "-a -t 203.0.113.5:80 -r 10.1.1.1:80 -m -w 1"
            ],
            "{round} cleanup: only the foreign virtual servers are left"
        );
        assert!(
            sh("ip -o link show")
                .lines()
                .all(|l| !l.contains("kube-ipvs0")),
            "{round}: kube-ipvs0 is gone"
        );
        assert!(
            sh("ip -o addr show dev node0").contains("192.168.56.10/32"),
            "{round}: other links untouched"
        );
        assert_eq!(kube_chains(), "", "{round}: no KUBE- chain or rule is left");
        let nat = sh("iptables -t nat -S");
        assert!(
            nat.contains("-A PREROUTING -j MY-CHAIN") && nat.contains("-A MY-CHAIN -j RETURN"),
            "{round}: {nat}"
        );
        assert_eq!(
            sh("ipset list -n").trim(),
            "my-set",
            "{round}: only the user's set is left"
        );
        assert!(sh("ipset list my-set").contains("10.1.1.1"));
    }
    drop(guard);
}
