//! Topics' and groups' names and a topic's settings (`topic.toml`, [`TopicConfig`]). The
//! directories that hold them are [`super::data_dir`]'s.

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// Longest topic name (as in Kafka; leaves room for `.dlq` and file name limits).
pub const MAX_TOPIC_NAME_LEN: usize = 249;
pub const TOPIC_FILE: &str = "topic.toml";

/// Checks a topic name: 1 to 249 characters from `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_TOPIC_NAME_LEN {
        Some("must be at most 249 characters")
    } else if name == "." || name == ".." {
        Some("must not be `.` or `..`")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        Some("may only contain ASCII letters, digits, `.`, `_` and `-`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidTopicName {
            name: name.chars().take(300).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a consumer group name: the same rules as topic names.
pub fn validate_group_name(name: &str) -> Result<()> {
    validate_topic_name(name).map_err(|e| match e {
        Error::InvalidTopicName { name, reason } => Error::InvalidGroupName { name, reason },
        other => other,
    })
}

/// What happens to old data of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CleanupPolicy {
    /// Whole segments are deleted past the retention time or size.
    #[default]
    Delete,
    /// Only the newest record per key is kept.
    Compact,
}

/// A topic's settings, stored in `topic.toml`. Each field says its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicConfig {
    /// Number of partitions, fixed at creation. Default: 1.
    pub partitions: u32,
    /// Delete closed segments whose newest record is older than this. Default: none (keep
    /// forever: clinical data is not dropped unless someone decided so).
    pub retention_ms: Option<u64>,
    /// Delete the oldest closed segments while a partition is larger than this. Default: none.
    pub retention_bytes: Option<u64>,
    /// `delete` or `compact`. Default: `delete`.
    pub cleanup_policy: CleanupPolicy,
    /// Segment size for this topic. Default: none (the broker's `segment_bytes`).
    pub segment_bytes: Option<u64>,
    /// Keep segments a consumer group has not fully acknowledged. Default: true.
    pub retain_until_consumed: bool,
    /// How long compaction keeps tombstones. Default: 86400000 (24 h).
    pub delete_retention_ms: u64,
    /// How long a Send's message id is remembered: a message with an id stored within this
    /// window is not stored again. 0 turns it off. May exceed retention. Default: 86400000 (24 h).
    pub dedup_window_ms: u64,
    /// Cluster mode: which creation of this name the topic is (0 the first; each creation after
    /// a deletion counts up), so that a node that slept through a deletion and a re-creation
    /// does not mix the two. Set by the cluster, not by users; not written when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub incarnation: u64,
    /// Cluster mode: for a topic a node brought from its single-node data, that node: its
    /// partitions' groups hold that data as their first entries, on that node alone until it
    /// has replicated them, so no other node forms them. Set by the cluster; not written when
    /// none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub formed_by: Option<u64>,
    /// Cluster mode: how many nodes hold each partition (a majority of them acknowledges a
    /// Send). Default: none (the cluster's `replication_factor`); a single node takes only 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u32>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            retention_ms: None,
            retention_bytes: None,
            cleanup_policy: CleanupPolicy::Delete,
            segment_bytes: None,
            retain_until_consumed: true,
            delete_retention_ms: 24 * 3600 * 1000,
            dedup_window_ms: 24 * 3600 * 1000,
            incarnation: 0,
            formed_by: None,
            replication_factor: None,
        }
    }
}

/// Most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;

impl TopicConfig {
    pub fn sanitize(&self) -> Result<()> {
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(Error::InvalidConfig(format!(
                "partitions = {} must be between 1 and {MAX_PARTITIONS}",
                self.partitions
            )));
        }
        if let Some(b) = self.segment_bytes
            && !(4096..=super::segment::MAX_SEGMENT_BYTES).contains(&b)
        {
            return Err(Error::InvalidConfig(format!(
                "segment_bytes = {b} must be between 4096 and {}",
                super::segment::MAX_SEGMENT_BYTES
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_rules() {
        for ok in ["a", "orders", "A.b_c-9", "..x", &"x".repeat(249)] {
            validate_topic_name(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            "é",
            &"x".repeat(250),
            "a\0",
        ] {
            let err = validate_topic_name(bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidTopicName { .. }),
                "{bad:?} gave {err}"
            );
        }
    }
}
