//! The id index's lifecycle: opening it from its runs (removing what an interrupted merge
//! left), recovering the memtable from the logs, claims and lookups, freezing the memtable,
//! installing written runs and replacing merged ones.

use std::collections::hash_map::Entry as MapEntry;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::key::{Entry, Key, KeyMap};
use super::memtable::{Frozen, MEMTABLE_BYTES_PER_ID, Slot, make_table};
use super::merge::MERGE_FAN_IN;
use super::run::{Probe, Run};
use crate::storage::error::{Error, Result};
use crate::storage::io::FileIo;
use crate::storage::partition::Partition;

/// What [`IdIndex::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Not known inside the window: now pending, for the caller to append.
    New,
    /// Stored inside the window.
    Known(Entry),
    /// Another Send is appending it.
    Pending,
}

/// The id index of one topic. See the module documentation.
#[derive(Debug)]
pub struct IdIndex {
    dir: PathBuf,
    partitions: u32,
    window_ms: u64,
    memtable_ids: usize,
    memtable: KeyMap<Slot>,
    /// A written memtable's table, cleared, for the next memtable (only one of the size made:
    /// a table that grew past it is freed).
    spare: Option<KeyMap<Slot>>,
    /// Frozen memtables not yet installed as runs, oldest first.
    frozen: Vec<Arc<Frozen>>,
    /// Runs, oldest (lowest `hi`) first.
    runs: Vec<Arc<Run>>,
    next_seq: u64,
    /// Ids answered as duplicates since the broker started.
    pub duplicates: u64,
}

impl IdIndex {
    /// Opens (creating if needed) the index in `dir`: reads every run's summary (not its
    /// entries), removes runs a finished merge replaced and temp files an unfinished one left.
    /// Call [`IdIndex::recover`] next.
    pub fn open(
        dir: &Path,
        partitions: u32,
        window_ms: u64,
        memtable_ids: usize,
        io: &dyn FileIo,
    ) -> Result<IdIndex> {
        crate::storage::io::create_dir_all(io, dir).map_err(|e| Error::io(dir, e))?;
        let mut runs = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io(&path, e));
                    }
                    _ => {}
                }
            } else if name.ends_with(".run") {
                runs.push(Arc::new(Run::open(&path, partitions)?));
            }
        }
        runs.sort_by_key(|r| (r.hi(), std::cmp::Reverse(r.lo())));
        // A merge's inputs lie inside its output's [lo, hi]: it finished, they are stale.
        let mut kept: Vec<Arc<Run>> = Vec::new();
        for r in runs.into_iter().rev() {
            if kept.iter().any(|k| k.lo() <= r.lo() && r.hi() <= k.hi()) {
                std::fs::remove_file(r.path()).map_err(|e| Error::io(r.path(), e))?;
            } else {
                kept.push(r);
            }
        }
        kept.reverse();
        let next_seq = kept.last().map_or(0, |r| r.hi() + 1);
        Ok(IdIndex {
            dir: dir.to_path_buf(),
            partitions,
            window_ms,
            memtable_ids,
            memtable: KeyMap::default(),
            spare: None,
            frozen: Vec::new(),
            runs: kept,
            next_seq,
            duplicates: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Per partition, the offset below which every id is in a run on disk.
    pub fn watermarks(&self) -> Vec<u64> {
        match self.runs.last() {
            Some(r) => r.watermarks().to_vec(),
            None => vec![0; self.partitions as usize],
        }
    }

    /// Rebuilds what the memtable held from each partition's log, from the watermark to the
    /// end. Returns the ids found.
    pub fn recover(&mut self, logs: &[&Partition], now_ms: i64) -> Result<u64> {
        let marks = self.watermarks();
        let mut found = 0;
        for (p, log) in logs.iter().enumerate() {
            let mut at = marks.get(p).copied().unwrap_or(0).max(log.log_start());
            let end = log.high_water();
            while at < end {
                let batches = log.read(at, 1 << 20)?;
                let Some(last) = batches.last() else { break };
                let next = last.header().next_offset();
                for batch in batches.iter().filter(|b| b.header().has_ids()) {
                    for record in batch.records() {
                        let record = record.map_err(|why| Error::corrupt(log.dir(), 0, why))?;
                        let Some(id) = record.id.filter(|_| record.offset >= at) else {
                            continue;
                        };
                        let entry = Entry {
                            partition: p as u32,
                            offset: record.offset,
                            stored_ms: record.timestamp,
                        };
                        if !entry.live(now_ms, self.window_ms) {
                            continue;
                        }
                        let key = Key::of(&id);
                        match self.get(&key)? {
                            Some(e) if e == entry || e.stored_ms > entry.stored_ms => {}
                            _ => {
                                self.settle(key, entry);
                                found += 1;
                            }
                        }
                    }
                }
                at = next;
            }
        }
        Ok(found)
    }

    /// The newest entry for `key`, live or not (pending ids are not entries yet).
    pub fn get(&self, key: &Key) -> Result<Option<Entry>> {
        match self.memtable.get(key) {
            Some(Slot::Stored(e)) => Ok(Some(*e)),
            _ => below_memtable(&self.frozen, &self.runs, key),
        }
    }

    /// Looks `key` up and, unless it is stored inside the window at `now_ms` or pending, marks
    /// it pending for a Send about to append it to `partition` (whose end is `floor`). One
    /// memtable probe: the claim, the check and the pending mark are the same slot.
    pub fn claim(&mut self, key: Key, partition: u32, floor: u64, now_ms: i64) -> Result<Claimed> {
        let window = self.window_ms;
        let pending = Slot::Pending { partition, floor };
        self.made();
        match self.memtable.entry(key) {
            MapEntry::Occupied(mut slot) => match *slot.get() {
                Slot::Pending { .. } => Ok(Claimed::Pending),
                Slot::Stored(e) if e.live(now_ms, window) => Ok(Claimed::Known(e)),
                // The memtable holds the newest entry: out of the window, it is stored again.
                Slot::Stored(_) => {
                    slot.insert(pending);
                    Ok(Claimed::New)
                }
            },
            MapEntry::Vacant(slot) => {
                match below_memtable(&self.frozen, &self.runs, &key)?
                    .filter(|e| e.live(now_ms, window))
                {
                    Some(e) => Ok(Claimed::Known(e)),
                    None => {
                        slot.insert(pending);
                        Ok(Claimed::New)
                    }
                }
            }
        }
    }

    /// A pending id is durable at `entry` (or an id found in the log is known again).
    pub fn settle(&mut self, key: Key, entry: Entry) {
        self.made();
        self.memtable.insert(key, Slot::Stored(entry));
    }

    /// An id a replica finds stored as it applies its replicated log: into the index, unless
    /// the index knows it already. An entry below its partition's watermark is in a run (or a
    /// newer one is: a replica applies again, after a restart, entries it had indexed); above
    /// it, only the memtables can hold the id, so no run is read (the same id stored again in
    /// another partition after its window, and that entry applied again after a restart, is the
    /// one case this misses: the older entry then shadows it until the memtable is written). A
    /// pending id (claimed here, as the group's leader) is settled. True when it went in.
    pub fn learn(&mut self, key: Key, entry: Entry) -> bool {
        let mark = self
            .runs
            .last()
            .and_then(|r| r.watermarks().get(entry.partition as usize).copied())
            .unwrap_or(0);
        if entry.offset < mark {
            return false;
        }
        let known = match self.memtable.get(&key) {
            Some(Slot::Pending { .. }) => None,
            Some(Slot::Stored(e)) => Some(*e),
            None => self
                .frozen
                .iter()
                .rev()
                .find_map(|f| match f.entries.get(&key) {
                    Some(Slot::Stored(e)) => Some(*e),
                    _ => None,
                }),
        };
        if known.is_some_and(|e| e == entry || e.stored_ms > entry.stored_ms) {
            return false;
        }
        self.settle(key, entry);
        true
    }

    /// Gives the memtable its table at its first id (a topic nobody sends ids to has none).
    fn made(&mut self) {
        let ids = self.table_ids();
        make_table(&mut self.memtable, ids);
    }

    /// The ids a memtable's table is made for: a sixth more than `memtable_ids`, so that the
    /// ids of the Send that fills a memtable (it is frozen after the claims that fill it) fit
    /// without the table doubling. The default 49,152 gives 57,344: 7/8 of 65,536 slots.
    fn table_ids(&self) -> usize {
        self.memtable_ids.saturating_add(self.memtable_ids / 6)
    }

    /// Starts loading what a lookup of `key` will read first, one Bloom filter block per run,
    /// into the CPU's cache. Each is a cache miss (the filters of a day's ids are megabytes);
    /// a Send that asks for its ids a few ahead of their claims overlaps those misses instead
    /// of waiting for each in turn.
    pub fn prefetch(&self, key: &Key) {
        let probe = Probe::new(key);
        for r in &self.runs {
            r.prefetch(&probe);
        }
    }

    /// A pending id will not be stored: forgotten (what was known before still is).
    pub fn release(&mut self, key: &Key) {
        if let Some(Slot::Pending { .. }) = self.memtable.get(key) {
            self.memtable.remove(key);
        }
    }

    /// Gives the memtable tables back when the topic is idle (its memtable empty), and the spare
    /// in any case: a maintenance pass calls it after writing runs, so a topic that has stopped
    /// receiving ids holds no table until its next one.
    pub fn let_go_of_tables(&mut self) {
        self.spare = None;
        if self.memtable.is_empty() {
            self.memtable = KeyMap::default();
        }
    }

    /// Whether the memtable is due to be frozen.
    pub fn full(&self) -> bool {
        self.memtable.len() >= self.memtable_ids
    }

    /// Ids held in memory (memtable and frozen ones).
    pub fn in_memory(&self) -> usize {
        self.memtable.len() + self.frozen.iter().map(|f| f.entries.len()).sum::<usize>()
    }

    /// Whether anything has happened since the last run: ids in memory, or `ends` (each
    /// partition's end) above the watermarks.
    pub fn behind(&self, ends: &[u64]) -> bool {
        self.in_memory() > 0 || self.watermarks().iter().zip(ends).any(|(w, e)| w < e)
    }

    /// Freezes the memtable's stored ids: they are written as a run by [`Frozen::write`], then
    /// [`IdIndex::install`]ed. Pending ids stay in the new memtable. `ends` are the partitions'
    /// ends now; each becomes the run's watermark, lowered to the floor of any id still pending
    /// in that partition (its record will be at or above) and never below an older run's.
    pub fn freeze(&mut self, ends: &[u64]) -> Arc<Frozen> {
        let mut marks = ends.to_vec();
        for (m, old) in marks.iter_mut().zip(self.watermarks()) {
            *m = (*m).max(old);
        }
        // The next memtable is the map of the last one written (cleared, its capacity kept), so
        // a busy topic allocates no table per memtable; else an empty one, given its table at
        // its first id (a topic whose messages carry no ids freezes only to move its watermarks
        // and never needs one).
        let mut next = self.spare.take().unwrap_or_default();
        let table_ids = self.table_ids();
        let mut entries = std::mem::take(&mut self.memtable);
        entries.retain(|key, slot| match *slot {
            Slot::Stored(_) => true,
            Slot::Pending { partition, floor } => {
                if let Some(m) = marks.get_mut(partition as usize) {
                    *m = (*m).min(floor);
                }
                make_table(&mut next, table_ids);
                next.insert(*key, *slot);
                false
            }
        });
        self.memtable = next;
        let frozen = Arc::new(Frozen {
            seq: self.next_seq,
            entries,
            watermarks: marks,
        });
        self.next_seq += 1;
        self.frozen.push(Arc::clone(&frozen));
        frozen
    }

    /// Frozen memtables waiting to be written, oldest first (they must be written in order).
    pub fn unwritten(&self) -> Option<Arc<Frozen>> {
        self.frozen.first().cloned()
    }

    /// Replaces the oldest frozen memtable by the run written from it.
    pub fn install(&mut self, run: Run) {
        if !self.frozen.is_empty() {
            let frozen = self.frozen.remove(0);
            // The writer has let go of it: its table becomes the next memtable's.
            if let Ok(mut f) = Arc::try_unwrap(frozen) {
                // A table that grew past its size (a Send of more ids than the headroom) is
                // freed rather than kept.
                // (A table made for n ids holds fewer than 2n; one that doubled, at least 2n.)
                if f.entries.capacity() < self.table_ids().saturating_mul(2) {
                    f.entries.clear();
                    self.spare = Some(f.entries);
                }
            }
        }
        self.runs.push(Arc::new(run));
    }

    /// The runs to merge next: the newest [`MERGE_FAN_IN`] when they share a tier.
    pub fn merge_candidates(&self) -> Option<Vec<Arc<Run>>> {
        let n = self.runs.len();
        if n < MERGE_FAN_IN {
            return None;
        }
        let newest = &self.runs[n - MERGE_FAN_IN..];
        let tier = newest[0].tier();
        newest
            .iter()
            .all(|r| r.tier() == tier)
            .then(|| newest.to_vec())
    }

    /// Runs, except the newest (it carries the watermarks), whose every id is out of the window.
    pub fn expired_runs(&self, now_ms: i64) -> Vec<Arc<Run>> {
        let n = self.runs.len().saturating_sub(1);
        self.runs[..n]
            .iter()
            .filter(|r| {
                !Entry {
                    partition: 0,
                    offset: 0,
                    stored_ms: r.max_ms(),
                }
                .live(now_ms, self.window_ms)
            })
            .cloned()
            .collect()
    }

    /// Swaps `old` runs (contiguous, as [`IdIndex::merge_candidates`] chose them, or expired
    /// ones) for `new` (if any), then deletes the old files.
    pub fn replace(&mut self, old: &[Arc<Run>], new: Option<Run>) -> Result<()> {
        let first = self
            .runs
            .iter()
            .position(|r| old.iter().any(|o| Arc::ptr_eq(o, r)));
        self.runs.retain(|r| !old.iter().any(|o| Arc::ptr_eq(o, r)));
        if let (Some(at), Some(new)) = (first, new) {
            self.runs.insert(at, Arc::new(new));
        }
        for r in old {
            match std::fs::remove_file(r.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(r.path(), e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Heap bytes of the memtable tables as allocated: the memtable, the spare, frozen ones.
    pub fn table_bytes(&self) -> u64 {
        let tables = std::iter::once(&self.memtable)
            .chain(&self.spare)
            .chain(self.frozen.iter().map(|f| &f.entries));
        tables.map(|t| t.capacity() as u64).sum::<u64>() * MEMTABLE_BYTES_PER_ID
    }

    /// Counts for `topics describe` and the docs' bytes-per-id figure.
    pub fn stats(&self) -> IdStats {
        IdStats {
            in_memory: self.in_memory() as u64,
            on_disk: self.runs.iter().map(|r| r.count()).sum(),
            runs: self.runs.len() as u64,
            resident_bytes: self.runs.iter().map(|r| r.resident_bytes()).sum::<u64>()
                + self.table_bytes(),
            disk_bytes: self.runs.iter().map(|r| r.file_bytes()).sum(),
            duplicates: self.duplicates,
        }
    }
}

/// The newest entry for `key` in frozen memtables or runs.
fn below_memtable(frozen: &[Arc<Frozen>], runs: &[Arc<Run>], key: &Key) -> Result<Option<Entry>> {
    for f in frozen.iter().rev() {
        if let Some(Slot::Stored(e)) = f.entries.get(key) {
            return Ok(Some(*e));
        }
    }
    // Most lookups are of new ids: every filter is checked, then runs are read only if one said
    // "maybe".
    let probe = Probe::new(key);
    if !runs.iter().fold(false, |any, r| any | r.may_hold(&probe)) {
        return Ok(None);
    }
    for r in runs.iter().rev() {
        if let Some(e) = r.get(key)? {
            return Ok(Some(e));
        }
    }
    Ok(None)
}

/// What an [`IdIndex`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdStats {
    pub in_memory: u64,
    pub on_disk: u64,
    pub runs: u64,
    pub resident_bytes: u64,
    pub disk_bytes: u64,
    pub duplicates: u64,
}

#[cfg(test)]
mod tests {
    use super::super::testing::{entry, key};
    use super::*;
    use crate::storage::io::RealIo;

    /// Sends of `per_send` new ids each, the memtable frozen after the claims that fill it and
    /// its run written at once; returns the most table memory seen.
    fn most_table_bytes(index: &mut IdIndex, dir: &Path, next: &mut u64, sends: &[u64]) -> u64 {
        let mut most = 0;
        for &n in sends {
            let next = &mut *next;
            for i in *next..*next + n {
                assert_eq!(index.claim(key(i), 0, i, 1).unwrap(), Claimed::New);
            }
            for i in *next..*next + n {
                index.settle(key(i), entry(i, 1));
            }
            *next += n;
            most = most.max(index.table_bytes());
            if index.full() {
                let frozen = index.freeze(&[*next, *next, *next]);
                let run = frozen.write(dir, &RealIo).unwrap();
                drop(frozen);
                index.install(run);
            }
            most = most.max(index.table_bytes());
        }
        most
    }

    #[test]
    fn a_memtable_table_is_made_once_and_not_kept_once_a_large_send_grew_it() {
        let dir = tempfile::tempdir().unwrap();
        let io = RealIo;
        // 96 ids a memtable; its table is made for 112 (the hash table holds 112 in 128 slots).
        let mut index = IdIndex::open(dir.path(), 3, 1_000_000, 96, &io).unwrap();
        assert_eq!(index.table_bytes(), 0, "no table before the first id");
        let one = 112 * MEMTABLE_BYTES_PER_ID;
        // Sends of up to the headroom (16) never double a table: the memtable and the spare.
        let sizes: Vec<u64> = (0..60).map(|i| 1 + i % 16).collect();
        let mut next = 0;
        assert_eq!(
            most_table_bytes(&mut index, dir.path(), &mut next, &sizes),
            2 * one
        );
        // One Send of 200 ids doubles the memtable's table; once written, it is freed rather than
        // kept as the spare, and later memtables are of the size made.
        let grown = most_table_bytes(&mut index, dir.path(), &mut next, &[200]);
        assert!(grown > 2 * one, "the memtable's table grew: {grown}");
        assert!(index.table_bytes() <= 2 * one, "{}", index.table_bytes());
        assert_eq!(
            most_table_bytes(&mut index, dir.path(), &mut next, &sizes),
            2 * one
        );
        // Every id claimed is known.
        assert_eq!(next, 2 * sizes.iter().sum::<u64>() + 200);
        for i in 0..next {
            assert!(index.get(&key(i)).unwrap().is_some(), "id {i}");
        }
        // Idle: a maintenance pass writes the memtable and the index lets go of every table.
        let frozen = index.freeze(&[next, next, next]);
        index.install(frozen.write(dir.path(), &io).unwrap());
        drop(frozen);
        index.let_go_of_tables();
        assert_eq!(index.table_bytes(), 0);
        assert!(index.get(&key(next - 1)).unwrap().is_some());
        assert_eq!(index.claim(key(next), 0, next, 1).unwrap(), Claimed::New);
        assert_eq!(index.table_bytes(), one, "a table again at the next id");
    }

    #[test]
    fn a_topic_whose_messages_carry_no_ids_holds_no_table() {
        let dir = tempfile::tempdir().unwrap();
        let io = RealIo;
        let mut index = IdIndex::open(dir.path(), 3, 1_000_000, 96, &io).unwrap();
        // Maintenance passes while the logs grow: watermarks move, runs are written, no ids.
        for end in [10u64, 20, 30, 40, 50, 60] {
            assert!(index.behind(&[end, end, end]));
            let frozen = index.freeze(&[end, end, end]);
            index.install(frozen.write(dir.path(), &io).unwrap());
            assert_eq!(index.table_bytes(), 0, "at {end}");
            assert_eq!(index.watermarks(), vec![end, end, end]);
        }
    }

    #[test]
    fn newest_wins_across_memtable_frozen_and_runs_and_the_window_decides_liveness() {
        let dir = tempfile::tempdir().unwrap();
        let io = RealIo;
        let mut index = IdIndex::open(dir.path(), 3, 100, 2, &io).unwrap();
        index.settle(key(1), entry(1, 10));
        index.settle(key(2), entry(2, 10));
        assert!(index.full());
        let frozen = index.freeze(&[5, 6, 7]);
        index.settle(key(1), entry(11, 50));
        assert_eq!(index.get(&key(1)).unwrap(), Some(entry(11, 50)));
        assert_eq!(index.get(&key(2)).unwrap(), Some(entry(2, 10)));
        let run = frozen.write(dir.path(), &io).unwrap();
        index.install(run);
        assert_eq!(index.watermarks(), vec![5, 6, 7]);
        assert_eq!(index.get(&key(2)).unwrap(), Some(entry(2, 10)));
        assert_eq!(index.get(&key(1)).unwrap(), Some(entry(11, 50)));
        let e = index.get(&key(2)).unwrap().unwrap();
        assert!(e.live(109, 100));
        assert!(!e.live(110, 100));
        // The newest run keeps the watermarks even when all its ids expired.
        assert!(index.expired_runs(1_000_000).is_empty());
        let reopened = IdIndex::open(dir.path(), 3, 100, 2, &io).unwrap();
        assert_eq!(reopened.watermarks(), vec![5, 6, 7]);
        assert_eq!(reopened.get(&key(1)).unwrap(), Some(entry(1, 10)));
    }

    #[test]
    fn a_replica_learns_what_it_applies_but_never_over_a_newer_entry() {
        let dir = tempfile::tempdir().unwrap();
        let io = RealIo;
        let mut index = IdIndex::open(dir.path(), 3, 1_000, 4, &io).unwrap();
        // Unknown: learnt. The same entry again (applied again after a restart): no change.
        assert!(index.learn(key(1), entry(1, 10)));
        assert!(!index.learn(key(1), entry(1, 10)));
        // Claimed here (as leader): the applied entry settles the claim.
        assert_eq!(index.claim(key(2), 2, 2, 20).unwrap(), Claimed::New);
        assert!(index.learn(key(2), entry(2, 20)));
        assert_eq!(
            index.claim(key(2), 2, 3, 21).unwrap(),
            Claimed::Known(entry(2, 20))
        );
        // Stored again after its window (newer), then written to a run with everything below
        // offset 40: applying the older entries again (after a restart) changes nothing.
        index.settle(key(3), entry(30, 900));
        let frozen = index.freeze(&[40, 40, 40]);
        index.install(frozen.write(dir.path(), &io).unwrap());
        drop(frozen);
        assert!(!index.learn(key(3), entry(3, 30)));
        assert!(!index.learn(key(1), entry(1, 5)));
        assert_eq!(index.get(&key(3)).unwrap(), Some(entry(30, 900)));
        assert_eq!(index.get(&key(1)).unwrap(), Some(entry(1, 10)));
        // A newer entry than the one known goes in.
        assert!(index.learn(key(1), entry(41, 1_500)));
        assert_eq!(index.get(&key(1)).unwrap(), Some(entry(41, 1_500)));
    }
}
