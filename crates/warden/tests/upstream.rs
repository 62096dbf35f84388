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
