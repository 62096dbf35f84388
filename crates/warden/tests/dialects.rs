//! Both dialects on both framings, against the real binary in dev mode.

mod common;
use common::*;
use serde_json::{json, Value};

#[test]
fn dev_mode_announces_its_environment_and_serves() {
    let d = Daemon::dev();
    for k in [
        "WARDEN_SOCKET",
        "WARDEN_HMAC_KEY_FILE",
        "WARDEN_AUDIT_LOG",
        "WARDEN_STATE_DIR",
    ] {
        assert!(d.env.contains_key(k), "missing {k}");
    }
    assert!(d.socket().exists());
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&d.env["WARDEN_HMAC_KEY_FILE"])
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o077, 0, "the generated key is private");
    // The CLI finds the daemon through the announced environment alone.
    let out = d.cli(&["ping"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pong");
    let out = d.cli(&["run", "system.ping"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pong"], true);
}

#[test]
fn dev_mode_reuses_an_existing_state_dir_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let s = state.to_str().unwrap();
    let key1 = {
        let d = Daemon::dev_with(&["--state-dir", s]);
        d.key()
    };
    let d = Daemon::dev_with(&["--state-dir", s]);
    assert_eq!(d.key(), key1);
    // The audit chain continues across restarts of the same state dir.
    let mut c = Raw::lp(&d.socket());
    assert_eq!(c.call(&json!({"action": "health"}))["status"], "ok");
    drop(c);
    let out = d.cli(&["audit", "verify", d.audit_log().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn lumo_ping_is_answered_in_lumo_shape_on_both_framings() {
    let d = Daemon::dev();
    let key = d.key();
    for lines in [false, true] {
        let mut c = if lines {
            Raw::lines(&d.socket())
        } else {
            Raw::lp(&d.socket())
        };
        c.send_bytes(&lumo_ping(&key));
        let r = c.recv().unwrap();
        assert_eq!(r["success"], true, "{r}");
        assert_eq!(r["data"]["pong"], true);
        assert!(r["request_id"].as_str().unwrap().len() == 36);
        assert_eq!(r["data"]["request_id"], r["request_id"]);
        assert!(r.get("status").is_none());
        // Field order as Lumo writes it: success, request_id, data.
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with("{\"") && text.contains("\"success\":true"));
    }
}

#[test]
fn lumo_metrics_report_the_documented_fields() {
    let d = Daemon::dev();
    let mut c = Raw::lp(&d.socket());
    c.send_bytes(&lumo_request(
        &d.key(),
        "system.metrics",
        "{}",
        now(),
        &nonce(),
    ));
    let r = c.recv().unwrap();
    assert_eq!(r["success"], true, "{r}");
    for k in [
        "uptime_seconds",
        "requests_total",
        "requests_failed",
        "active_connections",
        "nonce_store_size",
        "audit_records",
        "audit_syncs",
        "audit_write_errors",
        "version",
    ] {
        assert!(r["data"].get(k).is_some(), "missing {k} in {r}");
    }
    assert!(r["data"]["nonce_store_size"].as_u64().unwrap() >= 1);
    assert_eq!(r["data"]["audit_write_errors"], 0, "{r}");
}

#[test]
fn lumo_signatures_over_canonical_and_as_sent_params_both_verify() {
    let d = Daemon::dev();
    let key = d.key();
    let mut c = Raw::lp(&d.socket());
    // A client that signs compact JSON in its own key order (Lumo's bash client does).
    let as_sent = r#"{"zeta":1,"alpha":{"y":[{"b":2,"a":1}],"x":"é/ü"}}"#;
    c.send_bytes(&lumo_request(&key, "system.ping", as_sent, now(), &nonce()));
    assert_eq!(c.recv().unwrap()["success"], true);
    // A client that signs Lumo's canonical form but sends its own order.
    let canonical = r#"{"alpha":{"x":"é/ü","y":[{"a":1,"b":2}]},"zeta":1}"#;
    let (ts, n) = (now(), nonce());
    let sig = warden_wire::hmac::sign_hex(&key, "system.ping", canonical, ts, &n);
    let frame = format!(
        r#"{{"command":"system.ping","params":{as_sent},"timestamp":{ts},"nonce":"{n}","signature":"{}"}}"#,
        sig.to_uppercase()
    );
    c.send_bytes(frame.as_bytes());
    assert_eq!(c.recv().unwrap()["success"], true);
}

#[test]
fn securityd_session_flow_auth_ping_refresh_logout() {
    let d = Daemon::dev();
    let mut c = Raw::lines(&d.socket());
    let h = c.call(&json!({"action": "health"}));
    assert_eq!(h["status"], "ok");
    for k in [
        "daemon",
        "version",
        "uptime_seconds",
        "secrets_loaded",
        "active_sessions",
        "last_access",
    ] {
        assert!(h["data"].get(k).is_some(), "health lacks {k}: {h}");
    }
    // Claims in the payload are accepted as input but never trusted.
    let a = c.call(
        &json!({"action": "auth", "params": {"pid": 1, "exe": "/usr/bin/python3", "cmdline": "x"}}),
    );
    assert_eq!(a["status"], "ok", "{a}");
    let token = a["data"]["token"].as_str().unwrap().to_string();
    let expires = a["data"]["expires_at"].as_str().unwrap();
    assert!(
        expires.ends_with('Z') && expires.contains('T'),
        "RFC 3339: {expires}"
    );
    assert!(a["data"]["allowed_secrets"].is_array());

    let p = c.call(&json!({"action": "system.ping", "token": token}));
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(p["data"]["pong"], true);

    let r = c.call(&json!({"action": "refresh", "token": token}));
    assert_eq!(r["status"], "ok", "{r}");
    let token2 = r["data"]["token"].as_str().unwrap().to_string();
    assert_ne!(token, token2);
    let old = c.call(&json!({"action": "system.ping", "token": token}));
    assert_eq!(old["error"]["code"], "AUTH_INVALID", "{old}");

    let l = c.call(&json!({"action": "logout", "token": token2}));
    assert_eq!(l["status"], "ok");
    assert!(l["data"]["message"].is_string());
    let after = c.call(&json!({"action": "system.ping", "token": token2}));
    assert_eq!(after["error"]["code"], "AUTH_INVALID", "{after}");
    let none = c.call(&json!({"action": "system.ping"}));
    assert_eq!(none["error"]["code"], "AUTH_REQUIRED", "{none}");
    assert!(none.get("id").is_none(), "no id asked, none echoed");
}

#[test]
fn securityd_dialect_works_length_prefixed_too() {
    let d = Daemon::dev();
    let mut c = Raw::lp(&d.socket());
    let token = login(&mut c);
    let p = c.call(&json!({"action": "system.ping", "token": token}));
    assert_eq!(p["status"], "ok");
}

#[test]
fn lumo_envelope_works_newline_delimited_too() {
    let d = Daemon::dev();
    let mut c = Raw::lines(&d.socket());
    c.send_bytes(&lumo_ping(&d.key()));
    assert_eq!(c.recv().unwrap()["success"], true);
}

#[test]
fn warden_dialect_carries_many_requests_in_flight_on_one_connection() {
    let d = Daemon::dev();
    let mut c = Raw::lp(&d.socket());
    let token = login(&mut c);
    let n = 200;
    for i in 0..n {
        c.send(&json!({"action": "system.ping", "id": i, "token": token}));
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let r = c.recv().unwrap();
        assert_eq!(r["status"], "ok", "{r}");
        assert!(seen.insert(r["id"].as_u64().unwrap()));
    }
    assert_eq!(seen.len(), n as usize);
    // String ids are echoed as given.
    let r = c.call(&json!({"action": "health", "id": "abc"}));
    assert_eq!(r["id"], "abc");
}

#[test]
fn pipelined_requests_without_ids_are_answered_in_order() {
    let d = Daemon::dev();
    let key = d.key();
    let mut c = Raw::lp(&d.socket());
    // Alternate two commands whose replies differ, send them all at once, and check the
    // replies come back in the same alternation.
    let mut batch = Vec::new();
    for i in 0..100 {
        let cmd = if i % 2 == 0 {
            "system.ping"
        } else {
            "system.metrics"
        };
        let f = lumo_request(&key, cmd, "{}", now(), &nonce());
        batch.extend_from_slice(&(f.len() as u32).to_be_bytes());
        batch.extend_from_slice(&f);
    }
    std::io::Write::write_all(&mut c.s, &batch).unwrap();
    for i in 0..100 {
        let r = c.recv().unwrap();
        assert_eq!(r["success"], true, "{r}");
        assert_eq!(
            r["data"].get("pong").is_some(),
            i % 2 == 0,
            "reply {i} out of order: {r}"
        );
    }
}

#[test]
fn methods_are_listed_with_their_aliases() {
    let d = Daemon::dev();
    let out = d.cli(&["call", "system.methods"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    for n in [
        "system.ping",
        "system.metrics",
        "system.health",
        "auth.login",
        "auth.refresh",
        "auth.logout",
        "daemon.status",
        "daemon.reload",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
}

#[test]
fn daemon_status_reports_version_uptime_connections_and_requests() {
    let d = Daemon::dev();
    let out = d.cli(&["daemon", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["pid"], d.pid());
    for k in ["uptime_seconds", "sealed", "connections", "requests_served"] {
        assert!(v.get(k).is_some(), "{k} missing: {v}");
    }
    assert!(v["connections"].as_u64().unwrap() >= 1);
    let human = d.cli(&["daemon", "status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("uptime"));
}

#[test]
fn streamed_replies_come_as_frames_then_a_final_one() {
    let d = Daemon::dev();
    let mut c = Raw::lp(&d.socket());
    let token = login(&mut c);
    for _ in 0..5 {
        c.call(&json!({"action": "system.ping", "token": token}));
    }
    c.send(&json!({"action": "audit.tail", "id": 7, "token": token, "params": {"lines": 3}}));
    for _ in 0..3 {
        let f = c.recv().unwrap();
        assert_eq!(f["id"], 7);
        assert_eq!(f["stream"], true, "{f}");
        assert_eq!(f["final"], false, "{f}");
        assert!(f["data"]["seq"].as_u64().is_some(), "an audit record: {f}");
    }
    let last = c.recv().unwrap();
    assert_eq!(last["final"], true, "{last}");
    assert_eq!(last["data"]["records"], 3);
    // Without an id there is nowhere to attach the frames.
    let r = c.call(&json!({"action": "audit.tail", "token": token}));
    assert_eq!(r["error"]["code"], "VALIDATION_ERROR", "{r}");
}

#[test]
fn a_followed_stream_interleaves_with_other_requests_on_the_same_connection() {
    let d = Daemon::dev();
    let mut c = Raw::lp(&d.socket());
    let token = login(&mut c);
    c.send(&json!({"action": "audit.tail", "id": "follow", "token": token, "params": {"lines": 0, "follow": true}}));
    // While the stream is open, the same connection serves other requests; each of them is a
    // new audit record, which the stream then delivers. (The stream starts at the end of the
    // log once it is open, so keep pinging until one of the pings shows up in it.)
    let mut next_id = 1u64;
    c.send(&json!({"action": "system.ping", "id": next_id, "token": token}));
    let mut pongs = 0;
    loop {
        let f = c.recv().unwrap();
        if f["id"] == "follow" {
            assert_eq!(f["stream"], true);
            assert_eq!(f["final"], false);
            if f["data"]["method"] == "system.ping" && pongs > 0 {
                break;
            }
        } else {
            assert_eq!(f["id"], next_id);
            assert_eq!(f["data"]["pong"], true);
            pongs += 1;
            assert!(pongs < 100, "no streamed record after 100 pings");
            std::thread::sleep(std::time::Duration::from_millis(20));
            next_id += 1;
            c.send(&json!({"action": "system.ping", "id": next_id, "token": token}));
        }
    }
    // The CLI reads the same stream.
    let out = d.cli(&["audit", "tail", "-n", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["seq"].as_u64().is_some()));
}
