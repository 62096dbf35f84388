//! Dev mode: a fully working daemon with no configuration file, as `vault server -dev` is for
//! Vault. State lives in one directory (a fresh temporary one unless given; reused if it
//! exists): the socket, a generated HMAC key, the audit log, the pid and log files. Root and the
//! invoking user may do everything; there are no rate limits. Not for production: anyone who
//! can read the state directory holds the keys.

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
}

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
    ];
    Ok(DevSetup {
        config: cfg,
        announce,
        state_dir,
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
