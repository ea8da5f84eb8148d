//! The kernel's connection tracking table over ctnetlink (`NETLINK_NETFILTER`, subsystem
//! `CTNETLINK`): what `conntrack -L` and `conntrack -D` do, without a process per entry.
//!
//! ```no_run
//! use conntrack::Conntrack;
//! use inet::{Family, Protocol};
//!
//! # fn main() -> Result<(), conntrack::Error> {
//! let mut table = Conntrack::open()?;
//! let flows = table.dump(Family::V4, Protocol::Udp)?; // conntrack -L -f ipv4 -p udp
//! let stale: Vec<_> = flows.into_iter().filter(|f| f.reply.src_port == 5353).collect();
//! let deleted = table.delete(&stale)?; // conntrack -D for each, in pipelined batches
//! # let _ = deleted;
//! # Ok(())
//! # }
//! ```
//!
//! A dump is filtered by the kernel (family from the request header, protocol through
//! `CTA_FILTER`, kernel 5.8 and later) and again here, so an older kernel that ignores the
//! filter costs decoding time, not correctness. Deletes name each entry by its original tuple,
//! zone and id: an entry that ended meanwhile, or was replaced by another with the same tuple,
//! is not touched (the kernel answers `ENOENT`, which counts as "already gone").
//!
//! [`decode`] is pure over the bytes of one message and never panics, whatever the bytes.
//! The crate knows nothing of Kubernetes and deletes only what it is given.
#![deny(unsafe_code)]

mod error;
mod message;
mod table;

pub use error::Error;
pub use message::{Flow, Tuple, decode, encode_delete, encode_dump};
pub use table::{Conntrack, Deleted};
