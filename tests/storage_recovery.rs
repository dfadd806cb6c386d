//! Crash recovery: torn tails cut at every byte, flipped bits, garbage, lost and damaged
//! indexes, an interrupted roll. "Crash" is dropping a partition without `close()`: the writer
//! stops without a final sync or clean marker, as a killed process would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::{append_each, assert_records, open, read_all, record, small_config};
use sluice::storage::checkpoint::Checkpoint;
use sluice::storage::record::Decoded;
use sluice::storage::segment::{FileKind, segment_path};
use sluice::storage::{FsyncPolicy, LogConfig, Partition, Record};

/// A partition with one closed segment and an active one holding `tail` batches written after
/// the last checkpoint, then crashed. Returns the records and, per tail batch, its end position.
struct Crashed {
    template: tempfile::TempDir,
    records: Vec<Record>,
    /// (records before the tail batch i ends, byte position where batch i ends) per tail batch.
    tail_ends: Vec<(usize, u64)>,
    active_base: u64,
}

fn crashed_partition(tail: usize) -> Crashed {
    let template = tempfile::tempdir().unwrap();
    let p = open(template.path(), small_config(FsyncPolicy::Always));
    let mut records = append_each(&p, (0..20).map(|i| record(i, 150)));
    p.roll().unwrap();
    let active_base = *p.segment_bases().last().unwrap();
    let mut tail_ends = Vec::new();
    for b in 0..tail {
        let batch: Vec<Record> = (0..3)
            .map(|i| record(100 + b as u64 * 3 + i, 40 + b * 13))
            .collect();
        p.append_blocking(&batch).unwrap();
        records.extend(batch);
        // The file may be longer: small writes preallocate zeros after the log end.
        tail_ends.push((records.len(), p.stats().active_segment_bytes));
    }
    drop(p); // crash
    Crashed {
        template,
        records,
        tail_ends,
        active_base,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn active_log(dir: &Path, c: &Crashed) -> PathBuf {
    segment_path(dir, c.active_base, FileKind::Log)
}

/// Records that survive when the active segment is damaged at byte `pos`.
fn survivors(c: &Crashed, pos: u64) -> usize {
    let closed = c.records.len() - c.tail_ends.len() * 3;
    c.tail_ends
        .iter()
        .take_while(|(_, end)| *end <= pos)
        .last()
        .map_or(closed, |(n, _)| *n)
}

/// Opens the damaged copy and checks it holds exactly the survivors, then keeps appending.
fn check_recovers_to(dir: &Path, c: &Crashed, keep: usize) {
    let p = open(dir, small_config(FsyncPolicy::Always));
    assert_records(&read_all(&p), &c.records[..keep], 0);
    assert_eq!(
        p.high_water(),
        keep as u64,
        "log end is the last valid offset + 1"
    );
    let extra = record(999, 10);
    let a = p.append_blocking(std::slice::from_ref(&extra)).unwrap();
    assert_eq!(a.base_offset, keep as u64, "appends continue densely");
    drop(p);
    let p = open(dir, small_config(FsyncPolicy::Always));
    let mut want = c.records[..keep].to_vec();
    want.push(extra);
    assert_records(&read_all(&p), &want, 0);
}

#[test]
fn recovery_cuts_a_torn_tail_at_every_byte_and_keeps_the_batches_before_it() {
    let c = crashed_partition(4);
    let full = c.tail_ends.last().unwrap().1;
    let first_tail_start = 16;
    let scratch = tempfile::tempdir().unwrap();
    for cut in first_tail_start..=full {
        let dir = scratch.path().join(cut.to_string());
        copy_dir(c.template.path(), &dir);
        OpenOptions::new()
            .write(true)
            .open(active_log(&dir, &c))
            .unwrap()
            .set_len(cut)
            .unwrap();
        let keep = survivors(&c, cut);
        let p = open(&dir, small_config(FsyncPolicy::Always));
        assert_eq!(
            p.recovery_report().truncated_bytes,
            cut - c
                .tail_ends
                .iter()
                .map(|e| e.1)
                .filter(|&e| e <= cut)
                .max()
                .unwrap_or(16),
            "cut at {cut}"
        );
        drop(p);
        check_recovers_to(&dir, &c, keep);
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn recovery_cuts_at_a_flipped_bit_anywhere_in_the_active_segment() {
    let c = crashed_partition(3);
    let full = c.tail_ends.last().unwrap().1;
    let scratch = tempfile::tempdir().unwrap();
    for pos in 16..full {
        let dir = scratch.path().join(pos.to_string());
        copy_dir(c.template.path(), &dir);
        let log = active_log(&dir, &c);
        let mut bytes = fs::read(&log).unwrap();
        bytes[pos as usize] ^= 1 << (pos % 8);
        fs::write(&log, &bytes).unwrap();
        check_recovers_to(&dir, &c, survivors(&c, pos));
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn garbage_or_zeros_after_the_last_batch_are_cut_and_nothing_is_lost() {
    let c = crashed_partition(2);
    let scratch = tempfile::tempdir().unwrap();
    let junk: [&[u8]; 3] = [
        &[0u8; 4096],
        b"\xff\xff\xff\x7fgarbage",
        &[1, 0, 0, 0, 1, 2, 3],
    ];
    for (i, junk) in junk.iter().enumerate() {
        let dir = scratch.path().join(i.to_string());
        copy_dir(c.template.path(), &dir);
        let mut f = OpenOptions::new()
            .append(true)
            .open(active_log(&dir, &c))
            .unwrap();
        f.write_all(junk).unwrap();
        drop(f);
        check_recovers_to(&dir, &c, c.records.len());
    }
}

#[test]
fn a_missing_or_damaged_index_is_rebuilt_and_agrees_with_a_full_scan() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path(), small_config(FsyncPolicy::Never));
    let want = append_each(
        &p,
        (0..600).map(|i| record(i, 100 + (i as usize % 5) * 100)),
    );
    let bases = p.segment_bases();
    assert!(bases.len() >= 3);
    p.close().unwrap();

    let index_of = |i: usize, kind| segment_path(dir.path(), bases[i], kind);
    // A deleted index, a truncated one, one overwritten with garbage, a deleted time index.
    fs::remove_file(index_of(0, FileKind::Index)).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(index_of(1, FileKind::Index))
        .unwrap();
    f.set_len(INDEX_HEADER as u64 + 8 * 3 + 5).unwrap();
    let mut garbage = fs::read(index_of(2, FileKind::Index)).unwrap();
    for (i, b) in garbage.iter_mut().enumerate().skip(INDEX_HEADER) {
        *b = (i * 131 % 251) as u8;
    }
    fs::write(index_of(2, FileKind::Index), garbage).unwrap();
    fs::remove_file(index_of(0, FileKind::TimeIndex)).unwrap();

    let p = open(dir.path(), small_config(FsyncPolicy::Never));
    let rebuilt = &p.recovery_report().rebuilt_indexes;
    for i in 0..3 {
        assert!(
            rebuilt.contains(&index_of(i, FileKind::Index)),
            "segment {i} index rebuilt: {rebuilt:?}"
        );
    }
    assert_records(&read_all(&p), &want, 0);
    assert_every_offset_reads_from_itself(&p);
    for (i, r) in want.iter().enumerate().step_by(17) {
        assert_eq!(p.offset_for_timestamp(r.timestamp).unwrap(), Some(i as u64));
    }
    // The rebuilt index is written back: the next open is clean and scans nothing.
    p.close().unwrap();
    let p = open(dir.path(), small_config(FsyncPolicy::Never));
    assert!(p.recovery_report().rebuilt_indexes.is_empty());
    assert!(p.recovery_report().clean);
}

#[test]
fn a_segment_whose_creation_was_interrupted_is_dropped() {
    let c = crashed_partition(2);
    let dir = tempfile::tempdir().unwrap();
    copy_dir(c.template.path(), dir.path());
    let next = c.records.len() as u64;
    fs::write(segment_path(dir.path(), next, FileKind::Log), b"SLLG\x01").unwrap();
    check_recovers_to(dir.path(), &c, c.records.len());
}

#[test]
fn recovery_after_a_crash_scans_only_the_tail_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = sluice::storage::LogConfig {
        segment_bytes: 16 << 20,
        checkpoint_bytes: 256 << 10,
        ..small_config(FsyncPolicy::Always)
    };
    let p = Partition::open(
        dir.path(),
        config.clone(),
        std::sync::Arc::new(sluice::storage::RealIo),
        None,
    )
    .unwrap();
    let batch: Vec<Record> = (0..100).map(|i| record(i, 1000)).collect();
    for _ in 0..40 {
        p.append_blocking(&batch).unwrap();
    }
    let size = p.stats().size_bytes;
    drop(p); // crash
    let p = Partition::open(
        dir.path(),
        config,
        std::sync::Arc::new(sluice::storage::RealIo),
        None,
    )
    .unwrap();
    let report = p.recovery_report();
    assert!(!report.clean);
    assert!(
        report.scanned_bytes < (256 << 10) + 110_000,
        "scanned {} of {size} bytes",
        report.scanned_bytes
    );
    assert_eq!(p.high_water(), 4000);
    assert_eq!(read_all(&p).len(), 4000);
}

#[test]
fn preallocated_zeros_are_cut_by_recovery_and_by_a_clean_close_without_counting_as_damage() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path(), small_config(FsyncPolicy::Always));
    let want: Vec<Record> = (0..10).map(|i| record(i, 100)).collect();
    for r in &want {
        p.append_blocking(std::slice::from_ref(r)).unwrap();
    }
    let log = segment_path(dir.path(), 0, FileKind::Log);
    let data_len = p.stats().active_segment_bytes;
    assert!(
        fs::metadata(&log).unwrap().len() > data_len,
        "small appends preallocate zeros after the log end"
    );
    drop(p); // crash with the zero tail on disk
    let p = open(dir.path(), small_config(FsyncPolicy::Always));
    assert_eq!(
        p.recovery_report().truncated_bytes,
        0,
        "zeros are not damage"
    );
    assert_eq!(fs::metadata(&log).unwrap().len(), data_len);
    assert_records(&read_all(&p), &want, 0);
    p.append_blocking(&[record(10, 100)]).unwrap();
    let data_len = p.stats().active_segment_bytes;
    p.close().unwrap();
    assert_eq!(
        fs::metadata(&log).unwrap().len(),
        data_len,
        "close trims the zeros"
    );
}

/// Index files carry 24 bytes of header, the last 8 the seal (entries + 1, CRC).
const INDEX_HEADER: usize = 24;

/// After a crash the active segment's indexes carry no seal (they were growing); recovery
/// resumes from the last checkpoint, trusting the index entries it covers only while they match
/// the CRCs the checkpoint recorded of them. Any changed byte of those entries, in either index,
/// is found and the index rebuilt: every record reads from its offset and every timestamp finds
/// its record. (Before checkpoints carried those CRCs, a changed entry below the checkpoint was
/// trusted, and a lookup by time could miss its record.)
#[test]
fn after_a_crash_a_changed_index_entry_the_checkpoint_covers_is_found_and_the_index_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    // Synced as it goes, with a checkpoint every 4 KiB of log.
    let config = LogConfig {
        checkpoint_bytes: 4096,
        ..small_config(FsyncPolicy::Always)
    };
    let p = open(dir.path(), config.clone());
    let want = append_each(&p, (0..300).map(|i| record(i, 300)));
    let active = *p.segment_bases().last().unwrap();
    let log_len = p.stats().active_segment_bytes;
    drop(p); // a crash
    let cp = match Checkpoint::decode(&fs::read(dir.path().join("checkpoint")).unwrap()) {
        Decoded::Valid(c) => c,
        other => panic!("no valid checkpoint: {other:?}"),
    };
    assert_eq!(cp.active_base, active);
    assert!(!cp.clean);
    assert!(cp.index_entries >= 8 && cp.time_entries >= 8, "{cp:?}");
    let index_path = |case: &Path| segment_path(case, active, FileKind::Index);
    let scratch = tempfile::tempdir().unwrap();
    let copy = |name: &str| copy_partition(dir.path(), &scratch.path().join(name));
    let assert_found = |p: &Partition, what: &str| assert_found(p, &want, 7, what);

    // Unchanged, recovery resumes from the checkpoint: the entries are kept, the log below it is
    // not scanned again.
    let case = copy("unchanged");
    let p = open(&case, config.clone());
    let report = p.recovery_report();
    assert!(report.rebuilt_indexes.is_empty(), "{report:?}");
    assert!(report.scanned_bytes < log_len / 2, "{report:?}");
    assert_found(&p, "unchanged");
    drop(p);
    fs::remove_dir_all(&case).unwrap();

    // A version 1 checkpoint (no entry CRCs, as the version before wrote) is resumed from as
    // before, and the broker's next checkpoint is version 2.
    let case = copy("version 1");
    let v1 = Checkpoint {
        entries_crc: None,
        ..cp
    };
    fs::write(case.join("checkpoint"), v1.encode()).unwrap();
    let p = open(&case, config.clone());
    let report = p.recovery_report();
    assert!(report.rebuilt_indexes.is_empty(), "{report:?}");
    assert!(report.scanned_bytes < log_len / 2, "{report:?}");
    assert_found(&p, "version 1");
    p.close().unwrap();
    let written = fs::read(case.join("checkpoint")).unwrap();
    assert!(matches!(Checkpoint::decode(&written), Decoded::Valid(c) if c.entries_crc.is_some()));
    fs::remove_dir_all(&case).unwrap();

    let mut cases = 0;
    for (kind, entry, covered) in [
        (FileKind::Index, 8, cp.index_entries),
        (FileKind::TimeIndex, 12, cp.time_entries),
    ] {
        let entries = INDEX_HEADER..INDEX_HEADER + covered as usize * entry;
        // Every other byte (each field's lowest among them), its lowest bit (an entry moved by
        // one: a lookup by time missed a record when this was trusted) and its highest.
        for (at, flip) in entries.step_by(2).flat_map(|at| [(at, 0x01), (at, 0x80)]) {
            let case = copy(&format!("{cases}"));
            cases += 1;
            let path = segment_path(&case, active, kind);
            let mut bytes = fs::read(&path).unwrap();
            bytes[at] ^= flip;
            fs::write(&path, bytes).unwrap();
            let p = open(&case, config.clone());
            let what = format!("{kind:?}, byte {at} xor {flip:#x}");
            assert!(
                p.recovery_report()
                    .rebuilt_indexes
                    .contains(&index_path(&case)),
                "{what}: not rebuilt"
            );
            assert_found(&p, &what);
            drop(p);
            fs::remove_dir_all(&case).unwrap();
        }
    }
    assert!(cases > 100);
}

/// A sealed index (a closed segment's, or any after a clean close) with any byte changed —
/// header, seal or entry — is found at open and rebuilt: every record reads from its offset and
/// every timestamp finds its record. Found by the `index_files` fuzz target: a changed entry that
/// kept the entries in order used to be trusted, and a lookup by time could skip records.
#[test]
fn a_changed_byte_anywhere_in_a_sealed_index_is_found_and_the_index_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let p = open(dir.path(), small_config(FsyncPolicy::Never));
    let want = append_each(&p, (0..300).map(|i| record(i, 300)));
    let bases = p.segment_bases();
    p.close().unwrap();
    drop(p);
    let scratch = tempfile::tempdir().unwrap();
    let mut cases = 0;
    // The first (closed) segment and the active one, both files.
    for base in [bases[0], *bases.last().unwrap()] {
        for kind in [FileKind::Index, FileKind::TimeIndex] {
            let len = fs::read(segment_path(dir.path(), base, kind))
                .unwrap()
                .len();
            // Every header byte, then every 5th byte of the entries.
            let positions = (0..INDEX_HEADER).chain((INDEX_HEADER..len).step_by(5));
            for at in positions {
                let case = copy_partition(dir.path(), &scratch.path().join(cases.to_string()));
                cases += 1;
                let path = segment_path(&case, base, kind);
                let mut bytes = fs::read(&path).unwrap();
                bytes[at] ^= 0x10;
                fs::write(&path, bytes).unwrap();
                let p = open(&case, small_config(FsyncPolicy::Never));
                let rebuilt = &p.recovery_report().rebuilt_indexes;
                // (The active segment's indexes are rebuilt by its recovery scan.)
                assert!(
                    base != bases[0]
                        || rebuilt.contains(&segment_path(&case, base, FileKind::Index)),
                    "{kind:?} of segment {base}, byte {at} changed: not rebuilt"
                );
                let what = format!("{kind:?} of segment {base}, byte {at} changed");
                assert_found(&p, &want, 13, &what);
                drop(p);
                fs::remove_dir_all(&case).unwrap();
            }
        }
    }
    assert!(cases > 100);
}

/// A copy of partition directory `from` at `to` (created); returns `to`.
fn copy_partition(from: &Path, to: &Path) -> PathBuf {
    fs::create_dir(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

/// Every record of `want` reads back as written, and every `step`th is found from its offset
/// and by its timestamp (through whatever index entries `p` has).
fn assert_found(p: &Partition, want: &[Record], step: usize, what: &str) {
    assert_records(&read_all(p), want, 0);
    for (i, r) in want.iter().enumerate().step_by(step) {
        assert_eq!(
            p.read(i as u64, 1).unwrap()[0].header().base_offset,
            i as u64,
            "{what}: the read from {i}"
        );
        assert_eq!(
            p.offset_for_timestamp(r.timestamp).unwrap(),
            Some(i as u64),
            "{what}: the time of {i}"
        );
    }
}

/// A read from each offset starts its records at that offset (through whatever index entry
/// the read uses).
fn assert_every_offset_reads_from_itself(p: &Partition) {
    for from in 0..p.high_water() {
        let first = p.read(from, 1).unwrap()[0]
            .records()
            .map(|r| r.unwrap())
            .find(|r| r.offset >= from)
            .unwrap();
        assert_eq!(first.offset, from);
    }
}
