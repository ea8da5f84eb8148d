//! The rtnetlink socket: the shared `netlink` engine, with this crate's batch size, buffers
//! and error names.
//!
//! A batch of address requests leaves in one `sendmsg`; only its last request asks for an
//! acknowledgement, errors are matched to requests by sequence number, and answers lost to
//! a receive-queue overrun come back as [`Reply::Lost`] for the caller to settle by reading
//! the kernel's state back (see the `netlink` crate).

use std::io;
use std::time::Duration;

use netlink::frame::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink::{End, Flow, Limits, Socket};
use netlink_packet_route::RouteNetlinkMessage;

use crate::error::Error;
use crate::request;

pub(crate) use netlink::Reply;

/// Requests per `sendmsg`. Each failed request costs the receive queue about 1 KiB (an skb),
/// so a batch fits the buffer below even if every request in it fails.
pub(crate) const BATCH: usize = 512;
const RECEIVE_BUFFER: usize = 4 << 20;
/// How long to wait for the kernel before giving up on a request.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

/// One request of a batch: a message and its `NLM_F_*` flags (without REQUEST and ACK).
#[derive(Debug)]
pub(crate) struct Request {
    pub message: RouteNetlinkMessage,
    pub flags: u16,
}

#[derive(Debug)]
pub(crate) struct Connection {
    socket: Socket,
    /// Batches whose answers overran the receive queue, for the tests of that path.
    #[cfg(test)]
    pub(crate) overruns: usize,
}

/// The engine's failures, named by the `ip` command that was running.
fn engine_error(error: netlink::Error, command: &dyn Fn() -> String) -> Error {
    match error {
        netlink::Error::Socket { what, source } => Error::Socket { what, source },
        netlink::Error::Timeout(after) => Error::Timeout {
            command: command(),
            after,
        },
        netlink::Error::Decode(reason) => Error::Decode {
            command: command(),
            reason,
        },
        other => Error::Socket {
            what: "netlink",
            source: io::Error::other(other.to_string()),
        },
    }
}

fn kernel_error(errno: i32, command: &dyn Fn() -> String) -> Error {
    Error::Kernel {
        command: command(),
        source: io::Error::from_raw_os_error(errno),
    }
}

impl Connection {
    /// Opens a route netlink socket in the calling thread's network namespace.
    pub(crate) fn open() -> Result<Self, Error> {
        let socket = Socket::open(&netlink::Options {
            protocol: netlink::NETLINK_ROUTE,
            timeout: TIMEOUT,
            receive_buffer: RECEIVE_BUFFER,
            force_receive_buffer: true,
            send_buffer: None,
            cap_ack_and_strict_check: true,
        })
        .map_err(|e| engine_error(e, &|| "open".to_owned()))?;
        Ok(Self {
            socket,
            #[cfg(test)]
            overruns: 0,
        })
    }

    /// Shrinks the receive buffer to the kernel's minimum so that a batch of errors overruns
    /// it: the tests of the overrun path use this.
    #[cfg(test)]
    pub(crate) fn starve_receive_buffer_for_tests(&self) {
        self.socket.set_receive_buffer_exact(0).expect("SO_RCVBUF");
    }

    /// Sends one acknowledged request; returns the messages that answered it (for a GET) or
    /// the kernel's errno as [`Error::Kernel`] named by `command`.
    pub(crate) fn call(
        &mut self,
        message: &RouteNetlinkMessage,
        flags: u16,
        command: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        let (answers, _) = self.exchange(message, NLM_F_ACK | flags, command)?;
        Ok(answers)
    }

    /// Dumps (`NLM_F_DUMP`); returns the messages and whether the kernel flagged the dump as
    /// interrupted by a concurrent change (`NLM_F_DUMP_INTR`), in which case it may be
    /// inconsistent and should be read again.
    pub(crate) fn dump(
        &mut self,
        message: &RouteNetlinkMessage,
        command: &dyn Fn() -> String,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), Error> {
        self.exchange(message, NLM_F_DUMP, command)
    }

    /// One request with `flags`, and every message that answers it until its end.
    fn exchange(
        &mut self,
        message: &RouteNetlinkMessage,
        flags: u16,
        command: &dyn Fn() -> String,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), Error> {
        let mut answers = Vec::new();
        let answer = self
            .socket
            .request(
                |w, sequence| request::append(w, message, NLM_F_REQUEST | flags, sequence),
                |reply| {
                    answers.push(request::parse(reply)?);
                    Ok::<_, netlink::Error>(Flow::Continue)
                },
            )
            .map_err(|e| engine_error(e, command))?;
        match answer.end {
            End::Failed(errno) => Err(kernel_error(errno, command)),
            End::Ack | End::Done(_) | End::Stopped => Ok((answers, answer.interrupted)),
        }
    }

    /// Sends `requests` in batches of [`BATCH`] per `sendmsg`; returns one [`Reply`] per
    /// request, in order. `Err` only when the socket itself fails or the kernel goes silent.
    pub(crate) fn batch(
        &mut self,
        requests: impl IntoIterator<Item = Request>,
        command: &dyn Fn() -> String,
    ) -> Result<Vec<Reply>, Error> {
        let requests: Vec<Request> = requests.into_iter().collect();
        let limits = Limits {
            requests: BATCH,
            bytes: usize::MAX,
        };
        let replies = self
            .socket
            .batch_all(limits, requests.len(), |i, w, sequence| {
                let request = &requests[i];
                request::append(w, &request.message, NLM_F_REQUEST | request.flags, sequence);
            })
            .map_err(|e| engine_error(e, command));
        #[cfg(test)]
        {
            self.overruns = usize::try_from(self.socket.overruns()).unwrap_or(usize::MAX);
        }
        replies
    }
}
