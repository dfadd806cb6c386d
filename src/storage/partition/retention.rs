//! Maintenance of a partition's closed segments: retention (deleting whole old segments) and
//! key compaction (rewriting them without superseded records). Both hold the partition's
//! maintenance lock for their whole run; neither touches the active segment's bytes, so the
//! writer keeps appending meanwhile.

use std::fs;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Partition;
use super::recovery::open_closed_segment;
use crate::storage::compaction::{CompactionOptions, CompactionOutcome};
use crate::storage::error::{Error, Result};
use crate::storage::segment::{LOG_HEADER_LEN, Segment};

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

/// A replicated partition's compaction point, its leader's decision applied by every replica:
/// the records below `below` are compacted as of `now_ms` (see [`crate::storage::compaction`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CompactionPoint {
    pub below: u64,
    pub now_ms: i64,
}

/// The compaction point this partition was told, and what was last compacted to it.
#[derive(Debug, Default)]
pub(super) struct PointState {
    point: Option<CompactionPoint>,
    /// The point last compacted to, the base of the active segment then (batches below the
    /// point that were still in it are compacted once it has closed), and what compacting to
    /// that point did, summed over its runs: reported to whoever asked for that point,
    /// whichever caller ran it.
    done: Option<(CompactionPoint, u64, CompactionOutcome)>,
}

/// What retention deleted (or would delete, in a dry run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Deletes whole closed segments whose every offset is below `offset` (retention; a Raft
    /// log's purge). The active segment is never deleted. Returns how many segments went. Waits
    /// for a compaction in progress: it reads, and swaps back in, segments this would delete.
    pub fn delete_segments_below(&self, offset: u64) -> Result<usize> {
        let _maintenance = self.shared.maintenance();
        self.delete_segments_below_locked(offset)
    }

    /// [`Partition::delete_segments_below`] with the maintenance lock held by the caller.
    fn delete_segments_below_locked(&self, offset: u64) -> Result<usize> {
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

    /// Works out what `retention` deletes at time `now_ms`, and deletes it unless `dry_run`.
    /// The active segment is never deleted.
    pub fn retain(
        &self,
        retention: &Retention,
        now_ms: i64,
        dry_run: bool,
    ) -> Result<RetentionOutcome> {
        let _maintenance = self.shared.maintenance();
        let all = self.shared.segments();
        // Segments wholly below what readers may see (a replicated partition's retention point,
        // whose files go when the log is purged) count as deleted already.
        let floor = self.shared.floor.load(Ordering::Acquire);
        let hidden = (1..all.len())
            .take_while(|&i| all[i].base_offset() <= floor)
            .count();
        let segments = &all[hidden..];
        let mut total: u64 = segments.iter().map(|s| s.size_bytes()).sum();
        let mut out = RetentionOutcome {
            segments_before: segments.len(),
            bytes_before: total,
            log_start: self.log_start(),
            log_start_before: self.log_start(),
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
            self.delete_segments_below_locked(offset)?;
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

    /// Records the compaction point (only ever forward); [`Partition::compact_to_point`]
    /// compacts to it.
    pub fn set_compaction_point(&self, point: CompactionPoint) {
        let mut state = self.shared.compaction_point();
        if state.point.is_none_or(|p| p.below < point.below) {
            state.point = Some(point);
        }
    }

    /// The compaction point last recorded.
    pub fn compaction_point(&self) -> Option<CompactionPoint> {
        self.shared.compaction_point().point
    }

    /// Compacts the closed segments to the recorded compaction point (a dry run counts what it
    /// would do). `None` when there is nothing to do: no point, a point not yet readable here
    /// (every record below it must be present, or the survivors would differ from the other
    /// replicas'), or the point already compacted to and no segment closed since.
    pub fn compact_to_point(
        &self,
        delete_retention_ms: u64,
        dry_run: bool,
    ) -> Result<Option<CompactionOutcome>> {
        // Checked and done under the maintenance lock: of two callers (the task that compacts
        // on apply, a maintenance pass), one compacts and the other finds it done.
        let _maintenance = self.shared.maintenance();
        let Some(point) = self.compaction_point() else {
            return Ok(None);
        };
        if self.high_water() < point.below {
            return Ok(None);
        }
        let active = self.segments().last().map_or(0, |s| s.base_offset());
        let done = self.shared.compaction_point().done;
        if done.is_some_and(|(p, a, _)| p == point && (a == active || a >= point.below)) {
            return Ok(None);
        }
        let opts = CompactionOptions {
            now_ms: point.now_ms,
            delete_retention_ms,
            segment_bytes: self.shared.config.segment_bytes,
            below: Some(point.below),
        };
        let outcome = self.compact_locked(&opts, dry_run)?;
        if !dry_run {
            let mut state = self.shared.compaction_point();
            let total = match state.done {
                Some((p, _, before)) if p == point => before.then(&outcome),
                _ => outcome,
            };
            state.done = Some((point, active, total));
        }
        Ok(Some(outcome))
    }

    /// What compacting to `point` did here, once done (by any caller).
    pub fn compacted_to(&self, point: CompactionPoint) -> Option<CompactionOutcome> {
        match self.shared.compaction_point().done {
            Some((p, _, outcome)) if p == point => Some(outcome),
            _ => None,
        }
    }

    fn compact_keys_or_plan(
        &self,
        opts: &CompactionOptions,
        dry_run: bool,
    ) -> Result<CompactionOutcome> {
        let _maintenance = self.shared.maintenance();
        self.compact_locked(opts, dry_run)
    }

    /// Compaction with the maintenance lock held by the caller.
    fn compact_locked(&self, opts: &CompactionOptions, dry_run: bool) -> Result<CompactionOutcome> {
        use crate::storage::compaction::{KeyMap, clean_segment};
        let segments = self.shared.segments();
        let mut out = CompactionOutcome {
            segments_before: segments.len(),
            bytes_before: segments.iter().map(|s| s.size_bytes()).sum(),
            ..CompactionOutcome::default()
        };
        let mut closed = &segments[..segments.len().saturating_sub(1)];
        // Segments that start at or past the compaction point hold nothing to compact.
        if let Some(below) = opts.below {
            let n = closed
                .iter()
                .take_while(|s| s.base_offset() < below)
                .count();
            closed = &closed[..n];
        }
        if closed.is_empty() {
            out.segments_after = out.segments_before;
            out.bytes_after = out.bytes_before;
            return Ok(out);
        }
        let mut keys = KeyMap::default();
        let end = self.high_water().min(opts.below.unwrap_or(u64::MAX));
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
                        && opts.counts(r.offset)
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
        crate::storage::compaction::write_cleaned(dir, bases[0], body, io)?;
        crate::storage::compaction::install(dir, bases, io)?;
        let (seg, index_ok) = Segment::open(dir, bases[0], None, io)?;
        let seg = open_closed_segment(seg, index_ok, next_base, &self.shared.config, io, None)?;
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
