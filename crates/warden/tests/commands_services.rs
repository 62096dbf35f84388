//! Privileged commands against real services of this machine, each switched on by a variable
//! (`.ci/run` sets them all): `WARDEN_TEST_MYSQL=1` (local MariaDB/MySQL, root over the socket),
//! `WARDEN_TEST_POSTGRES=1` (local PostgreSQL, the `postgres` superuser), `WARDEN_TEST_NGINX=1`
//! (Debian's nginx, driven through its SysV script), `WARDEN_TEST_APT=1` (installs and removes
//! the tiny `hello` package). Without them each test says it was skipped and passes.

mod common;
use common::*;
use common::{lumo_code as code, lumo_ok as ok};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn enabled(var: &str) -> bool {
    let on = std::env::var(var).as_deref() == Ok("1");
    if !on {
        eprintln!("skipped: set {var}=1 to run this test against the real service");
    }
    on
}

fn lumo(d: &Daemon, command: &str, params: &Value) -> Value {
    lumo_call(d, command, params, Duration::from_secs(900))
}

fn daemon(extra: &str) -> Daemon {
    Daemon::configured(&base_config(&format!(
        "{ROOT_ADMIN}\n[rate_limits]\ncommands = \"off\"\n\n[commands]\nservice_manager = \"sysv\"\ncommand_timeout = \"10m\"\n{extra}\n"
    )))
}

fn sh(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", rand::random::<u32>() % 100_000_000)
}

// ---------------------------------------------------------------------------------------------
// database.*
// ---------------------------------------------------------------------------------------------

fn mysql(sql: &str) -> (bool, String) {
    sh(
        "mysql",
        &["--batch", "--skip-column-names", "--user=root", "-e", sql],
    )
}

struct MysqlCleanup(String);

impl Drop for MysqlCleanup {
    fn drop(&mut self) {
        let _ = mysql(&format!(
            "DROP DATABASE IF EXISTS `{0}`; DROP USER IF EXISTS '{0}'@'localhost'",
            self.0
        ));
    }
}

#[test]
fn database_commands_create_and_drop_for_real_in_mysql() {
    if !enabled("WARDEN_TEST_MYSQL") {
        return;
    }
    let d = daemon("");
    let name = unique("wdt_");
    let _cleanup = MysqlCleanup(name.clone());
    let password = "Corr3ct-Horse-Battery";
    let data = ok(&lumo(
        &d,
        "database.create_db",
        &json!({ "name": name, "type": "mysql" }),
    ));
    assert_eq!(data["created"], true);
    let (_, out) = mysql(&format!("SHOW DATABASES LIKE '{name}'"));
    assert_eq!(out.trim(), name);
    let r = lumo(
        &d,
        "database.create_db",
        &json!({ "name": name, "type": "mysql" }),
    );
    assert_eq!(code(&r), "EXECUTION_ERROR");
    ok(&lumo(
        &d,
        "database.create_user",
        &json!({ "username": name, "password": password, "database": name, "type": "mysql" }),
    ));
    // The new user logs in with that password and reaches its database.
    let (logged_in, out) = sh(
        "mysql",
        &[
            "--batch",
            "--skip-column-names",
            &format!("--user={name}"),
            &format!("--password={password}"),
            &name,
            "-e",
            "CREATE TABLE t (i INT); SELECT COUNT(*) FROM t",
        ],
    );
    assert!(logged_in, "{out}");
    assert_eq!(out.trim(), "0");
    let (refused, _) = sh(
        "mysql",
        &[
            &format!("--user={name}"),
            "--password=wrong-password",
            &name,
            "-e",
            "SELECT 1",
        ],
    );
    assert!(!refused, "a wrong password is refused");
    let data = ok(&lumo(
        &d,
        "database.drop_db",
        &json!({ "name": name, "type": "mysql" }),
    ));
    assert_eq!(data["dropped"], true);
    let (_, out) = mysql(&format!("SHOW DATABASES LIKE '{name}'"));
    assert_eq!(out.trim(), "");
    assert!(!std::fs::read_to_string(d.audit_log())
        .unwrap()
        .contains(password));
}

fn psql(db: &str, sql: &str) -> (bool, String) {
    sh(
        "runuser",
        &[
            "-u", "postgres", "--", "psql", "-X", "-A", "-t", "-q", "-d", db, "-c", sql,
        ],
    )
}

struct PgCleanup(String);

impl Drop for PgCleanup {
    fn drop(&mut self) {
        let _ = psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS \"{}\"", self.0),
        );
        let _ = psql("postgres", &format!("DROP ROLE IF EXISTS \"{}\"", self.0));
    }
}

#[test]
fn database_commands_create_and_drop_for_real_in_postgresql() {
    if !enabled("WARDEN_TEST_POSTGRES") {
        return;
    }
    let d = daemon("");
    let name = unique("wdt_");
    let _cleanup = PgCleanup(name.clone());
    ok(&lumo(
        &d,
        "database.create_db",
        &json!({ "name": name, "type": "postgresql" }),
    ));
    let (_, out) = psql(
        "postgres",
        &format!("SELECT datname FROM pg_database WHERE datname = '{name}'"),
    );
    assert_eq!(out.trim(), name);
    ok(&lumo(
        &d,
        "database.create_user",
        &json!({ "username": name, "password": "Corr3ct-Horse-Battery", "database": name, "type": "postgresql" }),
    ));
    let (_, out) = psql(
        "postgres",
        &format!(
            "SELECT rolcanlogin, rolpassword IS NOT NULL, has_database_privilege('{name}', '{name}', 'CREATE') FROM pg_authid WHERE rolname = '{name}'"
        ),
    );
    assert_eq!(out.trim(), "t|t|t");
    let (_, out) = psql(
        &name,
        &format!("SELECT has_schema_privilege('{name}', 'public', 'CREATE')"),
    );
    assert_eq!(out.trim(), "t");
    // A user that exists already: the transaction is rolled back, the error reported.
    let r = lumo(
        &d,
        "database.create_user",
        &json!({ "username": name, "password": "Corr3ct-Horse-Battery", "database": name, "type": "postgresql" }),
    );
    assert_eq!(code(&r), "EXECUTION_ERROR");
    let _ = psql(
        "postgres",
        &format!("REASSIGN OWNED BY \"{name}\" TO postgres"),
    );
    let _ = psql(&name, &format!("DROP OWNED BY \"{name}\""));
    ok(&lumo(
        &d,
        "database.drop_db",
        &json!({ "name": name, "type": "postgresql" }),
    ));
    let (_, out) = psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
    );
    assert_eq!(out.trim(), "0");
}

// ---------------------------------------------------------------------------------------------
// nginx.* and service.*
// ---------------------------------------------------------------------------------------------

fn nginx_running() -> bool {
    sh("/usr/sbin/service", &["nginx", "status"]).0
}

/// Removes the test's site files and links, and leaves nginx running or stopped as it was.
struct NginxCleanup {
    sites: Vec<String>,
    was_running: bool,
}

impl Drop for NginxCleanup {
    fn drop(&mut self) {
        for s in &self.sites {
            let _ = std::fs::remove_file(format!("/etc/nginx/sites-enabled/{s}"));
            let _ = std::fs::remove_file(format!("/etc/nginx/sites-available/{s}"));
        }
        let action = if self.was_running { "reload" } else { "stop" };
        let _ = sh("/usr/sbin/service", &["nginx", action]);
    }
}

fn http_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: warden-test\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn nginx_and_service_commands_drive_a_real_nginx_through_its_sysv_script() {
    if !enabled("WARDEN_TEST_NGINX") {
        return;
    }
    assert!(
        Path::new("/etc/init.d/nginx").exists(),
        "nginx is not installed (.ci/run installs it)"
    );
    let d = daemon("");
    let good = unique("warden-test-");
    let bad = format!("{good}-bad");
    let port = 20000 + (rand::random::<u16>() % 20000);
    let _cleanup = NginxCleanup {
        sites: vec![good.clone(), bad.clone()],
        was_running: nginx_running(),
    };
    let avail = |s: &str| format!("/etc/nginx/sites-available/{s}");
    let enabled_link = |s: &str| format!("/etc/nginx/sites-enabled/{s}");
    ok(&lumo(
        &d,
        "file.write",
        &json!({ "path": avail(&good), "content": format!(
            "server {{\n    listen 127.0.0.1:{port};\n    server_name warden-test;\n    location / {{ return 200 \"served by {good}\\n\"; }}\n}}\n"
        ) }),
    ));
    ok(&lumo(
        &d,
        "file.write",
        &json!({ "path": avail(&bad), "content": "server { listen 127.0.0.1:1; this_is_not_a_directive; }\n" }),
    ));

    let data = ok(&lumo(&d, "service.start", &json!({ "service": "nginx" })));
    assert_eq!(data["manager"], "sysv");
    let st = ok(&lumo(&d, "service.status", &json!({ "service": "nginx" })));
    assert_eq!(st["active"], true);

    let r = lumo(&d, "nginx.enable_site", &json!({ "site_name": bad }));
    assert_eq!(code(&r), "CONFIG_INVALID");
    assert!(
        r["error"]["details"]["stderr"]
            .as_str()
            .unwrap()
            .contains("this_is_not_a_directive"),
        "{r}"
    );
    assert!(
        std::fs::symlink_metadata(enabled_link(&bad)).is_err(),
        "a failed enabling is undone"
    );

    let data = ok(&lumo(
        &d,
        "nginx.enable_site",
        &json!({ "site_name": good }),
    ));
    assert_eq!(data["changed"], true);
    assert_eq!(
        std::fs::read_link(enabled_link(&good)).unwrap(),
        Path::new(&avail(&good))
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = http_get(port).unwrap_or_default();
        if body.contains(&format!("served by {good}")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the enabled site is not served: {body:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = ok(&lumo(
        &d,
        "nginx.enable_site",
        &json!({ "site_name": good }),
    ));
    assert_eq!(again["changed"], false);
    let t = ok(&lumo(&d, "nginx.test_config", &json!({})));
    assert_eq!(t["valid"], true);

    ok(&lumo(
        &d,
        "nginx.disable_site",
        &json!({ "site_name": good }),
    ));
    assert!(std::fs::symlink_metadata(enabled_link(&good)).is_err());
    let r = lumo(&d, "nginx.disable_site", &json!({ "site_name": good }));
    assert_eq!(code(&r), "SITE_NOT_FOUND");
    let r = lumo(
        &d,
        "nginx.enable_site",
        &json!({ "site_name": format!("{good}-missing") }),
    );
    assert_eq!(code(&r), "SITE_NOT_FOUND");

    ok(&lumo(&d, "service.restart", &json!({ "service": "nginx" })));
    ok(&lumo(&d, "service.stop", &json!({ "service": "nginx" })));
    let st = ok(&lumo(&d, "service.status", &json!({ "service": "nginx" })));
    assert_eq!(st["active"], false);
    assert!(!nginx_running());
    for s in [&good, &bad] {
        ok(&lumo(&d, "file.delete", &json!({ "path": avail(s) })));
    }
}

// ---------------------------------------------------------------------------------------------
// package.*
// ---------------------------------------------------------------------------------------------

const PACKAGE: &str = "hello";

fn installed(pkg: &str) -> bool {
    let (_, out) = sh("dpkg-query", &["-W", "-f=${Status}", pkg]);
    out.contains("install ok installed")
}

/// Puts the package back as it was found.
struct PackageState(bool);

impl Drop for PackageState {
    fn drop(&mut self) {
        let verb = if self.0 { "install" } else { "purge" };
        let _ = Command::new("apt-get")
            .args([verb, "-y", "-q", PACKAGE])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
    }
}

#[test]
fn package_install_and_remove_a_small_debian_package_for_real() {
    if !enabled("WARDEN_TEST_APT") {
        return;
    }
    let d = daemon(&format!("packages = [\"{PACKAGE}\"]"));
    let _restore = PackageState(installed(PACKAGE));
    if installed(PACKAGE) {
        ok(&lumo(
            &d,
            "package.remove",
            &json!({ "packages": [PACKAGE], "purge": true }),
        ));
    }
    assert!(!installed(PACKAGE));
    let mut r = lumo(&d, "package.install", &json!({ "packages": [PACKAGE] }));
    if r["success"] != true {
        // Stale package lists on a fresh machine: refresh them through warden, then retry.
        ok(&lumo(&d, "package.update", &json!({})));
        r = lumo(&d, "package.install", &json!({ "packages": [PACKAGE] }));
    }
    let data = ok(&r);
    assert_eq!(data["action"], "installed");
    assert!(installed(PACKAGE));
    let (ran, out) = sh("/usr/bin/hello", &[]);
    assert!(ran && out.contains("Hello, world!"), "{out}");
    let data = ok(&lumo(
        &d,
        "package.remove",
        &json!({ "packages": [PACKAGE], "purge": true }),
    ));
    assert_eq!(data["purged"], true);
    assert!(!installed(PACKAGE));
    let r = lumo(&d, "package.install", &json!({ "packages": ["nginx"] }));
    assert_eq!(
        code(&r),
        "VALIDATION_ERROR",
        "outside this daemon's allowlist"
    );
}
