//! Commands that are a fixed sequence of subprocesses: `package.*`, `php.*` (but `write_ini`),
//! `database.*`, `user.*`, `ssl.request_letsencrypt`.
//!
//! Each is one row of [`ArgvCommand`]: its parameters and a `build` function that validates
//! them and returns the exact argv lists to run. Validation builds the lists, the plan shows
//! them, and execution runs those very lists in order, stopping at the first failure; so a
//! `dry_run` plan is what would have executed, argument by argument.

use super::{param_error, schema, Params};
use crate::commands::allowlist::CommandsConfig;
use crate::commands::exec::{CommandSpec, Plan, Step};
use crate::commands::validate::{self, ValidationError};
use crate::commands::{codes, Command, CommandError, ExecContext, Validated};
use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use std::sync::Arc;

/// `(name, JSON type, required, description)`.
type ParamRow = (&'static str, &'static str, bool, &'static str);

type Build = fn(&Params<'_>, &CommandsConfig) -> Result<Built, CommandError>;

/// What `build` returns: the subprocesses, the redacted parameters for the audit log, the result
/// on success, and exit codes of particular steps that mean a documented error code.
pub(super) struct Built {
    steps: Vec<CommandSpec>,
    audit: Value,
    result: Value,
    exit_codes: &'static [(i32, &'static str, &'static str)],
}

/// A command made of subprocesses. See the module documentation.
pub struct ArgvCommand {
    name: &'static str,
    description: &'static str,
    params: &'static [ParamRow],
    build: Build,
}

impl std::fmt::Debug for ArgvCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

struct RunArgs {
    steps: Vec<CommandSpec>,
    result: Value,
    exit_codes: &'static [(i32, &'static str, &'static str)],
}

impl Command for ArgvCommand {
    fn name(&self) -> &'static str {
        self.name
    }
    fn description(&self) -> &'static str {
        self.description
    }
    fn schema(&self) -> Value {
        let rows: Vec<(&str, Value, bool, &str)> = self
            .params
            .iter()
            .map(|(n, t, r, d)| {
                let ty = match *t {
                    "array" => json!({ "type": "array", "items": { "type": "string" } }),
                    "object" => json!({ "type": "object" }),
                    t => json!(t),
                };
                (*n, ty, *r, *d)
            })
            .collect();
        schema(&rows)
    }
    fn validate(&self, params: &Value, cfg: &CommandsConfig) -> Result<Validated, CommandError> {
        let known: Vec<&str> = self.params.iter().map(|p| p.0).collect();
        let p = Params::new(params, &known)?;
        let built = (self.build)(&p, cfg)?;
        Ok(Validated::new(
            self.name,
            RunArgs {
                steps: built.steps,
                result: built.result,
                exit_codes: built.exit_codes,
            },
            built.audit,
        ))
    }
    fn plan(&self, v: &Validated) -> Result<Plan, CommandError> {
        let a = v.args::<RunArgs>()?;
        Ok(Plan::new(a.steps.iter().map(Step::from).collect()))
    }
    fn execute<'a>(
        &'a self,
        v: Validated,
        ctx: &'a ExecContext,
    ) -> BoxFuture<'a, Result<Value, CommandError>> {
        Box::pin(async move {
            let a = v.into_args::<RunArgs>()?;
            for spec in &a.steps {
                let out = ctx.executor.run(spec).await?;
                if let crate::commands::exec::Exit::Code(c) = out.exit {
                    if let Some((_, code, msg)) = a
                        .exit_codes
                        .iter()
                        .find(|(prog_code, _, _)| *prog_code == c && c != 0)
                    {
                        let stderr = out.stderr_excerpt();
                        return Err(CommandError::new(code, *msg)
                            .with_details(json!({ "exit": c, "stderr": stderr })));
                    }
                }
                out.check(&format!("{}: `{}`", self.name, spec.program))?;
            }
            Ok(a.result)
        })
    }
}

/// Every command of this module.
pub fn all() -> Vec<Arc<dyn Command>> {
    COMMANDS
        .iter()
        .map(|c| {
            Arc::new(ArgvCommand {
                name: c.name,
                description: c.description,
                params: c.params,
                build: c.build,
            }) as Arc<dyn Command>
        })
        .collect()
}

static COMMANDS: &[ArgvCommand] = &[
    ArgvCommand {
        name: "package.install",
        description: "Install allowlisted Debian packages with apt-get (non-interactive, waits for the dpkg lock).",
        params: &[("packages", "array", true, "1 to 20 allowlisted package names, each optionally `=version`")],
        build: |p, cfg| apt_packages(p, cfg, "package.install", "install"),
    },
    ArgvCommand {
        name: "package.remove",
        description: "Remove (or purge) allowlisted Debian packages with apt-get.",
        params: &[
            ("packages", "array", true, "1 to 20 allowlisted package names"),
            ("purge", "boolean", false, "also remove configuration files; default false"),
        ],
        build: |p, cfg| {
            let verb = if p.opt_bool("purge")?.unwrap_or(false) { "purge" } else { "remove" };
            apt_packages(p, cfg, "package.remove", verb)
        },
    },
    ArgvCommand {
        name: "package.update",
        description: "Refresh the package lists (apt-get update).",
        params: &[],
        build: |_, cfg| {
            Ok(Built {
                steps: vec![apt(cfg, "package.update", &["update"], &[])],
                audit: json!({}),
                result: json!({ "updated": true }),
                exit_codes: &[],
            })
        },
    },
    ArgvCommand {
        name: "package.add_repository",
        description: "Add an allowlisted repository (add-apt-repository, which refreshes the lists).",
        params: &[("repository", "string", true, "an allowlisted repository, e.g. \"ppa:ondrej/php\"")],
        build: |p, cfg| {
            let repo = p.str("repository")?;
            cfg.check_repository(repo)?;
            Ok(Built {
                steps: vec![CommandSpec::new("add-apt-repository", ["-y", repo])
                    .env("DEBIAN_FRONTEND", "noninteractive")],
                audit: json!({ "repository": repo }),
                result: json!({ "repository": repo, "added": true }),
                exit_codes: &[],
            })
        },
    },
    ArgvCommand {
        name: "php.install_version",
        description: "Install a PHP version: php{V}-fpm, -cli and -common.",
        params: &[("version", "string", true, "an allowed PHP version, e.g. \"8.3\"")],
        build: |p, cfg| php_version(p, cfg, "php.install_version", "install"),
    },
    ArgvCommand {
        name: "php.remove_version",
        description: "Remove a PHP version's php{V}-fpm, -cli and -common packages.",
        params: &[("version", "string", true, "an allowed PHP version, e.g. \"8.3\"")],
        build: |p, cfg| php_version(p, cfg, "php.remove_version", "remove"),
    },
    ArgvCommand {
        name: "php.install_extension",
        description: "Install the package php{V}-{extension}.",
        params: &[
            ("version", "string", true, "an allowed PHP version"),
            ("extension", "string", true, "an allowed extension, e.g. \"redis\""),
        ],
        build: |p, cfg| php_extension(p, cfg, "php.install_extension", "install"),
    },
    ArgvCommand {
        name: "php.remove_extension",
        description: "Remove the package php{V}-{extension}.",
        params: &[
            ("version", "string", true, "an allowed PHP version"),
            ("extension", "string", true, "an allowed extension"),
        ],
        build: |p, cfg| php_extension(p, cfg, "php.remove_extension", "remove"),
    },
    ArgvCommand {
        name: "database.create_db",
        description: "Create a MySQL/MariaDB or PostgreSQL database.",
        params: &[
            ("name", "string", true, "the database, [A-Za-z_][A-Za-z0-9_]{0,63}, not reserved"),
            ("type", "string", true, "\"mysql\" or \"postgresql\""),
        ],
        build: |p, _| database_ddl(p, "create"),
    },
    ArgvCommand {
        name: "database.drop_db",
        description: "Drop a MySQL/MariaDB or PostgreSQL database.",
        params: &[
            ("name", "string", true, "the database, not reserved"),
            ("type", "string", true, "\"mysql\" or \"postgresql\""),
        ],
        build: |p, _| database_ddl(p, "drop"),
    },
    ArgvCommand {
        name: "database.create_user",
        description: "Create a database user with a password and all privileges on one database (the password goes to the client on stdin).",
        params: &[
            ("username", "string", true, "[A-Za-z_][A-Za-z0-9_]{0,63}, not reserved"),
            ("password", "string", true, "8 to 128 printable ASCII characters other than ' and \\"),
            ("database", "string", true, "the database to grant on"),
            ("type", "string", true, "\"mysql\" or \"postgresql\""),
        ],
        build: database_user,
    },
    ArgvCommand {
        name: "user.create",
        description: "Create a system user (useradd) with a home directory.",
        params: &[
            ("username", "string", true, "[a-z][a-z0-9_-]{0,31}, not a system account"),
            ("shell", "string", false, "an allowlisted shell; default /usr/sbin/nologin"),
            ("home_dir", "string", false, "below an allowed home prefix; default /home/USERNAME"),
            ("groups", "array", false, "supplementary groups (not root, sudo, adm, shadow, disk, …)"),
        ],
        build: user_create,
    },
    ArgvCommand {
        name: "user.delete",
        description: "Delete a regular (uid 1000 or above) system user (userdel); the home directory is kept.",
        params: &[("username", "string", true, "an existing regular user")],
        build: user_delete,
    },
    ArgvCommand {
        name: "ssl.request_letsencrypt",
        description: "Obtain a Let's Encrypt certificate with certbot's webroot method.",
        params: &[
            ("domain", "string", true, "the domain to certify"),
            ("email", "string", true, "the account's e-mail address"),
            ("webroot", "string", true, "the site's document root, below an allowed prefix"),
            ("staging", "boolean", false, "use the staging CA; default false"),
        ],
        build: letsencrypt,
    },
];

// ---------------------------------------------------------------------------------------------
// package.*, php.*
// ---------------------------------------------------------------------------------------------

/// Most packages one request may name.
const MAX_PACKAGES: usize = 20;

/// `apt-get VERB …` run non-interactively, keeping existing configuration files, waiting for
/// the dpkg lock at most as long as `command`'s timeout.
fn apt(cfg: &CommandsConfig, command: &str, verb: &[&str], packages: &[String]) -> CommandSpec {
    let lock = format!(
        "DPkg::Lock::Timeout={}",
        cfg.timeout_for(command).as_secs().max(1)
    );
    let mut args: Vec<String> = verb.iter().map(|s| s.to_string()).collect();
    args.extend(
        [
            "-y",
            "-q",
            "-o",
            lock.as_str(),
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
        ]
        .map(String::from),
    );
    if verb == ["install"] {
        args.push("--no-install-recommends".into());
    }
    args.extend(packages.iter().cloned());
    CommandSpec::new("apt-get", args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("APT_LISTCHANGES_FRONTEND", "none")
}

/// `packages` as an array of strings (a single string is accepted as a list of one).
fn package_list(p: &Params<'_>) -> Result<Vec<String>, CommandError> {
    let items: Vec<&Value> = match p.obj.get("packages") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v @ Value::String(_)) => vec![v],
        None | Some(Value::Null) => {
            return Err(param_error("packages", "`packages` is required".into()))
        }
        Some(_) => {
            return Err(param_error(
                "packages",
                "`packages` must be a list of package names".into(),
            ))
        }
    };
    if items.is_empty() || items.len() > MAX_PACKAGES {
        return Err(param_error(
            "packages",
            format!("`packages` must name 1 to {MAX_PACKAGES} packages"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for v in items {
        let s = v
            .as_str()
            .ok_or_else(|| param_error("packages", "every package must be a string".into()))?;
        if out.iter().any(|x| x == s) {
            return Err(param_error(
                "packages",
                format!("`{}` is listed twice", validate::shown(s)),
            ));
        }
        out.push(s.to_string());
    }
    Ok(out)
}

fn apt_packages(
    p: &Params<'_>,
    cfg: &CommandsConfig,
    command: &str,
    verb: &str,
) -> Result<Built, CommandError> {
    let pkgs = package_list(p)?;
    for s in &pkgs {
        cfg.check_package(s)?;
    }
    let purge = verb == "purge";
    let done = if verb == "install" {
        "installed"
    } else {
        "removed"
    };
    Ok(Built {
        steps: vec![apt(cfg, command, &[verb], &pkgs)],
        audit: json!({ "packages": pkgs, "purge": purge }),
        result: json!({ "packages": pkgs, "action": done, "purged": purge }),
        exit_codes: &[(100, codes::EXECUTION_ERROR, "apt-get failed (exit 100): a package is unknown, broken or the dpkg lock was not released in time")],
    })
}

fn php_version(
    p: &Params<'_>,
    cfg: &CommandsConfig,
    command: &str,
    verb: &str,
) -> Result<Built, CommandError> {
    let v = &p.version("version")?;
    cfg.check_php_version(v)?;
    let pkgs: Vec<String> = ["fpm", "cli", "common"]
        .iter()
        .map(|e| format!("php{v}-{e}"))
        .collect();
    for s in &pkgs {
        cfg.check_package(s)?;
    }
    Ok(Built {
        steps: vec![apt(cfg, command, &[verb], &pkgs)],
        audit: json!({ "version": v }),
        result: json!({ "version": v, "packages": pkgs, "action": if verb == "install" { "installed" } else { "removed" } }),
        exit_codes: &[],
    })
}

fn php_extension(
    p: &Params<'_>,
    cfg: &CommandsConfig,
    command: &str,
    verb: &str,
) -> Result<Built, CommandError> {
    let v = &p.version("version")?;
    cfg.check_php_version(v)?;
    let ext = p.str("extension")?;
    cfg.check_php_extension(ext)?;
    let pkg = format!("php{v}-{ext}");
    cfg.check_package(&pkg)?;
    Ok(Built {
        steps: vec![apt(cfg, command, &[verb], std::slice::from_ref(&pkg))],
        audit: json!({ "version": v, "extension": ext }),
        result: json!({ "version": v, "extension": ext, "package": pkg, "action": if verb == "install" { "installed" } else { "removed" } }),
        exit_codes: &[],
    })
}

// ---------------------------------------------------------------------------------------------
// database.*
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum DbType {
    Mysql,
    Postgres,
}

fn db_type(p: &Params<'_>) -> Result<DbType, CommandError> {
    match p.str("type")? {
        "mysql" | "mariadb" => Ok(DbType::Mysql),
        "postgresql" | "postgres" => Ok(DbType::Postgres),
        other => Err(param_error(
            "type",
            format!(
                "`type` must be \"mysql\" or \"postgresql\", not `{}`",
                validate::shown(other)
            ),
        )),
    }
}

impl DbType {
    fn as_str(self) -> &'static str {
        match self {
            DbType::Mysql => "mysql",
            DbType::Postgres => "postgresql",
        }
    }
}

/// The MySQL/MariaDB client as root over the local socket (root's `unix_socket` login).
fn mysql(sql: Option<&str>) -> CommandSpec {
    let mut args = vec![
        "--batch".to_string(),
        "--skip-column-names".into(),
        "--user=root".into(),
    ];
    if let Some(sql) = sql {
        args.push(format!("--execute={sql}"));
    }
    CommandSpec::new("mysql", args)
}

/// psql as the `postgres` superuser (peer authentication), stopping at the first error, without
/// reading `~/.psqlrc`.
fn psql(dbname: &str, sql: Option<&str>) -> CommandSpec {
    let mut args: Vec<String> = [
        "-u",
        "postgres",
        "--",
        "psql",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--dbname={dbname}"));
    if let Some(sql) = sql {
        args.push(format!("--command={sql}"));
    }
    CommandSpec::new("runuser", args)
}

/// `database.create_db` / `drop_db`. The name is a validated identifier, so quoting it (backticks,
/// double quotes) is exact: it can contain neither quote character.
fn database_ddl(p: &Params<'_>, verb: &str) -> Result<Built, CommandError> {
    let name = p.str("name")?;
    validate::validate_db_identifier("name", name)?;
    let ty = db_type(p)?;
    let spec = match (ty, verb) {
        (DbType::Mysql, "create") => mysql(Some(&format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))),
        (DbType::Mysql, _) => mysql(Some(&format!("DROP DATABASE `{name}`"))),
        (DbType::Postgres, "create") => psql(
            "postgres",
            Some(&format!("CREATE DATABASE \"{name}\" ENCODING 'UTF8'")),
        ),
        (DbType::Postgres, _) => psql("postgres", Some(&format!("DROP DATABASE \"{name}\""))),
    };
    let mut result = json!({ "database": name, "type": ty.as_str() });
    result[if verb == "create" {
        "created"
    } else {
        "dropped"
    }] = json!(true);
    Ok(Built {
        steps: vec![spec],
        audit: json!({ "name": name, "type": ty.as_str() }),
        result,
        exit_codes: &[],
    })
}

/// `database.create_user`: the statements carrying the password go on stdin, never in argv.
fn database_user(p: &Params<'_>, _: &CommandsConfig) -> Result<Built, CommandError> {
    let user = p.str("username")?;
    validate::validate_db_identifier("username", user)?;
    let password = p.str("password")?;
    validate::validate_db_password(password)?;
    let db = p.str("database")?;
    validate::validate_db_identifier("database", db)?;
    let ty = db_type(p)?;
    let steps = match ty {
        DbType::Mysql => vec![mysql(None).stdin(
            format!(
                "CREATE USER '{user}'@'localhost' IDENTIFIED BY '{password}';\n\
                 GRANT ALL PRIVILEGES ON `{db}`.* TO '{user}'@'localhost';\n\
                 FLUSH PRIVILEGES;\n"
            )
            .into_bytes(),
        )],
        DbType::Postgres => vec![
            psql("postgres", None).stdin(
                format!(
                    "BEGIN;\nCREATE ROLE \"{user}\" LOGIN PASSWORD '{password}';\n\
                     GRANT ALL PRIVILEGES ON DATABASE \"{db}\" TO \"{user}\";\nCOMMIT;\n"
                )
                .into_bytes(),
            ),
            psql(
                db,
                Some(&format!("GRANT ALL ON SCHEMA public TO \"{user}\"")),
            ),
        ],
    };
    Ok(Built {
        steps,
        audit: json!({
            "username": user, "database": db, "type": ty.as_str(),
            "password": { "bytes": password.len() },
        }),
        result: json!({ "username": user, "database": db, "type": ty.as_str(), "created": true }),
        exit_codes: &[],
    })
}

// ---------------------------------------------------------------------------------------------
// user.*
// ---------------------------------------------------------------------------------------------

/// Groups `user.create` never adds anyone to: each of them is a way to root.
pub const PRIVILEGED_GROUPS: &[&str] = &[
    "root",
    "sudo",
    "wheel",
    "adm",
    "admin",
    "shadow",
    "disk",
    "kmem",
    "docker",
    "lxd",
    "staff",
    "systemd-journal",
    "tty",
    "warden",
];

/// The lowest uid `user.delete` removes: below it are system accounts.
const UID_MIN: u32 = 1000;

fn user_create(p: &Params<'_>, cfg: &CommandsConfig) -> Result<Built, CommandError> {
    let user = p.str("username")?;
    validate::validate_username(user)?;
    let shell = p.opt_str("shell")?.unwrap_or("/usr/sbin/nologin");
    cfg.check_shell(shell)?;
    let home_default = format!("/home/{user}");
    let home = cfg.check_home_dir(p.opt_str("home_dir")?.unwrap_or(&home_default))?;
    let groups: Vec<String> = match p.obj.get("groups") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|g| {
                g.as_str()
                    .map(String::from)
                    .ok_or_else(|| param_error("groups", "every group must be a string".into()))
            })
            .collect::<Result<_, _>>()?,
        Some(Value::String(s)) => vec![s.clone()],
        Some(_) => {
            return Err(param_error(
                "groups",
                "`groups` must be a list of group names".into(),
            ))
        }
    };
    if groups.len() > 32 {
        return Err(param_error("groups", "at most 32 groups".into()));
    }
    for g in &groups {
        validate::validate_group_name(g)?;
        if PRIVILEGED_GROUPS.contains(&g.as_str()) {
            return Err(ValidationError::NotAllowed {
                field: "groups",
                value: g.clone(),
            }
            .into());
        }
    }
    let mut args: Vec<String> = vec![
        "--create-home".into(),
        "--home-dir".into(),
        home.to_string(),
        "--shell".into(),
        shell.into(),
    ];
    if !groups.is_empty() {
        args.push("--groups".into());
        args.push(groups.join(","));
    }
    args.push("--".into());
    args.push(user.into());
    Ok(Built {
        steps: vec![CommandSpec::new("useradd", args)],
        audit: json!({ "username": user, "shell": shell, "home_dir": home, "groups": groups }),
        result: json!({ "username": user, "home_dir": home, "shell": shell, "groups": groups, "created": true }),
        exit_codes: &[
            (9, codes::USER_EXISTS, "the user already exists"),
            (6, codes::VALIDATION_ERROR, "a group given does not exist"),
        ],
    })
}

fn user_delete(p: &Params<'_>, _: &CommandsConfig) -> Result<Built, CommandError> {
    let user = p.str("username")?;
    validate::validate_username(user)?;
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) if u.uid.as_raw() < UID_MIN || u.uid.as_raw() == 65534 => {
            return Err(param_error(
                "username",
                format!(
                    "`{user}` is a system account (uid {}); only regular users (uid {UID_MIN} or above) are deleted",
                    u.uid
                ),
            ))
        }
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(CommandError::not_found(format!("no such user `{user}`"))
                .with_details(json!({ "field": "username" })))
        }
        Err(e) => return Err(CommandError::execution(format!("user lookup failed: {e}"))),
    }
    Ok(Built {
        steps: vec![CommandSpec::new("userdel", ["--", user])],
        audit: json!({ "username": user }),
        result: json!({ "username": user, "deleted": true }),
        exit_codes: &[
            (6, codes::NOT_FOUND, "the user does not exist"),
            (8, codes::EXECUTION_ERROR, "the user is logged in"),
        ],
    })
}

// ---------------------------------------------------------------------------------------------
// ssl.request_letsencrypt
// ---------------------------------------------------------------------------------------------

fn letsencrypt(p: &Params<'_>, cfg: &CommandsConfig) -> Result<Built, CommandError> {
    let domain = validate::validate_domain("domain", p.str("domain")?)?;
    let email = validate::validate_email(p.str("email")?)?;
    let webroot = cfg.check_path("webroot", p.str("webroot")?)?;
    let staging = p.opt_bool("staging")?.unwrap_or(false);
    let mut args: Vec<String> = [
        "certonly",
        "--webroot",
        "--webroot-path",
        webroot.as_str(),
        "--domain",
        domain.as_str(),
        "--email",
        email.as_str(),
        "--agree-tos",
        "--non-interactive",
        "--no-eff-email",
    ]
    .map(String::from)
    .to_vec();
    if staging {
        args.push("--staging".into());
    }
    Ok(Built {
        steps: vec![CommandSpec::new("certbot", args)],
        audit: json!({ "domain": domain, "email": email, "webroot": webroot, "staging": staging }),
        result: json!({
            "domain": domain,
            "certificate": format!("/etc/letsencrypt/live/{domain}/fullchain.pem"),
            "private_key": format!("/etc/letsencrypt/live/{domain}/privkey.pem"),
        }),
        exit_codes: &[],
    })
}
