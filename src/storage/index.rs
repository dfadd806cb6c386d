//! The sparse offset index of one segment: `<base>.index`.
//!
//! One entry per `index_interval_bytes` of log (and one for a segment's first batch), each naming
//! where a batch starts. A lookup is a binary search for the last entry at or below the wanted
//! offset, then a forward scan of the log that is bounded by the interval plus one batch.
//!
//! # Layout
//! A [`super::mapped`] file with magic `SLIX` and 8-byte entries:
//!
//! | offset | size | field             | notes                                        |
//! |-------:|-----:|-------------------|----------------------------------------------|
//! |      0 |    4 | `relative_offset` | batch base offset minus segment base (u32 LE)|
//! |      4 |    4 | `position`        | byte position of the batch in `.log` (u32 LE)|
//!
//! Entries are strictly increasing in both fields.

use super::mapped::{Entry, MappedIndex};

pub const MAGIC: [u8; 4] = *b"SLIX";
pub const ENTRY_LEN: usize = 8;

/// A `(relative offset, byte position)` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
}

impl Entry<ENTRY_LEN> for IndexEntry {
    const MAGIC: [u8; 4] = MAGIC;
    const DISORDER: &'static str = "entries are not increasing";

    fn decode(b: &[u8; ENTRY_LEN]) -> Self {
        IndexEntry {
            relative_offset: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            position: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..4].copy_from_slice(&self.relative_offset.to_le_bytes());
        b[4..8].copy_from_slice(&self.position.to_le_bytes());
        b
    }

    fn follows(&self, prev: &Self) -> bool {
        self.relative_offset > prev.relative_offset && self.position > prev.position
    }
}

/// The offset index of a segment.
pub type OffsetIndex = MappedIndex<IndexEntry, ENTRY_LEN>;

impl OffsetIndex {
    /// The last entry whose relative offset is at or below `relative_offset`.
    pub fn lookup(&self, relative_offset: u32) -> Option<IndexEntry> {
        self.partition_point(|e| e.relative_offset <= relative_offset)
            .checked_sub(1)
            .map(|i| self.entry(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mapped::OpenProblem;

    #[test]
    fn lookup_finds_the_last_entry_at_or_below_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.index");
        let idx = OffsetIndex::create(&path, 100, 8, &crate::storage::RealIo).unwrap();
        for (rel, pos) in [(0, 16), (10, 4096), (25, 9000)] {
            assert!(idx.push(IndexEntry {
                relative_offset: rel,
                position: pos
            }));
        }
        assert_eq!(idx.lookup(0).unwrap().position, 16);
        assert_eq!(idx.lookup(9).unwrap().position, 16);
        assert_eq!(idx.lookup(10).unwrap().position, 4096);
        assert_eq!(idx.lookup(24).unwrap().position, 4096);
        assert_eq!(idx.lookup(1000).unwrap().position, 9000);
        idx.trim(&crate::storage::RealIo).unwrap();
        drop(idx);
        let idx = OffsetIndex::open(&path, 100, None, 0).unwrap();
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.lookup(30).unwrap().relative_offset, 25);
        assert!(matches!(
            OffsetIndex::open(&path, 101, None, 0),
            Err(OpenProblem::Invalid(_))
        ));
    }

    #[test]
    fn a_full_index_refuses_more_entries() {
        let dir = tempfile::tempdir().unwrap();
        let idx = OffsetIndex::create(&dir.path().join("0.index"), 0, 1, &crate::storage::RealIo)
            .unwrap();
        let e = |r| IndexEntry {
            relative_offset: r,
            position: r + 16,
        };
        assert!(idx.push(e(0)));
        assert!(idx.is_full());
        assert!(!idx.push(e(1)));
    }
}
