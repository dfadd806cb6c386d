//! The open topics of one data directory: opening them all at start, creating and deleting one,
//! finding one by name, and listing them. Owns the data directory (its lock stays taken while
//! the topics are open) and the map of open topics; creation and deletion are serialised here.
//!
//! What a topic's deletion means for its consumer groups is the broker's to orchestrate: this
//! file hands out the removed topic ([`Removed`]) and deletes its files when told.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use tokio::sync::{mpsc, oneshot};

use crate::storage::{self, DataDir, FileIo, LogConfig, TopicConfig, validate_topic_name};

use super::audit::{AUDIT_TOPIC, AuditEvent, AuditTrail, audit_topic_config};
use super::blocking::blocking;
use super::error::{Error, Result};
use super::topic::{Topic, partition_log_config};

/// Every open topic, `_audit` included.
#[derive(Debug)]
pub struct Topics {
    data: Arc<DataDir>,
    log: LogConfig,
    default_partitions: u32,
    map: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises topic creation and deletion.
    admin: Arc<tokio::sync::Mutex<()>>,
    /// Records topics created on first use.
    audit: Arc<AuditTrail>,
    /// Cluster mode: where creations go (the metadata group, which creates the topic on every
    /// node, this one included, through [`Topics::create_local`]).
    replicated: OnceLock<mpsc::Sender<CreateRequest>>,
}

/// A topic to create through the cluster, and where to say how it went.
#[derive(Debug)]
pub struct CreateRequest {
    pub name: String,
    pub config: TopicConfig,
    pub done: oneshot::Sender<Result<()>>,
}

/// A topic taken out of the map by [`Topics::remove`]: its subscriptions are ending; its files
/// stay until [`Topics::delete_files`]. No topic is created or deleted meanwhile.
#[derive(Debug)]
pub struct Removed {
    pub topic: Arc<Topic>,
    _admin: tokio::sync::OwnedMutexGuard<()>,
}

/// The data directory opened and every topic in it, `_audit` created when missing, and the
/// audit trail picked up where `_audit` ends.
#[derive(Debug)]
pub struct Opened {
    pub data: DataDir,
    pub topics: HashMap<String, Arc<Topic>>,
    pub audit: AuditTrail,
}

/// Opens (recovering) every topic of a data directory (blocking). A read-only open creates
/// nothing and refuses what would need repair.
pub fn open_all(
    dir: &std::path::Path,
    io: Arc<dyn FileIo>,
    read_only: bool,
    log: &LogConfig,
    audit_retention_ms: u64,
    replicated: bool,
) -> Result<Opened> {
    let data = if read_only {
        DataDir::open_read_only(dir, io)?
    } else {
        DataDir::open(dir, io)?
    };
    let mut topics = HashMap::new();
    for name in data.list_topics()? {
        let mut topic_config = data.topic_config(&name)?;
        if name == AUDIT_TOPIC {
            topic_config = audit_topic_config(audit_retention_ms);
        }
        let topic = Topic::open(&data, &name, topic_config, log, replicated)?;
        topics.insert(name, Arc::new(topic));
    }
    if !topics.contains_key(AUDIT_TOPIC) {
        let c = audit_topic_config(audit_retention_ms);
        data.create_topic(AUDIT_TOPIC, &c)?;
        let topic = Topic::open(&data, AUDIT_TOPIC, c, log, replicated)?;
        topics.insert(AUDIT_TOPIC.to_string(), Arc::new(topic));
    }
    let audit = match topics.get(AUDIT_TOPIC).and_then(|t| t.partitions.first()) {
        Some(p) => AuditTrail::open(Arc::clone(p))?,
        None => return Err(Error::Internal("the audit topic has no partition".into())),
    };
    Ok(Opened {
        data,
        topics,
        audit,
    })
}

impl Topics {
    pub fn new(
        data: Arc<DataDir>,
        topics: HashMap<String, Arc<Topic>>,
        log: LogConfig,
        default_partitions: u32,
        audit: Arc<AuditTrail>,
    ) -> Topics {
        Topics {
            data,
            log,
            default_partitions,
            map: RwLock::new(topics),
            admin: Arc::new(tokio::sync::Mutex::new(())),
            audit,
            replicated: OnceLock::new(),
        }
    }

    /// Cluster mode: from now on topics are created by sending them to `to` (the metadata
    /// group).
    pub fn replicate_through(&self, to: mpsc::Sender<CreateRequest>) {
        let _ = self.replicated.set(to);
    }

    /// Whether topics are replicated (cluster mode).
    pub fn replicated(&self) -> bool {
        self.replicated.get().is_some()
    }

    pub fn data(&self) -> &Arc<DataDir> {
        &self.data
    }

    /// Partitions of a topic created without a count.
    pub fn default_partitions(&self) -> u32 {
        self.default_partitions
    }

    /// An open topic (any name, `_audit` included), if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Every open topic, `_audit` included, in no order.
    pub fn all(&self) -> Vec<Arc<Topic>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// An open topic, or `TopicNotFound`. The name is checked first.
    pub fn existing(&self, name: &str) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        self.get(name)
            .ok_or_else(|| Error::Storage(storage::Error::TopicNotFound(name.to_string())))
    }

    /// An open topic, created with the default settings when missing if `create` says who
    /// asks (the creation goes into the audit trail).
    pub async fn get_or_create(
        &self,
        name: &str,
        create: Option<AuditEvent>,
    ) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        if let Some(t) = self.get(name) {
            return Ok(t);
        }
        let Some(event) = create else {
            return Err(Error::TopicNotFound(name.to_string()));
        };
        self.create_if_missing(name, event).await?;
        self.existing(name)
    }

    /// Creates a topic with the default settings unless it exists, recording the creation as
    /// `event` (its outcome and settings filled in); true if this call created it.
    async fn create_if_missing(&self, name: &str, event: AuditEvent) -> Result<bool> {
        validate_topic_name(name)?;
        if self.get(name).is_some() {
            return Ok(false);
        }
        let config = TopicConfig {
            partitions: self.default_partitions,
            ..TopicConfig::default()
        };
        match self.create(name, config).await {
            Ok(()) => {
                let event = AuditEvent {
                    resource: format!("topic {name:?}"),
                    outcome: "ok: topic created on first use".into(),
                    after: self.settings_json(name),
                    ..event
                };
                self.audit.record(event).await?;
                Ok(true)
            }
            Err(Error::Storage(storage::Error::TopicExists(_))) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A topic's settings as JSON (for audit records), if it exists.
    pub fn settings_json(&self, name: &str) -> Option<serde_json::Value> {
        self.get(name)
            .and_then(|t| serde_json::to_value(&t.config).ok())
    }

    /// Creates a topic with its partitions and opens it; in cluster mode, on every node,
    /// returning once it is open here.
    pub async fn create(&self, name: &str, mut config: TopicConfig) -> Result<()> {
        validate_topic_name(name)?;
        if config.partitions == 0 {
            config.partitions = self.default_partitions;
        }
        config.sanitize()?;
        let Some(cluster) = self.replicated.get() else {
            if let Some(factor) = config.replication_factor.filter(|&f| f != 1) {
                return Err(storage::Error::InvalidConfig(format!(
                    "replication_factor = {factor}: this broker is a single node, which holds \
                     one copy (docs/replication.md)"
                ))
                .into());
            }
            return self.create_local(name, config, &[]).await;
        };
        if self.get(name).is_some() {
            return Err(storage::Error::TopicExists(name.to_string()).into());
        }
        let (done, answer) = oneshot::channel();
        let request = CreateRequest {
            name: name.to_string(),
            config,
            done,
        };
        cluster
            .send(request)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Creates a topic here with its partitions and opens it (the settings are checked).
    pub async fn create_local(
        &self,
        name: &str,
        config: TopicConfig,
        first_offsets: &[u64],
    ) -> Result<()> {
        let _admin = self.admin.lock().await;
        if self.get(name).is_some() {
            return Err(storage::Error::TopicExists(name.to_string()).into());
        }
        let data = Arc::clone(&self.data);
        let log = self.log.clone();
        let owned = name.to_string();
        let first_offsets = first_offsets.to_vec();
        let replicated = self.replicated();
        let topic = blocking(move || {
            let capacity = partition_log_config(&config, &log).index_capacity();
            data.create_topic_at(&owned, &config, &first_offsets, capacity)?;
            Topic::open(&data, &owned, config, &log, replicated)
        })
        .await?;
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::new(topic));
        tracing::info!(topic = name, "topic created");
        Ok(())
    }

    /// Takes a topic out of the map and ends its subscriptions; its files stay until
    /// [`Topics::delete_files`].
    pub async fn remove(&self, name: &str) -> Result<Removed> {
        validate_topic_name(name)?;
        if self.replicated() {
            return Err(Error::FailedPrecondition(
                "a cluster node deletes a topic through the metadata group".into(),
            ));
        }
        self.remove_local(name).await
    }

    /// [`Topics::remove`] of this node's copy alone (cluster mode: the metadata group decided).
    pub async fn remove_local(&self, name: &str) -> Result<Removed> {
        let admin = Arc::clone(&self.admin).lock_owned().await;
        let topic = self
            .map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .ok_or_else(|| storage::Error::TopicNotFound(name.to_string()))?;
        topic.deleted.cancel();
        Ok(Removed {
            topic,
            _admin: admin,
        })
    }

    /// Closes a removed topic's partitions and deletes its files (blocking).
    pub fn delete_files(&self, removed: &Removed) -> Result<()> {
        for p in &removed.topic.partitions {
            // A latched partition cannot close cleanly; its files are going anyway.
            let _ = p.log.close();
        }
        self.data.delete_topic(&removed.topic.name)?;
        tracing::info!(topic = %removed.topic.name, "topic deleted");
        Ok(())
    }

    /// Every open topic but `_audit`, sorted by name.
    pub fn open_topics(&self) -> Vec<Arc<Topic>> {
        let mut list: Vec<_> = self
            .all()
            .into_iter()
            .filter(|t| &*t.name != AUDIT_TOPIC)
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Every topic with its settings, sorted by name; the internal `_audit` is not listed.
    pub fn list(&self) -> Vec<(String, TopicConfig)> {
        self.open_topics()
            .iter()
            .map(|t| (t.name.to_string(), t.config.clone()))
            .collect()
    }
}
