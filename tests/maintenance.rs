//! Maintenance: `verify` finds damage with its path and position, `dump` prints records,
//! retention removes old segments (never the active one, never what a group still needs), and
//! `compact` works offline and through a running broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::common::server::{
    BrokerProcess, TestServer, ack_deliveries, assert_succeeded, bin, join_group, message, take,
    test_config,
};
use sluice::proto::v1 as pb;
use sluice::storage::{FsyncPolicy, LogConfig, Partition, RealIo, Record, Retention};

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn logs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// A data directory written by a real broker: a topic over several segments and a group with
/// acknowledged messages; stopped cleanly.
async fn populated_data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    fs::write(&config, "[log]\nsegment_bytes = 65536\n").unwrap();
    let broker = BrokerProcess::spawn(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let mut client = pb::broker_client::BrokerClient::new(
        sluice::cli::connect(&broker.addr.to_string())
            .await
            .unwrap(),
    );
    for i in 0..40 {
        let messages = (0..10)
            .map(|j| message(format!("{i}-{j}-{}", "x".repeat(500))))
            .collect();
        client
            .send(pb::SendRequest {
                topic: "t".into(),
                messages,
            })
            .await
            .unwrap();
    }
    let mut member = join_group(&mut client, "t", "g", 0, false).await;
    let got = take(&mut member, 50).await;
    ack_deliveries(&mut client, "t", "g", &got).await;
    drop(member);
    broker.signal("TERM");
    assert!(broker.wait().success());
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_a_sound_data_dir_and_names_each_damage_with_path_and_position() {
    let dir = populated_data_dir().await;
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let out = sluice(&["verify", "--data-dir", data_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_succeeded(&out, &stdout);
    assert!(stdout.contains(": 0 problems"), "{stdout}");

    // One flipped bit in a closed segment.
    let partition = data.join("topics/t/0");
    let segments = logs(&partition);
    assert!(segments.len() >= 3, "{segments:?}");
    let mut bytes = fs::read(&segments[0]).unwrap();
    bytes[16 + 100] ^= 0x10;
    fs::write(&segments[0], bytes).unwrap();
    // A truncated index of another closed segment.
    let index = segments[1].with_extension("index");
    OpenOptions::new()
        .write(true)
        .open(&index)
        .unwrap()
        .set_len(16 + 8 + 3)
        .unwrap();
    // A corrupted group state file.
    let group_log = &logs(&data.join("groups/g/t"))[0];
    let mut bytes = fs::read(group_log).unwrap();
    bytes[16 + 20] ^= 0x01;
    fs::write(group_log, bytes).unwrap();

    let out = sluice(&["verify", "--data-dir", data_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(!out.status.success(), "{stdout}");
    let expect = [
        format!("{}:16: batch CRC mismatch", segments[0].display()),
        format!("{}:24: index cut inside an entry", index.display()),
        format!("{}:16: batch CRC mismatch", group_log.display()),
    ];
    for line in &expect {
        assert!(
            stdout.contains(line.as_str()),
            "missing {line:?} in:\n{stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_prints_records_from_an_offset() {
    let dir = populated_data_dir().await;
    let data = dir.path().join("data");
    let out = sluice(&[
        "dump",
        "--data-dir",
        data.to_str().unwrap(),
        "--topic",
        "t",
        "--from",
        "5",
        "--count",
        "3",
        "--format",
        "json",
    ]);
    assert_succeeded(&out, "");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["offset"], 5 + i as u64);
        assert!(
            l["value"]
                .as_str()
                .unwrap()
                .starts_with(&format!("0-{}-", 5 + i))
        );
    }
    let out = sluice(&[
        "dump",
        "--data-dir",
        data.to_str().unwrap(),
        "--topic",
        "../etc",
    ]);
    assert!(!out.status.success());
}

fn record(ts: i64) -> Record {
    Record {
        timestamp: ts,
        value: Some(bytes::Bytes::from(vec![b'v'; 1000])),
        ..Record::default()
    }
}

#[test]
fn retention_deletes_old_and_oversize_segments_but_never_the_active_one_or_unconsumed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 16 << 10,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    };
    let p = Partition::open(dir.path(), config, Arc::new(RealIo), None).unwrap();
    for i in 0..100 {
        p.append_blocking(&[record(1_000 + i)]).unwrap();
    }
    let bases = p.segment_bases();
    assert!(bases.len() >= 5);
    let now = 10_000;
    // Everything is older than 1 s: all closed segments go, the active one stays.
    let age = Retention {
        max_age_ms: Some(1_000),
        ..Retention::default()
    };
    // A group that acknowledged up to the third segment holds the rest back.
    let held = Retention {
        keep_from: Some(bases[2]),
        ..age
    };
    let dry = p.retain(&held, now, true).unwrap();
    assert_eq!(dry.deleted_segments, 2);
    assert_eq!(dry.held_segments, bases.len() - 3);
    assert_eq!(p.segment_bases(), bases, "a dry run changes nothing");
    p.retain(&held, now, false).unwrap();
    assert_eq!(p.segment_bases(), bases[2..].to_vec());
    assert_eq!(p.log_start(), bases[2]);
    // Once acknowledged, the rest goes, except the active segment.
    let out = p.retain(&age, now, false).unwrap();
    assert_eq!(out.held_segments, 0);
    assert_eq!(p.segment_bases(), vec![*bases.last().unwrap()]);
    assert_eq!(p.high_water(), 100);
    // Size: keep at most ~2 segments' worth.
    for i in 0..100 {
        p.append_blocking(&[record(i)]).unwrap();
    }
    let size = Retention {
        max_bytes: Some(40 << 10),
        ..Retention::default()
    };
    p.retain(&size, now, false).unwrap();
    assert!(
        p.stats().size_bytes <= (40 << 10) + (16 << 10),
        "{:?}",
        p.stats()
    );
    assert!(p.stats().segments >= 2);
    // Nothing is too old at time 0: nothing goes.
    let before = p.segment_bases();
    p.retain(&age, 0, false).unwrap();
    assert_eq!(p.segment_bases(), before);
}

/// Topic `t`: one partition, every message expired at once (`retention_ms` 0), and 100
/// messages of about 900 bytes (several segments of 16 KiB).
async fn expired_topic(
    client: &mut sluice::proto::v1::broker_client::BrokerClient<tonic::transport::Channel>,
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) {
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "t".into(),
            settings: Some(pb::TopicSettings {
                partitions: 1,
                retention_ms: Some(0),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for i in 0..100 {
        client
            .send(pb::SendRequest {
                topic: "t".into(),
                messages: vec![message(format!("{i}-{}", "x".repeat(900)))],
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_compaction_honours_a_lagging_group_and_reports_it_in_describe() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.log.segment_bytes = 16 << 10;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    expired_topic(&mut client, &mut admin).await;
    // A group that has acknowledged the first 30 messages.
    let mut member = join_group(&mut client, "t", "slow", 30, false).await;
    let got = take(&mut member, 30).await;
    ack_deliveries(&mut client, "t", "slow", &got).await;
    let describe = |a: &mut pb::admin_client::AdminClient<tonic::transport::Channel>| {
        let mut a = a.clone();
        async move {
            a.describe_topic(pb::DescribeTopicRequest { name: "t".into() })
                .await
                .unwrap()
                .into_inner()
                .partitions[0]
                .clone()
        }
    };
    let before = describe(&mut admin).await;
    assert!(before.retention_held_bytes > 0);
    assert_eq!(before.retention_held_by, "slow");

    let report = admin
        .compact(pb::CompactRequest {
            topic: "t".into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let p = &report.partitions[0];
    assert!(p.deleted_segments > 0);
    assert!(p.held_segments > 0);
    assert_eq!(p.held_by, "slow");
    assert!(
        p.first_offset <= 30,
        "nothing the group still needs is gone"
    );
    // The group carries on from where it was.
    let rest = take(&mut member, 1).await;
    assert!(rest[0].offset >= 30);
}

#[test]
fn offline_compaction_refuses_a_data_dir_a_broker_holds() {
    let dir = tempfile::tempdir().unwrap();
    let _broker = BrokerProcess::spawn(dir.path(), &[]);
    let out = sluice(&["compact", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--broker"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_messages_retention_deleted_resumes_at_the_new_start() {
    use sluice::broker::groups::Membership;
    use sluice::broker::{Broker, NewMessage, Start};
    use sluice::storage::TopicConfig;

    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.log.segment_bytes = 16 << 10;
    let broker = Broker::open(config).await.unwrap();
    broker
        .create_topic(
            "t",
            TopicConfig {
                retention_ms: Some(0),
                retain_until_consumed: false,
                ..TopicConfig::default()
            },
        )
        .await
        .unwrap();
    for i in 0..100 {
        let m = NewMessage {
            key: None,
            value: Some(format!("{i}-{}", "x".repeat(900)).into()),
            headers: Vec::new(),
            partition: None,
            id: None,
        };
        broker.send("t", vec![m]).await.unwrap();
    }
    // The group takes and acknowledges the first 10, then its member leaves.
    let (member, mut rx) = broker
        .subscribe_group(
            "t",
            "g",
            Start::Earliest,
            Membership {
                max_in_flight: 10,
                ..Membership::default()
            },
        )
        .await
        .unwrap();
    let got = rx.recv().await.unwrap().unwrap().into_deliveries().unwrap();
    assert_eq!(got.first().map(|d| d.record.offset), Some(0));
    let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
    broker.ack("g", "t", &ids).await.unwrap();
    drop((member, rx));

    // Retention that does not wait for consumers deletes every closed segment.
    broker.maintain(Some("t"), false).await.unwrap();
    let start = broker.describe_topic("t").await.unwrap().partitions[0].first_offset;
    assert!(start > 10, "retention deleted past the group's position");

    // Back, the group goes on without a gap up to the end, never repeating what it acked. (It
    // may start before `start`: records the dispatcher had already read ahead into memory are
    // still delivered.)
    let (_member, mut rx) = broker
        .subscribe_group(
            "t",
            "g",
            Start::Earliest,
            Membership {
                max_in_flight: 1000,
                ..Membership::default()
            },
        )
        .await
        .unwrap();
    let mut offsets = Vec::new();
    while offsets.last().is_none_or(|&o| o < 99) {
        let batch = rx.recv().await.unwrap().unwrap().into_deliveries().unwrap();
        offsets.extend(batch.iter().map(|d| d.record.offset));
    }
    let first = offsets[0];
    assert!(first >= 10, "acknowledged messages never come back");
    assert!(first <= start, "nothing that still exists is skipped");
    assert_eq!(
        offsets,
        (first..100).collect::<Vec<_>>(),
        "in order, no gap"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_retention_run_deletes_old_segments_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.log.segment_bytes = 16 << 10;
    // Every 100 ms; nothing in this test asks for a pass.
    config.retention_check_ms = 100;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    expired_topic(&mut client, &mut admin).await;
    // Waits for the run itself (a generous deadline: it comes every 100 ms).
    let first = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            let p = admin
                .describe_topic(pb::DescribeTopicRequest { name: "t".into() })
                .await
                .unwrap()
                .into_inner()
                .partitions[0]
                .clone();
            if p.first_offset > 0 {
                return p;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the periodic run deleted the closed segments");
    // Everything closed went; the active segment stays, and with it the newest messages.
    assert_eq!(first.next_offset, 100);
    assert!(first.first_offset < 100, "{first:?}");
    let mut stream = common::server::subscribe_from(&mut client, "t", None).await;
    let got = take(&mut stream, (100 - first.first_offset) as usize).await;
    assert_eq!(got.last().map(|d| d.offset), Some(99));
}
