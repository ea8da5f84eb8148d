//! Host test in a fresh network namespace: the address monitor keeps following the node's
//! addresses while another link's addresses churn, as kube-ipvs0's do when the proxy binds
//! thousands of ClusterIPs at start (each change interrupts a dump of every link's addresses).

mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{in_new_netns, ip};
use netif::AddressMonitor;

/// `ip -batch -` of `lines`, as fast as iproute2 sends them.
fn ip_batch(lines: &str) {
    let mut child = Command::new("/bin/ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run /bin/ip -batch");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(lines.as_bytes())
        .expect("write the batch");
    assert!(child.wait().expect("ip -batch ends").success());
}

#[test]
fn an_address_added_after_a_churn_of_another_links_addresses_is_seen() {
    in_new_netns(|| {
        ip("link add churn0 type veth peer name churn1");
        ip("link add node0 type veth peer name node1");
        let (tx, rx) = mpsc::channel();
        AddressMonitor::follow("churn0", move |now| tx.send(now.addresses).is_ok())
            .expect("follow the addresses");
        let first = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a first read");
        assert!(first.is_empty(), "{first:?}");

        // 20,000 changes on the excluded link, in rounds of adds and deletes.
        for _ in 0..5 {
            for op in ["add", "del"] {
                let mut lines = String::new();
                for i in 0..2000_u32 {
                    let (high, low) = (i / 250, i % 250 + 1);
                    writeln!(lines, "addr {op} 10.96.{high}.{low}/32 dev churn0").unwrap();
                }
                ip_batch(&lines);
            }
        }
        ip("addr add 198.51.100.7/24 dev node0");

        let wanted: IpAddr = "198.51.100.7".parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(addresses) if addresses.contains(&wanted) => {
                    assert!(
                        addresses
                            .iter()
                            .all(|a| !a.to_string().starts_with("10.96.")),
                        "churn0's addresses are left out: {addresses:?}"
                    );
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("node0's new address not reported after the churn ({e})"),
            }
        }
    });
}
