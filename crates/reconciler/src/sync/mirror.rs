//! What the engine believes the kernel holds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
/// node (100,000 real servers at 10,000 Services). A one-endpoint change reads every one of
/// them, so their bytes are its cache misses at scale: an IPv4 one takes 12.
#[derive(Debug, Clone, Default)]
pub(super) struct RealSet {
    /// Masqueraded and without thresholds, as the proxy plans every real server, of the
    /// virtual server's family (the first such one's).
    plain: Plain,
    /// Any other (adopted from the kernel: a previous run's, or changed by hand; or of the
    /// other family): seldom any, so boxed, which keeps the mirror's slot 16 bytes smaller.
    #[allow(
        clippy::box_collection,
        reason = "a thin pointer: 8 bytes in every virtual server's slot, not a vector's 24"
    )]
    other: Option<Box<Vec<RealServer>>>,
}

/// The plain real servers of one family, 12 bytes each for IPv4 and 24 for IPv6 instead of
/// a [`RealServer`]'s 48 (its `SocketAddr` alone takes 32).
#[derive(Debug, Clone)]
enum Plain {
    V4(Vec<Packed<Ipv4Addr>>),
    V6(Vec<Packed<Ipv6Addr>>),
}

impl Default for Plain {
    fn default() -> Self {
        Plain::V4(Vec::new())
    }
}

/// A masqueraded real server without thresholds, of one family.
#[derive(Debug, Clone, Copy)]
struct Packed<A> {
    ip: A,
    port: u16,
    weight: u32,
}

/// An address family's address, as [`Packed`] keeps it.
trait Addr: Copy + Ord + Into<IpAddr> {
    /// `addr`'s address and port if it is of this family and has nothing else (no IPv6 flow
    /// label or scope), so that it is kept whole.
    fn of(addr: &SocketAddr) -> Option<(Self, u16)>;
}

impl Addr for Ipv4Addr {
    fn of(addr: &SocketAddr) -> Option<(Self, u16)> {
        match addr {
            SocketAddr::V4(a) => Some((*a.ip(), a.port())),
            SocketAddr::V6(_) => None,
        }
    }
}

impl Addr for Ipv6Addr {
    fn of(addr: &SocketAddr) -> Option<(Self, u16)> {
        match addr {
            SocketAddr::V6(a) if a.flowinfo() == 0 && a.scope_id() == 0 => {
                Some((*a.ip(), a.port()))
            }
            _ => None,
        }
    }
}

impl<A: Addr> Packed<A> {
    fn of(rs: &RealServer) -> Option<Packed<A>> {
        let plain = rs.forwarding == Forwarding::Masquerade
            && rs.upper_threshold == 0
            && rs.lower_threshold == 0;
        let (ip, port) = A::of(&rs.addr).filter(|_| plain)?;
        Some(Packed {
            ip,
            port,
            weight: rs.weight,
        })
    }

    fn addr(self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), self.port)
    }

    fn server(self) -> RealServer {
        RealServer {
            weight: self.weight,
            ..RealServer::masquerade(self.addr())
        }
    }

    fn find(list: &[Packed<A>], addr: &SocketAddr) -> Option<Result<usize, usize>> {
        let key = A::of(addr)?;
        Some(list.binary_search_by(|p| (p.ip, p.port).cmp(&key)))
    }

    /// Sorted, one per address, at its length.
    fn tidy(list: &mut Vec<Packed<A>>) {
        list.sort_by_key(|p| (p.ip, p.port));
        list.dedup_by_key(|p| (p.ip, p.port));
        list.shrink_to_fit();
    }
}

impl Plain {
    fn len(&self) -> usize {
        match self {
            Plain::V4(l) => l.len(),
            Plain::V6(l) => l.len(),
        }
    }

    fn get(&self, addr: &SocketAddr) -> Option<RealServer> {
        match self {
            Plain::V4(l) => Some(l[Packed::find(l, addr)?.ok()?].server()),
            Plain::V6(l) => Some(l[Packed::find(l, addr)?.ok()?].server()),
        }
    }

    fn remove(&mut self, addr: &SocketAddr) -> Option<RealServer> {
        match self {
            Plain::V4(l) => Some(l.remove(Packed::find(l, addr)?.ok()?).server()),
            Plain::V6(l) => Some(l.remove(Packed::find(l, addr)?.ok()?).server()),
        }
    }

    /// Keeps `rs` (absent) if it is plain and of this family, or of any while empty; gives it
    /// back otherwise.
    fn insert(&mut self, rs: RealServer) -> Result<(), RealServer> {
        if self.len() == 0 {
            match rs.addr {
                SocketAddr::V4(_) if matches!(self, Plain::V6(_)) => *self = Plain::default(),
                SocketAddr::V6(_) if matches!(self, Plain::V4(_)) => *self = Plain::V6(Vec::new()),
                _ => {}
            }
        }
        match self {
            Plain::V4(l) => Self::insert_into(l, rs),
            Plain::V6(l) => Self::insert_into(l, rs),
        }
    }

    fn insert_into<A: Addr>(list: &mut Vec<Packed<A>>, rs: RealServer) -> Result<(), RealServer> {
        let (Some(packed), Some(Err(at))) = (Packed::of(&rs), Packed::find(list, &rs.addr)) else {
            return Err(rs);
        };
        list.insert(at, packed);
        Ok(())
    }
}

impl RealSet {
    fn others(&self) -> &[RealServer] {
        self.other.as_deref().map_or(&[], Vec::as_slice)
    }

    fn find_other(&self, addr: &SocketAddr) -> Result<usize, usize> {
        self.others().binary_search_by(|r| r.addr.cmp(addr))
    }

    pub(super) fn get(&self, addr: &SocketAddr) -> Option<RealServer> {
        if let Some(rs) = self.plain.get(addr) {
            return Some(rs);
        }
        self.find_other(addr).ok().map(|i| self.others()[i])
    }

    /// Adds or replaces `rs`; says whether it was new.
    pub(super) fn insert(&mut self, rs: RealServer) -> bool {
        let new = self.remove(&rs.addr).is_none();
        if let Err(rs) = self.plain.insert(rs) {
            let i = self.find_other(&rs.addr).unwrap_err();
            self.other.get_or_insert_default().insert(i, rs);
        }
        new
    }

    pub(super) fn remove(&mut self, addr: &SocketAddr) -> Option<RealServer> {
        if let Some(rs) = self.plain.remove(addr) {
            return Some(rs);
        }
        let i = self.find_other(addr).ok()?;
        let other = self.other.as_mut()?;
        let rs = other.remove(i);
        if other.is_empty() {
            self.other = None;
        }
        Some(rs)
    }

    pub(super) fn len(&self) -> usize {
        self.plain.len() + self.others().len()
    }

    /// Room for `reals` without growing past them (a new virtual server's first fill), in
    /// their family.
    pub(super) fn reserve_exact(&mut self, reals: &[RealServer]) {
        if self.len() != 0 {
            return;
        }
        match reals.first().map(|r| r.addr) {
            Some(SocketAddr::V4(_)) => self.plain = Plain::V4(Vec::with_capacity(reals.len())),
            Some(SocketAddr::V6(_)) => self.plain = Plain::V6(Vec::with_capacity(reals.len())),
            None => {}
        }
    }

    pub(super) fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let (v4, v6) = match &self.plain {
            Plain::V4(l) => (l.as_slice(), &[][..]),
            Plain::V6(l) => (&[][..], l.as_slice()),
        };
        let plain = v4
            .iter()
            .map(|p| p.addr())
            .chain(v6.iter().map(|p| p.addr()));
        plain.chain(self.others().iter().map(|r| r.addr))
    }
}

impl FromIterator<RealServer> for RealSet {
    fn from_iter<T: IntoIterator<Item = RealServer>>(iter: T) -> Self {
        let (mut v4, mut v6, mut other) = (Vec::new(), Vec::new(), Vec::new());
        for rs in iter {
            if let Some(p) = Packed::<Ipv4Addr>::of(&rs) {
                v4.push(p);
            } else if let Some(p) = Packed::<Ipv6Addr>::of(&rs) {
                v6.push(p);
            } else {
                other.push(rs);
            }
        }
        // The virtual server's family is its real servers' (IPVS mixes them only when
        // tunnelling): the few of the other are kept as any other.
        let plain = if v6.len() > v4.len() {
            other.extend(v4.into_iter().map(Packed::server));
            Packed::tidy(&mut v6);
            Plain::V6(v6)
        } else {
            other.extend(v6.into_iter().map(Packed::server));
            Packed::tidy(&mut v4);
            Plain::V4(v4)
        };
        other.sort_by_key(|r| r.addr);
        other.dedup_by_key(|r| r.addr);
        other.shrink_to_fit();
        RealSet {
            plain,
            other: (!other.is_empty()).then(|| Box::new(other)),
        }
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
        assert_eq!(size_of::<RealSet>(), 40, "two vectors' 48 before");
        assert!(
            size_of::<Packed<Ipv4Addr>>() * 4 == size_of::<RealServer>(),
            "the mirror's 100,000 real servers at 10,000 Services take a quarter of the memory"
        );
    }

    #[test]
    fn a_set_takes_the_family_of_its_first_real_server_and_keeps_the_other_aside() {
        let v4 = rs("10.244.1.5:8080");
        let v6 = rs("[fd00::5]:8080");
        let scoped: RealServer = RealServer::masquerade("[fe80::5%2]:8080".parse().unwrap());
        for first in [v4, v6] {
            let second = if first == v4 { v6 } else { v4 };
            let mut set = RealSet::default();
            set.reserve_exact(&[first]);
            assert!(set.insert(first));
            assert!(set.insert(second), "the other family, kept aside");
            assert!(set.insert(scoped), "a scope is kept whole");
            assert_eq!(set.len(), 3);
            for want in [first, second, scoped] {
                assert_eq!(set.get(&want.addr), Some(want));
                assert_eq!(set.remove(&want.addr), Some(want));
                assert_eq!(set.get(&want.addr), None);
            }
            assert_eq!(set.len(), 0);
            // Emptied, it takes the family of the next.
            assert!(set.insert(second));
            assert!(set.insert(first));
            assert_eq!(set.addrs().count(), 2);
        }
    }
}
