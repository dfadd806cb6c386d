//! Partition writer threads run below the broker's priority (`LogConfig::writer_nice`), except
//! while they serve a lone producer.
//! In a test binary of its own: it looks at every thread of the process.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{open, small_config};
use sluice::storage::{FsyncPolicy, LogConfig};

/// Nice value of every partition writer thread of this process, by thread id.
fn writer_nice_values() -> BTreeMap<u32, i32> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = entry.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if !comm.starts_with("sluice-writer") {
            continue;
        }
        let tid = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
        found.insert(tid, nice_of(&dir));
    }
    found
}

/// The nice value in a `/proc/.../task/<tid>` (or `/proc/thread-self`) directory's `stat`.
fn nice_of(task: &Path) -> i32 {
    let stat = std::fs::read_to_string(task.join("stat")).unwrap();
    // Fields after the parenthesised name: state is field 3, nice field 19.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(16).unwrap().parse().unwrap()
}

#[test]
fn writer_threads_run_below_the_broker_priority_by_the_configured_amount() {
    let base = nice_of(Path::new("/proc/thread-self"));
    let dir = tempfile::tempdir().unwrap();
    let config = |writer_nice| LogConfig {
        writer_nice,
        // Every round counts as following the previous one closely (see below).
        writer_spin_us: 600_000_000,
        ..small_config(FsyncPolicy::Always)
    };

    let kept = open(&dir.path().join("kept"), config(0));
    kept.append_blocking(&[common::record(0, 10)]).unwrap();
    let before = writer_nice_values();
    assert_eq!(
        before.values().copied().collect::<Vec<_>>(),
        [base],
        "writer_nice = 0 keeps the priority"
    );

    let lowered = open(&dir.path().join("lowered"), config(7));
    // The writer lowers itself when it starts; an acknowledged append means it has.
    lowered.append_blocking(&[common::record(0, 10)]).unwrap();
    let after = writer_nice_values();
    let new: Vec<u32> = after
        .keys()
        .filter(|tid| !before.contains_key(tid))
        .copied()
        .collect();
    assert_eq!(new.len(), 1, "one new writer thread");
    let tid = new[0];
    assert_eq!(after[&tid], (base + 7).min(19));

    // One append at a time, each right after the previous answer: a lone producer, whose Send
    // polls for its answer on a worker thread. The writer serves it at the broker's priority.
    for seq in 1..5 {
        lowered.append_blocking(&[common::record(seq, 10)]).unwrap();
    }
    assert!(lowered.lone_sync_time().is_some());
    assert_eq!(writer_nice_values()[&tid], base);
    drop((kept, lowered));
}
