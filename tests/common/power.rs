//! A power cut, in process: [`PowerIo`] passes every call of the fault seam to the real file
//! system and remembers what a power cut could still take back — each file's changes since its
//! last `fdatasync` and each directory's new entries since its last sync. Once armed, the call
//! that reaches the chosen count and every call after it fail with EIO (the machine is off).
//! [`PowerIo::power_cut`] then rewrites the data directory as the disk could hold it when the
//! power returns:
//!
//! - a file's content is its content at its last sync, then each later change (a write or a
//!   length change, in order) independently kept, lost, or — a write — torn after any byte: the
//!   page cache writes pages back in any order, a lost extension leaves zeros before a later
//!   write that made it;
//! - a directory keeps a prefix of its unsynced entries (file and directory creations, renames
//!   into it; the file system's journal commits them in order), the rest are undone newest first:
//!   a created entry vanishes, a renamed file moves back and the file it replaced returns.
//!
//! What the seam does not carry is taken as written at once: stores through an index file's
//! mapping (derived data, checked and rebuilt at open) and removals of files (a removed file
//! that came back after a cut would be an old segment or a leftover, which recovery cleans).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sluice::storage::{FileIo, RealIo};

/// A small deterministic random source (splitmix64): a failing case replays from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One unsynced change to a file's content.
#[derive(Debug)]
enum Change {
    Write {
        pos: u64,
        /// The file's length before.
        old_len: u64,
        /// The bytes it overwrote (those below `old_len`).
        old: Vec<u8>,
        new: Vec<u8>,
    },
    Len {
        old_len: u64,
        new_len: u64,
        /// The bytes a cut removed.
        old_tail: Vec<u8>,
    },
}

/// One unsynced directory entry.
#[derive(Debug)]
enum Entry {
    /// A file or directory made.
    Made(PathBuf),
    /// A rename into the directory; `replaced` is the durable content of the file it replaced.
    Renamed {
        from: PathBuf,
        to: PathBuf,
        replaced: Option<Vec<u8>>,
    },
}

#[derive(Debug, Default)]
struct State {
    /// Calls so far.
    calls: u64,
    /// The call that finds the power off (`u64::MAX`: never).
    cut_at: u64,
    off: bool,
    /// Unsynced changes per file (by its current path).
    files: HashMap<PathBuf, Vec<Change>>,
    /// Unsynced entries, oldest first: (directory, sequence number, entry).
    entries: Vec<(PathBuf, u64, Entry)>,
    next_entry: u64,
}

/// What the last cut did, for a failing case's message.
#[derive(Debug, Default, Clone, Copy)]
pub struct CutReport {
    pub files_changed: usize,
    pub changes_lost: usize,
    pub changes_torn: usize,
    pub entries_undone: usize,
}

/// The fault seam of a machine whose power can be cut.
#[derive(Debug, Default)]
pub struct PowerIo {
    state: Mutex<State>,
    cut: tokio::sync::Notify,
}

fn off() -> io::Error {
    io::Error::other("the power is off")
}

fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    fs::read(path)
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `img` as it was before `changes` (undone newest first).
fn undo(mut img: Vec<u8>, changes: &[Change]) -> Vec<u8> {
    for c in changes.iter().rev() {
        match c {
            Change::Write {
                pos, old_len, old, ..
            } => {
                let at = *pos as usize;
                if at < img.len() {
                    img[at..at + old.len()].copy_from_slice(old);
                }
                img.resize(*old_len as usize, 0);
            }
            Change::Len {
                old_len,
                new_len,
                old_tail,
            } => {
                img.resize(*old_len as usize, 0);
                if new_len < old_len {
                    let at = *new_len as usize;
                    img[at..at + old_tail.len()].copy_from_slice(old_tail);
                }
            }
        }
    }
    img
}

impl PowerIo {
    pub fn new() -> PowerIo {
        PowerIo {
            state: Mutex::new(State {
                cut_at: u64::MAX,
                ..State::default()
            }),
            cut: tokio::sync::Notify::new(),
        }
    }

    /// The power goes off at the `n`-th call from now (1: the next one).
    pub fn cut_after(&self, n: u64) {
        let mut s = self.state.lock().unwrap();
        s.cut_at = s.calls + n.max(1);
    }

    /// No cut after all (the power stays on).
    pub fn disarm(&self) {
        self.state.lock().unwrap().cut_at = u64::MAX;
    }

    pub fn is_off(&self) -> bool {
        self.state.lock().unwrap().off
    }

    /// Waits until the power is off.
    pub async fn wait_off(&self) {
        loop {
            let notified = self.cut.notified();
            if self.is_off() {
                return;
            }
            notified.await;
        }
    }

    /// Calls so far.
    pub fn calls(&self) -> u64 {
        self.state.lock().unwrap().calls
    }

    /// Counts a call; false when the power is (now) off.
    fn call(&self, s: &mut State) -> bool {
        if s.off {
            return false;
        }
        s.calls += 1;
        if s.calls >= s.cut_at {
            s.off = true;
            self.cut.notify_waiters();
            return false;
        }
        true
    }

    fn record(&self, s: &mut State, path: &Path, change: Change) {
        s.files.entry(path.to_path_buf()).or_default().push(change);
    }

    fn made(&self, s: &mut State, path: &Path) {
        s.files.remove(path);
        let seq = s.next_entry;
        s.next_entry += 1;
        s.entries
            .push((parent(path), seq, Entry::Made(path.to_path_buf())));
    }

    /// Rewrites the files as the disk holds them after the cut (the power must be off and
    /// every handle of the broker closed). Afterwards this seam holds nothing unsynced.
    pub fn power_cut(&self, rng: &mut Rng) -> CutReport {
        let mut s = self.state.lock().unwrap();
        assert!(s.off, "the power is still on");
        let mut report = CutReport::default();
        // Contents first, at the files' current paths.
        let mut files: Vec<(PathBuf, Vec<Change>)> = s.files.drain().collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, changes) in files {
            let Ok(now) = read_all(&path) else {
                continue; // Removed meanwhile (outside the seam): gone for good.
            };
            let mut img = undo(now, &changes);
            for c in &changes {
                match rng.below(10) {
                    0..=4 => apply(&mut img, c, None),
                    5..=7 => report.changes_lost += 1,
                    _ => {
                        report.changes_torn += 1;
                        apply(&mut img, c, Some(rng));
                    }
                }
            }
            fs::write(&path, &img).unwrap();
            report.files_changed += 1;
        }
        // Then the entries: each directory keeps a prefix of its own, the rest are undone newest
        // first.
        let entries = std::mem::take(&mut s.entries);
        let mut dirs: Vec<&PathBuf> = entries.iter().map(|(d, _, _)| d).collect();
        dirs.sort();
        dirs.dedup();
        let mut kept_below: HashMap<PathBuf, u64> = HashMap::new();
        for d in dirs {
            let seqs: Vec<u64> = entries
                .iter()
                .filter(|(e, _, _)| e == d)
                .map(|(_, q, _)| *q)
                .collect();
            let keep = rng.below(seqs.len() as u64 + 1) as usize;
            let first_undone = seqs.get(keep).copied().unwrap_or(u64::MAX);
            kept_below.insert(d.clone(), first_undone);
        }
        for (dir, seq, entry) in entries.into_iter().rev() {
            if seq < kept_below[&dir] {
                continue;
            }
            report.entries_undone += 1;
            match entry {
                Entry::Made(p) => {
                    if p.is_dir() {
                        let _ = fs::remove_dir_all(&p);
                    } else {
                        let _ = fs::remove_file(&p);
                    }
                }
                Entry::Renamed { from, to, replaced } => {
                    if to.exists() && from.parent().is_some_and(Path::exists) {
                        fs::rename(&to, &from).unwrap();
                    }
                    if let Some(old) = replaced {
                        fs::write(&to, old).unwrap();
                    }
                }
            }
        }
        report
    }
}

/// Applies `c` to `img`, all of it or (`tear`) a random prefix of a write.
fn apply(img: &mut Vec<u8>, c: &Change, tear: Option<&mut Rng>) {
    match c {
        Change::Write { pos, new, .. } => {
            let n = match tear {
                Some(rng) => rng.below(new.len() as u64 + 1) as usize,
                None => new.len(),
            };
            let at = *pos as usize;
            if img.len() < at + n {
                img.resize(at + n, 0);
            }
            img[at..at + n].copy_from_slice(&new[..n]);
        }
        Change::Len { new_len, .. } => {
            if tear.is_none() {
                img.resize(*new_len as usize, 0);
            }
        }
    }
}

impl FileIo for PowerIo {
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if !self.call(&mut s) {
            return Err(off());
        }
        let old_len = file.metadata()?.len();
        let end = (pos + buf.len() as u64).min(old_len);
        let mut old = vec![0u8; end.saturating_sub(pos) as usize];
        if !old.is_empty() {
            File::open(path)?.read_exact_at(&mut old, pos)?;
        }
        RealIo.write_at(path, file, buf, pos)?;
        self.record(
            &mut s,
            path,
            Change::Write {
                pos,
                old_len,
                old,
                new: buf.to_vec(),
            },
        );
        Ok(())
    }

    fn write_vectored_at(
        &self,
        path: &Path,
        file: &File,
        bufs: &[&[u8]],
        pos: u64,
    ) -> io::Result<()> {
        // One change: a vectored write tears like any other.
        let joined = bufs.concat();
        self.write_at(path, file, &joined, pos)
    }

    fn set_len(&self, path: &Path, file: &File, len: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if !self.call(&mut s) {
            return Err(off());
        }
        let old_len = file.metadata()?.len();
        let mut old_tail = vec![0u8; old_len.saturating_sub(len) as usize];
        if !old_tail.is_empty() {
            File::open(path)?.read_exact_at(&mut old_tail, len)?;
        }
        file.set_len(len)?;
        self.record(
            &mut s,
            path,
            Change::Len {
                old_len,
                new_len: len,
                old_tail,
            },
        );
        Ok(())
    }

    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if !self.call(&mut s) {
            return Err(off());
        }
        RealIo.sync_data(path, file)?;
        s.files.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if !self.call(&mut s) {
            return Err(off());
        }
        RealIo.sync_dir(dir)?;
        s.entries.retain(|(d, _, _)| d != dir);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if !self.call(&mut s) {
            return Err(off());
        }
        // The replaced file's content as the disk holds it.
        let replaced = match read_all(to) {
            Ok(now) => Some(undo(now, s.files.get(to).map_or(&[][..], Vec::as_slice))),
            Err(_) => None,
        };
        RealIo.rename(from, to)?;
        match s.files.remove(from) {
            Some(changes) => s.files.insert(to.to_path_buf(), changes),
            None => s.files.remove(to),
        };
        let seq = s.next_entry;
        s.next_entry += 1;
        s.entries.push((
            parent(to),
            seq,
            Entry::Renamed {
                from: from.to_path_buf(),
                to: to.to_path_buf(),
                replaced,
            },
        ));
        Ok(())
    }

    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if !self.call(&mut s) {
            return Err(off());
        }
        RealIo.create_dir(dir)?;
        self.made(&mut s, dir);
        Ok(())
    }

    fn create_file(&self, path: &Path, options: &OpenOptions) -> io::Result<File> {
        let mut s = self.state.lock().unwrap();
        if !self.call(&mut s) {
            return Err(off());
        }
        let before = read_all(path).ok();
        let file = options.open(path)?;
        match before {
            None => self.made(&mut s, path),
            Some(old) => {
                let new_len = file.metadata()?.len();
                if new_len < old.len() as u64 {
                    self.record(
                        &mut s,
                        path,
                        Change::Len {
                            old_len: old.len() as u64,
                            new_len,
                            old_tail: old[new_len as usize..].to_vec(),
                        },
                    );
                }
            }
        }
        Ok(file)
    }
}
