//! v1 `freezer`: freezes the job so that it can be signalled without racing its forks.

use std::path::Path;
use std::time::{Duration, Instant};

use super::super::{fs, Controller, LimitKind};
use crate::error::Result;
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct Freezer;

impl Controller for Freezer {
    fn name(&self) -> &'static str {
        "freezer (v1)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        &[]
    }

    fn apply(&self, _dir: &Path, _limits: &Limits) -> Result<()> {
        Ok(())
    }

    fn stats(&self, _dir: &Path, _usage: &mut ResourceUsage) {}
}

/// Freezes and waits until the kernel reports FROZEN (it passes through FREEZING while tasks
/// reach a safe point). Returns whether FROZEN was reached within `timeout`.
pub(crate) fn freeze(dir: &Path, timeout: Duration) -> Result<bool> {
    fs::write(dir, "freezer.state", "FROZEN")?;
    let deadline = Instant::now() + timeout;
    loop {
        if fs::read(dir, "freezer.state")?.trim() == "FROZEN" {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        // Writing FROZEN again retries tasks that were busy the first time.
        fs::write(dir, "freezer.state", "FROZEN")?;
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub(crate) fn thaw(dir: &Path) -> Result<()> {
    fs::write(dir, "freezer.state", "THAWED")
}
