//! `warden jobs …`: run a command as a job and stream its output, list, inspect, re-attach to
//! and stop jobs. Built on `warden-client`; the daemon does the work (see `docs/jobs.md`).

use crate::cli::{connect, Conn};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use warden_client::{AttachEnd, Client, ClientError, Output, OutputStream, TokenType};

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

pub fn dispatch(cmd: JobsCommand) -> anyhow::Result<i32> {
    match cmd {
        JobsCommand::Exec(a) => exec(a),
        JobsCommand::List { all, conn } => {
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
        JobsCommand::Status { id, conn } => {
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
        } => {
            let mut c = session(&conn)?;
            let interrupted = ctrl_c_flag();
            let end = follow(&mut c, &id, from, !no_follow, &interrupted)?;
            match end {
                AttachEnd::Finished(v) if v["complete"] == true => Ok(exit_code(&v["job"])),
                AttachEnd::Finished(_) => Ok(0),
                AttachEnd::Interrupted => Ok(130),
            }
        }
        JobsCommand::Stop { id, grace, conn } => {
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

fn session(conn: &Conn) -> Result<Client, ClientError> {
    let mut c = connect(conn)?;
    c.login(TokenType::Session)?;
    Ok(c)
}

fn exec(a: ExecArgs) -> anyhow::Result<i32> {
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
    let cwd = match a.cwd {
        Some(c) => c,
        None => std::env::current_dir()
            .context("cannot read the current directory")?
            .to_string_lossy()
            .into_owned(),
    };
    let params = json!({
        "command": a.command,
        "env": env,
        "cwd": cwd,
        "limits": limits,
        "network": !a.no_network,
    });
    let mut c = session(&a.conn)?;
    let started = c.call("jobs.start", params)?;
    let id = started["id"]
        .as_str()
        .context("the daemon's reply has no job id")?
        .to_string();
    if a.detach {
        println!("{id}");
        return Ok(0);
    }
    let interrupted = ctrl_c_flag();
    match follow(&mut c, &id, 0, true, &interrupted)? {
        AttachEnd::Finished(v) => {
            if a.conn.json {
                eprintln!("{}", serde_json::to_string(&v["job"])?);
            }
            Ok(exit_code(&v["job"]))
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
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let stop = || interrupted.load(Ordering::SeqCst);
    let end = c.attach(id, from, follow, &stop, |o| match o {
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
    });
    match end {
        Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            // Our own stdout went away (`| head`): stop reading; the job goes on.
            Ok(AttachEnd::Interrupted)
        }
        other => Ok(other?),
    }
}

/// A flag set by the first Ctrl-C (SIGINT), watched by a helper thread so that no signal
/// handler runs in our own code.
fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => return,
        };
        rt.block_on(async move {
            let sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
            let _ = ready_tx.send(());
            if let Ok(mut sig) = sig {
                sig.recv().await;
                f.store(true, Ordering::SeqCst);
            }
        });
    });
    // The handler is in place before output starts.
    let _ = ready_rx.recv();
    flag
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
