//! The dispatcher: one task per group and topic that reads ahead in each partition, assigns due
//! messages to members with room (taking turns), and snapshots the state into the group log
//! from time to time so that replay stays short.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::storage::{self, StoredRecord};

use crate::broker::error::{Error, Result};
use crate::broker::message::{Deliveries, Delivery};
use crate::broker::remote::{REMOTE_WAIT, RemoteLog};
use crate::broker::topic::read_record;

use super::events::Event;
use super::group::{GroupTopic, ack_id};
use super::state::*;

/// Snapshot the state once this many bytes of events were written since the last one.
const SNAPSHOT_EVERY_BYTES: u64 = 1 << 20;
/// Bytes read from a partition per look-ahead refill.
const READ_AHEAD_BYTES: usize = 256 << 10;
/// Deliveries handed to one member per round, so that members take turns.
const ROUND_QUOTA: usize = 512;
/// How soon a round that failed (dead-lettering, reading) is tried again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// How soon a partition read from other nodes is read again after no holder answered.
const REMOTE_RETRY: Duration = Duration::from_millis(500);

/// A read-ahead: where it started, the offset after it, its records, and for a partition read
/// from other nodes the end the node that answered has.
type AheadRead = (u64, u64, Vec<StoredRecord>, Option<u64>);

impl GroupTopic {
    pub(super) async fn run(self: Arc<Self>) {
        // Dead letters left half-done by a crash are finished first.
        loop {
            let next = self.expire();
            let mut failed = false;
            if let Err(e) = self.dead_letter().await {
                tracing::error!(group = %self.group, topic = %self.topic.name, error = %e, "dead-lettering failed; will retry");
                failed = true;
            }
            if let Err(e) = self.dispatch().await {
                tracing::error!(group = %self.group, topic = %self.topic.name, error = %e, "dispatch failed; will retry");
                failed = true;
            }
            if let Err(e) = self.maybe_snapshot().await {
                tracing::warn!(group = %self.group, error = %e, "group snapshot failed");
            }
            let mut sleep = next.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            // A failure (the DLQ's partition without a leader for a moment) is tried again
            // even if nothing else wakes the group.
            if failed {
                sleep = sleep.min(RETRY_AFTER_FAILURE);
            }
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
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for tx in members {
            let why = match &ended {
                Some(why) => Error::Unavailable(why.clone()),
                None => Error::ShuttingDown,
            };
            // After what its buffer holds: the member's stream ends with it (or goes first).
            self.tasks.spawn(async move {
                let _ = tx.send(Err(why)).await;
            });
        }
    }

    /// Hands due messages to members with room, until no member has room or nothing is due.
    pub(super) async fn dispatch(self: &Arc<Self>) -> Result<()> {
        loop {
            self.fill().await?;
            if !self.assign() {
                return Ok(());
            }
        }
    }

    /// Reads what the next assignment needs: records for due redeliveries, now, and look-ahead,
    /// in the background (see [`GroupTopic::read_ahead`]).
    pub(super) async fn fill(self: &Arc<Self>) -> Result<()> {
        let now = Instant::now();
        let (fetch, refill) = {
            let mut st = lock(&self.state);
            // The next read starts when less than one read is left, also while every member is
            // full: it is in when their acks come. At most two reads' worth is held.
            let mut refill = Vec::new();
            // A partition read from other nodes always has a read under way (it waits there
            // at the end of the log for more).
            let members = !st.members.is_empty();
            for (p, part) in st.parts.iter_mut().enumerate() {
                if members
                    && part.blocked.is_none()
                    && part.reading.is_none()
                    && part.lookahead_bytes < READ_AHEAD_BYTES
                    && (self.is_remote(p as u32)
                        || part.read_pos < self.topic.partitions[p].log.high_water())
                {
                    part.reading = Some(part.read_pos);
                    refill.push((p as u32, part.read_pos));
                }
            }
            let room: usize = st.members.values().map(Member::room).sum();
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
            self.tasks
                .spawn(async move { me.read_ahead(p, from).await });
        }
        let (remote, fetch): (Vec<_>, Vec<_>) =
            fetch.into_iter().partition(|&(p, _)| self.is_remote(p));
        let mut fetched = self.fetch_remote(remote).await;
        if fetch.is_empty() && fetched.is_empty() {
            return Ok(());
        }
        let topic = Arc::clone(&self.topic);
        let replicated = self.log.is_replicated();
        let (fetched_here, damaged) = tokio::task::spawn_blocking(move || {
            let mut fetched = Vec::new();
            let mut damaged = Vec::new();
            for (p, offset) in fetch {
                let log = &topic.partitions[p as usize].log;
                match read_record(log, offset) {
                    Ok(r) => fetched.push((p, offset, r)),
                    // Not readable here yet: on a cluster, this node's replica has not applied
                    // it yet (as after a restart); fetched again once it has.
                    Err(Error::Storage(storage::Error::OffsetOutOfRange { .. }))
                        if replicated && offset >= log.log_start() => {}
                    // Retention removed it (or, on one node, a crash took an unsynced tail under
                    // `fsync = never`): nothing left to redeliver.
                    Err(Error::Storage(storage::Error::OffsetOutOfRange { .. })) => {
                        fetched.push((p, offset, None));
                    }
                    Err(e) => match e.in_partition(&topic.name, p) {
                        // Damaged since it was first delivered: the partition stops here.
                        Error::Damaged(why) => damaged.push((p, offset, why)),
                        e => return Err(e),
                    },
                }
            }
            Ok((fetched, damaged))
        })
        .await
        .map_err(|e| Error::Internal(format!("group read task: {e}")))??;
        fetched.extend(fetched_here);
        let mut st = lock(&self.state);
        for (p, at, why) in damaged {
            tracing::error!(group = %self.group, error = %why, "group redelivery stopped at damage");
            st.parts[p as usize]
                .blocked
                .get_or_insert(Blocked { at, why });
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

    /// The records at due pending offsets of partitions read from other nodes, as
    /// [`GroupTopic::fill`] takes them (`None`: gone from the log). Each partition's are read
    /// in runs: one read from the lowest offset not yet read, as many bytes as a look-ahead
    /// read, answers every due offset it covers. One that cannot be read now (no holder
    /// answers, or it is past the end a holder has applied) is left out: it is fetched again
    /// at the next round.
    async fn fetch_remote(&self, due: Vec<(u32, u64)>) -> Vec<(u32, u64, Option<StoredRecord>)> {
        let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (p, offset) in due {
            by_partition.entry(p).or_default().push(offset);
        }
        let mut fetched = Vec::new();
        for (p, mut offsets) in by_partition {
            let Some(remote) = self.remote_log(p) else {
                continue;
            };
            offsets.sort_unstable();
            offsets.dedup();
            let mut offsets = offsets.as_slice();
            while let Some(&from) = offsets.first() {
                // Not waited for once the group stops (no holder may answer for a while).
                let read = tokio::select! {
                    read = remote.batches(from, READ_AHEAD_BYTES, Duration::ZERO) => read,
                    () = self.stop.cancelled() => break,
                };
                let covered = match read.and_then(|r| {
                    let (next, records) = records_from(from, &r.batches)?;
                    Ok((next.min(r.high_water), records))
                }) {
                    // Every due offset below the read's end is answered by it: its record, or
                    // none (compacted away).
                    Ok((next, records)) if next > from => {
                        let n = offsets.partition_point(|&o| o < next);
                        for &o in &offsets[..n] {
                            let record = records
                                .binary_search_by_key(&o, |r| r.offset)
                                .ok()
                                .map(|i| records[i].clone());
                            fetched.push((p, o, record));
                        }
                        n
                    }
                    // Retention removed the offsets below the log's start.
                    Err(Error::Storage(storage::Error::OffsetOutOfRange { start, .. }))
                        if from < start =>
                    {
                        let n = offsets.partition_point(|&o| o < start);
                        fetched.extend(offsets[..n].iter().map(|&o| (p, o, None)));
                        n
                    }
                    Ok(_) => {
                        tracing::debug!(group = %self.group, partition = p, offset = from, "redelivery past the end its partition's nodes have applied");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(group = %self.group, partition = p, offset = from, error = %e, "redelivery not read from the partition's nodes yet");
                        break;
                    }
                };
                offsets = &offsets[covered..];
            }
        }
        fetched
    }

    /// Reads the records after a partition's look-ahead, on the blocking pool (or from the
    /// nodes holding it), while the dispatcher goes on assigning what it has; wakes the
    /// dispatcher when they are in. Started when the look-ahead runs low, so that deliveries
    /// rarely wait for the disk.
    pub(super) async fn read_ahead(self: Arc<Self>, p: u32, from: u64) {
        if self.stop.is_cancelled() {
            return;
        }
        if let Some(remote) = self.remote_log(p) {
            // A read waits up to a second at the end of the log there (longer while no holder
            // answers): the group's stop does not wait for it.
            let read = tokio::select! {
                read = self.read_remote(&remote, from) => read,
                () = self.stop.cancelled() => return,
            };
            if read.is_err() {
                // No holder answered: tried again a little later, not in a tight loop.
                tokio::select! {
                    () = tokio::time::sleep(REMOTE_RETRY) => {}
                    () = self.stop.cancelled() => return,
                }
            }
            self.read_done(p, from, read);
            // Also after a failed read (which wakes no one): the next round reads again.
            self.wake.notify_one();
            return;
        }
        let topic = Arc::clone(&self.topic);
        let read = tokio::task::spawn_blocking(move || {
            let log = &topic.partitions[p as usize].log;
            let start = from.max(log.log_start());
            let (next, records) = records_from(start, &log.read(start, READ_AHEAD_BYTES)?)?;
            Ok::<_, Error>((start, next, records))
        })
        .await
        .map_err(|e| Error::Internal(format!("group read task: {e}")))
        .and_then(|r| r);
        self.read_done(
            p,
            from,
            read.map(|(start, next, records)| (start, next, records, None)),
        );
    }

    /// One read of partition `p` from the nodes holding it, from `from` (or its first offset,
    /// when retention removed `from`): what [`GroupTopic::read_done`] takes, with the end the
    /// node that answered has.
    async fn read_remote(&self, remote: &RemoteLog, from: u64) -> Result<AheadRead> {
        let read = match remote.batches(from, READ_AHEAD_BYTES, REMOTE_WAIT).await {
            Err(Error::Storage(storage::Error::OffsetOutOfRange { start, .. })) if from < start => {
                remote
                    .batches(start, READ_AHEAD_BYTES, Duration::ZERO)
                    .await?
            }
            read => read?,
        };
        let start = from.max(read.log_start);
        let (next, records) = records_from(start, &read.batches)?;
        Ok((start, next, records, Some(read.high_water)))
    }

    /// Takes a read-ahead's records (start, next offset, records, and for a partition read
    /// from other nodes its end) into partition `p`'s look-ahead, and wakes the dispatcher.
    fn read_done(&self, p: u32, from: u64, read: Result<AheadRead>) {
        let mut st = lock(&self.state);
        let part = &mut st.parts[p as usize];
        if part.reading == Some(from) {
            part.reading = None;
        }
        if let Ok((_, _, _, Some(end))) = &read {
            part.remote_end = *end;
        }
        match read {
            // A reset (or another read) moved the look-ahead on while this one ran: stale.
            Ok((start, next, records, _)) if part.read_pos == from => {
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
                    part.blocked = Some(Blocked { at: from, why });
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
    pub(super) fn assign(&self) -> bool {
        let now = Instant::now();
        let counted = self.log.counts_at_assignment();
        // On a cluster, each member's share goes out once its `Delivered` event is committed.
        let mut outgoing = Vec::new();
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
                Some(m) if m.tx.capacity() > 0 => (m.room().min(ROUND_QUOTA), m.tx.clone()),
                _ => continue,
            };
            if room == 0 {
                continue;
            }
            // The member's buffer keeps a place for what waits to be committed.
            let permit = match counted {
                true => match tx.clone().try_reserve_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => continue,
                },
                false => None,
            };
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
                // Nothing at or past damage goes out: the partition waits there for a reset.
                let stop = part.blocked.as_ref().map_or(u64::MAX, |b| b.at);
                // Redeliveries first, oldest first.
                while out.len() < room {
                    let Some(offset) = part.ready.keys().next().copied() else {
                        break;
                    };
                    if offset >= stop {
                        break;
                    }
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
                    if part.lookahead.front().is_none_or(|r| r.offset >= stop) {
                        break;
                    }
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
                            handed: counted,
                        },
                    );
                    timeouts.insert((deadline, p as u32, *offset));
                    if counted {
                        part.redeliveries += u64::from(*attempt > 1);
                    } else {
                        // The log records the attempts handed so far; this one counts once
                        // handed.
                        *attempt -= 1;
                    }
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
                m.taken += out.len() as u64;
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
            match permit {
                Some(permit) => outgoing.push((permit, deliveries)),
                // Room in the channel was checked under the lock; only a departed member fails
                // here, and its guard gives its deliveries back.
                None => drop(tx.try_send(Ok(Deliveries::Records(deliveries)))),
            }
            st.turn = id + 1;
            any = true;
        }
        if events.is_empty() {
            return any;
        }
        if counted {
            // Not committed: nothing goes out (and the group stops here).
            self.append_then(
                &events,
                Box::new(move |committed| {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let sent: Vec<(u32, u64, u32)> = outgoing
                            .iter()
                            .flat_map(|(_, ds)| ds.iter())
                            .map(|d| (d.partition, d.record.offset, d.attempt))
                            .collect();
                        tracing::debug!(
                            ?sent,
                            committed = committed.is_ok(),
                            "deliveries assigned"
                        );
                    }
                    if committed.is_ok() {
                        for (permit, deliveries) in outgoing {
                            permit.send(Ok(Deliveries::Records(deliveries)));
                        }
                    }
                }),
            );
        } else {
            // Not awaited nor synced on their own: delivery records only keep attempt counts,
            // and the next ack's sync covers them.
            drop(self.append_with(&events, false));
        }
        any
    }

    pub(super) async fn maybe_snapshot(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.since_snapshot.load(Ordering::Relaxed) < SNAPSHOT_EVERY_BYTES {
            return Ok(());
        }
        let done = {
            let st = lock(&self.state);
            let mut events = Vec::new();
            for (p, part) in st.parts.iter().enumerate() {
                let partition = p as u32;
                let mut state = part.snapshot();
                let delays: Vec<(u64, u64)> =
                    std::mem::take(&mut state.delayed).into_iter().collect();
                events.push(Event::Snapshot { partition, state });
                if !delays.is_empty() {
                    events.push(Event::Delayed { partition, delays });
                }
            }
            let done = self.append(&events);
            self.since_snapshot.store(0, Ordering::Relaxed);
            done
        };
        let log_offset = done
            .await
            .map_err(|_| Error::Internal("group log writer went away".into()))??;
        // Everything before the snapshot is no longer needed.
        self.log.drop_below(log_offset)
    }
}

/// The records at or after `start` in `batches` (read from `start`), and the offset after them.
fn records_from(start: u64, batches: &[storage::Batch]) -> Result<(u64, Vec<StoredRecord>)> {
    let mut records = Vec::new();
    let mut next = start;
    for batch in batches {
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
    Ok((next, records))
}
