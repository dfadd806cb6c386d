//! What the fuzz targets share: a partition written once per process (the template), copied
//! for each input so that an input damages its own copy, and the records it holds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use sluice::storage::{FsyncPolicy, Header, LogConfig, Partition, RealIo, Record, StoredRecord};

/// Records in the template: several segments, the last one active.
pub const RECORDS: u64 = 400;

/// Small segments and a dense index, so that a few hundred records make several segments with
/// many index entries each.
pub fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 16 << 10,
        index_interval_bytes: 256,
        fsync: FsyncPolicy::Never,
        checkpoint_bytes: 1 << 40,
        preallocate_bytes: 0,
        ..LogConfig::default()
    }
}

/// Record `seq`, of a size that varies with it; timestamps rise with `seq`.
pub fn record(seq: u64) -> Record {
    let mut value = format!("value-{seq}-").into_bytes();
    value.resize(10 + (seq as usize * 37) % 300, b'v');
    Record {
        timestamp: 1_700_000_000_000 + seq as i64 * 10,
        key: Some(Bytes::from(format!("key-{}", seq % 7))),
        value: Some(Bytes::from(value)),
        headers: vec![Header {
            key: "seq".into(),
            value: Bytes::from(seq.to_string()),
        }],
        id: seq
            .is_multiple_of(3)
            .then(|| Bytes::from(format!("submission-{seq}"))),
    }
}

/// How a template partition was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, arbitrary::Arbitrary)]
pub enum Left {
    /// Closed cleanly: every index sealed, a clean checkpoint.
    Clean,
    /// As after a crash, with no checkpoint inside the active segment (recovery scans it all).
    Crashed,
    /// As after a crash, synced as it went with a checkpoint every 2 KiB of log: recovery resumes
    /// from the last one, trusting the active index's entries the checkpoint's CRCs vouch for.
    CrashedAfterCheckpoints,
}

/// A partition of [`RECORDS`] records written one batch each, left as `left` says, kept for the
/// life of the process.
pub fn template(left: Left) -> &'static Path {
    static TEMPLATES: [OnceLock<tempfile::TempDir>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    TEMPLATES[left as usize]
        .get_or_init(|| {
            let dir = scratch();
            let config = match left {
                Left::CrashedAfterCheckpoints => LogConfig {
                    fsync: FsyncPolicy::Always,
                    checkpoint_bytes: 2 << 10,
                    ..config()
                },
                Left::Clean | Left::Crashed => config(),
            };
            let p = Partition::open(dir.path(), config, Arc::new(RealIo), None).unwrap();
            for seq in 0..RECORDS {
                p.append_blocking(&[record(seq)]).unwrap();
            }
            if left == Left::Clean {
                p.close().unwrap();
            }
            drop(p);
            dir
        })
        .path()
}

/// A temporary directory, in memory where the machine has one.
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// A copy of `from` (flat: a partition directory) in a new scratch directory.
pub fn copy_of(from: &Path) -> tempfile::TempDir {
    let to = scratch();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        // libFuzzer's timer signal can interrupt the copy (`std::fs::copy` does not retry):
        // copied again whole.
        loop {
            match std::fs::copy(e.path(), to.path().join(e.file_name())) {
                Err(x) if x.kind() == std::io::ErrorKind::Interrupted => continue,
                copied => {
                    copied.unwrap();
                    break;
                }
            }
        }
    }
    to
}

/// The files of a partition directory with this extension, by base offset.
pub fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(ext))
        .collect();
    out.sort();
    out
}

/// Every record from the log start up, or the first error a read gave.
pub fn read_all(p: &Partition) -> Result<Vec<StoredRecord>, sluice::storage::Error> {
    let mut out = Vec::new();
    let mut next = p.log_start();
    while next < p.high_water() {
        let batches = p.read(next, 64 << 10)?;
        assert!(
            !batches.is_empty(),
            "a read at {next} below the high-water mark {} found nothing",
            p.high_water()
        );
        for b in &batches {
            for r in b.records() {
                let r =
                    r.unwrap_or_else(|why| panic!("a CRC-checked batch has a bad record: {why}"));
                if r.offset >= next {
                    out.push(r);
                }
            }
            next = next.max(b.header().next_offset());
        }
    }
    Ok(out)
}

/// Asserts that `got` is the template's records from offset 0, in order, as written.
pub fn assert_as_written(got: &[StoredRecord], what: &str) {
    for (i, r) in got.iter().enumerate() {
        let want = record(i as u64);
        assert_eq!(
            r.offset, i as u64,
            "{what}: record {i} has offset {}",
            r.offset
        );
        assert!(
            r.value == want.value && r.key == want.key && r.timestamp == want.timestamp,
            "{what}: record {i} is not the one written"
        );
    }
}

/// Opens a partition directory as the broker would.
pub fn open(dir: &Path) -> sluice::storage::Result<Partition> {
    Partition::open(dir, config(), Arc::new(RealIo), None)
}

/// Checks every way of finding a record: from each offset a read starts at the batch holding
/// it; each record's timestamp finds it (or an earlier record of the same time).
pub fn assert_lookups(p: &Partition, what: &str) {
    for seq in (0..RECORDS).step_by(7) {
        let batches = p.read(seq, 1).unwrap();
        let first = batches
            .first()
            .unwrap_or_else(|| panic!("{what}: nothing read from offset {seq}"));
        let h = first.header();
        assert!(
            h.base_offset <= seq && seq < h.next_offset(),
            "{what}: a read from {seq} starts at the batch of {}..{}",
            h.base_offset,
            h.next_offset()
        );
        let at = p
            .offset_for_timestamp(record(seq).timestamp)
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: no offset for the timestamp of {seq}"));
        assert_eq!(at, seq, "{what}: the timestamp of {seq} finds {at}");
    }
}

/// A broker serving on loopback ports (gRPC and HTTP) for the life of the fuzzing process, with
/// a topic `t` holding a few messages and a group `g` that has read them, so that inputs meet
/// existing things as well as absent ones.
pub struct Broker {
    pub rt: tokio::runtime::Runtime,
    pub channel: tonic::transport::Channel,
    pub http: std::net::SocketAddr,
    _running: sluice::server::Running,
    _dir: tempfile::TempDir,
}

pub fn broker() -> &'static Broker {
    static B: OnceLock<Broker> = OnceLock::new();
    B.get_or_init(|| {
        use sluice::proto::v1 as pb;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = scratch();
        let mut config = sluice::config::Config {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            ..sluice::config::Config::default()
        };
        config.http.listen = "127.0.0.1:0".into();
        config.log.segment_bytes = 64 << 10;
        let (running, channel) = rt.block_on(async {
            let running = sluice::server::start(config, Default::default())
                .await
                .unwrap();
            let channel = sluice::cli::connect(&running.addr.to_string())
                .await
                .unwrap();
            let mut client = pb::broker_client::BrokerClient::new(channel.clone());
            client
                .send(pb::SendRequest {
                    topic: "t".into(),
                    messages: (0..5)
                        .map(|i| pb::Message {
                            key: Some(Bytes::from(format!("k{i}"))),
                            value: Some(Bytes::from(format!("v{i}"))),
                            ..Default::default()
                        })
                        .collect(),
                })
                .await
                .unwrap();
            let mut member = client
                .subscribe(pb::SubscribeRequest {
                    topic: "t".into(),
                    group: "g".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let first = member.message().await.unwrap().unwrap();
            assert!(!first.deliveries.is_empty());
            (running, channel)
        });
        let http = running.http_addr.unwrap();
        Broker {
            rt,
            channel,
            http,
            _running: running,
            _dir: dir,
        }
    })
}
