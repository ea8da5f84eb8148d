//! `ipvs-proxy plan`: compute the desired kernel state from a source and print it in the
//! kernel tools' own formats, without touching the kernel.

use std::io::Write;

use controllers::kube_source::list_once_blocking;
use controllers::manifests::read_once;
use reconciler::fallback::plan_iptables_mode;
use reconciler::plan::{PlanConfig, Planner};
use reconciler::state::ClusterState;

use crate::config::ProxyConfig;
use crate::flags::{PlanArgs, PlanSection, ProxyFlags, ProxyMode};

/// Exit status: the plan was printed.
pub const EXIT_OK: u8 = 0;
/// Exit status: nothing could be read (or the configuration is invalid).
pub const EXIT_NOTHING_READ: u8 = 1;
/// Exit status: the request cannot be served (bad flags, mode not available).
pub const EXIT_USAGE: u8 = 2;

/// What `plan` and `check` start from: the configuration, the cluster as the source has it
/// (`--manifests`, else the Kubernetes API as the daemon reaches it) and the planner's
/// settings for it. `None` when nothing could be read, reported to `err`.
pub fn source(
    flags: &ProxyFlags,
    err: &mut dyn Write,
) -> Option<(ProxyConfig, ClusterState, PlanConfig)> {
    let config = match ProxyConfig::resolve(flags) {
        Ok((config, unknown)) => {
            for field in unknown {
                let _ = writeln!(err, "warning: unknown field in --config file: {field}");
            }
            config
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return None;
        }
    };
    let (kubeconfig, master) = (config.kubeconfig.as_deref(), config.master.as_deref());
    // The objects are converted as the daemon on this node converts them (its endpoints).
    let node_name = config.node_name();
    let events = match &config.manifests {
        Some(dir) => read_once(dir).map(|snapshot| {
            for e in &snapshot.errors {
                let _ = writeln!(err, "warning: {e}");
            }
            snapshot.events(&node_name)
        }),
        None => list_once_blocking(kubeconfig, master, &node_name).map_err(|e| {
            format!(
                "reading from the Kubernetes API: {:#}",
                anyhow::Error::from(e)
            )
        }),
    };
    let events = match events {
        Ok(events) => events,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return None;
        }
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
    Some((config, state, plan_config))
}

/// Runs `plan`, writing the plan to `out` and reports to `err`. Returns the exit status.
pub fn run(args: &PlanArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let Some((config, state, plan_config)) = source(&args.flags, err) else {
        return EXIT_NOTHING_READ;
    };

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
    let text = plan.render(&plan_config, args.only.map(PlanSection::section));
    if out.write_all(text.as_bytes()).is_err() {
        return EXIT_NOTHING_READ;
    }
    EXIT_OK
}
