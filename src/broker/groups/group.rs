//! The handle of one group on one topic: its settings, its event log and in-memory state, the
//! calls that touch the whole group (reset, describe, close), and ack ids. Joining, dispatching,
//! dead-lettering and opening are in the files beside this one, as `impl GroupTopic` blocks on
//! this state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::error::{Error, Result};
use crate::broker::message::Start;
use crate::broker::remote::{self, RemoteLog};
use crate::broker::send::DeadLetterAppender;
use crate::broker::topic::{PartitionHandle, Topic};
use crate::replication::write::Forwarder;
use crate::storage::FsyncPolicy;
use crate::storage::StoredRecord;

use super::event_log::{EventLog, Then};
use super::events::Event;
use super::state::{State, lock};

/// Settings shared by every group of a broker.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub ack_timeout: Duration,
    pub max_deliveries: u32,
    pub max_in_flight_limit: usize,
    pub default_max_in_flight: usize,
    pub member_buffer: usize,
    pub fsync: FsyncPolicy,
}

/// What the registry gives every group it opens: the settings, where dead letters go, and the
/// tracker its tasks run on.
#[derive(Debug, Clone)]
pub struct Provided {
    pub settings: GroupSettings,
    pub dead_letters: DeadLetterAppender,
    pub tasks: TaskTracker,
    /// Cluster mode: how partitions this node holds no replica of are read.
    pub remote: Option<Arc<Forwarder>>,
}

impl GroupSettings {
    /// The in-flight limit a member asking for `asked` gets (0: the default), or why not.
    pub fn max_in_flight(&self, asked: usize) -> Result<usize> {
        match asked {
            0 => Ok(self.default_max_in_flight),
            n if n > self.max_in_flight_limit => Err(Error::InvalidArgument(format!(
                "max_in_flight {n} is over the broker's limit of {}",
                self.max_in_flight_limit
            ))),
            n => Ok(n),
        }
    }
}

/// One member's view of a partition in `describe`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupPartitionDescription {
    pub partition: u32,
    pub committed: u64,
    pub end: u64,
    pub lag: u64,
    pub in_flight: u64,
    pub pending: u64,
    pub redeliveries: u64,
    /// Deliveries whose ack timeout passed since the broker started.
    pub ack_timeouts: u64,
    pub dead_lettered: u64,
    pub owner: Option<u64>,
    /// Deliveries stopped at damage in the log: why (see `docs/operations.md`).
    pub blocked: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberDescription {
    pub id: u64,
    pub in_flight: u64,
    pub max_in_flight: u64,
    pub exclusive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupTopicDescription {
    pub group: String,
    pub topic: String,
    pub members: Vec<MemberDescription>,
    pub partitions: Vec<GroupPartitionDescription>,
}

/// A group's state for one topic, and its dispatcher.
pub struct GroupTopic {
    pub group: String,
    pub topic: Arc<Topic>,
    pub(super) log: EventLog,
    pub(super) state: Mutex<State>,
    pub(super) wake: Notify,
    pub(super) settings: GroupSettings,
    /// Where dead letters go.
    pub(super) dead_letters: DeadLetterAppender,
    /// Runs the dispatcher, the partition watchers and read-aheads.
    pub(super) tasks: TaskTracker,
    pub(crate) stop: CancellationToken,
    /// Why the group stopped here, when not for the broker's shutdown: its members hear it
    /// (`UNAVAILABLE`: worth subscribing again).
    pub(super) ended: Arc<Mutex<Option<String>>>,
    /// Bytes of events since the last snapshot.
    pub(super) since_snapshot: std::sync::atomic::AtomicU64,
    /// Cluster mode: how partitions this node holds no replica of are read.
    pub(super) remote: Option<Arc<Forwarder>>,
}

impl std::fmt::Debug for GroupTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupTopic")
            .field("group", &self.group)
            .field("topic", &self.topic.name)
            .finish_non_exhaustive()
    }
}

/// Parses an ack handle, `<partition>:<offset>`.
pub fn parse_ack_id(id: &str) -> Result<(u32, u64)> {
    let bad = || Error::InvalidArgument(format!("malformed ack id {id:?}"));
    let (p, o) = id.split_once(':').ok_or_else(bad)?;
    Ok((p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?))
}

/// The ack handle of a delivery, `<partition>:<offset>`.
pub fn ack_id(partition: u32, offset: u64) -> String {
    format!("{partition}:{offset}")
}

impl GroupTopic {
    /// Cluster mode: partition `p`, when this node holds no replica of it (read from the nodes
    /// that do; its local log is empty).
    pub(super) fn remote_log(&self, p: u32) -> Option<RemoteLog> {
        let forwarder = self.remote.as_ref()?;
        RemoteLog::of(
            &self.topic,
            self.topic.partitions.get(p as usize)?,
            forwarder,
        )
    }

    /// Whether partition `p` is read from other nodes ([`GroupTopic::remote_log`]).
    pub(super) fn is_remote(&self, p: u32) -> bool {
        self.remote.is_some()
            && self
                .topic
                .partitions
                .get(p as usize)
                .is_some_and(|h| h.remote.is_set())
    }

    /// The record at `offset` of partition `p`, from this node's copy or, cluster mode, from
    /// the nodes holding it ([`PartitionHandle::read_record`]).
    pub(super) async fn record_at(&self, p: u32, offset: u64) -> Result<Option<StoredRecord>> {
        match self.remote_log(p) {
            // Not waited for once the group stops (no holder may answer for a while).
            Some(remote) => tokio::select! {
                record = remote.record(offset) => record,
                () = self.stop.cancelled() => Err(Error::ShuttingDown),
            },
            None => self.handle(p)?.read_record(offset).await,
        }
    }

    /// Where a reader of partition `p` starting at `start` begins, as this node's copy or,
    /// cluster mode, a node holding it places it.
    pub(super) async fn start_offset(&self, p: u32, start: Start) -> Result<u64> {
        let forwarder = self.remote.as_ref();
        remote::start_offset(&self.topic, self.handle(p)?, forwarder, start).await
    }

    fn handle(&self, p: u32) -> Result<&Arc<PartitionHandle>> {
        self.topic
            .partitions
            .get(p as usize)
            .ok_or_else(|| Error::PartitionNotFound {
                topic: self.topic.name.to_string(),
                partition: p,
                count: self.topic.partitions.len() as u32,
            })
    }

    /// Starts the dispatcher and the partition watchers; they end with `stop`.
    pub(crate) fn start(self: &Arc<Self>) {
        let tracker = &self.tasks;
        for handle in &self.topic.partitions {
            let mut watch = handle.high_water.clone();
            let me = Arc::downgrade(self);
            let stop = self.stop.clone();
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        changed = watch.changed() => if changed.is_err() { return },
                        () = stop.cancelled() => return,
                    }
                    match me.upgrade() {
                        Some(g) => g.wake.notify_one(),
                        None => return,
                    }
                }
            });
        }
        let me = Arc::clone(self);
        tracker.spawn(async move { me.run().await });
    }

    /// Appends events to the group log, in the order of calls; the receiver says when they are
    /// durable (on a cluster: committed).
    pub(super) fn append(&self, events: &[Event]) -> oneshot::Receiver<Result<u64>> {
        self.append_with(events, true)
    }

    /// [`GroupTopic::append`]; when not `durable`, the events are synced by the next durable
    /// append instead of one of their own (delivery records on one node: they only keep
    /// attempt counts).
    pub(super) fn append_with(
        &self,
        events: &[Event],
        durable: bool,
    ) -> oneshot::Receiver<Result<u64>> {
        let (tx, rx) = oneshot::channel();
        self.append_inner(
            events,
            durable,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx
    }

    /// [`GroupTopic::append`], then `then` (see [`EventLog::append`]).
    pub(super) fn append_then(&self, events: &[Event], then: Then) {
        self.append_inner(events, true, then);
    }

    fn append_inner(&self, events: &[Event], durable: bool, then: Then) {
        let then: Then = match self.log.is_replicated() {
            // On a cluster, an event not committed leaves this node's state ahead of the log:
            // the group stops here, and whoever leads it next replays the log.
            true => {
                let ending = self.ending();
                Box::new(move |r| {
                    if let Err(e) = &r {
                        ending(format!("its event log took no more events here: {e}"));
                    }
                    then(r);
                })
            }
            false => then,
        };
        let bytes = self.log.append(events, durable, then);
        self.since_snapshot
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops the group here for `why` (its members hear it): another node leads it now.
    pub(crate) fn end(&self, why: String) {
        self.ending()(why);
    }

    fn ending(&self) -> impl Fn(String) + Send + 'static {
        let (ended, stop) = (Arc::clone(&self.ended), self.stop.clone());
        let (group, topic) = (self.group.clone(), Arc::clone(&self.topic.name));
        move |why| {
            let mut ended = ended.lock().unwrap_or_else(|p| p.into_inner());
            if ended.is_none() && !stop.is_cancelled() {
                tracing::info!(%group, %topic, reason = %why, "consumer group stops here");
                *ended = Some(why);
            }
            drop(ended);
            stop.cancel();
        }
    }

    pub(super) fn check_partitions(&self, partitions: impl IntoIterator<Item = u32>) -> Result<()> {
        let n = self.topic.partitions.len() as u32;
        match partitions.into_iter().find(|&p| p >= n) {
            Some(p) => Err(Error::PartitionNotFound {
                topic: self.topic.name.to_string(),
                partition: p,
                count: n,
            }),
            None => Ok(()),
        }
    }

    /// A member took deliveries from its channel: there may be room for more.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    pub fn member_count(&self) -> usize {
        lock(&self.state).members.len()
    }

    /// How many members are connected to each node of a cluster (`None`: this node).
    pub fn members_by_node(&self) -> BTreeMap<Option<u64>, usize> {
        let mut by_node = BTreeMap::new();
        for m in lock(&self.state).members.values() {
            *by_node.entry(m.via).or_default() += 1;
        }
        by_node
    }

    /// Moves the chosen partitions (all when `only` is empty) to `to`, as this node's copy of
    /// each partition places it. Refused while members are connected unless `force`.
    pub async fn reset_to(&self, only: &[u32], to: Start, force: bool) -> Result<()> {
        let members = self.member_count();
        if !force && members > 0 {
            return Err(Error::FailedPrecondition(format!(
                "group {:?} has {members} members connected to {:?}; stop them or force the reset",
                self.group, &*self.topic.name
            )));
        }
        // Unknown partitions are refused by `reset`, before anything changes.
        let mut cursors = Vec::new();
        for handle in &self.topic.partitions {
            let chosen = only.is_empty() || only.contains(&handle.id);
            cursors.push(if chosen {
                self.start_offset(handle.id, to).await?
            } else {
                0
            });
        }
        self.reset(only, |p| cursors.get(p as usize).copied().unwrap_or(0))
            .await?;
        tracing::info!(group = %self.group, topic = %self.topic.name, partitions = ?only, ?to, "group reset");
        Ok(())
    }

    /// Moves the chosen partitions (all when `only` is empty) to `cursor(p)`, abandoning what
    /// is outstanding there, and unblocking them if damage had stopped them.
    async fn reset(&self, only: &[u32], cursor: impl Fn(u32) -> u64) -> Result<()> {
        self.check_partitions(only.iter().copied())?;
        let chosen = |p: u32| only.is_empty() || only.contains(&p);
        let done = {
            let mut st = lock(&self.state);
            let State {
                parts,
                members,
                timeouts,
                ..
            } = &mut *st;
            timeouts.retain(|&(_, p, _)| !chosen(p));
            for (p, part) in parts.iter().enumerate() {
                if !chosen(p as u32) {
                    continue;
                }
                for f in part.in_flight.values() {
                    if let Some(m) = members.get_mut(&f.member) {
                        m.landed(f);
                    }
                }
            }
            let mut events = Vec::new();
            for (p, part) in parts.iter_mut().enumerate() {
                if !chosen(p as u32) {
                    continue;
                }
                let c = cursor(p as u32);
                let owner = part.owner;
                part.reset(c);
                part.owner = owner;
                events.push(Event::Reset {
                    partition: p as u32,
                    cursor: c,
                });
            }
            self.append(&events)
        };
        wait(done).await?;
        self.wake.notify_one();
        Ok(())
    }

    pub fn describe(&self) -> GroupTopicDescription {
        let st = lock(&self.state);
        GroupTopicDescription {
            group: self.group.clone(),
            topic: self.topic.name.to_string(),
            members: st
                .members
                .iter()
                .map(|(&id, m)| MemberDescription {
                    id,
                    in_flight: m.in_flight as u64,
                    max_in_flight: m.max_in_flight as u64,
                    exclusive: m.exclusive,
                })
                .collect(),
            partitions: st
                .parts
                .iter()
                .enumerate()
                .map(|(p, part)| {
                    let end = match self.is_remote(p as u32) {
                        true => part.remote_end,
                        false => self.topic.partitions[p].log.high_water(),
                    };
                    let committed = part.committed();
                    GroupPartitionDescription {
                        partition: p as u32,
                        committed,
                        end,
                        lag: end.saturating_sub(committed),
                        in_flight: part.in_flight.len() as u64,
                        pending: (part.pending.len() + part.dead_lettering.len()) as u64,
                        redeliveries: part.redeliveries,
                        ack_timeouts: part.ack_timeouts,
                        dead_lettered: part.dead_lettered,
                        owner: part.owner,
                        blocked: part.blocked.as_ref().map(|b| b.why.clone()),
                    }
                })
                .collect(),
        }
    }

    /// Stops the dispatcher and closes the group log cleanly (blocking).
    pub(crate) fn close(&self) {
        self.stop.cancel();
        if let Err(e) = self.log.close() {
            tracing::warn!(group = %self.group, error = %e, "group log did not close cleanly");
        }
    }
}

/// Waits until an append to the group log is durable.
pub(super) async fn wait(done: oneshot::Receiver<Result<u64>>) -> Result<()> {
    done.await
        .map_err(|_| Error::Internal("group log writer went away".into()))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_ids_read_back_as_the_partition_and_offset_they_name() {
        for (p, o) in [(0, 0), (7, 10), (u32::MAX, u64::MAX), (12, 1_000_000_007)] {
            let id = ack_id(p, o);
            assert_eq!(id, format!("{p}:{o}"));
            assert_eq!(parse_ack_id(&id).ok(), Some((p, o)));
        }
        assert!(parse_ack_id("3").is_err());
        assert!(parse_ack_id("a:1").is_err());
    }
}
