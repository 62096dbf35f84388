//! The HMAC key file for Lumo-signed requests.
//!
//! **The key is the file's raw bytes** — Lumo's rule, kept so that existing deployments and
//! clients keep working. Nothing is trimmed: a trailing newline written by `echo` is part of the
//! key, and clients must sign with exactly the same bytes (`printf '%s'` or `echo -n` avoid the
//! surprise). A key made by [`generate_key_file`] is 64 hex characters with no newline, and those
//! 64 ASCII characters (not the 32 bytes they encode) are the key, so shell clients can pass it
//! straight to `openssl dgst -hmac`.
//!
//! A key file is refused unless it is a regular file (not a symlink, not a FIFO or device), not
//! empty, at most [`MAX_KEY_FILE_LEN`] bytes, readable by its owner only (no bit of
//! `mode & 0o077`), and owned by root or by the user the daemon runs as. Only the last component
//! of the path is protected against symlinks (`O_NOFOLLOW`); the directories above it should be
//! root-owned and not writable by others.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The largest key file accepted: more is almost certainly the wrong file.
pub const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// Why a key file was refused. Each message names the file and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot open HMAC key file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("HMAC key file {path} is a symbolic link; point the configuration at the real file")]
    Symlink { path: PathBuf },
    #[error("HMAC key file {path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error(
        "HMAC key file {path} has mode {mode:04o}: it must not be accessible by group or others; \
         run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "HMAC key file {path} is owned by uid {uid}; it must be owned by root or by the daemon's \
         user (uid {euid}): run `chown {euid} {path}`"
    )]
    Owner { path: PathBuf, uid: u32, euid: u32 },
    #[error("HMAC key file {path} is empty; write a key into it, or generate one with dev mode")]
    Empty { path: PathBuf },
    #[error("HMAC key file {path} is {len} bytes long; a key file holds at most {max} bytes")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("cannot read HMAC key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot create HMAC key file {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot read the system's random source to generate a key: {0}")]
    Entropy(String),
}

/// Reads and checks the key file at `path`; see the module documentation for the rules.
pub fn load_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let p = || path.to_path_buf();
    // O_NONBLOCK: opening a FIFO for reading must not hang the daemon's start; it is refused
    // below as not a regular file. It has no effect on regular files.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => KeyFileError::Symlink { path: p() },
            _ => KeyFileError::Open { path: p(), source },
        })?;
    // Checked on the open descriptor, so the file cannot be swapped between check and read.
    let meta = file
        .metadata()
        .map_err(|source| KeyFileError::Read { path: p(), source })?;
    if !meta.file_type().is_file() {
        return Err(KeyFileError::NotRegular { path: p() });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions { path: p(), mode });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(KeyFileError::Owner {
            path: p(),
            uid: meta.uid(),
            euid,
        });
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(KeyFileError::TooLarge {
            path: p(),
            len: meta.len(),
            max: MAX_KEY_FILE_LEN,
        });
    }
    // Sized up front so that the buffer holding the key is never reallocated (which would leave
    // a copy behind that is not zeroized).
    let mut key = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE_LEN as usize + 1));
    (&mut file)
        .take(MAX_KEY_FILE_LEN + 1)
        .read_to_end(&mut key)
        .map_err(|source| KeyFileError::Read { path: p(), source })?;
    if key.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(KeyFileError::TooLarge {
            path: p(),
            len: key.len() as u64,
            max: MAX_KEY_FILE_LEN,
        });
    }
    if key.is_empty() {
        return Err(KeyFileError::Empty { path: p() });
    }
    // Give back the spare capacity without leaving a copy: copy into an exact-size zeroizing
    // buffer; the large one is wiped on drop.
    Ok(Zeroizing::new(key.to_vec()))
}

/// Dev mode: makes sure a usable key exists at `path`. An existing file is kept if it passes
/// [`load_key_file`] (and reported if it does not — it is never overwritten). Otherwise a new
/// file is created exclusively with mode 0600, holding 32 random bytes as 64 lowercase hex
/// characters, without a newline.
pub fn generate_key_file(path: &Path) -> Result<(), KeyFileError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => return load_key_file(path).map(drop),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(KeyFileError::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(&mut bytes[..]).map_err(|e| KeyFileError::Entropy(e.to_string()))?;
    let mut hex = Zeroizing::new([0u8; 64]);
    hex::encode_to_slice(&bytes[..], &mut hex[..])
        .map_err(|e| KeyFileError::Entropy(e.to_string()))?;
    let created = OpenOptions::new()
        .write(true)
        .create_new(true) // O_CREAT | O_EXCL: never follows or replaces anything
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path);
    let mut file: File = match created {
        Ok(f) => f,
        // Another process created it first: judge what it made.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return load_key_file(path).map(drop);
        }
        Err(source) => {
            return Err(KeyFileError::Create {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let written = file.write_all(&hex[..]).and_then(|()| file.sync_all());
    if let Err(source) = written {
        // Do not leave an empty or partial key behind for the next start to trip over.
        let _ = std::fs::remove_file(path);
        return Err(KeyFileError::Create {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_key(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn raw_bytes_are_the_key_without_trimming() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_key(dir.path(), "k", b" secret\n", 0o600);
        assert_eq!(&load_key_file(&path).unwrap()[..], b" secret\n");
        let path = write_key(dir.path(), "r", b"\x00\xffbinary", 0o400);
        assert_eq!(&load_key_file(&path).unwrap()[..], b"\x00\xffbinary");
    }

    #[test]
    fn group_or_world_access_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o660, 0o644, 0o610, 0o601] {
            let path = write_key(dir.path(), "k", b"secret", mode);
            let err = load_key_file(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::Permissions { .. }),
                "{mode:o}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("chmod 600") && msg.contains(&*path.to_string_lossy()),
                "{msg}"
            );
        }
    }

    #[test]
    fn symlink_is_refused_even_to_a_good_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = write_key(dir.path(), "real", b"secret", 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = load_key_file(&link).unwrap_err();
        assert!(matches!(err, KeyFileError::Symlink { .. }), "{err}");
    }

    #[test]
    fn directories_fifos_empty_and_huge_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("d");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(
            load_key_file(&sub),
            Err(KeyFileError::NotRegular { .. })
        ));

        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            load_key_file(&fifo),
            Err(KeyFileError::NotRegular { .. })
        ));

        let empty = write_key(dir.path(), "empty", b"", 0o600);
        assert!(matches!(
            load_key_file(&empty),
            Err(KeyFileError::Empty { .. })
        ));

        let big = vec![b'k'; MAX_KEY_FILE_LEN as usize + 1];
        let big = write_key(dir.path(), "big", &big, 0o600);
        assert!(matches!(
            load_key_file(&big),
            Err(KeyFileError::TooLarge { .. })
        ));

        let missing = dir.path().join("missing");
        let err = load_key_file(&missing).unwrap_err();
        assert!(matches!(err, KeyFileError::Open { .. }));
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn file_owned_by_another_user_is_refused() {
        let euid = nix::unistd::geteuid().as_raw();
        let dir = tempfile::tempdir().unwrap();
        let path = write_key(dir.path(), "k", b"secret", 0o600);
        if euid != 0 {
            // Without root the test cannot give a file away; check the root-owned case instead:
            // a file we own is accepted, which is the other half of the rule.
            assert!(load_key_file(&path).is_ok());
            return;
        }
        let other = 4242;
        nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(other)), None).unwrap();
        let err = load_key_file(&path).unwrap_err();
        assert!(
            matches!(err, KeyFileError::Owner { uid: 4242, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chown"), "{err}");
    }

    #[test]
    fn generated_key_is_64_hex_chars_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hmac.key");
        generate_key_file(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let key = load_key_file(&path).unwrap();
        assert_eq!(key.len(), 64);
        assert!(key
            .iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        // A second call keeps the existing key.
        generate_key_file(&path).unwrap();
        assert_eq!(load_key_file(&path).unwrap(), key);
        // Two generated keys differ.
        let other = dir.path().join("other.key");
        generate_key_file(&other).unwrap();
        assert_ne!(load_key_file(&other).unwrap(), key);
    }

    #[test]
    fn generate_refuses_to_reuse_or_replace_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let loose = write_key(dir.path(), "loose", b"secret", 0o644);
        assert!(matches!(
            generate_key_file(&loose),
            Err(KeyFileError::Permissions { .. })
        ));
        assert_eq!(std::fs::read(&loose).unwrap(), b"secret");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        assert!(generate_key_file(&link).is_err());
        assert!(
            !dir.path().join("nowhere").exists(),
            "followed a dangling symlink"
        );
    }
}
