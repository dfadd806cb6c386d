//! Consumer groups over loopback: sharing, redelivery when a member leaves or an ack times out,
//! dead letters, exclusive failover, reset and describe, resuming after SIGKILL, and the seed
//! design's API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::server::{
    BrokerProcess, TestServer, ack_deliveries as ack, join_group as join, message, subscribe_from,
    take, test_config,
};
use sluice::proto::v1 as pb;
use sluice::proto::v1::broker_client::BrokerClient;
use sluice::proto::v1::start_position::Kind;
use tonic::Code;
use tonic::transport::Channel;

type Client = BrokerClient<Channel>;

async fn produce(client: &mut Client, topic: &str, n: usize) {
    let messages = (0..n).map(|i| message(format!("m{i}"))).collect();
    client
        .send(pb::SendRequest {
            topic: topic.into(),
            messages,
        })
        .await
        .unwrap();
}

async fn describe(
    server_admin: &mut sluice::proto::v1::admin_client::AdminClient<Channel>,
    group: &str,
) -> pb::DescribeGroupResponse {
    server_admin
        .describe_group(pb::DescribeGroupRequest {
            group: group.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_share_a_topic_and_no_message_goes_to_both_while_they_ack() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    server
        .admin()
        .await
        .create_topic(pb::CreateTopicRequest {
            name: "t".into(),
            settings: Some(pb::TopicSettings {
                partitions: 2,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for _ in 0..4 {
        produce(&mut client, "t", 50).await;
    }
    let mut members = Vec::new();
    for _ in 0..2 {
        let mut c = client.clone();
        let stream = join(&mut c, "t", "g", 10, false).await;
        members.push((c, stream));
    }
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, (mut c, mut stream)) in members.into_iter().enumerate() {
        let got_tx = got_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                // Acknowledged (durably) before reported, so the count below is final.
                ack(&mut c, "t", "g", &r.deliveries).await;
                for d in &r.deliveries {
                    let _ = got_tx.send((i, d.partition, d.offset, d.attempt));
                }
            }
        });
    }
    drop(got_tx);
    let mut seen = BTreeMap::new();
    let mut per_member = [0usize; 2];
    while seen.len() < 200 {
        let (member, p, o, attempt) = tokio::time::timeout(Duration::from_secs(30), got_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(attempt, 1);
        assert!(
            seen.insert((p, o), member).is_none(),
            "({p}, {o}) went to two members"
        );
        per_member[member] += 1;
    }
    assert!(
        per_member.iter().all(|&n| n > 0),
        "both members got work: {per_member:?}"
    );
    let d = describe(&mut server.admin().await, "g").await;
    let committed: u64 = d.topics[0]
        .partitions
        .iter()
        .map(|p| p.committed_offset)
        .sum();
    assert_eq!(committed, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gets_every_message_of_a_long_partition_once_and_in_order() {
    // 30 MiB: the dispatcher reads the partition ahead in many reads while the member acks.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let value = bytes::Bytes::from(vec![b'v'; 1024]);
    for _ in 0..60 {
        let messages = (0..500).map(|_| message(value.clone())).collect();
        client
            .send(pb::SendRequest {
                topic: "long".into(),
                messages,
            })
            .await
            .unwrap();
    }
    let mut stream = join(&mut client, "long", "g", 1000, false).await;
    let mut next = 0u64;
    while next < 30_000 {
        let r = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the member keeps receiving")
            .unwrap()
            .unwrap();
        for d in &r.deliveries {
            assert_eq!((d.offset, d.attempt), (next, 1), "in order, each once");
            next += 1;
        }
        ack(&mut client, "long", "g", &r.deliveries).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_leaves_without_acking_has_its_messages_redelivered_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    produce(&mut client, "t", 10).await;
    let mut a = join(&mut client, "t", "g", 5, false).await;
    let held = take(&mut a, 5).await;
    let mut b = join(&mut client, "t", "g", 100, false).await;
    let rest = take(&mut b, 5).await;
    ack(&mut client, "t", "g", &rest).await;
    drop(a); // leaves holding five unacknowledged messages
    let again = take(&mut b, 5).await;
    let offsets = |d: &[pb::Delivery]| d.iter().map(|x| x.offset).collect::<BTreeSet<_>>();
    assert_eq!(offsets(&again), offsets(&held));
    assert!(again.iter().all(|d| d.attempt == 2));
    assert!(offsets(&rest).is_disjoint(&offsets(&held)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_not_acked_within_the_ack_timeout_is_delivered_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.groups.ack_timeout_ms = 200;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    produce(&mut client, "t", 1).await;
    let mut member = join(&mut client, "t", "g", 10, false).await;
    let first = take(&mut member, 1).await;
    assert_eq!(first[0].attempt, 1);
    // No ack: the broker's timer, not this test, decides when it comes back.
    let second = take(&mut member, 1).await;
    assert_eq!(second[0].offset, first[0].offset);
    assert_eq!(second[0].attempt, 2);
    ack(&mut client, "t", "g", &second).await;
    let d = describe(&mut server.admin().await, "g").await;
    let p = &d.topics[0].partitions[0];
    // A slow machine may let the timer fire again before the ack: more redeliveries, never
    // fewer, and the ack (of the message, not of one attempt) settles it all the same.
    assert_eq!((p.committed_offset, p.in_flight), (1, 0));
    assert!(p.redeliveries >= 1, "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_nacked_with_a_delay_is_not_delivered_again_sooner() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    produce(&mut client, "t", 2).await;
    let mut member = join(&mut client, "t", "g", 10, false).await;
    let first = take(&mut member, 2).await;
    let delay = Duration::from_millis(500);
    let asked = std::time::Instant::now();
    client
        .nack(pb::NackRequest {
            group: "g".into(),
            topic: "t".into(),
            ack_ids: vec![first[0].ack_id.clone()],
            delay_ms: delay.as_millis() as u64,
        })
        .await
        .unwrap();
    // The other one, acked at once, is not held back with it.
    ack(&mut client, "t", "g", &first[1..]).await;
    let again = take(&mut member, 1).await;
    // A lower bound only: a slow machine makes the redelivery later, never sooner.
    let waited = asked.elapsed();
    assert!(waited >= delay, "delivered again after {waited:?}");
    assert_eq!(again[0].offset, first[0].offset);
    assert_eq!(again[0].attempt, 2);
    ack(&mut client, "t", "g", &again).await;
    let d = describe(&mut server.admin().await, "g").await;
    let p: u64 = d.topics[0].partitions.iter().map(|p| p.in_flight).sum();
    assert_eq!(p, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_nacked_max_deliveries_times_lands_in_the_dead_letter_topic_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.groups.max_deliveries = 3;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    client
        .send(pb::SendRequest {
            topic: "t".into(),
            messages: vec![pb::Message {
                key: Some("patient-7".into()),
                value: Some("poison".into()),
                headers: vec![pb::Header {
                    key: "source".into(),
                    value: "app".into(),
                }],
                partition: None,
                id: None,
            }],
        })
        .await
        .unwrap();
    // Created up front so that we can wait on it; the broker would create it itself.
    server
        .admin()
        .await
        .create_topic(pb::CreateTopicRequest {
            name: "t.dlq".into(),
            settings: None,
        })
        .await
        .unwrap();
    let dlq_stream = subscribe_from(&mut client, "t.dlq", None).await;
    let mut member = join(&mut client, "t", "g", 10, false).await;
    for attempt in 1..=3 {
        let d = take(&mut member, 1).await;
        assert_eq!(d[0].attempt, attempt);
        client
            .nack(pb::NackRequest {
                group: "g".into(),
                topic: "t".into(),
                ack_ids: vec![d[0].ack_id.clone()],
                delay_ms: 0,
            })
            .await
            .unwrap();
    }
    let mut dlq = dlq_stream;
    let dead = take(&mut dlq, 1).await;
    let headers: BTreeMap<String, String> = dead[0]
        .headers
        .iter()
        .map(|h| (h.key.clone(), String::from_utf8(h.value.to_vec()).unwrap()))
        .collect();
    assert_eq!(dead[0].value.as_deref(), Some(&b"poison"[..]));
    assert_eq!(dead[0].key.as_deref(), Some(&b"patient-7"[..]));
    assert_eq!(headers["source"], "app");
    assert_eq!(headers["sluice.dlq.topic"], "t");
    assert_eq!(headers["sluice.dlq.partition"], "0");
    assert_eq!(headers["sluice.dlq.offset"], "0");
    assert_eq!(headers["sluice.dlq.attempts"], "3");
    assert_eq!(headers["sluice.dlq.reason"], "nacked");
    assert_eq!(headers["sluice.dlq.group"], "g");
    // Counted as acknowledged, dead-lettered exactly once. (The group records the dead letter
    // right after the DLQ append became durable: wait for that record, bounded.)
    let mut admin = server.admin().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let d = loop {
        let d = describe(&mut admin, "g").await;
        if d.topics[0].partitions[0].dead_lettered > 0 {
            break d;
        }
        assert!(std::time::Instant::now() < deadline, "{d:?}");
        tokio::task::yield_now().await;
    };
    let p = &d.topics[0].partitions[0];
    assert_eq!(
        (p.committed_offset, p.dead_lettered, p.pending, p.in_flight),
        (1, 1, 0, 0)
    );
    let dlq_topic = admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "t.dlq".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dlq_topic.partitions[0].next_offset, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_member_owns_the_partition_and_its_successor_takes_over_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    produce(&mut client, "t", 20).await;
    let mut a = join(&mut client, "t", "g", 5, true).await;
    let first = take(&mut a, 5).await;
    assert_eq!(
        first.iter().map(|d| d.offset).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    let mut b = join(&mut client, "t", "g", 100, true).await;
    let mut admin = server.admin().await;
    let d = describe(&mut admin, "g").await;
    assert_eq!(d.topics[0].members.len(), 2);
    let owner = d.topics[0].partitions[0].owner;
    assert_eq!(
        owner,
        Some(d.topics[0].members[0].id),
        "the first member keeps the partition"
    );
    // A shared member cannot join an exclusive group.
    let mixed = client
        .subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            group: "g".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        mixed.map(|_| ()).unwrap_err().code(),
        Code::FailedPrecondition
    );

    ack(&mut client, "t", "g", &first[..2]).await;
    drop(a);
    let rest = take(&mut b, 18).await;
    let offsets: Vec<u64> = rest.iter().map(|d| d.offset).collect();
    assert_eq!(
        offsets,
        (2..20).collect::<Vec<_>>(),
        "the successor gets everything, in order"
    );
    // 2, 3, 4 were delivered to the first member (and perhaps more, once its acks made room).
    assert!(rest[..3].iter().all(|d| d.attempt == 2));
    assert!(rest.iter().all(|d| d.attempt <= 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_moves_a_group_and_describe_reports_lag() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    produce(&mut client, "t", 10).await;
    let mut m = join(&mut client, "t", "g", 100, false).await;
    let all = take(&mut m, 10).await;
    ack(&mut client, "t", "g", &all[..6]).await;
    let d = describe(&mut admin, "g").await;
    let p = &d.topics[0].partitions[0];
    assert_eq!(
        (p.committed_offset, p.end_offset, p.lag, p.in_flight),
        (6, 10, 4, 4)
    );
    let admin2 = admin.clone();
    let reset = |force| {
        let mut a = admin2.clone();
        async move {
            a.reset_group(pb::ResetGroupRequest {
                group: "g".into(),
                topic: "t".into(),
                to: Some(pb::StartPosition {
                    kind: Some(Kind::Offset(3)),
                }),
                force,
                partitions: vec![],
            })
            .await
        }
    };
    assert_eq!(
        reset(false).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    drop(m);
    // The member's departure is processed by the broker; wait for it rather than sleep.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !describe(&mut admin, "g").await.topics[0].members.is_empty() {
        assert!(std::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    reset(false).await.unwrap();
    let d = describe(&mut admin, "g").await;
    assert_eq!(d.topics[0].partitions[0].committed_offset, 3);
    let mut m = join(&mut client, "t", "g", 100, false).await;
    let again = take(&mut m, 7).await;
    assert_eq!(
        again.iter().map(|d| d.offset).collect::<Vec<_>>(),
        (3..10).collect::<Vec<_>>()
    );
    drop(m);
    // A member may not ask for more in flight than the broker allows (10,000 by default).
    let greedy = client
        .subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            group: "g".into(),
            max_in_flight: 20_000,
            ..Default::default()
        })
        .await;
    assert_eq!(
        greedy.map(|_| ()).unwrap_err().code(),
        Code::InvalidArgument
    );
    // Unknown groups and bad names.
    let err = admin
        .describe_group(pb::DescribeGroupRequest {
            group: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .ack(pb::AckRequest {
            group: "g".into(),
            topic: "t".into(),
            ack_ids: vec!["garbage".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .ack(pb::AckRequest {
            group: "../g".into(),
            topic: "t".into(),
            ack_ids: vec!["0:1".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Delete once nobody is connected.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match admin
            .delete_group(pb::DeleteGroupRequest { group: "g".into() })
            .await
        {
            Ok(_) => break,
            Err(s) if s.code() == Code::FailedPrecondition => {
                assert!(std::time::Instant::now() < deadline);
                tokio::task::yield_now().await;
            }
            Err(s) => panic!("{s}"),
        }
    }
    let groups = admin
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(groups.groups.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_the_group_resumes_without_redelivering_acked_messages() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::spawn(dir.path(), &[]);
    let mut client = BrokerClient::new(
        sluice::cli::connect(&broker.addr.to_string())
            .await
            .unwrap(),
    );
    produce(&mut client, "t", 100).await;
    let mut m = join(&mut client, "t", "g", 30, false).await;
    let mut seen = Vec::new();
    while seen.len() < 60 {
        let got = take(&mut m, 1).await;
        if seen.len() < 30 {
            ack(&mut client, "t", "g", &got).await;
        }
        seen.extend(got);
    }
    // Acked: everything delivered before this ack is on disk too (one log, in order).
    ack(&mut client, "t", "g", &seen[..40]).await;
    broker.signal("KILL");
    assert!(!broker.wait().success());

    let broker = BrokerProcess::spawn(dir.path(), &[]);
    let mut client = BrokerClient::new(
        sluice::cli::connect(&broker.addr.to_string())
            .await
            .unwrap(),
    );
    let mut m = join(&mut client, "t", "g", 1000, false).await;
    let again = take(&mut m, 60).await;
    let offsets: BTreeSet<u64> = again.iter().map(|d| d.offset).collect();
    assert_eq!(
        offsets,
        (40..100).collect(),
        "exactly the unacknowledged ones"
    );
    assert_eq!(again.len(), 60, "each once");
    for d in &again {
        if d.offset < 60 {
            assert!(
                d.attempt >= 2,
                "offset {} was delivered before: attempt {}",
                d.offset,
                d.attempt
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_api_sends_durably_and_its_group_receives_everything() {
    use sluice::proto::seed;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let channel = server.channel().await;
    let mut sub = seed::broker_client::BrokerClient::new(channel.clone());
    let mut stream = sub
        .subscribe(seed::SubscribeRequest {
            topic: "legacy".into(),
            consumer_group: "persistence".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..100 {
        let mut c = seed::broker_client::BrokerClient::new(channel.clone());
        tasks.spawn(async move {
            for i in 0..100 {
                let r = c
                    .send(seed::SendRequest {
                        msg: Some(seed::Message {
                            topic: "legacy".into(),
                            payload: format!("{t}-{i}").into(),
                        }),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(r.success);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let mut got = BTreeSet::new();
    while got.len() < 10_000 {
        let r = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let msg = r.msg.unwrap();
        assert_eq!(msg.topic, "legacy");
        assert!(got.insert(msg.payload), "duplicate delivery");
    }
    // A send without a message is refused with a status, not `success = false`.
    let err = sub.send(seed::SendRequest { msg: None }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Handed over counts as acknowledged: the group's position moves to the end.
    drop(stream);
    let mut admin = server.admin().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let d = describe(&mut admin, "persistence").await;
        if d.topics[0].partitions[0].committed_offset == 10_000 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{d:?}");
        tokio::task::yield_now().await;
    }
}

/// A Nack's delay holds across a restart of either kind: the nacked messages come back, but
/// not before the delay has passed since the Nack (a lower bound, so no machine is too slow for
/// it), and the ones not nacked are not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_delay_holds_across_a_restart() {
    const DELAY: Duration = Duration::from_secs(4);
    for stop in ["KILL", "TERM"] {
        let dir = tempfile::tempdir().unwrap();
        let broker = BrokerProcess::spawn(dir.path(), &[]);
        let mut client = BrokerClient::new(
            sluice::cli::connect(&broker.addr.to_string())
                .await
                .unwrap(),
        );
        produce(&mut client, "t", 6).await;
        let mut m = join(&mut client, "t", "g", 10, false).await;
        let got = take(&mut m, 6).await;
        let (nacked, left) = got.split_at(3);
        let before_nack = std::time::Instant::now();
        let answer = client
            .nack(pb::NackRequest {
                group: "g".into(),
                topic: "t".into(),
                ack_ids: nacked.iter().map(|d| d.ack_id.clone()).collect(),
                delay_ms: DELAY.as_millis() as u64,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.nacked.len(), 3, "{stop}: {answer:?}");
        drop(m);
        broker.signal(stop);
        broker.wait();

        let broker = BrokerProcess::spawn(dir.path(), &[]);
        let mut client = BrokerClient::new(
            sluice::cli::connect(&broker.addr.to_string())
                .await
                .unwrap(),
        );
        let mut m = join(&mut client, "t", "g", 10, false).await;
        // Those never settled are delivered again at once (none is nacked, so the first three
        // arrivals after the restart are these).
        let first = take(&mut m, left.len()).await;
        let offsets = |ds: &[pb::Delivery]| ds.iter().map(|d| d.offset).collect::<BTreeSet<_>>();
        assert_eq!(offsets(&first), offsets(left), "{stop}: not held back");
        let second = take(&mut m, nacked.len()).await;
        let waited = before_nack.elapsed();
        assert_eq!(offsets(&second), offsets(nacked), "{stop}");
        assert!(
            waited >= DELAY,
            "{stop}: nacked with a {DELAY:?} delay, delivered again after {waited:?}"
        );
        assert!(second.iter().all(|d| d.attempt == 2), "{stop}: {second:?}");
    }
}
