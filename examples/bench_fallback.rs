//! `cargo xtask bench --host fallback [--source api] [SIZES…]` (as root, on the host: the
//! fallback needs no IPVS, and the host's iptables are the ones it runs on) or
//! `cargo xtask bench fallback [SIZES…]` (in the VM): the daemon in `--proxy-mode iptables`
//! on synthetic clusters of N Services × 10 endpoints from a manifest directory, or with
//! `--source api` from the test API server (the `testapi` crate, in this process, on loopback:
//! a streaming list, then watches; each change an EndpointSlice update), each size in a
//! network namespace of its own. Default sizes: 1000 10000. Measures:
//!
//! - cold start: from starting the daemon to its first sync done (the metrics endpoint's
//!   `kubeproxy_sync_proxy_rules_last_timestamp_seconds`); the floor is one
//!   `iptables-legacy-restore` of the same rules (`ipvs-proxy plan --only iptables`) in a
//!   fresh namespace, the cheapest way the kernel's tools load them (one iptables-nft-restore
//!   of them is super-linear: minutes at 10,000);
//! - the periodic full sync (`--iptables-sync-period`, 30 s here) of the unchanged cluster
//!   (nothing else committed: no read), and after another tool's commit (a chain created
//!   with `iptables -N`): from its start to its kernel check done (the daemon's `full sync
//!   checked the kernel` line) and how long it held the sync loop, against the first full sync;
//! - one endpoint change, from the file's rename into the directory (or the slice's update on
//!   the server) to the new KUBE-SEP jump
//!   in the Service's KUBE-SVC chain (polled with `iptables -t nat -S CHAIN`): with no resync
//!   running, and made 0.2 s into a periodic full sync that reads the kernel (medians);
//! - the daemon's peak RSS (VmHWM) over all of it.
//!
//! The daemon is this executable run again with `--daemon`. Ends with, per size (named
//! `fallback-api-…` with `--source api`):
//! `bench fallback-cold <N> ours=<s>s floor=<s>s ratio=<ours/floor> rss=<MiB>MiB`,
//! `bench fallback-resync <N> ours=<s>s first=<s>s ratio=<ours/first>` (unchanged),
//! `bench fallback-resync-read <N> ours=<s>s first=<s>s ratio=<ours/first> blocking=<s>s`,
//! `bench fallback-change <N> ours=<median s>s` and
//! `bench fallback-change-in-resync <N> ours=<median s>s floor=<idle median s>s ratio=<…>`.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

#[path = "support/mod.rs"]
mod support;
use support::source::{Source, parse_args};
use support::{Daemon, ENDPOINTS, fresh_netns, metric, plan, proc_status_kib};

/// Changes with no resync running.
const IDLE_CHANGES: usize = 7;
/// Periodic full syncs measured of each kind (unchanged; after another tool's commit).
const RESYNCS: usize = 3;
const SYNC_PERIOD: &str = "30s";
/// How long after a periodic full sync starts its change is made.
const CHANGE_INTO_RESYNC: Duration = Duration::from_millis(200);
const METRICS: &str = "127.0.0.1:10298";

fn main() -> ExitCode {
    support::main("bench_fallback", bench)
}

fn bench(args: &[String]) -> Result<()> {
    let (api, sizes) = parse_args(args)?;
    let name = if api { "fallback-api" } else { "fallback" };
    let mut summary = Vec::new();
    for &n in &sizes {
        println!("{n} Services x {ENDPOINTS} endpoints, iptables fallback");
        // The API server listens in the namespace it is started in: one for each side.
        fresh_netns()?;
        let source = Source::new(api, "bench-fallback", n)?;
        let floor = floor(&source)?;
        fresh_netns()?;
        let source = match source {
            Source::Manifests(_) => source,
            Source::Api(_) => Source::new(api, "bench-fallback", n)?,
        };
        let m = measure(&source, n)?;
        let cold = m.cold.as_secs_f64();
        summary.push(format!(
            "bench {name}-cold {n} ours={cold:.2}s floor={:.2}s ratio={:.2} rss={}MiB",
            floor.as_secs_f64(),
            cold / floor.as_secs_f64(),
            m.peak_rss_kib.div_ceil(1024)
        ));
        summary.push(format!(
            "bench {name}-resync {n} ours={:.4}s first={:.2}s ratio={:.4}",
            m.resync.as_secs_f64(),
            m.first.as_secs_f64(),
            m.resync.as_secs_f64() / m.first.as_secs_f64(),
        ));
        summary.push(format!(
            "bench {name}-resync-read {n} ours={:.2}s first={:.2}s ratio={:.3} blocking={:.4}s",
            m.read.as_secs_f64(),
            m.first.as_secs_f64(),
            m.read.as_secs_f64() / m.first.as_secs_f64(),
            m.resync_blocking.as_secs_f64()
        ));
        summary.push(format!(
            "bench {name}-change {n} ours={:.4}s",
            m.change_idle.as_secs_f64()
        ));
        summary.push(match m.change_in_resync {
            Some(during) => format!(
                "bench {name}-change-in-resync {n} ours={:.4}s floor={:.4}s ratio={:.2}",
                during.as_secs_f64(),
                m.change_idle.as_secs_f64(),
                during.as_secs_f64() / m.change_idle.as_secs_f64()
            ),
            None => format!("bench {name}-change-in-resync {n} none landed during a resync"),
        });
    }
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// The source's flags, and the iptables proxier.
fn common_flags(source: &Source) -> Vec<String> {
    let mut flags = source.flags();
    flags.extend(["--proxy-mode".into(), "iptables".into()]);
    flags
}

/// The same rules loaded by one `iptables-legacy-restore`, in the current (fresh) namespace.
fn floor(source: &Source) -> Result<Duration> {
    let rules = plan(common_flags(source), "iptables")?;
    let started = Instant::now();
    let mut child = Command::new("iptables-legacy-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .spawn()
        .context("starting iptables-legacy-restore")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let status = child.wait()?;
    ensure!(status.success(), "iptables-legacy-restore: {status}");
    let took = started.elapsed();
    println!(
        "  floor: iptables-legacy-restore of plan's {} lines: {:.3}s",
        rules.lines().count(),
        took.as_secs_f64()
    );
    Ok(took)
}

struct Measured {
    cold: Duration,
    first: Duration,
    resync: Duration,
    read: Duration,
    resync_blocking: Duration,
    change_idle: Duration,
    change_in_resync: Option<Duration>,
    peak_rss_kib: u64,
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// The daemon's log: its lines with `what`, each with the value of `took_ms`.
fn log_times(log: &Path, what: &str) -> Vec<Duration> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let ms: f64 = l
                .split("took_ms=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            Some(Duration::from_secs_f64(ms / 1000.0))
        })
        .collect()
}

/// Waits until the log has more than `count` lines with `what`.
fn wait_for_log(log: &Path, what: &str, count: usize, limit: Duration) -> Result<()> {
    let started = Instant::now();
    while log_times(log, what).len() <= count {
        ensure!(
            started.elapsed() < limit,
            "no {what:?} line after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// One endpoint change of Service `i` (round `round`): from the file's rename into the
/// directory (or the slice's update on the API server) to the jump to the new endpoint's
/// KUBE-SEP chain in its KUBE-SVC chain.
fn change(source: &Source, i: u32, round: u32) -> Result<Duration> {
    let moved = Ipv4Addr::new(
        10,
        255,
        u8::try_from(round / 250)?,
        u8::try_from(round % 250)?,
    );
    let port = format!("bench/svc-{i}:http");
    let svc = iptables::proxier::service_chain(&port, "tcp");
    let sep = iptables::proxier::endpoint_chain(&port, "tcp", &format!("{moved}:8080"));
    let started = Instant::now();
    source.change(i, moved)?;
    loop {
        let out = Command::new("iptables")
            .args(["-t", "nat", "-S", &svc])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains(&sep) {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(300),
            "change of svc-{i} not in the kernel after 300 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// [`IDLE_CHANGES`] endpoint changes one after another; their median.
fn idle_changes(source: &Source, n: u32, round: &mut u32) -> Result<Duration> {
    let mut idle = Vec::new();
    for k in 0..IDLE_CHANGES {
        let i = (u32::try_from(k)? * 7919) % n;
        idle.push(change(source, i, *round)?);
        *round += 1;
    }
    let change_idle = median(idle.clone());
    println!(
        "  ours: one endpoint change, no resync running: median {:.1}ms of {:?}",
        change_idle.as_secs_f64() * 1000.0,
        idle.iter()
            .map(|d| (d.as_secs_f64() * 1000.0).round())
            .collect::<Vec<_>>()
    );
    Ok(change_idle)
}

/// Starts the daemon on `source`, logging to `log_path`.
fn start_daemon(source: &Source, log_path: &Path) -> Result<Daemon> {
    let log = std::fs::File::create(log_path)?;
    let mut flags = common_flags(source);
    flags.extend(
        [
            "--metrics-bind-address",
            METRICS,
            "--healthz-bind-address",
            "127.0.0.1:0",
            "--iptables-sync-period",
            SYNC_PERIOD,
            // Each change is synced at once, so its latency is the proxy's, not the period's.
            "--iptables-min-sync-period",
            "0s",
        ]
        .map(str::to_owned),
    );
    Daemon::start(&flags, &log, "info")
}

fn measure(source: &Source, n: u32) -> Result<Measured> {
    let log_path: PathBuf = std::env::temp_dir().join(format!("bench-fallback-{n}.log"));
    let started = Instant::now();
    let daemon = start_daemon(source, &log_path)?;
    let pid = daemon.pid();
    let name = r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#;
    while !metric(METRICS, name).is_some_and(|t| t > 0.0) {
        ensure!(
            started.elapsed() < Duration::from_secs(1200),
            "no sync after 20 minutes; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let cold = started.elapsed();
    let full = "full=true";
    let first = *log_times(&log_path, full)
        .first()
        .context("no full sync line")?;
    println!(
        "  ours: cold start {:.3}s, first full sync {:.3}s; RSS {} MiB",
        cold.as_secs_f64(),
        first.as_secs_f64(),
        proc_status_kib(pid, "VmRSS:") / 1024
    );

    // Changes with no resync running: right after the first sync, well before the next.
    let mut round = 0;
    let change_idle = idle_changes(source, n, &mut round)?;
    ensure!(
        log_times(&log_path, full).len() == 1,
        "a periodic full sync ran during the idle changes"
    );

    // Periodic full syncs of the unchanged cluster: nothing else committed, so nf_tables'
    // generation says the kernel is as the proxy left it, and nothing is read.
    let checked = "full sync checked the kernel";
    let limit = Duration::from_secs(600);
    for r in 0..RESYNCS {
        wait_for_log(&log_path, checked, r, limit)?;
    }
    // Each sync's own line follows its kernel check's.
    wait_for_log(&log_path, full, RESYNCS, limit)?;
    let resync = median(log_times(&log_path, full)[1..=RESYNCS].to_vec());
    println!(
        "  ours: periodic full sync of the unchanged cluster {:.2}ms (median of {RESYNCS}), first {:.3}s",
        resync.as_secs_f64() * 1000.0,
        first.as_secs_f64()
    );

    // After another tool's commit each periodic full sync reads the kernel (off the loop's
    // thread); one change each, shortly after it starts (the issue's was 1 s in), counted if
    // the read was still running when it was made. One at a time: each commit makes a running
    // iptables-nft-save start its dump again (it re-reads when the generation moved under it).
    let mut during = Vec::new();
    for r in RESYNCS..2 * RESYNCS {
        let status = Command::new("iptables")
            .args(["-t", "filter", "-N", &format!("BENCH-OTHER-TOOL-{r}")])
            .status()?;
        ensure!(status.success(), "iptables -N: {status}");
        wait_for_log(&log_path, full, r + 1, limit)?;
        std::thread::sleep(CHANGE_INTO_RESYNC);
        let running = log_times(&log_path, checked).len() <= r;
        let i = (round * 7919 + 13) % n;
        let took = change(source, i, round)?;
        round += 1;
        if running {
            during.push(took);
        }
        wait_for_log(&log_path, checked, r, limit)?;
    }
    let read = median(log_times(&log_path, checked)[RESYNCS..].to_vec());
    let resync_blocking = median(log_times(&log_path, full)[RESYNCS + 1..].to_vec());
    println!(
        "  ours: periodic full sync after another tool's commit: {:.3}s to the kernel checked (median of {RESYNCS}; the loop held {:.2}ms)",
        read.as_secs_f64(),
        resync_blocking.as_secs_f64() * 1000.0,
    );
    let change_in_resync = (!during.is_empty()).then(|| median(during.clone()));
    println!(
        "  ours: one endpoint change during a periodic full sync that reads: {:?} ms",
        during
            .iter()
            .map(|d| (d.as_secs_f64() * 1000.0).round())
            .collect::<Vec<_>>()
    );
    let peak_rss_kib = proc_status_kib(pid, "VmHWM:");
    println!(
        "  ours: peak RSS {} MiB (VmHWM), now {} MiB",
        peak_rss_kib / 1024,
        proc_status_kib(pid, "VmRSS:") / 1024
    );
    drop(daemon);
    Ok(Measured {
        cold,
        first,
        resync,
        read,
        resync_blocking,
        change_idle,
        change_in_resync,
        peak_rss_kib,
    })
}
