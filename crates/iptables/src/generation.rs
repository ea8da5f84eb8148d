//! nf_tables' ruleset generation (`NFT_MSG_GETGEN`): a counter the kernel moves on every
//! commit in the network namespace, whoever makes it. When it has moved only by the proxy's
//! own commits since the proxy last compared its chains with the kernel, nothing else changed
//! the ruleset, and a periodic full sync need not read it again (`iptables-nft-save` of
//! 10,000 Services takes seconds, and starts over whenever a commit lands meanwhile).

use std::time::Duration;

/// `NETLINK_NETFILTER`.
const NETLINK_NETFILTER: isize = 12;
/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN`.
const GETGEN: u16 = (10 << 8) | 16;
/// `NFT_MSG_NEWGEN`, the answer.
const NEWGEN: u16 = (10 << 8) | 15;
/// `NFTA_GEN_ID`, big-endian u32.
const NFTA_GEN_ID: u16 = 1;
const NLM_F_REQUEST: u16 = 1;
/// The `struct nfgenmsg` before the attributes.
const NFGENMSG_LEN: usize = 4;

/// The current generation of this network namespace's nf_tables ruleset; `None` when it
/// cannot be read (no nf_tables, no permission), which the caller takes as "unknown".
#[must_use]
pub fn nft_generation() -> Option<u32> {
    let options = netlink::Options {
        protocol: NETLINK_NETFILTER,
        timeout: Duration::from_secs(2),
        receive_buffer: 64 << 10,
        force_receive_buffer: false,
        send_buffer: None,
        cap_ack_and_strict_check: false,
    };
    let mut socket = netlink::Socket::open(&options).ok()?;
    let mut generation = None;
    let answer = socket.request::<netlink::Error>(
        |w, seq| {
            let start = w.begin(GETGEN, NLM_F_REQUEST, seq);
            // nfgen_family AF_UNSPEC, version 0, res_id 0.
            w.payload(NFGENMSG_LEN).fill(0);
            w.end(start);
        },
        |msg| {
            if msg.msg_type == NEWGEN {
                let attrs = msg.payload.get(NFGENMSG_LEN..).unwrap_or_default();
                for (kind, value) in netlink::frame::attrs(attrs).flatten() {
                    if kind & 0x3fff == NFTA_GEN_ID {
                        generation = value
                            .get(..4)
                            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
                    }
                }
            }
            Ok(netlink::Flow::Stop)
        },
    );
    answer.ok()?;
    generation
}
