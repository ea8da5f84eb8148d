//! What one `iptables-restore --noflush` run does to one table: chains rewritten whole,
//! chains deleted, single rules of the proxy's chains deleted or inserted, and jump rules
//! into built-in chains added or removed.
//!
//! With `--noflush`, declaring `:CHAIN - [0:0]` creates the chain or flushes it, and nothing
//! else in the table is touched. That is how a user's rules survive: the proxy only ever
//! declares, fills, edits and deletes chains it owns ([`crate::chain::is_proxy_chain`]), and
//! edits built-in chains by inserting (`-I`) or deleting (`-D`) its own jump rules by their
//! exact spec.

use std::collections::{BTreeMap, HashSet};

use crate::Error;
use crate::chain::{is_proxy_chain, may_write_chain};
use crate::rule::Rule;
use crate::rule::rule_chain_and_target;
use crate::table::Table;

/// Changes to one table, applied together and atomically by one `iptables-restore` (unless
/// iptables-nft is given a large ruleset, which goes in parts: [`Ruleset::split`]).
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
    /// Rules deleted by their exact spec from the proxy's own chains that are not rewritten
    /// (`-D CHAIN …`): a partial sync's edits of KUBE-SERVICES and the other shared chains.
    pub delete_rules: Vec<Rule>,
    /// Rules inserted at the top of the proxy's own chains that are not rewritten
    /// (`-I CHAIN 1 …`, so KUBE-SERVICES's jump to KUBE-NODEPORTS stays last).
    pub insert_rules: Vec<Rule>,
}

impl TablePatch {
    /// Whether applying this patch would change nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
            && self.delete.is_empty()
            && self.insert_jumps.is_empty()
            && self.delete_saved.is_empty()
            && self.delete_rules.is_empty()
            && self.insert_rules.is_empty()
    }

    /// The number of rule lines this patch writes.
    #[must_use]
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(Vec::len).sum::<usize>()
            + self.insert_jumps.len()
            + self.delete_saved.len()
            + self.delete_rules.len()
            + self.insert_rules.len()
    }

    /// Refuses a patch that would write or delete a chain the proxy does not own (it may
    /// write, never delete, kubelet's [`crate::chain::KUBELET_CHAINS_WRITTEN`]), or touch a
    /// built-in chain other than through a jump to one of the chains it writes.
    pub fn check_ownership(&self, table: Table) -> Result<(), Error> {
        let not_owned = |chain: &str| Error::NotOwned {
            table,
            chain: chain.to_owned(),
        };
        for (name, rules) in &self.chains {
            if !may_write_chain(table, name) {
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
                .is_some_and(|c| may_write_chain(table, c));
            if !table.is_builtin(&r.chain) || !to_own {
                return Err(not_owned(&r.chain));
            }
        }
        if let Some(r) = self
            .delete_rules
            .iter()
            .chain(&self.insert_rules)
            .find(|r| table.is_builtin(&r.chain) || !is_proxy_chain(table, &r.chain))
        {
            return Err(not_owned(&r.chain));
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
    /// input: chain declarations (in descending order), deletions of jumps and rules, the
    /// chains' rules, insertions of rules and jumps, then flush-and-delete of removed chains.
    pub fn write(&self, table: Table, out: &mut String) {
        if self.is_empty() {
            return;
        }
        out.push('*');
        out.push_str(table.as_str());
        out.push('\n');
        // Declared in descending order: iptables-nft-restore files each name into a sorted
        // list walked from its smallest, so the smallest name first makes each step one
        // comparison (ascending, 22,000 chains took 2.4 s instead of 0.2 s).
        let mut declared: Vec<&String> = self.chains.keys().chain(&self.delete).collect();
        declared.sort_unstable_by(|a, b| b.cmp(a));
        for name in declared {
            out.push(':');
            out.push_str(name);
            out.push_str(" - [0:0]\n");
        }
        for line in &self.delete_saved {
            out.push_str("-D ");
            out.push_str(line.strip_prefix("-A ").unwrap_or(line));
            out.push('\n');
        }
        for r in &self.delete_rules {
            r.write_with("-D", out);
            out.push('\n');
        }
        for rules in self.chains.values() {
            for r in rules {
                r.write_with("-A", out);
                out.push('\n');
            }
        }
        // `-I CHAIN 1` keeps kube-proxy's behaviour for its jumps: they go before other rules.
        for r in self.insert_rules.iter().chain(&self.insert_jumps) {
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

    /// The number of lines written: chain declarations, rules, and a declaration and an `-X`
    /// per chain deleted. What an `iptables-nft-restore` run's cost grows with.
    #[must_use]
    pub fn line_count(&self) -> usize {
        self.tables
            .values()
            .map(|t| t.chains.len() + 2 * t.delete.len() + t.rule_count())
            .sum()
    }

    /// Splits this ruleset into restores of about `max_lines` lines each ([`Ruleset::line_count`]),
    /// to be run one after another; a ruleset within the limit comes back whole.
    ///
    /// Why: `iptables-nft-restore` (1.8.x) keeps the name of every chain a restore declares or
    /// jumps to in a sorted linked list, and walks it for every line, so one restore costs
    /// lines × chains: the 434,000 lines and 111,000 chains of 10,000 Services × 10 endpoints
    /// did not finish in 8 minutes. Restores of a bounded size keep the cost linear.
    /// (`iptables-legacy-restore` must not be split: each run replaces the whole table.)
    ///
    /// After each restore the kernel is consistent: chains are written in an order where a
    /// chain comes after every chain of this ruleset it jumps to, so no rewritten chain jumps
    /// to one not yet written, and a chain not yet rewritten still jumps to chains that exist.
    /// Then come the jumps from built-in chains and the edits of single rules (after their
    /// targets, before the chains they stopped jumping to are deleted), then the chains to
    /// delete are flushed, all of them, and only then deleted, so none is still referenced when
    /// it goes.
    #[must_use]
    pub fn split(self, max_lines: usize) -> Vec<Ruleset> {
        if self.line_count() <= max_lines {
            return vec![self];
        }
        let mut out = Batches {
            done: Vec::new(),
            current: Ruleset::default(),
            lines: 0,
            max_lines,
        };
        let mut jumps = Vec::new();
        let mut deletes = Vec::new();
        for (table, patch) in self.tables {
            let TablePatch {
                mut chains,
                delete,
                insert_jumps,
                delete_saved,
                delete_rules,
                insert_rules,
            } = patch;
            for name in dependency_order(&chains) {
                if let Some(rules) = chains.remove(&name) {
                    out.room(rules.len() + 1);
                    out.current.table(table).chains.insert(name, rules);
                }
            }
            jumps.push((
                table,
                insert_jumps,
                delete_saved,
                delete_rules,
                insert_rules,
            ));
            deletes.push((table, delete));
        }
        for (table, insert_jumps, delete_saved, delete_rules, insert_rules) in jumps {
            out.room(
                insert_jumps.len() + delete_saved.len() + delete_rules.len() + insert_rules.len(),
            );
            let patch = out.current.table(table);
            patch.insert_jumps = insert_jumps;
            patch.delete_saved = delete_saved;
            patch.delete_rules = delete_rules;
            patch.insert_rules = insert_rules;
        }
        for (table, names) in &deletes {
            for name in names {
                // Declaring a chain with no rules flushes it.
                out.room(1);
                out.current
                    .table(*table)
                    .chains
                    .insert(name.clone(), Vec::new());
            }
        }
        out.finish_batch();
        for (table, names) in deletes {
            for name in names {
                out.room(2);
                out.current.table(table).delete.push(name);
            }
        }
        out.finish_batch();
        out.done
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

/// Restores being filled by [`Ruleset::split`].
struct Batches {
    done: Vec<Ruleset>,
    current: Ruleset,
    lines: usize,
    max_lines: usize,
}

impl Batches {
    /// Makes room for `lines` more lines, starting a new restore if the current one is full.
    fn room(&mut self, lines: usize) {
        if self.lines > 0 && self.lines + lines > self.max_lines {
            self.finish_batch();
        }
        self.lines += lines;
    }

    fn finish_batch(&mut self) {
        let batch = std::mem::take(&mut self.current);
        if !batch.is_empty() {
            self.done.push(batch);
        }
        self.lines = 0;
    }
}

/// The chains of `chains` in an order where every chain comes after the chains (of `chains`)
/// it jumps to. Jumps to chains not in `chains` are ignored.
///
/// The walk starts from the chains nothing in `chains` jumps to (KUBE-SERVICES on a full
/// sync) and follows their rules in order, so each Service's chains come out together (its
/// KUBE-SEP-* chains, then its KUBE-SVC-*): a restore of a slice of this order mostly jumps to
/// chains of the same slice.
pub(crate) fn dependency_order(chains: &BTreeMap<String, Vec<Rule>>) -> Vec<String> {
    fn visit<'a>(
        name: &'a str,
        chains: &'a BTreeMap<String, Vec<Rule>>,
        seen: &mut HashSet<&'a str>,
        out: &mut Vec<String>,
    ) {
        // Marked on entry: a loop (which the kernel refuses anyway) cannot recurse forever.
        if !seen.insert(name) {
            return;
        }
        if let Some((key, rules)) = chains.get_key_value(name) {
            for target in rules.iter().filter_map(|r| r.target.jump_chain()) {
                visit(target, chains, seen, out);
            }
            out.push(key.clone());
        }
    }
    let targets: HashSet<&str> = chains
        .values()
        .flatten()
        .filter_map(|r| r.target.jump_chain())
        .collect();
    let mut seen = HashSet::with_capacity(chains.len());
    let mut out = Vec::with_capacity(chains.len());
    let roots = chains.keys().filter(|c| !targets.contains(c.as_str()));
    // Then whatever only a loop reaches.
    for name in roots.chain(chains.keys()) {
        visit(name, chains, &mut seen, &mut out);
    }
    out
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

    /// Two services' chains (SVC → SEPs → KUBE-MARK-MASQ) under KUBE-SERVICES, a stale chain
    /// to delete and a jump from PREROUTING.
    fn two_services() -> Ruleset {
        let mut rs = Ruleset::default();
        let nat = rs.table(Table::Nat);
        let mut services = Vec::new();
        for svc in ["KUBE-SVC-ZZZZ", "KUBE-SVC-AAAA"] {
            let mut jumps = Vec::new();
            for sep in 0..3 {
                let sep = format!("KUBE-SEP-{}{sep}", &svc[9..]);
                nat.chains
                    .insert(sep.clone(), vec![Rule::jump(&sep, "KUBE-MARK-MASQ")]);
                jumps.push(Rule::jump(svc, sep));
            }
            nat.chains.insert(svc.to_owned(), jumps);
            services.push(Rule::jump("KUBE-SERVICES", svc));
        }
        nat.chains.insert("KUBE-SERVICES".into(), services);
        nat.chains.insert(
            "KUBE-MARK-MASQ".into(),
            vec![Rule::new("KUBE-MARK-MASQ", Target::Return)],
        );
        nat.delete.push("KUBE-SEP-STALE".into());
        nat.insert_jumps
            .push(Rule::jump("PREROUTING", "KUBE-SERVICES"));
        rs
    }

    #[test]
    fn a_small_ruleset_is_not_split() {
        let rs = two_services();
        assert_eq!(rs.clone().split(1000), vec![rs]);
    }

    #[test]
    fn split_writes_targets_first_keeps_services_together_and_deletes_last() {
        let rs = two_services();
        let parts = rs.clone().split(5);
        assert!(parts.len() > 2, "{parts:?}");
        // Every chain written once, with its rules whole.
        let mut written = BTreeMap::new();
        let mut order = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            assert!(part.line_count() <= 5 || part.tables[&Table::Nat].chains.len() == 1);
            for (name, rules) in &part.tables[&Table::Nat].chains {
                if rules.is_empty() && name == "KUBE-SEP-STALE" {
                    continue;
                }
                assert!(written.insert(name.clone(), (i, rules.clone())).is_none());
                order.push(name.clone());
            }
        }
        let nat = &rs.tables[&Table::Nat];
        assert_eq!(
            written
                .iter()
                .map(|(k, (_, r))| (k.clone(), r.clone()))
                .collect::<BTreeMap<_, _>>(),
            nat.chains
        );
        // No chain is written before a chain it jumps to.
        for (name, (i, rules)) in &written {
            for target in rules.iter().filter_map(|r| r.target.jump_chain()) {
                assert!(written[target].0 <= *i, "{name} before {target}");
            }
        }
        // Each service's chains are written next to each other.
        let pos = |c: &str| order.iter().position(|o| o == c).unwrap();
        assert_eq!(pos("KUBE-SVC-ZZZZ") - pos("KUBE-SEP-ZZZZ0"), 3);
        assert_eq!(pos("KUBE-SVC-AAAA") - pos("KUBE-SEP-AAAA0"), 3);
        // The jump from PREROUTING comes with or after KUBE-SERVICES; the stale chain is
        // flushed in one restore and deleted in a later one, the very last.
        let jump_at = parts
            .iter()
            .position(|p| !p.tables[&Table::Nat].insert_jumps.is_empty())
            .unwrap();
        assert!(jump_at >= written["KUBE-SERVICES"].0);
        let flushed_at = parts
            .iter()
            .position(|p| p.tables[&Table::Nat].chains.contains_key("KUBE-SEP-STALE"))
            .unwrap();
        let last = parts.last().unwrap();
        assert_eq!(last.tables[&Table::Nat].delete, ["KUBE-SEP-STALE"]);
        assert!(last.tables[&Table::Nat].chains.is_empty());
        assert!(flushed_at < parts.len() - 1);
        assert!(parts[flushed_at].tables[&Table::Nat].chains["KUBE-SEP-STALE"].is_empty());
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
