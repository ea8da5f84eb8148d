//! `cargo xtask bench NAME [ARGS]`: benchmarks are examples named `bench_NAME` in any
//! workspace package (e.g. `crates/ipvs/examples/bench_ipvs.rs`). One is built in release
//! mode and run in the VM, in its package's folder, with the workspace's sources alongside;
//! with `--host`, on the host in the same folder (for benchmarks that need no kernel).

use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cargo::{self, Workspace};
use crate::vm;

/// Host packages a benchmark run on the host uses, installed when missing.
const HOST_PACKAGES: &[(&str, &[&str])] = &[
    // Counts the instructions of each change.
    ("bench_change", &["valgrind"]),
];

pub fn run(options: &vm::VmOptions, host: bool, name: &str, args: &[String]) -> Result<i32> {
    let workspace = Workspace::load()?;
    let example = format!("bench_{}", name.strip_prefix("bench_").unwrap_or(name));
    let Some(package) = workspace
        .packages
        .iter()
        .find(|p| p.targets_of_kind("example").any(|e| e == example))
    else {
        let mut known: Vec<String> = workspace
            .packages
            .iter()
            .flat_map(|p| {
                p.targets_of_kind("example")
                    .filter_map(|e| e.strip_prefix("bench_"))
                    .map(|n| format!("{n} ({})", p.name))
            })
            .collect();
        known.sort();
        if known.is_empty() {
            bail!(
                "no benchmark {name}: there are none yet (examples named bench_NAME in a workspace package)"
            );
        }
        bail!(
            "no benchmark {name} (an example {example}); there are: {}",
            known.join(", ")
        );
    };
    let artifacts = cargo::build(&[
        "build",
        "--release",
        "--package",
        &package.name,
        "--example",
        &example,
    ])?;
    let executable = artifacts
        .into_iter()
        .find(|a| a.target == example)
        .map(|a| a.executable)
        .context("cargo built no benchmark executable")?;

    if host {
        // The kernel tools a host benchmark's daemon runs (iptables-legacy-restore for the
        // fallback's floor, ipset, conntrack), as the host tests use them.
        vm::ensure_packages()?;
        if let Some((_, packages)) = HOST_PACKAGES.iter().find(|(b, _)| *b == example) {
            vm::ensure(packages)?;
        }
        let status = std::process::Command::new(&executable)
            .args(args)
            .current_dir(&package.dir)
            .status()
            .with_context(|| format!("running {}", executable.display()))?;
        return Ok(status.code().unwrap_or(1));
    }
    let mut command = vec![executable.to_string_lossy().into_owned()];
    command.extend(args.iter().cloned());
    let (tree, exclude) = crate::workspace_tree(&workspace);
    let run = vm::Run {
        options,
        default_timeout: Duration::from_secs(3600),
        target_dir: &workspace.target_dir,
        files: vm::RunFiles {
            script: vm::shell_command(&command),
            bin: vec![executable.clone()],
            includes: vec![tree, executable],
            exclude,
            ..vm::RunFiles::default()
        },
        cwd: package.dir.clone(),
    };
    Ok(run.boot(&mut |_| true)?.exit_code())
}
