//! The host's side of the VM: Debian packages that provide qemu and the tools copied into
//! the initramfs, installed with apt-get when missing.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

/// Packages the VM needs on the host: qemu to run it, the rest to be copied into it.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "dash",
    "bash",
    "kmod",
    "ipvsadm",
    "ipset",
    "iptables",
    "iproute2",
    "conntrack",
];

/// Installed versions of [`PACKAGES`], installing the missing ones first. The versions key
/// the initramfs cache: a tool upgrade on the host rebuilds it.
pub fn ensure_packages() -> Result<BTreeMap<String, String>> {
    ensure(PACKAGES)
}

/// Installed versions of `packages`, installing the missing ones first.
pub fn ensure(packages: &[&str]) -> Result<BTreeMap<String, String>> {
    let installed = installed_versions(packages)?;
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !installed.contains_key(*p))
        .collect();
    if missing.is_empty() {
        return Ok(installed);
    }
    eprintln!("xtask: installing host packages: {}", missing.join(" "));
    apt_update()?;
    let status = Command::new("apt-get")
        .args(["install", "--yes", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .context("running apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    let installed = installed_versions(packages)?;
    if let Some(still) = packages.iter().find(|p| !installed.contains_key(**p)) {
        bail!("package {still} is still not installed after apt-get install");
    }
    Ok(installed)
}

/// Runs `apt-get update` at most once per xtask run.
pub fn apt_update() -> Result<()> {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    eprintln!("vm: apt-get update");
    let status = Command::new("apt-get")
        .args(["update", "--quiet"])
        .stdout(Stdio::null())
        .status()
        .context("running apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status})");
    }
    Ok(())
}

fn installed_versions(packages: &[&str]) -> Result<BTreeMap<String, String>> {
    // dpkg-query exits non-zero when a package is unknown, but still lists the others.
    let output = Command::new("dpkg-query")
        .args([
            "--show",
            "--showformat=${Package} ${db:Status-Abbrev} ${Version}\n",
        ])
        .args(packages)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (name, status, version) = (words.next()?, words.next()?, words.next()?);
            (status == "ii").then(|| (name.to_owned(), version.to_owned()))
        })
        .collect())
}
