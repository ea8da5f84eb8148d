//! The fallback proxier's full syncs against the real tools, in network namespaces this test
//! makes: they write only the chains that differ from the kernel, repair drift in one chain
//! without rewriting the others, leave what a from-scratch sync writes, and a change made
//! while a kernel read was in flight is not undone by the check that follows it.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use iptables::proxier::{Backend, KernelChains, Proxier, ProxierConfig, ServiceSpec, service_name};
use iptables::{Family, Flavour, Protocol, Runner};

mod common;
use common::{Netns, is_root};

impl Netns {
    fn runner(&self, flavour: Flavour) -> Runner {
        Runner::new(flavour).in_netns(&self.0)
    }

    /// Runs `iptables-<flavour> ARGS` in the namespace.
    fn ipt(&self, flavour: Flavour, args: &[&str]) {
        let tool = format!("iptables-{}", flavour.as_str());
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.0, &tool])
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{tool} {args:?}");
    }

    /// The proxy's lines of `iptables-save` (without counters), sorted.
    fn proxy_lines(&self, flavour: Flavour) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(format!("iptables-{}-save", flavour.as_str()))
            .output()
            .unwrap();
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("KUBE-"))
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
            .collect();
        lines.sort();
        lines
    }
}

/// `count` ClusterIP Services of three endpoints; `moved` gives Service 0 another third one.
fn services(count: u8, moved: bool) -> Vec<ServiceSpec> {
    (0..count)
        .map(|i| {
            let mut s = ServiceSpec::cluster_ip(
                format!("full/svc-{i:03}:http"),
                Protocol::Tcp,
                [10, 96, 0, i].into(),
                80,
            );
            s.node_port = (i % 5 == 0).then_some(30_000 + u16::from(i));
            s.backends = (0..3u8)
                .map(|e| {
                    let e = if moved && i == 0 && e == 2 { 9 } else { e };
                    Backend::ready(SocketAddr::new(IpAddr::from([10, 200, i, e]), 8080), false)
                })
                .collect();
            s
        })
        .collect()
}

fn config() -> ProxierConfig {
    ProxierConfig {
        local: iptables::LocalDetector::Cidr("10.200.0.0/16".parse().unwrap()),
        ..ProxierConfig::default()
    }
}

/// The chain KUBE-SERVICES sends the ClusterIP `ip` to.
fn chain_of(lines: &[String], ip: &str) -> String {
    lines
        .iter()
        .find(|l| l.starts_with("-A KUBE-SERVICES") && l.contains(&format!("-d {ip}/32")))
        .and_then(|l| l.rsplit(" -j ").next())
        .unwrap()
        .to_owned()
}

fn drift_is_repaired_alone(flavour: Flavour) {
    let ns = Netns::new(&format!("ipt-full-{}", flavour.as_str()));
    let runner = ns.runner(flavour);
    let specs = services(30, false);
    let mut proxier = Proxier::new(config());
    let first = proxier.sync_full(&runner, &specs).expect("first full sync");
    assert!(first.chains_written > 30 * 4, "{first:?}");
    let clean = ns.proxy_lines(flavour);

    // Unchanged: a full sync writes nothing, and neither does a check.
    let again = proxier
        .sync_full(&runner, &specs)
        .expect("second full sync");
    assert_eq!(
        (again.chains_written, again.restores),
        (0, 0),
        "unchanged: {again:?}"
    );
    proxier.watch_writes();
    let kernel = KernelChains::read(&runner, Family::V4).unwrap();
    let checked = proxier
        .check(&runner, kernel, (None, None), |_| unreachable!())
        .unwrap();
    assert_eq!(checked.rules, 0, "unchanged: {checked:?}");

    // Drift: a rule gone from one Service's chain, a stale chain, a jump gone.
    let svc = chain_of(&clean, "10.96.0.7");
    ns.ipt(flavour, &["-t", "nat", "-D", &svc, "1"]);
    ns.ipt(flavour, &["-t", "nat", "-N", "KUBE-SEP-STALESTALESTALE"]);
    let portals = "kubernetes service portals";
    ns.ipt(
        flavour,
        &[
            "-t",
            "nat",
            "-D",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            portals,
            "-j",
            "KUBE-SERVICES",
        ],
    );
    assert_ne!(ns.proxy_lines(flavour), clean);
    proxier.watch_writes();
    let kernel = KernelChains::read(&runner, Family::V4).unwrap();
    let mut asked = Vec::new();
    let checked = proxier
        .check(&runner, kernel, (None, None), |service| {
            asked.push(service.to_owned());
            specs
                .iter()
                .filter(|s| service_name(&s.name) == service)
                .cloned()
                .collect()
        })
        .expect("check");
    assert_eq!(
        asked,
        ["full/svc-007"],
        "only the drifted Service is rendered"
    );
    assert_eq!(
        (
            checked.changed_services,
            checked.chains_written,
            checked.chains_deleted
        ),
        (1, 4, 1),
        "its KUBE-SVC and three KUBE-SEP chains, the stale chain: {checked:?}"
    );
    assert_eq!(ns.proxy_lines(flavour), clean, "repaired");

    // A change while a read is in flight: the check that follows keeps it.
    proxier.watch_writes();
    let stale_read = KernelChains::read(&runner, Family::V4).unwrap();
    let moved = services(30, true);
    let change = [("full/svc-000", vec![moved[0].clone()])];
    proxier
        .sync_services(&runner, change, || unreachable!())
        .expect("partial sync");
    let changed = ns.proxy_lines(flavour);
    let checked = proxier
        .check(&runner, stale_read, (None, None), |_| unreachable!())
        .unwrap();
    assert_eq!(checked.rules, 0, "nothing undone: {checked:?}");
    assert_eq!(ns.proxy_lines(flavour), changed);

    // What the checks and partial syncs left is what a full sync from scratch writes.
    let fresh = Netns::new(&format!("ipt-full-{}-fresh", flavour.as_str()));
    Proxier::new(config())
        .sync_full(&fresh.runner(flavour), &moved)
        .unwrap();
    assert_eq!(changed, fresh.proxy_lines(flavour));
    let again = proxier.sync_full(&runner, &moved).unwrap();
    assert_eq!(again.chains_written, 0, "{again:?}");
}

#[test]
fn drift_in_one_chain_is_repaired_alone_with_iptables_nft() {
    if !is_root() {
        eprintln!("skipping: needs root to create network namespaces");
        return;
    }
    drift_is_repaired_alone(Flavour::Nft);
}

#[test]
fn drift_in_one_chain_is_repaired_alone_with_iptables_legacy() {
    if !is_root() {
        eprintln!("skipping: needs root to create network namespaces");
        return;
    }
    drift_is_repaired_alone(Flavour::Legacy);
}
