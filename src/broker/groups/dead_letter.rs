//! Dead-lettering: deliveries past `max_deliveries` (or left at their last attempt) are copied to
//! `<topic>.dlq` with headers saying where they came from and why, then recorded as done in the
//! group log; after a crash the half-done ones are found in the DLQ and finished, never copied
//! twice. Also the expiry of ack deadlines, which feeds it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::storage::{Header, StoredRecord};

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
        for (p, mut d) in todo {
            let result = self.dead_letter_one(&dlq, p, &mut d).await;
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

    pub(super) async fn dead_letter_one(
        &self,
        dlq: &str,
        p: u32,
        d: &mut DeadLetter,
    ) -> Result<()> {
        let dlq_topic: Arc<Topic> = self.dead_letters.topic(dlq).await?;
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
        let record = self.topic.partitions[p as usize]
            .read_record(d.offset)
            .await?;
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
            id: None,
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
