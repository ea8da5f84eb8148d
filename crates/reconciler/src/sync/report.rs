//! What a sync did and what went wrong, attributed to a Service where one is to blame.

use std::fmt;

use crate::error::{Error, chain};
use crate::model::ServiceName;

/// Something that went wrong in a sync, attributed to a Service where one is to blame.
#[derive(Debug)]
pub struct SyncError {
    pub service: Option<ServiceName>,
    pub error: Error,
}

impl SyncError {
    #[must_use]
    pub fn new(service: Option<&ServiceName>, error: Error) -> SyncError {
        SyncError {
            service: service.cloned(),
            error,
        }
    }

    /// The IP family whose rules failed, when the error names one (the iptables proxier's
    /// restores are per family; the ipvs mode's netfilter restore is of every family at once).
    #[must_use]
    pub fn family(&self) -> Option<inet::Family> {
        match self.error {
            Error::IptablesRules { family, .. } => Some(family),
            _ => None,
        }
    }

    /// `ipvs`, `addresses`, `netfilter` or `iptables`: the metric's `backend` label.
    #[must_use]
    pub fn backend(&self) -> &'static str {
        match self.error {
            Error::ReadIpvs(_)
            | Error::ReadRealServers { .. }
            | Error::Ipvs(_)
            | Error::Conflict { .. } => "ipvs",
            Error::ListAddresses(_) | Error::Bind { .. } | Error::Unbind { .. } => "addresses",
            Error::RestoreNetfilter(_) | Error::UpdateSets(_) => "netfilter",
            Error::IptablesRules { .. } => "iptables",
        }
    }

    /// A short machine-readable kind, for metrics (`already_exists`, `scheduler_missing`, ...).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match &self.error {
            Error::ReadIpvs(e) | Error::ReadRealServers { source: e, .. } | Error::Ipvs(e) => {
                ipvs_error_kind(e)
            }
            Error::Conflict { .. } => "conflict",
            Error::ListAddresses(_) => "list",
            Error::Bind { .. } => "add",
            Error::Unbind { .. } => "remove",
            Error::RestoreNetfilter(_) | Error::UpdateSets(_) | Error::IptablesRules { .. } => {
                "restore"
            }
        }
    }
}

impl fmt::Display for SyncError {
    /// The error with its sources: `service default/odd: ...` when a Service is to blame.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(svc) = &self.service {
            write!(f, "service {svc}: ")?;
        }
        f.write_str(&chain(&self.error))
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub services: usize,
    pub ipvs_ops: usize,
    pub addresses_added: usize,
    pub addresses_removed: usize,
    pub set_entries_added: usize,
    pub set_entries_removed: usize,
    /// Real servers deleted after draining.
    pub drained: usize,
    pub errors: Vec<SyncError>,
    /// The iptables proxier's rules after the sync, per family and table (none from the
    /// ipvs proxier, as kube-proxy's exports them in iptables mode only).
    pub iptables_rules: Vec<IptablesRules>,
}

/// The rules of the iptables proxier's chains of one family and table: kube-proxy's
/// `sync_proxy_rules_iptables_total` (`total`, all of them) and `_last` (`written` by the
/// sync; ours writes only what changed, so a sync that changed nothing writes none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IptablesRules {
    pub family: inet::Family,
    /// `filter` or `nat`.
    pub table: &'static str,
    pub total: usize,
    pub written: usize,
}

impl SyncReport {
    /// Whether a backend failed as a whole (the kernel could not be read or written), so the
    /// mirror may be wrong anywhere and a full sync should follow. A Service the kernel refused
    /// is retried on its own instead.
    #[must_use]
    pub fn needs_full_sync(&self) -> bool {
        self.errors.iter().any(|e| e.service.is_none())
    }
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub virtual_servers: usize,
    pub real_servers: usize,
    pub draining: usize,
}

fn ipvs_error_kind(e: &ipvs::Error) -> &'static str {
    match e {
        ipvs::Error::NotAvailable => "not_available",
        ipvs::Error::PermissionDenied { .. } => "permission_denied",
        ipvs::Error::AlreadyExists { .. } => "already_exists",
        ipvs::Error::NoSuchService { .. } => "no_such_service",
        ipvs::Error::NoSuchDestination { .. } => "no_such_destination",
        ipvs::Error::SchedulerMissing { .. } => "scheduler_missing",
        ipvs::Error::InvalidArgument { .. } => "invalid_argument",
        ipvs::Error::Timeout(_) => "timeout",
        ipvs::Error::Unconfirmed { .. } => "unconfirmed",
        _ => "other",
    }
}
