//! `cargo xtask fuzz [SECONDS]`: builds the cargo-fuzz targets of `fuzz/` and runs each one
//! for a bounded time, from its seeds; fails if any target crashes, naming the input.
//!
//! Only the stable toolchain is needed: the targets are built without a sanitizer
//! (`--sanitizer none`, which needs no `-Z` flag); the code under test forbids `unsafe`, so
//! a sanitizer would find nothing a panic does not. cargo-fuzz is installed from crates.io
//! when missing. Everything written goes under the target directory: `fuzz/` (the build),
//! `fuzz/corpus/TARGET` (what the runs found, kept for the next run),
//! `fuzz/artifacts/TARGET` (crashing inputs) and `fuzz/logs/TARGET.log` (libFuzzer's output).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cargo::{Workspace, cargo};

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// How long each target runs, in seconds.
    #[arg(default_value_t = 30)]
    seconds: u64,
    /// Only this target (repeatable); default: every target of fuzz/Cargo.toml.
    #[arg(short = 't', long = "target", value_name = "TARGET")]
    targets: Vec<String>,
}

/// Seeds that live elsewhere in the tree than `fuzz/seeds/TARGET`: real samples kept for
/// their own sake.
const MORE_SEEDS: &[(&str, &str)] = &[("manifests", "manifests/examples")];

/// The flags every cargo-fuzz command gets: no sanitizer (stable), our folders.
fn cargo_fuzz(command: &str, fuzz_dir: &Path, target_dir: &Path) -> Command {
    let mut c = cargo();
    c.args(["fuzz", command, "--sanitizer", "none", "--fuzz-dir"])
        .arg(fuzz_dir)
        .arg("--target-dir")
        .arg(target_dir);
    c
}

pub fn run(args: &FuzzArgs) -> Result<i32> {
    let workspace = Workspace::load()?;
    ensure_cargo_fuzz()?;
    let fuzz_dir = workspace.root.join("fuzz");
    let out = workspace.target_dir.join("fuzz");
    let targets = if args.targets.is_empty() {
        list_targets(&fuzz_dir)?
    } else {
        args.targets.clone()
    };

    eprintln!("xtask: building the fuzz targets");
    let built = cargo_fuzz("build", &fuzz_dir, &out).status()?;
    if !built.success() {
        bail!("cargo fuzz build failed ({built})");
    }

    let mut crashed = Vec::new();
    for target in &targets {
        let corpus = out.join("corpus").join(target);
        let artifacts = out.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        // Only this run's crashes count.
        let _ = std::fs::remove_dir_all(&artifacts);
        std::fs::create_dir_all(&artifacts)?;
        let mut corpora = vec![corpus];
        corpora.extend(seeds(&workspace.root, target));

        // libFuzzer prints a line per input it keeps: into a file, shown when it fails.
        let log_path = out.join("logs").join(format!("{target}.log"));
        std::fs::create_dir_all(out.join("logs"))?;
        let log = std::fs::File::create(&log_path)?;
        eprintln!("xtask: fuzzing {target} for {} s", args.seconds);
        let status = cargo_fuzz("run", &fuzz_dir, &out)
            .arg(target)
            .args(&corpora)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            // An input that runs this long is a hang: reported like a crash.
            .arg("-timeout=10")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("running fuzz target {target}"))?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if status.success() {
            let done = text.lines().rfind(|l| l.starts_with("Done ")).unwrap_or("");
            eprintln!("xtask: fuzz {target}: {done}");
        } else {
            // From the panic (or libFuzzer's own report) on, without the backtrace's bulk.
            let lines: Vec<&str> = text.lines().collect();
            let from = lines
                .iter()
                .position(|l| {
                    l.contains("panicked at") || l.starts_with("==") && l.contains("ERROR")
                })
                .unwrap_or(lines.len().saturating_sub(40));
            for line in lines.iter().skip(from).take(40) {
                eprintln!("{line}");
            }
            eprintln!("xtask: (the whole output: {})", log_path.display());
            crashed.push((target, status, inputs(&artifacts)));
        }
    }

    for (target, status, found) in &crashed {
        eprintln!("xtask: fuzz target {target} failed ({status})");
        for input in found {
            eprintln!(
                "xtask:   crash input {}\n\
                 xtask:   reproduce: cargo fuzz run --sanitizer none --fuzz-dir fuzz {target} {}",
                input.display(),
                input.display()
            );
        }
    }
    if crashed.is_empty() {
        eprintln!(
            "xtask: {} fuzz targets ran {} s each without a crash",
            targets.len(),
            args.seconds
        );
        Ok(0)
    } else {
        Ok(1)
    }
}

/// Installs cargo-fuzz from crates.io unless `cargo fuzz` already runs.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    let status = cargo()
        .args(["install", "cargo-fuzz", "--locked"])
        .status()?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status})");
    }
    Ok(())
}

/// The targets fuzz/Cargo.toml declares (`cargo fuzz list`).
fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let output = cargo()
        .args(["fuzz", "list", "--fuzz-dir"])
        .arg(fuzz_dir)
        .output()
        .context("running cargo fuzz list")?;
    if !output.status.success() {
        bail!("cargo fuzz list failed ({})", output.status);
    }
    let targets: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!(
            "cargo fuzz list found no fuzz targets in {}",
            fuzz_dir.display()
        );
    }
    Ok(targets)
}

/// The seed folders of `target` that exist: libFuzzer reads them and writes only to the
/// first corpus (ours, under target/), so the committed seeds stay as they are.
fn seeds(root: &Path, target: &str) -> Vec<PathBuf> {
    let own = root.join("fuzz/seeds").join(target);
    let more = MORE_SEEDS
        .iter()
        .filter(|(t, _)| *t == target)
        .map(|(_, dir)| root.join(dir));
    std::iter::once(own)
        .chain(more)
        .filter(|d| d.is_dir())
        .collect()
}

/// The inputs libFuzzer wrote to `artifacts` (crash-*, timeout-*, oom-*).
fn inputs(artifacts: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(artifacts)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    found.sort();
    found
}
