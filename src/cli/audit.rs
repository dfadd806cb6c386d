//! `sluice auth token` and `sluice audit`: making a principal's token, and reading the audit
//! trail through a running broker or from a data directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::auth::policy::{to_hex, token_hash};
use crate::broker::audit::{AUDIT_TOPIC, AuditRecord, ChainBreak, check_chain};
use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;
use crate::storage::verify::for_each_record;

use super::args::{AuditArgs, BrokerArg, OutputFormat};
use super::connection::{broker_client, link};
use super::error::CliError;

/// Prints a new token and the config lines holding its hash.
pub fn new_token(name: &str) -> Result<(), CliError> {
    if name.is_empty() || name == "*" || name == crate::auth::policy::ANONYMOUS {
        return Err(CliError::Usage(format!("{name:?} cannot name a principal")));
    }
    let token = crate::auth::new_token().map_err(CliError::Usage)?;
    let hash = to_hex(&token_hash(&token));
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "token for {name} (shown once; the broker stores only its hash):"
    )?;
    writeln!(out, "{token}")?;
    writeln!(out)?;
    writeln!(out, "add to the broker's config file (chmod 600):")?;
    writeln!(out, "[[auth.principals]]")?;
    writeln!(out, "name = {}", toml::Value::String(name.to_string()))?;
    writeln!(out, "token_sha256 = \"{hash}\"")?;
    Ok(())
}

/// One trail read: where from, and its records as stored (offset, bytes) in log order.
struct Trail {
    source: String,
    records: Vec<(u64, Vec<u8>)>,
}

pub async fn run(args: AuditArgs) -> Result<(), CliError> {
    let since_ms = match &args.since {
        None => None,
        Some(t) => Some(
            super::time::parse_time_ms(t)
                .map_err(|e| CliError::Usage(format!("--since {t:?}: {e}")))?,
        ),
    };
    let mut trails = Vec::new();
    if !args.data_dir.is_empty() {
        for dir in &args.data_dir {
            trails.push(Trail {
                source: dir.display().to_string(),
                records: offline_records(dir)?,
            });
        }
    } else if !args.nodes.is_empty() {
        for node in &args.nodes {
            let broker = BrokerArg {
                broker: node.clone(),
                credentials: args.broker.credentials.clone(),
            };
            trails.push(Trail {
                source: node.clone(),
                records: online_records(&broker).await?,
            });
        }
    } else {
        trails.push(Trail {
            source: args.broker.broker.clone(),
            records: online_records(&args.broker).await?,
        });
    }
    let breaks: Vec<String> = trails
        .iter()
        .flat_map(|t| {
            check_chain(t.records.iter().cloned())
                .into_iter()
                .map(move |b| format!("{}: audit record {}: {}", t.source, b.offset, b.problem))
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for (record, bytes) in merged_by_time(trails) {
        let Some(r) = record else {
            continue;
        };
        if args.principal.as_ref().is_some_and(|p| *p != r.principal) {
            continue;
        }
        if since_ms.is_some_and(|since| time_ms(&r) < since) {
            continue;
        }
        let line = match args.format {
            OutputFormat::Json => String::from_utf8_lossy(&bytes).into_owned(),
            OutputFormat::Text => text(&r),
        };
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    if breaks.is_empty() {
        return Ok(());
    }
    for b in &breaks {
        crate::logging::say(format_args!("{b}"));
    }
    Err(CliError::Unhealthy(format!(
        "the audit trail's hash chain is broken in {} places (above)",
        breaks.len()
    )))
}

/// When a record was written, in ms since the epoch (0 if its time does not parse).
fn time_ms(r: &AuditRecord) -> i64 {
    humantime::parse_rfc3339(&r.time)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// Every trail's records as one sequence ordered by time, each read once (`None`: not an audit
/// record; it sorts first), each trail's own records kept in chain order (a node whose clock
/// stepped back still reads in the order it wrote): a merge that takes, each step, the trail
/// whose next record is the earliest.
fn merged_by_time(trails: Vec<Trail>) -> Vec<(Option<AuditRecord>, Vec<u8>)> {
    /// A record as the merge holds it: when it was written, parsed, as stored.
    type Timed = (i64, Option<AuditRecord>, Vec<u8>);
    let mut queues: Vec<std::collections::VecDeque<Timed>> = trails
        .into_iter()
        .map(|t| {
            t.records
                .into_iter()
                .map(|(_, bytes)| {
                    let record = serde_json::from_slice::<AuditRecord>(&bytes).ok();
                    (record.as_ref().map_or(i64::MIN, time_ms), record, bytes)
                })
                .collect()
        })
        .collect();
    let mut merged = Vec::new();
    while let Some(next) = queues
        .iter()
        .enumerate()
        .filter_map(|(i, q)| q.front().map(|(at, _, _)| (*at, i)))
        .min()
        .map(|(_, i)| i)
    {
        if let Some((_, record, bytes)) = queues[next].pop_front() {
            merged.push((record, bytes));
        }
    }
    merged
}

fn text(r: &AuditRecord) -> String {
    let counts: Vec<String> = r.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let node = r.node.map(|n| format!(" node {n}")).unwrap_or_default();
    let mut line = format!(
        "{}{node} #{} {} {:?} {} {} -> {}",
        r.time,
        r.seq,
        r.principal,
        r.decision,
        r.rpc,
        if r.resource.is_empty() {
            "-"
        } else {
            &r.resource
        },
        r.outcome
    );
    if !r.peer.is_empty() {
        line += &format!(" peer={}", r.peer);
    }
    if !counts.is_empty() {
        line += &format!(" {}", counts.join(" "));
    }
    line
}

/// The partition directory of `_audit` in a data directory.
pub fn audit_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("topics").join(AUDIT_TOPIC).join("0")
}

/// Every audit record of a data directory, as stored: (offset, bytes).
pub fn offline_records(data_dir: &Path) -> Result<Vec<(u64, Vec<u8>)>, CliError> {
    super::data_dir::data_dir_or_refuse(data_dir)?;
    let dir = audit_dir(data_dir);
    if !dir.is_dir() {
        return Err(CliError::NotDataDir(format!(
            "{} holds no audit trail ({} is missing)",
            data_dir.display(),
            dir.display()
        )));
    }
    let mut records = Vec::new();
    for_each_record(&dir, 0, |r| {
        records.push((r.offset, r.value.map(|v| v.to_vec()).unwrap_or_default()));
        true
    })
    .map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(records)
}

/// Every audit record, read through a broker (needs `consume` on `_audit`).
async fn online_records(broker: &BrokerArg) -> Result<Vec<(u64, Vec<u8>)>, CliError> {
    let link = link(broker).await?;
    let end = AdminClient::new(link.clone())
        .describe_topic(pb::DescribeTopicRequest {
            name: AUDIT_TOPIC.into(),
        })
        .await?
        .into_inner()
        .partitions
        .first()
        .map_or(0, |p| p.next_offset);
    let mut records = Vec::new();
    if end == 0 {
        return Ok(records);
    }
    let mut stream = broker_client(link)
        .subscribe(pb::SubscribeRequest {
            topic: AUDIT_TOPIC.into(),
            start: Some(pb::StartPosition {
                kind: Some(pb::start_position::Kind::Earliest(true)),
            }),
            ..pb::SubscribeRequest::default()
        })
        .await?
        .into_inner();
    while let Some(response) = stream.message().await? {
        for d in response.deliveries {
            let last = d.offset + 1 >= end;
            records.push((d.offset, d.value.map(|v| v.to_vec()).unwrap_or_default()));
            if last {
                return Ok(records);
            }
        }
    }
    Ok(records)
}

/// The chain's breaks in a data directory's audit trail (none if it has no trail).
pub fn verify_chain(data_dir: &Path) -> Result<Vec<ChainBreak>, CliError> {
    if !audit_dir(data_dir).is_dir() {
        return Ok(Vec::new());
    }
    Ok(check_chain(offline_records(data_dir)?))
}
