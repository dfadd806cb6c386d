//! A partition log: an ordered run of segments, written by the process's writer pool and read
//! lock-free.
//!
//! | file           | owns                                                                  |
//! |----------------|-----------------------------------------------------------------------|
//! | `mod.rs`       | the handle: open, the append/roll/close API, stats                    |
//! | [`inbox`]      | queued commands and the scheduled flag                                |
//! | [`pool`]       | the writer threads, the ready queue, timers, priority, a serving round|
//! | [`writer`]     | the active segment's state: stage, write, sync, roll, close           |
//! | [`recovery`]   | what open does to the files: checks, index rebuilds, torn-tail cuts   |
//! | [`read`]       | reads by offset and by timestamp                                      |
//! | [`retention`]  | retention and key compaction of closed segments                       |
//! | [`cut`]        | cutting a closed partition's tail (Raft's truncation of a conflict)   |
//!
//! # Writing and group commit
//! [`Partition::append`] puts an encoded batch and a completion in the partition's inbox and, if
//! the partition is idle, schedules it with the [`WriterPool`]. The pool thread that serves it
//! takes every queued command, writes the batches with one vectored write and — under
//! `fsync = always` — one `fdatasync`, then publishes the new high-water mark and calls the
//! completions. Appends that arrive meanwhile wait in the inbox and share the next sync: that is
//! the group commit. A full inbox (`queue_depth`) makes `append` wait: backpressure, never a drop.
//! An idle partition costs no thread, no wake-up and no buffer.
//!
//! # Reading
//! Readers load the segment list, the high-water mark and a segment's visible length, all
//! published with `Release` after the bytes are durable under the fsync policy, then use
//! positional reads. Readers never see bytes that are not yet durable under the fsync policy.

mod cut;
mod inbox;
mod pool;
mod read;
mod recovery;
mod retention;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, mpsc};
use std::time::Duration;

use self::inbox::Inbox;
use self::pool::PoolInner;
use self::recovery::{ActiveState, drop_unborn_segment, list_segments, read_checkpoint};
use self::writer::{Writer, wait_reply};
use super::config::LogConfig;
use super::error::{Error, Result};
use super::io::FileIo;
use super::record::{EncodedBatch, Record};
use super::segment::Segment;
use crate::metrics::Histogram;

pub use self::pool::WriterPool;
pub use self::retention::{CompactionPoint, Retention, RetentionOutcome};

/// Called with the new high-water mark each time more data becomes visible to readers.
pub type Listener = Arc<dyn Fn(u64) + Send + Sync>;

/// Called once with the outcome of an append, after it is durable under the fsync policy.
pub type Completion = Box<dyn FnOnce(Result<Appended>) + Send>;

/// What an append waits for before its completion runs, and whether it waits for room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendMode {
    /// The completion runs once the batch is durable under the fsync policy. Otherwise it runs
    /// once the batch is written, and the batch becomes durable (and visible to readers under
    /// `fsync = always`) with the next durable append, roll or close: for records whose loss in
    /// a machine crash is harmless; a process crash loses nothing.
    pub durable: bool,
    /// A full inbox (`queue_depth` commands) makes `append` wait on the calling thread:
    /// backpressure, never a drop. Callers on an async runtime either hold one of the
    /// partition's permits per append (so the inbox always has room) or turn this off and
    /// bound their appends themselves (consumer groups, by their members' in-flight limits).
    pub wait_for_room: bool,
}

impl AppendMode {
    /// Durable, waiting for room: producers' batches and the audit trail.
    pub const DURABLE: AppendMode = AppendMode {
        durable: true,
        wait_for_room: true,
    };
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub last_offset: u64,
}

impl Appended {
    pub fn records(&self) -> u64 {
        self.last_offset - self.base_offset + 1
    }
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

/// What the writer counts as it goes, for `/metrics`: one relaxed add per write or sync.
#[derive(Debug)]
pub struct PartitionMetrics {
    /// Records written to the log since open.
    pub records: AtomicU64,
    /// Bytes written to the log since open (batch framing included).
    pub bytes: AtomicU64,
    /// How long each `fdatasync` of the log took.
    pub fsync: Histogram,
    /// Records made durable by each sync: the size of a group commit.
    pub commit_records: Histogram,
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
    /// Readers see no offset at or past this (a replicated partition's commit point); `u64::MAX`
    /// when unlimited.
    read_limit: AtomicU64,
    log_start: AtomicU64,
    /// Readers see no offset below this (a replicated partition's retention, decided by its
    /// leader: every replica hides the same prefix, whatever its segments); 0 when unset.
    floor: AtomicU64,
    poisoned: AtomicBool,
    syncs: AtomicU64,
    appends: AtomicU64,
    /// Set while the writer polls for a lone producer's next append (`writer_spin_us`).
    polling: AtomicBool,
    /// How long the last successful fdatasync took, in microseconds.
    last_sync_micros: AtomicU64,
    /// Bytes of its newest batches the active segment keeps in memory as written (see
    /// [`Partition::keep_written`]); 0 keeps none.
    keep_written: AtomicUsize,
    metrics: PartitionMetrics,
    listener: Option<Listener>,
    /// Serialises retention and compaction of this partition.
    maintenance: Mutex<()>,
    /// A replicated partition's compaction point.
    compaction: Mutex<retention::PointState>,
    inbox: Mutex<Inbox>,
    /// Signalled when the inbox has room again and when the partition goes idle.
    changed: Condvar,
    writer: Mutex<Writer>,
    pool: Arc<PoolInner>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn segments(&self) -> Arc<Vec<Arc<Segment>>> {
        Arc::clone(&self.segments.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Held by retention and compaction for their whole run.
    fn maintenance(&self) -> MutexGuard<'_, ()> {
        self.maintenance.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn compaction_point(&self) -> MutexGuard<'_, retention::PointState> {
        self.compaction.lock().unwrap_or_else(|p| p.into_inner())
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
    /// Opens (creating if needed) the partition in `dir`, written by the process's
    /// [`WriterPool::global`]. See [`Partition::open_in`].
    pub fn open(
        dir: &Path,
        config: LogConfig,
        io: Arc<dyn FileIo>,
        listener: Option<Listener>,
    ) -> Result<Partition> {
        let pool = WriterPool::global().map_err(|e| Error::io(dir, e))?;
        Self::open_in(pool, dir, config, io, listener)
    }

    /// Opens (creating if needed) the partition in `dir`, written by `pool`'s threads.
    ///
    /// Recovery (see [`recovery`]): when the checkpoint says the last close was clean and the
    /// files agree, nothing is scanned and nothing is written. Otherwise closed segments only get
    /// their indexes checked (and rebuilt when they do not check out), and the active segment is
    /// scanned from the last checkpoint, its torn or corrupt tail cut.
    pub fn open_in(
        pool: &WriterPool,
        dir: &Path,
        config: LogConfig,
        io: Arc<dyn FileIo>,
        listener: Option<Listener>,
    ) -> Result<Partition> {
        config.sanitize()?;
        let Loaded {
            segments,
            active,
            writer_state,
            clean_on_disk,
            report,
        } = load(dir, &config, io.as_ref())?;
        let log_start = segments.first().map_or(0, |s| s.base_offset());
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            io,
            segments: RwLock::new(Arc::new(segments)),
            high_water: AtomicU64::new(writer_state.next_offset),
            read_limit: AtomicU64::new(u64::MAX),
            log_start: AtomicU64::new(log_start),
            floor: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            last_sync_micros: AtomicU64::new(0),
            keep_written: AtomicUsize::new(0),
            metrics: PartitionMetrics {
                records: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                fsync: Histogram::durations(),
                commit_records: Histogram::counts(),
            },
            listener,
            maintenance: Mutex::new(()),
            compaction: Mutex::new(retention::PointState::default()),
            inbox: Mutex::new(Inbox::default()),
            changed: Condvar::new(),
            writer: Mutex::new(Writer::new(&config, active, writer_state, clean_on_disk)),
            pool: Arc::clone(pool.inner()),
            config,
        });
        Ok(Partition { shared, report })
    }

    /// Queues a batch; `done` is called once, from a writer thread, when `mode` says the batch
    /// is stored, or with the error that stopped it. The one way to append: what varies between
    /// callers (durability, waiting for room) is in [`AppendMode`].
    pub fn append(&self, batch: EncodedBatch, mode: AppendMode, done: Completion) {
        if let Some(e) = self.shared.poisoned_error() {
            return done(Err(e));
        }
        self.shared.post(
            Command::Append(batch, done, mode.durable),
            mode.wait_for_room,
        );
    }

    /// [`Partition::append`], served on the calling thread when nothing else is being written:
    /// if every thread of the writer pool sleeps with nothing queued (a writer polling for a
    /// lone producer is awake), no other caller is serving a round this way, this partition is
    /// idle and its last sync took at most `max_sync`, the batch (with whatever queues
    /// meanwhile) is written and synced here and `done` called before this returns. Otherwise
    /// it is queued as `append` queues it.
    ///
    /// For a lone producer's Send: its acknowledgement then needs no hand-off to a writer
    /// thread and no wake-up back, at the cost of holding the caller's thread for one sync,
    /// and only one caller's thread in the process at a time.
    pub fn append_here_when_quiet(
        &self,
        batch: EncodedBatch,
        mode: AppendMode,
        max_sync: Duration,
        done: Completion,
    ) {
        let sh = &self.shared;
        if let Some(e) = sh.poisoned_error() {
            return done(Err(e));
        }
        let last_sync = Duration::from_micros(sh.last_sync_micros.load(Ordering::Relaxed));
        let turn = (last_sync <= max_sync)
            .then(|| sh.pool.inline_turn())
            .flatten();
        let cmd = Command::Append(batch, done, mode.durable);
        let Some(turn) = turn else {
            return sh.post(cmd, mode.wait_for_room);
        };
        let mut inbox = sh.inbox();
        if inbox.scheduled || inbox.closed || !inbox.cmds.is_empty() {
            drop((inbox, turn));
            return sh.post(cmd, mode.wait_for_room);
        }
        inbox.cmds.push_back(cmd);
        inbox.scheduled = true;
        drop(inbox);
        pool::serve_round_here(&sh.pool, sh);
        drop(turn);
    }

    /// Appends records and waits until they are durable, on the calling thread (offline tools,
    /// tests): [`Partition::append`] with [`AppendMode::DURABLE`].
    pub fn append_blocking(&self, records: &[Record]) -> Result<Appended> {
        let (tx, rx) = mpsc::channel();
        self.append(
            EncodedBatch::new(records),
            AppendMode::DURABLE,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().map_err(|_| self.shared.closed_error())?
    }

    fn ask(&self, make: impl FnOnce(mpsc::Sender<Result<()>>) -> Command) -> Result<()> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.shared.post(make(reply_tx), false);
        wait_reply(&self.shared, reply_rx)
    }

    /// Closes the active segment and starts a new one (no-op when the active one is empty).
    pub fn roll(&self) -> Result<()> {
        self.ask(Command::Roll)
    }

    /// Finishes queued appends, syncs, trims the indexes and marks the partition clean (nothing
    /// to do when nothing was written since a clean open). Later appends fail with
    /// [`Error::Closed`]; reads keep working.
    ///
    /// Runs on the calling thread (once no pool thread is serving the partition), so that many
    /// threads can close many partitions side by side: a close waits on syncs.
    pub fn close(&self) -> Result<()> {
        let sh = &self.shared;
        let (reply_tx, reply_rx) = mpsc::channel();
        let mut inbox = sh.idle_inbox();
        if inbox.closed {
            return Err(sh.closed_error());
        }
        inbox.cmds.push_back(Command::Close(reply_tx));
        inbox.scheduled = true;
        drop(inbox);
        pool::serve_here(&sh.pool, sh, &mut pool::ThreadCtx::foreign());
        wait_reply(sh, reply_rx)
    }

    /// One past the last offset readers can see: durable under the fsync policy and, for a
    /// replicated partition, committed ([`Partition::limit_reads_to`]).
    pub fn high_water(&self) -> u64 {
        self.shared
            .high_water
            .load(Ordering::Acquire)
            .min(self.shared.read_limit.load(Ordering::Acquire))
    }

    /// The active segment keeps up to `max_bytes` of the batches written last in memory, as
    /// written, for [`Segment::batch_at`] (a Raft log reads each entry back right after writing
    /// it: to send it to every follower and to apply it). Dropped when the segment rolls.
    pub fn keep_written(&self, max_bytes: usize) {
        self.shared.keep_written.store(max_bytes, Ordering::Relaxed);
    }

    /// Readers see no offset at or past `offset` from now on (a replicated partition's commit
    /// point: what is durable here but not yet on a majority stays unread).
    /// Listeners hear of the new high-water mark.
    pub fn limit_reads_to(&self, offset: u64) {
        let before = self.high_water();
        self.shared.read_limit.store(offset, Ordering::Release);
        let now = self.high_water();
        if now != before
            && let Some(listener) = &self.shared.listener
        {
            listener(now);
        }
    }

    /// The first offset readers can see (retention moves it up).
    pub fn log_start(&self) -> u64 {
        self.shared
            .log_start
            .load(Ordering::Acquire)
            .max(self.shared.floor.load(Ordering::Acquire))
    }

    /// Readers see no offset below `offset` from now on, whatever segments remain (a replicated
    /// partition's retention point: the same on every replica). Never moves down.
    pub fn hide_below(&self, offset: u64) {
        self.shared.floor.fetch_max(offset, Ordering::AcqRel);
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

    /// True once a failed fsync (or a failed cut of a failed write) has latched the partition.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    pub fn metrics(&self) -> &PartitionMetrics {
        &self.shared.metrics
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

    /// The segments, oldest first, as readers see them now.
    pub fn segments(&self) -> Arc<Vec<Arc<Segment>>> {
        self.shared.segments()
    }

    /// Base offsets of the segments, oldest first.
    pub fn segment_bases(&self) -> Vec<u64> {
        self.shared
            .segments()
            .iter()
            .map(|s| s.base_offset())
            .collect()
    }
}

/// What recovery made of a partition's files: the segments, the active one and its writer's
/// state.
struct Loaded {
    segments: Vec<Arc<Segment>>,
    active: Arc<Segment>,
    writer_state: ActiveState,
    clean_on_disk: bool,
    report: RecoveryReport,
}

/// Opens a partition's files, recovering them (see [`Partition::open_in`]).
fn load(dir: &Path, config: &LogConfig, io: &dyn FileIo) -> Result<Loaded> {
    super::io::create_dir_all(io, dir).map_err(|e| Error::io(dir, e))?;
    let mut report = RecoveryReport::default();
    super::compaction::recover(dir, io)?;
    let mut bases = list_segments(dir)?;
    drop_unborn_segment(dir, &mut bases, &mut report)?;
    let cp = read_checkpoint(dir)?;

    let mut segments = Vec::with_capacity(bases.len().max(1));
    for (i, &base) in bases.iter().enumerate() {
        let Some(&next_base) = bases.get(i + 1) else {
            break;
        };
        let (seg, index_ok) = Segment::open(dir, base, None, io)?;
        let seg =
            recovery::open_closed_segment(seg, index_ok, next_base, config, io, Some(&mut report))?;
        segments.push(Arc::new(seg));
    }

    let mut clean_on_disk = false;
    let writer_state = match bases.last() {
        None => {
            report.clean = true;
            let seg = Segment::create(dir, 0, config.index_capacity(), io)?;
            io.sync_dir(dir).map_err(|e| Error::io(dir, e))?;
            segments.push(Arc::new(seg));
            ActiveState::empty(0)
        }
        Some(&base) => {
            // Past the checkpoint's entries the active index holds zeros or unsynced ones.
            let counts = cp.filter(|c| c.active_base == base).map_or((0, 0), |c| {
                (c.index_entries as usize, c.time_entries as usize)
            });
            let active = Some((counts, config.index_capacity()));
            let (seg, index_ok) = Segment::open(dir, base, active, io)?;
            let (seg, state) =
                recovery::recover_active(seg, index_ok, cp, config, io, &mut report)?;
            clean_on_disk = report.clean;
            segments.push(Arc::new(seg));
            state
        }
    };

    let active = Arc::clone(
        segments
            .last()
            .ok_or_else(|| Error::corrupt(dir, 0, "partition has no segment after recovery"))?,
    );
    active.publish(
        writer_state.len,
        writer_state.next_offset,
        writer_state.max_timestamp,
    );
    Ok(Loaded {
        segments,
        active,
        writer_state,
        clean_on_disk,
        report,
    })
}

impl Drop for Partition {
    /// Dropping without [`Partition::close`] stops the partition like a crash would: appends
    /// already queued are written, but there is no final sync and no clean marker, so the next
    /// open recovers. Waits until no pool thread is serving it any more.
    fn drop(&mut self) {
        let sh = &self.shared;
        sh.inbox().detached = true;
        if !pool::serving(sh) {
            drop(sh.idle_inbox());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::RealIo;
    use bytes::Bytes;

    fn records(n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                value: Some(Bytes::from(vec![b'v'; 100 + i])),
                ..Record::default()
            })
            .collect()
    }

    #[test]
    fn written_batches_are_kept_only_by_the_active_segment_and_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig::default();
        let p = Partition::open(dir.path(), config, Arc::new(RealIo), None).unwrap();
        // A partition that was not asked keeps nothing.
        p.append_blocking(&records(3)).unwrap();
        assert_eq!(p.shared.segments()[0].kept_bytes(), 0);
        p.keep_written(1 << 20);
        p.append_blocking(&records(3)).unwrap();
        p.append_blocking(&records(2)).unwrap();
        let first = Arc::clone(&p.shared.segments()[0]);
        assert!(first.kept_bytes() > 0);
        // A roll: the closed segment forgets; the new active one keeps what it is written.
        p.roll().unwrap();
        assert_eq!(first.kept_bytes(), 0);
        p.append_blocking(&records(1)).unwrap();
        let active = Arc::clone(&p.shared.segments()[1]);
        assert!(active.kept_bytes() > 0);
        // A close: nothing is kept.
        p.close().unwrap();
        assert_eq!(active.kept_bytes(), 0);
    }
}
