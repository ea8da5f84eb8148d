//! What a fleet of proxies costs the API server: N simulated nodes (tasks in this process, each
//! a real `kube_source` with its own kube client, folding into its own `ClusterState`, no
//! kernel) follow the test API server (the `testapi` crate, in this process) holding S Services
//! and S EndpointSlices of 10 endpoints. From the server's own request log it reports:
//!
//! - per node at start: bytes and requests, with streaming lists (the default; watches, which
//!   kube-apiserver 1.36 does not compress and kube-rs asks uncompressed) and, for comparison,
//!   with paginated gzip-compressed lists; and one source's peak memory (VmHWM), measured alone
//!   in a child process so that N models do not count;
//! - for the fleet: lists at start (one per kind per node is the goal) and how many of them
//!   were quorum reads (no resourceVersion: etcd, not the watch cache);
//! - steady state, one endpoint change a second: requests per node per hour (only the watches'
//!   re-opens, ≤ 3 per 5 minutes, is the goal);
//! - an API server restart (every connection cut, the listener closed for the outage, then back
//!   with its history): requests per second afterwards (peak), the spread of the reconnections,
//!   requests per node in the first minute beyond its three re-opened watches, lists, quorum
//!   lists.
//!
//! `cargo xtask bench --host fleet [NODES [SERVICES]]` (defaults 200 and 10,000); the steady
//! window and the outage are `BENCH_FLEET_STEADY_SECS` (default 660: longer than any watch) and
//! `BENCH_FLEET_OUTAGE_SECS` (default 30). Goals are printed beside the figures, not asserted.
//! Ends with summary lines `bench fleet-<case> <N> key=value...`.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use controllers::kube_source::{self, ListStrategy, Options};
use controllers::source::{Kind, SourceUpdate};
use reconciler::ClusterState;
use testapi::{ApiServer, Request};
use tokio::sync::mpsc;

const ENDPOINTS: usize = 10;
const MIB: f64 = 1024.0 * 1024.0;

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("one") {
        return one(
            &args[1],
            args.get(2).map(String::as_str) == Some("paginated"),
        );
    }
    let nodes: usize = args.first().map_or(Ok(200), |a| a.parse())?;
    let services: usize = args.get(1).map_or(Ok(10_000), |a| a.parse())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(fleet(nodes, services))
}

/// A child process: one node's source alone, until its initial sync; prints its peak memory.
fn one(url: &str, paginated: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let services = runtime.block_on(async {
        let synced = Arc::new(AtomicUsize::new(0));
        let lists = if paginated {
            ListStrategy::Paginated
        } else {
            ListStrategy::Streaming
        };
        let source = follow(url, "node-0", lists, synced.clone()).await?;
        while synced.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        source.abort();
        anyhow::Ok(synced.load(Ordering::SeqCst))
    })?;
    println!("synced {services} rss {:.1}", status_mib("VmHWM:"));
    Ok(())
}

/// Starts one node's source, folding into its own model; `synced` gets the model's Service
/// count at the initial sync.
async fn follow(
    url: &str,
    node: &str,
    lists: ListStrategy,
    synced: Arc<AtomicUsize>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = kube_source::client(None, Some(url)).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let options = Options {
        lists,
        ..Options::default()
    };
    let source = tokio::spawn(kube_source::run_with(client, node.into(), tx, options));
    Ok(tokio::spawn(async move {
        let mut state = ClusterState::new();
        while let Some(update) = rx.recv().await {
            match update {
                SourceUpdate::Events(events) => {
                    controllers::fold(&mut state, events);
                }
                SourceUpdate::InitialSyncDone => {
                    synced.store(state.service_count().max(1), Ordering::SeqCst);
                }
                SourceUpdate::NodeEligible(_) | SourceUpdate::LocalAddresses(_) => {}
            }
        }
        source.abort();
    }))
}

/// A `/proc/self/status` field in MiB (VmHWM: peak resident memory).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Runs `one` in a child process; returns its peak memory in MiB and the requests it made.
fn one_alone(server: &ApiServer, paginated: bool) -> anyhow::Result<(f64, Vec<Request>)> {
    server.clear_requests();
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["one", &server.url()]);
    if paginated {
        command.arg("paginated");
    }
    let child = command.stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.context("stdout")?).read_line(&mut line)?;
    let rss: f64 = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("the child said {line:?}"))?;
    Ok((rss, server.requests()))
}

fn bytes(requests: &[Request]) -> f64 {
    #[allow(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
    let total = requests.iter().map(Request::bytes).sum::<u64>() as f64;
    total
}

#[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn per(n: usize, of: usize) -> f64 {
    n as f64 / of as f64
}

/// Flips one endpoint's readiness in the slice of Service `i`: one endpoint change.
fn change(server: &ApiServer, i: usize, round: usize) -> anyhow::Result<()> {
    let name = format!("svc-{i}-abc");
    let mut slice = server
        .get(Kind::EndpointSlice, "default", &name)
        .context("slice")?;
    let ready = &mut slice["endpoints"][round % ENDPOINTS]["conditions"]["ready"];
    *ready = serde_json::Value::Bool(!ready.as_bool().unwrap_or(true));
    server.apply(Kind::EndpointSlice, slice);
    Ok(())
}

#[allow(
    clippy::too_many_lines,
    reason = "one run from start to end, in the order the figures are printed"
)]
async fn fleet(nodes: usize, services: usize) -> anyhow::Result<()> {
    // Watches opened together at start first re-open 5-10 minutes later: a shorter window
    // would see none.
    let steady = env_secs("BENCH_FLEET_STEADY_SECS", 660);
    let outage = env_secs("BENCH_FLEET_OUTAGE_SECS", 30);
    let server = ApiServer::start().await;
    server.knobs(|k| k.bookmark_interval = Duration::from_secs(60));
    server.apply_many(testapi::fleet(services, ENDPOINTS));
    for n in 0..nodes {
        server.apply(
            Kind::Node,
            testapi::node(&format!("node-{n}"), &format!("192.0.2.{}", n % 250 + 1)),
        );
    }
    println!(
        "fleet: {nodes} nodes, {services} Services + {services} EndpointSlices x {ENDPOINTS} endpoints"
    );

    // One node alone: bytes and requests at start, and its peak memory.
    let (rss, start) = one_alone(&server, false)?;
    let streaming_bytes = bytes(&start);
    let (rss_paginated, start_paginated) = one_alone(&server, true)?;
    let gzip_bytes = bytes(&start_paginated);
    println!("one node at start:");
    println!(
        "  streaming lists      {:>8.1} MiB in {} requests (uncompressed: watches), peak RSS {rss:.0} MiB",
        streaming_bytes / MIB,
        start.len()
    );
    println!(
        "  paginated gzip lists {:>8.2} MiB in {} requests = {:.0} % of the streaming bytes (goal ≤ 25 %), peak RSS {rss_paginated:.0} MiB",
        gzip_bytes / MIB,
        start_paginated.len(),
        100.0 * gzip_bytes / streaming_bytes
    );

    // The fleet's start.
    server.clear_requests();
    let started = Instant::now();
    let mut followers = Vec::with_capacity(nodes);
    let mut synced = Vec::with_capacity(nodes);
    for n in 0..nodes {
        let flag = Arc::new(AtomicUsize::new(0));
        let follower = follow(
            &server.url(),
            &format!("node-{n}"),
            ListStrategy::Auto,
            flag.clone(),
        )
        .await?;
        followers.push(follower);
        synced.push(flag);
    }
    while synced.iter().any(|s| s.load(Ordering::SeqCst) == 0) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start_time = started.elapsed();
    if let Some(short) = synced.iter().find(|s| s.load(Ordering::SeqCst) != services) {
        bail!(
            "a node synced {} Services, not {services}",
            short.load(Ordering::SeqCst)
        );
    }
    let at_start = server.requests();
    let lists = at_start.iter().filter(|r| r.is_list()).count();
    let quorum = at_start.iter().filter(|r| r.is_quorum_list()).count();
    println!(
        "fleet start: all {nodes} synced in {:.1} s; {:.2} lists per node (goal 3: one per kind), {quorum} quorum lists (goal 0), {:.1} MiB per node",
        start_time.as_secs_f64(),
        per(lists, nodes),
        bytes(&at_start) / MIB / per(nodes, 1)
    );

    // Steady state: one endpoint change a second.
    server.clear_requests();
    let steady_start = Instant::now();
    let mut round = 0;
    while steady_start.elapsed() < steady {
        change(&server, round % services, round / services)?;
        round += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let in_steady = server.requests();
    let per_hour = per(in_steady.len(), nodes) * 3600.0 / steady.as_secs_f64();
    println!(
        "steady ({} s, {round} changes): {} requests = {per_hour:.1} per node per hour (goal ≤ 36: three watches re-opened every 5 minutes at most), all watch re-opens: {}",
        steady.as_secs(),
        in_steady.len(),
        in_steady.iter().all(Request::is_resumed_watch)
    );

    // An API server restart.
    server.stop();
    tokio::time::sleep(outage).await;
    server.clear_requests();
    let back = Instant::now();
    server.restart().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = server.requests();
    let mut per_second = vec![0usize; 61];
    let mut offsets: Vec<f64> = after
        .iter()
        .map(|r| r.at.saturating_duration_since(back).as_secs_f64())
        .collect();
    offsets.sort_by(f64::total_cmp);
    for o in &offsets {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "0..60 s"
        )]
        let slot = (*o as usize).min(60);
        per_second[slot] += 1;
    }
    let peak = per_second.iter().max().copied().unwrap_or(0);
    let pct = |p: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a short list"
        )]
        let i = ((offsets.len().saturating_sub(1)) as f64 * p).round() as usize;
        offsets.get(i).copied().unwrap_or(0.0)
    };
    let spread = pct(1.0) - pct(0.0);
    let extra = per(after.len(), nodes) - 3.0;
    let after_lists = after.iter().filter(|r| r.is_list()).count();
    let after_quorum = after.iter().filter(|r| r.is_quorum_list()).count();
    println!(
        "restart after a {} s outage: {} requests in the first minute, peak {peak}/s; reconnections from {:.1} s to {:.1} s (10-90 %: {:.1}..{:.1} s), spread {spread:.1} s (goal ≥ 10 s); {extra:.2} requests per node beyond its 3 re-opened watches (goal ≤ 2); {after_lists} lists, {after_quorum} quorum lists",
        outage.as_secs(),
        after.len(),
        pct(0.0),
        pct(1.0),
        pct(0.1),
        pct(0.9),
    );
    for follower in followers {
        follower.abort();
    }

    println!(
        "bench fleet-node {services} bytes={:.1}MiB gzip_bytes={:.2}MiB requests={} rss={rss:.0}MiB",
        streaming_bytes / MIB,
        gzip_bytes / MIB,
        start.len()
    );
    println!(
        "bench fleet-start {nodes} ours={:.1}s lists_per_node={:.2} quorum_lists={quorum}",
        start_time.as_secs_f64(),
        per(lists, nodes)
    );
    println!("bench fleet-steady {nodes} requests_per_node_hour={per_hour:.1}");
    println!(
        "bench fleet-restart {nodes} peak_rps={peak} spread={spread:.1}s extra_per_node={extra:.2} lists={after_lists} quorum_lists={after_quorum}"
    );
    Ok(())
}
