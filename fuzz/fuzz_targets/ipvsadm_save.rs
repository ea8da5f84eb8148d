//! The `ipvsadm -Sn` reader on any text: it never panics; a line it read prints as a line
//! that reads back as the same op, and the op's netlink request reads back the same server.
#![no_main]

use ipvs::{Family, Op, wire};
use libfuzzer_sys::fuzz_target;
use netlink::frame::messages;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ipvs::parse_rules(text);
    for line in text.lines() {
        let Ok(op) = line.parse::<Op>() else {
            continue;
        };
        let printed = op.to_string();
        assert_eq!(
            printed.parse::<Op>().as_ref(),
            Ok(&op),
            "{line:?} printed as {printed:?}"
        );

        let request = wire::request(&op);
        let message = messages(&request).next().unwrap().unwrap();
        let attrs = message.genl().unwrap().1;
        match &op {
            Op::AddService(vs) | Op::UpdateService(vs) => {
                assert_eq!(&wire::read_service(attrs).unwrap().server, vs, "{line:?}");
            }
            Op::AddDest(_, rs) | Op::UpdateDest(_, rs) => {
                let family = Family::V4; // the request names the destination's own family
                assert_eq!(
                    &wire::read_real_server(attrs, family).unwrap().server,
                    rs,
                    "{line:?}"
                );
            }
            _ => {}
        }
    }
});
