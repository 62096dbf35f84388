//! The job service end to end: the real daemon, the real CLI and client, the real kernel.
//!
//! Each daemon gets its own cgroup prefix (`[jobs] cgroup_prefix`), so a test can check that
//! nothing of its own is left in the kernel without seeing other tests' jobs. A test that cannot
//! run on this host (not root, no such controller) prints `SKIPPED <test>: <reason>` and returns.
//!
//! `[jobs]` keys shown here: `max_memory`, `max_pids`, `max_cpu` and `roles` (caps),
//! `keep_finished`, `stop_grace`, `output_memory`, `output_spill`, `spill_dir`,
//! `cgroup_prefix` (stale cleanup at start), `max_running_per_client`.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use warden_client::{AttachEnd, Client, Output, OutputStream, TokenType};

macro_rules! skip {
    ($name:expr, $($reason:tt)*) => {{
        eprintln!("SKIPPED {}: {}", $name, format!($($reason)*));
        return;
    }};
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A configured daemon, root allowed everything, jobs under `prefix` with `jobs` keys added.
fn daemon(prefix: &str, jobs: &str, extra: &str) -> Daemon {
    let toml = base_config(&format!(
        "[jobs]\ncgroup_prefix = \"{prefix}\"\nspill_dir = \"{{dir}}/spill\"\n{jobs}\n{extra}\n{ROOT_ADMIN}"
    ));
    Daemon::configured(&toml)
}

fn manager(prefix: &str) -> std::sync::Arc<warden_exec::CgroupManager> {
    warden_exec::CgroupManager::detect(warden_exec::ManagerOptions {
        prefix: prefix.into(),
        use_v1: true,
        use_v2: true,
    })
    .unwrap()
}

/// Fails if any job cgroup with `prefix` exists.
fn assert_no_cgroups(prefix: &str) {
    let left = manager(prefix).existing_job_dirs();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

fn client(d: &Daemon) -> Client {
    let mut c = Client::connect(&d.socket()).unwrap();
    c.login(TokenType::Session).unwrap();
    c
}

fn start(c: &mut Client, params: Value) -> Value {
    c.call("jobs.start", params).unwrap()
}

fn sh(script: &str) -> Value {
    json!({ "command": ["sh", "-c", script] })
}

fn wait_ended(c: &mut Client, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = c.call("jobs.status", json!({ "id": id })).unwrap();
        if v["state"] == "ended" {
            return v;
        }
        assert!(Instant::now() < deadline, "job did not end: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything a job wrote, as (stream, bytes) runs in order, plus the final reply.
fn read_all(c: &mut Client, id: &str, from: u64) -> (Vec<(OutputStream, Vec<u8>)>, Value) {
    let mut runs: Vec<(OutputStream, Vec<u8>)> = Vec::new();
    let never = || false;
    let end = c
        .attach(id, from, true, &never, |o| {
            if let Output::Data { stream, bytes, .. } = o {
                match runs.last_mut() {
                    Some((s, b)) if *s == stream => b.extend_from_slice(bytes),
                    _ => runs.push((stream, bytes.to_vec())),
                }
            }
            Ok(())
        })
        .unwrap();
    match end {
        AttachEnd::Finished(v) => (runs, v),
        AttachEnd::Interrupted => panic!("not interrupted"),
    }
}

fn stdout_of(runs: &[(OutputStream, Vec<u8>)]) -> Vec<u8> {
    runs.iter()
        .filter(|(s, _)| *s == OutputStream::Stdout)
        .flat_map(|(_, b)| b.clone())
        .collect()
}

/// Live processes whose command line has `arg` (a marker only the test's job uses).
fn processes_with_arg(arg: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmd.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_job_is_pid_1_sees_only_its_processes_and_only_lo_and_keeps_stderr_apart() {
    let name = "a_job_is_pid_1_sees_only_its_processes_and_only_lo_and_keeps_stderr_apart";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-ns", "", "");
    let out = d.cli(&[
        "jobs",
        "exec",
        "--no-network",
        "--",
        "sh",
        "-c",
        "echo $$; ls /proc | grep -c '^[0-9]'; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo oops >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // sh, ls, grep: the job's own processes only.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n3\nlo\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    d.stop();
    assert_no_cgroups("wj-ns");
}

#[test]
fn an_exec_failure_is_the_error_of_the_start_itself() {
    let name = "an_exec_failure_is_the_error_of_the_start_itself";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-exec", "", "");
    let mut c = client(&d);
    let e = c
        .call("jobs.start", json!({ "command": ["/no/such/program"] }))
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(warden_wire::ErrorCode::ExecutionError),
        "{e}"
    );
    let warden_client::ClientError::Api {
        details, message, ..
    } = &e
    else {
        panic!("{e}")
    };
    assert_eq!(
        details.as_ref().unwrap()["errno"],
        libc::ENOENT,
        "{message}"
    );
    assert_eq!(details.as_ref().unwrap()["stage"], "exec");
    let not_exec = d.dir.path().join("data.txt");
    std::fs::write(&not_exec, "not a program").unwrap();
    let e = c
        .call("jobs.start", json!({ "command": [not_exec] }))
        .unwrap_err();
    let warden_client::ClientError::Api { details, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(details.as_ref().unwrap()["errno"], libc::EACCES, "{e}");
    // The CLI says so and fails; no job was left.
    let out = d.cli(&["jobs", "exec", "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
    assert_eq!(c.call("jobs.list", json!({})).unwrap()["jobs"], json!([]));
    drop(c);
    d.stop();
    assert_no_cgroups("wj-exec");
}

#[test]
fn a_memory_hog_is_oom_killed_and_reported_as_such() {
    let name = "a_memory_hog_is_oom_killed_and_reported_as_such";
    if !is_root() {
        skip!(name, "needs root");
    }
    if !manager("wj-oom").can_enforce("memory") {
        skip!(name, "no memory controller");
    }
    let mut d = daemon("wj-oom", "", "");
    // dd touches its whole 256 MiB buffer.
    let out = d.cli(&[
        "jobs",
        "exec",
        "--memory",
        "32M",
        "--json",
        "--",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=256M",
        "count=1",
    ]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let mut c = client(&d);
    let jobs = c.call("jobs.list", json!({})).unwrap();
    let id = jobs["jobs"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(jobs["jobs"][0]["end"]["reason"], "oom_killed");
    let out = d.cli(&["jobs", "status", "--json", &id]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["end"]["reason"], "oom_killed", "{v}");
    assert!(v["usage"]["oom_kills"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["usage"]["memory_peak"].as_u64().unwrap() <= 32 << 20,
        "{v}"
    );
    assert_eq!(v["limits"]["memory"], 32 << 20);
    let human = d.cli(&["jobs", "status", &id]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("OOM killer"));
    drop(c);
    d.stop();
    assert_no_cgroups("wj-oom");
}

#[test]
fn a_fork_bomb_stops_at_its_pids_limit_and_stop_kills_all_of_it() {
    let name = "a_fork_bomb_stops_at_its_pids_limit_and_stop_kills_all_of_it";
    if !is_root() {
        skip!(name, "needs root");
    }
    if !manager("wj-bomb").can_enforce("pids") {
        skip!(name, "no pids controller");
    }
    let mut d = daemon("wj-bomb", "", "");
    let mut c = client(&d);
    let mut p = sh("f(){ sleep 7301 & f & wait; }; f & exec sleep 7301");
    p["limits"] = json!({ "pids": 40 });
    let job = start(&mut c, p);
    let id = job["id"].as_str().unwrap();
    wait_for("the bomb to grow", Duration::from_secs(15), || {
        processes_with_arg("7301").len() >= 15
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(processes_with_arg("7301").len() <= 40);
    let v = c
        .call("jobs.stop", json!({ "id": id, "grace": "200ms" }))
        .unwrap();
    assert_eq!(v["state"], "ended", "{v}");
    assert_eq!(v["end"]["pids_limit_hit"], true, "{v}");
    assert_eq!(v["end"]["stop_requested"], true, "{v}");
    assert!(processes_with_arg("7301").is_empty());
    drop(c);
    d.stop();
    assert_no_cgroups("wj-bomb");
}

#[test]
fn grandchildren_and_daemonized_processes_are_killed_by_stop() {
    let name = "grandchildren_and_daemonized_processes_are_killed_by_stop";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-grand", "", "");
    let mut c = client(&d);
    let job = start(
        &mut c,
        sh("(sleep 7302 &); (setsid sleep 7302 &); sh -c 'sleep 7302 & wait' & exec sleep 7302"),
    );
    wait_for("the processes", Duration::from_secs(10), || {
        processes_with_arg("7302").len() >= 4
    });
    let out = d.cli(&["jobs", "stop", "--grace", "1s", job["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        processes_with_arg("7302").is_empty(),
        "survivors: {:?}",
        processes_with_arg("7302")
    );
    drop(c);
    d.stop();
    assert_no_cgroups("wj-grand");
}

#[test]
fn a_cpu_spinner_under_a_fifth_of_a_cpu_gets_about_a_fifth() {
    let name = "a_cpu_spinner_under_a_fifth_of_a_cpu_gets_about_a_fifth";
    if !is_root() {
        skip!(name, "needs root");
    }
    if !manager("wj-cpu").can_enforce("cpu") {
        skip!(name, "no cpu controller");
    }
    let mut d = daemon("wj-cpu", "", "");
    let mut c = client(&d);
    let mut p = sh("while :; do :; done");
    p["limits"] = json!({ "cpu": 0.2 });
    let job = start(&mut c, p);
    std::thread::sleep(Duration::from_secs(2));
    let v = c
        .call("jobs.stop", json!({ "id": job["id"], "grace": "0s" }))
        .unwrap();
    let cpu = v["usage"]["cpu_time_ms"].as_f64().unwrap();
    let wall = v["usage"]["runtime_ms"].as_f64().unwrap();
    let share = cpu / wall;
    // The quota is 20 ms per 100 ms; the cgroup's own accounting says what it got.
    assert!((0.1..=0.3).contains(&share), "cpu share {share}: {v}");
    assert!(
        v["usage"]["cpu_throttled_periods"].as_u64().unwrap() > 5,
        "{v}"
    );
    drop(c);
    d.stop();
    assert_no_cgroups("wj-cpu");
}

#[test]
fn caps_fill_in_missing_limits_refuse_larger_ones_and_follow_the_callers_role() {
    let name = "caps_fill_in_missing_limits_refuse_larger_ones_and_follow_the_callers_role";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon(
        "wj-caps",
        "max_memory = \"64MiB\"\nmax_pids = 50\nmax_cpu = 0.5\n",
        "",
    );
    let mut c = client(&d);
    let v = start(&mut c, json!({ "command": ["true"] }));
    assert_eq!(
        (
            v["limits"]["memory"].clone(),
            v["limits"]["pids"].clone(),
            v["limits"]["cpu"].clone()
        ),
        (json!(64 << 20), json!(50), json!(0.5)),
        "{v}"
    );
    for (limits, what) in [
        (json!({"memory": 128 << 20}), "memory"),
        (json!({"pids": 51}), "pids"),
        (json!({"cpu": 1.0}), "cpu"),
    ] {
        let e = c
            .call(
                "jobs.start",
                json!({ "command": ["true"], "limits": limits }),
            )
            .unwrap_err();
        assert_eq!(
            e.code(),
            Some(warden_wire::ErrorCode::AccessDenied),
            "{what}: {e}"
        );
    }
    let v = start(
        &mut c,
        json!({ "command": ["true"], "limits": { "memory": 16 << 20, "pids": 5 } }),
    );
    assert_eq!(v["limits"]["memory"], 16 << 20);
    drop(c);
    d.stop();
    // A role's caps replace the global ones for its holders (root holds `admin` here).
    let mut d = daemon(
        "wj-caps",
        "max_memory = \"64MiB\"\n[jobs.roles.admin]\nmax_memory = \"128MiB\"\n",
        "",
    );
    let mut c = client(&d);
    let v = start(
        &mut c,
        json!({ "command": ["true"], "limits": { "memory": 128 << 20 } }),
    );
    assert_eq!(v["limits"]["memory"], 128 << 20);
    drop(c);
    d.stop();
    assert_no_cgroups("wj-caps");
}

/// A file holding every byte value, many times over.
fn all_bytes(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..4096u32).flat_map(|_| 0..=255u8).collect();
    let p = dir.join("bytes.bin");
    std::fs::write(&p, &data).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    (p, data)
}

/// Makes the daemon's socket directory reachable for the other uids a test runs the CLI as.
fn socket_reachable_for_all(d: &Daemon) {
    std::fs::set_permissions(
        d.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
}

fn clients_attached_at_different_times_get_the_identical_stream(n: usize, prefix: &str) {
    let d = daemon(prefix, "", "");
    let (file, data) = all_bytes(d.dir.path());
    let mut c = client(&d);
    let token = c.token().unwrap().to_string();
    let f = file.display().to_string();
    // Output in bursts over ~1 s, stderr interleaved, so that clients join at different points.
    let job = start(
        &mut c,
        sh(&format!(
            "for i in 1 2 3 4 5; do cat {f}; echo burst $i >&2; sleep 0.2; done"
        )),
    );
    let id = job["id"].as_str().unwrap().to_string();
    let readers: Vec<_> = (0..n)
        .map(|i| {
            let (sock, token, id) = (d.socket(), token.clone(), id.clone());
            std::thread::spawn(move || {
                // Join at different times: during the bursts and after the end.
                std::thread::sleep(Duration::from_millis((i as u64 * 1500) / n as u64));
                let mut c = Client::connect(&sock).unwrap();
                c.set_token(Some(token));
                read_all(&mut c, &id, 0)
            })
        })
        .collect();
    let results: Vec<_> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    let (first, fin) = &results[0];
    assert_eq!(fin["complete"], true);
    assert_eq!(fin["job"]["end"]["reason"], "exited");
    let want: Vec<u8> = (0..5).flat_map(|_| data.clone()).collect();
    assert_eq!(
        stdout_of(first),
        want,
        "stdout is the files' bytes, all 256 values"
    );
    let stderr: Vec<u8> = first
        .iter()
        .filter(|(s, _)| *s == OutputStream::Stderr)
        .flat_map(|(_, b)| b.clone())
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&stderr),
        "burst 1\nburst 2\nburst 3\nburst 4\nburst 5\n"
    );
    for (i, (runs, _)) in results.iter().enumerate() {
        assert!(runs == first, "client {i} got a different stream");
    }
}

#[test]
fn two_clients_attached_at_different_times_get_the_identical_byte_stream() {
    if !is_root() {
        skip!(
            "two_clients_attached_at_different_times_get_the_identical_byte_stream",
            "needs root"
        );
    }
    clients_attached_at_different_times_get_the_identical_stream(2, "wj-two");
    assert_no_cgroups("wj-two");
}

#[test]
fn a_hundred_clients_attached_at_different_times_get_the_identical_byte_stream() {
    if !is_root() {
        skip!(
            "a_hundred_clients_attached_at_different_times_get_the_identical_byte_stream",
            "needs root"
        );
    }
    clients_attached_at_different_times_get_the_identical_stream(100, "wj-hundred");
    assert_no_cgroups("wj-hundred");
}

/// Reads a `jobs.attach` stream frame by frame from a raw length-prefixed connection: output as
/// binary frames or base64 in JSON, whichever comes; returns (stdout, stderr, final reply).
fn raw_attach(r: &mut Raw, req_id: u64) -> (Vec<u8>, Vec<u8>, Value) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        let f = r.recv_frame().expect("the stream ends with a final reply");
        if f[0] == 0 {
            let offset = u64::from_be_bytes(f[2..10].try_into().unwrap());
            let id_len = u16::from_be_bytes(f[10..12].try_into().unwrap()) as usize;
            assert_eq!(&f[12..12 + id_len], req_id.to_string().as_bytes());
            let data = &f[12 + id_len..];
            assert!(f[1] == 1 || f[1] == 2, "stream byte {}", f[1]);
            let buf = if f[1] == 1 { &mut out } else { &mut err };
            assert!(offset > 0 || buf.is_empty());
            buf.extend_from_slice(data);
            continue;
        }
        let v: Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["id"], req_id);
        if v["final"] == false {
            let d = &v["data"];
            let bytes = base64_simd::STANDARD
                .decode_to_vec(d["data"].as_str().unwrap())
                .unwrap();
            match d["stream"].as_str() {
                Some("stdout") => out.extend_from_slice(&bytes),
                _ => err.extend_from_slice(&bytes),
            }
            continue;
        }
        return (out, err, v);
    }
}

#[test]
fn binary_and_base64_output_frames_carry_the_same_bytes_and_lines_refuse_binary() {
    let name = "binary_and_base64_output_frames_carry_the_same_bytes_and_lines_refuse_binary";
    if !is_root() {
        skip!(name, "needs root");
    }
    let d = daemon("wj-binary", "", "");
    let (file, data) = all_bytes(d.dir.path());
    let mut c = client(&d);
    let token = c.token().unwrap().to_string();
    let f = file.display().to_string();
    let job = start(&mut c, sh(&format!("cat {f}; cat {f} >&2; cat {f}")));
    let id = job["id"].as_str().unwrap().to_string();
    wait_ended(&mut c, &id, Duration::from_secs(60));
    let want_out: Vec<u8> = [data.clone(), data.clone()].concat();

    let mut b64 = Raw::lp(&d.socket());
    b64.send(&json!({"action": "jobs.attach", "id": 1, "token": token, "params": {"id": id}}));
    let (out1, err1, fin1) = raw_attach(&mut b64, 1);
    let mut bin = Raw::lp(&d.socket());
    bin.send(&json!({"action": "jobs.attach", "id": 2, "token": token,
        "params": {"id": id, "binary": true}}));
    let (out2, err2, fin2) = raw_attach(&mut bin, 2);
    assert_eq!(fin1["status"], "ok", "{fin1}");
    assert_eq!(fin2["status"], "ok", "{fin2}");
    assert_eq!(fin2["data"]["complete"], true, "{fin2}");
    assert!(out1 == want_out, "base64 stdout differs");
    assert!(out2 == want_out, "binary stdout differs");
    assert!(err1 == data && err2 == data, "stderr differs");
    // The Rust client asks for binary frames.
    let (runs, fin) = read_all(&mut c, &id, 0);
    assert_eq!(fin["complete"], true);
    assert!(stdout_of(&runs) == want_out);

    // On line framing output comes as base64 lines, large frames included.
    let mut lines = Raw::lines(&d.socket());
    lines.send(&json!({"action": "jobs.attach", "id": 4, "token": token, "params": {"id": id}}));
    let mut reader = BufReader::new(&lines.s);
    let (mut out3, mut err3) = (Vec::new(), Vec::new());
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended early"
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], 4, "{v}");
        if v["final"] == true {
            assert_eq!(v["data"]["complete"], true, "{v}");
            break;
        }
        let bytes = base64_simd::STANDARD
            .decode_to_vec(v["data"]["data"].as_str().unwrap())
            .unwrap();
        match v["data"]["stream"].as_str() {
            Some("stdout") => out3.extend_from_slice(&bytes),
            _ => err3.extend_from_slice(&bytes),
        }
    }
    drop(reader);
    assert!(
        out3 == want_out && err3 == data,
        "line-framed output differs"
    );

    // Line framing cannot carry binary frames: refused with a clear error.
    let mut lines = Raw::lines(&d.socket());
    lines.send(&json!({"action": "jobs.attach", "id": 3, "token": token,
        "params": {"id": id, "binary": true}}));
    let v = lines.recv().unwrap();
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["error"]["code"], "VALIDATION_ERROR", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("length-prefixed"),
        "{v}"
    );
    drop(c);
    drop(d);
    assert_no_cgroups("wj-binary");
}

#[test]
fn a_client_that_stops_reading_does_not_slow_the_job_or_other_readers() {
    let name = "a_client_that_stops_reading_does_not_slow_the_job_or_other_readers";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-slow", "", "[limits]\nwrite_timeout = \"60s\"\n");
    let mut c = client(&d);
    let token = c.token().unwrap().to_string();
    let job = start(&mut c, sh("sleep 0.5; head -c 64M /dev/zero"));
    let id = job["id"].as_str().unwrap().to_string();
    // A client that asks for the stream and never reads a byte of it.
    let mut stalled = Raw::lp(&d.socket());
    stalled.send(&json!({"action": "jobs.attach", "id": 1, "token": token, "params": {"id": id}}));
    let v = wait_ended(&mut c, &id, Duration::from_secs(60));
    assert_eq!(v["end"]["exit_code"], 0, "{v}");
    assert_eq!(v["output_bytes"], 64 << 20);
    // Another reader gets everything meanwhile, the stalled one still connected.
    let (runs, fin) = read_all(&mut c, &id, 0);
    assert_eq!(stdout_of(&runs).len(), 64 << 20);
    assert_eq!(fin["complete"], true);
    drop(stalled);
    drop(c);
    d.stop();
    assert_no_cgroups("wj-slow");
}

#[test]
fn beyond_output_memory_and_output_spill_the_oldest_output_is_dropped_with_a_marker() {
    let name = "beyond_output_memory_and_output_spill_the_oldest_output_is_dropped_with_a_marker";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon(
        "wj-spill",
        "output_memory = \"64KiB\"\noutput_spill = \"2MiB\"\n",
        "",
    );
    let mut c = client(&d);
    let job = start(&mut c, sh("seq 1 2000000"));
    let id = job["id"].as_str().unwrap().to_string();
    wait_ended(&mut c, &id, Duration::from_secs(60));
    let mut dropped = Vec::new();
    let mut got = Vec::new();
    let never = || false;
    c.attach(&id, 0, true, &never, |o| {
        match o {
            Output::Dropped { from, to } => dropped.push((from, to)),
            Output::Data { bytes, .. } => got.extend_from_slice(bytes),
        }
        Ok(())
    })
    .unwrap();
    let all: Vec<u8> = (1..=2_000_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    let (from, to) = dropped[0];
    assert_eq!(from, 0);
    assert_eq!(
        &all[to as usize..],
        &got[..],
        "what is kept is the newest output"
    );
    assert!(
        got.len() <= (2 << 20) + (64 << 10) && got.len() > 1 << 20,
        "{}",
        got.len()
    );
    // Spill files are unnamed; the directory exists, private and empty.
    let spill = d.dir.path().join("spill");
    let md = std::fs::metadata(&spill).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
        0o700
    );
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);
    // `--from` starts later in the log.
    let out = d.cli(&[
        "jobs",
        "attach",
        "--from",
        &(all.len() - 8).to_string(),
        &id,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2000000\n");
    drop(c);
    d.stop();
    assert_no_cgroups("wj-spill");
}

/// The CLI as another uid, with the daemon's socket.
fn cli_as(d: &Daemon, uid: u32, args: &[&str]) -> std::process::Output {
    Command::new(warden_bin())
        .args(args)
        .env("WARDEN_SOCKET", d.socket())
        .current_dir("/")
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

#[test]
fn jobs_belong_to_their_starter_and_only_jobs_admin_sees_everyones() {
    let name = "jobs_belong_to_their_starter_and_only_jobs_admin_sees_everyones";
    if !is_root() {
        skip!(name, "needs root");
    }
    let users = r#"
[policy.roles.user]
allow = ["jobs:run", "jobs:list", "jobs:status", "jobs:attach", "jobs:stop"]

[[policy.rules]]
uid = [65534, 65533]
roles = ["user"]
"#;
    let mut d = daemon("wj-owner", "stop_grace = \"500ms\"\n", users);
    socket_reachable_for_all(&d);
    let out = cli_as(
        &d,
        65534,
        &["jobs", "exec", "--detach", "--", "sleep", "7303"],
    );
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // It runs as its starter.
    wait_for("the job", Duration::from_secs(10), || {
        !processes_with_arg("7303").is_empty()
    });
    let pid = processes_with_arg("7303")[0];
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string());
    assert_eq!(uid.as_deref(), Some("65534"));
    // Another user neither sees it nor can touch it: it does not exist for them.
    let list = cli_as(&d, 65533, &["jobs", "list", "--json"]);
    let v: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["jobs"], json!([]), "{v}");
    for args in [
        vec!["jobs", "status", id.as_str()],
        vec!["jobs", "attach", id.as_str()],
        vec!["jobs", "stop", id.as_str()],
    ] {
        let out = cli_as(&d, 65533, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("NOT_FOUND") && !stderr.contains("SECRET_NOT_FOUND"),
            "{out:?}"
        );
    }
    let out = cli_as(&d, 65533, &["jobs", "list", "--all"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ACCESS_DENIED"),
        "{out:?}"
    );
    assert!(
        !processes_with_arg("7303").is_empty(),
        "the job survived the others"
    );
    // Its owner sees it; root (allowed `*`, so jobs:admin) sees and stops it.
    let list = cli_as(&d, 65534, &["jobs", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains(&id));
    let all = d.cli(&["jobs", "list", "--all", "--json"]);
    let v: Value = serde_json::from_slice(&all.stdout).unwrap();
    assert_eq!(v["jobs"][0]["owner"], "uid:65534", "{v}");
    let stop = d.cli(&["jobs", "stop", "--json", &id]);
    let v: Value = serde_json::from_slice(&stop.stdout).unwrap();
    // `sleep` is pid 1 of its namespace, where SIGTERM without a handler is ignored: killed
    // after the grace period.
    assert_eq!(v["end"]["reason"], "signaled", "{v}");
    assert_eq!(v["end"]["signal_name"], "SIGKILL", "{v}");
    assert_eq!(v["end"]["killed_after_grace"], true, "{v}");
    assert!(processes_with_arg("7303").is_empty());
    d.stop();
    assert_no_cgroups("wj-owner");
}

#[test]
fn sigterm_stops_every_job_and_leaves_no_cgroup() {
    let name = "sigterm_stops_every_job_and_leaves_no_cgroup";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-term", "stop_grace = \"1s\"\n", "");
    let mut c = client(&d);
    for _ in 0..3 {
        start(&mut c, sh("trap '' TERM; sleep 7304 & sleep 7304"));
    }
    wait_for("the jobs", Duration::from_secs(10), || {
        processes_with_arg("7304").len() == 6
    });
    assert!(!manager("wj-term").existing_job_dirs().is_empty());
    drop(c);
    let status = d.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        processes_with_arg("7304").is_empty(),
        "jobs survived the daemon"
    );
    assert_no_cgroups("wj-term");
}

#[test]
fn at_start_the_cgroups_of_a_daemon_that_died_are_killed_and_removed() {
    let name = "at_start_the_cgroups_of_a_daemon_that_died_are_killed_and_removed";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-crash", "", "");
    let mut c = client(&d);
    start(&mut c, sh("sleep 7305 & exec sleep 7305"));
    wait_for("the job", Duration::from_secs(10), || {
        processes_with_arg("7305").len() == 2
    });
    drop(c);
    // A crash: the daemon dies at once, its job's processes live on in their cgroups.
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait(Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(processes_with_arg("7305").len(), 2);
    assert!(!manager("wj-crash").existing_job_dirs().is_empty());
    let mut next = daemon("wj-crash", "", "");
    wait_for("the stale job to die", Duration::from_secs(10), || {
        processes_with_arg("7305").is_empty()
    });
    assert_no_cgroups("wj-crash");
    next.stop();
}

#[test]
fn stop_grace_is_waited_for_before_a_job_that_ignores_sigterm_is_killed() {
    let name = "stop_grace_is_waited_for_before_a_job_that_ignores_sigterm_is_killed";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-grace", "stop_grace = \"1500ms\"\n", "");
    let mut c = client(&d);
    let job = start(&mut c, sh("trap '' TERM; sleep 7306"));
    wait_for("the job", Duration::from_secs(10), || {
        !processes_with_arg("7306").is_empty()
    });
    let t = Instant::now();
    let v = c.call("jobs.stop", json!({ "id": job["id"] })).unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1400), "{took:?}");
    assert_eq!(v["end"]["killed_after_grace"], true, "{v}");
    assert_eq!(v["end"]["signal_name"], "SIGKILL", "{v}");
    drop(c);
    d.stop();
    assert_no_cgroups("wj-grace");
}

#[test]
fn a_finished_job_stays_listed_for_keep_finished_and_then_is_forgotten() {
    let name = "a_finished_job_stays_listed_for_keep_finished_and_then_is_forgotten";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-keep", "keep_finished = \"1s\"\n", "");
    let mut c = client(&d);
    let job = start(&mut c, sh("echo done"));
    let id = job["id"].as_str().unwrap().to_string();
    let v = wait_ended(&mut c, &id, Duration::from_secs(10));
    assert_eq!(v["end"]["exit_code"], 0);
    let (runs, _) = read_all(&mut c, &id, 0);
    assert_eq!(stdout_of(&runs), b"done\n");
    std::thread::sleep(Duration::from_millis(1500));
    let e = c.call("jobs.status", json!({ "id": id })).unwrap_err();
    assert_eq!(e.code(), Some(warden_wire::ErrorCode::NotFound), "{e}");
    assert_eq!(c.call("jobs.list", json!({})).unwrap()["jobs"], json!([]));
    drop(c);
    d.stop();
    assert_no_cgroups("wj-keep");
}

#[test]
fn max_running_per_client_bounds_the_running_jobs_of_one_principal() {
    let name = "max_running_per_client_bounds_the_running_jobs_of_one_principal";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-max", "max_running_per_client = 2\n", "");
    let mut c = client(&d);
    let a = start(&mut c, sh("exec sleep 7307"));
    start(&mut c, sh("exec sleep 7307"));
    let e = c.call("jobs.start", sh("exec sleep 7307")).unwrap_err();
    assert_eq!(e.code(), Some(warden_wire::ErrorCode::RateLimited), "{e}");
    c.call("jobs.stop", json!({ "id": a["id"], "grace": "0s" }))
        .unwrap();
    start(&mut c, sh("exec sleep 7307"));
    drop(c);
    d.stop();
    assert!(processes_with_arg("7307").is_empty());
    assert_no_cgroups("wj-max");
}

/// `warden jobs exec` in the background; returns it once the job printed `ready`.
fn exec_cli(
    d: &Daemon,
    extra: &[&str],
    marker: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(warden_bin());
    cmd.args(["jobs", "exec"]).args(extra).args([
        "--",
        "sh",
        "-c",
        &format!("echo ready; exec sleep {marker}"),
    ]);
    for (k, v) in &d.env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    (child, out)
}

fn interrupt(child: &mut std::process::Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the CLI did not exit after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctrl_c_detaches_and_leaves_the_job_running_unless_rm() {
    let name = "ctrl_c_detaches_and_leaves_the_job_running_unless_rm";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-ctrlc", "stop_grace = \"1s\"\n", "");
    let (mut child, _out) = exec_cli(&d, &[], "7308");
    let status = interrupt(&mut child);
    assert_eq!(status.code(), Some(130));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("detached"), "{err}");
    assert_eq!(processes_with_arg("7308").len(), 1, "the job keeps running");
    let list = d.cli(&["jobs", "list", "--json"]);
    let v: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["jobs"][0]["state"], "running");
    // Re-attach replays from the start.
    let mut c = client(&d);
    let id = v["jobs"][0]["id"].as_str().unwrap().to_string();
    let stop = AtomicBool::new(false);
    let mut got = Vec::new();
    let flag = || stop.load(std::sync::atomic::Ordering::SeqCst);
    let end = c
        .attach(&id, 0, false, &flag, |o| {
            if let Output::Data { bytes, .. } = o {
                got.extend_from_slice(bytes);
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(got, b"ready\n");
    let AttachEnd::Finished(fin) = end else {
        panic!()
    };
    assert_eq!(fin["complete"], false, "the job still runs");
    // With --rm, Ctrl-C stops the job.
    let (mut child, _out) = exec_cli(&d, &["--rm"], "7309");
    let status = interrupt(&mut child);
    // The job's `sleep` is pid 1 of its namespace and ignores SIGTERM: killed after the grace.
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status:?}");
    assert!(processes_with_arg("7309").is_empty());
    drop(c);
    d.stop();
    assert!(processes_with_arg("7308").is_empty());
    assert_no_cgroups("wj-ctrlc");
}

#[test]
fn the_rate_limit_of_jobs_counts_job_requests() {
    let name = "the_rate_limit_of_jobs_counts_job_requests";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-rate", "", "[rate_limits]\njobs = \"3/1m\"\n");
    let mut c = client(&d);
    for _ in 0..3 {
        c.call("jobs.list", json!({})).unwrap();
    }
    let e = c.call("jobs.list", json!({})).unwrap_err();
    assert_eq!(e.code(), Some(warden_wire::ErrorCode::RateLimited), "{e}");
    drop(c);
    d.stop();
}

/// `MAJOR:MINOR` and node of a whole disk (not a loop or zram device), if the host has one.
fn a_disk() -> Option<(String, String)> {
    for e in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("loop") || name.starts_with("zram") || name.starts_with("ram") {
            continue;
        }
        let dev = std::fs::read_to_string(e.path().join("dev")).ok()?;
        let node = format!("/dev/{name}");
        if Path::new(&node).exists() {
            return Some((dev.trim().to_string(), node));
        }
    }
    None
}

#[test]
fn io_limits_given_on_the_command_line_reach_the_jobs_cgroup() {
    let name = "io_limits_given_on_the_command_line_reach_the_jobs_cgroup";
    if !is_root() {
        skip!(name, "needs root");
    }
    if !manager("wj-io").can_enforce("io") {
        skip!(name, "no io/blkio controller");
    }
    let Some((dev, node)) = a_disk() else {
        skip!(name, "no disk")
    };
    let mut d = daemon("wj-io", "", "");
    let out = d.cli(&[
        "jobs",
        "exec",
        "--detach",
        "--io-read-bps",
        &format!("{node}=1M"),
        "--io-write-iops",
        &format!("{dev}=50"),
        "--",
        "sleep",
        "7310",
    ]);
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut c = client(&d);
    let v = c.call("jobs.status", json!({ "id": id })).unwrap();
    assert_eq!(
        v["limits"]["io"],
        json!([{ "device": dev, "read_bps": 1 << 20, "write_bps": null, "read_iops": null, "write_iops": 50 }]),
        "{v}"
    );
    // The job's own cgroup has them (v1 blkio throttle files, or v2 io.max).
    let mut seen = String::new();
    for dir in manager("wj-io").existing_job_dirs() {
        for f in [
            "blkio.throttle.read_bps_device",
            "blkio.throttle.write_iops_device",
            "io.max",
        ] {
            seen.push_str(&std::fs::read_to_string(dir.join(f)).unwrap_or_default());
        }
    }
    let v1 = seen.contains(&format!("{dev} 1048576")) && seen.contains(&format!("{dev} 50"));
    let v2 = seen.contains(&format!("{dev} rbps=1048576")) && seen.contains("wiops=50");
    assert!(v1 || v2, "limits not in the job's cgroup: {seen:?}");
    c.call("jobs.stop", json!({ "id": id, "grace": "0s" }))
        .unwrap();
    // A path that is not a block device is refused by the CLI before anything starts.
    let out = d.cli(&[
        "jobs",
        "exec",
        "--io-read-bps",
        "/dev/null=1M",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a block device"),
        "{out:?}"
    );
    drop(c);
    d.stop();
    assert_no_cgroups("wj-io");
}

#[test]
fn daemon_status_reports_which_cgroup_hierarchy_serves_each_job_controller() {
    let name = "daemon_status_reports_which_cgroup_hierarchy_serves_each_job_controller";
    if !is_root() {
        skip!(name, "needs root");
    }
    let mut d = daemon("wj-status", "", "");
    let mut c = client(&d);
    let v = c.call("daemon.status", json!({})).unwrap();
    let lines: Vec<String> = v["job_cgroups"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    // The daemon runs in the test's cgroups: its detection is what the test's own says.
    assert_eq!(lines, manager("wj-status").describe());
    assert!(!lines.is_empty());
    drop(c);
    d.stop();
}

#[test]
fn jobs_run_gives_the_job_then_its_output_and_needs_jobs_attach_too() {
    let name = "jobs_run_gives_the_job_then_its_output_and_needs_jobs_attach_too";
    if !is_root() {
        skip!(name, "needs root");
    }
    let runner = r#"
[policy.roles.runner]
allow = ["jobs:run", "jobs:list"]

[[policy.rules]]
uid = [65534]
roles = ["runner"]
"#;
    let mut d = daemon("wj-run", "", runner);
    socket_reachable_for_all(&d);
    // One request: the job first, then its output, then the end.
    let mut c = client(&d);
    let (mut job, mut out, mut err) = (Value::Null, Vec::new(), Vec::new());
    let order = std::cell::RefCell::new(Vec::new());
    let never = || false;
    let end = c
        .run(
            json!({ "command": ["sh", "-c", "echo one; echo two >&2; exit 3"] }),
            &never,
            |j| {
                order.borrow_mut().push("job");
                job = j;
            },
            |o| {
                if let Output::Data { bytes, stream, .. } = o {
                    order.borrow_mut().push("output");
                    match stream {
                        OutputStream::Stdout => out.extend_from_slice(bytes),
                        OutputStream::Stderr => err.extend_from_slice(bytes),
                    }
                }
                Ok(())
            },
        )
        .unwrap();
    let AttachEnd::Finished(v) = end else {
        panic!("not interrupted");
    };
    let order = order.into_inner();
    assert_eq!(order.first(), Some(&"job"), "{order:?}");
    assert!(order.len() > 1, "{order:?}");
    assert!(job["id"].is_string(), "{job}");
    assert_eq!(v["job"]["id"], job["id"]);
    assert_eq!(v["complete"], true, "{v}");
    assert_eq!(v["job"]["end"]["exit_code"], 3, "{v}");
    // Two pipes: their order between each other is the kernel's, each stream's own is kept.
    assert_eq!((&out[..], &err[..]), (&b"one\n"[..], &b"two\n"[..]));
    // Without `jobs:attach`, `jobs.run` (what `warden jobs exec` sends) is refused, and no job
    // is started.
    let out = cli_as(&d, 65534, &["jobs", "exec", "--", "echo", "never"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jobs:attach"),
        "{out:?}"
    );
    let list = cli_as(&d, 65534, &["jobs", "list", "--json"]);
    let v: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["jobs"], json!([]), "{v}");
    d.stop();
}
