//! Idempotent Send: a message id stored within the topic's window is stored once, whatever
//! path the retry takes (same or another request, another route, concurrent Sends, a clean
//! restart, a crash, retention, compaction), and the answer is always the original position.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::server::{TestServer, test_config};
use bytes::Bytes;
use proptest::prelude::*;
use sluice::broker::{Broker, NewMessage, Placed};
use sluice::config::Config;
use sluice::proto::v1 as pb;
use sluice::storage::TopicConfig;
use sluice::storage::topic::CleanupPolicy;

fn with_id(id: &str, key: Option<&str>, value: &str) -> NewMessage {
    NewMessage {
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: Some(Bytes::copy_from_slice(value.as_bytes())),
        id: Some(Bytes::copy_from_slice(id.as_bytes())),
        ..NewMessage::default()
    }
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = test_config(dir);
    c.retention_check_ms = 0;
    c.log.segment_bytes = 4096;
    c
}

/// Every record of a topic as (id, partition, offset).
async fn stored_ids(broker: &Broker, topic: &str) -> Vec<(Option<Bytes>, u32, u64)> {
    let t = broker.existing_topic(topic).unwrap();
    let mut out = Vec::new();
    for p in &t.partitions {
        let mut at = p.log.log_start();
        while at < p.log.high_water() {
            let batches = p.log.read(at, 1 << 20).unwrap();
            for b in &batches {
                for r in b.records() {
                    let r = r.unwrap();
                    if r.offset >= at {
                        out.push((r.id.clone(), p.id, r.offset));
                    }
                }
                at = b.header().next_offset();
            }
        }
    }
    out
}

/// Opens the broker once the one dropped before it (a crash, in process) has let go of the data
/// directory: its index writes still running hold the lock until they end.
async fn reopen(c: &Config) -> Arc<Broker> {
    reopen_with(c, Arc::new(sluice::storage::RealIo)).await
}

async fn reopen_with(c: &Config, io: Arc<dyn sluice::storage::FileIo>) -> Arc<Broker> {
    // Generous: the dropped broker's last index writes take milliseconds; a lock still held
    // after a minute is one that is never let go.
    let reopened = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match Broker::open_with_io(c.clone(), io.clone()).await {
                Err(sluice::broker::Error::Storage(sluice::storage::Error::Locked { .. })) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                other => return other.unwrap(),
            }
        }
    });
    reopened
        .await
        .expect("the dropped broker let go of its data directory")
}

fn placed(p: &Placed) -> (u32, u64) {
    (p.partition, p.offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_retry_answers_the_original_position_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(config(dir.path())).await.unwrap();
    let topic = TopicConfig {
        partitions: 4,
        ..TopicConfig::default()
    };
    broker.create_topic("t", topic).await.unwrap();
    let first = broker
        .send("t", vec![with_id("sub-1", Some("patient-7"), "answers")])
        .await
        .unwrap()[0];
    assert!(!first.duplicate);
    // (what the retry looks like, the messages)
    let retries: Vec<(&str, Vec<NewMessage>)> = vec![
        (
            "the same message",
            vec![with_id("sub-1", Some("patient-7"), "answers")],
        ),
        (
            "another key: another partition",
            vec![with_id("sub-1", Some("patient-8"), "x")],
        ),
        ("no key: spread", vec![with_id("sub-1", None, "answers")]),
        (
            "an explicit partition",
            vec![NewMessage {
                partition: Some((first.partition + 1) % 4),
                ..with_id("sub-1", None, "answers")
            }],
        ),
        (
            "inside a batch of new ones",
            vec![
                with_id("sub-2", None, "a"),
                with_id("sub-1", Some("patient-7"), "answers"),
                with_id("sub-3", None, "b"),
            ],
        ),
    ];
    for (what, messages) in retries {
        let answer = broker.send("t", messages).await.unwrap();
        let retry = answer
            .iter()
            .find(|p| placed(p) == placed(&first))
            .unwrap_or_else(|| panic!("{what}: {answer:?}"));
        assert!(retry.duplicate && !retry.removed, "{what}: {retry:?}");
    }
    // Repeated inside one request: stored once, the repeats point at the first.
    let answer = broker
        .send(
            "t",
            vec![
                with_id("sub-9", Some("a"), "1"),
                with_id("sub-9", Some("b"), "2"),
                with_id("sub-9", None, "3"),
            ],
        )
        .await
        .unwrap();
    assert!(!answer[0].duplicate && answer[1].duplicate && answer[2].duplicate);
    assert!(answer.iter().all(|p| placed(p) == placed(&answer[0])));
    // A stored id repeated inside one request, around a new one: both are the original.
    let answer = broker
        .send(
            "t",
            vec![
                with_id("sub-9", Some("c"), "4"),
                with_id("sub-10", Some("c"), "5"),
                with_id("sub-9", None, "6"),
            ],
        )
        .await
        .unwrap();
    let sub9 = placed(&answer[0]);
    assert!(answer[0].duplicate && !answer[1].duplicate && answer[2].duplicate);
    assert_eq!(placed(&answer[2]), sub9);
    let stored = stored_ids(&broker, "t").await;
    let mut count: HashMap<Bytes, usize> = HashMap::new();
    for (id, _, _) in &stored {
        *count.entry(id.clone().unwrap()).or_default() += 1;
    }
    assert_eq!(count.len(), 5, "{stored:?}");
    assert!(count.values().all(|&n| n == 1), "{count:?}");
    let ids = broker.describe_topic("t").await.unwrap().ids.unwrap();
    assert_eq!(ids.duplicates, 9);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_of_one_id_store_it_once_and_all_answer_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(config(dir.path())).await.unwrap();
    let topic = TopicConfig {
        partitions: 3,
        ..TopicConfig::default()
    };
    broker.create_topic("t", topic).await.unwrap();
    for round in 0..20 {
        let id = format!("sub-{round}");
        // Every other Send carries the id twice, around another id of its own.
        let sends: Vec<_> = (0..16)
            .map(|i| {
                let broker = Arc::clone(&broker);
                let m = with_id(&id, Some(&format!("k{i}")), "v");
                let mut messages = vec![m.clone()];
                if i % 2 == 1 {
                    let own = with_id(&format!("{id}-{i}"), None, "w");
                    messages.extend([own, m]);
                }
                tokio::spawn(async move {
                    let answer = broker.send("t", messages).await.unwrap();
                    if answer.len() == 3 {
                        assert!(!answer[1].duplicate && answer[2].duplicate);
                        assert_eq!(placed(&answer[2]), placed(&answer[0]));
                    }
                    answer[0]
                })
            })
            .collect();
        let mut answers = Vec::new();
        for s in sends {
            answers.push(s.await.unwrap());
        }
        assert_eq!(
            answers.iter().filter(|p| !p.duplicate).count(),
            1,
            "{answers:?}"
        );
        assert!(answers.iter().all(|p| placed(p) == placed(&answers[0])));
    }
    assert_eq!(stored_ids(&broker, "t").await.len(), 20 * 9);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_survive_restarts_crashes_and_the_writing_of_index_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    // Index files every 50 ids, so that runs are written and merged along the way.
    c.log.dedup_memtable_ids = 50;
    let topic = TopicConfig {
        partitions: 2,
        ..TopicConfig::default()
    };
    let mut first: HashMap<String, (u32, u64)> = HashMap::new();
    for round in 0..4 {
        let broker = reopen(&c).await;
        if round == 0 {
            broker.create_topic("t", topic.clone()).await.unwrap();
        } else if round % 2 == 1 {
            // After a clean stop (rounds 0 and 2 end so) nothing is re-read from the log.
            let ids = broker.describe_topic("t").await.unwrap().ids.unwrap();
            assert_eq!(ids.in_memory, 0, "{ids:?}");
        }
        // Every id sent so far again, and 300 new ones.
        let total = 300 * (round + 1);
        for chunk in (0..total).collect::<Vec<_>>().chunks(37) {
            let messages = chunk
                .iter()
                .map(|i| with_id(&format!("sub-{i}"), Some(&format!("k{}", i % 7)), "v"))
                .collect();
            let answer = broker.send("t", messages).await.unwrap();
            for (i, p) in chunk.iter().zip(answer) {
                let id = format!("sub-{i}");
                match first.get(&id) {
                    Some(&pos) => assert!(p.duplicate && placed(&p) == pos, "{id} {p:?}"),
                    None => {
                        assert!(!p.duplicate, "{id} {p:?}");
                        first.insert(id, placed(&p));
                    }
                }
            }
        }
        let ids = broker.describe_topic("t").await.unwrap().ids.unwrap();
        assert!(ids.runs >= 1, "{ids:?}");
        if round % 2 == 0 {
            broker.shutdown().await;
        } else {
            // A crash: no final write of the index, partitions not closed.
            drop(broker);
        }
    }
    let broker = reopen(&c).await;
    let stored = stored_ids(&broker, "t").await;
    assert_eq!(stored.len(), first.len());
    for (id, p, o) in stored {
        let id = String::from_utf8(id.unwrap().to_vec()).unwrap();
        assert_eq!(first[&id], (p, o));
    }
    broker.shutdown().await;
}

// The gate is a std lock held across awaits on purpose: holding it for writing holds every
// fsync of the broker's writer threads until the test lets go.
#[allow(clippy::await_holding_lock, clippy::readonly_write_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_waiting_for_an_append_of_its_id_that_fails_is_unavailable_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let io = common::FaultyIo::new();
    let broker = Broker::open_with_io(config(dir.path()), io.clone())
        .await
        .unwrap();
    broker
        .create_topic("t", TopicConfig::default())
        .await
        .unwrap();
    // The first Send's fsync waits at the gate, then fails.
    let gate = io.sync_gate.write().unwrap();
    let first = tokio::spawn({
        let broker = Arc::clone(&broker);
        async move { broker.send("t", vec![with_id("a", None, "1")]).await }
    });
    let second = tokio::spawn({
        let broker = Arc::clone(&broker);
        async move { broker.send("t", vec![with_id("a", None, "2")]).await }
    });
    let dedup = broker.existing_topic("t").unwrap().dedup.clone().unwrap();
    // Which Send claims the id first is up to the scheduler: the other waits for it.
    while dedup.waiting() == 0 {
        tokio::task::yield_now().await;
    }
    io.fail_sync
        .store(true, std::sync::atomic::Ordering::SeqCst);
    drop(gate);
    let answers = [first.await.unwrap(), second.await.unwrap()];
    let waited = answers
        .iter()
        .find_map(|a| match a {
            Err(sluice::broker::Error::Unavailable(why)) => Some(why.clone()),
            _ => None,
        })
        .expect("the waiting Send is UNAVAILABLE");
    assert!(waited.contains("send again"), "{waited}");
    assert!(answers.iter().all(|a| a.is_err()), "{answers:#?}");
    assert_eq!(dedup.waiting(), 0);
    // After a reopen the retry finds what the failed Send left in the log (a failed fsync does
    // not take back bytes written) or stores it: either way the log holds the id once.
    drop(dedup);
    drop(broker);
    io.fail_sync
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let broker = reopen_with(&config(dir.path()), io.clone()).await;
    let p = broker
        .send("t", vec![with_id("a", None, "3")])
        .await
        .unwrap()[0];
    let stored = stored_ids(&broker, "t").await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!((stored[0].1, stored[0].2), placed(&p));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_outlives_its_record_removed_by_retention_or_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(config(dir.path())).await.unwrap();
    let settings = [
        (
            "retained",
            TopicConfig {
                retention_ms: Some(0),
                retain_until_consumed: false,
                ..TopicConfig::default()
            },
        ),
        (
            "compacted",
            TopicConfig {
                cleanup_policy: CleanupPolicy::Compact,
                delete_retention_ms: 0,
                ..TopicConfig::default()
            },
        ),
    ];
    for (name, topic) in settings {
        broker.create_topic(name, topic).await.unwrap();
        let original = broker
            .send(name, vec![with_id("sub-0", Some("k"), "first")])
            .await
            .unwrap()[0];
        // The same key again (compaction keeps only the newest) until segments roll.
        for i in 1..40 {
            let v = format!("{i}-{}", "x".repeat(300));
            broker
                .send(name, vec![with_id(&format!("sub-{i}"), Some("k"), &v)])
                .await
                .unwrap();
        }
        broker.maintain(Some(name), false).await.unwrap();
        let gone = stored_ids(&broker, name).await;
        assert!(
            !gone.iter().any(|(_, _, o)| *o == original.offset),
            "{name}: the original is still held"
        );
        let retry = broker
            .send(name, vec![with_id("sub-0", Some("k"), "first")])
            .await
            .unwrap()[0];
        assert!(retry.duplicate && retry.removed, "{name}: {retry:?}");
        assert_eq!(placed(&retry), placed(&original), "{name}");
        // A crash now: the index files written before retention still know it.
        assert_eq!(stored_ids(&broker, name).await.len(), gone.len(), "{name}");
    }
    drop(broker);
    let broker = reopen(&config(dir.path())).await;
    for name in ["retained", "compacted"] {
        let retry = broker
            .send(name, vec![with_id("sub-0", None, "first")])
            .await
            .unwrap()[0];
        assert!(
            retry.duplicate && retry.removed,
            "{name} after a crash: {retry:?}"
        );
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_window_the_same_id_is_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(config(dir.path())).await.unwrap();
    // Inside the window (an hour: no machine is that slow) the id is a duplicate; after a
    // short one it is stored again.
    let window = Duration::from_millis(300);
    for (name, ms) in [("t", window.as_millis() as u64), ("long", 3_600_000)] {
        let topic = TopicConfig {
            dedup_window_ms: ms,
            ..TopicConfig::default()
        };
        broker.create_topic(name, topic).await.unwrap();
    }
    broker
        .create_topic(
            "off",
            TopicConfig {
                dedup_window_ms: 0,
                ..TopicConfig::default()
            },
        )
        .await
        .unwrap();
    let once = broker
        .send("long", vec![with_id("a", None, "v")])
        .await
        .unwrap()[0];
    let again = broker
        .send("long", vec![with_id("a", None, "v")])
        .await
        .unwrap()[0];
    assert!(again.duplicate);
    assert_eq!(again.offset, once.offset);
    let first = broker
        .send("t", vec![with_id("a", None, "v")])
        .await
        .unwrap()[0];
    // The first record was stamped before its answer: once the window has passed since the
    // answer, it has passed since the record.
    let answered = tokio::time::Instant::now();
    tokio::time::sleep_until(answered + window + Duration::from_millis(2)).await;
    let after = broker
        .send("t", vec![with_id("a", None, "v")])
        .await
        .unwrap()[0];
    assert!(!after.duplicate);
    assert!(after.offset > first.offset);
    // With the window at 0 ids are kept with the records but nothing is checked.
    for _ in 0..2 {
        let p = broker
            .send("off", vec![with_id("a", None, "v")])
            .await
            .unwrap()[0];
        assert!(!p.duplicate);
    }
    let stored = stored_ids(&broker, "off").await;
    assert_eq!(stored.len(), 2);
    assert!(
        stored
            .iter()
            .all(|(id, _, _)| id.as_deref() == Some(&b"a"[..]))
    );
    assert!(broker.describe_topic("off").await.unwrap().ids.is_none());
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_carries_ids_both_ways_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "t".into(),
            settings: Some(pb::TopicSettings {
                partitions: 2,
                dedup_window_ms: Some(60_000),
                ..pb::TopicSettings::default()
            }),
        })
        .await
        .unwrap();
    let m = |id: &[u8]| pb::Message {
        value: Some(Bytes::from_static(b"v")),
        id: Some(Bytes::copy_from_slice(id)),
        ..pb::Message::default()
    };
    for bad in [&b""[..], &[b'x'; 129][..]] {
        let err = client
            .send(pb::SendRequest {
                topic: "t".into(),
                messages: vec![m(b"ok"), m(bad)],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains("message 1's id"),
            "{}",
            err.message()
        );
    }
    let send = |client: &mut pb::broker_client::BrokerClient<_>, id: &'static [u8]| {
        let req = pb::SendRequest {
            topic: "t".into(),
            messages: vec![m(id)],
        };
        let mut c = client.clone();
        async move { c.send(req).await.unwrap().into_inner().positions[0] }
    };
    let first = send(&mut client, &[b'y'; 128]).await;
    let again = send(&mut client, &[b'y'; 128]).await;
    assert!(!first.duplicate && again.duplicate && !again.removed);
    assert_eq!(
        (again.partition, again.offset),
        (first.partition, first.offset)
    );
    let d = admin
        .describe_topic(pb::DescribeTopicRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.settings.unwrap().dedup_window_ms, Some(60_000));
    assert_eq!(d.dedup.unwrap().duplicates, 1);
    let total: u64 = d.partitions.iter().map(|p| p.next_offset).sum();
    assert_eq!(total, 1, "the refused Sends stored nothing");
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            partitions: vec![first.partition],
            ..pb::SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = common::server::take(&mut stream, 1).await;
    assert_eq!(got[0].id.as_deref(), Some(&[b'y'; 128][..]));
    server.stop().await;
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Step {
    /// A Send of these ids (indexes into a small pool, so retries are frequent), each with a
    /// key chosen by `route`.
    Send(Vec<(u8, u8)>),
    /// Retention and compaction now.
    Maintain,
    Restart,
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop::collection::vec((0u8..24, 0u8..5), 1..6).prop_map(Step::Send),
        1 => Just(Step::Maintain),
        1 => Just(Step::Restart),
        1 => Just(Step::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever happens between them, every Send of an id inside its window answers the
    /// position of its first storing, and the log holds each id at most once (exactly once
    /// where retention kept it).
    #[test]
    fn every_id_inside_its_window_is_stored_exactly_once(steps in prop::collection::vec(step(), 1..30)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut c = config(dir.path());
            c.log.dedup_memtable_ids = 4;
            let topic = TopicConfig {
                partitions: 3,
                retention_ms: Some(0),
                retain_until_consumed: false,
                ..TopicConfig::default()
            };
            let mut broker = Broker::open(c.clone()).await.unwrap();
            broker.create_topic("t", topic).await.unwrap();
            let mut first: HashMap<u8, (u32, u64)> = HashMap::new();
            for step in steps {
                match step {
                    Step::Send(ids) => {
                        let messages = ids
                            .iter()
                            .map(|(id, route)| {
                                let value = format!("{id}-{}", "x".repeat(500));
                                let key = (*route < 4).then(|| format!("k{route}"));
                                with_id(&format!("id-{id}"), key.as_deref(), &value)
                            })
                            .collect();
                        let answer = broker.send("t", messages).await.unwrap();
                        for ((id, _), p) in ids.iter().zip(answer) {
                            match first.get(id) {
                                Some(&pos) => {
                                    assert!(p.duplicate, "id {id}: {p:?}");
                                    assert_eq!(placed(&p), pos, "id {id}");
                                }
                                None => {
                                    assert!(!p.duplicate, "id {id}: {p:?}");
                                    first.insert(*id, placed(&p));
                                }
                            }
                        }
                    }
                    Step::Maintain => {
                        broker.maintain(Some("t"), false).await.unwrap();
                    }
                    Step::Restart => {
                        broker.shutdown().await;
                        drop(broker);
                        broker = Broker::open(c.clone()).await.unwrap();
                    }
                    Step::Crash => {
                        drop(broker);
                        broker = reopen(&c).await;
                    }
                }
            }
            let mut seen = HashMap::new();
            for (id, p, o) in stored_ids(&broker, "t").await {
                let id: u8 = String::from_utf8(id.unwrap().to_vec()).unwrap()[3..].parse().unwrap();
                assert_eq!(first[&id], (p, o), "id {id} stored away from its first position");
                assert!(seen.insert(id, ()).is_none(), "id {id} stored twice");
            }
            broker.shutdown().await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_holds_id_tables_only_while_ids_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(config(dir.path())).await.unwrap();
    broker
        .create_topic("t", TopicConfig::default())
        .await
        .unwrap();
    let memory = |broker: &Arc<Broker>| {
        let b = Arc::clone(broker);
        async move {
            b.describe_topic("t")
                .await
                .unwrap()
                .ids
                .unwrap()
                .resident_bytes
        }
    };
    // A table for the default memtable is 57,344 ids × 56 bytes; the runs of a few thousand ids
    // hold a few KiB.
    let table = 57_344 * 56;
    // Messages without ids, then maintenance passes: the index moves its watermarks, no table.
    for round in 0..3 {
        let plain: Vec<NewMessage> = (0..200)
            .map(|i| NewMessage {
                value: Some(Bytes::from(format!("{round}-{i}"))),
                ..NewMessage::default()
            })
            .collect();
        broker.send("t", plain).await.unwrap();
        broker.maintain(Some("t"), false).await.unwrap();
        assert!(memory(&broker).await < 64 << 10, "round {round}");
    }
    // Ids arrive: the memtable has its table until a maintenance pass finds the topic idle.
    for chunk in 0..5 {
        let messages = (0..400)
            .map(|i| with_id(&format!("sub-{chunk}-{i}"), None, "v"))
            .collect();
        broker.send("t", messages).await.unwrap();
    }
    assert!(memory(&broker).await >= table);
    broker.maintain(Some("t"), false).await.unwrap();
    assert!(memory(&broker).await < 64 << 10);
    // Every id is still known, and the next one gets a table again.
    let retry = broker
        .send("t", vec![with_id("sub-3-7", None, "again")])
        .await
        .unwrap();
    assert!(retry[0].duplicate);
    broker
        .send("t", vec![with_id("sub-new", None, "v")])
        .await
        .unwrap();
    assert!(memory(&broker).await >= table);
    broker.shutdown().await;
}
