//! Retention and key compaction: the same code serves `sluice compact` (offline, on a stopped
//! broker's data directory), the `Compact` admin RPC (online) and the broker's periodic
//! retention task. Reads the topics and what their consumer groups still need; records what the
//! periodic run removed in the audit trail.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::storage::topic::CleanupPolicy;
use crate::storage::{CompactionOptions, CompactionOutcome, Retention, RetentionOutcome};

use super::audit::{AUDIT_TOPIC, AuditEvent, AuditTrail, refuse_audit_topic};
use super::blocking::blocking;
use super::clock::now_ms;
use super::cluster::Cluster;
use super::consumers::Consumers;
use super::error::{Error, Result};
use super::groups::Groups;
use super::message::Start;
use super::topic::Topic;
use super::topics::Topics;

/// What maintenance did to one partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionMaintenance {
    pub topic: String,
    pub partition: u32,
    pub outcome: RetentionOutcome,
    /// The consumer group whose position holds segments back, if any.
    pub held_by: Option<String>,
    /// Key compaction, for topics with `cleanup_policy = compact` (not in a dry run).
    pub compaction: Option<CompactionOutcome>,
}

/// The maintenance passes of a broker.
#[derive(Debug)]
pub struct Maintenance {
    topics: Arc<Topics>,
    groups: Arc<Groups>,
    audit: Arc<AuditTrail>,
    /// Cluster mode: a replicated partition's retention is decided by its leader, through Raft.
    cluster: Option<Arc<Cluster>>,
    /// Cluster mode: the consumer groups, whose positions their leaders hold.
    consumers: Option<Arc<Consumers>>,
}

impl Maintenance {
    pub fn new(
        topics: Arc<Topics>,
        groups: Arc<Groups>,
        audit: Arc<AuditTrail>,
        cluster: Option<Arc<Cluster>>,
        consumers: Option<Arc<Consumers>>,
    ) -> Maintenance {
        Maintenance {
            topics,
            groups,
            audit,
            cluster,
            consumers,
        }
    }

    /// Per partition, the offset below which every consumer group has acknowledged everything,
    /// and the group furthest behind. `None` where no group reads the topic. On a cluster each
    /// group's position is its leader's (asked through the cluster port when that is another
    /// node); a group whose leader cannot be asked holds the whole partition.
    pub async fn consumed_below(&self, topic: &Arc<Topic>) -> Result<Vec<Option<(u64, String)>>> {
        let mut out: Vec<Option<(u64, String)>> = vec![None; topic.partitions.len()];
        let groups: Vec<String> = match &self.consumers {
            Some(c) => c.groups_on(topic),
            None => self
                .groups
                .list_groups()?
                .into_iter()
                .filter(|(_, topics)| topics.iter().any(|t| *t == *topic.name))
                .map(|(g, _)| g)
                .collect(),
        };
        for group in groups {
            let committed: Vec<(u32, u64)> = match &self.consumers {
                Some(c) => match c.describe(&group, &topic.name).await {
                    Ok(d) => d
                        .partitions
                        .iter()
                        .map(|p| (p.partition, p.committed))
                        .collect(),
                    Err(e) => {
                        tracing::warn!(%group, topic = %topic.name, error = %e, "a consumer group's position is not known here: it holds every message back from retention");
                        topic.partitions.iter().map(|h| (h.id, 0)).collect()
                    }
                },
                None => self
                    .groups
                    .group(&group, &topic.name, Start::Earliest)
                    .await?
                    .describe()
                    .partitions
                    .iter()
                    .map(|p| (p.partition, p.committed))
                    .collect(),
            };
            for (p, c) in committed {
                let Some(slot) = out.get_mut(p as usize) else {
                    continue;
                };
                if slot.as_ref().is_none_or(|(held, _)| c < *held) {
                    *slot = Some((c, group.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Applies retention (time, size, and what consumer groups still need) to one topic or all
    /// (`_audit` is not among them, and refused by name unless `dry_run`: only the periodic run
    /// applies its configured retention).
    pub async fn maintain(
        &self,
        topic: Option<&str>,
        dry_run: bool,
    ) -> Result<Vec<PartitionMaintenance>> {
        if let Some(name) = topic
            && !dry_run
        {
            refuse_audit_topic(name, "compacted or shortened")?;
        }
        let topics: Vec<Arc<Topic>> = match topic {
            Some(name) => vec![self.topics.existing(name)?],
            None => self.topics.open_topics(),
        };
        self.maintain_topics(topics, dry_run, true, None).await
    }

    /// [`Maintenance::maintain`] of partition `partition` of `topic` alone: what a node holding
    /// it does when a node that holds none is asked (cluster mode, the cluster port's
    /// `Maintain`).
    pub async fn maintain_partition(
        &self,
        topic: &str,
        partition: u32,
        dry_run: bool,
    ) -> Result<Option<PartitionMaintenance>> {
        let topics = vec![self.topics.existing(topic)?];
        let report = self
            .maintain_topics(topics, dry_run, true, Some(partition))
            .await?;
        Ok(report.into_iter().next())
    }

    /// `on_demand`: asked for (the `Compact` call), so in a cluster this node decides for every
    /// partition, not only those it leads, and has a node holding each partition it holds no
    /// replica of decide for that one. `only`: that partition of each topic alone.
    async fn maintain_topics(
        &self,
        topics: Vec<Arc<Topic>>,
        dry_run: bool,
        on_demand: bool,
        only: Option<u32>,
    ) -> Result<Vec<PartitionMaintenance>> {
        let mut report = Vec::new();
        for topic in topics {
            let config = &topic.config;
            let consumed = if config.retain_until_consumed {
                self.consumed_below(&topic).await?
            } else {
                vec![None; topic.partitions.len()]
            };
            // Ids first: records are removed only below what the id index has on disk.
            let marks = if dry_run {
                vec![u64::MAX; topic.partitions.len()]
            } else {
                let t = Arc::clone(&topic);
                blocking(move || {
                    t.persist_ids()?;
                    Ok(t.id_watermarks())
                })
                .await?
            };
            for ((handle, consumed), mark) in topic.partitions.iter().zip(consumed).zip(marks) {
                if only.is_some_and(|p| p != handle.id) {
                    continue;
                }
                let keep_from = consumed
                    .as_ref()
                    .map(|(c, _)| *c)
                    .into_iter()
                    .chain((mark < u64::MAX).then_some(mark))
                    .min();
                let retention = Retention {
                    max_age_ms: config.retention_ms,
                    max_bytes: config.retention_bytes,
                    keep_from,
                };
                // Cluster mode, a partition this node holds no replica of: its nodes keep it
                // (its leader decides on its schedule), not this node's empty log; asked for,
                // one of them decides now.
                if let Some(replicas) = handle.remote.get() {
                    if let (true, Some(cluster)) = (on_demand, &self.cluster) {
                        let group = topic.group_name(handle.id);
                        let answer = cluster.maintain_remote(&group, &replicas, dry_run).await?;
                        let done = serde_json::from_slice(&answer).map_err(|e| {
                            Error::Internal(format!(
                                "{group:?}: a report that does not decode: {e}"
                            ))
                        })?;
                        report.push(done);
                    }
                    continue;
                }
                let h = Arc::clone(handle);
                let now = now_ms();
                if let Some(cluster) = self.cluster.as_ref().filter(|_| h.replica.get().is_some()) {
                    let decide = Decide {
                        cluster,
                        topic: &topic,
                        handle: &h,
                        now,
                        dry_run,
                        on_demand,
                    };
                    let outcome = decide.retention(retention).await?;
                    let compaction = if config.cleanup_policy == CleanupPolicy::Compact {
                        decide.compaction(config.delete_retention_ms).await?
                    } else {
                        None
                    };
                    report.push(PartitionMaintenance {
                        topic: topic.name.to_string(),
                        partition: handle.id,
                        outcome,
                        held_by: None,
                        compaction,
                    });
                    continue;
                }
                let outcome = blocking(move || Ok(h.log.retain(&retention, now, dry_run)?)).await?;
                // Compaction rewrites closed segments: all of them must be below the mark.
                let below_mark = handle.log.segment_bases().last().is_none_or(|&a| a <= mark);
                let compaction = if config.cleanup_policy == CleanupPolicy::Compact && below_mark {
                    let opts = CompactionOptions {
                        now_ms: now,
                        delete_retention_ms: config.delete_retention_ms,
                        segment_bytes: handle.log.config().segment_bytes,
                        below: None,
                    };
                    let h = Arc::clone(handle);
                    // A dry run counts exactly what the real run would drop.
                    Some(
                        blocking(move || {
                            Ok(if dry_run {
                                h.log.plan_compaction(&opts)?
                            } else {
                                h.log.compact_keys(&opts)?
                            })
                        })
                        .await?,
                    )
                } else {
                    None
                };
                if outcome.deleted_segments > 0 && !dry_run {
                    tracing::info!(topic = %topic.name, partition = handle.id,
                        segments = outcome.deleted_segments, bytes = outcome.deleted_bytes,
                        "retention deleted segments");
                }
                report.push(PartitionMaintenance {
                    topic: topic.name.to_string(),
                    partition: handle.id,
                    outcome,
                    held_by: (outcome.held_segments > 0)
                        .then(|| consumed.map(|(_, g)| g))
                        .flatten(),
                    compaction,
                });
            }
        }
        Ok(report)
    }

    /// Retention over every topic, `_audit` included; what it deleted goes into the audit trail.
    pub async fn periodic_retention(&self) -> Result<()> {
        let mut topics = self.topics.open_topics();
        topics.extend(self.topics.get(AUDIT_TOPIC));
        for m in self.maintain_topics(topics, false, false, None).await? {
            let dropped = m.outcome.log_start - m.outcome.log_start_before;
            if m.outcome.deleted_segments == 0
                && m.compaction
                    .is_none_or(|c| c.records_before == c.records_after)
            {
                continue;
            }
            let compacted = m
                .compaction
                .map_or(0, |c| c.records_before - c.records_after);
            let event = AuditEvent {
                resource: format!("topic {:?} partition {}", m.topic, m.partition),
                ..AuditEvent::system("broker/retention", "ok")
            }
            .count("deleted_segments", m.outcome.deleted_segments as u64)
            .count("deleted_bytes", m.outcome.deleted_bytes)
            .count("records_dropped", dropped + compacted);
            self.audit.record(event).await?;
        }
        Ok(())
    }

    /// Runs retention every `interval` until `stop`, or until the broker is dropped.
    pub fn start_retention(
        self: &Arc<Self>,
        interval: Duration,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) {
        let me: Weak<Maintenance> = Arc::downgrade(self);
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = stop.cancelled() => return,
                }
                let Some(maintenance) = me.upgrade() else {
                    return;
                };
                if let Err(e) = maintenance.periodic_retention().await {
                    tracing::warn!(error = %e, "periodic retention failed");
                }
            }
        });
    }
}

/// Retention and compaction of one replicated partition.
struct Decide<'a> {
    cluster: &'a Cluster,
    topic: &'a Topic,
    handle: &'a Arc<super::topic::PartitionHandle>,
    now: i64,
    dry_run: bool,
    /// Asked for: this node decides even when it does not lead the partition.
    on_demand: bool,
}

impl Decide<'_> {
    /// The rules pick the same segments as on a single node, here, and the first offset kept is
    /// proposed to every replica (see `Cluster::trim`); each replica then drops the messages
    /// below it. Where nothing is decided (periodically, on a node that does not lead the
    /// partition), the outcome deletes nothing.
    async fn retention(&self, retention: Retention) -> Result<RetentionOutcome> {
        let (h, now) = (Arc::clone(self.handle), self.now);
        let mut outcome = blocking(move || Ok(h.log.retain(&retention, now, true)?)).await?;
        let before = outcome.log_start_before;
        let decided = outcome.log_start > before
            && (self.dry_run
                || (self.cluster)
                    .trim(self.topic, self.handle, outcome.log_start, self.on_demand)
                    .await?);
        if !decided {
            outcome.log_start = before;
            outcome.deleted_segments = 0;
            outcome.deleted_bytes = 0;
        }
        Ok(outcome)
    }

    /// Key compaction: a compaction point is proposed (see `Cluster::compact`); every replica,
    /// this one included, compacts to the latest point it has applied. A dry run counts what
    /// compacting to that point would drop.
    async fn compaction(&self, delete_retention_ms: u64) -> Result<Option<CompactionOutcome>> {
        let proposed = !self.dry_run
            && (self.cluster)
                .compact(self.topic, self.handle, self.now, self.on_demand)
                .await;
        let (h, dry_run) = (Arc::clone(self.handle), self.dry_run);
        blocking(move || {
            let outcome = h.log.compact_to_point(delete_retention_ms, dry_run)?;
            if outcome.is_some() || !proposed {
                return Ok(outcome);
            }
            // The point this pass proposed may have been compacted to already, on apply: its
            // outcome is this pass's to report.
            Ok(h.log.compaction_point().and_then(|p| h.log.compacted_to(p)))
        })
        .await
    }
}
