//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod http;
pub mod pki;
pub mod power;
pub mod server;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use sluice::storage::{
    FileIo, FsyncPolicy, Header, LogConfig, Partition, RealIo, Record, StoredRecord,
};

/// A [`FileIo`] that injects faults on demand and counts data syncs.
#[derive(Debug)]
pub struct FaultyIo {
    /// Every `sync_data` fails with EIO.
    pub fail_sync: AtomicBool,
    /// Every write fails with ENOSPC before writing anything.
    pub enospc: AtomicBool,
    /// Every write writes half its bytes, then fails with ENOSPC.
    pub short_write: AtomicBool,
    /// Every `set_len` fails with EIO.
    pub fail_set_len: AtomicBool,
    /// Every `sync_data` of an index file (`.index`, `.timeindex`) fails with EIO.
    pub fail_index_sync: AtomicBool,
    pub syncs: AtomicU64,
    /// Operations (writes, syncs, renames) so far.
    pub ops: AtomicU64,
    /// Every operation from this count on fails with EIO (a crash at that step).
    pub fail_from: AtomicU64,
    /// `sync_data` waits while a test holds this lock for writing.
    pub sync_gate: RwLock<()>,
    /// Each data sync takes at least this many microseconds more (a slow disk).
    pub sync_delay_us: AtomicU64,
}

impl Default for FaultyIo {
    fn default() -> Self {
        FaultyIo {
            fail_sync: AtomicBool::new(false),
            enospc: AtomicBool::new(false),
            short_write: AtomicBool::new(false),
            fail_set_len: AtomicBool::new(false),
            fail_index_sync: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            fail_from: AtomicU64::new(u64::MAX),
            sync_gate: RwLock::new(()),
            sync_delay_us: AtomicU64::new(0),
        }
    }
}

impl FaultyIo {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn step(&self) -> io::Result<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_from.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!(
                "injected failure at operation {n}"
            )));
        }
        Ok(())
    }
}

impl FileIo for FaultyIo {
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], pos: u64) -> io::Result<()> {
        self.step()?;
        if self.enospc.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        if self.short_write.load(Ordering::SeqCst) {
            RealIo.write_at(path, file, &buf[..buf.len() / 2], pos)?;
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        RealIo.write_at(path, file, buf, pos)
    }

    /// One operation, like a plain write: the buffers are written as one.
    fn write_vectored_at(
        &self,
        path: &Path,
        file: &File,
        bufs: &[&[u8]],
        pos: u64,
    ) -> io::Result<()> {
        self.write_at(path, file, &bufs.concat(), pos)
    }

    fn set_len(&self, path: &Path, file: &File, len: u64) -> io::Result<()> {
        self.step()?;
        if self.fail_set_len.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected set_len failure"));
        }
        RealIo.set_len(path, file, len)
    }

    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()> {
        drop(self.sync_gate.read().unwrap());
        std::thread::sleep(std::time::Duration::from_micros(
            self.sync_delay_us.load(Ordering::SeqCst),
        ));
        self.step()?;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        let index = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("index" | "timeindex")
        );
        if index && self.fail_index_sync.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected index sync EIO"));
        }
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected EIO"));
        }
        RealIo.sync_data(path, file)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.step()?;
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected EIO"));
        }
        RealIo.sync_dir(dir)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.step()?;
        RealIo.rename(from, to)
    }
}

/// A small config that rolls and indexes often.
pub fn small_config(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: 64 << 10,
        index_interval_bytes: 256,
        fsync,
        checkpoint_bytes: 1 << 40,
        ..LogConfig::default()
    }
}

pub fn open(dir: &Path, config: LogConfig) -> Partition {
    Partition::open(dir, config, Arc::new(RealIo), None).unwrap()
}

/// A record whose value names its sequence number, with a key and a header.
pub fn record(seq: u64, value_len: usize) -> Record {
    let mut value = format!("value-{seq}-").into_bytes();
    value.resize(value_len.max(value.len()), b'x');
    Record {
        timestamp: 1_700_000_000_000 + seq as i64,
        key: Some(Bytes::from(format!("key-{}", seq % 7))),
        value: Some(Bytes::from(value)),
        headers: vec![Header {
            key: "seq".into(),
            value: Bytes::from(seq.to_string()),
        }],
        // Every third record carries an id, so that every storage path sees both kinds.
        id: seq
            .is_multiple_of(3)
            .then(|| Bytes::from(format!("submission-{seq}"))),
    }
}

/// Every visible record, in offset order.
/// Appends each record as a batch of its own, waiting for each; returns them to compare reads
/// with.
pub fn append_each(p: &Partition, records: impl IntoIterator<Item = Record>) -> Vec<Record> {
    records
        .into_iter()
        .inspect(|r| {
            p.append_blocking(std::slice::from_ref(r)).unwrap();
        })
        .collect()
}

pub fn read_all(p: &Partition) -> Vec<StoredRecord> {
    let mut out = Vec::new();
    let mut next = p.log_start();
    while next < p.high_water() {
        let batches = p.read(next, 256 << 10).unwrap();
        assert!(
            !batches.is_empty(),
            "no batch at {next} below the high-water mark"
        );
        for b in &batches {
            for r in b.records() {
                let r = r.unwrap();
                if r.offset >= next {
                    out.push(r);
                }
            }
            next = next.max(b.header().next_offset());
        }
    }
    out
}

/// Asserts that `got` holds exactly `want`, with dense offsets from `start`.
pub fn assert_records(got: &[StoredRecord], want: &[Record], start: u64) {
    assert_eq!(got.len(), want.len(), "record count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.offset, start + i as u64, "offset of record {i}");
        assert_eq!(g.timestamp, w.timestamp, "timestamp of record {i}");
        assert_eq!(g.key, w.key, "key of record {i}");
        assert_eq!(g.value, w.value, "value of record {i}");
        assert_eq!(g.headers, w.headers, "headers of record {i}");
        assert_eq!(g.id, w.id, "id of record {i}");
    }
}

/// The audit trail's records in a stopped broker's data directory, as stored.
pub fn audit_values(data_dir: &Path) -> Vec<Vec<u8>> {
    let mut stored = Vec::new();
    sluice::storage::verify::for_each_record(&data_dir.join("topics/_audit/0"), 0, |r| {
        stored.push(r.value.unwrap().to_vec());
        true
    })
    .unwrap();
    stored
}

/// Replaces a stopped broker's audit trail with `values`, stored with valid CRCs: damage only
/// the hash chain can show.
pub fn rewrite_audit_trail(data_dir: &Path, values: &[Vec<u8>]) {
    let trail = data_dir.join("topics/_audit/0");
    for file in std::fs::read_dir(&trail).unwrap() {
        std::fs::remove_file(file.unwrap().path()).unwrap();
    }
    let p = Partition::open(&trail, LogConfig::default(), Arc::new(RealIo), None).unwrap();
    for value in values {
        p.append_blocking(&[Record {
            timestamp: 0,
            key: None,
            value: Some(Bytes::from(value.clone())),
            headers: Vec::new(),
            id: None,
        }])
        .unwrap();
    }
    p.close().unwrap();
}

/// Whether a call's failure means the node cannot answer yet (down, starting, cut off, too
/// slow, its connection cut), which a test waiting on it may wait out; any other answer is the
/// subject refusing, which such a test must not take for "not yet".
pub fn not_yet(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    ) || refused_by_goaway(status)
}

/// Whether a call was refused by HTTP/2's `GOAWAY` without error (the server closing the
/// connection before it read the call: not processed). tonic answers it as `INTERNAL`, with a
/// message that varies ("h2 protocol error: http2 error", "… not a result of an error"): the
/// h2 error it carries says what it is.
pub fn refused_by_goaway(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = e.source();
    }
    false
}
