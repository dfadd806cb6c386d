//! Key compaction: closed segments rewritten keeping only the newest record per key.
//!
//! Records without a key are kept. A tombstone (a key without a value) is kept while it is newer
//! than `delete_retention_ms`, then dropped. Offsets never change: a batch keeps its base offset
//! and offset range, and batches left empty are dropped, so readers see gaps (a Raft entry left
//! empty stays, covering its offsets: the Raft log has no holes). Neighbouring segments whose
//! cleaned output fits in one segment are merged into the first one.
//!
//! **Up to a point** (`below`, a replicated partition's leader's decision): only records below
//! it are compacted, and only their keys count, so what survives depends on the records below
//! the point and on `now_ms` alone, never on where a replica's segments begin and end: every
//! replica compacts to the same bytes. Compacting again to the same or an earlier point changes
//! nothing.
//!
//! # Crash safety
//! For each group of segments `b1..bk` cleaned into one:
//!
//! 1. write `<b1>.log.cleaned` and sync it;
//! 2. write the manifest `compaction` (atomically) naming `b1..bk`;
//! 3. rename `<b1>.log.cleaned` over `<b1>.log`, delete `b1`'s indexes and the files of
//!    `b2..bk`, sync the directory;
//! 4. delete the manifest, sync the directory.
//!
//! [`recover`], run when a partition opens, finishes step 3 when the manifest exists (the cleaned
//! file was synced before it was written) and otherwise deletes a stray `.cleaned` file: a
//! partition reads exactly as before or exactly as after a compaction, never a mix.
//!
//! # Manifest layout
//!
//! | offset | size | field     |                                   |
//! |-------:|-----:|-----------|-----------------------------------|
//! |      0 |    4 | `magic`   | `SLCM`                            |
//! |      4 |    2 | `version` | 1                                 |
//! |      6 |    2 | reserved  |                                   |
//! |      8 |    4 | `count`   | k                                 |
//! |     12 | 8×k  | `bases`   | the segments replaced, b1 first   |
//! |      … |    4 | `crc`     | CRC-32 of everything before       |

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::error::{Error, Result};
use super::io::{FileIo, PRIVATE_FILE, replace_file};
use super::record::{Batch, Decoded, EncodedBatch, Record, read_u32, read_u64};
use super::segment::{FileKind, LOG_HEADER_LEN, log_header, segment_path};

pub const MANIFEST: &str = "compaction";
const MAGIC: [u8; 4] = *b"SLCM";
const CLEANED: &str = "cleaned";

/// What a compaction may drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionOptions {
    pub now_ms: i64,
    /// Tombstones older than this are dropped.
    pub delete_retention_ms: u64,
    /// Largest merged segment.
    pub segment_bytes: u64,
    /// Only records below this offset are compacted, and only their keys count (a replicated
    /// partition's compaction point); `None`: every closed segment, with the keys of all.
    pub below: Option<u64>,
}

impl CompactionOptions {
    fn below(&self) -> u64 {
        self.below.unwrap_or(u64::MAX)
    }

    /// Whether a key seen at `offset` counts.
    pub fn counts(&self, offset: u64) -> bool {
        offset < self.below()
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CompactionOutcome {
    pub segments_before: usize,
    pub segments_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_before: u64,
    pub records_after: u64,
}

impl CompactionOutcome {
    /// Two runs over the same partition, `self` then `next`, as one: from the first's before to
    /// the second's after, every record either dropped counted once.
    pub fn then(&self, next: &CompactionOutcome) -> CompactionOutcome {
        let dropped = self.records_before.saturating_sub(self.records_after)
            + next.records_before.saturating_sub(next.records_after);
        CompactionOutcome {
            segments_before: self.segments_before,
            segments_after: next.segments_after,
            bytes_before: self.bytes_before,
            bytes_after: next.bytes_after,
            records_before: next.records_after + dropped,
            records_after: next.records_after,
        }
    }
}

fn cleaned_path(dir: &Path, base: u64) -> PathBuf {
    let mut p = segment_path(dir, base, FileKind::Log).into_os_string();
    p.push(".");
    p.push(CLEANED);
    PathBuf::from(p)
}

fn encode_manifest(bases: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + bases.len() * 8);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(bases.len() as u32).to_le_bytes());
    for base in bases {
        b.extend_from_slice(&base.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn decode_manifest(b: &[u8]) -> Option<Vec<u64>> {
    if b.len() < 16 || b[0..4] != MAGIC {
        return None;
    }
    let n = read_u32(b, 8) as usize;
    let end = 12 + n.checked_mul(8)?;
    if b.len() != end + 4 || crc32fast::hash(&b[..end]) != read_u32(b, end) || n == 0 {
        return None;
    }
    Some((0..n).map(|i| read_u64(b, 12 + i * 8)).collect())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Step 3 and 4 of the swap: the cleaned log replaces `bases[0]`, the others go.
fn swap(dir: &Path, bases: &[u64], io: &dyn FileIo) -> Result<()> {
    let cleaned = cleaned_path(dir, bases[0]);
    let target = segment_path(dir, bases[0], FileKind::Log);
    if cleaned.exists() {
        io.rename(&cleaned, &target)
            .map_err(|e| Error::io(&target, e))?;
    }
    for kind in [FileKind::Index, FileKind::TimeIndex] {
        remove_if_present(&segment_path(dir, bases[0], kind))?;
    }
    for &b in &bases[1..] {
        for kind in [FileKind::Log, FileKind::Index, FileKind::TimeIndex] {
            remove_if_present(&segment_path(dir, b, kind))?;
        }
    }
    io.sync_dir(dir).map_err(|e| Error::io(dir, e))?;
    remove_if_present(&dir.join(MANIFEST))?;
    io.sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// Completes or rolls back a compaction a crash interrupted. Runs before a partition opens.
pub fn recover(dir: &Path, io: &dyn FileIo) -> Result<()> {
    let manifest = dir.join(MANIFEST);
    match fs::read(&manifest) {
        Ok(bytes) => match decode_manifest(&bytes) {
            Some(bases) => {
                tracing::warn!(dir = %dir.display(), segments = ?bases, "completing an interrupted compaction");
                swap(dir, &bases, io)?;
            }
            // A manifest is written atomically; a damaged one means the swap never started.
            None => remove_if_present(&manifest)?,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&manifest, e)),
    }
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == CLEANED) {
            tracing::warn!(path = %path.display(), "rolling back an interrupted compaction");
            remove_if_present(&path)?;
        }
    }
    Ok(())
}

/// The newest offset of every key, from records read in offset order.
#[derive(Debug, Default)]
pub struct KeyMap {
    newest: HashMap<Bytes, u64>,
}

impl KeyMap {
    pub fn add(&mut self, key: &Bytes, offset: u64) {
        // Keys are copied: the map must not pin whole read buffers in memory.
        match self.newest.get_mut(key) {
            Some(o) => *o = (*o).max(offset),
            None => {
                self.newest.insert(Bytes::copy_from_slice(key), offset);
            }
        }
    }

    fn keeps(&self, key: &Bytes, offset: u64) -> bool {
        self.newest.get(key).is_none_or(|&o| o == offset)
    }
}

/// Rewrites one segment's batches keeping what `keys` and the tombstone rule keep. Returns the
/// bytes to write (batches only) and the records in and out.
pub fn clean_segment(
    bytes: &Bytes,
    keys: &KeyMap,
    opts: &CompactionOptions,
    path: &Path,
) -> Result<(Vec<u8>, u64, u64)> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut pos = LOG_HEADER_LEN as usize;
    let (mut before, mut after) = (0u64, 0u64);
    let horizon = opts
        .now_ms
        .saturating_sub(opts.delete_retention_ms.min(i64::MAX as u64) as i64);
    while pos < bytes.len() {
        let batch = match Batch::decode(&bytes.slice(pos..)) {
            Decoded::Valid(b) => b,
            Decoded::Torn { .. } => {
                return Err(Error::corrupt(path, pos as u64, "batch cut short"));
            }
            Decoded::Corrupt(why) => return Err(Error::corrupt(path, pos as u64, why)),
        };
        let h = *batch.header();
        if h.is_control() || h.last_offset() >= opts.below() {
            // Raft's own entries, and what lies past the compaction point, stay as they are.
            let n = u64::from(h.record_count);
            (before, after) = (before + n, after + n);
            out.extend_from_slice(batch.bytes());
            pos += h.size;
            continue;
        }
        let mut kept = Vec::new();
        let mut all = true;
        for r in batch.records() {
            let r = r.map_err(|why| Error::corrupt(path, pos as u64, why))?;
            before += 1;
            let keep = match &r.key {
                None => true,
                Some(k) => keys.keeps(k, r.offset) && (r.value.is_some() || r.timestamp >= horizon),
            };
            if keep {
                kept.push(r);
            } else {
                all = false;
            }
        }
        after += kept.len() as u64;
        if all {
            out.extend_from_slice(batch.bytes());
        } else if let (Some(id), true) = (h.raft, kept.is_empty()) {
            // A Raft entry stays in the log (its index must not go missing), covering its
            // offsets: a follower sent it stamps the next entries where the leader has them.
            let mut emptied =
                EncodedBatch::emptied(h.last_offset_delta, h.first_timestamp, h.max_timestamp)
                    .with_raft_id(id);
            out.extend_from_slice(emptied.seal(h.base_offset));
        } else if !kept.is_empty() {
            let records: Vec<(u32, Record)> = kept
                .into_iter()
                .map(|r| ((r.offset - h.base_offset) as u32, Record::from(r)))
                .collect();
            let mut encoded = EncodedBatch::with_offset_deltas(
                records.iter().map(|(d, r)| (*d, r)),
                h.last_offset_delta,
            );
            if let Some(id) = h.raft {
                encoded = encoded.with_raft_id(id);
            }
            out.extend_from_slice(encoded.seal(h.base_offset));
        }
        pos += h.size;
    }
    Ok((out, before, after))
}

/// A new segment file `<base>.log.cleaned` holding `body` after the header, synced.
pub fn write_cleaned(dir: &Path, base: u64, body: &[u8], io: &dyn FileIo) -> Result<()> {
    let path = cleaned_path(dir, base);
    let file = io
        .create_file(
            &path,
            OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(PRIVATE_FILE),
        )
        .map_err(|e| Error::io(&path, e))?;
    let header = log_header(base);
    let mut all = Vec::with_capacity(header.len() + body.len());
    all.extend_from_slice(&header);
    all.extend_from_slice(body);
    io.write_at(&path, &file, &all, 0)
        .map_err(|e| Error::io(&path, e))?;
    io.sync_data(&path, &file).map_err(|e| Error::io(&path, e))
}

/// Swaps a cleaned segment in for `bases` (crash-safe, see the module header).
pub fn install(dir: &Path, bases: &[u64], io: &dyn FileIo) -> Result<()> {
    let manifest = dir.join(MANIFEST);
    replace_file(io, &manifest, &encode_manifest(bases)).map_err(|e| Error::io(&manifest, e))?;
    swap(dir, bases, io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_round_trip_and_damage_reads_as_none() {
        let m = encode_manifest(&[5, 9, 12]);
        assert_eq!(decode_manifest(&m), Some(vec![5, 9, 12]));
        for i in 0..m.len() {
            let mut bad = m.clone();
            bad[i] ^= 1;
            assert_eq!(decode_manifest(&bad), None, "byte {i}");
        }
        assert_eq!(decode_manifest(&m[..m.len() - 1]), None);
    }
}
