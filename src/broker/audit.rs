//! The audit trail: the internal topic `_audit` (one partition), appended to by the broker only,
//! one JSON record per event — authentication failures, permission denials, administrative
//! actions with their outcome, retention deletions, reloads, start and clean stop — never any
//! message content. Each record is durable before the action it records is answered; a
//! refusal of a source that keeps being refused may instead be counted into a summary written
//! when its window ends (`super::refusals`).
//!
//! Records form a hash chain: each carries `seq` (its own offset) and `prev`, the hex SHA-256 of
//! the previous record's bytes as stored (64 zeros for the first). [`check_chain`] finds the
//! first record where the chain breaks: a record changed after it was written (the next one's
//! `prev` no longer matches it), removed (a `seq` is skipped) or moved (a `seq` out of place).
//! The chain cannot show a change to the newest record alone (nothing follows it yet); each
//! record's batch CRC still does for accidental damage. Records asked for at once share a batch
//! and its sync; refusals are counted and summarised (`super::refusals`). `_audit` cannot be written, deleted,
//! compacted or shortened through the API; only `auth.audit_retention_ms` removes old records.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::auth::policy::{sha256, to_hex};
use crate::storage::{AppendMode, EncodedBatch, Record, TopicConfig};

use super::clock::now_ms;
use super::error::{Error, Result};
use super::topic::PartitionHandle;

/// The audit trail's topic.
pub const AUDIT_TOPIC: &str = "_audit";

/// `_audit` is written by the broker alone and shortened only by `auth.audit_retention_ms`:
/// refuses a request that would `what` it through the API.
pub fn refuse_audit_topic(name: &str, what: &str) -> Result<()> {
    if name == AUDIT_TOPIC {
        return Err(Error::Protected(format!(
            "{AUDIT_TOPIC} is the audit trail: it cannot be {what} through the API"
        )));
    }
    Ok(())
}

/// The settings of `_audit`: one partition, records kept `retention_ms` (0: for ever).
pub fn audit_topic_config(retention_ms: u64) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        retention_ms: (retention_ms > 0).then_some(retention_ms),
        retention_bytes: None,
        retain_until_consumed: false,
        dedup_window_ms: 0,
        ..TopicConfig::default()
    }
}

/// `prev` of the first record.
const GENESIS: [u8; 32] = [0; 32];

/// What was decided about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The caller may; `outcome` says how the action went.
    Allowed,
    /// A known caller without the permission: `PERMISSION_DENIED`.
    Denied,
    /// Missing or invalid credentials: `UNAUTHENTICATED`.
    Unauthenticated,
    /// An event of the broker itself (start, stop, retention, reload).
    System,
}

/// One record of `_audit`, as stored (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The record's own offset in `_audit`.
    pub seq: u64,
    /// Server time, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The cluster node that wrote the record (each node keeps its own chain); absent on a
    /// single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    pub principal: String,
    /// The client's address; empty for the broker's own events.
    #[serde(default)]
    pub peer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_subject: String,
    /// `sluice.v1.Admin/DeleteTopic`, `broker/start`, …
    pub rpc: String,
    /// `topic "x"`, `group "g"`, or empty.
    #[serde(default)]
    pub resource: String,
    pub decision: Decision,
    /// `ok`, or the error answered.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u64>,
    /// Settings before and after a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
    /// Hex SHA-256 of the previous record's stored bytes.
    pub prev: String,
}

/// An event to record: the trail adds `seq`, `time` and `prev`.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    pub principal: String,
    pub peer: String,
    pub tls_subject: String,
    pub rpc: String,
    pub resource: String,
    pub decision: Option<Decision>,
    pub outcome: String,
    pub request_id: String,
    pub counts: BTreeMap<String, u64>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

impl AuditEvent {
    /// An event of the broker itself.
    pub fn system(rpc: &str, outcome: impl Into<String>) -> AuditEvent {
        AuditEvent {
            principal: "sluice".into(),
            rpc: rpc.into(),
            decision: Some(Decision::System),
            outcome: outcome.into(),
            ..AuditEvent::default()
        }
    }

    pub fn count(mut self, name: &str, n: u64) -> AuditEvent {
        self.counts.insert(name.to_string(), n);
        self
    }
}

/// Where the chain stands: the next record's offset and the hash of the last one.
#[derive(Debug)]
struct Chain {
    next: u64,
    prev: [u8; 32],
}

/// The broker's appender to `_audit`.
#[derive(Debug)]
pub struct AuditTrail {
    partition: Arc<PartitionHandle>,
    /// Held while a batch of records is appended and made durable.
    chain: Arc<tokio::sync::Mutex<Chain>>,
    /// Records waiting for the next batch, each with whom to tell how it went.
    waiting: std::sync::Mutex<Vec<(AuditEvent, Answer)>>,
    /// This node's id in a cluster, written into every record.
    node: Option<u64>,
}

/// Told whether a record is durable (the error's text if not).
type Answer = oneshot::Sender<std::result::Result<(), String>>;

/// Records in one batch at most (each is a few hundred bytes).
const BATCH_RECORDS: usize = 256;

impl AuditTrail {
    /// Picks the chain up where the log ends (reading its last record).
    pub fn open(partition: Arc<PartitionHandle>) -> Result<AuditTrail> {
        let end = partition.log.stats().high_water;
        let mut prev = GENESIS;
        if end > 0 {
            for batch in partition.log.read(end - 1, 1)? {
                for r in batch.records() {
                    let r = r.map_err(|e| {
                        Error::Internal(format!("the audit trail's last record: {e}"))
                    })?;
                    if r.offset == end - 1 {
                        prev = sha256(r.value.as_deref().unwrap_or_default());
                    }
                }
            }
        }
        Ok(AuditTrail {
            partition,
            chain: Arc::new(tokio::sync::Mutex::new(Chain { next: end, prev })),
            waiting: std::sync::Mutex::default(),
            node: None,
        })
    }

    /// The trail of cluster node `node`: its records say so.
    pub fn of_node(mut self, node: Option<u64>) -> AuditTrail {
        self.node = node;
        self
    }

    /// Appends one record and waits until it is durable. Records asked for meanwhile share a
    /// batch (one append, one sync): whoever holds the chain takes every record waiting.
    pub async fn record(&self, event: AuditEvent) -> Result<()> {
        let (tx, mut rx) = oneshot::channel();
        self.waiting().push((event, tx));
        loop {
            let mut chain = Arc::clone(&self.chain).lock_owned().await;
            match rx.try_recv() {
                // Taken and answered by the batch before.
                Ok(answer) => return answer.map_err(Error::Unavailable),
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(Error::Internal(
                        "the audit batch holding this record failed".into(),
                    ));
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let taken: Vec<(AuditEvent, Answer)> = {
                let mut waiting = self.waiting();
                let n = waiting.len().min(BATCH_RECORDS);
                waiting.drain(..n).collect()
            };
            let (events, answers): (Vec<_>, Vec<_>) = taken.into_iter().unzip();
            // On a task of its own: a caller that goes away (a client's call cancelled) does
            // not cut a batch short, which would leave the chain's end unknown and the records
            // of others in it unanswered.
            let (partition, node) = (Arc::clone(&self.partition), self.node);
            let batch = tokio::spawn(async move {
                let outcome = append(&partition, node, &mut chain, events).await;
                let text = outcome.as_ref().map_err(|e| e.to_string()).copied();
                for answer in answers {
                    let _ = answer.send(text.clone());
                }
                outcome
            });
            let outcome = batch
                .await
                .map_err(|e| Error::Internal(format!("an audit batch failed: {e}")))?;
            if rx.try_recv().is_ok() {
                // Ours was in it.
                return outcome;
            }
            // Ours waits for the next batch (this one was full).
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<(AuditEvent, Answer)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Appends `events` as one batch at `chain`'s end of `partition` (records naming `node`) and
/// waits until it is durable.
async fn append(
    partition: &PartitionHandle,
    node: Option<u64>,
    chain: &mut Chain,
    events: Vec<AuditEvent>,
) -> Result<()> {
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let (first, mut prev) = (chain.next, chain.prev);
    let mut records = Vec::with_capacity(events.len());
    for (k, event) in events.into_iter().enumerate() {
        let record = AuditRecord {
            seq: first + k as u64,
            time: time.clone(),
            node,
            principal: event.principal,
            peer: event.peer,
            tls_subject: event.tls_subject,
            rpc: event.rpc,
            resource: event.resource,
            decision: event.decision.unwrap_or(Decision::Allowed),
            outcome: event.outcome,
            request_id: event.request_id,
            counts: event.counts,
            before: event.before,
            after: event.after,
            prev: to_hex(&prev),
        };
        let bytes = serde_json::to_vec(&record)
            .map_err(|e| Error::Internal(format!("audit record: {e}")))?;
        prev = sha256(&bytes);
        records.push(Record {
            timestamp: now_ms(),
            key: None,
            value: Some(bytes.into()),
            headers: Vec::new(),
            id: None,
        });
    }
    let batch = EncodedBatch::new(&records);
    let (tx, rx) = oneshot::channel();
    // A permit like every append to a topic's partition: the writer's inbox has room.
    let permit = Arc::clone(&partition.permits)
        .acquire_owned()
        .await
        .map_err(|_| Error::ShuttingDown)?;
    partition.log.append(
        batch,
        AppendMode::DURABLE,
        Box::new(move |r| {
            drop(permit);
            let _ = tx.send(r);
        }),
    );
    let appended = rx
        .await
        .map_err(|_| Error::Internal("the audit trail's writer dropped an append".into()))?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot append to the audit trail");
            Error::from(e)
        })?;
    if appended.base_offset != first {
        return Err(Error::Internal(format!(
            "audit record {first} stored at offset {}",
            appended.base_offset
        )));
    }
    chain.next = first + records.len() as u64;
    chain.prev = prev;
    Ok(())
}

/// A break in the chain, at the offset where it shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub offset: u64,
    pub problem: String,
}

/// Checks records (offset, stored bytes) in log order. Returns every break, first first; after a
/// break the check goes on from the record that showed it.
pub fn check_chain(records: impl IntoIterator<Item = (u64, Vec<u8>)>) -> Vec<ChainBreak> {
    let mut breaks = Vec::new();
    let mut last: Option<(u64, [u8; 32])> = None;
    for (offset, bytes) in records {
        let hash = sha256(&bytes);
        let record: AuditRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                breaks.push(ChainBreak {
                    offset,
                    problem: format!("not an audit record: {e}"),
                });
                last = Some((offset, hash));
                continue;
            }
        };
        if record.seq != offset {
            let problem = if record.seq > offset {
                format!(
                    "holds record {} where record {offset} belongs: a record before it was \
                     removed",
                    record.seq
                )
            } else {
                format!(
                    "holds record {} where record {offset} belongs: records were moved",
                    record.seq
                )
            };
            breaks.push(ChainBreak { offset, problem });
        } else {
            let expected = match last {
                Some((_, h)) => Some(h),
                None if offset == 0 => Some(GENESIS),
                // Retention removed what came before: the chain starts here.
                None => None,
            };
            if let Some(expected) = expected
                && record.prev != to_hex(&expected)
            {
                let (at, problem) = match last {
                    Some((prev_offset, _)) => (
                        prev_offset,
                        format!(
                            "changed after it was written: record {offset} says it hashed to \
                             {}",
                            record.prev
                        ),
                    ),
                    None => (offset, "the first record does not start the chain".into()),
                };
                breaks.push(ChainBreak {
                    offset: at,
                    problem,
                });
            }
        }
        last = Some((offset, hash));
    }
    breaks
}
