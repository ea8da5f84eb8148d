//! kube-proxy's histogram buckets (`pkg/proxy/metrics`), so its dashboards' quantiles read the
//! same from ipvs-proxy.

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// For sync durations: 1 ms doubling to about 16 s.
#[must_use]
pub fn sync() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// For network programming latency: 0.25 s and 0.5 s, every second to 59 s, every 5 s to
/// 115 s, every 30 s to 5 minutes.
#[must_use]
pub fn network_programming() -> Histogram {
    let quarter = [0.25, 0.5];
    let seconds = (1..60).map(f64::from);
    let five = (0..12).map(|i| 60.0 + 5.0 * f64::from(i));
    let thirty = (0..7).map(|i| 120.0 + 30.0 * f64::from(i));
    Histogram::new(quarter.into_iter().chain(seconds).chain(five).chain(thirty))
}
