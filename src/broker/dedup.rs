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
    pub fn open(
        dir: &std::path::Path,
        logs: &[&Partition],
        window_ms: u64,
        memtable_ids: usize,
        io: Arc<dyn FileIo>,
        now_ms: i64,
    ) -> Result<Dedup> {
        let parts = logs.len() as u32;
        let mut index = IdIndex::open(dir, parts, window_ms, memtable_ids, io.as_ref())?;
        let found = index.recover(logs, now_ms)?;
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
