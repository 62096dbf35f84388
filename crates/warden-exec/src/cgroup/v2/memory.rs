//! v2 `memory`: `memory.max`, `memory.swap.max` = 0, `memory.peak`, and `oom_kill` in
//! `memory.events`.

use std::path::Path;

use super::super::{fs, Controller, LimitKind};
use crate::error::{Error, Result};
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct Memory;

impl Controller for Memory {
    fn name(&self) -> &'static str {
        "memory (v2)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        &[LimitKind::Memory]
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<()> {
        let Some(max) = limits.memory_max else {
            return Ok(());
        };
        // memory.swap.max is absent without swap accounting; then only a swapless host is safe.
        if fs::exists(dir, "memory.swap.max") {
            fs::write_limit("memory", dir, "memory.swap.max", "0")?;
        } else if fs::host_has_swap() {
            return Err(Error::Unenforceable {
                limit: "memory (swap off)",
                reason: "memory.swap.max is missing (swap accounting is off) and the host has \
                         swap; enable swap accounting or turn swap off"
                    .into(),
            });
        }
        fs::write_limit("memory", dir, "memory.max", &max.to_string())
    }

    fn stats(&self, dir: &Path, usage: &mut ResourceUsage) {
        // memory.peak exists since Linux 5.19.
        usage.memory_peak = fs::read_opt(dir, "memory.peak").and_then(|s| fs::single(&s));
        usage.oom_kills =
            fs::read_opt(dir, "memory.events").and_then(|s| fs::keyed(&s, "oom_kill"));
    }
}
