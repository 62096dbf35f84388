//! `warden-bench failover`: how long the gateway is away after a crash.
//!
//! Each round starts a dev daemon with a gateway (as root: monitor, core and an unprivileged
//! gateway), checks that `GET /health` answers over mTLS, kills the gateway with SIGKILL and
//! then tries a fresh mTLS connection with `GET /health` again and again until one answers 200.
//! The time from the kill to that answer is the round's figure: the monitor noticing, reaping,
//! re-executing the gateway, the gateway reading its TLS files and dropping privileges, the
//! pairing with core, and a full TLS handshake and request. The baseline of the same run is the
//! same fresh connection and request against a healthy gateway.
//!
//! A fresh daemon per round measures what the default restart policy does to the first crash
//! (an immediate restart); later crashes within `monitor.stable_after` wait a backoff by design.

use anyhow::{bail, Context};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// The warden binary [default: next to this one]
    #[arg(long)]
    warden: Option<PathBuf>,
    /// Rounds (one daemon, one crash each)
    #[arg(long, default_value_t = 30)]
    rounds: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("failover needs root: only a daemon started as root runs a separate gateway");
    }
    let warden = match args.warden {
        Some(w) => w,
        None => std::env::current_exe()?.with_file_name("warden"),
    };
    let state = tempfile::tempdir()?;
    let mut outages = Vec::new();
    let mut healthy = Vec::new();
    for round in 0..args.rounds {
        let mut d = Dev::start(&warden, state.path())?;
        let result = d.round();
        d.stop();
        let (outage, baseline) = result.with_context(|| format!("round {round}"))?;
        outages.push(outage);
        healthy.push(baseline);
    }
    outages.sort();
    healthy.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!(
        "gateway crash (SIGKILL) to a fresh mTLS `GET /health` answered 200, {} rounds:",
        outages.len()
    );
    println!(
        "  p50 {}  p90 {}  min {}  max {}",
        ms(pct(&outages, 0.5)),
        ms(pct(&outages, 0.9)),
        ms(outages[0]),
        ms(outages[outages.len() - 1])
    );
    println!(
        "baseline, the same fresh connection and request to a healthy gateway: p50 {}  p90 {}",
        ms(pct(&healthy, 0.5)),
        ms(pct(&healthy, 0.9))
    );
    Ok(())
}

pub(crate) struct Dev {
    pub(crate) child: Child,
    pub(crate) env: HashMap<String, String>,
}

impl Dev {
    pub(crate) fn start(warden: &Path, state: &Path) -> anyhow::Result<Dev> {
        let mut child = Command::new(warden)
            .args([
                "daemon",
                "run",
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(state)
            .env("WARDEN_LOG", "error")
            .env_remove("WARDEN_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", warden.display()))?;
        let mut env = HashMap::new();
        let out = BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            let line = line?;
            if line == "WARDEN_READY=1" {
                return Ok(Dev { child, env });
            }
            if let Some((k, v)) = line.split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
        bail!("the dev daemon exited before it was ready")
    }

    pub(crate) fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }

    /// One crash: (outage, healthy baseline).
    fn round(&mut self) -> anyhow::Result<(Duration, Duration)> {
        let tls = client_config(&self.env)?;
        let addr = self.env["WARDEN_LISTEN"].clone();
        // Healthy: a few fresh connections, the last one timed.
        let mut baseline = Duration::ZERO;
        for _ in 0..5 {
            let t = Instant::now();
            if !health(&tls, &addr)? {
                bail!("the gateway does not answer /health");
            }
            baseline = t.elapsed();
        }
        let gateway = gateway_pid(self.child.id() as i32).context("no gateway process")?;
        let t0 = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(gateway),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        loop {
            if health(&tls, &addr).unwrap_or(false) {
                return Ok((t0.elapsed(), baseline));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("no gateway 10 s after the crash");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

pub(crate) fn client_config(
    env: &HashMap<String, String>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&env["WARDEN_CA"])? {
        roots.add(c?)?;
    }
    let certs = CertificateDer::pem_file_iter(&env["WARDEN_CLIENT_CERT"])?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&env["WARDEN_CLIENT_KEY"])?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// A fresh TCP connection, TLS handshake and `GET /health`: answered 200?
fn health(tls: &Arc<rustls::ClientConfig>, addr: &str) -> anyhow::Result<bool> {
    let tcp = match std::net::TcpStream::connect(addr) {
        Ok(s) => s,
        Err(_) => return Ok(false),
    };
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
    let conn = rustls::ClientConnection::new(tls.clone(), name)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return Ok(false);
    }
    let mut head = [0u8; 12];
    match s.read_exact(&mut head) {
        Ok(()) => Ok(&head == b"HTTP/1.1 200"),
        Err(_) => Ok(false),
    }
}

/// The child of `monitor` running `warden internal gateway`.
fn gateway_pid(monitor: i32) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid != Some(monitor) {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains("\0internal\0gateway\0") {
            return Some(pid);
        }
    }
    None
}
