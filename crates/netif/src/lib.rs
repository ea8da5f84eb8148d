//! The dummy link `kube-ipvs0` and the service addresses bound to it, over rtnetlink; and the
//! kernel's network settings the proxy makes ([`sysctl`]).
//!
//! IPVS only sees packets addressed to the node itself, so every Service VIP is bound to a
//! dummy link. This crate owns that one link; it must never change any other link or any
//! address on another link, and it knows nothing of Kubernetes. It also reads, and follows,
//! the node's addresses on every other link ([`node_addresses`], [`AddressMonitor`]): where
//! NodePorts are served.
//!
//! ```no_run
//! use std::collections::BTreeSet;
//! use netif::{DummyLink, KUBE_IPVS0};
//!
//! # fn main() -> Result<(), netif::Error> {
//! let mut link = DummyLink::ensure(KUBE_IPVS0)?; // ip link add kube-ipvs0 type dummy
//! let desired: BTreeSet<_> = ["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()].into();
//! let report = link.sync(&desired)?; // ip addr add/del .../32 dev kube-ipvs0, in batches
//! assert!(report.is_complete());
//! link.remove(&["10.96.0.10".parse().unwrap()])?; // one Service gone: no re-listing
//! # Ok(())
//! # }
//! ```
//!
//! Requests are pipelined: hundreds of `RTM_NEWADDR`/`RTM_DELADDR` leave in one `sendmsg`,
//! answers are read back in bulk and matched by sequence number, by the shared `netlink`
//! crate's engine; this crate keeps only the rtnetlink messages (through
//! netlink-packet-route) and what they mean for the link. The API is blocking and the handle
//! is `Send`, for a dedicated kernel thread. The socket (and so the link) belongs to the
//! network namespace of the thread that opened the handle.
//!
//! `unsafe` is denied; only the host kernel tests allow it, for `unshare(2)`.
#![deny(unsafe_code)]

mod address;
mod connection;
mod error;
#[cfg(test)]
mod host_kernel_tests;
mod link;
mod local;
mod request;
pub mod sysctl;

pub use address::{AddressResult, Outcome, SyncReport, host_prefix, read_address_dump};
pub use error::{AddressError, AddressOp, Error};
pub use link::{DummyLink, KUBE_IPVS0};
pub use local::{AddressMonitor, NodeAddresses, node_addresses};
