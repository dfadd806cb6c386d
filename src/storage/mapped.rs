//! A file of fixed-size entries behind a 16-byte header, mapped with memmap2: the one index type
//! ([`MappedIndex`]) behind both the offset index ([`super::index`]) and the time index
//! ([`super::timeindex`]), which only say how their entries are encoded and ordered.
//!
//! # Layout
//!
//! | offset | size | field        | notes                                   |
//! |-------:|-----:|--------------|-----------------------------------------|
//! |      0 |    4 | `magic`      | `SLIX` (offset index), `SLTI` (time)    |
//! |      4 |    2 | `version`    | 2 (version 1 files are rebuilt)         |
//! |      6 |    2 | `entry_size` | bytes per entry                         |
//! |      8 |    8 | `base_offset`| the segment's base offset               |
//! |     16 |    4 | `sealed`     | entries sealed + 1; 0 = not sealed      |
//! |     20 |    4 | `seal_crc`   | CRC-32 of bytes 0..20 and the entries   |
//! |     24 |    … | entries      | `entry_size` bytes each                 |
//!
//! The active segment's file is preallocated to its capacity (zeros past the last entry) and
//! trimmed to its entries on roll and clean close. Trimming seals it: the entry count and a CRC
//! of the header and every entry, checked at open, so that a damaged entry is found (and the
//! index rebuilt) instead of trusted. The seal is cleared on disk before the file grows or is
//! cut again. The file is derived data: it is never synced per write and is rebuilt from the log
//! whenever it does not check out (a version 1 file, which has no seal, included).
//!
//! # Concurrency
//! One writer appends while any number of readers search. Entries are written through the raw
//! mapping into slots at or past `len`, then `len` is published with `Release`; readers load `len`
//! with `Acquire` and only touch slots below it, so no slot is read while it is written. Writers
//! serialise on a mutex (uncontended: one partition writer).

use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use super::io::{FileIo, PRIVATE_FILE};

pub const HEADER_LEN: usize = 24;
pub const VERSION: u16 = 2;
/// Where the seal (entry count + 1, CRC) sits in the header.
const SEAL_AT: usize = 16;

/// The seal's CRC: of the header up to the CRC (`head`: magic, version, entry size, base offset,
/// sealed count) and of the entries. Written by [`MappedEntries::trim`], checked at open and by
/// `sluice verify`.
pub fn seal_crc(head: &[u8], entries: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(head);
    crc.update(entries);
    crc.finalize()
}

/// Why an existing entries file cannot be used as it is.
#[derive(Debug)]
pub enum OpenProblem {
    Io(io::Error),
    /// The file is there but does not check out; rebuild it.
    Invalid(&'static str),
}

impl From<io::Error> for OpenProblem {
    fn from(e: io::Error) -> Self {
        OpenProblem::Io(e)
    }
}

/// An entries file, mapped. It holds no file descriptor: the few calls that change the file's
/// length or sync it open it by path, through the [`FileIo`] seam.
#[derive(Debug)]
pub struct MappedEntries<const N: usize> {
    path: PathBuf,
    map: MmapRaw,
    /// Entries that fit in the mapping (which may reach past the file's end until [`grow`]).
    ///
    /// [`grow`]: MappedEntries::grow
    capacity: AtomicUsize,
    /// Entries the file itself has room for; no entry is written past them.
    file_entries: AtomicUsize,
    /// Entries published to readers.
    len: AtomicUsize,
    /// The file on disk carries a seal (cleared before the entries change).
    sealed: AtomicBool,
    write: Mutex<()>,
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

impl<const N: usize> MappedEntries<N> {
    /// Creates (or overwrites) the file with room for `capacity` entries.
    pub fn create(
        path: &Path,
        magic: [u8; 4],
        base_offset: u64,
        capacity: usize,
        io: &dyn FileIo,
    ) -> io::Result<Self> {
        let file = io.create_file(
            path,
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(PRIVATE_FILE),
        )?;
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&magic);
        header[4..6].copy_from_slice(&VERSION.to_le_bytes());
        header[6..8].copy_from_slice(&(N as u16).to_le_bytes());
        header[8..16].copy_from_slice(&base_offset.to_le_bytes());
        io.write_at(path, &file, &header, 0)?;
        io.set_len(path, &file, (HEADER_LEN + capacity * N) as u64)?;
        Self::map(path, &file, (capacity, capacity, 0), false)
    }

    /// Opens an existing file. Every whole entry in it counts (as in a trimmed file), up to
    /// `max_entries` when given (a preallocated file holds zeros past its entries). The mapping
    /// has room for `map_capacity` entries when that is more than the file holds (an active
    /// segment's index, grown on its first write): nothing changes on disk until then.
    pub fn open(
        path: &Path,
        magic: [u8; 4],
        base_offset: u64,
        max_entries: Option<usize>,
        map_capacity: usize,
    ) -> Result<Self, OpenProblem> {
        let file = open_rw(path)?;
        let len = file.metadata()?.len() as usize;
        if len < HEADER_LEN {
            return Err(OpenProblem::Invalid("shorter than its header"));
        }
        let mut header = [0u8; HEADER_LEN];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0)?;
        if header[0..4] != magic {
            return Err(OpenProblem::Invalid("bad magic"));
        }
        if header[4..6] != VERSION.to_le_bytes() || header[6..8] != (N as u16).to_le_bytes() {
            return Err(OpenProblem::Invalid("unknown version or entry size"));
        }
        if header[8..16] != base_offset.to_le_bytes() {
            return Err(OpenProblem::Invalid(
                "base offset does not match the file name",
            ));
        }
        if !(len - HEADER_LEN).is_multiple_of(N) {
            return Err(OpenProblem::Invalid(
                "length is not a whole number of entries",
            ));
        }
        let in_file = (len - HEADER_LEN) / N;
        let seal = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
        let sealed = seal != 0;
        if sealed {
            if seal as usize - 1 != in_file {
                return Err(OpenProblem::Invalid(
                    "sealed with another number of entries",
                ));
            }
            let mut entries = vec![0u8; len - HEADER_LEN];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut entries, HEADER_LEN as u64)?;
            if seal_crc(&header[..SEAL_AT + 4], &entries).to_le_bytes()
                != header[SEAL_AT + 4..HEADER_LEN]
            {
                return Err(OpenProblem::Invalid("the entries do not match their seal"));
            }
        }
        let entries = max_entries.map_or(in_file, |m| m.min(in_file));
        Self::map(
            path,
            &file,
            (in_file.max(map_capacity), in_file, entries),
            sealed,
        )
        .map_err(OpenProblem::Io)
    }

    /// Whether the file on disk is sealed (its entries checked against their CRC at open, or
    /// sealed by a trim since).
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Clears the seal on disk before the entries change (the caller holds the writer's lock or
    /// `&mut self`).
    fn unseal(&self, file: &File, io: &dyn FileIo) -> io::Result<()> {
        if self.sealed.load(Ordering::Acquire) {
            io.write_at(&self.path, file, &[0u8; 8], SEAL_AT as u64)?;
            self.sealed.store(false, Ordering::Release);
        }
        Ok(())
    }

    fn map(
        path: &Path,
        file: &File,
        (capacity, file_entries, len): (usize, usize, usize),
        sealed: bool,
    ) -> io::Result<Self> {
        let map = MmapOptions::new()
            .len(HEADER_LEN + capacity * N)
            .map_raw(file)?;
        Ok(MappedEntries {
            path: path.to_path_buf(),
            map,
            capacity: AtomicUsize::new(capacity),
            file_entries: AtomicUsize::new(file_entries),
            len: AtomicUsize::new(len),
            sealed: AtomicBool::new(sealed),
            write: Mutex::new(()),
        })
    }

    /// Drops entries past `len` and gives the file room for `capacity` entries. Only before the
    /// file is shared with readers (it remaps).
    pub fn reset(&mut self, len: usize, capacity: usize, io: &dyn FileIo) -> io::Result<()> {
        let capacity = capacity.max(len);
        let bytes = HEADER_LEN + capacity * N;
        let file = open_rw(&self.path)?;
        self.unseal(&file, io)?;
        io.set_len(&self.path, &file, bytes as u64)?;
        self.map = MmapOptions::new().len(bytes).map_raw(&file)?;
        *self.capacity.get_mut() = capacity;
        *self.file_entries.get_mut() = capacity;
        *self.len.get_mut() = len.min(capacity);
        Ok(())
    }

    /// Gives the file room for every entry the mapping has room for (before the first push).
    pub fn grow(&self, io: &dyn FileIo) -> io::Result<()> {
        let _writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let capacity = self.capacity.load(Ordering::Relaxed);
        if self.file_entries.load(Ordering::Relaxed) >= capacity {
            return Ok(());
        }
        let file = open_rw(&self.path)?;
        self.unseal(&file, io)?;
        io.set_len(&self.path, &file, (HEADER_LEN + capacity * N) as u64)?;
        self.file_entries.store(capacity, Ordering::Relaxed);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity.load(Ordering::Acquire)
    }

    /// Entry `i`; `i` must be below a `len()` the caller loaded.
    pub fn get(&self, i: usize) -> [u8; N] {
        assert!(
            i < self.len(),
            "index entry {i} read past the published length"
        );
        let mut out = [0u8; N];
        // SAFETY: `i < len <= capacity`, so the slot lies inside the mapping, which is at least
        // `HEADER_LEN + capacity * N` bytes and inside the file (entries are only written below `file_entries`, and trim never
        // cuts below `len`).
        // The slot was written before `len` was published (Release/Acquire) and is never
        // written again while shared, so this read races with no write.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(HEADER_LEN + i * N),
                out.as_mut_ptr(),
                N,
            );
        }
        out
    }

    /// How many leading entries satisfy `before` (which must hold for a prefix of the entries):
    /// a binary search over the published entries.
    pub fn partition_point(&self, before: impl Fn(&[u8; N]) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if before(&self.get(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Appends an entry; false when the file is full (the caller rolls the segment).
    pub fn push(&self, entry: [u8; N]) -> bool {
        let _writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let len = self.len.load(Ordering::Relaxed);
        if len >= self.capacity.load(Ordering::Relaxed)
            || len >= self.file_entries.load(Ordering::Relaxed)
        {
            return false;
        }
        // SAFETY: `len < capacity` and `len < file_entries`, so the slot is inside the mapping
        // and the file. Readers never touch slots at or past the published `len`, and the mutex
        // excludes other writers.
        unsafe {
            std::ptr::copy_nonoverlapping(
                entry.as_ptr(),
                self.map.as_mut_ptr().add(HEADER_LEN + len * N),
                N,
            );
        }
        self.len.store(len + 1, Ordering::Release);
        true
    }

    /// Cuts the file to its entries and seals them; no entry can be appended afterwards. The
    /// mapping stays (the pages past the new end are never touched again).
    pub fn trim(&self, io: &dyn FileIo) -> io::Result<()> {
        let _writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let len = self.len.load(Ordering::Relaxed);
        self.capacity.store(len, Ordering::Release);
        self.file_entries.store(len, Ordering::Relaxed);
        if self.sealed.load(Ordering::Acquire) {
            // Sealed and not grown since: already trimmed to these entries.
            return Ok(());
        }
        let file = open_rw(&self.path)?;
        io.set_len(&self.path, &file, (HEADER_LEN + len * N) as u64)?;
        let count = u32::try_from(len + 1)
            .map_err(|_| io::Error::other("too many index entries to seal"))?;
        // SAFETY: the mapping covers the header and every entry below `len`; the writer's lock
        // is held, so no entry is being written, and readers only read.
        let (fixed, entries) = unsafe {
            (
                std::slice::from_raw_parts(self.map.as_ptr(), SEAL_AT),
                std::slice::from_raw_parts(self.map.as_ptr().add(HEADER_LEN), len * N),
            )
        };
        let mut head = [0u8; SEAL_AT + 4];
        head[..SEAL_AT].copy_from_slice(fixed);
        head[SEAL_AT..].copy_from_slice(&count.to_le_bytes());
        let mut seal = [0u8; 8];
        seal[..4].copy_from_slice(&count.to_le_bytes());
        seal[4..].copy_from_slice(&seal_crc(&head, entries).to_le_bytes());
        io.write_at(&self.path, &file, &seal, SEAL_AT as u64)?;
        self.sealed.store(true, Ordering::Release);
        Ok(())
    }

    /// The CRC-32 of the first `count` entries (`count` at most [`len`](Self::len)): what a
    /// recovery checkpoint records of the entries it covers, so that recovery after a crash
    /// checks them (an active segment's index carries no seal).
    pub fn entries_crc(&self, count: usize) -> u32 {
        let count = count.min(self.len());
        // SAFETY: the mapping covers every entry below the published `len`, which is at least
        // `count`; those slots are never written again while shared.
        let entries =
            unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(HEADER_LEN), count * N) };
        crc32fast::hash(entries)
    }

    /// Writes the mapped entries back to the file and syncs it (checkpoints, rolls and close).
    pub fn sync(&self, io: &dyn FileIo) -> io::Result<()> {
        let len = self.len();
        self.map.flush_range(0, HEADER_LEN + len * N)?;
        let file = open_rw(&self.path)?;
        io.sync_data(&self.path, &file)
    }
}

/// An index entry of `N` bytes: how it is encoded, and the order entries must keep.
pub trait Entry<const N: usize>: Copy {
    /// The file's magic.
    const MAGIC: [u8; 4];
    /// Why an opened file is refused when two entries are out of order.
    const DISORDER: &'static str;
    fn decode(b: &[u8; N]) -> Self;
    fn encode(&self) -> [u8; N];
    /// True when `self` may follow `prev`.
    fn follows(&self, prev: &Self) -> bool;
}

/// A mapped index of typed entries: the offset index and the time index are both this.
#[derive(Debug)]
pub struct MappedIndex<E, const N: usize> {
    entries: MappedEntries<N>,
    entry: PhantomData<fn() -> E>,
}

impl<E: Entry<N>, const N: usize> MappedIndex<E, N> {
    /// Creates (or overwrites) the file with room for `capacity` entries.
    pub fn create(
        path: &Path,
        base_offset: u64,
        capacity: usize,
        io: &dyn FileIo,
    ) -> io::Result<Self> {
        MappedEntries::create(path, E::MAGIC, base_offset, capacity, io).map(Self::wrap)
    }

    /// Opens an existing index and checks that its entries keep their order.
    /// `max_entries` and `map_capacity`: see [`MappedEntries::open`].
    pub fn open(
        path: &Path,
        base_offset: u64,
        max_entries: Option<usize>,
        map_capacity: usize,
    ) -> Result<Self, OpenProblem> {
        let index = Self::wrap(MappedEntries::open(
            path,
            E::MAGIC,
            base_offset,
            max_entries,
            map_capacity,
        )?);
        for i in 1..index.len() {
            if !index.entry(i).follows(&index.entry(i - 1)) {
                return Err(OpenProblem::Invalid(E::DISORDER));
            }
        }
        Ok(index)
    }

    fn wrap(entries: MappedEntries<N>) -> Self {
        MappedIndex {
            entries,
            entry: PhantomData,
        }
    }

    pub fn path(&self) -> &Path {
        self.entries.path()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.entries.is_full()
    }

    /// Entry `i`; `i` must be below a `len()` the caller loaded.
    pub fn entry(&self, i: usize) -> E {
        E::decode(&self.entries.get(i))
    }

    pub fn last(&self) -> Option<E> {
        self.len().checked_sub(1).map(|i| self.entry(i))
    }

    /// How many leading entries satisfy `before` (which must hold for a prefix).
    pub fn partition_point(&self, before: impl Fn(&E) -> bool) -> usize {
        self.entries.partition_point(|b| before(&E::decode(b)))
    }

    /// Appends an entry; false when the file is full (the caller rolls the segment).
    pub fn push(&self, e: E) -> bool {
        self.entries.push(e.encode())
    }

    pub fn reset(&mut self, len: usize, capacity: usize, io: &dyn FileIo) -> io::Result<()> {
        self.entries.reset(len, capacity, io)
    }

    pub fn grow(&self, io: &dyn FileIo) -> io::Result<()> {
        self.entries.grow(io)
    }

    /// See [`MappedEntries::is_sealed`].
    pub fn is_sealed(&self) -> bool {
        self.entries.is_sealed()
    }

    pub fn trim(&self, io: &dyn FileIo) -> io::Result<()> {
        self.entries.trim(io)
    }

    pub fn sync(&self, io: &dyn FileIo) -> io::Result<()> {
        self.entries.sync(io)
    }

    /// See [`MappedEntries::entries_crc`].
    pub fn entries_crc(&self, count: usize) -> u32 {
        self.entries.entries_crc(count)
    }
}
