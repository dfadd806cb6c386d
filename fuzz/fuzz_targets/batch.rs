//! Record batches as the log stores them and as Raft proposals carry them between nodes: every
//! decoder of a batch's bytes, on any bytes. What must hold: the header parser and the full
//! decoder agree; a torn batch asks for more than it was given; a valid batch yields at most
//! the records its header counts, each inside its offset range; the proposal paths refuse
//! what does not frame and merge only what they can read back.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice::storage::record::{Batch, BatchHeader, Decoded, EncodedBatch, RaftId};

fuzz_target!(|data: &[u8]| {
    let buf = Bytes::copy_from_slice(data);
    let parsed = BatchHeader::parse(data);
    match Batch::decode(&buf) {
        Decoded::Valid(batch) => {
            let Decoded::Valid(h) = parsed else {
                panic!("decode accepts a header parse refuses")
            };
            assert_eq!(&h, batch.header());
            assert!(h.size <= data.len());
            assert_eq!(batch.bytes().len(), h.size);
            let mut n = 0u32;
            for r in batch.records() {
                let Ok(r) = r else { break };
                assert!(
                    r.offset >= h.base_offset && r.offset <= h.last_offset(),
                    "record offset {} outside {}..={}",
                    r.offset,
                    h.base_offset,
                    h.last_offset()
                );
                n += 1;
            }
            assert!(
                n <= h.record_count,
                "{n} records in a batch that counts {}",
                h.record_count
            );
            let _ = batch.rebased(h.base_offset.saturating_sub(1));
            let _ = batch.control();
        }
        Decoded::Torn { needed } => {
            assert!(
                needed > data.len(),
                "torn, yet it has the {needed} bytes it needs"
            );
        }
        Decoded::Corrupt(_) => {}
    }
    // The paths of a batch from another node.
    if EncodedBatch::check_proposal(&buf).is_ok() {
        let merged = EncodedBatch::merge_proposals(&[buf.clone(), buf.clone()]);
        if let Ok(m) = merged {
            let m = m.into_bytes();
            EncodedBatch::check_proposal(&m).expect("a merged proposal reads back");
        }
    }
    if let Ok((h, records)) = EncodedBatch::entry_records(&buf) {
        let n = records.take_while(Result::is_ok).count();
        assert!(n <= h.record_count as usize);
    }
    let _ = EncodedBatch::from_entry(data, RaftId { term: 1, index: 1 });
    let _ = EncodedBatch::from_encoded(data.to_vec());
});
