//! The rtnetlink requests this crate sends, each the same message `ip` sends for its command.
//!
//! Built from `netlink-packet-route` types and serialised back to back into the shared
//! `netlink` crate's buffer, so a whole batch leaves in one `sendmsg`; replies are read back
//! into the same types. Wire layout of an address request (`ip addr add`):
//!
//! ```text
//! nlmsghdr  | len u32 | type u16 (RTM_NEWADDR 20) | flags u16 | seq u32 | pid u32 (0) |
//! ifaddrmsg | family u8 | prefixlen u8 | flags u8 (0) | scope u8 (0) | ifindex u32 |
//! IFA_LOCAL   | nla_len u16 | 2 u16 | 4 or 16 address bytes |
//! IFA_ADDRESS | nla_len u16 | 1 u16 | 4 or 16 address bytes |
//! ```

use std::net::IpAddr;

use netlink::Writer;
use netlink_packet_core::{NetlinkDeserializable, NetlinkHeader, NetlinkSerializable};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// `ip addr add ADDR/PREFIX dev INDEX`: `IFA_LOCAL` and `IFA_ADDRESS` both carry the address,
/// as iproute2 sends them. No `IFA_F_NODAD`: a dummy link is `NOARP`, which already makes the
/// kernel skip duplicate address detection, and the address then reads exactly as
/// kube-proxy's does in `ip addr show`.
pub(crate) fn new_address(index: u32, address: IpAddr, prefix: u8) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewAddress(address_message(index, address, prefix))
}

/// `ip addr del ADDR/PREFIX dev INDEX`.
pub(crate) fn del_address(index: u32, address: IpAddr, prefix: u8) -> RouteNetlinkMessage {
    RouteNetlinkMessage::DelAddress(address_message(index, address, prefix))
}

fn address_message(index: u32, address: IpAddr, prefix: u8) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = family(address);
    message.header.prefix_len = prefix;
    message.header.scope = AddressScope::Universe;
    message.header.index = index;
    message.attributes = vec![
        AddressAttribute::Local(address),
        AddressAttribute::Address(address),
    ];
    message
}

/// `ip addr show dev INDEX` (a dump, both families; with strict checking the kernel filters
/// by `ifa_index`, otherwise the caller does).
pub(crate) fn get_addresses(index: u32) -> RouteNetlinkMessage {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Unspec;
    message.header.index = index;
    RouteNetlinkMessage::GetAddress(message)
}

/// `ip link show NAME`.
pub(crate) fn get_link(name: &str) -> RouteNetlinkMessage {
    let mut message = LinkMessage::default();
    message.attributes = vec![LinkAttribute::IfName(name.to_owned())];
    RouteNetlinkMessage::GetLink(message)
}

/// `ip link add NAME type dummy` (created down, as kube-proxy leaves it).
pub(crate) fn new_dummy_link(name: &str) -> RouteNetlinkMessage {
    let mut message = LinkMessage::default();
    message.attributes = vec![
        LinkAttribute::IfName(name.to_owned()),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Dummy)]),
    ];
    RouteNetlinkMessage::NewLink(message)
}

/// `ip link del NAME`, by index so that only the link that was checked is deleted.
pub(crate) fn del_link(index: u32) -> RouteNetlinkMessage {
    let mut message = LinkMessage::default();
    message.header.index = index;
    RouteNetlinkMessage::DelLink(message)
}

fn family(address: IpAddr) -> AddressFamily {
    match address {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// Appends one netlink message (header + `message`) to `w`, 4-byte aligned as netlink requires.
pub(crate) fn append(w: &mut Writer, message: &RouteNetlinkMessage, flags: u16, sequence: u32) {
    let start = w.begin(message.message_type(), flags, sequence);
    message.serialize(w.payload(message.buffer_len()));
    w.end(start);
}

/// Reads one reply message of the kernel's into its `netlink-packet-route` type.
pub(crate) fn parse(reply: &netlink::Message<'_>) -> Result<RouteNetlinkMessage, netlink::Error> {
    let mut header = NetlinkHeader::default();
    header.message_type = reply.msg_type;
    header.flags = reply.flags;
    header.sequence_number = reply.seq;
    header.length =
        u32::try_from(netlink::frame::NLMSG_HDRLEN + reply.payload.len()).unwrap_or(u32::MAX);
    RouteNetlinkMessage::deserialize(&header, reply.payload).map_err(|e| {
        netlink::Error::decode(format!(
            "failed to parse message with type {}: {e}",
            reply.msg_type
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    };

    use super::*;

    // The requests below are byte for byte what iproute2 6.x sends (read with
    // `strace -xx ip addr add ...` on a veth named kube-ipvs0 with index 3), bar the sequence
    // number, which is 7 here, and the one difference noted in NEW_DUMMY.
    #[rustfmt::skip]
    const ADD_V4: &[u8] = &[
        0x28, 0, 0, 0, 0x14, 0, 0x05, 0x06, 7, 0, 0, 0, 0, 0, 0, 0, // nlmsghdr: 40 bytes, RTM_NEWADDR, REQUEST|ACK|EXCL|CREATE
        2, 32, 0, 0, 3, 0, 0, 0,                                    // ifaddrmsg: AF_INET, /32, index 3
        8, 0, 2, 0, 10, 96, 0, 10,                                  // IFA_LOCAL 10.96.0.10
        8, 0, 1, 0, 10, 96, 0, 10,                                  // IFA_ADDRESS 10.96.0.10
    ];

    #[rustfmt::skip]
    const DEL_V6: &[u8] = &[
        0x40, 0, 0, 0, 0x15, 0, 0x05, 0, 7, 0, 0, 0, 0, 0, 0, 0,                      // 64 bytes, RTM_DELADDR, REQUEST|ACK
        10, 128, 0, 0, 3, 0, 0, 0,                                                    // AF_INET6, /128, index 3
        20, 0, 2, 0, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,            // IFA_LOCAL fd00::10
        20, 0, 1, 0, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,            // IFA_ADDRESS fd00::10
    ];

    #[rustfmt::skip]
    const NEW_DUMMY: &[u8] = &[
        0x40, 0, 0, 0, 0x10, 0, 0x05, 0x06, 7, 0, 0, 0, 0, 0, 0, 0,                  // 64 bytes, RTM_NEWLINK, REQUEST|ACK|EXCL|CREATE
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,                              // ifinfomsg: all zero
        15, 0, 3, 0, b'k', b'u', b'b', b'e', b'-', b'i', b'p', b'v', b's', b'0', 0, 0, // IFLA_IFNAME "kube-ipvs0\0" + pad
        // IFLA_LINKINFO { IFLA_INFO_KIND "dummy\0" }. iproute2 leaves out the NUL (nla_len 9);
        // netlink-packet-route sends it (10). The kernel's nla_strcmp accepts both.
        16, 0, 18, 0, 10, 0, 1, 0, b'd', b'u', b'm', b'm', b'y', 0, 0, 0,
    ];

    fn bytes(message: &RouteNetlinkMessage, flags: u16) -> Vec<u8> {
        let mut w = Writer::default();
        append(&mut w, message, flags, 7);
        w.into_bytes()
    }

    #[test]
    fn add_v4_matches_ip_addr_add() {
        let addr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
        assert_eq!(bytes(&new_address(3, addr, 32), flags), ADD_V4);
    }

    #[test]
    fn del_v6_matches_ip_addr_del() {
        let addr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10));
        assert_eq!(
            bytes(&del_address(3, addr, 128), NLM_F_REQUEST | NLM_F_ACK),
            DEL_V6
        );
    }

    #[test]
    fn new_dummy_matches_ip_link_add() {
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
        assert_eq!(bytes(&new_dummy_link("kube-ipvs0"), flags), NEW_DUMMY);
    }

    #[test]
    fn requests_pack_back_to_back_for_one_sendmsg() {
        let mut w = Writer::default();
        let addr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
        append(&mut w, &new_address(3, addr, 32), flags, 7);
        append(&mut w, &new_address(3, addr, 32), flags, 8);
        let buf = w.into_bytes();
        assert_eq!(buf.len(), 2 * ADD_V4.len());
        assert_eq!(&buf[..40], ADD_V4);
        assert_eq!(
            buf[48], 8,
            "second message carries the next sequence number"
        );
    }

    #[test]
    fn emitted_requests_parse_back_to_the_same_message() {
        let addr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10));
        let message = new_address(3, addr, 128);
        let buf = bytes(&message, NLM_F_REQUEST);
        let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).expect("parses");
        assert_eq!(parsed.payload, NetlinkPayload::InnerMessage(message));
    }
}
