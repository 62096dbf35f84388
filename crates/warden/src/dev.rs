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
//! next to the store it protects.

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
    let master = state_dir.join("dev-master-password");
    wardend::auth::generate_key_file(&master)
        .with_context(|| format!("cannot create the dev master password {}", master.display()))?;
    let password = wardend::server::secrets::read_password_file(&master)
        .map_err(|e| anyhow::anyhow!("cannot read the dev master password: {e}"))?;
    match wardend::secrets::SecretStore::init(&cfg.secrets.store_config(), &password) {
        Ok(()) | Err(wardend::secrets::StoreError::AlreadyExists(_)) => {}
        Err(e) => return Err(e).context("cannot create the dev secret store"),
    }
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
        (
            "WARDEN_MASTER_PASSWORD_FILE".to_string(),
            master.display().to_string(),
        ),
        ("WARDEN_FILES_DIR".to_string(), files.display().to_string()),
    ];
    Ok(DevSetup {
        config: cfg,
        announce,
        state_dir,
        master_password_file: master,
    })
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
