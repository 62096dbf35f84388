//! v1 `pids`: `pids.max` and how often forks were refused at the limit (`pids.events`).

use std::path::Path;

use super::super::{fs, Controller, LimitKind};
use crate::error::Result;
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct Pids;

impl Controller for Pids {
    fn name(&self) -> &'static str {
        "pids (v1)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        &[LimitKind::Pids]
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<()> {
        if let Some(max) = limits.pids_max {
            // 0 is a valid limit: no process may be added (the first one is placed before it
            // forks, so the job can still run, but cannot fork).
            fs::write_limit("pids", dir, "pids.max", &max.to_string())?;
        }
        Ok(())
    }

    fn stats(&self, dir: &Path, usage: &mut ResourceUsage) {
        usage.pids_limit_hits = fs::read_opt(dir, "pids.events").and_then(|s| fs::keyed(&s, "max"));
    }
}
