//! The two words every backend shares: an address [`Family`] and a transport [`Protocol`].
//!
//! They are declared once, here, so that the model, IPVS and netfilter cannot disagree about
//! them; each backend adds only its own spelling (`ipvsadm -t`, `ip6tables`, `ipset inet6`).
//! Plain values, no I/O, no Kubernetes.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::IpAddr;

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`AF_INET`).
    V4,
    /// IPv6 (`AF_INET6`).
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of an address.
    #[must_use]
    pub fn of(addr: IpAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// The kernel's `AF_*` number.
    #[must_use]
    pub fn af(self) -> u16 {
        let af = match self {
            Family::V4 => libc::AF_INET,
            Family::V6 => libc::AF_INET6,
        };
        u16::try_from(af).expect("address families fit in u16")
    }

    /// The family of an `AF_*` number, if it is one of the two.
    #[must_use]
    pub fn from_af(af: u16) -> Option<Family> {
        match i32::from(af) {
            libc::AF_INET => Some(Family::V4),
            libc::AF_INET6 => Some(Family::V6),
            _ => None,
        }
    }

    /// Kubernetes' name for it (`v1.IPFamily`), as kube-proxy's `ip_family` metric label says it.
    #[must_use]
    pub fn kubernetes_name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The longest prefix: 32 or 128.
    #[must_use]
    pub fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// A transport protocol a Service port, a virtual server or a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl Protocol {
    /// Every protocol, in the order above.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The lowercase name `iptables -p`, `ipset` entries (`tcp:80`) and `/etc/protocols` use.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The protocol of a lowercase name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The IP protocol number (`IPPROTO_*`).
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol of an IP protocol number, if it is one of the three.
    #[must_use]
    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }
}

impl fmt::Display for Protocol {
    /// The lowercase name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_round_trip_through_their_names_and_numbers() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_name(p.name()), Some(p));
            assert_eq!(Protocol::from_number(p.number()), Some(p));
        }
        assert_eq!(Protocol::from_name("TCP"), None);
        assert_eq!(Protocol::from_number(1), None);
    }

    #[test]
    fn families_round_trip_through_af_numbers() {
        for f in Family::ALL {
            assert_eq!(Family::from_af(f.af()), Some(f));
        }
        assert_eq!(Family::of("fd00::1".parse().unwrap()), Family::V6);
        assert_eq!(Family::V4.af(), 2);
        assert_eq!(Family::V6.af(), 10);
    }
}
