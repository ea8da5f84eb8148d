//! `ipvs-proxy plan` on the shipped examples, checked for what an operator would read.

use std::path::Path;
use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/examples");
    Command::new(env!("CARGO_BIN_EXE_ipvs-proxy"))
        .arg("plan")
        .arg("--manifests")
        .arg(examples)
        .args(args)
        .output()
        .expect("run ipvs-proxy plan")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn plan_prints_every_section_in_order_with_the_examples_state() {
    let text = stdout(&plan(&["--hostname-override", "node-a"]));
    let headers: Vec<&str> = text.lines().filter(|l| l.starts_with("# ")).collect();
    assert_eq!(
        headers,
        [
            "# ipvsadm -Sn",
            "# kube-ipvs0",
            "# ipset save",
            "# iptables-save",
            "# ip6tables-save"
        ]
    );
    for line in [
        // ClusterIP with its three ready endpoints.
        "-A -t 10.96.0.20:80 -s rr",
        "-a -t 10.96.0.20:80 -r 10.244.2.7:8080 -m -w 1",
        // UDP DNS, the terminating endpoint left out while a ready one exists.
        "-a -u 10.96.0.10:53 -r 10.244.1.2:53 -m -w 1",
        // Scheduler annotation and ClientIP affinity; the rollout's terminating-but-serving pod.
        "-A -t 10.96.10.5:8080 -s lc -p 3600",
        "-a -t 10.96.10.5:8080 -r 10.244.1.20:8080 -m -w 1",
        // NodePort on the node's addresses.
        "-A -t 192.168.56.10:30080 -s lc -p 3600",
        "-A -t 198.51.100.10:30080 -s lc -p 3600",
        // externalTrafficPolicy: Local: only this node's endpoint behind the LB IP.
        "-a -t 198.51.100.100:80 -r 10.244.1.30:8080 -m -w 1",
        // kube-router's annotation on an externalIP Service.
        "-A -t 198.51.100.50:8443 -s sh",
        // Dual-stack.
        "-a -t [fd00:10:96::4]:9090 -r [fd00:10:244:1::50]:9090 -m -w 1",
        // kube-ipvs0.
        "10.96.0.10/32",
        "198.51.100.100/32",
        "fd00:10:96::4/128",
        // ipsets.
        "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536",
        "add KUBE-CLUSTER-IP 10.96.0.10,udp:53",
        "add KUBE-NODE-PORT-LOCAL-TCP 30800",
        "add KUBE-LOAD-BALANCER-SOURCE-CIDR 198.51.100.100,tcp:80,203.0.113.0/24",
        "add KUBE-HEALTH-CHECK-NODE-PORT 32000",
        // Rules.
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}\n{text}");
    }
    // Skipped: headless and ExternalName Services; NodePort addresses are not bound.
    assert!(!text.contains("db-headless") && !text.contains("search"));
    assert!(!text.lines().any(|l| l == "192.168.56.10/32"));
    assert!(
        !text.lines().any(|l| l.contains("-r 10.244.2.21:")),
        "a not-serving pod"
    );
}

#[test]
fn plan_is_deterministic() {
    let a = stdout(&plan(&["--hostname-override", "node-a"]));
    let b = stdout(&plan(&["--hostname-override", "node-a"]));
    assert_eq!(a, b);
}

#[test]
fn only_prints_one_section_without_its_header() {
    let ipvs = stdout(&plan(&["--hostname-override", "node-a", "--only", "ipvs"]));
    assert!(ipvs.starts_with("-A "), "{ipvs}");
    assert!(!ipvs.contains("# "));
    let addrs = stdout(&plan(&[
        "--hostname-override",
        "node-a",
        "--only",
        "addresses",
    ]));
    assert!(addrs.lines().all(|l| l.contains('/')), "{addrs}");
    let sets = stdout(&plan(&["--only", "ipsets"]));
    assert!(
        sets.lines()
            .all(|l| l.starts_with("create ") || l.starts_with("add "))
    );
    let rules = stdout(&plan(&["--only", "iptables"]));
    assert!(rules.starts_with("*nat\n"), "{rules}");
}

#[test]
fn node_ip_flag_and_daemon_flags_shape_the_plan() {
    let text = stdout(&plan(&[
        "--node-ip",
        "192.0.2.1",
        "--ipvs-scheduler",
        "wrr",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--masquerade-bit",
        "13",
    ]));
    assert!(text.contains("-A -t 192.0.2.1:30080 -s lc -p 3600\n"));
    assert!(!text.contains("192.168.56.10:30080"));
    assert!(text.contains("-A -t 10.96.0.20:80 -s wrr\n"));
    assert!(text.contains("! -s 10.244.0.0/16 -m comment"));
    assert!(text.contains("--set-xmark 0x2000/0x2000"));
}

#[test]
fn malformed_manifest_is_reported_and_the_rest_is_planned() {
    let dir = std::env::temp_dir().join(format!("ipvs-proxy-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: x}]}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ipvs-proxy"))
        .args(["plan", "--only", "ipvs", "--manifests"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("a.yaml: document 1: invalid Service"),
        "{stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "-A -t 10.96.0.1:80 -s rr\n"
    );

    // Nothing readable: non-zero.
    std::fs::write(dir.join("a.yaml"), "kind: [\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ipvs-proxy"))
        .args(["plan", "--manifests"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_scheduler_annotation_is_reported_naming_the_service() {
    let dir = std::env::temp_dir().join(format!("ipvs-proxy-plan-sched-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("s.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: odd, namespace: team, annotations: {ipvs-proxy.io/scheduler: fastest}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ipvs-proxy"))
        .args(["plan", "--only", "ipvs", "--manifests"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    assert!(
        stderr.contains("team/odd") && stderr.contains("\"fastest\""),
        "{stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "-A -t 10.96.0.1:80 -s rr\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn iptables_mode_prints_kube_proxys_chains_with_statistic_probabilities() {
    let text = stdout(&plan(&[
        "--hostname-override",
        "node-a",
        "--proxy-mode",
        "iptables",
    ]));
    let headers: Vec<&str> = text.lines().filter(|l| l.starts_with("# ")).collect();
    assert_eq!(headers, ["# iptables-save", "# ip6tables-save"]);
    // web (default/web:http) has three endpoints: 1/3, 1/2, then the last unconditionally.
    let svc = text
        .lines()
        .find(|l| l.starts_with("-A KUBE-SERVICES -d 10.96.0.20/32"))
        .expect("KUBE-SERVICES jumps to web's chain");
    let chain = svc.rsplit(' ').next().unwrap();
    assert!(chain.starts_with("KUBE-SVC-"), "{svc}");
    let seps: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("-A {chain} ")) && l.contains("KUBE-SEP-"))
        .collect();
    assert_eq!(seps.len(), 3, "{seps:#?}");
    assert!(
        seps[0].contains("--probability 0.3333333333 "),
        "{}",
        seps[0]
    );
    assert!(
        seps[1].contains("--probability 0.5000000000 "),
        "{}",
        seps[1]
    );
    assert!(!seps[2].contains("statistic"), "{}", seps[2]);
    assert!(
        !text.contains("# ipvsadm"),
        "no IPVS state in iptables mode"
    );
}

/// Each `--detect-local-mode` in both proxiers' `plan`: the ClusterIP masquerade rule as
/// kube-proxy writes it, from the flags or the example Node's podCIDRs.
#[test]
fn plan_prints_each_detect_local_modes_masquerade_rules() {
    let masq = "-m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set";
    for (flags, ipv4, ipv6) in [
        (
            &["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56"][..],
            "! -s 10.244.0.0/16 ",
            "! -s fd00:10:244::/56 ",
        ),
        (
            &["--detect-local-mode", "NodeCIDR"][..],
            "! -s 10.244.1.0/24 ",
            "! -s fd00:10:244:1::/64 ",
        ),
        (
            &[
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "cbr0",
            ][..],
            "! -i cbr0 ",
            "! -i cbr0 ",
        ),
        (
            &[
                "--detect-local-mode",
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix",
                "veth",
            ][..],
            "! -i veth+ ",
            "! -i veth+ ",
        ),
    ] {
        let mut args = vec!["--hostname-override", "node-a", "--only", "iptables"];
        args.extend_from_slice(flags);
        let text = stdout(&plan(&args));
        let rules: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("cluster ip + port for masquerade purpose"))
            .collect();
        assert_eq!(
            rules,
            [
                format!("-A KUBE-SERVICES {ipv4}{masq} KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"),
                format!(
                    "-A KUBE-SERVICES {ipv6}{masq} KUBE-6-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"
                )
            ],
            "{flags:?}"
        );
        // The fallback's ClusterIP masquerade of web, with the same fragment.
        let mut args = vec!["--hostname-override", "node-a", "--proxy-mode", "iptables"];
        args.extend_from_slice(flags);
        let text = stdout(&plan(&args));
        let web = text.lines().find(|l| {
            l.contains("-d 10.96.0.20/32")
                && l.contains("cluster IP")
                && l.ends_with("-j KUBE-MARK-MASQ")
        });
        let web = web.unwrap_or_else(|| panic!("{flags:?}: no masquerade rule for web\n{text}"));
        let fragment = ipv4.trim_end();
        assert!(web.contains(fragment), "{flags:?}: {web}");
    }
}

#[test]
fn check_exits_2_when_the_source_cannot_be_read() {
    let out = Command::new(env!("CARGO_BIN_EXE_ipvs-proxy"))
        .args(["check", "--manifests", "/nonexistent/manifests"])
        .output()
        .expect("run ipvs-proxy check");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/manifests"), "{err}");
    assert!(out.stdout.is_empty());
}
