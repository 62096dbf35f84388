//! The network side's way into core.
//!
//! The gateway (HTTPS REST and gRPC over mTLS) never touches core's state directly: every
//! request it accepts becomes one call of [`Core::call`] with the verified certificate identity
//! and a warden-dialect [`Request`]. Core runs it through the one pipeline (authenticate, rate
//! limit, authorize, handler, durable audit) and answers with the encoded warden-dialect reply,
//! exactly as it would on the Unix socket.
//!
//! Two implementations:
//! - [`InProcess`]: single-process mode (`privsep = false`, containers, sidecars, tests): the
//!   call goes straight into the pipeline of the same process.
//! - [`channel::ChannelCore`] (privilege separation): the same call forwarded over the
//!   socketpair the monitor handed to the gateway; core trusts the forwarded identity only on
//!   that channel ([`channel::serve`]).
//!
//! What it deliberately does not do: decide anything. The gateway derives the identity from the
//! certificate the TLS layer verified; whether that identity may do anything is core's policy.

pub mod channel;
pub mod child;
pub mod config;
pub mod grpc;
pub mod rest;
pub mod serve;
pub mod start;
pub mod tls;

pub use rest::app;
pub use serve::{serve, Limits};

use crate::identity::{CertIdentity, Principal, Transport};
use crate::server::frame::Frame;
use crate::server::pipeline::{self, StreamSink};
use crate::server::state::{Peer, State};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};
use warden_wire::envelope::Request;

/// Everything the gateway serves on its one port: gRPC (requests whose content type is
/// `application/grpc…`) and the REST API (every other request).
pub fn api(core: Arc<dyn Core>) -> axum::Router {
    use axum::response::IntoResponse;
    use tower_service::Service;
    let rest = rest::app(core.clone());
    let grpc = grpc::router(core);
    axum::Router::new().fallback(move |req: axum::extract::Request| {
        let is_grpc = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let mut svc = if is_grpc { grpc.clone() } else { rest.clone() };
        async move {
            match svc.call(req).await {
                Ok(r) => r.into_response(),
                Err(never) => match never {},
            }
        }
    })
}

/// The transport name the audit log shows for requests that came through the gateway.
pub const TRANSPORT: &str = "gateway";

/// The field core adds to a reply for the gateway only: the rate-limit decision the request
/// was counted under (`limit`, `remaining`, `reset` in seconds), for the `X-RateLimit-*`
/// headers. The REST layer removes it before answering; Unix-socket replies never have it.
pub const RATE_FIELD: &str = "rate_limit";

/// Adds [`RATE_FIELD`] to an encoded warden-dialect reply object.
pub fn append_rate(out: &mut Vec<u8>, d: &crate::auth::RateDecision) {
    let Some(end) = out.iter().rposition(|b| *b == b'}') else {
        return;
    };
    out.truncate(end);
    let reset = if d.allowed {
        d.reset_after.as_secs()
    } else {
        d.reset_after.as_secs().max(1)
    };
    out.extend_from_slice(
        format!(
            ",\"{RATE_FIELD}\":{{\"limit\":{},\"remaining\":{},\"reset\":{}}}}}",
            d.limit, d.remaining, reset
        )
        .as_bytes(),
    );
}

/// Frames of a streamed reply in flight between core and the gateway's consumer at most
/// (per call, and again per call in the channel's credits): `jobs.attach` frames are up to
/// 128 KiB, so a stream costs a few MiB however slowly its client reads.
pub const STREAM_WINDOW: usize = 16;

/// Where core sends the frames of a streamed reply (`jobs.attach`, `secrets.watch`): each is
/// one encoded warden-dialect reply object (without framing), `"final": false`, or a binary job
/// output frame; the call's own reply is the final one.
///
/// Flow-controlled: the producer takes one permit of `window` per frame and waits when there
/// is none; [`FrameReceiver::recv`] gives it back once the frame is taken. A slow client thus
/// stops core's reader of the job log (which keeps the output) instead of filling memory, and
/// the stream never needs to be cut and resumed.
#[derive(Clone)]
pub struct FrameSender {
    pub tx: mpsc::UnboundedSender<Frame>,
    pub window: Arc<Semaphore>,
}

/// The consuming end of a [`FrameSender`].
pub struct FrameReceiver {
    rx: mpsc::UnboundedReceiver<Frame>,
    window: Arc<Semaphore>,
}

/// A frame channel with a window of [`STREAM_WINDOW`] frames.
pub fn frames() -> (FrameSender, FrameReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let window = Arc::new(Semaphore::new(STREAM_WINDOW));
    (
        FrameSender {
            tx,
            window: window.clone(),
        },
        FrameReceiver { rx, window },
    )
}

impl FrameReceiver {
    /// The next frame; its permit goes back to the producer. `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        give_back(&self.window, 1);
        Some(f)
    }

    /// Frames waiting to be taken.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.rx.len()
    }

    /// The next frame if one is there.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let f = self.rx.try_recv().ok()?;
        give_back(&self.window, 1);
        Some(f)
    }
}

/// Returns `n` permits to a stream's window, never beyond [`STREAM_WINDOW`] (a frame sent
/// without a permit — a small control frame — must not widen the window).
pub fn give_back(window: &Semaphore, n: usize) {
    let room = STREAM_WINDOW.saturating_sub(window.available_permits());
    if room > 0 {
        window.add_permits(n.min(room));
    }
}

pub type CallFuture = Pin<Box<dyn Future<Output = Vec<u8>> + Send + 'static>>;

/// What the gateway needs of core.
pub trait Core: Send + Sync + 'static {
    /// Runs one request for a certificate peer and returns the encoded warden-dialect reply
    /// (`{"status": "ok"|"error", …}`, without framing). A streaming method needs `frames` and
    /// an `id` in the request; its frames arrive there before the final reply is returned.
    fn call(&self, cert: CertIdentity, req: Request, frames: Option<FrameSender>) -> CallFuture;
}

/// The principal core builds for a certificate peer: nothing local is known about it (no uid
/// that means anything, no pid, no executable); the policy's certificate selectors match it.
pub fn cert_principal(cert: CertIdentity) -> Principal {
    Principal {
        // `nobody`: a certificate peer is no local user, and no uid selector should match it.
        uid: u32::MAX - 1,
        gid: u32::MAX - 1,
        pid: None,
        groups: Vec::new(),
        user: None,
        group_names: Vec::new(),
        exe: None,
        exe_deleted: false,
        exe_sha256: None,
        parents: Vec::new(),
        cgroup: None,
        unit: None,
        cert: Some(cert),
        transport: Transport::Gateway,
    }
}

/// Single-process mode: the gateway's calls run in this process's pipeline.
pub struct InProcess {
    state: Arc<State>,
}

impl InProcess {
    pub fn new(state: Arc<State>) -> InProcess {
        InProcess { state }
    }
}

impl Core for InProcess {
    fn call(&self, cert: CertIdentity, req: Request, frames: Option<FrameSender>) -> CallFuture {
        let state = self.state.clone();
        Box::pin(async move {
            let rt = state.runtime();
            let peer = Arc::new(Peer::new(cert_principal(cert), &rt));
            drop(rt);
            let sink = match (frames, &req.id) {
                // The gateway's consumers read binary job output frames (gRPC attach asks
                // for them); nothing else is sent binary unless asked.
                (Some(f), Some(id)) => Some(StreamSink {
                    tx: f.tx,
                    id: id.clone(),
                    binary: true,
                    files: false,
                    window: Some(f.window),
                }),
                _ => None,
            };
            pipeline::process(&state, &peer, TRANSPORT, req, sink).await
        })
    }
}

/// Reads an encoded warden-dialect reply back into its parts: `Ok(data)` or `Err((code, message))`.
pub fn decode_reply(bytes: &[u8]) -> Result<Value, (String, String)> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ("INTERNAL_ERROR".to_string(), format!("core's reply: {e}")))?;
    if v.get("status").and_then(Value::as_str) == Some("ok") {
        return Ok(v.get("data").cloned().unwrap_or(Value::Null));
    }
    let e = v.get("error");
    let field = |k: &str| {
        e.and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Err((field("code"), field("message")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sink(f: &FrameSender) -> StreamSink {
        StreamSink {
            tx: f.tx.clone(),
            id: Value::from(1),
            binary: true,
            files: false,
            window: Some(f.window.clone()),
        }
    }

    #[tokio::test]
    async fn a_producer_stops_at_the_window_until_the_consumer_takes_frames() {
        let (tx, mut rx) = frames();
        let sink = sink(&tx);
        for i in 0..STREAM_WINDOW {
            assert!(sink.send_frame(vec![i as u8].into()).await);
        }
        // The window is used up: the next frame waits for the consumer.
        let next = sink.send_frame(b"next".to_vec().into());
        tokio::pin!(next);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut next)
                .await
                .is_err(),
            "a frame beyond the window was accepted"
        );
        assert_eq!(rx.recv().await.unwrap().into_bytes().unwrap()[..], [0]);
        assert!(next.await);
        // Everything arrives, in order.
        for i in 1..STREAM_WINDOW {
            assert_eq!(
                rx.recv().await.unwrap().into_bytes().unwrap()[..],
                [i as u8]
            );
        }
        assert_eq!(&rx.recv().await.unwrap().into_bytes().unwrap()[..], b"next");
    }

    #[tokio::test]
    async fn a_producer_waiting_for_room_gives_up_when_the_consumer_is_gone() {
        let (tx, rx) = frames();
        let sink = sink(&tx);
        for _ in 0..STREAM_WINDOW {
            assert!(sink.send_frame(b"x".to_vec().into()).await);
        }
        let next = tokio::spawn(async move { sink.send_frame(b"y".to_vec().into()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        let sent = tokio::time::timeout(Duration::from_secs(10), next)
            .await
            .expect("the producer still waits for a consumer that is gone")
            .unwrap();
        assert!(!sent);
    }

    #[test]
    fn returned_credit_never_widens_the_window() {
        let (tx, _rx) = frames();
        give_back(&tx.window, 1000);
        assert_eq!(tx.window.available_permits(), STREAM_WINDOW);
        let p = tx.window.try_acquire_many(3).unwrap();
        p.forget();
        give_back(&tx.window, 10);
        assert_eq!(tx.window.available_permits(), STREAM_WINDOW);
    }
}
