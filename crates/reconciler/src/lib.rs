//! The proxy's model and its logic: Services and Endpoints in, desired kernel state out, and the
//! smallest set of operations that moves the kernel from what it has to what it should have.
//!
//! Pure logic plus one apply loop: this crate never opens a socket or runs a process itself;
//! the kernel backends are traits it is handed.
#![forbid(unsafe_code)]

pub mod fallback;
pub mod ipvs_state;
pub mod model;
pub mod plan;
mod render;
pub mod state;
pub mod sync;

pub use ipvs_state::{RealServer, VirtualServer, VirtualServerKey};
pub use model::{
    Conditions, Endpoint, EndpointPort, EndpointSlice, NodeFacts, Protocol, SchedulerChoice,
    ServiceName, ServicePort, ServicePortName, ServiceType, SessionAffinity, TrafficPolicy,
};
pub use plan::{
    NodePortFilter, Plan, PlanConfig, PlanWarning, PlannedVirtualServer, Planner, ServicePlan,
    node_port_addresses,
};
pub use state::{ClusterState, SliceName};
