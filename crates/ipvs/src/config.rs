//! Global IPVS settings: connection timeouts and version information.

use std::time::Duration;

/// Connection timeouts in seconds (`ipvsadm --set tcp tcpfin udp`, `ipvsadm -L --timeout`).
///
/// When set, 0 leaves that timeout as it is, as with `ipvsadm --set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timeouts {
    /// Established TCP connections.
    pub tcp: u32,
    /// TCP connections after a FIN.
    pub tcp_fin: u32,
    /// UDP flows.
    pub udp: u32,
}

impl Timeouts {
    /// From durations (whole seconds, as the kernel keeps them; a longer one than fits is the
    /// longest the kernel takes): `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`,
    /// `--ipvs-udp-timeout`.
    #[must_use]
    pub fn from_durations(tcp: Duration, tcp_fin: Duration, udp: Duration) -> Timeouts {
        let seconds = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        Timeouts {
            tcp: seconds(tcp),
            tcp_fin: seconds(tcp_fin),
            udp: seconds(udp),
        }
    }

    /// Whether every timeout is 0, which leaves all as they are.
    #[must_use]
    pub fn is_unset(&self) -> bool {
        *self == Timeouts::default()
    }
}

/// What `ipvsadm` prints first: `IP Virtual Server version 1.2.1 (size=4096)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Info {
    /// The IPVS version code, e.g. 0x010201.
    pub version: u32,
    /// Buckets in the connection hash table.
    pub connection_table_size: u32,
}

impl Info {
    /// The version as `major.minor.patch`.
    #[must_use]
    pub fn version_string(&self) -> String {
        format!(
            "{}.{}.{}",
            (self.version >> 16) & 0xff,
            (self.version >> 8) & 0xff,
            self.version & 0xff
        )
    }
}

impl std::fmt::Display for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IP Virtual Server version {} (size={})",
            self.version_string(),
            self.connection_table_size
        )
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;

    #[test]
    fn timeouts_are_whole_seconds_and_zero_leaves_them() {
        let t = Timeouts::from_durations(
            Duration::from_millis(900_500),
            Duration::from_secs(120),
            Duration::from_secs(u64::MAX),
        );
        assert_eq!((t.tcp, t.tcp_fin, t.udp), (900, 120, u32::MAX));
        assert!(!t.is_unset());
        assert!(
            Timeouts::from_durations(Duration::ZERO, Duration::ZERO, Duration::ZERO).is_unset()
        );
    }
}
