//! An id's index key and what the index stores for it: the key is the first 16 bytes of the
//! id's SHA-256 (already uniform, so its first word is its hash), the entry says where and when
//! the topic stored the id.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// An id may be at most this long.
pub const MAX_ID_BYTES: usize = 128;
/// The index key of an id: the first 16 bytes of its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key(pub [u8; 16]);

impl Key {
    pub fn of(id: &[u8]) -> Key {
        let digest = ring::digest::digest(&ring::digest::SHA256, id);
        let mut k = [0u8; 16];
        k.copy_from_slice(&digest.as_ref()[..16]);
        Key(k)
    }

    pub(super) fn word(&self, i: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.0[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already uniformly distributed: one word is the hash.
        state.write_u64(self.word(0));
    }
}

/// Passes a [`Key`]'s word through (keys are SHA-256 output).
#[derive(Debug, Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;

/// Where and when a topic stored an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub partition: u32,
    pub offset: u64,
    /// The record's timestamp (the broker's clock at the Send), ms since the Unix epoch.
    pub stored_ms: i64,
}

impl Entry {
    /// Whether the id is still inside its window at `now_ms`.
    pub fn live(&self, now_ms: i64, window_ms: u64) -> bool {
        self.stored_ms
            .saturating_add(window_ms.min(i64::MAX as u64) as i64)
            > now_ms
    }
}
