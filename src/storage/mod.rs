//! The storage engine: synchronous, no tokio, no gRPC.
//!
//! | module        | on disk / job                                                        |
//! |---------------|----------------------------------------------------------------------|
//! | [`record`]    | the record batch codec (length, magic, CRC, offsets, records)        |
//! | [`segment`]   | `<base>.log` files and their names; positional reads and scans       |
//! | [`index`]     | `<base>.index`: sparse offset → position, memory-mapped              |
//! | [`timeindex`] | `<base>.timeindex`: sparse max-timestamp → offset, memory-mapped     |
//! | [`mapped`]    | the shared body of both index files                                  |
//! | [`checkpoint`]| `checkpoint`: where recovery resumes, and the clean-close marker     |
//! | [`compaction`]| key compaction: cleaning closed segments, the crash-safe swap        |
//! | [`partition`] | a partition log: writer pool, group commit, readers, recovery        |
//! | [`raft_log`]  | a partition log as a Raft log (cluster mode): entries by index, vote |
//! | [`ids`]       | `ids/`: a topic's id index for idempotent Send (memtable, runs, merge)|
//! | [`topic`]     | topic and group names, `topic.toml`                                  |
//! | [`data_dir`]  | the data directory, its `LOCK`, topics' and groups' directories      |
//! | [`io`]        | the fault seam every durable write and sync goes through             |
//! | [`varint`]    | the LEB128 varint codec of records and group events                  |
//! | [`verify`]    | read-only checks of a data directory (`sluice verify`)               |
//! | [`config`]    | [`LogConfig`] and [`FsyncPolicy`]                                    |
//! | [`error`]     | [`Error`], this layer's one error type                               |

pub mod checkpoint;
pub mod compaction;
pub mod config;
pub mod data_dir;
pub mod error;
pub mod ids;
pub mod index;
pub mod io;
pub mod mapped;
pub mod partition;
pub mod raft_log;
pub mod record;
pub mod segment;
pub mod timeindex;
pub mod topic;
pub mod varint;
pub mod verify;

pub use compaction::{CompactionOptions, CompactionOutcome};
pub use config::{FsyncPolicy, LogConfig};
pub use data_dir::DataDir;
pub use error::{Error, Result};
pub use io::{FileIo, ReadOnlyIo, RealIo};
pub use partition::{
    AppendMode, Appended, CompactionPoint, Completion, Listener, Partition, PartitionMetrics,
    PartitionStats, RecoveryReport, Retention, RetentionOutcome, WriterPool,
};
pub use record::{Batch, EncodedBatch, Header, Record, StoredRecord};
pub use topic::{TopicConfig, validate_group_name, validate_topic_name};
