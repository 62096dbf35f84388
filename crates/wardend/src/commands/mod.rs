//! # commands — privileged operations for web panels (the Lumo command set)
//!
//! An unprivileged panel asks warden to do system administration on its behalf: write a file
//! under `/var/www/`, restart `nginx`, create a database. This module is the part that decides
//! whether such a request is acceptable and then carries it out, without a shell:
//!
//! - [`validate`]: one validator per kind of parameter (paths, names, domains, e-mail, modes,
//!   owners), each refusing with a typed error that says what was expected.
//! - [`allowlist`]: [`CommandsConfig`], the allowlists and limits from configuration, with
//!   Lumo's defaults.
//! - [`exec`]: the subprocess executor (explicit argv, cleared environment, fixed `PATH`, stdin
//!   for secrets, timeout that kills the whole process group, bounded output) and [`Plan`], the
//!   description of what a command would do, returned by `dry_run`.
//! - [`files`]: file operations done relative to directories opened component by component with
//!   `O_NOFOLLOW`, so a symlink swapped in after validation cannot redirect them.
//! - [`registry`]: the [`Command`] trait, the [`Registry`] and the command implementations.
//!
//! What it deliberately does not do: authenticate or authorize (the request pipeline does that
//! before a command is looked up), write the audit log (it hands the pipeline a redacted view of
//! the parameters, [`registry::Validated::audit_params`]), or ever run `sh -c`.
//!
//! There is no `unsafe` here: the system calls go through `nix` and `std`.

#![forbid(unsafe_code)]

pub mod allowlist;
pub mod exec;
pub mod files;
pub mod registry;
pub mod service;
pub mod validate;

pub use allowlist::CommandsConfig;
pub use exec::{CommandSpec, ExecOutput, Executor, Plan, Step};
pub use registry::{Command, CommandInfo, ExecContext, Registry, Validated};

use serde::Serialize;
use serde_json::Value;
use std::fmt;

/// Error codes a command can return, as they appear on the wire (`error.code`).
pub mod codes {
    /// A parameter is missing, malformed, outside an allowlist, or the command is unknown.
    pub const VALIDATION_ERROR: &str = "VALIDATION_ERROR";
    /// The operation was attempted and failed (a tool exited non-zero, a system call failed).
    pub const EXECUTION_ERROR: &str = "EXECUTION_ERROR";
    /// The target already exists and the command does not replace it.
    pub const FILE_EXISTS: &str = "FILE_EXISTS";
    /// The target (or its parent directory) does not exist.
    pub const NOT_FOUND: &str = "NOT_FOUND";
    /// A subprocess ran longer than its timeout; its whole process group was killed.
    pub const TIMEOUT: &str = "TIMEOUT";
    /// A bug in warden, not in the request.
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
    /// `user.create` of a user that exists.
    pub const USER_EXISTS: &str = "USER_EXISTS";
    /// `nginx.*` of a site that is not in `sites-available` (or not enabled, to disable it).
    pub const SITE_NOT_FOUND: &str = "SITE_NOT_FOUND";
    /// `nginx -t` rejected the configuration.
    pub const CONFIG_INVALID: &str = "CONFIG_INVALID";
}

/// What a command returns when it fails. `message` is for humans and never contains file
/// contents, passwords or keys; `details` carries machine-readable context (the field at fault,
/// an exit code, a bounded excerpt of a tool's stderr).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandError {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl CommandError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        CommandError {
            code,
            message: message.into(),
            details: None,
        }
    }
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(codes::VALIDATION_ERROR, message)
    }
    pub fn execution(message: impl Into<String>) -> Self {
        Self::new(codes::EXECUTION_ERROR, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(codes::NOT_FOUND, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(codes::INTERNAL_ERROR, message)
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for CommandError {}
