//! Helpers for the kernel tests: a fresh network namespace per test, and `ip` to read back.
//!
//! Each test runs its body on a new thread that leaves the test process's network namespace
//! for a new, empty one (`unshare(CLONE_NEWNET)` affects only the calling thread). Sockets
//! opened and `ip` commands run from that thread live in it; when the thread ends the
//! namespace goes with everything in it, so a failing test leaves nothing behind.
#![allow(unsafe_code, dead_code)]

use std::collections::BTreeSet;
use std::io;
use std::process::Command;

/// Runs `body` in a new network namespace and returns what it returns; a panic in `body`
/// fails the calling test.
pub fn in_new_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET changes only this thread's
        // network namespace, which no other thread of the test harness uses.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) needs root: {}",
            io::Error::last_os_error()
        );
        body()
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs iproute2's `ip` (by path: busybox's `ip` in the VM lacks features) and returns its
/// standard output; panics with its standard error if it fails.
pub fn ip(args: &str) -> String {
    let output = Command::new("/bin/ip")
        .args(args.split_whitespace())
        .output()
        .expect("run /bin/ip");
    assert!(
        output.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The addresses on `dev` as `ip -o addr show dev DEV` prints them: "10.96.0.10/32", ...
pub fn addresses_on(dev: &str) -> BTreeSet<String> {
    ip(&format!("-o addr show dev {dev}"))
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next().map(str::to_owned)
        })
        .collect()
}

/// The lines of `ip -o addr show dev DEV`, for assertions about flags.
pub fn address_lines(dev: &str) -> Vec<String> {
    ip(&format!("-o addr show dev {dev}"))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether a link of that name exists in the current namespace.
pub fn link_exists(dev: &str) -> bool {
    Command::new("/bin/ip")
        .args(["link", "show", dev])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Host addresses as `ip` prints them ("10.96.0.10/32", "fd00::10/128").
pub fn host_forms<S: AsRef<str>>(addresses: impl IntoIterator<Item = S>) -> BTreeSet<String> {
    addresses
        .into_iter()
        .map(|a| {
            let a = a.as_ref();
            if a.contains(':') {
                format!("{a}/128")
            } else {
                format!("{a}/32")
            }
        })
        .collect()
}
