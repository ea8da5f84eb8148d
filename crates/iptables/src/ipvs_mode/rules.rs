//! The small iptables rule set of kube-proxy's ipvs mode (writeIptablesRules in
//! pkg/proxy/ipvs/proxier.go): a fixed set of chains whose rules match the KUBE-* ipsets, so
//! the rule count does not grow with the number of Services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::KubeSet;
use crate::chain::{
    IPVS_MODE_CHAINS, KUBE_FORWARD, KUBE_IPVS_FILTER, KUBE_IPVS_OUT_FILTER, KUBE_LOAD_BALANCER,
    KUBE_MARK_MASQ, KUBE_NODE_PORT, KUBE_POSTROUTING, KUBE_PROXY_FIREWALL, KUBE_SERVICES,
    KUBE_SOURCE_RANGES_FIREWALL,
};
use crate::local::LocalDetector;
use crate::rule::{AddrType, MarkOp, Match, Protocol, Rule, Target};
use crate::ruleset::{Ruleset, TablePatch};
use crate::table::{Family, Table};

/// What the ipvs-mode rules of one family depend on: plain facts the caller takes from its
/// desired state and the node's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInput {
    /// The family rendered (`iptables` or `ip6tables`).
    pub family: Family,
    /// The masquerade mark, `1 << --masquerade-bit` (0x4000 by default).
    pub masquerade_mark: u32,
    /// `--masquerade-all`: every ClusterIP connection is masqueraded.
    pub masquerade_all: bool,
    /// How this family's local (pod) traffic is told: other sources to a ClusterIP are
    /// masqueraded. Without a detector, node-originated traffic from a VIP is.
    pub local: LocalDetector,
    /// MASQUERADE with `--random-fully` (iptables ≥ 1.6.2).
    pub random_fully: bool,
    /// The sets of this family that hold at least one entry: most rules that match a set are
    /// written only while it is not empty, as kube-proxy writes them.
    pub non_empty: BTreeSet<KubeSet>,
    /// LoadBalancer (ip, protocol, port) the node itself may not reach (its source ranges
    /// leave the node out): one KUBE-IPVS-OUT-FILTER drop each. Those of the other family are
    /// skipped.
    pub no_node_access: BTreeSet<(IpAddr, Protocol, u16)>,
}

/// Jumps from built-in chains, in kube-proxy's `iptablesJumpChain` order. Each is prepended
/// (`-I CHAIN 1`), so in `iptables-save` a built-in chain lists them in reverse order.
pub const JUMPS: [(Table, &str, &str, &str); 9] = [
    (
        Table::Nat,
        "OUTPUT",
        KUBE_SERVICES,
        "kubernetes service portals",
    ),
    (
        Table::Nat,
        "PREROUTING",
        KUBE_SERVICES,
        "kubernetes service portals",
    ),
    (
        Table::Nat,
        "POSTROUTING",
        KUBE_POSTROUTING,
        "kubernetes postrouting rules",
    ),
    (
        Table::Filter,
        "FORWARD",
        KUBE_FORWARD,
        "kubernetes forwarding rules",
    ),
    (
        Table::Filter,
        "INPUT",
        KUBE_NODE_PORT,
        "kubernetes health check rules",
    ),
    (
        Table::Filter,
        "INPUT",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules",
    ),
    (
        Table::Filter,
        "FORWARD",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules",
    ),
    (
        Table::Filter,
        "INPUT",
        KUBE_IPVS_FILTER,
        "kubernetes ipvs access filter",
    ),
    (
        Table::Filter,
        "OUTPUT",
        KUBE_IPVS_OUT_FILTER,
        "kubernetes ipvs access filter",
    ),
];

/// `-m set --match-set NAME FLAGS`.
fn set_match(set: KubeSet, family: Family, flags: &'static str) -> Match {
    Match::Set {
        negated: false,
        name: set.name(family),
        flags,
    }
}

/// (set, table, from chain, target, match flags, protocol): kube-proxy's
/// `ipsetWithIptablesChain`, a rule written only when the set is not empty.
type SetRule = (
    KubeSet,
    Table,
    &'static str,
    &'static str,
    &'static str,
    Option<Protocol>,
);

const SET_RULES: [SetRule; 12] = [
    (
        KubeSet::LoopBack,
        Table::Nat,
        KUBE_POSTROUTING,
        "MASQUERADE",
        "dst,dst,src",
        None,
    ),
    (
        KubeSet::LoadBalancer,
        Table::Nat,
        KUBE_SERVICES,
        KUBE_LOAD_BALANCER,
        "dst,dst",
        None,
    ),
    (
        KubeSet::LoadBalancerLocal,
        Table::Nat,
        KUBE_LOAD_BALANCER,
        "RETURN",
        "dst,dst",
        None,
    ),
    (
        KubeSet::NodePortLocalTcp,
        Table::Nat,
        KUBE_NODE_PORT,
        "RETURN",
        "dst",
        Some(Protocol::Tcp),
    ),
    (
        KubeSet::NodePortTcp,
        Table::Nat,
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst",
        Some(Protocol::Tcp),
    ),
    (
        KubeSet::NodePortLocalUdp,
        Table::Nat,
        KUBE_NODE_PORT,
        "RETURN",
        "dst",
        Some(Protocol::Udp),
    ),
    (
        KubeSet::NodePortUdp,
        Table::Nat,
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst",
        Some(Protocol::Udp),
    ),
    (
        KubeSet::NodePortLocalSctp,
        Table::Nat,
        KUBE_NODE_PORT,
        "RETURN",
        "dst,dst",
        Some(Protocol::Sctp),
    ),
    (
        KubeSet::NodePortSctp,
        Table::Nat,
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst,dst",
        Some(Protocol::Sctp),
    ),
    (
        KubeSet::LoadBalancerFw,
        Table::Filter,
        KUBE_PROXY_FIREWALL,
        KUBE_SOURCE_RANGES_FIREWALL,
        "dst,dst",
        None,
    ),
    (
        KubeSet::LoadBalancerSourceCidr,
        Table::Filter,
        KUBE_SOURCE_RANGES_FIREWALL,
        "RETURN",
        "dst,dst,src",
        None,
    ),
    (
        KubeSet::LoadBalancerSourceIp,
        Table::Filter,
        KUBE_SOURCE_RANGES_FIREWALL,
        "RETURN",
        "dst,dst,src",
        None,
    ),
];

fn target(name: &str, random_fully: bool) -> Target {
    match name {
        "RETURN" => Target::Return,
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "MASQUERADE" => Target::Masquerade { random_fully },
        chain => Target::Jump(chain.to_owned()),
    }
}

/// The ipvs-mode rules of one family: every owned chain rewritten whole, plus the jumps
/// from the built-in chains (to insert where missing: [`crate::Saved::add_missing_jumps`]).
#[must_use]
#[allow(
    clippy::too_many_lines,
    reason = "kube-proxy's rule list, in its order, reads best in one place"
)]
pub fn ruleset(input: &RuleInput) -> Ruleset {
    let family = input.family;
    let is_empty = |set: KubeSet| !input.non_empty.contains(&set);
    let mark = input.masquerade_mark;
    let mut chains: BTreeMap<(Table, &str), Vec<Rule>> = IPVS_MODE_CHAINS
        .iter()
        .map(|&(t, c)| ((t, c), Vec::new()))
        .collect();
    let mut push = |table: Table, rule: Rule| {
        chains
            .get_mut(&(table, leak_chain(&rule.chain)))
            .expect("rules are only written to owned chains")
            .push(rule);
    };

    // Connections from localhost never reach a Service through these rules.
    let lo: IpNet = match family {
        Family::V4 => "127.0.0.0/8".parse().expect("valid"),
        Family::V6 => "::1/128".parse().expect("valid"),
    };
    push(
        Table::Nat,
        Rule::new(KUBE_SERVICES, Target::Return).source(lo),
    );

    for (set, table, from, to, flags, proto) in SET_RULES {
        if is_empty(set) {
            continue;
        }
        let mut r = Rule::new(from, target(to, input.random_fully));
        if let Some(p) = proto {
            r = r.protocol(p);
        }
        r = r.comment(set.comment()).with(set_match(set, family, flags));
        push(table, r);
    }

    if !is_empty(KubeSet::ClusterIp) {
        let base = |flags| {
            Rule::jump(KUBE_SERVICES, KUBE_MARK_MASQ)
                .comment(KubeSet::ClusterIp.comment())
                .with(set_match(KubeSet::ClusterIp, family, flags))
        };
        let rule = if input.masquerade_all {
            base("dst,dst")
        } else if let Some(rule) = input.local.if_not_local(base("dst,dst")) {
            // Off-cluster traffic to a ClusterIP is masqueraded.
            rule
        } else {
            // Without a detector: masquerade node-originated traffic whose source is a VIP.
            base("src,dst")
        };
        push(Table::Nat, rule);
    }

    let external_rules = |set: KubeSet, masquerade: bool, push: &mut dyn FnMut(Table, Rule)| {
        let base = |target: Target| {
            Rule::new(KUBE_SERVICES, target)
                .comment(set.comment())
                .with(set_match(set, family, "dst,dst"))
        };
        if masquerade {
            push(Table::Nat, base(Target::Jump(KUBE_MARK_MASQ.to_owned())));
        }
        // Traffic from off the machine (not a bridge, not a local process) is let through.
        push(
            Table::Nat,
            base(Target::Accept)
                .with(Match::Other("-m physdev ! --physdev-is-in".to_owned()))
                .with(Match::AddrType {
                    negated: true,
                    source: true,
                    kind: AddrType::Local,
                }),
        );
        // External IPs that are also local addresses (some cloud load balancers) stay local.
        push(
            Table::Nat,
            base(Target::Accept).with(Match::AddrType {
                negated: false,
                source: false,
                kind: AddrType::Local,
            }),
        );
    };
    if !is_empty(KubeSet::ExternalIp) {
        external_rules(KubeSet::ExternalIp, true, &mut push);
    }
    if !is_empty(KubeSet::ExternalIpLocal) {
        external_rules(KubeSet::ExternalIpLocal, false, &mut push);
    }

    push(
        Table::Nat,
        Rule::jump(KUBE_SERVICES, KUBE_NODE_PORT).with(Match::AddrType {
            negated: false,
            source: false,
            kind: AddrType::Local,
        }),
    );
    push(Table::Nat, Rule::jump(KUBE_LOAD_BALANCER, KUBE_MARK_MASQ));
    push(
        Table::Filter,
        Rule::new(KUBE_SOURCE_RANGES_FIREWALL, Target::Drop),
    );

    // A LoadBalancer whose source ranges leave out the node: the node may not reach it.
    for &(ip, proto, port) in &input.no_node_access {
        if Family::of(ip) != family {
            continue;
        }
        push(
            Table::Filter,
            Rule::new(KUBE_IPVS_OUT_FILTER, Target::Drop)
                .source_host(ip)
                // In the order and form `iptables-save` prints the match (libxt_ipvs: the
                // protocol as a number, a host address without /32 or /128).
                .with(Match::Other(format!(
                    "-m ipvs --vproto {} --vaddr {ip} --vport {port}",
                    proto.number(),
                ))),
        );
    }

    // Accept traffic to IPVS virtual servers, in case later rules would drop it.
    for set in [KubeSet::ClusterIp, KubeSet::LoadBalancer] {
        if !is_empty(set) {
            push(
                Table::Nat,
                Rule::new(KUBE_SERVICES, Target::Accept).with(set_match(set, family, "dst,dst")),
            );
        }
    }

    push(
        Table::Filter,
        Rule::new(KUBE_FORWARD, Target::Accept)
            .comment("kubernetes forwarding rules")
            .with(Match::Mark {
                negated: false,
                value: mark,
                mask: mark,
            }),
    );
    push(
        Table::Filter,
        Rule::new(KUBE_FORWARD, Target::Accept)
            .comment("kubernetes forwarding conntrack rule")
            .with(Match::Conntrack {
                negated: false,
                states: "RELATED,ESTABLISHED",
            }),
    );
    push(
        Table::Filter,
        Rule::new(KUBE_NODE_PORT, Target::Accept)
            .comment(KubeSet::HealthCheckNodePort.comment())
            .with(set_match(KubeSet::HealthCheckNodePort, family, "dst")),
    );

    // KUBE-IPVS-FILTER: a VIP answers only on the ports its Services use.
    for (set, flags) in [
        (KubeSet::LoadBalancer, "dst,dst"),
        (KubeSet::ClusterIp, "dst,dst"),
        (KubeSet::ExternalIp, "dst,dst"),
        (KubeSet::ExternalIpLocal, "dst,dst"),
        (KubeSet::HealthCheckNodePort, "dst"),
    ] {
        push(
            Table::Filter,
            Rule::new(KUBE_IPVS_FILTER, Target::Return).with(set_match(set, family, flags)),
        );
    }
    let reject_with = match family {
        Family::V4 => "icmp-port-unreachable",
        Family::V6 => "icmp6-port-unreachable",
    };
    push(
        Table::Filter,
        Rule::new(KUBE_IPVS_FILTER, Target::Reject(reject_with))
            .with(Match::Conntrack {
                negated: false,
                states: "NEW",
            })
            .with(set_match(KubeSet::IpvsIps, family, "dst")),
    );

    push(
        Table::Nat,
        Rule::new(KUBE_POSTROUTING, Target::Return).with(Match::Mark {
            negated: true,
            value: mark,
            mask: mark,
        }),
    );
    push(
        Table::Nat,
        Rule::new(KUBE_POSTROUTING, Target::Mark(MarkOp::Xor(mark))),
    );
    push(
        Table::Nat,
        Rule::new(
            KUBE_POSTROUTING,
            Target::Masquerade {
                random_fully: input.random_fully,
            },
        )
        .comment("kubernetes service traffic requiring SNAT"),
    );
    push(
        Table::Nat,
        Rule::new(KUBE_MARK_MASQ, Target::Mark(MarkOp::Or(mark))),
    );

    let mut ruleset = Ruleset::default();
    for ((table, chain), rules) in chains {
        ruleset.table(table).chains.insert(chain.to_owned(), rules);
    }
    for (table, from, to, comment) in JUMPS {
        ruleset
            .table(table)
            .insert_jumps
            .push(Rule::jump(from, to).comment(comment));
    }
    ruleset
}

/// The owned chain name as a `'static` key (rules are only written to owned chains).
fn leak_chain(name: &str) -> &'static str {
    IPVS_MODE_CHAINS
        .iter()
        .map(|&(_, c)| c)
        .find(|c| *c == name)
        .expect("an owned chain")
}

/// Renders a family's rule set as `iptables-save` prints it: per table, built-in chains then
/// owned chains (sorted), each chain's rules in order, built-in chains listing the prepended
/// jumps last-inserted first.
#[must_use]
pub fn render_save(ruleset: &Ruleset) -> String {
    let mut out = String::new();
    for table in [Table::Nat, Table::Filter] {
        let Some(patch) = ruleset.tables.get(&table) else {
            continue;
        };
        render_table(table, patch, &mut out);
    }
    out
}

fn render_table(table: Table, patch: &TablePatch, out: &mut String) {
    out.push('*');
    out.push_str(table.as_str());
    out.push('\n');
    for chain in table.builtin_chains() {
        out.push(':');
        out.push_str(chain);
        out.push_str(" ACCEPT [0:0]\n");
    }
    for chain in patch.chains.keys() {
        out.push(':');
        out.push_str(chain);
        out.push_str(" - [0:0]\n");
    }
    for chain in table.builtin_chains() {
        for r in patch
            .insert_jumps
            .iter()
            .rev()
            .filter(|r| r.chain == *chain)
        {
            out.push_str(&r.to_string());
            out.push('\n');
        }
    }
    for rules in patch.chains.values() {
        for r in rules {
            out.push_str(&r.to_string());
            out.push('\n');
        }
    }
    out.push_str("COMMIT\n");
}
