//! What the engine believes the kernel holds.

use std::net::{IpAddr, SocketAddr};

use ipvs::{RealServer, ServiceKey, VirtualServer};

use super::kernel::NetfilterEntry;

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
}

/// A virtual server's real servers, sorted by address: a tenth of a hash map's memory for the
/// handful a Service has, and the mirror holds one per virtual server of the node.
#[derive(Debug, Clone, Default)]
pub(super) struct RealSet(Vec<RealServer>);

impl RealSet {
    pub(super) fn find(&self, addr: &SocketAddr) -> Result<usize, usize> {
        self.0.binary_search_by(|r| r.addr.cmp(addr))
    }

    pub(super) fn get(&self, addr: &SocketAddr) -> Option<&RealServer> {
        self.find(addr).ok().map(|i| &self.0[i])
    }

    pub(super) fn get_mut(&mut self, addr: &SocketAddr) -> Option<&mut RealServer> {
        self.find(addr).ok().map(|i| &mut self.0[i])
    }

    /// Adds or replaces `rs`; says whether it was new.
    pub(super) fn insert(&mut self, rs: RealServer) -> bool {
        match self.find(&rs.addr) {
            Ok(i) => {
                self.0[i] = rs;
                false
            }
            Err(i) => {
                self.0.insert(i, rs);
                true
            }
        }
    }

    pub(super) fn remove(&mut self, addr: &SocketAddr) -> Option<RealServer> {
        self.find(addr).ok().map(|i| self.0.remove(i))
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Room for `n` more without growing past them (a new virtual server's first fill).
    pub(super) fn reserve_exact(&mut self, n: usize) {
        self.0.reserve_exact(n);
    }

    pub(super) fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.0.iter().map(|r| r.addr)
    }
}

impl FromIterator<RealServer> for RealSet {
    fn from_iter<T: IntoIterator<Item = RealServer>>(iter: T) -> Self {
        let mut v: Vec<RealServer> = iter.into_iter().collect();
        v.sort_by_key(|r| r.addr);
        v.dedup_by_key(|r| r.addr);
        v.shrink_to_fit();
        RealSet(v)
    }
}
