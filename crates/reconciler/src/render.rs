//! A plan printed in the kernel tools' own formats, sorted, for `ipvs-proxy plan` and for
//! tests: `ipvsadm -Sn`, the kube-ipvs0 addresses, `ipset save`, `iptables-save`.

use std::fmt::Write as _;

use iptables::Family;
use iptables::ipvs_mode::{render_save, ruleset};

use crate::plan::{Plan, PlanConfig};

impl Plan {
    /// `ipvsadm -Sn` lines: each virtual server, then its real servers.
    #[must_use]
    pub fn render_ipvsadm(&self) -> String {
        let mut out = String::new();
        for vs in self.virtual_servers.values() {
            let _ = writeln!(out, "{}", vs.virtual_server);
            for rs in &vs.real_servers {
                let _ = writeln!(out, "{}", rs.line(&vs.virtual_server.key));
            }
        }
        out
    }

    /// kube-ipvs0's addresses, one `ADDR/32` (or `/128`) a line.
    #[must_use]
    pub fn render_addresses(&self) -> String {
        let mut out = String::new();
        for a in &self.addresses {
            let len = if a.is_ipv4() { 32 } else { 128 };
            let _ = writeln!(out, "{a}/{len}");
        }
        out
    }

    /// Every set as `ipset save` prints it, IPv4 sets first, in kube-proxy's set order.
    #[must_use]
    pub fn render_ipsets(&self) -> String {
        let sets: Vec<iptables::IpSet> = self
            .sets
            .iter()
            .map(|((family, set), entries)| set.to_ipset(*family, entries))
            .collect();
        iptables::ipset::render_save(&sets)
    }

    /// The ipvs-mode rules of `family` as `iptables-save` (or `ip6tables-save`) prints them.
    #[must_use]
    pub fn render_iptables(&self, config: &PlanConfig, family: Family) -> String {
        render_save(&ruleset(&self.rule_input(config, family)))
    }
}
