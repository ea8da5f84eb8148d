//! `ipvs-proxy --cleanup`: remove exactly what the proxy programmed, and nothing else.
//!
//! kube-proxy's cleanup flushes every IPVS service on the node; ours deletes only the virtual
//! servers that are the proxy's: those on an address bound to `kube-ipvs0`, and NodePort ones
//! (a protocol and port listed in the proxy's `KUBE-NODE-PORT-*` sets, on a node address). Then
//! `kube-ipvs0` itself, then the `KUBE-*` chains and sets of both iptables flavours. Virtual
//! servers inside `--ipvs-exclude-cidrs` are kept. Running it twice is harmless.

use std::collections::BTreeSet;
use std::net::IpAddr;

use iptables::Runner;
use iptables::ipvs_mode::node_ports;
use ipvs::{Op, ServiceKey};

use crate::config::ProxyConfig;

/// What was removed, and what failed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub virtual_servers: usize,
    pub link_deleted: bool,
    pub chains: usize,
    pub sets: usize,
    pub errors: Vec<String>,
}

/// Removes what the proxy owns. Steps that fail are reported; the others still run.
#[must_use]
pub fn cleanup(config: &ProxyConfig) -> CleanupReport {
    let mut report = CleanupReport::default();
    let runner = Runner::new(iptables::Flavour::Nft);
    let excluded = |ip: IpAddr| config.exclude_cidrs.iter().any(|n| n.contains(&ip));

    let link = match netif::DummyLink::open(netif::KUBE_IPVS0) {
        Ok(link) => link,
        Err(e) => {
            report.errors.push(format!("{}: {e}", netif::KUBE_IPVS0));
            None
        }
    };
    let mut bound = BTreeSet::new();
    if let Some(mut link) = link {
        match link.addresses() {
            Ok(addrs) => bound = addrs,
            Err(e) => report
                .errors
                .push(format!("listing {} addresses: {e}", netif::KUBE_IPVS0)),
        }
    }

    match ipvs::Handle::new() {
        Ok(mut handle) => {
            let node_ports = node_ports(&runner.ipset_save().unwrap_or_default());
            match handle.services() {
                Ok(services) => {
                    let ours: Vec<Op> = services
                        .into_iter()
                        .filter_map(|s| match s.server.key {
                            ServiceKey::Addr { protocol, addr } => {
                                let ip = addr.ip();
                                let on_link = bound.contains(&ip);
                                let node_port = node_ports.contains(&(protocol, addr.port()));
                                ((on_link || node_port) && !excluded(ip))
                                    .then_some(Op::DeleteService(s.server.key))
                            }
                            ServiceKey::Fwmark { .. } => None,
                        })
                        .collect();
                    for (op, result) in ours.iter().zip(handle.apply(&ours)) {
                        match result {
                            Ok(()) => report.virtual_servers += 1,
                            Err(ipvs::Error::NoSuchService { .. }) => {}
                            Err(e) => report.errors.push(format!("{op}: {e}")),
                        }
                    }
                }
                Err(e) => report.errors.push(format!("listing IPVS services: {e}")),
            }
        }
        Err(ipvs::Error::NotAvailable) => {}
        Err(e) => report.errors.push(format!("IPVS: {e}")),
    }

    match netif::DummyLink::delete(netif::KUBE_IPVS0) {
        Ok(deleted) => report.link_deleted = deleted,
        Err(netif::Error::DummyUnsupported { .. }) => {}
        Err(e) => report
            .errors
            .push(format!("deleting {}: {e}", netif::KUBE_IPVS0)),
    }

    let netfilter = iptables::cleanup(&runner);
    report.chains = netfilter.chains;
    report.sets = netfilter.sets;
    report
        .errors
        .extend(netfilter.errors.iter().map(ToString::to_string));
    report
}
