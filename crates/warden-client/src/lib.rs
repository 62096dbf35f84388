//! # warden-client — talk to a warden daemon over its Unix socket
//!
//! A small blocking client: one connection, length-prefixed framing, warden's own dialect
//! (request ids, so replies are matched to requests), and the Lumo dialect for signed commands.
//! The CLI is built on it; so can any Rust program that needs a secret or a privileged command.
//!
//! ```no_run
//! let mut c = warden_client::Client::connect(&warden_client::socket_path(None))?;
//! c.login(warden_client::TokenType::Session)?;
//! let pong = c.call("system.ping", serde_json::json!({}))?;
//! # Ok::<(), warden_client::ClientError>(())
//! ```
//!
//! Secrets have typed calls ([`Client::get_secret`], [`Client::set_secret`], …); a value read
//! comes back as a [`Secret`], whose `Debug` does not print it and whose memory is wiped when it
//! is dropped.
//!
//! ```no_run
//! let mut c = warden_client::Client::connect(&warden_client::socket_path(None))?;
//! c.login(warden_client::TokenType::Session)?;
//! let db = c.get_secret("db_password", None)?;
//! let _password: &str = db.expose();
//! # Ok::<(), warden_client::ClientError>(())
//! ```
//!
//! What it does not do: retry behind the caller's back (a failed call says why), or keep a
//! token anywhere but in memory.

#![forbid(unsafe_code)]

#[cfg(feature = "grpc")]
pub mod grpc;
pub mod remote;
pub use remote::RemoteConfig;

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use warden_wire::reply::ErrorCode;
use zeroize::Zeroizing;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/warden/warden.sock";

/// The socket to use: an explicit path, else `$WARDEN_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os("WARDEN_SOCKET") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to warden at {path}: {error} (is the daemon running? set WARDEN_SOCKET or --socket)")]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("connection to warden failed: {0}")]
    Io(std::io::Error),
    #[error("unexpected reply from warden: {0}")]
    Protocol(String),
    #[error("{code}: {message}")]
    Api {
        code: String,
        message: String,
        details: Option<Value>,
    },
    #[error("cannot read the HMAC key {path}: {message}")]
    Key { path: PathBuf, message: String },
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl ClientError {
    /// The error code the daemon answered with, if it answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => ErrorCode::from_str(code),
            _ => None,
        }
    }
}

/// A secret's value as the daemon returned it. Not printed by `Debug`; wiped on drop.
pub struct Secret {
    pub key: String,
    pub version: u64,
    value: Zeroizing<String>,
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("key", &self.key)
            .field("version", &self.version)
            .field("value", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Session,
    Admin,
}

/// The daemon's socket, or an HTTPS connection to its gateway.
enum Stream {
    Unix(UnixStream),
    Remote(Box<remote::Https>),
}

impl Stream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(d),
            Stream::Remote(h) => h.set_read_timeout(d),
        }
    }

    fn unix(&mut self) -> std::io::Result<&mut UnixStream> {
        match self {
            Stream::Unix(s) => Ok(s),
            Stream::Remote(_) => Err(std::io::Error::other(
                "not available through the gateway: only the REST API's methods are (docs/gateway.md)",
            )),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.unix()?.read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.unix()?.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.unix()?.flush()
    }
}

pub struct Client {
    stream: Stream,
    next_id: u64,
    token: Option<String>,
    /// Whether `token` came from our own [`Client::login`], so we revoke it when done.
    owns_token: bool,
    /// Requests without a token ask to be taken for this process ([`Client::authenticate_as_peer`]).
    peer: bool,
    max_reply: usize,
    /// Read buffer: `rbuf[rstart..rend]` are bytes read from the socket and not yet taken as
    /// frames; the rest is room for the next read.
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// Ask `jobs.attach` for binary output frames (the default) rather than base64 in JSON.
    binary_output: bool,
}

impl Drop for Client {
    /// A token this client obtained is revoked when the client goes away, so that short-lived
    /// callers (each CLI command) do not pile up sessions against the per-client maximum.
    fn drop(&mut self) {
        if self.owns_token {
            if let Some(t) = self.token.take() {
                let _ = self.stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = self.call_with_token("auth.logout", json!({}), Some(&t));
            }
        }
    }
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|error| ClientError::Connect {
            path: path.to_path_buf(),
            error,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Client::over(Stream::Unix(stream)))
    }

    /// Connects to the daemon's mTLS gateway (remote mode; see [`remote`]).
    pub fn connect_remote(cfg: &RemoteConfig) -> Result<Client, ClientError> {
        let h = remote::Https::connect(cfg)?;
        Ok(Client::over(Stream::Remote(Box::new(h))))
    }

    fn over(stream: Stream) -> Client {
        Client {
            stream,
            next_id: 1,
            token: None,
            owns_token: false,
            peer: false,
            max_reply: 64 << 20,
            rbuf: vec![0; 64 << 10],
            rstart: 0,
            rend: 0,
            binary_output: true,
        }
    }

    /// Whether [`attach`](Self::attach) asks for binary output frames (default) or for base64
    /// in JSON frames, as a client of the line framing gets them.
    pub fn set_binary_output(&mut self, on: bool) {
        self.binary_output = on;
    }

    /// Obtains a token for this connection's process (the daemon decides who that is from the
    /// kernel); later [`call`](Self::call)s present it.
    pub fn login(&mut self, kind: TokenType) -> Result<Value, ClientError> {
        let params = match kind {
            TokenType::Session => json!({}),
            TokenType::Admin => json!({ "type": "admin" }),
        };
        let data = self.call_with_token("auth", params, None)?;
        let token = data
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| ClientError::Protocol("auth reply has no token".into()))?;
        self.token = Some(token.to_string());
        self.owns_token = true;
        Ok(data)
    }

    /// Authenticates every request as this process rather than with a token: on the Unix
    /// socket each request carries `"credential": "peer"`, and the daemon takes the caller for
    /// the peer its kernel names, as `auth` would: no `auth` round trip first, no session to
    /// revoke after, which is what a short-lived caller (each CLI command) wants. Over the mTLS
    /// gateway, which requires a token, this obtains a session token instead.
    pub fn authenticate_as_peer(&mut self) -> Result<(), ClientError> {
        if let Stream::Remote(_) = self.stream {
            self.login(TokenType::Session)?;
            return Ok(());
        }
        self.peer = true;
        Ok(())
    }

    /// The credential of a request in warden's dialect: `token`, else the peer credential if
    /// asked for.
    fn put_credential(&self, req: &mut Value, token: Option<&str>) {
        match token {
            Some(t) => req["token"] = Value::String(t.to_string()),
            None if self.peer => req["credential"] = Value::String("peer".into()),
            None => {}
        }
    }

    /// Uses a token obtained elsewhere.
    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
        self.owns_token = false;
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Calls a method in warden's dialect with the current token (if any).
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let token = self.token.clone();
        self.call_with_token(method, params, token.as_deref())
    }

    pub fn call_with_token(
        &mut self,
        method: &str,
        params: Value,
        token: Option<&str>,
    ) -> Result<Value, ClientError> {
        if let Stream::Remote(h) = &mut self.stream {
            return securityd_result(h.call(method, params, token)?);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "action": method, "id": id, "params": params });
        self.put_credential(&mut req, token);
        self.send(&serde_json::to_vec(&req).map_err(|e| ClientError::Protocol(e.to_string()))?)?;
        loop {
            let reply = self.recv()?;
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // a late reply to an earlier, abandoned request
            }
            return securityd_result(reply);
        }
    }

    /// Calls a streaming method: `on_frame` gets each frame's data as it arrives; the final
    /// reply's data is returned.
    pub fn call_stream(
        &mut self,
        method: &str,
        params: Value,
        mut on_frame: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "action": method, "id": id, "params": params });
        self.put_credential(&mut req, self.token.as_deref());
        self.send(&serde_json::to_vec(&req).map_err(|e| ClientError::Protocol(e.to_string()))?)?;
        self.stream.set_read_timeout(None)?;
        loop {
            let reply = self.recv()?;
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            let is_frame = reply.get("stream").and_then(Value::as_bool) == Some(true)
                && reply.get("final").and_then(Value::as_bool) != Some(true);
            if is_frame {
                on_frame(reply.get("data").unwrap_or(&Value::Null));
                continue;
            }
            self.stream
                .set_read_timeout(Some(Duration::from_secs(120)))?;
            return securityd_result(reply);
        }
    }

    /// `secrets.get`: the value of `key` at `version` (default: the latest).
    pub fn get_secret(&mut self, key: &str, version: Option<u64>) -> Result<Secret, ClientError> {
        let mut params = json!({ "key": key });
        if let Some(v) = version {
            params["version"] = json!(v);
        }
        let mut data = self.call("secrets.get", params)?;
        let value = match data.get_mut("value").map(Value::take) {
            Some(Value::String(s)) => Zeroizing::new(s),
            _ => {
                return Err(ClientError::Protocol(
                    "secrets.get reply has no value".into(),
                ))
            }
        };
        Ok(Secret {
            key: key.to_string(),
            version: data.get("version").and_then(Value::as_u64).unwrap_or(0),
            value,
        })
    }

    /// `secrets.set`: stores `value` as a new version of `key`; returns that version. With
    /// `expected_version`, only if the current version is that one (0: the secret is new).
    pub fn set_secret(
        &mut self,
        key: &str,
        value: &str,
        expected_version: Option<u64>,
    ) -> Result<u64, ClientError> {
        let mut params = json!({ "key": key, "value": value });
        if let Some(v) = expected_version {
            params["expected_version"] = json!(v);
        }
        let data = self.call("secrets.set", params)?;
        data.get("version")
            .and_then(Value::as_u64)
            .ok_or_else(|| ClientError::Protocol("secrets.set reply has no version".into()))
    }

    /// `secrets.list`: `secrets` (names the caller may read), `count` and `entries`.
    pub fn list_secrets(&mut self) -> Result<Value, ClientError> {
        self.call("secrets.list", json!({}))
    }

    /// `secrets.versions`: the kept versions of `key`.
    pub fn secret_versions(&mut self, key: &str) -> Result<Value, ClientError> {
        self.call("secrets.versions", json!({ "key": key }))
    }

    /// `secrets.delete`: hides `key`; its versions stay until destroyed.
    pub fn delete_secret(&mut self, key: &str) -> Result<Value, ClientError> {
        self.call("secrets.delete", json!({ "key": key }))
    }

    /// `secrets.destroy`: erases the given versions of `key` (all when empty).
    pub fn destroy_secret(&mut self, key: &str, versions: &[u64]) -> Result<Value, ClientError> {
        let mut params = json!({ "key": key });
        if !versions.is_empty() {
            params["versions"] = json!(versions);
        }
        self.call("secrets.destroy", params)
    }

    /// `secrets.rotate_master` (admin token): changes the master password.
    pub fn rotate_master(&mut self, new_password: &str) -> Result<Value, ClientError> {
        self.call(
            "secrets.rotate_master",
            json!({ "new_password": new_password }),
        )
    }

    /// `secrets.rekey` (admin token): re-seals every value under a new data key.
    pub fn rekey(&mut self) -> Result<Value, ClientError> {
        self.call("secrets.rekey", json!({}))
    }

    /// `daemon.unseal` (admin token).
    pub fn unseal(&mut self, password: &str) -> Result<Value, ClientError> {
        self.call("daemon.unseal", json!({ "password": password }))
    }

    /// `daemon.seal` (admin token).
    pub fn seal(&mut self) -> Result<Value, ClientError> {
        self.call("daemon.seal", json!({}))
    }

    /// Sends a Lumo-dialect command signed with `key`, as a web panel would.
    pub fn lumo(
        &mut self,
        key: &[u8],
        command: &str,
        params: &Value,
    ) -> Result<Value, ClientError> {
        let params_json =
            serde_json::to_string(params).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let nonce = random_nonce();
        let signature = warden_wire::hmac::sign_hex(key, command, &params_json, timestamp, &nonce);
        // The params go out as the exact bytes that were signed.
        let frame = format!(
            "{{\"command\":{},\"params\":{},\"timestamp\":{},\"nonce\":\"{}\",\"signature\":\"{}\"}}",
            Value::String(command.to_string()),
            params_json,
            timestamp,
            nonce,
            signature
        );
        self.send(frame.as_bytes())?;
        let reply = self.recv()?;
        if reply.get("success").and_then(Value::as_bool) == Some(true) {
            return Ok(reply.get("data").cloned().unwrap_or(Value::Null));
        }
        Err(api_error(reply.get("error")))
    }

    fn send(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        let len = u32::try_from(payload.len())
            .map_err(|_| ClientError::Protocol("request too large".into()))?;
        let mut buf = Vec::with_capacity(4 + payload.len());
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(payload);
        self.stream.write_all(&buf)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Value, ClientError> {
        let frame = match self.recv_frame(None)? {
            Some(f) => f,
            None => return Err(ClientError::Protocol("no reply".into())),
        };
        let v = serde_json::from_slice(&self.rbuf[frame.clone()])
            .map_err(|e| ClientError::Protocol(e.to_string()));
        self.consume(frame.end);
        v
    }

    /// Marks the buffered bytes up to `end` (a frame's end) as taken.
    fn consume(&mut self, end: usize) {
        self.rstart = end;
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
    }

    /// Reads until the buffer holds one whole frame and returns the range of its payload in
    /// `rbuf` (the caller [`consume`](Self::consume)s it once parsed). With `interrupted`,
    /// reads wake every 100 ms to ask it; `Ok(None)` means it said stop (a partial frame stays
    /// buffered, so the connection stays usable).
    fn recv_frame(
        &mut self,
        interrupted: Option<&dyn Fn() -> bool>,
    ) -> Result<Option<std::ops::Range<usize>>, ClientError> {
        loop {
            let have = self.rend - self.rstart;
            let mut need = 4;
            if have >= 4 {
                let mut len = [0u8; 4];
                len.copy_from_slice(&self.rbuf[self.rstart..self.rstart + 4]);
                let len = u32::from_be_bytes(len) as usize;
                if len > self.max_reply {
                    return Err(ClientError::Protocol(format!(
                        "reply of {len} bytes is too large"
                    )));
                }
                if have >= 4 + len {
                    return Ok(Some(self.rstart + 4..self.rstart + 4 + len));
                }
                need = 4 + len;
            }
            if self.rbuf.len() - self.rstart < need.max(16 << 10) {
                // Move what is buffered to the front, and grow if one frame needs more room.
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
                if self.rbuf.len() < need {
                    self.rbuf.resize(need.next_power_of_two(), 0);
                }
            }
            if let Some(stop) = interrupted {
                if stop() {
                    return Ok(None);
                }
            }
            match self.stream.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    return Err(ClientError::Protocol(
                        "the daemon closed the connection".into(),
                    ))
                }
                Ok(n) => self.rend += n,
                Err(e)
                    if interrupted.is_some()
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
    }

    /// Follows a job's output (`jobs.attach`) from byte `from`: `on_output` gets each piece as
    /// it arrives, stdout and stderr apart, in the order the job wrote them. Ends with the
    /// final reply's data (`end`, `complete`, `job`), or [`AttachEnd::Interrupted`] as soon as
    /// `interrupted` (asked every 100 ms and between frames) says so. An error of `on_output`
    /// (e.g. a closed stdout) ends the attach with that error.
    pub fn attach(
        &mut self,
        id: &str,
        from: u64,
        follow: bool,
        interrupted: &dyn Fn() -> bool,
        on_output: impl FnMut(Output<'_>) -> std::io::Result<()>,
    ) -> Result<AttachEnd, ClientError> {
        let params = json!({ "id": id, "from": from, "follow": follow });
        self.stream_output("jobs.attach", params, interrupted, |_| {}, on_output)
    }

    /// Starts a job and follows its output from the start, in one request (`jobs.run`:
    /// `params` are `jobs.start`'s): `on_job` gets the job (as `jobs.start` returns it) before
    /// any output, then it goes as with [`attach`](Self::attach). One round trip fewer than
    /// `jobs.start` then `jobs.attach`.
    pub fn run(
        &mut self,
        params: Value,
        interrupted: &dyn Fn() -> bool,
        on_job: impl FnMut(Value),
        on_output: impl FnMut(Output<'_>) -> std::io::Result<()>,
    ) -> Result<AttachEnd, ClientError> {
        self.stream_output("jobs.run", params, interrupted, on_job, on_output)
    }

    /// Sends `action` (`jobs.attach` or `jobs.run`) and takes its streamed reply: a job frame
    /// to `on_job`, output to `on_output`, until the final reply or `interrupted`.
    fn stream_output(
        &mut self,
        action: &str,
        mut params: Value,
        interrupted: &dyn Fn() -> bool,
        mut on_job: impl FnMut(Value),
        mut on_output: impl FnMut(Output<'_>) -> std::io::Result<()>,
    ) -> Result<AttachEnd, ClientError> {
        let rid = self.next_id;
        self.next_id += 1;
        // Binary output frames: the bytes as they are, no base64 (this client always speaks
        // length-prefixed framing).
        if let Value::Object(m) = &mut params {
            m.insert("binary".into(), Value::Bool(self.binary_output));
        }
        let mut req = json!({ "action": action, "id": rid, "params": params });
        self.put_credential(&mut req, self.token.as_deref());
        self.send(&serde_json::to_vec(&req).map_err(|e| ClientError::Protocol(e.to_string()))?)?;
        self.stream
            .set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut bytes = Vec::new();
        let result = loop {
            let range = match self.recv_frame(Some(interrupted)) {
                Ok(Some(r)) => r,
                Ok(None) => break Ok(AttachEnd::Interrupted),
                Err(e) => break Err(e),
            };
            let payload = &self.rbuf[range.clone()];
            if let Some(frame) = binary_output_frame(payload) {
                let step = match frame {
                    Some((frame_id, offset, stream, data)) if frame_id == rid => {
                        on_output(Output::Data {
                            offset,
                            stream,
                            bytes: data,
                        })
                        .map_err(ClientError::Io)
                    }
                    // Another request's stream on this connection.
                    Some(_) => Ok(()),
                    None => Err(ClientError::Protocol(
                        "malformed binary output frame".into(),
                    )),
                };
                self.consume(range.end);
                if let Err(e) = step {
                    break Err(e);
                }
                if interrupted() {
                    break Ok(AttachEnd::Interrupted);
                }
                continue;
            }
            // Output frames as the daemon writes them are taken apart without scanning the
            // base64 twice; anything else goes through the JSON parser.
            let (frame, out) = match fast_output_frame(payload) {
                Some((frame, out)) => (frame, Some(Ok(out))),
                None => match serde_json::from_slice::<Frame<'_>>(payload) {
                    Ok(f) => {
                        let out = f
                            .data
                            .map(|d| serde_json::from_str::<OutputFrame<'_>>(d.get()));
                        let header = FrameHeader {
                            id: f.id,
                            stream: f.stream,
                            is_final: f.is_final,
                        };
                        (header, out)
                    }
                    Err(e) => break Err(ClientError::Protocol(e.to_string())),
                },
            };
            if frame.id.as_ref().and_then(Value::as_u64) != Some(rid) {
                self.consume(range.end);
                continue;
            }
            if frame.stream == Some(true) && frame.is_final != Some(true) {
                let step = match out {
                    Some(Ok(OutputFrame {
                        offset: Some(offset),
                        stream: Some(s),
                        data: Some(b64),
                        ..
                    })) => {
                        bytes.clear();
                        match base64_simd::STANDARD.decode_append(b64, &mut bytes) {
                            Ok(()) => {
                                let stream = if s == "stderr" {
                                    OutputStream::Stderr
                                } else {
                                    OutputStream::Stdout
                                };
                                on_output(Output::Data {
                                    offset,
                                    stream,
                                    bytes: &bytes,
                                })
                                .map_err(ClientError::Io)
                            }
                            Err(e) => {
                                Err(ClientError::Protocol(format!("bad base64 in output: {e}")))
                            }
                        }
                    }
                    Some(Ok(OutputFrame {
                        dropped: Some(d), ..
                    })) => on_output(Output::Dropped {
                        from: d.from,
                        to: d.to,
                    })
                    .map_err(ClientError::Io),
                    Some(Ok(OutputFrame { job: Some(job), .. })) => {
                        on_job(job);
                        Ok(())
                    }
                    _ => Err(ClientError::Protocol("unexpected attach frame".into())),
                };
                self.consume(range.end);
                if let Err(e) = step {
                    break Err(e);
                }
                if interrupted() {
                    break Ok(AttachEnd::Interrupted);
                }
                continue;
            }
            let reply: Result<Value, _> = serde_json::from_slice(&self.rbuf[range.clone()]);
            self.consume(range.end);
            break match reply {
                Ok(v) => securityd_result(v).map(AttachEnd::Finished),
                Err(e) => Err(ClientError::Protocol(e.to_string())),
            };
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(120)))?;
        result
    }
}

/// Which stream output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A piece of a job's output, as [`Client::attach`] hands it over.
#[derive(Debug)]
pub enum Output<'a> {
    /// `bytes` of `stream`, starting at log offset `offset`.
    Data {
        offset: u64,
        stream: OutputStream,
        bytes: &'a [u8],
    },
    /// Output in `from..to` was dropped by the daemon (beyond its log's bounds) before this
    /// reader got it.
    Dropped { from: u64, to: u64 },
}

/// How [`Client::attach`] ended.
#[derive(Debug)]
pub enum AttachEnd {
    /// The stream ended; the final reply's data.
    Finished(Value),
    /// `interrupted` said stop; the job goes on.
    Interrupted,
}

#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    data: Option<&'a serde_json::value::RawValue>,
    id: Option<Value>,
    stream: Option<bool>,
    #[serde(rename = "final")]
    is_final: Option<bool>,
}

#[derive(serde::Deserialize)]
struct FrameHeader {
    id: Option<Value>,
    stream: Option<bool>,
    #[serde(rename = "final")]
    is_final: Option<bool>,
}

/// An output frame in the exact shape the daemon writes:
/// `{"status":"ok","data":{"offset":N,"stream":"stdout","data":"B64"},"id":…,"stream":true,"final":false}`.
/// `None` for anything else (the caller parses it in full).
fn fast_output_frame(p: &[u8]) -> Option<(FrameHeader, OutputFrame<'_>)> {
    let rest = p.strip_prefix(br#"{"status":"ok","data":{"offset":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let offset: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = &rest[digits..];
    let (stream, rest) = if let Some(r) = rest.strip_prefix(br#","stream":"stdout","data":""#) {
        ("stdout", r)
    } else {
        (
            "stderr",
            rest.strip_prefix(br#","stream":"stderr","data":""#)?,
        )
    };
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    // Base64 is ASCII; the decoder refuses anything outside its alphabet.
    let data = std::str::from_utf8(&rest[..end]).ok()?;
    let tail = rest[end..].strip_prefix(br#""},"#)?;
    let mut obj = Vec::with_capacity(tail.len() + 1);
    obj.push(b'{');
    obj.extend_from_slice(tail);
    let header: FrameHeader = serde_json::from_slice(&obj).ok()?;
    Some((
        header,
        OutputFrame {
            offset: Some(offset),
            stream: Some(stream),
            data: Some(data),
            dropped: None,
            job: None,
        },
    ))
}

/// A binary output frame (`0x00`, stream, offset, id length, id, bytes; see the daemon's
/// `jobs::wire`): `None` if `p` is not one, `Some(None)` if it is one but malformed or its id
/// is not one of this client's (numeric) request ids.
#[allow(clippy::type_complexity)]
fn binary_output_frame(p: &[u8]) -> Option<Option<(u64, u64, OutputStream, &[u8])>> {
    if p.first() != Some(&0) {
        return None;
    }
    let parse = || {
        let stream = match *p.get(1)? {
            1 => OutputStream::Stdout,
            2 => OutputStream::Stderr,
            _ => return None,
        };
        let offset = u64::from_be_bytes(p.get(2..10)?.try_into().ok()?);
        let id_len = usize::from(u16::from_be_bytes(p.get(10..12)?.try_into().ok()?));
        let id = std::str::from_utf8(p.get(12..12 + id_len)?).ok()?;
        let id: u64 = id.parse().ok()?;
        Some((id, offset, stream, &p[12 + id_len..]))
    };
    Some(parse())
}

#[derive(serde::Deserialize)]
struct OutputFrame<'a> {
    offset: Option<u64>,
    stream: Option<&'a str>,
    data: Option<&'a str>,
    dropped: Option<Range>,
    /// `jobs.run`'s first frame.
    job: Option<Value>,
}

#[derive(serde::Deserialize)]
struct Range {
    from: u64,
    to: u64,
}

fn securityd_result(reply: Value) -> Result<Value, ClientError> {
    match reply.get("status").and_then(Value::as_str) {
        Some("ok") => Ok(reply.get("data").cloned().unwrap_or(Value::Null)),
        Some("error") => Err(api_error(reply.get("error"))),
        _ => Err(ClientError::Protocol(format!(
            "reply without status: {reply}"
        ))),
    }
}

fn api_error(e: Option<&Value>) -> ClientError {
    let field = |k: &str| {
        e.and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    ClientError::Api {
        code: field("code"),
        message: field("message"),
        details: e.and_then(|e| e.get("details")).cloned(),
    }
}

fn random_nonce() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&b[0..4]),
        hex::encode(&b[4..6]),
        hex::encode(&b[6..8]),
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    )
}

/// Reads an HMAC key file: `--hmac-key-file`, else `$WARDEN_HMAC_KEY_FILE`.
pub fn read_key(explicit: Option<&Path>) -> Result<Vec<u8>, ClientError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("WARDEN_HMAC_KEY_FILE") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                return Err(ClientError::Key {
                    path: PathBuf::new(),
                    message: "no key given: set WARDEN_HMAC_KEY_FILE or --hmac-key-file".into(),
                })
            }
        },
    };
    std::fs::read(&path).map_err(|e| ClientError::Key {
        path,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_frames_in_the_daemons_shape_take_the_fast_path_and_others_do_not() {
        let f = br#"{"status":"ok","data":{"offset":42,"stream":"stderr","data":"AAEC/w=="},"id":7,"stream":true,"final":false}"#;
        let (h, o) = fast_output_frame(f).unwrap();
        assert_eq!(h.id, Some(json!(7)));
        assert_eq!((h.stream, h.is_final), (Some(true), Some(false)));
        assert_eq!(
            (o.offset, o.stream, o.data),
            (Some(42), Some("stderr"), Some("AAEC/w=="))
        );
        assert_eq!(
            base64_simd::STANDARD
                .decode_to_vec(o.data.unwrap())
                .unwrap(),
            [0, 1, 2, 255]
        );
        // Same content, other layout: the general parser's business.
        for other in [
            &br#"{"status":"ok","data":{"stream":"stdout","offset":1,"data":"AA=="},"id":7,"stream":true,"final":false}"#[..],
            br#"{"status":"ok","data":{"offset":1,"stream":"stdout","data":"A\"A=="},"id":7}"#,
            br#"{"status":"ok","data":{"offset":1,"stream":"other","data":"AA=="},"id":7}"#,
            br#"{"status":"ok","data":{"offset":1,"stream":"stdout","data":"AA=="}"#,
        ] {
            assert!(fast_output_frame(other).is_none());
        }
        let general: Frame<'_> = serde_json::from_slice(
            br#"{"status":"ok","data":{"stream":"stdout","offset":1,"data":"AA=="},"id":7,"stream":true,"final":false}"#,
        )
        .unwrap();
        let out: OutputFrame<'_> = serde_json::from_str(general.data.unwrap().get()).unwrap();
        assert_eq!((out.offset, out.data), (Some(1), Some("AA==")));
        assert_eq!(general.id, Some(json!(7)));
    }
}
