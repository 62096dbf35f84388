//! The core↔gateway channel: the gateway's calls into core across a process boundary.
//!
//! Under privilege separation the gateway runs in its own unprivileged process and reaches core
//! over a socketpair the monitor created and handed to both sides. This module is both ends:
//! - [`ChannelCore`] (gateway side) implements [`Core`]: each call (certificate identity plus a
//!   warden-dialect request) is sent with a call id, so many calls are in flight at once; core's
//!   streamed frames and its final reply come back tagged with that id.
//! - [`Pairing`] and [`serve`] (core side) run the calls arriving on the channel through the one
//!   pipeline with a certificate principal, exactly as [`super::InProcess`] does.
//!
//! Staleness: when either process is replaced, the monitor hands the survivor a fresh channel.
//! On core's side [`Pairing::install`] makes it current; the channel it replaces stops being
//! served — whatever arrives on it afterwards is answered with a refusal, and it is closed. On
//! the gateway's side [`ChannelCore::attach`] drops the old channel and fails the calls still
//! pending on it. Core builds a certificate principal *only* for calls on a channel it was
//! handed through [`Pairing::install`]: nothing else in core accepts a forwarded identity.
//!
//! Wire format: length-prefixed frames (a big-endian `u32`, then the body), the framing of
//! `warden-wire`. A body starting with `{` is one JSON [`Message`] (call, cancel, refusal); one
//! starting with `0x00` (a streamed frame) or `0x01` (a final reply) is that byte, the call id
//! (big-endian `u64`), then the pipeline's bytes as they are — no escaping, binary job output
//! included.
//!
//! Flow control: a streamed call has a window of [`super::STREAM_WINDOW`] frames. Core takes a
//! permit per frame it sends and waits when none is left; the gateway returns permits with a
//! `credit` message as its consumer takes frames. A slow remote reader thus holds core's
//! producer back without cutting the call.
//!
//! What it deliberately does not do: create or pass the socketpair (the monitor's job), verify
//! certificates (the TLS layer's), or decide anything about the caller (core's policy).

use super::{cert_principal, give_back, CallFuture, Core, FrameSender, STREAM_WINDOW, TRANSPORT};
use crate::identity::CertIdentity;
use crate::server::frame::{write_framed, Frame};
use crate::server::pipeline::{self, err, StreamSink};
use crate::server::state::{Peer, State};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use warden_wire::envelope::{Credential, Dialect, Request};
use warden_wire::framing::{encode_frame, FrameDecoder, Framing};
use warden_wire::reply::ErrorCode;

/// The largest message either side accepts: a request is bounded by the gateway's own limit
/// long before this; a reply carries at most a job's output chunk or a secret.
const MAX_MESSAGE: usize = 64 << 20;

/// One message on the channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Gateway → core: run `req` for the certificate peer `cert`.
    Call {
        id: u64,
        cert: WireCert,
        req: Box<WireRequest>,
    },
    /// Gateway → core: nobody reads call `id` any more (the client went away): stop it. Core
    /// answers with a final error reply if the call had not ended yet.
    Cancel { id: u64 },
    /// Gateway → core: `n` more streamed frames of call `id` may be sent. Every streamed call
    /// starts with a window of [`super::STREAM_WINDOW`] frames; the gateway gives credit back
    /// as its client takes them, and core never holds more than the window for it.
    Credit { id: u64, n: u32 },
    /// Core → gateway: this channel is no longer served (a newer one replaced it).
    Refused { reason: String },
}

/// A [`CertIdentity`] as it crosses the channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireCert {
    pub id: String,
    pub cn: Option<String>,
    pub sans: Vec<String>,
}

/// A [`Request`] as it crosses the channel: every field, the unverified credential included
/// (core verifies it as it would on the Unix socket).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireRequest {
    /// `"lumo"` or `"securityd"`.
    pub dialect: String,
    pub method: String,
    pub id: Option<Value>,
    pub params: Value,
    pub params_raw: Option<String>,
    pub token: Option<String>,
    pub hmac: Option<WireHmac>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireHmac {
    pub timestamp: u64,
    pub nonce: String,
    /// Hex.
    pub signature: String,
}

impl WireRequest {
    fn from_request(req: Request) -> WireRequest {
        let (token, hmac) = match req.credential {
            // The gateway builds its requests itself and never asks for a peer credential, which
            // only the Unix socket honours: none is carried over.
            Credential::None | Credential::Peer => (None, None),
            Credential::Token(t) => (Some(t), None),
            Credential::Hmac {
                timestamp,
                nonce,
                signature,
            } => (
                None,
                Some(WireHmac {
                    timestamp,
                    nonce,
                    signature: hex::encode(signature),
                }),
            ),
        };
        WireRequest {
            dialect: match req.dialect {
                Dialect::Lumo => "lumo",
                Dialect::Securityd => "securityd",
            }
            .to_string(),
            method: req.method,
            id: req.id,
            params: req.params,
            params_raw: req.params_raw,
            token,
            hmac,
        }
    }

    fn into_request(self) -> Result<Request, String> {
        let dialect = match self.dialect.as_str() {
            "lumo" => Dialect::Lumo,
            "securityd" => Dialect::Securityd,
            other => return Err(format!("unknown dialect {other:?}")),
        };
        let credential = match (self.token, self.hmac) {
            (None, None) => Credential::None,
            (Some(t), None) => Credential::Token(t),
            (None, Some(h)) => Credential::Hmac {
                timestamp: h.timestamp,
                nonce: h.nonce,
                signature: hex::decode(&h.signature)
                    .map_err(|_| "the HMAC signature is not hex".to_string())?,
            },
            (Some(_), Some(_)) => return Err("a request carries one credential".to_string()),
        };
        Ok(Request {
            dialect,
            method: self.method,
            id: self.id,
            params: self.params,
            params_raw: self.params_raw,
            credential,
        })
    }
}

/// A channel end the monitor handed over (a descriptor from the control socket), ready for
/// [`ChannelCore::attach`] or [`Pairing::install`]. Must be called within a Tokio runtime.
pub fn stream_from_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

fn encode_message(msg: &Message) -> Out {
    let json = serde_json::to_vec(msg).expect("a channel message always serializes");
    let mut out = BytesMut::with_capacity(json.len() + 4);
    encode_frame(Framing::LengthPrefixed, &json, &mut out);
    Out::Encoded(out.freeze())
}

/// What the writer of one channel end sends.
enum Out {
    /// A whole encoded message.
    Encoded(Bytes),
    /// A streamed frame or final reply: the header is written in front of `body`'s parts
    /// without copying them (job output is most of what crosses the channel).
    Raw { kind: u8, id: u64, body: Frame },
    /// Write what is queued, then close.
    Close,
}

/// The first byte of a streamed frame on the channel (JSON messages start with `{`).
const FRAME: u8 = 0;
/// The first byte of a call's final reply on the channel.
const REPLY: u8 = 1;

/// The header of a streamed frame (`FRAME`) or final reply (`REPLY`) of call `id` whose bytes
/// are `len` long: the length prefix, the kind, the id (big-endian `u64`). The bytes follow
/// exactly as core's pipeline produced them (a JSON reply object, or a binary job output
/// frame), with no JSON escaping or base64 around them.
fn raw_header(kind: u8, id: u64, len: usize) -> [u8; 13] {
    let mut h = [0u8; 13];
    h[..4].copy_from_slice(&((9 + len) as u32).to_be_bytes());
    h[4] = kind;
    h[5..].copy_from_slice(&id.to_be_bytes());
    h
}

fn encode_reply(id: u64, reply: Vec<u8>) -> Out {
    Out::Raw {
        kind: REPLY,
        id,
        body: reply.into(),
    }
}

/// What arrives on the channel.
#[derive(Debug)]
enum Incoming {
    Message(Message),
    /// A streamed frame of call `id`.
    Frame {
        id: u64,
        data: bytes::Bytes,
    },
    /// The final reply of call `id`.
    Reply {
        id: u64,
        data: bytes::Bytes,
    },
}

/// The least a read asks for.
const READ_CHUNK: usize = 64 << 10;

/// Reads messages off one end of the channel.
struct Reader {
    half: tokio::net::unix::OwnedReadHalf,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl Reader {
    fn new(half: tokio::net::unix::OwnedReadHalf) -> Reader {
        Reader {
            half,
            buf: BytesMut::with_capacity(8192),
            decoder: FrameDecoder::with_framing(MAX_MESSAGE, Framing::LengthPrefixed),
        }
    }

    /// The next message; `None` at the end of the stream or on anything unreadable (the channel
    /// is then unusable and closed by the caller).
    async fn next(&mut self) -> Option<Incoming> {
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) if matches!(frame.first(), Some(&FRAME | &REPLY)) => {
                    if frame.len() < 9 {
                        tracing::warn!("a short frame on the core-gateway channel");
                        return None;
                    }
                    let id = u64::from_be_bytes(frame[1..9].try_into().expect("8 bytes"));
                    let data = frame.slice(9..);
                    return Some(if frame[0] == FRAME {
                        Incoming::Frame { id, data }
                    } else {
                        Incoming::Reply { id, data }
                    });
                }
                Ok(Some(frame)) => match serde_json::from_slice(&frame) {
                    Ok(m) => return Some(Incoming::Message(m)),
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable message on the core-gateway channel");
                        return None;
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "broken framing on the core-gateway channel");
                    return None;
                }
            }
            // Room for the whole frame being read (or 64 KiB), so that one read takes in as
            // much as the other side has written instead of growing the buffer piecemeal.
            let want = match self.buf.get(..4) {
                Some(p) => (4 + u32::from_be_bytes(p.try_into().expect("4 bytes")) as usize)
                    .min(4 + MAX_MESSAGE)
                    .saturating_sub(self.buf.len()),
                None => 0,
            };
            self.buf.reserve(want.max(READ_CHUNK));
            match self.half.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// A body at least this long is written from where it is rather than copied into the batch.
const DIRECT: usize = 16 << 10;
/// What one batch of small messages gathers at most before it is written.
const BATCH: usize = 256 << 10;

/// Writes queued messages to one end of the channel until the queue closes or a write fails.
/// Messages queued together go out in one write (under load, many replies per system call);
/// large bodies (job output) are written from their own buffer behind their header.
fn spawn_writer(
    mut half: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut batch = BytesMut::with_capacity(64 << 10);
        let mut next = rx.recv().await;
        'run: while let Some(first) = next.take() {
            let mut item = Some(first);
            while let Some(out) = item.take() {
                match out {
                    Out::Close => break 'run,
                    Out::Encoded(b) => batch.extend_from_slice(&b),
                    Out::Raw { kind, id, body } if body.len() >= DIRECT => {
                        batch.extend_from_slice(&raw_header(kind, id, body.len()));
                        if write_framed(&mut half, &batch, &body, &[]).await.is_err() {
                            break 'run;
                        }
                        batch.clear();
                    }
                    Out::Raw { kind, id, body } => {
                        batch.extend_from_slice(&raw_header(kind, id, body.len()));
                        if body.encode_raw(&mut batch).is_err() {
                            break 'run;
                        }
                    }
                }
                if batch.len() < BATCH {
                    item = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                if half.write_all(&batch).await.is_err() {
                    break;
                }
                batch.clear();
            }
            next = rx.recv().await;
        }
        if !batch.is_empty() {
            let _ = half.write_all(&batch).await;
        }
        let _ = half.shutdown().await;
    })
}

/// An encoded error reply in the request's own dialect, for calls core never answered.
fn unavailable(dialect: Dialect, id: Option<&Value>, message: &str) -> Vec<u8> {
    pipeline::encode(dialect, id, "", Err(&err(ErrorCode::Unavailable, message)))
}

// ---------------------------------------------------------------------------------------------
// Gateway side

struct Pending {
    reply: oneshot::Sender<Vec<u8>>,
    frames: Option<FrameSender>,
}

/// The calls waiting for core's reply; `None` once the channel is closed (nothing more can be
/// answered on it, so a new call fails at once instead of waiting forever).
type PendingMap = Arc<Mutex<Option<HashMap<u64, Pending>>>>;

/// One attached channel: where calls are written and who waits for replies.
struct Link {
    tx: mpsc::UnboundedSender<Out>,
    pending: PendingMap,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        // Dropping the old channel: its reader stops (closing the socket's read half), the
        // writer ends when `tx` goes, and the calls still waiting fail (their senders drop).
        self.reader.abort();
        self.pending.lock().unwrap().take();
    }
}

/// The gateway's [`Core`] under privilege separation: calls go over the channel to core.
pub struct ChannelCore {
    link: Mutex<Option<Link>>,
    next_id: AtomicU64,
}

impl Default for ChannelCore {
    fn default() -> Self {
        ChannelCore::new()
    }
}

impl ChannelCore {
    /// A core with no channel yet: calls fail with `UNAVAILABLE` until
    /// [`ChannelCore::attach`].
    pub fn new() -> ChannelCore {
        ChannelCore {
            link: Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// Uses `stream` (a channel end the monitor handed over) from now on and drops the one
    /// before it: calls still pending on the old channel fail with `UNAVAILABLE`.
    /// Must be called within a Tokio runtime.
    pub fn attach(&self, stream: UnixStream) {
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        spawn_writer(write, rx);
        let pending: PendingMap = Arc::new(Mutex::new(Some(HashMap::new())));
        let reader = tokio::spawn(read_replies(Reader::new(read), pending.clone(), tx.clone()));
        let old = self.link.lock().unwrap().replace(Link {
            tx,
            pending,
            reader,
        });
        drop(old);
    }

    /// Drops the current channel (core is gone); calls fail until the next [`attach`](Self::attach).
    pub fn detach(&self) {
        let old = self.link.lock().unwrap().take();
        drop(old);
    }
}

async fn read_replies(mut reader: Reader, pending: PendingMap, out: mpsc::UnboundedSender<Out>) {
    while let Some(msg) = reader.next().await {
        let msg = match msg {
            Incoming::Frame { id, data } => {
                let mut map = pending.lock().unwrap();
                if let Some(p) = map.as_mut().and_then(|m| m.get_mut(&id)) {
                    // No permit is taken here: core sends no more than the credit it was given.
                    let gone = match &p.frames {
                        Some(f) => f.tx.send(data.into()).is_err(),
                        None => false,
                    };
                    if gone {
                        // Its reader went away (the client left): stop the call in core rather
                        // than stream on for no one.
                        p.frames = None;
                        let _ = out.send(encode_message(&Message::Cancel { id }));
                    }
                }
                continue;
            }
            Incoming::Reply { id, data } => {
                let p = pending.lock().unwrap().as_mut().and_then(|m| m.remove(&id));
                if let Some(p) = p {
                    let _ = p.reply.send(data.into());
                }
                continue;
            }
            Incoming::Message(m) => m,
        };
        match msg {
            Message::Refused { reason } => {
                tracing::warn!(%reason, "core refused the channel");
                break;
            }
            Message::Call { .. } | Message::Cancel { .. } | Message::Credit { .. } => {
                tracing::warn!("core sent a gateway's message; closing the channel");
                break;
            }
        }
    }
    // The channel is gone: everything still waiting on it fails, and so does every later call.
    pending.lock().unwrap().take();
}

/// Held by a call's future until its reply arrives: a call dropped before that (its client
/// went away) is forgotten here and cancelled in core.
struct CancelOnDrop {
    id: u64,
    /// `None` once the reply arrived.
    tx: Option<mpsc::UnboundedSender<Out>>,
    pending: PendingMap,
    /// A streamed call's credit pump.
    credit: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(pump) = self.credit.take() {
            pump.abort();
        }
        if let Some(tx) = self.tx.take() {
            if let Some(map) = self.pending.lock().unwrap().as_mut() {
                map.remove(&self.id);
            }
            let _ = tx.send(encode_message(&Message::Cancel { id: self.id }));
        }
    }
}

impl Core for ChannelCore {
    fn call(&self, cert: CertIdentity, req: Request, frames: Option<FrameSender>) -> CallFuture {
        let dialect = req.dialect;
        let req_id = req.id.clone();
        let (reply_tx, reply_rx) = oneshot::channel();
        let sent = {
            let link = self.link.lock().unwrap();
            match link.as_ref() {
                None => None,
                Some(link) => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    // Core starts the call with a window of its own: the local permits are
                    // core's, so none are left here to give as credit until frames are taken.
                    let window = frames.as_ref().map(|f| {
                        f.window.forget_permits(STREAM_WINDOW);
                        f.window.clone()
                    });
                    let open = match link.pending.lock().unwrap().as_mut() {
                        Some(map) => {
                            map.insert(
                                id,
                                Pending {
                                    reply: reply_tx,
                                    frames,
                                },
                            );
                            true
                        }
                        None => false,
                    };
                    let msg = Message::Call {
                        id,
                        cert: WireCert {
                            id: cert.id,
                            cn: cert.cn,
                            sans: cert.sans,
                        },
                        req: Box::new(WireRequest::from_request(req)),
                    };
                    if !open {
                        None
                    } else if link.tx.send(encode_message(&msg)).is_err() {
                        if let Some(map) = link.pending.lock().unwrap().as_mut() {
                            map.remove(&id);
                        }
                        None
                    } else {
                        Some(CancelOnDrop {
                            id,
                            tx: Some(link.tx.clone()),
                            pending: link.pending.clone(),
                            credit: window
                                .map(|w| tokio::spawn(credit_pump(id, w, link.tx.clone()))),
                        })
                    }
                }
            }
        };
        Box::pin(async move {
            let Some(mut guard) = sent else {
                return unavailable(
                    dialect,
                    req_id.as_ref(),
                    "core is not reachable (restarting?)",
                );
            };
            let reply = reply_rx.await;
            guard.tx = None;
            match reply {
                Ok(bytes) => bytes,
                Err(_) => unavailable(
                    dialect,
                    req_id.as_ref(),
                    "core went away before it answered (it is being restarted; retry)",
                ),
            }
        })
    }
}

/// Turns the permits a streamed call's consumer gives back into credit for core: every permit
/// the consumer returns is one more frame core may send.
async fn credit_pump(id: u64, window: Arc<Semaphore>, tx: mpsc::UnboundedSender<Out>) {
    loop {
        let Ok(p) = window.acquire().await else {
            return;
        };
        p.forget();
        let mut n = 1u32;
        while let Ok(p) = window.try_acquire() {
            p.forget();
            n += 1;
        }
        if tx.send(encode_message(&Message::Credit { id, n })).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Core side

/// Core's record of which channel to the gateway is current.
pub struct Pairing {
    current: watch::Sender<u64>,
}

impl Default for Pairing {
    fn default() -> Self {
        Pairing::new()
    }
}

/// A channel end made current by [`Pairing::install`]; pass it to [`serve`].
pub struct Installed {
    stream: UnixStream,
    generation: u64,
    current: watch::Receiver<u64>,
}

impl Pairing {
    pub fn new() -> Pairing {
        Pairing {
            current: watch::channel(0).0,
        }
    }

    /// Makes `stream` (handed over by the monitor) the current channel. The channel it replaces
    /// stops being served: its pending messages are refused and it is closed.
    pub fn install(&self, stream: UnixStream) -> Installed {
        let mut generation = 0;
        self.current.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        Installed {
            stream,
            generation,
            current: self.current.subscribe(),
        }
    }
}

/// Serves one channel until the gateway closes it or a newer channel replaces it. Each call
/// runs concurrently through the pipeline with a certificate principal. When the channel ends,
/// the calls still running on it are cancelled, as a Unix socket client's are when it hangs up
/// (a followed `audit.tail` or `jobs.attach` would otherwise run for no one).
pub async fn serve(state: Arc<State>, installed: Installed) {
    let Installed {
        stream,
        generation,
        mut current,
    } = installed;
    let (read, write) = stream.into_split();
    let mut reader = Reader::new(read);
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let writer = spawn_writer(write, rx);
    let mut calls = tokio::task::JoinSet::new();
    // Each running call: how to stop it, and the window its streamed frames take permits from.
    let mut running: HashMap<u64, (tokio::task::AbortHandle, Arc<Semaphore>)> = HashMap::new();
    let stale = |c: &watch::Receiver<u64>| *c.borrow() != generation;
    loop {
        let msg = tokio::select! {
            m = reader.next() => m,
            _ = current.wait_for(|g| *g != generation) => None,
            Some(done) = calls.join_next(), if !calls.is_empty() => {
                if let Ok(id) = done {
                    running.remove(&id);
                }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        if stale(&current) {
            break;
        }
        let msg = match msg {
            Incoming::Message(m) => m,
            Incoming::Frame { .. } | Incoming::Reply { .. } => {
                tracing::warn!("the gateway sent a streamed frame; closing the channel");
                break;
            }
        };
        match msg {
            Message::Call { id, cert, req } => {
                let state = state.clone();
                let tx = tx.clone();
                let window = Arc::new(Semaphore::new(STREAM_WINDOW));
                let w = window.clone();
                let handle = calls.spawn(async move {
                    let data = run_call(&state, id, cert, req, &tx, w).await;
                    let _ = tx.send(encode_reply(id, data));
                    id
                });
                running.insert(id, (handle, window));
            }
            Message::Credit { id, n } => {
                // Credit for a call that already ended is no error: it crossed the reply.
                if let Some((_, window)) = running.get(&id) {
                    give_back(window, n as usize);
                }
            }
            Message::Cancel { id } => {
                if let Some((h, _)) = running.remove(&id) {
                    h.abort();
                    // The gateway may still wait for the reply: the call ends here.
                    let data = pipeline::encode(
                        Dialect::Securityd,
                        None,
                        "",
                        Err(&err(ErrorCode::Unavailable, "cancelled by the gateway")),
                    );
                    let _ = tx.send(encode_reply(id, data));
                }
            }
            other => {
                tracing::warn!(message = ?other, "the gateway sent a message core does not take; closing the channel");
                break;
            }
        }
    }
    calls.shutdown().await;
    if stale(&current) {
        let _ = tx.send(encode_message(&Message::Refused {
            reason: "this channel was replaced by a newer one".to_string(),
        }));
    }
    // The writer ends at the close marker, even if a cancelled call's sender is still around.
    let _ = tx.send(Out::Close);
    drop(tx);
    let _ = writer.await;
}

async fn run_call(
    state: &Arc<State>,
    id: u64,
    cert: WireCert,
    req: Box<WireRequest>,
    tx: &mpsc::UnboundedSender<Out>,
    window: Arc<Semaphore>,
) -> Vec<u8> {
    let req = match req.into_request() {
        Ok(r) => r,
        Err(e) => {
            let body = err(ErrorCode::ValidationError, e);
            return pipeline::encode(Dialect::Securityd, None, "", Err(&body));
        }
    };
    let cert = CertIdentity {
        id: cert.id,
        cn: cert.cn,
        sans: cert.sans,
    };
    let rt = state.runtime();
    let peer = Arc::new(Peer::new(cert_principal(cert), &rt));
    drop(rt);
    // Frames go through a local queue that forwards each one tagged with the call's id.
    let mut forwarder = None;
    let sink = match &req.id {
        Some(rid) => {
            let (ftx, mut frx) = mpsc::unbounded_channel::<Frame>();
            let out = tx.clone();
            forwarder = Some(tokio::spawn(async move {
                while let Some(body) = frx.recv().await {
                    if out
                        .send(Out::Raw {
                            kind: FRAME,
                            id,
                            body,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            }));
            // Frames cross the channel as raw bytes, so binary job output stays binary; the
            // gateway's credit bounds how many are on their way.
            Some(StreamSink {
                tx: ftx,
                id: rid.clone(),
                binary: true,
                files: false,
                window: Some(window),
            })
        }
        None => None,
    };
    let reply = pipeline::process(state, &peer, TRANSPORT, req, sink).await;
    // The sink is gone with `process`: the forwarder drains the last frames and ends, so the
    // final reply never overtakes a frame.
    if let Some(f) = forwarder {
        let _ = f.await;
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditLog;
    use crate::config::Config;
    use crate::server::state::Runtime;
    use serde_json::json;
    use std::time::Duration;

    const CERT_ID: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

    fn state(dir: &std::path::Path) -> Arc<State> {
        let text = format!(
            r#"
[socket]
path = "{d}/warden.sock"

[audit]
path = "{d}/audit.log"

[policy.roles.admin]
allow = ["*"]

[[policy.rules]]
cert_id = "{CERT_ID}"
roles = ["admin"]
"#,
            d = dir.display()
        );
        let config = Config::parse(&text, &dir.join("warden.toml")).unwrap();
        let audit = AuditLog::open(config.audit.audit_config()).unwrap();
        let runtime = Runtime::build(config, 1).unwrap();
        Arc::new(State::new(runtime, None, audit, false))
    }

    fn cert() -> CertIdentity {
        CertIdentity {
            id: CERT_ID.to_string(),
            cn: Some("panel".to_string()),
            sans: vec![],
        }
    }

    fn request(method: &str, id: u64, token: Option<&str>, params: Value) -> Request {
        Request {
            dialect: Dialect::Securityd,
            method: method.to_string(),
            id: Some(json!(id)),
            params,
            params_raw: None,
            credential: match token {
                Some(t) => Credential::Token(t.to_string()),
                None => Credential::None,
            },
        }
    }

    fn decode(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    /// A gateway-side core attached to a channel that `state` serves.
    fn paired(state: &Arc<State>, pairing: &Pairing) -> (ChannelCore, tokio::task::JoinHandle<()>) {
        let (g, c) = UnixStream::pair().unwrap();
        let server = tokio::spawn(serve(state.clone(), pairing.install(c)));
        let core = ChannelCore::new();
        core.attach(g);
        (core, server)
    }

    async fn admin_token(core: &ChannelCore) -> String {
        let reply = core
            .call(
                cert(),
                request("auth", 1, None, json!({"type": "admin"})),
                None,
            )
            .await;
        let v = decode(&reply);
        assert_eq!(v["status"], "ok", "{v}");
        v["data"]["token"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn a_call_runs_through_core_pipeline_with_the_certificate_principal() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let pairing = Pairing::new();
        let (core, _server) = paired(&state, &pairing);

        let v = decode(
            &core
                .call(cert(), request("health", 7, None, Value::Null), None)
                .await,
        );
        assert_eq!(v["status"], "ok", "{v}");
        assert_eq!(v["id"], 7);
        // The certificate's policy rule applies: an admin session for this certificate.
        let token = admin_token(&core).await;
        let v = decode(
            &core
                .call(
                    cert(),
                    request("status", 8, Some(&token), Value::Null),
                    None,
                )
                .await,
        );
        assert_eq!(v["status"], "ok", "{v}");
        // Another certificate matches no rule.
        let other = CertIdentity {
            id: "cd".repeat(32),
            cn: None,
            sans: vec![],
        };
        let v = decode(
            &core
                .call(
                    other,
                    request("auth", 9, None, json!({"type": "admin"})),
                    None,
                )
                .await,
        );
        assert_eq!(v["status"], "error", "{v}");
        // The audit log shows the gateway transport and the certificate.
        let log = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert!(log.contains("\"gateway\""), "{log}");
        assert!(log.contains(CERT_ID), "{log}");
    }

    #[tokio::test]
    async fn many_calls_in_flight_each_get_their_own_reply() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let pairing = Pairing::new();
        let (core, _server) = paired(&state, &pairing);
        let core = Arc::new(core);
        let mut calls = Vec::new();
        for i in 0..64u64 {
            let core = core.clone();
            calls.push(tokio::spawn(async move {
                let v = decode(
                    &core
                        .call(cert(), request("health", i, None, Value::Null), None)
                        .await,
                );
                (i, v)
            }));
        }
        for c in calls {
            let (i, v) = c.await.unwrap();
            assert_eq!(v["status"], "ok", "{v}");
            assert_eq!(v["id"], i, "{v}");
        }
    }

    #[tokio::test]
    async fn streamed_frames_arrive_before_the_final_reply() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let pairing = Pairing::new();
        let (core, _server) = paired(&state, &pairing);
        let token = admin_token(&core).await;
        for i in 0..3 {
            core.call(cert(), request("health", 10 + i, None, Value::Null), None)
                .await;
        }
        let (ftx, mut frx) = crate::gateway::frames();
        let v = decode(
            &core
                .call(
                    cert(),
                    request("audit.tail", 20, Some(&token), json!({"lines": 3})),
                    Some(ftx),
                )
                .await,
        );
        assert_eq!(v["status"], "ok", "{v}");
        assert_eq!(v["data"]["records"], 3, "{v}");
        let mut frames = Vec::new();
        while let Some(f) = frx.try_recv() {
            frames.push(decode(&f.into_bytes().unwrap()));
        }
        assert_eq!(frames.len(), 3, "{frames:?}");
        for f in &frames {
            assert_eq!(f["id"], 20, "{f}");
            assert_eq!(f["final"], false, "{f}");
        }
    }

    #[tokio::test]
    async fn a_streamed_call_stops_at_the_window_until_the_gateway_takes_frames() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let pairing = Pairing::new();
        let (core, _server) = paired(&state, &pairing);
        let token = admin_token(&core).await;
        let n = 3 * crate::gateway::STREAM_WINDOW;
        for i in 0..n {
            core.call(
                cert(),
                request("health", 100 + i as u64, None, Value::Null),
                None,
            )
            .await;
        }
        let (ftx, mut frx) = crate::gateway::frames();
        let call = core.call(
            cert(),
            request("audit.tail", 20, Some(&token), json!({"lines": n})),
            Some(ftx),
        );
        tokio::pin!(call);
        // Nobody takes frames: core sends a window's worth and waits.
        let window = crate::gateway::STREAM_WINDOW;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while frx.queued() < window {
            assert!(tokio::time::Instant::now() < deadline, "{}", frx.queued());
            assert!(
                tokio::time::timeout(Duration::from_millis(10), &mut call)
                    .await
                    .is_err(),
                "the call ended without its frames being taken"
            );
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut call)
                .await
                .is_err(),
            "the call ended without its frames being taken"
        );
        assert_eq!(frx.queued(), window, "frames beyond the window");
        let mut got = 0;
        while frx.try_recv().is_some() {
            got += 1;
        }
        assert_eq!(got, window);
        // Taking frames returns credit; the rest follows and the call ends.
        let reader = async {
            let mut more = 0;
            while let Some(f) = frx.recv().await {
                assert_eq!(decode(&f.into_bytes().unwrap())["final"], false);
                more += 1;
            }
            more
        };
        let (reply, more) = tokio::join!(call, reader);
        let v = decode(&reply);
        assert_eq!(v["status"], "ok", "{v}");
        assert_eq!(v["data"]["records"], n, "{v}");
        assert_eq!(got + more, n);
    }

    #[tokio::test]
    async fn a_replaced_channel_is_refused_and_the_new_one_serves() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let pairing = Pairing::new();
        let (old, old_server) = paired(&state, &pairing);
        let v = decode(
            &old.call(cert(), request("health", 1, None, Value::Null), None)
                .await,
        );
        assert_eq!(v["status"], "ok", "{v}");

        // The gateway is replaced: core gets a fresh channel for the new one.
        let (new, _server) = paired(&state, &pairing);
        // Core stops serving the old channel (the serve task ends) …
        tokio::time::timeout(Duration::from_secs(30), old_server)
            .await
            .expect("the old channel is still served")
            .unwrap();
        // … and a call on it is refused, never run.
        let before = state.metrics.requests_total.load(Ordering::Relaxed);
        let v = decode(
            &old.call(cert(), request("health", 2, None, Value::Null), None)
                .await,
        );
        assert_eq!(v["status"], "error", "{v}");
        assert_eq!(v["error"]["code"], "UNAVAILABLE", "{v}");
        assert_eq!(state.metrics.requests_total.load(Ordering::Relaxed), before);

        let v = decode(
            &new.call(cert(), request("health", 3, None, Value::Null), None)
                .await,
        );
        assert_eq!(v["status"], "ok", "{v}");
    }

    #[tokio::test]
    async fn a_message_written_on_a_stale_channel_is_answered_with_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let pairing = Pairing::new();
        let (mut raw, c) = UnixStream::pair().unwrap();
        let installed = pairing.install(c);
        // A newer channel is installed before the old one's serve loop reads anything.
        let (_g2, c2) = UnixStream::pair().unwrap();
        let _current = pairing.install(c2);
        let msg = Message::Call {
            id: 1,
            cert: WireCert {
                id: CERT_ID.to_string(),
                cn: None,
                sans: vec![],
            },
            req: Box::new(WireRequest::from_request(request(
                "health",
                1,
                None,
                Value::Null,
            ))),
        };
        let Out::Encoded(bytes) = encode_message(&msg) else {
            unreachable!()
        };
        raw.write_all(&bytes).await.unwrap();
        let before = state.metrics.requests_total.load(Ordering::Relaxed);
        serve(state.clone(), installed).await;
        let (read, _w) = raw.into_split();
        let mut reader = Reader::new(read);
        match reader.next().await {
            Some(Incoming::Message(Message::Refused { .. })) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            reader.next().await.is_none(),
            "the stale channel stays open"
        );
        assert_eq!(state.metrics.requests_total.load(Ordering::Relaxed), before);
    }

    #[tokio::test]
    async fn a_gateway_that_dies_mid_call_leaves_core_serving() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let pairing = Pairing::new();
        let (core, server) = paired(&state, &pairing);
        let token = admin_token(&core).await;
        // A call that never ends by itself: following the audit log.
        let (ftx, mut frx) = crate::gateway::frames();
        let pending = core.call(
            cert(),
            request(
                "audit.tail",
                5,
                Some(&token),
                json!({"lines": 1, "follow": true}),
            ),
            Some(ftx),
        );
        let waiting = tokio::spawn(pending);
        assert!(frx.recv().await.is_some(), "no frame of the followed log");
        // The gateway dies: its channel end closes with the call in flight.
        core.detach();
        let v = decode(&waiting.await.unwrap());
        assert_eq!(v["error"]["code"], "UNAVAILABLE", "{v}");
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("core still serves a dead gateway's channel")
            .unwrap();
        // Core goes on serving the next gateway.
        let (core2, _server2) = paired(&state, &pairing);
        let v = decode(
            &core2
                .call(cert(), request("health", 6, None, Value::Null), None)
                .await,
        );
        assert_eq!(v["status"], "ok", "{v}");
    }

    /// The monitor's side of a gateway restart, with the real handoff: core receives each new
    /// gateway's channel end and identity over its control socket and installs it; the first
    /// gateway's channel is refused from then on.
    #[tokio::test]
    async fn a_channel_handed_over_the_control_socket_replaces_the_old_one() {
        use crate::privsep::{
            control_pair, recv_handoff, send_handoff, Handoff, ProcessIdentity, Role,
        };
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let pairing = Pairing::new();
        let (monitor_end, core_end) = control_pair().unwrap();
        let mut gateways = Vec::new();
        for generation in 1..=2u64 {
            // The monitor: a fresh channel per pairing, one end to core with the gateway's identity.
            let (g, c) = std::os::unix::net::UnixStream::pair().unwrap();
            let handoff = Handoff {
                peer_role: Role::Gateway,
                peer: ProcessIdentity::current().unwrap(),
                generation,
            };
            send_handoff(monitor_end.as_fd(), &handoff, c.as_fd()).unwrap();
            drop(c);
            // Core.
            let (got, fd) = recv_handoff(core_end.as_fd()).unwrap();
            assert_eq!(got, handoff);
            let installed = pairing.install(stream_from_fd(fd).unwrap());
            tokio::spawn(serve(state.clone(), installed));
            // The gateway.
            g.set_nonblocking(true).unwrap();
            let core = ChannelCore::new();
            core.attach(UnixStream::from_std(g).unwrap());
            gateways.push(core);
        }
        let v = decode(
            &gateways[1]
                .call(cert(), request("health", 1, None, Value::Null), None)
                .await,
        );
        assert_eq!(v["status"], "ok", "{v}");
        let v = decode(
            &gateways[0]
                .call(cert(), request("health", 2, None, Value::Null), None)
                .await,
        );
        assert_eq!(v["error"]["code"], "UNAVAILABLE", "{v}");
    }

    /// A streamed call whose reader went away is cancelled in core: it ends (with a final
    /// error reply) instead of streaming on for no one.
    #[tokio::test]
    async fn a_streamed_call_nobody_reads_is_cancelled_in_core() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let pairing = Pairing::new();
        let (core, _server) = paired(&state, &pairing);
        let token = admin_token(&core).await;
        let (ftx, mut frx) = crate::gateway::frames();
        let call = tokio::spawn(core.call(
            cert(),
            request(
                "audit.tail",
                5,
                Some(&token),
                json!({"lines": 1, "follow": true}),
            ),
            Some(ftx),
        ));
        assert!(frx.recv().await.is_some(), "no frame of the followed log");
        drop(frx);
        // The next audit record is the next frame: the gateway finds no reader and cancels.
        for i in 0..3 {
            core.call(cert(), request("health", 10 + i, None, Value::Null), None)
                .await;
        }
        let v = decode(
            &tokio::time::timeout(Duration::from_secs(30), call)
                .await
                .expect("the followed call still runs")
                .unwrap(),
        );
        assert_eq!(v["error"]["code"], "UNAVAILABLE", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("cancelled"),
            "{v}"
        );
    }

    #[tokio::test]
    async fn calls_pending_when_core_dies_fail_and_calls_without_a_channel_fail() {
        let core = ChannelCore::new();
        let v = decode(
            &core
                .call(cert(), request("health", 1, None, Value::Null), None)
                .await,
        );
        assert_eq!(v["error"]["code"], "UNAVAILABLE", "{v}");

        let (g, c) = UnixStream::pair().unwrap();
        core.attach(g);
        let call = tokio::spawn(core.call(cert(), request("health", 2, None, Value::Null), None));
        // Core reads the call and dies without answering.
        let (read, _w) = c.into_split();
        let mut reader = Reader::new(read);
        assert!(matches!(
            reader.next().await,
            Some(Incoming::Message(Message::Call { .. }))
        ));
        drop(reader);
        drop(_w);
        let v = decode(&call.await.unwrap());
        assert_eq!(v["error"]["code"], "UNAVAILABLE", "{v}");
        assert_eq!(v["id"], 2, "{v}");
    }
}
