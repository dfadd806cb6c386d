//! The sparse time index of one segment: `<base>.timeindex`.
//!
//! Timestamps inside a partition need not increase (producers' clocks differ), so an entry does
//! not say "this batch has timestamp T" but "every record before this offset has a timestamp of
//! at most T": entry `(T, o)` means the largest timestamp among the segment's records with
//! relative offset below `o` is `T`. The `T`s never decrease. To find the first record with a
//! timestamp at or after `t`, take the last entry with `T < t` (everything before its offset is
//! too old) and scan forward from there; the next entry has `T >= t`, so the scan is bounded.
//! On roll, a final entry `(segment max, next relative offset)` records the segment's largest
//! timestamp.
//!
//! # Layout
//! A [`super::mapped`] file with magic `SLTI` and 12-byte entries:
//!
//! | offset | size | field             | notes                                         |
//! |-------:|-----:|-------------------|-----------------------------------------------|
//! |      0 |    8 | `max_timestamp`   | largest timestamp before `relative_offset` (i64 LE, ms) |
//! |      8 |    4 | `relative_offset` | offset minus segment base (u32 LE)            |

use super::mapped::{Entry, MappedIndex};

pub const MAGIC: [u8; 4] = *b"SLTI";
pub const ENTRY_LEN: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    pub max_timestamp: i64,
    pub relative_offset: u32,
}

impl Entry<ENTRY_LEN> for TimeEntry {
    const MAGIC: [u8; 4] = MAGIC;
    const DISORDER: &'static str = "entries go backwards";

    fn decode(b: &[u8; ENTRY_LEN]) -> Self {
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[0..8]);
        TimeEntry {
            max_timestamp: i64::from_le_bytes(ts),
            relative_offset: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        }
    }

    fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..8].copy_from_slice(&self.max_timestamp.to_le_bytes());
        b[8..12].copy_from_slice(&self.relative_offset.to_le_bytes());
        b
    }

    fn follows(&self, prev: &Self) -> bool {
        self.max_timestamp >= prev.max_timestamp && self.relative_offset > prev.relative_offset
    }
}

/// The time index of a segment.
pub type TimeIndex = MappedIndex<TimeEntry, ENTRY_LEN>;

impl TimeIndex {
    /// The relative offset to start scanning from for the first record at or after `timestamp`:
    /// every record before it is older than `timestamp`.
    pub fn scan_start(&self, timestamp: i64) -> u32 {
        self.partition_point(|e| e.max_timestamp < timestamp)
            .checked_sub(1)
            .map_or(0, |i| self.entry(i).relative_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_start_skips_only_entries_that_are_all_older() {
        let dir = tempfile::tempdir().unwrap();
        let idx = TimeIndex::create(
            &dir.path().join("0.timeindex"),
            0,
            8,
            &crate::storage::RealIo,
        )
        .unwrap();
        for (ts, rel) in [(100, 10), (100, 20), (300, 30)] {
            assert!(idx.push(TimeEntry {
                max_timestamp: ts,
                relative_offset: rel
            }));
        }
        assert_eq!(idx.scan_start(50), 0);
        assert_eq!(idx.scan_start(100), 0);
        assert_eq!(idx.scan_start(101), 20);
        assert_eq!(idx.scan_start(300), 20);
        assert_eq!(idx.scan_start(301), 30);
    }
}
