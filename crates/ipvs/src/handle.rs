//! The handle: one generic-netlink socket to the kernel's IPVS family, in the network namespace
//! of the thread that opened it.
//!
//! Changes are pipelined: [`Handle::apply`] writes many requests back to back into one
//! `sendmsg`, without asking for acknowledgements except on the last one. The kernel handles
//! the messages of a `sendmsg` in order, inside the call, and answers only the failures (and
//! the last request), so one receive usually confirms a whole window; a failure is matched to
//! its request by sequence number.

use crate::codec::{
    self, CMD_FLUSH, CMD_GET_CONFIG, CMD_GET_DEST, CMD_GET_INFO, CMD_GET_SERVICE, CMD_ZERO,
};
use crate::config::{Info, Timeouts};
use crate::dest::{RealServer, RealServerEntry};
use crate::error::{Error, Target};
use crate::netlink::{
    self, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_CMD_GETFAMILY, GENL_ID_CTRL, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, Writer,
};
use crate::op::Op;
use crate::service::{ServiceKey, VirtualServer, VirtualServerEntry};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::Duration;

/// The default bound on every wait for the kernel.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Receive buffer per datagram. The kernel sizes dump datagrams to the largest buffer a reader
/// has offered, capped near 32 KiB, so 64 KiB never truncates one.
const RECV_BUF: usize = 64 * 1024;
/// Socket buffers asked for; the kernel caps them at `net.core.[rw]mem_max` (doubled).
const SOCKET_BUF: usize = 8 * 1024 * 1024;
/// What one unanswered error costs in the receive buffer (the skb's truesize, rounded up): a
/// window of requests may all fail, and every error must fit or it is lost.
const ERROR_TRUESIZE: usize = 1024;

/// A virtual server with its real servers, as a full-table dump returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    /// The virtual server.
    pub service: VirtualServerEntry,
    /// Its real servers.
    pub real_servers: Vec<RealServerEntry>,
}

#[derive(Debug)]
struct Connection {
    socket: Socket,
    family_id: u16,
    /// Requests per `sendmsg` in [`Handle::apply`].
    window: usize,
    /// Bytes per `sendmsg`: the kernel refuses a message larger than its send buffer.
    max_batch: usize,
}

/// How a request is answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// An acknowledgement (error 0) or an error.
    Ack,
    /// One reply message or an error.
    One,
    /// Reply messages until DONE, or an error.
    Dump,
}

/// Why a request failed: the kernel said no (the socket is fine), or the socket broke.
enum Failure {
    Errno(i32),
    Broken(Error),
}

/// A handle on the IPVS table of one network namespace: the namespace of the thread that
/// calls [`Handle::new`].
///
/// Blocking: every call sends its requests and waits, at most the handle's timeout per
/// receive, for the kernel. Meant to live on one dedicated thread (`Handle` is `Send`). If the
/// socket fails (timeout, lost messages, I/O error) it is dropped, and the next call opens and
/// resolves a new one.
#[derive(Debug)]
pub struct Handle {
    connection: Option<Connection>,
    timeout: Duration,
    seq: u32,
    writer: Writer,
    recv_buf: Vec<u8>,
}

impl Handle {
    /// Opens a socket and resolves the "IPVS" family, waiting at most [`DEFAULT_TIMEOUT`].
    ///
    /// Fails with [`Error::NotAvailable`] when the kernel has no IPVS.
    pub fn new() -> Result<Handle, Error> {
        Handle::with_timeout(DEFAULT_TIMEOUT)
    }

    /// The same, with another bound on each wait.
    pub fn with_timeout(timeout: Duration) -> Result<Handle, Error> {
        let mut handle = Handle {
            connection: None,
            timeout,
            seq: 1,
            writer: Writer::default(),
            recv_buf: vec![0; RECV_BUF],
        };
        handle.connect()?;
        Ok(handle)
    }

    fn connect(&mut self) -> Result<&Connection, Error> {
        if self.connection.is_none() {
            let socket = Socket::new(
                Domain::from(libc::AF_NETLINK),
                Type::from(libc::SOCK_RAW),
                Some(Protocol::from(libc::NETLINK_GENERIC)),
            )
            .map_err(Error::Io)?;
            socket
                .set_read_timeout(Some(self.timeout))
                .map_err(Error::Io)?;
            socket
                .set_write_timeout(Some(self.timeout))
                .map_err(Error::Io)?;
            // Larger buffers are an optimisation; what the kernel grants is read back below.
            let _ = socket.set_recv_buffer_size(SOCKET_BUF);
            let _ = socket.set_send_buffer_size(SOCKET_BUF);
            let rcvbuf = socket.recv_buffer_size().map_err(Error::Io)?;
            let sndbuf = socket.send_buffer_size().map_err(Error::Io)?;
            let family_id = self.resolve_family(&socket)?;
            let window = (rcvbuf / ERROR_TRUESIZE).clamp(16, 4096);
            let max_batch = (sndbuf / 2).clamp(4096, 1 << 20);
            tracing::debug!(
                family_id,
                window,
                max_batch,
                rcvbuf,
                sndbuf,
                "IPVS netlink socket open"
            );
            self.connection = Some(Connection {
                socket,
                family_id,
                window,
                max_batch,
            });
        }
        Ok(self.connection.as_ref().expect("just set"))
    }

    /// `genl ctrl get name IPVS`: the family id is per boot, resolved per handle.
    fn resolve_family(&mut self, socket: &Socket) -> Result<u16, Error> {
        let seq = self.next_seq(1);
        self.writer.buf.clear();
        let start = self
            .writer
            .begin(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY, 1);
        self.writer
            .put_str(CTRL_ATTR_FAMILY_NAME, codec::FAMILY_NAME);
        self.writer.end(start);
        send(socket, &self.writer.buf)?;
        loop {
            let len = recv(socket, &mut self.recv_buf, self.timeout)?;
            for msg in netlink::messages(&self.recv_buf[..len]) {
                let msg = msg?;
                if msg.seq != seq {
                    continue;
                }
                if msg.msg_type == NLMSG_ERROR {
                    return match msg.errno()? {
                        libc::ENOENT => Err(Error::NotAvailable),
                        errno => Err(Error::Io(io::Error::from_raw_os_error(errno))),
                    };
                }
                let (_, body) = msg.genl()?;
                for attr in netlink::attrs(body) {
                    let (kind, value) = attr?;
                    if kind == CTRL_ATTR_FAMILY_ID {
                        return netlink::get_u16(value);
                    }
                }
                return Err(Error::decode("family reply without an id"));
            }
        }
    }

    fn next_seq(&mut self, count: usize) -> u32 {
        let first = self.seq;
        // Wrapping is fine: replies are matched by distance from the window's first number.
        self.seq = self
            .seq
            .wrapping_add(u32::try_from(count).unwrap_or(u32::MAX));
        first
    }

    /// Sends one request and hands each reply message's (command, attributes) to `on_reply`.
    fn request(
        &mut self,
        expect: Expect,
        build: impl FnOnce(&mut Writer, u16, u16, u32),
        mut on_reply: impl FnMut(u8, &[u8]) -> Result<(), Error>,
    ) -> Result<(), Failure> {
        self.connect().map_err(Failure::Broken)?;
        let seq = self.next_seq(1);
        let Handle {
            connection,
            writer,
            recv_buf,
            timeout,
            ..
        } = self;
        let conn = connection.as_ref().expect("connected above");
        let flags = match expect {
            Expect::Ack => NLM_F_REQUEST | NLM_F_ACK,
            Expect::One => NLM_F_REQUEST,
            Expect::Dump => NLM_F_REQUEST | NLM_F_DUMP,
        };
        writer.buf.clear();
        build(writer, conn.family_id, flags, seq);
        let outcome = (|| -> Result<Result<(), i32>, Error> {
            send(&conn.socket, &writer.buf)?;
            loop {
                let len = recv(&conn.socket, recv_buf, *timeout)?;
                for msg in netlink::messages(&recv_buf[..len]) {
                    let msg = msg?;
                    if msg.seq != seq {
                        tracing::debug!(seq = msg.seq, "ignoring a stale netlink message");
                        continue;
                    }
                    match msg.msg_type {
                        NLMSG_NOOP => {}
                        NLMSG_ERROR => {
                            let errno = msg.errno()?;
                            return Ok(if errno == 0 { Ok(()) } else { Err(errno) });
                        }
                        NLMSG_DONE => {
                            // A dump's end; it may carry the dump's error.
                            let errno = if msg.payload.len() >= 4 {
                                msg.errno()?
                            } else {
                                0
                            };
                            return Ok(if errno == 0 { Ok(()) } else { Err(errno) });
                        }
                        NLMSG_OVERRUN => return Err(Error::decode("netlink overrun")),
                        _ => {
                            let (cmd, body) = msg.genl()?;
                            on_reply(cmd, body)?;
                            if expect == Expect::One {
                                return Ok(Ok(()));
                            }
                        }
                    }
                }
            }
        })();
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(errno)) => Err(Failure::Errno(errno)),
            Err(err) => {
                self.drop_socket(&err);
                Err(Failure::Broken(err))
            }
        }
    }

    fn drop_socket(&mut self, why: &Error) {
        tracing::warn!(error = %why, "dropping the IPVS netlink socket; the next call opens a new one");
        self.connection = None;
    }

    /// Applies many changes, pipelined: `ipvsadm -R`, but many requests per `sendmsg`.
    ///
    /// Returns one result per op, in order. A failing op does not stop the others; each error
    /// names its op as an `ipvsadm` line. Ops are applied in order, so a real server may follow
    /// its virtual server in the same call.
    pub fn apply(&mut self, ops: &[Op]) -> Vec<Result<(), Error>> {
        let mut results: Vec<Result<(), Error>> = Vec::with_capacity(ops.len());
        while results.len() < ops.len() {
            let done = results.len();
            if let Err(err) = self.connect() {
                results.extend(ops[done..].iter().map(|_| Err(replicate(&err))));
                break;
            }
            let window = self.apply_window(&ops[done..]);
            results.extend(window);
        }
        results
    }

    /// Sends as many of `ops` as fit in one window and returns their results.
    fn apply_window(&mut self, ops: &[Op]) -> Vec<Result<(), Error>> {
        let Handle {
            connection,
            writer,
            recv_buf,
            timeout,
            seq,
            ..
        } = self;
        let conn = connection.as_ref().expect("connected by apply");
        let base = *seq;
        writer.buf.clear();
        let mut count = 0;
        let mut last_start = 0;
        while count < ops.len() && count < conn.window && writer.buf.len() < conn.max_batch {
            last_start = writer.buf.len();
            let op_seq = base.wrapping_add(u32::try_from(count).expect("window fits u32"));
            codec::encode_op(writer, conn.family_id, NLM_F_REQUEST, op_seq, &ops[count]);
            count += 1;
        }
        *seq = base.wrapping_add(u32::try_from(count).expect("window fits u32"));
        // Only the last request asks for an acknowledgement: it closes the window.
        let flags_at = last_start + 6;
        let flags =
            u16::from_ne_bytes([writer.buf[flags_at], writer.buf[flags_at + 1]]) | NLM_F_ACK;
        writer.buf[flags_at..flags_at + 2].copy_from_slice(&flags.to_ne_bytes());

        let ops = &ops[..count];
        let mut answers: Vec<Option<Result<(), Error>>> = (0..count).map(|_| None).collect();
        let outcome = (|| -> Result<(), Error> {
            send(&conn.socket, &writer.buf)?;
            loop {
                let len = recv(&conn.socket, recv_buf, *timeout)?;
                let mut closed = false;
                for msg in netlink::messages(&recv_buf[..len]) {
                    let msg = msg?;
                    let k = msg.seq.wrapping_sub(base) as usize;
                    if msg.msg_type != NLMSG_ERROR || k >= count {
                        continue;
                    }
                    let errno = msg.errno()?;
                    answers[k] = Some(if errno == 0 {
                        Ok(())
                    } else {
                        Err(op_error(errno, &ops[k]))
                    });
                    closed |= k == count - 1;
                }
                if closed {
                    return Ok(());
                }
            }
        })();
        match outcome {
            // Unanswered requests before the last one succeeded: failures are always answered.
            Ok(()) => answers.into_iter().map(|a| a.unwrap_or(Ok(()))).collect(),
            Err(err) => {
                let sent = !matches!(err, Error::Io(_)) || answers.iter().any(Option::is_some);
                let results = answers
                    .into_iter()
                    .zip(ops)
                    .map(|(a, op)| {
                        a.unwrap_or_else(|| {
                            if sent {
                                Err(Error::Unconfirmed {
                                    object: op.to_string(),
                                })
                            } else {
                                Err(replicate(&err))
                            }
                        })
                    })
                    .collect();
                self.drop_socket(&err);
                results
            }
        }
    }

    #[allow(
        clippy::needless_pass_by_value,
        reason = "callers build the op for this call"
    )]
    fn apply_one(&mut self, op: Op) -> Result<(), Error> {
        self.apply(std::slice::from_ref(&op))
            .pop()
            .expect("one result per op")
    }

    /// `ipvsadm -A`: adds a virtual server.
    pub fn add_service(&mut self, service: &VirtualServer) -> Result<(), Error> {
        self.apply_one(Op::AddService(service.clone()))
    }

    /// `ipvsadm -E`: replaces a virtual server's scheduler, persistence and flags.
    pub fn update_service(&mut self, service: &VirtualServer) -> Result<(), Error> {
        self.apply_one(Op::UpdateService(service.clone()))
    }

    /// `ipvsadm -D`: deletes a virtual server with its real servers.
    pub fn delete_service(&mut self, key: &ServiceKey) -> Result<(), Error> {
        self.apply_one(Op::DeleteService(*key))
    }

    /// `ipvsadm -a`: adds a real server to a virtual server.
    pub fn add_real_server(
        &mut self,
        service: &ServiceKey,
        server: &RealServer,
    ) -> Result<(), Error> {
        self.apply_one(Op::AddDest(*service, *server))
    }

    /// `ipvsadm -e`: changes a real server's forwarding, weight and thresholds.
    pub fn update_real_server(
        &mut self,
        service: &ServiceKey,
        server: &RealServer,
    ) -> Result<(), Error> {
        self.apply_one(Op::UpdateDest(*service, *server))
    }

    /// `ipvsadm -d`: removes a real server.
    pub fn delete_real_server(
        &mut self,
        service: &ServiceKey,
        addr: SocketAddr,
    ) -> Result<(), Error> {
        self.apply_one(Op::DeleteDest(*service, addr))
    }

    /// `ipvsadm -Ln` (the virtual servers): every virtual server with its counters.
    pub fn services(&mut self) -> Result<Vec<VirtualServerEntry>, Error> {
        let mut out = Vec::new();
        self.request(
            Expect::Dump,
            |w, fam, flags, seq| codec::encode_simple(w, fam, flags, seq, CMD_GET_SERVICE, None),
            |_, body| {
                out.push(codec::decode_service(body)?);
                Ok(())
            },
        )
        .map_err(|f| failure(f, "-L -n".to_owned(), Target::Other))?;
        Ok(out)
    }

    /// `ipvsadm -Ln -t <addr>` (the virtual server alone): one virtual server, if it exists.
    pub fn service(&mut self, key: &ServiceKey) -> Result<Option<VirtualServerEntry>, Error> {
        let mut out = None;
        let result = self.request(
            Expect::One,
            |w, fam, flags, seq| {
                codec::encode_simple(w, fam, flags, seq, CMD_GET_SERVICE, Some(key));
            },
            |_, body| {
                out = Some(codec::decode_service(body)?);
                Ok(())
            },
        );
        match result {
            Ok(()) => Ok(out),
            Err(Failure::Errno(libc::ESRCH)) => Ok(None),
            Err(f) => Err(failure(f, format!("-L -n {key}"), Target::Service)),
        }
    }

    /// `ipvsadm -Ln -t <addr>` (its real servers): the real servers of one virtual server, with
    /// connection counts and counters. A missing virtual server has none.
    pub fn real_servers(&mut self, key: &ServiceKey) -> Result<Vec<RealServerEntry>, Error> {
        let family = key.family();
        let mut out = Vec::new();
        self.request(
            Expect::Dump,
            |w, fam, flags, seq| codec::encode_simple(w, fam, flags, seq, CMD_GET_DEST, Some(key)),
            |_, body| {
                out.push(codec::decode_dest(body, family)?);
                Ok(())
            },
        )
        .map_err(|f| failure(f, format!("-L -n {key}"), Target::Service))?;
        Ok(out)
    }

    /// `ipvsadm -Sn`: the whole table, every virtual server with its real servers, for a
    /// resync. One dump of the services, then one of each service's real servers (the kernel
    /// runs one dump at a time per socket, so these cannot share a `sendmsg`). Not atomic: the
    /// table may change between the dumps; a service deleted meanwhile shows no real servers.
    pub fn dump(&mut self) -> Result<Vec<TableEntry>, Error> {
        let services = self.services()?;
        let mut table = Vec::with_capacity(services.len());
        for service in services {
            let real_servers = self.real_servers(&service.server.key)?;
            table.push(TableEntry {
                service,
                real_servers,
            });
        }
        Ok(table)
    }

    /// `ipvsadm --version`'s kernel half, and the header of `ipvsadm -L`.
    pub fn info(&mut self) -> Result<Info, Error> {
        let mut out = None;
        self.request(
            Expect::One,
            |w, fam, flags, seq| codec::encode_simple(w, fam, flags, seq, CMD_GET_INFO, None),
            |_, body| {
                out = Some(codec::decode_info(body)?);
                Ok(())
            },
        )
        .map_err(|f| failure(f, "--version".to_owned(), Target::Other))?;
        out.ok_or_else(|| Error::decode("no info reply"))
    }

    /// `ipvsadm -L --timeout`.
    pub fn timeouts(&mut self) -> Result<Timeouts, Error> {
        let mut out = None;
        self.request(
            Expect::One,
            |w, fam, flags, seq| codec::encode_simple(w, fam, flags, seq, CMD_GET_CONFIG, None),
            |_, body| {
                out = Some(codec::decode_timeouts(body)?);
                Ok(())
            },
        )
        .map_err(|f| failure(f, "-L --timeout".to_owned(), Target::Other))?;
        out.ok_or_else(|| Error::decode("no config reply"))
    }

    /// `ipvsadm --set tcp tcpfin udp`; a 0 leaves that timeout unchanged.
    pub fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), Error> {
        self.request(
            Expect::Ack,
            |w, fam, flags, seq| codec::encode_timeouts(w, fam, flags, seq, timeouts),
            |_, _| Ok(()),
        )
        .map_err(|f| {
            failure(
                f,
                format!(
                    "--set {} {} {}",
                    timeouts.tcp, timeouts.tcp_fin, timeouts.udp
                ),
                Target::Other,
            )
        })
    }

    /// `ipvsadm -C`: deletes every virtual server.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.request(
            Expect::Ack,
            |w, fam, flags, seq| codec::encode_simple(w, fam, flags, seq, CMD_FLUSH, None),
            |_, _| Ok(()),
        )
        .map_err(|f| failure(f, "-C".to_owned(), Target::Other))
    }

    /// `ipvsadm -Z [-t <addr>]`: zeroes the counters of one virtual server, or of all.
    pub fn zero(&mut self, key: Option<&ServiceKey>) -> Result<(), Error> {
        self.request(
            Expect::Ack,
            |w, fam, flags, seq| codec::encode_simple(w, fam, flags, seq, CMD_ZERO, key),
            |_, _| Ok(()),
        )
        .map_err(|f| {
            let object = key.map_or_else(|| "-Z".to_owned(), |k| format!("-Z {k}"));
            failure(
                f,
                object,
                if key.is_some() {
                    Target::Service
                } else {
                    Target::Other
                },
            )
        })
    }
}

fn send(socket: &Socket, buf: &[u8]) -> Result<(), Error> {
    // Netlink sends a datagram whole or not at all.
    socket.send(buf).map_err(Error::Io)?;
    Ok(())
}

fn recv(socket: &Socket, buf: &mut [u8], timeout: Duration) -> Result<usize, Error> {
    loop {
        match (&*socket).read(buf) {
            Ok(0) => return Err(Error::Io(io::Error::from(io::ErrorKind::UnexpectedEof))),
            Ok(len) => return Ok(len),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout(timeout));
            }
            Err(err) => return Err(Error::Io(err)),
        }
    }
}

fn op_error(errno: i32, op: &Op) -> Error {
    let (target, scheduler) = match op {
        Op::AddService(vs) | Op::UpdateService(vs) => {
            (Target::NewService, Some(vs.scheduler.name()))
        }
        Op::DeleteService(_) => (Target::Service, None),
        Op::AddDest(..) | Op::UpdateDest(..) | Op::DeleteDest(..) => (Target::Destination, None),
    };
    Error::from_errno(errno, target, op.to_string(), scheduler)
}

fn failure(f: Failure, object: String, target: Target) -> Error {
    match f {
        Failure::Errno(errno) => Error::from_errno(errno, target, object, None),
        Failure::Broken(err) => err,
    }
}

/// The same socket-level error again, for each op it kept from running.
fn replicate(err: &Error) -> Error {
    match err {
        Error::NotAvailable => Error::NotAvailable,
        Error::Timeout(d) => Error::Timeout(*d),
        Error::Io(e) => Error::Io(e.raw_os_error().map_or_else(
            || io::Error::new(e.kind(), e.to_string()),
            io::Error::from_raw_os_error,
        )),
        other => Error::Io(io::Error::other(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Handle>();
    }

    /// The host has no IPVS: opening a handle must say so, not hang or panic.
    #[test]
    fn missing_ipvs_is_reported_as_not_available() {
        if std::env::var_os("IPVS_PROXY_VM").is_some() {
            return;
        }
        match Handle::with_timeout(Duration::from_secs(2)) {
            // Ok: a host with IPVS after all.
            Err(Error::NotAvailable) | Ok(_) => {}
            Err(other) => panic!("expected NotAvailable, got {other}"),
        }
    }
}
