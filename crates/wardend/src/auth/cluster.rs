//! The shared store: nonces, rate limits and session tokens kept in Redis, so that several
//! daemons behind one load balancer act as one (`[cluster] redis_url`).
//!
//! - **Nonces**: `SET <prefix>n:<sha256(nonce)> 1 NX PX <ttl>`, the TTL running to
//!   `timestamp + max_age + 1 s` exactly as [`super::NonceStore`] remembers it. A nonce used on
//!   one daemon is refused on every other.
//! - **Rate limits**: the same GCRA as [`super::RateLimiter`] (one theoretical arrival time per
//!   principal and class), run as one Lua script per request on Redis's own clock, so daemons
//!   whose clocks differ still share one bucket. Unlimited classes never reach Redis.
//! - **Sessions**: a hash per token at `<prefix>s:<sha256(token)>` (never the token itself) and,
//!   per principal, a sorted set of its session/admin token hashes scored by expiry, for
//!   `max_sessions_per_client`. Every operation (issue, use, refresh, logout, redeem) is one Lua
//!   script, so it is atomic across daemons.
//!
//! Every call is bounded by `[cluster] timeout`; the connection is made on first use and
//! re-made in the background after a failure (the `redis` crate's connection manager), so a
//! Redis that comes back is used again without a restart. A failure is reported as
//! [`Unavailable`]; what the caller does with it (refuse, or fall back to this daemon's memory
//! for sessions) is the pipeline's decision, following [`ClusterConfig::session_fallback`].
//!
//! What this module does not do: keep anything in memory (no cache: a logout must be seen by
//! every daemon at once), or talk to a Redis Cluster (all keys of one operation must live on
//! one server; use a single primary, with a replica for failover if wanted).

use super::ratelimit::{Rate, RateClass, RateDecision};
use super::session::{self, Issued, SessionConfig, SessionError, SessionInfo, TokenKind};
use super::{NonceError, MAX_NONCE_LEN};
use crate::units::HumanDuration;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::OnceCell;

/// `[cluster]`: where the shared store is and how to use it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…`; unset: everything in memory.
    pub redis_url: Option<String>,
    /// Prepended to every key, so that several warden clusters (or tests) can share one Redis.
    pub key_prefix: String,
    /// The longest one request waits for Redis (connecting included) before it is refused.
    pub timeout: HumanDuration,
    /// What session and rate-limit checks do while Redis is unreachable.
    pub session_fallback: SessionFallback,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: None,
            key_prefix: "warden:".into(),
            timeout: HumanDuration(Duration::from_millis(500)),
            session_fallback: SessionFallback::Closed,
        }
    }
}

/// While Redis is unreachable: `closed` refuses token requests (as HMAC requests always are);
/// `local` serves them from this daemon's own memory (tokens issued then work on this daemon
/// only; rate limits count per daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionFallback {
    Closed,
    Local,
}

impl ClusterConfig {
    /// Checks the URL and ranges; returns the key at fault and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(url) = &self.redis_url {
            redis::Client::open(url.as_str()).map_err(|e| {
                (
                    "cluster.redis_url",
                    format!("`{url}` is not a Redis URL ({e}): expected redis://host:port[/db]"),
                )
            })?;
        }
        let t = self.timeout.get();
        if t < Duration::from_millis(10) || t > Duration::from_secs(60) {
            return Err((
                "cluster.timeout",
                "out of range: expected between 10ms and 60s".into(),
            ));
        }
        if self.key_prefix.len() > 64 || self.key_prefix.chars().any(char::is_whitespace) {
            return Err((
                "cluster.key_prefix",
                "at most 64 characters, no whitespace".into(),
            ));
        }
        Ok(())
    }
}

/// Redis could not answer in time: the request is refused (or served locally, for sessions
/// with `session_fallback = "local"`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the shared store (Redis) is unavailable: {0}")]
pub struct Unavailable(String);

/// The error code a request refused for that reason carries, in every dialect.
pub const UNAVAILABLE_CODE: &str = "SHARED_STORE_UNAVAILABLE";

/// The connection to the shared store, shared by every connection of this daemon.
pub struct ClusterStore {
    /// An unusable URL (the configuration's validation refuses one, so only a configuration
    /// built in code gets here) makes every operation fail closed, with the reason.
    client: Result<redis::Client, String>,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    fallback: SessionFallback,
    gcra: redis::Script,
    sessions: redis::Script,
}

impl fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// GCRA on Redis's clock, in microseconds. KEYS[1]: the bucket; ARGV: interval, tolerance.
/// Returns {allowed, remaining, reset_after_us}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local backlog = tat - now
if backlog > tolerance then
  return {0, 0, backlog - tolerance}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((tolerance - backlog) / interval), backlog + interval}
";

/// Every session operation. KEYS[1]: the token presented (or to create); KEYS[2]: the sorted
/// set of the principal's tokens; KEYS[3]: the new token (refresh, redeem). ARGV[1]: the
/// operation; ARGV[2]: the principal; ARGV[3]: now (ms); the rest depends on the operation.
/// Errors come back as {'err', reason}; a use as {'ok', kind, created, expires, uses}.
const SESSIONS: &str = r"
local op, who, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function insert(key, kind, expires, retention, digest)
  redis.call('HSET', key, 'b', who, 'k', kind, 'c', ARGV[3], 'e', expires, 'u', 0)
  redis.call('PEXPIREAT', key, tonumber(expires) + tonumber(retention))
  if kind ~= 'bootstrap' then
    redis.call('ZADD', KEYS[2], expires, digest)
    if redis.call('PTTL', KEYS[2]) < tonumber(expires) - now then
      redis.call('PEXPIREAT', KEYS[2], expires)
    end
  end
end
local function held()
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  return redis.call('ZCARD', KEYS[2])
end
if op == 'issue' then
  -- ARGV: 4 kind, 5 expires, 6 retention, 7 max (0: not counted), 8 digest
  if tonumber(ARGV[7]) > 0 and held() >= tonumber(ARGV[7]) then return {'err', 'too_many'} end
  insert(KEYS[1], ARGV[4], ARGV[5], ARGV[6], ARGV[8])
  return {'ok'}
end
local v = redis.call('HMGET', KEYS[1], 'b', 'k', 'c', 'e')
if not v[1] then return {'err', 'invalid'} end
if v[1] ~= who then return {'err', 'wrong_principal'} end
if op == 'revoke' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[4])
  return {'ok'}
end
if tonumber(v[4]) <= now then return {'err', 'expired'} end
local kind = v[2]
if op == 'use' then
  if kind == 'bootstrap' then return {'err', 'bootstrap'} end
  local uses = redis.call('HINCRBY', KEYS[1], 'u', 1)
  return {'ok', kind, v[3], v[4], uses}
end
-- refresh and redeem. ARGV: 4 old digest, 5 new digest, 6 retention, 7 session ttl,
-- 8 admin ttl, 9 max
if op == 'refresh' then
  if kind == 'bootstrap' then return {'err', 'bootstrap'} end
  local ttl = ARGV[7]
  if kind == 'admin' then ttl = ARGV[8] end
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[4])
  local expires = string.format('%.0f', now + tonumber(ttl))
  insert(KEYS[3], kind, expires, ARGV[6], ARGV[5])
  return {'ok', kind, ARGV[3], expires}
end
if op == 'redeem' then
  if kind ~= 'bootstrap' then return {'err', 'not_bootstrap', kind} end
  if held() >= tonumber(ARGV[9]) then return {'err', 'too_many'} end
  redis.call('DEL', KEYS[1])
  local expires = string.format('%.0f', now + tonumber(ARGV[7]))
  insert(KEYS[3], 'session', expires, ARGV[6], ARGV[5])
  return {'ok', 'session', ARGV[3], expires}
end
return {'err', 'unknown operation'}
";

impl ClusterStore {
    /// The store for `cfg`, or `None` when no `redis_url` is set. Does not connect: the first
    /// request does, so a daemon starts (and serves what needs no shared store) while Redis is
    /// still down.
    pub fn new(cfg: &ClusterConfig) -> Option<ClusterStore> {
        let url = cfg.redis_url.as_ref()?;
        let client = redis::Client::open(url.as_str())
            .map_err(|e| format!("cluster.redis_url is not a Redis URL: {e}"));
        Some(ClusterStore {
            client,
            conn: OnceCell::new(),
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout.get(),
            fallback: cfg.session_fallback,
            gcra: redis::Script::new(GCRA),
            sessions: redis::Script::new(SESSIONS),
        })
    }

    /// True when session and rate-limit checks fall back to this daemon's memory while Redis is
    /// unreachable.
    pub fn falls_back(&self) -> bool {
        self.fallback == SessionFallback::Local
    }

    /// Runs one operation within the timeout, connecting first if needed.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let client = self.client.as_ref().map_err(|e| Unavailable(e.clone()))?;
        let work = async {
            let conn = self
                .conn
                .get_or_try_init(|| {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(self.timeout)
                        .set_response_timeout(self.timeout)
                        .set_number_of_retries(1)
                        .set_max_delay(1000);
                    ConnectionManager::new_with_config(client.clone(), config)
                })
                .await
                .map_err(|e| Unavailable(e.to_string()))?
                .clone();
            op(conn).await.map_err(|e| Unavailable(e.to_string()))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Unavailable(format!(
                "no answer within {}",
                HumanDuration(self.timeout)
            ))),
        }
    }

    /// [`super::NonceStore::check_and_insert`], shared: the nonce is refused if any daemon of
    /// the cluster saw it within the window. `max_age` in whole seconds.
    pub async fn check_nonce(
        &self,
        nonce: &str,
        timestamp: u64,
        now: u64,
        max_age: u64,
    ) -> Result<Result<(), NonceError>, Unavailable> {
        if nonce.is_empty() {
            return Ok(Err(NonceError::Empty));
        }
        if nonce.len() > MAX_NONCE_LEN {
            return Ok(Err(NonceError::TooLong {
                len: nonce.len(),
                max: MAX_NONCE_LEN,
            }));
        }
        if timestamp.abs_diff(now) > max_age {
            return Ok(Err(NonceError::TimestampOutOfWindow {
                timestamp,
                now,
                max_age,
            }));
        }
        let expires = timestamp.saturating_add(max_age + 1);
        let ttl_ms = expires.saturating_sub(now).max(1) * 1000;
        let key = format!(
            "{}n:{}",
            self.prefix,
            hex::encode(Sha256::digest(nonce.as_bytes()))
        );
        let fresh: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(match fresh {
            Some(_) => Ok(()),
            None => Err(NonceError::Replayed),
        })
    }

    /// [`super::RateLimiter::check`], shared by every daemon. `rate` must not be unlimited.
    pub async fn check_rate(
        &self,
        principal: &str,
        class: RateClass,
        rate: Rate,
    ) -> Result<RateDecision, Unavailable> {
        let count = rate.count.max(1);
        let per_us = u64::try_from(rate.per.as_micros()).unwrap_or(u64::MAX);
        let interval = per_us.div_ceil(u64::from(count)).max(1);
        let tolerance = interval * u64::from(count - 1);
        // The principal is hashed: it may hold any characters, and keys stay short.
        let key = format!(
            "{}r:{}:{}",
            self.prefix,
            class.as_str(),
            hex::encode(&Sha256::digest(principal.as_bytes())[..16])
        );
        let (allowed, remaining, reset_us): (u8, u64, u64) = self
            .run(|mut c| async move {
                self.gcra
                    .key(&key)
                    .arg(interval)
                    .arg(tolerance)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(RateDecision {
            allowed: allowed == 1,
            limit: count,
            remaining: remaining.min(u64::from(u32::MAX)) as u32,
            reset_after: Duration::from_micros(reset_us),
        })
    }

    fn token_key(&self, hex_digest: &str) -> String {
        format!("{}s:{hex_digest}", self.prefix)
    }

    fn principal_key(&self, principal: &str) -> String {
        format!(
            "{}p:{}",
            self.prefix,
            hex::encode(&Sha256::digest(principal.as_bytes())[..16])
        )
    }

    async fn session_op(
        &self,
        keys: &[String],
        args: &[String],
    ) -> Result<Result<Vec<String>, SessionError>, Unavailable> {
        let reply: Vec<redis::Value> = self
            .run(|mut c| async move {
                let mut inv = self.sessions.prepare_invoke();
                for k in keys {
                    inv.key(k);
                }
                for a in args {
                    inv.arg(a);
                }
                inv.invoke_async(&mut c).await
            })
            .await?;
        let reply: Vec<String> = reply
            .into_iter()
            .map(|v| redis::from_redis_value(&v).unwrap_or_default())
            .collect();
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Ok(reply)),
            Some("err") => Ok(Err(match reply.get(1).map(String::as_str) {
                Some("expired") => SessionError::Expired,
                Some("wrong_principal") => SessionError::WrongPrincipal,
                Some("bootstrap") => SessionError::WrongKind {
                    expected: "session or admin token",
                    found: TokenKind::Bootstrap,
                },
                Some("not_bootstrap") => SessionError::WrongKind {
                    expected: "bootstrap token",
                    found: kind_of(reply.get(2).map_or("", String::as_str)),
                },
                Some("too_many") => SessionError::TooManySessions {
                    max: usize::MAX, // replaced by the caller, which knows the configured maximum
                },
                _ => SessionError::Invalid,
            })),
            _ => Err(Unavailable(format!(
                "unexpected reply from the session script: {reply:?}"
            ))),
        }
    }

    /// [`super::SessionStore::issue`], shared.
    pub async fn issue(
        &self,
        cfg: &SessionConfig,
        bound_to: &str,
        kind: TokenKind,
        now: SystemTime,
    ) -> Result<Result<Issued, SessionError>, Unavailable> {
        let token = match session::new_token() {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let digest = hex::encode(session::digest(&token));
        let expires_at = now.checked_add(cfg.ttl(kind)).unwrap_or(now);
        let max = if kind == TokenKind::Bootstrap {
            0
        } else {
            cfg.max_sessions_per_client
        };
        let keys = [self.token_key(&digest), self.principal_key(bound_to)];
        let args = [
            "issue".to_string(),
            bound_to.to_string(),
            ms(now).to_string(),
            kind_name(kind).to_string(),
            ms(expires_at).to_string(),
            retention_ms().to_string(),
            max.to_string(),
            digest,
        ];
        Ok(self
            .session_op(&keys, &args)
            .await?
            .map(|_| Issued {
                token,
                expires_at,
                kind,
            })
            .map_err(|e| with_max(e, cfg)))
    }

    /// [`super::SessionStore::validate`], shared: counts the use.
    pub async fn validate(
        &self,
        token: &str,
        presenter: &str,
        now: SystemTime,
    ) -> Result<Result<SessionInfo, SessionError>, Unavailable> {
        let Some(digest) = session::parse(token).ok() else {
            return Ok(Err(SessionError::Invalid));
        };
        let hexd = hex::encode(digest);
        let keys = [self.token_key(&hexd), self.principal_key(presenter)];
        let args = [
            "use".to_string(),
            presenter.to_string(),
            ms(now).to_string(),
        ];
        Ok(self.session_op(&keys, &args).await?.map(|r| {
            let field = |i: usize| r.get(i).map_or("", String::as_str);
            SessionInfo {
                id: session::public_id(&digest),
                kind: kind_of(field(1)),
                bound_to: presenter.to_string(),
                created_at: from_ms(field(2)),
                expires_at: from_ms(field(3)),
                last_used: now,
                uses: field(4).parse().unwrap_or(0),
            }
        }))
    }

    /// [`super::SessionStore::revoke`], shared: the token stops working on every daemon.
    pub async fn revoke(
        &self,
        token: &str,
        presenter: &str,
    ) -> Result<Result<(), SessionError>, Unavailable> {
        let Some(digest) = session::parse(token).ok() else {
            return Ok(Err(SessionError::Invalid));
        };
        let hexd = hex::encode(digest);
        let keys = [self.token_key(&hexd), self.principal_key(presenter)];
        let args = [
            "revoke".to_string(),
            presenter.to_string(),
            ms(SystemTime::now()).to_string(),
            hexd,
        ];
        Ok(self.session_op(&keys, &args).await?.map(|_| ()))
    }

    /// [`super::SessionStore::refresh`] (`redeem == false`) or
    /// [`super::SessionStore::redeem_bootstrap`] (`redeem == true`), shared.
    pub async fn replace(
        &self,
        cfg: &SessionConfig,
        token: &str,
        presenter: &str,
        now: SystemTime,
        redeem: bool,
    ) -> Result<Result<Issued, SessionError>, Unavailable> {
        let Some(old) = session::parse(token).ok() else {
            return Ok(Err(SessionError::Invalid));
        };
        let new = match session::new_token() {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let (old, new_digest) = (hex::encode(old), hex::encode(session::digest(&new)));
        let keys = [
            self.token_key(&old),
            self.principal_key(presenter),
            self.token_key(&new_digest),
        ];
        let ttl = |k| cfg.ttl(k).as_millis().to_string();
        let args = [
            if redeem { "redeem" } else { "refresh" }.to_string(),
            presenter.to_string(),
            ms(now).to_string(),
            old,
            new_digest,
            retention_ms().to_string(),
            ttl(TokenKind::Session),
            ttl(TokenKind::Admin),
            cfg.max_sessions_per_client.to_string(),
        ];
        Ok(self
            .session_op(&keys, &args)
            .await?
            .map(|r| Issued {
                token: new,
                kind: kind_of(r.get(1).map_or("", String::as_str)),
                expires_at: from_ms(r.get(3).map_or("", String::as_str)),
            })
            .map_err(|e| with_max(e, cfg)))
    }
}

fn with_max(e: SessionError, cfg: &SessionConfig) -> SessionError {
    match e {
        SessionError::TooManySessions { .. } => SessionError::TooManySessions {
            max: cfg.max_sessions_per_client,
        },
        other => other,
    }
}

fn retention_ms() -> u128 {
    session::EXPIRED_RETENTION.as_millis()
}

fn ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

fn from_ms(s: &str) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(s.parse().unwrap_or(0))
}

fn kind_name(k: TokenKind) -> &'static str {
    match k {
        TokenKind::Session => "session",
        TokenKind::Admin => "admin",
        TokenKind::Bootstrap => "bootstrap",
    }
}

fn kind_of(s: &str) -> TokenKind {
    match s {
        "admin" => TokenKind::Admin,
        "bootstrap" => TokenKind::Bootstrap,
        _ => TokenKind::Session,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{RateLimiter, RateLimits};
    use std::time::Instant;

    fn parse(text: &str) -> Result<crate::config::Config, String> {
        crate::config::Config::parse(text, std::path::Path::new("test.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_section_is_optional_and_its_keys_are_checked() {
        let c = parse("").unwrap();
        assert_eq!(c.cluster, ClusterConfig::default());
        assert!(ClusterStore::new(&c.cluster).is_none());
        let c = parse(
            "[cluster]\nredis_url = \"redis://127.0.0.1:6379/2\"\nkey_prefix = \"w:\"\n\
             timeout = \"2s\"\nsession_fallback = \"local\"\n",
        )
        .unwrap();
        assert_eq!(c.cluster.timeout.get(), Duration::from_secs(2));
        assert_eq!(c.cluster.session_fallback, SessionFallback::Local);
        let store = ClusterStore::new(&c.cluster).unwrap();
        assert!(store.falls_back());
        assert_eq!(store.prefix, "w:");

        for (text, needle) in [
            ("[cluster]\nredis_urls = \"redis://x\"\n", "unknown field"),
            ("[cluster]\nredis_url = \"http://x\"\n", "cluster.redis_url"),
            ("[cluster]\ntimeout = \"1ms\"\n", "cluster.timeout"),
            ("[cluster]\ntimeout = \"2m\"\n", "cluster.timeout"),
            ("[cluster]\nkey_prefix = \"a b\"\n", "cluster.key_prefix"),
            ("[cluster]\nsession_fallback = \"open\"\n", "closed"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[tokio::test]
    async fn an_unusable_url_fails_closed_rather_than_open() {
        let cfg = ClusterConfig {
            redis_url: Some("not a url".into()),
            ..ClusterConfig::default()
        };
        let store = ClusterStore::new(&cfg).unwrap();
        let e = store.check_nonce("n", 100, 100, 60).await.unwrap_err();
        assert!(e.to_string().contains("not a Redis URL"), "{e}");
        let rate = Rate::new(1, Duration::from_secs(1));
        assert!(store
            .check_rate("uid:1", RateClass::Auth, rate)
            .await
            .is_err());
        let cfg = SessionConfig::default();
        let now = SystemTime::now();
        assert!(store
            .issue(&cfg, "uid:1", TokenKind::Session, now)
            .await
            .is_err());
    }

    fn redis_store(name: &str) -> Option<(ClusterStore, String)> {
        if std::env::var("WARDEN_TEST_REDIS").as_deref() != Ok("1") {
            eprintln!("skipped: set WARDEN_TEST_REDIS=1 to run the tests against Redis");
            return None;
        }
        let prefix = format!("warden-unit:{name}:{}:{}:", std::process::id(), {
            let mut b = [0u8; 8];
            getrandom::getrandom(&mut b).unwrap();
            hex::encode(b)
        });
        let cfg = ClusterConfig {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            key_prefix: prefix.clone(),
            ..ClusterConfig::default()
        };
        Some((ClusterStore::new(&cfg).unwrap(), prefix))
    }

    async fn cleanup(store: &ClusterStore, prefix: &str) {
        let pattern = format!("{prefix}*");
        let keys: Vec<String> = store
            .run(|mut c| async move { redis::cmd("KEYS").arg(pattern).query_async(&mut c).await })
            .await
            .unwrap();
        if !keys.is_empty() {
            let () = store
                .run(|mut c| async move { redis::cmd("DEL").arg(keys).query_async(&mut c).await })
                .await
                .unwrap();
        }
    }

    /// The shared limiter answers what the in-memory one answers: the same burst, the same
    /// remaining counts, a refusal with a wait no longer than one refill.
    #[tokio::test]
    async fn the_shared_rate_limit_keeps_the_in_memory_semantics() {
        let Some((store, prefix)) = redis_store("gcra") else {
            return;
        };
        let rate = Rate::new(3, Duration::from_secs(60));
        let limits = RateLimits {
            auth: rate,
            ..RateLimits::default()
        };
        let memory = RateLimiter::new(limits);
        let now = Instant::now();
        for _ in 0..4 {
            let local = memory.check("uid:7", RateClass::Auth, now);
            let shared = store
                .check_rate("uid:7", RateClass::Auth, rate)
                .await
                .unwrap();
            assert_eq!(
                (shared.allowed, shared.limit, shared.remaining),
                (local.allowed, local.limit, local.remaining)
            );
            assert!(shared.reset_after <= Duration::from_secs(60), "{shared:?}");
            if !shared.allowed {
                assert!(shared.reset_after <= Duration::from_secs(20), "{shared:?}");
                assert!(shared.reset_after > Duration::ZERO);
            }
        }
        // Another principal, another class: their own buckets.
        let other = store.check_rate("uid:8", RateClass::Auth, rate).await;
        assert_eq!(other.unwrap().remaining, 2);
        let other = store.check_rate("uid:7", RateClass::Secrets, rate).await;
        assert_eq!(other.unwrap().remaining, 2);
        cleanup(&store, &prefix).await;
    }

    #[tokio::test]
    async fn shared_nonces_expire_with_the_window_and_refuse_what_memory_refuses() {
        let Some((store, prefix)) = redis_store("nonce") else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let check = |n: &'static str, ts: u64| store.check_nonce(n, ts, now, 60);
        assert_eq!(check("a", now).await.unwrap(), Ok(()));
        assert_eq!(check("a", now).await.unwrap(), Err(NonceError::Replayed));
        assert_eq!(check("", now).await.unwrap(), Err(NonceError::Empty));
        assert!(matches!(
            check("late", now - 61).await.unwrap(),
            Err(NonceError::TimestampOutOfWindow { .. })
        ));
        let long: &'static str = Box::leak("x".repeat(MAX_NONCE_LEN + 1).into_boxed_str());
        assert!(matches!(
            check(long, now).await.unwrap(),
            Err(NonceError::TooLong { .. })
        ));
        // Stamped 50 s ago: remembered for the 11 s its timestamp can still pass.
        assert_eq!(check("old", now - 50).await.unwrap(), Ok(()));
        let key = format!(
            "{prefix}n:{}",
            hex::encode(Sha256::digest(b"old".as_slice()))
        );
        let ttl: i64 = store
            .run(|mut c| async move { redis::cmd("PTTL").arg(key).query_async(&mut c).await })
            .await
            .unwrap();
        assert!((1..=11_000).contains(&ttl), "{ttl}");
        cleanup(&store, &prefix).await;
    }

    #[tokio::test]
    async fn shared_sessions_follow_the_in_memory_rules() {
        let Some((store, prefix)) = redis_store("sessions") else {
            return;
        };
        let cfg = SessionConfig {
            max_sessions_per_client: 2,
            ..SessionConfig::default()
        };
        let now = SystemTime::now();
        let a = store
            .issue(&cfg, "uid:1", TokenKind::Session, now)
            .await
            .unwrap()
            .unwrap();
        let info = store
            .validate(&a.token, "uid:1", now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((info.kind, info.uses), (TokenKind::Session, 1));
        assert_eq!(info.id, a.id());
        let info = store
            .validate(&a.token, "uid:1", now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(info.uses, 2);
        // Bound to its principal; expired after its lifetime; malformed tokens never reach Redis.
        assert_eq!(
            store.validate(&a.token, "uid:2", now).await.unwrap(),
            Err(SessionError::WrongPrincipal)
        );
        let later = now + Duration::from_secs(9 * 3600);
        assert_eq!(
            store.validate(&a.token, "uid:1", later).await.unwrap(),
            Err(SessionError::Expired)
        );
        assert_eq!(
            store.validate("wdn_nothex", "uid:1", now).await.unwrap(),
            Err(SessionError::Invalid)
        );
        // The per-principal maximum counts live tokens only.
        store
            .issue(&cfg, "uid:1", TokenKind::Admin, now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store
                .issue(&cfg, "uid:1", TokenKind::Session, now)
                .await
                .unwrap()
                .unwrap_err(),
            SessionError::TooManySessions { max: 2 }
        );
        // A bootstrap token does not count, is not a session, and is redeemed once.
        let boot = store
            .issue(&cfg, "uid:1", TokenKind::Bootstrap, now)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            store.validate(&boot.token, "uid:1", now).await.unwrap(),
            Err(SessionError::WrongKind { .. })
        ));
        store.revoke(&a.token, "uid:1").await.unwrap().unwrap();
        assert_eq!(
            store.validate(&a.token, "uid:1", now).await.unwrap(),
            Err(SessionError::Invalid)
        );
        let s = store
            .replace(&cfg, &boot.token, "uid:1", now, true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.kind, TokenKind::Session);
        assert_eq!(
            store
                .replace(&cfg, &boot.token, "uid:1", now, true)
                .await
                .unwrap()
                .unwrap_err(),
            SessionError::Invalid
        );
        // Refresh keeps the kind, gives a fresh lifetime, and retires the old token.
        let r = store
            .replace(&cfg, &s.token, "uid:1", now, false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.kind, TokenKind::Session);
        assert_eq!(
            store.validate(&s.token, "uid:1", now).await.unwrap(),
            Err(SessionError::Invalid)
        );
        assert!(store
            .validate(&r.token, "uid:1", now)
            .await
            .unwrap()
            .is_ok());
        cleanup(&store, &prefix).await;
    }
}
