//! From a connected socket (or a pid) to a [`Principal`], checked against pid reuse.
//!
//! The order matters: credentials come from the kernel first (they were fixed at connect time),
//! then `/proc` is read, then the process is checked to still be the one that was read. A pid
//! alone is a weak name — a process can exit and its number be given to another one while warden
//! reads `/proc` — so the check uses a pidfd when the kernel gives one (Linux 6.5+), and the start
//! time of the process in every case.

use super::exe::{ContentKey, ExeHashCache, Hashed};
use super::procfs::{self, Stat, Status};
use super::{sys, IdentityError, ParentProcess, Principal};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{Gid, Group, Pid, Uid, User};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The longest parent chain kept; deeper ancestors are not read.
pub const MAX_PARENTS: usize = 32;
/// Executables larger than this are not hashed (their `exe_sha256` is `None`): hashing them would
/// stall the connection, and no legitimate client binary is that large.
pub const MAX_HASHED_EXE_BYTES: u64 = 1 << 30;
/// Distinct executables whose hash is remembered.
const EXE_CACHE_CAPACITY: usize = 4096;

const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// Identifies local peers. Holds the executable-hash cache, so keep one for the daemon's life and
/// share it (`Send + Sync`) between connections.
pub struct Attestor {
    cache: ExeHashCache,
}

// The server shares one Attestor between connection tasks.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Attestor>();
};

impl Default for Attestor {
    fn default() -> Self {
        Attestor::new()
    }
}

impl Attestor {
    pub fn new() -> Self {
        Attestor {
            cache: ExeHashCache::new(EXE_CACHE_CAPACITY, MAX_HASHED_EXE_BYTES),
        }
    }

    /// How many executables were read and hashed so far (cache misses). For tests and metrics.
    pub fn exe_hashes_computed(&self) -> u64 {
        self.cache.computed()
    }

    /// Identifies the peer of a connected Unix socket: uid, gid and pid from `SO_PEERCRED`, groups
    /// from `SO_PEERGROUPS`, the process from `/proc`, pinned by `SO_PEERPIDFD` when the kernel has
    /// it. Blocking (reads `/proc`, may hash a file): call it from `spawn_blocking`.
    ///
    /// A peer the kernel gives no pid for (it lives in a pid namespace warden cannot see) gets a
    /// principal without process facts, so rules on its executable or unit cannot match it.
    pub fn attest_unix(&self, sock: BorrowedFd<'_>) -> Result<Principal, IdentityError> {
        let cred = getsockopt(&sock, sockopt::PeerCredentials).map_err(IdentityError::Socket)?;
        let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
        let groups = match sys::peer_groups(sock) {
            Ok(groups) => Some(groups),
            Err(e) => {
                tracing::debug!(error = %e, "SO_PEERGROUPS failed; reading groups from /proc");
                None
            }
        };
        if pid <= 0 {
            let mut p = Principal::synthetic(uid, gid);
            p.groups = groups.unwrap_or_default();
            resolve_names(&mut p);
            return Ok(p);
        }
        let pidfd = match getsockopt(&sock, sockopt::PeerPidfd) {
            Ok(fd) => Some(fd),
            // Kernels before 6.5: the start time check alone guards against pid reuse.
            Err(Errno::ENOPROTOOPT) => None,
            Err(Errno::ESRCH | Errno::EINVAL) => return Err(IdentityError::PeerGone { pid }),
            Err(e) => return Err(IdentityError::Socket(e)),
        };
        self.attest_process(pid, uid, gid, groups, pidfd.as_ref().map(AsFd::as_fd))
    }

    /// Identifies the process `pid`, which the caller already knows to be the peer, with the
    /// given credentials. The pid is pinned with `pidfd_open` as the first step, so a process
    /// that exits during attestation still gives [`IdentityError::PeerGone`].
    pub fn attest_pid(&self, pid: i32, uid: u32, gid: u32) -> Result<Principal, IdentityError> {
        if pid <= 0 {
            return Err(IdentityError::InvalidPid { pid });
        }
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                return Err(IdentityError::PeerGone { pid })
            }
            Err(source) => {
                return Err(IdentityError::Proc {
                    path: format!("/proc/{pid}").into(),
                    source,
                })
            }
        };
        self.attest_process(pid, uid, gid, None, pidfd.as_ref().map(AsFd::as_fd))
    }

    pub(super) fn attest_process(
        &self,
        pid: i32,
        uid: u32,
        gid: u32,
        groups: Option<Vec<u32>>,
        pidfd: Option<BorrowedFd<'_>>,
    ) -> Result<Principal, IdentityError> {
        let peer = Peer { pid, pidfd };
        let before = peer.stat()?;
        if before.exited() {
            return Err(IdentityError::PeerGone { pid });
        }
        let status = peer.status()?;
        if pidfd.is_none() && !status.uids.contains(&uid) {
            // Without a pidfd the pid may have been reused before the first read; a process of
            // another user is certainly not the peer.
            return Err(IdentityError::PeerGone { pid });
        }
        let exe = self.exe(&peer)?;
        let cgroup = procfs::parse_cgroup(&peer.read("cgroup")?);
        let parents = parent_chain(before.ppid, before.starttime);

        // Is it still the process that connected? Everything above was read from /proc/PID; it
        // describes the peer only if that pid named the peer the whole time.
        let after = peer.stat()?;
        if after.exited() || after.starttime != before.starttime {
            return Err(IdentityError::PeerGone { pid });
        }
        if let Some(exe) = &exe {
            // Catches an exec between opening the executable and now.
            let now =
                fs::metadata(peer.path("exe")).map_err(|_| IdentityError::PeerGone { pid })?;
            if !ContentKey::of(&now).same_inode(&exe.key) {
                return Err(IdentityError::PeerGone { pid });
            }
        }
        if pidfd.is_some() && !peer.alive() {
            return Err(IdentityError::PeerGone { pid });
        }

        let unit = cgroup.as_deref().and_then(procfs::unit_from_cgroup);
        let (exe_path, exe_deleted, exe_sha256) = match exe {
            Some(e) => (Some(e.path), e.deleted, e.sha256),
            None => (None, false, None),
        };
        let mut p = Principal {
            pid: Some(pid),
            groups: groups.unwrap_or(status.groups),
            exe: exe_path,
            exe_deleted,
            exe_sha256,
            parents,
            cgroup,
            unit,
            ..Principal::synthetic(uid, gid)
        };
        resolve_names(&mut p);
        Ok(p)
    }

    fn exe(&self, peer: &Peer<'_>) -> Result<Option<ExeFacts>, IdentityError> {
        let link = peer.path("exe");
        // Opening the magic link opens the file the process runs, even if a new file has since
        // been installed at its path: the hash describes what actually runs.
        let file = match File::open(&link) {
            Ok(f) => f,
            // No executable (an exiting process); the checks after the reads decide the rest.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(peer.error("exe", e)),
        };
        let meta = file.metadata().map_err(|e| peer.error("exe", e))?;
        let target = fs::read_link(&link).map_err(|e| peer.error("exe", e))?;
        let deleted = meta.nlink() == 0;
        let path = if deleted {
            strip_deleted(target)
        } else {
            target
        };
        let sha256 = match self.cache.hash(&file, &meta) {
            Ok(Hashed::Hash(h)) => Some(h),
            Ok(Hashed::TooLarge(size)) => {
                tracing::warn!(pid = peer.pid, exe = %path.display(), size,
                    "executable larger than 1 GiB not hashed; rules on exe_sha256 will not match it");
                None
            }
            Ok(Hashed::Changed) => {
                tracing::warn!(pid = peer.pid, exe = %path.display(),
                    "executable changed while it was hashed; rules on exe_sha256 will not match it");
                None
            }
            Err(e) => {
                tracing::warn!(pid = peer.pid, exe = %path.display(), error = %e,
                    "cannot read executable; rules on exe_sha256 will not match it");
                None
            }
        };
        Ok(Some(ExeFacts {
            path,
            deleted,
            key: ContentKey::of(&meta),
            sha256,
        }))
    }
}

struct ExeFacts {
    path: PathBuf,
    deleted: bool,
    key: ContentKey,
    sha256: Option<String>,
}

/// The process being attested: its pid and, when the kernel gave one, its pidfd.
struct Peer<'a> {
    pid: i32,
    pidfd: Option<BorrowedFd<'a>>,
}

impl Peer<'_> {
    fn path(&self, name: &str) -> PathBuf {
        format!("/proc/{}/{name}", self.pid).into()
    }

    fn read(&self, name: &str) -> Result<String, IdentityError> {
        read_proc(&self.path(name)).map_err(|e| self.error(name, e))
    }

    fn stat(&self) -> Result<Stat, IdentityError> {
        procfs::parse_stat(&self.read("stat")?).ok_or_else(|| self.unparsable("stat"))
    }

    fn status(&self) -> Result<Status, IdentityError> {
        procfs::parse_status(&self.read("status")?).ok_or_else(|| self.unparsable("status"))
    }

    fn unparsable(&self, name: &str) -> IdentityError {
        IdentityError::Proc {
            path: self.path(name),
            source: io::Error::new(io::ErrorKind::InvalidData, "unexpected format"),
        }
    }

    /// Whether the process exists. With a pidfd this is exact; without, it means "some process
    /// has this pid", which is only used to word an error.
    fn alive(&self) -> bool {
        let result = match self.pidfd {
            Some(fd) => sys::pidfd_check_alive(fd)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0))),
            None => kill(Pid::from_raw(self.pid), None),
        };
        // EPERM: it exists, warden just may not signal it.
        matches!(result, Ok(()) | Err(Errno::EPERM))
    }

    /// A failed read of `/proc/PID/<name>`: hidden from us (hidepid) while the process lives,
    /// or the process is gone.
    fn error(&self, name: &str, e: io::Error) -> IdentityError {
        let path = self.path(name);
        let vanished = e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH);
        if e.kind() == io::ErrorKind::PermissionDenied || (vanished && self.alive()) {
            IdentityError::ProcNotPermitted {
                pid: self.pid,
                path,
            }
        } else if vanished {
            IdentityError::PeerGone { pid: self.pid }
        } else {
            IdentityError::Proc { path, source: e }
        }
    }
}

/// Ancestors of a process whose parent is `ppid` and which started at `child_start`, nearest
/// first. Informational and best effort: it stops at the first ancestor that cannot be read or
/// whose pid was reused (it started after its child, which a real parent cannot).
fn parent_chain(mut ppid: i32, mut child_start: u64) -> Vec<ParentProcess> {
    let read_stat = |pid: i32| {
        read_proc(Path::new(&format!("/proc/{pid}/stat")))
            .ok()
            .and_then(|t| procfs::parse_stat(&t))
    };
    let mut chain = Vec::new();
    while ppid > 0 && chain.len() < MAX_PARENTS {
        let Some(stat) = read_stat(ppid) else { break };
        if stat.starttime > child_start {
            break;
        }
        let exe = exe_link(ppid);
        // The exe read above belongs to this ancestor only if it was not replaced meanwhile.
        if read_stat(ppid).map(|s| s.starttime) != Some(stat.starttime) {
            break;
        }
        let (next, start) = (stat.ppid, stat.starttime);
        chain.push(ParentProcess {
            pid: ppid,
            exe,
            comm: stat.comm,
        });
        if ppid == 1 {
            break;
        }
        ppid = next;
        child_start = start;
    }
    chain
}

/// A small `/proc` file in one read where it fits. The kernel renders such a file anew for every
/// read call, and `fs::read_to_string` starts with a 32-byte buffer on a file that reports size
/// 0: that was six renderings of `stat` and seven of `status`, on every connection.
fn read_proc(path: &Path) -> io::Result<String> {
    let mut buf = Vec::with_capacity(4096);
    File::open(path)?.read_to_end(&mut buf)?;
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The executable path of `pid`, " (deleted)" removed when the file really is deleted.
fn exe_link(pid: i32) -> Option<PathBuf> {
    let link = PathBuf::from(format!("/proc/{pid}/exe"));
    let target = fs::read_link(&link).ok()?;
    if target.as_os_str().as_bytes().ends_with(DELETED_SUFFIX)
        && fs::metadata(&link).is_ok_and(|m| m.nlink() == 0)
    {
        return Some(strip_deleted(target));
    }
    Some(target)
}

fn strip_deleted(target: PathBuf) -> PathBuf {
    let mut bytes = target.into_os_string().into_vec();
    if bytes.ends_with(DELETED_SUFFIX) {
        bytes.truncate(bytes.len() - DELETED_SUFFIX.len());
    }
    PathBuf::from(OsString::from_vec(bytes))
}

/// User and group names, from NSS. Names are for matching and the audit log; numbers stay the
/// identity.
fn resolve_names(p: &mut Principal) {
    p.user = User::from_uid(Uid::from_raw(p.uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let mut gids = vec![p.gid];
    for g in &p.groups {
        if !gids.contains(g) {
            gids.push(*g);
        }
    }
    p.group_names = gids
        .into_iter()
        .filter_map(|g| Group::from_gid(Gid::from_raw(g)).ok().flatten())
        .map(|g| g.name)
        .collect();
}

#[cfg(test)]
mod tests;
