//! Controllers of cgroup v1 hierarchies (one hierarchy per controller or co-mounted group).

pub(crate) mod blkio;
pub(crate) mod cpu;
pub(crate) mod cpuacct;
pub(crate) mod freezer;
pub(crate) mod memory;
pub(crate) mod pids;
