//! Session tokens: opaque, random, short-lived, bound to the principal that obtained them.
//!
//! - A token is `"wdn_"` followed by 64 lowercase hex digits: 32 bytes from the operating
//!   system's random source.
//! - The store keeps only SHA-256(token). A memory dump or a log line never yields a usable
//!   token, and the public id (the first 12 hex digits of that hash) is safe to log.
//! - Lookup is by that hash, not by comparing tokens, so there is no comparison whose timing
//!   depends on how much of a secret token a guess got right: the timing of a hash-table lookup
//!   tells an attacker at most something about SHA-256 of their own guess, which they can
//!   compute anyway and cannot steer toward a real token's hash.
//! - A token is bound to the principal it was issued to (`"uid:1000"`, `"cert:…"`); presented by
//!   anyone else it is refused ([`SessionError::WrongPrincipal`]) and stays valid for its owner,
//!   so a thief cannot revoke it either.
//! - Kinds: [`TokenKind::Session`] (default 8 h), [`TokenKind::Admin`] (15 min) and
//!   [`TokenKind::Bootstrap`] (1 h), which is good for exactly one thing: being redeemed once,
//!   by its principal, for a session ([`SessionStore::redeem_bootstrap`]).
//! - A principal holds at most `max_sessions_per_client` live session and admin tokens.
//! - Expired tokens are remembered (by hash) for [`EXPIRED_RETENTION`] so that the error says
//!   "expired" rather than "invalid", then forgotten. Revoked tokens are forgotten at once.

use parking_lot::{Mutex, RwLock};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime};
use zeroize::Zeroizing;

/// How long an expired token's hash is kept so that using it reports [`SessionError::Expired`].
pub const EXPIRED_RETENTION: Duration = Duration::from_secs(3600);
/// Longest lifetime any token gets, whatever the configuration says.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 86400);

const TOKEN_PREFIX: &str = "wdn_";
const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 64;
const SHARDS: usize = 16;
/// How often `issue` sweeps out tokens past their retention.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Session,
    Admin,
    Bootstrap,
}

/// Lifetimes and limits, reloadable with [`SessionStore::set_config`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    pub session_ttl: Duration,
    pub admin_ttl: Duration,
    pub bootstrap_ttl: Duration,
    /// Live session + admin tokens one principal may hold (bootstrap tokens do not count).
    pub max_sessions_per_client: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            session_ttl: Duration::from_secs(8 * 3600),
            admin_ttl: Duration::from_secs(15 * 60),
            bootstrap_ttl: Duration::from_secs(3600),
            max_sessions_per_client: 10,
        }
    }
}

impl SessionConfig {
    /// The lifetime of a new token of `kind`, capped at [`MAX_TTL`].
    pub fn ttl(&self, kind: TokenKind) -> Duration {
        match kind {
            TokenKind::Session => self.session_ttl,
            TokenKind::Admin => self.admin_ttl,
            TokenKind::Bootstrap => self.bootstrap_ttl,
        }
        .min(MAX_TTL)
    }
}

/// A freshly issued token. Hand `token` to the client once; it is not stored anywhere.
pub struct Issued {
    pub token: Zeroizing<String>,
    pub expires_at: SystemTime,
    pub kind: TokenKind,
}

impl Issued {
    /// The token's public id (safe to log).
    pub fn id(&self) -> String {
        public_id(&digest(&self.token))
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("id", &self.id())
            .field("expires_at", &self.expires_at)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// What a valid token stands for. Contains no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// First 12 hex digits of SHA-256(token): identifies the token in logs and audit records.
    pub id: String,
    pub kind: TokenKind,
    /// The principal key the token was issued to.
    pub bound_to: String,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    /// This use.
    pub last_used: SystemTime,
    /// Uses including this one.
    pub uses: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the token is not valid (unknown, malformed or logged out): authenticate again")]
    Invalid,
    #[error("the token has expired: authenticate again, or refresh tokens before they expire")]
    Expired,
    #[error("the token was issued to another client and cannot be used by this one")]
    WrongPrincipal,
    #[error(
        "this client already holds {max} live tokens: log out of one or wait for one to expire"
    )]
    TooManySessions { max: usize },
    #[error("a {found:?} token cannot be used here (expected a {expected})")]
    WrongKind {
        expected: &'static str,
        found: TokenKind,
    },
    #[error("could not read the system's random source to make a token: {0}")]
    Entropy(String),
}

type Digest = [u8; 32];

struct Entry {
    bound_to: Box<str>,
    kind: TokenKind,
    created_at: SystemTime,
    expires_at: SystemTime,
    last_used: SystemTime,
    uses: u64,
}

/// All tokens, shared by every connection.
pub struct SessionStore {
    config: RwLock<SessionConfig>,
    /// Token hash → entry, sharded by the hash so that validations rarely wait on each other.
    shards: Box<[Mutex<HashMap<Digest, Entry>>]>,
    /// Principal → hashes of its session and admin tokens, for the per-client maximum. Taken
    /// before any shard lock, and only by the rare operations that create or remove tokens.
    principals: Mutex<Principals>,
}

struct Principals {
    tokens: HashMap<Box<str>, Vec<Digest>>,
    next_sweep: Option<SystemTime>,
}

impl SessionStore {
    pub fn new(cfg: SessionConfig) -> Self {
        SessionStore {
            config: RwLock::new(cfg),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            principals: Mutex::new(Principals {
                tokens: HashMap::new(),
                next_sweep: None,
            }),
        }
    }

    /// New lifetimes apply to tokens issued from now on; the new maximum to the next `issue`.
    pub fn set_config(&self, cfg: SessionConfig) {
        *self.config.write() = cfg;
    }

    pub fn config(&self) -> SessionConfig {
        self.config.read().clone()
    }

    /// Issues a token of `kind` bound to the principal key `bound_to`.
    pub fn issue(
        &self,
        bound_to: &str,
        kind: TokenKind,
        now: SystemTime,
    ) -> Result<Issued, SessionError> {
        let cfg = self.config();
        let mut principals = self.principals.lock();
        self.sweep_if_due(&mut principals, now);
        if kind != TokenKind::Bootstrap {
            let held = self.live_tokens_of(&mut principals, bound_to, now);
            if held >= cfg.max_sessions_per_client {
                return Err(SessionError::TooManySessions {
                    max: cfg.max_sessions_per_client,
                });
            }
        }
        self.insert_new(&mut principals, bound_to, kind, now, &cfg)
    }

    /// Checks `token` presented by the principal `presenter` and records the use.
    pub fn validate(
        &self,
        token: &str,
        presenter: &str,
        now: SystemTime,
    ) -> Result<SessionInfo, SessionError> {
        let digest = parse(token)?;
        let mut shard = self.shard(&digest).lock();
        let entry = usable(&mut shard, &digest, presenter, now)?;
        if entry.kind == TokenKind::Bootstrap {
            return Err(SessionError::WrongKind {
                expected: "session or admin token",
                found: TokenKind::Bootstrap,
            });
        }
        entry.uses += 1;
        entry.last_used = now;
        Ok(SessionInfo {
            id: public_id(&digest),
            kind: entry.kind,
            bound_to: entry.bound_to.to_string(),
            created_at: entry.created_at,
            expires_at: entry.expires_at,
            last_used: entry.last_used,
            uses: entry.uses,
        })
    }

    /// Replaces a live session or admin token with a new one of the same kind and a fresh
    /// lifetime; the old token stops working.
    pub fn refresh(
        &self,
        token: &str,
        presenter: &str,
        now: SystemTime,
    ) -> Result<Issued, SessionError> {
        let digest = parse(token)?;
        let cfg = self.config();
        let mut principals = self.principals.lock();
        let kind = {
            let mut shard = self.shard(&digest).lock();
            let kind = usable(&mut shard, &digest, presenter, now)?.kind;
            if kind == TokenKind::Bootstrap {
                return Err(SessionError::WrongKind {
                    expected: "session or admin token",
                    found: kind,
                });
            }
            shard.remove(&digest);
            kind
        };
        forget(&mut principals, presenter, &digest);
        self.insert_new(&mut principals, presenter, kind, now, &cfg)
    }

    /// Logs a token out. Expired tokens may be revoked too; unknown ones are `Invalid`.
    pub fn revoke(&self, token: &str, presenter: &str) -> Result<(), SessionError> {
        let digest = parse(token)?;
        let mut principals = self.principals.lock();
        {
            let mut shard = self.shard(&digest).lock();
            let entry = shard.get(&digest).ok_or(SessionError::Invalid)?;
            if *entry.bound_to != *presenter {
                return Err(SessionError::WrongPrincipal);
            }
            shard.remove(&digest);
        }
        forget(&mut principals, presenter, &digest);
        Ok(())
    }

    /// Consumes a bootstrap token and issues a session for the same principal. The bootstrap
    /// token is consumed only if the session can be issued.
    pub fn redeem_bootstrap(
        &self,
        token: &str,
        presenter: &str,
        now: SystemTime,
    ) -> Result<Issued, SessionError> {
        let digest = parse(token)?;
        let cfg = self.config();
        let mut principals = self.principals.lock();
        {
            let mut shard = self.shard(&digest).lock();
            let kind = usable(&mut shard, &digest, presenter, now)?.kind;
            if kind != TokenKind::Bootstrap {
                return Err(SessionError::WrongKind {
                    expected: "bootstrap token",
                    found: kind,
                });
            }
        }
        // Counting locks the shards of the presenter's tokens, one of which may be the bootstrap
        // token's own: its lock must not be held here (the mutex is not reentrant).
        if self.live_tokens_of(&mut principals, presenter, now) >= cfg.max_sessions_per_client {
            return Err(SessionError::TooManySessions {
                max: cfg.max_sessions_per_client,
            });
        }
        // Still under the principals lock, which every other remover takes first: the token is
        // there unless it just passed its retention.
        if self.shard(&digest).lock().remove(&digest).is_none() {
            return Err(SessionError::Invalid);
        }
        self.insert_new(&mut principals, presenter, TokenKind::Session, now, &cfg)
    }

    /// Tokens of any kind that have not expired (for `health` and metrics).
    pub fn live_count(&self) -> usize {
        let now = SystemTime::now();
        self.shards
            .iter()
            .map(|s| s.lock().values().filter(|e| e.expires_at > now).count())
            .sum()
    }

    /// Forgets every token whose retention has passed. `issue` does this at most once a minute;
    /// a daemon may also call it from a timer.
    pub fn purge_expired(&self, now: SystemTime) {
        let mut principals = self.principals.lock();
        self.purge(&mut principals, now);
    }

    fn sweep_if_due(&self, principals: &mut Principals, now: SystemTime) {
        if principals.next_sweep.is_some_and(|t| now < t) {
            return;
        }
        self.purge(principals, now);
    }

    fn purge(&self, principals: &mut Principals, now: SystemTime) {
        for shard in self.shards.iter() {
            shard.lock().retain(|_, e| !past_retention(e, now));
        }
        principals.tokens.retain(|_, list| {
            list.retain(|d| self.shard(d).lock().contains_key(d));
            !list.is_empty()
        });
        principals.next_sweep = now.checked_add(SWEEP_EVERY);
    }

    /// Live session/admin tokens held by `principal`, dropping hashes of expired or removed
    /// tokens from its list on the way.
    fn live_tokens_of(
        &self,
        principals: &mut Principals,
        principal: &str,
        now: SystemTime,
    ) -> usize {
        let Some(list) = principals.tokens.get_mut(principal) else {
            return 0;
        };
        list.retain(|d| {
            self.shard(d)
                .lock()
                .get(d)
                .is_some_and(|e| e.expires_at > now)
        });
        list.len()
    }

    fn insert_new(
        &self,
        principals: &mut Principals,
        bound_to: &str,
        kind: TokenKind,
        now: SystemTime,
        cfg: &SessionConfig,
    ) -> Result<Issued, SessionError> {
        let token = new_token()?;
        let digest = digest(&token);
        // A leap of the clock to the end of time cannot make the expiry overflow.
        let expires_at = now.checked_add(cfg.ttl(kind)).unwrap_or(now);
        self.shard(&digest).lock().insert(
            digest,
            Entry {
                bound_to: bound_to.into(),
                kind,
                created_at: now,
                expires_at,
                last_used: now,
                uses: 0,
            },
        );
        if kind != TokenKind::Bootstrap {
            match principals.tokens.get_mut(bound_to) {
                Some(list) => list.push(digest),
                None => {
                    principals.tokens.insert(bound_to.into(), vec![digest]);
                }
            }
        }
        Ok(Issued {
            token,
            expires_at,
            kind,
        })
    }

    fn shard(&self, digest: &Digest) -> &Mutex<HashMap<Digest, Entry>> {
        &self.shards[usize::from(digest[0]) % SHARDS]
    }
}

impl fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionStore")
            .field("config", &*self.config.read())
            .finish_non_exhaustive()
    }
}

/// The entry for `digest` if `presenter` may use it at `now`; drops it once past retention.
fn usable<'a>(
    shard: &'a mut HashMap<Digest, Entry>,
    digest: &Digest,
    presenter: &str,
    now: SystemTime,
) -> Result<&'a mut Entry, SessionError> {
    let entry = shard.get(digest).ok_or(SessionError::Invalid)?;
    if past_retention(entry, now) {
        shard.remove(digest);
        return Err(SessionError::Invalid);
    }
    let entry = shard.get_mut(digest).ok_or(SessionError::Invalid)?;
    // The binding is checked first: whoever presents someone else's token learns nothing more.
    if *entry.bound_to != *presenter {
        return Err(SessionError::WrongPrincipal);
    }
    if entry.expires_at <= now {
        return Err(SessionError::Expired);
    }
    Ok(entry)
}

fn past_retention(e: &Entry, now: SystemTime) -> bool {
    e.expires_at
        .checked_add(EXPIRED_RETENTION)
        .is_some_and(|t| t <= now)
}

fn forget(principals: &mut Principals, principal: &str, digest: &Digest) {
    if let Some(list) = principals.tokens.get_mut(principal) {
        list.retain(|d| d != digest);
        if list.is_empty() {
            principals.tokens.remove(principal);
        }
    }
}

/// The hash of a well-formed token; anything else is `Invalid` without being hashed.
pub(crate) fn parse(token: &str) -> Result<Digest, SessionError> {
    let well_formed = token.len() == TOKEN_LEN
        && token.starts_with(TOKEN_PREFIX)
        && token[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if well_formed {
        Ok(digest(token))
    } else {
        Err(SessionError::Invalid)
    }
}

pub(crate) fn digest(token: &str) -> Digest {
    Sha256::digest(token.as_bytes()).into()
}

pub(crate) fn public_id(digest: &Digest) -> String {
    hex::encode(&digest[..6])
}

pub(crate) fn new_token() -> Result<Zeroizing<String>, SessionError> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(&mut bytes[..]).map_err(|e| SessionError::Entropy(e.to_string()))?;
    // Built in place at its final capacity, so no copy of the token is left behind by a
    // reallocation.
    let mut token = Zeroizing::new(String::with_capacity(TOKEN_LEN));
    token.push_str(TOKEN_PREFIX);
    for b in bytes.iter() {
        token.push(char::from(HEX[usize::from(b >> 4)]));
        token.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    const ALICE: &str = "uid:1000";
    const MALLORY: &str = "uid:1001";

    fn store() -> SessionStore {
        SessionStore::new(SessionConfig::default())
    }

    fn t0() -> SystemTime {
        SystemTime::now()
    }

    fn mins(m: u64) -> Duration {
        Duration::from_secs(60 * m)
    }

    #[test]
    fn issued_token_validates_for_its_principal_and_counts_uses() {
        let s = store();
        let now = t0();
        let issued = s.issue(ALICE, TokenKind::Session, now).unwrap();
        assert_eq!(issued.token.len(), 68);
        assert!(issued.token.starts_with("wdn_"));
        let info = s.validate(&issued.token, ALICE, now + mins(1)).unwrap();
        assert_eq!(info.kind, TokenKind::Session);
        assert_eq!(info.bound_to, ALICE);
        assert_eq!(info.created_at, now);
        assert_eq!(info.expires_at, issued.expires_at);
        assert_eq!(info.last_used, now + mins(1));
        assert_eq!(info.uses, 1);
        assert_eq!(info.id, issued.id());
        assert_eq!(info.id.len(), 12);
        assert!(
            !issued.token.contains(&info.id),
            "the id is not a piece of the token"
        );
        assert_eq!(
            s.validate(&issued.token, ALICE, now + mins(2))
                .unwrap()
                .uses,
            2
        );
        assert_eq!(s.live_count(), 1);
    }

    #[test]
    fn tokens_are_unique() {
        let s = store();
        let a = s.issue(ALICE, TokenKind::Bootstrap, t0()).unwrap();
        let b = s.issue(ALICE, TokenKind::Bootstrap, t0()).unwrap();
        assert_ne!(*a.token, *b.token);
    }

    #[test]
    fn each_kind_gets_its_own_lifetime() {
        let s = store();
        let now = t0();
        for (kind, ttl) in [
            (TokenKind::Session, Duration::from_secs(8 * 3600)),
            (TokenKind::Admin, mins(15)),
            (TokenKind::Bootstrap, mins(60)),
        ] {
            let issued = s.issue(ALICE, kind, now).unwrap();
            assert_eq!(issued.kind, kind);
            assert_eq!(
                issued.expires_at.duration_since(now).unwrap(),
                ttl,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn expired_token_is_reported_as_expired_then_forgotten() {
        let s = store();
        let now = t0();
        let admin = s.issue(ALICE, TokenKind::Admin, now).unwrap();
        assert!(s
            .validate(&admin.token, ALICE, now + mins(15) - Duration::from_secs(1))
            .is_ok());
        assert_eq!(
            s.validate(&admin.token, ALICE, now + mins(15)),
            Err(SessionError::Expired)
        );
        assert_eq!(
            s.validate(&admin.token, ALICE, now + mins(74)),
            Err(SessionError::Expired)
        );
        assert_eq!(
            s.validate(&admin.token, ALICE, now + mins(75)),
            Err(SessionError::Invalid)
        );
        assert_eq!(
            s.validate(&admin.token, ALICE, now + mins(16)),
            Err(SessionError::Invalid)
        );
    }

    #[test]
    fn unknown_malformed_and_logged_out_tokens_are_invalid() {
        let s = store();
        let now = t0();
        let unknown = format!("wdn_{}", "ab".repeat(32));
        for bad in [
            "",
            "wdn_",
            "Bearer x",
            &unknown,
            &unknown.to_uppercase(),
            &format!("{unknown}0"),
        ] {
            assert_eq!(
                s.validate(bad, ALICE, now),
                Err(SessionError::Invalid),
                "{bad}"
            );
        }
        let issued = s.issue(ALICE, TokenKind::Session, now).unwrap();
        s.revoke(&issued.token, ALICE).unwrap();
        assert_eq!(
            s.validate(&issued.token, ALICE, now),
            Err(SessionError::Invalid)
        );
        assert_eq!(s.revoke(&issued.token, ALICE), Err(SessionError::Invalid));
    }

    #[test]
    fn wrong_principal_is_refused_and_does_not_revoke() {
        let s = store();
        let now = t0();
        let issued = s.issue(ALICE, TokenKind::Session, now).unwrap();
        assert_eq!(
            s.validate(&issued.token, MALLORY, now),
            Err(SessionError::WrongPrincipal)
        );
        assert_eq!(
            s.refresh(&issued.token, MALLORY, now).unwrap_err(),
            SessionError::WrongPrincipal
        );
        assert_eq!(
            s.revoke(&issued.token, MALLORY),
            Err(SessionError::WrongPrincipal)
        );
        let info = s.validate(&issued.token, ALICE, now).unwrap();
        assert_eq!(info.uses, 1, "refused presentations are not uses");
    }

    #[test]
    fn per_client_maximum_counts_live_session_and_admin_tokens() {
        let s = SessionStore::new(SessionConfig {
            max_sessions_per_client: 3,
            ..SessionConfig::default()
        });
        let now = t0();
        let admin = s.issue(ALICE, TokenKind::Admin, now).unwrap();
        let first = s.issue(ALICE, TokenKind::Session, now).unwrap();
        s.issue(ALICE, TokenKind::Session, now).unwrap();
        assert_eq!(
            s.issue(ALICE, TokenKind::Session, now).unwrap_err(),
            SessionError::TooManySessions { max: 3 }
        );
        // Bootstrap tokens neither count nor are refused; other principals are unaffected.
        s.issue(ALICE, TokenKind::Bootstrap, now).unwrap();
        s.issue(MALLORY, TokenKind::Session, now).unwrap();
        // Logging out frees a place ...
        s.revoke(&first.token, ALICE).unwrap();
        s.issue(ALICE, TokenKind::Session, now).unwrap();
        assert!(s.issue(ALICE, TokenKind::Session, now).is_err());
        // ... and so does expiry, even while the expired token is still remembered.
        let later = now + mins(16);
        assert_eq!(
            s.validate(&admin.token, ALICE, later),
            Err(SessionError::Expired)
        );
        s.issue(ALICE, TokenKind::Session, later).unwrap();
        assert!(s.issue(ALICE, TokenKind::Session, later).is_err());
        // A lower maximum after reload applies to the next issue.
        s.set_config(SessionConfig {
            max_sessions_per_client: 1,
            ..SessionConfig::default()
        });
        assert_eq!(
            s.issue(MALLORY, TokenKind::Session, later).unwrap_err(),
            SessionError::TooManySessions { max: 1 }
        );
    }

    #[test]
    fn concurrent_issues_never_exceed_the_maximum() {
        let s = Arc::new(store());
        let barrier = Arc::new(Barrier::new(16));
        let now = t0();
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (s, b) = (Arc::clone(&s), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    b.wait();
                    s.issue(ALICE, TokenKind::Session, now).is_ok()
                })
            })
            .collect();
        let ok = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert_eq!(ok, 10);
    }

    #[test]
    fn bootstrap_token_is_redeemed_once_for_a_session() {
        let s = store();
        let now = t0();
        let boot = s.issue(ALICE, TokenKind::Bootstrap, now).unwrap();
        // It is not a session token.
        assert!(matches!(
            s.validate(&boot.token, ALICE, now),
            Err(SessionError::WrongKind {
                found: TokenKind::Bootstrap,
                ..
            })
        ));
        assert!(matches!(
            s.refresh(&boot.token, ALICE, now),
            Err(SessionError::WrongKind { .. })
        ));
        // Only its principal may redeem it, and a refused attempt does not consume it.
        assert_eq!(
            s.redeem_bootstrap(&boot.token, MALLORY, now).unwrap_err(),
            SessionError::WrongPrincipal
        );
        let session = s
            .redeem_bootstrap(&boot.token, ALICE, now + mins(1))
            .unwrap();
        assert_eq!(session.kind, TokenKind::Session);
        assert_eq!(
            s.validate(&session.token, ALICE, now + mins(1))
                .unwrap()
                .kind,
            TokenKind::Session
        );
        assert_eq!(
            s.redeem_bootstrap(&boot.token, ALICE, now + mins(1))
                .unwrap_err(),
            SessionError::Invalid
        );
        // A session token cannot be redeemed; an expired bootstrap cannot either.
        assert!(matches!(
            s.redeem_bootstrap(&session.token, ALICE, now),
            Err(SessionError::WrongKind {
                found: TokenKind::Session,
                ..
            })
        ));
        let old = s.issue(ALICE, TokenKind::Bootstrap, now).unwrap();
        assert_eq!(
            s.redeem_bootstrap(&old.token, ALICE, now + mins(60))
                .unwrap_err(),
            SessionError::Expired
        );
    }

    #[test]
    fn bootstrap_is_not_consumed_when_the_client_is_at_its_maximum() {
        let s = SessionStore::new(SessionConfig {
            max_sessions_per_client: 1,
            ..SessionConfig::default()
        });
        let now = t0();
        let boot = s.issue(ALICE, TokenKind::Bootstrap, now).unwrap();
        let session = s.issue(ALICE, TokenKind::Session, now).unwrap();
        assert_eq!(
            s.redeem_bootstrap(&boot.token, ALICE, now).unwrap_err(),
            SessionError::TooManySessions { max: 1 }
        );
        s.revoke(&session.token, ALICE).unwrap();
        assert!(s.redeem_bootstrap(&boot.token, ALICE, now).is_ok());
    }

    #[test]
    fn refresh_issues_a_new_token_of_the_same_kind_and_revokes_the_old() {
        let s = SessionStore::new(SessionConfig {
            max_sessions_per_client: 1,
            ..SessionConfig::default()
        });
        let now = t0();
        let old = s.issue(ALICE, TokenKind::Admin, now).unwrap();
        // At the maximum, refreshing still works: it replaces a token, it does not add one.
        let new = s.refresh(&old.token, ALICE, now + mins(10)).unwrap();
        assert_eq!(new.kind, TokenKind::Admin);
        assert_eq!(new.expires_at, now + mins(25));
        assert_ne!(*new.token, *old.token);
        assert_eq!(
            s.validate(&old.token, ALICE, now + mins(11)),
            Err(SessionError::Invalid)
        );
        assert!(s.validate(&new.token, ALICE, now + mins(11)).is_ok());
        assert_eq!(
            s.refresh(&new.token, ALICE, now + mins(25)).unwrap_err(),
            SessionError::Expired
        );
    }

    #[test]
    fn reload_changes_lifetimes_of_new_tokens_only() {
        let s = store();
        let now = t0();
        let before = s.issue(ALICE, TokenKind::Session, now).unwrap();
        s.set_config(SessionConfig {
            session_ttl: mins(5),
            ..SessionConfig::default()
        });
        let after = s.issue(ALICE, TokenKind::Session, now).unwrap();
        assert_eq!(after.expires_at, now + mins(5));
        assert_eq!(before.expires_at, now + Duration::from_secs(8 * 3600));
    }

    #[test]
    fn purge_forgets_tokens_past_retention() {
        let s = store();
        let now = t0();
        let admin = s.issue(ALICE, TokenKind::Admin, now).unwrap();
        s.issue(ALICE, TokenKind::Session, now).unwrap();
        s.purge_expired(now + mins(15 + 60));
        assert_eq!(s.shards.iter().map(|m| m.lock().len()).sum::<usize>(), 1);
        assert_eq!(s.principals.lock().tokens[ALICE].len(), 1);
        assert_eq!(
            s.validate(&admin.token, ALICE, now + mins(16)),
            Err(SessionError::Invalid)
        );
    }

    #[test]
    fn debug_output_never_contains_a_token() {
        let s = store();
        let issued = s.issue(ALICE, TokenKind::Session, t0()).unwrap();
        let shown = format!("{issued:?} {s:?}");
        assert!(!shown.contains(&issued.token[4..]), "{shown}");
        assert!(shown.contains(&issued.id()));
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SessionStore>();
    }
}
