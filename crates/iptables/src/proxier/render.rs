//! The rules of kube-proxy's iptables mode, computed from [`ServiceSpec`]s.
//!
//! Each service port renders on its own into a [`ServiceRules`]: its fragments of the shared
//! chains (KUBE-SERVICES, KUBE-NODEPORTS, …) and its own chains (KUBE-SVC-…, KUBE-SEP-…). The
//! shared chains are the fragments concatenated in service order. That split is what lets a
//! sync rewrite only what one Service changed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use super::names::{endpoint_chain, external_chain, firewall_chain, local_chain, service_chain};
use super::{Backend, ProxierConfig, ServiceSpec};
// Short names for the fixed chains this mode writes to.
use crate::chain::{
    KUBE_EXTERNAL_SERVICES as EXTERNAL_SERVICES, KUBE_FIREWALL as KUBELET_FIREWALL,
    KUBE_FORWARD as FORWARD, KUBE_MARK_MASQ as MARK_MASQ, KUBE_NODEPORTS as NODEPORTS,
    KUBE_POSTROUTING as POSTROUTING, KUBE_PROXY_FIREWALL as FIREWALL, KUBE_SERVICES as SERVICES,
};
use crate::rule::{AddrType, MarkOp, Match, Protocol, Recent, Rule, Target, masquerade_mark};
use crate::ruleset::Ruleset;
use crate::table::{Family, FamilyNames as _, Table};

/// The shared chains a service port adds rules to, in the order their fragments are kept.
pub const SHARED_CHAINS: [(Table, &str); 6] = [
    (Table::Nat, SERVICES),
    (Table::Nat, NODEPORTS),
    (Table::Filter, SERVICES),
    (Table::Filter, EXTERNAL_SERVICES),
    (Table::Filter, NODEPORTS),
    (Table::Filter, FIREWALL),
];

/// What one service port contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// Its rules in each of [`SHARED_CHAINS`], same index.
    pub shared: [Vec<Rule>; 6],
    /// Its own nat chains (KUBE-SVC, KUBE-SVL, KUBE-EXT, KUBE-FW, KUBE-SEP), by name.
    pub chains: BTreeMap<String, Vec<Rule>>,
}

/// The whole rule set for one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    /// Per service port, by (name, protocol).
    pub services: BTreeMap<(String, Protocol), ServiceRules>,
    /// Whether per-endpoint comments are written (off in large-cluster mode).
    pub comments: bool,
}

/// Renders every service port of `config.family` (ports without a ClusterIP of that family
/// are left out, as kube-proxy's per-family proxier never sees them).
#[must_use]
pub fn render(config: &ProxierConfig, specs: &[ServiceSpec]) -> Rendered {
    let comments = comments_for(config, specs.iter().map(|s| s.backends.len()).sum());
    let services = specs
        .iter()
        .filter_map(|s| render_service(config, s, comments).map(|r| (s.key(), r)))
        .collect();
    Rendered { services, comments }
}

/// Whether per-endpoint comments are written with `endpoints` in all (every endpoint of every
/// port, whatever its family or condition): kube-proxy drops them above 1000.
pub(crate) fn comments_for(config: &ProxierConfig, endpoints: usize) -> bool {
    endpoints <= config.large_cluster_endpoints
}

fn host(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// Renders one service port; `None` when it has no ClusterIP of the proxier's family. Each
/// kind of chain comes from its own function, in the order kube-proxy writes them.
#[must_use]
pub fn render_service(
    config: &ProxierConfig,
    spec: &ServiceSpec,
    comments: bool,
) -> Option<ServiceRules> {
    let port = Port::new(config, spec)?;
    let (nat_services, nat_nodeports) = port.shared_nat_rules();
    let [
        filter_services,
        filter_external,
        filter_nodeports,
        filter_firewall,
    ] = port.filter_rules();
    // In the order of SHARED_CHAINS.
    let shared = [
        nat_services,
        nat_nodeports,
        filter_services,
        filter_external,
        filter_nodeports,
        filter_firewall,
    ];
    let mut out = ServiceRules {
        shared,
        chains: BTreeMap::new(),
    };
    let chains = &mut out.chains;
    chains.extend(port.external_chain(config));
    chains.extend(port.firewall_chain(config));
    chains.extend(port.policy_chains(config, comments));
    chains.extend(port.endpoint_chains(comments));
    Some(out)
}

/// The items of `family`, by the address `addr` gives of each.
fn of_family<T: Copy>(items: &[T], family: Family, addr: impl Fn(&T) -> IpAddr) -> Vec<T> {
    items
        .iter()
        .copied()
        .filter(|i| Family::of(addr(i)) == family)
        .collect()
}

/// kube-proxy's CategorizeEndpoints: the ready endpoints `which` picks, else its
/// serving-and-terminating ones.
fn usable(backends: &[Backend], which: impl Fn(&Backend) -> bool) -> Vec<Backend> {
    let ready: Vec<Backend> = backends
        .iter()
        .copied()
        .filter(|b| b.ready && which(b))
        .collect();
    if ready.is_empty() {
        backends
            .iter()
            .copied()
            .filter(|b| b.serving && b.terminating && which(b))
            .collect()
    } else {
        ready
    }
}

/// One service port as the proxier of one family sees it: its addresses of that family, its
/// endpoints categorized as kube-proxy's `CategorizeEndpoints` does, and which of its chains
/// exist.
#[allow(
    clippy::struct_excessive_bools,
    reason = "kube-proxy's own per-service decisions, each read by several chains"
)]
struct Port<'a> {
    spec: &'a ServiceSpec,
    family: Family,
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    lb_ips: Vec<IpAddr>,
    ranges: Vec<IpNet>,
    cluster_policy_chain: String,
    local_policy_chain: String,
    ext_chain: String,
    fw_chain: String,
    external_local: bool,
    internal_local: bool,
    cluster_endpoints: Vec<Backend>,
    local_endpoints: Vec<Backend>,
    /// Every endpoint a policy chain jumps to (each has a KUBE-SEP chain).
    reachable: Vec<Backend>,
    has_endpoints: bool,
    has_internal: bool,
    has_external: bool,
    uses_ext_chain: bool,
    uses_fw_chain: bool,
}

impl<'a> Port<'a> {
    /// `None` when the port has no ClusterIP of `config.family`.
    fn new(config: &ProxierConfig, spec: &'a ServiceSpec) -> Option<Port<'a>> {
        let family = config.family;
        let cluster_ips = of_family(&spec.cluster_ips, family, |a| *a);
        if cluster_ips.is_empty() {
            return None;
        }
        let external_ips = of_family(&spec.external_ips, family, |a| *a);
        let lb_ips = of_family(&spec.load_balancer_ips, family, |a| *a);
        let ranges = of_family(&spec.source_ranges, family, IpNet::addr);
        let mut backends = of_family(&spec.backends, family, |b| b.addr.ip());
        backends.sort();
        backends.dedup_by_key(|b| b.addr);

        let name = spec.name.as_str();
        let p = spec.protocol.name();
        let externally_accessible =
            spec.node_port.is_some() || !external_ips.is_empty() || !lb_ips.is_empty();
        let external_local = spec.external_local && externally_accessible;
        let internal_local = spec.internal_local;
        let uses_cluster = !internal_local || (externally_accessible && !external_local);
        let uses_local = internal_local || external_local;

        let cluster_endpoints = if uses_cluster {
            usable(&backends, |b| b.in_topology)
        } else {
            Vec::new()
        };
        let local_endpoints = if uses_local {
            usable(&backends, |b| b.local)
        } else {
            Vec::new()
        };
        let has_endpoints = backends
            .iter()
            .any(|b| b.ready || (b.serving && b.terminating));
        let has_endpoints = if uses_cluster && !uses_local {
            !cluster_endpoints.is_empty()
        } else {
            has_endpoints
        };
        let mut reachable: Vec<Backend> = cluster_endpoints
            .iter()
            .chain(&local_endpoints)
            .copied()
            .collect();
        reachable.sort();
        reachable.dedup_by_key(|b| b.addr);

        let has_local = has_endpoints && !local_endpoints.is_empty();
        let has_internal = if internal_local {
            has_local
        } else {
            has_endpoints
        };
        let has_external = if external_local {
            has_local
        } else {
            has_endpoints
        };
        let uses_ext_chain = has_endpoints && externally_accessible;
        let uses_fw_chain = has_endpoints && !lb_ips.is_empty() && !ranges.is_empty();
        Some(Port {
            spec,
            family,
            cluster_ips,
            external_ips,
            lb_ips,
            ranges,
            cluster_policy_chain: service_chain(name, p),
            local_policy_chain: local_chain(name, p),
            ext_chain: external_chain(name, p),
            fw_chain: firewall_chain(name, p),
            external_local,
            internal_local,
            cluster_endpoints,
            local_endpoints,
            reachable,
            has_endpoints,
            has_internal,
            has_external,
            uses_ext_chain,
            uses_fw_chain,
        })
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    /// Where internal traffic (to the ClusterIP) goes: KUBE-SVL with internalTrafficPolicy
    /// Local, else KUBE-SVC.
    fn internal_chain(&self) -> &String {
        if self.internal_local {
            &self.local_policy_chain
        } else {
            &self.cluster_policy_chain
        }
    }

    /// Where external traffic goes after KUBE-EXT: KUBE-SVL with externalTrafficPolicy Local,
    /// else KUBE-SVC.
    fn external_policy_chain(&self) -> &String {
        if self.external_local {
            &self.local_policy_chain
        } else {
            &self.cluster_policy_chain
        }
    }

    /// The filter table's verdict for traffic no chain takes, and its comment.
    fn filter_verdict(&self) -> (Target, String) {
        let name = self.name();
        if self.has_endpoints {
            (Target::Drop, format!("{name} has no local endpoints"))
        } else {
            (
                Target::Reject(self.family.port_unreachable()),
                format!("{name} has no endpoints"),
            )
        }
    }

    /// A rule of `chain` for traffic to `ip` on the service port.
    fn to(&self, chain: &str, ip: IpAddr, comment: &str, target: Target) -> Rule {
        let proto = self.spec.protocol;
        Rule::new(chain, target)
            .destination(host(ip))
            .protocol(proto)
            .comment(comment)
            .with(Match::Port {
                protocol: proto,
                sport: None,
                dport: Some(self.spec.port),
            })
    }

    fn node_port_match(&self, node_port: u16) -> Match {
        Match::Port {
            protocol: self.spec.protocol,
            sport: None,
            dport: Some(node_port),
        }
    }

    /// Its fragments of nat KUBE-SERVICES (a jump per VIP) and KUBE-NODEPORTS.
    fn shared_nat_rules(&self) -> (Vec<Rule>, Vec<Rule>) {
        let name = self.name();
        let mut services = Vec::new();
        let mut nodeports = Vec::new();
        if self.has_internal {
            let c = format!("{name} cluster IP");
            for &ip in &self.cluster_ips {
                services.push(self.to(
                    SERVICES,
                    ip,
                    &c,
                    Target::Jump(self.internal_chain().clone()),
                ));
            }
        }
        if self.has_endpoints {
            let c = format!("{name} external IP");
            for &ip in &self.external_ips {
                services.push(self.to(SERVICES, ip, &c, Target::Jump(self.ext_chain.clone())));
            }
            let lb_chain = if self.uses_fw_chain {
                &self.fw_chain
            } else {
                &self.ext_chain
            };
            let c = format!("{name} loadbalancer IP");
            for &ip in &self.lb_ips {
                services.push(self.to(SERVICES, ip, &c, Target::Jump(lb_chain.clone())));
            }
            if let Some(node_port) = self.spec.node_port {
                nodeports.push(
                    Rule::jump(NODEPORTS, self.ext_chain.clone())
                        .protocol(self.spec.protocol)
                        .comment(name)
                        .with(self.node_port_match(node_port)),
                );
            }
        }
        (services, nodeports)
    }

    /// Its fragments of the filter table's KUBE-SERVICES, KUBE-EXTERNAL-SERVICES,
    /// KUBE-NODEPORTS and KUBE-PROXY-FIREWALL: REJECT or DROP where there are no (local)
    /// endpoints, the health check port, and DROP for sources the firewall chain let pass.
    fn filter_rules(&self) -> [Vec<Rule>; 4] {
        let name = self.name();
        let (verdict, comment) = self.filter_verdict();
        let mut services = Vec::new();
        let mut external = Vec::new();
        let mut nodeports = Vec::new();
        let mut firewall = Vec::new();
        if !self.has_internal {
            for &ip in &self.cluster_ips {
                services.push(self.to(SERVICES, ip, &comment, verdict.clone()));
            }
        }
        if !self.has_external {
            for &ip in self.external_ips.iter().chain(&self.lb_ips) {
                external.push(self.to(EXTERNAL_SERVICES, ip, &comment, verdict.clone()));
            }
            if let Some(node_port) = self.spec.node_port {
                external.push(
                    Rule::new(EXTERNAL_SERVICES, verdict.clone())
                        .protocol(self.spec.protocol)
                        .comment(comment.clone())
                        .with(Match::AddrType {
                            negated: false,
                            source: false,
                            kind: AddrType::Local,
                        })
                        .with(self.node_port_match(node_port)),
                );
            }
        }
        if let Some(hc) = self.spec.health_check_node_port {
            nodeports.push(
                Rule::new(NODEPORTS, Target::Accept)
                    .protocol(Protocol::Tcp)
                    .comment(format!("{name} health check node port"))
                    .with(Match::Port {
                        protocol: Protocol::Tcp,
                        sport: None,
                        dport: Some(hc),
                    }),
            );
        }
        if self.uses_fw_chain {
            let c = format!("{name} traffic not accepted by {}", self.fw_chain);
            for &ip in &self.lb_ips {
                firewall.push(self.to(FIREWALL, ip, &c, Target::Drop));
            }
        }
        [services, external, nodeports, firewall]
    }

    /// KUBE-EXT: masquerade what must be, then on to the external policy's chain.
    fn external_chain(&self, config: &ProxierConfig) -> Option<(String, Vec<Rule>)> {
        if !self.uses_ext_chain {
            return None;
        }
        let name = self.name();
        let ext_chain = &self.ext_chain;
        let mut rules = Vec::new();
        let local_src = || Match::AddrType {
            negated: false,
            source: true,
            kind: AddrType::Local,
        };
        if self.external_local {
            // Pod traffic to an external destination is subject to neither policy, as if it
            // went out to a load balancer and came back.
            let pods = Rule::jump(ext_chain, self.cluster_policy_chain.clone())
                .comment(format!("pod traffic for {name} external destinations"));
            rules.extend(config.local.if_local(pods));
            rules.push(
                Rule::jump(ext_chain, MARK_MASQ)
                    .comment(format!(
                        "masquerade LOCAL traffic for {name} external destinations"
                    ))
                    .with(local_src()),
            );
            rules.push(
                Rule::jump(ext_chain, self.cluster_policy_chain.clone())
                    .comment(format!(
                        "route LOCAL traffic for {name} external destinations"
                    ))
                    .with(local_src()),
            );
        } else {
            rules.push(Rule::jump(ext_chain, MARK_MASQ).comment(format!(
                "masquerade traffic for {name} external destinations"
            )));
        }
        if self.has_external {
            rules.push(Rule::jump(ext_chain, self.external_policy_chain().clone()));
        }
        Some((ext_chain.clone(), rules))
    }

    /// KUBE-FW: loadBalancerSourceRanges on to KUBE-EXT, the rest left to KUBE-PROXY-FIREWALL.
    fn firewall_chain(&self, config: &ProxierConfig) -> Option<(String, Vec<Rule>)> {
        if !self.uses_fw_chain {
            return None;
        }
        let name = self.name();
        let fw_chain = &self.fw_chain;
        let c = format!("{name} loadbalancer IP");
        let mut rules: Vec<Rule> = self
            .ranges
            .iter()
            .map(|r| {
                Rule::jump(fw_chain, self.ext_chain.clone())
                    .source(*r)
                    .comment(c.clone())
            })
            .collect();
        // A request from the node itself to a VIP bound locally comes back from the VIP.
        let from_node = self.ranges.iter().any(|r| {
            config
                .node_port_addresses
                .iter()
                .flatten()
                .any(|a| r.contains(a))
        });
        if from_node {
            rules.extend(self.lb_ips.iter().map(|ip| {
                Rule::jump(fw_chain, self.ext_chain.clone())
                    .source(host(*ip))
                    .comment(c.clone())
            }));
        }
        rules.push(Rule::new(fw_chain, Target::None).comment(format!(
            "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
        )));
        Some((fw_chain.clone(), rules))
    }

    fn endpoint_chain_name(&self, b: &Backend) -> String {
        endpoint_chain(self.name(), self.spec.protocol.name(), &b.addr.to_string())
    }

    /// KUBE-SVC (cluster policy) and KUBE-SVL (local policy), those with endpoints: the
    /// ClusterIP masquerade, affinity's `recent` checks, then one jump per endpoint with
    /// `statistic` probabilities.
    fn policy_chains(&self, config: &ProxierConfig, comments: bool) -> Vec<(String, Vec<Rule>)> {
        let name = self.name();
        // Internal traffic: masquerade off-cluster (or all) sources to the ClusterIP.
        let mut internal_masq = Vec::new();
        if self.has_internal {
            let internal_chain = self.internal_chain();
            for &ip in &self.cluster_ips {
                let c = format!("{name} cluster IP");
                let r = self.to(internal_chain, ip, &c, Target::Jump(MARK_MASQ.into()));
                if config.masquerade_all {
                    internal_masq.push(r);
                } else {
                    internal_masq.extend(config.local.if_not_local(r));
                }
            }
        }
        let policy_chain = |chain: &str, eps: &[Backend]| {
            let mut rules: Vec<Rule> = internal_masq
                .iter()
                .filter(|r| r.chain == chain)
                .cloned()
                .collect();
            let comment = |b: &Backend, r: Rule| {
                if comments {
                    r.comment(format!("{name} -> {}", b.addr))
                } else {
                    r
                }
            };
            if let Some(seconds) = self.spec.affinity_seconds {
                for b in eps {
                    let sep = self.endpoint_chain_name(b);
                    let r = comment(b, Rule::jump(chain, sep.clone())).with(Match::Recent {
                        action: Recent::Rcheck { seconds },
                        name: sep,
                        ipv6: self.family == Family::V6,
                    });
                    rules.push(r);
                }
            }
            let n = eps.len();
            for (i, b) in eps.iter().enumerate() {
                let mut r = comment(b, Rule::jump(chain, self.endpoint_chain_name(b)));
                if i + 1 < n {
                    r = r.with(Match::OneIn(u32::try_from(n - i).unwrap_or(u32::MAX)));
                }
                rules.push(r);
            }
            (chain.to_owned(), rules)
        };
        let mut chains = Vec::new();
        if !self.cluster_endpoints.is_empty() {
            chains.push(policy_chain(
                &self.cluster_policy_chain,
                &self.cluster_endpoints,
            ));
        }
        if !self.local_endpoints.is_empty() {
            chains.push(policy_chain(
                &self.local_policy_chain,
                &self.local_endpoints,
            ));
        }
        chains
    }

    /// KUBE-SEP, one per endpoint a policy chain reaches: hairpin masquerade, then DNAT.
    fn endpoint_chains(&self, comments: bool) -> Vec<(String, Vec<Rule>)> {
        let name = self.name();
        let proto = self.spec.protocol;
        let comment = |r: Rule| if comments { r.comment(name) } else { r };
        self.reachable
            .iter()
            .map(|b| {
                let sep = self.endpoint_chain_name(b);
                let hairpin = comment(Rule::jump(&sep, MARK_MASQ).source(host(b.addr.ip())));
                let mut dnat = comment(Rule::new(&sep, Target::Dnat(b.addr)).protocol(proto));
                if self.spec.affinity_seconds.is_some() {
                    dnat = dnat.with(Match::Recent {
                        action: Recent::Set,
                        name: sep.clone(),
                        ipv6: self.family == Family::V6,
                    });
                }
                dnat = dnat.with(Match::Port {
                    protocol: proto,
                    sport: None,
                    dport: None,
                });
                (sep, vec![hairpin, dnat])
            })
            .collect()
    }
}

impl Rendered {
    /// The jump rules kube-proxy keeps at the top of built-in chains, per table, in order:
    /// its own, then (with localhost NodePorts) kubelet's to KUBE-FIREWALL, which it
    /// ensures too.
    #[must_use]
    pub fn builtin_jumps(config: &ProxierConfig) -> Vec<(Table, Rule)> {
        let new = || Match::Conntrack {
            negated: false,
            states: "NEW",
        };
        let j = |chain: &str, to: &str, comment: &str| Rule::jump(chain, to).comment(comment);
        let jn = |chain: &str, to: &str, comment: &str| {
            Rule::jump(chain, to).with(new()).comment(comment)
        };
        let external = "kubernetes externally-visible service portals";
        let portals = "kubernetes service portals";
        let firewall = "kubernetes load balancer firewall";
        let mut jumps = vec![
            (Table::Filter, jn("INPUT", EXTERNAL_SERVICES, external)),
            (Table::Filter, jn("FORWARD", EXTERNAL_SERVICES, external)),
            (
                Table::Filter,
                j("INPUT", NODEPORTS, "kubernetes health check service ports"),
            ),
            (Table::Filter, jn("FORWARD", SERVICES, portals)),
            (Table::Filter, jn("OUTPUT", SERVICES, portals)),
            (
                Table::Filter,
                j("FORWARD", FORWARD, "kubernetes forwarding rules"),
            ),
            (Table::Filter, jn("INPUT", FIREWALL, firewall)),
            (Table::Filter, jn("OUTPUT", FIREWALL, firewall)),
            (Table::Filter, jn("FORWARD", FIREWALL, firewall)),
            (Table::Nat, j("OUTPUT", SERVICES, portals)),
            (Table::Nat, j("PREROUTING", SERVICES, portals)),
            (
                Table::Nat,
                j("POSTROUTING", POSTROUTING, "kubernetes postrouting rules"),
            ),
        ];
        // Upstream ensures these always; without the rule below the chain would be only
        // kubelet's, so ours leaves it and its jumps alone then.
        if config.localhost_node_ports() {
            for chain in ["INPUT", "OUTPUT"] {
                jumps.push((Table::Filter, Rule::jump(chain, KUBELET_FIREWALL)));
            }
        }
        jumps
    }

    /// The fixed chains and their rules (KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-FORWARD).
    #[must_use]
    pub fn base_chains(config: &ProxierConfig) -> Vec<(Table, String, Vec<Rule>)> {
        let mark = masquerade_mark(config.masquerade_bit);
        let mut forward = Vec::new();
        if config.drop_invalid {
            forward.push(Rule::new(FORWARD, Target::Drop).with(Match::Conntrack {
                negated: false,
                states: "INVALID",
            }));
        }
        forward.push(
            Rule::new(FORWARD, Target::Accept)
                .comment("kubernetes forwarding rules")
                .with(Match::Mark {
                    negated: false,
                    value: mark,
                    mask: mark,
                }),
        );
        forward.push(
            Rule::new(FORWARD, Target::Accept)
                .comment("kubernetes forwarding conntrack rule")
                .with(Match::Conntrack {
                    negated: false,
                    states: "RELATED,ESTABLISHED",
                }),
        );
        let mut chains = vec![
            (Table::Filter, FORWARD.to_owned(), forward),
            (
                Table::Nat,
                MARK_MASQ.to_owned(),
                vec![Rule::new(MARK_MASQ, Target::Mark(MarkOp::Or(mark)))],
            ),
            (
                Table::Nat,
                POSTROUTING.to_owned(),
                vec![
                    Rule::new(POSTROUTING, Target::Return).with(Match::Mark {
                        negated: true,
                        value: mark,
                        mask: mark,
                    }),
                    Rule::new(POSTROUTING, Target::Mark(MarkOp::Xor(mark))),
                    Rule::new(
                        POSTROUTING,
                        Target::Masquerade {
                            random_fully: config.random_fully,
                        },
                    )
                    .comment("kubernetes service traffic requiring SNAT"),
                ],
            ),
        ];
        if config.localhost_node_ports() {
            // route_localnet lets off-node packets to 127.0.0.0/8 in (issue 90259): only those
            // DNATed to a NodePort's endpoint may pass.
            let loopback: IpNet = "127.0.0.0/8".parse().expect("valid");
            let block = Rule::new(KUBELET_FIREWALL, Target::Drop)
                .not_source(loopback)
                .destination(loopback)
                .comment("block incoming localnet connections")
                .with(Match::Conntrack {
                    negated: true,
                    states: "RELATED,ESTABLISHED,DNAT",
                });
            chains.push((Table::Filter, KUBELET_FIREWALL.to_owned(), vec![block]));
        }
        chains
    }

    /// The rules of shared chain `index` of [`SHARED_CHAINS`]: every service's fragment in
    /// order, and for nat KUBE-SERVICES the final jump to KUBE-NODEPORTS.
    #[must_use]
    pub fn shared_chain(&self, config: &ProxierConfig, index: usize) -> Vec<Rule> {
        shared_chain(
            config,
            index,
            self.services.values().flat_map(|s| &s.shared[index]),
        )
    }

    /// Every chain the proxier writes, with its rules, as a full-sync restore patch (without
    /// the built-in jumps, which depend on what the kernel already has).
    #[must_use]
    pub fn full_ruleset(&self, config: &ProxierConfig) -> Ruleset {
        let mut rs = Ruleset::default();
        for (table, name, rules) in Rendered::base_chains(config) {
            rs.table(table).chains.insert(name, rules);
        }
        for (i, (table, name)) in SHARED_CHAINS.iter().enumerate() {
            rs.table(*table)
                .chains
                .insert((*name).to_owned(), self.shared_chain(config, i));
        }
        let nat = rs.table(Table::Nat);
        for s in self.services.values() {
            for (name, rules) in &s.chains {
                nat.chains.insert(name.clone(), rules.clone());
            }
        }
        rs
    }

    /// The rule set as `iptables-save` would print the proxy's part of it: per table, the
    /// chain declarations sorted, the built-in jumps, then each chain's rules in name order.
    #[must_use]
    pub fn save_text(&self, config: &ProxierConfig) -> String {
        let rs = self.full_ruleset(config);
        let jumps = Rendered::builtin_jumps(config);
        let mut out = String::new();
        for (table, patch) in &rs.tables {
            let _ = writeln!(out, "*{table}");
            for name in patch.chains.keys() {
                let _ = writeln!(out, ":{name} - [0:0]");
            }
            for builtin in table.builtin_chains() {
                // kube-proxy inserts each at the top, so the last listed is printed first.
                for (_, r) in jumps
                    .iter()
                    .rev()
                    .filter(|(t, r)| t == table && r.chain == *builtin)
                {
                    let _ = writeln!(out, "{r}");
                }
            }
            for rules in patch.chains.values() {
                for r in rules {
                    let _ = writeln!(out, "{r}");
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// Shared chain `index` of [`SHARED_CHAINS`] from the ports' `fragments` of it, in order,
/// then [`shared_tail`]: one chain at a time, so a full sync never holds a second copy of
/// every port's rules.
pub(super) fn shared_chain<'a>(
    config: &ProxierConfig,
    index: usize,
    fragments: impl Iterator<Item = &'a Rule>,
) -> Vec<Rule> {
    let mut rules: Vec<Rule> = fragments.cloned().collect();
    rules.extend(shared_tail(config, index));
    rules
}

/// What shared chain `index` of [`SHARED_CHAINS`] holds after the ports' fragments: for nat
/// KUBE-SERVICES the final jump to KUBE-NODEPORTS, nothing for the others.
pub(super) fn shared_tail(config: &ProxierConfig, index: usize) -> Vec<Rule> {
    let mut rules = Vec::new();
    if SHARED_CHAINS[index] == (Table::Nat, SERVICES) {
        let comment =
            "kubernetes service nodeports; NOTE: this must be the last rule in this chain";
        if let Some(addresses) = &config.node_port_addresses {
            for a in addresses {
                rules.push(
                    Rule::jump(SERVICES, NODEPORTS)
                        .destination(host(*a))
                        .comment(comment),
                );
            }
        } else {
            let mut jump = Rule::jump(SERVICES, NODEPORTS)
                .comment(comment)
                .with(Match::AddrType {
                    negated: false,
                    source: false,
                    kind: AddrType::Local,
                });
            // NodePorts never work on IPv6 loopback, and on IPv4's only with route_localnet
            // (localhostNodePorts).
            if config.family == Family::V6 {
                jump = jump.not_destination("::1/128".parse::<IpNet>().expect("valid"));
            } else if !config.localhost_node_ports() {
                jump = jump.not_destination("127.0.0.0/8".parse::<IpNet>().expect("valid"));
            }
            rules.push(jump);
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalDetector;
    use crate::proxier::Backend;

    fn config() -> ProxierConfig {
        ProxierConfig {
            local: LocalDetector::Cidr("10.0.0.0/8".parse().unwrap()),
            ..ProxierConfig::default()
        }
    }

    fn lines(r: &Rendered, cfg: &ProxierConfig) -> Vec<String> {
        r.save_text(cfg).lines().map(str::to_owned).collect()
    }

    #[test]
    fn cluster_ip_renders_kube_proxys_chains_and_names() {
        let cfg = config();
        let mut s = ServiceSpec::cluster_ip(
            "ns1/svc1:p80",
            Protocol::Tcp,
            "172.30.0.41".parse().unwrap(),
            80,
        );
        s.backends
            .push(Backend::ready("10.180.0.1:80".parse().unwrap(), false));
        let out = lines(&render(&cfg, &[s]), &cfg);
        for want in [
            "-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-SXIVWICOYRO3J4NJ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment \"ns1/svc1:p80\" -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment \"ns1/svc1:p80\" -m tcp -j DNAT --to-destination 10.180.0.1:80",
            "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        ] {
            assert!(
                out.iter().any(|l| l == want),
                "missing {want}\nin:\n{}",
                out.join("\n")
            );
        }
    }

    #[test]
    fn probabilities_are_one_in_n_down_to_an_unconditional_last() {
        let cfg = config();
        let mut s = ServiceSpec::cluster_ip(
            "ns/s:http",
            Protocol::Tcp,
            "10.96.0.10".parse().unwrap(),
            80,
        );
        for i in 1..=4 {
            s.backends.push(Backend::ready(
                format!("10.244.0.{i}:8080").parse().unwrap(),
                false,
            ));
        }
        let svc = service_chain("ns/s:http", "tcp");
        let r = render(&cfg, &[s]);
        let chain = &r.services.values().next().unwrap().chains[&svc];
        let probs: Vec<String> = chain
            .iter()
            .map(ToString::to_string)
            .filter(|l| l.contains("KUBE-SEP-"))
            .map(|l| {
                l.split("--probability ")
                    .nth(1)
                    .map_or("-".into(), |p| p.split(' ').next().unwrap().to_owned())
            })
            .collect();
        assert_eq!(probs, ["0.2500000000", "0.3333333333", "0.5000000000", "-"]);
    }

    #[test]
    fn no_endpoints_rejects_in_the_filter_table() {
        let cfg = config();
        let mut s = ServiceSpec::cluster_ip(
            "ns/empty:p",
            Protocol::Tcp,
            "10.96.0.20".parse().unwrap(),
            80,
        );
        s.node_port = Some(30020);
        let out = lines(&render(&cfg, &[s]), &cfg);
        assert!(out.contains(&"-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment \"ns/empty:p has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable".to_owned()));
        assert!(out.contains(&"-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment \"ns/empty:p has no endpoints\" -m addrtype --dst-type LOCAL -m tcp --dport 30020 -j REJECT --reject-with icmp-port-unreachable".to_owned()));
        assert!(!out.iter().any(|l| l.contains("KUBE-SVC-")));
    }

    #[test]
    fn external_local_uses_only_local_endpoints_and_keeps_the_source() {
        let cfg = config();
        let mut s = ServiceSpec::cluster_ip(
            "ns/web:http",
            Protocol::Tcp,
            "10.96.0.30".parse().unwrap(),
            80,
        );
        s.node_port = Some(30030);
        s.external_local = true;
        s.backends
            .push(Backend::ready("10.244.1.1:80".parse().unwrap(), true));
        s.backends
            .push(Backend::ready("10.244.2.1:80".parse().unwrap(), false));
        let r = render(&cfg, &[s]);
        let rules = r.services.values().next().unwrap();
        let ext = &rules.chains[&external_chain("ns/web:http", "tcp")];
        assert_eq!(
            ext.last().unwrap().target,
            Target::Jump(local_chain("ns/web:http", "tcp"))
        );
        assert!(
            !ext.iter()
                .any(|r| r.target == Target::Jump(MARK_MASQ.into()) && r.matches.len() == 1)
        );
        let svl = &rules.chains[&local_chain("ns/web:http", "tcp")];
        assert_eq!(svl.len(), 1, "one local endpoint, unconditional: {svl:?}");
    }

    #[test]
    fn affinity_checks_recent_before_balancing() {
        let cfg = config();
        let mut s =
            ServiceSpec::cluster_ip("ns/a:p", Protocol::Tcp, "10.96.0.40".parse().unwrap(), 80);
        s.affinity_seconds = Some(10_800);
        s.backends
            .push(Backend::ready("10.244.0.1:80".parse().unwrap(), false));
        let out = lines(&render(&cfg, &[s]), &cfg);
        let sep = endpoint_chain("ns/a:p", "tcp", "10.244.0.1:80");
        let want = format!(
            "-m recent --rcheck --seconds 10800 --reap --name {sep} --mask 255.255.255.255 --rsource -j {sep}"
        );
        assert!(out.iter().any(|l| l.ends_with(&want)), "{out:#?}");
        assert!(
            out.iter()
                .any(|l| l.contains("-m recent --set --name") && l.contains("DNAT"))
        );
    }

    /// A NodePort Service with `externalTrafficPolicy: Local`, one local endpoint: it has
    /// both rules that ask the local detector.
    fn local_policy_port() -> ServiceSpec {
        let mut s = ServiceSpec::cluster_ip(
            "ns/web:http",
            Protocol::Tcp,
            "172.30.0.41".parse().unwrap(),
            80,
        );
        s.node_port = Some(30080);
        s.external_local = true;
        s.backends
            .push(Backend::ready("10.180.0.1:80".parse().unwrap(), true));
        s
    }

    /// The rules kube-proxy's iptables proxier writes with each detector (`IfNotLocal` on the
    /// ClusterIP masquerade, `IfLocal` on the Local policy's pod short-circuit), as
    /// `iptables-save` prints them; without a detector, neither is written.
    #[test]
    fn each_local_detector_renders_upstreams_rules() {
        let svc = service_chain("ns/web:http", "tcp");
        let ext = external_chain("ns/web:http", "tcp");
        let masq = |local: &str| {
            format!(
                "-A {svc} {local}-d 172.30.0.41/32 -p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ"
            )
        };
        let masq_if = |not_local: &str| {
            format!(
                "-A {svc} -d 172.30.0.41/32 {not_local}-p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ"
            )
        };
        let pods = |local: &str| {
            format!(
                "-A {ext} {local}-m comment --comment \"pod traffic for ns/web:http external destinations\" -j {svc}"
            )
        };
        let cases = [
            (
                LocalDetector::Cidr("10.0.0.0/8".parse().unwrap()),
                Some((masq("! -s 10.0.0.0/8 "), pods("-s 10.0.0.0/8 "))),
            ),
            (
                LocalDetector::bridge("cbr0"),
                Some((masq_if("! -i cbr0 "), pods("-i cbr0 "))),
            ),
            (
                LocalDetector::interface_prefix("veth"),
                Some((masq_if("! -i veth+ "), pods("-i veth+ "))),
            ),
            (LocalDetector::NotImplemented, None),
        ];
        for (local, want) in cases {
            let cfg = ProxierConfig {
                local: local.clone(),
                ..ProxierConfig::default()
            };
            let out = lines(&render(&cfg, &[local_policy_port()]), &cfg);
            let asked: Vec<&String> = out
                .iter()
                .filter(|l| l.contains("KUBE-MARK-MASQ") && l.contains("cluster IP"))
                .chain(out.iter().filter(|l| l.contains("pod traffic for")))
                .collect();
            match want {
                Some((masq, pods)) => assert_eq!(asked, [&masq, &pods], "{local:?}"),
                None => assert!(asked.is_empty(), "{asked:?}"),
            }
        }
    }

    /// kube-proxy's iptables mode with `localhostNodePorts` (IPv4): NodePorts on every local
    /// address, 127.0.0.0/8 included, and KUBE-FIREWALL (jumped to from INPUT and OUTPUT)
    /// dropping what reaches 127.0.0.0/8 from elsewhere without being DNATed. Without it, and
    /// always for IPv6, loopback is left out of the jump to KUBE-NODEPORTS.
    #[test]
    fn localhost_node_ports_render_upstreams_rules() {
        let nodeports = |except: &str| {
            format!(
                "-A KUBE-SERVICES {except}-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
            )
        };
        let firewall = [
            ":KUBE-FIREWALL - [0:0]".to_owned(),
            "-A INPUT -j KUBE-FIREWALL".to_owned(),
            "-A OUTPUT -j KUBE-FIREWALL".to_owned(),
            "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".to_owned(),
        ];
        for (family, localhost, jump, with_firewall) in [
            (Family::V4, true, nodeports(""), true),
            (Family::V4, false, nodeports("! -d 127.0.0.0/8 "), false),
            (Family::V6, true, nodeports("! -d ::1/128 "), false),
            (Family::V6, false, nodeports("! -d ::1/128 "), false),
        ] {
            let cfg = ProxierConfig {
                family,
                localhost_node_ports: localhost,
                ..ProxierConfig::default()
            };
            let out = lines(&render(&cfg, &[]), &cfg);
            let jumps: Vec<&String> = out
                .iter()
                .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.ends_with("-j KUBE-NODEPORTS"))
                .collect();
            assert_eq!(jumps, [&jump], "{family:?} {localhost}");
            let kubelet: Vec<String> = out
                .iter()
                .filter(|l| l.contains("KUBE-FIREWALL"))
                .cloned()
                .collect();
            let want: &[String] = if with_firewall { &firewall } else { &[] };
            assert_eq!(kubelet, want, "{family:?} {localhost}");
        }
        // With --nodeport-addresses the node's addresses are listed instead, loopback never.
        let cfg = ProxierConfig {
            node_port_addresses: Some(vec!["192.168.56.10".parse().unwrap()]),
            ..ProxierConfig::default()
        };
        let out = lines(&render(&cfg, &[]), &cfg);
        assert!(!out.iter().any(|l| l.contains("KUBE-FIREWALL")), "{out:#?}");
    }
}
