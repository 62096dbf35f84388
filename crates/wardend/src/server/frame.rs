//! Streamed frames as handlers produce them, and the vectored writes that send them.
//!
//! A job's output frame is a small header followed by slices of the job's output log. Keeping
//! those slices as they are, instead of concatenating them into one buffer, lets the frame
//! reach the socket (or the channel to the gateway) with no copy in the daemon: the kernel
//! copies the bytes once, from the log into the socket.

use std::io::IoSlice;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use warden_exec::FileRange;
use warden_wire::framing::{encode_frame_parts, Framing};

/// One part of a frame: bytes in memory, or a range of a job's spill file (output a reader
/// gets after the log has moved it out of memory), which the Unix socket's writer sends with
/// `sendfile` and every other writer reads first.
#[derive(Debug, Clone)]
pub enum Part {
    Mem(Bytes),
    File(FileRange),
}

impl Part {
    pub fn len(&self) -> usize {
        match self {
            Part::Mem(b) => b.len(),
            Part::File(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One streamed frame: its bytes in one or more parts, which go out back to back.
#[derive(Debug, Clone)]
pub struct Frame(Parts);

#[derive(Debug, Clone)]
enum Parts {
    One([Part; 1]),
    Many(Vec<Part>),
}

impl Frame {
    /// A frame made of `parts`, in order.
    pub fn from_parts(parts: Vec<Bytes>) -> Self {
        Self::from_pieces(parts.into_iter().map(Part::Mem).collect())
    }

    /// A frame made of `parts`, in memory or not, in order.
    pub fn from_pieces(mut parts: Vec<Part>) -> Self {
        if parts.len() == 1 {
            return Frame(Parts::One([parts.pop().unwrap_or(Part::Mem(Bytes::new()))]));
        }
        Frame(Parts::Many(parts))
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[Part] {
        match &self.0 {
            Parts::One(p) => p,
            Parts::Many(v) => v,
        }
    }

    /// Whether any part is a file range (which only a writer with `sendfile` sends as it is).
    pub fn has_file_parts(&self) -> bool {
        self.parts().iter().any(|p| matches!(p, Part::File(_)))
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.parts().iter().map(Part::len).sum()
    }

    /// Whether the frame has no bytes.
    pub fn is_empty(&self) -> bool {
        self.parts().iter().all(Part::is_empty)
    }

    /// The frame as one buffer: free for a frame of one part in memory, a copy otherwise
    /// (file ranges are read).
    pub fn into_bytes(self) -> std::io::Result<Bytes> {
        if let Parts::One([Part::Mem(b)]) = self.0 {
            return Ok(b);
        }
        let mut out = BytesMut::new();
        self.encode_raw(&mut out)?;
        Ok(out.freeze())
    }

    /// Appends the frame's bytes to `out` as they are, with no framing (file ranges read).
    pub fn encode_raw(&self, out: &mut BytesMut) -> std::io::Result<()> {
        out.reserve(self.len());
        for p in self.parts() {
            match p {
                Part::Mem(b) => out.extend_from_slice(b),
                Part::File(r) => out.extend_from_slice(&r.read()?),
            }
        }
        Ok(())
    }

    /// Appends the frame to `out` in `framing`, its parts copied once (for small frames, which
    /// go out together with other replies in one write). The common frame, one part in
    /// memory, is encoded as it is; for others the parts are listed first (file ranges read).
    pub fn encode(&self, framing: Framing, out: &mut BytesMut) -> std::io::Result<()> {
        match &self.0 {
            Parts::One([Part::Mem(b)]) => encode_frame_parts(framing, std::slice::from_ref(b), out),
            _ => {
                let parts = self
                    .parts()
                    .iter()
                    .map(|p| match p {
                        Part::Mem(b) => Ok(b.clone()),
                        Part::File(r) => r.read(),
                    })
                    .collect::<std::io::Result<Vec<Bytes>>>()?;
                encode_frame_parts(framing, &parts, out);
            }
        }
        Ok(())
    }
}

impl From<Bytes> for Frame {
    fn from(b: Bytes) -> Self {
        Frame(Parts::One([Part::Mem(b)]))
    }
}

impl From<Vec<u8>> for Frame {
    fn from(v: Vec<u8>) -> Self {
        Frame::from(Bytes::from(v))
    }
}

/// Writes `head`, the frame's parts and `tail` back to back (a framing or channel header in
/// front, a newline behind), with as few vectored writes as the kernel allows and nothing
/// copied first. File parts are read, then written: a writer that can send a file range
/// itself uses [`write_framed_with`].
pub async fn write_framed<W: AsyncWrite + Unpin + Send>(
    w: &mut W,
    head: &[u8],
    frame: &Frame,
    tail: &[u8],
) -> std::io::Result<()> {
    write_framed_with(w, head, frame, tail, |w, range| {
        Box::pin(async move { w.write_all(&range.read()?).await })
    })
    .await
}

/// The future a file-range sender returns.
pub type SendFileFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send + 'a>>;

/// [`write_framed`], with file parts sent by `send_file` (for the Unix socket: `sendfile`,
/// from the page cache to the socket with no copy through the daemon).
pub async fn write_framed_with<W, F>(
    w: &mut W,
    head: &[u8],
    frame: &Frame,
    tail: &[u8],
    mut send_file: F,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + Send,
    F: for<'a> FnMut(&'a mut W, &'a FileRange) -> SendFileFuture<'a>,
{
    // Runs of memory parts go out in vectored writes, file parts one by one between them.
    let mut run: Vec<&[u8]> = Vec::with_capacity(frame.parts().len() + 2);
    run.push(head);
    for part in frame.parts() {
        match part {
            Part::Mem(b) => run.push(b),
            Part::File(range) => {
                write_slices(w, &run).await?;
                run.clear();
                send_file(w, range).await?;
            }
        }
    }
    run.push(tail);
    write_slices(w, &run).await
}

/// Writes `parts` back to back with vectored writes.
async fn write_slices<W: AsyncWrite + Unpin>(w: &mut W, parts: &[&[u8]]) -> std::io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0;
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
    while done < total {
        // The parts not yet written, the first one cut where the last write ended.
        slices.clear();
        let mut skip = done;
        for p in parts {
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

/// Output of a log spilled to a file in `dir`, and its pieces from offset 0 (for tests here
/// and in the connection's writer).
#[cfg(test)]
pub(crate) async fn spilled_pieces(dir: &tempfile::TempDir) -> (Vec<u8>, Vec<Part>) {
    use warden_exec::{LogConfig, LogPiece, OutputLog, Stream};
    let log = OutputLog::new(LogConfig {
        memory_limit: 4096,
        spill_dir: Some(dir.path().to_path_buf()),
        spill_limit: 1 << 20,
        segment_size: 16 << 10,
    });
    let data: Vec<u8> = (0..60_000u32).map(|i| (i * 13 % 256) as u8).collect();
    for c in data.chunks(2500) {
        log.append(Stream::Stdout, c);
    }
    log.close();
    let mut r = log.reader();
    let mut parts = Vec::new();
    while let Some(p) = r.next_piece().await {
        match p {
            LogPiece::Mem { bytes, .. } => parts.push(Part::Mem(bytes)),
            LogPiece::File { range, .. } => parts.push(Part::File(range)),
            LogPiece::Dropped { from, to } => panic!("dropped {from}..{to}"),
        }
    }
    assert!(parts.iter().any(|p| matches!(p, Part::File(_))));
    (data, parts)
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

    #[tokio::test]
    async fn file_parts_are_read_where_no_sendfile_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let (data, parts) = spilled_pieces(&dir).await;
        let frame = Frame::from_pieces(parts);
        assert!(frame.has_file_parts());
        assert_eq!(frame.len(), data.len());
        for step in [1, 999, 1 << 20] {
            let mut w = Trickle {
                out: Vec::new(),
                step,
            };
            write_framed(&mut w, b"<", &frame, b">").await.unwrap();
            assert_eq!(w.out.len(), data.len() + 2);
            assert_eq!(&w.out[1..=data.len()], &data[..], "step {step}");
        }
        assert_eq!(&frame.clone().into_bytes().unwrap()[..], &data[..]);
        let mut raw = BytesMut::new();
        frame.encode_raw(&mut raw).unwrap();
        assert_eq!(&raw[..], &data[..]);
    }

    #[tokio::test]
    async fn file_parts_go_to_the_sender_given_in_order_between_memory_parts() {
        let dir = tempfile::tempdir().unwrap();
        let (data, parts) = spilled_pieces(&dir).await;
        let files = parts.iter().filter(|p| matches!(p, Part::File(_))).count();
        let frame = Frame::from_pieces(parts);
        let mut w = Trickle {
            out: Vec::new(),
            step: 4096,
        };
        let mut sent = 0;
        write_framed_with(&mut w, b"<", &frame, b">", |w, range| {
            sent += 1;
            Box::pin(async move {
                w.out.extend_from_slice(&range.read()?);
                Ok(())
            })
        })
        .await
        .unwrap();
        assert_eq!(sent, files);
        assert_eq!(&w.out[1..=data.len()], &data[..]);
        assert_eq!((w.out[0], w.out[data.len() + 1]), (b'<', b'>'));
    }

    #[test]
    fn a_frame_of_parts_is_their_concatenation() {
        let f = Frame::from_parts(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
        assert_eq!(f.len(), 4);
        assert_eq!(f.parts().len(), 2);
        assert_eq!(&f.into_bytes().unwrap()[..], b"abcd");
        let one = Frame::from_parts(vec![Bytes::from_static(b"x")]);
        assert_eq!(one.parts().len(), 1);
        assert!(Frame::from_parts(vec![]).is_empty());
        assert!(Frame::from(Vec::new()).is_empty());
    }
}
