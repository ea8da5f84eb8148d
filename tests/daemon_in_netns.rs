//! The daemon as an operator meets it, each test in a network namespace of its own (this host
//! has no IPVS, so the iptables fallback runs; the host's ports and rules are never touched):
//! a port already taken (`--bind-address-hard-fail`), `/metrics` after the iptables proxier
//! synced, and the API client's rate limit (`--kube-api-qps`, `--kube-api-burst`) as the test
//! API server, listening in the namespace, sees it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controllers::source::Kind;

mod netns;

use netns::{Netns, examples, exited_within, extra_service};

const PROXY: &str = env!("CARGO_BIN_EXE_ipvs-proxy");

/// The daemon in `ns` on the example manifests as node-a, with `servers` (its bind address
/// flags and any other), its stderr piped.
fn start_daemon(ns: &Netns, servers: &[&str]) -> Child {
    start_daemon_on(ns, &examples(), servers)
}

fn start_daemon_on(ns: &Netns, manifests: &str, servers: &[&str]) -> Child {
    ns.exec(&[
        PROXY,
        "--manifests",
        manifests,
        "--hostname-override",
        "node-a",
    ])
    .args(servers)
    .env("NO_COLOR", "1")
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// Stops the daemon with SIGTERM (if it still runs) and returns what it logged.
fn stop(daemon: &mut Child) -> String {
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let _ = daemon.wait();
    let mut log = String::new();
    let _ = daemon.stderr.take().unwrap().read_to_string(&mut log);
    log
}

/// `GET path` from inside `ns`: the status line and body, or the error.
fn get(ns: &Netns, to: SocketAddr, path: &str) -> std::io::Result<String> {
    ns.run(|| {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
}

/// A port on the namespace's loopback, taken by a listener of the test's.
fn taken_port(ns: &Netns) -> (TcpListener, SocketAddr) {
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[test]
fn with_bind_address_hard_fail_a_taken_port_makes_the_daemon_exit_saying_which() {
    let ns = Netns::new("hardfail");
    let (_taken, addr) = taken_port(&ns);
    let healthz = addr.to_string();
    let mut daemon = start_daemon(
        &ns,
        &[
            "--healthz-bind-address",
            &healthz,
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--bind-address-hard-fail",
        ],
    );
    let Some(status) = exited_within(&mut daemon, Duration::from_secs(30)) else {
        panic!("still running: {}", stop(&mut daemon));
    };
    let log = stop(&mut daemon);
    assert!(!status.success(), "exited with {status}:\n{log}");
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains(&format!("binding --healthz-bind-address {healthz}"))
            && l.contains("in use")),
        "the error names the flag, the address and why:\n{log}"
    );
}

#[test]
fn without_bind_address_hard_fail_a_taken_port_is_retried_until_it_is_free() {
    let ns = Netns::new("softfail");
    let (taken, addr) = taken_port(&ns);
    let metrics = addr.to_string();
    let mut daemon = start_daemon(
        &ns,
        &[
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            &metrics,
        ],
    );
    // It keeps running (and syncing) while the port is taken.
    let web = "-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp";
    let start = Instant::now();
    loop {
        let nat = ns.exec(&["iptables-save", "-t", "nat"]).output().unwrap();
        if String::from_utf8_lossy(&nat.stdout).contains(web) {
            break;
        }
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "exited: {}",
            stop(&mut daemon)
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no sync: {}",
            stop(&mut daemon)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "exited: {}",
        stop(&mut daemon)
    );
    drop(taken);
    // Retried every 5 seconds: served within two tries of the port coming free.
    let freed = Instant::now();
    let served = loop {
        match get(&ns, addr, "/healthz") {
            Ok(response) if response.starts_with("HTTP/1.1 200") => break freed.elapsed(),
            _ if freed.elapsed() > Duration::from_secs(15) => {
                panic!("not served after the port was freed: {}", stop(&mut daemon))
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let log = stop(&mut daemon);
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("cannot serve /metrics")
            && l.contains(&metrics)),
        "the bind failure is logged:\n{log}"
    );
    println!("/metrics served {served:?} after its port was freed");
}

/// The rules in the proxy's chains of `table`, as `iptables-save` prints them in `ns`.
fn saved_proxy_rules(ns: &Netns, table: &str) -> usize {
    let out = ns.exec(&["iptables-save", "-t", table]).output().unwrap();
    let saved = String::from_utf8_lossy(&out.stdout);
    saved.lines().filter(|l| l.starts_with("-A KUBE-")).count()
}

/// The value of `name{table="TABLE",ip_family="IPv4"}` in `/metrics` at `addr` in `ns`.
fn rules_metric(ns: &Netns, addr: SocketAddr, name: &str, table: &str) -> Option<usize> {
    let text = get(ns, addr, "/metrics").ok()?;
    let prefix = format!("{name}{{table=\"{table}\",ip_family=\"IPv4\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

/// Waits until `/metrics` says `iptables-save`'s counts of the proxy's rules, per table, and
/// returns the rules the last sync wrote, per table.
fn wait_for_counts(ns: &Netns, addr: SocketAddr, daemon: &mut Child) -> [(usize, usize); 2] {
    let start = Instant::now();
    loop {
        let counts = ["filter", "nat"].map(|table| {
            let saved = saved_proxy_rules(ns, table);
            let total = rules_metric(ns, addr, "kubeproxy_sync_proxy_rules_iptables_total", table);
            let last = rules_metric(ns, addr, "kubeproxy_sync_proxy_rules_iptables_last", table);
            (saved, total, last)
        });
        if counts
            .iter()
            .all(|(saved, total, _)| *saved > 0 && Some(*saved) == *total)
        {
            return counts.map(|(saved, _, last)| (saved, last.expect("_last beside _total")));
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "(iptables-save, _total, _last) per table: {counts:?}\n{}",
            stop(daemon)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn after_an_iptables_sync_metrics_count_the_rules_iptables_save_shows() {
    let dir = std::env::temp_dir().join(format!("ipvs-proxy-rules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["web.yaml", "node.yaml"] {
        std::fs::copy(Path::new(&examples()).join(file), dir.join(file)).unwrap();
    }
    let ns = Netns::new("rules");
    let (free, addr) = taken_port(&ns);
    drop(free);
    let metrics = addr.to_string();
    let manifests = dir.display().to_string();
    let mut daemon = start_daemon_on(
        &ns,
        &manifests,
        &[
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            &metrics,
            "--proxy-mode=iptables",
        ],
    );
    // The first sync writes every rule into an empty namespace: _last is _total.
    let [(filter, filter_last), (nat, nat_last)] = wait_for_counts(&ns, addr, &mut daemon);
    assert_eq!((filter_last, nat_last), (filter, nat));
    // A Service more, synced alone: its chains (a SVC, two SEPs) and one KUBE-SERVICES rule.
    std::fs::write(
        dir.join("extra.yaml"),
        extra_service(&["10.244.1.77", "10.244.1.78"]),
    )
    .unwrap();
    let start = Instant::now();
    while saved_proxy_rules(&ns, "nat") == nat {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            stop(&mut daemon)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let [(filter_after, _), (nat_after, nat_written)] = wait_for_counts(&ns, addr, &mut daemon);
    let log = stop(&mut daemon);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(filter_after, filter, "{log}");
    assert_eq!(
        nat_written,
        nat_after - nat,
        "only the new rules written:\n{log}"
    );
    assert_eq!(nat_written, 1 + 2 + 2 * 2, "{log}");
    println!("nat rules {nat} then {nat_after} (last sync wrote {nat_written}), filter {filter}");
}

#[test]
fn a_periodic_full_sync_that_finds_nothing_to_change_writes_no_rules() {
    let ns = Netns::new("periodic");
    let (free, addr) = taken_port(&ns);
    drop(free);
    let metrics = addr.to_string();
    let mut daemon = start_daemon(
        &ns,
        &[
            "--healthz-bind-address=127.0.0.1:0",
            "--metrics-bind-address",
            &metrics,
            "--proxy-mode=iptables",
            "--iptables-sync-period=2s",
        ],
    );
    let [(filter, _), (nat, _)] = wait_for_counts(&ns, addr, &mut daemon);
    let start = Instant::now();
    loop {
        let last = ["filter", "nat"]
            .map(|t| rules_metric(&ns, addr, "kubeproxy_sync_proxy_rules_iptables_last", t));
        let total = ["filter", "nat"]
            .map(|t| rules_metric(&ns, addr, "kubeproxy_sync_proxy_rules_iptables_total", t));
        if last == [Some(0), Some(0)] {
            assert_eq!(total, [Some(filter), Some(nat)]);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "_last {last:?}, _total {total:?}: {}",
            stop(&mut daemon)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(&mut daemon);
}

/// The test API server listening on the namespace's loopback, on a runtime of its own (the
/// tests are blocking), with streaming lists off: the daemon starts with one paginated list
/// of each kind (three requests that take a token), and its watches.
struct Api {
    // Dropped before the runtime: its Drop aborts the server's tasks.
    server: testapi::ApiServer,
    _runtime: tokio::runtime::Runtime,
}

impl Api {
    fn start_in(ns: &Netns) -> Api {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Bound on the namespace's thread, so its listener is the namespace's.
        let server = ns.run(|| runtime.block_on(testapi::ApiServer::start()));
        server.knobs(|k| k.streaming = false);
        server.apply(Kind::Node, testapi::node("node-a", "192.168.56.10"));
        server.apply(
            Kind::Service,
            testapi::service("default", "web", "10.96.0.20", 80),
        );
        let ips = ["10.244.1.5".to_owned()];
        let slice = testapi::slice("default", "web-abc", "web", &ips, 8080);
        server.apply(Kind::EndpointSlice, slice);
        Api {
            server,
            _runtime: runtime,
        }
    }
}

#[test]
fn the_api_client_waits_for_a_token_beyond_the_burst_at_kube_api_qps() {
    let ns = Netns::new("qps");
    let api = Api::start_in(&ns);
    let started = Instant::now();
    let mut daemon = ns
        .exec(&[
            PROXY,
            "--master",
            &api.server.url(),
            "--hostname-override",
            "node-a",
        ])
        .args([
            "--proxy-mode=iptables",
            "--kube-api-qps=1",
            "--kube-api-burst=1",
        ])
        .args([
            "--healthz-bind-address=127.0.0.1:0",
            "--metrics-bind-address=127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let web = "-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp";
    loop {
        let nat = ns.exec(&["iptables-save", "-t", "nat"]).output().unwrap();
        if String::from_utf8_lossy(&nat.stdout).contains(web) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no sync: {}",
            stop(&mut daemon)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let synced = started.elapsed();
    let log = stop(&mut daemon);
    let requests = api.server.requests();
    let mut lists: Vec<Duration> = requests
        .iter()
        .filter(|r| !r.watch)
        .map(|r| r.at - started)
        .collect();
    lists.sort();
    assert_eq!(lists.len(), 3, "a list per kind: {requests:#?}\n{log}");
    // A token a second, one at first: the k-th list (from 0) is sent k seconds in at the
    // earliest (counted from the daemon's start, before its client was made).
    for (k, at) in (0_u32..).zip(&lists) {
        assert!(
            at.as_secs_f64() >= f64::from(k),
            "list {k} at {at:?}: {lists:?}"
        );
    }
    assert!(requests.iter().any(|r| r.watch), "{requests:#?}");
    println!("lists at {lists:?}, synced after {synced:?}");
}
