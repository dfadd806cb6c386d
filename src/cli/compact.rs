//! `sluice compact`: maintenance of a stopped broker's data directory (`--data-dir`), or of a
//! running broker through its `Compact` RPC (`--broker`), with the same code.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::broker::{self, Broker};
use crate::config::Config;
use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;
use crate::server::compaction_to_pb;
use crate::storage;

use super::CliError;
use super::client::connect;

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// A stopped broker's data directory [default: ./data].
    #[arg(long, conflicts_with = "broker")]
    pub data_dir: Option<PathBuf>,
    /// A running broker to ask instead (its data directory is locked).
    #[arg(long)]
    pub broker: Option<String>,
    /// Only this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Say what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(args: CompactArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let report = match &args.broker {
        Some(addr) => {
            let mut admin = AdminClient::new(connect(addr).await?);
            admin
                .compact(pb::CompactRequest {
                    topic: args.topic.clone().unwrap_or_default(),
                    dry_run: args.dry_run,
                })
                .await?
                .into_inner()
                .partitions
        }
        None => offline(&args).await?,
    };
    let mut out = std::io::stdout().lock();
    let terminal = out.is_terminal();
    let (mut seg_before, mut seg_after, mut bytes_before, mut bytes_after, mut dropped) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for (i, p) in report.iter().enumerate() {
        seg_before += u64::from(p.segments_before);
        seg_after += u64::from(p.segments_after);
        bytes_before += p.bytes_before;
        bytes_after += p.bytes_after;
        dropped += p.records_dropped;
        let held = if p.held_segments > 0 {
            format!(
                ", {} segments ({} bytes) held back by group {}",
                p.held_segments, p.held_bytes, p.held_by
            )
        } else {
            String::new()
        };
        let line = format!(
            "{}/{}: segments {} -> {}, bytes {} -> {}, records dropped {}, first offset {}{held}",
            p.topic,
            p.partition,
            p.segments_before,
            p.segments_after,
            p.bytes_before,
            p.bytes_after,
            p.records_dropped,
            p.first_offset
        );
        if terminal {
            writeln!(out, "[{}/{}] {line}", i + 1, report.len())?;
        } else {
            writeln!(out, "{line}")?;
        }
    }
    writeln!(
        out,
        "{}segments {seg_before} -> {seg_after}, bytes {bytes_before} -> {bytes_after}, records dropped {dropped}, {:.2} s",
        if args.dry_run { "dry run: " } else { "" },
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

async fn offline(args: &CompactArgs) -> Result<Vec<pb::PartitionCompaction>, CliError> {
    let config = Config {
        data_dir: args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./data")),
        retention_check_ms: 0,
        ..Config::default()
    };
    let data_dir = config.data_dir.clone();
    let broker = match Broker::open(config).await {
        Ok(b) => b,
        Err(broker::Error::Storage(storage::Error::Locked { .. })) => {
            return Err(CliError::Usage(format!(
                "{} is locked by a running broker; compact through it instead: sluice compact --broker ADDR",
                data_dir.display()
            )));
        }
        Err(e) => return Err(CliError::Usage(e.to_string())),
    };
    let result = broker.maintain(args.topic.as_deref(), args.dry_run).await;
    broker.shutdown().await;
    Ok(result
        .map_err(|e| CliError::Usage(e.to_string()))?
        .into_iter()
        .map(compaction_to_pb)
        .collect())
}
