//! The daemon's Prometheus metrics under kube-proxy's names (subsystem `kubeproxy`), so
//! existing dashboards and alerts keep working, plus ipvs-proxy's own (`ipvsproxy_*`), the
//! process collector's `process_*` and `kubernetes_build_info`, in one registry.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

pub use crate::labels::{IpFamilyLabel, TableLabel, TrafficPolicyLabel};
use crate::{buckets, unix_seconds};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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
/// One metric per IP family, as kube-proxy's per-family proxiers export theirs.
type ByFamily<M> = Family<IpFamilyLabel, M>;

/// Declares every metric once: its field, its type and first value, its name (under the
/// prefix) and its help text; the struct, its constructor and the registration follow.
macro_rules! metrics {
    ($($prefix:literal {
        $($field:ident: $ty:ty = $init:expr, $name:literal, $help:literal;)*
    })*) => {
        /// Every metric the proxy exports. Cheap to share behind an `Arc`.
        #[derive(Debug)]
        pub struct Metrics {
            registry: Registry,
            $($(pub $field: $ty,)*)*
        }

        impl Metrics {
            #[must_use]
            pub fn new() -> Metrics {
                let mut registry = Registry::default();
                $(
                    let sub = registry.sub_registry_with_prefix($prefix);
                    $(
                        let $field: $ty = $init;
                        sub.register($name, $help, $field.clone());
                    )*
                )*
                registry.register_collector(Box::new(crate::ProcessCollector));
                registry.register_collector(Box::new(crate::BuildInfo::current()));
                Metrics { registry, $($($field,)*)* }
            }
        }
    };
}

metrics! {
    "kubeproxy" {
        sync_duration: ByFamily<Histogram> = Family::new_with_constructor(buckets::sync),
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds";
        sync_full_duration: ByFamily<Histogram> = Family::new_with_constructor(buckets::sync),
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs";
        sync_partial_duration: ByFamily<Histogram> =
            Family::new_with_constructor(buckets::sync),
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs";
        network_programming_duration: ByFamily<Histogram> =
            Family::new_with_constructor(buckets::network_programming),
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds";
        last_sync_timestamp: ByFamily<FloatGauge> = Family::default(),
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced";
        last_queued_timestamp: ByFamily<FloatGauge> = Family::default(),
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued";
        service_changes_pending: Gauge = Gauge::default(),
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes";
        service_changes_total: Counter = Counter::default(),
            "sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes";
        endpoint_changes_pending: Gauge = Gauge::default(),
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes";
        endpoint_changes_total: Counter = Counter::default(),
            "sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes";
        iptables_restore_failures: ByFamily<Counter> = Family::default(),
            "sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures";
        iptables_partial_restore_failures: ByFamily<Counter> = Family::default(),
            "sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures";
        iptables_rules_total: Family<TableLabel, Gauge> = Family::default(),
            "sync_proxy_rules_iptables_total", "Total number of iptables rules owned by kube-proxy";
        iptables_rules_last: Family<TableLabel, Gauge> = Family::default(),
            "sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync";
        no_local_endpoints: Family<TrafficPolicyLabel, Gauge> = Family::default(),
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints";
        healthz_requests: Family<CodeLabel, Counter> = Family::default(),
            "proxy_healthz", "Cumulative proxy healthz HTTP status";
        livez_requests: Family<CodeLabel, Counter> = Family::default(),
            "proxy_livez", "Cumulative proxy livez HTTP status";
        conntrack_sync_duration: Family<IpFamilyLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(buckets::sync),
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds";
        conntrack_deleted: Family<IpFamilyLabel, Counter> = Family::default(),
            "conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler";
    }
    "ipvsproxy" {
        virtual_servers: Gauge = Gauge::default(),
            "virtual_servers", "IPVS virtual servers programmed";
        real_servers: Gauge = Gauge::default(),
            "real_servers", "IPVS real servers programmed";
        real_servers_draining: Gauge = Gauge::default(),
            "real_servers_draining",
            "IPVS real servers at weight 0, waiting for their connections to end";
        kernel_operation_errors: Family<KernelErrorLabel, Counter> = Family::default(),
            "kernel_operation_errors",
            "Kernel operations refused, by backend and kind of error";
        service_health_bind_failures: Counter = Counter::default(),
            "service_health_bind_failures", "healthCheckNodePorts that could not be listened on";
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Records one completed sync of `families`.
    /// `succeeded` is when it ended, if it could program the kernel: only then does the
    /// last-sync timestamp move (so that staleness alerts fire while syncs fail).
    pub fn observe_sync(
        &self,
        families: &[IpFamilyLabel],
        took: Duration,
        full: bool,
        succeeded: Option<SystemTime>,
    ) {
        let partial = if full {
            &self.sync_full_duration
        } else {
            &self.sync_partial_duration
        };
        for family in families {
            self.sync_duration
                .get_or_create(family)
                .observe(took.as_secs_f64());
            partial.get_or_create(family).observe(took.as_secs_f64());
            if let Some(now) = succeeded {
                self.last_sync_timestamp
                    .get_or_create(family)
                    .set(unix_seconds(now));
            }
        }
    }

    /// The iptables proxier's rules in one table of one family after a sync: `total` in its
    /// chains, `last` written by the sync.
    pub fn observe_iptables_rules(&self, label: &TableLabel, total: i64, last: i64) {
        self.iptables_rules_total.get_or_create(label).set(total);
        self.iptables_rules_last.get_or_create(label).set(last);
    }

    /// An `iptables-restore` of one family failed; `partial` in a partial sync.
    pub fn restore_failed(&self, family: &IpFamilyLabel, partial: bool) {
        self.iptables_restore_failures.get_or_create(family).inc();
        if partial {
            let partial = &self.iptables_partial_restore_failures;
            partial.get_or_create(family).inc();
        }
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
