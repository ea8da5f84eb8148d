//! The resolved configuration: kube-proxy's defaults, then either the `--config` file or the
//! flags (as kube-proxy: with a file, only the logging flags and `--hostname-override` still
//! apply), and its v1alpha1 form for `/configz` and `--write-config-to`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use netif::sysctl::Conntrack;
use serde_json::{Value, json};

use reconciler::Settings;
use reconciler::plan::{DetectLocal, NodePortFilter, PlanConfig};
use reconciler::sync::SyncOptions;

use crate::config_file::{ConfigFileError, KubeProxyConfiguration, ModeField};
use crate::flags::{
    self, DetectLocalMode, IpvsFallback, LogFormat, NodePortAddress, ProxyFlags, ProxyMode,
    format_duration as go,
};

/// kube-proxy's default ports for the health and metrics servers.
pub const HEALTHZ_PORT: u16 = 10256;
pub const METRICS_PORT: u16 = 10249;
/// kube-proxy's default API content type.
pub const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// Everything the daemon needs to know, with every default filled in.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "one field per boolean setting kube-proxy has"
)]
pub struct ProxyConfig {
    pub mode: ProxyMode,
    pub ipvs_fallback: IpvsFallback,
    pub kubeconfig: Option<PathBuf>,
    pub master: Option<String>,
    pub kube_api_qps: f32,
    pub kube_api_burst: i32,
    pub kube_api_content_type: String,
    pub accept_content_types: String,
    pub hostname_override: Option<String>,
    pub feature_gates: BTreeMap<String, bool>,
    pub bind_address: IpAddr,
    pub bind_address_hard_fail: bool,
    pub enable_profiling: bool,
    pub show_hidden_metrics_for_version: String,
    pub service_proxy_name: String,
    pub cluster_cidrs: Vec<IpNet>,
    pub detect_local_mode: DetectLocalMode,
    pub pod_bridge_interface: String,
    pub pod_interface_name_prefix: String,
    pub scheduler: ipvs::Scheduler,
    pub ipvs_sync_period: Duration,
    pub ipvs_min_sync_period: Duration,
    pub iptables_sync_period: Duration,
    pub iptables_min_sync_period: Duration,
    pub exclude_cidrs: Vec<IpNet>,
    pub strict_arp: bool,
    pub tcp_timeout: Duration,
    pub tcpfin_timeout: Duration,
    pub udp_timeout: Duration,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub localhost_node_ports: bool,
    pub nodeport_addresses: Vec<NodePortAddress>,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    pub oom_score_adj: i32,
    pub conntrack: Conntrack,
    pub config_sync_period: Duration,
    pub port_range: String,
    /// Windows-only settings the file sets (`winkernel.*`, `windowsRunAsService`).
    pub windows_only: Vec<String>,
    pub cleanup: bool,
    pub verbosity: u8,
    pub log_format: LogFormat,
    pub log_flush_frequency: Duration,
    pub vmodule: Vec<String>,
    /// The `--log-*-split-stream` / `--log-*-info-buffer-size` flags given.
    pub log_options: Vec<String>,
    pub manifests: Option<PathBuf>,
    pub node_ips: Vec<IpAddr>,
    /// The `--config` file, watched: the process exits when it changes.
    pub config_file: Option<PathBuf>,
    /// Flags given beside `--config`, which the file overrides.
    pub ignored_flags: Vec<String>,
}

impl Default for ProxyConfig {
    /// kube-proxy's defaults for ipvs mode.
    fn default() -> Self {
        ProxyConfig {
            mode: ProxyMode::Ipvs,
            ipvs_fallback: IpvsFallback::Iptables,
            kubeconfig: None,
            master: None,
            kube_api_qps: 5.0,
            kube_api_burst: 10,
            kube_api_content_type: PROTOBUF.to_owned(),
            accept_content_types: String::new(),
            hostname_override: None,
            feature_gates: BTreeMap::new(),
            bind_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            bind_address_hard_fail: false,
            enable_profiling: false,
            show_hidden_metrics_for_version: String::new(),
            service_proxy_name: String::new(),
            cluster_cidrs: Vec::new(),
            detect_local_mode: DetectLocalMode::ClusterCidr,
            pod_bridge_interface: String::new(),
            pod_interface_name_prefix: String::new(),
            scheduler: ipvs::Scheduler::RoundRobin,
            ipvs_sync_period: Duration::from_secs(30),
            ipvs_min_sync_period: Duration::ZERO,
            iptables_sync_period: Duration::from_secs(30),
            iptables_min_sync_period: Duration::from_secs(1),
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            tcp_timeout: Duration::ZERO,
            tcpfin_timeout: Duration::ZERO,
            udp_timeout: Duration::ZERO,
            masquerade_all: false,
            masquerade_bit: 14,
            localhost_node_ports: true,
            nodeport_addresses: Vec::new(),
            healthz_bind_address: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), HEALTHZ_PORT),
            metrics_bind_address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), METRICS_PORT),
            oom_score_adj: -999,
            conntrack: Conntrack {
                max_per_core: 32768,
                min: 131_072,
                tcp_established_timeout: Duration::from_secs(24 * 3600),
                tcp_close_wait_timeout: Duration::from_secs(3600),
                tcp_be_liberal: false,
                udp_timeout: Duration::ZERO,
                udp_stream_timeout: Duration::ZERO,
            },
            config_sync_period: Duration::from_secs(15 * 60),
            port_range: String::new(),
            windows_only: Vec::new(),
            cleanup: false,
            verbosity: 0,
            log_format: LogFormat::Text,
            log_flush_frequency: Duration::from_secs(5),
            vmodule: Vec::new(),
            log_options: Vec::new(),
            manifests: None,
            node_ips: Vec::new(),
            config_file: None,
            ignored_flags: Vec::new(),
        }
    }
}

/// A setting that fails kube-proxy's validation: its field in the file, its flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub flag: &'static str,
    pub message: String,
}

impl ProxyConfig {
    /// kube-proxy's order: defaults, then the `--config` file if one is named (and only the
    /// flags that still apply beside it), else the flags. Returns the configuration and the
    /// unknown fields of the file, for the caller to warn about once logging is up.
    pub fn resolve(flags: &ProxyFlags) -> Result<(ProxyConfig, Vec<String>), ConfigFileError> {
        let Some(path) = &flags.config else {
            let config = ProxyConfig::default().with_flags(flags);
            config.validate().map_err(|e| ConfigFileError::Flag {
                flag: e.flag,
                message: e.message,
            })?;
            return Ok((config, Vec::new()));
        };
        let file = crate::config_file::ConfigFile::load(path)?;
        let kept = flags.beside_config_file();
        let mut config = ProxyConfig::default()
            .with_file(&file.config)
            .with_flags(&kept);
        config.config_file = Some(path.clone());
        // Name each flag the file overrode, from what it would have changed.
        let alone = ProxyConfig::default().with_flags(&kept).to_v1alpha1();
        let with_all = ProxyConfig::default().with_flags(flags).to_v1alpha1();
        config.ignored_flags = differences(&alone, &with_all, "")
            .into_iter()
            .map(|field| format!("the flag setting {field}"))
            .collect();
        Ok((config, file.unknown_fields))
    }

    /// Lays the flags that were given over `self`.
    #[must_use]
    #[allow(clippy::too_many_lines, reason = "one line per kube-proxy setting")]
    pub fn with_flags(mut self, flags: &ProxyFlags) -> Self {
        let f = flags.clone();
        macro_rules! take {
            ($($field:expr => $flag:ident),* $(,)?) => {$(
                if let Some(v) = f.$flag { $field = v; }
            )*};
        }
        take!(
            self.mode => proxy_mode,
            self.ipvs_fallback => ipvs_fallback,
            self.kube_api_qps => kube_api_qps,
            self.kube_api_burst => kube_api_burst,
            self.kube_api_content_type => kube_api_content_type,
            self.bind_address => bind_address,
            self.bind_address_hard_fail => bind_address_hard_fail,
            self.port_range => proxy_port_range,
            self.enable_profiling => profiling,
            self.show_hidden_metrics_for_version => show_hidden_metrics_for_version,
            self.cluster_cidrs => cluster_cidr,
            self.detect_local_mode => detect_local_mode,
            self.pod_bridge_interface => pod_bridge_interface,
            self.pod_interface_name_prefix => pod_interface_name_prefix,
            self.scheduler => ipvs_scheduler,
            self.ipvs_sync_period => ipvs_sync_period,
            self.ipvs_min_sync_period => ipvs_min_sync_period,
            self.iptables_sync_period => iptables_sync_period,
            self.iptables_min_sync_period => iptables_min_sync_period,
            self.exclude_cidrs => ipvs_exclude_cidrs,
            self.strict_arp => ipvs_strict_arp,
            self.tcp_timeout => ipvs_tcp_timeout,
            self.tcpfin_timeout => ipvs_tcpfin_timeout,
            self.udp_timeout => ipvs_udp_timeout,
            self.masquerade_all => masquerade_all,
            self.masquerade_bit => masquerade_bit,
            self.masquerade_bit => iptables_masquerade_bit,
            self.localhost_node_ports => iptables_localhost_nodeports,
            self.nodeport_addresses => nodeport_addresses,
            self.oom_score_adj => oom_score_adj,
            self.conntrack.max_per_core => conntrack_max_per_core,
            self.conntrack.min => conntrack_min,
            self.conntrack.tcp_established_timeout => conntrack_tcp_timeout_established,
            self.conntrack.tcp_close_wait_timeout => conntrack_tcp_timeout_close_wait,
            self.conntrack.tcp_be_liberal => conntrack_tcp_be_liberal,
            self.conntrack.udp_timeout => conntrack_udp_timeout,
            self.conntrack.udp_stream_timeout => conntrack_udp_timeout_stream,
            self.config_sync_period => config_sync_period,
            self.cleanup => cleanup,
            self.verbosity => verbosity,
            self.log_format => log_format,
            self.log_flush_frequency => log_flush_frequency,
            self.vmodule => vmodule,
        );
        if let Some(gates) = f.feature_gates {
            self.feature_gates.extend(gates);
        }
        // kube-proxy's deprecated ports: a bare IP takes them, port 0 turns the server off.
        for (address, flag, port, default) in [
            (
                &mut self.healthz_bind_address,
                f.healthz_bind_address,
                f.healthz_port,
                HEALTHZ_PORT,
            ),
            (
                &mut self.metrics_bind_address,
                f.metrics_bind_address,
                f.metrics_port,
                METRICS_PORT,
            ),
        ] {
            if let Some(a) = flag {
                *address = a.or_port(port.unwrap_or(default));
            }
            if port == Some(0) {
                address.set_port(0);
            }
        }
        for (name, given) in [
            (
                "--log-text-split-stream",
                f.log_text_split_stream.map(|b| b.to_string()),
            ),
            ("--log-text-info-buffer-size", f.log_text_info_buffer_size),
            (
                "--log-json-split-stream",
                f.log_json_split_stream.map(|b| b.to_string()),
            ),
            ("--log-json-info-buffer-size", f.log_json_info_buffer_size),
        ] {
            if let Some(value) = given {
                self.log_options.push(format!("{name}={value}"));
            }
        }
        macro_rules! take_some {
            ($($field:ident),*) => {$( if f.$field.is_some() { self.$field = f.$field; } )*};
        }
        take_some!(kubeconfig, master, manifests);
        if let Some(name) = f.hostname_override {
            self.hostname_override = Some(name.trim().to_lowercase());
        }
        if !f.node_ips.is_empty() {
            self.node_ips = f.node_ips;
        }
        self
    }

    /// The running proxier's full-resync period: its own section's.
    #[must_use]
    pub fn sync_period(&self) -> Duration {
        match self.mode {
            ProxyMode::Ipvs => self.ipvs_sync_period,
            ProxyMode::Iptables => self.iptables_sync_period,
        }
    }

    /// The running proxier's minimum period between syncs.
    #[must_use]
    pub fn min_sync_period(&self) -> Duration {
        match self.mode {
            ProxyMode::Ipvs => self.ipvs_min_sync_period,
            ProxyMode::Iptables => self.iptables_min_sync_period,
        }
    }

    /// kube-proxy's validation (`pkg/proxy/apis/config/validation`), for what ipvs-proxy can
    /// get wrong after parsing: the first failure, naming its field and flag.
    pub fn validate(&self) -> Result<(), Invalid> {
        let fail = |field, flag, message: &str| {
            Err(Invalid {
                field,
                flag,
                message: message.to_owned(),
            })
        };
        let periods = [
            (
                "ipvs.syncPeriod",
                "--ipvs-sync-period",
                self.ipvs_sync_period,
            ),
            (
                "iptables.syncPeriod",
                "--iptables-sync-period",
                self.iptables_sync_period,
            ),
            (
                "configSyncPeriod",
                "--config-sync-period",
                self.config_sync_period,
            ),
        ];
        for (field, flag, period) in periods {
            if period.is_zero() {
                return fail(field, flag, "must be greater than 0");
            }
        }
        // Only the running proxier's pair: the other section keeps its defaults.
        let (min, sync, field, flag) = match self.mode {
            ProxyMode::Ipvs => (
                "ipvs.minSyncPeriod",
                "ipvs.syncPeriod",
                "ipvs.minSyncPeriod",
                "--ipvs-min-sync-period",
            ),
            ProxyMode::Iptables => (
                "iptables.minSyncPeriod",
                "iptables.syncPeriod",
                "iptables.minSyncPeriod",
                "--iptables-min-sync-period",
            ),
        };
        if self.min_sync_period() > self.sync_period() {
            let message = format!(
                "{min} must be less than or equal to {sync} ({})",
                go(self.sync_period())
            );
            return fail(field, flag, &message);
        }
        if !(-1000..=1000).contains(&self.oom_score_adj) {
            return fail(
                "oomScoreAdj",
                "--oom-score-adj",
                "must be within the range [-1000, 1000]",
            );
        }
        // A negative qps is client-go's "unlimited"; only burst is checked, as kube-proxy does.
        if self.kube_api_burst < 0 {
            return fail(
                "clientConnection.burst",
                "--kube-api-burst",
                "must be greater than or equal to 0",
            );
        }
        match self.detect_local_mode {
            DetectLocalMode::BridgeInterface if self.pod_bridge_interface.is_empty() => fail(
                "detectLocal.bridgeInterface",
                "--pod-bridge-interface",
                "must be set with detectLocalMode BridgeInterface",
            ),
            DetectLocalMode::InterfaceNamePrefix if self.pod_interface_name_prefix.is_empty() => {
                fail(
                    "detectLocal.interfaceNamePrefix",
                    "--pod-interface-name-prefix",
                    "must be set with detectLocalMode InterfaceNamePrefix",
                )
            }
            _ => Ok(()),
        }
    }

    /// The settings given whose effect ipvs-proxy does not implement (yet), each with why:
    /// logged once at start, so that nothing is dropped silently.
    #[must_use]
    pub fn not_acted_on(&self) -> Vec<(String, String)> {
        let d = ProxyConfig::default();
        let mut out: Vec<(String, String)> = Vec::new();
        let mut note = |set: bool, what: &str, why: &str| {
            if set {
                out.push((what.to_owned(), why.to_owned()));
            }
        };
        note(
            self.enable_profiling,
            "enableProfiling (--profiling)",
            "no /debug/pprof is served",
        );
        note(
            !self.feature_gates.is_empty(),
            "featureGates (--feature-gates)",
            "no kube-proxy feature gate changes ipvs-proxy",
        );
        note(
            self.bind_address != d.bind_address,
            "bindAddress (--bind-address)",
            "the primary node IPs come from the Node object (or --node-ip)",
        );
        note(
            !self.show_hidden_metrics_for_version.is_empty(),
            "showHiddenMetricsForVersion (--show-hidden-metrics-for-version)",
            "ipvs-proxy hides no metrics",
        );
        note(
            self.kube_api_content_type != d.kube_api_content_type
                || !self.accept_content_types.is_empty(),
            "clientConnection.contentType/acceptContentTypes (--kube-api-content-type)",
            "kube-rs speaks JSON only",
        );
        note(
            self.config_sync_period != d.config_sync_period,
            "configSyncPeriod (--config-sync-period)",
            "watches are not re-listed on a timer",
        );
        note(
            !self.service_proxy_name.is_empty(),
            "serviceProxyName",
            "Services with a service-proxy-name label are always left alone",
        );
        note(
            !self.port_range.is_empty(),
            "portRange",
            "unused, as in kube-proxy",
        );
        note(
            !self.vmodule.is_empty(),
            "logging.vmodule (--vmodule)",
            "logs are filtered by -v only",
        );
        note(
            self.log_flush_frequency != d.log_flush_frequency,
            "logging.flushFrequency (--log-flush-frequency)",
            "every log line is written at once",
        );
        for option in &self.log_options {
            note(true, option, "logs go to stderr, unbuffered");
        }
        for field in &self.windows_only {
            note(true, field, "Windows only");
        }
        for flag in &self.ignored_flags {
            note(
                true,
                flag,
                "overridden by the --config file, as kube-proxy does",
            );
        }
        out
    }

    /// The API client's rate limit, as client-go makes it of `clientConnection.qps` and
    /// `burst`: none for a negative qps.
    #[must_use]
    pub fn rate_limit(&self) -> Option<controllers::throttle::RateLimit> {
        let burst = u32::try_from(self.kube_api_burst).unwrap_or_default();
        controllers::throttle::RateLimit::new(self.kube_api_qps, burst)
    }

    /// Logs [`Self::not_acted_on`], once, at start.
    pub fn log_not_acted_on(&self) {
        for (setting, why) in self.not_acted_on() {
            tracing::warn!(setting, why, "setting accepted but not acted on");
        }
    }

    /// This node's name: `--hostname-override`, else the kernel's host name, lower-cased as
    /// kube-proxy does.
    #[must_use]
    pub fn node_name(&self) -> String {
        self.hostname_override
            .clone()
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .to_lowercase()
    }

    /// The IPVS sync engine's settings: what it owns, and how long real servers drain.
    #[must_use]
    pub fn sync_options(&self) -> SyncOptions {
        SyncOptions {
            exclude_cidrs: self.exclude_cidrs.clone(),
            ..SyncOptions::default()
        }
    }

    /// What the reconciler takes from the daemon's configuration.
    #[must_use]
    pub fn settings(&self) -> Settings {
        let config = self;
        // `all` (or an empty list) means every node address: the empty filter.
        let node_port_filter = if config.nodeport_addresses.contains(&NodePortAddress::All) {
            NodePortFilter::default()
        } else {
            NodePortFilter {
                cidrs: config
                    .nodeport_addresses
                    .iter()
                    .filter_map(|a| match a {
                        NodePortAddress::Cidr(n) => Some(*n),
                        NodePortAddress::Primary | NodePortAddress::All => None,
                    })
                    .collect(),
                primary: config
                    .nodeport_addresses
                    .contains(&NodePortAddress::Primary),
            }
        };
        Settings {
            plan: PlanConfig {
                scheduler: config.scheduler,
                masquerade_all: config.masquerade_all,
                masquerade_bit: config.masquerade_bit,
                detect_local: config.detect_local(),
                localhost_node_ports: config.localhost_node_ports_served(),
                node_name: config.node_name().into(),
                ..PlanConfig::default()
            },
            node_ips: config.node_ips.clone(),
            node_port_filter,
            exclude_cidrs: config.exclude_cidrs.clone(),
            sync_period: config.sync_period(),
            min_sync_period: config.min_sync_period(),
        }
    }

    /// Whether the iptables proxier serves NodePorts on 127.0.0.0/8 (and needs
    /// `route_localnet`): `iptables.localhostNodePorts` with every address serving NodePorts,
    /// as upstream turns it off when `nodePortAddresses` leaves loopback out.
    #[must_use]
    pub fn localhost_node_ports_served(&self) -> bool {
        self.localhost_node_ports
            && (self.nodeport_addresses.is_empty()
                || self.nodeport_addresses.contains(&NodePortAddress::All))
    }

    /// `detectLocalMode` with the setting its mode reads.
    fn detect_local(&self) -> DetectLocal {
        match self.detect_local_mode {
            DetectLocalMode::ClusterCidr => DetectLocal::ClusterCidr(self.cluster_cidrs.clone()),
            DetectLocalMode::NodeCidr => DetectLocal::NodeCidr,
            DetectLocalMode::BridgeInterface => {
                DetectLocal::BridgeInterface(self.pod_bridge_interface.clone())
            }
            DetectLocalMode::InterfaceNamePrefix => {
                DetectLocal::InterfaceNamePrefix(self.pod_interface_name_prefix.clone())
            }
        }
    }

    /// The configuration as `/configz` shows it, with the mode that actually runs.
    #[must_use]
    pub fn configz(&self, mode: ProxyMode) -> Value {
        let mut doc = self.to_v1alpha1();
        doc["mode"] = json!(mode_name(mode));
        doc
    }

    /// Every `KubeProxyConfiguration` field (v1alpha1) with the value in effect, as kube-proxy
    /// writes it: the body of `--write-config-to` and `/configz`.
    #[must_use]
    pub fn to_v1alpha1(&self) -> Value {
        let cidrs = |list: &[IpNet]| list.iter().map(ToString::to_string).collect::<Vec<_>>();
        let ct = &self.conntrack;
        json!({
            "featureGates": self.feature_gates,
            "clientConnection": {
                "kubeconfig": self.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                "acceptContentTypes": self.accept_content_types,
                "contentType": self.kube_api_content_type,
                "qps": self.kube_api_qps,
                "burst": self.kube_api_burst,
            },
            "logging": {
                "format": match self.log_format { LogFormat::Text => "text", LogFormat::Json => "json" },
                "flushFrequency": go(self.log_flush_frequency),
                "verbosity": self.verbosity,
                "vmodule": self.vmodule.iter().map(|v| {
                    let (pattern, level) = v.split_once('=').unwrap_or((v, "0"));
                    json!({"filePattern": pattern, "verbosity": level.parse::<u32>().unwrap_or(0)})
                }).collect::<Vec<_>>(),
                "options": {"text": {"infoBufferSize": "0"}, "json": {"infoBufferSize": "0"}},
            },
            "hostnameOverride": self.hostname_override.clone().unwrap_or_default(),
            "bindAddress": self.bind_address.to_string(),
            "healthzBindAddress": self.healthz_bind_address.to_string(),
            "metricsBindAddress": self.metrics_bind_address.to_string(),
            "bindAddressHardFail": self.bind_address_hard_fail,
            "enableProfiling": self.enable_profiling,
            "showHiddenMetricsForVersion": self.show_hidden_metrics_for_version,
            "serviceProxyName": self.service_proxy_name,
            "mode": mode_name(self.mode),
            "iptables": {
                "masqueradeBit": self.masquerade_bit,
                "masqueradeAll": self.masquerade_all,
                "localhostNodePorts": self.localhost_node_ports,
                "syncPeriod": go(self.iptables_sync_period),
                "minSyncPeriod": go(self.iptables_min_sync_period),
            },
            "ipvs": {
                "syncPeriod": go(self.ipvs_sync_period),
                "minSyncPeriod": go(self.ipvs_min_sync_period),
                "scheduler": self.scheduler.name(),
                "excludeCIDRs": cidrs(&self.exclude_cidrs),
                "strictARP": self.strict_arp,
                "tcpTimeout": go(self.tcp_timeout),
                "tcpFinTimeout": go(self.tcpfin_timeout),
                "udpTimeout": go(self.udp_timeout),
            },
            "detectLocalMode": self.detect_local_mode.name(),
            "detectLocal": {
                "bridgeInterface": self.pod_bridge_interface,
                "interfaceNamePrefix": self.pod_interface_name_prefix,
            },
            "clusterCIDR": cidrs(&self.cluster_cidrs).join(","),
            "nodePortAddresses": self.nodeport_addresses.iter().map(|a| match a {
                NodePortAddress::Cidr(net) => net.to_string(),
                NodePortAddress::Primary => "primary".to_owned(),
                NodePortAddress::All => "all".to_owned(),
            }).collect::<Vec<_>>(),
            "oomScoreAdj": self.oom_score_adj,
            "conntrack": {
                "maxPerCore": ct.max_per_core,
                "min": ct.min,
                "tcpEstablishedTimeout": go(ct.tcp_established_timeout),
                "tcpCloseWaitTimeout": go(ct.tcp_close_wait_timeout),
                "tcpBeLiberal": ct.tcp_be_liberal,
                "udpTimeout": go(ct.udp_timeout),
                "udpStreamTimeout": go(ct.udp_stream_timeout),
            },
            "configSyncPeriod": go(self.config_sync_period),
            "portRange": self.port_range,
        })
    }

    /// Lays the values a configuration file sets over `self`. As kube-proxy's defaulting does,
    /// an empty or zero value means the default, not zero; fields kube-proxy keeps as
    /// pointers (`masqueradeBit`, `oomScoreAdj`, the conntrack limits and TCP timeouts) are
    /// defaulted only when absent or null, so an explicit 0 keeps its meaning.
    #[must_use]
    #[allow(clippy::too_many_lines, reason = "one line per kube-proxy setting")]
    pub fn with_file(mut self, file: &KubeProxyConfiguration) -> Self {
        fn set<T: Clone>(target: &mut T, value: Option<&T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        /// A zero duration in the file is kube-proxy's "unset".
        fn set_nonzero(target: &mut Duration, value: Option<Duration>, default: Duration) {
            if let Some(v) = value {
                *target = if v.is_zero() { default } else { v };
            }
        }
        let d = ProxyConfig::default();
        if let Some(ModeField(Some(mode))) = file.mode {
            self.mode = mode;
        }
        let client = &file.client_connection;
        if let Some(path) = client.kubeconfig.as_deref().filter(|p| !p.is_empty()) {
            self.kubeconfig = Some(PathBuf::from(path));
        }
        if let Some(qps) = client.qps {
            self.kube_api_qps = if qps == 0.0 { d.kube_api_qps } else { qps };
        }
        if let Some(burst) = client.burst {
            self.kube_api_burst = if burst == 0 { d.kube_api_burst } else { burst };
        }
        if let Some(t) = client.content_type.as_deref() {
            self.kube_api_content_type = if t.is_empty() {
                PROTOBUF.to_owned()
            } else {
                t.to_owned()
            };
        }
        set(
            &mut self.accept_content_types,
            client.accept_content_types.as_ref(),
        );
        if let Some(name) = file.hostname_override.as_deref().filter(|n| !n.is_empty()) {
            self.hostname_override = Some(name.to_lowercase());
        }
        set(&mut self.feature_gates, file.feature_gates.as_ref());
        set(&mut self.bind_address, file.bind_address.as_ref());
        set(
            &mut self.bind_address_hard_fail,
            file.bind_address_hard_fail.as_ref(),
        );
        set(&mut self.enable_profiling, file.enable_profiling.as_ref());
        set(
            &mut self.show_hidden_metrics_for_version,
            file.show_hidden_metrics_for_version.as_ref(),
        );
        set(
            &mut self.service_proxy_name,
            file.service_proxy_name.as_ref(),
        );
        if let Some(a) = file.healthz_bind_address {
            self.healthz_bind_address = a.or_port(HEALTHZ_PORT);
        }
        if let Some(a) = file.metrics_bind_address {
            self.metrics_bind_address = a.or_port(METRICS_PORT);
        }
        set(&mut self.cluster_cidrs, file.cluster_cidr.as_ref());
        set(&mut self.detect_local_mode, file.detect_local_mode.as_ref());
        set(
            &mut self.pod_bridge_interface,
            file.detect_local.bridge_interface.as_ref(),
        );
        set(
            &mut self.pod_interface_name_prefix,
            file.detect_local.interface_name_prefix.as_ref(),
        );
        set(
            &mut self.nodeport_addresses,
            file.node_port_addresses.as_ref(),
        );
        let ipt = &file.iptables;
        set(&mut self.masquerade_all, ipt.masquerade_all.as_ref());
        set(&mut self.masquerade_bit, ipt.masquerade_bit.as_ref());
        set(
            &mut self.localhost_node_ports,
            ipt.localhost_node_ports.as_ref(),
        );
        set_nonzero(
            &mut self.iptables_sync_period,
            ipt.sync_period,
            d.iptables_sync_period,
        );
        set_nonzero(
            &mut self.iptables_min_sync_period,
            ipt.min_sync_period,
            d.iptables_min_sync_period,
        );
        let ipvs = &file.ipvs;
        set_nonzero(
            &mut self.ipvs_sync_period,
            ipvs.sync_period,
            d.ipvs_sync_period,
        );
        set(
            &mut self.ipvs_min_sync_period,
            ipvs.min_sync_period.as_ref(),
        );
        if let Some(scheduler) = ipvs.scheduler {
            self.scheduler = scheduler;
        }
        set(&mut self.exclude_cidrs, ipvs.exclude_cidrs.as_ref());
        set(&mut self.strict_arp, ipvs.strict_arp.as_ref());
        set(&mut self.tcp_timeout, ipvs.tcp_timeout.as_ref());
        set(&mut self.tcpfin_timeout, ipvs.tcp_fin_timeout.as_ref());
        set(&mut self.udp_timeout, ipvs.udp_timeout.as_ref());
        set(&mut self.oom_score_adj, file.oom_score_adj.as_ref());
        let ct = &file.conntrack;
        set(&mut self.conntrack.max_per_core, ct.max_per_core.as_ref());
        set(&mut self.conntrack.min, ct.min.as_ref());
        set(
            &mut self.conntrack.tcp_established_timeout,
            ct.tcp_established_timeout.as_ref(),
        );
        set(
            &mut self.conntrack.tcp_close_wait_timeout,
            ct.tcp_close_wait_timeout.as_ref(),
        );
        set(
            &mut self.conntrack.tcp_be_liberal,
            ct.tcp_be_liberal.as_ref(),
        );
        set(&mut self.conntrack.udp_timeout, ct.udp_timeout.as_ref());
        set(
            &mut self.conntrack.udp_stream_timeout,
            ct.udp_stream_timeout.as_ref(),
        );
        set_nonzero(
            &mut self.config_sync_period,
            file.config_sync_period,
            d.config_sync_period,
        );
        set(&mut self.port_range, file.port_range.as_ref());
        self.windows_only.extend(file.windows_only());
        let log = &file.logging;
        set(&mut self.verbosity, log.verbosity.as_ref());
        set_nonzero(
            &mut self.log_flush_frequency,
            log.flush_frequency,
            d.log_flush_frequency,
        );
        if let Some(vmodule) = &log.vmodule {
            self.vmodule = vmodule
                .iter()
                .map(|v| format!("{}={}", v.file_pattern, v.verbosity))
                .collect();
        }
        match log.format.as_deref() {
            Some("json") => self.log_format = flags::LogFormat::Json,
            Some("text" | "") => self.log_format = flags::LogFormat::Text,
            _ => {}
        }
        self
    }
}

fn mode_name(mode: ProxyMode) -> &'static str {
    match mode {
        ProxyMode::Ipvs => "ipvs",
        ProxyMode::Iptables => "iptables",
    }
}

/// The dotted paths of the leaves where `b` differs from `a`.
fn differences(a: &Value, b: &Value, path: &str) -> Vec<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => b
            .iter()
            .flat_map(|(key, bv)| {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                differences(a.get(key).unwrap_or(&Value::Null), bv, &sub)
            })
            .collect(),
        (a, b) if a == b => Vec::new(),
        _ => vec![path.to_owned()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_are_kube_proxys() {
        let cfg = ProxyConfig::default();
        assert_eq!(cfg.sync_period(), Duration::from_secs(30));
        assert_eq!(iptables::masquerade_mark(cfg.masquerade_bit), 0x4000);
        assert_eq!(cfg.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert_eq!(cfg.metrics_bind_address.to_string(), "127.0.0.1:10249");
        assert_eq!(cfg.scheduler, ipvs::Scheduler::RoundRobin);
    }

    #[test]
    fn given_flags_override_and_absent_flags_keep() {
        let cli = crate::flags::Cli::try_parse_from([
            "ipvs-proxy",
            "--masquerade-bit=15",
            "--ipvs-scheduler=lc",
        ])
        .unwrap();
        let cfg = ProxyConfig::default().with_flags(&cli.flags);
        assert_eq!(iptables::masquerade_mark(cfg.masquerade_bit), 0x8000);
        assert_eq!(cfg.scheduler, ipvs::Scheduler::LeastConnection);
        assert_eq!(cfg.sync_period(), Duration::from_secs(30));
    }

    fn cli(args: &[&str]) -> crate::flags::Cli {
        crate::flags::Cli::try_parse_from(std::iter::once("ipvs-proxy").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ipvs-proxy-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    #[allow(clippy::too_many_lines, reason = "one row per kube-proxy flag")]
    fn every_upstream_flag_parses_into_its_config_field() {
        // (flag, where /configz and --write-config-to show it, the value expected there);
        // `None` for the flags that are actions or have no field.
        let table: &[(&str, Option<&str>, Value)] = &[
            ("--config=/nonexistent", None, Value::Null),
            ("--write-config-to=/tmp/x", None, Value::Null),
            ("--cleanup", None, Value::Null),
            ("--init-only", None, Value::Null),
            (
                "--feature-gates=A=true,B=false",
                Some("/featureGates"),
                json!({"A": true, "B": false}),
            ),
            (
                "--kubeconfig=/etc/kube.conf",
                Some("/clientConnection/kubeconfig"),
                json!("/etc/kube.conf"),
            ),
            ("--master=https://10.0.0.1:6443", None, Value::Null),
            (
                "--kube-api-content-type=application/json",
                Some("/clientConnection/contentType"),
                json!("application/json"),
            ),
            (
                "--kube-api-burst=20",
                Some("/clientConnection/burst"),
                json!(20),
            ),
            (
                "--kube-api-qps=7.5",
                Some("/clientConnection/qps"),
                json!(7.5),
            ),
            (
                "--hostname-override=Node-A",
                Some("/hostnameOverride"),
                json!("node-a"),
            ),
            (
                "--bind-address=10.0.0.5",
                Some("/bindAddress"),
                json!("10.0.0.5"),
            ),
            (
                "--healthz-bind-address=127.0.0.1:9999",
                Some("/healthzBindAddress"),
                json!("127.0.0.1:9999"),
            ),
            (
                "--metrics-bind-address=0.0.0.0:9998",
                Some("/metricsBindAddress"),
                json!("0.0.0.0:9998"),
            ),
            (
                "--bind-address-hard-fail",
                Some("/bindAddressHardFail"),
                json!(true),
            ),
            ("--profiling=true", Some("/enableProfiling"), json!(true)),
            (
                "--show-hidden-metrics-for-version=1.35",
                Some("/showHiddenMetricsForVersion"),
                json!("1.35"),
            ),
            ("--proxy-mode=iptables", Some("/mode"), json!("iptables")),
            (
                "--iptables-masquerade-bit=15",
                Some("/iptables/masqueradeBit"),
                json!(15),
            ),
            (
                "--masquerade-bit=16",
                Some("/iptables/masqueradeBit"),
                json!(16),
            ),
            (
                "--masquerade-all",
                Some("/iptables/masqueradeAll"),
                json!(true),
            ),
            (
                "--iptables-localhost-nodeports=false",
                Some("/iptables/localhostNodePorts"),
                json!(false),
            ),
            (
                "--iptables-sync-period=1m",
                Some("/iptables/syncPeriod"),
                json!("1m0s"),
            ),
            (
                "--iptables-min-sync-period=2s",
                Some("/iptables/minSyncPeriod"),
                json!("2s"),
            ),
            (
                "--ipvs-sync-period=2h22m",
                Some("/ipvs/syncPeriod"),
                json!("2h22m0s"),
            ),
            (
                "--ipvs-min-sync-period=1.5s",
                Some("/ipvs/minSyncPeriod"),
                json!("1.5s"),
            ),
            (
                "--ipvs-scheduler=wrr",
                Some("/ipvs/scheduler"),
                json!("wrr"),
            ),
            (
                "--ipvs-exclude-cidrs=10.1.0.0/16,fd00::/64",
                Some("/ipvs/excludeCIDRs"),
                json!(["10.1.0.0/16", "fd00::/64"]),
            ),
            ("--ipvs-strict-arp", Some("/ipvs/strictARP"), json!(true)),
            (
                "--ipvs-tcp-timeout=900s",
                Some("/ipvs/tcpTimeout"),
                json!("15m0s"),
            ),
            (
                "--ipvs-tcpfin-timeout=120s",
                Some("/ipvs/tcpFinTimeout"),
                json!("2m0s"),
            ),
            (
                "--ipvs-udp-timeout=300ms",
                Some("/ipvs/udpTimeout"),
                json!("300ms"),
            ),
            (
                "--detect-local-mode=NodeCIDR",
                Some("/detectLocalMode"),
                json!("NodeCIDR"),
            ),
            (
                "--pod-bridge-interface=cbr0",
                Some("/detectLocal/bridgeInterface"),
                json!("cbr0"),
            ),
            (
                "--pod-interface-name-prefix=veth",
                Some("/detectLocal/interfaceNamePrefix"),
                json!("veth"),
            ),
            (
                "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
                Some("/clusterCIDR"),
                json!("10.244.0.0/16,fd00:10:244::/56"),
            ),
            (
                "--nodeport-addresses=primary",
                Some("/nodePortAddresses"),
                json!(["primary"]),
            ),
            ("--oom-score-adj=-500", Some("/oomScoreAdj"), json!(-500)),
            (
                "--conntrack-max-per-core=0",
                Some("/conntrack/maxPerCore"),
                json!(0),
            ),
            (
                "--conntrack-min=65536",
                Some("/conntrack/min"),
                json!(65536),
            ),
            (
                "--conntrack-tcp-timeout-established=12h",
                Some("/conntrack/tcpEstablishedTimeout"),
                json!("12h0m0s"),
            ),
            (
                "--conntrack-tcp-timeout-close-wait=30m",
                Some("/conntrack/tcpCloseWaitTimeout"),
                json!("30m0s"),
            ),
            (
                "--conntrack-tcp-be-liberal",
                Some("/conntrack/tcpBeLiberal"),
                json!(true),
            ),
            (
                "--conntrack-udp-timeout=30s",
                Some("/conntrack/udpTimeout"),
                json!("30s"),
            ),
            (
                "--conntrack-udp-timeout-stream=2m",
                Some("/conntrack/udpStreamTimeout"),
                json!("2m0s"),
            ),
            (
                "--config-sync-period=5m",
                Some("/configSyncPeriod"),
                json!("5m0s"),
            ),
            (
                "--healthz-port=0",
                Some("/healthzBindAddress"),
                json!("0.0.0.0:0"),
            ),
            (
                "--metrics-port=0",
                Some("/metricsBindAddress"),
                json!("127.0.0.1:0"),
            ),
            (
                "--logging-format=json",
                Some("/logging/format"),
                json!("json"),
            ),
            (
                "--log-flush-frequency=10s",
                Some("/logging/flushFrequency"),
                json!("10s"),
            ),
            ("-v=4", Some("/logging/verbosity"), json!(4)),
            ("--v=3", Some("/logging/verbosity"), json!(3)),
            (
                "--vmodule=proxier=5",
                Some("/logging/vmodule"),
                json!([{"filePattern": "proxier", "verbosity": 5}]),
            ),
            ("--log-text-split-stream", None, Value::Null),
            ("--log-text-info-buffer-size=64Ki", None, Value::Null),
            ("--log-json-split-stream=true", None, Value::Null),
            ("--log-json-info-buffer-size=1Mi", None, Value::Null),
        ];
        let defaults = ProxyConfig::default().to_v1alpha1();
        for (flag, pointer, want) in table {
            let config = ProxyConfig::default().with_flags(&cli(&[flag]).flags);
            if let Some(pointer) = pointer {
                let got = config.to_v1alpha1().pointer(pointer).cloned();
                assert_eq!(got.as_ref(), Some(want), "{flag} sets {pointer}");
                assert_ne!(
                    defaults.pointer(pointer),
                    Some(want),
                    "{flag}: the default already"
                );
            }
        }
    }

    #[test]
    fn flags_fill_the_config_without_a_file_and_only_logging_and_hostname_beside_one() {
        let file = temp_file(
            "precedence.yaml",
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             mode: ipvs\nipvs:\n  scheduler: lc\n  syncPeriod: 45s\nhostnameOverride: from-file\n",
        );
        let args = [
            "--ipvs-scheduler=sh",
            "--ipvs-sync-period=10s",
            "--conntrack-min=1",
            "-v=4",
            "--logging-format=json",
            "--hostname-override=From-Flag",
            "--manifests=/srv/manifests",
        ];
        let (alone, _) = ProxyConfig::resolve(&cli(&args).flags).unwrap();
        assert_eq!(alone.scheduler, ipvs::Scheduler::SourceHashing);
        assert_eq!(alone.sync_period(), Duration::from_secs(10));
        assert_eq!(alone.conntrack.min, 1);

        let config_flag = format!("--config={}", file.display());
        let with_file = [&[config_flag.as_str()][..], &args].concat();
        let (config, unknown) = ProxyConfig::resolve(&cli(&with_file).flags).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(unknown.is_empty());
        // The file wins ...
        assert_eq!(config.scheduler, ipvs::Scheduler::LeastConnection);
        assert_eq!(config.sync_period(), Duration::from_secs(45));
        assert_eq!(config.conntrack.min, 131_072);
        // ... except for the logging flags, --hostname-override and ipvs-proxy's own.
        assert_eq!(config.verbosity, 4);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.hostname_override.as_deref(), Some("from-flag"));
        assert_eq!(
            config.manifests.as_deref(),
            Some(std::path::Path::new("/srv/manifests"))
        );
        // The overridden flags are named at start.
        let noted: Vec<String> = config
            .not_acted_on()
            .into_iter()
            .map(|(what, _)| what)
            .collect();
        for field in ["ipvs.scheduler", "ipvs.syncPeriod", "conntrack.min"] {
            assert!(
                noted.iter().any(|n| n.contains(field)),
                "{field} in {noted:?}"
            );
        }
    }

    #[test]
    fn a_bare_ip_bind_address_gets_the_default_port() {
        for (args, healthz, metrics) in [
            (
                &["--healthz-bind-address=127.0.0.1"][..],
                "127.0.0.1:10256",
                "127.0.0.1:10249",
            ),
            (
                &["--metrics-bind-address=::1"][..],
                "0.0.0.0:10256",
                "[::1]:10249",
            ),
            (
                &["--metrics-bind-address=[::]"][..],
                "0.0.0.0:10256",
                "[::]:10249",
            ),
            (
                &["--healthz-bind-address=10.0.0.1", "--healthz-port=12345"][..],
                "10.0.0.1:12345",
                "127.0.0.1:10249",
            ),
            // A port in the address wins over the deprecated --*-port, as in kube-proxy.
            (
                &["--metrics-bind-address=0.0.0.0:9100", "--metrics-port=9200"][..],
                "0.0.0.0:10256",
                "0.0.0.0:9100",
            ),
            // Empty turns the server off, as kube-proxy's "Set empty to disable".
            (
                &["--metrics-bind-address="][..],
                "0.0.0.0:10256",
                "0.0.0.0:0",
            ),
        ] {
            let (config, _) = ProxyConfig::resolve(&cli(args).flags).unwrap();
            assert_eq!(config.healthz_bind_address.to_string(), healthz, "{args:?}");
            assert_eq!(config.metrics_bind_address.to_string(), metrics, "{args:?}");
        }
        let file = crate::config_file::ConfigFile::parse_str(
            std::path::Path::new("bare.yaml"),
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             healthzBindAddress: 0.0.0.0\nmetricsBindAddress: 192.168.1.10\n",
        )
        .unwrap();
        let config = ProxyConfig::default().with_file(&file.config);
        assert_eq!(config.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert_eq!(
            config.metrics_bind_address.to_string(),
            "192.168.1.10:10249"
        );
    }

    #[test]
    fn a_negative_qps_is_client_gos_unlimited() {
        let limit = |args: &[&str]| {
            ProxyConfig::resolve(&cli(args).flags)
                .unwrap()
                .0
                .rate_limit()
        };
        assert_eq!(limit(&["--kube-api-qps=-1"]), None);
        assert_eq!(limit(&[]), controllers::throttle::RateLimit::new(5.0, 10));
        assert_eq!(
            limit(&["--kube-api-qps=50", "--kube-api-burst=100"]),
            controllers::throttle::RateLimit::new(50.0, 100)
        );
    }

    #[test]
    fn invalid_flag_values_are_refused_naming_the_flag() {
        for (args, flag) in [
            (&["--ipvs-sync-period=0s"][..], "--ipvs-sync-period"),
            (
                &["--proxy-mode=iptables", "--iptables-sync-period=0"][..],
                "--iptables-sync-period",
            ),
            (&["--config-sync-period=0s"][..], "--config-sync-period"),
            (
                &["--ipvs-sync-period=5s", "--ipvs-min-sync-period=10s"][..],
                "--ipvs-min-sync-period",
            ),
            (
                &["--proxy-mode=iptables", "--iptables-sync-period=500ms"][..],
                "--iptables-min-sync-period",
            ),
            (
                &["--detect-local-mode=BridgeInterface"][..],
                "--pod-bridge-interface",
            ),
            (
                &["--detect-local-mode=InterfaceNamePrefix"][..],
                "--pod-interface-name-prefix",
            ),
            (&["--kube-api-burst=-1"][..], "--kube-api-burst"),
        ] {
            let err = ProxyConfig::resolve(&cli(args).flags)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("{flag}: ")), "{args:?}: {err}");
        }
        for args in [
            &["--oom-score-adj=-1001"][..],
            &["--conntrack-min=-1"],
            &["--feature-gates=A"],
        ] {
            let parsed = crate::flags::Cli::try_parse_from(
                std::iter::once("ipvs-proxy").chain(args.iter().copied()),
            );
            assert!(parsed.is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn settings_not_acted_on_are_named_and_defaults_raise_none() {
        assert_eq!(ProxyConfig::default().not_acted_on(), Vec::new());
        let config = ProxyConfig::default().with_flags(
            &cli(&[
                "--profiling",
                "--feature-gates=NFTablesProxyMode=true",
                "--detect-local-mode=NodeCIDR",
                "--iptables-localhost-nodeports=false",
                "--kube-api-qps=20",
                "--vmodule=proxier=5",
            ])
            .flags,
        );
        let noted: Vec<String> = config
            .not_acted_on()
            .into_iter()
            .map(|(what, _)| what)
            .collect();
        for flag in ["--profiling", "--feature-gates", "--vmodule"] {
            assert!(
                noted.iter().any(|n| n.contains(flag)),
                "{flag} in {noted:?}"
            );
        }
        // Acted on in both proxiers (detect-local), in the iptables one (localhost), by the
        // API client (qps).
        for flag in [
            "--detect-local-mode",
            "--iptables-localhost-nodeports",
            "--kube-api-qps",
        ] {
            assert!(
                !noted.iter().any(|n| n.contains(flag)),
                "{flag} in {noted:?}"
            );
        }
    }

    #[test]
    fn written_config_reads_back_as_the_same_config() {
        let (config, _) = ProxyConfig::resolve(
            &cli(&[
                "--ipvs-scheduler=sh",
                "--ipvs-min-sync-period=2s",
                "--ipvs-exclude-cidrs=10.1.0.0/16",
                "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
                "--nodeport-addresses=primary,192.168.0.0/16",
                "--iptables-masquerade-bit=0",
                "--oom-score-adj=0",
                "--conntrack-max-per-core=0",
                "--conntrack-udp-timeout=30s",
                "--healthz-bind-address=[::]:10256",
                "--feature-gates=A=true",
                "--kube-api-qps=7.5",
                "--hostname-override=node-a",
                "--vmodule=proxier=5",
                "--log-flush-frequency=1s",
                "-v=2",
            ])
            .flags,
        )
        .unwrap();
        let path = temp_file("written.yaml", "");
        crate::config_file::write(&path, &config).unwrap();
        let file = crate::config_file::ConfigFile::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(file.unknown_fields.is_empty(), "{:?}", file.unknown_fields);
        assert_eq!(ProxyConfig::default().with_file(&file.config), config);
    }
}
