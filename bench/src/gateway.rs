//! `warden-bench gateway`: the mTLS gateway against the Unix socket, in one run.
//!
//! - `rest`: N keep-alive HTTPS/1.1 connections with the dev client certificate, each reading
//!   `GET /secrets/{key}` in a closed loop; then the same reads (`secrets.get`) on N Unix socket
//!   connections to the same daemon. Both go through core's one pipeline, audit included.
//! - `attach`: a job writing SIZE bytes to stdout, followed to the end with `warden jobs exec`,
//!   over gRPC through the gateway and over the Unix socket (binary frames); the bytes the
//!   client received per second of the run.
//!
//! Started as root, the dev daemon runs as monitor, core and gateway: the gateway's requests
//! cross the core↔gateway channel, as deployed.

use crate::failover::{client_config, Dev};
use anyhow::{bail, Context};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand)]
pub enum GatewayBench {
    /// `GET /secrets/{key}` over keep-alive mTLS connections beside `secrets.get` on the socket
    Rest {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long)]
        warden: Option<PathBuf>,
    },
    /// A job's output followed over gRPC beside the same over the socket
    Attach {
        /// Bytes the job writes
        #[arg(long, default_value_t = 512 << 20)]
        size: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long)]
        warden: Option<PathBuf>,
    },
}

fn warden_path(w: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match w {
        Some(w) => w,
        None => std::env::current_exe()?.with_file_name("warden"),
    })
}

pub fn run(cmd: GatewayBench) -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    match cmd {
        GatewayBench::Rest {
            seconds,
            connections,
            warden,
        } => {
            let mut d = Dev::start(&warden_path(warden)?, state.path())?;
            let r = rest(&d, Duration::from_secs(seconds), connections);
            d.stop();
            r
        }
        GatewayBench::Attach {
            size,
            rounds,
            warden,
        } => {
            let warden = warden_path(warden)?;
            let mut d = Dev::start(&warden, state.path())?;
            let r = attach(&d, &warden, size, rounds);
            d.stop();
            r
        }
    }
}

fn report(name: &str, lat: &mut [u32], secs: f64) -> f64 {
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    let rate = lat.len() as f64 / secs;
    println!(
        "{name:<44} {rate:>9.0} req/s   p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms",
        p(0.5),
        p(0.99),
        p(0.999)
    );
    rate
}

/// Runs `conns` closed loops of `one` for `dur`; per-request latencies in µs.
fn closed_loop<C: Send + 'static>(
    conns: Vec<C>,
    dur: Duration,
    one: fn(&mut C) -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<u32>, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let threads: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let stop = stop.clone();
            let errors = errors.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(1 << 18);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if one(&mut c).is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    lat.push(t.elapsed().as_micros() as u32);
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    if errors.load(Ordering::Relaxed) > 0 {
        bail!("{} connections failed", errors.load(Ordering::Relaxed));
    }
    Ok((all, secs))
}

/// One keep-alive HTTPS/1.1 connection and the request it repeats.
struct Https {
    s: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Https {
    fn open(
        tls: &Arc<rustls::ClientConfig>,
        addr: &str,
        request: Vec<u8>,
    ) -> anyhow::Result<Https> {
        let tcp = std::net::TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
        let conn = rustls::ClientConnection::new(tls.clone(), name)?;
        Ok(Https {
            s: rustls::StreamOwned::new(conn, tcp),
            request,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends the request and reads one response (headers, then Content-Length bytes); its
    /// status line must say 200.
    fn once(&mut self) -> anyhow::Result<()> {
        self.s.write_all(&self.request)?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                bail!("the gateway closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..head_end])?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{head}");
        }
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("no content-length")?;
        while self.buf.len() < head_end + len {
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                bail!("the gateway closed the connection mid-body");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }
}

fn rest(d: &Dev, dur: Duration, n: usize) -> anyhow::Result<()> {
    let socket = PathBuf::from(&d.env["WARDEN_SOCKET"]);
    let mut c = warden_client::Client::connect(&socket)?;
    c.login(warden_client::TokenType::Session)?;
    c.call(
        "secrets.set",
        json!({"key": "bench", "value": "x".repeat(32)}),
    )?;
    let tls = client_config(&d.env)?;
    let addr = d.env["WARDEN_LISTEN"].clone();
    // A session through the gateway, for the certificate.
    let mut auth = Https::open(&tls, &addr, Vec::new())?;
    let body = r#"{"client_id":"bench","metadata":{}}"#;
    auth.request = format!(
        "POST /auth/validate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    auth.once()?;
    let text = String::from_utf8_lossy(&auth.buf).into_owned();
    let json_start = text.find("\r\n\r\n").context("no body")? + 4;
    let v: serde_json::Value = serde_json::from_str(&text[json_start..])?;
    let token = v["data"]["token"].as_str().context("no token")?.to_string();
    let request = format!(
        "GET /secrets/bench HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes();
    let conns = (0..n)
        .map(|_| Https::open(&tls, &addr, request.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!(
        "{n} connections, {} s each, one dev daemon (monitor, core, gateway):",
        dur.as_secs()
    );
    let (mut lat, secs) = closed_loop(conns, dur, Https::once)?;
    let gw = report("REST GET /secrets/{key}, mTLS keep-alive", &mut lat, secs);

    struct Sock(warden_client::Client);
    // One session shared by every connection, as on the gateway side.
    let shared = c.login(warden_client::TokenType::Session)?["token"]
        .as_str()
        .context("no token")?
        .to_string();
    let conns = (0..n)
        .map(|_| {
            let mut c = warden_client::Client::connect(&socket)?;
            c.set_token(Some(shared.clone()));
            Ok(Sock(c))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (mut lat, secs) = closed_loop(conns, dur, |c: &mut Sock| {
        c.0.call("secrets.get", json!({"key": "bench"}))?;
        Ok(())
    })?;
    let unix = report("secrets.get, Unix socket", &mut lat, secs);
    println!("gateway / socket: {:.2}×", gw / unix);
    Ok(())
}

/// Runs `warden jobs exec [remote] -- head -c SIZE /dev/zero`; the bytes received and the time.
fn exec_job(
    warden: &std::path::Path,
    env: &std::collections::HashMap<String, String>,
    remote: bool,
    size: u64,
) -> anyhow::Result<(u64, Duration)> {
    let mut cmd = Command::new(warden);
    cmd.args(["jobs", "exec"]);
    if remote {
        cmd.arg("--remote")
            .arg(format!("https://{}", env["WARDEN_LISTEN"]))
            .env("WARDEN_CA", &env["WARDEN_CA"])
            .env("WARDEN_CLIENT_CERT", &env["WARDEN_CLIENT_CERT"])
            .env("WARDEN_CLIENT_KEY", &env["WARDEN_CLIENT_KEY"]);
    }
    cmd.args(["--", "head", "-c", &size.to_string(), "/dev/zero"])
        .env("WARDEN_SOCKET", &env["WARDEN_SOCKET"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let elapsed = t0.elapsed();
    let status = child.wait()?;
    let mut err = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .for_each(|l| {
            if !l.contains("dropped") {
                err.push_str(&l);
            }
        });
    if !status.success() {
        bail!("warden jobs exec failed ({status}): {err}");
    }
    Ok((got, elapsed))
}

fn attach(d: &Dev, warden: &std::path::Path, size: u64, rounds: usize) -> anyhow::Result<()> {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "a job writing {:.0} MiB to stdout, followed to its end with `warden jobs exec`:",
        mib(size)
    );
    for round in 0..rounds {
        for remote in [true, false] {
            let (got, t) = exec_job(warden, &d.env, remote, size)?;
            println!(
                "  round {round} {:<28} {:>7.0} MiB/s delivered ({:.0} of {:.0} MiB in {:.2} s)",
                if remote {
                    "gRPC through the gateway"
                } else {
                    "Unix socket, binary frames"
                },
                mib(got) / t.as_secs_f64(),
                mib(got),
                mib(size),
                t.as_secs_f64()
            );
        }
    }
    Ok(())
}
