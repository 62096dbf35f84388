//! Privileged commands against the real binary: real execution under temporary directories,
//! `dry_run` plans asserted argument by argument, the policy per command, every `[commands]`
//! setting, SIGHUP, and the attacks every string parameter must refuse before anything runs.
//!
//! Commands that need a real database, nginx or apt are in `commands_services.rs`, switched on
//! by environment variables.

mod common;
use common::*;
use common::{lumo_code as code, lumo_ok as ok};
use serde_json::{json, Value};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A signed Lumo request with the params in serde_json's (sorted) key order; the whole reply.
fn lumo(d: &Daemon, command: &str, params: &Value) -> Value {
    lumo_call(d, command, params, Duration::from_secs(60))
}

fn dry(d: &Daemon, command: &str, mut params: Value) -> Value {
    params["dry_run"] = json!(true);
    let data = ok(&lumo(d, command, &params));
    assert_eq!(data["dry_run"], true);
    data["plan"]["steps"].clone()
}

fn argv(step: &Value) -> Vec<String> {
    assert_eq!(step["action"], "run", "{step}");
    step["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A configured daemon whose file commands act below `{dir}/files/` (and the system
/// directories the fixed-path commands write to), with `{dir}/files/protected.txt` and
/// `{dir}/files/secret/*` protected, templates in `{dir}/templates/`, no command rate limit;
/// `extra` is appended to `[commands]`, `policy` replaces root-may-do-everything.
fn commands_daemon_with(extra: &str, policy: &str) -> Daemon {
    let d = Daemon::configured(&commands_toml(extra, policy));
    for sub in ["files", "templates", "outside"] {
        std::fs::create_dir_all(d.dir.path().join(sub)).unwrap();
    }
    d
}

fn commands_toml(extra: &str, policy: &str) -> String {
    base_config(&format!(
        r#"{policy}
[rate_limits]
commands = "off"

[commands]
path_prefixes = ["{{dir}}/files/", "/var/www/", "/etc/nginx/", "/etc/ssl/", "/etc/php/"]
scratch_prefix = ""
protected_paths = ["{{dir}}/files/protected.txt", "{{dir}}/files/secret/*", "/etc/shadow"]
templates_dir = "{{dir}}/templates/"
{extra}
"#
    ))
}

fn commands_daemon(extra: &str) -> Daemon {
    commands_daemon_with(extra, ROOT_ADMIN)
}

fn files_dir(d: &Daemon) -> PathBuf {
    d.dir.path().join("files")
}

fn p(d: &Daemon, rel: &str) -> String {
    format!("{}/{rel}", files_dir(d).display())
}

fn audit_text(d: &Daemon) -> String {
    std::fs::read_to_string(d.audit_log()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Real execution of the file commands
// ---------------------------------------------------------------------------------------------

#[test]
fn dev_mode_allows_file_commands_in_its_announced_files_dir_only() {
    let d = Daemon::dev();
    let files = PathBuf::from(&d.env["WARDEN_FILES_DIR"]);
    assert_eq!(
        files,
        Path::new(&d.env["WARDEN_STATE_DIR"]).join("files"),
        "WARDEN_FILES_DIR is <state-dir>/files"
    );
    assert!(files.is_dir());
    let f = files.join("site/index.html");
    let data = ok(&lumo(
        &d,
        "file.write",
        &json!({ "path": f, "content": "<h1>dev</h1>", "mode": "0640" }),
    ));
    assert_eq!(data["bytes_written"], 12);
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "<h1>dev</h1>");
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o640);
    // The state directory itself (its key, its audit log) is not writable through commands.
    let key = &d.env["WARDEN_HMAC_KEY_FILE"];
    let before = std::fs::read(key).unwrap();
    let r = lumo(&d, "file.write", &json!({ "path": key, "content": "x" }));
    assert_eq!(code(&r), "VALIDATION_ERROR");
    assert_eq!(std::fs::read(key).unwrap(), before);
}

#[test]
fn file_commands_and_their_seed_aliases_execute_for_real() {
    let d = commands_daemon("");
    let dir = p(&d, "site/assets");
    let data = ok(&lumo(
        &d,
        "file.create_dir",
        &json!({ "path": dir, "mode": "0750", "owner": "nobody", "group": 0 }),
    ));
    assert_eq!(data["created"], true);
    let md = std::fs::metadata(&dir).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o750);
    assert_eq!(
        md.uid(),
        nix::unistd::User::from_name("nobody")
            .unwrap()
            .unwrap()
            .uid
            .as_raw()
    );
    let again = ok(&lumo(&d, "file.mkdir", &json!({ "path": dir })));
    assert_eq!(again["created"], false);

    let f = format!("{dir}/app.css");
    ok(&lumo(
        &d,
        "file.write",
        &json!({ "path": f, "content": "body{}" }),
    ));
    ok(&lumo(
        &d,
        "file.write",
        &json!({ "path": f, "content": "body{color:red}" }),
    ));
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "body{color:red}");
    let data = ok(&lumo(
        &d,
        "file.set_permissions",
        &json!({ "path": p(&d, "site"), "mode": "0700", "recursive": true }),
    ));
    assert_eq!(data["files_modified"], 3);
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o700);
    let data = ok(&lumo(&d, "file.delete", &json!({ "path": f })));
    assert_eq!(data["deleted"], true);
    assert!(!Path::new(&f).exists());
    let data = ok(&lumo(&d, "file.delete", &json!({ "path": f })));
    assert_eq!(data["deleted"], false);

    // Audited under the command's permission, with the registry's redacted parameters.
    let rec = d.wait_audit(|r| r["resource"] == "commands:file.write");
    assert_eq!(rec["method"], "commands.run");
    assert_eq!(rec["params"]["command"], "file.write");
    assert_eq!(rec["params"]["params"]["path"], f);
    let content = rec["params"]["params"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(content.starts_with("<redacted"), "{rec}");
    let alias = d.wait_audit(|r| r["params"]["command"] == "file.mkdir");
    assert_eq!(alias["resource"], "commands:file.mkdir");
    assert!(!audit_text(&d).contains("color:red"));
}

#[test]
fn write_template_renders_from_the_templates_dir_in_a_sandbox() {
    let d = commands_daemon("");
    let t = d.dir.path().join("templates");
    std::fs::write(
        t.join("vhost.conf"),
        "server_name {{ domain }};\n{% for u in upstreams %}server {{ u }};\n{% endfor %}",
    )
    .unwrap();
    std::fs::write(t.join("evil.conf"), "{% include \"/etc/passwd\" %}").unwrap();
    symlink("/etc/passwd", t.join("link.conf")).unwrap();
    let out = p(&d, "vhost.conf");
    let data = ok(&lumo(
        &d,
        "file.write_template",
        &json!({ "path": out, "template": "vhost.conf", "mode": "0644",
                 "context": { "domain": "shop.example", "upstreams": ["10.0.0.1", "10.0.0.2"] } }),
    ));
    assert_eq!(data["path"], out);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "server_name shop.example;\nserver 10.0.0.1;\nserver 10.0.0.2;\n"
    );
    let bad = p(&d, "bad.conf");
    for (template, context) in [
        ("evil.conf", json!({})),
        ("link.conf", json!({})),
        ("vhost.conf", json!({ "domain": "x" })), // `upstreams` undefined
        ("../warden.toml", json!({})),
        ("missing.conf", json!({})),
    ] {
        let r = lumo(
            &d,
            "file.write_template",
            &json!({ "path": bad, "template": template, "context": context }),
        );
        assert_eq!(code(&r), "VALIDATION_ERROR", "{template}: {r}");
    }
    assert!(!Path::new(&bad).exists());
    assert!(!audit_text(&d).contains("root:x:0:0"));
}

// ---------------------------------------------------------------------------------------------
// dry_run
// ---------------------------------------------------------------------------------------------

#[test]
fn dry_run_returns_the_exact_plan_and_executes_nothing() {
    // The table replaces the default one (15 minutes for apt and certbot), so every apt command
    // here waits command_timeout for the dpkg lock except package.install.
    let d = commands_daemon(
        "service_manager = \"sysv\"\ncommand_timeout = \"2m\"\ncommand_timeouts = { \"package.install\" = \"7m\" }",
    );
    let f = p(&d, "never.txt");
    let steps = dry(
        &d,
        "file.write",
        json!({ "path": f, "content": "abc", "mode": "0600" }),
    );
    assert_eq!(
        steps,
        json!([{ "action": "write_file", "path": f, "bytes": 3, "create_parents": true, "mode": "0600" }])
    );
    assert!(!Path::new(&f).exists());

    let apt_opts = [
        "-y",
        "-q",
        "-o",
        "DPkg::Lock::Timeout=120",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ];
    let apt = |verb: &str, tail: &[&str]| -> Vec<String> {
        let mut v = vec!["apt-get".to_string(), verb.to_string()];
        v.extend(apt_opts.iter().map(|s| s.to_string()));
        if verb == "install" && tail.first() == Some(&"nginx") {
            v[5] = "DPkg::Lock::Timeout=420".into();
        }
        if verb == "install" {
            v.push("--no-install-recommends".into());
        }
        v.extend(tail.iter().map(|s| s.to_string()));
        v
    };
    let steps = dry(
        &d,
        "package.install",
        json!({ "packages": ["nginx", "curl=7.88.1-10"] }),
    );
    assert_eq!(
        argv(&steps[0]),
        apt("install", &["nginx", "curl=7.88.1-10"])
    );
    assert_eq!(
        steps[0]["env"],
        json!([
            ["DEBIAN_FRONTEND", "noninteractive"],
            ["APT_LISTCHANGES_FRONTEND", "none"]
        ])
    );
    let steps = dry(
        &d,
        "package.remove",
        json!({ "packages": ["redis-server"], "purge": true }),
    );
    assert_eq!(argv(&steps[0]), apt("purge", &["redis-server"]));
    let steps = dry(&d, "package.update", json!({}));
    assert_eq!(argv(&steps[0]), apt("update", &[]));
    let steps = dry(
        &d,
        "package.add_repository",
        json!({ "repository": "ppa:ondrej/php" }),
    );
    assert_eq!(
        argv(&steps[0]),
        ["add-apt-repository", "-y", "ppa:ondrej/php"]
    );
    let steps = dry(&d, "php.install_version", json!({ "version": "8.3" }));
    assert_eq!(
        argv(&steps[0]),
        apt("install", &["php8.3-fpm", "php8.3-cli", "php8.3-common"])
    );
    let steps = dry(
        &d,
        "php.remove_extension",
        json!({ "version": "8.2", "extension": "redis" }),
    );
    assert_eq!(argv(&steps[0]), apt("remove", &["php8.2-redis"]));
    let steps = dry(
        &d,
        "php.write_ini",
        json!({ "version": "8.3", "settings": { "memory_limit": "256M", "display_errors": false } }),
    );
    assert_eq!(steps[0]["action"], "write_file");
    assert_eq!(steps[0]["path"], "/etc/php/8.3/fpm/conf.d/99-warden.ini");
    assert_eq!(steps[0]["create_parents"], false);

    let steps = dry(
        &d,
        "ssl.request_letsencrypt",
        json!({ "domain": "Shop.Example.com", "email": "ops@example.com", "webroot": "/var/www/shop", "staging": true }),
    );
    assert_eq!(
        argv(&steps[0]),
        [
            "certbot",
            "certonly",
            "--webroot",
            "--webroot-path",
            "/var/www/shop",
            "--domain",
            "shop.example.com",
            "--email",
            "ops@example.com",
            "--agree-tos",
            "--non-interactive",
            "--no-eff-email",
            "--staging"
        ]
    );

    let steps = dry(
        &d,
        "database.create_db",
        json!({ "name": "shop", "type": "mysql" }),
    );
    assert_eq!(
        argv(&steps[0]),
        [
            "mysql",
            "--batch",
            "--skip-column-names",
            "--user=root",
            "--execute=CREATE DATABASE `shop` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ]
    );
    let steps = dry(
        &d,
        "database.drop_db",
        json!({ "name": "shop", "type": "postgresql" }),
    );
    assert_eq!(
        argv(&steps[0]),
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "--dbname=postgres",
            "--command=DROP DATABASE \"shop\""
        ]
    );
    let password = "Tr0ub4dor&3-horse";
    let steps = dry(
        &d,
        "database.create_user",
        json!({ "username": "shop", "password": password, "database": "shop", "type": "mysql" }),
    );
    assert_eq!(
        argv(&steps[0]),
        ["mysql", "--batch", "--skip-column-names", "--user=root"]
    );
    assert!(steps[0]["stdin_bytes"].as_u64().unwrap() > password.len() as u64);

    let steps = dry(
        &d,
        "user.create",
        json!({ "username": "site1", "shell": "/bin/bash", "groups": ["www-data"] }),
    );
    assert_eq!(
        argv(&steps[0]),
        [
            "useradd",
            "--create-home",
            "--home-dir",
            "/home/site1",
            "--shell",
            "/bin/bash",
            "--groups",
            "www-data",
            "--",
            "site1"
        ]
    );

    let steps = dry(&d, "service.restart", json!({ "service": "nginx" }));
    assert_eq!(argv(&steps[0]), ["/usr/sbin/service", "nginx", "restart"]);
    let steps = dry(&d, "service.enable", json!({ "service": "php8.3-fpm" }));
    assert_eq!(
        argv(&steps[0]),
        ["/usr/sbin/update-rc.d", "php8.3-fpm", "enable"]
    );
    let steps = dry(
        &d,
        "nginx.enable_site",
        json!({ "site_name": "shop.example.com" }),
    );
    assert_eq!(
        steps,
        json!([
            { "action": "symlink", "path": "/etc/nginx/sites-enabled/shop.example.com",
              "target": "/etc/nginx/sites-available/shop.example.com" },
            { "action": "run", "argv": ["nginx", "-t"] },
            { "action": "run", "argv": ["/usr/sbin/service", "nginx", "reload"] },
        ])
    );
    let steps = dry(
        &d,
        "nginx.disable_site",
        json!({ "site_name": "shop.example.com" }),
    );
    assert_eq!(
        steps[0],
        json!({ "action": "unlink", "path": "/etc/nginx/sites-enabled/shop.example.com" })
    );
    let steps = dry(&d, "nginx.test_config", json!({}));
    assert_eq!(argv(&steps[0]), ["nginx", "-t"]);

    // Nothing secret in a plan or the audit log.
    assert!(!audit_text(&d).contains(password));
}

#[test]
fn service_manager_setting_selects_systemctl_or_service() {
    let d = commands_daemon("service_manager = \"systemd\"");
    let steps = dry(&d, "service.reload", json!({ "service": "php8.2-fpm" }));
    assert_eq!(argv(&steps[0]), ["systemctl", "reload", "--", "php8.2-fpm"]);
    let steps = dry(&d, "service.status", json!({ "service": "nginx" }));
    assert_eq!(argv(&steps[0]), ["systemctl", "is-active", "--", "nginx"]);
    let steps = dry(&d, "nginx.enable_site", json!({ "site_name": "a.example" }));
    assert_eq!(argv(&steps[2]), ["systemctl", "reload", "--", "nginx"]);
    // `auto` on this machine: systemd only when PID 1 is systemd.
    let auto = commands_daemon("");
    let pid1 = std::fs::read_link("/proc/1/exe")
        .map(|p| p.file_name().is_some_and(|n| n == "systemd"))
        .unwrap_or(false);
    let steps = dry(&auto, "service.start", json!({ "service": "nginx" }));
    let expected: &[&str] = if pid1 {
        &["systemctl", "start", "--", "nginx"]
    } else {
        &["/usr/sbin/service", "nginx", "start"]
    };
    assert_eq!(argv(&steps[0]), expected);
}

// ---------------------------------------------------------------------------------------------
// The warden dialect, the CLI, the policy, compatibility
// ---------------------------------------------------------------------------------------------

#[test]
fn commands_list_and_run_work_in_the_warden_dialect_and_the_cli() {
    let d = commands_daemon("");
    let mut c = Raw::lp(&d.socket());
    let token = login(&mut c);
    let r = c.call(&json!({ "action": "commands.list", "token": token, "id": 1 }));
    assert_eq!(r["status"], "ok", "{r}");
    let list = r["data"]["commands"].as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for n in [
        "file.write",
        "user.create",
        "database.create_user",
        "nginx.test_config",
        "ssl.install_cert",
    ] {
        assert!(names.contains(&n), "{n} missing");
    }
    let write = list.iter().find(|c| c["name"] == "file.write").unwrap();
    assert_eq!(write["params"]["required"], json!(["path", "content"]));
    let mkdir = list.iter().find(|c| c["name"] == "file.mkdir").unwrap();
    assert_eq!(mkdir["aliases"], json!(["file.create_dir"]));

    let f = p(&d, "w.txt");
    let r = c.call(&json!({ "action": "commands.run", "token": token, "id": 2,
        "params": { "command": "file.write", "params": { "path": f, "content": "via warden" } } }));
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "via warden");
    let r = c.call(&json!({ "action": "commands.run", "token": token, "id": 3,
        "params": { "command": "file.delete", "params": { "path": f }, "dry_run": true } }));
    assert_eq!(r["data"]["plan"]["steps"][0]["action"], "delete", "{r}");
    assert!(Path::new(&f).exists(), "dry_run deleted nothing");
    // A command name is also a method name of its own.
    let r = c.call(
        &json!({ "action": "file.delete", "token": token, "id": 4, "params": { "path": f } }),
    );
    assert_eq!(r["data"]["deleted"], true, "{r}");
    let r = c.call(&json!({ "action": "commands.run", "token": token, "id": 5,
        "params": { "command": "disk.format", "params": {} } }));
    assert_eq!(r["error"]["code"], "VALIDATION_ERROR", "{r}");
    let r = c
        .call(&json!({ "action": "file.write", "id": 6, "params": { "path": f, "content": "x" } }));
    assert_eq!(r["error"]["code"], "AUTH_REQUIRED", "{r}");

    let out = d.cli(&["commands", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("file.mkdir (") && text.contains("[alias file.create_dir]"),
        "{text}"
    );
    assert!(text.contains("user.create ("), "{text}");

    let g = p(&d, "cli.txt");
    let out = d.cli(&[
        "run",
        "file.write",
        &format!("path={g}"),
        "content=from the cli",
        "mode=0600",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["path"], g);
    assert_eq!(std::fs::read_to_string(&g).unwrap(), "from the cli");
    assert_eq!(std::fs::metadata(&g).unwrap().mode() & 0o777, 0o600);
    // A value that parses as JSON is sent as JSON: an object is not file content.
    let out = d.cli(&[
        "run",
        "file.write",
        &format!("path={g}"),
        "content={\"a\":1}",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`content` must be a string"));
    assert_eq!(std::fs::read_to_string(&g).unwrap(), "from the cli");
    let out = d.cli(&["run", "file.write", "path=/etc/shadow", "content=x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("VALIDATION_ERROR"), "{err}");
    let out = d.cli(&["run", "service.restart", "service=sshd", "dry_run=true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the allowlist"));
}

#[test]
fn the_policy_authorizes_each_command_by_name() {
    let policy = r#"
[policy.roles.panel]
allow = ["system:*", "commands:file.*", "commands:list"]
deny = ["commands:file.delete"]

[[policy.rules]]
uid = 0
roles = ["panel"]
"#;
    let d = commands_daemon_with("", policy);
    let f = p(&d, "a.txt");
    ok(&lumo(
        &d,
        "file.write",
        &json!({ "path": f, "content": "x" }),
    ));
    ok(&lumo(
        &d,
        "file.create_dir",
        &json!({ "path": p(&d, "dir") }),
    ));
    let r = lumo(&d, "file.delete", &json!({ "path": f }));
    assert_eq!(code(&r), "AUTH_ERROR");
    assert!(Path::new(&f).exists());
    let rec = d.wait_audit(|r| r["resource"] == "commands:file.delete");
    assert_eq!(rec["result"], "denied");
    let r = lumo(
        &d,
        "service.status",
        &json!({ "service": "nginx", "dry_run": true }),
    );
    assert_eq!(code(&r), "AUTH_ERROR");
    // securityd/warden dialect: the same decision, spelled ACCESS_DENIED.
    let mut c = Raw::lp(&d.socket());
    let token = login(&mut c);
    let r = c.call(&json!({ "action": "commands.run", "token": token,
        "params": { "command": "file.delete", "params": { "path": f } } }));
    assert_eq!(r["error"]["code"], "ACCESS_DENIED", "{r}");
}

#[test]
fn a_client_signing_params_in_its_own_key_order_works_for_multi_key_commands() {
    let d = commands_daemon("");
    let f = p(&d, "order.txt");
    // Not sorted (sorted would be content, mode, path), signed over exactly these bytes.
    let params = format!("{{\"path\":\"{f}\",\"mode\":\"0640\",\"content\":\"as sent\"}}");
    let mut raw = Raw::lp(&d.socket());
    raw.send_bytes(&lumo_request(
        &d.key(),
        "file.write",
        &params,
        now(),
        &nonce(),
    ));
    let r = raw.recv().unwrap();
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "as sent");
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o640);
    // A canonical signature over the same params sent in that order verifies too.
    let canonical =
        serde_json::to_string(&json!({ "path": f, "mode": "0600", "content": "canon" })).unwrap();
    let ts = now();
    let n = nonce();
    let sig = warden_wire::hmac::sign_hex(&d.key(), "file.write", &canonical, ts, &n);
    let sent = format!("{{\"path\":\"{f}\",\"mode\":\"0600\",\"content\":\"canon\"}}");
    let frame = format!("{{\"command\":\"file.write\",\"params\":{sent},\"timestamp\":{ts},\"nonce\":\"{n}\",\"signature\":\"{sig}\"}}");
    raw.send_bytes(frame.as_bytes());
    let r = raw.recv().unwrap();
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "canon");
    // A signature over different params does not.
    let n = nonce();
    let sig = warden_wire::hmac::sign_hex(&d.key(), "file.write", "{}", ts, &n);
    let frame = format!("{{\"command\":\"file.write\",\"params\":{sent},\"timestamp\":{ts},\"nonce\":\"{n}\",\"signature\":\"{sig}\"}}");
    raw.send_bytes(frame.as_bytes());
    assert_eq!(code(&raw.recv().unwrap()), "AUTH_ERROR");
}

// ---------------------------------------------------------------------------------------------
// Attacks
// ---------------------------------------------------------------------------------------------

/// Every string parameter of every command, with what an attacker would put there. Each must be
/// refused with `expect` (`VALIDATION_ERROR` unless the command has its own code), nothing
/// executed (no marker file, no file outside, protected files unchanged), and audited.
#[test]
fn every_string_parameter_refuses_attacks_before_anything_runs() {
    let d = commands_daemon("");
    let base = files_dir(&d);
    let outside = d.dir.path().join("outside");
    let marker = d.dir.path().join("pwned");
    let m = marker.display().to_string();
    std::fs::write(base.join("protected.txt"), "keep").unwrap();
    std::fs::create_dir_all(base.join("secret")).unwrap();
    std::fs::write(base.join("secret/a"), "keep").unwrap();
    symlink(&outside, base.join("link")).unwrap();
    std::fs::write(outside.join("target"), "keep").unwrap();
    symlink(outside.join("target"), base.join("filelink")).unwrap();
    std::fs::write(d.dir.path().join("templates/ok.conf"), "x").unwrap();
    let f = |rel: &str| p(&d, rel);
    let long = "a".repeat(5000);
    let inj = [
        format!(";touch {m}"),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("|touch {m}"),
    ];

    // Values tried on every path parameter.
    let mut bad_paths: Vec<String> = vec![
        f("../outside/x"),
        f("a/../../outside/x"),
        f("link/x"),
        f("protected.txt"),
        f("secret/a"),
        f("secret"),
        "/etc/shadow".into(),
        "/etc/passwd".into(),
        "relative/x".into(),
        f("a\nb"),
        f("a\0b"),
        f(&long),
        f("sіte/x"), // Cyrillic і
        f("a//b"),
        f("./a"),
        "".into(),
    ];
    bad_paths.extend(inj.iter().map(|i| f(&format!("x{i}"))));

    let mut cases: Vec<(&str, Value, &str)> = Vec::new();
    for bp in &bad_paths {
        cases.push((
            "file.write",
            json!({ "path": bp, "content": "x" }),
            "VALIDATION_ERROR",
        ));
        cases.push(("file.mkdir", json!({ "path": bp }), "VALIDATION_ERROR"));
        cases.push((
            "file.chmod",
            json!({ "path": bp, "mode": "0777" }),
            "VALIDATION_ERROR",
        ));
        cases.push(("file.delete", json!({ "path": bp }), "VALIDATION_ERROR"));
        cases.push((
            "file.write_template",
            json!({ "path": bp, "template": "ok.conf", "context": {} }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "ssl.request_letsencrypt",
            json!({ "domain": "a.example", "email": "a@a.example", "webroot": bp }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "user.create",
            json!({ "username": "wardenx", "home_dir": bp }),
            "VALIDATION_ERROR",
        ));
    }
    // The last component a symlink: file.chmod and file.mkdir refuse it; file.write replaces
    // the link itself (tested below), never writing through it.
    cases.push((
        "file.chmod",
        json!({ "path": f("filelink"), "mode": "0777" }),
        "VALIDATION_ERROR",
    ));
    cases.push((
        "file.mkdir",
        json!({ "path": f("filelink") }),
        "VALIDATION_ERROR",
    ));
    cases.push((
        "file.write",
        json!({ "path": f("filelink"), "content": "x" }),
        "VALIDATION_ERROR",
    ));
    cases.push((
        "file.delete",
        json!({ "path": f("link") }),
        "VALIDATION_ERROR",
    ));

    let mut names = vec![
        "".to_string(),
        "a\nb".into(),
        "a\0b".into(),
        long.clone(),
        "ngіnx".into(), // Cyrillic і
        "../x".into(),
        "-x".into(),
        "a b".into(),
    ];
    names.extend(inj.iter().map(|i| format!("x{i}")));
    for n in &names {
        let n = n.as_str();
        cases.push((
            "service.restart",
            json!({ "service": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "package.install",
            json!({ "packages": [n] }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "package.remove",
            json!({ "packages": ["nginx", n] }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "package.add_repository",
            json!({ "repository": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "database.create_db",
            json!({ "name": n, "type": "mysql" }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "database.drop_db",
            json!({ "name": n, "type": "postgresql" }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "database.create_db",
            json!({ "name": "shop", "type": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "database.create_user",
            json!({ "username": n, "password": "s3cretpass", "database": "shop", "type": "mysql" }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "database.create_user",
            json!({ "username": "shop", "password": "s3cretpass", "database": n, "type": "mysql" }),
            "VALIDATION_ERROR",
        ));
        cases.push(("user.create", json!({ "username": n }), "VALIDATION_ERROR"));
        cases.push((
            "user.create",
            json!({ "username": "wardenx", "shell": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "user.create",
            json!({ "username": "wardenx", "groups": [n] }),
            "VALIDATION_ERROR",
        ));
        cases.push(("user.delete", json!({ "username": n }), "VALIDATION_ERROR"));
        cases.push(("ssl.install_cert", json!({ "domain": n, "certificate": "-----BEGIN CERTIFICATE-----", "private_key": "-----BEGIN PRIVATE KEY-----" }), "VALIDATION_ERROR"));
        cases.push((
            "ssl.request_letsencrypt",
            json!({ "domain": n, "email": "a@a.example", "webroot": "/var/www/a" }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "ssl.request_letsencrypt",
            json!({ "domain": "a.example", "email": n, "webroot": "/var/www/a" }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "php.install_version",
            json!({ "version": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "php.install_extension",
            json!({ "version": "8.3", "extension": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "php.write_ini",
            json!({ "version": "8.3", "settings": { n: "1" } }),
            "VALIDATION_ERROR",
        ));
        // A quoted php.ini value may hold spaces, dashes and slashes; not these.
        if n.contains(['\n', '\0', ';', '$', '`']) || !n.is_ascii() || n.len() > 256 {
            cases.push((
                "php.write_ini",
                json!({ "version": "8.3", "settings": { "memory_limit": format!("1{n}") } }),
                "VALIDATION_ERROR",
            ));
        }
        cases.push((
            "nginx.enable_site",
            json!({ "site_name": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "nginx.disable_site",
            json!({ "site_name": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "file.write_template",
            json!({ "path": f("t.out"), "template": n, "context": {} }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "file.write",
            json!({ "path": f("o.txt"), "content": "x", "owner": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "file.mkdir",
            json!({ "path": f("o"), "group": n }),
            "VALIDATION_ERROR",
        ));
        cases.push((
            "file.chmod",
            json!({ "path": f("o"), "mode": n }),
            "VALIDATION_ERROR",
        ));
    }
    // Outside the allowlists, reserved names, dangerous values.
    let allowlist_cases: Vec<(&str, Value, &str)> = vec![
        (
            "service.stop",
            json!({ "service": "sshd" }),
            "VALIDATION_ERROR",
        ),
        (
            "service.start",
            json!({ "service": "nginx.service" }),
            "VALIDATION_ERROR",
        ),
        (
            "package.install",
            json!({ "packages": ["openssh-server"] }),
            "VALIDATION_ERROR",
        ),
        (
            "package.install",
            json!({ "packages": ["nginx", "nginx"] }),
            "VALIDATION_ERROR",
        ),
        (
            "package.install",
            json!({ "packages": (0..21).map(|i| format!("php8.3-x{i}")).collect::<Vec<_>>() }),
            "VALIDATION_ERROR",
        ),
        (
            "package.install",
            json!({ "packages": ["php7.4-fpm"] }),
            "VALIDATION_ERROR",
        ),
        (
            "package.install",
            json!({ "packages": ["nginx=1.0;rm"] }),
            "VALIDATION_ERROR",
        ),
        (
            "package.add_repository",
            json!({ "repository": "ppa:attacker/evil" }),
            "VALIDATION_ERROR",
        ),
        (
            "package.add_repository",
            json!({ "repository": "deb http://evil.example/ stable main" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.create_db",
            json!({ "name": "mysql", "type": "mysql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.drop_db",
            json!({ "name": "postgres", "type": "postgresql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.drop_db",
            json!({ "name": "pg_catalog", "type": "postgresql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.create_user",
            json!({ "username": "root", "password": "s3cretpass", "database": "shop", "type": "mysql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.create_user",
            json!({ "username": "shop", "password": "x' OR '1'='1", "database": "shop", "type": "mysql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.create_user",
            json!({ "username": "shop", "password": "abcdefgh\\", "database": "shop", "type": "postgresql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.create_user",
            json!({ "username": "shop", "password": "abc\ndefgh", "database": "shop", "type": "postgresql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.create_user",
            json!({ "username": "shop", "password": "short", "database": "shop", "type": "mysql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.create_user",
            json!({ "username": "shop", "password": "abcdefgh\0", "database": "shop", "type": "mysql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.create_user",
            json!({ "username": "shop", "password": "pässwörd-long", "database": "shop", "type": "mysql" }),
            "VALIDATION_ERROR",
        ),
        (
            "database.create_user",
            json!({ "username": "shop", "password": "x".repeat(129), "database": "shop", "type": "mysql" }),
            "VALIDATION_ERROR",
        ),
        (
            "ssl.install_cert",
            json!({ "domain": "a.example", "certificate": "-----BEGIN CERTIFICATE-----", "private_key": "-----BEGIN PRIVATE KEY-----", "chain": "not pem" }),
            "VALIDATION_ERROR",
        ),
        (
            "ssl.install_cert",
            json!({ "domain": "a.example", "certificate": "-----BEGIN CERTIFICATE-----", "private_key": "-----BEGIN PRIVATE KEY-----", "chain": "-----BEGIN CERTIFICATE-----\u{1b}[2J" }),
            "VALIDATION_ERROR",
        ),
        (
            "user.create",
            json!({ "username": "root" }),
            "VALIDATION_ERROR",
        ),
        (
            "user.create",
            json!({ "username": "www-data" }),
            "VALIDATION_ERROR",
        ),
        (
            "user.create",
            json!({ "username": "Alice" }),
            "VALIDATION_ERROR",
        ),
        (
            "user.create",
            json!({ "username": "wardenx", "shell": "/tmp/evil" }),
            "VALIDATION_ERROR",
        ),
        (
            "user.create",
            json!({ "username": "wardenx", "groups": ["sudo"] }),
            "VALIDATION_ERROR",
        ),
        (
            "user.create",
            json!({ "username": "wardenx", "groups": ["root"] }),
            "VALIDATION_ERROR",
        ),
        (
            "user.create",
            json!({ "username": "wardenx", "home_dir": "/etc/wardenx" }),
            "VALIDATION_ERROR",
        ),
        (
            "user.delete",
            json!({ "username": "root" }),
            "VALIDATION_ERROR",
        ),
        (
            "user.delete",
            json!({ "username": "nobody" }),
            "VALIDATION_ERROR",
        ),
        (
            "user.delete",
            json!({ "username": "sys" }),
            "VALIDATION_ERROR",
        ),
        (
            "user.delete",
            json!({ "username": "warden-no-such-user" }),
            "NOT_FOUND",
        ),
        (
            "php.install_version",
            json!({ "version": "7.4" }),
            "VALIDATION_ERROR",
        ),
        (
            "php.install_extension",
            json!({ "version": "8.3", "extension": "evil" }),
            "VALIDATION_ERROR",
        ),
        (
            "php.write_ini",
            json!({ "version": "8.3", "settings": { "disable_functions": "" } }),
            "VALIDATION_ERROR",
        ),
        (
            "php.write_ini",
            json!({ "version": "8.3", "settings": { "auto_prepend_file": "/tmp/x.php" } }),
            "VALIDATION_ERROR",
        ),
        (
            "php.write_ini",
            json!({ "version": "8.3", "settings": { "extension": "evil.so" } }),
            "VALIDATION_ERROR",
        ),
        (
            "php.write_ini",
            json!({ "version": "8.3", "settings": { "memory_limit": "1\nextension=evil.so" } }),
            "VALIDATION_ERROR",
        ),
        (
            "php.write_ini",
            json!({ "version": "8.3", "settings": { "memory_limit": "${HOME}" } }),
            "VALIDATION_ERROR",
        ),
        (
            "php.write_ini",
            json!({ "version": "8.3", "settings": { "memory_limit": "1\"\nx=\"" } }),
            "VALIDATION_ERROR",
        ),
        (
            "nginx.enable_site",
            json!({ "site_name": "../../shadow" }),
            "VALIDATION_ERROR",
        ),
        (
            "nginx.enable_site",
            json!({ "site_name": "a/b" }),
            "VALIDATION_ERROR",
        ),
        (
            "nginx.enable_site",
            json!({ "site_name": ".." }),
            "VALIDATION_ERROR",
        ),
        (
            "ssl.install_cert",
            json!({ "domain": "a.example", "certificate": "not a cert", "private_key": "-----BEGIN PRIVATE KEY-----" }),
            "VALIDATION_ERROR",
        ),
        (
            "ssl.install_cert",
            json!({ "domain": "a.example", "certificate": "-----BEGIN CERTIFICATE-----", "private_key": "x\0" }),
            "VALIDATION_ERROR",
        ),
        (
            "ssl.install_cert",
            json!({ "domain": "127.0.0.1", "certificate": "-----BEGIN CERTIFICATE-----", "private_key": "-----BEGIN PRIVATE KEY-----" }),
            "VALIDATION_ERROR",
        ),
        (
            "ssl.request_letsencrypt",
            json!({ "domain": "-a.example", "email": "a@a.example", "webroot": "/var/www/a" }),
            "VALIDATION_ERROR",
        ),
        (
            "file.chmod",
            json!({ "path": f("o"), "mode": "4755" }),
            "VALIDATION_ERROR",
        ),
        (
            "file.chmod",
            json!({ "path": f("o"), "mode": "0999" }),
            "VALIDATION_ERROR",
        ),
        (
            "file.write",
            json!({ "path": f("o.txt"), "content": "x", "owner": "no-such-user-x" }),
            "VALIDATION_ERROR",
        ),
        (
            "file.write",
            json!({ "path": f("o.txt"), "content": "x", "mode": 777 }),
            "VALIDATION_ERROR",
        ),
        (
            "file.write",
            json!({ "path": f("o.txt"), "content": "x", "force": true }),
            "VALIDATION_ERROR",
        ),
        (
            "file.format",
            json!({ "path": f("o.txt") }),
            "VALIDATION_ERROR",
        ),
        (
            "system.shell",
            json!({ "cmd": format!("touch {m}") }),
            "VALIDATION_ERROR",
        ),
    ];
    cases.extend(allowlist_cases);

    let mut raw = Raw::lp(&d.socket());
    let mut ids = Vec::new();
    for (cmd, params, expect) in &cases {
        let pj = serde_json::to_string(params).unwrap();
        raw.send_bytes(&lumo_request(&d.key(), cmd, &pj, now(), &nonce()));
        let r = raw.recv().expect("a reply");
        assert_eq!(r["success"], false, "{cmd} {params}: {r}");
        assert_eq!(r["error"]["code"], *expect, "{cmd} {params}: {r}");
        ids.push((r["request_id"].as_str().unwrap().to_string(), *expect, *cmd));
    }
    assert!(!marker.exists(), "an injected command ran");
    assert_eq!(
        std::fs::read_to_string(base.join("protected.txt")).unwrap(),
        "keep"
    );
    assert_eq!(
        std::fs::read_to_string(base.join("secret/a")).unwrap(),
        "keep"
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("target")).unwrap(),
        "keep"
    );
    let outside_entries: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside_entries.len(), 1, "{outside_entries:?}");
    assert_eq!(
        std::fs::metadata(base.join("protected.txt"))
            .unwrap()
            .mode()
            & 0o777,
        0o644
    );
    assert!(
        !base.join("o.txt").exists() && !base.join("o").exists() && !base.join("t.out").exists()
    );

    // Each refusal is in the audit log, with its code.
    let records = d.audit_lines();
    for (id, expect, cmd) in &ids {
        let rec = records
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no audit record for {cmd} {id}"));
        assert_eq!(rec["code"], *expect, "{rec}");
        assert_eq!(rec["result"], "error", "{rec}");
    }
    assert!(!audit_text(&d).contains("s3cretpass"));

    assert!(std::fs::symlink_metadata(base.join("filelink"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::symlink_metadata(base.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_symlink_swapped_in_during_writes_never_redirects_them() {
    let d = commands_daemon("");
    let base = files_dir(&d);
    let outside = d.dir.path().join("outside");
    let flip = base.join("flip");
    std::fs::create_dir(&flip).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (base, outside, stop) = (base.clone(), outside.clone(), stop.clone());
        std::thread::spawn(move || {
            let (flip, aside, link) = (
                base.join("flip"),
                base.join("flip.dir"),
                base.join("flip.lnk"),
            );
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = symlink(&outside, &link);
                let _ = std::fs::rename(&flip, &aside);
                let _ = std::fs::rename(&link, &flip);
                std::thread::yield_now();
                let _ = std::fs::rename(&flip, &link);
                let _ = std::fs::rename(&aside, &flip);
                swaps += 1;
            }
            swaps
        })
    };
    let mut raw = Raw::lp(&d.socket());
    let (mut written, mut refused) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut i = 0;
    while Instant::now() < deadline || i < 100 {
        let params = json!({ "path": format!("{}/f{i}", flip.display()), "content": "x" });
        raw.send_bytes(&lumo_request(
            &d.key(),
            "file.write",
            &serde_json::to_string(&params).unwrap(),
            now(),
            &nonce(),
        ));
        let r = raw.recv().unwrap();
        if r["success"] == true {
            written += 1;
        } else {
            let c = r["error"]["code"].as_str().unwrap();
            assert!(
                ["VALIDATION_ERROR", "NOT_FOUND", "EXECUTION_ERROR"].contains(&c),
                "{r}"
            );
            refused += 1;
        }
        i += 1;
        if i > 2000 {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = flipper.join().unwrap();
    assert!(swaps > 10, "the race ran ({swaps} swaps)");
    let leaked: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leaked.is_empty(),
        "writes went through the symlink: {leaked:?} ({written} written, {refused} refused)"
    );
    assert!(written + refused >= 100);
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

fn settings_toml(first: bool) -> String {
    let (services, packages, special) = if first {
        ("[\"warden-test-a\"]", "[\"hello\"]", "false")
    } else {
        ("[\"nginx\"]", "[\"nginx\"]", "true")
    };
    base_config(&format!(
        r#"{ROOT_ADMIN}
[rate_limits]
commands = "off"

[commands]
path_prefixes = ["{{dir}}/files/"]
scratch_prefix = "{{dir}}/scratch/"
protected_paths = ["{{dir}}/files/keep.txt"]
services = {services}
packages = {packages}
repositories = ["ppa:warden/test"]
php_versions = ["8.9"]
php_extensions = ["swoole", "fpm", "cli", "common"]
shells = ["/usr/bin/fish"]
home_prefixes = ["{{dir}}/homes/"]
allow_special_modes = {special}
templates_dir = "{{dir}}/tpl/"
"#
    ))
}

#[test]
fn every_commands_setting_is_applied_and_sighup_updates_them() {
    let d = Daemon::configured(&settings_toml(true));
    let dir = d.dir.path().to_path_buf();
    std::fs::create_dir_all(dir.join("files")).unwrap();
    std::fs::create_dir_all(dir.join("tpl")).unwrap();
    std::fs::write(dir.join("tpl/t"), "v={{ v }}").unwrap();
    let refused = |cmd: &str, params: Value| {
        let r = lumo(&d, cmd, &params);
        assert_eq!(code(&r), "VALIDATION_ERROR", "{cmd} {params}");
    };
    let f = |rel: &str| format!("{}/{rel}", dir.display());
    // path_prefixes, scratch_prefix, protected_paths
    ok(&lumo(
        &d,
        "file.write",
        &json!({ "path": f("files/a"), "content": "1" }),
    ));
    ok(&lumo(
        &d,
        "file.write",
        &json!({ "path": f("scratch/a"), "content": "1" }),
    ));
    assert_eq!(std::fs::read_to_string(dir.join("scratch/a")).unwrap(), "1");
    refused(
        "file.write",
        json!({ "path": "/var/www/warden-test", "content": "1" }),
    );
    refused(
        "file.write",
        json!({ "path": "/tmp/lumo/warden-test", "content": "1" }),
    );
    refused(
        "file.write",
        json!({ "path": f("files/keep.txt"), "content": "1" }),
    );
    // templates_dir
    ok(&lumo(
        &d,
        "file.write_template",
        &json!({ "path": f("files/t"), "template": "t", "context": { "v": 7 } }),
    ));
    assert_eq!(std::fs::read_to_string(dir.join("files/t")).unwrap(), "v=7");
    // services, packages, repositories, php_versions, php_extensions, shells, home_prefixes
    let dry_ok = |cmd: &str, mut params: Value| {
        params["dry_run"] = json!(true);
        ok(&lumo(&d, cmd, &params));
    };
    let dry_refused = |cmd: &str, mut params: Value| {
        params["dry_run"] = json!(true);
        refused(cmd, params);
    };
    dry_ok("service.status", json!({ "service": "warden-test-a" }));
    dry_refused("service.status", json!({ "service": "nginx" }));
    dry_ok("package.install", json!({ "packages": ["hello"] }));
    dry_refused("package.install", json!({ "packages": ["nginx"] }));
    dry_ok("package.install", json!({ "packages": ["php8.9-swoole"] }));
    dry_refused("package.install", json!({ "packages": ["php8.3-swoole"] }));
    dry_ok(
        "package.add_repository",
        json!({ "repository": "ppa:warden/test" }),
    );
    dry_refused(
        "package.add_repository",
        json!({ "repository": "ppa:ondrej/php" }),
    );
    dry_ok("php.install_version", json!({ "version": "8.9" }));
    dry_refused("php.install_version", json!({ "version": "8.3" }));
    dry_ok(
        "php.install_extension",
        json!({ "version": "8.9", "extension": "swoole" }),
    );
    dry_refused(
        "php.install_extension",
        json!({ "version": "8.9", "extension": "redis" }),
    );
    dry_ok(
        "user.create",
        json!({ "username": "wardenx", "shell": "/usr/bin/fish", "home_dir": f("homes/wardenx") }),
    );
    dry_refused(
        "user.create",
        json!({ "username": "wardenx", "shell": "/bin/bash", "home_dir": f("homes/wardenx") }),
    );
    dry_refused(
        "user.create",
        json!({ "username": "wardenx", "shell": "/usr/bin/fish" }),
    ); // /home/ not allowed
       // allow_special_modes
    refused(
        "file.chmod",
        json!({ "path": f("files/a"), "mode": "2755" }),
    );

    // SIGHUP swaps the whole [commands] section.
    std::fs::write(
        d.config_path(),
        settings_toml(false).replace("{dir}", dir.to_str().unwrap()),
    )
    .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = lumo(
            &d,
            "service.status",
            &json!({ "service": "nginx", "dry_run": true }),
        );
        if r["success"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "reload not applied: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    dry_refused("service.status", json!({ "service": "warden-test-a" }));
    dry_refused("package.install", json!({ "packages": ["hello"] }));
    dry_ok("package.install", json!({ "packages": ["nginx"] }));
    ok(&lumo(
        &d,
        "file.chmod",
        &json!({ "path": f("files/a"), "mode": "2755" }),
    ));
    assert_eq!(
        std::fs::metadata(dir.join("files/a")).unwrap().mode() & 0o7777,
        0o2755
    );
    // A reload with a bad [commands] section keeps the running one.
    std::fs::write(
        d.config_path(),
        settings_toml(false)
            .replace("{dir}", dir.to_str().unwrap())
            .replace("shells = [\"/usr/bin/fish\"]", "shells = [\"fish\"]"),
    )
    .unwrap();
    let out = d.cli(&["daemon", "reload"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("commands.shells"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dry_ok("package.install", json!({ "packages": ["nginx"] }));
}

/// A SysV init script in /etc/init.d (what `service NAME ACTION` runs), removed on drop.
struct InitScript {
    script: PathBuf,
    name: String,
}

impl InitScript {
    fn new(kind: &str, body: &str) -> InitScript {
        let name = format!("warden-test-{kind}-{}", std::process::id());
        let script = Path::new("/etc/init.d").join(&name);
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        InitScript { script, name }
    }
}

impl Drop for InitScript {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
    }
}

#[test]
fn command_timeout_command_timeouts_and_max_output_bytes_bound_the_tools_warden_runs() {
    if !is_root() || !Path::new("/usr/sbin/service").exists() {
        eprintln!("skipped: needs root and /usr/sbin/service");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("survived");
    // Hangs, with a grandchild that leaves a marker unless the whole process group is killed.
    // `restart` takes 3 s: longer than command_timeout, within its own command_timeouts entry.
    let hang = InitScript::new(
        "hang",
        &format!(
            "if [ \"$1\" = restart ]; then sleep 3; exit 0; fi\n(sleep 2; touch {}) &\nsleep 30",
            marker.display()
        ),
    );
    // Fails after a flood of diagnostics.
    let chatty = InitScript::new(
        "chatty",
        "head -c 100000 /dev/zero | tr '\\0' e >&2\nexit 4",
    );
    let d = commands_daemon(&format!(
        "service_manager = \"sysv\"\ncommand_timeout = \"1s\"\ncommand_timeouts = {{ \"service.restart\" = \"30s\" }}\nmax_output_bytes = 10\nservices = [\"{}\", \"{}\"]",
        hang.name, chatty.name
    ));
    let started = Instant::now();
    let r = lumo(&d, "service.status", &json!({ "service": hang.name }));
    assert_eq!(code(&r), "TIMEOUT", "{r}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let data = ok(&lumo(
        &d,
        "service.restart",
        &json!({ "service": hang.name }),
    ));
    assert_eq!(data["action"], "restart");
    let r = lumo(&d, "service.status", &json!({ "service": chatty.name }));
    assert_eq!(code(&r), "EXECUTION_ERROR", "{r}");
    assert_eq!(r["error"]["details"]["exit"], json!({ "code": 4 }), "{r}");
    assert_eq!(
        r["error"]["details"]["stderr"], "eeeeeeeeee",
        "10 bytes kept"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !marker.exists(),
        "a process of the tool's group survived the timeout"
    );
}

// ---------------------------------------------------------------------------------------------
// Real execution: users and certificates
// ---------------------------------------------------------------------------------------------

struct ThrowawayUser(String);

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel").arg(&self.0).output();
        let _ = std::fs::remove_dir_all(format!("/home/{}", self.0));
    }
}

#[test]
fn user_create_and_delete_a_throwaway_user_for_real() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = commands_daemon("");
    let name = format!("wdt{}", rand::random::<u32>() % 1_000_000);
    let guard = ThrowawayUser(name.clone());
    let data = ok(&lumo(
        &d,
        "user.create",
        &json!({ "username": name, "shell": "/bin/sh", "groups": ["www-data"] }),
    ));
    assert_eq!(data["home_dir"], format!("/home/{name}"));
    let u = nix::unistd::User::from_name(&name)
        .unwrap()
        .expect("the user exists");
    assert_eq!(u.shell, Path::new("/bin/sh"));
    assert!(u.uid.as_raw() >= 1000);
    assert!(Path::new(&format!("/home/{name}")).is_dir());
    let www = nix::unistd::Group::from_name("www-data").unwrap().unwrap();
    assert!(www.mem.contains(&name), "added to www-data");
    let r = lumo(&d, "user.create", &json!({ "username": name }));
    assert_eq!(code(&r), "USER_EXISTS");
    ok(&lumo(&d, "user.delete", &json!({ "username": name })));
    assert!(nix::unistd::User::from_name(&name).unwrap().is_none());
    let r = lumo(&d, "user.delete", &json!({ "username": name }));
    assert_eq!(code(&r), "NOT_FOUND");
    drop(guard);
}

fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn ssl_install_cert_checks_the_key_matches_and_installs_for_real() {
    if !is_root()
        || std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs root and openssl");
        return;
    }
    let d = commands_daemon("");
    let t = tempfile::tempdir().unwrap();
    let tp = |n: &str| t.path().join(n).display().to_string();
    let domain = format!("warden-test-{}.example.com", rand::random::<u32>());
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &tp("key.pem"),
        "-out",
        &tp("cert.pem"),
        "-days",
        "1",
        "-subj",
        &format!("/CN={domain}"),
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &tp("other.pem"),
    ]);
    let cert = std::fs::read_to_string(tp("cert.pem")).unwrap();
    let key = std::fs::read_to_string(tp("key.pem")).unwrap();
    let other = std::fs::read_to_string(tp("other.pem")).unwrap();
    let target = PathBuf::from(format!("/etc/ssl/warden/{domain}"));
    let cleanup = RemoveDir(target.clone());

    let r = lumo(
        &d,
        "ssl.install_cert",
        &json!({ "domain": domain, "certificate": cert, "private_key": other }),
    );
    assert_eq!(code(&r), "VALIDATION_ERROR");
    assert_eq!(r["error"]["details"]["field"], "private_key", "{r}");
    assert!(!target.exists(), "nothing written for a mismatched key");

    let data = ok(&lumo(
        &d,
        "ssl.install_cert",
        &json!({ "domain": domain, "certificate": cert, "private_key": key, "chain": cert }),
    ));
    assert_eq!(data["installed"], true);
    assert_eq!(
        std::fs::read_to_string(target.join("privkey.pem")).unwrap(),
        key
    );
    assert_eq!(
        std::fs::metadata(target.join("privkey.pem"))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_to_string(target.join("cert.pem")).unwrap(),
        cert
    );
    assert_eq!(
        std::fs::read_to_string(target.join("fullchain.pem")).unwrap(),
        format!("{cert}{cert}")
    );
    let audit = audit_text(&d);
    assert!(
        !audit.contains("PRIVATE KEY") && !audit.contains("BEGIN CERTIFICATE"),
        "key material in the audit log"
    );
    drop(cleanup);
    // Only if no other certificate is installed there.
    let _ = std::fs::remove_dir(Path::new("/etc/ssl/warden"));
}
