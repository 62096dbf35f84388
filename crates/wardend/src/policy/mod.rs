//! Roles, rules and the one function that answers "may this principal do this".
//!
//! ```toml
//! [policy.roles.reader]
//! allow = ["secrets:read:db_*", "system:*"]
//! deny  = ["secrets:read:db_root"]
//!
//! [[policy.rules]]
//! user = "www-data"
//! exe = "/usr/sbin/php-fpm*"
//! roles = ["reader"]
//! ```
//!
//! A *permission* is a string `area:verb:resource` (`secrets:read:db_main`,
//! `commands:service.restart`, `admin:reload`). A *role* has allow and deny patterns: globs in
//! which `*` matches any characters, `:` and `.` included. A *rule* gives roles to the principals
//! that match all of its selectors. [`Policy::grants`] matches the rules once per connection;
//! [`Policy::decide`] then answers each request: a deny in any held role wins, then an allow,
//! else deny.
//!
//! What it deliberately does not do:
//! - no I/O and no caching: the same inputs give the same answer, and nothing grows with traffic;
//! - no knowledge of services: a permission is an opaque string to match, so adding a command
//!   does not touch this module;
//! - no implicit access: a principal matching no rule gets nothing, a rule without selectors is
//!   refused (write `any = true` to mean everyone), and rule order matters only for choosing the
//!   HMAC key file;
//! - no trust in local selectors for remote callers: `uid`, `user`, `exe`, … match only local
//!   peers; `cert_cn`, `cert_id` and `cert_san` only
//!   certificate peers.

mod config;
mod engine;
mod patterns;

pub use config::{OneOrMany, PolicyConfig, RoleConfig, RuleConfig};
pub use engine::{Decision, DenyReason, Grants, Policy};

use std::path::PathBuf;

/// Why a policy was refused. Each names the rule (its index in `[[policy.rules]]`, from 0) or
/// the role, and says what to change.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy.rules[{rule}] names role `{role}`, which is not defined: add [policy.roles.{role}] or remove it from the rule")]
    UnknownRole { rule: usize, role: String },
    #[error("policy.rules[{rule}] has no selector, so it would match every caller: add one (uid, user, group, gid, exe, exe_sha256, unit, parent_exe, cert_cn, cert_id, cert_san) or write `any = true` if everyone is meant")]
    EmptyRule { rule: usize },
    #[error("policy.rules[{rule}] has `any = true` and selectors; `any` matches every caller, so remove one or the other")]
    AnyWithSelectors { rule: usize },
    #[error("policy.rules[{rule}].{field} is an empty list and could never match: remove it or give it a value")]
    EmptySelector { rule: usize, field: &'static str },
    #[error("policy.rules[{rule}] grants no role and names no hmac_key_file, so it does nothing: list at least one role")]
    GrantsNothing { rule: usize },
    #[error("policy.rules[{rule}].{field}: bad glob `{pattern}`: {source}")]
    BadRuleGlob {
        rule: usize,
        field: &'static str,
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error(
        "policy.rules[{rule}].{field}: `{value}` is not a SHA-256 in hex (64 characters 0-9, a-f)"
    )]
    BadHash {
        rule: usize,
        field: &'static str,
        value: String,
    },
    #[error("policy.rules[{rule}].hmac_key_file `{}` is relative: write an absolute path", path.display())]
    RelativeKeyFile { rule: usize, path: PathBuf },
    #[error("policy.roles.{role}.{list}: bad pattern `{pattern}`: {source}")]
    BadRolePattern {
        role: String,
        list: &'static str,
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("policy.roles.{role}.{list} contains an empty pattern, which matches no permission: remove it")]
    EmptyPattern { role: String, list: &'static str },
}

#[cfg(test)]
mod tests;
