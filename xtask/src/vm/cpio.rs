//! A writer for the "newc" cpio format, the only one the kernel's initramfs unpacker reads.
//!
//! Writing it here (instead of running `cpio`) lets us place host files at any path in the
//! archive without a staging copy, and add device nodes without being root on the host.
//! Format: each entry is a 110-byte ASCII header (`070701` and 13 hex fields), the NUL-ended
//! name, padding to 4 bytes, the data, padding to 4 bytes; the archive ends with `TRAILER!!!`.
//! Archives may be concatenated: the kernel unpacks each in turn, later entries replacing
//! earlier files of the same name.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

#[derive(Debug)]
pub struct Archive<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    /// Directories already in this archive, so that parents are emitted once, before children.
    dirs: HashSet<PathBuf>,
}

impl Archive<BufWriter<File>> {
    /// Starts an archive at the end of `file` (which may already hold other archives).
    pub fn append_to(file: File) -> Self {
        Archive::new(BufWriter::with_capacity(1 << 20, file))
    }
}

impl<W: Write> Archive<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            dirs: HashSet::new(),
        }
    }

    /// Adds a directory (and any missing parents).
    pub fn dir(&mut self, path: &Path, mode: u32) -> Result<()> {
        let name = archive_name(path)?;
        if name.as_os_str().is_empty() || self.dirs.contains(&name) {
            return Ok(());
        }
        self.parents(&name)?;
        self.entry(&name, S_IFDIR | mode, 2, (0, 0), 0)?;
        self.dirs.insert(name);
        Ok(())
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, path: &Path, mode: u32, data: &[u8]) -> Result<()> {
        let name = archive_name(path)?;
        self.parents(&name)?;
        self.entry(&name, S_IFREG | mode, 1, (0, 0), data.len() as u64)?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &Path, target: &Path) -> Result<()> {
        let name = archive_name(path)?;
        self.parents(&name)?;
        let target = target.as_os_str().as_encoded_bytes();
        self.entry(&name, S_IFLNK | 0o777, 1, (0, 0), target.len() as u64)?;
        self.out.write_all(target)?;
        self.written += target.len() as u64;
        self.pad()
    }

    /// Adds a character device node (for `/dev/console` before devtmpfs is mounted).
    pub fn char_device(&mut self, path: &Path, mode: u32, major: u32, minor: u32) -> Result<()> {
        let name = archive_name(path)?;
        self.parents(&name)?;
        self.entry(&name, S_IFCHR | mode, 1, (major, minor), 0)?;
        self.pad()
    }

    /// Copies the host file `source` (following symlinks) to `path` in the archive.
    pub fn copy_file(&mut self, path: &Path, source: &Path) -> Result<()> {
        let mut input =
            File::open(source).with_context(|| format!("opening {}", source.display()))?;
        let meta = input.metadata()?;
        let name = archive_name(path)?;
        self.parents(&name)?;
        self.entry(
            &name,
            S_IFREG | (meta.mode() & 0o7777),
            1,
            (0, 0),
            meta.len(),
        )?;
        let copied = io::copy(&mut (&mut input).take(meta.len()), &mut self.out)?;
        if copied != meta.len() {
            bail!("{} changed size while being archived", source.display());
        }
        self.written += copied;
        self.pad()
    }

    /// Copies a host file, directory tree or symlink to `path`, keeping symlinks inside the tree
    /// as symlinks. `skip` is asked about every host path below `source`.
    pub fn copy_tree(
        &mut self,
        path: &Path,
        source: &Path,
        skip: &dyn Fn(&Path) -> bool,
    ) -> Result<()> {
        let meta = fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
        if meta.is_dir() {
            self.copy_dir(path, source, meta.permissions().mode() & 0o7777, skip)
        } else {
            self.copy_file(path, source)
        }
    }

    fn copy_dir(
        &mut self,
        path: &Path,
        source: &Path,
        mode: u32,
        skip: &dyn Fn(&Path) -> bool,
    ) -> Result<()> {
        self.dir(path, mode)?;
        let mut entries = fs::read_dir(source)
            .with_context(|| format!("listing {}", source.display()))?
            .collect::<io::Result<Vec<_>>>()?;
        // Sorted, so that an archive's bytes depend only on the tree.
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let host = entry.path();
            if skip(&host) {
                continue;
            }
            let inside = path.join(entry.file_name());
            let meta = fs::symlink_metadata(&host)?;
            if meta.file_type().is_symlink() {
                self.symlink(&inside, &fs::read_link(&host)?)?;
            } else if meta.is_dir() {
                self.copy_dir(&inside, &host, meta.permissions().mode() & 0o7777, skip)?;
            } else if meta.is_file() {
                self.copy_file(&inside, &host)?;
            }
            // Sockets, fifos and devices in a source tree are not worth carrying.
        }
        Ok(())
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> Result<W> {
        self.entry(Path::new("TRAILER!!!"), 0, 1, (0, 0), 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, name: &Path) -> Result<()> {
        if let Some(parent) = name.parent()
            && !parent.as_os_str().is_empty()
            && !self.dirs.contains(parent)
        {
            self.dir(&Path::new("/").join(parent), 0o755)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &Path,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        size: u64,
    ) -> Result<()> {
        let Ok(size) = u32::try_from(size) else {
            bail!(
                "{} is larger than the cpio format allows (4 GiB)",
                name.display()
            );
        };
        let name = name.as_os_str().as_encoded_bytes();
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid: root
            0, // gid: root
            nlink,
            0, // mtime
            size,
            0, // device major
            0, // device minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1)?,
            0, // checksum, unused by newc
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            let _ = write!(header, "{field:08X}");
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name)?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        self.pad()
    }

    fn pad(&mut self) -> Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.out.write_all(&[0; 3][..usize::try_from(padding)?])?;
        self.written += padding;
        Ok(())
    }
}

/// The archive's name for an absolute path inside the VM: relative, with no `.` or `..`.
fn archive_name(path: &Path) -> Result<PathBuf> {
    let mut name = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(part) => name.push(part),
            _ => bail!("{} is not a plain absolute path", path.display()),
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parents_come_first() {
        let mut archive = Archive::new(Vec::new());
        archive.file(Path::new("/a/b/c"), 0o644, b"hello").unwrap();
        archive
            .symlink(Path::new("/a/l"), Path::new("b/c"))
            .unwrap();
        let bytes = archive.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let abc = text.find("a/b/c\0").unwrap();
        assert!(a < ab && ab < abc);
        assert!(text.contains("hello"));
        assert!(text.starts_with("070701"));
        // 110-byte header + "TRAILER!!!\0" = 121 bytes, padded with three more NULs.
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"));
    }

    #[test]
    fn relative_and_dotted_paths_are_refused() {
        let mut archive = Archive::new(Vec::new());
        assert!(archive.file(Path::new("/a/../b"), 0o644, b"").is_err());
    }
}
