//! Netlink for the `ipvs` and `netif` crates: one framing and one pipelined send/receive engine.
//!
//! [`frame`] writes requests back to back into one buffer and walks the kernel's replies
//! without copying them: the netlink header, the generic-netlink header and attributes.
//! [`Socket`] is a blocking netlink socket that sends many requests per `sendmsg`, asks for an
//! acknowledgement only on the last one, and matches errors to requests by sequence number
//! ([`Socket::batch`]); it also runs single requests and dumps ([`Socket::request`]). Every
//! receive is bounded by the socket's timeout. [`genl`] resolves generic-netlink families.
//!
//! The crate knows no netlink family's messages: callers write and read their own payloads
//! (`ipvs` the IPVS generic-netlink family, `netif` rtnetlink through netlink-packet-route).
//! It never retries a request on its own and never waits without a bound.
//!
//! `unsafe` is denied except in `sys`, the socket options that `netlink-sys` lacks.
#![deny(unsafe_code)]

mod error;
pub mod frame;
pub mod genl;
mod socket;
mod sys;

pub use error::Error;
pub use frame::{Message, Writer};
pub use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};
pub use socket::{Answer, BatchError, End, Flow, Limits, Options, Reply, Socket};
