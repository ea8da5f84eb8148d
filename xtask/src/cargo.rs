//! What xtask asks of cargo: the workspace's layout (`cargo metadata`) and builds whose
//! artifacts it needs to find (`--message-format=json`).

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The cargo that runs us (so that toolchain overrides carry over).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

#[derive(Debug)]
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    pub packages: Vec<Package>,
}

#[derive(Debug)]
pub struct Package {
    pub name: String,
    /// The folder holding the package's Cargo.toml.
    pub dir: PathBuf,
    pub targets: Vec<Target>,
}

#[derive(Debug)]
pub struct Target {
    pub name: String,
    pub kinds: Vec<String>,
}

impl Package {
    /// Names of this package's targets of one kind (`test`, `example`, `bin`).
    pub fn targets_of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.targets
            .iter()
            .filter(move |t| t.kinds.iter().any(|k| k == kind))
            .map(|t| t.name.as_str())
    }
}

impl Workspace {
    pub fn load() -> Result<Self> {
        let output = cargo()
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo metadata")?;
        if !output.status.success() {
            bail!("cargo metadata failed ({})", output.status);
        }
        let meta: Value =
            serde_json::from_slice(&output.stdout).context("parsing cargo metadata")?;
        let members: Vec<&str> = meta["workspace_members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let packages = meta["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
            .map(|p| Package {
                name: str_field(p, "name"),
                dir: PathBuf::from(str_field(p, "manifest_path"))
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                targets: p["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| Target {
                        name: str_field(t, "name"),
                        kinds: t["kind"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .map(String::from)
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Self {
            root: PathBuf::from(str_field(&meta, "workspace_root")),
            target_dir: PathBuf::from(str_field(&meta, "target_directory")),
            packages,
        })
    }

    pub fn package(&self, name: &str) -> Option<&Package> {
        self.packages.iter().find(|p| p.name == name)
    }
}

fn str_field(value: &Value, key: &str) -> String {
    value[key].as_str().unwrap_or_default().to_owned()
}

/// An executable that cargo built.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub package_dir: PathBuf,
    pub target: String,
    pub kinds: Vec<String>,
    /// Built with the test harness (`cargo test`), as opposed to a plain binary.
    pub test: bool,
    pub executable: PathBuf,
}

/// Runs a cargo build command (`build`, `test --no-run`, ...) with JSON messages and returns the
/// executables it produced. Compiler diagnostics still reach the terminal, rendered as usual.
pub fn build(args: &[&str]) -> Result<Vec<Artifact>> {
    let mut child = cargo()
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let mut artifacts = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let manifest = PathBuf::from(str_field(&message, "manifest_path"));
        artifacts.push(Artifact {
            package_dir: manifest.parent().map(Path::to_path_buf).unwrap_or_default(),
            target: str_field(&message["target"], "name"),
            kinds: message["target"]["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
            test: message["profile"]["test"].as_bool().unwrap_or(false),
            executable: PathBuf::from(executable),
        });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(artifacts)
}

/// Builds the release binaries of the workspace's root package (the daemon and its tools).
pub fn release_binaries(workspace: &Workspace) -> Result<Vec<PathBuf>> {
    let root_package = workspace
        .packages
        .iter()
        .find(|p| p.dir == workspace.root)
        .context("the workspace has no root package")?;
    let artifacts = build(&[
        "build",
        "--release",
        "--bins",
        "--package",
        &root_package.name,
    ])?;
    Ok(artifacts
        .into_iter()
        .filter(|a| a.kinds.iter().any(|k| k == "bin"))
        .map(|a| a.executable)
        .collect())
}
