//! The broker layer's error type. Mapping to gRPC statuses lives in `server::status`.

use crate::replication::write::WriteError;
use crate::storage;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] storage::Error),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("topic {0:?} does not exist (auto-creation is off)")]
    TopicNotFound(String),
    #[error("topic {topic:?} has no partition {partition} (it has {count})")]
    PartitionNotFound {
        topic: String,
        partition: u32,
        count: u32,
    },
    #[error("message {index} is {size} bytes; the limit is {limit}")]
    MessageTooLarge {
        index: usize,
        size: usize,
        limit: usize,
    },
    /// A request over a size or count limit that the client could split.
    #[error("{0}")]
    LimitExceeded(String),
    #[error("topic {0:?} was deleted")]
    TopicDeleted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A read stopped at damage in the log; the text names topic, partition, offsets and file.
    #[error("{0}")]
    Damaged(String),
    /// Refused whoever asks (the audit trail).
    #[error("{0}")]
    Protected(String),
    /// Worth retrying as it is.
    #[error("{0}")]
    Unavailable(String),
    /// Cluster mode: the group that must take the call (`what` names it: `partition "t"/0`,
    /// `the metadata group`) has no leader this node can reach; the leader it knows, if any, as
    /// its node id and cluster address.
    #[error("{}", no_leader_message(what, leader.as_ref()))]
    NoLeader {
        what: String,
        leader: Option<(u64, String)>,
    },
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// Cluster mode: the answer of the node that took the call (a consumer group's leader), as
    /// it gave it.
    #[error("{}", .0.message())]
    Relayed(tonic::Status),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn no_leader_message(what: &str, leader: Option<&(u64, String)>) -> String {
    match leader {
        Some((id, addr)) => format!(
            "{what}: its leader, node {id} (cluster port {addr}, also in the x-sluice-leader \
             trailer), cannot be reached from this node; retry, or send to that node"
        ),
        None => format!(
            "no leader of {what} is known here yet (an election is under way, or this node is \
             cut off); retry"
        ),
    }
}

impl Error {
    /// A proposal to `what` (a partition, the metadata group) that was not acknowledged.
    pub fn not_written(what: &str, e: WriteError) -> Error {
        match e {
            WriteError::NoLeader(leader) => Error::NoLeader {
                what: what.to_string(),
                leader,
            },
            WriteError::TimedOut(d) => Error::Unavailable(format!(
                "{what}: not committed on a majority within {} ms (a leader cut off from its \
                 majority acknowledges nothing); the outcome is unknown",
                d.as_millis()
            )),
            WriteError::Stopped(why) => Error::Unavailable(format!("{what}: {why}")),
        }
    }

    /// Cluster mode: no node holding group `group`'s partition (this node holds none) answered
    /// a call this node made for a client (`why`: the last refusal).
    pub fn no_holder_answered(group: &str, replicas: &[u64], why: &str) -> Error {
        Error::Unavailable(format!(
            "partition {group:?} is held by nodes {replicas:?}, none of which answered: {why}"
        ))
    }

    /// A read error of one partition, with the topic and partition named when it is damage.
    pub fn in_partition(self, topic: &str, partition: u32) -> Error {
        match self {
            Error::Storage(
                e @ (storage::Error::Damaged { .. } | storage::Error::Corrupt { .. }),
            ) => Error::Damaged(format!("topic {topic:?} partition {partition}: {e}")),
            other => other,
        }
    }
}
