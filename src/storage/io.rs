//! The fault seam: every call that changes a file of a data directory goes through [`FileIo`]:
//! writes (plain and vectored), length changes (preallocation cuts, index growth and trims),
//! data and directory syncs (logs, indexes, checkpoints), creation and renames.
//!
//! Production uses [`RealIo`]. Tests hand a partition their own implementation to inject a short
//! write, `ENOSPC`, a failed `set_len` or `fdatasync`, to count syncs, and to record every
//! directory entry made (file and directory creation, rename) and every directory sync. The seam
//! is deliberately narrow so that a fault model covers it all. Small state files (checkpoints, topic configs) are
//! replaced with [`replace_file`]; directories are made with [`create_dir_all`], which syncs
//! the parent of every directory it creates (a new entry exists after a power cut only once its
//! parent directory was synced).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::Path;

/// Mode of every file the broker creates: its owner only, whatever the umask adds.
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of every directory the broker creates (the data directory included).
pub const PRIVATE_DIR: u32 = 0o700;

/// The file operations whose failure matters for durability.
pub trait FileIo: Send + Sync + std::fmt::Debug + 'static {
    /// Writes all of `buf` at `pos`. A failure may leave a prefix written.
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], pos: u64) -> io::Result<()>;
    /// Writes the buffers back to back from `pos`. A failure may leave a prefix written.
    /// The default writes them one by one through [`FileIo::write_at`].
    fn write_vectored_at(
        &self,
        path: &Path,
        file: &File,
        bufs: &[&[u8]],
        mut pos: u64,
    ) -> io::Result<()> {
        for buf in bufs {
            self.write_at(path, file, buf, pos)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }
    /// Cuts or extends a file (`ftruncate`).
    fn set_len(&self, _path: &Path, file: &File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }
    /// `fdatasync`: the written bytes (and the file length) are on stable storage.
    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()>;
    /// `fsync` of a directory, so that created, renamed or removed entries are durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Atomic rename within one filesystem.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Creates one directory (its parent exists), readable by its owner only
    /// ([`PRIVATE_DIR`]).
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(PRIVATE_DIR).create(dir)
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

    fn write_vectored_at(
        &self,
        _path: &Path,
        file: &File,
        bufs: &[&[u8]],
        pos: u64,
    ) -> io::Result<()> {
        pwritev_all(file, bufs, pos)
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

/// A seam that refuses every change: what a dry run opens a data directory with. A partition
/// opened after a clean close writes nothing; one that needs recovery (or anything else that
/// would write) fails with [`READ_ONLY`] instead of changing a file.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadOnlyIo;

/// The error text of every change [`ReadOnlyIo`] refuses.
pub const READ_ONLY: &str = "opened read-only: nothing may be written";

fn refused() -> io::Error {
    io::Error::new(io::ErrorKind::ReadOnlyFilesystem, READ_ONLY)
}

impl FileIo for ReadOnlyIo {
    fn write_at(&self, _: &Path, _: &File, _: &[u8], _: u64) -> io::Result<()> {
        Err(refused())
    }
    fn set_len(&self, _: &Path, _: &File, _: u64) -> io::Result<()> {
        Err(refused())
    }
    fn sync_data(&self, _: &Path, _: &File) -> io::Result<()> {
        Err(refused())
    }
    fn sync_dir(&self, _: &Path) -> io::Result<()> {
        Err(refused())
    }
    fn rename(&self, _: &Path, _: &Path) -> io::Result<()> {
        Err(refused())
    }
    fn create_dir(&self, _: &Path) -> io::Result<()> {
        Err(refused())
    }
    fn create_file(&self, path: &Path, options: &OpenOptions) -> io::Result<File> {
        // Files are opened for writing only to change them.
        let _ = (path, options);
        Err(refused())
    }
}

/// Replaces `path` atomically with `contents`: write a temp file beside it, sync it, rename it
/// over the old one, sync the directory. A crash leaves either the old or the new file.
pub fn replace_file(io: &dyn FileIo, path: &Path, contents: &[u8]) -> io::Result<()> {
    let (dir, tmp, file) = write_temp(io, path, contents)?;
    io.sync_data(&tmp, &file)?;
    drop(file);
    io.rename(&tmp, path)?;
    io.sync_dir(dir)
}

/// Creates (or truncates) `path` for writing, readable by the owner only.
pub fn create_private(io: &dyn FileIo, path: &Path) -> io::Result<File> {
    io.create_file(
        path,
        OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(PRIVATE_FILE),
    )
}

/// Writes `contents` to `<path>.tmp`; returns the directory, the temp path and its file.
fn write_temp<'p>(
    io: &dyn FileIo,
    path: &'p Path,
    contents: &[u8],
) -> io::Result<(&'p Path, std::path::PathBuf, File)> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let file = create_private(io, &tmp)?;
    io.write_at(&tmp, &file, contents, 0)?;
    Ok((dir, tmp, file))
}

/// Replaces `path` with `contents` through a temp file and a rename, with no sync: for a file
/// whose loss or damage in a machine crash is harmless because it carries its own checksum and
/// is only a hint (the recovery checkpoint: without it recovery scans further back). Whatever
/// it describes must be durable before this is called.
pub fn replace_file_unsynced(io: &dyn FileIo, path: &Path, contents: &[u8]) -> io::Result<()> {
    let (_, tmp, file) = write_temp(io, path, contents)?;
    drop(file);
    io.rename(&tmp, path)
}

/// `pwritev` until every buffer is written, at most `IOV_MAX` buffers per call.
fn pwritev_all(file: &File, bufs: &[&[u8]], mut pos: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const IOV_MAX: usize = 1024;
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(IOV_MAX));
    let mut rest = bufs;
    // How much of `rest[0]` an earlier short write already wrote.
    let mut skip = 0usize;
    while let Some(first) = rest.first() {
        if skip == first.len() {
            rest = &rest[1..];
            skip = 0;
            continue;
        }
        iov.clear();
        for (i, b) in rest.iter().take(IOV_MAX).enumerate() {
            let b = if i == 0 { &b[skip..] } else { b };
            iov.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
        }
        let offset = libc::off_t::try_from(pos)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "write position too large"))?;
        // SAFETY: every iovec points into a live slice borrowed for this call, with its length;
        // the kernel only reads them.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, offset) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        let mut n = n as usize;
        pos += n as u64;
        // Advance past what was written.
        while n > 0 {
            let Some(b) = rest.first() else { break };
            let left = b.len() - skip;
            if n < left {
                skip += n;
                n = 0;
            } else {
                n -= left;
                rest = &rest[1..];
                skip = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_writes_land_back_to_back_whatever_the_buffer_count() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("f");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        // More buffers than one call takes, of varied sizes, some empty.
        let owned: Vec<Vec<u8>> = (0..2500u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize])
            .collect();
        let bufs: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        RealIo
            .write_vectored_at(&path, &file, &bufs, 3)
            .unwrap_or_else(|e| panic!("{e}"));
        let got = fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut want = vec![0u8; 3];
        want.extend(owned.concat());
        assert_eq!(got, want);
    }
}
