//! What can go wrong on the socket itself. The kernel refusing a request is not an error
//! here: it is a [`crate::Reply`] or [`crate::End`], for the caller to name.

use std::io;
use std::time::Duration;

/// The socket failed, the kernel went silent, or a reply could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening or using the netlink socket failed; `what` is the call that failed.
    #[error("netlink socket: {what}: {source}")]
    Socket {
        /// The system call or socket option.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The kernel did not answer within the socket's timeout.
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
    /// A message from the kernel could not be parsed.
    #[error("malformed netlink message: {0}")]
    Decode(String),
}

impl Error {
    /// A parse error.
    pub fn decode(what: impl Into<String>) -> Self {
        Error::Decode(what.into())
    }

    pub(crate) fn socket(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Socket { what, source }
    }
}
