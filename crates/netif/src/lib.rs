//! The dummy link `kube-ipvs0` and the service addresses bound to it, over rtnetlink.
//!
//! IPVS only sees packets addressed to the node itself, so every Service VIP is bound to a
//! dummy link. This crate owns that one link; it must never change any other link or any
//! address on another link, and it knows nothing of Kubernetes.
