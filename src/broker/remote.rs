//! Cluster mode: reading a partition this node holds no replica of, from a node that holds one
//! (the cluster port's `Read`: whole batches as stored, up to that node's commit point). Plain
//! subscriptions and consumer groups read such partitions through it.

use std::sync::Arc;
use std::time::Duration;

use super::error::{Error, Result};
use super::message::Start;
use super::topic::{PartitionHandle, Topic, record_in};
use crate::proto::cluster as pb;
use crate::replication::write::Forwarder;
use crate::storage::record::Decoded;
use crate::storage::{self, Batch, StoredRecord};

/// How long a read at the end of the log waits there for more, on the node holding it.
pub const REMOTE_WAIT: Duration = Duration::from_secs(1);

/// How long a read may take in all before it fails with `UNAVAILABLE` (every node holding the
/// partition down or cut off).
const REMOTE_DEADLINE: Duration = Duration::from_secs(10);

/// Where a reader of partition `handle` of `topic` starting at `start` begins: as this node's
/// copy places it or, for a partition this node holds no replica of (cluster mode: `forwarder`
/// given), as a node holding it does.
pub async fn start_offset(
    topic: &Topic,
    handle: &Arc<PartitionHandle>,
    forwarder: Option<&Arc<Forwarder>>,
    start: Start,
) -> Result<u64> {
    match forwarder.and_then(|f| RemoteLog::of(topic, handle, f)) {
        Some(remote) => remote.start_offset(start).await,
        None => handle.start_offset(start).await,
    }
}

/// A partition read from the nodes holding it.
pub struct RemoteLog {
    forwarder: Arc<Forwarder>,
    /// The nodes holding the partition.
    replicas: Vec<u64>,
    /// The partition's Raft group.
    group: String,
}

/// What one read returned: whole batches from the offset asked for, and the partition's range
/// as the node that answered has it.
pub struct RemoteRead {
    pub batches: Vec<Batch>,
    pub log_start: u64,
    pub high_water: u64,
}

impl RemoteLog {
    /// Partition `handle` of `topic`, when this node holds no replica of it.
    pub fn of(
        topic: &Topic,
        handle: &PartitionHandle,
        forwarder: &Arc<Forwarder>,
    ) -> Option<RemoteLog> {
        let replicas = handle.remote.get()?;
        Some(RemoteLog {
            forwarder: Arc::clone(forwarder),
            replicas,
            group: topic.group_name(handle.id),
        })
    }

    /// Reads about `max_bytes` from `offset` (or from `timestamp_ms`'s offset; neither: only
    /// the range), waiting up to `wait` at the end of the log for more.
    pub async fn read(
        &self,
        offset: Option<u64>,
        timestamp_ms: Option<i64>,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<pb::ReadResponse> {
        let req = pb::ReadRequest {
            group: self.group.clone(),
            offset,
            timestamp_ms,
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        };
        match self
            .forwarder
            .read_remote(&self.replicas, req, wait + REMOTE_DEADLINE)
            .await
        {
            Ok(r) => Ok(r),
            Err(s) if s.code() == tonic::Code::OutOfRange => {
                // Say what the range is, as a local read would.
                let state = Box::pin(self.read(None, None, 0, Duration::ZERO)).await?;
                Err(storage::Error::OffsetOutOfRange {
                    requested: offset.unwrap_or_default(),
                    start: state.log_start,
                    end: state.high_water,
                }
                .into())
            }
            Err(s) => Err(Error::no_holder_answered(
                &self.group,
                &self.replicas,
                s.message(),
            )),
        }
    }

    /// [`RemoteLog::read`] from `offset`, its batches decoded.
    pub async fn batches(
        &self,
        offset: u64,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<RemoteRead> {
        let r = self.read(Some(offset), None, max_bytes, wait).await?;
        let mut batches = Vec::with_capacity(r.batches.len());
        for bytes in &r.batches {
            match Batch::decode(bytes) {
                Decoded::Valid(b) => batches.push(b),
                _ => {
                    return Err(Error::Internal(format!(
                        "partition {:?}: a node sent a batch that does not decode",
                        self.group
                    )));
                }
            }
        }
        Ok(RemoteRead {
            batches,
            log_start: r.log_start,
            high_water: r.high_water,
        })
    }

    /// [`PartitionHandle::read_record`], from a node holding the partition: the record at
    /// `offset` (`None`: none there, compacted away), or `OffsetOutOfRange` with the range.
    pub async fn record(&self, offset: u64) -> Result<Option<StoredRecord>> {
        let read = self.batches(offset, 1, Duration::ZERO).await?;
        if offset >= read.high_water {
            return Err(storage::Error::OffsetOutOfRange {
                requested: offset,
                start: read.log_start,
                end: read.high_water,
            }
            .into());
        }
        record_in(&read.batches, offset)
    }

    /// [`PartitionHandle::start_offset`], from a node holding the partition.
    pub async fn start_offset(&self, start: Start) -> Result<u64> {
        let at = match start {
            Start::Timestamp(ts) => Some(ts),
            _ => None,
        };
        let state = self.read(None, at, 0, Duration::ZERO).await?;
        let (first, end) = (state.log_start, state.high_water);
        match start {
            Start::Earliest => Ok(first),
            Start::Latest => Ok(end),
            Start::Offset(o) if o < first || o > end => Err(storage::Error::OffsetOutOfRange {
                requested: o,
                start: first,
                end,
            }
            .into()),
            Start::Offset(o) => Ok(o),
            Start::Timestamp(_) => Ok(state.from.unwrap_or(end)),
        }
    }
}
