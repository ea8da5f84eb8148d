//! What can go wrong with the conntrack table: the socket, a silent kernel, an unreadable
//! reply, or a refused request, each named by the `conntrack` command it mirrors.

use std::io;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening or using the ctnetlink socket failed.
    #[error("ctnetlink socket: {what}: {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel did not answer in time.
    #[error("ctnetlink: no answer from the kernel to `{command}` within {after:?}")]
    Timeout { command: String, after: Duration },
    /// A reply could not be parsed.
    #[error("ctnetlink: cannot parse the kernel's reply to `{command}`: {reason}")]
    Decode { command: String, reason: String },
    /// The kernel refused the request.
    #[error("`{command}` failed: {source}")]
    Kernel {
        command: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The engine's failure, named by the command that was running.
    pub(crate) fn engine(error: netlink::Error, command: &str) -> Error {
        match error {
            netlink::Error::Socket { what, source } => Error::Socket { what, source },
            netlink::Error::Timeout(after) => Error::Timeout {
                command: command.to_owned(),
                after,
            },
            netlink::Error::Decode(reason) => Error::Decode {
                command: command.to_owned(),
                reason,
            },
            other => Error::Socket {
                what: "netlink",
                source: io::Error::other(other.to_string()),
            },
        }
    }
}
