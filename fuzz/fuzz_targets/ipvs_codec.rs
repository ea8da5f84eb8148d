//! The IPVS attribute decoder on any reply: it never panics, and a service or destination it
//! read, written as the request `Handle::apply` sends, reads back the same.
#![no_main]

use ipvs::{Family, Op, ServiceKey, wire};
use libfuzzer_sys::fuzz_target;
use netlink::frame::messages;

/// The attributes after the genl header of the one message of `request`.
fn attributes(request: &[u8]) -> &[u8] {
    let message = messages(request)
        .next()
        .expect("one message")
        .expect("framed");
    message.genl().expect("a genl message").1
}

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = wire::read_service(data) {
        let server = entry.server;
        let request = wire::request(&Op::AddService(server.clone()));
        let again = wire::read_service(attributes(&request)).expect("our request reads back");
        assert_eq!(again.server, server);
    }
    for family in [Family::V4, Family::V6] {
        if let Ok(entry) = wire::read_real_server(data, family) {
            let server = entry.server;
            let key = ServiceKey::tcp("10.96.0.10".parse().unwrap(), 80);
            let request = wire::request(&Op::AddDest(key, server));
            let again = wire::read_real_server(attributes(&request), family)
                .expect("our request reads back");
            assert_eq!(again.server, server);
        }
    }
});
