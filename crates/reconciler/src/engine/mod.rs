//! The proxiers the sync loop drives: [`IpvsEngine`] (IPVS virtual servers, `kube-ipvs0` and
//! the ipvs-mode netfilter state) and [`IptablesEngine`] (kube-proxy's iptables mode, the
//! fallback when IPVS is missing). Both plan only what they are asked to and keep what they
//! programmed, so a partial sync costs what changed.

mod iptables;
mod ipvs;

use std::collections::BTreeSet;
use std::time::Instant;

pub use self::iptables::IptablesEngine;
pub use self::ipvs::IpvsEngine;
use crate::model::ServiceName;
use crate::plan::{PlanConfig, PlanWarning, Planner};
use crate::state::ClusterState;
use crate::sync::{Counts, SyncReport};

/// A proxier the loop drives.
pub trait Engine: Send {
    /// Re-reads the kernel and programs every Service.
    fn full_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>);
    /// Programs the Services in `dirty` (a Service gone from `state` is removed).
    fn partial_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        dirty: &BTreeSet<ServiceName>,
        now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>);
    /// Deletes drained real servers; nothing for engines that do not drain.
    fn drain(&mut self, _now: Instant) -> SyncReport {
        SyncReport::default()
    }
    /// What the engine has programmed, for metrics.
    fn counts(&self) -> Counts {
        Counts::default()
    }
    /// Node facts or families changed.
    fn reconfigure(&mut self, _config: &PlanConfig) {}
    /// `kube-ipvs0` was deleted under the proxy: make it again and bind what it held; nothing
    /// for engines without it.
    fn rebind(&mut self) -> SyncReport {
        SyncReport::default()
    }
    /// A periodic full sync, if the engine can look for drift off the loop's thread: it starts
    /// the kernel read there and says so, and [`Engine::resume`] repairs what the read found
    /// while the loop syncs changes meanwhile. `false` (the default): the loop runs
    /// [`Engine::full_sync`].
    fn start_resync(&mut self, _now: Instant) -> bool {
        false
    }
    /// When to call [`Engine::resume`]: a sync left work running off the loop's thread (the
    /// iptables proxier's kernel read of a periodic full sync), so that changes need not wait
    /// for it; `None` when nothing runs.
    fn resume_at(&self) -> Option<Instant> {
        None
    }
    /// Finishes what a sync left running, if it is done: what that did.
    fn resume(
        &mut self,
        _state: &ClusterState,
        _planner: &Planner,
        _now: Instant,
    ) -> Option<SyncReport> {
        None
    }
}
