//! The recovery checkpoint (`checkpoint`): a checksummed hint of where recovery resumes and
//! whether the last close was clean. Any bytes in its place, after a clean close or a crash:
//! the decoder reads back what it accepts (re-encoding gives the same bytes), and the partition
//! opens with every record where it was written.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sluice::storage::checkpoint::Checkpoint;
use sluice::storage::record::Decoded;
use sluice_fuzz::{
    Left, RECORDS, assert_as_written, assert_lookups, copy_of, open, read_all, template,
};

#[derive(Debug, Arbitrary)]
struct Input {
    left: Left,
    /// Flip bytes of the real checkpoint (or of an empty one) instead of replacing it.
    flip: bool,
    bytes: Vec<u8>,
}

fuzz_target!(|input: Input| {
    if let Decoded::Valid(c) = Checkpoint::decode(&input.bytes) {
        let again = c.encode();
        assert_eq!(
            &input.bytes[..again.len()],
            &again[..],
            "a checkpoint does not read back"
        );
    }
    let dir = copy_of(template(input.left));
    let path = dir.path().join("checkpoint");
    let contents = if input.flip {
        let mut b = std::fs::read(&path).unwrap_or_default();
        for (i, x) in input.bytes.iter().enumerate() {
            if let Some(at) = b.len().checked_sub(1).map(|last| i % (last + 1)) {
                b[at] ^= x;
            }
        }
        b
    } else {
        input.bytes
    };
    std::fs::write(&path, &contents).unwrap();
    let p = open(dir.path()).expect("a damaged checkpoint never keeps the partition from opening");
    let got = read_all(&p).expect("every record reads");
    assert_eq!(
        got.len() as u64,
        RECORDS,
        "records lost to a damaged checkpoint"
    );
    assert_as_written(&got, "checkpoint");
    assert_lookups(&p, "checkpoint");
    p.close().unwrap();
});
