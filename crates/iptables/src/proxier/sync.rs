//! The stateful proxier: what was last applied, and the smallest restore that moves the
//! kernel to the new state.
//!
//! A partial sync is given only the Services that changed ([`Proxier::sync_services`]); it
//! renders their ports, compares them with the mirror of what was applied (per port its rules
//! in the shared chains and the fingerprints of its own chains, and per Service its ports and
//! endpoint counts), and rewrites only the chains whose rules changed (and deletes the chains
//! they no longer use); a shared chain such as KUBE-SERVICES is touched only if a changed
//! port's fragment of it changed, and then by deleting and inserting those rules alone
//! (rewritten whole only when many changed). One endpoint changing therefore rewrites one
//! KUBE-SVC chain, writes one KUBE-SEP chain and deletes another; a Service added or removed
//! also inserts or deletes its rule in KUBE-SERVICES. Inserted rules go to the top, so the
//! kernel's order of KUBE-SERVICES may differ from `plan`'s (its rules match different
//! destinations; the jump to KUBE-NODEPORTS stays last). Full syncs are in [`super::full`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::kernel::Fingerprint;
use super::names::HashedName;
use super::render::{
    self, Rendered, SHARED_CHAINS, ServiceRules, comments_for, render, render_service,
};
use super::{ProxierConfig, ServiceSpec};
use crate::Error;
use crate::chain::is_service_chain;
use crate::rule::{Protocol, Rule};
use crate::ruleset::Ruleset;
use crate::runner::Runner;
use crate::saved::Saved;
use crate::table::Table;

pub(super) type Key = (String, Protocol);

/// Up to this many rules of a shared chain (KUBE-SERVICES, KUBE-NODEPORTS, …) change in a
/// partial sync, they are deleted and inserted one by one (`-D` by spec, `-I CHAIN 1`);
/// more, and the chain is rewritten whole. At 10,000 Services (iptables 1.8.9) rewriting
/// KUBE-SERVICES to add one Service took 1.5 s with iptables-nft; ten `-D` in it, 0.12 s.
const SHARED_EDIT_LIMIT: usize = 100;

/// The Service a service port belongs to: kube-proxy's `namespace/name` of its
/// `namespace/name:port` (neither a namespace nor a Service name can hold a `:`).
#[must_use]
pub fn service_name(port_name: &str) -> &str {
    port_name
        .split_once(':')
        .map_or(port_name, |(service, _)| service)
}

/// Rules in the proxy's own chains of the filter and nat tables, as kube-proxy counts them
/// for `sync_proxy_rules_iptables_total` and `_last` (its jumps from the built-in chains are
/// not among them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounts {
    pub filter: usize,
    pub nat: usize,
}

impl RuleCounts {
    pub(super) fn add(&mut self, table: Table, rules: usize) {
        match table {
            Table::Filter => self.filter += rules,
            Table::Nat => self.nat += rules,
            _ => {}
        }
    }

    fn plus(self, other: RuleCounts) -> RuleCounts {
        RuleCounts {
            filter: self.filter + other.filter,
            nat: self.nat + other.nat,
        }
    }

    fn minus(self, other: RuleCounts) -> RuleCounts {
        RuleCounts {
            filter: self.filter.saturating_sub(other.filter),
            nat: self.nat.saturating_sub(other.nat),
        }
    }

    /// The rules `ruleset` writes into the proxy's chains: those of the chains it writes
    /// whole, and those it inserts into the shared chains.
    pub(super) fn written(ruleset: &Ruleset) -> RuleCounts {
        let mut counts = RuleCounts::default();
        for (&table, patch) in &ruleset.tables {
            let whole: usize = patch.chains.values().map(Vec::len).sum();
            counts.add(table, whole + patch.insert_rules.len());
        }
        counts
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Whether it was a full sync.
    pub full: bool,
    /// Service ports whose rules changed (all of them on a full sync).
    pub changed_services: usize,
    /// Chains written.
    pub chains_written: usize,
    /// Chains deleted.
    pub chains_deleted: usize,
    /// Rule lines sent.
    pub rules: usize,
    /// Of those, the rules written into the proxy's chains, per table.
    pub written: RuleCounts,
    /// Bytes of `iptables-restore` input.
    pub bytes: usize,
    /// `iptables-restore` runs (more than one only for a large iptables-nft restore, see
    /// [`Ruleset::split`]).
    pub restores: usize,
    /// Table sections committed by a full sync's restores (each one kernel commit).
    pub commits: usize,
    /// Wall time of the sync, tools included.
    pub elapsed: Duration,
}

/// One service port as the mirror indexes it: its key and how many endpoints it has (all of
/// them, as kube-proxy counts for its large-cluster mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Port {
    pub(super) key: Key,
    pub(super) endpoints: usize,
}

impl Port {
    pub(super) fn of(spec: &ServiceSpec) -> Port {
        Port {
            key: spec.key(),
            endpoints: spec.backends.len(),
        }
    }
}

/// What the mirror keeps of one service port's rules: its fragments of the shared chains (a
/// few rules, which a partial sync deletes and inserts one by one) and, of its own chains,
/// only their names and fingerprints (what tells a change), not their rules: at 10,000
/// Services × 10 endpoints the rules of the own chains are most of the 320,000. Held in two
/// boxed slices (a port's ten-odd names inline), so a port costs four allocations, not
/// twenty (the mirror took 15 MiB at 10,000 Services when each name was a `Box<str>` and
/// each shared chain a `Vec`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Applied {
    /// Its rules in the shared chains with the index of their chain in [`SHARED_CHAINS`],
    /// sorted by it (in order within a chain).
    shared: Box<[(u8, Rule)]>,
    /// Its own chains, sorted by name, with their rules' [`Fingerprint::ordered`].
    pub(super) chains: Box<[(HashedName, u64)]>,
    /// Its rules, shared and own, per table.
    pub(super) rules: RuleCounts,
}

impl Applied {
    pub(super) fn of(rules: &ServiceRules) -> Applied {
        let mut counts = RuleCounts::default();
        for (i, shared) in rules.shared.iter().enumerate() {
            counts.add(SHARED_CHAINS[i].0, shared.len());
        }
        counts.add(Table::Nat, rules.chains.values().map(Vec::len).sum());
        let shared = Applied::shared_from(&rules.shared);
        let mut chains = Vec::with_capacity(rules.chains.len());
        for (name, r) in &rules.chains {
            // Every own chain is named by `names`, whose names are all HashedNames.
            let held = HashedName::parse(name);
            debug_assert!(held.is_some(), "{name} is a hashed name");
            chains.extend(held.map(|held| (held, Fingerprint::of(r).ordered)));
        }
        chains.sort_unstable_by_key(|(name, _)| *name);
        Applied {
            shared,
            chains: chains.into_boxed_slice(),
            rules: counts,
        }
    }

    /// Whether `rules` are what this port applied (what [`Applied::of`] them equals), told
    /// without a copy: a periodic full sync asks it of every port.
    pub(super) fn holds(&self, rules: &ServiceRules) -> bool {
        let shared = (rules.shared.iter().zip(0u8..))
            .flat_map(|(rules, i)| rules.iter().map(move |r| (i, r)));
        self.shared.iter().map(|(i, r)| (*i, r)).eq(shared)
            && self.chains.len() == rules.chains.len()
            && (rules.chains.iter())
                .all(|(name, r)| self.chain(name) == Some(Fingerprint::of(r).ordered))
    }

    /// Its rules in shared chain `index` of [`SHARED_CHAINS`], in order.
    pub(super) fn shared(&self, index: usize) -> impl Iterator<Item = &Rule> {
        let from = self
            .shared
            .partition_point(|(i, _)| usize::from(*i) < index);
        self.shared[from..]
            .iter()
            .take_while(move |(i, _)| usize::from(*i) == index)
            .map(|(_, r)| r)
    }

    /// A port's fragments of the shared chains only, to render those chains.
    fn shared_only(&self) -> Applied {
        Applied {
            shared: self.shared.clone(),
            ..Applied::default()
        }
    }

    /// A port's fragments of the shared chains only, from its rendered rules.
    fn shared_of(rules: &ServiceRules) -> Applied {
        Applied {
            shared: Applied::shared_from(&rules.shared),
            ..Applied::default()
        }
    }

    fn shared_from(shared: &[Vec<Rule>; SHARED_CHAINS.len()]) -> Box<[(u8, Rule)]> {
        let mut all = Vec::with_capacity(shared.iter().map(Vec::len).sum());
        for (rules, i) in shared.iter().zip(0u8..) {
            all.extend(rules.iter().map(|r| (i, r.clone())));
        }
        all.into_boxed_slice()
    }

    /// The fingerprint of its own chain `name`.
    fn chain(&self, name: &str) -> Option<u64> {
        let name = HashedName::parse(name)?;
        let i = self.chains.binary_search_by_key(&name, |(n, _)| *n).ok()?;
        Some(self.chains[i].1)
    }
}

/// What the proxier last applied: the rules of every service port, and per Service its ports
/// (a port without a ClusterIP of this family has no rules, but its endpoints count).
#[derive(Debug, Default)]
pub(super) struct Mirror {
    pub(super) ports: BTreeMap<Key, Applied>,
    /// Whether per-endpoint comments are written (off in large-cluster mode).
    pub(super) comments: bool,
    pub(super) services: HashMap<String, Vec<Port>>,
    /// The endpoints of every port, kept as Services change.
    pub(super) endpoints: usize,
    /// The rules of every port ([`Applied::rules`]), kept as ports change.
    pub(super) port_rules: RuleCounts,
}

impl Mirror {
    /// Counts [`Mirror::port_rules`] afresh, once its ports are all in.
    pub(super) fn count_rules(&mut self) {
        self.port_rules =
            (self.ports.values()).fold(RuleCounts::default(), |sum, a| sum.plus(a.rules));
    }

    /// Shared chain `index` of [`SHARED_CHAINS`] as the mirror's ports give it, with what the
    /// config adds (the jump to KUBE-NODEPORTS).
    pub(super) fn shared_chain(&self, config: &ProxierConfig, index: usize) -> Vec<Rule> {
        let tail = render::shared_tail(config, index);
        self.shared_rules(index, &tail).cloned().collect()
    }

    /// The rules of shared chain `index` without a copy: the ports' fragments, then `tail`
    /// ([`render::shared_tail`]).
    pub(super) fn shared_rules<'a>(
        &'a self,
        index: usize,
        tail: &'a [Rule],
    ) -> impl Iterator<Item = &'a Rule> {
        (self.ports.values().flat_map(move |a| a.shared(index))).chain(tail)
    }
}

/// The chains written since a kernel read began ([`Proxier::watch_writes`]): what that read
/// saw of them is out of date.
#[derive(Debug, Default)]
pub(super) struct Written {
    /// The per-Service chains.
    own: HashSet<(Table, HashedName)>,
    /// The others.
    chains: HashSet<(Table, Box<str>)>,
}

impl Written {
    pub(super) fn contains(&self, table: Table, name: &str) -> bool {
        match HashedName::parse(name) {
            Some(own) => self.contains_own(table, own),
            None => self.chains.contains(&(table, name.into())),
        }
    }

    pub(super) fn contains_own(&self, table: Table, name: HashedName) -> bool {
        self.own.contains(&(table, name))
    }

    fn record(&mut self, ruleset: &Ruleset) {
        for (&table, patch) in &ruleset.tables {
            let edited = patch.delete_rules.iter().chain(&patch.insert_rules);
            let names = patch
                .chains
                .keys()
                .map(String::as_str)
                .chain(patch.delete.iter().map(String::as_str))
                .chain(edited.map(|r| r.chain.as_str()));
            for name in names {
                match HashedName::parse(name) {
                    Some(own) => self.own.insert((table, own)),
                    None => self.chains.insert((table, name.into())),
                };
            }
        }
    }
}

/// A computed sync, not yet applied.
#[derive(Debug)]
pub struct SyncPlan {
    /// The restore to run.
    pub ruleset: Ruleset,
    change: Change,
    changed: usize,
}

#[derive(Debug)]
enum Change {
    /// A full sync: the new mirror.
    Full(Mirror),
    /// A partial sync: the changed ports' rules (`None`: gone), the changed Services' ports
    /// (empty: gone) and the new endpoint count.
    Partial {
        updates: Vec<(Key, Option<Applied>)>,
        services: Vec<(String, Vec<Port>)>,
        endpoints: usize,
    },
}

impl SyncPlan {
    /// Whether this is a full sync.
    #[must_use]
    pub fn is_full(&self) -> bool {
        matches!(self.change, Change::Full(_))
    }
}

/// kube-proxy's iptables mode for one family, incremental.
#[derive(Debug)]
pub struct Proxier {
    pub(super) config: ProxierConfig,
    pub(super) applied: Option<Mirror>,
    /// While a kernel read for [`Proxier::check`] is in flight: what was written since.
    pub(super) written: Option<Written>,
    /// The nf_tables generation after this proxier last compared its chains with the kernel or
    /// wrote them, while nothing else has committed since (see [`crate::generation`]);
    /// `None` when unknown (iptables-legacy, another writer, a restore in parts).
    pub(super) generation: Option<u32>,
}

impl Proxier {
    /// A proxier that has applied nothing yet (its first sync is full).
    #[must_use]
    pub fn new(config: ProxierConfig) -> Proxier {
        Proxier {
            config,
            applied: None,
            written: None,
            generation: None,
        }
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &ProxierConfig {
        &self.config
    }

    /// Forgets what was applied, so the next sync is full.
    pub fn invalidate(&mut self) {
        self.applied = None;
        self.written = None;
        self.generation = None;
    }

    /// Whether the kernel's ruleset is provably what this proxier last compared or wrote:
    /// nf_tables' generation has not moved since ([`Runner::nft_generation`]). A periodic
    /// full sync then has nothing to read.
    #[must_use]
    pub fn kernel_unchanged(&self, runner: &Runner) -> bool {
        self.applied.is_some()
            && self.generation.is_some()
            && self.generation == runner.nft_generation()
    }

    /// Keeps [`Proxier::generation`] across a write of `commits` commits (`None`: not known)
    /// that began at generation `before`: only if nothing else committed before or during it.
    pub(super) fn track_generation(
        &mut self,
        runner: &Runner,
        before: Option<u32>,
        commits: Option<usize>,
    ) {
        let after = runner.nft_generation();
        self.generation = match (self.generation, before, commits, after) {
            (Some(known), Some(b), Some(n), Some(a))
                if known == b && u32::try_from(n).is_ok_and(|n| a == b.wrapping_add(n)) =>
            {
                Some(a)
            }
            _ => None,
        };
    }

    /// The Services (kube-proxy's `namespace/name`) whose ports were last applied.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.applied
            .iter()
            .flat_map(|m| m.services.keys().map(String::as_str))
    }

    /// Starts recording the chains each sync writes, for a [`Proxier::check`] against a
    /// kernel read that begins now (on another thread: [`super::KernelChains::read`]).
    pub fn watch_writes(&mut self) {
        self.written = Some(Written::default());
    }

    /// Whether nothing is applied (at first, and after a failure): the next sync is full.
    #[must_use]
    pub fn needs_full(&self) -> bool {
        self.applied.is_none()
    }

    /// The rules in the proxy's chains as last applied (kube-proxy's
    /// `sync_proxy_rules_iptables_total`): the base chains', and the shared and own chains'
    /// of every port; `None` when nothing is applied. Costs the base chains' rendering, not
    /// the ports'.
    #[must_use]
    pub fn rule_counts(&self) -> Option<RuleCounts> {
        let mirror = self.applied.as_ref()?;
        let mut counts = mirror.port_rules;
        for (table, _, rules) in Rendered::base_chains(&self.config) {
            counts.add(table, rules.len());
        }
        // What the config adds to the shared chains (the jumps to KUBE-NODEPORTS).
        let bare = Rendered {
            services: BTreeMap::new(),
            comments: mirror.comments,
        };
        for (i, &(table, _)) in SHARED_CHAINS.iter().enumerate() {
            counts.add(table, bare.shared_chain(&self.config, i).len());
        }
        Some(counts)
    }

    /// Computes a full sync of every service port, `specs`, against `saved` (the current
    /// `iptables-save` of this family), held whole: what `plan` and the floors of the
    /// benchmarks restore. The daemon's full syncs stream instead ([`Proxier::sync_full`]).
    #[must_use]
    pub fn plan_full(&self, specs: &[ServiceSpec], saved: &Saved) -> SyncPlan {
        let rendered = render(&self.config, specs);
        let mut ruleset = rendered.full_ruleset(&self.config);
        for table in [Table::Nat, Table::Filter] {
            let stale: Vec<String> = saved
                .proxy_chains(table)
                .filter(|c| is_service_chain(c))
                .filter(|c| {
                    !ruleset
                        .tables
                        .get(&table)
                        .is_some_and(|p| p.chains.contains_key(*c))
                })
                .map(str::to_owned)
                .collect();
            ruleset.table(table).delete.extend(stale);
        }
        for table in [Table::Filter, Table::Nat] {
            let jumps: Vec<_> = Rendered::builtin_jumps(&self.config)
                .into_iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, r)| r)
                .collect();
            saved.add_missing_jumps(table, &jumps, &mut ruleset);
        }
        let mut mirror = Mirror {
            comments: rendered.comments,
            endpoints: specs.iter().map(|s| s.backends.len()).sum(),
            ..Mirror::default()
        };
        for s in specs {
            mirror
                .services
                .entry(service_name(&s.name).to_owned())
                .or_default()
                .push(Port::of(s));
        }
        mirror.ports = rendered
            .services
            .iter()
            .map(|(k, r)| (k.clone(), Applied::of(r)))
            .collect();
        SyncPlan {
            ruleset,
            changed: rendered.services.len(),
            change: Change::Full(mirror),
        }
    }

    /// Computes a partial sync of the `changed` Services only: each as kube-proxy's
    /// `namespace/name` and all its ports (none: the Service is gone). A Service listed but
    /// unchanged costs its rendering and adds nothing to the restore. `None` when a full sync
    /// is needed instead: nothing is applied yet, or the change moves the endpoint count
    /// across [`ProxierConfig::large_cluster_endpoints`] (every rule's comments change).
    #[must_use]
    pub fn plan_services<N, S>(&self, changed: impl IntoIterator<Item = (N, S)>) -> Option<SyncPlan>
    where
        N: AsRef<str>,
        S: AsRef<[ServiceSpec]>,
    {
        let mirror = self.applied.as_ref()?;
        // The last listing of a Service wins.
        let changed: BTreeMap<String, S> = changed
            .into_iter()
            .map(|(n, s)| (n.as_ref().to_owned(), s))
            .collect();
        let mut endpoints = mirror.endpoints;
        for (name, specs) in &changed {
            let old: usize = mirror
                .services
                .get(name)
                .map_or(0, |ports| ports.iter().map(|p| p.endpoints).sum());
            let new: usize = specs.as_ref().iter().map(|s| s.backends.len()).sum();
            endpoints = (endpoints - old) + new;
        }
        let comments = mirror.comments;
        if comments_for(&self.config, endpoints) != comments {
            return None;
        }

        let mut updates: Vec<(Key, Option<ServiceRules>)> = Vec::new();
        let mut services = Vec::with_capacity(changed.len());
        for (name, specs) in changed {
            let specs = specs.as_ref();
            let ports: Vec<Port> = specs
                .iter()
                .inspect(|s| debug_assert_eq!(service_name(&s.name), name, "a port of {name}"))
                .map(Port::of)
                .collect();
            for s in specs {
                let rules = render_service(&self.config, s, comments);
                let key = s.key();
                let same = match (mirror.ports.get(&key), &rules) {
                    (Some(applied), Some(rules)) => applied.holds(rules),
                    (applied, rules) => applied.is_none() && rules.is_none(),
                };
                if !same {
                    updates.push((key, rules));
                }
            }
            for old in mirror.services.get(&name).into_iter().flatten() {
                if mirror.ports.contains_key(&old.key) && !ports.iter().any(|p| p.key == old.key) {
                    updates.push((old.key.clone(), None));
                }
            }
            services.push((name, ports));
        }
        // Shared rules are inserted in this order: the ports' (name, protocol) order, as when
        // every spec was compared, whatever order the Services came in.
        updates.sort_by(|(a, rules_a), (b, rules_b)| {
            (rules_a.is_none(), a).cmp(&(rules_b.is_none(), b))
        });

        let ruleset = self.partial_ruleset(mirror, &updates);
        let updates = updates
            .into_iter()
            .map(|(k, r)| (k, r.as_ref().map(Applied::of)))
            .collect::<Vec<_>>();
        Some(SyncPlan {
            ruleset,
            changed: updates.len(),
            change: Change::Partial {
                updates,
                services,
                endpoints,
            },
        })
    }

    /// The restore that moves `applied` to `applied` with `updates` laid over it: the
    /// updated ports' own chains, and the shared chains edited rule by rule (rewritten whole
    /// above [`SHARED_EDIT_LIMIT`] edits).
    fn partial_ruleset(
        &self,
        applied: &Mirror,
        updates: &[(Key, Option<ServiceRules>)],
    ) -> Ruleset {
        let mut ruleset = Ruleset::default();
        let none = Applied::default();
        let empty = ServiceRules::default();
        // Per shared chain: how many more of each rule the updated ports have than they had.
        let mut shared_diff: [HashMap<&Rule, isize>; SHARED_CHAINS.len()] = Default::default();
        for (key, new) in updates {
            let old = applied.ports.get(key).unwrap_or(&none);
            let new = new.as_ref().unwrap_or(&empty);
            for (i, diff) in shared_diff.iter_mut().enumerate() {
                if !old.shared(i).eq(&new.shared[i]) {
                    for r in old.shared(i) {
                        *diff.entry(r).or_default() -= 1;
                    }
                    for r in &new.shared[i] {
                        *diff.entry(r).or_default() += 1;
                    }
                }
            }
            let nat = ruleset.table(Table::Nat);
            for (name, rules) in &new.chains {
                if old.chain(name) != Some(Fingerprint::of(rules).ordered) {
                    nat.chains.insert(name.clone(), rules.clone());
                }
            }
            for (name, _) in &old.chains {
                let name = name.to_string();
                if !new.chains.contains_key(&name) {
                    nat.delete.push(name);
                }
            }
        }
        let mut rebuild = [false; SHARED_CHAINS.len()];
        for (i, diff) in shared_diff.iter_mut().enumerate() {
            diff.retain(|_, n| *n != 0);
            let edits: usize = diff.values().map(|n| n.unsigned_abs()).sum();
            if edits > SHARED_EDIT_LIMIT {
                rebuild[i] = true;
            } else if edits > 0 {
                let (deletes, inserts) = shared_edits(updates, applied, &none, i, diff);
                let patch = ruleset.table(SHARED_CHAINS[i].0);
                patch.delete_rules.extend(deletes);
                patch.insert_rules.extend(inserts);
            }
        }
        if rebuild.iter().any(|c| *c) {
            // Rebuild the changed shared chains from the mirror with the updates laid over it.
            let mut merged = Mirror {
                comments: applied.comments,
                ..Mirror::default()
            };
            let overrides: BTreeMap<&Key, Option<&ServiceRules>> =
                updates.iter().map(|(k, v)| (k, v.as_ref())).collect();
            merged.ports = applied
                .ports
                .iter()
                .filter(|(k, _)| !overrides.contains_key(k))
                .map(|(k, a)| (k.clone(), a.shared_only()))
                .chain(
                    overrides
                        .iter()
                        .filter_map(|(k, v)| v.map(|v| ((*k).clone(), Applied::shared_of(v)))),
                )
                .collect();
            for (i, _) in rebuild.iter().enumerate().filter(|(_, r)| **r) {
                let (table, name) = SHARED_CHAINS[i];
                let rules = merged.shared_chain(&self.config, i);
                ruleset.table(table).chains.insert(name.to_owned(), rules);
            }
        }
        ruleset
    }

    /// Records `plan` as applied (without running it; [`Proxier::apply`] runs it).
    pub fn commit(&mut self, plan: SyncPlan) {
        match plan.change {
            Change::Full(mut mirror) => {
                mirror.count_rules();
                self.applied = Some(mirror);
            }
            Change::Partial {
                updates,
                services,
                endpoints,
            } => {
                let Some(mirror) = &mut self.applied else {
                    return;
                };
                for (key, rules) in updates {
                    let old = match rules {
                        Some(r) => {
                            mirror.port_rules = mirror.port_rules.plus(r.rules);
                            mirror.ports.insert(key, r)
                        }
                        None => mirror.ports.remove(&key),
                    };
                    if let Some(old) = old {
                        mirror.port_rules = mirror.port_rules.minus(old.rules);
                    }
                }
                for (name, ports) in services {
                    if ports.is_empty() {
                        mirror.services.remove(&name);
                    } else {
                        mirror.services.insert(name, ports);
                    }
                }
                mirror.endpoints = endpoints;
            }
        }
    }

    /// Runs `plan` through `runner` (one `iptables-restore`, a large one split into several
    /// with iptables-nft, see [`Ruleset::split`]; nothing when it is empty) and records it as
    /// applied. On failure nothing is recorded and the next sync is full.
    pub fn apply(&mut self, runner: &Runner, mut plan: SyncPlan) -> Result<SyncStats, Error> {
        let start = Instant::now();
        let rs = std::mem::take(&mut plan.ruleset);
        let mut stats = SyncStats {
            full: plan.is_full(),
            changed_services: plan.changed,
            chains_written: rs.tables.values().map(|t| t.chains.len()).sum(),
            chains_deleted: rs.tables.values().map(|t| t.delete.len()).sum(),
            rules: rs.rule_count(),
            written: RuleCounts::written(&rs),
            ..SyncStats::default()
        };
        if !rs.is_empty() {
            rs.check_ownership()?;
            if let Some(written) = &mut self.written {
                written.record(&rs);
            }
            let before = runner.nft_generation();
            let sections = rs.tables.values().filter(|t| !t.is_empty()).count();
            match runner.apply_owned(self.config.family, rs) {
                Ok((bytes, restores)) => {
                    stats.bytes = bytes;
                    stats.restores = restores;
                    // One commit per table of one restore; parts are not counted.
                    let commits = (restores == 1).then_some(sections);
                    self.track_generation(runner, before, commits);
                }
                Err(e) => {
                    self.invalidate();
                    return Err(e);
                }
            }
        }
        self.commit(plan);
        stats.elapsed = start.elapsed();
        tracing::debug!(?stats, "iptables proxier synced");
        Ok(stats)
    }

    /// Syncs the `changed` Services only (see [`Proxier::plan_services`]): their chains, and
    /// their rules in the shared chains. When a full sync is needed instead (nothing applied
    /// yet or after a failure, or the comments mode flips), runs [`Proxier::sync_full`] with
    /// `all`, which is called only then and gives every service port.
    pub fn sync_services<'a, N, S>(
        &mut self,
        runner: &Runner,
        changed: impl IntoIterator<Item = (N, S)>,
        all: impl FnOnce() -> &'a [ServiceSpec],
    ) -> Result<SyncStats, Error>
    where
        N: AsRef<str>,
        S: AsRef<[ServiceSpec]>,
    {
        match self.plan_services(changed) {
            Some(plan) => self.apply(runner, plan),
            None => self.sync_full(runner, all()),
        }
    }
}

/// The rules of shared chain `index` to delete and to insert, in the updates' order, from
/// `diff` (how many more of each rule the updated ports have than they had). The inserts are
/// reversed: each goes to the top of the chain, so they end up in the order they are listed.
fn shared_edits(
    updates: &[(Key, Option<ServiceRules>)],
    applied: &Mirror,
    none: &Applied,
    index: usize,
    diff: &mut HashMap<&Rule, isize>,
) -> (Vec<Rule>, Vec<Rule>) {
    let mut deletes = Vec::new();
    let mut inserts = Vec::new();
    for (key, new) in updates {
        let old = applied.ports.get(key).unwrap_or(none);
        for r in old.shared(index) {
            if let Some(n) = diff.get_mut(r).filter(|n| **n < 0) {
                *n += 1;
                deletes.push(r.clone());
            }
        }
        for r in new.iter().flat_map(|n| &n.shared[index]) {
            if let Some(n) = diff.get_mut(r).filter(|n| **n > 0) {
                *n -= 1;
                inserts.push(r.clone());
            }
        }
    }
    inserts.reverse();
    (deletes, inserts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxier::Backend;

    fn specs(n: u8, last_backend: u8) -> Vec<ServiceSpec> {
        (0..n)
            .map(|i| {
                let mut s = ServiceSpec::cluster_ip(
                    format!("ns/s{i}:p"),
                    Protocol::Tcp,
                    format!("10.96.0.{i}").parse().unwrap(),
                    80,
                );
                for b in [1, 2, if i == 0 { last_backend } else { 3 }] {
                    s.backends.push(Backend::ready(
                        format!("10.244.{i}.{b}:80").parse().unwrap(),
                        false,
                    ));
                }
                s
            })
            .collect()
    }

    /// Service `ns/s{i}` as a change: its one port of `specs(.., last_backend)`, or none.
    fn service(i: u8, last_backend: u8, present: bool) -> (String, Vec<ServiceSpec>) {
        let ports = if present {
            vec![specs(i + 1, last_backend).swap_remove(usize::from(i))]
        } else {
            Vec::new()
        };
        (format!("ns/s{i}"), ports)
    }

    /// A proxier after a full sync of `specs(services, last_backend)`.
    fn synced(services: u8, last_backend: u8) -> Proxier {
        synced_with(ProxierConfig::default(), &specs(services, last_backend))
    }

    fn synced_with(config: ProxierConfig, specs: &[ServiceSpec]) -> Proxier {
        let mut p = Proxier::new(config);
        let plan = p.plan_full(specs, &Saved::default());
        p.commit(plan);
        p
    }

    /// Plans a partial sync of `changed` (which must not need a full one) and commits it.
    fn partial(p: &mut Proxier, changed: Vec<(String, Vec<ServiceSpec>)>) -> Ruleset {
        let mut plan = p.plan_services(changed).expect("a partial sync");
        let ruleset = std::mem::take(&mut plan.ruleset);
        p.commit(plan);
        ruleset
    }

    #[test]
    fn rule_counts_are_the_rules_of_the_proxys_chains_and_written_those_restored() {
        let config = ProxierConfig {
            node_port_addresses: Some(vec!["192.168.0.1".parse().unwrap()]),
            ..ProxierConfig::default()
        };
        let mut p = Proxier::new(config.clone());
        assert_eq!(p.rule_counts(), None);
        let plan = p.plan_full(&specs(3, 3), &Saved::default());
        let rules = |rs: &Ruleset, t| {
            rs.tables
                .get(&t)
                .map_or(0, |p| p.chains.values().map(Vec::len).sum())
        };
        let (filter, nat) = (
            rules(&plan.ruleset, Table::Filter),
            rules(&plan.ruleset, Table::Nat),
        );
        p.commit(plan);
        assert_eq!(p.rule_counts(), Some(RuleCounts { filter, nat }));
        assert!(nat > 3 * 5 && filter > 0, "{nat} {filter}");
        // A Service more, synced alone: its own chains written and its rule inserted into
        // KUBE-SERVICES, all of them new rules; then the counts a full sync of all four gives.
        let plan = p.plan_services([service(3, 3, true)]).unwrap();
        let written = RuleCounts::written(&plan.ruleset);
        let inserted = plan.ruleset.tables[&Table::Nat].insert_rules.len();
        assert_eq!(inserted, 1);
        assert_eq!(written.nat, rules(&plan.ruleset, Table::Nat) + inserted);
        p.commit(plan);
        let counts = p.rule_counts().unwrap();
        assert_eq!(counts.nat, nat + written.nat);
        assert_eq!(
            Some(counts),
            synced_with(config, &specs(4, 3)).rule_counts()
        );
    }

    #[test]
    fn one_endpoint_change_rewrites_one_service_chain_only() {
        let mut p = synced(5, 3);
        let plan = p.plan_services([service(0, 4, true)]).unwrap();
        assert!(!plan.is_full());
        let nat = &plan.ruleset.tables[&Table::Nat];
        let written: Vec<&str> = nat.chains.keys().map(String::as_str).collect();
        assert_eq!(
            written.len(),
            2,
            "the SVC chain and the new SEP chain: {written:?}"
        );
        assert!(written.iter().any(|c| c.starts_with("KUBE-SVC-")));
        assert_eq!(nat.delete.len(), 1);
        assert!(!plan.ruleset.tables.contains_key(&Table::Filter));
        p.commit(plan);
        assert!(
            p.plan_services([service(0, 4, true)])
                .unwrap()
                .ruleset
                .is_empty(),
            "no change, no restore"
        );
    }

    #[test]
    fn unchanged_services_listed_as_changed_restore_nothing() {
        let p = synced(5, 3);
        let all: Vec<_> = (0..5).map(|i| service(i, 3, true)).collect();
        let plan = p.plan_services(all).unwrap();
        assert!(plan.ruleset.is_empty(), "{}", plan.ruleset.render());
        assert_eq!(plan.changed, 0);
    }

    #[test]
    fn removed_service_deletes_its_rule_and_chains_without_rewriting_kube_services() {
        let mut p = synced(3, 3);
        let plan = p.plan_services([service(2, 3, false)]).unwrap();
        let nat = &plan.ruleset.tables[&Table::Nat];
        assert!(nat.chains.is_empty(), "{:?}", nat.chains.keys());
        assert_eq!(nat.delete.len(), 4, "SVC and three SEP chains");
        assert_eq!(nat.delete_rules.len(), 1);
        assert_eq!(nat.delete_rules[0].chain, "KUBE-SERVICES");
        assert!(nat.insert_rules.is_empty());
        let text = plan.ruleset.render();
        let rule_gone = text.find("-D KUBE-SERVICES").unwrap();
        assert!(rule_gone < text.find("-X KUBE-SVC-").unwrap(), "{text}");
        p.commit(plan);
        assert!(!p.applied.as_ref().unwrap().services.contains_key("ns/s2"));
        assert!(
            p.plan_services([service(2, 3, false)])
                .unwrap()
                .ruleset
                .is_empty()
        );
    }

    #[test]
    fn added_service_inserts_its_rule_above_the_nodeports_jump() {
        let p = synced(2, 3);
        let plan = p.plan_services([service(2, 3, true)]).unwrap();
        let nat = &plan.ruleset.tables[&Table::Nat];
        assert_eq!(nat.chains.len(), 4, "SVC and three SEP chains");
        assert_eq!(nat.insert_rules.len(), 1);
        let text = plan.ruleset.render();
        assert!(
            text.contains("\n-I KUBE-SERVICES 1 -d 10.96.0.2/32 -p tcp"),
            "{text}"
        );
        assert!(text.find("\n-A KUBE-SVC-").unwrap() < text.find("\n-I KUBE-SERVICES 1").unwrap());
    }

    #[test]
    fn services_added_together_are_inserted_in_port_order_as_a_full_sync_lists_them() {
        let p = synced(1, 3);
        // By port name ns/a-b:p sorts first; by Service name ns/a does.
        let port = |name: &str, ip: &str| {
            let mut s = ServiceSpec::cluster_ip(name, Protocol::Tcp, ip.parse().unwrap(), 80);
            s.backends
                .push(Backend::ready("10.244.9.9:80".parse().unwrap(), false));
            (service_name(name).to_owned(), vec![s])
        };
        let plan = p
            .plan_services([port("ns/a:p", "10.96.1.1"), port("ns/a-b:p", "10.96.1.2")])
            .unwrap();
        let text = plan.ruleset.render();
        // Each goes to the top, so the last inserted ends up first: ns/a-b above ns/a.
        let at = |ip: &str| {
            text.find(&format!("-I KUBE-SERVICES 1 -d {ip}/32"))
                .unwrap()
        };
        assert!(at("10.96.1.1") < at("10.96.1.2"), "{text}");
    }

    #[test]
    fn many_shared_rule_changes_rewrite_the_chain() {
        let p = synced(1, 3);
        let many = u8::try_from(SHARED_EDIT_LIMIT + 2).unwrap();
        let plan = p
            .plan_services((1..many).map(|i| service(i, 3, true)))
            .unwrap();
        let nat = &plan.ruleset.tables[&Table::Nat];
        assert!(nat.insert_rules.is_empty());
        assert_eq!(
            nat.chains["KUBE-SERVICES"].len(),
            usize::from(many) + 1,
            "every service and the nodeports jump"
        );
    }

    #[test]
    fn nothing_applied_needs_a_full_sync() {
        let p = Proxier::new(ProxierConfig::default());
        assert!(p.needs_full());
        assert!(p.plan_services([service(0, 3, true)]).is_none());
    }

    #[test]
    fn crossing_the_large_cluster_size_needs_a_full_sync() {
        // Five Services of three endpoints: 15, at the limit, with comments.
        let config = ProxierConfig {
            large_cluster_endpoints: 15,
            ..ProxierConfig::default()
        };
        let mut p = synced_with(config.clone(), &specs(5, 3));
        assert!(p.applied.as_ref().unwrap().comments);
        assert!(
            p.plan_services([service(5, 3, true)]).is_none(),
            "18 endpoints: every comment goes"
        );
        // Below the limit again (12, then 15), partial syncs.
        partial(&mut p, vec![service(4, 3, false)]);
        assert_eq!(p.applied.as_ref().unwrap().endpoints, 12);
        partial(&mut p, vec![service(4, 3, true)]);
        // A port of another family has no rules but its endpoints count, as kube-proxy's.
        let mut v6 =
            ServiceSpec::cluster_ip("ns/v6:p", Protocol::Tcp, "fd00::1".parse().unwrap(), 80);
        v6.backends
            .push(Backend::ready("[fd00::2]:80".parse().unwrap(), false));
        let plan = p.plan_services([("ns/v6", vec![v6])]);
        assert!(plan.is_none(), "16 endpoints");

        // The other way: a full sync without comments, then back under the limit.
        let mut p = synced_with(config, &specs(6, 3));
        assert!(!p.applied.as_ref().unwrap().comments);
        assert!(p.plan_services([service(5, 3, false)]).is_none());
        let mut unchanged = p.plan_services([service(5, 3, true)]).unwrap();
        assert!(std::mem::take(&mut unchanged.ruleset).is_empty());
        p.commit(unchanged);
        assert_eq!(p.applied.as_ref().unwrap().endpoints, 18);
    }

    #[test]
    fn partial_syncs_leave_the_mirror_a_full_render_gives() {
        let mut p = synced(4, 3);
        // Service 1 gets a second port, 0 an endpoint, 3 goes, 4 and 5 come.
        let mut second = specs(2, 3).swap_remove(1);
        second.name = "ns/s1:q".into();
        second.port = 81;
        let s1 = ("ns/s1".to_owned(), vec![specs(2, 3).swap_remove(1), second]);
        partial(&mut p, vec![s1.clone(), service(0, 7, true)]);
        partial(&mut p, vec![service(3, 3, false), service(4, 3, true)]);
        partial(&mut p, vec![service(5, 3, true), service(4, 3, true)]);
        let mut all = specs(6, 7);
        all.remove(3);
        all.extend(s1.1.iter().skip(1).cloned());
        let full = synced_with(ProxierConfig::default(), &all);
        assert_eq!(p.rule_counts(), full.rule_counts());
        let (ours, want) = (p.applied.unwrap(), full.applied.unwrap());
        assert_eq!(ours.ports, want.ports);
        assert_eq!(ours.comments, want.comments);
        assert_eq!(ours.endpoints, want.endpoints);
        assert_eq!(ours.services.len(), want.services.len());
        for (name, ports) in &want.services {
            let mut ports = ports.clone();
            ports.sort_by(|a, b| a.key.cmp(&b.key));
            assert_eq!(ours.services[name], ports, "{name}");
        }
    }

    #[test]
    fn a_port_holds_the_rules_it_applied_and_no_others() {
        let config = ProxierConfig::default();
        let all = specs(3, 3);
        let rendered: Vec<ServiceRules> = all
            .iter()
            .map(|s| render_service(&config, s, true).unwrap())
            .collect();
        let mut moved = all[0].clone();
        moved.backends[2].addr.set_port(81);
        let moved = render_service(&config, &moved, true).unwrap();
        let applied = Applied::of(&rendered[0]);
        assert!(applied.holds(&rendered[0]));
        assert!(!applied.holds(&rendered[1]), "another port's");
        assert!(!applied.holds(&moved), "an endpoint moved");
        assert_eq!(applied == Applied::of(&moved), applied.holds(&moved));
    }

    #[test]
    fn service_name_is_the_port_name_before_its_port() {
        assert_eq!(service_name("ns/web:http"), "ns/web");
        assert_eq!(service_name("ns/web"), "ns/web");
    }
}
