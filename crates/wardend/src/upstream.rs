//! Upstream mode: a per-host daemon or a container sidecar that serves secrets it pulls from a
//! central warden, instead of from a store of its own.
//!
//! With `[upstream] url` set, the daemon connects to the central warden's gateway (gRPC over
//! mutual TLS, with the certificate `[upstream] cert`/`key`), fetches the secrets the central
//! policy lets that certificate read (narrowed by `[upstream] secrets` globs), holds them in
//! locked memory only, and serves them on its own socket through its own policy. It fetches
//! again whenever the central store changes (`Secrets.Watch`), every `refresh_interval`, and
//! after a reconnect. While the central warden is unreachable it keeps serving what it holds,
//! for at most `max_staleness` after its last successful fetch; after that every read answers
//! `UPSTREAM_UNAVAILABLE` until the central warden is back.
//!
//! What it deliberately does not do: write anything to disk (a restart starts empty and
//! fetches again), accept writes (they belong on the central warden), or trust the central
//! warden with more than its TLS identity proves.

use crate::secrets::{SecretBytes, SecretMeta};
use crate::units::HumanDuration;
use globset::{Glob, GlobSet, GlobSetBuilder};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use warden_client::grpc::{pb, GrpcClient};

/// The `[upstream]` configuration section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The central warden's gateway, `https://host:port`; upstream mode is off when unset.
    pub url: Option<String>,
    /// The CA the central gateway's certificate must chain to (PEM).
    pub ca: Option<PathBuf>,
    /// This daemon's client certificate (PEM), as `warden pki issue client` writes it.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// Globs of the secret names to mirror (of those the central policy lets this daemon read).
    pub secrets: Vec<String>,
    /// Fetch again at least this often, even without a change notification.
    pub refresh_interval: HumanDuration,
    /// How long after the last successful fetch the mirrored values are still served while
    /// the central warden is unreachable.
    pub max_staleness: HumanDuration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: None,
            ca: None,
            cert: None,
            key: None,
            secrets: vec!["*".into()],
            refresh_interval: HumanDuration::secs(300),
            max_staleness: HumanDuration::secs(3600),
        }
    }
}

impl UpstreamConfig {
    /// Checks what can be checked without the files: `(key, what is wrong)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let Some(url) = &self.url else {
            return Ok(());
        };
        if !url.starts_with("https://") {
            return Err((
                "upstream.url",
                format!("expected https://HOST:PORT (the central warden's gateway), got {url:?}"),
            ));
        }
        for (key, v) in [
            ("upstream.ca", &self.ca),
            ("upstream.cert", &self.cert),
            ("upstream.key", &self.key),
        ] {
            if v.is_none() {
                return Err((key, "required when upstream.url is set".into()));
            }
        }
        globs(&self.secrets).map_err(|e| ("upstream.secrets", e))?;
        if self.refresh_interval.get() < Duration::from_secs(1) {
            return Err(("upstream.refresh_interval", "at least 1s".into()));
        }
        if self.max_staleness.get() < Duration::from_secs(1) {
            return Err(("upstream.max_staleness", "at least 1s".into()));
        }
        Ok(())
    }
}

fn globs(patterns: &[String]) -> Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| format!("bad glob {p:?}: {e}"))?);
    }
    b.build().map_err(|e| e.to_string())
}

/// One mirrored secret.
struct Entry {
    value: SecretBytes,
    version: u64,
}

/// The values pulled from the central warden, and how fresh they are.
pub struct Mirror {
    url: String,
    max_staleness: Duration,
    values: RwLock<Arc<BTreeMap<String, Entry>>>,
    synced: Mutex<Option<(Instant, SystemTime)>>,
    last_error: Mutex<Option<String>>,
}

/// Why a mirrored read cannot be answered.
pub enum MirrorError {
    /// Nothing fetched yet, or the last fetch is older than `max_staleness`.
    Unavailable(String),
    NotFound,
}

impl Mirror {
    pub fn new(cfg: &UpstreamConfig) -> Mirror {
        Mirror {
            url: cfg.url.clone().unwrap_or_default(),
            max_staleness: cfg.max_staleness.get(),
            values: RwLock::new(Arc::new(BTreeMap::new())),
            synced: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The mirrored values, if they are fresh enough to serve.
    fn fresh(&self) -> Result<Arc<BTreeMap<String, Entry>>, MirrorError> {
        match *self.synced.lock() {
            Some((at, _)) if at.elapsed() <= self.max_staleness => Ok(self.values.read().clone()),
            Some((at, _)) => Err(MirrorError::Unavailable(format!(
                "the secrets mirrored from {} are {} s old (max_staleness {} s) and the upstream is unreachable: {}",
                self.url,
                at.elapsed().as_secs(),
                self.max_staleness.as_secs(),
                self.last_error.lock().clone().unwrap_or_else(|| "no answer".into())
            ))),
            None => Err(MirrorError::Unavailable(format!(
                "nothing fetched from the upstream {} yet: {}",
                self.url,
                self.last_error
                    .lock()
                    .clone()
                    .unwrap_or_else(|| "connecting".into())
            ))),
        }
    }

    /// A mirrored value (its text) and version.
    pub fn get(&self, name: &str) -> Result<(String, u64), MirrorError> {
        let values = self.fresh()?;
        let e = values.get(name).ok_or(MirrorError::NotFound)?;
        Ok((
            String::from_utf8_lossy(e.value.as_slice()).into_owned(),
            e.version,
        ))
    }

    /// The mirrored names, as the store lists them.
    pub fn list(&self) -> Result<Vec<SecretMeta>, MirrorError> {
        let values = self.fresh()?;
        let updated = self
            .synced
            .lock()
            .map(|(_, t)| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
            .unwrap_or(0);
        Ok(values
            .iter()
            .map(|(name, e)| SecretMeta {
                name: name.clone(),
                latest_version: e.version,
                versions: 1,
                updated,
            })
            .collect())
    }

    /// Secrets held (0 when stale).
    pub fn loaded(&self) -> usize {
        self.fresh().map(|v| v.len()).unwrap_or(0)
    }

    fn replace(&self, values: BTreeMap<String, Entry>) {
        *self.values.write() = Arc::new(values);
        *self.synced.lock() = Some((Instant::now(), SystemTime::now()));
        *self.last_error.lock() = None;
    }

    fn failed(&self, e: String) {
        tracing::warn!(upstream = %self.url, error = %e, "upstream unreachable; serving what was fetched");
        *self.last_error.lock() = Some(e);
    }
}

/// Keeps `mirror` filled from the upstream until the task is dropped: connect, fetch, then
/// fetch again on every change notification and every `refresh_interval`; reconnect with
/// backoff (1 s to 30 s) when the connection fails. `changed` is called after each fetch.
pub async fn run(mirror: Arc<Mirror>, cfg: UpstreamConfig, changed: impl Fn() + Send + 'static) {
    let (Some(url), Some(ca), Some(cert), Some(key)) = (&cfg.url, &cfg.ca, &cfg.cert, &cfg.key)
    else {
        return;
    };
    let wanted = match globs(&cfg.secrets) {
        Ok(g) => g,
        Err(e) => return mirror.failed(e),
    };
    let refresh = cfg.refresh_interval.get();
    // Ask for heartbeats often enough to notice a dead connection well within the refresh.
    let heartbeat = (refresh.as_secs() / 3).clamp(1, 30);
    let mut backoff = Duration::from_secs(1);
    loop {
        match session(
            &mirror, url, ca, cert, key, &wanted, refresh, heartbeat, &changed,
        )
        .await
        {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => mirror.failed(e),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One connection to the upstream: fetch, then follow its changes until it fails.
#[allow(clippy::too_many_arguments)]
async fn session(
    mirror: &Mirror,
    url: &str,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    wanted: &GlobSet,
    refresh: Duration,
    heartbeat: u64,
    changed: &impl Fn(),
) -> Result<(), String> {
    let client = GrpcClient::connect(url, ca, cert, key)
        .await
        .map_err(|e| e.to_string())?;
    let mut secrets = client.secrets();
    let mut watch = secrets
        .watch(pb::WatchRequest {
            heartbeat_seconds: Some(heartbeat as u32),
        })
        .await
        .map_err(|s| format!("watch: {}", s.message()))?
        .into_inner();
    fetch(mirror, &mut secrets, wanted).await?;
    changed();
    let silence = Duration::from_secs(heartbeat * 3);
    let mut next_refresh = tokio::time::Instant::now() + refresh;
    loop {
        tokio::select! {
            ev = tokio::time::timeout(silence, watch.message()) => match ev {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => return Err("the upstream ended the watch".into()),
                Ok(Err(s)) => return Err(format!("watch: {}", s.message())),
                Err(_) => return Err(format!("no word from the upstream for {} s", silence.as_secs())),
            },
            _ = tokio::time::sleep_until(next_refresh) => {}
        }
        fetch(mirror, &mut secrets, wanted).await?;
        changed();
        next_refresh = tokio::time::Instant::now() + refresh;
    }
}

/// Fetches every wanted secret the upstream lets us read and replaces the mirror at once.
async fn fetch(
    mirror: &Mirror,
    secrets: &mut warden_client::grpc::SecretsClient<tonic::transport::Channel>,
    wanted: &GlobSet,
) -> Result<(), String> {
    let list = secrets
        .list(pb::ListSecretsRequest {})
        .await
        .map_err(|s| format!("list: {}", s.message()))?
        .into_inner();
    let names: Vec<String> = list
        .entries
        .iter()
        .map(|e| e.key.clone())
        .filter(|k| wanted.is_match(k))
        .collect();
    let versions: BTreeMap<&str, u64> = list
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.version))
        .collect();
    let mut values = BTreeMap::new();
    for chunk in names.chunks(crate::server::secrets::MAX_BATCH) {
        let got = secrets
            .get_many(pb::GetManyRequest {
                keys: chunk.to_vec(),
            })
            .await
            .map_err(|s| format!("get_many: {}", s.message()))?
            .into_inner();
        for (name, text) in got.secrets {
            let value = SecretBytes::from_slice(text.as_bytes())
                .map_err(|_| "out of locked memory for the mirrored values".to_string())?;
            let version = versions.get(name.as_str()).copied().unwrap_or(0);
            values.insert(name, Entry { value, version });
        }
    }
    tracing::debug!(upstream = %mirror.url, secrets = values.len(), "mirrored from the upstream");
    mirror.replace(values);
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn parse(upstream: &str) -> Result<Config, String> {
        Config::parse(
            &format!("[upstream]\n{upstream}"),
            Path::new("/etc/warden/warden.toml"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn upstream_settings_are_checked_and_name_the_key() {
        let ok = parse("url = \"https://central:8443\"\nca = \"/ca.pem\"\ncert = \"/c.pem\"\nkey = \"/c.key\"\nsecrets = [\"app_*\"]\nrefresh_interval = \"30s\"\nmax_staleness = \"10m\"\n").unwrap();
        assert_eq!(ok.upstream.secrets, vec!["app_*".to_string()]);
        assert_eq!(ok.upstream.max_staleness.get().as_secs(), 600);
        for (text, key) in [
            ("url = \"http://central:8443\"\nca = \"/a\"\ncert = \"/b\"\nkey = \"/c\"\n", "upstream.url"),
            ("url = \"https://central:8443\"\ncert = \"/b\"\nkey = \"/c\"\n", "upstream.ca"),
            ("url = \"https://central:8443\"\nca = \"/a\"\nkey = \"/c\"\n", "upstream.cert"),
            ("url = \"https://central:8443\"\nca = \"/a\"\ncert = \"/b\"\n", "upstream.key"),
            ("url = \"https://c:1\"\nca = \"/a\"\ncert = \"/b\"\nkey = \"/c\"\nsecrets = [\"[\"]\n", "upstream.secrets"),
            ("url = \"https://c:1\"\nca = \"/a\"\ncert = \"/b\"\nkey = \"/c\"\nmax_staleness = \"0s\"\n", "upstream.max_staleness"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
        }
        let e = parse("urls = \"https://x\"\n").unwrap_err();
        assert!(e.contains("urls"), "{e}");
        // Off by default: nothing required.
        assert!(parse("").unwrap().upstream.url.is_none());
    }
}
