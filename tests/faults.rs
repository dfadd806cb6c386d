//! Every call that changes a file goes through the `FileIo` seam; each new fault point has its
//! outcome here: a failed write that was cut back lets the partition go on (nothing it wrote
//! survives, the next append lands where it would have), a failed cut latches the partition, a
//! failed index growth fails only that append, a failed index sync fails the close and leaves
//! the partition to recover. After each, a reopen reads exactly the acknowledged records.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::common::{FaultyIo, append_each, assert_records, read_all, record, small_config};
use sluice::storage::{Error, FsyncPolicy, Partition, RealIo, Record};

fn open_with(dir: &std::path::Path, io: Arc<FaultyIo>) -> Partition {
    Partition::open(dir, small_config(FsyncPolicy::Always), io, None).unwrap()
}

fn reopen_real(dir: &std::path::Path) -> Partition {
    Partition::open(
        dir,
        small_config(FsyncPolicy::Always),
        Arc::new(RealIo),
        None,
    )
    .unwrap()
}

struct Case {
    name: &'static str,
    /// Faults switched on for one append.
    faults: &'static [fn(&FaultyIo) -> &AtomicBool],
    /// Reopen (cleanly closed) before the faulty append, so that it is the first write.
    first_write: bool,
    /// The partition refuses later appends.
    latches: bool,
}

#[test]
fn each_fault_point_fails_only_what_it_must_and_a_reopen_reads_what_was_acknowledged() {
    let cases = [
        Case {
            name: "short write, cut back",
            faults: &[|io| &io.short_write],
            first_write: false,
            latches: false,
        },
        Case {
            name: "ENOSPC write",
            faults: &[|io| &io.enospc],
            first_write: false,
            latches: false,
        },
        Case {
            name: "short write whose cut fails",
            faults: &[|io| &io.short_write, |io| &io.fail_set_len],
            first_write: false,
            latches: true,
        },
        Case {
            name: "index growth on the first write after a clean open",
            faults: &[|io| &io.fail_set_len],
            first_write: true,
            latches: false,
        },
    ];
    for case in &cases {
        let dir = tempfile::tempdir().unwrap();
        let io = FaultyIo::new();
        let p = open_with(dir.path(), Arc::clone(&io));
        let mut acked: Vec<Record> = append_each(&p, (0..20).map(|i| record(i, 100)));
        let p = if case.first_write {
            p.close().unwrap();
            drop(p);
            open_with(dir.path(), Arc::clone(&io))
        } else {
            p
        };
        for f in case.faults {
            f(&io).store(true, Ordering::SeqCst);
        }
        let err = p.append_blocking(&[record(100, 100)]).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{}: {err}", case.name);
        for f in case.faults {
            f(&io).store(false, Ordering::SeqCst);
        }
        assert_eq!(p.is_poisoned(), case.latches, "{}", case.name);
        let next = p.append_blocking(&[record(101, 100)]);
        if case.latches {
            assert!(matches!(next, Err(Error::Poisoned { .. })), "{}", case.name);
        } else {
            // The failed append left nothing behind: the next one takes its offset.
            assert_eq!(next.unwrap().base_offset, 20, "{}", case.name);
            acked.push(record(101, 100));
        }
        assert_records(&read_all(&p), &acked, 0);
        // A crash now (no close), then a reopen: exactly the acknowledged records.
        drop(p);
        let p = reopen_real(dir.path());
        assert_records(&read_all(&p), &acked, 0);
        assert_eq!(
            p.append_blocking(&[record(102, 100)]).unwrap().base_offset,
            acked.len() as u64,
            "{}",
            case.name
        );
    }
}

#[test]
fn a_failed_index_sync_fails_the_close_and_the_next_open_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let p = open_with(dir.path(), Arc::clone(&io));
    let acked = append_each(&p, (0..50).map(|i| record(i, 100)));
    io.fail_index_sync.store(true, Ordering::SeqCst);
    let err = p.close().unwrap_err();
    assert!(err.to_string().contains("index"), "{err}");
    drop(p);
    let p = reopen_real(dir.path());
    assert!(
        !p.recovery_report().clean,
        "no clean marker without synced indexes"
    );
    assert_records(&read_all(&p), &acked, 0);
}

#[test]
fn a_partition_opened_and_closed_cleanly_without_a_write_changes_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = reopen_real(dir.path());
    let acked = append_each(&p, (0..30).map(|i| record(i, 100)));
    p.close().unwrap();
    drop(p);
    let snapshot = || {
        let mut files: Vec<(String, u64, std::time::SystemTime)> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.len(),
                    m.modified().unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    let before = snapshot();
    let io = FaultyIo::new();
    let p = open_with(dir.path(), Arc::clone(&io));
    assert!(p.recovery_report().clean);
    assert_records(&read_all(&p), &acked, 0);
    p.close().unwrap();
    drop(p);
    assert_eq!(io.ops.load(Ordering::SeqCst), 0, "no write, sync or rename");
    assert_eq!(snapshot(), before);
}
