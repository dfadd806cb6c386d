//! Conversions between the API's messages and the broker's types, shared by the `sluice.v1`
//! services, the seed API and `sluice dump`: messages in, deliveries and positions out, start
//! positions, topic settings.

use tonic::Status;

use crate::broker::{Delivery, NewMessage, Placed, Start};
use crate::proto::v1 as pb;
use crate::storage::topic::CleanupPolicy;
use crate::storage::{Header, TopicConfig};

/// A message of a `sluice.v1` Send.
pub fn message_from_pb(m: pb::Message) -> NewMessage {
    NewMessage {
        key: m.key,
        value: m.value,
        headers: m
            .headers
            .into_iter()
            .map(|h| Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        partition: m.partition,
        id: m.id,
    }
}

/// A message of the seed API's Send: a payload, nothing else.
pub fn seed_message(payload: bytes::Bytes) -> NewMessage {
    NewMessage {
        value: Some(payload),
        ..NewMessage::default()
    }
}

/// Where a Send put a message, as the API answers it.
pub fn position_to_pb(p: Placed) -> pb::Position {
    pb::Position {
        partition: p.partition,
        offset: p.offset,
        duplicate: p.duplicate,
        removed: p.removed,
    }
}

/// A delivery as the API sends it (also `sluice dump --format json`'s, via `consume`'s JSON).
pub fn delivery_to_pb(topic: &str, d: Delivery) -> pb::Delivery {
    pb::Delivery {
        topic: topic.to_string(),
        partition: d.partition,
        offset: d.record.offset,
        timestamp_ms: d.record.timestamp,
        key: d.record.key,
        value: d.record.value,
        headers: d
            .record
            .headers
            .into_iter()
            .map(|h| pb::Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        attempt: d.attempt,
        ack_id: d.ack_id,
        id: d.record.id,
    }
}

/// The start position of a subscription; absent means earliest.
pub fn start_from_pb(start: Option<pb::StartPosition>) -> Result<Start, Status> {
    use pb::start_position::Kind;
    Ok(match start.and_then(|s| s.kind) {
        None => Start::Earliest,
        Some(Kind::Earliest(true)) => Start::Earliest,
        Some(Kind::Latest(true)) => Start::Latest,
        Some(Kind::Earliest(false) | Kind::Latest(false)) => {
            return Err(Status::invalid_argument(
                "start.earliest and start.latest must be true when set",
            ));
        }
        Some(Kind::Offset(o)) => Start::Offset(o),
        Some(Kind::TimestampMs(t)) => Start::Timestamp(t),
    })
}

pub fn settings_to_pb(c: &TopicConfig) -> pb::TopicSettings {
    pb::TopicSettings {
        partitions: c.partitions,
        retention_ms: c.retention_ms,
        retention_bytes: c.retention_bytes,
        cleanup_policy: match c.cleanup_policy {
            CleanupPolicy::Delete => pb::CleanupPolicy::Delete as i32,
            CleanupPolicy::Compact => pb::CleanupPolicy::Compact as i32,
        },
        segment_bytes: c.segment_bytes,
        dedup_window_ms: Some(c.dedup_window_ms),
        replication_factor: c.replication_factor,
    }
}

pub fn settings_from_pb(s: Option<pb::TopicSettings>) -> Result<TopicConfig, Status> {
    let s = s.unwrap_or_default();
    let cleanup_policy = match pb::CleanupPolicy::try_from(s.cleanup_policy) {
        Ok(pb::CleanupPolicy::Delete) => CleanupPolicy::Delete,
        Ok(pb::CleanupPolicy::Compact) => CleanupPolicy::Compact,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown cleanup policy {}",
                s.cleanup_policy
            )));
        }
    };
    Ok(TopicConfig {
        partitions: s.partitions,
        retention_ms: s.retention_ms,
        retention_bytes: s.retention_bytes,
        cleanup_policy,
        segment_bytes: s.segment_bytes,
        dedup_window_ms: s
            .dedup_window_ms
            .unwrap_or(TopicConfig::default().dedup_window_ms),
        replication_factor: s.replication_factor,
        ..TopicConfig::default()
    })
}
