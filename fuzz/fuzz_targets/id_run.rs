//! A run file of a topic's id index (`ids/<lo>-<hi>.run`), any bytes: damaged, cut, or built
//! by the fuzzer. What must hold: opening reads no more than the file justifies; an open run's
//! entries come in ascending key order, and a point lookup of an entry's key finds that entry or
//! nothing — never another (it finds nothing only when the file's summary, its bloom filter and
//! block fences, disagrees with its blocks under a valid CRC: a file made to lie, as the fuzzer
//! makes them; damage fails a CRC).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::storage::ids::Run;

/// Partitions the run was written for (a run of another count is refused at open).
const PARTITIONS: u32 = 2;

fuzz_target!(|data: &[u8]| {
    let dir = sluice_fuzz::scratch();
    let path = dir.path().join(format!("{:020}-{:020}.run", 0, 100));
    std::fs::write(&path, data).unwrap();
    let Ok(run) = Run::open(&path, PARTITIONS) else {
        return;
    };
    let Ok(entries) = run.entries() else { return };
    let mut last = None;
    for e in entries.take(10_000) {
        let Ok((key, entry)) = e else { break };
        if let Some(prev) = last {
            assert!(prev < key.0, "run entries out of key order");
        }
        last = Some(key.0);
        match run.get(&key) {
            Ok(Some(found)) => assert_eq!(found, entry, "a key's lookup and its entry differ"),
            Ok(None) | Err(_) => {}
        }
    }
});
