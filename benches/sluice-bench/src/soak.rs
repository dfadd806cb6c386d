//! `soak`: a broker process under mixed work for a set time, restarted every few minutes
//! (`kill -9` and SIGTERM in turn), sampled every few seconds into a CSV, then checked: nothing
//! acknowledged lost, no group position gone backwards, and the process as large after its
//! last restart as after its first (issue #28 item 4; `benches/soak.sh` runs it).
//!
//! The work, each a task of its own that reconnects after a restart:
//! - two producers of plain messages (one partition each of topic `plain`, kept by
//!   `retention_bytes`), the acknowledged positions remembered;
//! - a producer with ids (topic `ids`), which sends each request again until it is answered and
//!   now and then sends an old id again, which must answer `duplicate` at its first position;
//! - a producer of keys (topic `keyed`, compacted online every `--compact-every` seconds);
//! - a plain subscriber of `plain`, from earliest, resumed after its last offset;
//! - two groups on topic `work`, two members each that come and go, ack most deliveries, Nack
//!   some (with a delay), leave some to their ack timeout and never ack a few (dead letters).
//!
//! Every topic but the compacted one is bounded by `retention_bytes` (4 MiB a partition, the
//! dead-letter topic 1 MiB, 512 KiB segments), so that after a few minutes the data directory, and with it the files the broker
//! holds open, stops growing: what still grows then is a leak.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use sluice::cli::{BrokerArg, CliError, broker_client};
use sluice::proto::v1 as pb;
use sluice::proto::v1::admin_client::AdminClient;

#[derive(Debug, Args)]
pub struct SoakBench {
    /// The broker binary.
    #[arg(long, default_value = "target/release/sluice")]
    pub sluice: PathBuf,
    /// The broker's data directory (made if absent).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// How long the work runs.
    #[arg(long, default_value_t = 120)]
    pub seconds: u64,
    /// Seconds between restarts (`kill -9` and SIGTERM in turn).
    #[arg(long, default_value_t = 180)]
    pub restart_every: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    pub sample_every: u64,
    /// Seconds between online compaction passes.
    #[arg(long, default_value_t = 30)]
    pub compact_every: u64,
    /// Where the samples go.
    #[arg(long)]
    pub csv: PathBuf,
    /// Report the process's size after the first and the last restart without judging it (a
    /// run of a few minutes, as in CI, ends before the data reaches its retention).
    #[arg(long)]
    pub no_flat_check: bool,
}

type Fail = Box<dyn std::error::Error + Send + Sync>;

/// What the work and the checks share: the broker's current address and what was acknowledged.
#[derive(Default)]
struct Ledger {
    addr: String,
    link: Option<(String, sluice::cli::Link)>,
    /// Topic `plain`, `ids`: (partition, offset) -> the message's sequence number.
    plain: HashMap<(u32, u64), u64>,
    ids: HashMap<(u32, u64), u64>,
    /// Id sequence number -> its first acknowledged position.
    id_positions: BTreeMap<u64, (u32, u64)>,
    /// Topic `keyed`: key -> the newest acknowledged sequence number.
    keyed: BTreeMap<u32, u64>,
    /// Per group and partition: the highest committed offset seen.
    committed: BTreeMap<(String, u32), u64>,
    acked_sends: u64,
    group_acks: u64,
    group_nacks: u64,
    duplicates_checked: u64,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(l: &Shared) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

fn violation(l: &Shared, what: String) {
    sluice::logging::say(format_args!("VIOLATION: {what}"));
    lock(l).violations.push(what);
}

/// The value of message `seq`: its number, then padding to 200 bytes.
fn value(seq: u64) -> Bytes {
    let mut v = format!("{seq:020}").into_bytes();
    v.resize(200, b'.');
    Bytes::from(v)
}

fn seq_of(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value.get(..20)?).ok()?.parse().ok()
}

fn id_of(seq: u64) -> Bytes {
    Bytes::copy_from_slice(&(u128::from(seq) | (0x50a4 << 64)).to_le_bytes())
}

struct Broker {
    child: Child,
    http: String,
}

fn start_broker(args: &SoakBench) -> Result<(Broker, String), Fail> {
    let mut child = Command::new(&args.sluice)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&args.data_dir)
        .env("RUST_LOG", "warn")
        .env("SLUICE_LOG_SEGMENT_BYTES", "524288")
        .env("SLUICE_RETENTION_CHECK_MS", "5000")
        .env("SLUICE_GROUPS_ACK_TIMEOUT_MS", "3000")
        .env("SLUICE_GROUPS_MAX_DELIVERIES", "3")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(out).lines();
    let (mut grpc, mut http) = (None, None);
    while grpc.is_none() || http.is_none() {
        let Some(line) = lines.next().transpose()? else {
            return Err("the broker stopped before it listened".into());
        };
        if let Some(a) = line.strip_prefix("sluice listening on ") {
            grpc = Some(a.to_string());
        } else if let Some(a) = line.strip_prefix("sluice http on http://") {
            http = Some(a.trim_end_matches('/').to_string());
        }
    }
    // Whatever else it prints goes nowhere, without blocking it.
    std::thread::spawn(move || lines.for_each(drop));
    let (grpc, http) = (grpc.unwrap_or_default(), http.unwrap_or_default());
    Ok((Broker { child, http }, grpc))
}

/// Stops the broker and waits for it without blocking the clients' tasks (a SIGTERM stop waits
/// for them to let go of their connections).
async fn stop_broker(b: &mut Broker, hard: bool) -> Result<(), Fail> {
    let signal = if hard { libc::SIGKILL } else { libc::SIGTERM };
    // SAFETY: a plain kill(2) of our own child, which has not been waited for.
    unsafe { libc::kill(b.child.id() as i32, signal) };
    let status = loop {
        if let Some(status) = b.child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !hard && !status.success() {
        return Err(format!("the broker's SIGTERM stop ended with {status}").into());
    }
    Ok(())
}

/// A connection to the broker where it listens now: one shared by every task, made again after
/// a restart (tonic's channel reconnects by itself to the same address).
async fn connect(l: &Shared) -> Result<sluice::cli::Link, CliError> {
    let (addr, link) = {
        let led = lock(l);
        (led.addr.clone(), led.link.clone())
    };
    if let Some((at, link)) = link
        && at == addr
    {
        return Ok(link);
    }
    let link = sluice::cli::link(&BrokerArg {
        broker: addr.clone(),
        credentials: Default::default(),
    })
    .await?;
    lock(l).link = Some((addr, link.clone()));
    Ok(link)
}

/// Waits out a restart before the next try.
async fn pause() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

async fn setup(l: &Shared) -> Result<(), Fail> {
    let mut admin = AdminClient::new(connect(l).await?);
    let topics = [
        ("plain", 2, pb::CleanupPolicy::Delete, Some(4 << 20)),
        ("ids", 1, pb::CleanupPolicy::Delete, Some(4 << 20)),
        ("keyed", 1, pb::CleanupPolicy::Compact, None),
        ("work", 2, pb::CleanupPolicy::Delete, Some(4 << 20)),
        // The groups' dead letters go here: made beforehand to bound it like the others (made
        // when needed, it would keep every dead letter, as an operator's DLQ should).
        ("work.dlq", 1, pb::CleanupPolicy::Delete, Some(1 << 20)),
    ];
    for (name, partitions, policy, retention_bytes) in topics {
        let r = admin
            .create_topic(pb::CreateTopicRequest {
                name: name.into(),
                settings: Some(pb::TopicSettings {
                    partitions,
                    cleanup_policy: policy as i32,
                    retention_bytes,
                    ..Default::default()
                }),
            })
            .await;
        match r {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => return Err(s.into()),
        }
    }
    Ok(())
}

/// One Send on the shared connection; a failed one may or may not be stored.
async fn send(l: &Shared, request: pb::SendRequest) -> Result<pb::SendResponse, Fail> {
    let mut c = broker_client(connect(l).await?);
    Ok(c.send(request).await?.into_inner())
}

/// Sends `request` until it is answered (across restarts).
async fn send_until_answered(l: &Shared, request: &pb::SendRequest) -> pb::SendResponse {
    loop {
        match send(l, request.clone()).await {
            Ok(r) => return r,
            Err(_) => pause().await,
        }
    }
}

async fn plain_producer(l: Shared, partition: u32, until: Instant) {
    let mut seq = u64::from(partition) << 40;
    while Instant::now() < until {
        let messages = (0..10)
            .map(|i| pb::Message {
                value: Some(value(seq + i)),
                partition: Some(partition),
                ..Default::default()
            })
            .collect();
        let request = pb::SendRequest {
            topic: "plain".into(),
            messages,
        };
        // A failed Send may or may not be stored: only what was answered is counted.
        match send(&l, request).await {
            Ok(r) => {
                let mut led = lock(&l);
                for (i, p) in r.positions.iter().enumerate() {
                    led.plain.insert((p.partition, p.offset), seq + i as u64);
                }
                led.acked_sends += 1;
            }
            Err(_) => pause().await,
        }
        seq += 10;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn id_producer(l: Shared, until: Instant) {
    let mut seq = 0u64;
    while Instant::now() < until {
        let messages: Vec<_> = (seq..seq + 5)
            .map(|s| pb::Message {
                value: Some(value(s)),
                id: Some(id_of(s)),
                ..Default::default()
            })
            .collect();
        let request = pb::SendRequest {
            topic: "ids".into(),
            messages,
        };
        let r = send_until_answered(&l, &request).await;
        {
            let mut led = lock(&l);
            for (i, p) in r.positions.iter().enumerate() {
                let s = seq + i as u64;
                let at = (p.partition, p.offset);
                if let Some(&first) = led.id_positions.get(&s) {
                    if first != at {
                        drop(led);
                        violation(&l, format!("id {s} answered at {at:?}, first at {first:?}"));
                        led = lock(&l);
                    }
                    continue;
                }
                led.id_positions.insert(s, at);
                led.ids.insert(at, s);
            }
            led.acked_sends += 1;
        }
        // Now and then an id sent before: a duplicate at its first position.
        if seq.is_multiple_of(100) && seq >= 50 {
            let old = seq - 50;
            let request = pb::SendRequest {
                topic: "ids".into(),
                messages: vec![pb::Message {
                    value: Some(value(old)),
                    id: Some(id_of(old)),
                    ..Default::default()
                }],
            };
            let r = send_until_answered(&l, &request).await;
            let first = lock(&l).id_positions.get(&old).copied();
            let got = r
                .positions
                .first()
                .map(|p| (p.duplicate, p.partition, p.offset));
            match (first, got) {
                (Some((fp, fo)), Some((true, p, o))) if (fp, fo) == (p, o) => {
                    lock(&l).duplicates_checked += 1;
                }
                _ => violation(
                    &l,
                    format!("id {old} sent again: {got:?}, first at {first:?}"),
                ),
            }
        }
        seq += 5;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn keyed_producer(l: Shared, until: Instant) {
    let mut seq = 0u64;
    while Instant::now() < until {
        let messages = (0..10)
            .map(|i| pb::Message {
                key: Some(Bytes::from(format!("k{}", (seq + i) % 100))),
                value: Some(value(seq + i)),
                ..Default::default()
            })
            .collect();
        let request = pb::SendRequest {
            topic: "keyed".into(),
            messages,
        };
        if send(&l, request).await.is_ok() {
            let mut led = lock(&l);
            for i in 0..10 {
                led.keyed.insert(((seq + i) % 100) as u32, seq + i);
            }
            led.acked_sends += 1;
        } else {
            pause().await;
        }
        seq += 10;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn compactor(l: Shared, every: Duration, until: Instant) {
    while Instant::now() + every < until {
        tokio::time::sleep(every).await;
        let done = async {
            let mut admin = AdminClient::new(connect(&l).await?);
            admin
                .compact(pb::CompactRequest {
                    topic: "keyed".into(),
                    dry_run: false,
                })
                .await?;
            Ok::<_, Fail>(())
        };
        // A pass cut by a restart is simply the next one's work.
        let _ = done.await;
    }
}

/// A plain subscriber of `plain`: every delivery in order, each known acknowledged value right.
async fn subscriber(l: Shared, until: Instant) {
    let mut next: Option<u64> = None;
    while Instant::now() < until {
        let read = async {
            let mut c = broker_client(connect(&l).await?);
            // Partition 0, resumed after the last offset read.
            let start = next.map_or(pb::start_position::Kind::Earliest(true), |o| {
                pb::start_position::Kind::Offset(o)
            });
            let mut s = c
                .subscribe(pb::SubscribeRequest {
                    topic: "plain".into(),
                    partitions: vec![0],
                    start: Some(pb::StartPosition { kind: Some(start) }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            loop {
                let Ok(got) = tokio::time::timeout_at(until.into(), s.message()).await else {
                    return Ok::<(), Fail>(());
                };
                let Some(r) = got? else { return Ok(()) };
                for d in r.deliveries {
                    if next.is_some_and(|n| d.offset < n) {
                        violation(&l, format!("plain 0: {} after {next:?}", d.offset));
                    }
                    next = Some(d.offset + 1);
                    let seq = d.value.as_deref().and_then(seq_of);
                    let known = lock(&l).plain.get(&(0, d.offset)).copied();
                    if known.is_some() && known != seq {
                        violation(
                            &l,
                            format!("plain 0 at {}: {seq:?}, acknowledged {known:?}", d.offset),
                        );
                    }
                }
            }
        };
        if let Err(e) = read.await {
            // Retention may have passed the resume point: go on from the earliest.
            if e.downcast_ref::<tonic::Status>()
                .is_some_and(|s| s.code() == tonic::Code::OutOfRange)
            {
                next = None;
            }
            pause().await;
        }
    }
}

/// A group member: lives a few seconds, acks most deliveries, Nacks some, leaves some to time
/// out, and never acks every 97th message (a dead letter).
async fn member(l: Shared, group: String, n: u64, until: Instant) {
    let mut round = n;
    while Instant::now() < until {
        round += 1;
        let life = Duration::from_millis(3000 + (round * 7919) % 9000);
        let work = async {
            let mut c = broker_client(connect(&l).await?);
            let mut s = c
                .subscribe(pb::SubscribeRequest {
                    topic: "work".into(),
                    group: group.clone(),
                    max_in_flight: 50,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let end = (Instant::now() + life).min(until);
            loop {
                let got = tokio::time::timeout_at(end.into(), s.message()).await;
                let Ok(got) = got else {
                    return Ok::<(), Fail>(());
                };
                let Some(r) = got? else { return Ok(()) };
                let (mut ack, mut nack) = (Vec::new(), Vec::new());
                for d in r.deliveries {
                    let seq = d.value.as_deref().and_then(seq_of).unwrap_or(0);
                    if seq.is_multiple_of(97) || (seq.is_multiple_of(13) && d.attempt == 1) {
                        nack.push(d.ack_id);
                    } else if seq.is_multiple_of(17) && d.attempt == 1 {
                        // Left to its ack timeout.
                    } else {
                        ack.push(d.ack_id);
                    }
                }
                let (acks, nacks) = (ack.len() as u64, nack.len() as u64);
                if !ack.is_empty() {
                    c.ack(pb::AckRequest {
                        group: group.clone(),
                        topic: "work".into(),
                        ack_ids: ack,
                    })
                    .await?;
                }
                if !nack.is_empty() {
                    c.nack(pb::NackRequest {
                        group: group.clone(),
                        topic: "work".into(),
                        ack_ids: nack,
                        delay_ms: 300,
                    })
                    .await?;
                }
                let mut led = lock(&l);
                led.group_acks += acks;
                led.group_nacks += nacks;
            }
        };
        if work.await.is_err() {
            pause().await;
        }
    }
}

async fn work_producer(l: Shared, until: Instant) {
    let mut seq = 1u64;
    while Instant::now() < until {
        let request = pb::SendRequest {
            topic: "work".into(),
            messages: (0..10)
                .map(|i| pb::Message {
                    value: Some(value(seq + i)),
                    ..Default::default()
                })
                .collect(),
        };
        if send(&l, request).await.is_err() {
            pause().await;
        }
        seq += 10;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every group's committed offsets, each no lower than the last time.
async fn check_groups(l: &Shared) -> Result<(), Fail> {
    let mut admin = AdminClient::new(connect(l).await?);
    for group in ["g1", "g2"] {
        let d = match admin
            .describe_group(pb::DescribeGroupRequest {
                group: group.into(),
            })
            .await
        {
            Ok(d) => d.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => continue,
            Err(s) => return Err(s.into()),
        };
        for t in &d.topics {
            for p in &t.partitions {
                let key = (group.to_string(), p.partition);
                let before = lock(l).committed.get(&key).copied().unwrap_or(0);
                if p.committed_offset < before {
                    violation(
                        l,
                        format!(
                            "group {group} partition {}: committed {} after {before}",
                            p.partition, p.committed_offset
                        ),
                    );
                }
                lock(l)
                    .committed
                    .insert(key, p.committed_offset.max(before));
            }
        }
    }
    Ok(())
}

/// `GET /metrics`, summed per metric name.
async fn metrics(http: &str) -> Result<HashMap<String, f64>, Fail> {
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    let mut sums = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (Some(name), Some(v)) = (line.split(['{', ' ']).next(), line.rsplit(' ').next()) else {
            continue;
        };
        if let Ok(v) = v.parse::<f64>() {
            *sums.entry(name.to_string()).or_insert(0.0) += v;
        }
    }
    Ok(sums)
}

struct Sample {
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

fn process_sample(pid: u32) -> Result<Sample, Fail> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(Sample {
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
    })
}

fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

const METRICS: [&str; 6] = [
    "sluice_connections",
    "sluice_subscriptions",
    "sluice_group_members",
    "sluice_group_dead_letters",
    "sluice_partition_segments",
    "sluice_group_redeliveries",
];

/// Reads a whole partition from its first offset; the sequence number at each offset.
async fn read_all(
    l: &Shared,
    topic: &str,
    partition: u32,
) -> Result<(u64, BTreeMap<u64, (Option<u64>, Option<Bytes>)>), Fail> {
    let link = connect(l).await?;
    let d = AdminClient::new(link.clone())
        .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
        .await?
        .into_inner();
    let p = d
        .partitions
        .iter()
        .find(|p| p.partition == partition)
        .ok_or("no such partition")?;
    let (first, end) = (p.first_offset, p.next_offset);
    let mut out = BTreeMap::new();
    if first == end {
        return Ok((first, out));
    }
    let mut s = broker_client(link)
        .subscribe(pb::SubscribeRequest {
            topic: topic.into(),
            partitions: vec![partition],
            start: Some(pb::StartPosition {
                kind: Some(pb::start_position::Kind::Offset(first)),
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    'read: while let Some(r) = s.message().await? {
        for d in r.deliveries {
            let last = d.offset + 1 >= end;
            out.insert(d.offset, (d.value.as_deref().and_then(seq_of), d.key));
            if last {
                break 'read;
            }
        }
    }
    Ok((first, out))
}

/// The final reader: every acknowledged message still within retention is there with its value;
/// every key's newest acknowledged value (or a newer one) is kept.
async fn final_check(l: &Shared) -> Result<u64, Fail> {
    let mut checked = 0;
    for (topic, partition) in [("plain", 0), ("plain", 1), ("ids", 0)] {
        let (first, stored) = read_all(l, topic, partition).await?;
        let acked: Vec<((u32, u64), u64)> = {
            let led = lock(l);
            let map = if topic == "plain" {
                &led.plain
            } else {
                &led.ids
            };
            map.iter()
                .filter(|((p, o), _)| *p == partition && *o >= first)
                .map(|(&k, &v)| (k, v))
                .collect()
        };
        for ((_, offset), seq) in acked {
            checked += 1;
            match stored.get(&offset) {
                Some((Some(s), _)) if *s == seq => {}
                other => violation(
                    l,
                    format!(
                        "{topic} {partition} at {offset}: acknowledged {seq}, stored {other:?}"
                    ),
                ),
            }
        }
    }
    let (_, stored) = read_all(l, "keyed", 0).await?;
    let mut newest: HashMap<u32, u64> = HashMap::new();
    for (seq, key) in stored.values() {
        let key = key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok()?.strip_prefix('k')?.parse().ok());
        if let (Some(k), Some(s)) = (key, *seq) {
            let n = newest.entry(k).or_insert(s);
            *n = (*n).max(s);
        }
    }
    let keyed: Vec<(u32, u64)> = lock(l).keyed.iter().map(|(&k, &v)| (k, v)).collect();
    for (k, seq) in keyed {
        checked += 1;
        if newest.get(&k).is_none_or(|&n| n < seq) {
            violation(
                l,
                format!(
                    "key k{k}: acknowledged {seq}, newest kept {:?}",
                    newest.get(&k)
                ),
            );
        }
    }
    Ok(checked)
}

pub async fn run(args: SoakBench) -> Result<(), Fail> {
    std::fs::create_dir_all(&args.data_dir)?;
    let ledger: Shared = Arc::default();
    let (mut broker, addr) = start_broker(&args)?;
    lock(&ledger).addr = addr;
    setup(&ledger).await?;
    let began = Instant::now();
    let until = began + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(plain_producer(ledger.clone(), 0, until));
    tasks.spawn(plain_producer(ledger.clone(), 1, until));
    tasks.spawn(id_producer(ledger.clone(), until));
    tasks.spawn(keyed_producer(ledger.clone(), until));
    tasks.spawn(work_producer(ledger.clone(), until));
    tasks.spawn(subscriber(ledger.clone(), until));
    tasks.spawn(compactor(
        ledger.clone(),
        Duration::from_secs(args.compact_every.max(1)),
        until,
    ));
    for (i, group) in ["g1", "g1", "g2", "g2"].into_iter().enumerate() {
        tasks.spawn(member(ledger.clone(), group.into(), i as u64 * 1000, until));
    }

    let mut csv = String::from(
        "seconds,since_restart,restarts,rss_kib,fds,threads,disk_bytes,acked_sends,group_acks,group_nacks",
    );
    for m in METRICS {
        csv.push(',');
        csv.push_str(m);
    }
    csv.push('\n');
    let (mut restarts, mut restarted_at) = (0u32, began);
    let mut next_restart = began + Duration::from_secs(args.restart_every);
    let mut next_sample = began;
    // The sample taken `settle` after each restart: after the first and after the last compared.
    let settle = Duration::from_secs(args.sample_every.max(args.restart_every / 3));
    let mut settled: Vec<(u32, Sample)> = Vec::new();
    while Instant::now() < until {
        let now = Instant::now();
        if now >= next_restart && now + Duration::from_secs(args.sample_every) < until {
            let hard = restarts % 2 == 0;
            stop_broker(&mut broker, hard).await?;
            restarts += 1;
            sluice::logging::say(format_args!(
                "[soak] {}s: restart {restarts} ({})",
                began.elapsed().as_secs(),
                if hard { "kill -9" } else { "SIGTERM" }
            ));
            let (b, addr) = start_broker(&args)?;
            broker = b;
            lock(&ledger).addr = addr;
            restarted_at = Instant::now();
            next_restart = restarted_at + Duration::from_secs(args.restart_every);
        }
        if now >= next_sample {
            next_sample += Duration::from_secs(args.sample_every);
            let s = process_sample(broker.child.id())?;
            let m = metrics(&broker.http).await.unwrap_or_default();
            if let Err(e) = check_groups(&ledger).await {
                sluice::logging::say(format_args!("[soak] group check skipped: {e}"));
            }
            let since = restarted_at.elapsed();
            let led = lock(&ledger);
            csv.push_str(&format!(
                "{},{},{restarts},{},{},{},{},{},{},{}",
                began.elapsed().as_secs(),
                since.as_secs(),
                s.rss_kib,
                s.fds,
                s.threads,
                disk_bytes(&args.data_dir),
                led.acked_sends,
                led.group_acks,
                led.group_nacks
            ));
            drop(led);
            for name in METRICS {
                csv.push_str(&format!(",{}", m.get(name).copied().unwrap_or(0.0)));
            }
            csv.push('\n');
            std::fs::write(&args.csv, &csv)?;
            if restarts > 0 && since >= settle && settled.last().is_none_or(|(r, _)| *r != restarts)
            {
                settled.push((restarts, s));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while tasks.join_next().await.is_some() {}
    check_groups(&ledger).await?;
    let checked = final_check(&ledger).await?;
    stop_broker(&mut broker, false).await?;

    let led = lock(&ledger);
    sluice::logging::say(format_args!(
        "[soak] {}s, {restarts} restarts; {} Sends acknowledged, {} group acks, {} Nacks, {} duplicate ids answered right; {checked} acknowledged messages and keys checked at the end",
        began.elapsed().as_secs(),
        led.acked_sends,
        led.group_acks,
        led.group_nacks,
        led.duplicates_checked
    ));
    let mut failed = led.violations.len();
    if let (Some((r0, a)), Some((r1, b))) = (settled.first(), settled.last()) {
        let within = |x: u64, y: u64| (y as f64) <= (x as f64) * 1.10;
        let flat =
            within(a.rss_kib, b.rss_kib) && within(a.fds, b.fds) && within(a.threads, b.threads);
        sluice::logging::say(format_args!(
            "[soak] {}s after restart {r0}: RSS {} KiB, {} fds, {} threads; after restart {r1}: RSS {} KiB, {} fds, {} threads: {}",
            settle.as_secs(),
            a.rss_kib,
            a.fds,
            a.threads,
            b.rss_kib,
            b.fds,
            b.threads,
            if flat {
                "flat (within 10 %)"
            } else {
                "GREW more than 10 %"
            }
        ));
        failed += usize::from(!flat && !args.no_flat_check);
    } else {
        sluice::logging::say(format_args!(
            "[soak] fewer than one settled sample after a restart: nothing to compare"
        ));
    }
    if failed > 0 {
        return Err(format!("{failed} problems (above)").into());
    }
    Ok(())
}
