//! A blocking netlink socket that sends requests in pipelined batches.
//!
//! A batch goes out as one `sendmsg` holding many requests. The kernel handles every request
//! of a `sendmsg` in order, inside the syscall (rtnetlink and generic netlink alike), and
//! queues its answers to our socket in that order. Only the last request of a batch asks for
//! an acknowledgement (`NLM_F_ACK`); the others are answered only when they fail (the kernel
//! always reports an error). So when the last request's answer arrives, every earlier error
//! has arrived before it, and a request with no error is known to have succeeded. Errors are
//! matched to their request by sequence number. A batch of N requests thus costs one
//! `sendmsg` and a few `recv`s instead of N of each.
//!
//! The caller sizes the batch ([`Limits`]) so that a batch in which every request fails fits
//! the receive buffer. If it overflows anyway (`ENOBUFS`), every answer that survived is
//! already queued: they are drained without waiting, and the requests whose fate is unknown
//! are reported as [`Reply::Lost`], for the caller to settle by reading the kernel's state back.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use netlink_sys::SocketAddr;

use crate::error::Error;
use crate::frame::{
    self, Message, NLM_F_ACK, NLM_F_DUMP_INTR, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN,
    Writer,
};
use crate::sys;

/// Receive buffer per datagram. The kernel sizes dump datagrams to the largest buffer a
/// reader has offered, capped near 32 KiB, so 64 KiB never truncates one.
const RECEIVE_CHUNK: usize = 64 << 10;

/// How a socket is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// `NETLINK_ROUTE`, `NETLINK_GENERIC`, …
    pub protocol: isize,
    /// The bound on every wait for the kernel.
    pub timeout: Duration,
    /// `SO_RCVBUF` to ask for, in bytes (the kernel doubles it).
    pub receive_buffer: usize,
    /// Ask with `SO_RCVBUFFORCE` (root) past `net.core.rmem_max` first, and fail if neither
    /// that nor `SO_RCVBUF` works; otherwise the size is a best effort.
    pub force_receive_buffer: bool,
    /// `SO_SNDBUF` to ask for, best effort; `None` keeps the default.
    pub send_buffer: Option<usize>,
    /// `NETLINK_CAP_ACK` (errors carry only the failed request's header) and
    /// `NETLINK_GET_STRICT_CHK` (the kernel filters dumps), where the kernel has them.
    pub cap_ack_and_strict_check: bool,
}

/// How many requests go into one `sendmsg`, at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per batch.
    pub requests: usize,
    /// Bytes per batch: no request is started once this many are written (the kernel
    /// refuses a message larger than its send buffer).
    pub bytes: usize,
}

/// The fate of one request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Done: acknowledged, or unanswered before the acknowledged last request.
    Done,
    /// The kernel refused it with this errno.
    Failed(i32),
    /// Its answer was lost to a receive-queue overrun; the kernel's state tells.
    Lost,
}

/// A batch that could not be finished: the socket failed or the kernel went silent.
#[derive(Debug)]
pub struct BatchError {
    /// What went wrong.
    pub error: Error,
    /// One entry per request that was written into the batch: its answer, if one arrived.
    pub answers: Vec<Option<Reply>>,
}

/// What a reply handler wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading until the acknowledgement, the error or the dump's end.
    Continue,
    /// This was the answer: stop reading.
    Stop,
}

/// How a single request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// An acknowledgement (error 0).
    Ack,
    /// The kernel refused the request with this errno.
    Failed(i32),
    /// A dump's DONE, with the errno it may carry (0 when none).
    Done(i32),
    /// The reply handler said [`Flow::Stop`].
    Stopped,
}

/// The end of a single request, and what its replies said on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// How it ended.
    pub end: End,
    /// Some reply carried `NLM_F_DUMP_INTR`: a concurrent change interrupted the dump.
    pub interrupted: bool,
}

/// A netlink socket in the network namespace of the thread that opened it.
pub struct Socket {
    fd: netlink_sys::Socket,
    timeout: Duration,
    sequence: u32,
    tx: Writer,
    rx: Vec<u8>,
    overruns: u64,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("sequence", &self.sequence)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Socket {
    /// Opens, binds and connects a netlink socket to the kernel.
    pub fn open(options: &Options) -> Result<Self, Error> {
        let mut socket = netlink_sys::Socket::new(options.protocol)
            .map_err(Error::socket("socket(AF_NETLINK)"))?;
        socket.bind_auto().map_err(Error::socket("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(Error::socket("connect"))?;
        let fd = socket.as_fd();
        sys::set_timeout(fd, libc::SO_RCVTIMEO, options.timeout)
            .map_err(Error::socket("SO_RCVTIMEO"))?;
        sys::set_timeout(fd, libc::SO_SNDTIMEO, options.timeout)
            .map_err(Error::socket("SO_SNDTIMEO"))?;
        if options.force_receive_buffer {
            sys::set_int(fd, libc::SO_RCVBUFFORCE, options.receive_buffer)
                .or_else(|_| sys::set_int(fd, libc::SO_RCVBUF, options.receive_buffer))
                .map_err(Error::socket("SO_RCVBUF"))?;
        } else {
            // Larger buffers are an optimisation; callers read back what the kernel granted.
            let _ = sys::set_int(fd, libc::SO_RCVBUF, options.receive_buffer);
        }
        if let Some(bytes) = options.send_buffer {
            let _ = sys::set_int(fd, libc::SO_SNDBUF, bytes);
        }
        if options.cap_ack_and_strict_check {
            // Both are optimisations with fallbacks (older kernels): errors carry only the
            // failed request's header, and dumps are filtered by the kernel.
            let _ = socket.set_cap_ack(true);
            let _ = socket.set_netlink_get_strict_chk(true);
        }
        // A fresh, unpredictable start makes replies to an earlier socket's requests
        // impossible to mistake for ours.
        let sequence = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |t| t.subsec_nanos());
        Ok(Self {
            fd: socket,
            timeout: options.timeout,
            sequence,
            tx: Writer::default(),
            rx: Vec::with_capacity(RECEIVE_CHUNK),
            overruns: 0,
        })
    }

    /// The bound on every wait.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The receive buffer the kernel granted (`SO_RCVBUF` read back).
    pub fn receive_buffer(&self) -> Result<usize, Error> {
        sys::get_int(self.fd.as_fd(), libc::SO_RCVBUF).map_err(Error::socket("SO_RCVBUF"))
    }

    /// The send buffer the kernel granted (`SO_SNDBUF` read back).
    pub fn send_buffer(&self) -> Result<usize, Error> {
        sys::get_int(self.fd.as_fd(), libc::SO_SNDBUF).map_err(Error::socket("SO_SNDBUF"))
    }

    /// Sets `SO_RCVBUF` exactly as given (the kernel doubles it and applies its minimum):
    /// for the tests of the overrun path, which shrink it until a batch of errors overruns.
    pub fn set_receive_buffer_exact(&self, bytes: usize) -> Result<(), Error> {
        sys::set_int(self.fd.as_fd(), libc::SO_RCVBUF, bytes).map_err(Error::socket("SO_RCVBUF"))
    }

    /// How many batches so far had answers lost to a receive-queue overrun.
    #[must_use]
    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    fn next_sequence(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }

    /// Sends one request, written by `encode` with the sequence number given, and hands every
    /// reply message to it (not acknowledgements, errors or DONE) to `on_reply`, until the
    /// request is acknowledged, refused, its dump ends, or `on_reply` says [`Flow::Stop`].
    /// Messages with other sequence numbers (late answers to an abandoned request) are skipped.
    ///
    /// The request's flags are the caller's: `NLM_F_ACK` for an acknowledgement, `NLM_F_DUMP`
    /// for a dump.
    pub fn request<E: From<Error>>(
        &mut self,
        encode: impl FnOnce(&mut Writer, u32),
        mut on_reply: impl FnMut(&Message<'_>) -> Result<Flow, E>,
    ) -> Result<Answer, E> {
        let sequence = self.next_sequence();
        self.tx.clear();
        encode(&mut self.tx, sequence);
        self.send()?;
        let mut interrupted = false;
        loop {
            self.receive(0).map_err(|e| self.receive_error(e))?;
            for msg in frame::messages(&self.rx) {
                let msg = msg?;
                if msg.seq != sequence {
                    tracing::debug!(seq = msg.seq, "ignoring a stale netlink message");
                    continue;
                }
                interrupted |= msg.flags & NLM_F_DUMP_INTR != 0;
                let end = match msg.msg_type {
                    NLMSG_NOOP => continue,
                    NLMSG_ERROR => match msg.errno()? {
                        0 => End::Ack,
                        errno => End::Failed(errno),
                    },
                    // A dump's end; it may carry the dump's error.
                    NLMSG_DONE if msg.payload.len() >= 4 => End::Done(msg.errno()?),
                    NLMSG_DONE => End::Done(0),
                    NLMSG_OVERRUN => return Err(Error::decode("netlink overrun").into()),
                    _ => match on_reply(&msg)? {
                        Flow::Continue => continue,
                        Flow::Stop => End::Stopped,
                    },
                };
                return Ok(Answer { end, interrupted });
            }
        }
    }

    /// Sends up to `count` requests as one batch and returns one [`Reply`] per request sent
    /// (at least one when `count` > 0; fewer than `count` when `limits` cut the batch short:
    /// call again for the rest). `encode(i, writer, seq)` writes request `i` with the
    /// sequence number given and without `NLM_F_ACK`: the batch asks for it on its last
    /// request only.
    pub fn batch(
        &mut self,
        limits: Limits,
        count: usize,
        mut encode: impl FnMut(usize, &mut Writer, u32),
    ) -> Result<Vec<Reply>, BatchError> {
        let first = self.sequence.wrapping_add(1);
        self.tx.clear();
        let mut sent = 0;
        let mut last_start = 0;
        while sent < count && sent < limits.requests.max(1) && self.tx.len() < limits.bytes {
            last_start = self.tx.len();
            let sequence = self.next_sequence();
            encode(sent, &mut self.tx, sequence);
            sent += 1;
        }
        if sent == 0 {
            return Ok(Vec::new());
        }
        // Only the last request asks for an acknowledgement: it closes the batch.
        self.tx.add_flags(last_start, NLM_F_ACK);
        let mut answers = vec![None; sent];
        let outcome = self.send().and_then(|()| self.collect(first, &mut answers));
        match outcome {
            Ok(false) => Ok(answers
                .into_iter()
                .map(|a| a.unwrap_or(Reply::Done))
                .collect()),
            Ok(true) => {
                self.overruns += 1;
                tracing::warn!(
                    requests = sent,
                    "netlink receive queue overrun; the caller reads the kernel's state back"
                );
                Ok(answers
                    .into_iter()
                    .map(|a| match a {
                        None | Some(Reply::Done) => Reply::Lost,
                        Some(other) => other,
                    })
                    .collect())
            }
            Err(error) => Err(BatchError { error, answers }),
        }
    }

    /// [`Socket::batch`] until all `count` requests are sent; one [`Reply`] per request.
    pub fn batch_all(
        &mut self,
        limits: Limits,
        count: usize,
        mut encode: impl FnMut(usize, &mut Writer, u32),
    ) -> Result<Vec<Reply>, Error> {
        let mut replies = Vec::with_capacity(count);
        while replies.len() < count {
            let done = replies.len();
            let batch = self
                .batch(limits, count - done, |i, w, seq| encode(done + i, w, seq))
                .map_err(|e| e.error)?;
            replies.extend(batch);
        }
        Ok(replies)
    }

    /// Reads the answers of one batch whose sequence numbers start at `first`, until the
    /// acknowledgement of its last request. Returns whether the receive queue overran.
    fn collect(&mut self, first: u32, answers: &mut [Option<Reply>]) -> Result<bool, Error> {
        let mut overrun = false;
        let mut finished = false;
        while !finished {
            // The kernel handles a batch inside our sendmsg, so once the queue has overrun,
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
                Err(e) => return Err(self.receive_error(e)),
            }
            for msg in frame::messages(&self.rx) {
                let msg = msg?;
                if msg.msg_type != NLMSG_ERROR {
                    continue;
                }
                let index = msg.seq.wrapping_sub(first) as usize;
                let Some(answer) = answers.get_mut(index) else {
                    continue;
                };
                *answer = Some(match msg.errno()? {
                    0 => Reply::Done,
                    errno => Reply::Failed(errno),
                });
                finished |= index + 1 == answers.len();
            }
        }
        Ok(overrun)
    }

    fn send(&mut self) -> Result<(), Error> {
        // Netlink sends a datagram whole or not at all.
        let sent = self
            .fd
            .send(self.tx.as_bytes(), 0)
            .map_err(Error::socket("sendmsg"))?;
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
            match self.fd.recv(&mut self.rx, libc::MSG_TRUNC | flags) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
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

    fn receive_error(&self, error: io::Error) -> Error {
        if matches!(
            error.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            Error::Timeout(self.timeout)
        } else {
            Error::Socket {
                what: "recv",
                source: error,
            }
        }
    }
}
