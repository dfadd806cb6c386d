//! Idempotent Send: one topic's ids, stored and being stored.
//!
//! A Send's messages with ids are *claimed* before anything is appended (under one mutex with
//! the topic's [`IdIndex`]): an id the index knows inside its window is a duplicate and answers
//! with its original position; an id another Send is appending right now ("pending") waits for
//! that append and answers with its position; any other id becomes pending and is appended. The
//! writer's completion *settles* the pending ids (into the index, waking waiters) on the
//! writer's thread, so a Send whose caller went away still leaves its ids known.
//!
//! Runs are written outside the mutex, one at a time and in order ([`Dedup::write_frozen`]);
//! merges likewise, one at a time ([`Dedup::merge`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use crate::storage::ids::{self, Claimed as Found, Entry, IdIndex, IdStats, Key, KeyMap};
use crate::storage::{FileIo, Partition};

use super::error::{Error, Result};

/// How many ids ahead of its claims a Send prefetches their lookups ([`IdIndex::prefetch`]):
/// enough for a cache miss to land while the claims before it run.
const PREFETCH_AHEAD: usize = 8;

/// What a claimed id's Send must do.
#[derive(Debug)]
pub enum Claim {
    /// No id, or an id not known: append it.
    New,
    /// Stored before, inside the window: answer with this position.
    Known(Entry),
    /// Another Send is appending it: answer with the position it gets.
    Wait(oneshot::Receiver<Result<Entry, String>>),
    /// The same id appears earlier in this request, at this index.
    Repeat(usize),
}

type Waiter = oneshot::Sender<Result<Entry, String>>;

#[derive(Debug)]
struct State {
    index: IdIndex,
    /// Sends waiting for a pending id's append (rarely any).
    waiters: KeyMap<Vec<Waiter>>,
}

#[derive(Debug)]
pub struct Dedup {
    state: Mutex<State>,
    /// Held while runs are written: one writer, oldest frozen memtable first.
    writing: Mutex<()>,
    /// Held while runs are merged or expired.
    merging: Mutex<()>,
    /// A background write of runs is scheduled or running.
    writing_later: AtomicBool,
    /// A background merge is scheduled or running.
    merging_later: AtomicBool,
    io: Arc<dyn FileIo>,
    /// Cluster mode: ids this node claimed as a partition's leader whose proposal's outcome is
    /// unknown (not committed in time, or the group stopped), with the partition and the term
    /// it was proposed in. Pending until this node applies them (they were committed) or an
    /// entry of a later term (they never will be: see [`Dedup::applied_term`]).
    doubtful: Mutex<Vec<Doubt>>,
}

#[derive(Debug)]
struct Doubt {
    partition: u32,
    term: u64,
    keys: Vec<Key>,
}

/// Work done off the request path, one of each kind at a time per topic.
#[derive(Debug, Clone, Copy)]
pub enum Background {
    Write,
    Merge,
}

/// One message of a Send as the id check sees it.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub key: Option<Key>,
    pub partition: u32,
    pub floor: u64,
}

impl Dedup {
    /// Opens a topic's index and rebuilds what it held in memory from the logs (blocking).
    /// A replicated topic's (`replicated`) is rebuilt as its replicas apply their logs again
    /// ([`Dedup::learn`]): its logs may hold entries never committed, whose ids were never
    /// stored.
    pub fn open(
        dir: &std::path::Path,
        logs: &[&Partition],
        window_ms: u64,
        memtable_ids: usize,
        io: Arc<dyn FileIo>,
        now_ms: i64,
        replicated: bool,
    ) -> Result<Dedup> {
        let parts = logs.len() as u32;
        let mut index = IdIndex::open(dir, parts, window_ms, memtable_ids, io.as_ref())?;
        let found = if replicated {
            0
        } else {
            index.recover(logs, now_ms)?
        };
        if found > 0 {
            tracing::info!(dir = %dir.display(), ids = found, "id index rebuilt from the log");
        }
        Ok(Dedup {
            state: Mutex::new(State {
                index,
                waiters: KeyMap::default(),
            }),
            writing: Mutex::new(()),
            merging: Mutex::new(()),
            writing_later: AtomicBool::new(false),
            merging_later: AtomicBool::new(false),
            io,
            doubtful: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides, for each message, whether it is appended or answered from what is known; the
    /// ids to append become pending, held by the returned guard until a writer takes them
    /// ([`Claimed::hand_over`]) to [`Dedup::settle`] or [`Dedup::release`] them. A memtable
    /// these claims filled is frozen before the lock is let go (`ends`, the partitions' ends,
    /// asked for only then, give the watermarks), so it never holds more than one Send beyond
    /// `dedup_memtable_ids`.
    pub fn claim(
        self: &Arc<Self>,
        items: &[Item],
        now_ms: i64,
        ends: impl FnOnce() -> Vec<u64>,
    ) -> Result<Claims> {
        let mut st = self.state();
        let mut claims = Vec::with_capacity(items.len());
        for key in items.iter().take(PREFETCH_AHEAD).filter_map(|it| it.key) {
            st.index.prefetch(&key);
        }
        for (i, item) in items.iter().enumerate() {
            if let Some(ahead) = items.get(i + PREFETCH_AHEAD).and_then(|it| it.key) {
                st.index.prefetch(&ahead);
            }
            let Some(key) = item.key else {
                claims.push(Claim::New);
                continue;
            };
            match st.index.claim(key, item.partition, item.floor, now_ms) {
                Ok(Found::New) => claims.push(Claim::New),
                // (A known id repeated in this request is found known again: the same answer.)
                Ok(Found::Known(e)) => claims.push(Claim::Known(e)),
                // Pending: this request's own (an earlier repeat) or another Send's. Rare, so
                // the earlier messages are searched only then.
                Ok(Found::Pending) => match items[..i].iter().position(|it| it.key == Some(key)) {
                    Some(first) => claims.push(Claim::Repeat(first)),
                    None => {
                        let (tx, rx) = oneshot::channel();
                        st.waiters.entry(key).or_default().push(tx);
                        claims.push(Claim::Wait(rx));
                    }
                },
                Err(e) => {
                    let error = Error::from(e);
                    release_locked(&mut st, &new_keys(&claims, items), &error.to_string());
                    return Err(error);
                }
            }
        }
        let froze = st.index.full() && freeze_locked(&mut st, &ends());
        let guard = Claimed {
            dedup: Arc::clone(self),
            keys: new_keys(&claims, items),
        };
        Ok(Claims {
            each: claims,
            guard,
            froze,
        })
    }

    /// The appends of pending ids are durable at these entries: into the index, waiters woken.
    pub fn settle(&self, stored: &[(Key, Entry)]) {
        let mut st = self.state();
        for (key, entry) in stored {
            st.index.settle(*key, *entry);
        }
        if !st.waiters.is_empty() {
            for (key, entry) in stored {
                for w in st.waiters.remove(key).unwrap_or_default() {
                    let _ = w.send(Ok(*entry));
                }
            }
        }
    }

    /// Cluster mode: ids found in entries this replica applied, at these positions: into the
    /// index (see [`IdIndex::learn`]), waiters woken. Every replica learns the ids of what it
    /// applies, so whichever leads next knows them. Returns whether the memtable was frozen
    /// (`ends`, the partitions' ends, asked for only then): its run is to be written.
    pub fn learn(&self, stored: &[(Key, Entry)], ends: impl FnOnce() -> Vec<u64>) -> bool {
        let mut st = self.state();
        for (key, entry) in stored {
            st.index.learn(*key, *entry);
            if !st.waiters.is_empty() {
                for w in st.waiters.remove(key).unwrap_or_default() {
                    let _ = w.send(Ok(*entry));
                }
            }
        }
        st.index.full() && freeze_locked(&mut st, &ends())
    }

    /// Cluster mode: ids claimed for `partition` whose proposal in `term` has an unknown
    /// outcome stay pending until [`Dedup::learn`] or [`Dedup::applied_term`] decides.
    pub fn doubt(&self, partition: u32, term: u64, keys: Vec<Key>) {
        let mut doubtful = self.doubtful.lock().unwrap_or_else(|p| p.into_inner());
        doubtful.push(Doubt {
            partition,
            term,
            keys,
        });
    }

    /// Cluster mode: `partition`'s replica here applied an entry of `term`. An entry of an
    /// earlier term not applied by now never will be (a log's terms only grow, and every
    /// committed entry of an earlier term precedes it): the ids doubted in those terms and
    /// still pending are released (those that were applied are known, and stay).
    pub fn applied_term(&self, partition: u32, term: u64) {
        let released: Vec<Key> = {
            let mut doubtful = self.doubtful.lock().unwrap_or_else(|p| p.into_inner());
            if doubtful.is_empty() {
                return;
            }
            let mut released = Vec::new();
            doubtful.retain_mut(|d| {
                let over = d.partition == partition && d.term < term;
                if over {
                    released.append(&mut d.keys);
                }
                !over
            });
            released
        };
        if !released.is_empty() {
            self.release(
                &released,
                "its leader lost its term before the id's entry was committed; send again",
            );
        }
    }

    /// Pending ids that will not be stored (refused, failed or cancelled): forgotten, their
    /// waiters told why.
    pub fn release(&self, keys: &[Key], why: &str) {
        release_locked(&mut self.state(), keys, why);
    }

    fn flag(&self, task: Background) -> &AtomicBool {
        match task {
            Background::Write => &self.writing_later,
            Background::Merge => &self.merging_later,
        }
    }

    /// Takes the right to schedule `task` in the background; false if it is scheduled already.
    pub fn begin(&self, task: Background) -> bool {
        !self.flag(task).swap(true, Ordering::AcqRel)
    }

    pub fn end(&self, task: Background) {
        self.flag(task).store(false, Ordering::Release);
    }

    /// Whether frozen memtables wait to be written.
    pub fn unwritten(&self) -> bool {
        self.state().index.unwritten().is_some()
    }

    /// Whether runs wait to be merged.
    pub fn mergeable(&self) -> bool {
        self.state().index.merge_candidates().is_some()
    }

    /// Sends waiting for another's append of the same id.
    pub fn waiting(&self) -> usize {
        self.state().waiters.values().map(Vec::len).sum()
    }

    /// Counts the duplicates a Send answered (for `topics describe`).
    pub fn answered(&self, duplicates: u64) {
        self.state().index.duplicates += duplicates;
    }

    /// Freezes the memtable if anything happened since the last run (each partition's end
    /// above its watermark, or ids in memory). Returns whether it froze.
    pub fn freeze(&self, logs: &[&Partition]) -> bool {
        let ends: Vec<u64> = logs.iter().map(|l| l.high_water()).collect();
        freeze_locked(&mut self.state(), &ends)
    }

    /// Writes every frozen memtable as a run, oldest first (blocking).
    pub fn write_frozen(&self) -> Result<()> {
        let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (frozen, dir) = {
                let st = self.state();
                match st.index.unwritten() {
                    Some(f) => (f, st.index.dir().to_path_buf()),
                    None => return Ok(()),
                }
            };
            let run = frozen.write(&dir, self.io.as_ref())?;
            drop(frozen);
            self.state().index.install(run);
        }
    }

    /// Merges runs while the newest share a tier, and deletes runs wholly out of the window
    /// (blocking).
    pub fn merge(&self, now_ms: i64) -> Result<()> {
        let _one = self.merging.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (candidates, dir, window) = {
                let st = self.state();
                match st.index.merge_candidates() {
                    Some(c) => (c, st.index.dir().to_path_buf(), st.index.window_ms()),
                    None => break,
                }
            };
            let merged = ids::merge(&dir, self.io.as_ref(), &candidates, window, now_ms)?;
            self.state().index.replace(&candidates, Some(merged))?;
        }
        let mut st = self.state();
        let expired = st.index.expired_runs(now_ms);
        if !expired.is_empty() {
            st.index.replace(&expired, None)?;
        }
        Ok(())
    }

    /// Puts every settled id into a run on disk, so that the logs may be cut below
    /// [`Dedup::watermarks`], and lets go of the memtable tables if the topic is idle
    /// (blocking).
    pub fn persist(&self, logs: &[&Partition], now_ms: i64) -> Result<()> {
        self.freeze(logs);
        self.write_frozen()?;
        self.merge(now_ms)?;
        self.state().index.let_go_of_tables();
        Ok(())
    }

    /// Per partition, the offset below which the logs may be cut without forgetting an id.
    pub fn watermarks(&self) -> Vec<u64> {
        self.state().index.watermarks()
    }

    pub fn stats(&self) -> IdStats {
        self.state().index.stats()
    }
}

/// The ids of a message entry (a Raft entry's payload) whose first record took offset `base`
/// in `partition`, with their positions.
pub fn ids_in_entry(
    partition: u32,
    base: u64,
    entry: &bytes::Bytes,
) -> std::result::Result<Vec<(Key, Entry)>, &'static str> {
    let (header, records) = crate::storage::EncodedBatch::entry_records(entry)?;
    let mut stored = Vec::new();
    for r in records {
        let r = r?;
        if let Some(id) = r.id {
            let entry = Entry {
                partition,
                offset: base + (r.offset - header.base_offset),
                stored_ms: r.timestamp,
            };
            stored.push((Key::of(&id), entry));
        }
    }
    Ok(stored)
}

/// Writes a topic's frozen memtables as runs, then merges runs, off the request path: one
/// writer and one merger per topic, so a long merge never holds up the next write. `data` (the
/// data directory) stays locked while its files are written, even if the broker is dropped
/// meanwhile.
pub fn write_later(
    dedup: &Arc<Dedup>,
    name: &Arc<str>,
    tasks: &TaskTracker,
    data: Arc<crate::storage::DataDir>,
) {
    if !dedup.begin(Background::Write) {
        return;
    }
    let (dedup, name, merges) = (Arc::clone(dedup), Arc::clone(name), tasks.clone());
    tasks.spawn_blocking(move || {
        loop {
            let written = dedup.write_frozen();
            dedup.end(Background::Write);
            if let Err(e) = written {
                // Frozen memtables stay in memory (and are looked up) until a write works.
                tracing::error!(topic = %name, error = %e, "writing the id index failed; retried at the next write");
                break;
            }
            // A memtable frozen after the write looked is written now, by this task.
            if !dedup.unwritten() || !dedup.begin(Background::Write) {
                break;
            }
        }
        if dedup.mergeable() && dedup.begin(Background::Merge) {
            merges.spawn_blocking(move || {
                if let Err(e) = dedup.merge(super::clock::now_ms()) {
                    tracing::error!(topic = %name, error = %e, "merging the id index failed");
                }
                dedup.end(Background::Merge);
                drop(data);
            });
        }
    });
}

/// The ids of `items` that `claims` made pending.
fn new_keys(claims: &[Claim], items: &[Item]) -> Vec<Key> {
    claims
        .iter()
        .zip(items)
        .filter(|(c, _)| matches!(c, Claim::New))
        .filter_map(|(_, it)| it.key)
        .collect()
}

fn freeze_locked(st: &mut State, ends: &[u64]) -> bool {
    if !st.index.behind(ends) {
        return false;
    }
    st.index.freeze(ends);
    true
}

fn release_locked(st: &mut State, keys: &[Key], why: &str) {
    for key in keys {
        st.index.release(key);
        for w in st.waiters.remove(key).unwrap_or_default() {
            let _ = w.send(Err(why.to_string()));
        }
    }
}

/// What [`Dedup::claim`] decided for one Send.
#[derive(Debug)]
pub struct Claims {
    /// Per message.
    pub each: Vec<Claim>,
    /// The ids made pending.
    pub guard: Claimed,
    /// Whether the memtable was frozen: its run is to be written.
    pub froze: bool,
}

/// Pending ids of one Send not yet handed to a writer: released if the Send stops before.
#[derive(Debug)]
pub struct Claimed {
    dedup: Arc<Dedup>,
    keys: Vec<Key>,
}

impl Claimed {
    /// Every key is now a writer's to settle or release.
    pub fn hand_over(mut self) {
        self.keys.clear();
    }

    /// Releases what is left now, telling waiters why.
    pub fn release(mut self, why: &str) {
        self.dedup.release(&std::mem::take(&mut self.keys), why);
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if !self.keys.is_empty() {
            self.dedup.release(
                &self.keys,
                "the Send that carried this id stopped before storing it",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ids::testing::{entry, key};
    use crate::storage::io::RealIo;

    fn dedup(dir: &std::path::Path) -> Arc<Dedup> {
        Arc::new(Dedup::open(dir, &[], 1_000_000, 64, Arc::new(RealIo), 0, true).unwrap())
    }

    fn claim(d: &Arc<Dedup>, i: u64) -> Claim {
        let items = [Item {
            key: Some(key(i)),
            partition: 0,
            floor: 0,
        }];
        let mut c = d.claim(&items, 1, Vec::new).unwrap();
        c.guard.hand_over();
        c.each.remove(0)
    }

    /// Cluster mode: ids whose proposal's outcome is unknown stay pending (a retry waits)
    /// until the replica applies them (known) or an entry of a later term (released: sent
    /// again, they are new). An entry of the same term, or another partition's, decides
    /// nothing.
    #[test]
    fn doubted_ids_stay_pending_until_applied_or_a_later_term_is() {
        let dir = tempfile::tempdir().unwrap();
        let d = dedup(dir.path());
        for i in 1..=3 {
            assert!(matches!(claim(&d, i), Claim::New));
        }
        d.doubt(0, 5, vec![key(1), key(2)]);
        d.doubt(1, 5, vec![key(3)]);
        d.applied_term(0, 5);
        d.applied_term(2, 9);
        let Claim::Wait(waiting) = claim(&d, 1) else {
            panic!("a doubted id is pending");
        };
        // Id 2's entry was committed after all: applied, it is known, at its position.
        d.learn(&[(key(2), entry(2, 1))], Vec::new);
        d.applied_term(0, 6);
        assert!(matches!(claim(&d, 2), Claim::Known(e) if e == entry(2, 1)));
        // Id 1's never will be: released, its waiter told, and sent again it is new.
        assert!(waiting.blocking_recv().unwrap().is_err());
        assert!(matches!(claim(&d, 1), Claim::New));
        // Partition 1's doubt is its own: still pending.
        assert!(matches!(claim(&d, 3), Claim::Wait(_)));
        d.applied_term(1, 6);
        assert!(matches!(claim(&d, 3), Claim::New));
    }
}
