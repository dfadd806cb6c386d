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

use std::io;
use std::path::Path;

use super::io::FileIo;
use super::mapped::{MappedEntries, OpenProblem};

pub const MAGIC: [u8; 4] = *b"SLTI";
pub const ENTRY_LEN: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    pub max_timestamp: i64,
    pub relative_offset: u32,
}

fn decode(b: &[u8; ENTRY_LEN]) -> TimeEntry {
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&b[0..8]);
    TimeEntry {
        max_timestamp: i64::from_le_bytes(ts),
        relative_offset: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
    }
}

#[derive(Debug)]
pub struct TimeIndex {
    entries: MappedEntries<ENTRY_LEN>,
}

impl TimeIndex {
    pub fn create(
        path: &Path,
        base_offset: u64,
        capacity: usize,
        io: &dyn FileIo,
    ) -> io::Result<Self> {
        MappedEntries::create(path, MAGIC, base_offset, capacity, io)
            .map(|entries| Self { entries })
    }

    /// Opens an existing time index and checks that it never goes backwards.
    /// `max_entries` and `map_capacity`: see [`MappedEntries::open`].
    pub fn open(
        path: &Path,
        base_offset: u64,
        max_entries: Option<usize>,
        map_capacity: usize,
    ) -> Result<Self, OpenProblem> {
        let index = Self {
            entries: MappedEntries::open(path, MAGIC, base_offset, max_entries, map_capacity)?,
        };
        let mut prev: Option<TimeEntry> = None;
        for i in 0..index.len() {
            let e = index.entry(i);
            if let Some(p) = prev
                && (e.max_timestamp < p.max_timestamp || e.relative_offset <= p.relative_offset)
            {
                return Err(OpenProblem::Invalid("entries go backwards"));
            }
            prev = Some(e);
        }
        Ok(index)
    }

    pub fn path(&self) -> &Path {
        self.entries.path()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.entries.is_full()
    }

    pub fn entry(&self, i: usize) -> TimeEntry {
        decode(&self.entries.get(i))
    }

    pub fn last(&self) -> Option<TimeEntry> {
        self.len().checked_sub(1).map(|i| self.entry(i))
    }

    /// The relative offset to start scanning from for the first record at or after `timestamp`:
    /// every record before it is older than `timestamp`.
    pub fn scan_start(&self, timestamp: i64) -> u32 {
        self.entries
            .partition_point(|b| decode(b).max_timestamp < timestamp)
            .checked_sub(1)
            .map_or(0, |i| self.entry(i).relative_offset)
    }

    pub fn push(&self, e: TimeEntry) -> bool {
        let mut b = [0u8; ENTRY_LEN];
        b[0..8].copy_from_slice(&e.max_timestamp.to_le_bytes());
        b[8..12].copy_from_slice(&e.relative_offset.to_le_bytes());
        self.entries.push(b)
    }

    pub fn reset(&mut self, len: usize, capacity: usize, io: &dyn FileIo) -> io::Result<()> {
        self.entries.reset(len, capacity, io)
    }

    pub fn grow(&self, io: &dyn FileIo) -> io::Result<()> {
        self.entries.grow(io)
    }

    pub fn trim(&self, io: &dyn FileIo) -> io::Result<()> {
        self.entries.trim(io)
    }

    pub fn sync(&self, io: &dyn FileIo) -> io::Result<()> {
        self.entries.sync(io)
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
