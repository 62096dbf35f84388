//! Controllers of the cgroup v2 (unified) hierarchy.

pub(crate) mod cpu;
pub(crate) mod io;
pub(crate) mod memory;
pub(crate) mod pids;
