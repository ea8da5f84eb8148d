//! The `iptables-save` reader on any text: it never panics, and what the proxy would do with
//! that state (the iptables proxier's full sync, `--cleanup`) touches only the proxy's chains
//! and its jumps in the built-in chains.
#![no_main]

use iptables::proxier::{Proxier, ProxierConfig};
use iptables::{Ruleset, Saved};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let saved = Saved::parse(text);

    let plan = Proxier::new(ProxierConfig::default()).plan_full(&[], &saved);
    plan.ruleset
        .check_ownership()
        .expect("a full sync touches only the proxy's chains");
    let _ = plan.ruleset.render();

    let mut cleanup = Ruleset::default();
    saved.add_cleanup(&mut cleanup);
    cleanup
        .check_ownership()
        .expect("--cleanup touches only the proxy's chains");
    let _ = cleanup.render();
});
