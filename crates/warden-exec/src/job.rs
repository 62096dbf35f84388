//! A running job: start, output, stop, and the end report.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cgroup::{CgroupManager, JobCgroup, ResourceUsage};
use crate::error::{Error, Result};
use crate::log::{OutputLog, Stream};
use crate::pipe::PipeReader;
use crate::spec::{JobSpec, Output};
use crate::{spawn, sys};

/// How the job's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal (not the OOM killer).
    Signaled(i32),
    /// Killed by the kernel's OOM killer because the job hit its memory limit.
    OomKilled,
    /// The exit status could not be collected (someone else reaped the process).
    Unknown,
}

/// The end of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobReport {
    /// How the main process ended.
    pub status: JobStatus,
    /// What the job used, from its cgroups.
    pub usage: ResourceUsage,
    /// Whether [`Job::stop`] was called.
    pub stop_requested: bool,
    /// Whether the job had to be killed after the grace period.
    pub killed_after_grace: bool,
    /// From start to the end of the main process.
    pub runtime: Duration,
    /// Set if cleaning up the cgroups failed (processes or directories may remain).
    pub cleanup_error: Option<String>,
}

#[derive(Debug)]
struct Inner {
    pid: i32,
    born_in_cgroup: bool,
    cgroup: Arc<JobCgroup>,
    log: Option<Arc<OutputLog>>,
    pipes: Mutex<Option<(PipeReader, PipeReader)>>,
    report: watch::Receiver<Option<Arc<JobReport>>>,
    stop_requested: Arc<AtomicBool>,
    killed_by_stop: Arc<AtomicBool>,
}

/// A started job. Cheap to clone; dropping every handle does not stop the job (it still ends,
/// is reaped and cleaned up by its supervisor task).
#[derive(Debug, Clone)]
pub struct Job {
    inner: Arc<Inner>,
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Io {
        what: "job start task",
        source: std::io::Error::other(e.to_string()),
    }
}

impl Job {
    /// Creates the job's cgroups, applies its limits and starts its process inside them.
    /// Returns only once the program is running: an unenforceable limit, an invalid spec, or a
    /// failure in the child before exec (e.g. ENOENT, EACCES) is this call's error, and leaves
    /// no cgroup behind. Must be called within a tokio runtime with IO and time enabled.
    pub async fn start(mgr: &Arc<CgroupManager>, spec: JobSpec) -> Result<Job> {
        let mgr = mgr.clone();
        let output = spec.output.clone();
        let (cg, spawned) = tokio::task::spawn_blocking(move || -> Result<_> {
            let cg = JobCgroup::create(&mgr, &spec.limits)?;
            let s = spawn::spawn(&spec, &cg)?;
            Ok((cg, s))
        })
        .await
        .map_err(join_err)??;
        let started = Instant::now();
        let cg = Arc::new(cg);
        // From here on, an error drops the reaper (kills and reaps the process) and `cg` (kills
        // what is left and removes the cgroups).
        let reaper = spawned.reaper;
        let pidfd = sys::async_pidfd(spawned.pidfd).map_err(Error::io("registering the pidfd"))?;
        let stdout = PipeReader::new(spawned.stdout).map_err(Error::io("stdout pipe"))?;
        let stderr = PipeReader::new(spawned.stderr).map_err(Error::io("stderr pipe"))?;

        let (log, pipes, pumps) = match output {
            Output::Log(cfg) => {
                let log = OutputLog::new(cfg);
                let pumps = vec![
                    tokio::spawn(pump(stdout, log.clone(), Stream::Stdout)),
                    tokio::spawn(pump(stderr, log.clone(), Stream::Stderr)),
                ];
                (Some(log), None, pumps)
            }
            Output::Pipes => (None, Some((stdout, stderr)), Vec::new()),
        };
        // The supervisor owns the child from here.
        reaper.disarm();
        let (tx, rx) = watch::channel(None);
        let stop_requested = Arc::new(AtomicBool::new(false));
        let killed_by_stop = Arc::new(AtomicBool::new(false));
        tokio::spawn(supervise(Supervised {
            pid: spawned.pid,
            pidfd,
            cgroup: cg.clone(),
            pumps,
            log: log.clone(),
            tx,
            stop_requested: stop_requested.clone(),
            killed_by_stop: killed_by_stop.clone(),
            started,
        }));
        Ok(Job {
            inner: Arc::new(Inner {
                pid: spawned.pid,
                born_in_cgroup: spawned.born_in_cgroup,
                cgroup: cg,
                log,
                pipes: Mutex::new(pipes),
                report: rx,
                stop_requested,
                killed_by_stop,
            }),
        })
    }

    /// The main process's pid (in our PID namespace).
    pub fn pid(&self) -> i32 {
        self.inner.pid
    }

    /// Whether the process was born in its cgroup (v2 `CLONE_INTO_CGROUP`) rather than
    /// joining it by writing itself into its cgroups before exec.
    pub fn born_in_cgroup(&self) -> bool {
        self.inner.born_in_cgroup
    }

    /// The output log, with [`Output::Log`].
    pub fn log(&self) -> Option<Arc<OutputLog>> {
        self.inner.log.clone()
    }

    /// stdout and stderr read ends, once, with [`Output::Pipes`]. The job blocks when a pipe is
    /// full and nobody reads it.
    pub fn take_pipes(&self) -> Option<(PipeReader, PipeReader)> {
        self.inner
            .pipes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Pids of every process currently in the job.
    pub fn pids(&self) -> Vec<i32> {
        self.inner.cgroup.pids()
    }

    /// The report, if the job has ended.
    pub fn report(&self) -> Option<Arc<JobReport>> {
        self.inner.report.borrow().clone()
    }

    /// Waits for the end of the job: the main process has ended, everything else in its
    /// cgroups was killed, the cgroups are removed and the output is complete.
    pub async fn wait(&self) -> Result<Arc<JobReport>> {
        let mut rx = self.inner.report.clone();
        let r = rx.wait_for(Option::is_some).await.map_err(|_| Error::Io {
            what: "job supervisor ended without a report",
            source: std::io::Error::from_raw_os_error(libc::ECHILD),
        })?;
        Ok(r.clone().unwrap_or_else(unreachable_report))
    }

    /// Stops the job: SIGTERM to every process in it, up to `grace` for them to exit, then the
    /// whole cgroup is killed. Returns the end report.
    pub async fn stop(&self, grace: Duration) -> Result<Arc<JobReport>> {
        if let Some(r) = self.report() {
            return Ok(r);
        }
        self.inner.stop_requested.store(true, Ordering::SeqCst);
        let cg = self.inner.cgroup.clone();
        tokio::task::spawn_blocking(move || cg.signal_all(libc::SIGTERM))
            .await
            .map_err(join_err)?;
        if let Ok(r) = tokio::time::timeout(grace, self.wait()).await {
            return r;
        }
        self.inner.killed_by_stop.store(true, Ordering::SeqCst);
        let cg = self.inner.cgroup.clone();
        tokio::task::spawn_blocking(move || cg.kill_all())
            .await
            .map_err(join_err)??;
        self.wait().await
    }
}

fn unreachable_report() -> Arc<JobReport> {
    Arc::new(JobReport {
        status: JobStatus::Unknown,
        usage: ResourceUsage::default(),
        stop_requested: false,
        killed_after_grace: false,
        runtime: Duration::ZERO,
        cleanup_error: None,
    })
}

/// Moves a pipe's output into the log. A large read (bulk output) goes into the log as a
/// slice of the read buffer, without a copy; consecutive large reads share one buffer, so
/// what stays allocated beyond the log's accounting is about one buffer per stream. A small
/// read is copied, so that a job printing a line now and then does not keep a whole buffer
/// alive per line (or per finished job).
async fn pump(mut r: PipeReader, log: Arc<OutputLog>, stream: Stream) {
    const BUF: usize = 256 << 10;
    const SLICE_MIN: usize = BUF / 4;
    let mut buf = bytes::BytesMut::with_capacity(BUF);
    loop {
        if buf.capacity() < SLICE_MIN {
            buf = bytes::BytesMut::with_capacity(BUF);
        }
        match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) if n < SLICE_MIN => {
                log.append(stream, &buf[..n]);
                buf.clear();
            }
            Ok(_) => log.append_bytes(stream, buf.split().freeze()),
        }
    }
}

struct Supervised {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    cgroup: Arc<JobCgroup>,
    pumps: Vec<JoinHandle<()>>,
    log: Option<Arc<OutputLog>>,
    tx: watch::Sender<Option<Arc<JobReport>>>,
    stop_requested: Arc<AtomicBool>,
    killed_by_stop: Arc<AtomicBool>,
    started: Instant,
}

/// Waits for the main process (its pidfd turns readable when it exits), reaps it, kills
/// whatever it left in the cgroups (a job ends with its main process), reads the statistics,
/// removes the cgroups, lets the output drain and publishes the report.
async fn supervise(s: Supervised) {
    let status = loop {
        match s.pidfd.readable().await {
            Ok(mut guard) => match sys::wait_pid(s.pid, false) {
                Ok(Some(st)) => break Some(st),
                Ok(None) => guard.clear_ready(),
                Err(_) => break None,
            },
            Err(_) => {
                let pid = s.pid;
                break tokio::task::spawn_blocking(move || sys::wait_pid(pid, true))
                    .await
                    .ok()
                    .and_then(|r| r.ok().flatten());
            }
        }
    };
    let runtime = s.started.elapsed();
    let cg = s.cgroup.clone();
    let (usage, cleanup_error) = tokio::task::spawn_blocking(move || {
        let killed = cg.kill_all();
        let usage = cg.stats();
        let removed = cg.destroy();
        (usage, killed.and(removed).err().map(|e| e.to_string()))
    })
    .await
    .unwrap_or_else(|e| (ResourceUsage::default(), Some(e.to_string())));
    for p in s.pumps {
        let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
    }
    if let Some(log) = &s.log {
        log.close();
    }
    let killed_by_stop = s.killed_by_stop.load(Ordering::SeqCst);
    let status = match status {
        Some(sys::WaitStatus::Exited(c)) => JobStatus::Exited(c),
        Some(sys::WaitStatus::Signaled(libc::SIGKILL))
            if !killed_by_stop && usage.oom_kills.unwrap_or(0) > 0 =>
        {
            JobStatus::OomKilled
        }
        Some(sys::WaitStatus::Signaled(sig)) => JobStatus::Signaled(sig),
        None => JobStatus::Unknown,
    };
    let report = JobReport {
        status,
        usage,
        stop_requested: s.stop_requested.load(Ordering::SeqCst),
        killed_after_grace: killed_by_stop,
        runtime,
        cleanup_error,
    };
    s.tx.send_replace(Some(Arc::new(report)));
}
