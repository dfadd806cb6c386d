//! `sluice serve` stops within its drain deadline whatever its clients do, exits 0, and leaves
//! every partition and group log closed cleanly; and it says what file descriptors it needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::server::{BrokerProcess, bin, join_group, message, subscribe_from, take};
use sluice::proto::seed;
use sluice::proto::v1 as pb;
use sluice::storage::{LogConfig, Partition, RealIo};
use tonic::Code;
use tonic::transport::Channel;

/// Every partition log under `dir` (topics and groups), each one level above its segments.
fn partition_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("topics"), dir.join("groups")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut has_log = false;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                has_log = true;
            }
        }
        if has_log {
            out.push(d);
        }
    }
    out
}

/// Reopens every partition and group log: each must find a clean close (no recovery work).
fn assert_closed_cleanly(dir: &Path, what: &str) {
    let dirs = partition_dirs(dir);
    assert!(!dirs.is_empty(), "{what}: no partition found");
    for d in dirs {
        let p = Partition::open(&d, LogConfig::default(), Arc::new(RealIo), None).unwrap();
        assert!(
            p.recovery_report().clean,
            "{what}: {} was not closed cleanly",
            d.display()
        );
    }
}

async fn client(addr: std::net::SocketAddr) -> pb::broker_client::BrokerClient<Channel> {
    pb::broker_client::BrokerClient::new(sluice::cli::connect(&addr.to_string()).await.unwrap())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

async fn fill(addr: std::net::SocketAddr, topic: &str, requests: usize, per: usize, size: usize) {
    let mut c = client(addr).await;
    for _ in 0..requests {
        c.send(pb::SendRequest {
            topic: topic.into(),
            messages: (0..per).map(|_| message(vec![b'.'; size])).collect(),
        })
        .await
        .unwrap();
    }
}

/// What stays connected while the broker is told to stop.
#[derive(Debug, Clone, Copy)]
enum Holder {
    /// A plain subscriber that stopped reading with 100 MiB behind it.
    StalledSubscriber,
    /// A plain subscriber waiting at the tail.
    TailSubscriber,
    V1GroupEmpty,
    V1GroupMidStream,
    SeedGroupEmpty,
    SeedGroupMidStream,
    /// `sluice consume --group` as a process.
    CliGroupMember,
}

/// What the holder's stream ended with, if it can tell.
type Ended = tokio::task::JoinHandle<Option<Code>>;

/// Reads a stream (either API's) to its end in the background.
fn ends<T: prost::Message + Default + Send + 'static>(mut s: tonic::Streaming<T>) -> Ended {
    tokio::spawn(async move {
        loop {
            match s.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Some(Code::Ok),
                Err(e) => return Some(e.code()),
            }
        }
    })
}

async fn hold(holder: Holder, addr: std::net::SocketAddr) -> (Ended, Option<std::process::Child>) {
    let mut c = client(addr).await;
    match holder {
        Holder::StalledSubscriber => {
            fill(addr, "big", 100, 128, 8192).await; // 100 MiB
            let mut s = subscribe_from(&mut c, "big", None).await;
            take(&mut s, 1).await;
            // Keeps the stream, reads no more.
            (
                tokio::spawn(async move {
                    let _keep = s;
                    std::future::pending::<Option<Code>>().await
                }),
                None,
            )
        }
        Holder::TailSubscriber => {
            fill(addr, "t", 1, 3, 10).await;
            let s = subscribe_from(
                &mut c,
                "t",
                common::server::start(pb::start_position::Kind::Latest(true)),
            )
            .await;
            (ends(s), None)
        }
        Holder::V1GroupEmpty | Holder::V1GroupMidStream => {
            let topic = "t";
            let n = if matches!(holder, Holder::V1GroupEmpty) {
                0
            } else {
                50
            };
            c.send(pb::SendRequest {
                topic: topic.into(),
                messages: vec![message("first")],
            })
            .await
            .unwrap();
            let mut s = join_group(&mut c, topic, "g", 10, false).await;
            take(&mut s, 1).await;
            if n > 0 {
                fill(addr, topic, 1, n, 10).await;
                take(&mut s, 1).await;
            }
            (ends(s), None)
        }
        Holder::SeedGroupEmpty | Holder::SeedGroupMidStream => {
            let mut seed_client = seed::broker_client::BrokerClient::new(
                sluice::cli::connect(&addr.to_string()).await.unwrap(),
            );
            let mut s = seed_client
                .subscribe(seed::SubscribeRequest {
                    topic: "s".into(),
                    consumer_group: "g".into(),
                })
                .await
                .unwrap()
                .into_inner();
            if matches!(holder, Holder::SeedGroupMidStream) {
                fill(addr, "s", 1, 50, 10).await;
                s.message().await.unwrap().unwrap();
            }
            (ends(s), None)
        }
        Holder::CliGroupMember => {
            fill(addr, "c", 1, 1, 10).await;
            let child = Command::new(bin())
                .args([
                    "consume",
                    "--broker",
                    &addr.to_string(),
                    "--topic",
                    "c",
                    "--group",
                    "g",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Connected once the group exists with a member.
            let mut admin = pb::admin_client::AdminClient::new(
                sluice::cli::connect(&addr.to_string()).await.unwrap(),
            );
            tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    if let Ok(d) = admin
                        .describe_group(pb::DescribeGroupRequest { group: "g".into() })
                        .await
                        && d.into_inner().topics.iter().any(|t| !t.members.is_empty())
                    {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the CLI member joined");
            (tokio::spawn(async { None }), Some(child))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_broker_within_the_deadline_whatever_stays_connected() {
    for holder in [
        Holder::StalledSubscriber,
        Holder::TailSubscriber,
        Holder::V1GroupEmpty,
        Holder::V1GroupMidStream,
        Holder::SeedGroupEmpty,
        Holder::SeedGroupMidStream,
        Holder::CliGroupMember,
    ] {
        // Streams that can hear the stop end at once, so their broker is given a deadline no
        // test waits out (10 min): one that waited for it would be caught. Only a client that
        // reads nothing holds the broker to its deadline, here 3 s, and the broker must stop
        // then rather than wait for it for ever.
        let stalled = matches!(holder, Holder::StalledSubscriber);
        let deadline = if stalled {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(600)
        };
        let dir = tempfile::tempdir().unwrap();
        let broker = BrokerProcess::spawn_with_env(
            dir.path(),
            &[],
            &[(
                "SLUICE_SHUTDOWN_TIMEOUT_MS",
                &deadline.as_millis().to_string(),
            )],
        );
        let (ended, cli) = hold(holder, broker.addr).await;
        let started = Instant::now();
        broker.signal("TERM");
        let status = tokio::task::spawn_blocking(move || broker.wait())
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(status.success(), "{holder:?}: exit status {status:?}");
        // Generous bounds (a loaded machine stays far inside them): the stalled client's
        // deadline plus a minute; a tenth of the deadline for the others.
        let bound = if stalled {
            deadline + Duration::from_secs(60)
        } else {
            deadline / 10
        };
        assert!(took < bound, "{holder:?}: the broker took {took:?} to stop");
        if !stalled && let Some(code) = ended.await.unwrap() {
            assert_eq!(code, Code::Unavailable, "{holder:?}: the stream's end");
        }
        if let Some(mut child) = cli {
            let status = child.wait().unwrap();
            assert!(!status.success(), "the CLI member saw its stream cut");
        }
        assert_closed_cleanly(dir.path(), &format!("{holder:?}"));
    }
}

/// `sluice serve` under an open-files limit of `soft`/`hard`.
fn serve_limited(data: &Path, soft: u64, hard: u64) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin());
    cmd.args(common::server::SERVE)
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn the_broker_raises_its_open_files_limit_and_says_what_it_needs_when_it_cannot() {
    // 100 topics x 4 partitions: 1,200 segment files, more than a soft limit of 1024 allows.
    let dir = tempfile::tempdir().unwrap();
    {
        let data = sluice::storage::DataDir::open(dir.path(), Arc::new(RealIo)).unwrap();
        let config = sluice::storage::TopicConfig {
            partitions: 4,
            ..Default::default()
        };
        for t in 0..100 {
            let name = format!("study{t}");
            data.create_topic(&name, &config).unwrap();
            for p in 0..4 {
                let d = data.partition_dir(&name, p).unwrap();
                let log =
                    Partition::open(&d, LogConfig::default(), Arc::new(RealIo), None).unwrap();
                log.close().unwrap();
            }
        }
    }
    // A low soft limit under a high hard one: raised, and the broker serves.
    let mut child = serve_limited(dir.path(), 1024, 8192);
    common::server::listening_addr(&mut std::io::BufReader::new(child.stdout.take().unwrap()));
    child.kill().unwrap();
    child.wait().unwrap();

    // A hard limit too low: refused at once, saying how many descriptors and how to allow them.
    let child = serve_limited(dir.path(), 1024, 1024);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ulimit -n") && stderr.contains("LimitNOFILE"),
        "{stderr}"
    );
    assert!(stderr.contains("needs about"), "{stderr}");
}

/// Stopping an embedded broker (what tests and embedders call) returns only once it has let go
/// of its data directory: started again at once on the same directory, it never finds it
/// `Locked`, whatever was connected as it stopped (a subscriber at the tail, a group member with
/// deliveries in flight, a producer sending, the HTTP port asked). `STOP_CYCLES` sets how many
/// times (default 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_broker_stopped_with_clients_connected_can_be_started_again_at_once() {
    let cycles: usize = std::env::var("STOP_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::server::test_config(dir.path());
    config.shutdown_timeout_ms = 1_000;
    let mut sent = 0u64;
    for cycle in 0..cycles {
        let running = sluice::server::start(config.clone(), Default::default()).await;
        let running = running.unwrap_or_else(|e| panic!("start {cycle}: {e}"));
        let addr = running.addr;
        let mut c = client(addr).await;
        c.send(pb::SendRequest {
            topic: "t".into(),
            messages: vec![message(format!("m{cycle}"))],
        })
        .await
        .unwrap();
        sent += 1;
        let tail = subscribe_from(
            &mut c,
            "t",
            common::server::start(pb::start_position::Kind::Latest(true)),
        )
        .await;
        let tail = ends(tail);
        let mut member = join_group(&mut c, "t", "g", 4, false).await;
        take(&mut member, 1).await; // one in flight, unacked
        let member = ends(member);
        let mut c = client(addr).await;
        let producer = tokio::spawn(async move {
            let mut stored = 0u64;
            while c
                .send(pb::SendRequest {
                    topic: "t".into(),
                    messages: vec![message("more")],
                })
                .await
                .is_ok()
            {
                stored += 1;
            }
            stored
        });
        if let Some(http) = running.http_addr {
            let _ = common::http::get(http, "/metrics").await;
        }
        running.stop.cancel();
        running.done.await.unwrap().unwrap();
        // Every stream heard the end; the producer's Sends were refused.
        for stream in [tail, member] {
            let code = stream.await.unwrap();
            assert!(
                matches!(code, Some(Code::Unavailable | Code::Ok | Code::Cancelled)),
                "cycle {cycle}: a stream ended with {code:?}"
            );
        }
        sent += producer.await.unwrap();
    }
    // Nothing acknowledged was lost across the cycles.
    let running = sluice::server::start(config, Default::default())
        .await
        .unwrap();
    let mut c = client(running.addr).await;
    let mut s = subscribe_from(&mut c, "t", None).await;
    let got = take(&mut s, sent as usize).await;
    assert_eq!(got.len() as u64, sent);
    running.stop.cancel();
    running.done.await.unwrap().unwrap();
}
