//! What the sync loop reports, turned into the daemon's health and kube-proxy's metrics.

use std::sync::Arc;
use std::time::SystemTime;

use healthcheck::{Desired, ServiceHealthServers, ServiceKey};
use ipvs::Family;
use reconciler::conntrack::Reconciled;
use reconciler::sync::{Counts, SyncError};
use reconciler::{Folded, HealthChecks, Observer, SyncRecord};

use crate::health::Health;
use telemetry::proxy::{IpFamilyLabel, KernelErrorLabel, Metrics, TableLabel, TrafficPolicyLabel};
use telemetry::unix_seconds;

/// The loop's [`Observer`]: health for `/healthz` and `/livez`, `/metrics`, service health ports.
#[derive(Debug, Clone)]
pub struct Telemetry {
    pub health: Health,
    pub metrics: Arc<Metrics>,
    pub service_health: ServiceHealthServers,
    /// Events on refused Services, when following the Kubernetes API.
    pub events: Option<controllers::events::EventSender>,
}

fn gauge(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

impl Observer for Telemetry {
    fn node_eligible(&self, eligible: bool) {
        self.health.set_node_eligible(eligible);
    }

    fn queued(&self, folded: &Folded, pending: (u64, u64), at: SystemTime, families: &[Family]) {
        let m = &self.metrics;
        for &family in families {
            let stamp = m
                .last_queued_timestamp
                .get_or_create(&IpFamilyLabel::new(family.kubernetes_name()));
            stamp.set(unix_seconds(at));
        }
        m.service_changes_total.inc_by(folded.service_changes);
        m.endpoint_changes_total.inc_by(folded.endpoint_changes);
        m.service_changes_pending.set(gauge(pending.0));
        m.endpoint_changes_pending.set(gauge(pending.1));
    }

    fn synced(&self, record: &SyncRecord) {
        let m = &self.metrics;
        let succeeded = record.healthy.then_some(record.finished);
        let families: Vec<_> = record
            .families
            .iter()
            .map(|f| IpFamilyLabel::new(f.kubernetes_name()))
            .collect();
        m.observe_sync(&families, record.took, record.full, succeeded);
        for family in &families {
            let histogram = m.network_programming_duration.get_or_create(family);
            record
                .programming_latencies
                .iter()
                .for_each(|l| histogram.observe(l.as_secs_f64()));
        }
        for rules in &record.iptables_rules {
            let (table, ip_family) = (rules.table, rules.family.kubernetes_name());
            let (total, last) = (gauge(rules.total), gauge(rules.written));
            m.observe_iptables_rules(&TableLabel { table, ip_family }, total, last);
        }
        m.service_changes_pending.set(0);
        m.endpoint_changes_pending.set(0);
        if record.healthy {
            self.health.synced(record.finished);
        }
    }

    fn caught_up(&self) {
        self.health.caught_up();
    }

    fn errors(&self, errors: &[SyncError], partial: bool, families: &[Family]) {
        let m = &self.metrics;
        for e in errors {
            if matches!(e.backend(), "iptables" | "netfilter") {
                // Its own family's failure, or (the ipvs mode's restore of all) each family's.
                let own = e.family().map(|f| [f]);
                for f in own.as_ref().map_or(families, <[Family; 1]>::as_slice) {
                    let label = IpFamilyLabel::new(f.kubernetes_name());
                    m.restore_failed(&label, partial && e.backend() == "iptables");
                }
            }
            self.metrics
                .kernel_operation_errors
                .get_or_create(&KernelErrorLabel {
                    backend: e.backend(),
                    kind: e.kind().to_owned(),
                })
                .inc();
        }
    }

    fn reported(&self, errors: &[&SyncError]) {
        self.events.iter().for_each(|events| events.report(errors));
    }

    fn counts(&self, counts: Counts) {
        let m = &self.metrics;
        m.virtual_servers.set(gauge(counts.virtual_servers));
        m.real_servers.set(gauge(counts.real_servers));
        m.real_servers_draining.set(gauge(counts.draining));
    }

    fn no_local_endpoints(&self, family: Family, internal: u64, external: u64) {
        let ip_family = family.kubernetes_name();
        for (traffic_policy, n) in [("internal", internal), ("external", external)] {
            let label = TrafficPolicyLabel {
                ip_family,
                traffic_policy,
            };
            self.metrics
                .no_local_endpoints
                .get_or_create(&label)
                .set(gauge(n));
        }
    }

    fn health_checks(&self, checks: &HealthChecks) {
        let services = checks.services.iter().map(|h| {
            let key = ServiceKey::new(&h.service.namespace, &h.service.name);
            (key, h.port.map(Desired::from))
        });
        let (addresses, complete) = (&checks.addresses, checks.complete);
        let failed = self.service_health.update(addresses, services, complete);
        let m = &self.metrics;
        m.service_health_bind_failures.inc_by(failed.len() as u64);
    }

    fn conntrack_reconciled(&self, reconciled: &Reconciled) {
        let label = IpFamilyLabel {
            ip_family: reconciled.ip_family(),
        };
        let m = &self.metrics;
        let took = reconciled.took.as_secs_f64();
        m.conntrack_sync_duration
            .get_or_create(&label)
            .observe(took);
        m.conntrack_deleted
            .get_or_create(&label)
            .inc_by(reconciled.deleted);
    }
}
