//! Following a manifest directory as it changes (`ipvs-proxy --manifests DIR`).
//!
//! inotify says which files changed; only those are re-read, and their objects are sent as one
//! batch of [`Event`]s (objects that left a file are deleted unless another file still defines
//! them). What is kept per file is a hash of its text and the keys of its objects, not the
//! objects: the proxier's `ClusterState` holds the model, and drops re-applied objects that did
//! not change, so re-reading a file costs only its own parse.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::manifests::{DirError, Snapshot, is_manifest, parse_into};
use crate::source::{Event, ObjectKey, SourceSink, SourceUpdate};
use crate::tree_watch::{Changes, Stopper, TreeWatch};
use reconciler::pending::Closed;

/// Files per batch of the first read.
const FIRST_READ_CHUNK: usize = 256;

#[derive(Debug, Clone)]
struct FileEntry {
    hash: u64,
    /// The file's objects, each with the hash of the text of the document that defines it
    /// (0: not known, the file was decoded whole), so that a change decodes only the
    /// documents whose text changed: a Service's document stays as it was when its
    /// EndpointSlice's, beside it, changes.
    keys: Vec<(ObjectKey, u64)>,
}

/// What each file under the directory defines. Each path is held once, shared by the file's
/// entry and the lists of the objects it defines.
#[derive(Debug)]
pub struct DirIndex {
    /// This node's name: the objects are converted as the proxy on it sees them.
    node: Arc<str>,
    files: BTreeMap<Arc<Path>, FileEntry>,
    /// The files defining each object, sorted: almost always one, so a list, not a tree
    /// (whose smallest node holds eleven), and a list with room for one.
    owners: HashMap<ObjectKey, Vec<Arc<Path>>>,
}

fn text_hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// A file's text read: the hash of the whole, the objects of the documents decoded (in
/// `snap`, with their errors) and the keys of every object with its document's hash.
///
/// A file of several documents ([`crate::manifests::documents`]) is decoded a document at a
/// time, and a document whose text hashes as one of `known`'s (the file's last read) is not
/// decoded again: its objects keep their keys and are not in `snap`. A document that does
/// not decode alone, or an object that two documents define, has the file decoded whole, so
/// that its errors name their documents as the file counts them and the later definition
/// holds.
fn decode_file(
    path: &Path,
    text: &str,
    known: &[(ObjectKey, u64)],
) -> (u64, Snapshot, Vec<(ObjectKey, u64)>) {
    if let Some(documents) = crate::manifests::documents(text) {
        let hashes: Vec<u64> = documents.iter().map(|d| text_hash(d)).collect();
        let mut file = DefaultHasher::new();
        hashes.hash(&mut file);
        let file = file.finish();
        if let Some((snap, keys)) = decode_documents(path, &documents, &hashes, known) {
            return (file, snap, keys);
        }
        let mut snap = Snapshot::default();
        parse_into(path, text, &mut snap);
        let keys = snap.objects.keys().map(|k| (k.clone(), 0)).collect();
        return (file, snap, keys);
    }
    let mut snap = Snapshot::default();
    parse_into(path, text, &mut snap);
    let keys = snap.objects.keys().map(|k| (k.clone(), 0)).collect();
    (text_hash(text), snap, keys)
}

/// [`decode_file`]'s documents one by one; `None` when the file must be decoded whole.
fn decode_documents(
    path: &Path,
    documents: &[&str],
    hashes: &[u64],
    known: &[(ObjectKey, u64)],
) -> Option<(Snapshot, Vec<(ObjectKey, u64)>)> {
    let mut snap = Snapshot::default();
    let mut keys = Vec::new();
    let mut fresh = Vec::new();
    for (i, (document, &hash)) in documents.iter().zip(hashes).enumerate() {
        let kept = known.iter().filter(|(_, h)| *h == hash && hash != 0);
        if kept.clone().next().is_some() {
            if hashes[..i].contains(&hash) {
                return None; // the same document twice: its objects twice
            }
            keys.extend(kept.cloned());
            continue;
        }
        let mut one = Snapshot::default();
        parse_into(path, document, &mut one);
        if !one.errors.is_empty() {
            return None;
        }
        fresh.extend(one.objects.keys().map(|k| (k.clone(), hash)));
        snap.objects.append(&mut one.objects);
    }
    // Each object defined once: not by two decoded documents, nor by a kept and a decoded one.
    let once = snap.objects.len() == fresh.len()
        && keys.iter().all(|(k, _)| !snap.objects.contains_key(k));
    if !once {
        return None;
    }
    keys.append(&mut fresh);
    Some((snap, keys))
}

fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            manifest_files(&path, out)?;
        } else if is_manifest(&path) {
            out.push(path);
        }
    }
    Ok(())
}

impl DirIndex {
    /// An index of nothing yet, for the proxy on the node named `node`.
    #[must_use]
    pub fn new(node: &str) -> DirIndex {
        DirIndex {
            node: node.into(),
            files: BTreeMap::new(),
            owners: HashMap::new(),
        }
    }

    /// Reads every manifest under `dir` for the proxy on the node named `node`; returns the
    /// index and the events of a first load.
    pub fn load(dir: &Path, node: &str) -> Result<(DirIndex, Vec<Event>), DirError> {
        let mut index = DirIndex::new(node);
        let events = index.rescan(dir)?;
        Ok((index, events))
    }

    /// Re-reads the whole directory (after a watch error, or at start).
    pub fn rescan(&mut self, dir: &Path) -> Result<Vec<Event>, DirError> {
        let mut files = Vec::new();
        manifest_files(dir, &mut files).map_err(|source| DirError {
            dir: dir.to_owned(),
            source,
        })?;
        files.sort();
        let mut paths: BTreeSet<PathBuf> = files.into_iter().collect();
        paths.extend(self.files.keys().map(|p| p.to_path_buf()));
        Ok(self.update(paths))
    }

    /// The first read of `files` (sorted, none of them known yet), sent to `tx` as it goes,
    /// FIRST_READ_CHUNK files a batch: the proxier programs nothing before InitialSyncDone, and
    /// the parsed API objects of 10,000 Services never need to be in memory at once.
    ///
    /// The files are read on two threads, each reading, parsing and converting a half of them
    /// into the model and sending its own batches: the API objects are freed on the thread that
    /// decoded them, so glibc's per-thread arenas keep none of them. An object that several
    /// files define is sent again from the first of them, as [`DirIndex::update`] holds it.
    fn first_read<S: SourceSink>(&mut self, files: &[PathBuf], tx: &S) -> Result<(), Closed> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
        let (first, second) = files.split_at(if threads > 1 {
            files.len() / 2
        } else {
            files.len()
        });
        let (first, second) = std::thread::scope(|scope| {
            let node = &*self.node;
            let second = scope.spawn(|| read_files(second, node, tx));
            let first = read_files(first, node, tx);
            let second = second
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (first, second)
        });
        // The halves are in path order, one after the other: the index is built from them in
        // one pass (inserting 10,000 paths one by one, comparing paths component by component,
        // took a sixth of the read's CPU time, after both threads were done).
        let read: Vec<(Arc<Path>, FileEntry)> = first?.into_iter().chain(second?).collect();
        self.owners
            .reserve(read.iter().map(|(_, entry)| entry.keys.len()).sum());
        let mut shared = BTreeSet::new();
        for (path, entry) in &read {
            for (key, _) in &entry.keys {
                let owners = self
                    .owners
                    .entry(key.clone())
                    .or_insert_with(|| Vec::with_capacity(1));
                owners.push(path.clone());
                if owners.len() > 1 {
                    shared.insert(owners[0].clone());
                }
            }
        }
        if self.files.is_empty() {
            self.files = read.into_iter().collect();
        } else {
            self.files.extend(read);
        }
        if shared.is_empty() {
            return Ok(());
        }
        tx.send(SourceUpdate::Events(
            self.read(shared.iter().cloned().collect(), shared),
        ))
    }

    /// Re-reads `paths` (files that changed, appeared or disappeared) and returns the events
    /// that bring a model up to date.
    pub fn update(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> Vec<Event> {
        self.read(paths.into_iter().map(Arc::from).collect(), BTreeSet::new())
    }

    /// [`DirIndex::update`] of `queue`, reading the files in `forced` even if unchanged.
    fn read(&mut self, mut queue: Vec<Arc<Path>>, mut forced: BTreeSet<Arc<Path>>) -> Vec<Event> {
        let mut applies: BTreeMap<ObjectKey, crate::source::Object> = BTreeMap::new();
        let mut lost: BTreeSet<ObjectKey> = BTreeSet::new();
        while let Some(path) = queue.pop() {
            let text = if is_manifest(&path) {
                std::fs::read_to_string(&path).ok()
            } else {
                None
            };
            let (path, old) = match self.files.get_key_value(&path) {
                Some((known, entry)) => (known.clone(), Some(entry.clone())),
                None => (path, None),
            };
            let force = forced.contains(&path);
            // A file read for another's sake sends all its objects: none is kept unread.
            let known = match &old {
                Some(entry) if !force => &entry.keys[..],
                _ => &[],
            };
            let read = text.as_deref().map(|text| decode_file(&path, text, known));
            let hash = read.as_ref().map(|(hash, ..)| *hash);
            if !force && old.as_ref().map(|e| e.hash) == hash && hash.is_some() {
                continue;
            }
            let (snap, mut keys) = match read {
                Some((_, snap, keys)) => (snap, keys),
                None => (Snapshot::default(), Vec::new()),
            };
            for error in &snap.errors {
                tracing::warn!(%error, "manifest skipped");
            }
            // A file that no longer parses whole keeps the objects it had: a typo in an edit
            // must not delete live Services. They go when the file is fixed or removed.
            let damaged = !snap.errors.is_empty();
            let present: BTreeSet<&ObjectKey> = keys.iter().map(|(k, _)| k).collect();
            let mut damaged_kept = Vec::new();
            for (key, _) in old.iter().flat_map(|e| &e.keys) {
                if present.contains(key) {
                    continue;
                }
                if damaged {
                    tracing::warn!(file = %path.display(), object = %key.name, "kept while its file does not parse");
                    // Not kept by its document's hash: it is decoded again once the file is fixed.
                    damaged_kept.push((key.clone(), 0));
                    continue;
                }
                let owners = self.owners.entry(key.clone()).or_default();
                owners.retain(|p| *p != path);
                if let Some(other) = owners.first() {
                    // Still defined elsewhere: that file's version is the one that holds.
                    if forced.insert(other.clone()) {
                        queue.push(other.clone());
                    }
                } else {
                    self.owners.remove(key);
                    lost.insert(key.clone());
                }
            }
            drop(present);
            keys.append(&mut damaged_kept);
            keys.shrink_to_fit();
            for (key, object) in snap.objects {
                let owners = self
                    .owners
                    .entry(key.clone())
                    .or_insert_with(|| Vec::with_capacity(1));
                if let Err(at) = owners.binary_search(&path) {
                    owners.insert(at, path.clone());
                }
                lost.remove(&key);
                applies.insert(key, object);
            }
            match hash {
                Some(hash) => {
                    self.files.insert(path, FileEntry { hash, keys });
                }
                None => {
                    self.files.remove(&path);
                }
            }
        }
        let mut events: Vec<Event> = lost.into_iter().map(Event::Delete).collect();
        events.extend(applies.values().map(|o| Event::apply(o, &self.node)));
        events
    }

    /// How many objects the directory defines.
    #[must_use]
    pub fn object_count(&self) -> usize {
        self.owners.len()
    }
}

/// Reads `files` for a first read, sending their objects' events (for the proxy on `node`) a
/// batch of FIRST_READ_CHUNK files at a time; returns what the index keeps of each file.
fn read_files<S: SourceSink>(
    files: &[PathBuf],
    node: &str,
    tx: &S,
) -> Result<Vec<(Arc<Path>, FileEntry)>, Closed> {
    let mut read = Vec::with_capacity(files.len());
    for chunk in files.chunks(FIRST_READ_CHUNK) {
        let mut events = Vec::new();
        for file in chunk {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue; // gone since it was listed
            };
            let (hash, snap, mut keys) = decode_file(file, &text, &[]);
            for error in &snap.errors {
                tracing::warn!(%error, "manifest skipped");
            }
            events.extend(snap.objects.values().map(|o| Event::apply(o, node)));
            keys.shrink_to_fit();
            let entry = FileEntry { hash, keys };
            read.push((Arc::from(file.as_path()), entry));
        }
        if !events.is_empty() {
            tx.send(SourceUpdate::Events(events))?;
        }
    }
    Ok(read)
}

/// Errors that stop the watch.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("cannot watch {dir}: {source}")]
    Watch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads what `changes` names and sends its events; fails once the receiver is gone.
fn apply_changes<S: SourceSink>(
    index: &mut DirIndex,
    dir: &Path,
    changes: Changes,
    tx: &S,
) -> Result<(), Closed> {
    let started = std::time::Instant::now();
    let files = changes.paths.len();
    let events = if changes.rescan {
        match index.rescan(dir) {
            Ok(events) => events,
            Err(error) => {
                tracing::error!(%error, "manifests directory unreadable; keeping the last state");
                return Ok(());
            }
        }
    } else {
        index.update(changes.paths)
    };
    let took = started.elapsed();
    let count = events.len();
    // Sent before the line is logged: writing it is no part of a change's way to the kernel.
    let sent = if events.is_empty() {
        Ok(())
    } else {
        tx.send(SourceUpdate::Events(events))
    };
    tracing::debug!(
        files,
        rescan = changes.rescan,
        events = count,
        took_ms = took.as_secs_f64() * 1000.0,
        "manifest changes read"
    );
    sent
}

/// The watcher's thread: the first read of `files`, `InitialSyncDone`, then each batch of
/// inotify's events read, its files read and their objects sent straight to the proxier's
/// queue, until the receiver is gone or the watch ends. Changes made during the first read
/// wait in the kernel's queue until it is done (an overflow there reads the tree again).
fn follow<S: SourceSink>(
    mut watch: TreeWatch,
    dir: &Path,
    node: &str,
    files: Vec<PathBuf>,
    tx: &S,
    stopping: &AtomicBool,
) {
    let mut index = DirIndex::new(node);
    if index.first_read(&files, tx).is_err() {
        return;
    }
    // The listing is the index's now (0.7 MiB at 10,000 files): not kept for the watch.
    drop(files);
    tracing::info!(dir = %dir.display(), objects = index.object_count(), "manifests read");
    if tx.send(SourceUpdate::InitialSyncDone).is_err() {
        return;
    }
    loop {
        let mut changes = Changes::default();
        match watch.wait(&mut changes) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::error!(%error, dir = %dir.display(), "cannot read the manifests directory's changes; keeping the last state");
                return;
            }
        }
        let ended = changes.ended;
        if changes.any() && apply_changes(&mut index, dir, changes, tx).is_err() {
            return;
        }
        if ended {
            if !stopping.load(Ordering::Relaxed) {
                tracing::error!(dir = %dir.display(), "manifests directory removed or moved; keeping the last state");
            }
            return;
        }
    }
}

/// Ends the watcher's thread when [`watch_dir`] ends (or is dropped).
struct StopOnDrop {
    stopper: Option<Stopper>,
    stopping: Arc<AtomicBool>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(stopper) = self.stopper.take() {
            stopper.stop();
        }
    }
}

/// Sends the directory's objects, converted for the proxy on the node named `node`, then
/// `InitialSyncDone`, then a batch per change, until the receiver is dropped. The reading is
/// done on a thread of its own (see [`follow`]).
pub async fn watch_dir<S: SourceSink + Clone>(
    dir: PathBuf,
    node: &str,
    tx: S,
) -> Result<(), WatchError> {
    // Watch before the first read, so a change made during it is not missed.
    let watch = TreeWatch::new(&dir).map_err(|source| WatchError::Watch {
        dir: dir.clone(),
        source,
    })?;
    let mut files = Vec::new();
    manifest_files(&dir, &mut files).map_err(|source| DirError {
        dir: dir.clone(),
        source,
    })?;
    files.sort();
    let stop = StopOnDrop {
        stopper: Some(watch.stopper()),
        stopping: Arc::new(AtomicBool::new(false)),
    };
    let (stopping, thread_tx, thread_dir) = (stop.stopping.clone(), tx.clone(), dir.clone());
    let thread_node = node.to_owned();
    std::thread::Builder::new()
        .name("manifests".into())
        .spawn(move || {
            follow(
                watch,
                &thread_dir,
                &thread_node,
                files,
                &thread_tx,
                &stopping,
            );
        })
        .map_err(|source| WatchError::Watch {
            dir: dir.clone(),
            source,
        })?;
    tx.closed().await;
    drop(stop);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::source::{Kind, SourceReceiver, channel};

    const SVC_A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n";
    const SVC_B: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: default}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{port: 80}]\n";

    fn names(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Apply(o) => format!("apply {}", o.key().name),
                Event::Delete(k) => format!("delete {}", k.name),
            })
            .collect()
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tempdir(tag: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("ipvs-proxy-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    #[test]
    fn only_changed_files_are_reread_and_unchanged_ones_send_nothing() {
        let dir = tempdir("reread");
        std::fs::write(dir.0.join("a.yaml"), SVC_A).unwrap();
        std::fs::write(dir.0.join("b.yaml"), SVC_B).unwrap();
        let (mut index, events) = DirIndex::load(&dir.0, "node-a").unwrap();
        assert_eq!(names(&events), ["apply a", "apply b"]);
        assert!(
            index.update([dir.0.join("a.yaml")]).is_empty(),
            "same text: nothing to send"
        );
        std::fs::write(
            dir.0.join("a.yaml"),
            SVC_A.replace("port: 80", "port: 8080"),
        )
        .unwrap();
        assert_eq!(names(&index.update([dir.0.join("a.yaml")])), ["apply a"]);
    }

    #[test]
    fn only_the_documents_whose_text_changed_are_sent_again() {
        let dir = tempdir("documents");
        let slice = |ip: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]\n"
            )
        };
        let path = dir.0.join("a.yaml");
        std::fs::write(&path, format!("{SVC_A}---\n{}", slice("10.244.0.1"))).unwrap();
        let (mut index, events) = DirIndex::load(&dir.0, "node-a").unwrap();
        assert_eq!(names(&events), ["apply a", "apply a-1"]);
        std::fs::write(&path, format!("{SVC_A}---\n{}", slice("10.244.0.2"))).unwrap();
        assert_eq!(names(&index.update([path.clone()])), ["apply a-1"]);
        // The slice's document moved first, the Service's edited: the Service alone.
        let edited = SVC_A.replace("port: 80", "port: 8080");
        std::fs::write(&path, format!("{}---\n{edited}", slice("10.244.0.2"))).unwrap();
        assert_eq!(names(&index.update([path.clone()])), ["apply a"]);
        // The Service's document gone, the slice's kept: the Service is deleted.
        std::fs::write(&path, format!("{}---\n", slice("10.244.0.2"))).unwrap();
        assert_eq!(names(&index.update([path.clone()])), ["delete a"]);
        // The same document twice is decoded whole, the object once.
        let twice = format!("{SVC_A}---\n{SVC_A}");
        std::fs::write(&path, &twice).unwrap();
        assert_eq!(
            names(&index.update([path.clone()])),
            ["delete a-1", "apply a"]
        );
        assert_eq!(index.object_count(), 1);
        std::fs::write(&path, format!("{twice}---\n{}", slice("10.244.0.3"))).unwrap();
        assert_eq!(
            names(&index.update([path.clone()])),
            ["apply a", "apply a-1"]
        );
    }

    #[test]
    fn a_removed_file_deletes_its_objects_unless_another_file_defines_them() {
        let dir = tempdir("remove");
        std::fs::write(dir.0.join("a.yaml"), SVC_A).unwrap();
        std::fs::write(
            dir.0.join("copy-of-a.yaml"),
            SVC_A.replace("10.96.0.10", "10.96.0.12"),
        )
        .unwrap();
        std::fs::write(dir.0.join("b.yaml"), SVC_B).unwrap();
        let (mut index, _) = DirIndex::load(&dir.0, "node-a").unwrap();
        std::fs::remove_file(dir.0.join("b.yaml")).unwrap();
        let events = index.update([dir.0.join("b.yaml")]);
        assert!(
            matches!(&events[..], [Event::Delete(k)] if k.kind == Kind::Service && &*k.name == "b")
        );
        std::fs::remove_file(dir.0.join("copy-of-a.yaml")).unwrap();
        let events = index.update([dir.0.join("copy-of-a.yaml")]);
        assert_eq!(
            names(&events),
            ["apply a"],
            "the other file's definition is re-applied, not deleted"
        );
    }

    #[test]
    fn an_edit_that_breaks_a_file_keeps_its_objects_until_it_is_fixed() {
        let dir = tempdir("broken-edit");
        std::fs::write(dir.0.join("ab.yaml"), format!("{SVC_A}---\n{SVC_B}")).unwrap();
        let (mut index, _) = DirIndex::load(&dir.0, "node-a").unwrap();
        std::fs::write(
            dir.0.join("ab.yaml"),
            format!("{SVC_A}---\nkind: Service\nmetadata: [oops\n"),
        )
        .unwrap();
        let events = index.update([dir.0.join("ab.yaml")]);
        assert_eq!(names(&events), ["apply a"], "b is not deleted by a typo");
        std::fs::write(dir.0.join("ab.yaml"), SVC_A).unwrap();
        assert_eq!(
            names(&index.update([dir.0.join("ab.yaml")])),
            ["delete b", "apply a"],
            "the fixed file decides"
        );
    }

    #[test]
    fn a_malformed_file_is_reported_and_the_rest_keeps_its_objects() {
        let dir = tempdir("malformed");
        std::fs::write(dir.0.join("a.yaml"), SVC_A).unwrap();
        let (mut index, _) = DirIndex::load(&dir.0, "node-a").unwrap();
        std::fs::write(
            dir.0.join("broken.yaml"),
            "kind: Service\nmetadata: [oops\n",
        )
        .unwrap();
        assert!(index.update([dir.0.join("broken.yaml")]).is_empty());
        assert_eq!(index.object_count(), 1);
    }

    #[test]
    fn reading_files_wakes_nothing() {
        let dir = tempdir("access");
        std::fs::write(dir.0.join("a.yaml"), SVC_A).unwrap();
        let mut watch = TreeWatch::new(&dir.0).unwrap();
        // What the index does on every change: read the files.
        let (_index, _) = DirIndex::load(&dir.0, "node-a").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut changes = Changes::default();
        assert!(
            !watch.poll(&mut changes).unwrap(),
            "reads woke the watcher: {changes:?}"
        );
        std::fs::write(dir.0.join("a.yaml"), SVC_B).unwrap();
        assert_eq!(
            drain_notes(&mut watch).paths,
            BTreeSet::from([dir.0.join("a.yaml")])
        );
    }

    async fn next(rx: &mut SourceReceiver) -> SourceUpdate {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an update within 5 s")
            .unwrap()
    }

    /// The next update, which must be one Service applied: its name and first port.
    async fn next_service_port(rx: &mut SourceReceiver) -> (String, i32) {
        let update = next(rx).await;
        let SourceUpdate::Events(events) = update else {
            panic!("expected events, got {update:?}");
        };
        let [
            Event::Apply(crate::source::Model::Service {
                name,
                ports: Ok(ports),
            }),
        ] = &events[..]
        else {
            panic!("expected one Service applied, got {events:?}");
        };
        (name.name.to_string(), ports[0].port.into())
    }

    #[tokio::test]
    async fn watching_sends_the_first_read_then_each_change() {
        let dir = tempdir("watch");
        std::fs::write(dir.0.join("a.yaml"), SVC_A).unwrap();
        let (tx, mut rx) = channel(None);
        let task = tokio::spawn(watch_dir(dir.0.clone(), "node-a", tx));
        assert!(matches!(next(&mut rx).await, SourceUpdate::Events(e) if names(&e) == ["apply a"]));
        assert_eq!(next(&mut rx).await, SourceUpdate::InitialSyncDone);
        std::fs::write(dir.0.join("b.yaml"), SVC_B).unwrap();
        assert!(matches!(next(&mut rx).await, SourceUpdate::Events(e) if names(&e) == ["apply b"]));
        std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
        assert!(
            matches!(next(&mut rx).await, SourceUpdate::Events(e) if names(&e) == ["delete a"])
        );
        drop(rx);
        task.abort();
    }

    #[tokio::test]
    async fn an_object_two_files_define_is_the_first_files_after_the_first_read() {
        let dir = tempdir("first-read-shared");
        std::fs::write(dir.0.join("a.yaml"), SVC_A).unwrap();
        std::fs::write(dir.0.join("b.yaml"), SVC_B).unwrap();
        std::fs::write(
            dir.0.join("copy-of-a.yaml"),
            SVC_A.replace("10.96.0.10", "10.96.0.12"),
        )
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(watch_dir(dir.0.clone(), "node-a", tx));
        let mut last_a = None;
        let mut applied = BTreeSet::new();
        loop {
            match next_of(&mut rx).await {
                SourceUpdate::Events(events) => {
                    for event in events {
                        let Event::Apply(crate::source::Model::Service { name, ports }) = event
                        else {
                            panic!("unexpected {event:?}");
                        };
                        applied.insert(name.name.to_string());
                        if &*name.name == "a" {
                            last_a = Some(ports.unwrap()[0].cluster_ips[0].to_string());
                        }
                    }
                }
                SourceUpdate::InitialSyncDone => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(applied, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
        assert_eq!(
            last_a.as_deref(),
            Some("10.96.0.10"),
            "a.yaml's, not its copy's"
        );
        task.abort();
    }

    async fn next_of(rx: &mut tokio::sync::mpsc::UnboundedReceiver<SourceUpdate>) -> SourceUpdate {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an update within 5 s")
            .unwrap()
    }

    /// What the events of `watch` changed, until none comes for 300 ms.
    fn drain_notes(watch: &mut TreeWatch) -> Changes {
        let mut changes = Changes::default();
        let mut quiet = std::time::Instant::now();
        while quiet.elapsed() < Duration::from_millis(300) {
            if watch.poll(&mut changes).unwrap() {
                quiet = std::time::Instant::now();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        changes
    }

    #[test]
    fn a_file_is_read_when_its_writer_closes_it_not_while_it_is_written() {
        use std::io::Write as _;
        let dir = tempdir("close-write");
        let mut watch = TreeWatch::new(&dir.0).unwrap();
        let path = dir.0.join("a.yaml");
        let mut file = std::fs::File::create(&path).unwrap();
        let (half, rest) = SVC_A.split_at(SVC_A.len() / 2);
        file.write_all(half.as_bytes()).unwrap();
        file.flush().unwrap();
        let changes = drain_notes(&mut watch);
        assert!(
            !changes.any(),
            "a file still being written was noted: {changes:?}"
        );
        file.write_all(rest.as_bytes()).unwrap();
        drop(file);
        let changes = drain_notes(&mut watch);
        assert_eq!(changes.paths, BTreeSet::from([path]));
        assert!(!changes.rescan);
    }

    #[test]
    fn a_file_renamed_into_place_is_read_once() {
        let dir = tempdir("rename");
        let mut watch = TreeWatch::new(&dir.0).unwrap();
        let tmp = dir.0.join(".a.yaml.tmp");
        std::fs::write(&tmp, SVC_A).unwrap();
        std::fs::rename(&tmp, dir.0.join("a.yaml")).unwrap();
        // Each batch of events that notes a path is one read of it.
        let mut reads = Vec::new();
        let mut quiet = std::time::Instant::now();
        while quiet.elapsed() < Duration::from_millis(300) {
            let mut changes = Changes::default();
            if watch.poll(&mut changes).unwrap() {
                quiet = std::time::Instant::now();
            }
            assert!(!changes.rescan);
            reads.extend(changes.paths);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(reads, vec![dir.0.join("a.yaml")]);
    }

    #[test]
    fn links_made_into_the_directory_are_changes() {
        let dir = tempdir("links");
        let outside = tempdir("links-outside");
        std::fs::write(outside.0.join("a.yaml"), SVC_A).unwrap();
        std::fs::write(outside.0.join("b.yaml"), SVC_B).unwrap();
        let mut watch = TreeWatch::new(&dir.0).unwrap();
        std::os::unix::fs::symlink(outside.0.join("a.yaml"), dir.0.join("a.yaml")).unwrap();
        std::fs::hard_link(outside.0.join("b.yaml"), dir.0.join("b.yaml")).unwrap();
        assert_eq!(
            drain_notes(&mut watch).paths,
            BTreeSet::from([dir.0.join("a.yaml"), dir.0.join("b.yaml")])
        );
    }

    #[tokio::test]
    async fn a_subdirectory_made_moved_in_or_out_is_followed() {
        let dir = tempdir("subdirs");
        let outside = tempdir("subdirs-outside");
        std::fs::write(dir.0.join("a.yaml"), SVC_A).unwrap();
        let (tx, mut rx) = channel(None);
        let task = tokio::spawn(watch_dir(dir.0.clone(), "node-a", tx));
        assert!(matches!(next(&mut rx).await, SourceUpdate::Events(e) if names(&e) == ["apply a"]));
        assert_eq!(next(&mut rx).await, SourceUpdate::InitialSyncDone);
        std::fs::create_dir(outside.0.join("team")).unwrap();
        std::fs::write(outside.0.join("team/b.yaml"), SVC_B).unwrap();
        std::fs::rename(outside.0.join("team"), dir.0.join("team")).unwrap();
        assert!(matches!(next(&mut rx).await, SourceUpdate::Events(e) if names(&e) == ["apply b"]));
        // The moved-in directory is watched too.
        let edited = SVC_B.replace("port: 80", "port: 8080");
        std::fs::write(dir.0.join("team/b.yaml"), &edited).unwrap();
        assert!(matches!(next(&mut rx).await, SourceUpdate::Events(e) if names(&e) == ["apply b"]));
        std::fs::rename(dir.0.join("team"), outside.0.join("team")).unwrap();
        assert!(
            matches!(next(&mut rx).await, SourceUpdate::Events(e) if names(&e) == ["delete b"])
        );
        // Moved away, it is no longer followed: an edit there changes nothing.
        std::fs::write(outside.0.join("team/b.yaml"), SVC_B).unwrap();
        std::fs::create_dir(dir.0.join("new")).unwrap();
        std::fs::write(dir.0.join("new/b.yaml"), &edited).unwrap();
        assert_eq!(
            next_service_port(&mut rx).await,
            ("b".to_owned(), 8080),
            "only the new directory's file"
        );
        drop(rx);
        task.abort();
    }

    /// kubelet's layout of a mounted ConfigMap: `a.yaml -> ..data/a.yaml`, `..data -> ..v1`; an
    /// update writes `..v2`, points `..data_tmp` at it and renames that over `..data`.
    #[tokio::test]
    async fn a_configmap_update_by_kubelet_is_followed() {
        let dir = tempdir("configmap");
        std::fs::create_dir(dir.0.join("..v1")).unwrap();
        std::fs::write(dir.0.join("..v1/a.yaml"), SVC_A).unwrap();
        std::os::unix::fs::symlink("..v1", dir.0.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/a.yaml", dir.0.join("a.yaml")).unwrap();
        let (tx, mut rx) = channel(None);
        let task = tokio::spawn(watch_dir(dir.0.clone(), "node-a", tx));
        assert!(matches!(next(&mut rx).await, SourceUpdate::Events(e) if names(&e) == ["apply a"]));
        assert_eq!(next(&mut rx).await, SourceUpdate::InitialSyncDone);
        std::fs::create_dir(dir.0.join("..v2")).unwrap();
        let edited = SVC_A.replace("port: 80", "port: 8080");
        std::fs::write(dir.0.join("..v2/a.yaml"), &edited).unwrap();
        std::os::unix::fs::symlink("..v2", dir.0.join("..data_tmp")).unwrap();
        std::fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).unwrap();
        assert_eq!(next_service_port(&mut rx).await, ("a".to_owned(), 8080));
        drop(rx);
        task.abort();
    }
}
