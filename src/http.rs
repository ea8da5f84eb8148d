//! The two HTTP servers kube-proxy runs, at the same addresses and paths:
//! - health (`--healthz-bind-address`, 0.0.0.0:10256): `/healthz`, `/livez`;
//! - metrics (`--metrics-bind-address`, 127.0.0.1:10249): `/metrics`, `/healthz`,
//!   `/proxyMode`, `/configz`.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use healthcheck::server::Limits;
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::net::TcpListener;

use crate::flags::ProxyMode;
use crate::health::{Health, HealthReport};
use telemetry::proxy::{CodeLabel, Metrics};

/// What the servers read; the daemon updates it.
#[derive(Debug)]
pub struct ServerState {
    pub health: Health,
    pub metrics: Arc<Metrics>,
    /// The proxier actually running (the iptables fallback may replace ipvs).
    pub mode: RwLock<ProxyMode>,
    /// The running configuration, as `/configz` shows it.
    pub configz: serde_json::Value,
}

type Shared = Arc<ServerState>;

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// kube-proxy's health JSON: 200 when `ok` says so of the report, else 503; counted by code.
fn health_response(
    state: &ServerState,
    ok: fn(&HealthReport) -> bool,
    requests: &Family<CodeLabel, Counter>,
) -> Response {
    let report = state.health.report(SystemTime::now());
    let code = if ok(&report) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let n = code.as_u16();
    requests.get_or_create(&CodeLabel { code: n }).inc();
    let body = serde_json::json!({
        "lastUpdated": report.last_updated.map(rfc3339).unwrap_or_default(),
        "currentTime": rfc3339(report.current_time),
        "nodeEligible": report.node_eligible,
        "synced": report.synced,
    });
    let json = [(header::CONTENT_TYPE, "application/json")];
    (code, json, body.to_string()).into_response()
}

async fn healthz(State(state): State<Shared>) -> Response {
    let m = &state.metrics;
    health_response(&state, HealthReport::healthz_ok, &m.healthz_requests)
}

async fn livez(State(state): State<Shared>) -> Response {
    let m = &state.metrics;
    health_response(&state, HealthReport::livez_ok, &m.livez_requests)
}

async fn metrics(State(state): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn proxy_mode(State(state): State<Shared>) -> String {
    let mode = *state
        .mode
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match mode {
        ProxyMode::Ipvs => "ipvs".to_owned(),
        ProxyMode::Iptables => "iptables".to_owned(),
    }
}

async fn configz(State(state): State<Shared>) -> Response {
    let body = serde_json::json!({ "kubeproxy.config.k8s.io": state.configz });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `/healthz` and `/livez`.
pub fn health_router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(state)
}

/// `/metrics`, `/proxyMode`, `/configz`, and a plain `/healthz` that says the server is up.
pub fn metrics_router(state: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/proxyMode", get(proxy_mode))
        .route("/configz", get(configz))
        .with_state(state)
}

/// How often kube-proxy tries again to bind a server that could not (`wait.Until`, 5 s).
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Binds `addr` and serves `router` (`name` is `healthz` or `metrics`) until the runtime ends.
/// A port of 0 binds nothing, as kube-proxy treats an empty bind address. When the address
/// cannot be bound: with `hard_fail` (`--bind-address-hard-fail`) that is the error, for the
/// daemon to exit; without, as kube-proxy, it is logged and the bind retried every 5 seconds.
pub async fn serve(
    name: &'static str,
    addr: SocketAddr,
    router: Router,
    hard_fail: bool,
) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    match TcpListener::bind(addr).await {
        Ok(listener) => serve_named(name, listener, router),
        Err(e) if hard_fail => Err(e),
        Err(error) => {
            tracing::error!(%addr, %error, "cannot serve /{name}, retrying every 5 s (--bind-address-hard-fail=true exits instead)");
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(BIND_RETRY).await;
                    match TcpListener::bind(addr).await {
                        Ok(listener) => return serve_named(name, listener, router),
                        Err(error) => tracing::error!(%addr, %error, "cannot serve /{name}"),
                    }
                }
            });
            Ok(())
        }
    }
}

fn serve_named(name: &str, listener: TcpListener, router: Router) -> std::io::Result<()> {
    let addr = serve_on(listener, router)?;
    tracing::info!(%addr, "serving /{name}");
    Ok(())
}

/// Serves `router` on a bound listener, within the bounds every server of the proxy has
/// (connections, header reads: [`Limits`]).
pub fn serve_on(listener: TcpListener, router: Router) -> std::io::Result<SocketAddr> {
    let local = listener.local_addr()?;
    tokio::spawn(healthcheck::server::serve(
        listener,
        router,
        Limits::DEFAULT,
    ));
    Ok(local)
}
