//! Events on refused Services, posted to the test API server by the real kube client.

use std::time::{Duration, Instant};

use controllers::events::{self, BURST, REASON};
use controllers::kube_source;
use controllers::source::Kind;
use reconciler::sync::SyncError;
use reconciler::{Error, ServiceName};
use serde_json::Value;
use testapi::{ApiServer, service};

fn refused(namespace: &str, name: &str, why: &str) -> SyncError {
    let source: Box<dyn std::error::Error + Send + Sync> = why.into();
    let error = Error::Bind {
        ip: "10.96.0.1".parse().unwrap(),
        source,
    };
    SyncError::new(Some(&ServiceName::new(namespace, name)), error)
}

async fn events_after(server: &ApiServer, timeout: Duration, want: usize) -> Vec<Value> {
    let start = Instant::now();
    while server.events().len() < want && start.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let any further (wrong) Event show itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.events()
}

async fn poster(server: &ApiServer) -> events::EventSender {
    let client = kube_source::client(None, Some(&server.url()))
        .await
        .unwrap();
    events::spawn(client, "node-1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_service_gets_one_warning_event_naming_it_and_a_deleted_one_none() {
    let server = ApiServer::start().await;
    server.apply(Kind::Service, service("team-a", "web", "10.96.0.1", 80));
    let uid = "7d1c5a8e-0000-4000-8000-000000000001";
    let mut svc = server.get(Kind::Service, "team-a", "web").unwrap();
    svc["metadata"]["uid"] = uid.into();
    server.apply(Kind::Service, svc);
    let sender = poster(&server).await;

    let gone = refused("team-a", "gone", "address in use");
    let error = refused("team-a", "web", "address in use");
    sender.report(&[&gone, &error]);
    let posted = events_after(&server, Duration::from_secs(10), 1).await;
    assert_eq!(posted.len(), 1, "{posted:#?}");
    let event = &posted[0];
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], REASON);
    assert_eq!(event["reportingController"], "ipvs-proxy");
    assert_eq!(event["reportingInstance"], "node-1");
    assert_eq!(event["metadata"]["namespace"], "team-a");
    let regarding = &event["regarding"];
    assert_eq!(
        (&regarding["kind"], &regarding["name"], &regarding["uid"]),
        (&"Service".into(), &"web".into(), &uid.into()),
    );
    assert!(
        event["note"].as_str().unwrap().contains("address in use"),
        "{event:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_refusal_raises_the_series_count_instead_of_a_new_event() {
    let server = ApiServer::start().await;
    server.apply(Kind::Service, service("default", "web", "10.96.0.1", 80));
    let sender = poster(&server).await;
    let error = refused("default", "web", "address in use");
    sender.report(&[&error]);
    events_after(&server, Duration::from_secs(10), 1).await;
    sender.report(&[&error]);
    let posted = events_after(&server, Duration::from_secs(10), 2).await;
    assert_eq!(posted.len(), 2, "{posted:#?}");
    assert_eq!(posted[0]["metadata"]["name"], posted[1]["metadata"]["name"]);
    assert_eq!(posted[1]["series"]["count"], 2, "{posted:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_refusals_is_rate_limited() {
    let server = ApiServer::start().await;
    let n = BURST as usize + 10;
    for i in 0..n {
        let ip = format!("10.96.0.{}", i + 1);
        server.apply(Kind::Service, service("default", &format!("s{i}"), &ip, 80));
    }
    let sender = poster(&server).await;
    let errors: Vec<SyncError> = (0..n)
        .map(|i| refused("default", &format!("s{i}"), "address in use"))
        .collect();
    let started = Instant::now();
    sender.report(&errors.iter().collect::<Vec<_>>());
    let posted = events_after(&server, Duration::from_secs(3), BURST as usize).await;
    assert!(
        started.elapsed() < events::REFILL,
        "measured before any refill"
    );
    assert_eq!(posted.len(), BURST as usize, "{posted:#?}");
}
