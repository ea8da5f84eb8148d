//! What one `iptables-restore --noflush` run does to one table: chains rewritten whole,
//! chains deleted, and jump rules into built-in chains added or removed.
//!
//! With `--noflush`, declaring `:CHAIN - [0:0]` creates the chain or flushes it, and nothing
//! else in the table is touched. That is how a user's rules survive: the proxy only ever
//! declares, fills and deletes chains it owns ([`crate::chain::is_proxy_chain`]), and edits
//! built-in chains by inserting (`-I`) or deleting (`-D`) its own jump rules by their exact spec.

use std::collections::BTreeMap;

use crate::Error;
use crate::chain::is_proxy_chain;
use crate::rule::Rule;
use crate::saved::rule_chain_and_target;
use crate::table::Table;

/// Changes to one table, applied together and atomically by one `iptables-restore`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablePatch {
    /// Chains (re)written whole, with their rules in order. Sorted by name when rendered.
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Chains flushed and deleted (after the rewritten chains no longer jump to them).
    pub delete: Vec<String>,
    /// Jump rules to insert at the top of built-in chains (`-I CHAIN 1 …`), in order.
    pub insert_jumps: Vec<Rule>,
    /// Jump rules to delete from built-in chains, as `iptables-save` printed them (`-A CHAIN …`;
    /// written as `-D CHAIN …`).
    pub delete_saved: Vec<String>,
}

impl TablePatch {
    /// Whether applying this patch would change nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
            && self.delete.is_empty()
            && self.insert_jumps.is_empty()
            && self.delete_saved.is_empty()
    }

    /// The number of rule lines this patch writes.
    #[must_use]
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(Vec::len).sum::<usize>()
            + self.insert_jumps.len()
            + self.delete_saved.len()
    }

    /// Refuses a patch that would write or delete a chain the proxy does not own, or touch a
    /// built-in chain other than through a jump to one of its own chains.
    pub fn check_ownership(&self, table: Table) -> Result<(), Error> {
        let not_owned = |chain: &str| Error::NotOwned {
            table,
            chain: chain.to_owned(),
        };
        for (name, rules) in &self.chains {
            if !is_proxy_chain(table, name) {
                return Err(not_owned(name));
            }
            if let Some(r) = rules.iter().find(|r| &r.chain != name) {
                return Err(not_owned(&r.chain));
            }
        }
        if let Some(name) = self.delete.iter().find(|n| !is_proxy_chain(table, n)) {
            return Err(not_owned(name));
        }
        for r in &self.insert_jumps {
            let to_own = r
                .target
                .jump_chain()
                .is_some_and(|c| is_proxy_chain(table, c));
            if !table.is_builtin(&r.chain) || !to_own {
                return Err(not_owned(&r.chain));
            }
        }
        for line in &self.delete_saved {
            let Some((chain, target)) = rule_chain_and_target(line) else {
                return Err(not_owned(line));
            };
            if !table.is_builtin(chain) || !target.is_some_and(|c| is_proxy_chain(table, c)) {
                return Err(not_owned(chain));
            }
        }
        Ok(())
    }

    /// Writes this patch as one `*table … COMMIT` section of `iptables-restore --noflush`
    /// input: chain declarations (sorted), deletions of jumps, the chains' rules, insertions
    /// of jumps, then flush-and-delete of removed chains.
    pub fn write(&self, table: Table, out: &mut String) {
        if self.is_empty() {
            return;
        }
        out.push('*');
        out.push_str(table.as_str());
        out.push('\n');
        for name in self.chains.keys().chain(&self.delete) {
            out.push(':');
            out.push_str(name);
            out.push_str(" - [0:0]\n");
        }
        for line in &self.delete_saved {
            out.push_str("-D ");
            out.push_str(line.strip_prefix("-A ").unwrap_or(line));
            out.push('\n');
        }
        for rules in self.chains.values() {
            for r in rules {
                r.write_with("-A", out);
                out.push('\n');
            }
        }
        for r in &self.insert_jumps {
            // `-I CHAIN 1` keeps kube-proxy's behaviour: its jumps go before other rules.
            let op = format!("-I {} 1", r.chain);
            let mut line = String::new();
            r.write_with("-A", &mut line);
            out.push_str(&op);
            out.push_str(&line[2 + 1 + r.chain.len()..]);
            out.push('\n');
        }
        for name in &self.delete {
            out.push_str("-X ");
            out.push_str(name);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
}

/// Changes to every table of one family, rendered as one `iptables-restore --noflush` input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Per-table patches.
    pub tables: BTreeMap<Table, TablePatch>,
}

impl Ruleset {
    /// The patch of `table`, created empty on first use.
    pub fn table(&mut self, table: Table) -> &mut TablePatch {
        self.tables.entry(table).or_default()
    }

    /// Whether nothing would change.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tables.values().all(TablePatch::is_empty)
    }

    /// The number of rule lines written.
    #[must_use]
    pub fn rule_count(&self) -> usize {
        self.tables.values().map(TablePatch::rule_count).sum()
    }

    /// Checks every table's patch with [`TablePatch::check_ownership`].
    pub fn check_ownership(&self) -> Result<(), Error> {
        self.tables
            .iter()
            .try_for_each(|(t, p)| p.check_ownership(*t))
    }

    /// The `iptables-restore --noflush` input, tables in a fixed order.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(self.rule_count() * 160 + 64);
        for (table, patch) in &self.tables {
            patch.write(*table, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::{Protocol, Target};

    #[test]
    fn patch_declares_fills_inserts_and_deletes() {
        let mut rs = Ruleset::default();
        let nat = rs.table(Table::Nat);
        nat.chains.insert(
            "KUBE-SVC-AAAA".into(),
            vec![Rule::jump("KUBE-SVC-AAAA", "KUBE-SEP-BBBB")],
        );
        nat.delete.push("KUBE-SEP-OLD".into());
        nat.insert_jumps
            .push(Rule::jump("PREROUTING", "KUBE-SERVICES").comment("kubernetes service portals"));
        assert_eq!(
            rs.render(),
            "*nat\n:KUBE-SVC-AAAA - [0:0]\n:KUBE-SEP-OLD - [0:0]\n\
             -A KUBE-SVC-AAAA -j KUBE-SEP-BBBB\n\
             -I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -X KUBE-SEP-OLD\nCOMMIT\n"
        );
        rs.check_ownership().unwrap();
    }

    #[test]
    fn foreign_chains_are_refused() {
        let mut rs = Ruleset::default();
        rs.table(Table::Filter)
            .chains
            .insert("USER-CHAIN".into(), vec![]);
        assert!(rs.check_ownership().is_err());

        let mut rs = Ruleset::default();
        rs.table(Table::Filter).delete.push("KUBE-FIREWALL".into());
        assert!(
            rs.check_ownership().is_err(),
            "kubelet's filter KUBE-FIREWALL is not ours"
        );

        let mut rs = Ruleset::default();
        rs.table(Table::Filter)
            .insert_jumps
            .push(Rule::new("INPUT", Target::Drop).dport(Protocol::Tcp, 22));
        assert!(rs.check_ownership().is_err());
    }
}
