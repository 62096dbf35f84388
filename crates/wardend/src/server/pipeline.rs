//! The one request pipeline every transport ends in:
//!
//! ```text
//! Request ─▶ authenticate (token | HMAC + timestamp + nonce) ─▶ rate limit ─▶ authorize
//!         ─▶ execute ─▶ audit (durable) ─▶ encode in the caller's dialect
//! ```
//!
//! The order is deliberate. Rate limits are counted after authentication, so that garbage
//! cannot spend a legitimate client's quota; a nonce is remembered only after its signature
//! verified, so that forged requests cannot fill the store; and the reply is encoded only once
//! the audit record is on disk — a request whose record cannot be written fails.

use super::methods::{self, Access, Method, MethodSpec};
use super::state::{Metrics, Peer, Runtime, State};
use crate::audit::{sanitize, AuditRecord, AuditResult};
use crate::auth::cluster::{ClusterStore, Unavailable, UNAVAILABLE_CODE};
use crate::auth::{NonceError, SessionError, SessionInfo, SessionStore, TokenKind};
use crate::identity::Transport;
use crate::policy::{Decision, Grants};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use warden_wire::envelope::{Credential, DecodeFailure, Dialect, Request};
use warden_wire::reply::{encode_lumo, encode_securityd, ErrorBody, ErrorCode};

pub fn err(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code,
        message: message.into(),
        details: None,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn rfc3339(t: SystemTime) -> String {
    let odt = time::OffsetDateTime::from(t);
    odt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// One request's way through the daemon, given the connection's peer. Returns the encoded reply
/// (without framing).
pub async fn process(
    state: &Arc<State>,
    peer: &Arc<Peer>,
    transport: &'static str,
    req: Request,
    sink: Option<StreamSink>,
) -> Vec<u8> {
    let started = Instant::now();
    let request_id = state.next_request_id();
    let rt = state.runtime();
    let grants = peer.grants(&rt);
    let mut ctx = Ctx {
        state,
        rt: &rt,
        peer,
        grants: &grants,
        request_id: &request_id,
        session: None,
        resource: None,
        audit_params: None,
        rate: None,
    };
    let spec = methods::lookup(&req.method).or_else(|| super::commands::route(&req));
    let outcome = ctx.run(spec, &req).await;
    let resource = outcome.resource;
    let mut result = outcome.result;

    let audit_result = match &result {
        Ok(_) => AuditResult::Ok,
        Err(e) if is_denial(e.code) => AuditResult::Denied,
        Err(_) => AuditResult::Error,
    };
    let record = AuditRecord {
        request_id: request_id.clone(),
        principal: peer.audit_json.clone(),
        method: spec
            .map(|s| s.name.to_string())
            .unwrap_or_else(|| truncate(&req.method, 128)),
        resource,
        result: audit_result,
        code: result
            .as_ref()
            .err()
            .map(|e| e.code.as_str(req.dialect).to_string()),
        latency_us: started.elapsed().as_micros() as u64,
        transport,
        params: ctx
            .audit_params
            .take()
            .unwrap_or_else(|| sanitize(&req.params)),
    };
    let written = if spec.is_some_and(|s| s.probe) {
        state.audit.record_queued(record).await
    } else {
        state.audit.record(record).await
    };
    if let Err(e) = written {
        tracing::error!(error = %e, request_id, "audit record not written; failing the request");
        result = Err(err(
            ErrorCode::InternalError,
            "the audit log cannot be written; the request was refused",
        ));
    }
    let streaming = spec.is_some_and(|s| s.streaming);
    if streaming && result.is_ok() {
        // The decision is on disk; now the stream itself. Its frames go out as they come, the
        // final reply (marked final) when it ends.
        result = match sink {
            Some(sink) => ctx.stream(spec.map(|s| s.method), &req, &sink).await,
            None => Err(err(
                ErrorCode::ValidationError,
                "a streaming method needs an `id` in the request",
            )),
        };
    }
    count(&state.metrics, result.is_ok());
    let mut out = Vec::with_capacity(128);
    match req.dialect {
        Dialect::Lumo => encode_lumo(&request_id, result.as_ref(), &mut out),
        Dialect::Securityd => encode_securityd(
            req.id.as_ref(),
            result.as_ref(),
            streaming.then_some(true),
            &mut out,
        ),
    }
    if transport == crate::gateway::TRANSPORT {
        if let Some(d) = ctx.rate.filter(|d| d.limit > 0) {
            crate::gateway::append_rate(&mut out, &d);
        }
    }
    out
}

/// Where a streaming handler sends its frames, tagged with the request's id.
///
/// On the Unix socket (`window: None`) the queue is unbounded on purpose and still bounded in
/// practice: the handler only runs when the connection task polls it, and that task writes the
/// frames out between polls, so a slow client stops the handler rather than filling memory.
/// For the gateway the consumer runs elsewhere (another task, or another process across the
/// channel), so the sink is flow-controlled: [`StreamSink::send_frame`] takes one permit of
/// `window` per frame and waits for the consumer to give it back.
pub struct StreamSink {
    pub tx: tokio::sync::mpsc::UnboundedSender<super::frame::Frame>,
    pub id: Value,
    /// The connection can carry binary frames (length-prefixed framing): a handler may then
    /// send output as [`crate::jobs`]' binary frames instead of base64 in JSON, when asked.
    pub binary: bool,
    /// The consumer sends file parts of a frame itself (the Unix socket, with `sendfile`): a
    /// handler may then hand it output still in a spill file as file ranges, unread.
    pub files: bool,
    /// Frames the consumer may still take; `None`: not flow-controlled.
    pub window: Option<Arc<tokio::sync::Semaphore>>,
}

impl StreamSink {
    /// Sends `data` as a non-final reply once the consumer has room for it. `false`: the
    /// consumer is gone.
    pub async fn send_value(&self, data: &Value) -> bool {
        let mut out = Vec::with_capacity(128);
        encode_securityd(Some(&self.id), Ok(data), Some(false), &mut out);
        self.send_frame(out.into()).await
    }

    /// Sends one frame once the consumer has room for it. `false`: the consumer is gone.
    pub async fn send_frame(&self, frame: super::frame::Frame) -> bool {
        if let Some(w) = &self.window {
            tokio::select! {
                p = w.acquire() => match p {
                    Ok(p) => p.forget(),
                    Err(_) => return false,
                },
                _ = self.tx.closed() => return false,
            }
        }
        self.tx.send(frame).is_ok()
    }

    /// Resolves when the consumer is gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A frame that could not be decoded still gets an audit record and, where the framing allows,
/// an error reply in the dialect it seemed to be written in.
pub async fn reject_undecodable(
    state: &Arc<State>,
    peer: &Arc<Peer>,
    transport: &'static str,
    failure: &DecodeFailure,
    fallback: Dialect,
) -> Vec<u8> {
    let request_id = state.next_request_id();
    let dialect = failure.dialect.unwrap_or(fallback);
    let body = err(ErrorCode::ValidationError, failure.error.to_string());
    audit_rejection(
        state,
        peer,
        transport,
        &request_id,
        "<undecodable>",
        &body,
        dialect,
    )
    .await;
    count(&state.metrics, false);
    encode(dialect, failure.id.as_ref(), &request_id, Err(&body))
}

/// Audits a refusal that happened below the request level (an oversized or truncated frame).
pub async fn audit_rejection(
    state: &Arc<State>,
    peer: &Arc<Peer>,
    transport: &'static str,
    request_id: &str,
    method: &str,
    body: &ErrorBody,
    dialect: Dialect,
) {
    let record = AuditRecord {
        request_id: request_id.to_string(),
        principal: peer.audit_json.clone(),
        method: method.to_string(),
        resource: None,
        result: AuditResult::Error,
        code: Some(body.code.as_str(dialect).to_string()),
        latency_us: 0,
        transport,
        params: json!({ "error": body.message }),
    };
    if let Err(e) = state.audit.record(record).await {
        tracing::error!(error = %e, "audit record of a rejected frame not written");
    }
}

pub fn encode(
    dialect: Dialect,
    id: Option<&Value>,
    request_id: &str,
    result: Result<&Value, &ErrorBody>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    match dialect {
        Dialect::Lumo => encode_lumo(request_id, result, &mut out),
        Dialect::Securityd => encode_securityd(id, result, None, &mut out),
    }
    out
}

fn count(m: &Metrics, ok: bool) {
    m.requests_total.fetch_add(1, Ordering::Relaxed);
    if !ok {
        m.requests_failed.fetch_add(1, Ordering::Relaxed);
    }
    m.last_access_unix.store(now_unix(), Ordering::Relaxed);
}

fn is_denial(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::AuthRequired
            | ErrorCode::AuthExpired
            | ErrorCode::AuthInvalid
            | ErrorCode::AuthDenied
            | ErrorCode::AccessDenied
            | ErrorCode::RateLimited
    )
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

struct Outcome {
    result: Result<Value, ErrorBody>,
    resource: Option<String>,
}

/// What a handler knows about the request it serves.
pub struct Ctx<'a> {
    pub state: &'a Arc<State>,
    pub rt: &'a Runtime,
    pub peer: &'a Arc<Peer>,
    pub grants: &'a Grants,
    pub request_id: &'a str,
    /// The session the request presented, once authenticated.
    pub session: Option<SessionInfo>,
    /// The audit record's resource: the method's permission, or the one a handler checks
    /// per resource (`secrets:read:db`, `commands:service.restart`).
    pub resource: Option<String>,
    /// What the audit record shows as the parameters, when the handler knows better than
    /// sanitizing them by key name (a command's own redacted view).
    pub audit_params: Option<Value>,
    /// The rate-limit decision the request was counted under (for the gateway's
    /// `X-RateLimit-*` headers; never sent to Unix-socket clients).
    pub rate: Option<crate::auth::RateDecision>,
}

impl Ctx<'_> {
    async fn run(&mut self, spec: Option<&'static MethodSpec>, req: &Request) -> Outcome {
        let result = self.run_inner(spec, req).await;
        Outcome {
            result,
            resource: self.resource.take(),
        }
    }

    async fn run_inner(
        &mut self,
        spec: Option<&'static MethodSpec>,
        req: &Request,
    ) -> Result<Value, ErrorBody> {
        // Lumo authenticates before it looks the command up, so an unauthenticated caller
        // learns nothing about which commands exist.
        if req.dialect == Dialect::Lumo {
            self.authenticate_hmac(req).await?;
        }
        let spec = spec.ok_or_else(|| {
            err(
                ErrorCode::ValidationError,
                format!("unknown method `{}`", truncate(&req.method, 128)),
            )
        })?;
        if req.dialect != Dialect::Lumo {
            self.authenticate_token(spec, req).await?;
        }
        self.rate_limit(spec).await?;
        if spec.method == Method::CommandsRun {
            return super::commands::run(self, req).await;
        }
        if let Some(permission) = spec.permission {
            self.resource = Some(permission.to_string());
            self.authorize(permission)?;
        }
        if spec.streaming {
            // Granted; the stream starts once the decision is audited (see `process`).
            return Ok(Value::Null);
        }
        self.execute(spec.method, req).await
    }

    /// Runs a streaming method whose decision is already audited.
    async fn stream(
        &self,
        method: Option<Method>,
        req: &Request,
        sink: &StreamSink,
    ) -> Result<Value, ErrorBody> {
        match method {
            Some(Method::AuditTail) => {
                let lines = match req.params.get("lines") {
                    None => 20,
                    Some(v) => v.as_u64().filter(|n| *n <= 100_000).ok_or_else(|| {
                        err(
                            ErrorCode::ValidationError,
                            "`lines` must be an integer from 0 to 100000",
                        )
                    })? as usize,
                };
                let follow = match req.params.get("follow") {
                    None => false,
                    Some(v) => v.as_bool().ok_or_else(|| {
                        err(ErrorCode::ValidationError, "`follow` must be true or false")
                    })?,
                };
                let mut sent = 0u64;
                let mut t = crate::audit::Tail::start(self.state.audit.path(), lines, follow);
                'lines: while let Some(batch) = t.next_batch().await {
                    for line in &batch {
                        let record: Value = serde_json::from_str(line)
                            .unwrap_or_else(|_| Value::String(line.to_string()));
                        // Waits for the consumer's window, so a slow reader holds back the
                        // reading of the file rather than filling memory.
                        if !sink.send_value(&record).await {
                            break 'lines;
                        }
                        sent += 1;
                    }
                }
                t.finish().await.map_err(|e| {
                    err(
                        ErrorCode::InternalError,
                        format!("cannot read the audit log: {e}"),
                    )
                })?;
                Ok(json!({ "records": sent }))
            }
            Some(Method::JobsAttach) => crate::jobs::api::attach(self, req, sink).await,
            Some(Method::JobsRun) => crate::jobs::api::run(self, req, sink).await,
            Some(Method::SecretWatch) => super::secrets::watch(self, req, sink).await,
            _ => Err(err(ErrorCode::InternalError, "not a streaming method")),
        }
    }

    /// Lumo: the peer must be known to the policy, the timestamp fresh, the signature good
    /// (over the params as sent or in canonical form), and the nonce unused.
    async fn authenticate_hmac(&self, req: &Request) -> Result<(), ErrorBody> {
        if !self.rt.policy.is_member(self.grants) {
            return Err(err(
                ErrorCode::AuthDenied,
                format!(
                    "uid {} is not allowed to use this daemon",
                    self.peer.principal.uid
                ),
            ));
        }
        let Credential::Hmac {
            timestamp, nonce, ..
        } = &req.credential
        else {
            return Err(err(
                ErrorCode::AuthRequired,
                "request is not signed: timestamp, nonce and signature are required",
            ));
        };
        let now = now_unix();
        let max_age = self.rt.config.auth.max_request_age.get().as_secs();
        if timestamp.abs_diff(now) > max_age {
            return Err(err(
                ErrorCode::AuthExpired,
                format!(
                    "timestamp {timestamp} is outside the accepted window of {max_age} s around {now}"
                ),
            ));
        }
        let key = self.rt.hmac_key(self.grants).ok_or_else(|| {
            err(
                ErrorCode::AuthDenied,
                "no HMAC key is configured for this principal",
            )
        })?;
        if !warden_wire::hmac::verify_lumo_with(key, req) {
            return Err(err(ErrorCode::AuthInvalid, "invalid signature"));
        }
        let checked = match &self.state.cluster {
            None => self.state.nonces.check_and_insert(nonce, *timestamp, now),
            // Never a local fallback: a nonce only this daemon remembers could be replayed on
            // every other one.
            Some(c) => c
                .check_nonce(nonce, *timestamp, now, max_age)
                .await
                .map_err(|e| unavailable(&e, "HMAC request"))?,
        };
        checked.map_err(|e| match e {
            NonceError::Replayed => err(
                ErrorCode::AuthInvalid,
                "nonce already used (replay refused)",
            ),
            other => err(ErrorCode::AuthInvalid, other.to_string()),
        })
    }

    /// securityd and warden dialects: a session token, unless the method needs none.
    async fn authenticate_token(
        &mut self,
        spec: &MethodSpec,
        req: &Request,
    ) -> Result<(), ErrorBody> {
        match spec.access {
            Access::Open => return Ok(()),
            Access::Member => return self.require_member(),
            Access::Credential | Access::Admin => {}
        }
        let token = match &req.credential {
            Credential::Token(t) => t,
            Credential::Peer => return self.authenticate_peer(spec),
            _ => {
                return Err(err(
                    ErrorCode::AuthRequired,
                    "a token is required: call `auth` first",
                ))
            }
        };
        let (key, now) = (&self.peer.key, SystemTime::now());
        let info = self
            .sessions(
                |local| local.validate(token, key, now),
                |shared| shared.validate(token, key, now),
            )
            .await?;
        if spec.access == Access::Admin && info.kind != TokenKind::Admin {
            return Err(err(
                ErrorCode::AuthDenied,
                "this method needs an admin token: call `auth` with type = \"admin\"",
            ));
        }
        self.session = Some(info);
        Ok(())
    }

    /// Some policy rule matches the caller: what `auth` asks before it issues a token.
    fn require_member(&self) -> Result<(), ErrorBody> {
        if self.rt.policy.is_member(self.grants) {
            return Ok(());
        }
        let p = &self.peer.principal;
        Err(err(
            ErrorCode::AuthDenied,
            format!(
                "uid {} ({}) matches no policy rule",
                p.uid,
                p.exe
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        ))
    }

    /// `"credential": "peer"`: the request stands on the peer the kernel identified for this
    /// connection, as `auth` would, without a session to create and revoke around it (what a
    /// one-shot caller such as the CLI needs). The checks are those of `auth` for a session
    /// token, so this grants nothing a token would not: Unix socket only (a certificate peer
    /// presents a token, as the REST and gRPC APIs require), and never an admin method, which
    /// needs the short-lived admin token.
    fn authenticate_peer(&self, spec: &MethodSpec) -> Result<(), ErrorBody> {
        let p = &self.peer.principal;
        if p.transport != Transport::Unix || p.cert.is_some() {
            return Err(err(
                ErrorCode::AuthRequired,
                "the peer credential is for the Unix socket: present a token",
            ));
        }
        if spec.access == Access::Admin {
            return Err(err(
                ErrorCode::AuthDenied,
                "this method needs an admin token: call `auth` with type = \"admin\"",
            ));
        }
        self.require_member()
    }

    /// Counts the request against its principal's limit (in Redis when the daemon shares one)
    /// and keeps the decision, which the gateway turns into `X-RateLimit-*` headers.
    async fn rate_limit(&mut self, spec: &MethodSpec) -> Result<(), ErrorBody> {
        let s = self.state;
        let local = || s.limiter.check(&self.peer.key, spec.class, Instant::now());
        let d = match &s.cluster {
            None => local(),
            Some(c) => {
                let rate = s.limiter.rate(spec.class);
                if rate.is_unlimited() {
                    local()
                } else {
                    match c.check_rate(&self.peer.key, spec.class, rate).await {
                        Ok(d) => d,
                        Err(e) if c.falls_back() => {
                            tracing::warn!(error = %e, "rate limit counted in this daemon's memory");
                            local()
                        }
                        Err(e) => return Err(unavailable(&e, "request")),
                    }
                }
            }
        };
        self.rate = Some(d);
        if d.allowed {
            return Ok(());
        }
        Err(ErrorBody {
            code: ErrorCode::RateLimited,
            message: format!(
                "rate limit of {} requests exceeded; retry in {} s",
                d.limit,
                d.reset_after.as_secs().max(1)
            ),
            details: Some(json!({
                "limit": d.limit,
                "remaining": d.remaining,
                "reset": d.reset_after.as_secs().max(1),
            })),
        })
    }

    pub fn authorize(&self, permission: &str) -> Result<(), ErrorBody> {
        match self.rt.policy.decide(self.grants, permission) {
            Decision::Allow { .. } => Ok(()),
            Decision::Deny { reason } => Err(err(
                ErrorCode::AccessDenied,
                format!("permission `{permission}` denied: {reason}"),
            )),
        }
    }

    async fn execute(&mut self, method: Method, req: &Request) -> Result<Value, ErrorBody> {
        let s = self.state;
        let m = &s.metrics;
        match method {
            Method::Ping => Ok(json!({
                "pong": true,
                "request_id": self.request_id,
                "timestamp": now_unix(),
            })),
            Method::Metrics => {
                let audit = s.audit.stats();
                Ok(json!({
                    "uptime_seconds": s.started.elapsed().as_secs(),
                    "requests_total": Metrics::get(&m.requests_total),
                    "requests_failed": Metrics::get(&m.requests_failed),
                    "active_connections": m.active_connections.load(Ordering::Relaxed),
                    "connections_total": Metrics::get(&m.connections_total),
                    "connections_refused": Metrics::get(&m.connections_refused),
                    "nonce_store_size": s.nonces.len(),
                    "active_sessions": s.sessions.live_count(),
                    "audit_records": audit.records,
                    "audit_syncs": audit.syncs,
                    "audit_write_errors": audit.write_errors,
                    "version": env!("CARGO_PKG_VERSION"),
                }))
            }
            Method::Health => {
                let last = Metrics::get(&m.last_access_unix);
                Ok(json!({
                    "daemon": "warden",
                    "status": "ok",
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_seconds": s.started.elapsed().as_secs(),
                    "sealed": s.secrets.is_sealed(),
                    "secrets_loaded": s.secrets.loaded(),
                    "active_sessions": s.sessions.live_count(),
                    "last_access": (last > 0).then(|| rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(last))),
                }))
            }
            Method::Methods => Ok(Value::Array(
                methods::METHODS
                    .iter()
                    .map(|m| {
                        json!({
                            "name": m.name,
                            "aliases": m.aliases,
                            "access": m.access,
                            "permission": m.permission,
                            "summary": m.summary,
                        })
                    })
                    .collect(),
            )),
            Method::Auth => self.login(req).await,
            Method::Refresh => {
                let Credential::Token(t) = &req.credential else {
                    return Err(err(ErrorCode::AuthRequired, "no token to refresh"));
                };
                let (key, now) = (&self.peer.key, SystemTime::now());
                let cfg = s.sessions.config();
                let issued = self
                    .sessions(
                        |local| local.refresh(t, key, now),
                        |shared| shared.replace(&cfg, t, key, now, false),
                    )
                    .await?;
                Ok(json!({
                    "token": issued.token.as_str(),
                    "expires_at": rfc3339(issued.expires_at),
                    "type": issued.kind,
                }))
            }
            Method::Logout => {
                let Credential::Token(t) = &req.credential else {
                    return Err(err(ErrorCode::AuthRequired, "no token to revoke"));
                };
                let key = &self.peer.key;
                self.sessions(|local| local.revoke(t, key), |shared| shared.revoke(t, key))
                    .await?;
                Ok(json!({ "message": "logged out" }))
            }
            Method::Status => {
                let components = s.components();
                let audit = s.audit.stats();
                Ok(json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    // The daemon's pid: the monitor's under privilege separation (the pid file's).
                    "pid": components.as_ref().and_then(|c| c.iter().find(|c| c.role == "monitor").and_then(|c| c.pid)).unwrap_or(std::process::id() as i32),
                    "mode": if components.is_some() { "privsep" } else { "single" },
                    "components": components.clone().unwrap_or_else(|| vec![crate::privsep::control::ComponentStatus {
                        role: "core".into(),
                        pid: Some(std::process::id() as i32),
                        uptime_seconds: s.started.elapsed().as_secs(),
                        restarts: 0,
                        heartbeat_rtt_us: None,
                    }]),
                    "started_at": rfc3339(s.started_at),
                    "uptime_seconds": s.started.elapsed().as_secs(),
                    "sealed": s.secrets.is_sealed(),
                    "secrets_loaded": s.secrets.loaded(),
                    "dev_mode": s.dev_mode,
                    "socket": self.rt.config.socket.path,
                    "config": s.config_path,
                    "connections": m.active_connections.load(Ordering::Relaxed),
                    "connections_total": Metrics::get(&m.connections_total),
                    "requests_served": Metrics::get(&m.requests_total),
                    "requests_failed": Metrics::get(&m.requests_failed),
                    "active_sessions": s.sessions.live_count(),
                    "nonce_store_size": s.nonces.len(),
                    "audit_log": s.audit.path(),
                    "audit_last_seq": audit.last_seq,
                    "audit_write_errors": audit.write_errors,
                    "audit_last_error": audit.last_error,
                    "config_generation": self.rt.generation,
                    "job_cgroups": s.jobs.describe().unwrap_or_else(|e| vec![format!("unavailable: {e}")]),
                }))
            }
            Method::SecretGet
            | Method::SecretGetMany
            | Method::SecretList
            | Method::SecretVersions
            | Method::SecretSet
            | Method::SecretDelete
            | Method::SecretDestroy
            | Method::SecretRotateMaster
            | Method::SecretRekey
            | Method::Seal
            | Method::Unseal => self.secrets(method, req).await,
            Method::CommandsList => Ok(super::commands::list()),
            Method::CommandsRun => Err(err(
                ErrorCode::InternalError,
                "commands run through `server::commands::run`",
            )),
            Method::JobsStart | Method::JobsList | Method::JobsStatus | Method::JobsStop => {
                crate::jobs::api::execute(self, method, req).await
            }
            Method::AuditTail | Method::JobsAttach | Method::JobsRun | Method::SecretWatch => {
                Err(err(
                    ErrorCode::InternalError,
                    "a streaming method runs through `stream`",
                ))
            }
            Method::Reload => {
                let report = s.reload().map_err(|e| {
                    err(
                        ErrorCode::ValidationError,
                        format!("reload refused, running configuration kept: {e}"),
                    )
                })?;
                Ok(json!({
                    "reloaded_at": rfc3339(SystemTime::now()),
                    "generation": report.generation,
                    "needs_restart": report.needs_restart,
                    "secrets_loaded": s.secrets.loaded(),
                }))
            }
        }
    }

    /// `auth`: the kernel's view of the caller decides; the pid, exe or cmdline a client puts
    /// in its params are claims and are ignored (they are still audited, sanitized).
    async fn login(&self, req: &Request) -> Result<Value, ErrorBody> {
        let s = self.state;
        let now = SystemTime::now();
        let key = &self.peer.key;
        let cfg = s.sessions.config();
        let issued = if let Some(b) = req.params.get("bootstrap") {
            let b = b
                .as_str()
                .ok_or_else(|| err(ErrorCode::ValidationError, "`bootstrap` must be a string"))?;
            self.sessions(
                |local| local.redeem_bootstrap(b, key, now),
                |shared| shared.replace(&cfg, b, key, now, true),
            )
            .await?
        } else {
            let kind = match req.params.get("type").and_then(Value::as_str) {
                None | Some("session") => TokenKind::Session,
                Some("admin") => {
                    self.authorize("admin:token")?;
                    TokenKind::Admin
                }
                Some("bootstrap") => {
                    // A bootstrap token is made by an admin *for* another principal, who
                    // redeems it once for a session (e.g. a container's first credential).
                    self.authorize("admin:bootstrap")?;
                    let target = bootstrap_target(&req.params)?;
                    let issued = self
                        .sessions(
                            |local| local.issue(&target, TokenKind::Bootstrap, now),
                            |shared| shared.issue(&cfg, &target, TokenKind::Bootstrap, now),
                        )
                        .await?;
                    return Ok(json!({
                        "token": issued.token.as_str(),
                        "expires_at": rfc3339(issued.expires_at),
                        "type": issued.kind,
                        "for": target,
                    }));
                }
                Some(other) => {
                    return Err(err(
                        ErrorCode::ValidationError,
                        format!(
                            "unknown token type `{}`: expected session, admin or bootstrap",
                            truncate(other, 32)
                        ),
                    ))
                }
            };
            self.sessions(
                |local| local.issue(key, kind, now),
                |shared| shared.issue(&cfg, key, kind, now),
            )
            .await?
        };
        let allowed = self
            .rt
            .policy
            .allowed_patterns(self.grants, "secrets:read:");
        Ok(json!({
            "token": issued.token.as_str(),
            "expires_at": rfc3339(issued.expires_at),
            "type": issued.kind,
            "allowed_secrets": allowed,
        }))
    }
}

impl<'a> Ctx<'a> {
    /// One session operation on the store in use: this daemon's memory, or the shared store,
    /// falling back to memory while it is unreachable if `[cluster] session_fallback = "local"`.
    async fn sessions<T, F>(
        &self,
        local: impl FnOnce(&'a SessionStore) -> Result<T, SessionError>,
        shared: impl FnOnce(&'a ClusterStore) -> F,
    ) -> Result<T, ErrorBody>
    where
        F: std::future::Future<Output = Result<Result<T, SessionError>, Unavailable>>,
    {
        let s: &'a State = self.state;
        match &s.cluster {
            None => local(&s.sessions).map_err(session_error),
            Some(c) => match shared(c).await {
                Ok(r) => r.map_err(session_error),
                Err(e) if c.falls_back() => {
                    tracing::warn!(error = %e, "session served from this daemon's memory");
                    local(&s.sessions).map_err(session_error)
                }
                Err(e) => Err(unavailable(&e, "token request")),
            },
        }
    }
}

/// The refusal of a request that needed the shared store while it was unreachable.
fn unavailable(e: &Unavailable, what: &str) -> ErrorBody {
    tracing::warn!(error = %e, "{what} refused: the shared store is unavailable");
    err(
        ErrorCode::Custom(UNAVAILABLE_CODE),
        format!("{e}; the {what} was refused (fail closed), retry once Redis is reachable again"),
    )
}

/// The principal a bootstrap token is for: `"for": "uid:1000"` or `"for": "cert:<hex id>"`.
fn bootstrap_target(params: &Value) -> Result<String, ErrorBody> {
    let bad = || {
        err(
            ErrorCode::ValidationError,
            "a bootstrap token needs `for`: \"uid:N\" or \"cert:<64 hex>\"",
        )
    };
    let target = params.get("for").and_then(Value::as_str).ok_or_else(bad)?;
    let ok = match target.split_once(':') {
        Some(("uid", n)) => n.parse::<u32>().is_ok(),
        Some(("cert", id)) => id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        _ => false,
    };
    if ok {
        Ok(target.to_string())
    } else {
        Err(bad())
    }
}

fn session_error(e: SessionError) -> ErrorBody {
    let code = match e {
        SessionError::Expired => ErrorCode::AuthExpired,
        SessionError::TooManySessions { .. } => ErrorCode::RateLimited,
        SessionError::WrongPrincipal => ErrorCode::AuthInvalid,
        _ => ErrorCode::AuthInvalid,
    };
    err(code, e.to_string())
}
