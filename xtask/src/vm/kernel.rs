//! Debian's cloud kernel: which one, downloading it, and unpacking it into the cache.
//!
//! `linux-image-cloud-amd64` is a meta package; it depends on the real, versioned one
//! (`linux-image-6.1.0-N-cloud-amd64`). That package is fetched with `apt-get download` and
//! unpacked with `dpkg -x` (never installed), then `depmod` indexes its modules.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::host;

const META_PACKAGE: &str = "linux-image-cloud-amd64";
/// Changes (its modification time) whenever `apt-get update` brings new package lists.
const APT_LISTS: &str = "/var/lib/apt/lists";

/// An unpacked kernel in the cache.
#[derive(Debug)]
pub struct Kernel {
    /// The versioned package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// `uname -r`, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the package, indexed by depmod.
    pub modules: PathBuf,
}

/// Returns the current cloud kernel, downloading it into `cache` (under `kernel/`) if it is not
/// there yet. The caller holds the cache lock.
pub fn ensure(cache: &Path) -> Result<Kernel> {
    let kernels = cache.join("kernel");
    let package = match current_package(&kernels) {
        Ok(package) => package,
        Err(error) => {
            // Offline, or apt's lists are gone: any kernel we already have will do.
            let Some(cached) = newest_cached(&kernels) else {
                return Err(error);
            };
            eprintln!("vm: {error:#}; using the cached {cached}");
            cached
        }
    };
    let dir = kernels.join(&package);
    if !dir.join("vmlinuz").exists() {
        download(&package, &kernels, &dir)?;
    }
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    Ok(Kernel {
        vmlinuz: dir.join("vmlinuz"),
        modules: dir.join("lib/modules").join(&release),
        package,
        release,
    })
}

/// The versioned kernel package the meta package currently depends on. apt-cache takes a
/// second or more, so its answer is kept in `kernel/resolved` until apt's lists change.
fn current_package(kernels: &Path) -> Result<String> {
    let lists_changed = fs::metadata(APT_LISTS).and_then(|m| m.modified()).ok();
    let remembered = kernels.join("resolved");
    let stamp = lists_changed.map(|t| format!("{t:?}"));
    if let (Some(stamp), Ok(text)) = (&stamp, fs::read_to_string(&remembered))
        && let Some((package, when)) = text.trim().split_once(' ')
        && when == stamp
        && kernels.join(package).join("vmlinuz").exists()
    {
        return Ok(package.to_owned());
    }
    let package = ask_apt()?;
    if let Some(stamp) = stamp {
        fs::create_dir_all(kernels)?;
        fs::write(&remembered, format!("{package} {stamp}\n"))?;
    }
    Ok(package)
}

fn ask_apt() -> Result<String> {
    for attempt in 0..2 {
        if attempt == 1 {
            host::apt_update()?;
        }
        let output = Command::new("apt-cache")
            .args(["depends", META_PACKAGE])
            .stderr(Stdio::null())
            .output()
            .context("running apt-cache")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let found = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Depends: "))
            .find(|dep| dep.starts_with("linux-image-") && dep.ends_with("-cloud-amd64"));
        if let Some(package) = found {
            return Ok(package.to_owned());
        }
    }
    bail!("apt-cache does not know {META_PACKAGE}'s kernel package")
}

fn newest_cached(kernels: &Path) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(kernels)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| {
            name.starts_with("linux-image-") && kernels.join(name).join("vmlinuz").exists()
        })
        .collect();
    names.sort_by_key(|name| version_key(name));
    names.pop()
}

/// Orders `linux-image-6.1.0-56-...` by its numbers, so that 56 sorts after 9.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn download(package: &str, kernels: &Path, dir: &Path) -> Result<()> {
    eprintln!("vm: downloading {package}");
    let temp = kernels.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&temp);
    fs::create_dir_all(&temp)?;
    // apt-get download hands the fetch to its unprivileged _apt user, who must write here.
    fs::set_permissions(&temp, fs::Permissions::from_mode(0o777))?;
    let run = |command: &mut Command| -> Result<()> {
        let status = command
            .status()
            .with_context(|| format!("running {command:?}"))?;
        if !status.success() {
            bail!("{command:?} failed ({status})");
        }
        Ok(())
    };
    run(Command::new("apt-get")
        .args(["download", "--quiet", package])
        .current_dir(&temp)
        .stdout(Stdio::null()))?;
    let deb = fs::read_dir(&temp)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = temp.join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let release = package.strip_prefix("linux-image-").unwrap_or(package);
    fs::rename(
        root.join("boot").join(format!("vmlinuz-{release}")),
        root.join("vmlinuz"),
    )
    .context("the kernel package has no /boot/vmlinuz")?;
    // Debian packages hold no module index; depmod writes it (modules.dep, aliases).
    run(Command::new("depmod").arg("-b").arg(&root).arg(release))?;
    fs::remove_dir_all(root.join("boot"))?;
    fs::remove_dir_all(root.join("usr")).ok();
    fs::remove_dir_all(root.join("etc")).ok();
    // Atomic: a kernel directory with a vmlinuz is always complete.
    fs::rename(&root, dir).with_context(|| format!("moving the kernel into {}", dir.display()))?;
    fs::remove_dir_all(&temp)?;
    Ok(())
}
