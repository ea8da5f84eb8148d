//! `/metrics` speaks kube-proxy's names, so existing dashboards and alerts keep working.

use std::time::{Duration, SystemTime};

use telemetry::proxy::{IpFamilyLabel, Metrics, TableLabel};

#[test]
fn kube_proxy_metric_names_are_exported() {
    let m = Metrics::new();
    let ipv4 = IpFamilyLabel { ip_family: "IPv4" };
    m.observe_sync(
        std::slice::from_ref(&ipv4),
        Duration::from_millis(3),
        true,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
    );
    m.service_changes_total.inc();
    m.conntrack_sync_duration
        .get_or_create(&ipv4)
        .observe(0.003);
    m.conntrack_deleted.get_or_create(&ipv4).inc_by(2);
    m.restore_failed(&ipv4, true);
    let ipv6 = IpFamilyLabel { ip_family: "IPv6" };
    m.restore_failed(&ipv6, false);
    let nat = TableLabel {
        table: "nat",
        ip_family: "IPv4",
    };
    m.observe_iptables_rules(&nat, 42, 7);
    let text = m.encode();
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\",ip_family=\"IPv4\"} 1",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1700000000",
        "kubeproxy_sync_proxy_rules_service_changes_total 1",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv6\"} 1",
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"} 1",
        "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\",ip_family=\"IPv4\"} 42",
        "kubeproxy_sync_proxy_rules_iptables_last{table=\"nat\",ip_family=\"IPv4\"} 7",
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
    assert!(
        !text.contains("partial_restore_failures_total{ip_family=\"IPv6\"}"),
        "{text}"
    );
    for (name, kind) in [
        ("kubeproxy_sync_proxy_rules_iptables_total", "gauge"),
        ("kubeproxy_sync_proxy_rules_iptables_last", "gauge"),
        (
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "counter",
        ),
    ] {
        assert_eq!(metric_type(&text, name), Some(kind), "{name} in\n{text}");
    }
}

/// The `# TYPE` line of `name` in `text`, if any.
fn metric_type<'t>(text: &'t str, name: &str) -> Option<&'t str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# TYPE {name} ")))
}

/// The value of the sample that starts with `prefix` (its name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
}

#[test]
fn process_metrics_are_read_at_each_scrape() {
    let m = Metrics::new();
    let ipv4 = IpFamilyLabel { ip_family: "IPv4" };
    m.observe_sync(
        &[ipv4],
        Duration::from_millis(3),
        true,
        Some(SystemTime::now()),
    );
    let text = m.encode();
    for (name, kind) in [
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(metric_type(&text, name), Some(kind), "{name} in\n{text}");
    }
    let now = telemetry::unix_seconds(SystemTime::now());
    let value = |prefix| sample(&text, prefix).unwrap_or_else(|| panic!("{prefix} in\n{text}"));
    // The counter moves with the CPU this process spends (in ticks of 10 ms).
    let spin = std::time::Instant::now();
    while spin.elapsed() < Duration::from_millis(100) {
        std::hint::black_box(spin.elapsed());
    }
    let later = sample(&m.encode(), "process_cpu_seconds_total ").unwrap();
    assert!(later > value("process_cpu_seconds_total "), "{later}");
    assert!(value("process_resident_memory_bytes ") > 0.0);
    assert!(value("process_virtual_memory_bytes ") >= value("process_resident_memory_bytes "));
    assert!(value("process_open_fds ") > 0.0);
    assert!(value("process_open_fds ") <= value("process_max_fds "));
    let started = value("process_start_time_seconds ");
    assert!(
        started <= now + 1.0 && started > now - 86_400.0,
        "{started} vs {now}"
    );
}

#[test]
fn build_info_carries_component_bases_labels() {
    let text = Metrics::new().encode();
    assert_eq!(metric_type(&text, "kubernetes_build_info"), Some("gauge"));
    let line = text
        .lines()
        .find(|l| l.starts_with("kubernetes_build_info{"))
        .unwrap_or_else(|| panic!("no kubernetes_build_info in\n{text}"));
    assert!(line.ends_with("} 1"), "{line}");
    let version = env!("CARGO_PKG_VERSION");
    for label in [
        "major=\"0\"".to_owned(),
        "minor=\"1\"".to_owned(),
        format!("git_version=\"v{version}\""),
        "git_commit=\"".to_owned(),
        "git_tree_state=\"".to_owned(),
        "build_date=\"".to_owned(),
        "go_version=\"rustc1.".to_owned(),
        "compiler=\"rustc\"".to_owned(),
        "platform=\"linux/".to_owned(),
    ] {
        assert!(line.contains(&label), "{label} in {line}");
    }
}
