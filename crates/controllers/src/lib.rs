//! Sources of Services, EndpointSlices and Nodes: the Kubernetes API (kube-rs watchers) and a
//! directory of manifests. They turn API objects into the reconciler's model.
//!
//! Controllers never touch the kernel.
#![forbid(unsafe_code)]

pub mod convert;
mod decode;
pub mod events;
mod intern;
pub mod kube_source;
pub mod manifests;
mod paginated;
pub mod source;
pub mod throttle;
mod tree_watch;
pub mod validate;
pub mod watch;

pub use manifests::{ManifestError, Snapshot, read_dir};
pub use source::{
    Event, Kind, Model, Object, ObjectKey, SourceReceiver, SourceSender, SourceSink, SourceUpdate,
    apply, apply_all, channel, fold,
};
