//! The local socket: created with its final owner, group and mode before anyone can reach it.
//!
//! `bind(2)` creates the socket file with the process umask, and there is no `fchmod` for a
//! socket's inode before it exists. So the socket is bound under a temporary name in the same
//! directory while the umask (set to 077 at start, see `hygiene`) keeps it owner-only, given its
//! owner, group and mode, and only then renamed onto the configured path. `rename(2)` is atomic:
//! a client sees no socket, or the finished one — never a more open one.

use crate::config::SocketSection;
use nix::unistd::{Gid, Group, Uid, User};
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "another warden is already serving {0} (stop it first, or choose another socket.path)"
    )]
    InUse(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    #[error("socket owner `{0}` is not a known user or uid")]
    UnknownUser(String),
    #[error("socket group `{0}` is not a known group or gid")]
    UnknownGroup(String),
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: String,
        error: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ListenError + 'a {
    move |error| ListenError::Io {
        what,
        path: path.display().to_string(),
        error,
    }
}

/// Binds the configured socket. A stale socket (nothing accepts on it) is replaced; a live one
/// means another daemon runs, and is refused.
pub fn bind(cfg: &SocketSection) -> Result<std::os::unix::net::UnixListener, ListenError> {
    let path = cfg.path.as_path();
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err("cannot create directory", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err("cannot set mode of", dir))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse(path.display().to_string()));
            }
            // Stale: the rename below replaces it atomically.
        }
        Ok(_) => return Err(ListenError::NotASocket(path.display().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect", path)(e)),
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("warden.sock"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener =
        std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err("cannot bind", &tmp))?;
    let finish = || -> Result<(), ListenError> {
        apply_socket_permissions(&tmp, cfg)?;
        std::fs::rename(&tmp, path).map_err(io_err("cannot move socket into place at", path))
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    listener
        .set_nonblocking(true)
        .map_err(io_err("cannot configure", path))?;
    Ok(listener)
}

/// Sets owner, group, then mode — in that order, so that the mode's group bits only ever apply
/// to the configured group. Also used by a reload on the live socket.
pub fn apply_socket_permissions(path: &Path, cfg: &SocketSection) -> Result<(), ListenError> {
    let uid = match &cfg.owner {
        Some(o) => Some(resolve_user(o)?),
        None => None,
    };
    let gid = match &cfg.group {
        Some(g) => Some(resolve_group(g)?),
        None => None,
    };
    if uid.is_some() || gid.is_some() {
        nix::unistd::chown(path, uid, gid)
            .map_err(|e| io_err("cannot chown", path)(io::Error::from(e)))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.mode.0))
        .map_err(io_err("cannot chmod", path))
}

pub fn resolve_user(s: &str) -> Result<Uid, ListenError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(Uid::from_raw(n));
    }
    match User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid),
        _ => Err(ListenError::UnknownUser(s.to_string())),
    }
}

pub fn resolve_group(s: &str) -> Result<Gid, ListenError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid),
        _ => Err(ListenError::UnknownGroup(s.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn section(path: &Path, mode: u32) -> SocketSection {
        SocketSection {
            path: path.to_path_buf(),
            mode: Mode(mode),
            owner: None,
            group: Some("0".into()),
        }
    }

    #[test]
    fn socket_is_created_with_the_configured_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.sock");
        let _l = bind(&section(&p, 0o640)).unwrap();
        let md = std::fs::symlink_metadata(&p).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o777, 0o640);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn live_socket_is_refused_and_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.sock");
        let live = bind(&section(&p, 0o600)).unwrap();
        assert!(matches!(
            bind(&section(&p, 0o600)),
            Err(ListenError::InUse(_))
        ));
        drop(live); // the file stays, nobody accepts: stale
        assert!(p.exists());
        let _again = bind(&section(&p, 0o600)).unwrap();
    }

    #[test]
    fn a_regular_file_in_the_way_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.sock");
        std::fs::write(&p, b"data").unwrap();
        assert!(matches!(
            bind(&section(&p, 0o600)),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
    }
}
