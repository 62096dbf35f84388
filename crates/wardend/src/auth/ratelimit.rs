//! Rate limits per principal and per class of request.
//!
//! # Algorithm: GCRA (a token bucket kept as one timestamp)
//!
//! A rate `count/per` lets an idle principal send `count` requests at once (the burst), then one
//! every `per / count` (the refill); the long-run average never exceeds `count` per `per`. This is
//! GCRA, the "generic cell rate algorithm": per key it stores only the *theoretical arrival time*
//! (TAT), the moment at which the bucket would be full again, so every check is O(1) in time and
//! memory. It is not a sliding-window log: right after a full burst, refills continue, so a window
//! of length `per` can admit up to `2·count − 1` requests (Lumo's sliding window admits `count`).
//! In exchange the state is one timestamp per key instead of `count` of them.
//!
//! Unlimited classes (`"off"`) are answered without touching any shared state.
//!
//! # Memory
//!
//! Keys whose bucket is full again (TAT in the past) are indistinguishable from keys never seen,
//! so they are dropped: every check also examines the next two entries of its shard in turn and
//! removes them if idle. Each check adds at most one key and sweeps two, so the table stays
//! proportional to the keys active within the longest window, however many principals come by.

use crate::units::{parse_duration, HumanDuration};
use hashbrown::HashTable;
use parking_lot::Mutex;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a request is, for rate limiting. Each class has its own rate (see [`RateLimits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateClass {
    Auth,
    Secrets,
    Admin,
    Commands,
    Jobs,
    System,
}

impl RateClass {
    pub const ALL: [RateClass; 6] = [
        RateClass::Auth,
        RateClass::Secrets,
        RateClass::Admin,
        RateClass::Commands,
        RateClass::Jobs,
        RateClass::System,
    ];

    /// The name used in the configuration (`[rate_limits] auth = "10/60s"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            RateClass::Auth => "auth",
            RateClass::Secrets => "secrets",
            RateClass::Admin => "admin",
            RateClass::Commands => "commands",
            RateClass::Jobs => "jobs",
            RateClass::System => "system",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RateClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `count` requests per `per`; `count == 0` (written `"off"`) means unlimited.
///
/// Written in the configuration as `"100/60s"`, `"10/1m"` (or `"10/m"`), or `"off"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// The longest window accepted in the configuration.
pub const MAX_RATE_WINDOW: Duration = Duration::from_secs(30 * 86400);

impl Rate {
    /// No limit.
    pub const OFF: Rate = Rate {
        count: 0,
        per: Duration::ZERO,
    };

    pub const fn new(count: u32, per: Duration) -> Self {
        Rate { count, per }
    }

    /// True when requests of this rate are never limited (`count == 0`, or a zero window).
    pub const fn is_unlimited(&self) -> bool {
        self.count == 0 || self.per.is_zero()
    }
}

/// A rate that could not be parsed; the message says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate `{input}`: {reason}; write it as e.g. \"100/60s\", \"10/1m\" or \"off\"")]
pub struct RateParseError {
    input: String,
    reason: String,
}

impl FromStr for Rate {
    type Err = RateParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| RateParseError {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let s = input.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Rate::OFF);
        }
        let (count, per) = s
            .split_once('/')
            .ok_or_else(|| err("expected COUNT/WINDOW"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| err("the count must be a whole number below 2^32"))?;
        if count == 0 {
            return Err(err(
                "a count of 0 would refuse every request (\"off\" means no limit)",
            ));
        }
        let per = per.trim();
        let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
            parse_duration(per)
        } else {
            parse_duration(&format!("1{per}"))
        }
        .map_err(|e| err(&e))?;
        if per.is_zero() {
            return Err(err("the window must be longer than zero"));
        }
        if per > MAX_RATE_WINDOW {
            return Err(err("the window must be at most 30d"));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            f.write_str("off")
        } else {
            write!(f, "{}/{}", self.count, HumanDuration(self.per))
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The rate of each class. Defaults: securityd's (auth 10/min, secrets 100/min, admin 5/min),
/// Lumo's 100/min for commands, the same for jobs, and no limit on `system` (ping, health,
/// metrics), so that health checks never fail under load.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    pub auth: Rate,
    pub secrets: Rate,
    pub admin: Rate,
    pub commands: Rate,
    pub jobs: Rate,
    pub system: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        let per_minute = |count| Rate::new(count, Duration::from_secs(60));
        RateLimits {
            auth: per_minute(10),
            secrets: per_minute(100),
            admin: per_minute(5),
            commands: per_minute(100),
            jobs: per_minute(100),
            system: Rate::OFF,
        }
    }
}

impl RateLimits {
    pub fn get(&self, class: RateClass) -> Rate {
        match class {
            RateClass::Auth => self.auth,
            RateClass::Secrets => self.secrets,
            RateClass::Admin => self.admin,
            RateClass::Commands => self.commands,
            RateClass::Jobs => self.jobs,
            RateClass::System => self.system,
        }
    }
}

/// The outcome of one check, with what the `X-RateLimit-*` headers need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// The class's `count`; 0 when the class is unlimited (then send no rate-limit headers).
    pub limit: u32,
    /// Requests that could be sent right now (0 when refused; `u32::MAX` when unlimited).
    pub remaining: u32,
    /// Allowed: time until the whole `limit` is available again. Refused: time until the next
    /// request will be allowed (the `Retry-After`).
    pub reset_after: Duration,
}

impl RateDecision {
    const UNLIMITED: RateDecision = RateDecision {
        allowed: true,
        limit: 0,
        remaining: u32::MAX,
        reset_after: Duration::ZERO,
    };

    /// `reset_after` in whole seconds, rounded up, for `X-RateLimit-Reset` / `Retry-After`.
    pub fn reset_secs(&self) -> u64 {
        self.reset_after.as_secs() + u64::from(self.reset_after.subsec_nanos() > 0)
    }
}

const SHARDS: usize = 16;
const SHARD_SHIFT: u32 = 64 - SHARDS.trailing_zeros();
/// Entries examined for eviction on every check: more than the one a check can add.
const SWEEP_PER_CHECK: usize = 2;

/// Counts requests per (principal, class). Shared by every connection.
pub struct RateLimiter {
    /// Per class: `count << 32 | window in ms`, 0 for unlimited. One atomic word per class, so a
    /// check reads its rate without a lock and a reload never shows half a rate.
    limits: [AtomicU64; 6],
    hasher: RandomState,
    shards: Box<[CacheAligned<Mutex<Shard>>]>,
}

#[repr(align(128))]
struct CacheAligned<T>(T);

#[derive(Default)]
struct Shard {
    /// Dense storage, so that eviction can walk it a few entries at a time.
    entries: Vec<Entry>,
    /// Indices into `entries`, keyed by `Entry::hash`.
    index: HashTable<u32>,
    /// Next entry the incremental sweep examines.
    sweep: usize,
}

struct Entry {
    hash: u64,
    class: RateClass,
    principal: Box<str>,
    /// Theoretical arrival time: when the bucket is full again.
    tat: Instant,
}

fn pack(rate: Rate) -> u64 {
    if rate.is_unlimited() {
        return 0;
    }
    let ms = rate.per.as_millis().clamp(1, u128::from(u32::MAX)) as u64;
    (u64::from(rate.count) << 32) | ms
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        let limiter = RateLimiter {
            limits: Default::default(),
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| CacheAligned(Mutex::new(Shard::default())))
                .collect(),
        };
        limiter.set_limits(limits);
        limiter
    }

    /// Applies new rates (SIGHUP reload). Counters are kept: a principal that has spent its
    /// burst does not get a new one because the configuration was reloaded.
    pub fn set_limits(&self, limits: RateLimits) {
        for class in RateClass::ALL {
            self.limits[class.index()].store(pack(limits.get(class)), Ordering::Relaxed);
        }
    }

    /// The rate in force for `class`.
    pub fn rate(&self, class: RateClass) -> Rate {
        let packed = self.limits[class.index()].load(Ordering::Relaxed);
        if packed == 0 {
            Rate::OFF
        } else {
            Rate::new(
                (packed >> 32) as u32,
                Duration::from_millis(packed & 0xffff_ffff),
            )
        }
    }

    /// The rates in force.
    pub fn limits(&self) -> RateLimits {
        let rate = |class: RateClass| {
            let packed = self.limits[class.index()].load(Ordering::Relaxed);
            if packed == 0 {
                Rate::OFF
            } else {
                Rate::new(
                    (packed >> 32) as u32,
                    Duration::from_millis(packed & 0xffff_ffff),
                )
            }
        };
        RateLimits {
            auth: rate(RateClass::Auth),
            secrets: rate(RateClass::Secrets),
            admin: rate(RateClass::Admin),
            commands: rate(RateClass::Commands),
            jobs: rate(RateClass::Jobs),
            system: rate(RateClass::System),
        }
    }

    /// Counts one request of `class` by `principal` (a key such as `"uid:1000"` or
    /// `"cert:ab12…"`) at `now`, and says whether it may proceed. Call it after authentication,
    /// so that requests that fail to authenticate cannot spend a client's quota.
    pub fn check(&self, principal: &str, class: RateClass, now: Instant) -> RateDecision {
        let packed = self.limits[class.index()].load(Ordering::Relaxed);
        if packed == 0 {
            return RateDecision::UNLIMITED;
        }
        let count = (packed >> 32) as u32;
        let per_ns = (packed & 0xffff_ffff) * 1_000_000;
        // Emission interval, rounded up so that the sustained rate never exceeds count/per;
        // tolerance chosen so that exactly `count` requests fit in a burst.
        let interval = per_ns.div_ceil(u64::from(count));
        let tolerance = interval * u64::from(count - 1);

        let hash = self.hasher.hash_one((class, principal));
        let mut shard = self.shards[(hash >> SHARD_SHIFT) as usize].0.lock();
        shard.sweep(now);
        let Shard { entries, index, .. } = &mut *shard;
        let found = index
            .find(hash, |&i| {
                let e = &entries[i as usize];
                e.class == class && *e.principal == *principal
            })
            .copied();
        let tat = found.map_or(now, |i| entries[i as usize].tat.max(now));
        let backlog = saturating_nanos(tat - now);
        if backlog > tolerance {
            return RateDecision {
                allowed: false,
                limit: count,
                remaining: 0,
                reset_after: Duration::from_nanos(backlog - tolerance),
            };
        }
        let new_tat = tat + Duration::from_nanos(interval);
        match found {
            Some(i) => entries[i as usize].tat = new_tat,
            None => {
                let Ok(position) = u32::try_from(entries.len()) else {
                    // Four billion keys in one shard: refuse to track more rather than wrap.
                    return RateDecision {
                        allowed: false,
                        limit: count,
                        remaining: 0,
                        reset_after: Duration::from_nanos(interval),
                    };
                };
                entries.push(Entry {
                    hash,
                    class,
                    principal: principal.into(),
                    tat: new_tat,
                });
                index.insert_unique(hash, position, |&i| entries[i as usize].hash);
            }
        }
        RateDecision {
            allowed: true,
            limit: count,
            remaining: ((tolerance - backlog) / interval).min(u64::from(u32::MAX)) as u32,
            reset_after: Duration::from_nanos(backlog + interval),
        }
    }

    /// Number of (principal, class) keys tracked.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Shard {
    /// Examines the next few entries and drops those whose bucket is full again.
    fn sweep(&mut self, now: Instant) {
        for _ in 0..SWEEP_PER_CHECK {
            if self.entries.is_empty() {
                return;
            }
            if self.sweep >= self.entries.len() {
                self.sweep = 0;
            }
            if self.entries[self.sweep].tat <= now {
                self.remove(self.sweep);
            } else {
                self.sweep += 1;
            }
        }
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            let entries = &mut self.entries;
            entries.shrink_to(entries.len() * 2);
            self.index
                .shrink_to(entries.len() * 2, |&i| entries[i as usize].hash);
        }
    }

    /// Removes entry `i`, moving the last entry into its place.
    fn remove(&mut self, i: usize) {
        let Shard { entries, index, .. } = self;
        if let Ok(slot) = index.find_entry(entries[i].hash, |&j| j as usize == i) {
            slot.remove();
        }
        entries.swap_remove(i);
        if let Some(moved) = entries.get(i) {
            let last = entries.len();
            if let Some(slot) = index.find_mut(moved.hash, |&j| j as usize == last) {
                *slot = i as u32;
            }
        }
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limits", &self.limits())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn limits(class_rate: &str) -> RateLimits {
        let rate: Rate = class_rate.parse().unwrap();
        RateLimits {
            auth: rate,
            secrets: rate,
            admin: rate,
            commands: rate,
            jobs: rate,
            system: Rate::OFF,
        }
    }

    #[test]
    fn rates_parse_and_display() {
        let table = [
            ("100/60s", Some((100, 60_000)), "100/1m"),
            ("10/1m", Some((10, 60_000)), "10/1m"),
            ("10/m", Some((10, 60_000)), "10/1m"),
            (" 5 / 30s ", Some((5, 30_000)), "5/30s"),
            ("3/250ms", Some((3, 250)), "3/250ms"),
            ("1000/1d", Some((1000, 86_400_000)), "1000/1d"),
            ("off", None, "off"),
            ("OFF", None, "off"),
        ];
        for (input, expected, shown) in table {
            let rate: Rate = input.parse().unwrap();
            match expected {
                Some((count, ms)) => {
                    assert_eq!(rate, Rate::new(count, Duration::from_millis(ms)), "{input}")
                }
                None => assert!(rate.is_unlimited(), "{input}"),
            }
            assert_eq!(rate.to_string(), shown, "{input}");
            assert_eq!(
                shown.parse::<Rate>().unwrap(),
                rate,
                "round trip of {input}"
            );
        }
    }

    #[test]
    fn bad_rates_are_refused_with_a_hint() {
        for (input, hint) in [
            ("100", "COUNT/WINDOW"),
            ("0/60s", "\"off\" means no limit"),
            ("-1/60s", "whole number"),
            ("ten/60s", "whole number"),
            ("10/60", "no unit"),
            ("10/60y", "unknown unit"),
            ("10/0s", "longer than zero"),
            ("10/31d", "at most 30d"),
            ("", "COUNT/WINDOW"),
        ] {
            let err = input.parse::<Rate>().unwrap_err().to_string();
            assert!(err.contains(hint), "{input}: {err}");
            assert!(err.contains("\"100/60s\""), "{input}: {err}");
        }
    }

    #[test]
    fn rate_limits_deserialize_with_defaults_and_refuse_unknown_keys() {
        let l: RateLimits = toml::from_str("auth = \"3/10s\"\nsystem = \"50/1s\"").unwrap();
        assert_eq!(l.auth, Rate::new(3, secs(10)));
        assert_eq!(l.system, Rate::new(50, secs(1)));
        assert_eq!(l.secrets, RateLimits::default().secrets);
        let err = toml::from_str::<RateLimits>("secret = \"1/1s\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = toml::from_str::<RateLimits>("auth = \"1/1x\"").unwrap_err();
        assert!(err.to_string().contains("unknown unit"), "{err}");
        let d = RateLimits::default();
        assert_eq!(
            [d.auth, d.secrets, d.admin, d.commands, d.jobs].map(|r| r.to_string()),
            ["10/1m", "100/1m", "5/1m", "100/1m", "100/1m"]
        );
        assert!(d.system.is_unlimited());
        let shown = toml::to_string(&d).unwrap();
        assert_eq!(toml::from_str::<RateLimits>(&shown).unwrap(), d);
    }

    /// One row per request: (milliseconds after start, allowed, remaining, reset_after ms).
    #[test]
    fn gcra_table_five_per_minute() {
        let rl = RateLimiter::new(limits("5/60s"));
        let t0 = Instant::now();
        let table: &[(u64, bool, u32, u64)] = &[
            (0, true, 4, 12_000),
            (0, true, 3, 24_000),
            (1_000, true, 2, 35_000),
            (1_000, true, 1, 47_000),
            (2_000, true, 0, 58_000),
            (2_000, false, 0, 10_000), // the next slot frees at 12 s
            (11_999, false, 0, 1),
            (12_000, true, 0, 60_000),
            (12_000, false, 0, 12_000),
            (72_000, true, 4, 12_000), // a full minute idle: whole burst back
        ];
        for (n, &(ms, allowed, remaining, reset_ms)) in table.iter().enumerate() {
            let d = rl.check("uid:1000", RateClass::Admin, t0 + Duration::from_millis(ms));
            assert_eq!(
                (d.allowed, d.limit, d.remaining, d.reset_after),
                (allowed, 5, remaining, Duration::from_millis(reset_ms)),
                "row {n} at {ms} ms"
            );
        }
    }

    #[test]
    fn burst_is_exactly_the_count_then_the_refill_rate() {
        for (rate, count) in [
            ("1/1s", 1u32),
            ("7/60s", 7),
            ("100/60s", 100),
            ("1000/1ms", 1000),
        ] {
            let rl = RateLimiter::new(limits(rate));
            let t0 = Instant::now();
            let allowed = (0..count + 10)
                .filter(|_| rl.check("p", RateClass::Commands, t0).allowed)
                .count();
            assert_eq!(allowed, count as usize, "{rate}");
            // Over 10 further windows, at most `count` more per window.
            let per = rate.parse::<Rate>().unwrap().per;
            let mut more = 0;
            let steps = 100 * count;
            for step in 1..=steps {
                let t = t0 + per * 10 * step / steps;
                more += usize::from(rl.check("p", RateClass::Commands, t).allowed);
            }
            assert!(
                more <= 10 * count as usize && more >= 10 * count as usize - 1,
                "{rate}: {more}"
            );
        }
    }

    #[test]
    fn principals_and_classes_are_counted_separately() {
        let rl = RateLimiter::new(limits("2/60s"));
        let t = Instant::now();
        for _ in 0..2 {
            assert!(rl.check("uid:1", RateClass::Auth, t).allowed);
        }
        assert!(!rl.check("uid:1", RateClass::Auth, t).allowed);
        assert!(rl.check("uid:2", RateClass::Auth, t).allowed);
        assert!(rl.check("uid:1", RateClass::Secrets, t).allowed);
        assert_eq!(rl.len(), 3);
    }

    #[test]
    fn unlimited_class_is_always_allowed_and_tracks_nothing() {
        let rl = RateLimiter::new(limits("1/60s"));
        let t = Instant::now();
        for _ in 0..1000 {
            let d = rl.check("uid:1", RateClass::System, t);
            assert!(d.allowed);
            assert_eq!(d.limit, 0);
        }
        assert!(rl.is_empty());
    }

    #[test]
    fn reload_changes_rates_but_keeps_counters() {
        let rl = RateLimiter::new(limits("2/60s"));
        let t = Instant::now();
        assert!(rl.check("p", RateClass::Jobs, t).allowed);
        assert!(rl.check("p", RateClass::Jobs, t).allowed);
        assert!(!rl.check("p", RateClass::Jobs, t).allowed);
        // Raising the limit lets the spent principal continue up to the new burst, not beyond.
        rl.set_limits(limits("4/60s"));
        assert_eq!(rl.limits().jobs, Rate::new(4, secs(60)));
        let more = (0..10)
            .filter(|_| rl.check("p", RateClass::Jobs, t).allowed)
            .count();
        assert!(more < 4, "counters were reset: {more} more allowed");
        // Turning it off is immediate.
        rl.set_limits(limits("off"));
        assert!(rl.check("p", RateClass::Jobs, t).allowed);
    }

    #[test]
    fn idle_keys_are_evicted_incrementally() {
        let rl = RateLimiter::new(limits("10/60s"));
        let t0 = Instant::now();
        for i in 0..10_000 {
            rl.check(&format!("cert:{i}"), RateClass::Secrets, t0);
        }
        assert_eq!(rl.len(), 10_000);
        // After every bucket has refilled, ongoing traffic sweeps the idle keys away.
        let later = t0 + secs(61);
        for round in 0..20 {
            for p in 0..1000 {
                let d = rl.check(&format!("uid:{p}"), RateClass::Secrets, later);
                assert_eq!(d.allowed, round < 10);
            }
        }
        assert_eq!(rl.len(), 1000);
        // A principal still throttled is kept.
        let rl = RateLimiter::new(limits("1/60s"));
        rl.check("busy", RateClass::Auth, t0 + secs(30));
        for i in 0..1000 {
            rl.check(&format!("x{i}"), RateClass::Auth, t0);
        }
        for _ in 0..4000 {
            rl.check("other", RateClass::Auth, t0 + secs(61));
        }
        assert!(!rl.check("busy", RateClass::Auth, t0 + secs(61)).allowed);
    }

    #[test]
    fn memory_stays_bounded_under_a_stream_of_new_principals() {
        let rl = RateLimiter::new(limits("10/1s"));
        let t0 = Instant::now();
        let mut max_len = 0;
        // 100 new principals per simulated 10 ms for 20 s: 200 000 principals in all, about
        // 10 000 of them active within any one window.
        for i in 0..200_000u64 {
            let t = t0 + Duration::from_micros(i * 100);
            rl.check(&format!("cert:{i}"), RateClass::Secrets, t);
            if i % 1000 == 0 {
                max_len = max_len.max(rl.len());
            }
        }
        assert!(max_len <= 25_000, "table grew to {max_len}");
    }

    #[test]
    fn limiter_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RateLimiter>();
    }
}
