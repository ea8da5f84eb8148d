//! The daemon following a Kubernetes API server, in the VM: `ipvs-proxy --master
//! http://127.0.0.1:PORT` against the loopback test API server of the controllers' tests, with
//! "pods" (network namespaces answering with their own name) behind ClusterIPs. Each test
//! changes objects on the server and reads the kernel back as an operator does (`ipvsadm -Sn`,
//! `ip -o addr show dev kube-ipvs0`): the initial sync waits for every list, creates, updates
//! and deletes are followed, an outage keeps the kernel as it was, and a 410 Gone relists to
//! the right state. Runs only in the VM: `cargo xtask vm-test -p ipvs-proxy -- kube_`.

#[allow(
    dead_code,
    reason = "the shared support module serves several test files"
)]
mod support;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use controllers::source::Kind;
use support::{
    DAEMON, Kernel, Pod, TempDir, ask_tcp, ipvs_lines, ipvs_lines_of, kube_ipvs0_addresses, run,
    wait_until,
};
use testapi::{ApiServer, Request, node, service, slice};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 9);
const POD_PORT: u16 = support::POD_PORT;

/// The test API server on a runtime of its own (the tests themselves are blocking).
struct Api {
    // Dropped before the runtime: its Drop aborts the server's tasks.
    server: ApiServer,
    runtime: tokio::runtime::Runtime,
}

impl Api {
    /// A server on a free port of 127.0.0.1 that knows the Node `node-a`.
    fn start() -> Api {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let server = runtime.block_on(ApiServer::start());
        server.apply(Kind::Node, node("node-a", "192.168.56.10"));
        Api { server, runtime }
    }

    fn restart(&self) {
        self.runtime.block_on(self.server.restart());
    }

    /// A Service `name` at `vip:port` (TCP, port name `http`) and its slice `name-abc` with
    /// ready endpoints at `ips` on the pods' port.
    fn apply_service(&self, name: &str, vip: &str, port: u16, ips: &[Ipv4Addr]) {
        self.server
            .apply(Kind::Service, service("default", name, vip, port));
        self.apply_slice(name, ips);
    }

    fn apply_slice(&self, name: &str, ips: &[Ipv4Addr]) {
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        self.server.apply(
            Kind::EndpointSlice,
            slice("default", &format!("{name}-abc"), name, &ips, POD_PORT),
        );
    }

    fn delete(&self, kind: Kind, name: &str) {
        self.server
            .delete(kind, "default", name)
            .unwrap_or_else(|| panic!("{kind:?} default/{name} exists"));
    }

    /// What `ipvs-proxy plan --master URL --only ipvs` says the table should be, sorted: the
    /// same source listed once, without the daemon.
    fn plan_ipvs(&self) -> Vec<String> {
        let mut lines: Vec<String> = run(
            DAEMON,
            &[
                "plan",
                "--master",
                &self.server.url(),
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

    /// The requests the server received from the `skip`th on.
    fn requests_since(&self, skip: usize) -> Vec<Request> {
        self.server.requests().into_iter().skip(skip).collect()
    }
}

/// `ipvs-proxy --master URL --hostname-override node-a` with its log in a file; killed and
/// followed by `ipvs-proxy --cleanup` on drop, so a failing test leaves no proxy state.
struct KubeDaemon {
    child: Child,
    log: PathBuf,
    /// Where `/healthz` is served.
    health: SocketAddr,
}

impl KubeDaemon {
    fn start(api: &Api, log: &Path, extra: &[&str]) -> KubeDaemon {
        // Port 0 turns the server off, so a free port is picked here.
        let health = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let out = std::fs::File::create(log).expect("creating the daemon's log");
        let err = out.try_clone().expect("cloning the log file");
        let child = Command::new(DAEMON)
            .args(["--master", &api.server.url()])
            .args([
                "--hostname-override",
                "node-a",
                "--cluster-cidr",
                "10.244.0.0/16",
                "--healthz-bind-address",
                &health.to_string(),
                "--metrics-bind-address",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting ipvs-proxy");
        KubeDaemon {
            child,
            log: log.to_owned(),
            health,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where `/healthz` is served, once it is.
    fn healthz_addr(&self) -> SocketAddr {
        wait_until(
            "the daemon to serve /healthz",
            || healthz(self.health).is_ok(),
            || self.log(),
        );
        self.health
    }

    /// Stops the API server and waits until every watch of the daemon has failed, so that
    /// what changes from now on is unseen until the server is back. (The server's connections
    /// are cut by aborting their tasks, which is not at once.)
    fn lose(&self, api: &Api) {
        let since = self.log().len();
        api.server.stop();
        wait_until(
            "every watch to fail",
            || {
                let log = self.log();
                let failures: Vec<&str> = log
                    .get(since..)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("watch failed"))
                    .collect();
                ["Service", "EndpointSlice", "Node"].iter().all(|kind| {
                    failures
                        .iter()
                        .any(|l| l.contains(&format!("kind={kind} ")))
                })
            },
            || self.log(),
        );
    }

    /// The `synced` lines, oldest first.
    fn syncs(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" synced ") || l.ends_with(" synced"))
            .map(str::to_owned)
            .collect()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for KubeDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(DAEMON)
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `GET /healthz`: the HTTP status code.
fn healthz(addr: SocketAddr) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {response:?}")))
}

/// Three pods and a place for the daemon's log.
struct Cluster {
    pods: Vec<Pod>,
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
            logs: TempDir::new(&format!("kube-{tag}-logs")),
        }
    }

    fn names(&self, which: &[usize]) -> BTreeSet<String> {
        which.iter().map(|&i| self.pods[i].name.clone()).collect()
    }

    fn start(&self, api: &Api, extra: &[&str]) -> KubeDaemon {
        KubeDaemon::start(api, &self.logs.path().join("daemon.log"), extra)
    }
}

fn addr(vip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(vip.parse().expect("an IPv4 address"), port)
}

/// The `ipvsadm -Sn` lines of a TCP virtual server with round robin and `ips` as real servers
/// on the pods' port, sorted.
fn tcp_vs(vip: &str, port: u16, ips: &[Ipv4Addr]) -> Vec<String> {
    let mut lines = vec![format!("-A -t {vip}:{port} -s rr")];
    lines.extend(
        ips.iter()
            .map(|ip| format!("-a -t {vip}:{port} -r {ip}:{POD_PORT} -m -w 1")),
    );
    lines.sort();
    lines
}

/// Sorting for `ipvsadm -Sn` line lists put together from parts.
trait Sorted {
    fn sorted(self) -> Self;
}

impl Sorted for Vec<String> {
    fn sorted(mut self) -> Self {
        self.sort();
        self
    }
}

/// The kernel as an operator reads it, for failure messages.
fn kernel_state(daemon: &KubeDaemon) -> String {
    format!(
        "ipvsadm -Sn:\n{}\nkube-ipvs0: {:?}\ndaemon log:\n{}",
        ipvs_lines().join("\n"),
        kube_ipvs0_addresses(),
        daemon.log()
    )
}

/// Waits until the `ipvsadm -Sn` lines of the virtual server `vs` (`-t 10.96.0.20:80`) are
/// exactly `want`.
fn wait_for_vs(daemon: &KubeDaemon, vs: &str, want: &[String]) {
    wait_until(
        &format!("ipvsadm -Sn to show {vs} as {want:#?}"),
        || ipvs_lines_of(vs) == want,
        || kernel_state(daemon),
    );
}

fn wait_for_addresses(daemon: &KubeDaemon, want: &[&str]) {
    wait_until(
        &format!("kube-ipvs0 to hold {want:?}"),
        || kube_ipvs0_addresses() == want,
        || kernel_state(daemon),
    );
}

/// Waits until the whole IPVS table is what `plan` computes from the API server.
fn wait_for_plan(api: &Api, daemon: &KubeDaemon) -> Vec<String> {
    let planned = api.plan_ipvs();
    wait_until(
        "the kernel to match ipvs-proxy plan",
        || ipvs_lines() == planned,
        || format!("plan:\n{}\n{}", planned.join("\n"), kernel_state(daemon)),
    );
    planned
}

/// The pods that answered `n` new TCP connections.
fn tcp_answers(to: SocketAddr, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| ask_tcp(to).unwrap_or_else(|e| panic!("TCP request {i} to {to}: {e}")))
        .collect()
}

/// Reads `ipvsadm -Sn` over and over in a thread, keeping every distinct table it saw, so a
/// test can tell that a virtual server never went away, not just that it is back.
struct Sampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Vec<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start() -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let table = ipvs_lines();
                    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    if seen.last() != Some(&table) {
                        seen.push(table);
                    }
                    drop(seen);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Sampler {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Every distinct table seen, in order.
    fn finish(mut self) -> Vec<Vec<String>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the sampler thread");
        }
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The lines of one virtual server (`-t 10.96.0.20:80`) in a table.
fn lines_of(table: &[String], vs: &str) -> Vec<String> {
    let tag = format!(" {vs} ");
    table
        .iter()
        .filter(|l| format!("{l} ").contains(&tag))
        .cloned()
        .collect()
}

/// The daemon programs nothing while one of its lists is still coming (a proxy that synced the
/// Services before their EndpointSlices would publish virtual servers without real servers on
/// every node), and `/healthz` says not ready; once every list is in, the whole state goes in
/// at once and traffic through the ClusterIP reaches all three pods.
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn kube_nothing_is_programmed_before_every_list_then_three_pods_answer() {
    const SLOW: Duration = Duration::from_secs(8);
    // How long before the slow list can answer the checks stop: one round of them on a
    // loaded emulator.
    const MARGIN: Duration = Duration::from_secs(2);
    let _kernel = Kernel::take();
    let cluster = Cluster::new("ksync");
    let api = Api::start();
    api.apply_service("web", "10.96.0.20", 80, &[POD_A, POD_B, POD_C]);
    api.server.knobs(|k| k.list_delay[1] = SLOW);
    let daemon = cluster.start(&api, &[]);
    let health = daemon.healthz_addr();

    // Once every list has been asked for, watch the kernel until shortly before the slow
    // EndpointSlice list can answer: its delay runs from the request's arrival, which the
    // server records.
    let mut slow_list = None;
    wait_until(
        "the daemon to ask for every list",
        || {
            let requests = api.server.requests();
            let list = |kind| requests.iter().find(|r| r.kind == kind && r.is_list());
            slow_list = list(Kind::EndpointSlice).map(|r| r.at);
            slow_list.is_some() && list(Kind::Service).is_some() && list(Kind::Node).is_some()
        },
        || format!("{:#?}\n{}", api.server.requests(), daemon.log()),
    );
    let slow_list = slow_list.expect("the EndpointSlice list was asked for");
    let mut checks = 0;
    while slow_list.elapsed() + MARGIN < SLOW {
        assert_eq!(
            ipvs_lines(),
            Vec::<String>::new(),
            "no virtual server before the EndpointSlice list is complete\n{}",
            daemon.log()
        );
        assert_eq!(
            kube_ipvs0_addresses(),
            Vec::<String>::new(),
            "no address on kube-ipvs0 before the lists are complete"
        );
        assert_eq!(
            healthz(health).expect("/healthz answers"),
            503,
            "not ready before the first sync"
        );
        checks += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        checks >= 3,
        "the kernel was read {checks} times during the slow list"
    );
    assert!(
        daemon.syncs().is_empty(),
        "no sync before the lists are complete:\n{}",
        daemon.log()
    );

    let web = tcp_vs("10.96.0.20", 80, &[POD_A, POD_B, POD_C]);
    wait_for_vs(&daemon, "-t 10.96.0.20:80", &web);
    assert_eq!(ipvs_lines(), web, "nothing else is programmed");
    assert_eq!(kube_ipvs0_addresses(), ["10.96.0.20/32"]);
    wait_until(
        "/healthz to say ready",
        || healthz(health).is_ok_and(|code| code == 200),
        || daemon.log(),
    );
    // The first sync had the whole state: the Service and its three endpoints together.
    let log = daemon.log();
    let complete = log
        .lines()
        .position(|l| l.contains("initial state complete"))
        .unwrap_or_else(|| panic!("the initial state is logged complete:\n{log}"));
    let first_sync = log
        .lines()
        .position(|l| l.contains(" synced "))
        .expect("a sync");
    assert!(complete < first_sync, "{log}");
    assert!(
        log.lines()
            .nth(complete)
            .is_some_and(|l| l.contains("services=1")),
        "{log}"
    );
    assert_eq!(
        tcp_answers(addr("10.96.0.20", 80), 6),
        cluster.names(&[0, 1, 2]),
        "every pod answers through the ClusterIP"
    );
}

/// Creates, updates (an endpoint added, the Service port moved) and deletes of Services and
/// EndpointSlices on the API server reach the kernel, one by one. The server refuses streaming
/// lists here, so the paginated-list path is the one in use.
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn kube_create_update_delete_are_followed_by_the_kernel() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("kcrud");
    let api = Api::start();
    api.server.knobs(|k| k.streaming = false);
    let daemon = cluster.start(&api, &[]);
    let health = daemon.healthz_addr();
    wait_until(
        "the first sync of an empty cluster",
        || healthz(health).is_ok_and(|code| code == 200),
        || daemon.log(),
    );
    assert_eq!(ipvs_lines(), Vec::<String>::new());
    assert_eq!(kube_ipvs0_addresses(), Vec::<String>::new());

    // Create: a Service with two endpoints.
    api.apply_service("web", "10.96.0.20", 80, &[POD_A, POD_B]);
    wait_for_vs(
        &daemon,
        "-t 10.96.0.20:80",
        &tcp_vs("10.96.0.20", 80, &[POD_A, POD_B]),
    );
    wait_for_addresses(&daemon, &["10.96.0.20/32"]);
    assert_eq!(
        tcp_answers(addr("10.96.0.20", 80), 4),
        cluster.names(&[0, 1])
    );

    // Update the slice: a third endpoint.
    api.apply_slice("web", &[POD_A, POD_B, POD_C]);
    wait_for_vs(
        &daemon,
        "-t 10.96.0.20:80",
        &tcp_vs("10.96.0.20", 80, &[POD_A, POD_B, POD_C]),
    );
    assert_eq!(
        tcp_answers(addr("10.96.0.20", 80), 6),
        cluster.names(&[0, 1, 2])
    );

    // Update the Service: port 80 becomes 81.
    api.server
        .apply(Kind::Service, service("default", "web", "10.96.0.20", 81));
    wait_for_vs(
        &daemon,
        "-t 10.96.0.20:81",
        &tcp_vs("10.96.0.20", 81, &[POD_A, POD_B, POD_C]),
    );
    wait_for_vs(&daemon, "-t 10.96.0.20:80", &[]);
    assert_eq!(kube_ipvs0_addresses(), ["10.96.0.20/32"]);
    assert_eq!(
        tcp_answers(addr("10.96.0.20", 81), 6),
        cluster.names(&[0, 1, 2])
    );

    // Create a second Service; the kernel is what plan computes from the same server.
    api.apply_service("api", "10.96.0.21", 80, &[POD_C]);
    wait_for_vs(
        &daemon,
        "-t 10.96.0.21:80",
        &tcp_vs("10.96.0.21", 80, &[POD_C]),
    );
    wait_for_addresses(&daemon, &["10.96.0.20/32", "10.96.0.21/32"]);
    wait_for_plan(&api, &daemon);

    // Delete its EndpointSlice: the virtual server stays, without real servers.
    api.delete(Kind::EndpointSlice, "api-abc");
    wait_for_vs(&daemon, "-t 10.96.0.21:80", &tcp_vs("10.96.0.21", 80, &[]));
    wait_for_plan(&api, &daemon);

    // Delete the Service: its virtual server and its address go; the other stays as it was.
    api.delete(Kind::Service, "api");
    wait_for_vs(&daemon, "-t 10.96.0.21:80", &[]);
    wait_for_addresses(&daemon, &["10.96.0.20/32"]);
    assert_eq!(
        ipvs_lines(),
        tcp_vs("10.96.0.20", 81, &[POD_A, POD_B, POD_C])
    );

    // Delete the last Service and its slice: nothing is left.
    api.delete(Kind::Service, "web");
    api.delete(Kind::EndpointSlice, "web-abc");
    wait_until(
        "an empty IPVS table",
        || ipvs_lines().is_empty(),
        || kernel_state(&daemon),
    );
    wait_for_addresses(&daemon, &[]);
    assert!(
        ask_tcp(addr("10.96.0.20", 81)).is_err(),
        "nothing answers on the deleted ClusterIP"
    );
}

/// An API server outage changes nothing in the kernel: no virtual server goes, even across
/// full resyncs, and `/healthz` keeps answering ready. Back on the same port, the daemon
/// resumes its watches from where it was (no relist: the server still has the history) and
/// catches up with the change made during the outage.
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn kube_outage_keeps_the_kernel_then_catches_up_without_relisting() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("kout");
    let api = Api::start();
    api.apply_service("web", "10.96.0.20", 80, &[POD_A, POD_B, POD_C]);
    api.apply_service("api", "10.96.0.21", 80, &[POD_C]);
    let mut daemon = cluster.start(&api, &["--ipvs-sync-period", "2s"]);
    let health = daemon.healthz_addr();
    let before = wait_for_plan(&api, &daemon);
    assert_eq!(
        before,
        [
            tcp_vs("10.96.0.20", 80, &[POD_A, POD_B, POD_C]),
            tcp_vs("10.96.0.21", 80, &[POD_C])
        ]
        .concat()
        .sorted()
    );
    wait_until(
        "/healthz to say ready",
        || healthz(health).is_ok_and(|code| code == 200),
        || daemon.log(),
    );
    let addresses = kube_ipvs0_addresses();
    assert_eq!(addresses, ["10.96.0.20/32", "10.96.0.21/32"]);

    let sampler = Sampler::start();
    daemon.lose(&api);
    let down = Instant::now();
    // Periodic full syncs read the kernel off the loop's thread and log when they checked it.
    let full_syncs = |d: &KubeDaemon| {
        d.log()
            .lines()
            .filter(|l| l.contains("full=true") || l.contains("full sync checked the kernel"))
            .count()
    };
    let resyncs_before = full_syncs(&daemon);
    // A change the daemon cannot see yet.
    api.apply_slice("api", &[POD_A, POD_B]);
    while down.elapsed() < Duration::from_secs(6) {
        assert_eq!(ipvs_lines(), before, "{}", kernel_state(&daemon));
        assert_eq!(kube_ipvs0_addresses(), addresses);
        assert_eq!(
            healthz(health).expect("/healthz answers during the outage"),
            200,
            "still ready during the outage\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(daemon.alive(), "the daemon outlives the outage");
    assert!(
        full_syncs(&daemon) > resyncs_before,
        "full resyncs ran during the outage\n{}",
        daemon.log()
    );
    assert_eq!(
        tcp_answers(addr("10.96.0.20", 80), 6),
        cluster.names(&[0, 1, 2]),
        "traffic flows during the outage"
    );

    let served = api.server.requests().len();
    api.restart();
    let api_ab = tcp_vs("10.96.0.21", 80, &[POD_A, POD_B]);
    wait_for_vs(&daemon, "-t 10.96.0.21:80", &api_ab);
    // The daemon's requests only: `plan` below lists.
    let requests = api.requests_since(served);
    let after = wait_for_plan(&api, &daemon);
    let tables = sampler.finish();
    let web = lines_of(&before, "-t 10.96.0.20:80");
    for table in &tables {
        assert_eq!(
            lines_of(table, "-t 10.96.0.20:80"),
            web,
            "the unchanged Service never moved; tables seen: {tables:#?}"
        );
        // The removed real server may show draining (weight 0) for a moment.
        let settled: Vec<String> = table
            .iter()
            .filter(|l| !l.ends_with(" -w 0"))
            .cloned()
            .collect();
        assert!(
            settled == before || settled == after,
            "only the one change happened; tables seen: {tables:#?}"
        );
    }
    assert_eq!(
        tcp_answers(addr("10.96.0.21", 80), 4),
        cluster.names(&[0, 1])
    );
    assert!(
        requests.iter().any(Request::is_resumed_watch),
        "the watches resumed: {requests:#?}"
    );
    assert!(
        !requests.iter().any(|r| r.is_list() || r.is_continuation()),
        "no relist after an outage the server has the history for: {requests:#?}"
    );
}

/// A 410 Gone when the watches resume (the server compacted its history during an outage)
/// leads to one relist per kind, and the kernel ends as the server says: the Service deleted
/// during the outage leaves IPVS and kube-ipvs0, the changed one follows, a new one appears,
/// and the untouched one never moves.
fn relist_after_gone(tag: &str, gone_as_status: bool) {
    let _kernel = Kernel::take();
    let cluster = Cluster::new(tag);
    let api = Api::start();
    api.server.knobs(|k| k.gone_as_status = gone_as_status);
    api.apply_service("web", "10.96.0.20", 80, &[POD_A, POD_B, POD_C]);
    api.apply_service("api", "10.96.0.21", 80, &[POD_C]);
    api.apply_service("old", "10.96.0.22", 80, &[POD_B]);
    let daemon = cluster.start(&api, &[]);
    let before = wait_for_plan(&api, &daemon);
    assert_eq!(before.len(), 4 + 2 + 2, "{before:#?}");
    wait_for_addresses(
        &daemon,
        &["10.96.0.20/32", "10.96.0.21/32", "10.96.0.22/32"],
    );

    let sampler = Sampler::start();
    daemon.lose(&api);
    api.delete(Kind::Service, "old");
    api.delete(Kind::EndpointSlice, "old-abc");
    api.apply_slice("api", &[POD_A]);
    api.apply_service("new", "10.96.0.23", 80, &[POD_B]);
    api.server.compact();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ipvs_lines(), before, "{}", kernel_state(&daemon));
    let served = api.server.requests().len();
    api.restart();

    wait_for_vs(&daemon, "-t 10.96.0.22:80", &[]);
    wait_for_vs(
        &daemon,
        "-t 10.96.0.23:80",
        &tcp_vs("10.96.0.23", 80, &[POD_B]),
    );
    // One relist per kind, each after its 410 (counted before `plan` below lists too).
    let mut relisted = Vec::new();
    wait_until(
        "a relist of every kind",
        || {
            relisted = api.requests_since(served);
            testapi::kinds()
                .iter()
                .all(|&kind| relisted.iter().any(|r| r.kind == kind && r.is_list()))
        },
        || format!("{:#?}", api.requests_since(served)),
    );
    for kind in testapi::kinds() {
        let lists = relisted
            .iter()
            .filter(|r| r.kind == kind && r.is_list())
            .count();
        assert_eq!(
            lists, 1,
            "one list of {kind:?} after the 410: {relisted:#?}"
        );
    }
    let after = wait_for_plan(&api, &daemon);
    assert_eq!(
        after,
        [
            tcp_vs("10.96.0.20", 80, &[POD_A, POD_B, POD_C]),
            tcp_vs("10.96.0.21", 80, &[POD_A]),
            tcp_vs("10.96.0.23", 80, &[POD_B]),
        ]
        .concat()
        .sorted()
    );
    wait_for_addresses(
        &daemon,
        &["10.96.0.20/32", "10.96.0.21/32", "10.96.0.23/32"],
    );
    let tables = sampler.finish();
    let web = lines_of(&before, "-t 10.96.0.20:80");
    for table in &tables {
        assert_eq!(
            lines_of(table, "-t 10.96.0.20:80"),
            web,
            "the untouched Service never moved during the relist; tables seen: {tables:#?}"
        );
    }
    assert_eq!(
        tcp_answers(addr("10.96.0.20", 80), 6),
        cluster.names(&[0, 1, 2])
    );
    assert_eq!(tcp_answers(addr("10.96.0.23", 80), 2), cluster.names(&[1]));
    assert!(
        ask_tcp(addr("10.96.0.22", 80)).is_err(),
        "nothing answers on the deleted ClusterIP"
    );

    // And no relist loop.
    let quiet_from = api.server.requests().len();
    std::thread::sleep(Duration::from_secs(3));
    let later = api.requests_since(quiet_from);
    assert!(
        !later.iter().any(|r| r.is_list() || r.is_continuation()),
        "no more lists after the relist: {later:#?}"
    );
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn kube_gone_event_during_watch_relists_to_the_right_kernel_state() {
    relist_after_gone("kgone", false);
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn kube_gone_status_at_watch_start_relists_to_the_right_kernel_state() {
    relist_after_gone("k410", true);
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn kube_a_refused_service_gets_one_event_not_one_per_retry() {
    let _kernel = Kernel::take();
    let cluster = Cluster::new("kevent");
    let api = Api::start();
    api.apply_service("web", "10.96.0.20", 80, &[POD_A]);
    // The VM's 6.1 kernel has no `twos` scheduler (it came in 6.7): every attempt is refused.
    let mut odd = service("default", "odd", "10.96.0.21", 80);
    odd["metadata"]["annotations"] = serde_json::json!({"ipvs-proxy.io/scheduler": "twos"});
    api.server.apply(Kind::Service, odd);
    let daemon = cluster.start(&api, &["--ipvs-sync-period", "10s"]);
    wait_for_vs(
        &daemon,
        "-t 10.96.0.20:80",
        &tcp_vs("10.96.0.20", 80, &[POD_A]),
    );
    // Retries 1, 2 and 4 s after the first refusal, and a full sync at 10 s: five attempts.
    std::thread::sleep(Duration::from_secs(12));
    // Each attempt's sync ends with `failing=1` (odd still refused).
    let attempts = daemon
        .syncs()
        .iter()
        .filter(|l| l.contains("failing=1"))
        .count();
    let events = api.server.events();
    assert_eq!(events.len(), 1, "{events:#?}\n{}", daemon.log());
    let event = &events[0];
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&"Warning".into(), &"FailedToSyncService".into())
    );
    assert_eq!(event["regarding"]["name"], "odd", "{event:#}");
    assert_eq!(event["reportingController"], "ipvs-proxy");
    assert!(
        event["note"].as_str().is_some_and(|n| n.contains("twos")),
        "{event:#}"
    );
    assert!(attempts >= 3, "{attempts} attempts: {}", daemon.log());
}
