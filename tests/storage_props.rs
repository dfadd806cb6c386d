//! Property test: random batches (0 B to 1 MiB values, keys, headers, tombstones, timestamps
//! that go back and forth), random rolls, clean reopens and crashes. After every step, reading
//! from every offset returns exactly what was appended, and a timestamp lookup equals a scan.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use sluice::storage::{FsyncPolicy, Header, LogConfig, Partition, RealIo, Record};

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Record>),
    Roll,
    CleanReopen,
    Crash,
}

fn value_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 0usize..64,
        4 => 64usize..4096,
        1 => 4096usize..(1 << 20) + 1,
    ]
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        0i64..10_000,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        proptest::option::weighted(0.9, value_len()),
        proptest::collection::vec(
            ("[a-z]{0,6}", proptest::collection::vec(any::<u8>(), 0..8)),
            0..3,
        ),
    )
        .prop_map(|(timestamp, key, value, headers)| Record {
            timestamp,
            key: key.map(Bytes::from),
            value: value.map(|n| Bytes::from(vec![(n % 251) as u8; n])),
            headers: headers
                .into_iter()
                .map(|(k, v)| Header {
                    key: k,
                    value: Bytes::from(v),
                })
                .collect(),
            id: None,
        })
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => proptest::collection::vec(arb_record(), 1..6).prop_map(Op::Append),
        2 => Just(Op::Roll),
        1 => Just(Op::CleanReopen),
        1 => Just(Op::Crash),
    ]
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 256 << 10,
        index_interval_bytes: 512,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

fn open(dir: &std::path::Path) -> Partition {
    Partition::open(dir, config(), Arc::new(RealIo), None).unwrap()
}

fn check(p: &Partition, model: &[Record]) {
    assert_eq!(p.high_water(), model.len() as u64);
    let all = common::read_all(p);
    common::assert_records(&all, model, 0);
    // Every offset reads back starting at itself.
    for from in 0..model.len() as u64 {
        let batches = p.read(from, 1).unwrap();
        let first = batches[0]
            .records()
            .map(|r| r.unwrap())
            .find(|r| r.offset >= from)
            .unwrap();
        assert_eq!(first.offset, from);
    }
    // Timestamp lookup equals a full scan, for timestamps around every stored one.
    let mut probes: Vec<i64> = model
        .iter()
        .flat_map(|r| [r.timestamp, r.timestamp + 1])
        .collect();
    probes.extend([-1, 0, 10_001]);
    for t in probes {
        let scan = model
            .iter()
            .position(|r| r.timestamp >= t)
            .map(|i| i as u64);
        assert_eq!(p.offset_for_timestamp(t).unwrap(), scan, "timestamp {t}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_offset_reads_back_what_was_appended(ops in proptest::collection::vec(arb_op(), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path());
        let mut model: Vec<Record> = Vec::new();
        for op in ops {
            match op {
                Op::Append(records) => {
                    let a = p.append_blocking(&records).unwrap();
                    prop_assert_eq!(a.base_offset, model.len() as u64);
                    model.extend(records);
                }
                Op::Roll => p.roll().unwrap(),
                Op::CleanReopen => {
                    p.close().unwrap();
                    p = open(dir.path());
                    prop_assert!(p.recovery_report().clean);
                }
                Op::Crash => {
                    drop(p);
                    p = open(dir.path());
                }
            }
            check(&p, &model);
        }
    }
}
