//! The events a consumer group's state is made of, as stored in the group's log.
//!
//! A group's state for one topic lives in a partition log of its own
//! (`data/groups/<group>/<topic>/`), so it gets the log's CRC framing, group-commit `fdatasync`
//! and torn-tail recovery. Each record's value is one event. Replaying the log from its start
//! (or from the last snapshot) rebuilds the state; a snapshot is a batch of `Snapshot` events,
//! one per partition, written atomically in one batch, after which older segments are deleted.
//!
//! # Event layout (little-endian; varints are LEB128)
//!
//! | offset | size | field       | notes                                  |
//! |-------:|-----:|-------------|----------------------------------------|
//! |      0 |    1 | `version`   | 1                                      |
//! |      1 |    1 | `kind`      | see below                              |
//! |      2 |    4 | `partition` | u32                                    |
//! |      6 |    … | body        | by kind                                |
//!
//! | kind | name                | body                                                              |
//! |-----:|---------------------|-------------------------------------------------------------------|
//! |    1 | `Delivered`         | varint n, then n × (varint offset delta, varint attempts handed before this delivery) |
//! |    2 | `Acked`             | varint n, then n × varint offset delta                            |
//! |    3 | `Reset`             | u64 cursor: next offset to deliver; nothing outstanding          |
//! |    4 | `DeadLetterPending` | u64 offset, u32 attempts, u64 DLQ high-water mark, u8 reason     |
//! |    5 | `DeadLettered`      | u64 offset                                                        |
//! |    6 | `Snapshot`          | u64 cursor, u64 redeliveries, u64 dead-lettered, varint n, n × (varint offset delta, varint attempt), varint m, m × (u64 offset, u32 attempts, u64 DLQ mark, u8 reason) |
//!
//! |    7 | `Handed`            | varint n, then n × (varint offset delta, varint attempt): deliveries handed to the transport, the attempt now counted |
//! |    8 | `Delayed`           | varint n, then n × (varint offset delta, u64 unix ms): outstanding deliveries given back by a Nack with a delay, not to go out again before that time |
//!
//! A delivery counts as an attempt when it is handed to the transport (`Handed`), not when it is
//! assigned to a member (`Delivered`, which moves the cursor). Logs written before `Handed`
//! existed recorded the attempt in `Delivered`; read as "handed before", they count it once
//! more at most. Offset lists are ascending; each delta is from the previous offset (the first from 0).
//!
//! A `Delayed` time is wall-clock time, so a Nack's delay holds across a restart and, on a
//! cluster, on whichever node leads the group next (as closely as the nodes' clocks agree). A
//! snapshot carries the delays still outstanding as a `Delayed` event after the partition's
//! `Snapshot`, in the same batch.

use std::collections::BTreeMap;

use crate::storage::varint;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Nacked,
    AckTimeout,
    /// The member holding it left (or its connection went away).
    MemberLeft,
    /// It was out, at its last attempt, when the broker stopped.
    Restarted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Nacked => "nacked",
            Reason::AckTimeout => "ack timeout",
            Reason::MemberLeft => "member left",
            Reason::Restarted => "unacknowledged at restart",
        }
    }

    fn code(self) -> u8 {
        match self {
            Reason::Nacked => 1,
            Reason::AckTimeout => 2,
            Reason::MemberLeft => 3,
            Reason::Restarted => 4,
        }
    }

    fn from_code(c: u8) -> Option<Reason> {
        match c {
            1 => Some(Reason::Nacked),
            2 => Some(Reason::AckTimeout),
            3 => Some(Reason::MemberLeft),
            4 => Some(Reason::Restarted),
            _ => None,
        }
    }
}

/// A dead-lettering in progress: the DLQ append may or may not have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetter {
    pub offset: u64,
    pub attempts: u32,
    /// The DLQ's high-water mark before the append: recovery looks for the record from here.
    /// On a cluster, a random number naming this dead-lettering: part of the copy's id, which
    /// the DLQ stores once however often the copy is sent.
    pub dlq_mark: u64,
    pub reason: Reason,
}

/// The persisted state of one partition of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionSnapshot {
    pub cursor: u64,
    pub redeliveries: u64,
    pub dead_lettered: u64,
    /// Delivered and not acknowledged: offset → deliveries so far.
    pub outstanding: BTreeMap<u64, u32>,
    pub dead_letters: Vec<DeadLetter>,
    /// Outstanding offsets a Nack gave back with a delay: offset → not before (unix ms). Held
    /// by `Delayed` events, not by a `Snapshot` event's bytes.
    pub delayed: BTreeMap<u64, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Assigned to a member: (offset, attempts handed before), ascending by offset.
    Delivered {
        partition: u32,
        deliveries: Vec<(u64, u32)>,
    },
    /// Handed to the transport: (offset, attempt), ascending by offset.
    Handed {
        partition: u32,
        deliveries: Vec<(u64, u32)>,
    },
    Acked {
        partition: u32,
        offsets: Vec<u64>,
    },
    Reset {
        partition: u32,
        cursor: u64,
    },
    DeadLetterPending {
        partition: u32,
        dead_letter: DeadLetter,
    },
    DeadLettered {
        partition: u32,
        offset: u64,
    },
    /// Given back by a Nack: (offset, not before in unix ms), ascending by offset.
    Delayed {
        partition: u32,
        delays: Vec<(u64, u64)>,
    },
    /// The partition's state; its `delayed` is not encoded (a `Delayed` event follows).
    Snapshot {
        partition: u32,
        state: PartitionSnapshot,
    },
}

const VERSION: u8 = 1;

fn put_varint(b: &mut Vec<u8>, v: u64) {
    varint::put_u(b, v);
}

impl Event {
    pub fn partition(&self) -> u32 {
        match self {
            Event::Delivered { partition, .. }
            | Event::Handed { partition, .. }
            | Event::Acked { partition, .. }
            | Event::Reset { partition, .. }
            | Event::DeadLetterPending { partition, .. }
            | Event::DeadLettered { partition, .. }
            | Event::Delayed { partition, .. }
            | Event::Snapshot { partition, .. } => *partition,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![VERSION, 0];
        b.extend_from_slice(&self.partition().to_le_bytes());
        let put_dead = |b: &mut Vec<u8>, d: &DeadLetter| {
            b.extend_from_slice(&d.offset.to_le_bytes());
            b.extend_from_slice(&d.attempts.to_le_bytes());
            b.extend_from_slice(&d.dlq_mark.to_le_bytes());
            b.push(d.reason.code());
        };
        let put_pairs = |b: &mut Vec<u8>, pairs: &mut dyn Iterator<Item = (u64, u32)>, n: usize| {
            put_varint(b, n as u64);
            let mut prev = 0;
            for (o, a) in pairs {
                put_varint(b, o - prev);
                put_varint(b, u64::from(a));
                prev = o;
            }
        };
        match self {
            Event::Delivered { deliveries, .. } => {
                b[1] = 1;
                put_pairs(&mut b, &mut deliveries.iter().copied(), deliveries.len());
            }
            Event::Handed { deliveries, .. } => {
                b[1] = 7;
                put_pairs(&mut b, &mut deliveries.iter().copied(), deliveries.len());
            }
            Event::Acked { offsets, .. } => {
                b[1] = 2;
                put_varint(&mut b, offsets.len() as u64);
                let mut prev = 0;
                for &o in offsets {
                    put_varint(&mut b, o - prev);
                    prev = o;
                }
            }
            Event::Reset { cursor, .. } => {
                b[1] = 3;
                b.extend_from_slice(&cursor.to_le_bytes());
            }
            Event::DeadLetterPending { dead_letter, .. } => {
                b[1] = 4;
                put_dead(&mut b, dead_letter);
            }
            Event::DeadLettered { offset, .. } => {
                b[1] = 5;
                b.extend_from_slice(&offset.to_le_bytes());
            }
            Event::Delayed { delays, .. } => {
                b[1] = 8;
                put_varint(&mut b, delays.len() as u64);
                let mut prev = 0;
                for &(o, until) in delays {
                    put_varint(&mut b, o - prev);
                    b.extend_from_slice(&until.to_le_bytes());
                    prev = o;
                }
            }
            Event::Snapshot { state, .. } => {
                b[1] = 6;
                b.extend_from_slice(&state.cursor.to_le_bytes());
                b.extend_from_slice(&state.redeliveries.to_le_bytes());
                b.extend_from_slice(&state.dead_lettered.to_le_bytes());
                put_pairs(
                    &mut b,
                    &mut state.outstanding.iter().map(|(&o, &a)| (o, a)),
                    state.outstanding.len(),
                );
                put_varint(&mut b, state.dead_letters.len() as u64);
                for d in &state.dead_letters {
                    put_dead(&mut b, d);
                }
            }
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Event, &'static str> {
        let mut r = Reader { b, pos: 0 };
        if r.u8()? != VERSION {
            return Err("unknown group event version");
        }
        let kind = r.u8()?;
        let partition = r.u32()?;
        let event = match kind {
            1 => Event::Delivered {
                partition,
                deliveries: r.pairs()?,
            },
            2 => {
                let n = r.count()?;
                let mut offsets = Vec::with_capacity(n);
                let mut prev = 0u64;
                for _ in 0..n {
                    prev = prev.checked_add(r.varint()?).ok_or("offset overflows")?;
                    offsets.push(prev);
                }
                Event::Acked { partition, offsets }
            }
            3 => Event::Reset {
                partition,
                cursor: r.u64()?,
            },
            4 => Event::DeadLetterPending {
                partition,
                dead_letter: r.dead_letter()?,
            },
            5 => Event::DeadLettered {
                partition,
                offset: r.u64()?,
            },
            6 => {
                let cursor = r.u64()?;
                let redeliveries = r.u64()?;
                let dead_lettered = r.u64()?;
                let outstanding = r.pairs()?.into_iter().collect();
                let m = r.count()?;
                let mut dead_letters = Vec::with_capacity(m);
                for _ in 0..m {
                    dead_letters.push(r.dead_letter()?);
                }
                Event::Snapshot {
                    partition,
                    state: PartitionSnapshot {
                        cursor,
                        redeliveries,
                        dead_lettered,
                        outstanding,
                        dead_letters,
                        delayed: BTreeMap::new(),
                    },
                }
            }
            7 => Event::Handed {
                partition,
                deliveries: r.pairs()?,
            },
            8 => {
                let n = r.count()?;
                let mut delays = Vec::with_capacity(n);
                let mut prev = 0u64;
                for _ in 0..n {
                    prev = prev.checked_add(r.varint()?).ok_or("offset overflows")?;
                    delays.push((prev, r.u64()?));
                }
                Event::Delayed { partition, delays }
            }
            _ => return Err("unknown group event kind"),
        };
        if r.pos != b.len() {
            return Err("trailing bytes in group event");
        }
        Ok(event)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], &'static str> {
        let s = self
            .b
            .get(self.pos..self.pos + n)
            .ok_or("group event cut short")?;
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        varint::get_u(self.b, &mut self.pos, self.b.len())
            .map_err(|e| e.describe("group event cut short"))
    }

    /// A count, bounded by the bytes left (each item takes at least one byte).
    fn count(&mut self) -> Result<usize, &'static str> {
        let n = self.varint()?;
        if n > (self.b.len() - self.pos) as u64 {
            return Err("count larger than the event");
        }
        Ok(n as usize)
    }

    fn pairs(&mut self) -> Result<Vec<(u64, u32)>, &'static str> {
        let n = self.count()?;
        let mut out = Vec::with_capacity(n);
        let mut prev = 0u64;
        for _ in 0..n {
            prev = prev.checked_add(self.varint()?).ok_or("offset overflows")?;
            let attempt = u32::try_from(self.varint()?).map_err(|_| "attempt overflows")?;
            out.push((prev, attempt));
        }
        Ok(out)
    }

    fn dead_letter(&mut self) -> Result<DeadLetter, &'static str> {
        Ok(DeadLetter {
            offset: self.u64()?,
            attempts: self.u32()?,
            dlq_mark: self.u64()?,
            reason: Reason::from_code(self.u8()?).ok_or("unknown dead-letter reason")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips_and_damage_is_refused() {
        let dead = DeadLetter {
            offset: 9,
            attempts: 5,
            dlq_mark: 3,
            reason: Reason::AckTimeout,
        };
        let events = vec![
            Event::Delivered {
                partition: 2,
                deliveries: vec![(5, 1), (7, 3), (1000, 1)],
            },
            Event::Handed {
                partition: 2,
                deliveries: vec![(5, 2), (7, 4)],
            },
            Event::Acked {
                partition: 0,
                offsets: vec![1, 2, 900],
            },
            Event::Reset {
                partition: 1,
                cursor: 77,
            },
            Event::DeadLetterPending {
                partition: 3,
                dead_letter: dead,
            },
            Event::DeadLetterPending {
                partition: 3,
                dead_letter: DeadLetter {
                    reason: Reason::MemberLeft,
                    ..dead
                },
            },
            Event::DeadLetterPending {
                partition: 3,
                dead_letter: DeadLetter {
                    reason: Reason::Restarted,
                    ..dead
                },
            },
            Event::DeadLettered {
                partition: 3,
                offset: 9,
            },
            Event::Delayed {
                partition: 1,
                delays: vec![(4, 1_700_000_000_000), (90, u64::MAX)],
            },
            Event::Snapshot {
                partition: 4,
                state: PartitionSnapshot {
                    cursor: 100,
                    redeliveries: 4,
                    dead_lettered: 1,
                    outstanding: [(50, 2), (60, 1)].into_iter().collect(),
                    dead_letters: vec![dead],
                    delayed: BTreeMap::new(),
                },
            },
        ];
        for e in events {
            let bytes = e.encode();
            assert_eq!(Event::decode(&bytes), Ok(e.clone()));
            for cut in 0..bytes.len() {
                assert!(Event::decode(&bytes[..cut]).is_err(), "{e:?} cut at {cut}");
            }
        }
    }
}
