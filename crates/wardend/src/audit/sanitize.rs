//! What of a request's parameters may reach the audit log.
//!
//! The rule is by key name, because the audit log must never hold a secret value, a password or
//! key material, whatever method carried it: a key whose lowercase name contains one of
//! [`SENSITIVE`] has its value replaced by `"<redacted N bytes>"` (N = length of the value's JSON
//! encoding, so an investigator still sees *that* something was sent and how big it was). The
//! keys `key` and `keys` are the exception: in warden's methods they *name* a secret
//! (`{"key": "db_password"}`), and the name is exactly what an audit record must show.
//!
//! Strings longer than [`MAX_CHARS`] characters (values and key names) are cut to that length
//! and end in `…(N bytes)` with the original UTF-8 length, so one client cannot make the log
//! grow by megabytes per request.
//!
//! Sanitizing is idempotent (markers it wrote are left as they are), so a caller that sanitized
//! already loses nothing when [`AuditLog::record`](super::AuditLog::record) does it again.

use serde_json::{Map, Value};

/// Key fragments whose values are never logged.
pub const SENSITIVE: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "value",
    "token",
    "bootstrap",
    "key",
    "private",
    "content",
    "certificate",
    "chain",
    "signature",
    "cookie",
    "credential",
    "auth",
];

/// Strings are cut after this many characters.
pub const MAX_CHARS: usize = 256;

/// Returns a copy of `params` that is safe to write to the audit log.
pub fn sanitize(params: &Value) -> Value {
    let mut v = params.clone();
    sanitize_in_place(&mut v);
    v
}

pub(crate) fn sanitize_in_place(v: &mut Value) {
    match v {
        Value::String(s) => truncate(s),
        Value::Array(items) => items.iter_mut().for_each(sanitize_in_place),
        Value::Object(map) => {
            for (k, x) in map.iter_mut() {
                if is_sensitive(k) {
                    redact(x);
                } else {
                    sanitize_in_place(x);
                }
            }
            if map.keys().any(|k| cut_at(k).is_some()) {
                let old = std::mem::take(map);
                *map = old
                    .into_iter()
                    .map(|(mut k, x)| {
                        truncate(&mut k);
                        (k, x)
                    })
                    .collect::<Map<String, Value>>();
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fn is_sensitive(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k == "key" || k == "keys" {
        return false;
    }
    SENSITIVE.iter().any(|w| k.contains(w))
}

fn redact(v: &mut Value) {
    if let Value::String(s) = v {
        if is_redaction_marker(s) {
            return;
        }
    }
    let mut n = ByteCounter(0);
    // Writing a Value to a counter cannot fail.
    let _ = serde_json::to_writer(&mut n, v);
    *v = Value::String(format!("<redacted {} bytes>", n.0));
}

fn is_redaction_marker(s: &str) -> bool {
    s.strip_prefix("<redacted ")
        .and_then(|r| r.strip_suffix(" bytes>"))
        .is_some_and(all_digits)
}

/// Byte offset of the first character past [`MAX_CHARS`], if the string is longer than that.
fn cut_at(s: &str) -> Option<usize> {
    if s.len() <= MAX_CHARS {
        return None; // fewer bytes than the limit means fewer characters too
    }
    s.char_indices().nth(MAX_CHARS).map(|(i, _)| i)
}

fn truncate(s: &mut String) {
    let Some(cut) = cut_at(s) else { return };
    if is_truncation_marker(&s[cut..]) {
        return;
    }
    let total = s.len();
    s.truncate(cut);
    s.push_str(&format!("…({total} bytes)"));
}

fn is_truncation_marker(rest: &str) -> bool {
    rest.strip_prefix("…(")
        .and_then(|r| r.strip_suffix(" bytes)"))
        .is_some_and(all_digits)
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    #[rustfmt::skip] // a table reads best one case per line
    fn sanitize_table() {
        let long = "é".repeat(300); // 300 chars, 600 bytes
        let cut = format!("{}…(600 bytes)", "é".repeat(256));
        let cases: Vec<(Value, Value)> = vec![
            // plain values pass through
            (json!({"name": "db", "n": 3, "ok": true, "x": null}), json!({"name": "db", "n": 3, "ok": true, "x": null})),
            // every sensitive fragment, any case, as a substring
            (json!({"password": "hunter2"}), json!({"password": "<redacted 9 bytes>"})),
            (json!({"DB_PASSWD": "x"}), json!({"DB_PASSWD": "<redacted 3 bytes>"})),
            (json!({"client_secret": "abc"}), json!({"client_secret": "<redacted 5 bytes>"})),
            (json!({"value": 12345}), json!({"value": "<redacted 5 bytes>"})),
            (json!({"Token": "t"}), json!({"Token": "<redacted 3 bytes>"})),
            (json!({"api_key": "k"}), json!({"api_key": "<redacted 3 bytes>"})),
            (json!({"private_pem": "p"}), json!({"private_pem": "<redacted 3 bytes>"})),
            (json!({"content": "file body"}), json!({"content": "<redacted 11 bytes>"})),
            (json!({"certificate": "c"}), json!({"certificate": "<redacted 3 bytes>"})),
            (json!({"chain": ["a", "b"]}), json!({"chain": "<redacted 9 bytes>"})),
            (json!({"signature": "s"}), json!({"signature": "<redacted 3 bytes>"})),
            (json!({"cookie": "c"}), json!({"cookie": "<redacted 3 bytes>"})),
            (json!({"credentials": {"u": "v"}}), json!({"credentials": "<redacted 9 bytes>"})),
            (json!({"Authorization": "Bearer x"}), json!({"Authorization": "<redacted 10 bytes>"})),
            // "key"/"keys" name a secret: kept (and still sanitized inside)
            (json!({"key": "db_password"}), json!({"key": "db_password"})),
            (json!({"KEYS": ["a", "b"]}), json!({"KEYS": ["a", "b"]})),
            (json!({"key": {"value": "v"}}), json!({"key": {"value": "<redacted 3 bytes>"}})),
            (json!({"keyring": "x"}), json!({"keyring": "<redacted 3 bytes>"})),
            // nested objects and arrays, at any depth
            (
                json!({"a": [{"b": {"password": "p", "user": "u"}}, "s"], "c": {"d": [1, {"token": null}]}}),
                json!({"a": [{"b": {"password": "<redacted 3 bytes>", "user": "u"}}, "s"], "c": {"d": [1, {"token": "<redacted 4 bytes>"}]}}),
            ),
            // long strings anywhere, counted in characters, cut on a character boundary
            (json!({"path": long}), json!({"path": cut})),
            (json!([long]), json!([cut])),
            (json!(long), json!(cut)),
            (json!({long.clone(): 1}), json!({cut.clone(): 1})),
            (json!("a".repeat(256)), json!("a".repeat(256))),
            // a redacted value is redacted whatever its size
            (json!({"secret": long}), json!({"secret": "<redacted 602 bytes>"})),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize(&input), want, "input: {input}");
        }
    }

    #[test]
    fn sanitizing_twice_changes_nothing() {
        let v = json!({"password": "p", "s": "x".repeat(1000), "n": [{"token": "t"}]});
        let once = sanitize(&v);
        assert_eq!(sanitize(&once), once);
    }
}
