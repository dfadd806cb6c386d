//! The offset index (`<base>.index`) and the time index (`<base>.timeindex`) of any segment,
//! after a clean close or a crash, damaged or replaced. They are derived data: what must hold is
//! that the partition opens and every record is found where it was written — a read from any
//! offset starts at the batch holding it, a timestamp finds its record, a full read returns
//! every record as written — whatever the index files say, unless the damaged file still
//! matches what vouches for it (a file made to lie, which the fuzzer can forge): its own seal,
//! or for the active segment after a crash (not sealed: it was growing) the CRC of its entries
//! in the recovery checkpoint.
#![no_main]

use arbitrary::Arbitrary;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice::storage::checkpoint::Checkpoint;
use sluice::storage::record::Decoded;
use sluice_fuzz::{
    Left, RECORDS, assert_as_written, assert_lookups, copy_of, files, open, read_all, template,
};

#[derive(Debug, Arbitrary)]
enum Damage {
    /// The file replaced by these bytes.
    Replace(Vec<u8>),
    /// Bytes flipped: (position as a fraction of 2^16 of the file, byte to xor in).
    Flip(Vec<(u16, u8)>),
    /// Cut at a fraction of 2^16 of the file.
    Cut(u16),
    /// The file's own 24-byte header followed by these entries (two little-endian words each).
    Entries(Vec<(u32, u32)>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    left: Left,
    time_index: bool,
    segment: u8,
    damage: Damage,
}

fuzz_target!(|input: Input| {
    let dir = copy_of(template(input.left));
    let ext = if input.time_index {
        "timeindex"
    } else {
        "index"
    };
    let all = files(dir.path(), ext);
    let path = &all[input.segment as usize % all.len()];
    let crashed_active = input.left != Left::Clean && Some(path) == all.last();
    let before = std::fs::read(path).unwrap();
    let after = match input.damage {
        Damage::Replace(b) => b,
        Damage::Flip(flips) => {
            let mut b = before.clone();
            for (at, x) in flips {
                if !b.is_empty() {
                    let at = at as usize * b.len() / 65536;
                    b[at] ^= x;
                }
            }
            b
        }
        Damage::Cut(at) => before[..at as usize * before.len() / 65536].to_vec(),
        Damage::Entries(entries) => {
            let mut b = before[..24.min(before.len())].to_vec();
            for (x, y) in entries {
                b.extend_from_slice(&x.to_le_bytes());
                b.extend_from_slice(&y.to_le_bytes());
            }
            b
        }
    };
    let entry = if input.time_index { 12 } else { 8 };
    if after != before && seal_holds(&after, entry) {
        return; // Changed, yet its seal holds: forged, not damaged.
    }
    if crashed_active && checkpoint_vouches(dir.path(), input.time_index, &before, &after, entry) {
        return; // Changed where the checkpoint vouches for it, yet its CRC holds: forged.
    }
    std::fs::write(path, &after).unwrap();
    let p = open(dir.path()).expect("a damaged index never keeps the partition from opening");
    let got = read_all(&p).expect("every record reads");
    assert_eq!(got.len() as u64, RECORDS, "records lost to a damaged {ext}");
    assert_as_written(&got, ext);
    assert_lookups(&p, ext);
    p.close().unwrap();
});

/// Whether `b` is a sealed version 2 index whose seal matches its entries.
fn seal_holds(b: &[u8], entry: usize) -> bool {
    if b.len() < 24 || b[4..6] != 2u16.to_le_bytes() {
        return false;
    }
    let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let (sealed, crc) = (word(16), word(20));
    if sealed == 0
        || !(b.len() - 24).is_multiple_of(entry)
        || sealed as usize - 1 != (b.len() - 24) / entry
    {
        return false;
    }
    sluice::storage::mapped::seal_crc(&b[..20], &b[24..]) == crc
}

/// Whether the entries of a crashed active index that the recovery checkpoint covers changed
/// from `before` to `after` while still matching the CRC the checkpoint recorded of them.
fn checkpoint_vouches(
    dir: &Path,
    time_index: bool,
    before: &[u8],
    after: &[u8],
    entry: usize,
) -> bool {
    let Decoded::Valid(c) = Checkpoint::decode(&std::fs::read(dir.join("checkpoint")).unwrap())
    else {
        return false;
    };
    let Some(crc) = c.entries_crc else {
        return false;
    };
    let (count, want) = if time_index {
        (c.time_entries as usize, crc.time)
    } else {
        (c.index_entries as usize, crc.index)
    };
    let covered = |b: &[u8]| b.get(24..24 + count * entry).map(<[u8]>::to_vec);
    let (was, now) = (covered(before), covered(after));
    now.is_some() && was != now && now.is_some_and(|e| crc32fast::hash(&e) == want)
}
