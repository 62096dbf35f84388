//! The REST API: securityd's HTTPS endpoints (`PROTOCOLS.md`), plus secret writes and
//! Prometheus metrics, each one warden method called through [`Core`].
//!
//! Replies are the securityd envelope (`{"status": "ok", "data": …}` or `{"status": "error",
//! "error": {"code", "message"}}`) with the HTTP status of the error code, and the
//! `X-RateLimit-Limit/Remaining/Reset` headers of the rate-limit class the method counted
//! against (none when that class is unlimited). Bad input — not JSON, a body over
//! `gateway.max_body_size`, an unknown route or method — is answered with the same error
//! envelope and a 4xx status.
//!
//! What it deliberately does not do: authenticate or authorize. The certificate identity comes
//! from the TLS layer (in the request's extensions), the bearer token is passed on as it came,
//! and core decides.

// A handler's early return is an axum `Response`; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use super::{Core, TRANSPORT};
use crate::identity::CertIdentity;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use warden_wire::envelope::{Credential, Dialect, Request};

type Shared = Arc<dyn Core>;

/// The REST routes. Every request must carry a [`CertIdentity`] in its extensions (the TLS
/// layer puts it there); one without is refused. The body limit is the caller's to set
/// (`axum::extract::DefaultBodyLimit` on the merged router; [`super::serve::router`] does).
pub fn app(core: Arc<dyn Core>) -> Router {
    Router::new()
        .route("/auth/validate", post(auth_validate))
        .route("/auth/refresh", post(auth_refresh))
        .route("/auth/logout", post(auth_logout))
        .route("/secrets", get(secrets_list))
        .route("/secrets/batch", post(secrets_batch))
        .route(
            "/secrets/{key}",
            get(secret_get).put(secret_put).delete(secret_delete),
        )
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/rotate", post(admin_rotate))
        .route("/admin/reload", post(admin_reload))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "VALIDATION_ERROR",
                "this endpoint does not answer that HTTP method",
            )
        })
        .with_state(core)
}

pub(super) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"status": "error", "error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// The HTTP status of a securityd/warden error code (`PROTOCOLS.md`).
pub fn status_of(code: &str) -> StatusCode {
    let n = match code {
        "AUTH_REQUIRED" | "AUTH_EXPIRED" | "AUTH_INVALID" => 401,
        "AUTH_DENIED" | "ACCESS_DENIED" => 403,
        "SECRET_NOT_FOUND" | "NOT_FOUND" => 404,
        "RATE_LIMITED" => 429,
        "VALIDATION_ERROR" => 400,
        "CONFLICT" => 409,
        "DAEMON_LOCKED" | "UNAVAILABLE" => 503,
        "TIMEOUT" => 504,
        _ => 500,
    };
    StatusCode::from_u16(n).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn bearer(h: &HeaderMap) -> Credential {
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| Credential::Token(t.trim().to_string()))
        .unwrap_or(Credential::None)
}

/// Calls `method` and turns core's reply into the HTTP response.
async fn call(
    core: &Shared,
    cert: Option<Extension<CertIdentity>>,
    h: &HeaderMap,
    method: &str,
    params: Value,
) -> Result<(HeaderMap, Value), Response> {
    let Some(Extension(cert)) = cert else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "AUTH_REQUIRED",
            "no client certificate on this connection",
        ));
    };
    let req = Request {
        dialect: Dialect::Securityd,
        method: method.to_string(),
        id: None,
        params,
        params_raw: None,
        credential: bearer(h),
    };
    let bytes = core.call(cert, req, None).await;
    let mut reply: Map<String, Value> = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => m,
        _ => {
            tracing::error!(transport = TRANSPORT, "core's reply is not a JSON object");
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "core's reply could not be read",
            ));
        }
    };
    let mut headers = HeaderMap::new();
    if let Some(Value::Object(r)) = reply.remove(super::RATE_FIELD) {
        for (name, k) in [
            ("x-ratelimit-limit", "limit"),
            ("x-ratelimit-remaining", "remaining"),
            ("x-ratelimit-reset", "reset"),
        ] {
            if let Some(n) = r.get(k).and_then(Value::as_u64) {
                headers.insert(name, HeaderValue::from(n));
            }
        }
    }
    Ok((headers, Value::Object(reply)))
}

async fn respond(
    core: &Shared,
    cert: Option<Extension<CertIdentity>>,
    h: &HeaderMap,
    method: &str,
    params: Value,
) -> Response {
    match call(core, cert, h, method, params).await {
        Err(r) => r,
        Ok((mut headers, reply)) => {
            let status = match reply.get("status").and_then(Value::as_str) {
                Some("ok") => StatusCode::OK,
                _ => {
                    let code = reply["error"]["code"].as_str().unwrap_or("INTERNAL_ERROR");
                    let status = status_of(code);
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        if let Some(v) = headers.get("x-ratelimit-reset").cloned() {
                            headers.insert(header::RETRY_AFTER, v);
                        }
                    }
                    status
                }
            };
            (status, headers, axum::Json(reply)).into_response()
        }
    }
}

/// A JSON object body; an empty body is `{}`.
fn body(b: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, Response> {
    let b = b.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "PAYLOAD_TOO_LARGE"
        } else {
            "VALIDATION_ERROR"
        };
        error(status, code, &e.body_text())
    })?;
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(&b) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "the body must be a JSON object",
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            &format!("the body is not JSON: {e}"),
        )),
    }
}

macro_rules! plain_handlers {
    ($($name:ident => $method:literal),* $(,)?) => {$(
        async fn $name(
            s: State<Shared>,
            c: Option<Extension<CertIdentity>>,
            h: HeaderMap,
        ) -> Response {
            plain(s, c, h, $method).await
        }
    )*};
}

plain_handlers! {
    auth_refresh => "auth.refresh",
    auth_logout => "auth.logout",
    secrets_list => "secrets.list",
    health => "system.health",
    admin_reload => "daemon.reload",
}

async fn plain(
    State(core): State<Shared>,
    cert: Option<Extension<CertIdentity>>,
    h: HeaderMap,
    method: &'static str,
) -> Response {
    respond(&core, cert, &h, method, json!({})).await
}

/// `POST /auth/validate` (`client_id`, `metadata`, and warden's `type` for an admin token).
/// `client_id` and `metadata` are claims: the session is bound to the certificate identity.
async fn auth_validate(
    State(core): State<Shared>,
    cert: Option<Extension<CertIdentity>>,
    h: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let b = match body(b) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut params = Map::new();
    if let Some(t) = b.get("type") {
        params.insert("type".into(), t.clone());
    }
    respond(&core, cert, &h, "auth.login", Value::Object(params)).await
}

async fn secret_get(
    State(core): State<Shared>,
    cert: Option<Extension<CertIdentity>>,
    h: HeaderMap,
    Path(key): Path<String>,
) -> Response {
    respond(&core, cert, &h, "secrets.get", json!({ "key": key })).await
}

async fn secret_put(
    State(core): State<Shared>,
    cert: Option<Extension<CertIdentity>>,
    h: HeaderMap,
    Path(key): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let mut b = match body(b) {
        Ok(b) => b,
        Err(r) => return r,
    };
    b.insert("key".into(), Value::String(key));
    respond(&core, cert, &h, "secrets.set", Value::Object(b)).await
}

async fn secret_delete(
    State(core): State<Shared>,
    cert: Option<Extension<CertIdentity>>,
    h: HeaderMap,
    Path(key): Path<String>,
) -> Response {
    respond(&core, cert, &h, "secrets.delete", json!({ "key": key })).await
}

async fn secrets_batch(
    State(core): State<Shared>,
    cert: Option<Extension<CertIdentity>>,
    h: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let b = match body(b) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let keys = b.get("keys").cloned().unwrap_or(Value::Null);
    respond(&core, cert, &h, "secrets.get_many", json!({ "keys": keys })).await
}

async fn admin_rotate(
    State(core): State<Shared>,
    cert: Option<Extension<CertIdentity>>,
    h: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let b = match body(b) {
        Ok(b) => b,
        Err(r) => return r,
    };
    respond(&core, cert, &h, "secrets.rotate_master", Value::Object(b)).await
}

/// `GET /metrics`: `system.metrics` in the Prometheus text format, every number a gauge
/// named `warden_<field>`.
async fn metrics(
    State(core): State<Shared>,
    cert: Option<Extension<CertIdentity>>,
    h: HeaderMap,
) -> Response {
    match call(&core, cert, &h, "system.metrics", json!({})).await {
        Err(r) => r,
        Ok((headers, reply)) => {
            if reply.get("status").and_then(Value::as_str) != Some("ok") {
                let code = reply["error"]["code"].as_str().unwrap_or("INTERNAL_ERROR");
                return (status_of(code), headers, axum::Json(reply)).into_response();
            }
            (
                StatusCode::OK,
                headers,
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                prometheus(&reply["data"]),
            )
                .into_response()
        }
    }
}

fn prometheus(data: &Value) -> String {
    let mut out = String::new();
    if let Some(m) = data.as_object() {
        for (k, v) in m {
            if let Some(n) = v.as_f64() {
                let name: String = k
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                out.push_str(&format!("# TYPE warden_{name} gauge\nwarden_{name} {n}\n"));
            }
        }
        if let Some(v) = m.get("version").and_then(Value::as_str) {
            out.push_str(&format!(
                "# TYPE warden_build_info gauge\nwarden_build_info{{version=\"{v}\"}} 1\n"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_the_protocol_statuses() {
        for (code, n) in [
            ("AUTH_REQUIRED", 401),
            ("AUTH_EXPIRED", 401),
            ("AUTH_INVALID", 401),
            ("AUTH_DENIED", 403),
            ("ACCESS_DENIED", 403),
            ("SECRET_NOT_FOUND", 404),
            ("RATE_LIMITED", 429),
            ("INTERNAL_ERROR", 500),
            ("DAEMON_LOCKED", 503),
        ] {
            assert_eq!(status_of(code).as_u16(), n, "{code}");
        }
    }

    #[test]
    fn metrics_are_gauges_in_the_text_format() {
        let t = prometheus(&json!({"requests_total": 3, "version": "0.1.0", "uptime_seconds": 7}));
        assert!(
            t.contains("# TYPE warden_requests_total gauge\nwarden_requests_total 3\n"),
            "{t}"
        );
        assert!(t.contains("warden_uptime_seconds 7\n"), "{t}");
        assert!(
            t.contains("warden_build_info{version=\"0.1.0\"} 1\n"),
            "{t}"
        );
    }
}
