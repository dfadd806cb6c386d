//! Key compaction: what survives (property test), crash safety at every step through the fault
//! seam, and compaction online while a producer and a group consumer run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::common::server::{TestServer, subscribe_from, take, test_config};
use crate::common::{FaultyIo, read_all};
use bytes::Bytes;
use proptest::prelude::*;
use sluice::proto::v1 as pb;
use sluice::storage::{
    CompactionOptions, EncodedBatch, FsyncPolicy, Header, LogConfig, Partition, RealIo, Record,
    StoredRecord,
};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 8 << 10,
        index_interval_bytes: 512,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

fn open(dir: &Path) -> Partition {
    Partition::open(dir, config(), Arc::new(RealIo), None).unwrap()
}

fn rec(key: u8, value: Option<u16>, ts: i64) -> Record {
    Record {
        timestamp: ts,
        key: Some(Bytes::from(vec![b'k', key])),
        value: value.map(|v| Bytes::from(format!("v{v}-{}", "x".repeat(v as usize % 300)))),
        headers: vec![Header {
            key: "h".into(),
            value: Bytes::from(vec![key]),
        }],
        id: None,
    }
}

/// What a full replay gives: the newest value per key (None for a tombstone).
fn replay(records: &[StoredRecord]) -> BTreeMap<Bytes, Option<Bytes>> {
    let mut m = BTreeMap::new();
    for r in records {
        if let Some(k) = &r.key {
            m.insert(k.clone(), r.value.clone());
        }
    }
    m
}

fn check_compacted(before: &[StoredRecord], after: &[StoredRecord], tombstones_kept: bool) {
    let by_offset: HashMap<u64, &StoredRecord> = before.iter().map(|r| (r.offset, r)).collect();
    let mut last = None;
    for r in after {
        assert!(
            last.is_none_or(|l| r.offset > l),
            "offsets strictly increase"
        );
        last = Some(r.offset);
        assert_eq!(
            by_offset.get(&r.offset),
            Some(&r),
            "a surviving record keeps its offset and bytes"
        );
    }
    let want = replay(before);
    let got = replay(after);
    for (k, v) in &want {
        match v {
            Some(_) => assert_eq!(got.get(k), Some(v), "newest value of {k:?}"),
            None if tombstones_kept => assert_eq!(got.get(k), Some(&None)),
            None => assert!(matches!(got.get(k), None | Some(None))),
        }
    }
    assert!(got.keys().all(|k| want.contains_key(k)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn compaction_keeps_exactly_the_newest_record_per_key(
        batches in proptest::collection::vec(
            proptest::collection::vec((0u8..12, proptest::option::weighted(0.85, 0u16..2000)), 1..8),
            1..40),
        tombstones_kept in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let mut ts = 1_000;
        for batch in &batches {
            let records: Vec<Record> = batch.iter().map(|&(k, v)| { ts += 1; rec(k, v, ts) }).collect();
            p.append_blocking(&records).unwrap();
        }
        let before = read_all(&p);
        let active = p.segment_bases().last().copied().unwrap_or(0);
        let opts = CompactionOptions {
            now_ms: 10_000,
            delete_retention_ms: if tombstones_kept { 1 << 40 } else { 0 },
            segment_bytes: 8 << 10,
            below: None,
        };
        let outcome = p.compact_keys(&opts).unwrap();
        prop_assert!(outcome.records_after <= outcome.records_before);
        let after = read_all(&p);
        // Only closed segments are compacted: keep the check on what the rule allows.
        check_compacted(&before, &after, tombstones_kept);
        // And what it must drop is gone: in the closed segments, no record of a key survives
        // beside a newer one of that key there, and no tombstone past its retention survives.
        for r in after.iter().filter(|r| r.offset < active) {
            let Some(k) = &r.key else { continue };
            let newer = before
                .iter()
                .any(|b| b.key.as_ref() == Some(k) && b.offset > r.offset && b.offset < active);
            prop_assert!(!newer, "offset {} of key {:?} survived a newer record", r.offset, k);
            prop_assert!(tombstones_kept || r.value.is_some(), "tombstone at {} kept", r.offset);
        }
        prop_assert_eq!(
            outcome.records_before - outcome.records_after,
            (before.len() - after.len()) as u64,
            "the outcome counts what was dropped"
        );
        prop_assert_eq!(p.high_water(), before.len() as u64);
        // The same after a reopen, and appends continue at the same offset.
        drop(p);
        let p = open(dir.path());
        prop_assert_eq!(read_all(&p), after.clone());
        let next = p.append_blocking(&[rec(0, Some(1), 99_999)]).unwrap();
        prop_assert_eq!(next.base_offset, before.len() as u64);
        // Timestamp lookups still agree with a scan of what is left.
        let mut all = after;
        all.extend(read_all(&p).into_iter().filter(|r| r.offset >= before.len() as u64));
        for probe in [0, 1_005, 1_050, 99_999] {
            let scan = all.iter().find(|r| r.timestamp >= probe).map(|r| r.offset);
            prop_assert_eq!(p.offset_for_timestamp(probe).unwrap(), scan);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_compaction_interrupted_at_any_step_leaves_the_partition_as_before_or_as_after() {
    let template = tempfile::tempdir().unwrap();
    let p = open(template.path());
    for i in 0..300u32 {
        let k = (i % 20) as u8;
        let v = if i % 37 == 0 { None } else { Some(i as u16) };
        p.append_blocking(&[rec(k, v, 1_000 + i64::from(i))])
            .unwrap();
    }
    p.close().unwrap();
    drop(p);
    let opts = CompactionOptions {
        now_ms: 10_000,
        delete_retention_ms: 0,
        segment_bytes: 8 << 10,
        below: None,
    };
    let before = read_all(&open(template.path()));
    let reference = tempfile::tempdir().unwrap();
    copy_dir(template.path(), reference.path());
    let r = open(reference.path());
    r.compact_keys(&opts).unwrap();
    let after = read_all(&r);
    assert_ne!(before, after, "the workload has something to compact");
    drop(r);

    let mut step = 0u64;
    loop {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let io = FaultyIo::new();
        let p = Partition::open(dir.path(), config(), io.clone(), None).unwrap();
        let base = io.ops.load(Ordering::SeqCst);
        io.fail_from.store(base + step, Ordering::SeqCst);
        let result = p.compact_keys(&opts);
        let finished = result.is_ok();
        drop(p); // crash
        let p = open(dir.path());
        let got = read_all(&p);
        assert!(
            got == before || got == after,
            "step {step}: a mix of before and after"
        );
        drop(p);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".cleaned") || n == "compaction" || n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "step {step}: {leftovers:?}");
        if finished {
            assert_eq!(got, after);
            break;
        }
        step += 1;
    }
    assert!(step > 5, "every step was tried ({step})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_compaction_while_producing_and_consuming_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "state".into(),
            settings: Some(pb::TopicSettings {
                partitions: 1,
                cleanup_policy: pb::CleanupPolicy::Compact as i32,
                segment_bytes: Some(8 << 10),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut member = client
        .subscribe(pb::SubscribeRequest {
            topic: "state".into(),
            group: "g".into(),
            max_in_flight: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let produced = Arc::new(AtomicBool::new(false));
    let producer = {
        let mut c = client.clone();
        let produced = Arc::clone(&produced);
        tokio::spawn(async move {
            for round in 0..20u32 {
                let messages = (0..50u32)
                    .map(|k| pb::Message {
                        key: Some(format!("patient-{k}").into()),
                        value: Some(format!("{round}").into()),
                        ..Default::default()
                    })
                    .collect();
                c.send(pb::SendRequest {
                    topic: "state".into(),
                    messages,
                })
                .await
                .unwrap();
            }
            produced.store(true, Ordering::Release);
        })
    };
    // Compacts over and over while the producer runs, and once more after it is done, when
    // superseded records are sure to sit in closed segments.
    let compactor = {
        let mut a = admin.clone();
        tokio::spawn(async move {
            let mut rewritten = 0;
            loop {
                let last = produced.load(Ordering::Acquire);
                let r = a
                    .compact(pb::CompactRequest {
                        topic: "state".into(),
                        dry_run: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                rewritten += r.partitions[0].records_dropped;
                if last {
                    break;
                }
                tokio::task::yield_now().await;
            }
            rewritten
        })
    };
    // Consume until every key's final value (round 19) has arrived.
    let mut offsets = BTreeSet::new();
    let mut latest: BTreeMap<String, u32> = BTreeMap::new();
    while latest.values().filter(|&&r| r == 19).count() < 50 {
        let got = take(&mut member, 1).await;
        for d in &got {
            assert!(
                offsets.insert(d.offset),
                "offset {} delivered twice",
                d.offset
            );
            let key = String::from_utf8(d.key.clone().unwrap().to_vec()).unwrap();
            let round: u32 = String::from_utf8(d.value.clone().unwrap().to_vec())
                .unwrap()
                .parse()
                .unwrap();
            let prev = latest.insert(key, round);
            assert!(prev.is_none_or(|p| p < round), "a key went back in time");
        }
        client
            .ack(pb::AckRequest {
                group: "g".into(),
                topic: "state".into(),
                ack_ids: got.iter().map(|d| d.ack_id.clone()).collect(),
            })
            .await
            .unwrap();
    }
    producer.await.unwrap();
    let dropped = compactor.await.unwrap();
    assert!(dropped > 0, "compaction had superseded records to drop");
    // A new reader sees each key once at most in the compacted part, newest last.
    let mut reader = subscribe_from(&mut client, "state", None).await;
    let d = admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "state".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let end = d.partitions[0].next_offset;
    assert_eq!(end, 1000);
    let mut seen = BTreeMap::new();
    let mut last = None;
    loop {
        let got = take(&mut reader, 1).await;
        let done = got.iter().any(|d| d.offset == end - 1);
        for d in got {
            assert!(last.is_none_or(|l| d.offset > l));
            last = Some(d.offset);
            seen.insert(d.key.unwrap(), d.value.unwrap());
        }
        if done {
            break;
        }
    }
    assert_eq!(seen.len(), 50);
    assert!(seen.values().all(|v| v.as_ref() == b"19"));
}

// Replicated compaction: a compaction point gives every replica the same entries, whatever its
// segments, and entries a leader compacted keep their offsets on the follower they are sent to.

use sluice::storage::CompactionPoint;
use sluice::storage::raft_log::RaftLog;
use sluice::storage::record::{ControlKind, RaftId};

/// One entry of a replicated partition: its records, or `None` for a Raft blank entry.
type EntryPlan = Option<Vec<(u8, Option<u16>)>>;

/// An entry as a replica holds it: id, offsets covered (`None`: a control entry), records.
type Held = (RaftId, Option<(u64, u64)>, Vec<StoredRecord>);

fn raft_config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        ..config()
    }
}

fn append_entries(log: &mut RaftLog, batches: Vec<EncodedBatch>, last: RaftId) {
    let (tx, rx) = std::sync::mpsc::channel();
    log.append(batches, last, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv().unwrap().unwrap();
    // Committed: what the state machine says once a majority has the entries.
    log.reader().set_committed_offset(u64::MAX);
}

/// A replica with the planned entries (term 1, indexes from 1), segments of `segment_bytes`.
fn replica(dir: &Path, plan: &[EntryPlan], segment_bytes: u64) -> RaftLog {
    let mut log = RaftLog::open(dir, raft_config(segment_bytes), Arc::new(RealIo)).unwrap();
    let mut ts = 1_000;
    let mut batches = Vec::new();
    for (i, entry) in plan.iter().enumerate() {
        let id = RaftId {
            term: 1,
            index: i as u64 + 1,
        };
        batches.push(match entry {
            None => EncodedBatch::control(id, ControlKind::Blank, &[], 0),
            Some(records) => {
                let records: Vec<Record> = records
                    .iter()
                    .map(|&(k, v)| {
                        ts += 1;
                        rec(k, v, ts)
                    })
                    .collect();
                EncodedBatch::raft(&records, id)
            }
        });
    }
    let last = RaftId {
        term: 1,
        index: plan.len() as u64,
    };
    append_entries(&mut log, batches, last);
    log
}

fn held(log: &RaftLog) -> Vec<Held> {
    let entries = log.reader().entries(1, u64::MAX, usize::MAX).unwrap();
    entries
        .iter()
        .map(|b| {
            let h = *b.header();
            let offsets = (!h.is_control()).then(|| (h.base_offset, h.last_offset()));
            let records = b.records().map(|r| r.unwrap()).collect();
            (h.raft.unwrap(), offsets, records)
        })
        .collect()
}

/// Compacts to `point` the way every replica does: what is closed now, then the rest once the
/// active segment has closed.
fn compact_replica(log: &RaftLog, point: CompactionPoint, keep_ms: u64) {
    let p = log.partition();
    p.set_compaction_point(point);
    p.compact_to_point(keep_ms, false).unwrap();
    p.roll().unwrap();
    p.compact_to_point(keep_ms, false).unwrap();
}

/// What compaction to `below` as of `now_ms` must leave: below it, the newest record of each
/// key among the records below it (a tombstone only while younger than `keep_ms`) and every
/// record without a key; from it on, everything.
fn expected(all: &[StoredRecord], below: u64, now_ms: i64, keep_ms: u64) -> Vec<StoredRecord> {
    let mut newest: HashMap<Bytes, u64> = HashMap::new();
    for r in all.iter().filter(|r| r.offset < below) {
        if let Some(k) = &r.key {
            newest.insert(k.clone(), r.offset);
        }
    }
    let horizon = now_ms - keep_ms as i64;
    all.iter()
        .filter(|r| {
            r.offset >= below
                || match &r.key {
                    None => true,
                    Some(k) => {
                        newest[k] == r.offset && (r.value.is_some() || r.timestamp >= horizon)
                    }
                }
        })
        .cloned()
        .collect()
}

fn records_of(entries: &[Held]) -> Vec<StoredRecord> {
    entries.iter().flat_map(|(_, _, r)| r.clone()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn replicas_compacted_to_one_point_hold_the_same_entries_whatever_their_segments(
        plan in proptest::collection::vec(
            proptest::option::weighted(0.85, proptest::collection::vec(
                (0u8..8, proptest::option::weighted(0.8, 0u16..1500)), 1..6)),
            2..40),
        first in any::<proptest::sample::Index>(),
        second in any::<proptest::sample::Index>(),
        tombstones_kept in any::<bool>(),
    ) {
        let keep_ms = if tombstones_kept { 1 << 40 } else { 0 };
        // The offset after each data entry: the boundaries a leader may pick.
        let mut bounds = vec![0u64];
        for records in plan.iter().flatten() {
            bounds.push(bounds.last().unwrap() + records.len() as u64);
        }
        let x1 = bounds[first.index(bounds.len())];
        let x2 = x1.max(bounds[second.index(bounds.len())]);
        let p1 = CompactionPoint { below: x1, now_ms: 50_000 };
        let p2 = CompactionPoint { below: x2, now_ms: 60_000 };

        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        // Three replicas of the same entries in segments of different sizes.
        let replicas: Vec<RaftLog> = [4_096, 9_000, 1 << 20]
            .iter()
            .zip(&dirs)
            .map(|(&size, dir)| replica(dir.path(), &plan, size))
            .collect();
        let original = held(&replicas[0]);
        let all = records_of(&original);
        for log in &replicas {
            compact_replica(log, p1, keep_ms);
        }
        let first_round: Vec<Vec<Held>> = replicas.iter().map(held).collect();
        for (i, got) in first_round.iter().enumerate() {
            prop_assert_eq!(got, &first_round[0], "replica {} differs", i);
        }
        // Every entry stays, covering the same offsets; what survives is the rule's.
        let ids = |h: &[Held]| h.iter().map(|(id, o, _)| (*id, *o)).collect::<Vec<_>>();
        prop_assert_eq!(ids(&first_round[0]), ids(&original));
        prop_assert_eq!(records_of(&first_round[0]), expected(&all, x1, p1.now_ms, keep_ms));

        // A follower sent the leader's compacted entries (as proposals, stamped again where it
        // writes them) holds them at the same offsets; compacting it to the same point changes
        // nothing.
        let mut follower = RaftLog::open(dirs[3].path(), raft_config(5_000), Arc::new(RealIo)).unwrap();
        let sent: Vec<EncodedBatch> = replicas[0]
            .reader()
            .entries(1, u64::MAX, usize::MAX)
            .unwrap()
            .iter()
            .map(|b| match b.header().is_control() {
                true => EncodedBatch::control(b.header().raft.unwrap(), ControlKind::Blank, &[], 0),
                false => EncodedBatch::from_encoded(b.without_raft_id())
                    .unwrap()
                    .with_raft_id(b.header().raft.unwrap()),
            })
            .collect();
        let last = original.last().unwrap().0;
        append_entries(&mut follower, sent, last);
        prop_assert_eq!(held(&follower), first_round[0].clone());
        compact_replica(&follower, p1, keep_ms);
        prop_assert_eq!(held(&follower), first_round[0].clone());

        // A later point: the same on every replica, those compacted before and the follower,
        // as compacting the original entries to it at once.
        let mut fresh_dir = tempfile::tempdir().unwrap();
        let fresh = replica(fresh_dir.path(), &plan, 16_000);
        compact_replica(&fresh, p2, keep_ms);
        let want = held(&fresh);
        for log in replicas.iter().chain([&follower]) {
            compact_replica(log, p2, keep_ms);
            prop_assert_eq!(held(log), want.clone());
        }
        drop(fresh);
        let _ = &mut fresh_dir;
    }
}

/// The task that compacts on apply and a maintenance pass may ask at once: one compacts, the
/// other finds it done, and what it did (over both runs, before and after the active segment
/// closed) is what either reports for that point.
#[test]
fn a_compaction_point_is_compacted_to_once_and_its_outcome_reported_to_every_asker() {
    // Eight keys written five times each, one record of ~330 bytes per entry, in 4 KiB segments.
    let plan: Vec<EntryPlan> = (0..40u16)
        .map(|i| Some(vec![((i % 8) as u8, Some(299 + 300 * i))]))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log = replica(dir.path(), &plan, 4_096);
    let p = log.partition();
    let below = 40;
    let point = CompactionPoint {
        below,
        now_ms: 50_000,
    };
    p.set_compaction_point(point);
    let runs: Vec<_> = std::thread::scope(|s| {
        let askers: Vec<_> = (0..4)
            .map(|_| s.spawn(|| p.compact_to_point(0, false).unwrap()))
            .collect();
        askers.into_iter().map(|a| a.join().unwrap()).collect()
    });
    let done: Vec<_> = runs.iter().flatten().collect();
    assert_eq!(done.len(), 1, "{runs:?}");
    assert_eq!(p.compacted_to(point), Some(*done[0]));
    // Asked again with nothing new closed: nothing to do, the outcome still reported.
    assert_eq!(p.compact_to_point(0, false).unwrap(), None);
    // The active segment closes: its records below the point are compacted too, and the
    // point's outcome counts every record dropped, once.
    p.roll().unwrap();
    let second = p
        .compact_to_point(0, false)
        .unwrap()
        .expect("the closed segment");
    let total = p.compacted_to(point).unwrap();
    let dropped = |o: &sluice::storage::CompactionOutcome| o.records_before - o.records_after;
    assert_eq!(dropped(&total), dropped(done[0]) + dropped(&second));
    assert_eq!(total.records_after, 8, "the newest record of each key");
    assert_eq!(dropped(&total), 32);
    assert_eq!(p.compacted_to(CompactionPoint { below, now_ms: 1 }), None);
}
