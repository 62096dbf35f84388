//! The event-loop driver of `load`: every connection on one thread, closed-loop as in the
//! thread-per-connection driver (`pipeline` requests outstanding per connection, the next one
//! written as soon as a reply is read), but with one `epoll` wait serving all of them.
//!
//! On a small machine the load generator competes with the daemon for the same cores. A
//! blocking thread per connection sleeps and wakes once per reply, and the peer pays for
//! every such wake-up. One loop that sleeps only when no connection has a reply to read
//! leaves more of the machine to the server being measured. Sockets are registered for
//! readability only: writes are small and go out at once, and a socket registered for
//! writability would wake the loop each time the server drains a request.

use crate::{is_success, ConnResult, LoadSpec, RequestMaker, Workload};
use anyhow::{bail, Context};
use mio::net::UnixStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Conn {
    stream: UnixStream,
    maker: RequestMaker,
    next: u64,
    out: Vec<u8>,
    one: Vec<u8>,
    input: Vec<u8>,
    /// What one read takes from the socket, before whole replies are cut from `input`.
    scratch: Box<[u8]>,
    sent_at: VecDeque<Instant>,
    result: ConnResult,
}

impl Conn {
    /// Writes requests until `pipeline` are outstanding (none once `stop` is set), in one write.
    fn refill(&mut self, pipeline: usize, stop: bool) -> anyhow::Result<()> {
        if stop {
            return Ok(());
        }
        self.out.clear();
        let mut stamps = 0;
        while self.sent_at.len() + stamps < pipeline {
            self.maker.make(self.next, &mut self.one);
            self.next += 1;
            self.out.extend_from_slice(&self.one);
            stamps += 1;
        }
        if stamps == 0 {
            return Ok(());
        }
        write_all_now(&mut self.stream, &self.out)?;
        let now = Instant::now();
        self.sent_at.extend(std::iter::repeat_n(now, stamps));
        Ok(())
    }

    /// Reads what the socket holds and accounts for every whole reply in it.
    fn drain(&mut self, workload: Workload, done: &AtomicU64) -> anyhow::Result<()> {
        let buf = &mut self.scratch[..];
        loop {
            match self.stream.read(buf) {
                Ok(0) => bail!("the server closed the connection"),
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    // A short read emptied the socket: the next edge will say when more comes.
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut at = 0;
        while self.input.len() - at >= 4 {
            let len = u32::from_be_bytes(self.input[at..at + 4].try_into().expect("4 bytes"));
            let end = at + 4 + len as usize;
            if self.input.len() < end {
                break;
            }
            let t0 = self.sent_at.pop_front().context("a reply to no request")?;
            let reply = &self.input[at + 4..end];
            self.result
                .latencies_us
                .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
            if workload != Workload::Echo && !is_success(reply) {
                self.result.errors += 1;
                if self.result.errors == 1 {
                    eprintln!("error reply: {}", String::from_utf8_lossy(reply));
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
            at = end;
        }
        self.input.drain(..at);
        Ok(())
    }
}

/// A blocking write on a non-blocking socket: requests are a few hundred bytes, so this
/// waits only if the server has stopped reading altogether.
fn write_all_now(s: &mut UnixStream, mut buf: &[u8]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("the server has not read a request for 10 s");
                }
                std::thread::yield_now();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Runs every connection of `spec` on the calling thread until `stop` is set and every
/// outstanding reply has been read.
pub(crate) fn run(
    spec: &LoadSpec,
    token: &str,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> anyhow::Result<Vec<ConnResult>> {
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(spec.connections);
    for conn in 0..spec.connections {
        let std = std::os::unix::net::UnixStream::connect(&spec.socket)
            .with_context(|| format!("connecting to {}", spec.socket.display()))?;
        std.set_nonblocking(true)?;
        let mut stream = UnixStream::from_std(std);
        poll.registry()
            .register(&mut stream, Token(conn), Interest::READABLE)?;
        conns.push(Conn {
            stream,
            maker: RequestMaker {
                workload: spec.workload,
                key: spec.key.clone(),
                token: token.to_string(),
                conn,
                secret: spec.secret.clone(),
            },
            next: 0,
            out: Vec::with_capacity(256 * spec.pipeline),
            one: Vec::with_capacity(256),
            input: Vec::with_capacity(8192),
            scratch: vec![0; 4096].into_boxed_slice(),
            sent_at: VecDeque::with_capacity(spec.pipeline),
            result: ConnResult {
                latencies_us: Vec::with_capacity(1 << 20),
                errors: 0,
            },
        });
    }
    for c in &mut conns {
        c.refill(spec.pipeline, false)?;
    }
    let mut events = Events::with_capacity(spec.connections.max(16));
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && conns.iter().all(|c| c.sent_at.is_empty()) {
            break;
        }
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            c.drain(spec.workload, done)?;
            c.refill(spec.pipeline, stopping)?;
        }
    }
    Ok(conns.into_iter().map(|c| c.result).collect())
}

/// The raw echo baseline on one thread around one `epoll` wait: every whole length-prefixed
/// frame read is written back as it is, in one write per read.
pub(crate) fn echo_server(listener: std::os::unix::net::UnixListener) -> anyhow::Result<()> {
    const LISTENER: Token = Token(usize::MAX);
    listener.set_nonblocking(true)?;
    let mut listener = mio::net::UnixListener::from_std(listener);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Vec<Option<(UnixStream, Vec<u8>)>> = Vec::new();
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let slot =
                                conns.iter().position(Option::is_none).unwrap_or_else(|| {
                                    conns.push(None);
                                    conns.len() - 1
                                });
                            poll.registry()
                                .register(&mut s, Token(slot), Interest::READABLE)?;
                            conns[slot] = Some((s, Vec::new()));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            let slot = ev.token().0;
            let Some((s, pending)) = conns[slot].as_mut() else {
                continue;
            };
            if echo_some(s, pending, &mut buf).is_err() {
                if let Some((mut s, _)) = conns[slot].take() {
                    let _ = poll.registry().deregister(&mut s);
                }
            }
        }
    }
}

/// Reads what `s` holds and writes back every whole frame in it; a partial frame waits in
/// `pending`.
fn echo_some(s: &mut UnixStream, pending: &mut Vec<u8>, buf: &mut [u8]) -> anyhow::Result<()> {
    loop {
        let n = match s.read(buf) {
            Ok(0) => bail!("closed"),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        pending.extend_from_slice(&buf[..n]);
        let mut whole = 0;
        while pending.len() - whole >= 4 {
            let len = u32::from_be_bytes(pending[whole..whole + 4].try_into().expect("4 bytes"));
            if pending.len() - whole - 4 < len as usize {
                break;
            }
            whole += 4 + len as usize;
        }
        write_all_now(s, &pending[..whole])?;
        pending.drain(..whole);
        if n < buf.len() {
            return Ok(());
        }
    }
}
