//! warden-bench: a load generator for warden's two wire dialects, and a raw socket echo server
//! to measure it against in the same run.
//!
//! Each connection is one thread running closed-loop (send, wait for the reply, repeat, with
//! `--pipeline N` requests outstanding). Latency is measured per request from the moment it was
//! written to the moment its reply was read. Figures are printed per interval as well as in
//! total, so a decline over the run (a nonce store that gets slower as it fills) shows.

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
    /// Frames of the same size as a signed Lumo ping, sent to the echo server
    Echo,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a raw length-prefixed echo on a Unix socket (the baseline)
    EchoServer {
        #[arg(long)]
        socket: PathBuf,
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
        /// The HMAC key (lumo-ping)
        #[arg(long, env = "WARDEN_HMAC_KEY_FILE")]
        key: Option<PathBuf>,
        /// Seconds per reported interval
        #[arg(long, default_value_t = 10)]
        interval: u64,
        /// Label printed with the results
        #[arg(long)]
        label: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::EchoServer { socket } => echo_server(socket),
        Cmd::Jobs { cmd } => jobs::run(cmd),
        Cmd::Load {
            socket,
            workload,
            connections,
            duration,
            pipeline,
            key,
            interval,
            label,
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
                key,
                interval: Duration::from_secs(interval.max(1)),
                label,
            })
        }
    }
}

/// One thread per connection, like the simplest servers people compare against.
fn echo_server(socket: PathBuf) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    println!("ECHO_READY=1");
    std::io::stdout().flush()?;
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
    key: Vec<u8>,
    interval: Duration,
    label: String,
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
    let token = if spec.workload == Workload::TokenPing {
        login(&spec.socket)?
    } else {
        String::new()
    };
    for conn in 0..spec.connections {
        let token = token.clone();
        let spec = spec.clone();
        let stop = stop.clone();
        let done = done.clone();
        let mut s = UnixStream::connect(&spec.socket)
            .with_context(|| format!("connecting to {}", spec.socket.display()))?;
        handles.push(std::thread::spawn(move || -> anyhow::Result<ConnResult> {
            let maker = RequestMaker {
                workload: spec.workload,
                key: spec.key.clone(),
                token,
                conn,
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
                if spec.workload != Workload::Echo
                    && !reply.windows(4).any(|w| w == b"true" || w == b"\"ok")
                {
                    errors += 1;
                    if errors == 1 {
                        eprintln!("error reply: {}", String::from_utf8_lossy(&reply));
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(ConnResult {
                latencies_us: latencies,
                errors,
            })
        }));
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
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        all.extend_from_slice(&r.latencies_us);
        errors += r.errors;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let total = all.len() as f64;
    println!(
        "{}: {} requests in {:.1} s = {:.0} req/s, p50 {} us, p99 {} us, p99.9 {} us, errors {}, connections {}, pipeline {}",
        spec.label,
        all.len(),
        elapsed,
        total / elapsed,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        errors,
        spec.connections,
        spec.pipeline
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
