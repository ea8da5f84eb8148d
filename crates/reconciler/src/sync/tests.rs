//! The engine against in-memory kernels that answer as the real ones do (EEXIST, ESRCH, ...).
//! The same behaviours are proven against the real kernel in the VM tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipvs::{
    Connections, Op, RealServer, RealServerEntry, Scheduler, ServiceKey, Stats, VirtualServer,
};

use iptables::Family;

use super::*;
use crate::testing::{FakeAddresses, FakeIpvs, FakeNetfilter};
use iptables::ipvs_mode::KubeSet;

pub(super) type TestSyncer = Syncer<FakeIpvs, FakeAddresses, FakeNetfilter>;

/// The engine over empty in-memory kernels, with the default settings.
pub(super) fn syncer() -> TestSyncer {
    Syncer::new(
        FakeIpvs::default(),
        FakeAddresses::default(),
        FakeNetfilter::default(),
        SyncOptions::default(),
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn svc(name: &str) -> ServiceName {
    ServiceName::new("default", name)
}

/// A ClusterIP Service `vip:port` over `backends` (`ip:port`), as the planner would make it.
fn target(vip: &str, port: u16, scheduler: Scheduler, backends: &[&str]) -> ServiceTarget {
    let key = ServiceKey::tcp(ip(vip), port);
    let mut target = bare_target(key, ip(vip), backends);
    target.virtual_servers[0].0.scheduler = scheduler;
    ServiceTarget {
        netfilter: vec![NetfilterEntry::Set {
            family: Family::V4,
            set: KubeSet::ClusterIp,
            entry: iptables::SetEntry::IpPort(ip(vip), iptables::Protocol::Tcp, port),
        }],
        ..target
    }
}

fn udp_target(vip: &str, port: u16, backends: &[&str]) -> ServiceTarget {
    bare_target(ServiceKey::udp(ip(vip), port), ip(vip), backends)
}

/// One round-robin virtual server `key` over `backends` (`ip:port`), its address `vip` bound,
/// no set entries.
pub(super) fn bare_target(key: ServiceKey, vip: IpAddr, backends: &[&str]) -> ServiceTarget {
    ServiceTarget {
        virtual_servers: vec![(
            VirtualServer::new(key, Scheduler::RoundRobin),
            backends
                .iter()
                .map(|b| RealServer::masquerade(b.parse().unwrap()))
                .collect(),
        )],
        addresses: vec![vip],
        netfilter: vec![],
    }
}

const RR: Scheduler = Scheduler::RoundRobin;

#[test]
fn first_full_sync_programs_everything_and_a_second_changes_nothing() {
    let mut s = syncer();
    let now = Instant::now();
    let all = vec![(
        svc("web"),
        target(
            "10.96.0.10",
            80,
            RR,
            &["10.244.1.5:8080", "10.244.2.5:8080"],
        ),
    )];
    let report = s.full_sync(all.clone(), now);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        s.ipvs.save(),
        [
            "-A -t 10.96.0.10:80 -s rr",
            "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1",
            "-a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 1",
        ]
    );
    assert_eq!(s.addresses.bound, BTreeSet::from([ip("10.96.0.10")]));
    assert_eq!(s.netfilter.entries.len(), 1);

    let report = s.full_sync(all, now);
    assert_eq!(report.ipvs_ops, 0, "{:?}", s.ipvs.log);
    assert_eq!(report.addresses_added + report.addresses_removed, 0);
}

#[test]
fn changing_one_service_touches_only_that_service() {
    let mut s = syncer();
    let now = Instant::now();
    let mut all: Vec<_> = (0..100)
        .map(|i| {
            (
                svc(&format!("s{i}")),
                target(&format!("10.96.1.{i}"), 80, RR, &["10.244.0.1:80"]),
            )
        })
        .collect();
    s.full_sync(all.clone(), now);
    s.ipvs.log.clear();

    all[42].1 = target("10.96.1.42", 80, RR, &["10.244.0.1:80", "10.244.0.2:80"]);
    let report = s.sync(vec![all[42].clone()], now);
    assert!(report.errors.is_empty());
    assert_eq!(s.ipvs.log, ["-a -t 10.96.1.42:80 -r 10.244.0.2:80 -m -w 1"]);
    assert_eq!(report.addresses_added + report.addresses_removed, 0);
}

#[test]
fn removed_tcp_endpoint_drains_before_delete() {
    let mut s = syncer();
    let t0 = Instant::now();
    let key = ServiceKey::tcp(ip("10.96.0.10"), 80);
    let gone: SocketAddr = "10.244.3.5:8080".parse().unwrap();
    s.full_sync(
        vec![(
            svc("web"),
            target(
                "10.96.0.10",
                80,
                RR,
                &["10.244.1.5:8080", "10.244.3.5:8080"],
            ),
        )],
        t0,
    );
    s.ipvs.set_connections(&key, gone, 1, 0);

    s.sync(
        vec![(
            svc("web"),
            target("10.96.0.10", 80, RR, &["10.244.1.5:8080"]),
        )],
        t0,
    );
    assert!(
        s.ipvs
            .save()
            .contains(&"-a -t 10.96.0.10:80 -r 10.244.3.5:8080 -m -w 0".to_owned())
    );
    assert_eq!(s.counts().draining, 1);

    // Still connected: stays.
    assert_eq!(s.drain(t0 + Duration::from_secs(5)).drained, 0);
    assert_eq!(s.ipvs.table[&key].1.len(), 2);
    // Connections end: deleted.
    s.ipvs.set_connections(&key, gone, 0, 0);
    assert_eq!(s.drain(t0 + Duration::from_secs(6)).drained, 1);
    assert_eq!(
        s.ipvs.save(),
        [
            "-A -t 10.96.0.10:80 -s rr",
            "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1"
        ]
    );
    assert_eq!(
        s.counts(),
        Counts {
            virtual_servers: 1,
            real_servers: 1,
            draining: 0
        }
    );
}

#[test]
fn draining_is_bounded_by_the_timeout() {
    let mut s = syncer();
    let t0 = Instant::now();
    let key = ServiceKey::tcp(ip("10.96.0.10"), 80);
    let stuck: SocketAddr = "10.244.3.5:8080".parse().unwrap();
    s.full_sync(
        vec![(
            svc("web"),
            target("10.96.0.10", 80, RR, &["10.244.3.5:8080"]),
        )],
        t0,
    );
    s.ipvs.set_connections(&key, stuck, 3, 1);
    s.sync(vec![(svc("web"), target("10.96.0.10", 80, RR, &[]))], t0);
    assert_eq!(s.drain(t0 + Duration::from_secs(899)).drained, 0);
    assert_eq!(s.drain(t0 + Duration::from_secs(900)).drained, 1);
}

#[test]
fn endpoint_that_comes_back_while_draining_is_restored() {
    let mut s = syncer();
    let t0 = Instant::now();
    let key = ServiceKey::tcp(ip("10.96.0.10"), 80);
    let both = ["10.244.1.5:8080", "10.244.3.5:8080"];
    s.full_sync(vec![(svc("web"), target("10.96.0.10", 80, RR, &both))], t0);
    s.ipvs.set_connections(&key, both[1].parse().unwrap(), 1, 0);
    s.sync(
        vec![(svc("web"), target("10.96.0.10", 80, RR, &both[..1]))],
        t0,
    );
    s.sync(vec![(svc("web"), target("10.96.0.10", 80, RR, &both))], t0);
    assert!(
        s.ipvs
            .save()
            .contains(&"-a -t 10.96.0.10:80 -r 10.244.3.5:8080 -m -w 1".to_owned())
    );
    assert_eq!(s.counts().draining, 0);
    assert_eq!(
        s.drain(t0 + Duration::from_secs(1000)).drained,
        0,
        "not deleted after all"
    );
}

#[test]
fn removed_udp_endpoint_is_deleted_at_once() {
    let mut s = syncer();
    let now = Instant::now();
    s.full_sync(
        vec![(
            svc("dns"),
            udp_target("10.96.0.53", 53, &["10.244.1.5:53", "10.244.2.5:53"]),
        )],
        now,
    );
    s.sync(
        vec![(svc("dns"), udp_target("10.96.0.53", 53, &["10.244.1.5:53"]))],
        now,
    );
    assert_eq!(
        s.ipvs.save(),
        [
            "-A -u 10.96.0.53:53 -s rr",
            "-a -u 10.96.0.53:53 -r 10.244.1.5:53 -m -w 1"
        ]
    );
    assert_eq!(s.counts().draining, 0);
}

#[test]
fn rebind_after_kube_ipvs0_was_deleted_binds_every_address_and_touches_nothing_else() {
    let mut s = syncer();
    let now = Instant::now();
    s.full_sync(
        vec![
            (svc("a"), target("10.96.0.10", 80, RR, &["10.244.1.5:80"])),
            (svc("b"), target("10.96.0.11", 80, RR, &["10.244.1.6:80"])),
        ],
        now,
    );
    let (table, entries) = (s.ipvs.save(), s.netfilter.entries.clone());
    let full_syncs = s.netfilter.full_syncs;
    // `ip link del kube-ipvs0`: the link, and every address on it, gone.
    s.addresses.bound.clear();
    let report = s.rebind();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.addresses_added, 2);
    assert_eq!(report.ipvs_ops, 0, "IPVS is not touched");
    assert_eq!(
        s.addresses.bound,
        BTreeSet::from([ip("10.96.0.10"), ip("10.96.0.11")])
    );
    assert_eq!(s.ipvs.save(), table);
    assert_eq!(s.netfilter.entries, entries);
    assert_eq!(
        s.netfilter.full_syncs, full_syncs,
        "nor the netfilter state"
    );
    // And the mirror knows: a later Service change unbinds as usual.
    s.sync(vec![(svc("a"), ServiceTarget::default())], now);
    assert_eq!(s.addresses.bound, BTreeSet::from([ip("10.96.0.11")]));
}

#[test]
fn deleted_service_loses_its_virtual_server_address_and_set_entries() {
    let mut s = syncer();
    let now = Instant::now();
    s.full_sync(
        vec![
            (svc("a"), target("10.96.0.10", 80, RR, &["10.244.1.5:80"])),
            (svc("b"), target("10.96.0.11", 80, RR, &["10.244.1.6:80"])),
        ],
        now,
    );
    let report = s.sync(vec![(svc("a"), ServiceTarget::default())], now);
    assert!(report.errors.is_empty());
    assert_eq!(
        s.ipvs.save(),
        [
            "-A -t 10.96.0.11:80 -s rr",
            "-a -t 10.96.0.11:80 -r 10.244.1.6:80 -m -w 1"
        ]
    );
    assert_eq!(s.addresses.bound, BTreeSet::from([ip("10.96.0.11")]));
    assert_eq!(
        s.netfilter
            .entries
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["KUBE-CLUSTER-IP 10.96.0.11,tcp:80"]
    );
}

#[test]
fn an_address_shared_by_two_services_stays_until_both_are_gone() {
    let mut s = syncer();
    let now = Instant::now();
    s.full_sync(
        vec![
            (
                svc("http"),
                target("192.0.2.10", 80, RR, &["10.244.1.5:80"]),
            ),
            (
                svc("https"),
                target("192.0.2.10", 443, RR, &["10.244.1.5:443"]),
            ),
        ],
        now,
    );
    s.sync(vec![(svc("http"), ServiceTarget::default())], now);
    assert!(s.addresses.bound.contains(&ip("192.0.2.10")));
    s.sync(vec![(svc("https"), ServiceTarget::default())], now);
    assert!(s.addresses.bound.is_empty());
}

#[test]
fn scheduler_change_updates_the_virtual_server_in_place() {
    let mut s = syncer();
    let now = Instant::now();
    s.full_sync(
        vec![(svc("web"), target("10.96.0.10", 80, RR, &["10.244.1.5:80"]))],
        now,
    );
    s.ipvs.log.clear();
    s.sync(
        vec![(
            svc("web"),
            target(
                "10.96.0.10",
                80,
                Scheduler::LeastConnection,
                &["10.244.1.5:80"],
            ),
        )],
        now,
    );
    assert_eq!(s.ipvs.log, ["-E -t 10.96.0.10:80 -s lc"]);
}

#[test]
fn full_sync_repairs_drift_and_leaves_foreign_virtual_servers_alone() {
    let mut s = syncer();
    let now = Instant::now();
    let all = vec![(svc("web"), target("10.96.0.10", 80, RR, &["10.244.1.5:80"]))];
    s.full_sync(all.clone(), now);
    // By hand: ours deleted, a foreign one added outside our VIPs, one inside an excluded range.
    s.ipvs.table.clear();
    let foreign = VirtualServer::new(ServiceKey::tcp(ip("192.168.50.1"), 22), RR);
    s.ipvs
        .table
        .insert(foreign.key, (foreign.clone(), BTreeMap::new()));
    let report = s.full_sync(all, now);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        s.ipvs.save(),
        [
            "-A -t 10.96.0.10:80 -s rr",
            "-a -t 10.96.0.10:80 -r 10.244.1.5:80 -m -w 1",
            "-A -t 192.168.50.1:22 -s rr"
        ]
    );
}

#[test]
fn excluded_cidrs_are_never_touched_even_on_kube_ipvs0() {
    let mut s = Syncer::new(
        FakeIpvs::default(),
        FakeAddresses::default(),
        FakeNetfilter::default(),
        SyncOptions {
            exclude_cidrs: vec!["10.100.0.0/16".parse().unwrap()],
            ..SyncOptions::default()
        },
    );
    let excluded = VirtualServer::new(ServiceKey::tcp(ip("10.100.0.1"), 80), RR);
    s.ipvs
        .table
        .insert(excluded.key, (excluded, BTreeMap::new()));
    s.addresses.bound.insert(ip("10.100.0.1"));
    let stale = VirtualServer::new(ServiceKey::tcp(ip("10.96.0.99"), 80), RR);
    s.ipvs.table.insert(stale.key, (stale, BTreeMap::new()));
    s.addresses.bound.insert(ip("10.96.0.99"));
    s.full_sync(vec![], Instant::now());
    assert_eq!(
        s.ipvs.save(),
        ["-A -t 10.100.0.1:80 -s rr"],
        "stale one on kube-ipvs0 removed, excluded one kept"
    );
    assert_eq!(
        s.addresses.bound.iter().copied().collect::<Vec<_>>(),
        [ip("10.100.0.1")],
        "the stale address unbound, the excluded one left bound"
    );
}

/// Upstream's rule: after a restart, a virtual server on a node address with a port in the
/// NodePort range is the proxy's even though its address is not on kube-ipvs0, so a NodePort
/// whose Service went meanwhile is deleted; one outside the range, or excluded, is not.
#[test]
fn a_stale_node_port_on_a_node_address_is_removed_after_a_restart() {
    let mut s = Syncer::new(
        FakeIpvs::default(),
        FakeAddresses::default(),
        FakeNetfilter::default(),
        SyncOptions {
            exclude_cidrs: vec!["192.168.99.0/24".parse().unwrap()],
            ..SyncOptions::default()
        },
    );
    s.reconfigure(&PlanConfig {
        node_addresses: vec![ip("192.168.56.10")],
        node_port_ips: vec![ip("192.168.56.10"), ip("192.168.10.7"), ip("192.168.99.1")],
        ..PlanConfig::default()
    });
    for (addr, port) in [
        ("192.168.56.10", 30080), // the Node's address: a stale NodePort
        ("192.168.10.7", 32767),  // another NodePort address, last port of the range
        ("192.168.56.10", 22),    // not a NodePort: another tool's
        ("192.168.10.7", 29999),  // just below the range
        ("192.168.99.1", 30080),  // excluded
        ("203.0.113.5", 30080),   // not a node address
    ] {
        let vs = VirtualServer::new(ServiceKey::tcp(ip(addr), port), RR);
        s.ipvs.table.insert(vs.key, (vs, BTreeMap::new()));
    }
    let report = s.full_sync(vec![], Instant::now());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        s.ipvs.save(),
        [
            "-A -t 192.168.10.7:29999 -s rr",
            "-A -t 192.168.56.10:22 -s rr",
            "-A -t 192.168.99.1:30080 -s rr",
            "-A -t 203.0.113.5:30080 -s rr",
        ]
    );
}

#[test]
fn restart_adopts_the_kernel_without_interrupting_it_and_restores_zero_weights() {
    let now = Instant::now();
    let all = vec![(
        svc("web"),
        target("10.96.0.10", 80, RR, &["10.244.1.5:80", "10.244.2.5:80"]),
    )];
    let mut first = syncer();
    first.full_sync(all.clone(), now);
    // The previous run had started draining 10.244.2.5 when it was killed.
    let key = ServiceKey::tcp(ip("10.96.0.10"), 80);
    first
        .ipvs
        .table
        .get_mut(&key)
        .unwrap()
        .1
        .get_mut(&"10.244.2.5:80".parse().unwrap())
        .unwrap()
        .server
        .weight = 0;

    let mut second = Syncer::new(
        std::mem::take(&mut first.ipvs),
        std::mem::take(&mut first.addresses),
        FakeNetfilter::default(),
        SyncOptions::default(),
    );
    second.ipvs.log.clear();
    let report = second.full_sync(all, now);
    assert!(report.errors.is_empty());
    assert_eq!(
        second.ipvs.log,
        ["-e -t 10.96.0.10:80 -r 10.244.2.5:80 -m -w 1"],
        "no delete, no re-add"
    );
}

#[test]
fn a_refused_operation_is_reported_for_its_service_and_the_rest_is_applied() {
    let mut s = syncer();
    let now = Instant::now();
    let report = s.full_sync(
        vec![
            (
                svc("odd"),
                target(
                    "10.96.0.20",
                    80,
                    Scheduler::TwoRandomChoices,
                    &["10.244.1.5:80"],
                ),
            ),
            (svc("web"), target("10.96.0.10", 80, RR, &["10.244.1.5:80"])),
        ],
        now,
    );
    // The kernel refused one Service: it is retried on its own, not with a full sync.
    assert!(!report.needs_full_sync());
    assert!(report.errors.iter().all(|e| e.service == Some(svc("odd"))));
    let err = &report.errors[0];
    assert_eq!(err.service, Some(svc("odd")));
    assert_eq!(err.kind(), "scheduler_missing");
    assert!(err.to_string().contains("default/odd"), "{err}");
    assert!(
        s.ipvs
            .save()
            .contains(&"-A -t 10.96.0.10:80 -s rr".to_owned())
    );
    // The failed one is retried on the next sync rather than assumed present.
    s.ipvs.log.clear();
    s.full_sync(
        vec![(
            svc("odd"),
            target("10.96.0.20", 80, Scheduler::RoundRobin, &["10.244.1.5:80"]),
        )],
        now,
    );
    assert!(
        s.ipvs.log.contains(&"-A -t 10.96.0.20:80 -s rr".to_owned()),
        "{:?}",
        s.ipvs.log
    );
}

#[test]
fn a_virtual_server_the_kernel_refused_stays_its_services_until_that_lets_it_go() {
    let mut s = syncer();
    let now = Instant::now();
    let (vip, twos) = ("10.96.0.20", Scheduler::TwoRandomChoices);
    let report = s.sync(
        vec![(svc("a"), target(vip, 80, twos, &["10.244.1.5:80"]))],
        now,
    );
    assert_eq!(report.errors[0].kind(), "scheduler_missing");
    // Not in the kernel, but a's: b is refused it, and a's retry takes it.
    let b = || (svc("b"), target(vip, 80, RR, &["10.244.9.9:80"]));
    let report = s.sync(vec![b()], now);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(report.errors[0].service, Some(svc("b")));
    assert!(
        report.errors[0].to_string().contains("default/a"),
        "{}",
        report.errors[0]
    );
    assert!(s.ipvs.save().is_empty(), "{:?}", s.ipvs.save());
    let report = s.sync(
        vec![(svc("a"), target(vip, 80, RR, &["10.244.1.5:80"]))],
        now,
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        s.ipvs.save()[1],
        "-a -t 10.96.0.20:80 -r 10.244.1.5:80 -m -w 1"
    );
    // Refused again, then let go: b has it.
    s.sync(
        vec![(svc("a"), target(vip, 80, twos, &["10.244.1.5:80"]))],
        now,
    );
    s.sync(vec![(svc("a"), ServiceTarget::default())], now);
    let report = s.sync(vec![b()], now);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        s.ipvs.save()[1],
        "-a -t 10.96.0.20:80 -r 10.244.9.9:80 -m -w 1"
    );
}

#[test]
fn two_services_claiming_one_virtual_server_is_reported_not_fought_over() {
    let mut s = syncer();
    let now = Instant::now();
    let report = s.full_sync(
        vec![
            (svc("a"), target("192.0.2.1", 80, RR, &["10.244.1.5:80"])),
            (svc("b"), target("192.0.2.1", 80, RR, &["10.244.9.9:80"])),
        ],
        now,
    );
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].service, Some(svc("b")));
    assert_eq!(
        s.ipvs.save()[1],
        "-a -t 192.0.2.1:80 -r 10.244.1.5:80 -m -w 1"
    );
}

#[test]
fn a_full_sync_larger_than_one_batch_is_sent_in_several_and_errors_keep_their_service() {
    let mut s = syncer();
    let now = Instant::now();
    // 11 operations a Service: enough Services for three batches.
    let n = OPS_PER_BATCH * 3 / 11;
    let backends: Vec<String> = (1..=10).map(|j| format!("10.244.0.{j}:8080")).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let name = |i: usize| svc(&format!("s{i}"));
    let vip = |i: usize| format!("10.96.{}.{}", i / 250, i % 250 + 1);
    let targets = (0..n).map(|i| {
        let scheduler = if i == n - 2 {
            Scheduler::TwoRandomChoices
        } else {
            RR
        };
        (name(i), target(&vip(i), 80, scheduler, &backends))
    });
    let report = s.full_sync(targets, now);
    assert_eq!(report.services, n);
    assert_eq!(report.ipvs_ops, n * 11);
    assert!(
        s.ipvs.batches.len() >= 3 && s.ipvs.batches.iter().all(|&b| b < OPS_PER_BATCH + 11),
        "{:?}",
        s.ipvs.batches
    );
    // The refused Service (in the last batch) is named; its ten real servers fail with it, as
    // a consequence of that one error, not ten more.
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(report.errors.iter().all(|e| e.service == Some(name(n - 2))));
    let saved = s.ipvs.save();
    assert_eq!(saved.len(), (n - 1) * 11);
    assert!(saved.contains(&format!("-A -t {}:80 -s rr", vip(n - 1))));
    assert_eq!(s.counts().virtual_servers, n - 1);
    assert_eq!(s.counts().real_servers, (n - 1) * 10);
}

#[test]
fn chains_are_rewritten_only_when_a_set_turns_empty_or_not_or_an_out_filter_changes() {
    let mut s = syncer();
    let now = Instant::now();
    s.full_sync(
        vec![(svc("a"), target("10.96.0.10", 80, RR, &["10.244.1.5:80"]))],
        now,
    );
    let writes = |s: &TestSyncer| s.netfilter.rule_writes.len();
    let non_empty = |s: &TestSyncer| {
        let last = s.netfilter.rule_writes.last().expect("rules written");
        last[0].non_empty.iter().copied().collect::<Vec<_>>()
    };
    assert_eq!(writes(&s), 1);
    assert_eq!(non_empty(&s), [KubeSet::ClusterIp]);

    // Another member of a set that has members, a new endpoint: the same rules.
    s.sync(
        vec![(svc("b"), target("10.96.0.11", 80, RR, &["10.244.1.6:80"]))],
        now,
    );
    s.sync(
        vec![(
            svc("a"),
            target("10.96.0.10", 80, RR, &["10.244.1.5:80", "10.244.1.7:80"]),
        )],
        now,
    );
    assert_eq!(writes(&s), 1, "rules rewritten for a member change");

    // An out-filter entry comes: the rules change.
    let mut lb = target("10.96.0.12", 80, RR, &[]);
    lb.netfilter.push(NetfilterEntry::NoNodeAccess {
        ip: ip("198.51.100.1"),
        protocol: Protocol::Tcp,
        port: 80,
    });
    s.sync(vec![(svc("lb"), lb)], now);
    assert_eq!(writes(&s), 2);
    let last = &s.netfilter.rule_writes[1][0];
    assert_eq!(
        last.no_node_access,
        BTreeSet::from([(ip("198.51.100.1"), Protocol::Tcp, 80)])
    );

    // Every ClusterIP gone: KUBE-CLUSTER-IP is empty, the rules that match it go.
    s.sync(
        vec![
            (svc("a"), ServiceTarget::default()),
            (svc("b"), ServiceTarget::default()),
            (svc("lb"), ServiceTarget::default()),
        ],
        now,
    );
    assert_eq!(writes(&s), 3);
    assert_eq!(non_empty(&s), Vec::<KubeSet>::new());
    assert!(s.netfilter.rule_writes[2][0].no_node_access.is_empty());
}

#[test]
fn a_refused_update_is_sent_again_when_the_service_is_retried() {
    let mut s = syncer();
    let now = Instant::now();
    s.full_sync(
        vec![(svc("web"), target("10.96.0.10", 80, RR, &["10.244.1.5:80"]))],
        now,
    );
    // The kernel refuses the new scheduler (its module is missing).
    let twos = || {
        target(
            "10.96.0.10",
            80,
            Scheduler::TwoRandomChoices,
            &["10.244.1.5:80"],
        )
    };
    let report = s.sync(vec![(svc("web"), twos())], now);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].service, Some(svc("web")));
    assert!(!report.needs_full_sync());
    // The retry sends the update again rather than believing it was made.
    s.ipvs.log.clear();
    let report = s.sync(vec![(svc("web"), twos())], now);
    assert_eq!(s.ipvs.log, ["-E -t 10.96.0.10:80 -s twos"]);
    assert_eq!(report.errors.len(), 1);
    // Back to rr: the kernel never left it, so nothing is sent.
    s.ipvs.log.clear();
    let report = s.sync(
        vec![(svc("web"), target("10.96.0.10", 80, RR, &["10.244.1.5:80"]))],
        now,
    );
    assert!(report.errors.is_empty());
    assert!(s.ipvs.log.is_empty(), "{:?}", s.ipvs.log);
    assert_eq!(
        s.ipvs.save(),
        [
            "-A -t 10.96.0.10:80 -s rr",
            "-a -t 10.96.0.10:80 -r 10.244.1.5:80 -m -w 1"
        ]
    );
}

/// Any sequence of partial and full syncs, with removed real servers drained, leaves the
/// kernel holding exactly what the Services want; virtual servers the proxy does not own
/// (another tool's, a firewall mark, one in `--ipvs-exclude-cidrs` on `kube-ipvs0`), even
/// while their tool changes them, are never named in any operation the proxy sends.
mod properties {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const SERVICES: usize = 6;
    const BACKENDS: [&str; 4] = [
        "10.244.0.1:8080",
        "10.244.0.2:8080",
        "10.244.0.3:8080",
        "10.244.0.4:8080",
    ];

    /// What one Service wants: UDP or TCP, and which of the backends.
    type Spec = (bool, Vec<usize>);

    #[derive(Debug, Clone)]
    enum Step {
        /// These Services change to these specs (`None`: the Service is gone).
        Partial(Vec<(usize, Option<Spec>)>),
        /// A full sync of every Service.
        Full,
        /// Another tool adds real server 198.51.100.N:80 to its virtual server `i`.
        Foreign(usize, u8),
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            any::<bool>(),
            proptest::sample::subsequence(vec![0, 1, 2, 3], 0..=4),
        )
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => proptest::collection::vec(
                (0..SERVICES, proptest::option::of(spec())),
                1..4
            )
            .prop_map(Step::Partial),
            1 => Just(Step::Full),
            1 => (0..3usize, 1..4u8).prop_map(|(i, n)| Step::Foreign(i, n)),
        ]
    }

    /// Service `i` listens on one of three shared addresses, on a port of its own.
    fn vip(i: usize) -> (String, u16) {
        (
            format!("10.96.0.{}", i % 3 + 1),
            80 + u16::try_from(i).unwrap(),
        )
    }

    fn target_of(i: usize, (udp, backends): &Spec) -> ServiceTarget {
        let (ip, port) = vip(i);
        let backends: Vec<&str> = backends.iter().map(|b| BACKENDS[*b]).collect();
        if *udp {
            udp_target(&ip, port, &backends)
        } else {
            target(&ip, port, RR, &backends)
        }
    }

    fn name(i: usize) -> ServiceName {
        svc(&format!("s{i}"))
    }

    /// Virtual servers the proxy must never touch: another tool's on an address not bound
    /// to kube-ipvs0, a firewall-mark service, and one inside the excluded range whose
    /// address is bound to kube-ipvs0.
    fn foreign_keys() -> [ServiceKey; 3] {
        [
            ServiceKey::tcp(ip("192.0.2.1"), 80),
            ServiceKey::Fwmark {
                family: ipvs::Family::V4,
                mark: 7,
            },
            ServiceKey::tcp(ip("10.100.0.1"), 80),
        ]
    }

    fn real(addr: SocketAddr) -> RealServerEntry {
        RealServerEntry {
            server: RealServer::masquerade(addr),
            connections: Connections::default(),
            stats: Stats::default(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_sequence_of_syncs_ends_with_the_kernel_equal_to_the_services(
            steps in proptest::collection::vec(step(), 1..12)
        ) {
            let mut s = Syncer::new(
                FakeIpvs::default(),
                FakeAddresses::default(),
                FakeNetfilter::default(),
                SyncOptions {
                    exclude_cidrs: vec!["10.100.0.0/16".parse().unwrap()],
                    ..SyncOptions::default()
                },
            );
            // The other tools' state, written into the kernel directly (not through the
            // proxy's operations, which the fake logs).
            let mut foreign = FakeIpvs::default();
            for key in foreign_keys() {
                let reals = [real("198.51.100.1:80".parse().unwrap())];
                foreign.table.insert(
                    key,
                    (VirtualServer::new(key, RR), reals.into_iter().map(|r| (r.server.addr, r)).collect()),
                );
            }
            s.ipvs.table.clone_from(&foreign.table);
            s.addresses.bound.insert(ip("10.100.0.1"));

            let mut wanted: BTreeMap<usize, Spec> = BTreeMap::new();
            let mut now = Instant::now();
            for step in steps {
                now += Duration::from_secs(1);
                let report = match step {
                    Step::Partial(changes) => {
                        let mut targets = Vec::new();
                        for (i, spec) in changes {
                            let target = match &spec {
                                Some(spec) => target_of(i, spec),
                                None => ServiceTarget::default(),
                            };
                            match spec {
                                Some(spec) => wanted.insert(i, spec),
                                None => wanted.remove(&i),
                            };
                            targets.push((name(i), target));
                        }
                        s.sync(targets, now)
                    }
                    Step::Full => s.full_sync(
                        wanted.iter().map(|(i, spec)| (name(*i), target_of(*i, spec))),
                        now,
                    ),
                    Step::Foreign(i, n) => {
                        let key = foreign_keys()[i];
                        let entry = real(SocketAddr::new(IpAddr::from([198, 51, 100, n]), 80));
                        for table in [&mut foreign.table, &mut s.ipvs.table] {
                            table.get_mut(&key).unwrap().1.insert(entry.server.addr, entry.clone());
                        }
                        continue;
                    }
                };
                prop_assert!(report.errors.is_empty(), "{:?}", report.errors);
            }
            // Removed TCP real servers have no connections here: they go at the next drain.
            let report = s.drain(now + Duration::from_secs(1));
            prop_assert!(report.errors.is_empty(), "{:?}", report.errors);

            for line in &s.ipvs.log {
                let op: Op = line.parse().unwrap();
                prop_assert!(!foreign_keys().contains(op.service()), "the proxy sent {}", line);
            }
            let mut expected: Vec<String> = foreign.save();
            let mut addresses = BTreeSet::new();
            let mut entries = BTreeSet::new();
            for (i, spec) in &wanted {
                let t = target_of(*i, spec);
                for (vs, reals) in &t.virtual_servers {
                    expected.push(vs.to_string());
                    expected.extend(reals.iter().map(|r| r.line(&vs.key).to_string()));
                }
                addresses.extend(t.addresses.iter().copied());
                entries.extend(t.netfilter.iter().cloned());
            }
            let mut kernel = s.ipvs.save();
            kernel.sort();
            expected.sort();
            prop_assert_eq!(kernel, expected);
            // kube-ipvs0 is the proxy's link: whether a full sync came to unbind the excluded
            // virtual server's address is not the point here, its virtual server is.
            s.addresses.bound.remove(&ip("10.100.0.1"));
            prop_assert_eq!(&s.addresses.bound, &addresses);
            prop_assert_eq!(&s.netfilter.entries, &entries);
            prop_assert_eq!(s.counts().draining, 0);
            let real_servers: usize = s.kernel.values().map(|vs| vs.real.len()).sum();
            prop_assert_eq!(s.counts().real_servers, real_servers);
        }
    }
}

/// Waits for the periodic full sync's read (on its own thread) and what it repaired.
fn finish_resync<I: IpvsKernel>(
    s: &mut Syncer<I, FakeAddresses, FakeNetfilter>,
    now: Instant,
) -> SyncReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(report) = s.finish_resync(now) {
            return report;
        }
        assert!(Instant::now() < deadline, "the kernel read never ended");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn cluster_ip_entry(vip: &str, port: u16) -> NetfilterEntry {
    NetfilterEntry::Set {
        family: Family::V4,
        set: KubeSet::ClusterIp,
        entry: iptables::SetEntry::IpPort(ip(vip), iptables::Protocol::Tcp, port),
    }
}

fn two_services() -> Vec<(ServiceName, ServiceTarget)> {
    vec![
        (
            svc("web"),
            target(
                "10.96.0.10",
                80,
                RR,
                &["10.244.1.5:8080", "10.244.2.5:8080"],
            ),
        ),
        (
            svc("api"),
            target(
                "10.96.0.11",
                443,
                RR,
                &["10.244.1.6:8443", "10.244.2.6:8443"],
            ),
        ),
    ]
}

#[test]
fn a_periodic_resync_repairs_drift_and_writes_only_what_differs() {
    let mut s = syncer();
    let now = Instant::now();
    s.full_sync(two_services(), now);
    let programmed = s.ipvs.save();
    s.ipvs.log.clear();
    // Drift, by hand: a virtual server deleted, a real server of the other deleted and one
    // added, an address unbound and one bound, a set member deleted and one added.
    let web = ServiceKey::tcp(ip("10.96.0.10"), 80);
    let api = ServiceKey::tcp(ip("10.96.0.11"), 443);
    s.ipvs.table.remove(&web);
    let api_reals = &mut s.ipvs.table.get_mut(&api).unwrap().1;
    api_reals.remove(&"10.244.2.6:8443".parse().unwrap());
    let stray: SocketAddr = "10.244.9.9:8443".parse().unwrap();
    api_reals.insert(
        stray,
        RealServerEntry {
            server: RealServer::masquerade(stray),
            connections: Connections::default(),
            stats: Stats::default(),
        },
    );
    s.addresses.bound.remove(&ip("10.96.0.11"));
    s.addresses.bound.insert(ip("10.96.0.99"));
    s.netfilter
        .entries
        .remove(&cluster_ip_entry("10.96.0.10", 80));
    s.netfilter
        .entries
        .insert(cluster_ip_entry("10.96.0.99", 80));

    assert!(s.start_resync(now), "a full sync's mirror is verified");
    let report = finish_resync(&mut s, now);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(s.ipvs.save(), programmed);
    let mut sent = s.ipvs.log.clone();
    sent.sort();
    assert_eq!(
        sent,
        [
            "-A -t 10.96.0.10:80 -s rr",
            "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1",
            "-a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 1",
            "-a -t 10.96.0.11:443 -r 10.244.2.6:8443 -m -w 1",
            "-d -t 10.96.0.11:443 -r 10.244.9.9:8443",
        ],
        "only what differs is sent"
    );
    assert_eq!(
        s.addresses.bound,
        BTreeSet::from([ip("10.96.0.10"), ip("10.96.0.11")])
    );
    assert_eq!(
        s.netfilter.entries,
        BTreeSet::from([
            cluster_ip_entry("10.96.0.10", 80),
            cluster_ip_entry("10.96.0.11", 443)
        ])
    );
    assert_eq!(
        (report.set_entries_added, report.set_entries_removed),
        (1, 1)
    );
    assert_eq!(s.netfilter.full_syncs, 1, "no set was refilled");

    // Nothing drifted: nothing is written.
    s.ipvs.log.clear();
    assert!(s.start_resync(now));
    let report = finish_resync(&mut s, now);
    assert_eq!(report.ipvs_ops, 0, "{:?}", s.ipvs.log);
    assert_eq!(report.addresses_added + report.addresses_removed, 0);
    assert_eq!(report.set_entries_added + report.set_entries_removed, 0);
}

#[test]
fn a_change_made_while_the_kernel_is_read_is_not_undone_by_the_older_read() {
    let mut s = syncer();
    let now = Instant::now();
    s.full_sync(two_services(), now);
    // Drift before the read begins, which it repairs.
    let api = ServiceKey::tcp(ip("10.96.0.11"), 443);
    s.ipvs.table.remove(&api);
    assert!(s.start_resync(now));
    // Changes synced while the read runs (the fake's read is of the table when it began):
    // web gets a third endpoint, a new Service comes with its address and set member.
    let mut web = target(
        "10.96.0.10",
        80,
        RR,
        &["10.244.1.5:8080", "10.244.2.5:8080", "10.244.3.5:8080"],
    );
    web.netfilter.push(cluster_ip_entry("10.96.0.10", 8080));
    let new = target("10.96.0.12", 80, RR, &["10.244.1.7:80"]);
    let report = s.sync(vec![(svc("web"), web), (svc("new"), new)], now);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(
        s.resync_due().is_some(),
        "the read is still to be looked at"
    );
    let after_change = s.ipvs.save();

    let report = finish_resync(&mut s, now);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let table = s.ipvs.save();
    for line in &after_change {
        assert!(table.contains(line), "{line} was undone: {table:?}");
    }
    assert!(
        table.contains(&"-A -t 10.96.0.11:443 -s rr".to_owned()),
        "drift from before the read is repaired"
    );
    assert!(s.addresses.bound.contains(&ip("10.96.0.12")));
    assert!(
        s.netfilter
            .entries
            .contains(&cluster_ip_entry("10.96.0.10", 8080))
    );
    assert!(
        s.netfilter
            .entries
            .contains(&cluster_ip_entry("10.96.0.12", 80))
    );
}

thread_local! {
    /// How often this thread's syncer released memory ([`SyncOptions::release_memory`]).
    static RELEASED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn count_release() {
    RELEASED.with(|n| n.set(n.get() + 1));
}

#[test]
fn memory_is_released_around_each_full_sync_and_after_each_read_never_after_a_change() {
    let mut s = Syncer::new(
        FakeIpvs::default(),
        FakeAddresses::default(),
        FakeNetfilter::default(),
        SyncOptions {
            release_memory: Some(count_release),
            ..SyncOptions::default()
        },
    );
    let released = || RELEASED.with(std::cell::Cell::get);
    let now = Instant::now();
    s.full_sync(two_services(), now);
    assert_eq!(released(), 2, "before the first full sync and after it");
    let web = target("10.96.0.10", 80, RR, &["10.244.1.5:8080"]);
    s.sync(vec![(svc("web"), web)], now);
    assert_eq!(released(), 2, "not after a change");
    assert!(s.start_resync(now));
    assert_eq!(released(), 2, "not while the read runs");
    let report = finish_resync(&mut s, now);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(released(), 3, "once the read is compared and dropped");
}

#[test]
fn a_resync_needs_a_mirror_read_from_the_kernel() {
    let mut s = syncer();
    let now = Instant::now();
    assert!(!s.start_resync(now), "before the first full sync");
    s.full_sync(two_services(), now);
    assert!(s.start_resync(now));
    finish_resync(&mut s, now);
    s.reconfigure(&PlanConfig::default());
    assert!(
        !s.start_resync(now),
        "node facts changed: every Service is planned again"
    );
    s.full_sync(two_services(), now);
    assert!(s.start_resync(now));
    // A full sync meanwhile makes the read in flight moot.
    s.full_sync(two_services(), now);
    assert_eq!(s.resync_due(), None);
}

#[test]
fn a_change_between_two_slices_of_the_comparison_is_not_undone() {
    let mut s = syncer();
    let now = Instant::now();
    let name = |i: u32| svc(&format!("s{i}"));
    let vip = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i).to_string();
    let all: Vec<_> = (0..3000)
        .map(|i| (name(i), target(&vip(i), 80, RR, &["10.244.0.1:80"])))
        .collect();
    s.full_sync(all, now);
    // Drift at both ends of the mirror's order, whichever the comparison takes first.
    for i in [0, 2999] {
        s.ipvs.table.remove(&ServiceKey::tcp(ip(&vip(i)), 80));
    }
    assert!(s.start_resync(now));
    let changed = target(&vip(7), 80, RR, &["10.244.0.1:80", "10.244.0.2:80"]);
    let mut slices = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        if let Some(report) = s.finish_resync(now) {
            break report;
        }
        if s.resync_due() == Some(now) {
            // Between two slices: a change comes.
            slices += 1;
            if slices == 1 {
                s.sync(vec![(name(7), changed.clone())], now);
            }
        }
        assert!(Instant::now() < deadline, "the comparison never ended");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    if slices == 0 {
        // Compared in one slice (a fast machine): the change comes after it.
        s.sync(vec![(name(7), changed)], now);
    }
    let table = s.ipvs.save();
    for i in [0, 2999] {
        assert!(
            table.contains(&format!("-A -t {}:80 -s rr", vip(i))),
            "drift repaired"
        );
    }
    assert!(
        table.contains(&format!("-a -t {}:80 -r 10.244.0.2:80 -m -w 1", vip(7))),
        "the change stays"
    );
}

/// The in-memory IPVS table, whose periodic read, once it has handed over the table, waits
/// for the test to let it end.
struct HeldIpvs {
    fake: FakeIpvs,
    release: std::sync::Arc<std::sync::Barrier>,
}

impl IpvsKernel for HeldIpvs {
    fn dump(&mut self) -> Result<IpvsTable, ipvs::Error> {
        self.fake.dump()
    }

    fn reader(&self, each: ServerSink) -> Option<Reader<(), ipvs::Error>> {
        let read = self.fake.reader(each)?;
        let release = self.release.clone();
        Some(Box::new(move || {
            let read = read();
            release.wait();
            read
        }))
    }

    fn real_servers(&mut self, key: &ServiceKey) -> Result<Vec<RealServerEntry>, ipvs::Error> {
        self.fake.real_servers(key)
    }

    fn apply(&mut self, ops: &[Op]) -> Vec<Result<(), ipvs::Error>> {
        self.fake.apply(ops)
    }
}

/// A syncer over [`HeldIpvs`] after its first full sync of [`two_services`], and the barrier
/// its periodic read waits at.
fn held_after_full_sync() -> (
    Syncer<HeldIpvs, FakeAddresses, FakeNetfilter>,
    std::sync::Arc<std::sync::Barrier>,
) {
    let release = std::sync::Arc::new(std::sync::Barrier::new(2));
    let ipvs = HeldIpvs {
        fake: FakeIpvs::default(),
        release: release.clone(),
    };
    let mut s = Syncer::new(
        ipvs,
        FakeAddresses::default(),
        FakeNetfilter::default(),
        SyncOptions::default(),
    );
    s.full_sync(two_services(), Instant::now());
    (s, release)
}

#[test]
fn virtual_servers_are_compared_as_they_are_read_and_missing_ones_once_the_read_ends() {
    let (mut s, release) = held_after_full_sync();
    let now = Instant::now();
    let programmed = s.ipvs.fake.save();
    s.ipvs.fake.log.clear();
    // Drift: a real server of api deleted, web's virtual server deleted.
    let api = ServiceKey::tcp(ip("10.96.0.11"), 443);
    let web = ServiceKey::tcp(ip("10.96.0.10"), 80);
    let api_reals = &mut s.ipvs.fake.table.get_mut(&api).unwrap().1;
    api_reals.remove(&"10.244.2.6:8443".parse().unwrap());
    s.ipvs.fake.table.remove(&web);

    assert!(s.start_resync(now));
    let repaired = "-a -t 10.96.0.11:443 -r 10.244.2.6:8443 -m -w 1".to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.ipvs.fake.log.contains(&repaired) {
        assert!(s.finish_resync(now).is_none(), "the read has not ended yet");
        assert!(Instant::now() < deadline, "api was never repaired");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        s.ipvs.fake.log,
        [repaired],
        "api is repaired while the read runs; web's absence is known only at its end"
    );
    release.wait();
    let report = finish_resync(&mut s, now);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(s.ipvs.fake.save(), programmed);
    assert_eq!(report.ipvs_ops, 4, "{:?}", s.ipvs.fake.log);
}

/// The nice value in a thread's `stat` file: field 19 (field 3, the state, follows "pid (comm) ").
fn nice_in(stat: &std::path::Path) -> Option<i64> {
    let stat = std::fs::read_to_string(stat).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split(' ').nth(16)?.parse().ok()
}

/// The nice value of this process's thread named `name`.
fn nice_of_thread(name: &str) -> Option<i64> {
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|task| {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        (comm.trim_end() == name).then(|| nice_in(&dir.join("stat")))?
    })
}

#[test]
fn the_kernel_read_runs_nicer_than_the_loop_so_a_change_during_it_gets_the_cpu_first() {
    let (mut s, release) = held_after_full_sync();
    let now = Instant::now();
    let ours = nice_in("/proc/thread-self/stat".as_ref()).expect("this thread's nice value");
    let nicer = (ours + 10).min(19);
    assert!(s.start_resync(now));
    // The thread lowers its own priority as it starts: read until it has, or 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut read = nice_of_thread("kernel-read");
    while read != Some(nicer) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        read = nice_of_thread("kernel-read");
    }
    release.wait();
    assert_eq!(
        read,
        Some(nicer),
        "the read's nice value (the loop's is {ours})"
    );
    finish_resync(&mut s, now);
}
