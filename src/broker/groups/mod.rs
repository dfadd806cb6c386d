//! Consumer groups: members sharing a topic, per-message acks, redelivery, dead letters, and a
//! position that survives restarts.
//!
//! One [`GroupTopic`] per (group, topic) holds the state of every partition and a dispatcher
//! task that hands messages to members. The state is kept in memory and every change that must
//! survive a restart is appended, in order, to the group's event log ([`events`]), a partition
//! log of its own under `data/groups/<group>/<topic>/`. An `Ack` answers only once its event is
//! durable.
//!
//! Per partition the state is: a `cursor` (the next offset never delivered), the deliveries in
//! flight (member, deadline, attempt), the pending redeliveries (timed out, nacked, or left by a
//! member that went away), and the dead letters being written. Everything below the committed
//! offset — the smallest of those and the cursor — is acknowledged.
//!
//! See `docs/consumer-groups.md` for the life of a delivery.
//!
//! | file             | owns                                                                 |
//! |------------------|----------------------------------------------------------------------|
//! | [`group`]        | the group handle: settings, the event log, reset, describe, ack ids  |
//! | [`registry`]     | the broker's groups: opening each once, acks by name, admin          |
//! | [`state`]        | the in-memory state and the rules that move a delivery               |
//! | [`members`]      | join, leave, ack, nack, handing deliveries to the transport          |
//! | [`dispatch`]     | the dispatcher task: read-ahead, assignment, snapshots               |
//! | [`dead_letter`]  | ack-deadline expiry and copying to `<topic>.dlq`, crash-safe         |
//! | [`replay`]       | opening a group: replaying its log, waiting for and reading records  |
//! | [`events`]       | the event log's record format                                        |
//! | [`event_log`]    | where events go: a local log, or through the group's Raft group      |

mod dead_letter;
mod dispatch;
pub mod event_log;
pub mod events;
mod group;
mod members;
mod registry;
mod replay;
mod state;

pub use self::dead_letter::{
    DLQ_ATTEMPTS, DLQ_GROUP, DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC, dlq_topic,
};
pub use self::group::{
    GroupPartitionDescription, GroupSettings, GroupTopic, GroupTopicDescription, MemberDescription,
    ack_id, parse_ack_id,
};
pub use self::members::{GroupMember, MAX_NACK_DELAY, MemberGuard, Membership, Relayed};
pub use self::registry::Groups;
pub use self::replay::{Opening, event_log_config, fold};
