//! Privilege separation and supervision with the real processes: a dev daemon started as root
//! runs as monitor, core and gateway, exactly as deployed. These tests kill, stop and break
//! the children and watch the monitor replace them, re-pair them, and give up when it must.

mod common;

use common::{component_pid, Daemon};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};
use warden_client::{Client, TokenType};

macro_rules! need_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: privilege separation needs root");
            return;
        }
    };
}

fn kill(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

fn alive(pid: i32) -> bool {
    common::running(pid)
}

fn dev_gateway() -> Daemon {
    Daemon::dev_with(&["--listen", "127.0.0.1:0"])
}

/// `GET path` over mTLS with the dev client certificate; the HTTP status and body, or `None`
/// when no answer came (connection or handshake failed).
fn https(d: &Daemon, path: &str, token: Option<&str>) -> Option<(u16, Value)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "5", "--cacert"])
        .arg(&d.env["WARDEN_CA"])
        .arg("--cert")
        .arg(&d.env["WARDEN_CLIENT_CERT"])
        .arg("--key")
        .arg(&d.env["WARDEN_CLIENT_KEY"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd
        .arg(format!("https://{}{path}", d.env["WARDEN_LISTEN"]))
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// A session token through the gateway (REST `POST /auth/validate`).
fn rest_token(d: &Daemon) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(&d.env["WARDEN_CA"])
        .arg("--cert")
        .arg(&d.env["WARDEN_CLIENT_CERT"])
        .arg("--key")
        .arg(&d.env["WARDEN_CLIENT_KEY"])
        .args([
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"client_id":"t","metadata":{}}"#,
        ])
        .arg(format!("https://{}/auth/validate", d.env["WARDEN_LISTEN"]))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["data"]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {v}"))
        .to_string()
}

fn client(d: &Daemon) -> Client {
    let mut c = Client::connect(&d.socket()).unwrap();
    c.login(TokenType::Session).unwrap();
    c
}

fn status(d: &Daemon) -> Value {
    client(d).call("daemon.status", json!({})).unwrap()
}

fn component<'a>(status: &'a Value, role: &str) -> &'a Value {
    status["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["role"] == role)
        .unwrap_or_else(|| panic!("no {role} in {status}"))
}

/// Polls until `f` holds; the time it took.
fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if f() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_root_dev_daemon_runs_as_monitor_core_and_an_unprivileged_gateway() {
    need_root!();
    let d = dev_gateway();
    let core = d.component_pid("core").expect("a core process");
    let gw = d.component_pid("gateway").expect("a gateway process");
    let s = status(&d);
    assert_eq!(s["mode"], "privsep", "{s}");
    assert_eq!(s["pid"], d.pid(), "the daemon's pid is the monitor's: {s}");
    assert_eq!(component(&s, "core")["pid"], core, "{s}");
    assert_eq!(component(&s, "gateway")["pid"], gw, "{s}");
    assert_eq!(component(&s, "monitor")["pid"], d.pid(), "{s}");

    // The gateway is nobody for good, with no way back and nothing inherited from systemd.
    let st = std::fs::read_to_string(format!("/proc/{gw}/status")).unwrap();
    let field = |k: &str| {
        st.lines()
            .find(|l| l.starts_with(k))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{st}");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534", "{st}");
    assert_eq!(field("NoNewPrivs:"), "1", "{st}");
    // Core is root and holds the secrets; the gateway cannot read core's memory.
    let cst = std::fs::read_to_string(format!("/proc/{core}/status")).unwrap();
    assert!(cst.contains("Uid:\t0\t0\t0\t0"), "{cst}");

    // Only descriptors 0-2 and the sockets it needs: nothing leaked from core or the monitor.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{gw}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        fds.iter()
            .all(|l| !l.contains("audit.log") && !l.contains("secrets")),
        "{fds:?}"
    );

    // The CLI shows every component.
    let out = d.cli(&["daemon", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("privilege separation"), "{text}");
    for (role, pid) in [("monitor", d.pid()), ("core", core), ("gateway", gw)] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(role) && l.contains(&pid.to_string())),
            "{role} {pid}: {text}"
        );
    }
}

#[test]
fn kill_9_of_the_gateway_brings_a_new_one_within_a_second_and_core_keeps_its_state() {
    need_root!();
    let d = dev_gateway();
    let mut c = client(&d);
    c.call("secrets.set", json!({"key": "db", "value": "hunter2"}))
        .unwrap();
    let job = c
        .call("jobs.start", json!({"command": ["sleep", "60"]}))
        .unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    let token = rest_token(&d);
    let (code, body) = https(&d, "/secrets/db", Some(&token)).unwrap();
    assert_eq!(code, 200, "{body}");

    let core = d.core_pid();
    let old = d.component_pid("gateway").unwrap();
    kill(old, nix::sys::signal::Signal::SIGKILL);
    let took = until(Duration::from_secs(10), "a new gateway serves", || {
        matches!(https(&d, "/secrets/db", Some(&token)), Some((200, _)))
    });
    assert!(
        took < Duration::from_secs(1),
        "the gateway took {took:?} to come back"
    );
    let new = d.component_pid("gateway").unwrap();
    assert_ne!(new, old);
    assert!(!alive(old));
    // Core never noticed: same process, still unsealed, the same session, the job running.
    assert_eq!(d.core_pid(), core);
    let (_, body) = https(&d, "/secrets/db", Some(&token)).unwrap();
    assert_eq!(body["data"]["value"], "hunter2", "{body}");
    let st = c.call("jobs.status", json!({"id": job_id})).unwrap();
    assert_eq!(st["state"], "running", "{st}");
    let s = status(&d);
    assert_eq!(s["sealed"], false);
    assert_eq!(component(&s, "gateway")["restarts"], 1, "{s}");
    assert_eq!(component(&s, "core")["restarts"], 0, "{s}");
    c.call("jobs.stop", json!({"id": job_id})).unwrap();
}

#[test]
fn a_stopped_gateway_is_found_hung_killed_and_replaced() {
    need_root!();
    let d = dev_gateway();
    let old = d.component_pid("gateway").unwrap();
    kill(old, nix::sys::signal::Signal::SIGSTOP);
    // Defaults: a heartbeat each second, three missed → hung. Found within interval ×
    // tolerance (plus the heartbeat that was already on its way, and scheduling).
    let took = until(
        Duration::from_secs(15),
        "the stopped gateway is replaced",
        || d.component_pid("gateway").is_some_and(|p| p != old),
    );
    assert!(took <= Duration::from_secs(5), "replaced after {took:?}");
    until(
        Duration::from_secs(5),
        "the stopped gateway is killed",
        || !alive(old),
    );
    assert!(
        d.stderr().contains("heartbeats unanswered"),
        "{}",
        d.stderr()
    );
    let token = rest_token(&d);
    assert!(matches!(https(&d, "/health", Some(&token)), Some((200, _))));
}

#[test]
fn kill_9_of_core_restarts_it_unsealed_and_pairs_it_with_the_gateway_again() {
    need_root!();
    let d = dev_gateway();
    client(&d)
        .call("secrets.set", json!({"key": "db", "value": "v1"}))
        .unwrap();
    let gw = d.component_pid("gateway").unwrap();
    let old = d.core_pid();
    kill(old, nix::sys::signal::Signal::SIGKILL);
    until(Duration::from_secs(20), "a new core", || {
        d.component_pid("core").is_some_and(|p| p != old)
    });
    // The Unix socket stayed bound in the monitor: the next connection is served by the new
    // core, which unsealed the store from the dev password file.
    let mut c = None;
    until(Duration::from_secs(20), "the new core serves", || {
        c = Client::connect(&d.socket())
            .and_then(|mut c| c.login(TokenType::Session).map(|_| c))
            .ok();
        c.is_some()
    });
    let mut c = c.unwrap();
    let v = c.call("secrets.get", json!({"key": "db"})).unwrap();
    assert_eq!(v["value"], "v1", "{v}");
    // The same gateway, re-paired with the new core: a request through it reaches core again
    // (a new session: sessions lived in the old core's memory).
    assert_eq!(d.component_pid("gateway"), Some(gw));
    let mut token = None;
    until(
        Duration::from_secs(10),
        "the gateway reaches the new core",
        || {
            let t = std::panic::catch_unwind(|| rest_token(&d)).ok();
            token = t;
            token.is_some()
        },
    );
    let (code, body) = https(&d, "/secrets/db", token.as_deref()).unwrap();
    assert_eq!(
        (code, &body["data"]["value"]),
        (200, &json!("v1")),
        "{body}"
    );
    let s = status(&d);
    assert_eq!(component(&s, "core")["restarts"], 1, "{s}");
    assert_eq!(component(&s, "gateway")["restarts"], 0, "{s}");
}

#[test]
fn a_gateway_that_crashes_at_every_start_makes_the_monitor_give_up() {
    need_root!();
    let mut d = dev_gateway();
    let state = std::path::PathBuf::from(&d.env["WARDEN_STATE_DIR"]);
    let core = d.core_pid();
    // Its key is gone: every new gateway fails while setting up TLS and exits.
    std::fs::remove_file(state.join("pki/issued/dev-server.key")).unwrap();
    kill(
        d.component_pid("gateway").unwrap(),
        nix::sys::signal::Signal::SIGKILL,
    );
    // Defaults: at most 5 restarts a minute, waits of 0, 100, 200, 400, 800 ms.
    let status = d
        .wait(Duration::from_secs(30))
        .expect("the monitor gives up");
    assert_eq!(status.code(), Some(1), "{}", d.stderr());
    let log = d.stderr();
    assert!(log.contains("too many restarts"), "{log}");
    assert!(!alive(core), "core outlived its monitor");
    assert!(!d.socket().exists(), "the socket is left behind");
}

#[test]
fn the_monitor_forwards_sighup_to_core_and_sigterm_stops_every_process() {
    need_root!();
    let mut d = dev_gateway();
    let core = d.core_pid();
    let gw = d.component_pid("gateway").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    // Dev mode has no file to re-read: core says so, and goes on serving.
    until(Duration::from_secs(10), "core handles SIGHUP", || {
        d.stderr().contains("reload")
    });
    assert_eq!(d.core_pid(), core);
    assert!(status(&d)["sealed"] == false);
    let st = d.stop();
    assert!(st.success(), "{st:?}");
    assert!(!alive(core) && !alive(gw));
    assert!(component_pid(d.pid(), "core").is_none());
    assert!(!d.socket().exists());
}

/// systemd's side: READY once everything serves, STATUS naming the children, WATCHDOG at half
/// the period; the children never see NOTIFY_SOCKET.
#[test]
fn the_monitor_speaks_sd_notify_and_keeps_it_from_its_children() {
    need_root!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let notify = path.display().to_string();
    let d = Daemon::dev_with_env(&[], |cmd| {
        cmd.env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "200000");
    });
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while !(got.contains("READY=1") && got.matches("WATCHDOG=1").count() >= 2) {
        assert!(t0.elapsed() < Duration::from_secs(10), "{got}");
        let n = sock.recv(&mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
        got.push('\n');
    }
    assert!(got.contains("STATUS=core pid"), "{got}");
    let core = d.core_pid();
    let env = std::fs::read(format!("/proc/{core}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&env).contains("NOTIFY_SOCKET"),
        "core inherited NOTIFY_SOCKET"
    );
}

#[test]
fn privsep_off_runs_one_process() {
    let toml = common::base_config(common::ROOT_ADMIN)
        .replace("[daemon]\n", "[daemon]\nprivsep = \"off\"\n");
    let d = Daemon::configured(&toml);
    assert!(d.component_pid("core").is_none());
    let s = status(&d);
    assert_eq!(s["mode"], "single", "{s}");
    assert_eq!(s["pid"], d.pid());
    assert_eq!(component(&s, "core")["pid"], d.pid(), "{s}");
}

/// A gRPC attach through the gateway process whose client stops reading: the stream is
/// flow-controlled across the core↔gateway channel (credit per frame), so the job runs to its
/// end, core waits for the client instead of queueing the output for it, and the client, once
/// it reads again, gets every byte in order — from one `jobs.attach` call in core, never cut
/// and resumed.
#[test]
fn a_remote_attach_that_stops_reading_is_held_back_by_credit_and_misses_nothing() {
    need_root!();
    use std::io::Read;
    let d = dev_gateway();
    let n = 6_000_000u64; // about 47 MB of output: far beyond every window and queue on the way
    let mut cmd = Command::new(common::warden_bin());
    cmd.args(["jobs", "exec", "--remote"])
        .arg(format!("https://{}", d.env["WARDEN_LISTEN"]))
        .env("WARDEN_CA", &d.env["WARDEN_CA"])
        .env("WARDEN_CLIENT_CERT", &d.env["WARDEN_CLIENT_CERT"])
        .env("WARDEN_CLIENT_KEY", &d.env["WARDEN_CLIENT_KEY"])
        .args(["--", "seq", "1", &n.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    // Read a little, then nothing while the job runs to its end.
    let mut first = vec![0u8; 4096];
    out.read_exact(&mut first).unwrap();
    let mut c = client(&d);
    until(Duration::from_secs(60), "the job ends", || {
        let jobs = c.call("jobs.list", json!({"all": true})).unwrap();
        jobs["jobs"]
            .as_array()
            .is_some_and(|a| a.iter().any(|j| j["state"] != "running"))
    });
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    first.extend_from_slice(&rest);
    let want: String = (1..=n).map(|i| format!("{i}\n")).collect();
    assert_eq!(first.len(), want.len(), "{err}");
    assert!(first == want.as_bytes(), "the output differs");
    let attaches = d
        .audit_lines()
        .iter()
        .filter(|r| r["method"] == "jobs.attach")
        .count();
    assert_eq!(attaches, 1, "the stream was cut and resumed");
}
