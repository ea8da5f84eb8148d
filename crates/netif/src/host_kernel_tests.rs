//! The address code against the host's real kernel, on a veth in a fresh network namespace
//! (the host has no dummy links; the same behaviours on `kube-ipvs0` are in `tests/vm_*.rs`).
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use crate::{DummyLink, Outcome};

fn in_new_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET moves only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        body()
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn ip(args: &str) -> String {
    let output = Command::new("/bin/ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip");
    assert!(
        output.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ip_addresses(dev: &str) -> BTreeSet<String> {
    ip(&format!("-o addr show dev {dev}"))
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "inet" && *w != "inet6")
                .nth(1)
                .map(str::to_owned)
        })
        .collect()
}

fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + n))
}

/// A veth "vip0" with its peer "other0", and one address on the peer that must survive.
fn veth_link() -> DummyLink {
    ip("link add vip0 type veth peer name other0");
    ip("addr add 10.96.0.1/32 dev other0");
    DummyLink::any_link_for_tests("vip0").expect("handle")
}

#[test]
fn sync_adds_removes_and_is_idempotent_on_a_real_kernel() {
    in_new_netns(|| {
        let mut link = veth_link();
        let desired: BTreeSet<IpAddr> = [v4(10), v4(11), v4(1)].into();
        let report = link.sync(&desired).expect("sync");
        assert_eq!(report.added.len(), 3);
        assert!(report.is_complete(), "{:?}", report.failed);
        assert_eq!(
            ip_addresses("vip0"),
            ["10.96.0.1/32", "10.96.0.10/32", "10.96.0.11/32"]
                .map(String::from)
                .into()
        );
        assert_eq!(link.addresses().expect("list"), desired);

        let again = link.sync(&desired).expect("sync");
        assert!(again.added.is_empty() && again.removed.is_empty());
        assert_eq!(again.unchanged, 3);

        ip("addr add 10.96.0.12/24 dev vip0");
        ip("addr del 10.96.0.10/32 dev vip0");
        let desired: BTreeSet<IpAddr> = [v4(10), v4(12)].into();
        let report = link.sync(&desired).expect("sync");
        assert_eq!(report.added, [v4(10), v4(12)]);
        assert_eq!(report.removed, [v4(1), v4(11), v4(12)]);
        assert_eq!(
            ip_addresses("vip0"),
            ["10.96.0.10/32", "10.96.0.12/32"].map(String::from).into()
        );
        assert_eq!(
            ip_addresses("other0"),
            ["10.96.0.1/32".to_owned()].into(),
            "other links untouched"
        );
    });
}

#[test]
fn add_and_remove_give_one_result_per_address() {
    in_new_netns(|| {
        let mut link = veth_link();
        let results = link.add(&[v4(5), v4(5), v4(6)]).expect("add");
        let outcomes: Vec<_> = results.into_iter().map(|r| r.expect("ok")).collect();
        assert_eq!(
            outcomes,
            [Outcome::Added, Outcome::AlreadyPresent, Outcome::Added]
        );
        let results = link.remove(&[v4(5), v4(7)]).expect("remove");
        let outcomes: Vec<_> = results.into_iter().map(|r| r.expect("ok")).collect();
        assert_eq!(outcomes, [Outcome::Removed, Outcome::AlreadyAbsent]);
        // A refused address fails alone: IPv6 disabled on the link.
        std::fs::write("/proc/sys/net/ipv6/conf/vip0/disable_ipv6", "1").expect("sysctl");
        let v6: IpAddr = "fd00::10".parse().expect("ip");
        let results = link.add(&[v4(8), v6, v4(9)]).expect("add");
        assert!(matches!(results[0], Ok(Outcome::Added)));
        let error = results[1].as_ref().expect_err("refused");
        assert_eq!(error.errno(), Some(libc::EACCES), "{error}");
        assert!(
            error
                .to_string()
                .starts_with("`ip addr add fd00::10/128 dev vip0` failed"),
            "{error}"
        );
        assert!(matches!(results[2], Ok(Outcome::Added)));
    });
}

#[test]
fn ten_thousand_addresses_in_batches() {
    in_new_netns(|| {
        let mut link = veth_link();
        let desired: BTreeSet<IpAddr> = (100..10_100).map(v4).collect();
        let started = std::time::Instant::now();
        let report = link.sync(&desired).expect("sync");
        let up = started.elapsed();
        assert_eq!(report.added.len(), 10_000);
        assert_eq!(ip_addresses("vip0").len(), 10_000);
        assert_eq!(link.addresses().expect("list"), desired);
        let started = std::time::Instant::now();
        let report = link.sync(&BTreeSet::new()).expect("sync");
        let down = started.elapsed();
        assert_eq!(report.removed.len(), 10_000);
        assert!(ip_addresses("vip0").is_empty());
        assert_eq!(ip_addresses("other0").len(), 1);
        eprintln!("10000 addresses: up {up:?}, down {down:?}");
    });
}

#[test]
fn answers_lost_to_a_receive_queue_overrun_are_settled_from_the_kernels_state() {
    in_new_netns(|| {
        let mut link = veth_link();
        let present: Vec<IpAddr> = (0..400).map(v4).collect();
        let absent: Vec<IpAddr> = (1000..1400).map(v4).collect();
        link.add(&present).expect("add");
        link.connection.starve_receive_buffer_for_tests();
        // 400 EEXIST errors cannot fit a 2 KiB queue: most answers are lost.
        let mixed: Vec<IpAddr> = present.iter().chain(&absent).copied().collect();
        let started = std::time::Instant::now();
        let results = link.add(&mixed).expect("add");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "no wait for a lost ack"
        );
        assert_eq!(results.len(), 800);
        assert!(link.connection.overruns > 0, "the queue did overrun");
        assert!(
            results.iter().all(Result::is_ok),
            "{:?}",
            results.iter().find(|r| r.is_err())
        );
        assert_eq!(ip_addresses("vip0").len(), 800);
        let results = link.remove(&mixed).expect("remove");
        assert!(results.iter().all(Result::is_ok));
        let results = link.remove(&mixed).expect("remove again: all errors");
        assert!(results.iter().all(Result::is_ok));
        assert!(ip_addresses("vip0").is_empty());
        assert_eq!(ip_addresses("other0").len(), 1);
    });
}

#[test]
fn node_addresses_are_every_links_but_the_excluded_one() {
    in_new_netns(|| {
        ip("link set lo up");
        ip("link add vip0 type veth peer name other0");
        ip("addr add 10.96.0.1/32 dev vip0");
        ip("addr add 192.168.10.5/24 dev other0");
        let read = crate::node_addresses("vip0").expect("read");
        let want: BTreeSet<IpAddr> = ["127.0.0.1", "::1", "192.168.10.5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(read.addresses, want, "lo's and other0's, not vip0's");
        let index: u32 = ip("-o link show vip0")
            .split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .expect("index");
        assert_eq!(read.excluded_index, Some(index));
        let none = crate::node_addresses("absent0").expect("read");
        assert_eq!(none.excluded_index, None);
        assert!(
            none.addresses
                .contains(&"10.96.0.1".parse::<IpAddr>().unwrap())
        );
    });
}

#[test]
fn the_monitor_reports_an_added_address_and_a_deleted_excluded_link() {
    in_new_netns(|| {
        ip("link add vip0 type veth peer name other0");
        let mut monitor = crate::AddressMonitor::open("vip0").expect("open");
        let first = monitor.changed().expect("first read");
        assert!(first.addresses.is_empty(), "{first:?}");
        assert!(first.excluded_index.is_some());

        ip("addr add 192.168.10.5/24 dev other0");
        let added = monitor.changed().expect("after the add");
        assert_eq!(
            added.addresses,
            ["192.168.10.5".parse::<IpAddr>().unwrap()].into()
        );

        // Deleting vip0 takes its peer with it: the index and the address go together.
        ip("link del vip0");
        let gone = monitor.changed().expect("after the delete");
        assert_eq!(gone.excluded_index, None);
        assert!(gone.addresses.is_empty());
    });
}
