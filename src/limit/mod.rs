//! Rate limits (SPEC section 4, "Limits"): token buckets, pure, with time passed in.
//!
//! A bucket is kept as its *debt*: the refill time, in microseconds, still owed before it is
//! full again (the generic cell rate algorithm: a token bucket stored in one number). Taking a
//! token adds one refill interval; the take is refused when the debt would pass the burst.
//! A full bucket is a debt of zero, so a bucket nobody uses costs nothing to forget.
//!
//! Who owns which bucket:
//! - per source IP (new connections per second, open connections): [`ip::IpLimits`], shared by
//!   the shards because the kernel spreads one address's connections over all of them;
//! - per connection (frames per second): a `u32` debt inside the connection;
//! - per user (`send` and `publish` per second across the user's devices): [`UserBuckets`] on
//!   the user's home shard, exact because every device of a user lives there.

pub mod ip;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

/// What a `rate_limited` answer was over (the `limit` label of its counter). Upgrades refused
/// by the per-address limits are counted with the other upgrade refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Frames per connection.
    Frames,
    /// `send` + `publish` per user.
    Sends,
}

impl Limited {
    pub const ALL: [Limited; 2] = [Limited::Frames, Limited::Sends];

    pub fn label(self) -> &'static str {
        match self {
            Limited::Frames => "frames",
            Limited::Sends => "sends",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// `per_second` tokens refill each second, up to `burst`. `None` from [`Rate::new`] = no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Refill time of one token.
    interval_us: u64,
    /// Debt of an empty bucket: `burst` tokens' refill time.
    burst_us: u64,
}

impl Rate {
    /// A rate of 0 means unlimited; a burst below 1 counts as 1.
    pub fn new(per_second: u32, burst: u32) -> Option<Rate> {
        if per_second == 0 {
            return None;
        }
        let interval_us = (1_000_000 / u64::from(per_second)).max(1);
        Some(Rate {
            interval_us,
            burst_us: interval_us * u64::from(burst.max(1)),
        })
    }

    pub fn interval_us(&self) -> u64 {
        self.interval_us
    }

    pub fn burst_us(&self) -> u64 {
        self.burst_us
    }

    /// Take one token from a bucket whose debt is `debt_us` now: the new debt, or the
    /// milliseconds until a token will be there (at least 1). A refused take changes nothing.
    pub fn take(&self, debt_us: u64) -> Result<u64, u64> {
        let after = debt_us.saturating_add(self.interval_us);
        if after <= self.burst_us {
            Ok(after)
        } else {
            Err((after - self.burst_us).div_ceil(1000).max(1))
        }
    }
}

/// A bucket in a table, as the instant (µs on the shards' shared monotonic clock) at which
/// its debt is paid off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    paid_at_us: u64,
}

impl Bucket {
    pub fn take(&mut self, now_us: u64, rate: Rate) -> Result<(), u64> {
        let debt = self.paid_at_us.saturating_sub(now_us);
        self.paid_at_us = now_us + rate.take(debt)?;
        Ok(())
    }

    /// Full again: the table may forget it.
    pub fn is_full(&self, now_us: u64) -> bool {
        self.paid_at_us <= now_us
    }
}

/// Per-user `send`/`publish` buckets of one shard, keyed by a keyed hash of the user id (two
/// ids sharing a 64-bit hash would share a bucket; with a per-process random key that is not
/// something a client can arrange). Only users who sent recently have an entry: [`sweep`]
/// forgets full buckets.
///
/// [`sweep`]: UserBuckets::sweep
#[derive(Debug, Default)]
pub struct UserBuckets {
    hasher: RandomState,
    buckets: HashMap<u64, Bucket>,
}

impl UserBuckets {
    pub fn take(&mut self, user: &str, now_ms: u64, rate: Rate) -> Result<(), u64> {
        let key = self.hasher.hash_one(user);
        self.buckets
            .entry(key)
            .or_default()
            .take(now_ms * 1000, rate)
    }

    /// Forget the buckets that are full again (called from the shard's tick).
    pub fn sweep(&mut self, now_ms: u64) {
        self.buckets.retain(|_, b| !b.is_full(now_ms * 1000));
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_at_once_then_its_rate() {
        let rate = Rate::new(10, 5).unwrap();
        let mut b = Bucket::default();
        let t0 = 1_000_000;
        for i in 0..5 {
            assert_eq!(b.take(t0, rate), Ok(()), "token {i} of the burst");
        }
        // Empty: the next token is 100 ms away.
        assert_eq!(b.take(t0, rate), Err(100));
        assert_eq!(b.take(t0 + 60_000, rate), Err(40));
        // A refused take costs nothing: at +100 ms exactly one token is back.
        assert_eq!(b.take(t0 + 100_000, rate), Ok(()));
        assert_eq!(b.take(t0 + 100_000, rate), Err(100));
        // After a quiet second the whole burst is back, never more.
        let later = t0 + 2_000_000;
        assert!(b.is_full(later));
        for _ in 0..5 {
            assert_eq!(b.take(later, rate), Ok(()));
        }
        assert!(b.take(later, rate).is_err());
    }

    #[test]
    fn a_zero_rate_is_no_limit_and_a_zero_burst_is_one() {
        assert_eq!(Rate::new(0, 100), None);
        let one = Rate::new(1, 0).unwrap();
        assert_eq!(one.take(0), Ok(1_000_000));
        assert_eq!(one.take(1_000_000), Err(1000));
    }

    #[test]
    fn over_a_long_run_a_bucket_passes_its_rate_plus_its_burst() {
        // A client asking every millisecond for 10 s gets 10 s x 50/s + the burst of 20.
        let rate = Rate::new(50, 20).unwrap();
        let mut b = Bucket::default();
        let passed = (0..10_000u64)
            .filter(|ms| b.take(ms * 1000, rate).is_ok())
            .count();
        assert!((519..=521).contains(&passed), "{passed}");
    }

    #[test]
    fn user_buckets_are_per_user_and_forgotten_once_full() {
        let rate = Rate::new(1, 2).unwrap();
        let mut users = UserBuckets::default();
        assert!(users.take("ann", 0, rate).is_ok());
        assert!(users.take("ann", 0, rate).is_ok());
        assert_eq!(users.take("ann", 0, rate), Err(1000));
        assert!(users.take("bob", 0, rate).is_ok(), "bob has his own bucket");
        users.sweep(1_000);
        assert_eq!(users.len(), 1, "bob's bucket is full again, ann's is not");
        users.sweep(2_000);
        assert!(users.is_empty());
        // Forgetting a full bucket loses nothing: ann gets her burst again.
        assert!(users.take("ann", 2_000, rate).is_ok());
        assert!(users.take("ann", 2_000, rate).is_ok());
        assert!(users.take("ann", 2_000, rate).is_err());
    }
}
