//! The gRPC API over loopback against an in-process broker: start positions, the live tail,
//! concurrent producers, restarts, and every error status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::FaultyIo;
use crate::common::server::{TestServer, keyed, message, start, subscribe_from, take, test_config};
use sluice::proto::v1 as pb;
use sluice::proto::v1::start_position::Kind;
use tonic::Code;

async fn send(
    client: &mut sluice::proto::v1::broker_client::BrokerClient<tonic::transport::Channel>,
    topic: &str,
    messages: Vec<pb::Message>,
) -> Result<Vec<pb::Position>, tonic::Status> {
    client
        .send(pb::SendRequest {
            topic: topic.into(),
            messages,
        })
        .await
        .map(|r| r.into_inner().positions)
}

fn values(deliveries: &[pb::Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8(d.value.clone().unwrap().to_vec()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_starts_at_earliest_latest_an_offset_or_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let first: Vec<_> = (0..5).map(|i| message(format!("m{i}"))).collect();
    send(&mut client, "t", first).await.unwrap();
    // Timestamps are the broker's clock: make the second send visibly later.
    let boundary = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 5;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second: Vec<_> = (5..8).map(|i| message(format!("m{i}"))).collect();
    send(&mut client, "t", second).await.unwrap();

    let subscribe = |start_at| {
        let mut c = client.clone();
        async move { subscribe_from(&mut c, "t", start_at).await }
    };
    let mut s = subscribe(None).await;
    assert_eq!(
        values(&take(&mut s, 8).await),
        ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7"]
    );
    let mut s = subscribe(start(Kind::Earliest(true))).await;
    assert_eq!(take(&mut s, 8).await[0].offset, 0);
    let mut s = subscribe(start(Kind::Offset(6))).await;
    assert_eq!(values(&take(&mut s, 2).await), ["m6", "m7"]);
    let mut s = subscribe(start(Kind::TimestampMs(boundary))).await;
    assert_eq!(values(&take(&mut s, 3).await), ["m5", "m6", "m7"]);
    let mut s = subscribe(start(Kind::Latest(true))).await;
    send(&mut client, "t", vec![message("after")])
        .await
        .unwrap();
    let got = take(&mut s, 1).await;
    assert_eq!(values(&got), ["after"]);
    assert_eq!(got[0].offset, 8);
    assert_eq!(got[0].topic, "t");
    assert_eq!(got[0].attempt, 1);
}

/// A plain subscription with a `limit` delivers exactly that many messages from where it starts,
/// across Sends and responses, then its stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_with_a_limit_delivers_that_many_then_ends() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    for batch in 0..3 {
        let messages = (0..4)
            .map(|i| message(format!("m{}", batch * 4 + i)))
            .collect();
        send(&mut client, "t", messages).await.unwrap();
    }
    for (limit, from, first) in [(1, None, 0), (5, None, 0), (12, None, 0), (3, Some(6), 6)] {
        let mut stream = client
            .subscribe(pb::SubscribeRequest {
                topic: "t".into(),
                start: from.and_then(|o| start(Kind::Offset(o))),
                limit,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(response) = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the stream neither delivered nor ended within 30 s")
            .unwrap()
        {
            got.extend(response.deliveries);
        }
        let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
        assert_eq!(
            offsets,
            (first..first + limit).collect::<Vec<u64>>(),
            "limit {limit} from {from:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_at_the_tail_receives_a_new_message_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    send(&mut client, "tail", vec![message("old")])
        .await
        .unwrap();
    let mut stream = subscribe_from(&mut client, "tail", start(Kind::Offset(1))).await;
    let sender = {
        let mut c = client.clone();
        tokio::spawn(async move {
            send(
                &mut c,
                "tail",
                vec![keyed("k", "new").clone(), message("newer")],
            )
            .await
            .unwrap()
        })
    };
    let started = std::time::Instant::now();
    let got = take(&mut stream, 2).await;
    assert_eq!(values(&got), ["new", "newer"]);
    assert_eq!(got[0].key.as_deref(), Some(&b"k"[..]));
    sender.await.unwrap();
    // Not a timing assertion: a bound only a stuck tail breaks (how promptly a tail is
    // served is measured by the benchmarks, not here).
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_sends_are_all_acknowledged_and_read_back_in_order_after_a_restart()
{
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut admin = server.admin().await;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "burst".into(),
            settings: Some(pb::TopicSettings {
                partitions: 4,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let channel = server.channel().await;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..1000u32 {
        let mut c = sluice::proto::v1::broker_client::BrokerClient::new(channel.clone());
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..10u32 {
                let value = format!("{task}:{i}");
                let key = format!("patient-{task}");
                let pos = send(&mut c, "burst", vec![keyed(&key, value.clone())])
                    .await
                    .unwrap();
                acked.push((pos[0].partition, pos[0].offset, value));
            }
            acked
        });
    }
    let mut acked = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        for (p, o, v) in r.unwrap() {
            assert!(
                acked.insert((p, o), v).is_none(),
                "two sends got ({p}, {o})"
            );
        }
    }
    assert_eq!(acked.len(), 10_000);

    server.stop().await;
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let mut stream = subscribe_from(&mut client, "burst", None).await;
    let got = take(&mut stream, 10_000).await;
    assert_eq!(got.len(), 10_000, "no duplicates");
    let mut last: HashMap<u32, u64> = HashMap::new();
    let mut per_key: HashMap<String, u32> = HashMap::new();
    for d in &got {
        if let Some(prev) = last.insert(d.partition, d.offset) {
            assert_eq!(
                d.offset,
                prev + 1,
                "partition {} in offset order",
                d.partition
            );
        }
        let value = String::from_utf8(d.value.clone().unwrap().to_vec()).unwrap();
        assert_eq!(acked.get(&(d.partition, d.offset)), Some(&value));
        // One key's messages keep their send order.
        let (task, i) = value.split_once(':').unwrap();
        let i: u32 = i.parse().unwrap();
        let prev = per_key.insert(task.to_string(), i);
        assert_eq!(prev.map_or(0, |p| p + 1), i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_codes_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.auto_create_topics = false;
    config.max_message_bytes = 1000;
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let mut client = server.client().await;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "ok".into(),
            settings: None,
        })
        .await
        .unwrap();
    send(&mut client, "ok", vec![message("kept")])
        .await
        .unwrap();

    let code = |r: Result<Vec<pb::Position>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(send(&mut client, "../x", vec![message("v")]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(send(&mut client, "", vec![message("v")]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(send(&mut client, "ok", vec![]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            send(
                &mut client,
                "ok",
                vec![message("ok"), message(vec![0u8; 1001])]
            )
            .await
        ),
        Code::InvalidArgument,
        "one oversize message refuses the whole batch"
    );
    assert_eq!(
        code(send(&mut client, "missing", vec![message("v")]).await),
        Code::NotFound
    );
    let mut bad_partition = message("v");
    bad_partition.partition = Some(7);
    assert_eq!(
        code(send(&mut client, "ok", vec![bad_partition]).await),
        Code::NotFound
    );

    let sub = |topic: &str, start_at| {
        let mut c = client.clone();
        let topic = topic.to_string();
        async move {
            c.subscribe(pb::SubscribeRequest {
                topic,
                partitions: vec![],
                start: start_at,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err()
            .code()
        }
    };
    assert_eq!(sub("ok", start(Kind::Offset(5))).await, Code::OutOfRange);
    assert_eq!(sub("missing", None).await, Code::NotFound);
    assert_eq!(sub("a/b", None).await, Code::InvalidArgument);
    let create = |name: &str, partitions| {
        let mut a = admin.clone();
        let name = name.to_string();
        async move {
            a.create_topic(pb::CreateTopicRequest {
                name,
                settings: Some(pb::TopicSettings {
                    partitions,
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err()
            .code()
        }
    };
    assert_eq!(create("..", 1).await, Code::InvalidArgument);
    assert_eq!(create("big", 100_000).await, Code::InvalidArgument);
    assert_eq!(create("ok", 1).await, Code::AlreadyExists);
    // A single node holds one copy: any other replication factor is refused.
    for factor in [0, 2, 3] {
        let refused = admin
            .create_topic(pb::CreateTopicRequest {
                name: "copies".into(),
                settings: Some(pb::TopicSettings {
                    replication_factor: Some(factor),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{factor}: {refused}");
        assert!(refused.message().contains("single node"), "{refused}");
    }
    let deleted = admin
        .delete_topic(pb::DeleteTopicRequest {
            name: "missing".into(),
        })
        .await;
    assert_eq!(deleted.unwrap_err().code(), Code::NotFound);

    // Nothing changed: one topic, one message.
    let topics = admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(topics.topics.len(), 1);
    let d = admin
        .describe_topic(pb::DescribeTopicRequest { name: "ok".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.partitions[0].next_offset, 1);
    assert!(!dir.path().join("topics/big").exists());
    assert!(!dir.path().join("topics/copies").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_resource_exhausted_another_io_error_internal_and_a_failed_fsync_unavailable()
{
    let dir = tempfile::tempdir().unwrap();
    let io = FaultyIo::new();
    let server = TestServer::start_with_io(test_config(dir.path()), io.clone()).await;
    let mut client = server.client().await;
    send(&mut client, "t", vec![message("a")]).await.unwrap();

    io.enospc.store(true, Ordering::SeqCst);
    let err = send(&mut client, "t", vec![message("b")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    io.enospc.store(false, Ordering::SeqCst);
    let pos = send(&mut client, "t", vec![message("b")]).await.unwrap();
    assert_eq!(pos[0].offset, 1, "the failed send took no offset");

    // Any other I/O error on the write: INTERNAL, and nothing visible.
    io.fail_from
        .store(io.ops.load(Ordering::SeqCst), Ordering::SeqCst);
    let err = send(&mut client, "t", vec![message("x")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    io.fail_from.store(u64::MAX, Ordering::SeqCst);

    io.fail_sync.store(true, Ordering::SeqCst);
    let err = send(&mut client, "t", vec![message("c")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    io.fail_sync.store(false, Ordering::SeqCst);
    let err = send(&mut client, "t", vec![message("d")])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unavailable,
        "latched until reopened: {err}"
    );

    let mut stream = subscribe_from(&mut client, "t", None).await;
    assert_eq!(values(&take(&mut stream, 2).await), ["a", "b"]);
    let described = server
        .admin()
        .await
        .describe_topic(pb::DescribeTopicRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        described.partitions[0].next_offset, 2,
        "nothing unacknowledged is visible"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_ends_its_subscriptions_and_removes_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    send(&mut client, "gone", vec![message("x")]).await.unwrap();
    let mut stream = subscribe_from(&mut client, "gone", None).await;
    take(&mut stream, 1).await;
    server
        .admin()
        .await
        .delete_topic(pb::DeleteTopicRequest {
            name: "gone".into(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .unwrap();
    assert_eq!(end.unwrap_err().code(), Code::NotFound);
    assert!(!dir.path().join("topics/gone").exists());
    // Auto-creation brings it back empty.
    let pos = send(&mut client, "gone", vec![message("y")]).await.unwrap();
    assert_eq!(pos[0].offset, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sluice.v1.Broker".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"sluice.v1.Broker".to_string()), "{names:?}");
    assert!(names.contains(&"sluice.v1.Admin".to_string()), "{names:?}");

    // The older v1alpha protocol, which grpcurl 1.8 and other tools speak, answers the same.
    use tonic_reflection::pb::v1alpha;
    let mut reflection =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let reply = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected v1alpha reflection reply {reply:?}");
    };
    // Each lists itself; the services of the broker are the same.
    let ours = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .filter(|n| !n.starts_with("grpc.reflection."))
            .collect()
    };
    let alpha: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(alpha.contains(&"grpc.reflection.v1alpha.ServerReflection".to_string()));
    assert_eq!(
        ours(alpha),
        ours(names),
        "both versions list the broker's services"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_stored_batch_is_streamed_in_responses_of_bounded_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.delivery_batch_bytes = 64 << 10;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let batch: Vec<_> = (0..100).map(|i| message(vec![i as u8; 10_000])).collect();
    send(&mut client, "big", batch).await.unwrap();
    let mut stream = subscribe_from(&mut client, "big", None).await;
    let mut seen = 0u64;
    while seen < 100 {
        let response = stream.message().await.unwrap().unwrap();
        let size = prost::Message::encoded_len(&response);
        assert!(size <= (64 << 10) + 10_100, "a response of {size} bytes");
        for d in response.deliveries {
            assert_eq!(d.offset, seen);
            assert_eq!(d.value.unwrap()[0], seen as u8);
            seen += 1;
        }
    }
}

/// What grpcurl does: list the services by reflection, then fetch each one's descriptor and
/// call it. Every service the port serves must be listed and described, health included.
#[tokio::test]
async fn reflection_lists_and_describes_every_service_served_health_included() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let ask = |r: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([ask(MessageRequest::ListServices(
            String::new(),
        ))]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let listed: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for served in [
        "sluice.v1.Broker",
        "sluice.v1.Admin",
        "broker.Broker",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listed.iter().any(|l| l == served),
            "{served} not in {listed:?}"
        );
    }
    for service in &listed {
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter([ask(
                MessageRequest::FileContainingSymbol(service.clone()),
            )]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap().message_response;
        assert!(
            matches!(answer, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
            "{service}: {answer:?}"
        );
    }
    // And the call grpcurl makes next answers.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sluice.v1.Broker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}
