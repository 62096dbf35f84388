//! `warden init`, `warden unseal`, `warden seal` and `warden secrets …`.
//!
//! Passwords and values never come from the command line by default (argv is readable by
//! every local user through `/proc`): they are typed on the terminal without echo, or read
//! from a file or standard input. Exit codes tell scripts what happened; see [`exit_code`].

use crate::cli::{connect, Conn};
use crate::daemon_cmd::DEFAULT_CONFIG;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use warden_client::{Client, ClientError, TokenType};
use wardend::config::Config;
use zeroize::Zeroizing;

/// Exit codes of the secrets commands (also documented in docs/secrets.md).
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const UNAVAILABLE: i32 = 3;
    pub const NOT_FOUND: i32 = 4;
    pub const DENIED: i32 = 5;
    pub const SEALED: i32 = 6;
    pub const DAMAGED: i32 = 7;
}

/// The exit code for a failed call: what a script needs to tell apart.
pub fn exit_code(e: &ClientError) -> i32 {
    match e {
        ClientError::Connect { .. } | ClientError::Io(_) => exit::UNAVAILABLE,
        ClientError::Api { code, .. } => match code.as_str() {
            "SECRET_NOT_FOUND" | "NOT_FOUND" => exit::NOT_FOUND,
            "AUTH_REQUIRED" | "AUTH_EXPIRED" | "AUTH_INVALID" | "AUTH_DENIED" | "ACCESS_DENIED" => {
                exit::DENIED
            }
            "DAEMON_LOCKED" => exit::SEALED,
            "UNAVAILABLE" => exit::UNAVAILABLE,
            "INTEGRITY_ERROR" => exit::DAMAGED,
            _ => exit::ERROR,
        },
        _ => exit::ERROR,
    }
}

/// Where a password comes from when not typed on the terminal.
#[derive(Args, Clone)]
pub struct PasswordSource {
    /// Read the password from this file (one trailing newline removed)
    #[arg(long, conflicts_with = "password_stdin")]
    pub password_file: Option<PathBuf>,
    /// Read the password from standard input (one trailing newline removed)
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Args)]
pub struct InitArgs {
    /// The configuration file whose [secrets] section to use [env: WARDEN_CONFIG; default
    /// /etc/warden/warden.toml]
    #[arg(long, short, env = "WARDEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Create the store in this directory instead of the configured secrets.dir
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub password: PasswordSource,
}

#[derive(Subcommand)]
pub enum SecretsCommand {
    /// Print the value of KEY (or of its version N)
    Get {
        key: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Store a new version of KEY: the value from standard input, --file, or typed on the
    /// terminal (hidden)
    Set {
        key: String,
        /// Read the value from this file (taken byte for byte; must be UTF-8 text)
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// The value itself: visible to every local user in the process list, so only
        /// accepted with --insecure-argv
        #[arg(long, requires = "insecure_argv")]
        value: Option<String>,
        /// Accept --value on the command line
        #[arg(long)]
        insecure_argv: bool,
        /// Only if the current version is N (0: the secret must not exist yet)
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// The names of the secrets you may read
    List,
    /// The kept versions of KEY
    Versions { key: String },
    /// Hide KEY (its versions stay on disk until destroyed; a later set brings it back)
    Delete { key: String },
    /// Erase versions of KEY from memory and disk (all of them unless --version is given)
    Destroy {
        key: String,
        #[arg(long = "version")]
        versions: Vec<u64>,
    },
    /// Change the master password (admin; the store must be unsealed)
    RotateMaster {
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Re-seal every value under a new data key (admin)
    Rekey,
}

/// `warden init`: creates the store offline, in the configured directory — or, with
/// `[storage] backend = "postgres"`, in the configured PostgreSQL schema (tables created or
/// migrated first; refused if a store is already there).
pub fn init(args: InitArgs) -> anyhow::Result<i32> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = if path.exists() || args.config.is_some() {
        Config::load(&path)?
    } else {
        Config::default()
    };
    let mut section = config.secrets.clone();
    if let Some(pg) = config.storage.pg_config(&config.secrets) {
        if args.dir.is_some() {
            bail!("--dir is for the embedded store; this configuration keeps the secrets in PostgreSQL ([storage] backend = \"postgres\")");
        }
        let password = new_password(&args.password, "master password")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(wardend::secrets::postgres::PgStore::init(
            &pg,
            password.as_bytes(),
        ))
        .with_context(|| {
            format!(
                "cannot create the secret store in PostgreSQL schema {}",
                pg.schema
            )
        })?;
        println!(
            "secret store created in PostgreSQL schema {} (Argon2id {} KiB, {} passes, {} lanes); unseal each daemon with `warden unseal`",
            pg.schema, pg.kdf.m_cost_kib, pg.kdf.t_cost, pg.kdf.p_cost
        );
        return Ok(exit::OK);
    }
    if let Some(d) = args.dir {
        section.dir = d;
    }
    let cfg = section.store_config();
    let password = new_password(&args.password, "master password")?;
    wardend::secrets::SecretStore::init(&cfg, password.as_bytes())
        .with_context(|| format!("cannot create the secret store in {}", cfg.dir.display()))?;
    println!(
        "secret store created in {} (Argon2id {} KiB, {} passes, {} lanes); unseal the daemon with `warden unseal`",
        cfg.dir.display(),
        cfg.kdf.m_cost_kib,
        cfg.kdf.t_cost,
        cfg.kdf.p_cost
    );
    Ok(exit::OK)
}

/// `warden unseal` / `warden seal`.
pub fn unseal(conn: &Conn, password: &PasswordSource) -> anyhow::Result<i32> {
    let pw = read_password(password, "master password")?;
    with_client(conn, TokenType::Admin, |c| {
        let v = c.unseal(&pw)?;
        print(conn, &v, |v| {
            format!(
                "unsealed: {} secrets loaded, {} integrity errors{}",
                v["secrets_loaded"],
                v["integrity_errors"],
                if v["memory_locked"] == json!(false) {
                    " (warning: memory not locked)"
                } else {
                    ""
                }
            )
        });
        Ok(())
    })
}

pub fn seal(conn: &Conn) -> anyhow::Result<i32> {
    with_client(conn, TokenType::Admin, |c| {
        let v = c.seal()?;
        print(conn, &v, |_| "sealed".into());
        Ok(())
    })
}

pub fn dispatch(conn: &Conn, cmd: SecretsCommand) -> anyhow::Result<i32> {
    match cmd {
        SecretsCommand::Get { key, version } => with_client(conn, TokenType::Session, |c| {
            let s = c.get_secret(&key, version)?;
            if conn.json {
                let v = json!({ "key": s.key, "version": s.version, "value": s.expose() });
                println!("{v}");
            } else {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(s.expose().as_bytes());
                let _ = out.write_all(b"\n");
            }
            Ok(())
        }),
        SecretsCommand::Set {
            key,
            file,
            value,
            insecure_argv: _,
            expected_version,
        } => {
            let value = match (file, value) {
                (Some(f), _) => {
                    let bytes = Zeroizing::new(
                        std::fs::read(&f)
                            .with_context(|| format!("cannot read {}", f.display()))?,
                    );
                    Zeroizing::new(
                        String::from_utf8(bytes.to_vec())
                            .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", f.display()))?,
                    )
                }
                (None, Some(v)) => Zeroizing::new(v),
                (None, None) if std::io::stdin().is_terminal() => {
                    prompt_hidden(&format!("value of {key}: "))?
                }
                (None, None) => read_stdin()?,
            };
            with_client(conn, TokenType::Session, |c| {
                let version = c.set_secret(&key, &value, expected_version)?;
                print(conn, &json!({ "key": key, "version": version }), |_| {
                    format!("{key}: version {version}")
                });
                Ok(())
            })
        }
        SecretsCommand::List => with_client(conn, TokenType::Session, |c| {
            let v = c.list_secrets()?;
            print(conn, &v, |v| {
                v["secrets"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            });
            Ok(())
        }),
        SecretsCommand::Versions { key } => with_client(conn, TokenType::Session, |c| {
            let v = c.secret_versions(&key)?;
            print(conn, &v, |v| {
                v["versions"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| {
                                format!(
                                    "{}\t{}{}",
                                    x["version"],
                                    x["created_at"].as_str().unwrap_or("-"),
                                    if x["damaged"] == json!(true) {
                                        "\tDAMAGED"
                                    } else {
                                        ""
                                    }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            });
            Ok(())
        }),
        SecretsCommand::Delete { key } => with_client(conn, TokenType::Session, |c| {
            let v = c.delete_secret(&key)?;
            print(conn, &v, |_| format!("{key}: deleted"));
            Ok(())
        }),
        SecretsCommand::Destroy { key, versions } => with_client(conn, TokenType::Session, |c| {
            let v = c.destroy_secret(&key, &versions)?;
            print(conn, &v, |v| format!("{key}: destroyed {}", v["destroyed"]));
            Ok(())
        }),
        SecretsCommand::RotateMaster { password } => {
            let pw = new_password(&password, "new master password")?;
            with_client(conn, TokenType::Admin, |c| {
                let v = c.rotate_master(&pw)?;
                print(conn, &v, |v| {
                    format!(
                        "master password changed at {}",
                        v["rotated_at"].as_str().unwrap_or("?")
                    )
                });
                Ok(())
            })
        }
        SecretsCommand::Rekey => with_client(conn, TokenType::Admin, |c| {
            let v = c.rekey()?;
            print(conn, &v, |v| format!("re-keyed {} secrets", v["secrets"]));
            Ok(())
        }),
    }
}

/// Connects, logs in, runs `f`; a failure is printed and turned into its exit code.
fn with_client(
    conn: &Conn,
    kind: TokenType,
    f: impl FnOnce(&mut Client) -> Result<(), ClientError>,
) -> anyhow::Result<i32> {
    let result = connect(conn).and_then(|mut c| {
        match kind {
            TokenType::Session => c.authenticate_as_peer()?,
            TokenType::Admin => {
                c.login(kind)?;
            }
        }
        f(&mut c)
    });
    match result {
        Ok(()) => Ok(exit::OK),
        Err(e) => {
            if conn.json {
                let (code, message) = match &e {
                    ClientError::Api { code, message, .. } => (code.clone(), message.clone()),
                    other => ("UNAVAILABLE".to_string(), other.to_string()),
                };
                println!(
                    "{}",
                    json!({ "error": { "code": code, "message": message } })
                );
            }
            eprintln!("warden: {e}");
            Ok(exit_code(&e))
        }
    }
}

fn print(conn: &Conn, v: &Value, human: impl Fn(&Value) -> String) {
    crate::cli::print_value(conn, v, human)
}

/// A password from the source given, else typed on the terminal.
fn read_password(src: &PasswordSource, what: &str) -> anyhow::Result<Zeroizing<String>> {
    let pw = if let Some(f) = &src.password_file {
        read_file_password(f)?
    } else if src.password_stdin {
        read_stdin()?
    } else {
        prompt_hidden(&format!("{what}: "))?
    };
    if pw.is_empty() {
        bail!("the {what} must not be empty");
    }
    Ok(pw)
}

/// A new password: typed twice on the terminal (they must match), or from the source given.
fn new_password(src: &PasswordSource, what: &str) -> anyhow::Result<Zeroizing<String>> {
    if src.password_file.is_some() || src.password_stdin {
        return read_password(src, what);
    }
    let a = read_password(src, what)?;
    let b = prompt_hidden(&format!("{what} again: "))?;
    if *a != *b {
        bail!("the two passwords differ");
    }
    Ok(a)
}

fn read_file_password(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let bytes = wardend::server::secrets::read_password_file(path).map_err(anyhow::Error::msg)?;
    Ok(Zeroizing::new(String::from_utf8(bytes.to_vec()).map_err(
        |_| anyhow::anyhow!("{} is not UTF-8 text", path.display()),
    )?))
}

/// Standard input, one trailing newline removed.
fn read_stdin() -> anyhow::Result<Zeroizing<String>> {
    let mut bytes = Zeroizing::new(Vec::new());
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("cannot read standard input")?;
    wardend::server::secrets::strip_newline(&mut bytes);
    Ok(Zeroizing::new(String::from_utf8(bytes.to_vec()).map_err(
        |_| anyhow::anyhow!("standard input is not UTF-8 text"),
    )?))
}

/// Reads one line from the controlling terminal with echo off.
fn prompt_hidden(prompt: &str) -> anyhow::Result<Zeroizing<String>> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .context("no terminal to ask on: use --password-file or --password-stdin")?;
    let saved = tcgetattr(&tty).context("cannot read the terminal settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    tcsetattr(&tty, SetArg::TCSAFLUSH, &quiet).context("cannot turn terminal echo off")?;
    let mut line = Zeroizing::new(String::new());
    let read = (&tty)
        .write_all(prompt.as_bytes())
        .and_then(|()| std::io::BufReader::new(&tty).read_line(&mut line));
    let _ = tcsetattr(&tty, SetArg::TCSAFLUSH, &saved);
    read.context("cannot read from the terminal")?;
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    Ok(line)
}
