//! The Kubernetes API source: kube-rs watchers for Services, EndpointSlices and this node's
//! Node, speaking [`SourceUpdate`] like the manifest directory does.
//!
//! What it promises the proxier, and how:
//!
//! - **No half-known world.** Every (re)list — the first one, or one after `410 Gone` — is
//!   buffered from the watcher's `Init` to its `InitDone` and sent as ONE batch: applies for
//!   everything listed, deletes for what was known and is no longer listed. `InitialSyncDone`
//!   is sent exactly once, after the first lists of all three kinds are complete.
//! - **Gentle on the API server.** Streaming lists (`sendInitialEvents=true`, served from the
//!   watch cache) when the server offers them; a server that refuses them (422/400: before
//!   Kubernetes 1.27, or with the `WatchList` feature gate off) gets paginated lists of 500
//!   instead, their first page from the watch cache as client-go's (`paginated`), and its
//!   next relist tries streaming again. Lists come gzip-compressed.
//!   After a disconnect the watch resumes from the last resourceVersion it saw, which watch
//!   bookmarks keep fresh even for kinds that rarely change, so an outage costs no relist
//!   unless the server has compacted past it (then `410 Gone`, and one relist). Retries back
//!   off exponentially with jitter (800 ms doubling; at the 30 s cap still spread over its
//!   second half). Each watch asks for a server-side timeout drawn between 5 and 10 minutes,
//!   as client-go's reflector does, so that thousands of nodes do not re-open their watches
//!   in step. There is no periodic relist.
//! - **Node eligibility**, as kube-proxy's /healthz: a node being deleted or tainted
//!   `ToBeDeletedByClusterAutoscaler` should not receive load-balancer traffic.

use std::collections::HashSet;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use http::HeaderValue;
use http::header::USER_AGENT;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::api::{Api, ListParams};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;

use crate::events::EventSender;
use crate::paginated;
use crate::source::{Event, Kind, Model, ObjectKey, SourceSink, SourceUpdate};
use crate::throttle::RateLimit;

/// kube-proxy's label selector for Services and EndpointSlices: not another proxy's, and not
/// a headless Service's slices.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// The taint cluster-autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Why the API source could not start or list.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("invalid --master URL {url:?}")]
    Master {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "no --kubeconfig or --master given, and no in-cluster configuration (is KUBERNETES_SERVICE_HOST set?)"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("cannot list {kind:?}s")]
    List {
        kind: Kind,
        #[source]
        source: kube::Error,
    },
    #[error("the node name is empty (set --hostname-override)")]
    NoNodeName,
    #[error("cannot start the runtime to read the API with")]
    Runtime(#[source] std::io::Error),
}

/// A Kubernetes client as kube-proxy builds one: `--kubeconfig` (its current context), with the
/// server replaced by `--master` when both are given; `--master` alone is a plain URL without
/// credentials; neither means in-cluster (the pod's service account). Its requests are not
/// rate-limited: [`throttled_client`] is kube-proxy's.
pub async fn client(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
) -> Result<kube::Client, Error> {
    throttled_client(kubeconfig, master, None).await
}

/// [`client`] with client-go's client-side rate limit (`--kube-api-qps`, `--kube-api-burst`);
/// `None` for none.
pub async fn throttled_client(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
    limit: Option<RateLimit>,
) -> Result<kube::Client, Error> {
    let config = match (kubeconfig, master) {
        (None, None) => kube::Config::incluster().map_err(Error::InCluster)?,
        (None, Some(url)) => master_config(url)?,
        (Some(path), master) => {
            let kubeconfig_error = |source| Error::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            let mut config =
                kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                    .await
                    .map_err(kubeconfig_error)?;
            if let Some(url) = master {
                config.cluster_url = master_config(url)?.cluster_url;
            }
            config
        }
    };
    let mut config = without_tls_roots_for_http(config);
    config.headers.push((USER_AGENT, user_agent()));
    let builder = ClientBuilder::try_from(config).map_err(Error::Client)?;
    Ok(match limit {
        Some(limit) => builder.with_layer(&limit.layer()).build(),
        None => builder.build(),
    })
}

/// `ipvs-proxy/<version> (linux/<arch>)`, as kube-proxy names itself on every request, so that
/// operators, audit logs and API Priority and Fairness rules can tell this load from others.
#[must_use]
pub fn user_agent() -> HeaderValue {
    let text = format!(
        "ipvs-proxy/{} ({}/{})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("ipvs-proxy"))
}

/// kube-rs builds a TLS connector for every client, and with no CA in the configuration it
/// loads the system's trust store, failing where there is none (a minimal image, a node without
/// ca-certificates). A plain `http://` server needs no roots: give it an empty store, so the
/// client builds, and a redirect to https would still fail verification.
fn without_tls_roots_for_http(mut config: kube::Config) -> kube::Config {
    if config.cluster_url.scheme_str() == Some("http") && config.root_cert.is_none() {
        config.root_cert = Some(Vec::new());
    }
    config
}

/// A configuration that reaches `url` with no credentials (client-go's `--master` alone).
fn master_config(url: &str) -> Result<kube::Config, Error> {
    let uri = url.parse().map_err(|source| Error::Master {
        url: url.to_owned(),
        source: Box::new(source),
    })?;
    Ok(kube::Config::new(uri))
}

/// How initial lists and relists are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListStrategy {
    /// Streaming lists, falling back to paginated lists for kinds whose server refuses them.
    #[default]
    Auto,
    /// Streaming lists only (a refusing server is retried with backoff).
    Streaming,
    /// Paginated lists only.
    Paginated,
}

/// Tuning for [`run_with`]; [`run`] takes the defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pub lists: ListStrategy,
    /// Objects per page of a paginated list.
    pub page_size: u32,
    /// The first retry delay after an error; it doubles up to `backoff_max`, each delay
    /// stretched at random by up to 100 %.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Server-side timeout of one watch request, in seconds; the watch is then re-opened from
    /// where it was (no relist). `None` draws one between 5 and 10 minutes for each watch.
    pub watch_timeout: Option<u32>,
    /// At most this many watch events go into one [`SourceUpdate::Events`] batch (a relist is
    /// always one batch, whatever its size).
    pub max_batch: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lists: ListStrategy::Auto,
            page_size: 500,
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
            watch_timeout: None,
            max_batch: 4096,
        }
    }
}

/// Follows the API server until the receiver of `tx` is dropped. See [`run_with`].
pub async fn run(
    client: kube::Client,
    node_name: String,
    tx: impl SourceSink,
) -> Result<(), Error> {
    run_with(client, node_name, tx, Options::default()).await
}

/// For the daemon: follows the API server in a task of its own (its end logged) and starts
/// the poster of Events on the Services the kernel refuses, whose sender it returns.
pub fn spawn(
    client: kube::Client,
    node_name: String,
    tx: impl SourceSink,
) -> Result<EventSender, Error> {
    if node_name.is_empty() {
        return Err(Error::NoNodeName);
    }
    let events = crate::events::spawn(client.clone(), &node_name);
    tokio::spawn(async move {
        if let Err(error) = run(client, node_name, tx).await {
            tracing::error!(%error, "Kubernetes API source stopped");
        }
    });
    Ok(events)
}

/// Follows Services and EndpointSlices (kube-proxy's label selector) and the Node named
/// `node_name`, sending [`SourceUpdate::Events`] batches, [`SourceUpdate::NodeEligible`] when
/// the node's eligibility is first known and when it changes, and [`SourceUpdate::InitialSyncDone`]
/// once, after the first lists of all three kinds are complete. API errors are retried with
/// backoff for ever (as kube-proxy does); it returns when the receiver is dropped.
pub async fn run_with(
    client: kube::Client,
    node_name: String,
    tx: impl SourceSink,
    options: Options,
) -> Result<(), Error> {
    if node_name.is_empty() {
        return Err(Error::NoNodeName);
    }
    let labels = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
    let node_fields = format!("metadata.name={node_name}");
    let mut followers = [
        Follower::new(
            Kind::Service,
            Api::<Service>::all(client.clone()),
            labels.clone(),
            |o| Model::service(&o),
            &options,
        ),
        Follower::new(
            Kind::EndpointSlice,
            Api::<EndpointSlice>::all(client.clone()),
            labels,
            {
                let node: Arc<str> = node_name.as_str().into();
                move |o| Model::endpoint_slice(&o, &node)
            },
            &options,
        ),
        Follower::new(
            Kind::Node,
            Api::<Node>::all(client),
            watcher::Config::default().fields(&node_fields),
            |o| Model::node(&o),
            &options,
        ),
    ];
    let mut initial_sync_sent = false;
    let mut eligible_sent: Option<bool> = None;
    loop {
        let mut batch = Vec::new();
        {
            let [services, slices, node] = &mut followers;
            tokio::select! {
                () = tx.closed() => return Ok(()),
                Some(item) = services.stream.next() => services.handle(item, &mut batch),
                Some(item) = slices.stream.next() => slices.handle(item, &mut batch),
                Some(item) = node.stream.next() => node.handle(item, &mut batch),
                else => return Ok(()),
            }
        }
        // Take whatever else is ready, so that a burst becomes one batch (one sync).
        let mut taken = 1;
        while taken < options.max_batch {
            let mut any = false;
            for follower in &mut followers {
                if let Some(Some(item)) = follower.stream.next().now_or_never() {
                    follower.handle(item, &mut batch);
                    taken += 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        if !batch.is_empty() && tx.send(SourceUpdate::Events(batch)).is_err() {
            return Ok(());
        }
        let [_, _, node] = &followers;
        if let Some(eligible) = node.eligible
            && eligible_sent != Some(eligible)
        {
            if !eligible {
                tracing::warn!(node = %node_name, "node is being deleted: reporting not eligible");
            }
            if tx.send(SourceUpdate::NodeEligible(eligible)).is_err() {
                return Ok(());
            }
            eligible_sent = Some(eligible);
        }
        if !initial_sync_sent && followers.iter().all(|f| f.listed) {
            tracing::info!(
                services = followers[0].known.len(),
                endpoint_slices = followers[1].known.len(),
                node = followers[2].known.len(),
                "initial lists complete"
            );
            if tx.send(SourceUpdate::InitialSyncDone).is_err() {
                return Ok(());
            }
            initial_sync_sent = true;
        }
    }
}

/// [`list_once`] with a [`client`] of `kubeconfig` and `master`, on a runtime of its own: for
/// `ipvs-proxy plan` and `check`, which have none.
pub fn list_once_blocking(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
    node_name: &str,
) -> Result<Vec<Event>, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(async { list_once(client(kubeconfig, master).await?, node_name).await })
}

/// Lists Services, EndpointSlices and this node once (consistent reads, paginated), as the
/// events of a first load. For `ipvs-proxy plan` without `--manifests`.
pub async fn list_once(client: kube::Client, node_name: &str) -> Result<Vec<Event>, Error> {
    let labels = ListParams::default()
        .labels(PROXY_LABEL_SELECTOR)
        .limit(500);
    let mut events = Vec::new();
    for svc in list_all(&Api::<Service>::all(client.clone()), &labels, Kind::Service).await? {
        events.push(Event::Apply(Model::service(&svc)));
    }
    for slice in list_all(
        &Api::<EndpointSlice>::all(client.clone()),
        &labels,
        Kind::EndpointSlice,
    )
    .await?
    {
        events.push(Event::Apply(Model::endpoint_slice(&slice, node_name)));
    }
    let node_fields = ListParams::default().fields(&format!("metadata.name={node_name}"));
    for node in list_all(&Api::<Node>::all(client), &node_fields, Kind::Node).await? {
        events.push(Event::Apply(Model::node(&node)));
    }
    Ok(events)
}

async fn list_all<K>(api: &Api<K>, params: &ListParams, kind: Kind) -> Result<Vec<K>, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut params = params.clone();
    let mut items = Vec::new();
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(|source| Error::List { kind, source })?;
        items.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params.continue_token = Some(token),
            None => return Ok(items),
        }
    }
}

/// Whether kube-proxy would report this node healthy for load balancers.
#[must_use]
pub fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !tainted
}

type ObjectStream = BoxStream<'static, watcher::Result<watcher::Event<Model>>>;
type StreamMaker = Box<dyn Fn(bool, Backoff) -> ObjectStream + Send>;

/// A list in progress: the keys listed so far and, for a relist, the objects held back until
/// the list is complete (converted: a relist of 10,000 Services holds the model's few MiB,
/// not the API objects').
#[derive(Default)]
struct Listing {
    keys: HashSet<ObjectKey>,
    objects: Vec<Model>,
}

/// One kind's watcher, and what the proxier has been told about that kind.
struct Follower {
    kind: Kind,
    stream: ObjectStream,
    make: StreamMaker,
    options: Options,
    /// Whether the current stream uses streaming lists.
    streaming: bool,
    /// Keys the proxier holds for this kind: what a relist diffs against.
    known: HashSet<ObjectKey>,
    /// The list in progress (between `Init` and `InitDone`).
    listing: Option<Listing>,
    /// An error was seen since the last `Init`.
    error_since_init: bool,
    /// The first list is complete.
    listed: bool,
    /// For the Node: whether the node is eligible, once known.
    eligible: Option<bool>,
    /// Delays a stream rebuilt after a `410 Gone` at watch start.
    restart_backoff: Backoff,
}

impl Follower {
    fn new<K>(
        kind: Kind,
        api: Api<K>,
        config: watcher::Config,
        wrap: impl Fn(K) -> Model + Clone + Send + 'static,
        options: &Options,
    ) -> Follower
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let page_size = options.page_size;
        let watch_timeout = options.watch_timeout;
        let make: StreamMaker = Box::new(move |streaming, backoff| {
            let mut config = config.clone();
            config.timeout = Some(watch_timeout.unwrap_or_else(random_watch_timeout));
            let events = if streaming {
                watcher(api.clone(), config.streaming_lists()).boxed()
            } else {
                paginated::list_watch(api.clone(), config.page_size(page_size)).boxed()
            };
            let wrap = wrap.clone();
            events
                .backoff(backoff)
                // Converted as each object arrives: the API object goes at once.
                .map_ok(move |event| match event {
                    watcher::Event::Apply(o) => watcher::Event::Apply(wrap(o)),
                    watcher::Event::Delete(o) => watcher::Event::Delete(wrap(o)),
                    watcher::Event::InitApply(o) => watcher::Event::InitApply(wrap(o)),
                    watcher::Event::Init => watcher::Event::Init,
                    watcher::Event::InitDone => watcher::Event::InitDone,
                })
                .boxed()
        });
        let streaming = options.lists != ListStrategy::Paginated;
        Follower {
            kind,
            stream: make(streaming, Backoff::new(options)),
            make,
            options: options.clone(),
            streaming,
            known: HashSet::new(),
            listing: None,
            error_since_init: false,
            listed: false,
            eligible: None,
            restart_backoff: Backoff::new(options),
        }
    }

    /// Replaces the watcher with a fresh one (which starts with a full list), after `delay`.
    fn restart(&mut self, delay: Duration) {
        let stream = (self.make)(self.streaming, Backoff::new(&self.options));
        self.stream = futures::stream::once(async move {
            tokio::time::sleep(delay).await;
            stream
        })
        .flatten()
        .boxed();
        self.listing = None;
    }

    fn handle(&mut self, item: watcher::Result<watcher::Event<Model>>, out: &mut Vec<Event>) {
        let kind = self.kind;
        match item {
            Ok(watcher::Event::Init) => {
                if self.listing.is_some()
                    && self.streaming
                    && !self.error_since_init
                    && self.options.lists == ListStrategy::Auto
                {
                    // The initial stream ended cleanly without its end bookmark: the server
                    // ignored sendInitialEvents.
                    tracing::warn!(
                        ?kind,
                        "the API server ended a streaming list without its end bookmark; using paginated lists"
                    );
                    self.streaming = false;
                    self.restart(Duration::ZERO);
                    return;
                }
                tracing::debug!(?kind, streaming = self.streaming, "listing");
                self.listing = Some(Listing::default());
                self.error_since_init = false;
            }
            Ok(watcher::Event::InitApply(object)) => {
                let listing = self.listing.get_or_insert_with(Listing::default);
                let key = object.key();
                if self.listed {
                    listing.keys.insert(key);
                    listing.objects.push(object);
                } else {
                    // Nothing is programmed before the initial sync, so the first list goes
                    // out as it arrives: one copy of each object in memory, not two.
                    listing.keys.insert(key.clone());
                    self.note_node(Some(&object));
                    self.known.insert(key);
                    out.push(Event::Apply(object));
                }
            }
            Ok(watcher::Event::InitDone) => {
                let listing = self.listing.take().unwrap_or_default();
                self.finish_list(listing, out);
            }
            Ok(watcher::Event::Apply(object)) => {
                self.note_node(Some(&object));
                self.known.insert(object.key());
                out.push(Event::Apply(object));
            }
            Ok(watcher::Event::Delete(object)) => {
                let key = object.key();
                self.note_node(None);
                self.known.remove(&key);
                out.push(Event::Delete(key));
            }
            Err(error) => {
                self.error_since_init = true;
                if self.streaming
                    && self.options.lists == ListStrategy::Auto
                    && refuses_streaming_lists(&error)
                {
                    tracing::warn!(
                        ?kind,
                        %error,
                        "the API server refuses streaming lists; using paginated lists"
                    );
                    self.streaming = false;
                    self.restart(Duration::ZERO);
                } else if !self.streaming
                    && self.options.lists == ListStrategy::Auto
                    && is_gone(&error)
                {
                    // A relist is due: the paginated list before it succeeded, so the server
                    // may serve streaming lists by now (an upgrade, a gate turned on).
                    let delay = self.restart_backoff.next().unwrap_or_default();
                    tracing::info!(
                        ?kind,
                        ?delay,
                        "resourceVersion expired; relisting, trying a streaming list first"
                    );
                    self.streaming = true;
                    self.restart(delay);
                } else if is_gone_at_watch_start(&error) {
                    // kube-runtime retries such a watch from the same resourceVersion for ever;
                    // the only way forward is a relist.
                    let delay = self.restart_backoff.next().unwrap_or_default();
                    tracing::info!(
                        ?kind,
                        ?delay,
                        "resourceVersion expired at watch start; relisting"
                    );
                    self.restart(delay);
                } else if let watcher::Error::WatchError(status) = &error
                    && status.code == 410
                {
                    tracing::info!(?kind, "resourceVersion expired (410 Gone); relisting");
                } else {
                    tracing::warn!(?kind, %error, "Kubernetes API watch failed; retrying with backoff");
                }
            }
        }
    }

    /// A complete list: deletes for what the proxier holds and the list lacks, and (for a
    /// relist) every listed object, all in the one batch that `out` becomes, so that the
    /// kind's state is replaced at once.
    fn finish_list(&mut self, listing: Listing, out: &mut Vec<Event>) {
        let gone: Vec<ObjectKey> = self
            .known
            .iter()
            .filter(|k| !listing.keys.contains(*k))
            .cloned()
            .collect();
        if self.kind == Kind::Node {
            match listing.objects.first() {
                Some(node) => self.note_node(Some(node)),
                // Gone since we last saw it: deleted. Never seen: not registered yet, and
                // nothing says it is going away.
                None if listing.keys.is_empty() => self.eligible = Some(gone.is_empty()),
                // A first list: noted as it arrived.
                None => {}
            }
        }
        tracing::debug!(
            kind = ?self.kind,
            listed = listing.keys.len(),
            deleted = gone.len(),
            relist = self.listed,
            "list complete"
        );
        out.reserve(gone.len() + listing.objects.len());
        out.extend(gone.into_iter().map(Event::Delete));
        out.extend(listing.objects.into_iter().map(Event::Apply));
        self.known = listing.keys;
        self.listed = true;
    }

    fn note_node(&mut self, object: Option<&Model>) {
        if self.kind != Kind::Node {
            return;
        }
        self.eligible = Some(match object {
            Some(Model::Node { eligible, .. }) => *eligible,
            _ => false,
        });
    }
}

fn api_status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// A server without streaming lists rejects `sendInitialEvents` / `resourceVersionMatch` on a
/// watch as invalid (422), or as a bad request.
fn refuses_streaming_lists(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(e) if matches!(api_status_code(e), Some(400 | 422)))
}

/// `410 Gone` in any form: at watch start, as a watch's ERROR event, or for a list page.
fn is_gone(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchStartFailed(e) | watcher::Error::InitialListFailed(e) => {
            api_status_code(e) == Some(410)
        }
        watcher::Error::WatchError(status) => status.code == 410,
        _ => false,
    }
}

fn is_gone_at_watch_start(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(e) if api_status_code(e) == Some(410))
}

/// A watch's server-side timeout: between 5 and 10 minutes at random, as client-go's
/// reflector picks it, so that the watches of a fleet do not expire together.
fn random_watch_timeout() -> u32 {
    use std::hash::{BuildHasher as _, RandomState};
    // RandomState is seeded per process and per instance.
    let draw = RandomState::new().hash_one(0u8) % 301;
    300 + u32::try_from(draw).unwrap_or(0)
}

/// Exponential backoff with jitter, as client-go's reflector: each delay doubles and is
/// stretched at random by up to 100 %, the base stopping at half the maximum, so that even at
/// the cap the delays spread over its second half and thousands of nodes that lost the API
/// server together do not come back in step. It starts over after two quiet minutes.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    last: Option<Instant>,
    rng: u64,
}

impl Backoff {
    const QUIET: Duration = Duration::from_secs(120);

    #[must_use]
    pub fn new(options: &Options) -> Backoff {
        use std::hash::{BuildHasher as _, RandomState};
        Backoff {
            min: options.backoff_min,
            max: options.backoff_max.max(options.backoff_min),
            next: options.backoff_min,
            last: None,
            // RandomState is seeded per process (and per instance): enough for jitter.
            rng: RandomState::new().hash_one(0u8) | 1,
        }
    }

    fn random_fraction(&mut self) -> f64 {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        #[allow(
            clippy::cast_precision_loss,
            reason = "53 random bits are plenty for jitter"
        )]
        let fraction = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        fraction
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) > Self::QUIET)
        {
            self.next = self.min;
        }
        self.last = Some(now);
        let base = self.next;
        self.next = (base * 2).min(self.max / 2).max(self.min);
        Some(base.mul_f64(1.0 + self.random_fraction()).min(self.max))
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_maximum_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let options = Options {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..Options::default()
        };
        let mut b = Backoff::new(&options);
        let delays: Vec<Duration> = (&mut b).take(8).collect();
        let bases = [100, 200, 400, 500, 500, 500, 500, 500];
        for (d, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *d >= base.min(options.backoff_max) && *d <= (base * 2).min(options.backoff_max),
                "{d:?} for {base:?}"
            );
        }
        assert!(
            delays.windows(2).any(|w| w[0] != w[1]),
            "jittered: {delays:?}"
        );
        // At the cap the delays still spread, over at least half of it: a fleet that lost
        // the API server together does not retry in step.
        let capped: Vec<Duration> = (&mut b).take(200).collect();
        let (low, high) = (capped.iter().min().unwrap(), capped.iter().max().unwrap());
        assert!(*low >= options.backoff_max / 2, "{low:?}");
        assert!(*high <= options.backoff_max, "{high:?}");
        assert!(
            high.saturating_sub(*low) >= options.backoff_max * 2 / 5,
            "spread {low:?}..{high:?}"
        );
        b.reset();
        assert!(b.next().unwrap() < Duration::from_millis(200));
    }

    #[test]
    fn nodes_being_deleted_or_tainted_for_deletion_are_not_eligible() {
        let mut node: Node = serde_json::from_str(r#"{"metadata":{"name":"n1"}}"#).unwrap();
        assert!(node_eligible(&node));
        node.spec = Some(
            serde_json::from_str(
                r#"{"taints":[{"key":"ToBeDeletedByClusterAutoscaler","effect":"NoSchedule"}]}"#,
            )
            .unwrap(),
        );
        assert!(!node_eligible(&node));
        node.spec = None;
        node.metadata.deletion_timestamp =
            Some(serde_json::from_str(r#""2025-01-01T00:00:00Z""#).unwrap());
        assert!(!node_eligible(&node));
    }
}
