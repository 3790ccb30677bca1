//! One connection's window of unacknowledged `msg` frames (SPEC section 4).
//!
//! # What it owns
//! A [`Window`] owns the connection's `msg` seq counter and every message sent on it that the
//! client has not acknowledged yet, with its retransmit deadline and retransmit count. It
//! sends nothing itself: [`Window::poll`] hands the frames to resend to a callback, and
//! [`Window::next_deadline`] is the one instant the shard's timing wheel must call `poll` at.
//!
//! # Rules
//! * Seqs are 1, 2, 3… per connection, without gaps; a message keeps its seq when resent.
//! * `ack n` is cumulative: it acknowledges every message with seq <= n. An ack at or below
//!   what is already acknowledged is a no-op; an ack above the last seq sent is
//!   [`AckError::Ahead`] (the caller answers `bad_request`).
//! * At most `capacity` messages are in flight; [`Window::push`] on a full window gives the
//!   message back (the caller puts it in the offline inbox instead).
//!
//! # Retransmit schedule
//! With `T = ack_timeout_ms` and `R = max_retransmits`, the k-th retransmit (k = 1..=R) happens
//! `T * 2^(k-1)` after the previous send, and the connection expires `T * 2^R` after the last
//! retransmit. A message first sent at `t0` with the defaults (T = 5 s, R = 3) and never acked:
//!
//! | event          | at        | default   |
//! |----------------|-----------|-----------|
//! | first send     | t0        | 0 s       |
//! | retransmit 1   | t0 + T    | 5 s       |
//! | retransmit 2   | t0 + 3T   | 15 s      |
//! | retransmit 3   | t0 + 7T   | 35 s      |
//! | expired        | t0 + 15T  | 75 s      |
//!
//! Each timeout is measured from the actual (re)send, i.e. from the `now` of the `poll` that
//! resent it, so a client always gets a full timeout to answer. Polled on time (at
//! [`Window::next_deadline`]), the schedule is exactly the table above; a late poll (wheel
//! granularity, a busy shard) shifts the rest of that message's schedule by the lateness.
//! Time never goes backwards for a window: a `now` earlier than one already seen is raised
//! to it.
//!
//! # Cost
//! * `push`, `next_deadline`, `len`: O(1). `ack`: O(acked) while no message in the window
//!   has been retransmitted (the normal case: deadlines are then in seq order, so the earliest
//!   is the front), O(len) otherwise. `poll`: O(1) when nothing is due, O(len) when
//!   something is (retransmits are rare). `len` is bounded by `capacity`.
//! * Memory: `size_of::<Window<M>>()` (80 bytes for an 8-byte `M`) plus, only while something
//!   is in flight, a ring of `size_of::<M>() + 16` bytes per slot (24 for `Rc<_>`). The ring is
//!   released whenever the window becomes empty, so an idle connection holds no heap memory;
//!   the price is one small allocation per burst of messages.

use std::collections::VecDeque;

use crate::config::{DEFAULT_ACK_TIMEOUT_MS, DEFAULT_WINDOW};

/// Retransmits of one unacknowledged message before the connection is considered dead.
pub const DEFAULT_MAX_RETRANSMITS: u8 = 3;

/// Per-connection window settings; the shard builds one from its `Config` and copies it into
/// every window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Maximum number of unacknowledged messages in flight (SPEC default 256).
    pub capacity: u32,
    /// Time to wait for the ack of a first send (SPEC default 5 s); doubled after every retransmit.
    pub ack_timeout_ms: u64,
    /// Retransmits per message before the connection expires (SPEC: at most 3).
    pub max_retransmits: u8,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            capacity: DEFAULT_WINDOW,
            ack_timeout_ms: DEFAULT_ACK_TIMEOUT_MS,
            max_retransmits: DEFAULT_MAX_RETRANSMITS,
        }
    }
}

/// What [`Window::poll`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    /// Nothing expired (some messages may have been handed to `resend`).
    Alive,
    /// A message used up its retransmits and its last timeout passed: close the connection and
    /// move [`Window::drain`] to the offline inbox.
    Expired,
}

/// A protocol error in a client `ack`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The client acknowledged a seq the server never sent on this connection.
    #[error("ack of seq {upto}, but the last msg sent on this connection has seq {last}")]
    Ahead { upto: u64, last: u64 },
}

/// One unacknowledged message. Its seq is implicit (position in the ring).
#[derive(Debug)]
struct InFlight<M> {
    msg: M,
    /// Next retransmit, or expiry once `retries == max_retransmits`.
    deadline: u64,
    /// Retransmits done so far.
    retries: u8,
}

/// One connection's window; see the module documentation.
#[derive(Debug)]
pub struct Window<M> {
    cfg: WindowConfig,
    /// Unacknowledged messages in seq order: `unacked[i]` has seq `acked() + 1 + i`.
    unacked: VecDeque<InFlight<M>>,
    /// Last seq assigned (0 before the first push).
    last_seq: u64,
    /// Earliest deadline in `unacked`; meaningless while `unacked` is empty.
    earliest: u64,
    /// Entries of `unacked` with `retries > 0`. While it is 0, every deadline is
    /// `push time + T` with non-decreasing push times, so the front holds the earliest one.
    retrying: u32,
    /// Latest `now` seen; keeps deadlines consistent if the caller's clock steps back.
    now: u64,
}

impl<M> Window<M> {
    /// An empty window. Allocates nothing until the first [`Window::push`].
    pub fn new(cfg: WindowConfig) -> Self {
        Window {
            cfg,
            unacked: VecDeque::new(),
            last_seq: 0,
            earliest: 0,
            retrying: 0,
            now: 0,
        }
    }

    /// An empty window that continues a connection's numbering after `last_seq` (the shard
    /// drops idle windows and resumes them, so seq never restarts on a connection).
    pub fn resume(cfg: WindowConfig, last_seq: u64) -> Self {
        Window {
            last_seq,
            ..Self::new(cfg)
        }
    }

    pub fn config(&self) -> &WindowConfig {
        &self.cfg
    }

    /// True when `capacity` messages are in flight: the next [`Window::push`] is refused.
    pub fn is_full(&self) -> bool {
        self.unacked.len() >= self.cfg.capacity as usize
    }

    /// Messages in flight (sent, not yet acknowledged).
    pub fn len(&self) -> usize {
        self.unacked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }

    /// The messages in flight, in seq order.
    pub fn in_flight(&self) -> impl Iterator<Item = &M> {
        self.unacked.iter().map(|f| &f.msg)
    }

    /// Last seq assigned on this connection (0 before the first message).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Highest seq acknowledged so far (everything at or below it is done).
    pub fn acked(&self) -> u64 {
        self.last_seq - self.unacked.len() as u64
    }

    /// Assign the next seq to `msg` and keep it in flight, first sent at `now`; the caller
    /// sends the `msg` frame with the returned seq. `Err(msg)` when the window is full: the
    /// message is handed back untouched and no seq is used (the caller sends it to the inbox).
    pub fn push(&mut self, msg: M, now: u64) -> Result<u64, M> {
        if self.is_full() {
            return Err(msg);
        }
        let now = self.observe(now);
        let deadline = now.saturating_add(self.cfg.ack_timeout_ms);
        self.earliest = if self.unacked.is_empty() {
            deadline
        } else {
            self.earliest.min(deadline)
        };
        self.unacked.push_back(InFlight {
            msg,
            deadline,
            retries: 0,
        });
        self.last_seq += 1;
        Ok(self.last_seq)
    }

    /// Cumulative ack: every message with seq <= `upto` is acknowledged. Returns the messages
    /// newly acknowledged, in seq order (empty, without allocating, for an old or duplicate
    /// ack). `Err(AckError::Ahead)` when `upto` is above the last seq sent; nothing changes then.
    pub fn ack(&mut self, upto: u64) -> Result<Vec<M>, AckError> {
        let mut out = Vec::new();
        self.ack_with(upto, |_, msg| out.push(msg))?;
        Ok(out)
    }

    /// Like [`Window::ack`], but hands each newly acknowledged message to `done(seq, msg)` in
    /// seq order instead of collecting them, so the hot path allocates nothing. Returns how
    /// many were acknowledged.
    pub fn ack_with(&mut self, upto: u64, mut done: impl FnMut(u64, M)) -> Result<usize, AckError> {
        if upto > self.last_seq {
            return Err(AckError::Ahead {
                upto,
                last: self.last_seq,
            });
        }
        let first = self.acked() + 1;
        if upto < first {
            return Ok(0);
        }
        let n = (upto - first + 1) as usize;
        let mut hit_earliest = false;
        for (i, e) in self.unacked.drain(..n).enumerate() {
            if e.retries > 0 {
                self.retrying -= 1;
            }
            hit_earliest |= e.deadline == self.earliest;
            done(first + i as u64, e.msg);
        }
        if self.unacked.is_empty() {
            self.release();
        } else if self.retrying == 0 {
            self.earliest = self.unacked[0].deadline;
        } else if hit_earliest {
            self.earliest = min_deadline(&self.unacked);
        }
        Ok(n)
    }

    /// Deadline (ms) of the earliest retransmit or expiry; `None` when nothing is in flight.
    /// The shard keeps one timer at this instant and calls [`Window::poll`] then.
    pub fn next_deadline(&self) -> Option<u64> {
        (!self.unacked.is_empty()).then_some(self.earliest)
    }

    /// Handle the deadlines that passed at `now`.
    ///
    /// If a message has already been retransmitted `max_retransmits` times and its last
    /// timeout passed (deadline <= `now`), returns [`WindowState::Expired`] and changes
    /// nothing (nothing is resent either: the connection is closing). Otherwise calls
    /// `resend(seq, &msg)` for every message whose deadline passed, in seq order, counts the
    /// retransmit and sets its next deadline to `now + ack_timeout_ms * 2^retransmits`
    /// (see the schedule in the module docs), and returns [`WindowState::Alive`].
    /// Once expired, every later `poll` says `Expired` again until the window is drained.
    pub fn poll(&mut self, now: u64, mut resend: impl FnMut(u64, &M)) -> WindowState {
        let now = self.observe(now);
        if self.unacked.is_empty() || self.earliest > now {
            return WindowState::Alive;
        }
        let max = self.cfg.max_retransmits;
        if self
            .unacked
            .iter()
            .any(|e| e.deadline <= now && e.retries >= max)
        {
            return WindowState::Expired;
        }
        let first = self.acked() + 1;
        let mut earliest = u64::MAX;
        for (i, e) in self.unacked.iter_mut().enumerate() {
            if e.deadline <= now {
                if e.retries == 0 {
                    self.retrying += 1;
                }
                e.retries += 1;
                e.deadline = now.saturating_add(backoff(self.cfg.ack_timeout_ms, e.retries));
                resend(first + i as u64, &e.msg);
            }
            earliest = earliest.min(e.deadline);
        }
        self.earliest = earliest;
        WindowState::Alive
    }

    /// Take everything still unacknowledged, as `(seq, msg)` in seq order (to spill to the
    /// inbox when the connection closes). The window is then empty and holds no heap memory;
    /// `last_seq` is kept, so a later push would continue the sequence without reusing a seq.
    pub fn drain(&mut self) -> Vec<(u64, M)> {
        let first = self.acked() + 1;
        let taken = std::mem::take(&mut self.unacked);
        self.release();
        taken
            .into_iter()
            .enumerate()
            .map(|(i, e)| (first + i as u64, e.msg))
            .collect()
    }

    /// Raise `now` to the latest time seen and return it.
    fn observe(&mut self, now: u64) -> u64 {
        self.now = self.now.max(now);
        self.now
    }

    /// Reset the in-flight bookkeeping of an empty window and free its ring, so an idle
    /// connection holds no heap memory.
    fn release(&mut self) {
        debug_assert!(self.unacked.is_empty());
        self.unacked = VecDeque::new();
        self.retrying = 0;
    }
}

/// Earliest deadline of a non-empty ring.
fn min_deadline<M>(unacked: &VecDeque<InFlight<M>>) -> u64 {
    unacked.iter().map(|e| e.deadline).min().unwrap_or(u64::MAX)
}

/// Timeout after the `retries`-th retransmit: `timeout * 2^retries`, saturating.
fn backoff(timeout: u64, retries: u8) -> u64 {
    1u64.checked_shl(u32::from(retries))
        .and_then(|factor| timeout.checked_mul(factor))
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 5_000;
    /// Far from 0 so a deadline computed from 0 would show.
    const T0: u64 = 1_000_000;

    fn cfg(capacity: u32) -> WindowConfig {
        WindowConfig {
            capacity,
            ack_timeout_ms: T,
            max_retransmits: 3,
        }
    }

    /// Poll and return the seqs handed to `resend`.
    fn poll(w: &mut Window<String>, now: u64) -> (WindowState, Vec<u64>) {
        let mut seqs = Vec::new();
        let state = w.poll(now, |seq, _| seqs.push(seq));
        (state, seqs)
    }

    fn msg(i: u64) -> String {
        format!("m{i}")
    }

    #[test]
    fn sizes() {
        // Printed so the per-connection overhead is visible with `--nocapture`.
        let window = std::mem::size_of::<Window<std::rc::Rc<()>>>();
        let slot = std::mem::size_of::<InFlight<std::rc::Rc<()>>>();
        println!("size_of::<Window<Rc<_>>>() = {window}, per in-flight slot = {slot}");
        assert!(window <= 80);
        assert!(slot <= 24);
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = WindowConfig::default();
        assert_eq!(c.capacity, 256);
        assert_eq!(c.ack_timeout_ms, 5_000);
        assert_eq!(c.max_retransmits, 3);
    }

    #[test]
    fn seqs_start_at_one_without_gaps() {
        let mut w = Window::new(cfg(16));
        assert_eq!(w.last_seq(), 0);
        assert_eq!(w.acked(), 0);
        for i in 1..=10 {
            assert_eq!(w.push(msg(i), T0 + i), Ok(i));
        }
        assert_eq!(w.last_seq(), 10);
        assert_eq!(w.len(), 10);
        w.ack(4).unwrap();
        assert_eq!(w.acked(), 4);
        // Acks never disturb numbering.
        assert_eq!(w.push(msg(11), T0 + 20), Ok(11));
        assert_eq!(w.len(), 7);
    }

    #[test]
    fn full_window_hands_the_message_back_intact() {
        let mut w = Window::new(cfg(3));
        for i in 1..=3 {
            assert!(!w.is_full());
            assert_eq!(w.push(msg(i), T0), Ok(i));
        }
        assert!(w.is_full());
        assert_eq!(
            w.push("the fourth".to_string(), T0),
            Err("the fourth".to_string())
        );
        // A refused push uses no seq and changes nothing.
        assert_eq!(w.last_seq(), 3);
        assert_eq!(w.len(), 3);
        assert_eq!(w.next_deadline(), Some(T0 + T));
        w.ack(1).unwrap();
        assert!(!w.is_full());
        assert_eq!(w.push(msg(4), T0 + 1), Ok(4));
        assert!(w.is_full());
    }

    #[test]
    fn zero_capacity_refuses_everything() {
        let mut w = Window::new(cfg(0));
        assert!(w.is_full());
        assert_eq!(w.push(msg(1), T0), Err(msg(1)));
        assert_eq!(w.last_seq(), 0);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn cumulative_ack_returns_exactly_the_acked_in_order() {
        let mut w = Window::new(cfg(16));
        for i in 1..=6 {
            w.push(msg(i), T0).unwrap();
        }
        assert_eq!(w.ack(3), Ok(vec![msg(1), msg(2), msg(3)]));
        assert_eq!(w.ack(5), Ok(vec![msg(4), msg(5)]));
        assert_eq!(w.len(), 1);
        assert_eq!(w.acked(), 5);
        let mut seen = Vec::new();
        assert_eq!(w.ack_with(6, |seq, m| seen.push((seq, m))), Ok(1));
        assert_eq!(seen, vec![(6, msg(6))]);
        assert!(w.is_empty());
    }

    #[test]
    fn old_and_duplicate_acks_are_no_ops() {
        let mut w = Window::new(cfg(16));
        assert_eq!(w.ack(0), Ok(vec![]));
        for i in 1..=5 {
            w.push(msg(i), T0).unwrap();
        }
        assert_eq!(w.ack(3).unwrap().len(), 3);
        for old in [0, 1, 2, 3] {
            assert_eq!(w.ack(old), Ok(vec![]), "ack {old}");
        }
        assert_eq!(w.len(), 2);
        assert_eq!(w.acked(), 3);
        assert_eq!(w.ack(5).unwrap().len(), 2);
        assert_eq!(w.ack(5), Ok(vec![]));
        assert_eq!(w.acked(), 5);
    }

    #[test]
    fn ack_ahead_is_an_error_and_changes_nothing() {
        let mut w: Window<String> = Window::new(cfg(16));
        assert_eq!(w.ack(1), Err(AckError::Ahead { upto: 1, last: 0 }));
        for i in 1..=4 {
            w.push(msg(i), T0).unwrap();
        }
        w.ack(1).unwrap();
        let err = w.ack(5).unwrap_err();
        assert_eq!(err, AckError::Ahead { upto: 5, last: 4 });
        assert_eq!(
            err.to_string(),
            "ack of seq 5, but the last msg sent on this connection has seq 4"
        );
        assert_eq!(
            w.ack(u64::MAX),
            Err(AckError::Ahead {
                upto: u64::MAX,
                last: 4
            })
        );
        assert_eq!(w.len(), 3);
        assert_eq!(w.acked(), 1);
        assert_eq!(w.ack(4), Ok(vec![msg(2), msg(3), msg(4)]));
    }

    #[test]
    fn exact_retransmit_schedule_then_expiry() {
        let mut w = Window::new(cfg(16));
        assert_eq!(w.push(msg(1), T0), Ok(1));
        // (deadline, what happens there): resend at t0+T, t0+3T, t0+7T; expire at t0+15T.
        for deadline in [T0 + T, T0 + 3 * T, T0 + 7 * T] {
            assert_eq!(w.next_deadline(), Some(deadline));
            assert_eq!(poll(&mut w, deadline - 1), (WindowState::Alive, vec![]));
            assert_eq!(poll(&mut w, deadline), (WindowState::Alive, vec![1]));
            // Polling again at the same instant resends nothing more.
            assert_eq!(poll(&mut w, deadline), (WindowState::Alive, vec![]));
        }
        assert_eq!(w.next_deadline(), Some(T0 + 15 * T));
        assert_eq!(poll(&mut w, T0 + 15 * T - 1), (WindowState::Alive, vec![]));
        assert_eq!(poll(&mut w, T0 + 15 * T), (WindowState::Expired, vec![]));
        // Sticky until drained; the message is still there to spill.
        assert_eq!(poll(&mut w, T0 + 16 * T), (WindowState::Expired, vec![]));
        assert_eq!(w.drain(), vec![(1, msg(1))]);
        assert_eq!(poll(&mut w, T0 + 17 * T), (WindowState::Alive, vec![]));
    }

    #[test]
    fn default_schedule_in_seconds() {
        let mut w = Window::new(WindowConfig::default());
        w.push(msg(1), 0).unwrap();
        let mut resent_at = Vec::new();
        let mut expired_at = None;
        // Step through every millisecond: deadlines must be hit exactly, never early.
        for now in 0..=80_000 {
            match w.poll(now, |_, _| resent_at.push(now)) {
                WindowState::Alive => {}
                WindowState::Expired => {
                    expired_at = Some(now);
                    break;
                }
            }
        }
        assert_eq!(resent_at, vec![5_000, 15_000, 35_000]);
        assert_eq!(expired_at, Some(75_000));
    }

    #[test]
    fn late_poll_measures_the_next_timeout_from_the_resend() {
        let mut w = Window::new(cfg(16));
        w.push(msg(1), T0).unwrap();
        assert_eq!(poll(&mut w, T0 + T + 100), (WindowState::Alive, vec![1]));
        assert_eq!(w.next_deadline(), Some(T0 + T + 100 + 2 * T));
        // A very late poll still resends first (the deadline was a retransmit, not expiry).
        assert_eq!(poll(&mut w, T0 + 100 * T), (WindowState::Alive, vec![1]));
        assert_eq!(w.next_deadline(), Some(T0 + 100 * T + 4 * T));
    }

    #[test]
    fn zero_retransmits_expire_after_one_timeout() {
        let mut w = Window::new(WindowConfig {
            max_retransmits: 0,
            ..cfg(4)
        });
        w.push(msg(1), T0).unwrap();
        assert_eq!(poll(&mut w, T0 + T - 1), (WindowState::Alive, vec![]));
        assert_eq!(poll(&mut w, T0 + T), (WindowState::Expired, vec![]));
    }

    #[test]
    fn ack_during_backoff_stops_retransmits_of_the_acked_only() {
        let mut w = Window::new(cfg(16));
        w.push(msg(1), T0).unwrap(); // due T0+5000
        w.push(msg(2), T0 + 1_000).unwrap(); // due T0+6000
        w.push(msg(3), T0 + 2_000).unwrap(); // due T0+7000
        assert_eq!(poll(&mut w, T0 + 5_000), (WindowState::Alive, vec![1])); // 1 -> T0+15000
        assert_eq!(poll(&mut w, T0 + 6_000), (WindowState::Alive, vec![2])); // 2 -> T0+16000
        assert_eq!(w.next_deadline(), Some(T0 + 7_000));
        assert_eq!(w.ack(1), Ok(vec![msg(1)]));
        assert_eq!(w.next_deadline(), Some(T0 + 7_000));
        assert_eq!(poll(&mut w, T0 + 7_000), (WindowState::Alive, vec![3])); // 3 -> T0+17000
        assert_eq!(w.next_deadline(), Some(T0 + 16_000));
        // T0+15000 was message 1's retransmit: it is acked, nothing happens.
        assert_eq!(poll(&mut w, T0 + 15_000), (WindowState::Alive, vec![]));
        assert_eq!(poll(&mut w, T0 + 16_000), (WindowState::Alive, vec![2])); // 2 -> T0+36000
        assert_eq!(w.ack(2), Ok(vec![msg(2)]));
        assert_eq!(w.next_deadline(), Some(T0 + 17_000));
        assert_eq!(poll(&mut w, T0 + 17_000), (WindowState::Alive, vec![3])); // 3 -> T0+37000
        assert_eq!(w.next_deadline(), Some(T0 + 37_000));
        assert_eq!(w.ack(3), Ok(vec![msg(3)]));
        assert_eq!(w.next_deadline(), None);
        assert_eq!(poll(&mut w, T0 + 1_000_000), (WindowState::Alive, vec![]));
    }

    #[test]
    fn one_expired_message_expires_the_window_without_resending_others() {
        let mut w = Window::new(cfg(16));
        w.push(msg(1), T0).unwrap();
        for t in [T0 + T, T0 + 3 * T, T0 + 7 * T] {
            assert_eq!(poll(&mut w, t).1, vec![1]);
        }
        w.push(msg(2), T0 + 14 * T).unwrap(); // due T0+15T too
        assert_eq!(w.next_deadline(), Some(T0 + 15 * T));
        assert_eq!(poll(&mut w, T0 + 15 * T), (WindowState::Expired, vec![]));
        assert_eq!(w.drain(), vec![(1, msg(1)), (2, msg(2))]);
    }

    #[test]
    fn next_deadline_tracks_the_earliest_even_out_of_seq_order() {
        let mut w = Window::new(cfg(16));
        assert_eq!(w.next_deadline(), None);
        w.push(msg(1), T0).unwrap();
        w.push(msg(2), T0 + 3_000).unwrap();
        w.push(msg(3), T0 + 4_000).unwrap();
        assert_eq!(w.next_deadline(), Some(T0 + 5_000));
        // Message 1 is resent and now due at T0+15000, after 2 (T0+8000) and 3 (T0+9000).
        poll(&mut w, T0 + 5_000);
        assert_eq!(w.next_deadline(), Some(T0 + 8_000));
        // Acking 1 (not the earliest) keeps it; acking 2 (the earliest) moves it to 3.
        w.ack(1).unwrap();
        assert_eq!(w.next_deadline(), Some(T0 + 8_000));
        w.ack(2).unwrap();
        assert_eq!(w.next_deadline(), Some(T0 + 9_000));
        // A later push cannot be earlier than what is already in flight.
        w.push(msg(4), T0 + 4_500).unwrap();
        assert_eq!(w.next_deadline(), Some(T0 + 9_000));
        w.ack(4).unwrap();
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn earliest_scan_after_ack_with_retransmitted_entries() {
        let mut w = Window::new(cfg(16));
        w.push(msg(1), T0).unwrap(); // due +5000
        w.push(msg(2), T0 + 4_000).unwrap(); // due +9000
        poll(&mut w, T0 + 5_000); // 1 -> +15000
        poll(&mut w, T0 + 9_000); // 2 -> +19000
        w.push(msg(3), T0 + 12_000).unwrap(); // due +17000
        assert_eq!(w.next_deadline(), Some(T0 + 15_000));
        // Acking 1 removes the earliest while 2 (retransmitted) and 3 remain: min is 3's.
        w.ack(1).unwrap();
        assert_eq!(w.next_deadline(), Some(T0 + 17_000));
    }

    #[test]
    fn clock_stepping_back_is_treated_as_no_time_passing() {
        let mut w = Window::new(cfg(16));
        w.push(msg(1), T0).unwrap();
        w.push(msg(2), T0 - 3_000).unwrap();
        assert_eq!(w.next_deadline(), Some(T0 + T));
        assert_eq!(poll(&mut w, T0 + T), (WindowState::Alive, vec![1, 2]));
        assert_eq!(poll(&mut w, 0), (WindowState::Alive, vec![]));
        assert_eq!(w.next_deadline(), Some(T0 + 3 * T));
    }

    #[test]
    fn drain_returns_the_rest_in_order_and_frees_memory() {
        let mut w = Window::new(cfg(16));
        for i in 1..=5 {
            w.push(msg(i), T0).unwrap();
        }
        w.ack(2).unwrap();
        poll(&mut w, T0 + T);
        assert_eq!(w.drain(), vec![(3, msg(3)), (4, msg(4)), (5, msg(5))]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.unacked.capacity(), 0);
        assert_eq!(w.drain(), vec![]);
        assert_eq!(w.ack(5), Ok(vec![]));
        // The sequence continues; no seq is ever reused on a connection.
        assert_eq!(w.last_seq(), 5);
        assert_eq!(w.push(msg(6), T0 + 2 * T), Ok(6));
        assert_eq!(w.next_deadline(), Some(T0 + 3 * T));
    }

    #[test]
    fn an_idle_window_holds_no_heap_memory() {
        let mut w: Window<String> = Window::new(WindowConfig::default());
        assert_eq!(w.unacked.capacity(), 0, "fresh window allocated");
        for i in 1..=100 {
            w.push(msg(i), T0).unwrap();
        }
        assert!(w.unacked.capacity() >= 100);
        w.ack(99).unwrap();
        assert!(w.unacked.capacity() > 0, "still one in flight");
        w.ack(100).unwrap();
        assert_eq!(w.unacked.capacity(), 0, "emptied by ack but memory kept");
    }

    use crate::test_rng::Rng;

    /// Differential test against a naive model: a Vec of (seq, msg, deadline, retries),
    /// scanned linearly for everything.
    #[test]
    fn differential_against_naive_model() {
        const SEED: u64 = 0x9E37_79B9_7F4A_7C15;
        const OPS: usize = 50_000;
        let c = WindowConfig {
            capacity: 12,
            ack_timeout_ms: 100,
            max_retransmits: 3,
        };
        let mut rng = Rng(SEED);
        let mut w: Window<u64> = Window::new(c);
        let mut model: Vec<(u64, u64, u64, u8)> = Vec::new();
        let mut last_seq = 0u64;
        let mut now = 0u64;
        // pushed, refused, acked, ahead, resent, expired
        let mut counts = [0usize; 6];
        for op in 0..OPS {
            let kind = rng.below(10);
            if (6..=8).contains(&kind) {
                now += rng.below(60);
            }
            let ctx = || format!("seed {SEED:#x}, op {op}, now {now}");
            match kind {
                0..=3 => {
                    let m = rng.next();
                    let got = w.push(m, now);
                    if model.len() >= c.capacity as usize {
                        assert_eq!(got, Err(m), "{}", ctx());
                        counts[1] += 1;
                    } else {
                        counts[0] += 1;
                        last_seq += 1;
                        assert_eq!(got, Ok(last_seq), "{}", ctx());
                        model.push((last_seq, m, now + c.ack_timeout_ms, 0));
                    }
                }
                // Acks, except in one phase of three where the client is silent long
                // enough for messages to expire.
                4..=5 if (op / 2_000) % 3 != 2 => {
                    let acked = last_seq - model.len() as u64;
                    let upto = acked.saturating_sub(2) + rng.below(model.len() as u64 + 4);
                    let got = w.ack(upto);
                    if upto > last_seq {
                        assert_eq!(
                            got,
                            Err(AckError::Ahead {
                                upto,
                                last: last_seq
                            }),
                            "{}",
                            ctx()
                        );
                        counts[3] += 1;
                    } else {
                        let split = model.iter().take_while(|e| e.0 <= upto).count();
                        let want: Vec<u64> = model.drain(..split).map(|e| e.1).collect();
                        counts[2] += want.len();
                        assert_eq!(got, Ok(want), "{}", ctx());
                    }
                }
                6..=8 => {
                    let mut got = Vec::new();
                    let state = w.poll(now, |seq, &m| got.push((seq, m)));
                    let expired = model.iter().any(|e| e.2 <= now && e.3 >= c.max_retransmits);
                    let mut want = Vec::new();
                    if !expired {
                        for e in model.iter_mut().filter(|e| e.2 <= now) {
                            e.3 += 1;
                            e.2 = now + (c.ack_timeout_ms << e.3);
                            want.push((e.0, e.1));
                        }
                    }
                    let want_state = if expired {
                        WindowState::Expired
                    } else {
                        WindowState::Alive
                    };
                    counts[4] += want.len();
                    assert_eq!((state, got), (want_state, want), "{}", ctx());
                    if expired {
                        counts[5] += 1;
                        let want: Vec<(u64, u64)> = model.drain(..).map(|e| (e.0, e.1)).collect();
                        assert_eq!(w.drain(), want, "{}", ctx());
                    }
                }
                _ => {
                    if rng.below(50) == 0 {
                        let want: Vec<(u64, u64)> = model.drain(..).map(|e| (e.0, e.1)).collect();
                        assert_eq!(w.drain(), want, "{}", ctx());
                    }
                }
            }
            assert_eq!(w.len(), model.len(), "{}", ctx());
            assert_eq!(w.last_seq(), last_seq, "{}", ctx());
            assert_eq!(
                w.next_deadline(),
                model.iter().map(|e| e.2).min(),
                "{}",
                ctx()
            );
            assert_eq!(
                w.retrying as usize,
                model.iter().filter(|e| e.3 > 0).count(),
                "{}",
                ctx()
            );
        }
        println!(
            "seed {SEED:#x}: pushed {}, refused {}, acked {}, ahead {}, resent {}, expired {}",
            counts[0], counts[1], counts[2], counts[3], counts[4], counts[5]
        );
        assert!(
            counts.iter().all(|&c| c > 0),
            "an event never happened: {counts:?}"
        );
    }
}
