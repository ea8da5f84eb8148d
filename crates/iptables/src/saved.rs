//! `iptables-save` output, parsed just enough to find the proxy's chains and its jump rules.

use std::collections::{BTreeMap, BTreeSet};

use crate::chain::is_proxy_chain;
use crate::rule::Rule;
use crate::ruleset::Ruleset;
use crate::table::Table;

/// One table as `iptables-save` printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Every chain declared (`:NAME …`), built-in or not.
    pub chains: BTreeSet<String>,
    /// Every rule line (`-A CHAIN …`), verbatim, in order.
    pub rules: Vec<String>,
}

/// Every table `iptables-save` printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// Per table.
    pub tables: BTreeMap<Table, SavedTable>,
}

/// The chain and the `-j` target of a saved `-A` line.
#[must_use]
pub fn rule_chain_and_target(line: &str) -> Option<(&str, Option<&str>)> {
    let rest = line.strip_prefix("-A ")?;
    let chain = rest.split(' ').next()?;
    // The target is the word after the last ` -j ` outside quotes; comments are quoted and a
    // quoted " -j " cannot end the line's last word, so the last occurrence is the target.
    let target = rest
        .rfind(" -j ")
        .map(|i| rest[i + 4..].split(' ').next().unwrap_or(""));
    Some((chain, target))
}

impl Saved {
    /// Parses `iptables-save` output; unknown lines are ignored.
    #[must_use]
    pub fn parse(text: &str) -> Saved {
        let mut saved = Saved::default();
        let mut current: Option<Table> = None;
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('*') {
                current = Table::parse(name.trim());
                if let Some(t) = current {
                    saved.tables.entry(t).or_default();
                }
            } else if let Some(t) = current {
                let entry = saved.tables.entry(t).or_default();
                if let Some(decl) = line.strip_prefix(':') {
                    if let Some(name) = decl.split(' ').next() {
                        entry.chains.insert(name.to_owned());
                    }
                } else if line.starts_with("-A ") {
                    entry.rules.push(line.to_owned());
                }
            }
        }
        saved
    }

    /// The proxy's chains present in `table`.
    pub fn proxy_chains(&self, table: Table) -> impl Iterator<Item = &str> {
        self.tables
            .get(&table)
            .into_iter()
            .flat_map(move |t| t.chains.iter().filter(move |c| is_proxy_chain(table, c)))
            .map(String::as_str)
    }

    /// Whether a rule in `table`'s `chain` already jumps to `target`.
    #[must_use]
    pub fn has_jump(&self, table: Table, chain: &str, target: &str) -> bool {
        self.tables.get(&table).is_some_and(|t| {
            t.rules
                .iter()
                .filter_map(|l| rule_chain_and_target(l))
                .any(|(c, j)| c == chain && j == Some(target))
        })
    }

    /// The saved rules in built-in chains of `table` that jump to one of the proxy's chains.
    pub fn proxy_jumps(&self, table: Table) -> impl Iterator<Item = &str> {
        self.tables.get(&table).into_iter().flat_map(move |t| {
            t.rules.iter().map(String::as_str).filter(move |l| {
                rule_chain_and_target(l).is_some_and(|(c, j)| {
                    table.is_builtin(c) && j.is_some_and(|j| is_proxy_chain(table, j))
                })
            })
        })
    }

    /// Adds to `ruleset` the insertion of each of `jumps` (rules in built-in chains) that is
    /// missing here. A jump counts as present when the same built-in chain already jumps to
    /// the same target, whatever its matches, so a sync never stacks duplicates. Each is
    /// inserted at the top in turn, as kube-proxy does, so the last listed ends up first.
    pub fn add_missing_jumps(&self, table: Table, jumps: &[Rule], ruleset: &mut Ruleset) {
        for j in jumps {
            let Some(target) = j.target.jump_chain() else {
                continue;
            };
            if !self.has_jump(table, &j.chain, target) {
                ruleset.table(table).insert_jumps.push(j.clone());
            }
        }
    }

    /// Adds to `ruleset` the removal of everything the proxy owns in this saved state: its
    /// jump rules in built-in chains, then its chains (flushed and deleted). A user's chains
    /// and rules are left alone.
    pub fn add_cleanup(&self, ruleset: &mut Ruleset) {
        for &table in self.tables.keys() {
            let jumps: Vec<String> = self.proxy_jumps(table).map(str::to_owned).collect();
            let chains: Vec<String> = self.proxy_chains(table).map(str::to_owned).collect();
            if jumps.is_empty() && chains.is_empty() {
                continue;
            }
            let patch = ruleset.table(table);
            patch.delete_saved.extend(jumps);
            patch.delete.extend(chains);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "# Generated by iptables-nft-save
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:USER-CHAIN - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -m comment --comment \"user -j KUBE-SERVICES in a comment\" -j USER-CHAIN
-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-ABC
COMMIT
";

    #[test]
    fn cleanup_removes_only_the_proxys_jumps_and_chains() {
        let saved = Saved::parse(SAVED);
        let mut rs = Ruleset::default();
        saved.add_cleanup(&mut rs);
        rs.check_ownership().unwrap();
        assert_eq!(
            rs.render(),
            "*nat\n:KUBE-SVC-ABC - [0:0]\n:KUBE-SERVICES - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -X KUBE-SERVICES\n-X KUBE-SVC-ABC\nCOMMIT\n"
        );
    }

    #[test]
    fn present_jumps_are_not_inserted_again() {
        let saved = Saved::parse(SAVED);
        let mut rs = Ruleset::default();
        let jumps = [
            Rule::jump("PREROUTING", "KUBE-SERVICES").comment("kubernetes service portals"),
            Rule::jump("OUTPUT", "KUBE-SERVICES").comment("kubernetes service portals"),
        ];
        saved.add_missing_jumps(Table::Nat, &jumps, &mut rs);
        assert_eq!(rs.table(Table::Nat).insert_jumps, vec![jumps[1].clone()]);
    }
}
