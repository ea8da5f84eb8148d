//! `cargo xtask bench ipvs [SIZES…]` (in the VM): programs N virtual servers × 10 real servers
//! into an empty IPVS table with [`ipvs::Handle::apply`], dumps them back, and compares with
//! the floor: the same rules loaded by `ipvsadm -R` in the same VM. Default sizes: 1000 10000.
//!
//! The dump is read on 1, 2 and 4 sockets ([`Handle::dump_on`]), in turns, three times each;
//! its floor is `ipvsadm -Sn` of the same table.
//!
//! Ends with one line per size: `bench ipvs <N> ours=<s>s floor=<s>s ratio=<ours/floor>`, and
//! one per socket count: `bench ipvs-dump-<sockets> <N> ours=<median s>s floor=<s>s ratio=…`.

use anyhow::{Context, Result, bail, ensure};
use ipvs::{Handle, Op, Protocol, RealServer, Scheduler, ServiceKey, VirtualServer};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REAL_SERVERS: u8 = 10;
/// The socket counts the dump is measured with ([`Handle::dump_on`]).
const DUMP_SOCKETS: [usize; 3] = [1, 2, 4];
/// How many times each is measured.
const DUMP_ROUNDS: usize = 3;
/// How long the kernel is given to free a namespace left behind (its IPVS table goes in the
/// background) before the next measurement starts.
const TEARDOWN: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let sizes: Vec<usize> = match std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<Vec<_>, _>>()?
    {
        sizes if sizes.is_empty() => vec![1000, 10_000],
        sizes => sizes,
    };
    let mut summary = Vec::new();
    for &n in &sizes {
        let ops = table(n)?;
        fresh_netns()?;
        std::thread::sleep(TEARDOWN);
        let mut handle =
            Handle::with_timeout(Duration::from_secs(30)).context("opening the IPVS handle")?;

        let start = Instant::now();
        let results = handle.apply(&ops);
        let ours = start.elapsed();
        if let Some((op, err)) = ops
            .iter()
            .zip(&results)
            .find_map(|(op, r)| r.as_ref().err().map(|e| (op, e)))
        {
            bail!("{op}: {err}");
        }

        let dumps = dumps(&mut handle, n)?;
        let dump_time = dumps
            .iter()
            .find(|(s, _)| *s == ipvs::DUMP_SOCKETS)
            .map_or(Duration::ZERO, |(_, t)| *t);
        // The floor starts from an empty kernel too, once the kernel has torn ours down.
        drop(handle);
        fresh_netns()?;
        std::thread::sleep(TEARDOWN);

        let mut rules = String::new();
        for op in &ops {
            writeln!(rules, "{op}")?;
        }
        let start = Instant::now();
        let mut child = Command::new("ipvsadm")
            .arg("-R")
            .stdin(Stdio::piped())
            .spawn()
            .context("ipvsadm -R")?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(rules.as_bytes())?;
        ensure!(child.wait()?.success(), "ipvsadm -R failed");
        let floor = start.elapsed();

        let start = Instant::now();
        let saved = Command::new("ipvsadm").arg("-Sn").output()?;
        let save_time = start.elapsed();
        let lines = String::from_utf8(saved.stdout)?.lines().count();
        ensure!(
            lines == ops.len(),
            "ipvsadm -Sn printed {lines} lines, expected {}",
            ops.len()
        );

        let ratio = ours.as_secs_f64() / floor.as_secs_f64();
        println!(
            "{n} virtual servers x {REAL_SERVERS} real servers ({} ops): ours {:.3}s, ipvsadm -R {:.3}s, ratio {ratio:.2}; \
             dump ours {:.3}s, ipvsadm -Sn {:.3}s",
            ops.len(),
            ours.as_secs_f64(),
            floor.as_secs_f64(),
            dump_time.as_secs_f64(),
            save_time.as_secs_f64(),
        );
        summary.push(format!(
            "bench ipvs {n} ours={:.2}s floor={:.2}s ratio={ratio:.2}",
            ours.as_secs_f64(),
            floor.as_secs_f64()
        ));
        for (sockets, took) in dumps {
            summary.push(format!(
                "bench ipvs-dump-{sockets} {n} ours={:.3}s floor={:.3}s ratio={:.2}",
                took.as_secs_f64(),
                save_time.as_secs_f64(),
                took.as_secs_f64() / save_time.as_secs_f64()
            ));
        }
    }
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// The table read back on each of [`DUMP_SOCKETS`] sockets, taking turns: the median of each.
fn dumps(handle: &mut Handle, n: usize) -> Result<Vec<(usize, Duration)>> {
    let mut dumps: Vec<(usize, Vec<Duration>)> =
        DUMP_SOCKETS.iter().map(|&s| (s, Vec::new())).collect();
    for _ in 0..DUMP_ROUNDS {
        for (sockets, times) in &mut dumps {
            let start = Instant::now();
            let dump = handle.dump_on(*sockets)?;
            times.push(start.elapsed());
            ensure!(
                dump.len() == n,
                "dumped {} virtual servers, expected {n}",
                dump.len()
            );
            let dests: usize = dump.iter().map(|e| e.real_servers.len()).sum();
            ensure!(
                dests == n * usize::from(REAL_SERVERS),
                "dumped {dests} real servers"
            );
        }
    }
    Ok(dumps
        .into_iter()
        .map(|(sockets, mut times)| {
            times.sort();
            (sockets, times[times.len() / 2])
        })
        .collect())
}

/// N TCP virtual servers 10.96.x.y:80, rr, each with 10 masqueraded real servers.
fn table(n: usize) -> Result<Vec<Op>> {
    ensure!(n <= 65_536, "at most 65536 virtual servers");
    let mut ops = Vec::with_capacity(n * (1 + usize::from(REAL_SERVERS)));
    for i in 0..n {
        let [_, _, hi, lo] = u32::try_from(i)?.to_be_bytes();
        let key = ServiceKey::Addr {
            protocol: Protocol::Tcp,
            addr: SocketAddr::new(Ipv4Addr::new(10, 96, hi, lo).into(), 80),
        };
        ops.push(Op::AddService(VirtualServer::new(
            key,
            Scheduler::RoundRobin,
        )));
        for d in 0..REAL_SERVERS {
            let addr = SocketAddr::new(Ipv4Addr::new(10, 128 + d, hi, lo).into(), 8080);
            ops.push(Op::AddDest(key, RealServer::masquerade(addr)));
        }
    }
    Ok(ops)
}

/// Moves this thread, and every process it starts from now on, into a new network namespace
/// with `lo` up (the kernel refuses IPv4 real servers until there is a local routing table).
/// Each side of the comparison starts from an empty kernel: after a flush the kernel keeps the
/// deleted real servers in a trash list for up to two minutes and searches that list on every
/// real-server add, which slowed whichever side ran second several times over.
#[allow(unsafe_code, reason = "unshare(2) has no safe wrapper in std")]
fn fresh_netns() -> Result<()> {
    // SAFETY: unshare takes no pointers; it only changes this thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    let status = Command::new("/bin/ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    ensure!(status.success(), "ip link set lo up: {status}");
    Ok(())
}
