//! `kubernetes_build_info`: a gauge at 1 whose labels say what was built, under component-base's
//! label names (`major`, `minor`, `git_version`, `git_commit`, `git_tree_state`, `build_date`,
//! `go_version`, `compiler`, `platform`), filled with what is true of this binary:
//! - `major`, `minor`, `git_version` (`v0.1.0`): ipvs-proxy's own version, not Kubernetes';
//! - `git_commit`, `git_tree_state`, `build_date`: from `IPVS_PROXY_GIT_COMMIT`,
//!   `IPVS_PROXY_GIT_TREE_STATE` and `IPVS_PROXY_BUILD_DATE` at build time, else upstream's
//!   values for an unstamped build (empty, empty, `1970-01-01T00:00:00Z`);
//! - `go_version`: the Rust compiler's, as `rustc1.89.0` (upstream's reads `go1.24.4`);
//! - `compiler`: `rustc`; `platform`: Go's names, e.g. `linux/amd64`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

/// The labels of `kubernetes_build_info`.
#[derive(Debug, Clone, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfo {
    pub major: &'static str,
    pub minor: &'static str,
    pub git_version: String,
    pub git_commit: &'static str,
    pub git_tree_state: &'static str,
    pub build_date: &'static str,
    pub go_version: String,
    pub compiler: &'static str,
    pub platform: String,
}

impl BuildInfo {
    /// This binary's.
    #[must_use]
    pub fn current() -> BuildInfo {
        BuildInfo {
            major: env!("CARGO_PKG_VERSION_MAJOR"),
            minor: env!("CARGO_PKG_VERSION_MINOR"),
            git_version: format!("v{}", env!("CARGO_PKG_VERSION")),
            git_commit: option_env!("IPVS_PROXY_GIT_COMMIT").unwrap_or_default(),
            git_tree_state: option_env!("IPVS_PROXY_GIT_TREE_STATE").unwrap_or_default(),
            build_date: option_env!("IPVS_PROXY_BUILD_DATE").unwrap_or("1970-01-01T00:00:00Z"),
            go_version: format!("rustc{}", env!("TELEMETRY_RUSTC_VERSION")),
            compiler: "rustc",
            platform: format!(
                "{}/{}",
                std::env::consts::OS,
                go_arch(std::env::consts::ARCH)
            ),
        }
    }
}

/// Go's `GOARCH` for Rust's architecture names, so `platform` reads as upstream's does.
fn go_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(1_i64);
        let help = "A metric with a constant '1' value labeled by major, minor, git version, \
                    git commit, git tree state, build date, Go version, and compiler from which \
                    Kubernetes was built, and platform on which it is running.";
        let mut family =
            encoder.encode_descriptor("kubernetes_build_info", help, None, gauge.metric_type())?;
        gauge.encode(family.encode_family(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_platform_uses_go_names() {
        assert_eq!(go_arch("x86_64"), "amd64");
        assert_eq!(go_arch("aarch64"), "arm64");
        assert_eq!(go_arch("s390x"), "s390x");
        let info = BuildInfo::current();
        assert!(info.platform.starts_with("linux/"), "{info:?}");
        assert!(info.go_version.starts_with("rustc1."), "{info:?}");
        assert_eq!(info.git_version, format!("v{}", env!("CARGO_PKG_VERSION")));
    }
}
