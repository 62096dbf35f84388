//! Dev mode: a fully working daemon with no configuration file, as `vault server -dev` is for
//! Vault. State lives in one directory (a fresh temporary one unless given; reused if it
//! exists): the socket, a generated HMAC key, the audit log, the pid and log files. Root and the
//! invoking user may do everything; there are no rate limits. File commands may also act below
//! `<state-dir>/files/` (announced as `WARDEN_FILES_DIR`), and `file.write_template` reads its
//! templates from `<state-dir>/templates/`. Not for production: anyone who can read the state
//! directory holds the keys.
//!
//! The secret store lives in `<state-dir>/secrets`. Dev mode creates it on first use with a
//! random master password kept in `<state-dir>/dev-master-password` and cheap KDF parameters,
//! and unseals it from that file at every start. That is insecure by design: the password sits
//! next to the store it protects. `--master-password-file FILE` uses that file's password
//! instead (the store is created with it if it does not exist yet).
//!
//! With `--postgres URL` the store is the PostgreSQL one (`[storage] backend = "postgres"`), so
//! that several dev daemons pointed at one database serve one set of secrets. Unless
//! `--master-password-file` is given, the first of them generates the dev master password and
//! leaves it *in clear* in the table `dev_master_password` of the schema, where the others
//! find it; each copies it to its own `<state-dir>/dev-master-password`. Dev only: anyone who
//! can read that table can unseal the store.

use anyhow::Context;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use wardend::config::{Config, Mode};
use wardend::policy::{PolicyConfig, RoleConfig, RuleConfig};

pub struct DevSetup {
    pub config: Config,
    pub announce: Vec<(String, String)>,
    pub state_dir: PathBuf,
    /// The dev master password file the daemon unseals from.
    pub master_password_file: PathBuf,
}

/// Argon2id memory of a dev store: enough to exercise the real code path, cheap enough that a
/// dev daemon starts at once (its password is stored beside it anyway).
const DEV_KDF_MEMORY: u64 = 8 << 20;

/// The user who asked for the dev daemon: under `sudo`, the user behind it.
fn invoking_uid() -> u32 {
    let uid = nix::unistd::getuid().as_raw();
    if uid == 0 {
        if let Some(s) = std::env::var_os("SUDO_UID") {
            if let Some(n) = s.to_str().and_then(|s| s.parse().ok()) {
                return n;
            }
        }
    }
    uid
}

pub fn setup(socket: Option<PathBuf>, state_dir: Option<PathBuf>) -> anyhow::Result<DevSetup> {
    let state_dir = match state_dir {
        Some(d) => {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
            d
        }
        None => tempfile::Builder::new()
            .prefix("warden-dev-")
            .tempdir()
            .context("cannot create a temporary state directory")?
            .keep(),
    };
    let state_dir = state_dir.canonicalize()?;
    let key = state_dir.join("hmac.key");
    wardend::auth::generate_key_file(&key)
        .with_context(|| format!("cannot create the HMAC key {}", key.display()))?;

    let mut cfg = Config::default();
    cfg.daemon.pid_file = state_dir.join("warden.pid");
    cfg.daemon.log_file = state_dir.join("warden.log");
    cfg.socket.path = match socket {
        Some(p) => absolute(&p)?,
        None => state_dir.join("warden.sock"),
    };
    cfg.socket.mode = Mode(0o600);
    let uid = invoking_uid();
    cfg.socket.owner = Some(uid.to_string());
    cfg.audit.path = state_dir.join("audit.log");
    cfg.jobs.spill_dir = state_dir.join("jobs");
    cfg.auth.hmac_key_file = Some(key.clone());
    let off = wardend::auth::Rate::OFF;
    cfg.rate_limits = wardend::auth::RateLimits {
        auth: off,
        secrets: off,
        admin: off,
        commands: off,
        jobs: off,
        system: off,
    };
    cfg.policy = dev_policy(uid);
    cfg.secrets.dir = state_dir.join("secrets");
    cfg.secrets.kdf_memory = wardend::units::ByteSize(DEV_KDF_MEMORY);
    cfg.secrets.kdf_passes = 1;
    let files = state_dir.join("files");
    let templates = state_dir.join("templates");
    for d in [&files, &templates] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    cfg.commands
        .path_prefixes
        .push(format!("{}/", files.display()));
    cfg.commands.templates_dir = format!("{}/", templates.display());
    cfg.commands
        .validate()
        .map_err(|e| anyhow::anyhow!("dev mode state directory unusable: {e}"))?;

    let announce = vec![
        (
            "WARDEN_SOCKET".to_string(),
            cfg.socket.path.display().to_string(),
        ),
        (
            "WARDEN_HMAC_KEY_FILE".to_string(),
            key.display().to_string(),
        ),
        (
            "WARDEN_AUDIT_LOG".to_string(),
            cfg.audit.path.display().to_string(),
        ),
        (
            "WARDEN_STATE_DIR".to_string(),
            state_dir.display().to_string(),
        ),
        (
            "WARDEN_SECRETS_DIR".to_string(),
            cfg.secrets.dir.display().to_string(),
        ),
        ("WARDEN_FILES_DIR".to_string(), files.display().to_string()),
    ];
    let master = state_dir.join("dev-master-password");
    Ok(DevSetup {
        config: cfg,
        announce,
        state_dir,
        master_password_file: master,
    })
}

/// The dev secret store: embedded in `<state-dir>/secrets`, or in PostgreSQL at `postgres`;
/// created on first use and unsealed at start with the dev master password (generated; shared
/// through the database with `--postgres`) or the one in `master_password_file`. Announces
/// `WARDEN_MASTER_PASSWORD_FILE` (and `WARDEN_POSTGRES_URL`, or `WARDEN_SECRETS_DIR`).
pub fn secret_store(
    mut setup: DevSetup,
    postgres: Option<String>,
    master_password_file: Option<PathBuf>,
) -> anyhow::Result<DevSetup> {
    let cfg = &mut setup.config;
    if let Some(url) = &postgres {
        cfg.storage.backend = wardend::config::StorageBackend::Postgres;
        cfg.storage.postgres_url = Some(url.clone());
        cfg.storage
            .validate()
            .map_err(|(key, message)| anyhow::anyhow!("--postgres: {key}: {message}"))?;
    }
    let master = match master_password_file {
        Some(f) => absolute(&f)?,
        None => setup.state_dir.join("dev-master-password"),
    };
    let pg = cfg.storage.pg_config(&cfg.secrets);
    let given = master != setup.state_dir.join("dev-master-password");
    match &pg {
        Some(pg) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                use wardend::secrets::postgres::PgStore;
                let password = if given {
                    wardend::server::secrets::read_password_file(&master)
                        .map_err(|e| anyhow::anyhow!("--master-password-file: {e}"))?
                } else {
                    // A random candidate (the file left by an earlier start serves as well);
                    // the database keeps the first one stored.
                    wardend::auth::generate_key_file(&master).with_context(|| {
                        format!("cannot create the dev master password {}", master.display())
                    })?;
                    let candidate = wardend::server::secrets::read_password_file(&master)
                        .map_err(|e| anyhow::anyhow!("cannot read the dev master password: {e}"))?;
                    let shared = PgStore::dev_master_password(pg, &candidate)
                        .await
                        .context("cannot read or store the dev master password in PostgreSQL")?;
                    if shared.as_slice() != candidate.as_slice() {
                        write_private(&master, shared.as_slice())?;
                    }
                    zeroize::Zeroizing::new(shared.as_slice().to_vec())
                };
                match PgStore::init(pg, &password).await {
                    Ok(()) | Err(wardend::secrets::StoreError::AlreadyExists(_)) => Ok(()),
                    Err(e) => Err(anyhow::Error::new(e)
                        .context("cannot create the dev secret store in PostgreSQL")),
                }
            })?;
            setup.announce.retain(|(k, _)| k != "WARDEN_SECRETS_DIR");
            setup
                .announce
                .push(("WARDEN_POSTGRES_URL".to_string(), pg.url.clone()));
        }
        None => {
            if !given {
                wardend::auth::generate_key_file(&master).with_context(|| {
                    format!("cannot create the dev master password {}", master.display())
                })?;
            }
            let password = wardend::server::secrets::read_password_file(&master)
                .map_err(|e| anyhow::anyhow!("cannot read the dev master password: {e}"))?;
            match wardend::secrets::SecretStore::init(&cfg.secrets.store_config(), &password) {
                Ok(()) | Err(wardend::secrets::StoreError::AlreadyExists(_)) => {}
                Err(e) => return Err(e).context("cannot create the dev secret store"),
            }
        }
    }
    setup.announce.push((
        "WARDEN_MASTER_PASSWORD_FILE".to_string(),
        master.display().to_string(),
    ));
    setup.master_password_file = master;
    Ok(setup)
}

/// Writes `bytes` to `path`, mode 0600, by atomic replace.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// Everything for root and the invoking user; nothing for anyone else.
fn dev_policy(uid: u32) -> PolicyConfig {
    let mut roles = BTreeMap::new();
    roles.insert(
        "dev".to_string(),
        RoleConfig {
            allow: vec!["*".into()],
            deny: vec![],
        },
    );
    let mut uids = vec![0];
    if uid != 0 {
        uids.push(uid);
    }
    let rules = uids
        .into_iter()
        .map(|u| RuleConfig {
            uid: Some(vec![u].into()),
            roles: vec!["dev".into()],
            ..Default::default()
        })
        .collect();
    PolicyConfig { roles, rules }
}

/// `--redis URL [--redis-key-prefix P]` and `--hmac-key-file FILE`: dev daemons that share a
/// Redis and a key act as one cluster (a nonce used on one is refused on the others, a token
/// from one works on the others). Announced as `WARDEN_REDIS_URL`, and the key file as
/// `WARDEN_HMAC_KEY_FILE` in place of the generated one.
pub fn join_cluster(
    mut setup: DevSetup,
    redis: Option<String>,
    key_prefix: Option<String>,
    hmac_key_file: Option<PathBuf>,
) -> anyhow::Result<DevSetup> {
    if let Some(file) = hmac_key_file {
        let file = absolute(&file)?;
        wardend::auth::load_key_file(&file)
            .with_context(|| format!("cannot use the HMAC key file {}", file.display()))?;
        setup.config.auth.hmac_key_file = Some(file.clone());
        for (k, v) in &mut setup.announce {
            if k == "WARDEN_HMAC_KEY_FILE" {
                *v = file.display().to_string();
            }
        }
    }
    if let Some(url) = redis {
        let cluster = &mut setup.config.cluster;
        cluster.redis_url = Some(url.clone());
        if let Some(p) = key_prefix {
            cluster.key_prefix = p;
        }
        cluster
            .validate()
            .map_err(|(key, message)| anyhow::anyhow!("--redis: {key}: {message}"))?;
        setup.announce.push(("WARDEN_REDIS_URL".to_string(), url));
    }
    Ok(setup)
}

/// Dev mode's gateway (`--listen ADDR`): a throwaway PKI in `<state-dir>/pki` (created once,
/// reused after), a server certificate for localhost, and a client certificate `dev-client`
/// the dev policy allows everything. Announces the CA and the client's certificate and key;
/// the daemon announces `WARDEN_LISTEN` with the address it really bound.
pub fn gateway(setup: &mut DevSetup, listen: &str) -> anyhow::Result<()> {
    use warden_pki::{IssueOptions, Kind, Pki};
    let pki = Pki::new(setup.state_dir.join("pki"));
    if !pki.path(warden_pki::CA_CERT).exists() {
        pki.init("warden dev CA", None, false)
            .context("cannot create the dev PKI")?;
    }
    let have = pki.list().context("cannot read the dev PKI")?;
    let issued = |name: &str, kind: Kind, sans: &[&str]| -> anyhow::Result<warden_pki::CertInfo> {
        if let Some(c) = have
            .iter()
            .find(|c| c.name == name && c.revoked_at.is_none())
        {
            return Ok(c.clone());
        }
        pki.issue(&IssueOptions {
            kind,
            name: name.into(),
            sans: sans.iter().map(|s| s.to_string()).collect(),
            days: None,
            force: true,
        })
        .with_context(|| format!("cannot issue the dev certificate {name}"))
    };
    let server = issued(
        "dev-server",
        Kind::Server,
        &["localhost", "127.0.0.1", "::1"],
    )?;
    let client = issued("dev-client", Kind::Client, &[])?;
    let key_of = |c: &warden_pki::CertInfo| pki.path(&c.cert).with_extension("key");

    let g = &mut setup.config.gateway;
    g.listen = Some(listen.to_string());
    g.cert = Some(pki.path(&server.cert));
    g.key = Some(key_of(&server));
    g.client_ca = Some(pki.path(warden_pki::CA_CERT));
    g.crl = Some(pki.path(warden_pki::CRL));
    g.validate()
        .map_err(|(k, m)| anyhow::anyhow!("--listen: {k}: {m}"))?;
    setup.config.policy.rules.push(RuleConfig {
        cert_id: Some(vec![client.identity.clone()].into()),
        roles: vec!["dev".into()],
        ..Default::default()
    });
    setup.announce.extend([
        (
            "WARDEN_CA".to_string(),
            pki.path(warden_pki::CA_CERT).display().to_string(),
        ),
        (
            "WARDEN_CLIENT_CERT".to_string(),
            pki.path(&client.cert).display().to_string(),
        ),
        (
            "WARDEN_CLIENT_KEY".to_string(),
            key_of(&client).display().to_string(),
        ),
    ]);
    Ok(())
}
