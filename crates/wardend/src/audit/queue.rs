//! The hand-off between callers (async tasks) and the writer thread.
//!
//! A mutex-protected vector the writer swaps out whole, a condition variable to wake it, and a
//! semaphore that bounds how many messages may wait (so a stuck disk costs bounded memory; the
//! callers wait for room within their own timeout). It exists instead of a channel because the
//! writer needs one thing channels do not offer from a plain thread: waiting *until N messages
//! are queued or a deadline passes*, with sub-millisecond precision — the group-commit linger.
//!
//! Callers wake the writer only when it waits and what it waits for is there, so a busy queue
//! costs no futex call per record. While only probes are queued (records nobody waits for) the
//! writer waits a little longer to write more of them at once; the first record whose caller
//! waits ends that wait.

use super::writer::Msg;
use parking_lot::{Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub(crate) enum TrySendError {
    Full,
    Closed,
}

pub(crate) enum Take {
    Messages,
    /// Nothing came before `idle_until`.
    Idle,
    /// Closed, and nothing is left.
    Closed,
}

pub(crate) struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    room: Semaphore,
}

struct State {
    items: Vec<Msg>,
    closed: bool,
    /// A control message is queued: the writer must not linger.
    control: bool,
    /// The writer sleeps until `items.len() >= want` (or a control message, or closing).
    waiting: bool,
    want: usize,
    /// Queued records whose caller waits for the disk.
    waiters: usize,
    /// The writer's wait is the probe linger: a waiting caller's record ends it.
    probe_wait: bool,
}

/// A probe linger ends early once this many records are queued.
pub(crate) const PROBE_BATCH: usize = 512;

impl Queue {
    pub(crate) fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                items: Vec::new(),
                closed: false,
                control: false,
                waiting: false,
                want: 1,
                waiters: 0,
                probe_wait: false,
            }),
            ready: Condvar::new(),
            room: Semaphore::new(capacity),
        }
    }

    /// Queues `msg` once there is room. Gives the message back if the log is closed.
    pub(crate) async fn send(&self, msg: Msg) -> Result<(), Msg> {
        match self.room.acquire().await {
            // The writer gives the room back when it has taken the message out.
            Ok(permit) => permit.forget(),
            Err(_) => return Err(msg),
        }
        self.push(msg)
    }

    /// Queues `msg` if there is room now; otherwise gives it back with the reason.
    pub(crate) fn try_send(&self, msg: Msg) -> Result<(), (Msg, TrySendError)> {
        match self.room.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err((msg, TrySendError::Full)),
            Err(tokio::sync::TryAcquireError::Closed) => return Err((msg, TrySendError::Closed)),
        }
        self.push(msg).map_err(|msg| (msg, TrySendError::Closed))
    }

    /// Queues `msg`, whose room has been taken; wakes the writer if it waits for it.
    fn push(&self, msg: Msg) -> Result<(), Msg> {
        let mut s = self.state.lock();
        if s.closed {
            return Err(msg);
        }
        let waits = match &msg {
            Msg::Control(_) => {
                s.control = true;
                false
            }
            Msg::Record(p) => p.ack.is_some(),
        };
        s.waiters += usize::from(waits);
        s.items.push(msg);
        let wake = s.waiting && (s.control || s.items.len() >= s.want || (waits && s.probe_wait));
        if wake {
            s.waiting = false;
        }
        drop(s);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Writer side: moves the queued messages into `out` (which must be empty). Waits for at
    /// least one (or until `idle_until`, if given); then, while only probes are queued, up to
    /// `probe_linger` for [`PROBE_BATCH`] of them or a record whose caller waits; then, if
    /// fewer than `target` are queued, up to `linger` for that many.
    pub(crate) fn take(
        &self,
        out: &mut Vec<Msg>,
        target: usize,
        linger: Duration,
        probe_linger: Duration,
        idle_until: Option<Instant>,
    ) -> Take {
        let mut s = self.state.lock();
        while s.items.is_empty() {
            if s.closed {
                return Take::Closed;
            }
            s.want = 1;
            s.waiting = true;
            let timed_out = match idle_until {
                Some(t) => self.ready.wait_until(&mut s, t).timed_out(),
                None => {
                    self.ready.wait(&mut s);
                    false
                }
            };
            s.waiting = false;
            if timed_out && s.items.is_empty() {
                return Take::Idle;
            }
        }
        if s.waiters == 0 && !probe_linger.is_zero() {
            let deadline = Instant::now() + probe_linger;
            while s.items.len() < PROBE_BATCH && s.waiters == 0 && !s.closed && !s.control {
                s.want = PROBE_BATCH;
                s.waiting = true;
                s.probe_wait = true;
                let timed_out = self.ready.wait_until(&mut s, deadline).timed_out();
                s.waiting = false;
                s.probe_wait = false;
                if timed_out {
                    break;
                }
            }
        }
        if s.items.len() < target && !linger.is_zero() {
            let deadline = Instant::now() + linger;
            while s.items.len() < target && !s.closed && !s.control {
                s.want = target;
                s.waiting = true;
                let timed_out = self.ready.wait_until(&mut s, deadline).timed_out();
                s.waiting = false;
                if timed_out {
                    break;
                }
            }
        }
        std::mem::swap(&mut s.items, out);
        s.control = false;
        s.waiters = 0;
        Take::Messages
    }

    /// Writer side: `n` messages were taken out; their room is free again.
    pub(crate) fn release(&self, n: usize) {
        self.room.add_permits(n);
    }

    /// No more messages are accepted; queued ones are handed back (to be dropped, which fails
    /// their callers with `Closed`). Wakes the writer.
    pub(crate) fn close(&self) -> Vec<Msg> {
        let mut s = self.state.lock();
        s.closed = true;
        let rest = std::mem::take(&mut s.items);
        s.waiters = 0;
        drop(s);
        self.room.close();
        self.ready.notify_one();
        rest
    }

    /// No more messages are accepted; queued ones are still written. Used when the last handle
    /// is dropped.
    pub(crate) fn finish(&self) {
        let mut s = self.state.lock();
        s.closed = true;
        drop(s);
        self.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::writer::Pending;
    use std::sync::Arc;

    fn probe() -> Msg {
        Msg::Record(Pending {
            body: b"{}".to_vec(),
            ack: None,
        })
    }

    fn waiting() -> Msg {
        let (ack, _) = tokio::sync::oneshot::channel();
        Msg::Record(Pending {
            body: b"{}".to_vec(),
            ack: Some(ack),
        })
    }

    /// Runs `take` with a probe linger far longer than the test on a thread; the messages and
    /// how long it took.
    fn take_in_thread(q: &Arc<Queue>) -> std::thread::JoinHandle<(usize, Duration)> {
        let q = q.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut out = Vec::new();
            assert!(matches!(
                q.take(&mut out, 1, Duration::ZERO, Duration::from_secs(30), None),
                Take::Messages
            ));
            (out.len(), t0.elapsed())
        })
    }

    #[tokio::test]
    async fn a_record_whose_caller_waits_ends_the_probe_linger() {
        let q = Arc::new(Queue::new(1024));
        q.send(probe()).await.ok().unwrap();
        let taker = take_in_thread(&q);
        tokio::time::sleep(Duration::from_millis(50)).await;
        q.send(waiting()).await.ok().unwrap();
        let (n, took) = taker.join().unwrap();
        assert_eq!(n, 2);
        assert!(took < Duration::from_secs(20), "{took:?}");
    }

    #[tokio::test]
    async fn a_full_probe_batch_ends_the_probe_linger() {
        let q = Arc::new(Queue::new(4096));
        q.send(probe()).await.ok().unwrap();
        let taker = take_in_thread(&q);
        for _ in 1..PROBE_BATCH {
            q.send(probe()).await.ok().unwrap();
        }
        let (n, took) = taker.join().unwrap();
        assert_eq!(n, PROBE_BATCH);
        assert!(took < Duration::from_secs(20), "{took:?}");
    }

    #[tokio::test]
    async fn a_waiting_record_already_queued_skips_the_probe_linger() {
        let q = Arc::new(Queue::new(1024));
        q.send(probe()).await.ok().unwrap();
        q.send(waiting()).await.ok().unwrap();
        let (n, took) = take_in_thread(&q).join().unwrap();
        assert_eq!(n, 2);
        assert!(took < Duration::from_secs(20), "{took:?}");
    }
}
