//! Turning a [`JobSpec`] into a running process inside the job's cgroups.
//!
//! The parent prepares everything (C strings, PATH candidates, open cgroup membership files, pipes)
//! so that the child only makes system calls. The child reports a failure before exec over a
//! close-on-exec pipe: EOF on it means exec succeeded, 8 bytes mean (stage, errno). So the
//! start call itself returns ENOENT or EACCES, not a later "exit 127".

use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::cgroup::JobCgroup;
use crate::error::{Error, Result, SpawnStage};
use crate::spec::JobSpec;
use crate::sys::{self, CStringArray, ChildPlan, ChildStage};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub(crate) struct Spawned {
    /// Kills and reaps the child if the start is abandoned before a supervisor owns it.
    pub reaper: Reaper,
    pub pid: i32,
    /// Whether `CLONE_INTO_CGROUP` placed it (rather than writing `cgroup.procs`).
    pub born_in_cgroup: bool,
    pub pidfd: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Owns an unreaped child until [`Reaper::disarm`]: dropped armed (an error or a cancelled
/// start after the clone), it kills and reaps the child, so no zombie or orphan remains.
pub(crate) struct Reaper {
    pid: i32,
    armed: bool,
}

impl Reaper {
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.armed {
            let _ = sys::kill(self.pid, libc::SIGKILL);
            let _ = sys::wait_pid(self.pid, true);
        }
    }
}

fn cstr(s: &OsStr, what: &str) -> Result<CString> {
    sys::cstring(s).ok_or_else(|| Error::InvalidSpec(format!("{what} contains a NUL byte")))
}

/// The paths execve will try: the program itself if it has a `/`, else each PATH entry.
fn candidates(spec: &JobSpec) -> Result<Vec<CString>> {
    let prog = spec.program.as_bytes();
    if prog.is_empty() {
        return Err(Error::InvalidSpec("empty program".into()));
    }
    if prog.contains(&b'/') {
        return Ok(vec![cstr(&spec.program, "program")?]);
    }
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_bytes().to_vec())
        .unwrap_or_else(|| DEFAULT_PATH.as_bytes().to_vec());
    path.split(|b| *b == b':')
        .map(|dir| {
            let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
            let mut full = dir.to_vec();
            full.push(b'/');
            full.extend_from_slice(prog);
            cstr(&OsString::from_vec(full), "program path")
        })
        .collect()
}

fn stage(s: ChildStage) -> SpawnStage {
    match s {
        ChildStage::Cgroup => SpawnStage::Cgroup,
        ChildStage::Mount => SpawnStage::Mount,
        ChildStage::Loopback => SpawnStage::Loopback,
        ChildStage::Hostname => SpawnStage::Hostname,
        ChildStage::Credentials => SpawnStage::Credentials,
        ChildStage::Chdir => SpawnStage::Chdir,
        ChildStage::Stdio => SpawnStage::Stdio,
        ChildStage::Exec => SpawnStage::Exec,
    }
}

fn open_procs(cg: &JobCgroup, include_v2: bool) -> Result<Vec<File>> {
    cg.procs_files(include_v2)
        .into_iter()
        .map(|p| {
            OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|source| Error::Cgroup {
                    op: "open",
                    path: p,
                    source,
                })
        })
        .collect()
}

/// Starts the job's process in `cg`. Blocks until the child has exec'd or failed.
pub(crate) fn spawn(spec: &JobSpec, cg: &JobCgroup) -> Result<Spawned> {
    let mut argv = vec![cstr(&spec.program, "program")?];
    for a in &spec.args {
        argv.push(cstr(a, "argument")?);
    }
    let mut envp = Vec::with_capacity(spec.env.len());
    for (k, v) in &spec.env {
        if k.is_empty() || k.as_bytes().contains(&b'=') {
            return Err(Error::InvalidSpec(format!(
                "environment name {k:?} is empty or contains '='"
            )));
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(cstr(&OsString::from_vec(kv), "environment")?);
    }
    if spec.hostname.is_some() && !spec.namespaces.uts {
        return Err(Error::InvalidSpec(
            "a hostname needs a new UTS namespace (it would rename the host)".into(),
        ));
    }
    let ns = &spec.namespaces;
    let mut flags = 0u64;
    for (on, flag) in [
        (ns.pid, libc::CLONE_NEWPID),
        (ns.mount, libc::CLONE_NEWNS),
        (ns.net, libc::CLONE_NEWNET),
        (ns.uts, libc::CLONE_NEWUTS),
        (ns.ipc, libc::CLONE_NEWIPC),
    ] {
        if on {
            flags |= flag as u64;
        }
    }

    let stdin = sys::dup_above_stdio(OwnedFd::from(
        File::open("/dev/null").map_err(Error::io("open /dev/null"))?,
    ))
    .map_err(Error::io("dup stdin"))?;
    let (out_r, out_w) = sys::pipe().map_err(Error::io("stdout pipe"))?;
    let (err_r, err_w) = sys::pipe().map_err(Error::io("stderr pipe"))?;
    sys::grow_pipe(&out_r, 1 << 20);
    sys::grow_pipe(&err_r, 1 << 20);
    let out_w = sys::dup_above_stdio(out_w).map_err(Error::io("dup stdout"))?;
    let err_w = sys::dup_above_stdio(err_w).map_err(Error::io("dup stderr"))?;
    let v2_dir = match cg.v2_dir() {
        Some(d) => Some(File::open(d).map_err(|source| Error::Cgroup {
            op: "open",
            path: d.to_path_buf(),
            source,
        })?),
        None => None,
    };

    let mut plan = ChildPlan {
        namespace_flags: flags,
        into_cgroup: v2_dir.as_ref().map(|f| f.as_raw_fd()),
        procs_files: Vec::new(),
        stdin: stdin.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        mount_proc: ns.mount,
        loopback_up: ns.net,
        hostname: match &spec.hostname {
            Some(h) => Some(cstr(h, "hostname")?),
            None => None,
        },
        cwd: match &spec.cwd {
            Some(c) => Some(cstr(c.as_os_str(), "working directory")?),
            None => None,
        },
        gid: spec.gid,
        uid: spec.uid,
        candidates: candidates(spec)?,
        argv: CStringArray::new(argv),
        envp: CStringArray::new(envp),
    };

    let mut procs = open_procs(cg, v2_dir.is_none())?;
    plan.procs_files = procs.iter().map(|f| f.as_raw_fd()).collect();
    let (ep_r, ep_w) = sys::pipe().map_err(Error::io("error pipe"))?;
    // Above 2, so that installing stdio in the child cannot overwrite it.
    let ep_w = sys::dup_above_stdio(ep_w).map_err(Error::io("dup error pipe"))?;
    let cloned = match sys::clone_child(&plan, ep_w.as_raw_fd()) {
        Ok(c) => c,
        Err(_) if plan.into_cgroup.is_some() => {
            // Kernels before 5.7, or a v2 cgroup that refuses CLONE_INTO_CGROUP: join by
            // writing cgroup.procs like on v1.
            procs = open_procs(cg, true)?;
            plan.procs_files = procs.iter().map(|f| f.as_raw_fd()).collect();
            plan.into_cgroup = None;
            sys::clone_child(&plan, ep_w.as_raw_fd()).map_err(|source| Error::Spawn {
                stage: SpawnStage::Clone,
                source,
            })?
        }
        Err(source) => {
            return Err(Error::Spawn {
                stage: SpawnStage::Clone,
                source,
            })
        }
    };
    let born_in_cgroup = plan.into_cgroup.is_some();
    let reaper = Reaper {
        pid: cloned.pid,
        armed: true,
    };
    // Our copies of the child's ends must go, or we would never see EOF.
    drop(ep_w);
    drop((stdin, out_w, err_w, procs, v2_dir));

    let mut report = [0u8; 8];
    let mut got = 0;
    let mut ep = File::from(ep_r);
    while got < report.len() {
        match ep.read(&mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Io {
                    what: "reading the child's error pipe",
                    source: e,
                });
            }
        }
    }
    if got == 0 {
        return Ok(Spawned {
            reaper,
            pid: cloned.pid,
            born_in_cgroup,
            pidfd: cloned.pidfd,
            stdout: out_r,
            stderr: err_r,
        });
    }
    // The child has exited 127; the reaper collects it.
    drop(reaper);
    let st = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
    let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    Err(Error::Spawn {
        stage: ChildStage::from_u32(st).map_or(SpawnStage::Exec, stage),
        source: io::Error::from_raw_os_error(errno),
    })
}
