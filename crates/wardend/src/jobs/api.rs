//! The `jobs.*` methods: what the pipeline calls once a request is authenticated, rate limited
//! and granted its method's permission (`jobs:run`, `jobs:list`, `jobs:status`, `jobs:attach`,
//! `jobs:stop`). Seeing or touching another principal's job also needs `jobs:admin`.

use super::params::{parse_start, Caps};
use super::wire::{binary_frame, data_frame, dropped_frame, job_json};
use super::{Caller, Entry};
use crate::server::frame::Part;
use crate::server::methods::Method;
use crate::server::pipeline::{Ctx, StreamSink};
use crate::units::parse_duration;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use warden_exec::{LogPiece, Stream};
use warden_wire::envelope::Request;
use warden_wire::reply::{ErrorBody, ErrorCode};

/// Output bytes gathered into one attach frame at most: big enough that framing costs little,
/// small enough that 100 followers hold little in their connections' buffers.
const FRAME_BYTES: usize = 128 << 10;

/// How long a follower waits at most after a short frame for a whole frame's worth of output.
/// Short enough not to be seen on interactive output; the first frame is never delayed.
const LINGER: Duration = Duration::from_millis(1);

/// Where a piece of output starts and which stream it is of; `None` for a loss.
fn where_(p: &LogPiece) -> Option<(u64, Stream)> {
    match p {
        LogPiece::Mem { offset, stream, .. } | LogPiece::File { offset, stream, .. } => {
            Some((*offset, *stream))
        }
        LogPiece::Dropped { .. } => None,
    }
}

/// Adds a piece to a frame's parts, a file range joined to the one before it when it
/// continues it; returns its length.
fn push_part(parts: &mut Vec<Part>, p: LogPiece) -> usize {
    match p {
        LogPiece::Mem { bytes, .. } => {
            let n = bytes.len();
            parts.push(Part::Mem(bytes));
            n
        }
        LogPiece::File { range, .. } => {
            let n = range.len();
            let joined = match parts.last_mut() {
                Some(Part::File(last)) => last.extend(&range),
                _ => false,
            };
            if !joined {
                parts.push(Part::File(range));
            }
            n
        }
        LogPiece::Dropped { .. } => 0,
    }
}

fn bad(msg: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::ValidationError, msg)
}

fn caller(ctx: &Ctx<'_>) -> Caller {
    Caller {
        key: ctx.peer.key.clone(),
        uid: ctx.peer.principal.uid,
        gid: ctx.peer.principal.gid,
        admin: ctx.authorize("jobs:admin").is_ok(),
    }
}

fn only(params: &Value, keys: &[&str]) -> Result<(), ErrorBody> {
    match params {
        Value::Null => Ok(()),
        Value::Object(m) => match m.keys().find(|k| !keys.contains(&k.as_str())) {
            Some(k) => Err(bad(format!(
                "unknown parameter `{}`: expected {}",
                k.chars().take(64).collect::<String>(),
                keys.join(", ")
            ))),
            None => Ok(()),
        },
        _ => Err(bad("params must be an object")),
    }
}

fn flag(params: &Value, key: &str, default: bool) -> Result<bool, ErrorBody> {
    match params.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad(format!("`{key}` must be true or false"))),
    }
}

fn job_of(ctx: &Ctx<'_>, caller: &Caller, params: &Value) -> Result<Arc<Entry>, ErrorBody> {
    let id = params
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`id` (the job id) is required"))?;
    ctx.state.jobs.get(caller, id)
}

/// The uid and primary gid of `[jobs] remote_user`, which certificate peers' jobs run as.
fn remote_user(name: &str) -> Result<(u32, u32), ErrorBody> {
    if name.is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::Unavailable,
            "jobs can be started only by local callers here: `[jobs] remote_user` is empty, \
             so certificate peers have no local user to run as",
        ));
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(ErrorBody::new(
            ErrorCode::Unavailable,
            format!(
                "`[jobs] remote_user` names the user `{name}`, which does not exist on this host"
            ),
        )),
        Err(e) => Err(ErrorBody::new(
            ErrorCode::InternalError,
            format!("looking up `[jobs] remote_user` `{name}`: {e}"),
        )),
    }
}

/// Starts the job `p` describes for `who` (`jobs.start`, `jobs.run`).
async fn start(ctx: &Ctx<'_>, mut who: Caller, p: &Value) -> Result<Arc<Entry>, ErrorBody> {
    let cfg = &ctx.rt.config.jobs;
    if ctx.peer.principal.transport != crate::identity::Transport::Unix {
        // A certificate has no uid: its jobs run as `[jobs] remote_user`, and still belong to
        // the certificate (`who.key`), not to that user.
        (who.uid, who.gid) = remote_user(&cfg.remote_user)?;
    }
    let caps = Caps::for_roles(cfg, &ctx.rt.policy.role_names(ctx.grants));
    let r = parse_start(p, &caps)?;
    ctx.state.jobs.start(cfg, &who, r).await
}

/// `jobs.start`, `jobs.list`, `jobs.status`, `jobs.stop`.
pub async fn execute(ctx: &Ctx<'_>, method: Method, req: &Request) -> Result<Value, ErrorBody> {
    let cfg = &ctx.rt.config.jobs;
    let svc = &ctx.state.jobs;
    let who = caller(ctx);
    let p = &req.params;
    match method {
        Method::JobsStart => {
            let e = start(ctx, who, p).await?;
            Ok(job_json(&e, true))
        }
        Method::JobsList => {
            only(p, &["all"])?;
            let all = flag(p, "all", false)?;
            if all && !who.admin {
                return Err(ErrorBody::new(
                    ErrorCode::AccessDenied,
                    "`all` lists every principal's jobs and needs the permission `jobs:admin`",
                ));
            }
            let jobs: Vec<Value> = svc
                .list(&who, all)
                .iter()
                .map(|e| job_json(e, false))
                .collect();
            Ok(json!({ "jobs": jobs }))
        }
        Method::JobsStatus => {
            only(p, &["id"])?;
            let e = job_of(ctx, &who, p)?;
            Ok(job_json(&e, true))
        }
        Method::JobsStop => {
            only(p, &["id", "grace"])?;
            let e = job_of(ctx, &who, p)?;
            let grace = match p.get("grace") {
                None => cfg.stop_grace.get(),
                Some(v) => v
                    .as_str()
                    .and_then(|s| parse_duration(s).ok())
                    .filter(|d| *d <= Duration::from_secs(3600))
                    .ok_or_else(|| bad("`grace` must be a duration up to 1h, e.g. \"5s\""))?,
            };
            e.job.stop(grace).await.map_err(|err| {
                ErrorBody::new(
                    ErrorCode::InternalError,
                    format!("stopping the job failed: {err}"),
                )
            })?;
            // The table entry learns of the end from its own watcher; wait for it briefly so
            // that the reply's `ended_at` is set.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while e.ended_at().is_none() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(job_json(&e, true))
        }
        _ => Err(ErrorBody::new(ErrorCode::InternalError, "not a job method")),
    }
}

/// `jobs.attach` (streamed): the job's output from `from` (default 0), stdout and stderr as
/// they were interleaved, each frame tagged; with `follow` (default true) until the job ends,
/// else what there is now; with `binary` (length-prefixed connections only) output frames are
/// binary frames (see [`super::wire`]) rather than base64 in JSON. The final reply has `end` (the offset after the last byte sent),
/// `complete` (the job ended and all its output was sent) and the job.
///
/// Each frame is handed to the connection and the handler yields before reading on, so the
/// connection writes it out first: a slow client slows only its own stream (and one that
/// stops reading loses its connection after `limits.write_timeout`); the job and other readers
/// never wait for it, since the log does not.
pub async fn attach(ctx: &Ctx<'_>, req: &Request, sink: &StreamSink) -> Result<Value, ErrorBody> {
    let p = &req.params;
    only(p, &["id", "from", "follow", "binary"])?;
    let who = caller(ctx);
    let e = job_of(ctx, &who, p)?;
    let from = match p.get("from") {
        None => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad("`from` must be a byte offset (an integer from 0)"))?,
    };
    let follow = flag(p, "follow", true)?;
    let binary = binary_flag(p, sink)?;
    stream_output(&e, from, follow, binary, sink).await
}

/// `jobs.run` (streamed): `jobs.start`, then `jobs.attach` from offset 0 following, in one
/// request, for a caller that starts a job to watch it (`warden jobs exec`): one round trip
/// and one audit record fewer before the first byte. Params: `jobs.start`'s and `binary`.
/// The first frame is `{"job": …}` (what `jobs.start` returns); then output frames and the
/// final reply as `jobs.attach`'s. Needs `jobs:attach` besides the method's `jobs:run`.
pub async fn run(ctx: &Ctx<'_>, req: &Request, sink: &StreamSink) -> Result<Value, ErrorBody> {
    ctx.authorize("jobs:attach")?;
    let binary = binary_flag(&req.params, sink)?;
    let mut p = req.params.clone();
    if let Value::Object(m) = &mut p {
        m.remove("binary");
    }
    let e = start(ctx, caller(ctx), &p).await?;
    if !sink.send_value(&json!({ "job": job_json(&e, true) })).await {
        // The caller is gone; its job runs on, as after a detach.
        return Ok(json!({ "end": 0, "complete": false, "job": job_json(&e, false) }));
    }
    stream_output(&e, 0, true, binary, sink).await
}

/// The `binary` param (default false), which needs length-prefixed framing.
fn binary_flag(p: &Value, sink: &StreamSink) -> Result<bool, ErrorBody> {
    let binary = flag(p, "binary", false)?;
    if binary && !sink.binary {
        return Err(bad(
            "binary output frames need length-prefixed framing; on this connection leave `binary` out",
        ));
    }
    Ok(binary)
}

/// Streams a job's output from `from` to `sink` (see [`attach`]); the final reply's data.
async fn stream_output(
    e: &Arc<Entry>,
    from: u64,
    follow: bool,
    binary: bool,
    sink: &StreamSink,
) -> Result<Value, ErrorBody> {
    let log = e
        .job
        .log()
        .ok_or_else(|| ErrorBody::new(ErrorCode::InternalError, "the job has no output log"))?;
    let until = log.end();
    let mut r = log.reader_from(from);
    // Output the log has moved to its spill file goes to a Unix socket client as file ranges,
    // sent with `sendfile`; everywhere else it is read here.
    let files = binary && sink.files;
    let piece = |p: LogPiece| if files { p } else { p.into_item().into() };
    let mut pending: Option<LogPiece> = None;
    let mut parts: Vec<Part> = Vec::new();
    loop {
        let item = match pending.take() {
            Some(i) => Some(i),
            None if follow => r.next_piece().await.map(piece),
            None if r.position() < until => r.try_next_piece().map(piece),
            None => None,
        };
        let Some(item) = item else { break };
        let mut short = false;
        let frame = match item {
            LogPiece::Dropped { from, to } => dropped_frame(&sink.id, from, to).into(),
            first @ (LogPiece::Mem { offset, stream, .. }
            | LogPiece::File { offset, stream, .. }) => {
                let mut len = 0;
                parts.clear();
                let mut next = Some(first);
                while let Some(p) = next.take() {
                    match where_(&p) {
                        Some((o, s)) if s == stream && o == offset + len as u64 => {
                            len += push_part(&mut parts, p);
                        }
                        _ => {
                            pending = Some(p);
                            break;
                        }
                    }
                    if len < FRAME_BYTES {
                        next = r.try_next_piece().map(piece);
                    }
                }
                short = len < FRAME_BYTES;
                if binary {
                    binary_frame(&sink.id, offset, stream, parts.drain(..))
                } else {
                    // All in memory: file ranges are kept only for binary frames.
                    let bytes: Vec<_> = parts
                        .drain(..)
                        .filter_map(|p| match p {
                            Part::Mem(b) => Some(b),
                            Part::File(_) => None,
                        })
                        .collect();
                    data_frame(&sink.id, offset, stream, &bytes).into()
                }
            }
        };
        parts.clear();
        if !sink.send_frame(frame).await {
            break;
        }
        tokio::task::yield_now().await;
        if follow && short && pending.is_none() && !log.is_closed() {
            // Everything there was went out in a short frame. A job writing fast writes in
            // small pieces (a pipe's worth or less each): let the next frame gather many of
            // them, instead of one frame and one wake-up per write. It goes as soon as a whole
            // frame's worth is there, so a fast job's reader never sits idle for the linger.
            let enough = r.position() + FRAME_BYTES as u64;
            let _ = tokio::time::timeout(LINGER, r.wait_for_end(enough)).await;
        }
    }
    let complete = pending.is_none() && log.is_closed() && r.position() >= log.end();
    if complete {
        // The log closes just before the report is published.
        let _ = tokio::time::timeout(Duration::from_secs(5), e.job.wait()).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while e.ended_at().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let end = match &pending {
        Some(LogPiece::Mem { offset, .. } | LogPiece::File { offset, .. }) => *offset,
        Some(LogPiece::Dropped { from, .. }) => *from,
        None => r.position(),
    };
    Ok(json!({ "end": end, "complete": complete, "job": job_json(e, false) }))
}
