//! Power cuts inside the suite. A process kill keeps the page cache; a power cut does not. Here
//! the broker runs on [`PowerIo`], which drops or tears every write since each file's last sync
//! and undoes directory entries since their directory's last sync (`tests/common/power.rs`),
//! at a random point while producers (with and without ids), a group member acking, segment
//! rolls and compaction passes run at once. After each cut the broker reopens and the property
//! is checked against what was answered before the cut:
//!
//! - every acknowledged message is stored at its acknowledged position with its bytes;
//! - every acknowledged id is still known: a retry answers `duplicate` with the original position;
//! - on the compacted topic, each key's newest acknowledged value, or a newer one, is kept;
//! - the group delivers every stored message it had not acknowledged, and none it had.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::power::{PowerIo, Rng};
use crate::common::server::test_config;
use bytes::Bytes;
use proptest::prelude::*;
use sluice::broker::groups::Membership;
use sluice::broker::{Broker, Deliveries, NewMessage, Start};
use sluice::config::Config;
use sluice::storage::TopicConfig;
use sluice::storage::topic::CleanupPolicy;

const INTAKE: &str = "intake";
const LATEST: &str = "latest";
const GROUP: &str = "g";
/// Cuts per case.
const ROUNDS: usize = 4;

/// What the broker answered before the cuts.
#[derive(Debug, Default)]
struct Answered {
    /// `intake`: (partition, offset) → (value, id).
    messages: BTreeMap<(u32, u64), (Bytes, Option<Bytes>)>,
    /// `latest`: key → (partition, offset, value) of its newest acknowledged message.
    newest: HashMap<Bytes, (u32, u64, Bytes)>,
    /// `intake` positions the group acknowledged.
    acked: BTreeSet<(u32, u64)>,
    /// Positions in an Ack that failed at the cut: it may or may not have been stored.
    maybe_acked: BTreeSet<(u32, u64)>,
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = test_config(dir);
    c.retention_check_ms = 0;
    // Small segments: rolls all the time, in the topics and in the group's event log.
    c.log.segment_bytes = 4096;
    c.groups.max_deliveries = 1_000_000;
    c
}

/// Every record of a topic: (partition, offset) → (key, value).
fn stored(broker: &Broker, topic: &str) -> BTreeMap<(u32, u64), (Option<Bytes>, Bytes)> {
    let t = broker.existing_topic(topic).unwrap();
    let mut out = BTreeMap::new();
    for p in &t.partitions {
        let mut at = p.log.log_start();
        while at < p.log.high_water() {
            let batches = p.log.read(at, 1 << 20).unwrap();
            if batches.is_empty() {
                break;
            }
            for b in &batches {
                for r in b.records() {
                    let r = r.unwrap();
                    if r.offset >= at {
                        out.insert(
                            (p.id, r.offset),
                            (r.key.clone(), r.value.clone().unwrap_or_default()),
                        );
                    }
                }
                at = b.header().next_offset();
            }
        }
    }
    out
}

/// Waits until nothing holds the data directory's lock (the stopped broker's last threads).
async fn wait_unlocked(dir: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let lock = std::fs::File::open(dir.join("LOCK")).unwrap();
    // Generous: a stopped broker lets go at once; a lock held after a minute never is.
    let free = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                // SAFETY: as above.
                unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_UN) };
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    free.await
        .expect("the stopped broker let go of its data directory");
}

/// Checks every answer given before the cut against the reopened broker, then drains the group
/// (acknowledging what it delivers, which the next round checks in turn).
async fn check(broker: &Broker, answered: &mut Answered, context: &str) {
    let intake = stored(broker, INTAKE);
    for (pos, (value, id)) in &answered.messages {
        let got = intake.get(pos).map(|(_, v)| v);
        assert_eq!(
            got,
            Some(value),
            "{context}: the message acknowledged at {pos:?} is not there"
        );
        if let Some(id) = id {
            let retry = broker
                .send(
                    INTAKE,
                    vec![NewMessage {
                        value: Some(value.clone()),
                        id: Some(id.clone()),
                        ..NewMessage::default()
                    }],
                )
                .await
                .unwrap()[0];
            assert!(
                retry.duplicate && (retry.partition, retry.offset) == *pos,
                "{context}: a retry of id {id:?} (acknowledged at {pos:?}) answered {retry:?}"
            );
        }
    }
    let latest = stored(broker, LATEST);
    for (key, (partition, offset, value)) in &answered.newest {
        let kept = latest
            .iter()
            .filter(|(_, (k, _))| k.as_ref() == Some(key))
            .max_by_key(|(pos, _)| **pos);
        let Some(((p, o), (_, v))) = kept else {
            panic!("{context}: key {key:?} is gone (acknowledged at {partition}:{offset})");
        };
        assert!(
            *p == *partition && (*o > *offset || (*o == *offset && v == value)),
            "{context}: key {key:?}, acknowledged at {partition}:{offset}, has {p}:{o} = {v:?}"
        );
    }
    // The group: every stored message not acknowledged is delivered, none acknowledged is.
    let mut due: BTreeSet<(u32, u64)> = intake
        .keys()
        .filter(|pos| !answered.acked.contains(pos) && !answered.maybe_acked.contains(pos))
        .copied()
        .collect();
    if due.is_empty() {
        return;
    }
    let (member, mut rx) = broker
        .subscribe_group(
            INTAKE,
            GROUP,
            Start::Earliest,
            Membership {
                max_in_flight: 64,
                exclusive: false,
                limit: None,
            },
        )
        .await
        .unwrap();
    // Generous: the deliveries are on their way at once; a minute means they never come.
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while !due.is_empty() {
            let Some(Ok(Deliveries::Records(got))) = rx.recv().await else {
                panic!("{context}: the group's stream ended");
            };
            for d in &got {
                let pos = (d.partition, d.record.offset);
                assert!(
                    !answered.acked.contains(&pos),
                    "{context}: {pos:?} was acknowledged before the cut and is delivered again"
                );
                due.remove(&pos);
            }
            let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
            let applied = broker.ack(GROUP, INTAKE, &ids).await.unwrap();
            for (d, ok) in got.iter().zip(applied) {
                if ok {
                    answered.acked.insert((d.partition, d.record.offset));
                }
            }
        }
    });
    drained.await.unwrap_or_else(|_| {
        panic!("{context}: the group did not deliver every message it had not acknowledged")
    });
    drop(member);
}

/// Producers, a group member and compaction passes, until the power goes off.
async fn work(broker: Arc<Broker>, io: Arc<PowerIo>, seed: u64, round: usize) -> Answered {
    let answered = Arc::new(Mutex::new(Answered::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for producer in 0..2u64 {
        let (broker, io, answered) = (broker.clone(), io.clone(), answered.clone());
        let mut rng = Rng::new(seed ^ (producer + 1).wrapping_mul(0x1234_5678_9abc));
        tasks.spawn(async move {
            for n in 0.. {
                if io.is_off() {
                    return;
                }
                let count = 1 + rng.below(3) as usize;
                let batch: Vec<NewMessage> = (0..count)
                    .map(|i| {
                        let value = format!("r{round}-p{producer}-{n}-{i}-")
                            + &"x".repeat(rng.below(700) as usize);
                        NewMessage {
                            value: Some(Bytes::from(value)),
                            id: (rng.below(2) == 0)
                                .then(|| Bytes::from(format!("id-{round}-{producer}-{n}-{i}"))),
                            ..NewMessage::default()
                        }
                    })
                    .collect();
                let placed = match broker.send(INTAKE, batch.clone()).await {
                    Ok(placed) => placed,
                    Err(_) if io.is_off() => return,
                    Err(e) => panic!("a Send failed with the power on: {e}"),
                };
                for (m, p) in batch.iter().zip(placed) {
                    assert!(!p.duplicate, "a new id answered duplicate");
                    answered.lock().unwrap().messages.insert(
                        (p.partition, p.offset),
                        (m.value.clone().unwrap(), m.id.clone()),
                    );
                }
                let key = Bytes::from(format!("k{}", rng.below(6)));
                let value = Bytes::from(format!("r{round}-p{producer}-{n}"));
                let m = NewMessage {
                    key: Some(key.clone()),
                    value: Some(value.clone()),
                    ..NewMessage::default()
                };
                let placed = match broker.send(LATEST, vec![m]).await {
                    Ok(placed) => placed,
                    Err(_) if io.is_off() => return,
                    Err(e) => panic!("a Send failed with the power on: {e}"),
                };
                let p = placed[0];
                {
                    let mut a = answered.lock().unwrap();
                    let newest =
                        a.newest
                            .entry(key)
                            .or_insert((p.partition, p.offset, value.clone()));
                    if p.offset >= newest.1 {
                        *newest = (p.partition, p.offset, value);
                    }
                }
                // Both producers compact now and then: a pass refused because the other's runs
                // is no reason to stop.
                if n % 8 == 7 && broker.maintain(Some(LATEST), false).await.is_err() && io.is_off()
                {
                    return;
                }
            }
        });
    }
    {
        let (broker, io, answered) = (broker.clone(), io.clone(), answered.clone());
        let mut rng = Rng::new(seed ^ 0xacc);
        tasks.spawn(async move {
            let Ok((_member, mut rx)) = broker
                .subscribe_group(
                    INTAKE,
                    GROUP,
                    Start::Earliest,
                    Membership {
                        max_in_flight: 16,
                        exclusive: false,
                        limit: None,
                    },
                )
                .await
            else {
                assert!(io.is_off(), "joining the group failed with the power on");
                return;
            };
            loop {
                let got = tokio::select! {
                    got = rx.recv() => got,
                    () = io.wait_off() => return,
                };
                let Some(Ok(Deliveries::Records(got))) = got else {
                    return;
                };
                // Some are left unacknowledged: delivered again after the cut.
                let chosen: Vec<_> = got.iter().filter(|_| rng.below(4) != 0).collect();
                if chosen.is_empty() {
                    continue;
                }
                let ids: Vec<String> = chosen.iter().map(|d| d.ack_id.clone()).collect();
                let acked = broker.ack(GROUP, INTAKE, &ids).await;
                if let Err(e) = &acked {
                    assert!(io.is_off(), "an Ack failed with the power on: {e}");
                }
                let Ok(applied) = acked else {
                    let mut a = answered.lock().unwrap();
                    a.maybe_acked
                        .extend(chosen.iter().map(|d| (d.partition, d.record.offset)));
                    return;
                };
                let mut a = answered.lock().unwrap();
                for (d, ok) in chosen.iter().zip(applied) {
                    if ok {
                        a.acked.insert((d.partition, d.record.offset));
                    }
                }
            }
        });
    }
    io.wait_off().await;
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    Arc::try_unwrap(answered).unwrap().into_inner().unwrap()
}

async fn cuts(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut rng = Rng::new(seed);
    let mut answered = Answered::default();
    let mut round = 0;
    while round <= ROUNDS {
        let io = Arc::new(PowerIo::new());
        // Sometimes the power goes off again while the broker recovers from the last cut.
        let early = round > 0 && rng.below(4) == 0;
        if early {
            io.cut_after(1 + rng.below(80));
        }
        let broker = match Broker::open_with_io(c.clone(), io.clone()).await {
            Ok(b) => b,
            Err(e) => {
                assert!(io.is_off(), "seed {seed:#x}: the broker did not open: {e}");
                wait_unlocked(dir.path()).await;
                let report = io.power_cut(&mut rng);
                eprintln!("seed {seed:#x} cut while opening: {report:?}");
                continue;
            }
        };
        io.disarm();
        if round == 0 {
            let intake = TopicConfig {
                partitions: 2,
                dedup_window_ms: 24 * 3600 * 1000,
                ..TopicConfig::default()
            };
            broker.create_topic(INTAKE, intake).await.unwrap();
            let latest = TopicConfig {
                partitions: 1,
                cleanup_policy: CleanupPolicy::Compact,
                ..TopicConfig::default()
            };
            broker.create_topic(LATEST, latest).await.unwrap();
        }
        let context = format!("seed {seed:#x}, after cut {round}");
        round += 1;
        check(&broker, &mut answered, &context).await;
        if round > ROUNDS {
            broker.shutdown().await;
            break;
        }
        // Anywhere in the next few hundred file operations: mid-append, mid-roll, mid-sync,
        // mid-compaction, mid-ack.
        io.cut_after(1 + rng.below(600));
        // Generous: a round takes well under a second; ten minutes means it hangs.
        let working = work(broker.clone(), io.clone(), rng.next(), round - 1);
        let more = tokio::time::timeout(Duration::from_secs(600), working)
            .await
            .unwrap_or_else(|_| panic!("seed {seed:#x}: the work before cut {round} hangs"));
        let stopping = tokio::time::timeout(Duration::from_secs(600), broker.shutdown());
        stopping
            .await
            .unwrap_or_else(|_| panic!("seed {seed:#x}: the stop after cut {round} hangs"));
        drop(broker);
        wait_unlocked(dir.path()).await;
        let report = io.power_cut(&mut rng);
        eprintln!(
            "seed {seed:#x} cut {}: {} messages, {} keyed, {} group acks answered; {report:?}",
            round - 1,
            more.messages.len(),
            more.newest.len(),
            more.acked.len()
        );
        answered.messages.extend(more.messages);
        answered.acked.extend(more.acked);
        answered.maybe_acked.extend(more.maybe_acked);
        for (k, v) in more.newest {
            let newest = answered.newest.entry(k).or_insert(v.clone());
            if v.1 >= newest.1 {
                *newest = v;
            }
        }
    }
}

proptest! {
    // Each case runs several brokers through several cuts: few cases, many cuts.
    // POWER_CUT_CASES=n runs more (docs/benchmarks.md records a long run).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("POWER_CUT_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_acknowledged_message_id_and_group_ack_survives_a_power_cut(seed in any::<u64>()) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(cuts(seed));
    }
}
