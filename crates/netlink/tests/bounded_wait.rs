//! Every wait on the kernel is bounded, on the host's real netlink: a request the kernel never
//! answers fails with a timeout once the socket's bound has passed, instead of hanging the
//! caller (the sync loop's thread).

use std::time::{Duration, Instant};

use netlink::frame::NLMSG_NOOP;
use netlink::{Error, Flow, NETLINK_ROUTE, Options, Socket};

#[test]
fn a_request_the_kernel_never_answers_fails_at_the_bound() {
    let timeout = Duration::from_millis(300);
    let mut socket = Socket::open(&Options {
        protocol: NETLINK_ROUTE,
        timeout,
        receive_buffer: 1 << 16,
        force_receive_buffer: false,
        send_buffer: None,
        cap_ack_and_strict_check: false,
    })
    .expect("opening a rtnetlink socket");
    let started = Instant::now();
    // A NOOP that asks for no acknowledgement: the kernel takes it and says nothing.
    let answer = socket.request(
        |w, seq| {
            let start = w.begin(NLMSG_NOOP, 0, seq);
            w.end(start);
        },
        |_| Ok::<_, Error>(Flow::Continue),
    );
    let took = started.elapsed();
    assert!(
        matches!(answer, Err(Error::Timeout(after)) if after == timeout),
        "{answer:?}"
    );
    assert!(
        took >= timeout && took < Duration::from_secs(5),
        "failed after {took:?}"
    );
}
