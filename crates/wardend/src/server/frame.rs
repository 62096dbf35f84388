//! Streamed frames as handlers produce them, and the vectored writes that send them.
//!
//! A job's output frame is a small header followed by slices of the job's output log. Keeping
//! those slices as they are, instead of concatenating them into one buffer, lets the frame
//! reach the socket (or the channel to the gateway) with no copy in the daemon: the kernel
//! copies the bytes once, from the log into the socket.

use std::io::IoSlice;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use warden_wire::framing::{encode_frame_parts, Framing};

/// One streamed frame: its bytes in one or more parts, which go out back to back.
#[derive(Debug, Clone)]
pub struct Frame(Parts);

#[derive(Debug, Clone)]
enum Parts {
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Frame {
    /// A frame made of `parts`, in order.
    pub fn from_parts(mut parts: Vec<Bytes>) -> Self {
        if parts.len() == 1 {
            return Frame(Parts::One(parts.pop().unwrap_or_default()));
        }
        Frame(Parts::Many(parts))
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[Bytes] {
        match &self.0 {
            Parts::One(b) => std::slice::from_ref(b),
            Parts::Many(v) => v,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.parts().iter().map(Bytes::len).sum()
    }

    /// Whether the frame has no bytes.
    pub fn is_empty(&self) -> bool {
        self.parts().iter().all(Bytes::is_empty)
    }

    /// The frame as one buffer: free for a frame of one part, a copy otherwise.
    pub fn into_bytes(self) -> Bytes {
        match self.0 {
            Parts::One(b) => b,
            Parts::Many(v) => {
                let mut out = BytesMut::with_capacity(v.iter().map(Bytes::len).sum());
                for p in &v {
                    out.extend_from_slice(p);
                }
                out.freeze()
            }
        }
    }

    /// Appends the frame to `out` in `framing`, its parts copied once (for small frames, which
    /// go out together with other replies in one write).
    pub fn encode(&self, framing: Framing, out: &mut BytesMut) {
        encode_frame_parts(framing, self.parts(), out)
    }
}

impl From<Bytes> for Frame {
    fn from(b: Bytes) -> Self {
        Frame(Parts::One(b))
    }
}

impl From<Vec<u8>> for Frame {
    fn from(v: Vec<u8>) -> Self {
        Frame(Parts::One(v.into()))
    }
}

/// Writes `head`, the frame's parts and `tail` back to back (a framing or channel header in
/// front, a newline behind), with as few vectored writes as the kernel allows and nothing
/// copied first.
pub async fn write_framed<W: AsyncWrite + Unpin>(
    w: &mut W,
    head: &[u8],
    frame: &Frame,
    tail: &[u8],
) -> std::io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(frame.parts().len() + 2);
    parts.push(head);
    parts.extend(frame.parts().iter().map(|p| &p[..]));
    parts.push(tail);
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0;
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
    while done < total {
        // The parts not yet written, the first one cut where the last write ended.
        slices.clear();
        let mut skip = done;
        for p in &parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        match w.write_vectored(&slices).await? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => done += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, to cut parts anywhere.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.step - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn parts_cut_anywhere_arrive_whole_and_in_order() {
        let frame = Frame::from_parts(vec![Bytes::new(), Bytes::from_static(b"0123456789")]);
        for step in 1..=19 {
            let mut w = Trickle {
                out: Vec::new(),
                step,
            };
            write_framed(&mut w, b"head", &frame, b"tail")
                .await
                .unwrap();
            assert_eq!(w.out, b"head0123456789tail", "step {step}");
        }
    }

    #[test]
    fn a_frame_of_parts_is_their_concatenation() {
        let f = Frame::from_parts(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
        assert_eq!(f.len(), 4);
        assert_eq!(f.parts().len(), 2);
        assert_eq!(&f.into_bytes()[..], b"abcd");
        let one = Frame::from_parts(vec![Bytes::from_static(b"x")]);
        assert_eq!(one.parts().len(), 1);
        assert!(Frame::from_parts(vec![]).is_empty());
        assert!(Frame::from(Vec::new()).is_empty());
    }
}
