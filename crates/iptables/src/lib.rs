//! Netfilter for the proxy: typed iptables rules and ipsets, rendered to `iptables-restore` and
//! `ipset restore` input and applied with one process per apply.
//!
//! Only the proxy's own chains and sets (the KUBE-* names) are ever written or deleted; a user's
//! rules survive every sync. No Kubernetes types here.
#![forbid(unsafe_code)]
