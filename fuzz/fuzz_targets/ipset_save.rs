//! The `ipset save` reader on any text: it never panics, and the sets it read, printed as
//! `ipset save` prints them, read back the same.
#![no_main]

use iptables::ipset::{parse_save, render_save};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut sets = parse_save(text);
    let printed = render_save(&sets);
    // The printer sorts by name (stably: sets of one name keep their order).
    sets.sort_by(|a, b| a.name().cmp(b.name()));
    assert_eq!(
        parse_save(&printed),
        sets,
        "{text:?} printed as {printed:?}"
    );
});
