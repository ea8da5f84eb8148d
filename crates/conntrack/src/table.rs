//! The ctnetlink socket: dumps, and deletes in pipelined batches over the shared `netlink`
//! engine (many requests per `sendmsg`, one acknowledgement per batch, errors matched by
//! sequence number).

use std::io;
use std::time::Duration;

use inet::{Family, Protocol};
use netlink::{End, Flow as Next, Limits, Reply, Socket};

use crate::error::Error;
use crate::message::{self, Flow};

/// Deletes per `sendmsg`. A failed delete costs the receive queue about 1 KiB (an skb with
/// the capped error), so a batch of failures fits the buffer below.
const BATCH: usize = 1024;
const RECEIVE_BUFFER: usize = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// The connection tracking table of the network namespace the handle was opened in.
#[derive(Debug)]
pub struct Conntrack {
    socket: Socket,
}

/// What a batch of deletes did.
#[derive(Debug, Default)]
pub struct Deleted {
    /// Entries the kernel deleted.
    pub deleted: usize,
    /// Entries already gone (ended, or replaced by a newer entry with another id) or whose
    /// answer was lost: a later dump shows whether they are still there.
    pub gone: usize,
    /// Deletes the kernel refused otherwise, each named by its `conntrack -D` command.
    pub failed: Vec<Error>,
}

impl Conntrack {
    /// Opens a ctnetlink socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, Error> {
        let protocol = isize::try_from(libc::NETLINK_NETFILTER).expect("a small constant");
        let socket = Socket::open(&netlink::Options {
            protocol,
            timeout: TIMEOUT,
            receive_buffer: RECEIVE_BUFFER,
            force_receive_buffer: true,
            send_buffer: None,
            cap_ack_and_strict_check: true,
        })
        .map_err(|e| Error::engine(e, "open"))?;
        Ok(Conntrack { socket })
    }

    /// `conntrack -L -f FAMILY -p PROTOCOL`: every entry of one family and protocol.
    pub fn dump(&mut self, family: Family, protocol: Protocol) -> Result<Vec<Flow>, Error> {
        let command = || {
            let f = if family == Family::V4 { "ipv4" } else { "ipv6" };
            format!("conntrack -L -f {f} -p {protocol}")
        };
        let mut flows = Vec::new();
        let answer = self
            .socket
            .request(
                |w, seq| message::encode_dump(w, seq, family, protocol),
                |reply| {
                    if message::is_entry(reply.msg_type) {
                        let flow = message::decode(reply.payload)?;
                        // The kernel filters too, from 5.8; an older one sends everything.
                        if flow.protocol == protocol.number() && flow.family() == family {
                            flows.push(flow);
                        }
                    }
                    Ok::<_, netlink::Error>(Next::Continue)
                },
            )
            .map_err(|e| Error::engine(e, &command()))?;
        match answer.end {
            End::Failed(errno) | End::Done(errno) if errno != 0 => Err(Error::Kernel {
                command: command(),
                source: io::Error::from_raw_os_error(errno),
            }),
            _ => Ok(flows),
        }
    }

    /// `conntrack -D` of each entry, by its original tuple, zone and id, in batches.
    /// `Err` only when the socket fails or the kernel goes silent.
    pub fn delete(&mut self, flows: &[Flow]) -> Result<Deleted, Error> {
        let limits = Limits {
            requests: BATCH,
            bytes: usize::MAX,
        };
        let replies = self
            .socket
            .batch_all(limits, flows.len(), |i, w, seq| {
                message::encode_delete(w, seq, &flows[i]);
            })
            .map_err(|e| Error::engine(e, "conntrack -D"))?;
        let mut outcome = Deleted::default();
        for (flow, reply) in flows.iter().zip(replies) {
            match reply {
                Reply::Done => outcome.deleted += 1,
                Reply::Failed(libc::ENOENT) | Reply::Lost => outcome.gone += 1,
                Reply::Failed(errno) => outcome.failed.push(Error::Kernel {
                    command: flow.command(),
                    source: io::Error::from_raw_os_error(errno),
                }),
            }
        }
        Ok(outcome)
    }
}
