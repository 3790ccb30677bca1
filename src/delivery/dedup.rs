//! One sender's `(from, cid)` dedup state (SPEC section 4).
//!
//! # What it owns
//! A [`Dedup`] belongs to one sender (the `from` of the pair, kept by the caller, e.g. in a
//! map keyed by user on the sender's home shard) and owns every `cid` of that sender the server
//! still remembers, with the server message `id` it was given:
//! * **pending**: accepted for delivery, not yet safe (no device ack, not in the inbox). A
//!   resend must not create a second message, and the answer `accepted` is not due yet.
//! * **accepted**: safe; `accepted` was (or is being) sent. A resend, e.g. after a reconnect
//!   that lost the `accepted` frame, is answered `accepted` again with the same `id` and
//!   delivers nothing.
//!
//! A cid is the raw JSON text of the client's `cid`, compared byte for byte (`"1"` and `1`
//! are different cids, as are `"a"` and `"\u0061"`; the client resends the same bytes).
//!
//! # Window
//! The SPEC asks for >= 24 h or >= 10,000 cids per sender, whichever is larger. So an
//! accepted entry is dropped only when BOTH hold: more than `min_entries` accepted entries
//! remain, and it is older than `min_age_ms`. Pending entries are never dropped and do not
//! count towards `min_entries`. Age is measured from [`Dedup::begin`], i.e. from the first
//! time the server saw the cid (a message is pending at most for its retransmit schedule,
//! seconds, which is negligible against 24 h).
//!
//! # How
//! A map `cid -> (id, begin time, pending?)` answers [`Dedup::check`], and a queue of accepted
//! cids in acceptance order (with their begin time) drives eviction from the front. A pending
//! cid enters the queue only when accepted, so pending entries never block or take part in
//! eviction, and `forget_pending` never leaves a stale queue entry. Acceptance order is
//! begin order up to the pending time, so the front is the oldest entry or close to it; when
//! it is not, an entry waits behind a slightly younger one, i.e. it is kept a little longer,
//! never dropped early.
//!
//! # Cost
//! * `check`, `accept`, `forget_pending`: O(1) (one hash lookup). `begin` and `evict`:
//!   O(1 + evicted), i.e. amortised O(1) per insert, since every entry is evicted at most once.
//! * Memory per entry: one map slot (24-byte inline key + 24-byte value, plus hash-table
//!   overhead) and, once accepted, one 32-byte queue slot. Cids up to 24 bytes are stored
//!   inline; a longer one costs a heap copy in the map and another in the queue. Capacity is
//!   given back when the entries shrink below a quarter of it.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;

use crate::hash::FastMap;

use compact_str::CompactString;

/// Accepted cids kept per sender at least (SPEC: >= 10,000).
pub const DEFAULT_DEDUP_MIN_ENTRIES: usize = 10_000;
/// Age for which an accepted cid is kept at least (SPEC: >= 24 h).
pub const DEFAULT_DEDUP_MIN_AGE_MS: u64 = 24 * 60 * 60 * 1000;

/// Capacities below this are never shrunk: not worth a reallocation.
const SHRINK_FLOOR: usize = 64;

/// How long the server remembers accepted cids; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    /// Accepted cids kept per sender whatever their age.
    pub min_entries: usize,
    /// Accepted cids younger than this (from their `begin`) are kept whatever their number.
    pub min_age_ms: u64,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            min_entries: DEFAULT_DEDUP_MIN_ENTRIES,
            min_age_ms: DEFAULT_DEDUP_MIN_AGE_MS,
        }
    }
}

/// What the server knows about a cid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Unknown (never seen, forgotten, or evicted): a new message.
    New,
    /// Being delivered as message `id`, not yet safe: deliver nothing more, answer nothing
    /// yet (`accepted` follows when the first copy is safe).
    Pending { id: u64 },
    /// Safe as message `id`: answer `accepted` with this id again and deliver nothing.
    Accepted { id: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    /// `now` of the `begin`; the entry's age counts from here.
    begun_at: u64,
    pending: bool,
}

/// One sender's dedup state; see the module documentation.
#[derive(Debug)]
pub struct Dedup {
    cfg: DedupConfig,
    slots: FastMap<CompactString, Slot>,
    /// Accepted cids in acceptance order, with their `begun_at`: the eviction queue. Holds
    /// exactly the accepted entries of `slots`, each once.
    accepted: VecDeque<(u64, CompactString)>,
}

impl Dedup {
    /// Empty; allocates nothing until the first [`Dedup::begin`].
    pub fn new(cfg: DedupConfig) -> Self {
        Dedup {
            cfg,
            slots: FastMap::default(),
            accepted: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &DedupConfig {
        &self.cfg
    }

    /// What the server knows about `cid` (raw JSON text).
    pub fn check(&self, cid: &str) -> Seen {
        match self.slots.get(cid) {
            None => Seen::New,
            Some(s) if s.pending => Seen::Pending { id: s.id },
            Some(s) => Seen::Accepted { id: s.id },
        }
    }

    /// `cid` became message `id` at `now`: New -> Pending. Also evicts what may be evicted at
    /// `now` (see [`Dedup::evict`]), so the state stays bounded without a separate sweep.
    ///
    /// Call it only after [`Dedup::check`] said `New`. On a cid already known this is a caller
    /// bug: it panics in debug builds and, in release, keeps the existing entry and its id
    /// (never two ids for one cid).
    pub fn begin(&mut self, cid: &str, id: u64, now: u64) {
        let begun = self.begin_new(cid, now, || Some(id));
        debug_assert!(begun.is_ok(), "Dedup::begin on a known cid {cid}");
    }

    /// [`Dedup::check`] and, for a new cid, [`Dedup::begin`] as message `next_id()`, in one
    /// probe of the table (a cache miss each: it holds every cid of the last 24 h). `Err`: the
    /// cid is known (pending or accepted); `Ok(None)`: new, but no id was given (not begun).
    pub fn begin_new(
        &mut self,
        cid: &str,
        now: u64,
        next_id: impl FnOnce() -> Option<u64>,
    ) -> Result<Option<u64>, Seen> {
        // First, as `begin` does: eviction never removes a pending entry, nor keeps a handle.
        self.evict(now);
        match self.slots.entry(CompactString::from(cid)) {
            Entry::Occupied(known) => Err(match known.get() {
                s if s.pending => Seen::Pending { id: s.id },
                s => Seen::Accepted { id: s.id },
            }),
            Entry::Vacant(slot) => {
                let id = next_id();
                if let Some(id) = id {
                    slot.insert(Slot {
                        id,
                        begun_at: now,
                        pending: true,
                    });
                }
                Ok(id)
            }
        }
    }

    /// The message of `cid` is safe: Pending -> Accepted. A no-op when it is already accepted
    /// or unknown (e.g. forgotten meanwhile).
    pub fn accept(&mut self, cid: &str) {
        self.accept_with(cid, None);
    }

    /// Like [`Dedup::accept`], but the store says the cid is message `id` (it was stored
    /// before, e.g. by a previous run of the gateway): that id is the one remembered.
    pub fn accept_as(&mut self, cid: &str, id: u64) {
        self.accept_with(cid, Some(id));
    }

    fn accept_with(&mut self, cid: &str, id: Option<u64>) {
        let Some(slot) = self.slots.get_mut(cid) else {
            return;
        };
        if let Some(id) = id {
            slot.id = id;
        }
        if slot.pending {
            slot.pending = false;
            self.accepted
                .push_back((slot.begun_at, CompactString::from(cid)));
        }
    }

    /// The message of a pending `cid` could not be made safe (`unavailable`): forget it, so
    /// the client's resend is `New` and becomes a new message. A no-op on an accepted cid (an
    /// accepted cid is never forgotten early) or an unknown one.
    pub fn forget_pending(&mut self, cid: &str) {
        if self.slots.get(cid).is_some_and(|s| s.pending) {
            self.slots.remove(cid);
            self.shrink();
        }
    }

    /// Drop accepted entries, oldest accepted first, while more than `min_entries` accepted
    /// entries remain and the oldest is older than `min_age_ms` at `now`.
    pub fn evict(&mut self, now: u64) {
        let mut evicted = false;
        while self.accepted.len() > self.cfg.min_entries {
            let Some(&(begun_at, _)) = self.accepted.front() else {
                break;
            };
            if now.saturating_sub(begun_at) <= self.cfg.min_age_ms {
                break;
            }
            if let Some((_, cid)) = self.accepted.pop_front() {
                let removed = self.slots.remove(&cid);
                debug_assert!(removed.is_some_and(|s| !s.pending));
                evicted = true;
            }
        }
        if evicted {
            self.shrink();
        }
    }

    /// Cids remembered, pending and accepted.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when nothing is remembered: the caller may drop this `Dedup`.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Cids currently pending.
    pub fn pending(&self) -> usize {
        self.slots.len() - self.accepted.len()
    }

    /// Give memory back after the entries fell below a quarter of the capacity (keeping
    /// room to grow back to twice the current size). Amortised O(1): it follows at least
    /// half a capacity of removals.
    fn shrink(&mut self) {
        let len = self.slots.len();
        if self.slots.capacity() > SHRINK_FLOOR && self.slots.capacity() / 4 > len {
            self.slots.shrink_to(len * 2);
        }
        let len = self.accepted.len();
        if self.accepted.capacity() > SHRINK_FLOOR && self.accepted.capacity() / 4 > len {
            self.accepted.shrink_to(len * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 60 * 60 * 1000;
    const T0: u64 = 1_700_000_000_000;

    fn small(min_entries: usize, min_age_ms: u64) -> Dedup {
        Dedup::new(DedupConfig {
            min_entries,
            min_age_ms,
        })
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = DedupConfig::default();
        assert_eq!(c.min_entries, 10_000);
        assert_eq!(c.min_age_ms, 24 * HOUR);
        let d = Dedup::new(c);
        assert_eq!(d.slots.capacity(), 0);
        assert_eq!(d.accepted.capacity(), 0);
    }

    #[test]
    fn new_pending_accepted_transitions() {
        let mut d = Dedup::new(DedupConfig::default());
        assert_eq!(d.check("\"c1\""), Seen::New);
        d.begin("\"c1\"", 41, T0);
        assert_eq!(d.check("\"c1\""), Seen::Pending { id: 41 });
        assert_eq!(d.pending(), 1);
        d.accept("\"c1\"");
        assert_eq!(d.check("\"c1\""), Seen::Accepted { id: 41 });
        // Idempotent.
        d.accept("\"c1\"");
        assert_eq!(d.check("\"c1\""), Seen::Accepted { id: 41 });
        assert_eq!(d.accepted.len(), 1);
        assert_eq!(d.len(), 1);
        assert_eq!(d.pending(), 0);
        // Raw JSON text: a number 1 and the string "1" are different cids.
        d.begin("1", 42, T0);
        assert_eq!(d.check("\"1\""), Seen::New);
        assert_eq!(d.check("1"), Seen::Pending { id: 42 });
        // Accept of an unknown cid is a no-op.
        d.accept("\"nope\"");
        d.accept_as("\"nope\"", 9);
        assert_eq!(d.check("\"nope\""), Seen::New, "unknown cids stay unknown");
        d.begin("\"again\"", 5, 0);
        d.accept_as("\"again\"", 3);
        assert_eq!(
            d.check("\"again\""),
            Seen::Accepted { id: 3 },
            "the store's id wins"
        );
        assert_eq!(d.check("\"nope\""), Seen::New);
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn begin_new_checks_and_begins_in_one_step() {
        let mut d = Dedup::new(DedupConfig::default());
        // No id to give: nothing begun, the cid stays new.
        assert_eq!(d.begin_new("\"c\"", T0, || None), Ok(None));
        assert_eq!(d.check("\"c\""), Seen::New);
        assert_eq!(d.begin_new("\"c\"", T0, || Some(5)), Ok(Some(5)));
        assert_eq!(d.check("\"c\""), Seen::Pending { id: 5 });
        // Known: the id is not asked for.
        let ask = || -> Option<u64> { panic!("no id for a known cid") };
        assert_eq!(d.begin_new("\"c\"", T0, ask), Err(Seen::Pending { id: 5 }));
        d.accept("\"c\"");
        assert_eq!(d.begin_new("\"c\"", T0, ask), Err(Seen::Accepted { id: 5 }));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn long_cids_work_like_short_ones() {
        let mut d = Dedup::new(DedupConfig::default());
        let long = "\"0f9d3c8e-7a1b-4c2d-9e8f-123456789abc\"";
        assert!(long.len() > 24);
        d.begin(long, 7, T0);
        d.accept(long);
        assert_eq!(d.check(long), Seen::Accepted { id: 7 });
        assert_eq!(d.check(&long[..long.len() - 2]), Seen::New);
    }

    #[test]
    fn forget_pending_makes_a_resend_new_but_never_forgets_accepted() {
        let mut d = Dedup::new(DedupConfig::default());
        d.begin("\"a\"", 1, T0);
        d.forget_pending("\"a\"");
        assert_eq!(d.check("\"a\""), Seen::New);
        assert!(d.is_empty());
        // The resend becomes a new message with a new id.
        d.begin("\"a\"", 2, T0 + 10);
        assert_eq!(d.check("\"a\""), Seen::Pending { id: 2 });
        d.accept("\"a\"");
        d.forget_pending("\"a\"");
        assert_eq!(d.check("\"a\""), Seen::Accepted { id: 2 });
        // Accept after forget is a no-op (the cid is unknown again).
        d.begin("\"b\"", 3, T0);
        d.forget_pending("\"b\"");
        d.accept("\"b\"");
        assert_eq!(d.check("\"b\""), Seen::New);
        d.forget_pending("\"unknown\"");
        assert_eq!(d.len(), 1);
        assert_eq!(d.accepted.len(), 1);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "Dedup::begin on a known cid")]
    fn begin_twice_is_a_caller_bug() {
        let mut d = Dedup::new(DedupConfig::default());
        d.begin("\"a\"", 1, T0);
        d.begin("\"a\"", 2, T0);
    }

    #[test]
    fn eviction_needs_both_count_and_age() {
        let mut d = small(3, 10 * HOUR);
        for i in 0..6u64 {
            let cid = format!("\"c{i}\"");
            d.begin(&cid, i, T0 + i * HOUR);
            d.accept(&cid);
        }
        // Many entries but all young: nothing goes.
        d.evict(T0 + 10 * HOUR);
        assert_eq!(d.len(), 6);
        // c0 is 10 h + 1 ms old: strictly older than min_age, goes; c1 is exactly 10 h: stays.
        d.evict(T0 + 10 * HOUR + 1);
        assert_eq!(d.check("\"c0\""), Seen::New);
        assert_eq!(d.check("\"c1\""), Seen::Accepted { id: 1 });
        assert_eq!(d.len(), 5);
        // Everything old: down to min_entries, oldest first, never below.
        d.evict(T0 + 100 * HOUR);
        assert_eq!(d.len(), 3);
        for i in 0..3 {
            assert_eq!(d.check(&format!("\"c{i}\"")), Seen::New, "c{i}");
        }
        for i in 3..6 {
            assert_eq!(
                d.check(&format!("\"c{i}\"")),
                Seen::Accepted { id: i },
                "c{i}"
            );
        }
        d.evict(T0 + 1_000 * HOUR);
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn pending_entries_are_never_evicted_and_do_not_count() {
        let mut d = small(2, HOUR);
        d.begin("\"p\"", 100, T0);
        for i in 0..4u64 {
            let cid = format!("\"c{i}\"");
            d.begin(&cid, i, T0 + i);
            d.accept(&cid);
        }
        d.evict(T0 + 50 * HOUR);
        // "p" is old but pending; the two newest accepted stay (min_entries counts accepted).
        assert_eq!(d.check("\"p\""), Seen::Pending { id: 100 });
        assert_eq!(d.check("\"c0\""), Seen::New);
        assert_eq!(d.check("\"c1\""), Seen::New);
        assert_eq!(d.check("\"c2\""), Seen::Accepted { id: 2 });
        assert_eq!(d.check("\"c3\""), Seen::Accepted { id: 3 });
        assert_eq!(d.len(), 3);
        // Accepted late, it enters the queue behind c2 and c3 with its old begin time.
        d.accept("\"p\"");
        d.evict(T0 + 50 * HOUR);
        assert_eq!(d.check("\"c2\""), Seen::New);
        assert_eq!(d.check("\"c3\""), Seen::Accepted { id: 3 });
        assert_eq!(d.check("\"p\""), Seen::Accepted { id: 100 });
    }

    #[test]
    fn begin_evicts_so_the_state_stays_bounded() {
        let mut d = small(100, HOUR);
        for i in 0..10_000u64 {
            let cid = format!("\"c{i}\"");
            let now = T0 + i * 60_000; // one per minute: 60 per hour
            d.begin(&cid, i, now);
            d.accept(&cid);
            assert!(d.len() <= 101, "at {i}: {}", d.len());
        }
        // The last 100 are all there.
        for i in 9_900..10_000u64 {
            assert_eq!(d.check(&format!("\"c{i}\"")), Seen::Accepted { id: i });
        }
        // Capacity follows the size, not the history.
        assert!(d.slots.capacity() < 1_000, "{}", d.slots.capacity());
    }

    #[test]
    fn memory_is_given_back_after_a_burst() {
        let mut d = small(10, HOUR);
        for i in 0..20_000u64 {
            let cid = format!("\"c{i}\"");
            d.begin(&cid, i, T0);
            d.accept(&cid);
        }
        assert!(d.slots.capacity() >= 20_000);
        d.evict(T0 + 2 * HOUR);
        assert_eq!(d.len(), 10);
        assert!(
            d.slots.capacity() <= 4 * SHRINK_FLOOR,
            "{}",
            d.slots.capacity()
        );
        assert!(
            d.accepted.capacity() <= 4 * SHRINK_FLOOR,
            "{}",
            d.accepted.capacity()
        );
    }

    use crate::test_rng::Rng;

    /// Reference model: what the SPEC allows, written without the queue. Every cid ever begun
    /// and not forgotten or evicted, with its id, begin time, state and acceptance rank.
    #[derive(Default)]
    struct Model {
        entries: Vec<(String, u64, u64, Option<u64>)>, // cid, id, begun_at, accept rank
        rank: u64,
    }

    impl Model {
        fn find(&self, cid: &str) -> Option<usize> {
            self.entries.iter().position(|e| e.0 == cid)
        }
        fn seen(&self, cid: &str) -> Seen {
            match self.find(cid).map(|i| &self.entries[i]) {
                None => Seen::New,
                Some(&(_, id, _, None)) => Seen::Pending { id },
                Some(&(_, id, _, Some(_))) => Seen::Accepted { id },
            }
        }
        fn accepted(&self) -> usize {
            self.entries.iter().filter(|e| e.3.is_some()).count()
        }
    }

    /// After an eviction at `now`: check that whatever the implementation dropped was allowed
    /// (accepted, older than min_age, and never going below min_entries), that it did not
    /// stop early (the oldest accepted left is young, or only min_entries are left), and bring
    /// the model in line.
    fn reconcile(d: &Dedup, m: &mut Model, cfg: DedupConfig, now: u64, ctx: &dyn Fn() -> String) {
        let before = m.entries.len();
        m.entries
            .retain(|(cid, id, begun_at, rank)| match d.check(cid) {
                Seen::New => {
                    assert!(rank.is_some(), "evicted pending {cid}; {}", ctx());
                    assert!(
                        now - begun_at > cfg.min_age_ms,
                        "evicted young {cid} (age {}); {}",
                        now - begun_at,
                        ctx()
                    );
                    false
                }
                seen => {
                    let want = match rank {
                        None => Seen::Pending { id: *id },
                        Some(_) => Seen::Accepted { id: *id },
                    };
                    assert_eq!(seen, want, "{cid}; {}", ctx());
                    true
                }
            });
        let accepted = m.accepted();
        if m.entries.len() < before {
            assert!(accepted >= cfg.min_entries, "below min_entries; {}", ctx());
        }
        assert_eq!(d.len(), m.entries.len(), "{}", ctx());
        assert_eq!(d.accepted.len(), accepted, "{}", ctx());
        if accepted > cfg.min_entries {
            let oldest = m
                .entries
                .iter()
                .filter(|e| e.3.is_some())
                .min_by_key(|e| e.3)
                .unwrap();
            assert!(
                now - oldest.2 <= cfg.min_age_ms,
                "kept evictable {} (age {}); {}",
                oldest.0,
                now - oldest.2,
                ctx()
            );
        }
    }

    fn differential(seed: u64, cfg: DedupConfig, ops: usize) {
        let mut rng = Rng(seed);
        let mut d = Dedup::new(cfg);
        let mut m = Model::default();
        let mut now = T0;
        let mut next_id = 1u64;
        let mut counts = [0usize; 6];
        let cid_of = |n: u64| {
            if n.is_multiple_of(7) {
                // Longer than the 24 bytes CompactString keeps inline.
                format!("\"client-message-id-{n:012}\"")
            } else {
                format!("\"c{n}\"")
            }
        };
        for op in 0..ops {
            let kind = rng.below(100);
            if (78..=94).contains(&kind) {
                // Time passes; sometimes a lot.
                let scale = cfg.min_age_ms.max(1_000);
                now += if rng.below(30) == 0 {
                    rng.below(3 * scale)
                } else {
                    rng.below(scale / 20)
                };
            }
            let ctx = || format!("seed {seed:#x}, cfg {cfg:?}, op {op}, now {now}");
            let cid = cid_of(rng.below(600));
            match kind {
                // A send: check, then begin when new.
                0..=44 => {
                    let seen = d.check(&cid);
                    assert_eq!(seen, m.seen(&cid), "{cid}; {}", ctx());
                    if seen == Seen::New {
                        d.begin(&cid, next_id, now);
                        m.entries.push((cid, next_id, now, None));
                        reconcile(&d, &mut m, cfg, now, &ctx);
                        next_id += 1;
                        counts[0] += 1;
                    } else {
                        counts[1] += 1;
                    }
                }
                // The message became safe: usually a pending one, sometimes any cid.
                45..=69 => {
                    let pending: Vec<usize> = (0..m.entries.len())
                        .filter(|&i| m.entries[i].3.is_none())
                        .collect();
                    let target = if !pending.is_empty() && rng.below(4) != 0 {
                        m.entries[pending[rng.below(pending.len() as u64) as usize]]
                            .0
                            .clone()
                    } else {
                        cid
                    };
                    d.accept(&target);
                    if let Some(i) = m.find(&target) {
                        if m.entries[i].3.is_none() {
                            m.rank += 1;
                            m.entries[i].3 = Some(m.rank);
                            counts[2] += 1;
                        }
                    }
                }
                // Unavailable: forget a pending one (or try on any cid).
                70..=77 => {
                    d.forget_pending(&cid);
                    if let Some(i) = m.find(&cid) {
                        if m.entries[i].3.is_none() {
                            m.entries.remove(i);
                            counts[3] += 1;
                        }
                    }
                }
                78..=94 => {}
                // Periodic sweep.
                _ => {
                    let before = d.len();
                    d.evict(now);
                    counts[4] += before - d.len();
                    counts[5] += 1;
                    reconcile(&d, &mut m, cfg, now, &ctx);
                }
            }
            assert_eq!(d.len(), m.entries.len(), "{}", ctx());
            let probe = cid_of(rng.below(600));
            assert_eq!(d.check(&probe), m.seen(&probe), "{probe}; {}", ctx());
        }
        println!(
            "seed {seed:#x}: begun {}, resent {}, accepted {}, forgotten {}, evicted by sweep {}, sweeps {}, final len {}",
            counts[0], counts[1], counts[2], counts[3], counts[4], counts[5], d.len()
        );
        assert!(
            counts.iter().all(|&c| c > 0),
            "an operation never happened: {counts:?}"
        );
    }

    #[test]
    fn differential_against_reference_model() {
        // 50,000 operations per configuration.
        differential(
            0xD1B5_4A32_D192_ED03,
            DedupConfig {
                min_entries: 40,
                min_age_ms: 10_000,
            },
            50_000,
        );
        differential(
            0x0123_4567_89AB_CDEF,
            DedupConfig {
                min_entries: 0,
                min_age_ms: 1_000,
            },
            50_000,
        );
        differential(
            0xDEAD_BEEF_CAFE_F00D,
            DedupConfig {
                min_entries: 300,
                min_age_ms: 0,
            },
            50_000,
        );
    }
}
