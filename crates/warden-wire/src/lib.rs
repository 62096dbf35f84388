//! warden's wire formats: the bytes that travel over warden's local socket, and nothing else.
//!
//! warden's socket speaks two existing dialects, so that their clients work unchanged, plus
//! warden's own extension of one of them (see `PROTOCOLS.md`):
//!
//! - **Lumo** (`{"command", "params", "timestamp", "nonce", "signature"}`), authenticated by an
//!   HMAC-SHA256 over the command, the params, the timestamp and the nonce;
//! - **securityd** (`{"action", "token", "params"}`), authenticated by a session token, which
//!   warden extends with an `id` echoed in replies and streamed replies.
//!
//! Either dialect may use newline-delimited JSON or 4-byte length-prefixed frames, told apart by
//! the first byte of the connection.
//!
//! This crate is *sans-I/O*, like the protocol core of rustls: callers feed it bytes and get
//! messages back, and hand it messages to get bytes. That keeps every codec testable (and
//! fuzzable) without sockets, and keeps the parsing rules in one place shared by the daemon, the
//! CLI, the client library and the benchmark.
//!
//! | module | what it does |
//! |---|---|
//! | [`framing`] | splits a byte stream into frames ([`framing::FrameDecoder`]) and writes frames |
//! | [`envelope`] | turns one frame into a [`envelope::Request`] of either dialect |
//! | [`canonical`] | Lumo's canonical (sorted-key) encoding of `params`, the form Lumo signs |
//! | [`hmac`] | Lumo signatures: signing and constant-time verification |
//! | [`reply`] | error codes and the reply shapes of both dialects |
//!
//! # What it deliberately does not do
//!
//! - **No I/O, no clocks, no state across requests.** Reading sockets, checking that a timestamp
//!   is fresh, remembering nonces and rate limiting belong to the daemon; this crate only says
//!   whether a signature is right. A codec that cannot block or allocate unboundedly is easier to
//!   reason about than one that can.
//! - **No method names or parameter validation.** Which commands exist, their aliases and their
//!   parameters are the daemon's; the envelope carries the method name and the params as they
//!   came. Two places knowing the command list would drift apart.
//! - **No leniency in parsing.** A request whose JSON has duplicate object keys (at any depth),
//!   is not UTF-8, nests deeper than [`MAX_DEPTH`] levels or has trailing bytes is refused, although Lumo's
//!   own parser would take the last duplicate. Two parsers that disagree about what a message says
//!   are an attack surface (one checks the signature over one reading, the other acts on another).
//! - **No `unsafe`.** Everything here handles bytes from unauthenticated peers.
//!
//! # Known differences from Lumo's canonical form
//!
//! The canonical form reproduces Lumo's (Python's `json.dumps(sort_keys=True, ...)`) for every
//! value serde_json can represent exactly. Two inputs cannot be: integers beyond the 64-bit range
//! (serde_json reads them as floats) and the integer `-0` (read as the float `-0.0`). A client
//! that sends such params must sign the params bytes as sent, which warden also accepts.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod canonical;
pub mod envelope;
pub mod framing;
pub mod hmac;
pub mod reply;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;

pub use canonical::lumo_canonical;
pub use envelope::{decode_request, Credential, DecodeError, DecodeFailure, Dialect, Request};
pub use framing::{encode_frame, FrameDecoder, FrameError, Framing};
pub use hmac::{sign, sign_hex, signing_string, verify_lumo, verify_lumo_with, HmacKey};
pub use reply::{encode_lumo, encode_securityd, ErrorBody, ErrorCode};

/// How deep arrays and objects may nest within one value of a request (each field's value,
/// e.g. `params`, counted from itself); deeper is [`DecodeError::TooDeep`]. This is what
/// serde_json's recursion limit of 128 allows.
pub const MAX_DEPTH: usize = 127;
