//! Hashes of executables, cached by the identity of the file's content.
//!
//! Hashing a 50 MB interpreter on every connection would cost more than the request, so a hash
//! is remembered under (device, inode, size, mtime, ctime) of the open file. Any write to the file
//! moves its ctime (which, unlike mtime, a user cannot set back), and a new file at a reused inode
//! number gets a new ctime, so a stale entry can never be hit. One race remains: file
//! timestamps come from a coarse clock, so a write in the same clock tick as the previous one can
//! leave ctime unchanged. A hash is therefore cached only when the file's ctime is older than
//! [`SETTLE`] at the time hashing started: any later write then gets a strictly newer ctime.

use hashbrown::HashMap;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How old a file's ctime must be for its hash to be cached: many times the coarse clock's tick.
pub(crate) const SETTLE: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ContentKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ContentKey {
    pub fn of(meta: &Metadata) -> ContentKey {
        ContentKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Same file (not necessarily same content): for "did the process exec something else".
    pub fn same_inode(&self, other: &ContentKey) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }

    /// ctime is older than `now - SETTLE` (false for a ctime before the epoch or in the future).
    fn settled(&self, now: SystemTime) -> bool {
        let (Ok(secs), Ok(nanos)) = (u64::try_from(self.ctime.0), u32::try_from(self.ctime.1))
        else {
            return false;
        };
        let ctime = UNIX_EPOCH + Duration::new(secs, nanos);
        now.duration_since(ctime).is_ok_and(|age| age > SETTLE)
    }
}

/// Outcome of hashing one executable.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hashed {
    Hash(String),
    /// Larger than the limit: not read at all.
    TooLarge(u64),
    /// The file changed while it was read; the hash would describe no version of it.
    Changed,
}

pub(crate) struct ExeHashCache {
    map: Mutex<HashMap<ContentKey, String>>,
    capacity: usize,
    max_bytes: u64,
    computed: AtomicU64,
}

impl ExeHashCache {
    pub fn new(capacity: usize, max_bytes: u64) -> Self {
        ExeHashCache {
            map: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            max_bytes,
            computed: AtomicU64::new(0),
        }
    }

    /// How many times a file was actually read and hashed (cache misses).
    pub fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// The SHA-256 of `file`, whose metadata (fstat) is `meta`. The lock is not held while
    /// hashing, so one slow file never blocks other connections; two connections of a new
    /// executable may both hash it, which is harmless.
    pub fn hash(&self, file: &File, meta: &Metadata) -> io::Result<Hashed> {
        let key = ContentKey::of(meta);
        if let Some(hit) = self.map.lock().get(&key) {
            return Ok(Hashed::Hash(hit.clone()));
        }
        if meta.size() > self.max_bytes {
            return Ok(Hashed::TooLarge(meta.size()));
        }
        let started = SystemTime::now();
        self.computed.fetch_add(1, Ordering::Relaxed);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        let mut reader = file;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += n as u64;
            if total > self.max_bytes {
                return Ok(Hashed::Changed);
            }
            hasher.update(&buf[..n]);
        }
        if ContentKey::of(&file.metadata()?) != key || total != meta.size() {
            return Ok(Hashed::Changed);
        }
        let hex = hex::encode(hasher.finalize());
        if !key.settled(started) {
            return Ok(Hashed::Hash(hex));
        }
        let mut map = self.map.lock();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            // Arbitrary eviction: executables in use are few and re-hashing one is cheap enough.
            if let Some(victim) = map.keys().next().copied() {
                map.remove(&victim);
            }
        }
        map.insert(key, hex.clone());
        Ok(Hashed::Hash(hex))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sha256_hex(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    /// Makes the file's ctime older than SETTLE, so its hash may be cached.
    fn settle() {
        std::thread::sleep(SETTLE + Duration::from_millis(50));
    }

    fn hash_path(cache: &ExeHashCache, path: &std::path::Path) -> Hashed {
        let file = File::open(path).unwrap();
        let meta = file.metadata().unwrap();
        cache.hash(&file, &meta).unwrap()
    }

    #[test]
    fn second_hash_of_an_unchanged_file_is_a_cache_hit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, b"#!/bin/true\n").unwrap();
        settle();
        let cache = ExeHashCache::new(16, 1 << 20);
        let want = Hashed::Hash(sha256_hex(b"#!/bin/true\n"));
        assert_eq!(hash_path(&cache, &path), want);
        assert_eq!(hash_path(&cache, &path), want);
        assert_eq!(cache.computed(), 1);
    }

    #[test]
    fn rewriting_a_file_in_place_invalidates_its_cached_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, b"version one").unwrap();
        settle();
        let cache = ExeHashCache::new(16, 1 << 20);
        hash_path(&cache, &path);
        assert_eq!(cache.len(), 1);
        // Same size, same inode; only the content and ctime differ.
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(b"version two").unwrap();
        drop(f);
        assert_eq!(
            hash_path(&cache, &path),
            Hashed::Hash(sha256_hex(b"version two"))
        );
        assert_eq!(cache.computed(), 2);
    }

    #[test]
    fn a_file_changed_just_now_is_hashed_but_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, b"fresh").unwrap();
        let cache = ExeHashCache::new(16, 1 << 20);
        let want = Hashed::Hash(sha256_hex(b"fresh"));
        assert_eq!(hash_path(&cache, &path), want);
        assert_eq!(hash_path(&cache, &path), want);
        assert_eq!(cache.computed(), 2);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn files_above_the_limit_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let f = File::create(&path).unwrap();
        f.set_len((1 << 30) + 1).unwrap(); // sparse: costs no disk
        drop(f);
        let cache = ExeHashCache::new(16, 1 << 30);
        assert_eq!(hash_path(&cache, &path), Hashed::TooLarge((1 << 30) + 1));
        assert_eq!(cache.computed(), 0);
    }

    #[test]
    fn the_cache_never_grows_past_its_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ExeHashCache::new(3, 1 << 20);
        for i in 0..10 {
            std::fs::write(dir.path().join(format!("bin{i}")), format!("content {i}")).unwrap();
        }
        settle();
        for i in 0..10 {
            let path = dir.path().join(format!("bin{i}"));
            assert_eq!(
                hash_path(&cache, &path),
                Hashed::Hash(sha256_hex(format!("content {i}").as_bytes()))
            );
            assert!(cache.len() <= 3);
        }
        assert_eq!(cache.len(), 3);
    }
}
