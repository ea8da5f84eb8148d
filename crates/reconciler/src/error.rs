//! What can go wrong programming the kernel, with the backend's own error as the source.

use std::net::IpAddr;

use iptables::Family;
use ipvs::ServiceKey;

use crate::model::ServiceName;

/// An error from a backend other than IPVS, boxed: the engine only reports it.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// One failure of a sync. [`crate::sync::SyncError`] adds the Service to blame, if any.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The IPVS table could not be read (`ipvsadm -Ln`).
    #[error("reading the IPVS table")]
    ReadIpvs(#[source] ipvs::Error),
    /// The real servers of one virtual server could not be read.
    #[error("reading real servers of {key}")]
    ReadRealServers {
        key: ServiceKey,
        #[source]
        source: ipvs::Error,
    },
    /// The kernel refused an IPVS operation.
    #[error(transparent)]
    Ipvs(ipvs::Error),
    /// Two Services want one virtual server; the first keeps it.
    #[error("virtual server {key} is already used by service {owner}")]
    Conflict { key: ServiceKey, owner: ServiceName },
    /// `kube-ipvs0`'s addresses could not be listed.
    #[error("listing kube-ipvs0 addresses")]
    ListAddresses(#[source] BackendError),
    #[error("binding {ip} to kube-ipvs0")]
    Bind {
        ip: IpAddr,
        #[source]
        source: BackendError,
    },
    #[error("unbinding {ip} from kube-ipvs0")]
    Unbind {
        ip: IpAddr,
        #[source]
        source: BackendError,
    },
    /// A full sync's ipset refill or rule rewrite failed.
    #[error("restoring ipsets and iptables rules")]
    RestoreNetfilter(#[source] BackendError),
    /// A partial sync's ipset update failed.
    #[error("updating ipsets")]
    UpdateSets(#[source] BackendError),
    /// The iptables proxier's restore of one family failed.
    #[error("{family:?} rules")]
    IptablesRules {
        family: Family,
        #[source]
        source: iptables::Error,
    },
}

/// `error` and its sources, each after a colon: `binding 10.96.0.10 to kube-ipvs0: File exists`.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        // A transparent wrapper repeats its inner error; say it once.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}
