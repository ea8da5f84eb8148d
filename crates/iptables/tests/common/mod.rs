//! What the crate's tests against the real tools share: a network namespace of their own,
//! and whether they may make one.

use std::process::Command;

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// A fresh namespace named `NAME-<pid>` (one of a previous run's is deleted first).
    pub fn new(name: &str) -> Netns {
        let name = format!("{name}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} (these tests need root)");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}
