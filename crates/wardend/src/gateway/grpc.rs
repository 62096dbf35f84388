//! The gRPC API of the gateway: the services of `proto/warden/v1` (`warden.v1.Jobs`,
//! `warden.v1.Secrets`, `warden.v1.System`), as an axum router the gateway serves on its mTLS
//! port beside the REST API. See docs/grpc.md.
//!
//! Every call becomes one warden-dialect request (`jobs.start`, `secrets.get`, …) sent to core
//! through [`Core`] with the identity of the caller's certificate, which the TLS layer puts into
//! each HTTP request's extensions (a [`CertIdentity`]); a request without one is refused
//! (`UNAUTHENTICATED`). Core decides everything (policy, rate limits, audit) exactly as for a
//! Unix-socket request. Methods that need a session token get one made for the certificate's
//! principal (`auth.login`, cached per certificate and renewed when it expires), so a gRPC
//! client never handles tokens.
//!
//! What it deliberately does not do: read or hold any of core's state (it works unchanged when
//! core is at the other end of a socketpair), verify certificates (the TLS layer's job), or
//! decide anything itself.

use super::{decode_reply, Core, FrameSender};
use crate::identity::CertIdentity;
use crate::server::frame::Frame;
use futures_util::Stream;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use warden_wire::envelope::{Credential, Dialect, Request};

/// The generated messages and services of `proto/warden/v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("warden.v1");
}

use pb::jobs_server::{Jobs, JobsServer};
use pb::secrets_server::{Secrets, SecretsServer};
use pb::system_server::{System, SystemServer};

/// The metadata key that carries warden's own error code (`ACCESS_DENIED`, …) beside the gRPC
/// status.
pub const CODE_METADATA: &str = "warden-code";

/// Attach events queued for one gRPC stream at most (beside the frames the stream's window
/// lets core send: [`super::STREAM_WINDOW`]). A slow client costs at most these frames (128 KiB
/// each) of memory and never slows the job.
const ATTACH_QUEUE: usize = 8;

/// The gRPC services for the gateway to serve; every call reaches core through `core`.
pub fn router(core: Arc<dyn Core>) -> axum::Router {
    let api = Api {
        inner: Arc::new(Inner {
            core,
            tokens: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }),
    };
    tonic::service::Routes::new(JobsServer::new(api.clone()))
        .add_service(SecretsServer::new(api.clone()))
        .add_service(SystemServer::new(api))
        .prepare()
        .into_axum_router()
}

/// The gRPC status for a warden error code (the table in docs/grpc.md).
pub fn status_code(code: &str) -> Code {
    match code {
        "AUTH_REQUIRED" | "AUTH_INVALID" | "AUTH_EXPIRED" => Code::Unauthenticated,
        "AUTH_DENIED" | "ACCESS_DENIED" => Code::PermissionDenied,
        "RATE_LIMITED" => Code::ResourceExhausted,
        "VALIDATION_ERROR" => Code::InvalidArgument,
        "NOT_FOUND" | "SECRET_NOT_FOUND" | "SITE_NOT_FOUND" => Code::NotFound,
        "CONFLICT" => Code::Aborted,
        "FILE_EXISTS" | "USER_EXISTS" => Code::AlreadyExists,
        "DAEMON_LOCKED" | "EXECUTION_ERROR" | "CONFIG_INVALID" => Code::FailedPrecondition,
        "TIMEOUT" => Code::DeadlineExceeded,
        "UNAVAILABLE" => Code::Unavailable,
        "INTEGRITY_ERROR" => Code::DataLoss,
        "INTERNAL_ERROR" => Code::Internal,
        _ => Code::Unknown,
    }
}

/// A warden error as a gRPC status: the mapped code, `CODE: message`, and the warden code in
/// the `warden-code` metadata.
pub fn status(code: &str, message: &str) -> Status {
    let mut s = Status::new(status_code(code), format!("{code}: {message}"));
    if let Ok(v) = code.parse() {
        s.metadata_mut().insert(CODE_METADATA, v);
    }
    s
}

#[derive(Clone)]
struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<dyn Core>,
    /// Session tokens core issued, per certificate id.
    tokens: Mutex<HashMap<String, String>>,
    next_id: AtomicU64,
}

/// The verified certificate identity the TLS layer attached to the request.
fn identity<T>(req: &tonic::Request<T>) -> Result<CertIdentity, Status> {
    req.extensions()
        .get::<CertIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))
}

impl Inner {
    fn request(&self, method: &str, params: Value, credential: Credential) -> Request {
        Request {
            dialect: Dialect::Securityd,
            method: method.to_string(),
            id: Some(json!(self.next_id.fetch_add(1, Ordering::Relaxed))),
            params,
            params_raw: None,
            credential,
        }
    }

    /// A session token for `cert`: the cached one, or a new one from `auth.login`.
    async fn token(&self, cert: &CertIdentity) -> Result<String, Status> {
        if let Some(t) = self.tokens.lock().get(&cert.id) {
            return Ok(t.clone());
        }
        let req = self.request("auth.login", Value::Null, Credential::None);
        let data = decode_reply(&self.core.call(cert.clone(), req, None).await)
            .map_err(|(c, m)| status(&c, &m))?;
        let token = data
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| Status::internal("core's auth reply has no token"))?
            .to_string();
        self.tokens.lock().insert(cert.id.clone(), token.clone());
        Ok(token)
    }

    /// Calls `method` for `cert` with a session token; one retry with a fresh token when core
    /// no longer accepts the cached one (nothing ran: authentication comes first).
    async fn call(
        &self,
        cert: &CertIdentity,
        method: &str,
        params: Value,
        frames: Option<FrameSender>,
    ) -> Result<Value, Status> {
        let mut retried = false;
        loop {
            let token = self.token(cert).await?;
            let req = self.request(method, params.clone(), Credential::Token(token.clone()));
            let reply = self.core.call(cert.clone(), req, frames.clone()).await;
            match decode_reply(&reply) {
                Ok(v) => return Ok(v),
                Err((c, m)) => {
                    if !retried && (c == "AUTH_INVALID" || c == "AUTH_EXPIRED") {
                        let mut t = self.tokens.lock();
                        if t.get(&cert.id) == Some(&token) {
                            t.remove(&cert.id);
                        }
                        retried = true;
                        continue;
                    }
                    return Err(status(&c, &m));
                }
            }
        }
    }
}

// ---- reading core's JSON replies into messages ----

fn s(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn os(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

fn u(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

fn b(v: &Value, k: &str) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(false)
}

fn strings(v: &Value, k: &str) -> Vec<String> {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn limits_pb(l: &Value) -> Option<pb::Limits> {
    l.as_object()?;
    Some(pb::Limits {
        cpu: l.get("cpu").and_then(Value::as_f64),
        memory: u(l, "memory"),
        pids: u(l, "pids"),
        io: l
            .get("io")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|d| pb::IoLimit {
                        device: s(d, "device"),
                        read_bps: u(d, "read_bps"),
                        write_bps: u(d, "write_bps"),
                        read_iops: u(d, "read_iops"),
                        write_iops: u(d, "write_iops"),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn job_pb(v: &Value) -> pb::Job {
    let state = match v.get("state").and_then(Value::as_str) {
        Some("running") => pb::State::Running,
        Some("ended") => pb::State::Ended,
        _ => pb::State::Unspecified,
    };
    let end = v.get("end").filter(|e| e.is_object()).map(|e| pb::JobEnd {
        reason: s(e, "reason"),
        exit_code: e.get("exit_code").and_then(Value::as_i64).map(|c| c as i32),
        signal: e.get("signal").and_then(Value::as_i64).map(|c| c as i32),
        signal_name: os(e, "signal_name"),
        stop_requested: b(e, "stop_requested"),
        killed_after_grace: b(e, "killed_after_grace"),
        pids_limit_hit: b(e, "pids_limit_hit"),
        cleanup_error: os(e, "cleanup_error"),
    });
    let usage = v.get("usage").filter(|x| x.is_object()).map(|x| pb::Usage {
        runtime_ms: u(x, "runtime_ms").unwrap_or(0),
        cpu_time_ms: u(x, "cpu_time_ms"),
        cpu_throttled_periods: u(x, "cpu_throttled_periods"),
        memory_peak: u(x, "memory_peak"),
        oom_kills: u(x, "oom_kills"),
        pids_limit_hits: u(x, "pids_limit_hits"),
        io_read_bytes: u(x, "io_read_bytes"),
        io_write_bytes: u(x, "io_write_bytes"),
    });
    pb::Job {
        id: s(v, "id"),
        owner: s(v, "owner"),
        command: strings(v, "command"),
        state: state as i32,
        started_at: s(v, "started_at"),
        ended_at: os(v, "ended_at"),
        pid: u(v, "pid").and_then(|p| u32::try_from(p).ok()),
        end,
        limits: v.get("limits").and_then(limits_pb),
        network: v.get("network").and_then(Value::as_bool),
        output_bytes: u(v, "output_bytes"),
        usage,
    }
}

fn start_params(r: pb::StartRequest) -> Value {
    let mut p = Map::new();
    p.insert("command".into(), json!(r.command));
    if !r.env.is_empty() {
        p.insert("env".into(), json!(r.env));
    }
    if let Some(cwd) = r.cwd {
        p.insert("cwd".into(), json!(cwd));
    }
    if let Some(l) = r.limits {
        let mut m = Map::new();
        if let Some(c) = l.cpu {
            m.insert("cpu".into(), json!(c));
        }
        if let Some(x) = l.memory {
            m.insert("memory".into(), json!(x));
        }
        if let Some(x) = l.pids {
            m.insert("pids".into(), json!(x));
        }
        if !l.io.is_empty() {
            let io: Vec<Value> =
                l.io.into_iter()
                    .map(|d| {
                        let mut o = Map::new();
                        o.insert("device".into(), json!(d.device));
                        for (k, x) in [
                            ("read_bps", d.read_bps),
                            ("write_bps", d.write_bps),
                            ("read_iops", d.read_iops),
                            ("write_iops", d.write_iops),
                        ] {
                            if let Some(x) = x {
                                o.insert(k.into(), json!(x));
                            }
                        }
                        Value::Object(o)
                    })
                    .collect();
            m.insert("io".into(), Value::Array(io));
        }
        p.insert("limits".into(), Value::Object(m));
    }
    if let Some(n) = r.network {
        p.insert("network".into(), json!(n));
    }
    Value::Object(p)
}

/// One frame of a `jobs.attach` stream as an event, and the log offset after it.
fn attach_event(frame: bytes::Bytes) -> Result<(pb::AttachEvent, u64), Status> {
    use pb::attach_event::Event;
    if frame.first() == Some(&crate::jobs::wire::BINARY_FRAME) {
        // 0x00, stream, offset (u64), id length (u16), id, then the raw bytes.
        let bad = || Status::internal("core sent a malformed binary output frame");
        let header = frame.get(..12).ok_or_else(bad)?;
        let stream = match header[1] {
            1 => pb::Stream::Stdout,
            2 => pb::Stream::Stderr,
            _ => return Err(bad()),
        };
        let offset = u64::from_be_bytes(header[2..10].try_into().map_err(|_| bad())?);
        let id_len = usize::from(u16::from_be_bytes([header[10], header[11]]));
        let start = 12 + id_len;
        if frame.len() < start {
            return Err(bad());
        }
        let data = frame.slice(start..);
        let next = offset + data.len() as u64;
        let ev = Event::Output(pb::Output {
            offset,
            stream: stream as i32,
            data,
        });
        return Ok((pb::AttachEvent { event: Some(ev) }, next));
    }
    let data = decode_reply(&frame).map_err(|(c, m)| status(&c, &m))?;
    if let Some(d) = data.get("dropped") {
        let (from, to) = (u(d, "from").unwrap_or(0), u(d, "to").unwrap_or(0));
        let ev = Event::Dropped(pb::Dropped { from, to });
        return Ok((pb::AttachEvent { event: Some(ev) }, to));
    }
    let offset = u(&data, "offset").unwrap_or(0);
    let stream = match data.get("stream").and_then(Value::as_str) {
        Some("stdout") => pb::Stream::Stdout,
        Some("stderr") => pb::Stream::Stderr,
        _ => pb::Stream::Unspecified,
    };
    let bytes = base64_simd::STANDARD
        .decode_to_vec(data.get("data").and_then(Value::as_str).unwrap_or(""))
        .map_err(|e| Status::internal(format!("core's output frame: {e}")))?;
    let next = offset + bytes.len() as u64;
    let ev = Event::Output(pb::Output {
        offset,
        stream: stream as i32,
        data: bytes.into(),
    });
    Ok((pb::AttachEvent { event: Some(ev) }, next))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AttachEvent, Status>> + Send>>;

/// A streamed call to core that feeds one gRPC server stream: its frames, then its reply.
struct Streamed {
    method: &'static str,
    frames: super::FrameReceiver,
    call: tokio::task::JoinHandle<Result<Value, Status>>,
}

impl Streamed {
    fn start(inner: Arc<Inner>, cert: CertIdentity, method: &'static str, params: Value) -> Self {
        let (tx, frames) = super::frames();
        let call = tokio::spawn(async move { inner.call(&cert, method, params, Some(tx)).await });
        Streamed {
            method,
            frames,
            call,
        }
    }

    /// The next frame; `None` once the frames ended, or once the gRPC client (`out`'s reader)
    /// went away, in which case the call is stopped: nothing more to follow for.
    async fn next<T>(&mut self, out: &mpsc::Sender<T>) -> Option<Frame> {
        tokio::select! {
            f = self.frames.recv() => f,
            _ = out.closed() => {
                self.call.abort();
                None
            }
        }
    }

    /// Stops the call (the client went away, or a frame could not be read).
    fn abort(&self) {
        self.call.abort();
    }

    /// The call's reply, once its frames ended.
    async fn reply(self) -> Result<Value, Status> {
        let method = self.method;
        self.call
            .await
            .unwrap_or_else(|e| Err(Status::internal(format!("the {method} call failed: {e}"))))
    }
}

/// Feeds one gRPC attach stream from a `jobs.attach` call to core, its frames converted and
/// queued for the client. The frames are flow-controlled end to end: while the client reads
/// slower than the job writes, the queue fills, this task stops taking frames, core's reader of
/// the job log waits for credit, and the log keeps the output (up to its bounds) — the job is
/// never slowed and no memory grows. Ends with the call's `end` event or its error.
async fn attach_feed(
    inner: Arc<Inner>,
    cert: CertIdentity,
    id: String,
    from: u64,
    follow: bool,
    out: mpsc::Sender<Result<pb::AttachEvent, Status>>,
) {
    let params = json!({ "id": id, "from": from, "follow": follow, "binary": true });
    let mut call = Streamed::start(inner, cert, "jobs.attach", params);
    let mut next = from;
    while let Some(frame) = call.next(&out).await {
        let event = frame
            .into_bytes()
            .map_err(|e| Status::internal(format!("job output could not be read: {e}")))
            .and_then(attach_event);
        let (ev, after) = match event {
            Ok(x) => x,
            Err(e) => {
                call.abort();
                let _ = out.send(Err(e)).await;
                return;
            }
        };
        if out.send(Ok(ev)).await.is_err() {
            call.abort();
            return;
        }
        next = after;
    }
    if out.is_closed() {
        return;
    }
    let ev = call.reply().await.map(|data| {
        let end = pb::AttachEnd {
            end: u(&data, "end").unwrap_or(next),
            complete: b(&data, "complete"),
            job: data.get("job").map(job_pb),
        };
        pb::AttachEvent {
            event: Some(pb::attach_event::Event::End(end)),
        }
    });
    let _ = out.send(ev).await;
}

#[tonic::async_trait]
impl Jobs for Api {
    async fn start(
        &self,
        req: tonic::Request<pb::StartRequest>,
    ) -> Result<tonic::Response<pb::Job>, Status> {
        let cert = identity(&req)?;
        let p = start_params(req.into_inner());
        let v = self.inner.call(&cert, "jobs.start", p, None).await?;
        Ok(tonic::Response::new(job_pb(&v)))
    }

    async fn list(
        &self,
        req: tonic::Request<pb::ListRequest>,
    ) -> Result<tonic::Response<pb::ListResponse>, Status> {
        let cert = identity(&req)?;
        let all = req.into_inner().all;
        let v = self
            .inner
            .call(&cert, "jobs.list", json!({ "all": all }), None)
            .await?;
        let jobs = v
            .get("jobs")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(job_pb).collect())
            .unwrap_or_default();
        Ok(tonic::Response::new(pb::ListResponse { jobs }))
    }

    async fn status(
        &self,
        req: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::Job>, Status> {
        let cert = identity(&req)?;
        let id = req.into_inner().id;
        let v = self
            .inner
            .call(&cert, "jobs.status", json!({ "id": id }), None)
            .await?;
        Ok(tonic::Response::new(job_pb(&v)))
    }

    type AttachStream = EventStream;

    async fn attach(
        &self,
        req: tonic::Request<pb::AttachRequest>,
    ) -> Result<tonic::Response<Self::AttachStream>, Status> {
        let cert = identity(&req)?;
        let r = req.into_inner();
        let (tx, rx) = mpsc::channel(ATTACH_QUEUE);
        tokio::spawn(attach_feed(
            self.inner.clone(),
            cert,
            r.id,
            r.from,
            r.follow.unwrap_or(true),
            tx,
        ));
        // The first event decides whether the call fails as a whole (no such job, denied)
        // or streams.
        streamed(rx, "attach").await
    }

    async fn stop(
        &self,
        req: tonic::Request<pb::StopRequest>,
    ) -> Result<tonic::Response<pb::Job>, Status> {
        let cert = identity(&req)?;
        let r = req.into_inner();
        let mut p = json!({ "id": r.id });
        if let Some(g) = r.grace {
            p["grace"] = json!(g);
        }
        let v = self.inner.call(&cert, "jobs.stop", p, None).await?;
        Ok(tonic::Response::new(job_pb(&v)))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// A server stream fed by `rx`: its first item is awaited here, so that an error before any
/// event (no such job, a denied permission) fails the call itself instead of the stream.
async fn streamed<T: Send + 'static>(
    mut rx: mpsc::Receiver<Result<T, Status>>,
    what: &str,
) -> Result<tonic::Response<Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>>, Status> {
    let first = match rx.recv().await {
        Some(Ok(ev)) => ev,
        Some(Err(e)) => return Err(e),
        None => {
            return Err(Status::internal(format!(
                "the {what} stream ended without a reply"
            )))
        }
    };
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let all = futures_util::StreamExt::chain(futures_util::stream::iter([Ok(first)]), rest);
    Ok(tonic::Response::new(Box::pin(all)))
}

/// One watch event from a `secrets.watch` frame (`{"status":"ok","data":{"generation":…}}`).
fn watch_event(frame: &[u8]) -> Result<pb::WatchEvent, Status> {
    let v: Value = serde_json::from_slice(frame)
        .map_err(|e| Status::internal(format!("core's watch frame: {e}")))?;
    let d = &v["data"];
    Ok(pb::WatchEvent {
        generation: u(d, "generation").unwrap_or(0),
        sealed: b(d, "sealed"),
    })
}

/// Feeds one gRPC watch stream from a `secrets.watch` call to core; ends the call when the
/// client goes away.
async fn watch_feed(
    inner: Arc<Inner>,
    cert: CertIdentity,
    params: Value,
    out: mpsc::Sender<Result<pb::WatchEvent, Status>>,
) {
    let mut call = Streamed::start(inner, cert, "secrets.watch", params);
    while let Some(frame) = call.next(&out).await {
        let Ok(bytes) = frame.into_bytes() else {
            call.abort();
            return;
        };
        if out.send(watch_event(&bytes)).await.is_err() {
            call.abort();
            return;
        }
    }
    if out.is_closed() {
        return;
    }
    // The frames ended: the call's own reply says why (shutdown, or an error before the first
    // frame such as a denied permission).
    if let Err(e) = call.reply().await {
        let _ = out.send(Err(e)).await;
    }
}

#[tonic::async_trait]
impl Secrets for Api {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: tonic::Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        let cert = identity(&req)?;
        let mut params = json!({});
        if let Some(h) = req.into_inner().heartbeat_seconds {
            params["heartbeat"] = json!(h);
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(watch_feed(self.inner.clone(), cert, params, tx));
        // The first event decides whether the call fails as a whole (denied, bad heartbeat).
        streamed(rx, "watch").await
    }

    async fn get(
        &self,
        req: tonic::Request<pb::GetSecretRequest>,
    ) -> Result<tonic::Response<pb::Secret>, Status> {
        let cert = identity(&req)?;
        let r = req.into_inner();
        let mut p = json!({ "key": r.key });
        if let Some(v) = r.version {
            p["version"] = json!(v);
        }
        let v = self.inner.call(&cert, "secrets.get", p, None).await?;
        Ok(tonic::Response::new(pb::Secret {
            key: s(&v, "key"),
            value: s(&v, "value"),
            version: u(&v, "version").unwrap_or(0),
        }))
    }

    async fn get_many(
        &self,
        req: tonic::Request<pb::GetManyRequest>,
    ) -> Result<tonic::Response<pb::GetManyResponse>, Status> {
        let cert = identity(&req)?;
        let keys = req.into_inner().keys;
        let v = self
            .inner
            .call(&cert, "secrets.get_many", json!({ "keys": keys }), None)
            .await?;
        let secrets = v
            .get("secrets")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, x)| Some((k.clone(), x.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(tonic::Response::new(pb::GetManyResponse {
            secrets,
            missing: strings(&v, "missing"),
            damaged: strings(&v, "damaged"),
        }))
    }

    async fn list(
        &self,
        req: tonic::Request<pb::ListSecretsRequest>,
    ) -> Result<tonic::Response<pb::ListSecretsResponse>, Status> {
        let cert = identity(&req)?;
        let v = self
            .inner
            .call(&cert, "secrets.list", Value::Null, None)
            .await?;
        let entries = v
            .get("entries")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|e| pb::SecretEntry {
                        key: s(e, "name"),
                        version: u(e, "version").unwrap_or(0),
                        versions: u(e, "versions").unwrap_or(0),
                        updated_at: s(e, "updated_at"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(tonic::Response::new(pb::ListSecretsResponse { entries }))
    }

    async fn set(
        &self,
        req: tonic::Request<pb::SetSecretRequest>,
    ) -> Result<tonic::Response<pb::SetSecretResponse>, Status> {
        let cert = identity(&req)?;
        let r = req.into_inner();
        let mut p = json!({ "key": r.key, "value": r.value });
        if let Some(e) = r.expected_version {
            p["expected_version"] = json!(e);
        }
        let v = self.inner.call(&cert, "secrets.set", p, None).await?;
        Ok(tonic::Response::new(pb::SetSecretResponse {
            key: s(&v, "key"),
            version: u(&v, "version").unwrap_or(0),
        }))
    }

    async fn delete(
        &self,
        req: tonic::Request<pb::DeleteSecretRequest>,
    ) -> Result<tonic::Response<pb::DeleteSecretResponse>, Status> {
        let cert = identity(&req)?;
        let key = req.into_inner().key;
        let v = self
            .inner
            .call(&cert, "secrets.delete", json!({ "key": key }), None)
            .await?;
        Ok(tonic::Response::new(pb::DeleteSecretResponse {
            key: s(&v, "key"),
            deleted: b(&v, "deleted"),
        }))
    }
}

#[tonic::async_trait]
impl System for Api {
    async fn health(
        &self,
        req: tonic::Request<pb::HealthRequest>,
    ) -> Result<tonic::Response<pb::HealthResponse>, Status> {
        let cert = identity(&req)?;
        // `system.health` needs no token.
        let r = self
            .inner
            .request("system.health", Value::Null, Credential::None);
        let v = decode_reply(&self.inner.core.call(cert, r, None).await)
            .map_err(|(c, m)| status(&c, &m))?;
        Ok(tonic::Response::new(pb::HealthResponse {
            daemon: s(&v, "daemon"),
            version: s(&v, "version"),
            uptime_seconds: u(&v, "uptime_seconds").unwrap_or(0),
            sealed: b(&v, "sealed"),
            secrets_loaded: u(&v, "secrets_loaded").unwrap_or(0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_warden_code_has_its_status() {
        for (c, want) in [
            ("AUTH_REQUIRED", Code::Unauthenticated),
            ("AUTH_EXPIRED", Code::Unauthenticated),
            ("ACCESS_DENIED", Code::PermissionDenied),
            ("AUTH_DENIED", Code::PermissionDenied),
            ("RATE_LIMITED", Code::ResourceExhausted),
            ("VALIDATION_ERROR", Code::InvalidArgument),
            ("SECRET_NOT_FOUND", Code::NotFound),
            ("NOT_FOUND", Code::NotFound),
            ("CONFLICT", Code::Aborted),
            ("DAEMON_LOCKED", Code::FailedPrecondition),
            ("EXECUTION_ERROR", Code::FailedPrecondition),
            ("UNAVAILABLE", Code::Unavailable),
            ("INTEGRITY_ERROR", Code::DataLoss),
            ("INTERNAL_ERROR", Code::Internal),
            ("SOMETHING_NEW", Code::Unknown),
        ] {
            let st = status(c, "why");
            assert_eq!(st.code(), want, "{c}");
            assert_eq!(st.message(), format!("{c}: why"));
            assert_eq!(st.metadata().get(CODE_METADATA).unwrap(), c);
        }
    }

    #[test]
    fn an_output_frame_becomes_raw_bytes_with_the_offset_after_it() {
        let all: Vec<u8> = (0..=255u8).collect();
        let f = crate::jobs::wire::data_frame(
            &json!(1),
            10,
            warden_exec::Stream::Stderr,
            &[bytes::Bytes::from(all.clone())],
        );
        // The same output as a binary frame (what the gateway asks core for) reads the same.
        let b = crate::jobs::wire::binary_frame(
            &json!("x-17"),
            10,
            warden_exec::Stream::Stderr,
            [crate::server::frame::Part::Mem(bytes::Bytes::from(
                all.clone(),
            ))],
        );
        for frame in [f.into(), b.into_bytes().unwrap()] {
            let (ev, next) = attach_event(frame).unwrap();
            let Some(pb::attach_event::Event::Output(o)) = ev.event else {
                panic!("not output: {ev:?}")
            };
            assert_eq!(
                (o.offset, o.stream, next),
                (10, pb::Stream::Stderr as i32, 266)
            );
            assert_eq!(&o.data[..], &all[..]);
        }
        // A truncated or unknown binary frame is an error, never output.
        assert!(attach_event(vec![0, 1, 0, 0].into()).is_err());
        assert!(attach_event(vec![0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0].into()).is_err());
        assert!(attach_event(vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 200].into()).is_err());
        let d = crate::jobs::wire::dropped_frame(&json!(1), 5, 50);
        let (ev, next) = attach_event(d.into()).unwrap();
        assert!(matches!(
            ev.event,
            Some(pb::attach_event::Event::Dropped(pb::Dropped {
                from: 5,
                to: 50
            }))
        ));
        assert_eq!(next, 50);
    }
}
