//! The control socket between the monitor and one child, asynchronous: heartbeats and their
//! answers, and pairings (a [`Handoff`] with a channel end attached).
//!
//! One datagram (`SOCK_SEQPACKET`) per [`Control`] message, JSON. [`answer`] is the child's
//! side (answers every heartbeat, passes each pairing on); [`watch`] is the monitor's (sends a
//! heartbeat every interval and returns when the child hangs or closes its end).
//!
//! What it deliberately does not do: kill or restart anything; the caller acts on [`Watch`].

use super::supervise::{Heartbeats, Tick};
use super::Handoff;
use anyhow::{bail, Context};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// One message on a control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Monitor → child: answer with `pong` and the same `seq`.
    Ping { seq: u64 },
    /// Child → monitor.
    Pong { seq: u64 },
    /// Monitor → child: a new peer and, attached, the child's end of a fresh channel to it.
    Pair { handoff: Handoff },
    /// Child → monitor: set up and able to serve (core: secrets started, socket ready;
    /// gateway: TLS set up and privileges dropped). A child is paired only once ready.
    Ready,
    /// Monitor → core: the state of every component, for `daemon.status`.
    Components { components: Vec<ComponentStatus> },
}

/// One process of a supervised daemon as `warden daemon status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentStatus {
    /// `monitor`, `core` or `gateway`.
    pub role: String,
    /// `None` while it is being restarted.
    pub pid: Option<i32>,
    pub uptime_seconds: u64,
    /// Restarts since the monitor started.
    pub restarts: u64,
    /// The last heartbeat's round trip, in microseconds.
    pub heartbeat_rtt_us: Option<u64>,
}

/// Sends one message (and at most one descriptor) without blocking.
pub(crate) fn send_raw(
    sock: BorrowedFd<'_>,
    msg: &Control,
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let json = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let fds: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg: Vec<_> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&json)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    if sent != json.len() {
        return Err(std::io::Error::other("control message cut short"));
    }
    Ok(())
}

/// Receives one message and its descriptors; `Ok(None)` when the other end closed.
pub(crate) fn recv_raw(
    sock: BorrowedFd<'_>,
    flags: MsgFlags,
) -> std::io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_CONTROL_MESSAGE];
    let mut cmsg_space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_space),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us;
            // nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(std::io::Error::other(format!(
            "control message larger than {MAX_CONTROL_MESSAGE} bytes"
        )));
    }
    let len = msg.bytes;
    if len == 0 {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, fds)))
}

/// A control socket end driven by Tokio.
pub struct ControlSocket {
    fd: AsyncFd<OwnedFd>,
}

impl ControlSocket {
    /// Takes over `fd` (one end of [`super::control_pair`]) and makes it non-blocking.
    pub fn new(fd: OwnedFd) -> anyhow::Result<ControlSocket> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: the `OwnedFd` keeps the descriptor open, and always returns the same one,
        // for as long as the `AsyncFd` owns it.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(std::io::Error::from)
            .context("cannot watch the control socket")?;
        Ok(ControlSocket { fd })
    }

    pub async fn send(&self, msg: &Control, fd: Option<BorrowedFd<'_>>) -> anyhow::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, |s| send_raw(s.as_fd(), msg, fd))
            .await
            .context("cannot write to the control socket")
    }

    /// The next message; `None` when the other end closed.
    pub async fn recv(&self) -> anyhow::Result<Option<(Control, Option<OwnedFd>)>> {
        let got = self
            .fd
            .async_io(Interest::READABLE, |s| {
                recv_raw(s.as_fd(), MsgFlags::MSG_DONTWAIT)
            })
            .await
            .context("cannot read the control socket")?;
        let Some((bytes, fds)) = got else {
            return Ok(None);
        };
        let msg: Control =
            serde_json::from_slice(&bytes).context("unreadable message on the control socket")?;
        let mut fds = fds.into_iter();
        let fd = fds.next();
        if fds.next().is_some() {
            bail!("a control message with more than one descriptor");
        }
        match (&msg, &fd) {
            (Control::Pair { .. }, None) => bail!("a pairing without its channel"),
            (Control::Pair { .. }, Some(_)) => {}
            (_, Some(_)) => bail!("a descriptor attached to a message that takes none"),
            _ => {}
        }
        Ok(Some((msg, fd)))
    }
}

/// The child's side: answers every heartbeat and hands each pairing to `on_pair`, until the
/// monitor closes the socket (`Ok`) or sends something a child does not take (`Err`).
pub async fn answer(
    sock: &ControlSocket,
    mut on_pair: impl FnMut(Handoff, OwnedFd),
) -> anyhow::Result<()> {
    while let Some((msg, fd)) = sock.recv().await? {
        match (msg, fd) {
            (Control::Ping { seq }, _) => sock.send(&Control::Pong { seq }, None).await?,
            (Control::Pair { handoff }, Some(fd)) => on_pair(handoff, fd),
            (other, _) => bail!("the monitor sent {other:?}, which a child does not take"),
        }
    }
    Ok(())
}

/// How [`watch`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Watch {
    /// `missed` heartbeats in a row went unanswered.
    Hung { missed: u32 },
    /// The child closed its end (it exited, or is exiting).
    Closed,
}

/// The monitor's side: a heartbeat every `interval`, the answers counted in `beats`, until the
/// child hangs or closes the socket.
pub async fn watch(sock: &ControlSocket, interval: Duration, beats: &mut Heartbeats) -> Watch {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => match beats.tick(Instant::now()) {
                Tick::Send(seq) => {
                    if sock.send(&Control::Ping { seq }, None).await.is_err() {
                        return Watch::Closed;
                    }
                }
                Tick::Hung { missed } => return Watch::Hung { missed },
            },
            got = sock.recv() => match got {
                Ok(Some((Control::Pong { seq }, _))) => {
                    beats.answered(seq, Instant::now());
                }
                Ok(Some((other, _))) => {
                    tracing::warn!(message = ?other, "a child sent a message the monitor does not take");
                }
                Ok(None) | Err(_) => return Watch::Closed,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privsep::{control_pair, ProcessIdentity, Role};

    fn pair() -> (ControlSocket, ControlSocket) {
        let (a, b) = control_pair().unwrap();
        (
            ControlSocket::new(a).unwrap(),
            ControlSocket::new(b).unwrap(),
        )
    }

    #[tokio::test]
    async fn an_answering_child_gets_its_pairings_and_a_closed_one_ends_the_watch() {
        let (monitor, child) = pair();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let child_task = tokio::spawn(async move {
            answer(&child, |h, fd| {
                let _ = tx.send((h, fd));
            })
            .await
        });
        let (_mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let handoff = Handoff {
            peer_role: Role::Core,
            peer: ProcessIdentity::current().unwrap(),
            generation: 1,
        };
        monitor
            .send(
                &Control::Pair {
                    handoff: handoff.clone(),
                },
                Some(theirs.as_fd()),
            )
            .await
            .unwrap();
        let (got, _fd) = rx.recv().await.unwrap();
        assert_eq!(got, handoff);
        // Heartbeats are answered, with their own number.
        for seq in [7, 8] {
            monitor.send(&Control::Ping { seq }, None).await.unwrap();
            let (got, fd) = monitor.recv().await.unwrap().unwrap();
            assert_eq!(got, Control::Pong { seq });
            assert!(fd.is_none());
        }
        // The child closes its end: the watch ends with `Closed`.
        child_task.abort();
        let _ = child_task.await;
        let mut beats = Heartbeats::new(1000);
        assert_eq!(
            watch(&monitor, Duration::from_millis(10), &mut beats).await,
            Watch::Closed
        );
    }

    #[tokio::test]
    async fn a_child_that_stops_answering_is_hung_after_tolerance_heartbeats() {
        let (monitor, _child) = pair();
        let mut beats = Heartbeats::new(3);
        assert_eq!(
            watch(&monitor, Duration::from_millis(10), &mut beats).await,
            Watch::Hung { missed: 3 }
        );
    }

    /// A real process that never answers (as a stopped or wedged child would) is found hung,
    /// killed and reaped; the restart rules then decide.
    #[tokio::test]
    async fn a_real_child_that_never_answers_is_hung_killed_and_reaped() {
        use crate::privsep::supervise::{Decision, RestartPolicy, Restarts};
        let (monitor_end, child_end) = control_pair().unwrap();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600");
        let started = Instant::now();
        let mut child = crate::privsep::spawn_child(cmd, child_end).unwrap();
        let monitor = ControlSocket::new(monitor_end).unwrap();
        let mut beats = Heartbeats::new(3);
        let w = watch(&monitor, Duration::from_millis(20), &mut beats).await;
        assert_eq!(w, Watch::Hung { missed: 3 });
        child.kill().unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        let mut restarts = Restarts::new(RestartPolicy {
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            stable_after: Duration::from_secs(3600),
            max_restarts: 1,
            window: Duration::from_secs(3600),
        });
        let now = Instant::now();
        assert_eq!(
            restarts.died(started, now),
            Decision::Restart {
                after: Duration::ZERO
            }
        );
        assert!(matches!(restarts.died(now, now), Decision::GiveUp { .. }));
    }

    #[tokio::test]
    async fn malformed_control_messages_are_refused() {
        let (monitor, child) = pair();
        let (_a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        // A heartbeat carrying a descriptor.
        send_raw(
            monitor.fd.as_fd(),
            &Control::Ping { seq: 1 },
            Some(b.as_fd()),
        )
        .unwrap();
        assert!(child.recv().await.is_err());
        // Not JSON.
        nix::sys::socket::send(monitor.fd.as_raw_fd(), b"ping", MsgFlags::empty()).unwrap();
        assert!(child.recv().await.is_err());
        // A child does not take a pong.
        monitor.send(&Control::Pong { seq: 1 }, None).await.unwrap();
        assert!(answer(&child, |_, _| {}).await.is_err());
    }
}
