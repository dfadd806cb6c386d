//! Replication (cluster mode): partitions replicated by Raft, on `openraft`.
//!
//! | module            | job                                                                  |
//! |-------------------|----------------------------------------------------------------------|
//! | [`config`]        | `[cluster]`: this node, its peers; the checks at start              |
//! | [`elections`]     | each node's election timeout in a group: a turn, never a tie         |
//! | [`types`]         | the Raft type configuration of a partition group; proposals, results |
//! | [`log_store`]     | openraft's log storage on a partition log ([`crate::storage::raft_log`]) |
//! | [`state_machine`] | what applying a partition's entries means; snapshots                 |
//! | [`wire`]          | Raft's messages as `sluice.cluster.v1` protobuf (entries as batches) |
//! | [`peers`]         | where each peer's cluster port is, as this node reaches it          |
//! | [`heartbeats`]    | many groups' heartbeats to one peer as one call                      |
//! | [`handover`]      | a leader handing a group over (at a stop, or moved while running)    |
//! | [`balance`]       | the leader balancer's plan: which leaderships to move where          |
//! | [`network`]       | sending Raft's messages to peers over gRPC (the cluster port)        |
//! | [`service`]       | receiving them and handing each to the group it names                |
//! | [`write`]         | proposing to a group and waiting until committed (or why not)        |
//! | [`reads`]         | a partition's committed log for a node that holds no replica of it   |
//! | [`status`]        | each node's report of its groups; the cluster's view merged from them |
//! | [`catalog`]       | the metadata group's state: topics, settings, replicas; its commands |
//!
//! The design, what is built and what is not yet, is in `docs/replication.md`.

pub mod balance;
pub mod catalog;
pub mod config;
pub mod elections;
pub mod handover;
pub mod heartbeats;
// openraft's storage traits fix the error type (`StorageError`, over 200 bytes); the helpers
// that feed them return it too rather than convert at every call.
#[allow(
    clippy::result_large_err,
    reason = "openraft's StorageError is the traits' error type"
)]
pub mod log_store;
#[allow(
    clippy::result_large_err,
    reason = "openraft's RPCError is the network trait's error type"
)]
pub mod network;
pub mod peers;
pub mod reads;
pub mod service;
#[allow(
    clippy::result_large_err,
    reason = "openraft's StorageError is the traits' error type"
)]
pub mod state_machine;
pub mod status;
pub mod types;
pub mod wire;
pub mod write;

pub use log_store::LogStore;
pub use network::GrpcNetwork;
pub use peers::Peers;
pub use service::RaftService;
pub use state_machine::{GroupStateMachine, StateMachine};
pub use types::{Applied, GroupCommand, PartitionRaft, Proposal};
