//! What every source produces: objects applied and objects deleted, as [`Event`]s, folded
//! into a [`ClusterState`] by [`apply`]. The manifest directory and the kube-rs
//! watchers both speak this, so the sync engine does not care where objects come from.
//!
//! An applied object travels as a [`Model`]: converted where it was read, on the source's
//! thread, so the API object (a few KiB for an EndpointSlice with its managedFields and Pod
//! references) is dropped there at once, and what waits in the queue for the sync loop, or in
//! a relist, is the few hundred bytes the proxy keeps.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use reconciler::health::Health;
use reconciler::model::{EndpointSlice as SliceModel, NodeFacts, ServiceName, ServicePort};
use reconciler::pending::{self, Closed, Keyed};
use reconciler::state::{Affected, ClusterState, SliceName};
use reconciler::sync_loop::Folded;

use crate::convert::{
    Skipped, endpoint_slice, last_change_trigger_time, node_facts, service_name, service_ports,
    slice_name,
};
use crate::kube_source::node_eligible;

/// The kinds a proxy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

/// An object's identity: kind, namespace (empty for Nodes) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

/// One API object of a kind the proxy reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    #[must_use]
    pub fn key(&self) -> ObjectKey {
        let (kind, meta) = match self {
            Object::Service(o) => (Kind::Service, &o.metadata),
            Object::EndpointSlice(o) => (Kind::EndpointSlice, &o.metadata),
            Object::Node(o) => (Kind::Node, &o.metadata),
        };
        let namespace = match kind {
            Kind::Node => "",
            _ => meta.namespace.as_deref().unwrap_or("default"),
        };
        ObjectKey {
            kind,
            namespace: crate::intern::intern(namespace),
            name: meta.name.as_deref().unwrap_or("").into(),
        }
    }
}

/// An object as the proxy keeps it: converted into the model where it was read.
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    /// A Service's ports, or why it has none (skipped Services are held as absent).
    Service {
        name: ServiceName,
        ports: Result<Vec<ServicePort>, Skipped>,
    },
    /// An EndpointSlice (`None`: it names no Service, or holds FQDNs), and its
    /// `endpoints.kubernetes.io/last-change-trigger-time`.
    EndpointSlice {
        name: SliceName,
        slice: Option<SliceModel>,
        trigger: Option<SystemTime>,
    },
    /// A Node's facts, and whether it may receive load-balancer traffic
    /// ([`node_eligible`]).
    Node { facts: NodeFacts, eligible: bool },
}

impl Model {
    #[must_use]
    pub fn service(svc: &Service) -> Model {
        Model::Service {
            name: service_name(svc),
            ports: service_ports(svc),
        }
    }

    /// `slice` as the proxy on the node named `node` sees it ([`endpoint_slice`]).
    #[must_use]
    pub fn endpoint_slice(slice: &EndpointSlice, node: &str) -> Model {
        Model::EndpointSlice {
            name: slice_name(slice),
            slice: endpoint_slice(slice, node),
            trigger: last_change_trigger_time(slice),
        }
    }

    #[must_use]
    pub fn node(node: &Node) -> Model {
        Model::Node {
            facts: node_facts(node),
            eligible: node_eligible(node),
        }
    }

    /// The identity of the object it was converted from.
    #[must_use]
    pub fn key(&self) -> ObjectKey {
        let (kind, namespace, name) = match self {
            Model::Service { name, .. } => (Kind::Service, &name.namespace, &name.name),
            Model::EndpointSlice { name, .. } => (Kind::EndpointSlice, &name.0, &name.1),
            Model::Node { facts, .. } => {
                return ObjectKey {
                    kind: Kind::Node,
                    namespace: crate::intern::intern(""),
                    name: facts.name.clone(),
                };
            }
        };
        ObjectKey {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
        }
    }

    /// `object` converted, as the proxy on the node named `node` sees it.
    #[must_use]
    pub fn of(object: &Object, node: &str) -> Model {
        match object {
            Object::Service(svc) => Model::service(svc),
            Object::EndpointSlice(slice) => Model::endpoint_slice(slice, node),
            Object::Node(n) => Model::node(n),
        }
    }
}

/// A change reported by a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Created or updated.
    Apply(Model),
    /// Gone.
    Delete(ObjectKey),
}

impl Event {
    /// `object` created or updated, converted for the proxy on the node named `node`.
    #[must_use]
    pub fn apply(object: &Object, node: &str) -> Event {
        Event::Apply(Model::of(object, node))
    }
}

/// What a source sends the sync loop: batches of [`Event`]s, the end of the initial lists,
/// and the node's eligibility (see [`reconciler::sync_loop::SourceUpdate`]).
pub type SourceUpdate = reconciler::sync_loop::SourceUpdate<Vec<Event>>;

/// Events coalesce by the object they are about: a storm of updates to one object is one
/// pending event, the latest (see [`reconciler::pending`]).
impl Keyed for Event {
    type Key = ObjectKey;
    fn key(&self) -> ObjectKey {
        match self {
            Event::Apply(object) => object.key(),
            Event::Delete(key) => key.clone(),
        }
    }
}

/// The sources' end of the queue to the sync loop.
pub type SourceSender = pending::Sender<Event>;
/// The sync loop's end.
pub type SourceReceiver = pending::Receiver<Event>;

/// The queue from the sources to the sync loop, recording in `health` when changes are queued
/// and taken.
#[must_use]
pub fn channel(health: Option<Health>) -> (SourceSender, SourceReceiver) {
    pending::channel(health)
}

/// Where a source sends its updates: the sync loop's coalescing queue, or a plain channel that
/// keeps every event (for what watches a source's own stream: its tests, its benchmark).
pub trait SourceSink: Send + Sync + 'static {
    /// Sends `update`; fails once the receiving side is gone.
    fn send(&self, update: SourceUpdate) -> Result<(), Closed>;
    /// Resolves once the receiving side is gone.
    fn closed(&self) -> impl Future<Output = ()> + Send;
}

impl SourceSink for SourceSender {
    fn send(&self, update: SourceUpdate) -> Result<(), Closed> {
        pending::Sender::send(self, update)
    }

    fn closed(&self) -> impl Future<Output = ()> + Send {
        pending::Sender::closed(self)
    }
}

impl SourceSink for tokio::sync::mpsc::UnboundedSender<SourceUpdate> {
    fn send(&self, update: SourceUpdate) -> Result<(), Closed> {
        tokio::sync::mpsc::UnboundedSender::send(self, update).map_err(|_| Closed)
    }

    fn closed(&self) -> impl Future<Output = ()> + Send {
        tokio::sync::mpsc::UnboundedSender::closed(self)
    }
}

/// Folds one event into `state`. Skipped Services (headless, ExternalName, another proxy's,
/// no ClusterIP) are held as absent, so a Service that becomes skipped is removed; so are
/// Services over [`crate::convert::MAX_VIRTUAL_SERVERS_PER_SERVICE`], reported as a warning.
pub fn apply(state: &mut ClusterState, event: Event) -> Affected {
    let mut out = Affected::default();
    match event {
        Event::Apply(Model::Service { name, ports }) => {
            let ports = match ports {
                Ok(ports) => ports,
                Err(why @ Skipped::TooManyVirtualServers { .. }) => {
                    tracing::warn!(service = %name, %why, "service rejected");
                    Vec::new()
                }
                Err(why) => {
                    tracing::debug!(service = %name, %why, "service skipped");
                    Vec::new()
                }
            };
            out.services.extend(state.upsert_service(name, ports));
        }
        Event::Apply(Model::EndpointSlice { name, slice, .. }) => match slice {
            Some(model) => out.services = state.upsert_slice(name, model),
            None => out.services.extend(state.remove_slice(&name)),
        },
        Event::Apply(Model::Node { facts, .. }) => out.nodes = state.upsert_node(facts),
        Event::Delete(key) => match key.kind {
            Kind::Service => out.services.extend(state.remove_service(&ServiceName {
                namespace: key.namespace,
                name: key.name,
            })),
            Kind::EndpointSlice => {
                out.services
                    .extend(state.remove_slice(&(key.namespace, key.name)));
            }
            Kind::Node => out.nodes = state.remove_node(&key.name),
        },
    }
    out
}

/// Folds many events; returns everything they affected.
pub fn apply_all(state: &mut ClusterState, events: impl IntoIterator<Item = Event>) -> Affected {
    let mut out = Affected::default();
    // A first list or a relist is tens of thousands of events: de-duplicate in O(1) each.
    let mut seen: HashSet<ServiceName> = HashSet::new();
    for e in events {
        let affected = apply(state, e);
        out.nodes |= affected.nodes;
        out.services.extend(
            affected
                .services
                .into_iter()
                .filter(|s| seen.insert(s.clone())),
        );
    }
    out
}

/// Folds a batch of events into `state` and counts its Service and EndpointSlice changes: the
/// function the sync loop is given for this crate's sources.
pub fn fold(state: &mut ClusterState, events: Vec<Event>) -> Folded {
    let (mut service_changes, mut endpoint_changes) = (0, 0);
    let mut endpoint_triggers = Vec::new();
    for e in &events {
        let kind = match e {
            Event::Apply(Model::Service { .. }) => Kind::Service,
            Event::Apply(Model::EndpointSlice { trigger, .. }) => {
                endpoint_triggers.push(*trigger);
                Kind::EndpointSlice
            }
            Event::Apply(Model::Node { .. }) => Kind::Node,
            Event::Delete(k) => {
                if k.kind == Kind::EndpointSlice {
                    endpoint_triggers.push(None);
                }
                k.kind
            }
        };
        match kind {
            Kind::Service => service_changes += 1,
            Kind::EndpointSlice => endpoint_changes += 1,
            Kind::Node => {}
        }
    }
    Folded {
        affected: apply_all(state, events),
        service_changes,
        endpoint_changes,
        endpoint_triggers,
    }
}
