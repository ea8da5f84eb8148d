//! Which manifests under a directory tree changed, straight from inotify.
//!
//! Only the events that can change what a file holds are asked for: a writer's close
//! (`CLOSE_WRITE`), renames in and out (`MOVED_TO`, `MOVED_FROM`), creations (`CREATE`: links
//! and directories, which have no writer to wait for) and deletions. Opens, reads, writes
//! and attribute changes never wake the watcher, our own reads of the changed files
//! included; a file is read once its writer closes it, never half-written. The events are
//! read on the thread that then reads the files ([`crate::watch`]), so a change costs one
//! wake-up of that thread per batch of events and no hand-off before the sync loop's.
//!
//! Every directory under the root is watched, but for hidden ones (`..data`, `..2024_01_01`
//! of a mounted ConfigMap, `.git`), as the directory is read. A directory that appears,
//! moves in or leaves asks for the whole tree to be read again, and so does a lost event
//! (the kernel's queue overflowed) or kubelet's swap of a mounted ConfigMap's `..data` link.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

use crate::manifests::is_manifest;

/// The events that can change a manifest's content.
const CONTENT: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// What a batch of events changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The manifests written, renamed in or out, linked or deleted.
    pub paths: BTreeSet<PathBuf>,
    /// The whole tree must be read again.
    pub rescan: bool,
    /// The root is no longer watched (removed, moved, or [`Stopper::stop`]): no event will
    /// come any more.
    pub ended: bool,
}

impl Changes {
    /// Whether there is anything to read.
    #[must_use]
    pub fn any(&self) -> bool {
        self.rescan || !self.paths.is_empty()
    }
}

/// The inotify watches of a directory tree.
#[derive(Debug)]
pub struct TreeWatch {
    inotify: Inotify,
    root_wd: WatchDescriptor,
    /// Each watched directory, by its watch.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    buffer: Vec<u8>,
}

/// Ends a [`TreeWatch`]'s wait from another thread.
#[derive(Debug)]
pub struct Stopper {
    watches: Watches,
    root_wd: WatchDescriptor,
}

impl Stopper {
    /// Removes the root's watch: the watch's next (or current) wait returns, ended.
    pub fn stop(mut self) {
        // Already gone (the directory was removed) is as good.
        let _ = self.watches.remove(self.root_wd);
    }
}

impl TreeWatch {
    /// Watches `root` and every directory under it that is not hidden.
    pub fn new(root: &Path) -> std::io::Result<TreeWatch> {
        let inotify = Inotify::init()?;
        let root_wd = inotify.watches().add(root, CONTENT)?;
        let mut watch = TreeWatch {
            inotify,
            root_wd: root_wd.clone(),
            dirs: HashMap::from([(root_wd, root.to_owned())]),
            buffer: vec![0; 64 * 1024],
        };
        watch.add_subdirs(root)?;
        Ok(watch)
    }

    /// What ends [`TreeWatch::wait`] from another thread.
    #[must_use]
    pub fn stopper(&self) -> Stopper {
        Stopper {
            watches: self.inotify.watches(),
            root_wd: self.root_wd.clone(),
        }
    }

    fn add_subdirs(&mut self, dir: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if hidden(&entry.file_name()) || !entry.file_type()?.is_dir() {
                continue;
            }
            self.add_tree(&entry.path())?;
        }
        Ok(())
    }

    fn add_tree(&mut self, dir: &Path) -> std::io::Result<()> {
        let wd = self.inotify.watches().add(dir, CONTENT)?;
        self.dirs.insert(wd, dir.to_owned());
        self.add_subdirs(dir)
    }

    /// Stops watching `dir` and what was under it (it moved away).
    fn forget_tree(&mut self, dir: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.starts_with(dir))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.inotify.watches().remove(wd);
        }
    }

    /// Blocks until events come, and adds what they changed to `changes`.
    pub fn wait(&mut self, changes: &mut Changes) -> std::io::Result<()> {
        let mut buffer = std::mem::take(&mut self.buffer);
        let read = self
            .inotify
            .read_events_blocking(&mut buffer)
            .map(|events| {
                events
                    .map(|e| (e.wd, e.mask, e.name.map(OsStr::to_owned)))
                    .collect::<Vec<_>>()
            });
        self.buffer = buffer;
        for (wd, mask, name) in read? {
            self.note(&wd, mask, name.as_deref(), changes);
        }
        Ok(())
    }

    /// Adds what the events already queued changed to `changes`, without waiting; returns
    /// whether there were any.
    #[cfg(test)]
    pub fn poll(&mut self, changes: &mut Changes) -> std::io::Result<bool> {
        let mut buffer = std::mem::take(&mut self.buffer);
        let read = match self.inotify.read_events(&mut buffer) {
            Ok(events) => Ok(events
                .map(|e| (e.wd, e.mask, e.name.map(OsStr::to_owned)))
                .collect::<Vec<_>>()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        self.buffer = buffer;
        let read = read?;
        let any = !read.is_empty();
        for (wd, mask, name) in read {
            self.note(&wd, mask, name.as_deref(), changes);
        }
        Ok(any)
    }

    fn note(
        &mut self,
        wd: &WatchDescriptor,
        mask: EventMask,
        name: Option<&OsStr>,
        changes: &mut Changes,
    ) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            // Lost events may have been directories made: watch whatever is there now.
            if let Some(root) = self.dirs.get(&self.root_wd).cloned()
                && let Err(error) = self.add_subdirs(&root)
            {
                tracing::warn!(%error, "watching the manifests directory's subdirectories");
            }
            changes.rescan = true;
            return;
        }
        let Some(name) = name else {
            // The watched directory itself. Its parent's own event (a directory deleted or
            // moved) already said what a subdirectory's means; the root's ends the watch.
            if mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                if *wd == self.root_wd {
                    changes.ended = true;
                }
                if mask.contains(EventMask::IGNORED) {
                    self.dirs.remove(wd);
                }
            }
            return;
        };
        let Some(dir) = self.dirs.get(wd) else {
            return; // a directory forgotten, its last events still queued
        };
        let path = dir.join(name);
        if hidden(name) {
            // kubelet updates a mounted ConfigMap by renaming a new `..data` link into place;
            // the visible files are links through it and see no event of their own.
            changes.rescan |= mask.contains(EventMask::MOVED_TO)
                && *wd == self.root_wd
                && name == OsStr::new("..data");
            return;
        }
        if mask.contains(EventMask::ISDIR) {
            if mask.intersects(EventMask::MOVED_FROM | EventMask::DELETE) {
                self.forget_tree(&path);
            } else if let Err(error) = self.add_tree(&path) {
                // Gone again already, or unreadable: the rescan reads what is there.
                tracing::debug!(dir = %path.display(), %error, "not watched");
            }
            changes.rescan = true;
            return;
        }
        if !is_manifest(&path) {
            return;
        }
        // A new file is read at its close; a link (hard or symbolic) has no writer to wait for.
        if mask.contains(EventMask::CREATE) && !is_link(&path) {
            return;
        }
        changes.paths.insert(path);
    }
}

fn hidden(name: &OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

fn is_link(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink() || m.nlink() > 1)
}
