//! What the engine believes the kernel holds.

use std::net::{IpAddr, SocketAddr};

use ipvs::{Forwarding, RealServer, ServiceKey, VirtualServer};

use super::kernel::NetfilterEntry;
use crate::model::ServiceName;

/// What a Service holds in the kernel, by identity only: its real servers live in the
/// kernel mirror, not twice.
#[derive(Debug, Clone, Default)]
pub(super) struct Footprint {
    pub(super) keys: Vec<ServiceKey>,
    pub(super) addresses: Vec<IpAddr>,
    pub(super) netfilter: Vec<NetfilterEntry>,
}

#[derive(Debug, Clone)]
pub(super) struct KernelVs {
    pub(super) server: VirtualServer,
    pub(super) real: RealSet,
    /// The Service that claims it; `None` while only a read of the kernel has it (until a full
    /// sync's Service claims it, or finds it orphaned). Kept here, not in a map of its own: a
    /// Service's diff finds a virtual server and its owner in one lookup, and the map's
    /// 110,000 keys at 10,000 Services are not held twice.
    pub(super) owner: Option<ServiceName>,
    /// In the owner's first virtual server (by the target's order), a hash of the owner's
    /// footprint (its keys, addresses and set entries), so that a change that leaves them as
    /// they were (an endpoint's) is told from the slot it looks up anyway, without the
    /// footprint's; its lowest bit says whether every key is the owner's (none was another's
    /// when it was last synced). 0 in every other virtual server. See `diff`.
    pub(super) fingerprint: u64,
}

impl KernelVs {
    /// A virtual server as a read of the kernel found it: no Service's yet.
    pub(super) fn read(server: VirtualServer, real: RealSet) -> KernelVs {
        KernelVs {
            server,
            real,
            owner: None,
            fingerprint: 0,
        }
    }
}

/// A virtual server's real servers, each vector sorted by address: a tenth of a hash map's
/// memory for the handful a Service has, and the mirror holds one per virtual server of the
/// node (100,000 real servers at 10,000 Services).
#[derive(Debug, Clone, Default)]
pub(super) struct RealSet {
    /// Masqueraded and without thresholds, as the proxy plans every real server: 24 bytes
    /// each instead of a [`RealServer`]'s 48 (its `SocketAddr` alone takes 32).
    plain: Vec<Plain>,
    /// Any other (adopted from the kernel: a previous run's, or changed by hand).
    other: Vec<RealServer>,
}

/// A masqueraded real server without thresholds.
#[derive(Debug, Clone, Copy)]
struct Plain {
    ip: IpAddr,
    port: u16,
    weight: u32,
}

impl Plain {
    fn of(rs: &RealServer) -> Option<Plain> {
        let plain = rs.forwarding == Forwarding::Masquerade
            && rs.upper_threshold == 0
            && rs.lower_threshold == 0;
        plain.then_some(Plain {
            ip: rs.addr.ip(),
            port: rs.addr.port(),
            weight: rs.weight,
        })
    }

    fn addr(self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    fn server(self) -> RealServer {
        RealServer {
            weight: self.weight,
            ..RealServer::masquerade(self.addr())
        }
    }
}

impl RealSet {
    fn find_plain(&self, addr: &SocketAddr) -> Result<usize, usize> {
        self.plain.binary_search_by(|p| p.addr().cmp(addr))
    }

    fn find_other(&self, addr: &SocketAddr) -> Result<usize, usize> {
        self.other.binary_search_by(|r| r.addr.cmp(addr))
    }

    pub(super) fn get(&self, addr: &SocketAddr) -> Option<RealServer> {
        if let Ok(i) = self.find_plain(addr) {
            return Some(self.plain[i].server());
        }
        self.find_other(addr).ok().map(|i| self.other[i])
    }

    /// Adds or replaces `rs`; says whether it was new.
    pub(super) fn insert(&mut self, rs: RealServer) -> bool {
        let new = self.remove(&rs.addr).is_none();
        if let Some(plain) = Plain::of(&rs) {
            let i = self.find_plain(&rs.addr).unwrap_err();
            self.plain.insert(i, plain);
        } else {
            let i = self.find_other(&rs.addr).unwrap_err();
            self.other.insert(i, rs);
        }
        new
    }

    pub(super) fn remove(&mut self, addr: &SocketAddr) -> Option<RealServer> {
        if let Ok(i) = self.find_plain(addr) {
            return Some(self.plain.remove(i).server());
        }
        self.find_other(addr).ok().map(|i| self.other.remove(i))
    }

    pub(super) fn len(&self) -> usize {
        self.plain.len() + self.other.len()
    }

    /// Room for `n` more without growing past them (a new virtual server's first fill).
    pub(super) fn reserve_exact(&mut self, n: usize) {
        self.plain.reserve_exact(n);
    }

    pub(super) fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let plain = self.plain.iter().map(|p| p.addr());
        plain.chain(self.other.iter().map(|r| r.addr))
    }
}

impl FromIterator<RealServer> for RealSet {
    fn from_iter<T: IntoIterator<Item = RealServer>>(iter: T) -> Self {
        let mut set = RealSet::default();
        for rs in iter {
            match Plain::of(&rs) {
                Some(plain) => set.plain.push(plain),
                None => set.other.push(rs),
            }
        }
        set.plain.sort_by_key(|p| p.addr());
        set.plain.dedup_by_key(|p| p.addr());
        set.plain.shrink_to_fit();
        set.other.sort_by_key(|r| r.addr);
        set.other.dedup_by_key(|r| r.addr);
        set.other.shrink_to_fit();
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(addr: &str) -> RealServer {
        RealServer::masquerade(addr.parse().unwrap())
    }

    #[test]
    fn every_real_server_reads_back_as_inserted_whichever_way_it_is_kept() {
        let plain = rs("10.244.1.5:8080");
        let v6 = rs("[fd00::5]:8080");
        let odd = RealServer {
            forwarding: Forwarding::DirectRoute,
            upper_threshold: 100,
            ..rs("10.244.1.6:8080")
        };
        let mut set: RealSet = [odd, v6, plain].into_iter().collect();
        assert_eq!(set.len(), 3);
        for want in [plain, v6, odd] {
            assert_eq!(set.get(&want.addr), Some(want));
        }
        // Replaced by one kept the other way, and back: one server under its address.
        let drained = RealServer { weight: 0, ..plain };
        let routed = RealServer {
            forwarding: Forwarding::DirectRoute,
            ..plain
        };
        assert!(!set.insert(routed));
        assert_eq!(set.get(&plain.addr), Some(routed));
        assert!(!set.insert(drained));
        assert_eq!(set.get(&plain.addr), Some(drained));
        assert_eq!(set.len(), 3);
        let mut addrs: Vec<SocketAddr> = set.addrs().collect();
        addrs.sort();
        assert_eq!(addrs, [plain.addr, odd.addr, v6.addr]);
        assert_eq!(set.remove(&odd.addr), Some(odd));
        assert_eq!(set.get(&odd.addr), None);
        assert!(set.insert(odd), "new again");
        assert!(
            size_of::<Plain>() < size_of::<RealServer>() / 2 + 1,
            "the mirror's 100,000 real servers at 10,000 Services take half the memory"
        );
    }
}
