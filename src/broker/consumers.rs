//! Consumer groups on a cluster. Each group's state on a topic is replicated by a Raft group of
//! its own, held by the topic's nodes, whose log is the group's event log
//! (`data/groups/<group>/<topic>/` on each node, the same events as on one node). The node that
//! leads that Raft group runs the group: once it has applied its own term's first entry (so
//! every earlier one) it replays the log, dispatches, and proposes every event, in order
//! ([`RaftEvents`]); when it stops leading, the group stops here and its members
//! are told to subscribe again (`UNAVAILABLE`). A member may connect to any node: one that does
//! not lead the group relays it to the one that does (the cluster port's `Consume`) and
//! forwards its acks and nacks (`Settle`). See `docs/replication.md`, "Consumer groups on a
//! cluster".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::Raft;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proto::cluster as pb;
use crate::replication::catalog::{Catalog, CatalogGroup, Command, consumer_group_name};
use crate::replication::write::{
    MERGED_BYTES, Submitted, WriteError, outcome, submit, wait_for_leader,
};
use crate::replication::{PartitionRaft, Proposal, balance};
use crate::storage::record::{Batch, BatchHeader, Decoded};
use crate::storage::{self, EncodedBatch, Partition, validate_group_name};

use super::blocking::blocking;
use super::cluster::Cluster;
use super::error::{Error, Result};
use super::groups::event_log::{ReplicatedEvents, Then};
use super::groups::{
    GroupMember, GroupTopic, GroupTopicDescription, Groups, MemberGuard, Membership, Opening,
    Relayed, ack_id, event_log_config,
};
use super::message::{Deliveries, Delivery, DeliveryBatch, Start};
use super::remote;
use super::topic::Topic;
use super::topics::Topics;

/// The file in a group's directory naming the Raft group whose log it holds: a directory left
/// by an earlier creation of the group (deleted while this node was down) is cleared.
const RAFT_GROUP_FILE: &str = "raft-group";

/// How long a failing catalog reconciliation waits before it tries again.
const RETRY: Duration = Duration::from_secs(1);

/// This node's share of the cluster's consumer groups.
pub struct Consumers {
    cluster: Arc<Cluster>,
    groups: Arc<Groups>,
    topics: Arc<Topics>,
    /// Every consumer group whose Raft group runs here, by the Raft group's name.
    hosted: Mutex<HashMap<String, Arc<Hosted>>>,
    /// Serialises hosting (the catalog watcher and subscriptions both do).
    hosting: tokio::sync::Mutex<()>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Consumers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumers").finish_non_exhaustive()
    }
}

/// A consumer group whose Raft group runs here.
struct Hosted {
    /// The Raft group's name ([`consumer_group_name`]).
    name: String,
    group: String,
    /// The group's creation, as the catalog numbers it.
    id: u64,
    topic: Arc<Topic>,
    raft: Raft<PartitionRaft>,
    log: Arc<Partition>,
    /// Where a new group starts in each partition.
    starts: Vec<u64>,
    /// The group, while this node leads it.
    led: watch::Sender<Option<Arc<GroupTopic>>>,
    stop: CancellationToken,
}

impl Consumers {
    /// Starts following the catalog: every consumer group of a topic this node holds runs
    /// here from then on.
    pub fn start(
        cluster: Arc<Cluster>,
        groups: Arc<Groups>,
        topics: Arc<Topics>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Consumers> {
        let consumers = Arc::new(Consumers {
            cluster,
            groups,
            topics,
            hosted: Mutex::default(),
            hosting: tokio::sync::Mutex::new(()),
            tasks: tasks.clone(),
            shutdown,
        });
        tasks.spawn(Arc::clone(&consumers).follow_catalog());
        consumers
    }

    fn hosted(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Hosted>>> {
        self.hosted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn me(&self) -> u64 {
        self.cluster.node_id()
    }

    async fn follow_catalog(self: Arc<Self>) {
        let mut catalog = self.cluster.catalog();
        loop {
            let current = Arc::clone(&catalog.borrow_and_update());
            let failed = match self.reconcile(&current).await {
                Ok(settled) => !settled,
                Err(e) => {
                    tracing::error!(error = %e, "cannot run this node's consumer groups as the \
                        catalog says; trying again");
                    true
                }
            };
            tokio::select! {
                changed = catalog.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(RETRY), if failed => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Runs here every consumer group of the catalog this node holds, and stops (deleting its
    /// state here) every one the catalog no longer has: deleted, or its topic deleted. False
    /// while a topic the catalog has is not open here yet (the cluster layer creates it): to
    /// be tried again.
    async fn reconcile(&self, catalog: &Catalog) -> Result<bool> {
        // The gone first: a group created again takes the same directory. (Under the hosting
        // lock: an unhosting deletes the directory a hosting may be creating.)
        {
            let _one_at_a_time = self.hosting.lock().await;
            for h in self.gone() {
                self.unhost(&h).await?;
            }
        }
        let mut settled = true;
        let me = self.me();
        for (name, entry) in &catalog.topics {
            if entry.consumer_groups.is_empty() {
                continue;
            }
            let topic = self
                .topics
                .get(name)
                .filter(|t| t.config.incarnation == entry.config.incarnation);
            let Some(topic) = topic else {
                settled = false;
                continue;
            };
            for (group, g) in &entry.consumer_groups {
                if g.replicas.contains(&me) {
                    self.host(&topic, group, g).await?;
                }
            }
        }
        Ok(settled)
    }

    /// Runs consumer group `group`'s Raft group on `topic` here (unless it runs already), and
    /// the task that runs the group whenever this node leads it.
    async fn host(
        &self,
        topic: &Arc<Topic>,
        group: &str,
        entry: &CatalogGroup,
    ) -> Result<Arc<Hosted>> {
        let name = consumer_group_name(&topic.name, group, entry.id);
        let _one_at_a_time = self.hosting.lock().await;
        if let Some(h) = self.hosted().get(&name) {
            return Ok(Arc::clone(h));
        }
        // Only the creation the catalog has now (`entry` may come from an older view), and
        // only once an earlier one, deleted since, has let go of the directory.
        if !catalog_holds(&self.latest_catalog(), topic, group, entry.id) {
            return Err(Error::Unavailable(format!(
                "consumer group {group:?} on {:?} was deleted meanwhile; retry",
                &*topic.name
            )));
        }
        for h in self.gone() {
            if h.group == group && h.topic.name == topic.name {
                self.unhost(&h).await?;
            }
        }
        let dir = self.topics.data().group_dir(group, &topic.name)?;
        let io = Arc::clone(self.topics.data().io());
        let config = event_log_config(self.groups.provided().settings.fsync);
        let owner = name.clone();
        let log = blocking(move || {
            let marker = dir.join(RAFT_GROUP_FILE);
            match std::fs::read_to_string(&marker) {
                Ok(held) if held == owner => {}
                Ok(_) => {
                    // An earlier creation's state: not this group's.
                    std::fs::remove_dir_all(&dir).map_err(|e| storage::Error::io(&dir, e))?;
                }
                Err(_) => {}
            }
            std::fs::create_dir_all(&dir).map_err(|e| storage::Error::io(&dir, e))?;
            if !marker.exists() {
                storage::io::replace_file(io.as_ref(), &marker, owner.as_bytes())
                    .map_err(|e| storage::Error::io(&marker, e))?;
            }
            Ok(Arc::new(Partition::open(&dir, config, io, None)?))
        })
        .await?;
        let raft = (self.cluster)
            .run_group(&name, &log, &entry.replicas, !entry.moved, entry.first)
            .await?;
        let hosted = Arc::new(Hosted {
            name: name.clone(),
            group: group.to_string(),
            id: entry.id,
            topic: Arc::clone(topic),
            raft,
            log,
            starts: entry.starts.clone(),
            led: watch::Sender::new(None),
            stop: CancellationToken::new(),
        });
        self.hosted().insert(name, Arc::clone(&hosted));
        let (me, h) = (self.me(), Arc::clone(&hosted));
        let this = ConsumersRef {
            groups: Arc::clone(&self.groups),
            cluster: Arc::clone(&self.cluster),
            tasks: self.tasks.clone(),
            shutdown: self.shutdown.clone(),
        };
        self.tasks.spawn(async move { this.lead(me, h).await });
        Ok(hosted)
    }

    /// The catalog as this node has applied it now (newer than any view handed around).
    fn latest_catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.cluster.catalog().borrow())
    }

    /// The groups running here that the catalog, as applied now, no longer has (deleted, or
    /// their topic deleted). Judged on the latest catalog only: a group is hosted only once
    /// this node's catalog has it, so one missing from a later catalog was deleted, whereas an
    /// older view may simply not have it yet (and its state here must not be deleted).
    fn gone(&self) -> Vec<Arc<Hosted>> {
        let catalog = self.latest_catalog();
        self.hosted()
            .values()
            .filter(|h| !catalog_holds(&catalog, &h.topic, &h.group, h.id))
            .cloned()
            .collect()
    }

    /// Stops a consumer group's Raft group here and deletes its state (the group or its topic
    /// is gone).
    async fn unhost(&self, h: &Arc<Hosted>) -> Result<()> {
        h.stop.cancel();
        self.hosted().remove(&h.name);
        self.cluster.stop_group(&h.name).await;
        let (log, data) = (Arc::clone(&h.log), Arc::clone(self.topics.data()));
        let (group, topic) = (h.group.clone(), h.topic.name.to_string());
        blocking(move || {
            let _ = log.close();
            match data.delete_group_state(&group, Some(&topic)) {
                Ok(()) | Err(storage::Error::GroupNotFound(_)) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        tracing::info!(group = %h.group, topic = %h.topic.name, "consumer group (or its topic) deleted in the cluster: its state deleted here");
        Ok(())
    }

    /// The consumer group `group` on `topic` as the catalog has it, running here; created in
    /// the cluster first (starting at `create`) when it is not and `create` is given.
    async fn entry(&self, topic: &str, group: &str, create: Option<Start>) -> Result<Arc<Hosted>> {
        validate_group_name(group)?;
        let topic = self.topics.existing(topic)?;
        let known = {
            let catalog = self.cluster.catalog();
            let catalog = catalog.borrow();
            catalog
                .topics
                .get(&*topic.name)
                .filter(|t| t.config.incarnation == topic.config.incarnation)
                .map(|t| t.consumer_groups.get(group).cloned())
        };
        let Some(entry) = known else {
            return Err(Error::Unavailable(format!(
                "topic {:?} is not in this node's catalog yet; retry",
                &*topic.name
            )));
        };
        let entry = match (entry, create) {
            (Some(entry), _) => entry,
            (None, None) => return Err(storage::Error::GroupNotFound(group.to_string()).into()),
            (None, Some(start)) => self.create(&topic, group, start).await?,
        };
        self.host(&topic, group, &entry).await
    }

    /// Creates consumer group `group` on `topic` in the catalog, starting at `start` (as this
    /// node's copy of each partition places it), unless another creation came first.
    async fn create(&self, topic: &Arc<Topic>, group: &str, start: Start) -> Result<CatalogGroup> {
        let mut starts = Vec::with_capacity(topic.partitions.len());
        let forwarder = Some(self.cluster.forwarder());
        for handle in &topic.partitions {
            starts.push(remote::start_offset(topic, handle, forwarder, start).await?);
        }
        let command = Command::CreateGroup {
            topic: topic.name.to_string(),
            incarnation: topic.config.incarnation,
            group: group.to_string(),
            starts,
            replicas: self.cluster.node_ids(),
            first: Some(self.me()),
        };
        let found = |c: &Catalog| {
            c.topics
                .get(&*topic.name)
                .and_then(|t| t.consumer_groups.get(group))
                .cloned()
        };
        let applied = self
            .cluster
            .commit_to_catalog(command, |c| found(c).is_some())
            .await?;
        applied.and_then(|c| found(&c)).ok_or_else(|| {
            Error::Unavailable(format!(
                "consumer group {group:?} was created in the cluster but this node has not \
                 heard of it in time; retry"
            ))
        })
    }

    /// Joins `group` on `topic` as a member: here when this node leads the group, else relayed
    /// to the node that does. A new group is created in the cluster first, starting at `start`.
    pub async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        start: Start,
        membership: Membership,
    ) -> Result<(GroupMember, mpsc::Receiver<DeliveryBatch>)> {
        // Checked before the group is created: a refused Subscribe creates nothing.
        self.groups
            .provided()
            .settings
            .max_in_flight(membership.max_in_flight)?;
        let h = self.entry(topic, group, Some(start)).await?;
        let deadline = self.cluster.write_timeout();
        let leader = wait_for_leader(&h.raft, deadline).await;
        let (lease, _) = self.cluster.lease();
        if leader == Some(self.me()) {
            // Elected here: the group runs here once this node has applied its term's first
            // entry and heard from a majority (a new group's first member arrives right after
            // the election, before either).
            let mut led = h.led.subscribe();
            let g = tokio::time::timeout(deadline, led.wait_for(Option::is_some))
                .await
                .ok()
                .and_then(|r| r.ok().and_then(|g| g.clone()));
            if let Some(g) = g
                && acknowledged(&h.raft.metrics().borrow(), lease)
            {
                let (guard, rx) = g.join(membership)?;
                return Ok((GroupMember::Here(guard), rx));
            }
        }
        self.relay(&h, membership).await
    }

    /// A member relayed to the node leading `h`'s group: its deliveries arrive on the returned
    /// channel as that node sends them; its acks go there.
    async fn relay(
        &self,
        h: &Arc<Hosted>,
        membership: Membership,
    ) -> Result<(GroupMember, mpsc::Receiver<DeliveryBatch>)> {
        let req = pb::ConsumeRequest {
            group: h.group.clone(),
            topic: h.topic.name.to_string(),
            max_in_flight: membership.max_in_flight as u64,
            exclusive: membership.exclusive,
            limit: membership.limit,
            via: self.me(),
        };
        let others = self.others(h);
        let forwarder = Arc::clone(self.cluster.forwarder());
        let term = h.raft.metrics().borrow().current_term;
        let (mut stream, at) = forwarder
            .consume_remote(
                &h.name,
                self.leader_elsewhere(h),
                &others,
                req,
                self.cluster.write_timeout(),
            )
            .await
            .map_err(Error::Relayed)?;
        let buffer = self.groups.provided().settings.member_buffer;
        let (tx, rx) = mpsc::channel(buffer);
        let ends = CancellationToken::new();
        let (stop, shutdown) = (ends.clone(), self.shutdown.clone());
        // This node is a member of the group's Raft group: once it knows of an election since
        // the stream began, and of a leader other than the node relayed to (which may be cut
        // off and unable to say its group stopped), the member subscribes again.
        let mut metrics = h.raft.metrics();
        self.tasks.spawn(async move {
            let moved = metrics.wait_for(|m| m.current_term > term && m.current_leader != Some(at));
            tokio::pin!(moved);
            loop {
                let next = tokio::select! {
                    m = stream.message() => m,
                    _ = &mut moved => Ok(None),
                    () = stop.cancelled() => return,
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                };
                let batch = match next {
                    Ok(Some(response)) => relayed_deliveries(response),
                    Ok(None) => Err(Error::Unavailable(
                        "the consumer group's leader changed or ended the stream; subscribe again"
                            .into(),
                    )),
                    Err(status) => Err(Error::Relayed(status)),
                };
                let last = batch.is_err();
                if tx.send(batch).await.is_err() || last {
                    return;
                }
            }
        });
        let (name, group, topic) = (h.name.clone(), h.group.clone(), h.topic.name.to_string());
        let (deadline, tasks) = (self.cluster.write_timeout(), self.tasks.clone());
        let (raft, me) = (h.raft.clone(), self.me());
        let ack = Box::new(move |ids: Vec<(u32, u64)>| {
            let ack_ids = ids.iter().map(|&(p, o)| ack_id(p, o)).collect();
            let req = settle_request(&group, &topic, ack_ids, None);
            let (forwarder, name, others) = (Arc::clone(&forwarder), name.clone(), others.clone());
            let leader = leader_other_than(&raft, me);
            tasks.spawn(async move {
                let settled = forwarder
                    .settle_remote(&name, leader, &others, req, deadline)
                    .await;
                if let Err(e) = settled {
                    tracing::warn!(group = %name, error = %e, "a relayed acknowledgement failed");
                }
            });
        });
        let relayed = Relayed {
            ack,
            ends: ends.drop_guard(),
        };
        Ok((GroupMember::Relayed(relayed), rx))
    }

    /// The leader of `h`'s group as this node knows it, when another node.
    fn leader_elsewhere(&self, h: &Hosted) -> Option<u64> {
        leader_other_than(&h.raft, self.me())
    }

    /// The nodes of `h`'s group other than this one.
    /// The group's other voters, as its Raft group now has them (nodes added or removed since
    /// it was created included).
    fn others(&self, h: &Hosted) -> Vec<u64> {
        let me = self.me();
        let metrics = h.raft.metrics();
        let m = metrics.borrow();
        let voters = m.membership_config.membership().voter_ids();
        voters.filter(|&n| n != me).collect()
    }

    /// Acknowledges (`nack`: gives back after the delay) deliveries of `group` on `topic`, at
    /// the node leading it; returns once durable there, with whether each id applied.
    pub async fn settle(
        &self,
        group: &str,
        topic: &str,
        ids: &[String],
        nack: Option<Duration>,
    ) -> Result<Vec<bool>> {
        self.settle_at(group, topic, ids, nack, true).await
    }

    /// [`Consumers::settle`] here (`forward`: else at the node leading the group).
    async fn settle_at(
        &self,
        group: &str,
        topic: &str,
        ids: &[String],
        nack: Option<Duration>,
        forward: bool,
    ) -> Result<Vec<bool>> {
        let parsed = Groups::parse_ids(ids)?;
        let h = self.entry(topic, group, None).await?;
        let led = h.led.borrow().clone();
        if let Some(g) = led {
            return self.settle_here(&h, &g, &parsed, nack).await;
        }
        if !forward {
            // Nothing done: the relaying node may ask the node that leads it.
            return Err(self.not_led(&h));
        }
        let req = settle_request(group, &h.topic.name, ids.to_vec(), nack);
        let answer = self
            .cluster
            .forwarder()
            .settle_remote(
                &h.name,
                self.leader_elsewhere(&h),
                &self.others(&h),
                req,
                self.cluster.write_timeout(),
            )
            .await
            .map_err(Error::Relayed)?;
        Ok(answer.applied)
    }

    /// The state of `group` on every topic it reads, each described by the node leading it.
    pub async fn describe_group(&self, group: &str) -> Result<Vec<GroupTopicDescription>> {
        let mut out = Vec::new();
        for (topic, _) in self.topics_of(group)? {
            out.push(self.describe(group, &topic).await?);
        }
        Ok(out)
    }

    /// The state of `group` on `topic`, as the node leading it has it.
    pub async fn describe(&self, group: &str, topic: &str) -> Result<GroupTopicDescription> {
        self.administer(group, topic, None, true).await
    }

    /// The consumer groups reading `topic` (this creation of it), as the catalog has them.
    pub fn groups_on(&self, topic: &Topic) -> Vec<String> {
        let catalog = self.cluster.catalog();
        let catalog = catalog.borrow();
        catalog
            .topics
            .get(&*topic.name)
            .filter(|t| t.config.incarnation == topic.config.incarnation)
            .map(|t| t.consumer_groups.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Moves `group`'s position on `topic` (see [`GroupTopic::reset_to`]), at the node leading
    /// it; returns once the reset is committed.
    pub async fn reset_group(&self, group: &str, topic: &str, reset: Reset) -> Result<()> {
        self.administer(group, topic, Some(reset), true).await?;
        Ok(())
    }

    /// Deletes `group` on every topic it reads: from the catalog (every node then stops its
    /// Raft group and deletes its state), refused while a member is connected to it through
    /// any node. Returns once this node has deleted its state.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        let on = self.topics_of(group)?;
        for (topic, _) in &on {
            let d = self.describe(group, topic).await?;
            if !d.members.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "group {group:?} has {} members connected to {topic:?}",
                    d.members.len()
                )));
            }
        }
        let ids: std::collections::BTreeMap<String, u64> = on.into_iter().collect();
        let gone = |c: &Catalog| {
            ids.iter().all(|(topic, &id)| {
                c.topics
                    .get(topic)
                    .and_then(|t| t.consumer_groups.get(group))
                    .is_none_or(|g| g.id != id)
            })
        };
        let command = Command::DeleteGroup {
            group: group.to_string(),
            ids: ids.clone(),
        };
        self.cluster.commit_to_catalog(command, gone).await?;
        // This node's reconciliation follows the catalog: until it has let the group go here.
        let deadline = tokio::time::Instant::now() + self.cluster.write_timeout();
        let names: Vec<String> = ids
            .iter()
            .map(|(topic, &id)| consumer_group_name(topic, group, id))
            .collect();
        while names.iter().any(|n| self.hosted().contains_key(n)) {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Unavailable(format!(
                    "consumer group {group:?} was deleted in the cluster; this node has not \
                     removed its state yet"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(group, "group deleted in the cluster");
        Ok(())
    }

    /// The topics `group` reads, as the catalog has them, each with the group's id there.
    fn topics_of(&self, group: &str) -> Result<Vec<(String, u64)>> {
        validate_group_name(group)?;
        let catalog = self.cluster.catalog();
        let catalog = catalog.borrow();
        let on: Vec<(String, u64)> = catalog
            .topics
            .iter()
            .filter_map(|(t, entry)| Some((t.clone(), entry.consumer_groups.get(group)?.id)))
            .collect();
        if on.is_empty() {
            return Err(storage::Error::GroupNotFound(group.to_string()).into());
        }
        Ok(on)
    }

    /// Describes `group` on `topic` (resetting it first when `reset` is given) here when this
    /// node leads it; else (`forward`) at the node that does.
    async fn administer(
        &self,
        group: &str,
        topic: &str,
        reset: Option<Reset>,
        forward: bool,
    ) -> Result<GroupTopicDescription> {
        let h = self.entry(topic, group, None).await?;
        let led = h.led.borrow().clone();
        if let Some(g) = led {
            if let Some(r) = reset {
                g.reset_to(&r.partitions, r.to, r.force).await?;
            }
            return Ok(g.describe());
        }
        if !forward {
            return Err(self.not_led(&h));
        }
        let req = pb::AdministerGroupRequest {
            group: group.to_string(),
            topic: h.topic.name.to_string(),
            reset: reset.map(Reset::into_request),
        };
        let answer = self
            .cluster
            .forwarder()
            .administer_remote(
                &h.name,
                self.leader_elsewhere(&h),
                &self.others(&h),
                req,
                self.cluster.write_timeout(),
            )
            .await
            .map_err(Error::Relayed)?;
        serde_json::from_slice(&answer.description)
            .map_err(|e| Error::Internal(format!("a group's description from its leader: {e}")))
    }

    /// For an admin call relayed here: describes (and resets) `group` on `topic`, which this
    /// node must lead; the description as JSON.
    pub async fn administer_led(
        &self,
        group: &str,
        topic: &str,
        reset: Option<pb::GroupReset>,
    ) -> Result<Vec<u8>> {
        let reset = reset.map(Reset::from_request).transpose()?;
        let d = self.administer(group, topic, reset, false).await?;
        serde_json::to_vec(&d).map_err(|e| Error::Internal(e.to_string()))
    }

    /// Refuses a call for `h`'s group here, doing nothing: the caller may ask the leader.
    fn not_led(&self, h: &Hosted) -> Error {
        Error::NoLeader {
            what: format!("consumer group {:?} on {:?}", h.group, &*h.topic.name),
            leader: self
                .leader_elsewhere(h)
                .map(|id| (id, self.cluster.forwarder().peers().addr(id, ""))),
        }
    }

    /// For a member relayed here: joins `group` on `topic`, which this node must lead.
    pub fn join_led(
        &self,
        group: &str,
        topic: &str,
        membership: Membership,
        via: Option<u64>,
    ) -> Result<(MemberGuard, mpsc::Receiver<DeliveryBatch>)> {
        self.led(group, topic)?.join_via(membership, via)
    }

    /// For acks relayed here: settles deliveries of `group` on `topic`, which this node must
    /// lead (see [`Consumers::settle`]).
    pub async fn settle_led(
        &self,
        group: &str,
        topic: &str,
        ids: &[String],
        nack: Option<Duration>,
    ) -> Result<Vec<bool>> {
        self.settle_at(group, topic, ids, nack, false).await
    }

    /// Acknowledges (`nack`: gives back after the delay) deliveries of `h`'s group, led here
    /// as `g`. An id is answered as not in flight only once a majority has confirmed that this
    /// node still leads: one deposed and not aware of it yet (paused, cut off) holds an old
    /// state, in which a delivery the new leader made is unknown.
    async fn settle_here(
        &self,
        h: &Hosted,
        g: &GroupTopic,
        ids: &[(u32, u64)],
        nack: Option<Duration>,
    ) -> Result<Vec<bool>> {
        let applied = match nack {
            None => g.ack(ids).await?,
            Some(delay) => g.nack(ids, delay).await?,
        };
        if applied.iter().all(|&a| a) {
            return Ok(applied);
        }
        let deadline = self.cluster.write_timeout();
        match tokio::time::timeout(deadline, h.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(applied),
            _ => Err(Error::Unavailable(format!(
                "node {} may no longer lead consumer group {:?} on {:?}: which of these \
                 deliveries are in flight is not known here; retry",
                self.me(),
                h.group,
                &*h.topic.name
            ))),
        }
    }

    fn led(&self, group: &str, topic: &str) -> Result<Arc<GroupTopic>> {
        self.groups.led(group, topic).ok_or_else(|| {
            Error::Unavailable(format!(
                "node {} does not lead consumer group {group:?} on {topic:?}",
                self.me()
            ))
        })
    }
}

/// What the task that leads a hosted group needs of [`Consumers`].
struct ConsumersRef {
    groups: Arc<Groups>,
    cluster: Arc<Cluster>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl ConsumersRef {
    /// Runs `h`'s group whenever this node leads its Raft group and has applied its own
    /// term's first entry; stops it when this node no longer leads (or a proposal fails).
    async fn lead(&self, me: u64, h: Arc<Hosted>) {
        let mut metrics = h.raft.metrics();
        let (lease, heartbeat) = self.cluster.lease();
        // Leads, has applied its own term's first entry (so every earlier one) and every
        // entry it holds: an earlier instance of the group here may have left entries whose
        // outcome was unknown, and the log is replayed only once they are decided.
        let leads = |m: &RaftMetrics| {
            m.current_leader == Some(me)
                && m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term)
                && m.last_applied.map(|l| l.index) >= m.last_log_index
                && acknowledged(m, lease)
        };
        loop {
            tokio::select! {
                r = metrics.wait_for(leads) => if r.is_err() { return },
                () = h.stop.cancelled() => return,
                () = self.shutdown.cancelled() => return,
            }
            let term = metrics.borrow().current_term;
            let events = RaftEvents::start(&self.cluster, &h, &self.tasks);
            let opening = Opening::Replicated {
                log: Arc::clone(&h.log),
                events: Arc::clone(&events) as Arc<dyn ReplicatedEvents>,
            };
            let starts = h.starts.clone();
            let start = move |p: u32| starts.get(p as usize).copied().unwrap_or(0);
            let opened = GroupTopic::open(
                &h.group,
                Arc::clone(&h.topic),
                opening,
                self.groups.provided(),
                start,
            )
            .await;
            let g = match opened {
                Ok(g) => g,
                Err(e) => {
                    events.close().await;
                    tracing::error!(group = %h.group, topic = %h.topic.name, error = %e, "cannot open the consumer group this node leads; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => continue,
                        () = h.stop.cancelled() => return,
                        () = self.shutdown.cancelled() => return,
                    }
                }
            };
            self.groups.install(&g);
            g.start();
            h.led.send_replace(Some(Arc::clone(&g)));
            tracing::info!(group = %h.group, topic = %h.topic.name, term, "this node leads the consumer group");
            // Until another node leads, or this one has not heard from a majority for a lease
            // (cut off: the others may lead by now, and nothing it proposes commits).
            // openraft computes the time since the last acknowledgement when it publishes its
            // metrics, which it may not do for a while when nothing reaches it: the lease is
            // timed here, from the last publication.
            let deposed = async {
                let mut acked_at = quorum_acked_at(&metrics.borrow_and_update());
                loop {
                    let gone = {
                        let m = metrics.borrow();
                        m.current_leader != Some(me) || m.current_term != term
                    };
                    if gone || acked_at.is_none_or(|t| t.elapsed() > lease) {
                        return;
                    }
                    tokio::select! {
                        r = metrics.changed() => {
                            if r.is_err() {
                                return;
                            }
                            acked_at = quorum_acked_at(&metrics.borrow_and_update());
                        }
                        () = tokio::time::sleep(heartbeat) => {}
                    }
                }
            };
            let mut moving = None;
            tokio::select! {
                () = deposed => {}
                to = members_elsewhere(&g, me, &h.raft, lease) => moving = Some(to),
                () = g.stop.cancelled() => {}
                () = h.stop.cancelled() => {}
                () = self.shutdown.cancelled() => {}
            }
            h.led.send_replace(None);
            self.groups.uninstall(&g);
            let (group, topic) = (&h.group, &*h.topic.name);
            g.end(match moving {
                Some(to) => format!(
                    "consumer group {group:?} on {topic:?} moves to node {to}, where most of its \
                     members are connected; subscribe again"
                ),
                None => format!(
                    "node {me} no longer leads consumer group {group:?} on {topic:?}; subscribe again"
                ),
            });
            events.close().await;
            if h.stop.is_cancelled() || self.shutdown.is_cancelled() {
                return;
            }
            if let Some(to) = moving {
                // The group stopped here first, so no event is proposed while `to` catches up.
                match self.cluster.transfer_led(&h.name, &h.raft, to).await {
                    Ok(_) => {
                        tracing::info!(
                            group,
                            topic,
                            to,
                            "consumer group moved to the node most of its members are on"
                        )
                    }
                    Err(e) => {
                        tracing::warn!(group, topic, to, error = %e, "consumer group not moved; it runs here again")
                    }
                }
            }
        }
    }
}

/// Resolves with the node most of `g`'s members are connected to, once it is another node
/// with more of them than this one (`me`, leading `raft`'s group) and has stayed so at two
/// looks `every` apart (a member passing through does not move the group); never otherwise.
async fn members_elsewhere(
    g: &GroupTopic,
    me: u64,
    raft: &Raft<PartitionRaft>,
    every: Duration,
) -> u64 {
    let mut seen = None;
    loop {
        tokio::time::sleep(every).await;
        let voters: Vec<u64> = {
            let m = raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().voter_ids().collect()
        };
        let home = balance::group_home(me, &g.members_by_node(), &voters);
        if let Some(to) = home
            && seen == home
        {
            return to;
        }
        seen = home;
    }
}

/// A reset of a consumer group's position: the partitions (all when empty), where to, and
/// whether even with members connected.
#[derive(Debug, Clone)]
pub struct Reset {
    pub partitions: Vec<u32>,
    pub to: Start,
    pub force: bool,
}

impl Reset {
    fn into_request(self) -> pb::GroupReset {
        use pb::group_reset::To;
        let to = match self.to {
            Start::Earliest => To::Earliest(true),
            Start::Latest => To::Latest(true),
            Start::Offset(o) => To::Offset(o),
            Start::Timestamp(t) => To::TimestampMs(t),
        };
        pb::GroupReset {
            partitions: self.partitions,
            to: Some(to),
            force: self.force,
        }
    }

    fn from_request(r: pb::GroupReset) -> Result<Reset> {
        use pb::group_reset::To;
        let to = match r.to {
            Some(To::Earliest(_)) => Start::Earliest,
            Some(To::Latest(_)) => Start::Latest,
            Some(To::Offset(o)) => Start::Offset(o),
            Some(To::TimestampMs(t)) => Start::Timestamp(t),
            None => return Err(Error::InvalidArgument("a reset without a position".into())),
        };
        Ok(Reset {
            partitions: r.partitions,
            to,
            force: r.force,
        })
    }
}

/// Whether the catalog has consumer group `group` on this creation of `topic` as the creation
/// with id `id`.
fn catalog_holds(catalog: &Catalog, topic: &Topic, group: &str, id: u64) -> bool {
    catalog.topics.get(&*topic.name).is_some_and(|t| {
        t.config.incarnation == topic.config.incarnation
            && t.consumer_groups.get(group).is_some_and(|g| g.id == id)
    })
}

type RaftMetrics = openraft::RaftMetrics<u64, openraft::BasicNode>;

/// The leader of `raft`'s group as this node (`me`) knows it, when another node.
fn leader_other_than(raft: &Raft<PartitionRaft>, me: u64) -> Option<u64> {
    raft.metrics().borrow().current_leader.filter(|&l| l != me)
}

/// An ack (`nack`: a nack with its delay) of `ack_ids` as the cluster port's `Settle` takes it.
fn settle_request(
    group: &str,
    topic: &str,
    ack_ids: Vec<String>,
    nack: Option<Duration>,
) -> pb::SettleRequest {
    pb::SettleRequest {
        group: group.to_string(),
        topic: topic.to_string(),
        ack_ids,
        nack: nack.is_some(),
        delay_ms: nack.map_or(0, |d| d.as_millis() as u64),
    }
}

/// When this node, leading, last heard from a majority, as `m` says as it is read.
fn quorum_acked_at(m: &RaftMetrics) -> Option<std::time::Instant> {
    let ms = m.millis_since_quorum_ack?;
    std::time::Instant::now().checked_sub(Duration::from_millis(ms))
}

/// Whether this node, leading, has heard from a majority within `lease`.
fn acknowledged(m: &RaftMetrics, lease: Duration) -> bool {
    m.millis_since_quorum_ack
        .is_some_and(|ms| u128::from(ms) <= lease.as_millis())
}

/// A group's events proposed through its Raft group by its leader, in order, up to
/// [`EVENT_ENTRIES_IN_FLIGHT`] entries at a time (whatever waits meanwhile goes into the next
/// entry); see [`ReplicatedEvents`]. Entries handed to the Raft core one after another are
/// appended in that order, and a later one is committed only with every one before it. After a
/// proposal fails, every later one fails too: the log would no longer hold the events in the
/// order the group made them.
#[derive(Debug)]
struct RaftEvents {
    queue: mpsc::UnboundedSender<Queued>,
    trims: mpsc::UnboundedSender<u64>,
    closed: CancellationToken,
    /// The proposing task, which ends once its last proposal is decided.
    proposer: TaskTracker,
}

struct Queued {
    batch: Bytes,
    /// Offsets its records take.
    span: u64,
    then: Then,
}

impl RaftEvents {
    fn start(cluster: &Arc<Cluster>, h: &Arc<Hosted>, tasks: &TaskTracker) -> Arc<RaftEvents> {
        let (queue, queued) = mpsc::unbounded_channel();
        let (trims, trimming) = mpsc::unbounded_channel();
        let closed = CancellationToken::new();
        let proposer = TaskTracker::new();
        let (submitted, resolving) = mpsc::channel(EVENT_ENTRIES_IN_FLIGHT - 1);
        let failed = Arc::new(Mutex::new(None));
        proposer.spawn(tasks.track_future(proposing(
            Arc::clone(cluster),
            Arc::clone(h),
            queued,
            submitted,
            Arc::clone(&failed),
            closed.clone(),
        )));
        proposer.spawn(tasks.track_future(resolving_events(
            Arc::clone(cluster),
            Arc::clone(h),
            resolving,
            failed,
        )));
        proposer.close();
        tasks.spawn(trimming_below(
            Arc::clone(cluster),
            Arc::clone(h),
            trimming,
            closed.clone(),
        ));
        Arc::new(RaftEvents {
            queue,
            trims,
            closed,
            proposer,
        })
    }

    /// Fails whatever is proposed from now on; returns once the proposal under way, if any,
    /// is decided (in the log, or refused), so that a replay after it sees all this group
    /// instance wrote.
    async fn close(&self) {
        self.closed.cancel();
        self.proposer.wait().await;
    }
}

impl ReplicatedEvents for RaftEvents {
    fn append(&self, batch: Bytes, then: Then) {
        let span = BatchHeader::of_proposal(&batch).map_or(0, |h| u64::from(h.record_count));
        if let Err(refused) = self.queue.send(Queued { batch, span, then }) {
            (refused.0.then)(Err(Error::Unavailable(
                "the consumer group stopped on this node".into(),
            )));
        }
    }

    fn drop_below(&self, offset: u64) {
        let _ = self.trims.send(offset);
    }
}

/// Entries of a group's events handed to its Raft core at once, waiting to be committed.
const EVENT_ENTRIES_IN_FLIGHT: usize = 4;

/// A submitted entry of events: what it holds, and when its outcome is due.
struct InFlight {
    submitted: Result<Submitted, WriteError>,
    until: tokio::time::Instant,
    taken: Vec<Queued>,
}

/// Merges the queued events into entries and hands them to the Raft core in order (waiting
/// while [`EVENT_ENTRIES_IN_FLIGHT`] are undecided); [`resolving_events`] answers them.
async fn proposing(
    cluster: Arc<Cluster>,
    h: Arc<Hosted>,
    mut queued: mpsc::UnboundedReceiver<Queued>,
    submitted: mpsc::Sender<InFlight>,
    failed: Arc<Mutex<Option<String>>>,
    closed: CancellationToken,
) {
    let what = format!("consumer group {:?} on {:?}", h.group, &*h.topic.name);
    loop {
        let first = tokio::select! {
            q = queued.recv() => match q { Some(q) => q, None => break },
            () = closed.cancelled() => break,
        };
        let mut bytes = first.batch.len();
        let mut taken = vec![first];
        while bytes < MERGED_BYTES {
            match queued.try_recv() {
                Ok(q) => {
                    bytes += q.batch.len();
                    taken.push(q);
                }
                Err(_) => break,
            }
        }
        let why = failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(why) = why {
            for q in taken {
                (q.then)(Err(Error::Unavailable(why.clone())));
            }
            continue;
        }
        let parts: Vec<Bytes> = taken.iter().map(|q| q.batch.clone()).collect();
        let merged = EncodedBatch::merged_proposal(&parts);
        let entry = match merged {
            Ok(merged) => submit(&h.raft, Proposal::Records(merged)).await,
            Err(why) => Err(WriteError::Stopped(format!(
                "{what}: events do not merge: {why}"
            ))),
        };
        let flight = InFlight {
            submitted: entry,
            until: tokio::time::Instant::now() + cluster.write_timeout(),
            taken,
        };
        // Waits while the Raft core holds as many as it may.
        if let Err(refused) = submitted.send(flight).await {
            for q in refused.0.taken {
                (q.then)(Err(Error::Unavailable(format!(
                    "{what} stopped on this node"
                ))));
            }
            break;
        }
    }
    queued.close();
    while let Ok(q) = queued.try_recv() {
        (q.then)(Err(Error::Unavailable(format!(
            "{what} stopped on this node"
        ))));
    }
}

/// Answers each submitted entry's events in order once its outcome is known; after the first
/// that fails, fails every later one (see [`RaftEvents`]).
async fn resolving_events(
    cluster: Arc<Cluster>,
    h: Arc<Hosted>,
    mut submitted: mpsc::Receiver<InFlight>,
    failed: Arc<Mutex<Option<String>>>,
) {
    let what = format!("consumer group {:?} on {:?}", h.group, &*h.topic.name);
    let peers = cluster.forwarder().peers().clone();
    let deadline = cluster.write_timeout();
    while let Some(flight) = submitted.recv().await {
        let result = match flight.submitted {
            Ok(entry) => outcome(entry, flight.until, deadline, &peers).await,
            Err(e) => Err(e),
        };
        let earlier = failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match (result, earlier) {
            (Ok(applied), None) => {
                let mut base = applied.offsets.map_or(0, |(base, _)| base);
                for q in flight.taken {
                    (q.then)(Ok(base));
                    base += q.span;
                }
            }
            (_, Some(why)) => {
                for q in flight.taken {
                    (q.then)(Err(Error::Unavailable(why.clone())));
                }
            }
            (Err(e), None) => {
                let why = Error::not_written(&what, e).to_string();
                for q in flight.taken {
                    (q.then)(Err(Error::Unavailable(why.clone())));
                }
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            }
        }
    }
}

/// Drops, on every replica, the events below each snapshot (from the start of the entry that
/// holds the snapshot's first event: an entry is dropped whole or not at all).
async fn trimming_below(
    cluster: Arc<Cluster>,
    h: Arc<Hosted>,
    mut trims: mpsc::UnboundedReceiver<u64>,
    closed: CancellationToken,
) {
    loop {
        let offset = tokio::select! {
            o = trims.recv() => match o { Some(o) => o, None => return },
            () = closed.cancelled() => return,
        };
        let log = Arc::clone(&h.log);
        let entry =
            blocking(move || Ok(log.read(offset, 1)?.first().map(|b| b.header().base_offset)))
                .await;
        let Ok(Some(start)) = entry else {
            continue;
        };
        if let Err(e) = cluster.trim_log(&h.raft, &h.name, &h.log, start).await {
            tracing::warn!(group = %h.name, error = %e, "cannot drop a consumer group's events before its snapshot");
        }
    }
}

/// The deliveries of a relayed member's response.
fn relayed_deliveries(response: pb::ConsumeResponse) -> DeliveryBatch {
    let mut out = Vec::with_capacity(response.deliveries.len());
    for d in response.deliveries {
        let bad =
            |why: &dyn std::fmt::Display| Error::Internal(format!("a relayed delivery: {why}"));
        let batch = match Batch::decode(&d.record) {
            Decoded::Valid(b) => b,
            Decoded::Torn { .. } => return Err(bad(&"cut short")),
            Decoded::Corrupt(why) => return Err(bad(&why)),
        };
        let record = batch
            .records()
            .next()
            .ok_or_else(|| bad(&"no record"))?
            .map_err(|e| bad(&e))?;
        out.push(Delivery {
            partition: d.partition,
            ack_id: ack_id(d.partition, record.offset),
            record,
            attempt: d.attempt,
        });
    }
    Ok(Deliveries::Records(out))
}

/// A delivery as the cluster port's `Consume` carries it.
pub fn relayed_delivery(d: Delivery) -> pb::RelayedDelivery {
    let offset = d.record.offset;
    let mut batch = EncodedBatch::new(&[d.record.into()]);
    pb::RelayedDelivery {
        partition: d.partition,
        attempt: d.attempt,
        record: Bytes::copy_from_slice(batch.seal(offset)),
    }
}
