//! The proxy's model and its logic: Services and Endpoints in, desired kernel state out, and the
//! smallest set of operations that moves the kernel from what it has to what it should have.
//!
//! Pure logic plus one apply loop: this crate never opens a socket or runs a process itself;
//! the kernel backends are traits it is handed, and what it learns goes to an [`Observer`].
//!
//! - [`model`], [`state`]: Service ports, endpoints and node facts; the cluster as known.
//! - [`settings`], [`plan`], [`render`]: the flags' settings, the desired state per Service,
//!   and `ipvs-proxy plan`'s text; [`check`]: the kernel as read back compared with a plan.
//! - [`pending`]: the bounded queue from the sources to the loop, one change per object;
//!   [`sync_loop`]: coalescing, min/max sync periods, drain ticks, repair after a failure,
//!   [`retries`] of refused Services; [`health`]: what `/healthz` and `/livez` answer.
//! - [`engine`]: the IPVS proxier over [`sync`] (backend traits, mirror, diff, sending) and the
//!   iptables proxier over [`fallback`]'s conversion.
//! - [`conntrack`]: kube-proxy's conntrack reconciler, run by the loop after each sync for
//!   either proxier: which UDP and SCTP entries are stale, and their deletion.
//! - [`testing`]: in-memory kernels for the tests and the host benchmarks.
// Denied, not forbidden: one call, the kernel read's thread lowering its own priority
// (`sync::resync`), has no safe wrapper.
#![deny(unsafe_code)]

pub mod check;
pub mod conntrack;
pub mod engine;
mod error;
pub mod fallback;
pub mod health;
pub mod model;
pub mod pending;
pub mod plan;
pub mod render;
pub mod retries;
pub mod settings;
pub mod state;
pub mod sync;
pub mod sync_loop;
pub mod testing;

pub use error::Error;
pub use model::{
    Conditions, Endpoint, EndpointPort, EndpointSlice, Hints, NodeFacts, Protocol, SchedulerChoice,
    ServiceName, ServicePort, ServicePortName, ServiceType, SessionAffinity, TrafficPolicy,
    ZoneHints,
};
pub use plan::{
    DetectLocal, NodePortFilter, Plan, PlanConfig, PlanWarning, PlannedVirtualServer, Planner,
    ServicePlan, node_port_addresses,
};
pub use settings::Settings;
pub use state::{Affected, ClusterState, SliceName};
pub use sync_loop::{
    Folded, HealthChecks, Observer, Restart, ServiceHealth, SourceUpdate, SyncLoop, SyncRecord,
};
