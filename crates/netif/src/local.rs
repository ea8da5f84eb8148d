//! The node's own addresses on every link but one (`kube-ipvs0`), read from the kernel and
//! followed as they change: what kube-proxy's ipvs mode serves NodePorts on when
//! `--nodeport-addresses` is unset (its `GetAllLocalAddressesExcept`).
//!
//! Read-only: nothing here adds, changes or removes an address or a link.
//!
//! Following: a second rtnetlink socket joins the link and address multicast groups
//! (`RTNLGRP_LINK`, `RTNLGRP_IPV4_IFADDR`, `RTNLGRP_IPV6_IFADDR`, what `ip monitor link address`
//! listens to). The notifications themselves are not parsed: any of them, or a lost one (the
//! kernel reports an overrun as `ENOBUFS`), means "read the addresses again", so a burst of
//! changes costs one dump and nothing can be missed. The group is joined before the first
//! dump, so a change between the two is seen too.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;

use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::connection::Connection;
use crate::error::Error;
use crate::link::find_index;
use crate::request;

/// How often a dump interrupted by concurrent changes is read again before giving up.
const DUMP_ATTEMPTS: u32 = 5;
/// The first pause before reading a dump again that [`DUMP_ATTEMPTS`] reads in a row found
/// interrupted, and the longest.
const INTERRUPTED_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
const INTERRUPTED_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// Room for one notification datagram (they are a few hundred bytes; more is truncated, which
/// does not matter as they are not parsed).
const NOTIFICATION_BUFFER: usize = 64 << 10;

/// The node's addresses as the kernel has them, except those of one link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Every address on every other link, both families, loopback and link-local included
    /// (what is used of them is the caller's choice).
    pub addresses: BTreeSet<IpAddr>,
    /// The excluded link's interface index, `None` while there is no such link: a change of
    /// it says that the link was deleted (and maybe made again).
    pub excluded_index: Option<u32>,
}

/// The address of one `RTM_NEWADDR`: `IFA_LOCAL` when present (IPv4 always, IPv6 with a
/// peer), else `IFA_ADDRESS`; with its prefix length.
pub(crate) fn address_of(message: AddressMessage) -> Option<(IpAddr, u8)> {
    let mut local = None;
    let mut address = None;
    for attribute in message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(ip),
            AddressAttribute::Address(ip) => address = Some(ip),
            _ => {}
        }
    }
    local.or(address).map(|ip| (ip, message.header.prefix_len))
}

/// Every address of every link but `except`, and `except`'s index.
///
/// Mirrors `ip -o addr show` with the lines of `dev except` left out. One link lookup and one
/// address dump; read again if a concurrent change interrupted it.
pub fn node_addresses(except: &str) -> Result<NodeAddresses, Error> {
    read(&mut Connection::open()?, except)
}

fn read(connection: &mut Connection, except: &str) -> Result<NodeAddresses, Error> {
    let command = || "ip addr show".to_owned();
    for _ in 0..DUMP_ATTEMPTS {
        let excluded_index = find_index(connection, except)?;
        let (answers, interrupted) = connection.dump(&request::get_addresses(0), &command)?;
        if interrupted {
            continue;
        }
        let addresses = answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewAddress(m) if Some(m.header.index) != excluded_index => {
                    address_of(m).map(|(ip, _)| ip)
                }
                _ => None,
            })
            .collect();
        return Ok(NodeAddresses {
            addresses,
            excluded_index,
        });
    }
    Err(Error::DumpInterrupted {
        name: "every link".to_owned(),
        attempts: DUMP_ATTEMPTS,
    })
}

/// Follows the node's addresses (all links but one) as the kernel changes them.
///
/// Blocking and `Send`, for a thread of its own. Mirrors `ip monitor link address` followed by
/// `ip -o addr show` after each burst of notifications.
#[derive(Debug)]
pub struct AddressMonitor {
    except: String,
    notifications: Socket,
    connection: Connection,
    last: Option<NodeAddresses>,
}

impl AddressMonitor {
    /// Joins the link and address groups; the first [`AddressMonitor::changed`] reads the
    /// addresses at once.
    pub fn open(except: &str) -> Result<Self, Error> {
        let socket_error = |what| move |source| Error::Socket { what, source };
        let mut notifications =
            Socket::new(NETLINK_ROUTE).map_err(socket_error("socket(AF_NETLINK)"))?;
        let groups = libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR;
        let groups = u32::try_from(groups).unwrap_or(u32::MAX);
        notifications
            .bind(&SocketAddr::new(0, groups))
            .map_err(socket_error("bind to the link and address groups"))?;
        Ok(Self {
            except: except.to_owned(),
            notifications,
            connection: Connection::open()?,
            last: None,
        })
    }

    /// Follows the addresses on a thread of its own: `on_change` gets them now, before this
    /// returns, and then each time they change, until it returns false. A failure to read
    /// them later is logged and ends the thread (the last addresses given stay in use).
    pub fn follow(
        except: &str,
        mut on_change: impl FnMut(NodeAddresses) -> bool + Send + 'static,
    ) -> Result<(), Error> {
        let mut monitor = Self::open(except)?;
        if !on_change(monitor.changed()?) {
            return Ok(());
        }
        std::thread::Builder::new()
            .name("address-monitor".into())
            .spawn(move || {
                loop {
                    match monitor.changed() {
                        Ok(addresses) => {
                            if !on_change(addresses) {
                                return;
                            }
                        }
                        Err(error) => {
                            tracing::error!(%error, "stopped following the node's addresses");
                            return;
                        }
                    }
                }
            })
            .map_err(|source| Error::Socket {
                what: "starting the address monitor's thread",
                source,
            })?;
        Ok(())
    }

    /// The addresses now, on the first call; after that, blocks until they differ from what
    /// the previous call returned and returns them. A change that leaves them as they were
    /// (an address added and removed again, a link that comes and goes without addresses)
    /// returns nothing.
    ///
    /// A dump that concurrent changes keep interrupting (the proxy binding thousands of
    /// addresses to its own link at start) is read again after a pause, growing to
    /// [`INTERRUPTED_PAUSE_MAX`], instead of failing: the changes are still to be seen.
    pub fn changed(&mut self) -> Result<NodeAddresses, Error> {
        let mut wait = self.last.is_some();
        let mut pause = INTERRUPTED_PAUSE;
        loop {
            if wait {
                self.wait()?;
            }
            let now = match read(&mut self.connection, &self.except) {
                Ok(now) => now,
                Err(Error::DumpInterrupted { .. }) => {
                    tracing::debug!(?pause, "address dump interrupted by changes; reading again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(INTERRUPTED_PAUSE_MAX);
                    wait = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if self.last.as_ref() != Some(&now) {
                self.last = Some(now.clone());
                return Ok(now);
            }
            wait = true;
        }
    }

    /// Waits for a notification (no bound: this is what the monitor's thread is for), then
    /// takes every one already queued, so a burst is read back once.
    fn wait(&mut self) -> Result<(), Error> {
        let mut buffer = Vec::with_capacity(NOTIFICATION_BUFFER);
        let mut flags = 0;
        loop {
            buffer.clear();
            match self.notifications.recv(&mut buffer, flags) {
                Ok(_) => flags = libc::MSG_DONTWAIT,
                // Notifications were lost: the addresses are read again, which is all a
                // notification would have made happen.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => flags = libc::MSG_DONTWAIT,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && flags != 0 => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Socket {
                        what: "receiving link and address notifications",
                        source,
                    });
                }
            }
        }
    }
}
