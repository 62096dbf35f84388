//! What a job is: program, environment, identity, namespaces, limits, output handling.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::log::LogConfig;

/// A CPU bandwidth limit: at most `quota` of CPU time per `period` (CFS bandwidth control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    /// CPU time allowed per period, summed over all CPUs (1 ms ..).
    pub quota: Duration,
    /// The accounting period (1 ms ..= 1 s).
    pub period: Duration,
}

impl CpuLimit {
    /// `cores` CPUs' worth of time (e.g. 0.5), over the kernel's default 100 ms period.
    pub fn cores(cores: f64) -> Self {
        let period = Duration::from_millis(100);
        CpuLimit {
            quota: period.mul_f64(cores.max(0.0)),
            period,
        }
    }

    pub(crate) fn quota_us(&self) -> u64 {
        self.quota.as_micros() as u64
    }

    pub(crate) fn period_us(&self) -> u64 {
        self.period.as_micros() as u64
    }
}

/// A block device, by major:minor number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceNumber {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DeviceNumber {
    /// The device a block-device node (e.g. `/dev/vda`) stands for. Throttling applies to whole
    /// disks, not partitions.
    pub fn from_node(path: &Path) -> Result<Self> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let md = std::fs::metadata(path).map_err(Error::io("stat block device"))?;
        if !md.file_type().is_block_device() {
            return Err(Error::InvalidSpec(format!(
                "{} is not a block device node",
                path.display()
            )));
        }
        let dev = md.rdev();
        // The glibc encoding of dev_t (sys/sysmacros.h).
        let major = (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32;
        let minor = (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32;
        Ok(DeviceNumber { major, minor })
    }
}

impl std::fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// IO throttling on one device; `None` leaves that direction unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoLimit {
    /// The device.
    pub device: DeviceNumber,
    /// Read bytes per second.
    pub read_bps: Option<u64>,
    /// Write bytes per second.
    pub write_bps: Option<u64>,
    /// Read operations per second.
    pub read_iops: Option<u64>,
    /// Write operations per second.
    pub write_iops: Option<u64>,
}

/// Resource limits. `None` / empty means "no limit"; every limit that is set is enforced or the
/// start fails with [`Error::Unenforceable`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU bandwidth.
    pub cpu: Option<CpuLimit>,
    /// Memory in bytes, with swap off for the job (see the crate docs for how).
    pub memory_max: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids_max: Option<u64>,
    /// Per-device IO throttling.
    pub io: Vec<IoLimit>,
}

impl Limits {
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(c) = &self.cpu {
            let p = c.period_us();
            if !(1_000..=1_000_000).contains(&p) {
                return Err(Error::InvalidSpec(format!(
                    "cpu period must be 1 ms ..= 1 s, got {p} us"
                )));
            }
            if c.quota_us() < 1_000 {
                return Err(Error::InvalidSpec(format!(
                    "cpu quota must be at least 1 ms, got {} us",
                    c.quota_us()
                )));
            }
        }
        if self.memory_max == Some(0) {
            return Err(Error::InvalidSpec("memory_max of 0 bytes".into()));
        }
        Ok(())
    }
}

/// Which new namespaces the job gets. Each is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Namespaces {
    /// New PID namespace: the job's first process is pid 1.
    pub pid: bool,
    /// New mount namespace, all mounts made private, and a fresh `/proc` mounted (which shows
    /// only the job's processes when `pid` is set too).
    pub mount: bool,
    /// New network namespace with only `lo`, brought up.
    pub net: bool,
    /// New UTS namespace (see [`JobSpec::hostname`]).
    pub uts: bool,
    /// New IPC namespace.
    pub ipc: bool,
}

impl Namespaces {
    /// All five.
    pub fn all() -> Self {
        Namespaces {
            pid: true,
            mount: true,
            net: true,
            uts: true,
            ipc: true,
        }
    }
}

/// What happens to the job's stdout and stderr.
#[derive(Debug, Clone)]
pub enum Output {
    /// Into an [`OutputLog`](crate::OutputLog) (see [`Job::log`](crate::Job::log)).
    Log(LogConfig),
    /// Handed to the caller as two pipes (see [`Job::take_pipes`](crate::Job::take_pipes)).
    Pipes,
}

/// One job to start.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The program; without a `/` it is searched in the job's `PATH` (or a default PATH).
    pub program: OsString,
    /// Arguments after `argv[0]` (which is `program`).
    pub args: Vec<OsString>,
    /// The whole environment: nothing is inherited from the daemon.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory (default: the daemon's).
    pub cwd: Option<PathBuf>,
    /// Run as this uid. Supplementary groups are cleared when uid or gid is set. Set `gid`
    /// too: a uid alone keeps the daemon's gid (root's group).
    pub uid: Option<u32>,
    /// Run as this gid.
    pub gid: Option<u32>,
    /// New namespaces.
    pub namespaces: Namespaces,
    /// Hostname inside a new UTS namespace.
    pub hostname: Option<OsString>,
    /// Limits.
    pub limits: Limits,
    /// Output handling.
    pub output: Output,
}

impl JobSpec {
    /// A job running `program args…` with an empty environment, no namespaces, no limits, and
    /// output into a log with default settings.
    pub fn new<P, I, A>(program: P, args: I) -> Self
    where
        P: Into<OsString>,
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        JobSpec {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            uid: None,
            gid: None,
            namespaces: Namespaces::default(),
            hostname: None,
            limits: Limits::default(),
            output: Output::Log(LogConfig::default()),
        }
    }
}
