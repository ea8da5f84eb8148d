//! A small Kubernetes API server for tests and benchmarks: real HTTP/1.1 on 127.0.0.1,
//! list and watch for Services, EndpointSlices and Nodes, Events accepted, written on plain
//! tokio so that a test controls every byte and every connection.
//!
//! It keeps what kube-apiserver keeps where a client can tell: one resourceVersion counter for
//! every kind (etcd's revision), a history of changes that can be compacted (a watch from
//! before the compaction gets `410 Gone`, as an ERROR event like the watch cache sends, or as
//! an HTTP status), paginated lists (`limit`/`continue` over a snapshot; `resourceVersion=0`
//! is served "from the watch cache", which [`Knobs::cache_ignores_limit`] makes ignore the
//! limit as servers before 1.34 did; a list with no resourceVersion is a quorum read, counted
//! by [`Request::is_quorum_list`]), streaming lists (`sendInitialEvents=true`: ADDED events,
//! then a bookmark annotated `k8s.io/initial-events-end`), periodic bookmarks, label selectors
//! (`key`, `!key`, `key=value`, `key!=value`) with objects leaving a selector seen as DELETED,
//! the field selector `metadata.name=`, gzip-compressed lists for a client that sends
//! `Accept-Encoding: gzip`, and Events created (POST) or updated (PATCH) in core/v1 or
//! events.k8s.io/v1, and one Service read by name. Watches are never compressed (kube-apiserver
//! 1.36 does not compress them). Every request is logged with its user agent, query and the bytes sent
//! back ([`ApiServer::requests`]). Faults on demand: refusing streaming lists (422, as servers
//! before 1.27 or with the WatchList gate off), slow lists, dropped watch connections, and a
//! full outage (listener closed, every connection cut) followed by a restart on the same port.
#![allow(
    clippy::must_use_candidate,
    clippy::missing_panics_doc,
    reason = "test support: lock poisoning is a test failure"
)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use controllers::source::Kind;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

const KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

fn index(kind: Kind) -> usize {
    match kind {
        Kind::Service => 0,
        Kind::EndpointSlice => 1,
        Kind::Node => 2,
    }
}

fn kind_of_path(path: &str) -> Option<Kind> {
    match path {
        "/api/v1/services" => Some(Kind::Service),
        "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
        "/api/v1/nodes" => Some(Kind::Node),
        _ => None,
    }
}

fn type_meta(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Service => ("Service", "v1"),
        Kind::EndpointSlice => ("EndpointSlice", "discovery.k8s.io/v1"),
        Kind::Node => ("Node", "v1"),
    }
}

/// Behaviour that tests switch on and off.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Serve streaming lists; when false, a watch with `sendInitialEvents` or
    /// `resourceVersionMatch` is refused with 422 Invalid.
    pub streaming: bool,
    /// Answer a watch from a compacted resourceVersion with HTTP 410 instead of an ERROR
    /// event in a 200 stream (the watch cache's way).
    pub gone_as_status: bool,
    /// Delay before each list page, and before a streaming list's initial events.
    pub list_delay: [Duration; 3],
    /// How often open watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// A list at `resourceVersion=0` returns everything in one response whatever its limit,
    /// as the watch cache did before it served pages from snapshots (Kubernetes 1.34).
    pub cache_ignores_limit: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            streaming: true,
            gone_as_status: false,
            list_delay: [Duration::ZERO; 3],
            bookmark_interval: Duration::from_millis(100),
            cache_ignores_limit: false,
        }
    }
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: Kind,
    pub watch: bool,
    pub query: BTreeMap<String, String>,
    /// The `User-Agent` header, as kube-apiserver's audit log records it.
    pub user_agent: Option<String>,
    /// The client sent `Accept-Encoding: gzip`.
    pub accepts_gzip: bool,
    /// When it arrived.
    pub at: Instant,
    /// Bytes of the response sent so far (head and body, as on the wire).
    bytes: Arc<AtomicU64>,
}

impl Request {
    /// A request that reads the whole collection: a list (any page but the first is counted
    /// separately by [`Request::is_continuation`]) or a streaming list.
    pub fn is_list(&self) -> bool {
        if self.watch {
            self.query.get("sendInitialEvents").map(String::as_str) == Some("true")
        } else {
            !self.query.contains_key("continue")
        }
    }

    pub fn is_continuation(&self) -> bool {
        !self.watch && self.query.contains_key("continue")
    }

    /// A watch that resumes from a resourceVersion (no list).
    pub fn is_resumed_watch(&self) -> bool {
        self.watch && !self.is_list()
    }

    /// A list read from etcd (no resourceVersion, not a continuation): what a fleet must
    /// not send at start or after an API server restart.
    pub fn is_quorum_list(&self) -> bool {
        !self.watch
            && !self.query.contains_key("continue")
            && self.param("resourceVersion").is_none_or(str::is_empty)
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    /// Bytes of the response sent so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// The write half of a connection, counting what it sends for the request being served.
struct Out {
    write: OwnedWriteHalf,
    bytes: Arc<AtomicU64>,
}

impl Out {
    async fn send(&mut self, data: &[u8]) -> bool {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.write.write_all(data).await.is_ok()
    }
}

#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    old: Option<Arc<Value>>,
    new: Option<Arc<Value>>,
}

type Snapshot = (u64, Arc<Vec<Arc<Value>>>);

#[derive(Debug, Default)]
struct State {
    rv: u64,
    compacted: u64,
    objects: [BTreeMap<(String, String), Arc<Value>>; 3],
    log: Vec<Change>,
    requests: Vec<Request>,
    events: Vec<Value>,
    knobs: Knobs,
    snapshots: HashMap<u64, Snapshot>,
    next_snapshot: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The newest resourceVersion: open watches wake on it.
    changed: watch::Sender<u64>,
    /// Bumped to cut every open watch connection.
    cut: watch::Sender<u64>,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// The server. Dropping it stops it.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.abort_all();
    }
}

impl ApiServer {
    /// Listens on a free port of 127.0.0.1.
    pub async fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            cut: watch::channel(0).0,
            tasks: Mutex::new(Vec::new()),
        });
        let server = ApiServer { shared, addr };
        server.accept_on(listener);
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    fn accept_on(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let conn = tokio::spawn(serve_connection(shared.clone(), stream));
                shared.tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.shared
            .tasks
            .lock()
            .unwrap()
            .push(accept.abort_handle());
    }

    fn abort_all(&self) {
        for task in self.shared.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// An outage: the listener closes (connections are refused) and every open connection
    /// is cut mid-stream.
    pub fn stop(&self) {
        self.abort_all();
    }

    /// Back after an outage, on the same address, with the same objects and history.
    pub async fn restart(&self) {
        // The old listener closes when its aborted task is dropped, which is not at once.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if tries < 200 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.accept_on(listener);
    }

    /// Cuts every open watch connection (no final chunk: the client sees a broken stream).
    pub fn drop_watches(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// Forgets the history up to now: a watch from an older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.state();
        st.compacted = st.rv;
        st.log.clear();
    }

    pub fn knobs(&self, f: impl FnOnce(&mut Knobs)) {
        f(&mut self.state().knobs);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    /// Forgets the requests logged so far.
    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    /// The Events created or updated, in order: each POST's body, each PATCH's.
    pub fn events(&self) -> Vec<Value> {
        self.state().events.clone()
    }

    pub fn resource_version(&self) -> u64 {
        self.state().rv
    }

    /// Creates or replaces an object (its kind, namespace and name are read from it).
    /// Returns the new resourceVersion.
    pub fn apply(&self, kind: Kind, object: Value) -> u64 {
        let rv = {
            let mut st = self.state();
            apply_locked(&mut st, kind, object)
        };
        self.shared.changed.send_replace(rv);
        rv
    }

    /// Many changes under one lock, one wake-up.
    pub fn apply_many(&self, changes: impl IntoIterator<Item = (Kind, Value)>) -> u64 {
        let rv = {
            let mut st = self.state();
            for (kind, object) in changes {
                apply_locked(&mut st, kind, object);
            }
            st.rv
        };
        self.shared.changed.send_replace(rv);
        rv
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let rv = {
            let mut st = self.state();
            let key = (namespace.to_owned(), name.to_owned());
            let old = st.objects[index(kind)].remove(&key)?;
            st.rv += 1;
            let rv = st.rv;
            st.log.push(Change {
                rv,
                kind,
                old: Some(old),
                new: None,
            });
            rv
        };
        self.shared.changed.send_replace(rv);
        Some(rv)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.state().objects[index(kind)]
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|o| (**o).clone())
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.state().objects[index(kind)].len()
    }
}

fn apply_locked(st: &mut State, kind: Kind, mut object: Value) -> u64 {
    let (kind_name, api_version) = type_meta(kind);
    object["kind"] = json!(kind_name);
    object["apiVersion"] = json!(api_version);
    let namespace = if kind == Kind::Node {
        String::new()
    } else {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        object["metadata"]["namespace"] = json!(ns);
        ns
    };
    let name = object["metadata"]["name"]
        .as_str()
        .expect("metadata.name")
        .to_owned();
    st.rv += 1;
    let rv = st.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let new = Arc::new(object);
    let old = st.objects[index(kind)].insert((namespace, name), new.clone());
    st.log.push(Change {
        rv,
        kind,
        old,
        new: Some(new),
    });
    rv
}

/// A label and field selector, as much of them as kube-proxy and ipvs-proxy send.
#[derive(Debug, Default)]
struct Selector {
    labels: Vec<(String, Op)>,
    name: Option<String>,
}

#[derive(Debug)]
enum Op {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
}

impl Selector {
    fn parse(labels: Option<&str>, fields: Option<&str>) -> Selector {
        let mut sel = Selector::default();
        for req in labels
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            let (key, op) = if let Some(key) = req.strip_prefix('!') {
                (key, Op::NotExists)
            } else if let Some((k, v)) = req.split_once("!=") {
                (k, Op::NotEq(v.to_owned()))
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                (k, Op::Eq(v.to_owned()))
            } else {
                (req, Op::Exists)
            };
            sel.labels.push((key.to_owned(), op));
        }
        for req in fields.unwrap_or("").split(',').filter(|r| !r.is_empty()) {
            if let Some(name) = req.strip_prefix("metadata.name=") {
                sel.name = Some(name.to_owned());
            }
        }
        sel
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(name) = &self.name
            && meta["name"].as_str() != Some(name)
        {
            return false;
        }
        self.labels.iter().all(|(key, op)| {
            let value = meta["labels"][key].as_str();
            match op {
                Op::Exists => value.is_some(),
                Op::NotExists => value.is_none(),
                Op::Eq(v) => value == Some(v),
                Op::NotEq(v) => value != Some(v),
            }
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Whether `path` is an Events collection: `/api/v1/namespaces/NS/events` or
/// `/apis/events.k8s.io/v1/namespaces/NS/events`, with or without an Event's name.
fn is_events_path(path: &str) -> bool {
    let rest = path
        .strip_prefix("/api/v1/namespaces/")
        .or_else(|| path.strip_prefix("/apis/events.k8s.io/v1/namespaces/"));
    rest.is_some_and(|r| {
        let mut parts = r.split('/');
        parts.next().is_some_and(|ns| !ns.is_empty()) && parts.next() == Some("events")
    })
}

/// The namespace and name of `/api/v1/namespaces/NS/services/NAME` (one Service's GET).
fn service_path(path: &str) -> Option<(&str, &str)> {
    let (namespace, name) = path
        .strip_prefix("/api/v1/namespaces/")?
        .split_once("/services/")?;
    (!name.is_empty() && !name.contains('/')).then_some((namespace, name))
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let (read, write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut write = Out {
        write,
        bytes: Arc::default(),
    };
    loop {
        let mut request_line = String::new();
        if read.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let (mut user_agent, mut accepts_gzip, mut content_length) = (None, false, 0);
        loop {
            let mut header = String::new();
            if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            if header.trim_end().is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "user-agent" => user_agent = Some(value.to_owned()),
                "accept-encoding" => accepts_gzip = value.split(',').any(|e| e.trim() == "gzip"),
                "content-length" => content_length = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        let mut body = vec![0; content_length];
        if read.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut words = request_line.split_whitespace();
        let method = words.next().unwrap_or("GET");
        let target = words.next().unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        write.bytes = Arc::default();
        let keep = match (method, kind_of_path(path)) {
            ("POST" | "PATCH", _) if is_events_path(path) => {
                let Ok(event) = serde_json::from_slice::<Value>(&body) else {
                    return;
                };
                shared.state.lock().unwrap().events.push(event);
                respond(&mut write, if method == "POST" { 201 } else { 200 }, &body).await
            }
            ("GET", None) if service_path(path).is_some() => {
                let (namespace, name) = service_path(path).unwrap_or_default();
                let object = shared.state.lock().unwrap().objects[index(Kind::Service)]
                    .get(&(namespace.to_owned(), name.to_owned()))
                    .cloned();
                match object {
                    Some(o) => respond(&mut write, 200, &serde_json::to_vec(&*o).unwrap()).await,
                    None => {
                        respond_status(
                            &mut write,
                            404,
                            "NotFound",
                            &format!("services \"{name}\" not found"),
                        )
                        .await
                    }
                }
            }
            ("GET", Some(kind)) => {
                let query = parse_query(query);
                let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
                shared.state.lock().unwrap().requests.push(Request {
                    kind,
                    watch,
                    query: query.clone(),
                    user_agent: user_agent.clone(),
                    accepts_gzip,
                    at: Instant::now(),
                    bytes: write.bytes.clone(),
                });
                if watch {
                    serve_watch(&shared, kind, &query, &mut write).await
                } else {
                    serve_list(&shared, kind, &query, accepts_gzip, &mut write).await
                }
            }
            _ => {
                respond_status(
                    &mut write,
                    404,
                    "NotFound",
                    &format!("no route {method} {path}"),
                )
                .await
            }
        };
        if !keep {
            return;
        }
    }
}

async fn respond(write: &mut Out, code: u16, body: &[u8]) -> bool {
    respond_encoded(write, code, body, "").await
}

/// A response with `extra` header lines (each ending in CRLF).
async fn respond_encoded(write: &mut Out, code: u16, body: &[u8], extra: &str) -> bool {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n",
        reason(code),
        body.len()
    );
    write.send(head.as_bytes()).await && write.send(body).await
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        410 => "Gone",
        422 => "Unprocessable Entity",
        _ => "Error",
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

async fn respond_status(write: &mut Out, code: u16, why: &str, message: &str) -> bool {
    let body = serde_json::to_vec(&status(code, why, message)).unwrap();
    respond(write, code, &body).await
}

async fn serve_list(
    shared: &Shared,
    kind: Kind,
    query: &BTreeMap<String, String>,
    gzip: bool,
    write: &mut Out,
) -> bool {
    let (delay, cache_ignores_limit) = {
        let knobs = &shared.state.lock().unwrap().knobs;
        (knobs.list_delay[index(kind)], knobs.cache_ignores_limit)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .filter(|_| {
            !(cache_ignores_limit && query.get("resourceVersion").map(String::as_str) == Some("0"))
        })
        .unwrap_or(usize::MAX);
    let page = (|| {
        let mut st = shared.state.lock().unwrap();
        let (id, offset, (rv, items)) = if let Some(token) = query.get("continue") {
            let (id, off) = token.split_once(':')?;
            let (id, off) = (id.parse::<u64>().ok()?, off.parse::<usize>().ok()?);
            (id, off, st.snapshots.get(&id)?.clone())
        } else {
            let sel = Selector::parse(
                query.get("labelSelector").map(String::as_str),
                query.get("fieldSelector").map(String::as_str),
            );
            let items: Vec<Arc<Value>> = st.objects[index(kind)]
                .values()
                .filter(|o| sel.matches(o))
                .cloned()
                .collect();
            st.next_snapshot += 1;
            let id = st.next_snapshot;
            (id, 0, (st.rv, Arc::new(items)))
        };
        let end = offset.saturating_add(limit).min(items.len());
        let token = if end < items.len() {
            st.snapshots.insert(id, (rv, items.clone()));
            Some(format!("{id}:{end}"))
        } else {
            st.snapshots.remove(&id);
            None
        };
        Some((rv, items, offset..end, token))
    })();
    let Some((rv, items, offset, token)) = page else {
        return respond_status(write, 410, "Expired", "continue token expired").await;
    };
    let (kind_name, api_version) = type_meta(kind);
    let mut body = Vec::with_capacity(offset.len() * 1024 + 256);
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(token) = token {
        meta["continue"] = json!(token);
    }
    write!(
        body_writer(&mut body),
        r#"{{"kind":"{kind_name}List","apiVersion":"{api_version}","metadata":{meta},"items":["#
    )
    .unwrap();
    for (i, item) in items[offset].iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, &**item).unwrap();
    }
    body.extend_from_slice(b"]}");
    if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&body).unwrap();
        let body = encoder.finish().unwrap();
        respond_encoded(write, 200, &body, "Content-Encoding: gzip\r\n").await
    } else {
        respond(write, 200, &body).await
    }
}

/// `write!` into a byte buffer.
fn body_writer(body: &mut Vec<u8>) -> impl std::fmt::Write + '_ {
    struct W<'a>(&'a mut Vec<u8>);
    impl std::fmt::Write for W<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }
    W(body)
}

fn watch_line(out: &mut Vec<u8>, event_type: &str, object: &Value) {
    out.extend_from_slice(br#"{"type":""#);
    out.extend_from_slice(event_type.as_bytes());
    out.extend_from_slice(br#"","object":"#);
    serde_json::to_writer(&mut *out, object).unwrap();
    out.extend_from_slice(b"}\n");
}

fn bookmark(out: &mut Vec<u8>, kind: Kind, rv: u64, initial_end: bool) {
    let (kind_name, api_version) = type_meta(kind);
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line(
        out,
        "BOOKMARK",
        &json!({"kind": kind_name, "apiVersion": api_version, "metadata": meta}),
    );
}

async fn write_chunk(write: &mut Out, data: &[u8]) -> bool {
    if data.is_empty() {
        return true;
    }
    let mut head = String::new();
    let _ = write!(head, "{:x}\r\n", data.len());
    write.send(head.as_bytes()).await && write.send(data).await && write.send(b"\r\n").await
}

#[allow(
    clippy::too_many_lines,
    reason = "one watch request from start to end, in the order the API server serves it"
)]
async fn serve_watch(
    shared: &Shared,
    kind: Kind,
    query: &BTreeMap<String, String>,
    write: &mut Out,
) -> bool {
    let param = |name: &str| query.get(name).map(String::as_str);
    let send_initial = param("sendInitialEvents") == Some("true");
    let bookmarks = param("allowWatchBookmarks") == Some("true");
    let timeout = Duration::from_secs(
        param("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290),
    );
    let sel = Selector::parse(param("labelSelector"), param("fieldSelector"));
    // Subscribe before reading the state, so that no change falls between the two.
    let mut changed = shared.changed.subscribe();
    let mut cut = shared.cut.subscribe();
    let start = {
        let st = shared.state.lock().unwrap();
        let knobs = st.knobs.clone();
        if (send_initial || param("resourceVersionMatch").is_some()) && !knobs.streaming {
            None
        } else {
            Some(match param("resourceVersion").unwrap_or("") {
                "" | "0" => {
                    // Streaming list, or the legacy "start at most recent" with synthetic ADDEDs.
                    let initial: Vec<Arc<Value>> = st.objects[index(kind)]
                        .values()
                        .filter(|o| sel.matches(o))
                        .cloned()
                        .collect();
                    (knobs, initial, st.rv, None)
                }
                rv => {
                    let rv: u64 = rv.parse().unwrap_or(0);
                    let gone = (rv < st.compacted).then_some((rv, st.compacted));
                    (knobs, Vec::new(), rv, gone)
                }
            })
        }
    };
    let Some((knobs, initial, mut cursor, gone)) = start else {
        return respond_status(
            write,
            422,
            "Invalid",
            "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
        )
        .await;
    };
    if let Some((rv, compacted)) = gone {
        let message = format!("too old resource version: {rv} ({compacted})");
        if knobs.gone_as_status {
            return respond_status(write, 410, "Expired", &message).await;
        }
        let mut out = Vec::new();
        watch_line(&mut out, "ERROR", &status(410, "Expired", &message));
        return write_head_chunked(write).await
            && write_chunk(write, &out).await
            && write.send(b"0\r\n\r\n").await;
    }
    if !write_head_chunked(write).await {
        return false;
    }
    if send_initial {
        let delay = knobs.list_delay[index(kind)];
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut out = Vec::with_capacity(64 * 1024);
        for object in &initial {
            watch_line(&mut out, "ADDED", object);
            if out.len() >= 60 * 1024 {
                if !write_chunk(write, &out).await {
                    return false;
                }
                out.clear();
            }
        }
        bookmark(&mut out, kind, cursor, true);
        if !write_chunk(write, &out).await {
            return false;
        }
    } else if !initial.is_empty() {
        let mut out = Vec::new();
        for object in &initial {
            watch_line(&mut out, "ADDED", object);
        }
        if !write_chunk(write, &out).await {
            return false;
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ticker = tokio::time::interval(knobs.bookmark_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let mut out = Vec::new();
        {
            let st = shared.state.lock().unwrap();
            let start = st.log.partition_point(|c| c.rv <= cursor);
            for change in st.log[start..].iter().filter(|c| c.kind == kind) {
                let old = change.old.as_deref().filter(|o| sel.matches(o));
                let new = change.new.as_deref().filter(|o| sel.matches(o));
                match (old, new) {
                    (None, Some(new)) => watch_line(&mut out, "ADDED", new),
                    (Some(_), Some(new)) => watch_line(&mut out, "MODIFIED", new),
                    (Some(old), None) => {
                        let mut last = old.clone();
                        last["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                        watch_line(&mut out, "DELETED", &last);
                    }
                    (None, None) => {}
                }
            }
            cursor = cursor.max(st.rv);
        }
        if !write_chunk(write, &out).await {
            return false;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return false },
            _ = cut.changed() => return false,
            () = tokio::time::sleep_until(deadline) => {
                return write.send(b"0\r\n\r\n").await;
            }
            _ = ticker.tick(), if bookmarks => {
                let mut out = Vec::new();
                bookmark(&mut out, kind, cursor, false);
                if !write_chunk(write, &out).await {
                    return false;
                }
            }
        }
    }
}

async fn write_head_chunked(write: &mut Out) -> bool {
    write
        .send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
}

/// A ClusterIP Service with one TCP port.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": port}]},
    })
}

/// An IPv4 EndpointSlice of `service` with ready endpoints at `ips`, port `port`.
pub fn slice(namespace: &str, name: &str, service: &str, ips: &[String], port: u16) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "node-1"}))
        .collect();
    json!({
        "metadata": {"namespace": namespace, "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    })
}

/// A Node with one InternalIP.
pub fn node(name: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    })
}

/// `n` Services `svc-i` (ClusterIP 10.96.x.y) with a slice `svc-i-abc` of `endpoints`
/// endpoints each (10.(128+)x.y.z addresses), with the metadata a real API server adds (a uid,
/// a creation time, the managedFields of the writer), so that sizes and compression ratios
/// are like a real cluster's.
pub fn fleet(n: usize, endpoints: usize) -> Vec<(Kind, Value)> {
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        let name = format!("svc-{i}");
        let ip = format!("10.96.{}.{}", (i / 250) % 250, i % 250 + 1);
        let mut svc = service("default", &name, &ip, 80);
        stamp(
            &mut svc,
            2 * i,
            ("kubectl-client-side-apply", "v1"),
            json!({"f:spec": {"f:ports": {".": {}, r#"k:{"port":80,"protocol":"TCP"}"#: {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}}, "f:sessionAffinity": {}, "f:type": {}}}),
        );
        out.push((Kind::Service, svc));
        let ips: Vec<String> = (0..endpoints).map(|e| endpoint_ip(i, e)).collect();
        let mut slice = slice("default", &format!("{name}-abc"), &name, &ips, 8080);
        stamp(
            &mut slice,
            2 * i + 1,
            ("endpointslice-controller.k8s.io", "discovery.k8s.io/v1"),
            json!({"f:addressType": {}, "f:endpoints": {}, "f:metadata": {"f:labels": {".": {}, "f:kubernetes.io/service-name": {}}}, "f:ports": {}}),
        );
        out.push((Kind::EndpointSlice, slice));
    }
    out
}

/// What the API server adds to object `seed`'s metadata, as written by `manager` in
/// `api_version`.
fn stamp(object: &mut Value, seed: usize, (manager, api_version): (&str, &str), fields: Value) {
    // splitmix64: a uid as random as a real one, the same in every run.
    let mut x = (seed as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (a, b) = (next(), next());
    let uid = format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    );
    let time = format!(
        "2026-01-{:02}T{:02}:{:02}:{:02}Z",
        seed % 28 + 1,
        seed / 3600 % 24,
        seed / 60 % 60,
        seed % 60
    );
    let meta = &mut object["metadata"];
    meta["uid"] = json!(uid);
    meta["creationTimestamp"] = json!(time);
    let mut entry = json!({"manager": manager, "operation": "Update", "apiVersion": api_version, "time": time, "fieldsType": "FieldsV1"});
    entry["fieldsV1"] = fields;
    meta["managedFields"] = Value::Array(vec![entry]);
}

/// The address of endpoint `e` of Service `i` in a [`fleet`].
pub fn endpoint_ip(i: usize, e: usize) -> String {
    let n = i * 64 + e;
    format!("10.{}.{}.{}", 128 + (n >> 16) % 64, (n >> 8) & 255, n & 255)
}

/// Every `KINDS` value, for loops over kinds.
pub fn kinds() -> [Kind; 3] {
    KINDS
}
