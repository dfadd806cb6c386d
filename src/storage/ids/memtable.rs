//! The memtable: the ids of the newest appends in a heap map (stored ones, and pending ones a
//! Send is appending right now), and a frozen memtable on its way to disk as a run.

use std::path::Path;

use super::key::{Entry, KeyMap};
use super::run::{self, Run};
use crate::storage::error::{Error, Result};
use crate::storage::io::FileIo;

/// A memtable's value: an id stored, or one being appended right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Stored(Entry),
    /// Claimed by a Send that is appending it to `partition`, whose end was `floor` at the
    /// claim: its offset will be at or above.
    Pending {
        partition: u32,
        floor: u64,
    },
}

/// A memtable on its way to disk, with the watermarks it completes.
#[derive(Debug)]
pub struct Frozen {
    pub(super) seq: u64,
    /// The memtable as it was frozen, pending slots taken out: only stored ids.
    pub(super) entries: KeyMap<Slot>,
    pub(super) watermarks: Vec<u64>,
}

impl Frozen {
    /// Writes this memtable as a run in `dir` (durable when it returns).
    ///
    /// The entries are sorted encoded, in an anonymous mapping: this runs on a background
    /// thread, and a mapping goes back to the system when dropped, where the allocator would
    /// keep a freed buffer of this size resident on a thread that may not allocate again soon.
    pub fn write(&self, dir: &Path, io: &dyn FileIo) -> Result<Run> {
        let stored = self.entries.iter().filter_map(|(k, slot)| match slot {
            Slot::Stored(e) => Some((k, e)),
            Slot::Pending { .. } => None,
        });
        let bytes = (self.entries.len() * run::ENTRY).max(1);
        let mut buf = memmap2::MmapMut::map_anon(bytes).map_err(|e| Error::io(dir, e))?;
        let (sorted, _) = buf.as_chunks_mut::<{ run::ENTRY }>();
        let mut n = 0;
        for (slot, (k, e)) in sorted.iter_mut().zip(stored) {
            run::encode_entry(slot, k, e);
            n += 1;
        }
        let sorted = &mut sorted[..n];
        // The key is the entry's first 16 bytes: byte order is key order.
        sorted.sort_unstable_by(|a, b| a[..16].cmp(&b[..16]));
        let spec = run::Spec {
            lo: self.seq,
            hi: self.seq,
            tier: 0,
            watermarks: &self.watermarks,
        };
        let entries = sorted.iter().map(|b| run::decode_entry(b));
        run::write(dir, io, &spec, n as u64, entries)
    }
}

/// Gives a memtable `table` with none its table, made for `ids` ids.
pub(super) fn make_table(table: &mut KeyMap<Slot>, ids: usize) {
    if table.capacity() == 0 {
        table.reserve(ids);
    }
}

/// Heap bytes per id a memtable's table can hold: key and slot (48) plus the hash table's
/// control byte, at its 7/8 maximum load.
pub const MEMTABLE_BYTES_PER_ID: u64 = 56;
