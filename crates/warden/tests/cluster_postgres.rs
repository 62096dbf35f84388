//! Several real daemons on one PostgreSQL secret store (`[storage] backend = "postgres"`, dev
//! mode's `--postgres`): a write on one is read on the others within 100 ms and their
//! `secrets.watch` subscribers are told; concurrent check-and-set writers on two daemons lose
//! nothing; the database holds no plain value; a restarted daemon unseals and sees everything;
//! every secrets method works on this backend; while the database is unreachable reads go on
//! and writes answer `UNAVAILABLE`.
//!
//! They need the machine's PostgreSQL (127.0.0.1:5432, trust auth, user `postgres` or
//! `$WARDEN_TEST_POSTGRES_USER`): set `WARDEN_TEST_POSTGRES=1`. Without it every test returns at
//! once. Each test creates its own database `warden_it_<random>` and drops it at the end.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn enabled() -> bool {
    let on = std::env::var("WARDEN_TEST_POSTGRES").as_deref() == Ok("1");
    if !on {
        eprintln!("skipped: set WARDEN_TEST_POSTGRES=1 to run the tests against PostgreSQL");
    }
    on
}

fn server_user() -> String {
    std::env::var("WARDEN_TEST_POSTGRES_USER").unwrap_or_else(|_| "postgres".into())
}

/// A database of its own, dropped (with its connections) when this goes out of scope.
struct TestDb {
    name: String,
}

impl TestDb {
    fn create() -> TestDb {
        let name = format!("warden_it_{:016x}", rand::random::<u64>());
        psql("postgres", &format!("CREATE DATABASE {name}"));
        TestDb { name }
    }

    fn url(&self) -> String {
        format!("postgres://{}@127.0.0.1:5432/{}", server_user(), self.name)
    }

    /// Runs `sql` in this database; rows as `|`-separated lines.
    fn query(&self, sql: &str) -> String {
        psql(&self.name, sql)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", &server_user(), "-d", db])
        .args(["-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A logged-in securityd client of one daemon.
struct Client {
    raw: Raw,
    token: String,
}

impl Client {
    fn new(d: &Daemon) -> Client {
        let mut raw = Raw::lines(&d.socket());
        let token = login(&mut raw);
        Client { raw, token }
    }

    fn admin(d: &Daemon) -> Client {
        let mut raw = Raw::lines(&d.socket());
        let r = raw.call(&json!({"action": "auth", "params": {"type": "admin"}}));
        assert_eq!(r["status"], "ok", "{r}");
        let token = r["data"]["token"].as_str().unwrap().to_string();
        Client { raw, token }
    }

    fn call(&mut self, action: &str, params: Value) -> Value {
        self.raw
            .call(&json!({"action": action, "token": self.token, "params": params}))
    }

    fn ok(&mut self, action: &str, params: Value) -> Value {
        let r = self.call(action, params);
        assert_eq!(r["status"], "ok", "{action}: {r}");
        r["data"].clone()
    }

    fn set(&mut self, key: &str, value: &str) -> u64 {
        self.ok("secrets.set", json!({"key": key, "value": value}))["version"]
            .as_u64()
            .unwrap()
    }

    /// The value and version, or the error code.
    fn get(&mut self, key: &str) -> Result<(String, u64), String> {
        let r = self.call("secrets.get", json!({"key": key}));
        if r["status"] == "ok" {
            Ok((
                r["data"]["value"].as_str().unwrap().to_string(),
                r["data"]["version"].as_u64().unwrap(),
            ))
        } else {
            Err(r["error"]["code"].as_str().unwrap_or("?").to_string())
        }
    }
}

/// A `secrets.watch` stream read on a thread of its own: each frame's generation with the
/// moment it arrived.
fn watch(d: &Daemon) -> std::sync::mpsc::Receiver<(u64, Instant)> {
    let mut raw = Raw::lp(&d.socket());
    let token = login(&mut raw);
    raw.send(
        &json!({"action": "secrets.watch", "id": 9, "token": token, "params": {"heartbeat": 3600}}),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        raw.s.set_read_timeout(None).unwrap();
        while let Some(v) = raw.recv() {
            if v["final"] != false {
                return;
            }
            let g = v["data"]["generation"].as_u64().unwrap();
            if tx.send((g, Instant::now())).is_err() {
                return;
            }
        }
    });
    rx
}

/// A dev daemon on the store in `db` (`--postgres`), the dev master password shared through
/// the database.
fn dev_member(db: &TestDb) -> Daemon {
    let d = Daemon::dev_with(&["--postgres", &db.url()]);
    assert_eq!(d.env["WARDEN_POSTGRES_URL"], db.url());
    d
}

#[test]
fn a_write_on_one_dev_daemon_is_read_on_the_others_within_100_ms_and_their_watchers_are_told() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    let a = dev_member(&db);
    let b = dev_member(&db);
    let c = dev_member(&db);
    // One dev password, generated by the first daemon and found in the database by the others.
    let pw = |d: &Daemon| std::fs::read(&d.env["WARDEN_MASTER_PASSWORD_FILE"]).unwrap();
    assert_eq!(pw(&a), pw(&b));
    assert_eq!(pw(&a), pw(&c));
    assert_eq!(
        db.query("SELECT count(*) FROM warden.dev_master_password"),
        "1\n"
    );

    // One poller per reading daemon, each on its own thread and connection, so that neither
    // waits for the other: told the value and the moment its write was acknowledged, it reads
    // until it sees it and reports how long after the acknowledgement its read came back.
    let pollers: Vec<_> = [&b, &c]
        .iter()
        .map(|d| {
            let (ask_tx, ask_rx) = std::sync::mpsc::channel::<(String, u64, Instant)>();
            let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Duration>();
            let mut r = Client::new(d);
            std::thread::spawn(move || {
                for (value, version, acked) in ask_rx {
                    // Generous in the loop; the figure is asserted below.
                    let deadline = acked + Duration::from_secs(5);
                    loop {
                        if r.get("shared_db_password") == Ok((value.clone(), version)) {
                            let _ = seen_tx.send(acked.elapsed());
                            break;
                        }
                        assert!(Instant::now() < deadline, "not seen within 5 s");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            });
            (ask_tx, seen_rx)
        })
        .collect();
    let mut wa = Client::new(&a);
    let watch_c = watch(&c);
    let (mut generation, _) = watch_c.recv_timeout(Duration::from_secs(10)).unwrap();

    let mut worst = Duration::ZERO;
    let mut worst_watch = Duration::ZERO;
    let rounds = 20;
    for i in 0..rounds {
        let value = format!("value-{i}-{}", nonce());
        let version = wa.set("shared_db_password", &value);
        let acked = Instant::now();
        assert_eq!(version, i + 1);
        for (ask, _) in &pollers {
            ask.send((value.clone(), version, acked)).unwrap();
        }
        for (_, seen) in &pollers {
            let took = seen
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("round {i}: a reader did not see the write"));
            worst = worst.max(took);
        }
        // c's watchers hear of the change (one frame or more: changes may coalesce).
        loop {
            let (g, at) = watch_c
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("round {i}: no watch frame on c within 5 s"));
            if g > generation {
                generation = g;
                worst_watch = worst_watch.max(at.saturating_duration_since(acked));
                break;
            }
        }
        // Drain frames of the same change.
        while let Ok((g, _)) = watch_c.try_recv() {
            generation = generation.max(g);
        }
    }
    drop(pollers);
    eprintln!(
        "worst of {rounds} writes: read on another daemon {:.1} ms after the write was acknowledged; watch frame {:.1} ms",
        worst.as_secs_f64() * 1e3,
        worst_watch.as_secs_f64() * 1e3
    );
    assert!(
        worst < Duration::from_millis(100),
        "a write took {worst:?} to be readable on another daemon"
    );
    assert!(
        worst_watch < Duration::from_millis(100),
        "a watch frame took {worst_watch:?}"
    );

    // A delete on b is seen on a and c.
    let mut wb = Client::new(&b);
    wb.ok("secrets.delete", json!({"key": "shared_db_password"}));
    for d in [&a, &c] {
        let mut cl = Client::new(d);
        let t = Instant::now();
        while cl.get("shared_db_password").is_ok() {
            assert!(t.elapsed() < Duration::from_secs(5), "delete not seen");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(cl.get("shared_db_password"), Err("SECRET_NOT_FOUND".into()));
    }
}

/// The configuration of a daemon on the PostgreSQL store of `db`.
fn pg_config(db: &TestDb) -> String {
    base_config(&format!(
        r#"[secrets]
kdf_memory = "8MiB"
kdf_passes = 1
keep_versions = 1000

[storage]
backend = "postgres"
postgres_url = "{}"

[rate_limits]
auth = "off"
secrets = "off"
admin = "off"

{ROOT_ADMIN}"#,
        db.url()
    ))
}

/// A directory with the configuration of `db` and the master password `pw` in `dir/master`.
fn member_dir(db: &TestDb, pw: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &pg_config(db));
    let master = dir.path().join("master");
    std::fs::write(&master, pw).unwrap();
    std::fs::set_permissions(&master, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    dir
}

fn member(dir: &Path) -> Daemon {
    let pw = dir.join("master");
    Daemon::configured_at(dir, &["--master-password-file", pw.to_str().unwrap()])
}

#[test]
fn concurrent_check_and_set_writers_on_two_daemons_lose_nothing() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    let pw = "counter master password";
    let dir_a = member_dir(&db, pw);
    let dir_b = member_dir(&db, pw);
    // `warden init` creates the schema and the keyfile in PostgreSQL.
    std::fs::remove_file(dir_a.path().join("master")).unwrap();
    init_store(dir_a.path(), pw);
    assert_eq!(db.query("SELECT count(*) FROM warden.keyfile"), "1\n");
    let a = member(dir_a.path());
    let b = member(dir_b.path());
    Client::new(&a).set("counter", "0");

    // Two writers on each daemon; each adds 1 to the counter `per_writer` times by
    // check-and-set, reading the current value from its own daemon and retrying on conflict.
    let per_writer = 25u64;
    let mut writers = Vec::new();
    for d in [&a, &a, &b, &b] {
        let socket = d.socket();
        writers.push(std::thread::spawn(move || {
            let mut raw = Raw::lines(&socket);
            let token = login(&mut raw);
            let mut conflicts = 0u64;
            let mut done = 0;
            while done < per_writer {
                let r = raw.call(&json!({"action": "secrets.get", "token": token, "params": {"key": "counter"}}));
                assert_eq!(r["status"], "ok", "{r}");
                let n: u64 = r["data"]["value"].as_str().unwrap().parse().unwrap();
                let v = r["data"]["version"].as_u64().unwrap();
                let w = raw.call(&json!({"action": "secrets.set", "token": token,
                    "params": {"key": "counter", "value": (n + 1).to_string(), "expected_version": v}}));
                if w["status"] == "ok" {
                    assert_eq!(w["data"]["version"], v + 1, "{w}");
                    done += 1;
                } else {
                    assert_eq!(w["error"]["code"], "CONFLICT", "{w}");
                    conflicts += 1;
                }
            }
            conflicts
        }));
    }
    let conflicts: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let total = 4 * per_writer;
    eprintln!("{total} increments on two daemons, {conflicts} conflicts retried");
    // Every acknowledged increment is there, on both daemons, once the last write has arrived.
    for d in [&a, &b] {
        let mut c = Client::new(d);
        let t = Instant::now();
        loop {
            match c.get("counter") {
                Ok((v, ver)) if v == total.to_string() => {
                    assert_eq!(ver, total + 1);
                    break;
                }
                other => assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "counter on {}: {other:?}",
                    d.pid()
                ),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let versions = c.ok("secrets.versions", json!({"key": "counter"}))["versions"]
            .as_array()
            .unwrap()
            .len() as u64;
        assert_eq!(versions, total + 1);
    }
    assert_eq!(
        db.query("SELECT max(version), count(*) FROM warden.versions WHERE name = 'counter'"),
        format!("{}|{}\n", total + 1, total + 1)
    );
}

#[test]
fn the_database_holds_no_plain_value_and_a_restarted_daemon_unseals_and_sees_everything() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    let pw = "restart master password";
    let dir_a = member_dir(&db, pw);
    let dir_b = member_dir(&db, pw);
    std::fs::remove_file(dir_a.path().join("master")).unwrap();
    init_store(dir_a.path(), pw);
    let a = member(dir_a.path());
    let mut b = member(dir_b.path());

    let mut values = Vec::new();
    let mut ca = Client::new(&a);
    for i in 0..10 {
        let v = format!("plain-value-{i}-{}", nonce());
        ca.set(&format!("app_{i}"), &v);
        values.push(v);
    }
    // b stops; a writes on; b starts again and sees it all.
    assert!(b.stop().success());
    for i in 10..15 {
        let v = format!("plain-value-{i}-{}", nonce());
        ca.set(&format!("app_{i}"), &v);
        values.push(v);
    }
    ca.set("app_0", "second version");
    let b = member(dir_b.path());
    let mut cb = Client::new(&b);
    let status = cb.ok("daemon.status", json!({}));
    assert_eq!(status["sealed"], false, "{status}");
    assert_eq!(status["secrets_loaded"], 15, "{status}");
    for (i, v) in values.iter().enumerate().skip(1) {
        assert_eq!(cb.get(&format!("app_{i}")), Ok((v.clone(), 1)));
    }
    assert_eq!(cb.get("app_0"), Ok(("second version".into(), 2)));
    let listed = cb.ok("secrets.list", json!({}))["secrets"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 15, "{listed}");

    // Every column of every table, as text: no value, no password, plain or hex-encoded.
    let dump = Command::new("pg_dump")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            &server_user(),
            "--data-only",
            &db.name,
        ])
        .output()
        .unwrap();
    assert!(dump.status.success());
    let dump = String::from_utf8(dump.stdout).unwrap();
    assert!(dump.contains("app_14"), "the dump holds the names");
    assert!(
        dump.matches("\\x").count() >= 16,
        "the dump holds ciphertext"
    );
    for secret in values
        .iter()
        .map(String::as_str)
        .chain(["second version", pw])
    {
        assert!(!dump.contains(secret), "{secret} in the database");
        assert!(
            !dump.contains(&hex::encode(secret)),
            "{secret} hex-encoded in the database"
        );
    }
}

#[test]
fn every_secrets_method_works_on_the_postgres_backend() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    let dir_a = member_dir(&db, "first password");
    let dir_b = member_dir(&db, "first password");
    std::fs::remove_file(dir_a.path().join("master")).unwrap();
    init_store(dir_a.path(), "first password");
    // A second init is refused: the store exists.
    let again = Command::new(warden_bin())
        .args(["init", "--config"])
        .arg(dir_a.path().join("warden.toml"))
        .arg("--password-file")
        .arg(dir_a.path().join("master"))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let a = member(dir_a.path());
    let b = member(dir_b.path());
    let mut c = Client::new(&a);
    let mut other = Client::new(&b);

    assert_eq!(c.set("db", "one"), 1);
    assert_eq!(c.set("db", "two"), 2);
    let r = c.call(
        "secrets.set",
        json!({"key": "db", "value": "stale", "expected_version": 1}),
    );
    assert_eq!(r["error"]["code"], "CONFLICT", "{r}");
    assert_eq!(
        c.ok(
            "secrets.set",
            json!({"key": "fresh", "value": "x", "expected_version": 0})
        )["version"],
        1
    );
    let v = c.ok("secrets.get", json!({"key": "db", "version": 1}));
    assert_eq!(v["value"], "one");
    let vs = c.ok("secrets.versions", json!({"key": "db"}));
    assert_eq!(vs["versions"].as_array().unwrap().len(), 2, "{vs}");
    let many = c.ok("get_secrets", json!({"keys": ["db", "fresh", "nope"]}));
    assert_eq!(many["secrets"]["db"], "two", "{many}");
    assert_eq!(many["missing"], json!(["nope"]), "{many}");

    // Destroy version 1: gone here and on b.
    c.ok("secrets.destroy", json!({"key": "db", "versions": [1]}));
    assert_eq!(
        c.call("secrets.get", json!({"key": "db", "version": 1}))["error"]["code"],
        "SECRET_NOT_FOUND"
    );
    assert_eq!(
        db.query("SELECT count(*) FROM warden.versions WHERE name = 'db'"),
        "1\n"
    );
    let t = Instant::now();
    while other.call("secrets.get", json!({"key": "db", "version": 1}))["status"] == "ok" {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }

    // Rekey on a: b follows the new data key and still reads and writes.
    let mut admin = Client::admin(&a);
    let r = admin.ok("secrets.rekey", json!({}));
    assert_eq!(r["secrets"], 2, "{r}");
    assert_eq!(
        db.query("SELECT DISTINCT key_id FROM warden.versions"),
        "2\n",
        "every row re-sealed under the new key"
    );
    let t = Instant::now();
    loop {
        let r = other.call("secrets.set", json!({"key": "after_rekey", "value": "b"}));
        if r["status"] == "ok" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(other.get("db"), Ok(("two".into(), 2)));

    // Rotate the master password without the current one (unsealed), then with it.
    admin.ok(
        "secrets.rotate_master",
        json!({"new_password": "second password"}),
    );
    admin.ok(
        "secrets.rotate_master",
        json!({"current_password": "second password", "new_password": "third password"}),
    );
    let r = admin.call(
        "secrets.rotate_master",
        json!({"current_password": "first password", "new_password": "x"}),
    );
    assert_eq!(r["error"]["code"], "AUTH_INVALID", "{r}");
    // b keeps serving and writing with the keys it holds.
    assert_eq!(other.set("fresh", "y"), 2);

    // Seal and unseal a with the new password; the old one is refused.
    admin.ok("daemon.seal", json!({}));
    assert_eq!(c.get("db"), Err("DAEMON_LOCKED".into()));
    let st = c.ok("daemon.status", json!({}));
    assert_eq!(st["sealed"], true, "{st}");
    let r = admin.call("daemon.unseal", json!({"password": "first password"}));
    assert_eq!(r["error"]["code"], "AUTH_INVALID", "{r}");
    let r = admin.ok("daemon.unseal", json!({"password": "third password"}));
    assert_eq!(r["secrets_loaded"], 3, "{r}");
    assert_eq!(r["integrity_errors"], 0, "{r}");
    assert_eq!(c.get("fresh"), Ok(("y".into(), 2)));
    assert_eq!(c.get("after_rekey"), Ok(("b".into(), 1)));

    // Delete on a, then every name is gone from b's list too.
    c.ok("secrets.delete", json!({"key": "fresh"}));
    let t = Instant::now();
    loop {
        let l = other.ok("secrets.list", json!({}));
        if l["secrets"] == json!(["after_rekey", "db"]) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{l}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_daemon_refuses_to_start_on_an_unreachable_or_uninitialized_database_clearly() {
    if !enabled() {
        return;
    }
    // Nothing listens on port 1.
    let dir = tempfile::tempdir().unwrap();
    let text = base_config(&format!(
        "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://{}@127.0.0.1:1/none\"\npostgres_connect_timeout = \"1s\"\n{ROOT_ADMIN}",
        server_user()
    ));
    let cfg = write_config(dir.path(), &text);
    let (status, _, err) = run_bounded(
        Command::new(warden_bin())
            .args(["daemon", "run", "--config"])
            .arg(&cfg)
            .env("WARDEN_LOG", "warn"),
        Duration::from_secs(30),
    );
    assert!(status.is_some_and(|s| !s.success()), "{status:?} {err}");
    assert!(
        err.contains("cannot open the secret store PostgreSQL schema warden")
            && err.contains("connecting"),
        "{err}"
    );

    // A database with no store yet: the daemon starts sealed and says how to create it.
    let db = TestDb::create();
    let d = Daemon::configured(&pg_config(&db));
    let mut c = Client::new(&d);
    let r = c.call("secrets.get", json!({"key": "x"}));
    assert_eq!(r["error"]["code"], "DAEMON_LOCKED", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL schema warden"),
        "{r}"
    );
    // The tables are there already (created by the daemon), the keyfile not.
    assert_eq!(db.query("SELECT count(*) FROM warden.keyfile"), "0\n");
}

#[test]
fn while_the_database_is_unreachable_reads_go_on_writes_are_unavailable_and_then_catch_up() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    let a = dev_member(&db);
    let b = dev_member(&db);
    let mut ca = Client::new(&a);
    let mut cb = Client::new(&b);
    ca.set("before", "kept in memory");

    // Every connection of the database cut, and no new one accepted (superusers included).
    psql(
        "postgres",
        &format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name),
    );
    psql(
        "postgres",
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{}'",
            db.name
        ),
    );
    let t = Instant::now();
    let r = ca.call("secrets.set", json!({"key": "during", "value": "x"}));
    assert_eq!(r["error"]["code"], "UNAVAILABLE", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL"),
        "{r}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    for c in [&mut ca, &mut cb] {
        let v = c.get("before");
        assert_eq!(v, Ok(("kept in memory".into(), 1)));
    }

    // Back: writes work again, and the other daemon's listener reconnects and sees them.
    psql(
        "postgres",
        &format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name),
    );
    let t = Instant::now();
    loop {
        let r = ca.call("secrets.set", json!({"key": "after", "value": "y"}));
        if r["status"] == "ok" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    while cb.get("after") != Ok(("y".into(), 1)) {
        assert!(t.elapsed() < Duration::from_secs(10), "b did not catch up");
        std::thread::sleep(Duration::from_millis(20));
    }
}
