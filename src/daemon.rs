//! The daemon: start-up checks, the kernel settings kube-proxy makes, the HTTP servers, the
//! source, the proxier thread, and a clean stop on SIGTERM/SIGINT that leaves the kernel state
//! in place (so a restart or an upgrade never drops traffic).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use axum::Router;
use controllers::SourceUpdate;
use healthcheck::ServiceHealthServers;
use iptables::{Runner, detect_flavour};
use reconciler::SyncLoop;
use reconciler::engine::{Engine, IptablesEngine, IpvsEngine};
use reconciler::sync::{SyncOptions, Syncer};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::sync::watch;

use crate::backends::{KernelAddresses, KernelIpvs, KernelNetfilter};
use crate::config::ProxyConfig;
use crate::flags::{IpvsFallback, ProxyMode};
use crate::health::Health;
use crate::http::{ServerState, health_router, metrics_router, serve};
use crate::metrics::Metrics;
use crate::observer::Telemetry;

/// The sysctls kube-proxy's ipvs mode sets.
fn ipvs_sysctls(config: &ProxyConfig) {
    use netif::sysctl::{ensure as sysctl, kernel_version};
    // Let IPVS see conntrack, so iptables' NAT and masquerading apply to its traffic.
    sysctl("net/ipv4/vs/conntrack", "1");
    // Drop connections to deleted real servers at once instead of black-holing them.
    sysctl("net/ipv4/vs/expire_nodest_conn", "1");
    sysctl("net/ipv4/vs/expire_quiescent_template", "1");
    sysctl("net/ipv4/ip_forward", "1");
    // Older kernels delay reused connections by a second with conn_reuse_mode=1.
    if kernel_version().is_some_and(|v| v < (5, 9)) {
        sysctl("net/ipv4/vs/conn_reuse_mode", "0");
    }
    if config.strict_arp {
        sysctl("net/ipv4/conf/all/arp_ignore", "1");
        sysctl("net/ipv4/conf/all/arp_announce", "2");
    }
}

fn seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Starts the source that feeds the proxier: the manifest directory, or the Kubernetes API.
async fn start_source(
    config: &ProxyConfig,
    tx: UnboundedSender<SourceUpdate>,
) -> anyhow::Result<()> {
    if let Some(dir) = config.manifests.clone() {
        tokio::spawn(async move {
            if let Err(error) = controllers::watch::watch_dir(dir, tx).await {
                tracing::error!(%error, "manifest source stopped");
            }
        });
        return Ok(());
    }
    let client =
        controllers::kube_source::client(config.kubeconfig.as_deref(), config.master.as_deref())
            .await
            .context("connecting to the Kubernetes API")?;
    let node_name = config.node_name();
    if node_name.is_empty() {
        bail!("no node name: set --hostname-override");
    }
    tracing::info!(node = %node_name, "following the Kubernetes API");
    tokio::spawn(async move {
        if let Err(error) = controllers::kube_source::run(client, node_name, tx).await {
            tracing::error!(%error, "Kubernetes API source stopped");
        }
    });
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: ProxyConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve_until_stopped(config))
}

/// The IPVS proxier on this node's kernel: sysctls and timeouts set, `kube-ipvs0` made.
fn ipvs_engine(
    config: &ProxyConfig,
    mut handle: ipvs::Handle,
    runner: Runner,
) -> anyhow::Result<Box<dyn Engine>> {
    ipvs_sysctls(config);
    let timeouts = ipvs::Timeouts {
        tcp: seconds(config.tcp_timeout),
        tcp_fin: seconds(config.tcpfin_timeout),
        udp: seconds(config.udp_timeout),
    };
    // Zero leaves the kernel's value, as with ipvsadm --set.
    if timeouts != ipvs::Timeouts::default() {
        handle
            .set_timeouts(&timeouts)
            .context("setting IPVS timeouts")?;
    }
    let link = netif::DummyLink::ensure(netif::KUBE_IPVS0).context("creating kube-ipvs0")?;
    let options = SyncOptions {
        exclude_cidrs: config.exclude_cidrs.clone(),
        ..SyncOptions::default()
    };
    Ok(Box::new(IpvsEngine(Syncer::new(
        KernelIpvs(handle),
        KernelAddresses(link),
        KernelNetfilter(runner),
        options,
    ))))
}

/// Picks the proxier: IPVS when asked for and usable; otherwise kube-proxy's iptables rules
/// (unless `--ipvs-fallback=exit`).
fn choose_engine(config: &ProxyConfig) -> anyhow::Result<(ProxyMode, Box<dyn Engine>)> {
    let flavour = detect_flavour(None);
    let runner = Runner::new(flavour);
    tracing::info!(flavour = flavour.as_str(), "iptables flavour");
    if config.mode == ProxyMode::Iptables {
        tracing::info!(
            mode = "iptables",
            "running the iptables proxier, as --proxy-mode asks"
        );
        netif::sysctl::ensure("net/ipv4/ip_forward", "1");
        return Ok((ProxyMode::Iptables, Box::new(IptablesEngine::new(runner))));
    }
    match ipvs::Handle::probe(config.scheduler) {
        Ok(handle) => {
            tracing::info!(mode = "ipvs", scheduler = %config.scheduler, "running the IPVS proxier");
            Ok((ProxyMode::Ipvs, ipvs_engine(config, handle, runner)?))
        }
        Err(why) if config.ipvs_fallback == IpvsFallback::Iptables => {
            tracing::warn!(
                mode = "iptables",
                reason = %why,
                "IPVS is unavailable, running the iptables proxier instead (--ipvs-fallback=exit exits instead)"
            );
            netif::sysctl::ensure("net/ipv4/ip_forward", "1");
            Ok((ProxyMode::Iptables, Box::new(IptablesEngine::new(runner))))
        }
        Err(why) => bail!("IPVS is unavailable: {why} (--ipvs-fallback=exit)"),
    }
}

async fn serve_until_stopped(config: ProxyConfig) -> anyhow::Result<()> {
    let (mode, engine) = choose_engine(&config)?;

    let health = Health::new(2 * config.sync_period, SystemTime::now());
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(ServerState {
        health: health.clone(),
        metrics: metrics.clone(),
        mode: RwLock::new(mode),
        configz: config.configz(mode),
    });
    let router = health_router(state.clone());
    let (addr, flag) = (config.healthz_bind_address, "--healthz-bind-address");
    serve_logged(addr, router, flag, "/healthz and /livez").await?;
    let (addr, flag) = (config.metrics_bind_address, "--metrics-bind-address");
    serve_logged(addr, metrics_router(state), flag, "/metrics").await?;

    let (tx, rx) = unbounded_channel();
    start_source(&config, tx).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let runtime = tokio::runtime::Handle::current();
    let telemetry = Telemetry {
        service_health: ServiceHealthServers::new(runtime.clone(), health.probe()),
        health,
        metrics,
    };
    let proxier = SyncLoop::new(
        config.settings(),
        engine,
        controllers::fold,
        Box::new(telemetry),
    );
    let thread = std::thread::Builder::new()
        .name("proxier".into())
        .spawn(move || proxier.run(&runtime, rx, stop_rx))
        .context("starting the proxier thread")?;

    wait_for_signal().await?;
    let _ = stop_tx.send(true);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("joining the proxier")?
        .map_err(|_| anyhow::anyhow!("the proxier thread panicked"))?;
    Ok(())
}

/// Serves `router` on `addr` (from `flag`, which errors name) and says so.
async fn serve_logged(
    addr: SocketAddr,
    router: Router,
    flag: &str,
    what: &str,
) -> anyhow::Result<()> {
    let bound = serve(addr, router).await;
    if let Some(addr) = bound.with_context(|| format!("binding {flag} {addr}"))? {
        tracing::info!(%addr, "serving {what}");
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "stopping");
    Ok(())
}
