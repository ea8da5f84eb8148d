//! Sources of Services, EndpointSlices and Nodes: the Kubernetes API (kube-rs watchers) and a
//! directory of manifests. They turn API objects into the reconciler's model.
//!
//! Controllers never touch the kernel.
#![forbid(unsafe_code)]
