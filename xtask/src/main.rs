//! Project tasks: `cargo xtask vm`, `cargo xtask vm-test`, `cargo xtask bench`.
fn main() {}
