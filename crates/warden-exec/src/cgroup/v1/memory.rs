//! v1 `memory`: `memory.limit_in_bytes`, swap off through `memory.memsw.limit_in_bytes`,
//! peak usage and OOM kills.

use std::path::Path;

use super::super::{fs, Controller, LimitKind};
use crate::error::{Error, Result};
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct Memory;

impl Controller for Memory {
    fn name(&self) -> &'static str {
        "memory (v1)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        &[LimitKind::Memory]
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<()> {
        let Some(max) = limits.memory_max else {
            return Ok(());
        };
        // "Swap off" in v1 is memory+swap limited to the memory limit. memsw exists only when
        // the kernel accounts swap (CONFIG_MEMCG_SWAP, no swapaccount=0). Without it we can still
        // promise "no swap" when the host has no swap at all; otherwise we refuse.
        let memsw = fs::exists(dir, "memory.memsw.limit_in_bytes");
        if !memsw && fs::host_has_swap() {
            return Err(Error::Unenforceable {
                limit: "memory (swap off)",
                reason: "memory.memsw.limit_in_bytes is missing (swap accounting is off) and the \
                         host has swap, so the job could swap past its limit; boot with \
                         swapaccount=1 or turn swap off"
                    .into(),
            });
        }
        // memory first: memsw may never be below it, and a new cgroup's memsw is unlimited.
        fs::write_limit("memory", dir, "memory.limit_in_bytes", &max.to_string())?;
        if memsw {
            fs::write_limit(
                "memory",
                dir,
                "memory.memsw.limit_in_bytes",
                &max.to_string(),
            )?;
        }
        Ok(())
    }

    fn stats(&self, dir: &Path, usage: &mut ResourceUsage) {
        usage.memory_peak =
            fs::read_opt(dir, "memory.max_usage_in_bytes").and_then(|s| fs::single(&s));
        // `oom_kill` in memory.oom_control exists since Linux 4.13.
        usage.oom_kills =
            fs::read_opt(dir, "memory.oom_control").and_then(|s| fs::keyed(&s, "oom_kill"));
    }
}
