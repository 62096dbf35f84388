//! v2 `cpu`: `cpu.max` ("$QUOTA $PERIOD"). `cpu.stat` (usage, throttling) exists in every v2
//! cgroup whether or not the controller is enabled, so this also serves as the CPU-time source
//! when only the v2 hierarchy tracks the job.

use std::path::Path;
use std::time::Duration;

use super::super::{fs, Controller, LimitKind};
use crate::error::Result;
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct Cpu {
    /// Whether the `cpu` controller is enabled for our children (limits possible).
    pub(crate) enabled: bool,
}

impl Controller for Cpu {
    fn name(&self) -> &'static str {
        "cpu (v2)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        if self.enabled {
            &[LimitKind::Cpu]
        } else {
            &[]
        }
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<()> {
        if let (true, Some(c)) = (self.enabled, &limits.cpu) {
            fs::write_limit(
                "cpu",
                dir,
                "cpu.max",
                &format!("{} {}", c.quota_us(), c.period_us()),
            )?;
        }
        Ok(())
    }

    fn stats(&self, dir: &Path, usage: &mut ResourceUsage) {
        if let Some(s) = fs::read_opt(dir, "cpu.stat") {
            if let Some(us) = fs::keyed(&s, "usage_usec") {
                usage.cpu_time = Some(Duration::from_micros(us));
            }
            if let Some(n) = fs::keyed(&s, "nr_throttled") {
                usage.cpu_throttled_periods = Some(n);
            }
        }
    }
}
