//! The current picture of the cluster, fed by a source (manifests or API watchers), keyed so
//! that a change to one object names the one Service it affects.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::model::{Endpoint, EndpointSlice, NodeFacts, ServiceName, ServicePort, ServicePortName};

/// An EndpointSlice's identity: namespace and slice name.
pub type SliceName = (Arc<str>, Arc<str>);

/// What a change to the state affected: the Services whose plans must be recomputed, and
/// whether node facts changed (which affects every NodePort).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affected {
    pub services: Vec<ServiceName>,
    pub nodes: bool,
}

impl Affected {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.nodes
    }
}

/// Services, EndpointSlices and Nodes as a source last reported them.
///
/// Every mutator returns the Service the change affects when something really changed
/// (`None` for a no-op), so a sync engine can mark just that Service dirty, as kube-proxy's
/// change trackers do.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    /// Each Service's ports and slices in one entry, by hash, not in a tree: a change finds
    /// its slice, and the sync then the ports and endpoints it plans, in one lookup (a tree's
    /// search compares the name with a dozen others, each behind its pointers: at 100,000
    /// Services a cache miss each). Only full syncs walk them in order
    /// ([`ClusterState::services`]).
    services: HashMap<ServiceName, ServiceEntry>,
    /// How many entries have ports: Services whose slices alone are known are not counted.
    with_ports: usize,
    /// Which Service each slice is filed under: for deletes, which name only the slice, and
    /// for slices relabelled to another Service.
    slice_owner: HashMap<SliceName, ServiceName>,
    nodes: BTreeMap<Arc<str>, NodeFacts>,
}

/// One Service as the sources reported it.
#[derive(Debug, Clone, Default)]
struct ServiceEntry {
    /// `None` while only its slices are known (they may come first) or after it was deleted
    /// while they remain.
    ports: Option<Arc<[ServicePort]>>,
    slices: Slices,
}

/// A Service's slices, sorted by name: the first in the Service's map entry, so that a change
/// finds it without following a pointer (at 100,000 Services a cache and a TLB miss); the
/// others, which most Services do not have, behind one.
#[derive(Debug, Clone, Default)]
struct Slices {
    /// `None` only when there are none.
    first: Option<(SliceName, EndpointSlice)>,
    /// Those after the first, sorted by name: a list, not a tree (whose smallest node holds
    /// eleven).
    #[allow(
        clippy::box_collection,
        reason = "a thin pointer: it is in every Service's map entry, and rarely used"
    )]
    rest: Option<Box<Vec<(SliceName, EndpointSlice)>>>,
}

impl Slices {
    fn get_mut(&mut self, name: &SliceName) -> Option<&mut EndpointSlice> {
        let (first, slice) = self.first.as_mut()?;
        if first == name {
            return Some(slice);
        }
        let rest = self.rest.as_mut()?;
        let at = rest.binary_search_by(|(n, _)| n.cmp(name)).ok()?;
        Some(&mut rest[at].1)
    }

    fn set(&mut self, name: SliceName, slice: EndpointSlice) {
        if let Some(have) = self.get_mut(&name) {
            *have = slice;
            return;
        }
        let Some(first) = self.first.as_mut() else {
            self.first = Some((name, slice));
            return;
        };
        let rest = self
            .rest
            .get_or_insert_with(|| Box::new(Vec::with_capacity(1)));
        if name < first.0 {
            rest.insert(0, std::mem::replace(first, (name, slice)));
        } else {
            let at = rest.partition_point(|(n, _)| *n < name);
            rest.insert(at, (name, slice));
        }
    }

    fn remove(&mut self, name: &SliceName) {
        if self.first.as_ref().is_some_and(|(n, _)| n == name) {
            self.first = self.rest.as_mut().map(|rest| rest.remove(0));
        } else if let Some(rest) = self.rest.as_mut() {
            rest.retain(|(n, _)| n != name);
        }
        if self.rest.as_ref().is_some_and(|rest| rest.is_empty()) {
            self.rest = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn iter(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.first
            .iter()
            .chain(self.rest.iter().flat_map(|rest| rest.iter()))
            .map(|(_, slice)| slice)
    }
}

impl ClusterState {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a Service's ports (an empty list removes it: a skipped Service has none).
    pub fn upsert_service(
        &mut self,
        name: ServiceName,
        ports: Vec<ServicePort>,
    ) -> Option<ServiceName> {
        if ports.is_empty() {
            return self.remove_service(&name);
        }
        if let Some(entry) = self.services.get_mut(&name) {
            if entry.ports.as_deref() == Some(&*ports) {
                return None;
            }
            if entry.ports.replace(ports.into()).is_none() {
                self.with_ports += 1;
            }
        } else {
            let entry = ServiceEntry {
                ports: Some(ports.into()),
                slices: Slices::default(),
            };
            self.services.insert(name.clone(), entry);
            self.with_ports += 1;
        }
        Some(name)
    }

    pub fn remove_service(&mut self, name: &ServiceName) -> Option<ServiceName> {
        let entry = self.services.get_mut(name)?;
        entry.ports.take()?;
        self.with_ports -= 1;
        if entry.slices.is_empty() {
            self.services.remove(name);
        }
        Some(name.clone())
    }

    /// Sets an EndpointSlice. Returns the Services affected (a slice relabelled to another
    /// Service affects both).
    pub fn upsert_slice(&mut self, name: SliceName, slice: EndpointSlice) -> Vec<ServiceName> {
        // The usual change: a slice updated under the Service it is filed under already,
        // found with that Service's one lookup (a slice is filed under its owner only).
        if let Some(entry) = self.services.get_mut(&slice.service)
            && let Some(have) = entry.slices.get_mut(&name)
        {
            if *have == slice {
                return Vec::new();
            }
            let service = slice.service.clone();
            *have = slice;
            return vec![service];
        }
        // A new slice, or one relabelled from another Service.
        let mut affected = Vec::new();
        if self
            .slice_owner
            .get(&name)
            .is_some_and(|owner| *owner != slice.service)
        {
            affected.extend(self.remove_slice(&name));
        }
        let service = slice.service.clone();
        self.slice_owner.insert(name.clone(), service.clone());
        self.services
            .entry(service.clone())
            .or_default()
            .slices
            .set(name, slice);
        affected.push(service);
        affected
    }

    pub fn remove_slice(&mut self, name: &SliceName) -> Option<ServiceName> {
        let owner = self.slice_owner.remove(name)?;
        if let Some(entry) = self.services.get_mut(&owner) {
            entry.slices.remove(name);
            if entry.slices.is_empty() && entry.ports.is_none() {
                self.services.remove(&owner);
            }
        }
        Some(owner)
    }

    /// Sets a Node's facts. Returns whether anything changed (node addresses affect every
    /// NodePort, so the caller resyncs all Services).
    pub fn upsert_node(&mut self, node: NodeFacts) -> bool {
        if self.nodes.get(&node.name) == Some(&node) {
            return false;
        }
        self.nodes.insert(node.name.clone(), node);
        true
    }

    pub fn remove_node(&mut self, name: &str) -> bool {
        self.nodes.remove(name).is_some()
    }

    #[must_use]
    pub fn node(&self, name: &str) -> Option<&NodeFacts> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeFacts> {
        self.nodes.values()
    }

    /// Every Service with its ports, sorted by namespace and name: sorted when asked, for the
    /// full syncs and plans that walk them all (a few milliseconds at 10,000 Services, against
    /// the seconds such a sync takes).
    pub fn services(&self) -> impl Iterator<Item = (&ServiceName, &[ServicePort])> {
        let mut all: Vec<(&ServiceName, &[ServicePort])> = self
            .services
            .iter()
            .filter_map(|(n, e)| Some((n, e.ports.as_deref()?)))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
    }

    /// Every Service with its ports, in no order: for the walks that count or look up, which
    /// run on the loop's thread at every periodic full sync and must not sort (at 10,000
    /// Services in the emulator, each sort held a change back by tens of milliseconds).
    pub fn services_any_order(&self) -> impl Iterator<Item = (&ServiceName, &[ServicePort])> {
        self.services
            .iter()
            .filter_map(|(n, e)| Some((n, e.ports.as_deref()?)))
    }

    #[must_use]
    pub fn service(&self, name: &ServiceName) -> Option<&[ServicePort]> {
        self.services.get(name)?.ports.as_deref()
    }

    #[must_use]
    pub fn service_count(&self) -> usize {
        self.with_ports
    }

    /// The endpoints of one Service port, merged over the Service's slices (matched by port
    /// name and protocol) and de-duplicated by address and port, the first slice (by name)
    /// winning, as kube-proxy's EndpointSlice cache does.
    #[must_use]
    pub fn endpoints(&self, port: &ServicePortName) -> Vec<Endpoint> {
        let Some(entry) = self.services.get(&port.service) else {
            return Vec::new();
        };
        let matching = || {
            entry
                .slices
                .iter()
                .flat_map(|slice| &slice.ports)
                .filter(|p| p.name == port.port && p.protocol == port.protocol)
        };
        // Sized once: growing it reallocates, and the allocator's memory is cold at scale.
        let mut out: Vec<Endpoint> =
            Vec::with_capacity(matching().map(|p| p.endpoints.len()).sum());
        for ep in matching().flat_map(|p| p.endpoints.iter()) {
            if !out.iter().any(|o| o.ip == ep.ip && o.port == ep.port) {
                out.push(*ep);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Conditions, EndpointPort, Protocol};

    fn slice(svc: &str, ip: &str) -> EndpointSlice {
        EndpointSlice {
            service: ServiceName::new("ns", svc),
            ports: vec![EndpointPort {
                name: "".into(),
                protocol: Protocol::Tcp,
                endpoints: vec![Endpoint {
                    ip: ip.parse().unwrap(),
                    port: 8080,
                    conditions: Conditions::default(),
                    local: false,
                    hints: crate::model::Hints::default(),
                }]
                .into(),
            }],
        }
    }

    fn key(name: &str) -> SliceName {
        ("ns".into(), name.into())
    }

    #[test]
    fn unchanged_slice_reports_no_change() {
        let mut st = ClusterState::new();
        assert_eq!(st.upsert_slice(key("a-1"), slice("a", "10.0.0.1")).len(), 1);
        assert!(
            st.upsert_slice(key("a-1"), slice("a", "10.0.0.1"))
                .is_empty()
        );
    }

    #[test]
    fn relabelled_slice_affects_old_and_new_service() {
        let mut st = ClusterState::new();
        st.upsert_slice(key("s"), slice("a", "10.0.0.1"));
        let affected = st.upsert_slice(key("s"), slice("b", "10.0.0.1"));
        assert_eq!(
            affected,
            vec![ServiceName::new("ns", "a"), ServiceName::new("ns", "b")]
        );
    }

    fn port(svc: &str) -> ServicePortName {
        ServicePortName {
            service: ServiceName::new("ns", svc),
            port: "".into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn slices_outlive_their_service_and_count_no_service() {
        let mut st = ClusterState::new();
        let name = ServiceName::new("ns", "a");
        st.upsert_slice(key("a-1"), slice("a", "10.0.0.1"));
        assert_eq!(st.service_count(), 0, "slices alone are no Service");
        assert!(st.service(&name).is_none());
        let ports = vec![ServicePort::cluster_ip(
            port("a"),
            80,
            &["10.96.0.1".parse().unwrap()],
        )];
        assert_eq!(
            st.upsert_service(name.clone(), ports.clone()),
            Some(name.clone())
        );
        assert_eq!(
            st.upsert_service(name.clone(), ports.clone()),
            None,
            "unchanged"
        );
        assert_eq!(st.service_count(), 1);
        assert_eq!(st.remove_service(&name), Some(name.clone()));
        assert_eq!(st.remove_service(&name), None, "already gone");
        assert_eq!((st.service_count(), st.services().count()), (0, 0));
        assert_eq!(st.endpoints(&port("a")).len(), 1, "its slice stays");
        st.upsert_service(name.clone(), ports);
        assert_eq!(st.endpoints(&port("a")).len(), 1);
        assert_eq!(st.remove_slice(&key("a-1")), Some(name.clone()));
        assert!(st.endpoints(&port("a")).is_empty());
        assert_eq!(st.service_count(), 1);
    }

    #[test]
    fn services_are_walked_in_name_order() {
        let mut st = ClusterState::new();
        for svc in ["c", "a", "b"] {
            let ports = vec![ServicePort::cluster_ip(
                port(svc),
                80,
                &["10.96.0.1".parse().unwrap()],
            )];
            st.upsert_service(ServiceName::new("ns", svc), ports);
        }
        st.upsert_slice(key("d-1"), slice("d", "10.0.0.1"));
        let names: Vec<String> = st.services().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["ns/a", "ns/b", "ns/c"]);
    }

    #[test]
    fn the_first_slice_by_name_wins_an_endpoint_whatever_the_order_they_came_in() {
        let mut st = ClusterState::new();
        let mut not_ready = slice("a", "10.0.0.1");
        let mut endpoints = not_ready.ports[0].endpoints.to_vec();
        endpoints[0].conditions.ready = false;
        not_ready.ports[0].endpoints = endpoints.into();
        let port = port("a");
        let ready = |st: &ClusterState| {
            st.endpoints(&port)
                .iter()
                .map(|e| e.conditions.ready)
                .collect::<Vec<_>>()
        };
        st.upsert_slice(key("a-3"), slice("a", "10.0.0.2"));
        st.upsert_slice(key("a-2"), slice("a", "10.0.0.1"));
        assert_eq!(ready(&st), [true, true], "a-2's, then a-3's");
        st.upsert_slice(key("a-1"), not_ready.clone());
        assert_eq!(ready(&st), [false, true], "a-1's, then a-3's");
        assert_eq!(
            st.upsert_slice(key("a-1"), not_ready),
            Vec::<ServiceName>::new(),
            "unchanged"
        );
        st.upsert_slice(key("a-2"), slice("a", "10.0.0.3"));
        assert_eq!(st.endpoints(&port).len(), 3);
        assert_eq!(st.remove_slice(&key("a-1")), Some(port.service.clone()));
        assert_eq!(ready(&st), [true, true], "a-2's and a-3's");
        st.remove_slice(&key("a-3"));
        st.remove_slice(&key("a-2"));
        assert!(st.endpoints(&port).is_empty());
        assert_eq!(st.services.len(), 0, "no ports, no slices: no entry");
    }

    #[test]
    fn endpoints_are_merged_over_slices_without_duplicates() {
        let mut st = ClusterState::new();
        st.upsert_slice(key("a-1"), slice("a", "10.0.0.1"));
        st.upsert_slice(key("a-2"), slice("a", "10.0.0.1"));
        st.upsert_slice(key("a-3"), slice("a", "10.0.0.2"));
        let port = ServicePortName {
            service: ServiceName::new("ns", "a"),
            port: "".into(),
            protocol: Protocol::Tcp,
        };
        assert_eq!(st.endpoints(&port).len(), 2);
    }
}
