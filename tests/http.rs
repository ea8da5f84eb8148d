//! The health and metrics servers over real HTTP on loopback, as a kubelet probe or a Prometheus
//! scrape sees them.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use ipvs_proxy::flags::ProxyMode;
use ipvs_proxy::health::Health;
use ipvs_proxy::http::{ServerState, health_router, metrics_router, serve_on};
use telemetry::proxy::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    get_within(addr, path, Duration::from_secs(5)).await
}

/// A GET whose response may take up to `within`.
async fn get_within(addr: std::net::SocketAddr, path: &str, within: Duration) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(within, stream.read_to_string(&mut response))
        .await
        .expect("a response in time")
        .unwrap();
    let status = response.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn start(
    health: Health,
    metrics: Arc<Metrics>,
) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let state = Arc::new(ServerState {
        health,
        metrics,
        mode: RwLock::new(ProxyMode::Ipvs),
        configz: serde_json::json!({"mode": "ipvs"}),
    });
    let h = serve_on(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        health_router(state.clone()),
    )
    .unwrap();
    let m = serve_on(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics_router(state),
    )
    .unwrap();
    (h, m)
}

#[tokio::test]
async fn healthz_is_unavailable_until_the_first_sync_then_fails_on_a_stuck_sync_and_recovers() {
    let timeout = Duration::from_millis(300);
    let health = Health::new(timeout, SystemTime::now());
    let metrics = Arc::new(Metrics::new());
    let (addr, metrics_addr) = start(health.clone(), metrics).await;

    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 503, "not ready before the first sync: {body}");
    assert_eq!(
        get(addr, "/livez").await.0,
        200,
        "alive while within the timeout"
    );

    health.synced(SystemTime::now());
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["nodeEligible"], true);
    assert!(json["lastUpdated"].as_str().unwrap().ends_with('Z'));

    // A change is queued and the sync never comes: both fail once the timeout passes.
    health.queued(SystemTime::now());
    tokio::time::sleep(timeout + Duration::from_millis(50)).await;
    assert_eq!(get(addr, "/healthz").await.0, 503);
    assert_eq!(get(addr, "/livez").await.0, 503);

    // The loop takes it and a sync applies it.
    health.taken();
    health.synced(SystemTime::now());
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/livez").await.0, 200);

    // A node being deleted fails healthz (no LB traffic) but not livez (no restart).
    health.set_node_eligible(false);
    assert_eq!(get(addr, "/healthz").await.0, 503);
    assert_eq!(get(addr, "/livez").await.0, 200);

    let (_, text) = get(metrics_addr, "/metrics").await;
    assert!(
        text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 2"),
        "{text}"
    );
}

/// Whether the server closed `stream` (EOF or reset) within `within`; bytes it sends are read.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Slow-loris and flood clients on the daemon's health server: connections that send
/// nothing, send their headers a byte at a time, or sit idle after a request are closed once
/// the header timeout passes; up to the cap /healthz answers alongside them, and beyond the
/// cap it waits for a free connection instead of the server taking more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_are_disconnected_after_the_header_timeout_and_healthz_is_served() {
    let limits = healthcheck::server::Limits::DEFAULT;
    let health = Health::new(Duration::from_secs(60), SystemTime::now());
    health.synced(SystemTime::now());
    let (addr, _) = start(health, Arc::new(Metrics::new())).await;
    let started = tokio::time::Instant::now();

    // All but two of the connections the server takes: silent ones, and one that sent a
    // request, was answered and stays open.
    let mut stalled = Vec::new();
    for _ in 0..limits.connections - 3 {
        stalled.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0; 12];
    kept.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    stalled.push(kept);
    // One that sends its headers a byte every 200 ms, for ever.
    let mut trickle = TcpStream::connect(addr).await.unwrap();
    let trickler = tokio::spawn(async move {
        for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 200].iter())
        {
            if trickle.write_all(&[*byte]).await.is_err() {
                return true; // the server closed it
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The last free connection serves a probe at once.
    assert_eq!(get(addr, "/healthz").await.0, 200);

    // One more silent client fills the cap: a probe now waits (accepted by the kernel, not
    // yet by the server) instead of the server holding more connections.
    stalled.push(TcpStream::connect(addr).await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let margin = limits.header_read * 2;
    let waiting = tokio::spawn(get_within(addr, "/healthz", margin * 2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "a connection beyond the cap was served"
    );

    // Once the header timeout passes every stalled connection is closed, and the probe is
    // answered.
    for stream in &mut stalled {
        assert!(
            closed_within(stream, margin).await,
            "a stalled connection stayed open"
        );
    }
    assert!(
        started.elapsed() >= limits.header_read,
        "closed before the header timeout"
    );
    assert!(
        trickler.await.unwrap(),
        "the trickling client was not cut off"
    );
    assert_eq!(
        waiting.await.unwrap().0,
        200,
        "the waiting probe is answered"
    );
}

#[tokio::test]
async fn metrics_server_serves_prometheus_text_proxy_mode_and_configz() {
    let metrics = Arc::new(Metrics::new());
    let (_, addr) = start(
        Health::new(Duration::from_secs(60), SystemTime::now()),
        metrics.clone(),
    )
    .await;

    let (code, before) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    // Per family, as kube-proxy's: no family has synced yet.
    assert!(
        !before.contains("kubeproxy_sync_proxy_rules_duration_seconds_count"),
        "{before}"
    );
    let ipv6 = telemetry::proxy::IpFamilyLabel { ip_family: "IPv6" };
    let now = Some(SystemTime::now());
    metrics.observe_sync(&[ipv6], Duration::from_millis(5), false, now);
    let (_, after) = get(addr, "/metrics").await;
    assert!(
        after.contains("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1"),
        "{after}"
    );
    assert!(
        after.contains(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1"
        ),
        "{after}"
    );
    // Every sample line is `name{labels} value` with a numeric value.
    for line in after
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {line:?}");
    }

    assert_eq!(get(addr, "/proxyMode").await, (200, "ipvs".to_owned()));
    assert_eq!(get(addr, "/healthz").await, (200, "ok".to_owned()));
    let (code, configz) = get(addr, "/configz").await;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&configz).unwrap();
    assert_eq!(json["kubeproxy.config.k8s.io"]["mode"], "ipvs");
}

#[test]
fn the_last_sync_timestamp_moves_only_when_a_sync_could_program_the_kernel() {
    use healthcheck::ServiceHealthServers;
    use ipvs_proxy::observer::Telemetry;
    use reconciler::{Observer, SyncRecord};

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let telemetry = Telemetry {
        health: Health::new(Duration::from_secs(60), SystemTime::now()),
        metrics: Arc::new(Metrics::new()),
        service_health: ServiceHealthServers::new(runtime.handle().clone(), || true),
        events: None,
    };
    let last = |t: &Telemetry| {
        let text = t.metrics.encode();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(
                    "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} ",
                )
            })
            .map(str::to_owned)
            .unwrap()
    };
    let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    let record = |secs, healthy| SyncRecord {
        full: true,
        took: Duration::from_millis(3),
        finished: at(secs),
        programming_latencies: vec![Duration::from_millis(300), Duration::from_secs(2)],
        healthy,
        families: vec![ipvs::Family::V4],
        iptables_rules: Vec::new(),
    };
    telemetry.synced(&record(1_700_000_000, true));
    assert!(
        last(&telemetry).starts_with("1700000000"),
        "{}",
        last(&telemetry)
    );
    // The kernel could not be written: the sync is counted, the timestamp stays.
    telemetry.synced(&record(1_700_000_060, false));
    assert!(
        last(&telemetry).starts_with("1700000000"),
        "{}",
        last(&telemetry)
    );
    assert!(
        telemetry.metrics.encode().contains(
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2"
        )
    );
    // One network programming sample per latency the records carry.
    telemetry.no_local_endpoints(ipvs::Family::V6, 2, 0);
    let text = telemetry.metrics.encode();
    for sample in [
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"internal\"} 2",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\",ip_family=\"IPv4\"} 2",
        "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 4",
    ] {
        assert!(text.contains(sample), "{sample} in\n{text}");
    }
}

#[test]
fn a_health_check_port_that_cannot_be_bound_is_counted_and_the_others_are_served() {
    use healthcheck::ServiceHealthServers;
    use ipvs_proxy::observer::Telemetry;
    use reconciler::{HealthChecks, Observer, ServiceHealth, ServiceName};

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let telemetry = Telemetry {
        health: Health::new(Duration::from_secs(60), SystemTime::now()),
        metrics: Arc::new(Metrics::new()),
        service_health: ServiceHealthServers::new(runtime.handle().clone(), || true),
        events: None,
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let health = |name, port| ServiceHealth {
        service: ServiceName::new("shop", name),
        port: Some((port, 1)),
    };
    telemetry.health_checks(&HealthChecks {
        addresses: vec![free.ip()],
        services: vec![health("api", busy), health("web", free.port())],
        complete: true,
    });
    let text = telemetry.metrics.encode();
    assert!(
        text.contains("ipvsproxy_service_health_bind_failures_total 1"),
        "{text}"
    );
    let (code, body) = runtime.block_on(get(free, "/"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""name":"web""#), "{body}");
}
