//! The crate's one error type. Each variant says what failed and, where it can, what to do.

use std::io;
use std::path::PathBuf;

/// Where in the child's setup a start failed (the child reports it before `exec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnStage {
    /// Clone itself failed (in the parent).
    Clone,
    /// Writing itself into a cgroup (`tasks` on v1, `cgroup.procs` on v2).
    Cgroup,
    /// Making mounts private or mounting `/proc`.
    Mount,
    /// Bringing up `lo` in the new network namespace.
    Loopback,
    /// `sethostname` in the new UTS namespace.
    Hostname,
    /// `setgroups` / `setresgid` / `setresuid`.
    Credentials,
    /// Changing to the working directory.
    Chdir,
    /// Installing stdin/stdout/stderr.
    Stdio,
    /// `execve` of the program (e.g. ENOENT: not found, EACCES: not executable).
    Exec,
}

impl std::fmt::Display for SpawnStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            SpawnStage::Clone => "clone",
            SpawnStage::Cgroup => "joining the cgroup",
            SpawnStage::Mount => "mounting /proc",
            SpawnStage::Loopback => "bringing up lo",
            SpawnStage::Hostname => "setting the hostname",
            SpawnStage::Credentials => "switching uid/gid",
            SpawnStage::Chdir => "changing directory",
            SpawnStage::Stdio => "installing stdio",
            SpawnStage::Exec => "exec",
        };
        f.write_str(s)
    }
}

/// Errors of warden-exec.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A requested limit cannot be enforced on this host; the job was not started.
    #[error("limit `{limit}` cannot be enforced on this host: {reason}")]
    Unenforceable {
        /// Which limit (`cpu`, `memory`, `memory (swap off)`, `pids`, `io`).
        limit: &'static str,
        /// Why, and what would make it enforceable.
        reason: String,
    },
    /// A cgroup file or directory operation failed.
    #[error("cgroup {op} {path}: {source}")]
    Cgroup {
        /// `mkdir`, `write`, `read`, `rmdir`, `open`.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The process could not be started; `stage` says which step failed.
    #[error("job start failed at {stage}: {source}")]
    Spawn {
        /// The failing step.
        stage: SpawnStage,
        /// The errno of that step.
        #[source]
        source: io::Error,
    },
    /// The job specification is invalid (e.g. a NUL byte in an argument, a zero period).
    #[error("invalid job spec: {0}")]
    InvalidSpec(String),
    /// No usable cgroup hierarchy was found, or this process's cgroups could not be read.
    #[error("cgroups unavailable: {0}")]
    NoCgroups(String),
    /// Any other I/O failure; `what` names the operation.
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }

    /// The errno behind this error, if any (e.g. `ENOENT` for an exec of a missing program).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Cgroup { source, .. }
            | Error::Spawn { source, .. }
            | Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
