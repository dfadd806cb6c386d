//! The upgrade path from a single node's data directory to a cluster node's
//! (docs/replication.md, "Upgrading a single node"), on the files: every message at its offset,
//! the head retention removed and the gaps compaction left kept, the originals moved aside
//! byte for byte, and a crash at any step of the conversion finished by the next start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::common::{FaultyIo, read_all, record};
use sluice::broker::upgrade::{PRE_CLUSTER, adopt_single_node};
use sluice::replication::config::Members;
use sluice::storage::raft_log::RaftLog;
use sluice::storage::record::ControlKind;
use sluice::storage::{
    CompactionOptions, DataDir, FileIo, FsyncPolicy, LogConfig, Partition, RealIo, StoredRecord,
    TopicConfig, topic::CleanupPolicy,
};

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}

fn members() -> Members {
    Members {
        node_id: 1,
        listen: "127.0.0.1:0".parse().unwrap(),
        peers: (1..=3)
            .map(|id| (id, format!("127.0.0.1:{}", 7170 + id)))
            .collect(),
        replication_factor: 3,
        election_timeout_ms: 800,
        heartbeat_ms: 200,
        leader_balance_interval_ms: 0,
        join: false,
    }
}

/// The topics of a single node's directory, as (topic, partition) → (first offset, records).
type Contents = BTreeMap<(String, u32), (u64, Vec<StoredRecord>)>;

/// A single node's data directory: `epro` (2 partitions; partition 0's head removed by
/// retention) and `answers` (compacted: gaps between and inside batches).
fn single_node(dir: &Path) -> Contents {
    let io: Arc<dyn FileIo> = Arc::new(RealIo);
    let data = DataDir::open(dir, Arc::clone(&io)).unwrap();
    let topics = [
        (
            "epro",
            TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
        ),
        (
            "answers",
            TopicConfig {
                cleanup_policy: CleanupPolicy::Compact,
                ..TopicConfig::default()
            },
        ),
    ];
    let mut contents = Contents::new();
    for (name, config) in topics {
        data.create_topic(name, &config).unwrap();
        for p in 0..config.partitions {
            let dir = data.partition_dir(name, p).unwrap();
            let part = Partition::open(&dir, log_config(), Arc::clone(&io), None).unwrap();
            for seq in 0..120u64 {
                // Batches of one to three records.
                let batch: Vec<_> = (0..1 + seq % 3)
                    .map(|i| {
                        let n = seq * 3 + i;
                        let mut r = record(n, 60);
                        // Odd ones share five keys (compaction keeps the newest of each),
                        // even ones have keys of their own: gaps inside and between batches.
                        let key = match n % 2 {
                            0 => format!("own-{n}"),
                            _ => format!("shared-{}", n % 5),
                        };
                        r.key = Some(key.into());
                        r
                    })
                    .collect();
                part.append_blocking(&batch).unwrap();
            }
            if name == "epro" && p == 0 {
                let bases = part.segment_bases();
                assert!(part.delete_segments_below(bases[2]).unwrap() > 0);
            }
            if name == "answers" {
                let opts = CompactionOptions {
                    now_ms: 1_800_000_000_000,
                    delete_retention_ms: 0,
                    segment_bytes: 4096,
                    below: None,
                };
                let outcome = part.compact_keys(&opts).unwrap();
                assert!(outcome.records_after < outcome.records_before);
            }
            part.close().unwrap();
            drop(part);
            // As a restart of the single node finds it.
            let part = Partition::open(&dir, log_config(), Arc::clone(&io), None).unwrap();
            contents.insert((name.to_string(), p), (part.log_start(), read_all(&part)));
            part.close().unwrap();
        }
    }
    contents
}

/// Every file under `dir` with its bytes, by path relative to `dir`.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for (rel, bytes) in files(from) {
        let path = to.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// Asserts `dir` is the cluster node's directory converted from `contents` (whose files were
/// `original`): each partition a Raft log whose first entry is the membership of every
/// founding member and whose messages are the single node's at the same offsets, from the same
/// first offset; the topics marked as this node's to form; the originals in `pre-cluster/`.
fn assert_converted(dir: &Path, contents: &Contents, original: &BTreeMap<PathBuf, Vec<u8>>) {
    let io: Arc<dyn FileIo> = Arc::new(RealIo);
    let data = DataDir::open(dir, Arc::clone(&io)).unwrap();
    for ((name, p), (first, records)) in contents {
        let config = data.topic_config(name).unwrap();
        assert_eq!(config.formed_by, Some(1), "{name}");
        let part = Partition::open(
            &data.partition_dir(name, *p).unwrap(),
            log_config(),
            Arc::clone(&io),
            None,
        )
        .unwrap();
        assert_eq!(part.log_start(), *first, "{name}/{p}: first offset");
        assert_eq!(&read_all(&part), records, "{name}/{p}: messages");
        part.close().unwrap();
        drop(part);
        let dir = data.partition_dir(name, *p).unwrap();
        let log = RaftLog::open(&dir, log_config(), Arc::clone(&io)).unwrap();
        let batches = log.reader().entries(0, u64::MAX, 1 << 30).unwrap();
        let head = &batches[0];
        assert_eq!(
            head.header().raft.map(|id| (id.term, id.index)),
            Some((0, 0))
        );
        let (kind, json) = head.control().expect("the first entry is a control entry");
        assert_eq!(kind, ControlKind::Membership);
        let json = String::from_utf8(json.to_vec()).unwrap();
        for id in 1..=3 {
            assert!(json.contains(&format!("{id}")), "member {id} in {json}");
        }
        // Entries 1, 2, … each a data batch, in order.
        let indexes: Vec<u64> = batches
            .iter()
            .map(|b| b.header().raft.unwrap().index)
            .collect();
        assert_eq!(indexes, (0..indexes.len() as u64).collect::<Vec<_>>());
        let messages: usize = batches.iter().map(|b| b.records().count()).sum();
        assert_eq!(messages, records.len(), "{name}/{p}: one entry per batch");
        log.close().unwrap();
    }
    let aside = files(&dir.join(PRE_CLUSTER).join("topics"));
    let want: BTreeMap<PathBuf, Vec<u8>> = original
        .iter()
        .filter_map(|(rel, bytes)| {
            let rel = rel.strip_prefix("topics").ok()?;
            // The checkpoint a clean close leaves may be rewritten by the conversion's open.
            let checkpoint = rel.file_name().is_some_and(|n| n == "checkpoint");
            (!rel.starts_with("_audit") && !checkpoint).then(|| (rel.to_path_buf(), bytes.clone()))
        })
        .collect();
    let got: BTreeMap<PathBuf, Vec<u8>> = aside
        .into_iter()
        .filter(|(rel, _)| rel.file_name().is_some_and(|n| n != "checkpoint"))
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (rel, bytes) in &want {
        if rel.extension().is_some_and(|e| e == "log") {
            assert_eq!(&got[rel], bytes, "{} moved aside unchanged", rel.display());
        }
    }
    assert!(!dir.join("cluster").join("upgrade").exists());
}

#[test]
fn a_single_nodes_topics_become_raft_logs_with_every_message_at_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let contents = single_node(&single);
    let (first, records) = &contents[&("epro".to_string(), 0)];
    assert!(*first > 0, "the head of epro/0 was removed");
    let (_, compacted) = &contents[&("answers".to_string(), 0)];
    assert!(
        compacted.windows(2).any(|w| w[1].offset > w[0].offset + 1),
        "compaction left gaps"
    );
    assert!(!records.is_empty());
    let original = files(&single);
    let dir = tmp.path().join("node");
    copy_dir(&single, &dir);
    adopt_single_node(&dir, &members(), &log_config(), Arc::new(RealIo)).unwrap();
    assert_converted(&dir, &contents, &original);
    // Starting again converts nothing more (the topics are this node's now).
    let before = files(&dir.join("topics"));
    adopt_single_node(&dir, &members(), &log_config(), Arc::new(RealIo)).unwrap();
    let after = files(&dir.join("topics"));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert_converted(&dir, &contents, &original);
}

/// A crash at each file operation of the conversion (every write, sync, rename from the
/// first on), then a start without faults: the result is always the whole conversion.
#[test]
fn a_crash_at_any_step_of_the_conversion_is_finished_by_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let contents = single_node(&single);
    let original = files(&single);
    let mut crashed = 0;
    for n in 0.. {
        let dir = tmp.path().join(format!("node-{n}"));
        copy_dir(&single, &dir);
        let io = FaultyIo::new();
        io.fail_from.store(n, Ordering::SeqCst);
        let first = adopt_single_node(&dir, &members(), &log_config(), io.clone());
        if first.is_err() {
            crashed += 1;
            adopt_single_node(&dir, &members(), &log_config(), Arc::new(RealIo))
                .unwrap_or_else(|e| panic!("start after a crash at operation {n}: {e}"));
        }
        assert_converted(&dir, &contents, &original);
        std::fs::remove_dir_all(&dir).unwrap();
        if first.is_ok() {
            break;
        }
    }
    assert!(
        crashed > 50,
        "the conversion has {crashed} operations to crash at"
    );
}
