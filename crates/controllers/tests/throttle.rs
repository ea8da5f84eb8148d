//! The client-side rate limit (`--kube-api-qps`, `--kube-api-burst`) seen from the test API
//! server: when each request of the real kube client arrived.

use std::time::{Duration, Instant};

use controllers::kube_source::{self, Options};
use controllers::source::{Kind, SourceUpdate};
use controllers::throttle::RateLimit;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, WatchParams};
use testapi::{ApiServer, node, service};
use tokio::sync::mpsc::unbounded_channel;

async fn client(server: &ApiServer, qps: f32, burst: u32) -> kube::Client {
    let limit = RateLimit::new(qps, burst);
    kube_source::throttled_client(None, Some(&server.url()), limit)
        .await
        .unwrap()
}

/// When each request the server logged arrived, from `start`, in order.
fn arrivals(server: &ApiServer, start: Instant) -> Vec<Duration> {
    let mut at: Vec<Duration> = server.requests().iter().map(|r| r.at - start).collect();
    at.sort();
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_burst_are_sent_at_qps() {
    let server = ApiServer::start().await;
    server.apply(Kind::Service, service("default", "web", "10.96.0.20", 80));
    let (qps, burst, n) = (10.0, 3_u32, 9_u32);
    let start = Instant::now();
    let services: Api<Service> = Api::all(client(&server, qps, burst).await);
    let params = ListParams::default();
    let lists = (0..n).map(|_| services.list(&params));
    for listed in futures::future::join_all(lists).await {
        assert_eq!(listed.unwrap().items.len(), 1);
    }
    let at = arrivals(&server, start);
    assert_eq!(at.len(), n as usize);
    // The k-th request (from 0) can leave once k + 1 tokens exist: burst at once, then one
    // every 1/qps; so the last, n - burst tokens after the burst, not before (n - burst) / qps.
    for (k, at) in (0..).zip(&at) {
        let earliest = f64::from((k + 1_u32).saturating_sub(burst)) / f64::from(qps);
        assert!(
            at.as_secs_f64() >= earliest,
            "request {k} arrived at {at:?}, before {earliest} s: {:?}",
            arrivals(&server, start)
        );
    }
    println!(
        "{n} lists at qps={qps} burst={burst}: the last arrived after {:?}",
        at[at.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_do_not_wait_for_a_token() {
    let server = ApiServer::start().await;
    // One token every 4 s, and the only one taken by the first list.
    let (qps, burst) = (0.25, 1);
    let start = Instant::now();
    let services: Api<Service> = Api::all(client(&server, qps, burst).await);
    services.list(&ListParams::default()).await.unwrap();
    let listed = start.elapsed();
    let watch = services.watch(&WatchParams::default(), "0").await;
    let _stream = watch.unwrap();
    let list = services.list(&ListParams::default()).await.unwrap();
    assert!(list.items.is_empty());
    let requests = server.requests();
    let kinds: Vec<bool> = requests.iter().map(|r| r.watch).collect();
    assert_eq!(kinds, [false, true, false], "list, watch, list");
    let watched = requests[1].at - start;
    let relisted = requests[2].at - start;
    assert!(
        watched < listed + Duration::from_secs(3),
        "the watch waited: sent at {watched:?}, the first list done at {listed:?}"
    );
    assert!(
        relisted >= Duration::from_secs(4),
        "the second list did not wait for the next token: {relisted:?}"
    );
}

/// With kube-proxy's defaults (5 per second, bursts of 10), following the API costs no wait:
/// the lists it starts with are fewer than the burst, even when the server has no streaming
/// lists (a paginated list per kind), and its watches take no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_the_api_at_the_defaults_starts_within_the_burst() {
    for streaming in [true, false] {
        let server = ApiServer::start().await;
        server.knobs(|k| k.streaming = streaming);
        server.apply(Kind::Node, node("node-1", "192.168.56.10"));
        for i in 0..20 {
            let ip = format!("10.96.0.{}", i + 10);
            server.apply(Kind::Service, service("default", &format!("s{i}"), &ip, 80));
        }
        let start = Instant::now();
        let client = client(&server, 5.0, 10).await;
        let (tx, mut rx) = unbounded_channel();
        let options = Options::default();
        let source = tokio::spawn(kube_source::run_with(client, "node-1".into(), tx, options));
        let synced = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(update) = rx.recv().await {
                if matches!(update, SourceUpdate::InitialSyncDone) {
                    return;
                }
            }
        })
        .await;
        source.abort();
        synced.unwrap_or_else(|_| panic!("no initial sync (streaming lists: {streaming})"));
        let throttled = server.requests().iter().filter(|r| !r.watch).count();
        assert!(
            throttled <= 10,
            "{throttled} requests took tokens at start (streaming lists: {streaming})"
        );
        println!(
            "streaming lists {streaming}: initial sync after {:?}, {throttled} lists",
            start.elapsed()
        );
    }
}
