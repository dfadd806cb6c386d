//! The in-memory state of a group on a topic: per partition the cursor, the deliveries in
//! flight, the pending redeliveries and the dead letters being written; the members and their
//! buffers; and the small rules that move a delivery between those (give back, owners in
//! exclusive mode). No I/O here: the event log and the dispatcher live next door.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::storage::StoredRecord;

use super::events::{DeadLetter, PartitionSnapshot, Reason};
use crate::broker::clock::now_ms;
use crate::broker::error::Error;
use crate::broker::message::DeliveryBatch;

#[derive(Debug)]
pub(super) struct Flight {
    pub(super) member: u64,
    pub(super) deadline: Instant,
    /// The attempt this delivery is; it counts only once `handed`.
    pub(super) attempt: u32,
    /// Handed to the member's transport (see [`GroupTopic::hand_over`]).
    pub(super) handed: bool,
}

#[derive(Debug)]
pub(super) struct Pending {
    pub(super) not_before: Instant,
    /// Attempts handed so far.
    pub(super) attempt: u32,
    /// Given back by a Nack with a delay: `not_before` as wall-clock time (unix ms), which the
    /// group's log holds (an `Event::Delayed`).
    pub(super) delayed_until: Option<u64>,
}

#[derive(Debug, Default)]
pub(super) struct PState {
    pub(super) cursor: u64,
    pub(super) in_flight: BTreeMap<u64, Flight>,
    pub(super) pending: BTreeMap<u64, Pending>,
    /// Records fetched for due pending offsets, ready to go out again.
    pub(super) ready: BTreeMap<u64, StoredRecord>,
    /// Dead letters not yet finished; `false` until the dispatcher has started on it.
    pub(super) dead_lettering: BTreeMap<u64, (DeadLetter, bool)>,
    /// Records read at or after `cursor`, not yet delivered.
    pub(super) lookahead: VecDeque<StoredRecord>,
    /// Key and value bytes in `lookahead`.
    pub(super) lookahead_bytes: usize,
    /// Next offset to read into `lookahead`.
    pub(super) read_pos: u64,
    /// A read into `lookahead` from this offset is under way.
    pub(super) reading: Option<u64>,
    pub(super) owner: Option<u64>,
    pub(super) redeliveries: u64,
    pub(super) dead_lettered: u64,
    /// Deliveries whose ack timeout passed, since this broker opened the group (not persisted).
    pub(super) ack_timeouts: u64,
    /// Reads stopped at a damaged batch: where and why. Cleared by a reset.
    pub(super) blocked: Option<Blocked>,
    /// Cluster mode, a partition read from other nodes: its end as one of them last said.
    pub(super) remote_end: u64,
}

/// A partition's deliveries stopped at damage.
#[derive(Debug, Clone)]
pub(super) struct Blocked {
    /// The first offset not delivered: the damaged read's start.
    pub(super) at: u64,
    pub(super) why: String,
}

impl PState {
    pub(super) fn committed(&self) -> u64 {
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
    pub(super) fn retry(&mut self, offset: u64, attempts: u32, not_before: Instant) {
        let pending = Pending {
            not_before,
            attempt: attempts,
            delayed_until: None,
        };
        self.pending.insert(offset, pending);
    }

    /// [`PState::retry`] for a Nack's delay, which ends at `until` (unix ms) as well.
    pub(super) fn retry_delayed(
        &mut self,
        offset: u64,
        attempts: u32,
        not_before: Instant,
        until: u64,
    ) {
        let pending = Pending {
            not_before,
            attempt: attempts,
            delayed_until: Some(until),
        };
        self.pending.insert(offset, pending);
    }

    /// To be dead-lettered after `attempts`; the dispatcher starts on it.
    pub(super) fn dead_letter_later(&mut self, offset: u64, attempts: u32, reason: Reason) {
        let d = DeadLetter {
            offset,
            attempts,
            dlq_mark: u64::MAX,
            reason,
        };
        self.dead_lettering.insert(offset, (d, false));
    }

    pub(super) fn reset(&mut self, cursor: u64) {
        let (redeliveries, dead_lettered) = (self.redeliveries, self.dead_lettered);
        *self = PState {
            cursor,
            read_pos: cursor,
            redeliveries,
            dead_lettered,
            ack_timeouts: self.ack_timeouts,
            ..PState::default()
        };
    }

    pub(super) fn snapshot(&self) -> PartitionSnapshot {
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
            delayed: self
                .pending
                .iter()
                .filter_map(|(&o, p)| Some((o, p.delayed_until?)))
                .collect(),
        }
    }
}

#[derive(Debug)]
pub(super) struct Member {
    pub(super) tx: mpsc::Sender<DeliveryBatch>,
    pub(super) in_flight: usize,
    pub(super) max_in_flight: usize,
    /// Most deliveries this member takes over its life (`u64::MAX`: no limit).
    pub(super) limit: u64,
    /// Deliveries assigned to it, less those taken back before they were handed: what counts
    /// against `limit`.
    pub(super) taken: u64,
    pub(super) exclusive: bool,
    /// Told (on its stream) that a partition is blocked by damage.
    pub(super) told_blocked: bool,
    /// The cluster node it is connected to, which relays it here (`None`: this node).
    pub(super) via: Option<u64>,
}

impl Member {
    /// Deliveries it may be assigned now: room in its in-flight window, and what is left of
    /// its limit.
    pub(super) fn room(&self) -> usize {
        let window = self.max_in_flight.saturating_sub(self.in_flight);
        let left = self.limit.saturating_sub(self.taken);
        window.min(usize::try_from(left).unwrap_or(usize::MAX))
    }

    /// A delivery of its leaves flight: one never handed is no longer taken.
    pub(super) fn landed(&mut self, f: &Flight) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if !f.handed {
            self.taken = self.taken.saturating_sub(1);
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) parts: Vec<PState>,
    pub(super) members: BTreeMap<u64, Member>,
    pub(super) next_member: u64,
    /// Member served first in the next round.
    pub(super) turn: u64,
    /// Deadlines of deliveries in flight: (deadline, partition, offset).
    pub(super) timeouts: BTreeSet<(Instant, u32, u64)>,
}

impl Flight {
    /// Attempts that count: this one only if it was handed.
    pub(super) fn counted(&self) -> u32 {
        if self.handed {
            self.attempt
        } else {
            self.attempt - 1
        }
    }
}

impl State {
    /// Tells every member not told yet (on its stream) why a partition is blocked by damage,
    /// once every intact record before the damage has gone out (so the error follows them,
    /// whatever the members' windows); one whose buffer is full is told by a later dispatch
    /// round.
    pub(super) fn tell_blocked(&mut self) {
        let State { parts, members, .. } = self;
        let Some(why) = parts.iter().find_map(|p| {
            let b = p.blocked.as_ref()?;
            let before = p.lookahead.front().is_some_and(|r| r.offset < b.at);
            (!before).then_some(&b.why)
        }) else {
            return;
        };
        for m in members.values_mut().filter(|m| !m.told_blocked) {
            m.told_blocked = m.tx.try_send(Err(Error::Damaged(why.clone()))).is_ok();
        }
    }

    /// Takes a delivery out of flight (acked, nacked or expired), with its deadline and its
    /// member's count.
    pub(super) fn land(&mut self, p: u32, offset: u64) -> Option<Flight> {
        let f = self.parts[p as usize].in_flight.remove(&offset)?;
        self.timeouts.remove(&(f.deadline, p, offset));
        if let Some(m) = self.members.get_mut(&f.member) {
            m.landed(&f);
        }
        Some(f)
    }
}

pub(super) fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a record in the look-ahead counts for against `READ_AHEAD_BYTES`.
pub(super) fn record_bytes(r: &StoredRecord) -> usize {
    r.value.as_ref().map_or(0, |v| v.len()) + r.key.as_ref().map_or(0, |k| k.len())
}

/// A delivery that came back unacknowledged: pending again, or dead-lettered after
/// `max_deliveries` attempts. One that never reached the transport did not count: it is pending
/// again at once, with its attempts as they were.
pub(super) fn give_back(
    part: &mut PState,
    offset: u64,
    f: &Flight,
    when: Instant,
    max: u32,
    why: Reason,
) {
    if !f.handed {
        part.retry(offset, f.counted(), Instant::now());
    } else if f.attempt >= max {
        part.dead_letter_later(offset, f.attempt, why);
    } else {
        part.retry(offset, f.attempt, when);
    }
}

/// Exclusive mode: every partition without an owner goes to the member owning fewest.
pub(super) fn assign_owners(st: &mut State) {
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

/// The broker's clock ([`now_ms`]) as the unsigned milliseconds a Nack's delay is kept in.
pub(super) fn unix_ms() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}
