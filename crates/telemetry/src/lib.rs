//! What a Kubernetes component's `/metrics` says of the process itself, as kube-proxy exports
//! it through client_golang and component-base: the process collector's `process_*` metrics,
//! read from `/proc/self` at each scrape ([`process`]), and the constant
//! `kubernetes_build_info` ([`build_info`]). Both are prometheus-client
//! [`Collector`](prometheus_client::collector::Collector)s the daemon registers. Also
//! kube-proxy's histogram [`buckets`] and how its timestamps are given ([`unix_seconds`]),
//! and the daemon's whole registry: every metric it exports ([`proxy::Metrics`]).
//!
//! This crate only reads the process's own files under `/proc`; it never writes anything and
//! knows nothing of Services or the kernel's tables.
#![forbid(unsafe_code)]

pub mod buckets;
pub mod build_info;
pub mod labels;
pub mod process;
pub mod proxy;

use std::time::SystemTime;

pub use build_info::BuildInfo;
pub use process::{ProcessCollector, ProcessStats};

/// Seconds since the Unix epoch, as Prometheus timestamps are given.
#[must_use]
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}
