//! warden-bench: a load generator for warden's two wire dialects, and a raw socket echo server
//! to measure it against in the same run.
//!
//! Each connection runs closed-loop (send, wait for the reply, repeat, with `--pipeline N`
//! requests outstanding): with `--driver threads`, each on a blocking thread of its own; with
//! `--driver events` (the default), all of them on one thread around one `epoll` wait, which
//! leaves more of a small machine to the server being measured (see `event_loop.rs`). Latency is measured per request from the moment it was
//! written to the moment its reply was read. Figures are printed per interval as well as in
//! total, so a decline over the run (a nonce store that gets slower as it fills) shows.
//!
//! `file-write` compares one privileged operation end to end: `file.write` of a small file
//! through warden (a signed Lumo request on one connection, the atomic write with its two
//! fsyncs) against what a panel without warden runs for the same write, `sudo -n tee FILE`,
//! in the same run and on the same file.

mod event_loop;
mod failover;
mod gateway;
mod jobs;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
#[command(about = "Load generator for warden and a raw echo baseline")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Workload {
    /// HMAC-signed `system.ping` in the Lumo dialect
    LumoPing,
    /// `system.ping` with a session token in the securityd/warden dialect
    TokenPing,
    /// securityd `get_secret` with a session token (each read audited durably before its reply)
    GetSecret,
    /// Frames of the same size as a signed Lumo ping, sent to the echo server
    Echo,
}

/// How the load generator drives its connections.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Driver {
    /// All connections on one thread around one `epoll` wait
    Events,
    /// A blocking thread per connection
    Threads,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a raw length-prefixed echo on a Unix socket (the baseline)
    EchoServer {
        #[arg(long)]
        socket: PathBuf,
        /// One event loop for all connections, or a blocking thread for each
        #[arg(long, value_enum, default_value_t = Driver::Events)]
        driver: Driver,
    },
    /// Gateway crash (SIGKILL) to a serving replacement, under the monitor (needs root)
    Failover(failover::Args),
    /// The mTLS gateway beside the Unix socket: REST reads, gRPC attach (root: privsep)
    Gateway {
        #[command(subcommand)]
        cmd: gateway::GatewayBench,
    },
    /// Job benchmarks: start latency, output throughput, fan-out to many clients
    Jobs {
        #[command(subcommand)]
        cmd: jobs::JobsBench,
    },
    /// Drive load at a socket and print requests/s and latency percentiles
    Load {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, value_enum)]
        workload: Workload,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Seconds
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Requests outstanding per connection
        #[arg(long, default_value_t = 1)]
        pipeline: usize,
        /// One event loop for all connections, or a blocking thread for each
        #[arg(long, value_enum, default_value_t = Driver::Events)]
        driver: Driver,
        /// The HMAC key (lumo-ping)
        #[arg(long, env = "WARDEN_HMAC_KEY_FILE")]
        key: Option<PathBuf>,
        /// Seconds per reported interval
        #[arg(long, default_value_t = 10)]
        interval: u64,
        /// Label printed with the results
        #[arg(long)]
        label: Option<String>,
        /// The secret get-secret reads (set to a 32-byte value before the run)
        #[arg(long, default_value = "bench_secret")]
        secret: String,
    },
    /// Time unsealing a store of N secrets with the default KDF (the store is created and
    /// filled in DIR first if it is empty), and the resident memory afterwards
    Unseal {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1000)]
        secrets: usize,
        /// Unseals to time
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// `file.write` through warden against `sudo -n tee` writing the same file, per operation
    FileWrite {
        #[arg(long, env = "WARDEN_SOCKET")]
        socket: PathBuf,
        /// The HMAC key
        #[arg(long, env = "WARDEN_HMAC_KEY_FILE")]
        key: PathBuf,
        /// A directory file commands may write to (dev mode: WARDEN_FILES_DIR)
        #[arg(long, env = "WARDEN_FILES_DIR")]
        dir: PathBuf,
        /// Operations of each kind
        #[arg(long, default_value_t = 300)]
        iterations: usize,
        /// Bytes written per operation
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::EchoServer { socket, driver } => echo_server(socket, driver),
        Cmd::FileWrite {
            socket,
            key,
            dir,
            iterations,
            size,
        } => {
            let key = std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?;
            file_write(&socket, &key, &dir, iterations.max(1), size)
        }
        Cmd::Jobs { cmd } => jobs::run(cmd),
        Cmd::Failover(args) => failover::run(args),
        Cmd::Gateway { cmd } => gateway::run(cmd),
        Cmd::Load {
            socket,
            workload,
            connections,
            duration,
            pipeline,
            driver,
            key,
            interval,
            label,
            secret,
        } => {
            let key = match (workload, key) {
                (Workload::LumoPing, Some(k)) => {
                    std::fs::read(&k).with_context(|| format!("reading {}", k.display()))?
                }
                (Workload::LumoPing, None) => {
                    bail!("lumo-ping needs --key or WARDEN_HMAC_KEY_FILE")
                }
                _ => Vec::new(),
            };
            let label = label.unwrap_or_else(|| format!("{workload:?}"));
            load(LoadSpec {
                socket,
                workload,
                connections,
                duration: Duration::from_secs(duration),
                pipeline: pipeline.max(1),
                driver,
                key,
                interval: Duration::from_secs(interval.max(1)),
                label,
                secret,
            })
        }
        Cmd::Unseal {
            dir,
            secrets,
            rounds,
        } => unseal(dir, secrets, rounds),
    }
}

/// Creates (if needed) and fills a store with the default KDF, then times open + unseal.
fn unseal(dir: PathBuf, secrets: usize, rounds: usize) -> anyhow::Result<()> {
    use wardend::secrets::{SecretStore, StoreConfig, StoreError};
    const PASSWORD: &[u8] = b"warden-bench master password";
    let cfg = StoreConfig::new(&dir);
    match SecretStore::init(&cfg, PASSWORD) {
        Ok(()) | Err(StoreError::AlreadyExists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    {
        let s = SecretStore::open(cfg.clone())?;
        s.unseal(PASSWORD)?;
        let have = s.count();
        let t = Instant::now();
        for i in have..secrets {
            s.set(&format!("secret_{i:06}"), format!("{i:032}").as_bytes())?;
        }
        if secrets > have {
            println!(
                "filled {} secrets of 32 bytes in {:.1} s (one fdatasync each)",
                secrets - have,
                t.elapsed().as_secs_f64()
            );
        }
    }
    let mut times = Vec::new();
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        let s = SecretStore::open(cfg.clone())?;
        let report = s.unseal(PASSWORD)?;
        times.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(report.secrets >= secrets, "only {} secrets", report.secrets);
    }
    // Held open once more, to read the resident memory of an unsealed store.
    let s = SecretStore::open(cfg.clone())?;
    let report = s.unseal(PASSWORD)?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ?")
        .to_string();
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "unseal (open + Argon2id {} KiB x {} + decrypt {} values): min {:.3} s, median {:.3} s, max {:.3} s over {} rounds; memory locked: {}; {}",
        cfg.kdf.m_cost_kib,
        cfg.kdf.t_cost,
        report.values,
        times[0],
        times[times.len() / 2],
        times[times.len() - 1],
        times.len(),
        report.memory_locked,
        rss.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

/// The raw echo baseline: one event loop (`event_loop::echo_server`), or one thread per
/// connection, like the simplest servers people compare against.
fn echo_server(socket: PathBuf, driver: Driver) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    println!("ECHO_READY=1");
    std::io::stdout().flush()?;
    if driver == Driver::Events {
        return event_loop::echo_server(listener);
    }
    for stream in listener.incoming() {
        let mut s = stream?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut len = [0u8; 4];
            while s.read_exact(&mut len).is_ok() {
                let n = u32::from_be_bytes(len) as usize;
                if n > buf.len() || s.read_exact(&mut buf[..n]).is_err() {
                    return;
                }
                let mut out = Vec::with_capacity(4 + n);
                out.extend_from_slice(&len);
                out.extend_from_slice(&buf[..n]);
                if s.write_all(&out).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

struct LoadSpec {
    socket: PathBuf,
    workload: Workload,
    connections: usize,
    duration: Duration,
    pipeline: usize,
    driver: Driver,
    key: Vec<u8>,
    interval: Duration,
    label: String,
    secret: String,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Builds request `i` of connection `conn`.
struct RequestMaker {
    workload: Workload,
    key: Vec<u8>,
    token: String,
    conn: usize,
    secret: String,
}

impl RequestMaker {
    fn make(&self, i: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&[0, 0, 0, 0]);
        match self.workload {
            Workload::LumoPing | Workload::Echo => {
                let ts = now_unix();
                let nonce = format!(
                    "{:08x}-{:04x}-4000-8000-{:012x}",
                    std::process::id(),
                    self.conn,
                    i
                );
                let sig = if self.workload == Workload::LumoPing {
                    warden_wire::hmac::sign_hex(&self.key, "system.ping", "{}", ts, &nonce)
                } else {
                    "0".repeat(64)
                };
                write!(
                    out,
                    "{{\"command\":\"system.ping\",\"params\":{{}},\"timestamp\":{ts},\"nonce\":\"{nonce}\",\"signature\":\"{sig}\"}}"
                )
                .expect("write to Vec");
            }
            Workload::GetSecret => {
                write!(
                    out,
                    "{{\"action\":\"get_secret\",\"token\":\"{}\",\"key\":\"{}\"}}",
                    self.token, self.secret
                )
                .expect("write to Vec");
            }
            Workload::TokenPing => {
                write!(
                    out,
                    "{{\"action\":\"system.ping\",\"token\":\"{}\"}}",
                    self.token
                )
                .expect("write to Vec");
            }
        }
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
    }
}

fn read_frame(s: &mut UnixStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    s.read_exact(buf)
}

fn login(socket: &PathBuf) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    let req = b"{\"action\":\"auth\"}";
    let mut out = (req.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(req);
    s.write_all(&out)?;
    let mut buf = Vec::new();
    read_frame(&mut s, &mut buf)?;
    let v: serde_json::Value = serde_json::from_slice(&buf)?;
    v["data"]["token"]
        .as_str()
        .map(String::from)
        .context("auth failed")
}

/// Sets `name` to a 32-byte value, so that get-secret has something to read.
fn set_secret(socket: &PathBuf, token: &str, name: &str) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    let req = serde_json::json!({
        "action": "secrets.set",
        "token": token,
        "params": {"key": name, "value": "0123456789abcdef0123456789abcdef"},
    });
    let body = serde_json::to_vec(&req)?;
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    s.write_all(&out)?;
    let mut buf = Vec::new();
    read_frame(&mut s, &mut buf)?;
    let v: serde_json::Value = serde_json::from_slice(&buf)?;
    if v["status"] != "ok" {
        bail!("cannot set {name}: {v}");
    }
    Ok(())
}

/// A securityd reply with `"status":"ok"` or a Lumo reply with `"success":true`.
fn is_success(reply: &[u8]) -> bool {
    let has = |pat: &[u8]| reply.windows(pat.len()).any(|w| w == pat);
    has(b"\"status\":\"ok\"") || has(b"\"success\":true")
}

struct ConnResult {
    latencies_us: Vec<u32>,
    errors: u64,
}

fn load(spec: LoadSpec) -> anyhow::Result<()> {
    let spec = Arc::new(spec);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    // One token for all connections: tokens are bound to the principal, not the connection.
    let token = match spec.workload {
        Workload::TokenPing => login(&spec.socket)?,
        Workload::GetSecret => {
            let token = login(&spec.socket)?;
            set_secret(&spec.socket, &token, &spec.secret)?;
            token
        }
        _ => String::new(),
    };
    if spec.driver == Driver::Events {
        let (spec, stop, done, token) = (spec.clone(), stop.clone(), done.clone(), token.clone());
        handles.push(std::thread::spawn(move || {
            event_loop::run(&spec, &token, &stop, &done)
        }));
    }
    for conn in 0..spec.connections {
        if spec.driver != Driver::Threads {
            break;
        }
        let token = token.clone();
        let spec = spec.clone();
        let stop = stop.clone();
        let done = done.clone();
        let mut s = UnixStream::connect(&spec.socket)
            .with_context(|| format!("connecting to {}", spec.socket.display()))?;
        handles.push(std::thread::spawn(
            move || -> anyhow::Result<Vec<ConnResult>> {
                let maker = RequestMaker {
                    workload: spec.workload,
                    key: spec.key.clone(),
                    token,
                    conn,
                    secret: spec.secret.clone(),
                };
                let mut out = Vec::with_capacity(256);
                let mut reply = Vec::with_capacity(256);
                let mut sent_at = std::collections::VecDeque::with_capacity(spec.pipeline);
                let mut latencies = Vec::with_capacity(1 << 20);
                let mut errors = 0u64;
                let mut i = 0u64;
                loop {
                    while sent_at.len() < spec.pipeline && !stop.load(Ordering::Relaxed) {
                        maker.make(i, &mut out);
                        i += 1;
                        s.write_all(&out)?;
                        sent_at.push_back(Instant::now());
                    }
                    let Some(t0) = sent_at.pop_front() else { break };
                    read_frame(&mut s, &mut reply)?;
                    latencies.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    if spec.workload != Workload::Echo && !is_success(&reply) {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("error reply: {}", String::from_utf8_lossy(&reply));
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(vec![ConnResult {
                    latencies_us: latencies,
                    errors,
                }])
            },
        ));
    }
    let start = Instant::now();
    let mut last = 0u64;
    let mut intervals = Vec::new();
    while start.elapsed() < spec.duration {
        let left = spec.duration.saturating_sub(start.elapsed());
        std::thread::sleep(spec.interval.min(left));
        let now = done.load(Ordering::Relaxed);
        let rate = (now - last) as f64
            / spec
                .interval
                .min(left.max(Duration::from_millis(1)))
                .as_secs_f64();
        intervals.push(rate);
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        for r in h
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??
        {
            all.extend_from_slice(&r.latencies_us);
            errors += r.errors;
        }
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let total = all.len() as f64;
    println!(
        "{}: {} requests in {:.1} s = {:.0} req/s, p50 {} us, p99 {} us, p99.9 {} us, errors {}, connections {}, pipeline {}, driver {:?}",
        spec.label,
        all.len(),
        elapsed,
        total / elapsed,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        errors,
        spec.connections,
        spec.pipeline,
        spec.driver
    );
    println!(
        "{}: per-interval req/s: {}",
        spec.label,
        intervals
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

/// Mean, p50 and p99 of per-operation times, in microseconds.
fn summary(mut us: Vec<u64>) -> (f64, u64, u64) {
    us.sort_unstable();
    let mean = us.iter().sum::<u64>() as f64 / us.len().max(1) as f64;
    let at = |p: f64| us[((us.len() as f64 * p) as usize).min(us.len() - 1)];
    (mean, at(0.5), at(0.99))
}

fn file_write(
    socket: &std::path::Path,
    key: &[u8],
    dir: &std::path::Path,
    iterations: usize,
    size: usize,
) -> anyhow::Result<()> {
    use std::process::{Command, Stdio};
    let path = dir.join("bench-file-write.txt");
    let path_str = path.to_str().context("the directory must be UTF-8")?;
    let content = "warden ".repeat(size / 7 + 1)[..size].to_string();
    let params =
        serde_json::to_string(&serde_json::json!({ "path": path_str, "content": content }))?;

    // warden: one connection, one signed request at a time.
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let mut frame = Vec::with_capacity(params.len() + 256);
    let mut reply = Vec::new();
    let mut warden_us = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let ts = now_unix();
        let nonce = format!("bench-{}-{i}", std::process::id());
        let sig = warden_wire::hmac::sign_hex(key, "file.write", &params, ts, &nonce);
        frame.clear();
        frame.extend_from_slice(&[0; 4]);
        write!(
            frame,
            "{{\"command\":\"file.write\",\"params\":{params},\"timestamp\":{ts},\"nonce\":\"{nonce}\",\"signature\":\"{sig}\"}}"
        )?;
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let t0 = Instant::now();
        s.write_all(&frame)?;
        read_frame(&mut s, &mut reply)?;
        warden_us.push(t0.elapsed().as_micros() as u64);
        if !reply.windows(14).any(|w| w == b"\"success\":true") {
            bail!(
                "warden refused the write: {}",
                String::from_utf8_lossy(&reply)
            );
        }
    }
    if std::fs::read(&path)? != content.as_bytes() {
        bail!("warden did not write the expected content");
    }

    // sudo -n tee: a process per write, as a panel without a daemon does it.
    let mut sudo_us = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t0 = Instant::now();
        let mut child = Command::new("sudo")
            .args(["-n", "tee", path_str])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run sudo (apt-get install sudo)")?;
        child
            .stdin
            .take()
            .context("sudo has no stdin")?
            .write_all(content.as_bytes())?;
        let out = child.wait_with_output()?;
        sudo_us.push(t0.elapsed().as_micros() as u64);
        if !out.status.success() {
            bail!(
                "sudo -n tee failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let (wm, w50, w99) = summary(warden_us);
    let (sm, s50, s99) = summary(sudo_us);
    println!("file.write of {size} bytes, {iterations} operations each, same file ({path_str})");
    println!("warden file.write (atomic, audited): mean {wm:.0} us, p50 {w50} us, p99 {w99} us");
    println!("sudo -n tee:                      mean {sm:.0} us, p50 {s50} us, p99 {s99} us");
    println!(
        "warden is {:.1}x faster per operation (mean), {:.1}x (p50)",
        sm / wm.max(1.0),
        s50 as f64 / w50.max(1) as f64
    );
    Ok(())
}
