//! File operations that a symlink cannot redirect.
//!
//! Validation ([`super::validate::validate_path`]) refuses symlinks with `lstat`, but a directory
//! could be swapped for a symlink an instant later. So every operation here starts again from
//! `/` and opens each directory with `openat(…, O_DIRECTORY | O_NOFOLLOW)` relative to the
//! previous one: a symlink in any component makes the open fail (`ELOOP`), whenever it appeared.
//! The last component is then handled relative to that directory descriptor:
//!
//! - a write creates a temporary file in the directory (`O_CREAT | O_EXCL | O_NOFOLLOW`), writes,
//!   sets owner and mode on the descriptor, fsyncs, `renameat`s it over the target and fsyncs the
//!   directory. A symlink (or a hard link) at the target is *replaced*, never written through.
//! - `chmod` opens the target with `O_PATH | O_NOFOLLOW`, checks what it opened with `fstat`
//!   (refusing symlinks, and regular files with more than one hard link, which could be
//!   `/etc/shadow` under another name), and changes that very inode through `/proc/self/fd`.
//!   Recursion opens subdirectories through the same descriptors and never follows a symlink.
//! - `delete` uses `unlinkat`, which never follows a symlink at the last component.

use super::validate::SafePath;
use super::{codes, CommandError};
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag, AT_FDCWD};
use nix::sys::stat::{
    fchmod, fchmodat, fstat, fstatat, mkdirat, FchmodatFlags, FileStat, Mode, SFlag,
};
use nix::unistd::{fchown, fsync, unlinkat, Gid, Uid, UnlinkatFlags};
use serde::Serialize;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;

/// Default mode of a new file when none is given.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Default mode of a new directory when none is given.
pub const DEFAULT_DIR_MODE: u32 = 0o755;
/// How deep a recursive `chmod` descends.
const MAX_DEPTH: usize = 128;
/// How many skipped entries a recursive `chmod` lists.
const MAX_SKIPPED_LISTED: usize = 100;

/// Owner and group to set; `None` leaves that one alone (or preserves it on replacement).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<Uid>,
    pub gid: Option<Gid>,
}

fn os_error(what: &str, path: &str, e: Errno) -> CommandError {
    let code = match e {
        Errno::ENOENT => codes::NOT_FOUND,
        _ => codes::EXECUTION_ERROR,
    };
    CommandError::new(code, format!("{what} `{path}`: {}", e.desc()))
}

/// Maps a failed `openat(O_DIRECTORY | O_NOFOLLOW)` of `name` in `parent`. Linux reports a
/// symlink there as `ELOOP` or `ENOTDIR` depending on the flags, so look at what is there.
fn component_error_at(parent: &OwnedFd, name: &str, prefix: &str, e: Errno) -> CommandError {
    if matches!(e, Errno::ELOOP | Errno::ENOTDIR) {
        if let Ok(Some(st)) = stat_nofollow(parent.as_fd(), name) {
            if file_type(&st) == SFlag::S_IFLNK {
                return component_error(prefix, Errno::ELOOP);
            }
        }
    }
    component_error(prefix, e)
}

/// Maps a failed `openat(O_DIRECTORY | O_NOFOLLOW)` of a path component.
fn component_error(prefix: &str, e: Errno) -> CommandError {
    match e {
        Errno::ELOOP => CommandError::validation(format!(
            "`{prefix}` is a symbolic link; symlinks are not followed"
        )),
        Errno::ENOTDIR => CommandError::validation(format!("`{prefix}` is not a directory")),
        Errno::ENOENT => CommandError::not_found(format!("`{prefix}` does not exist")),
        e => os_error("cannot open directory", prefix, e),
    }
}

fn dir_flags() -> OFlag {
    OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC
}

fn open_root() -> Result<OwnedFd, CommandError> {
    nix::fcntl::open(
        "/",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| os_error("cannot open directory", "/", e))
}

/// The components of a [`SafePath`], split into the parent's and the last one.
fn split(path: &SafePath) -> (Vec<&str>, &str) {
    let mut comps: Vec<&str> = path.components().collect();
    let last = comps.pop().unwrap_or("");
    (comps, last)
}

fn prefix_of(comps: &[&str], upto: usize) -> String {
    let mut s = String::new();
    for c in &comps[..=upto] {
        s.push('/');
        s.push_str(c);
    }
    s
}

/// Opens the directory made of `comps` (from `/`), one `openat(O_NOFOLLOW)` per component.
pub fn open_dir_nofollow(comps: &[&str]) -> Result<OwnedFd, CommandError> {
    walk(comps, None).map(|(fd, _)| fd)
}

/// How [`walk`] creates missing directories.
#[derive(Debug, Clone, Copy)]
struct DirCreate {
    mode: u32,
    own: Ownership,
}

/// Opens `name` in `parent` as a directory without following a symlink; with `create`, makes it
/// first if it is missing (mode set explicitly, not subject to the umask). Returns whether this
/// call created it.
fn open_or_make(
    parent: &OwnedFd,
    name: &str,
    display: &str,
    create: Option<DirCreate>,
) -> Result<(OwnedFd, bool), CommandError> {
    match openat(parent, name, dir_flags(), Mode::empty()) {
        Ok(fd) => Ok((fd, false)),
        Err(Errno::ENOENT) if create.is_some() => {
            let made = match mkdirat(parent, name, Mode::from_bits_truncate(0o700)) {
                Ok(()) => true,
                Err(Errno::EEXIST) => false, // created concurrently: open whatever is there
                Err(e) => return Err(os_error("cannot create directory", display, e)),
            };
            let fd = openat(parent, name, dir_flags(), Mode::empty())
                .map_err(|e| component_error_at(parent, name, display, e))?;
            if made {
                if let Some(c) = create {
                    set_owner_mode(&fd, display, c.own, Some(c.mode))?;
                }
                fsync(parent).map_err(|e| os_error("cannot fsync the directory of", display, e))?;
            }
            Ok((fd, made))
        }
        Err(e) => Err(component_error_at(parent, name, display, e)),
    }
}

fn set_owner_mode(
    fd: &OwnedFd,
    display: &str,
    own: Ownership,
    mode: Option<u32>,
) -> Result<(), CommandError> {
    if own.uid.is_some() || own.gid.is_some() {
        fchown(fd.as_fd(), own.uid, own.gid)
            .map_err(|e| os_error("cannot set the owner of", display, e))?;
    }
    // After fchown, which clears setuid/setgid bits.
    if let Some(m) = mode {
        fchmod(fd.as_fd(), mode_of(m))
            .map_err(|e| os_error("cannot set the mode of", display, e))?;
    }
    Ok(())
}

/// Walks `comps` from `/`, opening (and with `create`, making) each directory. Returns the last
/// directory and the directories created, outermost first.
fn walk(comps: &[&str], create: Option<DirCreate>) -> Result<(OwnedFd, Vec<String>), CommandError> {
    // SafePath already guarantees this; checked again because O_NOFOLLOW does not stop `..`.
    if let Some(bad) = comps
        .iter()
        .find(|c| c.is_empty() || **c == "." || **c == ".." || c.contains('/'))
    {
        return Err(CommandError::internal(format!(
            "path component `{}` reached the file layer",
            super::validate::shown(bad)
        )));
    }
    let mut fd = open_root()?;
    let mut created = Vec::new();
    for (i, comp) in comps.iter().enumerate() {
        let here = prefix_of(comps, i);
        let (next, made) = open_or_make(&fd, comp, &here, create)?;
        if made {
            created.push(here);
        }
        fd = next;
    }
    Ok((fd, created))
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn stat_nofollow(dir: BorrowedFd<'_>, name: &str) -> Result<Option<FileStat>, Errno> {
    match fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn mode_of(m: u32) -> Mode {
    Mode::from_bits_truncate(m & 0o7777)
}

/// What [`write_atomic`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteOutcome {
    pub path: String,
    pub bytes_written: usize,
    /// Whether an existing entry (file or symlink) was replaced.
    pub replaced: bool,
    pub mode: String,
}

/// Writes `content` to `path` atomically. `mode` defaults to the mode of the file being replaced
/// (permission bits only) or [`DEFAULT_FILE_MODE`]; owner and group default to those of the file
/// being replaced, or are left as created (the daemon's). With `create_parents`, missing parent
/// directories are created ([`DEFAULT_DIR_MODE`], the daemon's owner), as Lumo does.
pub fn write_atomic(
    path: &SafePath,
    content: &[u8],
    mode: Option<u32>,
    own: Ownership,
    create_parents: bool,
) -> Result<WriteOutcome, CommandError> {
    let (parent, name) = split(path);
    let create = create_parents.then_some(DirCreate {
        mode: DEFAULT_DIR_MODE,
        own: Ownership::default(),
    });
    let (dir, _) = walk(&parent, create)?;
    let existing = stat_nofollow(dir.as_fd(), name)
        .map_err(|e| os_error("cannot inspect", path.as_str(), e))?;
    let mut keep: Option<&FileStat> = None;
    if let Some(st) = &existing {
        let t = file_type(st);
        if t == SFlag::S_IFDIR {
            return Err(CommandError::validation(format!("`{path}` is a directory")));
        } else if t == SFlag::S_IFREG {
            keep = Some(st);
        } else if t != SFlag::S_IFLNK {
            return Err(CommandError::validation(format!(
                "`{path}` exists and is not a regular file"
            )));
        }
    }
    let mode = mode.unwrap_or_else(|| keep.map_or(DEFAULT_FILE_MODE, |st| st.st_mode & 0o777));
    let uid = own.uid.or_else(|| keep.map(|st| Uid::from_raw(st.st_uid)));
    let gid = own.gid.or_else(|| keep.map(|st| Gid::from_raw(st.st_gid)));

    let tmp_name = format!(".warden-{:016x}.tmp", rand::random::<u64>());
    let tmp = openat(
        &dir,
        tmp_name.as_str(),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| os_error("cannot create a temporary file next to", path.as_str(), e))?;

    let result = (|| {
        let mut f = std::fs::File::from(tmp);
        f.write_all(content).map_err(|e| {
            CommandError::execution(format!("writing `{path}` failed: {}", e.kind()))
        })?;
        if uid.is_some() || gid.is_some() {
            fchown(f.as_fd(), uid, gid)
                .map_err(|e| os_error("cannot set the owner of", path.as_str(), e))?;
        }
        // After fchown, which clears setuid/setgid bits.
        fchmod(f.as_fd(), mode_of(mode))
            .map_err(|e| os_error("cannot set the mode of", path.as_str(), e))?;
        fsync(f.as_fd()).map_err(|e| os_error("cannot fsync", path.as_str(), e))?;
        drop(f);
        renameat(&dir, tmp_name.as_str(), &dir, name)
            .map_err(|e| os_error("cannot rename onto", path.as_str(), e))
    })();
    if let Err(e) = result {
        let _ = unlinkat(&dir, tmp_name.as_str(), UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    fsync(&dir).map_err(|e| os_error("cannot fsync the directory of", path.as_str(), e))?;
    Ok(WriteOutcome {
        path: path.to_string(),
        bytes_written: content.len(),
        replaced: existing.is_some(),
        mode: format!("{mode:04o}"),
    })
}

/// What [`mkdir`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MkdirOutcome {
    pub path: String,
    /// Directories this call created, outermost first.
    pub created: Vec<String>,
}

/// Creates the directory `path`, and with `recursive` its missing parents, each with `mkdirat`
/// relative to its opened parent. Directories created get `mode` (default
/// [`DEFAULT_DIR_MODE`], not subject to the umask) and `own`. An existing final directory is not
/// an error; it gets `mode` and `own` if they are given.
pub fn mkdir(
    path: &SafePath,
    mode: Option<u32>,
    own: Ownership,
    recursive: bool,
) -> Result<MkdirOutcome, CommandError> {
    let (parent, name) = split(path);
    let create = DirCreate {
        mode: mode.unwrap_or(DEFAULT_DIR_MODE),
        own,
    };
    let (dir, mut created) = walk(&parent, recursive.then_some(create)).map_err(|e| {
        if e.code == codes::NOT_FOUND {
            CommandError::not_found(format!(
                "{} (set `recursive` to create missing parents)",
                e.message
            ))
        } else {
            e
        }
    })?;
    match stat_nofollow(dir.as_fd(), name) {
        Ok(Some(st)) if file_type(&st) == SFlag::S_IFLNK => {
            return Err(CommandError::validation(format!(
                "`{path}` is a symbolic link; symlinks are not followed"
            )))
        }
        Ok(Some(st)) if file_type(&st) != SFlag::S_IFDIR => {
            return Err(CommandError::new(
                codes::FILE_EXISTS,
                format!("`{path}` exists and is not a directory"),
            ))
        }
        Ok(_) => {}
        Err(e) => return Err(os_error("cannot inspect", path.as_str(), e)),
    }
    let (fd, made) = open_or_make(&dir, name, path.as_str(), Some(create))?;
    if made {
        created.push(path.to_string());
    } else if mode.is_some() || own != Ownership::default() {
        set_owner_mode(&fd, path.as_str(), own, mode)?;
    }
    Ok(MkdirOutcome {
        path: path.to_string(),
        created,
    })
}

/// What [`delete`] removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeleteOutcome {
    pub path: String,
    /// `file`, `symlink`, `directory` or `other`.
    pub kind: &'static str,
}

/// Removes `path` with `unlinkat`. A symlink is removed itself, never followed. A directory is
/// refused unless `allow_dir`, and then only if empty.
pub fn delete(path: &SafePath, allow_dir: bool) -> Result<DeleteOutcome, CommandError> {
    let (parent, name) = split(path);
    let dir = open_dir_nofollow(&parent)?;
    let st = stat_nofollow(dir.as_fd(), name)
        .map_err(|e| os_error("cannot inspect", path.as_str(), e))?
        .ok_or_else(|| CommandError::not_found(format!("`{path}` does not exist")))?;
    let t = file_type(&st);
    let (kind, flag) = if t == SFlag::S_IFDIR {
        if !allow_dir {
            return Err(CommandError::validation(format!(
                "`{path}` is a directory; directories are not deleted"
            )));
        }
        ("directory", UnlinkatFlags::RemoveDir)
    } else if t == SFlag::S_IFREG {
        ("file", UnlinkatFlags::NoRemoveDir)
    } else if t == SFlag::S_IFLNK {
        ("symlink", UnlinkatFlags::NoRemoveDir)
    } else {
        ("other", UnlinkatFlags::NoRemoveDir)
    };
    // If the entry was swapped between fstatat and here, unlinkat still acts on the entry
    // itself: a directory fails with EISDIR, a symlink is removed, nothing is followed.
    unlinkat(&dir, name, flag).map_err(|e| match e {
        Errno::ENOTEMPTY | Errno::EEXIST => {
            CommandError::validation(format!("directory `{path}` is not empty"))
        }
        Errno::EISDIR => CommandError::validation(format!(
            "`{path}` is a directory; directories are not deleted"
        )),
        e => os_error("cannot delete", path.as_str(), e),
    })?;
    fsync(&dir).map_err(|e| os_error("cannot fsync the directory of", path.as_str(), e))?;
    Ok(DeleteOutcome {
        path: path.to_string(),
        kind,
    })
}

/// What [`chmod`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChmodOutcome {
    pub path: String,
    pub mode: String,
    /// Files and directories whose mode was set.
    pub changed: usize,
    /// Entries a recursive change left alone: symlinks, special files, files with several hard
    /// links (at most the first hundred are listed).
    pub skipped: Vec<String>,
}

/// Changes the mode of the inode behind an `O_PATH` descriptor, through `/proc/self/fd`: the
/// kernel resolves that magic link to the very inode the descriptor holds.
fn chmod_opath(fd: &OwnedFd, mode: u32) -> Result<(), Errno> {
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    fchmodat(
        AT_FDCWD,
        proc_path.as_str(),
        mode_of(mode),
        FchmodatFlags::FollowSymlink,
    )
}

enum Entry {
    Changed(Option<OwnedFd>),
    Skipped(&'static str),
}

/// Opens `name` in `dir` without following it, checks what it is and sets its mode. Returns a
/// readable directory descriptor when it is a directory (for recursion).
fn chmod_entry(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
    mode: u32,
    display: &str,
) -> Result<Entry, CommandError> {
    let fd = openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| os_error("cannot open", display, e))?;
    let st = fstat(&fd).map_err(|e| os_error("cannot inspect", display, e))?;
    let t = file_type(&st);
    if t == SFlag::S_IFLNK {
        return Ok(Entry::Skipped("symbolic link"));
    }
    if t == SFlag::S_IFREG && st.st_nlink > 1 {
        return Ok(Entry::Skipped("regular file with several hard links"));
    }
    if t != SFlag::S_IFREG && t != SFlag::S_IFDIR {
        return Ok(Entry::Skipped("special file"));
    }
    chmod_opath(&fd, mode).map_err(|e| os_error("cannot set the mode of", display, e))?;
    if t == SFlag::S_IFDIR {
        let d = openat(
            &fd,
            ".",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| os_error("cannot open directory", display, e))?;
        return Ok(Entry::Changed(Some(d)));
    }
    Ok(Entry::Changed(None))
}

fn chmod_tree(
    dir: OwnedFd,
    display: &str,
    mode: u32,
    depth: usize,
    out: &mut ChmodOutcome,
) -> Result<(), CommandError> {
    if depth > MAX_DEPTH {
        return Err(CommandError::validation(format!(
            "`{display}` is nested more than {MAX_DEPTH} levels deep"
        )));
    }
    // The listing is read through /proc/self/fd, which names the opened directory itself.
    let listing = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut names: Vec<CString> = Vec::new();
    let entries = std::fs::read_dir(&listing)
        .map_err(|e| CommandError::execution(format!("cannot read `{display}`: {}", e.kind())))?;
    for entry in entries {
        let entry = entry.map_err(|e| {
            CommandError::execution(format!("cannot read `{display}`: {}", e.kind()))
        })?;
        let name = CString::new(entry.file_name().into_vec())
            .map_err(|_| CommandError::internal("directory entry with a NUL byte"))?;
        names.push(name);
    }
    for name in names {
        let child = format!("{display}/{}", name.to_string_lossy());
        match chmod_entry(dir.as_fd(), &name, mode, &child)? {
            Entry::Changed(sub) => {
                out.changed += 1;
                if let Some(sub) = sub {
                    chmod_tree(sub, &child, mode, depth + 1, out)?;
                }
            }
            Entry::Skipped(_) => {
                if out.skipped.len() < MAX_SKIPPED_LISTED {
                    out.skipped.push(child);
                }
            }
        }
    }
    Ok(())
}

/// Sets the mode of `path` (and with `recursive`, of every file and directory below it, without
/// following symlinks). The target itself must not be a symlink, a special file, or a regular
/// file with more than one hard link.
pub fn chmod(path: &SafePath, mode: u32, recursive: bool) -> Result<ChmodOutcome, CommandError> {
    let (parent, name) = split(path);
    let dir = open_dir_nofollow(&parent)?;
    let cname =
        CString::new(name).map_err(|_| CommandError::validation("path contains a NUL byte"))?;
    let mut out = ChmodOutcome {
        path: path.to_string(),
        mode: format!("{mode:04o}"),
        changed: 0,
        skipped: Vec::new(),
    };
    match chmod_entry(dir.as_fd(), &cname, mode, path.as_str())? {
        Entry::Skipped(why) => Err(CommandError::validation(format!(
            "`{path}` is a {why}; its mode is not changed"
        ))),
        Entry::Changed(sub) => {
            out.changed = 1;
            if let (true, Some(sub)) = (recursive, sub) {
                chmod_tree(sub, path.as_str(), mode, 1, &mut out)?;
            }
            Ok(out)
        }
    }
}

/// Reads the regular file `path` (at most `max` bytes), opened with `O_NOFOLLOW` relative to its
/// parent, itself opened component by component: a symlink anywhere is refused.
pub fn read_regular(path: &SafePath, max: usize) -> Result<Vec<u8>, CommandError> {
    use std::io::Read;
    let (parent, name) = split(path);
    let dir = open_dir_nofollow(&parent)?;
    let fd = openat(
        &dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP => CommandError::validation(format!(
            "`{path}` is a symbolic link; symlinks are not followed"
        )),
        e => os_error("cannot open", path.as_str(), e),
    })?;
    let st = fstat(&fd).map_err(|e| os_error("cannot inspect", path.as_str(), e))?;
    if file_type(&st) != SFlag::S_IFREG {
        return Err(CommandError::validation(format!(
            "`{path}` is not a regular file"
        )));
    }
    let mut buf = Vec::new();
    std::fs::File::from(fd)
        .take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| CommandError::execution(format!("reading `{path}` failed: {}", e.kind())))?;
    if buf.len() > max {
        return Err(CommandError::validation(format!(
            "`{path}` is larger than {max} bytes"
        )));
    }
    Ok(buf)
}

/// What is at `path`, without following a symlink there: `None` if nothing.
pub fn kind_of(path: &SafePath) -> Result<Option<&'static str>, CommandError> {
    let (parent, name) = split(path);
    let dir = open_dir_nofollow(&parent)?;
    let st = stat_nofollow(dir.as_fd(), name)
        .map_err(|e| os_error("cannot inspect", path.as_str(), e))?;
    Ok(st.map(|st| match file_type(&st) {
        SFlag::S_IFREG => "file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symlink",
        _ => "other",
    }))
}

/// Creates the symlink `path` → `target` with `symlinkat` in its opened parent. Returns `false`
/// when exactly that link is already there; anything else at `path` is `FILE_EXISTS`.
pub fn symlink(path: &SafePath, target: &SafePath) -> Result<bool, CommandError> {
    let (parent, name) = split(path);
    let dir = open_dir_nofollow(&parent)?;
    match stat_nofollow(dir.as_fd(), name)
        .map_err(|e| os_error("cannot inspect", path.as_str(), e))?
    {
        None => {}
        Some(st) if file_type(&st) == SFlag::S_IFLNK => {
            let current = nix::fcntl::readlinkat(&dir, name)
                .map_err(|e| os_error("cannot read the link", path.as_str(), e))?;
            if current.as_encoded_bytes() == target.as_str().as_bytes() {
                return Ok(false);
            }
            return Err(CommandError::new(
                codes::FILE_EXISTS,
                format!("`{path}` already links elsewhere"),
            ));
        }
        Some(_) => {
            return Err(CommandError::new(
                codes::FILE_EXISTS,
                format!("`{path}` exists and is not a symbolic link"),
            ))
        }
    }
    nix::unistd::symlinkat(target.as_str(), &dir, name).map_err(|e| match e {
        Errno::EEXIST => CommandError::new(codes::FILE_EXISTS, format!("`{path}` exists")),
        e => os_error("cannot create the link", path.as_str(), e),
    })?;
    fsync(&dir).map_err(|e| os_error("cannot fsync the directory of", path.as_str(), e))?;
    Ok(true)
}

/// Removes the symlink `path` (never what it points to). `false` if nothing is there; anything
/// but a symlink is refused.
pub fn remove_symlink(path: &SafePath) -> Result<bool, CommandError> {
    let (parent, name) = split(path);
    let dir = open_dir_nofollow(&parent)?;
    match stat_nofollow(dir.as_fd(), name)
        .map_err(|e| os_error("cannot inspect", path.as_str(), e))?
    {
        None => return Ok(false),
        Some(st) if file_type(&st) == SFlag::S_IFLNK => {}
        Some(_) => {
            return Err(CommandError::validation(format!(
                "`{path}` is not a symbolic link; it is left alone"
            )))
        }
    }
    unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir)
        .map_err(|e| os_error("cannot remove the link", path.as_str(), e))?;
    fsync(&dir).map_err(|e| os_error("cannot fsync the directory of", path.as_str(), e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::validate::tests_support::unchecked;
    use crate::commands::validate::{validate_path, PathRules};
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::path::Path;

    struct Fixture {
        dir: tempfile::TempDir,
        prefixes: Vec<String>,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let prefixes = vec![format!("{}/", dir.path().display())];
            Fixture { dir, prefixes }
        }
        fn p(&self, rel: &str) -> String {
            format!("{}/{rel}", self.dir.path().display())
        }
        fn safe(&self, rel: &str) -> SafePath {
            validate_path(
                "path",
                &self.p(rel),
                PathRules {
                    prefixes: &self.prefixes,
                    protected: &[],
                },
            )
            .unwrap()
        }
    }

    fn mode(p: &str) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn write_is_atomic_with_mode_and_owner_and_leaves_no_temp_file() {
        let f = Fixture::new();
        fs::create_dir(f.p("d")).unwrap();
        let target = f.safe("d/a.txt");
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let out = write_atomic(
            &target,
            b"hello",
            Some(0o640),
            Ownership {
                uid: Some(nobody.uid),
                gid: Some(Gid::from_raw(0)),
            },
            false,
        )
        .unwrap();
        assert!(!out.replaced);
        assert_eq!(fs::read(f.p("d/a.txt")).unwrap(), b"hello");
        assert_eq!(mode(&f.p("d/a.txt")), 0o640);
        assert_eq!(
            fs::metadata(f.p("d/a.txt")).unwrap().uid(),
            nobody.uid.as_raw()
        );
        // Replacing keeps mode and owner when none is given.
        let out = write_atomic(&target, b"again", None, Ownership::default(), false).unwrap();
        assert!(out.replaced);
        assert_eq!(out.mode, "0640");
        assert_eq!(fs::read(f.p("d/a.txt")).unwrap(), b"again");
        assert_eq!(
            fs::metadata(f.p("d/a.txt")).unwrap().uid(),
            nobody.uid.as_raw()
        );
        let names: Vec<_> = fs::read_dir(f.p("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);
        // New files default to 0644.
        write_atomic(&f.safe("d/b"), b"", None, Ownership::default(), false).unwrap();
        assert_eq!(mode(&f.p("d/b")), 0o644);
    }

    #[test]
    fn write_refuses_a_symlink_swapped_into_a_component_after_validation() {
        let f = Fixture::new();
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir(f.p("d")).unwrap();
        let target = f.safe("d/x.conf");
        // The race: d is replaced by a symlink to a directory outside the allowlist.
        fs::remove_dir(f.p("d")).unwrap();
        symlink(outside.path(), f.p("d")).unwrap();
        let e = write_atomic(&target, b"evil", None, Ownership::default(), true).unwrap_err();
        assert_eq!(e.code, "VALIDATION_ERROR", "{e}");
        assert!(e.message.contains("symbolic link"));
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        // Same for mkdir, delete and chmod.
        assert_eq!(
            mkdir(&unchecked(&f.p("d/sub")), None, Ownership::default(), true)
                .unwrap_err()
                .code,
            "VALIDATION_ERROR"
        );
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn write_replaces_a_symlink_at_the_target_and_never_follows_it() {
        let f = Fixture::new();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"original").unwrap();
        fs::write(f.p("t"), b"old").unwrap();
        let target = f.safe("t");
        fs::remove_file(f.p("t")).unwrap();
        symlink(&victim, f.p("t")).unwrap();
        let out = write_atomic(&target, b"new", None, Ownership::default(), false).unwrap();
        assert!(out.replaced);
        assert_eq!(fs::read(&victim).unwrap(), b"original");
        assert!(fs::symlink_metadata(f.p("t"))
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(fs::read(f.p("t")).unwrap(), b"new");
    }

    #[test]
    fn write_replaces_a_hard_link_instead_of_writing_through_it() {
        let f = Fixture::new();
        let victim = f.p("victim");
        fs::write(&victim, b"original").unwrap();
        fs::hard_link(&victim, f.p("alias")).unwrap();
        write_atomic(&f.safe("alias"), b"new", None, Ownership::default(), false).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"original");
    }

    #[test]
    fn the_directory_walk_refuses_dot_dot_even_from_internal_callers() {
        assert_eq!(
            open_dir_nofollow(&["tmp", ".."]).unwrap_err().code,
            "INTERNAL_ERROR"
        );
        assert_eq!(
            open_dir_nofollow(&["tmp", ""]).unwrap_err().code,
            "INTERNAL_ERROR"
        );
        assert_eq!(
            open_dir_nofollow(&["a/b"]).unwrap_err().code,
            "INTERNAL_ERROR"
        );
        open_dir_nofollow(&["tmp"]).unwrap();
    }

    #[test]
    fn write_refuses_directories_and_missing_parents() {
        let f = Fixture::new();
        fs::create_dir(f.p("d")).unwrap();
        assert_eq!(
            write_atomic(&f.safe("d"), b"x", None, Ownership::default(), false)
                .unwrap_err()
                .code,
            "VALIDATION_ERROR"
        );
        assert_eq!(
            write_atomic(&f.safe("nope/x"), b"x", None, Ownership::default(), false)
                .unwrap_err()
                .code,
            "NOT_FOUND"
        );
        write_atomic(&f.safe("nope/x"), b"x", None, Ownership::default(), true).unwrap();
        assert_eq!(mode(&f.p("nope")), 0o755);
    }

    #[test]
    fn mkdir_creates_each_component_with_mode_and_owner() {
        let f = Fixture::new();
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let own = Ownership {
            uid: Some(nobody.uid),
            gid: None,
        };
        let out = mkdir(&f.safe("a/b/c"), Some(0o750), own, true).unwrap();
        assert_eq!(out.created, vec![f.p("a"), f.p("a/b"), f.p("a/b/c")]);
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&f.p(d)), 0o750);
            assert_eq!(fs::metadata(f.p(d)).unwrap().uid(), nobody.uid.as_raw());
        }
        // Existing: fine, nothing created.
        assert!(mkdir(&f.safe("a/b/c"), None, Ownership::default(), true)
            .unwrap()
            .created
            .is_empty());
        // Default mode ignores the umask.
        mkdir(&f.safe("e"), None, Ownership::default(), false).unwrap();
        assert_eq!(mode(&f.p("e")), 0o755);
        // Non-recursive with a missing parent.
        assert_eq!(
            mkdir(&f.safe("x/y"), None, Ownership::default(), false)
                .unwrap_err()
                .code,
            "NOT_FOUND"
        );
        // A file in the way.
        fs::write(f.p("file"), b"").unwrap();
        assert_eq!(
            mkdir(&f.safe("file"), None, Ownership::default(), false)
                .unwrap_err()
                .code,
            "FILE_EXISTS"
        );
    }

    #[test]
    fn delete_removes_files_and_links_and_refuses_directories_unless_asked() {
        let f = Fixture::new();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("v");
        fs::write(&victim, b"keep").unwrap();
        fs::write(f.p("f"), b"").unwrap();
        symlink(&victim, f.p("l")).unwrap();
        fs::create_dir(f.p("d")).unwrap();
        fs::write(f.p("d/inner"), b"").unwrap();
        assert_eq!(delete(&f.safe("f"), false).unwrap().kind, "file");
        assert!(!Path::new(&f.p("f")).exists());
        let link = unchecked(&f.p("l"));
        assert_eq!(delete(&link, false).unwrap().kind, "symlink");
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(
            delete(&f.safe("d"), false).unwrap_err().code,
            "VALIDATION_ERROR"
        );
        assert_eq!(
            delete(&f.safe("d"), true).unwrap_err().code,
            "VALIDATION_ERROR"
        ); // not empty
        fs::remove_file(f.p("d/inner")).unwrap();
        assert_eq!(delete(&f.safe("d"), true).unwrap().kind, "directory");
        assert_eq!(
            delete(&f.safe("gone"), false).unwrap_err().code,
            "NOT_FOUND"
        );
    }

    #[test]
    fn chmod_refuses_symlinks_and_hard_links_and_recurses_without_following() {
        let f = Fixture::new();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("v");
        fs::write(&victim, b"").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let outside_mode = mode(outside.path().to_str().unwrap());
        fs::create_dir_all(f.p("t/sub")).unwrap();
        fs::write(f.p("t/a"), b"").unwrap();
        fs::write(f.p("t/sub/b"), b"").unwrap();
        symlink(&victim, f.p("t/link")).unwrap();
        symlink(outside.path(), f.p("t/dirlink")).unwrap();
        fs::write(f.p("hl"), b"").unwrap();
        fs::hard_link(f.p("hl"), f.p("hl2")).unwrap();

        let out = chmod(&f.safe("t"), 0o750, true).unwrap();
        assert_eq!(out.changed, 4); // t, t/a, t/sub, t/sub/b
        assert_eq!(out.skipped.len(), 2);
        for p in ["t", "t/a", "t/sub", "t/sub/b"] {
            assert_eq!(mode(&f.p(p)), 0o750, "{p}");
        }
        assert_eq!(mode(victim.to_str().unwrap()), 0o600);
        assert_eq!(mode(outside.path().to_str().unwrap()), outside_mode);

        let non_recursive = chmod(&f.safe("t/sub"), 0o700, false).unwrap();
        assert_eq!(non_recursive.changed, 1);
        assert_eq!(mode(&f.p("t/sub/b")), 0o750);

        let link = unchecked(&f.p("t/link"));
        assert_eq!(
            chmod(&link, 0o777, false).unwrap_err().code,
            "VALIDATION_ERROR"
        );
        assert_eq!(mode(victim.to_str().unwrap()), 0o600);
        let e = chmod(&f.safe("hl"), 0o777, false).unwrap_err();
        assert!(e.message.contains("hard links"), "{e}");
        assert_eq!(
            chmod(&f.safe("missing"), 0o777, false).unwrap_err().code,
            "NOT_FOUND"
        );
    }
}
