//! Netlink and generic-netlink framing: just enough to write requests back to back into one
//! buffer and to walk the kernel's replies without copying them.
//!
//! ```text
//!  nlmsghdr (16)                         genlmsghdr (4)      attributes (4-byte aligned)
//! +--------+------+-------+-----+-----+-----+-----+------+------------------------------
//! | len u32|type  |flags  |seq  |pid  | cmd | ver | resv | len u16 | type u16 | value…
//! |        |u16   |u16    |u32  |u32  | u8  | u8  | u16  |
//! +--------+------+-------+-----+-----+-----+-----+------+------------------------------
//! ```
//! All header fields and most attribute values are native-endian; IPVS ports, the IPv4
//! persistence netmask and the tunnel port are big-endian and are written as raw bytes.

use crate::error::Error;

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const GENL_HDRLEN: usize = 4;

pub(crate) const NLMSG_NOOP: u16 = 1;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLMSG_OVERRUN: u16 = 4;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;

/// The controller family that resolves family names to ids (`genl ctrl`).
pub(crate) const GENL_ID_CTRL: u16 = 0x10;
pub(crate) const CTRL_CMD_GETFAMILY: u8 = 3;
pub(crate) const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub(crate) const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NLA_HDRLEN: usize = 4;
/// Attribute types carry two flag bits (nested, network byte order) that are not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

pub(crate) const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A buffer that holds one or many netlink messages, written back to back.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    /// Starts a generic-netlink message; returns its offset for [`Writer::end`].
    pub(crate) fn begin(
        &mut self,
        msg_type: u16,
        flags: u16,
        seq: u32,
        cmd: u8,
        version: u8,
    ) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by end()
        self.buf.extend_from_slice(&msg_type.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        self.buf.extend_from_slice(&[cmd, version, 0, 0]);
        start
    }

    /// Finishes the message started at `start`.
    pub(crate) fn end(&mut self, start: usize) {
        let len = u32::try_from(self.buf.len() - start).expect("a netlink message fits in u32");
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    pub(crate) fn put(&mut self, kind: u16, value: &[u8]) {
        let len = u16::try_from(NLA_HDRLEN + value.len()).expect("an attribute fits in u16");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    pub(crate) fn put_u8(&mut self, kind: u16, value: u8) {
        self.put(kind, &[value]);
    }

    pub(crate) fn put_u16(&mut self, kind: u16, value: u16) {
        self.put(kind, &value.to_ne_bytes());
    }

    pub(crate) fn put_u32(&mut self, kind: u16, value: u32) {
        self.put(kind, &value.to_ne_bytes());
    }

    /// A NUL-terminated string, as the kernel's `NLA_NUL_STRING` policy wants.
    pub(crate) fn put_str(&mut self, kind: u16, value: &str) {
        let len = u16::try_from(NLA_HDRLEN + value.len() + 1).expect("an attribute fits in u16");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    /// Opens a nested attribute. Like libnl (and so `ipvsadm`), the NESTED flag is not set:
    /// the IPVS family parses its nests liberally either way.
    pub(crate) fn nest_begin(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        start
    }

    pub(crate) fn nest_end(&mut self, start: usize) {
        let len = u16::try_from(self.buf.len() - start).expect("a nest fits in u16");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        let padded = align(self.buf.len());
        self.buf.resize(padded, 0);
    }
}

/// One message of a datagram from the kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub(crate) msg_type: u16,
    pub(crate) seq: u32,
    /// Everything after the netlink header.
    pub(crate) payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// For `NLMSG_ERROR` (and `NLMSG_DONE`): the errno the kernel reports, as a positive number;
    /// 0 is an acknowledgement.
    pub(crate) fn errno(&self) -> Result<i32, Error> {
        let bytes = self
            .payload
            .get(..4)
            .ok_or_else(|| Error::decode("error message shorter than its errno"))?;
        let code = i32::from_ne_bytes(bytes.try_into().expect("4 bytes"));
        Ok(code.checked_neg().unwrap_or(i32::MAX))
    }

    /// For generic-netlink messages: the command and the attributes after the genl header.
    pub(crate) fn genl(&self) -> Result<(u8, &'a [u8]), Error> {
        if self.payload.len() < GENL_HDRLEN {
            return Err(Error::decode(
                "generic netlink message shorter than its header",
            ));
        }
        Ok((self.payload[0], &self.payload[GENL_HDRLEN..]))
    }
}

/// Walks the messages of one datagram.
pub(crate) fn messages(mut data: &[u8]) -> impl Iterator<Item = Result<Message<'_>, Error>> {
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
            seq: u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes")),
            payload: &data[NLMSG_HDRLEN..len],
        };
        data = data.get(align(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    })
}

/// Walks a run of attributes, yielding (type without flag bits, value).
pub(crate) fn attrs(mut data: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), Error>> {
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

pub(crate) fn get_u8(value: &[u8]) -> Result<u8, Error> {
    value
        .first()
        .copied()
        .ok_or_else(|| Error::decode("u8 attribute is empty"))
}

pub(crate) fn get_u16(value: &[u8]) -> Result<u16, Error> {
    Ok(u16::from_ne_bytes(
        value
            .get(..2)
            .ok_or_else(|| Error::decode("u16 attribute too short"))?
            .try_into()
            .expect("2 bytes"),
    ))
}

pub(crate) fn get_be16(value: &[u8]) -> Result<u16, Error> {
    Ok(u16::from_be_bytes(
        value
            .get(..2)
            .ok_or_else(|| Error::decode("be16 attribute too short"))?
            .try_into()
            .expect("2 bytes"),
    ))
}

pub(crate) fn get_u32(value: &[u8]) -> Result<u32, Error> {
    Ok(u32::from_ne_bytes(
        value
            .get(..4)
            .ok_or_else(|| Error::decode("u32 attribute too short"))?
            .try_into()
            .expect("4 bytes"),
    ))
}

/// A counter that older kernels send as u32 and newer ones as u64.
pub(crate) fn get_counter(value: &[u8]) -> Result<u64, Error> {
    match value.len() {
        4 => Ok(u64::from(get_u32(value)?)),
        8 => Ok(u64::from_ne_bytes(value.try_into().expect("8 bytes"))),
        _ => Err(Error::decode("counter attribute is neither 4 nor 8 bytes")),
    }
}

pub(crate) fn get_str(value: &[u8]) -> Result<&str, Error> {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    std::str::from_utf8(&value[..end]).map_err(|_| Error::decode("string attribute is not UTF-8"))
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    #[test]
    fn writer_pads_attributes_and_patches_lengths() {
        let mut w = Writer::default();
        let start = w.begin(0x10, NLM_F_REQUEST, 7, CTRL_CMD_GETFAMILY, 1);
        w.put_str(CTRL_ATTR_FAMILY_NAME, "IPVS");
        w.end(start);
        assert_eq!(
            w.buf,
            [
                32, 0, 0, 0, 0x10, 0, 1, 0, 7, 0, 0, 0, 0, 0, 0, 0, // nlmsghdr
                3, 1, 0, 0, // genl: GETFAMILY, version 1
                9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0, // "IPVS\0" padded
            ]
        );
    }

    #[test]
    fn messages_and_attributes_walk_back() {
        let mut w = Writer::default();
        let a = w.begin(0x20, NLM_F_REQUEST, 1, 4, 1);
        let nest = w.nest_begin(1);
        w.put_u16(1, 2);
        w.put_u8(2, 9);
        w.nest_end(nest);
        w.end(a);
        let b = w.begin(0x20, NLM_F_REQUEST, 2, 4, 1);
        w.end(b);
        let msgs: Vec<_> = messages(&w.buf).collect::<Result<_, _>>().unwrap();
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
        assert!(
            messages(&[200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                .next()
                .unwrap()
                .is_err()
        );
        assert!(attrs(&[200, 0, 1, 0]).next().unwrap().is_err());
    }
}
