//! A blocking rtnetlink socket that sends requests in pipelined batches.
//!
//! A batch goes out as one `sendmsg` holding many requests. The kernel handles every request of
//! a `sendmsg` in order, inside the syscall, and queues its answers to our socket in that order.
//! Only the last request of a batch asks for an acknowledgement (`NLM_F_ACK`); the others are
//! answered only when they fail (the kernel always reports an error). So when the last
//! request's answer arrives, every earlier error has arrived before it, and a request with no
//! error is known to have succeeded. Errors are matched to their request by sequence number.
//! A batch of N requests thus costs one `sendmsg` and a few `recv`s instead of N of each.
//!
//! The receive buffer is sized so that a batch in which every request fails still fits. If it
//! ever overflows anyway (`ENOBUFS`), the requests whose fate is unknown are reported as
//! [`Reply::Lost`] and the caller settles them by reading the kernel's state back.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::error::Error;
use crate::request;

/// Requests per `sendmsg`. Each failed request costs the receive queue about 1 KiB (an skb),
/// so a batch fits the buffer below even if every request in it fails.
pub(crate) const BATCH: usize = 512;
const RECEIVE_BUFFER: usize = 4 << 20;
/// Dumps arrive in skbs of at most 32 KiB; a larger buffer never truncates one.
const RECEIVE_CHUNK: usize = 64 << 10;
/// How long to wait for the kernel before giving up on a request.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

/// The fate of one request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    Done,
    /// The kernel refused it with this errno.
    Failed(i32),
    /// Its answer was lost to a receive-queue overrun; the kernel's state tells.
    Lost,
}

/// One request of a batch: a message and its `NLM_F_*` flags (without REQUEST and ACK).
#[derive(Debug)]
pub(crate) struct Request {
    pub message: RouteNetlinkMessage,
    pub flags: u16,
}

pub(crate) struct Connection {
    socket: Socket,
    sequence: u32,
    tx: Vec<u8>,
    rx: Vec<u8>,
    /// Batches whose answers overran the receive queue, for the tests of that path.
    #[cfg(test)]
    pub(crate) overruns: usize,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

fn socket_error(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Socket { what, source }
}

impl Connection {
    /// Opens a route netlink socket in the calling thread's network namespace.
    pub(crate) fn open() -> Result<Self, Error> {
        let mut socket =
            Socket::new(NETLINK_ROUTE).map_err(socket_error("socket(NETLINK_ROUTE)"))?;
        socket.bind_auto().map_err(socket_error("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(socket_error("connect"))?;
        crate::sys::set_receive_timeout(socket.as_fd(), TIMEOUT)
            .map_err(socket_error("SO_RCVTIMEO"))?;
        crate::sys::set_receive_buffer(socket.as_fd(), RECEIVE_BUFFER)
            .map_err(socket_error("SO_RCVBUF"))?;
        // Both are optimisations with fallbacks (older kernels): errors carry only the failed
        // request's header, and dumps are filtered by the kernel.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_netlink_get_strict_chk(true);
        // A fresh, unpredictable start makes replies to an earlier handle's requests
        // impossible to mistake for ours.
        let sequence = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |t| t.subsec_nanos());
        Ok(Self {
            socket,
            sequence,
            tx: Vec::with_capacity(64 << 10),
            rx: Vec::with_capacity(RECEIVE_CHUNK),
            #[cfg(test)]
            overruns: 0,
        })
    }

    /// Shrinks the receive buffer to the kernel's minimum so that a batch of errors overruns
    /// it: the tests of the overrun path use this.
    #[cfg(test)]
    pub(crate) fn starve_receive_buffer_for_tests(&self) {
        crate::sys::set_receive_buffer_exact(self.socket.as_fd(), 0).expect("SO_RCVBUF");
    }

    fn next_sequence(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }

    /// Sends one acknowledged request; returns the messages that answered it (for a GET) or
    /// the kernel's errno as [`Error::Kernel`] named by `command`.
    pub(crate) fn call(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        command: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        let sequence = self.next_sequence();
        self.tx.clear();
        request::append(
            &mut self.tx,
            message,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            sequence,
        );
        self.send()?;
        let mut answers = Vec::new();
        loop {
            self.receive(0).map_err(|e| receive_error(e, command))?;
            for packet in Packets::new(&self.rx) {
                let packet = packet.map_err(|reason| Error::Decode {
                    command: command(),
                    reason,
                })?;
                if packet.header.sequence_number != sequence {
                    continue;
                }
                match packet.payload {
                    NetlinkPayload::InnerMessage(message) => answers.push(message),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(answers),
                    NetlinkPayload::Error(e) => {
                        return Err(Error::Kernel {
                            command: command(),
                            source: e.to_io(),
                        });
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    _ => {}
                }
            }
        }
    }

    /// Dumps (`NLM_F_DUMP`); returns the messages and whether the kernel flagged the dump as
    /// interrupted by a concurrent change (`NLM_F_DUMP_INTR`), in which case it may be
    /// inconsistent and should be read again.
    pub(crate) fn dump(
        &mut self,
        message: RouteNetlinkMessage,
        command: &dyn Fn() -> String,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), Error> {
        let sequence = self.next_sequence();
        self.tx.clear();
        request::append(&mut self.tx, message, NLM_F_REQUEST | NLM_F_DUMP, sequence);
        self.send()?;
        let mut answers = Vec::new();
        let mut interrupted = false;
        loop {
            self.receive(0).map_err(|e| receive_error(e, command))?;
            for packet in Packets::new(&self.rx) {
                let packet = packet.map_err(|reason| Error::Decode {
                    command: command(),
                    reason,
                })?;
                if packet.header.sequence_number != sequence {
                    continue;
                }
                interrupted |= packet.header.flags & NLM_F_DUMP_INTR != 0;
                match packet.payload {
                    NetlinkPayload::InnerMessage(message) => answers.push(message),
                    NetlinkPayload::Done(_) => return Ok((answers, interrupted)),
                    NetlinkPayload::Error(e) => {
                        return Err(Error::Kernel {
                            command: command(),
                            source: e.to_io(),
                        });
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends `requests` in batches of [`BATCH`] per `sendmsg`; returns one [`Reply`] per
    /// request, in order. `Err` only when the socket itself fails or the kernel goes silent.
    pub(crate) fn batch(
        &mut self,
        requests: impl IntoIterator<Item = Request>,
        command: &dyn Fn() -> String,
    ) -> Result<Vec<Reply>, Error> {
        let mut replies = Vec::new();
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            let first = self.sequence.wrapping_add(1);
            self.tx.clear();
            let mut count = 0usize;
            while count < BATCH {
                let Some(request) = requests.next() else {
                    break;
                };
                let last = count + 1 == BATCH || requests.peek().is_none();
                let ack = if last { NLM_F_ACK } else { 0 };
                let sequence = self.next_sequence();
                request::append(
                    &mut self.tx,
                    request.message,
                    NLM_F_REQUEST | ack | request.flags,
                    sequence,
                );
                count += 1;
            }
            self.send()?;
            let start = replies.len();
            replies.resize(start + count, Reply::Done);
            self.collect(first, &mut replies[start..], command)?;
        }
        Ok(replies)
    }

    /// Reads the answers of one batch whose sequence numbers start at `first`, until the
    /// acknowledgement of its last request.
    fn collect(
        &mut self,
        first: u32,
        replies: &mut [Reply],
        command: &dyn Fn() -> String,
    ) -> Result<(), Error> {
        let mut overrun = false;
        let mut finished = false;
        while !finished {
            // rtnetlink handles a batch inside our sendmsg, so once the queue has overrun,
            // every answer that survived is already queued: drain without waiting, since the
            // last acknowledgement may be among the lost.
            let flags = if overrun { libc::MSG_DONTWAIT } else { 0 };
            match self.receive(flags) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    overrun = true;
                    continue;
                }
                Err(e) if overrun && e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(receive_error(e, command)),
            }
            for packet in Packets::new(&self.rx) {
                let packet = packet.map_err(|reason| Error::Decode {
                    command: command(),
                    reason,
                })?;
                let NetlinkPayload::Error(error) = packet.payload else {
                    continue;
                };
                let index = packet.header.sequence_number.wrapping_sub(first) as usize;
                let Some(reply) = replies.get_mut(index) else {
                    continue;
                };
                if let Some(code) = error.code {
                    *reply = Reply::Failed(code.get().saturating_abs());
                }
                finished |= index + 1 == replies.len();
            }
        }
        if overrun {
            #[cfg(test)]
            {
                self.overruns += 1;
            }
            tracing::warn!(
                requests = replies.len(),
                "rtnetlink receive queue overrun; reading the kernel's state back"
            );
            for reply in replies.iter_mut().filter(|r| **r == Reply::Done) {
                *reply = Reply::Lost;
            }
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), Error> {
        let sent = self
            .socket
            .send(&self.tx, 0)
            .map_err(socket_error("sendmsg"))?;
        if sent == self.tx.len() {
            Ok(())
        } else {
            Err(Error::Socket {
                what: "sendmsg",
                source: io::Error::from(io::ErrorKind::WriteZero),
            })
        }
    }

    /// Reads one datagram (one or more netlink messages) into `rx`.
    fn receive(&mut self, flags: libc::c_int) -> io::Result<()> {
        loop {
            self.rx.clear();
            match self.socket.recv(&mut self.rx, libc::MSG_TRUNC | flags) {
                Ok(n) if n > self.rx.capacity() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink datagram truncated",
                    ));
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn receive_error(error: io::Error, command: &dyn Fn() -> String) -> Error {
    if error.kind() == io::ErrorKind::WouldBlock {
        Error::Timeout {
            command: command(),
            after: TIMEOUT,
        }
    } else {
        Error::Socket {
            what: "recv",
            source: error,
        }
    }
}

/// The netlink messages in one datagram.
struct Packets<'a> {
    rest: &'a [u8],
}

impl<'a> Packets<'a> {
    fn new(datagram: &'a [u8]) -> Self {
        Self { rest: datagram }
    }
}

impl Iterator for Packets<'_> {
    type Item = Result<NetlinkMessage<RouteNetlinkMessage>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = NetlinkBuffer::new_checked(self.rest)
            .map(|b| b.length() as usize)
            .map_err(|e| e.to_string())
            .and_then(|len| {
                let bytes = self
                    .rest
                    .get(..len)
                    .ok_or("netlink message longer than its datagram")?;
                let packet = NetlinkMessage::deserialize(bytes).map_err(|e| e.to_string())?;
                Ok((packet, len))
            });
        match parsed {
            Ok((packet, len)) => {
                self.rest = self.rest.get(len.next_multiple_of(4)..).unwrap_or_default();
                Some(Ok(packet))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_splits_a_datagram_of_acks_and_errors() {
        // Two NLMSG_ERROR messages as the kernel sends them with NETLINK_CAP_ACK: an error
        // (-EEXIST) for sequence 41 and an acknowledgement for sequence 42, each followed by
        // the header of the request it answers.
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
        let packets: Vec<_> = Packets::new(&datagram)
            .collect::<Result<_, _>>()
            .expect("parses");
        assert_eq!(packets.len(), 2);
        let codes: Vec<_> = packets
            .iter()
            .map(|p| match &p.payload {
                NetlinkPayload::Error(e) => (p.header.sequence_number, e.raw_code()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(codes, [(41, -17), (42, 0)]);
    }

    #[test]
    fn packets_reports_garbage_instead_of_panicking() {
        let mut garbage = 400u32.to_ne_bytes().to_vec();
        garbage.extend_from_slice(&[0; 12]);
        assert!(Packets::new(&garbage).next().expect("one item").is_err());
    }
}
