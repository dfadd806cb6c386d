//! A partition log used as a Raft log (cluster mode).
//!
//! Each Raft entry is one version 2 batch ([`super::record`]): the entry's term and index sit in
//! the batch header, messages are the batch's records, and Raft's own entries (blank, membership)
//! are control batches that take no offset. So the messages are stored once, and a follower's
//! partition holds the same bytes at every position as its leader's.
//!
//! Entries are found by index without an index of their own: segments are ordered by their first
//! entry, and inside a segment the sparse offset index's positions are batch starts whose headers
//! name their entries (entries and offsets grow together), so a lookup is two binary searches of
//! a few reads each and a short walk.
//!
//! Readers of messages see only what is committed: the state machine moves the partition's read
//! limit ([`RaftLogReader::set_committed_offset`]) as it applies entries, so an entry durable here
//! but not on a majority is never read.
//!
//! Beside the segments, one small file, `raft` (below), holds what Raft must not forget: the vote
//! and the last purged entry. It is replaced atomically (temp file, sync, rename, sync dir).
//!
//! # `raft` layout (little-endian)
//!
//! | offset | size | field             | notes                                           |
//! |-------:|-----:|-------------------|-------------------------------------------------|
//! |      0 |    4 | `magic`           | `SLRF`                                          |
//! |      4 |    2 | `version`         | 1                                               |
//! |      6 |    2 | `flags`           | bit 0 vote, 1 voted_for, 2 vote committed, 3 purged |
//! |      8 |    8 | `vote_term`       |                                                 |
//! |     16 |    8 | `voted_for`       | node id                                         |
//! |     24 |    8 | `purged_term`     | the last purged entry's id                      |
//! |     32 |    8 | `purged_index`    |                                                 |
//! |     40 |    4 | `crc`             | CRC-32 of bytes 0..40                           |

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::config::LogConfig;
use super::error::{Error, Result};
use super::io::{FileIo, replace_file};
use super::partition::{AppendMode, Appended, Completion, Partition};
use super::record::{Batch, Decoded, EncodedBatch, RaftId, read_u32, read_u64};
use super::segment::{LOG_HEADER_LEN, Segment};

pub const FILE_NAME: &str = "raft";
pub const MAGIC: [u8; 4] = *b"SLRF";
pub const VERSION: u16 = 1;
pub const LEN: usize = 44;
const CRC_AT: usize = 40;

const HAS_VOTE: u16 = 1;
const HAS_VOTED_FOR: u16 = 2;
const VOTE_COMMITTED: u16 = 4;
const HAS_PURGED: u16 = 8;

/// A Raft vote as stored: the term, whom this node voted for, and whether a quorum granted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoredVote {
    pub term: u64,
    pub voted_for: Option<u64>,
    pub committed: bool,
}

/// What the `raft` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RaftMeta {
    pub vote: Option<StoredVote>,
    /// The last entry purged (entries up to it are gone, or going, from the log).
    pub purged: Option<RaftId>,
}

impl RaftMeta {
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let mut flags = 0u16;
        if let Some(v) = self.vote {
            flags |= HAS_VOTE;
            b[8..16].copy_from_slice(&v.term.to_le_bytes());
            if let Some(n) = v.voted_for {
                flags |= HAS_VOTED_FOR;
                b[16..24].copy_from_slice(&n.to_le_bytes());
            }
            if v.committed {
                flags |= VOTE_COMMITTED;
            }
        }
        if let Some(p) = self.purged {
            flags |= HAS_PURGED;
            b[24..32].copy_from_slice(&p.term.to_le_bytes());
            b[32..40].copy_from_slice(&p.index.to_le_bytes());
        }
        b[6..8].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Decoded<RaftMeta> {
        if b.len() < LEN {
            return Decoded::Torn { needed: LEN };
        }
        if b[0..4] != MAGIC {
            return Decoded::Corrupt("not a raft state file");
        }
        if u16::from_le_bytes([b[4], b[5]]) != VERSION {
            return Decoded::Corrupt("unknown raft state file version");
        }
        if b.len() != LEN {
            return Decoded::Corrupt("raft state file has trailing bytes");
        }
        if crc32fast::hash(&b[..CRC_AT]) != read_u32(b, CRC_AT) {
            return Decoded::Corrupt("raft state file CRC mismatch");
        }
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags & !(HAS_VOTE | HAS_VOTED_FOR | VOTE_COMMITTED | HAS_PURGED) != 0 {
            return Decoded::Corrupt("unknown raft state flags");
        }
        let vote = (flags & HAS_VOTE != 0).then(|| StoredVote {
            term: read_u64(b, 8),
            voted_for: (flags & HAS_VOTED_FOR != 0).then(|| read_u64(b, 16)),
            committed: flags & VOTE_COMMITTED != 0,
        });
        let purged = (flags & HAS_PURGED != 0).then(|| RaftId {
            term: read_u64(b, 24),
            index: read_u64(b, 32),
        });
        Decoded::Valid(RaftMeta { vote, purged })
    }
}

/// Bytes of its newest entries a Raft log keeps in memory as written: each entry is read back
/// once per follower (on the leader) and once to apply it, mostly right after it is written, and
/// these reads then copy nothing. Enough for the entries of a few group commits of large batches.
pub const KEEP_WRITTEN_BYTES: usize = 8 << 20;

/// Reads a partition's entries by Raft index; shares the open partition with its [`RaftLog`],
/// so any number of readers run beside the writer.
#[derive(Debug, Clone)]
pub struct RaftLogReader {
    partition: Arc<Partition>,
    purged: Arc<RwLock<Option<RaftId>>>,
}

impl RaftLogReader {
    /// The partition (a truncation reopens it in place).
    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    /// Messages below `offset` are committed: readers of the partition may see them.
    pub fn set_committed_offset(&self, offset: u64) {
        self.partition.limit_reads_to(offset);
    }

    fn purged(&self) -> Option<RaftId> {
        *self.purged.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The entries with indexes in `from..to` that are present (written, not purged), in order,
    /// about `max_bytes` of them (at least one when there is one).
    pub fn entries(&self, from: u64, to: u64, max_bytes: usize) -> Result<Vec<Batch>> {
        let segments = self.partition.segments();
        let mut out = Vec::new();
        let Some(first) = first_entry(&segments)? else {
            return Ok(out);
        };
        let from = match self.purged() {
            Some(p) => from.max(p.index + 1),
            None => from,
        }
        .max(first);
        if from >= to {
            return Ok(out);
        }
        let Some((mut at, mut pos)) = locate(&segments, from)? else {
            return Ok(out);
        };
        let mut bytes = 0usize;
        let mut expected = from;
        while expected < to && at < segments.len() {
            let seg = &segments[at];
            if pos >= seg.written_len() {
                at += 1;
                pos = LOG_HEADER_LEN;
                continue;
            }
            let batch = seg.batch_at(pos)?;
            let header = *batch.header();
            match header.raft {
                Some(id) if id.index == expected => {}
                _ => {
                    return Err(Error::corrupt(
                        seg.log_path(),
                        pos,
                        format!("expected Raft entry {expected} here"),
                    ));
                }
            }
            pos += header.size as u64;
            bytes += header.size;
            expected += 1;
            out.push(batch);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The id of the last entry present, if any.
    pub fn last_id(&self) -> Result<Option<RaftId>> {
        last_entry(&self.partition.segments())
    }
}

/// A partition log as a Raft log: appends stamped with Raft ids, lookups by index, truncation
/// of a conflicting tail, purging of an applied prefix, and the vote.
#[derive(Debug)]
pub struct RaftLog {
    dir: PathBuf,
    io: Arc<dyn FileIo>,
    reader: RaftLogReader,
    meta: RaftMeta,
    /// The last entry handed to the writer (possibly not yet durable).
    last: Option<RaftId>,
}

impl RaftLog {
    /// Opens (creating if needed) the partition in `dir` and its `raft` file.
    pub fn open(dir: &Path, config: LogConfig, io: Arc<dyn FileIo>) -> Result<RaftLog> {
        let partition = Partition::open(dir, config, Arc::clone(&io), None)?;
        Self::on(Arc::new(partition), io)
    }

    /// The Raft log of an open partition (its owner keeps serving its readers), with the `raft`
    /// file beside its segments. Nothing is readable until the state machine says what is
    /// committed.
    pub fn on(partition: Arc<Partition>, io: Arc<dyn FileIo>) -> Result<RaftLog> {
        partition.limit_reads_to(0);
        partition.keep_written(KEEP_WRITTEN_BYTES);
        let dir = partition.dir().to_path_buf();
        let meta = read_meta(&dir)?;
        let reader = RaftLogReader {
            partition,
            purged: Arc::new(RwLock::new(meta.purged)),
        };
        let last = reader.last_id()?;
        Ok(RaftLog {
            dir,
            io,
            reader,
            meta,
            last,
        })
    }

    pub fn reader(&self) -> RaftLogReader {
        self.reader.clone()
    }

    /// The open partition (for readers of messages).
    pub fn partition(&self) -> &Arc<Partition> {
        self.reader.partition()
    }

    pub fn vote(&self) -> Option<StoredVote> {
        self.meta.vote
    }

    /// Stores the vote durably before returning.
    pub fn save_vote(&mut self, vote: StoredVote) -> Result<()> {
        self.write_meta(RaftMeta {
            vote: Some(vote),
            ..self.meta
        })
    }

    pub fn purged(&self) -> Option<RaftId> {
        self.meta.purged
    }

    /// The last entry appended (handed to the writer), else the last purged one.
    pub fn last(&self) -> Option<RaftId> {
        self.last.or(self.meta.purged)
    }

    /// Appends entries, each already carrying its Raft id; `last` is the last one's. `done` runs
    /// once, after every one of them is durable (with the first error, if any failed), on the
    /// writer's thread: the caller never waits.
    pub fn append(&mut self, batches: Vec<EncodedBatch>, last: RaftId, done: Completion) {
        let partition = Arc::clone(self.partition());
        self.last = Some(last);
        let all = Arc::new(std::sync::Mutex::new(AllDone {
            left: batches.len(),
            outcome: Ok(None),
            done: Some(done),
        }));
        if batches.is_empty() {
            return AllDone::finish(&all, None);
        }
        for batch in batches {
            let all = Arc::clone(&all);
            partition.append(
                batch,
                AppendMode {
                    durable: true,
                    wait_for_room: false,
                },
                Box::new(move |r| AllDone::finish(&all, Some(r))),
            );
        }
    }

    /// Removes the entry `index` and every later one (a conflict with the leader's log).
    pub fn truncate(&mut self, index: u64) -> Result<()> {
        let partition = Arc::clone(self.partition());
        // Closing writes and syncs what is still queued: entries handed to the writer but not
        // yet durable (so not yet visible) may be among those to cut.
        partition.close()?;
        let segments = partition.segments();
        if let Some((at, pos)) = locate(&segments, index)? {
            partition.cut_closed(segments[at].base_offset(), pos)?;
        }
        drop(segments);
        // In place: readers and the partition's listeners go on with the shorter log; the read
        // limit (the commit point, always below a conflict) is kept.
        partition.reopen()?;
        self.last = self.reader.last_id()?;
        Ok(())
    }

    /// Forgets entries up to `id` (applied and in a snapshot): whole segments below the one
    /// holding the next entry are deleted; readers see nothing at or below `id` from now on.
    pub fn purge(&mut self, id: RaftId) -> Result<()> {
        self.record_purge(id)?;
        let partition = self.partition();
        let segments = partition.segments();
        // Every segment before the one holding the next entry; with no next entry, every one
        // but the active segment (which is never deleted).
        let below = match locate(&segments, id.index + 1)? {
            Some((at, _)) => segments[at].base_offset(),
            None => u64::MAX,
        };
        partition.delete_segments_below(below)?;
        Ok(())
    }

    /// Records the purge point durably, then hides the entries up to it from readers.
    fn record_purge(&mut self, id: RaftId) -> Result<()> {
        self.write_meta(RaftMeta {
            purged: Some(id),
            ..self.meta
        })?;
        *self
            .reader
            .purged
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(id);
        if self.purge_empties(id) {
            self.last = None;
        }
        Ok(())
    }

    /// Whether purging up to `id` leaves no entry in this log (a snapshot from the leader
    /// covers more than this replica holds): then [`RaftLog::purge_restarting`].
    pub fn purge_empties(&self, id: RaftId) -> bool {
        self.last.is_none_or(|l| l.index < id.index)
    }

    /// Forgets every entry (up to `id`, which is past the last one here) and starts the log
    /// again empty, the next message at `next_offset` (the snapshot's). The purge point is
    /// recorded first: after a crash, [`RaftLog::purge_empties`] says so again at open.
    pub fn purge_restarting(&mut self, id: RaftId, next_offset: u64) -> Result<()> {
        self.record_purge(id)?;
        let partition = Arc::clone(self.partition());
        partition.close()?;
        partition.restart_closed_at(next_offset)?;
        partition.reopen()?;
        tracing::info!(dir = %self.dir.display(), purged = id.index, next_offset,
            "log started again after the leader's snapshot");
        Ok(())
    }

    /// Closes the partition (a clean close: the next open scans nothing).
    pub fn close(&self) -> Result<()> {
        self.partition().close()
    }

    fn write_meta(&mut self, meta: RaftMeta) -> Result<()> {
        let path = self.dir.join(FILE_NAME);
        replace_file(self.io.as_ref(), &path, &meta.encode()).map_err(|e| Error::io(&path, e))?;
        self.meta = meta;
        Ok(())
    }
}

/// Gathers the completions of one append of several entries into one.
struct AllDone {
    left: usize,
    outcome: Result<Option<Appended>>,
    done: Option<Completion>,
}

impl AllDone {
    fn finish(all: &std::sync::Mutex<AllDone>, result: Option<Result<Appended>>) {
        let mut state = all.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Some(Ok(a)) => {
                state.left = state.left.saturating_sub(1);
                if let Ok(last) = &mut state.outcome {
                    *last = Some(a);
                }
            }
            Some(Err(e)) => {
                state.left = state.left.saturating_sub(1);
                if state.outcome.is_ok() {
                    state.outcome = Err(e);
                }
            }
            None => {}
        }
        if state.left > 0 {
            return;
        }
        let Some(done) = state.done.take() else {
            return;
        };
        let outcome = std::mem::replace(&mut state.outcome, Ok(None));
        drop(state);
        done(outcome.map(|a| {
            a.unwrap_or(Appended {
                base_offset: 0,
                last_offset: 0,
            })
        }));
    }
}

fn read_meta(dir: &Path) -> Result<RaftMeta> {
    let path = dir.join(FILE_NAME);
    match std::fs::read(&path) {
        Ok(bytes) => match RaftMeta::decode(&bytes) {
            Decoded::Valid(m) => Ok(m),
            Decoded::Torn { .. } => Err(Error::corrupt(&path, 0, "raft state file cut short")),
            Decoded::Corrupt(why) => Err(Error::corrupt(&path, 0, why)),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RaftMeta::default()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// The Raft index and size of the batch at `pos` (a batch boundary).
fn entry_at(seg: &Segment, pos: u64) -> Result<(u64, u64)> {
    let header = seg.batch_header_at(pos)?;
    let index = header
        .raft
        .map(|id| id.index)
        .ok_or_else(|| Error::corrupt(seg.log_path(), pos, "a batch without a Raft entry id"))?;
    Ok((index, header.size as u64))
}

/// The Raft index of the batch at `pos` (a batch boundary).
fn index_at(seg: &Segment, pos: u64) -> Result<u64> {
    entry_at(seg, pos).map(|(index, _)| index)
}

/// The segment (its place in `segments`) and position of entry `index`, if present.
fn locate(segments: &[Arc<Segment>], index: u64) -> Result<Option<(usize, u64)>> {
    // Segments by their first entry; only the last segment may be empty.
    let mut lo = 0;
    let mut hi = segments.len();
    while lo < hi {
        let mid = (lo + hi) / 2;
        let seg = &segments[mid];
        let first = if seg.written_len() > LOG_HEADER_LEN {
            Some(index_at(seg, LOG_HEADER_LEN)?)
        } else {
            None
        };
        if first.is_some_and(|f| f <= index) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let Some(at) = lo.checked_sub(1) else {
        return Ok(None);
    };
    let seg = &segments[at];
    // The sparse index's positions are batch starts: the last one at or below the entry.
    let (mut lo, mut hi) = (0usize, seg.index.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        let pos = u64::from(seg.index.entry(mid).position);
        if pos < seg.written_len() && index_at(seg, pos)? <= index {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut pos = match lo.checked_sub(1) {
        Some(i) => u64::from(seg.index.entry(i).position),
        None => LOG_HEADER_LEN,
    };
    let end = seg.written_len();
    while pos < end {
        let (at_index, size) = entry_at(seg, pos)?;
        if at_index == index {
            return Ok(Some((at, pos)));
        }
        if at_index > index {
            break;
        }
        pos += size;
    }
    Ok(None)
}

/// The index of the first entry in the segments, if any (only the last segment may be empty).
fn first_entry(segments: &[Arc<Segment>]) -> Result<Option<u64>> {
    match segments.first() {
        Some(seg) if seg.written_len() > LOG_HEADER_LEN => index_at(seg, LOG_HEADER_LEN).map(Some),
        _ => Ok(None),
    }
}

/// The id of the last entry in the segments, if any.
fn last_entry(segments: &[Arc<Segment>]) -> Result<Option<RaftId>> {
    for seg in segments.iter().rev() {
        let end = seg.written_len();
        if end <= LOG_HEADER_LEN {
            continue;
        }
        let mut pos = seg
            .index
            .last()
            .map_or(LOG_HEADER_LEN, |e| u64::from(e.position));
        if pos >= end {
            pos = LOG_HEADER_LEN;
        }
        let mut last = None;
        while pos < end {
            let header = seg.batch_header_at(pos)?;
            last = header.raft;
            pos += header.size as u64;
        }
        if last.is_some() {
            return Ok(last);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_meta() -> Vec<RaftMeta> {
        let vote = |voted_for, committed| StoredVote {
            term: 12,
            voted_for,
            committed,
        };
        let purged = Some(RaftId { term: 3, index: 99 });
        vec![
            RaftMeta::default(),
            RaftMeta {
                vote: Some(vote(None, false)),
                purged: None,
            },
            RaftMeta {
                vote: Some(vote(Some(2), false)),
                purged,
            },
            RaftMeta {
                vote: Some(vote(Some(3), true)),
                purged,
            },
            RaftMeta { vote: None, purged },
        ]
    }

    #[test]
    fn the_raft_file_round_trips_every_state() {
        for meta in every_meta() {
            assert_eq!(RaftMeta::decode(&meta.encode()), Decoded::Valid(meta));
        }
    }

    #[test]
    fn a_damaged_raft_file_is_never_read_as_a_state() {
        for meta in every_meta() {
            let bytes = meta.encode();
            for cut in 0..bytes.len() {
                assert!(!matches!(
                    RaftMeta::decode(&bytes[..cut]),
                    Decoded::Valid(_)
                ));
            }
            for bit in 0..bytes.len() * 8 {
                let mut b = bytes;
                b[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    !matches!(RaftMeta::decode(&b), Decoded::Valid(_)),
                    "flipped bit {bit} of {meta:?}"
                );
            }
        }
    }
}
