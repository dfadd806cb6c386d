//! `sluice-bench partitions`: builds many topics, partitions and consumer groups on a running
//! broker, one message per partition, then prints what the broker process costs: threads, open
//! file descriptors and resident memory, read from `/proc/<pid>` (the broker must run on this
//! machine; `--pid` names it). `benches/partitions.sh` runs it and times restarts.

use std::time::Instant;

use clap::Args;
use tokio::task::JoinSet;

use sluice::proto::v1 as pb;
use sluice::proto::v1::admin_client::AdminClient;

use sluice::cli::{BrokerArg, CliError};
use sluice::cli::{broker_client, link};

#[derive(Debug, Args)]
pub struct PartitionsBench {
    #[command(flatten)]
    pub broker: BrokerArg,
    /// The broker's process id, to read its threads, descriptors and memory from /proc.
    #[arg(long)]
    pub pid: u32,
    #[arg(long, default_value_t = 2500)]
    pub topics: u32,
    /// Partitions per topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Consumer groups, one per topic from the first on (each joined once, then left).
    #[arg(long, default_value_t = 1000)]
    pub groups: u32,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

/// What `/proc/<pid>` says about a process.
#[derive(Debug, Clone, Copy)]
struct ProcessCost {
    threads: u64,
    fds: u64,
    rss_kib: u64,
}

fn cost(pid: u32) -> Result<ProcessCost, CliError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| CliError::Usage(format!("cannot read /proc/{pid}/status: {e}")))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| CliError::Usage(format!("cannot list /proc/{pid}/fd: {e}")))?
        .count() as u64;
    Ok(ProcessCost {
        threads: field("Threads:"),
        fds,
        rss_kib: field("VmRSS:"),
    })
}

fn topic_name(i: u32) -> String {
    format!("study-{i:05}")
}

/// Runs `count` calls of `call`, `concurrency` at a time.
async fn run_all<F, Fut>(count: u32, concurrency: usize, call: F) -> Result<(), CliError>
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for i in 0..count {
        if tasks.len() >= concurrency.max(1)
            && let Some(done) = tasks.join_next().await
        {
            done.map_err(|e| CliError::Usage(format!("task failed: {e}")))??;
        }
        tasks.spawn(call(i));
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| CliError::Usage(format!("task failed: {e}")))??;
    }
    Ok(())
}

pub async fn run(b: PartitionsBench) -> Result<(), CliError> {
    let channel = link(&b.broker).await?;
    let before = cost(b.pid)?;
    println!(
        "before: threads {}, fds {}, rss {} MiB",
        before.threads,
        before.fds,
        before.rss_kib / 1024
    );
    let started = Instant::now();
    let partitions = b.partitions;
    run_all(b.topics, b.concurrency, |i| {
        let mut admin = AdminClient::new(channel.clone());
        async move {
            let request = pb::CreateTopicRequest {
                name: topic_name(i),
                settings: Some(pb::TopicSettings {
                    partitions,
                    ..pb::TopicSettings::default()
                }),
            };
            match admin.create_topic(request).await {
                Ok(_) => Ok(()),
                Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
                Err(s) => Err(s.into()),
            }
        }
    })
    .await?;
    println!(
        "created {} topics x {} partitions in {:.1} s",
        b.topics,
        b.partitions,
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    run_all(b.topics, b.concurrency, |i| {
        let mut client = broker_client(channel.clone());
        async move {
            let messages = (0..partitions)
                .map(|p| pb::Message {
                    value: Some(format!("patient submission {i}/{p}").into()),
                    partition: Some(p),
                    ..pb::Message::default()
                })
                .collect();
            client
                .send(pb::SendRequest {
                    topic: topic_name(i),
                    messages,
                })
                .await?;
            Ok(())
        }
    })
    .await?;
    println!(
        "sent one message to each of {} partitions in {:.1} s",
        u64::from(b.topics) * u64::from(b.partitions),
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    run_all(b.groups.min(b.topics), b.concurrency, |i| {
        let mut client = broker_client(channel.clone());
        async move {
            let mut stream = client
                .subscribe(pb::SubscribeRequest {
                    topic: topic_name(i),
                    group: format!("processor-{i:05}"),
                    ..pb::SubscribeRequest::default()
                })
                .await?
                .into_inner();
            // The first delivery says the group is open and serving; then the member leaves.
            stream.message().await?;
            Ok(())
        }
    })
    .await?;
    println!(
        "joined and left {} consumer groups in {:.1} s",
        b.groups.min(b.topics),
        started.elapsed().as_secs_f64()
    );
    let after = cost(b.pid)?;
    println!(
        "after: threads {}, fds {}, rss {} MiB",
        after.threads,
        after.fds,
        after.rss_kib / 1024
    );
    Ok(())
}
