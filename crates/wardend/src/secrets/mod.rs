//! # secrets — the encrypted, versioned, crash-safe secret store
//!
//! What it does: keeps named secrets encrypted at rest in one directory, and, once unsealed with
//! the master password, holds their values decrypted in locked memory to serve them by borrowed
//! reference. What it deliberately does not do: transport, authentication, authorization or
//! audit (the request pipeline does those), protect against an attacker who can rewrite the
//! store's files wholesale (rolling back the whole directory to an older copy is not detected;
//! deleting files is possible), or erase data from filesystem blocks it no longer owns.
//!
//! ## Keys
//! Argon2id turns the master password into a key-encryption key (KEK); the KEK wraps a random
//! 256-bit data key; each value is sealed with XChaCha20-Poly1305 under the data key, with the
//! secret's name, version and creation time as associated data, so a ciphertext moved to another
//! name or version fails to open. The KDF parameters and salt are recorded in the keyfile.
//! [`KdfParams::default`] is 128 MiB × 4 passes (≈0.4 s per derivation measured on the
//! development machine).
//!
//! ## Files (in [`StoreConfig::dir`])
//! - `key.a`, `key.b` — two identical copies of the keyfile (generation, KDF parameters, salt,
//!   wrapped data keys, SHA-256 checksum). Every change writes `key.a` then `key.b`, each by
//!   atomic replace (write temporary, fsync, rename, fsync directory). A crash leaves each copy
//!   old or new, so the old or the new password opens the store, never neither; a single
//!   damaged copy is reported and repaired from the other on the next unseal.
//! - `secrets.log` — an append-only log of self-checksummed records (value put, soft delete,
//!   destroy, head). A write is acknowledged only after `fdatasync`. On open the log is scanned:
//!   the one write a crash can leave torn at the end (a valid header whose body runs past the end
//!   of the file, or zeros) is cut off; any other damage is confined to the records it touches,
//!   reported for their entry, and the scan resynchronises on the next valid record.
//! - `lock` — `flock`ed while a [`SecretStore`] is open, so two processes never append at once.
//!
//! Compaction rewrites the log with only what is kept (atomic replace as above) when more than
//! half of it is dead, and always after a destroy. Destroy first appends its record, then
//! overwrites the destroyed ciphertexts in place with zeros and fsyncs, then compacts. Rekey
//! adds the new data key to the keyfile, rewrites the log re-sealed under it, then drops the old
//! key from the keyfile: after a crash at any step every record's key is in the keyfile.
//!
//! Why a log and not an embedded database: one writer, small records and a need to erase
//! ciphertext on demand are served by a few hundred lines whose crash behaviour is plain to
//! read and test, and damage to one record cannot make the rest unreadable. Damaged records are
//! kept byte for byte by compaction, so they stay reported until their versions are destroyed.
//!
//! What is authenticated: each value (AEAD, bound to name, version and creation time) and each
//! wrapped data key. What is only checksummed: the framing, delete/destroy markers and version
//! counters; someone who can write the files can hide or drop entries (as they could by deleting
//! files) but cannot make a value read as another.
//!
//! ## Memory
//! Unsealed keys and values live in [`SecretBytes`]: locked (`mlock`), excluded from core dumps,
//! wiped in forked children, zeroized on drop. [`SecretStore::get`] hands out a [`SecretValue`],
//! a reference-counted handle to the one decrypted copy (no copy per read); [`SecretStore::seal`]
//! drops the store's references, so each value is wiped as soon as no reader holds it. The KEK
//! stays (locked) while unsealed so that [`SecretStore::rekey`] can wrap a new data key without
//! asking for the password again. No type here prints a key or value in `Debug`, and no error
//! message contains one. Names, version numbers and timestamps are not secret: they are stored
//! in clear and [`SecretStore::list`] works while sealed.
//!
//! ## Figures
//! Release build, 2 AMD EPYC cores (`cargo test -p wardend --lib --release
//! secrets::tests::measure -- --ignored --nocapture`): unseal with the default KDF 0.37 s;
//! 100 000 secrets of 32 bytes: open 0.15 s, open + unseal 0.78 s, resident memory 83 MiB;
//! `get` p50 0.54 µs, p99 0.87 µs; `set` (with fdatasync) 0.45 ms.

#![deny(unsafe_code)]

mod crypto;
mod format;
mod index;
#[allow(unsafe_code)]
mod memory;
pub mod postgres;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use parking_lot::{Mutex, RwLock};

pub use crypto::KdfParams;
use format::{Hint, Item, Keyfile, PutRec, Record, WrappedKey};
use index::{Body, State, Unsealed};
pub use memory::{all_memory_locked, OutOfMemory, SecretBytes};

/// Largest value accepted by [`SecretStore::set`].
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// Longest secret name.
pub const MAX_NAME_LEN: usize = 128;

const LOG: &str = "secrets.log";
const KEYFILES: [&str; 2] = ["key.a", "key.b"];
const LOCK: &str = "lock";
/// Compaction starts when the log exceeds twice what is kept plus this much.
const COMPACT_SLACK: u64 = 64 * 1024;

/// Whether `name` is a valid secret name: 1 to 128 of `A-Z a-z 0-9 _ . -`, and not `.` or `..`
/// (so a name is safe as a path component and in a policy pattern).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Where the store lives and how it behaves.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Directory of the store (created by [`SecretStore::init`] with mode 0700).
    pub dir: PathBuf,
    /// How many versions of each secret are kept (older ones are dropped); at least 1.
    pub keep_versions: usize,
    /// KDF parameters for [`SecretStore::init`] and [`SecretStore::rotate_master`]; unseal
    /// always uses the parameters recorded in the store.
    pub kdf: KdfParams,
}

impl StoreConfig {
    /// Defaults: keep 10 versions, [`KdfParams::default`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            keep_versions: 10,
            kdf: KdfParams::default(),
        }
    }
}

/// Everything that can go wrong. No message ever contains a secret value, key or password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the secret store is sealed: unseal it with the master password first")]
    Sealed,
    #[error("no secret {name:?}{}", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    NotFound { name: String, version: Option<u64> },
    #[error("wrong master password")]
    WrongPassword,
    #[error("secret {name:?} version {version} is damaged or was tampered with: destroy that version or restore the store from a backup")]
    Integrity { name: String, version: u64 },
    #[error("version conflict on {name:?}: expected current version {expected}, it is {current}")]
    Conflict {
        name: String,
        expected: u64,
        current: u64,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the data key was changed on another daemon after a master password change: unseal this daemon again with the current master password")]
    StaleKeys,
    #[error("a secret store already exists in {0}")]
    AlreadyExists(PathBuf),
    #[error("no secret store in {0}: create one first (warden init)")]
    NotInitialized(PathBuf),
    #[error("the secret store in {0} is open in another process")]
    Locked(PathBuf),
    #[error(
        "invalid secret name: use 1 to 128 characters of A-Z a-z 0-9 _ . - (not \".\" or \"..\")"
    )]
    InvalidName,
    #[error("value too large: {len} bytes, the limit is {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error(
        "both keyfile copies (key.a, key.b) are damaged or missing: restore one from a backup"
    )]
    KeyfileDamaged,
    #[error("the secret store is damaged: {0}")]
    Damaged(String),
    #[error("KDF parameters out of range (memory 8 KiB..4 GiB, 1..64 passes, 1..16 lanes)")]
    InvalidKdf,
    #[error("invalid store configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("could not allocate locked memory for secrets")]
    OutOfMemory,
    #[error("the system random number generator failed")]
    Random,
    #[error("encryption failed")]
    Crypto,
}

impl From<memory::OutOfMemory> for StoreError {
    fn from(_: memory::OutOfMemory) -> Self {
        StoreError::OutOfMemory
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// A decrypted value handed to a reader: a shared reference to the store's one locked copy.
/// The bytes are wiped when the store is sealed and the last `SecretValue` is dropped.
#[derive(Clone)]
pub struct SecretValue {
    version: u64,
    created: u64,
    bytes: Arc<SecretBytes>,
}

impl SecretValue {
    /// The value. Copy it only where it must go (into a reply buffer, say).
    pub fn expose(&self) -> &[u8] {
        self.bytes.as_slice()
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    /// Creation time of this version, seconds since the Unix epoch.
    pub fn created(&self) -> u64 {
        self.created
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretValue")
            .field("version", &self.version)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// One secret as [`SecretStore::list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMeta {
    pub name: String,
    /// Highest version kept.
    pub latest_version: u64,
    /// Number of versions kept.
    pub versions: usize,
    /// Creation time of the latest version (Unix seconds).
    pub updated: u64,
}

/// One kept version, as [`SecretStore::versions`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionMeta {
    pub version: u64,
    /// Unix seconds; 0 when the record is damaged.
    pub created: u64,
    /// The record fails its checksum or does not decrypt.
    pub damaged: bool,
}

/// A part of the store that failed to read or open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrityError {
    /// The secret it belongs to, when that can still be read.
    pub name: Option<String>,
    pub version: Option<u64>,
    /// `secrets.log`, `key.a` or `key.b`.
    pub file: &'static str,
    /// Byte offset in the file, when known.
    pub offset: Option<u64>,
    pub problem: &'static str,
}

impl fmt::Display for IntegrityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(o) = self.offset {
            write!(f, " at byte {o}")?;
        }
        if let Some(n) = &self.name {
            write!(f, ", secret {n:?}")?;
        }
        if let Some(v) = self.version {
            write!(f, " version {v}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// What [`SecretStore::unseal`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsealReport {
    /// Secrets visible in [`SecretStore::list`].
    pub secrets: usize,
    /// Values decrypted (all kept versions).
    pub values: usize,
    /// Entries that failed to read or open; see [`SecretStore::integrity_errors`].
    pub integrity_errors: usize,
    /// Whether all key and value memory is locked into RAM (false: `RLIMIT_MEMLOCK` too small
    /// and no `CAP_IPC_LOCK`; values may then reach swap).
    pub memory_locked: bool,
}

/// The log file, appended to at `len` (positional writes, so a failed append can be undone).
struct Writer {
    file: File,
    len: u64,
}

impl Writer {
    /// Appends and fsyncs; returns the record's offset. A failed write is cut off again.
    fn append(&mut self, bytes: &[u8]) -> Result<u64, StoreError> {
        let off = self.len;
        let res = self
            .file
            .write_all_at(bytes, off)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = res {
            let _ = self.file.set_len(off);
            return Err(io_err("appending to secrets.log")(e));
        }
        self.len += bytes.len() as u64;
        Ok(off)
    }
}

/// The encrypted secret store. `Send + Sync`: readers share a read lock on the in-memory index;
/// writers are serialized by a mutex around the log and take the index's write lock only to
/// publish a durable change, so a read never waits for an fsync.
pub struct SecretStore {
    dir: PathBuf,
    cfg: StoreConfig,
    io: Mutex<Writer>,
    state: RwLock<State>,
    _lock: Flock<File>,
    /// Tests stop a rekey after step 1 or 2 to stand for a crash there.
    #[cfg(test)]
    rekey_stop: std::sync::atomic::AtomicU8,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretStore")
            .field("dir", &self.dir)
            .field("sealed", &self.is_sealed())
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match File::open(path) {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b)
                .map_err(io_err(format!("reading {}", path.display())))?;
            Ok(Some(b))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("opening {}", path.display()))(e)),
    }
}

/// Unwraps every data key of `kf` with `kek`; `None` if any fails (wrong password).
fn unwrap_keys(
    kf: &Keyfile,
    kek: &SecretBytes,
) -> Result<Option<HashMap<u32, SecretBytes>>, StoreError> {
    let mut keys = HashMap::new();
    for wk in &kf.keys {
        match crypto::open(kek, &wk.nonce, &kf.wrap_ad(wk.id), &wk.wrapped)? {
            Some(k) if k.len() == crypto::KEY_LEN => {
                keys.insert(wk.id, k);
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(keys))
}

fn wrap_key(
    kf: &Keyfile,
    kek: &SecretBytes,
    id: u32,
    key: &SecretBytes,
) -> Result<WrappedKey, StoreError> {
    let nonce = crypto::random()?;
    let sealed = crypto::seal(kek, &nonce, &kf.wrap_ad(id), key.as_slice())?;
    let wrapped = sealed
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::Crypto)?;
    Ok(WrappedKey { id, nonce, wrapped })
}

impl SecretStore {
    /// Creates a new store in `cfg.dir` protected by `password`. Refuses if a store (or any of
    /// its files) is already there.
    pub fn init(cfg: &StoreConfig, password: &[u8]) -> Result<(), StoreError> {
        cfg.kdf.validate()?;
        let dir = &cfg.dir;
        let log_path = dir.join(LOG);
        let keyfile_exists = KEYFILES.iter().any(|f| dir.join(f).exists());
        // An empty log and no keyfile: an earlier init crashed before it finished.
        if !keyfile_exists && fs::metadata(&log_path).is_ok_and(|m| m.len() == 0) {
            let _ = fs::remove_file(&log_path);
        }
        if keyfile_exists || log_path.exists() {
            return Err(StoreError::AlreadyExists(dir.clone()));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(format!("creating {}", dir.display())))?;
        // The log first: a keyfile without a log can then only mean the log was lost.
        let log = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(LOG))
            .map_err(|e| {
                if e.kind() == ErrorKind::AlreadyExists {
                    StoreError::AlreadyExists(dir.clone())
                } else {
                    io_err("creating secrets.log")(e)
                }
            })?;
        log.sync_all().map_err(io_err("creating secrets.log"))?;
        let mut kf = Keyfile {
            generation: 1,
            kdf: cfg.kdf,
            salt: crypto::random()?,
            keys: Vec::new(),
        };
        let kek = crypto::derive_kek(password, &kf.salt, &kf.kdf)?;
        let key = crypto::random_key()?;
        kf.keys.push(wrap_key(&kf, &kek, 1, &key)?);
        write_keyfiles(dir, &kf)
    }

    /// Opens an existing store, sealed. Takes an exclusive lock on it for the life of the
    /// returned value, cuts off a write torn by a crash, and indexes the log.
    pub fn open(cfg: StoreConfig) -> Result<SecretStore, StoreError> {
        if cfg.keep_versions == 0 {
            return Err(StoreError::InvalidConfig(
                "keep_versions must be at least 1",
            ));
        }
        let dir = cfg.dir.clone();
        let have_keyfile = KEYFILES.iter().any(|f| dir.join(f).exists());
        if !have_keyfile && !dir.join(LOG).exists() {
            return Err(StoreError::NotInitialized(dir));
        }
        let lockf = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(LOCK))
            .map_err(io_err("opening the store's lock file"))?;
        let lock = Flock::lock(lockf, FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::Locked(dir.clone()))?;
        for f in [LOG, KEYFILES[0], KEYFILES[1]] {
            let _ = fs::remove_file(dir.join(format!("{f}.tmp")));
        }
        let mut keyfiles = [None, None];
        for (i, f) in KEYFILES.iter().enumerate() {
            keyfiles[i] = read_opt(&dir.join(f))?.and_then(|b| Keyfile::decode(&b));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(LOG))
            .map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    StoreError::Damaged("secrets.log is missing".into())
                } else {
                    io_err("opening secrets.log")(e)
                }
            })?;
        let mut buf = Vec::new();
        (&file)
            .read_to_end(&mut buf)
            .map_err(io_err("reading secrets.log"))?;
        let scan = format::scan(&buf);
        let mut state = State {
            entries: HashMap::new(),
            orphans: Vec::new(),
            keyfiles,
            unsealed: None,
            live_bytes: 0,
            keep: cfg.keep_versions,
        };
        for item in scan.items {
            match item {
                Item::Good { off, rec, .. } => state.apply(rec, off as u64),
                Item::Bad { off, len, hint } => {
                    state.apply_damaged(off as u64, &buf[off..off + len], hint)
                }
            }
        }
        if scan.clean_len < buf.len() {
            file.set_len(scan.clean_len as u64)
                .and_then(|()| file.sync_all())
                .map_err(io_err("cutting a torn write off secrets.log"))?;
        }
        Ok(SecretStore {
            dir,
            cfg,
            io: Mutex::new(Writer {
                file,
                len: scan.clean_len as u64,
            }),
            state: RwLock::new(state),
            _lock: lock,
            #[cfg(test)]
            rekey_stop: std::sync::atomic::AtomicU8::new(0),
        })
    }

    pub fn is_sealed(&self) -> bool {
        self.state.read().unsealed.is_none()
    }

    /// Derives the KEK from `password` with the recorded KDF parameters, unwraps the data keys
    /// and decrypts every kept value into locked memory. Values that fail to decrypt are
    /// reported (see [`SecretStore::integrity_errors`]), not fatal. Calling it while unsealed
    /// checks the password and decrypts again.
    pub fn unseal(&self, password: &[u8]) -> Result<UnsealReport, StoreError> {
        let _io = self.io.lock();
        let copies = self.state.read().keyfiles.clone();
        let mut cands: Vec<&Keyfile> = copies.iter().flatten().collect();
        if cands.is_empty() {
            return Err(StoreError::KeyfileDamaged);
        }
        cands.sort_by_key(|k| std::cmp::Reverse(k.generation));
        cands.dedup();
        let mut opened = None;
        for kf in &cands {
            let kek = crypto::derive_kek(password, &kf.salt, &kf.kdf)?;
            if let Some(keys) = unwrap_keys(kf, &kek)? {
                opened = Some(((*kf).clone(), kek, keys));
                break;
            }
        }
        let (kf, kek, keys) = opened.ok_or(StoreError::WrongPassword)?;
        // The newest copy opened: bring a damaged, missing or older copy up to it.
        if kf.generation == cands[0].generation {
            for (i, c) in copies.iter().enumerate() {
                if c.as_ref() != Some(&kf) {
                    format::write_atomic(&self.dir, KEYFILES[i], &kf.encode())
                        .map_err(io_err(format!("repairing {}", KEYFILES[i])))?;
                }
            }
        }
        let current = keys.keys().copied().max().unwrap_or(0);
        let mut st = self.state.write();
        if kf.generation == cands[0].generation {
            st.keyfiles = [Some(kf.clone()), Some(kf.clone())];
        }
        let mut values = 0;
        for (name, e) in st.entries.iter_mut() {
            for (&ver, v) in e.versions.iter_mut() {
                if let Body::Sealed {
                    key_id,
                    nonce,
                    sealed,
                    plain,
                    bad,
                } = &mut v.body
                {
                    let opened = match keys.get(key_id) {
                        Some(k) => {
                            crypto::open(k, nonce, &crypto::value_ad(name, ver, v.created), sealed)?
                        }
                        None => None,
                    };
                    *bad = opened.is_none();
                    values += usize::from(opened.is_some());
                    *plain = opened.map(Arc::new);
                }
            }
        }
        st.unsealed = Some(Unsealed {
            kek,
            keyfile: kf,
            keys,
            current,
        });
        let secrets = st
            .entries
            .values()
            .filter(|e| !e.deleted && !e.versions.is_empty())
            .count();
        drop(st);
        Ok(UnsealReport {
            secrets,
            values,
            integrity_errors: self.integrity_errors().len(),
            memory_locked: memory::all_memory_locked(),
        })
    }

    /// Wipes the keys and the store's references to decrypted values. Values a reader still
    /// holds as [`SecretValue`] are wiped when the reader drops them.
    pub fn seal(&self) {
        self.state.write().wipe();
    }

    /// The value of `name` at `version`, or at its highest kept version. A damaged version is an
    /// error, never silently replaced by an older one.
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<SecretValue, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName);
        }
        let st = self.state.read();
        st.unsealed()?;
        let e = st.visible(name)?;
        if st.marker_damaged(name) {
            return Err(StoreError::Integrity {
                name: name.to_owned(),
                version: e.latest,
            });
        }
        let found = match version {
            Some(v) => e.versions.get_key_value(&v),
            None => e.versions.last_key_value(),
        };
        let (&ver, v) = found.ok_or_else(|| StoreError::NotFound {
            name: name.to_owned(),
            version,
        })?;
        match &v.body {
            Body::Sealed { plain: Some(p), .. } => Ok(SecretValue {
                version: ver,
                created: v.created,
                bytes: p.clone(),
            }),
            _ => Err(StoreError::Integrity {
                name: name.to_owned(),
                version: ver,
            }),
        }
    }

    /// Stores `value` as a new version of `name` (creating it, or bringing it back if it was
    /// deleted); returns the version. Durable on disk before it returns.
    pub fn set(&self, name: &str, value: &[u8]) -> Result<u64, StoreError> {
        self.put(name, value, None)
    }

    /// Like [`SecretStore::set`], but only if the current version (the one `get(name, None)`
    /// returns; 0 when the secret does not exist, is deleted or has no version left) is
    /// `expected`; otherwise [`StoreError::Conflict`] with the current version.
    pub fn set_if_version(
        &self,
        name: &str,
        value: &[u8],
        expected: u64,
    ) -> Result<u64, StoreError> {
        self.put(name, value, Some(expected))
    }

    fn put(&self, name: &str, value: &[u8], expected: Option<u64>) -> Result<u64, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName);
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(StoreError::ValueTooLarge {
                len: value.len(),
                max: MAX_VALUE_LEN,
            });
        }
        let mut io = self.io.lock();
        let plain = Arc::new(SecretBytes::from_slice(value)?);
        let rec = {
            let st = self.state.read();
            let u = st.unsealed()?;
            // `current` is what get(name, None) would return; `latest` never goes back.
            let (latest, current) = match st.entries.get(name) {
                Some(e) if !e.deleted => {
                    (e.latest, e.versions.last_key_value().map_or(0, |v| *v.0))
                }
                Some(e) => (e.latest, 0),
                None => (0, 0),
            };
            if let Some(expected) = expected {
                if expected != current {
                    return Err(StoreError::Conflict {
                        name: name.to_owned(),
                        expected,
                        current,
                    });
                }
            }
            let version = latest + 1;
            let created = now();
            let nonce = crypto::random()?;
            let key = u.keys.get(&u.current).ok_or(StoreError::Sealed)?;
            let sealed = crypto::seal(
                key,
                &nonce,
                &crypto::value_ad(name, version, created),
                value,
            )?;
            PutRec {
                name: name.to_owned(),
                version,
                created,
                key_id: u.current,
                nonce,
                sealed,
            }
        };
        let version = rec.version;
        let off = io.append(&format::encode(&Record::Put(rec.clone())))?;
        {
            // A seal() that ran while the record was written must not get a value back.
            let mut st = self.state.write();
            let plain = st.unsealed.is_some().then_some(plain);
            st.apply_put(rec, off, plain);
        }
        self.maybe_compact(&mut io, false);
        Ok(version)
    }

    /// Every visible secret (not deleted, at least one version kept), sorted by name. Works
    /// sealed too: names and version numbers are not encrypted.
    pub fn list(&self) -> Vec<SecretMeta> {
        let st = self.state.read();
        let mut out: Vec<SecretMeta> = st
            .entries
            .iter()
            .filter(|(_, e)| !e.deleted)
            .filter_map(|(name, e)| {
                let (&latest_version, v) = e.versions.last_key_value()?;
                Some(SecretMeta {
                    name: name.clone(),
                    latest_version,
                    versions: e.versions.len(),
                    updated: v.created,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// How many secrets [`SecretStore::list`] would show, without building the list.
    pub fn count(&self) -> usize {
        self.state
            .read()
            .entries
            .values()
            .filter(|e| !e.deleted && !e.versions.is_empty())
            .count()
    }

    /// The kept versions of `name`, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<VersionMeta>, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName);
        }
        let st = self.state.read();
        let e = st.visible(name)?;
        Ok(e.versions
            .iter()
            .map(|(&version, v)| VersionMeta {
                version,
                created: v.created,
                damaged: matches!(
                    v.body,
                    Body::Damaged { .. } | Body::Sealed { bad: true, .. }
                ),
            })
            .collect())
    }

    /// Soft delete: hides `name` from get and list; its versions stay on disk (a later set
    /// brings it back with a new version; destroy erases them).
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName);
        }
        let mut io = self.io.lock();
        {
            let st = self.state.read();
            st.unsealed()?;
            st.visible(name)?;
        }
        let off = io.append(&format::encode(&Record::Delete {
            name: name.to_owned(),
        }))?;
        self.state.write().apply(
            Record::Delete {
                name: name.to_owned(),
            },
            off,
        );
        self.maybe_compact(&mut io, false);
        Ok(())
    }

    /// Erases the given versions of `name` (all when `None`), deleted or not: their values are
    /// wiped from memory, their ciphertext is overwritten with zeros in the log and compacted
    /// away. Version numbers are not reused afterwards.
    pub fn destroy(&self, name: &str, versions: Option<&[u64]>) -> Result<(), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName);
        }
        if versions.is_some_and(|v| v.is_empty()) {
            return Ok(());
        }
        let mut io = self.io.lock();
        let (list, spans) = {
            let st = self.state.read();
            st.unsealed()?;
            let e = st.entries.get(name).ok_or_else(|| StoreError::NotFound {
                name: name.to_owned(),
                version: None,
            })?;
            let list: Vec<u64> = match versions {
                Some(vs) => vs.to_vec(),
                None => Vec::new(),
            };
            let mut spans = Vec::new();
            for (ver, v) in e.versions.iter() {
                if list.is_empty() || list.contains(ver) {
                    spans.push(match &v.body {
                        Body::Sealed { sealed, .. } => (
                            v.off + format::put_sealed_offset(name) as u64,
                            sealed.len() as u64,
                        ),
                        Body::Damaged { raw } => (v.off, raw.len() as u64),
                    });
                }
            }
            for o in &st.orphans {
                if let Some(Hint {
                    name: n,
                    version: Some(v),
                }) = &o.hint
                {
                    if n == name && (list.is_empty() || list.contains(v)) {
                        spans.push((o.off, o.raw.len() as u64));
                    }
                }
            }
            if let Some(missing) = list.iter().find(|v| !e.versions.contains_key(v)) {
                return Err(StoreError::NotFound {
                    name: name.to_owned(),
                    version: Some(*missing),
                });
            }
            (list, spans)
        };
        let rec = Record::Destroy {
            name: name.to_owned(),
            versions: list.clone(),
        };
        let off = io.append(&format::encode(&rec))?;
        // Durable from here on: the values are gone whatever happens to the erasure below.
        self.state.write().apply(rec, off);
        let erased = spans
            .into_iter()
            .try_for_each(|(start, len)| io.file.write_all_at(&vec![0u8; len as usize], start))
            .and_then(|()| io.file.sync_data())
            .map_err(io_err(
                "destroyed, but overwriting the old ciphertext in secrets.log failed",
            ));
        self.maybe_compact(&mut io, true);
        erased
    }

    /// Changes the master password: verifies `old`, then re-wraps the data keys under a KEK
    /// derived from `new` with a fresh salt and the configured KDF parameters. Works sealed or
    /// unsealed. A crash in the middle leaves the old or the new password working.
    pub fn rotate_master(&self, old: &[u8], new: &[u8]) -> Result<(), StoreError> {
        let _io = self.io.lock();
        let (kf, kek) = self.prepare_rotation(old, new)?;
        self.install_rotation(kf, kek)
    }

    /// Writes the keyfile of a password change and, if unsealed, keeps its KEK (the caller
    /// holds the io lock).
    fn install_rotation(&self, kf: Keyfile, kek: SecretBytes) -> Result<(), StoreError> {
        write_keyfiles(&self.dir, &kf)?;
        let mut st = self.state.write();
        st.keyfiles = [Some(kf.clone()), Some(kf.clone())];
        if let Some(u) = st.unsealed.as_mut() {
            u.kek = kek;
            u.keyfile = kf;
        }
        Ok(())
    }

    /// Changes the master password of an unsealed store without asking for the current one:
    /// the data keys held in memory are re-wrapped under a KEK derived from `new` (fresh salt,
    /// configured KDF parameters). The same two-copy keyfile write as
    /// [`SecretStore::rotate_master`], so a crash leaves the old or the new password working.
    pub fn rotate_master_unsealed(&self, new: &[u8]) -> Result<(), StoreError> {
        let _io = self.io.lock();
        let salt = crypto::random()?;
        // The derivation is the slow part; it needs no lock on the index.
        let kek = crypto::derive_kek(new, &salt, &self.cfg.kdf)?;
        let kf = {
            let st = self.state.read();
            let u = st.unsealed()?;
            let mut kf = Keyfile {
                generation: newest_generation(&st, u) + 1,
                kdf: self.cfg.kdf,
                salt,
                keys: Vec::new(),
            };
            for wk in &u.keyfile.keys {
                let key = u.keys.get(&wk.id).ok_or(StoreError::Sealed)?;
                kf.keys.push(wrap_key(&kf, &kek, wk.id, key)?);
            }
            kf
        };
        self.install_rotation(kf, kek)
    }

    /// The new keyfile and KEK for a password change (nothing written yet).
    fn prepare_rotation(
        &self,
        old: &[u8],
        new: &[u8],
    ) -> Result<(Keyfile, SecretBytes), StoreError> {
        let copies = self.state.read().keyfiles.clone();
        let mut cands: Vec<&Keyfile> = copies.iter().flatten().collect();
        if cands.is_empty() {
            return Err(StoreError::KeyfileDamaged);
        }
        cands.sort_by_key(|k| std::cmp::Reverse(k.generation));
        cands.dedup();
        let mut keys = None;
        for kf in &cands {
            let kek = crypto::derive_kek(old, &kf.salt, &kf.kdf)?;
            if let Some(k) = unwrap_keys(kf, &kek)? {
                keys = Some((k, *kf));
                break;
            }
        }
        let (keys, from) = keys.ok_or(StoreError::WrongPassword)?;
        let mut kf = Keyfile {
            generation: cands[0].generation + 1,
            kdf: self.cfg.kdf,
            salt: crypto::random()?,
            keys: Vec::new(),
        };
        let kek = crypto::derive_kek(new, &kf.salt, &kf.kdf)?;
        for wk in &from.keys {
            if let Some(k) = keys.get(&wk.id) {
                kf.keys.push(wrap_key(&kf, &kek, wk.id, k)?);
            }
        }
        Ok((kf, kek))
    }

    /// Re-seals every kept value under a new random data key and drops the old key. Needs the
    /// store unsealed. Damaged entries cannot be re-sealed and stay reported.
    pub fn rekey(&self) -> Result<(), StoreError> {
        let mut io = self.io.lock();
        let (mut kf, new_id, new_key) = {
            let st = self.state.read();
            let u = st.unsealed()?;
            let new_id = u.keys.keys().copied().max().unwrap_or(0) + 1;
            let new_key = crypto::random_key()?;
            let mut kf = u.keyfile.clone();
            kf.generation = newest_generation(&st, u) + 1;
            kf.keys.push(wrap_key(&kf, &u.kek, new_id, &new_key)?);
            (kf, new_id, new_key)
        };
        // 1: both keys in the keyfile; 2: the log re-sealed under the new one; 3: old key gone.
        write_keyfiles(&self.dir, &kf)?;
        {
            let mut st = self.state.write();
            st.keyfiles = [Some(kf.clone()), Some(kf.clone())];
            if let Some(u) = st.unsealed.as_mut() {
                u.keys.insert(new_id, new_key);
                u.current = new_id;
                u.keyfile = kf.clone();
            }
        }
        #[cfg(test)]
        if self.rekey_stop.load(std::sync::atomic::Ordering::Relaxed) == 1 {
            return Ok(());
        }
        self.compact(&mut io, Some(new_id))?;
        #[cfg(test)]
        if self.rekey_stop.load(std::sync::atomic::Ordering::Relaxed) == 2 {
            return Ok(());
        }
        kf.generation += 1;
        kf.keys.retain(|k| k.id == new_id);
        write_keyfiles(&self.dir, &kf)?;
        let mut st = self.state.write();
        st.keyfiles = [Some(kf.clone()), Some(kf.clone())];
        if let Some(u) = st.unsealed.as_mut() {
            u.keys.retain(|id, _| *id == new_id);
            u.keyfile = kf;
        }
        Ok(())
    }

    /// Everything that failed to read or open: damaged records (by secret and version where
    /// still readable), values that do not decrypt, damaged keyfile copies.
    pub fn integrity_errors(&self) -> Vec<IntegrityError> {
        let st = self.state.read();
        let mut out = Vec::new();
        for (i, k) in st.keyfiles.iter().enumerate() {
            if k.is_none() {
                out.push(IntegrityError {
                    name: None,
                    version: None,
                    file: KEYFILES[i],
                    offset: None,
                    problem: "keyfile copy damaged or missing (the other copy is used)",
                });
            }
        }
        let mut names: Vec<&String> = st.entries.keys().collect();
        names.sort();
        for name in names {
            for (&ver, v) in st.entries[name].versions.iter() {
                let problem = match v.body {
                    Body::Damaged { .. } => "record fails its checksum",
                    Body::Sealed { bad: true, .. } => {
                        "value does not decrypt (tampered, moved to another name or version, or its key is lost)"
                    }
                    _ => continue,
                };
                out.push(IntegrityError {
                    name: Some(name.clone()),
                    version: Some(ver),
                    file: LOG,
                    offset: Some(v.off),
                    problem,
                });
            }
        }
        for o in &st.orphans {
            out.push(IntegrityError {
                name: o.hint.as_ref().map(|h| h.name.clone()),
                version: o.hint.as_ref().and_then(|h| h.version),
                file: LOG,
                offset: Some(o.off),
                problem: "unreadable record",
            });
        }
        out
    }

    fn maybe_compact(&self, io: &mut Writer, force: bool) {
        let live = self.state.read().live_bytes;
        if force || io.len > 2 * live + COMPACT_SLACK {
            if let Err(e) = self.compact(io, None) {
                // The change is already durable in the log; compaction is retried next time.
                tracing::warn!(error = %e, "secret store compaction failed");
            }
        }
    }

    /// Rewrites the log with only what is kept (re-sealed under key `reseal` if given), by
    /// atomic replace, then points the index at the new offsets.
    fn compact(&self, io: &mut Writer, reseal: Option<u32>) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        // (name, version, offset, new sealed body) in write order; orphans' new offsets.
        let mut moved: Vec<(String, u64, u64, Option<Body>)> = Vec::new();
        let mut orphan_offs = Vec::new();
        {
            let st = self.state.read();
            let key = match reseal {
                Some(id) => Some((id, st.unsealed()?.keys.get(&id).ok_or(StoreError::Sealed)?)),
                None => None,
            };
            let mut names: Vec<&String> = st.entries.keys().collect();
            names.sort();
            for name in names {
                let e = &st.entries[name];
                for (&ver, v) in e.versions.iter() {
                    let off = buf.len() as u64;
                    let mut new_body = None;
                    match &v.body {
                        Body::Damaged { raw } => buf.extend_from_slice(raw),
                        Body::Sealed {
                            key_id,
                            nonce,
                            sealed,
                            plain,
                            bad,
                        } => {
                            let mut rec = PutRec {
                                name: name.clone(),
                                version: ver,
                                created: v.created,
                                key_id: *key_id,
                                nonce: *nonce,
                                sealed: sealed.to_vec(),
                            };
                            if let (Some((id, k)), Some(p)) = (key, plain) {
                                rec.key_id = id;
                                rec.nonce = crypto::random()?;
                                let ad = crypto::value_ad(name, ver, v.created);
                                rec.sealed = crypto::seal(k, &rec.nonce, &ad, p.as_slice())?;
                                new_body = Some(Body::Sealed {
                                    key_id: id,
                                    nonce: rec.nonce,
                                    sealed: rec.sealed.clone().into_boxed_slice(),
                                    plain: Some(p.clone()),
                                    bad: *bad,
                                });
                            }
                            buf.extend_from_slice(&format::encode(&Record::Put(rec)));
                        }
                    }
                    moved.push((name.clone(), ver, off, new_body));
                }
                buf.extend_from_slice(&format::encode(&Record::Head {
                    name: name.clone(),
                    latest: e.latest,
                    deleted: e.deleted,
                }));
            }
            for o in &st.orphans {
                orphan_offs.push(buf.len() as u64);
                buf.extend_from_slice(&o.raw);
            }
        }
        let tmp = self.dir.join(format!("{LOG}.tmp"));
        let file = (|| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all_at(&buf, 0)?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join(LOG))?;
            Ok(f)
        })()
        .map_err(io_err("compacting secrets.log"))?;
        io.file = file;
        io.len = buf.len() as u64;
        let mut st = self.state.write();
        let sealed_meanwhile = st.unsealed.is_none();
        for (name, ver, off, body) in moved {
            if let Some(v) = st
                .entries
                .get_mut(&name)
                .and_then(|e| e.versions.get_mut(&ver))
            {
                v.off = off;
                if let Some(mut b) = body {
                    if let (Body::Sealed { plain, .. }, true) = (&mut b, sealed_meanwhile) {
                        *plain = None;
                    }
                    v.body = b;
                }
            }
        }
        for (o, off) in st.orphans.iter_mut().zip(orphan_offs) {
            o.off = off;
        }
        // Everything just written is live (head records included).
        st.live_bytes = buf.len() as u64;
        drop(st);
        format::fsync_dir(&self.dir).map_err(io_err("compacting secrets.log"))
    }
}

/// The highest keyfile generation on disk or in use: a new keyfile gets the next one.
fn newest_generation(st: &State, u: &Unsealed) -> u64 {
    st.keyfiles
        .iter()
        .flatten()
        .map(|k| k.generation)
        .max()
        .unwrap_or(0)
        .max(u.keyfile.generation)
}

/// Writes both keyfile copies, one atomic replace after the other.
fn write_keyfiles(dir: &Path, kf: &Keyfile) -> Result<(), StoreError> {
    let bytes = kf.encode();
    for f in KEYFILES {
        format::write_atomic(dir, f, &bytes).map_err(io_err(format!("writing {f}")))?;
    }
    Ok(())
}
