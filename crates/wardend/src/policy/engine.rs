//! The compiled policy: rules matched once per connection ([`Policy::grants`]), permissions
//! decided per request ([`Policy::decide`]).

use super::config::{OneOrMany, PolicyConfig, RuleConfig};
use super::patterns::{glob_set, suffix_under, GlobKind};
use super::PolicyError;
use crate::identity::{Principal, Transport};
use globset::{Candidate, GlobSet};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Each compiled policy gets its own number, so grants computed under another one are refused.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// A checked, compiled policy. Cheap to share (`Send + Sync`); replace it whole on reload.
#[derive(Debug)]
pub struct Policy {
    generation: u64,
    roles: Vec<Role>,
    rules: Vec<Rule>,
}

// One policy is shared by every connection; grants are kept per connection across tasks.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Policy>();
    send_sync::<Grants>();
};

#[derive(Debug)]
struct Role {
    name: String,
    allow: GlobSet,
    allow_patterns: Vec<String>,
    deny: GlobSet,
    deny_patterns: Vec<String>,
}

#[derive(Debug)]
struct Rule {
    selectors: Vec<Selector>,
    roles: Vec<usize>,
    hmac_key_file: Option<PathBuf>,
}

#[derive(Debug)]
enum Selector {
    Uid(Vec<u32>),
    User(Vec<String>),
    Group(Vec<String>),
    Gid(Vec<u32>),
    Exe(GlobSet),
    ExeSha256(Vec<String>),
    Unit(GlobSet),
    ParentExe(GlobSet),
    CertCn(GlobSet),
    CertId(Vec<String>),
    CertSan(GlobSet),
}

impl Selector {
    /// Local selectors never match a certificate peer, and cert selectors never match a local
    /// one: a remote caller's uid (whatever the gateway put there) must not pass for a local
    /// user's.
    fn matches(&self, p: &Principal) -> bool {
        let local = p.transport == Transport::Unix;
        match self {
            Selector::Uid(uids) => local && uids.contains(&p.uid),
            Selector::User(names) => local && p.user.as_ref().is_some_and(|u| names.contains(u)),
            Selector::Group(names) => local && p.group_names.iter().any(|g| names.contains(g)),
            Selector::Gid(gids) => {
                local && (gids.contains(&p.gid) || p.groups.iter().any(|g| gids.contains(g)))
            }
            Selector::Exe(set) => local && p.exe.as_ref().is_some_and(|e| set.is_match(e)),
            Selector::ExeSha256(hashes) => {
                local
                    && p.exe_sha256
                        .as_ref()
                        .is_some_and(|h| hashes.iter().any(|x| x.eq_ignore_ascii_case(h)))
            }
            Selector::Unit(set) => local && p.unit.as_ref().is_some_and(|u| set.is_match(u)),
            Selector::ParentExe(set) => {
                local
                    && p.parents
                        .iter()
                        .any(|pp| pp.exe.as_ref().is_some_and(|e| set.is_match(e)))
            }
            Selector::CertCn(set) => p
                .cert
                .as_ref()
                .and_then(|c| c.cn.as_ref())
                .is_some_and(|cn| set.is_match(cn)),
            Selector::CertId(ids) => p
                .cert
                .as_ref()
                .is_some_and(|c| ids.iter().any(|x| x.eq_ignore_ascii_case(&c.id))),
            Selector::CertSan(set) => p
                .cert
                .as_ref()
                .is_some_and(|c| c.sans.iter().any(|s| set.is_match(s))),
        }
    }
}

/// The roles one principal holds under one policy. Compute it once per connection.
#[derive(Clone, Debug)]
pub struct Grants {
    generation: u64,
    member: bool,
    /// Indices into `Policy::roles`, ascending (so role-name order), no duplicates.
    roles: Vec<usize>,
    /// The first matching rule that names an HMAC key file.
    hmac_rule: Option<usize>,
}

/// The answer to "may this principal do this".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow { role: String, pattern: String },
    Deny { reason: DenyReason },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// The principal matched no rule.
    NoRule,
    /// One of the principal's roles denies the permission (deny wins over any allow).
    DeniedBy { role: String, pattern: String },
    /// The principal's roles do not allow the permission (default deny).
    NotGranted,
    /// The grants were computed under a policy that has since been replaced: compute them again.
    StaleGrants,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow { role, pattern } => {
                write!(f, "allowed by role `{role}` (pattern `{pattern}`)")
            }
            Decision::Deny { reason } => write!(f, "denied: {reason}"),
        }
    }
}

/// Reads after "permission `x` denied: ".
impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::NoRule => f.write_str("no policy rule matches this caller"),
            DenyReason::DeniedBy { role, pattern } => {
                write!(f, "role `{role}` denies it (pattern `{pattern}`)")
            }
            DenyReason::NotGranted => f.write_str("none of the caller's roles allows it"),
            DenyReason::StaleGrants => {
                f.write_str("the policy was reloaded; the caller's roles must be recomputed")
            }
        }
    }
}

impl Policy {
    /// Checks and compiles a policy. Refuses, naming the rule or role: a rule naming an unknown
    /// role, a rule with no selector (it would match everyone; write `any = true` for that),
    /// `any = true` next to selectors, an empty selector list, a rule that grants nothing, a bad
    /// glob, a malformed hash, a relative key file path.
    pub fn compile(cfg: &PolicyConfig) -> Result<Policy, PolicyError> {
        let mut roles = Vec::with_capacity(cfg.roles.len());
        let mut role_index = HashMap::new();
        for (name, role) in &cfg.roles {
            let set = |list: &'static str, patterns: &[String]| {
                if patterns.iter().any(String::is_empty) {
                    return Err(PolicyError::EmptyPattern {
                        role: name.clone(),
                        list,
                    });
                }
                glob_set(patterns, GlobKind::Text).map_err(|(pattern, source)| {
                    PolicyError::BadRolePattern {
                        role: name.clone(),
                        list,
                        pattern,
                        source,
                    }
                })
            };
            role_index.insert(name.as_str(), roles.len());
            roles.push(Role {
                name: name.clone(),
                allow: set("allow", &role.allow)?,
                allow_patterns: role.allow.clone(),
                deny: set("deny", &role.deny)?,
                deny_patterns: role.deny.clone(),
            });
        }
        let rules = cfg
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile_rule(i, r, &role_index))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            roles,
            rules,
        })
    }

    /// The roles `p` holds: the union over every rule it matches.
    pub fn grants(&self, p: &Principal) -> Grants {
        let mut held = vec![false; self.roles.len()];
        let mut member = false;
        let mut hmac_rule = None;
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.selectors.iter().all(|s| s.matches(p)) {
                continue;
            }
            member = true;
            for &r in &rule.roles {
                held[r] = true;
            }
            if hmac_rule.is_none() && rule.hmac_key_file.is_some() {
                hmac_rule = Some(i);
            }
        }
        Grants {
            generation: self.generation,
            member,
            roles: (0..held.len()).filter(|&r| held[r]).collect(),
            hmac_rule,
        }
    }

    /// THE decision. Deny wins: if any held role denies `permission`, the answer is Deny, whatever
    /// other roles allow. Otherwise the first role (by name) that allows it decides. Otherwise Deny.
    pub fn decide(&self, grants: &Grants, permission: &str) -> Decision {
        if grants.generation != self.generation {
            return deny(DenyReason::StaleGrants);
        }
        if !grants.member {
            return deny(DenyReason::NoRule);
        }
        let candidate = Candidate::new(permission);
        for &r in &grants.roles {
            let role = &self.roles[r];
            if let Some(&i) = role.deny.matches_candidate(&candidate).first() {
                return deny(DenyReason::DeniedBy {
                    role: role.name.clone(),
                    pattern: role.deny_patterns[i].clone(),
                });
            }
        }
        for &r in &grants.roles {
            let role = &self.roles[r];
            if let Some(&i) = role.allow.matches_candidate(&candidate).first() {
                return Decision::Allow {
                    role: role.name.clone(),
                    pattern: role.allow_patterns[i].clone(),
                };
            }
        }
        deny(DenyReason::NotGranted)
    }

    /// The HMAC key file of the first matching rule that names one.
    pub fn hmac_key_file(&self, grants: &Grants) -> Option<&Path> {
        if grants.generation != self.generation {
            return None;
        }
        self.rules[grants.hmac_rule?].hmac_key_file.as_deref()
    }

    /// Patterns over the names under `prefix` that the grants' allow lists can reach, e.g. for
    /// `secrets:read:` the `db_*` of `secrets:read:db_*`, or `*` for a wildcard reaching into
    /// the prefix. An over-approximation: deny patterns are not subtracted, so the caller must
    /// still filter each concrete name with [`Policy::decide`].
    pub fn allowed_patterns(&self, grants: &Grants, prefix: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if grants.generation != self.generation {
            return out;
        }
        for &r in &grants.roles {
            for pattern in &self.roles[r].allow_patterns {
                if let Some(suffix) = suffix_under(pattern, prefix) {
                    if !out.contains(&suffix) {
                        out.push(suffix);
                    }
                }
            }
        }
        out
    }

    /// The principal matched at least one rule.
    pub fn is_member(&self, grants: &Grants) -> bool {
        grants.generation == self.generation && grants.member
    }

    /// The names of the roles held, in name order (for the audit log and `whoami`).
    pub fn role_names<'a>(&'a self, grants: &Grants) -> Vec<&'a str> {
        if grants.generation != self.generation {
            return Vec::new();
        }
        grants
            .roles
            .iter()
            .map(|&r| self.roles[r].name.as_str())
            .collect()
    }
}

fn deny(reason: DenyReason) -> Decision {
    Decision::Deny { reason }
}

fn compile_rule(
    i: usize,
    r: &RuleConfig,
    role_index: &HashMap<&str, usize>,
) -> Result<Rule, PolicyError> {
    let mut selectors = Vec::new();
    if let Some(v) = values(i, "uid", &r.uid)? {
        selectors.push(Selector::Uid(v.to_vec()));
    }
    if let Some(v) = values(i, "user", &r.user)? {
        selectors.push(Selector::User(v.to_vec()));
    }
    if let Some(v) = values(i, "group", &r.group)? {
        selectors.push(Selector::Group(v.to_vec()));
    }
    if let Some(v) = values(i, "gid", &r.gid)? {
        selectors.push(Selector::Gid(v.to_vec()));
    }
    if let Some(v) = values(i, "exe", &r.exe)? {
        selectors.push(Selector::Exe(globs(i, "exe", v, GlobKind::Path)?));
    }
    if let Some(v) = values(i, "exe_sha256", &r.exe_sha256)? {
        selectors.push(Selector::ExeSha256(sha256_hex(i, "exe_sha256", v)?));
    }
    if let Some(v) = values(i, "unit", &r.unit)? {
        selectors.push(Selector::Unit(globs(i, "unit", v, GlobKind::Text)?));
    }
    if let Some(v) = values(i, "parent_exe", &r.parent_exe)? {
        selectors.push(Selector::ParentExe(globs(
            i,
            "parent_exe",
            v,
            GlobKind::Path,
        )?));
    }
    if let Some(v) = values(i, "cert_cn", &r.cert_cn)? {
        selectors.push(Selector::CertCn(globs(i, "cert_cn", v, GlobKind::Text)?));
    }
    if let Some(v) = values(i, "cert_id", &r.cert_id)? {
        selectors.push(Selector::CertId(sha256_hex(i, "cert_id", v)?));
    }
    if let Some(v) = values(i, "cert_san", &r.cert_san)? {
        selectors.push(Selector::CertSan(globs(i, "cert_san", v, GlobKind::Text)?));
    }
    match (selectors.is_empty(), r.any) {
        (true, false) => return Err(PolicyError::EmptyRule { rule: i }),
        (false, true) => return Err(PolicyError::AnyWithSelectors { rule: i }),
        _ => {}
    }
    let mut roles = Vec::new();
    for name in &r.roles {
        let idx = *role_index
            .get(name.as_str())
            .ok_or_else(|| PolicyError::UnknownRole {
                rule: i,
                role: name.clone(),
            })?;
        if !roles.contains(&idx) {
            roles.push(idx);
        }
    }
    if roles.is_empty() && r.hmac_key_file.is_none() {
        return Err(PolicyError::GrantsNothing { rule: i });
    }
    if let Some(path) = &r.hmac_key_file {
        if !path.is_absolute() {
            return Err(PolicyError::RelativeKeyFile {
                rule: i,
                path: path.clone(),
            });
        }
    }
    Ok(Rule {
        selectors,
        roles,
        hmac_key_file: r.hmac_key_file.clone(),
    })
}

/// The values of a selector, or None when it is absent; an empty list could never match and is
/// refused rather than silently turning the rule off.
fn values<'a, T>(
    rule: usize,
    field: &'static str,
    v: &'a Option<OneOrMany<T>>,
) -> Result<Option<&'a [T]>, PolicyError> {
    match v {
        None => Ok(None),
        Some(OneOrMany(list)) if list.is_empty() => Err(PolicyError::EmptySelector { rule, field }),
        Some(OneOrMany(list)) => Ok(Some(list)),
    }
}

fn globs(
    rule: usize,
    field: &'static str,
    patterns: &[String],
    kind: GlobKind,
) -> Result<GlobSet, PolicyError> {
    glob_set(patterns, kind).map_err(|(pattern, source)| PolicyError::BadRuleGlob {
        rule,
        field,
        pattern,
        source,
    })
}

fn sha256_hex(
    rule: usize,
    field: &'static str,
    values: &[String],
) -> Result<Vec<String>, PolicyError> {
    values
        .iter()
        .map(|v| {
            if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(v.to_ascii_lowercase())
            } else {
                Err(PolicyError::BadHash {
                    rule,
                    field,
                    value: v.clone(),
                })
            }
        })
        .collect()
}
