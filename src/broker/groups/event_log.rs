//! Where a group's events go. On a single node, a partition log of the group's own under
//! `data/groups/<group>/<topic>/`, appended by the log's writer and synced by group commit. On a
//! cluster, the same log is the Raft log of the group's own Raft group: events are proposed by
//! the group's leader (the only node that runs the group's dispatcher) and count once committed
//! on a majority ([`ReplicatedEvents`], provided by the broker's cluster layer).
//!
//! The difference the rest of the group sees: on a cluster an attempt counts when it is
//! assigned, and the assignment reaches the member only once committed (see
//! [`EventLog::counts_at_assignment`]); a failed proposal ends the group here (another node
//! leads it now, or will).

use std::sync::Arc;

use crate::broker::error::{Error, Result};
use crate::storage::{self, AppendMode, EncodedBatch, Partition, Record};
use bytes::Bytes;

use super::events::Event;

/// Told, in the order the events were given, where they went (the base offset of their
/// batch) or why they did not.
pub type Then = Box<dyn FnOnce(Result<u64>) + Send>;

/// A group's events proposed through its Raft group, in the order given (so the log holds
/// them in that order); each `then` runs once its entry is committed and applied here, or
/// failed, in that order too.
pub trait ReplicatedEvents: Send + Sync + std::fmt::Debug {
    fn append(&self, batch: Bytes, then: Then);

    /// Every replica drops the events below `offset`, where a snapshot of the whole state
    /// starts (a best effort: the log is only shorter to replay).
    fn drop_below(&self, offset: u64);
}

/// A group's event log (see the module's documentation).
#[derive(Debug)]
pub enum EventLog {
    Local(Partition),
    Replicated {
        /// The group's Raft log as the partition it is: what replay reads, up to what is
        /// committed.
        log: Arc<Partition>,
        events: Arc<dyn ReplicatedEvents>,
    },
}

impl EventLog {
    /// The log to replay.
    pub(super) fn partition(&self) -> &Partition {
        match self {
            EventLog::Local(p) => p,
            EventLog::Replicated { log, .. } => log,
        }
    }

    /// On a cluster an attempt counts when it is assigned, recorded in the `Delivered` event,
    /// and the delivery waits for that event to be committed before it goes to the member: a
    /// leader that dies after a member received an attempt cannot leave it uncounted. (On one
    /// node an attempt counts when the member's stream hands it to the transport, recorded in
    /// a `Handed` event synced with the next durable append.)
    pub(super) fn counts_at_assignment(&self) -> bool {
        self.is_replicated()
    }

    /// Whether the group runs on a cluster: its leader reads the topic from its own replicas,
    /// which may not have applied every record the group has delivered yet (after a failover
    /// or a restart), so a record past their end is not there *yet*, not gone.
    pub(super) fn is_replicated(&self) -> bool {
        matches!(self, EventLog::Replicated { .. })
    }

    /// Appends `events` (`durable`: synced before `then` on one node; on a cluster every event
    /// is committed before `then`).
    pub(super) fn append(&self, events: &[Event], durable: bool, then: Then) -> u64 {
        let records: Vec<Record> = events
            .iter()
            .map(|e| Record {
                value: Some(Bytes::from(e.encode())),
                ..Record::default()
            })
            .collect();
        let batch = EncodedBatch::new(&records);
        let bytes = batch.len() as u64;
        match self {
            EventLog::Local(log) => {
                let done: storage::Completion =
                    Box::new(move |r: storage::Result<storage::Appended>| {
                        then(r.map(|a| a.base_offset).map_err(Error::from));
                    });
                // Never waits on a tokio worker: the group's events are bounded by its in-flight
                // limits.
                log.append(
                    batch,
                    AppendMode {
                        durable,
                        wait_for_room: false,
                    },
                    done,
                );
            }
            EventLog::Replicated { events, .. } => events.append(batch.into_bytes(), then),
        }
        bytes
    }

    /// Drops the events below `offset` (a snapshot starts there).
    pub(super) fn drop_below(&self, offset: u64) -> Result<()> {
        match self {
            EventLog::Local(log) => {
                log.delete_segments_below(offset)?;
            }
            EventLog::Replicated { events, .. } => events.drop_below(offset),
        }
        Ok(())
    }

    /// Closes a local log (blocking); a replicated one belongs to its Raft group.
    pub(super) fn close(&self) -> Result<()> {
        match self {
            EventLog::Local(log) => Ok(log.close()?),
            EventLog::Replicated { .. } => Ok(()),
        }
    }
}
