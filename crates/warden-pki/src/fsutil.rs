//! Durable file writes: a file is either absent, its old content or its whole new content, and
//! a key file is 0600 from the moment it exists.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `data` to `dir/name` atomically: a temporary file in the same directory, created with
/// `O_CREAT | O_EXCL | O_NOFOLLOW` and `mode` (so a key is never readable by others, not even
/// for an instant), written, fsynced, renamed over the target, and the directory fsynced so the
/// rename itself survives a crash.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> io::Result<()> {
    let mut rnd = [0u8; 8];
    getrandom::getrandom(&mut rnd).map_err(|e| io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(rnd)));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)?;
        // The umask may have taken bits away; set exactly what was asked (never more than the
        // creation mode allowed for key files, which is 0600).
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn write_atomic_sets_the_mode_replaces_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        write_atomic(d.path(), "k", b"one", 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(d.path().join("k")).unwrap().mode() & 0o777,
            0o600
        );
        write_atomic(d.path(), "k", b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(d.path().join("k")).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(d.path().join("k")).unwrap().mode() & 0o777,
            0o644
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
