//! What the daemon's flags fix for the life of the process, and the planning configuration
//! they give together with what the cluster says about this node.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use iptables::Family;
use netif::NodeAddresses;

use crate::plan::{DetectLocal, NodePortFilter, PlanConfig, node_port_addresses};
use crate::state::ClusterState;

/// The flags the reconciler reads: how to plan, what never to touch, how often to sync.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The planning settings the flags fix (scheduler, masquerading, cluster CIDRs, node
    /// name); the node's addresses, its NodePort addresses and the families are filled in from
    /// the cluster by [`Settings::plan_config`].
    pub plan: PlanConfig,
    /// `--node-ip`: the node's addresses when given, instead of the Node object's.
    pub node_ips: Vec<IpAddr>,
    /// `--nodeport-addresses`.
    pub node_port_filter: NodePortFilter,
    /// `--ipvs-exclude-cidrs`: virtual servers inside these are never touched.
    pub exclude_cidrs: Vec<IpNet>,
    /// `--ipvs-sync-period`: how often everything is re-read and re-programmed.
    pub sync_period: Duration,
    /// `--ipvs-min-sync-period`: the least time between two syncs.
    pub min_sync_period: Duration,
}

impl Default for Settings {
    /// kube-proxy's defaults for ipvs mode.
    fn default() -> Self {
        Settings {
            plan: PlanConfig::default(),
            node_ips: Vec::new(),
            node_port_filter: NodePortFilter::default(),
            exclude_cidrs: Vec::new(),
            sync_period: Duration::from_secs(30),
            min_sync_period: Duration::ZERO,
        }
    }
}

impl Settings {
    /// The planner's configuration for the cluster as `state` has it, without the kernel's
    /// addresses (as `ipvs-proxy plan` plans): see [`Settings::plan_config_with`].
    #[must_use]
    pub fn plan_config(&self, state: &ClusterState) -> PlanConfig {
        self.plan_config_with(state, None)
    }

    /// The planner's configuration for the cluster as `state` has it and the node's addresses
    /// as the kernel has them on every link but `kube-ipvs0` (`local`, when known; the daemon
    /// follows them with netif's `AddressMonitor`): this node's zone and addresses
    /// (`--node-ip`, else the Node object's), the NodePort addresses
    /// ([`node_port_addresses`]), the Node's podCIDRs in NodeCIDR mode, and one family for
    /// each the node or a Service's ClusterIP has (IPv4 when there is none).
    #[must_use]
    pub fn plan_config_with(
        &self,
        state: &ClusterState,
        local: Option<&NodeAddresses>,
    ) -> PlanConfig {
        let node_addresses: Vec<IpAddr> = if self.node_ips.is_empty() {
            state
                .node(&self.plan.node_name)
                .map(|n| n.addresses.clone())
                .unwrap_or_default()
        } else {
            self.node_ips.clone()
        };
        let filter = &self.node_port_filter;
        let local = local.map(|l| &l.addresses);
        let node_port_ips = node_port_addresses(&node_addresses, local, filter);
        let mut families = Vec::new();
        for family in Family::ALL {
            let node_has = node_addresses.iter().any(|a| Family::of(*a) == family);
            let services_have = state.services_any_order().any(|(_, ports)| {
                ports
                    .iter()
                    .any(|p| p.cluster_ips.iter().any(|ip| Family::of(*ip) == family))
            });
            if node_has || services_have {
                families.push(family);
            }
        }
        if families.is_empty() {
            families.push(Family::V4);
        }
        let node = state.node(&self.plan.node_name);
        // Read only where they are used, so that a change elsewhere costs no replan.
        let node_pod_cidrs = match (&self.plan.detect_local, node) {
            (DetectLocal::NodeCidr, Some(n)) => n.pod_cidrs.clone(),
            _ => Vec::new(),
        };
        PlanConfig {
            node_zone: node.and_then(|n| n.zone.clone()),
            node_pod_cidrs,
            node_addresses,
            node_port_ips,
            node_ports_everywhere: filter.cidrs.is_empty() && !filter.primary,
            families,
            ..self.plan.clone()
        }
    }
}
