//! The resolved configuration: kube-proxy's defaults, then the `--config` file, then flags.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use reconciler::Settings;
use reconciler::plan::{NodePortFilter, PlanConfig};

use crate::config_file::{KubeProxyConfiguration, ModeField};
use crate::flags::{self, IpvsFallback, LogFormat, NodePortAddress, ProxyFlags, ProxyMode};

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
    pub hostname_override: Option<String>,
    pub cluster_cidrs: Vec<IpNet>,
    pub scheduler: ipvs::Scheduler,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub exclude_cidrs: Vec<IpNet>,
    pub strict_arp: bool,
    pub tcp_timeout: Duration,
    pub tcpfin_timeout: Duration,
    pub udp_timeout: Duration,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub nodeport_addresses: Vec<NodePortAddress>,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    pub cleanup: bool,
    pub verbosity: u8,
    pub log_format: LogFormat,
    pub manifests: Option<PathBuf>,
    pub node_ips: Vec<IpAddr>,
}

impl Default for ProxyConfig {
    /// kube-proxy's defaults for ipvs mode.
    fn default() -> Self {
        ProxyConfig {
            mode: ProxyMode::Ipvs,
            ipvs_fallback: IpvsFallback::Iptables,
            kubeconfig: None,
            master: None,
            hostname_override: None,
            cluster_cidrs: Vec::new(),
            scheduler: ipvs::Scheduler::RoundRobin,
            sync_period: Duration::from_secs(30),
            min_sync_period: Duration::ZERO,
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            tcp_timeout: Duration::ZERO,
            tcpfin_timeout: Duration::ZERO,
            udp_timeout: Duration::ZERO,
            masquerade_all: false,
            masquerade_bit: 14,
            nodeport_addresses: Vec::new(),
            healthz_bind_address: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10256),
            metrics_bind_address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10249),
            cleanup: false,
            verbosity: 0,
            log_format: LogFormat::Text,
            manifests: None,
            node_ips: Vec::new(),
        }
    }
}

impl ProxyConfig {
    /// kube-proxy's order: defaults, then the `--config` file if one is named, then the flags
    /// that were given. Returns the configuration and the unknown fields of the file, for the
    /// caller to warn about once logging is up.
    pub fn resolve(
        flags: &ProxyFlags,
    ) -> Result<(ProxyConfig, Vec<String>), crate::config_file::ConfigFileError> {
        let mut config = ProxyConfig::default();
        let mut unknown = Vec::new();
        if let Some(path) = &flags.config {
            let file = crate::config_file::ConfigFile::load(path)?;
            config = config.with_file(&file.config);
            unknown = file.unknown_fields;
        }
        Ok((config.with_flags(flags), unknown))
    }

    /// Lays the flags that were given over `self`.
    #[must_use]
    pub fn with_flags(mut self, flags: &ProxyFlags) -> Self {
        let f = flags.clone();
        macro_rules! take {
            ($($field:ident <- $flag:ident),* $(,)?) => {$(
                if let Some(v) = f.$flag { self.$field = v; }
            )*};
        }
        take!(
            mode <- proxy_mode,
            ipvs_fallback <- ipvs_fallback,
            cluster_cidrs <- cluster_cidr,
            scheduler <- ipvs_scheduler,
            sync_period <- ipvs_sync_period,
            min_sync_period <- ipvs_min_sync_period,
            exclude_cidrs <- ipvs_exclude_cidrs,
            strict_arp <- ipvs_strict_arp,
            tcp_timeout <- ipvs_tcp_timeout,
            tcpfin_timeout <- ipvs_tcpfin_timeout,
            udp_timeout <- ipvs_udp_timeout,
            masquerade_all <- masquerade_all,
            masquerade_bit <- masquerade_bit,
            nodeport_addresses <- nodeport_addresses,
            healthz_bind_address <- healthz_bind_address,
            metrics_bind_address <- metrics_bind_address,
            cleanup <- cleanup,
            verbosity <- verbosity,
            log_format <- log_format,
        );
        if f.kubeconfig.is_some() {
            self.kubeconfig = f.kubeconfig;
        }
        if f.master.is_some() {
            self.master = f.master;
        }
        if f.hostname_override.is_some() {
            self.hostname_override = f.hostname_override;
        }
        if f.manifests.is_some() {
            self.manifests = f.manifests;
        }
        if !f.node_ips.is_empty() {
            self.node_ips = f.node_ips;
        }
        self
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
                cluster_cidrs: config.cluster_cidrs.clone(),
                node_name: config.node_name().into(),
                ..PlanConfig::default()
            },
            node_ips: config.node_ips.clone(),
            node_port_filter,
            exclude_cidrs: config.exclude_cidrs.clone(),
            sync_period: config.sync_period,
            min_sync_period: config.min_sync_period,
        }
    }

    /// The configuration as `/configz` shows it.
    #[must_use]
    pub fn configz(&self, mode: ProxyMode) -> serde_json::Value {
        serde_json::json!({
            "mode": match mode { ProxyMode::Ipvs => "ipvs", ProxyMode::Iptables => "iptables" },
            "hostnameOverride": self.hostname_override.clone().unwrap_or_default(),
            "clusterCIDR": self.cluster_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "healthzBindAddress": self.healthz_bind_address.to_string(),
            "metricsBindAddress": self.metrics_bind_address.to_string(),
            "iptables": {
                "masqueradeAll": self.masquerade_all,
                "masqueradeBit": self.masquerade_bit,
            },
            "ipvs": {
                "scheduler": self.scheduler.name(),
                "syncPeriod": humantime::format_duration(self.sync_period).to_string(),
                "minSyncPeriod": humantime::format_duration(self.min_sync_period).to_string(),
                "excludeCIDRs": self.exclude_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "strictARP": self.strict_arp,
                "tcpTimeout": humantime::format_duration(self.tcp_timeout).to_string(),
                "tcpFinTimeout": humantime::format_duration(self.tcpfin_timeout).to_string(),
                "udpTimeout": humantime::format_duration(self.udp_timeout).to_string(),
            },
        })
    }

    /// Lays the values a configuration file sets over `self`.
    #[must_use]
    pub fn with_file(mut self, file: &KubeProxyConfiguration) -> Self {
        fn set<T: Clone>(target: &mut T, value: Option<&T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        if let Some(ModeField(Some(mode))) = file.mode {
            self.mode = mode;
        }
        if let Some(path) = file
            .client_connection
            .kubeconfig
            .as_deref()
            .filter(|p| !p.is_empty())
        {
            self.kubeconfig = Some(PathBuf::from(path));
        }
        if let Some(name) = file.hostname_override.as_deref().filter(|n| !n.is_empty()) {
            self.hostname_override = Some(name.to_owned());
        }
        set(
            &mut self.healthz_bind_address,
            file.healthz_bind_address.as_ref(),
        );
        set(
            &mut self.metrics_bind_address,
            file.metrics_bind_address.as_ref(),
        );
        set(&mut self.cluster_cidrs, file.cluster_cidr.as_ref());
        set(
            &mut self.nodeport_addresses,
            file.node_port_addresses.as_ref(),
        );
        set(
            &mut self.masquerade_all,
            file.iptables.masquerade_all.as_ref(),
        );
        set(
            &mut self.masquerade_bit,
            file.iptables.masquerade_bit.as_ref(),
        );
        // One proxier runs at a time: its own section's periods apply.
        let (sync, min_sync) = match self.mode {
            ProxyMode::Ipvs => (file.ipvs.sync_period, file.ipvs.min_sync_period),
            ProxyMode::Iptables => (file.iptables.sync_period, file.iptables.min_sync_period),
        };
        set(&mut self.sync_period, sync.as_ref());
        set(&mut self.min_sync_period, min_sync.as_ref());
        set(&mut self.scheduler, file.ipvs.scheduler.as_ref());
        set(&mut self.exclude_cidrs, file.ipvs.exclude_cidrs.as_ref());
        set(&mut self.strict_arp, file.ipvs.strict_arp.as_ref());
        set(&mut self.tcp_timeout, file.ipvs.tcp_timeout.as_ref());
        set(&mut self.tcpfin_timeout, file.ipvs.tcp_fin_timeout.as_ref());
        set(&mut self.udp_timeout, file.ipvs.udp_timeout.as_ref());
        set(&mut self.verbosity, file.logging.verbosity.as_ref());
        match file.logging.format.as_deref() {
            Some("json") => self.log_format = flags::LogFormat::Json,
            Some("text") => self.log_format = flags::LogFormat::Text,
            _ => {}
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_are_kube_proxys() {
        let cfg = ProxyConfig::default();
        assert_eq!(cfg.sync_period, Duration::from_secs(30));
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
        assert_eq!(cfg.sync_period, Duration::from_secs(30));
    }
}
