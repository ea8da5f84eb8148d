//! `/metrics` speaks kube-proxy's names, so existing dashboards and alerts keep working.

use std::time::{Duration, SystemTime};

use ipvs_proxy::metrics::{IpFamilyLabel, Metrics};

#[test]
fn kube_proxy_metric_names_are_exported() {
    let m = Metrics::new();
    m.observe_sync(
        Duration::from_millis(3),
        true,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
    );
    m.service_changes_total.inc();
    let ipv4 = IpFamilyLabel { ip_family: "IPv4" };
    m.conntrack_sync_duration
        .get_or_create(&ipv4)
        .observe(0.003);
    m.conntrack_deleted.get_or_create(&ipv4).inc_by(2);
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
        "kubeproxy_conntrack_reconciler_sync_duration_seconds_bucket{le=\"0.004\",ip_family=\"IPv4\"} 1",
        "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 2",
        "ipvsproxy_virtual_servers 0",
        "ipvsproxy_real_servers_draining 0",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "missing {name:?} in\n{text}"
        );
    }
}
