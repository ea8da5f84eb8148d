//! Benchmark of the manifest-directory source alone, on the host (no kernel, no sync loop):
//! N files of one Service and its EndpointSlice (10 endpoints) each, as `bench sync` writes
//! them.
//!
//! - first read: from starting `watch::watch_dir` to its `InitialSyncDone`, every object read,
//!   parsed and converted into the model (the receiving side only counts them), and the CPU
//!   time this process spent meanwhile (all threads; the work, whatever else the host runs);
//! - one change: a file written beside the directory's files and renamed into place, to its
//!   converted slice (its Service's document is unchanged, so not sent) taken from the source's
//!   channel, median and p99 over 200.
//!
//! `cargo xtask bench --host manifests [SIZES…]` (default 1000 10000). Ends with, per size:
//! `bench manifests-read <N> ours=<s>s cpu=<s>s` and `bench manifests-change <N> ours=<median s>s
//! p99=<ms>ms`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use controllers::source::{Event, Model, SourceUpdate};
use tokio::sync::mpsc;

#[path = "../../../examples/support/cluster.rs"]
mod cluster;
use cluster::service_yaml;

const CHANGES: usize = 200;

fn main() -> anyhow::Result<()> {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![1000, 10_000]
    } else {
        sizes
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut summary = Vec::new();
    for n in sizes {
        let dir = std::env::temp_dir().join(format!("bench-manifests-{n}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for i in 0..n {
            std::fs::write(dir.join(format!("svc-{i}.yaml")), service_yaml(i, None))?;
        }
        let result = runtime.block_on(measure(&dir, n));
        let _ = std::fs::remove_dir_all(&dir);
        let (read, cpu, mut changes) = result?;
        changes.sort();
        let median = changes[changes.len() / 2];
        let p99 = changes[(changes.len() - 1) * 99 / 100];
        println!(
            "{n} files: first read {:.3}s (CPU {:.3}s); one change median {:.3}ms p99 {:.3}ms",
            read.as_secs_f64(),
            cpu.as_secs_f64(),
            median.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0
        );
        summary.push(format!(
            "bench manifests-read {n} ours={:.3}s cpu={:.3}s",
            read.as_secs_f64(),
            cpu.as_secs_f64()
        ));
        summary.push(format!(
            "bench manifests-change {n} ours={:.5}s p99={:.2}ms",
            median.as_secs_f64(),
            p99.as_secs_f64() * 1000.0
        ));
    }
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// The first read's time and CPU time, and each change's time.
async fn measure(dir: &Path, n: u32) -> anyhow::Result<(Duration, Duration, Vec<Duration>)> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cpu_before = cpu_time()?;
    let started = Instant::now();
    let task = tokio::spawn(controllers::watch::watch_dir(dir.to_owned(), "node-a", tx));
    let mut objects = 0;
    loop {
        match rx.recv().await.context("the source stopped")? {
            SourceUpdate::Events(events) => objects += events.len(),
            SourceUpdate::InitialSyncDone => break,
            other => bail!("unexpected {other:?}"),
        }
    }
    let read = started.elapsed();
    let cpu = cpu_time()?.saturating_sub(cpu_before);
    if objects != 2 * n as usize {
        bail!("{objects} objects read, expected {}", 2 * n);
    }
    let mut changes = Vec::with_capacity(CHANGES);
    for k in 0..CHANGES {
        let k32 = u32::try_from(k)?;
        let i = (k32 * 7919) % n;
        let moved = Ipv4Addr::new(10, 255, u8::try_from(k / 250)?, u8::try_from(k % 250 + 1)?);
        let tmp: PathBuf = dir.join(format!(".svc-{i}.tmp"));
        let t0 = Instant::now();
        std::fs::write(&tmp, service_yaml(i, Some(moved)))?;
        std::fs::rename(&tmp, dir.join(format!("svc-{i}.yaml")))?;
        let update = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .context("no change within 10 s")?;
        changes.push(t0.elapsed());
        match update {
            // The file's changed slice alone (its Service's document is unchanged).
            Some(SourceUpdate::Events(events))
                if matches!(&events[..], [Event::Apply(Model::EndpointSlice { .. })]) => {}
            other => bail!("change {k}: {other:?}"),
        }
        // Changes are measured one by one.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    Ok((read, cpu, changes))
}

/// This process's user and system time, all threads (`/proc/self/stat`, in clock ticks of
/// 10 ms).
fn cpu_time() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the command (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc/self/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}
