//! Server message ids: unique across shards, nodes and restarts, as pure logic (time injected).
//!
//! An id is 64 bits: 42 bits of milliseconds since 2020-01-01 UTC, 13 bits of *issuer slot*,
//! 9 bits of sequence within the millisecond. Two issuers never hold one slot at the same
//! time, so two ids never collide:
//! * Embedded store (one node): a shard's slot is its index, for good.
//! * Redis (several nodes may share it): each shard of each node run claims a slot in Redis
//!   (`ids` hash: slot -> holder and expiry in Redis time, see `store/redis`) and renews it
//!   every third of `node_lease_ms`. Another shard may take a slot over only [`ID_SLOT_GRACE_MS`]
//!   after its expiry, and the holder issues ids only while its last granted renewal (counted
//!   from when it asked, on its own clock) is younger than the lease plus 90% of that grace. So
//!   a shard cut off from Redis keeps issuing through an outage of up to ~10 minutes (live
//!   delivery to users online here goes on, see `shard/mirror.rs`), and stops before anyone
//!   may take its slot. A shard that takes over a slot starts its ids after the earlier
//!   holder's last possible one (expiry + grace).
//!
//! Per issuer, ids increase: more than 512 in one millisecond borrow the next millisecond, and
//! a clock stepping back reuses the last millisecond used. The remaining assumption is the
//! usual one for leases: node and Redis clocks run at the same rate, and wall clocks agree to
//! well within the lease (NTP). Ids are sent as decimal strings (exact in every JSON parser).

/// How many issuer slots one Redis (or Redis Cluster) hands out: shards of all live nodes.
pub const ID_SLOTS: u16 = 1 << ID_SLOT_BITS;
const ID_EPOCH_MS: u64 = 1_577_836_800_000;
const ID_SLOT_BITS: u32 = 13;
const ID_SEQ_BITS: u32 = 9;
/// While no slot is held, or after a claim failed, a claim is asked again this often.
const CLAIM_RETRY_MS: u64 = 500;
/// How long after its expiry a slot stays its holder's (see the module doc). Also the
/// longest Redis outage through which a shard keeps issuing ids.
pub const ID_SLOT_GRACE_MS: u64 = 10 * 60 * 1000;

/// A slot granted by Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdGrant {
    pub slot: u16,
    /// Wall-clock ms (Unix epoch) before which an earlier holder of the slot may have issued
    /// ids (its expiry), 0 when the slot was free or already ours.
    pub not_before_ms: u64,
}

/// What a claim's answer changed (for the shard's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The slot held so far is renewed.
    Renewed,
    /// A slot is held now, `from` the one held before (None: none was).
    Took { slot: u16, from: Option<u16> },
    /// The claim failed; ids go on while the last renewal is young enough.
    Failed(String),
}

#[derive(Debug)]
pub struct MessageIds {
    slot: Option<u16>,
    /// Shard-clock ms until which `slot` is ours (`u64::MAX`: for good).
    valid_until: u64,
    /// Redis mode: the node lease the claims are renewed under (0: embedded, never claims).
    lease_ms: u64,
    /// Shard-clock ms when the claim in flight was asked (None: none in flight).
    asking_since: Option<u64>,
    last_ask: Option<u64>,
    /// The last claim failed (or could not be sent): ask again soon.
    last_failed: bool,
    last_ms: u64,
    seq: u64,
}

impl MessageIds {
    /// Embedded store: the shard's index is its slot, for good.
    pub fn for_shard(shard: usize) -> Self {
        let mut ids = Self::claimed_under(0);
        ids.slot = Some(shard as u16 % ID_SLOTS);
        ids.valid_until = u64::MAX;
        ids
    }

    /// Redis: no slot until a claim is granted; claims renewed under `lease_ms`.
    pub fn claimed_under(lease_ms: u64) -> Self {
        MessageIds {
            slot: None,
            valid_until: 0,
            lease_ms,
            asking_since: None,
            last_ask: None,
            last_failed: false,
            last_ms: 0,
            seq: 0,
        }
    }

    /// The slot ids are issued under at `now`, if any.
    pub fn slot(&self, now: u64) -> Option<u16> {
        self.slot.filter(|_| now < self.valid_until)
    }

    /// The next id at wall-clock `wall_ms` (ms since the Unix epoch), shard-clock `now`; None
    /// while no slot is held.
    pub fn next(&mut self, wall_ms: u64, now: u64) -> Option<u64> {
        let slot = self.slot(now)? as u64;
        let ms = wall_ms.saturating_sub(ID_EPOCH_MS);
        if ms > self.last_ms {
            self.last_ms = ms;
            self.seq = 0;
        } else {
            self.seq += 1;
            if self.seq == 1 << ID_SEQ_BITS {
                self.last_ms += 1;
                self.seq = 0;
            }
        }
        Some((self.last_ms << (ID_SLOT_BITS + ID_SEQ_BITS)) | (slot << ID_SEQ_BITS) | self.seq)
    }

    /// Whether a claim (or renewal) is due at `now`: `Some(held)` to send one, naming the slot
    /// held (to renew it), asked at `now` (echoed in the answer). The caller sends it, or
    /// calls [`MessageIds::not_asked`].
    pub fn claim_due(&mut self, now: u64) -> Option<Option<u16>> {
        if self.lease_ms == 0 {
            return None;
        }
        // An answer always comes (a failure too); one older than a lease is not waited for.
        if self.asking_since.is_some_and(|t| now < t + self.lease_ms) {
            return None;
        }
        let held = self.slot(now);
        let every = if held.is_some() && !self.last_failed {
            self.lease_ms / 3
        } else {
            CLAIM_RETRY_MS
        };
        if self.last_ask.is_some_and(|t| now < t + every) {
            return None;
        }
        self.asking_since = Some(now);
        self.last_ask = Some(now);
        Some(held)
    }

    /// The claim [`MessageIds::claim_due`] asked for could not be sent.
    pub fn not_asked(&mut self) {
        self.asking_since = None;
        self.last_failed = true;
    }

    /// The answer to the claim asked at `asked` (the time [`MessageIds::claim_due`] was
    /// called, echoed by the store: a late answer to an earlier claim counts from its own ask).
    pub fn on_claim(&mut self, answer: Result<IdGrant, String>, asked: u64) -> Claimed {
        if self.asking_since == Some(asked) {
            self.asking_since = None;
        }
        let grant = match answer {
            Ok(g) => g,
            Err(why) => {
                self.last_failed = true;
                return Claimed::Failed(why);
            }
        };
        self.last_failed = false;
        // Redis set the expiry after `asked`, so at least a lease after it, and nobody may
        // take the slot until the grace after that.
        let valid_until = asked + self.lease_ms + ID_SLOT_GRACE_MS * 9 / 10;
        if self.slot == Some(grant.slot) && valid_until <= self.valid_until {
            return Claimed::Renewed; // an older answer than one already counted
        }
        self.valid_until = valid_until;
        let before = self.slot.replace(grant.slot);
        if before == Some(grant.slot) {
            return Claimed::Renewed;
        }
        // A new slot: its ids start after its earlier holder's (and stay above this shard's).
        self.last_ms = self
            .last_ms
            .max(grant.not_before_ms.saturating_sub(ID_EPOCH_MS) + 1);
        self.seq = 0;
        Claimed::Took {
            slot: grant.slot,
            from: before,
        }
    }
}

/// The issuer slot of an id (tests and tools).
pub fn slot_of(id: u64) -> u16 {
    ((id >> ID_SEQ_BITS) & (ID_SLOTS as u64 - 1)) as u16
}

/// The wall-clock millisecond (Unix epoch) `id` was issued in, or a later one (an issuer
/// that gave out more than 512 ids in a millisecond borrows the next).
pub fn issued_ms(id: u64) -> u64 {
    (id >> (ID_SLOT_BITS + ID_SEQ_BITS)) + ID_EPOCH_MS
}

/// Whether `id` was issued after `top` by the clock: in a later millisecond, or in the same
/// one by the same issuer. Within a millisecond ids order by issuer slot, not by time, so an
/// id of another issuer in `top`'s millisecond may have been given out earlier, though it is
/// higher. The Redis script keeps a pair's stored ids to this rule (`~top` in
/// `store/redis/script.lua`, which computes the same from decimal strings).
pub fn issued_after(id: u64, top: u64) -> bool {
    let ms = |id: u64| id >> (ID_SLOT_BITS + ID_SEQ_BITS);
    id > top && (ms(id) > ms(top) || slot_of(id) == slot_of(top))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WALL: u64 = 1_800_000_000_000;
    const LEASE: u64 = 10_000;

    fn granted(slot: u16) -> Result<IdGrant, String> {
        Ok(IdGrant {
            slot,
            not_before_ms: 0,
        })
    }

    #[test]
    fn an_id_is_issued_after_another_in_a_later_millisecond_or_from_its_issuer() {
        let id = |ms: u64, slot: u64, seq: u64| {
            (ms << (ID_SLOT_BITS + ID_SEQ_BITS)) | (slot << ID_SEQ_BITS) | seq
        };
        assert!(issued_after(id(10, 1, 0), id(9, 7, 511)));
        assert!(issued_after(id(10, 7, 3), id(10, 7, 2)));
        assert!(!issued_after(id(10, 7, 2), id(10, 7, 2)));
        assert!(
            !issued_after(id(10, 7, 0), id(10, 1, 5)),
            "same ms, another issuer"
        );
        assert!(!issued_after(id(10, 1, 5), id(10, 7, 0)), "below");
        assert!(!issued_after(id(9, 7, 0), id(10, 1, 0)));
        assert!(issued_after(id(1, 0, 0), 0), "nothing stored yet");
    }

    #[test]
    fn an_id_tells_the_millisecond_it_was_issued_in() {
        let mut ids = MessageIds::for_shard(5);
        let first = ids.next(WALL, 0).unwrap();
        assert_eq!(issued_ms(first), WALL);
        assert_eq!(issued_ms(ids.next(WALL + 7, 0).unwrap()), WALL + 7);
    }

    #[test]
    fn ids_are_unique_increasing_and_carry_the_slot() {
        let mut a = MessageIds::for_shard(3);
        let mut b = MessageIds::for_shard(4);
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        // 10,000 ids in the same millisecond: they borrow later milliseconds, never repeat.
        for _ in 0..10_000 {
            let id = a.next(WALL, 0).unwrap();
            assert!(id > last);
            last = id;
            assert!(seen.insert(id));
            assert!(
                seen.insert(b.next(WALL, 0).unwrap()),
                "another slot never collides"
            );
        }
        // A clock stepping back does not repeat ids either.
        let back = a.next(WALL - 5_000, 0).unwrap();
        assert!(back > last);
        assert_eq!(slot_of(back), 3);
        // A restart a millisecond later starts above the earlier run's first ids.
        let mut restarted = MessageIds::for_shard(3);
        assert!(restarted.next(WALL + 1, 0) > MessageIds::for_shard(3).next(WALL, 0));
        assert_eq!(a.claim_due(1_000_000), None, "embedded: never claims");
    }

    #[test]
    fn no_ids_without_a_slot_and_none_once_its_renewal_is_too_old() {
        let mut ids = MessageIds::claimed_under(LEASE);
        assert_eq!(ids.next(WALL, 0), None);
        assert_eq!(ids.claim_due(0), Some(None));
        assert_eq!(ids.claim_due(1), None, "one claim in flight");
        assert_eq!(
            ids.on_claim(granted(7), 0),
            Claimed::Took {
                slot: 7,
                from: None
            }
        );
        assert_eq!(slot_of(ids.next(WALL, 5).unwrap()), 7);
        // Renewed every third of the lease, measured from the ask.
        assert_eq!(ids.claim_due(LEASE / 3 - 1), None);
        assert_eq!(ids.claim_due(LEASE / 3), Some(Some(7)));
        // Redis does not answer: retried every 500 ms, and ids go on through the grace (a
        // Redis outage of minutes), until the lease plus 90% of the grace after the last
        // granted ask (0); then they stop, before anyone may take the slot.
        assert!(matches!(
            ids.on_claim(Err("timeout".into()), LEASE / 3),
            Claimed::Failed(_)
        ));
        assert_eq!(ids.claim_due(LEASE / 3 + CLAIM_RETRY_MS - 1), None);
        assert_eq!(ids.claim_due(LEASE / 3 + CLAIM_RETRY_MS), Some(Some(7)));
        ids.on_claim(Err("timeout".into()), LEASE / 3 + CLAIM_RETRY_MS);
        let end = LEASE + ID_SLOT_GRACE_MS * 9 / 10;
        assert!(ids.next(WALL, end - 1).is_some());
        assert_eq!(ids.next(WALL, end), None);
        assert_eq!(ids.slot(end), None);
        // Asked again while none is held; a late grant brings ids back.
        assert_eq!(ids.claim_due(end), Some(None));
        assert_eq!(
            ids.on_claim(granted(7), end),
            Claimed::Renewed,
            "still ours"
        );
        assert!(ids.next(WALL, end + 3).is_some());
    }

    #[test]
    fn a_late_answer_counts_from_its_own_ask() {
        let mut ids = MessageIds::claimed_under(LEASE);
        ids.claim_due(0);
        ids.on_claim(granted(3), 0);
        // A renewal asked at 1/3 lease gets no answer for a whole lease; another is asked.
        assert_eq!(ids.claim_due(LEASE / 3), Some(Some(3)));
        assert_eq!(ids.claim_due(LEASE / 3 + LEASE), Some(Some(3)));
        // The first answer comes late: validity counts from its ask, not the second's.
        ids.on_claim(granted(3), LEASE / 3);
        let end = LEASE / 3 + LEASE + ID_SLOT_GRACE_MS * 9 / 10;
        assert_eq!(ids.next(WALL, end), None);
        assert_eq!(
            ids.claim_due(LEASE / 3 + LEASE + 1),
            None,
            "the second is still out"
        );
        ids.on_claim(granted(3), LEASE / 3 + LEASE);
        assert!(ids.next(WALL, end).is_some());
    }

    #[test]
    fn a_slot_taken_over_issues_after_its_earlier_holder() {
        let mut ids = MessageIds::claimed_under(LEASE);
        ids.claim_due(0);
        ids.on_claim(granted(1), 0);
        let before = ids.next(WALL, 1).unwrap();
        ids.claim_due(LEASE / 3);
        // The slot was lost (this node was cut off longer than the grace): another one, whose
        // earlier holder may have issued up to a minute ahead of this shard's clock.
        let outcome = ids.on_claim(
            Ok(IdGrant {
                slot: 2,
                not_before_ms: WALL + 60_000,
            }),
            LEASE / 3,
        );
        assert_eq!(
            outcome,
            Claimed::Took {
                slot: 2,
                from: Some(1)
            }
        );
        let after = ids.next(WALL, LEASE / 3).unwrap();
        assert_eq!(slot_of(after), 2);
        assert!(after > before);
        assert!(after >> (ID_SLOT_BITS + ID_SEQ_BITS) > WALL + 60_000 - ID_EPOCH_MS);
    }

    #[test]
    fn a_claim_that_could_not_be_sent_is_asked_again() {
        let mut ids = MessageIds::claimed_under(LEASE);
        assert_eq!(ids.claim_due(0), Some(None));
        ids.not_asked();
        assert_eq!(ids.claim_due(CLAIM_RETRY_MS), Some(None));
        // An answer that never comes is not waited for past a lease.
        assert_eq!(ids.claim_due(CLAIM_RETRY_MS + LEASE - 1), None);
        assert_eq!(ids.claim_due(CLAIM_RETRY_MS + LEASE), Some(None));
    }
}
