//! `warden daemon …`: run in the foreground, start in the background, stop, status, logs; and
//! `wardend`, the daemon binary those start.

use crate::cli::{connect, print_value, Conn, DaemonCommand};
use crate::dev;
use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use warden_client::TokenType;
use wardend::config::{Config, LogFormat};

pub const DEFAULT_CONFIG: &str = "/etc/warden/warden.toml";

/// `wardend`'s command line.
#[derive(clap::Parser)]
#[command(
    name = "wardend",
    version,
    about = "warden's daemon. `wardend run` serves in the foreground; `warden daemon run` and \
             `warden daemon start` start it the same way"
)]
pub struct DaemonCli {
    #[command(subcommand)]
    command: DaemonBinCommand,
}

#[derive(clap::Subcommand)]
enum DaemonBinCommand {
    /// Run the daemon in the foreground
    Run(RunArgs),
    /// Start the daemon in the background (writes its pid file, logs to daemon.log_file)
    Start(RunArgs),
    /// A process of a privilege-separated daemon, started by its monitor (not by hand)
    #[command(hide = true)]
    Internal {
        role: InternalRole,
        #[command(flatten)]
        run: RunArgs,
    },
}

pub fn dispatch_daemon(cli: DaemonCli) -> anyhow::Result<i32> {
    match cli.command {
        DaemonBinCommand::Run(args) => run_foreground(args),
        DaemonBinCommand::Start(args) => start_background(args),
        DaemonBinCommand::Internal { role, run } => run_internal(role, run),
    }
}

/// The daemon's binary: `wardend` beside this one (as installed, and as cargo builds them),
/// else the first on `PATH`.
fn daemon_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let beside = exe.with_file_name("wardend");
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("wardend"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "the daemon's binary `wardend` is neither beside {} nor on PATH: install it \
                 with `warden` (cargo build puts both in target/)",
                exe.display()
            )
        })
}

/// `warden daemon run|start ARGS…` becomes `wardend run|start ARGS…` in this same process
/// (same pid, as a service manager or a pid file expects), with the arguments as given.
fn exec_daemon(command: &str) -> anyhow::Result<i32> {
    use std::os::unix::process::CommandExt;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_none_or(|a| a != "daemon") || argv.get(2).is_none_or(|a| a != command) {
        bail!("`daemon {command}` must come right after the program name");
    }
    let bin = daemon_binary()?;
    let error = std::process::Command::new(&bin)
        .arg(command)
        .args(&argv[3..])
        .exec();
    Err(anyhow::Error::new(error).context(format!("cannot start {}", bin.display())))
}

#[derive(Args, Clone)]
pub struct RunArgs {
    /// The configuration file [default /etc/warden/warden.toml]
    #[arg(long, short, env = "WARDEN_CONFIG", conflicts_with = "dev")]
    pub config: Option<PathBuf>,
    /// Dev mode: no configuration file, everything allowed for root and you, state in one
    /// directory. Prints WARDEN_*=… lines to export, then WARDEN_READY=1.
    #[arg(long)]
    pub dev: bool,
    /// Dev mode: the socket path [default <state-dir>/warden.sock]
    #[arg(long, requires = "dev")]
    pub socket: Option<PathBuf>,
    /// Dev mode: the state directory [default: a fresh temporary directory; reused if it exists]
    #[arg(long, requires = "dev")]
    pub state_dir: Option<PathBuf>,
    /// Dev mode: keep nonces, rate limits and sessions in this Redis (redis://host:port), so
    /// that several dev daemons pointing at it act as one
    #[arg(long, requires = "dev", value_name = "URL")]
    pub redis: Option<String>,
    /// Dev mode: the prefix of every Redis key [default warden:]
    #[arg(long, requires = "redis", value_name = "PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// Dev mode: use this HMAC key file instead of generating one (share it between the dev
    /// daemons of one cluster)
    #[arg(long, requires = "dev", value_name = "FILE")]
    pub hmac_key_file: Option<PathBuf>,
    /// Dev mode: keep the secret store in this PostgreSQL database ([storage] backend =
    /// "postgres"), so that several dev daemons pointing at it serve one set of secrets. The
    /// dev master password is shared through the database (dev only: it is kept there in
    /// clear) unless --master-password-file is given
    #[arg(long, requires = "dev", value_name = "URL")]
    pub postgres: Option<String>,
    /// Dev mode: also serve the mTLS gateway on this address (e.g. 127.0.0.1:0), with a
    /// throwaway PKI in the state directory; prints WARDEN_LISTEN, WARDEN_CA,
    /// WARDEN_CLIENT_CERT and WARDEN_CLIENT_KEY
    #[arg(long, requires = "dev")]
    pub listen: Option<String>,
    /// Unseal the secret store at start with the password in this file (mode 0600); without
    /// it, `secrets.master_password_file` or `$CREDENTIALS_DIRECTORY/warden-master` is used if
    /// present, else the daemon starts sealed until `warden unseal`. Dev mode: the master
    /// password of the dev store (created with it if missing) instead of a generated one
    #[arg(long, value_name = "FILE")]
    pub master_password_file: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct PidArgs {
    /// The configuration file whose pid_file / log_file to use [env: WARDEN_CONFIG]
    #[arg(long, short, env = "WARDEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Dev mode state directory (its warden.pid and warden.log) [env: WARDEN_STATE_DIR]
    #[arg(long, env = "WARDEN_STATE_DIR", conflicts_with = "config")]
    pub state_dir: Option<PathBuf>,
}

impl PidArgs {
    fn files(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        if let Some(d) = &self.state_dir {
            return Ok((d.join("warden.pid"), d.join("warden.log")));
        }
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        let cfg = Config::load(&path)?;
        Ok((cfg.daemon.pid_file, cfg.daemon.log_file))
    }
}

pub fn dispatch(cmd: DaemonCommand) -> anyhow::Result<i32> {
    match cmd {
        DaemonCommand::Run(_) => exec_daemon("run"),
        DaemonCommand::Start(_) => exec_daemon("start"),
        DaemonCommand::Stop(args) => stop(args),
        DaemonCommand::Status { conn } => status(&conn),
        DaemonCommand::Reload { conn } => {
            let mut c = connect(&conn)?;
            c.login(TokenType::Admin)?;
            let v = c.call("daemon.reload", Value::Object(Default::default()))?;
            print_value(&conn, &v, |v| {
                let restart = v["needs_restart"].as_array().map(|a| a.len()).unwrap_or(0);
                if restart > 0 {
                    format!(
                        "reloaded (generation {}); needs a restart to apply: {}",
                        v["generation"], v["needs_restart"]
                    )
                } else {
                    format!("reloaded (generation {})", v["generation"])
                }
            });
            Ok(0)
        }
        DaemonCommand::Logs { pid, follow, lines } => {
            let (_, log) = pid.files()?;
            tail_file(&log, lines, follow)?;
            Ok(0)
        }
    }
}

struct Loaded {
    config: Config,
    config_path: Option<PathBuf>,
    announce: Vec<(String, String)>,
    dev_state_dir: Option<PathBuf>,
    master_password_file: Option<PathBuf>,
}

fn load(args: &RunArgs) -> anyhow::Result<Loaded> {
    if args.dev {
        let mut setup = dev::setup(args.socket.clone(), args.state_dir.clone())?;
        if let Some(listen) = &args.listen {
            dev::gateway(&mut setup, listen)?;
        }
        let setup = dev::join_cluster(
            setup,
            args.redis.clone(),
            args.redis_key_prefix.clone(),
            args.hmac_key_file.clone(),
        )?;
        let setup = dev::secret_store(
            setup,
            args.postgres.clone(),
            args.master_password_file.clone(),
        )?;
        return Ok(Loaded {
            config: setup.config,
            config_path: None,
            announce: setup.announce,
            dev_state_dir: Some(setup.state_dir),
            master_password_file: Some(setup.master_password_file),
        });
    }
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let path = path
        .canonicalize()
        .with_context(|| format!("cannot find the configuration file {}", path.display()))?;
    let config = Config::load(&path)?;
    Ok(Loaded {
        config,
        config_path: Some(path),
        announce: Vec::new(),
        dev_state_dir: None,
        master_password_file: args.master_password_file.clone(),
    })
}

fn run_foreground(args: RunArgs) -> anyhow::Result<i32> {
    // Before anything else runs or any thread exists: no core dumps, not dumpable, umask 077.
    let hardening = wardend::hygiene::harden_process();
    let Loaded {
        config,
        config_path,
        announce,
        master_password_file,
        dev_state_dir,
    } = load(&args)?;
    init_logging(&config);
    tracing::info!(
        dumpable = hardening.dumpable,
        core_limit = hardening.core_limit,
        nofile = hardening.nofile,
        "process hardened"
    );
    let privsep = config
        .daemon
        .privsep
        .enabled(nix::unistd::geteuid().is_root())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if privsep {
        let child_args = same_daemon_args(
            &args,
            &config,
            config_path.as_deref(),
            dev_state_dir.as_deref(),
        )?;
        return wardend::monitor::run(wardend::monitor::MonitorOptions {
            config,
            announce,
            child_args,
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("warden")
        .build()?;
    rt.block_on(wardend::server::run(wardend::server::RunOptions {
        config,
        config_path,
        dev_mode: args.dev,
        announce,
        master_password_file,
        supervised: None,
    }))?;
    Ok(0)
}

/// The processes a monitor starts (`wardend internal core|gateway`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum InternalRole {
    Core,
    Gateway,
}

/// The arguments that make another process load exactly the daemon configuration this one
/// loaded: the same file, or in dev mode the same (now existing) state directory, socket and
/// cluster flags. Used for the monitor's children and for `daemon start`'s background daemon.
fn same_daemon_args(
    args: &RunArgs,
    config: &Config,
    config_path: Option<&Path>,
    dev_state_dir: Option<&Path>,
) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let mut out: Vec<std::ffi::OsString> = Vec::new();
    if dev_state_dir.is_some() {
        out.push("--dev".into());
    }
    let mut opt = |k: &str, v: Option<&std::ffi::OsStr>| {
        if let Some(v) = v {
            out.push(k.into());
            out.push(v.to_os_string());
        }
    };
    let canonical = |p: &Option<PathBuf>| -> anyhow::Result<Option<PathBuf>> {
        p.as_ref()
            .map(|p| {
                p.canonicalize()
                    .with_context(|| format!("cannot find {}", p.display()))
            })
            .transpose()
    };
    let password = canonical(&args.master_password_file)?;
    if let Some(dir) = dev_state_dir {
        let key = canonical(&args.hmac_key_file)?;
        opt("--state-dir", Some(dir.as_os_str()));
        opt("--socket", Some(config.socket.path.as_os_str()));
        opt("--listen", args.listen.as_deref().map(AsRef::as_ref));
        opt("--redis", args.redis.as_deref().map(AsRef::as_ref));
        opt(
            "--redis-key-prefix",
            args.redis_key_prefix.as_deref().map(AsRef::as_ref),
        );
        opt("--postgres", args.postgres.as_deref().map(AsRef::as_ref));
        opt("--hmac-key-file", key.as_deref().map(AsRef::as_ref));
    } else {
        opt("--config", config_path.map(Path::as_os_str));
    }
    opt(
        "--master-password-file",
        password.as_deref().map(AsRef::as_ref),
    );
    Ok(out)
}

/// `wardend internal core|gateway`: one process of a privilege-separated daemon. Its monitor
/// started it with its control socket as descriptor 3 and its listening socket as 4.
fn run_internal(role: InternalRole, args: RunArgs) -> anyhow::Result<i32> {
    use wardend::privsep::{take_inherited, CHILD_CONTROL_FD};
    // Marked close-on-exec before anything could start a process that would inherit them.
    let control = take_inherited(CHILD_CONTROL_FD, "control socket")?;
    let listener = take_inherited(CHILD_CONTROL_FD + 1, "listening socket")?;
    wardend::hygiene::harden_process();
    let Loaded {
        config,
        config_path,
        master_password_file,
        ..
    } = load(&args)?;
    init_logging(&config);
    match role {
        InternalRole::Core => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("warden")
                .build()?;
            rt.block_on(wardend::server::run(wardend::server::RunOptions {
                config,
                config_path,
                dev_mode: args.dev,
                announce: Vec::new(),
                master_password_file,
                supervised: Some(wardend::server::Supervised { control, listener }),
            }))?;
        }
        InternalRole::Gateway => wardend::gateway::child::run(config, control, listener)?,
    }
    Ok(0)
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARDEN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.daemon.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.daemon.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.with_ansi(false).init(),
    }
}

/// Starts `wardend run` detached (new session, stdin from /dev/null, output appended to the log
/// file) and waits until it serves or fails.
fn start_background(args: RunArgs) -> anyhow::Result<i32> {
    let loaded = load(&args)?;
    let config = &loaded.config;
    let log = &config.daemon.log_file;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log_out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open the log file {}", log.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("run").args(same_daemon_args(
        &args,
        config,
        loaded.config_path.as_deref(),
        loaded.dev_state_dir.as_deref(),
    )?);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log_out);
    // SAFETY-free: setsid through the std pre_exec API is unsafe; process_group(0) puts the
    // daemon in its own process group so the terminal's signals don't reach it.
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let mut child = cmd.spawn().context("cannot start the daemon")?;
    let stdout = child.stdout.take().context("no stdout")?;
    // The daemon prints its announce lines then WARDEN_READY=1 once it serves.
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let done = line == "WARDEN_READY=1";
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if reader.is_finished() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the daemon exited during start-up ({status}); see {}",
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not become ready within 30 s; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = reader.join().unwrap_or_default();
    if lines.last().map(String::as_str) != Some("WARDEN_READY=1") {
        let status = child.wait()?;
        bail!(
            "the daemon exited during start-up ({status}); see {}",
            log.display()
        );
    }
    for l in lines {
        println!("{l}");
    }
    println!("WARDEN_PID={}", child.id());
    Ok(0)
}

fn read_pid(pid_file: &Path) -> anyhow::Result<i32> {
    let s = std::fs::read_to_string(pid_file).with_context(|| {
        format!(
            "cannot read {} (is the daemon running?)",
            pid_file.display()
        )
    })?;
    s.trim()
        .parse()
        .with_context(|| format!("{} does not hold a pid", pid_file.display()))
}

fn stop(args: PidArgs) -> anyhow::Result<i32> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let (pid_file, _) = args.files()?;
    let pid = Pid::from_raw(read_pid(&pid_file)?);
    match kill(pid, Signal::SIGTERM) {
        Ok(()) => {}
        Err(nix::errno::Errno::ESRCH) => {
            let _ = std::fs::remove_file(&pid_file);
            println!("not running (removed the stale pid file)");
            return Ok(0);
        }
        Err(e) => bail!("cannot signal pid {pid}: {e}"),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while kill(pid, None).is_ok() {
        if Instant::now() > deadline {
            bail!("pid {pid} is still running 60 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("stopped (pid {pid})");
    Ok(0)
}

fn status(conn: &Conn) -> anyhow::Result<i32> {
    let mut c = match connect(conn) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("not running: {e}");
            return Ok(3);
        }
    };
    c.authenticate_as_peer()?;
    let v = c.call("daemon.status", Value::Object(Default::default()))?;
    print_value(conn, &v, |v| {
        let mut out = format!(
            "warden {}\n  pid:          {}\n  uptime:       {} s\n  sealed:       {}\n  connections:  {}\n  requests:     {} served, {} failed\n  sessions:     {}\n  socket:       {}\n  audit log:    {}\n  mode:         {}",
            v["version"].as_str().unwrap_or("?"),
            v["pid"],
            v["uptime_seconds"],
            v["sealed"],
            v["connections"],
            v["requests_served"],
            v["requests_failed"],
            v["active_sessions"],
            v["socket"].as_str().unwrap_or("?"),
            v["audit_log"].as_str().unwrap_or("?"),
            match v["mode"].as_str() {
                Some("privsep") => "privilege separation (monitor, core, gateway)",
                _ => "single process",
            },
        );
        // The log's health: a daemon whose audit writes fail refuses every request.
        out.push_str(&format!(
            "\n  audit:        last seq {}, {} write errors",
            v["audit_last_seq"], v["audit_write_errors"]
        ));
        if let Some(e) = v["audit_last_error"].as_str() {
            out.push_str(&format!(" (last: {e})"));
        }
        if v["mode"] == "privsep" {
            out.push_str("\n  component  pid      uptime    restarts  heartbeat");
            for c in v["components"].as_array().into_iter().flatten() {
                let pid = c["pid"].as_i64().map_or("-".to_string(), |p| p.to_string());
                let rtt = c["heartbeat_rtt_us"]
                    .as_u64()
                    .map_or("-".to_string(), |us| {
                        format!("{:.2} ms", us as f64 / 1000.0)
                    });
                out.push_str(&format!(
                    "\n  {:<10} {:<8} {:<9} {:<9} {}",
                    c["role"].as_str().unwrap_or("?"),
                    pid,
                    format!("{} s", c["uptime_seconds"]),
                    c["restarts"],
                    rtt
                ));
            }
        }
        out
    });
    Ok(0)
}

/// Prints the last `lines` lines of a file, then follows it if asked.
pub fn tail_file(path: &Path, lines: usize, follow: bool) -> anyhow::Result<()> {
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(wardend::audit::tail(path, lines, follow, |l| {
        println!("{l}")
    }))?;
    Ok(())
}
