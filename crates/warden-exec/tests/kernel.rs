//! Tests against the real kernel: cgroups (v1 and v2 as this host offers them), namespaces,
//! exec, stop. Each test uses its own cgroup prefix; a guard removes whatever a test leaves
//! (even when it fails) and fails a passing test that left a cgroup behind. A test that cannot
//! run here prints `SKIPPED <test>: <reason>` and returns.

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use warden_exec::{
    CgroupManager, CpuLimit, DeviceNumber, Error, IoLimit, Job, JobSpec, JobStatus, LogConfig,
    LogItem, ManagerOptions, Namespaces, Output, SpawnStage, Stream,
};

macro_rules! skip {
    ($name:expr, $($reason:tt)*) => {{
        eprintln!("SKIPPED {}: {}", $name, format!($($reason)*));
        return;
    }};
}

struct Env {
    mgr: Arc<CgroupManager>,
}

impl Drop for Env {
    fn drop(&mut self) {
        let left = self.mgr.existing_job_dirs();
        let _ = self.mgr.cleanup_all();
        if !std::thread::panicking() {
            assert!(left.is_empty(), "cgroups left behind: {left:?}");
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn env_with(name: &str, use_v1: bool, use_v2: bool) -> Result<Env, String> {
    if !is_root() {
        return Err("needs root".into());
    }
    let mgr = CgroupManager::detect(ManagerOptions {
        prefix: format!("wexec-t-{name}"),
        use_v1,
        use_v2,
    })
    .map_err(|e| format!("no cgroups: {e}"))?;
    // A previous run of this test that was killed hard may have left its cgroups.
    mgr.cleanup_all().map_err(|e| e.to_string())?;
    Ok(Env { mgr })
}

fn env(name: &str) -> Result<Env, String> {
    env_with(name, true, true)
}

fn path_env() -> Vec<(OsString, OsString)> {
    vec![(
        "PATH".into(),
        "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
    )]
}

fn sh(script: &str) -> JobSpec {
    let mut s = JobSpec::new("sh", ["-c", script]);
    s.env = path_env();
    s
}

/// Everything the job wrote to one stream, after it ended.
async fn collect(job: &Job, want: Stream) -> Vec<u8> {
    let log = job.log().expect("log output");
    let mut r = log.reader();
    let mut out = Vec::new();
    while let Some(item) = r.next().await {
        if let LogItem::Data { stream, bytes, .. } = item {
            if stream == want {
                out.extend_from_slice(&bytes);
            }
        }
    }
    out
}

async fn run(mgr: &Arc<CgroupManager>, spec: JobSpec) -> (String, warden_exec::JobReport) {
    let job = Job::start(mgr, spec).await.expect("start");
    let report = tokio::time::timeout(Duration::from_secs(60), job.wait())
        .await
        .expect("job ended in time")
        .expect("report");
    let out = collect(&job, Stream::Stdout).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        (*report).clone(),
    )
}

/// (pid, start time) so a reused pid is not mistaken for a survivor.
fn identity(pid: i32) -> Option<(i32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // A zombie is dead already.
    let mut f = after.split_whitespace();
    if f.next()? == "Z" {
        return None;
    }
    Some((pid, after.split_whitespace().nth(19)?.to_string()))
}

fn alive(ids: &[(i32, String)]) -> Vec<i32> {
    ids.iter()
        .filter(|(pid, st)| identity(*pid).is_some_and(|(_, s)| &s == st))
        .map(|(p, _)| *p)
        .collect()
}

async fn wait_until(mut f: impl FnMut() -> bool, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

fn has_freezer(mgr: &CgroupManager) -> bool {
    mgr.describe().iter().any(|l| l.starts_with("freezer"))
}

#[tokio::test]
async fn exec_of_a_missing_program_fails_at_start_with_enoent() {
    let e = match env("enoent") {
        Ok(e) => e,
        Err(r) => skip!(
            "exec_of_a_missing_program_fails_at_start_with_enoent",
            "{r}"
        ),
    };
    for prog in [
        "/nonexistent/warden-exec-test",
        "warden-exec-no-such-program",
    ] {
        let mut spec = JobSpec::new(prog, Vec::<String>::new());
        spec.env = path_env();
        match Job::start(&e.mgr, spec).await {
            Err(
                err @ Error::Spawn {
                    stage: SpawnStage::Exec,
                    ..
                },
            ) => {
                assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}")
            }
            other => panic!("expected an exec error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn exec_of_a_non_executable_file_fails_at_start_with_eacces() {
    let e = match env("eacces") {
        Ok(e) => e,
        Err(r) => skip!(
            "exec_of_a_non_executable_file_fails_at_start_with_eacces",
            "{r}"
        ),
    };
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("script");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    let spec = JobSpec::new(f.as_os_str(), Vec::<String>::new());
    match Job::start(&e.mgr, spec).await {
        Err(
            err @ Error::Spawn {
                stage: SpawnStage::Exec,
                ..
            },
        ) => {
            assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}")
        }
        other => panic!("expected EACCES, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_working_directory_fails_at_start() {
    let e = match env("chdir") {
        Ok(e) => e,
        Err(r) => skip!("a_bad_working_directory_fails_at_start", "{r}"),
    };
    let mut spec = sh("true");
    spec.cwd = Some("/nonexistent-dir".into());
    assert!(matches!(
        Job::start(&e.mgr, spec).await,
        Err(Error::Spawn {
            stage: SpawnStage::Chdir,
            ..
        })
    ));
}

#[tokio::test]
async fn in_a_new_pid_namespace_the_shell_is_pid_1() {
    let e = match env("pidns") {
        Ok(e) => e,
        Err(r) => skip!("in_a_new_pid_namespace_the_shell_is_pid_1", "{r}"),
    };
    let mut spec = sh("echo $$");
    spec.namespaces = Namespaces {
        pid: true,
        mount: true,
        ..Namespaces::default()
    };
    let (out, report) = run(&e.mgr, spec).await;
    assert_eq!(out, "1\n");
    assert_eq!(report.status, JobStatus::Exited(0));
}

#[tokio::test]
async fn proc_shows_only_the_jobs_processes() {
    let e = match env("procns") {
        Ok(e) => e,
        Err(r) => skip!("proc_shows_only_the_jobs_processes", "{r}"),
    };
    let mut spec = sh("sleep 30 & ls /proc");
    spec.namespaces = Namespaces {
        pid: true,
        mount: true,
        ..Namespaces::default()
    };
    let (out, _) = run(&e.mgr, spec).await;
    let pids: Vec<u32> = out.lines().filter_map(|l| l.parse().ok()).collect();
    // sh (1), sleep, ls: nothing of the host.
    assert!(pids.contains(&1), "{pids:?}");
    assert!(pids.len() <= 4 && pids.iter().all(|p| *p < 10), "{pids:?}");
}

#[tokio::test]
async fn a_new_network_namespace_has_only_lo_and_it_is_up() {
    let e = match env("netns") {
        Ok(e) => e,
        Err(r) => skip!("a_new_network_namespace_has_only_lo_and_it_is_up", "{r}"),
    };
    let mut spec = sh("cat /proc/net/dev; ip -o link 2>/dev/null || true");
    spec.namespaces = Namespaces {
        net: true,
        ..Namespaces::default()
    };
    let (out, report) = run(&e.mgr, spec).await;
    assert_eq!(report.status, JobStatus::Exited(0));
    let ifaces: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(':') && !l.contains('|') && !l.contains("link/"))
        .filter_map(|l| l.split(':').next().map(str::trim))
        .collect();
    assert_eq!(ifaces, ["lo"], "{out}");
    if out.contains("link/loopback") {
        assert!(out.contains("UP"), "lo is not up: {out}");
    }
}

#[tokio::test]
async fn environment_cwd_uid_gid_and_hostname_are_the_specs() {
    let e = match env("creds") {
        Ok(e) => e,
        Err(r) => skip!("environment_cwd_uid_gid_and_hostname_are_the_specs", "{r}"),
    };
    let mut spec = sh("pwd; id -u; id -g; id -G; hostname; env | sort");
    spec.env.push(("FOO".into(), "bar baz".into()));
    spec.cwd = Some("/tmp".into());
    spec.uid = Some(65534);
    spec.gid = Some(65534);
    spec.namespaces.uts = true;
    spec.hostname = Some("jobhost".into());
    let (out, report) = run(&e.mgr, spec).await;
    assert_eq!(report.status, JobStatus::Exited(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..5], ["/tmp", "65534", "65534", "65534", "jobhost"]);
    // Only what the spec gave, plus what sh itself sets (PWD, SHLVL, _).
    let vars: Vec<&str> = lines[5..]
        .iter()
        .map(|l| l.split('=').next().unwrap_or(""))
        .filter(|k| !["PWD", "SHLVL", "_", "OLDPWD"].contains(k))
        .collect();
    assert_eq!(vars, ["FOO", "PATH"], "{out}");
    assert!(lines.contains(&"FOO=bar baz"));
}

#[tokio::test]
async fn stdout_and_stderr_are_kept_apart_as_pipes() {
    let e = match env("pipes") {
        Ok(e) => e,
        Err(r) => skip!("stdout_and_stderr_are_kept_apart_as_pipes", "{r}"),
    };
    use tokio::io::AsyncReadExt;
    let mut spec = sh("printf out; printf err >&2; exit 7");
    spec.output = Output::Pipes;
    let job = Job::start(&e.mgr, spec).await.unwrap();
    let (mut o, mut r) = job.take_pipes().unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    o.read_to_end(&mut a).await.unwrap();
    r.read_to_end(&mut b).await.unwrap();
    assert_eq!((a.as_slice(), b.as_slice()), (&b"out"[..], &b"err"[..]));
    assert_eq!(job.wait().await.unwrap().status, JobStatus::Exited(7));
}

fn python() -> Option<PathBuf> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[tokio::test]
async fn binary_output_survives_and_100_late_readers_get_identical_bytes() {
    let e = match env("binary") {
        Ok(e) => e,
        Err(r) => skip!(
            "binary_output_survives_and_100_late_readers_get_identical_bytes",
            "{r}"
        ),
    };
    let Some(py) = python() else {
        skip!(
            "binary_output_survives_and_100_late_readers_get_identical_bytes",
            "no python3"
        )
    };
    let mut spec = JobSpec::new(
        py.as_os_str(),
        [
            "-c",
            "import sys,time\nfor i in range(50):\n sys.stdout.buffer.write(bytes(range(256))*40); sys.stdout.flush()\n sys.stderr.buffer.write(b'e'); sys.stderr.flush()\n time.sleep(0.002)",
        ],
    );
    spec.output = Output::Log(LogConfig::default());
    let job = Job::start(&e.mgr, spec).await.unwrap();
    let log = job.log().unwrap();
    let mut readers = Vec::new();
    for i in 0..100 {
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut r = log.reader();
        readers.push(tokio::spawn(async move {
            let mut items = Vec::new();
            while let Some(it) = r.next().await {
                items.push(it);
            }
            items
        }));
    }
    job.wait().await.unwrap();
    let mut first = None;
    for r in readers {
        let items = r.await.unwrap();
        match &first {
            None => first = Some(items),
            Some(f) => assert!(f == &items, "a reader saw a different stream"),
        }
    }
    let out = collect(&job, Stream::Stdout).await;
    let expected: Vec<u8> = (0..50 * 40).flat_map(|_| 0..=255u8).collect();
    assert_eq!(out, expected);
    assert_eq!(collect(&job, Stream::Stderr).await, vec![b'e'; 50]);
}

#[tokio::test]
async fn a_reader_that_stops_reading_does_not_slow_the_job() {
    let e = match env("slowreader") {
        Ok(e) => e,
        Err(r) => skip!("a_reader_that_stops_reading_does_not_slow_the_job", "{r}"),
    };
    let mut spec = sh("head -c 300000000 /dev/zero");
    spec.output = Output::Log(LogConfig {
        memory_limit: 1 << 20,
        spill_dir: None,
        ..LogConfig::default()
    });
    let t = Instant::now();
    let job = Job::start(&e.mgr, spec).await.unwrap();
    let log = job.log().unwrap();
    let mut stalled = log.reader();
    let _ = stalled.next().await;
    let report = tokio::time::timeout(Duration::from_secs(30), job.wait())
        .await
        .expect("the job was held back")
        .unwrap();
    assert_eq!(report.status, JobStatus::Exited(0));
    assert_eq!(log.end(), 300_000_000);
    assert!(log.memory_bytes() <= 1 << 20);
    eprintln!("300 MB through the log in {:?}", t.elapsed());
}

#[tokio::test]
async fn a_memory_hog_is_oom_killed_and_reported_as_oom() {
    let e = match env("oom") {
        Ok(e) => e,
        Err(r) => skip!("a_memory_hog_is_oom_killed_and_reported_as_oom", "{r}"),
    };
    if !e.mgr.can_enforce("memory") {
        skip!(
            "a_memory_hog_is_oom_killed_and_reported_as_oom",
            "no memory controller"
        );
    }
    let Some(py) = python() else {
        skip!(
            "a_memory_hog_is_oom_killed_and_reported_as_oom",
            "no python3"
        )
    };
    let mut spec = JobSpec::new(
        py.as_os_str(),
        ["-c", "a=[]\nwhile True: a.append(bytearray(4<<20))"],
    );
    spec.limits.memory_max = Some(64 << 20);
    let (_, report) = run(&e.mgr, spec).await;
    assert_eq!(report.status, JobStatus::OomKilled, "{report:?}");
    assert!(report.usage.oom_kills.unwrap_or(0) >= 1);
    if let Some(peak) = report.usage.memory_peak {
        assert!(peak > 32 << 20 && peak <= 64 << 20, "peak {peak}");
    }
}

async fn fork_bomb(name: &str, e: &Env) {
    if !e.mgr.can_enforce("pids") {
        skip!(name, "no pids controller");
    }
    // Each shell forks a sleeper and another shell, then waits: the tree grows until forks fail
    // at the limit, and what it made stays.
    let mut spec = sh("f(){ sleep 1000 & f & wait; }; f & exec sleep 1000");
    spec.limits.pids_max = Some(40);
    let job = Job::start(&e.mgr, spec).await.unwrap();
    let mgr_ok = wait_until(|| job.pids().len() >= 30, Duration::from_secs(10)).await;
    assert!(mgr_ok, "the bomb did not grow: {:?}", job.pids());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids = job.pids();
    assert!(pids.len() <= 40, "pids limit exceeded: {}", pids.len());
    let ids: Vec<_> = pids.iter().filter_map(|p| identity(*p)).collect();
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        job.stop(Duration::from_millis(200)),
    )
    .await
    .expect("stop in time")
    .unwrap();
    assert!(report.cleanup_error.is_none(), "{report:?}");
    assert!(report.usage.pids_limit_hits.unwrap_or(0) > 0, "{report:?}");
    assert!(alive(&ids).is_empty(), "survivors: {:?}", alive(&ids));
    assert!(job.pids().is_empty());
}

#[tokio::test]
async fn a_fork_bomb_stops_at_its_pids_limit_and_stop_kills_it_all() {
    let name = "a_fork_bomb_stops_at_its_pids_limit_and_stop_kills_it_all";
    match env("bomb") {
        Ok(e) => fork_bomb(name, &e).await,
        Err(r) => skip!(name, "{r}"),
    }
}

#[tokio::test]
async fn v1_freezer_path_kills_a_fork_bomb() {
    let name = "v1_freezer_path_kills_a_fork_bomb";
    match env_with("bombv1", true, false) {
        Ok(e) if has_freezer(&e.mgr) => fork_bomb(name, &e).await,
        Ok(_) => skip!(name, "no v1 freezer hierarchy"),
        Err(r) => skip!(name, "{r}"),
    }
}

async fn grandchildren(name: &str, e: &Env) {
    let _ = name;
    // The subshell double-forks: its sleep is reparented away from the job's process tree.
    let spec = sh("sleep 1000 & (sleep 1000 &); trap '' TERM; exec sleep 1000");
    let job = Job::start(&e.mgr, spec).await.unwrap();
    assert!(wait_until(|| job.pids().len() >= 3, Duration::from_secs(10)).await);
    let ids: Vec<_> = job.pids().iter().filter_map(|p| identity(*p)).collect();
    let report = job.stop(Duration::from_millis(300)).await.unwrap();
    assert!(report.stop_requested);
    assert!(alive(&ids).is_empty(), "survivors: {:?}", alive(&ids));

    // A job also ends with its main process: an orphan it leaves behind is killed.
    let job = Job::start(&e.mgr, sh("(sleep 1000 &); sleep 0.2; exit 3"))
        .await
        .unwrap();
    assert!(wait_until(|| !job.pids().is_empty(), Duration::from_secs(5)).await);
    let ids: Vec<_> = job.pids().iter().filter_map(|p| identity(*p)).collect();
    let report = job.wait().await.unwrap();
    assert_eq!(report.status, JobStatus::Exited(3));
    assert!(alive(&ids).is_empty(), "survivors: {:?}", alive(&ids));
}

#[tokio::test]
async fn grandchildren_are_killed_by_stop() {
    let name = "grandchildren_are_killed_by_stop";
    match env("grand") {
        Ok(e) => grandchildren(name, &e).await,
        Err(r) => skip!(name, "{r}"),
    }
}

#[tokio::test]
async fn v1_freezer_path_kills_grandchildren() {
    let name = "v1_freezer_path_kills_grandchildren";
    match env_with("grandv1", true, false) {
        Ok(e) if has_freezer(&e.mgr) => grandchildren(name, &e).await,
        Ok(_) => skip!(name, "no v1 freezer hierarchy"),
        Err(r) => skip!(name, "{r}"),
    }
}

#[tokio::test]
async fn stop_terminates_gracefully_when_the_job_obeys_sigterm() {
    let e = match env("graceful") {
        Ok(e) => e,
        Err(r) => skip!(
            "stop_terminates_gracefully_when_the_job_obeys_sigterm",
            "{r}"
        ),
    };
    let job = Job::start(
        &e.mgr,
        sh("trap 'echo bye; exit 0' TERM; while :; do sleep 0.05; done"),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = job.stop(Duration::from_secs(10)).await.unwrap();
    assert!(!report.killed_after_grace, "{report:?}");
    assert_eq!(report.status, JobStatus::Exited(0));
    assert_eq!(collect(&job, Stream::Stdout).await, b"bye\n");
}

async fn cpu_spinner(name: &str, e: &Env) {
    if !e.mgr.can_enforce("cpu") {
        skip!(name, "no cpu controller");
    }
    let mut spec = sh("while :; do :; done");
    spec.limits.cpu = Some(CpuLimit::cores(0.2));
    let job = Job::start(&e.mgr, spec).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let report = job.stop(Duration::ZERO).await.unwrap();
    let Some(cpu) = report.usage.cpu_time else {
        skip!(name, "this host reports no cgroup CPU time");
    };
    let share = cpu.as_secs_f64() / report.runtime.as_secs_f64();
    eprintln!("{name}: cpu share under a 0.2 quota: {share:.3} ({report:?})");
    assert!((0.05..=0.3).contains(&share), "share {share}");
    assert!(report.usage.cpu_throttled_periods.unwrap_or(0) > 0);
}

#[tokio::test]
async fn a_cpu_spinner_under_a_fifth_of_a_cpu_gets_about_a_fifth() {
    let name = "a_cpu_spinner_under_a_fifth_of_a_cpu_gets_about_a_fifth";
    match env("cpu") {
        Ok(e) => cpu_spinner(name, &e).await,
        Err(r) => skip!(name, "{r}"),
    }
}

#[tokio::test]
async fn v1_only_cpu_quota_and_cpuacct_time() {
    let name = "v1_only_cpu_quota_and_cpuacct_time";
    match env_with("cpuv1", true, false) {
        Ok(e) => cpu_spinner(name, &e).await,
        Err(r) => skip!(name, "{r}"),
    }
}

#[tokio::test]
async fn io_limits_are_applied_per_device() {
    let name = "io_limits_are_applied_per_device";
    let e = match env("io") {
        Ok(e) => e,
        Err(r) => skip!(name, "{r}"),
    };
    if !e.mgr.can_enforce("io") {
        skip!(name, "no io/blkio controller");
    }
    let disk = std::fs::read_dir("/sys/block").ok().and_then(|rd| {
        rd.flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .find(|n| !n.starts_with("loop") && !n.starts_with("zram") && !n.starts_with("ram"))
    });
    let Some(disk) = disk else {
        skip!(name, "no block device")
    };
    let Ok(device) = DeviceNumber::from_node(&Path::new("/dev").join(&disk)) else {
        skip!(name, "no /dev/{disk}")
    };
    let mut spec = sh("echo ok");
    spec.limits.io = vec![IoLimit {
        device,
        read_bps: Some(10 << 20),
        write_bps: Some(5 << 20),
        read_iops: Some(1000),
        write_iops: Some(500),
    }];
    let (out, report) = run(&e.mgr, spec).await;
    assert_eq!(out, "ok\n");
    assert!(report.usage.io_read_bytes.is_some());
}

#[tokio::test]
async fn a_limit_the_host_cannot_enforce_is_refused_at_start() {
    let name = "a_limit_the_host_cannot_enforce_is_refused_at_start";
    // Only the v2 hierarchy: on a host whose controllers are bound to v1, it enforces nothing.
    let e = match env_with("refuse", false, true) {
        Ok(e) => e,
        Err(r) => skip!(name, "{r}"),
    };
    if e.mgr.can_enforce("pids") {
        skip!(name, "the v2 hierarchy here has the pids controller");
    }
    let mut spec = sh("true");
    spec.limits.pids_max = Some(10);
    match Job::start(&e.mgr, spec).await {
        Err(Error::Unenforceable { limit: "pids", .. }) => {}
        other => panic!("expected Unenforceable, got {other:?}"),
    }
}

#[tokio::test]
async fn v2_job_is_born_in_its_cgroup_killed_with_cgroup_kill_and_removed() {
    let name = "v2_job_is_born_in_its_cgroup_killed_with_cgroup_kill_and_removed";
    let e = match env_with("v2", false, true) {
        Ok(e) => e,
        Err(r) => skip!(name, "{r}"),
    };
    if !e.mgr.uses_v2() {
        skip!(name, "no writable cgroup v2 hierarchy");
    }
    let job = match Job::start(&e.mgr, sh("sleep 1000 & exec sleep 1000")).await {
        Ok(j) => j,
        Err(err) => skip!(name, "creating a v2 cgroup is not permitted here: {err}"),
    };
    assert!(job.born_in_cgroup(), "CLONE_INTO_CGROUP was not used");
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", job.pid())).unwrap();
    let v2_line = own.lines().find(|l| l.starts_with("0::")).unwrap();
    assert!(v2_line.contains("/wexec-t-v2."), "{v2_line}");
    let dirs = e.mgr.existing_job_dirs();
    assert_eq!(dirs.len(), 1);
    assert!(wait_until(|| job.pids().len() >= 2, Duration::from_secs(5)).await);
    let ids: Vec<_> = job.pids().iter().filter_map(|p| identity(*p)).collect();
    let report = job.stop(Duration::ZERO).await.unwrap();
    assert!(report.killed_after_grace || report.status != JobStatus::Exited(0));
    assert!(alive(&ids).is_empty());
    assert!(!dirs[0].exists());
}

#[tokio::test]
async fn stale_cgroups_of_a_dead_owner_are_cleaned_and_live_ones_kept() {
    let name = "stale_cgroups_of_a_dead_owner_are_cleaned_and_live_ones_kept";
    let e = match env("stale") {
        Ok(e) => e,
        Err(r) => skip!(name, "{r}"),
    };
    // pid_max is at most 2^22, so this owner never exists.
    let stale = "wexec-t-stale.999999999.1.0";
    let mut made = Vec::new();
    for d in e.mgr.hierarchy_dirs() {
        let p = d.join(stale);
        std::fs::create_dir(&p).unwrap();
        made.push(p);
    }
    // A process of the "crashed" daemon still runs in it.
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    for p in &made {
        std::fs::write(p.join("cgroup.procs"), child.id().to_string()).unwrap();
    }
    let live = Job::start(&e.mgr, sh("exec sleep 1000")).await.unwrap();
    assert_eq!(e.mgr.cleanup_stale().unwrap(), 1);
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(made.iter().all(|p| !p.exists()));
    assert!(
        live.report().is_none() && !live.pids().is_empty(),
        "a live job was touched"
    );
    live.stop(Duration::ZERO).await.unwrap();
}

fn processes_with_arg(arg: &str) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        })
        .collect()
}

#[test]
fn a_start_abandoned_midway_leaves_no_process_and_no_cgroup() {
    let name = "a_start_abandoned_midway_leaves_no_process_and_no_cgroup";
    let e = match env("cancel") {
        Ok(e) => e,
        Err(r) => skip!(name, "{r}"),
    };
    let marker = "1013.25";
    // One blocking thread, whose queue is first in, first out: the barrier task below runs
    // only after the blocking half of every abandoned start has run and dropped its result.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .unwrap();
    let abandoned = rt.block_on(async {
        let mut abandoned = 0;
        for _ in 0..5 {
            let mut spec = JobSpec::new("sleep", [marker]);
            spec.env = path_env();
            // Polled once, then dropped at its first await: the blocking part finishes on its
            // own and must undo what it made. (A timeout would race the blocking part: under
            // load it can finish first, and a completed start returns a job, which dropping
            // does not stop.)
            let mut start = std::pin::pin!(Job::start(&e.mgr, spec));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match start.as_mut().poll(&mut cx) {
                std::task::Poll::Pending => abandoned += 1,
                std::task::Poll::Ready(Ok(job)) => {
                    job.stop(Duration::ZERO).await.unwrap();
                }
                std::task::Poll::Ready(Err(e)) => panic!("start failed: {e}"),
            }
        }
        tokio::task::spawn_blocking(|| ()).await.unwrap();
        abandoned
    });
    // Each abandoned start's result was dropped unclaimed, which must have killed its process
    // and removed its cgroups.
    drop(rt);
    assert!(abandoned > 0, "every start completed at its first poll");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(e.mgr.existing_job_dirs().is_empty() && processes_with_arg(marker).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        e.mgr.existing_job_dirs().is_empty() && processes_with_arg(marker).is_empty(),
        "left: {:?} {:?}",
        e.mgr.existing_job_dirs(),
        processes_with_arg(marker)
    );
}

#[tokio::test]
async fn cleanup_own_kills_this_processs_jobs_and_leaves_other_live_owners_alone() {
    let name = "cleanup_own_kills_this_processs_jobs_and_leaves_other_live_owners_alone";
    let e = match env("own") {
        Ok(e) => e,
        Err(r) => skip!(name, "{r}"),
    };
    // A job cgroup of another live owner (pid 1, with its real start time).
    let Some((_, st1)) = identity(1) else {
        skip!(name, "pid 1 is not visible")
    };
    let foreign = format!("wexec-t-own.1.{st1}.0");
    let made: Vec<PathBuf> = e
        .mgr
        .hierarchy_dirs()
        .iter()
        .map(|d| d.join(&foreign))
        .collect();
    for p in &made {
        std::fs::create_dir(p).unwrap();
    }
    let job = Job::start(&e.mgr, sh("exec sleep 1000")).await.unwrap();
    let cleaned = e.mgr.cleanup_own();
    let kept = made.iter().all(|p| p.is_dir());
    for p in &made {
        let _ = std::fs::remove_dir(p);
    }
    assert_eq!(cleaned.unwrap(), 1);
    assert!(kept, "another owner's cgroup was removed");
    let report = tokio::time::timeout(Duration::from_secs(20), job.wait())
        .await
        .expect("the job ended")
        .unwrap();
    assert_eq!(report.status, JobStatus::Signaled(libc::SIGKILL));
}

#[tokio::test]
async fn the_working_directory_is_reached_with_the_jobs_own_permissions() {
    let name = "the_working_directory_is_reached_with_the_jobs_own_permissions";
    let e = match env("cwdperm") {
        Ok(e) => e,
        Err(r) => skip!(name, "{r}"),
    };
    use std::os::unix::fs::PermissionsExt;
    // A directory open to all, below one that only root may search.
    let outer = tempfile::tempdir().unwrap();
    std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let inner = outer.path().join("public");
    std::fs::create_dir(&inner).unwrap();
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spec = || {
        let mut s = sh("pwd");
        s.uid = Some(65534);
        s.gid = Some(65534);
        s.cwd = Some(inner.clone());
        s
    };
    match Job::start(&e.mgr, spec()).await {
        Err(
            err @ Error::Spawn {
                stage: SpawnStage::Chdir,
                ..
            },
        ) => {
            assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}")
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("the job got into a directory its uid cannot reach"),
    }
    // Once the job's uid may search the way there, it gets in.
    std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let (out, report) = run(&e.mgr, spec()).await;
    assert_eq!(report.status, JobStatus::Exited(0));
    assert_eq!(out.trim(), inner.display().to_string());
}
