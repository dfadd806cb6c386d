//! Reads of a partition's committed log for a node that holds no replica of it (a topic whose
//! replication factor is below the number of nodes): the serving side of the cluster port's
//! `Read`, on a node that holds one. What it returns is what a subscriber of this node would
//! read: whole batches as stored, up to this node's commit point.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use crate::proto::cluster as pb;
use crate::storage::{self, Partition};

/// Longest a `Read` at the end of the log waits for more.
pub const MAX_READ_WAIT: Duration = Duration::from_secs(5);

/// Most bytes one `Read` returns (whole batches; at least one).
pub const MAX_READ_BYTES: usize = 4 << 20;

/// A partition's log as this node serves reads of it.
#[derive(Debug, Clone)]
pub struct GroupLog {
    pub log: Arc<Partition>,
    /// Changes when more becomes readable (see `PartitionHandle::high_water`).
    pub high_water: watch::Receiver<u64>,
}

impl GroupLog {
    /// Answers `req` from this log; `leader`: the group's leader as this node knows it.
    pub async fn read(
        &self,
        req: &pb::ReadRequest,
        leader: Option<u64>,
    ) -> Result<pb::ReadResponse, Status> {
        let log = Arc::clone(&self.log);
        let from = match (req.offset, req.timestamp_ms) {
            (Some(o), _) => Some(o),
            (None, Some(ts)) => Some(
                blocking(move || {
                    let found = log.offset_for_timestamp(ts)?;
                    Ok(found.unwrap_or_else(|| log.high_water()))
                })
                .await?,
            ),
            (None, None) => None,
        };
        let mut batches = Vec::new();
        if let Some(from) = from
            && req.max_bytes > 0
        {
            self.until_past(from, Duration::from_millis(u64::from(req.wait_ms)))
                .await;
            if from < self.log.high_water() {
                let (log, budget) = (Arc::clone(&self.log), req.max_bytes as usize);
                let read = blocking(move || log.read(from, budget.min(MAX_READ_BYTES))).await?;
                batches = read.into_iter().map(|b| b.bytes().clone()).collect();
            }
        }
        let stats = self.log.stats();
        Ok(pb::ReadResponse {
            from,
            batches,
            log_start: stats.log_start,
            high_water: stats.high_water,
            size_bytes: stats.size_bytes,
            segments: stats.segments as u32,
            leader,
        })
    }

    /// Waits until the log holds offset `from`, at most `wait` (and [`MAX_READ_WAIT`]).
    async fn until_past(&self, from: u64, wait: Duration) {
        let mut watch = self.high_water.clone();
        let past = async {
            loop {
                watch.borrow_and_update();
                if from < self.log.high_water() || watch.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(wait.min(MAX_READ_WAIT), past).await;
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> storage::Result<T> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e @ storage::Error::OffsetOutOfRange { .. })) => {
            Err(Status::out_of_range(e.to_string()))
        }
        Ok(Err(e)) => Err(Status::internal(e.to_string())),
        Err(e) => Err(Status::internal(format!("a read task failed: {e}"))),
    }
}
