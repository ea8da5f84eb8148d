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
    /// By hash, not a tree: a change looks its Service up, and a tree's search compares the
    /// name with a dozen others, each behind its pointers (at 100,000 Services, a cache miss
    /// each). Only full syncs walk them in order ([`ClusterState::services`]).
    services: HashMap<ServiceName, Arc<[ServicePort]>>,
    /// Each Service's slices, sorted by name: usually one, so a list, not a tree (whose
    /// smallest node holds eleven).
    slices: HashMap<ServiceName, Vec<(SliceName, EndpointSlice)>>,
    slice_owner: HashMap<SliceName, ServiceName>,
    nodes: BTreeMap<Arc<str>, NodeFacts>,
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
        if self.services.get(&name).is_some_and(|old| **old == *ports) {
            return None;
        }
        self.services.insert(name.clone(), ports.into());
        Some(name)
    }

    pub fn remove_service(&mut self, name: &ServiceName) -> Option<ServiceName> {
        self.services.remove(name).map(|_| name.clone())
    }

    /// Sets an EndpointSlice. Returns the Services affected (a slice relabelled to another
    /// Service affects both).
    pub fn upsert_slice(&mut self, name: SliceName, slice: EndpointSlice) -> Vec<ServiceName> {
        let mut affected = Vec::new();
        if let Some(owner) = self.slice_owner.get(&name) {
            if *owner != slice.service {
                affected.extend(self.remove_slice(&name));
            } else if self
                .slices
                .get(owner)
                .and_then(|list| list.iter().find(|(n, _)| *n == name))
                .is_some_and(|(_, s)| *s == slice)
            {
                return affected;
            }
        }
        let service = slice.service.clone();
        self.slice_owner.insert(name.clone(), service.clone());
        // Room for one: a Service's first slice is usually its only one (a Vec's first push
        // makes room for four, and the map holds a list per Service).
        let list = self
            .slices
            .entry(service.clone())
            .or_insert_with(|| Vec::with_capacity(1));
        match list.binary_search_by(|(n, _)| n.cmp(&name)) {
            Ok(at) => list[at].1 = slice,
            Err(at) => list.insert(at, (name, slice)),
        }
        affected.push(service);
        affected
    }

    pub fn remove_slice(&mut self, name: &SliceName) -> Option<ServiceName> {
        let owner = self.slice_owner.remove(name)?;
        if let Some(by_name) = self.slices.get_mut(&owner) {
            by_name.retain(|(n, _)| n != name);
            if by_name.is_empty() {
                self.slices.remove(&owner);
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
        let mut all: Vec<(&ServiceName, &[ServicePort])> =
            self.services.iter().map(|(n, p)| (n, &**p)).collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
    }

    #[must_use]
    pub fn service(&self, name: &ServiceName) -> Option<&[ServicePort]> {
        self.services.get(name).map(|p| &**p)
    }

    #[must_use]
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The endpoints of one Service port, merged over the Service's slices (matched by port
    /// name and protocol) and de-duplicated by address and port, the first slice (by name)
    /// winning, as kube-proxy's EndpointSlice cache does.
    #[must_use]
    pub fn endpoints(&self, port: &ServicePortName) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = Vec::new();
        let Some(by_name) = self.slices.get(&port.service) else {
            return out;
        };
        for (_, slice) in by_name {
            for p in &slice.ports {
                if p.name != port.port || p.protocol != port.protocol {
                    continue;
                }
                for ep in p.endpoints.iter() {
                    if !out.iter().any(|o| o.ip == ep.ip && o.port == ep.port) {
                        out.push(ep.clone());
                    }
                }
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
                    node_name: None,
                    zone: None,
                    hints: None,
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
