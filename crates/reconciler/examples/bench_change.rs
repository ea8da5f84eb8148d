//! What one endpoint change costs the sync loop, at several cluster sizes, without a kernel:
//! the real `SyncLoop`, `IpvsEngine`, `Syncer` and planner over the in-memory kernels of
//! `reconciler::testing`. Each size is a synthetic cluster (ClusterIP Services, every tenth a
//! NodePort while ports last, 10 endpoints each); after the first full sync, each change flips
//! one endpoint of one Service between ready and not ready: one EndpointSlice update folded in,
//! then the partial sync and the loop's bookkeeping (`tick`, `next_deadline`), as the daemon's
//! loop runs them. The change's objects are made before it is timed, with the names shared as
//! the daemon's sources share them (they convert objects on their own thread).
//!
//! `cargo xtask bench --host change [SIZES]` (default 1000 10000 100000). `BENCH_CHANGES`: how
//! many changes per size (1000), run in ten rounds in which the sizes take turns, so that a
//! busy machine weighs on every size alike. CPU time is the thread's (`CLOCK_THREAD_CPUTIME_ID`);
//! instructions are counted by valgrind's callgrind when it is installed, in a second run of
//! this program (`--instructions SIZE CHANGES`) that collects only inside each change
//! (`--toggle-collect`), so the setup costs nothing there (`BENCH_CHANGE_NO_CALLGRIND=1` skips
//! it). Last lines: `bench change <N> cpu_us=<median> p99_us=<p99> instr=<per change>`, the
//! range of the rounds' own ratios, then `bench change-ratio 10k/1k=… 100k/1k=…`: the median
//! of the rounds' ratios of their medians, so a slow spell, which falls on every size of its
//! round, cannot flip the verdict (goals ≤ 1.1 and ≤ 1.3; printed, not asserted).
//!
//! The allocator is the daemon's (`src/allocator.rs`, the same file), with the glibc tunables
//! the image runs it with (this program starts again with them, unless `GLIBC_TUNABLES` is
//! set: empty, glibc's defaults): its settings, and its heaps and big blocks on transparent
//! huge pages, are part of what a change costs. The first line says which.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reconciler::engine::IpvsEngine;
use reconciler::model::{
    Conditions, Endpoint, EndpointPort, EndpointSlice, Hints, Protocol, SchedulerChoice,
    ServiceName, ServicePort, ServicePortName, ServiceType, SessionAffinity, TrafficPolicy,
};
use reconciler::sync::{Counts, SyncError, SyncOptions, Syncer};
use reconciler::testing::{FakeAddresses, FakeIpvs, FakeNetfilter};
use reconciler::{
    Affected, ClusterState, Folded, HealthChecks, Observer, Settings, SliceName, SourceUpdate,
    SyncLoop, SyncRecord,
};

// The daemon's allocator: its global allocator, and `tune`, called first in `main`.
#[path = "../../../src/allocator.rs"]
#[allow(dead_code, reason = "the daemon's `release` is not called here")]
mod allocator;

const ENDPOINTS: u32 = 10;
const NODES: u32 = 50;
/// NodePorts 30000–32767: every tenth Service gets one while they last.
const NODE_PORTS: u32 = 2768;

/// One object of the synthetic cluster.
enum Change {
    Service(ServiceName, Vec<ServicePort>),
    Slice(SliceName, EndpointSlice),
}

fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

/// The strings the daemon's sources share between objects (`controllers::intern`: namespaces,
/// Service and port names), made once, so that a change's objects hold the same copies
/// as the state, as the daemon's do (it interns them on the source's thread, outside the loop).
struct Names {
    services: Vec<ServiceName>,
    port: Arc<str>,
}

impl Names {
    fn new(size: u32) -> Names {
        let namespace: Arc<str> = "bench".into();
        Names {
            services: (0..size)
                .map(|i| ServiceName {
                    namespace: namespace.clone(),
                    name: format!("svc-{i}").into(),
                })
                .collect(),
            port: "http".into(),
        }
    }
}

fn service(names: &Names, i: u32) -> Change {
    let name = names.services[i as usize].clone();
    let node_port = (i.is_multiple_of(10) && i / 10 < NODE_PORTS)
        .then(|| 30000 + u16::try_from(i / 10).expect("below NODE_PORTS"));
    let port = ServicePort {
        name: ServicePortName {
            service: name.clone(),
            port: names.port.clone(),
            protocol: Protocol::Tcp,
        },
        service_type: if node_port.is_some() {
            ServiceType::NodePort
        } else {
            ServiceType::ClusterIp
        },
        port: 80,
        cluster_ips: Arc::from([v4(0x0a60_0000 + i)]),
        external_ips: Arc::from([]),
        load_balancer_ips: Arc::from([]),
        load_balancer_source_ranges: Arc::from([]),
        node_port,
        health_check_node_port: None,
        session_affinity: SessionAffinity::None,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        scheduler: SchedulerChoice::Default,
    };
    Change::Service(name, vec![port])
}

/// Service `i`'s slice; its first endpoint not ready when `flipped`. Its name is its own copy,
/// as the daemon's sources make it.
fn slice(names: &Names, i: u32, flipped: bool) -> Change {
    let endpoints: Vec<Endpoint> = (0..ENDPOINTS)
        .map(|e| Endpoint {
            ip: v4(0x0af4_0000 + i * ENDPOINTS + e),
            port: 8080,
            conditions: if flipped && e == 0 {
                Conditions {
                    ready: false,
                    serving: false,
                    terminating: false,
                }
            } else {
                Conditions::default()
            },
            // On node-0, this node, for one in NODES.
            local: (i + e).is_multiple_of(NODES),
            hints: Hints::default(),
        })
        .collect();
    Change::Slice(
        (
            names.services[i as usize].namespace.clone(),
            format!("svc-{i}-abcde").into(),
        ),
        EndpointSlice {
            service: names.services[i as usize].clone(),
            ports: vec![EndpointPort {
                name: names.port.clone(),
                protocol: Protocol::Tcp,
                endpoints: endpoints.into(),
            }],
        },
    )
}

/// The loop's fold, as a source's: each object into the state, naming what it affected.
fn fold(state: &mut ClusterState, changes: Vec<Change>) -> Folded {
    let mut folded = Folded::default();
    for change in changes {
        match change {
            Change::Service(name, ports) => {
                folded.service_changes += 1;
                folded
                    .affected
                    .services
                    .extend(state.upsert_service(name, ports));
            }
            Change::Slice(name, slice) => {
                folded.endpoint_changes += 1;
                folded
                    .affected
                    .services
                    .extend(state.upsert_slice(name, slice));
            }
        }
    }
    let Affected { services, .. } = &mut folded.affected;
    services.sort_unstable();
    services.dedup();
    folded
}

/// Hears everything, keeps nothing: the daemon's observer costs are its own.
struct Quiet;

impl Observer for Quiet {
    fn node_eligible(&self, _: bool) {}
    fn queued(&self, _: &Folded, _: (u64, u64), _: SystemTime, _: &[inet::Family]) {}
    fn synced(&self, _: &SyncRecord) {}
    fn caught_up(&self) {}
    fn errors(&self, _: &[SyncError], _: bool, _: &[inet::Family]) {}
    fn counts(&self, _: Counts) {}
    fn no_local_endpoints(&self, _: inet::Family, _: u64, _: u64) {}
    fn health_checks(&self, _: &HealthChecks) {}
}

/// One cluster's loop over in-memory kernels, and which Services' first endpoint is flipped.
struct Cluster {
    size: u32,
    sync_loop: SyncLoop<Vec<Change>>,
    names: Names,
    flipped: Vec<bool>,
    /// The `now` of every tick: the sync period never comes, nor a drain tick after the first.
    now: Instant,
    /// The next change's number.
    next: u32,
}

impl Cluster {
    /// The loop after its first full sync of `size` Services.
    fn new(size: u32) -> Cluster {
        let ipvs = FakeIpvs {
            quiet: true,
            ..FakeIpvs::default()
        };
        let engine = IpvsEngine(Syncer::new(
            ipvs,
            FakeAddresses::default(),
            FakeNetfilter::default(),
            SyncOptions::default(),
        ));
        let mut settings = Settings {
            node_ips: vec![v4(0xc0a8_380a)],
            sync_period: Duration::from_secs(24 * 3600),
            ..Settings::default()
        };
        settings.plan.node_name = "node-0".into();
        let mut sync_loop = SyncLoop::new(settings, Box::new(engine), fold, Box::new(Quiet));
        let names = Names::new(size);
        let cluster = (0..size)
            .flat_map(|i| [service(&names, i), slice(&names, i, false)])
            .collect();
        sync_loop.receive(SourceUpdate::Events(cluster));
        sync_loop.receive(SourceUpdate::InitialSyncDone);
        let now = Instant::now();
        sync_loop.tick(now);
        Cluster {
            size,
            sync_loop,
            names,
            flipped: vec![false; size as usize],
            now,
            next: 0,
        }
    }

    /// Runs the next `count` changes, each to a Service spread over the cluster; the CPU
    /// time of each, in microseconds.
    fn apply_changes(&mut self, count: u32) -> Vec<f64> {
        (0..count)
            .map(|_| {
                let k = self.next;
                self.next += 1;
                let i = u32::try_from((u64::from(k) * 7919 + 13) % u64::from(self.size))
                    .expect("below the size");
                let f = &mut self.flipped[i as usize];
                *f = !*f;
                let change = slice(&self.names, i, *f);
                let start = thread_cpu();
                self.apply_change(change);
                thread_cpu().saturating_sub(start).as_secs_f64() * 1e6
            })
            .collect()
    }

    /// One change: the slice update folded in, the partial sync, and the loop's next
    /// deadline, as the daemon's loop runs them. The timed region, and all callgrind counts
    /// (the change's objects are made before it, as the daemon's sources make them).
    #[inline(never)]
    fn apply_change(&mut self, change: Change) {
        self.sync_loop.receive(SourceUpdate::Events(vec![change]));
        self.sync_loop.tick(self.now);
        std::hint::black_box(self.sync_loop.next_deadline());
    }
}

#[allow(unsafe_code, reason = "clock_gettime(2) has no safe wrapper in std")]
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The `permille`th value of `sorted`, nearest rank.
fn percentile(sorted: &[f64], permille: usize) -> f64 {
    sorted[(sorted.len() - 1) * permille / 1000]
}

/// Instructions per change at `size`, counted by callgrind in a run of this program that
/// collects only inside `Cluster::apply_change` (one size, no rounds); `None` when valgrind is
/// missing or fails.
fn instructions(size: u32, count: u32) -> Option<f64> {
    if std::env::var_os("BENCH_CHANGE_NO_CALLGRIND").is_some() {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let output = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--toggle-collect=*Cluster::apply_change",
            "--callgrind-out-file=/dev/null",
        ])
        .arg(exe)
        .args(["--instructions", &size.to_string(), &count.to_string()])
        .output()
        .ok()?;
    if !output.status.success() {
        eprintln!(
            "callgrind failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return None;
    }
    // "==123== Collected : 4567"
    let collected: f64 = String::from_utf8_lossy(&output.stderr)
        .lines()
        .find_map(|l| {
            l.split_once("Collected :")
                .map(|(_, n)| n.trim().parse().ok())
        })??;
    Some(collected / f64::from(count))
}

/// Rounds the changes of each size are split into, the sizes taking turns, so that load from
/// other work on the machine falls on every size alike.
const ROUNDS: u32 = 10;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(&values, 500)
}

/// One size's figures: its CPU time per change over all rounds, each round's median, and the
/// instructions callgrind counted.
struct Measured {
    size: u32,
    median: f64,
    p99: f64,
    round_medians: Vec<f64>,
    instructions: Option<f64>,
}

fn main() {
    // The heap as the image runs the daemon's (`allocator::GLIBC_TUNABLES`): only set before a
    // process starts, so this one starts again with it. A `GLIBC_TUNABLES` already set is
    // kept (empty: glibc's defaults, to compare).
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        use std::os::unix::process::CommandExt as _;
        let exe = std::env::current_exe().expect("this executable");
        let error = Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("GLIBC_TUNABLES", allocator::GLIBC_TUNABLES)
            .exec();
        panic!("running this benchmark again with GLIBC_TUNABLES: {error}");
    }
    allocator::tune();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count: u32 = std::env::var("BENCH_CHANGES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000);
    if args.first().map(String::as_str) == Some("--instructions") {
        let size = args[1].parse().expect("SIZE");
        let count = args[2].parse().expect("CHANGES");
        Cluster::new(size).apply_changes(count);
        return;
    }
    let sizes: Vec<u32> = if args.is_empty() {
        vec![1000, 10_000, 100_000]
    } else {
        args.iter()
            .map(|a| a.parse().expect("SIZE: a number"))
            .collect()
    };
    println!(
        "GLIBC_TUNABLES={:?}",
        std::env::var("GLIBC_TUNABLES").unwrap_or_default()
    );
    // Each cluster with its CPU times, round by round.
    let mut clusters: Vec<(Cluster, Vec<Vec<f64>>)> = sizes
        .iter()
        .map(|&size| {
            let started = Instant::now();
            let cluster = Cluster::new(size);
            println!(
                "{size} Services × {ENDPOINTS} endpoints: set up in {:.2}s",
                started.elapsed().as_secs_f64()
            );
            (cluster, Vec::new())
        })
        .collect();
    let per_round = count.div_ceil(ROUNDS);
    for _ in 0..ROUNDS {
        for (cluster, rounds) in &mut clusters {
            rounds.push(cluster.apply_changes(per_round));
        }
    }
    let mut results = Vec::new();
    for (cluster, rounds) in clusters {
        let size = cluster.size;
        drop(cluster);
        let round_medians = rounds.iter().map(|r| median(r.clone())).collect();
        let mut cpu: Vec<f64> = rounds.into_iter().flatten().collect();
        cpu.sort_by(f64::total_cmp);
        let (median, p99) = (percentile(&cpu, 500), percentile(&cpu, 990));
        println!(
            "{size} Services: {} changes, cpu median {median:.1} µs, p99 {p99:.1} µs, max {:.1} µs",
            cpu.len(),
            cpu[cpu.len() - 1]
        );
        results.push(Measured {
            size,
            median,
            p99,
            round_medians,
            instructions: instructions(size, count),
        });
    }
    for m in &results {
        let instr = m
            .instructions
            .map_or_else(|| "n/a".to_owned(), |i| format!("{i:.0}"));
        println!(
            "bench change {} cpu_us={:.1} p99_us={:.1} instr={instr}",
            m.size, m.median, m.p99
        );
    }
    print_ratios(&results);
}

/// `bench change-ratio 10k/1k=… 100k/1k=…`: each size's CPU time over the smallest size's,
/// as the median of the rounds' own ratios (a slow spell of a busy machine falls on every
/// size of its round alike, so it cannot flip the verdict), with the rounds' range; and the
/// instructions' ratio, where counted.
fn print_ratios(results: &[Measured]) {
    let Some(base) = results.first() else {
        return;
    };
    let short = |n: u32| {
        if n.is_multiple_of(1000) {
            format!("{}k", n / 1000)
        } else {
            n.to_string()
        }
    };
    let mut line = String::from("bench change-ratio");
    let mut spread = String::from("per-round ratios:");
    for m in &results[1..] {
        let ratios: Vec<f64> = m
            .round_medians
            .iter()
            .zip(&base.round_medians)
            .map(|(ours, floor)| ours / floor)
            .collect();
        let name = format!("{}/{}", short(m.size), short(base.size));
        let (low, high) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
        let _ = write!(line, " {name}={:.2}", median(ratios));
        let _ = write!(spread, " {name} {low:.2}–{high:.2}");
        if let (Some(i), Some(b)) = (m.instructions, base.instructions) {
            let _ = write!(line, " instr_{name}={:.2}", i / b);
        }
    }
    println!("{spread}");
    println!("{line} (goals: 10k/1k <= 1.1, 100k/1k <= 1.3)");
}
