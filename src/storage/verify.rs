//! `sluice verify`: a read-only check of a data directory.
//!
//! Every batch's framing, CRC and offset order; every offset and time index against the log;
//! checkpoints; topic settings. Files are only read (never mapped for writing, the lock is not
//! taken), so it is safe while a broker runs: at the end of an active segment, a batch being
//! written or preallocated zeros are normal and are not reported.
//!
//! Consumer-group state is stored as partition logs and gets the same checks; the caller passes
//! a record check for their contents ([`Verifier::check_records`]).
//!
//! Over 450 lines with one job: every check of every file kind, read-only, in one pass.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::checkpoint::{self, Checkpoint};
use super::index;
use super::mapped::{HEADER_LEN, VERSION, seal_crc};
use super::record::{Batch, BatchHeader, Decoded, StoredRecord, read_i64, read_u32, read_u64};
use super::segment::{FileKind, LOG_HEADER_LEN, LOG_MAGIC, parse_segment_file_name, segment_path};
use super::timeindex;
use super::topic::TOPIC_FILE;

/// One thing found wrong: the file, the byte position in it, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub position: u64,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}",
            self.path.display(),
            self.position,
            self.what
        )
    }
}

/// What a verification looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub partitions: u64,
    pub segments: u64,
    pub batches: u64,
    pub records: u64,
    pub bytes: u64,
}

/// A check of each record of a partition log (group state logs check their events).
pub type RecordCheck<'a> = &'a dyn Fn(&StoredRecord) -> Result<(), String>;

#[derive(Debug, Default)]
pub struct Verifier {
    pub problems: Vec<Problem>,
    /// States the broker repairs by itself when it opens the directory, worth knowing but no
    /// failure: a recovery checkpoint that is missing, empty or torn (a power cut between its
    /// write and its rename's reaching the disk; the broker then scans the whole active segment).
    pub notes: Vec<Problem>,
    pub summary: Summary,
}

impl Verifier {
    fn problem(&mut self, path: &Path, position: u64, what: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_path_buf(),
            position,
            what: what.into(),
        });
    }

    /// Checks every topic under `root/topics`.
    pub fn check_topics(&mut self, root: &Path) {
        let topics = root.join("topics");
        let Ok(entries) = fs::read_dir(&topics) else {
            return;
        };
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let file = dir.join(TOPIC_FILE);
            let partitions = match fs::read_to_string(&file) {
                Ok(text) => match toml::from_str::<super::topic::TopicConfig>(&text) {
                    Ok(c) => c.partitions,
                    Err(e) => {
                        self.problem(&file, 0, format!("topic settings do not parse: {e}"));
                        continue;
                    }
                },
                Err(e) => {
                    self.problem(&file, 0, format!("cannot read topic settings: {e}"));
                    continue;
                }
            };
            for p in 0..partitions {
                self.check_records(&dir.join(p.to_string()), None);
            }
        }
    }

    /// Checks one partition directory; `check` looks at each record too.
    pub fn check_records(&mut self, dir: &Path, check: Option<RecordCheck<'_>>) {
        self.summary.partitions += 1;
        let mut bases = Vec::new();
        match fs::read_dir(dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    if let Some((base, FileKind::Log)) =
                        e.file_name().to_str().and_then(parse_segment_file_name)
                    {
                        bases.push(base);
                    }
                }
            }
            Err(e) => return self.problem(dir, 0, format!("cannot list the partition: {e}")),
        }
        bases.sort_unstable();
        if bases.is_empty() {
            return self.problem(dir, 0, "partition has no segment");
        }
        let cp_path = dir.join(checkpoint::FILE_NAME);
        let cp = match fs::read(&cp_path) {
            Ok(b) => match Checkpoint::decode(&b) {
                Decoded::Valid(c) => Some(c),
                _ => {
                    self.notes.push(Problem {
                        path: cp_path.clone(),
                        position: 0,
                        what: format!(
                            "recovery checkpoint is empty or torn ({} bytes): a hint only; the \
                             broker's next start scans the whole active segment instead",
                            b.len()
                        ),
                    });
                    None
                }
            },
            Err(_) => None,
        };
        let mut expected = bases[0];
        for (i, &base) in bases.iter().enumerate() {
            let next_base = bases.get(i + 1).copied();
            let active = next_base.is_none();
            let index_limit = cp
                .filter(|c| active && c.active_base == base)
                .map(|c| (c.index_entries as usize, c.time_entries as usize));
            expected = self.check_segment(dir, base, next_base, expected, index_limit, check);
        }
    }

    /// Checks one segment; returns the offset after its last batch.
    fn check_segment(
        &mut self,
        dir: &Path,
        base: u64,
        next_base: Option<u64>,
        expected: u64,
        index_limit: Option<(usize, usize)>,
        check: Option<RecordCheck<'_>>,
    ) -> u64 {
        self.summary.segments += 1;
        // Indexes first: while a broker runs, the log only grows after them.
        let index_path = segment_path(dir, base, FileKind::Index);
        let index = self.read_index(&index_path, index::MAGIC, base, index::ENTRY_LEN);
        let time_path = segment_path(dir, base, FileKind::TimeIndex);
        let time = self.read_index(&time_path, timeindex::MAGIC, base, timeindex::ENTRY_LEN);
        let path = segment_path(dir, base, FileKind::Log);
        let bytes = match fs::read(&path) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                self.problem(&path, 0, format!("cannot read: {e}"));
                return expected;
            }
        };
        self.summary.bytes += bytes.len() as u64;
        if bytes.len() < LOG_HEADER_LEN as usize
            || bytes[0..4] != LOG_MAGIC
            || read_u64(&bytes, 8) != base
        {
            self.problem(
                &path,
                0,
                "bad segment header (magic, version or base offset)",
            );
            return expected;
        }
        if expected > base {
            self.problem(
                &path,
                0,
                format!("segment starts at {base}, below offset {expected} of the segment before"),
            );
        }
        let active = next_base.is_none();
        let mut pos = LOG_HEADER_LEN as usize;
        let mut next = expected.max(base);
        // position -> base offset of every batch; running max timestamp before each batch.
        let mut batches: HashMap<u64, u64> = HashMap::new();
        let mut max_before: Vec<(u64, i64)> = Vec::new();
        let mut max_ts = i64::MIN;
        while pos < bytes.len() {
            match Batch::decode(&bytes.slice(pos..)) {
                Decoded::Valid(batch) => {
                    let h: BatchHeader = *batch.header();
                    if h.base_offset < next {
                        self.problem(
                            &path,
                            pos as u64,
                            format!(
                                "batch offset {} goes backwards (expected at least {next})",
                                h.base_offset
                            ),
                        );
                    }
                    if next_base.is_some_and(|nb| h.last_offset() >= nb) {
                        self.problem(
                            &path,
                            pos as u64,
                            "batch runs into the next segment's offsets",
                        );
                    }
                    for r in batch.records() {
                        match r {
                            Ok(r) => {
                                self.summary.records += 1;
                                if let Some(check) = check
                                    && let Err(why) = check(&r)
                                {
                                    self.problem(
                                        &path,
                                        pos as u64,
                                        format!("record {}: {why}", r.offset),
                                    );
                                }
                            }
                            Err(why) => {
                                self.problem(
                                    &path,
                                    pos as u64,
                                    format!("record does not decode: {why}"),
                                );
                                break;
                            }
                        }
                    }
                    self.summary.batches += 1;
                    batches.insert(pos as u64, h.base_offset);
                    max_before.push((h.base_offset - base, max_ts));
                    max_ts = max_ts.max(h.max_timestamp);
                    next = h.next_offset();
                    pos += h.size;
                }
                ref d if normal_end(d, active, &bytes[pos..]) => break,
                Decoded::Torn { needed } => {
                    self.problem(
                        &path,
                        pos as u64,
                        format!(
                            "batch cut short: {needed} bytes claimed, {} left",
                            bytes.len() - pos
                        ),
                    );
                    break;
                }
                Decoded::Corrupt(why) => {
                    self.problem(&path, pos as u64, why);
                    break;
                }
            }
        }
        let data_end = pos as u64;
        // Past damage the log was not read: index entries there cannot be judged.
        let damaged = self.problems.last().is_some_and(|p| p.path == path);
        let scanned_to = if damaged { next - base } else { u64::MAX };
        if let Some((header, entries)) = index {
            self.check_offset_index(
                &index_path,
                (header, &entries),
                base,
                &batches,
                (data_end, if damaged { data_end } else { u64::MAX }),
                index_limit.map(|l| l.0),
            );
        }
        if let Some((header, entries)) = time {
            let closed_end = next_base.filter(|_| !damaged).map(|nb| nb - base);
            self.check_time_index(
                &time_path,
                (header, &entries),
                base,
                &max_before,
                (max_ts, closed_end),
                (index_limit.map(|l| l.1), scanned_to),
            );
        }
        next
    }

    fn read_index(
        &mut self,
        path: &Path,
        magic: [u8; 4],
        base: u64,
        entry: usize,
    ) -> Option<(usize, Vec<u8>)> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                self.problem(path, 0, format!("cannot read index: {e}"));
                return None;
            }
        };
        // A version 1 index (a 16-byte header, no seal) is still checked against the log; the
        // broker rebuilds it at its next start.
        let version = bytes.get(4..6).map(|v| u16::from_le_bytes([v[0], v[1]]));
        let header = if version == Some(1) { 16 } else { HEADER_LEN };
        if bytes.len() < header {
            self.problem(path, bytes.len() as u64, "index shorter than its header");
            return None;
        }
        if bytes[0..4] != magic
            || read_u64(&bytes, 8) != base
            || usize::from(u16::from_le_bytes([bytes[6], bytes[7]])) != entry
        {
            self.problem(
                path,
                0,
                "bad index header (magic, entry size or base offset)",
            );
            return None;
        }
        if version != Some(1) && version != Some(VERSION) {
            self.problem(path, 4, "unknown index version");
            return None;
        }
        let whole = header + (bytes.len() - header) / entry * entry;
        if whole != bytes.len() {
            self.problem(
                path,
                whole as u64,
                format!(
                    "index cut inside an entry ({} bytes over)",
                    bytes.len() - whole
                ),
            );
        }
        let seal = if header == HEADER_LEN {
            read_u32(&bytes, 16)
        } else {
            0
        };
        if seal != 0 {
            let crc = seal_crc(&bytes[..HEADER_LEN - 4], &bytes[HEADER_LEN..]);
            if seal as usize - 1 != (bytes.len() - header) / entry
                || crc != read_u32(&bytes, HEADER_LEN - 4)
            {
                self.problem(path, 16, "the index entries do not match their seal");
            }
        }
        Some((header, bytes[header..whole].to_vec()))
    }

    fn check_offset_index(
        &mut self,
        path: &Path,
        (header, entries): (usize, &[u8]),
        base: u64,
        batches: &HashMap<u64, u64>,
        (data_end, judged_end): (u64, u64),
        limit: Option<usize>,
    ) {
        let mut prev: Option<(u32, u32)> = None;
        for (i, e) in entries.chunks_exact(index::ENTRY_LEN).enumerate() {
            if limit.is_some_and(|l| i >= l) {
                break;
            }
            let (rel, position) = (read_u32(e, 0), read_u32(e, 4));
            if position == 0 {
                break; // preallocated, unused
            }
            let at = (header + i * index::ENTRY_LEN) as u64;
            if u64::from(position) >= judged_end {
                break;
            }
            if prev.is_some_and(|(r, p)| rel <= r || position <= p) {
                self.problem(path, at, "index entries do not increase");
            }
            match batches.get(&u64::from(position)) {
                Some(&b) if b == base + u64::from(rel) => {}
                Some(&b) => self.problem(
                    path,
                    at,
                    format!(
                        "entry names offset {} but the batch there starts at {b}",
                        base + u64::from(rel)
                    ),
                ),
                None if u64::from(position) >= data_end => self.problem(
                    path,
                    at,
                    format!("entry points past the log's end ({position} >= {data_end})"),
                ),
                None => self.problem(
                    path,
                    at,
                    format!("entry points inside a batch (byte {position})"),
                ),
            }
            prev = Some((rel, position));
        }
    }

    fn check_time_index(
        &mut self,
        path: &Path,
        (header, entries): (usize, &[u8]),
        base: u64,
        max_before: &[(u64, i64)],
        (max_ts, closed_end): (i64, Option<u64>),
        (limit, scanned_to): (Option<usize>, u64),
    ) {
        let truth: HashMap<u64, i64> = max_before.iter().copied().collect();
        let mut last = None;
        for (i, e) in entries.chunks_exact(timeindex::ENTRY_LEN).enumerate() {
            if limit.is_some_and(|l| i >= l) {
                break;
            }
            let (ts, rel) = (read_i64(e, 0), u64::from(read_u32(e, 8)));
            if ts == 0 && rel == 0 {
                break; // preallocated, unused
            }
            let at = (header + i * timeindex::ENTRY_LEN) as u64;
            if rel >= scanned_to {
                break;
            }
            let expected = if closed_end == Some(rel) {
                Some(max_ts)
            } else {
                truth.get(&rel).copied()
            };
            match expected {
                Some(t) if t == ts => {}
                Some(t) => self.problem(
                    path,
                    at,
                    format!(
                        "entry says {ts} for offset {}, the log says {t}",
                        base + rel
                    ),
                ),
                None => self.problem(
                    path,
                    at,
                    format!("entry names offset {} where no batch starts", base + rel),
                ),
            }
            last = Some(rel);
        }
        if let Some(end) = closed_end
            && max_ts != i64::MIN
            && last != Some(end)
        {
            self.problem(path, 0, "closed segment's time index lacks its final entry");
        }
    }
}

/// Calls `f` with every record of a partition directory from offset `from` on, in order,
/// reading the files only (no lock, no recovery: a torn tail is simply where it stops). `f`
/// returns false to stop.
pub fn for_each_record(
    dir: &Path,
    from: u64,
    mut f: impl FnMut(StoredRecord) -> bool,
) -> super::error::Result<Vec<Damage>> {
    let mut bases = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| super::error::Error::io(dir, e))? {
        let e = e.map_err(|e| super::error::Error::io(dir, e))?;
        if let Some((base, FileKind::Log)) =
            e.file_name().to_str().and_then(parse_segment_file_name)
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    let mut damage = Vec::new();
    for (i, &base) in bases.iter().enumerate() {
        let next_base = bases.get(i + 1).copied();
        if next_base.is_some_and(|next| next <= from) {
            continue;
        }
        let path = segment_path(dir, base, FileKind::Log);
        let bytes = Bytes::from(fs::read(&path).map_err(|e| super::error::Error::io(&path, e))?);
        let mut pos = LOG_HEADER_LEN as usize;
        let mut next = base;
        while pos < bytes.len() {
            let batch = match Batch::decode(&bytes.slice(pos..)) {
                Decoded::Valid(batch) => batch,
                ref d if normal_end(d, next_base.is_none(), &bytes[pos..]) => break,
                bad => {
                    let reason = match bad {
                        Decoded::Corrupt(why) => why,
                        _ => "batch cut short",
                    };
                    damage.push(Damage {
                        path: path.clone(),
                        position: pos as u64,
                        from: next.max(from),
                        to: next_base,
                        reason: reason.to_string(),
                    });
                    break;
                }
            };
            next = batch.header().next_offset();
            if batch.header().holds_offsets_from(from) {
                for r in batch.records() {
                    let r =
                        r.map_err(|why| super::error::Error::corrupt(&path, pos as u64, why))?;
                    if r.offset >= from && !f(r) {
                        return Ok(damage);
                    }
                }
            }
            pos += batch.header().size;
        }
    }
    Ok(damage)
}

/// Damage [`for_each_record`] read around: the records from `from` to the next segment's base
/// (`to`; the end of the log when `None`) were skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub path: std::path::PathBuf,
    pub position: u64,
    pub from: u64,
    pub to: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let to = self.to.map_or("the end of the log".to_string(), |t| {
            format!("offset {}", t.saturating_sub(1))
        });
        write!(
            f,
            "{}:{}: {}; records from offset {} to {to} skipped",
            self.path.display(),
            self.position,
            self.reason,
            self.from
        )
    }
}

/// Whether a scan of a segment that stopped on `d`, with `rest` left, met a normal end rather
/// than damage: in the active segment (a broker may be writing it), a batch still being
/// written, or preallocated zeros.
fn normal_end<T>(d: &Decoded<T>, active: bool, rest: &[u8]) -> bool {
    active
        && match d {
            Decoded::Valid(_) => false,
            Decoded::Torn { .. } => true,
            Decoded::Corrupt(_) => rest.iter().all(|&b| b == 0),
        }
}

/// Whether `dir` looks like a Sluice data directory (it has `topics/`).
pub fn is_data_dir(dir: &Path) -> bool {
    dir.join("topics").is_dir()
}
