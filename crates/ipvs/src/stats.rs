//! Counters the kernel keeps per virtual and real server.

/// Traffic counters and rates, as `ipvsadm -Ln --stats` and `--rate` show them.
///
/// Read from the 64-bit attribute where the kernel sends it, else from the 32-bit one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stats {
    /// Connections scheduled.
    pub connections: u64,
    /// Packets in.
    pub packets_in: u64,
    /// Packets out.
    pub packets_out: u64,
    /// Bytes in.
    pub bytes_in: u64,
    /// Bytes out.
    pub bytes_out: u64,
    /// Connections per second.
    pub cps: u64,
    /// Packets per second in.
    pub pps_in: u64,
    /// Packets per second out.
    pub pps_out: u64,
    /// Bytes per second in.
    pub bps_in: u64,
    /// Bytes per second out.
    pub bps_out: u64,
}

/// Connection counts of one real server (`ipvsadm -Ln`, `--persistent-conn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Connections {
    /// Established connections.
    pub active: u32,
    /// Connections in other states (closing, waiting).
    pub inactive: u32,
    /// Persistence templates pointing at it.
    pub persistent: u32,
}
