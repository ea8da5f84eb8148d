//! What the kernel holds of the proxier's chains, read from `iptables-save` as it streams:
//! per chain a [`Fingerprint`] of its rules, never their text. At 10,000 Services the saved
//! text is 31 MB in 320,000 lines; the fingerprints of its 111,000 chains are a few MB, and
//! they are all a full sync needs to tell which chains differ from what it would write.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use crate::Error;
use crate::chain::may_write_chain;
use crate::rule::{Rule, rule_chain_and_target};
use crate::runner::Runner;
use crate::saved::Saved;
use crate::table::{Family, Table};

/// A chain's rules, reduced to what comparing them needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// The rules in order.
    pub ordered: u64,
    /// The rules as a multiset, for the shared chains (KUBE-SERVICES, …), whose rules match
    /// disjoint packets, so their order does not matter: a partial sync inserts at the top,
    /// and a full sync need not rewrite 10,000 rules to reorder them.
    pub unordered: u64,
    /// How many rules.
    pub rules: u32,
}

impl Fingerprint {
    /// Adds one rule line, as `iptables-save` prints it.
    fn add(&mut self, line: &str) {
        let mut h = DefaultHasher::new();
        line.hash(&mut h);
        let rule = h.finish();
        let mut h = DefaultHasher::new();
        (self.ordered, rule).hash(&mut h);
        self.ordered = h.finish();
        self.unordered = self.unordered.wrapping_add(rule);
        self.rules += 1;
    }

    /// The fingerprint the kernel shows for `rules` once they are restored.
    #[must_use]
    pub fn of(rules: &[Rule]) -> Fingerprint {
        let mut fp = Fingerprint::default();
        let mut line = String::with_capacity(160);
        for r in rules {
            line.clear();
            r.write_saved(&mut line);
            fp.add(&line);
        }
        fp
    }

    /// Whether the kernel's `self` holds `want`'s rules, in order unless `any_order`.
    #[must_use]
    pub fn matches(&self, want: &Fingerprint, any_order: bool) -> bool {
        self.rules == want.rules
            && if any_order {
                self.unordered == want.unordered
            } else {
                self.ordered == want.ordered
            }
    }
}

/// The proxier's chains in the kernel (one family), and the jumps into them from the
/// built-in chains.
#[derive(Debug, Default)]
pub struct KernelChains {
    chains: BTreeMap<Table, HashMap<Box<str>, Fingerprint>>,
    /// The built-in chains' rules that jump to a proxy chain, verbatim (a handful).
    jumps: Saved,
}

impl KernelChains {
    /// Reads the kernel with one `iptables-save` of every table, fingerprinting as it reads.
    pub fn read(runner: &Runner, family: Family) -> Result<KernelChains, Error> {
        let mut kernel = KernelChains::default();
        let mut table = None;
        runner.save_each_line(family, &mut |line| kernel.add_line(&mut table, line))?;
        Ok(kernel)
    }

    /// Parses `iptables-save` output held whole (tests, `plan`).
    #[must_use]
    pub fn parse(text: &str) -> KernelChains {
        let mut kernel = KernelChains::default();
        let mut table = None;
        for line in text.lines() {
            kernel.add_line(&mut table, line);
        }
        kernel
    }

    fn add_line(&mut self, table: &mut Option<Table>, line: &str) {
        if let Some(name) = line.strip_prefix('*') {
            *table = Table::parse(name.trim());
            return;
        }
        let Some(t) = *table else {
            return;
        };
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split(' ').next().unwrap_or_default();
            if may_write_chain(t, name) {
                self.chains
                    .entry(t)
                    .or_default()
                    .entry(name.into())
                    .or_default();
            }
        } else if let Some((chain, target)) = rule_chain_and_target(line) {
            if let Some(fp) = self.chains.get_mut(&t).and_then(|c| c.get_mut(chain)) {
                fp.add(line);
            } else if t.is_builtin(chain) && target.is_some_and(|j| may_write_chain(t, j)) {
                self.jumps
                    .tables
                    .entry(t)
                    .or_default()
                    .rules
                    .push(line.to_owned());
            }
        }
    }

    /// The fingerprint of the proxy chain `name` of `table`, if the kernel has it.
    #[must_use]
    pub fn chain(&self, table: Table, name: &str) -> Option<&Fingerprint> {
        self.chains.get(&table)?.get(name)
    }

    /// The chains the proxy writes present in `table` (its own, and kubelet's it writes too).
    pub fn proxy_chains(&self, table: Table) -> impl Iterator<Item = &str> {
        self.chains
            .get(&table)
            .into_iter()
            .flat_map(|c| c.keys().map(AsRef::as_ref))
    }

    /// The built-in chains' jumps into the proxy's chains, as a [`Saved`] (for
    /// [`Saved::add_missing_jumps`]).
    #[must_use]
    pub fn jumps(&self) -> &Saved {
        &self.jumps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::Match;

    const SAVED: &str = "*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-DEF - [0:0]
:USER - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -j USER
-A USER -j RETURN
-A KUBE-SVC-ABC -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-DEF
-A KUBE-SVC-ABC -j KUBE-SEP-DEF
COMMIT
";

    #[test]
    fn a_chain_matches_the_rules_that_were_restored_into_it() {
        let kernel = KernelChains::parse(SAVED);
        let rules = [
            Rule::jump("KUBE-SVC-ABC", "KUBE-SEP-DEF").with(Match::OneIn(3)),
            Rule::jump("KUBE-SVC-ABC", "KUBE-SEP-DEF"),
        ];
        let svc = kernel.chain(Table::Nat, "KUBE-SVC-ABC").unwrap();
        assert!(svc.matches(&Fingerprint::of(&rules), false));
        let swapped = [rules[1].clone(), rules[0].clone()];
        assert!(!svc.matches(&Fingerprint::of(&swapped), false));
        assert!(svc.matches(&Fingerprint::of(&swapped), true), "any order");
        assert!(!svc.matches(&Fingerprint::of(&rules[..1]), true));
        assert_eq!(
            kernel.chain(Table::Nat, "KUBE-SEP-DEF"),
            Some(&Fingerprint::default()),
            "declared, empty"
        );
        assert_eq!(kernel.chain(Table::Nat, "USER"), None, "not the proxy's");
        let names: Vec<&str> = kernel.proxy_chains(Table::Nat).collect();
        assert_eq!(names.len(), 2);
        assert!(
            kernel
                .jumps()
                .has_jump(Table::Nat, "PREROUTING", "KUBE-SERVICES")
        );
        assert!(!kernel.jumps().has_jump(Table::Nat, "PREROUTING", "USER"));
    }
}
