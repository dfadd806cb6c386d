//! An open topic: its partitions, each a storage [`Partition`] with a high-water watch that wakes
//! subscribers and a semaphore that bounds appends in flight; its id index; its description;
//! and what is read from it record by record (one record, the newest records, where a start
//! position lands).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::replication::PartitionRaft;
use crate::storage::{self, DataDir, LogConfig, Partition, StoredRecord, TopicConfig};

use super::blocking::blocking;
use super::clock::now_ms;
use super::dedup::Dedup;
use super::error::{Error, Result};
use super::message::Start;

/// Records of one partition that [`Topic::newest_records`] looks at, at most.
pub const NEWEST_SCAN: u64 = 100_000;
/// Records it reads at a time, walking back from the end.
const NEWEST_WINDOW: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDescription {
    pub partition: u32,
    pub first_offset: u64,
    pub next_offset: u64,
    pub size_bytes: u64,
    pub segments: u32,
    /// Bytes retention would delete but a consumer group still needs, and that group.
    pub held_bytes: u64,
    pub held_by: Option<String>,
    /// Cluster mode: the group's leader as this node knows it, and the replicas' nodes.
    pub leader: Option<u64>,
    pub replicas: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    pub name: String,
    pub config: TopicConfig,
    pub partitions: Vec<PartitionDescription>,
    /// The id index, when the topic has one.
    pub ids: Option<storage::ids::IdStats>,
}

/// One partition of an open topic.
pub struct PartitionHandle {
    pub id: u32,
    pub log: Arc<Partition>,
    /// Wakes subscribers: the partition's writer sends the new high-water mark each time data becomes
    /// visible. It is only a signal; `log.high_water()` is the authority (read it after marking
    /// the watch seen, then wait for a change).
    pub high_water: watch::Receiver<u64>,
    /// Appends in flight: one permit per slot of the writer's inbox (`log.queue_depth`). Every
    /// append to a topic's partition holds one until its completion runs (Sends, dead letters
    /// and the audit trail alike), so the inbox always has room and `Partition::append` never
    /// blocks a tokio worker.
    pub permits: Arc<Semaphore>,
    /// Cluster mode: the partition's Raft group, once this node has joined it. Sends are
    /// proposed to it (the log is written by Raft), and are refused until it is set.
    pub replica: OnceLock<openraft::Raft<PartitionRaft>>,
    /// Cluster mode, a partition this node holds no replica of (or one moving here that is
    /// not a voter yet): the nodes that do. Sends go to its leader among them, reads come from
    /// one of them; the local log stays empty (or catches up).
    pub remote: Holders,
}

/// The nodes holding a partition's replicas, as a node that holds none of them knows them;
/// changes as the catalog moves replicas.
#[derive(Debug, Default)]
pub struct Holders(std::sync::RwLock<Option<Vec<u64>>>);

impl Holders {
    /// The nodes, unless this node holds a replica itself.
    pub fn get(&self) -> Option<Vec<u64>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether this node holds no replica (no copy of the nodes made).
    pub fn is_set(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub fn set(&self, nodes: Option<Vec<u64>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = nodes;
    }
}

#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    pub config: TopicConfig,
    pub partitions: Vec<Arc<PartitionHandle>>,
    /// Partition for the next request without keys (requests are spread round-robin; all keyless
    /// messages of one request go to one partition, so they form one batch).
    next: AtomicU32,
    /// Cancelled when the topic is deleted: its subscriptions end.
    pub deleted: CancellationToken,
    /// The id index of idempotent Send; `None` when `dedup_window_ms` is 0.
    pub dedup: Option<Arc<Dedup>>,
}

/// The log settings of a topic's partitions: the broker's, with the topic's own segment size.
pub fn partition_log_config(config: &TopicConfig, log: &LogConfig) -> LogConfig {
    let mut log = log.clone();
    if let Some(b) = config.segment_bytes {
        log.segment_bytes = b;
    }
    log
}

impl Topic {
    /// The name of partition `partition`'s Raft group on the cluster port (cluster mode).
    pub fn group_name(&self, partition: u32) -> String {
        crate::replication::catalog::group_name(&self.name, partition, self.config.incarnation)
    }

    /// Opens every partition of a topic (blocking: recovery reads files). A `replicated`
    /// topic's partitions are Raft logs (cluster mode).
    pub fn open(
        data: &DataDir,
        name: &str,
        config: TopicConfig,
        log_config: &LogConfig,
        replicated: bool,
    ) -> Result<Topic> {
        let log_config = partition_log_config(&config, log_config);
        let mut partitions = Vec::with_capacity(config.partitions as usize);
        for id in 0..config.partitions {
            let dir = data.partition_dir(name, id)?;
            let (tx, rx) = watch::channel(0u64);
            let listener = Arc::new(move |hwm: u64| {
                tx.send_replace(hwm);
            });
            let log = Partition::open(
                &dir,
                log_config.clone(),
                Arc::clone(data.io()),
                Some(listener),
            )?;
            let permits = log_config.queue_depth;
            partitions.push(Arc::new(PartitionHandle {
                id,
                log: Arc::new(log),
                high_water: rx,
                permits: Arc::new(Semaphore::new(permits)),
                replica: OnceLock::new(),
                remote: Holders::default(),
            }));
        }
        let dedup = if config.dedup_window_ms > 0 {
            let logs: Vec<&Partition> = partitions.iter().map(|p| &*p.log).collect();
            let dir = data.topic_dir(name)?.join("ids");
            let io = Arc::clone(data.io());
            let window = config.dedup_window_ms;
            let memtable = log_config.dedup_memtable_ids;
            Some(Arc::new(Dedup::open(
                &dir,
                &logs,
                window,
                memtable,
                io,
                now_ms(),
                replicated,
            )?))
        } else {
            None
        };
        Ok(Topic {
            name: Arc::from(name),
            config,
            partitions,
            dedup,
            next: AtomicU32::new(0),
            deleted: CancellationToken::new(),
        })
    }

    /// Each partition's high-water mark, in partition order (the ends an id index's memtable
    /// is frozen at).
    pub fn high_waters(&self) -> Vec<u64> {
        self.partitions.iter().map(|p| p.log.high_water()).collect()
    }

    /// Whether the record an id points at is still held: not below the log's start, and (on a
    /// compacted topic) not removed by compaction.
    pub async fn still_holds(&self, e: storage::ids::Entry) -> Result<bool> {
        let Some(handle) = self.partitions.get(e.partition as usize) else {
            return Ok(false);
        };
        if e.offset < handle.log.log_start() {
            return Ok(false);
        }
        if self.config.cleanup_policy == storage::topic::CleanupPolicy::Compact {
            return match handle.read_record(e.offset).await {
                Ok(found) => Ok(found.is_some()),
                Err(Error::Storage(storage::Error::OffsetOutOfRange { .. })) => Ok(false),
                Err(e) => Err(e),
            };
        }
        Ok(true)
    }

    /// Puts every id stored so far into the id index's files (blocking): the logs may then be
    /// cut up to [`Topic::id_watermarks`].
    pub fn persist_ids(&self) -> Result<()> {
        if let Some(d) = &self.dedup {
            let logs: Vec<&Partition> = self.partitions.iter().map(|p| &*p.log).collect();
            d.persist(&logs, now_ms())?;
        }
        Ok(())
    }

    /// Per partition, the offset below which records may be removed without forgetting an id
    /// (`u64::MAX` without an id index).
    pub fn id_watermarks(&self) -> Vec<u64> {
        match &self.dedup {
            Some(d) => d.watermarks(),
            None => vec![u64::MAX; self.partitions.len()],
        }
    }

    /// The newest `limit` records of a topic that `keep` accepts, newest first (over all its
    /// partitions, by offset within each and by timestamp across them). Each partition is read
    /// backwards from its end in windows, and at most [`NEWEST_SCAN`] records of it are looked
    /// at: the cost is bounded however rare the kept records are.
    pub async fn newest_records(
        self: &Arc<Self>,
        limit: usize,
        keep: impl Fn(&StoredRecord) -> bool + Send + 'static,
    ) -> Result<Vec<(u32, StoredRecord)>> {
        let topic = Arc::clone(self);
        blocking(move || {
            let mut out = Vec::new();
            for p in &topic.partitions {
                let start = p.log.log_start();
                let mut end = p.log.high_water();
                let floor = end.saturating_sub(NEWEST_SCAN).max(start);
                let mut kept = 0;
                while end > floor && kept < limit {
                    let from = end.saturating_sub(NEWEST_WINDOW).max(floor);
                    let mut window = Vec::new();
                    let mut next = from;
                    while next < end {
                        let batches = p.log.read(next, 1 << 20)?;
                        if batches.is_empty() {
                            break;
                        }
                        for batch in &batches {
                            for r in batch.records() {
                                let r = r.map_err(|why| {
                                    Error::Internal(format!("undecodable record: {why}"))
                                })?;
                                next = r.offset + 1;
                                // A batch read may start before `from` or end past `end`.
                                if (from..end).contains(&r.offset) && keep(&r) {
                                    window.push(r);
                                }
                            }
                        }
                    }
                    // Newest of this window first, until the partition has `limit`.
                    for r in window.into_iter().rev().take(limit - kept) {
                        kept += 1;
                        out.push((p.id, r));
                    }
                    end = from;
                }
            }
            out.sort_by_key(|(_, r)| std::cmp::Reverse((r.timestamp, r.offset)));
            out.truncate(limit);
            Ok(out)
        })
        .await
    }

    /// A topic's partitions as they stand, with what consumer groups hold back of each
    /// (`held(partition)`: bytes and the group).
    pub fn describe(
        &self,
        held: impl Fn(u32) -> Option<(u64, Option<String>)>,
    ) -> TopicDescription {
        let partitions = self
            .partitions
            .iter()
            .map(|p| {
                let s = p.log.stats();
                let (held_bytes, held_by) = held(p.id).unwrap_or((0, None));
                let (leader, replicas) = match p.replica.get() {
                    Some(raft) => {
                        let m = raft.metrics().borrow().clone();
                        let voters = m.membership_config.membership().voter_ids().collect();
                        (m.current_leader, voters)
                    }
                    None => (None, Vec::new()),
                };
                PartitionDescription {
                    partition: p.id,
                    first_offset: s.log_start,
                    next_offset: s.high_water,
                    size_bytes: s.size_bytes,
                    segments: s.segments as u32,
                    held_bytes,
                    held_by,
                    leader,
                    replicas,
                }
            })
            .collect();
        TopicDescription {
            name: self.name.to_string(),
            config: self.config.clone(),
            partitions,
            ids: self.dedup.as_ref().map(|d| d.stats()),
        }
    }

    /// The partition for the keyless messages of the next request.
    pub fn next_spread_partition(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed) % self.partitions.len() as u32
    }
}

impl std::fmt::Debug for PartitionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionHandle")
            .field("id", &self.id)
            .field("log", &self.log)
            .field("replicated", &self.replica.get().is_some())
            .finish_non_exhaustive()
    }
}

impl PartitionHandle {
    /// The record at `offset`, if the log still holds it ([`read_record`] on the blocking
    /// pool).
    pub async fn read_record(self: &Arc<Self>, offset: u64) -> Result<Option<StoredRecord>> {
        let handle = Arc::clone(self);
        blocking(move || read_record(&handle.log, offset)).await
    }

    /// The first offset a subscription starting at `start` reads.
    pub async fn start_offset(self: &Arc<Self>, start: Start) -> Result<u64> {
        let log = &self.log;
        match start {
            Start::Earliest => Ok(log.log_start()),
            Start::Latest => Ok(log.high_water()),
            Start::Offset(o) => {
                let (first, end) = (log.log_start(), log.high_water());
                if o < first || o > end {
                    return Err(storage::Error::OffsetOutOfRange {
                        requested: o,
                        start: first,
                        end,
                    }
                    .into());
                }
                Ok(o)
            }
            Start::Timestamp(ts) => {
                let h = Arc::clone(self);
                blocking(move || {
                    let found = h.log.offset_for_timestamp(ts)?;
                    Ok(found.unwrap_or_else(|| h.log.high_water()))
                })
                .await
            }
        }
    }
}

/// The record at `offset` of a partition log (a group's event log too): `None` when the log no
/// longer holds it though it holds later ones (compaction). An offset below the log's start or
/// at or past its end is `OffsetOutOfRange`: removed by retention, or not (yet) written here — on
/// a cluster, a replica may not have applied it yet.
pub fn read_record(log: &Partition, offset: u64) -> Result<Option<StoredRecord>> {
    let end = log.high_water();
    if offset >= end {
        return Err(storage::Error::OffsetOutOfRange {
            requested: offset,
            start: log.log_start(),
            end,
        }
        .into());
    }
    record_in(&log.read(offset, 1)?, offset)
}

/// The record at `offset` among `batches` read from it (`None`: none there, compacted away).
pub fn record_in(batches: &[storage::Batch], offset: u64) -> Result<Option<StoredRecord>> {
    for batch in batches {
        for r in batch.records() {
            let r = r.map_err(|why| Error::Internal(format!("undecodable record: {why}")))?;
            if r.offset >= offset {
                return Ok((r.offset == offset).then_some(r));
            }
        }
    }
    Ok(None)
}

/// The partition for a keyed message among `count`: a stable hash of the key (CRC-32), so one
/// key always lands in one partition and keeps its order.
pub fn key_partition(key: &[u8], count: u32) -> u32 {
    crc32fast::hash(key) % count
}
