//! One client connection: read frames, run each request through the pipeline, write replies.
//!
//! A connection is one task. It keeps reading while earlier requests are in flight (up to
//! `limits.max_in_flight`), so a client that pipelines requests gets them audited in one batch
//! instead of one disk flush each. Replies to requests without an `id` go out in request order,
//! as the Lumo and securityd clients expect; replies to requests with an `id` (warden's own
//! dialect) go out as soon as they are ready.
//!
//! Whatever a client sends — oversized, truncated, not UTF-8, not JSON, nested without end —
//! costs that client its connection after an error reply where the framing allows one. It never
//! costs another client anything: no lock is held across I/O, the buffer is bounded by the
//! maximum message size, and the decoder refuses deep nesting without recursing.

use super::frame::{write_framed_with, Frame};
use super::pipeline;
use super::state::{Peer, State};
use bytes::BytesMut;
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use nix::sys::sendfile::sendfile64;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, timeout, Instant};
use warden_exec::FileRange;
use warden_wire::envelope::{decode_request, Dialect};
use warden_wire::framing::{encode_frame, FrameDecoder, FrameError, Framing};
use warden_wire::reply::{ErrorBody, ErrorCode};

type ReplyFuture = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

const TRANSPORT: &str = "unix";

/// The dialect an error reply uses when the request could not even be parsed: Lumo clients
/// use length prefixes, securityd clients use lines.
fn fallback_dialect(framing: Framing) -> Dialect {
    match framing {
        Framing::LengthPrefixed => Dialect::Lumo,
        Framing::Lines => Dialect::Securityd,
    }
}

pub async fn serve(
    state: Arc<State>,
    peer: Arc<Peer>,
    mut stream: UnixStream,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = state.runtime().config.limits.clone();
    let idle_timeout = limits.idle_timeout.get();
    let read_timeout = limits.read_timeout.get();
    let write_timeout = limits.write_timeout.get();
    let max_in_flight = limits.max_in_flight;

    let mut decoder = FrameDecoder::new(limits.max_message_size.0 as usize);
    let mut inbuf = BytesMut::with_capacity(4096);
    let mut outbuf = BytesMut::with_capacity(4096);
    let mut ordered: FuturesOrdered<ReplyFuture> = FuturesOrdered::new();
    let mut unordered: FuturesUnordered<ReplyFuture> = FuturesUnordered::new();
    // Frames of streamed replies, written between the other replies.
    let (stream_tx, mut stream_rx) = mpsc::unbounded_channel::<Frame>();
    let mut last_activity = Instant::now();
    // Set when the connection must end after the replies in flight: EOF, a bad frame, shutdown.
    let mut closing: Option<Option<Vec<u8>>> = None;
    // Set at shutdown: the requests the client already sent are still answered (the in-flight
    // window still applies), then the connection closes once nothing more is waiting to be read.
    let mut draining = false;
    // The idle or read deadline. One timer for the connection's life, moved rather than made
    // anew for every request: moving a deadline later costs no work in the timer wheel.
    let timer = sleep_until(last_activity + idle_timeout);
    tokio::pin!(timer);

    loop {
        // Frames already buffered (pipelined behind requests that filled the in-flight
        // window) are taken as soon as the window has room again, without waiting for a read.
        if closing.is_none() && !inbuf.is_empty() && ordered.len() + unordered.len() < max_in_flight
        {
            if let Some(tail) = take_requests(
                &state,
                &peer,
                &stream_tx,
                &mut decoder,
                &mut inbuf,
                &mut ordered,
                &mut unordered,
                max_in_flight,
            )
            .await
            {
                closing = Some(Some(tail));
            }
        }
        if inbuf.capacity() - inbuf.len() < 1024 {
            inbuf.reserve(8192);
        }
        let in_flight = ordered.len() + unordered.len();
        if draining && closing.is_none() && in_flight == 0 {
            // Every complete request buffered has been answered; take what the client sent
            // meanwhile without waiting for more, and stop when there is nothing.
            match stream.try_read_buf(&mut inbuf) {
                Ok(n) if n > 0 => continue,
                _ => closing = Some(None),
            }
        }
        if closing.is_some() && in_flight == 0 {
            break;
        }
        let deadline = if in_flight > 0 {
            None
        } else if !inbuf.is_empty() {
            Some(last_activity + read_timeout)
        } else {
            Some(last_activity + idle_timeout)
        };
        let can_read = closing.is_none() && in_flight < max_in_flight;
        if let Some(d) = deadline {
            if timer.deadline() != d {
                timer.as_mut().reset(d);
            }
        }

        tokio::select! {
            biased;
            Some(reply) = ordered.next(), if !ordered.is_empty() => {
                let framing = decoder.framing().unwrap_or(Framing::Lines);
                encode_frame(framing, &reply, &mut outbuf);
                // Take every other reply that is already done, then write them in one call.
                while let Some(Some(more)) = ordered.next().now_or_never() {
                    encode_frame(framing, &more, &mut outbuf);
                }
                if !flush(&mut stream, &mut outbuf, write_timeout).await { return; }
            }
            Some(frame) = stream_rx.recv() => {
                let framing = decoder.framing().unwrap_or(Framing::Lines);
                let mut next = Some(frame);
                while let Some(frame) = next.take() {
                    if !send_streamed(&mut stream, &mut outbuf, framing, &frame, write_timeout).await {
                        return;
                    }
                    next = stream_rx.try_recv().ok();
                }
                if !flush(&mut stream, &mut outbuf, write_timeout).await { return; }
            }
            Some(reply) = unordered.next(), if !unordered.is_empty() => {
                let framing = decoder.framing().unwrap_or(Framing::Lines);
                // A stream's last frames were queued before its final reply was ready.
                while let Ok(frame) = stream_rx.try_recv() {
                    if !send_streamed(&mut stream, &mut outbuf, framing, &frame, write_timeout).await {
                        return;
                    }
                }
                encode_frame(framing, &reply, &mut outbuf);
                if !flush(&mut stream, &mut outbuf, write_timeout).await { return; }
            }
            r = stream.read_buf(&mut inbuf), if can_read => {
                match r {
                    Ok(0) | Err(_) => {
                        // EOF (or reset). A partial frame left over is a truncated message.
                        let tail = match decoder.finish(&inbuf) {
                            Err(e) => Some(frame_error_reply(&state, &peer, &decoder, e).await),
                            Ok(()) => None,
                        };
                        closing = Some(tail);
                    }
                    Ok(_) => last_activity = Instant::now(),
                }
            }
            _ = shutdown.changed(), if closing.is_none() && !draining => {
                draining = true;
            }
            _ = &mut timer, if deadline.is_some() => {
                if inbuf.is_empty() {
                    tracing::debug!(peer = %peer.key, "closing idle connection");
                    closing = Some(None);
                } else {
                    let body = pipeline::err(ErrorCode::ValidationError, format!("message not completed within {} s", read_timeout.as_secs()));
                    closing = Some(Some(error_frame(&state, &peer, &decoder, body).await));
                }
            }
        }
    }
    if let Some(Some(tail)) = closing {
        let framing = decoder.framing().unwrap_or(Framing::Lines);
        encode_frame(framing, &tail, &mut outbuf);
        let _ = flush(&mut stream, &mut outbuf, write_timeout).await;
    }
    let _ = stream.shutdown().await;
}

/// Frames of at least this size (job output) are written straight from their own buffer.
const DIRECT_FRAME: usize = 16 << 10;

/// Sends one streamed frame: a small one in memory joins `outbuf`, to go out with whatever
/// else is ready; a large one, or one with parts in a spill file, goes out by itself after
/// what `outbuf` holds. `false`: the connection is done for.
async fn send_streamed(
    stream: &mut UnixStream,
    outbuf: &mut BytesMut,
    framing: Framing,
    frame: &Frame,
    write_timeout: Duration,
) -> bool {
    if frame.len() < DIRECT_FRAME && !frame.has_file_parts() {
        return frame.encode(framing, outbuf).is_ok();
    }
    flush(stream, outbuf, write_timeout).await
        && write_direct(stream, framing, frame, write_timeout).await
}

/// Writes one frame with its framing around it, without copying the payload: the length
/// prefix (or the newline) and the frame's parts in memory go out in vectored writes, parts
/// in a spill file with `sendfile`.
async fn write_direct(
    stream: &mut UnixStream,
    framing: Framing,
    frame: &Frame,
    write_timeout: Duration,
) -> bool {
    let prefix = u32::try_from(frame.len()).unwrap_or(u32::MAX).to_be_bytes();
    let (head, tail): (&[u8], &[u8]) = match framing {
        Framing::LengthPrefixed => (&prefix, &[]),
        Framing::Lines => (&[], b"\n"),
    };
    let write = write_framed_with(stream, head, frame, tail, |s, range| {
        Box::pin(send_file(s, range))
    });
    matches!(timeout(write_timeout, write).await, Ok(Ok(())))
}

/// Sends a range of a spill file to the socket with `sendfile`: the kernel moves the bytes
/// from the page cache to the socket, and they never pass through the daemon's memory.
async fn send_file(stream: &mut UnixStream, range: &FileRange) -> std::io::Result<()> {
    let end = range.pos() + range.len() as u64;
    let mut pos = i64::try_from(range.pos()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    while (pos as u64) < end {
        let left = usize::try_from(end - pos as u64).unwrap_or(usize::MAX);
        let sock: &UnixStream = stream;
        let sent = sock
            .async_io(Interest::WRITABLE, || {
                sendfile64(sock, range.file(), Some(&mut pos), left).map_err(std::io::Error::from)
            })
            .await?;
        if sent == 0 {
            // The file is shorter than the log wrote: never the case for a spill file.
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

async fn flush(stream: &mut UnixStream, out: &mut BytesMut, write_timeout: Duration) -> bool {
    // Replies are small and the socket buffer almost always has room: one non-blocking write
    // sends them without setting up a timeout. What it leaves waits, bounded by the timeout.
    if out.is_empty() {
        return true;
    }
    let sent = match stream.try_write(out) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(_) => {
            out.clear();
            return false;
        }
    };
    let ok = sent == out.len()
        || matches!(
            timeout(write_timeout, stream.write_all(&out[sent..])).await,
            Ok(Ok(()))
        );
    out.clear();
    ok
}

/// Decodes every complete frame in `inbuf` into a request in flight. Returns the error reply to
/// send before closing when a frame is bad.
#[allow(clippy::too_many_arguments)]
async fn take_requests(
    state: &Arc<State>,
    peer: &Arc<Peer>,
    stream_tx: &mpsc::UnboundedSender<Frame>,
    decoder: &mut FrameDecoder,
    inbuf: &mut BytesMut,
    ordered: &mut FuturesOrdered<ReplyFuture>,
    unordered: &mut FuturesUnordered<ReplyFuture>,
    max_in_flight: usize,
) -> Option<Vec<u8>> {
    while ordered.len() + unordered.len() < max_in_flight {
        let frame = match decoder.decode(inbuf) {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(e) => return Some(frame_error_reply(state, peer, decoder, e).await),
        };
        match decode_request(&frame) {
            Ok(req) => {
                let binary = decoder.framing() == Some(Framing::LengthPrefixed);
                let sink = req.id.clone().map(|id| pipeline::StreamSink {
                    tx: stream_tx.clone(),
                    id,
                    binary,
                    files: binary,
                    window: None,
                });
                let has_id = sink.is_some();
                let (s, p) = (state.clone(), peer.clone());
                let fut: ReplyFuture =
                    Box::pin(async move { pipeline::process(&s, &p, TRANSPORT, req, sink).await });
                if has_id {
                    unordered.push(fut);
                } else {
                    ordered.push_back(fut);
                }
            }
            Err(failure) => {
                let fallback = fallback_dialect(decoder.framing().unwrap_or(Framing::Lines));
                return Some(
                    pipeline::reject_undecodable(state, peer, TRANSPORT, &failure, fallback).await,
                );
            }
        }
    }
    None
}

async fn frame_error_reply(
    state: &Arc<State>,
    peer: &Arc<Peer>,
    decoder: &FrameDecoder,
    e: FrameError,
) -> Vec<u8> {
    let body = pipeline::err(ErrorCode::ValidationError, e.to_string());
    error_frame(state, peer, decoder, body).await
}

async fn error_frame(
    state: &Arc<State>,
    peer: &Arc<Peer>,
    decoder: &FrameDecoder,
    body: ErrorBody,
) -> Vec<u8> {
    let dialect = fallback_dialect(decoder.framing().unwrap_or(Framing::Lines));
    let request_id = state.next_request_id();
    pipeline::audit_rejection(
        state,
        peer,
        TRANSPORT,
        &request_id,
        "<bad-frame>",
        &body,
        dialect,
    )
    .await;
    state
        .metrics
        .requests_failed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    pipeline::encode(dialect, None, &request_id, Err(&body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::frame::{spilled_pieces, Part};

    #[tokio::test]
    async fn a_frame_with_spill_file_parts_arrives_whole_through_a_socket_that_fills() {
        let dir = tempfile::tempdir().unwrap();
        let (data, parts) = spilled_pieces(&dir).await;
        // The frame ten times over: more than the socket buffers hold, so `sendfile` meets a
        // full socket and must wait for the reader.
        let parts: Vec<Part> = parts
            .iter()
            .cycle()
            .take(parts.len() * 10)
            .cloned()
            .collect();
        let want: Vec<u8> = data.iter().cycle().take(data.len() * 10).copied().collect();
        let frame = Frame::from_pieces(parts);
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1000];
            loop {
                // A slow reader: small reads, a pause between them.
                match b.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
        });
        let mut out = BytesMut::new();
        let ok = send_streamed(
            &mut a,
            &mut out,
            Framing::LengthPrefixed,
            &frame,
            Duration::from_secs(30),
        )
        .await;
        assert!(ok);
        drop(a);
        let got = reader.await.unwrap();
        assert_eq!(&got[..4], &(want.len() as u32).to_be_bytes());
        assert!(got[4..] == want[..], "the bytes differ");
    }

    #[tokio::test]
    async fn a_small_frame_in_memory_joins_the_buffer() {
        let (mut a, _b) = UnixStream::pair().unwrap();
        let mut out = BytesMut::new();
        let frame = Frame::from(b"hi".to_vec());
        let ok = send_streamed(
            &mut a,
            &mut out,
            Framing::Lines,
            &frame,
            Duration::from_secs(1),
        )
        .await;
        assert!(ok);
        assert_eq!(&out[..], b"hi\n");
    }
}
