//! Mirrors: `secrets.watch` on the serving side, and a daemon in upstream mode that pulls the
//! secrets its policy allows from another warden over mTLS and serves them locally.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A watch frame (`final: false`) of request `id`, or the final reply.
fn next_frame(r: &mut Raw, id: u64) -> Value {
    let v = r.recv().expect("the watch stream ended early");
    assert_eq!(v["id"], id, "{v}");
    v
}

#[test]
fn a_watch_announces_each_change_beats_when_idle_and_ends_at_shutdown() {
    let mut d = Daemon::dev();
    let mut admin = Raw::lp(&d.socket());
    let token = login(&mut admin);
    let mut w = Raw::lp(&d.socket());
    w.send(
        &json!({"action": "secrets.watch", "id": 7, "token": token, "params": {"heartbeat": 1}}),
    );
    let first = next_frame(&mut w, 7);
    assert_eq!(first["final"], false, "{first}");
    let g0 = first["data"]["generation"].as_u64().unwrap();
    assert_eq!(first["data"]["sealed"], false, "dev mode unseals: {first}");

    let r = admin.call(&json!({"action": "secrets.set", "token": token,
        "params": {"key": "db", "value": "one"}}));
    assert_eq!(r["status"], "ok", "{r}");
    let changed = next_frame(&mut w, 7);
    let g1 = changed["data"]["generation"].as_u64().unwrap();
    assert!(g1 > g0, "a write moves the generation: {g0} -> {changed}");
    // Frames name no secret.
    assert!(!changed.to_string().contains("db"), "{changed}");

    // Nothing changes: the heartbeat repeats the generation.
    let t = Instant::now();
    let beat = next_frame(&mut w, 7);
    assert_eq!(beat["data"]["generation"].as_u64(), Some(g1), "{beat}");
    assert!(t.elapsed() < Duration::from_secs(10));

    // A delete and a seal are changes too.
    let r =
        admin.call(&json!({"action": "secrets.delete", "token": token, "params": {"key": "db"}}));
    assert_eq!(r["status"], "ok", "{r}");
    let v = next_frame(&mut w, 7);
    assert!(v["data"]["generation"].as_u64().unwrap() > g1, "{v}");

    // Shutdown ends the stream with a final reply instead of holding the drain open.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    let fin = loop {
        let v = next_frame(&mut w, 7);
        if v["final"] == true {
            break v;
        }
    };
    assert_eq!(fin["status"], "ok", "{fin}");
    assert_eq!(fin["data"]["closing"], true, "{fin}");
    let status = d.wait(Duration::from_secs(20)).expect("the daemon exits");
    assert!(status.success(), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the watch did not hold the drain"
    );
}

#[test]
fn a_watch_needs_its_permission_and_refuses_bad_parameters() {
    // Root may read every secret but not watch: the watch is its own permission.
    let reader = Daemon::configured(&base_config(
        "[policy.roles.reader]\nallow = [\"secrets:read:*\"]\n\n[[policy.rules]]\nuid = 0\nroles = [\"reader\"]\n",
    ));
    let mut raw = Raw::lp(&reader.socket());
    let token = login(&mut raw);
    let v = raw.call(&json!({"action": "secrets.watch", "id": 1, "token": token}));
    assert_eq!(v["error"]["code"], "ACCESS_DENIED", "{v}");

    let d = Daemon::dev();
    let mut raw = Raw::lp(&d.socket());
    let token = login(&mut raw);
    let v = raw.call(&json!({"action": "secrets.watch", "id": 1, "token": token,
        "params": {"heartbeat": 0}}));
    assert_eq!(v["error"]["code"], "VALIDATION_ERROR", "{v}");
    let v = raw.call(&json!({"action": "secrets.watch", "id": 2, "token": token,
        "params": {"names": ["x"]}}));
    assert_eq!(v["error"]["code"], "VALIDATION_ERROR", "{v}");
    let v = raw.call(&json!({"action": "secrets.watch", "token": token}));
    assert_eq!(
        v["error"]["code"], "VALIDATION_ERROR",
        "a stream needs an id: {v}"
    );
}

/// Polls `f` every 20 ms for up to `limit`; the time it took.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn get_secret(raw: &mut Raw, token: &str, key: &str) -> Value {
    raw.call(&json!({"action": "get_secret", "token": token, "params": {"key": key}}))
}

#[test]
fn a_per_host_daemon_serves_what_its_upstream_allows_follows_changes_and_stays_within_its_staleness(
) {
    // The central warden: dev mode with its gateway; the dev client certificate may do anything.
    let mut central = Daemon::dev_with(&["--listen", "127.0.0.1:0"]);
    let mut c = Raw::lp(&central.socket());
    let ct = login(&mut c);
    let set = |c: &mut Raw, key: &str, value: &str| {
        let r = c.call(
            &json!({"action": "secrets.set", "token": ct, "params": {"key": key, "value": value}}),
        );
        assert_eq!(r["status"], "ok", "{r}");
    };
    set(&mut c, "app_db", "one");
    set(&mut c, "other_key", "not mirrored");

    // The per-host daemon: no store of its own, the central one's secrets in memory.
    let host = Daemon::configured(&base_config(&format!(
        "{ROOT_ADMIN}\n[rate_limits]\nsecrets = \"off\"\n\n[upstream]\nurl = \"https://{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nsecrets = [\"app_*\"]\nrefresh_interval = \"2s\"\nmax_staleness = \"4s\"\n",
        central.env["WARDEN_LISTEN"],
        central.env["WARDEN_CA"],
        central.env["WARDEN_CLIENT_CERT"],
        central.env["WARDEN_CLIENT_KEY"],
    )));
    let mut h = Raw::lp(&host.socket());
    let ht = login(&mut h);
    let first = within(Duration::from_secs(15), || {
        get_secret(&mut h, &ht, "app_db")["data"]["value"] == "one"
    });
    assert!(
        first.is_some(),
        "the mirror never filled: {}",
        get_secret(&mut h, &ht, "app_db")
    );
    // Only what `[upstream] secrets` asks for.
    let r = get_secret(&mut h, &ht, "other_key");
    assert_eq!(r["error"]["code"], "SECRET_NOT_FOUND", "{r}");
    let r = h.call(&json!({"action": "list_secrets", "token": ht}));
    assert_eq!(r["data"]["secrets"], json!(["app_db"]), "{r}");
    let r = h.call(&json!({"action": "health"}));
    assert_eq!(r["data"]["secrets_loaded"], 1, "{r}");

    // A change on the central warden reaches the host through the watch, well before the
    // refresh interval would.
    set(&mut c, "app_db", "two");
    let seen = within(Duration::from_secs(10), || {
        get_secret(&mut h, &ht, "app_db")["data"]["value"] == "two"
    })
    .expect("the change never reached the host");
    eprintln!("a write on the central warden was served by the host after {seen:?}");
    set(&mut c, "app_new", "three");
    assert!(within(Duration::from_secs(10), || {
        get_secret(&mut h, &ht, "app_new")["data"]["value"] == "three"
    })
    .is_some());

    // Writes belong on the central warden.
    let r = h.call(
        &json!({"action": "secrets.set", "token": ht, "params": {"key": "app_db", "value": "x"}}),
    );
    assert_eq!(r["error"]["code"], "UNAVAILABLE", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("change them there"),
        "{r}"
    );

    // The central warden dies: the host keeps serving what it has, then refuses once the
    // values are older than max_staleness.
    central.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = central.wait(Duration::from_secs(10));
    let died = Instant::now();
    let r = get_secret(&mut h, &ht, "app_db");
    assert_eq!(r["data"]["value"], "two", "still served right after: {r}");
    let refused = within(Duration::from_secs(20), || {
        get_secret(&mut h, &ht, "app_db")["error"]["code"] == "UNAVAILABLE"
    })
    .expect("stale values were served past max_staleness");
    assert!(
        died.elapsed() >= Duration::from_secs(2),
        "refused too early, after {refused:?}"
    );
    let r = get_secret(&mut h, &ht, "app_db");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_staleness"),
        "{r}"
    );
}
