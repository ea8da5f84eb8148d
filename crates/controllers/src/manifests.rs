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

use crate::decode::{Body, Document, Target};
use crate::source::{Event, Kind, Object, ObjectKey};

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
    /// objects new or changed, converted for the proxy on the node named `node`. Unchanged
    /// objects produce nothing.
    #[must_use]
    pub fn events_since(&self, previous: &Snapshot, node: &str) -> Vec<Event> {
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
                .map(|(_, o)| Event::apply(o, node)),
        );
        events
    }

    /// Every object as an apply event (a first load) for the proxy on the node named `node`.
    #[must_use]
    pub fn events(&self, node: &str) -> Vec<Event> {
        self.events_since(&Snapshot::default(), node)
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

/// A file's text cut into its documents at its `---` lines, when it has several and nothing
/// the cut could misread: a line that is `---` alone always starts a document (YAML forbids
/// it inside one, in a block or quoted scalar too). `None` for a single document, or when a
/// line starts with `%` (a directive), `...` (a document end) or `---` followed by content
/// (`--- !tag`, `--- {}`): such files are decoded whole. Decoding each document alone reads
/// the same objects as decoding the file (`manifests::tests`).
#[must_use]
pub(crate) fn documents(text: &str) -> Option<Vec<&str>> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" {
            documents.push(&text[start..at]);
            start = at + line.len();
        } else if bare.starts_with("---") || bare.starts_with("...") || line.starts_with('%') {
            return None;
        }
        at += line.len();
    }
    documents.push(&text[start..]);
    (documents.len() > 1).then_some(documents)
}

/// Parses one file's text into `snap` (objects and errors).
///
/// Each document is decoded once, straight into the typed object of its kind ([`Document`]).
/// A file that this cannot decode whole (a syntax error, a field of the wrong type, a body
/// before its kind) is read again the thorough way, through `serde_yaml::Value`, which says
/// which document failed and why and keeps the documents before a syntax error: errors are
/// rare, and reported the same whichever way the good documents were read.
pub fn parse_into(file: &Path, text: &str, snap: &mut Snapshot) {
    let mut found = Vec::new();
    if decode(text, &mut found).is_ok() {
        for (index, object) in found {
            match object {
                Ok(o) => {
                    snap.objects.insert(o.key(), o);
                }
                Err(reason) => snap.errors.push(ManifestError {
                    file: file.to_owned(),
                    document: index,
                    reason,
                }),
            }
        }
    } else {
        parse_values(file, text, snap);
    }
}

/// The objects (or why not) of a file's documents, by document index, decoded in one pass;
/// fails at the first document that cannot be.
fn decode(
    text: &str,
    out: &mut Vec<(usize, Result<Object, String>)>,
) -> Result<(), serde_yaml::Error> {
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let Some(doc) = Option::<Document>::deserialize(doc)? else {
            continue; // an empty document (`---` at the end)
        };
        let Body::List { items, given } = doc.body else {
            if let Some(o) = decoded(Some(doc)).transpose() {
                out.push((index, o));
            }
            continue;
        };
        if !given && doc.kind.as_deref() != Some("List") {
            // Another kind named …List, without items.
            let _ = read(&doc.api_version, doc.kind.as_deref().unwrap_or(""));
            continue;
        }
        let Some(items) = items else {
            out.push((index, Err("List without items".into())));
            continue;
        };
        for (i, item) in items.into_iter().enumerate() {
            match decoded(item) {
                Ok(None) => {}
                Ok(Some(o)) => out.push((index, Ok(o))),
                Err(reason) => out.push((index, Err(format!("item {i}: {reason}")))),
            }
        }
    }
    Ok(())
}

/// [`parse_into`] through `serde_yaml::Value`: every document parsed into a tree, then
/// converted into its kind's type.
fn parse_values(file: &Path, text: &str, snap: &mut Snapshot) {
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

/// One document's tree as an object of a kind we read; `None` for other kinds.
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
    let obj = match read(&api_version, &kind)? {
        Some(Kind::Service) => serde_yaml::from_value(value).map(|o| Object::Service(Box::new(o))),
        Some(Kind::EndpointSlice) => {
            serde_yaml::from_value(value).map(|o| Object::EndpointSlice(Box::new(o)))
        }
        Some(Kind::Node) => serde_yaml::from_value(value).map(|o| Object::Node(Box::new(o))),
        None => return Ok(None),
    };
    checked(&kind, obj.map_err(|e| format!("invalid {kind}: {e}"))?).map(Some)
}

/// One decoded document as an object of a kind we read; `None` for other kinds (a list
/// within a list among them, as [`object`] reads it).
fn decoded(doc: Option<Document>) -> Result<Option<Object>, String> {
    let Some(Document {
        api_version,
        kind: Some(kind),
        body,
    }) = doc
    else {
        return Err("no kind".into());
    };
    if read(&api_version, &kind)?.is_none() {
        return Ok(None);
    }
    let obj = match body {
        Body::Service(o) => Object::Service(o),
        Body::EndpointSlice(o) => Object::EndpointSlice(o),
        Body::Node(o) => Object::Node(o),
        Body::None | Body::List { .. } => return Ok(None),
    };
    checked(&kind, obj).map(Some)
}

/// Which of the kinds we read `api_version` and `kind` name; `None` (logged) for others.
fn read(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
    match Target::of(api_version, kind) {
        Target::Service => Ok(Some(Kind::Service)),
        Target::EndpointSlice => Ok(Some(Kind::EndpointSlice)),
        Target::Node => Ok(Some(Kind::Node)),
        Target::Unsupported => Err(format!(
            "{kind} with unsupported apiVersion {api_version:?}"
        )),
        Target::List | Target::Other => {
            tracing::debug!(%api_version, %kind, "ignoring manifest of another kind");
            Ok(None)
        }
    }
}

/// `obj` if it is named, with names the API server accepts.
fn checked(kind: &str, obj: Object) -> Result<Object, String> {
    let meta = match &obj {
        Object::Service(o) => &o.metadata,
        Object::EndpointSlice(o) => &o.metadata,
        Object::Node(o) => &o.metadata,
    };
    if meta.name.as_deref().is_none_or(str::is_empty) {
        return Err(format!("{kind} without metadata.name"));
    }
    crate::validate::object(&obj)?;
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the `Value` path reads from `text`.
    fn through_values(text: &str) -> Snapshot {
        let mut snap = Snapshot::default();
        parse_values(Path::new("t.yaml"), text, &mut snap);
        snap
    }

    fn parsed(text: &str) -> Snapshot {
        let mut snap = Snapshot::default();
        parse_into(Path::new("t.yaml"), text, &mut snap);
        snap
    }

    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: shop\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n  - addresses: [10.244.1.5]\n    conditions: {ready: true}\n    nodeName: node-a\n    hints: {forZones: [{name: a}]}\n";

    #[test]
    fn one_pass_decoding_reads_what_the_tree_reads() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/examples");
        let mut texts: Vec<String> = std::fs::read_dir(examples)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        texts.extend(
            [
                SLICE,
                "apiVersion: v1\nkind: Node\nmetadata: {name: n, labels: {topology.kubernetes.io/zone: a}}\nspec: {podCIDRs: [10.244.0.0/24], taints: [{key: k, effect: NoSchedule}]}\nstatus: {addresses: [{type: InternalIP, address: 192.168.1.1}]}\n",
                // Other kinds, lists, a List within a list, empty documents, fields the
                // proxy does not read, a name the API server refuses, an unsupported version.
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n---\n---\napiVersion: v1\nkind: List\nitems:\n  - {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}\n  - {apiVersion: v1, kind: List, items: []}\n  - {apiVersion: v1, kind: Node, metadata: {name: Bad}}\n  - ~\n  - {apiVersion: v2, kind: Service, metadata: {name: b}}\n---\napiVersion: v1\nkind: ServiceList\nitems: [{apiVersion: v1, kind: Node, metadata: {name: m}}]\n---\napiVersion: v1\nkind: PodList\n---\napiVersion: v1\nkind: List\n",
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop, annotations: {a: b}, managedFields: [{manager: m}]}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}], selector: {app: s}}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}\nextra: [1, 2]\n---\napiVersion: v1\nkind: Service\nmetadata: ~\n---\napiVersion: v1\nkind: Service\n",
            ]
            .map(str::to_owned),
        );
        texts.push(format!("{SLICE}---\n{}", SLICE.replace("web-1", "web-2")));
        for text in &texts {
            let mut found = Vec::new();
            assert!(decode(text, &mut found).is_ok(), "one pass failed:\n{text}");
            assert_eq!(parsed(text), through_values(text), "{text}");
        }
    }

    #[test]
    fn documents_one_pass_cannot_decode_are_read_through_the_tree() {
        for text in [
            // The body before the kind, or no apiVersion before it.
            "metadata: {name: a}\napiVersion: v1\nkind: Service\nspec: {clusterIP: 10.96.0.1}\n",
            "kind: Service\nmetadata: {name: a}\n",
            // A kind that is no string, a document that is no mapping.
            "apiVersion: v1\nkind: 5\nmetadata: {name: a}\n",
            "just text\n",
            // A field of the wrong type, and a syntax error after a good document.
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: eighty}]}\n",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n---\nkind: [unclosed\n",
            "apiVersion: v1\nkind: List\nitems: {a: b}\n",
        ] {
            let mut found = Vec::new();
            assert!(decode(text, &mut found).is_err(), "decoded:\n{text}");
            let snap = parsed(text);
            assert_eq!(snap, through_values(text), "{text}");
            assert!(
                !snap.errors.is_empty() || !snap.objects.is_empty(),
                "{text}"
            );
        }
    }

    #[test]
    fn documents_decoded_alone_read_what_the_file_reads() {
        let block = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  a: |\n    text\n    --- not a marker\n";
        let two = format!("{SLICE}---\n{}", SLICE.replace("web-1", "web-2"));
        let texts = [
            format!("---\n{two}---\n"),
            format!("{block}---\r\n{SLICE}\n---  \n\n# only a comment\n"),
            format!(
                "{SLICE}---\napiVersion: v1\nkind: List\nitems:\n  - {{apiVersion: v1, kind: Node, metadata: {{name: m}}}}\n"
            ),
        ];
        for text in &texts {
            let documents = documents(text).expect("several documents");
            let mut alone = Snapshot::default();
            for document in documents {
                parse_into(Path::new("t.yaml"), document, &mut alone);
            }
            assert_eq!(alone, parsed(text), "{text}");
        }
        for text in [
            SLICE.to_owned(),
            format!("%YAML 1.2\n---\n{SLICE}---\n{SLICE}"),
            format!("--- !!map\n{SLICE}---\n{SLICE}"),
            format!("{SLICE}...\n---\n{SLICE}"),
        ] {
            assert_eq!(documents(&text), None, "{text}");
        }
    }
}
