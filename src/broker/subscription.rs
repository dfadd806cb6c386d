//! One partition's reader for one subscription.
//!
//! Reads whole batches from the cursor on the blocking pool, cuts them into deliveries of at most
//! `batch_bytes` of payload, and pushes them into the subscription's bounded channel. A full
//! channel (slow subscriber) parks the task: the broker's memory per subscription stays at the
//! channel's capacity. At the tail it waits for the partition's high-water watch. It ends quietly
//! when the subscriber leaves, and with an error when the topic is deleted or a read fails.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::Error;
use super::{Delivery, DeliveryBatch, PartitionHandle, Topic};

/// Bytes read from the log per read call.
const READ_BYTES: usize = 1 << 20;

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
            let batches = tokio::task::spawn_blocking(move || handle.log.read(from, READ_BYTES))
                .await
                .map_err(|e| Error::Internal(format!("read task failed: {e}")))??;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for batch in &batches {
                for record in batch.records() {
                    let record = record.map_err(|why| {
                        Error::Internal(format!(
                            "undecodable record in a CRC-valid batch at offset {}: {why}",
                            batch.header().base_offset
                        ))
                    })?;
                    if record.offset < self.cursor {
                        continue;
                    }
                    let size = record.value.as_ref().map_or(0, |v| v.len())
                        + record.key.as_ref().map_or(0, |k| k.len());
                    if !out.is_empty() && bytes + size > self.batch_bytes {
                        self.deliver(std::mem::take(&mut out)).await?;
                        bytes = 0;
                    }
                    bytes += size;
                    out.push(Delivery {
                        partition: self.handle.id,
                        record,
                        attempt: 1,
                        ack_id: String::new(),
                    });
                }
                self.cursor = self.cursor.max(batch.header().next_offset());
            }
            if !out.is_empty() {
                self.deliver(out).await?;
            }
        }
    }

    /// Hands deliveries to the subscriber, waiting while its buffer is full.
    async fn deliver(&self, deliveries: Vec<Delivery>) -> Result<(), Error> {
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
