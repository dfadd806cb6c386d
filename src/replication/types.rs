//! The Raft type configuration of a partition's group.
//!
//! Standard Raft's one leader per term (openraft's `single-term-leader`): an entry's id is its
//! term and index, the two numbers a version 2 batch stores.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::record::RaftId;

/// What a leader proposes for a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proposal {
    /// One Send's records, encoded once by the leader as a version 1 batch (the bytes every
    /// replica stores, with the entry's id added); read back from a log or received by a
    /// follower, the entry as stored (version 2, its id in it), shared rather than copied.
    /// Takes as many offsets as it has records.
    Records(Bytes),
    /// A decision about the partition as a whole, stored as a control entry: no offsets.
    Command(GroupCommand),
}

/// A decision a group's leader takes for every replica (stored as a control entry, applied in
/// log order, so identically everywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GroupCommand {
    /// Retention: every message below `offset` goes. `upto` is the last entry holding only
    /// messages below it (term, index): each replica takes its snapshot there and purges the
    /// log up to it; a replica that lacks those entries installs that snapshot and starts its
    /// log at `offset`.
    Trim {
        upto_term: u64,
        upto_index: u64,
        offset: u64,
    },
    /// Key compaction: every replica compacts the messages below `below` (a boundary between
    /// entries, committed when proposed) as of `now_ms`, the leader's clock, so tombstones
    /// expire alike everywhere. What survives depends on the messages below `below` alone.
    Compact { below: u64, now_ms: i64 },
}

/// What applying an entry gives: the offsets its records took (`None` for Raft's own entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Applied {
    pub offsets: Option<(u64, u64)>,
}

openraft::declare_raft_types!(
    /// One partition's Raft group.
    pub PartitionRaft:
        D = Proposal,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<PartitionRaft>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type LogId = openraft::LogId<u64>;
pub type StorageError = openraft::StorageError<u64>;

pub fn raft_id(log_id: &LogId) -> RaftId {
    RaftId {
        term: log_id.leader_id.term,
        index: log_id.index,
    }
}

pub fn log_id(id: RaftId) -> LogId {
    // Under `single-term-leader` the committed leader id is the term alone; the node is unused.
    openraft::LogId::new(openraft::CommittedLeaderId::new(id.term, 0), id.index)
}

/// A retention point of a replicated partition: the last entry holding only messages below
/// `offset`, which is where the group's snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimPoint {
    pub upto: LogId,
    pub offset: u64,
}

/// A compaction point of a replicated partition and the entry that set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactedAt {
    pub at: LogId,
    pub point: crate::storage::CompactionPoint,
}

/// Shared by a group's log store and state machine: the snapshot point the state machine last
/// installed, so that a purge past the end of the log knows the offset the log starts again at.
pub type Installed = tokio::sync::watch::Sender<Option<TrimPoint>>;
