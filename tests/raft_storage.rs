//! The partition log as a Raft log: openraft's own storage suite on it, and the properties
//! Sluice adds (entries across segments, truncation and purge at every point, restarts, offsets
//! that stay dense under Raft's own entries, a crash at every byte of the tail).
//!
//! The suite runs the log store with the metadata group's state machine, whose snapshots hold
//! the state at the applied entry, as the suite expects of every snapshot. A partition's state
//! machine takes its snapshot at its retention point instead (the messages after it are in the
//! log, not in the snapshot): `tests/raft_group.rs` checks that with trims, purges and installs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, Membership, StorageError};
use sluice::replication::catalog::Catalog;
use sluice::replication::log_store::{batch_to_entry, entry_to_batch};
use sluice::replication::types::{log_id, raft_id};
use sluice::replication::{GroupStateMachine, LogStore, PartitionRaft, Proposal, StateMachine};
use sluice::storage::raft_log::{RaftLog, StoredVote};
use sluice::storage::record::{BatchHeader, RaftId};
use sluice::storage::{EncodedBatch, LogConfig, RealIo, Record};
use tempfile::TempDir;

fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

struct Builder {
    config: LogConfig,
}

impl StoreBuilder<PartitionRaft, LogStore, GroupStateMachine<Catalog>, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, GroupStateMachine<Catalog>), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| {
            StorageError::from_io_error(
                openraft::ErrorSubject::Store,
                openraft::ErrorVerb::Write,
                e,
            )
        })?;
        let part = dir.path().join("p");
        let log = RaftLog::open(&part, self.config.clone(), Arc::new(RealIo)).map_err(|e| {
            StorageError::from_io_error(
                openraft::ErrorSubject::Store,
                openraft::ErrorVerb::Read,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let sm = GroupStateMachine::open(&part, Arc::new(RealIo), log.reader())?;
        Ok((dir, LogStore::new(log), sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_partition_log() {
    Suite::test_all(Builder {
        config: LogConfig::default(),
    })
    .expect("openraft's storage suite");
}

#[test]
fn openraft_storage_suite_passes_with_entries_spread_over_segments() {
    Suite::test_all(Builder {
        config: small_segments(),
    })
    .expect("openraft's storage suite");
}

fn message(i: u64) -> Record {
    Record {
        timestamp: 1_700_000_000_000 + i as i64,
        key: Some(Bytes::from(format!("k{i}"))),
        value: Some(Bytes::from(vec![b'v'; 200 + (i as usize % 50)])),
        ..Record::default()
    }
}

/// Entry `index` of term `term`: every fifth a Raft control entry, the rest 1–3 messages.
fn entry(term: u64, index: u64) -> Entry<PartitionRaft> {
    let id = log_id(RaftId { term, index });
    let payload = match index % 5 {
        0 => EntryPayload::Blank,
        4 => EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1, 2, 3])], None)),
        n => {
            let records: Vec<Record> = (0..n).map(|k| message(index * 10 + k)).collect();
            EntryPayload::Normal(Proposal::Records(Bytes::copy_from_slice(
                EncodedBatch::new(&records).as_bytes(),
            )))
        }
    };
    Entry {
        log_id: id,
        payload,
    }
}

fn messages_in(e: &Entry<PartitionRaft>) -> u64 {
    match &e.payload {
        EntryPayload::Normal(Proposal::Records(batch)) => BatchHeader::of_entry(batch)
            .expect("a proposal or a stored entry")
            .record_count
            .into(),
        _ => 0,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn append(store: &mut LogStore, entries: Vec<Entry<PartitionRaft>>) {
    store
        .blocking_append(entries)
        .await
        .expect("append, durable");
}

fn open(dir: &std::path::Path) -> LogStore {
    LogStore::new(RaftLog::open(dir, small_segments(), Arc::new(RealIo)).expect("open"))
}

async fn all_entries(store: &mut LogStore) -> Vec<Entry<PartitionRaft>> {
    let entries = store.try_get_log_entries(0..u64::MAX).await.expect("read");
    entries.into_iter().map(as_proposed).collect()
}

/// An entry read back carries its batch as stored (version 2, with its id and CRC); this is
/// the proposal that was written, to compare with it.
fn as_proposed(mut e: Entry<PartitionRaft>) -> Entry<PartitionRaft> {
    if let EntryPayload::Normal(Proposal::Records(stored)) = &e.payload {
        let batch = match sluice::storage::record::Batch::decode(stored) {
            sluice::storage::record::Decoded::Valid(b) => b,
            other => panic!("entry {} reads back as {other:?}", e.log_id),
        };
        assert_eq!(batch.header().raft, Some(raft_id(&e.log_id)));
        e.payload = EntryPayload::Normal(Proposal::Records(batch.without_raft_id().into()));
    }
    e
}

#[test]
fn entries_read_back_as_written_across_segments_and_restarts() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p");
        let written: Vec<_> = (1..=120).map(|i| entry(1 + i / 40, i)).collect();
        {
            let mut store = open(&p);
            for chunk in written.chunks(7) {
                append(&mut store, chunk.to_vec()).await;
            }
            assert!(
                store.raft_log().partition().segment_bases().len() > 3,
                "the test must span segments"
            );
            assert_eq!(all_entries(&mut store).await, written);
            store.raft_log().close().unwrap();
        }
        // Clean restart, then one without a close (the checkpoint may be behind).
        let mut store = open(&p);
        assert_eq!(all_entries(&mut store).await, written);
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(written[119].log_id));
        for from in [1, 2, 39, 40, 41, 77, 119, 120] {
            let got = store.try_get_log_entries(from..from + 9).await.unwrap();
            let got: Vec<_> = got.into_iter().map(as_proposed).collect();
            let want: Vec<_> = written
                .iter()
                .filter(|e| (from..from + 9).contains(&e.log_id.index))
                .cloned()
                .collect();
            assert_eq!(got, want, "entries from {from}");
        }
    });
}

#[test]
fn readers_see_only_committed_messages_at_dense_offsets_and_never_raft_entries() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p");
        let mut store = open(&p);
        let mut sm = StateMachine::open(&p, Arc::new(RealIo), store.raft_log().reader()).unwrap();
        let written: Vec<_> = (1..=60).map(|i| entry(1, i)).collect();
        append(&mut store, written.clone()).await;
        let partition = store.raft_log().partition();
        assert_eq!(
            partition.high_water(),
            0,
            "durable but not applied (not known committed): nothing is readable"
        );
        assert_eq!(partition.read(0, 1 << 20).unwrap().len(), 0);
        assert_eq!(partition.offset_for_timestamp(i64::MIN).unwrap(), None);
        let mut readable = 0;
        for chunk in written.chunks(9) {
            let applied = sm.apply(chunk.to_vec()).await.unwrap();
            readable += chunk.iter().map(messages_in).sum::<u64>();
            assert_eq!(
                partition.high_water(),
                readable,
                "readable up to what is applied"
            );
            for (e, a) in chunk.iter().zip(&applied) {
                let n = messages_in(e);
                assert_eq!(a.offsets.map(|(b, l)| l + 1 - b), (n > 0).then_some(n));
            }
        }
        let total: u64 = written.iter().map(messages_in).sum();
        assert_eq!(partition.high_water(), total);
        assert_eq!(partition.offset_for_timestamp(i64::MIN).unwrap(), Some(0));
        let mut next = 0;
        let mut values = Vec::new();
        while next < partition.high_water() {
            for batch in partition.read(next, 1 << 20).unwrap() {
                assert!(
                    !batch.header().is_control(),
                    "a reader of messages got a Raft entry"
                );
                for r in batch.records() {
                    let r = r.unwrap();
                    assert_eq!(r.offset, next, "offsets are dense");
                    next += 1;
                    values.push(r.value.unwrap());
                }
            }
        }
        let want: Vec<Bytes> = written
            .iter()
            .flat_map(|e| match &e.payload {
                EntryPayload::Normal(Proposal::Records(batch)) => {
                    let b = EncodedBatch::from_encoded(batch.to_vec()).unwrap();
                    let mut sealed = b;
                    let bytes = Bytes::copy_from_slice(sealed.seal(0));
                    match sluice::storage::record::Batch::decode(&bytes) {
                        sluice::storage::record::Decoded::Valid(b) => b
                            .records()
                            .map(|r| r.unwrap().value.unwrap())
                            .collect::<Vec<_>>(),
                        _ => panic!("a proposal that does not decode"),
                    }
                }
                _ => vec![],
            })
            .collect();
        assert_eq!(values, want);
    });
}

#[test]
fn truncation_at_every_index_keeps_exactly_the_prefix_and_the_log_goes_on() {
    rt().block_on(async {
        let written: Vec<_> = (1..=45).map(|i| entry(1, i)).collect();
        for cut in 1..=46u64 {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("p");
            let mut store = open(&p);
            append(&mut store, written.clone()).await;
            if cut <= 45 {
                store
                    .truncate(log_id(RaftId {
                        term: 1,
                        index: cut,
                    }))
                    .await
                    .unwrap();
            }
            let prefix: Vec<_> = written[..(cut - 1) as usize].to_vec();
            assert_eq!(
                all_entries(&mut store).await,
                prefix,
                "after cutting at {cut}"
            );
            let offsets: u64 = prefix.iter().map(messages_in).sum();
            // With everything committed, the partition holds exactly the prefix's offsets.
            store.raft_log().reader().set_committed_offset(u64::MAX);
            assert_eq!(store.raft_log().partition().high_water(), offsets);
            // A new leader's entries follow at the cut, and everything survives a restart.
            let next: Vec<_> = (cut..cut + 12).map(|i| entry(2, i)).collect();
            append(&mut store, next.clone()).await;
            drop(store);
            let mut store = open(&p);
            let mut want = prefix;
            want.extend(next);
            assert_eq!(
                all_entries(&mut store).await,
                want,
                "cut at {cut}, then restart"
            );
            let state = store.get_log_state().await.unwrap();
            assert_eq!(state.last_log_id, want.last().map(|e| e.log_id));
        }
    });
}

#[test]
fn purge_at_every_index_hides_the_prefix_and_frees_whole_segments() {
    rt().block_on(async {
        let written: Vec<_> = (1..=60).map(|i| entry(1, i)).collect();
        for upto in 1..=60u64 {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("p");
            let mut store = open(&p);
            append(&mut store, written.clone()).await;
            let segments_before = store.raft_log().partition().segment_bases().len();
            let purged = log_id(RaftId {
                term: 1,
                index: upto,
            });
            store.purge(purged).await.unwrap();
            let rest: Vec<_> = written[upto as usize..].to_vec();
            assert_eq!(
                all_entries(&mut store).await,
                rest,
                "after purging to {upto}"
            );
            if upto >= 50 {
                assert!(store.raft_log().partition().segment_bases().len() < segments_before);
            }
            drop(store);
            let mut store = open(&p);
            let state = store.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(purged));
            assert_eq!(state.last_log_id, Some(written[59].log_id));
            assert_eq!(
                all_entries(&mut store).await,
                rest,
                "purged to {upto}, restarted"
            );
        }
    });
}

#[test]
fn the_vote_survives_a_restart() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p");
        let mut store = open(&p);
        assert_eq!(store.read_vote().await.unwrap(), None);
        let vote = openraft::Vote::new_committed(7, 3);
        store.save_vote(&vote).await.unwrap();
        drop(store);
        let mut store = open(&p);
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        let log = store.raft_log();
        assert_eq!(
            log.vote(),
            Some(StoredVote {
                term: 7,
                voted_for: Some(3),
                committed: true
            })
        );
    });
}

#[test]
fn a_damaged_raft_file_refuses_the_open_instead_of_forgetting_the_vote() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p");
        let mut store = open(&p);
        store
            .save_vote(&openraft::Vote::new_committed(4, 2))
            .await
            .unwrap();
        drop(store);
        let file = p.join(sluice::storage::raft_log::FILE_NAME);
        let good = std::fs::read(&file).unwrap();
        for damaged in [good[..good.len() - 1].to_vec(), Vec::new(), {
            let mut b = good.clone();
            b[9] ^= 1;
            b
        }] {
            std::fs::write(&file, &damaged).unwrap();
            let err = RaftLog::open(&p, small_segments(), Arc::new(RealIo)).unwrap_err();
            assert!(
                err.to_string().contains(&file.display().to_string()),
                "the error names the file: {err}"
            );
        }
        std::fs::write(&file, &good).unwrap();
        let mut store = open(&p);
        assert_eq!(
            store.read_vote().await.unwrap(),
            Some(openraft::Vote::new_committed(4, 2))
        );
    });
}

#[test]
fn a_crash_at_every_byte_of_the_tail_leaves_a_prefix_of_whole_entries() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p");
        let written: Vec<_> = (1..=6).map(|i| entry(1, i)).collect();
        {
            let mut store = open(&p);
            append(&mut store, written.clone()).await;
        }
        let log_file = std::fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .unwrap();
        let full = std::fs::read(&log_file).unwrap();
        for len in (16..=full.len()).rev() {
            let copy = tempfile::tempdir().unwrap();
            let q = copy.path().join("p");
            std::fs::create_dir_all(&q).unwrap();
            std::fs::write(q.join(log_file.file_name().unwrap()), &full[..len]).unwrap();
            let mut store = open(&q);
            let got = all_entries(&mut store).await;
            assert_eq!(got[..], written[..got.len()], "cut at byte {len}");
            let state = store.get_log_state().await.unwrap();
            assert_eq!(state.last_log_id, got.last().map(|e| e.log_id));
            // And the log takes the next entry where the prefix ends.
            let next = entry(2, got.len() as u64 + 1);
            append(&mut store, vec![next.clone()]).await;
            assert_eq!(all_entries(&mut store).await.last(), Some(&next));
        }
    });
}

#[test]
fn every_entry_kind_round_trips_through_its_batch() {
    for i in 1..=10 {
        let e = entry(3, i);
        let mut batch = entry_to_batch(&e).unwrap();
        let bytes = Bytes::copy_from_slice(batch.seal(i * 100));
        let decoded = match sluice::storage::record::Batch::decode(&bytes) {
            sluice::storage::record::Decoded::Valid(b) => b,
            other => panic!("entry {i} decodes as {other:?}"),
        };
        assert_eq!(decoded.header().raft, Some(RaftId { term: 3, index: i }));
        let back = batch_to_entry(&decoded).unwrap();
        assert_eq!(back.log_id, e.log_id);
        // A follower stores the entry it receives as the same bytes.
        let mut again = entry_to_batch(&back).unwrap();
        assert_eq!(again.seal(i * 100), &bytes[..], "entry {i} stored again");
        assert_eq!(
            as_proposed(back).payload,
            e.payload,
            "entry {i}: what was proposed comes back"
        );
    }
}

/// What a step of a log's history does.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Appends entries `from..=to` of `term`.
    Append { term: u64, from: u64, to: u64 },
    /// Removes entry `at` and every later one (a conflict with a new leader's log).
    Truncate { at: u64 },
    /// Forgets entries up to `upto` (applied, in a snapshot).
    Purge { term: u64, upto: u64 },
}

#[test]
fn a_live_log_reads_back_the_bytes_its_files_hold_through_appends_rolls_truncations_and_purges() {
    // A Raft log keeps the entries it wrote last in memory and serves reads from there. After
    // every step of each history, what the running log reads must be byte for byte what a log
    // opened from a copy of its files reads: a truncated or rolled-away entry is never served
    // from memory, and a new leader's entry at a truncated index is the new one.
    use Step::*;
    let histories: Vec<Vec<Step>> = vec![
        vec![Append {
            term: 1,
            from: 1,
            to: 40,
        }],
        vec![
            Append {
                term: 1,
                from: 1,
                to: 30,
            },
            Truncate { at: 20 },
            Append {
                term: 2,
                from: 20,
                to: 35,
            },
        ],
        vec![
            Append {
                term: 1,
                from: 1,
                to: 10,
            },
            Truncate { at: 1 },
            Append {
                term: 2,
                from: 1,
                to: 3,
            },
            Truncate { at: 3 },
            Append {
                term: 3,
                from: 3,
                to: 25,
            },
        ],
        vec![
            Append {
                term: 1,
                from: 1,
                to: 45,
            },
            Purge { term: 1, upto: 30 },
            Append {
                term: 1,
                from: 46,
                to: 60,
            },
            Truncate { at: 50 },
            Append {
                term: 2,
                from: 50,
                to: 52,
            },
        ],
        vec![
            Append {
                term: 1,
                from: 1,
                to: 12,
            },
            Truncate { at: 12 },
            Append {
                term: 2,
                from: 12,
                to: 12,
            },
            Truncate { at: 12 },
            Append {
                term: 3,
                from: 12,
                to: 40,
            },
            Purge { term: 3, upto: 39 },
        ],
    ];
    rt().block_on(async {
        for (h, history) in histories.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("p");
            let mut store = open(&p);
            for (s, step) in history.iter().enumerate() {
                match *step {
                    Append { term, from, to } => {
                        append(&mut store, (from..=to).map(|i| entry(term, i)).collect()).await
                    }
                    Truncate { at } => {
                        let id = store
                            .try_get_log_entries(at..=at)
                            .await
                            .unwrap()
                            .first()
                            .map(|e| e.log_id)
                            .expect("the entry to cut at");
                        store.truncate(id).await.unwrap();
                    }
                    Purge { term, upto } => store
                        .purge(log_id(RaftId { term, index: upto }))
                        .await
                        .unwrap(),
                }
                // A message entry reads back as its stored bytes (offset, id and CRC included).
                let live = store.try_get_log_entries(0..u64::MAX).await.unwrap();
                let copy = tempfile::tempdir().unwrap();
                let status = std::process::Command::new("cp")
                    .arg("-r")
                    .arg(&p)
                    .arg(copy.path().join("p"))
                    .status()
                    .unwrap();
                assert!(status.success());
                let mut from_files = open(&copy.path().join("p"));
                let on_disk = from_files.try_get_log_entries(0..u64::MAX).await.unwrap();
                assert_eq!(live, on_disk, "history {h}, step {s} ({step:?})");
            }
        }
    });
}
