//! IPVS over generic netlink: the kernel's virtual servers and real servers, as `ipvsadm` sees them.
//!
//! This crate holds the kernel's "IPVS" generic-netlink family (include/uapi/linux/ip_vs.h):
//! its commands and attributes, written from and read into the types below. The socket, the
//! framing and the pipelining (many requests per `sendmsg`) are the shared `netlink` crate's.
//! It knows nothing of Kubernetes and must never import Kubernetes types; it never touches
//! links, addresses or netfilter.
//!
//! - [`VirtualServer`], [`RealServer`] and [`Op`] print as their `ipvsadm -Sn` lines and parse
//!   back from them ([`parse_rules`]).
//! - [`Handle`] is one socket in one network namespace: [`Handle::apply`] programs a batch and
//!   returns one result per op; [`Handle::dump`] reads the whole table back.
//! - [`wire`] writes and reads the same messages without a socket (tests, fuzzing).
//! - [`probe_until_known`] decides whether the node has IPVS: [`Absent`] only when the kernel
//!   says so for certain, other failures retried.
#![forbid(unsafe_code)]

mod codec;
mod config;
mod dest;
mod error;
mod handle;
mod op;
mod probe;
mod scheduler;
mod service;
mod stats;
mod text;

pub use codec::wire;
pub use config::{Info, Timeouts};
pub use dest::{Forwarding, RealServer, RealServerEntry, Tunnel, TunnelChecksum, TunnelType};
pub use error::Error;
pub use handle::{ConfigEntry, DEFAULT_TIMEOUT, DUMP_SOCKETS, Handle, TableEntry};
pub use op::Op;
pub use probe::{Absent, probe_until_known};
pub use scheduler::{Scheduler, UnknownScheduler};
pub use service::{
    Family, Persistence, Protocol, ServiceFlags, ServiceKey, VirtualServer, VirtualServerEntry,
};
pub use stats::{Connections, Stats};
pub use text::{ParseError, parse_rules};
