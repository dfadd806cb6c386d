//! One partition's reader for one subscription.
//!
//! Reads about `batch_bytes` of whole batches from the cursor on the blocking pool and pushes them
//! into the subscription's bounded channel (records are decoded where the response is encoded). A full
//! channel (slow subscriber) parks the task: the broker's memory per subscription stays at the
//! channel's capacity. At the tail it waits for the partition's high-water watch. It ends quietly
//! when the subscriber leaves, and with an error when the topic is deleted or a read fails.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::Error;
use super::{Deliveries, DeliveryBatch, PartitionHandle, Topic};

pub(super) struct Pump {
    pub topic: Arc<Topic>,
    pub handle: Arc<PartitionHandle>,
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

    async fn pump(&mut self) -> Result<(), Error> {
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
            let Some(last) = batches.last() else {
                continue;
            };
            self.cursor = last.header().next_offset();
            let deliveries = Deliveries::Log {
                partition: self.handle.id,
                batches,
                from,
            };
            self.deliver(deliveries).await?;
        }
    }

    /// Hands deliveries to the subscriber, waiting while its buffer is full.
    async fn deliver(&self, deliveries: Deliveries) -> Result<(), Error> {
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
