//! One Service's target against the mirror: the operations that move the kernel there. The
//! mirror is updated as if every operation succeeds; `send` corrects it where one fails.

use std::collections::HashSet;
use std::collections::hash_map::{DefaultHasher, Entry};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ipvs::{Op, RealServer, ServiceKey, VirtualServer};

use super::mirror::{Footprint, KernelVs, RealSet};
use super::report::SyncError;
use super::target::ServiceTarget;
use super::{AddressKernel, IpvsKernel, NetfilterEntry, NetfilterKernel, Pending, Syncer, Undo};
use crate::error::Error;
use crate::model::ServiceName;

fn is_tcp(key: &ServiceKey) -> bool {
    matches!(
        key,
        ServiceKey::Addr {
            protocol: ipvs::Protocol::Tcp,
            ..
        }
    )
}

/// The lowest bit of a [`KernelVs::fingerprint`]: the Service owns all its virtual servers.
/// One field for both keeps the slot, which the mirror holds per virtual server, 8 bytes
/// smaller; the hash keeps 63 bits. A slot with no fingerprint (0) never matches.
const OWNS_ALL: u64 = 1;

fn marked(fingerprint: u64, owns_all: bool) -> u64 {
    (fingerprint & !OWNS_ALL) | u64::from(owns_all)
}

/// A hash of what a target holds besides its real servers (its virtual servers' keys, its
/// addresses and set entries), made as its footprint's is ([`KernelVs::fingerprint`]).
fn fingerprint(target: &ServiceTarget) -> u64 {
    let mut hasher = DefaultHasher::new();
    target.virtual_servers.len().hash(&mut hasher);
    for (vs, _) in &target.virtual_servers {
        vs.key.hash(&mut hasher);
    }
    target.addresses.hash(&mut hasher);
    target.netfilter.hash(&mut hasher);
    hasher.finish()
}

impl<I: IpvsKernel, A: AddressKernel, N: NetfilterKernel> Syncer<I, A, N> {
    /// Diffs one Service's new target against what it had, into `p`.
    ///
    /// The usual change (an endpoint's) leaves the Service's virtual servers, addresses and
    /// set entries as they were: the fingerprint in its first virtual server's slot says so,
    /// and only its virtual servers' real servers are compared (each found with its owner in
    /// one lookup), the footprint not looked up. At 100,000 Services each map slot and vector
    /// touched is a cache miss.
    pub(super) fn diff_service(
        &mut self,
        name: &ServiceName,
        new: ServiceTarget,
        now: Instant,
        p: &mut Pending,
    ) {
        let fingerprint = fingerprint(&new);
        if let Some((first, _)) = new.virtual_servers.first()
            && self.kernel.get(&first.key).is_some_and(|vs| {
                vs.fingerprint == fingerprint | OWNS_ALL && vs.owner.as_ref() == Some(name)
            })
        {
            for (vs, reals) in &new.virtual_servers {
                self.reconcile_virtual_server(name, vs, reals, now, p);
            }
            return;
        }
        // Otherwise found once and kept in its slot (a remove and insert would move it), its
        // vectors kept if they hold what they held.
        let old = self
            .services
            .get_mut(name)
            .map(std::mem::take)
            .unwrap_or_default();
        let same_keys = old.keys.len() == new.virtual_servers.len()
            && old
                .keys
                .iter()
                .zip(&new.virtual_servers)
                .all(|(k, (vs, _))| *k == vs.key);
        let mut owns_all = true;
        for (vs, reals) in &new.virtual_servers {
            owns_all &= self.reconcile_virtual_server(name, vs, reals, now, p);
        }
        if !same_keys {
            self.forget_old_keys(name, &old.keys, &new, p);
        }
        let same_addresses = old.addresses == new.addresses;
        if !same_addresses {
            self.diff_addresses(&old.addresses, &new.addresses, p);
        }
        let same_netfilter = old.netfilter == new.netfilter;
        if !same_netfilter {
            self.diff_netfilter(&old.netfilter, &new.netfilter, p);
        }
        // The fingerprint is the first virtual server's alone: none other keeps a stale one.
        for key in &old.keys {
            if let Some(vs) = self.kernel.get_mut(key)
                && vs.owner.as_ref() == Some(name)
            {
                vs.fingerprint = 0;
            }
        }
        if let Some((first, _)) = new.virtual_servers.first()
            && let Some(vs) = self.kernel.get_mut(&first.key)
            && vs.owner.as_ref() == Some(name)
        {
            vs.fingerprint = marked(fingerprint, owns_all);
        }

        if new.is_empty() {
            self.services.remove(name);
            return;
        }
        let footprint = if same_keys && same_addresses && same_netfilter {
            old
        } else {
            Footprint {
                keys: new
                    .virtual_servers
                    .into_iter()
                    .map(|(vs, _)| vs.key)
                    .collect(),
                addresses: new.addresses,
                netfilter: new.netfilter,
            }
        };
        match self.services.get_mut(name) {
            Some(slot) => *slot = footprint,
            None => {
                self.services.insert(name.clone(), footprint);
            }
        }
    }

    /// Deletes the virtual servers the Service had and no longer wants.
    fn forget_old_keys(
        &mut self,
        name: &ServiceName,
        old: &[ServiceKey],
        new: &ServiceTarget,
        p: &mut Pending,
    ) {
        let new_keys: HashSet<ServiceKey> =
            new.virtual_servers.iter().map(|(vs, _)| vs.key).collect();
        for key in old {
            if !new_keys.contains(key) && self.owner(key) == Some(name) {
                self.refused.remove(key);
                if self.forget_virtual_server(key) {
                    self.draining.retain(|(k, _), _| k != key);
                    p.push(Op::DeleteService(*key), Some(name));
                }
            }
        }
    }

    /// Counts the addresses the Service holds now and no longer holds; an address is bound
    /// while any Service holds it.
    fn diff_addresses(&mut self, old: &[IpAddr], new: &[IpAddr], p: &mut Pending) {
        let old_addrs: HashSet<IpAddr> = old.iter().copied().collect();
        let new_addrs: HashSet<IpAddr> = new.iter().copied().collect();
        for ip in new_addrs.difference(&old_addrs) {
            let refs = self.address_refs.entry(*ip).or_insert(0);
            *refs += 1;
            if *refs == 1 {
                p.del_addrs.remove(ip);
                if !self.bound.contains(ip) {
                    p.add_addrs.insert(*ip);
                }
            }
        }
        for ip in old_addrs.difference(&new_addrs) {
            if let Some(refs) = self.address_refs.get_mut(ip) {
                *refs -= 1;
                if *refs == 0 {
                    self.address_refs.remove(ip);
                    p.add_addrs.remove(ip);
                    if self.bound.contains(ip) {
                        p.del_addrs.insert(*ip);
                    }
                }
            }
        }
    }

    /// Counts the set entries and out-filters the Service holds now and no longer holds; an
    /// entry is written while any Service holds it.
    fn diff_netfilter(&mut self, old: &[NetfilterEntry], new: &[NetfilterEntry], p: &mut Pending) {
        let old_entries: HashSet<&NetfilterEntry> = old.iter().collect();
        let new_entries: HashSet<&NetfilterEntry> = new.iter().collect();
        for e in new_entries.difference(&old_entries) {
            let refs = self.set_refs.entry((*e).clone()).or_insert(0);
            *refs += 1;
            if *refs == 1 {
                self.count_member(e, 1);
                if !p.del_entries.remove(*e) {
                    p.add_entries.insert((*e).clone());
                }
            }
        }
        for e in old_entries.difference(&new_entries) {
            if let Some(refs) = self.set_refs.get_mut(*e) {
                *refs -= 1;
                if *refs == 0 {
                    self.set_refs.remove(*e);
                    self.count_member(e, -1);
                    if !p.add_entries.remove(*e) {
                        p.del_entries.insert((*e).clone());
                    }
                }
            }
        }
    }
    /// Claims one virtual server of the Service and diffs its real servers; says whether the
    /// Service owns it (another Service's is refused, with an error, and left as it is).
    fn reconcile_virtual_server(
        &mut self,
        name: &ServiceName,
        vs: &VirtualServer,
        reals: &[RealServer],
        now: Instant,
        p: &mut Pending,
    ) -> bool {
        let key = vs.key;
        let conflict = |owner: &ServiceName| {
            SyncError::new(
                Some(name),
                Error::Conflict {
                    key,
                    owner: owner.clone(),
                },
            )
        };
        // The virtual server and its owner in one lookup.
        let entry = match self.kernel.entry(key) {
            Entry::Occupied(slot) => {
                let entry = slot.into_mut();
                match &entry.owner {
                    Some(other) if other != name => {
                        p.errors.push(conflict(other));
                        return false;
                    }
                    Some(_) => {}
                    None => entry.owner = Some(name.clone()),
                }
                entry
            }
            Entry::Vacant(slot) => {
                if !self.refused.is_empty() {
                    if let Some(other) = self.refused.get(&key)
                        && other != name
                    {
                        p.errors.push(conflict(other));
                        return false;
                    }
                    self.refused.remove(&key);
                }
                p.push(Op::AddService(vs.clone()), Some(name));
                slot.insert(KernelVs {
                    server: vs.clone(),
                    real: RealSet::default(),
                    owner: Some(name.clone()),
                    fingerprint: 0,
                })
            }
        };
        if entry.server != *vs {
            let was = std::mem::replace(&mut entry.server, vs.clone());
            p.push_update(Op::UpdateService(vs.clone()), Some(name), Undo::Server(was));
        }
        // Sorted and searched, not hashed: a map cost an allocation and two hashes per real
        // server, more than the rest of a one-endpoint change's diff.
        let mut wanted: Vec<SocketAddr> = reals.iter().map(|r| r.addr).collect();
        wanted.sort_unstable();
        entry.real.reserve_exact(reals);
        // One search per real server, none written that is unchanged (an insert searches
        // again and shifts the vector twice).
        for rs in reals {
            let have = entry.real.get(&rs.addr);
            match have {
                None => {
                    p.push(Op::AddDest(key, *rs), Some(name));
                    entry.real.insert(*rs);
                    self.real_servers += 1;
                }
                Some(have) if have != *rs => {
                    let undo = Undo::Dest(key, have);
                    p.push_update(Op::UpdateDest(key, *rs), Some(name), undo);
                    entry.real.insert(*rs);
                }
                Some(_) => {}
            }
            // Only one the mirror has at weight 0 (or not at all) can be draining: the others
            // cost no lookup (a hash of their key and address each, a fifth of the change).
            if have.is_none_or(|h| h.weight == 0) {
                self.draining.remove(&(key, rs.addr));
            }
        }
        let gone: Vec<SocketAddr> = entry
            .real
            .addrs()
            .filter(|a| wanted.binary_search(a).is_err())
            .collect();
        for addr in gone {
            if self.draining.contains_key(&(key, addr)) {
                continue;
            }
            if is_tcp(&key) {
                let mut rs = entry.real.get(&addr).expect("listed above");
                if rs.weight != 0 {
                    let undo = Undo::Dest(key, rs);
                    rs.weight = 0;
                    entry.real.insert(rs);
                    p.push_update(Op::UpdateDest(key, rs), Some(name), undo);
                }
                self.draining
                    .insert((key, addr), now + self.options.drain_timeout);
            } else {
                entry.real.remove(&addr);
                self.real_servers -= 1;
                p.push(Op::DeleteDest(key, addr), Some(name));
            }
        }
        true
    }

    /// Keeps the member count of `e`'s set (what decides which rules exist) in step.
    fn count_member(&mut self, e: &NetfilterEntry, delta: isize) {
        if let NetfilterEntry::Set { family, set, .. } = e {
            let size = self.set_sizes.entry((*family, *set)).or_insert(0);
            *size = size.saturating_add_signed(delta);
            if *size == 0 {
                self.set_sizes.remove(&(*family, *set));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use ipvs::ServiceKey;

    use crate::model::ServiceName;
    use crate::sync::ServiceTarget;
    use crate::sync::tests::TestSyncer;

    fn target(backends: &[&str]) -> ServiceTarget {
        let vip = "10.96.0.10".parse().unwrap();
        crate::sync::tests::bare_target(ServiceKey::tcp(vip, 80), vip, backends)
    }

    /// The lines of the virtual server's real servers in `ipvsadm -Sn`.
    fn reals(s: &TestSyncer) -> Vec<String> {
        s.ipvs
            .save()
            .into_iter()
            .filter(|l| l.starts_with("-a"))
            .collect()
    }

    #[test]
    fn a_service_whose_first_virtual_server_came_and_went_is_diffed_whole_again() {
        let mut s = crate::sync::tests::syncer();
        let now = Instant::now();
        let a = ServiceName::new("ns", "a");
        let one = target(&["10.244.0.1:8080"]);
        // Another address and virtual server, first in the target's order.
        let extra = "10.96.0.9".parse().unwrap();
        let mut two = crate::sync::tests::bare_target(
            ServiceKey::tcp(extra, 80),
            extra,
            &["10.244.0.1:8080"],
        );
        two.virtual_servers.extend(one.virtual_servers.clone());
        two.addresses.extend(one.addresses.clone());
        for t in [one.clone(), two, one] {
            let report = s.sync(vec![(a.clone(), t)], now);
            assert!(report.errors.is_empty(), "{:?}", report.errors);
        }
        // Back as it first was: the other virtual server and address are gone.
        assert_eq!(
            s.ipvs.save(),
            [
                "-A -t 10.96.0.10:80 -s rr",
                "-a -t 10.96.0.10:80 -r 10.244.0.1:8080 -m -w 1"
            ]
        );
        let vip: std::net::IpAddr = "10.96.0.10".parse().unwrap();
        assert_eq!(s.addresses.bound.iter().collect::<Vec<_>>(), [&vip]);
    }

    #[test]
    fn an_unchanged_footprint_still_syncs_its_real_servers_and_a_conflict_is_checked_each_time() {
        let mut s = crate::sync::tests::syncer();
        let now = Instant::now();
        let (a, b) = (ServiceName::new("ns", "a"), ServiceName::new("ns", "b"));
        let report = s.sync(vec![(a.clone(), target(&["10.244.0.1:8080"]))], now);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // The same virtual servers and addresses, another endpoint: only real servers move.
        let report = s.sync(vec![(a.clone(), target(&["10.244.0.2:8080"]))], now);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            reals(&s),
            [
                "-a -t 10.96.0.10:80 -r 10.244.0.1:8080 -m -w 0",
                "-a -t 10.96.0.10:80 -r 10.244.0.2:8080 -m -w 1"
            ]
        );
        // b wants a's virtual server: refused, and again when only its endpoints change.
        for backend in ["10.244.9.1:8080", "10.244.9.2:8080"] {
            let report = s.sync(vec![(b.clone(), target(&[backend]))], now);
            assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
            assert_eq!(report.errors[0].service.as_ref(), Some(&b));
        }
        // Once a lets it go, b's unchanged target takes it over.
        s.sync(vec![(a, ServiceTarget::default())], now);
        let report = s.sync(vec![(b, target(&["10.244.9.2:8080"]))], now);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            reals(&s),
            ["-a -t 10.96.0.10:80 -r 10.244.9.2:8080 -m -w 1"]
        );
    }
}
