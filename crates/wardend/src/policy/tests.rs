use super::*;
use crate::identity::{CertIdentity, ParentProcess, Principal, Transport};

const TOOL_SHA256: &str = "ab0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd";

const POLICY: &str = r#"
[roles.reader]
allow = ["secrets:read:db_*", "system:*"]
deny  = ["secrets:read:db_root"]

[roles.admin]
allow = ["*"]

[roles.ops]
allow = ["commands:service.*", "admin:*"]
deny  = ["admin:reload"]

[roles.web]
allow = ["commands:nginx.reload", "commands:php.*"]

[roles.deploy]
allow = ["jobs:run"]

[roles.hashed]
allow = ["secrets:read:signed_*"]

[roles.timer]
allow = ["jobs:list"]

[roles.builder]
allow = ["jobs:*"]

[roles.agent]
allow = ["secrets:read:agent_*"]

[[rules]]
uid = 33
roles = ["web"]

[[rules]]
user = "alice"
roles = ["reader"]
hmac_key_file = "/etc/warden/alice.key"

[[rules]]
group = "ops"
roles = ["ops"]

[[rules]]
gid = 1500
roles = ["deploy"]

[[rules]]
exe = "/usr/sbin/php-fpm*"
roles = ["web", "reader"]
hmac_key_file = "/etc/warden/panel.key"

[[rules]]
exe_sha256 = "AB0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCD"
roles = ["hashed"]

[[rules]]
unit = "backup-*.service"
roles = ["timer"]

[[rules]]
parent_exe = "/usr/sbin/cron"
roles = ["timer"]

[[rules]]
uid = [1000, 1001]
exe = "/opt/ci/bin/*"
roles = ["builder"]

[[rules]]
user = "root"
roles = ["admin"]

[[rules]]
cert_cn = "agent-*"
roles = ["agent"]
"#;

fn policy(text: &str) -> Result<Policy, PolicyError> {
    Policy::compile(&toml::from_str::<PolicyConfig>(text).expect("valid TOML"))
}

fn fixture() -> Policy {
    policy(POLICY).unwrap()
}

/// A local principal; `f` fills in what the case is about.
fn local(uid: u32, f: impl FnOnce(&mut Principal)) -> Principal {
    let mut p = Principal::synthetic(uid, uid);
    p.pid = Some(4242);
    p.groups = vec![uid];
    f(&mut p);
    p
}

fn named(uid: u32, user: &str) -> Principal {
    local(uid, |p| {
        p.user = Some(user.into());
        p.group_names = vec![user.into()];
    })
}

fn with_exe(uid: u32, exe: &str) -> Principal {
    local(uid, |p| p.exe = Some(exe.into()))
}

fn cert_peer(cn: &str, uid: u32) -> Principal {
    let mut p = Principal::synthetic(uid, uid);
    p.transport = Transport::Gateway;
    p.cert = Some(CertIdentity {
        id: "cd".repeat(32),
        cn: Some(cn.into()),
        sans: vec![],
    });
    p
}

fn allow(role: &str, pattern: &str) -> Decision {
    Decision::Allow {
        role: role.into(),
        pattern: pattern.into(),
    }
}

fn denied_by(role: &str, pattern: &str) -> Decision {
    Decision::Deny {
        reason: DenyReason::DeniedBy {
            role: role.into(),
            pattern: pattern.into(),
        },
    }
}

fn no_rule() -> Decision {
    Decision::Deny {
        reason: DenyReason::NoRule,
    }
}

fn not_granted() -> Decision {
    Decision::Deny {
        reason: DenyReason::NotGranted,
    }
}

#[test]
fn decide_table() {
    let alice = named(1000, "alice");
    let www = local(33, |_| {});
    let carol = local(1002, |p| {
        p.user = Some("carol".into());
        p.group_names = vec!["carol".into(), "ops".into()];
        p.groups = vec![1002, 2000];
    });
    let dave = local(1003, |p| p.gid = 1500);
    let erin = local(1004, |p| p.groups = vec![1004, 1500]);
    let php = with_exe(33, "/usr/sbin/php-fpm8.2");
    let tool = local(1234, |p| {
        p.exe = Some("/usr/local/bin/tool".into());
        p.exe_sha256 = Some(TOOL_SHA256.into());
    });
    let tool_other_hash = local(1234, |p| {
        p.exe = Some("/usr/local/bin/tool".into());
        p.exe_sha256 = Some("00".repeat(32));
    });
    let backup = local(0, |p| p.unit = Some("backup-daily.service".into()));
    let cron_child = local(1234, |p| {
        p.exe = Some("/usr/bin/bash".into());
        p.parents = vec![
            ParentProcess {
                pid: 700,
                exe: Some("/usr/sbin/cron".into()),
                comm: "cron".into(),
            },
            ParentProcess {
                pid: 1,
                exe: Some("/sbin/init".into()),
                comm: "systemd".into(),
            },
        ];
    });
    let root_php = local(0, |p| {
        p.user = Some("root".into());
        p.exe = Some("/usr/sbin/php-fpm8.2".into());
    });
    let root_ops = local(0, |p| {
        p.user = Some("root".into());
        p.group_names = vec!["root".into(), "ops".into()];
    });

    let table: Vec<(&str, Principal, &str, Decision)> = vec![
        (
            "no rule matches: default deny",
            named(65534, "nobody"),
            "system:ping",
            no_rule(),
        ),
        (
            "uid selector",
            www.clone(),
            "commands:nginx.reload",
            allow("web", "commands:nginx.reload"),
        ),
        (
            "glob with '.'",
            www.clone(),
            "commands:php.restart",
            allow("web", "commands:php.*"),
        ),
        (
            "member, permission not granted",
            www.clone(),
            "secrets:read:db_main",
            not_granted(),
        ),
        (
            "user selector, glob on resource",
            alice.clone(),
            "secrets:read:db_main",
            allow("reader", "secrets:read:db_*"),
        ),
        (
            "deny within one role",
            alice.clone(),
            "secrets:read:db_root",
            denied_by("reader", "secrets:read:db_root"),
        ),
        (
            "glob with ':'",
            alice.clone(),
            "system:ping",
            allow("reader", "system:*"),
        ),
        (
            "other verb not granted",
            alice.clone(),
            "secrets:write:db_main",
            not_granted(),
        ),
        (
            "other resource not granted",
            alice.clone(),
            "secrets:read:api_key",
            not_granted(),
        ),
        (
            "supplementary group name",
            carol.clone(),
            "commands:service.restart",
            allow("ops", "commands:service.*"),
        ),
        (
            "admin:* crosses '.'",
            carol.clone(),
            "admin:users.list",
            allow("ops", "admin:*"),
        ),
        (
            "deny beats allow in the same role",
            carol.clone(),
            "admin:reload",
            denied_by("ops", "admin:reload"),
        ),
        (
            "'.' in a pattern is literal",
            carol.clone(),
            "commands:servicex",
            not_granted(),
        ),
        ("primary gid", dave, "jobs:run", allow("deploy", "jobs:run")),
        (
            "supplementary gid",
            erin,
            "jobs:run",
            allow("deploy", "jobs:run"),
        ),
        (
            "exe glob, two roles",
            php.clone(),
            "secrets:read:db_x",
            allow("reader", "secrets:read:db_*"),
        ),
        (
            "exe glob and uid rule both",
            php.clone(),
            "commands:nginx.reload",
            allow("web", "commands:nginx.reload"),
        ),
        (
            "exe in another directory",
            with_exe(1234, "/usr/bin/php-fpm"),
            "system:ping",
            no_rule(),
        ),
        (
            "exe hash, any case",
            tool,
            "secrets:read:signed_x",
            allow("hashed", "secrets:read:signed_*"),
        ),
        (
            "same path, other hash",
            tool_other_hash,
            "secrets:read:signed_x",
            no_rule(),
        ),
        (
            "unit glob",
            backup,
            "jobs:list",
            allow("timer", "jobs:list"),
        ),
        (
            "unit glob mismatch",
            local(0, |p| p.unit = Some("backup.service".into())),
            "jobs:list",
            no_rule(),
        ),
        (
            "parent_exe anywhere in the chain",
            cron_child,
            "jobs:list",
            allow("timer", "jobs:list"),
        ),
        (
            "AND: uid and exe both match",
            with_exe(1001, "/opt/ci/bin/runner"),
            "jobs:run",
            allow("builder", "jobs:*"),
        ),
        (
            "AND: uid matches, exe does not",
            with_exe(1001, "/usr/bin/bash"),
            "jobs:run",
            no_rule(),
        ),
        (
            "AND: exe matches, uid does not",
            with_exe(4000, "/opt/ci/bin/runner"),
            "jobs:run",
            no_rule(),
        ),
        (
            "exe '*' stays in one directory",
            with_exe(1001, "/opt/ci/bin/sub/runner"),
            "jobs:run",
            no_rule(),
        ),
        (
            "deny wins across roles",
            root_php.clone(),
            "secrets:read:db_root",
            denied_by("reader", "secrets:read:db_root"),
        ),
        (
            "first allowing role by name",
            root_php,
            "secrets:read:anything",
            allow("admin", "*"),
        ),
        (
            "deny wins over admin's '*'",
            root_ops,
            "admin:reload",
            denied_by("ops", "admin:reload"),
        ),
        (
            "cert CN glob",
            cert_peer("agent-7", 33),
            "secrets:read:agent_1",
            allow("agent", "secrets:read:agent_*"),
        ),
        (
            "uid selector ignores cert peers",
            cert_peer("agent-7", 33),
            "commands:nginx.reload",
            not_granted(),
        ),
        (
            "cert peer matching nothing",
            cert_peer("web-1", 0),
            "system:ping",
            no_rule(),
        ),
        (
            "cert selector ignores local peers",
            www,
            "secrets:read:agent_1",
            not_granted(),
        ),
    ];

    let policy = fixture();
    let mut failures = Vec::new();
    for (what, principal, permission, want) in &table {
        let got = policy.decide(&policy.grants(principal), permission);
        if &got != want {
            failures.push(format!("{what}: {permission}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn any_true_matches_every_principal_local_or_remote() {
    let p = policy(
        r#"
        [roles.ping]
        allow = ["system:ping"]
        [[rules]]
        any = true
        roles = ["ping"]
        "#,
    )
    .unwrap();
    for who in [Principal::synthetic(65534, 65534), cert_peer("x", 0)] {
        let g = p.grants(&who);
        assert!(p.is_member(&g));
        assert_eq!(p.decide(&g, "system:ping"), allow("ping", "system:ping"));
        assert_eq!(p.decide(&g, "system:reload"), not_granted());
    }
}

fn compile_error(text: &str) -> PolicyError {
    policy(text).expect_err("the policy must be refused")
}

#[test]
fn unknown_role_is_refused_with_the_rule_index() {
    let err = compile_error(
        r#"
        [roles.a]
        allow = ["x"]
        [[rules]]
        uid = 1
        roles = ["a"]
        [[rules]]
        uid = 2
        roles = ["a", "b"]
        "#,
    );
    assert!(
        matches!(&err, PolicyError::UnknownRole { rule: 1, role } if role == "b"),
        "{err:?}"
    );
    assert!(err.to_string().contains("policy.rules[1]"), "{err}");
}

#[test]
fn a_rule_without_selectors_is_refused() {
    let err = compile_error("[roles.a]\n[[rules]]\nroles = [\"a\"]\n");
    assert!(matches!(err, PolicyError::EmptyRule { rule: 0 }), "{err:?}");
    assert!(err.to_string().contains("any = true"), "{err}");
    let err = compile_error("[roles.a]\n[[rules]]\nany = false\nroles = [\"a\"]\n");
    assert!(matches!(err, PolicyError::EmptyRule { rule: 0 }), "{err:?}");
}

#[test]
fn any_next_to_selectors_is_refused() {
    let err = compile_error("[roles.a]\n[[rules]]\nany = true\nuid = 0\nroles = [\"a\"]\n");
    assert!(
        matches!(err, PolicyError::AnyWithSelectors { rule: 0 }),
        "{err:?}"
    );
}

#[test]
fn bad_globs_are_refused_with_rule_index_or_role() {
    let err = compile_error(
        "[roles.a]\n[[rules]]\nuid = 1\nroles = [\"a\"]\n[[rules]]\nexe = \"/usr/bin/[\"\nroles = [\"a\"]\n",
    );
    assert!(
        matches!(&err, PolicyError::BadRuleGlob { rule: 1, field: "exe", pattern, .. } if pattern == "/usr/bin/["),
        "{err:?}"
    );
    let err = compile_error("[roles.a]\nallow = [\"ok\", \"secrets:{read\"]\n");
    assert!(
        matches!(&err, PolicyError::BadRolePattern { role, list: "allow", .. } if role == "a"),
        "{err:?}"
    );
    let err = compile_error("[roles.a]\ndeny = [\"\"]\n");
    assert!(
        matches!(err, PolicyError::EmptyPattern { list: "deny", .. }),
        "{err:?}"
    );
}

#[test]
fn malformed_rules_are_refused() {
    type IsExpected = fn(&PolicyError) -> bool;
    let cases: [(&str, IsExpected); 4] = [
        ("exe_sha256 = \"abc\"\nroles = [\"a\"]", |e| {
            matches!(
                e,
                PolicyError::BadHash {
                    field: "exe_sha256",
                    ..
                }
            )
        }),
        ("uid = []\nroles = [\"a\"]", |e| {
            matches!(e, PolicyError::EmptySelector { field: "uid", .. })
        }),
        ("uid = 1\nroles = []", |e| {
            matches!(e, PolicyError::GrantsNothing { rule: 0 })
        }),
        (
            "uid = 1\nroles = [\"a\"]\nhmac_key_file = \"panel.key\"",
            |e| matches!(e, PolicyError::RelativeKeyFile { rule: 0, .. }),
        ),
    ];
    for (rule, is_expected) in cases {
        let err = compile_error(&format!("[roles.a]\n[[rules]]\n{rule}\n"));
        assert!(is_expected(&err), "{rule}: {err:?}");
    }
}

#[test]
fn hmac_key_file_comes_from_the_first_matching_rule_that_names_one() {
    let p = fixture();
    // www-data's uid rule names no key; its php-fpm exe rule does.
    let g = p.grants(&with_exe(33, "/usr/sbin/php-fpm8.2"));
    assert_eq!(
        p.hmac_key_file(&g),
        Some(std::path::Path::new("/etc/warden/panel.key"))
    );
    // alice running php-fpm: her user rule comes first.
    let alice_php = local(1000, |q| {
        q.user = Some("alice".into());
        q.exe = Some("/usr/sbin/php-fpm8.2".into());
    });
    assert_eq!(
        p.hmac_key_file(&p.grants(&alice_php)),
        Some(std::path::Path::new("/etc/warden/alice.key"))
    );
    assert_eq!(p.hmac_key_file(&p.grants(&local(33, |_| {}))), None);
    assert_eq!(p.hmac_key_file(&p.grants(&local(65534, |_| {}))), None);
}

#[test]
fn allowed_patterns_lists_what_the_allow_lists_reach_under_a_prefix() {
    let p = fixture();
    let alice = p.grants(&named(1000, "alice"));
    assert_eq!(p.allowed_patterns(&alice, "secrets:read:"), vec!["db_*"]);
    assert!(p.allowed_patterns(&alice, "jobs:").is_empty());
    let root = p.grants(&named(0, "root"));
    assert_eq!(p.allowed_patterns(&root, "secrets:read:"), vec!["*"]);
    let nobody = p.grants(&named(65534, "nobody"));
    assert!(p.allowed_patterns(&nobody, "secrets:read:").is_empty());
}

#[test]
fn membership_and_role_names() {
    let p = fixture();
    let php = p.grants(&with_exe(33, "/usr/sbin/php-fpm8.2"));
    assert!(p.is_member(&php));
    assert_eq!(p.role_names(&php), vec!["reader", "web"]);
    let nobody = p.grants(&named(65534, "nobody"));
    assert!(!p.is_member(&nobody));
    assert!(p.role_names(&nobody).is_empty());
}

#[test]
fn grants_from_a_replaced_policy_are_refused() {
    let old = fixture();
    let new = fixture();
    let g = old.grants(&named(1000, "alice"));
    assert!(old.decide(&g, "system:ping").is_allow());
    assert_eq!(
        new.decide(&g, "system:ping"),
        Decision::Deny {
            reason: DenyReason::StaleGrants
        }
    );
    assert!(!new.is_member(&g));
    assert_eq!(new.hmac_key_file(&g), None);
}

#[test]
fn an_empty_policy_denies_everyone() {
    let p = Policy::compile(&PolicyConfig::default()).unwrap();
    let g = p.grants(&Principal::synthetic(0, 0));
    assert_eq!(p.decide(&g, "admin:reload"), no_rule());
}

#[test]
fn the_module_documentation_example_compiles() {
    #[derive(serde::Deserialize)]
    struct Config {
        policy: PolicyConfig,
    }
    let text = r#"
        [policy.roles.reader]
        allow = ["secrets:read:db_*", "system:*"]
        deny  = ["secrets:read:db_root"]

        [[policy.rules]]
        user = "www-data"
        exe = "/usr/sbin/php-fpm*"
        roles = ["reader"]
    "#;
    let cfg: Config = toml::from_str(text).unwrap();
    let p = Policy::compile(&cfg.policy).unwrap();
    let www = local(33, |q| {
        q.user = Some("www-data".into());
        q.exe = Some("/usr/sbin/php-fpm8.2".into());
    });
    assert!(p.decide(&p.grants(&www), "secrets:read:db_main").is_allow());
}

#[test]
fn decisions_explain_themselves() {
    assert_eq!(
        denied_by("reader", "secrets:read:db_root").to_string(),
        "denied: role `reader` denies it (pattern `secrets:read:db_root`)"
    );
    assert_eq!(
        allow("admin", "*").to_string(),
        "allowed by role `admin` (pattern `*`)"
    );
    assert!(no_rule().to_string().contains("no policy rule"));
}

#[test]
fn cert_san_matches_any_san_of_certificate_peers_only() {
    let p = policy(
        r#"
[roles.edge]
allow = ["secrets:read:edge_*"]

[[rules]]
cert_san = ["*.edge.example.org", "10.1.*"]
roles = ["edge"]
"#,
    )
    .unwrap();
    let with_sans = |sans: &[&str]| {
        let mut c = cert_peer("whatever", 33);
        c.cert.as_mut().unwrap().sans = sans.iter().map(|s| s.to_string()).collect();
        c
    };
    let decide = |who: &Principal| p.decide(&p.grants(who), "secrets:read:edge_db");
    assert_eq!(
        decide(&with_sans(&["a.example.com", "n1.edge.example.org"])),
        allow("edge", "secrets:read:edge_*")
    );
    assert_eq!(
        decide(&with_sans(&["10.1.2.3"])),
        allow("edge", "secrets:read:edge_*")
    );
    assert_eq!(decide(&with_sans(&["edge.example.org"])), no_rule());
    assert_eq!(decide(&with_sans(&[])), no_rule());
    assert_eq!(decide(&local(33, |_| {})), no_rule());
}
