//! Reading and writing cgroup interface files, with the path in every error.

use std::path::Path;

use crate::error::{Error, Result};

pub(crate) fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|source| Error::Cgroup {
        op: "write",
        path,
        source,
    })
}

/// Writes a limit. A missing interface file means this kernel cannot enforce the limit at
/// all (e.g. no CFS bandwidth control): that is [`Error::Unenforceable`], not an I/O error.
pub(crate) fn write_limit(limit: &'static str, dir: &Path, file: &str, value: &str) -> Result<()> {
    if !dir.join(file).exists() {
        return Err(Error::Unenforceable {
            limit,
            reason: format!(
                "{} does not exist: this kernel does not support that limit",
                dir.join(file).display()
            ),
        });
    }
    write(dir, file, value)
}

pub(crate) fn read(dir: &Path, file: &str) -> Result<String> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|source| Error::Cgroup {
        op: "read",
        path,
        source,
    })
}

pub(crate) fn read_opt(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

pub(crate) fn exists(dir: &Path, file: &str) -> bool {
    dir.join(file).exists()
}

/// The value of `key` in a flat-keyed file ("key value" lines).
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok())?
    })
}

/// A single number, or `None` for "max" / unparsable.
pub(crate) fn single(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Whether the host has swap configured (`SwapTotal` in /proc/meminfo is not 0).
pub(crate) fn host_has_swap() -> bool {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("SwapTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .is_some_and(|kb| kb > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_finds_exact_key_only() {
        let t = "max 3\nmax_foo 9\noom_kill 2\n";
        assert_eq!(keyed(t, "max"), Some(3));
        assert_eq!(keyed(t, "oom_kill"), Some(2));
        assert_eq!(keyed(t, "oom"), None);
    }

    #[test]
    fn single_treats_max_as_none() {
        assert_eq!(single("max\n"), None);
        assert_eq!(single("42\n"), Some(42));
    }
}
