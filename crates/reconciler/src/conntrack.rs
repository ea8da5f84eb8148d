//! Stale conntrack entries of UDP and SCTP Services, deleted after a sync as kube-proxy 1.36's
//! conntrack reconciler does (`pkg/proxy/conntrack/cleanup.go`, `CleanStaleEntries`).
//!
//! UDP has no connection for the kernel to end: while a client keeps sending, its conntrack
//! entry keeps pointing at the endpoint chosen for the first packet, even after that endpoint
//! is gone (the client sends into a black hole until the entry expires), and an entry made
//! while a Service had no endpoint keeps its packets un-NATed after the first endpoint comes.
//! So, per family and protocol, the entries are listed and an entry is deleted when its
//! original destination is a Service's IP and port (ClusterIP, externalIP, LoadBalancer
//! ingress IP) or any address at the Service's NodePort, and its reply source (the endpoint
//! that answers, after DNAT or IPVS) is not one of that Service port's serving endpoints, as
//! IP and port. A Service with no serving endpoint has every such entry deleted. Traffic
//! policies, topology and terminating state are not considered, as upstream: they choose
//! endpoints for new flows and must not end flows to an endpoint still serving.
//!
//! Upstream cleans UDP only; SCTP is cleaned too here (the issue asks it, and an SCTP entry
//! to a removed endpoint is as dead as a UDP one).
//!
//! The decision ([`Frontends::stale`]) is pure; [`reconcile`] lists and deletes through a
//! [`ConntrackKernel`]. The loop runs it after a healthy sync with the frontends of the
//! Services that sync synced (all of them after a full sync): a sync that touched no UDP or
//! SCTP Service lists nothing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use conntrack::{Deleted, Flow};
use inet::Family;

use crate::model::{Protocol, ServicePort};
use crate::state::ClusterState;

/// The conntrack table as the loop needs it; the real one is [`conntrack::Conntrack`], a fake
/// in the tests.
pub trait ConntrackKernel: Send {
    /// `conntrack -L -f FAMILY -p PROTOCOL`.
    fn flows(&mut self, family: Family, protocol: Protocol) -> Result<Vec<Flow>, conntrack::Error>;
    /// `conntrack -D` of each flow, by its exact tuple.
    fn delete(&mut self, flows: &[Flow]) -> Result<Deleted, conntrack::Error>;
}

impl ConntrackKernel for conntrack::Conntrack {
    fn flows(&mut self, family: Family, protocol: Protocol) -> Result<Vec<Flow>, conntrack::Error> {
        self.dump(family, protocol)
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<Deleted, conntrack::Error> {
        conntrack::Conntrack::delete(self, flows)
    }
}

/// The protocols whose flows are reconciled.
const RECONCILED: [Protocol; 2] = [Protocol::Udp, Protocol::Sctp];

/// The UDP and SCTP frontends of some Services, each with the endpoints that may answer it.
#[derive(Debug, Default)]
pub struct Frontends {
    /// The serving endpoints of each Service port and family, shared by its frontends.
    serving: Vec<HashSet<SocketAddr>>,
    /// (protocol, Service IP, port) → index into `serving`.
    addresses: HashMap<(Protocol, IpAddr, u16), usize>,
    /// (protocol, family, NodePort) → index into `serving`.
    node_ports: HashMap<(Protocol, Family, u16), usize>,
    /// The (family, protocol) tables to list.
    tables: BTreeSet<(Family, Protocol)>,
}

impl Frontends {
    /// The frontends of `services` (each a Service's ports), with their endpoints from `state`.
    #[must_use]
    pub fn new<'a>(
        state: &ClusterState,
        services: impl IntoIterator<Item = &'a [ServicePort]>,
    ) -> Self {
        let mut frontends = Frontends::default();
        for port in services.into_iter().flatten() {
            if RECONCILED.contains(&port.name.protocol) {
                frontends.add(port, &state.endpoints(&port.name));
            }
        }
        frontends
    }

    /// Adds one Service port's frontends, per family of its ClusterIPs.
    fn add(&mut self, port: &ServicePort, endpoints: &[crate::model::Endpoint]) {
        let protocol = port.name.protocol;
        for family in port.cluster_ips.iter().map(|ip| Family::of(*ip)) {
            let index = self.serving.len();
            self.serving.push(
                endpoints
                    .iter()
                    .filter(|e| e.conditions.serving && Family::of(e.ip) == family)
                    .map(|e| SocketAddr::new(e.ip, e.port))
                    .collect(),
            );
            let vips = port
                .cluster_ips
                .iter()
                .chain(port.external_ips.iter())
                .chain(port.load_balancer_ips.iter())
                .filter(|ip| Family::of(**ip) == family);
            for ip in vips {
                self.addresses.insert((protocol, *ip, port.port), index);
            }
            if let Some(node_port) = port.node_port {
                self.node_ports.insert((protocol, family, node_port), index);
            }
            self.tables.insert((family, protocol));
        }
    }

    /// Whether there is nothing to reconcile (no UDP or SCTP frontend): nothing is listed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The flows of `flows` that go to one of these frontends but are answered by no serving
    /// endpoint of it.
    #[must_use]
    pub fn stale(&self, flows: &[Flow]) -> Vec<Flow> {
        flows.iter().filter(|f| self.is_stale(f)).copied().collect()
    }

    fn is_stale(&self, flow: &Flow) -> bool {
        let Some(protocol) = Protocol::from_number(flow.protocol) else {
            return false;
        };
        let answered_by = SocketAddr::new(flow.reply.src, flow.reply.src_port);
        let to = &flow.original;
        let frontend = [
            self.addresses.get(&(protocol, to.dst, to.dst_port)),
            self.node_ports
                .get(&(protocol, Family::of(to.dst), to.dst_port)),
        ];
        frontend
            .into_iter()
            .flatten()
            .any(|&index| !self.serving[index].contains(&answered_by))
    }
}

/// One family's reconciliation, for kube-proxy's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    pub family: Family,
    /// Listing, deciding and deleting, over the family's protocols.
    pub took: Duration,
    /// Entries the kernel deleted.
    pub deleted: u64,
}

impl Reconciled {
    /// kube-proxy's `ip_family` label: `IPv4` or `IPv6`.
    #[must_use]
    pub fn ip_family(&self) -> &'static str {
        match self.family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// What one reconciliation did: per family, and what failed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub families: Vec<Reconciled>,
    /// A table that could not be listed or written, or an entry the kernel would not delete.
    pub errors: Vec<String>,
}

/// Lists each family and protocol `frontends` needs, deletes the stale flows, and reports per
/// family. A failure ends that table's run only; the next sync tries again.
pub fn reconcile(kernel: &mut dyn ConntrackKernel, frontends: &Frontends) -> Outcome {
    let mut out = Outcome::default();
    for &(family, protocol) in &frontends.tables {
        let started = Instant::now();
        let deleted = match clean(kernel, frontends, family, protocol) {
            Ok(done) => {
                let refused = done.failed.iter();
                out.errors
                    .extend(refused.map(|e| format!("stale entry not deleted: {e}")));
                done.deleted as u64
            }
            Err(error) => {
                out.errors
                    .push(format!("{family:?} {protocol} entries: {error}"));
                0
            }
        };
        let took = started.elapsed();
        match out.families.last_mut() {
            Some(last) if last.family == family => {
                last.took += took;
                last.deleted += deleted;
            }
            _ => out.families.push(Reconciled {
                family,
                took,
                deleted,
            }),
        }
    }
    out
}

/// The table the loop reconciles, and its last failure: a failure that persists (a kernel
/// without ctnetlink, say) is logged once, not after every sync.
pub struct Reconciler {
    table: Box<dyn ConntrackKernel>,
    failing: Option<String>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("failing", &self.failing)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    #[must_use]
    pub fn new(table: Box<dyn ConntrackKernel>) -> Self {
        Reconciler {
            table,
            failing: None,
        }
    }

    /// [`reconcile`], logging its first error when it differs from the last run's.
    pub fn run(&mut self, frontends: &Frontends) -> Vec<Reconciled> {
        let outcome = reconcile(&mut *self.table, frontends);
        let first = outcome.errors.first();
        if first != self.failing.as_ref() {
            if let Some(error) = first {
                let errors = outcome.errors.len();
                tracing::warn!(errors, "conntrack reconciliation failed: {error}");
            } else {
                tracing::info!("conntrack reconciliation works again");
            }
            self.failing = first.cloned();
        }
        outcome.families
    }
}

fn clean(
    kernel: &mut dyn ConntrackKernel,
    frontends: &Frontends,
    family: Family,
    protocol: Protocol,
) -> Result<Deleted, conntrack::Error> {
    let flows = kernel.flows(family, protocol)?;
    let stale = frontends.stale(&flows);
    if stale.is_empty() {
        return Ok(Deleted::default());
    }
    let done = kernel.delete(&stale)?;
    tracing::debug!(?family, %protocol, listed = flows.len(), deleted = done.deleted, "stale conntrack entries deleted");
    Ok(done)
}

#[cfg(test)]
#[path = "conntrack_tests.rs"]
mod tests;
