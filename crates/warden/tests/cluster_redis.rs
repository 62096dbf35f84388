//! Several real daemons sharing one Redis (`[cluster] redis_url`, dev mode's `--redis`): a
//! nonce used on one is refused on the others, a token from one works on the others, a logout
//! on one is seen by all, a rate limit is counted once for all, and a Redis that goes away
//! makes requests fail closed with `SHARED_STORE_UNAVAILABLE` until it is back.
//!
//! They need a Redis: set `WARDEN_TEST_REDIS=1` (the machine's Redis on 127.0.0.1:6379; the
//! outage test starts a private `redis-server` of its own). Without it every test returns at
//! once. Each test uses its own key prefix and deletes its keys at the end.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REDIS: &str = "redis://127.0.0.1:6379";

fn enabled() -> bool {
    let on = std::env::var("WARDEN_TEST_REDIS").as_deref() == Ok("1");
    if !on {
        eprintln!("skipped: set WARDEN_TEST_REDIS=1 to run the tests against Redis");
    }
    on
}

/// A key prefix no other test uses; its keys are deleted when it is dropped.
struct Prefix {
    url: String,
    prefix: String,
}

impl Prefix {
    fn new(url: &str, name: &str) -> Prefix {
        Prefix {
            url: url.to_string(),
            prefix: format!("warden-test:{name}:{}:{}:", std::process::id(), nonce()),
        }
    }

    fn keys(&self) -> Vec<String> {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut c = client.get_connection().unwrap();
        redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut c)
            .unwrap()
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut c) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut c)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut c);
        }
    }
}

/// A dev daemon in the cluster of `prefix`, signing with `key` (or a generated key if `None`).
fn dev_member(url: &str, prefix: &Prefix, key: Option<&Path>) -> Daemon {
    let mut args = vec!["--redis", url, "--redis-key-prefix", &prefix.prefix];
    let key = key.map(|k| k.display().to_string());
    if let Some(k) = &key {
        args.extend_from_slice(&["--hmac-key-file", k]);
    }
    let d = Daemon::dev_with(&args);
    assert_eq!(d.env["WARDEN_REDIS_URL"], url);
    if let Some(k) = &key {
        assert_eq!(&d.env["WARDEN_HMAC_KEY_FILE"], k);
    }
    d
}

fn key_file(d: &Daemon) -> std::path::PathBuf {
    d.env["WARDEN_HMAC_KEY_FILE"].clone().into()
}

fn lumo(d: &Daemon, frame: &[u8]) -> Value {
    let mut c = Raw::lp(&d.socket());
    c.send_bytes(frame);
    c.recv().expect("a reply")
}

fn call(d: &Daemon, v: &Value) -> Value {
    Raw::lines(&d.socket()).call(v)
}

fn login_on(d: &Daemon) -> String {
    login(&mut Raw::lines(&d.socket()))
}

fn ping_with(d: &Daemon, token: &str) -> Value {
    call(d, &json!({"action": "daemon.status", "token": token}))
}

#[test]
fn a_nonce_used_on_one_daemon_is_refused_on_the_others() {
    if !enabled() {
        return;
    }
    let prefix = Prefix::new(REDIS, "nonce");
    let a = dev_member(REDIS, &prefix, None);
    let b = dev_member(REDIS, &prefix, Some(&key_file(&a)));
    let c = dev_member(REDIS, &prefix, Some(&key_file(&a)));
    assert_eq!(a.key(), b.key());

    let frame = lumo_ping(&a.key());
    lumo_ok(&lumo(&a, &frame));
    for other in [&b, &c, &a] {
        let r = lumo(other, &frame);
        assert_eq!(lumo_code(&r), "AUTH_ERROR", "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("replay"),
            "{r}"
        );
    }
    // Fresh nonces pass everywhere; the nonce sits in Redis, hashed, with an expiry.
    lumo_ok(&lumo(&b, &lumo_ping(&a.key())));
    lumo_ok(&lumo(&c, &lumo_ping(&a.key())));
    let keys = prefix.keys();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys
        .iter()
        .all(|k| k.starts_with(&format!("{}n:", prefix.prefix))));
    let redis = redis::Client::open(REDIS).unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query(&mut redis.get_connection().unwrap())
        .unwrap();
    assert!(ttl > 0 && ttl <= 62_000, "{ttl}");
    // Refused on b, audited on b.
    b.wait_audit(|r| r["method"] == "system.ping" && r["code"] == "AUTH_ERROR");
}

#[test]
fn a_token_from_one_daemon_works_on_the_others_and_logout_is_seen_by_all() {
    if !enabled() {
        return;
    }
    let prefix = Prefix::new(REDIS, "sessions");
    let a = dev_member(REDIS, &prefix, None);
    let b = dev_member(REDIS, &prefix, Some(&key_file(&a)));
    let c = dev_member(REDIS, &prefix, Some(&key_file(&a)));

    let token = login_on(&a);
    for d in [&b, &c, &a] {
        let r = ping_with(d, &token);
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["data"]["pid"], d.pid());
    }
    // Only the token's hash is stored.
    let keys = prefix.keys();
    assert!(!keys.iter().any(|k| k.contains(&token[4..])), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains(":s:")), "{keys:?}");

    // Refreshed on b: the old token stops working on a, the new one works on c.
    let r = call(&b, &json!({"action": "refresh", "token": token}));
    assert_eq!(r["status"], "ok", "{r}");
    let fresh = r["data"]["token"].as_str().unwrap().to_string();
    assert_eq!(ping_with(&a, &token)["error"]["code"], "AUTH_INVALID");
    assert_eq!(ping_with(&c, &fresh)["status"], "ok");

    // Logged out on c: refused on a and b at once.
    let r = call(&c, &json!({"action": "logout", "token": fresh}));
    assert_eq!(r["status"], "ok", "{r}");
    for d in [&a, &b, &c] {
        let r = ping_with(d, &fresh);
        assert_eq!(r["error"]["code"], "AUTH_INVALID", "{r}");
    }

    // A bootstrap token made on a is redeemed once, on b; c then refuses it.
    let admin = login_on(&a);
    let r = call(
        &a,
        &json!({"action": "auth", "token": admin, "params": {"type": "bootstrap", "for": "uid:0"}}),
    );
    assert_eq!(r["status"], "ok", "{r}");
    let boot = r["data"]["token"].as_str().unwrap().to_string();
    let r = call(
        &b,
        &json!({"action": "auth", "params": {"bootstrap": boot}}),
    );
    assert_eq!(r["status"], "ok", "{r}");
    let redeemed = r["data"]["token"].as_str().unwrap().to_string();
    assert_eq!(ping_with(&c, &redeemed)["status"], "ok");
    let r = call(
        &c,
        &json!({"action": "auth", "params": {"bootstrap": boot}}),
    );
    assert_eq!(r["error"]["code"], "AUTH_INVALID", "{r}");
}

#[test]
fn a_rate_limit_is_counted_once_across_daemons_and_max_sessions_too() {
    if !enabled() {
        return;
    }
    let prefix = Prefix::new(REDIS, "rate");
    let toml = base_config(&format!(
        "{ROOT_ADMIN}\n[rate_limits]\nauth = \"3/1h\"\n\n[cluster]\nredis_url = \"{REDIS}\"\nkey_prefix = \"{}\"\n",
        prefix.prefix
    ));
    let a = Daemon::configured(&toml);
    let b = Daemon::configured(&toml);
    let c = Daemon::configured(&toml);
    login_on(&a);
    login_on(&b);
    let r = call(&c, &json!({"action": "auth"}));
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["data"]["type"], "session");
    // The fourth login anywhere exceeds the shared 3/1h.
    for d in [&a, &b, &c] {
        let r = call(d, &json!({"action": "auth"}));
        assert_eq!(r["error"]["code"], "RATE_LIMITED", "{r}");
        assert_eq!(r["error"]["details"]["limit"], 3, "{r}");
        assert_eq!(r["error"]["details"]["remaining"], 0, "{r}");
    }
    c.wait_audit(|r| r["method"] == "auth.login" && r["code"] == "RATE_LIMITED");

    // max_sessions_per_client counts the tokens held on every daemon.
    let prefix2 = Prefix::new(REDIS, "max");
    let toml = base_config(&format!(
        "{ROOT_ADMIN}\n[cluster]\nredis_url = \"{REDIS}\"\nkey_prefix = \"{}\"\n",
        prefix2.prefix
    ))
    .replace("[auth]\n", "[auth]\nmax_sessions_per_client = 2\n");
    let d = Daemon::configured(&toml);
    let e = Daemon::configured(&toml);
    let first = login_on(&d);
    login_on(&e);
    let r = call(&d, &json!({"action": "auth"}));
    assert_eq!(r["error"]["code"], "RATE_LIMITED", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 live tokens"),
        "{r}"
    );
    // A logout on e frees a place for d.
    assert_eq!(
        call(&e, &json!({"action": "logout", "token": first}))["status"],
        "ok"
    );
    assert_eq!(call(&d, &json!({"action": "auth"}))["status"], "ok");
}

/// A `redis-server` of the test's own on `port`, never the machine's.
struct PrivateRedis {
    child: Child,
}

impl PrivateRedis {
    fn start(port: u16, dir: &Path) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let r = PrivateRedis { child };
        let url = format!("redis://127.0.0.1:{port}");
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let up = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if up {
                return r;
            }
            assert!(Instant::now() < until, "private redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Retries `probe` until it holds (bounded wait, not a timing assertion).
fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !probe() {
        assert!(Instant::now() < until, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_dead_redis_refuses_hmac_and_token_requests_then_recovery_needs_no_restart() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = PrivateRedis::start(port, dir.path());
    let prefix = Prefix::new(&url, "outage");
    let a = dev_member(&url, &prefix, None);
    lumo_ok(&lumo(&a, &lumo_ping(&a.key())));
    let token = login_on(&a);
    assert_eq!(ping_with(&a, &token)["status"], "ok");

    server.kill();
    let r = lumo(&a, &lumo_ping(&a.key()));
    assert_eq!(lumo_code(&r), "SHARED_STORE_UNAVAILABLE", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("Redis"),
        "{r}"
    );
    let r = ping_with(&a, &token);
    assert_eq!(r["error"]["code"], "SHARED_STORE_UNAVAILABLE", "{r}");
    let r = call(&a, &json!({"action": "auth"}));
    assert_eq!(r["error"]["code"], "SHARED_STORE_UNAVAILABLE", "{r}");
    // Requests that need no shared store still work, and every refusal is audited.
    assert_eq!(call(&a, &json!({"action": "health"}))["status"], "ok");
    a.wait_audit(|r| r["method"] == "system.ping" && r["code"] == "SHARED_STORE_UNAVAILABLE");
    a.wait_audit(|r| r["method"] == "auth.login" && r["code"] == "SHARED_STORE_UNAVAILABLE");

    // Redis back on the same port (empty: it kept nothing): the daemon uses it again.
    let _server = PrivateRedis::start(port, dir.path());
    eventually("signed requests pass again", || {
        lumo(&a, &lumo_ping(&a.key()))["success"] == true
    });
    let fresh = login_on(&a);
    assert_eq!(ping_with(&a, &fresh)["status"], "ok");
    // The old token died with the server's memory: refused as invalid, not let through.
    assert_eq!(ping_with(&a, &token)["error"]["code"], "AUTH_INVALID");
}

#[test]
fn session_fallback_local_serves_tokens_from_memory_while_redis_is_down() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = PrivateRedis::start(port, dir.path());
    let prefix = Prefix::new(&url, "fallback");
    let toml = base_config(&format!(
        "{ROOT_ADMIN}\n[cluster]\nredis_url = \"{url}\"\nkey_prefix = \"{}\"\nsession_fallback = \"local\"\ntimeout = \"200ms\"\n",
        prefix.prefix
    ));
    let d = Daemon::configured(&toml);
    let shared = login_on(&d);
    server.kill();
    // HMAC requests still fail closed; tokens are issued and checked in memory.
    let r = lumo(&d, &lumo_ping(&d.key()));
    assert_eq!(lumo_code(&r), "SHARED_STORE_UNAVAILABLE", "{r}");
    let local = login_on(&d);
    assert_eq!(ping_with(&d, &local)["status"], "ok");
    // A token kept in Redis is unknown to this daemon's memory.
    assert_eq!(ping_with(&d, &shared)["error"]["code"], "AUTH_INVALID");
}

/// Needs no Redis: a server that accepts connections and never answers must not hang a
/// request; it is refused once `[cluster] timeout` has passed.
#[test]
fn a_redis_that_never_answers_does_not_hang_requests() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            held.push(conn);
        }
    });
    let url = format!("redis://127.0.0.1:{port}");
    let d = Daemon::dev_with(&["--redis", &url]);
    // The harness's read timeout (15 s) would fail the test if the daemon waited for ever.
    let r = lumo(&d, &lumo_ping(&d.key()));
    assert_eq!(lumo_code(&r), "SHARED_STORE_UNAVAILABLE", "{r}");
    let r = call(&d, &json!({"action": "auth"}));
    assert_eq!(r["error"]["code"], "SHARED_STORE_UNAVAILABLE", "{r}");
    assert_eq!(call(&d, &json!({"action": "health"}))["status"], "ok");
}

#[test]
fn cluster_settings_are_read_at_start_and_a_reload_says_so() {
    if !enabled() {
        return;
    }
    let prefix = Prefix::new(REDIS, "reload");
    let toml = base_config(&format!(
        "{ROOT_ADMIN}\n[cluster]\nredis_url = \"{REDIS}\"\nkey_prefix = \"{}\"\n",
        prefix.prefix
    ));
    let d = Daemon::configured(&toml);
    let r = call(&d, &json!({"action": "auth", "params": {"type": "admin"}}));
    assert_eq!(r["status"], "ok", "{r}");
    let admin = r["data"]["token"].as_str().unwrap().to_string();
    let text = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(
        d.config_path(),
        text.replace(&prefix.prefix, "warden-test:elsewhere:"),
    )
    .unwrap();
    let r = call(&d, &json!({"action": "reload", "token": admin}));
    assert_eq!(r["data"]["needs_restart"], json!(["cluster"]), "{r}");
    // Still the old prefix: the admin token (stored there) keeps working, new keys land there.
    assert_eq!(ping_with(&d, &admin)["status"], "ok");
    login_on(&d);
    let keys = prefix.keys();
    assert!(
        keys.iter().filter(|k| k.contains(":s:")).count() >= 2,
        "{keys:?}"
    );
}
