//! Merging runs: four runs of one tier become one run of the next (size-tiered), keeping the
//! newest entry per key and dropping those out of the window.

use std::path::Path;
use std::sync::Arc;

use super::key::{Entry, Key};
use super::run::{self, Run};
use crate::storage::error::{Error, Result};
use crate::storage::io::FileIo;

/// Runs of one tier that are merged into one run of the next.
pub const MERGE_FAN_IN: usize = 4;

/// Merges `runs` (oldest first) into one run of the next tier in `dir`, keeping the newest entry
/// per key and dropping those out of the window at `now_ms`.
pub fn merge(
    dir: &Path,
    io: &dyn FileIo,
    runs: &[Arc<Run>],
    window_ms: u64,
    now_ms: i64,
) -> Result<Run> {
    let mut sources = runs
        .iter()
        .map(|r| r.entries())
        .collect::<Result<Vec<_>>>()?;
    let upper: u64 = runs.iter().map(|r| r.count()).sum();
    let Some(newest) = runs.iter().max_by_key(|r| r.hi()) else {
        return Err(Error::corrupt(dir, 0, "merge of no runs"));
    };
    let spec = run::Spec {
        lo: runs.iter().map(|r| r.lo()).min().unwrap_or(0),
        hi: newest.hi(),
        tier: runs.iter().map(|r| r.tier()).max().unwrap_or(0) + 1,
        watermarks: newest.watermarks(),
    };
    let mut failed: Option<Error> = None;
    let mut heads: Vec<Option<(Key, Entry)>> = Vec::with_capacity(sources.len());
    for s in &mut sources {
        heads.push(s.next().transpose()?);
    }
    let merged = std::iter::from_fn(|| {
        loop {
            // The smallest key among the heads; on a tie the newest run (last) wins.
            let mut best: Option<(Key, Entry)> = None;
            for (k, e) in heads.iter().flatten() {
                if best.is_none_or(|(b, _)| *k <= b) {
                    best = Some((*k, *e));
                }
            }
            let (key, entry) = best?;
            for (head, source) in heads.iter_mut().zip(&mut sources) {
                if head.is_some_and(|(k, _)| k == key) {
                    match source.next().transpose() {
                        Ok(next) => *head = next,
                        Err(e) => {
                            failed = Some(e);
                            return None;
                        }
                    }
                }
            }
            if entry.live(now_ms, window_ms) {
                return Some((key, entry));
            }
        }
    });
    let run = run::write(dir, io, &spec, upper, merged)?;
    match failed {
        Some(e) => {
            let _ = std::fs::remove_file(run.path());
            Err(e)
        }
        None => Ok(run),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::index::IdIndex;
    use super::super::testing::{entry, key, run_of};
    use super::*;
    use crate::storage::io::RealIo;

    #[test]
    fn merge_keeps_the_newest_entry_per_key_and_drops_those_out_of_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let window = 1000;
        // Key i is in runs 0..=i%4; run r stores it at time 100 * (r + 1) + i.
        let runs: Vec<Arc<Run>> = (0..4u64)
            .map(|r| {
                let ids = (0..400u64)
                    .filter(move |i| i % 4 >= r)
                    .map(move |i| (i, 100 * (r as i64 + 1) + i as i64));
                Arc::new(run_of(dir.path(), r, ids))
            })
            .collect();
        let now = 1000 + 250; // entries stored before 250 are out of the window
        let merged = merge(dir.path(), &RealIo, &runs, window, now).unwrap();
        assert_eq!((merged.lo(), merged.hi(), merged.tier()), (0, 3, 1));
        assert_eq!(merged.watermarks(), runs[3].watermarks());
        for i in 0..400u64 {
            let newest = (i % 4) as i64;
            let stored = 100 * (newest + 1) + i as i64;
            let want = (stored > 250).then(|| entry(i, stored));
            assert_eq!(merged.get(&key(i)).unwrap(), want, "key {i}");
        }
    }

    #[test]
    fn opening_after_an_interrupted_merge_keeps_one_copy_of_every_id() {
        let dir = tempfile::tempdir().unwrap();
        let io = RealIo;
        for r in 0..4u64 {
            run_of(dir.path(), r, (r * 10..r * 10 + 10).map(|i| (i, 5)));
        }
        let mut index = IdIndex::open(dir.path(), 3, 1000, 16, &io).unwrap();
        let runs = index.merge_candidates().unwrap();
        let saved: Vec<(PathBuf, Vec<u8>)> = runs
            .iter()
            .map(|r| (r.path().to_path_buf(), std::fs::read(r.path()).unwrap()))
            .collect();
        let merged = merge(dir.path(), &io, &runs, 1000, 10).unwrap();
        index.replace(&runs, Some(merged)).unwrap();
        assert_eq!(index.stats().runs, 1);
        // A crash after the merged run was renamed in, before its inputs were deleted, and a
        // temp file of another merge.
        for (path, bytes) in &saved {
            std::fs::write(path, bytes).unwrap();
        }
        std::fs::write(dir.path().join("x.run.tmp"), b"partial").unwrap();
        let index = IdIndex::open(dir.path(), 3, 1000, 16, &io).unwrap();
        assert_eq!(index.stats().runs, 1);
        assert_eq!(index.stats().on_disk, 40);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1);
        for i in 0..40 {
            assert_eq!(index.get(&key(i)).unwrap(), Some(entry(i, 5)));
        }
    }
}
