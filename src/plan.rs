//! `ipvs-proxy plan`: compute the desired kernel state from a source and print it in the
//! kernel tools' own formats, without touching the kernel.

use std::io::Write;

use controllers::manifests::read_dir;
use reconciler::fallback::plan_iptables_mode;
use reconciler::plan::Planner;
use reconciler::render::Section;
use reconciler::state::ClusterState;

use crate::config::ProxyConfig;
use crate::flags::{PlanArgs, PlanSection, ProxyMode};

/// Exit status: the plan was printed.
pub const EXIT_OK: u8 = 0;
/// Exit status: nothing could be read (or the configuration is invalid).
pub const EXIT_NOTHING_READ: u8 = 1;
/// Exit status: the request cannot be served (bad flags, mode not available).
pub const EXIT_USAGE: u8 = 2;

/// The objects of a manifest directory; `None` (reported to `err`) when nothing could be read.
fn read_manifests(dir: &std::path::Path, err: &mut dyn Write) -> Option<Vec<controllers::Event>> {
    let snapshot = match read_dir(dir) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "error: {e}: {}", e.source);
            return None;
        }
    };
    for e in &snapshot.errors {
        let _ = writeln!(err, "warning: {e}");
    }
    if snapshot.objects.is_empty() {
        let _ = writeln!(
            err,
            "error: no Service, EndpointSlice or Node could be read from {} ({} files)",
            dir.display(),
            snapshot.files
        );
        return None;
    }
    Some(snapshot.events())
}

/// Lists Services, EndpointSlices and this node once from the Kubernetes API (`plan` without
/// `--manifests`): `--kubeconfig`, `--master`, or in-cluster, as the daemon.
fn read_cluster(config: &ProxyConfig) -> anyhow::Result<Vec<controllers::Event>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = controllers::kube_source::client(
            config.kubeconfig.as_deref(),
            config.master.as_deref(),
        )
        .await?;
        Ok(controllers::kube_source::list_once(client, &config.node_name()).await?)
    })
}

/// Runs `plan`, writing the plan to `out` and reports to `err`. Returns the exit status.
pub fn run(args: &PlanArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let config = match ProxyConfig::resolve(&args.flags) {
        Ok((config, unknown)) => {
            for field in unknown {
                let _ = writeln!(err, "warning: unknown field in --config file: {field}");
            }
            config
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return EXIT_NOTHING_READ;
        }
    };
    let events = match &config.manifests {
        Some(dir) => match read_manifests(dir, err) {
            Some(events) => events,
            None => return EXIT_NOTHING_READ,
        },
        None => match read_cluster(&config) {
            Ok(events) => events,
            Err(e) => {
                let _ = writeln!(err, "error: reading from the Kubernetes API: {e:#}");
                return EXIT_NOTHING_READ;
            }
        },
    };
    let mut state = ClusterState::new();
    controllers::apply_all(&mut state, events);
    let plan_config = config.settings().plan_config(&state);
    if plan_config.node_port_ips.is_empty() {
        let _ = writeln!(
            err,
            "warning: no address for node {:?} (no Node object of that name, no --node-ip): NodePorts are not planned",
            &*plan_config.node_name
        );
    }

    if config.mode == ProxyMode::Iptables {
        // kube-proxy's iptables rules, per family, as `iptables-save` / `ip6tables-save` print
        // them. `--only` takes `iptables` here (the other sections do not exist in this mode).
        if args.only.is_some_and(|o| o != PlanSection::Iptables) {
            let _ = writeln!(
                err,
                "error: --proxy-mode iptables has only the iptables section"
            );
            return EXIT_USAGE;
        }
        let text = plan_iptables_mode(&state, &plan_config, args.only.is_none());
        return if out.write_all(text.as_bytes()).is_ok() {
            EXIT_OK
        } else {
            EXIT_NOTHING_READ
        };
    }

    let plan = Planner::new(plan_config.clone()).plan(&state);
    for w in &plan.warnings {
        let _ = writeln!(err, "warning: {w}");
    }
    let only = args.only.map(|only| match only {
        PlanSection::Ipvs => Section::Ipvs,
        PlanSection::Addresses => Section::Addresses,
        PlanSection::Ipsets => Section::Ipsets,
        PlanSection::Iptables => Section::Iptables,
    });
    let text = plan.render(&plan_config, only);
    if out.write_all(text.as_bytes()).is_err() {
        return EXIT_NOTHING_READ;
    }
    EXIT_OK
}
