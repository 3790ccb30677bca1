//! A circuit breaker per shard's Redis task: Redis that answers slowly (overloaded, a stopped
//! process, a network that drops without a reset) costs every send the whole timeout and then
//! may still run the write later. After [`OPEN_AFTER`] batches in a row got no answer in time the
//! breaker opens: batches are answered `unavailable` at once, without being sent. Once
//! [`OPEN_FOR`] has passed, one `PING` probes; an answer in time closes it, none keeps it open.
//! Pure: the caller passes the time and performs the probe.

use std::time::{Duration, Instant};

/// Consecutive timed-out batches that open the breaker.
pub const OPEN_AFTER: u32 = 3;
/// How long it stays open before a probe.
pub const OPEN_FOR: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed { timeouts_in_a_row: u32 },
    Open { since: Instant },
}

/// What to do with the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Send,
    /// Probe first (`PING`); report it with [`Breaker::probed`].
    Probe,
    Refuse,
}

#[derive(Debug)]
pub struct Breaker {
    state: State,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: State::Closed {
                timeouts_in_a_row: 0,
            },
        }
    }
}

impl Breaker {
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    pub fn gate(&self, now: Instant) -> Gate {
        match self.state {
            State::Closed { .. } => Gate::Send,
            State::Open { since } if now.duration_since(since) >= OPEN_FOR => Gate::Probe,
            State::Open { .. } => Gate::Refuse,
        }
    }

    /// A batch was sent: `timed_out` when no answer came in time. True when this opened it.
    pub fn sent(&mut self, timed_out: bool, now: Instant) -> bool {
        let State::Closed { timeouts_in_a_row } = &mut self.state else {
            return false;
        };
        if !timed_out {
            *timeouts_in_a_row = 0;
            return false;
        }
        *timeouts_in_a_row += 1;
        if *timeouts_in_a_row >= OPEN_AFTER {
            self.state = State::Open { since: now };
            return true;
        }
        false
    }

    /// The probe's outcome. True when this closed it.
    pub fn probed(&mut self, answered: bool, now: Instant) -> bool {
        if answered {
            self.state = State::Closed {
                timeouts_in_a_row: 0,
            };
            true
        } else {
            self.state = State::Open { since: now };
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_timeouts_in_a_row_open_it_and_one_answered_probe_closes_it() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        // Timeouts broken by an answer do not open it.
        assert!(!b.sent(true, t0));
        assert!(!b.sent(true, t0));
        assert!(!b.sent(false, t0));
        assert!(!b.sent(true, t0));
        assert!(!b.sent(true, t0));
        assert_eq!(b.gate(t0), Gate::Send);
        assert!(b.sent(true, t0), "the third in a row opens it");
        assert!(b.is_open());
        assert_eq!(b.gate(t0 + OPEN_FOR / 2), Gate::Refuse);
        // A probe that gets no answer keeps it open for another period.
        let t1 = t0 + OPEN_FOR;
        assert_eq!(b.gate(t1), Gate::Probe);
        assert!(!b.probed(false, t1));
        assert_eq!(b.gate(t1 + OPEN_FOR / 2), Gate::Refuse);
        let t2 = t1 + OPEN_FOR;
        assert_eq!(b.gate(t2), Gate::Probe);
        assert!(b.probed(true, t2));
        assert!(!b.is_open());
        assert_eq!(b.gate(t2), Gate::Send);
        // Closed again from zero: it takes three more.
        assert!(!b.sent(true, t2));
        assert!(!b.sent(true, t2));
        assert!(b.sent(true, t2));
    }
}
