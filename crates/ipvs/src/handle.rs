//! The handle: one generic-netlink socket to the kernel's IPVS family, in the network namespace
//! of the thread that opened it.
//!
//! Changes are pipelined by the shared `netlink` engine: [`Handle::apply`] writes many
//! requests back to back into one `sendmsg`, without asking for acknowledgements except on the
//! last one. The kernel handles the messages of a `sendmsg` in order, inside the call, and
//! answers only the failures (and the last request), so one receive usually confirms a whole
//! window; a failure is matched to its request by sequence number.

use crate::codec::{
    self, CMD_FLUSH, CMD_GET_CONFIG, CMD_GET_DEST, CMD_GET_INFO, CMD_GET_SERVICE, CMD_ZERO,
};
use crate::config::{Info, Timeouts};
use crate::dest::{RealServer, RealServerEntry};
use crate::error::{Error, Target};
use crate::op::Op;
use crate::service::{ServiceKey, VirtualServer, VirtualServerEntry};
use netlink::frame::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink::{BatchError, End, Flow, Limits, Reply, Socket, Writer};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// The default bound on every wait for the kernel.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many sockets [`Handle::dump`] reads the real servers on at once. The kernel answers
/// every IPVS command under one mutex (`__ip_vs_mutex`), so the dumps themselves never run
/// side by side: a second socket only overlaps one thread's decoding and system calls with
/// the other's dump, and more threads than CPUs lose (`bench ipvs` at 10,000 virtual servers
/// in the VM: 3.28 s on one socket, 3.11 s on two, 4.55 s on four).
pub const DUMP_SOCKETS: usize = 2;

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

/// A virtual server with its real servers, without their counters: what a streamed dump
/// ([`Handle::dump_each`]) hands over, for a caller that compares the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    /// The virtual server.
    pub server: VirtualServer,
    /// Its real servers.
    pub real_servers: Vec<RealServer>,
}

#[derive(Debug)]
struct Connection {
    socket: Socket,
    family_id: u16,
    /// Requests and bytes per `sendmsg` in [`Handle::apply`]: as many errors as fit the
    /// receive buffer, and no more bytes than the send buffer takes.
    limits: Limits,
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
        };
        handle.connect()?;
        Ok(handle)
    }

    fn connect(&mut self) -> Result<&mut Connection, Error> {
        if self.connection.is_none() {
            let mut socket = Socket::open(&netlink::Options {
                protocol: netlink::NETLINK_GENERIC,
                timeout: self.timeout,
                receive_buffer: SOCKET_BUF,
                force_receive_buffer: false,
                send_buffer: Some(SOCKET_BUF),
                cap_ack_and_strict_check: false,
            })?;
            let rcvbuf = socket.receive_buffer()?;
            let sndbuf = socket.send_buffer()?;
            // `genl ctrl get name IPVS`: the family id is per boot, resolved per handle.
            let family_id = match netlink::genl::resolve_family(&mut socket, codec::FAMILY_NAME)? {
                Ok(id) => id,
                Err(libc::ENOENT) => return Err(Error::NotAvailable),
                Err(errno) => return Err(Error::Io(io::Error::from_raw_os_error(errno))),
            };
            let limits = Limits {
                requests: (rcvbuf / ERROR_TRUESIZE).clamp(16, 4096),
                bytes: (sndbuf / 2).clamp(4096, 1 << 20),
            };
            tracing::debug!(
                family_id,
                window = limits.requests,
                max_batch = limits.bytes,
                rcvbuf,
                sndbuf,
                "IPVS netlink socket open"
            );
            self.connection = Some(Connection {
                socket,
                family_id,
                limits,
            });
        }
        Ok(self.connection.as_mut().expect("just set"))
    }

    /// Sends one request and hands each reply message's (command, attributes) to `on_reply`.
    fn request(
        &mut self,
        expect: Expect,
        build: impl FnOnce(&mut Writer, u16, u16, u32),
        mut on_reply: impl FnMut(u8, &[u8]) -> Result<(), Error>,
    ) -> Result<(), Failure> {
        let conn = self.connect().map_err(Failure::Broken)?;
        let family_id = conn.family_id;
        let flags = match expect {
            Expect::Ack => NLM_F_REQUEST | NLM_F_ACK,
            Expect::One => NLM_F_REQUEST,
            Expect::Dump => NLM_F_REQUEST | NLM_F_DUMP,
        };
        let outcome = conn.socket.request(
            |w, seq| build(w, family_id, flags, seq),
            |msg| {
                let (cmd, body) = msg.genl()?;
                on_reply(cmd, body)?;
                Ok::<_, Error>(if expect == Expect::One {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            },
        );
        match outcome {
            Ok(answer) => match answer.end {
                End::Ack | End::Stopped | End::Done(0) => Ok(()),
                End::Failed(errno) | End::Done(errno) => Err(Failure::Errno(errno)),
            },
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
        let conn = self.connection.as_mut().expect("connected by apply");
        let family_id = conn.family_id;
        let sent = conn.socket.batch(conn.limits, ops.len(), |i, w, seq| {
            codec::encode_op(w, family_id, NLM_F_REQUEST, seq, &ops[i]);
        });
        match sent {
            Ok(replies) => replies
                .into_iter()
                .zip(ops)
                .map(|(reply, op)| match reply {
                    Reply::Done => Ok(()),
                    Reply::Failed(errno) => Err(op_error(errno, op)),
                    // A receive-queue overrun: the caller reads the table back.
                    Reply::Lost => Err(Error::Unconfirmed {
                        object: op.to_string(),
                    }),
                })
                .collect(),
            Err(BatchError { error, answers }) => {
                let err = Error::from(error);
                let sent = !matches!(err, Error::Io(_)) || answers.iter().any(Option::is_some);
                let results = answers
                    .into_iter()
                    .zip(ops)
                    .map(|(answer, op)| match answer {
                        Some(Reply::Done) => Ok(()),
                        Some(Reply::Failed(errno)) => Err(op_error(errno, op)),
                        Some(Reply::Lost) | None if sent => Err(Error::Unconfirmed {
                            object: op.to_string(),
                        }),
                        Some(Reply::Lost) | None => Err(replicate(&err)),
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
    /// resync, read on [`DUMP_SOCKETS`] sockets at once ([`Handle::dump_on`]).
    pub fn dump(&mut self) -> Result<Vec<TableEntry>, Error> {
        self.dump_on(DUMP_SOCKETS)
    }

    /// [`Handle::dump`] on `sockets` sockets: one dump of the services, then one of each
    /// service's real servers. The kernel runs one dump at a time per socket, so these cannot
    /// share a `sendmsg`; instead the services are split into `sockets` runs, one read on this
    /// socket and each other on a socket of its own, opened for the call on a thread of its
    /// own (in this thread's network namespace, which threads inherit). Not atomic: the table
    /// may change between the dumps; a service deleted meanwhile is left out.
    pub fn dump_on(&mut self, sockets: usize) -> Result<Vec<TableEntry>, Error> {
        let services = self.services()?;
        let runs = self.dump_runs(sockets, &services, |handle, services| {
            let mut read = Vec::with_capacity(services.len());
            for service in services {
                if let Some(real_servers) = handle.real_servers_of(&service.server.key)? {
                    read.push(TableEntry {
                        service: service.clone(),
                        real_servers,
                    });
                }
            }
            Ok(read)
        })?;
        Ok(runs.into_iter().flatten().collect())
    }

    /// [`Handle::dump_on`] streamed, without counters: each entry is handed to `each` as soon
    /// as its real servers are read, on the thread that read them, and nothing is kept but
    /// the virtual servers still to read (without their counters: half the room), so a caller
    /// that compares as it reads holds one entry per socket at a time. `each` returns `false`
    /// to stop the read (its receiver went away): the call then ends with `Ok`.
    pub fn dump_each(
        &mut self,
        sockets: usize,
        each: impl Fn(ConfigEntry) -> bool + Sync,
    ) -> Result<(), Error> {
        let services: Vec<VirtualServer> = self.service_configs()?;
        self.dump_runs(sockets, &services, |handle, services| {
            for server in services {
                let Some(real_servers) = handle.real_servers_of(&server.key)? else {
                    continue;
                };
                let real_servers = real_servers.into_iter().map(|r| r.server).collect();
                let entry = ConfigEntry {
                    server: server.clone(),
                    real_servers,
                };
                if !each(entry) {
                    break;
                }
            }
            Ok(())
        })
        .map(drop)
    }

    /// The virtual servers alone, without their counters.
    fn service_configs(&mut self) -> Result<Vec<VirtualServer>, Error> {
        let mut out = Vec::new();
        self.request(
            Expect::Dump,
            |w, fam, flags, seq| codec::encode_simple(w, fam, flags, seq, CMD_GET_SERVICE, None),
            |_, body| {
                out.push(codec::decode_service(body)?.server);
                Ok(())
            },
        )
        .map_err(|f| failure(f, "-L -n".to_owned(), Target::Other))?;
        Ok(out)
    }

    /// `services`, split into `sockets` runs, each handed to `run` with a handle of its own:
    /// this one for the first run, a new one on a thread of its own for each other. The runs'
    /// results, in order.
    fn dump_runs<T: Sync, R: Send>(
        &mut self,
        sockets: usize,
        services: &[T],
        run: impl Fn(&mut Handle, &[T]) -> Result<R, Error> + Sync,
    ) -> Result<Vec<R>, Error> {
        let chunk = services.len().div_ceil(sockets.max(1)).max(1);
        let mut chunks = services.chunks(chunk);
        let own = chunks.next().unwrap_or_default();
        let (timeout, run) = (self.timeout, &run);
        std::thread::scope(|scope| {
            let others: Vec<_> = chunks
                .map(|services| {
                    scope.spawn(move || run(&mut Handle::with_timeout(timeout)?, services))
                })
                .collect();
            let mut results = vec![run(self, own)?];
            for other in others {
                let read = other
                    .join()
                    .map_err(|_| Error::Io(io::Error::other("an IPVS dump thread panicked")))?;
                results.push(read?);
            }
            Ok(results)
        })
    }

    /// The real servers of the virtual server `key`, or `None` if it is gone.
    ///
    /// The kernel answers a real-server dump of a missing virtual server with nothing, so a
    /// service that shows none is looked up again: one deleted since the services were read
    /// is left out, as a read taken after its deletion would have it, rather than read as a
    /// virtual server without real servers (which a resync would fill by adding real servers
    /// to a virtual server that is gone).
    fn real_servers_of(&mut self, key: &ServiceKey) -> Result<Option<Vec<RealServerEntry>>, Error> {
        let real_servers = self.real_servers(key)?;
        if real_servers.is_empty() && self.service(key)?.is_none() {
            return Ok(None);
        }
        Ok(Some(real_servers))
    }

    /// The bound on each wait for the kernel: a reader on another thread opens its own
    /// handle with it.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
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
