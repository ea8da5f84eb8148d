//! Prometheus metrics under kube-proxy's names (subsystem `kubeproxy`), so existing dashboards
//! and alerts keep working, plus ipvs-proxy's own (`ipvsproxy_*`).

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    pub traffic_policy: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

/// A kernel operation error: which backend refused it and what kind of error it was.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelErrorLabel {
    pub backend: &'static str,
    pub kind: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the proxy exports. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub network_programming_duration: Histogram,
    pub last_sync_timestamp: FloatGauge,
    pub last_queued_timestamp: FloatGauge,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub iptables_restore_failures: Counter,
    pub iptables_partial_restore_failures: Counter,
    pub no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
    pub healthz_requests: Family<CodeLabel, Counter>,
    pub livez_requests: Family<CodeLabel, Counter>,
    pub virtual_servers: Gauge,
    pub real_servers: Gauge,
    pub real_servers_draining: Gauge,
    pub kernel_operation_errors: Family<KernelErrorLabel, Counter>,
}

/// kube-proxy's buckets for sync durations: 1 ms doubling to about 16 s.
fn sync_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's buckets for network programming latency: 0.25 s up to 5 minutes.
fn programming_buckets() -> Histogram {
    let quarter = [0.25, 0.5];
    let seconds = (1..60).map(f64::from);
    let five = (0..12).map(|i| 60.0 + 5.0 * f64::from(i));
    let thirty = (0..7).map(|i| 120.0 + 30.0 * f64::from(i));
    Histogram::new(quarter.into_iter().chain(seconds).chain(five).chain(thirty))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    #[allow(
        clippy::too_many_lines,
        reason = "one registration per metric, read as a table"
    )]
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            sync_duration: sync_buckets(),
            sync_full_duration: sync_buckets(),
            sync_partial_duration: sync_buckets(),
            network_programming_duration: programming_buckets(),
            last_sync_timestamp: FloatGauge::default(),
            last_queued_timestamp: FloatGauge::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            iptables_restore_failures: Counter::default(),
            iptables_partial_restore_failures: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz_requests: Family::default(),
            livez_requests: Family::default(),
            virtual_servers: Gauge::default(),
            real_servers: Gauge::default(),
            real_servers_draining: Gauge::default(),
            kernel_operation_errors: Family::default(),
        };
        let kp = m.registry.sub_registry_with_prefix("kubeproxy");
        kp.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        kp.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        kp.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        kp.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming_duration.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        kp.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        kp.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        kp.register(
            "sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            m.iptables_restore_failures.clone(),
        );
        kp.register(
            "sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            m.iptables_partial_restore_failures.clone(),
        );
        kp.register(
            "sync_proxy_rules_no_local_endpoints",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        kp.register(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz_requests.clone(),
        );
        kp.register(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez_requests.clone(),
        );
        let ours = m.registry.sub_registry_with_prefix("ipvsproxy");
        ours.register(
            "virtual_servers",
            "IPVS virtual servers programmed",
            m.virtual_servers.clone(),
        );
        ours.register(
            "real_servers",
            "IPVS real servers programmed",
            m.real_servers.clone(),
        );
        ours.register(
            "real_servers_draining",
            "IPVS real servers at weight 0, waiting for their connections to end",
            m.real_servers_draining.clone(),
        );
        ours.register(
            "kernel_operation_errors",
            "Kernel operations refused, by backend and kind of error",
            m.kernel_operation_errors.clone(),
        );
        m
    }

    /// Records one completed sync.
    pub fn observe_sync(&self, duration: Duration, full: bool, now: SystemTime) {
        let secs = duration.as_secs_f64();
        self.sync_duration.observe(secs);
        if full {
            self.sync_full_duration.observe(secs);
        } else {
            self.sync_partial_duration.observe(secs);
        }
        self.last_sync_timestamp.set(unix_seconds(now));
    }

    /// Prometheus text exposition format.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Seconds since the Unix epoch, as Prometheus timestamps are given.
#[must_use]
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_metric_names_are_exported() {
        let m = Metrics::new();
        m.observe_sync(
            Duration::from_millis(3),
            true,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        m.service_changes_total.inc();
        let text = m.encode();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1700000000",
            "kubeproxy_sync_proxy_rules_service_changes_total 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 0",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"} 0",
            "ipvsproxy_virtual_servers 0",
            "ipvsproxy_real_servers_draining 0",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "missing {name:?} in\n{text}"
            );
        }
    }
}
