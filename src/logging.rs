//! Logging with `tracing`, levelled like kube-proxy's `-v`.
//!
//! Some dependencies log through the `log` crate instead (netlink-sys, netlink-packet-route,
//! notify, and rustls under kube); the subscriber bridges them so one `-v` controls
//! everything. `RUST_LOG`, when set, overrides the mapping.

use tracing_subscriber::EnvFilter;

use crate::flags::LogFormat;

/// The `tracing` filter for a kube-proxy verbosity: 0–1 info, 2–4 debug, 5 and up trace.
#[must_use]
pub fn filter_for_verbosity(verbosity: u8) -> &'static str {
    match verbosity {
        0 | 1 => "info",
        2..=4 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber. Logs go to stderr, as kube-proxy's (klog's) do.
pub fn init(verbosity: u8, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(filter_for_verbosity(verbosity)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_maps_like_kube_proxys_levels() {
        assert_eq!(filter_for_verbosity(0), "info");
        assert_eq!(filter_for_verbosity(2), "debug");
        assert_eq!(filter_for_verbosity(4), "debug");
        assert_eq!(filter_for_verbosity(5), "trace");
    }
}
