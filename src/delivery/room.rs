//! One room's log on its home shard (SPEC sections 3-4): offsets, the recovery history and the
//! publish dedup. Pure logic: time is injected, nothing here touches sockets or shards.
//!
//! * Offsets increase by one per publish. A room starts at a `base` the caller picks (the
//!   shard uses the wall clock in microseconds), so a gateway restarted with an empty embedded
//!   history never hands out an offset a client saw in an earlier run: such a client's `since`
//!   is then below the history and it hears `recovered:false`.
//! * The history keeps the last `max` messages not older than `max_age_ms`.
//! * Publish dedup by `(from, cid)` covers the history: a resend whose first copy is still in
//!   the history is answered with the first offset and id, and published nothing. (Older ones
//!   are published again; members drop them by `(from, cid)` as they do direct messages.)

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use compact_str::CompactString;

/// A published room message, encoded once for every member.
#[derive(Debug)]
pub struct RoomMsg {
    pub room: CompactString,
    pub offset: u64,
    pub id: u64,
    pub from: CompactString,
    pub cid: Box<str>,
    /// When it was published (the caller's clock, ms): drives the history's age cap.
    pub at_ms: u64,
    /// The whole `room` frame's JSON text.
    pub frame: Box<[u8]>,
}

/// Bounds of a room's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    pub max: usize,
    pub max_age_ms: u64,
}

/// What a `join` with `since` gets.
#[derive(Debug)]
pub struct Recovery {
    /// Messages after `since` still in the history, oldest first.
    pub replay: Vec<Arc<RoomMsg>>,
    /// True when `replay` holds every message after `since`.
    pub recovered: bool,
}

#[derive(Debug)]
pub struct RoomLog {
    /// The offset before this log's first message.
    base: u64,
    /// No message of the room has an offset between this and `base` (inclusive of `base`):
    /// a `since` at or after it misses nothing older than this log (see
    /// [`RoomLog::nothing_before`]). `base` when unknown.
    complete_after: u64,
    last: u64,
    history: VecDeque<Arc<RoomMsg>>,
    /// `(from, cid)` of the messages in the history -> their offset.
    published: HashMap<(CompactString, Box<str>), u64>,
}

impl RoomLog {
    /// An empty room whose first message gets offset `base + 1`.
    pub fn new(base: u64) -> Self {
        RoomLog {
            base,
            complete_after: base,
            last: base,
            history: VecDeque::new(),
            published: HashMap::new(),
        }
    }

    /// The room existed before (its log was forgotten while empty), but held no message with
    /// an offset after `floor`: a member that saw everything up to `floor` or later misses
    /// nothing this log cannot replay.
    pub fn nothing_before(mut self, floor: u64) -> Self {
        self.complete_after = floor.min(self.base);
        self
    }

    /// Whether any message was ever published in this log.
    pub fn had_messages(&self) -> bool {
        self.last > self.base
    }

    /// The newest offset handed out (the `base` before any publish).
    pub fn last(&self) -> u64 {
        self.last
    }

    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// The first copy of a resent `(from, cid)`, while it is in the history.
    pub fn duplicate(&self, from: &str, cid: &str) -> Option<&Arc<RoomMsg>> {
        let offset = *self
            .published
            .get(&(CompactString::from(from), Box::<str>::from(cid)))?;
        self.at(offset)
    }

    /// Publish: the next offset goes to the message `build` makes for it.
    pub fn append(
        &mut self,
        build: impl FnOnce(u64) -> RoomMsg,
        now: u64,
        limits: HistoryLimits,
    ) -> Arc<RoomMsg> {
        self.last += 1;
        let msg = Arc::new(build(self.last));
        debug_assert_eq!(msg.offset, self.last);
        self.published
            .insert((msg.from.clone(), msg.cid.clone()), msg.offset);
        self.history.push_back(msg.clone());
        self.trim(now, limits);
        msg
    }

    /// What a member that saw everything up to `since` missed.
    pub fn since(&mut self, since: u64, now: u64, limits: HistoryLimits) -> Recovery {
        self.trim(now, limits);
        if since > self.last {
            // An offset this room never handed out (another run, or a made-up one).
            return Recovery {
                replay: Vec::new(),
                recovered: false,
            };
        }
        let first = self.history.front().map_or(self.last + 1, |m| m.offset);
        let replay: Vec<Arc<RoomMsg>> = self
            .history
            .iter()
            .filter(|m| m.offset > since)
            .cloned()
            .collect();
        // Everything after `since` is here: the history reaches back to it, or nothing was
        // trimmed and the room held nothing between `since` and this log's start.
        let untrimmed = first == self.base + 1;
        Recovery {
            replay,
            recovered: since + 1 >= first || (untrimmed && since >= self.complete_after),
        }
    }

    /// Drop what is past the count or age cap; true when the room holds nothing any more.
    pub fn trim(&mut self, now: u64, limits: HistoryLimits) -> bool {
        while let Some(front) = self.history.front() {
            let too_many = self.history.len() > limits.max;
            let too_old = now.saturating_sub(front.at_ms) > limits.max_age_ms;
            if !(too_many || too_old) {
                break;
            }
            let gone = self.history.pop_front().expect("front exists");
            self.published
                .remove(&(gone.from.clone(), gone.cid.clone()));
        }
        self.history.is_empty()
    }

    fn at(&self, offset: u64) -> Option<&Arc<RoomMsg>> {
        let first = self.history.front()?.offset;
        self.history.get(offset.checked_sub(first)? as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HistoryLimits = HistoryLimits {
        max: 3,
        max_age_ms: 1_000,
    };

    fn publish(log: &mut RoomLog, from: &str, cid: &str, now: u64) -> u64 {
        log.append(
            |offset| RoomMsg {
                room: "r".into(),
                offset,
                id: offset * 10,
                from: from.into(),
                cid: cid.into(),
                at_ms: now,
                frame: Box::new([]),
            },
            now,
            LIMITS,
        )
        .offset
    }

    fn offsets(r: &Recovery) -> Vec<u64> {
        r.replay.iter().map(|m| m.offset).collect()
    }

    #[test]
    fn offsets_follow_the_base_and_recovery_is_honest() {
        let mut log = RoomLog::new(100);
        assert_eq!(log.last(), 100);
        let r = log.since(100, 0, LIMITS);
        assert!(r.recovered && r.replay.is_empty(), "nothing missed");
        assert_eq!(publish(&mut log, "a", "1", 0), 101);
        assert_eq!(publish(&mut log, "a", "2", 0), 102);
        let r = log.since(100, 0, LIMITS);
        assert_eq!((offsets(&r), r.recovered), (vec![101, 102], true));
        let r = log.since(101, 0, LIMITS);
        assert_eq!((offsets(&r), r.recovered), (vec![102], true));
        // Past the count cap: the oldest leave; a member behind them is told.
        for c in 3..=5 {
            publish(&mut log, "a", &c.to_string(), 0);
        }
        assert_eq!(log.history_len(), 3);
        let r = log.since(100, 0, LIMITS);
        assert_eq!((offsets(&r), r.recovered), (vec![103, 104, 105], false));
        let r = log.since(102, 0, LIMITS);
        assert_eq!((offsets(&r), r.recovered), (vec![103, 104, 105], true));
        // An offset from the future (another run): nothing to replay, not recovered.
        let r = log.since(10_000, 0, LIMITS);
        assert_eq!((offsets(&r), r.recovered), (vec![], false));
    }

    #[test]
    fn the_age_cap_empties_the_history() {
        let mut log = RoomLog::new(0);
        publish(&mut log, "a", "1", 0);
        publish(&mut log, "a", "2", 500);
        let r = log.since(0, 1_200, LIMITS);
        assert_eq!((offsets(&r), r.recovered), (vec![2], false));
        assert!(log.trim(1_600, LIMITS), "all aged out");
        let r = log.since(2, 1_600, LIMITS);
        assert!(r.recovered, "nothing was missed after 2");
    }

    #[test]
    fn a_resent_cid_finds_its_first_copy_while_in_the_history() {
        let mut log = RoomLog::new(0);
        publish(&mut log, "a", "x", 0);
        assert_eq!(log.duplicate("a", "x").map(|m| m.offset), Some(1));
        assert!(log.duplicate("b", "x").is_none(), "cids are per sender");
        for c in 0..3 {
            publish(&mut log, "a", &format!("y{c}"), 0);
        }
        assert!(log.duplicate("a", "x").is_none(), "left with the history");
        assert_eq!(log.duplicate("a", "y2").map(|m| m.offset), Some(4));
    }

    #[test]
    fn a_room_begun_again_recovers_a_since_from_its_empty_past() {
        // The room held nothing after 150 when it was forgotten; it begins again at 200.
        let mut log = RoomLog::new(200).nothing_before(150);
        publish(&mut log, "a", "1", 0);
        let r = log.since(160, 0, LIMITS);
        assert_eq!((offsets(&r), r.recovered), (vec![201], true));
        // A member from before 150 may have missed what the old room held.
        assert!(!log.since(140, 0, LIMITS).recovered);
        // Without that knowledge (a new run): an older `since` is not recovered.
        let mut fresh = RoomLog::new(200);
        publish(&mut fresh, "a", "1", 0);
        assert!(!fresh.since(160, 0, LIMITS).recovered);
        // Once this log trims, only its history counts.
        for cid in ["2", "3", "4"] {
            publish(&mut log, "a", cid, 0);
        }
        assert!(!log.since(160, 0, LIMITS).recovered);
    }
}
