//! The ipvs-proxy daemon: flags and the config file, the real kernel backends, the health and
//! metrics servers, and the wiring of the crates (`daemon`).
//!
//! The binary is thin: `main.rs` parses flags and hands over to this library; the crates work:
//! `inet`, `netlink`, `ipvs`, `netif`, `conntrack`, `iptables`, `reconciler`, `controllers`,
//! `healthcheck`, `telemetry`.
#![deny(unsafe_code)]

pub mod allocator;
pub mod backends;
pub mod check;
pub mod cleanup;
pub mod config;
pub mod config_file;
pub mod daemon;
pub mod flags;
pub use reconciler::health;
pub mod http;
pub mod logging;
pub mod observer;
pub mod plan;
