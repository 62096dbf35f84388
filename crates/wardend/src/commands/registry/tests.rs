//! The commands executed for real under a temporary directory added to the allowlist, and the
//! attack parameters every file command must refuse before touching anything.

use super::*;
use crate::commands::allowlist::ServiceManagerKind;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

struct Env {
    dir: tempfile::TempDir,
    cfg: CommandsConfig,
    ctx: ExecContext,
    reg: Registry,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CommandsConfig {
            path_prefixes: vec![format!("{}/", dir.path().display())],
            ..CommandsConfig::default()
        };
        cfg.validate().unwrap();
        let ctx = ExecContext::from_config(&cfg);
        Env {
            dir,
            cfg,
            ctx,
            reg: Registry::with_builtin(),
        }
    }
    fn p(&self, rel: &str) -> String {
        format!("{}/{rel}", self.dir.path().display())
    }
    async fn run(&self, cmd: &str, params: Value) -> Result<Value, CommandError> {
        self.reg.run(cmd, &params, &self.cfg, false).await
    }
    async fn dry(&self, cmd: &str, params: Value) -> Result<Value, CommandError> {
        self.reg.run(cmd, &params, &self.cfg, true).await
    }
}

fn mode(p: &str) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn registry_lists_names_aliases_and_schemas() {
    let r = Registry::with_builtin();
    let list = r.list();
    let names: Vec<&str> = list.iter().map(|c| c.name).collect();
    for n in [
        "file.write",
        "file.mkdir",
        "file.delete",
        "file.chmod",
        "service.restart",
        "service.status",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    assert_eq!(r.get("file.create_dir").unwrap().name(), "file.mkdir");
    assert_eq!(r.get("file.set_permissions").unwrap().name(), "file.chmod");
    assert!(r.get("file.nope").is_none());
    let write = list.iter().find(|c| c.name == "file.write").unwrap();
    assert_eq!(write.params["required"], json!(["path", "content"]));
    assert_eq!(write.params["additionalProperties"], json!(false));
    assert!(write.params["properties"]["mode"]["description"].is_string());
    // Introspection output is plain JSON.
    serde_json::to_string(&list).unwrap();
}

#[test]
fn duplicate_names_are_refused() {
    let mut r = Registry::with_builtin();
    assert!(r
        .register(Arc::new(FileMkdir))
        .unwrap_err()
        .contains("file.mkdir"));
}

#[tokio::test]
async fn unknown_commands_and_parameters_are_validation_errors() {
    let env = Env::new();
    let e = env.run("file.format_disk", json!({})).await.unwrap_err();
    assert_eq!(e.code, "VALIDATION_ERROR");
    let e = env
        .run("file.delete", json!({ "path": env.p("a"), "force": true }))
        .await
        .unwrap_err();
    assert_eq!(e.code, "VALIDATION_ERROR");
    assert!(
        e.message.contains("force") && e.message.contains("path"),
        "{}",
        e.message
    );
    let e = env.run("file.delete", json!(["x"])).await.unwrap_err();
    assert_eq!(e.code, "VALIDATION_ERROR");
    let e = env
        .run("file.write", json!({ "path": env.p("a") }))
        .await
        .unwrap_err();
    assert_eq!(e.details.unwrap()["field"], "content");
    let e = env
        .run("file.chmod", json!({ "path": env.p("a"), "mode": 644 }))
        .await
        .unwrap_err();
    assert!(e.message.contains("octal string"), "{}", e.message);
}

#[tokio::test]
async fn file_write_writes_for_real_with_owner_group_and_mode() {
    let env = Env::new();
    let path = env.p("site/index.html");
    let data = env
        .run("file.write", json!({ "path": path, "content": "<h1>hi</h1>", "owner": "nobody", "group": 0, "mode": "0640" }))
        .await
        .unwrap();
    assert_eq!(data, json!({ "path": path, "bytes_written": 11 }));
    assert_eq!(fs::read_to_string(&path).unwrap(), "<h1>hi</h1>");
    assert_eq!(mode(&path), 0o640);
    let md = fs::metadata(&path).unwrap();
    assert_eq!(
        md.uid(),
        nix::unistd::User::from_name("nobody")
            .unwrap()
            .unwrap()
            .uid
            .as_raw()
    );
    assert_eq!(md.gid(), 0);
}

#[tokio::test]
async fn file_write_audit_params_and_plan_never_contain_the_content() {
    let env = Env::new();
    let params =
        json!({ "path": env.p("secret.env"), "content": "DB_PASSWORD=hunter2", "mode": "600" });
    let (cmd, v) = env.reg.prepare("file.write", &params, &env.cfg).unwrap();
    let audit = v.audit_params().to_string();
    assert!(!audit.contains("hunter2"), "{audit}");
    assert!(audit.contains("\"bytes\":19"), "{audit}");
    assert!(!format!("{v:?}").contains("hunter2"));
    let plan = env.dry("file.write", params).await.unwrap();
    assert!(!plan.to_string().contains("hunter2"));
    assert_eq!(
        plan,
        json!({ "dry_run": true, "command": "file.write", "plan": { "steps": [
            { "action": "write_file", "path": env.p("secret.env"), "bytes": 19, "create_parents": true, "mode": "0600" }
        ]}})
    );
    assert!(
        !std::path::Path::new(&env.p("secret.env")).exists(),
        "dry_run must not write"
    );
    assert_eq!(cmd.name(), "file.write");
}

#[tokio::test]
async fn file_mkdir_and_its_alias_create_directories_for_real() {
    let env = Env::new();
    let d = env.p("a/b");
    let data = env
        .run(
            "file.create_dir",
            json!({ "path": d, "mode": "0750", "owner": 65534 }),
        )
        .await
        .unwrap();
    assert_eq!(data, json!({ "path": d, "created": true }));
    assert_eq!(mode(&d), 0o750);
    assert_eq!(fs::metadata(&d).unwrap().uid(), 65534);
    let again = env.run("file.mkdir", json!({ "path": d })).await.unwrap();
    assert_eq!(again["created"], json!(false));
    let e = env
        .run(
            "file.mkdir",
            json!({ "path": env.p("x/y"), "recursive": false }),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "NOT_FOUND");
    let plan = env
        .dry("file.mkdir", json!({ "path": env.p("p/q") }))
        .await
        .unwrap();
    assert_eq!(
        plan["plan"]["steps"][0],
        json!({ "action": "mkdir", "path": env.p("p/q"), "recursive": true })
    );
    assert!(!std::path::Path::new(&env.p("p")).exists());
}

#[tokio::test]
async fn file_delete_removes_files_and_reports_missing_ones() {
    let env = Env::new();
    fs::write(env.p("f"), "x").unwrap();
    assert_eq!(
        env.run("file.delete", json!({ "path": env.p("f") }))
            .await
            .unwrap(),
        json!({ "path": env.p("f"), "deleted": true })
    );
    assert!(!std::path::Path::new(&env.p("f")).exists());
    let missing = env
        .run("file.delete", json!({ "path": env.p("f") }))
        .await
        .unwrap();
    assert_eq!(missing["deleted"], json!(false));
    fs::create_dir(env.p("dir")).unwrap();
    assert_eq!(
        env.run("file.delete", json!({ "path": env.p("dir") }))
            .await
            .unwrap_err()
            .code,
        "VALIDATION_ERROR"
    );
    assert!(std::path::Path::new(&env.p("dir")).is_dir());
}

#[tokio::test]
async fn file_chmod_and_its_alias_change_modes_for_real() {
    let env = Env::new();
    fs::create_dir_all(env.p("t/sub")).unwrap();
    fs::write(env.p("t/sub/f"), "").unwrap();
    let data = env
        .run(
            "file.set_permissions",
            json!({ "path": env.p("t"), "mode": "0751", "recursive": true }),
        )
        .await
        .unwrap();
    assert_eq!(data["files_modified"], json!(3));
    assert_eq!(data["mode"], json!("0751"));
    assert_eq!(mode(&env.p("t/sub/f")), 0o751);
    env.run(
        "file.chmod",
        json!({ "path": env.p("t/sub/f"), "mode": "600" }),
    )
    .await
    .unwrap();
    assert_eq!(mode(&env.p("t/sub/f")), 0o600);
    let e = env
        .run("file.chmod", json!({ "path": env.p("t"), "mode": "4755" }))
        .await
        .unwrap_err();
    assert_eq!(e.code, "VALIDATION_ERROR");
    assert_eq!(mode(&env.p("t")), 0o751);
}

#[tokio::test]
async fn attack_parameters_are_refused_before_anything_happens() {
    let env = Env::new();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir(env.p("real")).unwrap();
    symlink(outside.path(), env.p("link")).unwrap();
    let base = env.p("");
    let attacks: Vec<String> = vec![
        format!("{base}../etc/passwd"),
        format!("{base}real/../../x"),
        format!("{base}link/x"),
        format!("{base}real/x\n"),
        format!("{base}real/x\0"),
        format!("{base}real/x;id"), // a fine file name: no shell is involved, so it is allowed below
        format!("{base}re\u{0430}l/x"),
        format!("{base}{}", "a/".repeat(2100)),
        "/etc/passwd".into(),
        "/etc/shadow".into(),
        "/etc/sudoers.d/x".into(),
        "/root/.ssh/authorized_keys".into(),
        "relative/x".into(),
    ];
    for path in &attacks {
        for (cmd, extra) in [
            ("file.write", json!({ "content": "x" })),
            ("file.mkdir", json!({})),
            ("file.delete", json!({})),
            ("file.chmod", json!({ "mode": "0777" })),
        ] {
            let mut params = extra.clone();
            params["path"] = json!(path);
            let r = env.run(cmd, params).await;
            if path.ends_with(";id") {
                // Metacharacters are harmless in a path handed to a system call, not a shell.
                continue;
            }
            let e = r.expect_err(&format!("{cmd} {path:?} was accepted"));
            assert_eq!(e.code, "VALIDATION_ERROR", "{cmd} {path:?}: {e}");
        }
    }
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    // Owners and modes are attack surfaces too.
    for (k, v) in [
        ("owner", json!("root;id")),
        ("owner", json!(-1)),
        ("group", json!("wh\u{0435}el")),
        ("mode", json!("0644\n")),
    ] {
        let mut params = json!({ "path": env.p("real/y"), "content": "x" });
        params[k] = v.clone();
        let e = env.run("file.write", params).await.unwrap_err();
        assert_eq!(e.code, "VALIDATION_ERROR", "{k}={v}");
    }
    assert!(!std::path::Path::new(&env.p("real/y")).exists());
}

#[tokio::test]
async fn a_symlink_swapped_in_between_validation_and_execution_is_not_followed() {
    let env = Env::new();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir(env.p("d")).unwrap();
    let (cmd, v) = env
        .reg
        .prepare(
            "file.write",
            &json!({ "path": env.p("d/f"), "content": "x" }),
            &env.cfg,
        )
        .unwrap();
    fs::remove_dir(env.p("d")).unwrap();
    symlink(outside.path(), env.p("d")).unwrap();
    let e = cmd.execute(v, &env.ctx).await.unwrap_err();
    assert_eq!(e.code, "VALIDATION_ERROR");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn service_commands_refuse_unlisted_services_and_plan_argv_per_backend() {
    let mut env = Env::new();
    for bad in ["sshd", "nginx;id", "ngin\u{0445}", "../nginx", "-nginx", ""] {
        let e = env
            .run("service.restart", json!({ "service": bad }))
            .await
            .unwrap_err();
        assert_eq!(e.code, "VALIDATION_ERROR", "{bad:?}");
    }
    env.cfg.service_manager = ServiceManagerKind::Sysv;
    let plan = env
        .dry("service.restart", json!({ "service": "nginx" }))
        .await
        .unwrap();
    assert_eq!(
        plan["plan"]["steps"][0],
        json!({ "action": "run", "argv": ["/usr/sbin/service", "nginx", "restart"] })
    );
    let plan = env
        .dry("service.enable", json!({ "service": "nginx" }))
        .await
        .unwrap();
    assert_eq!(
        plan["plan"]["steps"][0]["argv"],
        json!(["/usr/sbin/update-rc.d", "nginx", "enable"])
    );
    env.cfg.service_manager = ServiceManagerKind::Systemd;
    let plan = env
        .dry("service.reload", json!({ "service": "php8.3-fpm" }))
        .await
        .unwrap();
    assert_eq!(
        plan["plan"]["steps"][0]["argv"],
        json!(["systemctl", "reload", "--", "php8.3-fpm"])
    );
    let plan = env
        .dry("service.status", json!({ "service": "nginx" }))
        .await
        .unwrap();
    assert_eq!(
        plan["plan"]["steps"][0]["argv"],
        json!(["systemctl", "is-active", "--", "nginx"])
    );
    env.cfg.services = vec!["my-app".into()];
    assert!(env
        .dry("service.restart", json!({ "service": "nginx" }))
        .await
        .is_err());
    env.dry("service.restart", json!({ "service": "my-app" }))
        .await
        .unwrap();
}

#[tokio::test]
async fn service_execution_maps_exit_codes() {
    let env = Env::new();
    let run = |code: i32, action: ServiceAction| {
        let spec = CommandSpec::new("/bin/sh", ["-c".to_string(), format!("exit {code}")]);
        let v = Validated::new(
            "service.status",
            ServiceArgs {
                service: "nginx".into(),
                manager: "test",
                spec,
            },
            json!({}),
        );
        let cmd = ServiceCommand::new(action);
        let ctx = env.ctx.clone();
        async move { cmd.execute(v, &ctx).await }
    };
    assert_eq!(
        run(0, ServiceAction::Status).await.unwrap()["active"],
        json!(true)
    );
    assert_eq!(
        run(3, ServiceAction::Status).await.unwrap()["active"],
        json!(false)
    );
    assert_eq!(
        run(4, ServiceAction::Status).await.unwrap_err().code,
        "EXECUTION_ERROR"
    );
    assert_eq!(
        run(0, ServiceAction::Restart).await.unwrap()["action"],
        json!("restart")
    );
    assert_eq!(
        run(1, ServiceAction::Restart).await.unwrap_err().code,
        "EXECUTION_ERROR"
    );
}

#[tokio::test]
async fn command_timeout_and_max_output_bytes_settings_reach_execution() {
    let cfg: CommandsConfig =
        toml::from_str("command_timeout = \"300ms\"\nmax_output_bytes = 10").unwrap();
    cfg.validate().unwrap();
    let ctx = ExecContext::from_config(&cfg);
    let e = ctx
        .executor
        .run(&CommandSpec::new("sleep", ["5"]))
        .await
        .unwrap_err();
    assert_eq!(e.code, "TIMEOUT");
    let out = ctx
        .executor
        .run(&CommandSpec::new("echo", ["0123456789abcdef"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"0123456789");
    assert!(out.stdout_truncated);
}

#[test]
fn every_command_of_the_lumo_set_is_registered_with_a_schema() {
    let r = Registry::with_builtin();
    let all = [
        "file.write",
        "file.write_template",
        "file.delete",
        "file.mkdir",
        "file.chmod",
        "file.create_dir",
        "file.set_permissions",
        "service.start",
        "service.stop",
        "service.restart",
        "service.reload",
        "service.enable",
        "service.disable",
        "service.status",
        "package.install",
        "package.remove",
        "package.update",
        "package.add_repository",
        "database.create_db",
        "database.drop_db",
        "database.create_user",
        "ssl.install_cert",
        "ssl.request_letsencrypt",
        "php.install_version",
        "php.remove_version",
        "php.install_extension",
        "php.remove_extension",
        "php.write_ini",
        "nginx.enable_site",
        "nginx.disable_site",
        "nginx.test_config",
        "user.create",
        "user.delete",
    ];
    for n in all {
        let c = r.get(n).unwrap_or_else(|| panic!("{n} is not registered"));
        let s = c.schema();
        assert_eq!(s["type"], "object", "{n}");
        assert_eq!(s["additionalProperties"], false, "{n}");
    }
    assert_eq!(
        r.list().len(),
        all.len() - 2,
        "two of the names are aliases"
    );
}

#[test]
fn templates_cannot_include_files_and_their_work_is_bounded() {
    let ctx = json!({ "name": "x" });
    assert_eq!(
        render_template("t", "hi {{ name }}\n", &ctx).unwrap(),
        "hi x\n"
    );
    let e = render_template("t", "{% include \"/etc/passwd\" %}", &ctx).unwrap_err();
    assert_eq!(e.code, "VALIDATION_ERROR");
    let e = render_template(
        "t",
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        &ctx,
    )
    .unwrap_err();
    assert_eq!(e.code, "VALIDATION_ERROR", "{e}");
    let e = render_template("t", "{{ missing }}", &ctx).unwrap_err();
    assert!(e.message.contains("undefined"), "{e}");
}

#[tokio::test]
async fn paths_with_shell_metacharacters_are_refused() {
    let env = Env::new();
    for bad in [
        "a;b", "a$(id)", "a`id`", "a|b", "a&b", "a>b", "a'b", "a\"b", "a\\b", "a*", "a?",
    ] {
        let e = env
            .run("file.write", json!({ "path": env.p(bad), "content": "x" }))
            .await
            .unwrap_err();
        assert_eq!(e.code, "VALIDATION_ERROR", "{bad}");
        assert!(!std::path::Path::new(&env.p(bad)).exists());
    }
    env.run(
        "file.write",
        json!({ "path": env.p("a b (1).txt"), "content": "x" }),
    )
    .await
    .unwrap();
}

/// docs/commands.md names every command and alias the registry has, and no command it lacks.
#[test]
fn docs_commands_md_lists_every_command_and_alias() {
    let doc = include_str!("../../../../../docs/commands.md");
    let r = Registry::with_builtin();
    for c in r.list() {
        for n in std::iter::once(c.name).chain(c.aliases.iter().copied()) {
            assert!(
                doc.contains(&format!("`{n}`")),
                "docs/commands.md lacks `{n}`"
            );
        }
    }
    let table =
        &doc[doc.find("## The commands").unwrap()..doc.find("## Validation rules").unwrap()];
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = line.split('|').nth(1).unwrap();
        for name in first_cell.split('`').skip(1).step_by(2) {
            if name.contains('.') {
                assert!(
                    r.get(name).is_some(),
                    "documented `{name}` is not a command"
                );
            }
        }
    }
}
