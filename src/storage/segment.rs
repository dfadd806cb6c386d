//! A segment: one `.log` file of record batches and its two sparse indexes.
//!
//! File names are built and parsed here and nowhere else: the base offset (the first offset the
//! segment may hold) zero-padded to 20 digits, plus `.log`, `.index` or `.timeindex`.
//!
//! # Log file layout
//!
//! | offset | size | field         | notes                                   |
//! |-------:|-----:|---------------|-----------------------------------------|
//! |      0 |    4 | `magic`       | `SLLG`                                  |
//! |      4 |    2 | `version`     | 1                                       |
//! |      6 |    2 | reserved      | 0                                       |
//! |      8 |    8 | `base_offset` | equals the number in the file name      |
//! |     16 |    … | batches       | [`super::record`] batches, back to back |
//!
//! A [`Segment`] is shared (`Arc`) between the partition's writer and its readers. Readers see
//! the bytes below `visible_len` and the offsets below `next_offset`, both published by the
//! writer with `Release` after the bytes are durable under the partition's fsync policy.
//! A Raft log's entries are read up to `written_len` instead, published as soon as the bytes are
//! written, so a replication stream never finds fewer entries than it was told to send (Raft
//! counts the leader's copy toward a quorum only once its sync is done; readers of messages
//! never see past `visible_len`). openraft 0.9 itself starts replicating an entry only once the
//! leader's append is durable (docs/replication.md, "Where fsync happens").
//!
//! Over 450 lines with one job: a segment file and its two indexes, open to close.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;

use super::error::{Error, Result};
use super::index::OffsetIndex;
use super::io::{FileIo, PRIVATE_FILE};
use super::mapped::OpenProblem;
use super::record::{Batch, BatchHeader, Decoded};
use super::timeindex::TimeIndex;

pub const LOG_MAGIC: [u8; 4] = *b"SLLG";
pub const LOG_VERSION: u16 = 1;
pub const LOG_HEADER_LEN: u64 = 16;
/// Positions in the index are u32, so no segment may grow past this.
pub const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64;

/// Scans (recovery, rebuild) read this much at a time.
const SCAN_CHUNK: usize = 1 << 20;
/// Reads fetch at least this much, enough for the index's bounded forward scan to usually take
/// one read; a batch larger than what was read is then read whole.
const MIN_READ: usize = 64 << 10;
/// Reads fetch at most this much per buffer: small enough for the allocator to reuse buffers
/// instead of mapping (and the kernel zeroing) fresh pages for every read.
const MAX_READ: usize = 256 << 10;

/// The 16-byte header every segment log starts with.
pub fn log_header(base_offset: u64) -> [u8; LOG_HEADER_LEN as usize] {
    let mut header = [0u8; LOG_HEADER_LEN as usize];
    header[0..4].copy_from_slice(&LOG_MAGIC);
    header[4..6].copy_from_slice(&LOG_VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&base_offset.to_le_bytes());
    header
}

/// The kinds of file a segment is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Log,
    Index,
    TimeIndex,
}

impl FileKind {
    fn extension(self) -> &'static str {
        match self {
            FileKind::Log => "log",
            FileKind::Index => "index",
            FileKind::TimeIndex => "timeindex",
        }
    }
}

/// `<dir>/<base:020>.<ext>`
pub fn segment_path(dir: &Path, base_offset: u64, kind: FileKind) -> PathBuf {
    dir.join(format!("{base_offset:020}.{}", kind.extension()))
}

/// The base offset and kind of a segment file name, or `None` for any other file.
pub fn parse_segment_file_name(name: &str) -> Option<(u64, FileKind)> {
    let (stem, ext) = name.split_once('.')?;
    let kind = [FileKind::Log, FileKind::Index, FileKind::TimeIndex]
        .into_iter()
        .find(|k| k.extension() == ext)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stem.parse().ok()?, kind))
}

/// Where and why a scan of the log stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEnd {
    /// Position after the last valid batch.
    pub position: u64,
    /// Offset after the last valid batch (the scan's `expected_next` if none).
    pub next_offset: u64,
    pub stop: ScanStop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// Reached the end cleanly.
    End,
    /// The last batch is incomplete.
    Torn,
    /// A batch does not check out.
    Corrupt(&'static str),
}

#[derive(Debug)]
pub struct Segment {
    base_offset: u64,
    log_path: PathBuf,
    log: File,
    pub(crate) index: OffsetIndex,
    pub(crate) time_index: TimeIndex,
    visible_len: AtomicU64,
    /// Bytes written, durable or not (at least `visible_len`): a Raft log's entries.
    written_len: AtomicU64,
    next_offset: AtomicU64,
    max_timestamp: AtomicI64,
    /// The newest batches written here, as written, for [`Segment::batch_at`]: a Raft log's
    /// replication and apply read each entry right after it is written, once per follower and
    /// once more to apply, and take it from here without a read or a CRC check. Empty unless
    /// the writer keeps them ([`Segment::keep_written`]).
    recent: Mutex<Recent>,
}

/// The most bytes all segments of a process keep in memory as written.
pub const KEPT_BYTES_BUDGET: usize = 256 << 20;

/// Bytes kept by [`Segment::keep_written`] in all the segments of this process: at most
/// [`KEPT_BYTES_BUDGET`]. A batch that would go past it is not kept (its readers read it from
/// the file, as they would without keeping).
static PROCESS_BUDGET: Budget = Budget::new(KEPT_BYTES_BUDGET);

/// Bytes kept in memory by a set of segments, and the most they may keep.
#[derive(Debug)]
struct Budget {
    kept: AtomicUsize,
    limit: usize,
}

impl Budget {
    const fn new(limit: usize) -> Self {
        Budget {
            kept: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `n` bytes if they fit.
    fn take(&self, n: usize) -> bool {
        self.kept
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |kept| {
                (kept + n <= self.limit).then_some(kept + n)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.kept.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Batches by position, oldest first, their total size, and the budget they count against.
#[derive(Debug)]
struct Recent {
    batches: VecDeque<(u64, Batch)>,
    bytes: usize,
    budget: &'static Budget,
}

impl Default for Recent {
    fn default() -> Self {
        Recent::within(&PROCESS_BUDGET)
    }
}

impl Recent {
    fn within(budget: &'static Budget) -> Self {
        Recent {
            batches: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn get(&self, pos: u64) -> Option<Batch> {
        let i = self.batches.binary_search_by_key(&pos, |(p, _)| *p).ok()?;
        Some(self.batches[i].1.clone())
    }

    /// Keeps `batch` unless the process-wide budget is spent.
    fn push(&mut self, pos: u64, batch: Batch) {
        let n = batch.bytes().len();
        if self.budget.take(n) {
            self.bytes += n;
            self.batches.push_back((pos, batch));
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, b)) = self.batches.pop_front() {
            self.release(b.bytes().len());
        }
    }

    fn cut_at(&mut self, len: u64) {
        while let Some((pos, b)) = self.batches.back() {
            if *pos < len {
                break;
            }
            let n = b.bytes().len();
            self.batches.pop_back();
            self.release(n);
        }
    }

    fn clear(&mut self) {
        self.batches.clear();
        self.release(self.bytes);
    }

    fn release(&mut self, n: usize) {
        self.bytes -= n;
        self.budget.give_back(n);
    }
}

impl Drop for Recent {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Segment {
    /// Creates a new, empty segment: the log header is written and synced, the indexes are
    /// preallocated. The caller syncs the directory.
    pub fn create(
        dir: &Path,
        base_offset: u64,
        index_capacity: usize,
        io: &dyn FileIo,
    ) -> Result<Self> {
        let log_path = segment_path(dir, base_offset, FileKind::Log);
        let log = io
            .create_file(
                &log_path,
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(PRIVATE_FILE),
            )
            .map_err(|e| Error::io(&log_path, e))?;
        let header = log_header(base_offset);
        io.write_at(&log_path, &log, &header, 0)
            .map_err(|e| Error::io(&log_path, e))?;
        io.sync_data(&log_path, &log)
            .map_err(|e| Error::io(&log_path, e))?;
        let index_path = segment_path(dir, base_offset, FileKind::Index);
        let index = OffsetIndex::create(&index_path, base_offset, index_capacity, io)
            .map_err(|e| Error::io(&index_path, e))?;
        let time_path = segment_path(dir, base_offset, FileKind::TimeIndex);
        let time_index = TimeIndex::create(&time_path, base_offset, index_capacity + 1, io)
            .map_err(|e| Error::io(&time_path, e))?;
        Ok(Segment {
            base_offset,
            log_path,
            log,
            index,
            time_index,
            visible_len: AtomicU64::new(LOG_HEADER_LEN),
            written_len: AtomicU64::new(LOG_HEADER_LEN),
            next_offset: AtomicU64::new(base_offset),
            max_timestamp: AtomicI64::new(i64::MIN),
            recent: Mutex::default(),
        })
    }

    /// Opens an existing segment's log and checks its header. Indexes are opened as they are when
    /// they check out, else created empty; `index_ok` says which. For the active segment,
    /// `active` gives how many (offset, time) index entries count (a preallocated index holds
    /// zeros past them) and the index capacity to map (the files grow on the first write).
    pub fn open(
        dir: &Path,
        base_offset: u64,
        active: Option<((usize, usize), usize)>,
        io: &dyn FileIo,
    ) -> Result<(Self, bool)> {
        let index_entries = active.map(|a| a.0);
        let capacity = active.map_or(0, |a| a.1);
        let log_path = segment_path(dir, base_offset, FileKind::Log);
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;
        let len = log.metadata().map_err(|e| Error::io(&log_path, e))?.len();
        let mut header = [0u8; LOG_HEADER_LEN as usize];
        if len < LOG_HEADER_LEN {
            return Err(Error::corrupt(
                &log_path,
                len,
                "log shorter than its header",
            ));
        }
        log.read_exact_at(&mut header, 0)
            .map_err(|e| Error::io(&log_path, e))?;
        if header[0..4] != LOG_MAGIC || header[4..6] != LOG_VERSION.to_le_bytes() {
            return Err(Error::corrupt(&log_path, 0, "bad log magic or version"));
        }
        if header[8..16] != base_offset.to_le_bytes() {
            return Err(Error::corrupt(
                &log_path,
                8,
                "base offset in header does not match the file name",
            ));
        }
        let index_path = segment_path(dir, base_offset, FileKind::Index);
        let time_path = segment_path(dir, base_offset, FileKind::TimeIndex);
        let opened = OffsetIndex::open(
            &index_path,
            base_offset,
            index_entries.map(|e| e.0),
            capacity,
        )
        .and_then(|i| {
            TimeIndex::open(
                &time_path,
                base_offset,
                index_entries.map(|e| e.1),
                capacity + 1,
            )
            .map(|t| (i, t))
        });
        let (index, time_index, index_ok) = match opened {
            Ok((i, t)) => (i, t, true),
            Err(problem) => {
                let why = match problem {
                    OpenProblem::Io(e) => e.to_string(),
                    OpenProblem::Invalid(why) => why.to_string(),
                };
                tracing::debug!(path = %index_path.display(), %why, "index unusable; it will be rebuilt");
                let i = OffsetIndex::create(&index_path, base_offset, 0, io)
                    .map_err(|e| Error::io(&index_path, e))?;
                let t = TimeIndex::create(&time_path, base_offset, 0, io)
                    .map_err(|e| Error::io(&time_path, e))?;
                (i, t, false)
            }
        };
        let segment = Segment {
            base_offset,
            log_path,
            log,
            index,
            time_index,
            visible_len: AtomicU64::new(len),
            written_len: AtomicU64::new(len),
            next_offset: AtomicU64::new(base_offset),
            max_timestamp: AtomicI64::new(i64::MIN),
            recent: Mutex::default(),
        };
        Ok((segment, index_ok))
    }

    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub(crate) fn log_file(&self) -> &File {
        &self.log
    }

    /// Bytes readers may read, header included.
    pub fn visible_len(&self) -> u64 {
        self.visible_len.load(Ordering::Acquire)
    }

    /// One past the last offset readers may see here.
    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Largest record timestamp readers may see here (`i64::MIN` when empty).
    pub fn max_timestamp(&self) -> i64 {
        self.max_timestamp.load(Ordering::Acquire)
    }

    /// Publishes what the writer has made durable.
    pub(crate) fn publish(&self, len: u64, next_offset: u64, max_timestamp: i64) {
        self.max_timestamp.store(max_timestamp, Ordering::Release);
        self.next_offset.store(next_offset, Ordering::Release);
        self.written_len.fetch_max(len, Ordering::AcqRel);
        self.visible_len.store(len, Ordering::Release);
    }

    /// Bytes written, durable or not, header included: how far a Raft log reads its entries.
    pub fn written_len(&self) -> u64 {
        self.written_len.load(Ordering::Acquire)
    }

    /// Publishes what the writer has written (not yet durable): Raft log entries only.
    pub(crate) fn note_written(&self, len: u64) {
        self.written_len.store(len, Ordering::Release);
    }

    /// Keeps batches just written (at increasing positions, below `written_len`) for
    /// [`Segment::batch_at`], dropping the oldest kept ones beyond `max_bytes` in all (and
    /// keeping none past the process's [`KEPT_BYTES_BUDGET`]).
    pub(crate) fn keep_written(
        &self,
        written: impl IntoIterator<Item = (u64, Batch)>,
        max_bytes: usize,
    ) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for (pos, batch) in written {
            let n = batch.bytes().len();
            while recent.bytes + n > max_bytes && !recent.batches.is_empty() {
                recent.pop_front();
            }
            if n <= max_bytes {
                recent.push(pos, batch);
            }
        }
    }

    /// Bytes of batches kept by [`Segment::keep_written`].
    #[cfg(test)]
    pub(crate) fn kept_bytes(&self) -> usize {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Drops the batches kept by [`Segment::keep_written`] (the segment is no longer written).
    pub(crate) fn forget_written(&self) {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Size of the log on disk as readers see it.
    pub fn size_bytes(&self) -> u64 {
        self.visible_len()
    }

    /// Reads `len` bytes at `pos` into a fresh buffer, without zeroing it first.
    fn read_exact(&self, pos: u64, len: usize) -> Result<Bytes> {
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        let fd = self.log.as_raw_fd();
        while buf.len() < len {
            let done = buf.len();
            let at = libc::off_t::try_from(pos + done as u64).map_err(|_| {
                Error::io(
                    &self.log_path,
                    std::io::Error::other("read position overflows off_t"),
                )
            })?;
            // SAFETY: the pointer addresses the `len - done` bytes of spare capacity after the
            // initialised part of `buf`; pread only writes there, and `set_len` below extends the
            // initialised part by exactly the count pread reports written.
            let n = unsafe { libc::pread(fd, buf.as_mut_ptr().add(done).cast(), len - done, at) };
            match n {
                n if n > 0 => {
                    // SAFETY: pread wrote `n` bytes right after the first `done` (see above).
                    unsafe { buf.set_len(done + n as usize) }
                }
                0 => {
                    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err(Error::io(&self.log_path, eof));
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(Error::io(&self.log_path, e));
                    }
                }
            }
        }
        Ok(Bytes::from(buf))
    }

    /// The header of the batch at `pos`, which must be a batch boundary below `written_len`.
    pub fn batch_header_at(&self, pos: u64) -> Result<BatchHeader> {
        let end = self.written_len();
        let n = (end.saturating_sub(pos) as usize).min(super::record::MAX_HEADER_LEN);
        let buf = self.read_exact(pos, n)?;
        match BatchHeader::parse(&buf) {
            Decoded::Valid(h) => Ok(h),
            Decoded::Torn { .. } => Err(Error::corrupt(&self.log_path, pos, "batch cut short")),
            Decoded::Corrupt(why) => Err(Error::corrupt(&self.log_path, pos, why)),
        }
    }

    /// The whole, CRC-checked batch at `pos`, a batch boundary below `written_len` (a Raft log
    /// reads its entries by position).
    pub fn batch_at(&self, pos: u64) -> Result<Batch> {
        let kept = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pos);
        if let Some(batch) = kept {
            return Ok(batch);
        }
        let header = self.batch_header_at(pos)?;
        if pos + header.size as u64 > self.written_len() {
            return Err(Error::corrupt(
                &self.log_path,
                pos,
                "batch runs past the end of the segment",
            ));
        }
        let buf = self.read_exact(pos, header.size)?;
        match Batch::decode(&buf) {
            Decoded::Valid(batch) => Ok(batch),
            Decoded::Torn { .. } => Err(Error::corrupt(&self.log_path, pos, "batch cut short")),
            Decoded::Corrupt(why) => Err(Error::corrupt(&self.log_path, pos, why)),
        }
    }

    /// Where to start reading for `offset`: the indexed position at or below it, and the base
    /// offset the batch there must have.
    pub fn position_for(&self, offset: u64) -> (u64, Option<u64>) {
        let rel = offset
            .saturating_sub(self.base_offset)
            .min(u64::from(u32::MAX)) as u32;
        match self.index.lookup(rel) {
            Some(e) => (
                u64::from(e.position),
                Some(self.base_offset + u64::from(e.relative_offset)),
            ),
            None => (LOG_HEADER_LEN, None),
        }
    }

    /// Reads whole batches holding offsets at or after `from`, until `max_bytes` are collected
    /// (at least one batch when there is one). Returns the bytes collected. On damage the error
    /// comes back with the intact batches before it already in `out`.
    ///
    /// The index is derived data: when the batch at the indexed position is not the one the
    /// entry names, the read falls back to a scan from the segment's start and says so.
    pub fn read(&self, from: u64, max_bytes: usize, out: &mut Vec<Batch>) -> Result<usize> {
        let (pos, expected) = self.position_for(from);
        match self.read_from(pos, expected, from, max_bytes, out)? {
            Some(collected) => Ok(collected),
            None => {
                tracing::warn!(path = %self.log_path.display(), position = pos,
                    "index entry does not match the log; scanning the segment instead");
                // Nothing was added to `out` before the mismatch showed.
                Ok(self
                    .read_from(LOG_HEADER_LEN, None, from, max_bytes, out)?
                    .unwrap_or(0))
            }
        }
    }

    /// Reads from `pos`; when `expected` is given, the batch there must start at that offset,
    /// else `None` (checked on the first window read, without a read of its own).
    fn read_from(
        &self,
        mut pos: u64,
        mut expected: Option<u64>,
        from: u64,
        max_bytes: usize,
        out: &mut Vec<Batch>,
    ) -> Result<Option<usize>> {
        let end = self.visible_len();
        let mut collected = 0usize;
        while pos < end && (collected == 0 || collected < max_bytes) {
            let want = (max_bytes.saturating_sub(collected)).clamp(MIN_READ, MAX_READ);
            let n = (end - pos).min(want as u64) as usize;
            let mut window = self.read_exact(pos, n)?;
            if let Some(e) = expected.take()
                && !matches!(BatchHeader::parse(&window), Decoded::Valid(h) if h.base_offset == e)
            {
                return Ok(None);
            }
            let mut progressed = false;
            while !window.is_empty() {
                match Batch::decode(&window) {
                    Decoded::Valid(batch) => {
                        let size = batch.header().size;
                        progressed = true;
                        pos += size as u64;
                        window = window.slice(size..);
                        if batch.header().holds_offsets_from(from) {
                            collected += size;
                            out.push(batch);
                            if collected >= max_bytes {
                                return Ok(Some(collected));
                            }
                        }
                    }
                    Decoded::Torn { needed } => {
                        if pos + needed as u64 > end {
                            return Err(Error::corrupt(
                                &self.log_path,
                                pos,
                                "batch runs past the end of the segment",
                            ));
                        }
                        if !progressed {
                            // The window was too small for one batch: read exactly that batch.
                            window = self.read_exact(pos, needed)?;
                            continue;
                        }
                        break;
                    }
                    Decoded::Corrupt(why) => {
                        return Err(Error::corrupt(&self.log_path, pos, why));
                    }
                }
            }
        }
        Ok(Some(collected))
    }

    /// Walks valid batches from `pos` up to `limit` bytes, calling `each(position, header)`.
    /// Stops at the end, a torn batch, a corrupt batch, or a batch whose base offset is below
    /// `expected_next` (offsets must increase).
    pub fn scan(
        &self,
        mut pos: u64,
        limit: u64,
        mut expected_next: u64,
        mut each: impl FnMut(u64, &BatchHeader),
    ) -> Result<ScanEnd> {
        let mut window = Bytes::new();
        let mut window_pos = pos;
        loop {
            if pos >= limit {
                return Ok(ScanEnd {
                    position: pos,
                    next_offset: expected_next,
                    stop: ScanStop::End,
                });
            }
            let rel = (pos - window_pos) as usize;
            let decoded = Batch::decode(&window.slice(rel..));
            let stop = match decoded {
                Decoded::Valid(batch) => {
                    let h = *batch.header();
                    if h.base_offset < expected_next {
                        Some(ScanStop::Corrupt("batch offsets go backwards"))
                    } else if let Err(why) = batch.records_check_out() {
                        Some(ScanStop::Corrupt(why))
                    } else {
                        each(pos, &h);
                        pos += h.size as u64;
                        expected_next = h.next_offset();
                        None
                    }
                }
                Decoded::Torn { needed } => {
                    let needed = needed.max(4);
                    if pos + needed as u64 > limit {
                        Some(ScanStop::Torn)
                    } else {
                        let n = (limit - pos).min(needed.max(SCAN_CHUNK) as u64) as usize;
                        window = self.read_exact(pos, n)?;
                        window_pos = pos;
                        None
                    }
                }
                Decoded::Corrupt(why) => Some(ScanStop::Corrupt(why)),
            };
            if let Some(stop) = stop {
                return Ok(ScanEnd {
                    position: pos,
                    next_offset: expected_next,
                    stop,
                });
            }
        }
    }

    /// True when bytes `from..to` of the log are all zero (preallocated, never written). Ranges
    /// over 64 MiB are not read and count as not zero.
    pub(crate) fn is_zero(&self, from: u64, to: u64) -> Result<bool> {
        if to.saturating_sub(from) > 64 << 20 {
            return Ok(false);
        }
        let mut pos = from;
        while pos < to {
            let n = ((to - pos) as usize).min(SCAN_CHUNK);
            if self.read_exact(pos, n)?.iter().any(|&b| b != 0) {
                return Ok(false);
            }
            pos += n as u64;
        }
        Ok(true)
    }

    /// Cuts the log to `len` bytes (recovery of a torn tail or of preallocated zeros). Not
    /// synced: should a crash undo the cut, the next recovery cuts the same bytes again, and the
    /// first sync of an append written at `len` makes the new length durable with it.
    pub(crate) fn truncate_log(&self, len: u64, io: &dyn FileIo) -> Result<()> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cut_at(len);
        io.set_len(&self.log_path, &self.log, len)
            .map_err(|e| Error::io(&self.log_path, e))?;
        self.visible_len.store(len, Ordering::Release);
        self.written_len.store(len, Ordering::Release);
        Ok(())
    }

    /// Gives both index files room for their full capacity (before the first write).
    pub(crate) fn grow_indexes(&self, io: &dyn FileIo) -> Result<()> {
        self.index
            .grow(io)
            .map_err(|e| Error::io(self.index.path(), e))?;
        self.time_index
            .grow(io)
            .map_err(|e| Error::io(self.time_index.path(), e))
    }

    /// Writes both index files' entries back and syncs them.
    pub(crate) fn sync_indexes(&self, io: &dyn FileIo) -> Result<()> {
        self.index
            .sync(io)
            .map_err(|e| Error::io(self.index.path(), e))?;
        self.time_index
            .sync(io)
            .map_err(|e| Error::io(self.time_index.path(), e))
    }

    /// Deletes the segment's three files.
    pub(crate) fn delete_files(&self, dir: &Path) -> Result<()> {
        for kind in [FileKind::Log, FileKind::Index, FileKind::TimeIndex] {
            let path = segment_path(dir, self.base_offset, kind);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_strangers_are_ignored() {
        let p = segment_path(Path::new("/d"), 42, FileKind::TimeIndex);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "00000000000000000042.timeindex");
        assert_eq!(
            parse_segment_file_name(name),
            Some((42, FileKind::TimeIndex))
        );
        assert_eq!(parse_segment_file_name("42.log"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.log"), None);
        assert_eq!(
            parse_segment_file_name("00000000000000000042.log.tmp"),
            None
        );
        assert_eq!(parse_segment_file_name("checkpoint"), None);
    }

    /// A batch of `n` one-byte-valued records, sealed at `base` as the writer would.
    fn written(n: usize, base: u64) -> Batch {
        let records: Vec<_> = (0..n)
            .map(|i| crate::storage::record::Record {
                value: Some(Bytes::from(vec![i as u8; 100])),
                ..Default::default()
            })
            .collect();
        let mut batch = crate::storage::record::EncodedBatch::new(&records);
        batch.seal(base);
        batch.into_written().unwrap()
    }

    #[test]
    fn a_segment_keeps_its_newest_written_batches_up_to_its_limit_and_forgets_them_when_cut() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), 0, 64, &crate::storage::io::RealIo).unwrap();
        let batches: Vec<(u64, Batch)> = (0..10u64)
            .map(|i| (LOG_HEADER_LEN + i * 10_000, written(3, i * 3)))
            .collect();
        let size = batches[0].1.bytes().len();
        // Room for four of them: the last four are kept, the older ones are not served from
        // memory (the file holds nothing, so reading them fails).
        seg.keep_written(batches.clone(), 4 * size + size / 2);
        for (i, (pos, batch)) in batches.iter().enumerate() {
            match seg.batch_at(*pos) {
                Ok(kept) => {
                    assert!(i >= 6, "batch {i} kept past the limit");
                    assert_eq!(kept.bytes(), batch.bytes());
                }
                Err(_) => assert!(i < 6, "batch {i} not kept"),
            }
        }
        // A cut at the eighth forgets it and the later ones; a larger batch than the limit is
        // never kept.
        seg.recent.lock().unwrap().cut_at(batches[7].0);
        assert!(seg.batch_at(batches[7].0).is_err());
        assert!(seg.batch_at(batches[6].0).is_ok());
        seg.keep_written([(LOG_HEADER_LEN + 200_000, written(50, 30))], 4 * size);
        assert!(seg.batch_at(LOG_HEADER_LEN + 200_000).is_err());
        seg.forget_written();
        assert!(seg.batch_at(batches[6].0).is_err());
        assert_eq!(seg.recent.lock().unwrap().bytes, 0);
    }

    #[test]
    fn segments_keep_nothing_past_their_shared_budget_and_give_it_back_when_they_forget() {
        static SMALL: Budget = Budget::new(3000);
        let batch = written(3, 0);
        let size = batch.bytes().len();
        let fits = 3000 / size;
        let mut a = Recent::within(&SMALL);
        let mut b = Recent::within(&SMALL);
        for i in 0..fits as u64 {
            a.push(i * 1000, batch.clone());
        }
        // The budget is spent: another segment keeps nothing, the first keeps what it had.
        b.push(0, batch.clone());
        assert!(b.get(0).is_none());
        assert_eq!(a.batches.len(), fits);
        assert_eq!(SMALL.kept.load(Ordering::Acquire), fits * size);
        // Forgetting (a cut, a roll, a dropped segment) gives the bytes back.
        a.cut_at(1000);
        assert_eq!(SMALL.kept.load(Ordering::Acquire), size);
        b.push(0, batch.clone());
        assert!(b.get(0).is_some());
        drop(a);
        b.clear();
        assert_eq!(SMALL.kept.load(Ordering::Acquire), 0);
    }
}
