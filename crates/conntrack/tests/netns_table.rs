//! The table against the host's real kernel, in a fresh network namespace: UDP flows over
//! loopback, DNATed by an iptables rule so that their reply tuple names the "endpoint", as a
//! Service's do. (The host has conntrack and ctnetlink; IPVS's flows are in the VM tests.)
#![allow(unsafe_code)]

use std::net::{IpAddr, UdpSocket};
use std::process::Command;

use conntrack::{Conntrack, Flow};
use inet::{Family, Protocol};

fn in_new_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET moves only this thread, whose
        // sockets and child processes then live in the new namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) needs root: {}",
            std::io::Error::last_os_error()
        );
        body()
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn run(tool: &str, args: &str) -> String {
    let out = Command::new(tool)
        .args(args.split_whitespace())
        .output()
        .expect(tool);
    assert!(
        out.status.success(),
        "{tool} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Loopback up, "Service" 10.96.0.10:53 DNATed to the "endpoint" 127.0.0.1:5353, which
/// answers each datagram; returns the client's port after one exchange.
fn udp_flow_through_dnat() -> u16 {
    run("ip", "link set lo up");
    run("ip", "addr add 10.96.0.10/32 dev lo");
    run(
        "iptables",
        "-t nat -A OUTPUT -d 10.96.0.10 -p udp --dport 53 -j DNAT --to-destination 127.0.0.1:5353",
    );
    let server = UdpSocket::bind("127.0.0.1:5353").unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    client.send_to(b"ping", "10.96.0.10:53").unwrap();
    let mut buf = [0; 16];
    let (n, from) = server.recv_from(&mut buf).unwrap();
    server.send_to(&buf[..n], from).unwrap();
    client.recv_from(&mut buf).unwrap();
    client.local_addr().unwrap().port()
}

fn to_service(flows: &[Flow]) -> Vec<Flow> {
    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    flows
        .iter()
        .filter(|f| f.original.dst == vip)
        .copied()
        .collect()
}

#[test]
fn a_dnat_flow_is_dumped_with_its_endpoint_and_deleted_by_its_tuple() {
    in_new_netns(|| {
        let client_port = udp_flow_through_dnat();
        let mut table = Conntrack::open().unwrap();

        let flows = to_service(&table.dump(Family::V4, Protocol::Udp).unwrap());
        assert_eq!(flows.len(), 1, "{flows:?}");
        let flow = flows[0];
        assert_eq!(flow.protocol, 17);
        assert_eq!(
            (flow.original.src_port, flow.original.dst_port),
            (client_port, 53)
        );
        assert_eq!(flow.reply.src, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(flow.reply.src_port, 5353);
        assert!(flow.id.is_some(), "6.x kernels send CTA_ID");
        assert!(
            run("conntrack", "-L -p udp").contains("dport=53"),
            "conntrack -L agrees"
        );

        assert!(to_service(&table.dump(Family::V6, Protocol::Udp).unwrap()).is_empty());
        assert!(to_service(&table.dump(Family::V4, Protocol::Sctp).unwrap()).is_empty());

        let deleted = table.delete(&[flow]).unwrap();
        assert_eq!(
            (deleted.deleted, deleted.gone, deleted.failed.len()),
            (1, 0, 0)
        );
        assert!(to_service(&table.dump(Family::V4, Protocol::Udp).unwrap()).is_empty());
        assert!(
            !run("conntrack", "-L -p udp").contains("dport=53"),
            "conntrack -L agrees"
        );

        let again = table.delete(&[flow]).unwrap();
        assert_eq!(
            (again.deleted, again.gone),
            (0, 1),
            "an entry already gone is not an error"
        );
    });
}

#[test]
fn many_deletes_go_in_batches_and_each_is_accounted_for() {
    in_new_netns(|| {
        udp_flow_through_dnat();
        let mut table = Conntrack::open().unwrap();
        let real = to_service(&table.dump(Family::V4, Protocol::Udp).unwrap());
        assert_eq!(real.len(), 1);
        // 3,000 deletes of flows that do not exist, and the real one in the middle: more
        // than two batches, every absent one answered ENOENT.
        let mut flows: Vec<Flow> = (0..3000u16)
            .map(|i| {
                let mut f = real[0];
                f.original.src_port = 10_000 + i;
                f
            })
            .collect();
        flows.insert(1500, real[0]);
        let deleted = table.delete(&flows).unwrap();
        assert_eq!(
            (deleted.deleted, deleted.gone, deleted.failed.len()),
            (1, 3000, 0)
        );
        assert!(to_service(&table.dump(Family::V4, Protocol::Udp).unwrap()).is_empty());
    });
}

#[test]
fn an_ipv6_flow_is_dumped_and_deleted_like_an_ipv4_one() {
    in_new_netns(|| {
        run("ip", "link set lo up");
        run("ip", "-6 addr add fd00:96::10/128 dev lo nodad");
        run(
            "ip6tables",
            "-t nat -A OUTPUT -d fd00:96::10 -p udp --dport 53 -j DNAT --to-destination [::1]:5353",
        );
        let server = UdpSocket::bind("[::1]:5353").unwrap();
        let client = UdpSocket::bind("[::1]:0").unwrap();
        client.send_to(b"ping", "[fd00:96::10]:53").unwrap();
        let mut buf = [0; 16];
        server.recv_from(&mut buf).unwrap();

        let mut table = Conntrack::open().unwrap();
        let vip: IpAddr = "fd00:96::10".parse().unwrap();
        let to_vip = |flows: Vec<Flow>| -> Vec<Flow> {
            flows
                .into_iter()
                .filter(|f| f.original.dst == vip)
                .collect()
        };
        let flows = to_vip(table.dump(Family::V6, Protocol::Udp).unwrap());
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].reply.src, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(flows[0].reply.src_port, 5353);
        assert!(to_vip(table.dump(Family::V4, Protocol::Udp).unwrap()).is_empty());

        assert_eq!(table.delete(&flows).unwrap().deleted, 1);
        assert!(to_vip(table.dump(Family::V6, Protocol::Udp).unwrap()).is_empty());
    });
}
