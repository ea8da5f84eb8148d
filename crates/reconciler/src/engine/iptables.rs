//! kube-proxy's iptables proxier: the fallback when IPVS is missing, or `--proxy-mode=iptables`.

use std::collections::BTreeSet;
use std::time::Instant;

use iptables::Runner;
use iptables::proxier::Proxier;

use super::Engine;
use crate::error::Error;
use crate::fallback::{changed_service_specs, proxier_config, service_specs};
use crate::model::ServiceName;
use crate::plan::{PlanConfig, PlanWarning, Planner};
use crate::state::ClusterState;
use crate::sync::{SyncError, SyncReport};

/// One rule set per family; a partial sync rewrites only the chains of changed Services.
#[derive(Debug)]
pub struct IptablesEngine {
    runner: Runner,
    proxiers: Vec<Proxier>,
}

impl IptablesEngine {
    #[must_use]
    pub fn new(runner: Runner) -> Self {
        IptablesEngine {
            runner,
            proxiers: Vec::new(),
        }
    }

    /// Syncs every family: all Services after re-reading the kernel (`dirty` is `None`), or
    /// only those in `dirty`.
    fn sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        dirty: Option<&BTreeSet<ServiceName>>,
    ) -> SyncReport {
        if self.proxiers.len() != planner.config.families.len() {
            self.reconfigure(&planner.config);
        }
        let node = &*planner.config.node_name;
        // Converted once for all families; every Service only if a sync is full.
        let changed = dirty.map(|dirty| changed_service_specs(state, dirty, node));
        let all = std::cell::OnceCell::new();
        let all = || all.get_or_init(|| service_specs(state, node)).as_slice();
        let mut report = SyncReport {
            services: dirty.map_or_else(|| state.service_count(), BTreeSet::len),
            ..SyncReport::default()
        };
        // Each family's proxier takes the addresses of its own family from every spec.
        for proxier in &mut self.proxiers {
            let family = proxier.config().family;
            let synced = match &changed {
                Some(changed) => {
                    let changed = changed.iter().map(|(name, ports)| (name, ports));
                    proxier.sync_services(&self.runner, changed, all)
                }
                None => proxier.sync_full(&self.runner, all()),
            };
            match synced {
                Ok(written) => {
                    tracing::debug!(
                        ?family,
                        chains = written.chains_written,
                        deleted = written.chains_deleted,
                        rules = written.rules,
                        "iptables-restore"
                    );
                }
                Err(source) => report.errors.push(SyncError::new(
                    None,
                    Error::IptablesRules { family, source },
                )),
            }
        }
        report
    }
}

impl Engine for IptablesEngine {
    fn full_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        _now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        (self.sync(state, planner, None), Vec::new())
    }

    fn partial_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        dirty: &BTreeSet<ServiceName>,
        _now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        (self.sync(state, planner, Some(dirty)), Vec::new())
    }

    fn reconfigure(&mut self, config: &PlanConfig) {
        self.proxiers = config
            .families
            .iter()
            .map(|&family| Proxier::new(proxier_config(config, family)))
            .collect();
    }
}
