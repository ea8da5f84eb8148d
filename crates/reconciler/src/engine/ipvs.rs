//! The IPVS proxier: the sync engine over the kernel's IPVS, `kube-ipvs0` and netfilter. Its
//! periodic full syncs read the kernel off the loop's thread (`sync::resync`).

use std::collections::BTreeSet;
use std::time::Instant;

use super::Engine;
use crate::model::ServiceName;
use crate::plan::{PlanConfig, PlanWarning, Planner, ServicePlan};
use crate::state::ClusterState;
use crate::sync::{
    AddressKernel, Counts, IpvsKernel, NetfilterKernel, ServiceTarget, SyncReport, Syncer,
};

/// A Service's plan as the engine keeps it: its addresses and set entries become the
/// mirror's record of the Service, so they are held at their length (collected, a vector
/// makes room for four: 1.2 MiB at 10,000 Services of one address and two entries).
fn target(plan: ServicePlan) -> ServiceTarget {
    let mut target = ServiceTarget::from(plan);
    target.addresses.shrink_to_fit();
    target.netfilter.shrink_to_fit();
    target
}

/// The IPVS proxier.
#[derive(Debug)]
pub struct IpvsEngine<I, A, N>(pub Syncer<I, A, N>);

impl<I, A, N> Engine for IpvsEngine<I, A, N>
where
    I: IpvsKernel + Send,
    A: AddressKernel + Send,
    N: NetfilterKernel + Send,
{
    fn full_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        let mut warnings = Vec::new();
        // Planned one Service at a time as the engine takes them: the whole node's plan is
        // never in memory at once.
        let targets = state.services().map(|(name, ports)| {
            let plan = planner.plan_service(ports, |p| state.endpoints(p));
            warnings.extend(plan.warnings.iter().cloned());
            (name.clone(), target(plan))
        });
        let report = self.0.full_sync(targets, now);
        (report, warnings)
    }

    fn partial_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        dirty: &BTreeSet<ServiceName>,
        now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        let mut warnings = Vec::new();
        let targets = dirty
            .iter()
            .map(|name| {
                let target = match state.service(name) {
                    Some(ports) => {
                        let plan = planner.plan_service(ports, |p| state.endpoints(p));
                        warnings.extend(plan.warnings.iter().cloned());
                        target(plan)
                    }
                    None => ServiceTarget::default(),
                };
                (name.clone(), target)
            })
            .collect();
        (self.0.sync(targets, now), warnings)
    }

    fn drain(&mut self, now: Instant) -> SyncReport {
        self.0.drain(now)
    }

    fn counts(&self) -> Counts {
        self.0.counts()
    }

    fn rebind(&mut self) -> SyncReport {
        self.0.rebind()
    }

    fn reconfigure(&mut self, config: &PlanConfig) {
        self.0.reconfigure(config);
    }

    fn start_resync(&mut self, now: Instant) -> bool {
        self.0.start_resync(now)
    }

    fn resume_at(&self) -> Option<Instant> {
        self.0.resync_due()
    }

    fn resume(
        &mut self,
        _state: &ClusterState,
        _planner: &Planner,
        now: Instant,
    ) -> Option<SyncReport> {
        self.0.finish_resync(now)
    }
}
