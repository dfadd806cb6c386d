//! The segment scan recovery runs after a crash, on a damaged active segment: bytes flipped,
//! the file cut, garbage written after its end. What must hold: the partition opens; every
//! batch that ends before the first damaged byte is read back exactly as written; every read
//! below the high-water mark finds a batch and every batch it finds checks out; and when records
//! are lost to a flip or garbage, the recovery report says so (bytes cut, or damage found).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sluice::storage::record::{Batch, Decoded};
use sluice::storage::segment::{LOG_HEADER_LEN, parse_segment_file_name};
use sluice_fuzz::{Left, RECORDS, assert_as_written, copy_of, files, open, read_all, template};

#[derive(Debug, Arbitrary)]
struct Damage {
    /// (position in the written part, as a fraction of 2^16; byte to xor in).
    flips: Vec<(u16, u8)>,
    /// Cut the file at this fraction (of 2^16) of its written part.
    cut: Option<u16>,
    /// Bytes written after the end.
    garbage: Vec<u8>,
}

fuzz_target!(|damage: Damage| {
    let dir = copy_of(template(Left::Crashed));
    let logs = files(dir.path(), "log");
    let active = logs.last().expect("a segment");
    let pristine = std::fs::read(active).unwrap();
    // Where each whole batch ends, and the offset after it.
    let name = active.file_name().unwrap().to_str().unwrap();
    let (first_offset, _) = parse_segment_file_name(name).expect("a segment's name");
    let mut ends = Vec::new();
    let mut pos = LOG_HEADER_LEN as usize;
    while pos < pristine.len() {
        let b = bytes::Bytes::copy_from_slice(&pristine[pos..]);
        let Decoded::Valid(batch) = Batch::decode(&b) else {
            panic!("the template's active segment does not decode at {pos}")
        };
        pos += batch.header().size;
        ends.push((pos, batch.header().next_offset()));
    }
    let written = pos;
    let mut bytes = pristine[..written].to_vec();
    let mut first_damage = usize::MAX;
    for (at, x) in &damage.flips {
        let at = *at as usize * written / 65536;
        if *x != 0 && at >= LOG_HEADER_LEN as usize {
            bytes[at] ^= x;
            first_damage = first_damage.min(at);
        }
    }
    if let Some(c) = damage.cut {
        let at = (c as usize * written / 65536).max(LOG_HEADER_LEN as usize);
        bytes.truncate(at);
        first_damage = first_damage.min(at);
    }
    if !damage.garbage.is_empty() {
        bytes.extend_from_slice(&damage.garbage);
        first_damage = first_damage.min(written);
    }
    std::fs::write(active, &bytes).unwrap();
    // Records a cut explains: a file cut at a batch boundary reads as a log that ended there,
    // with nothing to report. Any record lost beyond those is lost to damage, and reported.
    let explained = match damage.cut {
        Some(_) => ends
            .iter()
            .take_while(|(end, _)| *end <= bytes.len() - damage.garbage.len())
            .last()
            .map_or(first_offset, |(_, next)| *next),
        None => RECORDS,
    };

    let p = open(dir.path()).expect("a damaged tail never keeps the partition from opening");
    let got = read_all(&p).expect("what recovery kept reads back");
    // Batches wholly before the damage are all there, as written.
    let intact = ends
        .iter()
        .take_while(|(end, _)| *end <= first_damage)
        .last()
        .map_or(first_offset, |(_, next)| *next);
    assert!(
        got.len() as u64 >= intact,
        "{} records read, {intact} were intact before the damage at {first_damage}",
        got.len()
    );
    assert_as_written(&got[..intact as usize], "before the damage");
    if (got.len() as u64) < explained {
        let r = p.recovery_report();
        assert!(
            r.truncated_bytes > 0 || !r.damaged.is_empty(),
            "records lost to damage, and the report says nothing: {r:?}"
        );
    }
    p.close().unwrap();
});
