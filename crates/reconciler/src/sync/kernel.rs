//! The kernel as the engine sees it: three backends, handed in, each a trait with an in-memory
//! fake in the tests. `kube-ipvs0` is netif's [`netif::DummyLink`] as it is; the IPVS and
//! netfilter backends are the daemon's.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use iptables::Family;
use iptables::ipvs_mode::{KubeSet, RuleInput};
use ipvs::{Op, RealServerEntry, ServiceKey};

pub use crate::error::BackendError;
use crate::model::Protocol;

/// Every virtual server with its real servers, as a dump reads them.
pub type IpvsTable = Vec<ipvs::TableEntry>;
/// Where a periodic full sync's read hands each virtual server with its real servers as soon
/// as they are read, on whichever thread read them; `false` when nobody wants more, and the
/// read stops.
pub type ServerSink = Box<dyn Fn(ipvs::ConfigEntry) -> bool + Send + Sync>;

/// A read of the kernel to run on another thread, on sockets of its own: a periodic full
/// sync reads there while the loop goes on syncing changes.
pub type Reader<T, E = BackendError> = Box<dyn FnOnce() -> Result<T, E> + Send>;

/// The kernel's IPVS table, as the engine needs it.
pub trait IpvsKernel {
    /// Every virtual server with its real servers (`ipvsadm -Ln`).
    fn dump(&mut self) -> Result<IpvsTable, ipvs::Error>;
    /// The same read for another thread, each virtual server handed to `each` as it is read
    /// (so the table is never held whole); `None` when the backend cannot read off its own
    /// thread, and full syncs then read on the loop's.
    fn reader(&self, _each: ServerSink) -> Option<Reader<(), ipvs::Error>> {
        None
    }
    /// The real servers of one virtual server, with their connection counts.
    fn real_servers(&mut self, key: &ServiceKey) -> Result<Vec<RealServerEntry>, ipvs::Error>;
    /// Applies a batch; one result per operation, in order.
    fn apply(&mut self, ops: &[Op]) -> Vec<Result<(), ipvs::Error>>;
}

/// The addresses bound to `kube-ipvs0`.
pub trait AddressKernel {
    /// What the link holds; makes the link again first if it was deleted.
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, BackendError>;
    /// What the link holds, read on another thread (which never makes the link: a missing one
    /// is an error, and the full sync that follows makes it); `None` as [`IpvsKernel::reader`].
    fn reader(&self) -> Option<Reader<BTreeSet<IpAddr>>> {
        None
    }
    /// One result per address, in order.
    fn add(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>>;
    /// One result per address, in order.
    fn remove(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>>;
}

/// One result per address of `call(addrs)`; a failure of the whole call is every address's.
fn per_address(
    addrs: &[IpAddr],
    call: impl FnOnce(&[IpAddr]) -> Result<Vec<netif::AddressResult>, netif::Error>,
) -> Vec<Result<(), BackendError>> {
    if addrs.is_empty() {
        return Vec::new();
    }
    match call(addrs) {
        Ok(results) => results
            .into_iter()
            .map(|r| r.map(drop).map_err(Into::into))
            .collect(),
        Err(e) => {
            let message = e.to_string();
            addrs.iter().map(|_| Err(message.clone().into())).collect()
        }
    }
}

/// The real `kube-ipvs0`.
impl AddressKernel for netif::DummyLink {
    /// Makes the link again first if it was deleted under the proxy: a full sync lists it,
    /// then binds every address its Services want.
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, BackendError> {
        self.reensure()?;
        Ok(self.addresses()?)
    }

    fn add(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>> {
        per_address(addrs, |a| netif::DummyLink::add(self, a))
    }

    fn remove(&mut self, addrs: &[IpAddr]) -> Vec<Result<(), BackendError>> {
        per_address(addrs, |a| netif::DummyLink::remove(self, a))
    }

    fn reader(&self) -> Option<Reader<BTreeSet<IpAddr>>> {
        let name = self.name().to_owned();
        Some(Box::new(move || match netif::DummyLink::open(&name)? {
            Some(mut link) => Ok(link.addresses()?),
            None => Err(format!("{name} is gone").into()),
        }))
    }
}

/// The ipsets and the small iptables rule set that uses them. The engine keeps what they
/// hold; a backend only writes.
pub trait NetfilterKernel {
    /// Makes every proxy set of the families in `rules` hold exactly the `Set` members of
    /// `entries`, then rewrites the proxy's chains of each family from `rules`.
    fn full(
        &mut self,
        entries: &WantedEntries<'_>,
        rules: &[RuleInput],
    ) -> Result<(), BackendError>;
    /// Adds and deletes members; rewrites the chains from `rules` when given (the engine gives
    /// them when the rules changed: a set became empty or non-empty, a LoadBalancer out-filter
    /// came or went).
    fn partial(
        &mut self,
        added: &[NetfilterEntry],
        removed: &[NetfilterEntry],
        rules: Option<&[RuleInput]>,
    ) -> Result<(), BackendError>;
    /// For another thread: rewrites the chains from `rules` (a few dozen rules, written there
    /// so that no full sync holds the loop for them), then reads the proxy's sets (`ipset
    /// save`); `None` as [`IpvsKernel::reader`].
    fn reader(&self, _rules: Vec<RuleInput>) -> Option<Reader<SetsRead>> {
        None
    }
}

/// The proxy's sets as a read found them.
#[derive(Debug, Default)]
pub struct SetsRead {
    /// Their members, in any order (the engine sorts them: 20,000 at 10,000 Services, half a
    /// hash set's memory, walked in order by the comparison with nothing copied).
    pub entries: Vec<NetfilterEntry>,
    /// The proxy's sets that exist.
    pub sets: HashSet<(Family, KubeSet)>,
}

/// What a full sync wants the netfilter state to hold: the engine's own maps, walked and looked
/// up in place (a copy of every set member, 20,000 at 10,000 Services, would come on top of
/// the full sync's peak).
#[derive(Debug, Clone, Copy)]
pub struct WantedEntries<'a> {
    /// Every entry, with how many Service ports want it.
    pub(super) refs: &'a HashMap<NetfilterEntry, u32>,
    /// Members per non-empty set.
    pub(super) sizes: &'a HashMap<(Family, KubeSet), usize>,
}

impl WantedEntries<'_> {
    /// Every entry, in no order.
    pub fn iter(&self) -> impl Iterator<Item = &NetfilterEntry> {
        self.refs.keys()
    }

    #[must_use]
    pub fn contains(&self, entry: &NetfilterEntry) -> bool {
        self.refs.contains_key(entry)
    }

    /// How many members `set` of `family` holds.
    #[must_use]
    pub fn members(&self, family: Family, set: KubeSet) -> usize {
        self.sizes.get(&(family, set)).copied().unwrap_or(0)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.refs.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }
}

/// One fact the ipvs-mode netfilter state is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NetfilterEntry {
    /// A member of one of kube-proxy's ipsets (`ipset add KUBE-CLUSTER-IP 10.96.0.10,tcp:80`).
    Set {
        family: Family,
        set: KubeSet,
        entry: iptables::SetEntry,
    },
    /// A LoadBalancer (ip, protocol, port) the node itself may not reach: a
    /// KUBE-IPVS-OUT-FILTER rule.
    NoNodeAccess {
        ip: IpAddr,
        protocol: Protocol,
        port: u16,
    },
}

impl fmt::Display for NetfilterEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetfilterEntry::Set { family, set, entry } => {
                write!(f, "{} {entry}", set.name(*family))
            }
            NetfilterEntry::NoNodeAccess { ip, protocol, port } => {
                write!(f, "out-filter {ip},{protocol}:{port}")
            }
        }
    }
}
