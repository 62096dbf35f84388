//! Every `unsafe` block of warden-exec lives in this module.
//!
//! Two kinds of code are here: thin wrappers around system calls that std does not offer
//! (`pipe2`, `kill`, `waitpid`, `clone3`), and the code that runs in the child between `clone3`
//! and `execve`. The child is a copy of a multi-threaded process, so it may only make
//! async-signal-safe calls: everything it needs (paths, argv, envp, file descriptors) is prepared
//! by the parent in a [`ChildPlan`], and the child itself performs raw system calls only: no
//! allocation, no locks, no glibc wrappers that broadcast to other threads (the set*id family).

#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::ptr;

/// `CLONE_INTO_CGROUP` (Linux 5.7), not in every libc release.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// `CLONE_PIDFD` (Linux 5.2).
const CLONE_PIDFD: u64 = 0x1000;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;

/// `struct clone_args` as of Linux 5.7 (the version that added the `cgroup` field).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `struct ifreq` reduced to what `SIOC[GS]IFFLAGS` use: name, then the flags union member.
#[repr(C)]
struct IfreqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn last_errno() -> i32 {
    // Reads the thread's errno; allocation-free, so usable in the child too.
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// One `read(2)` from `fd` into `buf`'s unfilled room, which need not be initialized: the
/// bytes read are marked filled. `WouldBlock` and other errors are returned as they are.
pub(crate) fn read_into(fd: BorrowedFd<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> io::Result<()> {
    // SAFETY: the room is only written by read(2), which never de-initializes memory.
    let room = unsafe { buf.unfilled_mut() };
    // SAFETY: `room` is valid for writes of `room.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), room.as_mut_ptr().cast(), room.len()) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel wrote the first `n` bytes of the room.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(())
}

/// One `pread(2)` from `fd` at `pos` appending to `buf`, up to `buf.len() == len`, into room
/// that is not zeroed first. Returns the bytes read (0 at the end of the file); retries `EINTR`.
pub(crate) fn pread_into(
    fd: BorrowedFd<'_>,
    buf: &mut bytes::BytesMut,
    len: usize,
    pos: u64,
) -> io::Result<usize> {
    buf.reserve(len.saturating_sub(buf.len()));
    let want = len.saturating_sub(buf.len());
    let at =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    loop {
        let room = &mut buf.spare_capacity_mut()[..want];
        // SAFETY: `room` is valid for writes of `room.len()` bytes; pread only writes there.
        let n = unsafe { libc::pread(fd.as_raw_fd(), room.as_mut_ptr().cast(), room.len(), at) };
        match usize::try_from(n) {
            Ok(n) => {
                // SAFETY: the kernel initialized the next `n` bytes (`n <= want`).
                unsafe { buf.set_len(buf.len() + n) };
                return Ok(n);
            }
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// A pipe whose both ends are close-on-exec.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a pipe buffer of `bytes` (the kernel rounds up to pages; capped for unprivileged
/// callers by `/proc/sys/fs/pipe-max-size`). Best effort: a refusal keeps the default 64 KiB.
/// A larger buffer lets a job write bulk output with fewer wake-ups of its reader.
pub(crate) fn grow_pipe(fd: &OwnedFd, bytes: i32) {
    // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int and touches no memory.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes);
    }
}

/// Duplicates `fd` to a close-on-exec descriptor numbered 3 or above, so that installing it
/// as 0, 1 or 2 in the child can never overwrite another of the child's descriptors.
pub(crate) fn dup_above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own; the result is a new descriptor.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

pub(crate) fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an open descriptor borrowed for the duration of the call.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends `sig` to one process. Refuses pid <= 0, which `kill(2)` would turn into "a whole
/// process group" or "every process we may signal".
pub(crate) fn kill(pid: i32, sig: i32) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill takes plain integers; pid > 0 names exactly one process.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitStatus {
    Exited(i32),
    Signaled(i32),
}

/// Reaps `pid` if it has ended. `block` waits for it.
pub(crate) fn wait_pid(pid: i32, block: bool) -> io::Result<Option<WaitStatus>> {
    let mut status: libc::c_int = 0;
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: `status` is a valid out-pointer; pid is our own unreaped child.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(None);
        }
        break;
    }
    if libc::WIFEXITED(status) {
        Ok(Some(WaitStatus::Exited(libc::WEXITSTATUS(status))))
    } else if libc::WIFSIGNALED(status) {
        Ok(Some(WaitStatus::Signaled(libc::WTERMSIG(status))))
    } else {
        Ok(None)
    }
}

/// Turns an argument into a C string; an interior NUL is a spec error, reported by the caller.
pub(crate) fn cstring(s: &OsStr) -> Option<CString> {
    CString::new(s.as_bytes()).ok()
}

/// A NULL-terminated array of C strings (argv, envp) that stays valid while this value lives.
pub(crate) struct CStringArray {
    _owned: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CStringArray {
    pub(crate) fn new(items: Vec<CString>) -> Self {
        let mut ptrs: Vec<*const libc::c_char> = items.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(ptr::null());
        CStringArray {
            _owned: items,
            ptrs,
        }
    }
}

/// Where in the child's setup a failure happened; sent to the parent over the error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum ChildStage {
    Cgroup = 1,
    Mount = 2,
    Loopback = 3,
    Hostname = 4,
    Credentials = 5,
    Chdir = 6,
    Stdio = 7,
    Exec = 8,
}

impl ChildStage {
    pub(crate) fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Cgroup,
            2 => Self::Mount,
            3 => Self::Loopback,
            4 => Self::Hostname,
            5 => Self::Credentials,
            6 => Self::Chdir,
            7 => Self::Stdio,
            8 => Self::Exec,
            _ => return None,
        })
    }
}

/// Everything the child does between clone and exec, prepared by the parent.
pub(crate) struct ChildPlan {
    /// `CLONE_NEW*` flags.
    pub namespace_flags: u64,
    /// A cgroup v2 directory to be born into (`CLONE_INTO_CGROUP`).
    pub into_cgroup: Option<RawFd>,
    /// Open `tasks` (v1) and `cgroup.procs` (v2) files; the child writes "0" (itself) into each.
    pub procs_files: Vec<RawFd>,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// Make every mount private, then mount a fresh proc on /proc.
    pub mount_proc: bool,
    pub loopback_up: bool,
    pub hostname: Option<CString>,
    pub cwd: Option<CString>,
    pub gid: Option<u32>,
    pub uid: Option<u32>,
    /// Paths to try with execve, in order (a PATH search done in advance).
    pub candidates: Vec<CString>,
    pub argv: CStringArray,
    pub envp: CStringArray,
}

pub(crate) struct Cloned {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// Starts the child described by `plan`. In the parent, returns its pid and pidfd. The child
/// never returns from here: it execs or reports `(stage, errno)` on `err_pipe` and exits 127.
///
/// The child shares our memory until it execs (`CLONE_VM | CLONE_VFORK`, as `posix_spawn`
/// does): a fork would copy the page tables of the whole daemon, a cost that grows with its
/// memory (the output logs of many jobs), and would make its threads take copy-on-write faults
/// until the exec. `CLONE_INTO_CGROUP` needs `clone3`, which no libc offers with a function to
/// run on a new stack: on x86-64 a few instructions of assembly do that part
/// ([`clone3_on_stack`]); elsewhere that child is a fork-like copy.
pub(crate) fn clone_child(plan: &ChildPlan, err_pipe: RawFd) -> io::Result<Cloned> {
    match plan.into_cgroup {
        None => clone_vm_child(plan, err_pipe),
        #[cfg(target_arch = "x86_64")]
        Some(cgroup) => clone3_vm_child(plan, err_pipe, cgroup),
        #[cfg(not(target_arch = "x86_64"))]
        Some(cgroup) => clone3_fork_child(plan, err_pipe, cgroup),
    }
}

/// A fork-like `clone3` into the cgroup `cgroup`, where [`clone3_on_stack`] is not written.
#[cfg(not(target_arch = "x86_64"))]
fn clone3_fork_child(plan: &ChildPlan, err_pipe: RawFd, cgroup: RawFd) -> io::Result<Cloned> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: plan.namespace_flags | CLONE_PIDFD | CLONE_INTO_CGROUP,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM and with no stack behaves like fork: the child gets a
    // copy of this address space and returns here with 0. `args` is a valid clone_args of the
    // size we pass, and `pidfd` outlives the call. The child only runs `child_main`, which is
    // restricted to async-signal-safe system calls on data prepared before the clone.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 {
        child_main(plan, err_pipe);
    }
    // SAFETY: CLONE_PIDFD stored a new pidfd that only we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Cloned {
        pid: r as i32,
        pidfd,
    })
}

/// The stack of a child that shares our memory: `child_main` needs a few KiB of it.
const CHILD_STACK: usize = 256 << 10;

struct ChildArgs<'a> {
    plan: &'a ChildPlan,
    err_pipe: RawFd,
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` in the cloning function's frame, alive until we exec or
    // exit: with CLONE_VFORK that thread waits in `clone` until then.
    let a = unsafe { &*(arg as *const ChildArgs<'_>) };
    child_main(a.plan, a.err_pipe)
}

/// Runs `f` (a clone that shares our memory) on a fresh child stack, with every signal blocked
/// in this thread meanwhile: the child starts with our handlers and mask, on our memory, and
/// none of our handlers may run in it before it has reset them (`child_main`). Our own mask is
/// restored after. `f` gets the 16-byte aligned top of the stack and how much lies below it.
fn on_child_stack<T>(f: impl FnOnce(*mut u8, usize) -> T) -> T {
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down from its end, which must be 16-byte aligned.
    let end = stack.as_mut_ptr().wrapping_add(CHILD_STACK);
    let top = end.wrapping_sub(end as usize % 16);
    let size = top as usize - stack.as_ptr() as usize;
    // SAFETY: sigset_t is plain data; sigfillset and pthread_sigmask only write the sets.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let r = f(top, size);
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());
    }
    // Only now: CLONE_VFORK returned once the child had exec'd or exited, done with the stack.
    drop(stack);
    r
}

/// [`clone_child`] sharing our memory until the child execs (`CLONE_VM | CLONE_VFORK`).
fn clone_vm_child(plan: &ChildPlan, err_pipe: RawFd) -> io::Result<Cloned> {
    let ns = libc::c_int::try_from(plan.namespace_flags | CLONE_PIDFD)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = ns | libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    let args = ChildArgs { plan, err_pipe };
    let mut pidfd: libc::c_int = -1;
    let (r, error) = on_child_stack(|top, _| {
        // SAFETY: `child_entry` runs on the stack `on_child_stack` keeps until we return
        // (CLONE_VFORK returns only once the child has exec'd or exited); `args` and `plan`
        // stay untouched meanwhile, as this thread waits. The child only makes system calls
        // on them (`child_main`). CLONE_PIDFD stores the pidfd through the parent-tid argument.
        let r = unsafe {
            libc::clone(
                child_entry,
                top.cast(),
                flags,
                &args as *const ChildArgs<'_> as *mut libc::c_void,
                &mut pidfd as *mut libc::c_int,
            )
        };
        (r, io::Error::last_os_error())
    });
    if r < 0 {
        return Err(error);
    }
    // SAFETY: CLONE_PIDFD stored a new pidfd that only we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Cloned { pid: r, pidfd })
}

/// [`clone_child`] into the cgroup `cgroup`, sharing our memory until the child execs.
#[cfg(target_arch = "x86_64")]
fn clone3_vm_child(plan: &ChildPlan, err_pipe: RawFd, cgroup: RawFd) -> io::Result<Cloned> {
    let args = ChildArgs { plan, err_pipe };
    let mut pidfd: libc::c_int = -1;
    let r = on_child_stack(|top, size| {
        let mut cl = CloneArgs {
            flags: plan.namespace_flags
                | CLONE_PIDFD
                | CLONE_INTO_CGROUP
                | libc::CLONE_VM as u64
                | libc::CLONE_VFORK as u64,
            pidfd: &mut pidfd as *mut libc::c_int as u64,
            exit_signal: libc::SIGCHLD as u64,
            // clone3 takes the lowest address and the size; the child starts at their sum.
            stack: top as u64 - size as u64,
            stack_size: size as u64,
            cgroup: cgroup as u64,
            ..CloneArgs::default()
        };
        // SAFETY: as in `clone_vm_child`: the child runs `child_entry` on the stack
        // `on_child_stack` keeps, and this thread waits (CLONE_VFORK) until the child has
        // exec'd or exited, leaving `args`, `plan` and `cl` untouched. `cl` is a valid
        // clone_args of the size passed; `pidfd` outlives the call.
        unsafe {
            clone3_on_stack(
                &mut cl,
                child_entry,
                &args as *const ChildArgs<'_> as *mut libc::c_void,
            )
        }
    });
    if r < 0 {
        return Err(io::Error::from_raw_os_error(-r as i32));
    }
    // SAFETY: CLONE_PIDFD stored a new pidfd that only we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Cloned {
        pid: r as i32,
        pidfd,
    })
}

/// `clone3(args)` whose child calls `entry(arg)` on the stack `args` names and never comes
/// back; returns, in the parent, the child's pid or `-errno`.
///
/// # Safety
/// `args` must be a valid `clone_args` with a stack, and with `CLONE_VM` also `CLONE_VFORK`,
/// so that this thread is suspended while the child uses the memory they share. `entry` must
/// not return (here it execs or exits; a return would run off the stack into `ud2`).
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_on_stack(
    args: &mut CloneArgs,
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> i64 {
    let ret: i64;
    // The child comes back from `syscall` with rax = 0 and rsp at the top of its stack, its
    // other registers as ours: r12 and r13 carry the argument and the entry point across. The
    // parent just takes the result. `syscall` itself clobbers rcx and r11.
    std::arch::asm!(
        "syscall",
        "test rax, rax",
        "jnz 2f",
        "xor ebp, ebp",
        "mov rdi, r12",
        "call r13",
        "ud2",
        "2:",
        inlateout("rax") libc::SYS_clone3 => ret,
        in("rdi") args as *mut CloneArgs,
        in("rsi") std::mem::size_of::<CloneArgs>(),
        in("r12") arg,
        in("r13") entry,
        lateout("rcx") _,
        lateout("r11") _,
        options(nostack),
    );
    ret
}

/// Reports a setup failure to the parent and exits without running any atexit handler.
fn child_fail(err_pipe: RawFd, stage: ChildStage, errno: i32) -> ! {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    buf[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write from a live stack buffer of 8 bytes (less than PIPE_BUF, so atomic);
    // _exit ends the process without touching shared state.
    unsafe {
        libc::write(err_pipe, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// Installs `fd` as `target` without close-on-exec.
fn child_install(fd: RawFd, target: RawFd) -> bool {
    // SAFETY: dup2/fcntl on descriptors the parent kept open for the child.
    unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0) == 0
        } else {
            libc::dup2(fd, target) == target
        }
    }
}

fn child_main(plan: &ChildPlan, err: RawFd) -> ! {
    // SAFETY (whole function): only system calls, on pointers into `plan` (valid: the child
    // has the parent's memory, shared or a copy) or into this stack frame.
    unsafe {
        // Signal state: the parent's handlers, ignored signals and mask would survive exec.
        // Handlers first, while everything is still blocked: none of the parent's may run
        // here, on memory the child may share with it.
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut());

        // Join the job's cgroups first, so that everything after is accounted and limited.
        for &fd in &plan.procs_files {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                child_fail(err, ChildStage::Cgroup, last_errno());
            }
        }

        if plan.mount_proc {
            let root = c"/";
            if libc::mount(
                ptr::null(),
                root.as_ptr(),
                ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                ptr::null(),
            ) != 0
            {
                child_fail(err, ChildStage::Mount, last_errno());
            }
            let proc_ = c"proc";
            if libc::mount(
                proc_.as_ptr(),
                c"/proc".as_ptr(),
                proc_.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                ptr::null(),
            ) != 0
            {
                child_fail(err, ChildStage::Mount, last_errno());
            }
        }

        if plan.loopback_up {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                child_fail(err, ChildStage::Loopback, last_errno());
            }
            let mut ifr = IfreqFlags {
                name: [0; 16],
                flags: 0,
                _pad: [0; 22],
            };
            ifr.name[..2].copy_from_slice(b"lo");
            if libc::ioctl(s, SIOCGIFFLAGS as _, &mut ifr) != 0 {
                child_fail(err, ChildStage::Loopback, last_errno());
            }
            ifr.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(s, SIOCSIFFLAGS as _, &ifr) != 0 {
                child_fail(err, ChildStage::Loopback, last_errno());
            }
            libc::close(s);
        }

        if let Some(h) = &plan.hostname {
            if libc::sethostname(h.as_ptr(), h.as_bytes().len()) != 0 {
                child_fail(err, ChildStage::Hostname, last_errno());
            }
        }

        // Raw syscalls: glibc's setresuid & co. would try to signal the parent's other threads,
        // which do not exist in this copy.
        if (plan.uid.is_some() || plan.gid.is_some())
            && libc::syscall(libc::SYS_setgroups, 0usize, ptr::null::<libc::gid_t>()) != 0
        {
            child_fail(err, ChildStage::Credentials, last_errno());
        }
        if let Some(g) = plan.gid {
            if libc::syscall(libc::SYS_setresgid, g, g, g) != 0 {
                child_fail(err, ChildStage::Credentials, last_errno());
            }
        }
        if let Some(u) = plan.uid {
            if libc::syscall(libc::SYS_setresuid, u, u, u) != 0 {
                child_fail(err, ChildStage::Credentials, last_errno());
            }
        }

        // After the switch of uid and gid, so that the working directory is reached with the
        // job's own permissions: as root, chdir would pass directories the job may not search.
        if let Some(cwd) = &plan.cwd {
            if libc::chdir(cwd.as_ptr()) != 0 {
                child_fail(err, ChildStage::Chdir, last_errno());
            }
        }

        if !child_install(plan.stdin, 0)
            || !child_install(plan.stdout, 1)
            || !child_install(plan.stderr, 2)
        {
            child_fail(err, ChildStage::Stdio, last_errno());
        }
        // Whatever the daemon left open without close-on-exec must not reach the job.
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );

        // Like execvp: EACCES on any candidate wins over "not found".
        let mut errno = libc::ENOENT;
        let mut saw_eacces = false;
        for path in &plan.candidates {
            libc::execve(
                path.as_ptr(),
                plan.argv.ptrs.as_ptr(),
                plan.envp.ptrs.as_ptr(),
            );
            let e = last_errno();
            match e {
                libc::EACCES => saw_eacces = true,
                libc::ENOENT | libc::ENOTDIR => {}
                other => {
                    errno = other;
                    break;
                }
            }
        }
        if saw_eacces && errno == libc::ENOENT {
            errno = libc::EACCES;
        }
        child_fail(err, ChildStage::Exec, errno)
    }
}

/// Registers a pidfd with the tokio reactor.
pub(crate) fn async_pidfd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd owns its descriptor, and the AsyncFd keeps it, unreplaced and open,
    // until it is dropped or `into_inner` deregisters it.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(fd) }?)
}

/// Registers a pipe end (as a `File`) with the tokio reactor.
pub(crate) fn async_file(f: std::fs::File) -> io::Result<tokio::io::unix::AsyncFd<std::fs::File>> {
    // SAFETY: the File owns its descriptor, and the AsyncFd keeps it, unreplaced and open,
    // until it is dropped or `into_inner` deregisters it.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(f) }?)
}
