//! The Prometheus process collector's metrics, as client_golang exports them for kube-proxy:
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`. Read from `/proc/self` at each scrape, from the same files and
//! with the same arithmetic as Go's procfs: CPU ticks and the start time are in `USER_HZ`, which
//! Linux fixes at 100 for user space; the start time is the kernel's boot time (`btime` of
//! `/proc/stat`) plus the process's start in ticks since boot.

use std::io;
use std::path::Path;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second in `/proc` (Linux's `USER_HZ`, 100 on every architecture).
const USER_HZ: f64 = 100.0;

/// One reading of the process's own figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time.
    pub cpu: Duration,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub open_fds: u64,
    /// The soft limit on open files (`ulimit -n`); `u64::MAX` when unlimited.
    pub max_fds: u64,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// This process's figures, from `/proc`.
    pub fn read_self() -> io::Result<ProcessStats> {
        Self::read(Path::new("/proc"))
    }

    /// The figures of `proc/self` under a `/proc` mount at `proc`.
    // Tick counts and times stay far below 2^52, where f64 starts losing precision.
    #[allow(clippy::cast_precision_loss)]
    pub fn read(proc: &Path) -> io::Result<ProcessStats> {
        let me = proc.join("self");
        let stat = Stat::parse(&std::fs::read_to_string(me.join("stat"))?)?;
        let resident_kib = status_kib(&std::fs::read_to_string(me.join("status"))?, "VmRSS:")?;
        let boot = boot_time(&std::fs::read_to_string(proc.join("stat"))?)?;
        let max_fds = max_open_files(&std::fs::read_to_string(me.join("limits"))?)?;
        let open_fds = std::fs::read_dir(me.join("fd"))?.count() as u64;
        Ok(ProcessStats {
            cpu: Duration::from_secs_f64((stat.utime + stat.stime) as f64 / USER_HZ),
            resident_memory_bytes: resident_kib * 1024,
            virtual_memory_bytes: stat.vsize,
            open_fds,
            max_fds,
            start_time_seconds: boot as f64 + stat.starttime as f64 / USER_HZ,
        })
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("/proc: cannot read {what}"),
    )
}

/// The fields of `/proc/<pid>/stat` the collector needs (proc(5)).
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
}

impl Stat {
    fn parse(text: &str) -> io::Result<Stat> {
        // The command name (field 2) is in parentheses and may hold spaces and ')': the
        // fields that follow start after the last ')', with the state (field 3).
        let rest = text.rsplit_once(')').ok_or_else(|| invalid("stat"))?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> io::Result<u64> {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| invalid("stat"))
        };
        Ok(Stat {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
            vsize: field(23)?,
        })
    }
}

/// A `kB` line of `/proc/<pid>/status`, e.g. `VmRSS:     1234 kB`.
fn status_kib(text: &str, key: &str) -> io::Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| invalid(key))
}

/// `btime` of `/proc/stat`: when the kernel booted, in seconds since the epoch.
fn boot_time(text: &str) -> io::Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| invalid("btime"))
}

/// The soft limit of `Max open files` in `/proc/<pid>/limits`.
fn max_open_files(text: &str) -> io::Result<u64> {
    let soft = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| invalid("Max open files"))?;
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse().map_err(|_| invalid("Max open files"))
}

/// Encodes the process's figures at each scrape. A scrape where `/proc` cannot be read omits
/// them (and logs why), as client_golang's collector does, instead of failing the scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = match ProcessStats::read_self() {
            Ok(stats) => stats,
            Err(e) => {
                tracing::debug!("process metrics not collected: {e}");
                return Ok(());
            }
        };
        let cpu = ConstCounter::new(stats.cpu.as_secs_f64());
        let help = "Total user and system CPU time spent in seconds.";
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            help,
            None,
            cpu.metric_type(),
        )?)?;
        // Precision beyond 2^53 does not matter for these gauges.
        #[allow(clippy::cast_precision_loss)]
        let gauges = [
            (
                "process_open_fds",
                "Number of open file descriptors.",
                stats.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                stats.max_fds as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stats.virtual_memory_bytes as f64,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                stats.resident_memory_bytes as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                stats.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (ipvs (proxy) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 \
                    8 0 123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1";
        assert_eq!(
            Stat::parse(line).unwrap(),
            Stat {
                utime: 250,
                stime: 75,
                starttime: 123_456,
                vsize: 987_654_321,
            }
        );
        assert!(Stat::parse("4242 (truncated) S 1").is_err());
    }

    #[test]
    fn limits_status_and_btime_are_read_as_proc_5_writes_them() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63448                63448                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits).unwrap(), 1024);
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_open_files(unlimited).unwrap(), u64::MAX);
        let status = "Name:\tipvs-proxy\nVmSize:\t  123 kB\nVmRSS:\t    5120 kB\n";
        assert_eq!(status_kib(status, "VmRSS:").unwrap(), 5120);
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\n").unwrap(),
            1_700_000_000
        );
        assert!(boot_time("cpu 1 2 3\n").is_err());
    }

    #[test]
    fn this_process_reads_back_plausible_figures() {
        let stats = ProcessStats::read_self().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(stats.resident_memory_bytes > 0, "{stats:?}");
        assert!(
            stats.virtual_memory_bytes >= stats.resident_memory_bytes,
            "{stats:?}"
        );
        assert!(
            stats.open_fds > 0 && stats.open_fds <= stats.max_fds,
            "{stats:?}"
        );
        // Started within the last day and not in the future (btime is whole seconds: allow one).
        assert!(stats.start_time_seconds <= now + 1.0, "{stats:?}");
        assert!(stats.start_time_seconds > now - 86_400.0, "{stats:?}");
    }
}
