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
            audit_retention_ms: c.auth.audit_retention_ms,
            log: c.log.clone(),
            groups: c.groups.clone(),
            // Checked by `Config::sanitize` before the broker is built.
            cluster: c.cluster.members().ok().flatten(),
            cluster_tls: c.tls.enabled().then(|| c.tls.clone()),
        }
    }
}
