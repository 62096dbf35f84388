//! # secrets::postgres — the secret store kept in PostgreSQL, shared by several daemons
//!
//! What it does: the same envelope as the embedded store ([`super::SecretStore`]), kept in
//! PostgreSQL tables so that several daemons serve one set of secrets. The database holds only
//! what the embedded store holds on disk: the keyfile (KDF parameters, salt, data keys wrapped
//! under the key-encryption key, checksummed — the very bytes of `key.a`) and, per version, the
//! ciphertext sealed with XChaCha20-Poly1305 under a data key with the name, version and
//! creation time as associated data. Never a plain value, a data key in clear or a password.
//! Each daemon decrypts every kept value into locked memory when unsealed and serves reads from
//! there, as the embedded store does: a read never touches the database.
//!
//! What it deliberately does not do: TLS to the database (a local server is reached in clear;
//! `tokio-postgres` takes a TLS connector when that is needed), erase destroyed ciphertext from
//! PostgreSQL's pages (a destroyed row is deleted; its bytes stay in the table file until
//! `VACUUM` reuses the space), or protect against someone who can write the tables (they can
//! drop or roll back rows, as with the files; they cannot make a value read as another).
//!
//! ## Tables (in the configured schema)
//! - `schema_version` — the migrations applied. Migrations run in order in one transaction
//!   under a transaction-level advisory lock, so two daemons starting at once never race.
//! - `keyfile` — one row: generation and the encoded keyfile.
//! - `heads` — per name: the highest version ever given (never reused) and the deleted flag.
//! - `versions` — per (name, version): creation time, data key id, nonce, ciphertext ‖ tag.
//!   The primary key (name, version) and the `heads` row lock (`SELECT … FOR UPDATE`) make
//!   concurrent writers on several daemons queue: every acknowledged version is kept, in order.
//!
//! ## Seeing the other daemons' writes
//! Every change sends `NOTIFY <schema>_secrets` with the name (`*` for a keyfile change) in its
//! transaction, so it is delivered on commit. [`PgStore::spawn_listener`] runs a task that
//! `LISTEN`s on its own connection and reloads the name (or, for `*` and after every
//! (re)connection, everything). After a connection loss it reconnects with a short back-off and
//! reloads all, so a change missed while disconnected is picked up.
//!
//! ## Keys shared between daemons
//! Rotate-master re-wraps the same data keys, so the other daemons keep working with the keys
//! they hold. Rekey re-seals every row under a new data key in one transaction; the others load
//! the new keyfile on its notification and unwrap the new key with the KEK they hold. A writer
//! checks the keyfile generation in its transaction (`FOR SHARE`, which a rekey's `FOR UPDATE`
//! excludes), so no value is ever sealed under a key a rekey has just dropped. After a password
//! change *and* a rekey, a daemon still holding the old KEK cannot unwrap the new data key: it
//! keeps serving the values it holds, refuses writes and rekeys with [`StoreError::StaleKeys`],
//! and works again once unsealed with the new password. (Handing the new key to it under the
//! old one would defeat the rekey, whose point is that the old key may be known.)

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::RwLock;
use tokio_postgres::{AsyncMessage, Client, NoTls, Transaction};

use super::format::Keyfile;
use super::{
    crypto, now, unwrap_keys, valid_name, wrap_key, IntegrityError, KdfParams, SecretBytes,
    SecretMeta, SecretValue, StoreError, UnsealReport, VersionMeta, MAX_VALUE_LEN,
};

/// Where the PostgreSQL store lives and how it behaves.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// libpq-style connection string or URL (`postgres://user@127.0.0.1/db`).
    pub url: String,
    /// Schema holding the tables (created if missing): `[a-z_][a-z0-9_]*`, at most 48 bytes.
    pub schema: String,
    /// Versions kept per secret; at least 1.
    pub keep_versions: usize,
    /// KDF parameters for [`PgStore::init`] and [`PgStore::rotate_master`].
    pub kdf: KdfParams,
    /// Connection timeout.
    pub connect_timeout: Duration,
}

impl PgConfig {
    /// Defaults: schema `warden`, keep 10 versions, [`KdfParams::default`], 5 s connect timeout.
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            schema: "warden".into(),
            keep_versions: 10,
            kdf: KdfParams::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        let s = self.schema.as_bytes();
        let ok = !s.is_empty()
            && s.len() <= 48
            && (s[0].is_ascii_lowercase() || s[0] == b'_')
            && s.iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
        if !ok {
            return Err(StoreError::InvalidConfig(
                "the PostgreSQL schema name must be 1 to 48 of a-z 0-9 _, not starting with a digit",
            ));
        }
        if self.keep_versions == 0 {
            return Err(StoreError::InvalidConfig(
                "keep_versions must be at least 1",
            ));
        }
        Ok(())
    }

    fn channel(&self) -> String {
        format!("{}_secrets", self.schema)
    }
}

/// Migrations, applied in order; index + 1 is the schema version. `{s}` is the schema.
const MIGRATIONS: &[&str] = &["CREATE TABLE {s}.keyfile (
        id INT PRIMARY KEY CHECK (id = 1),
        generation BIGINT NOT NULL,
        body BYTEA NOT NULL
     );
     CREATE TABLE {s}.heads (
        name TEXT PRIMARY KEY,
        latest BIGINT NOT NULL,
        deleted BOOLEAN NOT NULL
     );
     CREATE TABLE {s}.versions (
        name TEXT NOT NULL REFERENCES {s}.heads(name),
        version BIGINT NOT NULL,
        created BIGINT NOT NULL,
        key_id BIGINT NOT NULL,
        nonce BYTEA NOT NULL,
        sealed BYTEA NOT NULL,
        PRIMARY KEY (name, version)
     );"];

/// Advisory lock key that serialises migrations (any fixed number; "wardenpg").
const MIGRATE_LOCK: i64 = 0x7761_7264_656e_7067;

fn db_err(context: &str) -> impl FnOnce(tokio_postgres::Error) -> StoreError + '_ {
    move |e| StoreError::Io {
        context: format!("PostgreSQL: {context}"),
        source: std::io::Error::other(e),
    }
}

/// One kept version in memory.
struct Ver {
    created: u64,
    /// `None` while sealed, or when it does not decrypt (`bad`).
    plain: Option<Arc<SecretBytes>>,
    bad: bool,
}

/// `db!(self, async |c| …)`: [`PgStore::with_client`], run once more on a new connection if
/// the first statement failed (a connection lost while idle), which cannot repeat a change.
macro_rules! db {
    ($store:expr, $f:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            match $store.with_client($f).await {
                Err(e) if attempt == 1 && first_statement_failed(&e) => {
                    tracing::debug!(error = %e, "PostgreSQL: retrying on a new connection");
                }
                r => break r,
            }
        }
    }};
}

#[derive(Default)]
struct Entry {
    latest: u64,
    deleted: bool,
    versions: BTreeMap<u64, Ver>,
}

struct Keys {
    kek: SecretBytes,
    keyfile: Keyfile,
    keys: HashMap<u32, SecretBytes>,
}

impl Keys {
    fn current(&self) -> u32 {
        self.keys.keys().copied().max().unwrap_or(0)
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    keys: Option<Keys>,
    /// Bumped by every seal and unseal: a reload that decrypted under another epoch decrypts
    /// again before it installs what it read (no plain value survives a seal that ran
    /// meanwhile, and no value stays undecrypted after an unseal that ran meanwhile).
    epoch: u64,
}

/// The PostgreSQL-backed secret store of one daemon. Reads are served from memory; writes go
/// through one connection (reconnected when lost) in transactions.
pub struct PgStore {
    cfg: PgConfig,
    /// `{schema}.` prefix for table names.
    s: String,
    client: tokio::sync::Mutex<Option<Client>>,
    state: RwLock<State>,
    /// Called after the listener has applied another daemon's change (see [`PgStore::on_change`]).
    on_change: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.cfg.schema)
            .field("sealed", &self.is_sealed())
            .finish_non_exhaustive()
    }
}

async fn connect(cfg: &PgConfig) -> Result<Client, StoreError> {
    let mut pc: tokio_postgres::Config = cfg.url.parse().map_err(db_err("parsing postgres_url"))?;
    pc.connect_timeout(cfg.connect_timeout);
    let (client, conn) = pc
        .connect(NoTls)
        .await
        .map_err(db_err("connecting to the server"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "PostgreSQL connection of the secret store lost");
        }
    });
    Ok(client)
}

/// Creates the schema and applies the missing migrations, in one transaction under an advisory
/// lock (two daemons starting at once: the second waits, then finds nothing to do).
async fn migrate(client: &mut Client, cfg: &PgConfig) -> Result<(), StoreError> {
    let s = &cfg.schema;
    let tx = client
        .transaction()
        .await
        .map_err(db_err("starting the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(db_err("taking the migration lock"))?;
    tx.batch_execute(&format!(
        "SET LOCAL client_min_messages = warning;
         CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.schema_version (version INT PRIMARY KEY, applied BIGINT NOT NULL);"
    ))
    .await
    .map_err(db_err("creating the schema"))?;
    let row = tx
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0) FROM {s}.schema_version"),
            &[],
        )
        .await
        .map_err(db_err("reading the schema version"))?;
    let have: i32 = row.get(0);
    if have as usize > MIGRATIONS.len() {
        return Err(StoreError::Damaged(format!(
            "the PostgreSQL schema {s} is at version {have}, newer than this warden knows ({}): upgrade warden",
            MIGRATIONS.len()
        )));
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        tx.batch_execute(&m.replace("{s}", s))
            .await
            .map_err(db_err("applying a migration"))?;
        tx.execute(
            &format!("INSERT INTO {s}.schema_version (version, applied) VALUES ($1, $2)"),
            &[&(i as i32 + 1), &(now() as i64)],
        )
        .await
        .map_err(db_err("recording a migration"))?;
    }
    tx.commit()
        .await
        .map_err(db_err("committing the migration"))
}

/// Whether `e` is the failure of the first statement of an operation (BEGIN, or a read), after
/// which retrying cannot repeat a change.
fn first_statement_failed(e: &StoreError) -> bool {
    matches!(e, StoreError::Io { context, .. }
        if context.starts_with("PostgreSQL: starting") || context.starts_with("PostgreSQL: reading"))
}

fn notify_sql(s: &str) -> String {
    format!("SELECT pg_notify('{s}_secrets', $1)")
}

impl PgStore {
    /// Creates the store in the database (schema, tables, keyfile) protected by `password`.
    /// Refuses if a keyfile is already there.
    pub async fn init(cfg: &PgConfig, password: &[u8]) -> Result<(), StoreError> {
        cfg.check()?;
        cfg.kdf.validate()?;
        let mut client = connect(cfg).await?;
        migrate(&mut client, cfg).await?;
        let mut kf = Keyfile {
            generation: 1,
            kdf: cfg.kdf,
            salt: crypto::random()?,
            keys: Vec::new(),
        };
        let kek = crypto::derive_kek(password, &kf.salt, &kf.kdf)?;
        let key = crypto::random_key()?;
        kf.keys.push(wrap_key(&kf, &kek, 1, &key)?);
        let n = client
            .execute(
                &format!(
                    "INSERT INTO {}.keyfile (id, generation, body) VALUES (1, $1, $2) ON CONFLICT DO NOTHING",
                    cfg.schema
                ),
                &[&(kf.generation as i64), &kf.encode()],
            )
            .await
            .map_err(db_err("writing the keyfile"))?;
        if n == 0 {
            return Err(StoreError::AlreadyExists(
                format!("PostgreSQL schema {}", cfg.schema).into(),
            ));
        }
        Ok(())
    }

    /// **Dev mode only**: the master password that the dev daemons sharing this database and
    /// schema unseal with, kept *in clear* in the table `dev_master_password` of the schema, so
    /// that several dev daemons on one machine form one cluster without a shared file. The
    /// first caller stores `candidate`; every later caller gets what is stored. Anyone who can
    /// read that table holds the key to the store: never point a dev daemon at a database
    /// whose secrets matter.
    pub async fn dev_master_password(
        cfg: &PgConfig,
        candidate: &[u8],
    ) -> Result<SecretBytes, StoreError> {
        cfg.check()?;
        let s = &cfg.schema;
        let mut client = connect(cfg).await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting the dev password"))?;
        // The migrations' lock: CREATE SCHEMA IF NOT EXISTS races with a daemon migrating.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(db_err("taking the migration lock"))?;
        tx.batch_execute(&format!(
            "SET LOCAL client_min_messages = warning;
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.dev_master_password (
                id INT PRIMARY KEY CHECK (id = 1),
                password BYTEA NOT NULL
             );
             COMMENT ON TABLE {s}.dev_master_password IS
                'warden dev mode only: the master password of this store, in clear';"
        ))
        .await
        .map_err(db_err("creating the dev password table"))?;
        tx.execute(
            &format!(
                "INSERT INTO {s}.dev_master_password (id, password) VALUES (1, $1) ON CONFLICT DO NOTHING"
            ),
            &[&candidate],
        )
        .await
        .map_err(db_err("storing the dev password"))?;
        let row = tx
            .query_one(
                &format!("SELECT password FROM {s}.dev_master_password WHERE id = 1"),
                &[],
            )
            .await
            .map_err(db_err("reading the dev password"))?;
        let password = SecretBytes::from_slice(row.get::<_, &[u8]>(0))?;
        tx.commit()
            .await
            .map_err(db_err("committing the dev password"))?;
        Ok(password)
    }

    /// Connects, migrates the schema and loads the names (sealed). Fails if the store was never
    /// initialized.
    pub async fn open(cfg: PgConfig) -> Result<PgStore, StoreError> {
        cfg.check()?;
        let mut client = connect(&cfg).await?;
        migrate(&mut client, &cfg).await?;
        let store = PgStore {
            s: cfg.schema.clone(),
            cfg,
            client: tokio::sync::Mutex::new(Some(client)),
            state: RwLock::new(State::default()),
            on_change: std::sync::OnceLock::new(),
        };
        store.read_keyfile().await?;
        store.reload_all().await?;
        Ok(store)
    }

    pub fn is_sealed(&self) -> bool {
        self.state.read().keys.is_none()
    }

    /// The schema holding the tables (for messages).
    pub fn schema(&self) -> &str {
        &self.cfg.schema
    }

    /// Sets what to call after the listener has applied a change made elsewhere (another
    /// daemon's write, delete, destroy, rekey or password change; or a catch-up after a
    /// reconnection), so that the daemon can tell its `secrets.watch` subscribers. Only the
    /// first call counts.
    pub fn on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(f));
    }

    fn changed(&self) {
        if let Some(f) = self.on_change.get() {
            f();
        }
    }

    /// Secrets visible in [`PgStore::list`].
    pub fn count(&self) -> usize {
        self.state
            .read()
            .entries
            .values()
            .filter(|e| !e.deleted && !e.versions.is_empty())
            .count()
    }

    /// Runs `f` on the write connection, reconnecting first if it was lost. Callers go through
    /// `db!`, which runs `f` a second time on a new connection when its first statement
    /// failed (nothing was changed then).
    async fn with_client<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(connect(&self.cfg).await?);
        }
        let client = guard.as_mut().expect("connected above");
        let r = f(client).await;
        if r.as_ref().is_err_and(first_statement_failed) {
            // Perhaps the server dropped the connection while it was idle (restart, failover,
            // terminated backend): the next use starts on a new one.
            *guard = None;
        }
        r
    }

    async fn read_keyfile(&self) -> Result<Keyfile, StoreError> {
        let s = &self.s;
        let row = db!(self, async |c| {
            c.query_opt(&format!("SELECT body FROM {s}.keyfile WHERE id = 1"), &[])
                .await
                .map_err(db_err("reading the keyfile"))
        })?;
        let row =
            row.ok_or_else(|| StoreError::NotInitialized(format!("PostgreSQL schema {s}").into()))?;
        let body: Vec<u8> = row.get(0);
        Keyfile::decode(&body).ok_or(StoreError::KeyfileDamaged)
    }

    /// Derives the KEK from `password`, unwraps the data keys and decrypts every kept value
    /// into locked memory. Values that fail to decrypt are reported, not fatal.
    pub async fn unseal(&self, password: &[u8]) -> Result<UnsealReport, StoreError> {
        let kf = self.read_keyfile().await?;
        let kek = crypto::derive_kek(password, &kf.salt, &kf.kdf)?;
        let keys = unwrap_keys(&kf, &kek)?.ok_or(StoreError::WrongPassword)?;
        {
            let mut st = self.state.write();
            st.keys = Some(Keys {
                kek,
                keyfile: kf,
                keys,
            });
            st.epoch += 1;
        }
        self.reload_all().await?;
        let st = self.state.read();
        let mut values = 0;
        for e in st.entries.values() {
            values += e.versions.values().filter(|v| v.plain.is_some()).count();
        }
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
            memory_locked: super::memory::all_memory_locked(),
        })
    }

    /// Drops the keys and the store's references to decrypted values.
    pub fn seal(&self) {
        let mut st = self.state.write();
        st.keys = None;
        st.epoch += 1;
        for e in st.entries.values_mut() {
            for v in e.versions.values_mut() {
                v.plain = None;
            }
        }
    }

    /// The value of `name` at `version`, or at its highest kept version, from memory.
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<SecretValue, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName);
        }
        let st = self.state.read();
        if st.keys.is_none() {
            return Err(StoreError::Sealed);
        }
        let not_found = || StoreError::NotFound {
            name: name.to_owned(),
            version,
        };
        let e = st
            .entries
            .get(name)
            .filter(|e| !e.deleted)
            .ok_or_else(not_found)?;
        let (&ver, v) = match version {
            Some(v) => e.versions.get_key_value(&v),
            None => e.versions.last_key_value(),
        }
        .ok_or_else(not_found)?;
        match &v.plain {
            Some(p) => Ok(SecretValue {
                version: ver,
                created: v.created,
                bytes: p.clone(),
            }),
            None => Err(StoreError::Integrity {
                name: name.to_owned(),
                version: ver,
            }),
        }
    }

    /// Stores `value` as a new version of `name`; returns the version once committed.
    pub async fn set(&self, name: &str, value: &[u8]) -> Result<u64, StoreError> {
        self.put(name, value, None).await
    }

    /// Like [`PgStore::set`], but only if the current version in the database is `expected`
    /// (0: no version, or deleted); otherwise [`StoreError::Conflict`].
    pub async fn set_if_version(
        &self,
        name: &str,
        value: &[u8],
        expected: u64,
    ) -> Result<u64, StoreError> {
        self.put(name, value, Some(expected)).await
    }

    async fn put(
        &self,
        name: &str,
        value: &[u8],
        expected: Option<u64>,
    ) -> Result<u64, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName);
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(StoreError::ValueTooLarge {
                len: value.len(),
                max: MAX_VALUE_LEN,
            });
        }
        if self.is_sealed() {
            return Err(StoreError::Sealed);
        }
        let plain = Arc::new(SecretBytes::from_slice(value)?);
        let s = self.s.clone();
        let keep = self.cfg.keep_versions as i64;
        let (version, created) = db!(self, async |c| {
            let tx = c.transaction().await.map_err(db_err("starting a write"))?;
            self.sync_keyfile(&tx).await?;
            tx.execute(
                    &format!("INSERT INTO {s}.heads (name, latest, deleted) VALUES ($1, 0, false) ON CONFLICT DO NOTHING"),
                    &[&name],
                )
                .await
                .map_err(db_err("creating the secret"))?;
            // The row lock queues concurrent writers of this name, on every daemon.
            let head = tx
                .query_one(
                    &format!("SELECT latest, deleted FROM {s}.heads WHERE name = $1 FOR UPDATE"),
                    &[&name],
                )
                .await
                .map_err(db_err("locking the secret"))?;
            let latest = head.get::<_, i64>(0) as u64;
            let deleted: bool = head.get(1);
            if let Some(expected) = expected {
                let current = if deleted {
                    0
                } else {
                    tx.query_one(
                        &format!(
                            "SELECT COALESCE(MAX(version), 0) FROM {s}.versions WHERE name = $1"
                        ),
                        &[&name],
                    )
                    .await
                    .map_err(db_err("reading the current version"))?
                    .get::<_, i64>(0) as u64
                };
                if current != expected {
                    return Err(StoreError::Conflict {
                        name: name.to_owned(),
                        expected,
                        current,
                    });
                }
            }
            let version = latest + 1;
            let created = now();
            let nonce: [u8; crypto::NONCE_LEN] = crypto::random()?;
            let (key_id, sealed) = {
                let st = self.state.read();
                let k = st.keys.as_ref().ok_or(StoreError::Sealed)?;
                let id = k.current();
                let key = k.keys.get(&id).ok_or(StoreError::Sealed)?;
                let ad = crypto::value_ad(name, version, created);
                (id, crypto::seal(key, &nonce, &ad, value)?)
            };
            tx.execute(
                    &format!("INSERT INTO {s}.versions (name, version, created, key_id, nonce, sealed) VALUES ($1, $2, $3, $4, $5, $6)"),
                    &[&name, &(version as i64), &(created as i64), &(key_id as i64), &nonce.as_slice(), &sealed],
                )
                .await
                .map_err(db_err("writing the version"))?;
            tx.execute(
                &format!("UPDATE {s}.heads SET latest = $2, deleted = false WHERE name = $1"),
                &[&name, &(version as i64)],
            )
            .await
            .map_err(db_err("updating the secret"))?;
            tx.execute(
                &format!("DELETE FROM {s}.versions WHERE name = $1 AND version <= $2"),
                &[&name, &(version as i64 - keep)],
            )
            .await
            .map_err(db_err("dropping old versions"))?;
            tx.execute(&notify_sql(&s), &[&name])
                .await
                .map_err(db_err("notifying"))?;
            tx.commit().await.map_err(db_err("committing a write"))?;
            Ok((version, created))
        })?;
        // Publish our own write at once (the notification will reload it again).
        let mut st = self.state.write();
        let unsealed = st.keys.is_some();
        let keep = self.cfg.keep_versions;
        let e = st.entries.entry(name.to_owned()).or_default();
        if version > e.latest {
            e.latest = version;
            e.deleted = false;
        }
        e.versions.insert(
            version,
            Ver {
                created,
                plain: unsealed.then_some(plain),
                bad: false,
            },
        );
        while e.versions.len() > keep {
            e.versions.pop_first();
        }
        Ok(version)
    }

    /// In a write's transaction: locks the keyfile row against a concurrent rekey and, if another
    /// daemon changed it, unwraps its keys with the KEK held here.
    async fn sync_keyfile(&self, tx: &Transaction<'_>) -> Result<(), StoreError> {
        let row = tx
            .query_one(
                &format!(
                    "SELECT generation, body FROM {}.keyfile WHERE id = 1 FOR SHARE",
                    self.s
                ),
                &[],
            )
            .await
            .map_err(db_err("reading the keyfile"))?;
        let generation = row.get::<_, i64>(0) as u64;
        let held = self
            .state
            .read()
            .keys
            .as_ref()
            .map(|k| k.keyfile.generation);
        if held.is_none_or(|g| g == generation) {
            return Ok(());
        }
        let kf = Keyfile::decode(&row.get::<_, Vec<u8>>(1)).ok_or(StoreError::KeyfileDamaged)?;
        self.adopt_keyfile(kf)
    }

    /// Takes a keyfile another daemon wrote: its keys unwrapped with the KEK held here. After a
    /// password change the KEK no longer opens it; the keys held stay valid (a password change
    /// re-wraps the same keys), and only a rekey needs a new unseal.
    fn adopt_keyfile(&self, kf: Keyfile) -> Result<(), StoreError> {
        let mut st = self.state.write();
        let Some(k) = st.keys.as_mut() else {
            return Ok(());
        };
        if kf.generation <= k.keyfile.generation {
            return Ok(());
        }
        match unwrap_keys(&kf, &k.kek)? {
            Some(keys) => {
                k.keys = keys;
                k.keyfile = kf;
            }
            None => {
                if kf.keys.iter().any(|w| !k.keys.contains_key(&w.id)) {
                    return Err(StoreError::StaleKeys);
                }
                k.keys.retain(|id, _| kf.keys.iter().any(|w| w.id == *id));
                k.keyfile.generation = kf.generation;
            }
        }
        Ok(())
    }

    /// The names, as `list` shows them (works sealed).
    pub fn list(&self) -> Vec<SecretMeta> {
        let st = self.state.read();
        let mut out: Vec<SecretMeta> = st
            .entries
            .iter()
            .filter(|(_, e)| !e.deleted && !e.versions.is_empty())
            .map(|(n, e)| {
                let (&v, last) = e.versions.last_key_value().expect("not empty");
                SecretMeta {
                    name: n.clone(),
                    latest_version: v,
                    versions: e.versions.len(),
                    updated: last.created,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The kept versions of `name`.
    pub fn versions(&self, name: &str) -> Result<Vec<VersionMeta>, StoreError> {
        let st = self.state.read();
        let e =
            st.entries
                .get(name)
                .filter(|e| !e.deleted)
                .ok_or_else(|| StoreError::NotFound {
                    name: name.to_owned(),
                    version: None,
                })?;
        Ok(e.versions
            .iter()
            .map(|(&version, v)| VersionMeta {
                version,
                created: v.created,
                damaged: v.bad,
            })
            .collect())
    }

    /// Soft delete: hides `name`; its versions stay (a later `set` brings it back).
    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let s = self.s.clone();
        let n = db!(self, async |c| {
            let tx = c.transaction().await.map_err(db_err("starting a delete"))?;
            let n = tx
                .execute(
                    &format!("UPDATE {s}.heads SET deleted = true WHERE name = $1 AND NOT deleted"),
                    &[&name],
                )
                .await
                .map_err(db_err("deleting"))?;
            tx.execute(&notify_sql(&s), &[&name])
                .await
                .map_err(db_err("notifying"))?;
            tx.commit().await.map_err(db_err("committing a delete"))?;
            Ok(n)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound {
                name: name.to_owned(),
                version: None,
            });
        }
        self.reload(name).await
    }

    /// Erases the listed versions of `name` (all when `None`): their rows are deleted.
    pub async fn destroy(&self, name: &str, versions: Option<&[u64]>) -> Result<(), StoreError> {
        let s = self.s.clone();
        let list: Vec<i64> = versions.unwrap_or(&[]).iter().map(|v| *v as i64).collect();
        let n = db!(self, async |c| {
            let tx = c
                .transaction()
                .await
                .map_err(db_err("starting a destroy"))?;
            let n = if list.is_empty() {
                tx.execute(
                    &format!("DELETE FROM {s}.versions WHERE name = $1"),
                    &[&name],
                )
                .await
            } else {
                tx.execute(
                    &format!("DELETE FROM {s}.versions WHERE name = $1 AND version = ANY($2)"),
                    &[&name, &list],
                )
                .await
            }
            .map_err(db_err("destroying"))?;
            if !list.is_empty() && n as usize != list.len() {
                return Err(StoreError::NotFound {
                    name: name.to_owned(),
                    version: list.first().map(|v| *v as u64),
                });
            }
            tx.execute(&notify_sql(&s), &[&name])
                .await
                .map_err(db_err("notifying"))?;
            tx.commit().await.map_err(db_err("committing a destroy"))?;
            Ok(n)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound {
                name: name.to_owned(),
                version: None,
            });
        }
        self.reload(name).await
    }

    /// Changes the master password: verifies `old` against the keyfile in the database and
    /// writes the data keys re-wrapped under a KEK from `new`, in one transaction.
    pub async fn rotate_master(&self, old: &[u8], new: &[u8]) -> Result<(), StoreError> {
        let s = self.s.clone();
        let kdf = self.cfg.kdf;
        let (kf, kek) = db!(self, async |c| {
            let tx = c
                .transaction()
                .await
                .map_err(db_err("starting a rotation"))?;
            let row = tx
                .query_one(
                    &format!("SELECT body FROM {s}.keyfile WHERE id = 1 FOR UPDATE"),
                    &[],
                )
                .await
                .map_err(db_err("reading the keyfile"))?;
            let cur =
                Keyfile::decode(&row.get::<_, Vec<u8>>(0)).ok_or(StoreError::KeyfileDamaged)?;
            let old_kek = crypto::derive_kek(old, &cur.salt, &cur.kdf)?;
            let keys = unwrap_keys(&cur, &old_kek)?.ok_or(StoreError::WrongPassword)?;
            let mut kf = Keyfile {
                generation: cur.generation + 1,
                kdf,
                salt: crypto::random()?,
                keys: Vec::new(),
            };
            let kek = crypto::derive_kek(new, &kf.salt, &kf.kdf)?;
            for w in &cur.keys {
                kf.keys.push(wrap_key(&kf, &kek, w.id, &keys[&w.id])?);
            }
            self.write_keyfile(&tx, &kf).await?;
            tx.commit().await.map_err(db_err("committing a rotation"))?;
            Ok((kf, kek))
        })?;
        if let Some(k) = self.state.write().keys.as_mut() {
            k.kek = kek;
            k.keyfile = kf;
        }
        Ok(())
    }

    /// Changes the master password of an unsealed store without asking for the current one:
    /// the data keys held in memory are re-wrapped under a KEK derived from `new` (fresh salt,
    /// configured KDF parameters), and the keyfile is replaced in one transaction. The other
    /// daemons keep working with the keys they hold (the data keys are the same).
    pub async fn rotate_master_unsealed(&self, new: &[u8]) -> Result<(), StoreError> {
        if self.is_sealed() {
            return Err(StoreError::Sealed);
        }
        let s = self.s.clone();
        let kdf = self.cfg.kdf;
        let salt = crypto::random()?;
        // The derivation is the slow part: before the transaction, so no lock waits on it.
        let kek = crypto::derive_kek(new, &salt, &kdf)?;
        let kf = db!(self, async |c| {
            let tx = c
                .transaction()
                .await
                .map_err(db_err("starting a rotation"))?;
            let row = tx
                .query_one(
                    &format!("SELECT body FROM {s}.keyfile WHERE id = 1 FOR UPDATE"),
                    &[],
                )
                .await
                .map_err(db_err("reading the keyfile"))?;
            let cur =
                Keyfile::decode(&row.get::<_, Vec<u8>>(0)).ok_or(StoreError::KeyfileDamaged)?;
            let mut kf = Keyfile {
                generation: cur.generation + 1,
                kdf,
                salt,
                keys: Vec::new(),
            };
            {
                let st = self.state.read();
                let held = st.keys.as_ref().ok_or(StoreError::Sealed)?;
                for w in &cur.keys {
                    // A key this daemon does not hold: a rekey elsewhere after a password
                    // change; it must be unsealed with the current password first.
                    let key = held.keys.get(&w.id).ok_or(StoreError::StaleKeys)?;
                    kf.keys.push(wrap_key(&kf, &kek, w.id, key)?);
                }
            }
            self.write_keyfile(&tx, &kf).await?;
            tx.commit().await.map_err(db_err("committing a rotation"))?;
            Ok(kf)
        })?;
        if let Some(k) = self.state.write().keys.as_mut() {
            k.kek = kek;
            k.keys.retain(|id, _| kf.keys.iter().any(|w| w.id == *id));
            k.keyfile = kf;
        }
        Ok(())
    }

    async fn write_keyfile(&self, tx: &Transaction<'_>, kf: &Keyfile) -> Result<(), StoreError> {
        tx.execute(
            &format!(
                "UPDATE {}.keyfile SET generation = $1, body = $2 WHERE id = 1",
                self.s
            ),
            &[&(kf.generation as i64), &kf.encode()],
        )
        .await
        .map_err(db_err("writing the keyfile"))?;
        tx.execute(&notify_sql(&self.s), &[&"*"])
            .await
            .map_err(db_err("notifying"))?;
        Ok(())
    }

    /// Re-seals every kept value under a new random data key and drops the old keys, in one
    /// transaction. Needs the store unsealed. Rows that do not decrypt stay as they are and
    /// stay reported.
    pub async fn rekey(&self) -> Result<(), StoreError> {
        let s = self.s.clone();
        db!(self, async |c| {
            let tx = c.transaction().await.map_err(db_err("starting a rekey"))?;
            let row = tx
                .query_one(
                    &format!("SELECT body FROM {s}.keyfile WHERE id = 1 FOR UPDATE"),
                    &[],
                )
                .await
                .map_err(db_err("reading the keyfile"))?;
            let cur =
                Keyfile::decode(&row.get::<_, Vec<u8>>(0)).ok_or(StoreError::KeyfileDamaged)?;
            let rows = tx
                .query(
                    &format!("SELECT name, version, created, key_id, nonce, sealed FROM {s}.versions FOR UPDATE"),
                    &[],
                )
                .await
                .map_err(db_err("reading the values"))?;
            let mut updates = Vec::new();
            let kf = {
                let st = self.state.read();
                let k = st.keys.as_ref().ok_or(StoreError::Sealed)?;
                let old = unwrap_keys(&cur, &k.kek)?.ok_or(StoreError::StaleKeys)?;
                let new_id = old.keys().copied().max().unwrap_or(0) + 1;
                let new_key = crypto::random_key()?;
                let mut kf = Keyfile {
                    generation: cur.generation + 1,
                    kdf: cur.kdf,
                    salt: cur.salt,
                    keys: Vec::new(),
                };
                kf.keys.push(wrap_key(&kf, &k.kek, new_id, &new_key)?);
                for r in &rows {
                    let name: String = r.get(0);
                    let version = r.get::<_, i64>(1) as u64;
                    let created = r.get::<_, i64>(2) as u64;
                    let key_id = r.get::<_, i64>(3) as u32;
                    let ad = crypto::value_ad(&name, version, created);
                    let Ok(nonce) = <[u8; crypto::NONCE_LEN]>::try_from(r.get::<_, &[u8]>(4))
                    else {
                        continue;
                    };
                    let Some(key) = old.get(&key_id) else {
                        continue;
                    };
                    let Some(p) = crypto::open(key, &nonce, &ad, r.get::<_, &[u8]>(5))? else {
                        continue;
                    };
                    let nonce: [u8; crypto::NONCE_LEN] = crypto::random()?;
                    let sealed = crypto::seal(&new_key, &nonce, &ad, p.as_slice())?;
                    updates.push((name, version as i64, nonce, sealed));
                }
                (kf, new_id)
            };
            for (name, version, nonce, sealed) in &updates {
                tx.execute(
                    &format!("UPDATE {s}.versions SET key_id = $3, nonce = $4, sealed = $5 WHERE name = $1 AND version = $2"),
                    &[name, version, &(kf.1 as i64), &nonce.as_slice(), sealed],
                )
                .await
                .map_err(db_err("re-sealing a value"))?;
            }
            self.write_keyfile(&tx, &kf.0).await?;
            tx.commit().await.map_err(db_err("committing a rekey"))?;
            self.adopt_keyfile(kf.0)
        })?;
        self.reload_all().await
    }

    /// Every version that does not decrypt (tampered, moved, or its key lost), by entry.
    pub fn integrity_errors(&self) -> Vec<IntegrityError> {
        let st = self.state.read();
        let mut out = Vec::new();
        for (name, e) in &st.entries {
            for (&ver, v) in &e.versions {
                if v.bad {
                    out.push(IntegrityError {
                        name: Some(name.clone()),
                        version: Some(ver),
                        file: "versions",
                        offset: None,
                        problem: "value does not decrypt (tampered, moved to another name or version, or its key is lost)",
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
        out
    }

    /// Reads the keyfile and adopts it. `false` when this daemon can no longer follow it (a
    /// rekey after a password change elsewhere): what it holds in memory is then kept as it is,
    /// since re-reading rows sealed under a key it cannot open would lose values it can serve.
    async fn follow_keyfile(&self) -> Result<bool, StoreError> {
        let kf = self.read_keyfile().await?;
        match self.adopt_keyfile(kf) {
            Ok(()) => Ok(true),
            Err(StoreError::StaleKeys) => {
                tracing::warn!("the data key was changed on another daemon after a master password change: unseal this daemon again with the current master password");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads `name` again from the database into memory.
    pub async fn reload(&self, name: &str) -> Result<(), StoreError> {
        let s = self.s.clone();
        // One statement: the head and its versions as one snapshot, in one round trip.
        let rows = db!(self, async |c| {
            c.query(
                &format!(
                    "SELECT h.latest, h.deleted, v.version, v.created, v.key_id, v.nonce, v.sealed
                     FROM {s}.heads h LEFT JOIN {s}.versions v ON v.name = h.name
                     WHERE h.name = $1"
                ),
                &[&name],
            )
            .await
            .map_err(db_err("reading a secret"))
        })?;
        let head = rows
            .first()
            .map(|h| (h.get::<_, i64>(0) as u64, h.get::<_, bool>(1)));
        let rows: Vec<_> = rows
            .iter()
            .filter(|r| r.get::<_, Option<i64>>(2).is_some())
            .collect();
        let unknown_key = {
            let st = self.state.read();
            st.keys.as_ref().is_some_and(|k| {
                rows.iter()
                    .any(|r| !k.keys.contains_key(&(r.get::<_, i64>(4) as u32)))
            })
        };
        if unknown_key && !self.follow_keyfile().await? {
            return Ok(());
        }
        let build = |st: &State| -> Result<Entry, StoreError> {
            let mut e = Entry::default();
            if let Some((latest, deleted)) = head {
                e.latest = latest;
                e.deleted = deleted;
            }
            for r in &rows {
                let version = r.get::<_, i64>(2) as u64;
                let v = decrypt(
                    st,
                    name,
                    version,
                    r.get::<_, i64>(3) as u64,
                    r.get::<_, i64>(4) as u32,
                    r.get(5),
                    r.get(6),
                )?;
                e.versions.insert(version, v);
            }
            Ok(e)
        };
        let (mut e, epoch) = {
            let st = self.state.read();
            (build(&st)?, st.epoch)
        };
        let mut st = self.state.write();
        if st.epoch != epoch {
            e = build(&st)?;
        }
        if e.latest == 0 && e.versions.is_empty() {
            st.entries.remove(name);
        } else {
            st.entries.insert(name.to_owned(), e);
        }
        Ok(())
    }

    /// Reads the keyfile (adopting another daemon's rekey) and every secret again.
    pub async fn reload_all(&self) -> Result<(), StoreError> {
        if !self.follow_keyfile().await? {
            return Ok(());
        }
        let s = self.s.clone();
        let (heads, rows) = db!(self, async |c| {
            let heads = c
                .query(&format!("SELECT name, latest, deleted FROM {s}.heads"), &[])
                .await
                .map_err(db_err("reading the secrets"))?;
            let rows = c
                .query(
                    &format!(
                        "SELECT name, version, created, key_id, nonce, sealed FROM {s}.versions"
                    ),
                    &[],
                )
                .await
                .map_err(db_err("reading the secrets"))?;
            Ok((heads, rows))
        })?;
        let build = |st: &State| -> Result<HashMap<String, Entry>, StoreError> {
            let mut entries: HashMap<String, Entry> = HashMap::new();
            for h in &heads {
                entries.insert(
                    h.get(0),
                    Entry {
                        latest: h.get::<_, i64>(1) as u64,
                        deleted: h.get(2),
                        versions: BTreeMap::new(),
                    },
                );
            }
            for r in &rows {
                let name: String = r.get(0);
                let version = r.get::<_, i64>(1) as u64;
                let v = decrypt(
                    st,
                    &name,
                    version,
                    r.get::<_, i64>(2) as u64,
                    r.get::<_, i64>(3) as u32,
                    r.get(4),
                    r.get(5),
                )?;
                entries.entry(name).or_default().versions.insert(version, v);
            }
            Ok(entries)
        };
        // Decrypted under the read lock, so reads go on meanwhile; again under the write lock
        // only if a seal or unseal came in between.
        let (mut entries, epoch) = {
            let st = self.state.read();
            (build(&st)?, st.epoch)
        };
        let mut st = self.state.write();
        if st.epoch != epoch {
            entries = build(&st)?;
        }
        st.entries = entries;
        Ok(())
    }

    /// Starts the task that keeps this daemon's memory in step with the others: `LISTEN` on
    /// its own connection, reload a name on its notification (all on `*`), and after a lost
    /// connection reconnect and reload all. Ends when the store is dropped.
    pub fn spawn_listener(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let cfg = self.cfg.clone();
        tokio::spawn(async move {
            loop {
                if weak.strong_count() == 0 {
                    return;
                }
                if let Err(e) = listen_once(&weak, &cfg).await {
                    tracing::warn!(error = %e, "secret store listener: reconnecting");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }
}

/// One row decrypted with the keys held (nothing decrypted while sealed).
fn decrypt(
    st: &State,
    name: &str,
    version: u64,
    created: u64,
    key_id: u32,
    nonce: &[u8],
    sealed: &[u8],
) -> Result<Ver, StoreError> {
    let mut v = Ver {
        created,
        plain: None,
        bad: false,
    };
    let Some(k) = st.keys.as_ref() else {
        return Ok(v);
    };
    let opened = match (
        k.keys.get(&key_id),
        <[u8; crypto::NONCE_LEN]>::try_from(nonce),
    ) {
        (Some(key), Ok(nonce)) => crypto::open(
            key,
            &nonce,
            &crypto::value_ad(name, version, created),
            sealed,
        )?,
        _ => None,
    };
    v.bad = opened.is_none();
    v.plain = opened.map(Arc::new);
    Ok(v)
}

/// One listening connection, until it is lost.
async fn listen_once(store: &std::sync::Weak<PgStore>, cfg: &PgConfig) -> Result<(), StoreError> {
    let mut pc: tokio_postgres::Config = cfg.url.parse().map_err(db_err("parsing postgres_url"))?;
    pc.connect_timeout(cfg.connect_timeout);
    let (client, mut conn) = pc
        .connect(NoTls)
        .await
        .map_err(db_err("connecting the listener"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        let mut msgs = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = msgs.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let r = async {
        client
            .batch_execute(&format!("LISTEN {}", cfg.channel()))
            .await
            .map_err(db_err("LISTEN"))?;
        // Anything changed while not listening is read now.
        match store.upgrade() {
            Some(s) => {
                s.reload_all().await?;
                s.changed();
            }
            None => return Ok(()),
        }
        while let Some(first) = rx.recv().await {
            let mut names = vec![first];
            while let Ok(n) = rx.try_recv() {
                names.push(n);
            }
            let Some(s) = store.upgrade() else {
                return Ok(());
            };
            if names.iter().any(|n| n == "*") {
                s.reload_all().await?;
            } else {
                names.sort();
                names.dedup();
                for n in names.iter().filter(|n| valid_name(n)) {
                    s.reload(n).await?;
                }
            }
            s.changed();
        }
        Err(StoreError::Io {
            context: "PostgreSQL: the listening connection".into(),
            source: std::io::Error::other("connection lost"),
        })
    }
    .await;
    pump.abort();
    r
}

#[cfg(test)]
#[path = "postgres_tests.rs"]
mod tests;
