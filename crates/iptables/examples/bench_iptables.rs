//! `cargo xtask bench iptables`: the iptables proxier (the fallback when IPVS is missing) with
//! 10,000 Services × 10 endpoints: one full restore, then one endpoint changed (a partial
//! sync). Runs in a network namespace of its own when it can create one (on the host), else in
//! the current one (the VM). Set `BENCH_FLAVOUR=legacy|nft` to pick the flavour.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Instant;

use iptables::proxier::{Backend, Proxier, ProxierConfig, ServiceSpec};
use iptables::{Flavour, Protocol, Runner, detect_flavour};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn specs(changed: Option<u32>) -> Vec<ServiceSpec> {
    (0..SERVICES)
        .map(|i| {
            let [_, _, hi, lo] = i.to_be_bytes();
            let vip = IpAddr::V4(Ipv4Addr::new(10, 96, hi, lo));
            let mut s =
                ServiceSpec::cluster_ip(format!("bench/svc-{i}:http"), Protocol::Tcp, vip, 80);
            s.node_port = (i % 10 == 0).then(|| u16::try_from(30_000 + i / 10).unwrap_or(30_000));
            s.backends = (0..ENDPOINTS)
                .map(|e| {
                    let e = if changed == Some(i) && e == 0 {
                        ENDPOINTS + 1
                    } else {
                        e
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

struct Netns(Option<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(ns) = &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = format!("bench-iptables-{}", std::process::id());
    let created = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .is_ok_and(|o| o.status.success());
    let ns = Netns(created.then_some(name));
    let flavour = match std::env::var("BENCH_FLAVOUR").as_deref() {
        Ok("legacy") => Flavour::Legacy,
        Ok("nft") => Flavour::Nft,
        _ => detect_flavour(ns.0.as_deref()),
    };
    let mut runner = Runner::new(flavour);
    if let Some(n) = &ns.0 {
        runner = runner.in_netns(n.clone());
    }
    println!(
        "iptables proxier: {SERVICES} services x {ENDPOINTS} endpoints, iptables-{}, {}",
        flavour.as_str(),
        ns.0.as_deref().map_or_else(
            || "current network namespace".to_owned(),
            |n| format!("network namespace {n}")
        )
    );

    let mut proxier = Proxier::new(ProxierConfig {
        cluster_cidr: Some("10.128.0.0/9".parse()?),
        ..ProxierConfig::default()
    });
    let before = specs(None);
    let start = Instant::now();
    let full = proxier.sync(&runner, &before, true)?;
    let full_time = start.elapsed().as_secs_f64();
    println!(
        "full sync: {:.3}s, {} chains, {} rules, {:.1} MiB of restore input",
        full_time,
        full.chains_written,
        full.rules,
        f64::from(u32::try_from(full.bytes).unwrap_or(u32::MAX)) / 1_048_576.0
    );

    let after = specs(Some(SERVICES / 2));
    let start = Instant::now();
    let partial = proxier.sync(&runner, &after, false)?;
    let partial_time = start.elapsed().as_secs_f64();
    println!(
        "partial sync (one endpoint changed): {:.4}s, {} chains written, {} deleted, {} rules, {} bytes",
        partial_time, partial.chains_written, partial.chains_deleted, partial.rules, partial.bytes
    );
    println!("partial / full = {:.2}%", 100.0 * partial_time / full_time);

    let start = Instant::now();
    let resync = proxier.sync(&runner, &after, true)?;
    println!(
        "full resync over existing rules: {:.3}s ({} rules)",
        start.elapsed().as_secs_f64(),
        resync.rules
    );

    if ns.0.is_none() {
        let report = iptables::cleanup(&runner);
        println!("cleanup: {} chains removed", report.chains);
    }
    println!("bench iptables-full {SERVICES} ours={full_time:.3}s");
    println!("bench iptables-partial {SERVICES} ours={partial_time:.4}s");
    Ok(())
}
