//! The configuration file: TOML, every key documented in `docs/configuration.md` with its
//! default, unknown keys and bad values refused with the file, the line and what was expected.
//!
//! Parsing is two steps. `toml` + serde check the shape (types, unknown keys, units) and report
//! positions; [`Config::validate`] then checks what the shape cannot say (ranges, the policy's
//! role names, that a key file is readable) and names the key at fault.
//!
//! Sections a later reload can change without a restart: `[socket]` mode/owner/group,
//! `[limits]`, `[rate_limits]`, `[auth]` TTLs and keys, `[audit]` rotation, `[policy]`,
//! `[commands]` (allowlists and limits, applied from the next request on).
//! Changing `socket.path`, `daemon.state_dir` or `audit.path` needs a restart; a reload says so.

use crate::auth::{RateLimits, SessionConfig};
use crate::policy::PolicyConfig;
use crate::units::{ByteSize, HumanDuration};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};

/// The whole configuration. Every section has defaults, so an empty file is valid (and denies
/// everything: the default policy is empty).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonSection,
    pub socket: SocketSection,
    pub limits: LimitsSection,
    pub auth: AuthSection,
    pub rate_limits: RateLimits,
    pub audit: AuditSection,
    pub secrets: SecretsSection,
    pub storage: StorageSection,
    pub jobs: JobsSection,
    pub policy: PolicyConfig,
    pub commands: crate::commands::CommandsConfig,
    pub cluster: crate::auth::cluster::ClusterConfig,
    pub gateway: crate::gateway::config::GatewayConfig,
    pub upstream: crate::upstream::UpstreamConfig,
    pub monitor: MonitorSection,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSection {
    /// Written by `warden daemon run`, read by `warden daemon stop|status`.
    pub pid_file: PathBuf,
    /// Where `warden daemon start` sends the daemon's log; `warden daemon logs` reads it.
    pub log_file: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace` (or a tracing filter directive).
    pub log_level: String,
    pub log_format: LogFormat,
    /// How long SIGTERM/SIGINT wait for in-flight requests before exiting.
    pub shutdown_grace: HumanDuration,
    /// Privilege separation: `auto` (three processes — monitor, core, gateway — when started
    /// as root, one otherwise), `on` (three processes; refuses to start unless root) or `off`
    /// (one process: containers and sidecars with no root to drop).
    pub privsep: Privsep,
    /// The unprivileged user the gateway process becomes before it touches the network.
    pub gateway_user: String,
}

/// `[daemon] privsep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Privsep {
    Auto,
    On,
    Off,
}

impl Privsep {
    /// Whether to run as three processes, for a daemon started with effective uid `euid`.
    pub fn enabled(self, euid_is_root: bool) -> Result<bool, String> {
        match (self, euid_is_root) {
            (Privsep::Off, _) => Ok(false),
            (Privsep::Auto, root) => Ok(root),
            (Privsep::On, true) => Ok(true),
            (Privsep::On, false) => Err(
                "daemon.privsep = \"on\" needs root (the monitor starts core as root and the gateway drops to daemon.gateway_user); set it to \"auto\" or \"off\"".into(),
            ),
        }
    }
}

/// `[monitor]`: how the monitor supervises core and the gateway (privilege separation only).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorSection {
    /// A heartbeat to each child this often.
    pub heartbeat_interval: HumanDuration,
    /// This many unanswered heartbeats in a row: the child is hung, killed and restarted.
    pub heartbeat_tolerance: u32,
    /// The wait before the second restart in a row (the first is immediate); doubled after each
    /// restart up to `restart_backoff_max`.
    pub restart_backoff: HumanDuration,
    pub restart_backoff_max: HumanDuration,
    /// A child that ran this long before dying is restarted at once again.
    pub stable_after: HumanDuration,
    /// More than `max_restarts` restarts of one child within `restart_window`: the monitor
    /// stops everything and exits non-zero (systemd then restarts the unit).
    pub max_restarts: u32,
    pub restart_window: HumanDuration,
    /// How long a child may take to become ready (core unseals the store at start).
    pub start_timeout: HumanDuration,
}

impl Default for MonitorSection {
    fn default() -> Self {
        MonitorSection {
            heartbeat_interval: HumanDuration::secs(1),
            heartbeat_tolerance: 3,
            restart_backoff: HumanDuration(std::time::Duration::from_millis(100)),
            restart_backoff_max: HumanDuration::secs(10),
            stable_after: HumanDuration::secs(60),
            max_restarts: 5,
            restart_window: HumanDuration::secs(60),
            start_timeout: HumanDuration::secs(120),
        }
    }
}

impl MonitorSection {
    pub fn restart_policy(&self) -> crate::privsep::supervise::RestartPolicy {
        crate::privsep::supervise::RestartPolicy {
            backoff_initial: self.restart_backoff.get(),
            backoff_max: self.restart_backoff_max.get(),
            stable_after: self.stable_after.get(),
            max_restarts: self.max_restarts,
            window: self.restart_window.get(),
        }
    }
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            pid_file: PathBuf::from("/run/warden/warden.pid"),
            log_file: PathBuf::from("/var/log/warden/warden.log"),
            log_level: "info".into(),
            log_format: LogFormat::Pretty,
            shutdown_grace: HumanDuration::secs(30),
            privsep: Privsep::Auto,
            gateway_user: "nobody".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketSection {
    pub path: PathBuf,
    /// Octal permission bits of the socket file, e.g. `"0660"`.
    pub mode: Mode,
    /// Owner of the socket: a user name or a numeric uid. Default: the daemon's own user.
    pub owner: Option<String>,
    /// Group of the socket: a group name or a numeric gid. Default: the daemon's own group.
    pub group: Option<String>,
}

impl Default for SocketSection {
    fn default() -> Self {
        SocketSection {
            path: PathBuf::from("/run/warden/warden.sock"),
            mode: Mode(0o660),
            owner: None,
            group: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest message accepted, in either framing.
    pub max_message_size: ByteSize,
    /// Connections open at once, over all clients; the next one is closed at once.
    pub max_connections: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: HumanDuration,
    /// Once a message has started, the rest of it must arrive within this time.
    pub read_timeout: HumanDuration,
    /// A reply the client does not read within this time closes the connection.
    pub write_timeout: HumanDuration,
    /// Requests one connection may have in flight at once (pipelined or with ids).
    pub max_in_flight: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_message_size: ByteSize(1 << 20),
            max_connections: 1024,
            idle_timeout: HumanDuration::secs(300),
            read_timeout: HumanDuration::secs(10),
            write_timeout: HumanDuration::secs(10),
            max_in_flight: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// The HMAC key Lumo-dialect requests are signed with, for principals whose policy rule
    /// names no key of its own. Must be mode 0600 (or stricter) and owned by root or warden.
    pub hmac_key_file: Option<PathBuf>,
    /// A signed request's timestamp may be this far in the past or in the future.
    pub max_request_age: HumanDuration,
    pub session_ttl: HumanDuration,
    pub admin_ttl: HumanDuration,
    pub bootstrap_ttl: HumanDuration,
    pub max_sessions_per_client: usize,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            hmac_key_file: None,
            max_request_age: HumanDuration::secs(60),
            session_ttl: HumanDuration::secs(8 * 3600),
            admin_ttl: HumanDuration::secs(15 * 60),
            bootstrap_ttl: HumanDuration::secs(3600),
            max_sessions_per_client: 10,
        }
    }
}

impl AuthSection {
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            session_ttl: self.session_ttl.get(),
            admin_ttl: self.admin_ttl.get(),
            bootstrap_ttl: self.bootstrap_ttl.get(),
            max_sessions_per_client: self.max_sessions_per_client,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    pub path: PathBuf,
    /// The log is rotated when it would grow past this size; the hash chain continues.
    pub max_file_size: ByteSize,
    /// Rotated files kept (`audit.log.1` … `audit.log.N`).
    pub keep_files: usize,
    /// A request whose audit record is not on disk within this time fails.
    pub write_timeout: HumanDuration,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            path: PathBuf::from("/var/log/warden/audit.log"),
            max_file_size: ByteSize(100 << 20),
            keep_files: 10,
            write_timeout: HumanDuration::secs(5),
        }
    }
}

impl AuditSection {
    pub fn audit_config(&self) -> crate::audit::AuditConfig {
        crate::audit::AuditConfig {
            path: self.path.clone(),
            max_file_size: self.max_file_size.0,
            keep_files: self.keep_files,
            write_timeout: self.write_timeout.get(),
            ..Default::default()
        }
    }
}

/// The encrypted secret store (see `wardend::secrets`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsSection {
    /// The store's directory (created 0700 by `warden init`).
    pub dir: PathBuf,
    /// Versions of each secret kept; older ones are dropped.
    pub keep_versions: usize,
    /// Argon2id memory for `warden init` and `rotate-master` (unseal uses what the store
    /// recorded).
    pub kdf_memory: ByteSize,
    pub kdf_passes: u32,
    pub kdf_lanes: u32,
    /// Unseal at start from this file (as `--master-password-file`); mode 0600 or stricter.
    pub master_password_file: Option<PathBuf>,
}

impl Default for SecretsSection {
    fn default() -> Self {
        let kdf = crate::secrets::KdfParams::default();
        SecretsSection {
            dir: PathBuf::from("/var/lib/warden/secrets"),
            keep_versions: 10,
            kdf_memory: ByteSize(u64::from(kdf.m_cost_kib) << 10),
            kdf_passes: kdf.t_cost,
            kdf_lanes: kdf.p_cost,
            master_password_file: None,
        }
    }
}

/// `[storage]`: where the secret store keeps its ciphertext — the embedded files in
/// `secrets.dir`, or PostgreSQL tables shared by several daemons (see `wardend::secrets::postgres`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    pub backend: StorageBackend,
    /// libpq-style URL or `key=value` string of the database (`postgres://warden@db/warden`);
    /// required with `backend = "postgres"`, refused otherwise.
    pub postgres_url: Option<String>,
    /// Schema holding warden's tables: `[a-z_][a-z0-9_]*`, at most 48 bytes. Daemons that use
    /// the same database and schema serve one store.
    pub postgres_schema: String,
    /// The longest a connection to PostgreSQL may take to open.
    pub postgres_connect_timeout: HumanDuration,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            backend: StorageBackend::Embedded,
            postgres_url: None,
            postgres_schema: "warden".into(),
            postgres_connect_timeout: HumanDuration::secs(5),
        }
    }
}

/// `embedded` (files in `secrets.dir`) or `postgres`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Embedded,
    Postgres,
}

impl StorageSection {
    /// The PostgreSQL store's configuration when `backend = "postgres"` (versions kept and KDF
    /// parameters come from `[secrets]`).
    pub fn pg_config(
        &self,
        secrets: &SecretsSection,
    ) -> Option<crate::secrets::postgres::PgConfig> {
        if self.backend != StorageBackend::Postgres {
            return None;
        }
        let store = secrets.store_config();
        let mut c = crate::secrets::postgres::PgConfig::new(self.postgres_url.clone()?);
        c.schema.clone_from(&self.postgres_schema);
        c.keep_versions = store.keep_versions;
        c.kdf = store.kdf;
        c.connect_timeout = self.postgres_connect_timeout.get();
        Some(c)
    }

    /// What [`Config::validate`] checks of this section: `(key, message)` of the first fault.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let schema = self.postgres_schema.as_bytes();
        if schema.is_empty()
            || schema.len() > 48
            || schema[0].is_ascii_digit()
            || !schema
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
        {
            return Err((
                "storage.postgres_schema",
                format!(
                    "`{}` is not a schema name: expected 1 to 48 of a-z 0-9 _, not starting with a digit",
                    self.postgres_schema
                ),
            ));
        }
        let t = self.postgres_connect_timeout.get();
        if t < std::time::Duration::from_millis(100) || t > std::time::Duration::from_secs(300) {
            return Err((
                "storage.postgres_connect_timeout",
                "out of range: expected 100ms to 5m".into(),
            ));
        }
        match (self.backend, &self.postgres_url) {
            (StorageBackend::Postgres, None) => Err((
                "storage.postgres_url",
                "is required with backend = \"postgres\"".into(),
            )),
            (StorageBackend::Postgres, Some(url)) => url
                .parse::<tokio_postgres::Config>()
                .map(|_| ())
                .map_err(|e| {
                    (
                        "storage.postgres_url",
                        format!(
                            "not a PostgreSQL connection string ({e}): expected e.g. \"postgres://warden@127.0.0.1/warden\""
                        ),
                    )
                }),
            (StorageBackend::Embedded, Some(_)) => Err((
                "storage.postgres_url",
                "is only used with backend = \"postgres\" (the embedded store lives in secrets.dir): set backend = \"postgres\" or remove it".into(),
            )),
            (StorageBackend::Embedded, None) => Ok(()),
        }
    }
}

/// `[jobs]`: where job output spills, how long finished jobs stay listed, and the limits every
/// job gets at most (a role's own caps in `[jobs.roles.NAME]` replace these for its holders).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsSection {
    /// Output beyond `output_memory` goes to unnamed files here (created 0700 if missing).
    pub spill_dir: PathBuf,
    /// Newest output of one job kept in memory.
    pub output_memory: ByteSize,
    /// Older output of one job kept in spill files; beyond it the oldest is dropped, and readers
    /// get a marker naming the lost range.
    pub output_spill: ByteSize,
    /// A finished job stays listed (status, output) for this long.
    pub keep_finished: HumanDuration,
    /// `jobs.stop` and shutdown: SIGTERM, this long to exit, then the cgroup is killed.
    pub stop_grace: HumanDuration,
    /// Running jobs one principal may have at once.
    pub max_running_per_client: usize,
    /// CPU cores a job may use at most (a quota); 0: no cap.
    pub max_cpu: f64,
    /// Memory a job may use at most; 0: no cap.
    pub max_memory: ByteSize,
    /// Processes and threads a job may have at most; 0: no cap.
    pub max_pids: u64,
    /// Marker of warden's job cgroups; at start, those of a dead daemon are killed and removed.
    pub cgroup_prefix: String,
    /// The local user (name) jobs of certificate peers (the gateway's callers) run as; empty:
    /// certificate peers cannot start jobs.
    pub remote_user: String,
    /// Caps for the holders of a policy role, replacing the ones above (the most generous
    /// of a caller's roles wins).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub roles: std::collections::BTreeMap<String, JobCaps>,
}

impl Default for JobsSection {
    fn default() -> Self {
        JobsSection {
            spill_dir: PathBuf::from("/var/lib/warden/jobs"),
            output_memory: ByteSize(4 << 20),
            output_spill: ByteSize(256 << 20),
            keep_finished: HumanDuration::secs(600),
            stop_grace: HumanDuration::secs(10),
            max_running_per_client: 32,
            max_cpu: 2.0,
            max_memory: ByteSize(1 << 30),
            max_pids: 1024,
            cgroup_prefix: "warden-job".into(),
            remote_user: "nobody".into(),
            roles: Default::default(),
        }
    }
}

impl SecretsSection {
    pub fn store_config(&self) -> crate::secrets::StoreConfig {
        crate::secrets::StoreConfig {
            dir: self.dir.clone(),
            keep_versions: self.keep_versions,
            kdf: crate::secrets::KdfParams {
                m_cost_kib: u32::try_from(self.kdf_memory.0 >> 10).unwrap_or(u32::MAX),
                t_cost: self.kdf_passes,
                p_cost: self.kdf_lanes,
            },
        }
    }
}

/// A role's job limits; an absent key keeps the `[jobs]` cap.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobCaps {
    pub max_cpu: Option<f64>,
    pub max_memory: Option<ByteSize>,
    pub max_pids: Option<u64>,
}

/// File permission bits, written as an octal string (`"0660"`) or a TOML octal integer (`0o660`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an octal mode such as \"0660\" (at most 0777)")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mode, E> {
                if (0..=0o777).contains(&v) {
                    Ok(Mode(v as u32))
                } else {
                    Err(E::custom(format!(
                        "mode {v:o} is out of range: expected at most 0777 (no setuid, setgid or sticky bits)"
                    )))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                let digits = v.strip_prefix("0o").unwrap_or(v);
                let n = u32::from_str_radix(digits, 8).map_err(|_| {
                    E::custom(format!(
                        "`{v}` is not an octal mode: expected e.g. \"0660\""
                    ))
                })?;
                self.visit_i64(i64::from(n))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:04o}", self.0))
    }
}

/// A configuration that could not be loaded: what, where, and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: format_toml_error(&e, text),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks what the types alone cannot: ranges and cross-references.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let l = &self.limits;
        if !(1024..=(64 << 20)).contains(&l.max_message_size.0) {
            return Err(invalid(
                "limits.max_message_size",
                format!(
                    "{} is out of range: expected between 1KiB and 64MiB",
                    l.max_message_size
                ),
            ));
        }
        if l.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections",
                "must be at least 1".into(),
            ));
        }
        if l.max_in_flight == 0 {
            return Err(invalid("limits.max_in_flight", "must be at least 1".into()));
        }
        for (key, d) in [
            ("limits.idle_timeout", l.idle_timeout),
            ("limits.read_timeout", l.read_timeout),
            ("limits.write_timeout", l.write_timeout),
            ("auth.max_request_age", self.auth.max_request_age),
            ("auth.session_ttl", self.auth.session_ttl),
            ("auth.admin_ttl", self.auth.admin_ttl),
            ("auth.bootstrap_ttl", self.auth.bootstrap_ttl),
            ("audit.write_timeout", self.audit.write_timeout),
            (
                "monitor.heartbeat_interval",
                self.monitor.heartbeat_interval,
            ),
            ("monitor.restart_window", self.monitor.restart_window),
            ("monitor.start_timeout", self.monitor.start_timeout),
        ] {
            if d.get().is_zero() {
                return Err(invalid(key, "must be longer than 0s".into()));
            }
        }
        self.cluster
            .validate()
            .map_err(|(key, message)| invalid(key, message))?;
        if self.monitor.heartbeat_tolerance == 0 {
            return Err(invalid(
                "monitor.heartbeat_tolerance",
                "must be at least 1".into(),
            ));
        }
        if self.monitor.restart_backoff > self.monitor.restart_backoff_max {
            return Err(invalid(
                "monitor.restart_backoff",
                format!(
                    "{} is longer than monitor.restart_backoff_max ({})",
                    self.monitor.restart_backoff, self.monitor.restart_backoff_max
                ),
            ));
        }
        if self.daemon.gateway_user.is_empty() || self.daemon.gateway_user == "root" {
            return Err(invalid(
                "daemon.gateway_user",
                "must name an unprivileged user (not root)".into(),
            ));
        }
        if self.auth.max_sessions_per_client == 0 {
            return Err(invalid(
                "auth.max_sessions_per_client",
                "must be at least 1".into(),
            ));
        }
        if self.audit.max_file_size.0 < 4096 {
            return Err(invalid(
                "audit.max_file_size",
                "must be at least 4KiB".into(),
            ));
        }
        if self.secrets.keep_versions == 0 {
            return Err(invalid(
                "secrets.keep_versions",
                "must be at least 1".into(),
            ));
        }
        if self.secrets.store_config().kdf.validate().is_err() {
            return Err(invalid(
                "secrets.kdf_memory",
                "KDF parameters out of range: kdf_memory 8KiB..4GiB (at least 8KiB per lane), kdf_passes 1..64, kdf_lanes 1..16".into(),
            ));
        }
        if !self.secrets.dir.is_absolute() {
            return Err(invalid("secrets.dir", "must be an absolute path".into()));
        }
        self.storage
            .validate()
            .map_err(|(key, message)| invalid(key, message))?;
        if self.storage.backend == StorageBackend::Postgres && self.upstream.url.is_some() {
            return Err(invalid(
                "storage.backend",
                "upstream mode serves the secrets mirrored from a central warden and keeps no store of its own: use backend = \"embedded\" with [upstream] url".into(),
            ));
        }
        let j = &self.jobs;
        let caps = std::iter::once(("jobs".to_string(), Some(j.max_cpu))).chain(
            j.roles
                .iter()
                .map(|(r, c)| (format!("jobs.roles.{r}"), c.max_cpu)),
        );
        for (key, cpu) in caps {
            if let Some(cpu) = cpu {
                if !cpu.is_finite() || !(0.0..=4096.0).contains(&cpu) {
                    return Err(invalid(
                        &format!("{key}.max_cpu"),
                        format!("{cpu} is out of range: expected 0 (no cap) to 4096 cores"),
                    ));
                }
            }
        }
        if j.output_memory.0 < 4096 {
            return Err(invalid(
                "jobs.output_memory",
                "must be at least 4KiB".into(),
            ));
        }
        if j.max_running_per_client == 0 {
            return Err(invalid(
                "jobs.max_running_per_client",
                "must be at least 1".into(),
            ));
        }
        if !j.spill_dir.is_absolute() {
            return Err(invalid("jobs.spill_dir", "must be an absolute path".into()));
        }
        if j.cgroup_prefix.is_empty()
            || !j
                .cgroup_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "jobs.cgroup_prefix",
                "must be letters, digits, `-` or `_`".into(),
            ));
        }
        for role in j.roles.keys() {
            if !self.policy.roles.contains_key(role) {
                return Err(invalid(
                    &format!("jobs.roles.{role}"),
                    format!("names role `{role}`, which is not defined in [policy.roles]"),
                ));
            }
        }
        if !self.socket.path.is_absolute() {
            return Err(invalid("socket.path", "must be an absolute path".into()));
        }
        crate::policy::Policy::compile(&self.policy)
            .map_err(|e| invalid("policy", e.to_string()))?;
        self.commands
            .validate()
            .map_err(|m| invalid("commands", m))?;
        self.gateway
            .validate()
            .map_err(|(key, m)| invalid(key, m))?;
        self.upstream
            .validate()
            .map_err(|(key, m)| invalid(key, m))?;
        Ok(())
    }
}

/// toml's own message already has "line N, column M" and the offending line; keep it on one
/// paragraph under the file name.
fn format_toml_error(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/warden/warden.toml"))
    }

    #[test]
    fn privsep_and_the_monitor_settings_are_checked() {
        assert_eq!(Privsep::Auto.enabled(true), Ok(true));
        assert_eq!(Privsep::Auto.enabled(false), Ok(false));
        assert_eq!(Privsep::Off.enabled(true), Ok(false));
        assert_eq!(Privsep::On.enabled(true), Ok(true));
        assert!(Privsep::On
            .enabled(false)
            .unwrap_err()
            .contains("needs root"));
        let c = parse("[daemon]\nprivsep = \"on\"\ngateway_user = \"www-data\"\n[monitor]\nheartbeat_interval = \"250ms\"\nmax_restarts = 2\n").unwrap();
        assert_eq!(c.daemon.privsep, Privsep::On);
        assert_eq!(c.daemon.gateway_user, "www-data");
        assert_eq!(
            c.monitor.heartbeat_interval.get(),
            std::time::Duration::from_millis(250)
        );
        assert_eq!(c.monitor.restart_policy().max_restarts, 2);
        for (text, key) in [
            (
                "[daemon]\nprivsep = \"yes\"\n",
                "expected one of `auto`, `on`, `off`",
            ),
            ("[daemon]\ngateway_user = \"root\"\n", "daemon.gateway_user"),
            (
                "[monitor]\nheartbeat_tolerance = 0\n",
                "monitor.heartbeat_tolerance",
            ),
            (
                "[monitor]\nheartbeat_interval = \"0s\"\n",
                "monitor.heartbeat_interval",
            ),
            (
                "[monitor]\nrestart_backoff = \"1m\"\nrestart_backoff_max = \"1s\"\n",
                "monitor.restart_backoff",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.socket.path, Path::new("/run/warden/warden.sock"));
        assert_eq!(c.socket.mode, Mode(0o660));
        assert_eq!(c.limits.max_message_size.0, 1 << 20);
        assert_eq!(c.daemon.shutdown_grace.get().as_secs(), 30);
        assert_eq!(c.auth.max_request_age.get().as_secs(), 60);
    }

    #[test]
    fn unknown_key_is_refused_with_file_and_line() {
        let e = parse("[socket]\npath = \"/tmp/x.sock\"\nmdoe = \"0600\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/warden/warden.toml"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("mdoe"), "{msg}");
    }

    #[test]
    fn bad_values_are_refused_with_what_is_expected() {
        let msg = parse("[socket]\nmode = \"0999\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 2") && msg.contains("octal"), "{msg}");
        let msg = parse("[limits]\nidle_timeout = \"5 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 2") && msg.contains("unit"), "{msg}");
        let msg = parse("[limits]\nmax_message_size = \"12\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("limits.max_message_size"), "{msg}");
        let msg = parse("[socket]\nmode = 0o4755\n").unwrap_err().to_string();
        assert!(msg.contains("setuid"), "{msg}");
    }

    #[test]
    fn mode_accepts_string_and_toml_octal() {
        assert_eq!(
            parse("[socket]\nmode = \"0600\"").unwrap().socket.mode,
            Mode(0o600)
        );
        assert_eq!(
            parse("[socket]\nmode = 0o640").unwrap().socket.mode,
            Mode(0o640)
        );
    }

    #[test]
    fn the_example_configuration_parses() {
        let text = include_str!("../../../deploy/warden.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.socket.group.as_deref(), Some("www-data"));
        assert_eq!(c.policy.rules.len(), 2);
    }

    #[test]
    fn storage_section_is_checked() {
        let c = parse("").unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Embedded);
        assert!(c.storage.pg_config(&c.secrets).is_none());
        let c = parse(
            "[secrets]\nkeep_versions = 3\n[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://warden@127.0.0.1/warden\"\npostgres_schema = \"prod_1\"\npostgres_connect_timeout = \"2s\"\n",
        )
        .unwrap();
        let pg = c.storage.pg_config(&c.secrets).unwrap();
        assert_eq!(pg.schema, "prod_1");
        assert_eq!(pg.keep_versions, 3);
        assert_eq!(pg.connect_timeout, std::time::Duration::from_secs(2));
        for (text, key) in [
            ("[storage]\nbackend = \"postgres\"\n", "storage.postgres_url"),
            (
                "[storage]\npostgres_url = \"postgres://127.0.0.1/x\"\n",
                "storage.postgres_url",
            ),
            (
                "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://127.0.0.1/x\"\npostgres_schema = \"Bad-Name\"\n",
                "storage.postgres_schema",
            ),
            (
                "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://127.0.0.1:notaport/x\"\n",
                "storage.postgres_url",
            ),
            (
                "[storage]\npostgres_connect_timeout = \"0s\"\n",
                "storage.postgres_connect_timeout",
            ),
        ] {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains(key), "{text}: {msg}");
        }
        let msg = parse("[storage]\nbackend = \"mysql\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 2") && msg.contains("embedded"), "{msg}");
    }

    /// docs/configuration.md documents every key, with the default the code has.
    #[test]
    fn every_key_is_documented_with_its_default() {
        let doc = include_str!("../../../docs/configuration.md");
        let value = toml::Value::try_from(Config::default()).unwrap();
        let mut missing = Vec::new();
        for (section, table) in value.as_table().unwrap() {
            if section == "policy" {
                continue;
            }
            let heading = format!("## `[{section}]`");
            let at = doc
                .find(&heading)
                .unwrap_or_else(|| panic!("{heading} missing"));
            let body = &doc[at..];
            let body = &body[..body[3..].find("\n## ").map(|i| i + 3).unwrap_or(body.len())];
            for (key, default) in table.as_table().unwrap() {
                let shown = match default {
                    toml::Value::String(s) => format!("`\"{s}\"`"),
                    other => format!("`{other}`"),
                };
                let row = format!("| `{key}` | {shown} |");
                if !body.contains(&row) {
                    missing.push(format!("[{section}] {row}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "docs lack the rows:\n{}",
            missing.join("\n")
        );
        for optional in [
            "owner",
            "group",
            "hmac_key_file",
            "master_password_file",
            "postgres_url",
        ] {
            assert!(doc.contains(&format!("| `{optional}` |")), "{optional}");
        }
    }
}
