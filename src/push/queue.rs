//! The push worker's queue, sans I/O: items wait `delay_ms` (an ack meanwhile cancels them),
//! leave in batches of at most `batch_max`, and a batch that failed goes back to the front
//! and is retried after an exponential backoff with jitter. Time (`now`, in ms) and the
//! jitter are passed in, so the rules are tested without a clock or a socket.

use std::collections::{HashSet, VecDeque};

use super::PushItem;

/// First retry after a failed POST (before jitter), the factor, and the cap.
pub const BACKOFF_START_MS: u64 = 500;
pub const BACKOFF_FACTOR: u64 = 2;
pub const BACKOFF_CAP_MS: u64 = 30_000;

/// Exponential backoff with "equal jitter": the n-th consecutive failure waits a uniform
/// amount in [d/2, d] where d = min(cap, start * 2^(n-1)), so nodes that failed together do
/// not retry together, and the wait still grows.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The wait after one more failure; `jitter` in [0, 1).
    pub fn fail(&mut self, jitter: f64) -> u64 {
        let exp = BACKOFF_FACTOR.saturating_pow(self.failures.min(32));
        let d = BACKOFF_START_MS.saturating_mul(exp).min(BACKOFF_CAP_MS);
        self.failures = self.failures.saturating_add(1);
        d / 2 + ((d / 2) as f64 * jitter.clamp(0.0, 1.0)) as u64
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// What the worker does next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// POST these (taken out of the queue: give them back with [`PushQueue::failed`]).
    Send(Vec<PushItem>),
    /// Nothing due before this time (ms).
    WaitUntil(u64),
    /// Empty.
    Idle,
}

pub struct PushQueue {
    /// Oldest first, with the time each becomes due.
    items: VecDeque<(u64, PushItem)>,
    /// Cancels for ids not in the queue: the item may be in flight (a failed batch comes back)
    /// or not taken in yet. Cleared when it grows past `forget_after` (a late cancel is then
    /// lost: the push goes out, which at-least-once allows).
    cancelled: HashSet<u64>,
    forget_after: usize,
    delay_ms: u64,
    batch_max: usize,
    backoff: Backoff,
    retry_at: Option<u64>,
}

impl PushQueue {
    pub fn new(delay_ms: u64, batch_max: usize, forget_after: usize) -> Self {
        PushQueue {
            items: VecDeque::new(),
            cancelled: HashSet::new(),
            forget_after: forget_after.max(16),
            delay_ms,
            batch_max: batch_max.max(1),
            backoff: Backoff::default(),
            retry_at: None,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Consecutive failed POSTs so far (0 after a success).
    pub fn failures(&self) -> u32 {
        self.backoff.failures()
    }

    /// Take an item in at `now`; false (and dropped) when its cancel came first.
    pub fn add(&mut self, item: PushItem, now: u64) -> bool {
        if self.cancelled.remove(&item.id) {
            return false;
        }
        self.items.push_back((now + self.delay_ms, item));
        true
    }

    /// The message `id` was acked: true when a waiting item was removed.
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(at) = self.items.iter().position(|(_, i)| i.id == id) {
            self.items.remove(at);
            return true;
        }
        if self.cancelled.len() >= self.forget_after {
            self.cancelled.clear();
        }
        self.cancelled.insert(id);
        false
    }

    /// Remove items `keep` refuses (their inbox entry is gone); returns how many went.
    pub fn drop_where(&mut self, mut gone: impl FnMut(&PushItem) -> bool) -> usize {
        let before = self.items.len();
        self.items.retain(|(_, i)| !gone(i));
        before - self.items.len()
    }

    /// The next step at `now`. `flush`: ignore the delay (shutting down).
    pub fn next(&mut self, now: u64, flush: bool) -> Next {
        let Some((due, _)) = self.items.front() else {
            return Next::Idle;
        };
        let mut at = if flush { now } else { *due };
        if let Some(retry) = self.retry_at {
            at = at.max(retry);
        }
        if at > now {
            return Next::WaitUntil(at);
        }
        let mut batch = Vec::with_capacity(self.batch_max.min(self.items.len()));
        while batch.len() < self.batch_max {
            match self.items.front() {
                Some((due, _)) if flush || *due <= now => {
                    batch.push(self.items.pop_front().expect("front exists").1)
                }
                _ => break,
            }
        }
        Next::Send(batch)
    }

    /// The batch was delivered (2xx).
    pub fn sent(&mut self) {
        self.backoff.reset();
        self.retry_at = None;
    }

    /// The batch failed at `now`: back to the front, in order, less what was cancelled while
    /// it was out; the next try waits the backoff. Returns (the wait, items cancelled).
    pub fn failed(&mut self, batch: Vec<PushItem>, now: u64, jitter: f64) -> (u64, usize) {
        let mut cancelled = 0;
        for item in batch.into_iter().rev() {
            if self.cancelled.remove(&item.id) {
                cancelled += 1;
                continue;
            }
            self.items.push_front((now, item));
        }
        let wait = self.backoff.fail(jitter);
        self.retry_at = Some(now + wait);
        (wait, cancelled)
    }

    /// Everything still queued (shutdown: counted as lost).
    pub fn clear(&mut self) -> usize {
        let n = self.items.len();
        self.items.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::push::test_item as item;

    fn ids(next: Next) -> Vec<u64> {
        match next {
            Next::Send(b) => b.iter().map(|i| i.id).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_from_500_ms_to_30_s_with_jitter_in_the_upper_half() {
        let mut b = Backoff::default();
        let full: Vec<u64> = (0..10).map(|_| b.fail(1.0)).collect();
        assert_eq!(
            full,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]
        );
        let mut b = Backoff::default();
        assert_eq!(b.fail(0.0), 250);
        assert_eq!(b.fail(0.5), 750);
        b.reset();
        assert_eq!(b.fail(0.0), 250);
        // Many failures never overflow.
        let mut b = Backoff::default();
        for _ in 0..200 {
            assert!(b.fail(0.99) <= BACKOFF_CAP_MS);
        }
    }

    #[test]
    fn items_wait_the_delay_then_leave_in_batches_in_order() {
        let mut q = PushQueue::new(1000, 2, 100);
        assert_eq!(q.next(0, false), Next::Idle);
        q.add(item(1), 0);
        q.add(item(2), 10);
        q.add(item(3), 20);
        q.add(item(4), 2000);
        assert_eq!(q.next(500, false), Next::WaitUntil(1000));
        assert_eq!(ids(q.next(1015, false)), [1, 2]);
        q.sent();
        assert_eq!(q.next(1015, false), Next::WaitUntil(1020));
        // Item 4 is not due: a batch takes only due items.
        assert_eq!(ids(q.next(1500, false)), [3]);
        q.sent();
        // Shutting down: no more waiting.
        assert_eq!(ids(q.next(1500, true)), [4]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_failed_batch_comes_back_first_after_the_backoff() {
        let mut q = PushQueue::new(0, 10, 100);
        q.add(item(1), 0);
        q.add(item(2), 0);
        let batch = match q.next(0, false) {
            Next::Send(b) => b,
            other => panic!("{other:?}"),
        };
        q.add(item(3), 1);
        assert_eq!(q.failed(batch, 1, 0.0), (250, 0));
        assert_eq!(q.next(100, false), Next::WaitUntil(251));
        let batch = match q.next(251, false) {
            Next::Send(b) => b,
            other => panic!("{other:?}"),
        };
        assert_eq!(batch.iter().map(|i| i.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(q.failed(batch, 251, 0.0).0, 500);
        assert_eq!(q.failures(), 2);
        assert_eq!(ids(q.next(751, false)), [1, 2, 3]);
        q.sent();
        assert_eq!(q.failures(), 0);
    }

    #[test]
    fn cancels_remove_waiting_items_in_flight_ones_and_early_ones() {
        let mut q = PushQueue::new(1000, 10, 100);
        q.add(item(1), 0);
        q.add(item(2), 0);
        assert!(q.cancel(1));
        // Cancel before the item arrives.
        assert!(!q.cancel(9));
        assert!(!q.add(item(9), 0));
        let batch = match q.next(1000, false) {
            Next::Send(b) => b,
            other => panic!("{other:?}"),
        };
        // Cancelled while its POST was out, which then failed: not retried.
        assert!(!q.cancel(2));
        assert_eq!(q.failed(batch, 1000, 0.0).1, 1);
        assert!(q.is_empty());
        q.add(item(5), 0);
        assert_eq!(q.drop_where(|i| i.id == 5), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn the_early_cancel_set_is_bounded() {
        let mut q = PushQueue::new(0, 10, 16);
        for id in 0..100 {
            q.cancel(id);
        }
        assert!(q.cancelled.len() <= 16);
    }
}
