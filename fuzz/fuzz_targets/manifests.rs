//! The manifest reader (`--manifests`) on any file: it never panics, the objects it accepts
//! convert into the model without panicking, and each, written back as YAML, reads back the
//! same.
#![no_main]

use std::path::Path;

use controllers::{Object, Snapshot};
use libfuzzer_sys::fuzz_target;
use reconciler::ClusterState;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    let mut snap = Snapshot::default();
    controllers::manifests::parse_into(file, text, &mut snap);
    let _ = controllers::apply_all(&mut ClusterState::default(), snap.events("node-a"));

    let mut printed = String::new();
    for object in snap.objects.values() {
        let yaml = match object {
            Object::Service(o) => serde_yaml::to_string(o),
            Object::EndpointSlice(o) => serde_yaml::to_string(o),
            Object::Node(o) => serde_yaml::to_string(o),
        };
        printed.push_str("---\n");
        printed.push_str(&yaml.expect("an object we read writes as YAML"));
    }
    let mut again = Snapshot::default();
    controllers::manifests::parse_into(file, &printed, &mut again);
    assert_eq!(again.errors, [], "{printed}");
    assert_eq!(again.objects, snap.objects, "{printed}");
});
