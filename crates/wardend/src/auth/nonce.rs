//! Replay protection: every nonce is remembered for as long as its request's timestamp could
//! still pass the freshness check, and refused if it is seen again in that time.
//!
//! A request is accepted only when `|now - timestamp| <= max_age`, so a nonce must be remembered
//! until `timestamp + max_age` (+1 s of slack for callers whose clocks read a second apart); after
//! that the timestamp check refuses the replay on its own and the nonce can be forgotten.
//!
//! # Why it is built this way
//!
//! The cost of one request must not depend on how many nonces are stored: the Lumo daemon prunes
//! its whole map on every request and falls from about 9 000 to 1 400 requests/s as it fills.
//! Here each of 64 shards holds
//! - a hash set of keyed hashes of the nonces it remembers, and
//! - a timing wheel: one list per second, in a ring that covers every expiry a valid request can
//!   have, naming the entries that expire in that second.
//!
//! An insert first advances its shard's wheel to `now`, removing exactly the entries whose second
//! has passed. Every entry is inserted once and removed once, so the work is amortized O(1) per
//! request whatever the size of the store; the largest single step is removing what expired in
//! one shard since its previous request (at 100 000 requests/s, about 1 600 entries once a
//! second). Shards are chosen by hash, so connections rarely wait on each other.
//!
//! # What is stored
//!
//! Not the nonce but two 64-bit SipHash values of it under a per-process random key (the key of
//! a [`std::hash::RandomState`]), domain-separated by a one-byte prefix. SipHash is a keyed
//! pseudo-random function, so whatever nonces clients choose, distinct nonces get independent,
//! unpredictable values. Of those 128 bits, 6 choose the shard and 106 are kept in the entry
//! (the last 16 bits of the entry hold the expiry second modulo the wheel's size), so a nonce is
//! identified by 112 bits: with `n` nonces remembered, the chance that any two distinct ones
//! share them is about `n² / 2¹¹³`, for 12 million entries 1.4·10⁻²⁰ per window. A collision
//! could only make a fresh request look like a replay (one refused request), never let a replay
//! through.
//!
//! An entry costs 16 bytes in the set (plus a control byte) and 8 in the wheel (the first hash
//! only: with the expiry second kept in the entry, it finds the entry to remove, and two entries
//! that share it and the second expire together), plus the tables' spare capacity: see
//! [`NonceStore::heap_bytes`] and the `nonce_store_figures` test for measured figures.

use hashbrown::HashTable;
use parking_lot::Mutex;
use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::time::Duration;

/// The longest nonce accepted, in bytes. Lumo clients send 32 hex characters; UUIDs are 36.
pub const MAX_NONCE_LEN: usize = 128;

/// The largest `max_age` honoured (about 9 hours): the wheel's size must fit the 16 bits an
/// entry keeps for its expiry second.
pub const MAX_AGE_LIMIT: Duration = Duration::from_secs(32_766);

/// Number of independently locked shards (a power of two), chosen by the top bits of the
/// second hash.
const SHARDS: usize = 64;
const SHARD_SHIFT: u32 = 64 - SHARDS.trailing_zeros();
/// The low 16 bits of an entry's second word hold its expiry second modulo the ring size.
const SLOT_BITS: u64 = 0xffff;

/// Why a nonce was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    #[error("nonce already used: every request needs a fresh nonce")]
    Replayed,
    #[error("the nonce is empty: send a fresh random nonce with every request")]
    Empty,
    #[error("the nonce is {len} bytes long; at most {max} are accepted")]
    TooLong { len: usize, max: usize },
    /// Defence in depth: the caller is meant to have checked the timestamp already. A nonce whose
    /// timestamp lies outside the window cannot be remembered for the right time, so it is refused.
    #[error("request timestamp {timestamp} is more than {max_age} s away from the daemon's clock ({now}): check the client's clock")]
    TimestampOutOfWindow {
        timestamp: u64,
        now: u64,
        max_age: u64,
    },
}

/// One remembered nonce: `[h0, h1 with its low 16 bits replaced by expiry % ring]`.
/// `[u64; 2]` rather than `u128` keeps the alignment at 8 bytes.
type Entry = [u64; 2];

/// The set of remembered nonces, shared by every connection.
pub struct NonceStore {
    /// `max_age` in whole seconds, rounded up.
    max_age: u64,
    /// Slots in each shard's wheel: every live expiry lies in `(cursor, cursor + ring)`, so
    /// distinct live expiry seconds have distinct residues modulo `ring`.
    ring: u64,
    hasher: RandomState,
    shards: Box<[CacheAligned<Mutex<Shard>>]>,
}

/// Keeps each shard's lock on its own cache lines, so that two cores working on two shards do
/// not slow each other down.
#[repr(align(128))]
struct CacheAligned<T>(T);

struct Shard {
    /// Hashed by `entry[0]`, which is already a keyed pseudo-random value.
    set: HashTable<Entry>,
    /// `wheel[s % ring]` lists the first hash of each entry that expires at second `s`.
    wheel: Box<[Vec<u64>]>,
    /// Every second `<= cursor` has been drained from the wheel.
    cursor: u64,
}

impl NonceStore {
    /// A store for requests whose timestamps may be up to `max_age` away from the daemon's clock
    /// (at most [`MAX_AGE_LIMIT`]; a longer one is shortened to it, which refuses more).
    pub fn new(max_age: Duration) -> Self {
        let max_age = max_age.min(MAX_AGE_LIMIT);
        let max_age = max_age.as_secs() + u64::from(max_age.subsec_nanos() > 0);
        // Expiries lie in (now, now + 2·max_age + 1]: a timestamp up to max_age in the future,
        // plus max_age, plus one second of slack.
        let ring = 2 * max_age + 2;
        let slots = usize::try_from(ring).expect("max_age fits a wheel in memory");
        let shards = (0..SHARDS)
            .map(|_| {
                CacheAligned(Mutex::new(Shard {
                    set: HashTable::new(),
                    wheel: (0..slots).map(|_| Vec::new()).collect(),
                    cursor: 0,
                }))
            })
            .collect();
        NonceStore {
            max_age,
            ring,
            hasher: RandomState::new(),
            shards,
        }
    }

    /// Atomically: refuses `nonce` if it is remembered, otherwise remembers it until
    /// `timestamp + max_age + 1 s`. Call it only after the request's signature verified, so that
    /// forged requests cannot fill the store. `timestamp` and `now` are Unix seconds.
    pub fn check_and_insert(
        &self,
        nonce: &str,
        timestamp: u64,
        now: u64,
    ) -> Result<(), NonceError> {
        self.insert_counting(nonce, timestamp, now).map(|_work| ())
    }

    /// [`Self::check_and_insert`], returning how much expiry work it did (slots visited plus
    /// entries removed), so that tests can prove the work is bounded without timing anything.
    fn insert_counting(&self, nonce: &str, timestamp: u64, now: u64) -> Result<u64, NonceError> {
        if nonce.is_empty() {
            return Err(NonceError::Empty);
        }
        if nonce.len() > MAX_NONCE_LEN {
            return Err(NonceError::TooLong {
                len: nonce.len(),
                max: MAX_NONCE_LEN,
            });
        }
        if timestamp.abs_diff(now) > self.max_age {
            return Err(NonceError::TimestampOutOfWindow {
                timestamp,
                now,
                max_age: self.max_age,
            });
        }
        let [h0, h1] = self.hashes(nonce);
        let shard = &self.shards[(h1 >> SHARD_SHIFT) as usize].0;
        let mut shard = shard.lock();
        let work = shard.advance(now, self.ring);
        // A caller whose `now` is a little behind the shard's cursor must still file the entry in
        // a slot that has not been drained yet; remembering it a little longer is harmless.
        let expires = timestamp
            .saturating_add(self.max_age + 1)
            .max(shard.cursor + 1);
        shard.insert(h0, h1, expires, self.ring)?;
        Ok(work)
    }

    /// Number of nonces remembered (including any whose second has passed but whose shard has
    /// not seen a request since).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().set.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap memory held by the store, computed from the tables' capacities (for metrics and for
    /// the memory figures; it does not count the allocator's own overhead).
    pub fn heap_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.0.lock();
                let set = if s.set.capacity() == 0 {
                    0
                } else {
                    // hashbrown keeps capacity ≤ 7/8 of a power-of-two bucket count, with one
                    // control byte per bucket plus a group's worth of trailing control bytes.
                    let buckets = (s.set.capacity() * 8 / 7).next_power_of_two();
                    buckets * (std::mem::size_of::<Entry>() + 1) + 16
                };
                let wheel: usize = s
                    .wheel
                    .iter()
                    .map(|v| v.capacity() * std::mem::size_of::<u64>())
                    .sum();
                set + wheel + std::mem::size_of_val(&*s.wheel)
            })
            .sum()
    }

    fn hashes(&self, nonce: &str) -> [u64; 2] {
        [0u8, 1].map(|domain| {
            let mut h = self.hasher.build_hasher();
            h.write_u8(domain);
            h.write(nonce.as_bytes());
            h.finish()
        })
    }
}

impl Shard {
    /// Forgets every entry whose expiry second is `<= now`. Returns the work done.
    fn advance(&mut self, now: u64, ring: u64) -> u64 {
        if now <= self.cursor {
            return 0;
        }
        if self.set.is_empty() {
            // Nothing stored (the first request, for one): the wheel is empty too, since every
            // key is in both or in neither, so there is nothing to walk.
            self.cursor = now;
            return 0;
        }
        if now - self.cursor >= ring {
            // Idle for longer than any window: everything has expired.
            let work = self.set.len() as u64 + ring;
            self.set.clear();
            self.wheel.iter_mut().for_each(Vec::clear);
            self.cursor = now;
            self.shrink_if_sparse();
            return work;
        }
        let mut work = 0;
        while self.cursor < now {
            self.cursor += 1;
            let residue = self.cursor % ring;
            let slot = &mut self.wheel[residue as usize];
            work += 1 + slot.len() as u64;
            for h0 in slot.drain(..) {
                // Any entry with this first hash and this expiry residue expires now.
                let due = |e: &Entry| e[0] == h0 && e[1] & SLOT_BITS == residue;
                if let Ok(entry) = self.set.find_entry(h0, due) {
                    entry.remove();
                }
            }
        }
        self.shrink_if_sparse();
        work
    }

    fn insert(&mut self, h0: u64, h1: u64, expires: u64, ring: u64) -> Result<(), NonceError> {
        let same_nonce = |e: &Entry| e[0] == h0 && e[1] & !SLOT_BITS == h1 & !SLOT_BITS;
        match self.set.entry(h0, same_nonce, |e| e[0]) {
            hashbrown::hash_table::Entry::Occupied(_) => Err(NonceError::Replayed),
            hashbrown::hash_table::Entry::Vacant(slot) => {
                let residue = expires % ring;
                slot.insert([h0, (h1 & !SLOT_BITS) | residue]);
                self.wheel[residue as usize].push(h0);
                Ok(())
            }
        }
    }

    /// Returns memory after a burst: a table holding less than an eighth of its capacity is
    /// rebuilt at twice its size. Rare, so amortized over the removals that emptied it.
    fn shrink_if_sparse(&mut self) {
        if self.set.capacity() > 4096 && self.set.len() < self.set.capacity() / 8 {
            self.set.shrink_to(self.set.len() * 2, |e| e[0]);
        }
    }
}

impl fmt::Debug for NonceStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceStore")
            .field("max_age_secs", &self.max_age)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    const NOW: u64 = 1_700_000_000;

    fn store() -> NonceStore {
        NonceStore::new(Duration::from_secs(60))
    }

    #[test]
    fn replay_within_the_window_is_refused() {
        let s = store();
        assert_eq!(s.check_and_insert("abc", NOW, NOW), Ok(()));
        assert_eq!(
            s.check_and_insert("abc", NOW, NOW),
            Err(NonceError::Replayed)
        );
        // Even with another timestamp: the nonce itself is remembered.
        assert_eq!(
            s.check_and_insert("abc", NOW + 5, NOW + 10),
            Err(NonceError::Replayed)
        );
        assert_eq!(s.check_and_insert("abd", NOW, NOW), Ok(()));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn nonce_is_accepted_again_after_timestamp_plus_max_age_plus_slack() {
        let s = store();
        s.check_and_insert("n", NOW, NOW).unwrap();
        // Remembered through NOW + 60 + 1 - 1 ...
        assert_eq!(
            s.check_and_insert("n", NOW + 60, NOW + 60),
            Err(NonceError::Replayed)
        );
        // ... and forgotten at NOW + 61, when its timestamp could no longer pass anyway.
        assert_eq!(s.check_and_insert("n", NOW + 61, NOW + 61), Ok(()));
    }

    #[test]
    fn expiry_follows_the_timestamp_not_the_arrival_time() {
        let s = store();
        // A request stamped 50 s in the past expires 11 s after arrival.
        s.check_and_insert("past", NOW - 50, NOW).unwrap();
        // One stamped 50 s in the future is remembered for 111 s.
        s.check_and_insert("future", NOW + 50, NOW).unwrap();
        assert_eq!(
            s.check_and_insert("past", NOW, NOW + 10),
            Err(NonceError::Replayed)
        );
        assert_eq!(s.check_and_insert("past", NOW + 11, NOW + 11), Ok(()));
        assert_eq!(
            s.check_and_insert("future", NOW + 100, NOW + 110),
            Err(NonceError::Replayed)
        );
        assert_eq!(s.check_and_insert("future", NOW + 111, NOW + 111), Ok(()));
    }

    #[test]
    fn expired_entries_leave_the_store() {
        let s = store();
        for i in 0..1000 {
            s.check_and_insert(&format!("n{i}"), NOW, NOW).unwrap();
        }
        assert_eq!(s.len(), 1000);
        // Every shard that is touched after the expiry drops its old entries.
        for i in 0..10_000 {
            s.check_and_insert(&format!("m{i}"), NOW + 61, NOW + 61)
                .unwrap();
        }
        assert_eq!(s.len(), 10_000);
    }

    #[test]
    fn a_long_idle_period_or_clock_jump_forgets_everything_at_once() {
        let s = store();
        s.check_and_insert("a", NOW, NOW).unwrap();
        s.check_and_insert("a", NOW + 100_000, NOW + 100_000)
            .unwrap();
        // A clock that steps back does not resurrect or lose entries.
        assert_eq!(
            s.check_and_insert("a", NOW + 99_990, NOW + 99_990),
            Err(NonceError::Replayed)
        );
    }

    #[test]
    fn empty_too_long_and_out_of_window_are_refused() {
        let s = store();
        assert_eq!(s.check_and_insert("", NOW, NOW), Err(NonceError::Empty));
        let long = "x".repeat(MAX_NONCE_LEN + 1);
        assert_eq!(
            s.check_and_insert(&long, NOW, NOW),
            Err(NonceError::TooLong { len: 129, max: 128 })
        );
        assert_eq!(
            s.check_and_insert(&"x".repeat(MAX_NONCE_LEN), NOW, NOW),
            Ok(())
        );
        assert!(matches!(
            s.check_and_insert("late", NOW - 61, NOW),
            Err(NonceError::TimestampOutOfWindow { .. })
        ));
        assert!(matches!(
            s.check_and_insert("early", NOW + 61, NOW),
            Err(NonceError::TimestampOutOfWindow { .. })
        ));
        assert_eq!(s.check_and_insert("edge", NOW - 60, NOW), Ok(()));
        assert_eq!(s.check_and_insert("edge2", NOW + 60, NOW), Ok(()));
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn a_caller_whose_clock_lags_still_files_its_nonce_in_a_live_slot() {
        let s = store();
        // Move every shard's cursor to NOW + 5.
        for i in 0..2000 {
            s.check_and_insert(&format!("warm{i}"), NOW + 5, NOW + 5)
                .unwrap();
        }
        // A request stamped NOW - 60 would expire at NOW + 1, already drained; it is kept until
        // the next second instead and is still refused as a replay before then.
        s.check_and_insert("lag", NOW - 60, NOW).unwrap();
        assert_eq!(
            s.check_and_insert("lag", NOW, NOW + 5),
            Err(NonceError::Replayed)
        );
        assert_eq!(s.check_and_insert("lag", NOW + 6, NOW + 6), Ok(()));
    }

    /// Lumo prunes its whole map on every request, so its work per request equals the store's
    /// size. Here the work of one insert is bounded by one second's worth of entries plus the
    /// seconds skipped, and on average stays near one removal per insert, at any store size.
    #[test]
    fn expiry_work_per_insert_does_not_grow_with_the_store() {
        for per_second in [100u64, 2_000] {
            let s = store();
            let mut total_work = 0u64;
            let mut max_work = 0u64;
            let mut inserts = 0u64;
            for sec in 0..300u64 {
                for i in 0..per_second {
                    let work = s
                        .insert_counting(&format!("{sec}-{i}"), NOW + sec, NOW + sec)
                        .unwrap();
                    total_work += work;
                    inserts += 1;
                    max_work = max_work.max(work);
                }
            }
            // Steady state holds 61 seconds' worth of nonces, plus, in shards that saw no
            // request in the last second, the few that expired meanwhile.
            let len = s.len() as u64;
            assert!((61 * per_second..=63 * per_second).contains(&len), "{len}");
            // One step never drains more than one second of one shard (plus the slot visited).
            assert!(
                max_work <= per_second + 1,
                "max work {max_work} at {per_second}/s"
            );
            // Each entry removed once, each second visited once per shard.
            let bound = inserts + 300 * SHARDS as u64;
            assert!(total_work <= bound, "total work {total_work} > {bound}");
            assert!(total_work >= inserts - s.len() as u64);
        }
    }

    #[test]
    fn concurrent_inserts_of_one_nonce_admit_exactly_one() {
        let s = Arc::new(store());
        let threads = 8;
        for round in 0..200 {
            let barrier = Arc::new(Barrier::new(threads));
            let nonce = format!("race-{round}");
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (s, b, n) = (Arc::clone(&s), Arc::clone(&barrier), nonce.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        s.check_and_insert(&n, NOW, NOW).is_ok()
                    })
                })
                .collect();
            let oks = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&ok| ok)
                .count();
            assert_eq!(oks, 1, "round {round}");
        }
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<NonceStore>();
    }

    fn rss_bytes() -> Option<usize> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// Inserts `per_second` distinct 32-hex-character nonces (as Lumo clients send) stamped
    /// `NOW + sec`, or only formats them when `store` is `None` (to subtract that cost).
    fn fill(store: Option<&NonceStore>, sec: u64, per_second: u64, buf: &mut String) {
        use std::fmt::Write as _;
        for i in 0..per_second {
            buf.clear();
            write!(buf, "{sec:08x}{i:024x}").unwrap();
            match store {
                Some(s) => s.check_and_insert(buf, NOW + sec, NOW + sec).unwrap(),
                None => {
                    std::hint::black_box(&*buf);
                }
            }
        }
    }

    /// Figures for the documentation, not a pass/fail check: run with
    /// `cargo test --release -p wardend nonce_store_figures -- --ignored --nocapture`.
    /// Fills the store to a steady state of about `target` entries (expiry running: 61 seconds'
    /// worth of nonces at a constant rate), then times a further million inserts.
    #[test]
    #[ignore = "measurement, prints figures"]
    fn nonce_store_figures() {
        let mut buf = String::new();
        for target in [1_000_000u64, 10_000_000] {
            let rss_before = rss_bytes().unwrap_or(0);
            let s = NonceStore::new(Duration::from_secs(60));
            let per_second = target / 61;
            let mut sec = 0;
            while sec < 62 {
                fill(Some(&s), sec, per_second, &mut buf);
                sec += 1;
            }
            let (len, heap) = (s.len(), s.heap_bytes());
            let rss = rss_bytes().unwrap_or(0).saturating_sub(rss_before);
            let seconds = 1_000_000u64.div_ceil(per_second);
            let start = std::time::Instant::now();
            for k in 0..seconds {
                fill(Some(&s), sec + k, per_second, &mut buf);
            }
            let with_store = start.elapsed();
            let start = std::time::Instant::now();
            for k in 0..seconds {
                fill(None, sec + k, per_second, &mut buf);
            }
            let formatting = start.elapsed();
            let n = (seconds * per_second) as f64;
            println!(
                "steady state {len} entries: heap {:.1} B/entry (RSS growth {:.1} B/entry); \
                 {:.0} ns per insert (+{:.0} ns formatting the nonce)",
                heap as f64 / len as f64,
                rss as f64 / len as f64,
                with_store.saturating_sub(formatting).as_nanos() as f64 / n,
                formatting.as_nanos() as f64 / n,
            );
        }
    }
}
