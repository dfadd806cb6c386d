//! Sluice: a durable message broker — a segmented, checksummed commit log with consumer groups,
//! served over gRPC.
//!
//! # Layout
//!
//! Each layer is a module; dependencies point down only.
//!
//! - [`storage`]: synchronous, tokio-free storage engine. The record batch codec, segments with
//!   sparse memory-mapped offset and time indexes, the partition log with its writer thread and
//!   group commit, crash recovery, topics on disk and the data directory lock. Every durable
//!   write and sync goes through the fault seam in [`storage::io`].
//!
//! The byte layouts are documented in each storage module's header and drawn in
//! `docs/format.md`.

pub mod storage;
