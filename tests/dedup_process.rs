//! Idempotent Send across a SIGKILL: Sends with ids in flight when the broker is killed are
//! retried after the restart; every id answered before the kill answers its original position,
//! and the log holds every id exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashMap;

use crate::common::server::BrokerProcess;
use bytes::Bytes;
use sluice::proto::v1 as pb;
use sluice::proto::v1::admin_client::AdminClient;
use sluice::proto::v1::broker_client::BrokerClient;
use tokio::sync::mpsc;

const PRODUCERS: u64 = 4;
const PER_SEND: u64 = 10;

fn batch(producer: u64, send: u64) -> Vec<pb::Message> {
    (0..PER_SEND)
        .map(|i| {
            let id = format!("p{producer}-s{send}-m{i}");
            pb::Message {
                key: Some(Bytes::from(format!("patient-{}", (send + i) % 13))),
                value: Some(Bytes::from(format!("answers of {id}"))),
                id: Some(Bytes::from(id)),
                ..pb::Message::default()
            }
        })
        .collect()
}

async fn client(broker: &BrokerProcess) -> BrokerClient<tonic::transport::Channel> {
    BrokerClient::new(
        sluice::cli::connect(&broker.addr.to_string())
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_retried_after_a_sigkill_are_recognised_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    // Index files every 64 ids: the kill finds some ids in files, the newest only in the log.
    let env = [("SLUICE_LOG_DEDUP_MEMTABLE_IDS", "64")];
    let broker = BrokerProcess::spawn_with_env(dir.path(), &[], &env);
    AdminClient::new(
        sluice::cli::connect(&broker.addr.to_string())
            .await
            .unwrap(),
    )
    .create_topic(pb::CreateTopicRequest {
        name: "epro".into(),
        settings: Some(pb::TopicSettings {
            partitions: 3,
            ..pb::TopicSettings::default()
        }),
    })
    .await
    .unwrap();

    // Producers send until the broker dies; each answered message is reported.
    let (tx, mut answered) = mpsc::unbounded_channel::<(String, (u32, u64))>();
    let mut producers = tokio::task::JoinSet::new();
    for producer in 0..PRODUCERS {
        let mut c = client(&broker).await;
        let tx = tx.clone();
        producers.spawn(async move {
            for send in 0.. {
                let messages = batch(producer, send);
                let ids: Vec<String> = messages
                    .iter()
                    .map(|m| String::from_utf8(m.id.clone().unwrap().to_vec()).unwrap())
                    .collect();
                let request = pb::SendRequest {
                    topic: "epro".into(),
                    messages,
                };
                match c.send(request).await {
                    Ok(r) => {
                        for (id, p) in ids.into_iter().zip(r.into_inner().positions) {
                            assert!(!p.duplicate, "{id} was never sent before");
                            let _ = tx.send((id, (p.partition, p.offset)));
                        }
                    }
                    // The kill: this Send may or may not have been stored.
                    Err(_) => return send + 1,
                }
            }
            unreachable!()
        });
    }
    drop(tx);
    let mut first: HashMap<String, (u32, u64)> = HashMap::new();
    while first.len() < 2000 {
        let (id, pos) = answered.recv().await.unwrap();
        first.insert(id, pos);
    }
    broker.signal("KILL");
    let mut attempted = Vec::new();
    while let Some(sends) = producers.join_next().await {
        attempted.push(sends.unwrap());
    }
    while let Ok((id, pos)) = answered.try_recv() {
        first.insert(id, pos);
    }
    assert!(!broker.wait().success());

    // After the restart every attempted Send is retried.
    let broker = BrokerProcess::spawn_with_env(dir.path(), &[], &env);
    let mut c = client(&broker).await;
    let mut all: HashMap<String, (u32, u64)> = HashMap::new();
    let mut recognised = 0;
    for producer in 0..PRODUCERS {
        // Which producer stopped at which send is not known per producer: retry the most any
        // producer attempted, for all (more retries only add new ids, checked alike).
        let sends = attempted.iter().copied().max().unwrap();
        for send in 0..sends {
            let messages = batch(producer, send);
            let ids: Vec<String> = messages
                .iter()
                .map(|m| String::from_utf8(m.id.clone().unwrap().to_vec()).unwrap())
                .collect();
            let r = c
                .send(pb::SendRequest {
                    topic: "epro".into(),
                    messages,
                })
                .await
                .unwrap()
                .into_inner();
            for (id, p) in ids.into_iter().zip(r.positions) {
                if let Some(&pos) = first.get(&id) {
                    assert!(p.duplicate, "{id} was answered before the kill");
                    assert_eq!((p.partition, p.offset), pos, "{id}");
                }
                recognised += u64::from(p.duplicate);
                all.insert(id, (p.partition, p.offset));
            }
        }
    }
    assert!(recognised >= first.len() as u64);

    // The log holds every id once, where the answers said.
    let held: u64 = AdminClient::new(
        sluice::cli::connect(&broker.addr.to_string())
            .await
            .unwrap(),
    )
    .describe_topic(pb::DescribeTopicRequest {
        name: "epro".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .partitions
    .iter()
    .map(|p| p.next_offset)
    .sum();
    assert_eq!(held, all.len() as u64);
    let mut stream = common::server::subscribe_from(&mut c, "epro", None).await;
    let got = common::server::take(&mut stream, all.len()).await;
    let mut seen: HashMap<String, (u32, u64)> = HashMap::new();
    for d in got {
        let id = String::from_utf8(d.id.unwrap().to_vec()).unwrap();
        assert!(
            seen.insert(id.clone(), (d.partition, d.offset)).is_none(),
            "{id} twice"
        );
    }
    assert_eq!(seen, all);
}

#[test]
fn the_command_line_sends_ids_and_shows_them_and_the_duplicates() {
    use common::server::{assert_succeeded, cli};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::spawn(dir.path(), &[]);
    let addr = broker.addr.to_string();
    let b = ["--broker", addr.as_str()];
    let produce = |extra: &[&str], input: &str| {
        let args = [&["produce", "--topic", "t", "-v"][..], &b, extra].concat();
        let out = cli(&args, input);
        assert_succeeded(&out, "produce");
        String::from_utf8(out.stdout).unwrap()
    };
    // (arguments, input, lines that must be duplicates)
    let first = produce(&["-K", ":", "--id-from-key"], "sub-1:a\nsub-2:b\n");
    assert!(!first.contains("duplicate"), "{first}");
    let again = produce(&["-K", ":", "--id-from-key"], "sub-2:b\nsub-3:c\n");
    let lines: Vec<&str> = again.lines().collect();
    assert!(lines[0].ends_with(" duplicate"), "{again}");
    assert!(!lines[1].contains("duplicate"), "{again}");
    let one = produce(&["--id", "sub-1"], "a retry of sub-1 by hand\n");
    assert!(one.trim_end().ends_with(" duplicate"), "{one}");
    let json = produce(
        &["--format", "json"],
        "{\"value\": \"x\", \"id\": \"sub-3\"}\n",
    );
    assert!(json.trim_end().ends_with(" duplicate"), "{json}");
    let refused = cli(
        &[&["produce", "--topic", "t", "--id", "one"][..], &b].concat(),
        "a\nb\n",
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--id names one message"));
    produce(&["--id", "one"], "the one\n");
    let consumed = cli(
        &[
            &[
                "consume", "--topic", "t", "--count", "4", "--format", "json",
            ][..],
            &b,
        ]
        .concat(),
        "",
    );
    assert_succeeded(&consumed, "consume");
    let text = String::from_utf8(consumed.stdout).unwrap();
    let ids: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
        .collect();
    assert_eq!(
        ids,
        ["\"sub-1\"", "\"sub-2\"", "\"sub-3\"", "\"one\""],
        "{text}"
    );
    let describe = cli(&[&["topics", "describe", "t"][..], &b].concat(), "");
    let text = String::from_utf8(describe.stdout).unwrap();
    assert!(text.contains("dedup_window_ms=86400000"), "{text}");
    assert!(text.contains("duplicates_answered=3"), "{text}");
}
