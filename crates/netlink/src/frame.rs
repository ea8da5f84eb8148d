//! Netlink and generic-netlink framing: requests written back to back into one buffer, and
//! the kernel's replies walked without copying them.
//!
//! ```text
//!  nlmsghdr (16)                         genlmsghdr (4)      attributes (4-byte aligned)
//! +--------+------+-------+-----+-----+-----+-----+------+------------------------------
//! | len u32|type  |flags  |seq  |pid  | cmd | ver | resv | len u16 | type u16 | value…
//! |        |u16   |u16    |u32  |u32  | u8  | u8  | u16  |
//! +--------+------+-------+-----+-----+-----+-----+------+------------------------------
//! ```
//! Other families put their own fixed header where the genl header is (rtnetlink's
//! `ifaddrmsg`, `ifinfomsg`); [`Writer::payload`] takes such a payload whole. All header
//! fields and most attribute values are native-endian; values the kernel wants big-endian
//! (ports, IPv4 masks) are written by the caller as raw bytes.

use crate::error::Error;

/// Length of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Length of `struct genlmsghdr`.
pub const GENL_HDRLEN: usize = 4;

pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
/// On a reply: the dump was interrupted by a concurrent change and may be inconsistent.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x300;

const NLA_HDRLEN: usize = 4;
/// Attribute types carry two flag bits (nested, network byte order) that are not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Rounds up to netlink's 4-byte alignment.
#[must_use]
pub const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A buffer that holds one or many netlink messages, written back to back.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// The bytes written so far.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// How many bytes have been written.
    #[must_use]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing has been written.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Forgets every message, keeping the allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// The bytes, for the caller to keep.
    #[must_use]
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Starts a message with its netlink header; returns its offset for [`Writer::end`].
    pub fn begin(&mut self, msg_type: u16, flags: u16, seq: u32) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by end()
        self.buf.extend_from_slice(&msg_type.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        start
    }

    /// Starts a generic-netlink message (netlink header and genl header).
    pub fn begin_genl(
        &mut self,
        msg_type: u16,
        flags: u16,
        seq: u32,
        cmd: u8,
        version: u8,
    ) -> usize {
        let start = self.begin(msg_type, flags, seq);
        self.buf.extend_from_slice(&[cmd, version, 0, 0]);
        start
    }

    /// Finishes the message started at `start`: patches its length and pads it, so that the
    /// next message starts aligned.
    pub fn end(&mut self, start: usize) {
        let len = u32::try_from(self.buf.len() - start).expect("a netlink message fits in u32");
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.pad();
    }

    /// Adds flags to the message started at `start` (the engine's acknowledgement request).
    pub fn add_flags(&mut self, start: usize, flags: u16) {
        let at = start + 6;
        let old = u16::from_ne_bytes([self.buf[at], self.buf[at + 1]]);
        self.buf[at..at + 2].copy_from_slice(&(old | flags).to_ne_bytes());
    }

    /// Appends `len` zeroed bytes of payload and returns them for the caller to fill: a
    /// family's own fixed header and attributes, serialised by another library.
    pub fn payload(&mut self, len: usize) -> &mut [u8] {
        let start = self.buf.len();
        self.buf.resize(start + len, 0);
        &mut self.buf[start..]
    }

    /// An attribute with a raw value.
    pub fn put(&mut self, kind: u16, value: &[u8]) {
        let len = u16::try_from(NLA_HDRLEN + value.len()).expect("an attribute fits in u16");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    pub fn put_u8(&mut self, kind: u16, value: u8) {
        self.put(kind, &[value]);
    }

    pub fn put_u16(&mut self, kind: u16, value: u16) {
        self.put(kind, &value.to_ne_bytes());
    }

    pub fn put_u32(&mut self, kind: u16, value: u32) {
        self.put(kind, &value.to_ne_bytes());
    }

    /// A NUL-terminated string, as the kernel's `NLA_NUL_STRING` policy wants.
    pub fn put_str(&mut self, kind: u16, value: &str) {
        let len = u16::try_from(NLA_HDRLEN + value.len() + 1).expect("an attribute fits in u16");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    /// Opens a nested attribute. Like libnl (and so `ipvsadm`), the NESTED flag is not set:
    /// the families we speak parse their nests liberally either way.
    pub fn nest_begin(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        start
    }

    pub fn nest_end(&mut self, start: usize) {
        let len = u16::try_from(self.buf.len() - start).expect("a nest fits in u16");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        let padded = align(self.buf.len());
        self.buf.resize(padded, 0);
    }
}

/// One message of a datagram from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the netlink header.
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// For `NLMSG_ERROR` (and `NLMSG_DONE`): the errno the kernel reports, as a positive
    /// number; 0 is an acknowledgement.
    pub fn errno(&self) -> Result<i32, Error> {
        let bytes = self
            .payload
            .get(..4)
            .ok_or_else(|| Error::decode("error message shorter than its errno"))?;
        let code = i32::from_ne_bytes(bytes.try_into().expect("4 bytes"));
        Ok(code.checked_neg().unwrap_or(i32::MAX))
    }

    /// For generic-netlink messages: the command and the attributes after the genl header.
    pub fn genl(&self) -> Result<(u8, &'a [u8]), Error> {
        if self.payload.len() < GENL_HDRLEN {
            return Err(Error::decode(
                "generic netlink message shorter than its header",
            ));
        }
        Ok((self.payload[0], &self.payload[GENL_HDRLEN..]))
    }
}

/// Walks the messages of one datagram.
pub fn messages(mut data: &[u8]) -> impl Iterator<Item = Result<Message<'_>, Error>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        if data.len() < NLMSG_HDRLEN {
            data = &[];
            return Some(Err(Error::decode("truncated netlink header")));
        }
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            data = &[];
            return Some(Err(Error::decode("netlink message length out of bounds")));
        }
        let msg = Message {
            msg_type: u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes")),
            flags: u16::from_ne_bytes(data[6..8].try_into().expect("2 bytes")),
            seq: u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes")),
            payload: &data[NLMSG_HDRLEN..len],
        };
        data = data.get(align(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    })
}

/// Walks a run of attributes, yielding (type without flag bits, value).
pub fn attrs(mut data: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), Error>> {
    std::iter::from_fn(move || {
        if data.len() < NLA_HDRLEN {
            return None; // trailing padding, or the end
        }
        let len = usize::from(u16::from_ne_bytes(data[0..2].try_into().expect("2 bytes")));
        let kind = u16::from_ne_bytes(data[2..4].try_into().expect("2 bytes")) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > data.len() {
            data = &[];
            return Some(Err(Error::decode("netlink attribute length out of bounds")));
        }
        let value = &data[NLA_HDRLEN..len];
        data = data.get(align(len)..).unwrap_or(&[]);
        Some(Ok((kind, value)))
    })
}

/// The first attribute of type `want` in a run, if any.
pub fn find(data: &[u8], want: u16) -> Result<Option<&[u8]>, Error> {
    for attr in attrs(data) {
        let (kind, value) = attr?;
        if kind == want {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

pub fn get_u8(value: &[u8]) -> Result<u8, Error> {
    value
        .first()
        .copied()
        .ok_or_else(|| Error::decode("u8 attribute is empty"))
}

pub fn get_u16(value: &[u8]) -> Result<u16, Error> {
    Ok(u16::from_ne_bytes(
        value
            .get(..2)
            .ok_or_else(|| Error::decode("u16 attribute too short"))?
            .try_into()
            .expect("2 bytes"),
    ))
}

pub fn get_be16(value: &[u8]) -> Result<u16, Error> {
    Ok(u16::from_be_bytes(
        value
            .get(..2)
            .ok_or_else(|| Error::decode("be16 attribute too short"))?
            .try_into()
            .expect("2 bytes"),
    ))
}

pub fn get_u32(value: &[u8]) -> Result<u32, Error> {
    Ok(u32::from_ne_bytes(
        value
            .get(..4)
            .ok_or_else(|| Error::decode("u32 attribute too short"))?
            .try_into()
            .expect("4 bytes"),
    ))
}

/// A counter that older kernels send as u32 and newer ones as u64.
pub fn get_counter(value: &[u8]) -> Result<u64, Error> {
    match value.len() {
        4 => Ok(u64::from(get_u32(value)?)),
        8 => Ok(u64::from_ne_bytes(value.try_into().expect("8 bytes"))),
        _ => Err(Error::decode("counter attribute is neither 4 nor 8 bytes")),
    }
}

/// A string attribute, up to its NUL if it has one.
pub fn get_str(value: &[u8]) -> Result<&str, Error> {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    std::str::from_utf8(&value[..end]).map_err(|_| Error::decode("string attribute is not UTF-8"))
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;
    use crate::genl::{
        CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_CMD_GETFAMILY, GENL_ID_CTRL,
    };

    /// `genl ctrl get name IPVS` as `genl::resolve_family` sends it (sequence 7, no
    /// acknowledgement asked), byte for byte what the old ipvs-only framing sent.
    #[rustfmt::skip]
    const GET_FAMILY: &[u8] = &[
        32, 0, 0, 0, 0x10, 0, 1, 0, 7, 0, 0, 0, 0, 0, 0, 0, // nlmsghdr: 32 bytes, GENL_ID_CTRL, REQUEST
        3, 1, 0, 0, // genl: GETFAMILY, version 1
        9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0, // FAMILY_NAME "IPVS\0" padded
    ];

    /// The kernel's answer (ctrl_fill_info), written out by hand and trimmed to its first two
    /// attributes: NEWFAMILY, version 2, FAMILY_NAME then FAMILY_ID 0x1a, to our port id.
    #[rustfmt::skip]
    const NEW_FAMILY: &[u8] = &[
        40, 0, 0, 0, 0x10, 0, 0, 0, 7, 0, 0, 0, 0x39, 0x30, 0, 0, // nlmsghdr: 40 bytes, port 12345
        1, 2, 0, 0, // genl: NEWFAMILY, version 2
        9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0, // FAMILY_NAME
        6, 0, 1, 0, 0x1a, 0, 0, 0, // FAMILY_ID 0x1a
    ];

    /// Two NLMSG_ERROR messages as the kernel sends them with NETLINK_CAP_ACK: an error
    /// (-EEXIST) for sequence 41 and an acknowledgement for sequence 42, each followed by the
    /// header of the request it answers.
    fn capped_errors() -> Vec<u8> {
        let mut datagram = Vec::new();
        for (sequence, code) in [(41u32, -17i32), (42, 0)] {
            datagram.extend_from_slice(&36u32.to_ne_bytes());
            datagram.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
            datagram.extend_from_slice(&0x100u16.to_ne_bytes()); // NLM_F_CAPPED
            datagram.extend_from_slice(&sequence.to_ne_bytes());
            datagram.extend_from_slice(&77u32.to_ne_bytes());
            datagram.extend_from_slice(&code.to_ne_bytes());
            datagram.extend_from_slice(&40u32.to_ne_bytes()); // the request's header
            datagram.extend_from_slice(&20u16.to_ne_bytes());
            datagram.extend_from_slice(&0x605u16.to_ne_bytes());
            datagram.extend_from_slice(&sequence.to_ne_bytes());
            datagram.extend_from_slice(&0u32.to_ne_bytes());
        }
        datagram
    }

    #[test]
    fn get_family_request_emits_the_captured_bytes() {
        let mut w = Writer::default();
        let start = w.begin_genl(GENL_ID_CTRL, NLM_F_REQUEST, 7, CTRL_CMD_GETFAMILY, 1);
        w.put_str(CTRL_ATTR_FAMILY_NAME, "IPVS");
        w.end(start);
        assert_eq!(w.as_bytes(), GET_FAMILY);
    }

    #[test]
    fn get_family_request_parses_back_to_its_fields() {
        let msgs: Vec<_> = messages(GET_FAMILY).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 1);
        let msg = msgs[0];
        assert_eq!(
            (msg.msg_type, msg.flags, msg.seq),
            (GENL_ID_CTRL, NLM_F_REQUEST, 7)
        );
        let (cmd, body) = msg.genl().unwrap();
        assert_eq!(cmd, CTRL_CMD_GETFAMILY);
        let name = find(body, CTRL_ATTR_FAMILY_NAME).unwrap().unwrap();
        assert_eq!(get_str(name).unwrap(), "IPVS");
    }

    #[test]
    fn new_family_reply_parses_and_reemits_the_same_bytes() {
        let msg = messages(NEW_FAMILY).next().unwrap().unwrap();
        let (cmd, body) = msg.genl().unwrap();
        assert_eq!(cmd, 1);
        let id = get_u16(find(body, CTRL_ATTR_FAMILY_ID).unwrap().unwrap()).unwrap();
        assert_eq!(id, 0x1a);
        // The same value written again, bar the port id that only the kernel sets.
        let mut w = Writer::default();
        let start = w.begin_genl(GENL_ID_CTRL, 0, msg.seq, 1, 2);
        w.put_str(CTRL_ATTR_FAMILY_NAME, "IPVS");
        w.put_u16(CTRL_ATTR_FAMILY_ID, id);
        w.end(start);
        assert_eq!(&w.as_bytes()[..12], &NEW_FAMILY[..12]);
        assert_eq!(&w.as_bytes()[16..], &NEW_FAMILY[16..]);
    }

    #[test]
    fn a_datagram_of_acks_and_errors_splits_by_sequence() {
        let datagram = capped_errors();
        let codes: Vec<_> = messages(&datagram)
            .map(|m| {
                let m = m.unwrap();
                assert_eq!(m.msg_type, NLMSG_ERROR);
                (m.seq, m.errno().unwrap())
            })
            .collect();
        assert_eq!(codes, [(41, 17), (42, 0)]);
    }

    #[test]
    fn writer_pads_a_payload_written_by_another_library() {
        let mut w = Writer::default();
        let start = w.begin(20, NLM_F_REQUEST | NLM_F_ACK, 7);
        w.payload(6).copy_from_slice(&[2, 32, 0, 0, 3, 0]);
        w.end(start);
        let second = w.begin(20, NLM_F_REQUEST, 8);
        w.end(second);
        assert_eq!(second, 24, "the next message starts aligned");
        let msgs: Vec<_> = messages(w.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs[0].payload, [2, 32, 0, 0, 3, 0]);
        assert_eq!(
            u32::from_ne_bytes(w.as_bytes()[..4].try_into().unwrap()),
            22
        );
        assert_eq!(msgs[1].seq, 8);
    }

    #[test]
    fn add_flags_sets_bits_in_an_earlier_message() {
        let mut w = Writer::default();
        let first = w.begin(0x20, NLM_F_REQUEST, 1);
        w.end(first);
        let last = w.begin(0x20, NLM_F_REQUEST, 2);
        w.end(last);
        w.add_flags(last, NLM_F_ACK);
        let flags: Vec<_> = messages(w.as_bytes()).map(|m| m.unwrap().flags).collect();
        assert_eq!(flags, [NLM_F_REQUEST, NLM_F_REQUEST | NLM_F_ACK]);
    }

    #[test]
    fn messages_and_attributes_walk_back() {
        let mut w = Writer::default();
        let a = w.begin_genl(0x20, NLM_F_REQUEST, 1, 4, 1);
        let nest = w.nest_begin(1);
        w.put_u16(1, 2);
        w.put_u8(2, 9);
        w.nest_end(nest);
        w.end(a);
        let b = w.begin_genl(0x20, NLM_F_REQUEST, 2, 4, 1);
        w.end(b);
        let msgs: Vec<_> = messages(w.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].seq, msgs[1].seq), (1, 2));
        let (cmd, body) = msgs[0].genl().unwrap();
        assert_eq!(cmd, 4);
        let outer: Vec<_> = attrs(body).collect::<Result<_, _>>().unwrap();
        assert_eq!(outer.len(), 1);
        let inner: Vec<_> = attrs(outer[0].1).collect::<Result<_, _>>().unwrap();
        assert_eq!(inner, vec![(1, &[2u8, 0][..]), (2, &[9u8][..])]);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        assert!(messages(&[1, 2, 3]).next().unwrap().is_err());
        let mut garbage = 400u32.to_ne_bytes().to_vec();
        garbage.extend_from_slice(&[0; 12]);
        assert!(messages(&garbage).next().unwrap().is_err());
        assert!(attrs(&[200, 0, 1, 0]).next().unwrap().is_err());
        assert!(get_u32(&[1, 2]).is_err());
        assert!(get_counter(&[1, 2, 3]).is_err());
    }
}
