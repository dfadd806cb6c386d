//! Damage is contained: readers get every intact record before a bad batch and then
//! `DATA_LOSS` naming topic, partition, offsets and file; a group member hears it on its stream,
//! `DescribeGroup` shows the blocked partition, and a reset of that partition moves the group
//! past it. `dump` reports damage and fails; `verify` and `dump` refuse a directory that is not
//! a data directory; `compact --dry-run` reports what the real run drops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::server::{
    TestServer, ack_deliveries, bin, join_group, keyed, message, subscribe_from, take, test_config,
};
use sluice::proto::v1 as pb;
use sluice::proto::v1::start_position::Kind;
use tonic::Code;

fn config(dir: &Path) -> sluice::config::Config {
    let mut c = test_config(dir);
    c.log.segment_bytes = 64 << 10;
    c
}

fn logs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn base_of(path: &Path) -> u64 {
    path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

/// Sends `n` messages to topic `t`, ten per request (so ten per batch on disk), each value its
/// offset as 100 digits.
async fn send_numbered(
    client: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    n: u64,
) {
    for chunk in 0..n / 10 {
        client
            .send(pb::SendRequest {
                topic: "t".into(),
                messages: (0..10)
                    .map(|i| message(format!("{:0100}", chunk * 10 + i)))
                    .collect(),
            })
            .await
            .unwrap();
    }
}

/// Reads a stream until it ends; returns the deliveries and the status that ended it.
async fn read_to_end(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
    until: u64,
) -> (Vec<pb::Delivery>, Option<tonic::Status>) {
    let mut got = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(r)) => {
                got.extend(r.deliveries);
                if got.last().is_some_and(|d| d.offset + 1 >= until) {
                    return (got, None);
                }
            }
            Ok(None) => return (got, None),
            Err(e) => return (got, Some(e)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_get_every_intact_record_before_damage_then_data_loss_and_groups_can_move_past_it()
{
    const N: u64 = 3000;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut client = server.client().await;
    send_numbered(&mut client, N).await;
    server.stop().await;
    // One flipped byte in the middle of the second (closed) segment.
    let partition = dir.path().join("topics/t/0");
    let segments = logs(&partition);
    assert!(segments.len() >= 4, "{segments:?}");
    let damaged = &segments[1];
    let (first, next) = (base_of(damaged), base_of(&segments[2]));
    let mut bytes = std::fs::read(damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(damaged, bytes).unwrap();

    let server = TestServer::start(config(dir.path())).await;
    let mut client = server.client().await;
    let mut intact_end = None;
    for from in [0, 100, first, first + 1] {
        let mut s =
            subscribe_from(&mut client, "t", common::server::start(Kind::Offset(from))).await;
        let (got, status) = read_to_end(&mut s, N).await;
        let status = status.unwrap_or_else(|| {
            let v = Command::new(bin())
                .args(["verify", "--data-dir", dir.path().to_str().unwrap()])
                .output()
                .unwrap();
            panic!(
                "from {from}: {} records and no error; first {:?} last {:?}; verify: {}",
                got.len(),
                got.first().map(|d| d.offset),
                got.last().map(|d| d.offset),
                String::from_utf8_lossy(&v.stdout)
            )
        });
        assert_eq!(status.code(), Code::DataLoss, "{status:?}");
        let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
        let end = from + offsets.len() as u64;
        assert_eq!(offsets, (from..end).collect::<Vec<_>>(), "from {from}");
        // Everything before the damaged segment, and its intact first batches.
        assert!(end > first && end < next, "from {from}: stopped at {end}");
        let want_end = *intact_end.get_or_insert(end);
        assert_eq!(end, want_end.max(from), "from {from}");
        let text = status.message();
        for part in [
            "topic \"t\" partition 0".to_string(),
            format!("records {end} to {}", next - 1),
            damaged.file_name().unwrap().to_str().unwrap().to_string(),
        ] {
            assert!(text.contains(&part), "{part:?} not in {text:?}");
        }
    }
    let intact_end = intact_end.unwrap();
    // Past the damage, everything reads.
    let mut s = subscribe_from(&mut client, "t", common::server::start(Kind::Offset(next))).await;
    let got = take(&mut s, (N - next) as usize).await;
    assert_eq!(got.last().unwrap().offset, N - 1);

    // Whatever a member's window, it gets every intact record (acking as it goes) before it
    // hears DATA_LOSS: the error never overtakes records read before the damage.
    for window in [1, 64, 700] {
        let group = format!("window-{window}");
        let mut member = join_group(&mut client, "t", &group, window, false).await;
        let mut offsets = Vec::new();
        let status = loop {
            match member.message().await {
                Ok(Some(r)) => {
                    offsets.extend(r.deliveries.iter().map(|d| d.offset));
                    ack_deliveries(&mut client, "t", &group, &r.deliveries).await;
                }
                Ok(None) => panic!("window {window}: the stream ended without an error"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), Code::DataLoss, "window {window}: {status:?}");
        assert_eq!(
            offsets,
            (0..intact_end).collect::<Vec<_>>(),
            "window {window}"
        );
    }

    // A group member: every intact record, then DATA_LOSS on its stream, and DescribeGroup says
    // why; a reset of the partition past the damage lets the group go on.
    let mut member = join_group(&mut client, "t", "g", 5000, false).await;
    let (got, status) = read_to_end(&mut member, N).await;
    assert_eq!(got.len() as u64, intact_end);
    assert_eq!(status.unwrap().code(), Code::DataLoss);
    ack_deliveries(&mut client, "t", "g", &got).await;
    drop(member);
    let mut admin = server.admin().await;
    let d = admin
        .describe_group(pb::DescribeGroupRequest { group: "g".into() })
        .await
        .unwrap()
        .into_inner();
    let p = &d.topics[0].partitions[0];
    assert!(
        p.blocked.contains(&format!("records {intact_end} to")),
        "{p:?}"
    );
    assert_eq!(p.committed_offset, intact_end);
    admin
        .reset_group(pb::ResetGroupRequest {
            group: "g".into(),
            topic: "t".into(),
            to: common::server::start(Kind::Offset(next)),
            force: false,
            partitions: vec![0],
        })
        .await
        .unwrap();
    let mut member = join_group(&mut client, "t", "g", 5000, false).await;
    let got = take(&mut member, (N - next) as usize).await;
    assert_eq!(got[0].offset, next);
    assert_eq!(got.last().unwrap().offset, N - 1);
    drop(member);
    server.stop().await;

    // dump prints the intact records, says on stderr what it skipped, and fails.
    let out = Command::new(bin())
        .args([
            "dump",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--topic",
            "t",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout).lines().count() as u64;
    assert_eq!(printed, intact_end + (N - next));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("damaged: {}", damaged.display()))
            && stderr.contains(&format!(
                "records from offset {intact_end} to offset {}",
                next - 1
            )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_that_meets_damage_stops_the_group_and_tells_its_members() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut client = server.client().await;
    send_numbered(&mut client, 1000).await;
    let mut member = join_group(&mut client, "t", "g", 5, false).await;
    let got = take(&mut member, 5).await;
    // The first batch (offsets 0-9, in a closed segment) is damaged after it was delivered.
    let first = &logs(&dir.path().join("topics/t/0"))[0];
    let mut bytes = std::fs::read(first).unwrap();
    bytes[16 + 200] ^= 0x01;
    std::fs::write(first, bytes).unwrap();
    client
        .nack(pb::NackRequest {
            group: "g".into(),
            topic: "t".into(),
            ack_ids: got.iter().map(|d| d.ack_id.clone()).collect(),
            delay_ms: 0,
        })
        .await
        .unwrap();
    let (after, status) = read_to_end(&mut member, u64::MAX).await;
    // Nothing at or past the damage goes out (the rest of the damaged batch, the records after
    // it): the group waits there for a reset.
    assert!(
        after.is_empty(),
        "{:?}",
        after.iter().map(|d| d.offset).collect::<Vec<_>>()
    );
    let status = status.expect("the member is told");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains("topic \"t\" partition 0"),
        "{status:?}"
    );
    let d = server
        .admin()
        .await
        .describe_group(pb::DescribeGroupRequest { group: "g".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!d.topics[0].partitions[0].blocked.is_empty(), "{d:?}");
}

#[test]
fn verify_and_dump_refuse_a_directory_that_is_not_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let d = dir.path().to_str().unwrap();
    for args in [
        vec!["verify", "--data-dir", d],
        vec!["dump", "--data-dir", d, "--topic", "t"],
    ] {
        let out = Command::new(bin()).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not a Sluice data directory"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_dry_run_reports_what_the_real_run_then_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "k".into(),
            settings: Some(pb::TopicSettings {
                partitions: 1,
                cleanup_policy: pb::CleanupPolicy::Compact as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for round in 0..30 {
        client
            .send(pb::SendRequest {
                topic: "k".into(),
                messages: (0..50)
                    .map(|k| keyed(&format!("key{k}"), format!("{round}:{}", "v".repeat(60))))
                    .collect(),
            })
            .await
            .unwrap();
    }
    let compact = |dry_run| {
        let mut a = admin.clone();
        async move {
            a.compact(pb::CompactRequest {
                topic: "k".into(),
                dry_run,
            })
            .await
            .unwrap()
            .into_inner()
            .partitions
            .remove(0)
        }
    };
    let planned = compact(true).await;
    assert!(planned.records_dropped > 0, "{planned:?}");
    let done = compact(false).await;
    assert_eq!(
        (
            planned.records_dropped,
            planned.segments_after,
            planned.bytes_after
        ),
        (done.records_dropped, done.segments_after, done.bytes_after)
    );
}
