//! Benchmark of the Kubernetes API source: follow N Services and N EndpointSlices (10
//! endpoints each) from the test API server (the `testapi` crate) over loopback HTTP,
//! with the real kube client, folding every update into a `ClusterState` as the proxier does.
//!
//! Per case it reports the time to the first sync (all lists complete and applied), the CPU
//! this process spends per 1,000 endpoint changes, and its peak memory (VmHWM). The server
//! runs in a child process, so neither its CPU nor its memory is counted; each case runs in a
//! process of its own, so that peaks do not carry over.
//!
//! `cargo run --release -p controllers --example bench_controllers [-- SIZES...]`
//! (default sizes: 1000 10000). Ends with one summary line per case:
//! `bench controllers <N> ours=<first sync>s rss=<peak>MiB`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use controllers::kube_source::{self, ListStrategy, Options};
use controllers::source::{Event, Kind, Model, SourceUpdate};
use reconciler::ClusterState;
use testapi::ApiServer;
use tokio::sync::{Notify, mpsc};

const ENDPOINTS: usize = 10;
const CHANGES: usize = 10_000;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(args[1].parse()?),
        Some("case") => case(args[1].parse()?, args.get(2).map(String::as_str)),
        _ => {
            let sizes: Vec<usize> = if args.is_empty() {
                vec![1000, 10_000]
            } else {
                args.iter().map(|a| a.parse()).collect::<Result<_, _>>()?
            };
            let exe = std::env::current_exe()?;
            let mut summary = Vec::new();
            for n in sizes {
                for lists in ["streaming", "paginated"] {
                    let out = Command::new(&exe)
                        .args(["case", &n.to_string(), lists])
                        .stderr(Stdio::inherit())
                        .output()?;
                    if !out.status.success() {
                        bail!("case {n} {lists} failed");
                    }
                    let text = String::from_utf8_lossy(&out.stdout);
                    for line in text.lines() {
                        if line.starts_with("bench ") {
                            summary.push(line.to_owned());
                        } else {
                            println!("{line}");
                        }
                    }
                }
            }
            for line in summary {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// The child: an API server holding `n` Services and slices; on "churn K" it makes K endpoint
/// changes, then prints "done".
fn serve(n: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = ApiServer::start().await;
        server.knobs(|k| k.bookmark_interval = Duration::from_secs(1));
        server.apply_many(testapi::fleet(n, ENDPOINTS));
        server.apply(Kind::Node, testapi::node("node-1", "192.0.2.10"));
        println!("url {}", server.url());
        std::io::stdout().flush()?;
        // Commands arrive on stdin, read by a thread (tokio's stdin needs a feature we lack).
        let (cmd_tx, mut commands) = mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if cmd_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut round = 0usize;
        while let Some(line) = commands.recv().await {
            let Some(k) = line.strip_prefix("churn ") else {
                break;
            };
            let k: usize = k.parse()?;
            for c in 0..k {
                // Flip the readiness of one endpoint of one slice: one endpoint change.
                let i = (round * k + c) % n;
                let name = format!("svc-{i}-abc");
                let mut slice = server
                    .get(Kind::EndpointSlice, "default", &name)
                    .context("slice")?;
                let e = (round * k + c) / n % ENDPOINTS;
                let ready = &mut slice["endpoints"][e]["conditions"]["ready"];
                *ready = serde_json::Value::Bool(!ready.as_bool().unwrap_or(true));
                server.apply(Kind::EndpointSlice, slice);
                if c % 100 == 99 {
                    tokio::task::yield_now().await;
                }
            }
            round += 1;
            println!("done");
            std::io::stdout().flush()?;
        }
        Ok(())
    })
}

/// CPU time (user + system) of this process.
#[allow(unsafe_code, reason = "getrusage(2) has no safe wrapper in std")]
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable rusage; RUSAGE_SELF is a valid `who`.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
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

#[derive(Default)]
struct Progress {
    synced: AtomicUsize,
    slice_applies: AtomicUsize,
    notify: Notify,
}

impl Progress {
    async fn until(&self, done: impl Fn(&Progress) -> bool) {
        loop {
            let notified = self.notify.notified();
            if done(self) {
                return;
            }
            notified.await;
        }
    }
}

/// One measured case, in a process of its own.
#[allow(
    clippy::too_many_lines,
    reason = "one case from start to end: server, follow, churn, report"
)]
fn case(n: usize, lists: Option<&str>) -> anyhow::Result<()> {
    let streaming = lists != Some("paginated");
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["serve", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut to_server = child.stdin.take().context("stdin")?;
    let mut from_server = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    from_server.read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("url ")
        .context("server url")?
        .to_owned();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rss_before = status_mib("VmRSS:");
    let result = runtime.block_on(async {
        let progress = Arc::new(Progress::default());
        let client = kube_source::client(None, Some(&url)).await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let options = Options {
            lists: if streaming {
                ListStrategy::Streaming
            } else {
                ListStrategy::Paginated
            },
            ..Options::default()
        };
        let start = Instant::now();
        let cpu_start = cpu_time();
        let source = tokio::spawn(kube_source::run_with(client, "node-1".into(), tx, options));
        let seen = progress.clone();
        let consumer = tokio::spawn(async move {
            let mut state = ClusterState::new();
            let mut synced = false;
            while let Some(update) = rx.recv().await {
                match update {
                    SourceUpdate::Events(events) => {
                        let slices = events
                            .iter()
                            .filter(|e| matches!(e, Event::Apply(Model::EndpointSlice { .. })))
                            .count();
                        controllers::apply_all(&mut state, events);
                        if synced {
                            seen.slice_applies.fetch_add(slices, Ordering::SeqCst);
                        }
                    }
                    SourceUpdate::InitialSyncDone => {
                        synced = true;
                        seen.synced.store(state.service_count(), Ordering::SeqCst);
                    }
                    SourceUpdate::NodeEligible(_) | SourceUpdate::LocalAddresses(_) => {}
                }
                seen.notify.notify_waiters();
            }
            state
        });
        progress
            .until(|p| p.synced.load(Ordering::SeqCst) > 0)
            .await;
        let first_sync = start.elapsed();
        let first_sync_cpu = cpu_time().saturating_sub(cpu_start);
        anyhow::ensure!(
            progress.synced.load(Ordering::SeqCst) == n,
            "synced with {} Services, not {n}",
            progress.synced.load(Ordering::SeqCst)
        );

        let cpu_before = cpu_time();
        let churn_start = Instant::now();
        writeln!(to_server, "churn {CHANGES}")?;
        progress
            .until(|p| p.slice_applies.load(Ordering::SeqCst) >= CHANGES)
            .await;
        let churn_wall = churn_start.elapsed();
        let churn_cpu = cpu_time().saturating_sub(cpu_before);
        drop(to_server);
        source.abort();
        let state = consumer.await?;
        Ok::<_, anyhow::Error>((first_sync, first_sync_cpu, churn_wall, churn_cpu, state))
    });
    let _ = child.kill();
    let _ = child.wait();
    let (first_sync, first_sync_cpu, churn_wall, churn_cpu, state) = result?;
    let hwm = status_mib("VmHWM:");
    let lists = if streaming { "streaming" } else { "paginated" };
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let per_thousand = churn_cpu.as_secs_f64() * 1000.0 / CHANGES as f64;
    println!(
        "controllers {n} Services + {n} EndpointSlices x {ENDPOINTS} endpoints, {lists} lists:"
    );
    println!(
        "  first sync        {:>8.3} s wall, {:.3} s CPU",
        first_sync.as_secs_f64(),
        first_sync_cpu.as_secs_f64()
    );
    println!(
        "  {CHANGES} endpoint changes {:>8.3} s wall, {:.3} s CPU = {:.1} ms CPU per 1,000 changes",
        churn_wall.as_secs_f64(),
        churn_cpu.as_secs_f64(),
        per_thousand * 1000.0
    );
    println!(
        "  memory            {hwm:.0} MiB peak (VmHWM), {rss_before:.0} MiB before following; model holds {} Services",
        state.service_count()
    );
    if streaming {
        println!(
            "bench controllers {n} ours={:.2}s rss={hwm:.0}MiB",
            first_sync.as_secs_f64()
        );
    }
    Ok(())
}
