//! The supervisor's decisions, without processes or clocks of its own: when a child has missed
//! too many heartbeats, how long to wait before restarting it, and when to give up.
//!
//! [`Heartbeats`] counts a child's unanswered heartbeats: each interval the supervisor calls
//! [`Heartbeats::tick`], which either asks for a new heartbeat to be sent or, after `tolerance`
//! intervals without an answer, declares the child hung. [`Restarts`] turns each death into
//! "restart after this backoff" (doubling up to a maximum, reset once a child stayed up for a
//! stable uptime) or "give up" (too many restarts within the window: the supervisor stops
//! everything and exits non-zero, so that systemd restarts the unit).
//!
//! What it deliberately does not do: sleep, send, kill or spawn. The caller passes the time in,
//! so every rule is tested exactly.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What to do on a heartbeat interval.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// Send heartbeat number `seq`.
    Send(u64),
    /// `tolerance` heartbeats in a row went unanswered: kill the child and restart it.
    Hung { missed: u32 },
}

/// Heartbeat bookkeeping for one child incarnation.
#[derive(Debug)]
pub struct Heartbeats {
    tolerance: u32,
    missed: u32,
    seq: u64,
    outstanding: Option<(u64, Instant)>,
    last_round_trip: Option<Duration>,
}

impl Heartbeats {
    /// `tolerance` (at least 1): how many heartbeats in a row may go unanswered.
    pub fn new(tolerance: u32) -> Heartbeats {
        Heartbeats {
            tolerance: tolerance.max(1),
            missed: 0,
            seq: 0,
            outstanding: None,
            last_round_trip: None,
        }
    }

    /// Called once per interval.
    pub fn tick(&mut self, now: Instant) -> Tick {
        if self.outstanding.is_some() {
            self.missed += 1;
            if self.missed >= self.tolerance {
                return Tick::Hung {
                    missed: self.missed,
                };
            }
        }
        self.seq += 1;
        self.outstanding = Some((self.seq, now));
        Tick::Send(self.seq)
    }

    /// The child answered heartbeat `seq`. An answer to anything but the latest heartbeat is
    /// ignored (a late answer must not hide that the newer one is unanswered).
    pub fn answered(&mut self, seq: u64, now: Instant) -> bool {
        match self.outstanding {
            Some((s, sent)) if s == seq => {
                self.outstanding = None;
                self.missed = 0;
                self.last_round_trip = Some(now.saturating_duration_since(sent));
                true
            }
            _ => false,
        }
    }

    /// The round trip of the last answered heartbeat (for `daemon status`).
    pub fn last_round_trip(&self) -> Option<Duration> {
        self.last_round_trip
    }
}

/// How restarts are paced and bounded.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    /// The first restart (after a stable run, or ever) is immediate: a crash costs clients as
    /// little as possible. The next waits `backoff_initial`, doubled after each restart up to
    /// `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A child that ran at least this long before dying is restarted at once again, and its
    /// backoff starts over.
    pub stable_after: Duration,
    /// More than this many restarts within `window` → give up.
    pub max_restarts: u32,
    pub window: Duration,
}

/// What to do about a child that died (or was killed as hung).
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Restart { after: Duration },
    GiveUp { restarts: u32, window: Duration },
}

/// The restart history of one child.
#[derive(Debug)]
pub struct Restarts {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
    /// The wait before the next restart; `None`: restart at once.
    backoff: Option<Duration>,
    total: u64,
}

impl Restarts {
    pub fn new(policy: RestartPolicy) -> Restarts {
        Restarts {
            backoff: None,
            policy,
            recent: VecDeque::new(),
            total: 0,
        }
    }

    /// The child started at `started` has died at `now`.
    pub fn died(&mut self, started: Instant, now: Instant) -> Decision {
        if now.saturating_duration_since(started) >= self.policy.stable_after {
            self.backoff = None;
        }
        while let Some(first) = self.recent.front() {
            if now.saturating_duration_since(*first) >= self.policy.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() as u32 >= self.policy.max_restarts {
            return Decision::GiveUp {
                restarts: self.recent.len() as u32,
                window: self.policy.window,
            };
        }
        self.recent.push_back(now);
        self.total += 1;
        let after = self.backoff.unwrap_or(Duration::ZERO);
        self.backoff = Some(match self.backoff {
            None => self.policy.backoff_initial.min(self.policy.backoff_max),
            Some(b) => (b * 2).min(self.policy.backoff_max),
        });
        Decision::Restart { after }
    }

    /// Restarts since the supervisor started.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_child_that_answers_is_never_hung_and_its_round_trip_is_kept() {
        let t0 = Instant::now();
        let mut h = Heartbeats::new(3);
        for i in 0..100u64 {
            let now = t0 + MS * (100 * i as u32);
            assert_eq!(h.tick(now), Tick::Send(i + 1));
            assert!(h.answered(i + 1, now + MS * 2));
        }
        assert_eq!(h.last_round_trip(), Some(MS * 2));
    }

    #[test]
    fn tolerance_unanswered_heartbeats_in_a_row_mean_hung() {
        let t0 = Instant::now();
        let mut h = Heartbeats::new(3);
        assert_eq!(h.tick(t0), Tick::Send(1));
        assert_eq!(h.tick(t0 + MS * 100), Tick::Send(2));
        // A late answer to an older heartbeat does not count.
        assert!(!h.answered(1, t0 + MS * 150));
        assert_eq!(h.tick(t0 + MS * 200), Tick::Send(3));
        assert_eq!(h.tick(t0 + MS * 300), Tick::Hung { missed: 3 });

        // An answer resets the count.
        let mut h = Heartbeats::new(2);
        assert_eq!(h.tick(t0), Tick::Send(1));
        assert_eq!(h.tick(t0 + MS), Tick::Send(2));
        assert!(h.answered(2, t0 + MS * 2));
        assert_eq!(h.tick(t0 + MS * 3), Tick::Send(3));
        assert_eq!(h.tick(t0 + MS * 4), Tick::Send(4));
        assert_eq!(h.tick(t0 + MS * 5), Tick::Hung { missed: 2 });
    }

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_initial: MS * 10,
            backoff_max: MS * 80,
            stable_after: Duration::from_secs(10),
            max_restarts: 5,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets_after_a_stable_run() {
        let t0 = Instant::now();
        let mut r = Restarts::new(RestartPolicy {
            max_restarts: 100,
            ..policy()
        });
        let waits: Vec<_> = (0..6)
            .map(|i| match r.died(t0 + MS * i, t0 + MS * (i + 1)) {
                Decision::Restart { after } => after,
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(waits, [0, 10, 20, 40, 80, 80].map(|n| MS * n));
        // Up for longer than `stable_after`: the next restart is immediate again, and the
        // backoff starts over.
        let d = r.died(t0, t0 + Duration::from_secs(11));
        assert_eq!(
            d,
            Decision::Restart {
                after: Duration::ZERO
            }
        );
        let now = t0 + Duration::from_secs(11);
        assert_eq!(r.died(now, now), Decision::Restart { after: MS * 10 });
        assert_eq!(r.total(), 8);
    }

    #[test]
    fn too_many_restarts_within_the_window_give_up_and_old_ones_expire() {
        let t0 = Instant::now();
        let mut r = Restarts::new(policy());
        for i in 0..5u32 {
            let now = t0 + Duration::from_secs(i as u64);
            assert!(matches!(r.died(now, now), Decision::Restart { .. }));
        }
        let now = t0 + Duration::from_secs(5);
        assert_eq!(
            r.died(now, now),
            Decision::GiveUp {
                restarts: 5,
                window: Duration::from_secs(60)
            }
        );
        // The same count spread over more than the window is fine.
        let mut r = Restarts::new(policy());
        for i in 0..20u64 {
            let now = t0 + Duration::from_secs(13 * i);
            assert!(matches!(r.died(now, now), Decision::Restart { .. }), "{i}");
        }
    }
}
