//! The methods the daemon answers, in one table: name, aliases (the securityd action names and
//! Lumo's command names), rate class, who may call it, and the permission the policy checks.
//!
//! Adding a method is one row here and one arm in `pipeline::execute`; nothing else learns
//! method names.

use crate::auth::RateClass;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Ping,
    Metrics,
    Health,
    Methods,
    Auth,
    Refresh,
    Logout,
    Status,
    Reload,
    AuditTail,
    SecretGet,
    SecretGetMany,
    SecretList,
    SecretVersions,
    SecretWatch,
    SecretSet,
    SecretDelete,
    SecretDestroy,
    SecretRotateMaster,
    SecretRekey,
    Seal,
    Unseal,
    CommandsRun,
    CommandsList,
    JobsStart,
    JobsRun,
    JobsList,
    JobsStatus,
    JobsAttach,
    JobsStop,
}

/// What a caller must present before the policy is even asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Anyone who can connect (the socket's mode already decided that much): `health`.
    Open,
    /// A principal some policy rule matches: `auth`, which is how a credential is obtained.
    Member,
    /// A session token or an HMAC signature.
    Credential,
    /// An admin token or an HMAC signature, and the method's `admin:` permission.
    Admin,
}

pub struct MethodSpec {
    pub method: Method,
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub class: RateClass,
    pub access: Access,
    /// Checked against the policy; `None` only for methods whose access level is the check.
    pub permission: Option<&'static str>,
    /// A probe changes nothing and reveals nothing: its audit record is chained in order but
    /// its reply does not wait for the disk flush (every other method's reply does).
    pub probe: bool,
    /// Answers with several frames (warden's dialect, requests with an `id`): its decision is
    /// audited before the first frame, the final frame ends the stream.
    pub streaming: bool,
    pub summary: &'static str,
}

pub static METHODS: &[MethodSpec] = &[
    MethodSpec {
        method: Method::Ping,
        name: "system.ping",
        aliases: &["ping"],
        class: RateClass::System,
        access: Access::Credential,
        permission: Some("system:ping"),
        probe: true,
        streaming: false,
        summary: "Answers pong: proves the caller's credential works end to end.",
    },
    MethodSpec {
        method: Method::Metrics,
        name: "system.metrics",
        aliases: &["metrics"],
        class: RateClass::System,
        access: Access::Credential,
        permission: Some("system:metrics"),
        probe: true,
        streaming: false,
        summary: "Counters: uptime, requests, failures, connections, nonce store size.",
    },
    MethodSpec {
        method: Method::Health,
        name: "system.health",
        aliases: &["health"],
        class: RateClass::System,
        access: Access::Open,
        permission: None,
        probe: true,
        streaming: false,
        summary: "Liveness and version; needs no credential.",
    },
    MethodSpec {
        method: Method::Methods,
        name: "system.methods",
        aliases: &[],
        class: RateClass::System,
        access: Access::Credential,
        permission: Some("system:methods"),
        probe: true,
        streaming: false,
        summary: "Lists every method with its aliases, access level and permission.",
    },
    MethodSpec {
        method: Method::Auth,
        name: "auth.login",
        aliases: &["auth"],
        class: RateClass::Auth,
        access: Access::Member,
        permission: None,
        probe: false,
        streaming: false,
        summary: "Issues a token bound to the caller (params: type = session|admin, or bootstrap).",
    },
    MethodSpec {
        method: Method::Refresh,
        name: "auth.refresh",
        aliases: &["refresh"],
        class: RateClass::Auth,
        access: Access::Credential,
        permission: None,
        probe: false,
        streaming: false,
        summary: "Replaces the presented token with a new one; the old one stops working.",
    },
    MethodSpec {
        method: Method::Logout,
        name: "auth.logout",
        aliases: &["logout"],
        class: RateClass::Auth,
        access: Access::Credential,
        permission: None,
        probe: false,
        streaming: false,
        summary: "Revokes the presented token.",
    },
    MethodSpec {
        method: Method::Status,
        name: "daemon.status",
        aliases: &["status"],
        class: RateClass::Admin,
        access: Access::Credential,
        permission: Some("admin:status"),
        probe: false,
        streaming: false,
        summary: "Version, pid, uptime, sealed or not, connections and requests served.",
    },
    MethodSpec {
        method: Method::Reload,
        name: "daemon.reload",
        aliases: &["reload"],
        class: RateClass::Admin,
        access: Access::Admin,
        permission: Some("admin:reload"),
        probe: false,
        streaming: false,
        summary: "Re-reads the configuration file, as SIGHUP does.",
    },
    MethodSpec {
        method: Method::AuditTail,
        name: "audit.tail",
        aliases: &[],
        class: RateClass::Admin,
        access: Access::Credential,
        permission: Some("admin:audit"),
        probe: false,
        streaming: true,
        summary: "Streams the last `lines` audit records (default 20), then with `follow` new ones as they are written.",
    },
    // The secrets service (`server::secrets`): per-name permissions are checked by the handler.
    MethodSpec {
        method: Method::SecretGet,
        name: "secrets.get",
        aliases: &["get_secret"],
        class: RateClass::Secrets,
        access: Access::Credential,
        permission: None,
        probe: false,
        streaming: false,
        summary: "The value of `key` (or its `version`); needs secrets:read:KEY.",
    },
    MethodSpec {
        method: Method::SecretGetMany,
        name: "secrets.get_many",
        aliases: &["get_secrets"],
        class: RateClass::Secrets,
        access: Access::Credential,
        permission: None,
        probe: false,
        streaming: false,
        summary: "The values of `keys` as `secrets`, with the absent ones in `missing`; needs secrets:read:KEY for each.",
    },
    MethodSpec {
        method: Method::SecretList,
        name: "secrets.list",
        aliases: &["list_secrets"],
        class: RateClass::Secrets,
        access: Access::Credential,
        permission: None,
        probe: false,
        streaming: false,
        summary: "The names (and versions) of the secrets the caller may read.",
    },
    MethodSpec {
        method: Method::SecretVersions,
        name: "secrets.versions",
        aliases: &[],
        class: RateClass::Secrets,
        access: Access::Credential,
        permission: None,
        probe: false,
        streaming: false,
        summary: "The kept versions of `key`, with creation times and damage; needs secrets:read:KEY.",
    },
    MethodSpec {
        method: Method::SecretWatch,
        name: "secrets.watch",
        aliases: &[],
        class: RateClass::Secrets,
        access: Access::Credential,
        permission: Some("secrets:watch"),
        probe: false,
        streaming: true,
        summary: "Streams the store's change generation: at once, after every change and every `heartbeat` seconds (default 30); names no secret. What mirrors follow.",
    },
    MethodSpec {
        method: Method::SecretSet,
        name: "secrets.set",
        aliases: &[],
        class: RateClass::Secrets,
        access: Access::Credential,
        permission: None,
        probe: false,
        streaming: false,
        summary: "Stores `value` as a new version of `key` (if `expected_version` matches); needs secrets:write:KEY.",
    },
    MethodSpec {
        method: Method::SecretDelete,
        name: "secrets.delete",
        aliases: &[],
        class: RateClass::Secrets,
        access: Access::Credential,
        permission: None,
        probe: false,
        streaming: false,
        summary: "Hides `key` (its versions stay until destroyed); needs secrets:write:KEY.",
    },
    MethodSpec {
        method: Method::SecretDestroy,
        name: "secrets.destroy",
        aliases: &[],
        class: RateClass::Secrets,
        access: Access::Credential,
        permission: None,
        probe: false,
        streaming: false,
        summary: "Erases `versions` of `key` (all if absent) from memory and disk; needs secrets:destroy:KEY.",
    },
    MethodSpec {
        method: Method::SecretRotateMaster,
        name: "secrets.rotate_master",
        aliases: &["rotate_master"],
        class: RateClass::Admin,
        access: Access::Admin,
        permission: Some("admin:secrets.rotate"),
        probe: false,
        streaming: false,
        summary: "Changes the master password to `new_password` (re-wraps the data key).",
    },
    MethodSpec {
        method: Method::SecretRekey,
        name: "secrets.rekey",
        aliases: &[],
        class: RateClass::Admin,
        access: Access::Admin,
        permission: Some("admin:secrets.rekey"),
        probe: false,
        streaming: false,
        summary: "Re-seals every value under a new random data key.",
    },
    MethodSpec {
        method: Method::Seal,
        name: "daemon.seal",
        aliases: &["seal"],
        class: RateClass::Admin,
        access: Access::Admin,
        permission: Some("admin:seal"),
        probe: false,
        streaming: false,
        summary: "Wipes the keys and decrypted values from memory; secret requests then answer DAEMON_LOCKED.",
    },
    MethodSpec {
        method: Method::Unseal,
        name: "daemon.unseal",
        aliases: &["unseal"],
        class: RateClass::Admin,
        access: Access::Admin,
        permission: Some("admin:unseal"),
        probe: false,
        streaming: false,
        summary: "Unseals the secret store with the master `password`.",
    },
    MethodSpec {
        method: Method::CommandsRun,
        name: "commands.run",
        aliases: &[],
        class: RateClass::Commands,
        access: Access::Credential,
        // Authorized per command, as `commands:<name>` (see `server::commands`).
        permission: None,
        probe: false,
        streaming: false,
        summary: "Runs a privileged command (params: command, params, dry_run?); Lumo command names are accepted directly.",
    },
    MethodSpec {
        method: Method::CommandsList,
        name: "commands.list",
        aliases: &[],
        class: RateClass::System,
        access: Access::Credential,
        permission: Some("commands:list"),
        probe: true,
        streaming: false,
        summary: "Lists the privileged commands with their aliases and parameter schemas.",
    },
    MethodSpec {
        method: Method::JobsStart,
        name: "jobs.start",
        aliases: &[],
        class: RateClass::Jobs,
        access: Access::Credential,
        permission: Some("jobs:run"),
        probe: false,
        streaming: false,
        summary: "Starts `command` under cgroup limits (capped by policy) in new namespaces, as the caller's uid; exec failures are this call's error.",
    },
    MethodSpec {
        method: Method::JobsList,
        name: "jobs.list",
        aliases: &[],
        class: RateClass::Jobs,
        access: Access::Credential,
        permission: Some("jobs:list"),
        probe: false,
        streaming: false,
        summary: "The caller's running and recently finished jobs (`all`: everyone's, with jobs:admin).",
    },
    MethodSpec {
        method: Method::JobsStatus,
        name: "jobs.status",
        aliases: &[],
        class: RateClass::Jobs,
        access: Access::Credential,
        permission: Some("jobs:status"),
        probe: false,
        streaming: false,
        summary: "One job: state, end reason (exit code, signal, OOM kill), limits, output size, usage.",
    },
    MethodSpec {
        method: Method::JobsRun,
        name: "jobs.run",
        aliases: &[],
        class: RateClass::Jobs,
        access: Access::Credential,
        permission: Some("jobs:run"),
        probe: false,
        streaming: true,
        summary: "`jobs.start` and a following `jobs.attach` in one call (also needs jobs:attach): a first frame with the job, then its output as `jobs.attach` streams it.",
    },
    MethodSpec {
        method: Method::JobsAttach,
        name: "jobs.attach",
        aliases: &[],
        class: RateClass::Jobs,
        access: Access::Credential,
        permission: Some("jobs:attach"),
        probe: false,
        streaming: true,
        summary: "Streams a job's output (base64 frames tagged stdout/stderr) from `from` (default 0), with `follow` (default true) until it ends.",
    },
    MethodSpec {
        method: Method::JobsStop,
        name: "jobs.stop",
        aliases: &[],
        class: RateClass::Jobs,
        access: Access::Credential,
        permission: Some("jobs:stop"),
        probe: false,
        streaming: false,
        summary: "SIGTERM to every process of the job, `grace` (default jobs.stop_grace), then the cgroup is killed.",
    },
];

/// Finds a method by its name or one of its aliases.
pub fn lookup(name: &str) -> Option<&'static MethodSpec> {
    METHODS
        .iter()
        .find(|m| m.name == name || m.aliases.contains(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_and_alias_is_unique_and_found() {
        let mut seen = std::collections::HashSet::new();
        for m in METHODS {
            for n in std::iter::once(&m.name).chain(m.aliases) {
                assert!(seen.insert(*n), "{n} is listed twice");
                assert_eq!(lookup(n).unwrap().method, m.method);
            }
        }
        assert!(lookup("system.pong").is_none());
    }

    #[test]
    fn only_health_is_open_and_admin_methods_need_admin_permissions() {
        for m in METHODS {
            if m.access == Access::Open {
                assert_eq!(m.method, Method::Health);
            }
            if m.access == Access::Admin {
                assert!(m.permission.unwrap().starts_with("admin:"));
            }
        }
    }
}
