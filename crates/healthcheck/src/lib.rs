//! Service health servers, as kube-proxy's `pkg/proxy/healthcheck/service_health.go`: one HTTP
//! listener per `healthCheckNodePort` (a LoadBalancer Service with `externalTrafficPolicy:
//! Local`), which cloud load balancers probe on every node to learn where the Service has
//! endpoints. Any path answers 200 while the Service has ready endpoints on this node and the
//! proxy is healthy, 503 otherwise, with the count as `X-Load-Balancing-Endpoint-Weight`.
//!
//! This crate is told what to serve ([`ServiceHealthServers::update`]); it never reads
//! Kubernetes objects nor decides which Service needs a port. A port it cannot bind never stops
//! the others: it is returned as a [`BindError`], logged, and tried again on the next update.
//!
//! Every HTTP server of the proxy is served through [`server::serve`], with bounds on
//! connections and header reads ([`server::Limits`]).
#![forbid(unsafe_code)]

pub mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use socket2::{Domain, Socket, Type};
use tokio::runtime::Handle as Runtime;
use tokio::task::AbortHandle;

use crate::server::Limits;

/// A Service's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> ServiceKey {
        ServiceKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What one Service's health server serves: its `healthCheckNodePort` and how many ready
/// endpoints it has on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desired {
    pub port: u16,
    pub local_endpoints: usize,
}

impl From<(u16, usize)> for Desired {
    fn from((port, local_endpoints): (u16, usize)) -> Desired {
        Desired {
            port,
            local_endpoints,
        }
    }
}

/// A health-check port that could not be opened; it is tried again on the next update.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve the health check of Service {service} on {address}: {source}")]
pub struct BindError {
    pub service: ServiceKey,
    pub address: SocketAddr,
    #[source]
    pub source: io::Error,
}

type Healthy = Arc<dyn Fn() -> bool + Send + Sync>;

/// The service health servers. Cheap to clone; every clone is the same set of listeners.
#[derive(Clone)]
pub struct ServiceHealthServers {
    runtime: Runtime,
    healthy: Healthy,
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for ServiceHealthServers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("ServiceHealthServers")
            .field("addresses", &inner.addresses)
            .field("services", &inner.servers.len())
            .field("unbound", &inner.unbound)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    /// Where every port is opened; empty: every address (one dual-stack socket).
    addresses: Vec<IpAddr>,
    servers: BTreeMap<ServiceKey, Server>,
    /// Services whose port is not open yet: tried again on each update.
    unbound: BTreeSet<ServiceKey>,
}

/// One Service's listeners.
struct Server {
    port: u16,
    local_endpoints: Arc<AtomicUsize>,
    listeners: Vec<Listener>,
}

/// A listening socket served by a task.
struct Listener {
    /// A second handle on the socket, so that closing is synchronous: shutting it down stops
    /// the listening at once (connections are refused and, with `SO_REUSEADDR`, the port can
    /// be bound again in the same update), while the aborted task drops its copy later.
    socket: Socket,
    task: AbortHandle,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        self.task.abort();
    }
}

/// What one request reads.
#[derive(Clone)]
struct Answer {
    service: Arc<ServiceKey>,
    local_endpoints: Arc<AtomicUsize>,
    healthy: Healthy,
}

/// kube-proxy's body, in its field order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: &'a ServiceKey,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

async fn answer(State(a): State<Answer>) -> Response {
    let count = a.local_endpoints.load(Ordering::Relaxed);
    let healthy = (a.healthy)();
    let code = if count > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Body {
        service: &a.service,
        local_endpoints: count,
        service_proxy_healthy: healthy,
    };
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            HeaderName::from_static("x-load-balancing-endpoint-weight"),
            HeaderValue::from(count),
        ),
    ];
    let text = serde_json::to_string(&body).unwrap_or_default();
    (code, headers, text).into_response()
}

/// A listening TCP socket on `addr`: dual-stack for `[::]`, with `SO_REUSEADDR` as Go's
/// listeners have.
fn listen(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

impl ServiceHealthServers {
    /// Servers whose tasks run on `runtime`; `healthy` says whether the proxy is healthy
    /// (asked on every request, as kube-proxy asks its healthz server).
    pub fn new(
        runtime: Runtime,
        healthy: impl Fn() -> bool + Send + Sync + 'static,
    ) -> ServiceHealthServers {
        ServiceHealthServers {
            runtime,
            healthy: Arc::new(healthy),
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets what to serve: for each named Service its port and local endpoints, or `None` to
    /// close it; with `complete`, every Service not named is closed too. `addresses` are where
    /// to listen (empty: every address); when they change, every port is opened again.
    /// Ports not open yet, from this update or an earlier one, are tried; those that cannot be
    /// bound are returned (and logged), and tried again on the next update.
    pub fn update(
        &self,
        addresses: &[IpAddr],
        services: impl IntoIterator<Item = (ServiceKey, Option<Desired>)>,
        complete: bool,
    ) -> Vec<BindError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.addresses != addresses {
            inner.addresses = addresses.to_vec();
            for (key, server) in &mut inner.servers {
                server.listeners.clear();
                inner.unbound.insert(key.clone());
            }
        }
        let mut named = BTreeSet::new();
        for (key, desired) in services {
            if complete {
                named.insert(key.clone());
            }
            match desired {
                None => close(inner, &key),
                Some(d) => set(inner, key, d),
            }
        }
        if complete {
            let gone: Vec<ServiceKey> = inner
                .servers
                .keys()
                .filter(|k| !named.contains(*k))
                .cloned()
                .collect();
            for key in gone {
                close(inner, &key);
            }
        }
        let mut errors = Vec::new();
        for key in std::mem::take(&mut inner.unbound) {
            let Some(server) = inner.servers.get_mut(&key) else {
                continue;
            };
            match self.open(&key, server, &inner.addresses) {
                Ok(listeners) => server.listeners = listeners,
                Err(error) => {
                    tracing::error!(
                        service = %key, port = server.port, %error,
                        "cannot open the service health check; trying again on the next sync"
                    );
                    errors.push(error);
                    inner.unbound.insert(key);
                }
            }
        }
        errors
    }

    /// Opens `server`'s port on every address, or on none.
    fn open(
        &self,
        key: &ServiceKey,
        server: &Server,
        addresses: &[IpAddr],
    ) -> Result<Vec<Listener>, BindError> {
        let state = Answer {
            service: Arc::new(key.clone()),
            local_endpoints: server.local_endpoints.clone(),
            healthy: self.healthy.clone(),
        };
        let router = Router::new().fallback(answer).with_state(state);
        let mut listeners = Vec::new();
        let wildcard = [IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
        for ip in if addresses.is_empty() {
            &wildcard[..]
        } else {
            addresses
        } {
            let address = SocketAddr::new(*ip, server.port);
            let bound = listen(address).or_else(|e| {
                // No IPv6 on this node: every IPv4 address, then.
                if address.ip().is_unspecified() && e.kind() != io::ErrorKind::AddrInUse {
                    listen(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        server.port,
                    ))
                } else {
                    Err(e)
                }
            });
            let error = |source| BindError {
                service: key.clone(),
                address,
                source,
            };
            let socket = bound.map_err(error)?;
            let copy = socket.try_clone().map_err(error)?;
            let _entered = self.runtime.enter();
            let listener = tokio::net::TcpListener::from_std(socket.into()).map_err(error)?;
            let router = router.clone();
            let task = self
                .runtime
                .spawn(server::serve(listener, router, Limits::DEFAULT));
            listeners.push(Listener {
                socket: copy,
                task: task.abort_handle(),
            });
        }
        Ok(listeners)
    }

    /// The ports being served, by Service (a port not open yet is not listed).
    #[must_use]
    pub fn serving(&self) -> BTreeMap<ServiceKey, u16> {
        let inner = self.lock();
        inner
            .servers
            .iter()
            .filter(|(k, _)| !inner.unbound.contains(*k))
            .map(|(k, s)| (k.clone(), s.port))
            .collect()
    }
}

/// Sets a Service's count, or (a new Service, a new port) its server to open.
fn set(inner: &mut Inner, key: ServiceKey, d: Desired) {
    if let Some(s) = inner.servers.get(&key).filter(|s| s.port == d.port) {
        s.local_endpoints
            .store(d.local_endpoints, Ordering::Relaxed);
        return;
    }
    close(inner, &key);
    let port = d.port;
    tracing::info!(service = %key, port, "opening the service health check");
    let server = Server {
        port,
        local_endpoints: Arc::new(AtomicUsize::new(d.local_endpoints)),
        listeners: Vec::new(),
    };
    inner.servers.insert(key.clone(), server);
    inner.unbound.insert(key);
}

fn close(inner: &mut Inner, key: &ServiceKey) {
    if let Some(server) = inner.servers.remove(key) {
        tracing::info!(service = %key, port = server.port, "closing the service health check");
    }
    inner.unbound.remove(key);
}
