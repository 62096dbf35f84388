//! Every configuration key, applied: each test starts the real daemon with one key set to a
//! value other than its default and shows the behaviour that value asks for.
//!
//! Keys with no test here: `limits.max_connections` and `rate_limits.system` (attacks.rs),
//! `rate_limits.jobs` and the `[jobs]` section (jobs.rs; `jobs.remote_user` in
//! crates/wardend/tests/grpc.rs and grpc_remote.rs), and `rate_limits.secrets`,
//! `rate_limits.commands` (no method uses those classes yet).

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// `base_config` with root allowed everything and `extra` (whole sections) appended.
fn cfg(extra: &str) -> String {
    base_config(&format!("{extra}\n{ROOT_ADMIN}"))
}

/// `text` with `from` replaced by `to`; `from` must be there.
fn swap(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "`{from}` not in the configuration");
    text.replacen(from, to, 1)
}

/// `text` with `keys` added at the top of its `[section]` (which must be there).
fn set(text: &str, section: &str, keys: &str) -> String {
    let head = format!("[{section}]\n");
    swap(text, &head, &format!("{head}{keys}\n"))
}

fn ping(c: &mut Raw, token: &str) -> Value {
    c.call(&json!({"action": "system.ping", "token": token}))
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The `warden` CLI with none of the harness's variables inherited.
fn warden(args: &[&str]) -> Command {
    let mut cmd = Command::new(warden_bin());
    cmd.args(args)
        .env_remove("WARDEN_LOG")
        .env_remove("WARDEN_CONFIG")
        .env_remove("WARDEN_SOCKET")
        .env_remove("WARDEN_STATE_DIR");
    cmd
}

/// Seconds since the epoch of an RFC 3339 time.
fn unix_of(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("`{rfc3339}` is not RFC 3339: {e}"))
        .unix_timestamp()
}

/// A securityd client that pipelines `n` pings on one connection from another thread and never
/// reads a reply. Returns the connection and the writer thread (which ends when the daemon
/// closes the connection, or after writing everything).
fn flood(d: &Daemon, n: usize) -> (Raw, std::thread::JoinHandle<std::io::Result<()>>) {
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    let mut w = c.s.try_clone().unwrap();
    let batch = format!("{}\n", json!({"action": "system.ping", "token": token})).repeat(100);
    let writer = std::thread::spawn(move || {
        for _ in 0..n / 100 {
            w.write_all(batch.as_bytes())?;
        }
        Ok(())
    });
    (c, writer)
}

/// Waits until the daemon has stopped making progress on a flooding connection: the audit log
/// (one record per request served) has not grown for 1.5 s, after growing.
fn wait_for_stall(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let len = std::fs::metadata(d.audit_log())
            .map(|m| m.len())
            .unwrap_or(0);
        if len != last {
            (last, since) = (len, Instant::now());
        } else if len > 10_000 && since.elapsed() > Duration::from_millis(1500) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the flooded daemon never stalled"
        );
        sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// [daemon]

#[test]
fn pid_file_holds_the_daemons_pid_and_is_removed_after_sigterm() {
    let toml = swap(&cfg(""), "{dir}/warden.pid", "{dir}/run/nested/custom.pid");
    let mut d = Daemon::configured(&toml);
    let pid_file = d.dir.path().join("run/nested/custom.pid");
    let text = std::fs::read_to_string(&pid_file).expect("the configured pid file is written");
    assert_eq!(text.trim(), d.pid().to_string());
    assert!(!d.dir.path().join("warden.pid").exists());
    assert!(d.stop().success());
    assert!(!pid_file.exists(), "the pid file is removed at exit");
}

/// Kills a daemon started in the background if the test ends before stopping it.
struct Background(i32);

impl Drop for Background {
    fn drop(&mut self) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("warden") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn log_file_receives_the_log_of_daemon_start_and_daemon_logs_status_stop_work() {
    let dir = tempfile::tempdir().unwrap();
    let toml = swap(&cfg(""), "{dir}/warden.log", "{dir}/logs/custom.log");
    let config = write_config(dir.path(), &toml);
    let config = config.to_str().unwrap();
    let (log, pid_file, socket) = (
        dir.path().join("logs/custom.log"),
        dir.path().join("warden.pid"),
        dir.path().join("warden.sock"),
    );
    let limit = Duration::from_secs(40);

    let (status, out, err) =
        run_bounded(&mut warden(&["daemon", "start", "--config", config]), limit);
    assert!(status.is_some_and(|s| s.success()), "start failed: {err}");
    assert!(out.lines().any(|l| l == "WARDEN_READY=1"), "{out}");
    let pid: i32 = out
        .lines()
        .find_map(|l| l.strip_prefix("WARDEN_PID="))
        .unwrap_or_else(|| panic!("no WARDEN_PID in {out}"))
        .parse()
        .unwrap();
    let _guard = Background(pid);
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());

    // The daemon's own log (level info by default) goes to log_file.
    wait_until(
        "the start-up line in the log file",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("warden is serving")
        },
    );
    let (status, out, err) =
        run_bounded(&mut warden(&["daemon", "logs", "--config", config]), limit);
    assert!(status.is_some_and(|s| s.success()), "logs failed: {err}");
    assert!(
        out.contains("warden is serving"),
        "daemon logs printed: {out}"
    );

    let (status, out, err) = run_bounded(
        &mut warden(&["daemon", "status", "--socket", socket.to_str().unwrap()]),
        limit,
    );
    assert!(status.is_some_and(|s| s.success()), "status failed: {err}");
    assert!(
        out.lines()
            .any(|l| l.contains("pid:") && l.trim_end().ends_with(&pid.to_string())),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("audit:") && l.trim_end().ends_with(", 0 write errors")),
        "{out}"
    );

    let (status, out, err) = run_bounded(
        &mut warden(&["daemon", "stop", "--config", config]),
        Duration::from_secs(70),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "stop failed: {out} {err}"
    );
    assert!(out.contains(&format!("stopped (pid {pid})")), "{out}");
    assert!(!alive(pid), "the daemon still runs");
    assert!(!pid_file.exists(), "pid file left behind");
    assert!(!socket.exists(), "socket left behind");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("warden stopped"));
    // And `daemon status` now says so.
    let (status, _, err) = run_bounded(
        &mut warden(&["daemon", "status", "--socket", socket.to_str().unwrap()]),
        limit,
    );
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{err}");
}

/// A daemon whose log level comes from the file alone (`WARDEN_LOG` unset), after it served one
/// request (so its start-up line, if any, has been written).
fn daemon_logging(daemon_keys: &str) -> Daemon {
    let d = Daemon::configured_env(
        &set(&cfg(""), "daemon", daemon_keys),
        &[("WARDEN_LOG", None)],
    );
    let mut c = Raw::lines(&d.socket());
    assert_eq!(c.call(&json!({"action": "health"}))["status"], "ok");
    d
}

#[test]
fn log_level_error_hides_the_info_lines_that_info_shows() {
    let quiet = daemon_logging("log_level = \"error\"");
    let chatty = daemon_logging("log_level = \"info\"");
    wait_until(
        "the info line at level info",
        Duration::from_secs(10),
        || chatty.stderr().contains("warden is serving"),
    );
    assert!(
        !quiet.stderr().contains("warden is serving"),
        "level error still logs info: {}",
        quiet.stderr()
    );
    // A filter directive works too.
    let directive = daemon_logging("log_level = \"warn,wardend=info\"");
    wait_until(
        "the info line with a directive",
        Duration::from_secs(10),
        || directive.stderr().contains("warden is serving"),
    );
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let mut d = daemon_logging("log_format = \"json\"");
    assert!(d.stop().success());
    let err = d.stderr();
    let lines: Vec<Value> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let serving = lines
        .iter()
        .find(|v| v["fields"]["message"] == "warden is serving")
        .unwrap_or_else(|| panic!("no start-up record in {err}"));
    assert_eq!(serving["level"], "INFO");
    assert!(
        serving["fields"]["socket"]
            .as_str()
            .unwrap()
            .ends_with("warden.sock"),
        "{serving}"
    );
    // The default, pretty, is not JSON.
    let pretty = daemon_logging("log_format = \"pretty\"");
    wait_until("the pretty start-up line", Duration::from_secs(10), || {
        pretty.stderr().contains("warden is serving")
    });
    let line = pretty
        .stderr()
        .lines()
        .find(|l| l.contains("warden is serving"))
        .unwrap()
        .to_string();
    assert!(serde_json::from_str::<Value>(&line).is_err(), "{line}");
}

#[test]
fn shutdown_grace_bounds_the_wait_for_a_blocked_connection() {
    // The write timeout alone would keep the stuck connection for a minute.
    let toml = swap(
        &cfg("[limits]\nwrite_timeout = \"60s\"\n"),
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"1s\"",
    );
    let mut d = Daemon::configured(&toml);
    let (_c, writer) = flood(&d, 20_000);
    wait_for_stall(&d);
    assert!(
        !writer.is_finished(),
        "the client's writes should be blocked too"
    );
    let t0 = Instant::now();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let status = d
        .wait(Duration::from_secs(10))
        .expect("the daemon exits within 10 s of SIGTERM");
    let waited = t0.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        waited >= Duration::from_millis(950),
        "exited after {waited:?}, before the 1 s grace"
    );
    assert!(d.stderr().contains("grace period over"), "{}", d.stderr());
    assert!(
        writer.join().unwrap().is_err(),
        "the stuck client saw its connection end"
    );
}

// ---------------------------------------------------------------------------------------------
// [socket]

#[test]
fn socket_path_is_where_the_daemon_listens() {
    let toml = swap(&cfg(""), "{dir}/warden.sock", "{dir}/run/sub/custom.sock");
    let mut d = Daemon::configured(&toml);
    let custom = d.dir.path().join("run/sub/custom.sock");
    assert!(std::fs::symlink_metadata(&custom)
        .unwrap()
        .file_type()
        .is_socket());
    assert!(!d.dir.path().join("warden.sock").exists());
    d.env
        .insert("WARDEN_SOCKET".into(), custom.display().to_string());
    let mut c = Raw::lp(&custom);
    c.send_bytes(&lumo_ping(&d.key()));
    assert_eq!(c.recv().unwrap()["success"], true);
    let out = d.cli(&["ping"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.stop().success());
    assert!(!custom.exists(), "the socket is removed at exit");
}

#[test]
fn socket_mode_is_applied() {
    for (written, mode) in [("\"0640\"", 0o640), ("0o604", 0o604)] {
        let d = Daemon::configured(&swap(
            &cfg(""),
            "mode = \"0666\"",
            &format!("mode = {written}"),
        ));
        assert_eq!(mode_of(&d.socket()), mode, "mode = {written}");
    }
}

#[test]
fn socket_owner_and_group_are_applied_by_name_and_by_number() {
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(65534))
        .unwrap()
        .expect("gid 65534 exists")
        .name;
    for (owner, grp) in [("nobody", group.as_str()), ("65534", "65534")] {
        let toml = set(
            &cfg(""),
            "socket",
            &format!("owner = \"{owner}\"\ngroup = \"{grp}\""),
        );
        let d = Daemon::configured(&toml);
        let md = std::fs::symlink_metadata(d.socket()).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (65534, 65534),
            "owner {owner}, group {grp}"
        );
        assert_eq!(md.mode() & 0o777, 0o666);
    }
}

// ---------------------------------------------------------------------------------------------
// [limits]

/// A securityd `health` request padded to exactly `len` bytes.
fn padded_health(len: usize) -> Vec<u8> {
    let empty = json!({"action": "health", "params": {"pad": ""}}).to_string();
    json!({"action": "health", "params": {"pad": "a".repeat(len - empty.len())}})
        .to_string()
        .into_bytes()
}

#[test]
fn max_message_size_refuses_larger_requests_in_both_framings() {
    let d = Daemon::configured(&cfg("[limits]\nmax_message_size = \"2KiB\"\n"));
    for lines in [true, false] {
        let open = || {
            if lines {
                Raw::lines(&d.socket())
            } else {
                Raw::lp(&d.socket())
            }
        };
        let mut c = open();
        c.send_bytes(&padded_health(1536));
        let r = c.recv().unwrap();
        assert_eq!(r["status"], "ok", "1.5 KiB (lines: {lines}): {r}");
        let mut c = open();
        c.send_bytes(&padded_health(3072));
        let r = c.recv().expect("an error reply before the close");
        assert_eq!(
            r["error"]["code"], "VALIDATION_ERROR",
            "3 KiB (lines: {lines}): {r}"
        );
        assert!(
            c.is_closed(),
            "the connection is closed after an oversized message"
        );
    }
    d.wait_audit(|r| r["code"] == "VALIDATION_ERROR");
}

#[test]
fn idle_timeout_closes_idle_connections_but_not_busy_ones() {
    let d = Daemon::configured(&cfg("[limits]\nidle_timeout = \"1s\"\n"));
    let mut busy = Raw::lines(&d.socket());
    let mut idle = Raw::lines(&d.socket());
    let t0 = Instant::now();
    // The busy client sends something every 250 ms for 3 s and keeps its connection.
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            busy.call(&json!({"action": "health"}))["status"],
            "ok",
            "busy connection cut after {:?}",
            t0.elapsed()
        );
        sleep(Duration::from_millis(250));
    }
    // The idle one was closed meanwhile (EOF), not before its second.
    let t = Instant::now();
    assert!(idle.recv().is_none(), "the idle connection was closed");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(busy.call(&json!({"action": "health"}))["status"], "ok");
    let mut late = Raw::lines(&d.socket());
    let t = Instant::now();
    assert!(late.recv().is_none());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "idle close after {waited:?}"
    );
}

#[test]
fn read_timeout_ends_a_message_left_half_sent() {
    let d = Daemon::configured(&cfg("[limits]\nread_timeout = \"1s\"\n"));
    let mut lp = 200u32.to_be_bytes().to_vec();
    lp.extend_from_slice(b"{\"command\":\"system.pi");
    for (lines, bytes) in [(false, lp), (true, b"{\"action\":\"hea".to_vec())] {
        let mut c = if lines {
            Raw::lines(&d.socket())
        } else {
            Raw::lp(&d.socket())
        };
        c.s.write_all(&bytes).unwrap();
        let t0 = Instant::now();
        let r = c.recv().expect("an error reply");
        let waited = t0.elapsed();
        assert_eq!(r["error"]["code"], "VALIDATION_ERROR", "{r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains("not completed within 1 s"), "{msg}");
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        assert!(c.recv().is_none(), "EOF after the error reply");
    }
}

#[test]
fn write_timeout_drops_a_client_that_does_not_read() {
    let d = Daemon::configured(&cfg("[limits]\nwrite_timeout = \"1s\"\n"));
    let t0 = Instant::now();
    let (mut c, writer) = flood(&d, 20_000);
    // The default (10 s) would keep it at least 10 s after its first blocked write.
    wait_until(
        "the daemon to drop the non-reading client",
        Duration::from_secs(9),
        || writer.is_finished(),
    );
    assert!(
        writer.join().unwrap().is_err(),
        "the writes fail once the daemon closed the connection"
    );
    // Reading now yields what the daemon had sent, then the end.
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    match c.s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "the connection was not closed: {e} after {:?}",
            t0.elapsed()
        ),
    }
    // Everyone else is served.
    let mut other = Raw::lp(&d.socket());
    other.send_bytes(&lumo_ping(&d.key()));
    assert_eq!(other.recv().unwrap()["success"], true);
    let mut s = Raw::lines(&d.socket());
    let token = login(&mut s);
    assert_eq!(ping(&mut s, &token)["status"], "ok");
}

/// Stops one thread of the daemon with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT), leaving its
/// other threads running; resumes it when dropped. Must be created and dropped on one thread.
struct FrozenThread(libc::pid_t);

impl FrozenThread {
    /// `None` when this process may not trace the daemon (no CAP_SYS_PTRACE, seccomp).
    fn freeze(pid: i32, name: &str) -> Option<FrozenThread> {
        let tid: libc::pid_t = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .unwrap_or_else(|| panic!("no thread named {name}"))
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: ptrace requests on another process's thread, no memory of ours is passed.
        unsafe {
            if libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) != 0 {
                eprintln!(
                    "cannot ptrace the daemon: {}",
                    std::io::Error::last_os_error()
                );
                return None;
            }
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        }
        Some(FrozenThread(tid))
    }
}

impl Drop for FrozenThread {
    fn drop(&mut self) {
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: as above; the tracee is stopped, as PTRACE_DETACH requires.
        unsafe {
            libc::ptrace(libc::PTRACE_DETACH, self.0, null, null);
        }
    }
}

/// A request whose reply waits for its audit record to be durable (`system.ping`, `health` and
/// the other probes do not wait), for a daemon with `rate_limits.admin = "off"`.
fn status_request(token: &str) -> String {
    format!("{}\n", json!({"action": "daemon.status", "token": token}))
}

#[test]
fn max_in_flight_keeps_pipelined_requests_waiting_until_earlier_ones_finish() {
    // With the audit writer stopped every request in flight waits for its record and fails
    // after audit.write_timeout. With max_in_flight = 2, only the first two of six pipelined
    // requests are in flight while it is stopped; the other four are read only after those two
    // finished — by then the writer runs again, and they succeed. (With the default of 64 all
    // six would have been in flight, and failed.)
    let toml = set(
        &cfg("[limits]\nmax_in_flight = 2\n[rate_limits]\nadmin = \"off\"\n"),
        "audit",
        "write_timeout = \"2s\"",
    );
    let d = Daemon::configured(&toml);
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    let Some(frozen) = FrozenThread::freeze(d.core_pid(), "warden-audit") else {
        eprintln!("skipped: ptrace is not available");
        return;
    };
    c.s.write_all(status_request(&token).repeat(6).as_bytes())
        .unwrap();
    for i in 0..2 {
        let r = c.recv().unwrap();
        assert_eq!(r["error"]["code"], "INTERNAL_ERROR", "reply {i}: {r}");
    }
    drop(frozen);
    for i in 2..6 {
        let r = c.recv().unwrap();
        assert_eq!(
            r["status"], "ok",
            "reply {i} was in flight while the audit log was stopped: {r}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// [auth]

/// Starts `warden daemon run --config` on `toml` (in a directory of its own) and expects it to
/// refuse; returns its stderr.
fn refused_start(toml: &str, prepare: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), toml);
    prepare(dir.path());
    let (status, _, err) = run_bounded(
        &mut warden(&["daemon", "run", "--config", config.to_str().unwrap()]),
        Duration::from_secs(30),
    );
    let status = status.unwrap_or_else(|| panic!("the daemon started; stderr: {err}"));
    assert!(!status.success(), "{err}");
    assert!(
        !dir.path().join("warden.sock").exists(),
        "a socket was bound"
    );
    err
}

#[test]
fn hmac_key_file_readable_by_others_or_missing_stops_the_start() {
    let err = refused_start(&cfg(""), |dir| {
        std::fs::set_permissions(dir.join("hmac.key"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    });
    assert!(
        err.contains("hmac.key") && err.contains("chmod 600"),
        "{err}"
    );
    let err = refused_start(
        &swap(&cfg(""), "{dir}/hmac.key", "{dir}/missing.key"),
        |_| {},
    );
    assert!(err.contains("missing.key"), "{err}");
}

/// A private key file with random content in `dir`.
fn key_file(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{:032x}", rand::random::<u128>())).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn a_rules_own_hmac_key_file_replaces_the_global_key_for_that_principal() {
    let keys = tempfile::tempdir().unwrap();
    let own = key_file(keys.path(), "root.key");
    let policy = format!(
        "[policy.roles.admin]\nallow = [\"*\"]\n\n[[policy.rules]]\nuid = 0\nroles = [\"admin\"]\nhmac_key_file = \"{}\"\n",
        own.display()
    );
    let d = Daemon::configured(&base_config(&policy));
    let own_key = std::fs::read(&own).unwrap();
    let mut c = Raw::lp(&d.socket());
    c.send_bytes(&lumo_ping(&own_key));
    assert_eq!(
        c.recv().unwrap()["success"],
        true,
        "signed with the rule's key"
    );
    c.send_bytes(&lumo_ping(&d.key()));
    let r = c.recv().unwrap();
    assert_eq!(
        r["error"]["code"], "AUTH_ERROR",
        "signed with the global key: {r}"
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("signature"),
        "{r}"
    );
}

#[test]
fn max_request_age_sets_the_timestamp_window() {
    let d = Daemon::configured(&set(&cfg(""), "auth", "max_request_age = \"5s\""));
    let key = d.key();
    let mut c = Raw::lp(&d.socket());
    for ts in [now() - 10, now() + 10] {
        c.send_bytes(&lumo_request(&key, "system.ping", "{}", ts, &nonce()));
        let r = c.recv().unwrap();
        assert_eq!(
            r["error"]["code"], "AUTH_ERROR",
            "10 s off (the default window accepts it): {r}"
        );
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("window of 5 s"),
            "{r}"
        );
    }
    for ts in [now() - 2, now() + 2] {
        c.send_bytes(&lumo_request(&key, "system.ping", "{}", ts, &nonce()));
        assert_eq!(c.recv().unwrap()["success"], true);
    }
}

#[test]
fn token_lifetimes_follow_session_admin_and_bootstrap_ttl() {
    let ttls = "session_ttl = \"2h\"\nadmin_ttl = \"3m\"\nbootstrap_ttl = \"7m\"";
    let d = Daemon::configured(&set(&cfg(""), "auth", ttls));
    let mut c = Raw::lines(&d.socket());
    let mut bootstrap = String::new();
    for (params, kind, ttl) in [
        (json!({}), "session", 7200),
        (json!({"type": "admin"}), "admin", 180),
        // Made by an admin for a principal (here: root, the caller itself).
        (
            json!({"type": "bootstrap", "for": "uid:0"}),
            "bootstrap",
            420,
        ),
    ] {
        let before = now() as i64;
        let r = c.call(&json!({"action": "auth", "params": params}));
        let after = now() as i64;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["data"]["type"], kind, "{r}");
        let expires = unix_of(r["data"]["expires_at"].as_str().unwrap());
        assert!(
            (before + ttl - 1..=after + ttl + 1).contains(&expires),
            "{kind}: expires {expires}, issued {before}..{after}, ttl {ttl}"
        );
        if kind == "bootstrap" {
            bootstrap = r["data"]["token"].as_str().unwrap().to_string();
        }
    }
    // A bootstrap token is redeemed once for a session.
    let redeem = json!({"action": "auth", "params": {"bootstrap": bootstrap}});
    let r = c.call(&redeem);
    assert_eq!(r["status"], "ok", "{r}");
    let token = r["data"]["token"].as_str().unwrap().to_string();
    assert_eq!(ping(&mut c, &token)["status"], "ok");
    let r = c.call(&redeem);
    assert_eq!(r["error"]["code"], "AUTH_INVALID", "redeemed twice: {r}");
}

/// The session store's shard of a token (the first byte of its SHA-256, 16 shards): used only to
/// aim the test below; should the store change, that test still passes, merely unaimed.
fn token_shard(token: &str) -> u8 {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())[0] % 16
}

#[test]
fn redeeming_a_bootstrap_token_next_to_a_live_session_answers() {
    // Regression: redeeming held the bootstrap token's shard lock while counting the caller's
    // live tokens, which locks their shards: a session in the same shard deadlocked the
    // redemption, and with it every later auth of every client and the shutdown.
    let d = Daemon::configured(&cfg("[rate_limits]\nauth = \"off\"\n"));
    let mut c = Raw::lines(&d.socket());
    let session = login(&mut c);
    let bootstrap = (0..300)
        .map(|_| {
            let r =
                c.call(&json!({"action": "auth", "params": {"type": "bootstrap", "for": "uid:0"}}));
            assert_eq!(r["status"], "ok", "{r}");
            r["data"]["token"].as_str().unwrap().to_string()
        })
        .find(|t| token_shard(t) == token_shard(&session))
        .expect("a bootstrap token in the session's shard");
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = c.call(&json!({"action": "auth", "params": {"bootstrap": bootstrap}}));
    assert_eq!(r["status"], "ok", "{r}");
    let mut other = Raw::lines(&d.socket());
    other
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    login(&mut other);
}

#[test]
fn max_sessions_per_client_limits_live_tokens() {
    let d = Daemon::configured(&set(&cfg(""), "auth", "max_sessions_per_client = 2"));
    let mut c = Raw::lines(&d.socket());
    let first = login(&mut c);
    let _second = login(&mut c);
    let r = c.call(&json!({"action": "auth"}));
    assert_eq!(
        r["error"]["code"], "RATE_LIMITED",
        "a third live token: {r}"
    );
    // From another connection of the same principal, too.
    let mut other = Raw::lp(&d.socket());
    assert_eq!(
        other.call(&json!({"action": "auth"}))["error"]["code"],
        "RATE_LIMITED"
    );
    let r = c.call(&json!({"action": "logout", "token": first}));
    assert_eq!(r["status"], "ok", "{r}");
    let third = login(&mut c);
    assert_eq!(ping(&mut c, &third)["status"], "ok");
    assert_eq!(
        c.call(&json!({"action": "auth"}))["error"]["code"],
        "RATE_LIMITED"
    );
}

// ---------------------------------------------------------------------------------------------
// [rate_limits]

#[test]
fn rate_limit_auth_counts_logins() {
    let d = Daemon::configured(&cfg("[rate_limits]\nauth = \"2/60s\"\n"));
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    login(&mut c);
    let r = c.call(&json!({"action": "auth"}));
    assert_eq!(r["error"]["code"], "RATE_LIMITED", "{r}");
    assert_eq!(r["error"]["details"]["limit"], 2, "{r}");
    // Other classes are not affected.
    assert_eq!(ping(&mut c, &token)["status"], "ok");
    d.wait_audit(|r| r["method"] == "auth.login" && r["code"] == "RATE_LIMITED");
}

#[test]
fn rate_limit_admin_counts_daemon_status() {
    let d = Daemon::configured(&cfg("[rate_limits]\nadmin = \"1/60s\"\n"));
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    let status = json!({"action": "daemon.status", "token": token});
    let r = c.call(&status);
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["data"]["pid"], d.pid());
    let r = c.call(&status);
    assert_eq!(r["error"]["code"], "RATE_LIMITED", "{r}");
    assert_eq!(r["error"]["details"]["limit"], 1, "{r}");
    assert_eq!(ping(&mut c, &token)["status"], "ok");
}

// ---------------------------------------------------------------------------------------------
// [audit]

#[test]
fn audit_path_is_where_records_land() {
    let mut d = Daemon::configured(&swap(
        &cfg(""),
        "{dir}/audit.log",
        "{dir}/trail/custom-audit.log",
    ));
    let custom = d.dir.path().join("trail/custom-audit.log");
    d.env
        .insert("WARDEN_AUDIT_LOG".into(), custom.display().to_string());
    let mut c = Raw::lp(&d.socket());
    c.send_bytes(&lumo_ping(&d.key()));
    let r = c.recv().unwrap();
    assert_eq!(r["success"], true);
    let rec = d.wait_audit(|rec| rec["request_id"] == r["request_id"]);
    assert_eq!(rec["method"], "system.ping");
    assert!(!d.dir.path().join("audit.log").exists());
    assert_eq!(mode_of(&custom) & 0o077, 0, "the audit log is private");
    assert_eq!(mode_of(custom.parent().unwrap()), 0o700);
}

/// `n` pings on one connection (each answered).
fn pings(d: &Daemon, n: usize) {
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    for _ in 0..n {
        assert_eq!(ping(&mut c, &token)["status"], "ok");
    }
}

/// The audit files, oldest first: `audit.log.N` … `audit.log.1`, `audit.log`.
fn audit_files(log: &Path) -> Vec<PathBuf> {
    let rotated = |n: usize| PathBuf::from(format!("{}.{n}", log.display()));
    let mut files: Vec<PathBuf> = (1..100).map(rotated).take_while(|p| p.exists()).collect();
    files.reverse();
    files.push(log.to_path_buf());
    files
}

fn verify(d: &Daemon, files: &[PathBuf]) -> String {
    let mut args = vec!["audit", "verify"];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    let out = d.cli(&args);
    assert!(
        out.status.success(),
        "verify {files:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn audit_max_file_size_rotates_and_the_chain_verifies_across_files() {
    let mut d = Daemon::configured(&set(&cfg(""), "audit", "max_file_size = \"4KiB\""));
    pings(&d, 100);
    assert!(d.stop().success());
    let files = audit_files(&d.audit_log());
    assert!(files.len() >= 3, "expected rotations, got {files:?}");
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= 4096, "{} is {len} bytes", f.display());
    }
    let out = verify(&d, &files);
    assert!(out.starts_with("ok:"), "{out}");
}

#[test]
fn audit_keep_files_bounds_the_rotated_files() {
    let mut d = Daemon::configured(&set(
        &cfg(""),
        "audit",
        "max_file_size = \"4KiB\"\nkeep_files = 2",
    ));
    pings(&d, 100);
    assert!(d.stop().success());
    let log = d.audit_log();
    let files = audit_files(&log);
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(!PathBuf::from(format!("{}.3", log.display())).exists());
    // Older records were deleted: the oldest kept file does not start the chain.
    let oldest = std::fs::read_to_string(&files[0]).unwrap();
    let first: Value = serde_json::from_str(oldest.lines().next().unwrap()).unwrap();
    assert!(first["seq"].as_u64().unwrap() > 1, "{first}");
    verify(&d, &files);
}

#[test]
fn audit_write_timeout_fails_a_request_whose_record_is_not_durable_in_time() {
    let toml = set(
        &cfg("[rate_limits]\nadmin = \"off\"\n"),
        "audit",
        "write_timeout = \"1s\"",
    );
    let d = Daemon::configured(&toml);
    let mut c = Raw::lines(&d.socket());
    let token = login(&mut c);
    let Some(frozen) = FrozenThread::freeze(d.core_pid(), "warden-audit") else {
        eprintln!("skipped: ptrace is not available");
        return;
    };
    let t0 = Instant::now();
    c.send_bytes(status_request(&token).trim_end().as_bytes());
    let r = c.recv().unwrap();
    let waited = t0.elapsed();
    assert_eq!(r["error"]["code"], "INTERNAL_ERROR", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("audit"),
        "{r}"
    );
    // Not before the timeout, and well before the default (5 s).
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_millis(4500),
        "{waited:?}"
    );
    drop(frozen);
    let r = c.call(&json!({"action": "daemon.status", "token": token}));
    assert_eq!(r["status"], "ok", "{r}");
    // The failed request left no record claiming success: one status record, the second.
    let rec = d.wait_audit(|rec| rec["method"] == "daemon.status");
    assert_eq!(rec["result"], "ok");
    let statuses = d
        .audit_lines()
        .into_iter()
        .filter(|rec| rec["method"] == "daemon.status")
        .count();
    assert_eq!(statuses, 1);
}
