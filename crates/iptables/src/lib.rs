//! Netfilter for the proxy: typed iptables rules and ipsets, rendered to `iptables-restore` and
//! `ipset restore` input and applied with one process per apply.
//!
//! Only the proxy's own chains and sets (the KUBE-* names in [`chain`] and
//! [`ipvs_mode::KubeSet`]) are ever written or deleted; a user's rules survive every sync. No
//! Kubernetes types here.
//!
//! - [`rule`], [`table`]: one rule, rendered exactly as `iptables-save` prints it.
//! - [`chain`]: the fixed KUBE-* chain names, the one list of each mode's chains, and which
//!   chains the proxy owns.
//! - [`ruleset`]: what one `iptables-restore --noflush` run changes.
//! - [`ipset`]: sets, their `ipset restore` text and their `ipset save` text, written and read
//!   back; the refill of a set through its swap twin.
//! - [`runner`]: one `iptables-restore --noflush -w 5` / `ipset restore -exist` per apply, each
//!   tool killed if it outlives [`runner::TOOL_TIMEOUT`] (`process`, the crate's only
//!   `unsafe`: killing the tool's process group); [`detect_flavour`] picks legacy or nft as
//!   kube-proxy's iptables wrapper does.
//! - [`saved`], [`cleanup`]: reading `iptables-save` back; removing only what the proxy owns.
//! - [`local`]: which traffic comes from this node's pods (kube-proxy's local traffic
//!   detector, from `detectLocalMode`), as the match both renderings add to their rules.
//! - [`ipvs_mode`]: kube-proxy's ipvs mode — its KUBE-* ipsets ([`ipvs_mode::KubeSet`]: names,
//!   types, comments) and the small rule set that matches on them, rendered from plain facts
//!   ([`ipvs_mode::RuleInput`]).
//! - [`proxier`]: kube-proxy's iptables mode (the fallback when IPVS is missing), rendered
//!   from plain service-port descriptions and synced incrementally.
#![deny(unsafe_code)]

pub mod chain;
pub mod cleanup;
pub mod generation;
pub mod ipset;
pub mod ipvs_mode;
pub mod local;
mod process;
pub mod proxier;
pub mod rule;
pub mod ruleset;
pub mod runner;
pub mod saved;
pub mod table;

pub use cleanup::{CleanupReport, cleanup};
pub use ipset::{IpSet, SetEntry, SetHeader, SetOp, SetPatch, SetType};
pub use local::LocalDetector;
pub use rule::{
    AddrMatch, AddrType, InterfaceMatch, MarkOp, Match, Protocol, Recent, Rule, Target,
    masquerade_mark,
};
pub use ruleset::{Ruleset, TablePatch};
pub use runner::{Flavour, Runner, detect_flavour};
pub use saved::Saved;
pub use table::{Family, FamilyNames, Table};

/// What can go wrong rendering or applying netfilter state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A patch would write or delete a chain the proxy does not own.
    #[error("refusing to touch chain {chain} in table {table}: not one of the proxy's chains")]
    NotOwned {
        /// The table.
        table: Table,
        /// The chain.
        chain: String,
    },
    /// A patch would write or destroy a set the proxy does not own.
    #[error("refusing to touch ipset {0}: not one of the proxy's sets")]
    SetNotOwned(String),
    /// An entry does not fit its set's type or family.
    #[error("entry {entry} does not fit ipset {set}")]
    BadEntry {
        /// The set.
        set: String,
        /// The entry.
        entry: String,
    },
    /// A tool could not be started.
    #[error("cannot run {tool}")]
    Spawn {
        /// The command.
        tool: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tool did not finish within its bound and was killed.
    #[error(
        "{tool} did not finish within {after:?} and was killed{}",
        stderr_suffix(stderr)
    )]
    Timeout {
        /// The command.
        tool: String,
        /// The bound.
        after: std::time::Duration,
        /// What it printed on stderr before (trimmed).
        stderr: String,
    },
    /// A tool ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command.
        tool: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}
