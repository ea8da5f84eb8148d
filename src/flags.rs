//! Command-line flags, named and defaulted as kube-proxy names and defaults them.
//!
//! Every flag is optional here so that a `--config` file can fill what the command line leaves
//! out; [`crate::config::ProxyConfig`] resolves the defaults.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

/// Top-level command line: `ipvs-proxy [FLAGS]` runs the daemon, `ipvs-proxy plan` prints what
/// it would program.
#[derive(Debug, Parser)]
#[command(
    name = "ipvs-proxy",
    version,
    about = "A Kubernetes service proxy that programs the kernel's IPVS load balancer",
    args_conflicts_with_subcommands = true,
    // pflag's rule: a flag given twice takes its last value.
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub flags: ProxyFlags,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compute the desired kernel state from a source and print it in the kernel tools' own
    /// formats (`ipvsadm -Sn`, `ipset save`, `iptables-save`), without touching the kernel.
    Plan(PlanArgs),
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Print one section only, without its header.
    #[arg(long, value_enum)]
    pub only: Option<PlanSection>,

    #[command(flatten)]
    pub flags: ProxyFlags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanSection {
    Ipvs,
    Addresses,
    Ipsets,
    Iptables,
}

/// Which proxier programs the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// IPVS virtual servers, with a small iptables and ipset set beside them.
    Ipvs,
    /// kube-proxy's iptables rules only (also the fallback when IPVS is missing).
    Iptables,
}

/// What to do in ipvs mode when the kernel has no usable IPVS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum IpvsFallback {
    /// Run kube-proxy's iptables proxier instead, and say why in the log.
    #[default]
    Iptables,
    /// Exit with an error.
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The daemon's flags, with kube-proxy's names. `None` means "not given on the command line".
#[derive(Debug, Clone, Default, Args)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "one field per boolean flag kube-proxy has"
)]
pub struct ProxyFlags {
    /// Which proxy mode to use: ipvs or iptables. [default: ipvs]
    #[arg(long, value_enum, value_name = "MODE")]
    pub proxy_mode: Option<ProxyMode>,

    /// In ipvs mode, when IPVS is unavailable: run the iptables proxier, or exit.
    /// [default: iptables]
    #[arg(long, value_enum, value_name = "WHAT")]
    pub ipvs_fallback: Option<IpvsFallback>,

    /// Path to a kubeconfig file with authorization information.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// The address of the Kubernetes API server (overrides any value in kubeconfig).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,

    /// The name of this node, used instead of the host name to find its Node object.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// The CIDR ranges of pods in the cluster (comma-separated, one per family); traffic from
    /// outside them to a Service IP is masqueraded.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub cluster_cidr: Option<Vec<IpNet>>,

    /// The IPVS scheduler for Services that do not name one. [default: rr]
    #[arg(long, value_name = "NAME", value_parser = parse_scheduler)]
    pub ipvs_scheduler: Option<ipvs::Scheduler>,

    /// The maximum interval between full resyncs that re-read the kernel (e.g. 30s, 2h22m).
    /// [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_sync_period: Option<Duration>,

    /// The minimum interval between syncs; changes arriving faster are coalesced. [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_min_sync_period: Option<Duration>,

    /// CIDRs whose virtual servers the proxy must leave alone on cleanup and resync
    /// (comma-separated).
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub ipvs_exclude_cidrs: Option<Vec<IpNet>>,

    /// Set arp_ignore=1 and arp_announce=2 so the node does not answer ARP for Service IPs.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ipvs_strict_arp: Option<bool>,

    /// The timeout for idle IPVS TCP sessions; 0s leaves the kernel's value. [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_tcp_timeout: Option<Duration>,

    /// The timeout for IPVS TCP sessions after a FIN; 0s leaves the kernel's value. [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_tcpfin_timeout: Option<Duration>,

    /// The timeout for IPVS UDP packets; 0s leaves the kernel's value. [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_udp_timeout: Option<Duration>,

    /// Masquerade (SNAT) all traffic sent to Service IPs.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,

    /// The bit of the packet mark (0..=31) that marks traffic for masquerading. [default: 14]
    #[arg(long, value_name = "BIT", value_parser = clap::value_parser!(u8).range(0..=31))]
    pub masquerade_bit: Option<u8>,

    /// The addresses NodePorts are served on: CIDRs (comma-separated), "primary" or "all".
    /// [default: every node address]
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_nodeport_address)]
    pub nodeport_addresses: Option<Vec<NodePortAddress>>,

    /// Where /healthz and /livez are served. [default: 0.0.0.0:10256]
    #[arg(long, value_name = "ADDR", value_parser = parse_bind_address)]
    pub healthz_bind_address: Option<SocketAddr>,

    /// Where /metrics is served. [default: 127.0.0.1:10249]
    #[arg(long, value_name = "ADDR", value_parser = parse_bind_address)]
    pub metrics_bind_address: Option<SocketAddr>,

    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1); flags override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Remove everything the proxy programmed (and nothing else), then exit.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cleanup: Option<bool>,

    /// Log verbosity, as kube-proxy's: 0 info, 2 sync summaries, 4 debug, 5 and up trace.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub verbosity: Option<u8>,

    /// Log as human-readable text or as one JSON object per line. [default: text]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Read Services, EndpointSlices and Nodes from this directory of manifests instead of a
    /// Kubernetes API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// This node's addresses (repeatable), used for NodePorts instead of the Node object's.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<IpAddr>,
}

/// A `--nodeport-addresses` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    /// Node addresses inside this range.
    Cidr(IpNet),
    /// The node's primary address of each family (`primary`).
    Primary,
    /// Every node address (`all`, the default when the list is empty).
    All,
}

/// Parses a Go-style duration as kube-proxy's flags take it: `30s`, `1m0s`, `2h22m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}); use e.g. 30s, 1m, 2h22m"))
}

pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| format!("invalid CIDR {s:?}; use e.g. 10.244.0.0/16 or fd00::/64"))
}

pub fn parse_nodeport_address(s: &str) -> Result<NodePortAddress, String> {
    match s.trim() {
        "primary" => Ok(NodePortAddress::Primary),
        "all" => Ok(NodePortAddress::All),
        "localhost" => Err("\"localhost\" NodePorts are only served by kube-proxy's iptables mode (IPv4); IPVS cannot serve them".to_owned()),
        other => parse_cidr(other).map(NodePortAddress::Cidr),
    }
}

pub fn parse_scheduler(s: &str) -> Result<ipvs::Scheduler, String> {
    s.parse().map_err(|e: ipvs::UnknownScheduler| e.to_string())
}

pub fn parse_bind_address(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
        .map_err(|_| format!("invalid bind address {s:?}; use IP:PORT, e.g. 0.0.0.0:10256"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ipvs-proxy").chain(args.iter().copied()))
    }

    #[test]
    fn kube_proxy_flags_are_accepted() {
        let cli = parse(&[
            "--proxy-mode=ipvs",
            "--ipvs-scheduler=sh",
            "--ipvs-sync-period=1m0s",
            "--ipvs-min-sync-period",
            "2s",
            "--ipvs-strict-arp",
            "--masquerade-all=false",
            "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
            "--nodeport-addresses=primary,192.168.0.0/16",
            "-v=4",
        ])
        .unwrap();
        let f = cli.flags;
        assert_eq!(f.proxy_mode, Some(ProxyMode::Ipvs));
        assert_eq!(f.ipvs_scheduler, Some(ipvs::Scheduler::SourceHashing));
        assert_eq!(f.ipvs_sync_period, Some(Duration::from_secs(60)));
        assert_eq!(f.ipvs_min_sync_period, Some(Duration::from_secs(2)));
        assert_eq!(f.ipvs_strict_arp, Some(true));
        assert_eq!(f.masquerade_all, Some(false));
        assert_eq!(f.cluster_cidr.unwrap().len(), 2);
        assert_eq!(f.nodeport_addresses.unwrap()[0], NodePortAddress::Primary);
        assert_eq!(f.verbosity, Some(4));
    }

    #[test]
    fn a_flag_given_twice_takes_its_last_value_as_kube_proxys_flags_do() {
        let cli = parse(&[
            "--metrics-bind-address=127.0.0.1:0",
            "--metrics-bind-address",
            "127.0.0.1:10349",
        ])
        .unwrap();
        assert_eq!(cli.flags.metrics_bind_address.unwrap().port(), 10349);
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        for (args, flag, value) in [
            (
                &["--ipvs-sync-period=soon"][..],
                "--ipvs-sync-period",
                "soon",
            ),
            (
                &["--cluster-cidr=10.0.0.0/33"][..],
                "--cluster-cidr",
                "10.0.0.0/33",
            ),
            (
                &["--ipvs-scheduler=fastest"][..],
                "--ipvs-scheduler",
                "fastest",
            ),
            (&["--masquerade-bit=32"][..], "--masquerade-bit", "32"),
            (&["--proxy-mode=userspace"][..], "--proxy-mode", "userspace"),
        ] {
            let msg = parse(args).unwrap_err().to_string();
            assert!(msg.contains(flag) && msg.contains(value), "{args:?}: {msg}");
        }
    }

    #[test]
    fn plan_takes_the_daemon_flags() {
        let cli = parse(&[
            "plan",
            "--manifests",
            "manifests/examples",
            "--only",
            "ipvs",
            "--node-ip",
            "192.168.1.10",
        ])
        .unwrap();
        let Some(Command::Plan(plan)) = cli.command else {
            panic!("not plan")
        };
        assert_eq!(plan.only, Some(PlanSection::Ipvs));
        assert_eq!(plan.flags.node_ips.len(), 1);
    }
}
