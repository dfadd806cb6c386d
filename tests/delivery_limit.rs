//! `groups.max_deliveries` holds on every path: a message is handed to members at most that many
//! times, whatever fails it (Nack, ack timeout, a member leaving, a broker restart, exclusive
//! failover), and the next failure dead-letters it exactly once. Read-ahead that never reached a
//! client does not count; acks say what they applied; a refused Subscribe creates nothing.
//! The cluster variant, with the group's leader killed or stopped among the random steps, is
//! `tests/cluster/groups.rs` (`no_message_is_handed_out_more_than_max_deliveries_through_leader_changes`),
//! beside the cluster harness it needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::server::{
    BrokerProcess, TestServer, ack_deliveries, assert_succeeded, bin, join_group, message, take,
    test_config,
};
use sluice::proto::v1 as pb;
use tonic::Code;

const MAX: u32 = 3;
const MESSAGES: usize = 6;

fn config(dir: &Path) -> sluice::config::Config {
    let mut c = test_config(dir);
    c.groups.max_deliveries = MAX;
    c.groups.ack_timeout_ms = 300;
    c.default_partitions = 2;
    c
}

/// A small deterministic generator (xorshift), so each seed is one reproducible interleaving.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Failure {
    Nack,
    Leave,
    AckTimeout,
    Restart,
}

async fn dlq_records(server: &TestServer) -> Vec<pb::Delivery> {
    let mut admin = server.admin().await;
    let Ok(d) = admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "p.dlq".into(),
        })
        .await
    else {
        return Vec::new();
    };
    let n = d.into_inner().partitions[0].next_offset as usize;
    if n == 0 {
        return Vec::new();
    }
    let mut client = server.client().await;
    let mut s = common::server::subscribe_from(&mut client, "p.dlq", None).await;
    take(&mut s, n).await
}

fn header<'a>(d: &'a pb::Delivery, key: &str) -> &'a str {
    let h = d.headers.iter().find(|h| h.key == key).unwrap();
    std::str::from_utf8(&h.value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_is_handed_out_more_than_max_deliveries_on_any_path() {
    for seed in 1..=4u64 {
        let exclusive = seed % 2 == 0;
        let dir = tempfile::tempdir().unwrap();
        let mut server = TestServer::start(config(dir.path())).await;
        let mut client = server.client().await;
        client
            .send(pb::SendRequest {
                topic: "p".into(),
                messages: (0..MESSAGES).map(|i| message(format!("m{i}"))).collect(),
            })
            .await
            .unwrap();
        let mut rng = Rng(seed * 0x9e37_79b9_7f4a_7c15);
        // Every handing observed by a client: (partition, offset) -> attempts, in order.
        let mut seen: BTreeMap<(u32, u64), Vec<u32>> = BTreeMap::new();
        let mut trace = Vec::new();
        for _step in 0..200 {
            let failure = match rng.below(4) {
                0 => Failure::Nack,
                1 => Failure::Leave,
                2 => Failure::AckTimeout,
                _ => Failure::Restart,
            };
            trace.push(failure);
            let max_in_flight = 1 + rng.below(3) as u32;
            let mut stream = join_group(&mut client, "p", "g", max_in_flight, exclusive).await;
            // The next delivery, unless the group has nothing left: every message acknowledged
            // or dead-lettered.
            let mut admin = server.admin().await;
            let done = async {
                loop {
                    let d = admin
                        .describe_group(pb::DescribeGroupRequest { group: "g".into() })
                        .await
                        .unwrap()
                        .into_inner();
                    if d.topics[0].partitions.iter().all(|p| p.lag == 0) {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            };
            let mut got = tokio::select! {
                got = take(&mut stream, 1) => got,
                () = done => break,
            };
            if matches!(failure, Failure::AckTimeout) && got.iter().any(|d| d.attempt < MAX) {
                // Not acked: it comes back after the timeout (to this member, the only one).
                let again = take(&mut stream, 1).await;
                got.extend(again);
            }
            for d in &got {
                seen.entry((d.partition, d.offset))
                    .or_default()
                    .push(d.attempt);
            }
            match failure {
                Failure::Nack => {
                    let ids = got.iter().map(|d| d.ack_id.clone()).collect();
                    client
                        .nack(pb::NackRequest {
                            group: "g".into(),
                            topic: "p".into(),
                            ack_ids: ids,
                            delay_ms: 0,
                        })
                        .await
                        .unwrap();
                    drop(stream);
                }
                Failure::Leave | Failure::AckTimeout => drop(stream),
                Failure::Restart => {
                    server.stop().await;
                    drop(stream);
                    server = TestServer::start(config(dir.path())).await;
                    client = server.client().await;
                }
            }
        }
        let context = format!("seed {seed} (exclusive: {exclusive}), steps {trace:?}");
        for (id, attempts) in &seen {
            // Strictly increasing and never past MAX. (A number can be missing: a delivery
            // handed to the transport counts even when the client dropped its stream before
            // reading it.)
            assert!(
                attempts.windows(2).all(|w| w[0] < w[1]) && attempts.iter().all(|&a| a <= MAX),
                "{id:?} was handed out as {attempts:?}; {context}"
            );
        }
        assert_eq!(seen.len(), MESSAGES, "{context}");
        // Each message failed MAX times: dead-lettered exactly once.
        let dlq = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let d = dlq_records(&server).await;
                if d.len() >= MESSAGES {
                    return d;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every message reached the dead-letter topic");
        let mut dead: Vec<(u32, u64)> = dlq
            .iter()
            .map(|d| {
                assert_eq!(
                    header(d, "sluice.dlq.attempts"),
                    MAX.to_string(),
                    "{context}"
                );
                (
                    header(d, "sluice.dlq.partition").parse().unwrap(),
                    header(d, "sluice.dlq.offset").parse().unwrap(),
                )
            })
            .collect();
        dead.sort_unstable();
        let want: Vec<(u32, u64)> = seen.keys().copied().collect();
        assert_eq!(dead, want, "{context}");
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_nacks_say_what_they_applied_and_a_refused_subscribe_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    c.default_partitions = 1;
    let server = TestServer::start(c).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    client
        .send(pb::SendRequest {
            topic: "t".into(),
            messages: (0..3).map(|i| message(format!("m{i}"))).collect(),
        })
        .await
        .unwrap();
    let refused = client
        .subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            group: "g".into(),
            max_in_flight: 20_000,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let groups = admin
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert!(groups.is_empty(), "{groups:?}");
    assert!(!dir.path().join("groups/g").exists());

    let mut stream = join_group(&mut client, "t", "g", 0, false).await;
    take(&mut stream, 3).await;
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let acked = client
        .ack(pb::AckRequest {
            group: "g".into(),
            topic: "t".into(),
            ack_ids: ids(&["0:0", "0:0", "0:7", "0:1"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acked.acked, ids(&["0:0", "0:1"]));
    assert_eq!(acked.not_in_flight, ids(&["0:0", "0:7"]));

    let too_long = client
        .nack(pb::NackRequest {
            group: "g".into(),
            topic: "t".into(),
            ack_ids: ids(&["0:2"]),
            delay_ms: u64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    for (want_nacked, want_not) in [(ids(&["0:2"]), vec![]), (vec![], ids(&["0:2"]))] {
        let nacked = client
            .nack(pb::NackRequest {
                group: "g".into(),
                topic: "t".into(),
                ack_ids: ids(&["0:2"]),
                delay_ms: 3_600_000,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (nacked.nacked, nacked.not_in_flight),
            (want_nacked, want_not)
        );
    }
}

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// The committed offset, redeliveries and dead letters of `group` on its one topic's one
/// partition.
async fn one_partition_counts(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    group: &str,
) -> (u64, u64, u64) {
    let d = admin
        .describe_group(pb::DescribeGroupRequest {
            group: group.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let p = &d.topics[0].partitions[0];
    (p.committed_offset, p.redeliveries, p.dead_lettered)
}

/// `sluice consume --group --count N` takes only what it prints and acks all of it before it
/// leaves, also when each message's first attempt is its last: nothing it printed is redelivered
/// or dead-lettered, and nothing it did not print was handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_with_a_count_takes_only_what_it_prints_so_attempts_are_not_burnt() {
    for max_deliveries in ["1", "5"] {
        let dir = tempfile::tempdir().unwrap();
        let broker = BrokerProcess::spawn_with_env(
            dir.path(),
            &[],
            &[("SLUICE_GROUPS_MAX_DELIVERIES", max_deliveries)],
        );
        let addr = broker.addr.to_string();
        let mut client =
            pb::broker_client::BrokerClient::new(sluice::cli::connect(&addr).await.unwrap());
        client
            .send(pb::SendRequest {
                topic: "t".into(),
                messages: (0..20).map(|i| message(format!("m{i}"))).collect(),
            })
            .await
            .unwrap();
        for i in 0..6 {
            let out = sluice(&[
                "consume", "--broker", &addr, "--topic", "t", "--group", "G", "--count", "1",
            ]);
            assert_succeeded(&out, "");
            assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("m{i}\n"));
        }
        let out = sluice(&[
            "consume", "--broker", &addr, "--topic", "t", "--group", "G", "--count", "14",
            "--format", "json",
        ]);
        assert_succeeded(&out, "");
        let rest: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let offsets: Vec<u64> = rest.iter().map(|d| d["offset"].as_u64().unwrap()).collect();
        assert_eq!(offsets, (6..20).collect::<Vec<u64>>());
        assert!(
            rest.iter().all(|d| d["attempt"].as_u64() == Some(1)),
            "no message was handed out before: {rest:?}"
        );
        let mut admin =
            pb::admin_client::AdminClient::new(sluice::cli::connect(&addr).await.unwrap());
        assert_eq!(
            one_partition_counts(&mut admin, "G").await,
            (20, 0, 0),
            "group_max_deliveries {max_deliveries}"
        );
    }
}

/// What a member does with the deliveries its `limit` let it take, before it leaves.
#[derive(Debug, Clone, Copy)]
enum WithTheLast {
    Ack,
    Nack,
    LetTimeOut,
}

/// A member subscribed with a `limit` is assigned no more than that many deliveries over its
/// life, whatever frees room in its window (acks, a Nack, an ack timeout); what it does not
/// take, and what it gives back, goes to the other members; leaving after acking dead-letters
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_is_given_no_more_than_its_limit_whatever_frees_its_window() {
    for last in [WithTheLast::Ack, WithTheLast::Nack, WithTheLast::LetTimeOut] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.default_partitions = 1;
        let server = TestServer::start(c).await;
        let mut client = server.client().await;
        client
            .send(pb::SendRequest {
                topic: "t".into(),
                messages: (0..10).map(|i| message(format!("m{i}"))).collect(),
            })
            .await
            .unwrap();
        let mut limited = client
            .subscribe(pb::SubscribeRequest {
                topic: "t".into(),
                group: "G".into(),
                limit: 3,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let taken = take(&mut limited, 3).await;
        let offsets: Vec<u64> = taken.iter().map(|d| d.offset).collect();
        assert_eq!(offsets, [0, 1, 2], "{last:?}");
        let acked = ack_deliveries(&mut client, "t", "G", &taken[..2]).await;
        assert_eq!(acked.acked.len(), 2);
        let given_back = match last {
            WithTheLast::Ack => {
                let acked = ack_deliveries(&mut client, "t", "G", &taken[2..]).await;
                assert_eq!(acked.acked.len(), 1);
                0
            }
            WithTheLast::Nack => {
                let nacked = client
                    .nack(pb::NackRequest {
                        group: "G".into(),
                        topic: "t".into(),
                        ack_ids: vec![taken[2].ack_id.clone()],
                        delay_ms: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(nacked.nacked.len(), 1);
                1
            }
            // The ack timeout (300 ms) gives it back while the member stays.
            WithTheLast::LetTimeOut => 1,
        };
        // Everything the limited member did not take (and what it gave back, at its second
        // attempt) goes to another member: had the limited one been given more, these would be
        // in flight to it, and missing here.
        // Each response is acked as it arrives: none of them waits out its own ack timeout
        // (300 ms) while the given-back one comes.
        let mut other = join_group(&mut client, "t", "G", 0, false).await;
        let mut rest = Vec::new();
        while rest.len() < 7 + given_back {
            let response = take(&mut other, 1).await;
            let acked = ack_deliveries(&mut client, "t", "G", &response).await;
            assert_eq!(acked.acked.len(), response.len(), "{last:?}");
            rest.extend(response);
        }
        let mut got: Vec<(u64, u32)> = rest.iter().map(|d| (d.offset, d.attempt)).collect();
        got.sort_unstable();
        let mut want: Vec<(u64, u32)> = (3..10).map(|o| (o, 1)).collect();
        if given_back == 1 {
            want.insert(0, (2, 2));
        }
        assert_eq!(got, want, "{last:?}");
        drop(limited);
        drop(other);
        assert_eq!(
            one_partition_counts(&mut server.admin().await, "G").await,
            (10, given_back as u64, 0),
            "{last:?}"
        );
    }
}
