//! Virtual servers (the kernel's "services"): what identifies one, how it schedules, and how
//! each prints as its `ipvsadm -Sn` line.

use crate::Scheduler;
use crate::stats::Stats;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

pub use inet::{Family, Protocol};

/// The `ipvsadm` option that names a service of `protocol`.
pub(crate) fn ipvsadm_flag(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "-t",
        Protocol::Udp => "-u",
        Protocol::Sctp => "--sctp-service",
    }
}

/// What identifies a virtual server in the kernel: hashable, so a mirror can key on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    /// A protocol, address and port (`-t 10.96.0.10:80`, `-u [fd00::a]:53`).
    Addr {
        /// TCP, UDP or SCTP.
        protocol: Protocol,
        /// The virtual address and port.
        addr: SocketAddr,
    },
    /// A firewall mark set by netfilter (`-f 42`, `-f 42 -6`).
    Fwmark {
        /// The family of the packets it takes.
        family: Family,
        /// The mark.
        mark: u32,
    },
}

impl ServiceKey {
    /// A TCP virtual server.
    #[must_use]
    pub fn tcp(ip: IpAddr, port: u16) -> Self {
        ServiceKey::Addr {
            protocol: Protocol::Tcp,
            addr: SocketAddr::new(ip, port),
        }
    }

    /// A UDP virtual server.
    #[must_use]
    pub fn udp(ip: IpAddr, port: u16) -> Self {
        ServiceKey::Addr {
            protocol: Protocol::Udp,
            addr: SocketAddr::new(ip, port),
        }
    }

    /// Its address family.
    #[must_use]
    pub fn family(&self) -> Family {
        match self {
            ServiceKey::Addr { addr, .. } => Family::of(addr.ip()),
            ServiceKey::Fwmark { family, .. } => *family,
        }
    }

    /// The virtual port, 0 for firewall-mark services.
    #[must_use]
    pub fn port(&self) -> u16 {
        match self {
            ServiceKey::Addr { addr, .. } => addr.port(),
            ServiceKey::Fwmark { .. } => 0,
        }
    }
}

/// Prints as `ipvsadm -Sn` names a service: `-t 10.96.0.10:80`, `-u [fd00::a]:53`, `-f 42 -6`.
impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceKey::Addr { protocol, addr } => write!(f, "{} {addr}", ipvsadm_flag(*protocol)),
            ServiceKey::Fwmark {
                family: Family::V4,
                mark,
            } => write!(f, "-f {mark}"),
            ServiceKey::Fwmark {
                family: Family::V6,
                mark,
            } => write!(f, "-f {mark} -6"),
        }
    }
}

/// Service flags other than persistence (which is [`VirtualServer::persistence`]) and the
/// kernel's own HASHED bit (never compared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ServiceFlags(u32);

impl ServiceFlags {
    pub(crate) const PERSISTENT: u32 = 0x1;
    pub(crate) const HASHED: u32 = 0x2;
    /// One-packet scheduling, for UDP (`ipvsadm -o`).
    pub const ONE_PACKET: ServiceFlags = ServiceFlags(0x4);
    /// Scheduler flag 1: `sh-fallback` / `mh-fallback` (`ipvsadm -b`).
    pub const SCHED1: ServiceFlags = ServiceFlags(0x8);
    /// Scheduler flag 2: `sh-port` / `mh-port` (`ipvsadm -b`).
    pub const SCHED2: ServiceFlags = ServiceFlags(0x10);
    /// Scheduler flag 3 (`ipvsadm -b flag-3`).
    pub const SCHED3: ServiceFlags = ServiceFlags(0x20);
    /// The sh and mh schedulers' fallback: skip real servers of weight 0.
    pub const SH_FALLBACK: ServiceFlags = ServiceFlags::SCHED1;
    /// The sh and mh schedulers' port flag: hash the source port too.
    pub const SH_PORT: ServiceFlags = ServiceFlags::SCHED2;
    const KNOWN: u32 = 0x4 | 0x8 | 0x10 | 0x20;

    /// No flags.
    #[must_use]
    pub const fn empty() -> Self {
        ServiceFlags(0)
    }

    /// The raw bits (never PERSISTENT or HASHED).
    #[must_use]
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Keeps only the bits this type models.
    #[must_use]
    pub const fn from_bits_truncate(bits: u32) -> Self {
        ServiceFlags(bits & Self::KNOWN)
    }

    /// Whether every bit of `other` is set.
    #[must_use]
    pub const fn contains(self, other: ServiceFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no bit is set.
    #[must_use]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for ServiceFlags {
    type Output = ServiceFlags;
    fn bitor(self, rhs: ServiceFlags) -> ServiceFlags {
        ServiceFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for ServiceFlags {
    fn bitor_assign(&mut self, rhs: ServiceFlags) {
        self.0 |= rhs.0;
    }
}

/// Session affinity: connections from one client (network) go to the same real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Persistence {
    /// Seconds a client stays on its real server after its last connection (`ipvsadm -p`).
    pub timeout: u32,
    /// Clients are grouped by this prefix of their address (`ipvsadm -M`): 32 or 128 is one
    /// client per address.
    pub prefix_len: u8,
}

/// A virtual server: where clients connect and how the kernel picks a real server.
///
/// Prints as its `ipvsadm -Sn` line: `-A -t 10.96.0.10:80 -s rr -p 10800`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VirtualServer {
    /// What identifies it.
    pub key: ServiceKey,
    /// The scheduling algorithm (`ipvsadm -s`).
    pub scheduler: Scheduler,
    /// Session affinity (`ipvsadm -p`, `-M`), if any.
    pub persistence: Option<Persistence>,
    /// One-packet scheduling and scheduler flags (`ipvsadm -o`, `-b`).
    pub flags: ServiceFlags,
    /// A persistence engine such as `sip` (`ipvsadm --pe`).
    pub persistence_engine: Option<String>,
}

impl VirtualServer {
    /// A virtual server with no persistence and no flags.
    #[must_use]
    pub fn new(key: ServiceKey, scheduler: Scheduler) -> Self {
        VirtualServer {
            key,
            scheduler,
            persistence: None,
            flags: ServiceFlags::empty(),
            persistence_engine: None,
        }
    }

    /// The same with session affinity for `timeout` seconds, one client per address.
    #[must_use]
    pub fn with_persistence(mut self, timeout: u32) -> Self {
        self.persistence = Some(Persistence {
            timeout,
            prefix_len: self.key.family().max_prefix(),
        });
        self
    }
}

/// The `-b` word for each scheduler flag, as `ipvsadm` names it for this scheduler.
pub(crate) fn sched_flag_names(scheduler: Scheduler) -> [&'static str; 3] {
    match scheduler {
        Scheduler::SourceHashing => ["sh-fallback", "sh-port", "flag-3"],
        Scheduler::Maglev => ["mh-fallback", "mh-port", "flag-3"],
        _ => ["flag-1", "flag-2", "flag-3"],
    }
}

/// The service part after `-A <key>`, in `ipvsadm -Sn`'s order:
/// `-s sh -p 300 -M 255.255.255.0 --pe sip -o -b sh-port`.
pub(crate) struct ServiceOptions<'a>(pub(crate) &'a VirtualServer);

impl fmt::Display for ServiceOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vs = self.0;
        write!(f, "-s {}", vs.scheduler)?;
        if let Some(p) = vs.persistence {
            write!(f, " -p {}", p.timeout)?;
            let family = vs.key.family();
            if p.prefix_len < family.max_prefix() {
                match family {
                    Family::V4 => write!(
                        f,
                        " -M {}",
                        std::net::Ipv4Addr::from(prefix_to_mask(p.prefix_len))
                    )?,
                    Family::V6 => write!(f, " -M {}", p.prefix_len)?,
                }
            }
        }
        if let Some(pe) = &vs.persistence_engine {
            write!(f, " --pe {pe}")?;
        }
        if vs.flags.contains(ServiceFlags::ONE_PACKET) {
            f.write_str(" -o")?;
        }
        let sched_bits = [
            ServiceFlags::SCHED1,
            ServiceFlags::SCHED2,
            ServiceFlags::SCHED3,
        ];
        if sched_bits.iter().any(|b| vs.flags.contains(*b)) {
            f.write_str(" -b ")?;
            let names = sched_flag_names(vs.scheduler);
            let mut first = true;
            for (bit, name) in sched_bits.iter().zip(names) {
                if vs.flags.contains(*bit) {
                    if !first {
                        f.write_str(",")?;
                    }
                    f.write_str(name)?;
                    first = false;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for VirtualServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.key, ServiceOptions(self))
    }
}

/// An IPv4 netmask (host order) from a prefix length.
pub(crate) fn prefix_to_mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n if n >= 32 => u32::MAX,
        n => u32::MAX << (32 - u32::from(n)),
    }
}

/// A virtual server as read back from the kernel, with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServerEntry {
    /// Its configuration.
    pub server: VirtualServer,
    /// Traffic counters and rates (`ipvsadm -Ln --stats`, `--rate`).
    pub stats: Stats,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn prints_as_ipvsadm_save_lines() {
        let key = ServiceKey::tcp(Ipv4Addr::new(10, 96, 0, 10).into(), 80);
        let vs = VirtualServer::new(key, Scheduler::RoundRobin).with_persistence(10800);
        assert_eq!(vs.to_string(), "-A -t 10.96.0.10:80 -s rr -p 10800");

        let mut sh = VirtualServer::new(
            ServiceKey::tcp("fd00::10".parse().unwrap(), 443),
            Scheduler::SourceHashing,
        );
        sh.flags = ServiceFlags::SH_PORT;
        assert_eq!(sh.to_string(), "-A -t [fd00::10]:443 -s sh -b sh-port");
        sh.flags |= ServiceFlags::SH_FALLBACK;
        assert_eq!(
            sh.to_string(),
            "-A -t [fd00::10]:443 -s sh -b sh-fallback,sh-port"
        );

        let fw = VirtualServer::new(
            ServiceKey::Fwmark {
                family: Family::V4,
                mark: 42,
            },
            Scheduler::RoundRobin,
        );
        assert_eq!(fw.to_string(), "-A -f 42 -s rr");
        let fw6 = VirtualServer::new(
            ServiceKey::Fwmark {
                family: Family::V6,
                mark: 42,
            },
            Scheduler::WeightedLeastConnection,
        );
        assert_eq!(fw6.to_string(), "-A -f 42 -6 -s wlc");

        let mut udp = VirtualServer::new(
            ServiceKey::udp(Ipv4Addr::new(10, 96, 0, 53).into(), 53),
            Scheduler::RoundRobin,
        );
        udp.persistence = Some(Persistence {
            timeout: 300,
            prefix_len: 24,
        });
        udp.flags = ServiceFlags::ONE_PACKET;
        assert_eq!(
            udp.to_string(),
            "-A -u 10.96.0.53:53 -s rr -p 300 -M 255.255.255.0 -o"
        );
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_to_mask(0), 0);
        assert_eq!(prefix_to_mask(24), 0xffff_ff00);
        assert_eq!(prefix_to_mask(32), u32::MAX);
    }
}
