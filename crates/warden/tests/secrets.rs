//! The secret store served by the real binary: sealing and unsealing, both dialects on both
//! framings, per-name policy, every securityd error code the local socket produces, the CLI
//! and its exit codes, tampered files, and the daemon's memory.

mod common;
use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Cheap KDF parameters (these tests are about the daemon, not about Argon2's cost).
const STORE: &str = r#"
[secrets]
dir = "{dir}/secrets"
kdf_memory = "64KiB"
kdf_passes = 1

[rate_limits]
auth = "off"
secrets = "off"
admin = "off"
"#;

fn ok(r: &Value) -> &Value {
    assert_eq!(r["status"], "ok", "{r}");
    &r["data"]
}

fn code(r: &Value) -> &str {
    assert_eq!(r["status"], "error", "{r}");
    r["error"]["code"].as_str().unwrap()
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A directory with a configuration (`extra` appended to the base, root may do everything)
/// and a store created by `warden init` with the password in `<dir>/master`.
fn store_dir(extra: &str, password: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &base_config(&format!("{ROOT_ADMIN}{STORE}{extra}")),
    );
    let pw = init_store(dir.path(), password);
    (dir, pw)
}

fn unsealed(dir: &Path, pw: &Path) -> Daemon {
    Daemon::configured_at(dir, &["--master-password-file", pw.to_str().unwrap()])
}

/// Starts the daemon on `dir` with `pw` as its master password file, expecting it to refuse;
/// returns its stderr.
fn refused_start(dir: &Path, pw: &Path) -> String {
    let (status, _, err) = run_bounded(
        Command::new(warden_bin()).args([
            "daemon",
            "run",
            "--config",
            dir.join("warden.toml").to_str().unwrap(),
            "--master-password-file",
            pw.to_str().unwrap(),
        ]),
        std::time::Duration::from_secs(20),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "it started: {err}");
    err
}

fn admin_login(c: &mut Raw) -> String {
    let r = c.call(&json!({"action": "auth", "params": {"type": "admin"}}));
    ok(&r)["token"].as_str().unwrap().to_string()
}

fn set(c: &mut Raw, token: &str, key: &str, value: &str) -> u64 {
    let r = c.call(
        &json!({"action": "secrets.set", "token": token, "params": {"key": key, "value": value}}),
    );
    ok(&r)["version"].as_u64().unwrap()
}

fn get(c: &mut Raw, token: &str, key: &str) -> Value {
    c.call(&json!({"action": "get_secret", "token": token, "key": key}))
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn dev_mode_creates_and_unseals_its_store_and_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let s = state.to_str().unwrap();
    {
        let d = Daemon::dev_with(&["--state-dir", s]);
        let pw = PathBuf::from(&d.env["WARDEN_MASTER_PASSWORD_FILE"]);
        assert_eq!(pw, state.join("dev-master-password"));
        assert_eq!(std::fs::metadata(&pw).unwrap().mode() & 0o077, 0);
        assert_eq!(
            d.env["WARDEN_SECRETS_DIR"],
            state.join("secrets").to_str().unwrap()
        );
        let mut c = Raw::lp(&d.socket());
        let t = login(&mut c);
        assert_eq!(set(&mut c, &t, "dev_secret", "kept"), 1);
    }
    let d = Daemon::dev_with(&["--state-dir", s]);
    let mut c = Raw::lp(&d.socket());
    let h = c.call(&json!({"action": "health"}));
    assert_eq!(ok(&h)["sealed"], false);
    assert_eq!(ok(&h)["secrets_loaded"], 1);
    let t = login(&mut c);
    assert_eq!(ok(&get(&mut c, &t, "dev_secret"))["value"], "kept");
}

#[test]
fn securityd_dialect_serves_secrets_on_both_framings() {
    let d = Daemon::dev();
    let mut w = Raw::lp(&d.socket());
    let wt = login(&mut w);
    set(&mut w, &wt, "proxmox_password", "pve-secret");
    set(&mut w, &wt, "openai_api_key", "sk-123");
    for framing in ["lines", "length-prefixed"] {
        let mut c = if framing == "lines" {
            Raw::lines(&d.socket())
        } else {
            Raw::lp(&d.socket())
        };
        let auth = c.call(&json!({"action": "auth", "pid": 1, "exe": "/usr/bin/python3"}));
        let data = ok(&auth);
        assert_eq!(data["allowed_secrets"], json!(["*"]), "{framing}");
        let t = data["token"].as_str().unwrap().to_string();
        // `key` beside `action`, as seed 001 shows it, and inside `params`.
        let top = get(&mut c, &t, "proxmox_password");
        assert_eq!(ok(&top)["key"], "proxmox_password", "{framing}");
        assert_eq!(ok(&top)["value"], "pve-secret", "{framing}");
        let inner = c.call(
            &json!({"action": "get_secret", "token": t, "params": {"key": "openai_api_key"}}),
        );
        assert_eq!(ok(&inner)["value"], "sk-123", "{framing}");
        let many = c.call(&json!({"action": "get_secrets", "token": t, "params": {"keys": ["proxmox_password", "nope", "openai_api_key"]}}));
        assert_eq!(
            ok(&many)["secrets"],
            json!({"proxmox_password": "pve-secret", "openai_api_key": "sk-123"})
        );
        assert_eq!(ok(&many)["missing"], json!(["nope"]));
        let list = c.call(&json!({"action": "list_secrets", "token": t}));
        assert_eq!(
            ok(&list)["secrets"],
            json!(["openai_api_key", "proxmox_password"])
        );
        assert_eq!(ok(&list)["count"], 2);
        let health = c.call(&json!({"action": "health"}));
        assert_eq!(ok(&health)["secrets_loaded"], 2);
        assert_eq!(ok(&health)["sealed"], false);
        let r = c.call(&json!({"action": "refresh", "token": t}));
        let t2 = ok(&r)["token"].as_str().unwrap().to_string();
        assert_eq!(code(&get(&mut c, &t, "proxmox_password")), "AUTH_INVALID");
        assert_eq!(
            ok(&get(&mut c, &t2, "proxmox_password"))["value"],
            "pve-secret"
        );
        let r = c.call(&json!({"action": "logout", "token": t2}));
        assert!(ok(&r)["message"].is_string());
        assert_eq!(code(&get(&mut c, &t2, "proxmox_password")), "AUTH_INVALID");
    }
}

#[test]
fn warden_dialect_keeps_versions_deletes_destroys_and_checks_expected_versions() {
    let d = Daemon::dev();
    let mut c = Raw::lp(&d.socket());
    let t = login(&mut c);
    let mut call = |id: u64, method: &str, params: Value| {
        let r = c.call(&json!({"action": method, "id": id, "token": t, "params": params}));
        assert_eq!(r["id"], id, "{r}");
        r
    };
    for (i, v) in ["one", "two", "three"].iter().enumerate() {
        let r = call(i as u64, "secrets.set", json!({"key": "db", "value": v}));
        assert_eq!(ok(&r)["version"], i as u64 + 1);
    }
    let r = call(10, "secrets.get", json!({"key": "db", "version": 2}));
    assert_eq!(ok(&r)["value"], "two");
    assert_eq!(ok(&r)["version"], 2);
    let r = call(11, "secrets.versions", json!({"key": "db"}));
    let versions: Vec<u64> = ok(&r)["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    let r = call(
        12,
        "secrets.set",
        json!({"key": "db", "value": "x", "expected_version": 2}),
    );
    assert_eq!(code(&r), "CONFLICT");
    let r = call(
        13,
        "secrets.set",
        json!({"key": "db", "value": "four", "expected_version": 3}),
    );
    assert_eq!(ok(&r)["version"], 4);
    let r = call(14, "secrets.destroy", json!({"key": "db", "versions": [1]}));
    assert_eq!(ok(&r)["destroyed"], json!([1]));
    let r = call(15, "secrets.get", json!({"key": "db", "version": 1}));
    assert_eq!(code(&r), "SECRET_NOT_FOUND");
    let r = call(16, "secrets.delete", json!({"key": "db"}));
    assert_eq!(ok(&r)["deleted"], true);
    assert_eq!(
        code(&call(17, "secrets.get", json!({"key": "db"}))),
        "SECRET_NOT_FOUND"
    );
    let r = call(18, "secrets.list", json!({}));
    assert_eq!(ok(&r)["count"], 0);
    // A set after a delete brings it back with a new version; numbers are never reused.
    let r = call(19, "secrets.set", json!({"key": "db", "value": "five"}));
    assert_eq!(ok(&r)["version"], 5);
    let r = call(20, "secrets.destroy", json!({"key": "db"}));
    assert_eq!(ok(&r)["destroyed"], "all");
    assert_eq!(
        code(&call(21, "secrets.get", json!({"key": "db"}))),
        "SECRET_NOT_FOUND"
    );
    let r = call(22, "secrets.set", json!({"key": "../etc", "value": "x"}));
    assert_eq!(code(&r), "VALIDATION_ERROR");
    let r = call(23, "secrets.set", json!({"key": "k"}));
    assert_eq!(code(&r), "VALIDATION_ERROR");
}

const READER_POLICY: &str = r#"
[policy.roles.reader]
allow = ["secrets:read:db_*", "secrets:write:*", "admin:token"]
deny = ["secrets:read:db_root"]

[[policy.rules]]
uid = 0
roles = ["reader"]
"#;

#[test]
fn the_policy_decides_per_secret_name_and_the_audit_names_it_without_the_value() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &base_config(&format!("{STORE}{READER_POLICY}")));
    let pw = dir.path().join("master");
    write_private(&pw, "pw");
    let out = Command::new(warden_bin())
        .args(["init", "--dir"])
        .arg(dir.path().join("secrets"))
        .args(["--password-file", pw.to_str().unwrap()])
        .arg("--config")
        .arg(dir.path().join("warden.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = unsealed(dir.path(), &pw);
    let mut c = Raw::lines(&d.socket());
    let auth = c.call(&json!({"action": "auth"}));
    assert_eq!(ok(&auth)["allowed_secrets"], json!(["db_*"]));
    let t = ok(&auth)["token"].as_str().unwrap().to_string();
    for (k, v) in [
        ("db_main", "VALUE-main-7f3a"),
        ("db_root", "VALUE-root-7f3a"),
        ("api_key", "VALUE-api-7f3a"),
    ] {
        set(&mut c, &t, k, v);
    }
    assert_eq!(ok(&get(&mut c, &t, "db_main"))["value"], "VALUE-main-7f3a");
    assert_eq!(code(&get(&mut c, &t, "db_root")), "ACCESS_DENIED");
    assert_eq!(code(&get(&mut c, &t, "api_key")), "ACCESS_DENIED");
    // Denied whether or not it exists: a caller learns nothing about names it may not read.
    assert_eq!(code(&get(&mut c, &t, "api_nothing")), "ACCESS_DENIED");
    let list = c.call(&json!({"action": "list_secrets", "token": t}));
    assert_eq!(ok(&list)["secrets"], json!(["db_main"]));
    assert_eq!(ok(&list)["count"], 1);
    let many =
        c.call(&json!({"action": "get_secrets", "token": t, "keys": ["db_main", "db_root"]}));
    assert_eq!(code(&many), "ACCESS_DENIED");
    // rotate_master needs admin:secrets.rotate, which this role lacks.
    let at = admin_login(&mut c);
    let r =
        c.call(&json!({"action": "rotate_master", "token": at, "params": {"new_password": "n"}}));
    assert_eq!(code(&r), "ACCESS_DENIED");

    let denied = d.wait_audit(|v| v["resource"] == "secrets:read:db_root");
    assert_eq!(denied["result"], "denied");
    assert_eq!(denied["method"], "secrets.get");
    let granted = d.wait_audit(|v| v["resource"] == "secrets:read:db_main" && v["result"] == "ok");
    assert_eq!(granted["method"], "secrets.get");
    let write = d.wait_audit(|v| v["resource"] == "secrets:write:api_key");
    assert!(
        write["params"]["value"]
            .as_str()
            .unwrap()
            .starts_with("<redacted"),
        "{write}"
    );
    let rot = d.wait_audit(|v| v["method"] == "secrets.rotate_master");
    assert!(
        rot["params"]["new_password"]
            .as_str()
            .unwrap()
            .starts_with("<redacted"),
        "{rot}"
    );
    let log = std::fs::read_to_string(d.audit_log()).unwrap();
    assert!(!log.contains("VALUE-"), "a value reached the audit log");
    assert!(
        !d.stderr().contains("VALUE-"),
        "a value reached the daemon's log"
    );
}

#[test]
fn every_securityd_error_code_the_socket_can_produce() {
    // AUTH_DENIED: a caller that matches no policy rule cannot even authenticate.
    {
        let d = Daemon::configured(&base_config(
            "[policy.roles.r]\nallow = [\"*\"]\n[[policy.rules]]\nuid = 4242\nroles = [\"r\"]\n",
        ));
        let mut c = Raw::lines(&d.socket());
        assert_eq!(code(&c.call(&json!({"action": "auth"}))), "AUTH_DENIED");
    }
    let (dir, pw) = store_dir("", "right password");
    // Sessions of 1 s, and a secrets rate limit (the store section turned it off).
    let text = std::fs::read_to_string(dir.path().join("warden.toml")).unwrap();
    std::fs::write(
        dir.path().join("warden.toml"),
        text.replace("secrets = \"off\"", "secrets = \"4/1m\"")
            .replace("[auth]\n", "[auth]\nsession_ttl = \"1s\"\n"),
    )
    .unwrap();
    let d = unsealed(dir.path(), &pw);
    let mut c = Raw::lines(&d.socket());
    assert_eq!(
        code(&c.call(&json!({"action": "get_secret", "key": "x"}))),
        "AUTH_REQUIRED"
    );
    assert_eq!(code(&get(&mut c, "not-a-token", "x")), "AUTH_INVALID");
    let t = login(&mut c);
    set(&mut c, &t, "present", "v");
    assert_eq!(code(&get(&mut c, &t, "absent")), "SECRET_NOT_FOUND");
    // Wrong master password on unseal.
    let at = admin_login(&mut c);
    let r = c.call(&json!({"action": "unseal", "token": at, "params": {"password": "wrong"}}));
    assert_eq!(code(&r), "AUTH_INVALID");
    // DAEMON_LOCKED once sealed, until unsealed again.
    let r = c.call(&json!({"action": "seal", "token": at}));
    assert_eq!(ok(&r)["sealed"], true);
    assert_eq!(code(&get(&mut c, &t, "present")), "DAEMON_LOCKED");
    let r =
        c.call(&json!({"action": "unseal", "token": at, "params": {"password": "right password"}}));
    assert_eq!(ok(&r)["secrets_loaded"], 1);
    assert_eq!(ok(&get(&mut c, &t, "present"))["value"], "v");
    // RATE_LIMITED: the fifth secrets request within the minute (set, get, get, get).
    let r = get(&mut c, &t, "present");
    assert_eq!(code(&r), "RATE_LIMITED", "{r}");
    // AUTH_EXPIRED: the session outlived its 1 s.
    let t2 = login(&mut c);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(code(&get(&mut c, &t2, "present")), "AUTH_EXPIRED");
    let unseal = d.wait_audit(|v| v["method"] == "daemon.unseal" && v["result"] == "ok");
    assert!(
        unseal["params"]["password"]
            .as_str()
            .unwrap()
            .starts_with("<redacted"),
        "{unseal}"
    );
    assert!(!std::fs::read_to_string(d.audit_log())
        .unwrap()
        .contains("right password"));
    // ACCESS_DENIED is shown by the per-name policy test; INTERNAL_ERROR (an audit record
    // that cannot be written) by config_keys.rs, through the same pipeline.
}

#[test]
fn a_daemon_without_a_store_is_locked_until_init_and_unseal_and_seal_wipes_it() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &base_config(&format!("{ROOT_ADMIN}{STORE}")));
    let d = Daemon::configured_at(dir.path(), &[]);
    let mut c = Raw::lp(&d.socket());
    let t = login(&mut c);
    let r = get(&mut c, &t, "k");
    assert_eq!(code(&r), "DAEMON_LOCKED");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("warden init"),
        "{r}"
    );
    let h = c.call(&json!({"action": "health"}));
    assert_eq!(ok(&h)["sealed"], true);
    // init on the terminal-less path: the password from standard input, twice not needed.
    let out = d.cli_input(&["init", "--password-stdin"], b"master one\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = d.cli_input(&["init", "--password-stdin"], b"master one\n");
    assert!(!again.status.success(), "a second init must refuse");
    assert_eq!(code(&get(&mut c, &t, "k")), "DAEMON_LOCKED");
    let out = d.cli_input(&["unseal", "--password-stdin"], b"master two\n");
    assert_eq!(
        out.status.code(),
        Some(5),
        "wrong password: {}",
        stdout(&out)
    );
    let out = d.cli_input(&["unseal", "--password-stdin"], b"master one\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    set(&mut c, &t, "k", "v");
    let out = d.cli(&["daemon", "status", "--json"]);
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["sealed"], false);
    assert_eq!(st["secrets_loaded"], 1);
    let out = d.cli(&["seal"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(code(&get(&mut c, &t, "k")), "DAEMON_LOCKED");
    let out = d.cli(&["secrets", "get", "k"]);
    assert_eq!(out.status.code(), Some(6));
    let h = c.call(&json!({"action": "health"}));
    assert_eq!(ok(&h)["sealed"], true);
    assert_eq!(ok(&h)["secrets_loaded"], 0);
}

#[test]
fn unattended_unseal_from_a_password_file_or_systemd_credentials() {
    let (dir, pw) = store_dir("", "unattended");
    {
        let d = unsealed(dir.path(), &pw);
        let mut c = Raw::lp(&d.socket());
        let t = login(&mut c);
        set(&mut c, &t, "k", "v1");
    }
    // $CREDENTIALS_DIRECTORY/warden-master, as LoadCredential= provides it.
    let creds = tempfile::tempdir().unwrap();
    std::fs::copy(&pw, creds.path().join("warden-master")).unwrap();
    let cfg = dir.path().join("warden.toml");
    let (status, out, err) = run_bounded(
        Command::new(warden_bin())
            .args(["daemon", "run", "--config", cfg.to_str().unwrap()])
            .env("CREDENTIALS_DIRECTORY", creds.path())
            .env("WARDEN_LOG", "info"),
        std::time::Duration::from_secs(3),
    );
    assert!(status.is_none(), "the daemon stopped: {err}");
    assert!(out.contains("WARDEN_READY=1"), "{out}{err}");
    assert!(
        err.contains("unsealed from the master password file"),
        "{err}"
    );

    // A wrong password file, or one others may read, stops the start with the reason.
    let wrong = dir.path().join("wrong");
    write_private(&wrong, "not it");
    let err = refused_start(dir.path(), &wrong);
    assert!(err.contains("wrong master password"), "{err}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused_start(dir.path(), &pw);
    assert!(err.contains("chmod 0600"), "{err}");
}

#[test]
fn rotate_master_and_rekey_keep_every_value_and_the_new_password_opens_the_store() {
    let (dir, pw) = store_dir("", "old password");
    {
        let d = unsealed(dir.path(), &pw);
        let mut c = Raw::lines(&d.socket());
        let t = login(&mut c);
        set(&mut c, &t, "a", "alpha");
        set(&mut c, &t, "b", "bravo");
        let at = admin_login(&mut c);
        let r = c.call(&json!({"action": "rotate_master", "token": at, "params": {"new_password": "new password"}}));
        assert_eq!(ok(&r)["message"], "master password changed");
        assert!(ok(&r)["rotated_at"].is_string());
        let r = c.call(&json!({"action": "secrets.rekey", "token": at}));
        assert_eq!(ok(&r)["secrets"], 2);
        assert_eq!(ok(&get(&mut c, &t, "a"))["value"], "alpha");
        // reload answers with the secrets it holds.
        let r = c.call(&json!({"action": "reload", "token": at}));
        assert_eq!(ok(&r)["secrets_loaded"], 2);
        assert!(ok(&r)["reloaded_at"].is_string());
        assert_eq!(ok(&r)["needs_restart"], json!([]));
        // The store's settings are read at start only; a reload says so.
        let cfg = dir.path().join("warden.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, text.replace("kdf_passes = 1", "kdf_passes = 2")).unwrap();
        let r = c.call(&json!({"action": "reload", "token": at}));
        assert_eq!(ok(&r)["needs_restart"], json!(["secrets"]), "{r}");
    }
    // The old password no longer opens the store.
    refused_start(dir.path(), &pw);
    let new = dir.path().join("new");
    write_private(&new, "new password");
    let d = unsealed(dir.path(), &new);
    let mut c = Raw::lines(&d.socket());
    let t = login(&mut c);
    assert_eq!(ok(&get(&mut c, &t, "a"))["value"], "alpha");
    assert_eq!(ok(&get(&mut c, &t, "b"))["value"], "bravo");
    // The CLI's rotate-master, from standard input.
    let out = d.cli_input(
        &["secrets", "rotate-master", "--password-stdin"],
        b"third\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_cli_reads_values_from_stdin_or_a_file_and_its_exit_codes_tell_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &base_config(&format!(
            "{STORE}[policy.roles.r]\nallow = [\"secrets:*\", \"admin:*\"]\ndeny = [\"secrets:read:hidden\"]\n[[policy.rules]]\nuid = 0\nroles = [\"r\"]\n"
        )),
    );
    let pw = dir.path().join("master");
    write_private(&pw, "pw");
    let d0 = Daemon::configured_at(dir.path(), &[]);
    let out = d0.cli(&["init", "--password-file", pw.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d0);
    let d = unsealed(dir.path(), &pw);

    let out = d.cli_input(&["secrets", "set", "db_password"], b"from stdin\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli(&["secrets", "get", "db_password"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "from stdin\n");
    let file = dir.path().join("value.txt");
    std::fs::write(&file, "line one\nline two\n").unwrap();
    let out = d.cli(&[
        "secrets",
        "set",
        "db_password",
        "--file",
        file.to_str().unwrap(),
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], 2);
    let out = d.cli(&["secrets", "get", "db_password", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["value"], "line one\nline two\n");
    let out = d.cli(&["secrets", "get", "db_password", "--version", "1"]);
    assert_eq!(stdout(&out), "from stdin\n");
    // A value on the command line only with the explicit flag.
    let out = d.cli(&["secrets", "set", "x", "--value", "visible"]);
    assert_eq!(out.status.code(), Some(2));
    let out = d.cli(&[
        "secrets",
        "set",
        "x",
        "--value",
        "visible",
        "--insecure-argv",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let out = d.cli(&[
        "secrets",
        "set",
        "hidden",
        "--value",
        "h",
        "--insecure-argv",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let out = d.cli(&["secrets", "list"]);
    assert_eq!(stdout(&out), "db_password\nx\n");
    let out = d.cli(&["secrets", "versions", "db_password", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["versions"].as_array().unwrap().len(), 2);

    // Exit codes: 4 not found, 5 denied, 6 sealed, 3 unavailable.
    assert_eq!(d.cli(&["secrets", "get", "nope"]).status.code(), Some(4));
    let out = d.cli(&["secrets", "get", "hidden", "--json"]);
    assert_eq!(out.status.code(), Some(5));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "ACCESS_DENIED");
    assert_eq!(d.cli(&["secrets", "delete", "x"]).status.code(), Some(0));
    assert_eq!(d.cli(&["secrets", "get", "x"]).status.code(), Some(4));
    assert_eq!(
        d.cli(&["secrets", "destroy", "db_password", "--version", "1"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        d.cli(&["secrets", "get", "db_password", "--version", "1"])
            .status
            .code(),
        Some(4)
    );
    assert_eq!(d.cli(&["secrets", "rekey"]).status.code(), Some(0));
    assert_eq!(d.cli(&["seal"]).status.code(), Some(0));
    assert_eq!(
        d.cli(&["secrets", "get", "db_password"]).status.code(),
        Some(6)
    );
    let out = d.cli(&[
        "secrets",
        "get",
        "db_password",
        "--socket",
        "/nonexistent/warden.sock",
    ]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn a_tampered_byte_damages_only_the_entry_it_touches() {
    let (dir, pw) = store_dir("", "pw");
    let bravo = "B".repeat(200);
    {
        let d = unsealed(dir.path(), &pw);
        let mut c = Raw::lp(&d.socket());
        let t = login(&mut c);
        set(&mut c, &t, "alpha", "first value");
        set(&mut c, &t, "bravo", &bravo);
        set(&mut c, &t, "charlie", "third value");
    }
    let log = dir.path().join("secrets/secrets.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes.windows(5).position(|w| w == b"bravo").unwrap();
    // Past the name and the record's fixed fields, inside bravo's ciphertext.
    bytes[at + 100] ^= 0x40;
    std::fs::write(&log, &bytes).unwrap();
    // And one keyfile copy: the other one opens the store and repairs it.
    let key_a = dir.path().join("secrets/key.a");
    let mut k = std::fs::read(&key_a).unwrap();
    k[20] ^= 1;
    std::fs::write(&key_a, &k).unwrap();

    let d = unsealed(dir.path(), &pw);
    let mut c = Raw::lp(&d.socket());
    let t = login(&mut c);
    assert_eq!(ok(&get(&mut c, &t, "alpha"))["value"], "first value");
    assert_eq!(ok(&get(&mut c, &t, "charlie"))["value"], "third value");
    let r = get(&mut c, &t, "bravo");
    assert_eq!(code(&r), "INTEGRITY_ERROR");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("bravo"),
        "{r}"
    );
    let r = c.call(&json!({"action": "secrets.versions", "token": t, "params": {"key": "bravo"}}));
    assert_eq!(ok(&r)["versions"][0]["damaged"], true);
    let many = c.call(&json!({"action": "get_secrets", "token": t, "keys": ["alpha", "bravo"]}));
    assert_eq!(ok(&many)["secrets"], json!({"alpha": "first value"}));
    assert_eq!(ok(&many)["damaged"], json!(["bravo"]));
    assert_eq!(d.cli(&["secrets", "get", "bravo"]).status.code(), Some(7));
    let at = admin_login(&mut c);
    let r = c.call(&json!({"action": "unseal", "token": at, "params": {"password": "pw"}}));
    assert_eq!(ok(&r)["integrity_errors"], 1, "{r}");
    assert_ne!(std::fs::read(&key_a).unwrap(), k, "key.a was repaired");
    // The entry recovers with a new version; destroying the damaged one clears the report.
    set(&mut c, &t, "bravo", "replaced");
    assert_eq!(ok(&get(&mut c, &t, "bravo"))["value"], "replaced");
    let r = c.call(&json!({"action": "secrets.destroy", "token": t, "params": {"key": "bravo", "versions": [1]}}));
    ok(&r);
    let r = c.call(&json!({"action": "unseal", "token": at, "params": {"password": "pw"}}));
    assert_eq!(ok(&r)["integrity_errors"], 0, "{r}");
}

/// Reads the readable, private, writable mappings of `pid` through /proc/PID/mem (as root)
/// and says whether `needle` is in them.
fn memory_contains(pid: i32, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (mut a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        while a < b {
            let n = ((b - a) as usize).min(buf.len());
            if let Ok(got) = mem.read_at(&mut buf[..n], a) {
                if buf[..got].windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
            // Overlap chunks so a needle across a boundary is found.
            a += (n as u64).saturating_sub(needle.len() as u64).max(1);
        }
    }
    false
}

#[test]
fn unsealed_values_are_not_readable_through_proc_mem_by_the_daemons_own_user() {
    const NOBODY: u32 = 65534;
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = root.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    let d = Daemon::dev_as(NOBODY, NOBODY, &state);
    let value = format!("MEMORY-PROBE-{:032x}", rand::random::<u128>());
    // The daemon attests its peers through /proc, so its clients run as its own user too.
    let as_nobody = |args: &[&str], input: &[u8]| {
        let mut cmd = Command::new(warden_bin());
        cmd.args(args)
            .env("WARDEN_SOCKET", d.socket())
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = as_nobody(&["secrets", "set", "probe"], value.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_nobody(&["secrets", "get", "probe"], b"");
    assert_eq!(stdout(&out).trim_end(), value);

    // The value is in the daemon's memory (root, with CAP_SYS_PTRACE, finds it) ...
    assert!(
        memory_contains(d.core_pid(), value.as_bytes()),
        "the probe is not in memory"
    );
    // ... in locked pages (the store mlocks keys and values) ...
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.core_pid())).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmLck:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(locked_kb > 0, "no locked memory: {status}");
    // ... not dumpable: its /proc files belong to root, not to the daemon's uid, and no core
    // file can be written (limit 0) ...
    assert_eq!(
        std::fs::metadata(format!("/proc/{}/mem", d.core_pid()))
            .unwrap()
            .uid(),
        0
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.core_pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        &core.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "{core}"
    );
    // ... so a process of the same uid cannot open its memory, while it can open that of a
    // dumpable process of that uid (the control).
    let script = format!(
        "sleep 30 & p=$!; dd if=/proc/$p/mem of=/dev/null bs=1 count=0 2>/dev/null && echo CONTROL_OPEN; kill $p; \
         dd if=/proc/{}/mem of=/dev/null bs=1 count=0 && echo DAEMON_OPEN; true",
        d.core_pid()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let (so, se) = (stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(so.contains("CONTROL_OPEN"), "the control failed: {so} {se}");
    assert!(
        !so.contains("DAEMON_OPEN"),
        "the daemon's memory was readable"
    );
    assert!(se.contains("Permission denied"), "{se}");
}

/// Runs `warden ARGS` on a pseudo-terminal (util-linux `script`), answering each prompt with
/// the next of `answers` once it appears; returns everything the terminal showed.
fn on_terminal(args: &str, answers: &[&str]) -> Option<String> {
    use std::io::{Read, Write};
    if Command::new("script").arg("--version").output().is_err() {
        return None;
    }
    let mut child = Command::new("script")
        .args([
            "-qec",
            &format!("{} {args}", warden_bin().display()),
            "/dev/null",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut shown = String::new();
    let mut buf = [0u8; 256];
    for answer in answers {
        // Answer only once the prompt is there: echo is off by then, and nothing typed
        // earlier is flushed away.
        let prompts = shown.matches(": ").count();
        while shown.matches(": ").count() == prompts {
            let n = stdout.read(&mut buf).unwrap();
            assert!(n > 0, "the terminal closed after: {shown}");
            shown.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        stdin.write_all(format!("{answer}\n").as_bytes()).unwrap();
    }
    drop(stdin);
    stdout.read_to_string(&mut shown).unwrap();
    child.wait().unwrap();
    Some(shown)
}

#[test]
fn init_on_a_terminal_asks_twice_and_does_not_echo_the_password() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &base_config(STORE));
    let store = dir.path().join("secrets");
    let args = format!("init --config {}", dir.path().join("warden.toml").display());
    let Some(shown) = on_terminal(&args, &["typed-secret-1", "typed-secret-2"]) else {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    };
    assert!(shown.contains("the two passwords differ"), "{shown}");
    assert!(!store.join("key.a").exists());
    let shown = on_terminal(&args, &["typed-secret-1", "typed-secret-1"]).unwrap();
    assert_eq!(shown.matches("master password").count(), 2, "{shown}");
    assert!(
        !shown.contains("typed-secret"),
        "the password was echoed: {shown}"
    );
    assert!(shown.contains("secret store created"), "{shown}");
    // The password typed is the one that opens the store.
    let pw = dir.path().join("pw");
    write_private(&pw, "typed-secret-1");
    let d = unsealed(dir.path(), &pw);
    let mut c = Raw::lp(&d.socket());
    assert_eq!(ok(&c.call(&json!({"action": "health"})))["sealed"], false);
}

#[test]
fn a_signed_lumo_command_reads_a_secret_under_the_same_policy() {
    let d = Daemon::dev();
    let mut c = Raw::lp(&d.socket());
    let t = login(&mut c);
    set(&mut c, &t, "panel_db", "lumo-visible");
    let key = d.key();
    let mut lumo = |params: &str| {
        c.send_bytes(&lumo_request(&key, "secrets.get", params, now(), &nonce()));
        c.recv().unwrap()
    };
    let r = lumo(r#"{"key":"panel_db"}"#);
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["data"]["value"], "lumo-visible");
    let r = lumo(r#"{"key":"absent"}"#);
    assert_eq!(r["error"]["code"], "NOT_FOUND", "{r}");
}
