//! The hand-off between callers (async tasks) and the writer thread.
//!
//! A mutex-protected vector the writer swaps out whole, a condition variable to wake it, and a
//! semaphore that bounds how many messages may wait (so a stuck disk costs bounded memory; the
//! callers wait for room within their own timeout). It exists instead of a channel because the
//! writer needs one thing channels do not offer from a plain thread: waiting *until N messages
//! are queued or a deadline passes*, with sub-millisecond precision — the group-commit linger.
//!
//! Callers wake the writer only when it waits and what it waits for is there, so a busy queue
//! costs no futex call per record.

use super::writer::Msg;
use parking_lot::{Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

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
}

impl Queue {
    pub(crate) fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                items: Vec::new(),
                closed: false,
                control: false,
                waiting: false,
                want: 1,
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
        let mut s = self.state.lock();
        if s.closed {
            return Err(msg);
        }
        s.control |= matches!(msg, Msg::Control(_));
        s.items.push(msg);
        let wake = s.waiting && (s.control || s.items.len() >= s.want);
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
    /// least one (or until `idle_until`, if given); then, if fewer than `target` are queued,
    /// waits up to `linger` for that many.
    pub(crate) fn take(
        &self,
        out: &mut Vec<Msg>,
        target: usize,
        linger: Duration,
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
