//! Building blocks of privilege separation: process identities immune to pid reuse, handing a
//! channel end and its peer's identity to a child over its control socket, and the gateway's
//! irreversible drop of privileges.
//!
//! - [`ProcessIdentity`]: a pid *and* the process's start time (`/proc/PID/stat`, field 22).
//!   A later process that reuses the pid has another start time, so "is this still the gateway
//!   the monitor started?" has an answer that a recycled pid cannot fake.
//! - [`control_pair`], [`send_handoff`], [`recv_handoff`]: the monitor's control socketpair to
//!   a child is `SOCK_SEQPACKET` (message boundaries kept, so a file descriptor is attached to
//!   exactly one message); a [`Handoff`] carries the peer's identity as JSON and the fresh
//!   core↔gateway channel end as `SCM_RIGHTS`.
//! - [`Unprivileged`]: the user the gateway becomes, resolved while `/etc/passwd` is still
//!   readable, then applied with `setgroups`, `setgid`, `setuid` (checked: `setuid(0)` must
//!   fail afterwards), `PR_SET_NO_NEW_PRIVS` and not dumpable.
//! - [`control`]: the control socket driven by Tokio: heartbeats and pairings.
//! - [`supervise`]: the supervisor's rules (missed heartbeats, restart backoff, giving up).
//!
//! What it deliberately does not do: start, watch or restart processes (the supervisor's job),
//! or read anything the channel carries (see `gateway::channel`).

pub mod control;
pub mod supervise;

use anyhow::{bail, Context};
use nix::sys::socket::{socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// A process, named so that a later process with the same pid is a different one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessIdentity {
    pub pid: i32,
    /// Clock ticks after boot at which the process started (`/proc/PID/stat`, field 22).
    pub start_time: u64,
}

impl ProcessIdentity {
    /// The identity of the running process `pid`; an error if there is none (or it has exited).
    pub fn of(pid: i32) -> anyhow::Result<ProcessIdentity> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("no process {pid}"))?;
        let stat = crate::identity::procfs::parse_stat(&text)
            .with_context(|| format!("/proc/{pid}/stat is unreadable"))?;
        if stat.exited() {
            bail!("process {pid} has exited");
        }
        Ok(ProcessIdentity {
            pid,
            start_time: stat.starttime,
        })
    }

    /// This process.
    pub fn current() -> anyhow::Result<ProcessIdentity> {
        ProcessIdentity::of(std::process::id() as i32)
    }

    /// Whether this very process is still running: the pid exists, has not exited, and started
    /// when this identity says (so it is not a later process that reuses the pid).
    pub fn is_running(&self) -> bool {
        ProcessIdentity::of(self.pid).is_ok_and(|now| now == *self)
    }
}

/// The roles of the processes that talk over a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Core,
    Gateway,
}

/// What the monitor tells a child when it pairs it with a (new) peer: the attached file
/// descriptor is the child's end of a fresh core↔gateway channel, whose other end `peer` holds.
/// The child replaces any channel it had (and so refuses the old one from then on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    pub peer_role: Role,
    pub peer: ProcessIdentity,
    /// Counts pairings since the monitor started; a child ignores a handoff older than the one
    /// it holds.
    pub generation: u64,
}

/// A control socketpair: `SOCK_SEQPACKET`, close-on-exec (the end meant for a child is made
/// inheritable by whoever spawns it).
pub fn control_pair() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("cannot create a control socketpair")
}

/// Sends `handoff` with `channel` attached over the control socket `control` (a
/// [`control::Control::Pair`] message; blocking unless the socket is non-blocking).
pub fn send_handoff(
    control: BorrowedFd<'_>,
    handoff: &Handoff,
    channel: BorrowedFd<'_>,
) -> anyhow::Result<()> {
    let msg = control::Control::Pair {
        handoff: handoff.clone(),
    };
    control::send_raw(control, &msg, Some(channel))
        .context("cannot send a channel over the control socket")
}

/// Receives one pairing and its channel end from the control socket (blocking). A message
/// that is not a pairing, comes without exactly one descriptor, or does not parse is refused
/// (and any descriptor that came with it closed).
pub fn recv_handoff(control: BorrowedFd<'_>) -> anyhow::Result<(Handoff, OwnedFd)> {
    let (bytes, fds) = control::recv_raw(control, MsgFlags::empty())
        .context("cannot read the control socket")?
        .context("the control socket was closed")?;
    let msg: control::Control =
        serde_json::from_slice(&bytes).context("unreadable handoff on the control socket")?;
    let control::Control::Pair { handoff } = msg else {
        bail!("expected a pairing on the control socket, got {msg:?}");
    };
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(fd), None) => Ok((handoff, fd)),
        (None, _) => bail!("a handoff without its channel"),
        (Some(_), Some(_)) => bail!("a handoff with more than one descriptor"),
    }
}

/// The descriptor number a child finds its control socket at.
pub const CHILD_CONTROL_FD: i32 = 3;

/// Starts `cmd` with `control` (its end of a [`control_pair`]) as descriptor
/// [`CHILD_CONTROL_FD`] and nothing else inherited beyond stdin, stdout and stderr (every other
/// descriptor warden opens is close-on-exec). The child is killed if the starting *thread*
/// dies first (`PR_SET_PDEATHSIG`), so a crashed monitor leaves no orphan serving alone — which
/// also means: call this from a thread that lives as long as the monitor (its main thread, not
/// a blocking-pool thread that may exit when idle).
pub fn spawn_child(
    cmd: std::process::Command,
    control: OwnedFd,
) -> anyhow::Result<std::process::Child> {
    spawn_child_with(cmd, control, &[])
}

/// [`spawn_child`], and `inherit` as descriptors 4, 5, … in that order (the listening sockets
/// the monitor bound once and hands to every child it starts). The child must mark them
/// close-on-exec itself (see [`take_inherited`]) so that they go no further.
pub fn spawn_child_with(
    mut cmd: std::process::Command,
    control: OwnedFd,
    inherit: &[BorrowedFd<'_>],
) -> anyhow::Result<std::process::Child> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    if inherit.len() > 16 {
        bail!("too many descriptors to hand to a child");
    }
    // Copies above every target number first, so that placing one cannot overwrite another
    // that still has to be placed; the copies are close-on-exec and closed here after the spawn.
    let mut sources = Vec::with_capacity(1 + inherit.len());
    for fd in std::iter::once(control.as_fd()).chain(inherit.iter().copied()) {
        let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(64))
            .context("cannot copy a descriptor for a child")?;
        // SAFETY: `raw` was just returned by F_DUPFD_CLOEXEC and is owned by nobody else.
        sources.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
    }
    let raws: Vec<i32> = sources.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: only async-signal-safe system calls between fork and exec; `raws` is moved in
    // and only read.
    unsafe {
        cmd.pre_exec(move || {
            for (i, raw) in raws.iter().enumerate() {
                // dup2 clears close-on-exec on the copy it makes.
                if libc::dup2(*raw, CHILD_CONTROL_FD + i as i32) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    drop(sources);
    drop(control);
    Ok(child)
}

/// A child's side of [`spawn_child_with`]: takes descriptor `fd` (3 for the control socket,
/// 4… for what was inherited), checks that it is a socket, and marks it close-on-exec so that
/// nothing the child starts (jobs, commands) inherits it.
pub fn take_inherited(fd: i32, what: &str) -> anyhow::Result<OwnedFd> {
    use nix::sys::stat::{fstat, SFlag};
    // SAFETY: checked just below to be an open socket; nothing else in this process owns the
    // descriptors a parent placed at these numbers.
    let st = fstat(unsafe { BorrowedFd::borrow_raw(fd) }).with_context(|| {
        format!("descriptor {fd} ({what}) is not open: `warden internal` is started by the monitor, not by hand")
    })?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        bail!("descriptor {fd} ({what}) is not a socket");
    }
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .with_context(|| format!("cannot mark descriptor {fd} close-on-exec"))?;
    Ok(owned)
}

/// The unprivileged user a process becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unprivileged {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

impl Unprivileged {
    /// Looks `user` up (before anything is dropped, while the user database is readable). Root
    /// is refused: dropping to uid 0 would drop nothing.
    pub fn resolve(user: &str) -> anyhow::Result<Unprivileged> {
        let u = nix::unistd::User::from_name(user)
            .with_context(|| format!("cannot look up the user {user:?}"))?
            .with_context(|| {
                format!("no user {user:?} on this host (the gateway runs as an existing unprivileged user)")
            })?;
        if u.uid.is_root() || u.gid.as_raw() == 0 {
            bail!("the gateway user {user:?} has uid or gid 0; it must be an unprivileged user");
        }
        Ok(Unprivileged {
            name: user.to_string(),
            uid: u.uid,
            gid: u.gid,
        })
    }

    /// Becomes this user for good: supplementary groups replaced by its own group, gid, uid
    /// (real, effective and saved), then checks that `setuid(0)` fails; no new privileges
    /// through exec; not dumpable (no core files, no ptrace by the same uid). Only system calls:
    /// safe between `fork` and `exec`.
    pub fn apply(&self) -> anyhow::Result<()> {
        nix::unistd::setgroups(&[self.gid]).context("setgroups")?;
        nix::unistd::setgid(self.gid).context("setgid")?;
        nix::unistd::setuid(self.uid).context("setuid")?;
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() || nix::unistd::geteuid().is_root() {
            bail!("privileges could be regained after dropping them");
        }
        nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")?;
        nix::sys::prctl::set_dumpable(false).context("PR_SET_DUMPABLE")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::{IoSlice, Read, Write};
    use std::os::fd::AsFd;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_process_identity_names_one_process_only() {
        let me = ProcessIdentity::current().unwrap();
        assert!(me.is_running());
        let earlier = ProcessIdentity {
            start_time: me.start_time.wrapping_sub(1),
            ..me
        };
        assert!(
            !earlier.is_running(),
            "another start time is another process"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(ProcessIdentity::of(pid).is_err(), "a reaped child is gone");
    }

    #[test]
    fn a_handoff_carries_the_peer_and_a_working_channel_end() {
        let (monitor, child) = control_pair().unwrap();
        let (mine, theirs) = UnixStream::pair().unwrap();
        let handoff = Handoff {
            peer_role: Role::Gateway,
            peer: ProcessIdentity::current().unwrap(),
            generation: 3,
        };
        send_handoff(monitor.as_fd(), &handoff, theirs.as_fd()).unwrap();
        drop(theirs);
        let (got, fd) = recv_handoff(child.as_fd()).unwrap();
        assert_eq!(got, handoff);
        let mut received = UnixStream::from(fd);
        (&mine).write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        received.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn a_handoff_without_a_descriptor_or_with_garbage_is_refused() {
        let (monitor, child) = control_pair().unwrap();
        let json = serde_json::to_vec(&control::Control::Pair {
            handoff: Handoff {
                peer_role: Role::Core,
                peer: ProcessIdentity::current().unwrap(),
                generation: 1,
            },
        })
        .unwrap();
        nix::sys::socket::send(monitor.as_raw_fd(), &json, MsgFlags::empty()).unwrap();
        let e = recv_handoff(child.as_fd()).unwrap_err();
        assert!(e.to_string().contains("without its channel"), "{e:#}");

        let (_a, b) = UnixStream::pair().unwrap();
        let fds = [b.as_raw_fd()];
        sendmsg::<()>(
            monitor.as_raw_fd(),
            &[IoSlice::new(
                b"{\"t\":\"pair\",\"handoff\":{\"peer_role\":\"root\"}}",
            )],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(recv_handoff(child.as_fd()).is_err());

        drop(monitor);
        let e = recv_handoff(child.as_fd()).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e:#}");
    }

    #[test]
    fn a_child_finds_its_control_socket_at_fd_3_and_not_our_other_descriptors() {
        let (monitor, child_end) = control_pair().unwrap();
        let inode = nix::sys::stat::fstat(child_end.as_fd()).unwrap().st_ino;
        // Close-on-exec descriptors of ours that must not reach the child.
        let (a, b) = control_pair().unwrap();
        let mut cmd = std::process::Command::new("sh");
        cmd.args([
            "-c",
            "readlink /proc/self/fd/3; for f in /proc/self/fd/*; do readlink $f; done; true",
        ]);
        cmd.stdout(std::process::Stdio::piped());
        let child = spawn_child(cmd, child_end).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some(format!("socket:[{inode}]").as_str()),
            "{text}"
        );
        let links: Vec<&str> = lines.collect();
        for ours in [monitor.as_fd(), a.as_fd(), b.as_fd()] {
            let ino = nix::sys::stat::fstat(ours).unwrap().st_ino;
            let link = format!("socket:[{ino}]");
            assert!(
                !links.contains(&link.as_str()),
                "{link} was inherited: {text}"
            );
        }
    }

    #[test]
    fn root_and_unknown_users_are_refused_as_the_unprivileged_user() {
        assert!(Unprivileged::resolve("root").is_err());
        let e = Unprivileged::resolve("no-such-user-warden-test").unwrap_err();
        assert!(format!("{e:#}").contains("no user"), "{e:#}");
    }

    /// Forks (the child only makes system calls), drops to `nobody` in the child and reads what
    /// the kernel says about it from outside.
    #[test]
    fn dropping_privileges_is_for_good() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let target = Unprivileged::resolve("nobody").unwrap();
        let (mut report_r, report_w) = UnixStream::pair().unwrap();
        let (go_r, mut go_w) = UnixStream::pair().unwrap();
        // SAFETY: the child makes only async-signal-safe system calls, then `_exit`s.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = target.apply().is_ok();
                let nnp = nix::sys::prctl::get_no_new_privs().unwrap_or(false);
                let dumpable = nix::sys::prctl::get_dumpable().unwrap_or(true);
                let regained = nix::unistd::setuid(Uid::from_raw(0)).is_ok();
                let r = [ok as u8, nnp as u8, dumpable as u8, regained as u8];
                let _ = nix::unistd::write(&report_w, &r);
                let mut b = [0u8; 1];
                let _ = nix::unistd::read(&go_r, &mut b);
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let mut r = [0u8; 4];
                report_r.read_exact(&mut r).unwrap();
                let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
                go_w.write_all(b"x").unwrap();
                nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    r,
                    [1, 1, 0, 0],
                    "apply ok, no_new_privs, not dumpable, no way back"
                );
                let line = |k: &str| {
                    status
                        .lines()
                        .find(|l| l.starts_with(k))
                        .unwrap()
                        .split_whitespace()
                        .skip(1)
                        .map(|s| s.parse::<u32>().unwrap())
                        .collect::<Vec<_>>()
                };
                let (uid, gid) = (target.uid.as_raw(), target.gid.as_raw());
                assert_eq!(line("Uid:"), vec![uid; 4], "{status}");
                assert_eq!(line("Gid:"), vec![gid; 4], "{status}");
                assert_eq!(line("Groups:"), vec![gid], "{status}");
                assert_eq!(line("NoNewPrivs:"), vec![1], "{status}");
            }
        }
    }
}
