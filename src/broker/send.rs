//! Sends: the path from a producer's request to durable partitions. Checks (counts, sizes,
//! ids, routing, each partition's batch size), topic creation on first use, encoding one batch
//! per partition on the calling task, taking the partitions' permits, handing the batches to
//! their writers and waiting until all are durable; and the id check of idempotent Send
//! ([`dedup`](super::dedup)), settled by the writers' completions.
//!
//! Consumer groups write dead letters through the same path, holding only a
//! [`DeadLetterAppender`].
//!
//! Over 450 lines with one job: the send path is read top to bottom (checks, plan, claim ids,
//! append, settle), and cutting it would split one request's trail over files.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ack_poll::AckPoller;
use super::audit::{AuditEvent, refuse_audit_topic};
use super::clock::now_ms;
use super::dedup::{Claim, Claimed, Claims, Dedup, Item};
use super::error::{Error, Result};
use super::id_check::{IdCheck, Share, answer_known};
use super::message::{NewMessage, Placed};
use super::topic::{self, Topic};
use super::topics::Topics;
use crate::metrics::Metrics;
use crate::replication::Proposal;
use crate::replication::write::Forwarder;
use crate::storage::ids::{Entry, Key, MAX_ID_BYTES};
use crate::storage::{self, AppendMode, Appended, EncodedBatch, Record, validate_topic_name};

/// What a Send may hold.
#[derive(Debug, Clone, Copy)]
pub struct SendLimits {
    /// Create a topic on its first Send.
    pub auto_create_topics: bool,
    pub max_batch_messages: usize,
    pub max_message_bytes: usize,
    /// One partition's share of a Send, encoded (`log.max_batch_bytes`).
    pub max_batch_bytes: usize,
    /// Cluster mode: batches are proposed to their partitions' groups, each waiting at most
    /// this long to be committed.
    pub replicated: Option<std::time::Duration>,
}

/// The send path of a broker.
#[derive(Debug)]
pub struct Sends {
    pub(super) topics: Arc<Topics>,
    pub(super) limits: SendLimits,
    /// Lets a lone producer's Send poll for its acknowledgement (see [`super::ack_poll`]).
    pub(super) acks: AckPoller,
    /// A Send to one partition is served on its own thread while the writers have nothing to
    /// do and the partition's last sync took at most this ([`Partition::append_here_when_quiet`]);
    /// `None`: never.
    ///
    /// [`Partition::append_here_when_quiet`]: crate::storage::Partition::append_here_when_quiet
    pub(super) inline_sync: Option<std::time::Duration>,
    pub(super) metrics: Arc<Metrics>,
    /// Runs the id index's background writes and merges.
    pub(super) tasks: TaskTracker,
    pub(super) shutdown: CancellationToken,
    /// Cluster mode: takes batches to partitions' leaders on other nodes.
    pub(super) forwarder: Arc<Forwarder>,
}

/// What a consumer group holds to write dead letters: appends to a `<topic>.dlq`, created when
/// missing, through the send path, and nothing else of the broker.
#[derive(Debug, Clone)]
pub struct DeadLetterAppender {
    sends: Arc<Sends>,
}

impl DeadLetterAppender {
    pub fn new(sends: Arc<Sends>) -> DeadLetterAppender {
        DeadLetterAppender { sends }
    }

    /// The dead-letter topic `name`, created when missing whatever `auto_create_topics` says
    /// (the broker writes it), the creation recorded in the audit trail.
    pub async fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        let event = AuditEvent::system("broker/dead-letter", "");
        self.sends.topics.get_or_create(name, Some(event)).await
    }

    /// Appends one dead letter and waits until it is durable.
    pub async fn append(&self, topic: &Arc<Topic>, message: NewMessage) -> Result<Placed> {
        let placed = self.sends.send_to(topic, vec![message]).await?;
        placed
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal("a dead letter was not placed".into()))
    }
}

/// One partition's share of a Send, encoded.
struct PlannedBatch {
    partition: u32,
    batch: EncodedBatch,
    /// The records it encodes (a Send with ids on a cluster checks them).
    records: Vec<Record>,
    /// Request indexes of the batch's records, in order.
    indexes: Vec<usize>,
}

/// The ids of a Send being appended: the topic's id index and each message's key.
struct Ids<'a> {
    dedup: &'a Arc<Dedup>,
    keys: &'a [Option<Key>],
    claimed: Claimed,
}

impl Sends {
    /// Appends messages and returns each one's position, in request order, once all of them
    /// are durable.
    pub async fn send(&self, topic: &str, messages: Vec<NewMessage>) -> Result<Vec<Placed>> {
        let create = self
            .limits
            .auto_create_topics
            .then(|| AuditEvent::system("broker/send", ""));
        self.send_with(topic, messages, create).await
    }

    /// [`Sends::send`], creating the topic when missing if `create` says who asks (the seed
    /// API always creates).
    ///
    /// All or nothing up to the disk: every check (counts, sizes, ids, routing, partition
    /// existence, each partition's batch size, topic creation) runs before the first byte
    /// reaches a writer, so a refused Send stores nothing. Only an I/O failure in one partition
    /// can leave the others' messages stored (see docs/api.md).
    pub async fn send_with(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
        create: Option<AuditEvent>,
    ) -> Result<Vec<Placed>> {
        let started = std::time::Instant::now();
        let placed = self.send_checked(topic, messages, create).await;
        if placed.is_ok() {
            self.metrics
                .send_durable
                .observe_duration(started.elapsed());
        }
        placed
    }

    async fn send_checked(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
        create: Option<AuditEvent>,
    ) -> Result<Vec<Placed>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        refuse_audit_topic(topic, "written to")?;
        if messages.is_empty() {
            return Err(Error::InvalidArgument(
                "a Send needs at least one message".into(),
            ));
        }
        if messages.len() > self.limits.max_batch_messages {
            return Err(Error::LimitExceeded(format!(
                "a Send may hold at most {} messages, this one has {}",
                self.limits.max_batch_messages,
                messages.len()
            )));
        }
        let limit = self.limits.max_message_bytes;
        if let Some((index, m)) = messages.iter().enumerate().find(|(_, m)| m.size() > limit) {
            return Err(Error::MessageTooLarge {
                index,
                size: m.size(),
                limit,
            });
        }
        if let Some((index, len)) = messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.id.as_ref().map(|id| (i, id.len())))
            .find(|(_, len)| !(1..=MAX_ID_BYTES).contains(len))
        {
            return Err(Error::InvalidArgument(format!(
                "message {index}'s id is {len} bytes; an id is 1 to {MAX_ID_BYTES} bytes"
            )));
        }
        validate_topic_name(topic)?;
        let (messages, create) = match (self.topics.get(topic), create) {
            (Some(t), _) => return self.send_to(&t, messages).await,
            (None, None) => return Err(Error::TopicNotFound(topic.to_string())),
            (None, Some(event)) => (messages, event),
        };
        // Checked against the partitions the topic will have, before it is created.
        let count = self.topics.default_partitions();
        let plan = self.plan(topic, count, 0, messages.clone(), now_ms())?;
        drop(plan);
        let t = self.topics.get_or_create(topic, Some(create)).await?;
        if t.partitions.len() as u32 != count {
            // Created meanwhile by someone else, with another partition count.
            return Err(Error::FailedPrecondition(format!(
                "topic {topic:?} was created meanwhile with {} partitions; nothing was stored, \
                 send again",
                t.partitions.len()
            )));
        }
        self.send_to(&t, messages).await
    }

    /// Routes and appends messages to an open topic; returns once all are durable. Messages
    /// with ids go through the topic's id check when it has one.
    pub async fn send_to(
        &self,
        topic: &Arc<Topic>,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Placed>> {
        let spread = topic.next_spread_partition();
        let count = topic.partitions.len() as u32;
        let n = messages.len();
        let now = now_ms();
        if let Some(deadline) = self.limits.replicated
            && topic.dedup.is_some()
            && messages.iter().any(|m| m.id.is_some())
        {
            return self.send_ids_replicated(topic, messages, deadline).await;
        }
        let dedup = match &topic.dedup {
            Some(d) if messages.iter().any(|m| m.id.is_some()) => d,
            _ => {
                let plan = self.plan(&topic.name, count, spread, messages, now)?;
                let mut out = vec![None; n];
                self.append_planned(topic, plan, None, now, &mut out)
                    .await?;
                return Ok(out.into_iter().flatten().collect());
            }
        };
        let mut items = Vec::with_capacity(n);
        for m in &messages {
            let partition = route(&topic.name, m, count, spread)?;
            items.push(Item {
                key: m.id.as_deref().map(Key::of),
                partition,
                floor: topic.partitions[partition as usize].log.high_water(),
            });
        }
        let ends = || topic.high_waters();
        let Claims {
            each: claims,
            guard: claimed,
            froze,
        } = dedup.claim(&items, now, ends)?;
        if froze {
            self.write_ids_later(topic);
        }
        let keys: Vec<Option<Key>> = items.iter().map(|it| it.key).collect();
        let mut fresh = Vec::new();
        let mut fresh_index = Vec::new();
        for (i, (mut m, c)) in messages.into_iter().zip(&claims).enumerate() {
            if matches!(c, Claim::New) {
                m.partition = Some(items[i].partition);
                fresh.push(m);
                fresh_index.push(i);
            }
        }
        let mut out = vec![None; n];
        if !fresh.is_empty() {
            let plan = match self.plan(&topic.name, count, spread, fresh, now) {
                Ok(plan) => plan,
                Err(e) => {
                    claimed.release(&e.to_string());
                    return Err(e);
                }
            };
            let plan = plan
                .into_iter()
                .map(|mut b| {
                    b.indexes = b.indexes.iter().map(|&j| fresh_index[j]).collect();
                    b
                })
                .collect();
            let ids = Ids {
                dedup,
                keys: &keys,
                claimed,
            };
            self.append_planned(topic, plan, Some(ids), now, &mut out)
                .await?;
        }
        answer_known(topic, dedup, claims, out, None).await
    }

    /// Cluster mode, a topic with an id index: each partition's share of the messages is
    /// checked and stored by that partition's leader, all shares at once (see
    /// [`super::id_check`]). Every check (sizes, routing, each share's batch size) runs before
    /// anything is sent.
    async fn send_ids_replicated(
        &self,
        topic: &Arc<Topic>,
        messages: Vec<NewMessage>,
        deadline: std::time::Duration,
    ) -> Result<Vec<Placed>> {
        let count = topic.partitions.len() as u32;
        let spread = topic.next_spread_partition();
        let n = messages.len();
        let routed: Vec<NewMessage> = messages
            .into_iter()
            .map(|mut m| {
                if let (Some(id), None, None) = (&m.id, m.partition, &m.key) {
                    // Routed by its id, as a key would be: a retry reaches the same check.
                    m.partition = Some(topic::key_partition(id, count));
                }
                m
            })
            .collect();
        let mut plan = self.plan(&topic.name, count, spread, routed, now_ms())?;
        if plan.len() == 1
            && let Some(b) = plan.pop()
        {
            // One partition's share (most Sends): checked on this task.
            let share = Share {
                records: b.records,
                batch: b.batch.into_bytes(),
            };
            return (self.id_check())
                .at_leader(topic, b.partition, share, deadline)
                .await;
        }
        let mut shares = tokio::task::JoinSet::new();
        for b in plan {
            let (check, topic) = (self.id_check(), Arc::clone(topic));
            shares.spawn(async move {
                let share = Share {
                    records: b.records,
                    batch: b.batch.into_bytes(),
                };
                let placed = check.at_leader(&topic, b.partition, share, deadline).await;
                (b.indexes, placed)
            });
        }
        let mut out = vec![None; n];
        while let Some(joined) = shares.join_next().await {
            let (indexes, placed) =
                joined.map_err(|e| Error::Internal(format!("a partition's share failed: {e}")))?;
            let placed = placed?;
            if placed.len() != indexes.len() {
                return Err(Error::Internal(format!(
                    "a partition's leader answered {} positions for {} messages",
                    placed.len(),
                    indexes.len()
                )));
            }
            for (i, p) in indexes.into_iter().zip(placed) {
                out[i] = Some(p);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// What the id check of a Send with ids uses on a cluster.
    pub fn id_check(&self) -> IdCheck {
        IdCheck {
            forwarder: Arc::clone(&self.forwarder),
            tasks: self.tasks.clone(),
            data: Arc::clone(self.topics.data()),
        }
    }

    /// Writes a topic's frozen memtables as runs, then merges runs, off the request path (see
    /// [`super::dedup::write_later`]).
    fn write_ids_later(&self, topic: &Arc<Topic>) {
        if let Some(dedup) = &topic.dedup {
            let data = Arc::clone(self.topics.data());
            super::dedup::write_later(dedup, &topic.name, &self.tasks, data);
        }
    }

    /// Routes messages to `count` partitions and encodes one batch per partition, checking each
    /// against `log.max_batch_bytes`. Writes nothing.
    fn plan(
        &self,
        topic: &str,
        count: u32,
        spread: u32,
        messages: Vec<NewMessage>,
        timestamp: i64,
    ) -> Result<Vec<PlannedBatch>> {
        let mut routes: Vec<(Vec<Record>, Vec<usize>)> =
            vec![(Vec::new(), Vec::new()); count as usize];
        for (i, m) in messages.into_iter().enumerate() {
            let p = route(topic, &m, count, spread)?;
            let route = &mut routes[p as usize];
            route.0.push(Record {
                timestamp,
                key: m.key,
                value: m.value,
                headers: m.headers,
                id: m.id,
            });
            route.1.push(i);
        }
        let mut batches = Vec::new();
        for (p, (records, indexes)) in routes.into_iter().enumerate() {
            if records.is_empty() {
                continue;
            }
            let batch = EncodedBatch::new(&records);
            if let Err(e) = batch.check(self.limits.max_batch_bytes) {
                return Err(match e {
                    storage::Error::BatchTooLarge { size, limit } => Error::LimitExceeded(format!(
                        "the {} messages of this Send routed to partition {p} encode to {size} \
                             bytes; one partition's share of a Send is limited to {limit} \
                             (log.max_batch_bytes): split the request",
                        indexes.len()
                    )),
                    other => other.into(),
                });
            }
            batches.push(PlannedBatch {
                partition: p as u32,
                batch,
                records,
                indexes,
            });
        }
        Ok(batches)
    }

    /// Hands every planned batch to its partition's writer, then waits until all are durable,
    /// filling `out` at the batches' request indexes. The permits of every partition are taken
    /// first (in partition order, so two Sends cannot hold each other up), so that nothing is
    /// handed over unless everything can be. With `ids`, each writer's completion settles its
    /// batch's ids (or releases them if the append failed) before the Send hears of it, so that
    /// an answered id is never still pending (a clean stop right after writes it to a run).
    async fn append_planned(
        &self,
        topic: &Arc<Topic>,
        plan: Vec<PlannedBatch>,
        ids: Option<Ids<'_>>,
        timestamp: i64,
        out: &mut [Option<Placed>],
    ) -> Result<()> {
        if let Some(deadline) = self.limits.replicated {
            return propose_planned(&self.forwarder, topic, plan, deadline, out).await;
        }
        let mut permits = Vec::with_capacity(plan.len());
        for b in &plan {
            let handle = &topic.partitions[b.partition as usize];
            let permit = Arc::clone(&handle.permits)
                .acquire_owned()
                .await
                .map_err(|_| Error::ShuttingDown)?;
            permits.push(permit);
        }
        let settle = ids.map(|ids| {
            ids.claimed.hand_over();
            (ids.dedup, ids.keys)
        });
        // One partition, on a runtime with another worker to go on meanwhile: its batch may be
        // written and synced on this thread (docs/storage.md, "A lone producer").
        let inline = self
            .inline_sync
            .filter(|_| plan.len() == 1 && other_workers());
        // Hand every batch to its writer first, then wait: the partitions sync in parallel.
        let mut pending = Vec::with_capacity(plan.len());
        for (b, permit) in plan.into_iter().zip(permits) {
            let (tx, rx) = oneshot::channel();
            let partition = b.partition;
            let ids = settle.map(|(dedup, keys)| BatchIds {
                dedup: Arc::clone(dedup),
                keys: (0u64..)
                    .zip(&b.indexes)
                    .filter_map(|(k, &i)| keys[i].map(|key| (k, key)))
                    .collect(),
                partition,
                timestamp,
            });
            let done: storage::Completion = Box::new(move |r| {
                if let Some(ids) = ids {
                    ids.settle(&r);
                }
                drop(permit);
                let _ = tx.send(r);
            });
            let log = &topic.partitions[partition as usize].log;
            match inline {
                Some(max_sync) => {
                    log.append_here_when_quiet(b.batch, AppendMode::DURABLE, max_sync, done)
                }
                None => log.append(b.batch, AppendMode::DURABLE, done),
            }
            pending.push((partition, b.indexes, rx));
        }
        for (p, indexes, rx) in pending {
            let log = &topic.partitions[p as usize].log;
            let appended = self
                .acks
                .wait(|| log.lone_sync_time(), rx)
                .await
                .ok_or_else(|| Error::Internal("partition writer dropped an append".into()))??;
            for (k, i) in indexes.into_iter().enumerate() {
                out[i] = Some(Placed::new(p, appended.base_offset + k as u64));
            }
        }
        Ok(())
    }
}

/// Cluster mode's [`Sends::append_planned`]: every batch proposed to its partition's group at
/// once (here, or forwarded to its leader), each answered once committed on a majority and
/// applied on the leader (its offsets as every replica's writer assigns them).
async fn propose_planned(
    forwarder: &Arc<Forwarder>,
    topic: &Arc<Topic>,
    plan: Vec<PlannedBatch>,
    deadline: std::time::Duration,
    out: &mut [Option<Placed>],
) -> Result<()> {
    let mut pending = Vec::with_capacity(plan.len());
    for b in plan {
        let what = format!("partition {:?}/{}", topic.name, b.partition);
        let handle = &topic.partitions[b.partition as usize];
        let (raft, remote) = (handle.replica.get().cloned(), handle.remote.get());
        if raft.is_none() && remote.is_none() {
            return Err(Error::Unavailable(format!(
                "{what} has not joined its Raft group yet; retry"
            )));
        }
        let proposal = Proposal::Records(b.batch.into_bytes());
        let (forwarder, group) = (Arc::clone(forwarder), topic.group_name(b.partition));
        let proposed = tokio::spawn(async move {
            // A replica still catching up here (moving to this node) is not asked: its holders
            // are, until it is a voter.
            let outcome = match (raft, remote) {
                (Some(raft), None) => forwarder.propose(&raft, &group, proposal, deadline).await,
                (_, replicas) => {
                    let replicas = replicas.unwrap_or_default();
                    (forwarder.propose_remote(&group, &replicas, proposal, deadline)).await
                }
            };
            outcome.map_err(|e| (what, e))
        });
        pending.push((b.partition, b.indexes, proposed));
    }
    for (p, indexes, proposed) in pending {
        let applied = proposed
            .await
            .map_err(|e| Error::Internal(format!("a proposal's task failed: {e}")))?
            .map_err(|(what, e)| Error::not_written(&what, e))?;
        let Some((base, _)) = applied.offsets else {
            return Err(Error::Internal("a message entry took no offsets".into()));
        };
        for (k, i) in indexes.into_iter().enumerate() {
            out[i] = Some(Placed::new(p, base + k as u64));
        }
    }
    Ok(())
}

/// One batch's ids, settled by the writer's completion.
struct BatchIds {
    dedup: Arc<Dedup>,
    /// (index in the batch, key) of each record with an id.
    keys: Vec<(u64, Key)>,
    partition: u32,
    timestamp: i64,
}

impl BatchIds {
    /// Durable: the ids go into the index. Failed: they are released, waiters told why.
    fn settle(self, appended: &storage::Result<Appended>) {
        match appended {
            Ok(a) => {
                let stored: Vec<(Key, Entry)> = self
                    .keys
                    .iter()
                    .map(|&(k, key)| {
                        let entry = Entry {
                            partition: self.partition,
                            offset: a.base_offset + k,
                            stored_ms: self.timestamp,
                        };
                        (key, entry)
                    })
                    .collect();
                self.dedup.settle(&stored);
            }
            Err(e) => {
                let keys: Vec<Key> = self.keys.iter().map(|&(_, key)| key).collect();
                self.dedup.release(&keys, &e.to_string());
            }
        }
    }
}

/// The runtime running this task has another worker thread to go on while this one is held by
/// a sync.
fn other_workers() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|h| h.metrics().num_workers() > 1)
}

/// The partition of a message among `count`: its own choice, its key's, or the request's
/// spread partition.
fn route(topic: &str, m: &NewMessage, count: u32, spread: u32) -> Result<u32> {
    Ok(match (m.partition, &m.key) {
        (Some(p), _) if p >= count => {
            return Err(Error::PartitionNotFound {
                topic: topic.to_string(),
                partition: p,
                count,
            });
        }
        (Some(p), _) => p,
        (None, Some(key)) => topic::key_partition(key, count),
        (None, None) => spread % count,
    })
}
