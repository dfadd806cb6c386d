//! The broker layer's error type. Mapping to gRPC statuses lives in `server::status`.

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
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
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
