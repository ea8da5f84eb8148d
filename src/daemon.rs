//! The daemon: start-up checks, the kernel settings kube-proxy makes, the HTTP servers, the
//! source, the sync loop's thread, and a clean stop on SIGTERM/SIGINT that leaves the kernel state
//! in place (so a restart or an upgrade never drops traffic).

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::{Context, bail};
use controllers::{SourceSender, SourceUpdate};
use healthcheck::ServiceHealthServers;
use iptables::{Runner, detect_flavour};
use reconciler::SyncLoop;
use reconciler::engine::{Engine, IptablesEngine, IpvsEngine};
use reconciler::sync::Syncer;
use tokio::sync::watch;

use crate::backends::{KernelIpvs, KernelNetfilter};
use crate::config::ProxyConfig;
use crate::flags::{IpvsFallback, ProxyMode};
use crate::health::Health;
use crate::http::{ServerState, health_router, metrics_router, serve};
use crate::observer::Telemetry;
use telemetry::proxy::Metrics;

/// kube-proxy's privileged start-up work (all `--init-only` does): conntrack and mode sysctls.
pub fn init_node(config: &ProxyConfig) {
    config.conntrack.apply();
    match config.mode {
        ProxyMode::Ipvs => netif::sysctl::ipvs_mode(config.strict_arp),
        ProxyMode::Iptables => netif::sysctl::iptables_mode(config.localhost_node_ports_served()),
    }
}

/// Starts the source that feeds the sync loop: the manifest directory, or the Kubernetes API
/// and its poster of Events on the Services the kernel refuses.
async fn start_source(
    config: &ProxyConfig,
    tx: SourceSender,
) -> anyhow::Result<Option<controllers::events::EventSender>> {
    if let Some(dir) = config.manifests.clone() {
        let node_name = config.node_name();
        tokio::spawn(async move {
            if let Err(error) = controllers::watch::watch_dir(dir, &node_name, tx).await {
                tracing::error!(%error, "manifest source stopped");
            }
        });
        return Ok(None);
    }
    let (kubeconfig, master) = (config.kubeconfig.as_deref(), config.master.as_deref());
    let client =
        controllers::kube_source::throttled_client(kubeconfig, master, config.rate_limit())
            .await
            .context("connecting to the Kubernetes API")?;
    let node_name = config.node_name();
    tracing::info!(node = %node_name, "following the Kubernetes API");
    Ok(Some(controllers::kube_source::spawn(
        client, node_name, tx,
    )?))
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
    netif::sysctl::ipvs_mode(config.strict_arp);
    let timeouts = ipvs::Timeouts::from_durations(
        config.tcp_timeout,
        config.tcpfin_timeout,
        config.udp_timeout,
    );
    // Zero leaves the kernel's value, as with ipvsadm --set.
    if !timeouts.is_unset() {
        handle
            .set_timeouts(&timeouts)
            .context("setting IPVS timeouts")?;
    }
    let link = netif::DummyLink::ensure(netif::KUBE_IPVS0).context("creating kube-ipvs0")?;
    Ok(Box::new(IpvsEngine(Syncer::new(
        KernelIpvs(handle),
        link,
        KernelNetfilter(runner),
        reconciler::sync::SyncOptions {
            release_memory: Some(crate::allocator::release),
            ..config.sync_options()
        },
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
        netif::sysctl::iptables_mode(config.localhost_node_ports_served());
        return Ok((ProxyMode::Iptables, Box::new(IptablesEngine::new(runner))));
    }
    match ipvs::probe_until_known(config.scheduler) {
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
            netif::sysctl::iptables_mode(config.localhost_node_ports_served());
            Ok((ProxyMode::Iptables, Box::new(IptablesEngine::new(runner))))
        }
        Err(why) => bail!("IPVS is unavailable: {why} (--ipvs-fallback=exit)"),
    }
}

async fn serve_until_stopped(config: ProxyConfig) -> anyhow::Result<()> {
    netif::sysctl::oom_score_adj(config.oom_score_adj);
    config.conntrack.apply();
    let (mode, engine) = choose_engine(&config)?;
    let health = Health::new(2 * config.sync_period(), SystemTime::now());
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(ServerState {
        health: health.clone(),
        metrics: metrics.clone(),
        mode: RwLock::new(mode),
        configz: config.configz(mode),
    });
    let servers = [
        (
            config.healthz_bind_address,
            health_router(state.clone()),
            "healthz",
        ),
        (
            config.metrics_bind_address,
            metrics_router(state),
            "metrics",
        ),
    ];
    for (address, router, name) in servers {
        let context =
            || format!("binding --{name}-bind-address {address} (--bind-address-hard-fail)");
        let served = serve(name, address, router, config.bind_address_hard_fail).await;
        served.with_context(context)?;
    }

    let (tx, rx) = controllers::channel(Some(health.clone()));
    // The node's addresses first, so the first sync serves NodePorts on them.
    let local = tx.clone();
    let follow = netif::AddressMonitor::follow(netif::KUBE_IPVS0, move |addresses| {
        local.send(SourceUpdate::LocalAddresses(addresses)).is_ok()
    });
    if let Err(error) = follow {
        tracing::error!(%error, "cannot read the node's addresses; NodePorts are served on the Node object's");
    }
    let events = start_source(&config, tx).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let runtime = tokio::runtime::Handle::current();
    let telemetry = Telemetry {
        service_health: ServiceHealthServers::new(runtime.clone(), health.probe()),
        health,
        metrics,
        events,
    };
    let sync_loop = SyncLoop::new(
        config.settings(),
        engine,
        controllers::fold,
        Box::new(telemetry),
    );
    let sync_loop = match conntrack::Conntrack::open() {
        Ok(table) => sync_loop.with_conntrack(Box::new(table)),
        Err(e) => {
            tracing::warn!("stale UDP and SCTP conntrack entries will not be deleted: {e}");
            sync_loop
        }
    };
    // The loop ends by itself only for the process to restart (NodeCIDR's podCIDRs).
    let (restart_tx, restart_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("sync-loop".into())
        .spawn(move || {
            let ended = sync_loop.run(&runtime, rx, stop_rx);
            if ended.is_err() {
                let _ = restart_tx.send(());
            }
            ended
        })
        .context("starting the sync loop's thread")?;

    let stopped = tokio::select! {
        stopped = wait_for_signal(config.config_file.clone()) => stopped,
        Ok(()) = restart_rx => Ok(()),
    };
    let _ = stop_tx.send(true);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("joining the sync loop")?
        .map_err(|_| anyhow::anyhow!("the sync loop's thread panicked"))??;
    stopped
}

/// Waits for SIGTERM or SIGINT, or fails when the `--config` file changes (as kube-proxy, so
/// that the pod restarts with the new file).
async fn wait_for_signal(config_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        path = crate::config_file::changed(config_file) => bail!(
            "the --config file {} changed: exiting so that the pod restarts with it", path.display()
        ),
    };
    tracing::info!(signal = name, "stopping");
    Ok(())
}
