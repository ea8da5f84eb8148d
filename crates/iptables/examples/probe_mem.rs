use iptables::proxier::{
    Backend, Fingerprint, KernelChains, Proxier, ProxierConfig, ServiceSpec, render,
};
use iptables::{Protocol, Saved};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
fn rss() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}
fn main() {
    let n: u32 = 10000;
    let r0 = rss();
    let specs: Vec<ServiceSpec> = (0..n)
        .map(|i| {
            let [_, _, hi, lo] = i.to_be_bytes();
            let mut s = ServiceSpec::cluster_ip(
                format!("bench/svc-{i}:http"),
                Protocol::Tcp,
                IpAddr::V4(Ipv4Addr::new(10, 96, hi, lo)),
                80,
            );
            s.backends = (0..10)
                .map(|e| {
                    let n = i * 12 + e;
                    let [_, o2, o3, o4] = n.to_be_bytes();
                    Backend::ready(
                        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 128 + o2, o3, o4)), 8080),
                        false,
                    )
                })
                .collect();
            s
        })
        .collect();
    let r1 = rss();
    println!("specs: {} MiB", (r1 - r0) / 1024);
    let config = ProxierConfig::default();
    let rendered = render(&config, &specs);
    let r2 = rss();
    println!("Rendered (every rule as a Rule): {} MiB", (r2 - r1) / 1024);
    let rs = rendered.full_ruleset(&config);
    let r3 = rss();
    println!("full_ruleset clone: {} MiB", (r3 - r2) / 1024);
    let text = rs.render();
    let r4 = rss();
    println!(
        "restore text: {} MiB ({} bytes)",
        (r4 - r3) / 1024,
        text.len()
    );
    let saved_text = std::fs::read_to_string("/tmp/probe/saved.txt").unwrap();
    let r5 = rss();
    println!("iptables-save text: {} MiB", (r5 - r4) / 1024);
    let saved = Saved::parse(&saved_text);
    let r6 = rss();
    println!("Saved::parse: {} MiB", (r6 - r5) / 1024);
    let kernel = KernelChains::parse(&saved_text);
    let r7 = rss();
    println!("KernelChains: {} MiB", (r7 - r6) / 1024);
    let fps: Vec<(Box<str>, u64)> = rendered
        .services
        .values()
        .flat_map(|s| {
            s.chains
                .iter()
                .map(|(n, r)| (n.as_str().into(), Fingerprint::of(r).ordered))
        })
        .collect();
    let r8 = rss();
    println!("fingerprints of own chains: {} MiB", (r8 - r7) / 1024);
    let mut p = Proxier::new(config.clone());
    let plan = p.plan_full(&specs, &Saved::default());
    p.commit(plan);
    let r9 = rss();
    println!(
        "plan_full + commit (mirror, transient plan): {} MiB",
        (r9 - r8) / 1024
    );
    std::hint::black_box((&rendered, &rs, &text, &saved, &kernel, &fps, &p));
}
