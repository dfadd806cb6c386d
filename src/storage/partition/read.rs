//! Reads: whole batches from an offset, and the offset for a timestamp. Lock-free: a reader
//! loads the segment list (an `Arc` swapped under a brief lock), the high-water mark and a
//! segment's visible length, all published with `Release` after the bytes are durable, then uses
//! positional reads and the mapped indexes.

use super::Partition;
use crate::storage::error::{Error, Result};
use crate::storage::record::Batch;

impl Partition {
    /// Whole batches holding offsets from `from` on, about `max_bytes` of them (at least one
    /// batch when `from` is below the high-water mark). A batch may start before `from`: callers
    /// skip the records below it. Reading at the high-water mark returns nothing.
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<Batch>> {
        let segments = self.shared.segments();
        let end = self.high_water();
        let start = segments
            .first()
            .map_or(0, |s| s.base_offset())
            .max(self.shared.floor.load(std::sync::atomic::Ordering::Acquire));
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
        // A segment reads whole batches to its durable end; a replicated partition's readers stop
        // at the commit point below it (a batch is wholly on one side).
        out.retain(|b| b.header().base_offset < end);
        Ok(out)
    }

    /// The first offset whose record has a timestamp at or after `timestamp`, or `None` when no
    /// visible record is that recent.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<u64>> {
        let (start, end) = (self.log_start(), self.high_water());
        for seg in self.shared.segments().iter() {
            if seg.max_timestamp() < timestamp {
                continue;
            }
            let mut cursor = seg.base_offset() + u64::from(seg.time_index.scan_start(timestamp));
            let seg_end = seg.next_offset().min(end);
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
                            if rec.offset >= cursor
                                && rec.offset >= start
                                && rec.offset < end
                                && rec.timestamp >= timestamp
                            {
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
}
