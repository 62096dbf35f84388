//! The daemon's life against the real binary: reload (SIGHUP and `warden daemon reload`),
//! draining on SIGTERM, process hygiene, and configuration files refused at start.

mod common;
use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

fn cfg(extra: &str) -> String {
    base_config(&format!("{extra}\n{ROOT_ADMIN}"))
}

fn swap(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "`{from}` not in the configuration");
    text.replacen(from, to, 1)
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Rewrites a configured daemon's file (`{dir}` expanded as at start).
fn rewrite(d: &Daemon, toml: &str) {
    std::fs::write(
        d.config_path(),
        toml.replace("{dir}", d.dir.path().to_str().unwrap()),
    )
    .unwrap();
}

fn ping(c: &mut Raw, token: &str) -> Value {
    c.call(&json!({"action": "system.ping", "token": token}))
}

fn lumo_call(d: &Daemon, command: &str) -> Value {
    let mut c = Raw::lp(&d.socket());
    c.send_bytes(&lumo_request(&d.key(), command, "{}", now(), &nonce()));
    c.recv().unwrap()
}

const ROOT_NO_PING: &str = r#"
[policy.roles.admin]
allow = ["*"]
deny = ["system:ping"]

[[policy.rules]]
uid = 0
roles = ["admin"]
"#;

#[test]
fn sighup_applies_a_new_socket_mode_and_policy() {
    let d = Daemon::configured(&cfg(""));
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    assert_eq!(ping(&mut c, &token)["status"], "ok");
    assert_eq!(mode_of(&d.socket()), 0o666);

    rewrite(
        &d,
        &swap(
            &base_config(ROOT_NO_PING),
            "mode = \"0666\"",
            "mode = \"0600\"",
        ),
    );
    d.signal(Signal::SIGHUP);
    wait_until(
        "the new mode on the live socket",
        Duration::from_secs(10),
        || mode_of(&d.socket()) == 0o600,
    );
    // On the connection opened before the reload, with the token issued before it.
    wait_until("the new policy", Duration::from_secs(10), || {
        ping(&mut c, &token)["status"] == "error"
    });
    let r = ping(&mut c, &token);
    assert_eq!(r["error"]["code"], "ACCESS_DENIED", "{r}");
    // On a new connection, in both dialects.
    let mut fresh = Raw::lines(&d.socket());
    let token = login(&mut fresh);
    assert_eq!(ping(&mut fresh, &token)["error"]["code"], "ACCESS_DENIED");
    let r = lumo_call(&d, "system.ping");
    assert_eq!(r["error"]["code"], "AUTH_ERROR", "{r}");
    // What the new policy still allows works.
    let r = lumo_call(&d, "system.metrics");
    assert_eq!(r["success"], true, "{r}");
    assert!(
        d.stderr().lines().all(|l| !l.contains("reload failed")),
        "{}",
        d.stderr()
    );
}

#[test]
fn a_reload_with_a_bad_file_keeps_the_running_configuration_and_says_why() {
    let d = Daemon::configured(&cfg(""));
    // An unknown key, next to changes that must not be applied either.
    let bad = swap(
        &base_config(ROOT_NO_PING),
        "mode = \"0666\"",
        "mode = \"0600\"\nmdoe = \"0600\"",
    );
    let line = bad.lines().position(|l| l.starts_with("mdoe")).unwrap() + 1;
    rewrite(&d, &bad);
    d.signal(Signal::SIGHUP);
    wait_until(
        "the reload failure in the log",
        Duration::from_secs(10),
        || d.stderr().contains("reload failed"),
    );
    let err = d.stderr();
    let report = err.lines().find(|l| l.contains("reload failed")).unwrap();
    assert!(
        report.contains(&format!("line {line}")) && report.contains("mdoe"),
        "{report}"
    );
    assert!(
        report.contains(d.config_path().to_str().unwrap()),
        "{report}"
    );
    // Still the old configuration: mode and policy.
    assert_eq!(mode_of(&d.socket()), 0o666);
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    assert_eq!(ping(&mut c, &token)["status"], "ok");
    assert_eq!(lumo_call(&d, "system.ping")["success"], true);
    // `warden daemon reload` refuses the same file, with the same reason.
    let out = d.cli(&["daemon", "reload"]);
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains(&format!("line {line}")) && msg.contains("mdoe"),
        "{msg}"
    );
}

#[test]
fn daemon_reload_reports_that_a_new_socket_path_needs_a_restart() {
    let d = Daemon::configured(&cfg(""));
    rewrite(&d, &swap(&cfg(""), "{dir}/warden.sock", "{dir}/moved.sock"));
    let out = d.cli(&["daemon", "reload", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["needs_restart"], json!(["socket.path"]), "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    // Nothing moved: the daemon still listens where it started.
    assert!(!d.dir.path().join("moved.sock").exists());
    assert_eq!(lumo_call(&d, "system.ping")["success"], true);
    let out = d.cli(&["daemon", "reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("needs a restart") && text.contains("socket.path"),
        "{text}"
    );
    // The running configuration still names the socket in use.
    let out = d.cli(&["daemon", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["socket"], d.socket().to_str().unwrap(), "{v}");
}

/// Pipelines `n` copies of `request` on one connection, sends SIGTERM at once, and returns the
/// replies read until the daemon closed the connection; checks the daemon then exits 0.
fn replies_across_sigterm(d: &mut Daemon, c: &mut Raw, request: &Value, n: usize) -> Vec<Value> {
    let line = format!("{request}\n");
    c.s.write_all(line.repeat(n).as_bytes()).unwrap();
    d.signal(Signal::SIGTERM);
    let mut replies = Vec::new();
    while let Some(r) = c.recv() {
        replies.push(r);
    }
    let status = d.wait(Duration::from_secs(10)).expect("the daemon exits");
    assert!(status.success(), "{status}: {}", d.stderr());
    replies
}

#[test]
fn sigterm_answers_every_pipelined_ping_before_closing() {
    let mut d = Daemon::configured(&cfg(""));
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    let request = json!({"action": "system.ping", "token": token});
    let replies = replies_across_sigterm(&mut d, &mut c, &request, 500);
    assert_eq!(replies.len(), 500, "pipelined pings dropped at shutdown");
    assert!(replies.iter().all(|r| r["status"] == "ok"), "{replies:?}");
}

#[test]
fn sigterm_answers_every_pipelined_request_that_waits_for_the_disk() {
    // Unlike probes, `daemon.status` waits for its audit record to be synced, so the daemon is
    // still working through the pipeline when SIGTERM arrives.
    let mut d = Daemon::configured(&cfg("[rate_limits]\nadmin = \"off\"\n"));
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    let request = json!({"action": "daemon.status", "token": token});
    let replies = replies_across_sigterm(&mut d, &mut c, &request, 500);
    assert_eq!(replies.len(), 500, "pipelined requests dropped at shutdown");
    assert!(
        replies.iter().all(|r| r["status"] == "ok"),
        "{:?}",
        replies.iter().find(|r| r["status"] != "ok")
    );
}

#[test]
fn the_daemon_has_a_zero_core_limit() {
    let d = Daemon::configured(&cfg(""));
    // Every process of the daemon: the monitor and core under privilege separation.
    for pid in [d.pid(), d.core_pid()] {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        let fields: Vec<&str> = core.split_whitespace().collect();
        assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    }
}

#[test]
fn the_daemon_is_not_dumpable_by_its_own_user() {
    const NOBODY: u32 = 65534;
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = root.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    let d = Daemon::dev_as(NOBODY, NOBODY, &state);
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    assert_eq!(std::fs::metadata(d.socket()).unwrap().uid(), NOBODY);

    // A process of the same uid can read the environment of its own `sleep` (the control: a
    // dumpable process of that uid) but not the daemon's.
    let script = format!(
        "sleep 30 & p=$!; cat /proc/$p/environ >/dev/null && echo CONTROL_READ; kill $p; \
         cat /proc/{}/environ >/dev/null && echo DAEMON_READ; true",
        d.pid()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("CONTROL_READ"),
        "the control failed: {stdout} {stderr}"
    );
    assert!(
        !stdout.contains("DAEMON_READ"),
        "the daemon's environ was readable"
    );
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

/// `warden daemon run --config` on `text`; expects a refusal and returns (config path, stderr).
fn refused(text: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warden.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(warden_bin());
    cmd.args(["daemon", "run", "--config", path.to_str().unwrap()])
        .env_remove("WARDEN_CONFIG");
    let (status, _, err) = run_bounded(&mut cmd, Duration::from_secs(30));
    let status = status.unwrap_or_else(|| panic!("the daemon started on {text:?}"));
    assert!(!status.success());
    (path.display().to_string(), err)
}

#[test]
fn an_unknown_key_or_a_bad_value_stops_the_start_naming_file_line_and_key() {
    let (path, err) = refused("[socket]\nmdoe = \"0600\"\n");
    assert!(
        err.contains(&path) && err.contains("line 2") && err.contains("mdoe"),
        "{err}"
    );
    for (text, expected) in [
        ("[socket]\nmode = \"0999\"\n", "octal"),
        ("[limits]\nidle_timeout = \"5 parsecs\"\n", "unit"),
        ("[daemon]\nlog_format = \"xml\"\n", "`json`"),
    ] {
        let (path, err) = refused(text);
        assert!(
            err.contains(&path) && err.contains("line 2") && err.contains(expected),
            "{text}: {err}"
        );
    }
    // Values only the validation step can judge are named by key.
    let (path, err) = refused("[limits]\nmax_message_size = \"12\"\n");
    assert!(
        err.contains(&path) && err.contains("limits.max_message_size"),
        "{err}"
    );
}
