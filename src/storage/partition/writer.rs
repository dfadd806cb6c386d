//! The writer: one partition's active-segment state and its group commit, run by whichever pool
//! thread serves the partition ([`super::pool`]).
//!
//! A round takes every queued command, stamps offsets and CRCs into the batches in place, writes
//! them with one vectored positional write (no copy into a staging buffer; preallocation zeros
//! come from one static page run), and — under `fsync = always` — one `fdatasync` for all of
//! them. Only then does it publish the new high-water mark and call the completions.
//!
//! A failed `fdatasync` latches the partition (every later append fails with
//! [`Error::Poisoned`] until it is reopened): the kernel may have dropped the dirty pages. A
//! failed write is different: nothing was reported durable and no page was marked clean, so the
//! write is cut back off the file (through [`FileIo::set_len`]) and only the batches in it fail;
//! the next append writes the same bytes again. If the cut fails the partition latches too.
//!
//! The first write after open grows the active indexes to their capacity; a partition that is
//! opened and closed without a write touches no file. No "open" marker is written: a clean
//! checkpoint counts only while the log is exactly as long as it records, and every write makes
//! the log longer.
//!
//! Over 450 lines with one job: the active segment's write path (stage, write, sync, roll, close).

use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::recovery::{ActiveState, push_entries, trim};
use super::{Appended, Completion, Shared};
use crate::storage::checkpoint::{self, Checkpoint, EntriesCrc};
use crate::storage::config::{FsyncPolicy, LogConfig};
use crate::storage::error::{Error, Result};
use crate::storage::index::IndexEntry;
use crate::storage::io::replace_file_unsynced;
use crate::storage::record::{BatchHeader, Decoded, EncodedBatch};
use crate::storage::segment::{LOG_HEADER_LEN, Segment};
use crate::storage::timeindex::TimeEntry;

/// Largest amount of bytes staged before a write.
pub(super) const MAX_GATHER_BYTES: usize = 16 << 20;
/// Commands taken from the inbox per round at most.
pub(super) const MAX_GATHER_COMMANDS: usize = 4096;
/// Preallocation zeros are written from this (read-only, never touched: no resident memory).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// One partition's writer state; lives in the partition, locked by the thread serving it.
pub(super) struct Writer {
    pub(super) active: Arc<Segment>,
    /// State of what is written to the file (possibly not yet synced).
    pub(super) state: ActiveState,
    /// Bytes of the active log known durable.
    pub(super) synced_len: u64,
    /// Length of the active log file: `state.len` plus preallocated zeros.
    pub(super) file_len: u64,
    pub(super) checkpoint_len: u64,
    pub(super) last_sync: Instant,
    /// Sealed batches not yet written, and their total size.
    pub(super) staged: Vec<EncodedBatch>,
    pub(super) staged_bytes: usize,
    pub(super) buffered: Vec<(Completion, Appended)>,
    pub(super) buffered_index: Vec<(IndexEntry, Option<TimeEntry>)>,
    /// State before the first staged batch, to undo a failed write.
    pub(super) before_buffer: ActiveState,
    /// Written batches waiting for the sync that makes them durable.
    pub(super) unsynced: Vec<(Completion, Appended)>,
    /// A durable append is waiting: the next commit must sync (see `AppendMode::durable`).
    pub(super) needs_sync: bool,
    /// The active indexes have their full size (see `prepare_write`). False from open until
    /// the first write.
    pub(super) indexes_grown: bool,
    /// The checkpoint on disk is a clean one that matches the files (nothing to do on close).
    pub(super) clean_on_disk: bool,
    pub(super) closed: bool,
    /// Rounds in a row of one append that followed the previous round closely.
    pub(super) lone_rounds: u32,
    pub(super) round_end: Instant,
    /// An interval-sync timer is pending with the pool.
    pub(super) timer_pending: bool,
}

impl Writer {
    /// `clean_on_disk`: the files were opened after a clean close and match its checkpoint.
    pub(super) fn new(
        config: &LogConfig,
        active: Arc<Segment>,
        mut state: ActiveState,
        clean_on_disk: bool,
    ) -> Self {
        state.indexer.interval = u64::from(config.index_interval_bytes);
        Writer {
            active,
            synced_len: state.len,
            file_len: state.len,
            checkpoint_len: state.len,
            last_sync: Instant::now(),
            staged: Vec::new(),
            staged_bytes: 0,
            buffered: Vec::new(),
            buffered_index: Vec::new(),
            before_buffer: state,
            unsynced: Vec::new(),
            needs_sync: false,
            indexes_grown: false,
            clean_on_disk,
            closed: false,
            lone_rounds: 0,
            round_end: Instant::now(),
            timer_pending: false,
            state,
        }
    }

    /// How long the writer may wait for work before an interval sync is due.
    pub(super) fn next_wait(&self, sh: &Shared) -> Option<Duration> {
        let interval = sh.config.sync_interval()?;
        if self.synced_len == self.state.len {
            return None;
        }
        Some(interval.saturating_sub(self.last_sync.elapsed()))
    }

    pub(super) fn should_roll(&self, sh: &Shared, batch: &EncodedBatch) -> bool {
        let len = self.state.len + self.staged_bytes as u64;
        if len <= LOG_HEADER_LEN {
            return false;
        }
        let config = &sh.config;
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

    /// Stamps a batch and stages it for the next write.
    pub(super) fn stage(&mut self, sh: &Shared, mut batch: EncodedBatch, done: Completion) {
        if let Some(e) = sh.poisoned_error() {
            return done(Err(e));
        }
        if let Err(e) = batch.check(sh.config.max_batch_bytes) {
            return done(Err(e));
        }
        if self.should_roll(sh, &batch)
            && let Err(e) = self.roll(sh)
        {
            tracing::error!(dir = %sh.dir.display(), error = %e, "segment roll failed");
            return done(Err(e));
        }
        // Before the state moves past what is durable: the checkpoint describes that.
        if let Err(e) = self.prepare_write(sh) {
            return done(Err(e));
        }
        if self.staged.is_empty() {
            self.before_buffer = self.state;
        }
        let base_offset = self.state.next_offset;
        let pos = self.state.len + self.staged_bytes as u64;
        let header = match BatchHeader::parse(batch.seal(base_offset)) {
            Decoded::Valid(h) => h,
            // The encoder wrote this header a moment ago; failing here is a bug, not bad input.
            _ => {
                return done(Err(Error::corrupt(
                    &sh.dir,
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
        self.staged_bytes += batch.len();
        self.staged.push(batch);
        // Raft control entries carry no time of their own.
        if !header.is_control() {
            self.state.max_timestamp = self.state.max_timestamp.max(header.max_timestamp);
            self.state
                .first_timestamp
                .get_or_insert(header.first_timestamp);
        }
        self.state.next_offset = header.next_offset();
        self.buffered.push((
            done,
            Appended {
                base_offset,
                last_offset: header.last_offset(),
            },
        ));
    }

    /// Before the first write since open: the active indexes get their full size. Nothing else
    /// is needed to make a crash from here on recover: a clean checkpoint only counts while the
    /// log is exactly as long as it says, and every write makes the log longer.
    pub(super) fn prepare_write(&mut self, sh: &Shared) -> Result<()> {
        if self.indexes_grown {
            return Ok(());
        }
        self.active.grow_indexes(sh.io.as_ref())?;
        self.indexes_grown = true;
        self.clean_on_disk = false;
        Ok(())
    }

    /// Writes the staged batches. On failure they fail, the file is cut back and the state
    /// restored; if the cut fails the partition latches.
    pub(super) fn flush(&mut self, sh: &Shared) {
        if self.staged.is_empty() {
            return;
        }
        let active = Arc::clone(&self.active);
        let path = active.log_path();
        let pos = self.before_buffer.len;
        let end = pos + self.staged_bytes as u64;
        // A small write that grows the file takes zeros with it (see `preallocate_bytes`), once
        // the segment has had a write before: a partition written once costs no zeros to cut.
        let prealloc = sh.config.preallocate_bytes;
        let mut zeros = 0u64;
        if end > self.file_len && pos > LOG_HEADER_LEN && (self.staged_bytes as u64) < prealloc / 4
        {
            zeros = (end + prealloc).min(sh.config.segment_bytes.max(end)) - end;
        }
        let written = {
            let mut bufs: Vec<&[u8]> = self.staged.iter().map(EncodedBatch::as_bytes).collect();
            let mut left = zeros as usize;
            while left > 0 {
                let n = left.min(ZEROS.len());
                bufs.push(&ZEROS[..n]);
                left -= n;
            }
            sh.io
                .write_vectored_at(path, active.log_file(), &bufs, pos)
                .map_err(|e| Error::io(path, e))
        };
        match written {
            Ok(()) => {
                for e in self.buffered_index.drain(..) {
                    push_entries(&active, e);
                }
                sh.appends
                    .fetch_add(self.buffered.len() as u64, Ordering::Relaxed);
                let records: u64 = self.buffered.iter().map(|(_, a)| a.records()).sum();
                sh.metrics.records.fetch_add(records, Ordering::Relaxed);
                sh.metrics
                    .bytes
                    .fetch_add(self.staged_bytes as u64, Ordering::Relaxed);
                self.state.len = end;
                active.note_written(end);
                self.keep_written(sh, pos);
                self.file_len = self.file_len.max(end + zeros);
                self.unsynced.append(&mut self.buffered);
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "log write failed");
                match sh.io.set_len(path, active.log_file(), pos) {
                    Ok(()) => self.file_len = pos,
                    Err(cut) => {
                        tracing::error!(path = %path.display(), error = %cut, "could not cut a failed write; the partition refuses writes until reopened");
                        sh.poisoned.store(true, Ordering::Release);
                    }
                }
                self.state = self.before_buffer;
                self.buffered_index.clear();
                for (done, _) in self.buffered.drain(..) {
                    done(Err(e.clone()));
                }
            }
        }
        self.staged.clear();
        self.staged_bytes = 0;
    }

    /// Hands the staged batches, just written from `pos` on, to the active segment to keep
    /// (when the partition keeps any: [`super::Partition::keep_written`]).
    fn keep_written(&mut self, sh: &Shared, mut pos: u64) {
        let max_bytes = sh.keep_written.load(Ordering::Relaxed);
        if max_bytes == 0 {
            return;
        }
        let written = self.staged.drain(..).filter_map(|batch| {
            let at = pos;
            pos += batch.len() as u64;
            Some((at, batch.into_written()?))
        });
        self.active.keep_written(written, max_bytes);
    }

    /// Makes written batches durable as the policy asks, publishes them and completes them.
    /// `force_sync` syncs under any policy that syncs at all (interval timer, roll, close).
    pub(super) fn commit(&mut self, sh: &Shared, force_sync: bool) {
        let policy = sh.config.fsync;
        let dirty = self.synced_len < self.state.len;
        let sync_now = dirty
            && match policy {
                FsyncPolicy::Always => self.needs_sync || force_sync,
                FsyncPolicy::Interval => {
                    force_sync
                        || sh
                            .config
                            .sync_interval()
                            .is_some_and(|i| self.last_sync.elapsed() >= i)
                }
                FsyncPolicy::Never => false,
            };
        if sync_now {
            if let Err(e) = self.sync(sh) {
                for (done, _) in self.unsynced.drain(..) {
                    done(Err(e.clone()));
                }
                return;
            }
            let records: u64 = self.unsynced.iter().map(|(_, a)| a.records()).sum();
            sh.metrics.commit_records.observe(records);
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
        self.publish(sh);
        for (done, appended) in self.unsynced.drain(..) {
            done(Ok(appended));
        }
        let checkpoint_due = self.synced_len - self.checkpoint_len >= sh.config.checkpoint_bytes;
        if sync_now
            && checkpoint_due
            && let Err(e) = self.write_checkpoint(sh, false)
        {
            tracing::warn!(dir = %sh.dir.display(), error = %e, "could not write a recovery checkpoint");
        }
    }

    pub(super) fn sync(&mut self, sh: &Shared) -> Result<()> {
        if let Some(e) = sh.poisoned_error() {
            return Err(e);
        }
        let path = self.active.log_path();
        sh.syncs.fetch_add(1, Ordering::Relaxed);
        self.last_sync = Instant::now();
        match sh.io.sync_data(path, self.active.log_file()) {
            Ok(()) => {
                self.synced_len = self.state.len;
                let took = self.last_sync.elapsed();
                sh.metrics.fsync.observe_duration(took);
                let took = took.as_micros();
                sh.last_sync_micros
                    .store(u64::try_from(took).unwrap_or(u64::MAX), Ordering::Relaxed);
                Ok(())
            }
            Err(source) => {
                tracing::error!(path = %path.display(), error = %source, "fdatasync failed; the partition refuses writes until reopened");
                sh.poisoned.store(true, Ordering::Release);
                Err(Error::SyncFailed {
                    path: path.to_path_buf(),
                    source: Arc::new(source),
                })
            }
        }
    }

    pub(super) fn publish(&self, sh: &Shared) {
        let len = if sh.config.fsync == FsyncPolicy::Always {
            self.synced_len
        } else {
            self.state.len
        };
        self.active
            .publish(len, self.state.next_offset, self.state.max_timestamp);
        sh.high_water
            .store(self.state.next_offset, Ordering::Release);
        if let Some(listener) = &sh.listener {
            listener(self.state.next_offset);
        }
    }

    /// Syncs indexes, then atomically replaces the checkpoint (unsynced: see
    /// [`replace_file_unsynced`]). Only call when everything written is synced (or when `clean`,
    /// after the final sync).
    pub(super) fn write_checkpoint(&mut self, sh: &Shared, clean: bool) -> Result<()> {
        let seg = &self.active;
        let io = sh.io.as_ref();
        seg.sync_indexes(io)?;
        let (index_entries, time_entries) = (seg.index.len(), seg.time_index.len());
        let cp = Checkpoint {
            clean,
            active_base: seg.base_offset(),
            log_position: self.synced_len,
            next_offset: self.state.next_offset,
            max_timestamp: self.state.max_timestamp,
            index_entries: index_entries as u32,
            time_entries: time_entries as u32,
            entries_crc: Some(EntriesCrc {
                index: seg.index.entries_crc(index_entries),
                time: seg.time_index.entries_crc(time_entries),
            }),
        };
        let path = sh.dir.join(checkpoint::FILE_NAME);
        replace_file_unsynced(io, &path, &cp.encode()).map_err(|e| Error::io(&path, e))?;
        self.checkpoint_len = self.synced_len;
        Ok(())
    }

    /// Seals the active segment (sync, final time entry, trimmed indexes) and starts a new one.
    pub(super) fn roll(&mut self, sh: &Shared) -> Result<()> {
        self.flush(sh);
        // A segment is named by its base offset: one that holds no offset yet (nothing, or only
        // Raft control entries, which take none) stays active, or the next would take its name.
        if self.state.len <= LOG_HEADER_LEN || self.state.next_offset == self.active.base_offset() {
            return Ok(());
        }
        self.prepare_write(sh)?;
        if self.synced_len < self.state.len {
            self.sync(sh)?;
        }
        self.commit(sh, false);
        // The zeros go before the next segment exists: only the last segment may have a tail.
        self.trim_log(sh)?;
        let seg = Arc::clone(&self.active);
        let next = self.state.next_offset;
        if self.state.indexer.has_records {
            let _ = seg.time_index.push(TimeEntry {
                max_timestamp: self.state.max_timestamp,
                relative_offset: (next - seg.base_offset()) as u32,
            });
        }
        let io = sh.io.as_ref();
        trim(&seg, io);
        if let Err(e) = seg.sync_indexes(io) {
            tracing::warn!(path = %seg.log_path().display(), error = %e, "could not sync a closed segment's index; it will be checked on open");
        }
        let dir = &sh.dir;
        let new = Segment::create(dir, next, sh.config.index_capacity(), io)?;
        io.sync_dir(dir).map_err(|e| Error::io(dir, e))?;
        let new = Arc::new(new);
        new.publish(LOG_HEADER_LEN, next, i64::MIN);
        sh.set_segments(|list| list.push(Arc::clone(&new)));
        seg.forget_written();
        self.active = new;
        self.state = ActiveState::empty(next);
        self.state.indexer.interval = u64::from(sh.config.index_interval_bytes);
        self.synced_len = LOG_HEADER_LEN;
        self.file_len = LOG_HEADER_LEN;
        self.checkpoint_len = LOG_HEADER_LEN;
        tracing::debug!(dir = %dir.display(), base = next, "rolled to a new segment");
        if let Err(e) = self.write_checkpoint(sh, false) {
            tracing::warn!(dir = %sh.dir.display(), error = %e, "could not write a recovery checkpoint after roll");
        }
        Ok(())
    }

    /// Final sync, trimmed indexes, clean checkpoint. Nothing at all when nothing changed since
    /// a clean open.
    pub(super) fn close(&mut self, sh: &Shared) -> Result<()> {
        self.flush(sh);
        self.active.forget_written();
        if self.synced_len < self.state.len {
            self.sync(sh)?;
        }
        self.commit(sh, false);
        if let Some(e) = sh.poisoned_error() {
            return Err(e);
        }
        if self.clean_on_disk {
            return Ok(());
        }
        self.trim_log(sh)?;
        trim(&self.active, sh.io.as_ref());
        self.write_checkpoint(sh, true)?;
        self.clean_on_disk = true;
        self.indexes_grown = false;
        Ok(())
    }

    /// Cuts preallocated zeros off the active log and syncs the new length.
    pub(super) fn trim_log(&mut self, sh: &Shared) -> Result<()> {
        if self.file_len <= self.state.len {
            return Ok(());
        }
        let path = self.active.log_path();
        sh.io
            .set_len(path, self.active.log_file(), self.state.len)
            .map_err(|e| Error::io(path, e))?;
        self.file_len = self.state.len;
        self.sync(sh)
    }
}

/// Waits for a reply from the writer.
pub(super) fn wait_reply(sh: &Shared, rx: mpsc::Receiver<Result<()>>) -> Result<()> {
    rx.recv().map_err(|_| sh.closed_error())?
}
