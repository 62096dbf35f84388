//! `warden jobs …`: run a command as a job and stream its output, list, inspect, re-attach to
//! and stop jobs. Built on `warden-client`; the daemon does the work (see `docs/jobs.md`).

use crate::cli::{connect, Conn};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use warden_client::{AttachEnd, Client, ClientError, Output, OutputStream};

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Run CMD as a job and stream its output (stdout to stdout, stderr to stderr); exits with
    /// the job's exit code (128+N for signal N). Ctrl-C detaches and leaves the job running,
    /// unless --rm
    Exec(ExecArgs),
    /// Your jobs, running and recently finished: id, state, command, started
    List {
        /// Everyone's jobs (needs jobs:admin)
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// One job: state, end reason, limits, usage
    Status {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Replay a job's output from the start (or --from OFFSET), then follow it while it runs;
    /// exits with the job's exit code once it has ended
    Attach {
        id: String,
        /// Byte offset in the job's output log to start from
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Print what there is now and return, without following
        #[arg(long)]
        no_follow: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop a job: SIGTERM to all its processes, a grace period, then kill its cgroup
    Stop {
        id: String,
        /// Grace period before the kill, e.g. 2s [default: the daemon's jobs.stop_grace]
        #[arg(long)]
        grace: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Args)]
pub struct ExecArgs {
    /// CPUs' worth of time, e.g. 0.5
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory limit, e.g. 256M (swap off)
    #[arg(long)]
    memory: Option<String>,
    /// Maximum number of processes and threads
    #[arg(long)]
    pids: Option<u64>,
    /// Read bytes/s on a device: DEVICE=RATE, DEVICE a block device node or MAJOR:MINOR
    /// (e.g. /dev/vda=10M); repeatable
    #[arg(long, value_name = "DEVICE=RATE")]
    io_read_bps: Vec<String>,
    /// Write bytes/s on a device: DEVICE=RATE
    #[arg(long, value_name = "DEVICE=RATE")]
    io_write_bps: Vec<String>,
    /// Read operations/s on a device: DEVICE=COUNT
    #[arg(long, value_name = "DEVICE=COUNT")]
    io_read_iops: Vec<String>,
    /// Write operations/s on a device: DEVICE=COUNT
    #[arg(long, value_name = "DEVICE=COUNT")]
    io_write_iops: Vec<String>,
    /// A new network namespace with only loopback
    #[arg(long)]
    no_network: bool,
    /// Environment variables for the job, NAME=VALUE (the job gets only these and PATH)
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Working directory of the job [default: the current directory]
    #[arg(long)]
    cwd: Option<String>,
    /// On Ctrl-C, stop the job instead of detaching from it
    #[arg(long, conflicts_with = "detach")]
    rm: bool,
    /// Print the job id and return at once
    #[arg(long, short)]
    detach: bool,
    #[command(flatten)]
    conn: Conn,
    /// The program and its arguments (after `--`)
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// Where the jobs commands go instead of the local daemon: the mTLS gateway's gRPC API, as the
/// global `--remote`, `--ca`, `--cert` and `--key` options (or their environment) give it.
#[derive(Clone, Default)]
pub struct Remote {
    remote: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl JobsCommand {
    fn remote(&self) -> Remote {
        let conn = match self {
            JobsCommand::Exec(a) => &a.conn,
            JobsCommand::List { conn, .. }
            | JobsCommand::Status { conn, .. }
            | JobsCommand::Attach { conn, .. }
            | JobsCommand::Stop { conn, .. } => conn,
        };
        Remote {
            remote: conn.remote.clone(),
            ca: conn.ca_file.clone(),
            cert: conn.client_cert.clone(),
            key: conn.client_key.clone(),
        }
    }
}

pub fn dispatch(cmd: JobsCommand) -> anyhow::Result<i32> {
    if cmd.remote().remote.is_some() {
        return remote::dispatch(cmd);
    }
    match cmd {
        JobsCommand::Exec(a) => exec(a),
        JobsCommand::List { all, conn, .. } => {
            let mut c = session(&conn)?;
            let v = c.call("jobs.list", json!({ "all": all }))?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
            println!("{:<36}  {:<24}  {:<20}  COMMAND", "ID", "STATE", "STARTED");
            for j in &jobs {
                println!(
                    "{:<36}  {:<24}  {:<20}  {}",
                    j["id"].as_str().unwrap_or("?"),
                    state_text(j),
                    whole_seconds(j["started_at"].as_str().unwrap_or("?")),
                    command_text(&j["command"])
                );
            }
            Ok(0)
        }
        JobsCommand::Status { id, conn, .. } => {
            let mut c = session(&conn)?;
            let v = c.call("jobs.status", json!({ "id": id }))?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(0)
        }
        JobsCommand::Attach {
            id,
            from,
            no_follow,
            conn,
            ..
        } => {
            let mut c = session(&conn)?;
            let interrupted = ctrl_c_flag()?;
            let end = follow(&mut c, &id, from, !no_follow, &interrupted)?;
            match end {
                AttachEnd::Finished(v) if v["complete"] == true => Ok(exit_code(&v["job"])),
                AttachEnd::Finished(_) => Ok(0),
                AttachEnd::Interrupted => Ok(130),
            }
        }
        JobsCommand::Stop {
            id, grace, conn, ..
        } => {
            let mut c = session(&conn)?;
            let mut p = json!({ "id": id });
            if let Some(g) = grace {
                p["grace"] = json!(g);
            }
            let v = c.call("jobs.stop", p)?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}: {}", id, state_text(&v));
            }
            Ok(0)
        }
    }
}

/// A connection whose requests stand on this process's identity (no session to set up).
fn session(conn: &Conn) -> Result<Client, ClientError> {
    let mut c = connect(conn)?;
    c.authenticate_as_peer()?;
    Ok(c)
}

/// The `jobs.start` params of `warden jobs exec`; `cwd` defaults to ours when `local`.
fn start_params(a: &ExecArgs, local: bool) -> anyhow::Result<Value> {
    let mut limits = serde_json::Map::new();
    if let Some(cpu) = a.cpu {
        limits.insert("cpu".into(), json!(cpu));
    }
    if let Some(m) = &a.memory {
        let n = wardend::units::parse_size(m).map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
        limits.insert("memory".into(), json!(n));
    }
    if let Some(p) = a.pids {
        limits.insert("pids".into(), json!(p));
    }
    let mut io: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for (flag, key, items) in [
        ("--io-read-bps", "read_bps", &a.io_read_bps),
        ("--io-write-bps", "write_bps", &a.io_write_bps),
        ("--io-read-iops", "read_iops", &a.io_read_iops),
        ("--io-write-iops", "write_iops", &a.io_write_iops),
    ] {
        for item in items {
            let (dev, rate) = item
                .rsplit_once('=')
                .with_context(|| format!("{flag} {item}: expected DEVICE=RATE"))?;
            let dev = device_number(dev).with_context(|| format!("{flag} {item}"))?;
            let n = if key.ends_with("bps") {
                wardend::units::parse_size(rate).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?
            } else {
                rate.parse::<u64>()
                    .with_context(|| format!("{flag} {item}: expected a count"))?
            };
            io.entry(dev.clone())
                .or_insert_with(|| {
                    let mut m = serde_json::Map::new();
                    m.insert("device".into(), json!(dev));
                    m
                })
                .insert(key.into(), json!(n));
        }
    }
    if !io.is_empty() {
        limits.insert("io".into(), json!(io.into_values().collect::<Vec<_>>()));
    }
    let mut env = serde_json::Map::new();
    for e in &a.env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("--env {e}: expected NAME=VALUE"))?;
        env.insert(k.into(), json!(v));
    }
    let cwd = match &a.cwd {
        Some(c) => Some(c.clone()),
        None if local => Some(
            std::env::current_dir()
                .context("cannot read the current directory")?
                .to_string_lossy()
                .into_owned(),
        ),
        None => None,
    };
    let mut params = json!({
        "command": a.command,
        "env": env,
        "limits": limits,
        "network": !a.no_network,
    });
    if let Some(cwd) = cwd {
        params["cwd"] = json!(cwd);
    }
    Ok(params)
}

fn exec(a: ExecArgs) -> anyhow::Result<i32> {
    let params = start_params(&a, true)?;
    let mut c = session(&a.conn)?;
    if a.detach {
        let started = c.call("jobs.start", params)?;
        let id = started["id"]
            .as_str()
            .context("the daemon's reply has no job id")?;
        println!("{id}");
        return Ok(0);
    }
    // Started and followed in one request (`jobs.run`).
    let interrupted = ctrl_c_flag()?;
    let mut id = String::new();
    let end = stream_output(
        &interrupted,
        |c, stop, on_output| {
            c.run(
                params,
                stop,
                |job| id = job["id"].as_str().unwrap_or_default().to_string(),
                on_output,
            )
        },
        &mut c,
    )?;
    match end {
        AttachEnd::Finished(v) => {
            if a.conn.json {
                eprintln!("{}", serde_json::to_string(&v["job"])?);
            }
            Ok(exit_code(&v["job"]))
        }
        AttachEnd::Interrupted if id.is_empty() => {
            // Ctrl-C before the daemon's first frame: the job may have started all the same.
            eprintln!("warden: interrupted before the daemon named the job (see warden jobs list)");
            Ok(130)
        }
        AttachEnd::Interrupted if a.rm => {
            let mut c = session(&a.conn)?;
            let v = c.call("jobs.stop", json!({ "id": id }))?;
            eprintln!("warden: job {id} stopped: {}", state_text(&v));
            Ok(exit_code(&v))
        }
        AttachEnd::Interrupted => {
            eprintln!(
                "warden: detached; job {id} keeps running (warden jobs attach {id}, warden jobs stop {id})"
            );
            Ok(130)
        }
    }
}

/// Streams output to our stdout and stderr until the stream ends or Ctrl-C.
fn follow(
    c: &mut Client,
    id: &str,
    from: u64,
    follow: bool,
    interrupted: &AtomicBool,
) -> anyhow::Result<AttachEnd> {
    stream_output(
        interrupted,
        |c, stop, on_output| c.attach(id, from, follow, stop, on_output),
        c,
    )
}

type OnOutput<'a> = &'a mut dyn FnMut(Output<'_>) -> std::io::Result<()>;

/// Runs `call` (an attach or a run) with output going to our stdout and stderr, until the
/// stream ends or Ctrl-C.
fn stream_output(
    interrupted: &AtomicBool,
    call: impl FnOnce(&mut Client, &dyn Fn() -> bool, OnOutput<'_>) -> Result<AttachEnd, ClientError>,
    c: &mut Client,
) -> anyhow::Result<AttachEnd> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let stop = || interrupted.load(Ordering::SeqCst);
    let mut on_output = |o: Output<'_>| match o {
        Output::Data { stream, bytes, .. } => match stream {
            OutputStream::Stdout => {
                let mut out = stdout.lock();
                out.write_all(bytes)?;
                out.flush()
            }
            OutputStream::Stderr => {
                let mut err = stderr.lock();
                err.write_all(bytes)?;
                err.flush()
            }
        },
        Output::Dropped { from, to } => {
            let mut err = stderr.lock();
            writeln!(
                err,
                "warden: [{} bytes of output dropped by the daemon: offsets {from}..{to}]",
                to - from
            )
        }
    };
    let end = call(c, &stop, &mut on_output);
    match end {
        Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            // Our own stdout went away (`| head`): stop reading; the job goes on.
            Ok(AttachEnd::Interrupted)
        }
        other => Ok(other?),
    }
}

/// A flag set by Ctrl-C (SIGINT). The handler only sets it; the client looks at it between
/// frames and whenever a read of the socket times out (every 100 ms), so detaching takes at
/// most that long. Installed before output starts, with no thread to start first: this is on
/// the path from `warden jobs exec` to the job's first byte.
fn ctrl_c_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, flag.clone())
        .context("cannot handle Ctrl-C")?;
    Ok(flag)
}

/// The exit code a job's end stands for: its own, 128+N for signal N, 137 for an OOM kill.
fn exit_code(job: &Value) -> i32 {
    let end = &job["end"];
    match end["reason"].as_str() {
        Some("exited") => end["exit_code"].as_i64().unwrap_or(1) as i32,
        Some("signaled") => 128 + end["signal"].as_i64().unwrap_or(0) as i32,
        Some("oom_killed") => 137,
        _ => 1,
    }
}

fn command_text(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let s = s.as_str().unwrap_or("");
                    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '\'') {
                        format!("'{}'", s.replace('\'', r"'\''"))
                    } else {
                        s.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// `running`, `exited 0`, `signaled 9 (SIGKILL)`, `oom_killed`.
fn state_text(job: &Value) -> String {
    let end = &job["end"];
    match end["reason"].as_str() {
        None => job["state"].as_str().unwrap_or("?").to_string(),
        Some("exited") => format!("exited {}", end["exit_code"]),
        Some("signaled") => format!(
            "signaled {} ({})",
            end["signal"],
            end["signal_name"].as_str().unwrap_or("?")
        ),
        Some(other) => other.to_string(),
    }
}

fn print_status(v: &Value) {
    let end = &v["end"];
    let reason = match end["reason"].as_str() {
        None => "running".to_string(),
        Some("exited") => format!("exited with code {}", end["exit_code"]),
        Some("signaled") => format!(
            "killed by signal {} ({})",
            end["signal"],
            end["signal_name"].as_str().unwrap_or("?")
        ),
        Some("oom_killed") => "killed by the OOM killer (memory limit reached)".to_string(),
        Some(other) => other.to_string(),
    };
    println!("id:       {}", v["id"].as_str().unwrap_or("?"));
    println!("command:  {}", command_text(&v["command"]));
    println!("state:    {reason}");
    if end["stop_requested"] == true {
        println!(
            "          stopped on request{}",
            if end["killed_after_grace"] == true {
                ", killed after the grace period"
            } else {
                ""
            }
        );
    }
    if end["pids_limit_hit"] == true {
        println!("          hit its pids limit");
    }
    println!("owner:    {}", v["owner"].as_str().unwrap_or("?"));
    println!("started:  {}", v["started_at"].as_str().unwrap_or("?"));
    if let Some(t) = v["ended_at"].as_str() {
        println!("ended:    {t}");
    }
    println!("limits:   {}", v["limits"]);
    println!(
        "network:  {}",
        if v["network"] == true {
            "host"
        } else {
            "loopback only"
        }
    );
    println!("output:   {} bytes", v["output_bytes"]);
    if !v["usage"].is_null() {
        println!("usage:    {}", v["usage"]);
    }
}

/// `MAJOR:MINOR` as given, or that of a block device node.
fn device_number(dev: &str) -> anyhow::Result<String> {
    if let Some((a, b)) = dev.split_once(':') {
        if a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok() {
            return Ok(dev.to_string());
        }
    }
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(dev).with_context(|| format!("cannot stat {dev}"))?;
    if !md.file_type().is_block_device() {
        bail!("{dev} is not a block device (nor MAJOR:MINOR)");
    }
    let d = md.rdev();
    // The glibc encoding of dev_t.
    let major = ((d >> 32) & 0xffff_f000) | ((d >> 8) & 0x0000_0fff);
    let minor = ((d >> 12) & 0xffff_ff00) | (d & 0x0000_00ff);
    Ok(format!("{major}:{minor}"))
}

/// An RFC 3339 time without its fraction of a second, for the table: `…T22:35:44.520898Z` →
/// `…T22:35:44Z`. Anything else is shown as it came.
fn whole_seconds(t: &str) -> String {
    match t.split_once('.') {
        Some((whole, rest)) => {
            let zone = rest.trim_start_matches(|c: char| c.is_ascii_digit());
            format!("{whole}{zone}")
        }
        None => t.to_string(),
    }
}

/// The jobs commands against a remote warden: the gateway's gRPC API over mutual TLS 1.3
/// (`warden_client::grpc`). Output and exit codes are the local commands' own.
mod remote {
    use super::{
        command_text, exit_code, print_status, start_params, state_text, whole_seconds,
        JobsCommand, Remote,
    };
    use anyhow::{bail, Context};
    use serde_json::{json, Value};
    use std::io::Write;
    use warden_client::grpc::{pb, warden_code, GrpcClient, Status};

    pub fn dispatch(cmd: JobsCommand) -> anyhow::Result<i32> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        rt.block_on(run(cmd))
    }

    async fn client(r: &Remote) -> anyhow::Result<GrpcClient> {
        let url = r.remote.as_deref().unwrap_or_default();
        let need = |v: &Option<std::path::PathBuf>, flag: &str, env: &str| {
            v.clone().with_context(|| {
                format!("--remote needs {flag} (or {env}): the mutual TLS of the gateway")
            })
        };
        let ca = need(&r.ca, "--ca", "WARDEN_CA")?;
        let cert = need(&r.cert, "--cert", "WARDEN_CLIENT_CERT")?;
        let key = need(&r.key, "--key", "WARDEN_CLIENT_KEY")?;
        Ok(GrpcClient::connect(url, &ca, &cert, &key).await?)
    }

    /// A status as the CLI reports it: the warden code when the gateway gave one.
    fn failed(s: Status) -> anyhow::Error {
        match warden_code(&s) {
            Some(_) => anyhow::anyhow!("{}", s.message()),
            None => anyhow::anyhow!("{:?}: {}", s.code(), s.message()),
        }
    }

    async fn run(cmd: JobsCommand) -> anyhow::Result<i32> {
        let c = client(&super::JobsCommand::remote(&cmd)).await?;
        let mut jobs = c.jobs();
        match cmd {
            JobsCommand::Exec(a) => {
                let req = start_request(&start_params(&a, false)?)?;
                let job = jobs.start(req).await.map_err(failed)?.into_inner();
                if a.detach {
                    println!("{}", job.id);
                    return Ok(0);
                }
                match attach(&c, &job.id, 0, true).await? {
                    Some(end) => {
                        let j = end.job.as_ref().map(job_value).unwrap_or(Value::Null);
                        if a.conn.json {
                            eprintln!("{}", serde_json::to_string(&j)?);
                        }
                        Ok(exit_code(&j))
                    }
                    None if a.rm => {
                        let stop = pb::StopRequest {
                            id: job.id.clone(),
                            grace: None,
                        };
                        let v = job_value(&jobs.stop(stop).await.map_err(failed)?.into_inner());
                        eprintln!("warden: job {} stopped: {}", job.id, state_text(&v));
                        Ok(exit_code(&v))
                    }
                    None => {
                        eprintln!(
                            "warden: detached; job {0} keeps running (warden jobs attach {0}, warden jobs stop {0})",
                            job.id
                        );
                        Ok(130)
                    }
                }
            }
            JobsCommand::List { all, conn, .. } => {
                let list = jobs
                    .list(pb::ListRequest { all })
                    .await
                    .map_err(failed)?
                    .into_inner();
                let v: Vec<Value> = list.jobs.iter().map(job_value).collect();
                if conn.json {
                    println!("{}", serde_json::to_string_pretty(&json!({ "jobs": v }))?);
                    return Ok(0);
                }
                println!("{:<36}  {:<24}  {:<20}  COMMAND", "ID", "STATE", "STARTED");
                for j in &v {
                    println!(
                        "{:<36}  {:<24}  {:<20}  {}",
                        j["id"].as_str().unwrap_or("?"),
                        state_text(j),
                        whole_seconds(j["started_at"].as_str().unwrap_or("?")),
                        command_text(&j["command"])
                    );
                }
                Ok(0)
            }
            JobsCommand::Status { id, conn, .. } => {
                let j = jobs
                    .status(pb::StatusRequest { id })
                    .await
                    .map_err(failed)?
                    .into_inner();
                let v = job_value(&j);
                if conn.json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print_status(&v);
                }
                Ok(0)
            }
            JobsCommand::Attach {
                id,
                from,
                no_follow,
                ..
            } => match attach(&c, &id, from, !no_follow).await? {
                Some(end) if end.complete => Ok(exit_code(
                    &end.job.as_ref().map(job_value).unwrap_or_default(),
                )),
                Some(_) => Ok(0),
                None => Ok(130),
            },
            JobsCommand::Stop {
                id, grace, conn, ..
            } => {
                let j = jobs
                    .stop(pb::StopRequest {
                        id: id.clone(),
                        grace,
                    })
                    .await
                    .map_err(failed)?
                    .into_inner();
                let v = job_value(&j);
                if conn.json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("{}: {}", id, state_text(&v));
                }
                Ok(0)
            }
        }
    }

    /// Streams a job's output to our stdout and stderr; its end, or `None` on Ctrl-C (or when
    /// our own stdout went away): the job goes on.
    async fn attach(
        c: &GrpcClient,
        id: &str,
        from: u64,
        follow: bool,
    ) -> anyhow::Result<Option<pb::AttachEnd>> {
        let req = pb::AttachRequest {
            id: id.to_string(),
            from,
            follow: Some(follow),
        };
        // The call itself returns with the first event (or the call's error), which for a quiet
        // job may take a while: Ctrl-C detaches here too.
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut jobs = c.jobs();
        let mut s = tokio::select! {
            r = jobs.attach(req) => r.map_err(failed)?.into_inner(),
            _ = sigint.recv() => return Ok(None),
        };
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        loop {
            let ev = tokio::select! {
                ev = s.message() => ev.map_err(failed)?,
                _ = sigint.recv() => return Ok(None),
            };
            let Some(ev) = ev else {
                bail!("the gateway ended the output stream without the job's end")
            };
            use pb::attach_event::Event;
            let written = match ev.event {
                Some(Event::Output(o)) => {
                    if o.stream == pb::Stream::Stderr as i32 {
                        let mut e = stderr.lock();
                        e.write_all(&o.data).and_then(|_| e.flush())
                    } else {
                        let mut out = stdout.lock();
                        out.write_all(&o.data).and_then(|_| out.flush())
                    }
                }
                Some(Event::Dropped(d)) => writeln!(
                    stderr.lock(),
                    "warden: [{} bytes of output dropped by the daemon: offsets {}..{}]",
                    d.to - d.from,
                    d.from,
                    d.to
                ),
                Some(Event::End(end)) => return Ok(Some(end)),
                None => Ok(()),
            };
            match written {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The `jobs.start` params (as the local command builds them) as the gRPC request.
    fn start_request(p: &Value) -> anyhow::Result<pb::StartRequest> {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let l = &p["limits"];
        let io = l["io"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| pb::IoLimit {
                        device: d["device"].as_str().unwrap_or_default().to_string(),
                        read_bps: d["read_bps"].as_u64(),
                        write_bps: d["write_bps"].as_u64(),
                        read_iops: d["read_iops"].as_u64(),
                        write_iops: d["write_iops"].as_u64(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let env = p["env"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(pb::StartRequest {
            command: strings(&p["command"]),
            env,
            cwd: p["cwd"].as_str().map(String::from),
            limits: Some(pb::Limits {
                cpu: l["cpu"].as_f64(),
                memory: l["memory"].as_u64(),
                pids: l["pids"].as_u64(),
                io,
            }),
            network: p["network"].as_bool(),
        })
    }

    /// A job as the local API shows it (docs/jobs.md), so the same printing serves both.
    pub fn job_value(j: &pb::Job) -> Value {
        let state = match pb::State::try_from(j.state) {
            Ok(pb::State::Running) => "running",
            Ok(pb::State::Ended) => "ended",
            _ => "unknown",
        };
        let end = j.end.as_ref().map(|e| {
            let mut v = json!({
                "reason": e.reason,
                "stop_requested": e.stop_requested,
                "killed_after_grace": e.killed_after_grace,
                "pids_limit_hit": e.pids_limit_hit,
            });
            if let Some(c) = e.exit_code {
                v["exit_code"] = json!(c);
            }
            if let Some(s) = e.signal {
                v["signal"] = json!(s);
            }
            if let Some(n) = &e.signal_name {
                v["signal_name"] = json!(n);
            }
            v
        });
        let mut v = json!({
            "id": j.id,
            "owner": j.owner,
            "command": j.command,
            "state": state,
            "started_at": j.started_at,
            "ended_at": j.ended_at,
            "pid": j.pid,
            "end": end,
        });
        if let Some(l) = &j.limits {
            v["limits"] = json!({
                "cpu": l.cpu, "memory": l.memory, "pids": l.pids,
                "io": l.io.iter().map(|d| json!({
                    "device": d.device, "read_bps": d.read_bps, "write_bps": d.write_bps,
                    "read_iops": d.read_iops, "write_iops": d.write_iops,
                })).collect::<Vec<_>>(),
            });
            v["network"] = json!(j.network);
            v["output_bytes"] = json!(j.output_bytes);
            v["usage"] = j.usage.as_ref().map_or(Value::Null, |u| {
                json!({
                    "runtime_ms": u.runtime_ms, "cpu_time_ms": u.cpu_time_ms,
                    "cpu_throttled_periods": u.cpu_throttled_periods,
                    "memory_peak": u.memory_peak, "oom_kills": u.oom_kills,
                    "pids_limit_hits": u.pids_limit_hits, "io_read_bytes": u.io_read_bytes,
                    "io_write_bytes": u.io_write_bytes,
                })
            });
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::whole_seconds;

    #[test]
    fn the_table_shows_times_to_the_second_with_their_zone() {
        assert_eq!(
            whole_seconds("2026-12-01T22:35:44.520898425Z"),
            "2026-12-01T22:35:44Z"
        );
        assert_eq!(
            whole_seconds("2026-12-01T22:35:44.5+01:00"),
            "2026-12-01T22:35:44+01:00"
        );
        assert_eq!(
            whole_seconds("2026-12-01T22:35:44Z"),
            "2026-12-01T22:35:44Z"
        );
        assert_eq!(whole_seconds("?"), "?");
    }
}
