//! The iptables proxier as the fallback of ipvs mode: converting the model to the
//! `iptables::proxier` input (the daemon decides at start which proxier runs).
//!
//! `ipvs-proxy plan --proxy-mode iptables` prints [`plan_iptables`]; the daemon, when it runs
//! the fallback, keeps an [`iptables::proxier::Proxier`] per family and calls its `sync` with
//! [`service_specs`].

use iptables::Family;
use iptables::proxier::{Backend, ProxierConfig, ServiceSpec, render};

use crate::model::{SessionAffinity, TrafficPolicy};
use crate::state::ClusterState;

/// The model's service ports, with their endpoints, as the iptables proxier takes them.
/// `node` is this node's name (for `local`).
#[must_use]
pub fn service_specs(state: &ClusterState, node: &str) -> Vec<ServiceSpec> {
    let mut specs = Vec::new();
    for (_, ports) in state.services() {
        for sp in ports {
            let backends = state
                .endpoints(&sp.name)
                .iter()
                .map(|e| Backend {
                    addr: std::net::SocketAddr::new(e.ip, e.port),
                    ready: e.conditions.ready,
                    serving: e.conditions.serving,
                    terminating: e.conditions.terminating,
                    local: e.is_local(node),
                })
                .collect();
            specs.push(ServiceSpec {
                name: sp.name.to_string(),
                protocol: sp.name.protocol,
                port: sp.port,
                cluster_ips: sp.cluster_ips.to_vec(),
                external_ips: sp.external_ips.to_vec(),
                load_balancer_ips: sp.load_balancer_ips.to_vec(),
                source_ranges: sp.load_balancer_source_ranges.to_vec(),
                node_port: sp.node_port,
                health_check_node_port: sp.health_check_node_port,
                affinity_seconds: match sp.session_affinity {
                    SessionAffinity::ClientIp { timeout_seconds } => Some(timeout_seconds),
                    SessionAffinity::None => None,
                },
                external_local: sp.external_traffic_policy == TrafficPolicy::Local,
                internal_local: sp.internal_traffic_policy == TrafficPolicy::Local,
                backends,
            });
        }
    }
    specs.sort_by(|a, b| (&a.name, a.protocol).cmp(&(&b.name, b.protocol)));
    specs
}

/// What `plan --proxy-mode iptables` prints for one family: the proxier's chains as
/// `iptables-save` prints them (sorted, deterministic).
#[must_use]
pub fn plan_iptables(state: &ClusterState, node: &str, config: &ProxierConfig) -> String {
    let specs = service_specs(state, node);
    render(config, &specs).save_text(config)
}

/// The proxier configuration for `family` from the daemon's flags.
#[must_use]
pub fn proxier_config(
    family: Family,
    masquerade_bit: u8,
    masquerade_all: bool,
    cluster_cidr: Option<ipnet::IpNet>,
) -> ProxierConfig {
    ProxierConfig {
        family,
        masquerade_bit,
        masquerade_all,
        cluster_cidr,
        ..ProxierConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_state_plans_only_the_base_chains() {
        let text = plan_iptables(&ClusterState::new(), "node-a", &ProxierConfig::default());
        assert!(text.contains("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"));
        assert!(!text.contains("KUBE-SVC-"));
    }
}
