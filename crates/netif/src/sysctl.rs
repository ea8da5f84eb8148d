//! The kernel's network settings under `/proc/sys` (`sysctl -w net.ipv4.ip_forward=1`), set
//! the way kube-proxy sets them: written only when they differ, a refusal logged, not fatal.

use std::fs;

/// Sets `/proc/sys/<path>` to `value` unless it holds that already (`sysctl -w`).
pub fn ensure(path: &str, value: &str) {
    let file = format!("/proc/sys/{path}");
    match fs::read_to_string(&file) {
        Ok(current) if current.trim() == value => {}
        _ => match fs::write(&file, value) {
            Ok(()) => tracing::info!(sysctl = path, value, "set"),
            Err(e) => tracing::warn!(sysctl = path, value, error = %e, "cannot set"),
        },
    }
}

/// The kernel's release as (major, minor), from `/proc/sys/kernel/osrelease` (`uname -r`).
#[must_use]
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}
