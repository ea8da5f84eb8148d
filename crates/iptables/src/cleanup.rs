//! `--cleanup`: remove everything the proxy ever wrote, in both flavours and both families,
//! and nothing else.

use crate::Error;
use crate::ipset::SetPatch;
use crate::ipvs_mode::is_proxy_set;
use crate::ruleset::Ruleset;
use crate::runner::{Flavour, Runner};
use crate::table::Family;

/// What [`cleanup`] removed, and what it could not do.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Chains flushed and deleted, over all flavours, families and tables.
    pub chains: usize,
    /// Jump rules deleted from built-in chains.
    pub jumps: usize,
    /// ipsets destroyed.
    pub sets: usize,
    /// Steps that failed (a missing tool or family is not an error: it is skipped).
    pub errors: Vec<Error>,
}

/// Removes the proxy's jump rules from built-in chains, then flushes and deletes its chains,
/// in every table of both iptables flavours and both families; then destroys its ipsets.
/// One `iptables-save` and at most one `iptables-restore` per flavour and family, one
/// `ipset restore` in all. A user's own chains, rules and sets are left as they are.
///
/// `runner` names the namespace; its flavour is ignored (both are cleaned).
#[must_use]
pub fn cleanup(runner: &Runner) -> CleanupReport {
    let mut report = CleanupReport::default();
    for flavour in Flavour::ALL {
        let r = runner.with_flavour(flavour);
        for family in Family::ALL {
            let saved = match r.save(family, None) {
                Ok(s) => s,
                Err(e) => {
                    // No such tool, or no such family on this host: nothing of ours can be there.
                    tracing::debug!(flavour = flavour.as_str(), ?family, error = %e, "skipping cleanup");
                    continue;
                }
            };
            let mut rs = Ruleset::default();
            saved.add_cleanup(&mut rs);
            let chains: usize = rs.tables.values().map(|t| t.delete.len()).sum();
            let jumps: usize = rs.tables.values().map(|t| t.delete_saved.len()).sum();
            match r.apply(family, &rs) {
                Ok(()) => {
                    report.chains += chains;
                    report.jumps += jumps;
                }
                Err(e) => report.errors.push(e),
            }
        }
    }
    match runner.ipset_names() {
        Ok(names) => {
            let mut patch = SetPatch::default();
            // Swap twins first so a half-done resize is cleared too.
            let mut owned: Vec<&String> = names.iter().filter(|n| is_proxy_set(n)).collect();
            owned.sort();
            for n in &owned {
                patch.remove(n);
            }
            match runner.ipset_restore(&patch) {
                Ok(()) => report.sets += owned.len(),
                Err(e) => report.errors.push(e),
            }
        }
        Err(e) => tracing::debug!(error = %e, "no ipset tool; skipping set cleanup"),
    }
    report
}
