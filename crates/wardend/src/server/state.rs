//! The daemon's shared state: what every connection reads, and the part a reload replaces.

use crate::audit::AuditLog;
use crate::auth::{NonceStore, RateLimiter, SessionStore};
use crate::config::Config;
use crate::identity::{Attestor, Principal};
use crate::policy::{Grants, Policy};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use warden_wire::hmac::HmacKey;

/// Everything a SIGHUP replaces at once, so that a request sees one consistent configuration.
pub struct Runtime {
    pub config: Arc<Config>,
    pub policy: Policy,
    /// Bumped by every reload; connections recompute their grants when it changes.
    pub generation: u64,
    /// `auth.hmac_key_file`, loaded.
    pub default_key: Option<HmacKey>,
    /// Per-principal key files named by policy rules, loaded.
    pub rule_keys: HashMap<PathBuf, HmacKey>,
}

impl Runtime {
    /// Compiles a configuration into a runtime: the policy, and every HMAC key file it names.
    /// Any failure leaves the caller's running runtime untouched.
    pub fn build(config: Config, generation: u64) -> anyhow::Result<Runtime> {
        let policy = Policy::compile(&config.policy)?;
        let load = |p: &Path| -> anyhow::Result<HmacKey> {
            let bytes = crate::auth::load_key_file(p)?;
            Ok(HmacKey::new(&bytes))
        };
        let default_key = match &config.auth.hmac_key_file {
            Some(p) => Some(load(p)?),
            None => None,
        };
        let mut rule_keys = HashMap::new();
        for rule in &config.policy.rules {
            if let Some(p) = &rule.hmac_key_file {
                if !rule_keys.contains_key(p) {
                    rule_keys.insert(p.clone(), load(p)?);
                }
            }
        }
        Ok(Runtime {
            config: Arc::new(config),
            policy,
            generation,
            default_key,
            rule_keys,
        })
    }

    /// The key a principal signs Lumo requests with: its rule's own, else the default.
    pub fn hmac_key(&self, grants: &Grants) -> Option<&HmacKey> {
        match self.policy.hmac_key_file(grants) {
            Some(p) => self.rule_keys.get(p),
            None => self.default_key.as_ref(),
        }
    }
}

/// Counters for `system.metrics` and `daemon.status`.
#[derive(Default)]
pub struct Metrics {
    pub requests_total: AtomicU64,
    pub requests_failed: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub active_connections: AtomicUsize,
    pub last_access_unix: AtomicU64,
}

impl Metrics {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

pub struct State {
    pub runtime: ArcSwap<Runtime>,
    /// The file a reload re-reads; `None` in dev mode (nothing to re-read).
    pub config_path: Option<PathBuf>,
    pub nonces: NonceStore,
    pub limiter: RateLimiter,
    pub sessions: SessionStore,
    /// `[cluster] redis_url`: nonces, rate limits and sessions shared through Redis; `None`
    /// keeps them in the three stores above.
    pub cluster: Option<crate::auth::cluster::ClusterStore>,
    pub audit: AuditLog,
    pub attestor: Attestor,
    pub metrics: Metrics,
    pub started: Instant,
    pub started_at: SystemTime,
    pub dev_mode: bool,
    /// The secret store (see `server::secrets`).
    pub secrets: super::secrets::Vault,
    pub jobs: crate::jobs::JobService,
    request_ids: RequestIds,
    reload_lock: Mutex<()>,
    /// Under a monitor: every component's state as the monitor last reported it.
    components: Mutex<Option<Vec<crate::privsep::control::ComponentStatus>>>,
}

impl State {
    pub fn new(
        runtime: Runtime,
        config_path: Option<PathBuf>,
        audit: AuditLog,
        dev_mode: bool,
    ) -> State {
        let cfg = runtime.config.clone();
        State {
            nonces: NonceStore::new(cfg.auth.max_request_age.get()),
            limiter: RateLimiter::new(cfg.rate_limits.clone()),
            sessions: SessionStore::new(cfg.auth.session_config()),
            cluster: crate::auth::cluster::ClusterStore::new(&cfg.cluster),
            runtime: ArcSwap::from_pointee(runtime),
            config_path,
            audit,
            attestor: Attestor::new(),
            metrics: Metrics::default(),
            started: Instant::now(),
            started_at: SystemTime::now(),
            dev_mode,
            secrets: super::secrets::Vault::new(
                cfg.secrets.store_config(),
                cfg.storage.pg_config(&cfg.secrets),
            ),
            jobs: crate::jobs::JobService::new(&cfg.jobs),
            request_ids: RequestIds::new(),
            reload_lock: Mutex::new(()),
            components: Mutex::new(None),
        }
    }

    pub fn runtime(&self) -> arc_swap::Guard<Arc<Runtime>> {
        self.runtime.load()
    }

    pub fn next_request_id(&self) -> String {
        self.request_ids.next()
    }

    /// Re-reads the configuration file and swaps it in whole, or keeps the running one and
    /// says why. Settings that need a restart are reported, not half-applied.
    /// Keeps the monitor's latest report of every component (privilege separation).
    pub fn set_components(&self, c: Vec<crate::privsep::control::ComponentStatus>) {
        *self.components.lock() = Some(c);
    }

    /// The monitor's latest report; `None` in single-process mode.
    pub fn components(&self) -> Option<Vec<crate::privsep::control::ComponentStatus>> {
        self.components.lock().clone()
    }

    pub fn reload(&self) -> Result<ReloadReport, String> {
        let _guard = self.reload_lock.lock();
        let Some(path) = &self.config_path else {
            return Err("dev mode has no configuration file to reload".into());
        };
        let mut new = Config::load(path).map_err(|e| e.to_string())?;
        let current = self.runtime();
        let old = &current.config;
        let mut needs_restart = Vec::new();
        if new.socket.path != old.socket.path {
            needs_restart.push("socket.path");
        }
        if new.audit.path != old.audit.path {
            needs_restart.push("audit.path");
        }
        if new.daemon.pid_file != old.daemon.pid_file {
            needs_restart.push("daemon.pid_file");
        }
        if new.secrets != old.secrets {
            needs_restart.push("secrets");
        }
        if new.storage != old.storage {
            needs_restart.push("storage");
        }
        if new.cluster != old.cluster {
            needs_restart.push("cluster");
        }
        if new.gateway != old.gateway {
            needs_restart.push("gateway");
        }
        if new.upstream != old.upstream {
            needs_restart.push("upstream");
        }
        // Those keep their running values until a restart: the running configuration must
        // describe the socket, log and pid file in use (the next reload works on the socket
        // through it, and compares against it).
        new.socket.path.clone_from(&old.socket.path);
        new.audit.path.clone_from(&old.audit.path);
        new.daemon.pid_file.clone_from(&old.daemon.pid_file);
        new.secrets.clone_from(&old.secrets);
        new.storage.clone_from(&old.storage);
        new.cluster.clone_from(&old.cluster);
        new.gateway.clone_from(&old.gateway);
        new.upstream.clone_from(&old.upstream);
        let rt = Runtime::build(new, current.generation + 1).map_err(|e| format!("{e:#}"))?;
        let cfg = rt.config.clone();
        super::listener::apply_socket_permissions(&old.socket.path, &cfg.socket)
            .map_err(|e| format!("socket permissions: {e}"))?;
        self.limiter.set_limits(cfg.rate_limits.clone());
        self.sessions.set_config(cfg.auth.session_config());
        self.audit.reconfigure(cfg.audit.audit_config());
        self.runtime.store(Arc::new(rt));
        Ok(ReloadReport {
            generation: current.generation + 1,
            needs_restart: needs_restart.into_iter().map(String::from).collect(),
        })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadReport {
    pub generation: u64,
    /// Keys whose change was seen but only takes effect after a restart.
    pub needs_restart: Vec<String>,
}

/// What a connection knows about its peer: fixed at accept, except the grants, which follow
/// the policy across reloads.
pub struct Peer {
    pub principal: Principal,
    pub key: String,
    pub audit_json: crate::audit::AuditPrincipal,
    grants: Mutex<(u64, Arc<Grants>)>,
}

impl Peer {
    pub fn new(principal: Principal, rt: &Runtime) -> Peer {
        let grants = Arc::new(rt.policy.grants(&principal));
        Peer {
            key: principal.key(),
            audit_json: principal.audit_json().into(),
            principal,
            grants: Mutex::new((rt.generation, grants)),
        }
    }

    /// The peer's grants under `rt`'s policy (recomputed once per reload, not per request).
    pub fn grants(&self, rt: &Runtime) -> Arc<Grants> {
        let mut g = self.grants.lock();
        if g.0 != rt.generation {
            *g = (rt.generation, Arc::new(rt.policy.grants(&self.principal)));
        }
        g.1.clone()
    }
}

/// Request ids in UUID form: unique within this daemon's life (a counter through a bijective
/// mix, so no two collide), not guessable from one another, and one atomic add each.
struct RequestIds {
    key: u64,
    hi: u32,
    counter: AtomicU64,
}

/// splitmix64's finalizer: every step is invertible, so distinct inputs give distinct outputs.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl RequestIds {
    fn new() -> Self {
        let mut b = [0u8; 12];
        getrandom::getrandom(&mut b).expect("the kernel's random source is available");
        RequestIds {
            key: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            hi: u32::from_le_bytes(b[8..].try_into().expect("4 bytes")),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let lo = mix64(n ^ self.key);
        // xxxxxxxx-xxxx-4xxx-8xxx-xxxxxxxxxxxx: all 64 bits of `lo` are in the last four
        // groups; version and variant digits as UUIDv4 has them. Written digit by digit
        // rather than with `format!`, whose padding logic cost more than the rest of the id.
        let mut id = [b'-'; 36];
        hex_into(&mut id[0..8], u64::from(self.hi));
        hex_into(&mut id[9..13], lo >> 48);
        id[14] = b'4';
        hex_into(&mut id[15..18], (lo >> 36) & 0xfff);
        id[19] = b'8';
        hex_into(&mut id[20..23], (lo >> 24) & 0xfff);
        hex_into(
            &mut id[24..36],
            (lo & 0xff_ffff) | ((mix64(n.wrapping_add(self.key)) & 0xff_ffff) << 24),
        );
        String::from_utf8(id.to_vec()).expect("hex digits and dashes are ASCII")
    }
}

/// Writes the low `4 * out.len()` bits of `v` into `out` as lowercase hex, most significant
/// digit first.
fn hex_into(out: &mut [u8], mut v: u64) {
    for d in out.iter_mut().rev() {
        *d = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_written_like_the_format_they_replace() {
        let ids = RequestIds::new();
        for _ in 0..1000 {
            let n = ids.counter.load(Ordering::Relaxed);
            let id = ids.next();
            let lo = mix64(n ^ ids.key);
            let want = format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                ids.hi,
                (lo >> 48) as u16,
                ((lo >> 36) & 0xfff) as u16,
                ((lo >> 24) & 0xfff) as u16,
                (lo & 0xff_ffff) | ((mix64(n.wrapping_add(ids.key)) & 0xff_ffff) << 24)
            );
            assert_eq!(id, want);
        }
    }

    #[test]
    fn request_ids_are_unique_and_uuid_shaped() {
        let ids = RequestIds::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let id = ids.next();
            assert_eq!(id.len(), 36, "{id}");
            assert_eq!(&id[14..15], "4");
            assert!(seen.insert(id));
        }
    }
}
