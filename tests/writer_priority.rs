//! Writer pool threads run below the broker's priority (`LogConfig::writer_nice`), except
//! while they serve a lone producer.
//! In a test binary of its own: it looks at every thread of the process.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use std::sync::Arc;

use common::small_config;
use sluice::storage::{FsyncPolicy, LogConfig, Partition, RealIo, WriterPool};

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
fn pool_threads_run_below_the_broker_priority_by_the_configured_amount() {
    let base = nice_of(Path::new("/proc/thread-self"));
    let dir = tempfile::tempdir().unwrap();
    let config = |writer_nice| LogConfig {
        writer_nice,
        // Every round counts as following the previous one closely (see below).
        writer_spin_us: 600_000_000,
        ..small_config(FsyncPolicy::Always)
    };
    let before = writer_nice_values();
    // A pool of one thread, so that every partition below is served by the same thread.
    let pool = WriterPool::new(1).unwrap();
    let open = |name: &str, nice| {
        Partition::open_in(
            &pool,
            &dir.path().join(name),
            config(nice),
            Arc::new(RealIo),
            None,
        )
        .unwrap()
    };
    let new_writer = || {
        let after = writer_nice_values();
        let new: Vec<(u32, i32)> = after
            .into_iter()
            .filter(|(tid, _)| !before.contains_key(tid))
            .collect();
        assert_eq!(new.len(), 1, "one thread in the new pool: {new:?}");
        new[0].1
    };

    let kept = open("kept", 0);
    kept.append_blocking(&[common::record(0, 10)]).unwrap();
    assert_eq!(new_writer(), base, "writer_nice = 0 keeps the priority");

    // The thread takes the priority of the partition it serves; an acknowledged append means
    // it has.
    let lowered = open("lowered", 7);
    lowered.append_blocking(&[common::record(0, 10)]).unwrap();
    assert_eq!(new_writer(), (base + 7).min(19));

    // One append at a time, each right after the previous answer: a lone producer, whose Send
    // polls for its answer on a worker thread. The writer serves it at the broker's priority.
    for seq in 1..5 {
        lowered.append_blocking(&[common::record(seq, 10)]).unwrap();
    }
    assert!(lowered.lone_sync_time().is_some());
    assert_eq!(new_writer(), base);
    // Dropping the partition ends the writer's wait for that producer's next append.
    drop((kept, lowered));
}
