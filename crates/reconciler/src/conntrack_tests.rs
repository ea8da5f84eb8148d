//! Which entries are stale (table-driven, upstream's cases from `cleanup_test.go` in spirit),
//! and what the reconciliation lists and deletes through a fake table.

use std::net::IpAddr;
use std::sync::Arc;

use conntrack::Tuple;

use super::*;
use crate::model::{
    Conditions, Endpoint, EndpointPort, EndpointSlice, Hints, ServiceName, ServicePortName,
};

const CLUSTER_IP: &str = "10.96.0.10";
const CLUSTER_IP6: &str = "fd00:96::10";
const EXTERNAL_IP: &str = "192.0.2.10";
const LB_IP: &str = "198.51.100.10";
const NODE_IP: &str = "172.18.0.2";
const PORT: u16 = 53;
const NODE_PORT: u16 = 30053;
const TARGET: u16 = 5353;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A dual-stack UDP (or `protocol`) Service with an externalIP, a LoadBalancer IP and a
/// NodePort, whose one slice per family holds `endpoints` (address, serving).
fn state(protocol: Protocol, endpoints: &[(&str, bool)]) -> ClusterState {
    let service = ServiceName::new("ns", "dns");
    let name = ServicePortName {
        service: service.clone(),
        port: "dns".into(),
        protocol,
    };
    let port = ServicePort {
        external_ips: Arc::from([ip(EXTERNAL_IP)]),
        load_balancer_ips: Arc::from([ip(LB_IP)]),
        node_port: Some(NODE_PORT),
        ..ServicePort::cluster_ip(name, PORT, &[ip(CLUSTER_IP), ip(CLUSTER_IP6)])
    };
    let mut state = ClusterState::new();
    state.upsert_service(service.clone(), vec![port]);
    for (slice, v6) in [("dns-v4", false), ("dns-v6", true)] {
        let endpoints: Vec<Endpoint> = endpoints
            .iter()
            .filter(|(a, _)| ip(a).is_ipv6() == v6)
            .map(|(a, serving)| Endpoint {
                ip: ip(a),
                port: TARGET,
                conditions: Conditions {
                    ready: false,
                    serving: *serving,
                    terminating: !serving,
                },
                local: false,
                hints: Hints::default(),
            })
            .collect();
        let slice_value = EndpointSlice {
            service: service.clone(),
            ports: vec![EndpointPort {
                name: "dns".into(),
                protocol,
                endpoints: endpoints.into(),
            }],
        };
        state.upsert_slice(("ns".into(), slice.into()), slice_value);
    }
    state
}

/// A flow from a client to `to`:`port`, answered by `from`:`from_port`.
fn flow(protocol: u8, to: &str, port: u16, from: &str, from_port: u16) -> Flow {
    let client = if ip(to).is_ipv4() {
        ip("10.0.0.1")
    } else {
        ip("fd00::1")
    };
    Flow {
        protocol,
        original: Tuple {
            src: client,
            dst: ip(to),
            src_port: 40000,
            dst_port: port,
        },
        reply: Tuple {
            src: ip(from),
            dst: client,
            src_port: from_port,
            dst_port: 40000,
        },
        zone: 0,
        id: Some(1),
    }
}

fn frontends(state: &ClusterState) -> Frontends {
    Frontends::new(state, state.services().map(|(_, ports)| ports))
}

const UDP: u8 = 17;
const SCTP: u8 = 132;
const TCP: u8 = 6;

#[test]
fn an_entry_is_stale_when_a_service_frontend_is_answered_by_no_serving_endpoint() {
    let endpoints = [
        ("10.244.0.5", true),
        ("10.244.0.6", false),
        ("fd00:244::5", true),
    ];
    #[rustfmt::skip]
    let cases: &[(&str, Flow, bool)] = &[
        ("ClusterIP answered by a serving endpoint", flow(UDP, CLUSTER_IP, PORT, "10.244.0.5", TARGET), false),
        ("ClusterIP answered by a removed endpoint", flow(UDP, CLUSTER_IP, PORT, "10.244.0.9", TARGET), true),
        ("ClusterIP answered by an endpoint no longer serving", flow(UDP, CLUSTER_IP, PORT, "10.244.0.6", TARGET), true),
        ("ClusterIP answered by the endpoint's old target port", flow(UDP, CLUSTER_IP, PORT, "10.244.0.5", 53), true),
        ("ClusterIP un-NATed: made while the Service had no endpoint", flow(UDP, CLUSTER_IP, PORT, CLUSTER_IP, PORT), true),
        ("another port of the ClusterIP", flow(UDP, CLUSTER_IP, 54, "10.244.0.9", TARGET), false),
        ("externalIP answered by a removed endpoint", flow(UDP, EXTERNAL_IP, PORT, "10.244.0.9", TARGET), true),
        ("externalIP answered by a serving endpoint", flow(UDP, EXTERNAL_IP, PORT, "10.244.0.5", TARGET), false),
        ("LoadBalancer IP answered by a removed endpoint", flow(UDP, LB_IP, PORT, "10.244.0.9", TARGET), true),
        ("NodePort on a node address, removed endpoint", flow(UDP, NODE_IP, NODE_PORT, "10.244.0.9", TARGET), true),
        ("NodePort on a node address, serving endpoint", flow(UDP, NODE_IP, NODE_PORT, "10.244.0.5", TARGET), false),
        ("IPv6 ClusterIP answered by its serving endpoint", flow(UDP, CLUSTER_IP6, PORT, "fd00:244::5", TARGET), false),
        ("IPv6 ClusterIP answered by a removed endpoint", flow(UDP, CLUSTER_IP6, PORT, "fd00:244::9", TARGET), true),
        ("IPv6 NodePort: only IPv6 endpoints serve it", flow(UDP, "fd00:18::2", NODE_PORT, "fd00:244::5", TARGET), false),
        ("a TCP flow to the same frontend is not ours to end", flow(TCP, CLUSTER_IP, PORT, "10.244.0.9", TARGET), false),
        ("an address no Service has", flow(UDP, "10.96.0.99", PORT, "10.244.0.9", TARGET), false),
    ];
    let state = state(Protocol::Udp, &endpoints);
    let frontends = frontends(&state);
    for (case, flow, stale) in cases {
        assert_eq!(frontends.stale(&[*flow]).len() == 1, *stale, "{case}");
    }
}

#[test]
fn every_entry_of_a_service_without_serving_endpoints_is_stale() {
    let state = state(Protocol::Udp, &[("10.244.0.6", false)]);
    let frontends = frontends(&state);
    let flows = [
        flow(UDP, CLUSTER_IP, PORT, "10.244.0.5", TARGET),
        flow(UDP, NODE_IP, NODE_PORT, "10.244.0.6", TARGET),
    ];
    assert_eq!(frontends.stale(&flows), flows);
}

#[test]
fn sctp_services_are_reconciled_like_udp_ones() {
    let state = state(Protocol::Sctp, &[("10.244.0.5", true)]);
    let frontends = frontends(&state);
    assert_eq!(
        frontends
            .stale(&[flow(SCTP, CLUSTER_IP, PORT, "10.244.0.9", TARGET)])
            .len(),
        1
    );
    assert!(
        frontends
            .stale(&[flow(UDP, CLUSTER_IP, PORT, "10.244.0.9", TARGET)])
            .is_empty()
    );
    assert!(
        frontends
            .stale(&[flow(SCTP, CLUSTER_IP, PORT, "10.244.0.5", TARGET)])
            .is_empty()
    );
}

#[test]
fn tcp_services_have_no_frontends_so_nothing_is_listed() {
    let state = state(Protocol::Tcp, &[("10.244.0.5", true)]);
    assert!(frontends(&state).is_empty());
    let mut table = FakeTable::default();
    assert!(
        reconcile(&mut table, &frontends(&state))
            .families
            .is_empty()
    );
    assert!(table.listed.is_empty());
}

#[derive(Debug, Default)]
struct FakeTable {
    flows: Vec<Flow>,
    listed: Vec<(Family, Protocol)>,
    fail_listing: bool,
}

impl ConntrackKernel for FakeTable {
    fn flows(&mut self, family: Family, protocol: Protocol) -> Result<Vec<Flow>, conntrack::Error> {
        self.listed.push((family, protocol));
        if self.fail_listing {
            return Err(conntrack::Error::Kernel {
                command: "conntrack -L".into(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            });
        }
        Ok(self
            .flows
            .iter()
            .filter(|f| f.family() == family && f.protocol == protocol.number())
            .copied()
            .collect())
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<Deleted, conntrack::Error> {
        let before = self.flows.len();
        self.flows.retain(|f| !flows.contains(f));
        Ok(Deleted {
            deleted: before - self.flows.len(),
            gone: flows.len() - (before - self.flows.len()),
            failed: Vec::new(),
        })
    }
}

#[test]
fn reconcile_lists_each_family_of_the_services_and_deletes_only_the_stale_flows() {
    let state = state(
        Protocol::Udp,
        &[("10.244.0.5", true), ("fd00:244::5", true)],
    );
    let keep = [
        flow(UDP, CLUSTER_IP, PORT, "10.244.0.5", TARGET),
        flow(UDP, CLUSTER_IP6, PORT, "fd00:244::5", TARGET),
        flow(UDP, "10.96.0.99", PORT, "10.244.0.9", TARGET),
    ];
    let to_delete = [
        flow(UDP, CLUSTER_IP, PORT, "10.244.0.9", TARGET),
        flow(UDP, NODE_IP, NODE_PORT, "10.244.0.9", TARGET),
        flow(UDP, CLUSTER_IP6, PORT, "fd00:244::9", TARGET),
    ];
    let mut table = FakeTable {
        flows: keep.iter().chain(&to_delete).copied().collect(),
        ..FakeTable::default()
    };
    let done = reconcile(&mut table, &frontends(&state)).families;
    assert_eq!(
        table.listed,
        [(Family::V4, Protocol::Udp), (Family::V6, Protocol::Udp)]
    );
    assert_eq!(table.flows, keep);
    let deleted: Vec<_> = done.iter().map(|r| (r.family, r.deleted)).collect();
    assert_eq!(deleted, [(Family::V4, 2), (Family::V6, 1)]);
}

#[test]
fn a_table_that_cannot_be_listed_deletes_nothing_and_reports_zero() {
    let state = state(Protocol::Udp, &[("10.244.0.5", true)]);
    let mut table = FakeTable {
        flows: vec![flow(UDP, CLUSTER_IP, PORT, "10.244.0.9", TARGET)],
        fail_listing: true,
        ..FakeTable::default()
    };
    let done = reconcile(&mut table, &frontends(&state));
    assert_eq!(table.flows.len(), 1);
    let families = &done.families;
    assert!(families.iter().all(|r| r.deleted == 0) && families.len() == 2);
    assert_eq!(done.errors.len(), 2, "one per family: {:?}", done.errors);
    assert!(
        done.errors[0].contains("conntrack -L"),
        "{}",
        done.errors[0]
    );
}

#[test]
fn only_the_services_given_are_reconciled() {
    let state = state(Protocol::Udp, &[("10.244.0.5", true)]);
    assert!(Frontends::new(&state, std::iter::empty()).is_empty());
}

/// The loop's use of the table: after which syncs it lists, and with which Services.
mod in_the_loop {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, Instant, SystemTime};

    use super::*;
    use crate::engine::Engine;
    use crate::plan::{PlanConfig, PlanWarning, Planner};
    use crate::sync::{Counts, SyncError, SyncReport};
    use crate::sync_loop::{Folded, HealthChecks, Observer, SourceUpdate, SyncLoop, SyncRecord};
    use crate::{Affected, Settings};

    #[derive(Debug, Clone, Default)]
    struct Shared(Arc<Mutex<(FakeTable, Vec<Reconciled>, bool)>>);

    impl Shared {
        fn with<T>(&self, f: impl FnOnce(&mut (FakeTable, Vec<Reconciled>, bool)) -> T) -> T {
            f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
        }
    }

    impl ConntrackKernel for Shared {
        fn flows(
            &mut self,
            family: Family,
            protocol: Protocol,
        ) -> Result<Vec<Flow>, conntrack::Error> {
            self.with(|s| s.0.flows(family, protocol))
        }
        fn delete(&mut self, flows: &[Flow]) -> Result<Deleted, conntrack::Error> {
            self.with(|s| s.0.delete(flows))
        }
    }

    impl Observer for Shared {
        fn node_eligible(&self, _: bool) {}
        fn queued(&self, _: &Folded, _: (u64, u64), _: SystemTime, _: &[inet::Family]) {}
        fn synced(&self, _: &SyncRecord) {}
        fn caught_up(&self) {}
        fn errors(&self, _: &[SyncError], _: bool, _: &[inet::Family]) {}
        fn counts(&self, _: Counts) {}
        fn no_local_endpoints(&self, _: inet::Family, _: u64, _: u64) {}
        fn health_checks(&self, _: &HealthChecks) {}
        fn conntrack_reconciled(&self, reconciled: &Reconciled) {
            self.with(|s| s.1.push(*reconciled));
        }
    }

    /// An engine whose syncs succeed, or fail as a whole while the shared flag is set.
    struct Programmed(Shared);

    impl Programmed {
        fn report(&self) -> SyncReport {
            let mut report = SyncReport::default();
            if self.0.with(|s| s.2) {
                let error = crate::Error::Ipvs(ipvs::Error::NotAvailable);
                report.errors.push(SyncError::new(None, error));
            }
            report
        }
    }

    impl Engine for Programmed {
        fn full_sync(
            &mut self,
            _: &ClusterState,
            _: &Planner,
            _: Instant,
        ) -> (SyncReport, Vec<PlanWarning>) {
            (self.report(), Vec::new())
        }
        fn partial_sync(
            &mut self,
            _: &ClusterState,
            _: &Planner,
            _: &BTreeSet<ServiceName>,
            _: Instant,
        ) -> (SyncReport, Vec<PlanWarning>) {
            (self.report(), Vec::new())
        }
    }

    /// Each batch replaces the state with the one given and names the Services it changed.
    fn fold(
        state: &mut ClusterState,
        (next, changed): (ClusterState, Vec<&'static str>),
    ) -> Folded {
        *state = next;
        Folded {
            affected: Affected {
                services: changed
                    .into_iter()
                    .map(|n| ServiceName::new("ns", n))
                    .collect(),
                nodes: false,
            },
            ..Folded::default()
        }
    }

    type Loop = SyncLoop<(ClusterState, Vec<&'static str>)>;

    fn started(state: ClusterState, flows: Vec<Flow>) -> (Loop, Shared, Instant) {
        let shared = Shared::default();
        shared.with(|s| s.0.flows = flows);
        let settings = Settings {
            plan: PlanConfig {
                node_name: "node-a".into(),
                ..PlanConfig::default()
            },
            sync_period: Duration::from_secs(30),
            ..Settings::default()
        };
        let mut l = SyncLoop::new(
            settings,
            Box::new(Programmed(shared.clone())),
            fold,
            Box::new(shared.clone()),
        )
        .with_conntrack(Box::new(shared.clone()));
        l.receive(SourceUpdate::Events((state, vec!["dns"])));
        l.receive(SourceUpdate::InitialSyncDone);
        let t0 = Instant::now();
        l.tick(t0);
        (l, shared, t0)
    }

    fn listed(shared: &Shared) -> Vec<(Family, Protocol)> {
        shared.with(|s| std::mem::take(&mut s.0.listed))
    }

    #[test]
    fn a_replaced_udp_endpoint_has_its_flows_deleted_in_the_same_sync() {
        let old = flow(UDP, CLUSTER_IP, PORT, "10.244.0.5", TARGET);
        let (mut l, shared, t0) = started(state(Protocol::Udp, &[("10.244.0.5", true)]), vec![old]);
        assert_eq!(
            listed(&shared).len(),
            2,
            "the full sync lists both families"
        );
        assert_eq!(
            shared.with(|s| s.0.flows.len()),
            1,
            "the flow's endpoint still serves"
        );

        l.receive(SourceUpdate::Events((
            state(Protocol::Udp, &[("10.244.0.6", true)]),
            vec!["dns"],
        )));
        l.tick(t0 + Duration::from_millis(10));
        assert!(
            shared.with(|s| s.0.flows.is_empty()),
            "deleted by the partial sync"
        );
        let reported: Vec<_> = shared.with(|s| s.1.iter().map(|r| (r.family, r.deleted)).collect());
        assert_eq!(
            reported,
            [
                (Family::V4, 0),
                (Family::V6, 0),
                (Family::V4, 1),
                (Family::V6, 0)
            ]
        );
    }

    #[test]
    fn a_sync_of_no_udp_or_sctp_service_lists_nothing() {
        let (mut l, shared, t0) =
            started(state(Protocol::Tcp, &[("10.244.0.5", true)]), Vec::new());
        assert!(listed(&shared).is_empty());
        l.receive(SourceUpdate::Events((
            state(Protocol::Tcp, &[("10.244.0.6", true)]),
            vec!["dns"],
        )));
        l.tick(t0 + Duration::from_millis(10));
        assert!(listed(&shared).is_empty());
    }

    #[test]
    fn after_a_sync_that_failed_as_a_whole_nothing_is_deleted() {
        let old = flow(UDP, CLUSTER_IP, PORT, "10.244.0.5", TARGET);
        let (mut l, shared, t0) = started(state(Protocol::Udp, &[("10.244.0.5", true)]), vec![old]);
        listed(&shared);
        shared.with(|s| s.2 = true);
        l.receive(SourceUpdate::Events((
            state(Protocol::Udp, &[("10.244.0.6", true)]),
            vec!["dns"],
        )));
        l.tick(t0 + Duration::from_millis(10));
        assert!(
            listed(&shared).is_empty(),
            "the kernel may still send flows to the old endpoint"
        );
        assert_eq!(shared.with(|s| s.0.flows.len()), 1);
    }
}
