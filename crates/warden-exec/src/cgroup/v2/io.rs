//! v2 `io`: `io.max` ("MAJ:MIN rbps=… wbps=… riops=… wiops=…") and bytes from `io.stat`.

use std::path::Path;

use super::super::{fs, Controller, LimitKind};
use crate::error::Result;
use crate::{Limits, ResourceUsage};

#[derive(Debug)]
pub(crate) struct Io;

impl Controller for Io {
    fn name(&self) -> &'static str {
        "io (v2)"
    }

    fn enforces(&self) -> &'static [LimitKind] {
        &[LimitKind::Io]
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<()> {
        for l in &limits.io {
            let mut line = l.device.to_string();
            for (key, v) in [
                ("rbps", l.read_bps),
                ("wbps", l.write_bps),
                ("riops", l.read_iops),
                ("wiops", l.write_iops),
            ] {
                if let Some(v) = v {
                    line.push_str(&format!(" {key}={v}"));
                }
            }
            fs::write_limit("io", dir, "io.max", &line)?;
        }
        Ok(())
    }

    fn stats(&self, dir: &Path, usage: &mut ResourceUsage) {
        let Some(text) = fs::read_opt(dir, "io.stat") else {
            return;
        };
        let (mut read, mut write) = (0u64, 0u64);
        for word in text.split_whitespace() {
            if let Some(n) = word.strip_prefix("rbytes=") {
                read += n.parse::<u64>().unwrap_or(0);
            } else if let Some(n) = word.strip_prefix("wbytes=") {
                write += n.parse::<u64>().unwrap_or(0);
            }
        }
        usage.io_read_bytes = Some(read);
        usage.io_write_bytes = Some(write);
    }
}
