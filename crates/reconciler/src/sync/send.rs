//! Sending the collected operations, and correcting the mirror where the kernel refused one.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Instant;

use ipvs::{Op, ServiceKey};

use super::report::SyncError;
use super::{AddressKernel, IpvsKernel, NetfilterKernel, Pending, SyncReport, Syncer, Undo, ms};
use crate::error::Error;

impl<I: IpvsKernel, A: AddressKernel, N: NetfilterKernel> Syncer<I, A, N> {
    /// Sends the collected operations and records what failed.
    pub(super) fn execute(&mut self, mut p: Pending, report: &mut SyncReport) {
        self.note_written(&p);
        self.execute_ipvs(&mut p, report);
        self.execute_addresses(p, report);
        // A backend that failed as a whole leaves the mirror in doubt: the next full sync
        // reads the kernel on the loop's thread and plans every Service.
        self.verified &= !report.needs_full_sync();
    }

    /// Sends the IPVS operations collected so far and forgets them.
    pub(super) fn execute_ipvs(&mut self, p: &mut Pending, report: &mut SyncReport) {
        if !p.ops.is_empty() {
            let started = Instant::now();
            let results = self.ipvs.apply(&p.ops);
            tracing::debug!(
                ops = p.ops.len(),
                took_ms = ms(started.elapsed()),
                "ipvs batch applied"
            );
            report.ipvs_ops += p.ops.len();
            // A virtual server the kernel refused makes its real servers fail too ("no such
            // virtual server"): that follows from the one error reported, and is not another.
            let mut refused: HashSet<ServiceKey> = HashSet::new();
            let done = results.into_iter().zip(&p.ops).zip(&p.op_owner);
            for (((result, op), owner), undo) in done.zip(&p.op_undo) {
                if let Err(e) = result {
                    let follows = matches!(op, Op::AddDest(key, _) if refused.contains(key))
                        && matches!(e, ipvs::Error::NoSuchService { .. });
                    // The mirror assumed success; put it back so the next sync retries it.
                    match (op, undo) {
                        (Op::AddService(vs), _) => {
                            // Still its Service's claim, until that lets it go.
                            if let Some(gone) = self.kernel.remove(&vs.key) {
                                self.real_servers -= gone.real.len();
                                if let Some(owner) = gone.owner {
                                    self.refused.insert(vs.key, owner);
                                }
                            }
                            refused.insert(vs.key);
                        }
                        (Op::AddDest(key, rs), _) => {
                            if let Some(vs) = self.kernel.get_mut(key)
                                && vs.real.remove(&rs.addr).is_some()
                            {
                                self.real_servers -= 1;
                            }
                        }
                        (_, Some(Undo::Server(was))) => {
                            if let Some(vs) = self.kernel.get_mut(&was.key) {
                                vs.server = was.clone();
                            }
                        }
                        (_, Some(Undo::Dest(key, was))) => {
                            if let Some(vs) = self.kernel.get_mut(key)
                                && vs.real.insert(*was)
                            {
                                self.real_servers += 1;
                            }
                            self.draining.remove(&(*key, was.addr));
                        }
                        _ => {}
                    }
                    if !follows {
                        p.errors
                            .push(SyncError::new(owner.as_ref(), Error::Ipvs(e)));
                    }
                }
            }
            p.ops.clear();
            p.op_owner.clear();
            p.op_undo.clear();
        }
    }

    /// Binds and unbinds the collected addresses, then records every error of the sync.
    fn execute_addresses(&mut self, mut p: Pending, report: &mut SyncReport) {
        let started = Instant::now();
        let add: Vec<IpAddr> = p.add_addrs.into_iter().collect();
        for (ip, result) in add.iter().zip(self.addresses.add(&add)) {
            match result {
                Ok(()) => {
                    self.bound.insert(*ip);
                    report.addresses_added += 1;
                }
                Err(source) => p
                    .errors
                    .push(SyncError::new(None, Error::Bind { ip: *ip, source })),
            }
        }
        // `--ipvs-exclude-cidrs` promises these are never touched, bound by whoever.
        let del: Vec<IpAddr> = p
            .del_addrs
            .into_iter()
            .filter(|ip| !self.excluded(*ip))
            .collect();
        for (ip, result) in del.iter().zip(self.addresses.remove(&del)) {
            match result {
                Ok(()) => {
                    self.bound.remove(ip);
                    report.addresses_removed += 1;
                }
                Err(source) => p
                    .errors
                    .push(SyncError::new(None, Error::Unbind { ip: *ip, source })),
            }
        }
        if !add.is_empty() || !del.is_empty() {
            tracing::debug!(
                added = add.len(),
                removed = del.len(),
                took_ms = ms(started.elapsed()),
                "kube-ipvs0 addresses synced"
            );
        }
        report.errors.append(&mut p.errors);
    }
}
