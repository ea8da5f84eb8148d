//! What the host tests of the daemon share: a network namespace of the test's own (this host
//! has no IPVS, so the daemon runs its iptables fallback there and the host's ports and rules
//! are never touched), a thread inside it, and the example manifests.
#![allow(dead_code, reason = "each test file uses its own part")]

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

/// A network namespace with `lo` up, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("ipvsproxy-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(
            ok.unwrap().success(),
            "ip netns add {name} (these tests need root)"
        );
        let up = ["-n", &name, "link", "set", "lo", "up"];
        assert!(Command::new("ip").args(up).status().unwrap().success());
        Netns(name)
    }

    /// `ip netns exec NAME ARGS…`, to run a program inside.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0]).args(args);
        cmd
    }

    /// Runs `body` on a thread inside the namespace (sockets made there stay there).
    pub fn run<T: Send>(&self, body: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.0, body)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `body` on a thread inside the network namespace named `ns` (sockets made there stay
/// there); the caller's thread never moves.
pub fn in_netns<T: Send>(ns: &str, body: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            enter_netns(&file);
            body()
        })
        .join()
        .expect("the namespace thread panicked")
    })
}

#[allow(
    unsafe_code,
    reason = "setns(2) has no safe wrapper in our dependencies"
)]
fn enter_netns(ns: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the whole call; setns only changes this thread's
    // network namespace, which this thread (made for it) never leaves.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The bundled example manifests (`manifests/examples`).
pub fn examples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/examples")
        .display()
        .to_string()
}

/// Manifests of one more Service beside the examples': `default/extra` (ClusterIP
/// 10.96.77.7:80 → 8080) with one ready endpoint on node-a per address of `endpoints`.
pub fn extra_service(endpoints: &[&str]) -> String {
    let mut yaml = String::from(
        "apiVersion: v1\n\
         kind: Service\n\
         metadata: {name: extra, namespace: default}\n\
         spec:\n  clusterIP: 10.96.77.7\n  ports: [{name: http, port: 80, protocol: TCP}]\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\n\
         kind: EndpointSlice\n\
         metadata:\n  name: extra-abcde\n  namespace: default\n  \
         labels: {kubernetes.io/service-name: extra}\n\
         addressType: IPv4\n\
         ports: [{name: http, port: 8080, protocol: TCP}]\n\
         endpoints:\n",
    );
    for address in endpoints {
        let endpoint = "conditions: {ready: true}\n    nodeName: node-a";
        writeln!(yaml, "  - addresses: [{address}]\n    {endpoint}").expect("to a String");
    }
    yaml
}

/// How `daemon` exited, polled every 50 ms; `None` if it still runs after `limit`.
pub fn exited_within(
    daemon: &mut std::process::Child,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            return Some(status);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
