//! Global IPVS settings: connection timeouts and version information.

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
