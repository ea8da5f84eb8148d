//! The conntrack scenario both proxiers must pass (issue 16): a UDP client keeps sending to a
//! ClusterIP from one socket, as DNS resolvers and statsd clients do; its endpoint is replaced;
//! replies must come from the new endpoint within one sync, and `conntrack -L` must show no
//! entry to the old one. Without the cleanup, every datagram refreshes the old entry, so the
//! client would send into the old endpoint's black hole for as long as it keeps sending.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::{Daemon, Pod, ServiceSpec, TempDir, run, wait_until};

pub const VIP: &str = "10.96.0.53";
/// Where the daemon serves `/metrics` in these tests (each in a kernel or namespace of its own).
pub const METRICS: &str = "127.0.0.1:10349";

/// The value of the sample `sample` (name and labels, as `/metrics` prints them) on the
/// daemon's `/metrics`; 0 when absent.
pub fn metric(sample: &str) -> f64 {
    let mut stream = TcpStream::connect(METRICS).expect("connecting to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {METRICS}\r\nConnection: close\r\n\r\n"
    )
    .expect("asking for /metrics");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading /metrics");
    response
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The reconciler's runs and deletions for IPv4, as `/metrics` counts them.
pub fn reconciled_ipv4() -> (f64, f64) {
    (
        metric(r#"kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family="IPv4"}"#),
        metric(r#"kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"}"#),
    )
}

/// The Service: `dns`, UDP, `VIP`:53 to the pods' port.
pub fn dns(endpoints: &[Ipv4Addr]) -> ServiceSpec<'_> {
    ServiceSpec {
        name: "dns",
        vip: VIP,
        port: 53,
        protocols: &["UDP"],
        endpoints,
        scheduler: None,
        affinity_seconds: None,
    }
}

/// A UDP client that sends from one socket every 100 ms and notes who answered when.
pub struct Client {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<(Instant, String)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    pub fn start(to: SocketAddr) -> Client {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("binding the client");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let (done, noted) = (stop.clone(), replies.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !done.load(Ordering::SeqCst) {
                let sent = Instant::now();
                // Unreachable answers (ICMP) come back as errors; the client keeps sending.
                let _ = socket.send_to(b"who", to);
                while let Ok((n, _)) = socket.recv_from(&mut buf) {
                    let name = String::from_utf8_lossy(&buf[..n]).into_owned();
                    noted
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((Instant::now(), name));
                }
                std::thread::sleep(Duration::from_millis(100).saturating_sub(sent.elapsed()));
            }
        });
        Client {
            stop,
            replies,
            thread: Some(thread),
        }
    }

    /// Who answered at or after `since`, in order.
    pub fn answers_since(&self, since: Instant) -> Vec<(Instant, String)> {
        let replies = self.replies.lock().unwrap_or_else(PoisonError::into_inner);
        replies
            .iter()
            .filter(|(t, _)| *t >= since)
            .cloned()
            .collect()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The reply sources of the UDP entries to `VIP` (`conntrack -L`'s second `src=`).
pub fn conntrack_reply_sources() -> Vec<String> {
    run("conntrack", &["-L", "-p", "udp", "--orig-dst", VIP])
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .filter(|w| w.starts_with("src="))
                .nth(1)
        })
        .map(|w| w.trim_start_matches("src=").to_owned())
        .collect()
}

/// Runs the scenario on a daemon already serving `dns` with `old` as its endpoint.
/// `programmed(ip)` says whether the proxier now sends the Service to `ip` alone.
/// Returns how long after the new endpoint was programmed it first answered.
pub fn replace_the_endpoint(
    dir: &TempDir,
    daemon: &Daemon,
    old: &Pod,
    new: &Pod,
    programmed: impl Fn(Ipv4Addr) -> bool,
) -> Duration {
    let log = || {
        format!(
            "conntrack: {:?}\ndaemon log:\n{}",
            conntrack_reply_sources(),
            daemon.log()
        )
    };
    wait_until(
        &format!("the proxier to send {VIP} to {}", old.ip),
        || programmed(old.ip),
        log,
    );
    let client = Client::start(SocketAddr::from((VIP.parse::<Ipv4Addr>().unwrap(), 53)));
    let start = Instant::now();
    wait_until(
        "the old endpoint to answer",
        || {
            client
                .answers_since(start)
                .iter()
                .any(|(_, n)| *n == old.name)
        },
        log,
    );
    assert!(
        conntrack_reply_sources().contains(&old.ip.to_string()),
        "the flow's entry names the old endpoint: {:?}",
        conntrack_reply_sources()
    );

    dir.write("dns.yaml", &dns(&[new.ip]).yaml());
    wait_until(
        &format!("the proxier to send {VIP} to {}", new.ip),
        || programmed(new.ip),
        log,
    );
    let synced = Instant::now();
    wait_until(
        "the new endpoint to answer the same client socket",
        || {
            client
                .answers_since(synced)
                .iter()
                .any(|(_, n)| *n == new.name)
        },
        || {
            format!(
                "answers since the sync: {:?}\n{}",
                client.answers_since(synced),
                log()
            )
        },
    );
    let (first, _) = client
        .answers_since(synced)
        .into_iter()
        .find(|(_, n)| *n == new.name)
        .expect("an answer from the new endpoint");
    std::thread::sleep(Duration::from_secs(1));
    let later: Vec<String> = client
        .answers_since(first)
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert!(
        later.iter().all(|n| *n == new.name),
        "once the new endpoint answers, only it does: {later:?}"
    );
    let sources = conntrack_reply_sources();
    assert!(
        !sources.contains(&old.ip.to_string()) && sources.contains(&new.ip.to_string()),
        "conntrack -L shows the client's flow to the new endpoint and none to the old: {sources:?}"
    );
    first.duration_since(synced)
}
