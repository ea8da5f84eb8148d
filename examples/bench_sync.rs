//! `cargo xtask bench sync [SIZES…]` (in the VM): the daemon on synthetic clusters of N
//! Services × 10 endpoints, one manifest file per Service.
//!
//! - cold start: from starting the daemon on a clean kernel to its first sync done (the
//!   metrics endpoint's `kubeproxy_sync_proxy_rules_last_timestamp_seconds`), checked against
//!   the IPVS table; the floor is the same state (from `ipvs-proxy plan --only …`) loaded on a
//!   clean kernel by `ipvsadm -R`, `ip -batch`, `ipset restore` and `iptables-restore`;
//! - one endpoint change: from the file's rename into the directory to the new real server in
//!   the IPVS table (read every 0.5 ms with the `ipvs` crate), median and p99 over 200 changes, split by
//!   the daemon's log into those that arrived while a periodic full sync read the kernel and
//!   those that did not (the period, `BENCH_SYNC_PERIOD`, is N/2 ms, at least 500 ms, so that
//!   reads run about half the time);
//! - the same change sent directly by the `ipvs` crate (the same two operations on a virtual
//!   server of its own), after each of the daemon's, in turns, its time read the same way;
//! - from manifests, the same change made by a file-following floor (`support/reactor.rs`: a
//!   thread that waits on inotify, reads and decodes the file, and sends the two operations),
//!   in turns with the other two: what any program driven by the file pays;
//! - the daemon's peak RSS (VmHWM).
//!
//! The daemon is this executable run again with `--daemon` (the examples have no path to the
//! `ipvs-proxy` binary); it is the same library code as the binary's. Default sizes: 1000
//! 10000. Ends with, per size:
//! `bench sync-cold <N> ours=<s>s floor=<s>s ratio=<ours/floor> rss=<MiB>MiB` (with
//! `BENCH_SYNC_ROUNDS=R`, R rounds of the floor and a cold start in turns: the medians, the
//! median of the rounds' ratios, and `rounds=R ratio_min=… ratio_max=…`),
//! `bench sync-change <N> ours=<median s>s p99=<ms>ms` (no read running),
//! `bench sync-change-resync <N> ours=<median s>s floor=<median without>s ratio=… p99=…` and
//! `bench sync-change-direct <N> ours=<median s>s floor=<the ipvs crate's>s ratio=… p99=…
//! p99_floor=… p99_ratio=…` and `bench sync-change-direct-from-rename <N> …`, the same with
//! the daemon's side timed from the change complete (the rename returned, or the slice's
//! update) instead of from before it; from manifests, `bench sync-change-file-floor <N> …`
//! (the daemon against the reactor) and `bench sync-file-floor-direct <N> …` (the reactor
//! against the crate), in the same form.
//!
//! The daemon logs at the default level, as operators run it; `BENCH_SYNC_SPLIT=1` adds the
//! watcher's line per change (`controllers::watch=debug`), which splits each change's time.
//!
//! `--source api` (first argument) serves the same cluster from the test API server (the
//! `testapi` crate, in this process, on loopback) instead: the daemon follows it with
//! `--master` (a streaming list, then watches), and each change is an EndpointSlice update on
//! the server, timed from the update to the kernel. Its objects carry what a real API server
//! and its controllers add (managedFields, kubectl's last-applied-configuration, owner and Pod
//! references), which the proxy must not keep. Its summary lines are `sync-api-cold` and
//! `sync-api-change`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

#[path = "support/reactor.rs"]
mod reactor;
#[path = "support/mod.rs"]
mod support;
use support::source::{Source, parse_args};
use support::{Daemon, ENDPOINTS, fresh_netns, metric, plan, proc_status_kib};

const CHANGES: usize = 200;
/// How long the kernel is given to free a namespace left behind (its IPVS table goes in the
/// background) before the next measurement starts.
const TEARDOWN: Duration = Duration::from_secs(10);
const METRICS: &str = "127.0.0.1:10299";

fn main() -> ExitCode {
    support::main("bench_sync", bench)
}

fn bench(args: &[String]) -> Result<()> {
    let (api, sizes) = parse_args(args)?;
    let name = if api { "sync-api" } else { "sync" };
    let mut summary = Vec::new();
    for &n in &sizes {
        // BENCH_SYNC_NO_FLOOR=1 skips the floor, to iterate on our side alone.
        let (floor, source) = if std::env::var_os("BENCH_SYNC_NO_FLOOR").is_some() {
            (None, None)
        } else {
            let source = fresh(None, api, n)?;
            (Some(floor(&source)?), Some(source))
        };
        let mut source = fresh(source, api, n)?;
        let cold = cold_start(&source, n)?;
        let rss = cold.peak_rss_kib.div_ceil(1024);
        // BENCH_SYNC_ROUNDS=R (with the floor): R-1 more rounds of the floor and a cold start
        // in turns, each in a fresh namespace; the medians, and the median of the rounds'
        // ratios, so that load changing between the two cannot flip the verdict.
        let rounds: usize = std::env::var("BENCH_SYNC_ROUNDS").map_or(Ok(1), |r| r.parse())?;
        let mut pairs = Vec::new();
        if let Some(floor) = floor {
            pairs.push((cold.ours, floor));
            for round in 1..rounds {
                source = fresh(Some(source), api, n)?;
                let floor = self::floor(&source)?;
                source = fresh(Some(source), api, n)?;
                let ours = cold_start_alone(&source, n)?;
                println!(
                    "  round {round}: cold start {:.3}s, floor {:.3}s, ratio {:.2}",
                    ours.as_secs_f64(),
                    floor.as_secs_f64(),
                    ours.as_secs_f64() / floor.as_secs_f64()
                );
                pairs.push((ours, floor));
            }
        }
        summary.push(cold_line(name, n, cold.ours, &pairs, rss));
        summary.push(format!(
            "bench {name}-change {n} ours={:.4}s p99={:.1}ms",
            cold.idle.median.as_secs_f64(),
            cold.idle.p99.as_secs_f64() * 1000.0,
        ));
        // The same change during a periodic full sync, against it without one.
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        summary.push(format!(
            "bench {name}-change-resync {n} ours={:.4}s floor={:.4}s ratio={:.2} p99={:.1}ms",
            cold.during_resync.median.as_secs_f64(),
            cold.idle.median.as_secs_f64(),
            ratio(cold.during_resync.median, cold.idle.median),
            cold.during_resync.p99.as_secs_f64() * 1000.0,
        ));
        // The daemon's change against the same netlink operations sent by the ipvs crate,
        // timed from before the file is written, then from the rename's return; and, from
        // manifests, against the reactor's (a file followed, no more), and the reactor's
        // against the crate's.
        let paired = |label: &str, ours: &Latencies, floor: &Latencies| {
            format!(
                "bench {name}-{label} {n} ours={:.4}s floor={:.4}s ratio={:.2} p99={:.1}ms p99_floor={:.1}ms p99_ratio={:.2}",
                ours.median.as_secs_f64(),
                floor.median.as_secs_f64(),
                ratio(ours.median, floor.median),
                ours.p99.as_secs_f64() * 1000.0,
                floor.p99.as_secs_f64() * 1000.0,
                ratio(ours.p99, floor.p99),
            )
        };
        summary.push(paired("change-direct", &cold.idle, &cold.direct));
        summary.push(paired(
            "change-direct-from-rename",
            &cold.idle_from_rename,
            &cold.direct,
        ));
        if cold.file_floor.count > 0 {
            summary.push(paired("change-file-floor", &cold.idle, &cold.file_floor));
            summary.push(paired("file-floor-direct", &cold.file_floor, &cold.direct));
        }
    }
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// `bench <name>-cold …`: ours, and against the floor when measured (`pairs`, the (ours,
/// floor) of each round): the medians, the median of the rounds' ratios, and their range
/// when there were several rounds.
fn cold_line(
    name: &str,
    n: u32,
    ours: Duration,
    pairs: &[(Duration, Duration)],
    rss: u64,
) -> String {
    if pairs.is_empty() {
        return format!(
            "bench {name}-cold {n} ours={:.2}s rss={rss}MiB",
            ours.as_secs_f64()
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = pairs
        .iter()
        .map(|(o, f)| o.as_secs_f64() / f.as_secs_f64())
        .collect();
    let (low, high) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
    let mut line = format!(
        "bench {name}-cold {n} ours={:.2}s floor={:.2}s ratio={:.2} rss={rss}MiB",
        median(pairs.iter().map(|(o, _)| o.as_secs_f64()).collect()),
        median(pairs.iter().map(|(_, f)| f.as_secs_f64()).collect()),
        median(ratios),
    );
    if pairs.len() > 1 {
        let _ = write!(
            line,
            " rounds={} ratio_min={low:.2} ratio_max={high:.2}",
            pairs.len()
        );
    }
    line
}

fn vip_key(i: u32) -> ipvs::ServiceKey {
    ipvs::ServiceKey::Addr {
        protocol: ipvs::Protocol::Tcp,
        addr: SocketAddr::from((
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1),
            80,
        )),
    }
}

/// A fresh network namespace for the next measurement, and the source in it: the API server
/// must listen in the daemon's namespace (a socket stays in the one it was made in), so it is
/// started again there; the manifests stay.
fn fresh(source: Option<Source>, api: bool, n: u32) -> Result<Source> {
    fresh_netns()?;
    std::thread::sleep(TEARDOWN);
    match source {
        Some(source @ Source::Manifests(_)) => Ok(source),
        _ => Source::new(api, "bench-sync", n),
    }
}

/// Runs `program args` with `input` on stdin; returns how long it took.
fn feed(program: &str, args: &[&str], input: &str) -> Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let status = child.wait()?;
    ensure!(status.success(), "{program} {args:?}: {status}");
    Ok(started.elapsed())
}

/// The same state loaded by the kernel's own tools, in a fresh network namespace.
fn floor(source: &Source) -> Result<Duration> {
    let ipvs = plan(source.flags(), "ipvs")?;
    let addresses = plan(source.flags(), "addresses")?;
    let ipsets = plan(source.flags(), "ipsets")?;
    let iptables = plan(source.flags(), "iptables")?;
    let batch: String = addresses.lines().fold(
        String::from("link add kube-ipvs0 type dummy\n"),
        |mut s, a| {
            let _ = writeln!(s, "addr add {a} dev kube-ipvs0");
            s
        },
    );

    let t_ipvs = feed("ipvsadm", &["-R"], &ipvs)?;
    let t_ip = feed("/bin/ip", &["-batch", "-"], &batch)?;
    let t_ipset = feed("ipset", &["restore"], &ipsets)?;
    let t_iptables = feed("iptables-restore", &["--noflush"], &iptables)?;
    let total = t_ipvs + t_ip + t_ipset + t_iptables;
    println!(
        "  floor: ipvsadm -R {:.3}s ({} lines), ip -batch {:.3}s ({} addresses), ipset restore {:.3}s ({} lines), iptables-restore {:.3}s; total {:.3}s",
        t_ipvs.as_secs_f64(),
        ipvs.lines().count(),
        t_ip.as_secs_f64(),
        addresses.lines().count(),
        t_ipset.as_secs_f64(),
        ipsets.lines().count(),
        t_iptables.as_secs_f64(),
        total.as_secs_f64()
    );
    Ok(total)
}

struct Measured {
    ours: Duration,
    /// Changes while no full sync read the kernel.
    idle: Latencies,
    /// The same, timed from the change complete (the rename returned) instead of from before
    /// the file was written.
    idle_from_rename: Latencies,
    /// Changes that arrived while a periodic full sync read the kernel.
    during_resync: Latencies,
    /// The same changes made with the bare `ipvs` crate, while no full sync read the kernel.
    direct: Latencies,
    /// From manifests, the same changes made by the reactor ([`reactor`]: a file followed,
    /// decoded and sent, no more), while no full sync read the kernel; none from the API.
    file_floor: Latencies,
    peak_rss_kib: u64,
}

/// Median and p99 of some changes' latencies.
#[derive(Clone, Copy)]
struct Latencies {
    count: usize,
    median: Duration,
    p99: Duration,
}

impl Latencies {
    fn of(mut latencies: Vec<Duration>) -> Latencies {
        latencies.sort();
        if latencies.is_empty() {
            return Latencies {
                count: 0,
                median: Duration::ZERO,
                p99: Duration::ZERO,
            };
        }
        Latencies {
            count: latencies.len(),
            median: percentile(&latencies, 0.5),
            p99: percentile(&latencies, 0.99),
        }
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    /// `median=…ms p99=…ms (n=…)`.
    fn describe(&self) -> String {
        format!(
            "median {:.2}ms p99 {:.2}ms (n={})",
            Latencies::ms(self.median),
            Latencies::ms(self.p99),
            self.count
        )
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// The benchmarked daemon's flags: the source's, the metrics endpoint the benchmark reads, and
/// periodic full syncs often enough that many changes arrive during one (which reads the
/// kernel off the loop's thread): the log says which did.
fn daemon_flags(source: &Source, n: u32) -> Vec<String> {
    let mut flags = source.flags();
    flags.extend([
        "--metrics-bind-address".into(),
        METRICS.into(),
        "--healthz-bind-address".into(),
        "127.0.0.1:0".into(),
        "--ipvs-sync-period".into(),
        sync_period(n),
    ]);
    flags
}

/// The daemon's log filter (`RUST_LOG` overrides it): the default level, as operators run it,
/// or with `BENCH_SYNC_SPLIT=1` the watcher's line per change too, which splits a change's time
/// ([`explain_changes`]) at the cost of writing that line.
fn log_filter() -> &'static str {
    if std::env::var_os("BENCH_SYNC_SPLIT").is_some() {
        "info,controllers::watch=debug"
    } else {
        "info"
    }
}

/// Starts the daemon with `flags` (its output to `log`): the daemon, and how long it took to
/// its first sync.
fn until_first_sync(
    flags: &[String],
    log: &std::fs::File,
    log_path: &std::path::Path,
) -> Result<(Daemon, Duration)> {
    let started = Instant::now();
    let daemon = Daemon::start(flags, log, log_filter())?;
    let name = r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#;
    let deadline = started + Duration::from_secs(1200);
    loop {
        if metric(METRICS, name).is_some_and(|t| t > 0.0) {
            return Ok((daemon, started.elapsed()));
        }
        ensure!(
            Instant::now() < deadline,
            "no sync after 20 minutes; log:\n{}",
            std::fs::read_to_string(log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cold start alone, for the rounds that take turns with the floor: how long to the first
/// sync, the table checked as in [`cold_start`].
fn cold_start_alone(source: &Source, n: u32) -> Result<Duration> {
    let log_path: PathBuf = std::env::temp_dir().join(format!("bench-sync-{n}-round.log"));
    let log = std::fs::File::create(&log_path)?;
    let flags = daemon_flags(source, n);
    let (daemon, ours) = until_first_sync(&flags, &log, &log_path)?;
    let dump = ipvs::Handle::with_timeout(Duration::from_secs(30))?.dump()?;
    drop(daemon);
    ensure!(
        dump.len() == n as usize,
        "after the first sync: {} virtual servers",
        dump.len()
    );
    Ok(ours)
}

fn cold_start(source: &Source, n: u32) -> Result<Measured> {
    let log_path: PathBuf = std::env::temp_dir().join(format!("bench-sync-{n}.log"));
    let log = std::fs::File::create(&log_path)?;
    let flags = daemon_flags(source, n);
    let start = std::time::SystemTime::now();
    let (daemon, ours) = until_first_sync(&flags, &log, &log_path)?;
    let pid = daemon.pid();
    let trace = std::env::var_os("BENCH_SYNC_RSS_TRACE").map(|_| RssTrace::start(pid));
    let rss_after_start = proc_status_kib(pid, "VmRSS:");
    let hwm_after_start = proc_status_kib(pid, "VmHWM:");

    let mut handle = ipvs::Handle::with_timeout(Duration::from_secs(30))?;
    let dump = handle.dump()?;
    let reals: usize = dump.iter().map(|e| e.real_servers.len()).sum();
    ensure!(
        dump.len() == n as usize && reals == (n * ENDPOINTS) as usize,
        "after the first sync: {} virtual servers, {reals} real servers",
        dump.len()
    );
    println!(
        "  ours: cold start {:.3}s to the first sync ({} virtual servers, {reals} real servers); RSS {} MiB (VmHWM {} MiB)",
        ours.as_secs_f64(),
        dump.len(),
        rss_after_start / 1024,
        hwm_after_start / 1024
    );
    drop(dump);

    // BENCH_SYNC_NO_ESTIMATION=1 stops the kernel's rate estimator for the changes, to show what
    // it costs them (see docs/sync.md).
    if std::env::var_os("BENCH_SYNC_NO_ESTIMATION").is_some() {
        std::fs::write("/proc/sys/net/ipv4/vs/run_estimation", "0")
            .context("net.ipv4.vs.run_estimation")?;
        println!("  (net.ipv4.vs.run_estimation=0 for the changes)");
    }
    let mut renames = Vec::with_capacity(CHANGES);
    let mut writes = Vec::with_capacity(CHANGES);
    let mut direct = Vec::with_capacity(CHANGES);
    let mut file_floor = Vec::with_capacity(CHANGES);
    let changed = changes(
        &mut handle,
        source,
        n,
        (&mut renames, &mut writes),
        [&mut direct, &mut file_floor],
    );
    let latencies = match changed {
        Ok(l) => l,
        Err(e) => {
            print_log(&std::fs::read_to_string(&log_path).unwrap_or_default());
            return Err(e);
        }
    };
    let mut sorted = latencies.clone();
    sorted.sort();
    println!(
        "  ours: one endpoint change, source to kernel (file renamed or slice updated), over {CHANGES}: min {:.2}ms median {:.2}ms p90 {:.2}ms p99 {:.2}ms max {:.2}ms",
        sorted[0].as_secs_f64() * 1000.0,
        percentile(&sorted, 0.5).as_secs_f64() * 1000.0,
        percentile(&sorted, 0.9).as_secs_f64() * 1000.0,
        percentile(&sorted, 0.99).as_secs_f64() * 1000.0,
        sorted[sorted.len() - 1].as_secs_f64() * 1000.0,
    );
    let peak_rss_kib = proc_status_kib(pid, "VmHWM:");
    println!(
        "  ours: peak RSS {} MiB (VmHWM), now {} MiB",
        peak_rss_kib / 1024,
        proc_status_kib(pid, "VmRSS:") / 1024
    );
    drop(daemon);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    if let Some(trace) = trace {
        trace.print(start, &log);
    }
    let from_rename: Vec<Duration> = latencies
        .iter()
        .zip(&writes)
        .map(|(l, w)| l.saturating_sub(*w))
        .collect();
    let [idle, during_resync, direct, idle_from_rename, file_floor] = split_by_resync(
        &log,
        &renames,
        [&latencies, &from_rename],
        [&direct, &file_floor],
    );
    explain_changes(&log, &renames, &writes);
    slowest_changes(&log, &renames, &latencies);
    print_log(&log);
    Ok(Measured {
        ours,
        idle,
        idle_from_rename,
        during_resync,
        direct,
        file_floor,
        peak_rss_kib,
    })
}

/// `BENCH_SYNC_RSS_TRACE=1`: the daemon's RSS read every 20 ms from its first sync on (the
/// first sync's own peak is the VmHWM printed right after it), to tell which phase of the
/// rest its peak is in.
struct RssTrace {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(std::time::SystemTime, u64)>>,
}

impl RssTrace {
    fn start(pid: u32) -> RssTrace {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push((std::time::SystemTime::now(), proc_status_kib(pid, "VmRSS:")));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        RssTrace { stop, thread }
    }

    /// The highest RSS of each second since the daemon started, then the periodic reads'
    /// windows in the same seconds.
    fn print(self, start: std::time::SystemTime, log: &str) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.thread.join().unwrap_or_default();
        let since = |t: std::time::SystemTime| t.duration_since(start).unwrap_or_default();
        let mut seconds: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
        for (t, kib) in &samples {
            let max = seconds.entry(since(*t).as_secs()).or_default();
            *max = (*max).max(*kib);
        }
        let line: Vec<String> = seconds
            .iter()
            .map(|(s, kib)| format!("{s}:{}.{}", kib / 1024, kib % 1024 * 10 / 1024))
            .collect();
        println!("  rss trace (second since start: MiB): {}", line.join(" "));
        let day = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
                % 86_400.0
        };
        let origin = day(start);
        let reads: Vec<String> = resync_reads(log)
            .iter()
            .map(|(s, e, _)| format!("{:.1}-{:.1}", s - origin, e - origin))
            .collect();
        println!(
            "  periodic reads (seconds since start): {}",
            reads.join(" ")
        );
    }
}

/// When a change began, and how long it took.
type Began = (std::time::SystemTime, Duration);

/// The daemon's changes that arrived while no periodic full sync read the kernel, those that
/// arrived while one did (by the daemon's log), the direct ones made while none did, the
/// first again timed from the rename's return (`from_rename`), and the reactor's made while
/// none did.
fn split_by_resync(
    log: &str,
    renames: &[std::time::SystemTime],
    [latencies, from_rename]: [&[Duration]; 2],
    [direct, file_floor]: [&[Began]; 2],
) -> [Latencies; 5] {
    let windows = resync_reads(log);
    let read_ms: Vec<Duration> = windows
        .iter()
        .map(|(s, e, _)| Duration::from_secs_f64(e - s))
        .collect();
    let compare_ms: Vec<Duration> = windows
        .iter()
        .map(|(_, _, c)| Duration::from_secs_f64(c / 1000.0))
        .collect();
    let during = |t: &std::time::SystemTime| {
        clock_time(*t).is_some_and(|at| windows.iter().any(|(s, e, _)| *s <= at && at <= *e))
    };
    let split = |times: &[Began], want: bool| {
        let chosen = times.iter().filter(|(t, _)| during(t) == want);
        Latencies::of(chosen.map(|(_, l)| *l).collect())
    };
    // Each of the daemon's changes by when it began.
    let timed = |took: &[Duration]| -> Vec<_> {
        renames.iter().copied().zip(took.iter().copied()).collect()
    };
    let ours = timed(latencies);
    let (idle, during_resync) = (split(&ours, false), split(&ours, true));
    let direct = split(direct, false);
    let file_floor = split(file_floor, false);
    let idle_from_rename = split(&timed(from_rename), false);
    println!(
        "  periodic full syncs that read the kernel: {} (read and compare {}; of which the comparison, on the loop's thread, {}); changes during one {}, during none {} (from the rename's return {}); the same change by the ipvs crate {}, by the reactor {}",
        windows.len(),
        Latencies::of(read_ms).describe(),
        Latencies::of(compare_ms).describe(),
        during_resync.describe(),
        idle.describe(),
        idle_from_rename.describe(),
        direct.describe(),
        file_floor.describe(),
    );
    [idle, during_resync, direct, idle_from_rename, file_floor]
}

/// A period that keeps a periodic full sync reading the kernel about half the time (a read
/// takes about 0.2 s per 1,000 Services in the emulator).
fn sync_period(n: u32) -> String {
    std::env::var("BENCH_SYNC_PERIOD").unwrap_or_else(|_| format!("{}ms", (n / 2).max(500)))
}

/// The (start, end) of every periodic full sync's kernel read and comparison, in seconds of
/// the day as [`log_time`], and the comparison's milliseconds (on the loop's thread), from its
/// `full sync checked the kernel` line.
fn resync_reads(log: &str) -> Vec<(f64, f64, f64)> {
    log.lines()
        .filter(|l| l.contains("full sync checked the kernel"))
        .filter_map(|l| {
            let end = log_time(l)?;
            let compare = field(l, "compare_ms")?;
            let took = field(l, "read_ms")? + compare;
            Some((end - took / 1000.0, end, compare))
        })
        .collect()
}

/// One endpoint change at a time: the last endpoint of a Service moves to a new address; how
/// long each took from before the file was written (or the slice updated) to the new real
/// server in the IPVS table. When each began goes to `renames`, how long the change itself
/// took the benchmark (writing and renaming the file, or updating the slice: part of each
/// latency, before the daemon can see it) to `writes`.
///
/// Each is followed by the same change made directly with the `ipvs` crate (`direct`: when,
/// and how long until polled in the table): the same two operations (the new real server
/// added, the moved one set to weight 0 to drain) on a virtual server of its own, which the
/// proxy does not own (its address is not on `kube-ipvs0`), so the two never meet. From
/// manifests, then by the reactor (`file_floor`, [`reactor`]), on a virtual server of its own
/// too, its file written and renamed as the daemon's are.
fn changes(
    handle: &mut ipvs::Handle,
    source: &Source,
    n: u32,
    (renames, writes): (&mut Vec<std::time::SystemTime>, &mut Vec<Duration>),
    [direct, file_floor]: [&mut Vec<Began>; 2],
) -> Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(CHANGES);
    let mut daemon_polls = Vec::with_capacity(CHANGES);
    let mut bare = Bare::new(handle)?;
    let reactor = match source {
        Source::Manifests(_) => Some(reactor::Reactor::start(
            &std::env::temp_dir().join("bench-sync-reactor"),
            ipvs::ServiceKey::tcp(Ipv4Addr::new(10, 98, 0, 1).into(), 80),
            n,
        )?),
        Source::Api(_) => None,
    };
    // The reactor's last endpoint, which its next change drains (Service n's last at first),
    // and the one its last change drained.
    let mut last = support::cluster::endpoint(n, ENDPOINTS - 1);
    let mut drained = None;
    for k in 0..CHANGES {
        let k32 = u32::try_from(k)?;
        let i = (k32 * 7919) % n;
        let moved = Ipv4Addr::new(10, 255, u8::try_from(k / 250)?, u8::try_from(k % 250 + 1)?);
        let key = vip_key(i);
        let target = SocketAddr::from((moved, 8080));
        renames.push(std::time::SystemTime::now());
        let t0 = Instant::now();
        source.change(i, moved)?;
        writes.push(t0.elapsed());
        let (took, polls) = until_seen(handle, &key, target, t0)
            .with_context(|| format!("change {k} not programmed"))?;
        latencies.push(took);
        daemon_polls.push(polls);
        // Changes are measured one by one, not coalesced.
        std::thread::sleep(Duration::from_millis(20));
        direct.push(bare.change(handle, k)?);
        std::thread::sleep(Duration::from_millis(20));
        if let Some(reactor) = &reactor {
            // The one its last change drained, deleted untimed, long after that change's
            // operations all went (deleted as soon as the new one shows, it could precede
            // the drain's own operation), as the crate's side deletes its own.
            if let Some(addr) = drained.take() {
                handle.delete_real_server(&reactor.key, SocketAddr::from((addr, 8080)))?;
            }
            let moved = Ipv4Addr::new(10, 248, u8::try_from(k / 250)?, u8::try_from(k % 250 + 1)?);
            let at = std::time::SystemTime::now();
            let t0 = Instant::now();
            reactor.change(moved)?;
            let target = SocketAddr::from((moved, 8080));
            let (took, _) = until_seen(handle, &reactor.key, target, t0)
                .with_context(|| format!("the reactor's change {k} not seen"))?;
            file_floor.push((at, took));
            drained = Some(last);
            last = moved;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    bare.remove(handle);
    if let Some(reactor) = reactor {
        reactor.stop()?;
    }
    // Each side's time ends at the first read of the table that shows its change, so it
    // holds up to one period of reading after the change landed: the daemon's side is read
    // while the change is on its way (several reads), the crate's right after its
    // acknowledgement (one). Both read the same way, as often; the period says how much of
    // either's time can be the reading's granularity.
    daemon_polls.sort_unstable();
    let period: Vec<Duration> = latencies
        .iter()
        .zip(&daemon_polls)
        .map(|(l, p)| *l / u32::try_from(*p).unwrap_or(u32::MAX))
        .collect();
    println!(
        "  reading the table until a change shows: the daemon's median {} reads, one read every {} (the crate's: one); making the change (writing and renaming the file, or updating the slice) {}",
        daemon_polls[daemon_polls.len() / 2],
        Latencies::of(period).describe(),
        Latencies::of(writes.clone()).describe(),
    );
    Ok(latencies)
}

/// How long both sides wait between reads of the table while they wait for a change. Reading
/// more often takes the emulator's CPU from the daemon (at 0.1 ms its changes took 19.5 ms
/// against 10.1 ms in a run as busy, though load decides more: see docs/sync.md).
const POLL: Duration = Duration::from_micros(500);

/// Reads the real servers of `key` every [`POLL`] until `target` is among them: the time from
/// `t0` to the read that showed it, and the reads it took.
fn until_seen(
    handle: &mut ipvs::Handle,
    key: &ipvs::ServiceKey,
    target: SocketAddr,
    t0: Instant,
) -> Result<(Duration, usize)> {
    let mut reads = 0;
    loop {
        reads += 1;
        if handle
            .real_servers(key)?
            .iter()
            .any(|r| r.server.addr == target)
        {
            return Ok((t0.elapsed(), reads));
        }
        ensure!(t0.elapsed() < Duration::from_secs(30), "not seen after 30s");
        std::thread::sleep(POLL);
    }
}

/// The virtual server the bare `ipvs` crate changes, beside the daemon's.
struct Bare {
    key: ipvs::ServiceKey,
    /// The real server the next change moves.
    last: ipvs::RealServer,
}

impl Bare {
    fn new(handle: &mut ipvs::Handle) -> Result<Bare> {
        let key = ipvs::ServiceKey::tcp(Ipv4Addr::new(10, 99, 0, 1).into(), 80);
        let reals: Vec<SocketAddr> = (0..ENDPOINTS)
            .map(|j| {
                let ip = Ipv4Addr::new(10, 246, 0, u8::try_from(j + 1).unwrap_or(1));
                SocketAddr::from((ip, 8080))
            })
            .collect();
        reactor::add_virtual_server(handle, key, reals.iter().copied())?;
        Ok(Bare {
            key,
            last: ipvs::RealServer::masquerade(reals[reals.len() - 1]),
        })
    }

    /// Moves the last real server as the daemon's change does: when it began, and how long
    /// until the new one was polled in the table. The drained one is deleted after, untimed,
    /// as the daemon deletes it after its drain check.
    fn change(&mut self, handle: &mut ipvs::Handle, k: usize) -> Result<Began> {
        let moved = SocketAddr::from((
            Ipv4Addr::new(10, 247, u8::try_from(k / 250)?, u8::try_from(k % 250 + 1)?),
            8080,
        ));
        let new = ipvs::RealServer::masquerade(moved);
        let drained = ipvs::RealServer {
            weight: 0,
            ..self.last
        };
        let at = std::time::SystemTime::now();
        let t0 = Instant::now();
        let ops = [
            ipvs::Op::AddDest(self.key, new),
            ipvs::Op::UpdateDest(self.key, drained),
        ];
        for result in handle.apply(&ops) {
            result?;
        }
        let (took, _) = until_seen(handle, &self.key, moved, t0)
            .with_context(|| format!("direct change {k} not seen"))?;
        handle.delete_real_server(&self.key, drained.addr)?;
        self.last = new;
        Ok((at, took))
    }

    fn remove(self, handle: &mut ipvs::Handle) {
        let _ = handle.delete_service(&self.key);
    }
}

/// Seconds since midnight UTC of `t`, on the scale of [`log_time`].
fn clock_time(t: std::time::SystemTime) -> Option<f64> {
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(since.as_secs_f64() % 86_400.0)
}

/// Seconds since midnight UTC of a log line's RFC 3339 timestamp (`…T12:04:29.510418Z`).
fn log_time(line: &str) -> Option<f64> {
    let t = line.split('T').nth(1)?.split('Z').next()?;
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn field(line: &str, name: &str) -> Option<f64> {
    let clean: String = line
        .split('\u{1b}')
        .map(|p| p.split_once('m').map_or(p, |(_, r)| r))
        .collect();
    clean
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Splits each change's latency, from the daemon's log (`BENCH_SYNC_SPLIT=1` runs the daemon
/// with `controllers::watch=debug`, which adds the watcher's lines; without, it logs as
/// operators run it): the benchmark writing and renaming the file, the rename's return → the
/// watcher reading the file (inotify, thread wake-ups), reading and parsing it, → the sync
/// starting (queueing behind another sync), and the sync itself.
fn explain_changes(log: &str, renames: &[std::time::SystemTime], writes: &[Duration]) {
    // (start, took) of each line with `took_ms` and `what` in it.
    let spans = |what: &str| -> Vec<(f64, f64, bool)> {
        log.lines()
            .filter(|l| l.contains(what))
            .filter_map(|l| {
                let end = log_time(l)?;
                let took = field(l, "took_ms")? / 1000.0;
                Some((
                    end - took,
                    took,
                    l.contains("full\u{1b}[0m\u{1b}[2m=\u{1b}[0mtrue") || l.contains("full=true"),
                ))
            })
            .collect()
    };
    let syncs = spans(" synced ");
    let reads = spans("manifest changes read");
    let mut to_read = Vec::new();
    let mut reading = Vec::new();
    let mut waits = Vec::new();
    let mut tooks = Vec::new();
    let mut behind_full = 0;
    for (r, written) in renames.iter().zip(writes) {
        let Some(at) = clock_time(*r) else {
            continue;
        };
        let done_at = at + written.as_secs_f64();
        let Some(&(start, took, full)) = syncs.iter().find(|(start, took, _)| start + took >= at)
        else {
            continue;
        };
        waits.push(Duration::from_secs_f64((start - at).max(0.0)));
        tooks.push(Duration::from_secs_f64(took));
        behind_full += usize::from(full);
        if let Some(&(read_start, read_took, _)) =
            reads.iter().find(|(s, t, _)| s + t >= at && *s <= start)
        {
            to_read.push(Duration::from_secs_f64((read_start - done_at).max(0.0)));
            reading.push(Duration::from_secs_f64(read_took));
        }
    }
    if waits.is_empty() {
        return;
    }
    let ms = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        percentile(v, p).as_secs_f64() * 1000.0
    };
    println!(
        "  where a change's time goes (daemon log): rename to sync start median {:.2}ms p99 {:.2}ms; sync median {:.2}ms p99 {:.2}ms; {behind_full} changes landed in a full resync",
        ms(&mut waits, 0.5),
        ms(&mut waits, 0.99),
        ms(&mut tooks, 0.5),
        ms(&mut tooks, 0.99),
    );
    let mut writes = writes.to_vec();
    if to_read.is_empty() {
        println!(
            "    of which writing and renaming the file (the benchmark) median {:.2}ms p99 {:.2}ms (BENCH_SYNC_SPLIT=1 for the watcher's share)",
            ms(&mut writes, 0.5),
            ms(&mut writes, 0.99),
        );
    } else {
        println!(
            "    of which writing and renaming the file (the benchmark) median {:.2}ms p99 {:.2}ms; the rename's return to the watcher's read median {:.2}ms p99 {:.2}ms; read and parse median {:.2}ms p99 {:.2}ms",
            ms(&mut writes, 0.5),
            ms(&mut writes, 0.99),
            ms(&mut to_read, 0.5),
            ms(&mut to_read, 0.99),
            ms(&mut reading, 0.5),
            ms(&mut reading, 0.99),
        );
    }
}

/// The daemon's log lines during the three slowest changes, to show where their time went.
fn slowest_changes(log: &str, renames: &[std::time::SystemTime], latencies: &[Duration]) {
    let mut order: Vec<usize> = (0..latencies.len().min(renames.len())).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(latencies[k]));
    for &k in order.iter().take(3) {
        let Some(at) = clock_time(renames[k]) else {
            continue;
        };
        let until = at + latencies[k].as_secs_f64() + 0.002;
        println!(
            "  slow change {k}: {:.2}ms; the daemon's lines meanwhile:",
            latencies[k].as_secs_f64() * 1000.0
        );
        for line in log
            .lines()
            .filter(|l| log_time(l).is_some_and(|t| t >= at - 0.001 && t <= until))
        {
            println!("    {line}");
        }
    }
}

/// The daemon's start-up lines and its first syncs.
fn print_log(log: &str) {
    println!("  daemon log (start-up and first syncs):");
    for line in log
        .lines()
        .filter(|l| !l.contains("drained real servers"))
        .take(16)
    {
        println!("    {line}");
    }
}
