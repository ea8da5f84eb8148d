//! kube-proxy's start-up check, done for real: the "IPVS" family resolves, and a virtual server
//! with the configured scheduler can be added and deleted (which also loads the scheduler's
//! module). The probe is a firewall-mark service, so no address is ever claimed.

use crate::{Error, Family, Handle, Scheduler, ServiceKey, VirtualServer};

/// Firewall marks the probe may use, highest first: far from any a user or kube-proxy sets.
const PROBE_MARKS: std::ops::Range<u32> = 0x7fff_ff00..0x7fff_ff10;

impl Handle {
    /// A handle in this network namespace, once a probe virtual server with `scheduler` was
    /// added and deleted (`ipvsadm -A -f MARK -s SCHED`, then `-D`). A mark already in use is
    /// skipped; if all are, the last refusal is returned.
    pub fn probe(scheduler: Scheduler) -> Result<Handle, Error> {
        let mut handle = Handle::new()?;
        let mut refused = Error::NotAvailable;
        for mark in PROBE_MARKS.rev() {
            let probe = VirtualServer::new(
                ServiceKey::Fwmark {
                    family: Family::V4,
                    mark,
                },
                scheduler,
            );
            match handle.add_service(&probe) {
                Ok(()) => {
                    if let Err(e) = handle.delete_service(&probe.key) {
                        tracing::warn!(error = %e, "deleting the IPVS probe service");
                    }
                    return Ok(handle);
                }
                Err(e @ Error::AlreadyExists { .. }) => refused = e,
                Err(e) => return Err(e),
            }
        }
        Err(refused)
    }
}
