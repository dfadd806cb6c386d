//! Partition writer threads run below the broker's priority (`LogConfig::writer_nice`).
//! In a test binary of its own: it looks at every thread of the process.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

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
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the parenthesised name: state is field 3, nice field 19.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let nice: i32 = after_name.split(' ').nth(16).unwrap().parse().unwrap();
        let tid = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
        found.insert(tid, nice);
    }
    found
}

fn own_nice() -> i32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(16).unwrap().parse().unwrap()
}

#[test]
fn writer_threads_run_below_the_broker_priority_by_the_configured_amount() {
    let base = own_nice();
    let dir = tempfile::tempdir().unwrap();
    let config = |writer_nice| LogConfig {
        writer_nice,
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
    let new: Vec<i32> = after
        .iter()
        .filter(|(tid, _)| !before.contains_key(tid))
        .map(|(_, &nice)| nice)
        .collect();
    assert_eq!(new, [(base + 7).min(19)]);
    drop((kept, lowered));
}
