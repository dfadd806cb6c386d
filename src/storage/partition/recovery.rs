//! Recovery: what opening a partition does to its files before the writer takes over.
//!
//! A clean close (a clean checkpoint that matches the files) skips all work: nothing is read past
//! the headers and nothing is written. Otherwise closed segments (synced when they were rolled)
//! only get their indexes checked, cheaply, and rebuilt when they do not check out; the active
//! segment is scanned from the last checkpoint, batch by batch (length, CRC, offsets), its tail
//! cut at the first bad byte and its index entries rebuilt. The cost follows the unsynced tail.
//! The sparse-index bookkeeping ([`Indexer`]) is shared with the writer.

use std::fs;
use std::path::Path;

use super::RecoveryReport;
use crate::storage::checkpoint::{self, Checkpoint};
use crate::storage::config::LogConfig;
use crate::storage::error::{Error, Result};
use crate::storage::index::IndexEntry;
use crate::storage::io::FileIo;
use crate::storage::record::{BatchHeader, Decoded};
use crate::storage::segment::{
    FileKind, LOG_HEADER_LEN, ScanEnd, ScanStop, Segment, parse_segment_file_name, segment_path,
};
use crate::storage::timeindex::TimeEntry;

pub(super) fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            // A temp file from an interrupted atomic replace: the old file is still in place.
            let _ = fs::remove_file(entry.path());
            continue;
        }
        if let Some((base, FileKind::Log)) = parse_segment_file_name(name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// A crash while a segment was being created can leave a last log shorter than its header: it
/// never held a batch, so it is removed and the segment before it is active again.
pub(super) fn drop_unborn_segment(
    dir: &Path,
    bases: &mut Vec<u64>,
    report: &mut RecoveryReport,
) -> Result<()> {
    let Some(&last) = bases.last() else {
        return Ok(());
    };
    let path = segment_path(dir, last, FileKind::Log);
    let len = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
    if len >= LOG_HEADER_LEN {
        return Ok(());
    }
    tracing::warn!(path = %path.display(), bytes = len, "removing a segment whose creation did not finish");
    for kind in [FileKind::Log, FileKind::Index, FileKind::TimeIndex] {
        let p = segment_path(dir, last, kind);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    report.truncated_bytes += len;
    bases.pop();
    Ok(())
}

pub(super) fn read_checkpoint(dir: &Path) -> Result<Option<Checkpoint>> {
    let path = dir.join(checkpoint::FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    match Checkpoint::decode(&bytes) {
        Decoded::Valid(cp) => Ok(Some(cp)),
        Decoded::Torn { .. } | Decoded::Corrupt(_) => {
            tracing::warn!(path = %path.display(), "recovery checkpoint is damaged; scanning the whole active segment");
            Ok(None)
        }
    }
}

/// Adds sparse index entries as batches go by; shared by the writer and recovery.
#[derive(Debug, Clone, Copy)]
pub(super) struct Indexer {
    pub(super) interval: u64,
    bytes_since_entry: u64,
    pub(super) has_records: bool,
}

impl Indexer {
    /// The entries to add for a batch at `pos`, given the segment's largest timestamp so far.
    pub(super) fn on_batch(
        &mut self,
        base: u64,
        pos: u64,
        h: &BatchHeader,
        max_ts_before: i64,
    ) -> Option<(IndexEntry, Option<TimeEntry>)> {
        let due = !self.has_records || self.bytes_since_entry >= self.interval;
        let had_records = self.has_records;
        self.has_records = true;
        self.bytes_since_entry += h.size as u64;
        if !due {
            return None;
        }
        self.bytes_since_entry = h.size as u64;
        let rel = (h.base_offset - base) as u32;
        let entry = IndexEntry {
            relative_offset: rel,
            position: pos as u32,
        };
        let time = had_records.then_some(TimeEntry {
            max_timestamp: max_ts_before,
            relative_offset: rel,
        });
        Some((entry, time))
    }
}

/// Pushes an entry pair into a segment's indexes (returns false when either is full).
pub(super) fn push_entries(seg: &Segment, (entry, time): (IndexEntry, Option<TimeEntry>)) -> bool {
    let ok = seg.index.push(entry);
    match time {
        Some(t) => seg.time_index.push(t) && ok,
        None => ok,
    }
}

/// A closed segment: its indexes are trusted when they check out, else rebuilt by a full scan.
/// `report` is the recovery's, where a rebuild is news; without one (a segment compaction has
/// just written, indexes to be made) it is the expected way to make them.
pub(super) fn open_closed_segment(
    mut seg: Segment,
    index_ok: bool,
    next_base: u64,
    config: &LogConfig,
    io: &dyn FileIo,
    mut report: Option<&mut RecoveryReport>,
) -> Result<Segment> {
    let len = seg.visible_len();
    if index_ok && closed_indexes_check_out(&seg, next_base) {
        let max_ts = seg.time_index.last().map_or(i64::MIN, |e| e.max_timestamp);
        seg.publish(len, next_base, max_ts);
        return Ok(seg);
    }
    let interval = u64::from(config.index_interval_bytes);
    let capacity = (len / interval) as usize + 2;
    let (entries, scan) = rebuild_indexes(
        &mut seg,
        LOG_HEADER_LEN,
        len,
        (interval, capacity),
        None,
        io,
    )?;
    if scan.stop != ScanStop::End {
        let why = match scan.stop {
            ScanStop::Corrupt(why) => why,
            _ => "batch cut short",
        };
        tracing::error!(path = %seg.log_path().display(), position = scan.position, reason = why,
            "damage inside a closed segment; reads that reach it will fail");
        if let Some(report) = report.as_deref_mut() {
            report
                .damaged
                .push((seg.log_path().to_path_buf(), scan.position, why.to_string()));
        }
    }
    if entries.has_records {
        let rel = next_base
            .saturating_sub(seg.base_offset())
            .min(u64::from(u32::MAX)) as u32;
        let _ = seg.time_index.push(TimeEntry {
            max_timestamp: entries.max_ts,
            relative_offset: rel,
        });
    }
    trim(&seg, io);
    match report {
        Some(report) => {
            report.rebuilt_indexes.push(seg.index.path().to_path_buf());
            tracing::warn!(path = %seg.log_path().display(), "rebuilt the indexes of a closed segment");
        }
        None => tracing::debug!(path = %seg.log_path().display(), "indexed a compacted segment"),
    }
    seg.publish(len, next_base, entries.max_ts);
    Ok(seg)
}

pub(super) fn trim(seg: &Segment, io: &dyn FileIo) {
    if let Err(e) = seg.index.trim(io).and_then(|()| seg.time_index.trim(io)) {
        tracing::warn!(path = %seg.log_path().display(), error = %e, "could not trim an index; it will be rebuilt on next open");
    }
}

/// Checks of a closed segment's trimmed indexes: both sealed (every entry matched its CRC at
/// open), the last offset entry names a real batch, and the time index ends with the roll's
/// final entry.
fn closed_indexes_check_out(seg: &Segment, next_base: u64) -> bool {
    if !seg.index.is_sealed() || !seg.time_index.is_sealed() {
        return false;
    }
    let has_records = seg.visible_len() > LOG_HEADER_LEN;
    let Some(last) = seg.index.last() else {
        return !has_records;
    };
    if u64::from(last.position) >= seg.visible_len() {
        return false;
    }
    let header_ok = seg
        .batch_header_at(u64::from(last.position))
        .is_ok_and(|h| h.base_offset == seg.base_offset() + u64::from(last.relative_offset));
    let time_ok = seg.time_index.last().is_some_and(|t| {
        u64::from(t.relative_offset) == next_base.saturating_sub(seg.base_offset())
    });
    header_ok && time_ok
}

struct Rebuilt {
    has_records: bool,
    max_ts: i64,
    indexer: Indexer,
}

/// Scans the log from `from` (with the indexes already holding the entries before it) and adds
/// the entries for every valid batch. `resume` carries the state at `from`.
fn rebuild_indexes(
    seg: &mut Segment,
    from: u64,
    limit: u64,
    (interval, capacity): (u64, usize),
    resume: Option<(u64, i64, usize, usize)>,
    io: &dyn FileIo,
) -> Result<(Rebuilt, ScanEnd)> {
    let (expected_next, mut max_ts, index_len, time_len) =
        resume.unwrap_or((seg.base_offset(), i64::MIN, 0, 0));
    seg.index
        .reset(index_len, capacity, io)
        .map_err(|e| Error::io(seg.index.path(), e))?;
    seg.time_index
        .reset(time_len, capacity + 1, io)
        .map_err(|e| Error::io(seg.time_index.path(), e))?;
    let mut indexer = Indexer {
        interval,
        bytes_since_entry: seg
            .index
            .last()
            .map_or(0, |e| from.saturating_sub(u64::from(e.position))),
        has_records: from > LOG_HEADER_LEN,
    };
    if seg.index.is_empty() {
        indexer.has_records = false;
    }
    let base = seg.base_offset();
    let segref: &Segment = seg;
    let scan = segref.scan(from, limit, expected_next, |pos, h| {
        if let Some(e) = indexer.on_batch(base, pos, h, max_ts) {
            push_entries(segref, e);
        }
        max_ts = max_ts.max(h.max_timestamp);
    })?;
    let has_records = scan.position > LOG_HEADER_LEN;
    Ok((
        Rebuilt {
            has_records,
            max_ts,
            indexer,
        },
        scan,
    ))
}

/// The writer's view of the active segment.
#[derive(Debug, Clone, Copy)]
pub(super) struct ActiveState {
    /// Bytes in the log file, header included.
    pub(super) len: u64,
    pub(super) next_offset: u64,
    pub(super) max_timestamp: i64,
    /// First timestamp of the segment's first batch (for `segment_ms`).
    pub(super) first_timestamp: Option<i64>,
    pub(super) indexer: Indexer,
}

impl ActiveState {
    pub(super) fn empty(next_offset: u64) -> Self {
        ActiveState {
            len: LOG_HEADER_LEN,
            next_offset,
            max_timestamp: i64::MIN,
            first_timestamp: None,
            indexer: Indexer {
                interval: 0,
                bytes_since_entry: 0,
                has_records: false,
            },
        }
    }
}

/// Whether the active segment's index entries that checkpoint `c` covers are the ones it
/// recorded (a version 1 checkpoint recorded no CRC: trusted as they are). After a crash the
/// index carries no seal, so this is what finds a damaged entry there.
fn entries_match(seg: &Segment, c: &Checkpoint) -> bool {
    c.entries_crc.is_none_or(|crc| {
        seg.index.entries_crc(c.index_entries as usize) == crc.index
            && seg.time_index.entries_crc(c.time_entries as usize) == crc.time
    })
}

/// Recovers the active segment; returns it with the writer's state.
pub(super) fn recover_active(
    mut seg: Segment,
    index_ok: bool,
    cp: Option<Checkpoint>,
    config: &LogConfig,
    io: &dyn FileIo,
    report: &mut RecoveryReport,
) -> Result<(Segment, ActiveState)> {
    let file_len = seg.visible_len();
    let capacity = config.index_capacity();
    let interval = u64::from(config.index_interval_bytes);
    let cp = cp.filter(|c| c.active_base == seg.base_offset());
    let first_timestamp = |seg: &Segment| {
        seg.batch_header_at(LOG_HEADER_LEN)
            .ok()
            .map(|h| h.first_timestamp)
    };

    // A clean close seals the indexes: after one, an index without its seal was changed since
    // and is not trusted (rebuilt by the scan below).
    let sealed = seg.index.is_sealed() && seg.time_index.is_sealed();
    if let Some(c) = cp
        && c.clean
        && c.log_position == file_len
        && index_ok
        && sealed
        && seg.index.len() == c.index_entries as usize
        && seg.time_index.len() == c.time_entries as usize
    {
        report.clean = true;
        let bytes_since_entry = seg
            .index
            .last()
            .map_or(0, |e| file_len - u64::from(e.position));
        let state = ActiveState {
            len: file_len,
            next_offset: c.next_offset,
            max_timestamp: c.max_timestamp,
            first_timestamp: first_timestamp(&seg),
            indexer: Indexer {
                interval,
                bytes_since_entry,
                has_records: file_len > LOG_HEADER_LEN,
            },
        };
        return Ok((seg, state));
    }

    // Resume from the checkpoint when it and the index files are usable.
    let resume = cp.filter(|c| {
        index_ok
            && (sealed || !c.clean)
            && c.log_position >= LOG_HEADER_LEN
            && seg.index.len() >= c.index_entries as usize
            && seg.time_index.len() >= c.time_entries as usize
            && entries_match(&seg, c)
    });
    if let Some(c) = cp
        && c.log_position > file_len
    {
        return Err(Error::corrupt(
            seg.log_path(),
            file_len,
            format!(
                "the log ends at byte {file_len} but {} bytes were synced before; data was lost below the file system",
                c.log_position
            ),
        ));
    }
    let (from, resume_state) = match resume {
        Some(c) => (
            c.log_position,
            Some((
                c.next_offset,
                c.max_timestamp,
                c.index_entries as usize,
                c.time_entries as usize,
            )),
        ),
        None => (LOG_HEADER_LEN, None),
    };
    let (rebuilt, scan) = rebuild_indexes(
        &mut seg,
        from,
        file_len,
        (interval, capacity),
        resume_state,
        io,
    )?;
    let indexer = rebuilt.indexer;
    report.scanned_bytes += scan.position - from;
    if !index_ok || resume.is_none() {
        report.rebuilt_indexes.push(seg.index.path().to_path_buf());
    }
    if scan.position < file_len {
        let cut = file_len - scan.position;
        if seg.is_zero(scan.position, file_len)? {
            tracing::debug!(path = %seg.log_path().display(), bytes = cut, "cut preallocated zeros");
        } else {
            let why = match scan.stop {
                ScanStop::Corrupt(why) => why,
                _ => "torn batch",
            };
            tracing::warn!(path = %seg.log_path().display(), position = scan.position, bytes = cut,
                reason = why, "cut the unacknowledged tail of the active segment");
            report.truncated_bytes += cut;
        }
        seg.truncate_log(scan.position, io)?;
    }
    tracing::info!(path = %seg.log_path().display(), scanned = report.scanned_bytes, "recovered the active segment");
    let state = ActiveState {
        len: scan.position,
        next_offset: scan.next_offset,
        max_timestamp: rebuilt.max_ts,
        first_timestamp: first_timestamp(&seg),
        indexer,
    };
    Ok((seg, state))
}
