//! `ipvs-proxy check`: the live kernel compared with the plan, as lines of the kernel tools'
//! own formats prefixed `+` (the plan wants it, the kernel lacks it) or `-` (the proxy's, but
//! not wanted).
//!
//! Pure: the caller reads the kernel into [`Observed`]. Both sides are printed with the same
//! printers (`ipvsadm -Sn` lines, `ADDR/32`, `ipset save` lines, `iptables-save` lines as
//! parsed by `iptables::Saved`), so equal state gives equal text, and compared section by
//! section as line sets. Only what the sync would touch is
//! compared (its ownership rules, docs/sync.md "Ownership"): another tool's virtual servers,
//! firewall-mark services, sets not named as kube-proxy's and anything inside
//! `--ipvs-exclude-cidrs` are never reported. Real servers at weight 0 that the plan does not
//! want are draining, not extra. The iptables rules are compared in the chains the ipvs mode
//! writes (declarations and rules) and the jumps to them, per family and table, as line sets:
//! the order of rules in a chain is not compared.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use iptables::chain::IPVS_MODE_CHAINS;
use iptables::ipvs_mode::KubeSet;
use iptables::rule::rule_chain_and_target;
use iptables::{Family, IpSet, Saved, Table};
use ipvs::{RealServer, ServiceKey, VirtualServer};

use crate::plan::{Plan, PlanConfig};
use crate::render::{Section, save_header};
use crate::sync::SyncOptions;

/// What the kernel holds, as read by the caller.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Every virtual server with its real servers (`ipvsadm -Sn`).
    pub ipvs: Vec<(VirtualServer, Vec<RealServer>)>,
    /// The addresses on `kube-ipvs0` (none when the link is missing).
    pub addresses: BTreeSet<IpAddr>,
    /// Every set `ipset save` printed.
    pub sets: Vec<IpSet>,
    /// `iptables-save` (and `ip6tables-save`) of each family the plan has.
    pub rules: Vec<(Family, Saved)>,
}

impl Observed {
    /// From what the kernel answered: the IPVS dump (`ipvs::Handle::dump`), the addresses of
    /// `kube-ipvs0`, `ipset save`, and `iptables-save` of each family.
    #[must_use]
    pub fn new(
        dump: Vec<ipvs::TableEntry>,
        addresses: BTreeSet<IpAddr>,
        sets: Vec<IpSet>,
        rules: Vec<(Family, Saved)>,
    ) -> Self {
        let ipvs = dump
            .into_iter()
            .map(|e| {
                (
                    e.service.server,
                    e.real_servers.iter().map(|r| r.server).collect(),
                )
            })
            .collect();
        Observed {
            ipvs,
            addresses,
            sets,
            rules,
        }
    }
}

/// One line that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The plan wants it; the kernel lacks it.
    Missing(String),
    /// The kernel has it, it is the proxy's, and the plan does not want it.
    Extra(String),
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Missing(line) => write!(f, "+ {line}"),
            Difference::Extra(line) => write!(f, "- {line}"),
        }
    }
}

/// The differences of each part compared under its header (`# ipvsadm -Sn`, `# iptables-save
/// -t nat`), in `plan`'s section order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub sections: Vec<(String, Vec<Difference>)>,
}

impl Report {
    /// Whether the kernel equals the plan in every section compared.
    #[must_use]
    pub fn is_equal(&self) -> bool {
        self.sections.iter().all(|(_, d)| d.is_empty())
    }

    /// The differences under each section's header (`# ipvsadm -Sn`, as `plan` prints them);
    /// sections without any are left out, so an equal kernel prints nothing.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (header, differences) in self.sections.iter().filter(|(_, d)| !d.is_empty()) {
            let _ = writeln!(out, "{header}");
            for d in differences {
                let _ = writeln!(out, "{d}");
            }
        }
        out
    }
}

/// Compares `observed` with `plan` (planned with `config`), in `only` or in every section,
/// owning what the sync with `options` owns (its excluded ranges and
/// NodePort range).
#[must_use]
pub fn compare(
    plan: &Plan,
    config: &PlanConfig,
    observed: &Observed,
    options: &SyncOptions,
    only: Option<Section>,
) -> Report {
    let excluded = |ip: IpAddr| options.exclude_cidrs.iter().any(|n| n.contains(&ip));
    let mut report = Report::default();
    let wanted = |section| only.is_none_or(|o| o == section);
    if wanted(Section::Ipvs) {
        let owned = |key: &ServiceKey| match key {
            ServiceKey::Addr { addr, .. } => {
                let ip = addr.ip();
                let on_node =
                    config.node_port_ips.contains(&ip) || config.node_addresses.contains(&ip);
                let ours = observed.addresses.contains(&ip)
                    || (on_node && options.node_port_range.contains(&addr.port()))
                    || plan
                        .virtual_servers
                        .values()
                        .any(|v| v.virtual_server.key == *key);
                ours && !excluded(ip)
            }
            ServiceKey::Fwmark { .. } => false,
        };
        report.sections.push((
            "# ipvsadm -Sn".into(),
            ipvs_differences(plan, observed, owned),
        ));
    }
    if wanted(Section::Addresses) {
        let have: BTreeSet<IpAddr> = observed
            .addresses
            .iter()
            .copied()
            .filter(|ip| !excluded(*ip) || plan.addresses.contains(ip))
            .collect();
        report.sections.push((
            "# kube-ipvs0".into(),
            differences(
                &lines(&plan.render_addresses()),
                &have.iter().map(|a| address_line(*a)).collect::<Vec<_>>(),
            ),
        ));
    }
    if wanted(Section::Ipsets) {
        report
            .sections
            .push(("# ipset save".into(), set_differences(plan, observed)));
    }
    if wanted(Section::Iptables) {
        for (family, saved) in &observed.rules {
            let planned = Saved::parse(&plan.render_iptables(config, *family));
            for table in [Table::Nat, Table::Filter] {
                let header = format!("{} -t {}", save_header(*family).trim_end(), table.as_str());
                let d = differences(&rule_lines(&planned, table), &rule_lines(saved, table));
                report.sections.push((header, d));
            }
        }
    }
    report
}

/// The ipvs mode's chains of `table` as `iptables-save` printed them: their declarations
/// (counters zeroed), their rules, and the rules of other chains that jump to them.
fn rule_lines(saved: &Saved, table: Table) -> Vec<String> {
    let ours = |chain: &str| IPVS_MODE_CHAINS.contains(&(table, chain));
    let Some(t) = saved.tables.get(&table) else {
        return Vec::new();
    };
    let chains = t.chains.iter().filter(|c| ours(c));
    let rules = t.rules.iter().filter(|rule| {
        rule_chain_and_target(rule)
            .is_some_and(|(chain, target)| ours(chain) || target.is_some_and(ours))
    });
    chains
        .map(|c| format!(":{c} - [0:0]"))
        .chain(rules.cloned())
        .collect()
}

/// `ADDR/32` or `ADDR/128`, as `plan` prints kube-ipvs0's addresses.
fn address_line(ip: IpAddr) -> String {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    format!("{ip}/{len}")
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

/// The lines of `wanted` the kernel lacks, then those of `have` not wanted, each in its order.
fn differences(wanted: &[String], have: &[String]) -> Vec<Difference> {
    let wanted_set: BTreeSet<&String> = wanted.iter().collect();
    let have_set: BTreeSet<&String> = have.iter().collect();
    let missing = wanted
        .iter()
        .filter(|l| !have_set.contains(l))
        .map(|l| Difference::Missing(l.clone()));
    let extra = have
        .iter()
        .filter(|l| !wanted_set.contains(l))
        .map(|l| Difference::Extra(l.clone()));
    missing.chain(extra).collect()
}

/// The kernel's virtual servers the proxy owns, printed as the plan prints its own: each
/// virtual server, then its real servers, in the plan's order (address, port, protocol).
fn ipvs_differences(
    plan: &Plan,
    observed: &Observed,
    owned: impl Fn(&ServiceKey) -> bool,
) -> Vec<Difference> {
    let planned_real: BTreeSet<String> = plan
        .virtual_servers
        .values()
        .flat_map(|v| {
            let key = v.virtual_server.key;
            v.real_servers.iter().map(move |r| r.line(&key).to_string())
        })
        .collect();
    let mut kernel: BTreeMap<_, Vec<String>> = BTreeMap::new();
    for (vs, real_servers) in observed.ipvs.iter().filter(|(vs, _)| owned(&vs.key)) {
        let ServiceKey::Addr { protocol, addr } = vs.key else {
            continue;
        };
        let mut block = vec![vs.to_string()];
        let mut reals: Vec<&RealServer> = real_servers.iter().collect();
        reals.sort_by_key(|r| r.addr);
        for r in reals {
            let line = r.line(&vs.key).to_string();
            // Weight 0 and not planned: draining, deleted by the sync once its connections end.
            if r.weight != 0 || planned_real.contains(&line) {
                block.push(line);
            }
        }
        kernel.insert((addr.ip(), addr.port(), protocol), block);
    }
    let have: Vec<String> = kernel.into_values().flatten().collect();
    differences(&lines(&plan.render_ipvsadm()), &have)
}

/// The kernel's `KUBE-*` sets printed as the plan's are. A set's `hashsize` and `maxelem` are
/// taken from the planned set of its name: they are sizing, which the kernel grows on its
/// own, not what the set holds.
fn set_differences(plan: &Plan, observed: &Observed) -> Vec<Difference> {
    let planned: Vec<IpSet> = plan
        .sets
        .iter()
        .map(|((family, set), entries)| set.to_ipset(*family, entries))
        .collect();
    let have: Vec<IpSet> = observed
        .sets
        .iter()
        .filter(|s| KubeSet::from_name(s.name()).is_some())
        .map(|s| {
            let mut s = s.clone();
            if let Some(p) = planned.iter().find(|p| p.name() == s.name()) {
                s.header.hashsize = p.header.hashsize;
                s.header.maxelem = p.header.maxelem;
            }
            s
        })
        .collect();
    differences(
        &lines(&iptables::ipset::render_save(&planned)),
        &lines(&iptables::ipset::render_save(&have)),
    )
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
