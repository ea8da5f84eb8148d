//! IPVS virtual and real servers as the plan wants them, printed as `ipvsadm -Sn` prints them.
//!
//! Plan-side types: plain values, ordered so a plan sorts the same way every time. The sync
//! engine maps them onto the `ipvs` crate's netlink types.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::model::{Protocol, Scheduler};

/// `IP_VS_SVC_F_PERSISTENT`: ClientIP session affinity.
pub const FLAG_PERSISTENT: u32 = 0x1;
/// `IP_VS_SVC_F_SCHED2` (`mh-port` / `sh-port`): hash on source port too; kube-proxy sets it for
/// the `mh` scheduler.
pub const FLAG_SOURCE_HASH: u32 = 0x10;

/// Identifies a virtual server as the kernel does: (address, protocol, port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VirtualServerKey {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl VirtualServerKey {
    /// `-t 10.96.0.10:80`, `-u [fd00::10]:53`, `--sctp-service 10.96.0.11:9`.
    fn ipvsadm_service(&self) -> String {
        let flag = match self.protocol {
            Protocol::Tcp => "-t",
            Protocol::Udp => "-u",
            Protocol::Sctp => "--sctp-service",
        };
        format!("{flag} {}", SocketAddr::new(self.address, self.port))
    }
}

/// One IPVS virtual server (`ipvsadm -A`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VirtualServer {
    pub key: VirtualServerKey,
    pub scheduler: Scheduler,
    /// `IP_VS_SVC_F_*` flags (persistent, scheduler flags), never `HASHED`.
    pub flags: u32,
    /// Persistence timeout in seconds (`-p`); 0 when not persistent.
    pub timeout: u32,
}

impl VirtualServer {
    /// Whether ClientIP affinity is on.
    #[must_use]
    pub fn persistent(&self) -> bool {
        self.flags & FLAG_PERSISTENT != 0
    }

    /// The netmask the kernel wants for persistence granularity: a single client address.
    #[must_use]
    pub fn netmask(&self) -> u32 {
        if self.key.address.is_ipv4() {
            0xffff_ffff
        } else {
            128
        }
    }
}

impl VirtualServer {
    /// The `ipvs` crate's value for this virtual server, ready for netlink.
    #[must_use]
    pub fn to_ipvs(&self) -> ipvs::VirtualServer {
        let key = ipvs::ServiceKey::Addr {
            protocol: self.key.protocol,
            addr: SocketAddr::new(self.key.address, self.key.port),
        };
        let mut vs = ipvs::VirtualServer::new(key, self.scheduler);
        if self.persistent() {
            vs = vs.with_persistence(self.timeout);
        }
        vs.flags = ipvs::ServiceFlags::from_bits_truncate(self.flags);
        vs
    }
}

impl fmt::Display for VirtualServer {
    /// The `ipvsadm -Sn` line: `-A -t 10.96.0.10:80 -s rr -p 10800`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} -s {}", self.key.ipvsadm_service(), self.scheduler)?;
        if self.persistent() {
            write!(f, " -p {}", self.timeout)?;
        }
        let sched_flags = self.flags & !FLAG_PERSISTENT & !0x2;
        if sched_flags != 0 {
            let prefix = match self.scheduler {
                Scheduler::SourceHashing => "sh",
                _ => "mh",
            };
            let mut names = Vec::new();
            if sched_flags & 0x08 != 0 {
                names.push(format!("{prefix}-fallback"));
            }
            if sched_flags & FLAG_SOURCE_HASH != 0 {
                names.push(format!("{prefix}-port"));
            }
            if !names.is_empty() {
                write!(f, " -b {}", names.join(","))?;
            }
        }
        Ok(())
    }
}

/// One real server (destination) of a virtual server: always masquerading (NAT), as
/// kube-proxy programs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RealServer {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
}

impl RealServer {
    /// The `ipvs` crate's value: a masqueraded destination of this weight.
    #[must_use]
    pub fn to_ipvs(&self) -> ipvs::RealServer {
        let mut rs = ipvs::RealServer::masquerade(SocketAddr::new(self.address, self.port));
        rs.weight = self.weight;
        rs
    }

    /// The `ipvsadm -Sn` line under `vs`: `-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1`.
    #[must_use]
    pub fn ipvsadm_line(&self, vs: &VirtualServerKey) -> String {
        format!(
            "-a {} -r {} -m -w {}",
            vs.ipvsadm_service(),
            SocketAddr::new(self.address, self.port),
            self.weight
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(
        addr: &str,
        proto: Protocol,
        sched: Scheduler,
        flags: u32,
        timeout: u32,
    ) -> VirtualServer {
        VirtualServer {
            key: VirtualServerKey {
                address: addr.parse().unwrap(),
                port: 80,
                protocol: proto,
            },
            scheduler: sched,
            flags,
            timeout,
        }
    }

    #[test]
    fn virtual_servers_print_as_ipvsadm_save() {
        for (v, want) in [
            (
                vs("10.96.0.10", Protocol::Tcp, Scheduler::RoundRobin, 0, 0),
                "-A -t 10.96.0.10:80 -s rr",
            ),
            (
                vs("fd00::10", Protocol::Udp, Scheduler::LeastConnection, 0, 0),
                "-A -u [fd00::10]:80 -s lc",
            ),
            (
                vs(
                    "10.96.0.11",
                    Protocol::Sctp,
                    Scheduler::RoundRobin,
                    FLAG_PERSISTENT,
                    10800,
                ),
                "-A --sctp-service 10.96.0.11:80 -s rr -p 10800",
            ),
            (
                vs(
                    "10.96.0.12",
                    Protocol::Tcp,
                    Scheduler::Maglev,
                    FLAG_SOURCE_HASH,
                    0,
                ),
                "-A -t 10.96.0.12:80 -s mh -b mh-port",
            ),
        ] {
            assert_eq!(v.to_string(), want);
            // The ipvs crate prints the value it would program the same way.
            assert_eq!(v.to_ipvs().to_string(), want);
        }
    }

    #[test]
    fn real_servers_print_as_ipvsadm_save() {
        let key = vs("10.96.0.10", Protocol::Tcp, Scheduler::RoundRobin, 0, 0).key;
        let rs = RealServer {
            address: "10.244.1.5".parse().unwrap(),
            port: 8080,
            weight: 1,
        };
        assert_eq!(
            rs.ipvsadm_line(&key),
            "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1"
        );
    }
}
