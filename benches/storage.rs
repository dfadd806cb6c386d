//! Storage benchmarks: append throughput (1 KiB records, batches of 100) under `never` and
//! `always` with 1 and 64 appenders, sequential read throughput, index lookup latency, key
//! compaction throughput.
//!
//! Run with `cargo bench --bench storage`. Data goes to `target/bench-data` (or
//! `$BENCH_DATA_DIR`), which must be on the disk being measured, not tmpfs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice::storage::index::{IndexEntry, OffsetIndex};
use sluice::storage::{FsyncPolicy, LogConfig, Partition, RealIo, Record};

const RECORD: usize = 1024;
const BATCH: usize = 100;

fn bench_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("BENCH_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data"));
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn batch_records() -> Vec<Record> {
    (0..BATCH)
        .map(|i| Record {
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::from(format!("patient-{i}"))),
            value: Some(Bytes::from(vec![b'x'; RECORD])),
            headers: Vec::new(),
            id: None,
        })
        .collect()
}

fn open(name: &str, fsync: FsyncPolicy) -> (Arc<Partition>, PathBuf) {
    let dir = bench_dir(name);
    let config = LogConfig {
        fsync,
        segment_bytes: 1 << 30,
        ..LogConfig::default()
    };
    let p = Partition::open(&dir, config, Arc::new(RealIo), None).unwrap();
    (Arc::new(p), dir)
}

/// `appenders` threads each append `per_thread` batches; returns the elapsed time.
fn append_round(p: &Arc<Partition>, appenders: usize, per_thread: usize) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..appenders {
            let p = Arc::clone(p);
            s.spawn(move || {
                let records = batch_records();
                for _ in 0..per_thread {
                    p.append_blocking(&records).unwrap();
                }
            });
        }
    });
    start.elapsed()
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("append_1KiB_x100");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    g.warm_up_time(Duration::from_secs(1));
    for (fsync, name, appenders) in [
        (FsyncPolicy::Never, "never", 1usize),
        (FsyncPolicy::Always, "always", 1),
        (FsyncPolicy::Always, "always", 64),
    ] {
        let per_thread = (256 / appenders).max(1);
        let bytes_per_round = (appenders * per_thread * BATCH * RECORD) as u64;
        g.throughput(Throughput::Bytes(bytes_per_round));
        let (p, dir) = open(&format!("append-{name}-{appenders}"), fsync);
        g.bench_function(BenchmarkId::new(name, appenders), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += append_round(&p, appenders, per_thread);
                }
                total
            })
        });
        let stats = p.stats();
        eprintln!(
            "append {name}/{appenders}: {} appends, {} fsyncs ({:.1} appends per fsync)",
            stats.appends,
            stats.syncs,
            stats.appends as f64 / stats.syncs.max(1) as f64
        );
        drop(p);
        let _ = std::fs::remove_dir_all(dir);
    }
    g.finish();
}

fn read(c: &mut Criterion) {
    let (p, dir) = open("read", FsyncPolicy::Never);
    append_round(&p, 1, 2560); // 256 MiB of records
    let end = p.high_water();
    let size = p.stats().size_bytes;
    let mut g = c.benchmark_group("read");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(size));
    g.bench_function("sequential_256MiB_page_cache", |b| {
        b.iter(|| {
            let mut next = 0;
            let mut bytes = 0usize;
            while next < end {
                for batch in p.read(next, 1 << 20).unwrap() {
                    bytes += batch.bytes().len();
                    next = batch.header().next_offset();
                }
            }
            bytes
        })
    });
    g.throughput(Throughput::Elements(1));
    let mut x: u64 = 12345;
    g.bench_function("random_offset_first_batch", |b| {
        b.iter(|| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let offset = (x >> 11) % end;
            p.read(offset, 1).unwrap().len()
        })
    });
    g.finish();
    drop(p);
    let _ = std::fs::remove_dir_all(dir);
}

fn index_lookup(c: &mut Criterion) {
    let dir = bench_dir("index");
    // A full 1 GiB segment's worth of entries at the default 4 KiB interval.
    let entries = 262_144u32;
    let idx = OffsetIndex::create(
        &dir.join("0.index"),
        0,
        entries as usize,
        &sluice::storage::RealIo,
    )
    .unwrap();
    for i in 0..entries {
        idx.push(IndexEntry {
            relative_offset: i * 4,
            position: 16 + i * 4096,
        });
    }
    let mut x: u64 = 99;
    c.bench_function("index_lookup_262144_entries", |b| {
        b.iter(|| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            idx.lookup(((x >> 33) % u64::from(entries * 4)) as u32)
        })
    });
    drop(idx);
    let _ = std::fs::remove_dir_all(dir);
}

/// Key compaction rewriting 64 MiB of closed segments (1 KiB records over 4,096 keys: most are
/// superseded), from a fresh copy of the partition each iteration.
fn compaction(c: &mut Criterion) {
    let template = bench_dir("compaction-template");
    let config = LogConfig {
        fsync: FsyncPolicy::Never,
        segment_bytes: 8 << 20,
        ..LogConfig::default()
    };
    let p = Partition::open(&template, config.clone(), Arc::new(RealIo), None).unwrap();
    let mut i = 0u64;
    for _ in 0..640 {
        let records: Vec<Record> = (0..BATCH)
            .map(|_| {
                i += 1;
                Record {
                    timestamp: 1_700_000_000_000 + i as i64,
                    key: Some(Bytes::from(format!("patient-{}", i % 4096))),
                    value: Some(Bytes::from(vec![b'x'; RECORD])),
                    headers: Vec::new(),
                    id: None,
                }
            })
            .collect();
        p.append_blocking(&records).unwrap();
    }
    p.roll().unwrap();
    let closed_bytes = p.stats().size_bytes;
    p.close().unwrap();
    drop(p);
    let work = bench_dir("compaction-work");
    let opts = sluice::storage::CompactionOptions {
        now_ms: 1_800_000_000_000,
        delete_retention_ms: 0,
        segment_bytes: 8 << 20,
        below: None,
    };
    let mut g = c.benchmark_group("compaction");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(closed_bytes));
    g.bench_function("rewrite_64MiB_4096_keys", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_dir_all(&work);
                std::fs::create_dir_all(&work).unwrap();
                for e in std::fs::read_dir(&template).unwrap() {
                    let e = e.unwrap();
                    std::fs::copy(e.path(), work.join(e.file_name())).unwrap();
                }
                Partition::open(&work, config.clone(), Arc::new(RealIo), None).unwrap()
            },
            |p| {
                let out = p.compact_keys(&opts).unwrap();
                assert!(out.records_after < out.records_before);
                p
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&template);
    let _ = std::fs::remove_dir_all(&work);
}

criterion_group!(benches, append, read, index_lookup, compaction);
criterion_main!(benches);
