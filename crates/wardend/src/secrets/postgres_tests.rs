//! Tests against the machine's PostgreSQL (127.0.0.1:5432, trust auth), run only when
//! `WARDEN_TEST_POSTGRES=1`. Each test creates its own database and drops it at the end. Several
//! `PgStore`s on one database stand for several daemons: each has its own connections, memory
//! and listener, and they meet only through PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const PW: &[u8] = b"correct horse";

fn enabled() -> bool {
    std::env::var("WARDEN_TEST_POSTGRES").is_ok_and(|v| v == "1")
}

fn server_user() -> String {
    std::env::var("WARDEN_TEST_POSTGRES_USER").unwrap_or_else(|_| "postgres".into())
}

/// A fresh database, dropped (with its connections) when this goes out of scope.
struct TestDb {
    name: String,
}

impl TestDb {
    fn create() -> TestDb {
        let name = format!(
            "warden_test_{}",
            hex::encode(crypto::random::<6>().unwrap())
        );
        psql("postgres", &format!("CREATE DATABASE {name}"));
        TestDb { name }
    }

    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port=5432 user={} dbname={}",
            server_user(),
            self.name
        )
    }

    fn cfg(&self) -> PgConfig {
        let mut c = PgConfig::new(self.url());
        c.kdf = KdfParams::insecure_for_tests();
        c.keep_versions = 1000;
        c
    }

    async fn client(&self) -> Client {
        connect(&self.cfg()).await.unwrap()
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

fn psql(db: &str, sql: &str) {
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            &server_user(),
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            sql,
        ])
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn daemon(db: &TestDb) -> Arc<PgStore> {
    let s = Arc::new(PgStore::open(db.cfg()).await.unwrap());
    s.unseal(PW).await.unwrap();
    s.spawn_listener();
    s
}

/// Polls until `f` holds; panics after a generous 20 s. Returns how long it took.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    t.elapsed()
}

fn value_is(s: &PgStore, name: &str, want: &[u8]) -> bool {
    s.get(name, None).is_ok_and(|v| v.expose() == want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_daemon_is_read_on_the_others() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    PgStore::init(&db.cfg(), PW).await.unwrap();
    let a = daemon(&db).await;
    let b = daemon(&db).await;
    let c = daemon(&db).await;
    // Let the listeners connect (a write before that is picked up by their first reload anyway).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let val = format!("value-{i}");
        a.set("db.password", val.as_bytes()).await.unwrap();
        let tb = eventually("b sees the write", || {
            value_is(&b, "db.password", val.as_bytes())
        })
        .await;
        let tc = eventually("c sees the write", || {
            value_is(&c, "db.password", val.as_bytes())
        })
        .await;
        worst = worst.max(tb).max(tc);
    }
    eprintln!("propagation to other daemons, worst of 20 writes: {worst:?}");
    // A daemon started after the others sees everything; so does one restarted.
    let d = daemon(&db).await;
    assert!(value_is(&d, "db.password", b"value-19"));
    assert_eq!(d.versions("db.password").unwrap().len(), 20);
    drop(a);
    let a = daemon(&db).await;
    assert!(value_is(&a, "db.password", b"value-19"));
    assert_eq!(a.get("db.password", Some(3)).unwrap().expose(), b"value-2");
    // A deletion and a destroy travel too.
    a.delete("db.password").await.unwrap();
    eventually("b sees the delete", || b.get("db.password", None).is_err()).await;
    assert!(matches!(
        b.get("db.password", None),
        Err(StoreError::NotFound { .. })
    ));
    b.set("db.password", b"back").await.unwrap();
    assert_eq!(b.get("db.password", None).unwrap().version(), 21);
    b.destroy("db.password", Some(&[21])).await.unwrap();
    eventually("c sees the destroy", || {
        c.get("db.password", Some(21)).is_err() && c.get("db.password", Some(20)).is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_two_daemons_lose_nothing() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    PgStore::init(&db.cfg(), PW).await.unwrap();
    let a = daemon(&db).await;
    let b = daemon(&db).await;
    let mut tasks = Vec::new();
    for (who, s) in [("a", a.clone()), ("b", b.clone())] {
        for t in 0..3 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..30 {
                    let val = format!("{who}{t}-{i}");
                    let v = s.set("shared", val.as_bytes()).await.unwrap();
                    acked.push((v, val.clone()));
                    s.set(&format!("own-{who}{t}"), val.as_bytes())
                        .await
                        .unwrap();
                }
                acked
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        // One writer's versions are in the order it wrote them.
        assert!(mine.windows(2).all(|w| w[0].0 < w[1].0));
        acked.extend(mine);
    }
    acked.sort();
    let versions: Vec<u64> = acked.iter().map(|a| a.0).collect();
    assert_eq!(
        versions,
        (1..=180).collect::<Vec<_>>(),
        "every version once"
    );
    for s in [&a, &b] {
        eventually("all versions everywhere", || {
            s.versions("shared").is_ok_and(|v| v.len() == 180)
        })
        .await;
        for (v, val) in &acked {
            assert_eq!(s.get("shared", Some(*v)).unwrap().expose(), val.as_bytes());
        }
        for who in ["a0", "a1", "a2", "b0", "b1", "b2"] {
            let name = format!("own-{who}");
            eventually("own names everywhere", || {
                value_is(s, &name, format!("{who}-29").as_bytes())
            })
            .await;
        }
    }
    // Check-and-set across daemons: a stale expected version is refused.
    let cur = a.get("shared", None).unwrap().version();
    a.set_if_version("shared", b"x", cur).await.unwrap();
    let err = b.set_if_version("shared", b"y", cur).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { current, .. } if current == cur + 1),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_holds_no_plain_value() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    PgStore::init(&db.cfg(), PW).await.unwrap();
    let a = daemon(&db).await;
    let values: Vec<String> = (0..10)
        .map(|i| format!("PLAINTEXT-marker-{i}-zq"))
        .collect();
    for (i, v) in values.iter().enumerate() {
        a.set(&format!("s{i}"), v.as_bytes()).await.unwrap();
    }
    a.rekey().await.unwrap();
    a.rotate_master(PW, b"another").await.unwrap();
    let c = db.client().await;
    let tables = c
        .query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'warden'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(tables.len(), 4);
    let mut dump = String::new();
    for t in tables {
        let t: String = t.get(0);
        for r in c
            .query(&format!("SELECT t::text FROM warden.{t} t"), &[])
            .await
            .unwrap()
        {
            dump.push_str(r.get::<_, &str>(0));
            dump.push('\n');
        }
    }
    assert!(dump.contains("s9"), "the dump reads the rows");
    for v in &values {
        assert!(!dump.contains(v.as_str()));
        assert!(!dump.contains(&hex::encode(v)));
    }
    for pw in [PW, b"another"] {
        assert!(!dump.contains(&hex::encode(pw)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_row_is_an_integrity_error_for_that_entry_only() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    PgStore::init(&db.cfg(), PW).await.unwrap();
    let a = daemon(&db).await;
    a.set("good", b"fine").await.unwrap();
    a.set("bad", b"v1").await.unwrap();
    a.set("bad", b"v2").await.unwrap();
    let c = db.client().await;
    // Flip one bit of the ciphertext of bad v2.
    c.execute(
        "UPDATE warden.versions SET sealed = set_byte(sealed, 0, get_byte(sealed, 0) # 1) WHERE name = 'bad' AND version = 2",
        &[],
    )
    .await
    .unwrap();
    // Moving a ciphertext to another version is tampering too.
    a.set("moved", b"m1").await.unwrap();
    a.set("moved", b"m2").await.unwrap();
    c.batch_execute(
        "UPDATE warden.versions SET sealed = (SELECT sealed FROM warden.versions WHERE name = 'moved' AND version = 1), nonce = (SELECT nonce FROM warden.versions WHERE name = 'moved' AND version = 1) WHERE name = 'moved' AND version = 2",
    )
    .await
    .unwrap();
    let b = daemon(&db).await;
    for s in [&a, &b] {
        s.reload_all().await.unwrap();
        assert!(matches!(
            s.get("bad", None),
            Err(StoreError::Integrity { version: 2, .. })
        ));
        assert_eq!(s.get("bad", Some(1)).unwrap().expose(), b"v1");
        assert!(matches!(
            s.get("moved", None),
            Err(StoreError::Integrity { version: 2, .. })
        ));
        assert_eq!(s.get("good", None).unwrap().expose(), b"fine");
        let errs = s.integrity_errors();
        let which: Vec<_> = errs
            .iter()
            .map(|e| (e.name.clone().unwrap(), e.version))
            .collect();
        assert_eq!(
            which,
            [("bad".to_string(), Some(2)), ("moved".to_string(), Some(2))]
        );
    }
    // Destroying the damaged version clears the report; a new version works.
    a.destroy("bad", Some(&[2])).await.unwrap();
    a.set("bad", b"v3").await.unwrap();
    assert_eq!(a.get("bad", None).unwrap().expose(), b"v3");
    assert_eq!(a.integrity_errors().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_master_and_rekey_on_one_daemon_keep_the_others_working() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    PgStore::init(&db.cfg(), PW).await.unwrap();
    let a = daemon(&db).await;
    let b = daemon(&db).await;
    a.set("k", b"before").await.unwrap();
    eventually("b sees k", || value_is(&b, "k", b"before")).await;

    // Rekey on a: b takes the new key from the keyfile (on the notification, or in its next
    // write's transaction) and keeps reading and writing.
    a.rekey().await.unwrap();
    b.set("k", b"after rekey").await.unwrap();
    eventually("a sees b's write after rekey", || {
        value_is(&a, "k", b"after rekey")
    })
    .await;
    a.set("k2", b"sealed under the new key").await.unwrap();
    eventually("b reads a value under the new key", || {
        value_is(&b, "k2", b"sealed under the new key")
    })
    .await;
    let c = db.client().await;
    let ids = c
        .query("SELECT DISTINCT key_id FROM warden.versions", &[])
        .await
        .unwrap();
    assert_eq!(ids.len(), 1, "every row re-sealed under one key");
    assert_eq!(ids[0].get::<_, i64>(0), 2);

    // Rotate-master on a: the data keys stay, b keeps working with the ones it holds.
    a.rotate_master(PW, b"new password").await.unwrap();
    assert!(matches!(
        a.rotate_master(PW, b"x").await,
        Err(StoreError::WrongPassword)
    ));
    b.set("k", b"after rotate").await.unwrap();
    eventually("a sees b's write", || value_is(&a, "k", b"after rotate")).await;

    // A daemon started now opens with the new password only, and sees everything.
    let d = Arc::new(PgStore::open(db.cfg()).await.unwrap());
    assert!(matches!(d.unseal(PW).await, Err(StoreError::WrongPassword)));
    let rep = d.unseal(b"new password").await.unwrap();
    assert_eq!(rep.integrity_errors, 0);
    assert_eq!(d.get("k", Some(1)).unwrap().expose(), b"before");
    assert!(value_is(&d, "k", b"after rotate"));
    assert!(value_is(&d, "k2", b"sealed under the new key"));

    // Rotate then rekey: b, still holding the old KEK, cannot open the new data key. It keeps
    // serving what it holds and refuses to write, until unsealed with the new password.
    a.rekey().await.unwrap();
    let err = b.set("k", b"refused").await.unwrap_err();
    assert!(matches!(err, StoreError::StaleKeys), "{err}");
    assert!(matches!(b.rekey().await, Err(StoreError::StaleKeys)));
    assert!(value_is(&b, "k", b"after rotate"));
    b.unseal(b"new password").await.unwrap();
    b.set("k", b"after unseal").await.unwrap();
    eventually("a sees it", || value_is(&a, "k", b"after unseal")).await;
    a.set("k3", b"third key").await.unwrap();
    eventually("b reads it", || value_is(&b, "k3", b"third key")).await;
    assert_eq!(a.integrity_errors().len() + b.integrity_errors().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_created_once_when_daemons_start_together() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    let cfg = db.cfg();
    // Not initialized yet: open says so, after migrating.
    assert!(matches!(
        PgStore::open(cfg.clone()).await,
        Err(StoreError::NotInitialized(_))
    ));
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let cfg = cfg.clone();
            tokio::spawn(async move { PgStore::open(cfg).await })
        })
        .collect();
    for o in opens {
        assert!(matches!(
            o.await.unwrap(),
            Err(StoreError::NotInitialized(_))
        ));
    }
    let inits: Vec<_> = (0..3)
        .map(|_| {
            let cfg = cfg.clone();
            tokio::spawn(async move { PgStore::init(&cfg, PW).await })
        })
        .collect();
    let mut ok = 0;
    for i in inits {
        match i.await.unwrap() {
            Ok(()) => ok += 1,
            Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one init wins");
    let c = db.client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM warden.schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, MIGRATIONS.len() as i64);
    // Bad configuration is refused with a reason.
    let mut bad = cfg.clone();
    bad.schema = "x; DROP".into();
    assert!(matches!(
        PgStore::open(bad).await,
        Err(StoreError::InvalidConfig(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_and_catches_up() {
    if !enabled() {
        return;
    }
    let db = TestDb::create();
    PgStore::init(&db.cfg(), PW).await.unwrap();
    let a = daemon(&db).await;
    let b = daemon(&db).await;
    a.set("x", b"1").await.unwrap();
    eventually("b sees x", || value_is(&b, "x", b"1")).await;
    // Cut every connection of the test database (both daemons' listeners and writers).
    let admin = db.client().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    // The writer reconnects on its next use; b's listener reconnects and reloads.
    a.set("x", b"2").await.unwrap();
    eventually("b sees the write after reconnecting", || {
        value_is(&b, "x", b"2")
    })
    .await;
    // Sealed: names are listed, values and writes refused, nothing written.
    b.seal();
    assert!(matches!(b.get("x", None), Err(StoreError::Sealed)));
    assert!(matches!(b.set("y", b"no").await, Err(StoreError::Sealed)));
    assert_eq!(
        b.list().iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["x"]
    );
    assert!(matches!(
        b.unseal(b"wrong").await,
        Err(StoreError::WrongPassword)
    ));
    assert!(b.is_sealed());
    // Keep versions: a store keeping 2 drops older ones on write.
    let mut cfg = db.cfg();
    cfg.keep_versions = 2;
    let k = PgStore::open(cfg).await.unwrap();
    k.unseal(PW).await.unwrap();
    k.set("x", b"3").await.unwrap();
    let kept: Vec<u64> = k.versions("x").unwrap().iter().map(|v| v.version).collect();
    assert_eq!(kept, [2, 3]);
}

/// `WARDEN_TEST_POSTGRES=1 cargo test -p wardend --lib --release secrets::postgres::tests::measure
/// -- --ignored --nocapture`: the in-memory `get` of a PostgreSQL-backed store beside the
/// embedded store's, same secrets, same loop (a figure, not an assertion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_get_beside_the_embedded_store() {
    if !enabled() {
        return;
    }
    const N: usize = 1000;
    const READS: usize = 2_000_000;
    let db = TestDb::create();
    PgStore::init(&db.cfg(), PW).await.unwrap();
    let pg = daemon(&db).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut fc = super::super::StoreConfig::new(tmp.path().join("store"));
    fc.kdf = KdfParams::insecure_for_tests();
    super::super::SecretStore::init(&fc, PW).unwrap();
    let file = super::super::SecretStore::open(fc).unwrap();
    file.unseal(PW).unwrap();
    let names: Vec<String> = (0..N).map(|i| format!("secret_{i:04}")).collect();
    let t = Instant::now();
    for n in &names {
        pg.set(n, &[7u8; 32]).await.unwrap();
    }
    eprintln!(
        "postgres set (commit + notify): {:?} each",
        t.elapsed() / N as u32
    );
    let t = Instant::now();
    for n in &names {
        file.set(n, &[7u8; 32]).unwrap();
    }
    eprintln!(
        "embedded set (fdatasync): {:?} each",
        t.elapsed() / N as u32
    );
    for round in 0..3 {
        let t = Instant::now();
        let mut sum = 0usize;
        for i in 0..READS {
            sum += pg.get(&names[i % N], None).unwrap().expose().len();
        }
        let t_pg = t.elapsed();
        let t = Instant::now();
        for i in 0..READS {
            sum += file.get(&names[i % N], None).unwrap().expose().len();
        }
        let t_file = t.elapsed();
        assert_eq!(sum, 2 * READS * 32);
        eprintln!(
            "round {round}: get postgres {:.0} ns, embedded {:.0} ns",
            t_pg.as_nanos() as f64 / READS as f64,
            t_file.as_nanos() as f64 / READS as f64
        );
    }
}
