//! v1 `blkio`: throttling per device (`blkio.throttle.*_device`) and bytes transferred.

use std::path::Path;

use super::super::{fs, Controller, LimitKind};
use crate::error::Result;
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct Blkio;

impl Controller for Blkio {
    fn name(&self) -> &'static str {
        "blkio (v1)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        &[LimitKind::Io]
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<()> {
        for l in &limits.io {
            let files = [
                ("blkio.throttle.read_bps_device", l.read_bps),
                ("blkio.throttle.write_bps_device", l.write_bps),
                ("blkio.throttle.read_iops_device", l.read_iops),
                ("blkio.throttle.write_iops_device", l.write_iops),
            ];
            for (file, value) in files {
                if let Some(v) = value {
                    fs::write_limit("io", dir, file, &format!("{} {v}", l.device))?;
                }
            }
        }
        Ok(())
    }

    fn stats(&self, dir: &Path, usage: &mut ResourceUsage) {
        let text = fs::read_opt(dir, "blkio.throttle.io_service_bytes_recursive")
            .or_else(|| fs::read_opt(dir, "blkio.throttle.io_service_bytes"));
        let Some(text) = text else { return };
        let (mut read, mut write) = (0u64, 0u64);
        // Lines: "MAJ:MIN Read N", "MAJ:MIN Write N", …, and a final "Total N".
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let [_dev, op, n] = f[..] {
                let n: u64 = n.parse().unwrap_or(0);
                match op {
                    "Read" => read += n,
                    "Write" => write += n,
                    _ => {}
                }
            }
        }
        usage.io_read_bytes = Some(read);
        usage.io_write_bytes = Some(write);
    }
}
