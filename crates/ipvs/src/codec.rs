//! The IPVS generic-netlink messages (include/uapi/linux/ip_vs.h): requests written from our
//! types, replies read back into them. Every protocol number of the family lives here.

use crate::config::{Info, Timeouts};
use crate::dest::{Forwarding, RealServer, RealServerEntry, Tunnel, TunnelChecksum, TunnelType};
use crate::error::Error;
use crate::op::Op;
use crate::service::{
    Family, Persistence, Protocol, ServiceFlags, ServiceKey, VirtualServer, VirtualServerEntry,
    prefix_to_mask,
};
use crate::stats::{Connections, Stats};
use netlink::Writer;
use netlink::frame::{attrs, find, get_be16, get_counter, get_str, get_u8, get_u16, get_u32};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub(crate) const FAMILY_NAME: &str = "IPVS";
pub(crate) const VERSION: u8 = 1;

pub(crate) const CMD_NEW_SERVICE: u8 = 1;
pub(crate) const CMD_SET_SERVICE: u8 = 2;
pub(crate) const CMD_DEL_SERVICE: u8 = 3;
pub(crate) const CMD_GET_SERVICE: u8 = 4;
pub(crate) const CMD_NEW_DEST: u8 = 5;
pub(crate) const CMD_SET_DEST: u8 = 6;
pub(crate) const CMD_DEL_DEST: u8 = 7;
pub(crate) const CMD_GET_DEST: u8 = 8;
pub(crate) const CMD_SET_CONFIG: u8 = 12;
pub(crate) const CMD_GET_CONFIG: u8 = 13;
pub(crate) const CMD_GET_INFO: u8 = 15;
pub(crate) const CMD_ZERO: u8 = 16;
pub(crate) const CMD_FLUSH: u8 = 17;

const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;

const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;
const SVC_ATTR_STATS: u16 = 10;
const SVC_ATTR_PE_NAME: u16 = 11;
const SVC_ATTR_STATS64: u16 = 12;

const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_PERSIST_CONNS: u16 = 9;
const DEST_ATTR_STATS: u16 = 10;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;
const DEST_ATTR_STATS64: u16 = 12;
const DEST_ATTR_TUN_TYPE: u16 = 13;
const DEST_ATTR_TUN_PORT: u16 = 14;
const DEST_ATTR_TUN_FLAGS: u16 = 15;

const INFO_ATTR_VERSION: u16 = 1;
const INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

/// The forwarding-method bits of a destination's connection flags.
const CONN_F_FWD_MASK: u32 = 0x7;

fn put_addr(w: &mut Writer, kind: u16, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => w.put(kind, &v4.octets()),
        IpAddr::V6(v6) => w.put(kind, &v6.octets()),
    }
}

/// The attributes that identify a service.
fn put_service_key(w: &mut Writer, key: &ServiceKey) {
    w.put_u16(SVC_ATTR_AF, key.family().af());
    match key {
        ServiceKey::Addr { protocol, addr } => {
            w.put_u16(SVC_ATTR_PROTOCOL, u16::from(protocol.number()));
            put_addr(w, SVC_ATTR_ADDR, addr.ip());
            w.put(SVC_ATTR_PORT, &addr.port().to_be_bytes());
        }
        ServiceKey::Fwmark { mark, .. } => w.put_u32(SVC_ATTR_FWMARK, *mark),
    }
}

fn put_service_nest(w: &mut Writer, key: &ServiceKey) {
    let nest = w.nest_begin(CMD_ATTR_SERVICE);
    put_service_key(w, key);
    w.nest_end(nest);
}

/// A whole service, as NEW_SERVICE and SET_SERVICE need it (the kernel wants every field).
fn put_service_full(w: &mut Writer, vs: &VirtualServer) {
    let nest = w.nest_begin(CMD_ATTR_SERVICE);
    put_service_key(w, &vs.key);
    w.put_str(SVC_ATTR_SCHED_NAME, vs.scheduler.name());
    if let Some(pe) = &vs.persistence_engine {
        w.put_str(SVC_ATTR_PE_NAME, pe);
    }
    let mut flags = vs.flags.bits();
    if vs.persistence.is_some() {
        flags |= ServiceFlags::PERSISTENT;
    }
    let mut flag_bytes = [0u8; 8];
    flag_bytes[..4].copy_from_slice(&flags.to_ne_bytes());
    flag_bytes[4..].copy_from_slice(&u32::MAX.to_ne_bytes()); // mask: replace every flag
    w.put(SVC_ATTR_FLAGS, &flag_bytes);
    let family = vs.key.family();
    let p = vs.persistence.unwrap_or(Persistence {
        timeout: 0,
        prefix_len: family.max_prefix(),
    });
    w.put_u32(SVC_ATTR_TIMEOUT, p.timeout);
    match family {
        // An IPv4 netmask is a big-endian mask; an IPv6 one is a native prefix length.
        Family::V4 => w.put(
            SVC_ATTR_NETMASK,
            &prefix_to_mask(p.prefix_len).to_be_bytes(),
        ),
        Family::V6 => w.put_u32(SVC_ATTR_NETMASK, u32::from(p.prefix_len)),
    }
    w.nest_end(nest);
}

fn put_dest(w: &mut Writer, rs: &RealServer) {
    let nest = w.nest_begin(CMD_ATTR_DEST);
    put_addr(w, DEST_ATTR_ADDR, rs.addr.ip());
    w.put(DEST_ATTR_PORT, &rs.addr.port().to_be_bytes());
    w.put_u32(DEST_ATTR_FWD_METHOD, rs.forwarding.number());
    w.put_u32(DEST_ATTR_WEIGHT, rs.weight);
    if let Forwarding::Tunnel(t) = rs.forwarding {
        w.put_u8(DEST_ATTR_TUN_TYPE, t.kind.number());
        w.put(DEST_ATTR_TUN_PORT, &t.port.to_be_bytes());
        w.put_u16(DEST_ATTR_TUN_FLAGS, t.checksum.bits());
    }
    w.put_u32(DEST_ATTR_U_THRESH, rs.upper_threshold);
    w.put_u32(DEST_ATTR_L_THRESH, rs.lower_threshold);
    w.put_u16(DEST_ATTR_ADDR_FAMILY, Family::of(rs.addr.ip()).af());
    w.nest_end(nest);
}

fn put_dest_key(w: &mut Writer, addr: SocketAddr) {
    let nest = w.nest_begin(CMD_ATTR_DEST);
    put_addr(w, DEST_ATTR_ADDR, addr.ip());
    w.put(DEST_ATTR_PORT, &addr.port().to_be_bytes());
    w.put_u16(DEST_ATTR_ADDR_FAMILY, Family::of(addr.ip()).af());
    w.nest_end(nest);
}

/// Writes one request for `op`.
pub(crate) fn encode_op(w: &mut Writer, family_id: u16, flags: u16, seq: u32, op: &Op) {
    let cmd = match op {
        Op::AddService(_) => CMD_NEW_SERVICE,
        Op::UpdateService(_) => CMD_SET_SERVICE,
        Op::DeleteService(_) => CMD_DEL_SERVICE,
        Op::AddDest(..) => CMD_NEW_DEST,
        Op::UpdateDest(..) => CMD_SET_DEST,
        Op::DeleteDest(..) => CMD_DEL_DEST,
    };
    let start = w.begin_genl(family_id, flags, seq, cmd, VERSION);
    match op {
        Op::AddService(vs) | Op::UpdateService(vs) => put_service_full(w, vs),
        Op::DeleteService(key) => put_service_nest(w, key),
        Op::AddDest(key, rs) | Op::UpdateDest(key, rs) => {
            put_service_nest(w, key);
            put_dest(w, rs);
        }
        Op::DeleteDest(key, addr) => {
            put_service_nest(w, key);
            put_dest_key(w, *addr);
        }
    }
    w.end(start);
}

/// A request with no attributes, or only a service (GET_DEST dumps, GET_SERVICE, ZERO).
pub(crate) fn encode_simple(
    w: &mut Writer,
    family_id: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    key: Option<&ServiceKey>,
) {
    let start = w.begin_genl(family_id, flags, seq, cmd, VERSION);
    if let Some(key) = key {
        put_service_nest(w, key);
    }
    w.end(start);
}

pub(crate) fn encode_timeouts(w: &mut Writer, family_id: u16, flags: u16, seq: u32, t: &Timeouts) {
    let start = w.begin_genl(family_id, flags, seq, CMD_SET_CONFIG, VERSION);
    w.put_u32(CMD_ATTR_TIMEOUT_TCP, t.tcp);
    w.put_u32(CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin);
    w.put_u32(CMD_ATTR_TIMEOUT_UDP, t.udp);
    w.end(start);
}

fn get_addr(family: Family, value: &[u8]) -> Result<IpAddr, Error> {
    match family {
        Family::V4 => {
            let b: [u8; 4] = value
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Error::decode("short IPv4 address"))?;
            Ok(IpAddr::V4(Ipv4Addr::from(b)))
        }
        Family::V6 => {
            let b: [u8; 16] = value
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Error::decode("short IPv6 address"))?;
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
    }
}

fn decode_stats(data: &[u8], stats: &mut Stats) -> Result<(), Error> {
    for attr in attrs(data) {
        let (kind, value) = attr?;
        let field = match kind {
            1 => &mut stats.connections,
            2 => &mut stats.packets_in,
            3 => &mut stats.packets_out,
            4 => &mut stats.bytes_in,
            5 => &mut stats.bytes_out,
            6 => &mut stats.cps,
            7 => &mut stats.pps_in,
            8 => &mut stats.pps_out,
            9 => &mut stats.bps_in,
            10 => &mut stats.bps_out,
            _ => continue, // padding, or a newer kernel's counter
        };
        *field = get_counter(value)?;
    }
    Ok(())
}

/// Reads the SERVICE nest of a NEW_SERVICE reply (a dump entry or a GET_SERVICE answer).
pub(crate) fn decode_service(genl_attrs: &[u8]) -> Result<VirtualServerEntry, Error> {
    let nest = find(genl_attrs, CMD_ATTR_SERVICE)?
        .ok_or_else(|| Error::decode("service reply without a service"))?;
    let (mut af, mut protocol, mut addr, mut port, mut fwmark) = (None, None, None, None, None);
    let (mut sched, mut pe, mut flags, mut timeout, mut netmask) = (None, None, 0u32, 0u32, None);
    let mut stats32 = None;
    let mut stats64 = None;
    for attr in attrs(nest) {
        let (kind, value) = attr?;
        match kind {
            SVC_ATTR_AF => af = Some(get_u16(value)?),
            SVC_ATTR_PROTOCOL => protocol = Some(get_u16(value)?),
            SVC_ATTR_ADDR => addr = Some(value),
            SVC_ATTR_PORT => port = Some(get_be16(value)?),
            SVC_ATTR_FWMARK => fwmark = Some(get_u32(value)?),
            SVC_ATTR_SCHED_NAME => sched = Some(get_str(value)?),
            SVC_ATTR_PE_NAME => pe = Some(get_str(value)?.to_owned()),
            SVC_ATTR_FLAGS => flags = get_u32(value)?,
            SVC_ATTR_TIMEOUT => timeout = get_u32(value)?,
            SVC_ATTR_NETMASK => netmask = Some(value),
            SVC_ATTR_STATS => stats32 = Some(value),
            SVC_ATTR_STATS64 => stats64 = Some(value),
            _ => {}
        }
    }
    let af = af.ok_or_else(|| Error::decode("service without a family"))?;
    let family = Family::from_af(af)
        .ok_or_else(|| Error::decode(format!("service of unknown family {af}")))?;
    let key = if let Some(mark) = fwmark.filter(|m| *m != 0) {
        ServiceKey::Fwmark { family, mark }
    } else {
        {
            let number = protocol.ok_or_else(|| Error::decode("service without a protocol"))?;
            let protocol = u8::try_from(number)
                .ok()
                .and_then(Protocol::from_number)
                .ok_or_else(|| Error::decode(format!("service of unknown protocol {number}")))?;
            let ip = get_addr(
                family,
                addr.ok_or_else(|| Error::decode("service without an address"))?,
            )?;
            ServiceKey::Addr {
                protocol,
                addr: SocketAddr::new(ip, port.unwrap_or(0)),
            }
        }
    };
    let sched = sched.ok_or_else(|| Error::decode("service without a scheduler"))?;
    let scheduler = sched
        .parse()
        .map_err(|e: crate::UnknownScheduler| Error::decode(e.to_string()))?;
    let persistence = if flags & ServiceFlags::PERSISTENT == 0 {
        None
    } else {
        let prefix_len = match (family, netmask) {
            (_, None) => family.max_prefix(),
            (Family::V4, Some(v)) => {
                let mask = u32::from_be_bytes(
                    v.get(..4)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| Error::decode("short netmask"))?,
                );
                u8::try_from(mask.leading_ones()).expect("at most 32")
            }
            (Family::V6, Some(v)) => u8::try_from(get_u32(v)?.min(128)).expect("at most 128"),
        };
        Some(Persistence {
            timeout,
            prefix_len,
        })
    };
    let mut stats = Stats::default();
    if let Some(s) = stats64.or(stats32) {
        decode_stats(s, &mut stats)?;
    }
    Ok(VirtualServerEntry {
        server: VirtualServer {
            key,
            scheduler,
            persistence,
            flags: ServiceFlags::from_bits_truncate(flags & !ServiceFlags::HASHED),
            persistence_engine: pe,
        },
        stats,
    })
}

/// Reads the DEST nest of a NEW_DEST dump entry. `service_family` is used when the kernel
/// sends no ADDR_FAMILY (kernels before 4.x).
pub(crate) fn decode_dest(
    genl_attrs: &[u8],
    service_family: Family,
) -> Result<RealServerEntry, Error> {
    let nest = find(genl_attrs, CMD_ATTR_DEST)?
        .ok_or_else(|| Error::decode("destination reply without a destination"))?;
    let (mut addr, mut port, mut fwd, mut weight, mut upper, mut lower) = (None, 0, 0, 0, 0, 0);
    let (mut tun_type, mut tun_port, mut tun_flags, mut af) = (0, 0, 0, None);
    let mut conns = Connections::default();
    let (mut stats32, mut stats64) = (None, None);
    for attr in attrs(nest) {
        let (kind, value) = attr?;
        match kind {
            DEST_ATTR_ADDR => addr = Some(value),
            DEST_ATTR_PORT => port = get_be16(value)?,
            DEST_ATTR_FWD_METHOD => fwd = get_u32(value)? & CONN_F_FWD_MASK,
            DEST_ATTR_WEIGHT => weight = get_u32(value)?,
            DEST_ATTR_U_THRESH => upper = get_u32(value)?,
            DEST_ATTR_L_THRESH => lower = get_u32(value)?,
            DEST_ATTR_ACTIVE_CONNS => conns.active = get_u32(value)?,
            DEST_ATTR_INACT_CONNS => conns.inactive = get_u32(value)?,
            DEST_ATTR_PERSIST_CONNS => conns.persistent = get_u32(value)?,
            DEST_ATTR_STATS => stats32 = Some(value),
            DEST_ATTR_STATS64 => stats64 = Some(value),
            DEST_ATTR_ADDR_FAMILY => af = Some(get_u16(value)?),
            DEST_ATTR_TUN_TYPE => tun_type = get_u8(value)?,
            DEST_ATTR_TUN_PORT => tun_port = get_be16(value)?,
            DEST_ATTR_TUN_FLAGS => tun_flags = get_u16(value)?,
            _ => {}
        }
    }
    let family = match af {
        Some(af) => Family::from_af(af)
            .ok_or_else(|| Error::decode(format!("destination of unknown family {af}")))?,
        None => service_family,
    };
    let ip = get_addr(
        family,
        addr.ok_or_else(|| Error::decode("destination without an address"))?,
    )?;
    let forwarding = match fwd {
        0 => Forwarding::Masquerade,
        1 => Forwarding::Local,
        2 => Forwarding::Tunnel(Tunnel {
            kind: TunnelType::from_number(tun_type)
                .ok_or_else(|| Error::decode(format!("unknown tunnel type {tun_type}")))?,
            port: tun_port,
            checksum: TunnelChecksum::from_bits(tun_flags),
        }),
        _ => Forwarding::DirectRoute,
    };
    let mut stats = Stats::default();
    if let Some(s) = stats64.or(stats32) {
        decode_stats(s, &mut stats)?;
    }
    Ok(RealServerEntry {
        server: RealServer {
            addr: SocketAddr::new(ip, port),
            forwarding,
            weight,
            upper_threshold: upper,
            lower_threshold: lower,
        },
        connections: conns,
        stats,
    })
}

pub(crate) fn decode_info(genl_attrs: &[u8]) -> Result<Info, Error> {
    let mut info = Info {
        version: 0,
        connection_table_size: 0,
    };
    for attr in attrs(genl_attrs) {
        let (kind, value) = attr?;
        match kind {
            INFO_ATTR_VERSION => info.version = get_u32(value)?,
            INFO_ATTR_CONN_TAB_SIZE => info.connection_table_size = get_u32(value)?,
            _ => {}
        }
    }
    Ok(info)
}

pub(crate) fn decode_timeouts(genl_attrs: &[u8]) -> Result<Timeouts, Error> {
    let mut t = Timeouts::default();
    for attr in attrs(genl_attrs) {
        let (kind, value) = attr?;
        match kind {
            CMD_ATTR_TIMEOUT_TCP => t.tcp = get_u32(value)?,
            CMD_ATTR_TIMEOUT_TCP_FIN => t.tcp_fin = get_u32(value)?,
            CMD_ATTR_TIMEOUT_UDP => t.udp = get_u32(value)?,
            _ => {}
        }
    }
    Ok(t)
}

/// The wire form of IPVS messages without a socket, for tests and fuzzing: what
/// [`crate::Handle`] writes for an op and reads from the kernel's replies.
pub mod wire {
    use super::{Error, Family, Op, RealServerEntry, VirtualServerEntry, Writer};

    /// The family id written into [`request`]'s header (the kernel assigns the real one).
    pub const FAMILY_ID: u16 = 0x1a;

    /// The one request [`crate::Handle::apply`] sends for `op` (netlink and genl headers
    /// included), as `ipvsadm` would send the same rule line.
    #[must_use]
    pub fn request(op: &Op) -> Vec<u8> {
        let mut w = Writer::default();
        super::encode_op(&mut w, FAMILY_ID, netlink::frame::NLM_F_REQUEST, 1, op);
        w.into_bytes()
    }

    /// Reads the service of a NEW_SERVICE message: `attrs` are the attributes after the genl
    /// header, as in a dump reply (`ipvsadm -Ln` reads these).
    pub fn read_service(attrs: &[u8]) -> Result<VirtualServerEntry, Error> {
        super::decode_service(attrs)
    }

    /// Reads the destination of a NEW_DEST message (`attrs` after the genl header);
    /// `service_family` stands in for a missing ADDR_FAMILY, as for old kernels.
    pub fn read_real_server(
        attrs: &[u8],
        service_family: Family,
    ) -> Result<RealServerEntry, Error> {
        super::decode_dest(attrs, service_family)
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    //! Golden bytes: what `ipvsadm` (libipvs) sends and what the kernel's
    //! ip_vs_genl_fill_service / ip_vs_genl_fill_dest reply, written out by hand.
    use super::*;
    use crate::Scheduler;
    use netlink::frame::{NLM_F_ACK, NLM_F_REQUEST, messages};

    const FAMILY: u16 = 0x1a;

    fn encode(op: &Op) -> Vec<u8> {
        let mut w = Writer::default();
        encode_op(&mut w, FAMILY, NLM_F_REQUEST | NLM_F_ACK, 42, op);
        w.into_bytes()
    }

    /// `-A -t 10.96.0.10:80 -s rr -p 10800`.
    const NEW_SERVICE: &[u8] = &[
        92, 0, 0, 0, 0x1a, 0, 5, 0, 42, 0, 0, 0, 0, 0, 0,
        0, // nlmsghdr: len 92, REQUEST|ACK, seq 42
        1, 1, 0, 0, // genl: NEW_SERVICE, version 1
        72, 0, 1, 0, // SERVICE nest
        6, 0, 1, 0, 2, 0, 0, 0, // AF = AF_INET
        6, 0, 2, 0, 6, 0, 0, 0, // PROTOCOL = TCP
        8, 0, 3, 0, 10, 96, 0, 10, // ADDR
        6, 0, 4, 0, 0, 80, 0, 0, // PORT, big-endian
        7, 0, 6, 0, b'r', b'r', 0, 0, // SCHED_NAME "rr\0"
        12, 0, 7, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, // FLAGS persistent, mask all
        8, 0, 8, 0, 0x30, 0x2a, 0, 0, // TIMEOUT 10800
        8, 0, 9, 0, 0xff, 0xff, 0xff, 0xff, // NETMASK /32, big-endian
    ];

    /// `-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1`.
    const NEW_DEST: &[u8] = &[
        116, 0, 0, 0, 0x1a, 0, 5, 0, 42, 0, 0, 0, 0, 0, 0, 0, // nlmsghdr
        5, 1, 0, 0, // genl: NEW_DEST
        36, 0, 1, 0, // SERVICE nest (key only)
        6, 0, 1, 0, 2, 0, 0, 0, // AF
        6, 0, 2, 0, 6, 0, 0, 0, // PROTOCOL
        8, 0, 3, 0, 10, 96, 0, 10, // ADDR
        6, 0, 4, 0, 0, 80, 0, 0, // PORT
        60, 0, 2, 0, // DEST nest
        8, 0, 1, 0, 10, 244, 1, 5, // ADDR
        6, 0, 2, 0, 0x1f, 0x90, 0, 0, // PORT 8080, big-endian
        8, 0, 3, 0, 0, 0, 0, 0, // FWD_METHOD masq
        8, 0, 4, 0, 1, 0, 0, 0, // WEIGHT 1
        8, 0, 5, 0, 0, 0, 0, 0, // U_THRESH
        8, 0, 6, 0, 0, 0, 0, 0, // L_THRESH
        6, 0, 11, 0, 2, 0, 0, 0, // ADDR_FAMILY
    ];

    fn vip() -> ServiceKey {
        ServiceKey::tcp(Ipv4Addr::new(10, 96, 0, 10).into(), 80)
    }

    #[test]
    fn new_service_encodes_like_ipvsadm() {
        let vs = VirtualServer::new(vip(), Scheduler::RoundRobin).with_persistence(10800);
        assert_eq!(encode(&Op::AddService(vs)), NEW_SERVICE);
    }

    #[test]
    fn new_dest_encodes_like_ipvsadm() {
        let rs = RealServer::masquerade("10.244.1.5:8080".parse().unwrap());
        assert_eq!(encode(&Op::AddDest(vip(), rs)), NEW_DEST);
    }

    #[test]
    fn ipv6_fwmark_and_delete_requests_carry_only_the_key() {
        let key = ServiceKey::Fwmark {
            family: Family::V6,
            mark: 42,
        };
        assert_eq!(
            encode(&Op::DeleteService(key)),
            [
                40, 0, 0, 0, 0x1a, 0, 5, 0, 42, 0, 0, 0, 0, 0, 0, 0, //
                3, 1, 0, 0, // DEL_SERVICE
                20, 0, 1, 0, // SERVICE nest
                6, 0, 1, 0, 10, 0, 0, 0, // AF_INET6
                8, 0, 5, 0, 42, 0, 0, 0, // FWMARK
            ]
        );
        let v6 = ServiceKey::tcp("fd00::10".parse().unwrap(), 443);
        let bytes = encode(&Op::DeleteDest(v6, "[fd00::5]:8443".parse().unwrap()));
        let msg = messages(&bytes).next().unwrap().unwrap();
        let (cmd, body) = msg.genl().unwrap();
        assert_eq!(cmd, CMD_DEL_DEST);
        let dest = find(body, CMD_ATTR_DEST).unwrap().unwrap();
        let kinds: Vec<u16> = attrs(dest).map(|a| a.unwrap().0).collect();
        assert_eq!(
            kinds,
            [DEST_ATTR_ADDR, DEST_ATTR_PORT, DEST_ATTR_ADDR_FAMILY]
        );
        assert_eq!(find(dest, DEST_ATTR_ADDR).unwrap().unwrap().len(), 16);
    }

    #[test]
    fn ipv6_persistence_netmask_is_a_native_prefix_length() {
        let mut vs = VirtualServer::new(
            ServiceKey::udp("fd00::53".parse().unwrap(), 53),
            Scheduler::RoundRobin,
        );
        vs.persistence = Some(Persistence {
            timeout: 60,
            prefix_len: 64,
        });
        let bytes = encode(&Op::UpdateService(vs.clone()));
        let msg = messages(&bytes).next().unwrap().unwrap();
        let (cmd, body) = msg.genl().unwrap();
        assert_eq!(cmd, CMD_SET_SERVICE);
        let svc = find(body, CMD_ATTR_SERVICE).unwrap().unwrap();
        assert_eq!(find(svc, SVC_ATTR_NETMASK).unwrap().unwrap(), [64, 0, 0, 0]);
        // And the request reads back as the same service.
        assert_eq!(decode_service(body).unwrap().server, vs);
    }

    /// A NEW_SERVICE dump entry as ip_vs_genl_fill_service writes it: flags include HASHED,
    /// stats come twice (32 and 64 bit).
    #[test]
    fn service_reply_decodes() {
        let mut w = Writer::default();
        let start = w.begin_genl(FAMILY, 2, 9, CMD_NEW_SERVICE, VERSION);
        let nest = w.nest_begin(CMD_ATTR_SERVICE);
        w.put_u16(SVC_ATTR_AF, 2);
        w.put_u16(SVC_ATTR_PROTOCOL, 17);
        w.put(SVC_ATTR_ADDR, &[10, 96, 0, 53]);
        w.put(SVC_ATTR_PORT, &[0, 53]);
        w.put_str(SVC_ATTR_SCHED_NAME, "sh");
        w.put(
            SVC_ATTR_FLAGS,
            &[0x1 | 0x2 | 0x10, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
        );
        w.put_u32(SVC_ATTR_TIMEOUT, 300);
        w.put(SVC_ATTR_NETMASK, &[255, 255, 255, 0]);
        let s = w.nest_begin(SVC_ATTR_STATS);
        w.put_u32(1, 7);
        w.nest_end(s);
        let s = w.nest_begin(SVC_ATTR_STATS64);
        w.put(1, &7u64.to_ne_bytes());
        w.put(4, &(1u64 << 40).to_ne_bytes());
        w.nest_end(s);
        w.nest_end(nest);
        w.end(start);
        let msg = messages(w.as_bytes()).next().unwrap().unwrap();
        let entry = decode_service(msg.genl().unwrap().1).unwrap();
        assert_eq!(
            entry.server.to_string(),
            "-A -u 10.96.0.53:53 -s sh -p 300 -M 255.255.255.0 -b sh-port"
        );
        assert_eq!(entry.stats.connections, 7);
        assert_eq!(entry.stats.bytes_in, 1 << 40);
    }

    #[test]
    fn dest_reply_decodes_with_tunnel_and_counts() {
        let mut w = Writer::default();
        let start = w.begin_genl(FAMILY, 2, 9, CMD_NEW_DEST, VERSION);
        let nest = w.nest_begin(CMD_ATTR_DEST);
        w.put(DEST_ATTR_ADDR, &[192, 168, 10, 5]);
        w.put(DEST_ATTR_PORT, &[0, 80]);
        w.put_u32(DEST_ATTR_FWD_METHOD, 2);
        w.put_u32(DEST_ATTR_WEIGHT, 3);
        w.put_u8(DEST_ATTR_TUN_TYPE, 1);
        w.put(DEST_ATTR_TUN_PORT, &6079u16.to_be_bytes());
        w.put_u16(DEST_ATTR_TUN_FLAGS, 1);
        w.put_u32(DEST_ATTR_U_THRESH, 0);
        w.put_u32(DEST_ATTR_L_THRESH, 0);
        w.put_u32(DEST_ATTR_ACTIVE_CONNS, 4);
        w.put_u32(DEST_ATTR_INACT_CONNS, 5);
        w.put_u32(DEST_ATTR_PERSIST_CONNS, 6);
        w.put_u16(DEST_ATTR_ADDR_FAMILY, 2);
        w.nest_end(nest);
        w.end(start);
        let msg = messages(w.as_bytes()).next().unwrap().unwrap();
        let entry = decode_dest(msg.genl().unwrap().1, Family::V4).unwrap();
        assert_eq!(
            entry.server.to_string(),
            "-r 192.168.10.5:80 -i -w 3 --tun-type gue --tun-port 6079 --tun-csum"
        );
        assert_eq!(
            entry.connections,
            Connections {
                active: 4,
                inactive: 5,
                persistent: 6
            }
        );
    }

    #[test]
    fn every_op_reads_back_from_its_own_request() {
        let vs = VirtualServer::new(vip(), Scheduler::Maglev).with_persistence(30);
        let bytes = encode(&Op::AddService(vs.clone()));
        let msg = messages(&bytes).next().unwrap().unwrap();
        assert_eq!(decode_service(msg.genl().unwrap().1).unwrap().server, vs);
        let rs = RealServer::masquerade("10.244.1.5:8080".parse().unwrap());
        let bytes = encode(&Op::UpdateDest(vip(), rs));
        let msg = messages(&bytes).next().unwrap().unwrap();
        assert_eq!(
            decode_dest(msg.genl().unwrap().1, Family::V4)
                .unwrap()
                .server,
            rs
        );
    }
}
