//! The daemon under attack: every request below is refused with its documented error code,
//! appears in the audit log, and the daemon keeps serving everyone else.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Command;

fn denied_with(d: &Daemon, code: &str) -> Value {
    d.wait_audit(|r| r["code"] == code)
}

fn assert_still_serving(d: &Daemon) {
    let mut c = Raw::lp(&d.socket());
    c.send_bytes(&lumo_ping(&d.key()));
    assert_eq!(
        c.recv().unwrap()["success"],
        true,
        "daemon still serves others"
    );
}

#[test]
fn a_replayed_nonce_is_refused() {
    let d = Daemon::dev();
    let mut c = Raw::lp(&d.socket());
    let frame = lumo_ping(&d.key());
    c.send_bytes(&frame);
    assert_eq!(c.recv().unwrap()["success"], true);
    for _ in 0..3 {
        c.send_bytes(&frame);
        let r = c.recv().unwrap();
        assert_eq!(r["success"], false);
        assert_eq!(r["error"]["code"], "AUTH_ERROR", "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("nonce"));
    }
    // Replayed on another connection too.
    let mut c2 = Raw::lines(&d.socket());
    c2.send_bytes(&frame);
    assert_eq!(c2.recv().unwrap()["error"]["code"], "AUTH_ERROR");
    let rec = d.wait_audit(|r| r["result"] == "denied" && r["code"] == "AUTH_ERROR");
    assert_eq!(rec["method"], "system.ping");
    assert_still_serving(&d);
}

#[test]
fn stale_and_future_timestamps_are_refused() {
    let d = Daemon::dev();
    let key = d.key();
    let mut c = Raw::lp(&d.socket());
    // 70 s, not 61: the daemon reads its clock after the test does, and a
    // second boundary in between would bring a 61 s skew back to 60.
    for ts in [now() - 70, now() + 70, 0, u64::MAX / 2] {
        c.send_bytes(&lumo_request(&key, "system.ping", "{}", ts, &nonce()));
        let r = c.recv().unwrap();
        assert_eq!(r["error"]["code"], "AUTH_ERROR", "ts {ts}: {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("timestamp"),
            "{r}"
        );
    }
    // Inside the window, both directions pass.
    for ts in [now() - 50, now() + 50] {
        c.send_bytes(&lumo_request(&key, "system.ping", "{}", ts, &nonce()));
        assert_eq!(c.recv().unwrap()["success"], true);
    }
    denied_with(&d, "AUTH_ERROR");
}

#[test]
fn forged_truncated_and_missing_signatures_are_refused() {
    let d = Daemon::dev();
    let key = d.key();
    let mut c = Raw::lp(&d.socket());
    let (ts, n) = (now(), nonce());
    let good = warden_wire::hmac::sign_hex(&key, "system.ping", "{}", ts, &n);
    let wrong_key = warden_wire::hmac::sign_hex(b"not the key", "system.ping", "{}", ts, &n);
    let mut flipped = good.clone().into_bytes();
    flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    let other_params = warden_wire::hmac::sign_hex(&key, "system.ping", "{\"a\":1}", ts, &n);
    for sig in [
        wrong_key.as_str(),
        flipped.as_str(),
        &good[..32],
        "",
        "zz",
        other_params.as_str(),
    ] {
        let frame = format!(
            r#"{{"command":"system.ping","params":{{}},"timestamp":{ts},"nonce":"{n}","signature":"{sig}"}}"#
        );
        c.send_bytes(frame.as_bytes());
        let r = c.recv().expect("an error reply");
        match r["error"]["code"].as_str() {
            Some("AUTH_ERROR") => {}
            // A signature that is not hex is a malformed request: it costs the connection.
            Some("VALIDATION_ERROR") => {
                assert!(c.is_closed(), "{sig}");
                c = Raw::lp(&d.socket());
            }
            _ => panic!("{sig}: {r}"),
        }
    }
    // A signature for another command does not carry over.
    let sig = warden_wire::hmac::sign_hex(&key, "system.metrics", "{}", ts, &n);
    let frame = format!(
        r#"{{"command":"system.ping","params":{{}},"timestamp":{ts},"nonce":"{n}","signature":"{sig}"}}"#
    );
    c.send_bytes(frame.as_bytes());
    assert_eq!(c.recv().unwrap()["error"]["code"], "AUTH_ERROR");
    // Unsigned.
    c.send(&json!({"command": "system.ping", "params": {}}));
    assert_eq!(c.recv().unwrap()["error"]["code"], "AUTH_ERROR");
    // The nonce of all those failures was never stored: the genuine request still passes.
    c.send_bytes(&lumo_request(&key, "system.ping", "{}", ts, &n));
    assert_eq!(c.recv().unwrap()["success"], true);
    denied_with(&d, "AUTH_ERROR");
}

/// Runs the CLI as another uid (nobody) with a copy of the key it can read.
fn cli_as(d: &Daemon, uid: u32, args: &[&str]) -> std::process::Output {
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        shared.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let key = shared.path().join("key");
    std::fs::write(&key, d.key()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut cmd = Command::new(warden_bin());
    cmd.args(args)
        .env("WARDEN_SOCKET", d.socket())
        .env("WARDEN_HMAC_KEY_FILE", &key)
        .uid(uid)
        .gid(uid);
    cmd.output().unwrap()
}

#[test]
fn a_uid_outside_the_policy_is_refused_in_both_dialects() {
    let d = Daemon::configured(&base_config(ROOT_ADMIN));
    let out = cli_as(&d, 65534, &["run", "system.ping"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AUTH_ERROR") && err.contains("65534"), "{err}");
    let out = cli_as(&d, 65534, &["ping"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AUTH_DENIED"), "{err}");
    let rec = d.wait_audit(|r| r["principal"]["uid"] == 65534 && r["result"] == "denied");
    assert!(
        rec["principal"]["exe"]
            .as_str()
            .unwrap()
            .ends_with("warden"),
        "{rec}"
    );
    assert_still_serving(&d);
}

#[test]
fn the_peer_credential_is_the_kernels_word_and_never_an_admin_token() {
    let d = Daemon::configured(&base_config(ROOT_ADMIN));
    let mut c = Raw::lp(&d.socket());
    // A member (root) needs no token: the connection's peer is the credential.
    let r = c.call(&json!({"action": "jobs.list", "id": 1, "credential": "peer"}));
    assert_eq!(r["status"], "ok", "{r}");
    let rec = d.wait_audit(|r| r["method"] == "jobs.list");
    assert_eq!(rec["principal"]["uid"], 0, "{rec}");
    assert_eq!(rec["result"], "ok", "{rec}");
    // Claims in the params change nothing; an admin method still wants an admin token.
    let r = c.call(
        &json!({"action": "daemon.reload", "id": 2, "credential": "peer",
        "params": {"uid": 0, "type": "admin"}}),
    );
    assert_eq!(r["error"]["code"], "AUTH_DENIED", "{r}");
    // Without it, a request still needs a token, as securityd clients expect.
    let r = c.call(&json!({"action": "jobs.list", "id": 3}));
    assert_eq!(r["error"]["code"], "AUTH_REQUIRED", "{r}");
    // Anything else in the field, or a token beside it, is a malformed request (which also
    // ends its connection).
    for bad in [json!("admin"), json!({"uid": 0}), json!(true)] {
        let r = Raw::lp(&d.socket()).call(&json!({"action": "jobs.list", "id": 4,
            "credential": bad}));
        assert_eq!(r["error"]["code"], "VALIDATION_ERROR", "{r}");
    }
    let r = Raw::lp(&d.socket()).call(&json!({"action": "jobs.list", "id": 5,
        "credential": "peer", "token": "wdn_x"}));
    assert_eq!(r["error"]["code"], "VALIDATION_ERROR", "{r}");

    // A uid no rule matches is refused, with its CLI, which uses the peer credential.
    let out = cli_as(&d, 65534, &["jobs", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("AUTH_DENIED") && err.contains("65534"),
        "{err}"
    );
    let rec = d.wait_audit(|r| r["principal"]["uid"] == 65534 && r["method"] == "jobs.list");
    assert_eq!(rec["result"], "denied", "{rec}");
    assert_still_serving(&d);
}

#[test]
fn a_cli_command_is_one_request_with_no_session_around_it() {
    let d = Daemon::configured(&base_config(ROOT_ADMIN));
    let before = d.audit_lines().len();
    let out = d.cli(&["jobs", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = d.wait_audit(|r| r["method"] == "jobs.list");
    assert_eq!(rec["result"], "ok", "{rec}");
    let methods: Vec<Value> = d.audit_lines()[before..]
        .iter()
        .map(|r| r["method"].clone())
        .collect();
    assert_eq!(
        methods,
        [json!("jobs.list")],
        "no auth.login, no auth.logout"
    );
}

#[test]
fn a_token_presented_from_another_uid_is_refused() {
    let policy = r#"
[policy.roles.user]
allow = ["system:*"]

[[policy.rules]]
uid = [0, 65534]
roles = ["user"]
"#;
    let d = Daemon::configured(&base_config(policy));
    let mut c = Raw::lp(&d.socket());
    let token = login(&mut c);
    let out = cli_as(&d, 65534, &["call", "--token", &token, "system.ping"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AUTH_INVALID"), "{err}");
    // The owner can still use it: a thief's attempt does not revoke it.
    let r = c.call(&json!({"action": "system.ping", "token": token}));
    assert_eq!(r["status"], "ok");
    d.wait_audit(|r| r["principal"]["uid"] == 65534 && r["code"] == "AUTH_INVALID");
}

#[test]
fn expired_and_logged_out_tokens_are_refused() {
    let d = Daemon::configured(
        &base_config(&format!("{ROOT_ADMIN}\n"))
            .replace("[auth]\n", "[auth]\nsession_ttl = \"1s\"\n"),
    );
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    assert_eq!(
        c.call(&json!({"action": "system.ping", "token": token}))["status"],
        "ok"
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = c.call(&json!({"action": "system.ping", "token": token}));
    assert_eq!(r["error"]["code"], "AUTH_EXPIRED", "{r}");
    let token = login(&mut c);
    c.call(&json!({"action": "logout", "token": token}));
    let r = c.call(&json!({"action": "system.ping", "token": token}));
    assert_eq!(r["error"]["code"], "AUTH_INVALID", "{r}");
    denied_with(&d, "AUTH_EXPIRED");
}

/// Sends raw bytes on a fresh connection and returns the reply (if any) and whether the
/// daemon then closed the connection.
fn garbage(d: &Daemon, bytes: &[u8], half_close: bool) -> (Option<Value>, bool) {
    let mut raw = Raw::lp(&d.socket());
    raw.lines = bytes.first() == Some(&b'{');
    raw.s.write_all(bytes).unwrap();
    if half_close {
        raw.s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let reply = raw.recv();
    let closed = reply.is_none() || raw.is_closed();
    (reply, closed)
}

#[test]
fn bad_frames_get_an_error_reply_and_lose_only_their_own_connection() {
    let d = Daemon::dev();
    // A bystander with a connection open before, during and after.
    let mut bystander = Raw::lp(&d.socket());
    let token = login(&mut bystander);

    let mut oversized_lp = (2u32 << 20).to_be_bytes().to_vec();
    oversized_lp.extend_from_slice(b"{\"command\":");
    let mut oversized_line = b"{\"action\":\"".to_vec();
    oversized_line.extend(std::iter::repeat_n(b'a', (1 << 20) + 10));
    let deep_lp = {
        let body = format!(
            "{{\"action\":\"health\",\"params\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let mut b = (body.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(body.as_bytes());
        b
    };
    let deep_line = format!("{}\n", "{\"a\":".repeat(100_000));
    let lp = |body: &[u8]| {
        let mut b = (body.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(body);
        b
    };
    let cases: Vec<(&str, Vec<u8>, bool, bool)> = vec![
        // name, bytes, half-close after sending, expect a reply
        ("oversized length prefix", oversized_lp, false, true),
        ("oversized line", oversized_line, false, true),
        ("not JSON", lp(b"hello there"), false, true),
        ("not UTF-8", lp(&[0xff, 0xfe, 0x7b, 0x7d]), false, true),
        ("not an object", lp(b"[1,2,3]"), false, true),
        ("nested 100000 deep (LP)", deep_lp, false, true),
        (
            "nested 100000 deep (line)",
            deep_line.into_bytes(),
            false,
            true,
        ),
        (
            "duplicate keys",
            lp(br#"{"action":"health","action":"auth"}"#),
            false,
            true,
        ),
        ("zero-length frame", vec![0, 0, 0, 0], false, true),
        (
            "truncated frame",
            {
                let mut b = 100u32.to_be_bytes().to_vec();
                b.extend_from_slice(b"{\"com");
                b
            },
            true,
            false,
        ),
        ("truncated line", b"{\"action\":\"hea".to_vec(), true, false),
    ];
    for (name, bytes, half, expect_reply) in cases {
        let (reply, closed) = garbage(&d, &bytes, half);
        assert!(closed, "{name}: connection must be closed");
        if expect_reply {
            let r = reply.unwrap_or_else(|| panic!("{name}: expected an error reply"));
            let code = r["error"]["code"].as_str().unwrap_or_default();
            assert_eq!(code, "VALIDATION_ERROR", "{name}: {r}");
        }
        // Nobody else noticed.
        let p = bystander.call(&json!({"action": "system.ping", "token": token}));
        assert_eq!(p["status"], "ok", "{name}: bystander failed");
    }
    // Each refusal is in the audit log.
    let lines = d.audit_lines();
    let refused = lines
        .iter()
        .filter(|r| r["code"] == "VALIDATION_ERROR")
        .count();
    assert!(
        refused >= 9,
        "expected every bad frame audited, got {refused}"
    );
    let out = d.cli(&["audit", "verify", d.audit_log().to_str().unwrap()]);
    assert!(out.status.success());
}

fn raise_nofile(n: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard).unwrap();
}

#[test]
fn five_thousand_idle_connections_do_not_stop_another_client() {
    raise_nofile(20_000);
    let d = Daemon::configured(&base_config(&format!(
        "[limits]\nmax_connections = 6000\n{ROOT_ADMIN}"
    )));
    let mut idle = Vec::new();
    for _ in 0..5000 {
        idle.push(std::os::unix::net::UnixStream::connect(d.socket()).unwrap());
    }
    // Some of them start a frame and stall, too.
    for s in idle.iter_mut().take(500) {
        s.write_all(&[0, 0, 1]).unwrap();
    }
    let key = d.key();
    let mut c = Raw::lp(&d.socket());
    for _ in 0..200 {
        c.send_bytes(&lumo_ping(&key));
        assert_eq!(c.recv().unwrap()["success"], true);
    }
    let mut s = Raw::lines(&d.socket());
    let token = login(&mut s);
    let status = s.call(&json!({"action": "daemon.status", "token": token}));
    assert!(
        status["data"]["connections"].as_u64().unwrap() >= 5000,
        "{status}"
    );
    drop(idle);
}

#[test]
fn the_connection_limit_closes_connections_beyond_it() {
    let d = Daemon::configured(&base_config(&format!(
        "[limits]\nmax_connections = 3\n{ROOT_ADMIN}"
    )));
    let held: Vec<Raw> = (0..3)
        .map(|_| {
            let mut r = Raw::lp(&d.socket());
            assert_eq!(r.call(&json!({"action": "health"}))["status"], "ok");
            r
        })
        .collect();
    let mut extra = Raw::lp(&d.socket());
    extra.s.write_all(&lumo_ping(&d.key())).ok();
    assert!(extra.recv().is_none(), "the fourth connection is closed");
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_still_serving(&d);
}

#[test]
fn rate_limits_count_after_authentication() {
    let cfg = base_config(&format!("[rate_limits]\nsystem = \"5/60s\"\n{ROOT_ADMIN}"));
    let d = Daemon::configured(&cfg);
    let key = d.key();
    let mut c = Raw::lp(&d.socket());
    // Forged requests do not spend the quota.
    for _ in 0..20 {
        c.send_bytes(&lumo_request(
            b"wrong",
            "system.ping",
            "{}",
            now(),
            &nonce(),
        ));
        assert_eq!(c.recv().unwrap()["error"]["code"], "AUTH_ERROR");
    }
    for i in 0..5 {
        c.send_bytes(&lumo_ping(&key));
        assert_eq!(c.recv().unwrap()["success"], true, "request {i}");
    }
    c.send_bytes(&lumo_ping(&key));
    let r = c.recv().unwrap();
    assert_eq!(r["error"]["code"], "RATE_LIMITED", "{r}");
    assert_eq!(r["error"]["details"]["limit"], 5);
    denied_with(&d, "RATE_LIMITED");
}

/// Runs a short Python client as `uid`: it sends each JSON request of `requests` on one
/// newline-delimited connection and prints each reply on its own line.
fn python_as(uid: u32, socket: &std::path::Path, requests: &[Value]) -> Vec<Value> {
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rwb")
for line in sys.stdin:
    f.write(line.encode()); f.flush()
    print(f.readline().decode().strip(), flush=True)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script, socket.to_str().unwrap()])
        .uid(uid)
        .gid(uid)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        let stdin = child.stdin.as_mut().unwrap();
        for r in requests {
            writeln!(stdin, "{r}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_bootstrap_token_is_made_for_another_principal_and_redeemed_once() {
    let policy = r#"
[policy.roles.admin]
allow = ["*"]
[policy.roles.user]
allow = ["system:*"]

[[policy.rules]]
uid = 0
roles = ["admin"]
[[policy.rules]]
uid = 65534
roles = ["user"]
"#;
    let d = Daemon::configured(&base_config(policy));
    let mut c = Raw::lines(&d.socket());
    let admin =
        c.call(&json!({"action": "auth", "params": {"type": "bootstrap", "for": "uid:65534"}}));
    assert_eq!(admin["status"], "ok", "{admin}");
    let boot = admin["data"]["token"].as_str().unwrap().to_string();
    // Not for root: root cannot redeem it, and that does not use it up.
    let r = c.call(&json!({"action": "auth", "params": {"bootstrap": boot}}));
    assert_eq!(r["error"]["code"], "AUTH_INVALID", "{r}");
    // Nor can it be used as a session token.
    let r = c.call(&json!({"action": "system.ping", "token": boot}));
    assert!(
        r["error"]["code"].as_str().unwrap().starts_with("AUTH_"),
        "{r}"
    );
    let replies = python_as(
        65534,
        &d.socket(),
        &[
            json!({"action": "auth", "params": {"bootstrap": boot}}),
            json!({"action": "auth", "params": {"bootstrap": boot}}),
        ],
    );
    assert_eq!(replies[0]["status"], "ok", "{replies:?}");
    assert_eq!(replies[0]["data"]["type"], "session");
    assert_eq!(
        replies[1]["error"]["code"], "AUTH_INVALID",
        "single use: {replies:?}"
    );
    let session = replies[0]["data"]["token"].as_str().unwrap();
    let replies = python_as(
        65534,
        &d.socket(),
        &[json!({"action": "system.ping", "token": session})],
    );
    assert_eq!(replies[0]["data"]["pong"], true, "{replies:?}");
    // Only an admin may make one, and never without saying for whom.
    let r = python_as(
        65534,
        &d.socket(),
        &[json!({"action": "auth", "params": {"type": "bootstrap", "for": "uid:0"}})],
    );
    assert_eq!(r[0]["error"]["code"], "ACCESS_DENIED", "{r:?}");
    let r = c.call(&json!({"action": "auth", "params": {"type": "bootstrap"}}));
    assert_eq!(r["error"]["code"], "VALIDATION_ERROR", "{r}");
    // The token never reaches the audit log.
    let log = std::fs::read_to_string(d.audit_log()).unwrap();
    assert!(!log.contains(&boot) && !log.contains(session));
}
