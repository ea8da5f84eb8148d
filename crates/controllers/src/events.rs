//! Kubernetes Events on the Services the kernel refused, so that `kubectl describe service`
//! shows a tenant why their Service is not programmed on a node.
//!
//! The sync loop reports a Service's error once per change of error (`reconciler::retries`);
//! each report becomes one Warning Event `FailedToSyncService` (kube-proxy has no per-Service
//! sync event; its nearest, `FailedToStartServiceHealthcheck`, is also a Warning on the
//! Service), reported by `ipvs-proxy` from this node, its action the error's kind
//! (`scheduler_missing`, `conflict`, ...). kube-runtime's `Recorder` turns a repeat of the
//! same Service, kind and node within six minutes into the first Event's series (its count
//! raised by a PATCH) instead of a new object.
//!
//! Best-effort and never in the way: the sync thread only `try_send`s into a bounded queue
//! (a full queue drops the Event), and the poster sends at most [`BURST`] Events at once and
//! then one per [`REFILL`], so that a kernel refusing every Service (10,000 Services × every
//! node) does not flood the API server. A Service gone by the time its Event is due gets none.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use reconciler::sync::SyncError;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Events posted back to back before the rate applies.
pub const BURST: u32 = 25;
/// After a burst, one Event per this long.
pub const REFILL: Duration = Duration::from_secs(10);
/// Reports waiting to be posted; more are dropped.
const QUEUE: usize = 256;

/// The reason of every Event posted here.
pub const REASON: &str = "FailedToSyncService";

/// One refused Service, as the sync loop reported it.
#[derive(Debug)]
struct Refusal {
    namespace: String,
    name: String,
    kind: &'static str,
    message: String,
}

/// The sync loop's end of the poster: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct EventSender(mpsc::Sender<Refusal>);

impl EventSender {
    /// Queues an Event for each error that names a Service; drops what does not fit.
    pub fn report(&self, errors: &[&SyncError]) {
        for error in errors {
            let Some(service) = &error.service else {
                continue;
            };
            let refusal = Refusal {
                namespace: service.namespace.to_string(),
                name: service.name.to_string(),
                kind: error.kind(),
                message: error.to_string(),
            };
            if self.0.try_send(refusal).is_err() {
                tracing::debug!(service = %service, "events queue full: dropping the Event");
            }
        }
    }
}

/// Starts the poster on the current tokio runtime; it ends when every sender is dropped.
#[must_use]
pub fn spawn(client: kube::Client, node_name: &str) -> EventSender {
    let (tx, rx) = mpsc::channel(QUEUE);
    let reporter = Reporter {
        controller: "ipvs-proxy".into(),
        instance: Some(node_name.to_owned()),
    };
    tokio::spawn(post(client, reporter, rx));
    EventSender(tx)
}

async fn post(client: kube::Client, reporter: Reporter, mut rx: mpsc::Receiver<Refusal>) {
    let recorder = Recorder::new(client.clone(), reporter);
    let mut tokens = BURST;
    let mut refilled = Instant::now();
    while let Some(refusal) = rx.recv().await {
        let gained = refilled.elapsed().as_secs() / REFILL.as_secs();
        if gained > 0 {
            tokens = tokens
                .saturating_add(u32::try_from(gained).unwrap_or(u32::MAX))
                .min(BURST);
            refilled = Instant::now();
        }
        if tokens == 0 {
            tokio::time::sleep_until(refilled + REFILL).await;
            refilled = Instant::now();
            tokens = 1;
        }
        tokens -= 1;
        if let Err(error) = post_one(&client, &recorder, &refusal).await {
            tracing::debug!(service = %format!("{}/{}", refusal.namespace, refusal.name), %error, "cannot post the Event");
        }
    }
}

async fn post_one(
    client: &kube::Client,
    recorder: &Recorder,
    refusal: &Refusal,
) -> Result<(), kube::Error> {
    // The uid ties the Event to this Service (kubectl describe looks it up by uid), and a
    // Service deleted meanwhile gets no Event.
    let services = Api::<Service>::namespaced(client.clone(), &refusal.namespace);
    let Some(service) = services.get_opt(&refusal.name).await? else {
        return Ok(());
    };
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(refusal.namespace.clone()),
        name: Some(refusal.name.clone()),
        uid: service.metadata.uid,
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: REASON.into(),
        // The API server caps a note at 1 kB.
        note: Some(truncate(&refusal.message, 1024)),
        action: refusal.kind.into(),
        secondary: None,
    };
    recorder.publish(&event, &regarding).await
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
