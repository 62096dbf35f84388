//! Attestation against real processes: this one, and children started from the test binary
//! itself (see [`helper_process`]) that connect to a socket the test listens on.

use super::super::exe::SETTLE;
use super::super::Transport;
use super::*;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::unistd::{getgid, getgroups, getuid};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const HELPER_ENV: &str = "WARDEN_IDENTITY_TEST_HELPER";
const NOBODY: u32 = 65534;

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).unwrap()))
}

/// Waits until the file's ctime is older than the cache's settle time, so its hash is cached.
fn wait_until_settled(path: &Path) {
    let ctime = fs::metadata(path).unwrap().ctime();
    let ctime = SystemTime::UNIX_EPOCH + Duration::from_secs(ctime as u64 + 1);
    if let Ok(wait) = ctime.duration_since(SystemTime::now()) {
        std::thread::sleep(wait + SETTLE);
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `sleep` as the kernel will name it after exec: the PATH entry, symlinks resolved.
fn sleep_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap();
    std::env::split_paths(&path)
        .map(|d| d.join("sleep"))
        .find(|p| p.is_file())
        .map(|p| fs::canonicalize(p).unwrap())
        .expect("sleep in PATH")
}

/// A child process started from this test binary, connected to `listener`.
struct Helper {
    child: Child,
    conn: UnixStream,
    _dir: tempfile::TempDir,
}

impl Helper {
    fn spawn(mode: &str, uid: Option<u32>) -> Helper {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.path().join("peer.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o777)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (_, test_path) = module_path!().split_once("::").unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--ignored", "--exact", "--test-threads=1", "--quiet"])
            .arg(format!("{test_path}::helper_process"))
            .env(HELPER_ENV, format!("{mode}:{}", sock.display()))
            .stdout(Stdio::null());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("helper exited before connecting: {status}");
                    }
                    assert!(Instant::now() < deadline, "helper never connected");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        Helper {
            child,
            conn,
            _dir: dir,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test: the peer process the tests above start, selected by `WARDEN_IDENTITY_TEST_HELPER`
/// = `<mode>:<socket path>`. It connects to the socket, then `exit`s at once or `exec-sleep`s
/// (keeping the connection open, so the peer becomes `sleep`).
#[test]
#[ignore = "not a test: the peer process the attestation tests start"]
fn helper_process() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let (mode, path) = spec.split_once(':').expect("<mode>:<path>");
    let stream = UnixStream::connect(path).expect("connect to the test's socket");
    match mode {
        "exit" => std::process::exit(0),
        "exec-sleep" => {
            fcntl(&stream, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
            let err = Command::new("sleep").arg("60").exec();
            panic!("exec sleep: {err}");
        }
        other => panic!("unknown helper mode {other}"),
    }
}

#[test]
fn socketpair_peer_is_this_process_with_its_executable_hash_groups_and_parents() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let me = std::env::current_exe().unwrap();
    let p = Attestor::new().attest_unix(ours.as_fd()).unwrap();

    assert_eq!(p.uid, getuid().as_raw());
    assert_eq!(p.gid, getgid().as_raw());
    assert_eq!(p.pid, Some(std::process::id() as i32));
    assert_eq!(p.exe.as_deref(), Some(me.as_path()));
    assert!(!p.exe_deleted);
    assert_eq!(p.exe_sha256, Some(sha256_file(&me)));
    assert_eq!(p.transport, Transport::Unix);
    assert!(p.cert.is_none());

    let mut kernel_groups: Vec<u32> = getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
    let mut groups = p.groups.clone();
    kernel_groups.sort_unstable();
    groups.sort_unstable();
    assert_eq!(groups, kernel_groups);
    let user = User::from_uid(getuid()).unwrap().map(|u| u.name);
    assert_eq!(p.user, user);
    let group = Group::from_gid(getgid()).unwrap().map(|g| g.name);
    assert_eq!(p.group_names.first().cloned(), group);

    assert_eq!(
        p.parents.first().map(|pp| pp.pid),
        Some(std::os::unix::process::parent_id() as i32)
    );
    assert!(p.parents.len() <= MAX_PARENTS);
    if p.parents.len() < MAX_PARENTS {
        assert_eq!(
            p.parents.last().map(|pp| pp.pid),
            Some(1),
            "{:?}",
            p.parents
        );
    }
    let cgroup = procfs::parse_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap());
    assert_eq!(p.cgroup, cgroup);
}

#[test]
fn the_executable_is_hashed_once_then_served_from_the_cache() {
    let me = std::env::current_exe().unwrap();
    wait_until_settled(&me);
    let attestor = Attestor::new();
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let first = attestor.attest_unix(ours.as_fd()).unwrap();
    let second = attestor.attest_unix(ours.as_fd()).unwrap();
    assert_eq!(attestor.exe_hashes_computed(), 1);
    assert_eq!(first.exe_sha256, second.exe_sha256);
    assert_eq!(first.exe_sha256, Some(sha256_file(&me)));
}

#[test]
fn without_a_pidfd_the_start_time_and_owner_are_checked() {
    let attestor = Attestor::new();
    let (uid, gid) = (getuid().as_raw(), getgid().as_raw());
    let pid = std::process::id() as i32;
    let p = attestor.attest_process(pid, uid, gid, None, None).unwrap();
    assert_eq!(p.pid, Some(pid));
    assert_eq!(p.exe, Some(std::env::current_exe().unwrap()));
    // A pid whose process belongs to another user cannot be the peer the kernel named.
    let err = attestor
        .attest_process(pid, uid + 12345, gid, None, None)
        .unwrap_err();
    assert!(matches!(err, IdentityError::PeerGone { .. }), "{err}");
}

#[test]
fn a_child_running_as_nobody_is_identified_by_its_uid_and_executable() {
    let sleep = sleep_binary();
    let helper = Helper::spawn("exec-sleep", Some(NOBODY));
    let exe_link = format!("/proc/{}/exe", helper.pid());
    wait_for("the helper to exec sleep", || {
        fs::read_link(&exe_link).ok().as_deref() == Some(sleep.as_path())
    });

    let p = Attestor::new().attest_unix(helper.conn.as_fd()).unwrap();
    assert_eq!((p.uid, p.gid), (NOBODY, NOBODY));
    assert_eq!(p.pid, Some(helper.pid()));
    assert_eq!(p.exe.as_deref(), Some(sleep.as_path()));
    assert_eq!(p.exe_sha256, Some(sha256_file(&sleep)));
    assert!(p.groups.is_empty(), "{:?}", p.groups);
    let nobody = User::from_uid(Uid::from_raw(NOBODY))
        .unwrap()
        .map(|u| u.name);
    assert_eq!(p.user, nobody);
    let parent = p.parents.first().unwrap();
    assert_eq!(parent.pid, std::process::id() as i32);
    assert_eq!(parent.exe, Some(std::env::current_exe().unwrap()));
}

#[test]
fn a_peer_that_exited_and_was_reaped_is_peer_gone() {
    let mut helper = Helper::spawn("exit", None);
    helper.child.wait().unwrap();
    let err = Attestor::new()
        .attest_unix(helper.conn.as_fd())
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::PeerGone { pid } if pid == helper.pid()),
        "{err}"
    );
}

#[test]
fn a_peer_that_exited_but_is_not_reaped_yet_is_peer_gone() {
    let helper = Helper::spawn("exit", None);
    let stat = format!("/proc/{}/stat", helper.pid());
    wait_for("the helper to become a zombie", || {
        fs::read_to_string(&stat)
            .ok()
            .and_then(|t| procfs::parse_stat(&t))
            .is_some_and(|s| s.exited())
    });
    let attestor = Attestor::new();
    let err = attestor.attest_unix(helper.conn.as_fd()).unwrap_err();
    assert!(matches!(err, IdentityError::PeerGone { .. }), "{err}");
    let err = attestor
        .attest_process(helper.pid(), 0, 0, None, None)
        .unwrap_err();
    assert!(matches!(err, IdentityError::PeerGone { .. }), "{err}");
}

#[test]
fn attest_pid_identifies_a_live_process_and_refuses_an_exited_one() {
    let mut child = Command::new(sleep_binary()).arg("60").spawn().unwrap();
    let pid = child.id() as i32;
    let exe_link = format!("/proc/{pid}/exe");
    wait_for("sleep to start", || {
        fs::read_link(&exe_link).ok() == Some(sleep_binary())
    });
    let attestor = Attestor::new();
    let p = attestor.attest_pid(pid, 0, 0).unwrap();
    assert_eq!(p.exe, Some(sleep_binary()));
    child.kill().unwrap();
    child.wait().unwrap();
    let err = attestor.attest_pid(pid, 0, 0).unwrap_err();
    assert!(matches!(err, IdentityError::PeerGone { .. }), "{err}");
    assert!(matches!(
        attestor.attest_pid(0, 0, 0),
        Err(IdentityError::InvalidPid { pid: 0 })
    ));
}

#[test]
fn a_descriptor_that_is_not_a_socket_is_refused() {
    let file = File::open("/proc/self/stat").unwrap();
    let err = Attestor::new().attest_unix(file.as_fd()).unwrap_err();
    assert!(
        matches!(err, IdentityError::Socket(Errno::ENOTSOCK)),
        "{err}"
    );
}

#[test]
fn deleted_suffix_is_stripped() {
    assert_eq!(
        strip_deleted("/usr/bin/app (deleted)".into()),
        PathBuf::from("/usr/bin/app")
    );
    assert_eq!(
        strip_deleted("/usr/bin/app".into()),
        PathBuf::from("/usr/bin/app")
    );
}

#[test]
fn a_process_running_a_deleted_executable_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sleep-copy");
    fs::copy(sleep_binary(), &copy).unwrap();
    let mut child = Command::new(&copy).arg("60").spawn().unwrap();
    let pid = child.id() as i32;
    let exe_link = format!("/proc/{pid}/exe");
    wait_for("the copy to start", || {
        fs::read_link(&exe_link).ok().as_deref() == Some(copy.as_path())
    });
    fs::remove_file(&copy).unwrap();
    let p = Attestor::new().attest_pid(pid, 0, 0);
    child.kill().unwrap();
    child.wait().unwrap();
    let p = p.unwrap();
    assert_eq!(p.exe.as_deref(), Some(copy.as_path()));
    assert!(p.exe_deleted);
    assert_eq!(p.exe_sha256, Some(sha256_file(&sleep_binary())));
}

#[test]
fn proc_files_are_read_whole_whatever_their_size() {
    // `status` is over a kilobyte, `stat` a few hundred bytes; a 5 KiB `environ` needs more
    // than the first buffer.
    for name in ["stat", "status", "cgroup"] {
        let path = PathBuf::from(format!("/proc/self/{name}"));
        let got = read_proc(&path).unwrap();
        assert!(got.ends_with('\n'), "{name}: {got:?}");
        assert_eq!(
            got.lines().count(),
            fs::read_to_string(&path).unwrap().lines().count()
        );
    }
    // More than the first buffer holds.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    let text = "0123456789abcde\n".repeat(1000);
    fs::write(&big, &text).unwrap();
    assert_eq!(read_proc(&big).unwrap(), text);
}
