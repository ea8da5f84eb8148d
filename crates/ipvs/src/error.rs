//! What can go wrong, named for the object it happened to and what the kernel meant.

use std::io;
use std::time::Duration;

/// An IPVS operation failed.
///
/// `object` fields hold the `ipvsadm` line of the operation that failed (for example
/// `-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1`), so a log line says exactly what to retry
/// by hand.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel has no "IPVS" generic-netlink family: `ip_vs` is not built or not loaded.
    #[error(
        "IPVS is not available: the kernel has no \"IPVS\" generic netlink family (is the ip_vs module loaded?)"
    )]
    NotAvailable,
    /// The caller lacks CAP_NET_ADMIN in the initial user namespace (EPERM).
    #[error("{object}: permission denied (IPVS needs CAP_NET_ADMIN in the initial user namespace)")]
    PermissionDenied {
        /// The operation, as an `ipvsadm` line.
        object: String,
    },
    /// The virtual or real server already exists (EEXIST).
    #[error("{object}: already exists")]
    AlreadyExists {
        /// The operation, as an `ipvsadm` line.
        object: String,
    },
    /// The virtual server does not exist (ESRCH).
    #[error("{object}: no such virtual server")]
    NoSuchService {
        /// The operation, as an `ipvsadm` line.
        object: String,
    },
    /// The real server does not exist in that virtual server (ENOENT on a destination).
    #[error("{object}: no such real server")]
    NoSuchDestination {
        /// The operation, as an `ipvsadm` line.
        object: String,
    },
    /// The kernel could not find the scheduler (ENOENT on a new or edited virtual server): its
    /// module `ip_vs_<name>` is missing.
    #[error(
        "{object}: scheduler {scheduler:?} not found (is the kernel module ip_vs_{scheduler} available?)"
    )]
    SchedulerMissing {
        /// The operation, as an `ipvsadm` line.
        object: String,
        /// The scheduler's name.
        scheduler: String,
    },
    /// The kernel rejected the request's values (EINVAL): for example a real server whose family
    /// differs from its masqueraded service's, or an IPv4 real server address that is not unicast.
    #[error("{object}: invalid argument")]
    InvalidArgument {
        /// The operation, as an `ipvsadm` line.
        object: String,
    },
    /// Any other error number from the kernel.
    #[error("{object}: {source}")]
    Kernel {
        /// The operation, as an `ipvsadm` line.
        object: String,
        /// The kernel's error number.
        #[source]
        source: io::Error,
    },
    /// The operation was sent but its outcome is unknown: the socket failed before the kernel's
    /// answer arrived. The socket has been dropped; the next call opens a new one.
    #[error("{object}: outcome unknown, the netlink socket failed before the kernel answered")]
    Unconfirmed {
        /// The operation, as an `ipvsadm` line.
        object: String,
    },
    /// The kernel did not answer within the handle's timeout. The socket has been dropped.
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
    /// The netlink socket itself failed (open, send, receive).
    #[error("netlink socket: {0}")]
    Io(#[source] io::Error),
    /// A message from the kernel could not be parsed.
    #[error("malformed IPVS netlink message: {0}")]
    Decode(String),
}

/// The shared netlink engine's failures, as this crate has always named them.
impl From<netlink::Error> for Error {
    fn from(err: netlink::Error) -> Self {
        match err {
            netlink::Error::Socket { source, .. } => Error::Io(source),
            netlink::Error::Timeout(after) => Error::Timeout(after),
            netlink::Error::Decode(what) => Error::Decode(what),
            other => Error::Io(io::Error::other(other.to_string())),
        }
    }
}

/// Which kind of object an errno refers to; ENOENT means different things for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Creating or editing a virtual server (ENOENT: scheduler or persistence engine missing).
    NewService,
    /// Deleting or reading a virtual server.
    Service,
    /// A real server.
    Destination,
    /// Anything else (config, info, flush).
    Other,
}

impl Error {
    pub(crate) fn decode(what: impl Into<String>) -> Self {
        Error::Decode(what.into())
    }

    /// Maps a kernel error number to the typed error for `object`.
    pub(crate) fn from_errno(
        errno: i32,
        target: Target,
        object: String,
        scheduler: Option<&str>,
    ) -> Self {
        match (errno, target) {
            (libc::EPERM, _) => Error::PermissionDenied { object },
            (libc::EEXIST, _) => Error::AlreadyExists { object },
            (libc::ESRCH, _) => Error::NoSuchService { object },
            (libc::ENOENT, Target::Destination) => Error::NoSuchDestination { object },
            (libc::ENOENT, Target::NewService) => Error::SchedulerMissing {
                object,
                scheduler: scheduler.unwrap_or_default().to_owned(),
            },
            (libc::EINVAL, _) => Error::InvalidArgument { object },
            _ => Error::Kernel {
                object,
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }

    /// The kernel's error number, where the error came from the kernel.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::PermissionDenied { .. } => Some(libc::EPERM),
            Error::AlreadyExists { .. } => Some(libc::EEXIST),
            Error::NoSuchService { .. } => Some(libc::ESRCH),
            Error::NoSuchDestination { .. } | Error::SchedulerMissing { .. } => Some(libc::ENOENT),
            Error::InvalidArgument { .. } => Some(libc::EINVAL),
            Error::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enoent_means_what_the_target_makes_it_mean() {
        let obj = || "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1".to_owned();
        assert!(matches!(
            Error::from_errno(libc::ENOENT, Target::Destination, obj(), None),
            Error::NoSuchDestination { .. }
        ));
        let err = Error::from_errno(
            libc::ENOENT,
            Target::NewService,
            "-A -t 10.96.0.10:80 -s foo".into(),
            Some("foo"),
        );
        assert!(matches!(err, Error::SchedulerMissing { ref scheduler, .. } if scheduler == "foo"));
        assert!(err.to_string().contains("ip_vs_foo"), "{err}");
        assert!(matches!(
            Error::from_errno(libc::ESRCH, Target::Service, obj(), None),
            Error::NoSuchService { .. }
        ));
        assert!(matches!(
            Error::from_errno(libc::EEXIST, Target::Destination, obj(), None),
            Error::AlreadyExists { .. }
        ));
        let other = Error::from_errno(libc::ENOMEM, Target::Other, obj(), None);
        assert_eq!(other.errno(), Some(libc::ENOMEM));
        assert!(
            other.to_string().starts_with("-a -t 10.96.0.10:80"),
            "{other}"
        );
    }
}
