//! `sluice compact`: maintenance of a stopped broker's data directory (`--data-dir`), or of a
//! running broker through its `Compact` RPC (`--broker`), with the same code.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use crate::broker::audit::{AuditEvent, Decision};
use crate::broker::{self, Broker};
use crate::config::Config;
use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;
use crate::server::{compaction_counts, compaction_to_pb};
use crate::storage;

use super::args::CompactArgs;
use super::connection::link_with;
use super::error::CliError;

pub async fn run(args: CompactArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let report = match (&args.data_dir, &args.broker) {
        (None, Some(addr)) => online(&args, addr).await?,
        _ => offline(&args).await?,
    };
    let mut out = std::io::stdout().lock();
    let (mut seg_before, mut seg_after, mut bytes_before, mut bytes_after, mut dropped) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for p in &report {
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
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "{}segments {seg_before} -> {seg_after}, bytes {bytes_before} -> {bytes_after}, records dropped {dropped}, {:.2} s",
        if args.dry_run { "dry run: " } else { "" },
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

/// Shows which topic is being worked on: a progress bar on a terminal, plain lines otherwise.
struct Progress {
    total: usize,
    done: usize,
    terminal: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            total,
            done: 0,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn start(&self, topic: &str) {
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let width = 30;
            let filled = (self.done * width).checked_div(self.total).unwrap_or(width);
            let _ = write!(
                err,
                "\r[{}{}] {}/{} {topic:<40.40}",
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.done,
                self.total
            );
            let _ = err.flush();
        } else {
            let _ = writeln!(err, "compacting {topic} ({}/{})", self.done + 1, self.total);
        }
    }

    fn finish_one(&mut self) {
        self.done += 1;
        if self.terminal && self.done == self.total {
            let _ = writeln!(std::io::stderr());
        }
    }
}

async fn online(args: &CompactArgs, addr: &str) -> Result<Vec<pb::PartitionCompaction>, CliError> {
    let mut admin = AdminClient::new(link_with(addr, &args.credentials).await?);
    let topics = match &args.topic {
        Some(t) => vec![t.clone()],
        None => admin
            .list_topics(pb::ListTopicsRequest {})
            .await?
            .into_inner()
            .topics
            .into_iter()
            .map(|t| t.name)
            .collect(),
    };
    let mut progress = Progress::new(topics.len());
    let mut report = Vec::new();
    for topic in topics {
        progress.start(&topic);
        let r = admin
            .compact(pb::CompactRequest {
                topic,
                dry_run: args.dry_run,
            })
            .await?
            .into_inner();
        report.extend(r.partitions);
        progress.finish_one();
    }
    Ok(report)
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
    // No offline command makes a data directory of a directory that is not one (a typo).
    super::data_dir::data_dir_or_refuse(&data_dir)?;
    // A dry run writes nothing anywhere: not even the audit trail's start and stop records.
    let opened = if args.dry_run {
        Broker::open_read_only(config).await
    } else {
        Broker::open(config).await
    };
    let broker = match opened {
        Ok(b) => b,
        Err(broker::Error::Storage(storage::Error::Locked { .. })) => {
            return Err(CliError::Usage(format!(
                "{} is locked by a running broker; compact through it instead: sluice compact --broker ADDR",
                data_dir.display()
            )));
        }
        Err(e) if args.dry_run && e.to_string().contains(storage::io::READ_ONLY) => {
            return Err(CliError::Usage(format!(
                "{} was not closed cleanly and needs recovery, which writes; a dry run writes \
                 nothing. Start the broker on it once (it recovers), or compact without --dry-run \
                 ({e})",
                data_dir.display()
            )));
        }
        Err(e) => return Err(CliError::Usage(e.to_string())),
    };
    let topics = match &args.topic {
        Some(t) => vec![t.clone()],
        None => broker.list_topics().into_iter().map(|(t, _)| t).collect(),
    };
    let mut progress = Progress::new(topics.len());
    let mut report = Vec::new();
    let mut failure = None;
    for topic in topics {
        progress.start(&topic);
        match broker.maintain(Some(&topic), args.dry_run).await {
            Ok(r) => report.extend(r.into_iter().map(compaction_to_pb)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        progress.finish_one();
    }
    if !args.dry_run {
        // Offline compaction is an administrative action like the RPC: it goes on record.
        let event = AuditEvent {
            principal: format!("local user {}", current_uid()),
            rpc: "sluice compact --data-dir".into(),
            resource: args
                .topic
                .as_ref()
                .map_or("every topic".into(), |t| format!("topic {t:?}")),
            decision: Some(Decision::Allowed),
            outcome: failure.as_ref().map_or("ok".into(), |e| e.to_string()),
            ..AuditEvent::default()
        };
        let event = compaction_counts(event, &report);
        if let Err(e) = broker.audit().record(event).await {
            failure.get_or_insert(e);
        }
    }
    broker.shutdown().await;
    match failure {
        Some(e) => Err(CliError::Usage(e.to_string())),
        None => Ok(report),
    }
}

/// The user running the command, by id (the audit trail's principal for offline actions).
fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's (effective) user.
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}
