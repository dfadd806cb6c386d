//! Sluice: a durable message broker — a segmented, checksummed commit log with consumer groups,
//! served over gRPC.
//!
//! # Layout
//!
//! Each layer is a module; dependencies point down only.
//!
//! - [`cli`]: the `sluice` subcommands (serve, produce, consume, topics, groups, compact,
//!   verify, dump, audit, auth) and the gRPC client helpers they share. The benchmarks' load
//!   generator is a crate of its own (`benches/sluice-bench`).
//! - [`server`]: tonic services (`sluice.v1` Broker and Admin), health, reflection, connection
//!   limits, graceful shutdown, and the one mapping of errors to gRPC statuses.
//! - [`broker`]: the async core, as owned parts: the open topics, the send path to durable
//!   partitions (with idempotent Send), subscriptions woken by the partition writers, consumer
//!   groups, maintenance (retention, compaction) and the audit trail.
//! - [`replication`]: cluster mode, being built (`docs/replication.md`): openraft's storage
//!   traits on the partition log, the Raft types of a partition group, its state machine.
//! - [`storage`]: synchronous, tokio-free storage engine. The record batch codec, segments with
//!   sparse memory-mapped offset and time indexes, the partition log with its writer thread and
//!   group commit, crash recovery, topics on disk and the data directory lock. Every durable
//!   write and sync goes through the fault seam in [`storage::io`].
//! - [`logging`]: the broker's log output, which never costs a request or a stop.
//! - [`auth`]: principals, grants, bearer tokens and the TLS settings.
//! - [`metrics`]: the counters and histograms the hot paths update, read by `/metrics`.
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
pub mod replication;
pub mod server;
pub mod storage;

#[cfg(test)]
mod tests {
    /// Each folder's map (`# Layout` here, the table in each folder's `mod.rs`) names every
    /// module the folder declares.
    #[test]
    fn the_module_maps_name_every_module() {
        for (file, text) in [
            ("src/lib.rs", include_str!("lib.rs")),
            ("src/storage/mod.rs", include_str!("storage/mod.rs")),
            ("src/broker/mod.rs", include_str!("broker/mod.rs")),
            (
                "src/broker/groups/mod.rs",
                include_str!("broker/groups/mod.rs"),
            ),
            ("src/server/mod.rs", include_str!("server/mod.rs")),
            ("src/server/conn/mod.rs", include_str!("server/conn/mod.rs")),
            ("src/server/http/mod.rs", include_str!("server/http/mod.rs")),
            ("src/storage/ids/mod.rs", include_str!("storage/ids/mod.rs")),
            (
                "src/storage/partition/mod.rs",
                include_str!("storage/partition/mod.rs"),
            ),
            ("src/replication/mod.rs", include_str!("replication/mod.rs")),
        ] {
            let (docs, code): (Vec<&str>, Vec<&str>) =
                text.lines().partition(|l| l.starts_with("//!"));
            let docs = docs.join("\n");
            let declared = code
                .iter()
                .filter_map(|l| {
                    l.strip_prefix("pub mod ")
                        .or_else(|| l.strip_prefix("mod "))
                })
                .filter(|l| l.ends_with(';'));
            for m in declared {
                let name = m.trim_end_matches(';');
                assert!(
                    docs.contains(&format!("`{name}`")),
                    "{file} does not name {name}"
                );
            }
        }
    }
}
