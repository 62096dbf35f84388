//! Replies: error codes and the reply shapes of both dialects.
//!
//! The daemon decides *what* to answer with one dialect-neutral [`ErrorCode`]; this module
//! decides how each dialect spells it. Lumo has one code for every authentication failure
//! (`AUTH_ERROR`), securityd distinguishes five; codes neither dialect has (`CONFLICT`,
//! `TIMEOUT`, …) are warden's own and spelled the same in both.
//!
//! Replies are compact JSON without a trailing newline (framing adds one where it needs it),
//! written straight from borrowed structs into the caller's buffer.

use serde::Serialize;
use serde_json::Value;

use crate::envelope::Dialect;

/// What went wrong, independent of dialect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No credential was given.
    AuthRequired,
    /// The credential has expired (a session token, or a Lumo timestamp out of the window).
    AuthExpired,
    /// The credential is wrong (bad signature, unknown token, reused nonce).
    AuthInvalid,
    /// The client is authenticated but not allowed to authenticate (peer not in the allowed list).
    AuthDenied,
    /// The client is authenticated but not allowed this method or resource.
    AccessDenied,
    /// No such secret or version: securityd's `SECRET_NOT_FOUND` (`NOT_FOUND` in Lumo).
    SecretNotFound,
    /// Something else asked for does not exist (a job, a file): `NOT_FOUND` in every dialect.
    NotFound,
    /// Too many requests; try again later.
    RateLimited,
    /// The request is malformed or its parameters are invalid.
    ValidationError,
    /// The command ran and failed.
    ExecutionError,
    /// A bug or an unexpected failure inside warden.
    InternalError,
    /// The secret store is sealed.
    DaemonLocked,
    /// The service needed is not available right now.
    Unavailable,
    /// The request conflicts with the current state.
    Conflict,
    /// The operation took too long.
    Timeout,
    /// A command-specific code (e.g. Lumo's `FILE_EXISTS`), spelled the same in both dialects.
    Custom(&'static str),
}

impl ErrorCode {
    /// How `dialect` spells this code.
    pub fn as_str(self, dialect: Dialect) -> &'static str {
        use ErrorCode::*;
        match (self, dialect) {
            (
                AuthRequired | AuthExpired | AuthInvalid | AuthDenied | AccessDenied,
                Dialect::Lumo,
            ) => "AUTH_ERROR",
            (AuthRequired, Dialect::Securityd) => "AUTH_REQUIRED",
            (AuthExpired, Dialect::Securityd) => "AUTH_EXPIRED",
            (AuthInvalid, Dialect::Securityd) => "AUTH_INVALID",
            (AuthDenied, Dialect::Securityd) => "AUTH_DENIED",
            (AccessDenied, Dialect::Securityd) => "ACCESS_DENIED",
            (SecretNotFound, Dialect::Securityd) => "SECRET_NOT_FOUND",
            (SecretNotFound | NotFound, _) => "NOT_FOUND",
            (RateLimited, _) => "RATE_LIMITED",
            (ValidationError, _) => "VALIDATION_ERROR",
            (ExecutionError, _) => "EXECUTION_ERROR",
            (InternalError, _) => "INTERNAL_ERROR",
            (DaemonLocked, _) => "DAEMON_LOCKED",
            (Unavailable, _) => "UNAVAILABLE",
            (Conflict, _) => "CONFLICT",
            (Timeout, _) => "TIMEOUT",
            (Custom(code), _) => code,
        }
    }

    /// The HTTP status for this code (securityd's mapping in `PROTOCOLS.md`, extended to
    /// warden's codes). Command-specific codes are 500, like the execution failures they are.
    pub fn http_status(self) -> u16 {
        use ErrorCode::*;
        match self {
            AuthRequired | AuthExpired | AuthInvalid => 401,
            AuthDenied | AccessDenied => 403,
            SecretNotFound | NotFound => 404,
            RateLimited => 429,
            ValidationError => 400,
            Conflict => 409,
            ExecutionError | InternalError | Custom(_) => 500,
            DaemonLocked | Unavailable => 503,
            Timeout => 504,
        }
    }

    /// Reads a code as either dialect spells it, for clients. Lumo's `AUTH_ERROR` reads as
    /// [`ErrorCode::AuthInvalid`]. Command-specific codes are not known here: `None`, and the
    /// caller keeps the string.
    #[allow(clippy::should_implement_trait)] // returns Option, not FromStr's Result
    pub fn from_str(code: &str) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match code {
            "AUTH_ERROR" | "AUTH_INVALID" => AuthInvalid,
            "AUTH_REQUIRED" => AuthRequired,
            "AUTH_EXPIRED" => AuthExpired,
            "AUTH_DENIED" => AuthDenied,
            "ACCESS_DENIED" => AccessDenied,
            "SECRET_NOT_FOUND" => SecretNotFound,
            "NOT_FOUND" => NotFound,
            "RATE_LIMITED" => RateLimited,
            "VALIDATION_ERROR" => ValidationError,
            "EXECUTION_ERROR" => ExecutionError,
            "INTERNAL_ERROR" => InternalError,
            "DAEMON_LOCKED" => DaemonLocked,
            "UNAVAILABLE" => Unavailable,
            "CONFLICT" => Conflict,
            "TIMEOUT" => Timeout,
            _ => return None,
        })
    }
}

/// An error reply's content.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorBody {
    /// What went wrong.
    pub code: ErrorCode,
    /// A message for the person at the other end: what happened and what to do.
    pub message: String,
    /// Structured details, if any (e.g. which parameter was invalid).
    pub details: Option<Value>,
}

impl ErrorBody {
    /// An error without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// The same error with `details`.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a Value>,
}

impl<'a> ErrorOut<'a> {
    fn new(body: &'a ErrorBody, dialect: Dialect) -> Self {
        ErrorOut {
            code: body.code.as_str(dialect),
            message: &body.message,
            details: body.details.as_ref(),
        }
    }
}

#[derive(Serialize)]
struct LumoReply<'a> {
    success: bool,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorOut<'a>>,
}

/// Appends a Lumo reply to `out`:
/// `{"success":true,"request_id":…,"data":…}` or
/// `{"success":false,"request_id":…,"error":{"code":…,"message":…,"details":…}}`
/// (`details` only when present).
pub fn encode_lumo(request_id: &str, result: Result<&Value, &ErrorBody>, out: &mut Vec<u8>) {
    let reply = match result {
        Ok(data) => LumoReply {
            success: true,
            request_id,
            data: Some(data),
            error: None,
        },
        Err(body) => LumoReply {
            success: false,
            request_id,
            data: None,
            error: Some(ErrorOut::new(body, Dialect::Lumo)),
        },
    };
    write_json(&reply, out);
}

#[derive(Serialize)]
struct SecuritydReply<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(rename = "final", skip_serializing_if = "Option::is_none")]
    is_final: Option<bool>,
}

/// Appends a securityd/warden reply to `out`:
/// `{"status":"ok","data":…}` or `{"status":"error","error":{"code":…,"message":…}}`, then
/// `"id"` when the request had one, then for a frame of a streamed reply (`stream_final` is
/// `Some`) `"stream":true,"final":…`. An error's `details`, which securityd does not have, are
/// included when present (as `error.details`; securityd clients ignore unknown fields).
pub fn encode_securityd(
    id: Option<&Value>,
    result: Result<&Value, &ErrorBody>,
    stream_final: Option<bool>,
    out: &mut Vec<u8>,
) {
    let (status, data, error) = match result {
        Ok(data) => ("ok", Some(data), None),
        Err(body) => ("error", None, Some(ErrorOut::new(body, Dialect::Securityd))),
    };
    let reply = SecuritydReply {
        status,
        data,
        error,
        id,
        stream: stream_final.map(|_| true),
        is_final: stream_final,
    };
    write_json(&reply, out);
}

fn write_json<T: Serialize>(reply: &T, out: &mut Vec<u8>) {
    let start = out.len();
    // Serializing a `Value` cannot fail (its numbers are finite, its keys strings), and writing
    // to a Vec cannot either; should it ever, leave no half-written reply behind.
    if serde_json::to_writer(&mut *out, reply).is_err() {
        out.truncate(start);
        out.extend_from_slice(
            br#"{"error":{"code":"INTERNAL_ERROR","message":"reply could not be encoded"}}"#,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ALL: [ErrorCode; 16] = [
        ErrorCode::AuthRequired,
        ErrorCode::AuthExpired,
        ErrorCode::AuthInvalid,
        ErrorCode::AuthDenied,
        ErrorCode::AccessDenied,
        ErrorCode::SecretNotFound,
        ErrorCode::NotFound,
        ErrorCode::RateLimited,
        ErrorCode::ValidationError,
        ErrorCode::ExecutionError,
        ErrorCode::InternalError,
        ErrorCode::DaemonLocked,
        ErrorCode::Unavailable,
        ErrorCode::Conflict,
        ErrorCode::Timeout,
        ErrorCode::Custom("FILE_EXISTS"),
    ];

    fn lumo(result: Result<&Value, &ErrorBody>) -> String {
        let mut out = Vec::new();
        encode_lumo("req-1", result, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn securityd(
        id: Option<&Value>,
        result: Result<&Value, &ErrorBody>,
        fin: Option<bool>,
    ) -> String {
        let mut out = b"prefix:".to_vec();
        encode_securityd(id, result, fin, &mut out);
        String::from_utf8(out).unwrap().split_off(7)
    }

    #[test]
    fn securityd_spells_every_code_as_its_spec_does() {
        let spelled: Vec<_> = ALL.iter().map(|c| c.as_str(Dialect::Securityd)).collect();
        assert_eq!(
            spelled,
            [
                "AUTH_REQUIRED",
                "AUTH_EXPIRED",
                "AUTH_INVALID",
                "AUTH_DENIED",
                "ACCESS_DENIED",
                "SECRET_NOT_FOUND",
                "NOT_FOUND",
                "RATE_LIMITED",
                "VALIDATION_ERROR",
                "EXECUTION_ERROR",
                "INTERNAL_ERROR",
                "DAEMON_LOCKED",
                "UNAVAILABLE",
                "CONFLICT",
                "TIMEOUT",
                "FILE_EXISTS"
            ]
        );
    }

    #[test]
    fn lumo_folds_every_auth_failure_into_auth_error() {
        let spelled: Vec<_> = ALL.iter().map(|c| c.as_str(Dialect::Lumo)).collect();
        assert_eq!(
            spelled,
            [
                "AUTH_ERROR",
                "AUTH_ERROR",
                "AUTH_ERROR",
                "AUTH_ERROR",
                "AUTH_ERROR",
                "NOT_FOUND",
                "NOT_FOUND",
                "RATE_LIMITED",
                "VALIDATION_ERROR",
                "EXECUTION_ERROR",
                "INTERNAL_ERROR",
                "DAEMON_LOCKED",
                "UNAVAILABLE",
                "CONFLICT",
                "TIMEOUT",
                "FILE_EXISTS"
            ]
        );
    }

    #[test]
    fn http_statuses_follow_the_securityd_mapping() {
        let statuses: Vec<_> = ALL.iter().map(|c| c.http_status()).collect();
        assert_eq!(
            statuses,
            [401, 401, 401, 403, 403, 404, 404, 429, 400, 500, 500, 503, 503, 409, 504, 500]
        );
    }

    #[test]
    fn from_str_reads_back_both_spellings() {
        for code in ALL.iter().filter(|c| !matches!(c, ErrorCode::Custom(_))) {
            assert_eq!(
                ErrorCode::from_str(code.as_str(Dialect::Securityd)),
                Some(*code)
            );
        }
        assert_eq!(
            ErrorCode::from_str("AUTH_ERROR"),
            Some(ErrorCode::AuthInvalid)
        );
        assert_eq!(ErrorCode::from_str("NOT_FOUND"), Some(ErrorCode::NotFound));
        assert_eq!(ErrorCode::from_str("FILE_EXISTS"), None);
        assert_eq!(ErrorCode::from_str("auth_error"), None);
    }

    #[test]
    fn lumo_replies_byte_for_byte() {
        assert_eq!(
            lumo(Ok(&json!({"pong": true}))),
            r#"{"success":true,"request_id":"req-1","data":{"pong":true}}"#
        );
        assert_eq!(
            lumo(Ok(&Value::Null)),
            r#"{"success":true,"request_id":"req-1","data":null}"#
        );
        let err = ErrorBody::new(ErrorCode::AuthExpired, "timestamp too old");
        assert_eq!(
            lumo(Err(&err)),
            r#"{"success":false,"request_id":"req-1","error":{"code":"AUTH_ERROR","message":"timestamp too old"}}"#
        );
        let err = ErrorBody::new(ErrorCode::Custom("FILE_EXISTS"), "exists")
            .with_details(json!({"path": "/var/www/a"}));
        assert_eq!(
            lumo(Err(&err)),
            r#"{"success":false,"request_id":"req-1","error":{"code":"FILE_EXISTS","message":"exists","details":{"path":"/var/www/a"}}}"#
        );
    }

    #[test]
    fn securityd_replies_byte_for_byte() {
        assert_eq!(
            securityd(None, Ok(&json!({"key": "k", "value": "v"})), None),
            r#"{"status":"ok","data":{"key":"k","value":"v"}}"#
        );
        let err = ErrorBody::new(ErrorCode::SecretNotFound, "no secret \"k\"");
        assert_eq!(
            securityd(None, Err(&err), None),
            r#"{"status":"error","error":{"code":"SECRET_NOT_FOUND","message":"no secret \"k\""}}"#
        );
        assert_eq!(
            securityd(Some(&json!(7)), Err(&err), None),
            r#"{"status":"error","error":{"code":"SECRET_NOT_FOUND","message":"no secret \"k\""},"id":7}"#
        );
        assert_eq!(
            securityd(
                Some(&json!("j1")),
                Ok(&json!({"out": "line\n"})),
                Some(false)
            ),
            r#"{"status":"ok","data":{"out":"line\n"},"id":"j1","stream":true,"final":false}"#
        );
        assert_eq!(
            securityd(Some(&json!("j1")), Ok(&json!({"exit": 0})), Some(true)),
            r#"{"status":"ok","data":{"exit":0},"id":"j1","stream":true,"final":true}"#
        );
        let err = ErrorBody::new(ErrorCode::ValidationError, "bad").with_details(json!(["x"]));
        assert_eq!(
            securityd(None, Err(&err), None),
            r#"{"status":"error","error":{"code":"VALIDATION_ERROR","message":"bad","details":["x"]}}"#
        );
    }

    #[test]
    fn replies_never_contain_a_raw_newline() {
        let err = ErrorBody::new(ErrorCode::ExecutionError, "line one\nline two");
        assert!(!lumo(Err(&err)).contains('\n'));
        assert!(!securityd(None, Err(&err), None).contains('\n'));
    }
}
