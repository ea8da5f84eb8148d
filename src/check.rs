//! `ipvs-proxy check`: read the live kernel and print what differs from what the source asks
//! for (`reconciler::check` compares; this reads).

use std::io::Write;

use reconciler::check::{Observed, compare};
use reconciler::plan::Planner;

use crate::flags::{PlanArgs, PlanSection, ProxyMode};

/// The IPVS table, `kube-ipvs0`'s addresses (none without the link), `ipset save` and the
/// rules of `families` (of the flavour the node uses, found as the daemon finds it).
fn read_kernel(families: &[iptables::Family]) -> anyhow::Result<Observed> {
    let dump = ipvs::Handle::new()?.dump()?;
    let addresses = match netif::DummyLink::open(netif::KUBE_IPVS0)? {
        Some(mut link) => link.addresses()?,
        None => std::collections::BTreeSet::new(),
    };
    let runner = iptables::Runner::new(iptables::detect_flavour(None));
    let rules = families.iter().map(|&f| Ok((f, runner.save(f, None)?)));
    let rules = rules.collect::<anyhow::Result<_>>()?;
    Ok(Observed::new(dump, addresses, runner.ipset_save()?, rules))
}

/// Runs `check`: 0 when the kernel equals the plan, 1 when not (the differences on `out`), 2
/// when the source or the kernel could not be read.
pub fn run(args: &PlanArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let Some((config, state, plan_config)) = crate::plan::source(&args.flags, err) else {
        return 2;
    };
    if config.mode == ProxyMode::Iptables {
        let _ = writeln!(err, "error: check compares IPVS mode only");
        return 2;
    }
    let observed = match read_kernel(&plan_config.families) {
        Ok(observed) => observed,
        Err(e) => {
            let _ = writeln!(err, "error: reading the kernel: {e:#}");
            return 2;
        }
    };
    let plan = Planner::new(plan_config.clone()).plan(&state);
    for w in &plan.warnings {
        let _ = writeln!(err, "warning: {w}");
    }
    let report = compare(
        &plan,
        &plan_config,
        &observed,
        &config.sync_options(),
        args.only.map(PlanSection::section),
    );
    if out.write_all(report.render().as_bytes()).is_err() {
        return 2;
    }
    u8::from(!report.is_equal())
}
