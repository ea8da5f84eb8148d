//! Project tasks: `cargo xtask vm`, `cargo xtask vm-test`, `cargo xtask test`, `cargo xtask bench`,
//! `cargo xtask fuzz`.
//!
//! The host kernel has no IPVS, so these tasks carry the project's programs into a VM whose
//! kernel has it (see `vm`) and run them there. Usage: docs/testing.md.

mod bench;
mod cargo;
mod fuzz;
mod test;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "ipvs-proxy's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run a command as root in a VM whose kernel has IPVS; exit with its status.
    ///
    /// The project's release binaries are on PATH; ipvsadm, iptables (nft and legacy), ipset,
    /// iproute2 and busybox are there too.
    Vm {
        #[command(flatten)]
        options: vm::VmOptions,
        /// Do not build the project's release binaries (they will not be in the VM).
        #[arg(long)]
        no_build: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// The main job on the bundled example, in the VM: ipvs-proxy follows manifests/examples,
    /// then `ipvsadm -ln` and requests answered through a ClusterIP by three pods.
    Demo {
        #[command(flatten)]
        options: vm::VmOptions,
    },
    /// Build the VM tests (tests/vm_*.rs) and run them in one VM.
    VmTest(test::VmTestArgs),
    /// Run every test: the host's (`cargo test --workspace`), then the VM's.
    Test(test::VmTestArgs),
    /// Build the example `bench_NAME` in release mode and run it in the VM (or on the host).
    Bench {
        #[command(flatten)]
        options: vm::VmOptions,
        /// Run it on the host instead, for benchmarks that need no kernel (e.g. `fleet`).
        #[arg(long)]
        host: bool,
        /// The benchmark: the example `bench_NAME` of some workspace package.
        name: String,
        /// Arguments for the benchmark.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the cargo-fuzz targets (fuzz/) and run each for a bounded time; fail on a crash.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<i32> {
    match task {
        Task::Vm {
            options,
            no_build,
            command,
        } => run_vm(&options, no_build, &command),
        Task::Demo { mut options } => {
            let workspace = cargo::Workspace::load()?;
            let script = workspace.root.join("xtask/scripts/demo.sh");
            let examples = workspace.root.join("manifests/examples");
            options.includes.extend([script.clone(), examples.clone()]);
            let command = [
                "sh".to_owned(),
                script.display().to_string(),
                examples.display().to_string(),
            ];
            run_vm(&options, false, &command)
        }
        Task::VmTest(args) => test::vm_test(&args),
        Task::Test(args) => test::all(&args),
        Task::Bench {
            options,
            host,
            name,
            args,
        } => bench::run(&options, host, &name, &args),
        Task::Fuzz(args) => fuzz::run(&args),
    }
}

fn run_vm(options: &vm::VmOptions, no_build: bool, command: &[String]) -> Result<i32> {
    let workspace = cargo::Workspace::load()?;
    let bin = if no_build {
        Vec::new()
    } else {
        cargo::release_binaries(&workspace)
            .context("building the project's release binaries (--no-build skips them)")?
    };
    let run = vm::Run {
        options,
        default_timeout: Duration::from_secs(600),
        target_dir: &workspace.target_dir,
        files: vm::RunFiles {
            script: vm::shell_command(command),
            bin,
            ..vm::RunFiles::default()
        },
        cwd: std::env::current_dir()?,
    };
    Ok(run.boot(&mut |_| true)?.exit_code())
}

/// The workspace's own files, for VM runs that read sources or fixtures: all but target/ and .git.
fn workspace_tree(workspace: &cargo::Workspace) -> (PathBuf, Vec<PathBuf>) {
    (
        workspace.root.clone(),
        vec![workspace.target_dir.clone(), workspace.root.join(".git")],
    )
}
