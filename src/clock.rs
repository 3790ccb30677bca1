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
    fn monotonic_clock_does_not_go_back() {
        let c = MonotonicClock::new();
        let a = c.now_ms();
        assert!(c.now_ms() >= a);
    }
}
