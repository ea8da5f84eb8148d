//! The ipvs crate against the real kernel, read back with the real `ipvsadm`. Runs only in the
//! VM (`cargo xtask vm-test -p ipvs`). The tests share the VM's one IPVS table, so each takes
//! a lock and flushes the table before and after itself.

use ipvs::{
    Error, Family, Forwarding, Handle, Op, Persistence, Protocol, RealServer, Scheduler,
    ServiceFlags, ServiceKey, Timeouts, Tunnel, TunnelChecksum, TunnelType, VirtualServer,
};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

static TABLE: Mutex<()> = Mutex::new(());

/// Holds the table for one test; flushes it when the test ends, even by a panic.
struct Table {
    handle: Handle,
    _lock: MutexGuard<'static, ()>,
}

impl Table {
    fn take() -> Table {
        assert!(
            std::env::var_os("IPVS_PROXY_VM").is_some(),
            "run in the VM: cargo xtask vm-test -p ipvs"
        );
        let lock = TABLE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The kernel refuses IPv4 real servers until there is a local routing table.
        run("/bin/ip", &["link", "set", "lo", "up"]);
        let mut handle = Handle::new().expect("IPVS handle");
        handle.flush().expect("flush");
        Table {
            handle,
            _lock: lock,
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = self.handle.flush();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn ipvsadm_restore(rules: &str) {
    let mut child = Command::new("ipvsadm")
        .arg("-R")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ipvsadm -R");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "ipvsadm -R failed on:\n{rules}"
    );
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// The whole table as our crate reads it, as `ipvsadm -Sn` lines.
fn our_save(handle: &mut Handle) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in handle.dump().expect("dump") {
        lines.push(entry.service.server.to_string());
        for rs in entry.real_servers {
            lines.push(rs.server.line(&entry.service.server.key).to_string());
        }
    }
    lines.sort();
    lines
}

fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(a, b, c, d).into(), port)
}

fn tcp(addr: SocketAddr) -> ServiceKey {
    ServiceKey::Addr {
        protocol: Protocol::Tcp,
        addr,
    }
}

/// Rules covering each shape: both families, each protocol, fwmark, persistence with and
/// without a netmask, scheduler flags, one-packet, each forwarding method and tunnel type.
const RULES: &str = "\
-A -t 10.96.0.10:80 -s rr -p 10800
-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1
-a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 0
-A -u 10.96.0.53:53 -s wrr -p 300 -M 255.255.255.0 -o
-a -u 10.96.0.53:53 -r 10.244.1.6:53 -m -w 5
-A -t [fd00::10]:443 -s sh -b sh-fallback,sh-port
-a -t [fd00::10]:443 -r [fd00:1::5]:8443 -m -w 2
-A -t [fd00::11]:443 -s mh -p 60 -M 64 -b mh-port
-A -f 42 -s lc
-A -u 10.96.0.54:5060 -s sh -p 30 --pe sip -o -b sh-port
-a -f 42 -r 10.244.3.5:0 -g -w 1
-A -f 43 -6 -s dh
-A --sctp-service 10.96.0.20:3868 -s nq
-a --sctp-service 10.96.0.20:3868 -r 10.244.4.5:3868 -m -w 1
-A -t 10.96.0.30:80 -s wlc
-a -t 10.96.0.30:80 -r 192.168.10.5:80 -i -w 1 --tun-type ipip
-a -t 10.96.0.30:80 -r 192.168.10.6:80 -i -w 1 --tun-type gue --tun-port 6080 --tun-csum
-a -t 10.96.0.30:80 -r 192.168.10.7:80 -i -w 1 --tun-type gre --tun-nocsum
-a -t 10.96.0.30:80 -r 192.168.10.8:80 -g -w 3
";

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn what_the_crate_programs_ipvsadm_saves_identically() {
    let mut t = Table::take();
    let ops = ipvs::parse_rules(RULES).unwrap();
    for (op, result) in ops.iter().zip(t.handle.apply(&ops)) {
        result.unwrap_or_else(|e| panic!("{op}: {e}"));
    }
    assert_eq!(sorted_lines(&run("ipvsadm", &["-Sn"])), sorted_lines(RULES));
    assert_eq!(our_save(&mut t.handle), sorted_lines(RULES));
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn what_ipvsadm_programs_the_crate_reads_back_equal() {
    let mut t = Table::take();
    let mut rules = String::from(RULES);
    // Every scheduler the kernel has (twos is newer than some kernels: skip it if absent).
    for (i, sched) in Scheduler::ALL.iter().enumerate() {
        let line = format!("-A -t 10.96.1.{}:80 -s {sched}\n", i + 1);
        let probe: Op = line.trim().parse().unwrap();
        if t.handle
            .apply(std::slice::from_ref(&probe))
            .pop()
            .unwrap()
            .is_ok()
        {
            t.handle
                .apply(&[Op::DeleteService(*probe.service())])
                .pop()
                .unwrap()
                .unwrap();
            rules.push_str(&line);
            writeln!(
                rules,
                "-a -t 10.96.1.{}:80 -r 10.244.9.{}:8080 -m -w 1",
                i + 1,
                i + 1
            )
            .unwrap();
        } else {
            assert_eq!(
                *sched,
                Scheduler::TwoRandomChoices,
                "scheduler {sched} missing"
            );
        }
    }
    ipvsadm_restore(&rules);
    assert_eq!(our_save(&mut t.handle), sorted_lines(&rules));

    // Equal as values, not only as text.
    let table = t.handle.dump().unwrap();
    for op in ipvs::parse_rules(&rules).unwrap() {
        match op {
            Op::AddService(vs) => {
                assert!(
                    table.iter().any(|e| e.service.server == vs),
                    "{vs} not read back"
                );
                assert_eq!(t.handle.service(&vs.key).unwrap().unwrap().server, vs);
            }
            Op::AddDest(key, rs) => {
                let entry = table.iter().find(|e| e.service.server.key == key).unwrap();
                assert!(
                    entry.real_servers.iter().any(|r| r.server == rs),
                    "{rs} not read back"
                );
            }
            other => panic!("unexpected {other}"),
        }
    }
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn updates_and_deletes_show_in_ipvsadm() {
    let mut t = Table::take();
    let key = tcp(v4(10, 96, 0, 10, 80));
    let mut vs = VirtualServer::new(key, Scheduler::RoundRobin);
    let a = RealServer::masquerade(v4(10, 244, 1, 5, 8080));
    let b = RealServer::masquerade(v4(10, 244, 1, 6, 8080));
    t.handle.add_service(&vs).unwrap();
    t.handle.add_real_server(&key, &a).unwrap();
    t.handle.add_real_server(&key, &b).unwrap();

    vs.scheduler = Scheduler::SourceHashing;
    vs.flags = ServiceFlags::SH_PORT;
    vs.persistence = Some(Persistence {
        timeout: 600,
        prefix_len: 24,
    });
    t.handle.update_service(&vs).unwrap();
    let mut a2 = a;
    a2.weight = 0;
    t.handle.update_real_server(&key, &a2).unwrap();
    t.handle.delete_real_server(&key, b.addr).unwrap();
    assert_eq!(
        sorted_lines(&run("ipvsadm", &["-Sn"])),
        sorted_lines(
            "-A -t 10.96.0.10:80 -s sh -p 600 -M 255.255.255.0 -b sh-port\n\
             -a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 0\n"
        )
    );
    assert_eq!(t.handle.real_servers(&key).unwrap().len(), 1);

    // Persistence and flags can be taken away again.
    vs.persistence = None;
    vs.flags = ServiceFlags::empty();
    t.handle.update_service(&vs).unwrap();
    assert_eq!(t.handle.service(&key).unwrap().unwrap().server, vs);

    t.handle.delete_service(&key).unwrap();
    assert_eq!(run("ipvsadm", &["-Sn"]), "");
    assert!(t.handle.service(&key).unwrap().is_none());
    assert!(
        t.handle.real_servers(&key).unwrap().is_empty(),
        "a missing service has no real servers"
    );
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn errors_are_typed_and_the_rest_of_the_batch_applies() {
    let mut t = Table::take();
    let key = tcp(v4(10, 96, 0, 10, 80));
    let missing = tcp(v4(10, 96, 0, 99, 80));
    let rs = RealServer::masquerade(v4(10, 244, 1, 5, 8080));
    let v6_rs = RealServer::masquerade("[fd00::5]:8080".parse().unwrap());
    let ops = vec![
        Op::AddService(VirtualServer::new(key, Scheduler::RoundRobin)),
        Op::AddService(VirtualServer::new(key, Scheduler::RoundRobin)), // EEXIST
        Op::AddDest(key, rs),
        Op::AddDest(key, rs),     // EEXIST
        Op::AddDest(missing, rs), // ESRCH
        Op::UpdateDest(key, RealServer::masquerade(v4(10, 244, 1, 99, 80))), // ENOENT
        Op::DeleteDest(key, v4(10, 244, 1, 99, 80)), // ENOENT
        Op::DeleteService(missing), // ESRCH
        Op::AddDest(key, v6_rs),  // EINVAL: masquerading across families
        Op::AddDest(key, RealServer::masquerade(v4(10, 244, 1, 6, 8080))),
    ];
    let results = t.handle.apply(&ops);
    assert_eq!(results.len(), ops.len());
    let kinds: Vec<String> = results
        .iter()
        .map(|r| match r {
            Ok(()) => "ok".to_owned(),
            Err(Error::AlreadyExists { .. }) => "exists".to_owned(),
            Err(Error::NoSuchService { .. }) => "no-service".to_owned(),
            Err(Error::NoSuchDestination { .. }) => "no-dest".to_owned(),
            Err(Error::InvalidArgument { .. }) => "invalid".to_owned(),
            Err(other) => format!("other: {other}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "ok",
            "exists",
            "ok",
            "exists",
            "no-service",
            "no-dest",
            "no-dest",
            "no-service",
            "invalid",
            "ok"
        ]
    );
    let err = results[4].as_ref().unwrap_err();
    assert_eq!(
        err.to_string(),
        "-a -t 10.96.0.99:80 -r 10.244.1.5:8080 -m -w 1: no such virtual server"
    );
    assert_eq!(
        t.handle.real_servers(&key).unwrap().len(),
        2,
        "the ops after the errors applied"
    );

    // A scheduler whose module is missing: twos on kernels before it existed.
    let twos = VirtualServer::new(tcp(v4(10, 96, 0, 11, 80)), Scheduler::TwoRandomChoices);
    match t.handle.add_service(&twos) {
        Ok(()) | Err(Error::SchedulerMissing { .. }) => {}
        Err(other) => panic!("expected SchedulerMissing, got {other}"),
    }
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn a_batch_of_ten_thousand_ops_applies() {
    let mut t = Table::take();
    let mut ops = Vec::new();
    for s in 0..1000u16 {
        let [hi, lo] = s.to_be_bytes();
        let key = tcp(v4(10, 97, hi, lo, 80));
        ops.push(Op::AddService(VirtualServer::new(
            key,
            Scheduler::RoundRobin,
        )));
        for d in 0..9u8 {
            ops.push(Op::AddDest(
                key,
                RealServer::masquerade(v4(10, 245, hi, lo.wrapping_add(0), 8000 + u16::from(d))),
            ));
        }
    }
    assert_eq!(ops.len(), 10_000);
    let failures: Vec<String> = ops
        .iter()
        .zip(t.handle.apply(&ops))
        .filter_map(|(op, r)| r.err().map(|e| format!("{op}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    let table = t.handle.dump().unwrap();
    assert_eq!(table.len(), 1000);
    assert!(table.iter().all(|e| e.real_servers.len() == 9));
    assert_eq!(run("ipvsadm", &["-Sn"]).lines().count(), 10_000);
    let mut expected: Vec<String> = ops.iter().map(ToString::to_string).collect();
    expected.sort();
    assert_eq!(our_save(&mut t.handle), expected);
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn a_streamed_dump_reads_what_ipvsadm_saves_and_stops_when_asked() {
    let mut t = Table::take();
    let mut rules = String::new();
    for s in 0..300u16 {
        let [hi, lo] = s.to_be_bytes();
        writeln!(rules, "-A -t 10.98.{hi}.{lo}:80 -s rr").unwrap();
        for d in 0..3u16 {
            writeln!(
                rules,
                "-a -t 10.98.{hi}.{lo}:80 -r 10.246.{hi}.{lo}:{} -m -w 1",
                8000 + d
            )
            .unwrap();
        }
    }
    ipvsadm_restore(&rules);
    for sockets in [1, 2, 3] {
        // Handed over from each socket's thread as read.
        let lines = Mutex::new(Vec::new());
        t.handle
            .dump_each(sockets, |entry| {
                let mut lines = lines.lock().unwrap();
                lines.push(entry.server.to_string());
                for rs in entry.real_servers {
                    lines.push(rs.line(&entry.server.key).to_string());
                }
                true
            })
            .unwrap();
        let mut lines = lines.into_inner().unwrap();
        lines.sort();
        assert_eq!(
            lines,
            sorted_lines(&run("ipvsadm", &["-Sn"])),
            "{sockets} sockets"
        );
    }
    // A receiver gone: each run stops at its first entry.
    let calls = Mutex::new(0);
    t.handle
        .dump_each(2, |_| {
            *calls.lock().unwrap() += 1;
            false
        })
        .unwrap();
    assert_eq!(*calls.lock().unwrap(), 2, "one entry per socket, then none");
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn timeouts_and_info_read_and_set() {
    let mut t = Table::take();
    let info = t.handle.info().unwrap();
    assert!(
        info.to_string()
            .starts_with("IP Virtual Server version 1.2.1 (size="),
        "{info}"
    );
    let before = t.handle.timeouts().unwrap();
    let shown = run("ipvsadm", &["-L", "--timeout"]);
    assert_eq!(
        shown.trim(),
        format!(
            "Timeout (tcp tcpfin udp): {} {} {}",
            before.tcp, before.tcp_fin, before.udp
        )
    );
    t.handle
        .set_timeouts(&Timeouts {
            tcp: 1000,
            tcp_fin: 0,
            udp: 30,
        })
        .unwrap();
    assert_eq!(
        t.handle.timeouts().unwrap(),
        Timeouts {
            tcp: 1000,
            tcp_fin: before.tcp_fin,
            udp: 30
        }
    );
    t.handle.set_timeouts(&before).unwrap();
    assert_eq!(t.handle.timeouts().unwrap(), before);
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn ipv6_and_fwmark_services_round_trip_as_values() {
    let mut t = Table::take();
    let v6 = ServiceKey::Addr {
        protocol: Protocol::Udp,
        addr: "[fd00::53]:53".parse().unwrap(),
    };
    let mut vs = VirtualServer::new(v6, Scheduler::Maglev);
    vs.flags = ServiceFlags::SH_FALLBACK | ServiceFlags::ONE_PACKET;
    vs.persistence = Some(Persistence {
        timeout: 30,
        prefix_len: 64,
    });
    let fw = VirtualServer::new(
        ServiceKey::Fwmark {
            family: Family::V6,
            mark: 7,
        },
        Scheduler::WeightedRoundRobin,
    );
    let tunnel = RealServer {
        addr: "[fd00:2::9]:53".parse().unwrap(),
        forwarding: Forwarding::Tunnel(Tunnel {
            kind: TunnelType::Gue,
            port: 5555,
            checksum: TunnelChecksum::Remote,
        }),
        weight: 7,
        upper_threshold: 100,
        lower_threshold: 10,
    };
    let ops = [
        Op::AddService(vs.clone()),
        Op::AddService(fw.clone()),
        Op::AddDest(v6, tunnel),
    ];
    assert!(t.handle.apply(&ops).into_iter().all(|r| r.is_ok()));
    assert_eq!(t.handle.service(&v6).unwrap().unwrap().server, vs);
    assert_eq!(t.handle.service(&fw.key).unwrap().unwrap().server, fw);
    assert_eq!(
        t.handle.real_servers(&v6).unwrap()[0].server,
        tunnel,
        "thresholds and tunnel read back"
    );
}

/// Not a test of its own: when the traffic test starts this binary inside a pod's network
/// namespace with IPVS_TEST_SERVE=<name>, it serves its name on :8080 until killed.
#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn serve_name_helper() {
    let Some(name) = std::env::var_os("IPVS_TEST_SERVE") else {
        return;
    };
    let listener = TcpListener::bind("0.0.0.0:8080").unwrap();
    for stream in listener.incoming() {
        let mut stream = stream.unwrap();
        let _ = stream.write_all(name.to_string_lossy().as_bytes());
    }
}

/// Network namespaces "pods" joined by veth pairs, a VIP on a dummy link; removed on drop.
struct Pods {
    servers: Vec<Child>,
    count: usize,
}

impl Drop for Pods {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for i in 1..=self.count {
            let _ = Command::new("/bin/ip")
                .args(["netns", "del", &format!("ipvs-pod{i}")])
                .status();
            let _ = Command::new("/bin/ip")
                .args(["link", "del", &format!("ipvs-veth{i}")])
                .status();
        }
        let _ = Command::new("/bin/ip")
            .args(["link", "del", "ipvs-test0"])
            .status();
    }
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn tcp_connections_through_a_virtual_server_spread_round_robin() {
    let mut t = Table::take();
    let mut pods = Pods {
        servers: Vec::new(),
        count: 3,
    };
    let vip = v4(10, 96, 0, 10, 80);
    run("/bin/ip", &["link", "add", "ipvs-test0", "type", "dummy"]);
    run(
        "/bin/ip",
        &["addr", "add", "10.96.0.10/32", "dev", "ipvs-test0"],
    );
    run("/bin/ip", &["link", "set", "ipvs-test0", "up"]);
    let exe = std::env::current_exe().unwrap();
    let mut ops = vec![Op::AddService(VirtualServer::new(
        tcp(vip),
        Scheduler::RoundRobin,
    ))];
    for i in 1..=3u8 {
        pods.servers.push(start_pod(&exe, i));
        ops.push(Op::AddDest(
            tcp(vip),
            RealServer::masquerade(v4(10, 250, i, 2, 8080)),
        ));
    }
    // Wait until each pod answers directly, so that no scheduled connection is refused.
    for i in 1..=3u8 {
        let pod = v4(10, 250, i, 2, 8080);
        let mut ready = false;
        for _ in 0..100 {
            if ask(pod).is_some_and(|a| a == format!("pod{i}")) {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ready, "pod{i} never answered on {pod}");
    }
    assert!(t.handle.apply(&ops).into_iter().all(|r| r.is_ok()));

    let answers: Vec<String> = (0..6)
        .map(|_| ask(vip).expect("an answer through the VIP"))
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for a in &answers {
        *counts.entry(a.clone()).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "answers: {answers:?}");
    assert!(counts.values().all(|&n| n == 2), "answers: {answers:?}");
    // The kernel folds its per-CPU counters into the totals every two seconds.
    let mut counted = 0;
    for _ in 0..50 {
        counted = t
            .handle
            .real_servers(&tcp(vip))
            .unwrap()
            .iter()
            .map(|r| r.stats.connections)
            .sum::<u64>();
        if counted >= 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(counted, 6, "connections the kernel counted");
    drop(pods);
}

fn ask(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// A network namespace `ipvs-pod<i>` at 10.250.<i>.2 behind a veth pair, serving its name.
fn start_pod(exe: &std::path::Path, i: u8) -> Child {
    let (ns, veth) = (format!("ipvs-pod{i}"), format!("ipvs-veth{i}"));
    run("/bin/ip", &["netns", "add", &ns]);
    run(
        "/bin/ip",
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
    );
    run(
        "/bin/ip",
        &["addr", "add", &format!("10.250.{i}.1/24"), "dev", &veth],
    );
    run("/bin/ip", &["link", "set", &veth, "up"]);
    run(
        "/bin/ip",
        &[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.250.{i}.2/24"),
            "dev",
            "eth0",
        ],
    );
    run("/bin/ip", &["-n", &ns, "link", "set", "eth0", "up"]);
    run("/bin/ip", &["-n", &ns, "link", "set", "lo", "up"]);
    run(
        "/bin/ip",
        &[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.250.{i}.1"),
        ],
    );
    Command::new("/bin/ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args(["serve_name_helper", "--exact", "--ignored", "--nocapture"])
        .env("IPVS_TEST_SERVE", format!("pod{i}"))
        .spawn()
        .unwrap()
}
