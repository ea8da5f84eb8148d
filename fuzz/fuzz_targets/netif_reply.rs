//! The rtnetlink reply decoder of `ip addr show` on any datagram: it never panics, and the
//! addresses it read, answered again as the kernel answers, read back the same.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use netlink::Writer;
use netlink_packet_core::NetlinkSerializable;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the link, from a few, so that the fuzzer can match it.
    let Some((&index, dump)) = data.split_first() else {
        return;
    };
    let index = u32::from(index % 4);
    let Ok(entries) = netif::read_address_dump(dump, index) else {
        return;
    };

    let mut w = Writer::default();
    for (seq, (ip, prefix)) in (1..).zip(&entries) {
        let mut message = AddressMessage::default();
        message.header.index = index;
        message.header.prefix_len = *prefix;
        // IPv4 addresses come with IFA_LOCAL, IPv6 ones with IFA_ADDRESS only.
        message.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        message.attributes.push(AddressAttribute::Address(*ip));
        if ip.is_ipv4() {
            message.attributes.push(AddressAttribute::Local(*ip));
        }
        let message = RouteNetlinkMessage::NewAddress(message);
        let start = w.begin(message.message_type(), 2, seq);
        message.serialize(w.payload(message.buffer_len()));
        w.end(start);
    }
    let done = w.begin(netlink::frame::NLMSG_DONE, 2, 0);
    w.payload(4);
    w.end(done);
    let again = netif::read_address_dump(w.as_bytes(), index).expect("the kernel's form reads");
    assert_eq!(again, entries);
});
