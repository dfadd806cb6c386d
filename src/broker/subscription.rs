//! Plain subscriptions (from an offset, outside consumer groups): resolving where each chosen
//! partition starts, then one reader task per partition.
//!
//! A reader reads about `batch_bytes` of whole batches from the cursor on the blocking pool and pushes them
//! into the subscription's bounded channel (records are decoded where the response is encoded). A full
//! channel (slow subscriber) parks the task: the broker's memory per subscription stays at the
//! channel's capacity. At the tail it waits for the partition's high-water watch. It ends quietly
//! when the subscriber leaves, and with an error when the topic is deleted or a read fails.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use tokio_util::task::TaskTracker;

use super::error::{Error, Result};
use super::message::{Deliveries, DeliveryBatch, Start};
use super::remote::{REMOTE_WAIT, RemoteLog};
use super::topic::{PartitionHandle, Topic};
use crate::replication::write::Forwarder;
use crate::storage::Batch;

/// How subscriptions buffer and read.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionSettings {
    /// Responses buffered per subscription before its readers pause.
    pub buffer: usize,
    /// Log bytes read per response.
    pub batch_bytes: usize,
}

/// Starts a subscription to `partitions` of `topic` (all when empty) at `start`; errors in its
/// arguments (unknown partition, offset out of range) come back here, before any delivery. Its
/// readers run on `tasks` and end with `stop`. In cluster mode, a partition this node holds no
/// replica of is read from a node that holds one, through `remote`.
pub async fn subscribe(
    topic: Arc<Topic>,
    partitions: Vec<u32>,
    start: Start,
    settings: SubscriptionSettings,
    tasks: &TaskTracker,
    stop: &CancellationToken,
    remote: Option<&Arc<Forwarder>>,
) -> Result<mpsc::Receiver<DeliveryBatch>> {
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
        let handle = topic
            .partitions
            .get(p as usize)
            .ok_or_else(|| Error::PartitionNotFound {
                topic: topic.name.to_string(),
                partition: p,
                count,
            })?;
        let source = match remote.and_then(|f| RemoteLog::of(&topic, handle, f)) {
            Some(log) => Source::Remote(Arc::new(log)),
            None => Source::Local,
        };
        let offset = match &source {
            Source::Local => handle.start_offset(start).await?,
            Source::Remote(r) => r.start_offset(start).await?,
        };
        starts.push((Arc::clone(handle), offset, source));
    }
    let (tx, rx) = mpsc::channel(settings.buffer);
    for (handle, offset, source) in starts {
        let pump = Pump {
            topic: Arc::clone(&topic),
            handle,
            source,
            cursor: offset,
            tx: tx.clone(),
            stop: stop.child_token(),
            batch_bytes: settings.batch_bytes,
        };
        tasks.spawn(pump.run());
    }
    Ok(rx)
}

/// Where a partition's records come from.
enum Source {
    /// This node's log.
    Local,
    /// A node holding a replica (this node holds none).
    Remote(Arc<RemoteLog>),
}

struct Pump {
    pub topic: Arc<Topic>,
    pub handle: Arc<PartitionHandle>,
    source: Source,
    pub cursor: u64,
    pub tx: mpsc::Sender<DeliveryBatch>,
    pub stop: CancellationToken,
    pub batch_bytes: usize,
}

impl Pump {
    pub async fn run(mut self) {
        if let Err(e) = self.pump().await {
            // The subscriber may be gone already; then there is no one to tell.
            let _ = self.tx.send(Err(e)).await;
        }
    }

    async fn pump(&mut self) -> Result<()> {
        if let Source::Remote(remote) = &self.source {
            let remote = Arc::clone(remote);
            return self.pump_remote(&remote).await;
        }
        let mut watch = self.handle.high_water.clone();
        loop {
            watch.borrow_and_update();
            let end = self.handle.log.high_water();
            if self.cursor >= end {
                tokio::select! {
                    changed = watch.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                    }
                    () = self.tx.closed() => return Ok(()),
                    () = self.stop.cancelled() => return Ok(()),
                    () = self.topic.deleted.cancelled() => {
                        return Err(Error::TopicDeleted(self.topic.name.to_string()));
                    }
                }
                continue;
            }
            let handle = Arc::clone(&self.handle);
            let from = self.cursor;
            let budget = self.batch_bytes;
            let batches = tokio::task::spawn_blocking(move || handle.log.read(from, budget))
                .await
                .map_err(|e| Error::Internal(format!("read task failed: {e}")))?
                .map_err(|e| Error::from(e).in_partition(&self.topic.name, self.handle.id))?;
            self.deliver_read(batches).await?;
        }
    }

    /// [`Pump::pump`] from a node holding the partition: each read waits there at the end of
    /// the log for more.
    async fn pump_remote(&mut self, remote: &RemoteLog) -> Result<()> {
        loop {
            let read = remote.batches(self.cursor, self.batch_bytes, REMOTE_WAIT);
            let r = tokio::select! {
                r = read => r?,
                () = self.tx.closed() => return Ok(()),
                () = self.stop.cancelled() => return Ok(()),
                () = self.topic.deleted.cancelled() => {
                    return Err(Error::TopicDeleted(self.topic.name.to_string()));
                }
            };
            self.deliver_read(r.batches).await?;
        }
    }

    /// Hands batches read at the cursor to the subscriber (none: nothing to do) and moves the
    /// cursor past them.
    async fn deliver_read(&mut self, batches: Vec<Batch>) -> Result<()> {
        let Some(last) = batches.last() else {
            return Ok(());
        };
        let from = self.cursor;
        self.cursor = last.header().next_offset();
        let deliveries = Deliveries::Log {
            partition: self.handle.id,
            batches,
            from,
        };
        self.deliver(deliveries).await
    }

    /// Hands deliveries to the subscriber, waiting while its buffer is full.
    async fn deliver(&self, deliveries: Deliveries) -> Result<()> {
        tokio::select! {
            sent = self.tx.send(Ok(deliveries)) => {
                // A closed channel: the subscriber left; stop quietly.
                sent.map_err(|_| Error::ShuttingDown)
            }
            () = self.stop.cancelled() => Err(Error::ShuttingDown),
            () = self.topic.deleted.cancelled() => {
                Err(Error::TopicDeleted(self.topic.name.to_string()))
            }
        }
    }
}
