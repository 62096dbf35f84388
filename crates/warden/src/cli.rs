//! The command line. Every client command finds the daemon through `--socket` or
//! `$WARDEN_SOCKET`, and an HMAC key through `--hmac-key-file` or `$WARDEN_HMAC_KEY_FILE` — the
//! very lines dev mode prints, so `eval "$(…)"`-style exports point the CLI at a dev daemon.

use crate::daemon_cmd;
use crate::secrets_cmd;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use warden_client::{Client, ClientError, TokenType};

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "warden: secrets, privileged commands and jobs behind one identity model, one policy and one audit trail"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Conn {
    /// The daemon's socket [env: WARDEN_SOCKET; default /run/warden/warden.sock]
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Talk to the daemon's mTLS gateway at this URL (https://HOST:PORT) instead of the socket;
    /// the secrets commands and the REST API's other methods work this way [env: WARDEN_REMOTE]
    #[arg(long, global = true, env = "WARDEN_REMOTE", hide_env = true)]
    pub remote: Option<String>,
    /// Remote mode: this client's certificate, PEM [env: WARDEN_CLIENT_CERT]
    #[arg(
        long = "cert",
        global = true,
        env = "WARDEN_CLIENT_CERT",
        hide_env = true
    )]
    pub client_cert: Option<PathBuf>,
    /// Remote mode: its private key, PEM [env: WARDEN_CLIENT_KEY]
    #[arg(
        long = "key",
        global = true,
        env = "WARDEN_CLIENT_KEY",
        hide_env = true
    )]
    pub client_key: Option<PathBuf>,
    /// Remote mode: the CA the gateway's certificate chains to [env: WARDEN_CA]
    #[arg(long = "ca", global = true, env = "WARDEN_CA", hide_env = true)]
    pub ca_file: Option<PathBuf>,
    /// Print machine-readable JSON
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run, start, stop and inspect the daemon
    Daemon {
        #[command(subcommand)]
        command: DaemonCommand,
    },
    /// Create the encrypted secret store (offline, in the configured secrets.dir): the master
    /// password is typed twice on the terminal, or read from --password-file / --password-stdin
    Init(secrets_cmd::InitArgs),
    /// Unseal the daemon's secret store with the master password (admin)
    Unseal {
        #[command(flatten)]
        password: secrets_cmd::PasswordSource,
        #[command(flatten)]
        conn: Conn,
    },
    /// Seal the daemon's secret store: keys and values are wiped from its memory (admin)
    Seal {
        #[command(flatten)]
        conn: Conn,
    },
    /// Read and write secrets. Exit codes: 0 ok, 1 other error, 3 daemon unavailable,
    /// 4 not found, 5 denied, 6 sealed, 7 damaged (integrity error)
    Secrets {
        #[command(subcommand)]
        command: secrets_cmd::SecretsCommand,
        #[command(flatten)]
        conn: Conn,
    },
    /// Verify and read the audit log
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run commands as jobs under cgroup limits and follow their output
    Jobs {
        #[command(subcommand)]
        command: crate::jobs_cmd::JobsCommand,
    },
    /// The certificate authority for mTLS (offline): `pki init`, `pki issue server|client`,
    /// `pki revoke`, `pki list`
    Pki(crate::pki_cmd::PkiArgs),
    /// Check that the daemon answers, with a session token (system.ping)
    Ping {
        #[command(flatten)]
        conn: Conn,
    },
    /// Liveness and version; needs no credential
    Health {
        #[command(flatten)]
        conn: Conn,
    },
    /// Call any method in warden's dialect: `warden call system.metrics '{}'`
    Call {
        method: String,
        /// Parameters as a JSON object
        params: Option<String>,
        /// Obtain an admin token first (for admin methods)
        #[arg(long, conflicts_with = "token")]
        admin: bool,
        /// Present this token instead of obtaining one
        #[arg(long, env = "WARDEN_TOKEN")]
        token: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Privileged commands: list them with their parameters
    Commands {
        #[command(subcommand)]
        command: CommandsCommand,
    },
    /// Send a command signed with the HMAC key, as a web panel does (Lumo dialect):
    /// `warden run system.ping`, `warden run service.restart service=nginx`
    Run {
        command: String,
        /// Parameters as key=value (the value may be JSON: n=3, list='["a","b"]')
        params: Vec<String>,
        /// The HMAC key [env: WARDEN_HMAC_KEY_FILE]
        #[arg(long)]
        hmac_key_file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum CommandsCommand {
    /// Every command the daemon runs, with its aliases and parameters (commands.list)
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Run the daemon in the foreground (hands over to `wardend run`, the daemon's binary)
    Run(daemon_cmd::RunArgs),
    /// Start the daemon in the background (writes its pid file, logs to daemon.log_file)
    Start(daemon_cmd::RunArgs),
    /// Stop a daemon started in the background (SIGTERM, then wait for it to drain)
    Stop(daemon_cmd::PidArgs),
    /// Version, uptime, sealed or not, connections, requests served
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Re-read the configuration file (as SIGHUP does) and report the outcome
    Reload {
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the daemon's log (the file `warden daemon start` writes)
    Logs {
        #[command(flatten)]
        pid: daemon_cmd::PidArgs,
        /// Keep printing what is appended
        #[arg(short, long)]
        follow: bool,
        /// Lines to show from the end
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of one or more audit files (oldest first); exit 0 when intact
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the last records of the audit log: from FILE if given, else streamed by the
    /// daemon (permission admin:audit), so that its readers need no access to the file
    Tail {
        /// Read this file directly instead of asking the daemon
        file: Option<PathBuf>,
        /// Keep printing records as they are written
        #[arg(short, long)]
        follow: bool,
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        #[command(flatten)]
        conn: Conn,
    },
}

pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Daemon { command } => daemon_cmd::dispatch(command),
        Command::Audit { command } => audit(command),
        Command::Init(args) => secrets_cmd::init(args),
        Command::Unseal { password, conn } => secrets_cmd::unseal(&conn, &password),
        Command::Seal { conn } => secrets_cmd::seal(&conn),
        Command::Secrets { command, conn } => secrets_cmd::dispatch(&conn, command),
        Command::Commands {
            command: CommandsCommand::List { conn },
        } => {
            let mut c = connect(&conn)?;
            c.authenticate_as_peer()?;
            let v = c
                .call("commands.list", Value::Object(Default::default()))
                .map_err(api_exit)?;
            print_value(&conn, &v, human_command_list);
            Ok(0)
        }
        Command::Jobs { command } => crate::jobs_cmd::dispatch(command),
        Command::Pki(args) => crate::pki_cmd::dispatch(args),
        Command::Ping { conn } => {
            let mut c = connect(&conn)?;
            c.login(TokenType::Session)?;
            let v = c.call("system.ping", Value::Object(Default::default()))?;
            print_value(&conn, &v, |_| "pong".to_string());
            Ok(0)
        }
        Command::Health { conn } => {
            let mut c = connect(&conn)?;
            let v = c.call("system.health", Value::Object(Default::default()))?;
            print_value(&conn, &v, |v| {
                format!(
                    "{} {} up {} s",
                    v["daemon"].as_str().unwrap_or("warden"),
                    v["version"].as_str().unwrap_or("?"),
                    v["uptime_seconds"]
                )
            });
            Ok(0)
        }
        Command::Call {
            method,
            params,
            admin,
            token,
            conn,
        } => {
            let params: Value = match params {
                Some(p) => serde_json::from_str(&p).context("params must be a JSON object")?,
                None => Value::Object(Default::default()),
            };
            let mut c = connect(&conn)?;
            match token {
                Some(t) => c.set_token(Some(t)),
                None => {
                    c.login(if admin {
                        TokenType::Admin
                    } else {
                        TokenType::Session
                    })?;
                }
            }
            let v = c.call(&method, params).map_err(api_exit)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
        Command::Run {
            command,
            params,
            hmac_key_file,
            conn,
        } => {
            let key = warden_client::read_key(hmac_key_file.as_deref())?;
            let params = key_values(&params)?;
            let mut c = connect(&conn)?;
            let v = c.lumo(&key, &command, &params).map_err(api_exit)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
    }
}

/// `file.write (path, content, owner?, group?, mode?)` and its description, one command a line.
fn human_command_list(v: &Value) -> String {
    let mut out = String::new();
    for c in v["commands"].as_array().into_iter().flatten() {
        let schema = &c["params"];
        let required: Vec<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let params: Vec<String> = schema["properties"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| {
                if required.contains(&k.as_str()) {
                    k.clone()
                } else {
                    format!("{k}?")
                }
            })
            .collect();
        let aliases: Vec<&str> = c["aliases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let name = c["name"].as_str().unwrap_or("?");
        out.push_str(&format!("{name} ({})", params.join(", ")));
        if !aliases.is_empty() {
            out.push_str(&format!(" [alias {}]", aliases.join(", ")));
        }
        out.push_str(&format!(
            "\n    {}\n",
            c["description"].as_str().unwrap_or("")
        ));
    }
    out.trim_end().to_string()
}

/// Turns `a=1 b=x c='["y"]'` into `{"a":1,"b":"x","c":["y"]}`: a value that parses as JSON is
/// taken as JSON, anything else as a string.
pub fn key_values(items: &[String]) -> anyhow::Result<Value> {
    let mut map = serde_json::Map::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("`{item}` is not key=value"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        if map.insert(k.to_string(), value).is_some() {
            anyhow::bail!("`{k}` is given twice");
        }
    }
    Ok(Value::Object(map))
}

pub fn connect(conn: &Conn) -> Result<Client, ClientError> {
    if let Some(url) = &conn.remote {
        let missing = |what: &str| {
            ClientError::Protocol(format!(
                "--remote needs --{what} (or $WARDEN_{})",
                match what {
                    "cert" => "CLIENT_CERT",
                    "key" => "CLIENT_KEY",
                    _ => "CA",
                }
            ))
        };
        return Client::connect_remote(&warden_client::RemoteConfig {
            url: url.clone(),
            cert: conn.client_cert.clone().ok_or_else(|| missing("cert"))?,
            key: conn.client_key.clone().ok_or_else(|| missing("key"))?,
            ca: conn.ca_file.clone().ok_or_else(|| missing("ca"))?,
        });
    }
    Client::connect(&warden_client::socket_path(conn.socket.as_deref()))
}

pub fn print_value(conn: &Conn, v: &Value, human: impl Fn(&Value) -> String) {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        println!("{}", human(v));
    }
}

/// Keeps the daemon's error code visible in the message.
fn api_exit(e: ClientError) -> anyhow::Error {
    anyhow::Error::new(e)
}

fn audit(cmd: AuditCommand) -> anyhow::Result<i32> {
    match cmd {
        AuditCommand::Verify { files } => match wardend::audit::verify_files(&files) {
            Ok(report) => {
                println!(
                    "ok: {} records in {} file(s), seq {}..{}, last hash {}",
                    report.records,
                    files.len(),
                    report.first_seq,
                    report.last_seq,
                    report.last_hash
                );
                Ok(0)
            }
            Err(e) => {
                eprintln!("audit log damaged: {e}");
                Ok(2)
            }
        },
        AuditCommand::Tail {
            file: Some(file),
            follow,
            lines,
            ..
        } => {
            daemon_cmd::tail_file(&file, lines, follow)?;
            Ok(0)
        }
        AuditCommand::Tail {
            file: None,
            follow,
            lines,
            conn,
        } => {
            let mut c = connect(&conn)?;
            c.authenticate_as_peer()?;
            let params = serde_json::json!({ "lines": lines, "follow": follow });
            c.call_stream("audit.tail", params, |record| match record {
                Value::String(s) => println!("{s}"),
                other => println!("{other}"),
            })
            .map_err(api_exit)?;
            Ok(0)
        }
    }
}
