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
    #[error("topic {0:?} was deleted")]
    TopicDeleted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
