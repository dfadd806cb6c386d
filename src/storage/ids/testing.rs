//! What the id index's tests share: entries, keys and runs made from a number.

use std::path::Path;

use super::key::{Entry, Key};
use super::run::{self, Run};
use crate::storage::io::RealIo;

pub fn entry(i: u64, stored_ms: i64) -> Entry {
    Entry {
        partition: (i % 3) as u32,
        offset: i,
        stored_ms,
    }
}

pub fn key(i: u64) -> Key {
    Key::of(format!("submission-{i}").as_bytes())
}

pub fn run_of(dir: &Path, seq: u64, ids: impl Iterator<Item = (u64, i64)>) -> Run {
    let mut sorted: Vec<(Key, Entry)> = ids.map(|(i, ms)| (key(i), entry(i, ms))).collect();
    sorted.sort_by_key(|(k, _)| *k);
    let spec = run::Spec {
        lo: seq,
        hi: seq,
        tier: 0,
        watermarks: &[seq, seq, seq],
    };
    run::write(dir, &RealIo, &spec, sorted.len() as u64, sorted.into_iter()).unwrap()
}
