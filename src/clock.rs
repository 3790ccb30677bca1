//! Time, injected. Shards read a [`Clock`]; tests use [`ManualClock`] and step it.
//! Milliseconds since the clock's origin: small integers that the wheel turns into ticks.

use std::cell::Cell;
use std::time::Instant;

pub trait Clock {
    /// Monotonic milliseconds since this clock's origin.
    fn now_ms(&self) -> u64;
    /// Monotonic microseconds since the origin, for latency histograms (send -> accepted).
    fn now_us(&self) -> u64 {
        self.now_ms() * 1000
    }
    /// Milliseconds since the Unix epoch: message timestamps and ids. Read through the clock
    /// so that a simulation replays the same ids from the same seed.
    fn wall_ms(&self) -> u64;
    /// A turn of the shard's loop begins: a clock that keeps its readings for a turn
    /// ([`TurnClock`]) reads afresh from now on. The I/O glue calls it on every way into the
    /// shard (a driver turn, a socket task's poll, a bell, the tick).
    fn new_turn(&self) {}
}

/// The real monotonic clock, origin at construction.
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        Self::with_origin(Instant::now())
    }

    /// Shards of one process share an origin, so a connection handed from one shard to
    /// another keeps meaningful timestamps.
    pub fn with_origin(origin: Instant) -> Self {
        MonotonicClock { origin }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }
    fn wall_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// The shard's clock in production: `inner` read at most once per turn of the shard's loop
/// for each of its two clocks, however many sends, answers and deadlines the turn handles
/// (a read is ~30 ns on this VM, and a send read both clocks several times on its way:
/// ~0.5 us of ~5 us per message at send 100 x 16, docs/performance.md). What a turn handles
/// is stamped with the turn's start, so a reading is never later than the truth: a deadline
/// set in a turn is early by at most the turn's length (one uring turn handles every waiting
/// completion, so in an accept storm that can be tens of milliseconds), and the send ->
/// accepted histogram counts a send answered in the turn that took it (the embedded store's
/// usual case) as 0. Past 512 ids in one turn a shard's ids borrow the next millisecond, as
/// `MessageIds::next` does on any overflow.
pub struct TurnClock<C> {
    inner: C,
    mono_us: Cell<Option<u64>>,
    wall_ms: Cell<Option<u64>>,
}

impl<C: Clock> TurnClock<C> {
    pub fn new(inner: C) -> Self {
        TurnClock {
            inner,
            mono_us: Cell::new(None),
            wall_ms: Cell::new(None),
        }
    }
}

fn kept(cell: &Cell<Option<u64>>, read: impl FnOnce() -> u64) -> u64 {
    cell.get().unwrap_or_else(|| {
        let value = read();
        cell.set(Some(value));
        value
    })
}

impl<C: Clock> Clock for TurnClock<C> {
    fn now_ms(&self) -> u64 {
        self.now_us() / 1000
    }
    fn now_us(&self) -> u64 {
        kept(&self.mono_us, || self.inner.now_us())
    }
    fn wall_ms(&self) -> u64 {
        kept(&self.wall_ms, || self.inner.wall_ms())
    }
    fn new_turn(&self) {
        self.mono_us.set(None);
        self.wall_ms.set(None);
        self.inner.new_turn();
    }
}

/// A clock that only moves when told to. Its wall time is [`ManualClock::WALL_ORIGIN_MS`]
/// plus its monotonic time, so both move together and neither depends on the host.
#[derive(Default)]
pub struct ManualClock {
    now: Cell<u64>,
}

impl ManualClock {
    /// 2026-01-01T00:00:00Z: a fixed, plausible wall time at the manual clock's zero.
    pub const WALL_ORIGIN_MS: u64 = 1_767_225_600_000;

    pub fn new(start_ms: u64) -> Self {
        ManualClock {
            now: Cell::new(start_ms),
        }
    }
    pub fn advance(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }
    pub fn set(&self, ms: u64) {
        self.now.set(ms);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now.get()
    }
    fn wall_ms(&self) -> u64 {
        Self::WALL_ORIGIN_MS + self.now.get()
    }
}

/// A shared clock: a test keeps one handle to step the time a shard reads through another.
impl<C: Clock> Clock for std::rc::Rc<C> {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
    fn now_us(&self) -> u64 {
        (**self).now_us()
    }
    fn wall_ms(&self) -> u64 {
        (**self).wall_ms()
    }
    fn new_turn(&self) {
        (**self).new_turn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(5);
        assert_eq!(c.now_ms(), 5);
        c.advance(10);
        assert_eq!(c.now_ms(), 15);
        c.set(100);
        assert_eq!(c.now_ms(), 100);
        assert_eq!(c.wall_ms(), ManualClock::WALL_ORIGIN_MS + 100);
    }

    #[test]
    fn a_turn_clock_keeps_its_readings_until_the_next_turn() {
        let inner = std::rc::Rc::new(ManualClock::new(5));
        let c = TurnClock::new(inner.clone());
        assert_eq!((c.now_ms(), c.now_us()), (5, 5_000));
        assert_eq!(c.wall_ms(), ManualClock::WALL_ORIGIN_MS + 5);
        inner.advance(10);
        assert_eq!((c.now_ms(), c.now_us()), (5, 5_000), "the turn's reading");
        assert_eq!(c.wall_ms(), ManualClock::WALL_ORIGIN_MS + 5);
        c.new_turn();
        assert_eq!((c.now_ms(), c.now_us()), (15, 15_000));
        assert_eq!(c.wall_ms(), ManualClock::WALL_ORIGIN_MS + 15);
        // Each clock is read when first asked in a turn, not when the turn begins.
        c.new_turn();
        inner.advance(1);
        assert_eq!(c.now_ms(), 16);
    }

    #[test]
    fn monotonic_clock_does_not_go_back() {
        let c = MonotonicClock::new();
        let a = c.now_ms();
        assert!(c.now_ms() >= a);
    }
}
