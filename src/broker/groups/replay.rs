//! Opening a group: replaying its event log into the state (or starting a new group at its start
//! positions), and the helpers that wait for the log and read records back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::storage::{self, FileIo, FsyncPolicy, LogConfig, Partition};

use crate::broker::error::{Error, Result};
use crate::broker::topic::Topic;

use super::event_log::{EventLog, ReplicatedEvents};
use super::events::{Event, PartitionSnapshot, Reason};
use super::group::{GroupTopic, Provided, wait};
use super::state::*;

/// Where a group's event log is (see [`EventLog`]).
#[derive(Debug)]
pub enum Opening {
    /// A partition log of its own, in `dir`.
    Local { dir: PathBuf, io: Arc<dyn FileIo> },
    /// The Raft log of the group's own Raft group, run by the cluster layer.
    Replicated {
        log: Arc<Partition>,
        events: Arc<dyn ReplicatedEvents>,
    },
}

impl GroupTopic {
    /// Opens (creating if needed) the state of `group` on `topic` and starts its dispatcher.
    /// A new group starts at `start` in every partition.
    pub(crate) async fn open(
        group: &str,
        topic: Arc<Topic>,
        opening: Opening,
        provided: Provided,
        start: impl Fn(u32) -> u64,
    ) -> Result<Arc<GroupTopic>> {
        let Provided {
            settings,
            dead_letters,
            tasks,
            remote,
        } = provided;
        let config = LogConfig {
            queue_depth: 1 << 16,
            ..event_log_config(settings.fsync)
        };
        let n = topic.partitions.len();
        let (log, replayed) = tokio::task::spawn_blocking(move || {
            let log = match opening {
                Opening::Local { dir, io } => {
                    EventLog::Local(Partition::open(&dir, config, io, None)?)
                }
                Opening::Replicated { log, events } => EventLog::Replicated { log, events },
            };
            let replayed = replay(log.partition(), n)?;
            Ok::<_, Error>((log, replayed))
        })
        .await
        .map_err(|e| Error::Internal(format!("group open task: {e}")))??;
        let fresh = replayed.is_none();
        if let (Some(r), EventLog::Replicated { log: l, .. }) = (&replayed, &log) {
            for (p, s) in r.iter().enumerate() {
                tracing::debug!(group, partition = p, log_start = l.log_start(), log_end = l.high_water(), cursor = s.cursor, outstanding = ?s.outstanding, dead_letters = s.dead_letters.len(), "replayed");
            }
        }
        let snapshots = replayed.unwrap_or_else(|| {
            (0..n as u32)
                .map(|p| PartitionSnapshot {
                    cursor: start(p),
                    ..PartitionSnapshot::default()
                })
                .collect()
        });
        let now = Instant::now();
        let now_ms = unix_ms();
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
                    match s.delayed.get(&offset) {
                        // Given back by a Nack with a delay: not sooner than it asked.
                        Some(&until) => {
                            let wait = Duration::from_millis(until.saturating_sub(now_ms));
                            p.retry_delayed(offset, attempt, now + wait, until);
                        }
                        None => p.retry(offset, attempt, now),
                    }
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
            dead_letters,
            tasks,
            stop: CancellationToken::new(),
            ended: Arc::default(),
            since_snapshot: std::sync::atomic::AtomicU64::new(0),
            remote,
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
}

/// How a group's event log is kept on disk: small segments (a snapshot lets the earlier ones
/// go), synced as the broker's logs are. On a cluster, the Raft log of the group's own group.
pub fn event_log_config(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        fsync,
        preallocate_bytes: 64 << 10,
        ..LogConfig::default()
    }
}

/// Rebuilds the partitions' state from the group log; `None` when the log is empty (a new
/// group).
pub(super) fn replay(log: &Partition, partitions: usize) -> Result<Option<Vec<PartitionSnapshot>>> {
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
                apply_to(&mut state, event);
            }
            next = next.max(batch.header().next_offset());
        }
    }
    Ok(Some(state))
}

/// The partitions' state after `events`, from nothing: what opening a group computes from its
/// log (public for the fuzz target of the group log).
pub fn fold(events: impl IntoIterator<Item = Event>, partitions: usize) -> Vec<PartitionSnapshot> {
    let mut state = vec![PartitionSnapshot::default(); partitions];
    for event in events {
        apply_to(&mut state, event);
    }
    state
}

/// Applies `event` to its partition's state; an event of a partition the topic no longer has is
/// skipped.
fn apply_to(state: &mut [PartitionSnapshot], event: Event) {
    if let Some(s) = state.get_mut(event.partition() as usize) {
        apply(s, event);
    }
}

pub(super) fn apply(s: &mut PartitionSnapshot, event: Event) {
    match event {
        Event::Delivered { deliveries, .. } => {
            for (offset, handed_before) in deliveries {
                s.outstanding.insert(offset, handed_before);
                s.delayed.remove(&offset);
                s.cursor = s.cursor.max(offset.saturating_add(1));
            }
        }
        Event::Handed { deliveries, .. } => {
            for (offset, attempt) in deliveries {
                if attempt > 1 {
                    s.redeliveries = s.redeliveries.saturating_add(1);
                }
                s.outstanding.insert(offset, attempt);
                s.delayed.remove(&offset);
            }
        }
        Event::Acked { offsets, .. } => {
            for o in offsets {
                s.outstanding.remove(&o);
                s.delayed.remove(&o);
            }
        }
        Event::Reset { cursor, .. } => {
            s.outstanding.clear();
            s.dead_letters.clear();
            s.delayed.clear();
            s.cursor = cursor;
        }
        Event::DeadLetterPending { dead_letter, .. } => {
            s.outstanding.remove(&dead_letter.offset);
            s.delayed.remove(&dead_letter.offset);
            s.dead_letters.retain(|d| d.offset != dead_letter.offset);
            s.dead_letters.push(dead_letter);
        }
        Event::DeadLettered { offset, .. } => {
            let before = s.dead_letters.len();
            s.dead_letters.retain(|d| d.offset != offset);
            if s.dead_letters.len() < before {
                s.dead_lettered = s.dead_lettered.saturating_add(1);
            }
        }
        Event::Delayed { delays, .. } => {
            for (offset, until) in delays {
                if s.outstanding.contains_key(&offset) {
                    s.delayed.insert(offset, until);
                }
            }
        }
        Event::Snapshot { state, .. } => *s = state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(events: Vec<Event>) -> PartitionSnapshot {
        let mut s = PartitionSnapshot::default();
        for e in events {
            apply(&mut s, e);
        }
        s
    }

    /// A Nack's delay is part of the replayed state while its delivery is outstanding, through
    /// a snapshot (which carries it as a `Delayed` event after the `Snapshot`), and is gone as
    /// soon as anything settles or re-delivers that offset.
    /// Found by the `group_events` fuzz target: counters and the cursor restored at their
    /// largest values overflowed on the next event (a panic with overflow checks; wrapped to 0
    /// without). They stay at their largest.
    #[test]
    fn replay_saturates_at_the_largest_counters_and_offsets() {
        let top = PartitionSnapshot {
            cursor: u64::MAX,
            redeliveries: u64::MAX,
            dead_lettered: u64::MAX,
            ..PartitionSnapshot::default()
        };
        let s = replayed(vec![
            Event::Snapshot {
                partition: 0,
                state: top,
            },
            Event::Delivered {
                partition: 0,
                deliveries: vec![(u64::MAX, 0)],
            },
            Event::Handed {
                partition: 0,
                deliveries: vec![(u64::MAX, 2)],
            },
            Event::DeadLetterPending {
                partition: 0,
                dead_letter: super::super::events::DeadLetter {
                    offset: u64::MAX,
                    attempts: 2,
                    dlq_mark: 0,
                    reason: Reason::Nacked,
                },
            },
            Event::DeadLettered {
                partition: 0,
                offset: u64::MAX,
            },
        ]);
        assert_eq!(
            (s.cursor, s.redeliveries, s.dead_lettered),
            (u64::MAX, u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn a_nack_delay_lasts_until_its_offset_moves_on() {
        let delivered = || Event::Delivered {
            partition: 0,
            deliveries: vec![(3, 0), (4, 0), (5, 0)],
        };
        let delayed = |offsets: &[u64]| Event::Delayed {
            partition: 0,
            delays: offsets.iter().map(|&o| (o, 1_000 + o)).collect(),
        };
        let held = |s: &PartitionSnapshot| s.delayed.keys().copied().collect::<Vec<_>>();

        // Only outstanding offsets can be delayed.
        let s = replayed(vec![delivered(), delayed(&[3, 4, 9])]);
        assert_eq!(held(&s), [3, 4]);
        assert_eq!(s.delayed[&3], 1_003);

        let table: Vec<(Event, Vec<u64>)> = vec![
            (
                Event::Acked {
                    partition: 0,
                    offsets: vec![3],
                },
                vec![4],
            ),
            (
                Event::Handed {
                    partition: 0,
                    deliveries: vec![(4, 2)],
                },
                vec![3],
            ),
            (
                Event::Delivered {
                    partition: 0,
                    deliveries: vec![(3, 1)],
                },
                vec![4],
            ),
            (
                Event::DeadLetterPending {
                    partition: 0,
                    dead_letter: super::super::events::DeadLetter {
                        offset: 4,
                        attempts: 5,
                        dlq_mark: 0,
                        reason: Reason::Nacked,
                    },
                },
                vec![3],
            ),
            (
                Event::Reset {
                    partition: 0,
                    cursor: 10,
                },
                vec![],
            ),
        ];
        for (then, left) in table {
            let s = replayed(vec![delivered(), delayed(&[3, 4]), then.clone()]);
            assert_eq!(held(&s), left, "after {then:?}");
        }

        // A snapshot replaces the state; the `Delayed` written beside it brings the delays back.
        let mut state = replayed(vec![delivered(), delayed(&[5])]);
        let delays: Vec<_> = std::mem::take(&mut state.delayed).into_iter().collect();
        let encoded = Event::Snapshot {
            partition: 0,
            state: state.clone(),
        }
        .encode();
        let snapshot = Event::decode(&encoded).unwrap();
        let s = replayed(vec![
            delivered(),
            delayed(&[3]),
            snapshot,
            Event::Delayed {
                partition: 0,
                delays,
            },
        ]);
        assert_eq!(held(&s), [5]);
    }
}
