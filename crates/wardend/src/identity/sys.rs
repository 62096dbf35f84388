//! The three system calls identity needs that neither std nor nix wraps: `SO_PEERGROUPS`,
//! `pidfd_open` and `pidfd_send_signal`. Everything else in `identity` is safe code.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Largest group list the kernel can report (`NGROUPS_MAX`).
const NGROUPS_MAX: usize = 65536;

/// The peer's supplementary groups as they were when it connected (`SO_PEERGROUPS`, Linux 4.13+).
pub(crate) fn peer_groups(sock: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut buf: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let bytes = buf.len() * size_of::<libc::gid_t>();
        let mut len = libc::socklen_t::try_from(bytes).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: `buf` is a live, writable allocation of exactly `len` bytes and the kernel writes
        // at most `len` bytes into it; `sock` is an open descriptor for the whole call (it is
        // borrowed); `len` is a valid pointer the kernel updates with the size it needed.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            buf.truncate(needed);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        // ERANGE: the buffer was too small and `len` now holds the size the kernel needs.
        if err.raw_os_error() == Some(libc::ERANGE) && needed > buf.len() && needed <= NGROUPS_MAX {
            buf.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

/// A pidfd for `pid` (Linux 5.3+). It refers to that very process from now on, whatever later
/// happens to the pid number.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(rc).map_err(|_| io::ErrorKind::InvalidData)?;
    // SAFETY: on success the kernel returned a new descriptor (close-on-exec) that nothing else
    // owns; the OwnedFd becomes its only owner and closes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Succeeds while the process behind `pidfd` exists (signal 0 checks, delivers nothing).
/// `ESRCH` means it has exited, even if its pid number now belongs to someone else.
pub(crate) fn pidfd_check_alive(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the descriptor is open for the whole call (borrowed); signal 0 delivers nothing;
    // a null siginfo is allowed (the kernel fills one as kill() would); flags are 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
