//! Real servers (the kernel's "destinations"): where a virtual server forwards, and how.

use crate::service::ServiceKey;
use crate::stats::{Connections, Stats};
use std::fmt;
use std::net::SocketAddr;

/// A tunnel encapsulation (`ipvsadm --tun-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum TunnelType {
    /// IP in IP, the default.
    #[default]
    Ipip,
    /// Generic UDP encapsulation; needs a port.
    Gue,
    /// GRE.
    Gre,
}

impl TunnelType {
    pub(crate) fn number(self) -> u8 {
        match self {
            TunnelType::Ipip => 0,
            TunnelType::Gue => 1,
            TunnelType::Gre => 2,
        }
    }

    pub(crate) fn from_number(n: u8) -> Option<Self> {
        match n {
            0 => Some(TunnelType::Ipip),
            1 => Some(TunnelType::Gue),
            2 => Some(TunnelType::Gre),
            _ => None,
        }
    }

    /// The `--tun-type` word.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            TunnelType::Ipip => "ipip",
            TunnelType::Gue => "gue",
            TunnelType::Gre => "gre",
        }
    }
}

/// Tunnel checksums (`ipvsadm --tun-nocsum`, `--tun-csum`, `--tun-remcsum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum TunnelChecksum {
    /// No checksum, the default.
    #[default]
    None,
    /// A checksum.
    Checksum,
    /// Remote checksum offload (GUE only).
    Remote,
}

impl TunnelChecksum {
    pub(crate) fn bits(self) -> u16 {
        match self {
            TunnelChecksum::None => 0,
            TunnelChecksum::Checksum => 1,
            TunnelChecksum::Remote => 2,
        }
    }

    pub(crate) fn from_bits(bits: u16) -> Self {
        if bits & 2 != 0 {
            TunnelChecksum::Remote
        } else if bits & 1 != 0 {
            TunnelChecksum::Checksum
        } else {
            TunnelChecksum::None
        }
    }

    fn option(self) -> &'static str {
        match self {
            TunnelChecksum::None => "--tun-nocsum",
            TunnelChecksum::Checksum => "--tun-csum",
            TunnelChecksum::Remote => "--tun-remcsum",
        }
    }
}

/// How packets reach a tunnelled real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Tunnel {
    /// The encapsulation.
    pub kind: TunnelType,
    /// The GUE destination port (`--tun-port`); 0 otherwise.
    pub port: u16,
    /// Checksums for GUE and GRE.
    pub checksum: TunnelChecksum,
}

/// How the kernel forwards packets to a real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Forwarding {
    /// NAT (`ipvsadm -m`): what Kubernetes uses.
    Masquerade,
    /// The real server is a local address (the kernel sets this itself; printed as `-g`).
    Local,
    /// Encapsulation (`ipvsadm -i`).
    Tunnel(Tunnel),
    /// Direct routing (`ipvsadm -g`), `ipvsadm`'s default.
    DirectRoute,
}

impl Forwarding {
    pub(crate) fn number(self) -> u32 {
        match self {
            Forwarding::Masquerade => 0,
            Forwarding::Local => 1,
            Forwarding::Tunnel(_) => 2,
            Forwarding::DirectRoute => 3,
        }
    }

    /// The `ipvsadm` switch for it.
    #[must_use]
    pub fn ipvsadm_flag(self) -> &'static str {
        match self {
            Forwarding::Masquerade => "-m",
            Forwarding::Tunnel(_) => "-i",
            Forwarding::Local | Forwarding::DirectRoute => "-g",
        }
    }
}

/// A real server of a virtual server.
///
/// Prints as the `-r …` part of its `ipvsadm -Sn` line: `-r 10.244.1.5:8080 -m -w 1`; use
/// [`RealServer::line`] for the whole line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RealServer {
    /// Its address and port (`ipvsadm -r`).
    pub addr: SocketAddr,
    /// How packets get there.
    pub forwarding: Forwarding,
    /// Its share of new connections (`ipvsadm -w`); 0 takes no new connections.
    pub weight: u32,
    /// Stop sending new connections above this many (`ipvsadm -x`); 0 is no limit.
    pub upper_threshold: u32,
    /// Resume below this many (`ipvsadm -y`).
    pub lower_threshold: u32,
}

impl RealServer {
    /// A masqueraded real server of weight 1, the way kube-proxy makes them.
    #[must_use]
    pub fn masquerade(addr: SocketAddr) -> Self {
        RealServer {
            addr,
            forwarding: Forwarding::Masquerade,
            weight: 1,
            upper_threshold: 0,
            lower_threshold: 0,
        }
    }

    /// Its whole `ipvsadm -Sn` line in `service`: `-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1`.
    #[must_use]
    pub fn line<'a>(&'a self, service: &'a ServiceKey) -> impl fmt::Display + 'a {
        DestLine {
            cmd: "-a",
            service,
            dest: self,
        }
    }
}

pub(crate) struct DestLine<'a> {
    pub(crate) cmd: &'static str,
    pub(crate) service: &'a ServiceKey,
    pub(crate) dest: &'a RealServer,
}

impl fmt::Display for DestLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.cmd, self.service, self.dest)
    }
}

/// `ipvsadm -Sn` prints no thresholds; they are appended (`-x`, `-y`) only when set, which
/// `ipvsadm -R` reads back.
impl fmt::Display for RealServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "-r {} {} -w {}",
            self.addr,
            self.forwarding.ipvsadm_flag(),
            self.weight
        )?;
        if let Forwarding::Tunnel(t) = self.forwarding {
            write!(f, " --tun-type {}", t.kind.name())?;
            match t.kind {
                TunnelType::Ipip => {}
                TunnelType::Gue => write!(f, " --tun-port {} {}", t.port, t.checksum.option())?,
                TunnelType::Gre => write!(f, " {}", t.checksum.option())?,
            }
        }
        if self.upper_threshold != 0 {
            write!(f, " -x {}", self.upper_threshold)?;
        }
        if self.lower_threshold != 0 {
            write!(f, " -y {}", self.lower_threshold)?;
        }
        Ok(())
    }
}

/// A real server as read back from the kernel, with its connections and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealServerEntry {
    /// Its configuration.
    pub server: RealServer,
    /// Connections now (`ipvsadm -Ln`).
    pub connections: Connections,
    /// Traffic counters and rates.
    pub stats: Stats,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn prints_as_ipvsadm_save_lines() {
        let svc = ServiceKey::tcp(Ipv4Addr::new(10, 96, 0, 10).into(), 80);
        let rs = RealServer::masquerade("10.244.1.5:8080".parse().unwrap());
        assert_eq!(
            rs.line(&svc).to_string(),
            "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1"
        );

        let mut dr = RealServer::masquerade("[fd00::5]:80".parse().unwrap());
        dr.forwarding = Forwarding::DirectRoute;
        dr.weight = 0;
        dr.upper_threshold = 100;
        assert_eq!(dr.to_string(), "-r [fd00::5]:80 -g -w 0 -x 100");

        let mut gue = RealServer::masquerade("192.168.10.5:80".parse().unwrap());
        gue.forwarding = Forwarding::Tunnel(Tunnel {
            kind: TunnelType::Gue,
            port: 6079,
            checksum: TunnelChecksum::Remote,
        });
        assert_eq!(
            gue.to_string(),
            "-r 192.168.10.5:80 -i -w 1 --tun-type gue --tun-port 6079 --tun-remcsum"
        );
        gue.forwarding = Forwarding::Tunnel(Tunnel::default());
        assert_eq!(
            gue.to_string(),
            "-r 192.168.10.5:80 -i -w 1 --tun-type ipip"
        );
    }
}
