//! The secrets service as the pipeline serves it: the daemon's one [`SecretStore`] (opened at
//! start, sealed until unsealed) and the handlers of the `secrets.*`, `daemon.seal` and
//! `daemon.unseal` methods and their securityd aliases.
//!
//! Authorization is per secret name: a handler builds the permission (`secrets:read:NAME`,
//! `secrets:write:NAME`, `secrets:destroy:NAME`), records it as the request's audit resource
//! and asks [`Ctx::authorize`] before it touches the store, so a denied request learns nothing
//! about the secret. Values never reach the audit record (`value`, `password` and
//! `new_password` are redacted by `audit::sanitize`), a log line or an error message.
//!
//! The store is the embedded one (files in `secrets.dir`) or, with `[storage] backend =
//! "postgres"`, the PostgreSQL one shared by several daemons; [`Backend`] is the seam. Reads
//! are answered inline from memory on both (no I/O). Embedded writes (one `fdatasync`), unseal,
//! master-password changes (Argon2id) and rekey run on the blocking pool so that they never
//! stall the connections served by the same worker thread; PostgreSQL writes are awaited
//! (network I/O, no blocking).

use super::methods::Method;
use super::pipeline::{err, rfc3339, Ctx, StreamSink};
use crate::secrets::postgres::{PgConfig, PgStore};
use crate::secrets::{
    valid_name, IntegrityError, SecretBytes, SecretMeta, SecretStore, SecretValue, StoreConfig,
    StoreError, UnsealReport, VersionMeta, MAX_NAME_LEN,
};
use crate::upstream::{Mirror, MirrorError};
use parking_lot::RwLock;
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use warden_wire::envelope::Request;
use warden_wire::reply::{ErrorBody, ErrorCode};
use zeroize::Zeroizing;

/// Keys one `get_secrets` may ask for.
pub const MAX_BATCH: usize = 1000;

/// The error code of a value that fails its integrity check (warden's own; securityd has none).
pub const INTEGRITY_ERROR: ErrorCode = ErrorCode::Custom("INTEGRITY_ERROR");

/// Where the daemon's store lives (`[storage] backend`).
enum Location {
    Embedded(StoreConfig),
    Postgres(PgConfig),
}

/// The open store, on either backend. Reads (`get`, `list`, `versions`) are answered from
/// memory on both, inline; writes go to the blocking pool on the embedded store (one
/// `fdatasync`) and are awaited on PostgreSQL (network I/O). Unseal, password changes and
/// rekey (Argon2id, re-sealing every value) run on the blocking pool on both.
#[derive(Clone)]
pub enum Backend {
    Embedded(Arc<SecretStore>),
    Postgres(Arc<PgStore>),
}

/// Runs CPU-heavy store work (Argon2id, decrypting or re-sealing every value) off the async
/// workers; an async PostgreSQL operation is driven from the blocking thread on this runtime.
async fn offload<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io {
            context: "secret store task".into(),
            source: std::io::Error::other(e.to_string()),
        })?
}

impl Backend {
    pub fn is_sealed(&self) -> bool {
        match self {
            Backend::Embedded(s) => s.is_sealed(),
            Backend::Postgres(s) => s.is_sealed(),
        }
    }

    #[inline]
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<SecretValue, StoreError> {
        match self {
            Backend::Embedded(s) => s.get(name, version),
            Backend::Postgres(s) => s.get(name, version),
        }
    }

    pub fn list(&self) -> Vec<SecretMeta> {
        match self {
            Backend::Embedded(s) => s.list(),
            Backend::Postgres(s) => s.list(),
        }
    }

    pub fn versions(&self, name: &str) -> Result<Vec<VersionMeta>, StoreError> {
        match self {
            Backend::Embedded(s) => s.versions(name),
            Backend::Postgres(s) => s.versions(name),
        }
    }

    /// Secrets visible in `list`.
    pub fn count(&self) -> usize {
        match self {
            Backend::Embedded(s) => s.count(),
            Backend::Postgres(s) => s.count(),
        }
    }

    pub fn integrity_errors(&self) -> Vec<IntegrityError> {
        match self {
            Backend::Embedded(s) => s.integrity_errors(),
            Backend::Postgres(s) => s.integrity_errors(),
        }
    }

    pub fn seal(&self) {
        match self {
            Backend::Embedded(s) => s.seal(),
            Backend::Postgres(s) => s.seal(),
        }
    }

    /// A new version of `name` (only if the current one is `expected`, when given).
    pub async fn set(
        &self,
        name: String,
        value: SecretBytes,
        expected: Option<u64>,
    ) -> Result<u64, StoreError> {
        match self {
            Backend::Embedded(s) => {
                let s = s.clone();
                offload(move || match expected {
                    Some(e) => s.set_if_version(&name, value.as_slice(), e),
                    None => s.set(&name, value.as_slice()),
                })
                .await
            }
            Backend::Postgres(s) => match expected {
                Some(e) => s.set_if_version(&name, value.as_slice(), e).await,
                None => s.set(&name, value.as_slice()).await,
            },
        }
    }

    pub async fn delete(&self, name: String) -> Result<(), StoreError> {
        match self {
            Backend::Embedded(s) => {
                let s = s.clone();
                offload(move || s.delete(&name)).await
            }
            Backend::Postgres(s) => s.delete(&name).await,
        }
    }

    pub async fn destroy(
        &self,
        name: String,
        versions: Option<Vec<u64>>,
    ) -> Result<(), StoreError> {
        match self {
            Backend::Embedded(s) => {
                let s = s.clone();
                offload(move || s.destroy(&name, versions.as_deref())).await
            }
            Backend::Postgres(s) => s.destroy(&name, versions.as_deref()).await,
        }
    }

    /// Changes the master password: checked against `current` if given (works sealed), else
    /// the unsealed store's keys are re-wrapped.
    pub async fn rotate_master(
        &self,
        current: Option<SecretBytes>,
        new: SecretBytes,
    ) -> Result<(), StoreError> {
        match self.clone() {
            Backend::Embedded(s) => {
                offload(move || match current {
                    Some(old) => s.rotate_master(old.as_slice(), new.as_slice()),
                    None => s.rotate_master_unsealed(new.as_slice()),
                })
                .await
            }
            Backend::Postgres(s) => {
                let rt = tokio::runtime::Handle::current();
                offload(move || {
                    rt.block_on(async {
                        match current {
                            Some(old) => s.rotate_master(old.as_slice(), new.as_slice()).await,
                            None => s.rotate_master_unsealed(new.as_slice()).await,
                        }
                    })
                })
                .await
            }
        }
    }

    /// Re-seals every value under a new data key; the number of secrets.
    pub async fn rekey(&self) -> Result<usize, StoreError> {
        match self.clone() {
            Backend::Embedded(s) => offload(move || s.rekey().map(|()| s.count())).await,
            Backend::Postgres(s) => {
                let rt = tokio::runtime::Handle::current();
                offload(move || rt.block_on(s.rekey()).map(|()| s.count())).await
            }
        }
    }

    /// Unseals with `password` (one Argon2id derivation, then every value decrypted).
    pub async fn unseal(&self, password: SecretBytes) -> Result<UnsealReport, StoreError> {
        match self.clone() {
            Backend::Embedded(s) => offload(move || s.unseal(password.as_slice())).await,
            Backend::Postgres(s) => {
                let rt = tokio::runtime::Handle::current();
                offload(move || rt.block_on(s.unseal(password.as_slice()))).await
            }
        }
    }
}

/// The daemon's secret store: absent until `warden init` has created it, then open for the
/// daemon's life, sealed or unsealed. On the PostgreSQL backend the store also follows the
/// other daemons' changes (LISTEN/NOTIFY) and tells this daemon's watchers about them.
pub struct Vault {
    location: Location,
    store: RwLock<Option<Backend>>,
    /// Serialises opening (connecting to PostgreSQL is async and must happen once).
    opening: tokio::sync::Mutex<()>,
    /// Bumped by every change of what the store serves (a write, a delete, seal, unseal, and
    /// on PostgreSQL another daemon's change): what `secrets.watch` streams, so that mirrors
    /// know when to fetch again.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Set at shutdown: watch streams end instead of holding the drain open.
    closing: std::sync::atomic::AtomicBool,
    /// Upstream mode: the secrets are the ones mirrored from a central warden, not the store's.
    mirror: std::sync::OnceLock<Arc<Mirror>>,
}

impl Vault {
    /// A vault on the embedded store in `cfg.dir`, or, given `pg`, on PostgreSQL.
    pub fn new(cfg: StoreConfig, pg: Option<PgConfig>) -> Vault {
        Vault {
            location: match pg {
                Some(pg) => Location::Postgres(pg),
                None => Location::Embedded(cfg),
            },
            store: RwLock::new(None),
            opening: tokio::sync::Mutex::new(()),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            closing: std::sync::atomic::AtomicBool::new(false),
            mirror: std::sync::OnceLock::new(),
        }
    }

    /// Serves the secrets of `mirror` (upstream mode) instead of the store's.
    pub fn set_mirror(&self, mirror: Arc<Mirror>) {
        let _ = self.mirror.set(mirror);
    }

    fn mirror(&self) -> Option<&Arc<Mirror>> {
        self.mirror.get()
    }

    /// Writes belong on the central warden in upstream mode.
    fn writable(&self) -> Result<(), ErrorBody> {
        match self.mirror() {
            Some(m) => Err(err(
                ErrorCode::Unavailable,
                format!(
                    "this daemon serves secrets mirrored from {}: change them there",
                    m.url()
                ),
            )),
            None => Ok(()),
        }
    }

    /// Ends every `secrets.watch` stream (the daemon is shutting down).
    pub fn close_watchers(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify_changed();
    }

    /// Tells the watchers (`secrets.watch`) that what the store serves has changed.
    pub fn notify_changed(&self) {
        self.changes.send_modify(|g| *g += 1);
    }

    /// The change generation, to wait on (see [`Vault::notify_changed`]).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Where the store is, for messages: its directory, or its PostgreSQL schema.
    pub fn location(&self) -> String {
        match &self.location {
            Location::Embedded(c) => c.dir.display().to_string(),
            Location::Postgres(c) => format!("PostgreSQL schema {}", c.schema),
        }
    }

    fn not_initialized(&self) -> StoreError {
        StoreError::NotInitialized(self.location().into())
    }

    /// The open store; opens it first if it exists and is not open yet (a store created by
    /// `warden init` while the daemon runs is picked up here). `Ok(None)`: no store yet. On
    /// PostgreSQL, opening connects, migrates the schema and starts the listener that keeps
    /// this daemon in step with the others.
    pub async fn open(&self) -> Result<Option<Backend>, StoreError> {
        if let Some(s) = self.store.read().as_ref() {
            return Ok(Some(s.clone()));
        }
        let _opening = self.opening.lock().await;
        if let Some(s) = self.store.read().as_ref() {
            return Ok(Some(s.clone()));
        }
        let opened = match &self.location {
            Location::Embedded(cfg) => {
                SecretStore::open(cfg.clone()).map(|s| Backend::Embedded(Arc::new(s)))
            }
            Location::Postgres(cfg) => PgStore::open(cfg.clone()).await.map(|s| {
                let s = Arc::new(s);
                let changes = Arc::downgrade(&self.changes);
                s.on_change(move || {
                    if let Some(c) = changes.upgrade() {
                        c.send_modify(|g| *g += 1);
                    }
                });
                s.spawn_listener();
                Backend::Postgres(s)
            }),
        };
        match opened {
            Ok(s) => {
                *self.store.write() = Some(s.clone());
                Ok(Some(s))
            }
            Err(StoreError::NotInitialized(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The store, if it is open and unsealed; `DAEMON_LOCKED` otherwise.
    fn unsealed(&self) -> Result<Backend, ErrorBody> {
        match self.store.read().as_ref() {
            Some(s) if !s.is_sealed() => Ok(s.clone()),
            Some(_) => Err(locked()),
            None => Err(err(
                ErrorCode::DaemonLocked,
                format!(
                    "there is no secret store in {} yet: create one with `warden init`, then `warden unseal`",
                    self.location()
                ),
            )),
        }
    }

    pub fn is_sealed(&self) -> bool {
        if self.mirror().is_some() {
            return false;
        }
        self.store.read().as_ref().is_none_or(|s| s.is_sealed())
    }

    /// Secrets held decrypted (0 while sealed).
    pub fn loaded(&self) -> usize {
        if let Some(m) = self.mirror() {
            return m.loaded();
        }
        match self.store.read().as_ref() {
            Some(s) if !s.is_sealed() => s.count(),
            _ => 0,
        }
    }

    /// Opens the store if needed and unseals it (slow: one Argon2id derivation, on the
    /// blocking pool).
    pub async fn unseal(&self, password: SecretBytes) -> Result<UnsealReport, StoreError> {
        let store = self.open().await?.ok_or_else(|| self.not_initialized())?;
        let report = store.unseal(password).await?;
        self.notify_changed();
        Ok(report)
    }

    /// Wipes the keys and values from memory.
    pub fn seal(&self) {
        if let Some(s) = self.store.read().as_ref() {
            s.seal();
        }
        self.notify_changed();
    }
}

fn locked() -> ErrorBody {
    err(
        ErrorCode::DaemonLocked,
        "the secret store is sealed: unseal it with `warden unseal` (or start the daemon with a master password file)",
    )
}

/// The master password file to unseal from at start: `--master-password-file`, else
/// `secrets.master_password_file`, else `$CREDENTIALS_DIRECTORY/warden-master` if it exists.
pub fn master_password_file(explicit: Option<&Path>, configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit.or(configured) {
        return Some(p.to_path_buf());
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let p = Path::new(&dir).join("warden-master");
    p.exists().then_some(p)
}

/// Reads a master password file: a regular file that neither group nor others may access;
/// its content without one trailing newline. The bytes are wiped when dropped.
pub fn read_password_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is accessible to group or others (mode {:04o}): chmod 0600 it",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    let mut bytes =
        Zeroizing::new(std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?);
    strip_newline(&mut bytes);
    if bytes.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(bytes)
}

/// Removes one trailing `\n` (or `\r\n`).
pub fn strip_newline(b: &mut Vec<u8>) {
    if b.last() == Some(&b'\n') {
        b.pop();
        if b.last() == Some(&b'\r') {
            b.pop();
        }
    }
}

/// How a store error is answered. No variant's message holds a value or a password.
fn store_error(e: StoreError) -> ErrorBody {
    let code = match &e {
        StoreError::Sealed => return locked(),
        StoreError::NotInitialized(_) => ErrorCode::DaemonLocked,
        StoreError::NotFound { .. } => ErrorCode::SecretNotFound,
        StoreError::WrongPassword => ErrorCode::AuthInvalid,
        StoreError::Integrity { .. } => INTEGRITY_ERROR,
        StoreError::Conflict { .. } => ErrorCode::Conflict,
        StoreError::InvalidName | StoreError::ValueTooLarge { .. } | StoreError::InvalidKdf => {
            ErrorCode::ValidationError
        }
        // Another daemon re-keyed after a password change: this one must be unsealed again.
        StoreError::StaleKeys => ErrorCode::DaemonLocked,
        // The PostgreSQL backend could not be reached or failed: retry later.
        StoreError::Io { context, .. } if context.starts_with("PostgreSQL") => {
            tracing::error!(error = %e, "secret store operation failed");
            ErrorCode::Unavailable
        }
        _ => {
            tracing::error!(error = %e, "secret store operation failed");
            ErrorCode::InternalError
        }
    };
    err(code, e.to_string())
}

fn str_param<'v>(params: &'v Value, name: &str) -> Result<&'v str, ErrorBody> {
    params.get(name).and_then(Value::as_str).ok_or_else(|| {
        err(
            ErrorCode::ValidationError,
            format!("`{name}` is required and must be a string"),
        )
    })
}

fn name_param(params: &Value) -> Result<&str, ErrorBody> {
    let name = str_param(params, "key")?;
    check_name(name)?;
    Ok(name)
}

fn check_name(name: &str) -> Result<(), ErrorBody> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(err(
            ErrorCode::ValidationError,
            format!(
                "invalid secret name: use 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . - (not \".\" or \"..\")"
            ),
        ))
    }
}

fn opt_u64(params: &Value, name: &str) -> Result<Option<u64>, ErrorBody> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            err(
                ErrorCode::ValidationError,
                format!("`{name}` must be a positive integer"),
            )
        }),
    }
}

/// `keys`: a list of at most [`MAX_BATCH`] valid secret names.
fn keys_param(params: &Value) -> Result<Vec<&str>, ErrorBody> {
    let keys = params
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            err(
                ErrorCode::ValidationError,
                "`keys` is required and must be a list of secret names",
            )
        })?;
    if keys.len() > MAX_BATCH {
        return Err(err(
            ErrorCode::ValidationError,
            format!("at most {MAX_BATCH} keys per request"),
        ));
    }
    keys.iter()
        .map(|k| {
            let name = k
                .as_str()
                .ok_or_else(|| err(ErrorCode::ValidationError, "every key must be a string"))?;
            check_name(name)?;
            Ok(name)
        })
        .collect()
}

/// `versions`: absent (all), or a list of version numbers.
fn versions_param(params: &Value) -> Result<Option<Vec<u64>>, ErrorBody> {
    let bad = || {
        err(
            ErrorCode::ValidationError,
            "`versions` must be a list of version numbers",
        )
    };
    match params.get("versions") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(Value::as_u64)
            .collect::<Option<Vec<u64>>>()
            .map(Some)
            .ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

fn unix_time(secs: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(secs))
}

/// A password from the params, copied into locked memory for the blocking task.
fn password_param(params: &Value, name: &str) -> Result<SecretBytes, ErrorBody> {
    let p = str_param(params, name)?;
    if p.is_empty() {
        return Err(err(
            ErrorCode::ValidationError,
            format!("`{name}` must not be empty"),
        ));
    }
    SecretBytes::from_slice(p.as_bytes()).map_err(|_| store_error(StoreError::OutOfMemory))
}

impl Ctx<'_> {
    /// Records `permission` as the request's audit resource and checks it.
    fn authorize_resource(&mut self, permission: String) -> Result<(), ErrorBody> {
        let r = self.authorize(&permission);
        self.resource = Some(permission);
        r
    }

    /// Serves one of the secrets methods (see `methods.rs`).
    pub(super) async fn secrets(
        &mut self,
        method: Method,
        req: &Request,
    ) -> Result<Value, ErrorBody> {
        let p = &req.params;
        let vault = &self.state.secrets;
        if !matches!(
            method,
            Method::SecretGet | Method::SecretGetMany | Method::SecretList
        ) {
            // Upstream mode keeps only the current values, in memory.
            vault.writable()?;
        }
        match method {
            Method::SecretGet => {
                let name = name_param(p)?;
                let version = opt_u64(p, "version")?;
                self.authorize_resource(format!("secrets:read:{name}"))?;
                if let Some(m) = vault.mirror() {
                    let (value, v) = m.get(name).map_err(|e| mirror_error(e, name))?;
                    if version.is_some_and(|want| want != v) {
                        return Err(err(
                            ErrorCode::SecretNotFound,
                            format!("only the current version of {name} is mirrored here"),
                        ));
                    }
                    return Ok(json!({ "key": name, "value": value, "version": v }));
                }
                let v = vault.unsealed()?.get(name, version).map_err(store_error)?;
                let text = std::str::from_utf8(v.expose()).map_err(|_| {
                    err(
                        ErrorCode::InternalError,
                        "the stored value is not UTF-8 text",
                    )
                })?;
                Ok(json!({ "key": name, "value": text, "version": v.version() }))
            }
            Method::SecretGetMany => {
                let names = keys_param(p)?;
                // Valid names are ASCII, so the cut falls between characters.
                let mut resource = format!("secrets:read:{}", names.join(","));
                if resource.len() > 512 {
                    resource.truncate(512);
                    resource.push('…');
                }
                self.resource = Some(resource);
                for name in &names {
                    self.authorize(&format!("secrets:read:{name}"))?;
                }
                if let Some(m) = vault.mirror() {
                    let mut secrets = serde_json::Map::new();
                    let mut missing = Vec::new();
                    for name in names {
                        match m.get(name) {
                            Ok((v, _)) => {
                                secrets.insert(name.to_string(), Value::String(v));
                            }
                            Err(MirrorError::NotFound) => missing.push(name),
                            Err(e) => return Err(mirror_error(e, name)),
                        }
                    }
                    let damaged: [&str; 0] = [];
                    return Ok(
                        json!({ "secrets": secrets, "missing": missing, "damaged": damaged }),
                    );
                }
                let store = vault.unsealed()?;
                let mut secrets = serde_json::Map::new();
                let mut missing = Vec::new();
                let mut damaged = Vec::new();
                for name in names {
                    match store.get(name, None) {
                        Ok(v) => match std::str::from_utf8(v.expose()) {
                            Ok(t) => {
                                secrets.insert(name.to_string(), Value::String(t.to_string()));
                            }
                            Err(_) => damaged.push(name),
                        },
                        Err(StoreError::NotFound { .. }) => missing.push(name),
                        Err(StoreError::Integrity { .. }) => damaged.push(name),
                        Err(e) => return Err(store_error(e)),
                    }
                }
                Ok(json!({ "secrets": secrets, "missing": missing, "damaged": damaged }))
            }
            Method::SecretList => {
                self.resource = Some("secrets:read:*".into());
                let listed = match vault.mirror() {
                    Some(m) => m.list().map_err(|e| mirror_error(e, "*"))?,
                    None => vault.unsealed()?.list(),
                };
                let entries: Vec<Value> = listed
                    .into_iter()
                    .filter(|m| {
                        self.rt
                            .policy
                            .decide(self.grants, &format!("secrets:read:{}", m.name))
                            .is_allow()
                    })
                    .map(|m| {
                        json!({
                            "name": m.name,
                            "version": m.latest_version,
                            "versions": m.versions,
                            "updated_at": unix_time(m.updated),
                        })
                    })
                    .collect();
                let names: Vec<Value> = entries.iter().map(|e| e["name"].clone()).collect();
                Ok(json!({ "secrets": names, "count": names.len(), "entries": entries }))
            }
            Method::SecretVersions => {
                let name = name_param(p)?;
                self.authorize_resource(format!("secrets:read:{name}"))?;
                let store = vault.unsealed()?;
                let versions: Vec<Value> = store
                    .versions(name)
                    .map_err(store_error)?
                    .into_iter()
                    .map(|v| {
                        json!({
                            "version": v.version,
                            "created_at": (v.created > 0).then(|| unix_time(v.created)),
                            "damaged": v.damaged,
                        })
                    })
                    .collect();
                Ok(json!({ "key": name, "versions": versions }))
            }
            Method::SecretSet => {
                let name = name_param(p)?.to_string();
                let expected = opt_u64(p, "expected_version")?;
                self.authorize_resource(format!("secrets:write:{name}"))?;
                let value = str_param(p, "value")?;
                let value = SecretBytes::from_slice(value.as_bytes())
                    .map_err(|_| store_error(StoreError::OutOfMemory))?;
                let store = vault.unsealed()?;
                let version = store
                    .set(name.clone(), value, expected)
                    .await
                    .map_err(store_error)?;
                vault.notify_changed();
                Ok(json!({ "key": name, "version": version }))
            }
            Method::SecretDelete => {
                let name = name_param(p)?.to_string();
                self.authorize_resource(format!("secrets:write:{name}"))?;
                let store = vault.unsealed()?;
                store.delete(name.clone()).await.map_err(store_error)?;
                vault.notify_changed();
                Ok(json!({ "key": name, "deleted": true }))
            }
            Method::SecretDestroy => {
                let name = name_param(p)?.to_string();
                let versions = versions_param(p)?;
                self.authorize_resource(format!("secrets:destroy:{name}"))?;
                let store = vault.unsealed()?;
                store
                    .destroy(name.clone(), versions.clone())
                    .await
                    .map_err(store_error)?;
                vault.notify_changed();
                Ok(
                    json!({ "key": name, "destroyed": versions.map_or(Value::from("all"), Value::from) }),
                )
            }
            Method::SecretRotateMaster => {
                let new = password_param(p, "new_password")?;
                let current = match p.get("current_password") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(password_param(p, "current_password")?),
                };
                let store = match &current {
                    // The current password works sealed too.
                    Some(_) => vault
                        .open()
                        .await
                        .map_err(store_error)?
                        .ok_or_else(|| store_error(vault.not_initialized()))?,
                    None => vault.unsealed()?,
                };
                store
                    .rotate_master(current, new)
                    .await
                    .map_err(store_error)?;
                tracing::info!("master password changed");
                Ok(json!({
                    "message": "master password changed",
                    "rotated_at": rfc3339(SystemTime::now()),
                }))
            }
            Method::SecretRekey => {
                let store = vault.unsealed()?;
                let count = store.rekey().await.map_err(store_error)?;
                tracing::info!(secrets = count, "secret store re-keyed");
                Ok(json!({
                    "message": "every value re-sealed under a new data key",
                    "rekeyed_at": rfc3339(SystemTime::now()),
                    "secrets": count,
                }))
            }
            Method::Seal => {
                vault.seal();
                tracing::info!("secret store sealed");
                Ok(json!({ "sealed": true }))
            }
            Method::Unseal => {
                let password = password_param(p, "password")?;
                let report = vault.unseal(password).await.map_err(store_error)?;
                tracing::info!(
                    secrets = report.secrets,
                    integrity_errors = report.integrity_errors,
                    memory_locked = report.memory_locked,
                    "secret store unsealed"
                );
                Ok(unseal_json(&report))
            }
            other => Err(err(
                ErrorCode::InternalError,
                format!("{other:?} is not a secrets method"),
            )),
        }
    }
}

/// How often a watch stream repeats its last frame when nothing changes, unless the client
/// asks otherwise (`heartbeat`, seconds): a mirror that hears nothing for several of these
/// knows its connection is dead.
const WATCH_HEARTBEAT: u64 = 30;

/// `secrets.watch` (streamed): a frame `{"generation": N, "sealed": bool}` at once, then after
/// every change of what the store serves (changes in quick succession coalesce into one
/// frame) and every `heartbeat` seconds without one. The frames name no secret: a watcher
/// fetches again what the policy lets it read. The stream ends when the client goes away or
/// the daemon shuts down.
pub async fn watch(ctx: &Ctx<'_>, req: &Request, sink: &StreamSink) -> Result<Value, ErrorBody> {
    let p = &req.params;
    if let Some(k) = p
        .as_object()
        .and_then(|o| o.keys().find(|k| k.as_str() != "heartbeat"))
    {
        return Err(err(
            ErrorCode::ValidationError,
            format!("unknown parameter `{k}` (expected: heartbeat)"),
        ));
    }
    let heartbeat = match p.get("heartbeat") {
        None | Some(Value::Null) => WATCH_HEARTBEAT,
        Some(v) => v
            .as_u64()
            .filter(|s| (1..=3600).contains(s))
            .ok_or_else(|| {
                err(
                    ErrorCode::ValidationError,
                    "`heartbeat` must be a number of seconds from 1 to 3600",
                )
            })?,
    };
    let vault = &ctx.state.secrets;
    let mut rx = vault.subscribe();
    let mut frames = 0u64;
    loop {
        if vault.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(json!({ "frames": frames, "closing": true }));
        }
        let generation = *rx.borrow_and_update();
        if !sink
            .send_value(&json!({ "generation": generation, "sealed": vault.is_sealed() }))
            .await
        {
            break;
        }
        frames += 1;
        tokio::select! {
            r = rx.changed() => if r.is_err() { break },
            _ = sink.closed() => break,
            _ = tokio::time::sleep(Duration::from_secs(heartbeat)) => {}
        }
    }
    Ok(json!({ "frames": frames, "closing": false }))
}

pub fn unseal_json(r: &UnsealReport) -> Value {
    json!({
        "sealed": false,
        "secrets_loaded": r.secrets,
        "values": r.values,
        "integrity_errors": r.integrity_errors,
        "memory_locked": r.memory_locked,
    })
}

/// At start: opens the store if there is one and, given a master password file, unseals it.
/// A password file that is unreadable or does not open the store stops the start: an
/// unattended daemon that silently stayed sealed would fail every client later instead. So
/// does a PostgreSQL backend that cannot be reached.
pub async fn start(vault: &Vault, password_file: Option<&Path>) -> anyhow::Result<()> {
    let store = vault
        .open()
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the secret store {}: {e}", vault.location()))?;
    let Some(path) = password_file else {
        match store {
            Some(_) => {
                tracing::info!(store = %vault.location(), "secret store sealed: waiting for `warden unseal`")
            }
            None => {
                tracing::info!(store = %vault.location(), "no secret store yet: create one with `warden init`")
            }
        }
        return Ok(());
    };
    let password = read_password_file(path)
        .map_err(|e| anyhow::anyhow!("cannot read the master password file: {e}"))?;
    let password = SecretBytes::from_slice(&password)
        .map_err(|_| anyhow::anyhow!("cannot allocate locked memory for the master password"))?;
    let report = vault.unseal(password).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot unseal the secret store {} with {}: {e}",
            vault.location(),
            path.display()
        )
    })?;
    if report.integrity_errors > 0 {
        tracing::warn!(
            integrity_errors = report.integrity_errors,
            "secret store unsealed with damaged entries"
        );
    }
    if !report.memory_locked {
        tracing::warn!("secret memory is not locked (RLIMIT_MEMLOCK too small and no CAP_IPC_LOCK): values may reach swap");
    }
    tracing::info!(
        secrets = report.secrets,
        "secret store unsealed from the master password file"
    );
    Ok(())
}

/// How a mirrored read that cannot be answered is answered.
fn mirror_error(e: MirrorError, name: &str) -> ErrorBody {
    match e {
        MirrorError::NotFound => err(
            ErrorCode::SecretNotFound,
            format!("no secret named {name} is mirrored here"),
        ),
        MirrorError::Unavailable(why) => err(ErrorCode::Unavailable, why),
    }
}
