//! kube-proxy's ipvs mode in netfilter: the KUBE-* ipsets ([`KubeSet`]) that hold the
//! Services' addresses and ports.

mod sets;

pub use sets::KubeSet;
