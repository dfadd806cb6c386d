//! Settings of one partition log.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::record::MAX_BATCH_LEN;
use super::segment::MAX_SEGMENT_BYTES;

/// When appended bytes are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// An append completes only after `fdatasync` covered it. Appends that queue while a sync
    /// runs share the next one (group commit). Nothing acknowledged is ever lost.
    #[default]
    Always,
    /// Appends complete once written to the OS; the log is synced every `fsync_interval_ms`. A
    /// crash of the machine (not just the process) can lose up to that window of acknowledged
    /// data.
    Interval,
    /// Appends complete once written to the OS; syncs happen only on roll and close. A machine
    /// crash can lose everything since the last roll. For tests and throwaway data.
    Never,
}

/// Settings of a partition log. Each field says its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Roll to a new segment when the active one would grow past this many bytes.
    /// Default: 256 MiB. At most 4 GiB - 1 (index positions are 32-bit).
    pub segment_bytes: u64,
    /// Roll when the first record of the active segment is older than this, judged by the
    /// timestamps of incoming batches. Default: 7 days.
    pub segment_ms: u64,
    /// Bytes of log between two sparse index entries. Default: 4096.
    pub index_interval_bytes: u32,
    /// When appends are made durable. Default: `always`.
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`, the longest time between two syncs. Default: 100.
    pub fsync_interval_ms: u64,
    /// Largest batch accepted, framing included. Default: 8 MiB.
    pub max_batch_bytes: usize,
    /// Write a recovery checkpoint after this many synced bytes, so that recovery after a crash
    /// scans at most this much of the active segment. Default: 64 MiB.
    pub checkpoint_bytes: u64,
    /// Appends queued for the writer before `append` waits. Default: 4096.
    pub queue_depth: usize,
    /// When a small write (under a quarter of this) would grow the log file, this many zero
    /// bytes are written after it, so that the following small appends overwrite allocated
    /// blocks: their `fdatasync` then flushes data only, without a file-size journal commit,
    /// which on ext4 halves its latency. The zeros are cut on roll, close and recovery. 0 turns
    /// it off. Default: 1048576 (1 MiB).
    pub preallocate_bytes: u64,
    /// After two rounds in a row that each wrote a single append arriving within this many
    /// microseconds of the previous round's end, the writer polls for the next append for up
    /// to this long before it sleeps. A lone producer that waits for each acknowledgement then
    /// finds the writer awake instead of paying a thread wake-up (tens of microseconds on a
    /// virtual machine). A quiet partition never polls and a busy one is already batching.
    /// 0 turns it off. Default: 200.
    pub writer_spin_us: u64,
    /// How much lower than the broker's own scheduling priority a writer pool thread runs while
    /// it serves this partition: added to the thread's nice value (Linux; capped at 19). The writer mostly waits on
    /// `fdatasync`; at a lower priority its wake-up does not preempt the threads that serve
    /// requests, and it runs once they have queued the next group of appends, so group commits
    /// get larger. While it serves a lone producer (see `writer_spin_us`) it runs at the
    /// broker's priority: that producer's Send polls for the answer on a worker thread, which
    /// must not hold the writer off its CPU. 0 keeps the broker's priority. Default: 10.
    pub writer_nice: u8,
    /// Message ids of idempotent Send a topic keeps in memory before writing them to an id
    /// index file. After a crash, the ids since the last file are found again by re-reading the
    /// log from there. Default: 49152. The table is made for a sixth more (57,344, the most
    /// 65,536 slots hold), room for the ids of the Send that fills it.
    pub dedup_memtable_ids: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 256 << 20,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 100,
            max_batch_bytes: 8 << 20,
            checkpoint_bytes: 64 << 20,
            queue_depth: 4096,
            preallocate_bytes: 1 << 20,
            writer_spin_us: 200,
            writer_nice: 10,
            dedup_memtable_ids: 49152,
        }
    }
}

impl LogConfig {
    /// Rejects settings that make no sense, with a message naming the field.
    pub fn sanitize(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.segment_bytes < 4096 || self.segment_bytes > MAX_SEGMENT_BYTES {
            return bad(format!(
                "segment_bytes = {} must be between 4096 and {MAX_SEGMENT_BYTES}",
                self.segment_bytes
            ));
        }
        if self.segment_ms == 0 {
            return bad("segment_ms must be at least 1".into());
        }
        if self.index_interval_bytes == 0 {
            return bad("index_interval_bytes must be at least 1".into());
        }
        if self.max_batch_bytes < 1024 || self.max_batch_bytes > MAX_BATCH_LEN {
            return bad(format!(
                "max_batch_bytes = {} must be between 1024 and {MAX_BATCH_LEN}",
                self.max_batch_bytes
            ));
        }
        if self.fsync == FsyncPolicy::Interval && self.fsync_interval_ms == 0 {
            return bad("fsync_interval_ms must be at least 1 with fsync = \"interval\"".into());
        }
        if self.queue_depth == 0 {
            return bad("queue_depth must be at least 1".into());
        }
        if self.dedup_memtable_ids == 0 {
            return bad("dedup_memtable_ids must be at least 1".into());
        }
        if self.writer_nice > 19 {
            return bad(format!(
                "writer_nice = {} must be between 0 and 19",
                self.writer_nice
            ));
        }
        Ok(())
    }

    /// Entries a segment's offset index needs at most: one per interval, plus one per batch
    /// that is larger than the interval (bounded by the same count), plus the first.
    pub fn index_capacity(&self) -> usize {
        (self.segment_bytes / u64::from(self.index_interval_bytes)) as usize + 2
    }

    pub(crate) fn writer_spin(&self) -> Option<Duration> {
        (self.writer_spin_us > 0).then(|| Duration::from_micros(self.writer_spin_us))
    }

    pub(crate) fn sync_interval(&self) -> Option<Duration> {
        (self.fsync == FsyncPolicy::Interval).then(|| Duration::from_millis(self.fsync_interval_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_nonsense_is_named() {
        LogConfig::default().sanitize().unwrap();
        let rejected = |c: LogConfig, field: &str| {
            let msg = c.sanitize().unwrap_err().to_string();
            assert!(msg.contains(field), "{msg}");
        };
        rejected(
            LogConfig {
                segment_bytes: 10,
                ..LogConfig::default()
            },
            "segment_bytes",
        );
        rejected(
            LogConfig {
                fsync: FsyncPolicy::Interval,
                fsync_interval_ms: 0,
                ..LogConfig::default()
            },
            "fsync_interval_ms",
        );
        rejected(
            LogConfig {
                writer_nice: 20,
                ..LogConfig::default()
            },
            "writer_nice",
        );
    }
}
