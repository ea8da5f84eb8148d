//! Full syncs: every chain compared with the kernel, and only those that differ written.
//!
//! [`Proxier::sync_full`] (the first sync, and after a failure) reads the kernel
//! ([`KernelChains`]: a fingerprint per chain), renders every port one at a time and streams
//! the chains whose fingerprint differs into `iptables-restore` as it goes: a restart over
//! the same rules writes nothing, and the rules are never all in memory. Stale per-Service
//! chains are deleted, missing jumps from the built-in chains inserted.
//!
//! [`Proxier::check`] (the periodic full sync's second half) compares the mirror's
//! fingerprints with a kernel read taken off the sync thread, skipping the chains written
//! since that read began ([`Proxier::watch_writes`]), and repairs only what differs: the
//! drifted ports' chains, re-rendered (nothing else is); shared chains that lost or gained
//! rules; stale chains; missing jumps. Its cost is the read (by another thread and
//! `iptables-save`) and a lookup per chain.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::time::Instant;

use super::kernel::{Fingerprint, KernelChains};
use super::names::HashedName;
use super::render::{Rendered, SHARED_CHAINS, comments_for, render_service, shared_tail};
use super::sync::{Applied, Key, Mirror, Port, RuleCounts, Written, service_name};
use super::{ServiceSpec, SyncStats};
use crate::Error;
use crate::chain::may_write_chain;
use crate::rule::Rule;
use crate::ruleset::{Ruleset, dependency_order};
use crate::runner::{Flavour, NFT_RESTORE_LINES, RestoreStream, Runner};
use crate::table::{Family, Table};

use super::Proxier;

impl Proxier {
    /// Syncs the kernel to every service port, `specs`: reads `iptables-save` of this family,
    /// writes every chain that differs from what the kernel has, deletes stale per-Service
    /// chains and restores missing jumps from the built-in chains. On failure the next sync
    /// is full.
    pub fn sync_full(
        &mut self,
        runner: &Runner,
        specs: &[ServiceSpec],
    ) -> Result<SyncStats, Error> {
        let endpoints = specs.iter().map(|s| s.backends.len()).sum();
        self.sync_full_each(runner, endpoints, specs)
    }

    /// [`Proxier::sync_full`] over service ports made one at a time as it renders them (the
    /// daemon converts each from its model here, so they are never all in memory at once),
    /// with `endpoints` (the sum of their backends) known before: it decides whether rules
    /// carry comments (kube-proxy's large-cluster mode).
    pub fn sync_full_each(
        &mut self,
        runner: &Runner,
        endpoints: usize,
        specs: impl IntoIterator<Item = impl Borrow<ServiceSpec>>,
    ) -> Result<SyncStats, Error> {
        let start = Instant::now();
        let before = runner.nft_generation();
        let result = KernelChains::read(runner, self.config.family)
            .and_then(|kernel| self.stream_full(runner, endpoints, specs, kernel));
        match result {
            Ok(mut stats) => {
                // Known if the read saw generation `before` and only this sync's commits followed.
                self.generation = before;
                self.track_generation(runner, before, Some(stats.commits));
                stats.elapsed = start.elapsed();
                tracing::debug!(?stats, "iptables proxier synced in full");
                Ok(stats)
            }
            Err(e) => {
                self.invalidate();
                Err(e)
            }
        }
    }

    fn stream_full(
        &mut self,
        runner: &Runner,
        endpoints: usize,
        specs: impl IntoIterator<Item = impl Borrow<ServiceSpec>>,
        mut kernel: KernelChains,
    ) -> Result<SyncStats, Error> {
        let kernel = &mut kernel;
        let config = &self.config;
        let mut mirror = Mirror {
            comments: comments_for(config, endpoints),
            endpoints,
            ..Mirror::default()
        };
        let mut out = Stream::new(runner, config.family);
        let base = Rendered::base_chains(config);
        for (table, name, rules) in base.iter().filter(|(t, ..)| *t == Table::Nat) {
            out.chain_if_differs(kernel, *table, name, rules, false)?;
        }
        let mut backends = 0;
        for spec in specs {
            let spec = spec.borrow();
            backends += spec.backends.len();
            mirror
                .services
                .entry(service_name(&spec.name).to_owned())
                .or_default()
                .push(Port::of(spec));
            let Some(rules) = render_service(config, spec, mirror.comments) else {
                continue;
            };
            let lines: usize = rules.chains.values().map(|r| r.len() + 1).sum();
            out.room(lines)?;
            // Each chain after the chains it jumps to (KUBE-SEP before KUBE-SVC).
            for name in dependency_order(&rules.chains) {
                out.chain_if_differs(kernel, Table::Nat, &name, &rules.chains[&name], false)?;
            }
            mirror.ports.insert(spec.key(), Applied::of(&rules));
            out.stats.changed_services += 1;
        }
        debug_assert_eq!(backends, endpoints, "the endpoints given are the specs'");
        // A Vec's first push makes room for four ports; most Services have one (1.2 MiB).
        mirror.services.values_mut().for_each(Vec::shrink_to_fit);
        for table in [Table::Nat, Table::Filter] {
            if table == Table::Filter {
                for (t, name, rules) in base.iter().filter(|(t, ..)| *t == table) {
                    out.chain_if_differs(kernel, *t, name, rules, false)?;
                }
            }
            // KUBE-NODEPORTS before the KUBE-SERVICES that jumps to it.
            for (i, &(t, name)) in SHARED_CHAINS.iter().enumerate().rev() {
                if t != table {
                    continue;
                }
                // Sent from the mirror: a copy of every port's rules is 4 MiB at 10,000.
                let tail = shared_tail(config, i);
                let want = Fingerprint::of(mirror.shared_rules(i, &tail));
                if !held(kernel, table, name, &want, true)? {
                    out.room(mirror.shared_rules(i, &tail).count() + 1)?;
                    out.chain(table, name, mirror.shared_rules(i, &tail))?;
                }
            }
            out.missing_jumps(kernel, config, table)?;
            // Every chain the ports use was kept as it was compared.
            out.delete(table, &kernel.stale(table))?;
        }
        let stats = out.finish()?;
        mirror.count_rules();
        self.applied = Some(mirror);
        self.written = None;
        Ok(stats)
    }

    /// The periodic full sync's second half: compares what was applied with `kernel`, read
    /// since [`Proxier::watch_writes`] (chains written after it are skipped: the read saw
    /// them before), and rewrites only what differs. `spec_of` gives a Service's ports (by
    /// kube-proxy's `namespace/name`), to re-render a drifted port; a port whose rules have
    /// moved on since they were applied is left to its pending partial sync. Nothing is done
    /// without a mirror or a watch (a full sync ran meanwhile).
    ///
    /// `read_generations` are nf_tables' generation just before and just after the read: when
    /// they are equal the read saw exactly that ruleset, and the kernel is known from then on
    /// ([`Proxier::kernel_unchanged`]).
    pub fn check(
        &mut self,
        runner: &Runner,
        kernel: KernelChains,
        read_generations: (Option<u32>, Option<u32>),
        mut spec_of: impl FnMut(&str) -> Vec<ServiceSpec>,
    ) -> Result<SyncStats, Error> {
        let start = Instant::now();
        let exact = match read_generations {
            (Some(from), Some(to)) if from == to => Some(to),
            _ => None,
        };
        let Some(written) = self.written.take() else {
            return Ok(SyncStats::default());
        };
        let Some((mut ruleset, repaired)) = self.repair(kernel, &written, &mut spec_of) else {
            return Ok(SyncStats::default());
        };
        let config = &self.config;
        ruleset.tables.retain(|_, p| !p.is_empty());
        let mut stats = SyncStats {
            full: true,
            changed_services: repaired,
            chains_written: ruleset.tables.values().map(|t| t.chains.len()).sum(),
            chains_deleted: ruleset.tables.values().map(|t| t.delete.len()).sum(),
            rules: ruleset.rule_count(),
            written: RuleCounts::written(&ruleset),
            ..SyncStats::default()
        };
        if ruleset.is_empty() {
            self.generation = exact.filter(|g| Some(*g) == runner.nft_generation());
        } else {
            ruleset.check_ownership()?;
            tracing::info!(
                family = ?config.family,
                chains = stats.chains_written,
                deleted = stats.chains_deleted,
                "iptables rules differed from what the proxy wrote; repairing them"
            );
            let before = runner.nft_generation();
            let sections = ruleset.tables.values().filter(|t| !t.is_empty()).count();
            match runner.apply_owned(config.family, ruleset) {
                Ok((bytes, restores)) => {
                    stats.bytes = bytes;
                    stats.restores = restores;
                    self.generation = exact.filter(|g| Some(*g) == before);
                    self.track_generation(runner, before, (restores == 1).then_some(sections));
                }
                Err(e) => {
                    self.invalidate();
                    return Err(e);
                }
            }
        }
        stats.elapsed = start.elapsed();
        tracing::debug!(?stats, "iptables proxier checked");
        Ok(stats)
    }
    /// What [`Proxier::check`] rewrites: the chains of `kernel` that differ from the mirror
    /// and were not written since the read (`written`), and how many ports it re-rendered;
    /// `None` without a mirror.
    fn repair(
        &self,
        mut kernel: KernelChains,
        written: &Written,
        spec_of: &mut impl FnMut(&str) -> Vec<ServiceSpec>,
    ) -> Option<(Ruleset, usize)> {
        let mirror = self.applied.as_ref()?;
        let config = &self.config;
        let mut ruleset = Ruleset::default();
        // Own chains: re-render the ports with a chain that differs; every one is kept.
        let mut rerender: BTreeMap<&str, Vec<&Key>> = BTreeMap::new();
        for (key, applied) in &mirror.ports {
            let mut differs = false;
            for &(name, fp) in &applied.chains {
                let held = kernel.keep(Table::Nat, name);
                differs |= !written.contains_own(Table::Nat, name) && held != Some(fp);
            }
            if differs {
                rerender.entry(service_name(&key.0)).or_default().push(key);
            }
        }
        let mut repaired = 0;
        for (service, keys) in rerender {
            for spec in spec_of(service) {
                let key = spec.key();
                if !keys.contains(&&key) {
                    continue;
                }
                let Some(rules) = render_service(config, &spec, mirror.comments) else {
                    continue;
                };
                if !mirror.ports.get(&key).is_some_and(|a| a.holds(&rules)) {
                    continue;
                }
                repaired += 1;
                ruleset.table(Table::Nat).chains.extend(rules.chains);
            }
        }
        let drifted = |table: Table, name: &str, want: &Fingerprint, any_order: bool| {
            !written.contains(table, name) && !kernel.matches(table, name, want, any_order)
        };
        for (i, &(table, name)) in SHARED_CHAINS.iter().enumerate() {
            // Built only if it drifted: a copy of every port's rules is 4 MiB at 10,000.
            let tail = shared_tail(config, i);
            if drifted(
                table,
                name,
                &Fingerprint::of(mirror.shared_rules(i, &tail)),
                true,
            ) {
                let rules = mirror.shared_chain(config, i);
                ruleset.table(table).chains.insert(name.to_owned(), rules);
            }
        }
        for (table, name, rules) in Rendered::base_chains(config) {
            if drifted(table, &name, &Fingerprint::of(&rules), false) {
                ruleset.table(table).chains.insert(name, rules);
            }
        }
        for table in [Table::Nat, Table::Filter] {
            let stale = (kernel.stale(table).into_iter()).filter(|c| !written.contains(table, c));
            ruleset.table(table).delete.extend(stale);
            kernel
                .jumps()
                .add_missing_jumps(table, &builtin_jumps(config, table), &mut ruleset);
        }
        Some((ruleset, repaired))
    }
}

/// Whether the kernel holds chain `name` of `table` with `want`'s rules (a per-Service
/// chain is then kept: it is the ports'); an error if the chain is not the proxy's to
/// write.
fn held(
    kernel: &mut KernelChains,
    table: Table,
    name: &str,
    want: &Fingerprint,
    any_order: bool,
) -> Result<bool, Error> {
    if !may_write_chain(table, name) {
        return Err(Error::NotOwned {
            table,
            chain: name.to_owned(),
        });
    }
    Ok(match HashedName::parse(name) {
        Some(own) => kernel.keep(table, own) == Some(want.ordered),
        None => kernel.matches(table, name, want, any_order),
    })
}

/// The jumps from `table`'s built-in chains into the proxy's.
fn builtin_jumps(config: &super::ProxierConfig, table: Table) -> Vec<Rule> {
    Rendered::builtin_jumps(config)
        .into_iter()
        .filter(|(t, _)| *t == table)
        .map(|(_, r)| r)
        .collect()
}

/// A full sync's `iptables-restore --noflush` input, sent while it is produced: with
/// iptables-nft in restores of at most [`NFT_RESTORE_LINES`] lines (each leaves the kernel
/// consistent: a chain comes after the chains it jumps to, a port's chains share a restore;
/// see [`Ruleset::split`] for why), with iptables-legacy as one (each of its restores
/// replaces the whole table).
struct Stream<'a> {
    runner: &'a Runner,
    family: Family,
    max_lines: Option<usize>,
    out: Option<RestoreStream>,
    table: Option<Table>,
    lines: usize,
    line: String,
    stats: SyncStats,
}

impl<'a> Stream<'a> {
    fn new(runner: &'a Runner, family: Family) -> Stream<'a> {
        Stream {
            runner,
            family,
            max_lines: (runner.flavour() == Flavour::Nft).then_some(NFT_RESTORE_LINES),
            out: None,
            table: None,
            lines: 0,
            line: String::with_capacity(256),
            stats: SyncStats {
                full: true,
                ..SyncStats::default()
            },
        }
    }

    /// Makes room for `lines` more lines: the restore so far is run first if they would not
    /// fit in it.
    fn room(&mut self, lines: usize) -> Result<(), Error> {
        if self
            .max_lines
            .is_some_and(|max| self.lines > 0 && self.lines + lines > max)
        {
            self.commit()?;
        }
        Ok(())
    }

    /// Sends `text` into `table`'s section, starting a restore or a section as needed.
    fn send(&mut self, table: Table, text: &str) -> Result<(), Error> {
        if self.out.is_none() {
            self.out = Some(self.runner.restore_stream(self.family)?);
        }
        let out = self.out.as_mut().expect("started above");
        if self.table != Some(table) {
            if self.table.is_some() {
                out.write("COMMIT\n");
            }
            out.write("*");
            out.write(table.as_str());
            out.write("\n");
            self.table = Some(table);
            self.stats.commits += 1;
        }
        out.write(text);
        self.lines += 1;
        Ok(())
    }

    /// Writes chain `name` of `table` whole unless the kernel already holds `rules`.
    fn chain_if_differs(
        &mut self,
        kernel: &mut KernelChains,
        table: Table,
        name: &str,
        rules: &[Rule],
        any_order: bool,
    ) -> Result<(), Error> {
        if held(kernel, table, name, &Fingerprint::of(rules), any_order)? {
            return Ok(());
        }
        self.chain(table, name, rules)
    }

    /// Writes chain `name` of `table` whole.
    fn chain<'r>(
        &mut self,
        table: Table,
        name: &str,
        rules: impl IntoIterator<Item = &'r Rule>,
    ) -> Result<(), Error> {
        self.send(table, &format!(":{name} - [0:0]\n"))?;
        let mut count = 0;
        for r in rules {
            count += 1;
            let mut line = std::mem::take(&mut self.line);
            line.clear();
            r.write_with("-A", &mut line);
            line.push('\n');
            let sent = self.send(table, &line);
            self.line = line;
            sent?;
        }
        self.stats.chains_written += 1;
        self.stats.rules += count;
        self.stats.written.add(table, count);
        Ok(())
    }

    /// Inserts the jumps from `table`'s built-in chains the kernel lacks.
    fn missing_jumps(
        &mut self,
        kernel: &KernelChains,
        config: &super::ProxierConfig,
        table: Table,
    ) -> Result<(), Error> {
        let mut missing = Ruleset::default();
        kernel
            .jumps()
            .add_missing_jumps(table, &builtin_jumps(config, table), &mut missing);
        for r in &missing.table(table).insert_jumps {
            self.room(1)?;
            let mut line = String::new();
            r.write_with("-A", &mut line);
            let rest = &line[3 + r.chain.len()..];
            self.send(table, &format!("-I {} 1{rest}\n", r.chain))?;
            self.stats.rules += 1;
        }
        Ok(())
    }

    /// Deletes `chains` of `table`: all flushed, then all deleted (a stale chain may jump to
    /// another), in separate restores when split.
    fn delete(&mut self, table: Table, chains: &[String]) -> Result<(), Error> {
        if chains.is_empty() {
            return Ok(());
        }
        for name in chains {
            self.room(1)?;
            self.send(table, &format!(":{name} - [0:0]\n"))?;
        }
        if self.max_lines.is_some() {
            self.commit()?;
        }
        for name in chains {
            self.room(2)?;
            self.send(table, &format!(":{name} - [0:0]\n-X {name}\n"))?;
            self.lines += 1;
        }
        self.stats.chains_deleted += chains.len();
        Ok(())
    }

    /// Runs the restore so far.
    fn commit(&mut self) -> Result<(), Error> {
        if let Some(mut out) = self.out.take() {
            out.write("COMMIT\n");
            self.stats.bytes += out.finish()?;
            self.stats.restores += 1;
        }
        self.table = None;
        self.lines = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<SyncStats, Error> {
        self.commit()?;
        Ok(self.stats)
    }
}
