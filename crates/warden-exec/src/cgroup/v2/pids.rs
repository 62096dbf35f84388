//! v2 `pids`: `pids.max` and refused forks (`max` in `pids.events`).

use std::path::Path;

use super::super::{fs, Controller, LimitKind};
use crate::error::Result;
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct Pids;

impl Controller for Pids {
    fn name(&self) -> &'static str {
        "pids (v2)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        &[LimitKind::Pids]
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<()> {
        if let Some(max) = limits.pids_max {
            fs::write_limit("pids", dir, "pids.max", &max.to_string())?;
        }
        Ok(())
    }

    fn stats(&self, dir: &Path, usage: &mut ResourceUsage) {
        usage.pids_limit_hits = fs::read_opt(dir, "pids.events").and_then(|s| fs::keyed(&s, "max"));
    }
}
