//! A topic's id index: for idempotent Send, which producer ids the topic stored, where, and when.
//!
//! The log is the truth: every record sent with an id carries it (see `record.rs`). This index
//! is derived from it, so that a retry is recognised without reading the log, and so that an id
//! stays known for its whole window after retention or compaction removed its record.
//!
//! It is a small log-structured merge tree, keyed by the first 16 bytes of the SHA-256 of the id
//! (a collision between two different ids needs about 2^64 ids, or 2^64 work to forge):
//!
//! - a **memtable** (a heap map) takes the ids of the newest appends;
//! - when it holds `log.dedup_memtable_ids` ids it is **frozen** and written out as an immutable, sorted
//!   **run** file (`ids/<lo>-<hi>.run`, [`run`]); the run records, per partition, the
//!   **watermark**: the offset below which every record with an id is in this run or an older
//!   one;
//! - runs are merged four at a time (size-tiered), dropping ids older than the window, so a
//!   lookup checks few of them. Each run keeps only its Bloom filter and one key per 4 KiB block
//!   in memory; a lookup reads one block (`pread`) only when the filter says "maybe".
//!
//! After a crash, [`IdIndex::recover`] re-reads each partition's log from the newest run's
//! watermark: what the memtable held is rebuilt from the records themselves. Nothing may remove
//! records at or above the watermark before it is persisted ([`IdIndex::watermarks`] bounds
//! retention and compaction; callers persist first).
//!
//! This type does no locking and no waiting: the broker holds it under a mutex together with
//! the ids being appended ("pending"), and writes runs outside that mutex
//! ([`IdIndex::freeze`], [`Frozen::write`], [`IdIndex::install`]).
//!
//! | file          | owns                                                                 |
//! |---------------|----------------------------------------------------------------------|
//! | [`key`]       | an id's key (SHA-256 prefix) and entry (partition, offset, time)     |
//! | [`memtable`]  | the memtable's slots, a frozen memtable and its write as a run       |
//! | [`index`]     | the index's lifecycle: open, recover, claim, freeze, install, stats  |
//! | [`merge`]     | merging runs into the next tier                                      |
//! | [`run`]       | the run file: format, Bloom filter, block lookups                    |
//! | `testing`     | (tests only) the entries, keys and runs the tests above share        |

mod index;
mod key;
mod memtable;
mod merge;
pub mod run;
#[cfg(test)]
pub(crate) mod testing;

pub use index::{Claimed, IdIndex, IdStats};
pub use key::{Entry, Key, KeyHasher, KeyMap, MAX_ID_BYTES};
pub use memtable::{Frozen, MEMTABLE_BYTES_PER_ID};
pub use merge::{MERGE_FAN_IN, merge};
pub use run::{Probe, Run};
