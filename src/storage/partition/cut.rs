//! Cutting a partition's tail: Raft's truncation of entries that conflict with a new leader's
//! log. Rare (only uncommitted entries of a deposed leader are ever cut), so it is done the
//! simple way: on a closed partition, on the files; then [`Partition::reopen`] runs recovery
//! again (which rebuilds the indexes of the new active segment) and puts the result in the
//! same handle, so whoever holds the partition (readers, the topic, high-water listeners) goes
//! on with it.
//!
//! Order, so that a crash at any step leaves a log that is a prefix of the old one (and the next
//! open recovers it): the checkpoint goes first (it may describe bytes about to go), then the
//! later segments, newest first, then the cut segment's tail, synced.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::writer::Writer;
use super::{Loaded, Partition, load};
use crate::storage::checkpoint;
use crate::storage::error::{Error, Result};
use crate::storage::segment::Segment;

impl Partition {
    /// Removes every byte from `position` of the segment based at `base` on, and every later
    /// segment. The partition must be closed ([`Partition::close`]); [`Partition::reopen`] it
    /// afterwards.
    pub fn cut_closed(&self, base: u64, position: u64) -> Result<()> {
        let sh = &self.shared;
        self.require_closed("its tail is cut")?;
        let segments = sh.segments();
        let Some(at) = segments.iter().position(|s| s.base_offset() == base) else {
            return Err(Error::corrupt(&sh.dir, position, "no segment to cut at"));
        };
        let io = sh.io.as_ref();
        self.remove_checkpoint()?;
        for seg in segments[at + 1..].iter().rev() {
            seg.delete_files(&sh.dir)?;
            io.sync_dir(&sh.dir).map_err(|e| Error::io(&sh.dir, e))?;
        }
        let seg = &segments[at];
        // Handles still held on this (closed) partition read up to the cut, not past it.
        let new_end = if position < seg.visible_len() {
            seg.batch_header_at(position)?.base_offset
        } else {
            seg.next_offset()
        };
        seg.truncate_log(position, io)?;
        sh.high_water.fetch_min(new_end, Ordering::AcqRel);
        io.sync_data(seg.log_path(), seg.log_file())
            .map_err(|e| Error::io(seg.log_path(), e))?;
        sh.set_segments(|list| list.truncate(at + 1));
        Ok(())
    }

    /// Empties the log and starts it again at `base`: the next batch appended takes offset
    /// `base`. For a replica that installed a snapshot of a log it does not hold (Raft's
    /// snapshot of a replicated partition is its retention point: the messages before it are
    /// gone everywhere, those after it follow from the leader). The partition must be closed
    /// ([`Partition::close`]); [`Partition::reopen`] it afterwards. Readers see nothing below
    /// `base` from now on.
    ///
    /// Order: the checkpoint, then every segment (newest first), then the new empty one. A crash
    /// in between leaves a shorter log (or none); the caller, which knows `base` from the
    /// snapshot, starts again.
    pub fn restart_closed_at(&self, base: u64) -> Result<()> {
        let sh = &self.shared;
        self.require_closed("it starts again")?;
        let _maintenance = sh.maintenance();
        let io = sh.io.as_ref();
        self.remove_checkpoint()?;
        sh.floor.fetch_max(base, Ordering::AcqRel);
        for seg in sh.segments().iter().rev() {
            seg.delete_files(&sh.dir)?;
        }
        io.sync_dir(&sh.dir).map_err(|e| Error::io(&sh.dir, e))?;
        let seg = Segment::create(&sh.dir, base, sh.config.index_capacity(), io)?;
        io.sync_dir(&sh.dir).map_err(|e| Error::io(&sh.dir, e))?;
        sh.set_segments(|list| *list = vec![Arc::new(seg)]);
        Ok(())
    }

    fn require_closed(&self, before: &str) -> Result<()> {
        let sh = &self.shared;
        if sh.inbox().closed {
            return Ok(());
        }
        Err(Error::InvalidConfig(format!(
            "partition {} must be closed before {before}",
            sh.dir.display()
        )))
    }

    /// Removes the checkpoint (it may describe bytes about to go), durably.
    fn remove_checkpoint(&self) -> Result<()> {
        let sh = &self.shared;
        let cp = sh.dir.join(checkpoint::FILE_NAME);
        match std::fs::remove_file(&cp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&cp, e)),
        }
        sh.io.sync_dir(&sh.dir).map_err(|e| Error::io(&sh.dir, e))
    }

    /// Opens a closed partition again in place, recovering its files as [`Partition::open`]
    /// does: appends work again, and readers and listeners of this handle see the log as it now
    /// is (after [`Partition::cut_closed`], shorter). The read limit is kept.
    pub fn reopen(&self) -> Result<()> {
        let sh = &self.shared;
        let mut inbox = sh.idle_inbox();
        if !inbox.closed {
            return Err(Error::InvalidConfig(format!(
                "partition {} must be closed before it is opened again",
                sh.dir.display()
            )));
        }
        let Loaded {
            segments,
            active,
            writer_state,
            clean_on_disk,
            report: _,
        } = load(&sh.dir, &sh.config, sh.io.as_ref())?;
        let log_start = segments.first().map_or(0, |s| s.base_offset());
        let next_offset = writer_state.next_offset;
        *sh.writer.lock().unwrap_or_else(|p| p.into_inner()) =
            Writer::new(&sh.config, active, writer_state, clean_on_disk);
        *sh.segments.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(segments);
        sh.log_start.store(log_start, Ordering::Release);
        sh.high_water.store(next_offset, Ordering::Release);
        sh.poisoned.store(false, Ordering::Release);
        inbox.closed = false;
        drop(inbox);
        if let Some(listener) = &sh.listener {
            listener(self.high_water());
        }
        Ok(())
    }
}
