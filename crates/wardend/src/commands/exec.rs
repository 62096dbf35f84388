//! The subprocess executor and the [`Plan`] a command describes itself with.
//!
//! Every tool runs from an explicit argv: there is no shell to interpret a parameter. The program
//! is an absolute path or a bare name looked up in [`FIXED_PATH`] (never the daemon's `PATH`); the
//! environment is cleared and holds only that `PATH` plus the variables the command names; the
//! working directory is `/`. Secrets (a database password) reach a tool on stdin, never in argv,
//! where any local user could read them from `/proc`.
//!
//! Each process starts in a process group of its own, so that on timeout the whole group (the
//! tool and whatever it forked) is killed with one `kill(-pgid, SIGKILL)`. Output is captured up
//! to a bound per stream and the rest drained and discarded, so a chatty tool neither blocks on a
//! full pipe nor grows the daemon's memory.

use super::{codes, CommandError};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

/// The only `PATH` a subprocess sees, and the only one bare program names are resolved against.
pub const FIXED_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// After the main process exits, how long to wait for its output pipes to close. A daemon it
/// started may keep them open for ever; we stop reading rather than wait for it.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// Bytes of stderr quoted in an error's details.
const STDERR_EXCERPT: usize = 2048;

/// One subprocess to run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandSpec {
    /// Absolute path, or a bare name resolved against [`FIXED_PATH`].
    pub program: String,
    pub args: Vec<String>,
    /// Variables set in addition to `PATH`. Not for secrets: those go on stdin.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// Bytes written to the tool's stdin, then closed. Never serialized: a plan shows only that
    /// there is input and how long it is.
    #[serde(skip)]
    pub stdin: Option<Zeroizing<Vec<u8>>>,
    /// This command's own timeout, if it needs a different one from the configured default.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_secs")]
    pub timeout: Option<Duration>,
}

fn ser_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

impl CommandSpec {
    pub fn new<I, S>(program: impl Into<String>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        CommandSpec {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            stdin: None,
            timeout: None,
        }
    }
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    pub fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(Zeroizing::new(bytes));
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    /// `[program, args…]` as it would be executed.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

/// One step of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// Run a subprocess.
    Run {
        argv: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        env: Vec<(String, String)>,
        /// Length of the stdin input, if any (its content is never shown).
        #[serde(skip_serializing_if = "Option::is_none")]
        stdin_bytes: Option<usize>,
    },
    /// Write a file atomically (temporary file, fsync, rename, directory fsync), creating
    /// missing parent directories if `create_parents`.
    WriteFile {
        path: String,
        bytes: usize,
        create_parents: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        gid: Option<u32>,
    },
    Mkdir {
        path: String,
        recursive: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        gid: Option<u32>,
    },
    Delete {
        path: String,
    },
    /// Create the symbolic link `path` pointing to `target`.
    Symlink {
        path: String,
        target: String,
    },
    /// Remove the symbolic link `path` (never what it points to).
    Unlink {
        path: String,
    },
    Chmod {
        path: String,
        mode: String,
        recursive: bool,
    },
}

impl From<&CommandSpec> for Step {
    fn from(c: &CommandSpec) -> Self {
        Step::Run {
            argv: c.argv(),
            env: c.env.clone(),
            stdin_bytes: c.stdin.as_ref().map(|s| s.len()),
        }
    }
}

/// What a command would do, in order. `dry_run` returns it instead of executing.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn new(steps: Vec<Step>) -> Self {
        Plan { steps }
    }
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Limits applied to every subprocess (from [`CommandsConfig`](super::CommandsConfig)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecLimits {
    pub timeout: Duration,
    pub max_output_bytes: usize,
}

/// How a subprocess ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// What a subprocess produced. Non-zero exits are returned here, not as errors: the command
/// decides what an exit code means ([`ExecOutput::check`] is the common mapping).
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration: Duration,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }

    /// The first bytes of stderr, lossily decoded: what error details quote.
    pub fn stderr_excerpt(&self) -> String {
        let end = self.stderr.len().min(STDERR_EXCERPT);
        String::from_utf8_lossy(&self.stderr[..end]).into_owned()
    }

    /// `Ok(self)` on exit 0; otherwise `EXECUTION_ERROR` with the exit status and a bounded,
    /// lossily decoded excerpt of stderr in the details (never in the message).
    pub fn check(self, what: &str) -> Result<ExecOutput, CommandError> {
        if self.success() {
            return Ok(self);
        }
        let excerpt = self.stderr_excerpt();
        let status = match self.exit {
            Exit::Code(c) => format!("exited with status {c}"),
            Exit::Signal(s) => format!("was killed by signal {s}"),
        };
        Err(CommandError::execution(format!("{what} {status}"))
            .with_details(json!({ "exit": self.exit, "stderr": excerpt })))
    }
}

/// Runs [`CommandSpec`]s under [`ExecLimits`].
#[derive(Debug, Clone, Copy)]
pub struct Executor {
    limits: ExecLimits,
}

/// Resolves the program: absolute paths as given, bare names against [`FIXED_PATH`]; the file
/// must be a regular file with an execute bit.
pub fn resolve_program(program: &str) -> Result<String, CommandError> {
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.is_empty() || program.contains('\0') {
        return Err(CommandError::internal("empty or malformed program name"));
    }
    if program.starts_with('/') {
        return if executable(Path::new(program)) {
            Ok(program.to_string())
        } else {
            Err(CommandError::execution(format!(
                "`{program}` is not an executable file"
            )))
        };
    }
    if program.contains('/') {
        return Err(CommandError::internal(format!(
            "program `{program}` must be an absolute path or a bare name"
        )));
    }
    FIXED_PATH
        .split(':')
        .map(|dir| format!("{dir}/{program}"))
        .find(|p| executable(Path::new(p)))
        .ok_or_else(|| {
            CommandError::execution(format!(
                "`{program}` is not installed (searched {FIXED_PATH})"
            ))
        })
}

/// Reads up to `max` bytes, then keeps draining so the writer never blocks on a full pipe.
async fn read_bounded<R: AsyncRead + Unpin>(mut r: R, max: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}

impl Executor {
    pub fn new(limits: ExecLimits) -> Self {
        Executor { limits }
    }

    pub fn limits(&self) -> ExecLimits {
        self.limits
    }

    /// Runs one command. Errors: `EXECUTION_ERROR` if it cannot be started, `TIMEOUT` if it runs
    /// longer than its timeout (the whole process group is then killed). A non-zero exit is not
    /// an error here.
    pub async fn run(&self, spec: &CommandSpec) -> Result<ExecOutput, CommandError> {
        let program = resolve_program(&spec.program)?;
        let timeout = spec.timeout.unwrap_or(self.limits.timeout);
        let max = self.limits.max_output_bytes;

        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&spec.args)
            .env_clear()
            .env("PATH", FIXED_PATH)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir("/")
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);

        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| CommandError::execution(format!("cannot start `{program}`: {e}")))?;
        // With process_group(0) the group id is the child's pid.
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        // If this future is dropped (the request was cancelled) before the child is reaped, the
        // guard kills the whole group; kill_on_drop alone would only reach the leader.
        let mut guard = GroupGuard(pgid);

        let stdin_task = match (child.stdin.take(), &spec.stdin) {
            (Some(mut w), Some(bytes)) => {
                let bytes = bytes.clone();
                // A tool that exits without reading its input makes this fail with EPIPE; that
                // is the tool's business, reported through its exit status.
                Some(tokio::spawn(async move {
                    let _ = w.write_all(&bytes).await;
                    let _ = w.shutdown().await;
                }))
            }
            _ => None,
        };
        let out_task = child
            .stdout
            .take()
            .map(|r| tokio::spawn(read_bounded(r, max)));
        let err_task = child
            .stderr
            .take()
            .map(|r| tokio::spawn(read_bounded(r, max)));

        let waited = tokio::time::timeout(timeout, child.wait()).await;
        let status = match waited {
            Ok(Ok(status)) => {
                // Reaped: the pid may be reused from now on, so never signal the group again.
                guard.disarm();
                status
            }
            Ok(Err(e)) => {
                abort_all(&stdin_task, &out_task, &err_task);
                return Err(CommandError::execution(format!(
                    "waiting for `{program}` failed: {e}"
                )));
            }
            Err(_) => {
                // The child has not been reaped, so its pid (the group id) cannot have been reused.
                guard.kill();
                let _ = child.wait().await;
                abort_all(&stdin_task, &out_task, &err_task);
                return Err(CommandError::new(
                    codes::TIMEOUT,
                    format!(
                        "`{program}` did not finish within {} s; its process group was killed",
                        timeout.as_secs_f64()
                    ),
                )
                .with_details(json!({ "timeout_seconds": timeout.as_secs_f64() })));
            }
        };
        let duration = started.elapsed();
        if let Some(t) = stdin_task {
            t.abort();
        }
        let collect = |task: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>| async move {
            match task {
                Some(mut t) => match tokio::time::timeout(PIPE_GRACE, &mut t).await {
                    Ok(Ok(r)) => r,
                    _ => {
                        t.abort();
                        (Vec::new(), true)
                    }
                },
                None => (Vec::new(), false),
            }
        };
        let ((stdout, stdout_truncated), (stderr, stderr_truncated)) =
            tokio::join!(collect(out_task), collect(err_task));
        let exit = match (status.code(), status.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(s)) => Exit::Signal(s),
            (None, None) => Exit::Code(-1),
        };
        Ok(ExecOutput {
            exit,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            duration,
        })
    }
}

/// Kills a process group when dropped, unless disarmed once its leader has been reaped.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

type Reader = Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>;

fn abort_all(writer: &Option<tokio::task::JoinHandle<()>>, out: &Reader, err: &Reader) {
    if let Some(t) = writer {
        t.abort();
    }
    for t in [out, err].into_iter().flatten() {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(timeout_ms: u64, max: usize) -> Executor {
        Executor::new(ExecLimits {
            timeout: Duration::from_millis(timeout_ms),
            max_output_bytes: max,
        })
    }

    #[tokio::test]
    async fn argv_is_passed_verbatim_without_a_shell() {
        let out = exec(5000, 1024)
            .run(&CommandSpec::new(
                "printf",
                ["%s|", "a b", "$(id)", "; rm -rf /", "`x`"],
            ))
            .await
            .unwrap();
        assert!(out.success());
        assert_eq!(out.stdout, b"a b|$(id)|; rm -rf /|`x`|");
    }

    #[tokio::test]
    async fn environment_is_cleared_to_the_fixed_path_plus_explicit_vars() {
        std::env::set_var("WARDEN_TEST_LEAK", "leaked");
        let out = exec(5000, 4096)
            .run(&CommandSpec::new("/usr/bin/env", Vec::<String>::new()).env("A", "1"))
            .await
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, vec!["A=1".to_string(), format!("PATH={FIXED_PATH}")]);
    }

    #[tokio::test]
    async fn stdin_carries_secrets_and_the_plan_never_shows_them() {
        let spec = CommandSpec::new("cat", Vec::<String>::new()).stdin(b"s3cret-password".to_vec());
        let out = exec(5000, 1024).run(&spec).await.unwrap();
        assert_eq!(out.stdout, b"s3cret-password");
        let plan = Plan::new(vec![Step::from(&spec)]).to_json().to_string();
        assert!(!plan.contains("s3cret"), "{plan}");
        assert!(plan.contains("\"stdin_bytes\":15"), "{plan}");
        assert!(!serde_json::to_string(&spec).unwrap().contains("s3cret"));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        // The shell here is the *tool under test*, started via explicit argv: it forks a
        // grandchild that would create the marker after 2 s unless the whole group is killed.
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let started = Instant::now();
        let e = exec(300, 1024)
            .run(&CommandSpec::new("/bin/sh", ["-c", script.as_str()]))
            .await
            .unwrap_err();
        assert_eq!(e.code, "TIMEOUT");
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !marker.exists(),
            "a process of the group survived the timeout"
        );
    }

    #[tokio::test]
    async fn a_tool_that_ignores_its_stdin_does_not_hang_the_executor() {
        let spec = CommandSpec::new("true", Vec::<String>::new()).stdin(vec![b'x'; 4 << 20]);
        let out = exec(5000, 16).run(&spec).await.unwrap();
        assert!(out.success());
    }

    #[tokio::test]
    async fn a_cancelled_run_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let spec = CommandSpec::new("/bin/sh", ["-c", script.as_str()]);
        let ex = exec(60_000, 1024);
        let cancelled = tokio::time::timeout(Duration::from_millis(200), ex.run(&spec)).await;
        assert!(cancelled.is_err());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !marker.exists(),
            "a process of the group survived the cancellation"
        );
    }

    #[tokio::test]
    async fn per_command_timeout_overrides_the_default() {
        let e = exec(60_000, 64)
            .run(&CommandSpec::new("sleep", ["5"]).timeout(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert_eq!(e.code, "TIMEOUT");
    }

    #[tokio::test]
    async fn output_is_bounded_and_truncation_noted() {
        let out = exec(10_000, 1000)
            .run(&CommandSpec::new("head", ["-c", "1000000", "/dev/zero"]))
            .await
            .unwrap();
        assert!(out.success());
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.stdout_truncated);
        assert!(!out.stderr_truncated);
        let small = exec(10_000, 1000)
            .run(&CommandSpec::new("echo", ["hi"]))
            .await
            .unwrap();
        assert!(!small.stdout_truncated);
    }

    #[tokio::test]
    async fn exit_status_is_reported_and_mapped() {
        let out = exec(5000, 1024)
            .run(&CommandSpec::new(
                "/bin/sh",
                ["-c", "echo oops >&2; exit 3"],
            ))
            .await
            .unwrap();
        assert_eq!(out.exit, Exit::Code(3));
        let e = out.check("the tool").unwrap_err();
        assert_eq!(e.code, "EXECUTION_ERROR");
        assert_eq!(e.message, "the tool exited with status 3");
        assert_eq!(e.details.unwrap()["stderr"], "oops\n");
        let sig = exec(5000, 1024)
            .run(&CommandSpec::new("/bin/sh", ["-c", "kill -9 $$"]))
            .await
            .unwrap();
        assert_eq!(sig.exit, Exit::Signal(9));
    }

    #[tokio::test]
    async fn programs_resolve_only_against_the_fixed_path() {
        assert_eq!(resolve_program("/usr/bin/true").unwrap(), "/usr/bin/true");
        assert!(FIXED_PATH
            .split(':')
            .any(|d| resolve_program("true").unwrap().starts_with(d)));
        assert_eq!(
            resolve_program("no-such-tool-xyz").unwrap_err().code,
            "EXECUTION_ERROR"
        );
        assert_eq!(
            resolve_program("./true").unwrap_err().code,
            "INTERNAL_ERROR"
        );
        assert_eq!(
            resolve_program("bin/true").unwrap_err().code,
            "INTERNAL_ERROR"
        );
        assert!(resolve_program("/etc/passwd").is_err());
        let e = exec(1000, 10)
            .run(&CommandSpec::new("no-such-tool-xyz", ["a"]))
            .await
            .unwrap_err();
        assert_eq!(e.code, "EXECUTION_ERROR");
    }

    #[test]
    fn plans_serialize_argv_lists() {
        let spec = CommandSpec::new("/usr/sbin/service", ["nginx", "reload"]);
        let plan = Plan::new(vec![
            Step::from(&spec),
            Step::Chmod {
                path: "/var/www/a".into(),
                mode: "0644".into(),
                recursive: false,
            },
        ]);
        assert_eq!(
            plan.to_json(),
            json!({"steps": [
                {"action": "run", "argv": ["/usr/sbin/service", "nginx", "reload"]},
                {"action": "chmod", "path": "/var/www/a", "mode": "0644", "recursive": false},
            ]})
        );
    }
}
