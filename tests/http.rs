//! The HTTP port: `/metrics` parsed by a strict OpenMetrics parser and compared with what the
//! test did (records, bytes, offsets, lag, in flight, dead letters, calls by status), health,
//! the JSON API, and bad requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use crate::common::http::{Reply, get, request, topic_names};
use crate::common::server::{TestServer, keyed, message, start, take, test_config};
use openmetrics_parser::{HistogramValue, MetricsExposition, OpenMetricsType, OpenMetricsValue};
use sluice::proto::v1 as pb;

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

async fn scrape(server: &TestServer) -> Exposition {
    let reply = get(server.http.unwrap(), "/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        reply.headers
    );
    openmetrics_parser::openmetrics::parse_openmetrics(&reply.body)
        .unwrap_or_else(|e| panic!("not valid OpenMetrics ({e:?}):\n{}", reply.body))
}

/// The sample of `family` whose labels include `labels`; `None` when there is none.
fn sample(e: &Exposition, family: &str, labels: &[(&str, &str)]) -> Option<OpenMetricsValue> {
    let f = e
        .families
        .get(family)
        .unwrap_or_else(|| panic!("no family {family}"));
    f.iter_samples()
        .find(|s| matches(s, labels))
        .map(|s| s.value.clone())
}

fn matches(s: &openmetrics_parser::Sample<OpenMetricsValue>, labels: &[(&str, &str)]) -> bool {
    let set = s.get_labelset().unwrap();
    labels
        .iter()
        .all(|(k, v)| set.get_label_value(k) == Some(*v))
}

fn number(e: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(e, family, labels) {
        Some(OpenMetricsValue::Counter(c)) => c.value.as_f64(),
        Some(OpenMetricsValue::Gauge(g)) => g.as_f64(),
        other => panic!("{family} {labels:?}: {other:?}"),
    }
}

fn histogram(e: &Exposition, family: &str) -> HistogramValue {
    match sample(e, family, &[]) {
        Some(OpenMetricsValue::Histogram(h)) => h,
        other => panic!("{family}: {other:?}"),
    }
}

/// Sum of a family over every sample whose labels include `labels`.
fn total(e: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    let f = &e.families[family];
    f.iter_samples()
        .filter(|s| matches(s, labels))
        .map(|s| match &s.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(g) => g.as_f64(),
            other => panic!("{family}: {other:?}"),
        })
        .sum()
}

fn to(partition: u32, m: pb::Message) -> pb::Message {
    pb::Message {
        partition: Some(partition),
        ..m
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_equal_the_operations_performed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // One delivery each: a nack dead-letters at once.
    config.groups.max_deliveries = 1;
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let mut client = server.client().await;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "m".into(),
            settings: Some(pb::TopicSettings {
                partitions: 2,
                ..pb::TopicSettings::default()
            }),
        })
        .await
        .unwrap();

    // 5 records to partition 0 in two Sends, 3 to partition 1 in one; one refused Send.
    let sends = [
        vec![
            to(0, message("a")),
            to(0, keyed("k", "bb")),
            to(0, message("ccc")),
        ],
        vec![to(0, message(vec![b'x'; 1000])), to(0, message("e"))],
        vec![
            to(1, message("f")),
            to(1, message("g")),
            to(1, message("h")),
        ],
    ];
    for messages in sends {
        client
            .send(pb::SendRequest {
                topic: "m".into(),
                messages,
            })
            .await
            .unwrap();
    }
    let refused = client
        .send(pb::SendRequest {
            topic: "m".into(),
            messages: vec![to(7, message("nowhere"))],
        })
        .await
        .unwrap_err();

    let e = scrape(&server).await;
    for (partition, records) in [("0", 5.0), ("1", 3.0)] {
        let labels = [("topic", "m"), ("partition", partition)];
        assert_eq!(number(&e, "sluice_records_appended", &labels), records);
        assert_eq!(number(&e, "sluice_log_end_offset", &labels), records);
        assert_eq!(number(&e, "sluice_log_start_offset", &labels), 0.0);
        // Every appended byte is in the log, after its 16-byte file header.
        let size = number(&e, "sluice_partition_size_bytes", &labels);
        assert_eq!(number(&e, "sluice_appended_bytes", &labels), size - 16.0);
        assert_eq!(number(&e, "sluice_partition_segments", &labels), 1.0);
    }
    let send = "/sluice.v1.Broker/Send";
    assert_eq!(
        number(
            &e,
            "sluice_grpc_requests",
            &[("method", send), ("code", "OK")]
        ),
        3.0
    );
    let code = format!("{:?}", refused.code());
    let code = match code.as_str() {
        "InvalidArgument" => "INVALID_ARGUMENT",
        "NotFound" => "NOT_FOUND",
        other => panic!("unexpected refusal {other}"),
    };
    assert_eq!(
        number(
            &e,
            "sluice_grpc_requests",
            &[("method", send), ("code", code)]
        ),
        1.0
    );
    assert_eq!(histogram(&e, "sluice_send_duration_seconds").count, Some(3));
    // Every record became durable in some group commit; every commit had an fsync.
    let commits = histogram(&e, "sluice_group_commit_records");
    assert_eq!(commits.sum.unwrap().as_f64(), 8.0);
    let fsyncs = histogram(&e, "sluice_fsync_duration_seconds");
    assert_eq!(fsyncs.count, commits.count);
    assert!(fsyncs.count.unwrap() >= 1);

    // A group member takes all 8, acks 5 and nacks 3 (dead-lettered at once).
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            topic: "m".into(),
            group: "g".into(),
            start: start(pb::start_position::Kind::Earliest(true)),
            ..pb::SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = take(&mut stream, 8).await;
    let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
    let e = scrape(&server).await;
    assert_eq!(number(&e, "sluice_subscriptions", &[]), 1.0);
    assert!(number(&e, "sluice_connections", &[]) >= 1.0);
    assert_eq!(number(&e, "sluice_records_delivered", &[]), 8.0);
    assert_eq!(total(&e, "sluice_group_in_flight", &[("group", "g")]), 8.0);
    assert_eq!(total(&e, "sluice_group_lag", &[("group", "g")]), 8.0);
    assert_eq!(
        number(
            &e,
            "sluice_group_members",
            &[("group", "g"), ("topic", "m")]
        ),
        1.0
    );

    client
        .ack(pb::AckRequest {
            group: "g".into(),
            topic: "m".into(),
            ack_ids: ids[..5].to_vec(),
        })
        .await
        .unwrap();
    client
        .nack(pb::NackRequest {
            group: "g".into(),
            topic: "m".into(),
            ack_ids: ids[5..].to_vec(),
            delay_ms: 0,
        })
        .await
        .unwrap();
    // The dead letters are written by the group's dispatcher: wait for them to be counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let e = loop {
        let e = scrape(&server).await;
        if total(&e, "sluice_group_dead_letters", &[("group", "g")]) == 3.0 {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead letters not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(total(&e, "sluice_group_lag", &[("group", "g")]), 0.0);
    assert_eq!(total(&e, "sluice_group_in_flight", &[("group", "g")]), 0.0);
    assert_eq!(
        total(&e, "sluice_group_redeliveries", &[("group", "g")]),
        0.0
    );
    assert_eq!(
        total(&e, "sluice_group_ack_timeouts", &[("group", "g")]),
        0.0
    );
    assert_eq!(
        number(&e, "sluice_records_appended", &[("topic", "m.dlq")]),
        3.0
    );
    for method in ["/sluice.v1.Broker/Ack", "/sluice.v1.Broker/Nack"] {
        assert_eq!(
            number(
                &e,
                "sluice_grpc_requests",
                &[("method", method), ("code", "OK")]
            ),
            1.0
        );
    }

    // The member leaves; four more records: the group lags by four; the API and the console's
    // overview agree.
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let e = loop {
        let e = scrape(&server).await;
        if number(&e, "sluice_subscriptions", &[]) == 0.0 {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        number(
            &e,
            "sluice_group_members",
            &[("group", "g"), ("topic", "m")]
        ),
        0.0
    );
    client
        .send(pb::SendRequest {
            topic: "m".into(),
            messages: (0..4).map(|i| to(i % 2, message("later"))).collect(),
        })
        .await
        .unwrap();
    let e = scrape(&server).await;
    assert_eq!(total(&e, "sluice_group_lag", &[("group", "g")]), 4.0);
    assert_eq!(
        number(
            &e,
            "sluice_grpc_requests",
            &[
                ("method", "/sluice.v1.Broker/Subscribe"),
                ("code", "CANCELLED")
            ]
        ),
        1.0
    );
    let http = server.http.unwrap();
    let overview = get(http, "/api/v1/overview").await.json();
    assert_eq!(overview["records_appended"], 8 + 3 + 4);
    assert_eq!(overview["lag"], 4);
    assert_eq!(overview["dead_lettered"], 3);
    // The rate history is the broker's: sampled from its start on, every 5 s, oldest first.
    let history = &overview["history"];
    assert_eq!(history["interval_seconds"], 5, "{overview}");
    let samples = history["samples"].as_array().unwrap();
    assert!(
        !samples.is_empty(),
        "a page loaded now gets the samples so far"
    );
    assert!(
        samples
            .windows(2)
            .all(|w| w[0]["t_ms"].as_i64() < w[1]["t_ms"].as_i64())
    );
    let group = get(http, "/api/v1/groups/g").await.json();
    assert_eq!(group["topics"][0]["lag"], 4);
    assert_eq!(group["topics"][0]["dead_lettered"], 3);
    let dead = get(http, "/api/v1/topics/m/dead-letters?limit=2")
        .await
        .json();
    let dead = dead["dead_letters"].as_array().unwrap();
    assert_eq!(dead.len(), 2);
    for d in dead {
        let headers = d["headers"].as_array().unwrap();
        let group = headers.iter().find(|h| h["key"] == "sluice.dlq.group");
        assert_eq!(group.unwrap()["value"], "g", "{d}");
        let reason = headers.iter().find(|h| h["key"] == "sluice.dlq.reason");
        assert_eq!(reason.unwrap()["value"], "nacked", "{d}");
    }
    // Newest first: the last nacked record (offset 2 of the DLQ) leads.
    assert_eq!(dead[0]["offset"], 2);
    let topic = get(http, "/api/v1/topics/m").await.json();
    assert_eq!(topic["partitions"][0]["next_offset"], 7);
    assert_eq!(topic["partitions"][1]["next_offset"], 5);
    assert_eq!(topic["groups"][0], "g");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_console_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let http = server.http.unwrap();
    assert_eq!(get(http, "/healthz").await.status, 200);
    let ready = get(http, "/readyz").await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    let page = get(http, "/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<script src=\"/app.js\">"),
        "{}",
        page.body
    );
    for asset in ["/app.js", "/style.css"] {
        let r = get(http, asset).await;
        assert_eq!(r.status, 200, "{asset}");
        // Nothing is fetched from anywhere but the broker.
        assert!(!r.body.contains("https://"), "{asset}");
    }

    let cases: [(&str, &str, u16); 13] = [
        ("GET", "/api/v1/topics/missing", 404),
        // A single node: no cluster to show.
        ("GET", "/api/v1/cluster", 409),
        ("GET", "/api/v1/topics/missing/dead-letters", 404),
        ("GET", "/api/v1/groups/missing", 404),
        ("GET", "/api/v1/topics/..%2Fx", 400),
        ("GET", "/api/v1/nothing-here", 404),
        ("GET", "/nothing-here/either", 404),
        ("POST", "/api/v1/topics", 405),
        ("DELETE", "/metrics", 405),
        ("PUT", "/", 405),
        ("POST", "/healthz", 405),
        ("GET", "/api/v1/topics/t/dead-letters?limit=ten", 400),
        ("GET", "/api/v1/topics/missing/dead-letters?limit=%ZZ", 400),
    ];
    for (method, path, status) in cases {
        let r: Reply = request(http, method, path, None).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        // Every error answer is JSON with a message.
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{method} {path}: {:?}",
            r.header("content-type")
        );
        let error = r.json()["error"].as_str().map(str::to_string);
        assert!(
            error.is_some_and(|e| !e.is_empty()),
            "{method} {path}: {}",
            r.body
        );
        if r.status == 404 && path.contains("missing") {
            assert!(
                r.json()["error"].as_str().unwrap().contains("missing"),
                "{}",
                r.body
            );
        }
    }
    let mut client = server.client().await;
    client
        .send(pb::SendRequest {
            topic: "t".into(),
            messages: vec![message("x")],
        })
        .await
        .unwrap();
    for limit in ["0", "101", "ten"] {
        let r = get(
            http,
            &format!("/api/v1/topics/t/dead-letters?limit={limit}"),
        )
        .await;
        assert_eq!(r.status, 400, "limit={limit}: {}", r.body);
    }
    let none = get(http, "/api/v1/topics/t/dead-letters").await;
    assert_eq!(none.status, 200);
    assert_eq!(none.json()["dead_letters"].as_array().unwrap().len(), 0);
    // None of it created anything.
    assert_eq!(topic_names(&get(http, "/api/v1/topics").await), ["t"]);
    server.stop().await;
}

#[test]
fn an_http_address_that_does_not_parse_or_leaves_the_machine_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    c.http.listen = "nonsense".into();
    let err = c.sanitize().unwrap_err().to_string();
    assert!(err.contains("http.listen"), "{err}");
    c.http.listen = "0.0.0.0:7071".into();
    let err = c.sanitize().unwrap_err().to_string();
    assert!(err.contains("allow_plaintext"), "{err}");
    c.allow_plaintext = true;
    c.sanitize().unwrap();
    c.http.listen = String::new();
    c.allow_plaintext = false;
    c.sanitize().unwrap();
}

/// After a restart, a group nobody has joined since is still reported (it is opened from its
/// state on the scrape), and the counters kept "since start" begin again at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_reports_groups_nobody_has_joined_since() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    client
        .send(pb::SendRequest {
            topic: "r".into(),
            messages: (0..5).map(|_| message("x")).collect(),
        })
        .await
        .unwrap();
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            topic: "r".into(),
            group: "g".into(),
            max_in_flight: 2,
            ..pb::SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = take(&mut stream, 2).await;
    client
        .ack(pb::AckRequest {
            group: "g".into(),
            topic: "r".into(),
            ack_ids: got.iter().map(|d| d.ack_id.clone()).collect(),
        })
        .await
        .unwrap();
    drop(stream);
    server.stop().await;

    let server = TestServer::start(test_config(dir.path())).await;
    let e = scrape(&server).await;
    let labels = [("group", "g"), ("topic", "r"), ("partition", "0")];
    assert_eq!(number(&e, "sluice_group_lag", &labels), 3.0);
    assert_eq!(number(&e, "sluice_group_members", &labels[..2]), 0.0);
    assert_eq!(number(&e, "sluice_log_end_offset", &labels[1..]), 5.0);
    assert_eq!(number(&e, "sluice_records_appended", &labels[1..]), 0.0);
    server.stop().await;
}

/// Nacks every delivery `group` gets on `topic` until `count` of them are dead letters
/// (`groups.max_deliveries` = 1: a nack dead-letters at once).
async fn dead_letter(server: &TestServer, topic: &str, group: &str, count: usize) {
    let mut client = server.client().await;
    let mut stream = common::server::join_group(&mut client, topic, group, 0, false).await;
    let deliveries = take(&mut stream, count).await;
    client
        .nack(pb::NackRequest {
            group: group.into(),
            topic: topic.into(),
            ack_ids: deliveries.iter().map(|d| d.ack_id.clone()).collect(),
            delay_ms: 0,
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while total(
        &scrape(server).await,
        "sluice_group_dead_letters",
        &[("group", group)],
    ) < count as f64
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{group}: not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_dead_letters_are_found_when_another_groups_are_newer() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.groups.max_deliveries = 1;
    let server = TestServer::start(config).await;
    let http = server.http.unwrap();
    let mut client = server.client().await;
    let send = |n: usize, from: usize| pb::SendRequest {
        topic: "d".into(),
        messages: (from..from + n)
            .map(|i| to(0, message(format!("m{i}"))))
            .collect(),
    };
    client.send(send(3, 0)).await.unwrap();
    dead_letter(&server, "d", "older", 3).await;
    client.send(send(40, 3)).await.unwrap();
    dead_letter(&server, "d", "newer", 43).await;

    let list = |query: &str| {
        let path = format!("/api/v1/topics/d/dead-letters?{query}");
        async move { get(http, &path).await.json()["dead_letters"].clone() }
    };
    let group_of = |d: &serde_json::Value| {
        d["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["key"] == "sluice.dlq.group")
            .map(|h| h["value"].as_str().unwrap().to_string())
    };
    // Unfiltered, the newest 20 are all the newer group's.
    let all = list("limit=20").await;
    assert_eq!(all.as_array().unwrap().len(), 20);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .all(|d| group_of(d).as_deref() == Some("newer"))
    );
    // Filtered by the broker, the older group's three are there, newest first.
    let older = list("limit=20&group=older").await;
    let older = older.as_array().unwrap();
    assert_eq!(older.len(), 3, "{older:?}");
    assert!(
        older
            .iter()
            .all(|d| group_of(d).as_deref() == Some("older"))
    );
    let offsets: Vec<i64> = older
        .iter()
        .map(|d| d["offset"].as_i64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 1, 0]);
    // The limit holds for a filtered list too, and a group with none gets an empty list.
    assert_eq!(
        list("limit=5&group=newer").await.as_array().unwrap().len(),
        5
    );
    assert_eq!(list("group=nobody").await.as_array().unwrap().len(), 0);
    server.stop().await;
}

/// Reads from `s` until the server closes it (`None`), or returns the status line's code of
/// what it answered first; waits at most `DEADLINE` (generous: a port that never closes a
/// connection fails here instead of hanging).
async fn answer_or_close(s: &mut tokio::net::TcpStream) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    const DEADLINE: Duration = Duration::from_secs(30);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
            if raw.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the port neither answered nor closed the connection"
    );
    let text = String::from_utf8_lossy(&raw);
    text.split(' ').nth(1).and_then(|c| c.parse().ok())
}

/// A whole request kept alive after its answer.
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";

/// A broker whose HTTP port takes `max_connections` and `header_timeout_ms`.
async fn limited(
    max_connections: usize,
    header_timeout_ms: u64,
) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.http.max_connections = max_connections;
    config.http.header_timeout_ms = header_timeout_ms;
    let server = TestServer::start(config).await;
    (dir, server)
}

/// Hostile or careless HTTP clients hold only what the port's limits allow: headers sent too
/// slowly or too long, connections parked idle, and more connections than allowed are closed,
/// and a good client is served again once a slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_oversized_idle_and_surplus_http_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let (_dir, server) = limited(4, 300).await;
    let http = server.http.unwrap();

    // Headers that never end: closed once the header timeout passes.
    let mut slow = TcpStream::connect(http).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let code = answer_or_close(&mut slow).await;
    assert!(
        matches!(code, None | Some(408)),
        "slow headers answered {code:?}"
    );

    // Headers past the limit: 431, nothing else.
    let mut big = TcpStream::connect(http).await.unwrap();
    let filler = "a".repeat(sluice::server::HTTP_MAX_HEADER_BYTES + 1);
    let req = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: {filler}\r\n\r\n");
    let _ = big.write_all(req.as_bytes()).await; // the port may close before all is written
    assert_eq!(answer_or_close(&mut big).await, Some(431));

    // A kept-alive connection that asks nothing more: closed once the header timeout passes.
    let mut idle = TcpStream::connect(http).await.unwrap();
    idle.write_all(HEALTHZ).await.unwrap();
    assert_eq!(answer_or_close(&mut idle).await, Some(200));
    assert_eq!(answer_or_close(&mut idle).await, None, "idle: closed");

    server.stop().await;

    // The limit (timeouts long enough not to interfere): four connections kept alive after a
    // request each; a fifth is closed at once, unanswered; once one of the four goes, a new
    // connection is served.
    let (_dir, server) = limited(4, 60_000).await;
    let http = server.http.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(http).await.unwrap();
        s.write_all(HEALTHZ).await.unwrap();
        assert_eq!(answer_or_close(&mut s).await, Some(200));
        held.push(s);
    }
    let mut surplus = TcpStream::connect(http).await.unwrap();
    let _ = surplus.write_all(HEALTHZ).await;
    assert_eq!(answer_or_close(&mut surplus).await, None, "over the limit");
    drop(held.pop());
    let served = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let mut s = TcpStream::connect(http).await.unwrap();
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await;
            if answer_or_close(&mut s).await == Some(200) {
                return;
            }
        }
    })
    .await;
    assert!(
        served.is_ok(),
        "a slot freed by a closed connection is taken again"
    );
    drop(held);
    server.stop().await;
}
