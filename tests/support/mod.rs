//! What the daemon's VM tests are built from: "pods" (network namespaces joined to the VM by a
//! veth pair, each with a server that answers with its own name over TCP and UDP), the daemon
//! as a child process following a manifest directory, and readers of the kernel state as an
//! operator sees it (`ipvsadm -Sn`, `ip addr`, `ipset list`).
//!
//! Everything a test makes is undone by a `Drop`, so a failing test leaves a clean kernel for
//! the next one. The tests share one kernel: [`Kernel::take`] serialises them.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The port every pod serves on, TCP and UDP.
pub const POD_PORT: u16 = 8080;
/// How long any wait for the kernel or a reply may take (the VM is emulated, so generous).
pub const PATIENCE: Duration = Duration::from_secs(30);

static KERNEL: Mutex<()> = Mutex::new(());

/// Runs a command, failing the test with its error output on a non-zero exit.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs a command and ignores how it ends (cleanup of what may not exist).
fn run_quietly(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Polls `ready` every 100 ms until it holds; panics after [`PATIENCE`] with `what` and `why()`.
pub fn wait_until(what: &str, mut ready: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + PATIENCE;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            why()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VM's kernel, held by one test at a time, and reset before and after it.
pub struct Kernel {
    _lock: MutexGuard<'static, ()>,
}

impl Kernel {
    pub fn take() -> Kernel {
        assert!(
            std::env::var_os("IPVS_PROXY_VM").is_some(),
            "needs an IPVS kernel: run cargo xtask vm-test"
        );
        let lock = KERNEL.lock().unwrap_or_else(PoisonError::into_inner);
        reset_kernel();
        Kernel { _lock: lock }
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        reset_kernel();
    }
}

/// Removes whatever a daemon left: IPVS table, `kube-ipvs0`, the chains and the ipsets (the
/// VM is the tests' own, so flushing every table is fine).
fn reset_kernel() {
    run_quietly("ipvsadm", &["-C"]);
    run_quietly("/bin/ip", &["link", "del", "kube-ipvs0"]);
    for tool in [
        "iptables-nft",
        "iptables-legacy",
        "ip6tables-nft",
        "ip6tables-legacy",
    ] {
        for table in ["nat", "filter", "mangle", "raw"] {
            run_quietly(tool, &["-t", table, "-F"]);
            run_quietly(tool, &["-t", table, "-X"]);
        }
    }
    run_quietly("ipset", &["flush"]);
    run_quietly("ipset", &["destroy"]);
    run_quietly("/bin/ip", &["link", "set", "lo", "up"]);
}

/// A "pod": a network namespace with `eth0` at `ip`, a veth peer in the VM's namespace with a
/// route to it, and a server that answers every TCP line and every UDP datagram with the
/// pod's name.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Pod {
    pub fn start(name: &str, ip: Ipv4Addr) -> Pod {
        // Link names are at most 15 bytes; the VM-side end is `veth-NAME`.
        assert!(
            name.len() <= 10,
            "pod name {name:?} is too long for a link name"
        );
        let mut pod = Pod {
            name: name.to_owned(),
            ip,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        // Any leftover of an aborted run first.
        run_quietly("/bin/ip", &["netns", "del", name]);
        let veth = pod.veth();
        let addr = format!("{ip}/32");
        run("/bin/ip", &["netns", "add", name]);
        run(
            "/bin/ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", name,
            ],
        );
        let ns = |args: &[&str]| {
            let mut full = vec!["-n", name];
            full.extend_from_slice(args);
            run("/bin/ip", &full);
        };
        ns(&["addr", "add", &addr, "dev", "eth0"]);
        ns(&["link", "set", "lo", "up"]);
        ns(&["link", "set", "eth0", "up"]);
        ns(&["route", "add", "default", "dev", "eth0"]);
        run("/bin/ip", &["link", "set", &veth, "up"]);
        run("/bin/ip", &["route", "add", &addr, "dev", &veth]);

        let (tcp, udp) = bind_in_netns(name);
        let (stop, me) = (pod.stop.clone(), pod.name.clone());
        pod.threads
            .push(std::thread::spawn(move || serve_tcp(&tcp, &me, &stop)));
        let (stop, me) = (pod.stop.clone(), pod.name.clone());
        pod.threads
            .push(std::thread::spawn(move || serve_udp(&udp, &me, &stop)));
        pod
    }

    fn veth(&self) -> String {
        format!("veth-{}", self.name)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        run_quietly("/bin/ip", &["netns", "del", &self.name]);
        run_quietly("/bin/ip", &["link", "del", &self.veth()]);
    }
}

/// Binds the pod's TCP and UDP sockets inside its namespace. A socket belongs to the namespace
/// it was made in, so only this short-lived thread enters it; the servers run anywhere.
fn bind_in_netns(name: &str) -> (TcpListener, UdpSocket) {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            enter_netns(&ns);
            let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, POD_PORT));
            let tcp = TcpListener::bind(any).expect("binding the pod's TCP port");
            let udp = UdpSocket::bind(any).expect("binding the pod's UDP port");
            tcp.set_nonblocking(true).expect("non-blocking listener");
            udp.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("UDP read timeout");
            (tcp, udp)
        })
        .join()
        .expect("the namespace thread panicked")
    })
}

#[allow(
    unsafe_code,
    reason = "setns(2) has no safe wrapper in our dependencies"
)]
fn enter_netns(ns: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the whole call; setns only changes this thread's
    // network namespace, which this thread (made for it) never leaves.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

fn serve_tcp(listener: &TcpListener, name: &str, stop: &Arc<AtomicBool>) {
    let mut connections = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (name, stop) = (name.to_owned(), stop.clone());
                connections.push(std::thread::spawn(move || {
                    answer_lines(stream, &name, &stop);
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => break,
        }
    }
    for c in connections {
        let _ = c.join();
    }
}

fn answer_lines(stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                line.clear();
                if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

fn serve_udp(socket: &UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(name.as_bytes(), from);
        }
    }
}

/// A TCP connection to a Service, kept open to ask several times.
pub struct Connection {
    reader: BufReader<TcpStream>,
}

impl Connection {
    pub fn open(to: SocketAddr) -> std::io::Result<Connection> {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Connection {
            reader: BufReader::new(stream),
        })
    }

    /// Asks which pod is on the other end.
    pub fn ask(&mut self) -> std::io::Result<String> {
        self.reader.get_mut().write_all(b"who\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_owned())
    }

    /// Closes with a reset, so IPVS forgets the connection in seconds (its CLOSE state)
    /// rather than the two minutes of TIME_WAIT.
    pub fn reset(self) {
        let socket = socket2::Socket::from(self.reader.into_inner());
        let _ = socket.set_linger(Some(Duration::ZERO));
    }
}

/// One TCP request on a new connection: the name of the pod that answered.
pub fn ask_tcp(to: SocketAddr) -> std::io::Result<String> {
    Connection::open(to)?.ask()
}

/// One UDP datagram from a new socket (so IPVS schedules it afresh): the pod that answered.
pub fn ask_udp(to: SocketAddr) -> std::io::Result<String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send_to(b"who", to)?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vm-daemon-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes a file whole, by a rename, so the daemon never reads it half-written.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("writing a manifest");
        std::fs::rename(&tmp, self.0.join(name)).expect("renaming a manifest");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join(name)).expect("removing a manifest");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon binary under test.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_ipvs-proxy");

/// The daemon, running on a manifest directory as node-a; killed on drop.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `ipvs-proxy --manifests DIR --hostname-override node-a` with no HTTP servers,
    /// the pods' CIDR, and `extra` flags; its output goes to `log`.
    pub fn start(manifests: &Path, log: &Path, extra: &[&str]) -> Daemon {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("opening the daemon's log");
        let err = out.try_clone().expect("cloning the log file");
        let child = Command::new(DAEMON)
            .arg("--manifests")
            .arg(manifests)
            .args([
                "--hostname-override",
                "node-a",
                "--cluster-cidr",
                "10.244.0.0/16",
                "--healthz-bind-address",
                "127.0.0.1:0",
                "--metrics-bind-address",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting ipvs-proxy");
        Daemon {
            child,
            log: log.to_owned(),
        }
    }

    /// What the daemon logged so far, without colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The lines of full syncs, oldest first: `synced` with `full=true`, and the periodic ones
    /// that read the kernel off the loop's thread, `full sync checked the kernel`.
    pub fn full_syncs(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| {
                (l.contains(" synced ") && l.contains("full=true"))
                    || l.contains("full sync checked the kernel")
            })
            .map(str::to_owned)
            .collect()
    }

    /// The daemon's process id.
    #[allow(dead_code, reason = "not every test binary reads the daemon's /proc")]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash or an OOM kill would end it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Drops terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `ipvsadm -Sn`, one line per entry, sorted.
pub fn ipvs_lines() -> Vec<String> {
    let mut lines: Vec<String> = run("ipvsadm", &["-Sn"])
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// The `ipvsadm -Sn` lines about one virtual server (`-t 10.96.0.20:80`), sorted.
pub fn ipvs_lines_of(service: &str) -> Vec<String> {
    let tag = format!(" {service} ");
    ipvs_lines()
        .into_iter()
        .filter(|l| format!("{l} ").contains(&tag))
        .collect()
}

/// The addresses on `kube-ipvs0` (`10.96.0.20/32`), sorted; empty when there is no link.
pub fn kube_ipvs0_addresses() -> Vec<String> {
    let out = Command::new("/bin/ip")
        .args(["-o", "addr", "show", "dev", "kube-ipvs0"])
        .output()
        .expect("running ip");
    let mut addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next().map(str::to_owned)
        })
        .collect();
    addrs.sort();
    addrs
}

/// The members of one ipset (`10.96.0.20,tcp:80`), sorted; empty when it does not exist.
pub fn ipset_members(set: &str) -> Vec<String> {
    let out = Command::new("ipset")
        .args(["list", set])
        .output()
        .expect("running ipset");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut members: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Members:"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
        .collect();
    members.sort();
    members
}

/// A Service with one EndpointSlice, as manifests.
pub struct ServiceSpec<'a> {
    pub name: &'a str,
    pub vip: &'a str,
    pub port: u16,
    /// `TCP`, `UDP`: one Service port each, all on `port`.
    pub protocols: &'a [&'a str],
    pub endpoints: &'a [Ipv4Addr],
    /// The `ipvs-proxy.io/scheduler` annotation.
    pub scheduler: Option<&'a str>,
    /// ClientIP session affinity with this timeout.
    pub affinity_seconds: Option<u32>,
}

impl ServiceSpec<'_> {
    pub fn yaml(&self) -> String {
        let name = self.name;
        let annotations = self.scheduler.map_or(String::new(), |s| {
            format!("  annotations:\n    ipvs-proxy.io/scheduler: {s}\n")
        });
        let affinity = self.affinity_seconds.map_or(String::new(), |t| {
            format!(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}\n"
            )
        });
        let mut service_ports = String::new();
        let mut slice_ports = String::new();
        for proto in self.protocols {
            let pname = proto.to_lowercase();
            let _ = writeln!(
                service_ports,
                "    - {{name: {pname}, port: {}, targetPort: {POD_PORT}, protocol: {proto}}}",
                self.port
            );
            let _ = writeln!(
                slice_ports,
                "  - {{name: {pname}, port: {POD_PORT}, protocol: {proto}}}"
            );
        }
        let mut endpoints = String::new();
        for ip in self.endpoints {
            let _ = writeln!(
                endpoints,
                "  - addresses: [{ip}]\n    conditions: {{ready: true}}\n    nodeName: node-a"
            );
        }
        let endpoints = if endpoints.is_empty() {
            "endpoints: []\n".to_owned()
        } else {
            format!("endpoints:\n{endpoints}")
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{annotations}spec:\n  clusterIP: {vip}\n{affinity}  ports:\n{service_ports}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n{slice_ports}{endpoints}",
            vip = self.vip,
        )
    }
}
