//! Process hygiene applied once, at start, before any secret-to-be is in memory: no core files,
//! not dumpable (so neither a core dump nor another process of the same uid reading
//! `/proc/PID/mem` or attaching with ptrace can see the daemon's memory), a restrictive umask,
//! and as many file descriptors as the hard limit allows (each client connection costs one).

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// What [`harden_process`] did, for the start-up log.
#[derive(Debug, Clone)]
pub struct Hardening {
    pub dumpable: bool,
    pub core_limit: u64,
    pub nofile: u64,
}

/// Applies the process-wide settings. Errors are reported, not fatal: a container may forbid
/// raising a limit, and a daemon that cannot raise it still works with fewer connections.
pub fn harden_process() -> Hardening {
    let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) only changes this process's dumpable flag; the
    // arguments are plain integers.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    // Files and sockets warden creates are private unless it sets their mode explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let nofile = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 0,
    };
    Hardening {
        dumpable: is_dumpable(),
        core_limit: getrlimit(Resource::RLIMIT_CORE)
            .map(|l| l.0)
            .unwrap_or(u64::MAX),
        nofile,
    }
}

/// Whether the kernel still considers this process dumpable.
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments and returns the flag.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}
