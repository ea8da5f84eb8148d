//! `cargo xtask bench iptables [SERVICES] [legacy|nft|both]`: the iptables proxier (the
//! fallback when IPVS is missing) with 10,000 Services × 10 endpoints (by default), in each
//! flavour (both by default; `BENCH_FLAVOUR=legacy|nft` also picks one): one full restore,
//! then partial syncs (one endpoint changed; one Service added, then removed), then a full
//! resync over the existing rules.
//! Runs in a network namespace of its own when it can create one (on the host), else in the
//! current one (the VM), which it cleans up after each flavour. On the host:
//! `cargo run --release -p iptables --example bench_iptables -- 10000 nft`.
//!
//! Floors, measured in the same table right after ours: for the full restore, one
//! `iptables-restore` of the same input into an empty namespace (legacy only: one
//! iptables-nft-restore of it is super-linear, hours at this size, which is why ours splits
//! it); for the partial sync, one `iptables-restore --noflush` writing a single new chain of
//! one rule, the least any change costs (legacy replaces the whole table in the kernel; nft
//! re-validates every rule reachable from the built-in chains on commit). The partial cases'
//! `of_full` is the goal: a one-Service change under 5% of a full restore.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use iptables::proxier::{Backend, Proxier, ProxierConfig, ServiceSpec, service_name};
use iptables::{Family, Flavour, Protocol, Runner, Saved};

const ENDPOINTS: u32 = 10;
/// Partial syncs and floors are repeated this many times; the median is reported.
const REPEATS: usize = 5;

fn specs(services: u32, changed: Option<(u32, u32)>) -> Vec<ServiceSpec> {
    (0..services)
        .map(|i| {
            let [_, _, hi, lo] = i.to_be_bytes();
            let vip = IpAddr::V4(Ipv4Addr::new(10, 96, hi, lo));
            let mut s =
                ServiceSpec::cluster_ip(format!("bench/svc-{i}:http"), Protocol::Tcp, vip, 80);
            s.node_port = (i % 10 == 0).then(|| u16::try_from(30_000 + i / 10).unwrap_or(30_000));
            s.backends = (0..ENDPOINTS)
                .map(|e| {
                    // The changed service's first endpoint moves to one of two spare addresses.
                    let e = match changed {
                        Some((svc, round)) if svc == i && e == 0 => ENDPOINTS + round % 2,
                        _ => e,
                    };
                    let n = i * (ENDPOINTS + 2) + e;
                    let [_, o2, o3, o4] = n.to_be_bytes();
                    Backend::ready(
                        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 128 + o2, o3, o4)), 8080),
                        e % 3 == 0,
                    )
                })
                .collect();
            s
        })
        .collect()
}

/// Service `i` of `specs` as a change for `Proxier::sync_services`: its name and its port.
fn service(specs: &[ServiceSpec], i: u32) -> Result<[(String, Vec<ServiceSpec>); 1], String> {
    let spec = specs
        .get(usize::try_from(i).map_err(|e| e.to_string())?)
        .ok_or(format!("no Service {i}"))?;
    Ok([(service_name(&spec.name).to_owned(), vec![spec.clone()])])
}

struct Netns(Option<String>);

impl Netns {
    fn create(name: &str) -> Netns {
        let created = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .is_ok_and(|o| o.status.success());
        Netns(created.then(|| name.to_owned()))
    }

    fn runner(&self, flavour: Flavour) -> Runner {
        match &self.0 {
            Some(n) => Runner::new(flavour).in_netns(n.clone()),
            None => Runner::new(flavour),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(ns) = &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn median(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64()
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64())
}

fn mib(bytes: usize) -> f64 {
    f64::from(u32::try_from(bytes).unwrap_or(u32::MAX)) / 1_048_576.0
}

/// One endpoint of the middle Service changed, [`REPEATS`] times; the median time.
fn partial_syncs(
    proxier: &mut Proxier,
    runner: &Runner,
    services: u32,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut partials = Vec::new();
    for round in 0..REPEATS {
        let after = specs(services, Some((services / 2, u32::try_from(round)?)));
        let changed = service(&after, services / 2)?;
        let start = Instant::now();
        let partial = proxier.sync_services(runner, changed, || &after)?;
        partials.push(start.elapsed());
        if round == 0 {
            println!(
                "partial sync (one endpoint changed): {} chains written, {} deleted, {} rules, {} bytes",
                partial.chains_written, partial.chains_deleted, partial.rules, partial.bytes
            );
        }
    }
    let partial_time = median(partials.clone());
    println!(
        "partial sync: median {partial_time:.4}s of {REPEATS} ({})",
        partials
            .iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(partial_time)
}

/// One Service added, then removed again, [`REPEATS`] times; the median time of each.
fn service_add_remove(
    proxier: &mut Proxier,
    runner: &Runner,
    services: u32,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let last = Some((services / 2, u32::try_from(REPEATS - 1)?));
    let with = specs(services + 1, last);
    let without = specs(services, last);
    let (mut adds, mut removes) = (Vec::new(), Vec::new());
    let [one_in] = service(&with, services)?;
    let one_out = (one_in.0.clone(), Vec::new());
    for _ in 0..REPEATS {
        for (specs, change, times) in [
            (&with, &one_in, &mut adds),
            (&without, &one_out, &mut removes),
        ] {
            let start = Instant::now();
            proxier.sync_services(runner, [(&change.0, &change.1)], || specs)?;
            times.push(start.elapsed());
        }
    }
    let (add, remove) = (median(adds), median(removes));
    println!("one Service added: median {add:.4}s; removed: median {remove:.4}s");
    Ok((add, remove))
}

/// The floor of any change: one new chain of one rule (then removed, untimed); the median
/// of [`REPEATS`].
fn change_floor(runner: &Runner) -> Result<f64, Box<dyn std::error::Error>> {
    let mut floors = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        runner.restore(
            Family::V4,
            "*nat\n:KUBE-SEP-BENCHFLOOR0000 - [0:0]\n-A KUBE-SEP-BENCHFLOOR0000 -j KUBE-MARK-MASQ\nCOMMIT\n",
        )?;
        floors.push(start.elapsed());
        runner.restore(
            Family::V4,
            "*nat\n:KUBE-SEP-BENCHFLOOR0000 - [0:0]\n-X KUBE-SEP-BENCHFLOOR0000\nCOMMIT\n",
        )?;
    }
    let partial_floor = median(floors);
    println!("floor of a change (one new chain, one rule): median {partial_floor:.4}s");
    Ok(partial_floor)
}

/// The full floor: the same first-sync input, fed whole to one restore in a fresh namespace.
fn full_floor(
    flavour: Flavour,
    config: ProxierConfig,
    before: &[ServiceSpec],
) -> Result<Option<f64>, Box<dyn std::error::Error>> {
    let ns = Netns::create(&format!("bench-iptables-floor-{}", std::process::id()));
    if ns.0.is_none() {
        return Ok(None);
    }
    let plan = Proxier::new(config).plan_full(before, &Saved::default());
    let input = plan.ruleset.render();
    let runner = ns.runner(flavour);
    let (done, t) = timed(|| runner.restore(Family::V4, &input));
    done?;
    println!(
        "floor of the full restore (one iptables-{}-restore of the same input): {t:.3}s",
        flavour.as_str()
    );
    Ok(Some(t))
}

/// Runs the cases in one flavour; returns its summary lines.
fn bench(flavour: Flavour, services: u32) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let f = flavour.as_str();
    let ns = Netns::create(&format!("bench-iptables-{f}-{}", std::process::id()));
    let runner = ns.runner(flavour);
    println!(
        "iptables proxier: {services} services x {ENDPOINTS} endpoints, iptables-{f}, {}",
        ns.0.as_deref().map_or_else(
            || "current network namespace".to_owned(),
            |n| format!("network namespace {n}")
        )
    );
    let config = ProxierConfig {
        local: iptables::LocalDetector::Cidr("10.128.0.0/9".parse()?),
        ..ProxierConfig::default()
    };
    let mut proxier = Proxier::new(config.clone());
    let before = specs(services, None);
    let (full, full_time) = timed(|| proxier.sync_full(&runner, &before));
    let full = full?;
    println!(
        "full sync: {full_time:.3}s, {} chains, {} rules, {:.1} MiB of restore input in {} restore(s)",
        full.chains_written,
        full.rules,
        mib(full.bytes),
        full.restores
    );

    let partial_time = partial_syncs(&mut proxier, &runner, services)?;
    let (add_time, remove_time) = service_add_remove(&mut proxier, &runner, services)?;
    let partial_floor = change_floor(&runner)?;

    let last = specs(services, Some((services / 2, u32::try_from(REPEATS - 1)?)));
    let (resync, resync_time) = timed(|| proxier.sync_full(&runner, &last));
    let resync = resync?;
    println!(
        "full resync over existing rules: {resync_time:.3}s ({} rules, {} restore(s))",
        resync.rules, resync.restores
    );

    if ns.0.is_none() {
        let report = iptables::cleanup(&runner);
        println!("cleanup: {} chains removed", report.chains);
    }
    drop(ns);

    let full_floor = if flavour == Flavour::Legacy {
        full_floor(flavour, config, &before)?
    } else {
        None
    };

    println!(
        "partial / full = {:.2}% (goal < 5%); floor of a change / full = {:.2}%",
        100.0 * partial_time / full_time,
        100.0 * partial_floor / full_time
    );
    let mut summary = vec![match full_floor {
        Some(floor) => format!(
            "bench iptables-{f}-full {services} ours={full_time:.3}s floor={floor:.3}s ratio={:.2}",
            full_time / floor
        ),
        None => format!("bench iptables-{f}-full {services} ours={full_time:.3}s"),
    }];
    summary.push(format!(
        "bench iptables-{f}-partial {services} ours={partial_time:.4}s floor={partial_floor:.4}s ratio={:.2} of_full={:.2}%",
        partial_time / partial_floor,
        100.0 * partial_time / full_time
    ));
    for (case, time) in [("add-service", add_time), ("remove-service", remove_time)] {
        summary.push(format!(
            "bench iptables-{f}-{case} {services} ours={time:.4}s floor={partial_floor:.4}s ratio={:.2} of_full={:.2}%",
            time / partial_floor,
            100.0 * time / full_time
        ));
    }
    summary.push(format!(
        "bench iptables-{f}-resync {services} ours={resync_time:.3}s"
    ));
    Ok(summary)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut services = 10_000;
    let mut flavours = match std::env::var("BENCH_FLAVOUR").as_deref() {
        Ok("legacy") => vec![Flavour::Legacy],
        Ok("nft") => vec![Flavour::Nft],
        _ => Flavour::ALL.to_vec(),
    };
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "legacy" => flavours = vec![Flavour::Legacy],
            "nft" => flavours = vec![Flavour::Nft],
            "both" => flavours = Flavour::ALL.to_vec(),
            n => services = n.parse().map_err(|_| format!("unknown argument {n}"))?,
        }
    }
    let mut summary = Vec::new();
    for flavour in flavours {
        summary.extend(bench(flavour, services)?);
        println!();
    }
    for line in summary {
        println!("{line}");
    }
    Ok(())
}
