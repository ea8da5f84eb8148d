//! The comparison of `check`, against kernels built from the plan itself (equal state) and
//! changed by hand. The same is proven against the real kernel in the VM (`tests/vm_check.rs`).

use std::net::{IpAddr, SocketAddr};

use iptables::{Family, Saved, SetEntry, Table};
use ipvs::{Protocol as IpvsProtocol, RealServer, ServiceKey, VirtualServer};

use super::*;
use crate::model::{
    Conditions, Endpoint, EndpointPort, EndpointSlice, Hints, Protocol, ServiceName, ServicePort,
    ServicePortName,
};
use crate::plan::Planner;
use crate::state::ClusterState;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn config() -> PlanConfig {
    PlanConfig {
        node_name: "node-a".into(),
        node_addresses: vec![ip("192.168.56.10")],
        node_port_ips: vec![ip("192.168.56.10")],
        families: vec![Family::V4],
        ..PlanConfig::default()
    }
}

/// `web`: 10.96.0.20:80 with two ready endpoints.
fn plan() -> Plan {
    let name = ServicePortName {
        service: ServiceName::new("ns", "web"),
        port: "".into(),
        protocol: Protocol::Tcp,
    };
    let port = ServicePort::cluster_ip(name.clone(), 80, &[ip("10.96.0.20")]);
    let endpoint = |addr: &str| Endpoint {
        ip: ip(addr),
        port: 8080,
        conditions: Conditions {
            ready: true,
            serving: true,
            terminating: false,
        },
        // On node-b, not this node (node-a).
        local: false,
        hints: Hints::default(),
    };
    let mut state = ClusterState::new();
    state.upsert_slice(
        ("ns".into(), "web-1".into()),
        EndpointSlice {
            service: name.service.clone(),
            ports: vec![EndpointPort {
                name: "".into(),
                protocol: Protocol::Tcp,
                endpoints: vec![endpoint("10.244.1.5"), endpoint("10.244.2.7")].into(),
            }],
        },
    );
    state.upsert_service(name.service, vec![port]);
    Planner::new(config()).plan(&state)
}

/// The kernel as the sync leaves it for `plan`, read back in the kernel's own ways: real
/// servers in another order, sets with the kernel's sizes.
fn kernel_of(plan: &Plan) -> Observed {
    let ipvs = plan
        .virtual_servers
        .values()
        .map(|v| {
            let mut reals = v.real_servers.clone();
            reals.reverse();
            (v.virtual_server.clone(), reals)
        })
        .rev()
        .collect();
    let sets = plan
        .sets
        .iter()
        .map(|((family, set), entries)| {
            let mut s = set.to_ipset(*family, entries);
            s.header.hashsize = 4096;
            s
        })
        .collect();
    let rules = config()
        .families
        .iter()
        .map(|&f| (f, Saved::parse(&plan.render_iptables(&config(), f))))
        .collect();
    Observed {
        ipvs,
        addresses: plan.addresses.clone(),
        sets,
        rules,
    }
}

fn ownership() -> SyncOptions {
    SyncOptions {
        exclude_cidrs: vec!["10.97.0.0/16".parse().unwrap()],
        ..SyncOptions::default()
    }
}

fn check(kernel: &Observed) -> Report {
    compare(&plan(), &config(), kernel, &ownership(), None)
}

fn tcp(addr: &str) -> ServiceKey {
    let addr: SocketAddr = addr.parse().unwrap();
    ServiceKey::Addr {
        protocol: IpvsProtocol::Tcp,
        addr,
    }
}

#[test]
fn kernel_as_synced_equals_the_plan_and_prints_nothing() {
    let report = check(&kernel_of(&plan()));
    assert!(report.is_equal(), "{}", report.render());
    assert_eq!(report.render(), "");
}

#[test]
fn deleted_virtual_server_is_missing_with_its_real_servers() {
    let mut kernel = kernel_of(&plan());
    kernel.ipvs.retain(|(vs, _)| vs.key != tcp("10.96.0.20:80"));
    let report = check(&kernel);
    assert!(!report.is_equal());
    assert_eq!(
        report.render(),
        "# ipvsadm -Sn\n\
         + -A -t 10.96.0.20:80 -s rr\n\
         + -a -t 10.96.0.20:80 -r 10.244.1.5:8080 -m -w 1\n\
         + -a -t 10.96.0.20:80 -r 10.244.2.7:8080 -m -w 1\n"
    );
}

#[test]
fn added_real_server_is_extra_and_a_draining_one_is_not() {
    let mut kernel = kernel_of(&plan());
    let reals = &mut kernel.ipvs[0].1;
    reals.push(RealServer::masquerade("10.244.9.9:8080".parse().unwrap()));
    reals.push(RealServer {
        weight: 0,
        ..RealServer::masquerade("10.244.3.3:8080".parse().unwrap())
    });
    assert_eq!(
        check(&kernel).render(),
        "# ipvsadm -Sn\n- -a -t 10.96.0.20:80 -r 10.244.9.9:8080 -m -w 1\n"
    );
}

#[test]
fn changed_scheduler_is_one_line_missing_and_one_extra() {
    let mut kernel = kernel_of(&plan());
    kernel.ipvs[0].0.scheduler = ipvs::Scheduler::WeightedLeastConnection;
    assert_eq!(
        check(&kernel).render(),
        "# ipvsadm -Sn\n+ -A -t 10.96.0.20:80 -s rr\n- -A -t 10.96.0.20:80 -s wlc\n"
    );
}

#[test]
fn foreign_and_excluded_virtual_servers_are_not_reported() {
    let mut kernel = kernel_of(&plan());
    let foreign = [
        // Not on kube-ipvs0, not a node address.
        tcp("10.99.0.1:80"),
        // A node address, outside the NodePort range.
        tcp("192.168.56.10:8080"),
    ];
    for key in foreign {
        let reals = vec![RealServer::masquerade("10.244.9.9:80".parse().unwrap())];
        kernel
            .ipvs
            .push((VirtualServer::new(key, ipvs::Scheduler::RoundRobin), reals));
    }
    kernel.ipvs.push((
        VirtualServer::new(
            ServiceKey::Fwmark {
                family: Family::V4,
                mark: 42,
            },
            ipvs::Scheduler::RoundRobin,
        ),
        Vec::new(),
    ));
    // On kube-ipvs0, but inside --ipvs-exclude-cidrs.
    kernel.addresses.insert(ip("10.97.0.1"));
    kernel.ipvs.push((
        VirtualServer::new(tcp("10.97.0.1:80"), ipvs::Scheduler::RoundRobin),
        Vec::new(),
    ));
    let report = check(&kernel);
    assert!(report.is_equal(), "{}", report.render());
}

#[test]
fn left_over_node_port_and_kube_ipvs0_address_are_extra() {
    let mut kernel = kernel_of(&plan());
    kernel.ipvs.push((
        VirtualServer::new(tcp("192.168.56.10:30080"), ipvs::Scheduler::RoundRobin),
        Vec::new(),
    ));
    kernel.addresses.insert(ip("10.96.0.99"));
    assert_eq!(
        check(&kernel).render(),
        "# ipvsadm -Sn\n- -A -t 192.168.56.10:30080 -s rr\n\
         # kube-ipvs0\n- 10.96.0.99/32\n"
    );
}

#[test]
fn set_members_differ_and_foreign_sets_are_not_reported() {
    let mut kernel = kernel_of(&plan());
    let cluster_ip = kernel
        .sets
        .iter_mut()
        .find(|s| s.name() == "KUBE-CLUSTER-IP")
        .expect("planned");
    cluster_ip.entries.clear();
    cluster_ip
        .entries
        .insert(SetEntry::IpPort(ip("10.96.0.99"), Protocol::Tcp, 80));
    kernel.sets.push(iptables::IpSet::new(
        "my-set",
        iptables::ipset::SetType::HashIp,
        Family::V4,
        [SetEntry::Ip(ip("10.0.0.1"))].into(),
    ));
    kernel.sets.retain(|s| s.name() != "KUBE-LOOP-BACK");
    let text = check(&kernel).render();
    assert!(text.starts_with("# ipset save\n"), "{text}");
    for line in [
        "+ add KUBE-CLUSTER-IP 10.96.0.20,tcp:80",
        "- add KUBE-CLUSTER-IP 10.96.0.99,tcp:80",
        "+ create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    assert!(!text.contains("my-set"), "{text}");
}

#[test]
fn only_compares_the_section_asked_for() {
    let mut kernel = kernel_of(&plan());
    kernel.ipvs.clear();
    kernel.addresses.clear();
    let report = compare(
        &plan(),
        &config(),
        &kernel,
        &ownership(),
        Some(Section::Ipsets),
    );
    assert!(report.is_equal(), "{}", report.render());
}

#[test]
fn removed_and_added_rules_of_our_chains_are_reported_and_other_chains_are_not() {
    let mut kernel = kernel_of(&plan());
    let nat = kernel.rules[0].1.tables.get_mut(&Table::Nat).expect("nat");
    let masq = "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000";
    assert!(nat.rules.iter().any(|r| r == masq), "{:#?}", nat.rules);
    nat.rules.retain(|r| r != masq);
    // Counters and another tool's chain and rules, as iptables-save prints them.
    nat.chains.insert("MY-CHAIN".into());
    nat.rules.push("-A MY-CHAIN -j ACCEPT".into());
    nat.rules.push("-A PREROUTING -j MY-CHAIN".into());
    nat.rules
        .push("-A KUBE-SERVICES -s 10.0.0.0/8 -j RETURN".into());
    assert_eq!(
        check(&kernel).render(),
        format!("# iptables-save -t nat\n+ {masq}\n- -A KUBE-SERVICES -s 10.0.0.0/8 -j RETURN\n")
    );
}
