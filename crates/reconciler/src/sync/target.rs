//! A Service's plan as kernel values: what the engine diffs against its mirror.

use std::net::IpAddr;

use ipvs::{RealServer, VirtualServer};

use super::kernel::NetfilterEntry;
use crate::plan::ServicePlan;

/// Everything one Service puts into the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceTarget {
    pub virtual_servers: Vec<(VirtualServer, Vec<RealServer>)>,
    /// Addresses for `kube-ipvs0`.
    pub addresses: Vec<IpAddr>,
    pub netfilter: Vec<NetfilterEntry>,
}

impl ServiceTarget {
    pub(super) fn is_empty(&self) -> bool {
        self.virtual_servers.is_empty() && self.addresses.is_empty() && self.netfilter.is_empty()
    }
}

impl From<ServicePlan> for ServiceTarget {
    fn from(plan: ServicePlan) -> Self {
        ServiceTarget {
            virtual_servers: plan
                .virtual_servers
                .into_iter()
                .map(|v| (v.virtual_server, v.real_servers))
                .collect(),
            addresses: plan.addresses.into_iter().collect(),
            netfilter: plan
                .set_entries
                .into_iter()
                .map(|(family, set, entry)| NetfilterEntry::Set { family, set, entry })
                .chain(
                    plan.lb_no_node_access
                        .into_iter()
                        .map(|(ip, protocol, port)| NetfilterEntry::NoNodeAccess {
                            ip,
                            protocol,
                            port,
                        }),
                )
                .collect(),
        }
    }
}
