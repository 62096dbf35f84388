//! Job benchmarks: start-to-first-output-byte (through the socket, through the CLI, and a raw
//! `unshare` of the same command in the same run), output throughput to one attached client,
//! and many clients following one large stream while the daemon's memory is sampled.
//!
//! All go through `warden-client`, as any Rust program would; the CLI case runs the real
//! `warden jobs exec`. Run against a daemon with rate limits off (dev mode).

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use warden_client::{AttachEnd, Client, Output, TokenType};

#[derive(Subcommand)]
pub enum JobsBench {
    /// Start-to-first-output-byte of `echo x` as a job (cgroup + PID + mount + IPC + UTS
    /// namespaces; with --netns a network namespace too), through the socket (`jobs.start` then
    /// `jobs.attach`, and one `jobs.run`) and through the CLI, beside `unshare --fork --pid
    /// --mount-proc [--net] echo x`
    Latency {
        #[arg(long, env = "WARDEN_SOCKET")]
        socket: PathBuf,
        /// The warden binary for the CLI case
        #[arg(long, default_value = "warden")]
        warden: PathBuf,
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Give jobs (and unshare) a new network namespace
        #[arg(long)]
        netns: bool,
    },
    /// Output throughput of `head -c BYTES /dev/zero` to one attached, following client
    Throughput {
        #[arg(long, env = "WARDEN_SOCKET")]
        socket: PathBuf,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Only binary output frames: no base64 run, no raw relay
        #[arg(long)]
        binary_only: bool,
    },
    /// CLIENTS clients follow one job writing BYTES from offset 0; the daemon's resident memory
    /// is sampled throughout
    Fanout {
        #[arg(long, env = "WARDEN_SOCKET")]
        socket: PathBuf,
        #[arg(long, default_value_t = 100)]
        clients: usize,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// The pid whose memory is sampled [default: core's, from daemon.status]
        #[arg(long)]
        pid: Option<u32>,
    },
}

pub fn run(cmd: JobsBench) -> anyhow::Result<()> {
    match cmd {
        JobsBench::Latency {
            socket,
            warden,
            iterations,
            netns,
        } => latency(&socket, &warden, iterations, netns),
        JobsBench::Throughput {
            socket,
            bytes,
            binary_only,
        } => throughput(&socket, bytes, binary_only),
        JobsBench::Fanout {
            socket,
            clients,
            bytes,
            pid,
        } => fanout(&socket, clients, bytes, pid),
    }
}

fn client(socket: &Path) -> anyhow::Result<Client> {
    let mut c = Client::connect(socket)?;
    c.login(TokenType::Session)?;
    Ok(c)
}

fn report(label: &str, mut us: Vec<u64>) {
    us.sort_unstable();
    let pct = |p: f64| {
        us.get(((us.len() as f64 * p) as usize).min(us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{label}: n={} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        us.len(),
        pct(0.5) as f64 / 1000.0,
        pct(0.9) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0,
        us.last().copied().unwrap_or(0) as f64 / 1000.0
    );
}

/// Time from spawning `cmd` to the first byte on its stdout.
fn first_byte_of(cmd: &mut Command) -> anyhow::Result<u64> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut b = [0u8; 1];
    let n = out.read(&mut b)?;
    let us = t0.elapsed().as_micros() as u64;
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let status = child.wait()?;
    if n == 0 || !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(us)
}

fn latency(socket: &Path, warden: &Path, iterations: usize, netns: bool) -> anyhow::Result<()> {
    let mut c = client(socket)?;
    let never = || false;
    let mut via_socket = Vec::with_capacity(iterations);
    let mut via_run = Vec::with_capacity(iterations);
    let mut via_cli = Vec::with_capacity(iterations);
    let mut raw = Vec::with_capacity(iterations);
    let ns = if netns { " + net" } else { "" };
    for _ in 0..iterations {
        // Socket: jobs.start, then jobs.attach until the first output frame.
        let t0 = Instant::now();
        let v = c.call(
            "jobs.start",
            json!({ "command": ["echo", "x"], "network": !netns }),
        )?;
        let id = v["id"].as_str().context("no job id")?.to_string();
        let mut first = None;
        c.attach(&id, 0, true, &never, |o| {
            if first.is_none() {
                if let Output::Data { .. } = o {
                    first = Some(t0.elapsed().as_micros() as u64);
                }
            }
            Ok(())
        })?;
        via_socket.push(first.context("no output")?);

        // Socket, one request: jobs.run starts the job and streams its output.
        let t0 = Instant::now();
        let mut first = None;
        c.run(
            json!({ "command": ["echo", "x"], "network": !netns }),
            &never,
            |_| {},
            |o| {
                if first.is_none() {
                    if let Output::Data { .. } = o {
                        first = Some(t0.elapsed().as_micros() as u64);
                    }
                }
                Ok(())
            },
        )?;
        via_run.push(first.context("no output")?);

        let mut cli = Command::new(warden);
        cli.args(["jobs", "exec"])
            .env("WARDEN_SOCKET", socket)
            .args(netns.then_some("--no-network"))
            .args(["--", "echo", "x"]);
        via_cli.push(first_byte_of(&mut cli)?);

        let mut un = Command::new("unshare");
        un.args(["--fork", "--pid", "--mount-proc"])
            .args(netns.then_some("--net"))
            .args(["echo", "x"]);
        raw.push(first_byte_of(&mut un)?);
    }
    report(
        &format!("start-to-first-byte, socket (cgroup + pid, mount, ipc, uts{ns})"),
        via_socket,
    );
    report(
        &format!("start-to-first-byte, socket, one `jobs.run` request (same{ns})"),
        via_run,
    );
    report(
        &format!("start-to-first-byte, CLI `warden jobs exec` (same{ns})"),
        via_cli,
    );
    report(
        &format!(
            "start-to-first-byte, raw `unshare --fork --pid --mount-proc{}`",
            if netns { " --net" } else { "" }
        ),
        raw,
    );
    Ok(())
}

fn start_zero(c: &mut Client, bytes: u64) -> anyhow::Result<String> {
    let v = c.call(
        "jobs.start",
        json!({ "command": ["head", "-c", bytes.to_string(), "/dev/zero"] }),
    )?;
    Ok(v["id"].as_str().context("no job id")?.to_string())
}

struct Followed {
    bytes: u64,
    dropped: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

fn follow(c: &mut Client, id: &str) -> anyhow::Result<Followed> {
    let never = || false;
    let mut f = Followed {
        bytes: 0,
        dropped: 0,
        first: None,
        last: None,
    };
    let end = c.attach(id, 0, true, &never, |o| {
        match o {
            Output::Data { bytes, .. } => {
                f.first.get_or_insert_with(Instant::now);
                f.bytes += bytes.len() as u64;
            }
            Output::Dropped { from, to } => f.dropped += to - from,
        }
        f.last = Some(Instant::now());
        Ok(())
    })?;
    if let AttachEnd::Finished(v) = end {
        if v["complete"] != true {
            bail!("stream ended incomplete: {v}");
        }
    }
    Ok(f)
}

/// One run with binary output frames (what the CLI uses), then one with base64 JSON frames,
/// then the raw relay below, so that all three are measured on the same machine at nearly the
/// same moment.
fn throughput(socket: &Path, bytes: u64, binary_only: bool) -> anyhow::Result<()> {
    throughput_one(socket, bytes, true)?;
    if binary_only {
        return Ok(());
    }
    throughput_one(socket, bytes, false)?;
    raw_relay(bytes)
}

/// The same bytes along the same path with no daemon: `head -c BYTES /dev/zero` into a pipe, a
/// thread moving them from the pipe into a Unix socket, this thread reading the socket. The
/// kernel copies are the daemon's, minus the spill file; it is what this machine can do.
fn raw_relay(bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let (mut rx, mut tx) = std::os::unix::net::UnixStream::pair()?;
    let mut child = Command::new("head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().context("no stdout")?;
    let relay = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match out.read(&mut buf)? {
                0 => return Ok(()),
                n => tx.write_all(&buf[..n])?,
            }
        }
    });
    let mut buf = vec![0u8; 256 << 10];
    let (mut got, mut first) = (0u64, None);
    loop {
        match rx.read(&mut buf)? {
            0 => break,
            n => {
                first.get_or_insert_with(Instant::now);
                got += n as u64;
            }
        }
    }
    let secs = first.map_or(1e-9, |f| f.elapsed().as_secs_f64().max(1e-9));
    relay
        .join()
        .map_err(|_| anyhow::anyhow!("relay panicked"))??;
    child.wait()?;
    println!(
        "raw relay, no daemon (head | pipe | thread | Unix socket | reader): {} MiB in {:.2} s = {:.2} GiB/s",
        got >> 20,
        secs,
        got as f64 / secs / (1u64 << 30) as f64
    );
    Ok(())
}

fn throughput_one(socket: &Path, bytes: u64, binary: bool) -> anyhow::Result<()> {
    let mut c = client(socket)?;
    c.set_binary_output(binary);
    let id = start_zero(&mut c, bytes)?;
    let f = follow(&mut c, &id)?;
    let secs = match (f.first, f.last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64().max(1e-9),
        _ => bail!("no output"),
    };
    println!(
        "throughput to one attached client, {} frames: {} MiB received ({} MiB dropped) in {:.2} s = {:.2} GiB/s",
        if binary { "binary" } else { "base64" },
        f.bytes >> 20,
        f.dropped >> 20,
        secs,
        f.bytes as f64 / secs / (1u64 << 30) as f64
    );
    Ok(())
}

fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn fanout(socket: &Path, clients: usize, bytes: u64, pid: Option<u32>) -> anyhow::Result<()> {
    let mut c = client(socket)?;
    // Core holds the jobs and their logs: under privilege separation `pid` is the monitor's.
    let pid = match pid {
        Some(p) => p,
        None => {
            let status = c.call("daemon.status", json!({}))?;
            status["components"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["role"] == "core"))
                .and_then(|c| c["pid"].as_u64())
                .or_else(|| status["pid"].as_u64())
                .context("daemon.status names no core pid")? as u32
        }
    };
    let token = c.token().context("no token")?.to_string();
    let (base, _) = rss_kib(pid).context("cannot read the daemon's memory")?;
    let id = start_zero(&mut c, bytes)?;
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(base));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some((rss, _)) = rss_kib(pid) {
                    peak.fetch_max(rss, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (socket, token, id) = (socket.to_path_buf(), token.clone(), id.clone());
            std::thread::spawn(move || -> anyhow::Result<Followed> {
                let mut c = Client::connect(&socket)?;
                c.set_token(Some(token));
                follow(&mut c, &id)
            })
        })
        .collect();
    let mut got = Vec::new();
    for h in handles {
        got.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))??,
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let total: u64 = got.iter().map(|f| f.bytes).sum();
    let dropped: u64 = got.iter().map(|f| f.dropped).sum();
    let complete = got.iter().filter(|f| f.bytes + f.dropped == bytes).count();
    let (_, hwm) = rss_kib(pid).unwrap_or((0, 0));
    println!(
        "fan-out: {clients} clients following a {} MiB stream: {complete}/{clients} complete in {secs:.1} s, {} MiB delivered ({:.2} GiB/s aggregate), {} MiB dropped for slow readers; daemon RSS {} MiB before, peak {} MiB sampled (VmHWM {} MiB)",
        bytes >> 20,
        total >> 20,
        total as f64 / secs / (1u64 << 30) as f64,
        dropped >> 20,
        base >> 10,
        peak.load(Ordering::SeqCst) >> 10,
        hwm >> 10
    );
    Ok(())
}
