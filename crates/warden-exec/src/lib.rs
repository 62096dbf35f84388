//! # warden-exec: run a job in fresh cgroups and namespaces, keep its output
//!
//! warden-exec starts one program per job, directly inside a cgroup created for it, with
//! optional new PID, mount, network, UTS and IPC namespaces, and reports how it ended. It has
//! no dependency on the rest of warden; the daemon's job service is built on it.
//!
//! ## What it does
//!
//! - **Cgroups, v2 and v1.** [`CgroupManager::detect`] decides once, per controller, whether
//!   cgroup v2 (the controller is in our v2 cgroup's `cgroup.controllers`) or the v1 hierarchy
//!   it is bound to serves it. Each controller of each version is one small module
//!   implementing one `Controller` trait (apply limits, read statistics). When a v2 hierarchy
//!   is mounted the job also gets a v2 directory even if v2 has no controllers (hybrid hosts):
//!   the process is born there with `CLONE_INTO_CGROUP`, and `cgroup.kill` kills the job.
//! - **Limits** ([`Limits`]): CPU quota/period, memory with swap off, pids, per-device IO
//!   bytes/s and IOPS. A requested limit that this host cannot enforce fails the start with
//!   [`Error::Unenforceable`]; nothing is ever silently skipped. *Swap off*: v2
//!   `memory.swap.max = 0`; v1 `memory.memsw.limit_in_bytes` = the memory limit. Without swap
//!   accounting the memory limit is accepted only on a host with no swap (`SwapTotal: 0`),
//!   because there no swapping can happen; otherwise it is refused.
//! - **Start** ([`Job::start`]): the process joins its cgroups before it runs anything (v2:
//!   born in the cgroup; v1: it writes itself into each hierarchy's `tasks` before exec), then
//!   gets its namespaces (a fresh `/proc` in a new mount namespace, `lo` up in a new network
//!   namespace), gid/uid, then its working directory (reached with the job's own permissions),
//!   environment (only what the spec gives), and stdout/stderr pipes. Anything that fails before exec — ENOENT, EACCES, a cgroup refusing
//!   the process — is the error of the start call itself (a close-on-exec error pipe).
//! - **Stop** ([`Job::stop`]): SIGTERM to every process of the cgroup (with the cgroup frozen
//!   while signalled, so forks cannot race it), a grace period, then the cgroup is killed
//!   (`cgroup.kill`; v1: freeze, SIGKILL everything, thaw; repeated until empty), then
//!   removed. A job also ends when its main process ends: what it left behind is killed.
//!   Fork bombs and daemonized grandchildren do not escape, since they cannot leave the cgroup.
//! - **Stale cgroups** ([`CgroupManager::cleanup_stale`]): job cgroups are named
//!   `<prefix>.<pid>.<start time>.<n>` below our own cgroup in each hierarchy; those whose
//!   owner process no longer exists are killed and removed at start;
//!   [`CgroupManager::cleanup_own`] removes what is left of this process's own at shutdown.
//! - **Output** ([`OutputLog`]): stdout and stderr chunks (tagged, binary-safe) in one log
//!   addressed by byte offset; any number of [`LogReader`]s from any offset, following new
//!   output without polling; the writer never waits for a reader; memory is bounded, the oldest
//!   output spills to unnamed files, and beyond the spill cap the oldest is dropped and readers
//!   get a [`LogItem::Dropped`] marker. Or, with [`Output::Pipes`], the raw pipes.
//! - **Report** ([`JobReport`]): exit code or signal, OOM kill as its own [`JobStatus`], and
//!   [`ResourceUsage`]: CPU time, peak memory, OOM kills, pids-limit hits, IO bytes.
//!
//! ## What it does not do, and why
//!
//! - No images, chroot, pivot_root, seccomp or capabilities dropping: a job sees the host's
//!   filesystem (with its own `/proc`). Isolation beyond namespaces and cgroups belongs to a
//!   container runtime, not a job runner.
//! - No user namespaces: jobs run as a uid/gid the caller chooses, which needs root.
//! - No init in the PID namespace: the job is pid 1 there, and (kernel rule) pid 1 gets
//!   SIGTERM only if it handles it. A job that ignores it is killed after the grace period.
//! - No network beyond `lo` in a new network namespace (no veth, no NAT).
//! - No persistence: a job does not survive the daemon; its cgroups are cleaned at the next start.
//! - Reads of spilled output are synchronous file reads (from the page cache in practice).
//! - No moving of the daemon itself: on a v2-only host, v2 controllers can be enabled for job
//!   cgroups only if the daemon's own cgroup has no processes of its own or is the root (the
//!   "no internal processes" rule); run the daemon in a leaf of a delegated subtree
//!   (systemd `Delegate=yes`) and give it the parent. If enabling fails, the limit is refused.
//! - stdin is `/dev/null`: jobs are not interactive.
//! - Killing without a freezer (neither v2 nor v1 freezer) falls back to repeated SIGKILL
//!   sweeps, which converge but can race pid reuse in theory.
//!
//! ## Requirements
//!
//! Linux ≥ 5.3 (`clone3`, pidfds; there is no `fork` fallback), ≥ 5.7 for `CLONE_INTO_CGROUP`
//! (older: the child writes `cgroup.procs`), ≥ 5.14 for `cgroup.kill` (older: freezing and
//! signalling), ≥ 5.11 for `close_range`; root; a tokio runtime with IO and time drivers. All
//! `unsafe` code is in one module (`sys`), each block with its `SAFETY` argument.
//!
//! ## Example
//!
//! ```no_run
//! # async fn demo() -> warden_exec::Result<()> {
//! use std::time::Duration;
//! use warden_exec::{CgroupManager, Job, JobSpec, LogItem, ManagerOptions, Namespaces};
//!
//! let mgr = CgroupManager::detect(ManagerOptions::default())?;
//! mgr.cleanup_stale()?; // what a crashed predecessor left
//! let mut spec = JobSpec::new("sh", ["-c", "echo $$"]);
//! spec.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
//! spec.namespaces = Namespaces::all();
//! spec.limits.memory_max = Some(256 << 20);
//! spec.limits.pids_max = Some(64);
//! let job = Job::start(&mgr, spec).await?; // ENOENT etc. are errors here
//! let mut reader = job.log().expect("log output").reader();
//! while let Some(item) = reader.next().await {
//!     if let LogItem::Data { bytes, .. } = item {
//!         print!("{}", String::from_utf8_lossy(&bytes)); // "1"
//!     }
//! }
//! let report = job.stop(Duration::from_secs(5)).await?;
//! println!("{:?} {:?}", report.status, report.usage);
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod cgroup;
mod error;
mod job;
mod log;
mod pipe;
mod spawn;
mod spec;
mod sys;

pub use cgroup::{CgroupManager, ManagerOptions, ResourceUsage};
pub use error::{Error, Result, SpawnStage};
pub use job::{Job, JobReport, JobStatus};
pub use log::{FileRange, LogConfig, LogItem, LogPiece, LogReader, OutputLog, Stream};
pub use pipe::PipeReader;
pub use spec::{CpuLimit, DeviceNumber, IoLimit, JobSpec, Limits, Namespaces, Output};
