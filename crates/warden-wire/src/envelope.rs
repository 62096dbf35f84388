//! Request envelopes: one frame in, one [`Request`] of either dialect out.
//!
//! The dialect is told by the envelope itself (`PROTOCOLS.md`): an object with `command` is a
//! Lumo request, one with `action` a securityd (or warden) request. The method name and params
//! are carried as they came; which methods exist is the daemon's business.
//!
//! Parsing is strict where a lenient parser would let two readers disagree about what a request
//! says: duplicate object keys are refused at every depth (Lumo's parser keeps the last one, so a
//! signature could be checked over one reading while another is acted on), input must be UTF-8,
//! and every value nests at most [`MAX_DEPTH`](crate::MAX_DEPTH) levels. The recursion limit
//! matters for more than tidiness: an unlimited recursive parser can be made to overflow its
//! stack with a few hundred kilobytes of `[`.
//!
//! How: the top-level object is walked once, and each field's value is captured as the exact
//! span of bytes it occupies (serde_json's `RawValue`, found by a non-recursive scan). Each span
//! is then parsed on its own, by a visitor that builds a [`serde_json::Value`] but refuses
//! duplicate keys, under serde_json's recursion limit. The span of `params` is also what a Lumo
//! client that signs "the bytes as sent" has signed, so it is kept.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Which of the two request dialects a message is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Lumo: `{"command", "params", "timestamp", "nonce", "signature"}`, HMAC-authenticated.
    Lumo,
    /// securityd: `{"action", "token", "params"}`. Also warden's own dialect, which adds an `id`
    /// echoed in replies.
    Securityd,
}

/// A decoded request of either dialect.
///
/// `Debug` prints neither the credential's secret parts nor the params (which may hold
/// passwords or secret values), so a request can be logged with `{:?}`.
#[derive(Clone, PartialEq)]
pub struct Request {
    /// The dialect the request was written in; the reply must use the same one.
    pub dialect: Dialect,
    /// Lumo `command` or securityd `action`, as given (aliases are the daemon's to resolve).
    pub method: String,
    /// securityd/warden `id` (a string or a number), to be echoed in the reply. Always `None`
    /// for Lumo, which has no such field.
    pub id: Option<Value>,
    /// The params; `Null` if absent. For securityd, top-level `key` and `keys` beside `action`
    /// are merged in (seed `001_…` shows them there).
    pub params: Value,
    /// Lumo only: the exact bytes of the `params` value as they arrived (`None` if absent).
    /// Some Lumo clients sign these rather than the canonical form.
    pub params_raw: Option<String>,
    /// How the request claims to be authenticated. Nothing here has been verified.
    pub credential: Credential,
}

impl Request {
    /// The params text a Lumo "as sent" signature covers: the bytes as they arrived, or `null`
    /// when the request had no params (which is also the canonical form of absent params).
    pub fn params_as_sent(&self) -> &str {
        self.params_raw.as_deref().unwrap_or("null")
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("dialect", &self.dialect)
            .field("method", &self.method)
            .field("id", &self.id)
            .field("params", &Redacted)
            .field(
                "params_raw",
                &self.params_raw.as_ref().map(|raw| ByteCount(raw.len())),
            )
            .field("credential", &self.credential)
            .finish()
    }
}

/// The credential a request carries, unverified.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// No credential (a Lumo request without `timestamp`, `nonce` and `signature`, or a
    /// securityd request without `token`).
    None,
    /// A securityd session token.
    Token(String),
    /// `"credential": "peer"` in warden's dialect: no token; the caller asks to be taken for
    /// the peer the transport identified (on the Unix socket, the kernel's word), for this one
    /// request. What that is worth is the server's decision.
    Peer,
    /// A Lumo HMAC signature and the values it covers besides command and params.
    Hmac {
        /// Seconds since the Unix epoch, as the client claims.
        timestamp: u64,
        /// A value the client promises never to reuse.
        nonce: String,
        /// The signature, decoded from hex (length not checked here).
        signature: Vec<u8>,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::None => f.write_str("None"),
            Credential::Peer => f.write_str("Peer"),
            Credential::Token(_) => f.debug_tuple("Token").field(&Redacted).finish(),
            Credential::Hmac {
                timestamp, nonce, ..
            } => f
                .debug_struct("Hmac")
                .field("timestamp", timestamp)
                .field("nonce", nonce)
                .field("signature", &Redacted)
                .finish(),
        }
    }
}

struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

struct ByteCount(usize);

impl fmt::Debug for ByteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

/// Why a frame is not a valid request. Every one of these is the client's fault; the daemon
/// answers it (`VALIDATION_ERROR`) and, since the framing is still in step, may carry on.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame is not valid UTF-8.
    #[error("request is not valid UTF-8")]
    NotUtf8,
    /// The frame is not valid JSON; the text says where (never what).
    #[error("request is not valid JSON: {0}")]
    NotJson(String),
    /// The frame is JSON but not an object.
    #[error("request must be a JSON object")]
    NotObject,
    /// A value nests deeper than [`MAX_DEPTH`](crate::MAX_DEPTH) levels.
    #[error(
        "request nests arrays or objects more than {} levels deep",
        crate::MAX_DEPTH
    )]
    TooDeep,
    /// An object, at any depth, has the same key twice.
    #[error("duplicate object key {0:?}: each key may appear only once in an object")]
    DuplicateKey(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong type or form.
    #[error("field `{field}` must be {expected}")]
    BadField {
        /// The field's name.
        field: &'static str,
        /// What it must be, as a phrase ("a string").
        expected: &'static str,
    },
    /// The object has neither or both of `command` (Lumo) and `action` (securityd).
    #[error(
        "request must have exactly one of `command` (Lumo dialect) or `action` (securityd dialect)"
    )]
    UnknownDialect,
}

/// A failed decode, with what is needed to answer it in the client's dialect.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("{error}")]
pub struct DecodeFailure {
    /// What is wrong.
    pub error: DecodeError,
    /// The dialect, if the object was read far enough to see `command` or `action` (and not
    /// both).
    pub dialect: Option<Dialect>,
    /// The securityd/warden `id`, if it was read and valid, to echo in the error reply.
    pub id: Option<Value>,
}

/// Decodes one frame into a request of either dialect.
///
/// Unknown extra fields are ignored in both dialects, but they too must be valid, duplicate-free
/// JSON within the depth limit.
pub fn decode_request(frame: &[u8]) -> Result<Request, DecodeFailure> {
    // serde_json reading bytes checks UTF-8 only in strings it decodes, not in those it skips
    // (as the span capture below does). Checking the whole frame first makes "not UTF-8" one
    // clear error wherever the bad byte is, and lets the parser borrow `&str`s.
    let Ok(text) = std::str::from_utf8(frame) else {
        return Err(DecodeFailure {
            error: DecodeError::NotUtf8,
            dialect: None,
            id: None,
        });
    };
    let ctx = Ctx::default();
    let mut fields = Fields::default();
    let mut de = serde_json::Deserializer::from_str(text);
    let walked = de::Deserializer::deserialize_any(
        &mut de,
        TopVisitor {
            ctx: &ctx,
            fields: &mut fields,
        },
    )
    .and_then(|()| de.end());
    if let Err(e) = walked {
        let error = ctx.take_or_classify(&e);
        return Err(fields.failure(error));
    }
    match (fields.command.is_some(), fields.action.is_some()) {
        (true, false) => fields.into_lumo(),
        (false, true) => fields.into_securityd(),
        _ => Err(fields.failure(DecodeError::UnknownDialect)),
    }
}

/// Where a visitor leaves the precise reason for an error it raises: serde's error type can
/// carry only a message, and the typed error must survive the trip through serde_json.
#[derive(Default)]
struct Ctx {
    error: Cell<Option<DecodeError>>,
}

impl Ctx {
    /// Records `error` (the first one wins) and returns a serde error to unwind with.
    fn fail<E: de::Error>(&self, error: DecodeError) -> E {
        let first = self.error.take().unwrap_or(error);
        self.error.set(Some(first));
        E::custom("rejected by warden-wire")
    }

    fn take_or_classify(&self, e: &serde_json::Error) -> DecodeError {
        self.error.take().unwrap_or_else(|| classify(e))
    }
}

/// Maps an error serde_json raised on its own (not through [`Ctx::fail`]).
fn classify(e: &serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof => {
            // serde_json's own messages name the problem and its position and never quote the
            // input. It has no public error code for the recursion limit, hence the text test.
            let message = e.to_string();
            if message.starts_with("recursion limit exceeded") {
                DecodeError::TooDeep
            } else {
                DecodeError::NotJson(message)
            }
        }
        // Data errors come only from visitors, and ours report through `Ctx`.
        Category::Data | Category::Io => DecodeError::NotJson("malformed value".to_owned()),
    }
}

/// Parses one JSON value, refusing duplicate keys and excessive depth.
fn parse_value(text: &str) -> Result<Value, DecodeError> {
    let ctx = Ctx::default();
    let mut de = serde_json::Deserializer::from_str(text);
    ValueSeed { ctx: &ctx }
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value))
        .map_err(|e| ctx.take_or_classify(&e))
}

/// Builds a [`Value`] like serde_json's own `Deserialize` impl, except that a repeated key is an
/// error instead of silently replacing the earlier value.
#[derive(Clone, Copy)]
struct ValueSeed<'c> {
    ctx: &'c Ctx,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json never produces a non-finite float from JSON text.
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            match map.entry(key) {
                serde_json::map::Entry::Occupied(seen) => {
                    return Err(self
                        .ctx
                        .fail(DecodeError::DuplicateKey(shorten(seen.key()))));
                }
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(access.next_value_seed(self)?);
                }
            }
        }
        Ok(Value::Object(map))
    }
}

/// A key for an error message: at most 64 bytes of it, so a huge key is not echoed whole.
fn shorten(key: &str) -> String {
    const MAX: usize = 64;
    if key.len() <= MAX {
        return key.to_owned();
    }
    let mut end = MAX;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &key[..end])
}

/// The envelope's fields, each captured as the exact text of its value.
#[derive(Default)]
struct Fields<'de> {
    command: Option<&'de RawValue>,
    action: Option<&'de RawValue>,
    params: Option<&'de RawValue>,
    timestamp: Option<&'de RawValue>,
    nonce: Option<&'de RawValue>,
    signature: Option<&'de RawValue>,
    token: Option<&'de RawValue>,
    credential: Option<&'de RawValue>,
    key: Option<&'de RawValue>,
    keys: Option<&'de RawValue>,
    id: Option<&'de RawValue>,
    /// `command` / `action` seen as keys (their values may not have parsed).
    saw_command: bool,
    saw_action: bool,
    /// Keys this crate does not know, kept only to refuse their duplicates.
    others: BTreeSet<Cow<'de, str>>,
}

impl<'de> Fields<'de> {
    /// The dialect, as far as the object was read.
    fn dialect_hint(&self) -> Option<Dialect> {
        match (self.saw_command, self.saw_action) {
            (true, false) => Some(Dialect::Lumo),
            (false, true) => Some(Dialect::Securityd),
            _ => None,
        }
    }

    /// The `id` to echo, if one was read and is valid (Lumo has none).
    fn id_hint(&self) -> Option<Value> {
        if self.dialect_hint() == Some(Dialect::Lumo) {
            return None;
        }
        self.securityd_id().ok().flatten()
    }

    fn securityd_id(&self) -> Result<Option<Value>, DecodeError> {
        let Some(raw) = present(self.id) else {
            return Ok(None);
        };
        match parse_value(raw.get())? {
            id @ (Value::String(_) | Value::Number(_)) => Ok(Some(id)),
            _ => Err(DecodeError::BadField {
                field: "id",
                expected: "a string or a number",
            }),
        }
    }

    fn failure(&self, error: DecodeError) -> DecodeFailure {
        DecodeFailure {
            error,
            dialect: self.dialect_hint(),
            id: self.id_hint(),
        }
    }

    fn into_lumo(self) -> Result<Request, DecodeFailure> {
        let fail = |error| DecodeFailure {
            error,
            dialect: Some(Dialect::Lumo),
            id: None,
        };
        // Fields of the other dialect are unknown extras here: ignored, but checked.
        for raw in [self.token, self.credential, self.key, self.keys, self.id]
            .into_iter()
            .flatten()
        {
            parse_value(raw.get()).map_err(fail)?;
        }
        let method = required_string(self.command, "command").map_err(fail)?;
        let (params, params_raw) = match self.params {
            None => (Value::Null, None),
            Some(raw) => {
                let params = parse_value(raw.get()).map_err(fail)?;
                (params, Some(raw.get().to_owned()))
            }
        };
        let credential =
            lumo_credential(self.timestamp, self.nonce, self.signature).map_err(fail)?;
        Ok(Request {
            dialect: Dialect::Lumo,
            method,
            id: None,
            params,
            params_raw,
            credential,
        })
    }

    fn into_securityd(self) -> Result<Request, DecodeFailure> {
        let id = self.securityd_id().map_err(|error| DecodeFailure {
            error,
            dialect: Some(Dialect::Securityd),
            id: None,
        })?;
        let fail = |error| DecodeFailure {
            error,
            dialect: Some(Dialect::Securityd),
            id: id.clone(),
        };
        for raw in [self.timestamp, self.nonce, self.signature]
            .into_iter()
            .flatten()
        {
            parse_value(raw.get()).map_err(fail)?;
        }
        let method = required_string(self.action, "action").map_err(fail)?;
        let credential = match (present(self.token), present(self.credential)) {
            (None, None) => Credential::None,
            (Some(raw), None) => match string(raw).map_err(fail)? {
                Some(token) => Credential::Token(token.into_owned()),
                None => {
                    return Err(fail(DecodeError::BadField {
                        field: "token",
                        expected: "a string",
                    }))
                }
            },
            (None, Some(raw)) => match string(raw).map_err(fail)?.as_deref() {
                Some("peer") => Credential::Peer,
                _ => {
                    return Err(fail(DecodeError::BadField {
                        field: "credential",
                        expected: "\"peer\"",
                    }))
                }
            },
            (Some(_), Some(_)) => {
                return Err(fail(DecodeError::BadField {
                    field: "credential",
                    expected: "absent beside a token",
                }))
            }
        };
        let mut params = match present(self.params) {
            None => None,
            Some(raw) => match parse_value(raw.get()).map_err(fail)? {
                Value::Object(map) => Some(map),
                _ => {
                    return Err(fail(DecodeError::BadField {
                        field: "params",
                        expected: "an object",
                    }))
                }
            },
        };
        for (name, raw) in [("key", self.key), ("keys", self.keys)] {
            let Some(raw) = raw else { continue };
            let value = parse_value(raw.get()).map_err(fail)?;
            let map = params.get_or_insert_with(Map::new);
            if map.contains_key(name) {
                return Err(fail(DecodeError::DuplicateKey(name.to_owned())));
            }
            map.insert(name.to_owned(), value);
        }
        Ok(Request {
            dialect: Dialect::Securityd,
            method,
            id,
            params: params.map_or(Value::Null, Value::Object),
            params_raw: None,
            credential,
        })
    }
}

/// An optional field: absent and `null` mean the same (as they do to the dialects' clients).
fn present(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|raw| raw.get() != "null")
}

/// The string a raw value holds, or `None` if it is not a string.
fn string(raw: &RawValue) -> Result<Option<Cow<'_, str>>, DecodeError> {
    let text = raw.get();
    if !text.starts_with('"') {
        // Still parsed, so that a bad value is reported as what it is (e.g. TooDeep).
        parse_value(text)?;
        return Ok(None);
    }
    // The scan that captured the span already checked the string's syntax, so one without
    // escapes is its own content: no copy, no second parse.
    if !text.contains('\\') && text.len() >= 2 {
        return Ok(Some(Cow::Borrowed(&text[1..text.len() - 1])));
    }
    match parse_value(text)? {
        Value::String(s) => Ok(Some(Cow::Owned(s))),
        _ => Ok(None),
    }
}

fn required_string(raw: Option<&RawValue>, field: &'static str) -> Result<String, DecodeError> {
    let bad = DecodeError::BadField {
        field,
        expected: "a string",
    };
    match raw {
        None => Err(DecodeError::MissingField(field)),
        Some(raw) => string(raw)?.map(Cow::into_owned).ok_or(bad),
    }
}

fn lumo_credential(
    timestamp: Option<&RawValue>,
    nonce: Option<&RawValue>,
    signature: Option<&RawValue>,
) -> Result<Credential, DecodeError> {
    let (timestamp, nonce, signature) =
        match (present(timestamp), present(nonce), present(signature)) {
            (Some(t), Some(n), Some(s)) => (t, n, s),
            // A request without all three parts is unsigned: an authentication failure
            // (AUTH_ERROR, as Lumo answers), not a malformed message.
            _ => return Ok(Credential::None),
        };
    // A JSON integer is all digits (the span's syntax is already checked); a float, a negative
    // number or anything else fails `u64` parsing, as does a value beyond `u64`.
    let timestamp = match timestamp.get().parse::<u64>() {
        Ok(t) => t,
        Err(_) => {
            parse_value(timestamp.get())?;
            return Err(DecodeError::BadField {
                field: "timestamp",
                expected: "a non-negative integer (seconds since the Unix epoch)",
            });
        }
    };
    let nonce = string(nonce)?.ok_or(DecodeError::BadField {
        field: "nonce",
        expected: "a string",
    })?;
    let bad_signature = DecodeError::BadField {
        field: "signature",
        expected: "a hex string",
    };
    let signature = string(signature)?.ok_or(bad_signature)?;
    // A string that is not hex is a wrong signature, refused as one (it never verifies).
    let signature = decode_signature(signature.as_bytes());
    Ok(Credential::Hmac {
        timestamp,
        nonce: nonce.into_owned(),
        signature,
    })
}

/// Hex to bytes, empty when it is not hex. An HMAC-SHA256 signature (64 digits, the only
/// length that can verify) is decoded through a table into a fixed buffer rather than by
/// `hex::decode`'s per-digit matching: this runs on every signed request.
fn decode_signature(hex_digits: &[u8]) -> Vec<u8> {
    let mut sig = [0u8; 32];
    if hex_digits.len() != 2 * sig.len() {
        return hex::decode(hex_digits).unwrap_or_default();
    }
    let mut bad = 0u8;
    for (byte, pair) in sig.iter_mut().zip(hex_digits.chunks_exact(2)) {
        let (hi, lo) = (
            HEX_VALUE[usize::from(pair[0])],
            HEX_VALUE[usize::from(pair[1])],
        );
        bad |= (hi | lo) & 0x80;
        *byte = (hi << 4) | (lo & 0x0f);
    }
    if bad != 0 {
        return Vec::new();
    }
    sig.to_vec()
}

/// The value of each hex digit (either case); 0xff for every other byte.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Walks the top-level object, capturing each field's span. Anything but an object is parsed
/// through (so that a syntax error or excessive depth is reported as such) and then refused.
struct TopVisitor<'a, 'de> {
    ctx: &'a Ctx,
    fields: &'a mut Fields<'de>,
}

impl<'de> TopVisitor<'_, 'de> {
    fn not_object<E: de::Error>(self) -> Result<(), E> {
        Err(self.ctx.fail(DecodeError::NotObject))
    }
}

impl<'de> Visitor<'de> for TopVisitor<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let fields = self.fields;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let slot = match &*key {
                "command" => {
                    fields.saw_command = true;
                    &mut fields.command
                }
                "action" => {
                    fields.saw_action = true;
                    &mut fields.action
                }
                "params" => &mut fields.params,
                "timestamp" => &mut fields.timestamp,
                "nonce" => &mut fields.nonce,
                "signature" => &mut fields.signature,
                "token" => &mut fields.token,
                "credential" => &mut fields.credential,
                "key" => &mut fields.key,
                "keys" => &mut fields.keys,
                "id" => &mut fields.id,
                _ => {
                    if fields.others.contains(&key) {
                        return Err(self.ctx.fail(DecodeError::DuplicateKey(shorten(&key))));
                    }
                    fields.others.insert(key);
                    let raw = map.next_value::<&'de RawValue>()?;
                    if let Err(error) = parse_value(raw.get()) {
                        return Err(self.ctx.fail(error));
                    }
                    continue;
                }
            };
            if slot.is_some() {
                return Err(self.ctx.fail(DecodeError::DuplicateKey(key.into_owned())));
            }
            *slot = Some(map.next_value::<&'de RawValue>()?);
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let seed = ValueSeed { ctx: self.ctx };
        while seq.next_element_seed(seed)?.is_some() {}
        self.not_object()
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_object()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_object()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_object()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_object()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_object()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_object()
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(KeySeed)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests;
