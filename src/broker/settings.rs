//! What the broker uses of the server's configuration, and nothing else: limits on a Send,
//! topic defaults, subscription buffering, retention's period, the partition logs' settings and
//! the consumer groups', and cluster mode's members. The client listener, TLS, HTTP and logging settings stay with the server.

use std::path::PathBuf;

use crate::auth::tls::TlsConfig;
use crate::config::{Config, GroupsConfig};
use crate::replication::config::Members;
use crate::storage::LogConfig;

/// The broker's settings, taken from a checked [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// Create a topic on its first Send.
    pub auto_create_topics: bool,
    /// Partitions of a topic created without a count.
    pub default_partitions: u32,
    pub max_message_bytes: usize,
    pub max_batch_messages: usize,
    /// Responses buffered per subscription.
    pub subscriber_buffer: usize,
    /// Log bytes read per streamed response.
    pub delivery_batch_bytes: usize,
    /// Period of the retention run; 0: off.
    pub retention_check_ms: u64,
    /// How long a lone producer's Send polls for its acknowledgement.
    pub send_spin_us: u64,
    /// Longest last sync of a partition whose Send is served on its own thread; 0: never.
    pub send_inline_sync_us: u64,
    /// Age after which `_audit` records go; 0: kept.
    pub audit_retention_ms: u64,
    pub log: LogConfig,
    pub groups: GroupsConfig,
    /// Cluster mode's members; `None` for a single node.
    pub cluster: Option<Members>,
    /// Cluster mode with `[tls]`: its files, for mutual TLS between the nodes.
    pub cluster_tls: Option<TlsConfig>,
}

impl From<&Config> for Settings {
    fn from(c: &Config) -> Settings {
        Settings {
            data_dir: c.data_dir.clone(),
            auto_create_topics: c.auto_create_topics,
            default_partitions: c.default_partitions,
            max_message_bytes: c.max_message_bytes,
            max_batch_messages: c.max_batch_messages,
            subscriber_buffer: c.subscriber_buffer,
            delivery_batch_bytes: c.delivery_batch_bytes,
            retention_check_ms: c.retention_check_ms,
            send_spin_us: c.send_spin_us,
            send_inline_sync_us: c.send_inline_sync_us,
            audit_retention_ms: c.auth.audit_retention_ms,
            log: LogConfig {
                // A replicated partition's next entry follows a round trip to a follower, longer
                // than any polling window: its writer would poll in vain (docs/storage.md).
                writer_spin_us: if c.cluster.enabled() {
                    0
                } else {
                    c.log.writer_spin_us
                },
                ..c.log.clone()
            },
            groups: c.groups.clone(),
            // Checked by `Config::sanitize` before the broker is built.
            cluster: c.cluster.members().ok().flatten(),
            cluster_tls: c.tls.enabled().then(|| c.tls.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::config::ClusterConfig;

    #[test]
    fn writers_poll_for_a_lone_producer_on_a_single_node_and_never_in_a_cluster() {
        let single = Config::default();
        assert_eq!(
            Settings::from(&single).log.writer_spin_us,
            LogConfig::default().writer_spin_us
        );
        let clustered = Config {
            cluster: ClusterConfig {
                node_id: 1,
                peers: ["1@127.0.0.1:7170", "2@127.0.0.1:7171", "3@127.0.0.1:7172"]
                    .map(String::from)
                    .to_vec(),
                ..ClusterConfig::default()
            },
            ..Config::default()
        };
        let settings = Settings::from(&clustered);
        assert!(settings.cluster.is_some());
        assert_eq!(settings.log.writer_spin_us, 0);
        // Everything else of the log settings is the operator's.
        assert_eq!(
            LogConfig {
                writer_spin_us: clustered.log.writer_spin_us,
                ..settings.log
            },
            clustered.log
        );
    }
}
