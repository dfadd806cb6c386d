//! The async core: the broker of one data directory, made of owned parts. Knows nothing of
//! gRPC: `server` translates requests into these calls and errors into statuses.
//!
//! | part              | owns                                                                |
//! |-------------------|---------------------------------------------------------------------|
//! | [`topics`]        | the data directory and the open topics: open, create, delete, find  |
//! | [`topic`]         | one topic: its partitions, permits, high-water watches, id index    |
//! | [`send`]          | the path of a Send to durable partitions, and the dead-letter handle|
//! | [`dedup`]         | a topic's id check for idempotent Send                              |
//! | [`id_check`]      | cluster mode: ids checked by each partition's leader                |
//! | [`ack_poll`]      | a lone producer's wait for its acknowledgement                      |
//! | [`subscription`]  | plain subscriptions: one reader task per partition                  |
//! | [`groups`]        | consumer groups: the registry, each group's state and dispatcher    |
//! | [`maintenance`]   | retention and compaction passes, and the periodic run               |
//! | [`audit`]         | the `_audit` trail's appender and its hash chain                    |
//! | [`refusals`]      | failed authentications and denials counted and summarised per source |
//! | [`cluster`]       | cluster mode: the metadata group, the partitions' groups, the cluster port |
//! | [`consumers`]     | cluster mode: consumer groups, each replicated by a Raft group of its own |
//! | [`remote`]        | cluster mode: reading a partition held only by other nodes           |
//! | [`upgrade`]       | a single node's data directory turned into a cluster node's, once   |
//! | [`message`]       | the vocabulary: messages, positions, deliveries                     |
//! | [`settings`]      | what the broker uses of the configuration                           |
//! | [`error`], [`clock`], [`blocking`] | the error type, the clock, the blocking pool       |
//!
//! `mod.rs` holds [`Broker`]: it builds the parts in order (topics, then the audit trail,
//! sends, groups, maintenance), answers each call with the part that owns it, and stops them
//! in the reverse order.
//! Its length is the facade: one short delegating method per call the server makes, so that
//! the server sees one broker and each call's owner is one line away.
//!
//! - **Send**: messages are routed to partitions (explicit, by key hash, or spread per request),
//!   encoded into one batch per partition on the calling task, and handed to each partition's
//!   writer (the writer pool). The call returns only when every batch is durable. A semaphore
//!   per partition bounds appends in flight: a burst of producers waits its turn, nothing is
//!   dropped.
//! - **Subscribe**: one task per subscribed partition reads whole batches (on the blocking pool)
//!   and pushes them into a bounded channel; when the subscriber is slow the channel fills and
//!   the reads pause. At the tail a task waits on its partition's high-water watch, which the
//!   writer pool signals after each durable append. No polling.

mod ack_poll;
pub mod audit;
mod blocking;
mod clock;
mod cluster;
mod consumers;
pub mod dedup;
pub mod error;
pub mod groups;
mod id_check;
mod maintenance;
mod message;
pub mod refusals;
mod remote;
mod send;
mod settings;
mod subscription;
pub mod topic;
mod topics;
pub mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::ack_poll::AckPoller;
use self::audit::{AuditEvent, AuditTrail, refuse_audit_topic};
use self::blocking::blocking;
use self::cluster::Cluster;
pub use self::consumers::relayed_delivery;
use self::consumers::{Consumers, Reset};
use self::groups::{
    GroupMember, GroupSettings, GroupTopic, GroupTopicDescription, Groups, MemberGuard, Membership,
};
use self::maintenance::Maintenance;
use self::refusals::RefusalLog;
use self::send::{DeadLetterAppender, SendLimits, Sends};
use self::subscription::SubscriptionSettings;
use self::topics::Topics;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::storage::{FileIo, RealIo, StoredRecord, TopicConfig, validate_topic_name};

pub use self::cluster::{LeaderMove, META_GROUP, RaftSample, Rebalanced};
pub use self::error::{Error, Result};
pub use self::maintenance::PartitionMaintenance;
pub use self::message::{Deliveries, Delivery, DeliveryBatch, NewMessage, Placed, Start};
pub use self::settings::Settings;
pub use self::topic::{
    NEWEST_SCAN, PartitionDescription, PartitionHandle, Topic, TopicDescription,
};

/// The broker: every open topic of one data directory, and the parts that serve them.
#[derive(Debug)]
pub struct Broker {
    settings: Settings,
    topics: Arc<Topics>,
    sends: Arc<Sends>,
    groups: Arc<Groups>,
    maintenance: Arc<Maintenance>,
    /// The `_audit` topic's appender.
    audit: Arc<AuditTrail>,
    /// Refusals into `_audit`, summarised for sources that keep failing.
    refusals: Arc<RefusalLog>,
    /// Broker-wide counters for `/metrics`.
    metrics: Arc<Metrics>,
    /// Cluster mode: this node's groups and the cluster port.
    cluster: Option<Arc<Cluster>>,
    /// Cluster mode: the consumer groups.
    consumers: Option<Arc<Consumers>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Opened by [`Broker::open_read_only`]: nothing is recorded or written.
    read_only: bool,
}

impl Broker {
    /// Takes the data directory's lock and opens (recovering) every topic.
    pub async fn open(config: Config) -> Result<Arc<Broker>> {
        Self::open_with_io(config, Arc::new(RealIo)).await
    }

    /// [`Broker::open`] with every durable write and sync going through `io` (fault injection).
    pub async fn open_with_io(config: Config, io: Arc<dyn FileIo>) -> Result<Arc<Broker>> {
        Self::open_inner(config, io, false).await
    }

    /// Opens an existing data directory to read it and change nothing (a dry run): no directory
    /// or file is created, nothing is recorded in the audit trail, and a partition that would
    /// need recovery (the broker did not stop cleanly) fails to open instead of being repaired.
    pub async fn open_read_only(config: Config) -> Result<Arc<Broker>> {
        Self::open_inner(config, Arc::new(crate::storage::ReadOnlyIo), true).await
    }

    /// Checks the configuration, keeps what the broker uses of it ([`Settings`]) and builds
    /// the parts.
    async fn open_inner(
        config: Config,
        io: Arc<dyn FileIo>,
        read_only: bool,
    ) -> Result<Arc<Broker>> {
        config
            .sanitize()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let settings = Settings::from(&config);
        drop(config);
        let opened = {
            let s = settings.clone();
            let io = Arc::clone(&io);
            blocking(move || {
                match (&s.cluster, read_only) {
                    (Some(members), false) => {
                        upgrade::adopt_single_node(&s.data_dir, members, &s.log, Arc::clone(&io))?;
                    }
                    (None, false) => upgrade::refuse_cluster_data(&s.data_dir)?,
                    (_, true) => {}
                }
                let replicated = s.cluster.is_some() && !read_only;
                topics::open_all(
                    &s.data_dir,
                    io,
                    read_only,
                    &s.log,
                    s.audit_retention_ms,
                    replicated,
                )
            })
            .await?
        };
        let topic_count = opened.topics.len() as u64 - 1;
        tracing::info!(data_dir = %settings.data_dir.display(), topics = topic_count, "broker open");
        let audit = Arc::new(
            opened
                .audit
                .of_node(settings.cluster.as_ref().map(|m| m.node_id)),
        );
        let topics = Arc::new(Topics::new(
            Arc::new(opened.data),
            opened.topics,
            settings.log.clone(),
            settings.default_partitions,
            Arc::clone(&audit),
        ));
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let cluster = match (&settings.cluster, read_only) {
            (Some(members), false) => Some(
                Cluster::start(
                    members.clone(),
                    &settings,
                    Arc::clone(&topics),
                    io,
                    &tasks,
                    shutdown.clone(),
                )
                .await?,
            ),
            _ => None,
        };
        let metrics = Arc::new(Metrics::default());
        let sends = Arc::new(Sends {
            topics: Arc::clone(&topics),
            limits: SendLimits {
                auto_create_topics: settings.auto_create_topics,
                max_batch_messages: settings.max_batch_messages,
                max_message_bytes: settings.max_message_bytes,
                max_batch_bytes: settings.log.max_batch_bytes,
                replicated: cluster.as_ref().map(|c| c.write_timeout()),
            },
            acks: AckPoller::new(Duration::from_micros(settings.send_spin_us)),
            inline_sync: (settings.send_inline_sync_us > 0)
                .then(|| Duration::from_micros(settings.send_inline_sync_us)),
            metrics: Arc::clone(&metrics),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            forwarder: cluster
                .as_ref()
                .map_or_else(Arc::default, |c| Arc::clone(c.forwarder())),
        });
        let g = &settings.groups;
        let group_settings = GroupSettings {
            ack_timeout: Duration::from_millis(g.ack_timeout_ms),
            max_deliveries: g.max_deliveries,
            max_in_flight_limit: g.max_in_flight,
            default_max_in_flight: g.default_in_flight,
            member_buffer: settings.subscriber_buffer,
            fsync: settings.log.fsync,
        };
        let groups = Groups::new(
            Arc::clone(&topics),
            group_settings,
            DeadLetterAppender::new(Arc::clone(&sends)),
            tasks.clone(),
            shutdown.clone(),
        );
        let groups = Arc::new(match &cluster {
            Some(c) => groups.led_only(Arc::clone(c.forwarder())),
            None => groups,
        });
        let consumers = cluster.as_ref().map(|c| {
            Consumers::start(
                Arc::clone(c),
                Arc::clone(&groups),
                Arc::clone(&topics),
                tasks.clone(),
                shutdown.clone(),
            )
        });
        let maintenance = Arc::new(Maintenance::new(
            Arc::clone(&topics),
            Arc::clone(&groups),
            Arc::clone(&audit),
            cluster.clone(),
            consumers.clone(),
        ));
        if let Some(c) = &cluster {
            c.serve_maintenance(maintainer(Arc::downgrade(&maintenance)));
            c.serve_ids(id_sender(
                sends.id_check(),
                Arc::downgrade(&topics),
                c.write_timeout(),
            ));
        }
        let retention_every = Duration::from_millis(settings.retention_check_ms);
        let broker = Arc::new(Broker {
            settings,
            topics,
            sends,
            groups,
            maintenance,
            refusals: Arc::new(RefusalLog::new(Arc::clone(&audit))),
            audit,
            metrics,
            cluster,
            consumers,
            shutdown,
            tasks,
            read_only,
        });
        if !read_only {
            broker
                .audit
                .record(AuditEvent::system("broker/start", "ok").count("topics", topic_count))
                .await?;
        }
        if !read_only {
            broker.tasks.spawn(summarise_refusals(
                Arc::clone(&broker.refusals),
                broker.shutdown.clone(),
            ));
        }
        // In cluster mode each replicated partition's leader decides its retention (compaction
        // is not replicated yet: compacted topics are only trimmed by age and size).
        if !retention_every.is_zero() {
            broker.maintenance.start_retention(
                retention_every,
                &broker.tasks,
                broker.shutdown.clone(),
            );
        }
        Ok(broker)
    }

    /// The data directory, to learn when every holder has let go of it (its `LOCK` is released
    /// with the last one).
    pub fn data_dir_handle(&self) -> std::sync::Weak<crate::storage::DataDir> {
        Arc::downgrade(self.topics.data())
    }

    /// The audit trail (`_audit`).
    pub fn audit(&self) -> &AuditTrail {
        &self.audit
    }

    /// Failed authentications and denials, into the audit trail (see [`refusals`]).
    pub fn refusals(&self) -> &RefusalLog {
        &self.refusals
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// What the broker uses of its configuration.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Cluster mode: the cluster port's address and this node's id; `None` for a single node.
    pub fn cluster_port(&self) -> Option<(u64, std::net::SocketAddr)> {
        self.cluster.as_ref().map(|c| (c.node_id(), c.addr()))
    }

    /// Whether this node is ready to serve: a single node once open, a cluster node once caught
    /// up with its groups' leaders.
    pub fn caught_up(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.caught_up())
    }

    /// Cluster mode: every node and group as the nodes report them (`sluice cluster status`).
    pub async fn cluster_status(&self) -> Result<crate::replication::status::ClusterView> {
        Ok(self.cluster_or_refuse("show")?.status().await)
    }

    /// Cluster mode: moves the leadership of partition `partition` of `topic` to node `to` (one
    /// of its replicas); the leader and its term once done.
    pub async fn transfer_leader(
        &self,
        topic: &str,
        partition: u32,
        to: u64,
    ) -> Result<(u64, u64)> {
        let cluster = self.cluster_or_refuse("move leaderships in")?;
        let t = self.topics.existing(topic)?;
        if partition as usize >= t.partitions.len() {
            return Err(Error::PartitionNotFound {
                topic: topic.to_string(),
                partition,
                count: t.partitions.len() as u32,
            });
        }
        cluster.transfer_leader(&t, partition, to).await
    }

    /// Cluster mode: adds node `id` (cluster port `addr`), running already with `join`, to the
    /// cluster; how many groups have it as a voter once done.
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<usize> {
        self.cluster_or_refuse("add a node to")?
            .add_node(id, addr)
            .await
    }

    /// Cluster mode: removes node `id` from the cluster; how many groups changed their voters.
    pub async fn remove_node(&self, id: u64) -> Result<usize> {
        self.cluster_or_refuse("remove a node from")?
            .remove_node(id)
            .await
    }

    /// Cluster mode: spreads partition leaders across the nodes (`dry_run`: says how only).
    pub async fn rebalance_leaders(&self, dry_run: bool) -> Result<Rebalanced> {
        self.cluster_or_refuse("balance leaders in")?
            .rebalance_leaders(dry_run)
            .await
    }

    fn cluster_or_refuse(&self, what: &str) -> Result<&Arc<Cluster>> {
        self.cluster.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "this broker runs as a single node (no [cluster] section): there is no cluster \
                 to {what}"
            ))
        })
    }

    /// Cancelled when the broker shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    // Topics.

    /// An open topic, or `TopicNotFound`. The name is checked first.
    pub fn existing_topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics.existing(name)
    }

    /// An open topic, created with the default settings when missing if `create` says who
    /// asks (the creation goes into the audit trail).
    pub async fn topic_or_create(
        &self,
        name: &str,
        create: Option<AuditEvent>,
    ) -> Result<Arc<Topic>> {
        self.topics.get_or_create(name, create).await
    }

    /// A topic's settings as JSON (for audit records), if it exists.
    pub fn topic_settings_json(&self, name: &str) -> Option<serde_json::Value> {
        self.topics.settings_json(name)
    }

    /// Creates a topic with its partitions and opens it.
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        self.topics.create(name, config).await
    }

    /// Deletes a topic: its subscriptions end, its consumer groups' state goes, its partitions
    /// close, its files go.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        refuse_audit_topic(name, "deleted")?;
        if let Some(cluster) = &self.cluster {
            validate_topic_name(name)?;
            return cluster.delete_topic(name).await;
        }
        let removed = self.topics.remove(name).await?;
        let (topics, groups) = (Arc::clone(&self.topics), Arc::clone(&self.groups));
        blocking(move || {
            groups.forget_topic(&removed.topic.name)?;
            topics.delete_files(&removed)
        })
        .await
    }

    /// Every open topic but `_audit`, sorted by name.
    pub fn open_topics(&self) -> Vec<Arc<Topic>> {
        self.topics.open_topics()
    }

    /// Every topic with its settings, sorted by name; the internal `_audit` is not listed.
    pub fn list_topics(&self) -> Vec<(String, TopicConfig)> {
        self.topics.list()
    }

    /// A topic's partitions, with what consumer groups hold back from retention.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let topic = self.topics.existing(name)?;
        let held = self.maintenance.maintain(Some(name), true).await?;
        let mut description = topic.describe(|p| {
            held.iter()
                .find(|h| h.partition == p)
                .map(|h| (h.outcome.held_bytes, h.held_by.clone()))
        });
        // Cluster mode: a partition this node holds no replica of, as a node that holds one
        // has it.
        if let Some(cluster) = &self.cluster {
            for (p, handle) in description.partitions.iter_mut().zip(&topic.partitions) {
                if let Some(replicas) = handle.remote.get() {
                    *p = cluster
                        .describe_remote(&topic.group_name(handle.id), handle.id, &replicas)
                        .await?;
                }
            }
        }
        Ok(description)
    }

    /// The newest `limit` records of a topic that `keep` accepts, newest first (see
    /// [`Topic::newest_records`]).
    pub async fn newest_records(
        &self,
        name: &str,
        limit: usize,
        keep: impl Fn(&StoredRecord) -> bool + Send + 'static,
    ) -> Result<Vec<(u32, StoredRecord)>> {
        self.topics
            .existing(name)?
            .newest_records(limit, keep)
            .await
    }

    // Sends and subscriptions.

    /// Appends messages and returns each one's position, in request order, once all of them
    /// are durable.
    pub async fn send(&self, topic: &str, messages: Vec<NewMessage>) -> Result<Vec<Placed>> {
        self.sends.send(topic, messages).await
    }

    /// [`Broker::send`], creating the topic when missing if `create` says who asks (see
    /// [`Sends::send_with`](send::Sends::send_with)).
    pub async fn send_with(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
        create: Option<AuditEvent>,
    ) -> Result<Vec<Placed>> {
        self.sends.send_with(topic, messages, create).await
    }

    /// Starts a subscription; errors in its arguments (unknown topic or partition, offset out of
    /// range) come back here, before any delivery.
    pub async fn subscribe(
        &self,
        topic: &str,
        partitions: Vec<u32>,
        start: Start,
    ) -> Result<mpsc::Receiver<DeliveryBatch>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let topic = self.topics.existing(topic)?;
        let settings = SubscriptionSettings {
            buffer: self.settings.subscriber_buffer,
            batch_bytes: self.settings.delivery_batch_bytes,
        };
        subscription::subscribe(
            topic,
            partitions,
            start,
            settings,
            &self.tasks,
            &self.shutdown,
            self.cluster.as_ref().map(|c| c.forwarder()),
        )
        .await
    }

    // Consumer groups.

    /// The open state of `group` on `topic`, opening it (and, for a new group, starting it at
    /// `start`) when needed; on a cluster, only a group this node leads.
    pub async fn group(&self, group: &str, topic: &str, start: Start) -> Result<Arc<GroupTopic>> {
        self.groups.group(group, topic, start).await
    }

    /// Joins `group` on `topic` as a member (on a cluster, relayed to the node leading the
    /// group when it is another).
    pub async fn subscribe_group(
        &self,
        topic: &str,
        group: &str,
        start: Start,
        membership: Membership,
    ) -> Result<(GroupMember, mpsc::Receiver<DeliveryBatch>)> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if let Some(consumers) = &self.consumers {
            return consumers.subscribe(topic, group, start, membership).await;
        }
        let (guard, rx) = self
            .groups
            .subscribe_group(topic, group, start, membership)
            .await?;
        Ok((GroupMember::Here(guard), rx))
    }

    /// Acknowledges deliveries; returns once durable, with whether each id applied.
    pub async fn ack(&self, group: &str, topic: &str, ids: &[String]) -> Result<Vec<bool>> {
        if let Some(consumers) = &self.consumers {
            return consumers.settle(group, topic, ids, None).await;
        }
        self.groups.ack(group, topic, ids).await
    }

    /// Returns deliveries for redelivery after `delay`.
    pub async fn nack(
        &self,
        group: &str,
        topic: &str,
        ids: &[String],
        delay: Duration,
    ) -> Result<Vec<bool>> {
        if let Some(consumers) = &self.consumers {
            return consumers.settle(group, topic, ids, Some(delay)).await;
        }
        self.groups.nack(group, topic, ids, delay).await
    }

    /// Cluster mode: a member relayed here by another node joins `group` on `topic`, which
    /// this node must lead (`UNAVAILABLE` otherwise: the caller asks the next node).
    pub fn join_led_group(
        &self,
        group: &str,
        topic: &str,
        membership: Membership,
        via: Option<u64>,
    ) -> Result<(MemberGuard, mpsc::Receiver<DeliveryBatch>)> {
        match &self.consumers {
            Some(consumers) => consumers.join_led(group, topic, membership, via),
            None => Err(Error::FailedPrecondition("not a cluster node".into())),
        }
    }

    /// Cluster mode: acks (`nack`: nacks) relayed here by another node, for `group` on
    /// `topic`, which this node must lead.
    pub async fn settle_led_group(
        &self,
        group: &str,
        topic: &str,
        ids: &[String],
        nack: Option<Duration>,
    ) -> Result<Vec<bool>> {
        match &self.consumers {
            Some(consumers) => consumers.settle_led(group, topic, ids, nack).await,
            None => Err(Error::FailedPrecondition("not a cluster node".into())),
        }
    }

    /// Cluster mode: serves the cluster port's `Consume` and `Settle` with `host` (the server
    /// layer's, which turns deliveries and errors into messages).
    pub fn serve_groups(&self, host: Arc<dyn crate::replication::service::GroupHost>) {
        if let Some(c) = &self.cluster {
            c.serve_groups(host);
        }
    }

    /// Every group with the topics it has state for.
    pub fn list_groups(&self) -> Result<Vec<(String, Vec<String>)>> {
        self.groups.list_groups()
    }

    /// Cluster mode: every partition group this node runs, as `/metrics` shows it (none on a
    /// single node).
    pub async fn raft_samples(&self) -> Vec<RaftSample> {
        match &self.cluster {
            Some(c) => c.raft_samples().await,
            None => Vec::new(),
        }
    }

    /// Every consumer group on every topic that exists, opened if it was not yet.
    pub async fn all_groups(&self) -> Vec<Arc<GroupTopic>> {
        self.groups.all_groups().await
    }

    /// The state of a group on each of its topics (on a cluster, as the node leading it on
    /// each topic has it).
    pub async fn describe_group(&self, group: &str) -> Result<Vec<GroupTopicDescription>> {
        match &self.consumers {
            Some(consumers) => consumers.describe_group(group).await,
            None => self.groups.describe_group(group).await,
        }
    }

    /// Moves a group's position on a topic (see [`Groups::reset_group`]); on a cluster, at
    /// the node leading the group.
    pub async fn reset_group(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
        to: Start,
        force: bool,
    ) -> Result<()> {
        match &self.consumers {
            Some(consumers) => {
                let reset = Reset {
                    partitions: partitions.to_vec(),
                    to,
                    force,
                };
                consumers.reset_group(group, topic, reset).await
            }
            None => {
                self.groups
                    .reset_group(group, topic, partitions, to, force)
                    .await
            }
        }
    }

    /// Deletes a group's state on every topic. Refused while members are connected (on a
    /// cluster, through any node).
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        match &self.consumers {
            Some(consumers) => consumers.delete_group(group).await,
            None => self.groups.delete_group(group).await,
        }
    }

    /// Cluster mode: an admin's describe (and reset) of `group` on `topic` relayed here by
    /// another node; this node must lead the group. The description as JSON.
    pub async fn administer_led_group(
        &self,
        group: &str,
        topic: &str,
        reset: Option<crate::proto::cluster::GroupReset>,
    ) -> Result<Vec<u8>> {
        match &self.consumers {
            Some(consumers) => consumers.administer_led(group, topic, reset).await,
            None => Err(Error::FailedPrecondition("not a cluster node".into())),
        }
    }

    // Maintenance.

    /// Applies retention and compaction to one topic or all (see [`Maintenance::maintain`]).
    pub async fn maintain(
        &self,
        topic: Option<&str>,
        dry_run: bool,
    ) -> Result<Vec<PartitionMaintenance>> {
        self.maintenance.maintain(topic, dry_run).await
    }

    /// Stops subscriptions, waits for their tasks, then closes every partition cleanly (final
    /// sync, trimmed indexes, clean marker). In-flight sends have finished when the server
    /// stopped serving them.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let groups = self.groups.stop_all();
        self.tasks.close();
        self.tasks.wait().await;
        // The groups stop before the partitions they write close.
        if let Some(cluster) = &self.cluster {
            cluster.shutdown().await;
        }
        // A read-only broker records nothing: nothing may be written.
        if !self.read_only
            && let Err(e) = self.refusals.summarise(true).await
        {
            tracing::error!(error = %e, "cannot record the last refusals in the audit trail");
        }
        if !self.read_only
            && let Err(e) = self
                .audit
                .record(AuditEvent::system("broker/stop", "ok"))
                .await
        {
            tracing::error!(error = %e, "cannot record the clean stop in the audit trail");
        }
        let topics = self.topics.all();
        let closed = blocking(move || {
            side_by_side(&groups, |g| g.close());
            side_by_side(&topics, |t| {
                if let Err(e) = t.persist_ids() {
                    tracing::error!(topic = %t.name, error = %e, "the id index was not written; the next start rebuilds it from the log");
                }
            });
            let parts: Vec<_> = topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(move |p| (t, p)))
                .collect();
            side_by_side(&parts, |(t, p)| {
                if let Err(e) = p.log.close() {
                    tracing::error!(topic = %t.name, partition = p.id, error = %e, "partition did not close cleanly");
                }
            });
            Ok(())
        })
        .await;
        if let Err(e) = closed {
            tracing::error!(error = %e, "closing the logs failed");
        }
        tracing::info!("broker closed");
    }
}

/// Threads that close logs at shutdown: a close mostly waits on syncs, so many run at once.
const CLOSING_THREADS: usize = 16;

/// Runs `f` on every item, on up to [`CLOSING_THREADS`] threads (blocking).
fn side_by_side<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        while let Some(item) = items.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
            f(item);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..CLOSING_THREADS.min(items.len()) {
            s.spawn(work);
        }
        work();
    });
}

/// The cluster port's `Maintain` on this node's maintenance: the partition a group name stands
/// for, maintained now, its report as JSON.
fn maintainer(
    maintenance: std::sync::Weak<Maintenance>,
) -> crate::replication::service::Maintainer {
    Arc::new(move |group: String, dry_run: bool| {
        let maintenance = maintenance.clone();
        Box::pin(async move {
            let Some(m) = maintenance.upgrade() else {
                return Err("the broker is shutting down".to_string());
            };
            let Some((topic, partition)) = crate::replication::catalog::parse_group_name(&group)
            else {
                return Err(format!("{group:?} names no partition"));
            };
            let report = m
                .maintain_partition(topic, partition, dry_run)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{group:?}: no such partition here"))?;
            serde_json::to_vec(&report).map_err(|e| e.to_string())
        })
    })
}

/// Serves the cluster port's `SendIds`: the id check of a partition this node leads
/// ([`id_check::IdCheck::here`]).
fn id_sender(
    check: id_check::IdCheck,
    topics: std::sync::Weak<Topics>,
    deadline: Duration,
) -> crate::replication::service::IdSender {
    use crate::replication::write::WriteError;
    Arc::new(move |group: String, batch: bytes::Bytes| {
        let (check, topics) = (check.clone(), topics.clone());
        Box::pin(async move {
            let gone = |why: String| WriteError::Stopped(why);
            let topics = topics
                .upgrade()
                .ok_or_else(|| gone("the broker is shutting down".into()))?;
            let (name, partition) = crate::replication::catalog::parse_group_name(&group)
                .ok_or_else(|| gone(format!("{group:?} names no partition")))?;
            let topic = topics
                .get(name)
                .ok_or_else(|| gone(format!("no topic {name:?} here")))?;
            let share = id_check::Share::decode(batch)
                .map_err(|why| gone(format!("{group:?}: a batch that does not decode: {why}")))?;
            match check.here(&topic, partition, &share, deadline).await {
                Ok(placed) => Ok(id_check::to_placements(&placed)),
                Err(Error::NoLeader { leader, .. }) => Err(WriteError::NoLeader(leader)),
                Err(e) => Err(gone(e.to_string())),
            }
        })
    })
}

/// Records the summary of each source's refusals once its window ends (see [`refusals`]).
async fn summarise_refusals(refusals: Arc<RefusalLog>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(refusals::WINDOW) => {}
        }
        if let Err(e) = refusals.summarise(false).await {
            tracing::error!(error = %e, "cannot record refusals in the audit trail");
        }
    }
}
