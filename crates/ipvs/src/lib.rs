//! IPVS over generic netlink: the kernel's virtual servers and real servers, as `ipvsadm` sees them.
//!
//! This crate speaks the kernel's "IPVS" generic-netlink family (include/uapi/linux/ip_vs.h)
//! directly, pipelining many requests per `sendmsg`. It knows nothing of Kubernetes and must
//! never import Kubernetes types; it never touches links, addresses or netfilter.
#![forbid(unsafe_code)]

mod scheduler;

pub use scheduler::{Scheduler, UnknownScheduler};
