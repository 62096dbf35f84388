//! Cgroups: which hierarchy serves which controller (picked once, by [`CgroupManager::detect`]),
//! one directory per job in each hierarchy used, limits, statistics, kill and removal.
//!
//! Per controller, cgroup v2 is used when the controller is listed in our v2 cgroup's
//! `cgroup.controllers`; otherwise the v1 hierarchy it is bound to. When a v2 hierarchy is
//! mounted, every job also gets a v2 directory even if v2 has no controllers: it is where the
//! process is born (`CLONE_INTO_CGROUP`), and it gives `cgroup.kill`, `cgroup.freeze` and
//! `cpu.stat` for free (this is the "hybrid" layout, as on hosts where controllers are bound
//! to v1).
//!
//! Job directories are named `<prefix>.<owner pid>.<owner start time>.<seq>`, directly below
//! this process's own cgroup in each hierarchy. The owner part makes a directory left by a
//! crashed daemon recognisable as stale: its owner pid is gone or has another start time.

pub(crate) mod fs;
pub(crate) mod v1;
pub(crate) mod v2;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::spec::Limits;
use crate::sys;

/// The kinds of limit a controller can enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitKind {
    Cpu,
    Memory,
    Pids,
    Io,
}

impl LimitKind {
    fn name(self) -> &'static str {
        match self {
            LimitKind::Cpu => "cpu",
            LimitKind::Memory => "memory",
            LimitKind::Pids => "pids",
            LimitKind::Io => "io",
        }
    }

    fn requested(self, l: &Limits) -> bool {
        match self {
            LimitKind::Cpu => l.cpu.is_some(),
            LimitKind::Memory => l.memory_max.is_some(),
            LimitKind::Pids => l.pids_max.is_some(),
            LimitKind::Io => !l.io.is_empty(),
        }
    }
}

/// One controller of one cgroup version: writes its limits into a job's directory and reads
/// its statistics back.
pub(crate) trait Controller: Send + Sync + fmt::Debug {
    fn name(&self) -> &'static str;
    /// The limits this controller enforces on this host.
    fn enforces(&self) -> &'static [LimitKind];
    /// Writes the part of `limits` this controller enforces. Called before any process joins.
    fn apply(&self, dir: &Path, limits: &Limits) -> Result<()>;
    /// Fills the statistics this controller knows; missing files leave fields `None`.
    fn stats(&self, dir: &Path, usage: &mut ResourceUsage);
}

/// Resource usage of a job, read from its cgroups when it ends. `None`: this host cannot tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// CPU time of all the job's processes.
    pub cpu_time: Option<Duration>,
    /// Periods in which the CPU quota throttled the job.
    pub cpu_throttled_periods: Option<u64>,
    /// Peak memory (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`).
    pub memory_peak: Option<u64>,
    /// Processes killed by the OOM killer inside the job.
    pub oom_kills: Option<u64>,
    /// Forks refused because of the pids limit.
    pub pids_limit_hits: Option<u64>,
    /// Bytes read from block devices.
    pub io_read_bytes: Option<u64>,
    /// Bytes written to block devices.
    pub io_write_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
struct Hierarchy {
    /// This process's own cgroup directory in that hierarchy.
    own: PathBuf,
    /// For diagnostics: "unified" or the v1 controller list.
    label: String,
}

/// How [`CgroupManager::detect`] may choose.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// Marker of our job cgroups: `[A-Za-z0-9_-]+`. Stale-cgroup cleanup only ever looks at
    /// directories carrying it.
    pub prefix: String,
    /// Use the v2 hierarchy when mounted.
    pub use_v2: bool,
    /// Use v1 hierarchies for controllers v2 does not offer.
    pub use_v1: bool,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            prefix: "warden-exec".into(),
            use_v2: true,
            use_v1: true,
        }
    }
}

/// The cgroup layout of this host as seen from this process, decided once.
#[derive(Debug)]
pub struct CgroupManager {
    prefix: String,
    owner: String,
    seq: AtomicU64,
    hierarchies: Vec<Hierarchy>,
    /// Index into `hierarchies` of the v2 one, if used.
    v2: Option<usize>,
    /// Index of the v1 freezer hierarchy, if used.
    freezer: Option<usize>,
    controllers: Vec<(usize, Box<dyn Controller>)>,
}

const KNOWN_V1: [&str; 6] = ["cpu", "cpuacct", "memory", "pids", "blkio", "freezer"];

struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    readonly: bool,
    v1_controllers: Vec<String>,
}

fn mounts() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::NoCgroups(format!("reading /proc/self/mountinfo: {e}")))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 6 || post.len() < 3 {
            continue;
        }
        let fstype = post[0];
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        out.push(Mount {
            root: pre[3].to_string(),
            point: PathBuf::from(pre[4]),
            fstype: fstype.to_string(),
            readonly: pre[5].split(',').any(|o| o == "ro"),
            v1_controllers: post[2]
                .split(',')
                .filter(|o| KNOWN_V1.contains(o))
                .map(String::from)
                .collect(),
        });
    }
    Ok(out)
}

/// `(controllers, path)` for each line of /proc/self/cgroup.
fn own_cgroups() -> Result<Vec<(Vec<String>, String)>> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| Error::NoCgroups(format!("reading /proc/self/cgroup: {e}")))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrls = it.next()?;
            let path = it.next()?;
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect();
            Some((ctrls, path.to_string()))
        })
        .collect())
}

fn own_dir(m: &Mount, path: &str) -> PathBuf {
    let rel = if m.root == "/" {
        path
    } else {
        path.strip_prefix(m.root.as_str()).unwrap_or(path)
    };
    m.point.join(rel.trim_start_matches('/'))
}

/// Start time (clock ticks since boot) of a process, the half of its identity that a reused
/// pid does not share.
/// The start time of the live process `pid`; `None` if there is none. A zombie is dead: it
/// has exited and only waits to be reaped, which its new parent (init, after the daemon that
/// started it was killed) may take its time to do.
fn start_time(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18).map(String::from)
}

impl CgroupManager {
    /// Inspects this host's cgroup mounts and this process's cgroups and decides, per
    /// controller, which hierarchy serves it. Creates nothing.
    pub fn detect(opts: ManagerOptions) -> Result<Arc<CgroupManager>> {
        if opts.prefix.is_empty()
            || !opts
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::InvalidSpec(format!(
                "cgroup prefix {:?} must be [A-Za-z0-9_-]+",
                opts.prefix
            )));
        }
        let mounts = mounts()?;
        let own = own_cgroups()?;
        let mut hierarchies = Vec::new();
        let mut controllers: Vec<(usize, Box<dyn Controller>)> = Vec::new();
        let mut v2 = None;
        let mut v2_ctrls = BTreeSet::new();

        if opts.use_v2 {
            let m = mounts.iter().find(|m| m.fstype == "cgroup2" && !m.readonly);
            let p = own.iter().find(|(c, _)| c.is_empty());
            if let (Some(m), Some((_, path))) = (m, p) {
                let dir = own_dir(m, path);
                if dir.is_dir() {
                    let available: BTreeSet<String> = fs::read_opt(&dir, "cgroup.controllers")
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(String::from)
                        .collect();
                    let enabled = fs::read_opt(&dir, "cgroup.subtree_control").unwrap_or_default();
                    for c in ["cpu", "memory", "pids", "io"] {
                        if !available.contains(c) {
                            continue;
                        }
                        // Enabling a controller for our children changes only what they see.
                        if enabled.split_whitespace().any(|e| e == c)
                            || fs::write(&dir, "cgroup.subtree_control", &format!("+{c}")).is_ok()
                        {
                            v2_ctrls.insert(c.to_string());
                        }
                    }
                    v2 = Some(hierarchies.len());
                    hierarchies.push(Hierarchy {
                        own: dir,
                        label: "unified".into(),
                    });
                }
            }
        }
        if let Some(i) = v2 {
            controllers.push((
                i,
                Box::new(v2::cpu::Cpu {
                    enabled: v2_ctrls.contains("cpu"),
                }),
            ));
            if v2_ctrls.contains("memory") {
                controllers.push((i, Box::new(v2::memory::Memory)));
            }
            if v2_ctrls.contains("pids") {
                controllers.push((i, Box::new(v2::pids::Pids)));
            }
            if v2_ctrls.contains("io") {
                controllers.push((i, Box::new(v2::io::Io)));
            }
        }

        let mut freezer = None;
        if opts.use_v1 {
            // v1 controllers that v2 does not already cover. With a v2 directory, CPU time
            // (cpu.stat) and killing (cgroup.kill) come from it.
            let wanted: Vec<&str> = KNOWN_V1
                .iter()
                .copied()
                .filter(|c| match *c {
                    "cpu" => !v2_ctrls.contains("cpu"),
                    "cpuacct" | "freezer" => v2.is_none(),
                    "blkio" => !v2_ctrls.contains("io"),
                    other => !v2_ctrls.contains(other),
                })
                .collect();
            for name in wanted {
                let Some(m) = mounts
                    .iter()
                    .find(|m| m.fstype == "cgroup" && m.v1_controllers.iter().any(|c| c == name))
                else {
                    continue;
                };
                let Some((_, path)) = own
                    .iter()
                    .find(|(c, _)| c.iter().any(|c| m.v1_controllers.contains(c)))
                else {
                    continue;
                };
                let dir = own_dir(m, path);
                if m.readonly || !dir.is_dir() {
                    continue;
                }
                let idx = match hierarchies.iter().position(|h| h.own == dir) {
                    Some(i) => i,
                    None => {
                        hierarchies.push(Hierarchy {
                            own: dir,
                            label: m.v1_controllers.join(","),
                        });
                        hierarchies.len() - 1
                    }
                };
                let c: Box<dyn Controller> = match name {
                    "cpu" => Box::new(v1::cpu::Cpu),
                    "cpuacct" => Box::new(v1::cpuacct::CpuAcct),
                    "memory" => Box::new(v1::memory::Memory),
                    "pids" => Box::new(v1::pids::Pids),
                    "blkio" => Box::new(v1::blkio::Blkio),
                    _ => {
                        freezer = Some(idx);
                        Box::new(v1::freezer::Freezer)
                    }
                };
                controllers.push((idx, c));
            }
        }
        if hierarchies.is_empty() {
            return Err(Error::NoCgroups(
                "no writable cgroup hierarchy holds this process".into(),
            ));
        }
        let pid = std::process::id().to_string();
        let start = start_time(&pid).unwrap_or_else(|| "0".into());
        Ok(Arc::new(CgroupManager {
            prefix: opts.prefix,
            owner: format!("{pid}.{start}"),
            seq: AtomicU64::new(0),
            hierarchies,
            v2,
            freezer,
            controllers,
        }))
    }

    /// Whether the v2 hierarchy is used (birth into the cgroup with `CLONE_INTO_CGROUP`, kill
    /// with `cgroup.kill`).
    pub fn uses_v2(&self) -> bool {
        self.v2.is_some()
    }

    /// Whether a limit of this kind can be enforced here (`"cpu"`, `"memory"`, `"pids"`, `"io"`).
    pub fn can_enforce(&self, limit: &str) -> bool {
        self.controllers
            .iter()
            .any(|(_, c)| c.enforces().iter().any(|k| k.name() == limit))
    }

    /// One line per controller: which version and hierarchy serves it. For logs and diagnostics.
    pub fn describe(&self) -> Vec<String> {
        self.controllers
            .iter()
            .map(|(i, c)| {
                let h = &self.hierarchies[*i];
                format!("{} -> {} ({})", c.name(), h.own.display(), h.label)
            })
            .collect()
    }

    /// This process's own cgroup directory in each hierarchy used: job cgroups are created
    /// directly below these.
    pub fn hierarchy_dirs(&self) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.own.clone()).collect()
    }

    /// The cgroup directories of all our job cgroups (any owner) that currently exist.
    pub fn existing_job_dirs(&self) -> Vec<PathBuf> {
        let marker = format!("{}.", self.prefix);
        let mut out = Vec::new();
        for h in &self.hierarchies {
            if let Ok(rd) = std::fs::read_dir(&h.own) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&marker) && e.path().is_dir() {
                        out.push(e.path());
                    }
                }
            }
        }
        out
    }

    /// Kills the processes of, and removes, job cgroups carrying our prefix whose owning process
    /// is gone (a crashed daemon). Returns how many jobs were cleaned. Call once at start.
    pub fn cleanup_stale(self: &Arc<Self>) -> Result<usize> {
        self.cleanup(|owner_pid, owner_start| start_time(owner_pid).as_deref() != Some(owner_start))
    }

    /// Kills and removes every job cgroup carrying our prefix, live or not: for shutdown, and
    /// for tests.
    pub fn cleanup_all(self: &Arc<Self>) -> Result<usize> {
        self.cleanup(|_, _| true)
    }

    /// Kills and removes the job cgroups this process created that still exist: the last step
    /// of a shutdown, for a job whose supervisor could not finish its own cleanup. Cgroups of
    /// other live owners sharing the parent (another daemon) are left alone.
    pub fn cleanup_own(self: &Arc<Self>) -> Result<usize> {
        let own = self.owner.clone();
        self.cleanup(move |pid, start| format!("{pid}.{start}") == own)
    }

    fn cleanup(self: &Arc<Self>, stale: impl Fn(&str, &str) -> bool) -> Result<usize> {
        let marker = format!("{}.", self.prefix);
        let mut names = BTreeSet::new();
        for h in &self.hierarchies {
            if let Ok(rd) = std::fs::read_dir(&h.own) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let Some(rest) = name.strip_prefix(&marker) else {
                        continue;
                    };
                    let parts: Vec<&str> = rest.split('.').collect();
                    if parts.len() == 3 && stale(parts[0], parts[1]) {
                        names.insert(name);
                    }
                }
            }
        }
        let mut first_err = None;
        for name in &names {
            let dirs = self
                .hierarchies
                .iter()
                .map(|h| Some(h.own.join(name)).filter(|d| d.is_dir()))
                .collect();
            let cg = JobCgroup {
                mgr: self.clone(),
                dirs,
                removed: Mutex::new(false),
            };
            if let Err(e) = cg.destroy() {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(names.len()),
        }
    }
}

/// The cgroup directories of one job, removed (after killing what is inside) on
/// [`JobCgroup::destroy`] or drop.
#[derive(Debug)]
pub(crate) struct JobCgroup {
    mgr: Arc<CgroupManager>,
    /// Aligned with `mgr.hierarchies`.
    dirs: Vec<Option<PathBuf>>,
    removed: Mutex<bool>,
}

const KILL_TIMEOUT: Duration = Duration::from_secs(10);

impl JobCgroup {
    /// Checks that every requested limit can be enforced, creates the directories and writes
    /// the limits. Nothing is left behind on error.
    pub(crate) fn create(mgr: &Arc<CgroupManager>, limits: &Limits) -> Result<JobCgroup> {
        limits.validate()?;
        for kind in [
            LimitKind::Cpu,
            LimitKind::Memory,
            LimitKind::Pids,
            LimitKind::Io,
        ] {
            if kind.requested(limits)
                && !mgr
                    .controllers
                    .iter()
                    .any(|(_, c)| c.enforces().contains(&kind))
            {
                return Err(Error::Unenforceable {
                    limit: kind.name(),
                    reason: format!(
                        "no cgroup v2 or v1 hierarchy with the {} controller is available to this \
                         process",
                        if kind == LimitKind::Io {
                            "io/blkio"
                        } else {
                            kind.name()
                        }
                    ),
                });
            }
        }
        let seq = mgr.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}.{}.{}", mgr.prefix, mgr.owner, seq);
        let mut cg = JobCgroup {
            mgr: mgr.clone(),
            dirs: vec![None; mgr.hierarchies.len()],
            removed: Mutex::new(false),
        };
        for (i, h) in mgr.hierarchies.iter().enumerate() {
            let dir = h.own.join(&name);
            std::fs::create_dir(&dir).map_err(|source| Error::Cgroup {
                op: "mkdir",
                path: dir.clone(),
                source,
            })?;
            cg.dirs[i] = Some(dir);
        }
        for (i, c) in &mgr.controllers {
            if let Some(dir) = &cg.dirs[*i] {
                c.apply(dir, limits)?;
            }
        }
        Ok(cg)
    }

    /// The v2 directory, for `CLONE_INTO_CGROUP`.
    pub(crate) fn v2_dir(&self) -> Option<&Path> {
        self.mgr.v2.and_then(|i| self.dirs[i].as_deref())
    }

    /// The files the child writes "0" (itself) into to join the job's cgroups: the v2
    /// `cgroup.procs` when it was not born there, and each v1 hierarchy's `tasks`.
    ///
    /// On v1, `tasks` rather than `cgroup.procs`: the child has a single thread at that point,
    /// so moving that thread moves the process, and a thread moving itself skips the global
    /// threadgroup lock that a `cgroup.procs` write takes. That lock waits for an RCU grace
    /// period whenever migrations are infrequent, which put 10 ms and more on a job's start now
    /// and then (bench/README.md).
    pub(crate) fn procs_files(&self, include_v2: bool) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .enumerate()
            .filter(|(i, _)| include_v2 || Some(*i) != self.mgr.v2)
            .filter_map(|(i, d)| {
                let file = if Some(i) == self.mgr.v2 {
                    "cgroup.procs"
                } else {
                    "tasks"
                };
                d.as_ref().map(|d| d.join(file))
            })
            .collect()
    }

    /// The directory that lists every process of the job: v2 if present, else the freezer,
    /// else any.
    fn tracking_dir(&self) -> Option<&Path> {
        let pick = |i: Option<usize>| i.and_then(|i| self.dirs[i].as_deref());
        pick(self.mgr.v2)
            .or_else(|| pick(self.mgr.freezer))
            .or_else(|| self.dirs.iter().flatten().next().map(PathBuf::as_path))
    }

    /// Pids of all processes in the job (including sub-cgroups the job made).
    pub(crate) fn pids(&self) -> Vec<i32> {
        fn walk(dir: &Path, out: &mut Vec<i32>) {
            if let Some(t) = fs::read_opt(dir, "cgroup.procs") {
                out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path(), out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        if let Some(d) = self.tracking_dir() {
            walk(d, &mut out);
        }
        out
    }

    fn is_removed(&self) -> bool {
        *self.removed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Freezes the job if this host can, so that signals do not race forks. Returns a thaw
    /// action.
    fn freeze(&self) -> Option<Box<dyn Fn() + '_>> {
        if let Some(d) = self.v2_dir() {
            if fs::write(d, "cgroup.freeze", "1").is_ok() {
                let deadline = Instant::now() + Duration::from_secs(1);
                while Instant::now() < deadline {
                    let ev = fs::read_opt(d, "cgroup.events").unwrap_or_default();
                    if fs::keyed(&ev, "frozen") == Some(1) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                return Some(Box::new(move || {
                    let _ = fs::write(d, "cgroup.freeze", "0");
                }));
            }
        }
        if let Some(d) = self.mgr.freezer.and_then(|i| self.dirs[i].as_deref()) {
            if v1::freezer::freeze(d, Duration::from_secs(1)).is_ok() {
                return Some(Box::new(move || {
                    let _ = v1::freezer::thaw(d);
                }));
            }
        }
        None
    }

    /// Sends `sig` to every process of the job, frozen while it is sent when possible.
    pub(crate) fn signal_all(&self, sig: i32) {
        if self.is_removed() {
            return;
        }
        let thaw = self.freeze();
        for pid in self.pids() {
            let _ = sys::kill(pid, sig);
        }
        if let Some(thaw) = thaw {
            thaw();
        }
    }

    /// Kills every process of the job: v2 `cgroup.kill`, else freeze + SIGKILL + thaw (v1
    /// freezer), else repeated SIGKILL sweeps; then waits until the job is empty.
    pub(crate) fn kill_all(&self) -> Result<()> {
        if self.is_removed() || self.pids().is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let killed_by_kernel = self
                .v2_dir()
                .is_some_and(|d| fs::write(d, "cgroup.kill", "1").is_ok());
            if !killed_by_kernel {
                self.signal_all(libc::SIGKILL);
            }
            // Dying processes leave the cgroup shortly after the signal.
            let settle = Instant::now() + Duration::from_millis(200);
            while Instant::now() < settle {
                if self.pids().is_empty() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if Instant::now() >= deadline {
                let path = self
                    .tracking_dir()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                return Err(Error::Cgroup {
                    op: "kill (processes remain)",
                    path,
                    source: std::io::Error::from_raw_os_error(libc::EBUSY),
                });
            }
        }
    }

    /// Reads the job's resource usage from every controller.
    pub(crate) fn stats(&self) -> ResourceUsage {
        let mut u = ResourceUsage::default();
        for (i, c) in &self.mgr.controllers {
            if let Some(d) = &self.dirs[*i] {
                c.stats(d, &mut u);
            }
        }
        u
    }

    /// Kills what is left and removes the directories. Idempotent.
    pub(crate) fn destroy(&self) -> Result<()> {
        if self.is_removed() {
            return Ok(());
        }
        self.kill_all()?;
        let mut first_err = None;
        for d in self.dirs.iter().flatten() {
            if let Err(e) = remove_tree(d) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        *self.removed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }
}

/// Removes a cgroup directory and any sub-cgroups, deepest first. A cgroup that just emptied
/// may still be busy for a moment, hence the retries.
fn remove_tree(dir: &Path) -> Result<()> {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(Error::Cgroup {
                    op: "rmdir",
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        // Last line of defence (a job dropped mid-start, a runtime shut down): nothing of ours
        // may outlive us in the kernel.
        let _ = self.destroy();
    }
}

#[cfg(test)]
mod tests {
    //! Controllers against a fixture directory (files pre-created as the kernel would).
    use super::*;
    use crate::spec::{CpuLimit, DeviceNumber, IoLimit};

    fn fixture(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (f, c) in files {
            std::fs::write(d.path().join(f), c).unwrap();
        }
        d
    }

    fn read(d: &tempfile::TempDir, f: &str) -> String {
        std::fs::read_to_string(d.path().join(f)).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            cpu: Some(CpuLimit::cores(0.5)),
            memory_max: Some(1 << 20),
            pids_max: Some(0),
            io: vec![IoLimit {
                device: DeviceNumber { major: 8, minor: 0 },
                read_bps: Some(100),
                write_bps: None,
                read_iops: None,
                write_iops: Some(7),
            }],
        }
    }

    #[test]
    fn v1_controllers_write_their_files_and_parse_their_stats() {
        let d = fixture(&[
            ("cpu.cfs_period_us", ""),
            ("cpu.cfs_quota_us", ""),
            (
                "cpu.stat",
                "nr_periods 9\nnr_throttled 4\nthrottled_time 1\n",
            ),
            ("cpuacct.usage", "1500000000\n"),
            ("memory.limit_in_bytes", ""),
            ("memory.memsw.limit_in_bytes", ""),
            ("memory.max_usage_in_bytes", "4096\n"),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
            ("pids.max", ""),
            ("pids.events", "max 5\n"),
            ("blkio.throttle.read_bps_device", ""),
            ("blkio.throttle.write_iops_device", ""),
            (
                "blkio.throttle.io_service_bytes_recursive",
                "8:0 Read 10\n8:0 Write 20\n8:0 Sync 30\n8:16 Read 1\nTotal 31\n",
            ),
        ]);
        let l = limits();
        let cs: Vec<Box<dyn Controller>> = vec![
            Box::new(v1::cpu::Cpu),
            Box::new(v1::cpuacct::CpuAcct),
            Box::new(v1::memory::Memory),
            Box::new(v1::pids::Pids),
            Box::new(v1::blkio::Blkio),
        ];
        let mut u = ResourceUsage::default();
        for c in &cs {
            c.apply(d.path(), &l).unwrap();
            c.stats(d.path(), &mut u);
        }
        assert_eq!(read(&d, "cpu.cfs_period_us"), "100000");
        assert_eq!(read(&d, "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(&d, "memory.memsw.limit_in_bytes"), "1048576");
        assert_eq!(read(&d, "pids.max"), "0");
        assert_eq!(read(&d, "blkio.throttle.read_bps_device"), "8:0 100");
        assert_eq!(read(&d, "blkio.throttle.write_iops_device"), "8:0 7");
        assert_eq!(
            u,
            ResourceUsage {
                cpu_time: Some(Duration::from_millis(1500)),
                cpu_throttled_periods: Some(4),
                memory_peak: Some(4096),
                oom_kills: Some(2),
                pids_limit_hits: Some(5),
                io_read_bytes: Some(11),
                io_write_bytes: Some(20),
            }
        );
    }

    #[test]
    fn v2_controllers_write_their_files_and_parse_their_stats() {
        let d = fixture(&[
            ("cpu.max", ""),
            ("cpu.stat", "usage_usec 2500\nnr_throttled 3\n"),
            ("memory.max", ""),
            ("memory.swap.max", ""),
            ("memory.peak", "8192\n"),
            ("memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n"),
            ("pids.max", ""),
            ("pids.events", "max 2\n"),
            ("io.max", ""),
            (
                "io.stat",
                "8:0 rbytes=5 wbytes=6 rios=1 wios=1\n8:16 rbytes=1 wbytes=0\n",
            ),
        ]);
        let l = limits();
        let cs: Vec<Box<dyn Controller>> = vec![
            Box::new(v2::cpu::Cpu { enabled: true }),
            Box::new(v2::memory::Memory),
            Box::new(v2::pids::Pids),
            Box::new(v2::io::Io),
        ];
        let mut u = ResourceUsage::default();
        for c in &cs {
            c.apply(d.path(), &l).unwrap();
            c.stats(d.path(), &mut u);
        }
        assert_eq!(read(&d, "cpu.max"), "50000 100000");
        assert_eq!(read(&d, "memory.max"), "1048576");
        assert_eq!(read(&d, "memory.swap.max"), "0");
        assert_eq!(read(&d, "io.max"), "8:0 rbps=100 wiops=7");
        assert_eq!(u.cpu_time, Some(Duration::from_micros(2500)));
        assert_eq!(u.memory_peak, Some(8192));
        assert_eq!(u.oom_kills, Some(1));
        assert_eq!(u.pids_limit_hits, Some(2));
        assert_eq!((u.io_read_bytes, u.io_write_bytes), (Some(6), Some(6)));
    }

    #[test]
    fn a_missing_interface_file_is_an_unenforceable_limit() {
        let d = fixture(&[("cpu.cfs_period_us", "")]);
        let e = v1::cpu::Cpu.apply(d.path(), &limits()).unwrap_err();
        assert!(
            matches!(e, Error::Unenforceable { limit: "cpu", .. }),
            "{e}"
        );
    }

    #[test]
    fn without_swap_accounting_memory_is_refused_only_when_the_host_swaps() {
        let d = fixture(&[("memory.limit_in_bytes", "")]);
        let r = v1::memory::Memory.apply(d.path(), &limits());
        if fs::host_has_swap() {
            assert!(matches!(r, Err(Error::Unenforceable { .. })));
        } else {
            r.unwrap();
            assert_eq!(read(&d, "memory.limit_in_bytes"), "1048576");
        }
    }
}
