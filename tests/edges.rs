//! The broker's edges, in process: a refused Send stores nothing on any path, size limits and
//! malformed bodies get the conventional status codes, silent or idle connections cannot lock
//! clients out, and every new directory entry is durable before an answer depends on it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::server::{TestServer, keyed, message, test_config};
use bytes::{Buf, BufMut, Bytes};
use sluice::broker::groups::Membership;
use sluice::broker::topic::key_partition;
use sluice::broker::{Broker, Deliveries, NewMessage, Start};
use sluice::proto::seed;
use sluice::proto::v1 as pb;
use sluice::storage::{FileIo, RealIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Small limits so that every one of them is easy to cross.
fn limited_config(dir: &Path) -> sluice::config::Config {
    let mut c = test_config(dir);
    c.max_message_bytes = 16 << 10;
    c.max_request_bytes = 64 << 10;
    c.max_batch_messages = 100;
    c.log.max_batch_bytes = 32 << 10;
    c
}

fn sized(n: usize) -> pb::Message {
    message(vec![b'x'; n])
}

fn to(partition: u32, m: pb::Message) -> pb::Message {
    pb::Message {
        partition: Some(partition),
        ..m
    }
}

async fn high_waters(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) -> Vec<u64> {
    admin
        .describe_topic(pb::DescribeTopicRequest { name: "two".into() })
        .await
        .unwrap()
        .into_inner()
        .partitions
        .iter()
        .map(|p| p.next_offset)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_send_stores_nothing_whatever_refused_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(limited_config(dir.path())).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: "two".into(),
            settings: Some(pb::TopicSettings {
                partitions: 2,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for p in 0..2 {
        client
            .send(pb::SendRequest {
                topic: "two".into(),
                messages: vec![to(p, message("kept"))],
            })
            .await
            .unwrap();
    }
    // Keys that all hash to partition 1 of 2.
    let keys: Vec<String> = (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| key_partition(k.as_bytes(), 2) == 1)
        .take(4)
        .collect();
    let ten_k = || vec![b'x'; 10 << 10];
    // (what, topic, messages, expected code): each request is refused as a whole.
    let cases: Vec<(&str, &str, Vec<pb::Message>, Code)> = vec![
        (
            "explicit partitions, one share over log.max_batch_bytes",
            "two",
            vec![
                to(0, message("small")),
                to(1, sized(10 << 10)),
                to(1, sized(10 << 10)),
                to(1, sized(10 << 10)),
                to(1, sized(10 << 10)),
            ],
            Code::ResourceExhausted,
        ),
        (
            "keyed routing, one share over log.max_batch_bytes",
            "two",
            std::iter::once(to(0, message("small")))
                .chain(keys.iter().map(|k| keyed(k, ten_k())))
                .collect(),
            Code::ResourceExhausted,
        ),
        (
            "keyless messages, all in one partition, over log.max_batch_bytes",
            "two",
            (0..4).map(|_| sized(10 << 10)).collect(),
            Code::ResourceExhausted,
        ),
        (
            "an unknown partition after valid messages",
            "two",
            vec![
                to(0, message("a")),
                to(1, message("b")),
                to(9, message("c")),
            ],
            Code::NotFound,
        ),
        (
            "one message over max_message_bytes after valid ones",
            "two",
            vec![to(0, message("a")), to(1, sized(17 << 10))],
            Code::InvalidArgument,
        ),
        (
            "more than max_batch_messages",
            "two",
            (0..101).map(|i| to(i % 2, message("m"))).collect(),
            Code::ResourceExhausted,
        ),
        (
            "the request over max_request_bytes",
            "two",
            (0..8).map(|i| to(i % 2, sized(10 << 10))).collect(),
            Code::ResourceExhausted,
        ),
        (
            "auto-creation with a share over log.max_batch_bytes",
            "fresh",
            (0..4).map(|_| sized(10 << 10)).collect(),
            Code::ResourceExhausted,
        ),
        (
            "auto-creation with an unknown partition",
            "fresh",
            vec![to(0, message("a")), to(3, message("b"))],
            Code::NotFound,
        ),
    ];
    for (what, topic, messages, code) in cases {
        let status = client
            .send(pb::SendRequest {
                topic: topic.into(),
                messages,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert_eq!(
            high_waters(&mut admin).await,
            vec![1, 1],
            "{what} stored nothing"
        );
    }
    // The seed API refuses the same way, and creates no topic for a refused message.
    let mut seed_client = seed::broker_client::BrokerClient::new(server.channel().await);
    let status = seed_client
        .send(seed::SendRequest {
            msg: Some(seed::Message {
                topic: "seedfresh".into(),
                payload: Bytes::from(vec![0u8; 17 << 10]),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let topics = admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    let names: Vec<_> = topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["two"], "no refused Send created a topic");
    assert!(!dir.path().join("topics/fresh").exists());
    assert!(!dir.path().join("topics/seedfresh").exists());

    // The largest share that fits is accepted.
    client
        .send(pb::SendRequest {
            topic: "two".into(),
            messages: vec![to(0, sized(10 << 10)), to(1, sized(10 << 10))],
        })
        .await
        .unwrap();
    assert_eq!(high_waters(&mut admin).await, vec![2, 2]);
}

/// Sends raw bytes as a request body, so a body that is not protobuf can be tried.
#[derive(Debug, Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn raw_call(server: &TestServer, path: &'static str, body: Bytes) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_invalid_argument_and_oversize_ones_resource_exhausted_on_every_service()
 {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(limited_config(dir.path())).await;
    let garbage = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]);
    let oversize = {
        // A valid SendRequest over max_request_bytes (64 KiB): one 70 KiB field.
        let mut b = Vec::new();
        b.put_u8(0x0a); // field 1 (topic), length-delimited
        let n = 70u32 << 10;
        let mut v = n;
        while v >= 0x80 {
            b.put_u8((v as u8) | 0x80);
            v >>= 7;
        }
        b.put_u8(v as u8);
        b.extend(std::iter::repeat_n(b'a', n as usize));
        Bytes::from(b)
    };
    for path in [
        "/sluice.v1.Broker/Send",
        "/sluice.v1.Broker/Ack",
        "/sluice.v1.Admin/CreateTopic",
        "/broker.Broker/Send",
    ] {
        let status = raw_call(&server, path, garbage.clone()).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        let status = raw_call(&server, path, oversize.clone()).await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{path}: {status:?}");
    }
    let topics: Vec<_> = std::fs::read_dir(dir.path().join("topics"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(topics, ["_audit"], "no malformed call created a topic");
}

/// Raises this process's open-files limit (the test holds thousands of sockets).
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_lock_a_new_client_out() {
    raise_open_files();
    let dir = tempfile::tempdir().unwrap();
    // The default 1,024 connections, and deadlines no test waits out: a new client that
    // had to wait for an idle connection to time out would wait ten minutes.
    let mut config = test_config(dir.path());
    config.handshake_timeout_ms = 600_000;
    config.idle_timeout_ms = 600_000;
    let server = TestServer::start(config).await;
    let mut idle = Vec::new();
    for i in 0..2000 {
        let mut c = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 0 {
            // Half complete the client's side of the handshake, half send nothing at all.
            send_client_preface(&mut c).await;
        }
        idle.push(c);
    }
    let started = Instant::now();
    let mut client = server.client().await;
    client
        .send(pb::SendRequest {
            topic: "t".into(),
            messages: vec![message("through")],
        })
        .await
        .unwrap();
    let took = started.elapsed();
    eprintln!("a new client's Send behind 2,000 idle connections took {took:?}");
    // Generous: only a client made to wait for an idle connection's deadline (10 min) fails it.
    assert!(
        took < Duration::from_secs(60),
        "a new client waited {took:?} behind 2,000 idle connections"
    );
    // Its connection, busy with a call, was not the one given up; idle ones were.
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_only_idle_connections_give_way() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.max_connections = 2;
    let server = TestServer::start(config).await;
    let mut first = server.client().await;
    first
        .send(pb::SendRequest {
            topic: "t".into(),
            messages: vec![message("0")],
        })
        .await
        .unwrap();
    drop(first);
    // Two connections, each with a subscription open: both busy.
    let latest = || common::server::start(pb::start_position::Kind::Latest(true));
    let mut a = server.client().await;
    let a_stream = common::server::subscribe_from(&mut a, "t", latest()).await;
    let mut b = server.client().await;
    let mut b_stream = common::server::subscribe_from(&mut b, "t", latest()).await;
    // A third client waits: nobody is idle, so nobody is dropped for it.
    let third = tokio::spawn({
        let addr = server.addr;
        async move {
            let mut c = pb::broker_client::BrokerClient::new(
                sluice::cli::connect(&addr.to_string()).await.unwrap(),
            );
            c.send(pb::SendRequest {
                topic: "t".into(),
                messages: vec![message("third")],
            })
            .await
            .unwrap();
        }
    });
    let waited = tokio::time::timeout(Duration::from_millis(500), b_stream.message()).await;
    assert!(
        waited.is_err(),
        "the third client got in while both connections were busy"
    );
    // A subscriber leaves: its connection closes, the third client gets in, the other
    // subscription (never dropped) sees its message.
    drop(a_stream);
    drop(a);
    third.await.unwrap();
    let got = common::server::take(&mut b_stream, 1).await;
    assert_eq!(got[0].value.as_deref(), Some(&b"third"[..]));
}

/// The client's side of the HTTP/2 handshake: the preface and an empty SETTINGS frame.
async fn send_client_preface(c: &mut tokio::net::TcpStream) {
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
}

/// Reads from a raw connection until the server closes it; returns how long that took.
async fn until_closed(mut s: tokio::net::TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server kept the connection open for {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed_and_calls_keep_one_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.handshake_timeout_ms = 300;
    config.idle_timeout_ms = 600;
    let server = TestServer::start(config).await;

    // Silent: closed at the handshake deadline.
    let silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let took = until_closed(silent, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");

    // The preface and settings, then nothing: closed once idle.
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    send_client_preface(&mut idle).await;
    let took = until_closed(idle, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(550), "closed after {took:?}");

    // A subscription is a call: its connection stays open past the idle timeout, and the stream
    // still delivers.
    let mut client = server.client().await;
    client
        .send(pb::SendRequest {
            topic: "live".into(),
            messages: vec![message("first")],
        })
        .await
        .unwrap();
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            topic: "live".into(),
            start: common::server::start(pb::start_position::Kind::Latest(true)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut producer = server.client().await;
    for i in 0..3 {
        // Waits out the idle timeout between sends, on a connection that holds the stream.
        let waited = tokio::time::timeout(Duration::from_millis(900), stream.message()).await;
        assert!(waited.is_err(), "nothing was sent yet");
        producer
            .send(pb::SendRequest {
                topic: "live".into(),
                messages: vec![message(format!("m{i}"))],
            })
            .await
            .unwrap();
        let got = common::server::take(&mut stream, 1).await;
        assert_eq!(got[0].value.as_deref(), Some(format!("m{i}").as_bytes()));
    }
}

/// A file system seam that records every new directory entry and every directory sync, and
/// tells which entries a power cut could still take away (POSIX: an entry is durable once its
/// parent directory was synced after it was made).
#[derive(Debug, Default)]
struct EntryRecorder {
    ops: Mutex<Vec<Op>>,
}

#[derive(Debug, Clone)]
enum Op {
    Create(PathBuf),
    Rename(PathBuf, PathBuf),
    SyncDir(PathBuf),
}

impl EntryRecorder {
    fn push(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }

    /// Entries made so far that exist and whose parent was not synced since.
    fn not_durable(&self) -> Vec<PathBuf> {
        let mut entries: BTreeMap<PathBuf, bool> = BTreeMap::new();
        for op in self.ops.lock().unwrap().iter() {
            match op {
                Op::Create(p) => {
                    entries.insert(p.clone(), false);
                }
                Op::Rename(from, to) => {
                    let moved: Vec<(PathBuf, bool)> = entries
                        .iter()
                        .filter(|(k, _)| k.starts_with(from) && *k != from)
                        .map(|(k, v)| (to.join(k.strip_prefix(from).unwrap()), *v))
                        .collect();
                    entries.retain(|k, _| !k.starts_with(from));
                    entries.extend(moved);
                    entries.insert(to.clone(), false);
                }
                Op::SyncDir(d) => {
                    for (k, v) in entries.iter_mut() {
                        if k.parent() == Some(d.as_path()) {
                            *v = true;
                        }
                    }
                }
            }
        }
        // A partition's recovery checkpoint is a checksummed hint no answer depends on: lost or
        // torn, recovery scans further back (docs/storage.md). It is replaced without syncs.
        entries
            .into_iter()
            .filter(|(k, durable)| !durable && k.exists())
            .filter(|(k, _)| k.file_name() != Some(std::ffi::OsStr::new("checkpoint")))
            .map(|(k, _)| k)
            .collect()
    }

    fn assert_all_durable(&self, after: &str) {
        let left = self.not_durable();
        assert!(left.is_empty(), "after {after}, not durable: {left:?}");
    }
}

impl FileIo for EntryRecorder {
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
        RealIo.write_at(path, file, buf, pos)
    }
    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()> {
        RealIo.sync_data(path, file)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        RealIo.sync_dir(dir)?;
        self.push(Op::SyncDir(dir.to_path_buf()));
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealIo.rename(from, to)?;
        self.push(Op::Rename(from.to_path_buf(), to.to_path_buf()));
        Ok(())
    }
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        RealIo.create_dir(dir)?;
        self.push(Op::Create(dir.to_path_buf()));
        Ok(())
    }
    fn create_file(&self, path: &Path, options: &OpenOptions) -> io::Result<File> {
        let existed = path.exists();
        let f = options.open(path)?;
        if !existed {
            self.push(Op::Create(path.to_path_buf()));
        }
        Ok(f)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_new_directory_entry_is_durable_before_an_answer_depends_on_it() {
    let tmp = tempfile::tempdir().unwrap();
    // The broker creates the data dir and its parent.
    let data = tmp.path().join("new-parent").join("data");
    let io = Arc::new(EntryRecorder::default());
    let mut config = test_config(&data);
    config.log.segment_bytes = 4096;
    config.retention_check_ms = 0;
    config.groups.max_deliveries = 1;
    let one = |v: &str| NewMessage {
        value: Some(Bytes::copy_from_slice(v.as_bytes())),
        ..NewMessage::default()
    };
    for round in 0..2 {
        let broker = Broker::open_with_io(config.clone(), io.clone())
            .await
            .unwrap();
        io.assert_all_durable(&format!("opening the broker (round {round})"));
        for i in 0..40 {
            // Auto-creation, then segment rolls (4 KiB segments).
            broker
                .send(
                    "auto",
                    vec![one(&format!("{round}-{i}-{}", "v".repeat(200)))],
                )
                .await
                .unwrap();
            io.assert_all_durable(&format!("send {i} of round {round}"));
        }
        broker
            .create_topic(&format!("made{round}"), Default::default())
            .await
            .unwrap();
        io.assert_all_durable("CreateTopic");
        // At most five deliveries over the member's life: the Ack below frees a slot, and
        // without the limit the dispatcher could assign a sixth before the member leaves (then
        // six-minus-one are dead-lettered, which a loaded machine showed once).
        let (member, mut rx) = broker
            .subscribe_group(
                "auto",
                &format!("g{round}"),
                Start::Earliest,
                Membership {
                    max_in_flight: 5,
                    exclusive: false,
                    limit: Some(5),
                },
            )
            .await
            .unwrap();
        let Some(Ok(Deliveries::Records(got))) = rx.recv().await else {
            panic!("no delivery");
        };
        let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
        broker
            .ack(&format!("g{round}"), "auto", &ids[..1])
            .await
            .unwrap();
        io.assert_all_durable("the group's first Ack");
        // Leaving at the last attempt dead-letters the rest: the DLQ topic is made.
        let mut handed = got.clone();
        member.hand_over(&mut handed, |d| (d.partition, d.record.offset));
        drop(member);
        // All five assigned (read from the channel or not) but the acked one, in each round so
        // far (the dead-letter topic keeps the first round's).
        let dead = (round + 1) * (5 - 1);
        let dlq = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                // Not there yet until the first dead letter creates it; nothing else is.
                let described = broker.describe_topic("auto.dlq").await;
                if let Err(e) = &described {
                    assert!(
                        matches!(
                            e,
                            sluice::broker::Error::TopicNotFound(_)
                                | sluice::broker::Error::Storage(
                                    sluice::storage::Error::TopicNotFound(_)
                                )
                        ),
                        "{e:?}"
                    );
                }
                if let Ok(t) = described
                    && t.partitions[0].next_offset >= dead
                {
                    return t;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the dead letters were written within 30 s");
        assert_eq!(dlq.partitions[0].next_offset, dead);
        io.assert_all_durable("dead-lettering");
        broker.shutdown().await;
        io.assert_all_durable("a clean shutdown");
    }
}
