//! The service addresses on the dummy link: list, add, remove, sync.
//!
//! Every address is a host address (IPv4 /32, IPv6 /128), as kube-proxy binds them. Only the
//! handle's own link is ever named in a request, so addresses on other links cannot be touched.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::time::Instant;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;

use crate::connection::{Reply, Request};
use crate::error::{AddressError, AddressOp, Error};
use crate::link::DummyLink;
use crate::local::address_of;
use crate::request;

/// How often a dump interrupted by concurrent changes is read again before giving up.
const DUMP_ATTEMPTS: u32 = 5;

/// What happened to one address that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// It was bound by this call.
    Added,
    /// It was bound already; nothing changed.
    AlreadyPresent,
    /// It was unbound by this call.
    Removed,
    /// It was not bound; nothing changed.
    AlreadyAbsent,
}

/// The result for one address of [`DummyLink::add`] or [`DummyLink::remove`].
pub type AddressResult = Result<Outcome, AddressError>;

/// What [`DummyLink::sync`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct SyncReport {
    /// Addresses bound by this sync.
    pub added: Vec<IpAddr>,
    /// Addresses unbound by this sync.
    pub removed: Vec<IpAddr>,
    /// Desired addresses that were already bound.
    pub unchanged: usize,
    /// Addresses the kernel refused; the rest of the sync went on.
    pub failed: Vec<AddressError>,
}

impl SyncReport {
    /// True when every address reached its desired state.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// The prefix length of a host address: 32 for IPv4, 128 for IPv6.
#[must_use]
pub fn host_prefix(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Link-local IPv6 addresses (fe80::/10) belong to the kernel (it adds one when a link comes
/// up); a sync neither counts nor removes them.
fn is_kernel_managed(address: IpAddr) -> bool {
    matches!(address, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

impl DummyLink {
    /// Every address bound to the link, both families.
    ///
    /// Mirrors `ip -o addr show dev kube-ipvs0`. One dump; read again if a concurrent change
    /// interrupted it.
    pub fn addresses(&mut self) -> Result<BTreeSet<IpAddr>, Error> {
        Ok(self.entries()?.into_keys().collect())
    }

    /// The link's addresses with their prefix lengths.
    fn entries(&mut self) -> Result<BTreeMap<IpAddr, u8>, Error> {
        let name = &self.name;
        let index = self.index;
        let command = || format!("ip addr show dev {name}");
        for _ in 0..DUMP_ATTEMPTS {
            let (answers, interrupted) = self
                .connection
                .dump(&request::get_addresses(index), &command)?;
            if interrupted {
                continue;
            }
            return Ok(link_addresses(answers, index));
        }
        Err(Error::DumpInterrupted {
            name: self.name.clone(),
            attempts: DUMP_ATTEMPTS,
        })
    }

    /// Binds host addresses to the link, in pipelined batches; one result per address, in
    /// the order given. Already bound is not an error ([`Outcome::AlreadyPresent`]).
    ///
    /// Mirrors `ip addr add 10.96.0.10/32 dev kube-ipvs0` (and `fd00::10/128`) for each.
    /// Does not list the link first: the cost follows the number of addresses given.
    pub fn add(&mut self, addresses: &[IpAddr]) -> Result<Vec<AddressResult>, Error> {
        let entries: Vec<_> = addresses.iter().map(|&a| (a, host_prefix(a))).collect();
        self.apply(AddressOp::Add, &entries)
    }

    /// Unbinds host addresses from the link, in pipelined batches; one result per address.
    /// Not bound is not an error ([`Outcome::AlreadyAbsent`]).
    ///
    /// Mirrors `ip addr del 10.96.0.10/32 dev kube-ipvs0` for each.
    pub fn remove(&mut self, addresses: &[IpAddr]) -> Result<Vec<AddressResult>, Error> {
        let entries: Vec<_> = addresses.iter().map(|&a| (a, host_prefix(a))).collect();
        self.apply(AddressOp::Remove, &entries)
    }

    /// Makes the link hold exactly `desired` (as host addresses): lists it once, adds what is
    /// missing, removes what is extra (including a desired address bound with another prefix
    /// length, which is re-bound as a host address). IPv6 link-local addresses are left to the
    /// kernel. Idempotent: a second call changes nothing.
    ///
    /// Mirrors `ip -o addr show dev kube-ipvs0` followed by an `ip -batch` of `addr add` and
    /// `addr del` lines.
    pub fn sync(&mut self, desired: &BTreeSet<IpAddr>) -> Result<SyncReport, Error> {
        let started = Instant::now();
        let present = self.entries()?;
        let extra: Vec<(IpAddr, u8)> = present
            .iter()
            .filter(|&(&ip, &prefix)| {
                let wanted = desired.contains(&ip) && prefix == host_prefix(ip);
                !wanted && !is_kernel_managed(ip)
            })
            .map(|(&ip, &prefix)| (ip, prefix))
            .collect();
        let missing: Vec<(IpAddr, u8)> = desired
            .iter()
            .filter(|ip| present.get(ip) != Some(&host_prefix(**ip)))
            .map(|&ip| (ip, host_prefix(ip)))
            .collect();
        let mut report = SyncReport {
            unchanged: desired.len() - missing.len(),
            ..SyncReport::default()
        };
        // Removals first: a desired address bound with the wrong prefix must go before its
        // host form is added, or the add would see it as already there (IPv6).
        for (result, (ip, _)) in self
            .apply(AddressOp::Remove, &extra)?
            .into_iter()
            .zip(&extra)
        {
            match result {
                Ok(Outcome::Removed) => report.removed.push(*ip),
                Ok(_) => {}
                Err(e) => report.failed.push(e),
            }
        }
        for (result, (ip, _)) in self
            .apply(AddressOp::Add, &missing)?
            .into_iter()
            .zip(&missing)
        {
            match result {
                Ok(Outcome::Added) => report.added.push(*ip),
                Ok(_) => report.unchanged += 1,
                Err(e) => report.failed.push(e),
            }
        }
        tracing::debug!(
            link = self.name,
            added = report.added.len(),
            removed = report.removed.len(),
            unchanged = report.unchanged,
            failed = report.failed.len(),
            elapsed = ?started.elapsed(),
            "synced addresses"
        );
        Ok(report)
    }

    /// Sends one request per entry in pipelined batches and turns the kernel's replies into
    /// one result per entry.
    fn apply(
        &mut self,
        op: AddressOp,
        entries: &[(IpAddr, u8)],
    ) -> Result<Vec<AddressResult>, Error> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let index = self.index;
        let requests = entries.iter().map(|&(ip, prefix)| match op {
            AddressOp::Add => Request {
                message: request::new_address(index, ip, prefix),
                flags: NLM_F_CREATE | NLM_F_EXCL,
            },
            AddressOp::Remove => Request {
                message: request::del_address(index, ip, prefix),
                flags: 0,
            },
        });
        let name = &self.name;
        let command = || format!("ip -batch (addr {} ... dev {name})", op.verb());
        let replies = self.connection.batch(requests, &command)?;
        if replies.contains(&Reply::Failed(libc::ENODEV)) {
            return Err(Error::LinkGone {
                name: self.name.clone(),
                index,
            });
        }
        // Answers lost to a receive-queue overrun: the kernel's state says what happened.
        let bound = if replies.contains(&Reply::Lost) {
            Some(self.entries()?)
        } else {
            None
        };
        let results = entries
            .iter()
            .zip(replies)
            .map(|(&(address, prefix), reply)| {
                let error = |source| AddressError {
                    address,
                    prefix,
                    op,
                    link: self.name.clone(),
                    source,
                };
                match (op, reply) {
                    (AddressOp::Add, Reply::Done) => Ok(Outcome::Added),
                    (AddressOp::Add, Reply::Failed(libc::EEXIST)) => Ok(Outcome::AlreadyPresent),
                    (AddressOp::Remove, Reply::Done) => Ok(Outcome::Removed),
                    // ENXIO: IPv6 was never set up on the link, so it holds no IPv6 address.
                    (AddressOp::Remove, Reply::Failed(libc::EADDRNOTAVAIL | libc::ENXIO)) => {
                        Ok(Outcome::AlreadyAbsent)
                    }
                    (_, Reply::Failed(errno)) => Err(error(io::Error::from_raw_os_error(errno))),
                    (_, Reply::Lost) => {
                        let is_bound = bound
                            .as_ref()
                            .is_some_and(|b| b.get(&address) == Some(&prefix));
                        match (op, is_bound) {
                            (AddressOp::Add, true) => Ok(Outcome::Added),
                            (AddressOp::Remove, false) => Ok(Outcome::Removed),
                            _ => Err(error(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the kernel's answer was lost (receive queue overrun)",
                            ))),
                        }
                    }
                }
            })
            .collect();
        Ok(results)
    }
}

/// The addresses of link `index`, with their prefix lengths, among the answers of an
/// `ip addr show` dump.
fn link_addresses(
    answers: impl IntoIterator<Item = RouteNetlinkMessage>,
    index: u32,
) -> BTreeMap<IpAddr, u8> {
    let mut entries = BTreeMap::new();
    for answer in answers {
        let RouteNetlinkMessage::NewAddress(message) = answer else {
            continue;
        };
        // Without strict checking the kernel dumps every link: keep ours only.
        if message.header.index != index {
            continue;
        }
        if let Some((ip, prefix)) = address_of(message) {
            entries.insert(ip, prefix);
        }
    }
    entries
}

/// Reads the kernel's answer to `ip addr show dev INDEX` from its raw bytes (one or more
/// netlink messages back to back, `NLMSG_DONE` included or not) as [`DummyLink::addresses`]
/// reads it from the socket: the addresses of link `index` with their prefix lengths. For
/// tests and fuzzing.
pub fn read_address_dump(datagram: &[u8], index: u32) -> Result<BTreeMap<IpAddr, u8>, Error> {
    let mut answers = Vec::new();
    for message in netlink::frame::messages(datagram) {
        let message = message.map_err(|e| decode_error(&e))?;
        // Control messages (NOOP, ERROR, DONE, OVERRUN) end or frame the answer; the socket
        // engine keeps them from the caller in the same way.
        if message.msg_type <= netlink::frame::NLMSG_OVERRUN {
            continue;
        }
        answers.push(request::parse(&message).map_err(|e| decode_error(&e))?);
    }
    Ok(link_addresses(answers, index))
}

fn decode_error(error: &netlink::Error) -> Error {
    Error::Decode {
        command: "ip addr show".to_owned(),
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// An `ip addr show` answer as the kernel sends it without strict checking: this link's
    /// addresses, another link's, then NLMSG_DONE.
    #[test]
    fn an_address_dump_reads_as_this_links_addresses_only() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
        let v6: IpAddr = "fd00::10".parse().unwrap();
        let mut w = netlink::Writer::default();
        for (sequence, (index, ip, prefix)) in (1..).zip([(3, v4, 32), (1, v4, 8), (3, v6, 128)]) {
            request::append(
                &mut w,
                &request::new_address(index, ip, prefix),
                2,
                sequence,
            );
        }
        let done = w.begin(netlink::frame::NLMSG_DONE, 2, 4);
        w.payload(4);
        w.end(done);
        let read = read_address_dump(w.as_bytes(), 3).unwrap();
        assert_eq!(read, [(v4, 32), (v6, 128)].into());
        assert!(
            read_address_dump(&w.as_bytes()[..20], 3).is_err(),
            "a cut message"
        );
    }

    #[test]
    fn host_prefixes_are_32_and_128() {
        assert_eq!(host_prefix(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))), 32);
        assert_eq!(host_prefix(IpAddr::V6(Ipv6Addr::LOCALHOST)), 128);
    }

    #[test]
    fn only_ipv6_link_local_is_left_to_the_kernel() {
        let cases = [
            ("fe80::1", true),
            ("febf::1", true),
            ("fec0::1", false),
            ("fd00::10", false),
            ("169.254.1.1", false),
            ("10.96.0.10", false),
        ];
        for (ip, kernel) in cases {
            assert_eq!(is_kernel_managed(ip.parse().expect("ip")), kernel, "{ip}");
        }
    }

    #[test]
    fn address_errors_read_as_the_failed_ip_command() {
        let error = AddressError {
            address: "10.96.0.10".parse().expect("ip"),
            prefix: 32,
            op: AddressOp::Add,
            link: "kube-ipvs0".to_owned(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let message = error.to_string();
        assert!(
            message.starts_with("`ip addr add 10.96.0.10/32 dev kube-ipvs0` failed: "),
            "{message}"
        );
        assert_eq!(error.errno(), Some(libc::EACCES));
    }
}
