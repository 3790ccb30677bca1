//! Hashed timing wheel holding every deadline of one shard (heartbeats, handshake timeouts,
//! ack timeouts) for up to ~1,000,000 connections.
//!
//! # What it owns
//! One [`TimingWheel`] owns all pending entries of a shard: their values, their deadlines and
//! the list links. Time is injected as integer ticks through [`TimingWheel::advance`]; the
//! wheel never reads a clock, which keeps it deterministic and trivially testable.
//!
//! # How it works
//! * Entries live in a single arena (`Vec<Entry<T>>`) with an intrusive free list, so a freed
//!   entry is reused by the next insert and the steady state allocates nothing.
//! * The wheel has `slots` buckets (a power of two, so `tick & mask` picks the bucket). A bucket
//!   is the head of an intrusive doubly linked list of arena indices (`u32`, `NIL` = `u32::MAX`),
//!   which makes cancel an O(1) unlink. An entry whose deadline is `slots` or more ticks away
//!   simply waits in its bucket for later rounds; it is compared against the exact deadline.
//! * One extra list, the *overdue* list, holds entries inserted with a deadline `<=` the current
//!   tick. Its deadlines are all `<=` current while every bucket entry is `>` current, so firing
//!   the overdue list first (sorted) keeps global deadline order. That same invariant tells
//!   `remove` which list head to patch without storing a bucket index per entry.
//!
//! # Complexity
//! * `insert`, `cancel`, `deadline`: O(1).
//! * `advance` by `d < slots` ticks: O(d + entries in the visited buckets + k log k) where `k`
//!   is the number of overdue entries (usually tiny).
//! * `advance` by `d >= slots` ticks (long jump, e.g. after a stall): each bucket is visited
//!   exactly once, O(slots + len + f log f) with `f` the fired entries, which are sorted so
//!   the deadline-order guarantee still holds. There is never an O(d) loop.
//! * Memory: `size_of::<Entry<T>>()` per entry (deadline, 3 × `u32`, `Option<T>`), e.g. 40 bytes
//!   for `T = u64` and 32 bytes for `T = u32` or a niche-carrying `T`, plus 4 bytes per bucket.
//!
//! # Why keys carry a generation
//! Arena entries are reused. A connection task may keep a [`TimerKey`] after its entry fired or
//! was cancelled; without a check, cancelling that old key would silently remove whichever new
//! timer now occupies the same index. Every removal bumps the entry's generation and a key is
//! only honoured when its generation matches, so stale keys get `None` and never touch a newer
//! entry. (The generation is a wrapping `u32`: a stale key could alias only after the very same
//! index was reused 2^32 times while the key was held.)

use std::fmt;
use std::num::NonZeroU32;

/// Sentinel "no entry" index for list links and the free list.
const NIL: u32 = u32::MAX;

/// Handle to a scheduled entry. Carries a generation so that a key kept after its entry fired or was
/// cancelled (and the slot reused) can never cancel or observe a different, newer entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    /// Never 0: `Option<TimerKey>` then takes 8 bytes, not 12 (one per connection's slab slot).
    generation: NonZeroU32,
}

#[cfg(test)]
#[test]
fn an_optional_key_takes_no_more_than_a_key() {
    assert_eq!(std::mem::size_of::<Option<TimerKey>>(), 8);
}

/// Bytes one scheduled value of type `T` takes in the wheel's arena.
#[cfg(test)]
pub(crate) fn entry_size<T>() -> usize {
    std::mem::size_of::<Entry<T>>()
}

/// One arena cell. Occupied iff `value.is_some()`.
struct Entry<T> {
    deadline: u64,
    // Occupied: neighbours in its list (`prev == NIL` means "I am the list head").
    // Vacant: `next` links the free list, `prev` is unused.
    prev: u32,
    next: u32,
    // Bumped on every removal so outstanding keys to this cell go stale.
    generation: NonZeroU32,
    value: Option<T>,
}

/// Hashed timing wheel; see the module documentation.
pub struct TimingWheel<T> {
    entries: Vec<Entry<T>>,
    free_head: u32,
    // heads[0..slots] are the buckets, heads[slots] is the overdue list.
    heads: Box<[u32]>,
    mask: u64,
    current: u64,
    len: usize,
    // Reused buffer of (deadline, index) for the sorted firing paths, so advance does not
    // allocate in steady state either.
    scratch: Vec<(u64, u32)>,
}

impl<T> TimingWheel<T> {
    /// `slots` must be a power of two (panic otherwise, with a clear message); `start_tick` is the current tick.
    pub fn new(slots: usize, start_tick: u64) -> Self {
        Self::with_capacity(slots, start_tick, 0)
    }

    /// Like [`TimingWheel::new`], but pre-sizes the arena for `capacity` entries so a shard that
    /// knows its connection limit never reallocates the arena.
    pub fn with_capacity(slots: usize, start_tick: u64, capacity: usize) -> Self {
        assert!(
            slots.is_power_of_two(),
            "TimingWheel::new: `slots` must be a power of two, got {slots}"
        );
        assert!(
            slots < u32::MAX as usize,
            "TimingWheel::new: `slots` must be below u32::MAX, got {slots}"
        );
        TimingWheel {
            entries: Vec::with_capacity(capacity),
            free_head: NIL,
            heads: vec![NIL; slots + 1].into_boxed_slice(),
            mask: slots as u64 - 1,
            current: start_tick,
            len: 0,
            scratch: Vec::new(),
        }
    }

    /// Schedule `value` to fire at absolute tick `deadline`. A deadline <= the current tick fires on the next `advance`.
    ///
    /// ("Next" means the next call with `now >= current_tick()`; a backwards `advance` is a no-op.)
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerKey {
        let list = self.list_of(deadline);
        let head = self.heads[list];
        let index = if self.free_head != NIL {
            // Reuse a freed cell: no allocation in steady state.
            let index = self.free_head;
            let e = &mut self.entries[index as usize];
            self.free_head = e.next;
            e.deadline = deadline;
            e.prev = NIL;
            e.next = head;
            e.value = Some(value);
            index
        } else {
            let index = u32::try_from(self.entries.len())
                .ok()
                .filter(|&i| i != NIL)
                .expect("TimingWheel: more than u32::MAX - 1 pending entries");
            self.entries.push(Entry {
                deadline,
                prev: NIL,
                next: head,
                generation: NonZeroU32::MIN,
                value: Some(value),
            });
            index
        };
        if head != NIL {
            self.entries[head as usize].prev = index;
        }
        self.heads[list] = index;
        self.len += 1;
        TimerKey {
            index,
            generation: self.entries[index as usize].generation,
        }
    }

    /// Remove a pending entry; None when the key is stale (already fired, cancelled, or slot reused).
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        self.get(key)?;
        Some(self.remove(key.index))
    }

    /// Move the wheel's time to `now` (monotonic; a `now` earlier than the current tick is a no-op) and call
    /// `fire(key, value)` for every entry whose deadline <= now, in deadline order across ticks
    /// (entries of the same tick: any order). Entries scheduled for later rounds of the same slot stay.
    /// When now - current >= slots, each slot is visited at most once per call (no O(ticks) loop for a long jump).
    ///
    /// `fire` cannot touch the wheel (it is mutably borrowed for the whole call). Callers that
    /// need to reschedule (e.g. the next heartbeat) collect what fired into a buffer and
    /// `insert` again after `advance` returns. The entry is already removed when `fire` runs,
    /// so the key passed to it is stale from that point on. If `fire` panics, the entries not
    /// yet fired stay pending and consistent.
    pub fn advance(&mut self, now: u64, mut fire: impl FnMut(TimerKey, T)) {
        if now < self.current {
            return;
        }
        if self.len == 0 {
            // Nothing can fire; skip the tick walk entirely.
            self.current = now;
            return;
        }
        // Taken out of `self` so `remove` can borrow `self` mutably while we iterate.
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let slots = self.heads.len() as u64 - 1;
        if now - self.current >= slots {
            // Long jump: one pass over every list, then fire in deadline order. `current` stays
            // at its old value until the end so `remove` still finds each entry's list.
            for list in 0..self.heads.len() {
                self.collect_due(list, now, &mut scratch);
            }
            self.fire_sorted(&mut scratch, &mut fire);
            self.current = now;
        } else {
            // Overdue deadlines are all <= current < every bucket deadline: fire them first.
            self.collect_due(self.heads.len() - 1, now, &mut scratch);
            self.fire_sorted(&mut scratch, &mut fire);
            let mut t = self.current;
            while t < now && self.len > 0 {
                t += 1;
                let mut i = self.heads[(t & self.mask) as usize];
                while i != NIL {
                    let e = &self.entries[i as usize];
                    let next = e.next;
                    // Bucket entries all have deadline >= t (invariant: > current == t - 1),
                    // so only `== t` is due; the rest wait for a later round.
                    if e.deadline == t {
                        let generation = e.generation;
                        let value = self.remove(i);
                        fire(
                            TimerKey {
                                index: i,
                                generation,
                            },
                            value,
                        );
                    }
                    i = next;
                }
                // Only now, so a panic in `fire` mid-bucket leaves the invariant intact.
                self.current = t;
            }
            self.current = now;
        }
        self.scratch = scratch;
    }

    /// Entries the arena holds without moving.
    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Number of pending entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tick the wheel has advanced to.
    pub fn current_tick(&self) -> u64 {
        self.current
    }

    /// Deadline of the pending entry, None when stale.
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        self.get(key).map(|e| e.deadline)
    }

    /// The occupied entry `key` refers to, if the key is still current.
    fn get(&self, key: TimerKey) -> Option<&Entry<T>> {
        self.entries
            .get(key.index as usize)
            .filter(|e| e.generation == key.generation && e.value.is_some())
    }

    /// Which list an entry with `deadline` lives in. Valid between public calls and, inside
    /// `advance`, for every entry not yet fired (see the invariant in the module docs).
    fn list_of(&self, deadline: u64) -> usize {
        if deadline <= self.current {
            self.heads.len() - 1
        } else {
            (deadline & self.mask) as usize
        }
    }

    /// Push `(deadline, index)` of every entry in `list` with deadline <= now. Does not unlink,
    /// so the wheel stays consistent until each entry is actually fired.
    fn collect_due(&self, list: usize, now: u64, out: &mut Vec<(u64, u32)>) {
        let mut i = self.heads[list];
        while i != NIL {
            let e = &self.entries[i as usize];
            if e.deadline <= now {
                out.push((e.deadline, i));
            }
            i = e.next;
        }
    }

    /// Fire the collected entries in deadline order (ties: any order).
    fn fire_sorted(&mut self, due: &mut [(u64, u32)], fire: &mut impl FnMut(TimerKey, T)) {
        due.sort_unstable_by_key(|&(deadline, _)| deadline);
        for &(_, index) in due.iter() {
            let generation = self.entries[index as usize].generation;
            let value = self.remove(index);
            fire(TimerKey { index, generation }, value);
        }
    }

    /// Unlink an occupied entry from its list, retire its generation, free the cell and
    /// return the value.
    fn remove(&mut self, index: u32) -> T {
        let (prev, next, deadline) = {
            let e = &self.entries[index as usize];
            (e.prev, e.next, e.deadline)
        };
        if prev == NIL {
            let list = self.list_of(deadline);
            debug_assert_eq!(self.heads[list], index, "list head invariant broken");
            self.heads[list] = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        let e = &mut self.entries[index as usize];
        e.generation =
            NonZeroU32::new(e.generation.get().wrapping_add(1)).unwrap_or(NonZeroU32::MIN);
        e.prev = NIL;
        e.next = self.free_head;
        self.free_head = index;
        self.len -= 1;
        e.value.take().expect("remove called on a vacant entry")
    }
}

impl<T> fmt::Debug for TimingWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimingWheel")
            .field("slots", &(self.heads.len() - 1))
            .field("current_tick", &self.current)
            .field("len", &self.len)
            .field("arena_cells", &self.entries.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    /// Advance and return what fired, in firing order.
    fn drain<T>(w: &mut TimingWheel<T>, now: u64) -> Vec<(TimerKey, T)> {
        let mut out = Vec::new();
        w.advance(now, |k, v| out.push((k, v)));
        out
    }

    fn values<T: Copy>(fired: &[(TimerKey, T)]) -> Vec<T> {
        fired.iter().map(|&(_, v)| v).collect()
    }

    #[test]
    fn entry_size() {
        // Printed so the per-entry overhead is visible with `--nocapture`.
        let sizes = [
            ("()", std::mem::size_of::<Entry<()>>()),
            ("u32", std::mem::size_of::<Entry<u32>>()),
            ("u64", std::mem::size_of::<Entry<u64>>()),
            (
                "NonZeroU64",
                std::mem::size_of::<Entry<std::num::NonZeroU64>>(),
            ),
            ("(u32, u32)", std::mem::size_of::<Entry<(u32, u32)>>()),
        ];
        for (name, size) in sizes {
            println!("size_of::<Entry<{name}>>() = {size}");
        }
        assert!(std::mem::size_of::<Entry<u64>>() <= 32 + 8);
        assert!(std::mem::size_of::<Entry<u32>>() <= 32 + 4);
        assert!(std::mem::size_of::<Entry<std::num::NonZeroU64>>() <= 32);
    }

    #[test]
    fn fires_at_exact_tick_not_before() {
        let mut w = TimingWheel::new(8, 100);
        let k = w.insert(105, "a");
        assert_eq!(w.deadline(k), Some(105));
        for now in 101..105 {
            assert!(drain(&mut w, now).is_empty(), "fired early at {now}");
        }
        let fired = drain(&mut w, 105);
        assert_eq!(fired, vec![(k, "a")]);
        assert!(w.is_empty());
        assert_eq!(w.current_tick(), 105);
    }

    #[test]
    fn fires_when_step_jumps_over_deadline() {
        let mut w = TimingWheel::new(8, 0);
        w.insert(3, 3u32);
        w.insert(5, 5u32);
        w.insert(9, 9u32);
        assert_eq!(values(&drain(&mut w, 6)), vec![3, 5]);
        assert_eq!(values(&drain(&mut w, 9)), vec![9]);
    }

    #[test]
    fn cancel_prevents_firing() {
        let mut w = TimingWheel::new(16, 0);
        let a = w.insert(4, 'a');
        let b = w.insert(4, 'b');
        let c = w.insert(4, 'c');
        // Cancel the middle, the head and the tail of the bucket list.
        assert_eq!(w.cancel(b), Some('b'));
        assert_eq!(w.cancel(c), Some('c'));
        assert_eq!(w.len(), 1);
        assert_eq!(drain(&mut w, 10), vec![(a, 'a')]);
        assert_eq!(w.cancel(a), None);
    }

    #[test]
    fn stale_keys_are_rejected() {
        let mut w = TimingWheel::new(4, 0);
        // Stale after fire.
        let fired_key = w.insert(1, 1);
        assert_eq!(drain(&mut w, 1).len(), 1);
        assert_eq!(w.cancel(fired_key), None);
        assert_eq!(w.deadline(fired_key), None);
        // Stale after cancel.
        let cancelled = w.insert(7, 2);
        assert_eq!(w.cancel(cancelled), Some(2));
        assert_eq!(w.cancel(cancelled), None);
        assert_eq!(w.deadline(cancelled), None);
        // Reuse: the new entry takes the same arena cell but a new generation.
        let fresh = w.insert(9, 3);
        assert_eq!(
            fresh.index, cancelled.index,
            "free list should reuse the cell"
        );
        assert_ne!(fresh, cancelled);
        assert_ne!(fresh, fired_key);
        assert_eq!(w.cancel(cancelled), None);
        assert_eq!(w.cancel(fired_key), None);
        assert_eq!(w.deadline(cancelled), None);
        assert_eq!(w.len(), 1);
        assert_eq!(w.deadline(fresh), Some(9));
        assert_eq!(drain(&mut w, 9), vec![(fresh, 3)]);
    }

    #[test]
    fn past_deadline_fires_on_next_advance_in_order() {
        let mut w = TimingWheel::new(8, 50);
        w.insert(50, 50u64);
        w.insert(10, 10);
        w.insert(0, 0);
        w.insert(51, 51);
        assert_eq!(w.len(), 4);
        // Advancing to the same tick fires the overdue ones (deadline <= now) only.
        assert_eq!(values(&drain(&mut w, 50)), vec![0, 10, 50]);
        w.insert(49, 49);
        // Overdue entries fire before bucket entries, keeping deadline order.
        assert_eq!(values(&drain(&mut w, 51)), vec![49, 51]);
        // A backwards advance is a no-op, even for overdue entries.
        w.insert(20, 20);
        assert!(drain(&mut w, 40).is_empty());
        assert_eq!(w.current_tick(), 51);
        assert_eq!(values(&drain(&mut w, 51)), vec![20]);
    }

    #[test]
    fn later_rounds_fire_in_their_round() {
        let slots = 8u64;
        let mut w = TimingWheel::new(slots as usize, 0);
        // Same bucket (3), rounds 0, 1, 2 and 5.
        for d in [3, 3 + slots, 3 + 2 * slots, 3 + 5 * slots] {
            w.insert(d, d);
        }
        let mut fired_at = Vec::new();
        for now in 1..=6 * slots {
            for (_, v) in drain(&mut w, now) {
                fired_at.push((now, v));
            }
        }
        assert_eq!(
            fired_at,
            vec![(3, 3), (11, 11), (19, 19), (43, 43)],
            "each entry must fire exactly at its deadline"
        );
        assert!(w.is_empty());
    }

    #[test]
    fn long_jump_fires_due_once_in_deadline_order() {
        let slots = 8u64;
        let mut w = TimingWheel::new(slots as usize, 1000);
        let mut expected = Vec::new();
        w.insert(990, 990u64); // overdue
        expected.push(990);
        // Descending inserts, many rounds, several per bucket.
        for d in (1001..1001 + 5 * slots).rev() {
            w.insert(d, d);
            w.insert(d + 100, d + 100); // not due in the jump
        }
        expected.extend(1001..1001 + 5 * slots);
        let now = 1000 + 5 * slots + 3; // > slots ticks ahead
        let fired = values(&drain(&mut w, now));
        assert_eq!(fired, expected);
        assert_eq!(w.current_tick(), now);
        assert_eq!(w.len(), 5 * slots as usize);
        // Nothing fires twice, the rest fires at its own tick.
        assert!(drain(&mut w, now).is_empty());
        let rest = values(&drain(&mut w, 1000 + 5 * slots + 100));
        assert_eq!(rest, (1101..1101 + 5 * slots).collect::<Vec<_>>());
        assert!(w.is_empty());
    }

    #[test]
    fn huge_jump_is_not_tick_by_tick() {
        // A tick-by-tick loop over 2^49 ticks would never finish; this must be instant.
        let mut w = TimingWheel::new(64, 0);
        w.insert(5, 5u64);
        w.insert(1 << 50, 1 << 50);
        w.insert(u64::MAX, u64::MAX);
        assert_eq!(values(&drain(&mut w, 1 << 49)), vec![5]);
        assert_eq!(w.len(), 2);
        assert_eq!(values(&drain(&mut w, u64::MAX)), vec![1 << 50, u64::MAX]);
        assert_eq!(w.current_tick(), u64::MAX);
        assert!(w.is_empty());
    }

    #[test]
    fn panicking_fire_leaves_wheel_consistent() {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        for (start, now) in [(0u64, 3u64), (0, 100)] {
            // Small step (tick walk) and long jump (sorted path).
            let mut w = TimingWheel::new(8, start);
            for d in [1u64, 2, 2, 3] {
                w.insert(d, d);
            }
            let mut calls = 0;
            let r = catch_unwind(AssertUnwindSafe(|| {
                w.advance(now, |_, _| {
                    calls += 1;
                    if calls == 2 {
                        panic!("boom");
                    }
                })
            }));
            assert!(r.is_err());
            assert_eq!(w.len(), 2, "two entries were removed before/at the panic");
            let mut rest = values(&drain(&mut w, now));
            rest.sort_unstable();
            assert_eq!(rest.len(), 2);
            assert!(rest.iter().all(|&d| d >= 2));
            assert!(w.is_empty());
        }
    }

    #[test]
    fn len_tracks_inserts_cancels_and_fires() {
        let mut w = TimingWheel::new(16, 0);
        assert!(w.is_empty());
        let keys: Vec<_> = (0..10u64).map(|i| w.insert(i + 1, i)).collect();
        assert_eq!(w.len(), 10);
        w.cancel(keys[9]);
        w.cancel(keys[9]); // stale, must not change len
        assert_eq!(w.len(), 9);
        drain(&mut w, 4);
        assert_eq!(w.len(), 5);
        drain(&mut w, 100);
        assert_eq!(w.len(), 0);
        assert!(w.is_empty());
    }

    #[test]
    #[should_panic(expected = "must be a power of two")]
    fn non_power_of_two_panics() {
        let _ = TimingWheel::<()>::new(12, 0);
    }

    #[test]
    #[should_panic(expected = "must be a power of two")]
    fn zero_slots_panics() {
        let _ = TimingWheel::<()>::new(0, 0);
    }

    #[test]
    fn single_slot_wheel_works() {
        let mut w = TimingWheel::new(1, 0);
        w.insert(2, 2u8);
        w.insert(1, 1u8);
        assert_eq!(values(&drain(&mut w, 1)), vec![1]);
        assert_eq!(values(&drain(&mut w, 5)), vec![2]);
    }

    #[test]
    fn million_inserts_then_cancels_leave_empty() {
        const N: u64 = 1_000_000;
        let mut w = TimingWheel::with_capacity(4096, 0, 0);
        let keys: Vec<_> = (0..N).map(|i| w.insert(1 + i % 10_000, i)).collect();
        assert_eq!(w.len(), N as usize);
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(w.cancel(k), Some(i as u64));
        }
        assert_eq!(w.len(), 0);
        assert!(w.is_empty());
        // Steady state: re-inserting reuses freed cells, the arena does not grow.
        let cap = w.entries.capacity();
        for i in 0..N {
            w.insert(i % 7, i);
        }
        assert_eq!(w.entries.capacity(), cap);
        assert_eq!(w.entries.len(), N as usize);
    }

    use crate::test_rng::Rng;

    /// Reference model: ordered map of pending entries plus the live keys.
    struct Model {
        pending: BTreeMap<(u64, u64), TimerKey>,
        // key -> (deadline, seq, position in `live`)
        keys: HashMap<TimerKey, (u64, u64, usize)>,
        live: Vec<TimerKey>,
    }

    impl Model {
        fn remove(&mut self, key: TimerKey) -> Option<(u64, u64)> {
            let (deadline, seq, pos) = self.keys.remove(&key)?;
            self.pending.remove(&(deadline, seq)).unwrap();
            self.live.swap_remove(pos);
            if let Some(&moved) = self.live.get(pos) {
                self.keys.get_mut(&moved).unwrap().2 = pos;
            }
            Some((deadline, seq))
        }
    }

    fn differential(seed: u64, slots: usize, start: u64, ops: usize) {
        let mut rng = Rng(seed);
        let mut w: TimingWheel<u64> = TimingWheel::new(slots, start);
        let mut m = Model {
            pending: BTreeMap::new(),
            keys: HashMap::new(),
            live: Vec::new(),
        };
        let mut dead: Vec<TimerKey> = Vec::new();
        let mut seq = 0u64;
        let mut now = start;
        let span = slots as u64;
        for op in 0..ops {
            let ctx = || format!("seed {seed:#x}, slots {slots}, op {op}");
            match rng.below(100) {
                // Insert: deadlines from the past to several rounds ahead.
                0..=44 => {
                    let ahead = rng.below(5 * span + 2);
                    let back = rng.below(span + 2);
                    let deadline = if rng.below(8) == 0 {
                        now.saturating_sub(back)
                    } else {
                        now + ahead
                    };
                    seq += 1;
                    let key = w.insert(deadline, seq);
                    assert!(!m.keys.contains_key(&key), "duplicate live key; {}", ctx());
                    m.pending.insert((deadline, seq), key);
                    m.keys.insert(key, (deadline, seq, m.live.len()));
                    m.live.push(key);
                }
                // Cancel a live key.
                45..=64 => {
                    if m.live.is_empty() {
                        continue;
                    }
                    let key = m.live[rng.below(m.live.len() as u64) as usize];
                    assert_eq!(w.deadline(key), Some(m.keys[&key].0), "{}", ctx());
                    let (_, seq) = m.remove(key).unwrap();
                    assert_eq!(w.cancel(key), Some(seq), "{}", ctx());
                    dead.push(key);
                }
                // Cancel / query a stale key: must be rejected and change nothing.
                65..=72 => {
                    if dead.is_empty() {
                        continue;
                    }
                    let key = dead[rng.below(dead.len() as u64) as usize];
                    assert_eq!(w.deadline(key), None, "{}", ctx());
                    assert_eq!(w.cancel(key), None, "{}", ctx());
                }
                // Advance: mostly small steps, sometimes long jumps or backwards.
                _ => {
                    let r = rng.below(20);
                    let target = if r == 0 {
                        now + span + rng.below(4 * span)
                    } else if r == 1 {
                        now.saturating_sub(rng.below(4))
                    } else {
                        now + rng.below(4)
                    };
                    let mut fired = Vec::new();
                    w.advance(target, |k, v| fired.push((k, v)));
                    let mut expected = Vec::new();
                    if target >= now {
                        now = target;
                        let due: Vec<((u64, u64), TimerKey)> = m
                            .pending
                            .range(..(now + 1, 0))
                            .map(|(&dk, &key)| (dk, key))
                            .collect();
                        for ((deadline, seq), key) in due {
                            m.remove(key);
                            expected.push((deadline, seq, key));
                            dead.push(key);
                        }
                    }
                    assert_eq!(w.current_tick(), now, "{}", ctx());
                    // Map each fired entry to its deadline via the key it was inserted under.
                    let by_seq: HashMap<u64, (u64, TimerKey)> =
                        expected.iter().map(|&(d, s, k)| (s, (d, k))).collect();
                    let got: Vec<(u64, u64, TimerKey)> = fired
                        .iter()
                        .map(|&(k, v)| {
                            let &(d, k2) = by_seq
                                .get(&v)
                                .unwrap_or_else(|| panic!("fired unexpected value {v}; {}", ctx()));
                            assert_eq!(k, k2, "fired with wrong key; {}", ctx());
                            (d, v, k)
                        })
                        .collect();
                    assert!(
                        got.windows(2).all(|p| p[0].0 <= p[1].0),
                        "fired out of deadline order: {got:?}; {}",
                        ctx()
                    );
                    let mut sorted = got.clone();
                    sorted.sort_by_key(|e| (e.0, e.1));
                    assert_eq!(sorted, expected, "fired set differs; {}", ctx());
                }
            }
            assert_eq!(w.len(), m.live.len(), "len mismatch; {}", ctx());
            // Keep the stale-key pool bounded.
            if dead.len() > 4096 {
                dead.drain(..2048);
            }
        }
        // Final long jump drains everything.
        let mut fired = Vec::new();
        w.advance(now + 1000 * span, |_, v| fired.push(v));
        assert_eq!(fired.len(), m.live.len(), "final drain; seed {seed:#x}");
        assert!(w.is_empty());
    }

    #[test]
    fn differential_against_btreemap() {
        // (seed, slots, start tick, ops): 260,000 operations in total.
        let runs: [(u64, usize, u64, usize); 5] = [
            (0x9E37_79B9_7F4A_7C15, 8, 0, 60_000),
            (0xD1B5_4A32_D192_ED03, 16, 12_345, 60_000),
            (0x0123_4567_89AB_CDEF, 64, 1 << 40, 60_000),
            (0xDEAD_BEEF_CAFE_F00D, 1, 7, 40_000),
            (0x5851_F42D_4C95_7F2D, 256, 3, 40_000),
        ];
        for (seed, slots, start, ops) in runs {
            differential(seed, slots, start, ops);
        }
    }
}
