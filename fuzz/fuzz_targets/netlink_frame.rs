//! The netlink framing (`netlink::frame`) on any datagram: walking messages and attributes
//! never panics, and what it read, written again with `Writer`, reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netlink::Writer;
use netlink::frame::{attrs, messages};

/// Walks every attribute run, nests included, as the decoders do.
fn walk(data: &[u8], depth: usize) {
    for attr in attrs(data) {
        let Ok((_, value)) = attr else { return };
        if depth < 3 {
            walk(value, depth + 1);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let read: Vec<_> = messages(data).map_while(Result::ok).collect();
    for m in &read {
        let _ = m.errno();
        if let Ok((_, body)) = m.genl() {
            walk(body, 0);
        }
        walk(m.payload, 0);
    }

    let mut w = Writer::default();
    for m in &read {
        let start = w.begin(m.msg_type, m.flags, m.seq);
        w.payload(m.payload.len()).copy_from_slice(m.payload);
        w.end(start);
    }
    let again: Vec<_> = messages(w.as_bytes())
        .collect::<Result<_, _>>()
        .expect("written messages read back");
    assert_eq!(again, read);

    for m in &read {
        let run: Vec<_> = attrs(m.payload).map_while(Result::ok).collect();
        let mut w = Writer::default();
        for (kind, value) in &run {
            w.put(*kind, value);
        }
        let again: Vec<_> = attrs(w.as_bytes())
            .collect::<Result<_, _>>()
            .expect("written attributes read back");
        assert_eq!(again, run);
    }
});
