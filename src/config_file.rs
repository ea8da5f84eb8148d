//! The `--config` file: kube-proxy's `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1).
//!
//! The same file a kube-proxy DaemonSet mounts from its ConfigMap works here: every v1alpha1
//! field is read (those for other proxy modes or platforms are kept or logged as not acted
//! on); fields nobody knows are reported with their path and skipped, as kube-proxy's lenient
//! v1alpha1 fallback does after its strict decoding fails; values that do not parse or fail
//! kube-proxy's validation are rejected with the field's path, e.g. `ipvs.syncPeriod`.
//! [`write`] is `--write-config-to`; [`changed`] is the watch that ends the process when the
//! file changes, for its pod to restart with the new one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::config::ProxyConfig;
use crate::flags::{self, BindAddress, DetectLocalMode, NodePortAddress, ProxyMode};

/// The API group and version this file format belongs to.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The kind of object the file holds.
pub const KIND: &str = "KubeProxyConfiguration";

/// A `--config` file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        /// The dotted path of the offending field (`.` for the document itself).
        field: String,
        message: String,
    },
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A parsed configuration file, and the fields in it that no version of kube-proxy knows.
#[derive(Debug)]
pub struct ConfigFile {
    pub config: KubeProxyConfiguration,
    /// Dotted paths of fields that were ignored because nothing knows them.
    pub unknown_fields: Vec<String>,
}

/// Every field of `KubeProxyConfiguration` v1alpha1, as kube-proxy 1.36 defines it. `None` is
/// "absent or null"; what an empty or zero value means is [`ProxyConfig::with_file`]'s
/// business, as defaulting is kube-proxy's.
///
/// [`ProxyConfig::with_file`]: crate::config::ProxyConfig::with_file
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    #[serde(default)]
    pub client_connection: ClientConnection,
    #[serde(default)]
    pub logging: Logging,
    pub hostname_override: Option<String>,
    #[serde(default, deserialize_with = "opt_ip")]
    pub bind_address: Option<IpAddr>,
    #[serde(default, deserialize_with = "opt_bind_address")]
    pub healthz_bind_address: Option<BindAddress>,
    #[serde(default, deserialize_with = "opt_bind_address")]
    pub metrics_bind_address: Option<BindAddress>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub service_proxy_name: Option<String>,
    pub mode: Option<ModeField>,
    #[serde(default)]
    pub iptables: IptablesSection,
    #[serde(default)]
    pub ipvs: IpvsSection,
    /// Only the nftables proxier reads it; ipvs-proxy has none.
    #[serde(default)]
    pub nftables: NftablesSection,
    #[serde(default)]
    pub winkernel: WinkernelSection,
    #[serde(default, deserialize_with = "opt_detect_local_mode")]
    pub detect_local_mode: Option<DetectLocalMode>,
    #[serde(default)]
    pub detect_local: DetectLocal,
    #[serde(
        default,
        rename = "clusterCIDR",
        deserialize_with = "opt_cidr_list_string"
    )]
    pub cluster_cidr: Option<Vec<IpNet>>,
    #[serde(default, deserialize_with = "opt_nodeport_addresses")]
    pub node_port_addresses: Option<Vec<NodePortAddress>>,
    #[serde(default, deserialize_with = "opt_oom_score_adj")]
    pub oom_score_adj: Option<i32>,
    #[serde(default)]
    pub conntrack: ConntrackSection,
    #[serde(default, deserialize_with = "opt_duration")]
    pub config_sync_period: Option<Duration>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
}

impl KubeProxyConfiguration {
    /// The Windows-only fields set to something other than their zero value.
    #[must_use]
    pub fn windows_only(&self) -> Vec<String> {
        let w = &self.winkernel;
        [
            (
                "winkernel.networkName",
                w.network_name.as_deref().is_some_and(|s| !s.is_empty()),
            ),
            (
                "winkernel.sourceVip",
                w.source_vip.as_deref().is_some_and(|s| !s.is_empty()),
            ),
            ("winkernel.enableDSR", w.enable_dsr == Some(true)),
            (
                "winkernel.rootHnsEndpointName",
                w.root_hns_endpoint_name
                    .as_deref()
                    .is_some_and(|s| !s.is_empty()),
            ),
            (
                "winkernel.forwardHealthCheckVip",
                w.forward_health_check_vip == Some(true),
            ),
            (
                "windowsRunAsService",
                self.windows_run_as_service == Some(true),
            ),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(field, _)| field.to_owned())
        .collect()
    }
}

/// `mode:` — empty means "the default".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeField(pub Option<ProxyMode>);

impl<'de> Deserialize<'de> for ModeField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "" => Ok(ModeField(None)),
            "ipvs" => Ok(ModeField(Some(ProxyMode::Ipvs))),
            "iptables" => Ok(ModeField(Some(ProxyMode::Iptables))),
            other => Err(de::Error::custom(format!(
                "unsupported proxy mode {other:?}; ipvs-proxy runs \"ipvs\" or \"iptables\""
            ))),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f32>,
    pub burst: Option<i32>,
}

/// component-base's `LoggingConfiguration`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Logging {
    pub format: Option<String>,
    /// A duration string, or nanoseconds as a number (kubeadm writes `0`).
    #[serde(default, deserialize_with = "opt_time_or_duration")]
    pub flush_frequency: Option<Duration>,
    pub verbosity: Option<u8>,
    pub vmodule: Option<Vec<VModuleItem>>,
    /// Per-format options (`text`/`json`: `splitStream`, `infoBufferSize`); not acted on.
    pub options: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VModuleItem {
    pub file_pattern: String,
    pub verbosity: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IptablesSection {
    pub masquerade_all: Option<bool>,
    #[serde(default, deserialize_with = "opt_masquerade_bit")]
    pub masquerade_bit: Option<u8>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub sync_period: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub min_sync_period: Option<Duration>,
    pub localhost_node_ports: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpvsSection {
    #[serde(default, deserialize_with = "opt_duration")]
    pub sync_period: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub min_sync_period: Option<Duration>,
    #[serde(default, deserialize_with = "opt_scheduler")]
    pub scheduler: Option<ipvs::Scheduler>,
    #[serde(default, rename = "excludeCIDRs", deserialize_with = "opt_cidr_list")]
    pub exclude_cidrs: Option<Vec<IpNet>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub tcp_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub tcp_fin_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub udp_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NftablesSection {
    pub masquerade_all: Option<bool>,
    #[serde(default, deserialize_with = "opt_masquerade_bit")]
    pub masquerade_bit: Option<u8>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub sync_period: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub min_sync_period: Option<Duration>,
    pub table_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WinkernelSection {
    pub network_name: Option<String>,
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub root_hns_endpoint_name: Option<String>,
    pub forward_health_check_vip: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

/// `conntrack`: `None` for the pointer fields means kube-proxy's default, `Some(0)` "leave
/// the kernel's value".
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackSection {
    #[serde(default, deserialize_with = "opt_count")]
    pub max_per_core: Option<u32>,
    #[serde(default, deserialize_with = "opt_count")]
    pub min: Option<u32>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub tcp_established_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: Option<bool>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub udp_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub udp_stream_timeout: Option<Duration>,
}

/// Runs one of the flag parsers on a string field, so the file and the command line accept
/// exactly the same values.
fn with_parser<'de, D, T>(d: D, parse: fn(&str) -> Result<T, String>) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => parse(s.trim()).map(Some).map_err(de::Error::custom),
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    with_parser(d, flags::parse_duration)
}

fn opt_bind_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BindAddress>, D::Error> {
    with_parser(d, flags::parse_bind_address)
}

fn opt_ip<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    with_parser(d, |s| {
        s.parse().map_err(|_| format!("invalid IP address {s:?}"))
    })
}

fn opt_detect_local_mode<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<DetectLocalMode>, D::Error> {
    with_parser(d, flags::parse_detect_local_mode)
}

/// A duration string, or a number of nanoseconds (component-base's `TimeOrMetaDuration`).
fn opt_time_or_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Nanos(u64),
        Text(String),
    }
    match Option::<Either>::deserialize(d)? {
        None => Ok(None),
        Some(Either::Nanos(n)) => Ok(Some(Duration::from_nanos(n))),
        Some(Either::Text(s)) => flags::parse_duration(&s)
            .map(Some)
            .map_err(de::Error::custom),
    }
}

fn opt_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Option::<i64>::deserialize(d)? {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| de::Error::custom(format!("{n} must be within [0, {}]", u32::MAX))),
    }
}

fn opt_oom_score_adj<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    match Option::<i64>::deserialize(d)? {
        None => Ok(None),
        Some(n @ -1000..=1000) => Ok(Some(i32::try_from(n).expect("within i32"))),
        Some(n) => Err(de::Error::custom(format!(
            "oomScoreAdj {n} is outside [-1000, 1000]"
        ))),
    }
}

fn opt_scheduler<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ipvs::Scheduler>, D::Error> {
    with_parser(d, flags::parse_scheduler)
}

/// `clusterCIDR` is one string, comma-separated for dual-stack.
fn opt_cidr_list_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<IpNet>>, D::Error> {
    with_parser(d, |s| s.split(',').map(flags::parse_cidr).collect())
}

fn opt_cidr_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<IpNet>>, D::Error> {
    Option::<Vec<String>>::deserialize(d)?
        .map(|list| {
            list.iter()
                .map(|s| flags::parse_cidr(s).map_err(de::Error::custom))
                .collect()
        })
        .transpose()
}

fn opt_nodeport_addresses<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<NodePortAddress>>, D::Error> {
    Option::<Vec<String>>::deserialize(d)?
        .map(|list| {
            list.iter()
                .map(|s| flags::parse_nodeport_address(s).map_err(de::Error::custom))
                .collect()
        })
        .transpose()
}

fn opt_masquerade_bit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    match Option::<i64>::deserialize(d)? {
        None => Ok(None),
        Some(bit @ 0..=31) => Ok(Some(u8::try_from(bit).expect("0..=31 fits in u8"))),
        Some(bit) => Err(de::Error::custom(format!(
            "masqueradeBit {bit} is outside 0..=31"
        ))),
    }
}

/// A dotted field path as serde reports it, `.` for the document root.
struct FieldPath(String);

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ConfigFile {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_str(path, &text)
    }

    /// Parses configuration text; `path` names its origin in errors.
    pub fn parse_str(path: &Path, text: &str) -> Result<ConfigFile, ConfigFileError> {
        Self::parse(text).map_err(|(field, message)| ConfigFileError::Invalid {
            path: path.to_owned(),
            field: field.0,
            message,
        })
    }

    fn parse(text: &str) -> Result<ConfigFile, (FieldPath, String)> {
        let mut unknown_fields = Vec::new();
        let document = serde_yaml::Deserializer::from_str(text);
        let mut record = |path: serde_ignored::Path<'_>| unknown_fields.push(path.to_string());
        let ignored = serde_ignored::Deserializer::new(document, &mut record);
        let config: KubeProxyConfiguration =
            serde_path_to_error::deserialize(ignored).map_err(|e| {
                let field = FieldPath(e.path().to_string());
                let message = e.into_inner().to_string();
                // serde_yaml appends " at line N column M"; the field path says where already,
                // but the line helps in a long file, so keep it.
                (field, message)
            })?;
        match config.api_version.as_deref() {
            Some(API_VERSION) => {}
            other => {
                return Err((
                    FieldPath("apiVersion".into()),
                    format!("expected {API_VERSION:?}, found {other:?}"),
                ));
            }
        }
        match config.kind.as_deref() {
            Some(KIND) => {}
            other => {
                return Err((
                    FieldPath("kind".into()),
                    format!("expected {KIND:?}, found {other:?}"),
                ));
            }
        }
        if let Some(format) = config.logging.format.as_deref()
            && !matches!(format, "" | "text" | "json")
        {
            return Err((
                FieldPath("logging.format".into()),
                format!("unsupported log format {format:?}; use \"text\" or \"json\""),
            ));
        }
        if let Err(invalid) = ProxyConfig::default().with_file(&config).validate() {
            return Err((FieldPath(invalid.field.into()), invalid.message));
        }
        Ok(ConfigFile {
            config,
            unknown_fields,
        })
    }
}

/// `--write-config-to`: writes `config`, fully defaulted, as a v1alpha1 YAML document.
pub fn write(path: &Path, config: &ProxyConfig) -> Result<(), ConfigFileError> {
    let mut doc = config.to_v1alpha1();
    doc["apiVersion"] = API_VERSION.into();
    doc["kind"] = KIND.into();
    let text = serde_yaml::to_string(&doc).expect("a JSON value is YAML");
    std::fs::write(path, text).map_err(|source| ConfigFileError::Write {
        path: path.to_owned(),
        source,
    })
}

/// How often [`changed`] reads the file. A ConfigMap update reaches the node within a minute;
/// a few seconds more do not matter, and polling sees symlink swaps that inotify watches of
/// the old target miss.
const POLL: Duration = Duration::from_secs(3);

/// Resolves once the content of `path` differs from what it held when called (a file that
/// cannot be read for a moment is not a change); never, without a path.
pub async fn changed(path: Option<PathBuf>) -> PathBuf {
    let Some(path) = path else {
        return std::future::pending().await;
    };
    let original = tokio::fs::read(&path).await.ok();
    loop {
        tokio::time::sleep(POLL).await;
        if let Ok(now) = tokio::fs::read(&path).await
            && original.as_ref() != Some(&now)
        {
            return path;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What kubeadm writes into the kube-proxy ConfigMap, switched to ipvs mode.
    const KUBEADM_CONFIG: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 1s
  scheduler: "lc"
  strictARP: true
  syncPeriod: 1m0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: "ipvs"
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    fn parse(text: &str) -> Result<ConfigFile, String> {
        ConfigFile::parse(text).map_err(|(field, message)| format!("{field}: {message}"))
    }

    /// Each `(from, to, field)`: the kubeadm fixture with `from` replaced by `to` is refused,
    /// the error naming `field`.
    fn assert_refused_at(cases: &[(&str, &str, &str)]) {
        for (from, to, field) in cases {
            let text = KUBEADM_CONFIG.replacen(from, to, 1);
            assert_ne!(text, KUBEADM_CONFIG, "fixture lacks {from:?}");
            let err = parse(&text).unwrap_err();
            assert!(err.starts_with(&format!("{field}: ")), "{to:?}: {err}");
        }
    }

    #[test]
    fn kubeadm_configmap_is_read_with_kube_proxy_defaults_for_empty_fields() {
        let file = parse(KUBEADM_CONFIG).unwrap();
        assert_eq!(file.unknown_fields, Vec::<String>::new());
        let cfg = ProxyConfig::default().with_file(&file.config);
        assert_eq!(cfg.mode, ProxyMode::Ipvs);
        assert_eq!(cfg.scheduler, ipvs::Scheduler::LeastConnection);
        assert!(cfg.strict_arp);
        assert_eq!(cfg.sync_period(), Duration::from_secs(60));
        assert_eq!(cfg.min_sync_period(), Duration::from_secs(1));
        assert_eq!(cfg.cluster_cidrs.len(), 2);
        assert_eq!(
            cfg.kubeconfig.as_deref(),
            Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        // Empty strings and nulls keep the defaults, as kube-proxy's defaulting does.
        assert_eq!(
            cfg.healthz_bind_address,
            ProxyConfig::default().healthz_bind_address
        );
        assert_eq!(cfg.masquerade_bit, 14);
        assert_eq!(cfg.hostname_override, None);
    }

    #[test]
    fn flags_override_the_file() {
        use clap::Parser;
        let file = parse(KUBEADM_CONFIG).unwrap();
        let cli = flags::Cli::try_parse_from([
            "ipvs-proxy",
            "--ipvs-scheduler=rr",
            "--ipvs-strict-arp=false",
        ])
        .unwrap();
        let cfg = ProxyConfig::default()
            .with_file(&file.config)
            .with_flags(&cli.flags);
        assert_eq!(cfg.scheduler, ipvs::Scheduler::RoundRobin);
        assert!(!cfg.strict_arp);
        assert_eq!(
            cfg.sync_period(),
            Duration::from_secs(60),
            "file value kept where no flag was given"
        );
    }

    #[test]
    fn unknown_fields_are_reported_by_path() {
        let text = format!("{KUBEADM_CONFIG}\nipvsTypo: 1\n");
        let text = text.replace("  strictARP: true", "  strictARP: true\n  schedular: sh");
        let file = parse(&text).unwrap();
        assert_eq!(
            file.unknown_fields,
            vec!["ipvs.schedular".to_owned(), "ipvsTypo".to_owned()]
        );
    }

    #[test]
    fn invalid_values_are_rejected_with_the_field_path() {
        assert_refused_at(&[
            ("syncPeriod: 1m0s", "syncPeriod: often", "ipvs.syncPeriod"),
            (
                "scheduler: \"lc\"",
                "scheduler: \"fastest\"",
                "ipvs.scheduler",
            ),
            (
                "clusterCIDR: 10.244.0.0/16",
                "clusterCIDR: 10.244.0.0/99",
                "clusterCIDR",
            ),
            (
                "masqueradeBit: null",
                "masqueradeBit: 40",
                "iptables.masqueradeBit",
            ),
            ("mode: \"ipvs\"", "mode: \"userspace\"", "mode"),
            ("strictARP: true", "strictARP: maybe", "ipvs.strictARP"),
            ("syncPeriod: 1m0s", "syncPeriod: -1s", "ipvs.syncPeriod"),
            (
                "kind: KubeProxyConfiguration",
                "kind: KubeletConfiguration",
                "kind",
            ),
        ]);
    }

    #[test]
    fn unreadable_file_names_its_path() {
        let err = ConfigFile::load(Path::new("/nonexistent/kube-proxy.yaml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/kube-proxy.yaml"),
            "{err}"
        );
    }

    /// [`KUBEADM_CONFIG`] as kubeadm writes it when nothing is set but `mode: ipvs`.
    fn kubeadm_all_zeros() -> String {
        let mut text = KUBEADM_CONFIG.to_owned();
        for (from, to) in [
            ("  minSyncPeriod: 1s", "  minSyncPeriod: 0s"),
            ("  scheduler: \"lc\"", "  scheduler: \"\""),
            ("  strictARP: true", "  strictARP: false"),
            ("  syncPeriod: 1m0s", "  syncPeriod: 0s"),
            (
                "clusterCIDR: 10.244.0.0/16,fd00:10:244::/56",
                "clusterCIDR: \"\"",
            ),
        ] {
            assert!(text.contains(from), "fixture lacks {from:?}");
            text = text.replacen(from, to, 1);
        }
        text
    }

    #[test]
    fn kubeadm_zeros_resolve_to_kube_proxys_defaults_as_configz_shows_them() {
        let file = parse(&kubeadm_all_zeros()).unwrap();
        assert_eq!(file.unknown_fields, Vec::<String>::new());
        let configz = ProxyConfig::default()
            .with_file(&file.config)
            .configz(ProxyMode::Ipvs);
        for (pointer, want) in [
            ("/mode", serde_json::json!("ipvs")),
            ("/ipvs/syncPeriod", "30s".into()),
            ("/ipvs/minSyncPeriod", "0s".into()),
            ("/ipvs/scheduler", "rr".into()),
            ("/iptables/syncPeriod", "30s".into()),
            ("/iptables/minSyncPeriod", "1s".into()),
            ("/iptables/masqueradeBit", 14.into()),
            ("/iptables/localhostNodePorts", true.into()),
            ("/configSyncPeriod", "15m0s".into()),
            ("/conntrack/maxPerCore", 32768.into()),
            ("/conntrack/min", 131_072.into()),
            ("/conntrack/tcpEstablishedTimeout", "24h0m0s".into()),
            ("/conntrack/tcpCloseWaitTimeout", "1h0m0s".into()),
            ("/conntrack/udpTimeout", "0s".into()),
            ("/oomScoreAdj", (-999).into()),
            ("/clientConnection/qps", 5.0.into()),
            ("/clientConnection/burst", 10.into()),
            (
                "/clientConnection/contentType",
                crate::config::PROTOBUF.into(),
            ),
            ("/healthzBindAddress", "0.0.0.0:10256".into()),
            ("/metricsBindAddress", "127.0.0.1:10249".into()),
            ("/bindAddress", "0.0.0.0".into()),
            ("/detectLocalMode", "ClusterCIDR".into()),
            ("/logging/flushFrequency", "5s".into()),
        ] {
            assert_eq!(configz.pointer(pointer), Some(&want), "{pointer}");
        }
    }

    #[test]
    fn iptables_mode_with_kubeadm_zeros_never_syncs_in_a_busy_loop() {
        let text = kubeadm_all_zeros().replacen("mode: \"ipvs\"", "mode: \"iptables\"", 1);
        let cfg = ProxyConfig::default().with_file(&parse(&text).unwrap().config);
        assert_eq!(cfg.mode, ProxyMode::Iptables);
        assert_eq!(cfg.sync_period(), Duration::from_secs(30));
        assert_eq!(cfg.min_sync_period(), Duration::from_secs(1));
        assert_eq!(cfg.settings().sync_period, Duration::from_secs(30));
    }

    #[test]
    fn explicit_zeros_in_pointer_fields_keep_their_meaning() {
        let text = KUBEADM_CONFIG
            .replacen("  maxPerCore: null", "  maxPerCore: 0", 1)
            .replacen("  masqueradeBit: null", "  masqueradeBit: 0", 1)
            .replacen("oomScoreAdj: null", "oomScoreAdj: 0", 1)
            .replacen(
                "  tcpEstablishedTimeout: null",
                "  tcpEstablishedTimeout: 0s",
                1,
            );
        let cfg = ProxyConfig::default().with_file(&parse(&text).unwrap().config);
        assert_eq!(
            cfg.conntrack.max(8),
            None,
            "maxPerCore 0 leaves nf_conntrack_max"
        );
        assert_eq!(cfg.masquerade_bit, 0);
        assert_eq!(cfg.oom_score_adj, 0);
        assert_eq!(cfg.conntrack.tcp_established_timeout, Duration::ZERO);
    }

    #[test]
    fn unknown_fields_in_any_section_are_reported_by_their_path() {
        let text = KUBEADM_CONFIG
            .replacen(
                "  maxPerCore: null",
                "  maxPerCore: null\n  maxPerCpu: 1",
                1,
            )
            .replacen("  qps: 0", "  qps: 0\n  qpm: 1", 1)
            .replacen(
                "  bridgeInterface: \"\"",
                "  bridgeInterface: \"\"\n  bridge: cbr0",
                1,
            )
            .replacen("  sourceVip: \"\"", "  sourceVip: \"\"\n  sourceVIP: x", 1);
        let mut unknown = parse(&text).unwrap().unknown_fields;
        unknown.sort();
        assert_eq!(
            unknown,
            [
                "clientConnection.qpm",
                "conntrack.maxPerCpu",
                "detectLocal.bridge",
                "winkernel.sourceVIP"
            ]
        );
    }

    #[test]
    fn settings_failing_kube_proxys_validation_name_their_field() {
        assert_refused_at(&[
            ("oomScoreAdj: null", "oomScoreAdj: 1001", "oomScoreAdj"),
            ("  min: null", "  min: -1", "conntrack.min"),
            (
                "  minSyncPeriod: 1s",
                "  minSyncPeriod: 2m",
                "ipvs.minSyncPeriod",
            ),
            (
                "detectLocalMode: \"\"",
                "detectLocalMode: BridgeInterface",
                "detectLocal.bridgeInterface",
            ),
            (
                "detectLocalMode: \"\"",
                "detectLocalMode: Nodes",
                "detectLocalMode",
            ),
            ("bindAddress: 0.0.0.0", "bindAddress: 0.0.0", "bindAddress"),
            ("  burst: 0", "  burst: many", "clientConnection.burst"),
            (
                "  tcpEstablishedTimeout: null",
                "  tcpEstablishedTimeout: 1d",
                "conntrack.tcpEstablishedTimeout",
            ),
        ]);
    }

    #[tokio::test]
    async fn a_change_of_the_files_content_is_noticed_and_a_rewrite_of_the_same_is_not() {
        let path =
            std::env::temp_dir().join(format!("ipvs-proxy-{}-watched.yaml", std::process::id()));
        std::fs::write(&path, KUBEADM_CONFIG).unwrap();
        let watch = tokio::spawn(changed(Some(path.clone())));
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::write(&path, KUBEADM_CONFIG).unwrap();
        tokio::time::sleep(POLL + Duration::from_millis(500)).await;
        assert!(!watch.is_finished(), "the same content is no change");
        std::fs::write(&path, format!("{KUBEADM_CONFIG}\n# edited\n")).unwrap();
        let noticed = tokio::time::timeout(2 * POLL, watch).await;
        std::fs::remove_file(&path).unwrap();
        assert_eq!(noticed.expect("noticed in time").unwrap(), path);
    }
}
