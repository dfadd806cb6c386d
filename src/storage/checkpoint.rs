//! The recovery checkpoint of a partition: `<partition>/checkpoint`.
//!
//! It records a point of the active segment known to be on disk, with everything recovery needs
//! to resume from there, and whether the partition was closed cleanly. It is written (atomically:
//! temp file, sync, rename, sync directory) on open, after every `checkpoint_bytes` of synced log,
//! on roll, and on clean close, always after the log and indexes it describes were synced.
//!
//! # Layout (little-endian)
//!
//! | offset | size | field            | notes                                          |
//! |-------:|-----:|------------------|------------------------------------------------|
//! |      0 |    4 | `magic`          | `SLCP`                                         |
//! |      4 |    2 | `version`        | 2 (version 1 is read: no entry CRCs)           |
//! |      6 |    1 | `clean`          | 1 = written by a clean close, else 0           |
//! |      7 |    1 | reserved         | 0                                              |
//! |      8 |    8 | `active_base`    | base offset of the active segment              |
//! |     16 |    8 | `log_position`   | bytes of its log known durable                 |
//! |     24 |    8 | `next_offset`    | offset after the last batch below that point   |
//! |     32 |    8 | `max_timestamp`  | largest timestamp below that point (i64)       |
//! |     40 |    4 | `index_entries`  | offset-index entries covering that point       |
//! |     44 |    4 | `time_entries`   | time-index entries covering that point         |
//! |     48 |    4 | `index_crc`      | CRC-32 of those offset-index entries           |
//! |     52 |    4 | `time_crc`       | CRC-32 of those time-index entries             |
//! |     56 |    4 | `crc`            | CRC-32 of bytes 0..56                          |
//!
//! Version 1 (52 bytes) ends at `time_entries`, its CRC at 48. The entry CRCs let recovery after
//! a crash check the active segment's index entries it resumes from (that index is not sealed:
//! it was growing): entries that do not match are rebuilt from the log instead of trusted.

use super::record::{Decoded, read_i64, read_u32, read_u64};

pub const FILE_NAME: &str = "checkpoint";
pub const MAGIC: [u8; 4] = *b"SLCP";
pub const VERSION: u16 = 2;
pub const LEN: usize = 60;
const CRC_AT: usize = 56;
/// A version 1 checkpoint's length and CRC position.
const V1_LEN: usize = 52;
const V1_CRC_AT: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub clean: bool,
    pub active_base: u64,
    pub log_position: u64,
    pub next_offset: u64,
    pub max_timestamp: i64,
    pub index_entries: u32,
    pub time_entries: u32,
    /// CRC-32 of the first `index_entries` offset-index entries and of the first `time_entries`
    /// time-index entries ([`crate::storage::mapped::MappedEntries::entries_crc`]); `None` in a
    /// version 1 checkpoint.
    pub entries_crc: Option<EntriesCrc>,
}

/// The CRCs of the index entries a checkpoint covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntriesCrc {
    pub index: u32,
    pub time: u32,
}

impl Checkpoint {
    /// The checkpoint's bytes: version 2, or version 1 when it has no entry CRCs (as read from
    /// a version 1 file).
    pub fn encode(&self) -> Vec<u8> {
        let (version, crc_at) = match self.entries_crc {
            Some(_) => (VERSION, CRC_AT),
            None => (1, V1_CRC_AT),
        };
        let mut b = vec![0u8; crc_at + 4];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&version.to_le_bytes());
        b[6] = u8::from(self.clean);
        b[8..16].copy_from_slice(&self.active_base.to_le_bytes());
        b[16..24].copy_from_slice(&self.log_position.to_le_bytes());
        b[24..32].copy_from_slice(&self.next_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.max_timestamp.to_le_bytes());
        b[40..44].copy_from_slice(&self.index_entries.to_le_bytes());
        b[44..48].copy_from_slice(&self.time_entries.to_le_bytes());
        if let Some(entries) = self.entries_crc {
            b[48..52].copy_from_slice(&entries.index.to_le_bytes());
            b[52..56].copy_from_slice(&entries.time.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[..crc_at]);
        b[crc_at..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a checkpoint of either version.
    pub fn decode(b: &[u8]) -> Decoded<Checkpoint> {
        if b.len() < 6 {
            return Decoded::Torn { needed: V1_LEN };
        }
        if b[0..4] != MAGIC {
            return Decoded::Corrupt("bad checkpoint magic");
        }
        let (len, crc_at) = match u16::from_le_bytes([b[4], b[5]]) {
            1 => (V1_LEN, V1_CRC_AT),
            VERSION => (LEN, CRC_AT),
            _ => return Decoded::Corrupt("unknown checkpoint version"),
        };
        if b.len() < len {
            return Decoded::Torn { needed: len };
        }
        if b.len() > len {
            return Decoded::Corrupt("checkpoint has trailing bytes");
        }
        if crc32fast::hash(&b[..crc_at]) != read_u32(b, crc_at) {
            return Decoded::Corrupt("checkpoint CRC mismatch");
        }
        Decoded::Valid(Checkpoint {
            clean: b[6] == 1,
            active_base: read_u64(b, 8),
            log_position: read_u64(b, 16),
            next_offset: read_u64(b, 24),
            max_timestamp: read_i64(b, 32),
            index_entries: read_u32(b, 40),
            time_entries: read_u32(b, 44),
            entries_crc: (len == LEN).then(|| EntriesCrc {
                index: read_u32(b, 48),
                time: read_u32(b, 52),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_of_both_versions_round_trip_and_damage_is_caught() {
        let v2 = Checkpoint {
            clean: true,
            active_base: 7,
            log_position: 1234,
            next_offset: 99,
            max_timestamp: -5,
            index_entries: 3,
            time_entries: 2,
            entries_crc: Some(EntriesCrc {
                index: 0xdead_beef,
                time: 17,
            }),
        };
        let v1 = Checkpoint {
            entries_crc: None,
            ..v2
        };
        for (c, len) in [(v2, LEN), (v1, V1_LEN)] {
            let b = c.encode();
            assert_eq!(b.len(), len);
            assert_eq!(Checkpoint::decode(&b), Decoded::Valid(c));
            for at in 0..len {
                let mut bad = b.clone();
                bad[at] ^= 0x10;
                assert!(
                    !matches!(Checkpoint::decode(&bad), Decoded::Valid(_)),
                    "a flipped byte {at} of a {len}-byte checkpoint went unseen"
                );
            }
            for cut in 0..len {
                assert!(matches!(
                    Checkpoint::decode(&b[..cut]),
                    Decoded::Torn { .. } | Decoded::Corrupt(_)
                ));
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(matches!(Checkpoint::decode(&longer), Decoded::Corrupt(_)));
        }
    }
}
