//! The Kubernetes API source against a real HTTP API server on 127.0.0.1 (tests/support),
//! driving the real kube client.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use controllers::kube_source::{self, ListStrategy, Options};
use controllers::source::{Event, Kind, SourceUpdate};
use reconciler::model::Protocol;
use reconciler::{ClusterState, ServiceName, ServicePortName};
use serde_json::json;
use testapi::{ApiServer, Request, node, service, slice};
use tokio::sync::mpsc::unbounded_channel;
use tokio::task::JoinHandle;

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(15);

fn fast() -> Options {
    Options {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..Options::default()
    }
}

fn ips(n: usize, base: u8) -> Vec<String> {
    (1..=n).map(|i| format!("10.244.{base}.{i}")).collect()
}

/// What the proxier saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Events(Vec<String>),
    Synced,
    Eligible(bool),
}

#[derive(Debug, Default)]
struct Observed {
    log: Vec<Seen>,
    state: ClusterState,
    /// Service names in the state after each batch.
    services_after_batch: Vec<BTreeSet<String>>,
    /// The state when InitialSyncDone arrived: (services, endpoints of every service, nodes).
    at_sync: Option<(usize, usize, usize)>,
}

impl Observed {
    fn services(&self) -> BTreeSet<String> {
        self.state
            .services()
            .map(|(n, _)| format!("{}/{}", n.namespace, n.name))
            .collect()
    }

    fn endpoints(&self, name: &str) -> Vec<String> {
        let port = ServicePortName {
            service: ServiceName {
                namespace: "default".into(),
                name: name.into(),
            },
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        self.state
            .endpoints(&port)
            .iter()
            .map(|e| format!("{}:{}", e.ip, e.port))
            .collect()
    }

    fn total_endpoints(&self) -> usize {
        self.state
            .services()
            .map(|(n, _)| {
                self.state
                    .endpoints(&ServicePortName {
                        service: n.clone(),
                        port: "http".into(),
                        protocol: Protocol::Tcp,
                    })
                    .len()
            })
            .sum()
    }

    fn synced(&self) -> bool {
        self.log.contains(&Seen::Synced)
    }

    /// Events seen after the initial sync, of one kind, in order.
    fn events_after_sync(&self, kind: &str) -> Vec<String> {
        let start = self
            .log
            .iter()
            .position(|s| *s == Seen::Synced)
            .unwrap_or(self.log.len());
        self.log[start..]
            .iter()
            .filter_map(|s| match s {
                Seen::Events(e) => Some(e.clone()),
                _ => None,
            })
            .flatten()
            .filter(|e| e.split(' ').nth(1) == Some(kind))
            .collect()
    }

    fn batches(&self) -> Vec<Vec<String>> {
        self.log
            .iter()
            .filter_map(|s| match s {
                Seen::Events(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }
}

fn describe(event: &Event) -> String {
    match event {
        Event::Apply(o) => {
            let k = o.key();
            format!("apply {:?} {}/{}", k.kind, k.namespace, k.name)
        }
        Event::Delete(k) => format!("delete {:?} {}/{}", k.kind, k.namespace, k.name),
    }
}

struct Proxy {
    observed: Arc<Mutex<Observed>>,
    source: JoinHandle<Result<(), kube_source::Error>>,
    consumer: JoinHandle<()>,
}

async fn follow(server: &ApiServer, options: Options) -> Proxy {
    let client = kube_source::client(None, Some(&server.url()))
        .await
        .unwrap();
    follow_with(client, options)
}

fn follow_with(client: kube::Client, options: Options) -> Proxy {
    let (tx, mut rx) = unbounded_channel();
    let source = tokio::spawn(kube_source::run_with(client, NODE.into(), tx, options));
    let observed = Arc::new(Mutex::new(Observed::default()));
    let seen = observed.clone();
    let consumer = tokio::spawn(async move {
        while let Some(update) = rx.recv().await {
            let mut o = seen.lock().unwrap();
            match update {
                SourceUpdate::Events(events) => {
                    o.log
                        .push(Seen::Events(events.iter().map(describe).collect()));
                    controllers::apply_all(&mut o.state, events);
                    let names = o.services();
                    o.services_after_batch.push(names);
                }
                SourceUpdate::InitialSyncDone => {
                    o.log.push(Seen::Synced);
                    let counts = (
                        o.state.service_count(),
                        o.total_endpoints(),
                        o.state.nodes().count(),
                    );
                    o.at_sync = Some(counts);
                }
                SourceUpdate::NodeEligible(e) => o.log.push(Seen::Eligible(e)),
                // The API source never sends the kernel's addresses.
                SourceUpdate::LocalAddresses(_) => {}
            }
        }
    });
    Proxy {
        observed,
        source,
        consumer,
    }
}

impl Proxy {
    fn seen(&self) -> MutexGuard<'_, Observed> {
        self.observed.lock().unwrap()
    }

    async fn until(&self, what: &str, done: impl Fn(&Observed) -> bool) {
        let start = Instant::now();
        loop {
            if done(&self.seen()) {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}; saw {:#?}",
                self.seen().log
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn synced(&self) {
        self.until("the initial sync", Observed::synced).await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.source.abort();
        self.consumer.abort();
    }
}

fn since(server: &ApiServer, mark: usize) -> Vec<Request> {
    server.requests()[mark..].to_vec()
}

fn list_requests(requests: &[Request], kind: Kind) -> usize {
    requests
        .iter()
        .filter(|r| r.kind == kind && r.is_list())
        .count()
}

/// Two Services with a slice each, and the node.
async fn small_cluster() -> ApiServer {
    let server = ApiServer::start().await;
    server.apply(Kind::Service, service("default", "a", "10.96.0.1", 80));
    server.apply(Kind::Service, service("default", "b", "10.96.0.2", 80));
    server.apply(
        Kind::EndpointSlice,
        slice("default", "a-1", "a", &ips(1, 1), 8080),
    );
    server.apply(
        Kind::EndpointSlice,
        slice("default", "b-1", "b", &ips(2, 2), 8080),
    );
    server.apply(Kind::Node, node(NODE, "192.0.2.10"));
    server.apply(Kind::Node, node("other-node", "192.0.2.11"));
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_updates_and_deletes_reach_the_model_in_order() {
    let server = small_cluster().await;
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;
    assert_eq!(
        proxy.seen().at_sync,
        Some((2, 3, 1)),
        "only our node is followed"
    );

    server.apply(Kind::Service, service("default", "c", "10.96.0.3", 80));
    server.apply(
        Kind::EndpointSlice,
        slice("default", "c-1", "c", &ips(1, 3), 8080),
    );
    server.apply(
        Kind::EndpointSlice,
        slice("default", "a-1", "a", &ips(3, 1), 8080),
    );
    server.apply(Kind::Service, service("default", "a", "10.96.0.1", 81));
    server.apply(
        Kind::EndpointSlice,
        slice("default", "c-1", "c", &ips(2, 3), 8080),
    );
    server.delete(Kind::EndpointSlice, "default", "b-1");
    server.delete(Kind::Service, "default", "c");
    proxy
        .until("all seven changes", |o| {
            o.events_after_sync("Service").len() + o.events_after_sync("EndpointSlice").len() == 7
        })
        .await;

    let seen = proxy.seen();
    // Each kind arrives in the order the server made the changes (kinds are separate
    // watches, so their interleaving is free, as with kube-proxy's informers).
    assert_eq!(
        seen.events_after_sync("Service"),
        [
            "apply Service default/c",
            "apply Service default/a",
            "delete Service default/c"
        ]
    );
    assert_eq!(
        seen.events_after_sync("EndpointSlice"),
        [
            "apply EndpointSlice default/c-1",
            "apply EndpointSlice default/a-1",
            "apply EndpointSlice default/c-1",
            "delete EndpointSlice default/b-1"
        ]
    );
    assert_eq!(
        seen.services(),
        BTreeSet::from(["default/a".to_owned(), "default/b".to_owned()])
    );
    let a = seen
        .state
        .service(&ServiceName {
            namespace: "default".into(),
            name: "a".into(),
        })
        .unwrap();
    assert_eq!(a[0].port, 81);
    assert_eq!(
        seen.endpoints("a"),
        ["10.244.1.1:8080", "10.244.1.2:8080", "10.244.1.3:8080"]
    );
    assert!(seen.endpoints("b").is_empty(), "b's only slice was deleted");
}

async fn initial_sync_waits_for_a_slow_list(lists: ListStrategy) {
    let server = ApiServer::start().await;
    for i in 0..5 {
        let name = format!("s{i}");
        server.apply(
            Kind::Service,
            service("default", &name, &format!("10.96.1.{i}"), 80),
        );
        server.apply(
            Kind::EndpointSlice,
            slice("default", &format!("{name}-x"), &name, &ips(2, i), 8080),
        );
    }
    server.apply(Kind::Node, node(NODE, "192.0.2.10"));
    server.knobs(|k| {
        k.list_delay = [
            Duration::from_millis(100),
            Duration::from_millis(1200),
            Duration::ZERO,
        ];
    });
    let started = Instant::now();
    let proxy = follow(
        &server,
        Options {
            lists,
            page_size: 2,
            ..fast()
        },
    )
    .await;
    proxy.synced().await;
    assert!(started.elapsed() >= Duration::from_millis(1200));
    let seen = proxy.seen();
    assert_eq!(
        seen.at_sync,
        Some((5, 10, 1)),
        "everything was known at the initial sync"
    );
    assert_eq!(
        seen.log.iter().filter(|s| **s == Seen::Synced).count(),
        1,
        "exactly one initial sync"
    );
    // The slow kind's objects were all there by then, though they came last.
    let last_slice_batch = seen
        .log
        .iter()
        .rposition(
            |s| matches!(s, Seen::Events(e) if e.iter().any(|e| e.contains("EndpointSlice "))),
        )
        .unwrap();
    let synced_at = seen.log.iter().position(|s| *s == Seen::Synced).unwrap();
    assert!(last_slice_batch < synced_at, "{:#?}", seen.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_waits_for_every_list_even_when_one_is_slow_streaming() {
    initial_sync_waits_for_a_slow_list(ListStrategy::Streaming).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_waits_for_every_list_even_when_one_is_slow_paginated() {
    initial_sync_waits_for_a_slow_list(ListStrategy::Paginated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_the_state_and_reconnects_without_a_relist() {
    let server = small_cluster().await;
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;
    let batches_before = proxy.seen().batches().len();

    server.stop();
    server.apply(Kind::Service, service("default", "c", "10.96.0.3", 80));
    server.apply(
        Kind::EndpointSlice,
        slice("default", "c-1", "c", &ips(1, 3), 8080),
    );
    server.delete(Kind::Service, "default", "a");
    tokio::time::sleep(Duration::from_millis(800)).await;
    {
        let seen = proxy.seen();
        assert_eq!(
            seen.batches().len(),
            batches_before,
            "nothing is sent while the server is away"
        );
        assert_eq!(
            seen.services(),
            BTreeSet::from(["default/a".to_owned(), "default/b".to_owned()]),
            "the state is kept"
        );
    }

    let mark = server.requests().len();
    server.restart().await;
    proxy
        .until("the changes made during the outage", |o| {
            o.services() == BTreeSet::from(["default/b".to_owned(), "default/c".to_owned()])
                && o.endpoints("c").len() == 1
        })
        .await;
    let after = since(&server, mark);
    assert!(!after.is_empty());
    assert!(
        after.iter().all(Request::is_resumed_watch),
        "only watches that resume from a resourceVersion: {after:#?}"
    );
    assert!(
        after
            .iter()
            .all(|r| r.param("resourceVersion").is_some_and(|v| v != "0")),
        "{after:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_keep_a_quiet_watch_resumable_after_compaction() {
    let server = small_cluster().await;
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;
    // Many Service changes; the Node watch sees none of them, only bookmarks.
    for i in 0..20 {
        server.apply(
            Kind::Service,
            service("default", "b", "10.96.0.2", 1000 + i),
        );
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.stop();
    server.compact();
    let mark = server.requests().len();
    server.restart().await;
    server.apply(Kind::Service, service("default", "d", "10.96.0.4", 80));
    proxy
        .until("the Service made after the restart", |o| {
            o.services().contains("default/d")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = since(&server, mark);
    assert!(
        after.iter().all(Request::is_resumed_watch),
        "no kind had to relist: {after:#?}"
    );
    assert!(after.iter().any(|r| r.kind == Kind::Node));
}

async fn gone_leads_to_one_relist(gone_as_status: bool, lists: ListStrategy) {
    let server = small_cluster().await;
    server.knobs(|k| k.gone_as_status = gone_as_status);
    let proxy = follow(&server, Options { lists, ..fast() }).await;
    proxy.synced().await;

    server.stop();
    server.delete(Kind::Service, "default", "a");
    server.delete(Kind::EndpointSlice, "default", "a-1");
    server.apply(Kind::Service, service("default", "c", "10.96.0.3", 80));
    server.apply(
        Kind::EndpointSlice,
        slice("default", "c-1", "c", &ips(1, 3), 8080),
    );
    server.apply(Kind::Node, node(NODE, "192.0.2.99"));
    server.compact();
    let mark = server.requests().len();
    let batches_before = proxy.seen().batches().len();
    server.restart().await;
    proxy
        .until("the relisted state", |o| {
            o.services() == BTreeSet::from(["default/b".to_owned(), "default/c".to_owned()])
                && o.endpoints("c").len() == 1
                && o.endpoints("a").is_empty()
                && o.state.node(NODE).is_some_and(|n| {
                    n.addresses == ["192.0.2.99".parse::<std::net::IpAddr>().unwrap()]
                })
        })
        .await;
    // Let any further (wrong) relist show itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = since(&server, mark);
    for kind in testapi::kinds() {
        assert_eq!(
            list_requests(&after, kind),
            1,
            "{kind:?}: exactly one relist: {after:#?}"
        );
    }
    let seen = proxy.seen();
    // A relist is one batch that replaces the kind's state.
    let relist_batches = &seen.batches()[batches_before..];
    let service_batches: Vec<&Vec<String>> = relist_batches
        .iter()
        .filter(|b| b.iter().any(|e| e.contains(" Service ")))
        .collect();
    assert_eq!(service_batches.len(), 1, "{relist_batches:#?}");
    let mut services: Vec<&String> = service_batches[0]
        .iter()
        .filter(|e| e.contains(" Service "))
        .collect();
    services.sort();
    assert_eq!(
        services,
        [
            "apply Service default/b",
            "apply Service default/c",
            "delete Service default/a"
        ]
    );
    // And no batch ever left the proxier without b, which never went away.
    let first_sync_batch = seen
        .services_after_batch
        .iter()
        .position(|s| s.contains("default/b"))
        .unwrap();
    assert!(
        seen.services_after_batch[first_sync_batch..]
            .iter()
            .all(|s| s.contains("default/b"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_during_watch_leads_to_one_relist_that_drops_what_was_deleted_meanwhile() {
    gone_leads_to_one_relist(false, ListStrategy::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_answered_at_watch_start_also_leads_to_one_relist() {
    gone_leads_to_one_relist(true, ListStrategy::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_with_paginated_lists_also_leads_to_one_relist() {
    gone_leads_to_one_relist(false, ListStrategy::Paginated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_connection_resumes_from_its_resource_version() {
    let server = small_cluster().await;
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;
    let mark = server.requests().len();
    server.drop_watches();
    server.apply(Kind::Service, service("default", "c", "10.96.0.3", 80));
    server.delete(Kind::EndpointSlice, "default", "b-1");
    proxy
        .until("the changes after the drop", |o| {
            o.services().contains("default/c") && o.endpoints("b").is_empty()
        })
        .await;
    let after = since(&server, mark);
    assert!(!after.is_empty(), "the watches were re-opened");
    assert!(after.iter().all(Request::is_resumed_watch), "{after:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_changes_cost_no_request_beyond_the_open_watches() {
    let server = ApiServer::start().await;
    server.apply_many(testapi::fleet(100, 10));
    server.apply(Kind::Node, node(NODE, "192.0.2.10"));
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;
    let mark = server.requests().len();
    for change in 0..1000usize {
        let i = change % 100;
        let round = change / 100 + 1;
        let ips: Vec<String> = (0..10)
            .map(|e| testapi::endpoint_ip(i, if e == 0 { 10 + round } else { e }))
            .collect();
        server.apply(
            Kind::EndpointSlice,
            slice(
                "default",
                &format!("svc-{i}-abc"),
                &format!("svc-{i}"),
                &ips,
                8080,
            ),
        );
        if change % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let last = format!("{}:8080", testapi::endpoint_ip(99, 20));
    proxy
        .until("the last change", |o| o.endpoints("svc-99").contains(&last))
        .await;
    let after = since(&server, mark);
    assert!(
        after.is_empty(),
        "1,000 changes arrive on the open watches: {after:#?}"
    );
    let all = server.requests();
    for kind in testapi::kinds() {
        assert_eq!(list_requests(&all, kind), 1, "{kind:?}: one list in all");
    }
    let seen = proxy.seen();
    assert_eq!(seen.events_after_sync("EndpointSlice").len(), 1000);
    assert_eq!(seen.total_endpoints(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_streaming_lists_gets_paginated_lists() {
    let server = ApiServer::start().await;
    server.knobs(|k| k.streaming = false);
    for i in 0..5u8 {
        let name = format!("s{i}");
        server.apply(
            Kind::Service,
            service("default", &name, &format!("10.96.1.{i}"), 80),
        );
    }
    server.apply(Kind::Node, node(NODE, "192.0.2.10"));
    let proxy = follow(
        &server,
        Options {
            page_size: 2,
            ..fast()
        },
    )
    .await;
    proxy.synced().await;
    assert_eq!(proxy.seen().at_sync, Some((5, 0, 1)));
    server.apply(Kind::Service, service("default", "s9", "10.96.1.9", 80));
    proxy
        .until("a change after the list", |o| {
            o.services().contains("default/s9")
        })
        .await;
    let requests = server.requests();
    for kind in testapi::kinds() {
        let of_kind: Vec<&Request> = requests.iter().filter(|r| r.kind == kind).collect();
        assert_eq!(
            of_kind
                .iter()
                .filter(|r| r.param("sendInitialEvents").is_some())
                .count(),
            1,
            "{kind:?}: asked once for a streaming list"
        );
        assert_eq!(
            of_kind
                .iter()
                .filter(|r| !r.watch && !r.is_continuation())
                .count(),
            1,
            "{kind:?}: then one paginated list: {of_kind:#?}"
        );
        assert!(
            of_kind
                .iter()
                .filter(|r| !r.watch)
                .all(|r| r.param("limit") == Some("2")),
            "{kind:?}: pages of 2"
        );
    }
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.kind == Kind::Service && r.is_continuation())
            .count(),
        2,
        "5 Services in pages of 2"
    );
    // As client-go's reflector: the first page from the watch cache, the others by token.
    for r in requests.iter().filter(|r| !r.watch) {
        let expected = if r.is_continuation() { None } else { Some("0") };
        assert_eq!(r.param("resourceVersion"), expected, "{r:#?}");
    }
    assert!(
        !requests.iter().any(Request::is_quorum_list),
        "{requests:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cache_that_ignores_the_limit_answers_the_paginated_list_at_once() {
    let server = small_cluster().await;
    server.knobs(|k| {
        k.streaming = false;
        k.cache_ignores_limit = true;
    });
    let options = Options {
        lists: ListStrategy::Paginated,
        page_size: 1,
        ..fast()
    };
    let proxy = follow(&server, options).await;
    proxy.synced().await;
    assert_eq!(proxy.seen().at_sync, Some((2, 3, 1)));
    let requests = server.requests();
    for kind in testapi::kinds() {
        let lists: Vec<&Request> = requests
            .iter()
            .filter(|r| r.kind == kind && !r.watch)
            .collect();
        assert_eq!(
            lists.len(),
            1,
            "{kind:?}: one page, no continuation: {lists:#?}"
        );
        assert_eq!(lists[0].param("resourceVersion"), Some("0"));
        assert_eq!(lists[0].param("limit"), Some("1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_paginated_list_the_next_relist_tries_streaming_again() {
    let server = small_cluster().await;
    server.knobs(|k| k.streaming = false);
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;

    // The server is upgraded meanwhile, and the proxy's watches fall behind its history.
    server.stop();
    server.knobs(|k| k.streaming = true);
    server.apply(Kind::Service, service("default", "c", "10.96.0.3", 80));
    server.compact();
    let mark = server.requests().len();
    server.restart().await;
    proxy
        .until("the relisted state", |o| o.services().contains("default/c"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = since(&server, mark);
    for kind in testapi::kinds() {
        let lists: Vec<&Request> = after
            .iter()
            .filter(|r| r.kind == kind && r.is_list())
            .collect();
        assert_eq!(lists.len(), 1, "{kind:?}: one relist: {after:#?}");
        assert!(lists[0].watch, "{kind:?}: a streaming list: {lists:#?}");
    }
    assert!(!after.iter().any(Request::is_quorum_list), "{after:#?}");
}

/// The Node's `spec.podCIDRs` reach the model from the API (detect-local-mode NodeCIDR's
/// local traffic), and follow it when the allocator assigns them after the Node registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_pod_cidrs_reach_the_model_when_assigned() {
    let server = small_cluster().await;
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;
    assert_eq!(
        proxy.seen().state.node(NODE).map(|n| n.pod_cidrs.clone()),
        Some(Vec::new())
    );
    let mut assigned = node(NODE, "192.0.2.10");
    assigned["spec"] =
        json!({"podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24", "fd00:10:244:7::/64"]});
    server.apply(Kind::Node, assigned);
    proxy
        .until("the podCIDRs in the model", |o| {
            o.state.node(NODE).is_some_and(|n| {
                n.pod_cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    == ["10.244.7.0/24", "fd00:10:244:7::/64"]
            })
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_is_ineligible_while_being_deleted_or_tainted_for_deletion() {
    let server = small_cluster().await;
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;
    let eligibility = |o: &Observed| -> Vec<bool> {
        o.log
            .iter()
            .filter_map(|s| match s {
                Seen::Eligible(e) => Some(*e),
                _ => None,
            })
            .collect()
    };
    let position = |o: &Observed, what: &Seen| o.log.iter().position(|s| s == what);
    {
        let seen = proxy.seen();
        assert_eq!(eligibility(&seen), [true]);
        assert!(
            position(&seen, &Seen::Eligible(true)) < position(&seen, &Seen::Synced),
            "known by the initial sync"
        );
    }
    let mut tainted = node(NODE, "192.0.2.10");
    tainted["spec"] = json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]});
    server.apply(Kind::Node, tainted);
    proxy
        .until("ineligible", |o| eligibility(o) == [true, false])
        .await;
    server.apply(Kind::Node, node(NODE, "192.0.2.10"));
    proxy
        .until("eligible again", |o| eligibility(o) == [true, false, true])
        .await;
    let mut deleting = node(NODE, "192.0.2.10");
    deleting["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    server.apply(Kind::Node, deleting);
    proxy
        .until("ineligible while deleted", |o| {
            eligibility(o) == [true, false, true, false]
        })
        .await;
    server.delete(Kind::Node, "", NODE);
    proxy
        .until("the node gone from the model", |o| {
            o.state.node(NODE).is_none()
        })
        .await;
    assert_eq!(eligibility(&proxy.seen()), [true, false, true, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_use_kube_proxys_selectors_and_a_service_leaving_them_leaves_the_model() {
    let server = small_cluster().await;
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;
    for r in server.requests() {
        match r.kind {
            Kind::Service | Kind::EndpointSlice => assert_eq!(
                r.param("labelSelector"),
                Some("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")
            ),
            Kind::Node => assert_eq!(r.param("fieldSelector"), Some("metadata.name=node-1")),
        }
        if r.watch {
            assert_eq!(r.param("allowWatchBookmarks"), Some("true"));
        }
    }
    let mut other = service("default", "a", "10.96.0.1", 80);
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "other"});
    server.apply(Kind::Service, other);
    proxy
        .until("a handed to another proxy", |o| {
            !o.services().contains("default/a")
        })
        .await;
    assert_eq!(
        proxy.seen().events_after_sync("Service"),
        ["delete Service default/a"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_returns_when_the_receiver_is_dropped() {
    let server = small_cluster().await;
    let mut proxy = follow(&server, fast()).await;
    proxy.synced().await;
    proxy.consumer.abort();
    let result = tokio::time::timeout(Duration::from_secs(5), &mut proxy.source)
        .await
        .expect("returns promptly")
        .unwrap();
    assert!(result.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_is_read_and_master_overrides_its_server() {
    let server = small_cluster().await;
    let dir = std::env::temp_dir().join(format!("ipvs-proxy-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = |url: &str| {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{url}'}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\n\
             contexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        )
    };
    let good = dir.join("good.yaml");
    std::fs::write(&good, kubeconfig(&server.url())).unwrap();
    let client = kube_source::client(Some(&good), None).await.unwrap();
    let proxy = follow_with(client, fast());
    proxy.synced().await;
    drop(proxy);

    // Nothing listens on port 1 of 127.0.0.1; --master names the real server.
    let wrong = dir.join("wrong.yaml");
    std::fs::write(&wrong, kubeconfig("http://127.0.0.1:1")).unwrap();
    let client = kube_source::client(Some(&wrong), Some(&server.url()))
        .await
        .unwrap();
    let proxy = follow_with(client, fast());
    proxy.synced().await;
    let _ = std::fs::remove_dir_all(&dir);

    assert!(matches!(
        kube_source::client(None, Some("not a url at all")).await,
        Err(kube_source::Error::Master { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_node_name_is_refused() {
    let server = small_cluster().await;
    let client = kube_source::client(None, Some(&server.url()))
        .await
        .unwrap();
    let (tx, _rx) = unbounded_channel();
    assert!(matches!(
        kube_source::run(client, String::new(), tx).await,
        Err(kube_source::Error::NoNodeName)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_once_reads_what_the_watchers_would() {
    let server = small_cluster().await;
    let client = kube_source::client(None, Some(&server.url()))
        .await
        .unwrap();
    let events = kube_source::list_once(client, NODE).await.unwrap();
    let mut names: Vec<String> = events.iter().map(describe).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "apply EndpointSlice default/a-1",
            "apply EndpointSlice default/b-1",
            "apply Node /node-1",
            "apply Service default/a",
            "apply Service default/b"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_watch_asks_for_its_own_timeout_between_five_and_ten_minutes() {
    let server = small_cluster().await;
    let proxy = follow(
        &server,
        Options {
            watch_timeout: None,
            ..fast()
        },
    )
    .await;
    proxy.synced().await;
    let timeouts: Vec<u32> = server
        .requests()
        .iter()
        .filter(|r| r.watch)
        .filter_map(|r| r.param("timeoutSeconds")?.parse().ok())
        .collect();
    assert!(timeouts.len() >= 3, "one watch a kind: {timeouts:?}");
    assert!(
        timeouts.iter().all(|t| (300..=600).contains(t)),
        "{timeouts:?}"
    );
    // Three draws from 301 values: all equal once in 90,000 runs; a fixed timeout, always.
    assert!(
        timeouts.windows(2).any(|w| w[0] != w[1]),
        "the same timeout for every watch: {timeouts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_names_ipvs_proxy_in_its_user_agent() {
    let server = small_cluster().await;
    let proxy = follow(&server, fast()).await;
    proxy.synced().await;
    let requests = server.requests();
    assert!(!requests.is_empty());
    let want = format!(
        "ipvs-proxy/{} (linux/{})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    );
    for r in &requests {
        assert_eq!(r.user_agent.as_deref(), Some(want.as_str()), "{r:?}");
    }
}

/// The bytes the server sent for the Service lists (not watches) of a paginated first sync.
async fn service_list_bytes(server: &ApiServer, client: kube::Client) -> (u64, Vec<Request>) {
    let mark = server.requests().len();
    let options = Options {
        lists: ListStrategy::Paginated,
        ..fast()
    };
    let proxy = follow_with(client, options);
    proxy.synced().await;
    assert_eq!(proxy.seen().at_sync.map(|s| s.0), Some(300));
    let lists: Vec<Request> = since(server, mark)
        .into_iter()
        .filter(|r| r.kind == Kind::Service && !r.watch)
        .collect();
    (lists.iter().map(Request::bytes).sum(), lists)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_gzip_compressed() {
    let server = ApiServer::start().await;
    server.apply_many(testapi::fleet(300, 10));
    server.apply(Kind::Node, node(NODE, "192.0.2.10"));
    let client = kube_source::client(None, Some(&server.url()))
        .await
        .unwrap();
    let (gzipped, lists) = service_list_bytes(&server, client).await;
    assert!(lists.iter().all(|r| r.accepts_gzip), "{lists:#?}");

    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.disable_compression = true;
    let plain = kube::Client::try_from(config).unwrap();
    let (identity, lists) = service_list_bytes(&server, plain).await;
    assert!(!lists.iter().any(|r| r.accepts_gzip), "{lists:#?}");
    // 300 Services of ~300 bytes of JSON each; gzip keeps well under a quarter.
    assert!(
        gzipped * 4 < identity,
        "gzip {gzipped} bytes, identity {identity} bytes"
    );
}
