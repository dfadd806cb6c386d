//! Members: joining a group (a subscription becomes a member with a delivery buffer), leaving
//! it (what it held goes back, or to the dead letters at its last attempt), acknowledging and
//! negatively acknowledging deliveries, and handing deliveries over to the transport (where an
//! attempt starts to count).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::broker::error::{Error, Result};
use crate::broker::message::DeliveryBatch;

use super::events::{Event, Reason};
use super::group::{GroupTopic, wait};
use super::state::*;

/// Longest delay a Nack may ask for.
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(3600);

/// What a member asks for when it joins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Membership {
    /// Deliveries it may hold unacknowledged (0: the broker's default).
    pub max_in_flight: usize,
    /// Partitions are owned by one member each instead of shared message by message.
    pub exclusive: bool,
    /// Deliveries over its life, at most.
    pub limit: Option<u64>,
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

/// A consumer group's member as its subscription holds it: joined here, or (on a cluster)
/// relayed to the node that leads the group. Leaves the group when dropped.
pub enum GroupMember {
    Here(MemberGuard),
    Relayed(Relayed),
}

/// Sends acks of deliveries (partition, offset) on, not waiting for the answer.
pub type AckSink = Box<dyn Fn(Vec<(u32, u64)>) + Send + Sync>;

/// A member relayed to the node that leads its group: that node counts its attempts (before
/// they are sent); its acks go there.
pub struct Relayed {
    /// Acknowledges deliveries at the group's leader, not waiting for the answer.
    pub ack: AckSink,
    /// Ends the relayed stream (and so the membership there) when dropped.
    pub ends: tokio_util::sync::DropGuard,
}

impl std::fmt::Debug for Relayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for GroupMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupMember::Here(guard) => guard.fmt(f),
            GroupMember::Relayed(_) => f.write_str("GroupMember::Relayed"),
        }
    }
}

impl GroupMember {
    /// Keeps the deliveries this member may hand to its transport (see
    /// [`MemberGuard::hand_over`]); a relayed member's were counted by the group's leader.
    pub fn hand_over<T>(&self, deliveries: &mut Vec<T>, id: impl Fn(&T) -> (u32, u64)) {
        if let GroupMember::Here(guard) = self {
            guard.hand_over(deliveries, id);
        }
    }

    /// The member took deliveries from its channel: there may be room for more.
    pub fn poke(&self) {
        if let GroupMember::Here(guard) = self {
            guard.group().poke();
        }
    }

    /// Acknowledges deliveries, not waiting until that is durable (the seed API's
    /// acknowledgement of what it handed over).
    pub fn ack_quietly(&self, ids: &[(u32, u64)]) -> Result<()> {
        match self {
            GroupMember::Here(guard) => guard.group().ack_quietly(ids).map(drop),
            GroupMember::Relayed(relayed) => {
                (relayed.ack)(ids.to_vec());
                Ok(())
            }
        }
    }
}

impl Drop for MemberGuard {
    fn drop(&mut self) {
        self.group.leave(self.member);
    }
}

impl GroupTopic {
    /// Adds a member; its deliveries arrive on the returned channel. With a `limit`, it is
    /// assigned at most that many deliveries over its life (one taken back before it was handed
    /// does not count), and stays a member until it leaves: it can ack the last of them first.
    pub fn join(
        self: &Arc<Self>,
        membership: Membership,
    ) -> Result<(MemberGuard, mpsc::Receiver<DeliveryBatch>)> {
        self.join_via(membership, None)
    }

    /// [`join`](Self::join) for a member connected to node `via` of a cluster, which relays it
    /// here (`None`: connected to this node).
    pub fn join_via(
        self: &Arc<Self>,
        membership: Membership,
        via: Option<u64>,
    ) -> Result<(MemberGuard, mpsc::Receiver<DeliveryBatch>)> {
        let Membership {
            max_in_flight,
            exclusive,
            limit,
        } = membership;
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
                limit: limit.unwrap_or(u64::MAX),
                taken: 0,
                exclusive,
                told_blocked: false,
                via,
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
    pub(super) fn leave(&self, member: u64) {
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
    ) -> Result<(Vec<bool>, Option<oneshot::Receiver<Result<u64>>>)> {
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
        if applied.iter().any(|a| !a) {
            tracing::debug!(group = %self.group, topic = %self.topic.name, ?ids, ?applied, "acks of deliveries not in flight");
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
    /// in flight. A delivery at its last attempt is dead-lettered. A delay is recorded in the
    /// group's log (as the time it ends), so it holds after a restart or a failover: the answer
    /// waits until that record is durable.
    pub async fn nack(&self, ids: &[(u32, u64)], delay: Duration) -> Result<Vec<bool>> {
        if delay > MAX_NACK_DELAY {
            return Err(Error::InvalidArgument(format!(
                "a Nack delay may be at most {} ms; {} ms asked",
                MAX_NACK_DELAY.as_millis(),
                delay.as_millis()
            )));
        }
        self.check_partitions(ids.iter().map(|&(p, _)| p))?;
        let (applied, done) = self.give_back_nacked(ids, delay);
        self.wake.notify_one();
        if let Some(done) = done {
            wait(done).await?;
        }
        Ok(applied)
    }

    /// [`GroupTopic::nack`]'s change of state: which ids applied, and the durable record of
    /// the delays when there are any.
    #[allow(clippy::type_complexity)]
    fn give_back_nacked(
        &self,
        ids: &[(u32, u64)],
        delay: Duration,
    ) -> (Vec<bool>, Option<oneshot::Receiver<Result<u64>>>) {
        let now = Instant::now();
        let until = unix_ms().saturating_add(delay.as_millis() as u64);
        let mut delayed: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        let mut st = lock(&self.state);
        let max = self.settings.max_deliveries;
        let mut applied = Vec::with_capacity(ids.len());
        for &(p, offset) in ids {
            let landed = st.land(p, offset);
            if let Some(f) = &landed {
                let part = &mut st.parts[p as usize];
                give_back(part, offset, f, now + delay, max, Reason::Nacked);
                if let Some(pending) = part.pending.get_mut(&offset)
                    && !delay.is_zero()
                    && f.handed
                {
                    pending.delayed_until = Some(until);
                    delayed.entry(p).or_default().push((offset, until));
                }
            }
            applied.push(landed.is_some());
        }
        if delayed.is_empty() {
            return (applied, None);
        }
        let events: Vec<Event> = delayed
            .into_iter()
            .map(|(partition, mut delays)| {
                delays.sort_unstable();
                delays.dedup_by_key(|d| d.0);
                Event::Delayed { partition, delays }
            })
            .collect();
        // Appended under the state's lock: the log holds events in the order they happened.
        (applied, Some(self.append(&events)))
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
        let counted = self.log.counts_at_assignment();
        let mut st = lock(&self.state);
        deliveries.retain(|d| {
            let (p, offset) = id(d);
            let Some(part) = st.parts.get_mut(p as usize) else {
                return false;
            };
            match part.in_flight.get_mut(&offset) {
                // Counted when assigned (on a cluster): it goes out if still this member's.
                Some(f) if counted => f.member == member,
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
}
