//! What the broker says back about what a client sent: every call, with a huge value in each
//! string a client fills in, answers its documented status with a short message (the client's
//! input is quoted, cut), and changes nothing; a group named on a topic it never read is told
//! apart from a group that does not exist.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use crate::common::server::{TestServer, ack_deliveries, join_group, message, test_config};
use sluice::proto::seed;
use sluice::proto::seed::broker_client::BrokerClient as SeedClient;
use sluice::proto::v1 as pb;
use sluice::server::status::MAX_MESSAGE_BYTES;
use tonic::Code;

/// 100 KB of a client's text: more than any gRPC client accepts back in one header.
fn huge() -> String {
    "x".repeat(100_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_quoting_a_huge_input_answers_a_short_message_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    let mut seed = SeedClient::new(server.channel().await);
    client
        .send(pb::SendRequest {
            topic: "t".into(),
            messages: vec![message("one")],
        })
        .await
        .unwrap();
    let before = admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner();

    let h = huge();
    let id_message = pb::Message {
        id: Some(h.clone().into()),
        ..message("v")
    };
    // (call, the status its huge input must get)
    let mut calls: Vec<(&str, Result<(), tonic::Status>, Code)> = Vec::new();
    macro_rules! call {
        ($name:expr, $code:expr, $fut:expr) => {
            calls.push(($name, $fut.await.map(|_| ()), $code));
        };
    }
    call!(
        "Send topic",
        Code::InvalidArgument,
        client.send(pb::SendRequest {
            topic: h.clone(),
            messages: vec![message("v")]
        })
    );
    call!(
        "Send id",
        Code::InvalidArgument,
        client.send(pb::SendRequest {
            topic: "t".into(),
            messages: vec![id_message]
        })
    );
    call!(
        "Subscribe topic",
        Code::InvalidArgument,
        client.subscribe(pb::SubscribeRequest {
            topic: h.clone(),
            ..Default::default()
        })
    );
    call!(
        "Subscribe group",
        Code::InvalidArgument,
        client.subscribe(pb::SubscribeRequest {
            topic: "t".into(),
            group: h.clone(),
            ..Default::default()
        })
    );
    call!(
        "Ack id",
        Code::InvalidArgument,
        client.ack(pb::AckRequest {
            group: "g".into(),
            topic: "t".into(),
            ack_ids: vec![h.clone()]
        })
    );
    call!(
        "Ack group",
        Code::InvalidArgument,
        client.ack(pb::AckRequest {
            group: h.clone(),
            topic: "t".into(),
            ack_ids: vec!["0:0".into()]
        })
    );
    call!(
        "Ack topic",
        Code::InvalidArgument,
        client.ack(pb::AckRequest {
            group: "g".into(),
            topic: h.clone(),
            ack_ids: vec!["0:0".into()]
        })
    );
    call!(
        "Nack id",
        Code::InvalidArgument,
        client.nack(pb::NackRequest {
            group: "g".into(),
            topic: "t".into(),
            ack_ids: vec![h.clone()],
            ..Default::default()
        })
    );
    call!(
        "CreateTopic",
        Code::InvalidArgument,
        admin.create_topic(pb::CreateTopicRequest {
            name: h.clone(),
            settings: None
        })
    );
    call!(
        "DeleteTopic",
        Code::InvalidArgument,
        admin.delete_topic(pb::DeleteTopicRequest { name: h.clone() })
    );
    call!(
        "DescribeTopic",
        Code::InvalidArgument,
        admin.describe_topic(pb::DescribeTopicRequest { name: h.clone() })
    );
    call!(
        "DescribeGroup",
        Code::InvalidArgument,
        admin.describe_group(pb::DescribeGroupRequest { group: h.clone() })
    );
    call!(
        "DeleteGroup",
        Code::InvalidArgument,
        admin.delete_group(pb::DeleteGroupRequest { group: h.clone() })
    );
    call!(
        "ResetGroup",
        Code::InvalidArgument,
        admin.reset_group(pb::ResetGroupRequest {
            group: h.clone(),
            topic: "t".into(),
            ..Default::default()
        })
    );
    call!(
        "Compact",
        Code::InvalidArgument,
        admin.compact(pb::CompactRequest {
            topic: h.clone(),
            dry_run: true
        })
    );
    call!(
        "seed Send",
        Code::InvalidArgument,
        seed.send(seed::SendRequest {
            msg: Some(seed::Message {
                topic: h.clone(),
                payload: b"v".to_vec().into()
            })
        })
    );
    call!(
        "seed Subscribe",
        Code::InvalidArgument,
        seed.subscribe(seed::SubscribeRequest {
            topic: h.clone(),
            consumer_group: String::new()
        })
    );
    call!(
        "seed Subscribe group",
        Code::InvalidArgument,
        seed.subscribe(seed::SubscribeRequest {
            topic: "t".into(),
            consumer_group: h.clone()
        })
    );

    for (name, result, code) in calls {
        let status = result.expect_err(name);
        assert_eq!(
            status.code(),
            code,
            "{name}: {}",
            &status.message()[..200.min(status.message().len())]
        );
        assert!(
            status.message().len() <= MAX_MESSAGE_BYTES,
            "{name}: a message of {} bytes",
            status.message().len()
        );
        assert!(!status.message().is_empty(), "{name}: no message");
    }
    // Nothing changed: the same topics, and "t" holds its one message.
    let after = admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, after);
    let t = admin
        .describe_topic(pb::DescribeTopicRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.partitions.iter().map(|p| p.next_offset).sum::<u64>(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_named_on_a_topic_it_never_read_is_told_apart_from_a_missing_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    for topic in ["read", "other"] {
        client
            .send(pb::SendRequest {
                topic: topic.into(),
                messages: vec![message("m")],
            })
            .await
            .unwrap();
    }
    // "g" reads "read" only.
    let mut stream = join_group(&mut client, "read", "g", 0, false).await;
    let delivered = common::server::take(&mut stream, 1).await;
    ack_deliveries(&mut client, "read", "g", &delivered).await;
    drop(stream);

    let ack = |group: &str, topic: &str| pb::AckRequest {
        group: group.into(),
        topic: topic.into(),
        ack_ids: vec!["0:0".into()],
    };
    let nack = |group: &str, topic: &str| pb::NackRequest {
        group: group.into(),
        topic: topic.into(),
        ack_ids: vec!["0:0".into()],
        ..Default::default()
    };
    let reset = |group: &str, topic: &str| pb::ResetGroupRequest {
        group: group.into(),
        topic: topic.into(),
        to: common::server::start(pb::start_position::Kind::Earliest(true)),
        force: true,
        ..Default::default()
    };
    for (group, want) in [
        ("g", "has never read topic \"other\" (it reads \"read\")"),
        ("nobody", "consumer group \"nobody\" does not exist"),
    ] {
        let errors = [
            ("Ack", client.ack(ack(group, "other")).await.map(|_| ())),
            ("Nack", client.nack(nack(group, "other")).await.map(|_| ())),
            (
                "ResetGroup",
                admin.reset_group(reset(group, "other")).await.map(|_| ()),
            ),
        ];
        for (name, result) in errors {
            let status = result.expect_err(name);
            assert_eq!(status.code(), Code::NotFound, "{name} {group}: {status}");
            assert!(
                status.message().contains(want),
                "{name} {group}: {}",
                status.message()
            );
        }
    }
    server.stop().await;
}
