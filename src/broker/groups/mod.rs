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

pub mod events;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::storage::{
    self, EncodedBatch, FileIo, FsyncPolicy, Header, LogConfig, Partition, Record, StoredRecord,
};

use self::events::{DeadLetter, Event, PartitionSnapshot, Reason};
use super::error::{Error, Result};
use super::{Broker, Deliveries, Delivery, DeliveryBatch, NewMessage, Topic};

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

/// Headers a dead-lettered message carries, besides its own.
pub const DLQ_GROUP: &str = "sluice.dlq.group";
pub const DLQ_TOPIC: &str = "sluice.dlq.topic";
pub const DLQ_PARTITION: &str = "sluice.dlq.partition";
pub const DLQ_OFFSET: &str = "sluice.dlq.offset";
pub const DLQ_ATTEMPTS: &str = "sluice.dlq.attempts";
pub const DLQ_REASON: &str = "sluice.dlq.reason";

/// The dead-letter topic of a topic.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Snapshot the state once this many bytes of events were written since the last one.
const SNAPSHOT_EVERY_BYTES: u64 = 1 << 20;
/// Bytes read from a partition per look-ahead refill.
const READ_AHEAD_BYTES: usize = 256 << 10;
/// Deliveries handed to one member per round, so that members take turns.
const ROUND_QUOTA: usize = 512;

#[derive(Debug)]
struct Flight {
    member: u64,
    deadline: Instant,
    /// The attempt this delivery is; it counts only once `handed`.
    attempt: u32,
    /// Handed to the member's transport (see [`GroupTopic::hand_over`]).
    handed: bool,
}

/// Longest delay a Nack may ask for.
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(3600);

#[derive(Debug)]
struct Pending {
    not_before: Instant,
    /// Attempts handed so far.
    attempt: u32,
}

#[derive(Debug, Default)]
struct PState {
    cursor: u64,
    in_flight: BTreeMap<u64, Flight>,
    pending: BTreeMap<u64, Pending>,
    /// Records fetched for due pending offsets, ready to go out again.
    ready: BTreeMap<u64, StoredRecord>,
    /// Dead letters not yet finished; `false` until the dispatcher has started on it.
    dead_lettering: BTreeMap<u64, (DeadLetter, bool)>,
    /// Records read at or after `cursor`, not yet delivered.
    lookahead: VecDeque<StoredRecord>,
    /// Key and value bytes in `lookahead`.
    lookahead_bytes: usize,
    /// Next offset to read into `lookahead`.
    read_pos: u64,
    /// A read into `lookahead` from this offset is under way.
    reading: Option<u64>,
    owner: Option<u64>,
    redeliveries: u64,
    dead_lettered: u64,
    /// Reads stopped at a damaged batch: why. Cleared by a reset.
    blocked: Option<String>,
}

impl PState {
    fn committed(&self) -> u64 {
        [
            self.in_flight.keys().next(),
            self.pending.keys().next(),
            self.dead_lettering.keys().next(),
        ]
        .into_iter()
        .flatten()
        .copied()
        .fold(self.cursor, u64::min)
    }

    /// Waiting for redelivery no sooner than `not_before`, after `attempts` handed.
    fn retry(&mut self, offset: u64, attempts: u32, not_before: Instant) {
        let pending = Pending {
            not_before,
            attempt: attempts,
        };
        self.pending.insert(offset, pending);
    }

    /// To be dead-lettered after `attempts`; the dispatcher starts on it.
    fn dead_letter_later(&mut self, offset: u64, attempts: u32, reason: Reason) {
        let d = DeadLetter {
            offset,
            attempts,
            dlq_mark: u64::MAX,
            reason,
        };
        self.dead_lettering.insert(offset, (d, false));
    }

    fn reset(&mut self, cursor: u64) {
        let (redeliveries, dead_lettered) = (self.redeliveries, self.dead_lettered);
        *self = PState {
            cursor,
            read_pos: cursor,
            redeliveries,
            dead_lettered,
            ..PState::default()
        };
    }

    fn snapshot(&self) -> PartitionSnapshot {
        let mut outstanding: BTreeMap<u64, u32> = self
            .in_flight
            .iter()
            .map(|(&o, f)| (o, f.counted()))
            .collect();
        outstanding.extend(self.pending.iter().map(|(&o, p)| (o, p.attempt)));
        PartitionSnapshot {
            cursor: self.cursor,
            redeliveries: self.redeliveries,
            dead_lettered: self.dead_lettered,
            outstanding,
            dead_letters: self.dead_lettering.values().map(|(d, _)| *d).collect(),
        }
    }
}

#[derive(Debug)]
struct Member {
    tx: mpsc::Sender<DeliveryBatch>,
    in_flight: usize,
    max_in_flight: usize,
    exclusive: bool,
    /// Told (on its stream) that a partition is blocked by damage.
    told_blocked: bool,
}

#[derive(Debug, Default)]
struct State {
    parts: Vec<PState>,
    members: BTreeMap<u64, Member>,
    next_member: u64,
    /// Member served first in the next round.
    turn: u64,
    /// Deadlines of deliveries in flight: (deadline, partition, offset).
    timeouts: BTreeSet<(Instant, u32, u64)>,
}

impl Flight {
    /// Attempts that count: this one only if it was handed.
    fn counted(&self) -> u32 {
        if self.handed {
            self.attempt
        } else {
            self.attempt - 1
        }
    }
}

impl State {
    /// Tells every member not told yet (on its stream) why a partition is blocked by damage;
    /// one whose buffer is full is told by a later dispatch round.
    fn tell_blocked(&mut self) {
        let State { parts, members, .. } = self;
        let Some(why) = parts.iter().find_map(|p| p.blocked.as_ref()) else {
            return;
        };
        for m in members.values_mut().filter(|m| !m.told_blocked) {
            m.told_blocked = m.tx.try_send(Err(Error::Damaged(why.clone()))).is_ok();
        }
    }

    /// Takes a delivery out of flight (acked, nacked or expired), with its deadline and its
    /// member's count.
    fn land(&mut self, p: u32, offset: u64) -> Option<Flight> {
        let f = self.parts[p as usize].in_flight.remove(&offset)?;
        self.timeouts.remove(&(f.deadline, p, offset));
        if let Some(m) = self.members.get_mut(&f.member) {
            m.in_flight = m.in_flight.saturating_sub(1);
        }
        Some(f)
    }
}

/// One member's view of a partition in `describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPartitionDescription {
    pub partition: u32,
    pub committed: u64,
    pub end: u64,
    pub lag: u64,
    pub in_flight: u64,
    pub pending: u64,
    pub redeliveries: u64,
    pub dead_lettered: u64,
    pub owner: Option<u64>,
    /// Deliveries stopped at damage in the log: why (see `docs/operations.md`).
    pub blocked: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub id: u64,
    pub in_flight: u64,
    pub max_in_flight: u64,
    pub exclusive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
    log: Partition,
    state: Mutex<State>,
    wake: Notify,
    settings: GroupSettings,
    broker: Weak<Broker>,
    pub(crate) stop: CancellationToken,
    /// Bytes of events since the last snapshot.
    since_snapshot: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for GroupTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupTopic")
            .field("group", &self.group)
            .field("topic", &self.topic.name)
            .finish_non_exhaustive()
    }
}

/// Removes a member from its group when its subscription ends (the stream is dropped).
#[derive(Debug)]
pub struct MemberGuard {
    group: Arc<GroupTopic>,
    member: u64,
}

impl MemberGuard {
    pub fn group(&self) -> &Arc<GroupTopic> {
        &self.group
    }

    /// Keeps the deliveries this member may hand to its transport, counting their attempt
    /// (see [`GroupTopic::hand_over`]).
    pub fn hand_over<T>(&self, deliveries: &mut Vec<T>, id: impl Fn(&T) -> (u32, u64)) {
        self.group.hand_over(self.member, deliveries, id);
    }
}

impl Drop for MemberGuard {
    fn drop(&mut self) {
        self.group.leave(self.member);
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Parses an ack handle, `<partition>:<offset>`.
pub fn parse_ack_id(id: &str) -> Result<(u32, u64)> {
    let bad = || Error::InvalidArgument(format!("malformed ack id {id:?}"));
    let (p, o) = id.split_once(':').ok_or_else(bad)?;
    Ok((p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?))
}

fn ack_id(partition: u32, offset: u64) -> String {
    format!("{partition}:{offset}")
}

impl GroupTopic {
    /// Opens (creating if needed) the state of `group` on `topic` and starts its dispatcher.
    /// A new group starts at `start` in every partition.
    pub(crate) async fn open(
        group: &str,
        topic: Arc<Topic>,
        dir: PathBuf,
        io: Arc<dyn FileIo>,
        settings: GroupSettings,
        broker: Weak<Broker>,
        start: impl Fn(u32) -> u64,
    ) -> Result<Arc<GroupTopic>> {
        let config = LogConfig {
            segment_bytes: 1 << 20,
            fsync: settings.fsync,
            queue_depth: 1 << 16,
            preallocate_bytes: 64 << 10,
            ..LogConfig::default()
        };
        let n = topic.partitions.len();
        let (log, replayed) = tokio::task::spawn_blocking(move || {
            let log = Partition::open(&dir, config, io, None)?;
            let replayed = replay(&log, n)?;
            Ok::<_, Error>((log, replayed))
        })
        .await
        .map_err(|e| Error::Internal(format!("group open task: {e}")))??;
        let fresh = replayed.is_none();
        let snapshots = replayed.unwrap_or_else(|| {
            (0..n as u32)
                .map(|p| PartitionSnapshot {
                    cursor: start(p),
                    ..PartitionSnapshot::default()
                })
                .collect()
        });
        let now = Instant::now();
        let mut state = State::default();
        for s in &snapshots {
            let mut p = PState::default();
            p.reset(s.cursor);
            p.redeliveries = s.redeliveries;
            p.dead_lettered = s.dead_lettered;
            // Delivered before the restart and never acknowledged: deliver again, unless that
            // was its last attempt.
            for (&offset, &attempt) in &s.outstanding {
                if attempt >= settings.max_deliveries {
                    p.dead_letter_later(offset, attempt, Reason::Restarted);
                } else {
                    p.retry(offset, attempt, now);
                }
            }
            for d in &s.dead_letters {
                p.dead_lettering.insert(d.offset, (*d, false));
            }
            state.parts.push(p);
        }
        let group_topic = Arc::new(GroupTopic {
            group: group.to_string(),
            topic,
            log,
            state: Mutex::new(state),
            wake: Notify::new(),
            settings,
            broker,
            stop: CancellationToken::new(),
            since_snapshot: std::sync::atomic::AtomicU64::new(0),
        });
        if fresh {
            let events: Vec<Event> = snapshots
                .iter()
                .enumerate()
                .map(|(p, s)| Event::Reset {
                    partition: p as u32,
                    cursor: s.cursor,
                })
                .collect();
            let done = group_topic.append(&events);
            wait(done).await?;
        }
        Ok(group_topic)
    }

    /// Starts the dispatcher and the partition watchers; they end with `stop`.
    pub(crate) fn start(self: &Arc<Self>, tracker: &tokio_util::task::TaskTracker) {
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
    /// durable.
    fn append(&self, events: &[Event]) -> oneshot::Receiver<storage::Result<storage::Appended>> {
        self.append_with(events, true)
    }

    /// [`GroupTopic::append`]; when not `durable`, the events are synced by the next durable
    /// append instead of one of their own (delivery records: they only keep attempt counts).
    fn append_with(
        &self,
        events: &[Event],
        durable: bool,
    ) -> oneshot::Receiver<storage::Result<storage::Appended>> {
        let records: Vec<Record> = events
            .iter()
            .map(|e| Record {
                value: Some(Bytes::from(e.encode())),
                ..Record::default()
            })
            .collect();
        let batch = EncodedBatch::new(&records);
        let (tx, rx) = oneshot::channel();
        self.since_snapshot
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let done: storage::Completion = Box::new(move |r| {
            let _ = tx.send(r);
        });
        if durable {
            self.log.append(batch, done);
        } else {
            self.log.append_lazy(batch, done);
        }
        rx
    }

    /// Adds a member; its deliveries arrive on the returned channel.
    pub fn join(
        self: &Arc<Self>,
        max_in_flight: usize,
        exclusive: bool,
    ) -> Result<(MemberGuard, mpsc::Receiver<DeliveryBatch>)> {
        let max_in_flight = self.settings.max_in_flight(max_in_flight)?;
        let mut st = lock(&self.state);
        if let Some(other) = st.members.values().find(|m| m.exclusive != exclusive) {
            return Err(Error::FailedPrecondition(format!(
                "group {:?} has {} members on topic {:?}; a member cannot join it {}",
                self.group,
                if other.exclusive {
                    "exclusive"
                } else {
                    "shared"
                },
                &*self.topic.name,
                if exclusive {
                    "exclusively"
                } else {
                    "as shared"
                }
            )));
        }
        let (tx, rx) = mpsc::channel(self.settings.member_buffer);
        let id = st.next_member;
        st.next_member += 1;
        st.members.insert(
            id,
            Member {
                tx,
                in_flight: 0,
                max_in_flight,
                exclusive,
                told_blocked: false,
            },
        );
        // A partition stopped at damage: the new member hears of it at once, like the others.
        st.tell_blocked();
        if exclusive {
            assign_owners(&mut st);
        }
        drop(st);
        tracing::debug!(group = %self.group, topic = %self.topic.name, member = id, exclusive, "member joined");
        self.wake.notify_one();
        Ok((
            MemberGuard {
                group: Arc::clone(self),
                member: id,
            },
            rx,
        ))
    }

    /// A member left: what it had in flight goes to the others.
    fn leave(&self, member: u64) {
        let now = Instant::now();
        let max = self.settings.max_deliveries;
        let mut st = lock(&self.state);
        if st.members.remove(&member).is_none() {
            return;
        }
        let State {
            parts, timeouts, ..
        } = &mut *st;
        for (p, part) in parts.iter_mut().enumerate() {
            let mine: Vec<u64> = part
                .in_flight
                .iter()
                .filter(|(_, f)| f.member == member)
                .map(|(&o, _)| o)
                .collect();
            for offset in mine {
                if let Some(f) = part.in_flight.remove(&offset) {
                    timeouts.remove(&(f.deadline, p as u32, offset));
                    give_back(part, offset, &f, now, max, Reason::MemberLeft);
                }
            }
            if part.owner == Some(member) {
                part.owner = None;
            }
        }
        assign_owners(&mut st);
        drop(st);
        tracing::debug!(group = %self.group, topic = %self.topic.name, member, "member left");
        self.wake.notify_one();
    }

    /// Acknowledges deliveries; returns once the acknowledgement is durable, with whether each
    /// id was applied (false: not in flight or pending for this group: never delivered,
    /// acknowledged already, or dead-lettered).
    pub async fn ack(&self, ids: &[(u32, u64)]) -> Result<Vec<bool>> {
        let (applied, done) = self.ack_quietly(ids)?;
        if let Some(done) = done {
            wait(done).await?;
        }
        Ok(applied)
    }

    /// Records acknowledgements without waiting for them to be durable; says which applied.
    #[allow(clippy::type_complexity)]
    pub fn ack_quietly(
        &self,
        ids: &[(u32, u64)],
    ) -> Result<(
        Vec<bool>,
        Option<oneshot::Receiver<storage::Result<storage::Appended>>>,
    )> {
        self.check_partitions(ids.iter().map(|&(p, _)| p))?;
        let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        let mut applied = Vec::with_capacity(ids.len());
        let mut st = lock(&self.state);
        for &(p, offset) in ids {
            let acked = st.land(p, offset).is_some() || {
                let part = &mut st.parts[p as usize];
                part.ready.remove(&offset);
                part.pending.remove(&offset).is_some()
            };
            if acked {
                by_partition.entry(p).or_default().push(offset);
            }
            applied.push(acked);
        }
        if by_partition.is_empty() {
            return Ok((applied, None));
        }
        let events: Vec<Event> = by_partition
            .into_iter()
            .map(|(partition, mut offsets)| {
                offsets.sort_unstable();
                offsets.dedup();
                Event::Acked { partition, offsets }
            })
            .collect();
        let done = self.append(&events);
        drop(st);
        self.wake.notify_one();
        Ok((applied, Some(done)))
    }

    /// Gives deliveries back for redelivery after `delay` (to any member); says which ids were
    /// in flight. A delivery at its last attempt is dead-lettered.
    pub fn nack(&self, ids: &[(u32, u64)], delay: Duration) -> Result<Vec<bool>> {
        if delay > MAX_NACK_DELAY {
            return Err(Error::InvalidArgument(format!(
                "a Nack delay may be at most {} ms; {} ms asked",
                MAX_NACK_DELAY.as_millis(),
                delay.as_millis()
            )));
        }
        self.check_partitions(ids.iter().map(|&(p, _)| p))?;
        let now = Instant::now();
        let mut st = lock(&self.state);
        let max = self.settings.max_deliveries;
        let mut applied = Vec::with_capacity(ids.len());
        for &(p, offset) in ids {
            let landed = st.land(p, offset);
            if let Some(f) = &landed {
                let part = &mut st.parts[p as usize];
                give_back(part, offset, f, now + delay, max, Reason::Nacked);
            }
            applied.push(landed.is_some());
        }
        drop(st);
        self.wake.notify_one();
        Ok(applied)
    }

    /// A member's stream is about to hand these deliveries to the transport: keeps those still
    /// in flight to that member and not handed yet (a delivery that timed out or went to another
    /// member while it waited in the stream's buffer is dropped), and counts their attempt.
    /// `id` names each delivery's (partition, offset).
    pub fn hand_over<T>(
        &self,
        member: u64,
        deliveries: &mut Vec<T>,
        id: impl Fn(&T) -> (u32, u64),
    ) {
        let mut handed: BTreeMap<u32, Vec<(u64, u32)>> = BTreeMap::new();
        let mut st = lock(&self.state);
        deliveries.retain(|d| {
            let (p, offset) = id(d);
            let Some(part) = st.parts.get_mut(p as usize) else {
                return false;
            };
            match part.in_flight.get_mut(&offset) {
                Some(f) if f.member == member && !f.handed => {
                    f.handed = true;
                    if f.attempt > 1 {
                        part.redeliveries += 1;
                    }
                    handed.entry(p).or_default().push((offset, f.attempt));
                    true
                }
                _ => false,
            }
        });
        if handed.is_empty() {
            return;
        }
        let events: Vec<Event> = handed
            .into_iter()
            .map(|(partition, mut deliveries)| {
                deliveries.sort_unstable();
                Event::Handed {
                    partition,
                    deliveries,
                }
            })
            .collect();
        // Synced with the next durable append, like `Delivered`.
        drop(self.append_with(&events, false));
    }

    fn check_partitions(&self, partitions: impl IntoIterator<Item = u32>) -> Result<()> {
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

    /// Moves the chosen partitions (all when `only` is empty) to `cursor(p)`, abandoning what
    /// is outstanding there, and unblocking them if damage had stopped them.
    pub async fn reset(&self, only: &[u32], cursor: impl Fn(u32) -> u64) -> Result<()> {
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
                        m.in_flight = m.in_flight.saturating_sub(1);
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
                    let end = self.topic.partitions[p].log.high_water();
                    let committed = part.committed();
                    GroupPartitionDescription {
                        partition: p as u32,
                        committed,
                        end,
                        lag: end.saturating_sub(committed),
                        in_flight: part.in_flight.len() as u64,
                        pending: (part.pending.len() + part.dead_lettering.len()) as u64,
                        redeliveries: part.redeliveries,
                        dead_lettered: part.dead_lettered,
                        owner: part.owner,
                        blocked: part.blocked.clone(),
                    }
                })
                .collect(),
        }
    }

    /// Stops the dispatcher and closes the group log cleanly.
    pub(crate) fn close(&self) {
        Self::closed(&self.group, self.begin_close());
    }

    /// Stops the group and starts closing its log; see [`GroupTopic::closed`].
    pub(crate) fn begin_close(&self) -> std::sync::mpsc::Receiver<storage::Result<()>> {
        self.stop.cancel();
        self.log.begin_close()
    }

    /// Waits for a close begun with [`GroupTopic::begin_close`] (blocking).
    pub(crate) fn closed(group: &str, closing: std::sync::mpsc::Receiver<storage::Result<()>>) {
        match closing.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(group, error = %e, "group log did not close cleanly");
            }
            Err(_) => tracing::warn!(group, "group log writer went away before closing"),
        }
    }

    async fn run(self: Arc<Self>) {
        // Dead letters left half-done by a crash are finished first.
        loop {
            let next = self.expire();
            if let Err(e) = self.dead_letter().await {
                tracing::error!(group = %self.group, topic = %self.topic.name, error = %e, "dead-lettering failed; will retry");
            }
            if let Err(e) = self.dispatch().await {
                tracing::error!(group = %self.group, topic = %self.topic.name, error = %e, "dispatch failed; will retry");
            }
            if let Err(e) = self.maybe_snapshot().await {
                tracing::warn!(group = %self.group, error = %e, "group snapshot failed");
            }
            let sleep = next.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                () = self.stop.cancelled() => break,
            }
        }
        // Members' streams end: their guards remove them when dropped.
        let members: Vec<_> = lock(&self.state)
            .members
            .values()
            .map(|m| m.tx.clone())
            .collect();
        for tx in members {
            let _ = tx.try_send(Err(Error::ShuttingDown));
        }
    }

    /// Moves timed-out deliveries back to pending (or to dead-lettering); returns the next
    /// moment something becomes due.
    fn expire(&self) -> Option<Instant> {
        let now = Instant::now();
        let max = self.settings.max_deliveries;
        let mut st = lock(&self.state);
        while let Some(&(deadline, p, offset)) = st.timeouts.first() {
            if deadline > now {
                break;
            }
            match st.land(p, offset) {
                Some(f) => {
                    let part = &mut st.parts[p as usize];
                    give_back(part, offset, &f, now, max, Reason::AckTimeout);
                }
                // A stale deadline (cannot happen: landing removes it); never spin on it.
                None => {
                    st.timeouts.remove(&(deadline, p, offset));
                }
            }
        }
        let State {
            parts, timeouts, ..
        } = &*st;
        let next_pending = parts
            .iter()
            .flat_map(|p| p.pending.values().map(|x| x.not_before))
            .filter(|&t| t > now)
            .min();
        [timeouts.first().map(|t| t.0), next_pending]
            .into_iter()
            .flatten()
            .min()
    }

    /// Writes the dead letters that are due: intent (durable), DLQ append (durable), done.
    async fn dead_letter(&self) -> Result<()> {
        let todo: Vec<(u32, DeadLetter)> = {
            let mut st = lock(&self.state);
            st.parts
                .iter_mut()
                .enumerate()
                .flat_map(|(p, part)| {
                    part.dead_lettering
                        .values_mut()
                        .filter(|(_, started)| !*started)
                        .map(move |(d, started)| {
                            *started = true;
                            (p as u32, *d)
                        })
                })
                .collect()
        };
        if todo.is_empty() {
            return Ok(());
        }
        let broker = self.broker.upgrade().ok_or(Error::ShuttingDown)?;
        let dlq = dlq_topic(&self.topic.name);
        for (p, mut d) in todo {
            let result = self.dead_letter_one(&broker, &dlq, p, &mut d).await;
            if let Err(e) = result {
                // Left marked as started=false, so the next round tries again.
                if let Some((_, started)) = lock(&self.state).parts[p as usize]
                    .dead_lettering
                    .get_mut(&d.offset)
                {
                    *started = false;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    async fn dead_letter_one(
        &self,
        broker: &Arc<Broker>,
        dlq: &str,
        p: u32,
        d: &mut DeadLetter,
    ) -> Result<()> {
        // Created when missing, whatever `auto_create_topics` says: the broker writes it.
        let dlq_topic = broker.topic_or_create(dlq, true).await?;
        let dlq_partition = &dlq_topic.partitions[0];
        if d.dlq_mark == u64::MAX {
            // First try: record the intent with the DLQ's current end.
            d.dlq_mark = dlq_partition.log.high_water();
            let done = {
                let mut st = lock(&self.state);
                if let Some((stored, _)) = st.parts[p as usize].dead_lettering.get_mut(&d.offset) {
                    stored.dlq_mark = d.dlq_mark;
                }
                self.append(&[Event::DeadLetterPending {
                    partition: p,
                    dead_letter: *d,
                }])
            };
            wait(done).await?;
        } else if self.find_in_dlq(dlq_partition, p, d).await? {
            // A crash came between the DLQ append and the final event.
            return self.finish_dead_letter(p, d.offset).await;
        }
        let record = read_record(&self.topic.partitions[p as usize], d.offset).await?;
        let mut headers = record
            .as_ref()
            .map(|r| r.headers.clone())
            .unwrap_or_default();
        for (k, v) in [
            (DLQ_GROUP, self.group.clone()),
            (DLQ_TOPIC, self.topic.name.to_string()),
            (DLQ_PARTITION, p.to_string()),
            (DLQ_OFFSET, d.offset.to_string()),
            (DLQ_ATTEMPTS, d.attempts.to_string()),
            (DLQ_REASON, d.reason.as_str().to_string()),
        ] {
            headers.push(Header {
                key: k.to_string(),
                value: Bytes::from(v),
            });
        }
        let message = NewMessage {
            key: record.as_ref().and_then(|r| r.key.clone()),
            value: record.and_then(|r| r.value),
            headers,
            partition: Some(0),
        };
        broker.send_to(&dlq_topic, vec![message]).await?;
        tracing::info!(group = %self.group, topic = %self.topic.name, partition = p, offset = d.offset,
            attempts = d.attempts, reason = d.reason.as_str(), "dead-lettered");
        self.finish_dead_letter(p, d.offset).await
    }

    async fn finish_dead_letter(&self, p: u32, offset: u64) -> Result<()> {
        let done = {
            let mut st = lock(&self.state);
            let part = &mut st.parts[p as usize];
            if part.dead_lettering.remove(&offset).is_some() {
                part.dead_lettered += 1;
            }
            self.append(&[Event::DeadLettered {
                partition: p,
                offset,
            }])
        };
        wait(done).await
    }

    /// Whether the DLQ already holds this dead letter (looking from the recorded mark).
    async fn find_in_dlq(
        &self,
        dlq: &Arc<super::PartitionHandle>,
        p: u32,
        d: &DeadLetter,
    ) -> Result<bool> {
        let dlq = Arc::clone(dlq);
        let (group, topic) = (self.group.clone(), self.topic.name.to_string());
        let (mark, offset) = (d.dlq_mark, d.offset);
        tokio::task::spawn_blocking(move || {
            let mut next = mark.max(dlq.log.log_start());
            let (p, o) = (p.to_string(), offset.to_string());
            let is = |r: &StoredRecord, k: &str, v: &str| {
                r.headers
                    .iter()
                    .any(|h| h.key == k && h.value == v.as_bytes())
            };
            while next < dlq.log.high_water() {
                for batch in dlq.log.read(next, 1 << 20)? {
                    for r in batch.records().flatten() {
                        if r.offset >= next
                            && is(&r, DLQ_GROUP, &group)
                            && is(&r, DLQ_TOPIC, &topic)
                            && is(&r, DLQ_PARTITION, &p)
                            && is(&r, DLQ_OFFSET, &o)
                        {
                            return Ok(true);
                        }
                    }
                    next = next.max(batch.header().next_offset());
                }
            }
            Ok(false)
        })
        .await
        .map_err(|e| Error::Internal(format!("DLQ scan task: {e}")))?
    }

    /// Hands due messages to members with room, until no member has room or nothing is due.
    async fn dispatch(self: &Arc<Self>) -> Result<()> {
        loop {
            self.fill().await?;
            if !self.assign() {
                return Ok(());
            }
        }
    }

    /// Reads what the next assignment needs: records for due redeliveries, now, and look-ahead,
    /// in the background (see [`GroupTopic::read_ahead`]).
    async fn fill(self: &Arc<Self>) -> Result<()> {
        let now = Instant::now();
        let (fetch, refill) = {
            let mut st = lock(&self.state);
            // The next read starts when less than one read is left, also while every member is
            // full: it is in when their acks come. At most two reads' worth is held.
            let mut refill = Vec::new();
            let members = !st.members.is_empty();
            for (p, part) in st.parts.iter_mut().enumerate() {
                if members
                    && part.blocked.is_none()
                    && part.reading.is_none()
                    && part.lookahead_bytes < READ_AHEAD_BYTES
                    && part.read_pos < self.topic.partitions[p].log.high_water()
                {
                    part.reading = Some(part.read_pos);
                    refill.push((p as u32, part.read_pos));
                }
            }
            let room: usize = st
                .members
                .values()
                .map(|m| m.max_in_flight.saturating_sub(m.in_flight))
                .sum();
            let mut fetch = Vec::new();
            if room > 0 {
                for (p, part) in st.parts.iter().enumerate() {
                    if part.blocked.is_some() {
                        continue;
                    }
                    let due = part
                        .pending
                        .iter()
                        .filter(|(o, x)| x.not_before <= now && !part.ready.contains_key(o))
                        .take(room)
                        .map(|(&o, _)| (p as u32, o));
                    fetch.extend(due);
                }
            }
            (fetch, refill)
        };
        for (p, from) in refill {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.read_ahead(p, from).await });
        }
        if fetch.is_empty() {
            return Ok(());
        }
        let topic = Arc::clone(&self.topic);
        let (fetched, damaged) = tokio::task::spawn_blocking(move || {
            let mut fetched = Vec::new();
            let mut damaged = Vec::new();
            for (p, offset) in fetch {
                let log = &topic.partitions[p as usize].log;
                match read_record_blocking(log, offset) {
                    Ok(r) => fetched.push((p, offset, r)),
                    // Retention removed it: nothing left to redeliver.
                    Err(Error::Storage(storage::Error::OffsetOutOfRange { .. })) => {
                        fetched.push((p, offset, None));
                    }
                    Err(e) => match e.in_partition(&topic.name, p) {
                        // Damaged since it was first delivered: the partition stops here.
                        Error::Damaged(why) => damaged.push((p, why)),
                        e => return Err(e),
                    },
                }
            }
            Ok((fetched, damaged))
        })
        .await
        .map_err(|e| Error::Internal(format!("group read task: {e}")))??;
        let mut st = lock(&self.state);
        for (p, why) in damaged {
            tracing::error!(group = %self.group, error = %why, "group redelivery stopped at damage");
            st.parts[p as usize].blocked.get_or_insert(why);
        }
        st.tell_blocked();
        for (p, offset, record) in fetched {
            let part = &mut st.parts[p as usize];
            match record {
                Some(r) if part.pending.contains_key(&offset) => {
                    part.ready.insert(offset, r);
                }
                Some(_) => {}
                None => {
                    // Gone from the log (retention or compaction): nothing to redeliver.
                    part.pending.remove(&offset);
                }
            }
        }
        Ok(())
    }

    /// Reads the records after a partition's look-ahead, on the blocking pool, while the
    /// dispatcher goes on assigning what it has; wakes the dispatcher when they are in. Started
    /// when the look-ahead runs low, so that deliveries rarely wait for the disk.
    async fn read_ahead(self: Arc<Self>, p: u32, from: u64) {
        if self.stop.is_cancelled() {
            return;
        }
        let topic = Arc::clone(&self.topic);
        let read = tokio::task::spawn_blocking(move || {
            let log = &topic.partitions[p as usize].log;
            let start = from.max(log.log_start());
            let mut records = Vec::new();
            let mut next = start;
            for batch in log.read(start, READ_AHEAD_BYTES)? {
                for r in batch.records() {
                    let r = r.map_err(|why| {
                        Error::Internal(format!("undecodable record in a valid batch: {why}"))
                    })?;
                    if r.offset >= start {
                        records.push(r);
                    }
                }
                next = next.max(batch.header().next_offset());
            }
            Ok::<_, Error>((start, next, records))
        })
        .await
        .map_err(|e| Error::Internal(format!("group read task: {e}")))
        .and_then(|r| r);
        let mut st = lock(&self.state);
        let part = &mut st.parts[p as usize];
        if part.reading == Some(from) {
            part.reading = None;
        }
        match read {
            // A reset (or another read) moved the look-ahead on while this one ran: stale.
            Ok((start, next, records)) if part.read_pos == from => {
                if part.lookahead.is_empty() && part.cursor < start {
                    // Retention removed what the cursor pointed at. (With records still in the
                    // look-ahead, the cursor is behind `start` and moves on as they go out.)
                    part.cursor = start;
                }
                part.lookahead_bytes += records.iter().map(record_bytes).sum::<usize>();
                part.lookahead.extend(records);
                part.read_pos = next;
            }
            Ok(_) => {}
            Err(_) if self.stop.is_cancelled() => return,
            Err(e) => match e.in_partition(&self.topic.name, p) {
                Error::Damaged(why) => {
                    // Not retried: the group waits here until an operator moves it past the
                    // damage (`groups reset --partition`); every member is told.
                    tracing::error!(group = %self.group, error = %why, "group deliveries stopped at damage");
                    part.blocked = Some(why);
                    st.tell_blocked();
                    return;
                }
                e => {
                    // Not retried at once: the next wake-up (an ack, a new message) tries again.
                    tracing::error!(group = %self.group, topic = %self.topic.name, partition = p, error = %e, "group read-ahead failed; will retry");
                    return;
                }
            },
        }
        drop(st);
        self.wake.notify_one();
    }

    /// One round: every member with room takes up to its quota. True if anything was sent.
    fn assign(&self) -> bool {
        let now = Instant::now();
        let mut st = lock(&self.state);
        let exclusive = st.members.values().any(|m| m.exclusive);
        let ids: Vec<u64> = {
            let turn = st.turn;
            let mut ids: Vec<u64> = st.members.range(turn..).map(|(&id, _)| id).collect();
            ids.extend(st.members.range(..turn).map(|(&id, _)| id));
            ids
        };
        let mut any = false;
        let mut events = Vec::new();
        // Members whose buffer was full when a partition was blocked hear of it now.
        st.tell_blocked();
        for id in ids {
            let (room, tx) = match st.members.get(&id) {
                Some(m) if m.tx.capacity() > 0 => (
                    m.max_in_flight.saturating_sub(m.in_flight).min(ROUND_QUOTA),
                    m.tx.clone(),
                ),
                _ => continue,
            };
            if room == 0 {
                continue;
            }
            let deadline = now + self.settings.ack_timeout;
            let mut out = Vec::new();
            let State {
                parts, timeouts, ..
            } = &mut *st;
            let n = parts.len();
            let first = (id as usize) % n.max(1);
            for k in 0..n {
                let p = (first + k) % n;
                let part = &mut parts[p];
                if exclusive && part.owner != Some(id) {
                    continue;
                }
                let mut delivered = Vec::new();
                // Redeliveries first, oldest first.
                while out.len() < room {
                    let Some(offset) = part.ready.keys().next().copied() else {
                        break;
                    };
                    let Some(record) = part.ready.remove(&offset) else {
                        break;
                    };
                    let Some(pending) = part.pending.remove(&offset) else {
                        continue;
                    };
                    let attempt = pending.attempt + 1;
                    delivered.push((offset, attempt));
                    out.push((p as u32, record, attempt));
                }
                while out.len() < room {
                    let Some(record) = part.lookahead.pop_front() else {
                        break;
                    };
                    part.lookahead_bytes =
                        part.lookahead_bytes.saturating_sub(record_bytes(&record));
                    if record.offset < part.cursor {
                        continue;
                    }
                    part.cursor = record.offset + 1;
                    delivered.push((record.offset, 1));
                    out.push((p as u32, record, 1));
                }
                for (offset, attempt) in &mut delivered {
                    part.in_flight.insert(
                        *offset,
                        Flight {
                            member: id,
                            deadline,
                            attempt: *attempt,
                            handed: false,
                        },
                    );
                    timeouts.insert((deadline, p as u32, *offset));
                    // The log records the attempts handed so far; this one counts once handed.
                    *attempt -= 1;
                }
                if !delivered.is_empty() {
                    delivered.sort_unstable();
                    events.push(Event::Delivered {
                        partition: p as u32,
                        deliveries: delivered,
                    });
                }
                if out.len() >= room {
                    break;
                }
            }
            if out.is_empty() {
                continue;
            }
            if let Some(m) = st.members.get_mut(&id) {
                m.in_flight += out.len();
            }
            let deliveries: Vec<Delivery> = out
                .into_iter()
                .map(|(partition, record, attempt)| Delivery {
                    ack_id: ack_id(partition, record.offset),
                    partition,
                    record,
                    attempt,
                })
                .collect();
            // Room in the channel was checked under the lock; only a departed member fails here,
            // and its guard gives its deliveries back.
            let _ = tx.try_send(Ok(Deliveries::Records(deliveries)));
            st.turn = id + 1;
            any = true;
        }
        if !events.is_empty() {
            // Not awaited nor synced on their own: delivery records only keep attempt counts,
            // and the next ack's sync covers them.
            drop(self.append_with(&events, false));
        }
        any
    }

    async fn maybe_snapshot(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.since_snapshot.load(Ordering::Relaxed) < SNAPSHOT_EVERY_BYTES {
            return Ok(());
        }
        let done = {
            let st = lock(&self.state);
            let events: Vec<Event> = st
                .parts
                .iter()
                .enumerate()
                .map(|(p, part)| Event::Snapshot {
                    partition: p as u32,
                    state: part.snapshot(),
                })
                .collect();
            let done = self.append(&events);
            self.since_snapshot.store(0, Ordering::Relaxed);
            done
        };
        let appended = done
            .await
            .map_err(|_| Error::Internal("group log writer went away".into()))??;
        let log_offset = appended.base_offset;
        // Everything before the snapshot is no longer needed.
        let log = &self.log;
        log.delete_segments_below(log_offset)?;
        Ok(())
    }
}

/// What a record in the look-ahead counts for against `READ_AHEAD_BYTES`.
fn record_bytes(r: &StoredRecord) -> usize {
    r.value.as_ref().map_or(0, |v| v.len()) + r.key.as_ref().map_or(0, |k| k.len())
}

/// A delivery that came back unacknowledged: pending again, or dead-lettered after
/// `max_deliveries` attempts. One that never reached the transport did not count: it is pending
/// again at once, with its attempts as they were.
fn give_back(part: &mut PState, offset: u64, f: &Flight, when: Instant, max: u32, why: Reason) {
    if !f.handed {
        part.retry(offset, f.counted(), Instant::now());
    } else if f.attempt >= max {
        part.dead_letter_later(offset, f.attempt, why);
    } else {
        part.retry(offset, f.attempt, when);
    }
}

/// Exclusive mode: every partition without an owner goes to the member owning fewest.
fn assign_owners(st: &mut State) {
    let exclusive: Vec<u64> = st
        .members
        .iter()
        .filter(|(_, m)| m.exclusive)
        .map(|(&id, _)| id)
        .collect();
    if exclusive.is_empty() {
        for p in &mut st.parts {
            p.owner = None;
        }
        return;
    }
    for p in 0..st.parts.len() {
        if st.parts[p].owner.is_some_and(|o| exclusive.contains(&o)) {
            continue;
        }
        let least = exclusive
            .iter()
            .min_by_key(|&&id| st.parts.iter().filter(|x| x.owner == Some(id)).count())
            .copied();
        st.parts[p].owner = least;
    }
}

async fn wait(done: oneshot::Receiver<storage::Result<storage::Appended>>) -> Result<()> {
    done.await
        .map_err(|_| Error::Internal("group log writer went away".into()))??;
    Ok(())
}

fn read_record_blocking(log: &Partition, offset: u64) -> Result<Option<StoredRecord>> {
    for batch in log.read(offset, 1)? {
        for r in batch.records() {
            let r = r.map_err(|why| Error::Internal(format!("undecodable record: {why}")))?;
            if r.offset == offset {
                return Ok(Some(r));
            }
            if r.offset > offset {
                return Ok(None);
            }
        }
    }
    Ok(None)
}

async fn read_record(
    handle: &Arc<super::PartitionHandle>,
    offset: u64,
) -> Result<Option<StoredRecord>> {
    let handle = Arc::clone(handle);
    tokio::task::spawn_blocking(move || read_record_blocking(&handle.log, offset))
        .await
        .map_err(|e| Error::Internal(format!("read task: {e}")))?
}

/// Rebuilds the partitions' state from the group log; `None` when the log is empty (a new
/// group).
fn replay(log: &Partition, partitions: usize) -> Result<Option<Vec<PartitionSnapshot>>> {
    let mut state = vec![PartitionSnapshot::default(); partitions];
    let mut next = log.log_start();
    let end = log.high_water();
    if next == end {
        return Ok(None);
    }
    while next < end {
        let batches = log.read(next, 1 << 20)?;
        for batch in &batches {
            for r in batch.records() {
                let r = r.map_err(|why| Error::Internal(format!("group log record: {why}")))?;
                if r.offset < next {
                    continue;
                }
                let bytes = r.value.unwrap_or_default();
                let event = Event::decode(&bytes).map_err(|why| {
                    Error::Storage(storage::Error::corrupt(
                        log.dir(),
                        r.offset,
                        format!("group event: {why}"),
                    ))
                })?;
                let Some(s) = state.get_mut(event.partition() as usize) else {
                    continue;
                };
                apply(s, event);
            }
            next = next.max(batch.header().next_offset());
        }
    }
    Ok(Some(state))
}

fn apply(s: &mut PartitionSnapshot, event: Event) {
    match event {
        Event::Delivered { deliveries, .. } => {
            for (offset, handed_before) in deliveries {
                s.outstanding.insert(offset, handed_before);
                s.cursor = s.cursor.max(offset + 1);
            }
        }
        Event::Handed { deliveries, .. } => {
            for (offset, attempt) in deliveries {
                if attempt > 1 {
                    s.redeliveries += 1;
                }
                s.outstanding.insert(offset, attempt);
            }
        }
        Event::Acked { offsets, .. } => {
            for o in offsets {
                s.outstanding.remove(&o);
            }
        }
        Event::Reset { cursor, .. } => {
            s.outstanding.clear();
            s.dead_letters.clear();
            s.cursor = cursor;
        }
        Event::DeadLetterPending { dead_letter, .. } => {
            s.outstanding.remove(&dead_letter.offset);
            s.dead_letters.retain(|d| d.offset != dead_letter.offset);
            s.dead_letters.push(dead_letter);
        }
        Event::DeadLettered { offset, .. } => {
            let before = s.dead_letters.len();
            s.dead_letters.retain(|d| d.offset != offset);
            if s.dead_letters.len() < before {
                s.dead_lettered += 1;
            }
        }
        Event::Snapshot { state, .. } => *s = state,
    }
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
