//! The load generator reports what it did: a broker in this process, `sluice-bench` as a
//! process against it with each client, and the broker's own count of what arrived.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use sluice::config::Config;
use sluice::proto::v1 as pb;
use sluice::proto::v1::admin_client::AdminClient;
use tokio_util::sync::CancellationToken;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(args)
        .env_remove("SLUICE_BROKER")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_load_generator_sends_exactly_what_it_reports_with_either_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.http.listen = String::new();
    let stop = CancellationToken::new();
    let running = sluice::server::start(config, stop.clone()).await.unwrap();
    let addr = running.addr.to_string();
    let mut admin = AdminClient::new(sluice::cli::connect(&addr).await.unwrap());
    for (client, topic) in [("lean", "bench-lean"), ("tonic", "bench-tonic")] {
        // 5 producers on 2 connections, 3 messages per request, 100 messages: 34 requests
        // (the last one full too: 102 messages), plus one warm-up message per producer.
        let args = [
            "produce",
            "--broker",
            &addr,
            "--client",
            client,
            "--topic",
            topic,
            "--producers",
            "5",
            "--connections",
            "2",
            "--batch",
            "3",
            "--size",
            "10",
            "--messages",
            "100",
        ];
        let out = tokio::task::block_in_place(|| bench(&args));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{client}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("102 messages"), "{client}: {stdout}");
        let described = admin
            .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
            .await
            .unwrap()
            .into_inner();
        let stored: u64 = described.partitions.iter().map(|p| p.next_offset).sum();
        assert_eq!(stored, 107, "{client}");
        let args = [
            "rpc",
            "--broker",
            &addr,
            "--client",
            client,
            "--callers",
            "3",
            "--calls",
            "30",
        ];
        let out = tokio::task::block_in_place(|| bench(&args));
        assert!(
            out.status.success(),
            "{client}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("30 calls"));
    }
    // The broker's refusal comes back through the lean client as the gRPC status.
    let args = [
        "produce",
        "--broker",
        &addr,
        "--topic",
        "../x",
        "--messages",
        "1",
    ];
    let out = tokio::task::block_in_place(|| bench(&args));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("InvalidArgument"), "{err}");
    stop.cancel();
    running.done.await.unwrap().unwrap();
}
