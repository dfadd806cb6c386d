//! The broker's vocabulary: a message as a producer sends it, where a Send placed it, where a
//! subscription starts, and what a subscriber receives. Every part of the broker and the server
//! speak these types; they hold no state.

use bytes::Bytes;

use super::error::{Error, Result};
use crate::storage::{self, Header, StoredRecord};

/// A message as a producer sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewMessage {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    pub partition: Option<u32>,
    /// The producer's id for idempotent Send (1 to [`MAX_ID_BYTES`](crate::storage::ids::MAX_ID_BYTES) bytes).
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
    pub fn new(partition: u32, offset: u64) -> Placed {
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
