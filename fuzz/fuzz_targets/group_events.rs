//! A consumer group's event log: each record's bytes decoded as an event, and a group's state
//! replayed from a sequence of them. What must hold: an event that decodes encodes back to
//! itself; replaying any decodable sequence never panics; and the state it reaches survives
//! being written as snapshot events and read back (what a group does every MiB of events, and
//! what it opens from after a restart).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::broker::groups::events::Event;
use sluice::broker::groups::fold;

/// Partitions of the replayed topic: events of others are skipped, as for a shrunk topic.
const PARTITIONS: usize = 4;

fuzz_target!(|data: &[u8]| {
    // Records: a length byte, then that many bytes.
    let mut events = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (record, tail) = tail.split_at((len as usize).min(tail.len()));
        rest = tail;
        let Ok(event) = Event::decode(record) else {
            continue;
        };
        let again = Event::decode(&event.encode()).expect("an encoded event decodes");
        assert_eq!(again, event, "an event does not read back");
        events.push(event);
    }
    let state = fold(events, PARTITIONS);
    for (partition, s) in state.iter().enumerate() {
        let snapshot = Event::Snapshot {
            partition: partition as u32,
            state: s.clone(),
        };
        let Ok(Event::Snapshot { state: back, .. }) = Event::decode(&snapshot.encode()) else {
            panic!("a snapshot does not decode")
        };
        let mut want = s.clone();
        // Snapshots do not carry Nack delays (a Delayed event follows them).
        want.delayed.clear();
        assert_eq!(
            back, want,
            "partition {partition}'s state does not survive a snapshot"
        );
    }
});
