//! Errors: one for the link and the socket, one per address that the kernel refused.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

/// Adding or removing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddressOp {
    /// `ip addr add`
    Add,
    /// `ip addr del`
    Remove,
}

impl AddressOp {
    /// The `ip addr` verb.
    #[must_use]
    pub fn verb(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Remove => "del",
        }
    }
}

/// A failure that stops a whole call: the socket, the link, or a reply that cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening or using the rtnetlink socket failed.
    #[error("rtnetlink socket: {what}: {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel did not answer in time.
    #[error("rtnetlink: no answer from the kernel to `{command}` within {after:?}")]
    Timeout { command: String, after: Duration },
    /// The kernel refused a link request; `command` is the `ip` command it mirrors.
    #[error("`{command}` failed: {source}")]
    Kernel {
        command: String,
        #[source]
        source: io::Error,
    },
    /// A link of this name exists but is not a dummy; it was left untouched.
    #[error("link {name} exists but is a {kind} link, not a dummy; leaving it untouched")]
    NotDummy { name: String, kind: String },
    /// The kernel has no dummy link type (`CONFIG_DUMMY` unset or the module cannot load).
    #[error(
        "`ip link add {name} type dummy` failed: this kernel has no dummy link type (module `dummy`)"
    )]
    DummyUnsupported { name: String },
    /// The link went away (or was replaced) while this handle held its index.
    #[error("link {name} (index {index}) no longer exists; ensure it again")]
    LinkGone { name: String, index: u32 },
    /// Not a valid interface name (1 to 15 bytes, no `/`, `:` or whitespace).
    #[error("invalid link name {0:?}")]
    InvalidName(String),
    /// A reply from the kernel could not be parsed.
    #[error("rtnetlink: cannot parse the kernel's reply to `{command}`: {reason}")]
    Decode { command: String, reason: String },
    /// An address dump kept being interrupted by concurrent changes.
    #[error(
        "rtnetlink: the address dump of {name} was interrupted {attempts} times by concurrent changes"
    )]
    DumpInterrupted { name: String, attempts: u32 },
}

/// One address that could not be added or removed. The batch it was part of went on.
#[derive(Debug, thiserror::Error)]
#[error("`ip addr {verb} {address}/{prefix} dev {link}` failed: {source}", verb = op.verb())]
pub struct AddressError {
    /// The address that failed.
    pub address: IpAddr,
    /// Its prefix length (32 or 128 for the addresses this crate adds).
    pub prefix: u8,
    /// Whether it was being added or removed.
    pub op: AddressOp,
    /// The link's name, for the message.
    pub link: String,
    /// The kernel's errno, or `TimedOut` when its answer was lost (receive queue overrun).
    #[source]
    pub source: io::Error,
}

impl AddressError {
    /// The kernel's errno, when the kernel gave one.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}
