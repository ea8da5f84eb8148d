//! A full write of the ipvs-mode sets against the real `ipset`, in a network namespace this
//! test makes: sets that fit keep their content and get only the members that differ, a set
//! too small and a missing one are built in their twin and swapped in, a twin a killed run
//! left is removed, a set the proxy does not own is never touched, and a second write of the
//! same sets runs nothing.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use iptables::ipvs_mode::KubeSet;
use iptables::{Family, Flavour, Protocol, Runner, SetEntry, SetHeader};

mod common;
use common::{Netns, is_root};

impl Netns {
    /// `ipset ARGS` in the namespace: what it printed.
    fn ipset(&self, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "ipset"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("ipset");
        let mut input = child.stdin.take().expect("stdin");
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "ipset {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The members `ipset list` prints for `name`, sorted.
    fn members(&self, name: &str) -> Vec<String> {
        let out = self.ipset(&["list", name], None);
        let mut members: Vec<String> = out
            .lines()
            .skip_while(|l| !l.starts_with("Members:"))
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        members.sort();
        members
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn loop_back(pod: u8) -> SetEntry {
    SetEntry::IpPortIp(ip(pod), Protocol::Tcp, 8080, ip(pod))
}

fn cluster_ip(vip: u8) -> SetEntry {
    SetEntry::IpPort(ip(vip), Protocol::Tcp, 80)
}

#[test]
fn a_full_write_of_the_sets_patches_what_fits_rebuilds_the_rest_and_touches_nothing_else() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let ns = Netns::new("ipset-full");
    // A previous run's state: the loop-back set with one member too many and one missing, the
    // ClusterIP set made too small for what is wanted now, a twin a killed run left, and a
    // set of someone else's.
    ns.ipset(
        &["restore"],
        Some(
            "create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536\n\
             add KUBE-LOOP-BACK 10.0.0.1,tcp:8080,10.0.0.1\n\
             add KUBE-LOOP-BACK 10.0.0.2,tcp:8080,10.0.0.2\n\
             create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 64 maxelem 64\n\
             add KUBE-CLUSTER-IP 10.0.0.100,tcp:80\n\
             create KUBE~NODE-PORT-TCP bitmap:port range 0-65535\n\
             create OTHER hash:ip family inet\n\
             add OTHER 10.0.0.9\n",
        ),
    );
    let runner = Runner::new(Flavour::Nft).in_netns(&ns.0);
    let wanted_sets = [
        (KubeSet::LoopBack, vec![loop_back(2), loop_back(3)]),
        (
            KubeSet::ClusterIp,
            (100..200).map(cluster_ip).collect::<Vec<_>>(),
        ),
        (KubeSet::NodePortTcp, vec![SetEntry::Port(30080)]),
        (KubeSet::IpvsIps, vec![]),
    ];
    let headers: Vec<SetHeader> = wanted_sets
        .iter()
        .map(|(set, members)| set.header(Family::V4, members.len()))
        .collect();
    let write = || {
        let members = wanted_sets
            .iter()
            .enumerate()
            .flat_map(|(i, (_, members))| members.iter().map(move |e| (i, e)));
        runner.ipset_restore_between(&runner.ipset_save().unwrap(), &headers, members, |i, e| {
            wanted_sets[i].1.contains(e)
        })
    };
    let sent = write().expect("the full write");
    assert!(sent > 0);

    assert_eq!(
        ns.members("KUBE-LOOP-BACK"),
        ["10.0.0.2,tcp:8080,10.0.0.2", "10.0.0.3,tcp:8080,10.0.0.3"]
    );
    let mut vips: Vec<String> = (100..200).map(|v| format!("10.0.0.{v},tcp:80")).collect();
    vips.sort();
    assert_eq!(ns.members("KUBE-CLUSTER-IP"), vips);
    assert!(
        ns.ipset(&["list", "KUBE-CLUSTER-IP"], None)
            .contains("maxelem 65536"),
        "the ClusterIP set was rebuilt with room for what is wanted"
    );
    assert_eq!(ns.members("KUBE-NODE-PORT-TCP"), ["30080"]);
    assert!(ns.members("KUBE-IPVS-IPS").is_empty());
    let names = ns.ipset(&["list", "-n"], None);
    assert!(!names.contains("KUBE~"), "no twin is left: {names}");
    assert_eq!(
        ns.members("OTHER"),
        ["10.0.0.9"],
        "another's set is untouched"
    );

    assert_eq!(write().unwrap(), 0, "the same sets again: nothing to write");

    let theirs = [SetHeader::sized(
        "OTHER",
        iptables::SetType::HashIp,
        Family::V4,
        0,
    )];
    let refused = runner.ipset_restore_between(&[], &theirs, [], |_, _| false);
    assert!(refused.is_err(), "a set the proxy does not own is refused");
    assert_eq!(ns.members("OTHER"), ["10.0.0.9"]);
}
