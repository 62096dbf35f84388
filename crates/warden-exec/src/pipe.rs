//! The read end of a job's stdout or stderr pipe, as an async reader or a raw fd.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, ReadBuf};

use crate::sys;

/// A non-blocking pipe read end registered with the tokio reactor.
#[derive(Debug)]
pub struct PipeReader {
    fd: AsyncFd<File>,
}

impl PipeReader {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        sys::set_nonblocking(&fd)?;
        Ok(PipeReader {
            fd: sys::async_file(File::from(fd))?,
        })
    }

    /// The raw pipe (still `O_NONBLOCK`), for callers with their own event loop.
    pub fn into_owned_fd(self) -> OwnedFd {
        OwnedFd::from(self.fd.into_inner())
    }
}

impl AsyncRead for PipeReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // Reads into the buffer's uninitialized room: bulk output arrives in reads of up
            // to a pipe's worth, and zeroing the room before each one would cost about as
            // much as the read.
            let read = |f: &AsyncFd<File>| sys::read_into(f.get_ref().as_fd(), buf);
            match guard.try_io(read) {
                Ok(Ok(())) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}
