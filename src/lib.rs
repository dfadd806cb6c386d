//! Sluice: a durable message broker — a segmented, checksummed commit log with consumer groups,
//! served over gRPC.
//!
//! # Layout
//!
//! Each layer is a module; dependencies point down only.
//!
//! - [`cli`]: the `sluice` subcommands (serve, produce, consume, topics, bench) and the gRPC
//!   client helpers they share.
//! - [`server`]: tonic services (`sluice.v1` Broker and Admin), health, reflection, connection
//!   limits, graceful shutdown, and the one mapping of errors to gRPC statuses.
//! - [`broker`]: the async core: open topics, durable sends routed to partitions, subscriptions
//!   woken by the partition writers, topic admin.
//! - [`storage`]: synchronous, tokio-free storage engine. The record batch codec, segments with
//!   sparse memory-mapped offset and time indexes, the partition log with its writer thread and
//!   group commit, crash recovery, topics on disk and the data directory lock. Every durable
//!   write and sync goes through the fault seam in [`storage::io`].
//! - [`logging`]: the broker's log output, which never costs a request or a stop.
//! - [`config`]: the one typed configuration (file < `SLUICE_*` environment < flags).
//! - [`proto`]: code generated from `proto/` at build time.
//!
//! The byte layouts are documented in each storage module's header and drawn in
//! `docs/format.md`.

pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod logging;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod storage;
