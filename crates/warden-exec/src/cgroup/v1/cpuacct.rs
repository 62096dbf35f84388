//! v1 `cpuacct`: the job's CPU time (`cpuacct.usage`, nanoseconds). Statistics only.

use std::path::Path;
use std::time::Duration;

use super::super::{fs, Controller, LimitKind};
use crate::error::Result;
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct CpuAcct;

impl Controller for CpuAcct {
    fn name(&self) -> &'static str {
        "cpuacct (v1)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        &[]
    }

    fn apply(&self, _dir: &Path, _limits: &Limits) -> Result<()> {
        Ok(())
    }

    fn stats(&self, dir: &Path, usage: &mut ResourceUsage) {
        if let Some(ns) = fs::read_opt(dir, "cpuacct.usage").and_then(|s| fs::single(&s)) {
            usage.cpu_time = Some(Duration::from_nanos(ns));
        }
    }
}
