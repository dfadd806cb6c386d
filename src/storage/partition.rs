//! A partition log: an ordered run of segments with one writer thread and lock-free readers.
//!
//! # Writing and group commit
//! [`Partition::append`] hands an encoded batch and a completion to the partition's writer thread
//! through a bounded channel (a full channel makes the caller wait: backpressure, never a drop).
//! The writer takes every command that is queued, stamps offsets and CRCs, writes all the batches
//! with one positional write, and — under `fsync = always` — one `fdatasync` for all of them. Only
//! then does it publish the new high-water mark and call the completions. Appends that arrive
//! while a sync runs queue up and share the next one: that is the group commit.
//!
//! After a failed `fdatasync` the partition is latched: every later append fails with
//! [`Error::Poisoned`] until the partition is reopened (which runs recovery). A failed write is
//! cut back off the file and only the batches in it fail; if the cut itself fails, the partition
//! latches too.
//!
//! # Reading
//! Readers load the segment list (an `Arc` swapped under a brief lock), the high-water mark and a
//! segment's visible length, all published with `Release` after the bytes are durable, then use
//! positional reads. Readers never see bytes that are not yet durable under the fsync policy.
//!
//! # Recovery
//! See [`Partition::open`]: a clean close skips all work; otherwise only the active segment is
//! scanned, from the last checkpoint on, and a torn or corrupt tail is cut.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::checkpoint::{self, Checkpoint};
use super::compaction::{CompactionOptions, CompactionOutcome};
use super::config::{FsyncPolicy, LogConfig};
use super::error::{Error, Result};
use super::index::IndexEntry;
use super::io::{FileIo, replace_file};
use super::record::{Batch, BatchHeader, Decoded, EncodedBatch, Record};
use super::segment::{
    FileKind, LOG_HEADER_LEN, ScanStop, Segment, parse_segment_file_name, segment_path,
};
use super::timeindex::TimeEntry;

/// Called with the new high-water mark each time more data becomes visible to readers.
pub type Listener = Arc<dyn Fn(u64) + Send + Sync>;

/// Called once with the outcome of an append, after it is durable under the fsync policy.
pub type Completion = Box<dyn FnOnce(Result<Appended>) + Send>;

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub last_offset: u64,
}

/// What opening the partition had to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The previous close was clean and no scan was needed.
    pub clean: bool,
    /// Bytes of log scanned to recover.
    pub scanned_bytes: u64,
    /// Bytes cut off the active segment's tail.
    pub truncated_bytes: u64,
    /// Index files that were rebuilt from their logs.
    pub rebuilt_indexes: Vec<PathBuf>,
    /// Damage found inside closed segments: path, byte position, reason. Reads that reach it
    /// fail with [`Error::Corrupt`].
    pub damaged: Vec<(PathBuf, u64, String)>,
}

/// Counters for tests, metrics and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionStats {
    /// `fdatasync` calls on segment logs since open.
    pub syncs: u64,
    /// Batches appended since open.
    pub appends: u64,
    pub segments: usize,
    pub size_bytes: u64,
    pub log_start: u64,
    pub high_water: u64,
    /// Bytes of the active segment readers can see, header included.
    pub active_segment_bytes: u64,
}

enum Command {
    /// A batch; `true` when its completion must wait for durability.
    Append(EncodedBatch, Completion, bool),
    Roll(mpsc::Sender<Result<()>>),
    Close(mpsc::Sender<Result<()>>),
}

struct Shared {
    dir: PathBuf,
    config: LogConfig,
    io: Arc<dyn FileIo>,
    segments: RwLock<Arc<Vec<Arc<Segment>>>>,
    high_water: AtomicU64,
    log_start: AtomicU64,
    poisoned: AtomicBool,
    syncs: AtomicU64,
    appends: AtomicU64,
    /// Set while the writer polls for a lone producer's next append (`writer_spin_us`).
    polling: AtomicBool,
    /// How long the last successful fdatasync took, in microseconds.
    last_sync_micros: AtomicU64,
    listener: Option<Listener>,
    /// Serialises retention and compaction of this partition.
    maintenance: Mutex<()>,
}

impl Shared {
    fn segments(&self) -> Arc<Vec<Arc<Segment>>> {
        Arc::clone(&self.segments.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Held by retention and compaction for their whole run.
    fn maintenance(&self) -> std::sync::MutexGuard<'_, ()> {
        self.maintenance.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_segments(&self, f: impl FnOnce(&mut Vec<Arc<Segment>>)) {
        let mut guard = self.segments.write().unwrap_or_else(|p| p.into_inner());
        let mut list = guard.as_ref().clone();
        f(&mut list);
        *guard = Arc::new(list);
    }
}

/// An open partition log.
pub struct Partition {
    shared: Arc<Shared>,
    tx: Option<SyncSender<Command>>,
    writer: Option<JoinHandle<()>>,
    report: RecoveryReport,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("dir", &self.shared.dir)
            .field("high_water", &self.high_water())
            .finish_non_exhaustive()
    }
}

impl Partition {
    /// Opens (creating if needed) the partition in `dir` and starts its writer thread.
    ///
    /// Recovery: when the checkpoint says the last close was clean and the files agree, nothing
    /// is scanned. Otherwise closed segments (synced when they were rolled) only get their indexes
    /// checked, cheaply, and rebuilt when they do not check out; the active segment is scanned
    /// from the last checkpoint, batch by batch (length, CRC, offsets), its tail cut at the first
    /// bad byte and its index entries rebuilt. The cost follows the unsynced tail.
    pub fn open(
        dir: &Path,
        config: LogConfig,
        io: Arc<dyn FileIo>,
        listener: Option<Listener>,
    ) -> Result<Partition> {
        config.sanitize()?;
        super::io::create_dir_all(io.as_ref(), dir).map_err(|e| Error::io(dir, e))?;
        let mut report = RecoveryReport::default();
        super::compaction::recover(dir, io.as_ref())?;
        let mut bases = list_segments(dir)?;
        drop_unborn_segment(dir, &mut bases, &mut report)?;
        let cp = read_checkpoint(dir)?;

        let mut segments = Vec::with_capacity(bases.len().max(1));
        for (i, &base) in bases.iter().enumerate() {
            let Some(&next_base) = bases.get(i + 1) else {
                break;
            };
            let (seg, index_ok) = Segment::open(dir, base, None)?;
            let seg = open_closed_segment(seg, index_ok, next_base, &config, &mut report)?;
            segments.push(Arc::new(seg));
        }

        let writer_state = match bases.last() {
            None => {
                let seg = Segment::create(dir, 0, config.index_capacity(), io.as_ref())?;
                io.sync_dir(dir).map_err(|e| Error::io(dir, e))?;
                report.clean = true;
                segments.push(Arc::new(seg));
                ActiveState::empty(0)
            }
            Some(&base) => {
                // Past the checkpoint's entries the active index holds zeros or unsynced ones.
                let counts = cp.filter(|c| c.active_base == base).map_or((0, 0), |c| {
                    (c.index_entries as usize, c.time_entries as usize)
                });
                let (seg, index_ok) = Segment::open(dir, base, Some(counts))?;
                let (seg, state) =
                    recover_active(seg, index_ok, cp, &config, io.as_ref(), &mut report)?;
                segments.push(Arc::new(seg));
                state
            }
        };

        let active =
            Arc::clone(segments.last().ok_or_else(|| {
                Error::corrupt(dir, 0, "partition has no segment after recovery")
            })?);
        active.publish(
            writer_state.len,
            writer_state.next_offset,
            writer_state.max_timestamp,
        );
        let log_start = segments.first().map_or(0, |s| s.base_offset());
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            config,
            io,
            segments: RwLock::new(Arc::new(segments)),
            high_water: AtomicU64::new(writer_state.next_offset),
            log_start: AtomicU64::new(log_start),
            poisoned: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            last_sync_micros: AtomicU64::new(0),
            listener,
            maintenance: Mutex::new(()),
        });

        let mut writer = Writer::new(Arc::clone(&shared), active, writer_state);
        // From here on the directory is "open": only a clean close marks it clean again.
        writer.write_checkpoint(false)?;
        let (tx, rx) = mpsc::sync_channel(shared.config.queue_depth);
        let name = format!("sluice-writer-{}", dir.display());
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io(dir, e))?;
        Ok(Partition {
            shared,
            tx: Some(tx),
            writer: Some(handle),
            report,
        })
    }

    /// Queues a batch. `done` is called once, from the writer thread, when the batch is durable
    /// under the fsync policy or has failed. Waits while the writer's queue is full.
    pub fn append(&self, batch: EncodedBatch, done: Completion) {
        self.send_append(batch, done, true);
    }

    /// Queues a batch whose completion does not wait for a sync: `done` is called once it is
    /// written, and it becomes durable (and visible to readers under `fsync = always`) with the
    /// next durable append, roll or close. For records whose loss in a machine crash is
    /// harmless; a process crash loses nothing.
    pub fn append_lazy(&self, batch: EncodedBatch, done: Completion) {
        self.send_append(batch, done, false);
    }

    fn send_append(&self, batch: EncodedBatch, done: Completion, durable: bool) {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return done(Err(Error::Poisoned {
                path: self.shared.dir.clone(),
            }));
        }
        let Some(tx) = &self.tx else {
            return done(Err(self.closed()));
        };
        if let Err(mpsc::SendError(Command::Append(_, done, _))) =
            tx.send(Command::Append(batch, done, durable))
        {
            done(Err(self.closed()));
        }
    }

    /// Appends records and waits until they are durable.
    pub fn append_blocking(&self, records: &[Record]) -> Result<Appended> {
        self.append_encoded_blocking(EncodedBatch::new(records))
    }

    /// Appends an encoded batch and waits until it is durable.
    pub fn append_encoded_blocking(&self, batch: EncodedBatch) -> Result<Appended> {
        let (tx, rx) = mpsc::channel();
        self.append(
            batch,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().map_err(|_| self.closed())?
    }

    fn closed(&self) -> Error {
        Error::Closed {
            path: self.shared.dir.clone(),
        }
    }

    fn ask(&self, make: impl FnOnce(mpsc::Sender<Result<()>>) -> Command) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| self.closed())?;
        let (reply_tx, reply_rx) = mpsc::channel();
        tx.send(make(reply_tx)).map_err(|_| self.closed())?;
        reply_rx.recv().map_err(|_| self.closed())?
    }

    /// Closes the active segment and starts a new one (no-op when the active one is empty).
    pub fn roll(&self) -> Result<()> {
        self.ask(Command::Roll)
    }

    /// Finishes queued appends, syncs, trims the indexes and marks the partition clean. Later
    /// appends fail with [`Error::Closed`]; reads keep working.
    pub fn close(&self) -> Result<()> {
        self.ask(Command::Close)
    }

    /// One past the last offset readers can see.
    pub fn high_water(&self) -> u64 {
        self.shared.high_water.load(Ordering::Acquire)
    }

    /// The first offset still held (retention moves it up).
    pub fn log_start(&self) -> u64 {
        self.shared.log_start.load(Ordering::Acquire)
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// While the writer serves a lone appender (one append per round, each soon after the
    /// previous, see `LogConfig::writer_spin_us`): how long its last sync took, about how long
    /// the next acknowledgement will take. None otherwise.
    pub fn lone_sync_time(&self) -> Option<Duration> {
        self.shared
            .polling
            .load(Ordering::Relaxed)
            .then(|| Duration::from_micros(self.shared.last_sync_micros.load(Ordering::Relaxed)))
    }

    /// True once a failed fsync has latched the partition.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    pub fn stats(&self) -> PartitionStats {
        let segments = self.shared.segments();
        PartitionStats {
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            appends: self.shared.appends.load(Ordering::Relaxed),
            segments: segments.len(),
            size_bytes: segments.iter().map(|s| s.size_bytes()).sum(),
            log_start: self.log_start(),
            high_water: self.high_water(),
            active_segment_bytes: segments.last().map_or(0, |s| s.size_bytes()),
        }
    }

    /// Base offsets of the segments, oldest first.
    pub fn segment_bases(&self) -> Vec<u64> {
        self.shared
            .segments()
            .iter()
            .map(|s| s.base_offset())
            .collect()
    }

    /// Whole batches holding offsets from `from` on, about `max_bytes` of them (at least one
    /// batch when `from` is below the high-water mark). A batch may start before `from`: callers
    /// skip the records below it. Reading at the high-water mark returns nothing.
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<Batch>> {
        let segments = self.shared.segments();
        let end = self.high_water();
        let start = segments.first().map_or(0, |s| s.base_offset());
        if from < start || from > end {
            return Err(Error::OffsetOutOfRange {
                requested: from,
                start,
                end,
            });
        }
        let mut out = Vec::new();
        if from == end {
            return Ok(out);
        }
        let first = segments
            .partition_point(|s| s.base_offset() <= from)
            .saturating_sub(1);
        let mut collected = 0;
        let mut cursor = from;
        for seg in &segments[first..] {
            if seg.base_offset() >= end {
                break;
            }
            cursor = cursor.max(seg.base_offset());
            match seg.read(cursor, max_bytes.saturating_sub(collected), &mut out) {
                Ok(n) => collected += n,
                // What was read before the damage (segments append to `out` as they go) is
                // intact: it goes out first, and the next read starts at the damage.
                Err(Error::Corrupt { .. }) if !out.is_empty() => break,
                Err(Error::Corrupt {
                    path,
                    position,
                    reason,
                }) => {
                    return Err(Error::Damaged {
                        path,
                        position,
                        reason,
                        from: cursor,
                        to: seg.next_offset().min(end).max(cursor + 1),
                    });
                }
                Err(e) => return Err(e),
            }
            if collected >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The first offset whose record has a timestamp at or after `timestamp`, or `None` when no
    /// visible record is that recent.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<u64>> {
        for seg in self.shared.segments().iter() {
            if seg.max_timestamp() < timestamp {
                continue;
            }
            let mut cursor = seg.base_offset() + u64::from(seg.time_index.scan_start(timestamp));
            let seg_end = seg.next_offset();
            while cursor < seg_end {
                let mut batches = Vec::new();
                if seg.read(cursor, 64 << 10, &mut batches)? == 0 {
                    break;
                }
                for batch in &batches {
                    if batch.header().max_timestamp >= timestamp {
                        for rec in batch.records() {
                            let rec = rec.map_err(|why| {
                                Error::corrupt(seg.log_path(), 0, format!("bad record: {why}"))
                            })?;
                            if rec.offset >= cursor && rec.timestamp >= timestamp {
                                return Ok(Some(rec.offset));
                            }
                        }
                    }
                    cursor = cursor.max(batch.header().next_offset());
                }
            }
        }
        Ok(None)
    }

    /// Deletes whole closed segments whose every offset is below `offset` (retention). The active
    /// segment is never deleted. Returns how many segments went.
    pub fn delete_segments_below(&self, offset: u64) -> Result<usize> {
        let mut doomed = Vec::new();
        self.shared.set_segments(|list| {
            let keep_from = (1..list.len())
                .take_while(|&i| list[i].base_offset() <= offset)
                .last()
                .unwrap_or(0);
            doomed = list.drain(..keep_from).collect();
        });
        if let Some(first) = self.shared.segments().first() {
            self.shared
                .log_start
                .store(first.base_offset(), Ordering::Release);
        }
        for seg in &doomed {
            seg.delete_files(&self.shared.dir)?;
        }
        if !doomed.is_empty() {
            self.shared
                .io
                .sync_dir(&self.shared.dir)
                .map_err(|e| Error::io(&self.shared.dir, e))?;
            tracing::info!(dir = %self.shared.dir.display(), segments = doomed.len(), below = offset, "deleted old segments");
        }
        Ok(doomed.len())
    }
}

impl Drop for Partition {
    /// Dropping without [`Partition::close`] stops the writer like a crash would: no final sync,
    /// no clean marker, so the next open recovers.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

fn list_segments(dir: &Path) -> Result<Vec<u64>> {
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
fn drop_unborn_segment(
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

fn read_checkpoint(dir: &Path) -> Result<Option<Checkpoint>> {
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
struct Indexer {
    interval: u64,
    bytes_since_entry: u64,
    has_records: bool,
}

impl Indexer {
    /// The entries to add for a batch at `pos`, given the segment's largest timestamp so far.
    fn on_batch(
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
fn push_entries(seg: &Segment, (entry, time): (IndexEntry, Option<TimeEntry>)) -> bool {
    let ok = seg.index.push(entry);
    match time {
        Some(t) => seg.time_index.push(t) && ok,
        None => ok,
    }
}

/// A closed segment: its indexes are trusted when they check out, else rebuilt by a full scan.
fn open_closed_segment(
    mut seg: Segment,
    index_ok: bool,
    next_base: u64,
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> Result<Segment> {
    let len = seg.visible_len();
    if index_ok && closed_indexes_check_out(&seg, next_base) {
        let max_ts = seg.time_index.last().map_or(i64::MIN, |e| e.max_timestamp);
        seg.publish(len, next_base, max_ts);
        return Ok(seg);
    }
    let interval = u64::from(config.index_interval_bytes);
    let capacity = (len / interval) as usize + 2;
    let (entries, scan) =
        rebuild_indexes(&mut seg, LOG_HEADER_LEN, len, (interval, capacity), None)?;
    if scan.stop != ScanStop::End {
        let why = match scan.stop {
            ScanStop::Corrupt(why) => why,
            _ => "batch cut short",
        };
        tracing::error!(path = %seg.log_path().display(), position = scan.position, reason = why,
            "damage inside a closed segment; reads that reach it will fail");
        report
            .damaged
            .push((seg.log_path().to_path_buf(), scan.position, why.to_string()));
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
    trim(&seg);
    report.rebuilt_indexes.push(seg.index.path().to_path_buf());
    tracing::warn!(path = %seg.log_path().display(), "rebuilt the indexes of a closed segment");
    seg.publish(len, next_base, entries.max_ts);
    Ok(seg)
}

fn trim(seg: &Segment) {
    if let Err(e) = seg.index.trim().and_then(|()| seg.time_index.trim()) {
        tracing::warn!(path = %seg.log_path().display(), error = %e, "could not trim an index; it will be rebuilt on next open");
    }
}

/// Cheap checks of a closed segment's trimmed indexes: the last offset entry names a real batch
/// and the time index ends with the roll's final entry.
fn closed_indexes_check_out(seg: &Segment, next_base: u64) -> bool {
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
) -> Result<(Rebuilt, super::segment::ScanEnd)> {
    let (expected_next, mut max_ts, index_len, time_len) =
        resume.unwrap_or((seg.base_offset(), i64::MIN, 0, 0));
    seg.index
        .reset(index_len, capacity)
        .map_err(|e| Error::io(seg.index.path(), e))?;
    seg.time_index
        .reset(time_len, capacity + 1)
        .map_err(|e| Error::io(seg.index.path(), e))?;
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
struct ActiveState {
    /// Bytes in the log file, header included.
    len: u64,
    next_offset: u64,
    max_timestamp: i64,
    /// First timestamp of the segment's first batch (for `segment_ms`).
    first_timestamp: Option<i64>,
    indexer: Indexer,
}

impl ActiveState {
    fn empty(next_offset: u64) -> Self {
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

/// Recovers the active segment; returns it with the writer's state.
fn recover_active(
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

    if let Some(c) = cp
        && c.clean
        && c.log_position == file_len
        && index_ok
        && seg.index.len() == c.index_entries as usize
        && seg.time_index.len() == c.time_entries as usize
    {
        seg.index
            .reset(seg.index.len(), capacity)
            .map_err(|e| Error::io(seg.index.path(), e))?;
        seg.time_index
            .reset(seg.time_index.len(), capacity + 1)
            .map_err(|e| Error::io(seg.index.path(), e))?;
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
            && c.log_position >= LOG_HEADER_LEN
            && seg.index.len() >= c.index_entries as usize
            && seg.time_index.len() >= c.time_entries as usize
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
    let (rebuilt, scan) =
        rebuild_indexes(&mut seg, from, file_len, (interval, capacity), resume_state)?;
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

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    active: Arc<Segment>,
    /// State of what is written to the file (possibly not yet synced).
    state: ActiveState,
    /// Bytes of the active log known durable.
    synced_len: u64,
    /// Length of the active log file: `state.len` plus preallocated zeros.
    file_len: u64,
    checkpoint_len: u64,
    last_sync: Instant,
    /// Batches stamped but not yet written, with their bytes and index entries.
    buffer: Vec<u8>,
    buffered: Vec<(Completion, Appended)>,
    buffered_index: Vec<(IndexEntry, Option<TimeEntry>)>,
    /// State before the first buffered batch, to undo a failed write.
    before_buffer: ActiveState,
    /// Written batches waiting for the sync that makes them durable.
    unsynced: Vec<(Completion, Appended)>,
    /// A durable append is waiting: the next commit must sync (see `append_lazy`).
    needs_sync: bool,
}

/// Largest amount of bytes the writer gathers before writing.
const MAX_GATHER_BYTES: usize = 16 << 20;
/// Commands taken from the queue per round at most.
const MAX_GATHER_COMMANDS: usize = 4096;

/// The writer thread's scheduling priority (see `LogConfig::writer_nice`): `lowered` nice
/// levels below the broker's while it batches, the broker's own while it serves a lone producer
/// (whose Send polls for the answer on a worker thread and must not be able to starve it).
/// Linux only: there `setpriority(PRIO_PROCESS, 0, ..)` acts on the calling thread alone.
struct Priority {
    base: i32,
    lowered: i32,
    low: bool,
}

impl Priority {
    /// Reads the calling thread's nice value and lowers its priority by `by` (capped at 19).
    fn lower(by: u8) -> Priority {
        let (base, by) = match thread_nice() {
            Ok(base) => (base, by),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the partition writer's priority");
                (0, 0)
            }
        };
        let mut p = Priority {
            base,
            lowered: (base + i32::from(by)).min(19),
            low: false,
        };
        p.set_low(true);
        p
    }

    fn set_low(&mut self, low: bool) {
        if low == self.low || self.lowered == self.base {
            return;
        }
        let nice = if low { self.lowered } else { self.base };
        match set_thread_nice(nice) {
            Ok(()) => self.low = low,
            Err(e) => {
                tracing::warn!(error = %e, nice, "could not change the partition writer's priority");
                // Do not try again on every round.
                self.lowered = self.base;
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn thread_nice() -> std::io::Result<i32> {
    // SAFETY: a plain system call on the calling thread; errno is this thread's own, reset
    // first because -1 is also a valid nice value.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(nice)
    }
}

#[cfg(target_os = "linux")]
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: a plain system call on the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn thread_nice() -> std::io::Result<i32> {
    Ok(0)
}

#[cfg(not(target_os = "linux"))]
fn set_thread_nice(_nice: i32) -> std::io::Result<()> {
    Ok(())
}

/// Polls the queue for up to `window`, yielding the core to any other runnable thread between
/// looks. `Err` when every sender is gone.
fn poll(rx: &Receiver<Command>, window: Duration) -> std::result::Result<Option<Command>, ()> {
    let start = Instant::now();
    while start.elapsed() < window {
        match rx.try_recv() {
            Ok(c) => return Ok(Some(c)),
            Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            Err(mpsc::TryRecvError::Disconnected) => return Err(()),
        }
    }
    Ok(None)
}

impl Writer {
    fn new(shared: Arc<Shared>, active: Arc<Segment>, mut state: ActiveState) -> Self {
        state.indexer.interval = u64::from(shared.config.index_interval_bytes);
        Writer {
            shared,
            active,
            synced_len: state.len,
            file_len: state.len,
            checkpoint_len: state.len,
            last_sync: Instant::now(),
            buffer: Vec::new(),
            buffered: Vec::new(),
            buffered_index: Vec::new(),
            before_buffer: state,
            unsynced: Vec::new(),
            needs_sync: false,
            state,
        }
    }

    fn run(mut self, rx: Receiver<Command>) {
        let mut priority = Priority::lower(self.shared.config.writer_nice);
        let mut closing = None;
        let spin = self.shared.config.writer_spin();
        // Rounds in a row of one append that followed the previous round closely: from two on,
        // the writer polls before sleeping (see `LogConfig::writer_spin_us`).
        let mut lone_rounds = 0u32;
        'outer: loop {
            let idle_since = Instant::now();
            let polled = match spin {
                Some(window) if lone_rounds >= 2 => poll(&rx, window),
                _ => Ok(None),
            };
            let first = match polled {
                Ok(Some(c)) => Ok(c),
                Err(()) => Err(RecvTimeoutError::Disconnected),
                Ok(None) => match self.next_wait() {
                    None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    Some(d) => rx.recv_timeout(d),
                },
            };
            let idle = idle_since.elapsed();
            let first = match first {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => {
                    self.commit(true);
                    continue;
                }
                // Every handle is gone without a close: stop as a crash would.
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut cmd = Some(first);
            let mut taken = 0;
            while let Some(c) = cmd.take() {
                taken += 1;
                match c {
                    Command::Append(batch, done, durable) => {
                        // After staging: a roll inside `stage` commits, which clears the flag.
                        self.stage(batch, done);
                        self.needs_sync |= durable;
                    }
                    Command::Roll(reply) => {
                        let r = self.roll();
                        let _ = reply.send(r);
                    }
                    Command::Close(reply) => {
                        closing = Some(reply);
                        break;
                    }
                }
                if taken >= MAX_GATHER_COMMANDS || self.buffer.len() >= MAX_GATHER_BYTES {
                    break;
                }
                cmd = rx.try_recv().ok();
            }
            lone_rounds = if taken == 1 && spin.is_some_and(|window| idle <= window) {
                lone_rounds.saturating_add(1)
            } else {
                0
            };
            // Before the round completes, so its senders see how the writer serves them.
            let polling = lone_rounds >= 2;
            if self.shared.polling.load(Ordering::Relaxed) != polling {
                self.shared.polling.store(polling, Ordering::Relaxed);
                priority.set_low(!polling);
            }
            self.flush();
            self.commit(false);
            if closing.is_some() {
                break 'outer;
            }
        }
        if let Some(reply) = closing {
            let _ = reply.send(self.close());
        }
        while let Ok(c) = rx.try_recv() {
            if let Command::Append(_, done, _) = c {
                done(Err(Error::Closed {
                    path: self.shared.dir.clone(),
                }));
            }
        }
    }

    /// How long the writer may wait for work before an interval sync is due.
    fn next_wait(&self) -> Option<Duration> {
        let interval = self.shared.config.sync_interval()?;
        if self.synced_len == self.state.len {
            return None;
        }
        Some(interval.saturating_sub(self.last_sync.elapsed()))
    }

    fn poisoned(&self) -> Option<Error> {
        self.shared
            .poisoned
            .load(Ordering::Acquire)
            .then(|| Error::Poisoned {
                path: self.shared.dir.clone(),
            })
    }

    fn should_roll(&self, batch: &EncodedBatch) -> bool {
        let len = self.state.len + self.buffer.len() as u64;
        if len <= LOG_HEADER_LEN {
            return false;
        }
        let config = &self.shared.config;
        let too_big = len + batch.len() as u64 > config.segment_bytes;
        let too_old = self.state.first_timestamp.is_some_and(|first| {
            batch.first_timestamp().saturating_sub(first) >= config.segment_ms as i64
        });
        let rel_end = self.state.next_offset - self.active.base_offset()
            + u64::from(batch.last_offset_delta());
        let index_full = self.active.index.is_full()
            || self.active.time_index.is_full()
            || self.buffered_index.len() + self.active.index.len() + 1 >= config.index_capacity();
        too_big || too_old || index_full || rel_end >= u64::from(u32::MAX)
    }

    /// Stamps a batch and adds it to the write buffer.
    fn stage(&mut self, mut batch: EncodedBatch, done: Completion) {
        if let Some(e) = self.poisoned() {
            return done(Err(e));
        }
        if let Err(e) = batch.check(self.shared.config.max_batch_bytes) {
            return done(Err(e));
        }
        if self.should_roll(&batch)
            && let Err(e) = self.roll()
        {
            tracing::error!(dir = %self.shared.dir.display(), error = %e, "segment roll failed");
            return done(Err(e));
        }
        if self.buffer.is_empty() {
            self.before_buffer = self.state;
        }
        let base_offset = self.state.next_offset;
        let pos = self.state.len + self.buffer.len() as u64;
        let bytes = batch.seal(base_offset);
        let header = match BatchHeader::parse(bytes) {
            Decoded::Valid(h) => h,
            // The encoder wrote this header a moment ago; failing here is a bug, not bad input.
            _ => {
                return done(Err(Error::corrupt(
                    &self.shared.dir,
                    pos,
                    "encoded batch header does not parse",
                )));
            }
        };
        if let Some(e) = self.state.indexer.on_batch(
            self.active.base_offset(),
            pos,
            &header,
            self.state.max_timestamp,
        ) {
            self.buffered_index.push(e);
        }
        self.buffer.extend_from_slice(bytes);
        self.state.max_timestamp = self.state.max_timestamp.max(header.max_timestamp);
        self.state
            .first_timestamp
            .get_or_insert(header.first_timestamp);
        self.state.next_offset = header.next_offset();
        self.buffered.push((
            done,
            Appended {
                base_offset,
                last_offset: header.last_offset(),
            },
        ));
    }

    /// Writes the buffer. On failure the buffered batches fail, the file is cut back and the
    /// state restored; if the cut fails the partition latches.
    fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let path = self.active.log_path();
        let pos = self.before_buffer.len;
        let end = pos + self.buffer.len() as u64;
        // A small write that grows the file takes zeros with it (see `preallocate_bytes`).
        let prealloc = self.shared.config.preallocate_bytes;
        if end > self.file_len && (self.buffer.len() as u64) < prealloc / 4 {
            let target = (end + prealloc).min(self.shared.config.segment_bytes.max(end));
            self.buffer.resize((target - pos) as usize, 0);
        }
        match self
            .shared
            .io
            .write_at(path, self.active.log_file(), &self.buffer, pos)
        {
            Ok(()) => {
                for e in self.buffered_index.drain(..) {
                    push_entries(&self.active, e);
                }
                self.shared
                    .appends
                    .fetch_add(self.buffered.len() as u64, Ordering::Relaxed);
                self.state.len = end;
                self.file_len = self.file_len.max(pos + self.buffer.len() as u64);
                self.unsynced.append(&mut self.buffered);
            }
            Err(source) => {
                tracing::error!(path = %path.display(), error = %source, "log write failed");
                match self.active.log_file().set_len(pos) {
                    Ok(()) => self.file_len = pos,
                    Err(cut) => {
                        tracing::error!(path = %path.display(), error = %cut, "could not cut a failed write; the partition refuses writes until reopened");
                        self.shared.poisoned.store(true, Ordering::Release);
                    }
                }
                self.state = self.before_buffer;
                self.buffered_index.clear();
                let kind = source.kind();
                let msg = source.to_string();
                let mut first = Some(source);
                for (done, _) in self.buffered.drain(..) {
                    let source = first
                        .take()
                        .unwrap_or_else(|| std::io::Error::new(kind, msg.clone()));
                    done(Err(Error::io(path, source)));
                }
            }
        }
        self.buffer.clear();
    }

    /// Makes written batches durable as the policy asks, publishes them and completes them.
    /// `force_sync` syncs under any policy that syncs at all (interval timer, roll, close).
    fn commit(&mut self, force_sync: bool) {
        let policy = self.shared.config.fsync;
        let dirty = self.synced_len < self.state.len;
        let sync_now = dirty
            && match policy {
                FsyncPolicy::Always => self.needs_sync || force_sync,
                FsyncPolicy::Interval => {
                    force_sync
                        || self
                            .shared
                            .config
                            .sync_interval()
                            .is_some_and(|i| self.last_sync.elapsed() >= i)
                }
                FsyncPolicy::Never => false,
            };
        if sync_now && let Err(e) = self.sync() {
            let (kind, msg) = match &e {
                Error::SyncFailed { source, .. } => (source.kind(), source.to_string()),
                _ => (std::io::ErrorKind::Other, e.to_string()),
            };
            let path = self.active.log_path().to_path_buf();
            for (done, _) in self.unsynced.drain(..) {
                done(Err(Error::SyncFailed {
                    path: path.clone(),
                    source: std::io::Error::new(kind, msg.clone()),
                }));
            }
            return;
        }
        if policy == FsyncPolicy::Always && self.synced_len < self.state.len {
            // Only lazy appends are waiting (a durable one would have synced): they are written,
            // and become visible with the next sync.
            for (done, appended) in self.unsynced.drain(..) {
                done(Ok(appended));
            }
            return;
        }
        self.needs_sync = false;
        self.publish();
        for (done, appended) in self.unsynced.drain(..) {
            done(Ok(appended));
        }
        let checkpoint_due =
            self.synced_len - self.checkpoint_len >= self.shared.config.checkpoint_bytes;
        if sync_now
            && checkpoint_due
            && let Err(e) = self.write_checkpoint(false)
        {
            tracing::warn!(dir = %self.shared.dir.display(), error = %e, "could not write a recovery checkpoint");
        }
    }

    fn sync(&mut self) -> Result<()> {
        if let Some(e) = self.poisoned() {
            return Err(e);
        }
        let path = self.active.log_path();
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        self.last_sync = Instant::now();
        match self.shared.io.sync_data(path, self.active.log_file()) {
            Ok(()) => {
                self.synced_len = self.state.len;
                let took = self.last_sync.elapsed().as_micros();
                self.shared
                    .last_sync_micros
                    .store(u64::try_from(took).unwrap_or(u64::MAX), Ordering::Relaxed);
                Ok(())
            }
            Err(source) => {
                tracing::error!(path = %path.display(), error = %source, "fdatasync failed; the partition refuses writes until reopened");
                self.shared.poisoned.store(true, Ordering::Release);
                Err(Error::SyncFailed {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }

    fn publish(&self) {
        let len = if self.shared.config.fsync == FsyncPolicy::Always {
            self.synced_len
        } else {
            self.state.len
        };
        self.active
            .publish(len, self.state.next_offset, self.state.max_timestamp);
        self.shared
            .high_water
            .store(self.state.next_offset, Ordering::Release);
        if let Some(listener) = &self.shared.listener {
            listener(self.state.next_offset);
        }
    }

    /// Syncs indexes, then atomically replaces the checkpoint. Only call when everything written
    /// is synced (or when `clean`, after the final sync).
    fn write_checkpoint(&mut self, clean: bool) -> Result<()> {
        let seg = &self.active;
        seg.index
            .sync()
            .and_then(|()| seg.time_index.sync())
            .map_err(|e| Error::io(seg.index.path(), e))?;
        let cp = Checkpoint {
            clean,
            active_base: seg.base_offset(),
            log_position: self.synced_len,
            next_offset: self.state.next_offset,
            max_timestamp: self.state.max_timestamp,
            index_entries: seg.index.len() as u32,
            time_entries: seg.time_index.len() as u32,
        };
        let path = self.shared.dir.join(checkpoint::FILE_NAME);
        replace_file(self.shared.io.as_ref(), &path, &cp.encode())
            .map_err(|e| Error::io(&path, e))?;
        self.checkpoint_len = self.synced_len;
        Ok(())
    }

    /// Seals the active segment (sync, final time entry, trimmed indexes) and starts a new one.
    fn roll(&mut self) -> Result<()> {
        self.flush();
        if self.state.len + self.buffer.len() as u64 <= LOG_HEADER_LEN {
            return Ok(());
        }
        if self.synced_len < self.state.len {
            self.sync()?;
        }
        self.commit(false);
        // The zeros go before the next segment exists: only the last segment may have a tail.
        self.trim_log()?;
        let seg = Arc::clone(&self.active);
        let next = self.state.next_offset;
        if self.state.indexer.has_records {
            let _ = seg.time_index.push(TimeEntry {
                max_timestamp: self.state.max_timestamp,
                relative_offset: (next - seg.base_offset()) as u32,
            });
        }
        trim(&seg);
        if let Err(e) = seg.index.sync().and_then(|()| seg.time_index.sync()) {
            tracing::warn!(path = %seg.log_path().display(), error = %e, "could not sync a closed segment's index; it will be checked on open");
        }
        let dir = &self.shared.dir;
        let io = self.shared.io.as_ref();
        let new = Segment::create(dir, next, self.shared.config.index_capacity(), io)?;
        io.sync_dir(dir).map_err(|e| Error::io(dir, e))?;
        let new = Arc::new(new);
        new.publish(LOG_HEADER_LEN, next, i64::MIN);
        self.shared.set_segments(|list| list.push(Arc::clone(&new)));
        self.active = new;
        self.state = ActiveState::empty(next);
        self.state.indexer.interval = u64::from(self.shared.config.index_interval_bytes);
        self.synced_len = LOG_HEADER_LEN;
        self.file_len = LOG_HEADER_LEN;
        self.checkpoint_len = LOG_HEADER_LEN;
        tracing::debug!(dir = %dir.display(), base = next, "rolled to a new segment");
        if let Err(e) = self.write_checkpoint(false) {
            tracing::warn!(dir = %self.shared.dir.display(), error = %e, "could not write a recovery checkpoint after roll");
        }
        Ok(())
    }

    /// Final sync, trimmed indexes, clean checkpoint.
    fn close(&mut self) -> Result<()> {
        self.flush();
        if self.synced_len < self.state.len {
            self.sync()?;
        }
        self.commit(false);
        if let Some(e) = self.poisoned() {
            return Err(e);
        }
        self.trim_log()?;
        trim(&self.active);
        self.write_checkpoint(true)
    }

    /// Cuts preallocated zeros off the active log and syncs the new length.
    fn trim_log(&mut self) -> Result<()> {
        if self.file_len <= self.state.len {
            return Ok(());
        }
        let path = self.active.log_path();
        self.active
            .log_file()
            .set_len(self.state.len)
            .map_err(|e| Error::io(path, e))?;
        self.file_len = self.state.len;
        self.sync()
    }
}

/// What retention may delete: whole closed segments, oldest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete segments whose newest record is older than this (ms).
    pub max_age_ms: Option<u64>,
    /// Delete the oldest segments while the partition is larger than this.
    pub max_bytes: Option<u64>,
    /// Keep every segment holding an offset at or above this (what consumers still need).
    pub keep_from: Option<u64>,
}

/// What retention deleted (or would delete, in a dry run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub segments_before: usize,
    pub bytes_before: u64,
    pub deleted_segments: usize,
    pub deleted_bytes: u64,
    /// Segments retention would delete but `keep_from` holds back.
    pub held_segments: usize,
    pub held_bytes: u64,
    /// The first offset held before, and kept after.
    pub log_start_before: u64,
    pub log_start: u64,
}

impl Partition {
    /// Works out what `retention` deletes at time `now_ms`, and deletes it unless `dry_run`.
    /// The active segment is never deleted.
    pub fn retain(
        &self,
        retention: &Retention,
        now_ms: i64,
        dry_run: bool,
    ) -> Result<RetentionOutcome> {
        let _maintenance = self.shared.maintenance();
        let segments = self.shared.segments();
        let mut total: u64 = segments.iter().map(|s| s.size_bytes()).sum();
        let mut out = RetentionOutcome {
            segments_before: segments.len(),
            bytes_before: total,
            log_start: segments.first().map_or(0, |s| s.base_offset()),
            log_start_before: segments.first().map_or(0, |s| s.base_offset()),
            ..RetentionOutcome::default()
        };
        let mut delete_below = None;
        for (i, seg) in segments.iter().enumerate() {
            let Some(next) = segments.get(i + 1) else {
                break; // the active segment
            };
            let too_old = retention.max_age_ms.is_some_and(|age| {
                seg.max_timestamp() < now_ms.saturating_sub(age.min(i64::MAX as u64) as i64)
            });
            let too_big = retention.max_bytes.is_some_and(|max| total > max);
            if !(too_old || too_big) {
                break;
            }
            if retention.keep_from.is_some_and(|k| next.base_offset() > k) {
                out.held_segments += 1;
                out.held_bytes += seg.size_bytes();
                total = total.saturating_sub(seg.size_bytes());
                continue;
            }
            if out.held_segments > 0 {
                break; // never delete past a held segment: the log stays contiguous
            }
            out.deleted_segments += 1;
            out.deleted_bytes += seg.size_bytes();
            total = total.saturating_sub(seg.size_bytes());
            delete_below = Some(next.base_offset());
            out.log_start = next.base_offset();
        }
        if !dry_run && let Some(offset) = delete_below {
            self.delete_segments_below(offset)?;
        }
        Ok(out)
    }
}

impl Partition {
    /// Key compaction of the closed segments (see [`super::compaction`]). The active segment is
    /// never rewritten, but its keys count: a newer record there drops older ones before it.
    pub fn compact_keys(&self, opts: &CompactionOptions) -> Result<CompactionOutcome> {
        self.compact_keys_or_plan(opts, false)
    }

    /// What [`Partition::compact_keys`] would do, changing nothing: the same outcome, counted
    /// from the same cleaned segments, none of them installed.
    pub fn plan_compaction(&self, opts: &CompactionOptions) -> Result<CompactionOutcome> {
        self.compact_keys_or_plan(opts, true)
    }

    fn compact_keys_or_plan(
        &self,
        opts: &CompactionOptions,
        dry_run: bool,
    ) -> Result<CompactionOutcome> {
        use super::compaction::{KeyMap, clean_segment};
        let _maintenance = self.shared.maintenance();
        let segments = self.shared.segments();
        let mut out = CompactionOutcome {
            segments_before: segments.len(),
            bytes_before: segments.iter().map(|s| s.size_bytes()).sum(),
            ..CompactionOutcome::default()
        };
        let closed = &segments[..segments.len().saturating_sub(1)];
        if closed.is_empty() {
            out.segments_after = out.segments_before;
            out.bytes_after = out.bytes_before;
            return Ok(out);
        }
        let mut keys = KeyMap::default();
        let end = self.high_water();
        let mut next = self.log_start();
        while next < end {
            let batches = self.read(next, 4 << 20)?;
            if batches.is_empty() {
                break;
            }
            for batch in &batches {
                for r in batch.records() {
                    let r = r.map_err(|why| Error::corrupt(&self.shared.dir, next, why))?;
                    if let Some(k) = &r.key
                        && r.offset >= next
                    {
                        keys.add(k, r.offset);
                    }
                }
                next = next.max(batch.header().next_offset());
            }
        }
        let mut group: Vec<u64> = Vec::new();
        let mut body: Vec<u8> = Vec::new();
        let mut dropped_in_group = false;
        // A dry run's count of the segments and bytes the closed ones would become.
        let mut planned = (0usize, 0u64);
        let mut group_bytes = 0u64;
        let mut install = |bases: &[u64], body: &[u8], next_base: u64, dropped: bool, old: u64| {
            if !dry_run {
                return self.replace_segments(bases, body, next_base, dropped);
            }
            let unchanged = bases.len() == 1 && !dropped;
            planned.0 += 1;
            planned.1 += if unchanged {
                old
            } else {
                LOG_HEADER_LEN + body.len() as u64
            };
            Ok(())
        };
        for (i, seg) in closed.iter().enumerate() {
            let path = seg.log_path();
            let bytes = bytes::Bytes::from(fs::read(path).map_err(|e| Error::io(path, e))?);
            let (cleaned, before, after) = clean_segment(&bytes, &keys, opts, path)?;
            out.records_before += before;
            out.records_after += after;
            let fits = LOG_HEADER_LEN + (body.len() + cleaned.len()) as u64 <= opts.segment_bytes;
            if !group.is_empty() && !fits {
                install(
                    &group,
                    &body,
                    seg.base_offset(),
                    dropped_in_group,
                    group_bytes,
                )?;
                group.clear();
                body.clear();
                dropped_in_group = false;
                group_bytes = 0;
            }
            group.push(seg.base_offset());
            body.extend_from_slice(&cleaned);
            group_bytes += seg.size_bytes();
            dropped_in_group |= after < before;
            let next_base = segments[i + 1].base_offset();
            if i + 1 == closed.len() {
                install(&group, &body, next_base, dropped_in_group, group_bytes)?;
            }
        }
        if dry_run {
            let active = segments.last().map_or(0, |s| s.size_bytes());
            out.segments_after = planned.0 + 1;
            out.bytes_after = planned.1 + active;
            return Ok(out);
        }
        let after = self.shared.segments();
        out.segments_after = after.len();
        out.bytes_after = after.iter().map(|s| s.size_bytes()).sum();
        Ok(out)
    }

    /// Installs `body` as the one segment replacing `bases` (unless nothing would change).
    fn replace_segments(
        &self,
        bases: &[u64],
        body: &[u8],
        next_base: u64,
        dropped: bool,
    ) -> Result<()> {
        if bases.len() == 1 && !dropped {
            return Ok(());
        }
        let dir = &self.shared.dir;
        let io = self.shared.io.as_ref();
        super::compaction::write_cleaned(dir, bases[0], body, io)?;
        super::compaction::install(dir, bases, io)?;
        let (seg, index_ok) = Segment::open(dir, bases[0], None)?;
        let seg = open_closed_segment(
            seg,
            index_ok,
            next_base,
            &self.shared.config,
            &mut RecoveryReport::default(),
        )?;
        let seg = Arc::new(seg);
        self.shared.set_segments(|list| {
            if let Some(i) = list.iter().position(|s| s.base_offset() == bases[0]) {
                let end = (i + bases.len()).min(list.len());
                list.splice(i..end, [Arc::clone(&seg)]);
            }
        });
        tracing::info!(dir = %dir.display(), segments = bases.len(), base = bases[0], "compacted segments");
        Ok(())
    }
}
