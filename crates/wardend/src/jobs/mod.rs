//! # jobs — the job service: programs run for a client under cgroup limits in new namespaces
//!
//! Built on `warden-exec`, which does the kernel work (cgroups, namespaces, spawn, stop, the
//! offset-addressed output log). This module adds what a shared daemon needs around it:
//!
//! - **Ownership.** A job belongs to the principal key that started it (`uid:N` locally,
//!   `cert:…` remotely). Others get `NOT_FOUND` for it — its existence is not revealed — unless
//!   the policy grants them `jobs:admin`.
//! - **Caps.** Every job gets at most `[jobs] max_cpu`, `max_memory`, `max_pids` (or the caps
//!   of the caller's roles in `[jobs.roles.NAME]`); a job that asks for nothing gets the cap, a
//!   job that asks for more is refused. A limit the host cannot enforce fails the start.
//! - **Identity.** A job runs as the caller's uid and gid, with an environment of only `PATH`
//!   and what the caller gives, in new PID, mount (own `/proc`), IPC and UTS namespaces, and a
//!   network namespace with only `lo` when the caller asks for no network.
//! - **Retention.** A finished job stays listed, with its status and output, for
//!   `keep_finished`, then it is forgotten and its output freed.
//! - **Cleanup.** At start, job cgroups left by a daemon that died are killed and removed; on
//!   shutdown every running job is stopped (SIGTERM, `stop_grace`, kill) and whatever is left of
//!   this daemon's cgroups is removed.
//!
//! [`api`] turns requests into calls here and results into replies, [`params`] checks what a
//! client asks for, [`wire`] is how jobs and output look on the wire (see `docs/protocol.md`).
//!
//! What it deliberately does not do: keep jobs across daemon restarts (a job's processes die
//! with their cgroups), run a job as another uid than the caller's, or give a job a network
//! beyond `lo` when it is isolated.

#![forbid(unsafe_code)]

pub mod api;
pub mod params;
pub mod wire;

use crate::config::JobsSection;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use warden_exec::{
    CgroupManager, Error as ExecError, Job, JobSpec, LogConfig, ManagerOptions, Namespaces, Output,
};
use warden_wire::reply::{ErrorBody, ErrorCode};

pub use params::{Caps, StartRequest};

/// The `PATH` a job gets unless its request sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who is asking: the owner key jobs are filed under, the uid/gid a job runs as, and whether
/// the policy grants `jobs:admin` (every job visible and stoppable).
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: String,
    pub uid: u32,
    pub gid: u32,
    pub admin: bool,
}

/// One job in the table.
#[derive(Debug)]
pub struct Entry {
    pub id: String,
    pub owner: String,
    pub command: Vec<String>,
    pub started_at: SystemTime,
    pub request: StartRequest,
    pub job: Job,
    ended_at: Mutex<Option<SystemTime>>,
}

impl Entry {
    /// When the job's end was seen (its report is published by then).
    pub fn ended_at(&self) -> Option<SystemTime> {
        *self.ended_at.lock()
    }
}

type Table = Arc<Mutex<HashMap<String, Arc<Entry>>>>;

/// The daemon's jobs.
pub struct JobService {
    mgr: Result<Arc<CgroupManager>, String>,
    table: Table,
    /// Starts under way, per owner (not yet in `table`).
    starting: Mutex<HashMap<String, usize>>,
    closing: AtomicBool,
}

/// One start under way; counted until it is dropped (the job is in the table, or failed).
struct Starting<'a> {
    map: &'a Mutex<HashMap<String, usize>>,
    key: &'a str,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        let mut m = self.map.lock();
        if let Some(n) = m.get_mut(self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(self.key);
            }
        }
    }
}

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

impl JobService {
    /// Decides once which cgroup hierarchies serve which controller. Creates nothing; when this
    /// host has no usable cgroups the service still exists and every start says why it fails.
    pub fn new(cfg: &JobsSection) -> JobService {
        let mgr = CgroupManager::detect(ManagerOptions {
            prefix: cfg.cgroup_prefix.clone(),
            use_v2: true,
            use_v1: true,
        })
        .map_err(|e| e.to_string());
        JobService {
            mgr,
            table: Arc::new(Mutex::new(HashMap::new())),
            starting: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
        }
    }

    /// One line per controller (which cgroup version and directory serves it), or why there
    /// are no cgroups: for the log at start.
    pub fn describe(&self) -> Result<Vec<String>, String> {
        match &self.mgr {
            Ok(m) => Ok(m.describe()),
            Err(e) => Err(e.clone()),
        }
    }

    /// Kills and removes the job cgroups of a daemon that is gone. Call once at start.
    pub fn cleanup_stale(&self) -> Result<usize, String> {
        let mgr = self.mgr.as_ref().map_err(Clone::clone)?;
        mgr.cleanup_stale().map_err(|e| e.to_string())
    }

    /// Starts a job for `caller`. Returns once the program runs: an exec failure, an
    /// unenforceable limit or a cgroup refusal is this call's error.
    pub async fn start(
        &self,
        cfg: &JobsSection,
        caller: &Caller,
        req: StartRequest,
    ) -> Result<Arc<Entry>, ErrorBody> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(err(ErrorCode::Unavailable, "the daemon is shutting down"));
        }
        let mgr = self.mgr.as_ref().map_err(|e| {
            err(
                ErrorCode::Unavailable,
                format!("jobs are unavailable on this host: {e}"),
            )
        })?;
        // Counted with the starts still under way, so that concurrent starts cannot pass the
        // limit together.
        let _slot = {
            let table = self.table.lock();
            let mut starting = self.starting.lock();
            let running = table
                .values()
                .filter(|e| e.owner == caller.key && e.job.report().is_none())
                .count()
                + starting.get(&caller.key).copied().unwrap_or(0);
            if running >= cfg.max_running_per_client {
                return Err(err(
                    ErrorCode::RateLimited,
                    format!(
                        "{running} jobs of yours are running, the most allowed (jobs.max_running_per_client): stop one first"
                    ),
                ));
            }
            *starting.entry(caller.key.clone()).or_insert(0) += 1;
            Starting {
                map: &self.starting,
                key: &caller.key,
            }
        };
        let spec = self.spec(cfg, caller, &req);
        let job = Job::start(mgr, spec)
            .await
            .map_err(|e| exec_error(&req.command[0], e))?;
        let entry = Arc::new(Entry {
            id: new_id(),
            owner: caller.key.clone(),
            command: req.command.clone(),
            started_at: SystemTime::now(),
            request: req,
            job,
            ended_at: Mutex::new(None),
        });
        self.table.lock().insert(entry.id.clone(), entry.clone());
        let (table, e, keep) = (self.table.clone(), entry.clone(), cfg.keep_finished.get());
        tokio::spawn(async move {
            let _ = e.job.wait().await;
            *e.ended_at.lock() = Some(SystemTime::now());
            tokio::time::sleep(keep).await;
            table.lock().remove(&e.id);
        });
        Ok(entry)
    }

    fn spec(&self, cfg: &JobsSection, caller: &Caller, req: &StartRequest) -> JobSpec {
        let mut spec = JobSpec::new(&req.command[0], &req.command[1..]);
        let mut env = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
        for (k, v) in &req.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        spec.env = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        spec.cwd = Some(req.cwd.clone().unwrap_or_else(|| "/".into()));
        spec.uid = Some(caller.uid);
        spec.gid = Some(caller.gid);
        spec.namespaces = Namespaces {
            pid: true,
            mount: true,
            net: !req.network,
            uts: true,
            ipc: true,
        };
        spec.limits = req.limits.clone();
        let spill_dir = match ensure_private_dir(&cfg.spill_dir) {
            Ok(()) => Some(cfg.spill_dir.clone()),
            Err(e) => {
                tracing::warn!(dir = %cfg.spill_dir.display(), error = %e,
                    "job output spill directory unusable; output beyond jobs.output_memory is dropped");
                None
            }
        };
        let spill = cfg.output_spill.0;
        spec.output = Output::Log(LogConfig {
            memory_limit: usize::try_from(cfg.output_memory.0).unwrap_or(usize::MAX),
            spill_dir,
            spill_limit: spill,
            segment_size: (spill / 8).clamp(1 << 20, 64 << 20),
        });
        spec
    }

    /// The job `id` if `caller` may see it; `NOT_FOUND` otherwise, whether it does not exist or
    /// belongs to someone else.
    pub fn get(&self, caller: &Caller, id: &str) -> Result<Arc<Entry>, ErrorBody> {
        self.table
            .lock()
            .get(id)
            .filter(|e| caller.admin || e.owner == caller.key)
            .cloned()
            .ok_or_else(|| {
                err(
                    ErrorCode::NotFound,
                    format!("no job `{}` of yours", short(id)),
                )
            })
    }

    /// The caller's jobs (every job when `all` and the caller is an admin), oldest first.
    pub fn list(&self, caller: &Caller, all: bool) -> Vec<Arc<Entry>> {
        let mut v: Vec<Arc<Entry>> = self
            .table
            .lock()
            .values()
            .filter(|e| (all && caller.admin) || e.owner == caller.key)
            .cloned()
            .collect();
        v.sort_by_key(|e| e.started_at);
        v
    }

    /// Stops every running job (SIGTERM, `grace`, kill) and removes what is left of this
    /// daemon's cgroups. New starts are refused from the first call on; call it again after the
    /// connections drained to catch a start that was already past that check.
    pub async fn shutdown(&self, grace: Duration) {
        self.closing.store(true, Ordering::SeqCst);
        let running: Vec<Arc<Entry>> = self
            .table
            .lock()
            .values()
            .filter(|e| e.job.report().is_none())
            .cloned()
            .collect();
        if !running.is_empty() {
            tracing::info!(jobs = running.len(), "stopping running jobs");
        }
        let stops = running.iter().map(|e| e.job.stop(grace));
        for (e, r) in running
            .iter()
            .zip(futures_util::future::join_all(stops).await)
        {
            if let Err(error) = r {
                tracing::warn!(job = %e.id, %error, "stopping a job failed");
            }
        }
        if let Ok(mgr) = &self.mgr {
            let mgr = mgr.clone();
            match tokio::task::spawn_blocking(move || mgr.cleanup_own()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(cgroups = n, "removed leftover job cgroups"),
                Ok(Err(e)) => tracing::warn!(error = %e, "removing job cgroups failed"),
                Err(e) => tracing::warn!(error = %e, "job cgroup cleanup task failed"),
            }
        }
    }
}

/// Creates `dir` (0700) if missing; it must be a directory.
fn ensure_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) if dir.is_dir() => Ok(()),
        Ok(()) => Err(std::io::Error::other("not a directory")),
        Err(e) => Err(e),
    }
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A random UUID (version 4) naming a job.
fn new_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// How a failed start reads to the client: an exec failure is the program's fault
/// (`EXECUTION_ERROR`, with the stage and errno), a limit this host cannot enforce or missing
/// cgroups are the host's (`UNAVAILABLE`), a bad spec the request's (`VALIDATION_ERROR`).
fn exec_error(program: &str, e: ExecError) -> ErrorBody {
    let errno = e.raw_os_error();
    match &e {
        ExecError::Spawn { stage, .. } => ErrorBody::new(
            ErrorCode::ExecutionError,
            format!("cannot start `{}`: {e}", short(program)),
        )
        .with_details(serde_json::json!({ "stage": stage.to_string(), "errno": errno })),
        ExecError::Unenforceable { limit, .. } => {
            ErrorBody::new(ErrorCode::Unavailable, e.to_string())
                .with_details(serde_json::json!({ "limit": limit }))
        }
        ExecError::InvalidSpec(_) => ErrorBody::new(ErrorCode::ValidationError, e.to_string()),
        ExecError::NoCgroups(_) | ExecError::Cgroup { .. } => {
            ErrorBody::new(ErrorCode::Unavailable, e.to_string())
        }
        _ => ErrorBody::new(ErrorCode::InternalError, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_uuid_v4_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }

    #[test]
    fn exec_failures_name_the_stage_and_errno() {
        let e = exec_error(
            "nope",
            ExecError::Spawn {
                stage: warden_exec::SpawnStage::Exec,
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            },
        );
        assert_eq!(e.code, ErrorCode::ExecutionError);
        assert!(e.message.contains("nope"), "{}", e.message);
        assert_eq!(e.details.unwrap()["errno"], libc::ENOENT);
    }
}
