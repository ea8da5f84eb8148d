//! Serving an axum `Router` with bounds, for every HTTP server of the proxy (these service
//! health servers, and the daemon's `/healthz` and `/metrics`): a client that connects and
//! sends nothing, sends its headers a byte at a time or keeps a connection idle, and a flood
//! of connections, can hold neither memory nor the servers' probes for long.
//!
//! `axum::serve` sets none of hyper's limits (without a timer, hyper has no header timeout),
//! so connections are served here with hyper's own HTTP/1 settings:
//! - at most [`Limits::connections`] at once per listener; beyond that the listener stops
//!   accepting, so a new connection waits in the kernel's backlog until one closes;
//! - the request headers must arrive within [`Limits::header_read`], the first request's and
//!   every later one's on a kept-alive connection (so an idle connection closes after it too);
//! - headers are read into at most [`Limits::buffer`] bytes;
//! - a connection is asked to close after [`Limits::lifetime`] (after the request in flight),
//!   and dropped if it is still open [`Limits::header_read`] later.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub connections: usize,
    /// How long a client has to send a request's headers (and how long a kept-alive
    /// connection may sit idle).
    pub header_read: Duration,
    /// The read buffer of a connection, which bounds the headers of a request.
    pub buffer: usize,
    /// How long one connection is served.
    pub lifetime: Duration,
}

impl Limits {
    /// What every server of the proxy uses. Probes (kubelet's, a load balancer's) send their
    /// request at once and are answered in milliseconds, and Prometheus scrapes every 15 s or
    /// more: 5 s for the headers and 128 connections leave them untouched, while 128 stalled
    /// clients cost at most 128 × 16 KiB of buffers.
    pub const DEFAULT: Limits = Limits {
        connections: 128,
        header_read: Duration::from_secs(5),
        buffer: 16 * 1024,
        lifetime: Duration::from_secs(60),
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// Serves `router` on `listener` within `limits`, until the future is dropped (dropping it
/// stops accepting; connections already accepted finish on their own tasks, within their
/// lifetime).
pub async fn serve(listener: TcpListener, router: Router, limits: Limits) {
    let slots = std::sync::Arc::new(Semaphore::new(limits.connections));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return; // the semaphore is never closed
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // back off briefly rather than spin.
                tracing::debug!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .max_buf_size(limits.buffer);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = tokio::time::sleep(limits.lifetime) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(limits.header_read, connection).await;
                }
            }
            drop(slot);
        });
    }
}
