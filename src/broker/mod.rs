//! The async core: open topics, durable sends, subscriptions woken by the writers, topic admin.
//!
//! Knows nothing of gRPC: `server` translates requests into these calls and errors into statuses.
//!
//! - **Send**: messages are routed to partitions (explicit, by key hash, or spread per request),
//!   encoded into one batch per partition on the calling task, and handed to each partition's
//!   writer (the writer pool). The call returns only when every batch is durable. A semaphore
//!   per partition bounds appends in flight: a burst of producers waits its turn, nothing is
//!   dropped.
//! - **Subscribe**: one task per subscribed partition reads whole batches (on the blocking pool)
//!   and pushes them into a bounded channel; when the subscriber is slow the channel fills and
//!   the reads pause. At the tail a task waits on its partition's high-water watch, which the
//!   writer pool signals after each durable append. No polling.

mod ack_poll;
pub mod audit;
pub mod dedup;
pub mod error;
mod group_ops;
pub mod groups;
mod maintenance;
mod send;
mod subscription;
pub mod topic;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::ack_poll::AckPoller;
use self::audit::{AUDIT_TOPIC, AuditEvent, AuditTrail};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::storage::{
    self, DataDir, FileIo, Header, RealIo, StoredRecord, TopicConfig, validate_topic_name,
};

pub use error::{Error, Result};
pub use maintenance::PartitionMaintenance;
pub use topic::{PartitionHandle, Topic};

/// A message as a producer sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewMessage {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    pub partition: Option<u32>,
    /// The producer's id for idempotent Send (1 to [`MAX_ID_BYTES`] bytes).
    pub id: Option<Bytes>,
}

/// Where a Send put one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub partition: u32,
    pub offset: u64,
    /// The id was stored before: nothing new was stored; the position is the original's.
    pub duplicate: bool,
    /// With `duplicate`: the original record is no longer held.
    pub removed: bool,
}

impl Placed {
    fn new(partition: u32, offset: u64) -> Placed {
        Placed {
            partition,
            offset,
            duplicate: false,
            removed: false,
        }
    }
}

impl NewMessage {
    /// Bytes this message counts against `max_message_bytes`.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.len())
                .sum::<usize>()
    }
}

/// Where a subscription starts, in each of its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Earliest,
    Latest,
    Offset(u64),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
}

/// A message handed to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub partition: u32,
    pub record: StoredRecord,
    /// From 1; always 1 outside consumer groups.
    pub attempt: u32,
    /// Empty outside consumer groups.
    pub ack_id: String,
}

/// A run of messages of one partition, as a subscription hands them over.
///
/// Plain subscriptions pass whole batches from the log and the records are decoded where the
/// response is encoded, so that the per-record buffer references are taken and released on one
/// thread.
#[derive(Debug, Clone)]
pub enum Deliveries {
    /// Whole batches read from the log; only records at or after `from` are delivered.
    Log {
        partition: u32,
        batches: Vec<storage::Batch>,
        from: u64,
    },
    /// Deliveries chosen one by one (consumer groups).
    Records(Vec<Delivery>),
}

impl Deliveries {
    /// The deliveries, decoded.
    pub fn into_deliveries(self) -> Result<Vec<Delivery>> {
        let (partition, batches, from) = match self {
            Deliveries::Records(d) => return Ok(d),
            Deliveries::Log {
                partition,
                batches,
                from,
            } => (partition, batches, from),
        };
        let mut out = Vec::new();
        for b in &batches {
            for r in b.records() {
                let record = r.map_err(|why| {
                    Error::Internal(format!(
                        "undecodable record in a CRC-valid batch at offset {}: {why}",
                        b.header().base_offset
                    ))
                })?;
                if record.offset >= from {
                    out.push(Delivery {
                        partition,
                        record,
                        attempt: 1,
                        ack_id: String::new(),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// What a subscription stream yields: messages, or the error that ended it.
pub type DeliveryBatch = Result<Deliveries>;

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    pub name: String,
    pub config: TopicConfig,
    pub partitions: Vec<PartitionDescription>,
    /// The id index, when the topic has one.
    pub ids: Option<storage::ids::IdStats>,
}

/// A consumer group's slot: empty while it is being opened.
type GroupCell = Arc<tokio::sync::OnceCell<Arc<groups::GroupTopic>>>;

/// The broker: every open topic of one data directory.
#[derive(Debug)]
pub struct Broker {
    config: Config,
    data: Arc<DataDir>,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises topic creation and deletion.
    admin: tokio::sync::Mutex<()>,
    /// Consumer groups, by (group, topic): each opens once, in its own cell, so that opening or
    /// replaying one group never holds up another (the map's lock is never held across an
    /// `.await`).
    groups: std::sync::Mutex<HashMap<(String, String), GroupCell>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Lets a lone producer's Send poll for its acknowledgement (see [`ack_poll`]).
    acks: AckPoller,
    /// Broker-wide counters for `/metrics`.
    metrics: Arc<Metrics>,
    /// The `_audit` topic's appender.
    audit: AuditTrail,
    /// Opened by [`Broker::open_read_only`]: nothing is recorded or written.
    read_only: bool,
    me: std::sync::Weak<Broker>,
}

/// Records of one partition that [`Broker::newest_records`] looks at, at most.
pub const NEWEST_SCAN: u64 = 100_000;
/// Records it reads at a time, walking back from the end.
const NEWEST_WINDOW: u64 = 1024;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

impl Broker {
    /// Takes the data directory's lock and opens (recovering) every topic.
    pub async fn open(config: Config) -> Result<Arc<Broker>> {
        Self::open_with_io(config, Arc::new(RealIo)).await
    }

    /// [`Broker::open`] with every durable write and sync going through `io` (fault injection).
    pub async fn open_with_io(config: Config, io: Arc<dyn FileIo>) -> Result<Arc<Broker>> {
        Self::open_inner(config, io, false).await
    }

    /// Opens an existing data directory to read it and change nothing (a dry run): no directory
    /// or file is created, nothing is recorded in the audit trail, and a partition that would
    /// need recovery (the broker did not stop cleanly) fails to open instead of being repaired.
    pub async fn open_read_only(config: Config) -> Result<Arc<Broker>> {
        Self::open_inner(config, Arc::new(crate::storage::ReadOnlyIo), true).await
    }

    async fn open_inner(
        config: Config,
        io: Arc<dyn FileIo>,
        read_only: bool,
    ) -> Result<Arc<Broker>> {
        config
            .sanitize()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let (data, topics) = {
            let config = config.clone();
            blocking(move || {
                let data = if read_only {
                    DataDir::open_read_only(&config.data_dir, io)?
                } else {
                    DataDir::open(&config.data_dir, io)?
                };
                let mut topics = HashMap::new();
                for name in data.list_topics()? {
                    let mut topic_config = data.topic_config(&name)?;
                    if name == AUDIT_TOPIC {
                        topic_config = audit_topic_config(&config);
                    }
                    let topic = Topic::open(&data, &name, topic_config, &config.log)?;
                    topics.insert(name, Arc::new(topic));
                }
                if !topics.contains_key(AUDIT_TOPIC) {
                    let c = audit_topic_config(&config);
                    data.create_topic(AUDIT_TOPIC, &c)?;
                    let topic = Topic::open(&data, AUDIT_TOPIC, c, &config.log)?;
                    topics.insert(AUDIT_TOPIC.to_string(), Arc::new(topic));
                }
                Ok((data, topics))
            })
            .await?
        };
        let audit = match topics.get(AUDIT_TOPIC).and_then(|t| t.partitions.first()) {
            Some(p) => AuditTrail::open(Arc::clone(p))?,
            None => return Err(Error::Internal("the audit topic has no partition".into())),
        };
        let topic_count = topics.len() as u64 - 1;
        tracing::info!(data_dir = %config.data_dir.display(), topics = topic_count, "broker open");
        let retention_every = Duration::from_millis(config.retention_check_ms);
        let acks = AckPoller::new(Duration::from_micros(config.send_spin_us));
        let broker = Arc::new_cyclic(|me| Broker {
            config,
            data: Arc::new(data),
            topics: RwLock::new(topics),
            admin: tokio::sync::Mutex::new(()),
            groups: std::sync::Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            acks,
            metrics: Arc::new(Metrics::default()),
            audit,
            read_only,
            me: me.clone(),
        });
        if !read_only {
            broker
                .audit
                .record(AuditEvent::system("broker/start", "ok").count("topics", topic_count))
                .await?;
        }
        if !retention_every.is_zero() {
            broker.start_retention(retention_every);
        }
        Ok(broker)
    }

    /// The audit trail (`_audit`).
    pub fn audit(&self) -> &AuditTrail {
        &self.audit
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Cancelled when the broker shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), GroupCell>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// An open topic, or `TopicNotFound`. The name is checked first.
    pub fn existing_topic(&self, name: &str) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        self.topic(name)
            .ok_or_else(|| Error::Storage(storage::Error::TopicNotFound(name.to_string())))
    }

    /// An open topic, created with the default settings when missing if `create` says who
    /// asks (the creation goes into the audit trail).
    pub async fn topic_or_create(
        &self,
        name: &str,
        create: Option<AuditEvent>,
    ) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        if let Some(t) = self.topic(name) {
            return Ok(t);
        }
        let Some(event) = create else {
            return Err(Error::TopicNotFound(name.to_string()));
        };
        self.create_if_missing(name, event).await?;
        self.existing_topic(name)
    }

    /// Creates a topic with the default settings unless it exists, recording the creation as
    /// `event` (its outcome and settings filled in); true if this call created it.
    pub async fn create_if_missing(&self, name: &str, event: AuditEvent) -> Result<bool> {
        validate_topic_name(name)?;
        if self.topic(name).is_some() {
            return Ok(false);
        }
        let config = TopicConfig {
            partitions: self.config.default_partitions,
            ..TopicConfig::default()
        };
        match self.create_topic(name, config).await {
            Ok(()) => {
                let event = AuditEvent {
                    resource: format!("topic {name:?}"),
                    outcome: "ok: topic created on first use".into(),
                    after: self.topic_settings_json(name),
                    ..event
                };
                self.audit.record(event).await?;
                Ok(true)
            }
            Err(Error::Storage(storage::Error::TopicExists(_))) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A topic's settings as JSON (for audit records), if it exists.
    pub fn topic_settings_json(&self, name: &str) -> Option<serde_json::Value> {
        self.topic(name)
            .and_then(|t| serde_json::to_value(&t.config).ok())
    }

    /// Starts a subscription; errors in its arguments (unknown topic or partition, offset out of
    /// range) come back here, before any delivery.
    pub async fn subscribe(
        &self,
        topic: &str,
        partitions: Vec<u32>,
        start: Start,
    ) -> Result<mpsc::Receiver<DeliveryBatch>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let topic = self.existing_topic(topic)?;
        let count = topic.partitions.len() as u32;
        let mut chosen: Vec<u32> = if partitions.is_empty() {
            (0..count).collect()
        } else {
            partitions
        };
        chosen.sort_unstable();
        chosen.dedup();
        let mut starts = Vec::with_capacity(chosen.len());
        for p in chosen {
            let handle =
                topic
                    .partitions
                    .get(p as usize)
                    .ok_or_else(|| Error::PartitionNotFound {
                        topic: topic.name.to_string(),
                        partition: p,
                        count,
                    })?;
            let offset = resolve_start(handle, start).await?;
            starts.push((Arc::clone(handle), offset));
        }
        let (tx, rx) = mpsc::channel(self.config.subscriber_buffer);
        for (handle, offset) in starts {
            let pump = subscription::Pump {
                topic: Arc::clone(&topic),
                handle,
                cursor: offset,
                tx: tx.clone(),
                stop: self.shutdown.child_token(),
                batch_bytes: self.config.delivery_batch_bytes,
            };
            self.tasks.spawn(pump.run());
        }
        Ok(rx)
    }

    /// Creates a topic with its partitions and opens it.
    pub async fn create_topic(&self, name: &str, mut config: TopicConfig) -> Result<()> {
        validate_topic_name(name)?;
        if config.partitions == 0 {
            config.partitions = self.config.default_partitions;
        }
        config.sanitize()?;
        let _admin = self.admin.lock().await;
        if self.topic(name).is_some() {
            return Err(storage::Error::TopicExists(name.to_string()).into());
        }
        let data = Arc::clone(&self.data);
        let log = self.config.log.clone();
        let owned = name.to_string();
        let topic = blocking(move || {
            data.create_topic(&owned, &config)?;
            Topic::open(&data, &owned, config, &log)
        })
        .await?;
        self.topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::new(topic));
        tracing::info!(topic = name, "topic created");
        Ok(())
    }

    /// Deletes a topic: its subscriptions end, its partitions close, its files go.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        validate_topic_name(name)?;
        refuse_audit_topic(name, "deleted")?;
        let _admin = self.admin.lock().await;
        let topic = self
            .topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .ok_or_else(|| storage::Error::TopicNotFound(name.to_string()))?;
        topic.deleted.cancel();
        let doomed: Vec<_> = {
            let mut groups = self.groups();
            let keys: Vec<_> = groups.keys().filter(|(_, t)| t == name).cloned().collect();
            keys.into_iter()
                .filter_map(|k| groups.remove(&k))
                .filter_map(|cell| cell.get().cloned())
                .collect()
        };
        let data = Arc::clone(&self.data);
        let owned = name.to_string();
        blocking(move || {
            for g in &doomed {
                g.close();
            }
            for (group, topics) in data.list_groups()? {
                if topics.iter().any(|t| t == &owned) {
                    data.delete_group_state(&group, Some(&owned))?;
                }
            }
            for p in &topic.partitions {
                // A latched partition cannot close cleanly; its files are going anyway.
                let _ = p.log.close();
            }
            data.delete_topic(&owned)?;
            Ok(())
        })
        .await?;
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }

    /// Every open topic but `_audit`, sorted by name.
    pub fn open_topics(&self) -> Vec<Arc<Topic>> {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<_> = topics
            .iter()
            .filter(|(n, _)| n.as_str() != AUDIT_TOPIC)
            .map(|(_, t)| Arc::clone(t))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// The newest `limit` records of a topic that `keep` accepts, newest first (over all its
    /// partitions, by offset within each and by timestamp across them). Each partition is read
    /// backwards from its end in windows, and at most [`NEWEST_SCAN`] records of it are looked
    /// at: the cost is bounded however rare the kept records are.
    pub async fn newest_records(
        &self,
        name: &str,
        limit: usize,
        keep: impl Fn(&StoredRecord) -> bool + Send + 'static,
    ) -> Result<Vec<(u32, StoredRecord)>> {
        let topic = self.existing_topic(name)?;
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

    /// Every topic with its settings, sorted by name; the internal `_audit` is not listed.
    pub fn list_topics(&self) -> Vec<(String, TopicConfig)> {
        self.open_topics()
            .iter()
            .map(|t| (t.name.to_string(), t.config.clone()))
            .collect()
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let topic = self.existing_topic(name)?;
        let held = self.maintain(Some(name), true).await?;
        let partitions = topic
            .partitions
            .iter()
            .map(|p| {
                let s = p.log.stats();
                let hold = held.iter().find(|h| h.partition == p.id);
                PartitionDescription {
                    partition: p.id,
                    first_offset: s.log_start,
                    next_offset: s.high_water,
                    size_bytes: s.size_bytes,
                    segments: s.segments as u32,
                    held_bytes: hold.map_or(0, |h| h.outcome.held_bytes),
                    held_by: hold.and_then(|h| h.held_by.clone()),
                }
            })
            .collect();
        Ok(TopicDescription {
            name: name.to_string(),
            config: topic.config.clone(),
            partitions,
            ids: topic.dedup.as_ref().map(|d| d.stats()),
        })
    }

    /// Stops subscriptions, waits for their tasks, then closes every partition cleanly (final
    /// sync, trimmed indexes, clean marker). In-flight sends have finished when the server
    /// stopped serving them.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let groups: Vec<_> = self
            .groups()
            .drain()
            .filter_map(|(_, cell)| cell.get().cloned())
            .collect();
        for g in &groups {
            g.stop.cancel();
        }
        self.tasks.close();
        self.tasks.wait().await;
        // A read-only broker records nothing: nothing may be written.
        if !self.read_only
            && let Err(e) = self
                .audit
                .record(AuditEvent::system("broker/stop", "ok"))
                .await
        {
            tracing::error!(error = %e, "cannot record the clean stop in the audit trail");
        }
        let topics: Vec<Arc<Topic>> = self
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let closed = blocking(move || {
            side_by_side(&groups, |g| g.close());
            side_by_side(&topics, |t| {
                if let Err(e) = t.persist_ids() {
                    tracing::error!(topic = %t.name, error = %e, "the id index was not written; the next start rebuilds it from the log");
                }
            });
            let parts: Vec<_> = topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(move |p| (t, p)))
                .collect();
            side_by_side(&parts, |(t, p)| {
                if let Err(e) = p.log.close() {
                    tracing::error!(topic = %t.name, partition = p.id, error = %e, "partition did not close cleanly");
                }
            });
            Ok(())
        })
        .await;
        if let Err(e) = closed {
            tracing::error!(error = %e, "closing the logs failed");
        }
        tracing::info!("broker closed");
    }
}

/// `_audit` is written by the broker alone and shortened only by `auth.audit_retention_ms`.
fn refuse_audit_topic(name: &str, what: &str) -> Result<()> {
    if name == AUDIT_TOPIC {
        return Err(Error::Protected(format!(
            "{AUDIT_TOPIC} is the audit trail: it cannot be {what} through the API"
        )));
    }
    Ok(())
}

/// The settings of `_audit`: one partition, retention from the configuration only.
fn audit_topic_config(config: &Config) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        retention_ms: (config.auth.audit_retention_ms > 0)
            .then_some(config.auth.audit_retention_ms),
        retention_bytes: None,
        retain_until_consumed: false,
        dedup_window_ms: 0,
        ..TopicConfig::default()
    }
}

/// Threads that close logs at shutdown: a close mostly waits on syncs, so many run at once.
const CLOSING_THREADS: usize = 16;

/// Runs `f` on every item, on up to [`CLOSING_THREADS`] threads (blocking).
fn side_by_side<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        while let Some(item) = items.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
            f(item);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..CLOSING_THREADS.min(items.len()) {
            s.spawn(work);
        }
        work();
    });
}

/// The first offset a subscription reads in a partition.
pub(crate) async fn resolve_start(handle: &Arc<PartitionHandle>, start: Start) -> Result<u64> {
    let log = &handle.log;
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
            let h = Arc::clone(handle);
            blocking(move || {
                let found = h.log.offset_for_timestamp(ts)?;
                Ok(found.unwrap_or_else(|| h.log.high_water()))
            })
            .await
        }
    }
}
