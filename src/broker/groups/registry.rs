//! The broker's consumer groups: the map of open groups (each opened once, in its own cell),
//! the settings every group gets, and the calls that name a group (join, ack, nack, describe,
//! reset, delete). A group is opened on first use and replayed from its event log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::blocking::blocking;
use crate::broker::error::{Error, Result};
use crate::broker::message::{DeliveryBatch, Start};
use crate::broker::send::DeadLetterAppender;
use crate::broker::topics::Topics;
use crate::replication::write::Forwarder;
use crate::storage::{self, validate_group_name};

use super::group::{GroupSettings, GroupTopic, GroupTopicDescription, Provided, parse_ack_id};
use super::members::{MemberGuard, Membership};
use super::replay::Opening;

/// A consumer group's slot: empty while it is being opened.
type GroupCell = Arc<tokio::sync::OnceCell<Arc<GroupTopic>>>;

/// Every open consumer group of a broker, by (group, topic).
#[derive(Debug)]
pub struct Groups {
    topics: Arc<Topics>,
    settings: GroupSettings,
    /// Each group opens once, in its own cell, so that opening or replaying one group never
    /// holds up another (the map's lock is never held across an `.await`).
    map: std::sync::Mutex<HashMap<(String, String), GroupCell>>,
    dead_letters: DeadLetterAppender,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Cluster mode: the map holds only the groups this node leads, installed and removed by
    /// the cluster layer as leadership comes and goes; nothing is opened here on demand (the
    /// event logs are Raft logs, written through their groups).
    led_only: bool,
    /// Cluster mode: how partitions this node holds no replica of are read.
    remote: Option<Arc<Forwarder>>,
}

impl Groups {
    pub fn new(
        topics: Arc<Topics>,
        settings: GroupSettings,
        dead_letters: DeadLetterAppender,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Groups {
        Groups {
            topics,
            settings,
            map: std::sync::Mutex::new(HashMap::new()),
            dead_letters,
            tasks,
            shutdown,
            led_only: false,
            remote: None,
        }
    }

    /// Cluster mode: groups are led, not opened, here (see [`Groups::install`]); partitions
    /// this node holds no replica of are read through `remote`.
    pub fn led_only(mut self, remote: Arc<Forwarder>) -> Groups {
        self.led_only = true;
        self.remote = Some(remote);
        self
    }

    /// What every group opened here gets.
    pub fn provided(&self) -> Provided {
        Provided {
            settings: self.settings.clone(),
            dead_letters: self.dead_letters.clone(),
            tasks: self.tasks.clone(),
            remote: self.remote.clone(),
        }
    }

    /// Cluster mode: `g` is led here from now on (its members join it here).
    pub fn install(&self, g: &Arc<GroupTopic>) {
        let key = (g.group.clone(), g.topic.name.to_string());
        let cell = tokio::sync::OnceCell::new_with(Some(Arc::clone(g)));
        self.map().insert(key, Arc::new(cell));
    }

    /// Cluster mode: `g` is no longer led here.
    pub fn uninstall(&self, g: &Arc<GroupTopic>) {
        let key = (g.group.clone(), g.topic.name.to_string());
        let mut map = self.map();
        if map
            .get(&key)
            .and_then(|cell| cell.get())
            .is_some_and(|led| Arc::ptr_eq(led, g))
        {
            map.remove(&key);
        }
    }

    /// Cluster mode: the group led here, if it is.
    pub fn led(&self, group: &str, topic: &str) -> Option<Arc<GroupTopic>> {
        let key = (group.to_string(), topic.to_string());
        self.map().get(&key).and_then(|cell| cell.get().cloned())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), GroupCell>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the groups whose (group, topic) `chosen` accepts out of `map`: the opened ones.
    fn take(
        map: &mut HashMap<(String, String), GroupCell>,
        chosen: impl Fn(&(String, String)) -> bool,
    ) -> Vec<Arc<GroupTopic>> {
        let keys: Vec<_> = map.keys().filter(|k| chosen(k)).cloned().collect();
        keys.into_iter()
            .filter_map(|k| map.remove(&k))
            .filter_map(|cell| cell.get().cloned())
            .collect()
    }

    /// Takes the groups of `topic` out of the map (the topic is being deleted), closes them and
    /// deletes their state (blocking).
    pub fn forget_topic(&self, topic: &str) -> Result<()> {
        let doomed = Self::take(&mut self.map(), |(_, t)| t == topic);
        for g in &doomed {
            g.close();
        }
        let data = self.topics.data();
        for (group, topics) in data.list_groups()? {
            if topics.iter().any(|t| t == topic) {
                data.delete_group_state(&group, Some(topic))?;
            }
        }
        Ok(())
    }

    /// Takes every open group out of the map and stops its dispatcher (shutdown); the caller
    /// closes them once their tasks ended.
    pub fn stop_all(&self) -> Vec<Arc<GroupTopic>> {
        let groups = Self::take(&mut self.map(), |_| true);
        for g in &groups {
            g.stop.cancel();
        }
        groups
    }

    /// The open state of `group` on `topic`, opening it (and, for a new group, starting it at
    /// `start`) when needed.
    pub async fn group(&self, group: &str, topic: &str, start: Start) -> Result<Arc<GroupTopic>> {
        validate_group_name(group)?;
        let topic = self.topics.existing(topic)?;
        if self.led_only {
            return self.led(group, &topic.name).ok_or_else(|| {
                Error::Unavailable(format!(
                    "consumer group {group:?} on {:?} is not led by this node",
                    &*topic.name
                ))
            });
        }
        let key = (group.to_string(), topic.name.to_string());
        let cell = Arc::clone(self.map().entry(key).or_default());
        let g = cell
            .get_or_try_init(|| async {
                if self.shutdown.is_cancelled() {
                    return Err(Error::ShuttingDown);
                }
                let dir = self.topics.data().group_dir(group, &topic.name)?;
                // Where a new group starts; an existing one resumes where it was.
                let mut starts = Vec::new();
                if !dir.exists() {
                    for handle in &topic.partitions {
                        starts.push(handle.start_offset(start).await?);
                    }
                }
                let opening = Opening::Local {
                    dir,
                    io: Arc::clone(self.topics.data().io()),
                };
                let g = GroupTopic::open(
                    group,
                    Arc::clone(&topic),
                    opening,
                    self.provided(),
                    move |p| starts.get(p as usize).copied().unwrap_or(0),
                )
                .await?;
                g.start();
                Ok(g)
            })
            .await?;
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        Ok(Arc::clone(g))
    }

    /// Joins `group` on `topic` as a member.
    pub async fn subscribe_group(
        &self,
        topic: &str,
        group: &str,
        start: Start,
        membership: Membership,
    ) -> Result<(MemberGuard, mpsc::Receiver<DeliveryBatch>)> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        // Checked before the group is opened: a refused Subscribe creates nothing.
        self.settings.max_in_flight(membership.max_in_flight)?;
        self.group(group, topic, start).await?.join(membership)
    }

    /// The (partition, offset) of each ack id; none is an error.
    pub fn parse_ids(ids: &[String]) -> Result<Vec<(u32, u64)>> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument("no ack ids given".into()));
        }
        ids.iter().map(|id| parse_ack_id(id)).collect()
    }

    /// Acknowledges deliveries; returns once durable, with whether each id applied (false: it
    /// was not in flight or pending for this group).
    pub async fn ack(&self, group: &str, topic: &str, ids: &[String]) -> Result<Vec<bool>> {
        let ids = Self::parse_ids(ids)?;
        self.known_group(group, topic).await?.ack(&ids).await
    }

    /// Returns deliveries for redelivery after `delay`.
    pub async fn nack(
        &self,
        group: &str,
        topic: &str,
        ids: &[String],
        delay: Duration,
    ) -> Result<Vec<bool>> {
        let ids = Self::parse_ids(ids)?;
        self.known_group(group, topic)
            .await?
            .nack(&ids, delay)
            .await
    }

    /// A group that must exist already (acks for a group nobody joined are an error).
    async fn known_group(&self, group: &str, topic: &str) -> Result<Arc<GroupTopic>> {
        validate_group_name(group)?;
        let t = self.topics.existing(topic)?;
        if !self.topics.data().group_dir(group, &t.name)?.exists() {
            let reads = self
                .list_groups()?
                .into_iter()
                .find_map(|(g, topics)| (g == group).then_some(topics));
            return Err(match reads {
                Some(reads) if !reads.is_empty() => storage::Error::GroupNotOnTopic {
                    group: group.to_string(),
                    topic: t.name.to_string(),
                    reads,
                },
                _ => storage::Error::GroupNotFound(group.to_string()),
            }
            .into());
        }
        self.group(group, topic, Start::Earliest).await
    }

    /// Every group with the topics it has state for.
    pub fn list_groups(&self) -> Result<Vec<(String, Vec<String>)>> {
        Ok(self.topics.data().list_groups()?)
    }

    /// Every consumer group on every topic that exists, opened (replayed from its log) if it
    /// was not yet: what `/metrics` reports on. A group that cannot be opened is left out and
    /// logged.
    pub async fn all_groups(&self) -> Vec<Arc<GroupTopic>> {
        if self.led_only {
            let map = self.map();
            return map
                .values()
                .filter_map(|cell| cell.get().cloned())
                .collect();
        }
        let listed = match self.list_groups() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list consumer groups");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (group, topics) in listed {
            for topic in topics {
                if self.topics.get(&topic).is_none() {
                    continue;
                }
                match self.group(&group, &topic, Start::Earliest).await {
                    Ok(g) => out.push(g),
                    Err(e) => {
                        tracing::warn!(group, topic, error = %e, "cannot open consumer group");
                    }
                }
            }
        }
        out
    }

    /// The state of a group on each of its topics.
    pub async fn describe_group(&self, group: &str) -> Result<Vec<GroupTopicDescription>> {
        validate_group_name(group)?;
        let topics = self
            .list_groups()?
            .into_iter()
            .find(|(g, _)| g == group)
            .map(|(_, t)| t)
            .ok_or_else(|| storage::Error::GroupNotFound(group.to_string()))?;
        let mut out = Vec::new();
        for topic in topics {
            if self.topics.get(&topic).is_none() {
                continue;
            }
            out.push(self.group(group, &topic, Start::Earliest).await?.describe());
        }
        Ok(out)
    }

    /// Moves a group's position on a topic, in the chosen partitions (all when empty). Refused
    /// while members are connected unless `force`.
    pub async fn reset_group(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
        to: Start,
        force: bool,
    ) -> Result<()> {
        self.known_group(group, topic)
            .await?
            .reset_to(partitions, to, force)
            .await
    }

    /// Deletes a group's state on every topic. Refused while members are connected.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        validate_group_name(group)?;
        let doomed: Vec<_> = {
            let mut groups = self.map();
            for ((_, topic), cell) in groups.iter().filter(|((g, _), _)| g == group) {
                match cell.get() {
                    None => {
                        return Err(Error::FailedPrecondition(format!(
                            "group {group:?} is being opened on {topic:?}; try again"
                        )));
                    }
                    Some(g) if g.member_count() > 0 => {
                        return Err(Error::FailedPrecondition(format!(
                            "group {group:?} has members connected to {topic:?}"
                        )));
                    }
                    Some(_) => {}
                }
            }
            Self::take(&mut groups, |(g, _)| g == group)
        };
        let data = Arc::clone(self.topics.data());
        let owned = group.to_string();
        blocking(move || {
            for g in &doomed {
                g.close();
            }
            data.delete_group_state(&owned, None)?;
            Ok(())
        })
        .await?;
        tracing::info!(group, "group deleted");
        Ok(())
    }
}
