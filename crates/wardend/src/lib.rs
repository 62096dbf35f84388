//! # wardend — the warden daemon as a library
//!
//! Everything the `warden` binary runs when it is a daemon: the local socket, the one request
//! pipeline every transport ends in, and the pieces that pipeline is made of.
//!
//! ```text
//! bytes ─▶ framing + dialect decoder (warden-wire) ─▶ Request
//!       ─▶ Principal (identity: SO_PEERCRED/SO_PEERPIDFD + /proc attestation)
//!       ─▶ authenticate (auth: session token | HMAC + timestamp + nonce) ─▶ rate limit
//!       ─▶ authorize (policy) ─▶ service handler
//!       ─▶ audit record, durable before the reply ─▶ encode in the caller's dialect
//! ```
//!
//! Modules, one job each:
//! - [`config`]: the TOML configuration, its defaults and its validation.
//! - [`identity`]: who is on the other end of a Unix connection, from the kernel and `/proc`.
//! - [`policy`]: roles, rules and the single `decide` function.
//! - [`auth`]: session tokens, HMAC keys, the nonce store and rate limits.
//! - [`audit`]: the hash-chained, durable audit log.
//! - [`jobs`]: the job service on `warden-exec`: start, list, status, attach, stop.
//! - [`gateway`]: the network side's way into core (the [`gateway::Core`] seam).
//! - [`server`]: the socket listener, connections and the pipeline.
//! - [`privsep`] and [`monitor`]: the three processes (monitor, core, gateway) of privilege
//!   separation, and the supervision that keeps them alive.
//!
//! What it deliberately does not do: trust anything a client *says* about itself (a pid or an
//! executable in a payload), open a shell, or answer before the audit record is on disk.

pub mod audit;
pub mod auth;
pub mod commands;
pub mod config;
pub mod gateway;
pub mod hygiene;
pub mod identity;
pub mod jobs;
pub mod monitor;
pub mod policy;
pub mod privsep;
pub mod secrets;
pub mod server;
pub mod units;
pub mod upstream;
