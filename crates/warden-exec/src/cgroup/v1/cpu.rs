//! v1 `cpu`: CFS bandwidth (`cpu.cfs_period_us`, `cpu.cfs_quota_us`) and throttling counts.
//! CPU time is not here in v1; it is `cpuacct`'s.

use std::path::Path;

use super::super::{fs, Controller, LimitKind};
use crate::error::Result;
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct Cpu;

impl Controller for Cpu {
    fn name(&self) -> &'static str {
        "cpu (v1)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        &[LimitKind::Cpu]
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<()> {
        if let Some(c) = &limits.cpu {
            // Period first: the kernel checks the quota against the current period.
            fs::write_limit("cpu", dir, "cpu.cfs_period_us", &c.period_us().to_string())?;
            fs::write_limit("cpu", dir, "cpu.cfs_quota_us", &c.quota_us().to_string())?;
        }
        Ok(())
    }

    fn stats(&self, dir: &Path, usage: &mut ResourceUsage) {
        if let Some(s) = fs::read_opt(dir, "cpu.stat") {
            usage.cpu_throttled_periods = fs::keyed(&s, "nr_throttled");
        }
    }
}
