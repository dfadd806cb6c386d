//! The partition log as its users see it: appends, reads, rolls, reopen, time lookups,
//! retention, group commit and injected I/O faults.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{FaultyIo, assert_records, open, read_all, record, small_config};
use sluice::storage::{
    AppendMode, EncodedBatch, Error, FsyncPolicy, LogConfig, Partition, Record, WriterPool,
};

#[test]
fn appended_batches_read_back_in_order_across_rolls_and_a_clean_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path(), small_config(FsyncPolicy::Always));
    let mut want = Vec::new();
    for b in 0..40u64 {
        let batch: Vec<Record> = (0..10).map(|i| record(b * 10 + i, 300)).collect();
        let appended = p.append_blocking(&batch).unwrap();
        assert_eq!(appended.base_offset, b * 10);
        assert_eq!(appended.last_offset, b * 10 + 9);
        // Acknowledged under `always` means synced, and so visible, also right after a roll.
        assert_eq!(p.high_water(), appended.last_offset + 1, "batch {b}");
        want.extend(batch);
    }
    assert!(p.stats().segments > 1, "64 KiB segments must have rolled");
    assert_eq!(p.high_water(), 400);
    assert_records(&read_all(&p), &want, 0);
    p.close().unwrap();

    let p = open(dir.path(), small_config(FsyncPolicy::Always));
    assert!(p.recovery_report().clean, "a clean close needs no recovery");
    assert_eq!(p.recovery_report().scanned_bytes, 0);
    assert_records(&read_all(&p), &want, 0);
    assert_eq!(
        p.append_blocking(&[record(400, 10)]).unwrap().base_offset,
        400
    );
}

#[test]
fn reading_from_any_offset_starts_with_that_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path(), small_config(FsyncPolicy::Never));
    for b in 0..30u64 {
        let batch: Vec<Record> = (0..7)
            .map(|i| record(b * 7 + i, 100 + i as usize * 40))
            .collect();
        p.append_blocking(&batch).unwrap();
    }
    for from in 0..p.high_water() {
        let batches = p.read(from, 1).unwrap();
        let first = batches[0]
            .records()
            .map(|r| r.unwrap())
            .find(|r| r.offset >= from)
            .unwrap();
        assert_eq!(first.offset, from);
    }
    assert!(p.read(p.high_water(), 1024).unwrap().is_empty());
    assert!(matches!(
        p.read(p.high_water() + 1, 1024),
        Err(Error::OffsetOutOfRange { .. })
    ));
}

#[test]
fn timestamp_lookup_finds_the_first_record_at_or_after_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path(), small_config(FsyncPolicy::Never));
    // Timestamps that go back and forth, as producers' clocks do.
    let stamps: Vec<i64> = (0..600)
        .map(|i| 1000 + (i * 37 % 101) * 10 + i / 3)
        .collect();
    for chunk in stamps.chunks(6) {
        let batch: Vec<Record> = chunk
            .iter()
            .map(|&ts| Record {
                timestamp: ts,
                value: Some(bytes::Bytes::from(vec![7u8; 200])),
                ..Record::default()
            })
            .collect();
        p.append_blocking(&batch).unwrap();
    }
    assert!(p.stats().segments > 1);
    for t in (900..2300).step_by(7) {
        let expect = stamps.iter().position(|&ts| ts >= t).map(|i| i as u64);
        assert_eq!(p.offset_for_timestamp(t).unwrap(), expect, "timestamp {t}");
    }
}

#[test]
fn retention_deletes_whole_closed_segments_below_an_offset_but_never_the_active_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path(), small_config(FsyncPolicy::Never));
    for i in 0..200 {
        p.append_blocking(&[record(i, 2000)]).unwrap();
    }
    let bases = p.segment_bases();
    assert!(bases.len() >= 3);
    let deleted = p.delete_segments_below(bases[2]).unwrap();
    assert_eq!(deleted, 2);
    assert_eq!(p.log_start(), bases[2]);
    assert!(matches!(p.read(0, 10), Err(Error::OffsetOutOfRange { .. })));
    assert_eq!(read_all(&p).first().unwrap().offset, bases[2]);
    // Asking for everything still keeps the active segment.
    p.delete_segments_below(u64::MAX).unwrap();
    assert_eq!(p.segment_bases(), vec![*bases.last().unwrap()]);
    p.close().unwrap();
    let p = open(dir.path(), small_config(FsyncPolicy::Never));
    assert_eq!(p.log_start(), *bases.last().unwrap());
    assert_eq!(p.high_water(), 200);
}

#[test]
fn empty_and_oversize_batches_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        max_batch_bytes: 4096,
        ..small_config(FsyncPolicy::Always)
    };
    let p = open(dir.path(), config);
    p.append_blocking(&[record(0, 10)]).unwrap();
    assert!(matches!(p.append_blocking(&[]), Err(Error::EmptyBatch)));
    assert!(matches!(
        p.append_blocking(&[record(1, 5000)]),
        Err(Error::BatchTooLarge { .. })
    ));
    assert_eq!(p.high_water(), 1);
    assert_eq!(p.append_blocking(&[record(1, 10)]).unwrap().base_offset, 1);
}

#[test]
fn concurrent_appenders_share_fsyncs_and_every_acknowledged_batch_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let config = LogConfig {
        segment_bytes: 64 << 20,
        ..LogConfig::default()
    };
    let p = Arc::new(Partition::open(dir.path(), config, io.clone(), None).unwrap());
    let syncs_before = p.stats().syncs;
    let threads = 64;
    let per_thread = 40;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let p = Arc::clone(&p);
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|i| {
                        let rec = record(t * 1000 + i, 1024);
                        let a = p.append_blocking(std::slice::from_ref(&rec)).unwrap();
                        (a.base_offset, rec)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked: Vec<(u64, Record)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    acked.sort_by_key(|(o, _)| *o);
    let appends = threads * per_thread;
    assert_eq!(acked.len() as u64, appends);
    let offsets: Vec<u64> = acked.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (0..appends).collect::<Vec<_>>(),
        "offsets are dense and unique"
    );
    let want: Vec<Record> = acked.into_iter().map(|(_, r)| r).collect();
    assert_records(&read_all(&p), &want, 0);
    let syncs = p.stats().syncs - syncs_before;
    assert!(syncs >= 1);
    assert!(
        syncs * 4 <= appends,
        "group commit: {syncs} fsyncs for {appends} appends"
    );
    assert!(io.syncs.load(Ordering::SeqCst) >= syncs);
}

#[test]
fn a_failed_fsync_fails_the_append_and_latches_the_partition_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let config = small_config(FsyncPolicy::Always);
    let p = Partition::open(dir.path(), config.clone(), io.clone(), None).unwrap();
    p.append_blocking(&[record(0, 100)]).unwrap();
    io.fail_sync.store(true, Ordering::SeqCst);
    let err = p.append_blocking(&[record(1, 100)]).unwrap_err();
    assert!(matches!(err, Error::SyncFailed { .. }), "{err}");
    assert!(p.is_poisoned());
    assert_eq!(p.high_water(), 1, "the unsynced batch is not visible");
    // The disk "recovers", but a retried fsync proves nothing: writes stay refused.
    io.fail_sync.store(false, Ordering::SeqCst);
    assert!(matches!(
        p.append_blocking(&[record(2, 100)]),
        Err(Error::Poisoned { .. })
    ));
    drop(p);
    let p = Partition::open(dir.path(), config, io, None).unwrap();
    assert!(!p.is_poisoned());
    let all = read_all(&p);
    assert_eq!(
        all[0].value,
        record(0, 100).value,
        "the acknowledged record survives"
    );
    let next = p.high_water();
    assert_eq!(
        p.append_blocking(&[record(9, 100)]).unwrap().base_offset,
        next
    );
}

#[test]
fn disk_full_is_a_clear_error_that_acknowledges_nothing_and_leaves_the_log_intact() {
    for short_write in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let io = FaultyIo::new();
        let config = small_config(FsyncPolicy::Always);
        let p = Partition::open(dir.path(), config.clone(), io.clone(), None).unwrap();
        let want: Vec<Record> = (0..5).map(|i| record(i, 500)).collect();
        for r in &want {
            p.append_blocking(std::slice::from_ref(r)).unwrap();
        }
        let flag = if short_write {
            &io.short_write
        } else {
            &io.enospc
        };
        flag.store(true, Ordering::SeqCst);
        let err = p.append_blocking(&[record(5, 500)]).unwrap_err();
        assert!(err.is_storage_full(), "{err}");
        assert!(
            !p.is_poisoned(),
            "a failed write that was cut back does not latch"
        );
        assert_eq!(p.high_water(), 5);
        assert_records(&read_all(&p), &want, 0);
        flag.store(false, Ordering::SeqCst);
        // Space is back: appends continue with dense offsets.
        assert_eq!(p.append_blocking(&[record(5, 500)]).unwrap().base_offset, 5);
        drop(p);
        let p = Partition::open(dir.path(), config, io, None).unwrap();
        let mut want = want;
        want.push(record(5, 500));
        assert_records(&read_all(&p), &want, 0);
    }
}

#[test]
fn interval_and_never_policies_acknowledge_without_waiting_for_a_sync() {
    for fsync in [FsyncPolicy::Interval, FsyncPolicy::Never] {
        let dir = tempfile::tempdir().unwrap();
        let io = FaultyIo::new();
        let config = LogConfig {
            fsync,
            fsync_interval_ms: 60_000,
            ..small_config(fsync)
        };
        let p = Partition::open(dir.path(), config.clone(), io.clone(), None).unwrap();
        let syncs = p.stats().syncs;
        for i in 0..20 {
            p.append_blocking(&[record(i, 100)]).unwrap();
        }
        assert_eq!(p.stats().syncs, syncs, "{fsync:?} synced per append");
        p.close().unwrap();
        let p = Partition::open(dir.path(), config, io, None).unwrap();
        assert_eq!(p.high_water(), 20);
    }
}

#[test]
fn a_segment_rolls_once_its_first_record_is_segment_ms_old() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_ms: 1000,
        ..small_config(FsyncPolicy::Always)
    };
    let p = open(dir.path(), config);
    let at = |ts: i64| Record {
        timestamp: ts,
        value: Some(bytes::Bytes::from_static(b"v")),
        ..Record::default()
    };
    p.append_blocking(&[at(10_000)]).unwrap();
    p.append_blocking(&[at(10_999)]).unwrap();
    assert_eq!(p.segment_bases(), vec![0]);
    p.append_blocking(&[at(11_000)]).unwrap();
    assert_eq!(p.segment_bases(), vec![0, 2]);
}

#[test]
fn the_interval_policy_syncs_on_its_timer_without_further_appends() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let config = LogConfig {
        // Long enough that the append below comes well before it, even on a loaded machine.
        fsync_interval_ms: 3000,
        ..small_config(FsyncPolicy::Interval)
    };
    let p = Partition::open(dir.path(), config, io.clone(), None).unwrap();
    let before = p.stats().syncs;
    p.append_blocking(&[record(0, 10)]).unwrap();
    assert_eq!(p.stats().syncs, before, "acknowledged before any sync");
    // Wait (bounded) for the writer's timer to fire; the assertion is that it does at all.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while p.stats().syncs == before && std::time::Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(10));
    }
    assert!(
        p.stats().syncs > before,
        "no sync within 20 s of a 1 s interval"
    );
}

#[test]
fn a_writer_polling_for_a_lone_appender_still_stops_like_a_crash_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        // A window far longer than the test: if dropping did not end the poll, `drop` would hang.
        writer_spin_us: 600_000_000,
        ..small_config(FsyncPolicy::Always)
    };
    let p = open(dir.path(), config.clone());
    let mut want = Vec::new();
    // One append at a time, each right after the previous acknowledgement: the writer polls.
    for seq in 0..50 {
        let r = record(seq, 100);
        assert_eq!(
            p.append_blocking(std::slice::from_ref(&r))
                .unwrap()
                .base_offset,
            seq
        );
        assert_eq!(
            p.high_water(),
            seq + 1,
            "acknowledged means durable and visible"
        );
        want.push(r);
    }
    assert!(
        p.lone_sync_time().is_some(),
        "a writer serving one appender at a time says so (the broker then polls for its answer)"
    );
    let (dropped_tx, dropped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(p);
        let _ = dropped_tx.send(());
    });
    dropped
        .recv_timeout(Duration::from_secs(60))
        .expect("dropping the partition must end its writer's poll at once");
    let p = open(dir.path(), config);
    assert!(!p.recovery_report().clean, "a drop is not a clean close");
    assert_records(&read_all(&p), &want, 0);
}

#[test]
fn a_writer_that_batches_appends_stops_calling_itself_lone() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let config = LogConfig {
        writer_spin_us: 600_000_000,
        ..small_config(FsyncPolicy::Always)
    };
    let p = Partition::open(dir.path(), config, io.clone(), None).unwrap();
    assert_eq!(p.lone_sync_time(), None, "no appends yet");
    for seq in 0..5 {
        p.append_blocking(&[record(seq, 100)]).unwrap();
    }
    assert!(p.lone_sync_time().is_some());

    // Hold the next sync: the appends queued meanwhile are taken in one round.
    let gate = io.sync_gate.write().unwrap();
    let (done_tx, done) = std::sync::mpsc::channel();
    for seq in 5..8 {
        let done_tx = done_tx.clone();
        p.append(
            EncodedBatch::new(&[record(seq, 100)]),
            AppendMode::DURABLE,
            Box::new(move |r| done_tx.send(r.map(|a| a.base_offset)).unwrap()),
        );
    }
    drop(gate);
    let mut offsets: Vec<u64> = (0..3).map(|_| done.recv().unwrap().unwrap()).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, [5, 6, 7]);
    assert_eq!(
        p.lone_sync_time(),
        None,
        "a round of several appends is not a lone producer's"
    );
}

/// Where an append's completion ran, and with what.
type Done = std::sync::mpsc::Receiver<(std::thread::ThreadId, Option<String>, u64)>;

/// [`Partition::append_here_when_quiet`] of one record: the receiver hears the completion's
/// thread (id and name) and the offset; the flag says whether the completion ran on the calling
/// thread before the call returned.
fn append_here(p: &Partition, rec: &Record, max_sync: Duration) -> (Done, bool) {
    let (tx, rx) = std::sync::mpsc::channel();
    p.append_here_when_quiet(
        EncodedBatch::new(std::slice::from_ref(rec)),
        AppendMode::DURABLE,
        max_sync,
        Box::new(move |r| {
            let t = std::thread::current();
            tx.send((t.id(), t.name().map(str::to_owned), r.unwrap().base_offset))
                .unwrap();
        }),
    );
    match rx.try_recv() {
        Ok(done) => {
            let here = done.0 == std::thread::current().id();
            let (tx, rx) = std::sync::mpsc::channel();
            tx.send(done).unwrap();
            (rx, here)
        }
        Err(_) => (rx, false),
    }
}

#[test]
fn a_lone_appender_is_served_on_its_own_thread_while_the_writers_sleep_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let pool = WriterPool::new(1).unwrap();
    let config = small_config(FsyncPolicy::Always);
    let p = Partition::open_in(&pool, dir.path(), config.clone(), io.clone(), None).unwrap();
    let syncs_before = io.syncs.load(Ordering::SeqCst);
    let want: Vec<Record> = (0..100).map(|i| record(i, 300)).collect();
    let mut here = Vec::new();
    for (i, rec) in want.iter().enumerate() {
        let (done, served_here) = append_here(&p, rec, Duration::from_secs(1));
        let (_, _, offset) = done.recv().unwrap();
        assert_eq!(offset, i as u64);
        here.push(served_here);
        // Acknowledged means durable and visible, whoever wrote it.
        assert_eq!(p.high_water(), i as u64 + 1);
    }
    // The pool's one thread sleeps once it has started: from then on, every append is served
    // by its caller (one sync each: nothing else shares it).
    let first = here
        .iter()
        .position(|&h| h)
        .expect("no append served by its caller");
    assert!(here[first..].iter().all(|&h| h), "{here:?}");
    assert!(io.syncs.load(Ordering::SeqCst) - syncs_before >= 100);
    assert_records(&read_all(&p), &want, 0);
    drop(p);
    let p = Partition::open_in(&pool, dir.path(), config, io, None).unwrap();
    assert_records(&read_all(&p), &want, 0);
}

#[test]
fn an_append_is_queued_for_the_writers_unless_they_sleep_and_its_partition_syncs_fast_enough() {
    let dir = tempfile::tempdir().unwrap();
    let (slow_io, io) = (FaultyIo::new(), FaultyIo::new());
    let pool = WriterPool::new(1).unwrap();
    let config = small_config(FsyncPolicy::Always);
    let open = |name: &str, io: &Arc<FaultyIo>| {
        let io: Arc<FaultyIo> = Arc::clone(io);
        Partition::open_in(&pool, &dir.path().join(name), config.clone(), io, None).unwrap()
    };
    let (busy, p) = (open("busy", &slow_io), open("p", &io));
    // The writer busy with another partition's sync, held until the gate opens.
    let gate = slow_io.sync_gate.write().unwrap();
    let (tx, held) = std::sync::mpsc::channel();
    busy.append(
        EncodedBatch::new(&[record(0, 100)]),
        AppendMode::DURABLE,
        Box::new(move |r| tx.send(r.map(|a| a.base_offset)).unwrap()),
    );
    let (done, served_here) = append_here(&p, &record(1, 100), Duration::from_secs(1));
    assert!(!served_here, "served by its caller while a writer works");
    assert!(
        done.try_recv().is_err(),
        "acknowledged before any writer got to it"
    );
    drop(gate);
    assert_eq!(held.recv().unwrap().unwrap(), 0);
    let (_, name, offset) = done.recv().unwrap();
    assert_eq!(offset, 0);
    assert!(name.is_some_and(|n| n.starts_with("sluice-writer")));

    // A partition whose last sync took longer than the caller allows is written by the pool.
    // The pool sleeps again once its round is done; from the first append served here on,
    // nothing wakes it but what is queued for it.
    // Each append waits for its acknowledgement before the next, as a lone producer does.
    let second = Duration::from_secs(1);
    let mut n = 2;
    loop {
        let (done, served_here) = append_here(&p, &record(n, 100), second);
        assert_eq!(done.recv().unwrap().2, n - 1);
        if served_here {
            break;
        }
        n += 1;
    }
    io.sync_delay_us.store(3000, Ordering::SeqCst);
    assert!(
        append_here(&p, &record(n + 1, 100), second).1,
        "a slow sync, served here"
    );
    io.sync_delay_us.store(0, Ordering::SeqCst);
    let (done, served_here) = append_here(&p, &record(n + 2, 100), Duration::from_millis(1));
    assert!(!served_here, "served here after a sync slower than allowed");
    let (_, name, offset) = done.recv().unwrap();
    assert!(name.is_some_and(|n| n.starts_with("sluice-writer")));
    assert_eq!(offset, n + 1);
    assert_eq!(read_all(&p).len() as u64, n + 2);
}

#[test]
fn appenders_served_on_their_own_threads_and_by_the_writers_at_once_lose_and_reorder_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pool = WriterPool::new(2).unwrap();
    let config = small_config(FsyncPolicy::Always);
    let p = Arc::new(
        Partition::open_in(
            &pool,
            dir.path(),
            config.clone(),
            Arc::new(sluice::storage::RealIo),
            None,
        )
        .unwrap(),
    );
    let (threads, per_thread) = (8u64, 40u64);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let p = Arc::clone(&p);
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..per_thread {
                    let rec = record(t * 1000 + i, 200);
                    // Half the threads always ask to be served here, the others alternate.
                    let offset = if t % 2 == 0 || i % 2 == 0 {
                        append_here(&p, &rec, Duration::from_secs(1))
                            .0
                            .recv()
                            .unwrap()
                            .2
                    } else {
                        p.append_blocking(std::slice::from_ref(&rec))
                            .unwrap()
                            .base_offset
                    };
                    acked.push((offset, rec));
                }
                acked
            })
        })
        .collect();
    let acked: Vec<Vec<(u64, Record)>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let stored = read_all(&p);
    assert_eq!(
        stored.len() as u64,
        threads * per_thread,
        "every acknowledged append stored once"
    );
    let at: std::collections::HashMap<Vec<u8>, u64> = stored
        .iter()
        .map(|r| (r.value.clone().unwrap().to_vec(), r.offset))
        .collect();
    for mine in &acked {
        let offsets: Vec<u64> = mine
            .iter()
            .map(|(offset, rec)| {
                let stored_at = at[&rec.value.clone().unwrap().to_vec()];
                assert_eq!(
                    *offset, stored_at,
                    "the acknowledged offset is where it is stored"
                );
                stored_at
            })
            .collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "one appender's order kept: {offsets:?}"
        );
    }
    drop(p);
    let p = Partition::open_in(
        &pool,
        dir.path(),
        config,
        Arc::new(sluice::storage::RealIo),
        None,
    )
    .unwrap();
    assert_eq!(read_all(&p), stored, "the same after a reopen");
}

/// Appenders that find the inbox full wait for room, and every way of appending that waits
/// is woken when the writer takes commands: none is left waiting, nothing is lost or reordered.
#[test]
fn appenders_waiting_for_room_in_a_full_inbox_are_all_woken_and_lose_nothing() {
    #[derive(Clone, Copy, Debug)]
    enum Way {
        Append,
        Here,
        Blocking,
    }
    let ways = [Way::Append, Way::Here, Way::Blocking];
    for (depth, threads, delay_us) in [(1, 4, 500), (2, 3, 0), (8, 4, 200)] {
        let dir = tempfile::tempdir().unwrap();
        let io = FaultyIo::new();
        // A slow disk: the appenders fill the inbox while each sync runs.
        io.sync_delay_us.store(delay_us, Ordering::SeqCst);
        let pool = WriterPool::new(1).unwrap();
        let config = LogConfig {
            queue_depth: depth,
            ..small_config(FsyncPolicy::Always)
        };
        let p = Arc::new(Partition::open_in(&pool, dir.path(), config, io.clone(), None).unwrap());
        let per_thread = 60u64;
        let (finished_tx, finished) = std::sync::mpsc::channel();
        for t in 0..threads as u64 {
            let (p, finished_tx) = (Arc::clone(&p), finished_tx.clone());
            std::thread::spawn(move || {
                // Each append's offset, read once every append of this thread is queued.
                let mut acks = Vec::new();
                for i in 0..per_thread {
                    let rec = record(t * 1000 + i, 100);
                    let offset: Box<dyn FnOnce() -> u64> = match ways[(t + i) as usize % ways.len()]
                    {
                        Way::Append => {
                            let (tx, rx) = std::sync::mpsc::channel();
                            p.append(
                                EncodedBatch::new(std::slice::from_ref(&rec)),
                                AppendMode::DURABLE,
                                Box::new(move |r| tx.send(r.unwrap().base_offset).unwrap()),
                            );
                            Box::new(move || rx.recv().unwrap())
                        }
                        Way::Here => {
                            let (done, _) = append_here(&p, &rec, Duration::from_secs(1));
                            Box::new(move || done.recv().unwrap().2)
                        }
                        Way::Blocking => {
                            let appended = p.append_blocking(std::slice::from_ref(&rec)).unwrap();
                            Box::new(move || appended.base_offset)
                        }
                    };
                    acks.push((rec, offset));
                }
                let acked: Vec<(Record, u64)> = acks
                    .into_iter()
                    .map(|(rec, offset)| (rec, offset()))
                    .collect();
                finished_tx.send(acked).unwrap();
            });
        }
        // A generous deadline in place of a hang: the work takes well under a second; an
        // appender left waiting for room would wait forever.
        let acked: Vec<Vec<(Record, u64)>> = (0..threads)
            .map(|_| {
                finished
                    .recv_timeout(Duration::from_secs(120))
                    .unwrap_or_else(|_| {
                        panic!("depth {depth}: an appender waiting for room was never woken")
                    })
            })
            .collect();
        let stored = read_all(&p);
        assert_eq!(
            stored.len() as u64,
            threads as u64 * per_thread,
            "depth {depth}"
        );
        for mine in &acked {
            for (rec, offset) in mine {
                assert_eq!(stored[*offset as usize].value, rec.value, "depth {depth}");
            }
            assert!(
                mine.windows(2).all(|w| w[0].1 < w[1].1),
                "depth {depth}: one appender's order kept"
            );
        }
    }
}
