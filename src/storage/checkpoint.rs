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
//! |      4 |    2 | `version`        | 1                                              |
//! |      6 |    1 | `clean`          | 1 = written by a clean close, else 0           |
//! |      7 |    1 | reserved         | 0                                              |
//! |      8 |    8 | `active_base`    | base offset of the active segment              |
//! |     16 |    8 | `log_position`   | bytes of its log known durable                 |
//! |     24 |    8 | `next_offset`    | offset after the last batch below that point   |
//! |     32 |    8 | `max_timestamp`  | largest timestamp below that point (i64)       |
//! |     40 |    4 | `index_entries`  | offset-index entries covering that point       |
//! |     44 |    4 | `time_entries`   | time-index entries covering that point         |
//! |     48 |    4 | `crc`            | CRC-32 of bytes 0..48                          |

use super::record::{Decoded, read_i64, read_u32, read_u64};

pub const FILE_NAME: &str = "checkpoint";
pub const MAGIC: [u8; 4] = *b"SLCP";
pub const VERSION: u16 = 1;
pub const LEN: usize = 52;
const CRC_AT: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub clean: bool,
    pub active_base: u64,
    pub log_position: u64,
    pub next_offset: u64,
    pub max_timestamp: i64,
    pub index_entries: u32,
    pub time_entries: u32,
}

impl Checkpoint {
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = u8::from(self.clean);
        b[8..16].copy_from_slice(&self.active_base.to_le_bytes());
        b[16..24].copy_from_slice(&self.log_position.to_le_bytes());
        b[24..32].copy_from_slice(&self.next_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.max_timestamp.to_le_bytes());
        b[40..44].copy_from_slice(&self.index_entries.to_le_bytes());
        b[44..48].copy_from_slice(&self.time_entries.to_le_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Decoded<Checkpoint> {
        if b.len() < LEN {
            return Decoded::Torn { needed: LEN };
        }
        if b.len() > LEN {
            return Decoded::Corrupt("checkpoint has trailing bytes");
        }
        if b[0..4] != MAGIC || b[4..6] != VERSION.to_le_bytes() {
            return Decoded::Corrupt("bad checkpoint magic or version");
        }
        if crc32fast::hash(&b[..CRC_AT]) != read_u32(b, CRC_AT) {
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_damage_is_caught() {
        let c = Checkpoint {
            clean: true,
            active_base: 7,
            log_position: 1234,
            next_offset: 99,
            max_timestamp: -5,
            index_entries: 3,
            time_entries: 2,
        };
        let b = c.encode();
        assert_eq!(Checkpoint::decode(&b), Decoded::Valid(c));
        let mut bad = b;
        bad[20] ^= 1;
        assert!(matches!(Checkpoint::decode(&bad), Decoded::Corrupt(_)));
        assert!(matches!(Checkpoint::decode(&b[..10]), Decoded::Torn { .. }));
    }
}
