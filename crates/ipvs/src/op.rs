//! One change to the kernel's table, as [`crate::Handle::apply`] takes them.

use crate::dest::{DestLine, RealServer};
use crate::service::{ServiceKey, ServiceOptions, VirtualServer};
use std::fmt;
use std::net::SocketAddr;

/// One change, mirroring one `ipvsadm` command. Prints as that command's line, which
/// `ipvsadm -R` accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// `ipvsadm -A`: create a virtual server.
    AddService(VirtualServer),
    /// `ipvsadm -E`: change a virtual server's scheduler, persistence or flags.
    UpdateService(VirtualServer),
    /// `ipvsadm -D`: delete a virtual server and its real servers.
    DeleteService(ServiceKey),
    /// `ipvsadm -a`: add a real server to a virtual server.
    AddDest(ServiceKey, RealServer),
    /// `ipvsadm -e`: change a real server's forwarding, weight or thresholds.
    UpdateDest(ServiceKey, RealServer),
    /// `ipvsadm -d`: remove a real server (its connections stay until they expire).
    DeleteDest(ServiceKey, SocketAddr),
}

impl Op {
    /// The virtual server it touches.
    #[must_use]
    pub fn service(&self) -> &ServiceKey {
        match self {
            Op::AddService(vs) | Op::UpdateService(vs) => &vs.key,
            Op::DeleteService(key)
            | Op::AddDest(key, _)
            | Op::UpdateDest(key, _)
            | Op::DeleteDest(key, _) => key,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddService(vs) => write!(f, "{vs}"),
            Op::UpdateService(vs) => write!(f, "-E {} {}", vs.key, ServiceOptions(vs)),
            Op::DeleteService(key) => write!(f, "-D {key}"),
            Op::AddDest(key, rs) => DestLine {
                cmd: "-a",
                service: key,
                dest: rs,
            }
            .fmt(f),
            Op::UpdateDest(key, rs) => DestLine {
                cmd: "-e",
                service: key,
                dest: rs,
            }
            .fmt(f),
            Op::DeleteDest(key, addr) => write!(f, "-d {key} -r {addr}"),
        }
    }
}
