//! `sluice-bench`: load a running broker over gRPC and report what it does.
//!
//! - `produce`: N producers (one connection each) send M messages per request until a total
//!   is reached; reports messages/s, MB/s of payload and ack latency percentiles.
//! - `consume`: one subscriber reads a topic from earliest to the end it had when the bench
//!   started; reports messages/s and MB/s.
//! - `rpc`: callers of a call that does no work, to show what the RPC stack itself costs on
//!   the machine.
//! - `partitions`: thousands of partitions and groups ([`crate::partitions`]).
//! - `burst`: many seed-API Sends at once ([`crate::burst`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;

use sluice::proto::v1 as pb;
use sluice::proto::v1::admin_client::AdminClient;

use crate::lean::LeanChannel;
use sluice::cli::subscription::{self, Subscription};
use sluice::cli::{BrokerArg, CliError};
use sluice::cli::{Link, broker_client, link};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Producers sending to a topic.
    Produce(ProduceBench),
    /// One subscriber reading a topic from earliest to its current end.
    Consume(ConsumeBench),
    /// Callers of a call that does no work (ListTopics): the floor the RPC stack sets.
    Rpc(RpcBench),
    /// Many topics, partitions and groups: the broker's threads, descriptors and memory.
    Partitions(crate::partitions::PartitionsBench),
    /// Many seed-API Sends at once (one per patient): how long the last one waits.
    Burst(crate::burst::BurstBench),
    /// A broker process under mixed work and restarts for a set time (`benches/soak.sh`).
    Soak(crate::soak::SoakBench),
}

#[derive(Debug, Args)]
pub struct RpcBench {
    #[command(flatten)]
    pub broker: BrokerArg,
    #[arg(long, default_value_t = 1)]
    pub callers: usize,
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    #[arg(long, default_value_t = 20_000)]
    pub calls: u64,
    #[arg(long, value_enum, default_value_t = ClientKind::Lean)]
    pub client: ClientKind,
    /// Every call must be refused (`UNAUTHENTICATED` or `PERMISSION_DENIED`): a client with a
    /// bad token (`--token`, tonic's client), as `benches/bad_tokens.sh` runs it.
    #[arg(long)]
    pub refused: bool,
}

/// The gRPC client the load generator uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// Unary calls straight on HTTP/2 (see `lean.rs`): the least CPU taken from the broker.
    Lean,
    /// tonic's generated client, as an application would use it.
    Tonic,
}

#[derive(Debug, Args)]
pub struct ProduceBench {
    #[command(flatten)]
    pub broker: BrokerArg,
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Concurrent producers.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Connections the producers share (HTTP/2 multiplexes their requests); at most one per
    /// producer.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Messages per request.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Bytes per message value.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Messages to send in all.
    #[arg(long, default_value_t = 20_000)]
    pub messages: u64,
    #[arg(long, value_enum, default_value_t = ClientKind::Lean)]
    pub client: ClientKind,
    /// The broker's process id (a broker on this machine): prints the CPU time it spent.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Give every message a unique 16-byte id (idempotent Send), as an ePRO app gives each
    /// submission a UUID.
    #[arg(long)]
    pub ids: bool,
}

/// A unique 16-byte id: this run's nonce, the producer, a counter.
fn message_id(nonce: u64, producer: usize, n: u64) -> Bytes {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&nonce.to_le_bytes());
    id[8..].copy_from_slice(&((producer as u64) << 48 | n).to_le_bytes());
    Bytes::copy_from_slice(&id)
}

/// One caller's handle on a connection, through either client.
#[derive(Debug, Clone)]
enum Caller {
    Lean(LeanChannel),
    Tonic(Link),
}

impl Caller {
    async fn connect(kind: ClientKind, broker: &BrokerArg) -> Result<Self, CliError> {
        Ok(match kind {
            ClientKind::Lean => Caller::Lean(LeanChannel::connect(&broker.broker).await?),
            ClientKind::Tonic => Caller::Tonic(link(broker).await?),
        })
    }

    async fn send(&self, request: &pb::SendRequest) -> Result<pb::SendResponse, CliError> {
        match self {
            Caller::Lean(c) => c.unary("/sluice.v1.Broker/Send", request).await,
            Caller::Tonic(c) => Ok(broker_client(c.clone())
                .send(request.clone())
                .await?
                .into_inner()),
        }
    }

    async fn list_topics(&self) -> Result<pb::ListTopicsResponse, CliError> {
        let request = pb::ListTopicsRequest {};
        match self {
            Caller::Lean(c) => c.unary("/sluice.v1.Admin/ListTopics", &request).await,
            Caller::Tonic(c) => Ok(AdminClient::new(c.clone())
                .list_topics(request)
                .await?
                .into_inner()),
        }
    }
}

async fn connect_all(
    kind: ClientKind,
    broker: &BrokerArg,
    n: usize,
) -> Result<Vec<Caller>, CliError> {
    let mut callers = Vec::with_capacity(n);
    for _ in 0..n {
        callers.push(Caller::connect(kind, broker).await?);
    }
    Ok(callers)
}

#[derive(Debug, Args)]
pub struct ConsumeBench {
    #[command(flatten)]
    pub broker: BrokerArg,
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Consume as a member of this (new) group, acknowledging every response.
    #[arg(long)]
    pub group: Option<String>,
    /// With --group: unacknowledged deliveries held at most (0: the broker's default,
    /// `groups.default_in_flight`).
    #[arg(long, default_value_t = 0)]
    pub max_in_flight: u32,
    /// The broker's process id (a broker on this machine): prints the CPU time it spent.
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
fn process_cpu_secs(pid: u32) -> Result<f64, CliError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| CliError::Usage(format!("cannot read /proc/{pid}/stat: {e}")))?;
    // Fields after the parenthesised name: utime is field 14, stime 15 (1-based).
    let after_name = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .ok_or_else(|| CliError::Usage(format!("unexpected /proc/{pid}/stat")))?;
    let field = |n: usize| -> f64 {
        after_name
            .split(' ')
            .nth(n - 3)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((field(14) + field(15)) / ticks)
}

/// The broker's CPU time over a run, per GB of payload.
struct BrokerCpu {
    pid: u32,
    start: f64,
}

impl BrokerCpu {
    fn start(pid: Option<u32>) -> Result<Option<BrokerCpu>, CliError> {
        pid.map(|pid| {
            Ok(BrokerCpu {
                pid,
                start: process_cpu_secs(pid)?,
            })
        })
        .transpose()
    }

    fn report(cpu: Option<BrokerCpu>, payload_bytes: f64) -> Result<(), CliError> {
        if let Some(c) = cpu {
            let used = process_cpu_secs(c.pid)? - c.start;
            println!(
                "broker CPU: {used:.2} s (user + system) = {:.3} CPU-s per GB of payload",
                used / (payload_bytes / 1e9)
            );
        }
        Ok(())
    }
}

pub async fn run(cmd: BenchCommand) -> Result<(), CliError> {
    match cmd {
        BenchCommand::Produce(b) => produce(b).await,
        BenchCommand::Consume(b) => consume(b).await,
        BenchCommand::Rpc(b) => rpc(b).await,
        BenchCommand::Partitions(b) => crate::partitions::run(b).await,
        BenchCommand::Burst(b) => crate::burst::burst(b).await,
        BenchCommand::Soak(b) => crate::soak::run(b)
            .await
            .map_err(|e| CliError::Unhealthy(format!("soak: {e}"))),
    }
}

fn latency_histogram() -> Result<Histogram<u64>, CliError> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| CliError::Usage(format!("histogram: {e}")))
}

async fn produce(b: ProduceBench) -> Result<(), CliError> {
    if b.producers == 0 || b.batch == 0 {
        return Err(CliError::Usage(
            "--producers and --batch must be at least 1".into(),
        ));
    }
    let value = Bytes::from(vec![b'x'; b.size]);
    let requests = Arc::new(AtomicU64::new(b.messages.div_ceil(b.batch as u64)));
    let connections = b.connections.clamp(1, b.producers);
    let channels = connect_all(b.client, &b.broker, connections).await?;
    let clients: Vec<_> = (0..b.producers)
        .map(|i| channels[i % connections].clone())
        .collect();
    // One warm-up request creates the topic and the connections' state.
    let warm = pb::SendRequest {
        topic: b.topic.clone(),
        messages: vec![pb::Message {
            value: Some(value.clone()),
            ..pb::Message::default()
        }],
    };
    for c in &clients {
        c.send(&warm).await?;
    }
    let cpu = BrokerCpu::start(b.broker_pid)?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (producer, client) in clients.into_iter().enumerate() {
        let requests = Arc::clone(&requests);
        let ids = b.ids;
        let mut request = pb::SendRequest {
            topic: b.topic.clone(),
            messages: vec![
                pb::Message {
                    value: Some(value.clone()),
                    ..pb::Message::default()
                };
                b.batch
            ],
        };
        let mut hist = latency_histogram()?;
        tasks.spawn(async move {
            let mut sent = 0u64;
            while requests
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
                .is_ok()
            {
                if ids {
                    for (i, m) in request.messages.iter_mut().enumerate() {
                        m.id = Some(message_id(nonce, producer, sent + i as u64));
                    }
                }
                let t = Instant::now();
                client.send(&request).await?;
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                sent += request.messages.len() as u64;
            }
            Ok::<_, CliError>((sent, hist))
        });
    }
    let mut total = 0u64;
    let mut hist = latency_histogram()?;
    while let Some(joined) = tasks.join_next().await {
        let (sent, h) = joined.map_err(|e| CliError::Usage(format!("producer task: {e}")))??;
        total += sent;
        let _ = hist.add(&h);
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = total as f64 * b.size as f64;
    println!(
        "produce{}: {} producers on {} connections x {} msg/request x {} B: {} messages in {:.2} s = {:.0} msg/s, {:.1} MB/s; ack latency p50 {} us, p99 {} us, p99.9 {} us, max {} us",
        if b.ids { " with ids" } else { "" },
        b.producers,
        connections,
        b.batch,
        b.size,
        total,
        secs,
        total as f64 / secs,
        bytes / secs / 1e6,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    BrokerCpu::report(cpu, bytes)
}

/// Acknowledgements a group consumer keeps in flight at once.
const ACKS_IN_FLIGHT: usize = 4;

async fn consume(b: ConsumeBench) -> Result<(), CliError> {
    let channel = link(&b.broker).await?;
    let described = AdminClient::new(channel.clone())
        .describe_topic(pb::DescribeTopicRequest {
            name: b.topic.clone(),
        })
        .await?
        .into_inner();
    let ends: Vec<u64> = described.partitions.iter().map(|p| p.next_offset).collect();
    let firsts: Vec<u64> = described
        .partitions
        .iter()
        .map(|p| p.first_offset)
        .collect();
    // Each message stored now, counted once when first received (a redelivery after its
    // group moved or its ack was lost is not a new message).
    let mut unseen: Vec<Vec<bool>> = (firsts.iter().zip(&ends))
        .map(|(&first, &end)| vec![true; (end - first) as usize])
        .collect();
    let mut remaining: u64 = unseen.iter().map(|p| p.len() as u64).sum();
    let client = broker_client(channel);
    let group = b.group.clone().unwrap_or_default();
    // Acks go out from their own task so that receiving never waits for them, up to
    // `ACKS_IN_FLIGHT` at once: an ack answers once it is durable (an fsync), and the broker
    // frees a member's in-flight slots when an ack arrives, not when it is answered. An ack
    // refused as UNAVAILABLE (the group moving to another node) is sent again.
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
    let acker = {
        let client = client.clone();
        let (group, topic) = (group.clone(), b.topic.clone());
        tokio::spawn(async move {
            let mut acks = tokio::task::JoinSet::new();
            let settled = |done: Result<Result<_, tonic::Status>, tokio::task::JoinError>| {
                done.map_err(|e| CliError::Usage(format!("ack task: {e}")))?
                    .map(drop)
                    .map_err(CliError::from)
            };
            while let Some(mut ids) = ack_rx.recv().await {
                while acks.len() >= ACKS_IN_FLIGHT {
                    if let Some(done) = acks.join_next().await {
                        settled(done)?;
                    }
                }
                while let Ok(more) = ack_rx.try_recv() {
                    ids.extend(more);
                }
                let mut client = client.clone();
                let request = pb::AckRequest {
                    group: group.clone(),
                    topic: topic.clone(),
                    ack_ids: ids,
                };
                acks.spawn(async move { subscription::ack(&mut client, request).await });
            }
            while let Some(done) = acks.join_next().await {
                settled(done)?;
            }
            Ok::<_, CliError>(())
        })
    };
    let cpu = BrokerCpu::start(b.broker_pid)?;
    let start = Instant::now();
    let request = pb::SubscribeRequest {
        group: group.clone(),
        max_in_flight: if group.is_empty() { 0 } else { b.max_in_flight },
        exclusive: false,
        limit: 0,
        topic: b.topic.clone(),
        partitions: Vec::new(),
        start: Some(pb::StartPosition {
            kind: Some(pb::start_position::Kind::Earliest(true)),
        }),
    };
    let (mut messages, mut bytes) = (0u64, 0u64);
    // A group member subscribes again when its group moves (or its leader changes).
    let mut subscription = Subscription::new(client, request);
    while remaining > 0 {
        let Some(response) = subscription.next().await? else {
            break;
        };
        let mut ids = Vec::new();
        for d in response.deliveries {
            let p = d.partition as usize;
            let fresh = (firsts.get(p).zip(unseen.get_mut(p)))
                .and_then(|(&first, u)| u.get_mut(d.offset.checked_sub(first)? as usize))
                .is_some_and(|u| std::mem::replace(u, false));
            if fresh {
                remaining -= 1;
                messages += 1;
                bytes += d.value.as_ref().map_or(0, |v| v.len() as u64);
            }
            if !group.is_empty() {
                ids.push(d.ack_id);
            }
        }
        if !ids.is_empty() {
            let _ = ack_tx.send(ids);
        }
    }
    let resubscribed = subscription.resubscribed();
    drop(ack_tx);
    acker
        .await
        .map_err(|e| CliError::Usage(format!("ack task: {e}")))??;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    println!(
        "consume{}: {} messages, {:.1} MB of values in {:.2} s = {:.0} msg/s, {:.1} MB/s{}",
        if group.is_empty() {
            String::new()
        } else {
            match b.max_in_flight {
                0 => format!(" as group {group} (the broker's default max_in_flight)"),
                w => format!(" as group {group} (max_in_flight {w})"),
            }
        },
        messages,
        bytes as f64 / 1e6,
        secs,
        messages as f64 / secs,
        bytes as f64 / secs / 1e6,
        if resubscribed > 0 {
            format!(" (subscribed again {resubscribed} times)")
        } else {
            String::new()
        }
    );
    if remaining > 0 {
        return Err(CliError::Usage(format!(
            "the stream ended with {remaining} messages unread"
        )));
    }
    BrokerCpu::report(cpu, bytes as f64)
}

async fn rpc(b: RpcBench) -> Result<(), CliError> {
    let connections = b.connections.clamp(1, b.callers.max(1));
    let channels = connect_all(b.client, &b.broker, connections).await?;
    let calls = Arc::new(AtomicU64::new(b.calls));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..b.callers.max(1) {
        let client = channels[i % connections].clone();
        let calls = Arc::clone(&calls);
        let mut hist = latency_histogram()?;
        let refused = b.refused;
        tasks.spawn(async move {
            while calls
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
                .is_ok()
            {
                let t = Instant::now();
                match (client.list_topics().await, refused) {
                    (Ok(_), false) => {}
                    (Err(CliError::Status(s)), true)
                        if matches!(
                            s.code(),
                            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                        ) => {}
                    (Ok(_), true) => {
                        return Err(CliError::Usage(
                            "a call meant to be refused succeeded".into(),
                        ));
                    }
                    (Err(e), _) => return Err(e),
                }
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
            }
            Ok::<_, CliError>(hist)
        });
    }
    let mut hist = latency_histogram()?;
    while let Some(joined) = tasks.join_next().await {
        let h = joined.map_err(|e| CliError::Usage(format!("caller task: {e}")))??;
        let _ = hist.add(&h);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "rpc{}: {} callers on {} connections: {} calls in {:.2} s = {:.0} calls/s; latency p50 {} us, p99 {} us",
        if b.refused { " (refused)" } else { "" },
        b.callers,
        connections,
        hist.len(),
        secs,
        hist.len() as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99)
    );
    Ok(())
}
