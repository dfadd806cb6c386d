//! A run: an immutable file of id index entries sorted by key.
//!
//! # Layout (all integers little-endian)
//!
//! ```text
//! entry blocks   4096 bytes each: up to 102 entries of 40 bytes, zeros, CRC-32 of bytes 0..4092
//!                at 4092. Entry: key [16] | offset u64 | stored_ms i64 | partition u32 | 0 u32
//! bloom filter   bloom_blocks x 64 bytes (blocked: one 512-bit block per key, 7 bits set)
//! fences         one key (16 bytes) per entry block: the block's first key
//! watermarks     partitions x u64
//! footer         64 bytes:
//!                  0 magic "SLID" | 4 version u16 = 1 | 6 0 u16 | 8 lo u64 | 16 hi u64
//!                 24 tier u32 | 28 partitions u32 | 32 count u64 | 40 min_ms i64 | 48 max_ms i64
//!                 56 bloom_blocks u32 | 60 CRC-32 of bloom, fences, watermarks, footer 0..60
//! ```
//!
//! Only the bloom filter, the fences and the watermarks live in memory (about 1.7 bytes per id);
//! a lookup that the filter lets through reads one block with `pread`. The file is written to a
//! temp name, synced and renamed: a run that exists is whole.
//!
//! Over 450 lines with one job: the run file's format, written and read, and its tests beside it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::key::{Entry, Key};
use crate::storage::error::{Error, Result};
use crate::storage::io::{FileIo, create_private};

const MAGIC: &[u8; 4] = b"SLID";
const VERSION: u16 = 1;
pub const BLOCK: usize = 4096;
pub const ENTRY: usize = 40;
pub const ENTRIES_PER_BLOCK: usize = 102;
const BLOCK_CRC_AT: usize = BLOCK - 4;
const FOOTER: usize = 64;
/// Bloom filter bits per id (0.4 % false positives measured, with 7 bits set per key).
const BLOOM_BITS_PER_ID: u64 = 12;
const BLOOM_BLOCK_BYTES: usize = 64;

/// A run's Bloom filter, in an anonymous mapping rather than on the heap: a merge drops the
/// filters of the runs it replaced (up to 1.5 bytes per id each), and a mapping goes back to the
/// system at once, where the allocator would keep the pages of a large freed block resident on
/// the background thread that freed it.
#[derive(Debug)]
struct Bloom {
    map: memmap2::MmapMut,
}

impl Bloom {
    fn zeroed(blocks: usize) -> std::io::Result<Bloom> {
        Ok(Bloom {
            map: memmap2::MmapMut::map_anon(blocks.max(1) * BLOOM_BLOCK_BYTES)?,
        })
    }

    fn blocks(&self) -> usize {
        self.map.len() / BLOOM_BLOCK_BYTES
    }

    fn word(&self, i: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.map[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    }

    fn set(&mut self, probe: &Probe) {
        let at = probe.word(self.blocks());
        for (i, m) in probe.mask.iter().enumerate() {
            let w = self.word(at + i) | m;
            self.map[(at + i) * 8..(at + i) * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
    }

    /// Asks the CPU to bring the probe's block into its cache: a hint, with no effect on what
    /// any lookup answers.
    fn prefetch(&self, probe: &Probe) {
        let at = probe.word(self.blocks()) * 8;
        if let Some(block) = self.map.get(at..) {
            prefetch(block.as_ptr());
        }
    }

    fn may_hold(&self, probe: &Probe) -> bool {
        let at = probe.word(self.blocks());
        (0..8).fold(true, |hit, i| {
            let m = probe.mask[i];
            hit & (self.word(at + i) & m == m)
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn prefetch(at: *const u8) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: SSE is part of x86-64, and a prefetch reads nothing: it cannot fault, whatever the
    // address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_: *const u8) {}

/// What a new run says about itself.
#[derive(Debug)]
pub struct Spec<'a> {
    pub lo: u64,
    pub hi: u64,
    pub tier: u32,
    pub watermarks: &'a [u64],
}

/// An open run: its summary in memory, its entries on disk.
#[derive(Debug)]
pub struct Run {
    path: PathBuf,
    file: File,
    lo: u64,
    hi: u64,
    tier: u32,
    count: u64,
    /// The newest id's time (the footer also keeps the oldest's, for tools).
    max_ms: i64,
    watermarks: Vec<u64>,
    bloom: Bloom,
    fences: Vec<Key>,
}

fn file_name(lo: u64, hi: u64) -> String {
    format!("{lo:020}-{hi:020}.run")
}

fn blocks_for(count: u64) -> u64 {
    count.div_ceil(ENTRIES_PER_BLOCK as u64)
}

/// A key's place in any run's Bloom filter, computed once per lookup and checked against every
/// run. The block is chosen by the key's first 8 bytes read big-endian, so that blocks follow key
/// order (a run is written in key order: its filter is filled front to back); the seven bits
/// inside the 512-bit block come from bytes 8..16.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    prefix: u64,
    mask: [u64; 8],
}

impl Probe {
    pub fn new(key: &Key) -> Probe {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&key.0[..8]);
        let h = key.word(1);
        let mut mask = [0u64; 8];
        for i in 0..7 {
            let bit = ((h >> (9 * i)) & 511) as usize;
            mask[bit / 64] |= 1 << (bit % 64);
        }
        Probe {
            prefix: u64::from_be_bytes(prefix),
            mask,
        }
    }

    /// The first of the block's eight words in a filter of `blocks` blocks.
    fn word(&self, blocks: usize) -> usize {
        (((u128::from(self.prefix) * blocks as u128) >> 64) as usize) * 8
    }
}

pub fn encode_entry(out: &mut [u8], key: &Key, e: &Entry) {
    out[0..16].copy_from_slice(&key.0);
    out[16..24].copy_from_slice(&e.offset.to_le_bytes());
    out[24..32].copy_from_slice(&e.stored_ms.to_le_bytes());
    out[32..36].copy_from_slice(&e.partition.to_le_bytes());
    out[36..40].fill(0);
}

pub fn decode_entry(b: &[u8]) -> (Key, Entry) {
    let mut key = [0u8; 16];
    key.copy_from_slice(&b[0..16]);
    let u64_at = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        w
    };
    let mut p = [0u8; 4];
    p.copy_from_slice(&b[32..36]);
    (
        Key(key),
        Entry {
            offset: u64::from_le_bytes(u64_at(16)),
            stored_ms: i64::from_le_bytes(u64_at(24)),
            partition: u32::from_le_bytes(p),
        },
    )
}

/// Writes a run of `entries` (sorted by key, each key once; at most `upper` of them) in `dir`.
pub fn write(
    dir: &Path,
    io: &dyn FileIo,
    spec: &Spec<'_>,
    upper: u64,
    entries: impl Iterator<Item = (Key, Entry)>,
) -> Result<Run> {
    let path = dir.join(file_name(spec.lo, spec.hi));
    let tmp = dir.join(format!("{}.tmp", file_name(spec.lo, spec.hi)));
    let file = create_private(io, &tmp).map_err(|e| Error::io(&tmp, e))?;
    let bloom_blocks = (upper * BLOOM_BITS_PER_ID).div_ceil(512).max(1) as usize;
    let mut bloom = Bloom::zeroed(bloom_blocks).map_err(|e| Error::io(&tmp, e))?;
    let mut fences = Vec::with_capacity(blocks_for(upper) as usize);
    let (mut count, mut min_ms, mut max_ms) = (0u64, i64::MAX, i64::MIN);
    let mut out = BufWriter::with_capacity(256 << 10, &file);
    let mut block = vec![0u8; BLOCK];
    let mut in_block = 0;
    let io_err = |e| Error::io(&tmp, e);
    let flush_block = |block: &mut Vec<u8>, out: &mut BufWriter<&File>| -> std::io::Result<()> {
        let crc = crc32fast::hash(&block[..BLOCK_CRC_AT]);
        block[BLOCK_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out.write_all(block)?;
        block.fill(0);
        Ok(())
    };
    for (key, e) in entries {
        if in_block == 0 {
            fences.push(key);
        }
        encode_entry(
            &mut block[in_block * ENTRY..(in_block + 1) * ENTRY],
            &key,
            &e,
        );
        bloom.set(&Probe::new(&key));
        count += 1;
        min_ms = min_ms.min(e.stored_ms);
        max_ms = max_ms.max(e.stored_ms);
        in_block += 1;
        if in_block == ENTRIES_PER_BLOCK {
            flush_block(&mut block, &mut out).map_err(io_err)?;
            in_block = 0;
        }
    }
    if in_block > 0 {
        flush_block(&mut block, &mut out).map_err(io_err)?;
    }
    if count == 0 {
        (min_ms, max_ms) = (i64::MIN, i64::MIN);
    }
    // The summary is written as it is checksummed, without a copy of the filter.
    let mut footer = Vec::with_capacity(FOOTER);
    footer.extend_from_slice(MAGIC);
    footer.extend_from_slice(&VERSION.to_le_bytes());
    footer.extend_from_slice(&0u16.to_le_bytes());
    footer.extend_from_slice(&spec.lo.to_le_bytes());
    footer.extend_from_slice(&spec.hi.to_le_bytes());
    footer.extend_from_slice(&spec.tier.to_le_bytes());
    footer.extend_from_slice(&(spec.watermarks.len() as u32).to_le_bytes());
    footer.extend_from_slice(&count.to_le_bytes());
    footer.extend_from_slice(&min_ms.to_le_bytes());
    footer.extend_from_slice(&max_ms.to_le_bytes());
    footer.extend_from_slice(&(bloom_blocks as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    let mut put = |bytes: &[u8]| {
        crc.update(bytes);
        out.write_all(bytes)
    };
    put(&bloom.map).map_err(io_err)?;
    for f in &fences {
        put(&f.0).map_err(io_err)?;
    }
    for w in spec.watermarks {
        put(&w.to_le_bytes()).map_err(io_err)?;
    }
    put(&footer).map_err(io_err)?;
    out.write_all(&crc.finalize().to_le_bytes())
        .map_err(io_err)?;
    out.flush().map_err(io_err)?;
    drop(out);
    io.sync_data(&tmp, &file).map_err(io_err)?;
    drop(file);
    io.rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    io.sync_dir(dir).map_err(|e| Error::io(dir, e))?;
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    Ok(Run {
        path,
        file,
        lo: spec.lo,
        hi: spec.hi,
        tier: spec.tier,
        count,
        max_ms,
        watermarks: spec.watermarks.to_vec(),
        bloom,
        fences,
    })
}

impl Run {
    /// Opens a run, reading and checking its summary (not its entries).
    pub fn open(path: &Path, partitions: u32) -> Result<Run> {
        let corrupt = |why: &str| Error::corrupt(path, 0, format!("id index run: {why}"));
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < FOOTER as u64 {
            return Err(corrupt("shorter than its footer"));
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, len - FOOTER as u64)
            .map_err(|e| Error::io(path, e))?;
        let u32_at = |at: usize| {
            u32::from_le_bytes([footer[at], footer[at + 1], footer[at + 2], footer[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&footer[at..at + 8]);
            u64::from_le_bytes(w)
        };
        if &footer[0..4] != MAGIC || footer[4..6] != VERSION.to_le_bytes() {
            return Err(corrupt("bad magic or version"));
        }
        let (lo, hi, tier, parts, count) =
            (u64_at(8), u64_at(16), u32_at(24), u32_at(28), u64_at(32));
        let (max_ms, bloom_blocks) = (u64_at(48) as i64, u32_at(56));
        if parts != partitions {
            return Err(corrupt("written for another partition count"));
        }
        let blocks = blocks_for(count);
        let meta_len =
            u64::from(bloom_blocks) * BLOOM_BLOCK_BYTES as u64 + blocks * 16 + u64::from(parts) * 8;
        if blocks
            .checked_mul(BLOCK as u64)
            .and_then(|b| b.checked_add(meta_len + FOOTER as u64))
            != Some(len)
        {
            return Err(corrupt("length does not match its footer"));
        }
        let bloom_bytes = bloom_blocks as usize * BLOOM_BLOCK_BYTES;
        let mut bloom = Bloom::zeroed(bloom_blocks as usize).map_err(|e| Error::io(path, e))?;
        let at = blocks * BLOCK as u64;
        if bloom_bytes > 0 {
            file.read_exact_at(&mut bloom.map[..bloom_bytes], at)
                .map_err(|e| Error::io(path, e))?;
        }
        let mut rest = vec![0u8; meta_len as usize - bloom_bytes + FOOTER];
        file.read_exact_at(&mut rest, at + bloom_bytes as u64)
            .map_err(|e| Error::io(path, e))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bloom.map[..bloom_bytes]);
        crc.update(&rest[..rest.len() - 4]);
        if crc.finalize() != u32_at(60) || bloom.blocks() != (bloom_blocks as usize).max(1) {
            return Err(corrupt("summary CRC mismatch"));
        }
        let fences_end = blocks as usize * 16;
        let fences = rest[..fences_end]
            .chunks_exact(16)
            .map(|c| {
                let mut k = [0u8; 16];
                k.copy_from_slice(c);
                Key(k)
            })
            .collect();
        let watermarks = rest[fences_end..fences_end + parts as usize * 8]
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        Ok(Run {
            path: path.to_path_buf(),
            file,
            lo,
            hi,
            tier,
            count,
            max_ms,
            watermarks,
            bloom,
            fences,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn lo(&self) -> u64 {
        self.lo
    }
    pub fn hi(&self) -> u64 {
        self.hi
    }
    pub fn tier(&self) -> u32 {
        self.tier
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn max_ms(&self) -> i64 {
        self.max_ms
    }
    pub fn watermarks(&self) -> &[u64] {
        &self.watermarks
    }

    /// Bytes this run keeps in memory.
    pub fn resident_bytes(&self) -> u64 {
        (self.bloom.map.len() + self.fences.len() * 16 + self.watermarks.len() * 8) as u64
    }

    /// Bytes of the file.
    pub fn file_bytes(&self) -> u64 {
        blocks_for(self.count) * BLOCK as u64 + (self.resident_bytes() + FOOTER as u64)
    }

    /// Whether the Bloom filter lets the key through (it may be here; if not, it is not). No
    /// branch on the filter's bits: a lookup checks every run, and their cache misses overlap.
    pub fn may_hold(&self, probe: &Probe) -> bool {
        self.bloom.may_hold(probe) & (self.count > 0)
    }

    /// Starts loading the probe's filter block (see [`IdIndex::prefetch`](super::IdIndex::prefetch)).
    pub fn prefetch(&self, probe: &Probe) {
        self.bloom.prefetch(probe);
    }

    /// The entry for `key`, if this run has one.
    pub fn get(&self, key: &Key) -> Result<Option<Entry>> {
        if !self.may_hold(&Probe::new(key)) {
            return Ok(None);
        }
        let Some(block) = self.fences.partition_point(|f| f <= key).checked_sub(1) else {
            return Ok(None);
        };
        let buf = self.read_block(block as u64)?;
        let n = (self.count - block as u64 * ENTRIES_PER_BLOCK as u64).min(ENTRIES_PER_BLOCK as u64)
            as usize;
        let at = |i: usize| decode_entry(&buf[i * ENTRY..(i + 1) * ENTRY]);
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let (k, e) = at(mid);
            match k.cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(e)),
            }
        }
        Ok(None)
    }

    fn read_block(&self, block: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; BLOCK];
        let pos = block * BLOCK as u64;
        self.file
            .read_exact_at(&mut buf, pos)
            .map_err(|e| Error::io(&self.path, e))?;
        check_block(&buf, &self.path, pos)?;
        Ok(buf)
    }

    /// Every entry in key order, read sequentially (for merges and `verify`).
    pub fn entries(&self) -> Result<Entries> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(Entries {
            path: self.path.clone(),
            reader: BufReader::with_capacity(64 << 10, file),
            block: vec![0u8; BLOCK],
            left: self.count,
            in_block: ENTRIES_PER_BLOCK,
            pos: 0,
            last: None,
        })
    }
}

fn check_block(buf: &[u8], path: &Path, pos: u64) -> Result<()> {
    let stored = u32::from_le_bytes([
        buf[BLOCK_CRC_AT],
        buf[BLOCK_CRC_AT + 1],
        buf[BLOCK_CRC_AT + 2],
        buf[BLOCK_CRC_AT + 3],
    ]);
    if crc32fast::hash(&buf[..BLOCK_CRC_AT]) != stored {
        return Err(Error::corrupt(path, pos, "id index block CRC mismatch"));
    }
    Ok(())
}

/// Sequential reader of a run's entries.
#[derive(Debug)]
pub struct Entries {
    path: PathBuf,
    reader: BufReader<File>,
    block: Vec<u8>,
    left: u64,
    in_block: usize,
    pos: u64,
    /// The key before, which the next must exceed.
    last: Option<Key>,
}

impl Iterator for Entries {
    type Item = Result<(Key, Entry)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        if self.in_block == ENTRIES_PER_BLOCK {
            if let Err(e) = self.reader.read_exact(&mut self.block) {
                self.left = 0;
                return Some(Err(Error::io(&self.path, e)));
            }
            if let Err(e) = check_block(&self.block, &self.path, self.pos) {
                self.left = 0;
                return Some(Err(e));
            }
            self.pos += BLOCK as u64;
            self.in_block = 0;
        }
        let i = self.in_block;
        self.in_block += 1;
        self.left -= 1;
        let (key, entry) = decode_entry(&self.block[i * ENTRY..(i + 1) * ENTRY]);
        // Merges and lookups rely on the order: a run that breaks it (written wrong, or a file
        // forged under valid CRCs, as the `id_run` fuzz target makes them) is refused here.
        if self.last.is_some_and(|last| last >= key) {
            self.left = 0;
            let at = self.pos - BLOCK as u64 + (i * ENTRY) as u64;
            return Some(Err(Error::corrupt(
                &self.path,
                at,
                "id index entries out of key order",
            )));
        }
        self.last = Some(key);
        Some(Ok((key, entry)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{entry, key, run_of};
    use super::*;

    /// A run whose entries break key order under valid CRCs (found by the `id_run` fuzz target,
    /// which forges CRCs) is refused by the reader, not handed on to a merge.
    #[test]
    fn entries_out_of_key_order_are_refused_even_under_a_valid_crc() {
        let dir = tempfile::tempdir().unwrap();
        let written = run_of(dir.path(), 0, (0..10).map(|i| (i, 7)));
        let path = written.path().to_path_buf();
        drop(written);
        let mut bytes = std::fs::read(&path).unwrap();
        let (a, b) = (2 * ENTRY, 5 * ENTRY);
        let first: Vec<u8> = bytes[a..a + ENTRY].to_vec();
        bytes.copy_within(b..b + ENTRY, a);
        bytes[b..b + ENTRY].copy_from_slice(&first);
        let crc = crc32fast::hash(&bytes[..BLOCK_CRC_AT]);
        bytes[BLOCK_CRC_AT..BLOCK_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let run = Run::open(&path, 3).unwrap();
        let read: Vec<_> = run.entries().unwrap().collect();
        // 0, 1, then 5 where 2 was; 3 after 5 is refused.
        assert_eq!(read.iter().filter(|e| e.is_ok()).count(), 3);
        assert!(read.last().unwrap().is_err(), "{:?}", read.last());
    }

    #[test]
    fn a_run_finds_every_key_it_holds_and_no_other_whatever_its_size() {
        let dir = tempfile::tempdir().unwrap();
        // Around the block size (102 entries) and the bloom filter's block count.
        for (seq, n) in [0u64, 1, 101, 102, 103, 204, 5000].into_iter().enumerate() {
            let written = run_of(dir.path(), seq as u64, (0..n).map(|i| (i, 7)));
            let path = written.path().to_path_buf();
            let reopened = Run::open(&path, 3).unwrap();
            for run in [&written, &reopened] {
                assert_eq!(run.count(), n);
                for i in 0..n {
                    assert_eq!(run.get(&key(i)).unwrap(), Some(entry(i, 7)), "n={n} i={i}");
                }
                for i in n..n + 2000 {
                    assert_eq!(run.get(&key(i)).unwrap(), None, "n={n} absent {i}");
                }
                let all: Vec<_> = run.entries().unwrap().map(|e| e.unwrap().1).collect();
                assert_eq!(all.len() as u64, n);
            }
            assert_eq!(reopened.resident_bytes(), written.resident_bytes());
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                reopened.file_bytes()
            );
        }
    }

    #[test]
    fn the_bloom_filter_lets_about_one_absent_id_in_a_hundred_through() {
        let dir = tempfile::tempdir().unwrap();
        let run = run_of(dir.path(), 0, (0..100_000).map(|i| (i, 1)));
        let through = (100_000..300_000)
            .filter(|&i| run.may_hold(&Probe::new(&key(i))))
            .count();
        let rate = through as f64 / 200_000.0;
        eprintln!("false positive rate {rate}");
        assert!(rate < 0.015, "false positive rate {rate}");
        // 1.5 bytes of filter (rounded up to whole 64-byte blocks) and 16 per 102 ids.
        assert_eq!(run.resident_bytes(), 2344 * 64 + 981 * 16 + 3 * 8);
    }

    #[test]
    fn every_truncation_and_every_flipped_summary_byte_of_a_run_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let run = run_of(dir.path(), 0, (0..150).map(|i| (i, 1)));
        let bytes = std::fs::read(run.path()).unwrap();
        let probe = dir.path().join("probe.run");
        for len in 0..bytes.len() {
            std::fs::write(&probe, &bytes[..len]).unwrap();
            let err = Run::open(&probe, 3).unwrap_err();
            assert!(err.to_string().contains("probe.run"), "{err}");
        }
        // Everything after the two entry blocks is summary: bloom, fences, watermarks, footer.
        for at in 2 * BLOCK..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            std::fs::write(&probe, &bad).unwrap();
            assert!(
                Run::open(&probe, 3).is_err(),
                "flipped byte {at} not noticed"
            );
        }
        // A damaged entry block is found when it is read, with its position.
        let mut bad = bytes.clone();
        bad[BLOCK + 5] ^= 1;
        std::fs::write(&probe, &bad).unwrap();
        let damaged = Run::open(&probe, 3).unwrap();
        let errors = (0..150)
            .filter_map(|i| damaged.get(&key(i)).err())
            .map(|e| e.to_string())
            .collect::<Vec<_>>();
        assert!(!errors.is_empty());
        assert!(
            errors.iter().all(|e| e.contains("at byte 4096")),
            "{errors:?}"
        );
        assert!(damaged.entries().unwrap().any(|e| e.is_err()));
    }
}
