//! An open topic: its partitions, each a storage [`Partition`] with a high-water watch that wakes
//! subscribers and a semaphore that bounds appends in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::storage::{DataDir, LogConfig, Partition, TopicConfig};

use super::dedup::Dedup;
use super::error::Result;
use super::now_ms;

/// One partition of an open topic.
#[derive(Debug)]
pub struct PartitionHandle {
    pub id: u32,
    pub log: Partition,
    /// Wakes subscribers: the partition's writer sends the new high-water mark each time data becomes
    /// visible. It is only a signal; `log.high_water()` is the authority (read it after marking
    /// the watch seen, then wait for a change).
    pub high_water: watch::Receiver<u64>,
    /// Appends in flight; bounded below the writer's queue so `append` never blocks a worker.
    pub permits: Arc<Semaphore>,
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

impl Topic {
    /// Opens every partition of a topic (blocking: recovery reads files).
    pub fn open(
        data: &DataDir,
        name: &str,
        config: TopicConfig,
        log_config: &LogConfig,
    ) -> Result<Topic> {
        let mut log_config = log_config.clone();
        if let Some(b) = config.segment_bytes {
            log_config.segment_bytes = b;
        }
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
            let permits = log_config.queue_depth.saturating_sub(16).max(1);
            partitions.push(Arc::new(PartitionHandle {
                id,
                log,
                high_water: rx,
                permits: Arc::new(Semaphore::new(permits)),
            }));
        }
        let dedup = if config.dedup_window_ms > 0 {
            let logs: Vec<&Partition> = partitions.iter().map(|p| &p.log).collect();
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

    /// Puts every id stored so far into the id index's files (blocking): the logs may then be
    /// cut up to [`Topic::id_watermarks`].
    pub fn persist_ids(&self) -> Result<()> {
        if let Some(d) = &self.dedup {
            let logs: Vec<&Partition> = self.partitions.iter().map(|p| &p.log).collect();
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

    /// The partition for the keyless messages of the next request.
    pub fn next_spread_partition(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed) % self.partitions.len() as u32
    }
}

/// The partition for a keyed message among `count`: a stable hash of the key (CRC-32), so one
/// key always lands in one partition and keeps its order.
pub fn key_partition(key: &[u8], count: u32) -> u32 {
    crc32fast::hash(key) % count
}
