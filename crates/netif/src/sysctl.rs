//! The kernel's network settings under `/proc/sys` (`sysctl -w net.ipv4.ip_forward=1`), set
//! the way kube-proxy sets them: written only when they differ, a refusal logged, not fatal.

use std::fs;
use std::time::Duration;

/// Sets `/proc/sys/<path>` to `value` unless it holds that already (`sysctl -w`).
pub fn ensure(path: &str, value: &str) {
    let file = format!("/proc/sys/{path}");
    match fs::read_to_string(&file) {
        Ok(current) if current.trim() == value => {}
        _ => match fs::write(&file, value) {
            Ok(()) => tracing::info!(sysctl = path, value, "set"),
            Err(e) => tracing::warn!(sysctl = path, value, error = %e, "cannot set"),
        },
    }
}

/// The kernel's release as (major, minor), from `/proc/sys/kernel/osrelease` (`uname -r`).
#[must_use]
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The sysctls kube-proxy's ipvs mode sets (`arp_ignore`/`arp_announce` with strict ARP).
pub fn ipvs_mode(strict_arp: bool) {
    // Let IPVS see conntrack, so iptables' NAT and masquerading apply to its traffic.
    ensure("net/ipv4/vs/conntrack", "1");
    // Drop connections to deleted real servers at once instead of black-holing them.
    ensure("net/ipv4/vs/expire_nodest_conn", "1");
    ensure("net/ipv4/vs/expire_quiescent_template", "1");
    ensure("net/ipv4/ip_forward", "1");
    // Older kernels delay reused connections by a second with conn_reuse_mode=1.
    if kernel_version().is_some_and(|v| v < (5, 9)) {
        ensure("net/ipv4/vs/conn_reuse_mode", "0");
    }
    if strict_arp {
        ensure("net/ipv4/conf/all/arp_ignore", "1");
        ensure("net/ipv4/conf/all/arp_announce", "2");
    }
}

/// The sysctls kube-proxy's iptables mode sets: `route_localnet` too when NodePorts answer on
/// 127.0.0.0/8 (`--iptables-localhost-nodeports` with every address serving NodePorts).
pub fn iptables_mode(localhost_node_ports: bool) {
    ensure("net/ipv4/ip_forward", "1");
    if localhost_node_ports {
        tracing::info!(
            "setting route_localnet=1 to allow NodePorts on localhost; to change this disable \
             iptables.localhostNodePorts (--iptables-localhost-nodeports) or set \
             nodePortAddresses (--nodeport-addresses) to filter loopback addresses"
        );
        ensure("net/ipv4/conf/all/route_localnet", "1");
    }
}

/// kube-proxy's conntrack settings (`KubeProxyConntrackConfiguration`); a zero leaves the
/// kernel's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(
    clippy::struct_field_names,
    reason = "kube-proxy's field names, so operators recognise them"
)]
pub struct Conntrack {
    pub max_per_core: u32,
    pub min: u32,
    pub tcp_established_timeout: Duration,
    pub tcp_close_wait_timeout: Duration,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Duration,
    pub udp_stream_timeout: Duration,
}

impl Conntrack {
    /// `nf_conntrack_max` for a node with `cpus` CPUs: `max_per_core` × CPUs, at least `min`;
    /// `None` when `max_per_core` is 0 (leave the kernel's limit).
    #[must_use]
    pub fn max(&self, cpus: u32) -> Option<u32> {
        (self.max_per_core > 0).then(|| self.max_per_core.saturating_mul(cpus).max(self.min))
    }

    /// Sets the conntrack table size, its hash size and the timeouts, as kube-proxy does at
    /// start (`sysctl -w net.netfilter.nf_conntrack_max=…`). Refusals are logged, not fatal.
    pub fn apply(&self) {
        if let Some(max) = self.max(cpus_allowed()) {
            ensure("net/netfilter/nf_conntrack_max", &max.to_string());
            // The hash table is sized for 4 entries a bucket; it can only be set from the host's
            // initial network namespace, and never needs shrinking.
            let hashsize = "/sys/module/nf_conntrack/parameters/hashsize";
            let current: Option<u32> = fs::read_to_string(hashsize)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if current.is_none_or(|c| c < max / 4) {
                let size = max / 4;
                match fs::write(hashsize, size.to_string()) {
                    Ok(()) => tracing::info!(hashsize = size, "set conntrack hashsize"),
                    Err(e) => tracing::warn!(hashsize = size, error = %e, "cannot set hashsize"),
                }
            }
        }
        for (path, timeout) in [
            (
                "net/netfilter/nf_conntrack_tcp_timeout_established",
                self.tcp_established_timeout,
            ),
            (
                "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
                self.tcp_close_wait_timeout,
            ),
            ("net/netfilter/nf_conntrack_udp_timeout", self.udp_timeout),
            (
                "net/netfilter/nf_conntrack_udp_timeout_stream",
                self.udp_stream_timeout,
            ),
        ] {
            if !timeout.is_zero() {
                ensure(path, &timeout.as_secs().to_string());
            }
        }
        if self.tcp_be_liberal {
            ensure("net/netfilter/nf_conntrack_tcp_be_liberal", "1");
        }
    }
}

/// The CPUs this process may run on (Go's `runtime.NumCPU`, which kube-proxy multiplies by),
/// from `Cpus_allowed_list` in `/proc/self/status`.
fn cpus_allowed() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_default();
    let count = count_cpu_list(list.trim());
    if count > 0 {
        count
    } else {
        std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
    }
}

/// Counts a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> u32 {
    list.split(',')
        .filter_map(|range| match range.split_once('-') {
            Some((a, b)) => Some(b.trim().parse::<u32>().ok()? + 1 - a.trim().parse::<u32>().ok()?),
            None => range.trim().parse::<u32>().ok().map(|_| 1),
        })
        .sum()
}

/// Sets this process's `/proc/self/oom_score_adj` (kube-proxy's `--oom-score-adj`).
pub fn oom_score_adj(value: i32) {
    let file = "/proc/self/oom_score_adj";
    match fs::read_to_string(file) {
        Ok(current) if current.trim() == value.to_string() => {}
        _ => match fs::write(file, value.to_string()) {
            Ok(()) => tracing::info!(oom_score_adj = value, "set"),
            Err(e) => tracing::warn!(oom_score_adj = value, error = %e, "cannot set"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_max_is_per_core_times_cpus_but_at_least_min_and_zero_leaves_it() {
        let ct = |max_per_core, min| Conntrack {
            max_per_core,
            min,
            ..Conntrack::default()
        };
        for (max_per_core, min, cpus, want) in [
            (32768, 131_072, 2, Some(131_072)),
            (32768, 131_072, 8, Some(262_144)),
            (32768, 0, 1, Some(32768)),
            (0, 131_072, 8, None),
        ] {
            assert_eq!(
                ct(max_per_core, min).max(cpus),
                want,
                "{max_per_core} {min} {cpus}"
            );
        }
    }

    #[test]
    fn cpu_lists_count_as_the_kernel_writes_them() {
        for (list, want) in [("0-3", 4), ("0", 1), ("0-3,8,10-11", 7), ("", 0)] {
            assert_eq!(count_cpu_list(list), want, "{list:?}");
        }
    }
}
