//! `cargo xtask bench netif [N] [--repeat R]` (`--count N` too): bind N service addresses
//! (10,000) to `kube-ipvs0` and remove them again, IPv4 and IPv6, against the floor of
//! `ip -batch` doing the same in the same VM. Each case runs R rounds (5) on a freshly created
//! link, ours and the floor back to back, taking turns to go first. The reported times are the
//! medians of each side; the ratio is the median of the rounds' own ratios, so a slow spell
//! of a busy machine, which falls on both sides of a round, cannot flip the verdict. Ends with
//! one summary line per case: `bench netif-add 10000 ours=0.21s floor=0.35s ratio=0.60`.
//!
//! Both sides do the same kernel work, message for message (`RTM_NEWADDR`/`RTM_DELADDR` with
//! `IFA_LOCAL` and `IFA_ADDRESS`); ours saves the syscalls (hundreds of requests per `sendmsg`,
//! only errors and one acknowledgement per batch come back) and iproute2's per-line work. The
//! IPv6 cases are dominated by the kernel itself (each deleted address walks the whole IPv6
//! routing table to clean up preferred sources, so the cost grows with the square of the
//! count), so there the ratio stays near 1 and is noisy on a busy host.
//!
//! It creates and deletes `kube-ipvs0` in the current network namespace, so it refuses to run
//! outside the project's VM (`IPVS_PROXY_VM=1`) unless given `--force`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use netif::{DummyLink, KUBE_IPVS0};

struct Options {
    count: u32,
    repeat: usize,
}

fn parse_options() -> Result<Options> {
    let mut options = Options {
        count: 10_000,
        repeat: 5,
    };
    let mut force = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--count" => options.count = args.next().context("--count N")?.parse()?,
            "--repeat" => options.repeat = args.next().context("--repeat R")?.parse()?,
            "--force" => force = true,
            n if n.parse::<u32>().is_ok() => options.count = n.parse()?,
            other => bail!("unknown argument {other:?} (known: N, --count N, --repeat R, --force)"),
        }
    }
    ensure!(
        options.count > 0 && options.count <= 60_000,
        "--count must be 1..=60000"
    );
    ensure!(options.repeat > 0, "--repeat must be at least 1");
    if std::env::var("IPVS_PROXY_VM").as_deref() != Ok("1") && !force {
        bail!(
            "this benchmark creates and deletes {KUBE_IPVS0}: run it with `cargo xtask bench netif` (or pass --force)"
        );
    }
    Ok(options)
}

fn addresses(v6: bool, count: u32) -> Vec<IpAddr> {
    (0..count)
        .map(|n| {
            if v6 {
                let [hi, lo] = [(n >> 16) as u16, (n & 0xffff) as u16];
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, hi + 1, lo))
            } else {
                IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + n))
            }
        })
        .collect()
}

fn host_prefix_form(address: IpAddr) -> String {
    format!("{address}/{}", netif::host_prefix(address))
}

/// The time `ip -batch FILE` takes for one `addr VERB ADDRESS/PREFIX dev kube-ipvs0` line per address.
fn ip_batch(verb: &str, addresses: &[IpAddr]) -> Result<Duration> {
    let mut script = String::with_capacity(addresses.len() * 48);
    for &address in addresses {
        writeln!(
            script,
            "addr {verb} {} dev {KUBE_IPVS0}",
            host_prefix_form(address)
        )?;
    }
    let path = std::env::temp_dir().join(format!("bench-netif-{verb}.batch"));
    std::fs::write(&path, script)?;
    let started = Instant::now();
    let output = Command::new("/bin/ip")
        .arg("-batch")
        .arg(&path)
        .output()
        .context("run /bin/ip -batch")?;
    let elapsed = started.elapsed();
    ensure!(
        output.status.success(),
        "ip -batch ({verb}) failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(elapsed)
}

/// A link created fresh for one run, so that every run starts from the same kernel state.
fn fresh_link() -> Result<DummyLink> {
    DummyLink::delete(KUBE_IPVS0)?;
    Ok(DummyLink::ensure(KUBE_IPVS0)?)
}

fn check_count(link: &mut DummyLink, expected: usize) -> Result<()> {
    let found = link.addresses()?.len();
    ensure!(
        found == expected,
        "{KUBE_IPVS0} holds {found} addresses, expected {expected}"
    );
    Ok(())
}

/// One run: (add, remove) times for ours and for the floor.
fn run_once(addresses: &[IpAddr], ours_first: bool) -> Result<[(Duration, Duration); 2]> {
    let mut ours = (Duration::ZERO, Duration::ZERO);
    let mut floor = (Duration::ZERO, Duration::ZERO);
    for turn in 0..2 {
        let mut link = fresh_link()?;
        if (turn == 0) == ours_first {
            let started = Instant::now();
            let results = link.add(addresses)?;
            ours.0 = started.elapsed();
            ensure!(
                results.iter().all(Result::is_ok),
                "an add failed: {:?}",
                results.iter().find(|r| r.is_err())
            );
            check_count(&mut link, addresses.len())?;
            let started = Instant::now();
            let results = link.remove(addresses)?;
            ours.1 = started.elapsed();
            ensure!(results.iter().all(Result::is_ok), "a remove failed");
        } else {
            floor.0 = ip_batch("add", addresses)?;
            check_count(&mut link, addresses.len())?;
            floor.1 = ip_batch("del", addresses)?;
        }
        check_count(&mut link, 0)?;
    }
    Ok([ours, floor])
}

fn median<T: PartialOrd + Copy>(mut values: Vec<T>) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values[values.len() / 2]
}

/// One case over every round: the median of ours, of the floor, and of their ratio per round.
fn summarise(rounds: &[(Duration, Duration)]) -> (Duration, Duration, f64) {
    (
        median(rounds.iter().map(|r| r.0).collect()),
        median(rounds.iter().map(|r| r.1).collect()),
        median(
            rounds
                .iter()
                .map(|r| r.0.as_secs_f64() / r.1.as_secs_f64())
                .collect(),
        ),
    )
}

fn main() -> Result<()> {
    let options = parse_options()?;
    let mut summary = Vec::new();
    for (family, v6) in [("", false), ("v6-", true)] {
        let addresses = addresses(v6, options.count);
        let unique: BTreeSet<_> = addresses.iter().collect();
        ensure!(
            unique.len() == addresses.len(),
            "generated addresses are not unique"
        );
        let mut runs = Vec::new();
        for run in 0..options.repeat {
            let [ours, floor] = run_once(&addresses, run % 2 == 0)?;
            println!(
                "run {run} {family}{}: ours add {:.3}s remove {:.3}s; ip -batch add {:.3}s del {:.3}s",
                options.count,
                ours.0.as_secs_f64(),
                ours.1.as_secs_f64(),
                floor.0.as_secs_f64(),
                floor.1.as_secs_f64()
            );
            runs.push((ours, floor));
        }
        let add: Vec<_> = runs.iter().map(|(ours, floor)| (ours.0, floor.0)).collect();
        let remove: Vec<_> = runs.iter().map(|(ours, floor)| (ours.1, floor.1)).collect();
        summary.push((format!("netif-{family}add"), summarise(&add)));
        summary.push((format!("netif-{family}remove"), summarise(&remove)));
    }
    DummyLink::delete(KUBE_IPVS0)?;
    // DESIGN.md's summary format: the bench's name, then the case as a plain size.
    for (name, (ours, floor, ratio)) in summary {
        println!(
            "bench {name} {} ours={:.3}s floor={:.3}s ratio={ratio:.2}",
            options.count,
            ours.as_secs_f64(),
            floor.as_secs_f64(),
        );
    }
    Ok(())
}
