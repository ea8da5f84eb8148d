//! Command-line flags, named and defaulted as kube-proxy names and defaults them.
//!
//! Every flag is optional here so that a `--config` file can fill what the command line leaves
//! out; [`crate::config::ProxyConfig`] resolves the defaults.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use reconciler::render::Section;

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
    /// Compare the live kernel (IPVS, kube-ipvs0, the KUBE-* ipsets and the ipvs mode's chains)
    /// with what the source asks for; print what differs as `+ LINE` (missing) and `- LINE`
    /// (extra, the proxy's) in the tools' formats. Exit 0 when equal, 1 when not, 2 on error.
    /// IPVS mode only (not the iptables proxier's rules).
    Check(PlanArgs),
}

impl Command {
    /// The source flags every subcommand takes.
    #[must_use]
    pub fn args(&self) -> &PlanArgs {
        match self {
            Command::Plan(args) | Command::Check(args) => args,
        }
    }
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

impl PlanSection {
    /// The section of the plan it names.
    #[must_use]
    pub fn section(self) -> Section {
        match self {
            PlanSection::Ipvs => Section::Ipvs,
            PlanSection::Addresses => Section::Addresses,
            PlanSection::Ipsets => Section::Ipsets,
            PlanSection::Iptables => Section::Iptables,
        }
    }
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

/// How kube-proxy tells traffic from local pods apart (`--detect-local-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectLocalMode {
    /// Local traffic comes from `--cluster-cidr` (kube-proxy's default).
    #[default]
    ClusterCidr,
    /// Local traffic comes from the Node's `podCIDRs`.
    NodeCidr,
    /// Local traffic comes in on `--pod-bridge-interface`.
    BridgeInterface,
    /// Local traffic comes in on interfaces named `--pod-interface-name-prefix`*.
    InterfaceNamePrefix,
}

impl DetectLocalMode {
    /// kube-proxy's name for the mode.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            DetectLocalMode::ClusterCidr => "ClusterCIDR",
            DetectLocalMode::NodeCidr => "NodeCIDR",
            DetectLocalMode::BridgeInterface => "BridgeInterface",
            DetectLocalMode::InterfaceNamePrefix => "InterfaceNamePrefix",
        }
    }
}

/// An `IP[:PORT]` listen address; without a port the server's default port applies, as
/// kube-proxy appends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAddress {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl BindAddress {
    /// The socket address, `port` filling in a missing one.
    #[must_use]
    pub fn or_port(self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(port))
    }
}

/// The daemon's flags, with kube-proxy's names, types and meanings. `None` means "not given on
/// the command line". Flags of kube-proxy whose effect ipvs-proxy does not implement are
/// accepted and logged at start as not acted on.
#[derive(Debug, Clone, Default, Args)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "one field per boolean flag kube-proxy has"
)]
pub struct ProxyFlags {
    /// The path to the configuration file (a KubeProxyConfiguration,
    /// kubeproxy.config.k8s.io/v1alpha1). When given, it replaces every other flag except the
    /// logging flags, --hostname-override, --master and ipvs-proxy's own flags.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// If set, write the default configuration values (with the flags given) to this file and
    /// exit.
    #[arg(long, value_name = "PATH")]
    pub write_config_to: Option<PathBuf>,

    /// If true cleanup iptables and ipvs rules and exit. (ipvs-proxy removes only what it
    /// programmed.)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cleanup: Option<bool>,

    /// If true, perform any initialization steps that must be done with full root privileges
    /// (the sysctls), and then exit.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub init_only: Option<bool>,

    /// A set of key=value pairs that describe feature gates for alpha/experimental features.
    /// Accepted and kept; ipvs-proxy acts on none of kube-proxy's gates. Ignored if a config
    /// file is specified by --config.
    #[arg(long, value_name = "KEY=BOOL", value_delimiter = ',', value_parser = parse_feature_gate)]
    pub feature_gates: Option<Vec<(String, bool)>>,

    /// Path to kubeconfig file with authorization information (the master location can be
    /// overridden by the master flag).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// The address of the Kubernetes API server (overrides any value in kubeconfig).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,

    /// Content type of requests sent to apiserver. [default: application/vnd.kubernetes.protobuf]
    #[arg(long, value_name = "TYPE")]
    pub kube_api_content_type: Option<String>,

    /// Burst to use while talking with kubernetes apiserver. [default: 10]
    #[arg(long, value_name = "N")]
    pub kube_api_burst: Option<i32>,

    /// QPS to use while talking with kubernetes apiserver. [default: 5]
    #[arg(long, value_name = "QPS")]
    pub kube_api_qps: Option<f32>,

    /// If non-empty, will be used as the name of the Node that the proxy is running on. If
    /// unset, the node name is assumed to be the same as the node's hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// Overrides kube-proxy's idea of what its node's primary IP is (no socket is bound to it).
    /// Ignored if a config file is specified by --config. [default: 0.0.0.0]
    #[arg(long, value_name = "IP")]
    pub bind_address: Option<IpAddr>,

    /// The IP address and port for the health check server to serve on; without a port,
    /// --healthz-port. Empty or port 0 disables it. Ignored if a config file is specified by --config.
    /// [default: 0.0.0.0:10256]
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_bind_address)]
    pub healthz_bind_address: Option<BindAddress>,

    /// The IP address and port for the metrics server to serve on; without a port,
    /// --metrics-port. Empty or port 0 disables it. Ignored if a config file is specified by --config.
    /// [default: 127.0.0.1:10249]
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_bind_address)]
    pub metrics_bind_address: Option<BindAddress>,

    /// If true the proxy treats failure to bind to a port as fatal and exits; if false it logs
    /// the error and tries again every 5 seconds.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub bind_address_hard_fail: Option<bool>,

    /// If true enables profiling via web interface on /debug/pprof handler (not served by
    /// ipvs-proxy). Ignored if a config file is specified by --config.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub profiling: Option<bool>,

    /// The previous version for which you want to show hidden metrics (<major>.<minor>, e.g.
    /// 1.35). Ignored if a config file is specified by --config.
    #[arg(long, value_name = "VERSION")]
    pub show_hidden_metrics_for_version: Option<String>,

    /// Which proxy mode to use: ipvs or iptables. Ignored if a config file is specified by
    /// --config. [default: ipvs]
    #[arg(long, value_enum, value_name = "MODE")]
    pub proxy_mode: Option<ProxyMode>,

    /// In ipvs mode, when IPVS is unavailable: run the iptables proxier, or exit.
    /// (ipvs-proxy's own flag.) [default: iptables]
    #[arg(long, value_enum, value_name = "WHAT")]
    pub ipvs_fallback: Option<IpvsFallback>,

    /// The bit of the fwmark space to mark packets requiring SNAT with. Must be within the
    /// range [0, 31]. [default: 14]
    #[arg(long, value_name = "BIT", value_parser = clap::value_parser!(u8).range(0..=31))]
    pub iptables_masquerade_bit: Option<u8>,

    /// ipvs-proxy's old name of --iptables-masquerade-bit.
    #[arg(long, hide = true, value_name = "BIT", value_parser = clap::value_parser!(u8).range(0..=31))]
    pub masquerade_bit: Option<u8>,

    /// SNAT all traffic sent via Service cluster IPs. This may be required with some CNI
    /// plugins.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,

    /// If false, disable the legacy behavior of allowing NodePort services to be accessed via
    /// localhost (iptables mode and IPv4 only). [default: true]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub iptables_localhost_nodeports: Option<bool>,

    /// In iptables mode, how often the rules are fully re-synchronized (e.g. 5s, 1m, 2h22m).
    /// Must be greater than 0. [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub iptables_sync_period: Option<Duration>,

    /// In iptables mode, the minimum period between rule resyncs; 0 resyncs on every Service
    /// or EndpointSlice change. [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub iptables_min_sync_period: Option<Duration>,

    /// In ipvs mode, how often the kernel is re-read and fully re-synchronized (e.g. 5s, 1m,
    /// 2h22m). Must be greater than 0. [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_sync_period: Option<Duration>,

    /// In ipvs mode, the minimum period between resyncs; 0 resyncs on every Service or
    /// EndpointSlice change. [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_min_sync_period: Option<Duration>,

    /// The IPVS scheduler for Services that do not name one. [default: rr]
    #[arg(long, value_name = "NAME", value_parser = parse_scheduler)]
    pub ipvs_scheduler: Option<ipvs::Scheduler>,

    /// A comma-separated list of CIDRs which the ipvs proxier should not touch when cleaning
    /// up IPVS rules.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub ipvs_exclude_cidrs: Option<Vec<IpNet>>,

    /// Enable strict ARP by setting arp_ignore to 1 and arp_announce to 2.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ipvs_strict_arp: Option<bool>,

    /// The timeout for idle IPVS TCP connections, 0 to leave as-is. [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_tcp_timeout: Option<Duration>,

    /// The timeout for IPVS TCP connections after receiving a FIN packet, 0 to leave as-is.
    /// [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_tcpfin_timeout: Option<Duration>,

    /// The timeout for IPVS UDP packets, 0 to leave as-is. [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_udp_timeout: Option<Duration>,

    /// Mode to use to detect local traffic: ClusterCIDR, NodeCIDR, BridgeInterface or
    /// InterfaceNamePrefix. Ignored if a config file is specified by --config.
    /// [default: ClusterCIDR]
    #[arg(long, value_name = "MODE", value_parser = parse_detect_local_mode)]
    pub detect_local_mode: Option<DetectLocalMode>,

    /// A bridge interface name. With --detect-local-mode=BridgeInterface, traffic is local if
    /// it originates from this bridge.
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,

    /// An interface name prefix. With --detect-local-mode=InterfaceNamePrefix, traffic is
    /// local if it originates from any interface whose name begins with this prefix.
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,

    /// The CIDR range of the pods in the cluster (for dual-stack, a comma-separated pair).
    /// With --detect-local-mode=ClusterCIDR, traffic is local if its source IP is in this
    /// range. Ignored if a config file is specified by --config.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub cluster_cidr: Option<Vec<IpNet>>,

    /// A list of CIDR ranges that contain valid node IPs, or "primary". NodePort connections
    /// are accepted only on node IPs in those ranges (or the Node's primary IPs); if unset, on
    /// all local IPs. Ignored if a config file is specified by --config.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_nodeport_address)]
    pub nodeport_addresses: Option<Vec<NodePortAddress>>,

    /// The oom-score-adj value for the proxy process. Values must be within the range
    /// [-1000, 1000]. Ignored if a config file is specified by --config. [default: -999]
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub oom_score_adj: Option<i32>,

    /// Maximum number of NAT connections to track per CPU core (0 to leave the limit as-is and
    /// ignore conntrack-min). [default: 32768]
    #[arg(long, value_name = "N")]
    pub conntrack_max_per_core: Option<u32>,

    /// Minimum number of conntrack entries to allocate, regardless of conntrack-max-per-core
    /// (set conntrack-max-per-core=0 to leave the limit as-is). [default: 131072]
    #[arg(long, value_name = "N")]
    pub conntrack_min: Option<u32>,

    /// Idle timeout for established TCP connections (0 to leave as-is). [default: 24h0m0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Option<Duration>,

    /// NAT timeout for TCP connections in the CLOSE_WAIT state (0 to leave as-is).
    /// [default: 1h0m0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Option<Duration>,

    /// Enable liberal mode for tracking TCP packets by setting nf_conntrack_tcp_be_liberal to 1.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub conntrack_tcp_be_liberal: Option<bool>,

    /// Idle timeout for UNREPLIED UDP connections (0 to leave as-is). [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Option<Duration>,

    /// Idle timeout for ASSURED UDP connections (0 to leave as-is). [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Option<Duration>,

    /// How often configuration from the apiserver is refreshed. Must be greater than 0.
    /// [default: 15m0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub config_sync_period: Option<Duration>,

    /// The port to bind the health check server. Use 0 to disable. Deprecated (hidden, and
    /// warned of when given, as kube-proxy's pflag does): --healthz-bind-address.
    #[arg(long, hide = true, value_name = "PORT")]
    pub healthz_port: Option<u16>,

    /// The port to bind the metrics server. Use 0 to disable. Deprecated (hidden, warned of):
    /// --metrics-bind-address.
    #[arg(long, hide = true, value_name = "PORT")]
    pub metrics_port: Option<u16>,

    /// Once the userspace proxier's port range, now unused. Deprecated (hidden, warned of).
    #[arg(long, hide = true, value_name = "RANGE", value_parser = parse_port_range)]
    pub proxy_port_range: Option<String>,

    /// Sets the log format: text or json. [default: text]
    #[arg(
        long = "logging-format",
        alias = "log-format",
        value_enum,
        value_name = "FORMAT"
    )]
    pub log_format: Option<LogFormat>,

    /// Maximum number of seconds between log flushes (ipvs-proxy writes every line at once).
    /// [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub log_flush_frequency: Option<Duration>,

    /// Number for the log level verbosity: 0 info, 2 sync summaries, 4 debug, 5 and up trace.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub verbosity: Option<u8>,

    /// Comma-separated list of pattern=N settings for file-filtered logging (accepted, not
    /// acted on: ipvs-proxy filters by -v only).
    #[arg(long, value_name = "PATTERN=N", value_delimiter = ',')]
    pub vmodule: Option<Vec<String>>,

    /// [Alpha] In text format, write error messages to stderr and info messages to stdout
    /// (not acted on).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub log_text_split_stream: Option<bool>,

    /// [Alpha] In text format with split output streams, buffer info messages (not acted on).
    #[arg(long, value_name = "QUANTITY")]
    pub log_text_info_buffer_size: Option<String>,

    /// [Alpha] In JSON format, write error messages to stderr and info messages to stdout
    /// (not acted on).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub log_json_split_stream: Option<bool>,

    /// [Alpha] In JSON format with split output streams, buffer info messages (not acted on).
    #[arg(long, value_name = "QUANTITY")]
    pub log_json_info_buffer_size: Option<String>,

    /// Read Services, EndpointSlices and Nodes from this directory of manifests instead of a
    /// Kubernetes API server. (ipvs-proxy's own flag.)
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// This node's addresses (repeatable), used for NodePorts instead of the Node object's.
    /// (ipvs-proxy's own flag.)
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<IpAddr>,
}

/// kube-proxy's deprecated flags (`MarkDeprecated` in its options.go) and pflag's message for each.
const DEPRECATED: [(&str, &str); 3] = [
    (
        "healthz-port",
        "This flag is deprecated and will be removed in a future release. Please use --healthz-bind-address instead.",
    ),
    (
        "metrics-port",
        "This flag is deprecated and will be removed in a future release. Please use --metrics-bind-address instead.",
    ),
    (
        "proxy-port-range",
        "This flag has no effect and will be removed in a future release.",
    ),
];

impl ProxyFlags {
    /// pflag's warning for each deprecated flag given (`Flag --X has been deprecated, <why>`),
    /// which kube-proxy prints on stderr as it parses its flags.
    #[must_use]
    pub fn deprecation_warnings(&self) -> Vec<String> {
        let given = [
            self.healthz_port.is_some(),
            self.metrics_port.is_some(),
            self.proxy_port_range.is_some(),
        ];
        DEPRECATED
            .iter()
            .zip(given)
            .filter(|(_, given)| *given)
            .map(|((flag, why), _)| format!("Flag --{flag} has been deprecated, {why}"))
            .collect()
    }

    /// The flags that still apply when a `--config` file is given, as kube-proxy's: the
    /// logging flags, `--hostname-override`, and those no config file has (`--master`, the
    /// actions, and ipvs-proxy's own).
    #[must_use]
    pub fn beside_config_file(&self) -> ProxyFlags {
        ProxyFlags {
            config: self.config.clone(),
            write_config_to: self.write_config_to.clone(),
            cleanup: self.cleanup,
            init_only: self.init_only,
            master: self.master.clone(),
            hostname_override: self.hostname_override.clone(),
            ipvs_fallback: self.ipvs_fallback,
            log_format: self.log_format,
            log_flush_frequency: self.log_flush_frequency,
            verbosity: self.verbosity,
            vmodule: self.vmodule.clone(),
            log_text_split_stream: self.log_text_split_stream,
            log_text_info_buffer_size: self.log_text_info_buffer_size.clone(),
            log_json_split_stream: self.log_json_split_stream,
            log_json_info_buffer_size: self.log_json_info_buffer_size.clone(),
            manifests: self.manifests.clone(),
            node_ips: self.node_ips.clone(),
            ..ProxyFlags::default()
        }
    }
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

/// Parses a Go duration (`time.ParseDuration`) as kube-proxy's flags and file take it: `30s`,
/// `1m0s`, `2h22m`, `1.5s`, `500ms`, `0`. Negative durations are refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration {s:?} ({why}); use e.g. 30s, 1m, 2h22m");
    let text = s.strip_prefix('+').unwrap_or(s);
    if text.starts_with('-') {
        return Err(bad("must not be negative"));
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(bad("empty"));
    }
    let mut rest = text;
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("missing unit"))?;
        let number: f64 = rest[..number_len]
            .parse()
            .map_err(|_| bad("not a number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad("unknown unit")),
        };
        nanos += number * scale;
        rest = &rest[unit_len..];
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "non-negative, and Go's durations end at 290 years"
    )]
    Ok(Duration::from_nanos(nanos.round() as u64))
}

/// Formats a duration as Go's `time.Duration.String` does (`30s`, `1m0s`, `24h0m0s`, `500ms`),
/// the form kube-proxy writes and serves.
#[must_use]
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    if secs == 0 {
        return match nanos {
            0 => "0s".to_owned(),
            n if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
            n if n % 1_000 == 0 => format!("{}µs", n / 1_000),
            n => format!("{n}ns"),
        };
    }
    let seconds = if nanos == 0 {
        (secs % 60).to_string()
    } else {
        let fraction = format!("{nanos:09}");
        format!("{}.{}", secs % 60, fraction.trim_end_matches('0'))
    };
    match (secs / 3600, secs % 3600 / 60) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

/// Parses a Go boolean (`strconv.ParseBool`).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean {s:?}")),
    }
}

/// One `--feature-gates` entry, `Name=true`.
pub fn parse_feature_gate(s: &str) -> Result<(String, bool), String> {
    let (name, value) = s
        .trim()
        .split_once('=')
        .ok_or_else(|| format!("missing bool value for {s:?}; use Name=true"))?;
    Ok((name.trim().to_owned(), parse_bool(value.trim())?))
}

pub fn parse_detect_local_mode(s: &str) -> Result<DetectLocalMode, String> {
    match s.trim() {
        "" | "ClusterCIDR" => Ok(DetectLocalMode::ClusterCidr),
        "NodeCIDR" => Ok(DetectLocalMode::NodeCidr),
        "BridgeInterface" => Ok(DetectLocalMode::BridgeInterface),
        "InterfaceNamePrefix" => Ok(DetectLocalMode::InterfaceNamePrefix),
        other => Err(format!(
            "unknown detect-local mode {other:?}; use ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix"
        )),
    }
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

/// `IP:PORT`, `[IPv6]:PORT`, a bare IP (which gets the server's default port), or nothing
/// (the server is off, as kube-proxy's empty address; port 0 here).
pub fn parse_bind_address(s: &str) -> Result<BindAddress, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(BindAddress {
            ip: IpAddr::from([0, 0, 0, 0]),
            port: Some(0),
        });
    }
    s.parse::<SocketAddr>()
        .map(|a| BindAddress {
            ip: a.ip(),
            port: Some(a.port()),
        })
        .or_else(|_| {
            s.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map(|ip| BindAddress { ip, port: None })
        })
        .map_err(|_| format!("invalid bind address {s:?}; use IP:PORT, e.g. 0.0.0.0:10256"))
}

/// Checks a port range as kube-proxy's `--proxy-port-range` does (`utilnet.ParsePortRange`):
/// `BEGIN-END`, `BEGIN+OFFSET`, a single port, or empty; kept as given.
pub fn parse_port_range(s: &str) -> Result<String, String> {
    let bad = || format!("invalid port range {s:?}; use BEGIN-END, BEGIN+OFFSET or PORT");
    let port = |p: &str| p.trim().parse::<u16>().map_err(|_| bad());
    let valid = if s.trim().is_empty() {
        true
    } else if let Some((begin, end)) = s.split_once('-') {
        port(begin)? <= port(end)?
    } else if let Some((begin, offset)) = s.split_once('+') {
        port(begin)?.checked_add(port(offset)?).is_some()
    } else {
        port(s).is_ok()
    };
    valid.then(|| s.to_owned()).ok_or_else(bad)
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
        assert_eq!(cli.flags.metrics_bind_address.unwrap().port, Some(10349));
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

    #[test]
    fn deprecated_flags_are_hidden_and_warned_of_as_kube_proxy_marks_them() {
        let help = <Cli as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for (args, warning) in [
            (
                &["--healthz-port=10266"][..],
                Some(
                    "Flag --healthz-port has been deprecated, This flag is deprecated and will be removed in a future release. Please use --healthz-bind-address instead.",
                ),
            ),
            (
                &["--metrics-port", "10259"],
                Some(
                    "Flag --metrics-port has been deprecated, This flag is deprecated and will be removed in a future release. Please use --metrics-bind-address instead.",
                ),
            ),
            (
                &["--proxy-port-range=30000-32767"],
                Some(
                    "Flag --proxy-port-range has been deprecated, This flag has no effect and will be removed in a future release.",
                ),
            ),
            (&["--healthz-bind-address=0.0.0.0:10256"], None),
            (&["--masquerade-bit=14"], None),
        ] {
            let cli = parse(args).unwrap();
            let warnings = cli.flags.deprecation_warnings();
            assert_eq!(
                warnings,
                Vec::from_iter(warning.map(str::to_owned)),
                "{args:?}"
            );
            if warning.is_some() {
                let flag = args[0].split('=').next().unwrap();
                // Listed as an option, it would read `--flag <VALUE>`.
                let listed = format!("{flag} <");
                assert!(!help.contains(&listed), "{flag} is listed in --help");
                assert!(help.contains("--healthz-bind-address <"), "{help}");
            }
        }
        for range in ["", "30000-32767", "30000+100", "8080"] {
            assert!(parse_port_range(range).is_ok(), "{range:?}");
        }
        for range in ["32767-30000", "x", "65535+1", "1-2-3"] {
            assert!(
                parse(&[&format!("--proxy-port-range={range}")]).is_err(),
                "{range:?}"
            );
        }
    }
}
