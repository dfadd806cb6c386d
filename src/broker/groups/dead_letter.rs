//! Dead-lettering: deliveries past `max_deliveries` (or left at their last attempt) are copied to
//! `<topic>.dlq` with headers saying where they came from and why, then recorded as done in the
//! group log; after a crash the half-done ones are found in the DLQ and finished, never copied
//! twice. Also the expiry of ack deadlines, which feeds it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::storage::{self, Header, StoredRecord};

use crate::broker::error::{Error, Result};
use crate::broker::message::NewMessage;
use crate::broker::topic::{PartitionHandle, Topic};

use super::events::{DeadLetter, Event, Reason};
use super::group::{GroupTopic, wait};
use super::state::*;

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

impl GroupTopic {
    /// Moves timed-out deliveries back to pending (or to dead-lettering); returns the next
    /// moment something becomes due.
    pub(super) fn expire(&self) -> Option<Instant> {
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
                    part.ack_timeouts += 1;
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
    pub(super) async fn dead_letter(&self) -> Result<()> {
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
        let dlq = dlq_topic(&self.topic.name);
        for (i, (p, d)) in todo.iter().enumerate() {
            let mut d = *d;
            if let Err(e) = self.dead_letter_one(&dlq, *p, &mut d).await {
                // This one and every one not tried yet are marked not started, so that the
                // next round tries them again.
                let mut st = lock(&self.state);
                for (p, d) in &todo[i..] {
                    if let Some((_, started)) =
                        st.parts[*p as usize].dead_lettering.get_mut(&d.offset)
                    {
                        *started = false;
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    pub(super) async fn dead_letter_one(
        &self,
        dlq: &str,
        p: u32,
        d: &mut DeadLetter,
    ) -> Result<()> {
        let dlq_topic: Arc<Topic> = self.dead_letters.topic(dlq).await?;
        let dlq_partition = &dlq_topic.partitions[0];
        // On a cluster the node that finishes a dead letter may not be the one that started
        // it, nor hold the DLQ's partition: the copy carries an id unique to this
        // dead-lettering (the mark is then a random number, recorded with the intent), and the
        // DLQ's id index stores it once however often it is sent.
        let by_id = self.log.is_replicated();
        if d.dlq_mark == u64::MAX {
            // First try: record the intent with the DLQ's current end (or the random mark).
            d.dlq_mark = match by_id {
                true => unique_mark(),
                false => dlq_partition.log.high_water(),
            };
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
            if let Err(e) = wait(done).await {
                // Not recorded (or not known to be): the next try records an intent again
                // before any copy goes out. A copy sent under an intent that a new leader never
                // learnt would be sent again by it under its own mark: twice in the DLQ.
                let mut st = lock(&self.state);
                if let Some((stored, _)) = st.parts[p as usize].dead_lettering.get_mut(&d.offset) {
                    stored.dlq_mark = u64::MAX;
                }
                return Err(e);
            }
        } else if !by_id && self.find_in_dlq(dlq_partition, p, d).await? {
            // A crash came between the DLQ append and the final event.
            return self.finish_dead_letter(p, d.offset).await;
        }
        let record = match self.record_at(p, d.offset).await {
            Ok(record) => record,
            // Removed by retention (or lost with an unsynced tail on one node): the dead letter
            // carries the headers only. On a cluster a record past this replica's end (or the
            // end of the node it was read from) is not applied there yet: the error has the
            // dead-lettering tried again shortly.
            Err(Error::Storage(storage::Error::OffsetOutOfRange { start, .. }))
                if !(by_id && d.offset >= start) =>
            {
                None
            }
            Err(e) => return Err(e),
        };
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
            // The original's id stays with the original: a dead letter is a copy, and its
            // topic's id window must not refuse the same message dead-lettered again.
            id: by_id
                .then(|| Bytes::from(format!("sluice.dlq:{:016x}:{p}:{}", d.dlq_mark, d.offset))),
        };
        self.dead_letters.append(&dlq_topic, message).await?;
        tracing::info!(group = %self.group, topic = %self.topic.name, partition = p, offset = d.offset,
            attempts = d.attempts, reason = d.reason.as_str(), "dead-lettered");
        self.finish_dead_letter(p, d.offset).await
    }

    pub(super) async fn finish_dead_letter(&self, p: u32, offset: u64) -> Result<()> {
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
    pub(super) async fn find_in_dlq(
        &self,
        dlq: &Arc<PartitionHandle>,
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
}

/// A random mark for a dead letter on a cluster (never `u64::MAX`, which means none yet).
fn unique_mark() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish().min(u64::MAX - 1)
}
