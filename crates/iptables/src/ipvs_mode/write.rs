//! Writing the ipvs mode's chains, only where `iptables-save` shows them otherwise.

use super::{RuleInput, ruleset};
use crate::saved::Saved;
use crate::table::Table;
use crate::{Error, Ruleset, Runner};

/// Rewrites the proxy's chains of `input.family` from `input`, with the jumps from built-in
/// chains added only where `iptables-save` does not show them already; nothing when it shows
/// every chain as it would be written (a full sync over chains nobody changed writes nothing,
/// so it commits nothing either). Says whether it wrote.
pub fn write_rules(runner: &Runner, input: &RuleInput) -> Result<bool, Error> {
    let saved = runner.save(input.family, None)?;
    let Some(ruleset) = needed(input, &saved) else {
        return Ok(false);
    };
    runner.apply(input.family, &ruleset)?;
    Ok(true)
}

/// What to write over `saved`: the chains of `input`, with only the missing jumps; `None`
/// when `saved` shows them all as they would be written.
fn needed(input: &RuleInput, saved: &Saved) -> Option<Ruleset> {
    let mut ruleset = ruleset(input);
    for table in [Table::Nat, Table::Filter, Table::Mangle, Table::Raw] {
        let Some(patch) = ruleset.tables.get_mut(&table) else {
            continue;
        };
        let jumps = std::mem::take(&mut patch.insert_jumps);
        saved.add_missing_jumps(table, &jumps, &mut ruleset);
    }
    (!as_saved(&ruleset, saved)).then_some(ruleset)
}

/// Whether `saved` already holds every chain of `ruleset` with its rules in order, and
/// `ruleset` has nothing else to do (no missing jump, nothing to delete).
fn as_saved(ruleset: &Ruleset, saved: &Saved) -> bool {
    ruleset.tables.iter().all(|(table, patch)| {
        let Some(have) = saved.tables.get(table) else {
            return patch.is_empty();
        };
        let others_empty = patch.delete.is_empty()
            && patch.insert_jumps.is_empty()
            && patch.delete_saved.is_empty()
            && patch.delete_rules.is_empty()
            && patch.insert_rules.is_empty();
        others_empty
            && patch.chains.iter().all(|(chain, rules)| {
                let prefix = format!("-A {chain} ");
                let kernel = have.rules.iter().filter(|l| l.starts_with(&prefix));
                let wanted: Vec<String> = rules.iter().map(ToString::to_string).collect();
                have.chains.contains(chain) && kernel.eq(wanted.iter())
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipvs_mode::render_save;
    use crate::table::Family;

    fn input() -> RuleInput {
        RuleInput {
            family: Family::V4,
            masquerade_mark: 0x4000,
            masquerade_all: false,
            local: crate::LocalDetector::Cidr("10.244.0.0/16".parse().unwrap()),
            random_fully: false,
            non_empty: [super::super::KubeSet::ClusterIp].into(),
            no_node_access: std::collections::BTreeSet::default(),
        }
    }

    #[test]
    fn chains_saved_as_they_would_be_written_need_no_write() {
        let text = render_save(&ruleset(&input()));
        assert!(needed(&input(), &Saved::parse(&text)).is_none());

        // A rule gone from one chain (by hand): written again.
        let line = text
            .lines()
            .find(|l| l.starts_with("-A KUBE-SERVICES "))
            .unwrap();
        let edited = text.replacen(&format!("{line}\n"), "", 1);
        assert!(needed(&input(), &Saved::parse(&edited)).is_some());
        // Nothing saved at all.
        assert!(needed(&input(), &Saved::default()).is_some());
    }
}
