//! The manifest-directory source (`--manifests DIR`): every `.yaml`, `.yml` and `.json` file
//! under DIR, multi-document, `v1/List` wrappers unwrapped, kinds Service, EndpointSlice
//! (discovery.k8s.io/v1) and Node. Other kinds are ignored (debug log). A malformed document
//! is reported with its file, document index and reason; the rest still loads. Names are
//! checked as the API server checks them ([`crate::validate`]): an object with a bad name is
//! such a document.
//!
//! A read is a snapshot ([`Snapshot`]); [`Snapshot::events_since`] turns two snapshots into
//! the [`Event`]s between them, so a daemon that watches DIR re-reads it on change and feeds
//! only the differences to the same state a kube-rs watcher would feed.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::Deserialize as _;

use crate::source::{Event, Object, ObjectKey};

/// A document that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 0-based index of the document in its file (items of a List count as their List's).
    pub document: usize,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {}: {}",
            self.file.display(),
            self.document,
            self.reason
        )
    }
}

/// The directory itself could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read manifests directory {dir}")]
pub struct DirError {
    pub dir: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Everything one read of a directory found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Objects by identity; a later file (in path order) wins over an earlier one.
    pub objects: BTreeMap<ObjectKey, Object>,
    pub errors: Vec<ManifestError>,
    /// Files read (with or without errors).
    pub files: usize,
}

impl Snapshot {
    /// The events that turn `previous` into `self`: deletes for objects gone, applies for
    /// objects new or changed. Unchanged objects produce nothing.
    #[must_use]
    pub fn events_since(&self, previous: &Snapshot) -> Vec<Event> {
        let mut events: Vec<Event> = previous
            .objects
            .keys()
            .filter(|k| !self.objects.contains_key(*k))
            .map(|k| Event::Delete(k.clone()))
            .collect();
        events.extend(
            self.objects
                .iter()
                .filter(|(k, o)| previous.objects.get(*k) != Some(*o))
                .map(|(_, o)| Event::apply(o)),
        );
        events
    }

    /// Every object as an apply event (a first load).
    #[must_use]
    pub fn events(&self) -> Vec<Event> {
        self.events_since(&Snapshot::default())
    }
}

/// Whether `path` is a manifest file by its extension.
#[must_use]
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// A one-off read of `dir` (`ipvs-proxy plan` and `check`): what [`read_dir`] found, or why
/// nothing could be used (the directory could not be read, or held no object; then the
/// documents that failed follow, one a line).
pub fn read_once(dir: &Path) -> Result<Snapshot, String> {
    let snapshot = read_dir(dir).map_err(|e| format!("{e}: {}", e.source))?;
    if snapshot.objects.is_empty() {
        let mut message = format!(
            "no Service, EndpointSlice or Node could be read from {} ({} files)",
            dir.display(),
            snapshot.files
        );
        for e in &snapshot.errors {
            let _ = write!(message, "\n  {e}");
        }
        return Err(message);
    }
    Ok(snapshot)
}

/// Reads every manifest under `dir` (recursively, in path order).
pub fn read_dir(dir: &Path) -> Result<Snapshot, DirError> {
    let mut files = Vec::new();
    collect(dir, &mut files).map_err(|source| DirError {
        dir: dir.to_owned(),
        source,
    })?;
    files.sort();
    let mut snap = Snapshot::default();
    for file in files {
        snap.files += 1;
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_into(&file, &text, &mut snap),
            Err(e) => snap.errors.push(ManifestError {
                file,
                document: 0,
                reason: format!("cannot read: {e}"),
            }),
        }
    }
    Ok(snap)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        // Editors' and Kubernetes ConfigMap mounts' hidden files (`..data`, `.swp`) are not ours.
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect(&path, out)?;
        } else if is_manifest(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Parses one file's text into `snap` (objects and errors).
pub fn parse_into(file: &Path, text: &str, snap: &mut Snapshot) {
    let err = |document, reason: String| ManifestError {
        file: file.to_owned(),
        document,
        reason,
    };
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // A syntax error leaves the rest of the file unreadable.
                snap.errors
                    .push(err(index, format!("invalid YAML/JSON: {e}")));
                return;
            }
        };
        if value.is_null() {
            continue; // an empty document (`---` at the end)
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind == "List" || kind.ends_with("List") && value.get("items").is_some() {
            let Some(items) = value.get("items").and_then(|i| i.as_sequence()) else {
                snap.errors.push(err(index, "List without items".into()));
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                match object(item.clone()) {
                    Ok(Some(o)) => {
                        snap.objects.insert(o.key(), o);
                    }
                    Ok(None) => {}
                    Err(reason) => snap.errors.push(err(index, format!("item {i}: {reason}"))),
                }
            }
            continue;
        }
        match object(value) {
            Ok(Some(o)) => {
                snap.objects.insert(o.key(), o);
            }
            Ok(None) => {}
            Err(reason) => snap.errors.push(err(index, reason)),
        }
    }
}

/// One document as an object of a kind we read; `None` for other kinds.
fn object(value: serde_yaml::Value) -> Result<Option<Object>, String> {
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_owned();
    let Some(kind) = value
        .get("kind")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
    else {
        return Err("no kind".into());
    };
    let named = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .is_some_and(|n| !n.is_empty());
    let obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => serde_yaml::from_value(value).map(|o| Object::Service(Box::new(o))),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            serde_yaml::from_value(value).map(|o| Object::EndpointSlice(Box::new(o)))
        }
        ("v1", "Node") => serde_yaml::from_value(value).map(|o| Object::Node(Box::new(o))),
        (_, "Service" | "EndpointSlice" | "Node") => {
            return Err(format!(
                "{kind} with unsupported apiVersion {api_version:?}"
            ));
        }
        _ => {
            tracing::debug!(%api_version, %kind, "ignoring manifest of another kind");
            return Ok(None);
        }
    };
    let obj = obj.map_err(|e| format!("invalid {kind}: {e}"))?;
    if !named {
        return Err(format!("{kind} without metadata.name"));
    }
    crate::validate::object(&obj)?;
    Ok(Some(obj))
}
