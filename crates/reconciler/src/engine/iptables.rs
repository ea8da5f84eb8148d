//! kube-proxy's iptables proxier: the fallback when IPVS is missing, or `--proxy-mode=iptables`.
//!
//! The first full sync (and one after a failure) reads the kernel and writes what differs
//! while the loop waits. A periodic full sync writes the Services that differ from the mirror
//! (as a partial sync of all of them), then, unless nf_tables' generation shows nothing else
//! committed ([`Proxier::kernel_unchanged`]), starts a kernel read on another thread
//! (`iptables-save` of 10,000 Services takes seconds) and returns, so changes keep being
//! synced meanwhile; when the read is done, [`Engine::resume`] compares it with what was
//! applied and repairs what differs ([`Proxier::check`]).

use std::collections::BTreeSet;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iptables::Runner;
use iptables::proxier::{KernelChains, Proxier};

use super::Engine;
use crate::error::Error;
use crate::fallback::{
    changed_service_specs, each_service_spec, proxier_config, service_specs, service_specs_of,
};
use crate::model::ServiceName;
use crate::plan::{PlanConfig, PlanWarning, Planner};
use crate::state::ClusterState;
use crate::sync::{IptablesRules, SyncError, SyncReport};

/// Services per partial sync of a periodic full sync's first half.
const CHECK_CHUNK: usize = 1000;

/// How often the loop looks whether a periodic full sync's kernel read is done.
const READ_POLL: Duration = Duration::from_millis(10);

/// One rule set per family; a partial sync rewrites only the chains of changed Services.
#[derive(Debug)]
pub struct IptablesEngine {
    runner: Runner,
    proxiers: Vec<Proxier>,
    /// A periodic full sync's kernel read, running.
    read: Option<KernelRead>,
}

/// What a periodic full sync's read found: nf_tables' generation before and after it, and per
/// proxier (by index) what `iptables-save` had.
type Read = (
    (Option<u32>, Option<u32>),
    Vec<(usize, Result<KernelChains, iptables::Error>)>,
);

/// The kernel read of a periodic full sync, running.
#[derive(Debug)]
struct KernelRead {
    thread: JoinHandle<Read>,
    started: Instant,
    next_poll: Instant,
}

impl IptablesEngine {
    #[must_use]
    pub fn new(runner: Runner) -> Self {
        IptablesEngine {
            runner,
            proxiers: Vec::new(),
            read: None,
        }
    }

    /// A periodic full sync: the proxiers that have applied their rules get a kernel read on
    /// another thread (unless one still runs); those that have not sync in full now.
    fn start_check(&mut self, state: &ClusterState, planner: &Planner) -> SyncReport {
        if self.proxiers.len() != planner.config.families.len() {
            self.reconfigure(&planner.config);
        }
        if self.proxiers.iter().any(Proxier::needs_full) {
            return self.sync(state, planner, None);
        }
        // A full sync programs every Service (the loop drops its dirty set for it): those
        // that differ from the mirror are written now, before the kernel read begins.
        // Those gone from the state too: they are only in the mirrors.
        let mut all: BTreeSet<ServiceName> = state
            .services_any_order()
            .map(|(name, _)| name.clone())
            .collect();
        for proxier in &self.proxiers {
            all.extend(proxier.service_names().map(service_name_of));
        }
        // A chunk of Services at a time: each converts only its own Services' ports (all of
        // them at once held 7 MiB at 10,000 Services), and one that changed nothing restores
        // nothing.
        let all: Vec<ServiceName> = all.into_iter().collect();
        let mut report = SyncReport::default();
        for chunk in all.chunks(CHECK_CHUNK) {
            let chunk: BTreeSet<ServiceName> = chunk.iter().cloned().collect();
            let part = self.sync(state, planner, Some(&chunk));
            report.services += part.services;
            report.errors.extend(part.errors);
            // The rules in the tables after the last chunk; written, by all of them.
            for rules in part.iptables_rules {
                match report
                    .iptables_rules
                    .iter_mut()
                    .find(|r| (r.family, r.table) == (rules.family, rules.table))
                {
                    Some(sum) => {
                        sum.total = rules.total;
                        sum.written += rules.written;
                    }
                    None => report.iptables_rules.push(rules),
                }
            }
            if !report.errors.is_empty() || self.proxiers.iter().any(Proxier::needs_full) {
                return report;
            }
        }
        if self.read.is_none()
            && self
                .proxiers
                .iter()
                .all(|p| p.kernel_unchanged(&self.runner))
        {
            // Nothing committed since the proxy last compared or wrote: nothing to read.
            tracing::info!(
                chains_repaired = 0,
                unchanged = true,
                took_ms = 0.0,
                "full sync checked the kernel"
            );
        } else if self.read.is_none() {
            let families: Vec<(usize, iptables::Family)> = self
                .proxiers
                .iter_mut()
                .enumerate()
                .map(|(i, p)| {
                    p.watch_writes();
                    (i, p.config().family)
                })
                .collect();
            let runner = self.runner.clone();
            let thread = std::thread::Builder::new()
                .name("iptables-save".into())
                .spawn(move || {
                    crate::sync::yield_to_the_loop();
                    let before = runner.nft_generation();
                    let kernels = families
                        .into_iter()
                        .map(|(i, family)| (i, KernelChains::read(&runner, family)))
                        .collect();
                    ((before, runner.nft_generation()), kernels)
                });
            match thread {
                Ok(thread) => {
                    let started = Instant::now();
                    self.read = Some(KernelRead {
                        thread,
                        started,
                        next_poll: started + READ_POLL,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no thread for the kernel read; reading it on the loop's");
                    return self.sync(state, planner, None);
                }
            }
        }
        SyncReport {
            services: state.service_count(),
            iptables_rules: report.iptables_rules,
            ..SyncReport::default()
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
        // Converted once for all families; every Service only if a partial sync turns full. A
        // full sync converts each port as it renders it instead, once per family.
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
            let synced = if let Some(changed) = &changed {
                let changed = changed.iter().map(|(name, ports)| (name, ports));
                proxier.sync_services(&self.runner, changed, all)
            } else {
                let (endpoints, specs) = each_service_spec(state, node);
                proxier.sync_full_each(&self.runner, endpoints, specs)
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
                    let (total, last) =
                        (proxier.rule_counts().unwrap_or_default(), written.written);
                    for (table, total, written) in [
                        ("filter", total.filter, last.filter),
                        ("nat", total.nat, last.nat),
                    ] {
                        let rules = IptablesRules {
                            family,
                            table,
                            total,
                            written,
                        };
                        report.iptables_rules.push(rules);
                    }
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

/// A Service by kube-proxy's `namespace/name`, as the proxier names it.
fn service_name_of(service: &str) -> ServiceName {
    let (namespace, name) = service.split_once('/').unwrap_or(("", service));
    ServiceName::new(namespace, name)
}

impl Engine for IptablesEngine {
    fn full_sync(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        _now: Instant,
    ) -> (SyncReport, Vec<PlanWarning>) {
        (self.start_check(state, planner), Vec::new())
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

    fn resume_at(&self) -> Option<Instant> {
        self.read.as_ref().map(|r| r.next_poll)
    }

    fn resume(
        &mut self,
        state: &ClusterState,
        planner: &Planner,
        now: Instant,
    ) -> Option<SyncReport> {
        let read = self.read.take()?;
        if !read.thread.is_finished() {
            self.read = Some(KernelRead {
                next_poll: now + READ_POLL,
                ..read
            });
            return None;
        }
        let node = &*planner.config.node_name;
        let spec_of = |service: &str| service_specs_of(state, &service_name_of(service), node);
        let mut report = SyncReport {
            services: state.service_count(),
            ..SyncReport::default()
        };
        let (generations, reads) = read.thread.join().unwrap_or_else(|_| {
            tracing::error!("the kernel read panicked");
            ((None, None), Vec::new())
        });
        let mut repaired = 0;
        for (i, kernel) in reads {
            let Some(proxier) = self.proxiers.get_mut(i) else {
                continue;
            };
            let family = proxier.config().family;
            let checked =
                kernel.and_then(|kernel| proxier.check(&self.runner, kernel, generations, spec_of));
            match checked {
                Ok(checked) => {
                    repaired += checked.chains_written + checked.chains_deleted;
                    tracing::debug!(?family, ?checked, "iptables rules checked");
                }
                Err(source) => {
                    proxier.invalidate();
                    report.errors.push(SyncError::new(
                        None,
                        Error::IptablesRules { family, source },
                    ));
                }
            }
        }
        tracing::info!(
            chains_repaired = repaired,
            errors = report.errors.len(),
            took_ms = read.started.elapsed().as_secs_f64() * 1000.0,
            "full sync checked the kernel"
        );
        Some(report)
    }

    fn reconfigure(&mut self, config: &PlanConfig) {
        // A read in flight was for the old proxiers.
        self.read = None;
        self.proxiers = config
            .families
            .iter()
            .map(|&family| Proxier::new(proxier_config(config, family)))
            .collect();
    }
}
