//! Authentication state shared by every connection: HMAC key files, the nonce store, rate
//! limits and session tokens.
//!
//! Where each piece sits in the request pipeline, in order:
//!
//! 1. **authenticate** — either a session token, checked with [`SessionStore::validate`] against
//!    the principal the kernel or the certificate says is calling; or a Lumo HMAC signature made
//!    with the key from [`load_key_file`], after the request's timestamp passed the
//!    `max_request_age` check.
//! 2. **nonce** — only once the signature has verified, [`NonceStore::check_and_insert`]: forged
//!    requests never reach the store, so they can neither fill it nor burn a client's nonces.
//! 3. **rate limit** — only once the caller is authenticated, [`RateLimiter::check`] with the
//!    principal key and the request's [`RateClass`]: garbage cannot spend a client's quota.
//!    (Lumo counts before the signature check; warden deliberately does not.)
//!
//! With `[cluster] redis_url` set, all three live in Redis instead ([`cluster`]), shared by
//! every daemon that points at it; without it, in this process's memory.
//!
//! What this module does not do: verify signatures (that is `warden-wire`'s `hmac`), decide
//! who may do what (`policy`), or do I/O beyond reading and creating the key file. Every type
//! here is `Send + Sync` and takes the current time as an argument, so tests inject it.

pub mod cluster;
pub mod hmac_key;
pub mod nonce;
pub mod ratelimit;
pub mod session;

pub use hmac_key::{generate_key_file, load_key_file, KeyFileError, MAX_KEY_FILE_LEN};
pub use nonce::{NonceError, NonceStore, MAX_AGE_LIMIT, MAX_NONCE_LEN};
pub use ratelimit::{
    Rate, RateClass, RateDecision, RateLimiter, RateLimits, RateParseError, MAX_RATE_WINDOW,
};
pub use session::{
    Issued, SessionConfig, SessionError, SessionInfo, SessionStore, TokenKind, EXPIRED_RETENTION,
    MAX_TTL,
};
