//! kube-proxy's iptables proxier: the fallback when IPVS is missing, or `--proxy-mode=iptables`.

use std::collections::BTreeSet;
use std::time::Instant;

use iptables::Runner;
use iptables::proxier::Proxier;

use super::Engine;
use crate::error::Error;
use crate::fallback::{proxier_config, service_specs};
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

    fn sync(&mut self, state: &ClusterState, planner: &Planner, full: bool) -> SyncReport {
        if self.proxiers.len() != planner.config.families.len() {
            self.reconfigure(&planner.config);
        }
        let specs = service_specs(state, &planner.config.node_name);
        let mut report = SyncReport {
            services: state.service_count(),
            ..SyncReport::default()
        };
        // Each family's proxier takes the addresses of its own family from every spec.
        for proxier in &mut self.proxiers {
            let family = proxier.config().family;
            match proxier.sync(&self.runner, &specs, full) {
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
        (self.sync(state, planner, true), Vec::new())
    }

    fn partial_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        _dirty: &BTreeSet<ServiceName>,
        _now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        (self.sync(state, planner, false), Vec::new())
    }

    fn reconfigure(&mut self, config: &PlanConfig) {
        self.proxiers = config
            .families
            .iter()
            .map(|&family| {
                Proxier::new(proxier_config(
                    family,
                    config.masquerade_bit,
                    config.masquerade_all,
                    config.cluster_cidr(family),
                ))
            })
            .collect();
    }
}
