//! client-go's client-side rate limit (`clientConnection.qps` / `burst`, `--kube-api-qps` /
//! `--kube-api-burst`), which kube-rs lacks, as a tower layer under the kube [`Client`]: a
//! token bucket of `burst` tokens refilled at `qps` per second, shared by every request of the
//! client, as client-go's clientset shares one `flowcontrol.NewTokenBucketRateLimiter`.
//!
//! As client-go's `rest.Request`: lists, gets and writes (Events) wait for a token before they
//! are sent; watches do not (`Request.Watch` skips the limiter, and streaming lists are
//! watches), so following the API costs tokens only for paginated lists and Events. kube's own
//! retries (429, 503, 504) run below this layer and take no token, where client-go's take one.
//!
//! [`Client`]: kube::Client

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::Request;
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::{BoxError, Layer, Service, ServiceExt as _};

/// client-go's defaults (`rest.DefaultQPS`, `rest.DefaultBurst`), for a zero qps or burst.
const DEFAULT_QPS: f32 = 5.0;
const DEFAULT_BURST: u32 = 10;

/// Requests waiting in the layer's queue to the inner service, as many as kube's own.
const QUEUE: usize = 1024;

/// A client-side rate limit: at most `burst` requests at once, then `qps` per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    qps: f64,
    burst: u32,
}

impl RateLimit {
    /// The limit client-go applies for `qps` and `burst`: none for a negative `qps`
    /// (unlimited; also an infinite or NaN one, which client-go's limiter lets all through),
    /// client-go's defaults (5 per second, bursts of 10) for zeros.
    #[must_use]
    pub fn new(qps: f32, burst: u32) -> Option<RateLimit> {
        if qps < 0.0 || !qps.is_finite() {
            return None;
        }
        let qps = if qps == 0.0 { DEFAULT_QPS } else { qps };
        let burst = if burst == 0 { DEFAULT_BURST } else { burst };
        Some(RateLimit {
            qps: f64::from(qps),
            burst,
        })
    }

    /// The layer, with a full bucket: the first `burst` requests go at once.
    #[must_use]
    pub fn layer(self) -> Throttle {
        Throttle(Arc::new(Bucket {
            limit: self,
            state: Mutex::new(Tokens {
                left: f64::from(self.burst),
                at: Instant::now(),
            }),
        }))
    }
}

/// The tokens of a bucket when last counted.
#[derive(Debug)]
struct Tokens {
    /// Below zero when requests wait: each has reserved the token it waits for.
    left: f64,
    at: Instant,
}

#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    state: Mutex<Tokens>,
}

impl Bucket {
    /// Takes a token, or reserves the next one and sleeps until it is refilled, as
    /// `golang.org/x/time/rate`'s `Wait`: waiters go in the order they came and nothing polls.
    /// (A request dropped while it waits keeps its reservation; client-go hands it back, which
    /// matters only to a client that drops requests, and ours drops them only at shutdown.)
    async fn take(&self) {
        let wait = {
            let mut tokens = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let refilled = now.duration_since(tokens.at).as_secs_f64() * self.limit.qps;
            tokens.left = (tokens.left + refilled).min(f64::from(self.limit.burst)) - 1.0;
            tokens.at = now;
            (tokens.left < 0.0).then(|| Duration::from_secs_f64(-tokens.left / self.limit.qps))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The layer of one [`RateLimit`]: every service it wraps shares its bucket.
#[derive(Debug, Clone)]
pub struct Throttle(Arc<Bucket>);

impl<S> Layer<S> for Throttle
where
    S: Service<Request<kube::client::Body>> + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send + Sync,
{
    type Service = Throttled<S>;

    fn layer(&self, inner: S) -> Throttled<S> {
        Throttled {
            // A queue in front of the inner service, so that a request can reach it after its
            // wait without holding up the requests behind it (watches).
            inner: Buffer::new(inner, QUEUE),
            bucket: self.0.clone(),
        }
    }
}

/// A service whose requests, watches excepted, wait for a token of the bucket.
#[derive(Debug)]
pub struct Throttled<S>
where
    S: Service<Request<kube::client::Body>>,
{
    inner: Buffer<Request<kube::client::Body>, S::Future>,
    bucket: Arc<Bucket>,
}

impl<S> Service<Request<kube::client::Body>> for Throttled<S>
where
    S: Service<Request<kube::client::Body>> + Send + 'static,
    S::Response: Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send + Sync,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is awaited in the request's own future, after its wait.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let inner = self.inner.clone();
        let bucket = (!is_watch(&request)).then(|| self.bucket.clone());
        Box::pin(async move {
            if let Some(bucket) = bucket {
                bucket.take().await;
            }
            inner.oneshot(request).await
        }) as Pin<Box<_>>
    }
}

/// A watch (`watch=true` or `watch=1` in the query, as the API server reads it).
fn is_watch<B>(request: &Request<B>) -> bool {
    request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_client_gos() {
        let limit = |qps, burst| RateLimit::new(qps, burst).map(|l| (l.qps, l.burst));
        assert_eq!(limit(5.0, 10), Some((5.0, 10)));
        assert_eq!(limit(0.0, 0), Some((5.0, 10)));
        assert_eq!(limit(0.5, 1), Some((0.5, 1)));
        assert_eq!(limit(-1.0, 10), None);
        assert_eq!(limit(f32::INFINITY, 10), None);
        assert_eq!(limit(f32::NAN, 10), None);
    }

    #[test]
    fn watches_are_told_by_their_query() {
        let get = |uri: &str| Request::get(uri).body(()).unwrap();
        assert!(is_watch(&get(
            "/api/v1/services?watch=true&resourceVersion=5"
        )));
        assert!(is_watch(&get("/api/v1/nodes?fieldSelector=x&watch=1")));
        assert!(!is_watch(&get("/api/v1/services?limit=500")));
        assert!(!is_watch(&get("/api/v1/services?watchful=true")));
        assert!(!is_watch(&get("/api/v1/services")));
    }

    /// On tokio's paused clock: the n-th of many takes at once ends at (n - burst) / qps.
    #[tokio::test(start_paused = true)]
    async fn takes_beyond_the_burst_wait_their_turn() {
        let bucket = RateLimit::new(4.0, 3).unwrap().layer().0;
        let start = Instant::now();
        let ends = futures::future::join_all((0..7).map(|_| {
            let bucket = bucket.clone();
            async move {
                bucket.take().await;
                start.elapsed()
            }
        }))
        .await;
        let ms: Vec<u128> = ends.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 0, 0, 250, 500, 750, 1000]);
        // Idle for a while, the bucket refills up to its burst only.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let again = Instant::now();
        for _ in 0..4 {
            bucket.take().await;
        }
        assert_eq!(again.elapsed().as_millis(), 250);
    }
}
