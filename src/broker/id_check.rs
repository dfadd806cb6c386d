//! Idempotent Send on a cluster: each partition's leader checks the ids of its share.
//!
//! A Send's messages with ids are split by partition (a message with an id and neither key nor
//! partition goes to the partition its id hashes to, so a retry through any node reaches the
//! same partition), and each share goes to its partition's leader: checked here when this node
//! leads, else handed over the cluster port (`SendIds`). The leader claims the ids against the
//! topic's id index exactly as a single node does ([`Dedup::claim`]), proposes the new
//! messages, and answers the others with their first position.
//!
//! Why that is enough across failovers: every replica learns the ids of each entry it applies
//! ([`Dedup::learn`], through the partition's state machine), and a new leader checks nothing
//! until it has applied the first entry of its own term, so by then every committed entry of
//! an earlier term is applied and its ids known. Ids claimed for a proposal whose outcome is
//! unknown (not committed in time) stay pending until the entry is applied or an entry of a
//! later term is ([`Dedup::applied_term`]): a retry meanwhile waits for it rather than stores it
//! again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::Raft;
use tokio_util::task::TaskTracker;

use super::clock::now_ms;
use super::dedup::{Claim, Claims, Dedup, Item, write_later};
use super::error::{Error, Result};
use super::message::Placed;
use super::topic::Topic;
use crate::proto::cluster as pb;
use crate::replication::PartitionRaft;
use crate::replication::write::{Forwarder, Resolve, WriteError, known_leader};
use crate::storage::ids::{Entry, Key};
use crate::storage::{DataDir, EncodedBatch, Record};

/// What the id check of a cluster node uses.
#[derive(Debug, Clone)]
pub struct IdCheck {
    pub forwarder: Arc<Forwarder>,
    /// Runs the id index's background writes.
    pub tasks: TaskTracker,
    /// Held while they run.
    pub data: Arc<DataDir>,
}

/// One partition's share of a Send with ids: its messages as records, and encoded as the
/// proposal that stores them all.
#[derive(Debug, Clone)]
pub struct Share {
    pub records: Vec<Record>,
    pub batch: Bytes,
}

impl Share {
    /// The share a `SendIds` carries (a proposal another node encoded).
    pub fn decode(batch: Bytes) -> std::result::Result<Share, &'static str> {
        let (_, records) = EncodedBatch::entry_records(&batch)?;
        let records = records
            .map(|r| r.map(Record::from))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Share { records, batch })
    }
}

impl IdCheck {
    /// One partition's share of a Send with ids, checked and stored by the partition's leader
    /// wherever it is; at most `deadline` in all. Each message's position, in the share's
    /// order.
    pub async fn at_leader(
        &self,
        topic: &Arc<Topic>,
        partition: u32,
        share: Share,
        deadline: Duration,
    ) -> Result<Vec<Placed>> {
        let until = Instant::now() + deadline;
        let group = topic.group_name(partition);
        let what = format!("partition {:?}/{partition}", topic.name);
        let handle = &topic.partitions[partition as usize];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            // A replica still catching up here (moving to this node) is not asked: its
            // holders are, until it is a voter.
            let (leader, nodes) = match (handle.replica.get(), handle.remote.get()) {
                (Some(raft), None) => {
                    let m = raft.metrics().borrow().clone();
                    if m.current_leader == Some(m.id) {
                        match self.here(topic, partition, &share, left).await {
                            // Lost the lead before proposing: the next leader is asked.
                            Err(Error::NoLeader { .. }) if !left.is_zero() => {
                                let mut metrics = raft.metrics();
                                let moved = metrics.wait_for(|n| n.current_leader != Some(n.id));
                                let _ = tokio::time::timeout(left, moved).await;
                                continue;
                            }
                            other => return other,
                        }
                    }
                    let voters = m.membership_config.membership().voter_ids().collect();
                    (known_leader(raft, self.forwarder.peers()), voters)
                }
                (_, Some(replicas)) => (None, replicas),
                (None, None) => {
                    return Err(Error::Unavailable(format!(
                        "{what} has not joined its Raft group yet; retry"
                    )));
                }
            };
            let placed = self
                .forwarder
                .send_ids(&group, leader, &nodes, share.batch.clone(), left)
                .await
                .map_err(|e| Error::not_written(&what, e))?;
            return Ok(placed
                .into_iter()
                .map(|p| Placed {
                    partition: p.partition,
                    offset: p.offset,
                    duplicate: p.duplicate,
                    removed: p.removed,
                })
                .collect());
        }
    }

    /// The id check of one partition's share of a Send with ids, made here, this node leading
    /// the partition: the ids claimed, the new messages proposed, every message answered with
    /// its position. [`Error::NoLeader`], nothing claimed or proposed, when this node does not
    /// lead it (or stops leading before it proposes).
    pub async fn here(
        &self,
        topic: &Arc<Topic>,
        partition: u32,
        share: &Share,
        deadline: Duration,
    ) -> Result<Vec<Placed>> {
        let what = format!("partition {:?}/{partition}", topic.name);
        let (Some(dedup), Some(handle)) = (&topic.dedup, topic.partitions.get(partition as usize))
        else {
            return Err(Error::FailedPrecondition(format!(
                "{what}: the topic keeps no ids"
            )));
        };
        let not_here = |raft: Option<&Raft<PartitionRaft>>| Error::NoLeader {
            what: what.clone(),
            leader: raft.and_then(|r| known_leader(r, self.forwarder.peers())),
        };
        let Some(raft) = handle.replica.get() else {
            return Err(not_here(None));
        };
        if !caught_up(raft, deadline).await {
            return Err(not_here(Some(raft)));
        }
        let records = &share.records;
        let floor = handle.log.high_water();
        let items: Vec<Item> = records
            .iter()
            .map(|r| Item {
                key: r.id.as_deref().map(Key::of),
                partition,
                floor,
            })
            .collect();
        let ends = || topic.high_waters();
        let Claims {
            each: claims,
            guard: claimed,
            froze,
        } = dedup.claim(&items, now_ms(), ends)?;
        if froze {
            write_later(dedup, &topic.name, &self.tasks, Arc::clone(&self.data));
        }
        let fresh: Vec<usize> = (0..records.len())
            .filter(|&i| matches!(claims[i], Claim::New))
            .collect();
        let mut out: Vec<Option<Placed>> = vec![None; records.len()];
        if !fresh.is_empty() {
            let proposal = if fresh.len() == records.len() {
                share.batch.clone()
            } else {
                let kept: Vec<Record> = fresh.iter().map(|&i| records[i].clone()).collect();
                EncodedBatch::new(&kept).into_bytes()
            };
            // Each new id's index in the proposal, and the time it is stored with.
            let ids: Vec<(u64, Key, i64)> = (0u64..)
                .zip(&fresh)
                .filter_map(|(k, &i)| Some((k, items[i].key?, records[i].timestamp)))
                .collect();
            claimed.hand_over();
            let resolve = resolver(Arc::clone(dedup), partition, ids);
            let group = topic.group_name(partition);
            let applied = self
                .forwarder
                .propose_here(raft, &group, proposal, deadline, resolve)
                .await;
            let base = match applied {
                Ok(a) => a
                    .offsets
                    .map(|(base, _)| base)
                    .ok_or_else(|| Error::Internal("a message entry took no offsets".into()))?,
                Err(WriteError::NoLeader(_)) => return Err(not_here(Some(raft))),
                Err(e) => return Err(Error::not_written(&what, e)),
            };
            for (k, &i) in fresh.iter().enumerate() {
                out[i] = Some(Placed::new(partition, base + k as u64));
            }
        } else {
            claimed.hand_over();
        }
        answer_known(topic, dedup, claims, out, Some(deadline)).await
    }
}

/// Waits until this node, leading `raft`'s group, has applied the first entry of its own term
/// (every entry committed before is then applied here, and its ids known); false when it does
/// not lead the group, or has not caught up within `deadline`.
async fn caught_up(raft: &Raft<PartitionRaft>, deadline: Duration) -> bool {
    let ready = |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| {
        m.current_leader != Some(m.id)
            || m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term)
    };
    let mut metrics = raft.metrics();
    let _ = tokio::time::timeout(deadline, metrics.wait_for(ready)).await;
    let m = raft.metrics().borrow().clone();
    m.current_leader == Some(m.id)
        && m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term)
}

/// How a proposal of new ids came out, told by the round that proposed it whatever became of
/// the Send: committed, the ids are known at their positions (the replica learnt them as it
/// applied the entry; settled again here, the same entries); refused before it was proposed,
/// they are released; otherwise the outcome is unknown and they stay pending, doubted in the
/// term it was proposed in.
fn resolver(dedup: Arc<Dedup>, partition: u32, ids: Vec<(u64, Key, i64)>) -> Resolve {
    Box::new(move |outcome, term| match outcome {
        Ok(applied) => {
            let Some((base, _)) = applied.offsets else {
                return;
            };
            let stored: Vec<(Key, Entry)> = ids
                .iter()
                .map(|&(k, key, stored_ms)| {
                    let entry = Entry {
                        partition,
                        offset: base + k,
                        stored_ms,
                    };
                    (key, entry)
                })
                .collect();
            dedup.settle(&stored);
        }
        Err(WriteError::NoLeader(_)) => {
            let keys: Vec<Key> = ids.iter().map(|&(_, key, _)| key).collect();
            dedup.release(
                &keys,
                "its partition's leader changed before it was proposed",
            );
        }
        Err(_) => {
            let keys = ids.iter().map(|&(_, key, _)| key).collect();
            dedup.doubt(partition, term, keys);
        }
    })
}

/// Fills in the messages whose ids were known (or being stored by another Send, waited for at
/// most `wait`, or repeated in the request) with their first positions; `out` holds the new
/// ones' already.
pub async fn answer_known(
    topic: &Arc<Topic>,
    dedup: &Dedup,
    claims: Vec<Claim>,
    mut out: Vec<Option<Placed>>,
    wait: Option<Duration>,
) -> Result<Vec<Placed>> {
    let mut duplicates = 0;
    for (i, claim) in claims.into_iter().enumerate() {
        let entry = match claim {
            Claim::New => continue,
            Claim::Repeat(first) => {
                let Some(first) = out[first] else {
                    return Err(Error::Internal("a repeated id has no position".into()));
                };
                out[i] = Some(Placed {
                    duplicate: true,
                    ..first
                });
                duplicates += 1;
                continue;
            }
            Claim::Known(e) => e,
            Claim::Wait(rx) => match wait_for(wait, rx).await {
                Ok(Ok(Ok(e))) => e,
                Ok(Ok(Err(why))) => {
                    return Err(Error::Unavailable(format!(
                        "another Send carrying message {i}'s id was storing it and failed: \
                         {why}; send again"
                    )));
                }
                Ok(Err(_)) => return Err(Error::Internal("an id's append was dropped".into())),
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "another Send carrying message {i}'s id is storing it, its outcome not \
                         known within {} ms; send again",
                        wait.unwrap_or_default().as_millis()
                    )));
                }
            },
        };
        duplicates += 1;
        out[i] = Some(Placed {
            partition: entry.partition,
            offset: entry.offset,
            duplicate: true,
            removed: !topic.still_holds(entry).await?,
        });
    }
    if duplicates > 0 {
        dedup.answered(duplicates);
    }
    Ok(out.into_iter().flatten().collect())
}

async fn wait_for<F: std::future::Future>(
    wait: Option<Duration>,
    f: F,
) -> std::result::Result<F::Output, tokio::time::error::Elapsed> {
    match wait {
        Some(d) => tokio::time::timeout(d, f).await,
        None => Ok(f.await),
    }
}

/// As the cluster port answers a `SendIds`.
pub fn to_placements(placed: &[Placed]) -> Vec<pb::Placement> {
    placed
        .iter()
        .map(|p| pb::Placement {
            partition: p.partition,
            offset: p.offset,
            duplicate: p.duplicate,
            removed: p.removed,
        })
        .collect()
}
