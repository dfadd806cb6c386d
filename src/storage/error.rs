//! The storage layer's one error type.
//!
//! Corruption is kept distinct from I/O so callers can tell "the disk said no" from "the bytes
//! on disk are wrong", and the source error is always kept.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can go wrong in `storage`.
/// Cloneable so that one failed write or sync can fail every append it carried; the source
/// `io::Error` is shared, never rebuilt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A file operation failed; `source.kind()` tells e.g. `StorageFull` apart.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// An `fdatasync` failed. The partition is latched read-only until reopened: the kernel may
    /// have dropped the dirty pages, so retrying the sync could report success for lost data.
    #[error("fsync of {} failed ({source}); the partition refuses writes until reopened", path.display())]
    SyncFailed {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// A write was refused because an earlier fsync failed on this partition.
    #[error("partition {} refuses writes after a failed fsync; reopen it", path.display())]
    Poisoned { path: PathBuf },
    /// Bytes on disk do not check out (CRC, framing, magic, offsets).
    #[error("corrupt data in {} at byte {position}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    /// A read met damage: the records from `from` up to (not including) `to` cannot be read.
    #[error("records {from} to {} cannot be read: corrupt data in {} at byte {position}: {reason}", to.saturating_sub(1), path.display())]
    Damaged {
        path: PathBuf,
        position: u64,
        reason: String,
        from: u64,
        to: u64,
    },
    /// A read asked for an offset the partition does not hold.
    #[error("offset {requested} is out of range: the partition holds [{start}, {end})")]
    OffsetOutOfRange {
        requested: u64,
        start: u64,
        end: u64,
    },
    /// A topic name breaks the naming rules.
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName { name: String, reason: &'static str },
    /// A consumer group name breaks the naming rules (the same as for topics).
    #[error("invalid group name {name:?}: {reason}")]
    InvalidGroupName { name: String, reason: &'static str },
    #[error("consumer group {0:?} does not exist")]
    GroupNotFound(String),
    /// The group exists, with state on other topics only.
    #[error("consumer group {group:?} has never read topic {topic:?} (it reads {})", quoted(.reads))]
    GroupNotOnTopic {
        group: String,
        topic: String,
        reads: Vec<String>,
    },
    /// A batch with no records.
    #[error("a batch must hold at least one record")]
    EmptyBatch,
    /// A batch over the configured limit.
    #[error("batch of {size} bytes exceeds the limit of {limit} bytes")]
    BatchTooLarge { size: usize, limit: usize },
    /// A configuration value makes no sense.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The partition's writer has stopped (closed, or the process is shutting down).
    #[error("partition {} is closed", path.display())]
    Closed { path: PathBuf },
    /// Another process holds the data directory's lock.
    #[error("data directory {} is locked by another process (is a broker running on it?)", path.display())]
    Locked { path: PathBuf },
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("topic {topic:?} has no partition {partition}")]
    PartitionNotFound { topic: String, partition: u32 },
}

fn quoted(names: &[String]) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    names.join(", ")
}

impl Error {
    /// Wraps an `io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }

    /// A corruption error at a byte position of a file.
    pub fn corrupt(path: impl Into<PathBuf>, position: u64, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            position,
            reason: reason.into(),
        }
    }

    /// True when the error is the disk running out of space.
    pub fn is_storage_full(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
