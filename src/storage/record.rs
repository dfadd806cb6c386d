//! The record batch: the unit that is framed, checksummed, written and read.
//!
//! A producer's records are encoded into one batch off the writer pool; the partition writer
//! only stamps the base offset and the CRC ([`EncodedBatch::seal`]). Readers get whole batches
//! back as [`Batch`] (one `Bytes` buffer) and iterate its records without copying payloads.
//!
//! # Batch layout (all integers little-endian)
//!
//! | offset | size | field               | notes                                              |
//! |-------:|-----:|---------------------|----------------------------------------------------|
//! |      0 |    4 | `length`            | bytes that follow this field (batch = 4 + length)  |
//! |      4 |    1 | `magic`             | format version, [`MAGIC_V1`] = 1                   |
//! |      5 |    4 | `crc`               | CRC-32 (IEEE, crc32fast) of bytes `9 .. 4+length`  |
//! |      9 |    8 | `base_offset`       | offset of the first record (u64)                   |
//! |     17 |    4 | `last_offset_delta` | last offset covered minus base (u32)               |
//! |     21 |    4 | `record_count`      | records in the batch (u32, >= 1; 0 only in an emptied Raft entry, below) |
//! |     25 |    8 | `first_timestamp`   | ms since the Unix epoch of the first record (i64)  |
//! |     33 |    8 | `max_timestamp`     | largest record timestamp (i64)                     |
//! |     41 |    8 | `producer_id`       | i64, -1 = none                                     |
//! |     49 |    4 | `producer_seq`      | i32, -1 = none                                     |
//! |     53 |    2 | `attributes`        | bit 0 ([`ATTR_IDS`]): records carry an id; bit 1 ([`ATTR_CONTROL`], version 2 only): a Raft control entry; rest 0 |
//! |     55 |    … | records             | `record_count` records, as below (version 1)       |
//!
//! # Version 2: a Raft entry (cluster mode)
//!
//! A partition replicated by Raft stores each Raft log entry as one batch, so the partition log
//! *is* the Raft log. Magic 2 adds the entry's id after the fixed header, covered by the CRC:
//!
//! | offset | size | field        | notes                                         |
//! |-------:|-----:|--------------|-----------------------------------------------|
//! |     55 |    8 | `term`       | the Raft term that proposed the entry (u64)   |
//! |     63 |    8 | `raft_index` | the entry's Raft log index (u64)              |
//! |     71 |    … | records      | as in version 1; or, for a control entry, its payload |
//!
//! A control entry (attribute bit 1: Raft's blank and membership entries, and the partition
//! leader's commands such as a retention point) carries no records
//! and covers no offsets: `record_count` 0, `last_offset_delta` 0, `base_offset` the offset the
//! next data batch gets, so consumer offsets stay dense. Its bytes after the header are one kind
//! byte ([`ControlKind`]) and the kind's payload. Readers of messages skip control batches.
//!
//! # Record layout (varints are LEB128; "zigzag" ones are signed)
//!
//! | field              | encoding                                          |
//! |--------------------|---------------------------------------------------|
//! | `length`           | varint: bytes of the record after this field      |
//! | `offset_delta`     | varint: offset minus `base_offset`                |
//! | `timestamp_delta`  | zigzag varint: timestamp minus `first_timestamp`  |
//! | `key_length`       | zigzag varint, -1 = no key                        |
//! | `key`              | `key_length` bytes                                |
//! | `value_length`     | zigzag varint, -1 = no value (a tombstone)        |
//! | `value`            | `value_length` bytes                              |
//! | `header_count`     | varint                                            |
//! | headers            | each: varint key length, UTF-8 key, varint value length, value |
//! | `id_length`        | only with [`ATTR_IDS`]: zigzag varint, -1 = no id |
//! | `id`               | `id_length` bytes: the producer's id (idempotent Send) |
//!
//! A batch without ids has attributes 0 and is byte for byte what the format was before ids.
//!
//! `last_offset_delta` can exceed `record_count - 1` once compaction has removed records: offsets
//! are never reused, so the next batch always starts at `base_offset + last_offset_delta + 1`.
//!
//! **An emptied Raft entry**: compaction of a replicated partition can remove every record of an
//! entry. The entry stays (the Raft log has no holes), as a data batch with `record_count` 0
//! that still covers its offsets (`last_offset_delta` as before, timestamps as before), so a
//! follower that receives it from its leader stamps the entries after it at the same offsets.
//! Readers of messages find nothing in it. Only a Raft entry (version 2, or its proposal form
//! on the wire) may be empty: the log refuses an empty batch from anywhere else.
//!
//! Over 450 lines with one job: the batch format, its encoder and decoder side by side.

use bytes::Bytes;

use super::error::Error;
use super::varint;

/// A single-node batch (and every batch written before replication existed).
pub const MAGIC_V1: u8 = 1;
/// A Raft entry: version 1's header, then the entry's term and index.
pub const MAGIC_V2: u8 = 2;

pub const LENGTH_OFFSET: usize = 0;
pub const MAGIC_OFFSET: usize = 4;
pub const CRC_OFFSET: usize = 5;
/// The CRC covers everything from here to the end of the batch.
pub const CRC_START: usize = 9;
pub const BASE_OFFSET_OFFSET: usize = 9;
pub const LAST_OFFSET_DELTA_OFFSET: usize = 17;
pub const RECORD_COUNT_OFFSET: usize = 21;
pub const FIRST_TIMESTAMP_OFFSET: usize = 25;
pub const MAX_TIMESTAMP_OFFSET: usize = 33;
pub const PRODUCER_ID_OFFSET: usize = 41;
pub const PRODUCER_SEQ_OFFSET: usize = 49;
pub const ATTRIBUTES_OFFSET: usize = 53;
/// Batch attribute: every record ends with an optional id (see the record layout).
pub const ATTR_IDS: u16 = 1;
/// Batch attribute (version 2 only): a Raft control entry, no records, no offsets.
pub const ATTR_CONTROL: u16 = 2;
/// Size of the fixed batch header; records follow (version 1).
pub const BATCH_HEADER_LEN: usize = 55;
pub const TERM_OFFSET: usize = 55;
pub const RAFT_INDEX_OFFSET: usize = 63;
/// Size of a version 2 header: the fixed header and the Raft entry id.
pub const RAFT_HEADER_LEN: usize = 71;
/// The most header bytes any version has: what a reader fetches to parse a header.
pub const MAX_HEADER_LEN: usize = RAFT_HEADER_LEN;
/// No batch, whatever the configuration, is larger than this: a length field above it is
/// corruption, never an allocation.
pub const MAX_BATCH_LEN: usize = 256 << 20;

/// A header attached to a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Bytes,
}

/// A record as a producer hands it in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    pub key: Option<Bytes>,
    /// `None` is a tombstone: for compacted topics, "delete this key".
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    /// The producer's id for this message (idempotent Send), at most `MAX_ID_BYTES`.
    pub id: Option<Bytes>,
}

/// A record as it was stored, with its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    pub id: Option<Bytes>,
}

impl From<StoredRecord> for Record {
    /// The record as it would be handed in again (its offset dropped).
    fn from(r: StoredRecord) -> Record {
        Record {
            timestamp: r.timestamp,
            key: r.key,
            value: r.value,
            headers: r.headers,
            id: r.id,
        }
    }
}

/// A batch encoded by a producer-side thread, waiting for the writer to stamp its base offset.
#[derive(Debug)]
pub struct EncodedBatch {
    buf: Vec<u8>,
}

impl EncodedBatch {
    /// Encodes records with dense offset deltas `0..records.len()`.
    pub fn new(records: &[Record]) -> Self {
        let deltas = (0u32..).zip(records);
        let last = records.len().saturating_sub(1) as u32;
        Self::with_offset_deltas(deltas, last)
    }

    /// Encodes records with explicit offset deltas (compaction keeps original offsets).
    /// `records` must not be empty: an empty batch is rejected by [`EncodedBatch::check`].
    pub fn with_offset_deltas<'a>(
        records: impl IntoIterator<Item = (u32, &'a Record)> + Clone,
        last_offset_delta: u32,
    ) -> Self {
        let mut iter = records.clone().into_iter().peekable();
        let first_ts = iter.peek().map_or(0, |(_, r)| r.timestamp);
        let ids = records.clone().into_iter().any(|(_, r)| r.id.is_some());
        let mut max_ts = i64::MIN;
        let mut count: u32 = 0;
        // Sized first and written once: no per-record scratch copy, no reallocation.
        let body_len = |delta: u32, r: &Record| {
            varint::len_u(u64::from(delta))
                + varint::len_i(r.timestamp.wrapping_sub(first_ts))
                + opt_bytes_len(r.key.as_deref())
                + opt_bytes_len(r.value.as_deref())
                + varint::len_u(r.headers.len() as u64)
                + r.headers
                    .iter()
                    .map(|h| {
                        varint::len_u(h.key.len() as u64)
                            + h.key.len()
                            + varint::len_u(h.value.len() as u64)
                            + h.value.len()
                    })
                    .sum::<usize>()
                + if ids {
                    opt_bytes_len(r.id.as_deref())
                } else {
                    0
                }
        };
        let total: usize = records
            .clone()
            .into_iter()
            .map(|(delta, r)| {
                let n = body_len(delta, r);
                varint::len_u(n as u64) + n
            })
            .sum();
        let mut buf = Vec::with_capacity(BATCH_HEADER_LEN + total);
        buf.resize(BATCH_HEADER_LEN, 0);
        for (delta, r) in iter {
            count += 1;
            max_ts = max_ts.max(r.timestamp);
            varint::put_u(&mut buf, body_len(delta, r) as u64);
            varint::put_u(&mut buf, u64::from(delta));
            varint::put_i(&mut buf, r.timestamp.wrapping_sub(first_ts));
            put_opt_bytes(&mut buf, r.key.as_deref());
            put_opt_bytes(&mut buf, r.value.as_deref());
            varint::put_u(&mut buf, r.headers.len() as u64);
            for h in &r.headers {
                varint::put_u(&mut buf, h.key.len() as u64);
                buf.extend_from_slice(h.key.as_bytes());
                varint::put_u(&mut buf, h.value.len() as u64);
                buf.extend_from_slice(&h.value);
            }
            if ids {
                put_opt_bytes(&mut buf, r.id.as_deref());
            }
        }
        if count == 0 {
            max_ts = first_ts;
        }
        Self::with_header(buf, last_offset_delta, count, (first_ts, max_ts), ids)
    }

    /// A version 1 batch of the records encoded in `buf` after room for the header.
    fn with_header(
        mut buf: Vec<u8>,
        last_offset_delta: u32,
        count: u32,
        (first_ts, max_ts): (i64, i64),
        ids: bool,
    ) -> Self {
        let length = (buf.len() - 4) as u32;
        buf[LENGTH_OFFSET..4].copy_from_slice(&length.to_le_bytes());
        buf[MAGIC_OFFSET] = MAGIC_V1;
        buf[LAST_OFFSET_DELTA_OFFSET..RECORD_COUNT_OFFSET]
            .copy_from_slice(&last_offset_delta.to_le_bytes());
        buf[RECORD_COUNT_OFFSET..FIRST_TIMESTAMP_OFFSET].copy_from_slice(&count.to_le_bytes());
        buf[FIRST_TIMESTAMP_OFFSET..MAX_TIMESTAMP_OFFSET].copy_from_slice(&first_ts.to_le_bytes());
        buf[MAX_TIMESTAMP_OFFSET..PRODUCER_ID_OFFSET].copy_from_slice(&max_ts.to_le_bytes());
        buf[PRODUCER_ID_OFFSET..PRODUCER_SEQ_OFFSET].copy_from_slice(&(-1i64).to_le_bytes());
        buf[PRODUCER_SEQ_OFFSET..ATTRIBUTES_OFFSET].copy_from_slice(&(-1i32).to_le_bytes());
        let attributes = if ids { ATTR_IDS } else { 0 };
        buf[ATTRIBUTES_OFFSET..BATCH_HEADER_LEN].copy_from_slice(&attributes.to_le_bytes());
        EncodedBatch { buf }
    }

    /// A version 1 batch as [`EncodedBatch::new`] made it (a Raft proposal carries these bytes
    /// from the leader to its followers); refused unless the framing checks out.
    pub fn from_encoded(buf: Vec<u8>) -> Result<Self, &'static str> {
        BatchHeader::of_proposal(&buf)?;
        Ok(EncodedBatch { buf })
    }

    /// A Raft entry's payload (see [`BatchHeader::of_entry`]) as the batch that stores entry
    /// `id`: a proposal gets the id; an entry as stored must carry it already, and is copied
    /// as it is (the writer stamps the offset and the CRC again).
    pub fn from_entry(buf: &[u8], id: RaftId) -> Result<Self, &'static str> {
        let header = BatchHeader::of_entry(buf)?;
        match header.raft {
            None => Ok(EncodedBatch {
                buf: as_raft_entry(buf, id),
            }),
            Some(stored) if stored == id && !header.is_control() => {
                Ok(EncodedBatch { buf: buf.to_vec() })
            }
            Some(_) => Err("a stored entry under another entry's id"),
        }
    }

    /// Whether `buf` is a proposal whose every record parses: what a node checks before it
    /// proposes a batch another node forwarded (the CRC is not set yet, so it proves nothing).
    pub fn check_proposal(buf: &Bytes) -> Result<(), &'static str> {
        for r in Self::proposal_records(buf)?.1 {
            r?;
        }
        Ok(())
    }

    /// The records of a Raft entry's payload (a proposal, or the entry as stored), not yet
    /// parsed: what a replica reads of a message entry it applies (the ids, for its id index).
    /// A record's offset is its delta from the header's base offset.
    pub fn entry_records(buf: &Bytes) -> Result<(BatchHeader, Records), &'static str> {
        let header = BatchHeader::of_entry(buf)?;
        if header.is_control() {
            return Err("a control entry holds no records");
        }
        Ok((header, Records::of(header, buf)))
    }

    /// A proposal's header and its records (not yet parsed).
    fn proposal_records(buf: &Bytes) -> Result<(BatchHeader, Records), &'static str> {
        let header = BatchHeader::of_proposal(buf)?;
        Ok((header, Records::of(header, buf)))
    }

    /// `parts` as one proposal: a lone one as it is (not copied), several merged
    /// ([`EncodedBatch::merge_proposals`]).
    pub fn merged_proposal(parts: &[Bytes]) -> Result<Bytes, &'static str> {
        match parts {
            [one] => Ok(one.clone()),
            _ => Self::merge_proposals(parts).map(Self::into_bytes),
        }
    }

    /// Proposals (whole version 1 batches as a Send encodes them, dense offsets) as one, their
    /// records in order: proposal `k`'s records take the offsets after those of the proposals
    /// before it (ids and headers go with their records). The same bytes as
    /// [`EncodedBatch::new`] of all their records; each record's body is copied as it is, only
    /// its offset and time deltas are written again. Refused for a proposal that does not
    /// frame, or whose offsets have gaps (no Send's do).
    pub fn merge_proposals(parts: &[Bytes]) -> Result<Self, &'static str> {
        let mut headers = Vec::with_capacity(parts.len());
        for buf in parts {
            let header = BatchHeader::of_proposal(buf)?;
            if !header.is_dense() {
                return Err("a proposal with gaps between its offsets is not merged");
            }
            headers.push(header);
        }
        let Some(first) = headers.first() else {
            return Err("no proposal to merge");
        };
        let ids = first.has_ids();
        if headers.iter().any(|h| h.has_ids() != ids) {
            // Records without an id gain an empty one in a batch with ids: encoded anew.
            return Self::merge_records(parts);
        }
        let first_ts = first.first_timestamp;
        let bodies: usize = parts.iter().map(|b| b.len()).sum();
        let records: usize = headers.iter().map(|h| h.record_count as usize).sum();
        // Deltas written again may take more bytes than before: at most a length, an offset
        // and a time varint per record (10 bytes each).
        let mut buf = Vec::with_capacity(BATCH_HEADER_LEN + bodies + 30 * records);
        buf.resize(BATCH_HEADER_LEN, 0);
        let (mut next, mut max_ts) = (0u32, i64::MIN);
        for (part, header) in parts.iter().zip(&headers) {
            let mut pos = header.records_start();
            for _ in 0..header.record_count {
                let mut c = Cursor {
                    buf: part,
                    pos,
                    end: part.len(),
                };
                let len = c.uvarint()?;
                let body = c.take(len)?;
                let mut c = Cursor {
                    buf: part,
                    pos: body.start,
                    end: body.end,
                };
                let delta = c.uvarint()?;
                if delta > u64::from(header.last_offset_delta) {
                    return Err("record offset delta beyond the batch's range");
                }
                let timestamp = header.first_timestamp.wrapping_add(c.ivarint()?);
                let (delta, ts_delta) = (delta + u64::from(next), timestamp.wrapping_sub(first_ts));
                let rest = &part[c.pos..body.end];
                let len = varint::len_u(delta) + varint::len_i(ts_delta) + rest.len();
                varint::put_u(&mut buf, len as u64);
                varint::put_u(&mut buf, delta);
                varint::put_i(&mut buf, ts_delta);
                buf.extend_from_slice(rest);
                pos = body.end;
            }
            if pos != part.len() {
                return Err("trailing bytes after a proposal's records");
            }
            next += header.record_count;
            max_ts = max_ts.max(header.max_timestamp);
        }
        Ok(Self::with_header(
            buf,
            next - 1,
            next,
            (first_ts, max_ts),
            ids,
        ))
    }

    /// [`EncodedBatch::merge_proposals`] by parsing every record and encoding them all again.
    fn merge_records(parts: &[Bytes]) -> Result<Self, &'static str> {
        let mut records = Vec::new();
        for buf in parts {
            for r in Self::proposal_records(buf)?.1 {
                records.push(Record::from(r?));
            }
        }
        Ok(Self::new(&records))
    }

    /// What compaction leaves of a Raft entry it emptied: no records, the same offsets and
    /// timestamps (version 1 here; [`EncodedBatch::with_raft_id`] makes it the entry).
    pub fn emptied(last_offset_delta: u32, first_timestamp: i64, max_timestamp: i64) -> Self {
        let mut batch = Self::with_offset_deltas(std::iter::empty(), last_offset_delta);
        batch.buf[FIRST_TIMESTAMP_OFFSET..MAX_TIMESTAMP_OFFSET]
            .copy_from_slice(&first_timestamp.to_le_bytes());
        batch.buf[MAX_TIMESTAMP_OFFSET..PRODUCER_ID_OFFSET]
            .copy_from_slice(&max_timestamp.to_le_bytes());
        batch
    }

    /// Records as a Raft entry (version 2) with the given entry id.
    pub fn raft(records: &[Record], id: RaftId) -> Self {
        Self::new(records).with_raft_id(id)
    }

    /// The same records as a Raft entry (version 2) with the given entry id.
    pub fn with_raft_id(self, id: RaftId) -> Self {
        EncodedBatch {
            buf: as_raft_entry(&self.buf, id),
        }
    }

    /// A Raft control entry: no records, no offsets; `payload` after the kind byte.
    pub fn control(id: RaftId, kind: ControlKind, payload: &[u8], timestamp: i64) -> Self {
        let mut batch = Self::with_offset_deltas(std::iter::empty(), 0);
        batch.make_raft(id);
        batch.buf.push(kind as u8);
        batch.buf.extend_from_slice(payload);
        batch.buf[FIRST_TIMESTAMP_OFFSET..MAX_TIMESTAMP_OFFSET]
            .copy_from_slice(&timestamp.to_le_bytes());
        batch.buf[MAX_TIMESTAMP_OFFSET..PRODUCER_ID_OFFSET]
            .copy_from_slice(&timestamp.to_le_bytes());
        let attributes = ATTR_CONTROL;
        batch.buf[ATTRIBUTES_OFFSET..BATCH_HEADER_LEN].copy_from_slice(&attributes.to_le_bytes());
        batch.set_length();
        batch
    }

    /// Turns a version 1 batch into a version 2 one carrying `id`.
    fn make_raft(&mut self, id: RaftId) {
        self.buf = as_raft_entry(&self.buf, id);
    }

    fn set_length(&mut self) {
        let length = (self.buf.len() - 4) as u32;
        self.buf[LENGTH_OFFSET..4].copy_from_slice(&length.to_le_bytes());
    }

    /// Whether this is a Raft control entry (which carries no records).
    pub fn is_control(&self) -> bool {
        self.buf[MAGIC_OFFSET] == MAGIC_V2
            && u16::from_le_bytes([self.buf[ATTRIBUTES_OFFSET], self.buf[ATTRIBUTES_OFFSET + 1]])
                & ATTR_CONTROL
                != 0
    }

    /// Whether this is a version 2 batch (a Raft entry).
    fn is_raft(&self) -> bool {
        self.buf[MAGIC_OFFSET] == MAGIC_V2
    }

    /// Rejects batches the log must not accept: empty (unless a Raft entry: a control entry, or
    /// one compaction emptied), or over `max_bytes`.
    pub fn check(&self, max_bytes: usize) -> Result<(), Error> {
        if self.record_count() == 0 && !self.is_raft() {
            return Err(Error::EmptyBatch);
        }
        let limit = max_bytes.min(MAX_BATCH_LEN);
        if self.buf.len() > limit {
            return Err(Error::BatchTooLarge {
                size: self.buf.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Size on disk in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn record_count(&self) -> u32 {
        read_u32(&self.buf, RECORD_COUNT_OFFSET)
    }

    pub fn last_offset_delta(&self) -> u32 {
        read_u32(&self.buf, LAST_OFFSET_DELTA_OFFSET)
    }

    pub fn first_timestamp(&self) -> i64 {
        read_i64(&self.buf, FIRST_TIMESTAMP_OFFSET)
    }

    pub fn max_timestamp(&self) -> i64 {
        read_i64(&self.buf, MAX_TIMESTAMP_OFFSET)
    }

    /// The encoded bytes (final once sealed).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The encoded bytes, uncopied.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from(self.buf)
    }

    /// The batch as written, once sealed (`None` if its header does not parse, which a sealed
    /// batch's always does): its buffer becomes the batch's, uncopied.
    pub(crate) fn into_written(self) -> Option<Batch> {
        let Decoded::Valid(header) = BatchHeader::parse(&self.buf) else {
            return None;
        };
        Some(Batch {
            header,
            bytes: Bytes::from(self.buf),
        })
    }

    /// Stamps the base offset and the CRC; the bytes are then final.
    pub fn seal(&mut self, base_offset: u64) -> &[u8] {
        self.buf[BASE_OFFSET_OFFSET..LAST_OFFSET_DELTA_OFFSET]
            .copy_from_slice(&base_offset.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[CRC_START..]);
        self.buf[CRC_OFFSET..CRC_START].copy_from_slice(&crc.to_le_bytes());
        &self.buf
    }
}

/// The fixed header of a batch, readable before the whole batch is in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Total size on disk, length prefix included.
    pub size: usize,
    pub base_offset: u64,
    pub last_offset_delta: u32,
    pub record_count: u32,
    pub first_timestamp: i64,
    pub max_timestamp: i64,
    pub attributes: u16,
    /// The Raft entry this batch is (version 2), or `None` (version 1).
    pub raft: Option<RaftId>,
}

/// A Raft log entry's id as stored in a version 2 batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RaftId {
    pub term: u64,
    pub index: u64,
}

/// What a control entry is, the first byte after a control batch's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ControlKind {
    /// Raft's blank entry (a new leader's first entry): no payload.
    Blank = 0,
    /// A membership change: the payload is the membership as JSON.
    Membership = 1,
    /// A decision of the partition's leader about the partition as a whole (retention: the
    /// offset below which every replica drops its messages): the payload is the command as JSON.
    Command = 2,
}

impl ControlKind {
    pub fn from_byte(b: u8) -> Option<ControlKind> {
        match b {
            0 => Some(ControlKind::Blank),
            1 => Some(ControlKind::Membership),
            2 => Some(ControlKind::Command),
            _ => None,
        }
    }
}

impl BatchHeader {
    /// Whether this batch is a Raft control entry: no records, no offsets.
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    /// Where the records (or a control entry's kind byte) start.
    pub fn records_start(&self) -> usize {
        if self.raft.is_some() {
            RAFT_HEADER_LEN
        } else {
            BATCH_HEADER_LEN
        }
    }

    /// Whether the batch has a record at every offset of its range (as every Send's batch
    /// does; compaction leaves gaps).
    pub fn is_dense(&self) -> bool {
        u64::from(self.last_offset_delta) + 1 == u64::from(self.record_count)
    }

    /// Whether the batch's records carry ids.
    pub fn has_ids(&self) -> bool {
        self.attributes & ATTR_IDS != 0
    }

    /// The last offset this batch covers (for a control batch, which covers none: the offset
    /// before its base, or its base at offset 0; never a reason to read it).
    pub fn last_offset(&self) -> u64 {
        if self.is_control() {
            return self.base_offset.saturating_sub(1);
        }
        self.base_offset + u64::from(self.last_offset_delta)
    }

    /// The offset the next batch starts at (a control batch's own base: it takes none).
    pub fn next_offset(&self) -> u64 {
        if self.is_control() {
            return self.base_offset;
        }
        self.last_offset() + 1
    }

    /// Whether a reader of messages from `from` on wants this batch.
    pub fn holds_offsets_from(&self, from: u64) -> bool {
        !self.is_control() && self.last_offset() >= from
    }

    /// The header of a proposal: a whole version 1 batch as [`EncodedBatch::new`] made it.
    pub fn of_proposal(buf: &[u8]) -> Result<BatchHeader, &'static str> {
        match BatchHeader::of_entry(buf)? {
            h if h.raft.is_none() => Ok(h),
            _ => Err("not a whole version 1 batch"),
        }
    }

    /// The header of a Raft entry's payload as it travels: a proposal (a whole version 1
    /// batch) or the entry as stored (a whole version 2 batch).
    pub fn of_entry(buf: &[u8]) -> Result<BatchHeader, &'static str> {
        match BatchHeader::parse(buf) {
            Decoded::Valid(h) if h.size == buf.len() => Ok(h),
            Decoded::Valid(_) => Err("not a whole batch"),
            Decoded::Torn { .. } => Err("batch cut short"),
            Decoded::Corrupt(why) => Err(why),
        }
    }

    /// Parses the header from the start of `buf`, checking framing but not the CRC.
    pub fn parse(buf: &[u8]) -> Decoded<BatchHeader> {
        if buf.len() < 4 {
            return Decoded::Torn { needed: 4 };
        }
        let size = read_u32(buf, LENGTH_OFFSET) as usize + 4;
        if size < BATCH_HEADER_LEN {
            return Decoded::Corrupt("batch length is smaller than the batch header");
        }
        if size > MAX_BATCH_LEN {
            return Decoded::Corrupt("batch length exceeds the format's maximum");
        }
        if buf.len() < BATCH_HEADER_LEN {
            return Decoded::Torn { needed: size };
        }
        let magic = buf[MAGIC_OFFSET];
        if magic != MAGIC_V1 && magic != MAGIC_V2 {
            return Decoded::Corrupt("unknown batch magic");
        }
        let raft = if magic == MAGIC_V2 {
            if size < RAFT_HEADER_LEN {
                return Decoded::Corrupt("batch length is smaller than the Raft batch header");
            }
            if buf.len() < RAFT_HEADER_LEN {
                return Decoded::Torn { needed: size };
            }
            Some(RaftId {
                term: read_u64(buf, TERM_OFFSET),
                index: read_u64(buf, RAFT_INDEX_OFFSET),
            })
        } else {
            None
        };
        let header = BatchHeader {
            size,
            base_offset: read_u64(buf, BASE_OFFSET_OFFSET),
            last_offset_delta: read_u32(buf, LAST_OFFSET_DELTA_OFFSET),
            record_count: read_u32(buf, RECORD_COUNT_OFFSET),
            first_timestamp: read_i64(buf, FIRST_TIMESTAMP_OFFSET),
            max_timestamp: read_i64(buf, MAX_TIMESTAMP_OFFSET),
            attributes: u16::from_le_bytes([buf[ATTRIBUTES_OFFSET], buf[ATTRIBUTES_OFFSET + 1]]),
            raft,
        };
        let known = if raft.is_some() {
            ATTR_IDS | ATTR_CONTROL
        } else {
            ATTR_IDS
        };
        if header.attributes & !known != 0 {
            return Decoded::Corrupt("unknown batch attributes");
        }
        if header.is_control() {
            if header.attributes != ATTR_CONTROL
                || header.record_count != 0
                || header.last_offset_delta != 0
            {
                return Decoded::Corrupt("a control batch carries records");
            }
            if size <= RAFT_HEADER_LEN {
                return Decoded::Corrupt("a control batch has no kind");
            }
        } else if u64::from(header.record_count) > u64::from(header.last_offset_delta) + 1 {
            return Decoded::Corrupt("record count does not fit the offset range");
        }
        if header
            .base_offset
            .checked_add(u64::from(header.last_offset_delta) + 1)
            .is_none()
        {
            return Decoded::Corrupt("offset range overflows");
        }
        Decoded::Valid(header)
    }
}

/// What a decoder found at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    Valid(T),
    /// The bytes end before the item does: a write that did not finish. `needed` is the total
    /// size the item claims (or the bytes needed to know it).
    Torn {
        needed: usize,
    },
    /// The bytes are there but wrong.
    Corrupt(&'static str),
}

/// A whole, CRC-checked batch.
#[derive(Debug, Clone)]
pub struct Batch {
    header: BatchHeader,
    bytes: Bytes,
}

impl Batch {
    /// Decodes one batch from the start of `buf`, verifying framing and CRC.
    pub fn decode(buf: &Bytes) -> Decoded<Batch> {
        let header = match BatchHeader::parse(buf) {
            Decoded::Valid(h) => h,
            Decoded::Torn { needed } => return Decoded::Torn { needed },
            Decoded::Corrupt(why) => return Decoded::Corrupt(why),
        };
        if buf.len() < header.size {
            return Decoded::Torn {
                needed: header.size,
            };
        }
        let stored = read_u32(buf, CRC_OFFSET);
        if crc32fast::hash(&buf[CRC_START..header.size]) != stored {
            return Decoded::Corrupt("batch CRC mismatch");
        }
        if header.is_control() && ControlKind::from_byte(buf[header.records_start()]).is_none() {
            return Decoded::Corrupt("unknown control entry kind");
        }
        Decoded::Valid(Batch {
            header,
            bytes: buf.slice(..header.size),
        })
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch exactly as stored.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The records, payloads sliced from the batch buffer without copying. A record that does not
    /// parse inside a CRC-valid batch yields an error with a reason and stops the iteration.
    pub fn records(&self) -> Records {
        Records::of(self.header, &self.bytes)
    }

    /// Every record parses inside the batch's offset range and the records fill the batch to its
    /// last byte. The CRC does not cover the magic byte, and versions 1 and 2 lay the same bytes
    /// out differently: a damaged magic can turn a batch into a CRC-valid one of the other
    /// version whose records do not parse (found by the `recovery` fuzz target). Checked where a
    /// log is scanned (recovery), not on every read.
    pub fn records_check_out(&self) -> Result<(), &'static str> {
        if self.header.is_control() {
            return Ok(());
        }
        let mut records = self.records();
        for r in records.by_ref() {
            r?;
        }
        if records.pos != self.bytes.len() {
            return Err("bytes after the last record of a batch");
        }
        Ok(())
    }

    /// The same records at the same offsets as one version 1 batch based at `base` (below this
    /// batch's own base): the offsets between become part of it, as a gap compaction leaves.
    /// `None` when an offset would lie more than `u32::MAX` past `base`, or a record does not
    /// parse.
    pub fn rebased(&self, base: u64) -> Option<EncodedBatch> {
        let delta = |offset: u64| u32::try_from(offset.checked_sub(base)?).ok();
        let last = delta(self.header.last_offset())?;
        // A record takes at least a byte: a count the bytes cannot hold (a CRC-valid lie)
        // reserves no more than they can.
        let room = self.bytes.len() - self.header.records_start();
        let mut records = Vec::with_capacity((self.header.record_count as usize).min(room));
        for r in self.records() {
            let r = r.ok()?;
            records.push((delta(r.offset)?, Record::from(r)));
        }
        Some(EncodedBatch::with_offset_deltas(
            records.iter().map(|(d, r)| (*d, r)),
            last,
        ))
    }

    /// A version 2 data batch's bytes as the version 1 batch that was proposed: Raft id dropped,
    /// CRC and base offset zero as the encoder left them (the writer stamps both).
    /// What a leader sends a follower.
    pub fn without_raft_id(&self) -> Vec<u8> {
        let b = &self.bytes;
        let start = self.header.records_start();
        let mut out = Vec::with_capacity(b.len() - (start - BATCH_HEADER_LEN));
        out.extend_from_slice(&b[..BATCH_HEADER_LEN]);
        out.extend_from_slice(&b[start..]);
        out[MAGIC_OFFSET] = MAGIC_V1;
        out[CRC_OFFSET..LAST_OFFSET_DELTA_OFFSET].fill(0);
        let length = (out.len() - 4) as u32;
        out[LENGTH_OFFSET..4].copy_from_slice(&length.to_le_bytes());
        out
    }

    /// A control batch's kind and payload; `None` for a data batch or an unknown kind.
    pub fn control(&self) -> Option<(ControlKind, Bytes)> {
        if !self.header.is_control() {
            return None;
        }
        let start = self.header.records_start();
        let kind = ControlKind::from_byte(*self.bytes.get(start)?)?;
        Some((kind, self.bytes.slice(start + 1..)))
    }
}

/// Iterator over a batch's records. Fields are parsed from the batch buffer by position; only
/// the key, value and header values become `Bytes` (slices sharing the batch buffer).
#[derive(Debug)]
pub struct Records {
    header: BatchHeader,
    buf: Bytes,
    pos: usize,
    left: u32,
}

impl Iterator for Records {
    type Item = Result<StoredRecord, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let result = self.decode_one();
        if result.is_err() {
            self.left = 0;
        }
        Some(result)
    }
}

/// A read position inside a record, bounded by the record's end.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl Cursor<'_> {
    fn uvarint(&mut self) -> Result<u64, &'static str> {
        varint::get_u(self.buf, &mut self.pos, self.end)
            .map_err(|e| e.describe("varint runs past the record"))
    }

    fn ivarint(&mut self) -> Result<i64, &'static str> {
        varint::get_i(self.buf, &mut self.pos, self.end)
            .map_err(|e| e.describe("varint runs past the record"))
    }

    fn take(&mut self, n: u64) -> Result<std::ops::Range<usize>, &'static str> {
        let n = usize::try_from(n).map_err(|_| "field length overflows")?;
        if n > self.end - self.pos {
            return Err("field runs past the record");
        }
        let range = self.pos..self.pos + n;
        self.pos += n;
        Ok(range)
    }

    fn opt(&mut self) -> Result<Option<std::ops::Range<usize>>, &'static str> {
        match self.ivarint()? {
            -1 => Ok(None),
            n if n < 0 => Err("negative field length"),
            n => self.take(n as u64).map(Some),
        }
    }
}

impl Records {
    /// The records of the batch `header` heads in `buf`.
    fn of(header: BatchHeader, buf: &Bytes) -> Records {
        Records {
            header,
            buf: buf.clone(),
            pos: header.records_start(),
            left: header.record_count,
        }
    }

    fn decode_one(&mut self) -> Result<StoredRecord, &'static str> {
        let mut c = Cursor {
            buf: &self.buf,
            pos: self.pos,
            end: self.buf.len(),
        };
        let len = c.uvarint()?;
        let body = c.take(len)?;
        let mut c = Cursor {
            buf: &self.buf,
            pos: body.start,
            end: body.end,
        };
        let delta = c.uvarint()?;
        if delta > u64::from(self.header.last_offset_delta) {
            return Err("record offset delta beyond the batch's range");
        }
        let ts_delta = c.ivarint()?;
        let key = c.opt()?;
        let value = c.opt()?;
        let header_count = c.uvarint()?;
        let mut headers = Vec::new();
        for _ in 0..header_count {
            let klen = c.uvarint()?;
            let k = c.take(klen)?;
            let key = std::str::from_utf8(&self.buf[k])
                .map_err(|_| "header key is not UTF-8")?
                .to_string();
            let vlen = c.uvarint()?;
            let v = c.take(vlen)?;
            headers.push(Header {
                key,
                value: self.buf.slice(v),
            });
        }
        let id = if self.header.has_ids() {
            c.opt()?
        } else {
            None
        };
        if c.pos != c.end {
            return Err("trailing bytes in record");
        }
        self.pos = body.end;
        Ok(StoredRecord {
            offset: self.header.base_offset + delta,
            timestamp: self.header.first_timestamp.wrapping_add(ts_delta),
            key: key.map(|r| self.buf.slice(r)),
            value: value.map(|r| self.buf.slice(r)),
            headers,
            id: id.map(|r| self.buf.slice(r)),
        })
    }
}

fn put_opt_bytes(buf: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => varint::put_i(buf, -1),
        Some(b) => {
            varint::put_i(buf, b.len() as i64);
            buf.extend_from_slice(b);
        }
    }
}

fn opt_bytes_len(b: Option<&[u8]>) -> usize {
    match b {
        None => varint::len_i(-1),
        Some(b) => varint::len_i(b.len() as i64) + b.len(),
    }
}

pub(crate) fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

pub(crate) fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

pub(crate) fn read_i64(buf: &[u8], at: usize) -> i64 {
    read_u64(buf, at) as i64
}

/// A version 1 batch (`v1`, already framed) as the version 2 batch that stores Raft entry
/// `id`: the entry id after the version 1 header, the magic and length set for it; copied once
/// into a buffer of its final size (a proposal is as large as a Send's batch).
fn as_raft_entry(v1: &[u8], id: RaftId) -> Vec<u8> {
    let mut buf = Vec::with_capacity(v1.len() + RAFT_HEADER_LEN - BATCH_HEADER_LEN);
    buf.extend_from_slice(&v1[..BATCH_HEADER_LEN]);
    buf.extend_from_slice(&id.term.to_le_bytes());
    buf.extend_from_slice(&id.index.to_le_bytes());
    buf.extend_from_slice(&v1[BATCH_HEADER_LEN..]);
    buf[MAGIC_OFFSET] = MAGIC_V2;
    let length = (buf.len() - 4) as u32;
    buf[LENGTH_OFFSET..4].copy_from_slice(&length.to_le_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ts: i64, key: Option<&str>, value: Option<&str>) -> Record {
        Record {
            timestamp: ts,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            headers: vec![Header {
                key: "h".into(),
                value: Bytes::from_static(b"v"),
            }],
            id: None,
        }
    }

    fn sealed(records: &[Record], base: u64) -> Bytes {
        let mut b = EncodedBatch::new(records);
        Bytes::copy_from_slice(b.seal(base))
    }

    #[test]
    fn batch_round_trips_keys_tombstones_headers_and_timestamps() {
        let records = vec![
            rec(1_000, Some("k"), Some("hello")),
            rec(999, None, None),
            rec(5_000, Some(""), Some("")),
        ];
        let bytes = sealed(&records, 42);
        let Decoded::Valid(batch) = Batch::decode(&bytes) else {
            panic!("valid batch did not decode")
        };
        assert_eq!(batch.header().base_offset, 42);
        assert_eq!(batch.header().next_offset(), 45);
        assert_eq!(batch.header().max_timestamp, 5_000);
        let out: Vec<_> = batch.records().map(|r| r.unwrap()).collect();
        assert_eq!(out.len(), 3);
        for (i, (o, r)) in out.iter().zip(&records).enumerate() {
            assert_eq!(o.offset, 42 + i as u64);
            assert_eq!(o.timestamp, r.timestamp);
            assert_eq!(o.key, r.key);
            assert_eq!(o.value, r.value);
            assert_eq!(o.headers, r.headers);
        }
    }

    #[test]
    fn ids_round_trip_and_only_batches_with_ids_carry_the_attribute() {
        let with = |id: Option<&'static [u8]>| Record {
            id: id.map(Bytes::from_static),
            ..rec(5, Some("k"), Some("v"))
        };
        let cases: [(&[Record], bool); 4] = [
            (&[with(None)], false),
            (&[with(Some(b"a"))], true),
            (&[with(None), with(Some(b"submission-1")), with(None)], true),
            (&[with(Some(b"")), with(Some(&[0xff; 128]))], true),
        ];
        for (records, has_ids) in cases {
            let bytes = sealed(records, 3);
            let Decoded::Valid(batch) = Batch::decode(&bytes) else {
                panic!("batch does not decode")
            };
            assert_eq!(batch.header().has_ids(), has_ids);
            let ids: Vec<_> = batch.records().map(|r| r.unwrap().id).collect();
            let sent: Vec<_> = records.iter().map(|r| r.id.clone()).collect();
            assert_eq!(ids, sent);
        }
    }

    #[test]
    fn batch_bytes_match_the_documented_example() {
        let r = Record {
            timestamp: 1000,
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"hi")),
            headers: Vec::new(),
            id: None,
        };
        let expected: [u8; 64] = [
            0x3c, 0, 0, 0, 0x01, 0x49, 0x59, 0xb7, 0xc3, 7, 0, 0, 0, 0, 0, 0, //
            0, 0, 0, 0, 0, 1, 0, 0, 0, 0xe8, 0x03, 0, 0, 0, 0, 0, //
            0, 0xe8, 0x03, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, //
            0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x08, 0, 0, 0x02, 0x6b, 0x04, 0x68, 0x69, 0,
        ];
        assert_eq!(&sealed(&[r], 7)[..], &expected[..]);
    }

    /// One sealed batch of every kind the format has: version 1 with and without ids, a Raft
    /// data entry, and both Raft control entries.
    fn every_kind() -> Vec<(&'static str, Bytes)> {
        let id = RaftId { term: 9, index: 41 };
        let mut with_id = rec(2, Some("k"), Some("v"));
        with_id.id = Some(Bytes::from_static(b"msg-1"));
        let seal = |mut b: EncodedBatch, base| Bytes::copy_from_slice(b.seal(base));
        vec![
            ("v1", sealed(&[rec(1, Some("k"), Some("value"))], 7)),
            (
                "v1 with ids",
                sealed(&[with_id.clone(), rec(3, None, None)], 7),
            ),
            (
                "raft data",
                seal(
                    EncodedBatch::raft(&[with_id, rec(4, None, Some("x"))], id),
                    7,
                ),
            ),
            (
                "raft blank",
                seal(EncodedBatch::control(id, ControlKind::Blank, &[], 0), 7),
            ),
            (
                "raft membership",
                seal(
                    EncodedBatch::control(id, ControlKind::Membership, b"{}", 0),
                    7,
                ),
            ),
        ]
    }

    #[test]
    fn every_truncation_of_every_kind_of_batch_decodes_as_torn() {
        for (kind, bytes) in every_kind() {
            assert!(matches!(Batch::decode(&bytes), Decoded::Valid(_)), "{kind}");
            for cut in 0..bytes.len() {
                match Batch::decode(&bytes.slice(..cut)) {
                    Decoded::Torn { .. } => {}
                    other => panic!("{kind} cut at {cut}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn every_flipped_bit_of_every_kind_of_batch_is_detected() {
        for (kind, bytes) in every_kind() {
            for bit in 0..bytes.len() * 8 {
                let mut b = bytes.to_vec();
                b[bit / 8] ^= 1 << (bit % 8);
                let got = Batch::decode(&Bytes::from(b));
                assert!(
                    !matches!(got, Decoded::Valid(_)),
                    "{kind}: flipped bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn raft_batches_carry_their_id_and_control_batches_take_no_offset() {
        for (kind, bytes) in every_kind() {
            let Decoded::Valid(batch) = Batch::decode(&bytes) else {
                panic!("{kind} does not decode");
            };
            let h = *batch.header();
            let raft = kind.starts_with("raft");
            assert_eq!(h.raft.is_some(), raft, "{kind}");
            if raft {
                assert_eq!(h.raft, Some(RaftId { term: 9, index: 41 }), "{kind}");
            }
            if h.is_control() {
                assert_eq!(h.next_offset(), h.base_offset, "{kind} takes no offset");
                assert!(
                    !h.holds_offsets_from(0) && !h.holds_offsets_from(7),
                    "{kind}"
                );
                assert_eq!(batch.records().count(), 0, "{kind}");
                assert!(batch.control().is_some(), "{kind}");
            } else {
                assert_eq!(
                    h.next_offset(),
                    h.base_offset + u64::from(h.record_count),
                    "{kind}"
                );
                assert!(h.holds_offsets_from(7), "{kind}");
                assert!(batch.records().all(|r| r.is_ok()), "{kind}");
                assert!(batch.control().is_none(), "{kind}");
            }
        }
    }

    #[test]
    fn a_raft_data_batch_gives_back_the_proposal_it_was_made_from() {
        let records = [rec(5, Some("a"), Some("b")), rec(6, None, Some("c"))];
        let proposal = EncodedBatch::new(&records);
        let mut stored = EncodedBatch::raft(&records, RaftId { term: 2, index: 3 });
        let bytes = Bytes::copy_from_slice(stored.seal(1234));
        let Decoded::Valid(batch) = Batch::decode(&bytes) else {
            panic!("does not decode");
        };
        assert_eq!(batch.without_raft_id(), proposal.as_bytes());
        assert!(EncodedBatch::from_encoded(batch.without_raft_id()).is_ok());
        assert!(
            EncodedBatch::from_encoded(bytes.to_vec()).is_err(),
            "a version 2 batch is no proposal"
        );
        assert!(EncodedBatch::from_encoded(proposal.as_bytes()[..40].to_vec()).is_err());
    }

    #[test]
    fn control_entries_are_refused_where_the_format_forbids_them() {
        let id = RaftId { term: 1, index: 1 };
        let seal = |mut b: EncodedBatch| b.seal(0).to_vec();
        let reseal = |mut b: Vec<u8>| {
            let crc = crc32fast::hash(&b[CRC_START..]);
            b[CRC_OFFSET..CRC_START].copy_from_slice(&crc.to_le_bytes());
            Bytes::from(b)
        };
        // The control attribute on a version 1 batch.
        let mut v1 = seal(EncodedBatch::new(&[rec(1, None, Some("x"))]));
        v1[ATTRIBUTES_OFFSET] |= ATTR_CONTROL as u8;
        // A control batch that claims a record.
        let mut counted = seal(EncodedBatch::control(id, ControlKind::Blank, &[], 0));
        counted[RECORD_COUNT_OFFSET] = 1;
        // An unknown control kind.
        let mut kind = seal(EncodedBatch::control(id, ControlKind::Blank, &[], 0));
        kind[RAFT_HEADER_LEN] = 9;
        // A version 2 batch too short for its header.
        let mut short = seal(EncodedBatch::new(&[]));
        short[MAGIC_OFFSET] = MAGIC_V2;
        for (what, bytes) in [
            ("control on v1", v1),
            ("control with a record", counted),
            ("unknown control kind", kind),
            ("short v2", short),
        ] {
            let got = Batch::decode(&reseal(bytes));
            assert!(matches!(got, Decoded::Corrupt(_)), "{what}: {got:?}");
        }
    }

    /// An entry compaction emptied keeps its offsets and timestamps through every form it takes:
    /// stored (version 2), as a proposal on the wire (version 1) and stored again by a follower.
    #[test]
    fn an_emptied_raft_entry_keeps_its_offsets_and_is_only_accepted_as_a_raft_entry() {
        let id = RaftId { term: 3, index: 17 };
        let mut stored = EncodedBatch::emptied(4, 1_000, 1_009).with_raft_id(id);
        assert!(stored.check(1 << 20).is_ok(), "a Raft entry may be empty");
        let bytes = Bytes::copy_from_slice(stored.seal(40));
        let Decoded::Valid(batch) = Batch::decode(&bytes) else {
            panic!("an emptied entry decodes");
        };
        let h = *batch.header();
        assert_eq!(
            (h.record_count, h.last_offset(), h.next_offset()),
            (0, 44, 45)
        );
        assert_eq!((h.first_timestamp, h.max_timestamp), (1_000, 1_009));
        assert!(!h.is_control() && h.holds_offsets_from(44) && !h.holds_offsets_from(45));
        assert_eq!(batch.records().count(), 0);
        let proposal = EncodedBatch::from_encoded(batch.without_raft_id()).expect("a proposal");
        assert_eq!(proposal.last_offset_delta(), 4);
        let mut again = proposal.with_raft_id(id);
        assert_eq!(
            Bytes::copy_from_slice(again.seal(40)),
            bytes,
            "the same bytes"
        );
        assert!(
            matches!(
                EncodedBatch::emptied(4, 0, 0).check(1 << 20),
                Err(Error::EmptyBatch)
            ),
            "an empty batch from anywhere but the Raft log is refused"
        );
    }

    /// Found by the `batch` fuzz target: the widest offset range (a delta of `u32::MAX`) made
    /// the count check overflow (a panic with overflow checks, a wrong refusal without).
    #[test]
    fn a_batch_spanning_the_widest_offset_range_parses() {
        let mut b = EncodedBatch::new(&[rec(1, Some("k"), Some("v"))]);
        let mut bytes = b.seal(0).to_vec();
        bytes[LAST_OFFSET_DELTA_OFFSET..RECORD_COUNT_OFFSET]
            .copy_from_slice(&u32::MAX.to_le_bytes());
        let Decoded::Valid(h) = BatchHeader::parse(&bytes) else {
            panic!("refused: {:?}", BatchHeader::parse(&bytes));
        };
        assert_eq!(h.last_offset(), u64::from(u32::MAX));
        // At the top of the offset space the same range overflows: refused, not wrapped.
        bytes[BASE_OFFSET_OFFSET..LAST_OFFSET_DELTA_OFFSET]
            .copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(BatchHeader::parse(&bytes), Decoded::Corrupt(_)));
    }

    /// Found by the `batch` fuzz target: a CRC-valid batch whose header counts four billion
    /// records reserved room for all of them (274 GB) before reading the first.
    #[test]
    fn a_record_count_the_bytes_cannot_hold_reserves_nothing_for_it() {
        let mut b = EncodedBatch::new(&[rec(1, Some("k"), Some("v"))]);
        b.buf[LAST_OFFSET_DELTA_OFFSET..RECORD_COUNT_OFFSET]
            .copy_from_slice(&u32::MAX.to_le_bytes());
        b.buf[RECORD_COUNT_OFFSET..RECORD_COUNT_OFFSET + 4]
            .copy_from_slice(&u32::MAX.to_le_bytes());
        let bytes = Bytes::from(b.seal(5).to_vec());
        let Decoded::Valid(batch) = Batch::decode(&bytes) else {
            panic!("the lying batch is CRC-valid and frames");
        };
        // One record is there, not four billion: it does not rebase (and does not abort).
        assert!(batch.rebased(0).is_none());
    }

    /// Found by the `batch` fuzz target: a proposal with no records over the widest offset
    /// range overflowed the gap check of a merge (a panic with overflow checks; without, four
    /// billion offsets with no record passed for a proposal without gaps).
    #[test]
    fn a_proposal_with_no_records_over_the_widest_range_is_not_merged() {
        let mut b = EncodedBatch::new(&[rec(1, Some("k"), Some("v"))]);
        b.buf[LAST_OFFSET_DELTA_OFFSET..RECORD_COUNT_OFFSET]
            .copy_from_slice(&u32::MAX.to_le_bytes());
        b.buf[RECORD_COUNT_OFFSET..RECORD_COUNT_OFFSET + 4].copy_from_slice(&0u32.to_le_bytes());
        let p = Bytes::from(b.buf.clone());
        let h = BatchHeader::of_proposal(&p).expect("it frames");
        assert!(!h.is_dense());
        assert!(EncodedBatch::merge_proposals(&[p.clone(), p]).is_err());
    }

    /// The CRC does not cover the magic byte: a version 1 batch whose magic reads 2 is still
    /// CRC-valid, but its records do not parse as version 2's (found by the `recovery` fuzz
    /// target: the scan kept such a batch and readers met records that do not parse).
    #[test]
    fn a_batch_whose_magic_changed_version_is_caught_by_its_records() {
        let records: Vec<Record> = (0..5)
            .map(|i| rec(i, Some("key"), Some(&"v".repeat(30 + i as usize))))
            .collect();
        let mut b = EncodedBatch::new(&records);
        let bytes = b.seal(100).to_vec();
        let Decoded::Valid(good) = Batch::decode(&Bytes::from(bytes.clone())) else {
            panic!("the batch does not decode");
        };
        assert_eq!(good.records_check_out(), Ok(()));
        let mut changed = bytes;
        changed[MAGIC_OFFSET] = MAGIC_V2;
        let Decoded::Valid(changed) = Batch::decode(&Bytes::from(changed)) else {
            panic!("a changed magic is not seen by the CRC");
        };
        assert!(changed.records_check_out().is_err());
    }

    #[test]
    fn empty_and_oversize_batches_are_rejected() {
        assert!(matches!(
            EncodedBatch::new(&[]).check(1 << 20),
            Err(Error::EmptyBatch)
        ));
        let big = rec(0, None, Some(&"x".repeat(2000)));
        assert!(matches!(
            EncodedBatch::new(&[big]).check(1000),
            Err(Error::BatchTooLarge { .. })
        ));
    }

    #[test]
    fn proposals_merge_into_the_batch_of_all_their_records_and_gapped_ones_do_not() {
        let with_id = |r: Record, id: &'static [u8]| Record {
            id: Some(Bytes::from_static(id)),
            ..r
        };
        // Many small records: offset deltas and time deltas past one varint byte.
        let many: Vec<Record> = (0..300)
            .map(|i| rec(1_700_000_000_000 - i * 977, None, Some("m")))
            .collect();
        let shapes: Vec<(&str, Vec<Vec<Record>>)> = vec![
            (
                "no ids (records copied)",
                vec![
                    vec![rec(1, Some("a"), Some("1")), rec(2, None, Some("2"))],
                    vec![rec(9, Some("c"), None)],
                    vec![rec(-5, Some("d"), Some("4"))],
                ],
            ),
            (
                "every record with an id (records copied)",
                vec![
                    vec![with_id(rec(7, Some("k"), None), b"id-1")],
                    vec![with_id(rec(3, None, Some("v")), b"id-2")],
                ],
            ),
            (
                "ids in some proposals only (encoded anew)",
                vec![
                    vec![rec(1, Some("a"), Some("1"))],
                    vec![with_id(rec(5, Some("k"), None), b"id-1")],
                ],
            ),
            ("one proposal", vec![vec![rec(1, Some("a"), Some("1"))]]),
            (
                "deltas that grow a varint byte",
                vec![many[..200].to_vec(), many[200..].to_vec()],
            ),
        ];
        for (what, parts) in shapes {
            let encoded: Vec<Bytes> = parts
                .iter()
                .map(|r| EncodedBatch::new(r).into_bytes())
                .collect();
            let merged = EncodedBatch::merge_proposals(&encoded).unwrap();
            let all: Vec<Record> = parts.concat();
            assert_eq!(
                merged.as_bytes(),
                EncodedBatch::new(&all).as_bytes(),
                "{what}"
            );
            let mut merged = merged;
            let bytes = Bytes::copy_from_slice(merged.seal(100));
            let Decoded::Valid(batch) = Batch::decode(&bytes) else {
                panic!("{what}: the merged batch decodes");
            };
            let got: Vec<Record> = batch.records().map(|r| r.unwrap().into()).collect();
            assert_eq!(got, all, "{what}");
        }
        // A batch whose offsets have gaps (as compaction leaves) is not a Send's: not merged.
        let first = EncodedBatch::new(&[rec(1, None, Some("x"))]).into_bytes();
        let gapped = EncodedBatch::with_offset_deltas([(0u32, &rec(1, None, Some("x")))], 4);
        let err = EncodedBatch::merge_proposals(&[first.clone(), gapped.into_bytes()]);
        assert!(err.is_err());
        // Nor is anything that does not frame.
        let mut cut = first.to_vec();
        cut.truncate(cut.len() - 1);
        assert!(EncodedBatch::merge_proposals(&[first, Bytes::from(cut)]).is_err());
    }
}
