//! A plan printed in the kernel tools' own formats, sorted, for `ipvs-proxy plan` and for
//! tests: `ipvsadm -Sn`, the kube-ipvs0 addresses, `ipset save`, `iptables-save`.

use std::fmt::Write as _;

use iptables::Family;
use iptables::ipvs_mode::{render_save, ruleset};

use crate::plan::{Plan, PlanConfig};

/// One part of what `plan` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `ipvsadm -Sn`.
    Ipvs,
    /// The addresses on `kube-ipvs0`.
    Addresses,
    /// `ipset save`.
    Ipsets,
    /// `iptables-save` (and `ip6tables-save`).
    Iptables,
}

/// The `iptables-save` header of `family`'s rules.
pub(crate) fn save_header(family: Family) -> &'static str {
    match family {
        Family::V4 => "# iptables-save\n",
        Family::V6 => "# ip6tables-save\n",
    }
}

impl Plan {
    /// What `plan` prints: every section under its header, or only `only`, bare. The rules
    /// of a second family always come under their own header.
    #[must_use]
    pub fn render(&self, config: &PlanConfig, only: Option<Section>) -> String {
        let iptables = || {
            let mut s = String::new();
            for (i, family) in config.families.iter().enumerate() {
                if i > 0 || (only.is_none() && *family == Family::V6) {
                    s.push_str(save_header(*family));
                }
                s.push_str(&self.render_iptables(config, *family));
            }
            s
        };
        match only {
            Some(Section::Ipvs) => self.render_ipvsadm(),
            Some(Section::Addresses) => self.render_addresses(),
            Some(Section::Ipsets) => self.render_ipsets(),
            Some(Section::Iptables) => iptables(),
            None => {
                let v4_header = if config.families.first() == Some(&Family::V4) {
                    save_header(Family::V4)
                } else {
                    ""
                };
                format!(
                    "# ipvsadm -Sn\n{}# kube-ipvs0\n{}# ipset save\n{}{v4_header}{}",
                    self.render_ipvsadm(),
                    self.render_addresses(),
                    self.render_ipsets(),
                    iptables()
                )
            }
        }
    }

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
