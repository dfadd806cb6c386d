//! The fault seam: every write and sync of data the log promises to keep goes through [`FileIo`].
//!
//! Production uses [`RealIo`]. Tests hand a partition their own implementation to inject a short
//! write, `ENOSPC` or a failed `fdatasync`, to count syncs, and to record every directory entry
//! made (file and directory creation, rename) and every directory sync. The seam is deliberately
//! narrow so that a fault model covers it all. Small state files (checkpoints, topic configs) are
//! replaced with [`replace_file`]; directories are made with [`create_dir_all`], which syncs
//! the parent of every directory it creates (a new entry exists after a power cut only once its
//! parent directory was synced).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The file operations whose failure matters for durability.
pub trait FileIo: Send + Sync + std::fmt::Debug + 'static {
    /// Writes all of `buf` at `pos`. A failure may leave a prefix written.
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], pos: u64) -> io::Result<()>;
    /// `fdatasync`: the written bytes (and the file length) are on stable storage.
    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()>;
    /// `fsync` of a directory, so that created, renamed or removed entries are durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Atomic rename within one filesystem.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Creates one directory (its parent exists).
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir(dir)
    }
    /// Opens a file that `options` may create.
    fn create_file(&self, path: &Path, options: &OpenOptions) -> io::Result<File> {
        options.open(path)
    }
}

/// Creates `dir` and any missing parents, top down, syncing the parent of each directory it
/// creates before making the next, so that every new entry is durable when this returns.
pub fn create_dir_all(io: &dyn FileIo, dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.exists() {
        missing.push(d);
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match io.create_dir(d) {
            Ok(()) => {}
            // Made meanwhile by someone else, who syncs it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        io.sync_dir(parent)?;
    }
    Ok(())
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealIo;

impl FileIo for RealIo {
    fn write_at(&self, _path: &Path, file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
        file.write_all_at(buf, pos)
    }

    fn sync_data(&self, _path: &Path, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
}

/// Replaces `path` atomically with `contents`: write a temp file beside it, sync it, rename it
/// over the old one, sync the directory. A crash leaves either the old or the new file.
pub fn replace_file(io: &dyn FileIo, path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let file = io.create_file(
        &tmp,
        OpenOptions::new().create(true).write(true).truncate(true),
    )?;
    io.write_at(&tmp, &file, contents, 0)?;
    io.sync_data(&tmp, &file)?;
    drop(file);
    io.rename(&tmp, path)?;
    io.sync_dir(dir)
}
