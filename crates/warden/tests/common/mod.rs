//! The end-to-end harness: starts the real `warden` binary (dev mode or with a configuration
//! file) on a temporary socket and talks to it through its real protocols.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn warden_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_warden"))
}

/// A running daemon; SIGTERM and wait on drop.
pub struct Daemon {
    pub child: Child,
    /// The core and gateway processes seen under this daemon's monitor: they die with it
    /// (`PR_SET_PDEATHSIG`), a moment after it; [`Daemon::wait`] waits for them too.
    seen: std::sync::Mutex<Vec<i32>>,
    pub env: HashMap<String, String>,
    pub dir: tempfile::TempDir,
    pub stderr_path: PathBuf,
}

impl Daemon {
    /// `warden daemon run --dev --state-dir <tmp>/state`
    pub fn dev() -> Daemon {
        Daemon::dev_with(&[])
    }

    /// Dev mode with extra arguments; a `--state-dir` among them replaces the temporary one.
    pub fn dev_with(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut args = vec!["daemon", "run", "--dev"];
        if !extra.contains(&"--state-dir") {
            args.extend_from_slice(&["--state-dir", state.to_str().unwrap()]);
        }
        args.extend_from_slice(extra);
        Daemon::spawn(dir, &args, None)
    }

    /// [`Daemon::dev_with`], with `tweak` changing the command (its environment) first.
    pub fn dev_with_env(extra: &[&str], tweak: impl FnOnce(&mut Command)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut args = vec![
            "daemon",
            "run",
            "--dev",
            "--state-dir",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Daemon::spawn_with(dir, &args, None, tweak)
    }

    /// `warden daemon run --config <tmp>/warden.toml` with `toml` as the file; `{dir}` in the
    /// text is replaced by the temporary directory.
    pub fn configured(toml: &str) -> Daemon {
        Daemon::configured_env(toml, &[])
    }

    /// [`Daemon::configured`] with changes to the daemon's environment: `Some(v)` sets a
    /// variable, `None` removes it — `("WARDEN_LOG", None)` lets `daemon.log_level` decide.
    pub fn configured_env(toml: &str, env: &[(&str, Option<&str>)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), toml);
        let args = ["daemon", "run", "--config", cfg.to_str().unwrap()];
        let socket = dir.path().join("warden.sock");
        let mut d = Daemon::spawn_with(dir, &args, Some(socket), |cmd| {
            for (k, v) in env {
                match v {
                    Some(v) => cmd.env(k, v),
                    None => cmd.env_remove(k),
                };
            }
        });
        let base = d.dir.path().to_path_buf();
        d.env.insert(
            "WARDEN_HMAC_KEY_FILE".into(),
            base.join("hmac.key").display().to_string(),
        );
        d.env.insert(
            "WARDEN_AUDIT_LOG".into(),
            base.join("audit.log").display().to_string(),
        );
        d.env.insert(
            "WARDEN_CONFIG".into(),
            base.join("warden.toml").display().to_string(),
        );
        d
    }

    /// `warden daemon run --config <dir>/warden.toml` plus `extra` arguments, on a directory
    /// the caller keeps (written with [`write_config`]), so that a test can stop the daemon and
    /// start another on the same files. Not for `config_path`: the file is in `dir`.
    pub fn configured_at(dir: &Path, extra: &[&str]) -> Daemon {
        let own = tempfile::tempdir().unwrap();
        let cfg = dir.join("warden.toml");
        let mut args = vec!["daemon", "run", "--config", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut d = Daemon::spawn(own, &args, Some(dir.join("warden.sock")));
        d.env.insert(
            "WARDEN_HMAC_KEY_FILE".into(),
            dir.join("hmac.key").display().to_string(),
        );
        d.env.insert(
            "WARDEN_AUDIT_LOG".into(),
            dir.join("audit.log").display().to_string(),
        );
        d.env
            .insert("WARDEN_CONFIG".into(), cfg.display().to_string());
        d
    }

    /// Runs the `warden` CLI with this daemon's environment and `input` on its stdin.
    pub fn cli_input(&self, args: &[&str], input: &[u8]) -> std::process::Output {
        let mut cmd = Command::new(warden_bin());
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// The configuration file of a configured daemon.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("warden.toml")
    }

    /// Dev mode run by another user (`Command::uid`/`gid`), with `state_dir` as its state
    /// directory (which that user must be able to create or own).
    pub fn dev_as(uid: u32, gid: u32, state_dir: &Path) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let args = [
            "daemon",
            "run",
            "--dev",
            "--state-dir",
            state_dir.to_str().unwrap(),
        ];
        Daemon::spawn_with(dir, &args, None, |cmd| {
            std::os::unix::process::CommandExt::uid(cmd, uid);
            std::os::unix::process::CommandExt::gid(cmd, gid);
        })
    }

    fn spawn(dir: tempfile::TempDir, args: &[&str], socket: Option<PathBuf>) -> Daemon {
        Daemon::spawn_with(dir, args, socket, |_| {})
    }

    /// Starts the daemon; `tweak` may change the command (environment, user) before it runs.
    fn spawn_with(
        dir: tempfile::TempDir,
        args: &[&str],
        socket: Option<PathBuf>,
        tweak: impl FnOnce(&mut Command),
    ) -> Daemon {
        let stderr_path = dir.path().join("daemon.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(warden_bin());
        cmd.args(args)
            .env_remove("WARDEN_SOCKET")
            .env_remove("WARDEN_CONFIG")
            .env("WARDEN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        tweak(&mut cmd);
        let mut child = cmd.spawn().expect("warden binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut env = HashMap::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((k, v)) = line.split_once('=') {
                    env.insert(k.to_string(), v.to_string());
                }
                if line == "WARDEN_READY=1" {
                    let _ = tx.send(env);
                    return;
                }
            }
        });
        let env = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(mut env) => {
                if let Some(s) = socket {
                    env.entry("WARDEN_SOCKET".into())
                        .or_insert(s.display().to_string());
                }
                env
            }
            Err(_) => {
                let _ = child.kill();
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("daemon did not become ready; stderr:\n{err}");
            }
        };
        let d = Daemon {
            child,
            env,
            dir,
            stderr_path,
            seen: std::sync::Mutex::new(Vec::new()),
        };
        d.component_pid("core");
        d.component_pid("gateway");
        d
    }

    pub fn socket(&self) -> PathBuf {
        PathBuf::from(&self.env["WARDEN_SOCKET"])
    }

    pub fn key(&self) -> Vec<u8> {
        std::fs::read(&self.env["WARDEN_HMAC_KEY_FILE"]).unwrap()
    }

    pub fn audit_log(&self) -> PathBuf {
        PathBuf::from(&self.env["WARDEN_AUDIT_LOG"])
    }

    /// The daemon's pid: the monitor's under privilege separation (a daemon started as root),
    /// the only process's otherwise.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The pid of the process that holds the daemon's state (secrets, audit writer, jobs):
    /// `core` under privilege separation, the daemon itself in single-process mode.
    pub fn core_pid(&self) -> i32 {
        self.component_pid("core").unwrap_or_else(|| self.pid())
    }

    /// The current `core` or `gateway` child of this daemon's monitor, found by parent pid and
    /// command line; `None` in single-process mode (or while it is being restarted).
    pub fn component_pid(&self, role: &str) -> Option<i32> {
        let pid = component_pid(self.pid(), role);
        if let Some(p) = pid {
            let mut seen = self.seen.lock().unwrap();
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
        pid
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.wait(Duration::from_secs(40))
            .expect("daemon exits after SIGTERM")
    }

    /// Waits for the daemon to exit: its own process, then the core and gateway processes it
    /// had (which a crashed monitor takes with it a moment later).
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_none() {
                self.component_pid("core");
                self.component_pid("gateway");
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                let seen = self.seen.lock().unwrap().clone();
                while seen.iter().any(|p| running(*p)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Runs the `warden` CLI with this daemon's environment.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(warden_bin());
        cmd.args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    pub fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until an audit record satisfies `pred` (the record is durable before the reply,
    /// but a rejected frame's record may land just after the connection closed).
    pub fn wait_audit(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.audit_lines().into_iter().find(|v| pred(v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "no matching audit record");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            if self.wait(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Writes `toml` (with `{dir}` replaced by `dir`) to `dir/warden.toml` and a fresh private key
/// to `dir/hmac.key`, as [`Daemon::configured`] does; returns the configuration's path.
pub fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let text = toml.replace("{dir}", dir.to_str().unwrap());
    let cfg = dir.join("warden.toml");
    std::fs::write(&cfg, text).unwrap();
    // Every configured daemon gets a key at {dir}/hmac.key, private as warden requires.
    let key = dir.join("hmac.key");
    std::fs::write(&key, format!("{:064x}", rand::random::<u128>())).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    cfg
}

/// Writes `password` to `dir/master` (mode 0600) and creates the secret store of
/// `dir/warden.toml` with it (`warden init`); returns the password file.
pub fn init_store(dir: &Path, password: &str) -> PathBuf {
    let pw = dir.join("master");
    std::fs::write(&pw, password).unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = Command::new(warden_bin())
        .args(["init", "--config"])
        .arg(dir.join("warden.toml"))
        .arg("--password-file")
        .arg(&pw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "warden init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pw
}

/// Runs a command that is expected to exit by itself (e.g. a daemon refusing to start) and
/// returns its status — `None` if it was still running after `limit` (it is then killed) —
/// with its stdout and stderr.
pub fn run_bounded(
    cmd: &mut Command,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status, read(&out_path), read(&err_path))
}

/// A configuration for tests: everything under `{dir}`, the socket open to every local user
/// (the policy decides), root allowed everything, `extra` appended.
pub fn base_config(extra: &str) -> String {
    format!(
        r#"[daemon]
pid_file = "{{dir}}/warden.pid"
log_file = "{{dir}}/warden.log"
shutdown_grace = "5s"

[socket]
path = "{{dir}}/warden.sock"
mode = "0666"

[auth]
hmac_key_file = "{{dir}}/hmac.key"

[audit]
path = "{{dir}}/audit.log"

{extra}
"#
    )
}

pub const ROOT_ADMIN: &str = r#"
[policy.roles.admin]
allow = ["*"]

[[policy.rules]]
uid = 0
roles = ["admin"]
"#;

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn nonce() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A raw client: either framing, bytes in and out, nothing hidden.
pub struct Raw {
    pub s: UnixStream,
    pub lines: bool,
}

impl Raw {
    pub fn lp(path: &Path) -> Raw {
        Raw::new(path, false)
    }
    pub fn lines(path: &Path) -> Raw {
        Raw::new(path, true)
    }
    fn new(path: &Path, lines: bool) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Raw { s, lines }
    }

    pub fn send_bytes(&mut self, payload: &[u8]) {
        if self.lines {
            let mut b = payload.to_vec();
            b.push(b'\n');
            self.s.write_all(&b).unwrap();
        } else {
            let mut b = (payload.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(payload);
            self.s.write_all(&b).unwrap();
        }
    }

    pub fn send(&mut self, v: &Value) {
        self.send_bytes(&serde_json::to_vec(v).unwrap());
    }

    /// One length-prefixed frame's bytes as they are (binary frames included), or None at EOF.
    pub fn recv_frame(&mut self) -> Option<Vec<u8>> {
        assert!(!self.lines, "recv_frame reads length-prefixed frames");
        let mut len = [0u8; 4];
        match self.s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("read: {e}"),
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.s.read_exact(&mut body).unwrap();
        Some(body)
    }

    /// One reply, or None at EOF.
    pub fn recv(&mut self) -> Option<Value> {
        if self.lines {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            loop {
                match self.s.read(&mut byte) {
                    Ok(0) => {
                        return if line.is_empty() {
                            None
                        } else {
                            panic!("torn line")
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                    Ok(_) if byte[0] == b'\n' => break,
                    Ok(_) => line.push(byte[0]),
                    Err(e) => panic!("read: {e}"),
                }
            }
            Some(serde_json::from_slice(&line).unwrap())
        } else {
            let body = self.recv_frame()?;
            Some(serde_json::from_slice(&body).unwrap())
        }
    }

    pub fn call(&mut self, v: &Value) -> Value {
        self.send(v);
        self.recv().expect("a reply")
    }

    /// True when the daemon has closed the connection (EOF on read).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0))
            || matches!(self.s.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

/// A Lumo request signed over the params exactly as given in `params_json`.
pub fn lumo_request(
    key: &[u8],
    command: &str,
    params_json: &str,
    timestamp: u64,
    nonce: &str,
) -> Vec<u8> {
    let sig = warden_wire::hmac::sign_hex(key, command, params_json, timestamp, nonce);
    format!(
        "{{\"command\":\"{command}\",\"params\":{params_json},\"timestamp\":{timestamp},\"nonce\":\"{nonce}\",\"signature\":\"{sig}\"}}"
    )
    .into_bytes()
}

pub fn lumo_ping(key: &[u8]) -> Vec<u8> {
    lumo_request(key, "system.ping", "{}", now(), &nonce())
}

/// A signed Lumo request, params in serde_json's (sorted) key order, on a connection of its own;
/// the whole reply, waited for up to `timeout` (commands that run apt need minutes).
pub fn lumo_call(d: &Daemon, command: &str, params: &Value, timeout: Duration) -> Value {
    let mut raw = Raw::lp(&d.socket());
    raw.s.set_read_timeout(Some(timeout)).unwrap();
    let pj = serde_json::to_string(params).unwrap();
    raw.send_bytes(&lumo_request(&d.key(), command, &pj, now(), &nonce()));
    raw.recv().expect("a reply")
}

/// The `data` of a Lumo reply that must have succeeded.
pub fn lumo_ok(r: &Value) -> Value {
    assert_eq!(r["success"], true, "expected success: {r}");
    r["data"].clone()
}

/// The error code of a Lumo reply that must have failed.
pub fn lumo_code(r: &Value) -> String {
    assert_eq!(r["success"], false, "expected a failure: {r}");
    r["error"]["code"].as_str().unwrap().to_string()
}

/// securityd `auth` then the token.
pub fn login(raw: &mut Raw) -> String {
    let r = raw.call(&json!({"action": "auth"}));
    assert_eq!(r["status"], "ok", "{r}");
    r["data"]["token"].as_str().unwrap().to_string()
}

/// The child of `monitor` running `warden internal ROLE`.
pub fn component_pid(monitor: i32, role: &str) -> Option<i32> {
    let want = format!("\0internal\0{role}\0");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (ppid) comes after the parenthesised command name.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next();
        let ppid = f.next().and_then(|p| p.parse::<i32>().ok());
        if ppid != Some(monitor) || state == Some("Z") {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&want) {
            return Some(pid);
        }
    }
    None
}

/// Whether any thread of process `pid` is still alive (not gone, not a zombie). The leader of a
/// killed multi-threaded process turns zombie before its other threads have exited and closed
/// the process's descriptors, so the leader's state alone does not say the process is gone.
pub fn running(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .map(|s| {
                let state = s.rsplit(')').next().unwrap_or("").trim_start();
                !(state.starts_with('Z') || state.starts_with('X'))
            })
            .unwrap_or(false)
    })
}
