//! What the kernel holds of the proxier's chains, read from `iptables-save` as it streams:
//! per chain a [`Fingerprint`] of its rules, never their text. At 10,000 Services the saved
//! text is 31 MB in 320,000 lines; the per-Service chains among its 111,000 are held as 24
//! bytes each in one sorted array (2.7 MB; as a map by `Box<str>` names they took 7.7 MiB),
//! and they are all a full sync needs to tell which chains differ from what it would write.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use super::names::HashedName;
use crate::Error;
use crate::chain::{is_service_chain, may_write_chain};
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
    pub fn of<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Fingerprint {
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
    tables: BTreeMap<Table, TableChains>,
    /// The built-in chains' rules that jump to a proxy chain, verbatim (a handful).
    jumps: Saved,
}

/// One table's chains of the proxy.
#[derive(Debug, Default)]
struct TableChains {
    /// The per-Service chains, sorted by name when `sorted` (`iptables-save` declares every
    /// chain of a table before its rules, so they are sorted once, at the first rule).
    service: Vec<ServiceChain>,
    sorted: bool,
    /// Where the last rule's chain was found: a chain's rules are printed together.
    last: usize,
    /// The fixed chains the proxy writes (a dozen), and per-Service chains of names that are
    /// not a [`HashedName`] (never the proxy's own: stale).
    other: HashMap<Box<str>, Fingerprint>,
}

/// A per-Service chain in the kernel: its name, its rules in order (all a full sync compares
/// of them: they are rewritten whole), and whether the proxy keeps it ([`KernelChains::keep`]).
#[derive(Debug, Clone, Copy)]
struct ServiceChain {
    name: HashedName,
    kept: bool,
    ordered: u64,
}

impl TableChains {
    fn find(&mut self, name: HashedName) -> Option<&mut ServiceChain> {
        if !self.sorted {
            self.service.sort_unstable_by_key(|c| c.name);
            self.service.dedup_by_key(|c| c.name);
            self.sorted = true;
        }
        if self.service.get(self.last).is_none_or(|c| c.name != name) {
            self.last = self.service.binary_search_by_key(&name, |c| c.name).ok()?;
        }
        self.service.get_mut(self.last)
    }

    fn get(&self, name: HashedName) -> Option<&ServiceChain> {
        debug_assert!(self.sorted || self.service.is_empty(), "sorted when read");
        let i = self.service.binary_search_by_key(&name, |c| c.name).ok()?;
        self.service.get(i)
    }
}

impl KernelChains {
    /// Reads the kernel with one `iptables-save` of every table, fingerprinting as it reads.
    pub fn read(runner: &Runner, family: Family) -> Result<KernelChains, Error> {
        let mut kernel = KernelChains::default();
        let mut table = None;
        runner.save_each_line(family, &mut |line| kernel.add_line(&mut table, line))?;
        kernel.finish();
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
        kernel.finish();
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
            if !may_write_chain(t, name) {
                return;
            }
            let chains = self.tables.entry(t).or_default();
            if let Some(name) = HashedName::parse(name) {
                chains.service.push(ServiceChain {
                    name,
                    kept: false,
                    ordered: 0,
                });
                chains.sorted = false;
            } else {
                chains.other.entry(name.into()).or_default();
            }
        } else if let Some((chain, target)) = rule_chain_and_target(line) {
            let chains = self.tables.get_mut(&t);
            let found = chains.and_then(|c| match HashedName::parse(chain) {
                Some(name) => c.find(name).map(|c| {
                    let mut fp = Fingerprint {
                        ordered: c.ordered,
                        ..Fingerprint::default()
                    };
                    fp.add(line);
                    c.ordered = fp.ordered;
                }),
                None => c.other.get_mut(chain).map(|fp| fp.add(line)),
            });
            if found.is_none()
                && t.is_builtin(chain)
                && target.is_some_and(|j| may_write_chain(t, j))
            {
                self.jumps
                    .tables
                    .entry(t)
                    .or_default()
                    .rules
                    .push(line.to_owned());
            }
        }
    }

    /// Sorts what is left unsorted and gives back what the array grew by beyond its need.
    fn finish(&mut self) {
        for chains in self.tables.values_mut() {
            if !chains.sorted {
                chains.service.sort_unstable_by_key(|c| c.name);
                chains.service.dedup_by_key(|c| c.name);
                chains.sorted = true;
            }
            chains.service.shrink_to_fit();
        }
    }

    /// Whether the kernel's chain `name` of `table` holds `want`'s rules, in order unless
    /// `any_order` (a per-Service chain is compared in order: it is written whole);
    /// `false` when the kernel lacks it.
    #[must_use]
    pub fn matches(&self, table: Table, name: &str, want: &Fingerprint, any_order: bool) -> bool {
        let Some(chains) = self.tables.get(&table) else {
            return false;
        };
        match HashedName::parse(name) {
            Some(name) => chains.get(name).is_some_and(|c| c.ordered == want.ordered),
            None => chains
                .other
                .get(name)
                .is_some_and(|fp| fp.matches(want, any_order)),
        }
    }

    /// The in-order fingerprint ([`Fingerprint::ordered`]) of the per-Service chain `name`
    /// of `table`, if the kernel has it, which is then kept: [`KernelChains::stale`] leaves
    /// it out.
    pub(super) fn keep(&mut self, table: Table, name: HashedName) -> Option<u64> {
        let chain = self.tables.get_mut(&table)?.find(name)?;
        chain.kept = true;
        Some(chain.ordered)
    }

    /// The per-Service chains of `table` nobody kept ([`KernelChains::keep`]): left by Services
    /// that are gone, or by hand.
    pub(super) fn stale(&self, table: Table) -> Vec<String> {
        let Some(chains) = self.tables.get(&table) else {
            return Vec::new();
        };
        let service = chains.service.iter().filter(|c| !c.kept);
        let other = chains.other.keys().filter(|c| is_service_chain(c));
        service
            .map(|c| c.name.to_string())
            .chain(other.map(ToString::to_string))
            .collect()
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
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]
:KUBE-SEP-OLD - [0:0]
:KUBE-SEP-CCCCCCCCCCCCCCCC - [0:0]
:USER - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -j USER
-A USER -j RETURN
-A KUBE-SERVICES -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SERVICES -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A KUBE-SVC-AAAAAAAAAAAAAAAA -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB
COMMIT
";

    #[test]
    fn a_chain_matches_the_rules_that_were_restored_into_it() {
        let mut kernel = KernelChains::parse(SAVED);
        let (svc, sep) = ("KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB");
        let rules = [
            Rule::jump(svc, sep).with(Match::OneIn(3)),
            Rule::jump(svc, sep),
        ];
        let swapped = [rules[1].clone(), rules[0].clone()];
        let fp = Fingerprint::of(&rules);
        assert!(kernel.matches(Table::Nat, svc, &fp, false));
        assert!(!kernel.matches(Table::Nat, svc, &Fingerprint::of(&swapped), false));
        assert!(
            !kernel.matches(Table::Nat, svc, &Fingerprint::of(&swapped), true),
            "a per-Service chain is compared in order"
        );
        assert!(!kernel.matches(Table::Nat, svc, &Fingerprint::of(&rules[..1]), false));
        assert!(!kernel.matches(Table::Filter, svc, &fp, false));
        let shared = [
            Rule::jump("KUBE-SERVICES", sep),
            Rule::jump("KUBE-SERVICES", svc),
        ];
        let shared = Fingerprint::of(&shared);
        assert!(kernel.matches(Table::Nat, "KUBE-SERVICES", &shared, true));
        assert!(!kernel.matches(Table::Nat, "KUBE-SERVICES", &shared, false));
        let empty = Fingerprint::default();
        assert!(
            kernel.matches(Table::Nat, sep, &empty, false),
            "declared, empty"
        );
        assert!(
            !kernel.matches(Table::Nat, "USER", &empty, false),
            "not the proxy's"
        );

        // Kept chains are not stale; the others are, whatever their names.
        let held = |name| HashedName::parse(name).unwrap();
        assert_eq!(kernel.keep(Table::Nat, held(svc)), Some(fp.ordered));
        assert_eq!(
            kernel.keep(Table::Nat, held("KUBE-SVC-CCCCCCCCCCCCCCCC")),
            None
        );
        let mut stale = kernel.stale(Table::Nat);
        stale.sort();
        assert_eq!(
            stale,
            [
                "KUBE-SEP-BBBBBBBBBBBBBBBB",
                "KUBE-SEP-CCCCCCCCCCCCCCCC",
                "KUBE-SEP-OLD"
            ]
        );
        assert!(
            kernel
                .jumps()
                .has_jump(Table::Nat, "PREROUTING", "KUBE-SERVICES")
        );
        assert!(!kernel.jumps().has_jump(Table::Nat, "PREROUTING", "USER"));
    }
}
