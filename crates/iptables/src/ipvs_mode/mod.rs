//! kube-proxy's ipvs mode in netfilter: the KUBE-* ipsets ([`KubeSet`]) that hold the
//! Services' addresses and ports, and the small fixed rule set that matches on them
//! ([`ruleset`], rendered from plain facts in a [`RuleInput`]). The chains are
//! [`crate::chain::IPVS_MODE_CHAINS`]; the set names are [`KubeSet::name`]'s.

mod rules;
mod sets;
mod write;

pub use rules::{JUMPS, RuleInput, render_save, ruleset};
pub use sets::{KubeSet, is_proxy_set, node_ports};
pub use write::write_rules;
