//! The service health servers on real loopback sockets, probed as a load balancer would.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use healthcheck::{Desired, ServiceHealthServers, ServiceKey};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Servers on 127.0.0.1 whose proxy health the test sets.
struct Fixture {
    _runtime: tokio::runtime::Runtime,
    servers: ServiceHealthServers,
    healthy: Arc<AtomicBool>,
}

fn fixture() -> Fixture {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = healthy.clone();
    let servers = ServiceHealthServers::new(runtime.handle().clone(), move || {
        flag.load(Ordering::SeqCst)
    });
    Fixture {
        _runtime: runtime,
        servers,
        healthy,
    }
}

fn web() -> ServiceKey {
    ServiceKey::new("shop", "web")
}

fn desired(port: u16, local_endpoints: usize) -> Desired {
    Desired {
        port,
        local_endpoints,
    }
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind((LOOPBACK, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// `GET path` on 127.0.0.1:`port`, as a load balancer's probe.
fn get(port: u16, path: &str) -> std::io::Result<Reply> {
    get_from(SocketAddr::new(LOOPBACK, port), path)
}

fn get_from(to: SocketAddr, path: &str) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP reply");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_owned(),
    })
}

fn refused(port: u16) -> bool {
    matches!(get(port, "/"), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

#[test]
fn a_ready_local_endpoint_answers_200_on_any_path_with_kube_proxys_headers_and_body() {
    let f = fixture();
    let port = free_port();
    let errors = f
        .servers
        .update(&[LOOPBACK], [(web(), Some(desired(port, 1)))], false);
    assert!(errors.is_empty(), "{errors:?}");
    for path in ["/", "/healthz", "/any/path?x=1"] {
        let reply = get(port, path).unwrap();
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(reply.header("x-load-balancing-endpoint-weight"), Some("1"));
        assert_eq!(
            reply.body,
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}"#
        );
    }
}

#[test]
fn no_local_endpoint_answers_503_with_zero() {
    let f = fixture();
    let port = free_port();
    f.servers
        .update(&[LOOPBACK], [(web(), Some(desired(port, 2)))], false);
    assert_eq!(get(port, "/").unwrap().status, 200);
    assert_eq!(get(port, "/").unwrap().json()["localEndpoints"], 2);
    let errors = f
        .servers
        .update(&[LOOPBACK], [(web(), Some(desired(port, 0)))], false);
    assert!(errors.is_empty(), "{errors:?}");
    let reply = get(port, "/").unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["localEndpoints"], 0);
    assert_eq!(reply.header("x-load-balancing-endpoint-weight"), Some("0"));
}

#[test]
fn an_unhealthy_proxy_answers_503_although_endpoints_are_ready() {
    let f = fixture();
    let port = free_port();
    f.servers
        .update(&[LOOPBACK], [(web(), Some(desired(port, 1)))], false);
    f.healthy.store(false, Ordering::SeqCst);
    let reply = get(port, "/").unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["localEndpoints"], 1);
    assert_eq!(reply.json()["serviceProxyHealthy"], false);
    f.healthy.store(true, Ordering::SeqCst);
    assert_eq!(get(port, "/").unwrap().status, 200);
}

#[test]
fn a_removed_service_closes_its_port() {
    let f = fixture();
    let (a, b) = (free_port(), free_port());
    let other = ServiceKey::new("shop", "api");
    f.servers.update(
        &[LOOPBACK],
        [
            (web(), Some(desired(a, 1))),
            (other.clone(), Some(desired(b, 1))),
        ],
        false,
    );
    assert_eq!(get(a, "/").unwrap().status, 200);
    f.servers.update(&[LOOPBACK], [(web(), None)], false);
    assert!(refused(a), "port {a} still open after its Service went");
    assert_eq!(get(b, "/").unwrap().status, 200);
    // A complete update closes what it does not name.
    f.servers.update(&[LOOPBACK], [], true);
    assert!(
        refused(b),
        "port {b} still open after a complete update without it"
    );
    assert!(f.servers.serving().is_empty());
}

#[test]
fn a_changed_port_moves_the_listener() {
    let f = fixture();
    let (a, b) = (free_port(), free_port());
    f.servers
        .update(&[LOOPBACK], [(web(), Some(desired(a, 1)))], false);
    let errors = f
        .servers
        .update(&[LOOPBACK], [(web(), Some(desired(b, 1)))], true);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(refused(a));
    assert_eq!(get(b, "/").unwrap().status, 200);
    assert_eq!(f.servers.serving().get(&web()), Some(&b));
}

#[test]
fn a_service_can_take_over_a_port_closed_in_the_same_update() {
    let f = fixture();
    let port = free_port();
    let other = ServiceKey::new("shop", "api");
    f.servers
        .update(&[LOOPBACK], [(web(), Some(desired(port, 1)))], false);
    let errors = f.servers.update(
        &[LOOPBACK],
        [(web(), None), (other, Some(desired(port, 1)))],
        false,
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(get(port, "/").unwrap().json()["service"]["name"], "api");
}

#[test]
fn a_taken_port_is_reported_the_others_serve_and_it_is_retried_once_free() {
    let f = fixture();
    let taken = TcpListener::bind((LOOPBACK, 0)).unwrap();
    let busy = taken.local_addr().unwrap().port();
    let free = free_port();
    let api = ServiceKey::new("shop", "api");
    let errors = f.servers.update(
        &[LOOPBACK],
        [
            (api.clone(), Some(desired(busy, 1))),
            (web(), Some(desired(free, 1))),
        ],
        false,
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].service, api);
    assert_eq!(errors[0].address, SocketAddr::new(LOOPBACK, busy));
    assert_eq!(errors[0].source.kind(), ErrorKind::AddrInUse);
    assert_eq!(get(free, "/").unwrap().status, 200);
    // Still taken: reported again on the next update, whatever it is about.
    let errors = f
        .servers
        .update(&[LOOPBACK], [(web(), Some(desired(free, 2)))], false);
    assert_eq!(errors.len(), 1, "{errors:?}");
    drop(taken);
    let errors = f.servers.update(&[LOOPBACK], [], false);
    assert!(errors.is_empty(), "{errors:?}");
    let reply = get(busy, "/").unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["service"]["name"], "api");
}

#[test]
fn without_addresses_every_address_is_served() {
    let f = fixture();
    let port = free_port();
    let errors = f
        .servers
        .update(&[], [(web(), Some(desired(port, 1)))], false);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(get(port, "/").unwrap().status, 200);
    let other = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), port);
    assert_eq!(get_from(other, "/").unwrap().status, 200);
}

#[test]
fn new_addresses_move_every_port() {
    let f = fixture();
    let port = free_port();
    let second = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    f.servers
        .update(&[LOOPBACK], [(web(), Some(desired(port, 1)))], false);
    let errors = f.servers.update(&[second], [], false);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(refused(port), "still on the old address");
    let reply = get_from(SocketAddr::new(second, port), "/").unwrap();
    assert_eq!(reply.status, 200);
}

/// A load balancer's probes are served while clients that connect and send nothing hold
/// connections, and those are closed once the header timeout passes.
#[test]
fn silent_connections_are_closed_after_the_header_timeout_while_probes_are_answered() {
    let f = fixture();
    let port = free_port();
    let errors = f
        .servers
        .update(&[LOOPBACK], [(web(), Some(desired(port, 1)))], false);
    assert!(errors.is_empty(), "{errors:?}");
    let limits = healthcheck::server::Limits::DEFAULT;
    let started = std::time::Instant::now();
    let mut silent: Vec<TcpStream> = (0..limits.connections / 2)
        .map(|_| TcpStream::connect((LOOPBACK, port)).unwrap())
        .collect();
    assert_eq!(get(port, "/").unwrap().status, 200);
    for stream in &mut silent {
        stream
            .set_read_timeout(Some(limits.header_read * 2))
            .unwrap();
        let mut buf = [0; 64];
        // hyper answers a timed-out header read with nothing but the close.
        match stream.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("a silent connection was not closed: {other:?}"),
        }
    }
    assert!(started.elapsed() >= limits.header_read);
    assert_eq!(get(port, "/").unwrap().status, 200);
}
