//! The VM's root filesystem, in two concatenated cpio archives:
//!
//! - the **base**, cached under `target/vm/`: busybox, dash as `/bin/sh`, the real kernel tools
//!   (ipvsadm, iptables nft and legacy, ipset, iproute2, kmod) with their libraries, the
//!   kernel's network modules indexed by depmod, and `/init`. It is keyed by the kernel
//!   package, the host packages' versions and this file's recipe, and built once.
//! - the **run** archive, written for each boot: the command, its settings, the project's
//!   binaries and the `--include`d paths.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::cpio::Archive;
use super::kernel::Kernel;

const INIT: &str = include_str!("init.sh");

/// This file: any change to the recipe rebuilds the cached base.
const RECIPE: &str = include_str!("initramfs.rs");

/// Programs copied from the host, with whatever symlinks lead to them.
const TOOLS: &[&str] = &[
    "/usr/bin/busybox",
    "/usr/bin/dash",
    "/usr/bin/bash",
    "/usr/bin/ip",
    "/usr/bin/ss",
    "/usr/sbin/ipvsadm",
    "/usr/sbin/ipset",
    "/usr/sbin/conntrack",
    "/usr/bin/kmod",
    "/usr/sbin/modprobe",
    "/usr/sbin/depmod",
    "/usr/sbin/insmod",
    "/usr/sbin/rmmod",
    "/usr/sbin/modinfo",
    "/usr/sbin/lsmod",
    "/usr/bin/lsmod",
];

/// Names of iptables' multi-call binaries; every `/usr/sbin` name leading to one is copied.
const XTABLES: &[&str] = &["xtables-nft-multi", "xtables-legacy-multi"];
const XTABLES_PLUGINS: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Data files the tools read (`ipset` needs protocols and services to parse `tcp:80`).
const DATA: &[&str] = &[
    "/etc/protocols",
    "/etc/services",
    "/etc/ethertypes",
    "/etc/iproute2",
    "/usr/share/iproute2",
];

/// Busybox applets not linked: the real tools win (`ip`'s applet lacks `netns`).
const NOT_FROM_BUSYBOX: &[&str] = &["ip", "sh"];

/// Modules outside `kernel/net/` that the VM needs, beyond what `kernel/net/` pulls in.
const DRIVERS: &[&str] = &[
    "kernel/drivers/net/dummy.ko",
    "kernel/drivers/net/veth.ko",
    "kernel/drivers/net/macvlan.ko",
    "kernel/drivers/net/ipvlan/ipvlan.ko",
    "kernel/drivers/net/vxlan/vxlan.ko",
];

/// Returns the cached base archive for `kernel` and these host package versions, building it
/// if needed. The caller holds the cache lock.
pub fn ensure_base(
    cache: &Path,
    kernel: &Kernel,
    packages: &BTreeMap<String, String>,
) -> Result<PathBuf> {
    let key = fnv1a(format!("{RECIPE} {} {packages:?} {INIT}", kernel.package).as_bytes());
    let name = format!("base-{}-{key:016x}.cpio", kernel.release);
    let path = cache.join(&name);
    if path.exists() {
        return Ok(path);
    }
    eprintln!("vm: building the initramfs ({name})");
    let staging = cache.join(format!(".base-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let result = build_base(&staging, kernel, &path);
    let _ = fs::remove_dir_all(&staging);
    result?;
    // Older bases are dead weight; a run still reading one keeps its open file.
    for entry in fs::read_dir(cache)?.filter_map(Result::ok) {
        let other = entry.file_name();
        let other = other.to_string_lossy();
        if other.starts_with("base-") && other.ends_with(".cpio") && other != name {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(path)
}

fn build_base(staging: &Path, kernel: &Kernel, output: &Path) -> Result<()> {
    let root = staging.join("root");
    // Merged /usr, as on Debian: /bin/ip and /usr/bin/ip are one file.
    for dir in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "var",
        "root",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    for link in ["bin", "sbin", "lib", "lib64"] {
        symlink(format!("usr/{link}"), root.join(link))?;
    }
    symlink("../run", root.join("var/run"))?;

    let mut copier = HostCopier {
        root: root.clone(),
        seen: HashSet::new(),
        elves: BTreeSet::new(),
    };
    for tool in TOOLS {
        if fs::symlink_metadata(tool).is_ok() {
            copier.copy(Path::new(tool))?;
        }
    }
    for entry in fs::read_dir("/usr/sbin")?.filter_map(Result::ok) {
        let path = entry.path();
        let leads_to_xtables = fs::canonicalize(&path)
            .ok()
            .and_then(|target| target.file_name().map(|n| XTABLES.iter().any(|x| n == *x)))
            .unwrap_or(false);
        if leads_to_xtables {
            copier.copy(&path)?;
        }
    }
    copier.copy(Path::new(XTABLES_PLUGINS))?;
    for data in DATA {
        if fs::symlink_metadata(data).is_ok() {
            copier.copy(Path::new(data))?;
        }
    }
    copier.copy_libraries()?;

    symlink("dash", root.join("usr/bin/sh"))?;
    link_busybox_applets(&root)?;
    write_etc(&root)?;
    copy_modules(kernel, &root)?;
    let init = root.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let temp = staging.join("base.cpio");
    let mut archive = Archive::append_to(File::create(&temp)?);
    // The kernel opens /dev/console for init before anything is mounted.
    archive.char_device(Path::new("/dev/console"), 0o600, 5, 1)?;
    archive.char_device(Path::new("/dev/null"), 0o666, 1, 3)?;
    archive.copy_tree(Path::new("/"), &root, &|_| false)?;
    archive
        .finish()?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .sync_all()?;
    fs::rename(&temp, output)?;
    Ok(())
}

/// Copies host files into the image at the same paths, recreating the symlinks that lead to
/// them, and remembers ELF files so that their libraries can follow.
struct HostCopier {
    root: PathBuf,
    seen: HashSet<PathBuf>,
    elves: BTreeSet<PathBuf>,
}

impl HostCopier {
    fn copy(&mut self, path: &Path) -> Result<()> {
        if !self.seen.insert(path.to_path_buf()) {
            return Ok(());
        }
        let inside = self.root.join(path.strip_prefix("/").unwrap_or(path));
        let meta =
            fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if let Some(parent) = inside.parent() {
            fs::create_dir_all(parent)?;
        }
        if meta.file_type().is_symlink() {
            let target = fs::read_link(path)?;
            if fs::symlink_metadata(&inside).is_err() {
                symlink(&target, &inside)?;
            }
            let resolved = path.parent().unwrap_or(Path::new("/")).join(&target);
            return self.copy(&normalize(&resolved));
        }
        if meta.is_dir() {
            fs::create_dir_all(&inside)?;
            for entry in fs::read_dir(path)?.filter_map(Result::ok) {
                self.copy(&entry.path())?;
            }
            return Ok(());
        }
        // Through the image's own /lib -> usr/lib links, like on the host.
        fs::copy(path, &inside).with_context(|| format!("copying {}", path.display()))?;
        if is_elf(path)? {
            self.elves.insert(path.to_path_buf());
        }
        Ok(())
    }

    /// Copies every library `ldd` names for the copied programs and plugins.
    fn copy_libraries(&mut self) -> Result<()> {
        let libraries = libraries_of(&self.elves.iter().cloned().collect::<Vec<_>>())?;
        for library in libraries {
            self.copy(&library)?;
        }
        Ok(())
    }
}

/// The shared libraries (and the dynamic loader) that `ldd` lists for these ELF files.
pub fn libraries_of(files: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    if files.is_empty() {
        return Ok(BTreeSet::new());
    }
    // ldd exits non-zero if any file is static; the others are still listed.
    let output = Command::new("ldd")
        .args(files)
        .stderr(Stdio::null())
        .output()
        .context("running ldd")?;
    let mut libraries = BTreeSet::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let line = line.trim();
        if line.ends_with(':') {
            continue; // "/usr/sbin/ipset:", the header ldd prints when given several files
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line.split_once(" => ").map_or(line, |(_, path)| path);
        let path = path.split(" (").next().unwrap_or_default();
        if path.starts_with('/') {
            libraries.insert(PathBuf::from(path));
        } else if path == "not found" {
            bail!("ldd: a library is missing on the host: {line}");
        }
    }
    Ok(libraries)
}

fn is_elf(path: &Path) -> Result<bool> {
    let mut magic = [0; 4];
    let read = io::Read::read(&mut File::open(path)?, &mut magic)?;
    Ok(read == 4 && magic == *b"\x7fELF")
}

fn link_busybox_applets(root: &Path) -> Result<()> {
    let output = Command::new("/usr/bin/busybox")
        .arg("--list-full")
        .output()
        .context("running busybox")?;
    for applet in String::from_utf8_lossy(&output.stdout).lines() {
        let applet = Path::new(applet);
        let Some(name) = applet.file_name() else {
            continue;
        };
        if NOT_FROM_BUSYBOX.iter().any(|n| name == *n) {
            continue;
        }
        let inside = root.join(applet);
        if fs::symlink_metadata(&inside).is_err() {
            symlink("/usr/bin/busybox", &inside)?;
        }
    }
    Ok(())
}

fn write_etc(root: &Path) -> Result<()> {
    let etc = root.join("etc");
    fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n")?;
    fs::write(etc.join("hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
    fs::write(
        etc.join("nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files\n",
    )?;
    fs::write(etc.join("hostname"), "ipvs-vm\n")?;
    // Like a node: no dummy0 appearing when the dummy module loads.
    fs::create_dir_all(etc.join("modprobe.d"))?;
    fs::write(
        etc.join("modprobe.d/dummy.conf"),
        "options dummy numdummies=0\n",
    )?;
    Ok(())
}

/// Copies the network modules and everything they depend on, then indexes them with depmod.
fn copy_modules(kernel: &Kernel, root: &Path) -> Result<()> {
    let dependencies =
        fs::read_to_string(kernel.modules.join("modules.dep")).context("reading modules.dep")?;
    let mut depends: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in dependencies.lines() {
        if let Some((module, deps)) = line.split_once(':') {
            depends.insert(module, deps.split_whitespace().collect());
        }
    }
    let mut wanted: Vec<&str> = depends
        .keys()
        .copied()
        .filter(|m| m.starts_with("kernel/net/") || DRIVERS.contains(m))
        .collect();
    let mut chosen = BTreeSet::new();
    while let Some(module) = wanted.pop() {
        if chosen.insert(module) {
            wanted.extend(depends.get(module).into_iter().flatten());
        }
    }
    let modules = root.join("lib/modules").join(&kernel.release);
    for module in &chosen {
        let inside = modules.join(module);
        fs::create_dir_all(inside.parent().expect("module paths have folders"))?;
        fs::copy(kernel.modules.join(module), inside)?;
    }
    for index in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        fs::copy(kernel.modules.join(index), modules.join(index))?;
    }
    let status = Command::new("depmod")
        .arg("-b")
        .arg(root)
        .arg(&kernel.release)
        .status()?;
    if !status.success() {
        bail!("depmod failed ({status})");
    }
    Ok(())
}

/// What one boot brings on top of the base.
#[derive(Debug, Default)]
pub struct RunFiles {
    /// Shell text of `/xtask/run.env`, sourced by /init.
    pub env: String,
    /// Shell text of `/xtask/run.sh`, the command.
    pub script: String,
    /// Executables put in `/xtask/bin`, first on PATH.
    pub bin: Vec<PathBuf>,
    /// Host files and folders copied to the same absolute paths.
    pub includes: Vec<PathBuf>,
    /// Host paths left out of included folders (the workspace's target/ and .git).
    pub exclude: Vec<PathBuf>,
}

/// Writes the boot's initrd: a copy of the base followed by the run archive.
pub fn write_run_initrd(mut base: File, run: &RunFiles, output: &Path) -> Result<()> {
    let mut file = File::create(output)?;
    io::copy(&mut base, &mut file)?;
    let mut archive = Archive::append_to(file);
    archive.file(Path::new("/xtask/run.env"), 0o644, run.env.as_bytes())?;
    archive.file(Path::new("/xtask/run.sh"), 0o755, run.script.as_bytes())?;
    for bin in &run.bin {
        let on_path =
            Path::new("/xtask/bin").join(bin.file_name().context("a binary without a name")?);
        if run.includes.contains(bin) {
            archive.symlink(&on_path, bin)?; // debug binaries are large: one copy is enough
        } else {
            archive.copy_file(&on_path, bin)?;
        }
    }
    let skip = |path: &Path| run.exclude.iter().any(|e| e == path);
    let mut elves = run.bin.clone();
    for include in &run.includes {
        archive.copy_tree(include, include, &skip)?;
        if include.is_file() && is_elf(include)? {
            elves.push(include.clone());
        }
    }
    // The base has the tools' libraries; the project's programs may need others (libgcc_s).
    // Each is written under its folder's real path, since the base has /lib as a symlink.
    for library in libraries_of(&elves)? {
        let folder = fs::canonicalize(library.parent().unwrap_or(Path::new("/")))?;
        archive.copy_file(
            &folder.join(library.file_name().context("a library without a name")?),
            &library,
        )?;
    }
    archive.finish()?.flush()?;
    Ok(())
}

/// Makes `a/b/../c` into `a/c` without touching the filesystem (symlink targets are text).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// FNV-1a: a stable hash for cache keys (std's hasher may change between Rust releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
