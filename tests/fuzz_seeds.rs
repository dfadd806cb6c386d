//! The fuzz targets' seed corpora (`fuzz/seeds/<target>/`) are what the formats' own encoders
//! write today: a seed that no longer decodes would start the fuzzer from nothing (a CRC or a
//! footer is out of its reach by chance). Each seed is made here and compared with the committed
//! file; `WRITE_FUZZ_SEEDS=1 cargo test --release --test suite fuzz_seeds::` writes them again after a
//! format change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::PathBuf;

use bytes::Bytes;
use sluice::broker::groups::events::{Event, PartitionSnapshot};
use sluice::storage::RealIo;
use sluice::storage::ids::{Entry, Key, Run, run};
use sluice::storage::record::{Batch, Decoded, EncodedBatch};

fn seed_path(target: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
        .join(name)
}

/// Compares `bytes` with the committed seed (or writes it when asked to).
fn seed(target: &str, name: &str, bytes: &[u8]) {
    let path = seed_path(target, name);
    if std::env::var_os("WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        committed == bytes,
        "{} is not what the encoder writes today (WRITE_FUZZ_SEEDS=1 writes it again)",
        path.display()
    );
}

#[test]
fn a_batch_seed_is_a_valid_batch_of_three_records() {
    let mut b = EncodedBatch::new(&[
        common::record(0, 40),
        common::record(1, 10),
        common::record(2, 90),
    ]);
    let bytes = b.seal(5).to_vec();
    let Decoded::Valid(batch) = Batch::decode(&Bytes::from(bytes.clone())) else {
        panic!("the seed batch does not decode");
    };
    assert_eq!(batch.records().filter(Result::is_ok).count(), 3);
    seed("batch", "three-records", &bytes);
}

#[test]
fn the_group_events_seed_holds_one_event_of_each_kind() {
    let events = [
        Event::Delivered {
            partition: 0,
            deliveries: vec![(3, 0), (4, 1)],
        },
        Event::Handed {
            partition: 0,
            deliveries: vec![(3, 1), (4, 2)],
        },
        Event::Acked {
            partition: 0,
            offsets: vec![3],
        },
        Event::Delayed {
            partition: 1,
            delays: vec![(4, 1_700_000_000_000)],
        },
        Event::DeadLettered {
            partition: 0,
            offset: 4,
        },
        Event::Reset {
            partition: 2,
            cursor: 9,
        },
        Event::Snapshot {
            partition: 1,
            state: PartitionSnapshot {
                cursor: 7,
                ..PartitionSnapshot::default()
            },
        },
    ];
    // As the target reads them: a length byte, then the event.
    let mut log = Vec::new();
    for e in &events {
        let bytes = e.encode();
        assert_eq!(Event::decode(&bytes).unwrap(), *e);
        log.push(u8::try_from(bytes.len()).unwrap());
        log.extend_from_slice(&bytes);
    }
    seed("group_events", "one-of-each", &log);
}

#[test]
fn the_id_run_seed_is_a_run_whose_every_id_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries: Vec<(Key, Entry)> = (0..40u64)
        .map(|i| {
            let key = Key::of(format!("submission-{i}").as_bytes());
            let entry = Entry {
                partition: (i % 2) as u32,
                offset: i,
                stored_ms: 1_700_000_000_000,
            };
            (key, entry)
        })
        .collect();
    entries.sort_by_key(|(k, _)| *k);
    let spec = run::Spec {
        lo: 0,
        hi: 100,
        tier: 0,
        watermarks: &[40, 40],
    };
    let made = run::write(dir.path(), &RealIo, &spec, 40, entries.clone().into_iter()).unwrap();
    let reopened = Run::open(made.path(), 2).unwrap();
    for (k, e) in &entries {
        assert_eq!(reopened.get(k).unwrap(), Some(*e));
    }
    seed("id_run", "forty-ids", &std::fs::read(made.path()).unwrap());
}

/// The `requests` target's seeds: one valid request for each RPC (the first byte picks it, in
/// the target's order), so that the fuzzer starts from requests that reach the broker's logic.
#[test]
fn the_request_seeds_are_valid_requests_of_every_rpc() {
    use prost::Message;
    use sluice::proto::seed;
    use sluice::proto::v1 as pb;
    let start = |offset| {
        Some(pb::StartPosition {
            kind: Some(pb::start_position::Kind::Offset(offset)),
        })
    };
    let message = pb::Message {
        key: Some(Bytes::from_static(b"k")),
        value: Some(Bytes::from_static(b"v")),
        headers: vec![pb::Header {
            key: "h".into(),
            value: Bytes::from_static(b"x"),
        }],
        partition: Some(0),
        id: Some(Bytes::from_static(&[7; 16])),
    };
    let requests: Vec<(u8, &str, Vec<u8>)> = vec![
        (
            0,
            "send",
            pb::SendRequest {
                topic: "t".into(),
                messages: vec![message],
            }
            .encode_to_vec(),
        ),
        (
            1,
            "subscribe-group",
            pb::SubscribeRequest {
                topic: "t".into(),
                group: "g".into(),
                max_in_flight: 3,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            1,
            "subscribe-offset",
            pb::SubscribeRequest {
                topic: "t".into(),
                partitions: vec![0],
                start: start(2),
                limit: 2,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            2,
            "ack",
            pb::AckRequest {
                group: "g".into(),
                topic: "t".into(),
                ack_ids: vec!["0:1".into()],
            }
            .encode_to_vec(),
        ),
        (
            3,
            "nack",
            pb::NackRequest {
                group: "g".into(),
                topic: "t".into(),
                ack_ids: vec!["0:1".into()],
                delay_ms: 10,
            }
            .encode_to_vec(),
        ),
        (
            4,
            "create-topic",
            pb::CreateTopicRequest {
                name: "c".into(),
                settings: Some(pb::TopicSettings {
                    partitions: 2,
                    retention_ms: Some(60_000),
                    dedup_window_ms: Some(60_000),
                    ..Default::default()
                }),
            }
            .encode_to_vec(),
        ),
        (
            5,
            "delete-topic",
            pb::DeleteTopicRequest { name: "c".into() }.encode_to_vec(),
        ),
        (
            7,
            "describe-topic",
            pb::DescribeTopicRequest { name: "t".into() }.encode_to_vec(),
        ),
        (
            9,
            "describe-group",
            pb::DescribeGroupRequest { group: "g".into() }.encode_to_vec(),
        ),
        (
            10,
            "reset-group",
            pb::ResetGroupRequest {
                group: "g".into(),
                topic: "t".into(),
                to: start(1),
                force: true,
                partitions: vec![0],
            }
            .encode_to_vec(),
        ),
        (
            11,
            "delete-group",
            pb::DeleteGroupRequest { group: "g".into() }.encode_to_vec(),
        ),
        (
            12,
            "compact",
            pb::CompactRequest {
                topic: "t".into(),
                dry_run: true,
            }
            .encode_to_vec(),
        ),
        (
            18,
            "add-node",
            pb::AddNodeRequest {
                node_id: 4,
                address: "127.0.0.1:7174".into(),
            }
            .encode_to_vec(),
        ),
        (
            19,
            "remove-node",
            pb::RemoveNodeRequest { node_id: 3 }.encode_to_vec(),
        ),
        (
            14,
            "transfer-leader",
            pb::TransferLeaderRequest {
                topic: "t".into(),
                partition: 0,
                to: 2,
            }
            .encode_to_vec(),
        ),
        (
            16,
            "seed-send",
            seed::SendRequest {
                msg: Some(seed::Message {
                    topic: "t".into(),
                    payload: b"p".to_vec().into(),
                }),
            }
            .encode_to_vec(),
        ),
        (
            17,
            "seed-subscribe",
            seed::SubscribeRequest {
                topic: "t".into(),
                consumer_group: "g".into(),
            }
            .encode_to_vec(),
        ),
    ];
    for (rpc, name, body) in requests {
        let mut bytes = vec![rpc];
        bytes.extend_from_slice(&body);
        seed("requests", name, &bytes);
    }
}

/// The `http` target's seeds: a route (the first byte) and the text that fills it.
#[test]
fn the_http_seeds_name_each_route() {
    for (pick, name, text) in [
        (0u8, "topic", "t"),
        (1, "dead-letters", "limit=3&group=g"),
        (2, "dead-letters-of", "t"),
        (3, "group", "g"),
        (4, "groups", "x=1"),
        (8, "console", "index.html"),
    ] {
        let mut bytes = vec![pick];
        bytes.extend_from_slice(text.as_bytes());
        seed("http", name, &bytes);
    }
}
