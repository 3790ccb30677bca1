//! The embedded, in-process offline inbox: serves when no Redis is configured. Bounded by
//! [`InboxLimits`], lost on restart.
//!
//! # What it owns
//! A [`MemoryInbox`] owns the stored messages of every user of one shard, one ordered queue
//! per user with a non-empty inbox, and the shard-wide [`InboxSeq`] counter.
//!
//! # How
//! * Per user, a `VecDeque` of slots in seq order. Removing an entry (an ack, possibly out of
//!   order: entry 5 while 3 and 4 remain) finds it by binary search and leaves a tombstone
//!   (the message's heap parts are freed at once; its slot stays). Tombstones at either end
//!   are popped at once, so both ends are always live entries; the queue is compacted when
//!   tombstones outnumber live entries, so it never holds more than twice the live entries.
//! * A user whose inbox becomes empty is removed from the map: an empty inbox holds no memory.
//! * Seqs come from one counter for the whole store, so they increase per user (they increase
//!   globally), survive a user's inbox becoming empty, and cost nothing per user. Starting at
//!   1, a `u64` does not wrap in practice.
//! * Expiry: entries are appended in time order (a `now` earlier than the user's newest
//!   entry is raised to it, so a clock stepping back delays expiry, never advances it), so the
//!   expired entries of a user are a prefix of its queue. `read` skips them at once; `append`
//!   drops the appending user's expired prefix before checking the cap (an inbox full of
//!   expired entries must not refuse new ones), and those drops are reported by the next
//!   `expire`, which sweeps every user.
//!
//! # Cost (n = the user's entries)
//! * `append`: O(1) amortised (plus the expired prefix it drops). `remove`: O(log n) plus
//!   amortised O(1) compaction. `read`: O(log n + entries scanned), where the scan passes at
//!   most the expired prefix and as many tombstones as live entries. `len`: O(1).
//! * `expire`: O(users with a non-empty inbox + entries dropped); meant for a periodic sweep.
//! * Memory: 112 bytes per entry (96-byte [`StoredMessage`] + seq + time) plus the message's
//!   heap parts (`body`, shared with the other copies of the message, with its 16-byte count;
//!   `cid` and `from` only when over 24 bytes), one map slot (24-byte inline
//!   user id + 88 bytes, 48 of them the read receipt index) per user with a non-empty inbox, and nothing for the others.
//!   A tombstone keeps its 88-byte slot until compacted.

use std::collections::VecDeque;

use crate::hash::FastMap;

use compact_str::CompactString;

use super::{Inbox, InboxLimits, InboxSeq, StoreError, StoredMessage};

/// One sender's messages waiting in an inbox (see [`MemoryInbox::summarize`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderSummary {
    pub from: CompactString,
    pub count: u64,
    /// (id, ts) of the oldest and the newest of them.
    pub oldest: (u64, u64),
    pub newest: (u64, u64),
}

/// Capacities below this are never shrunk: not worth a reallocation.
const SHRINK_FLOOR: usize = 16;

/// One entry, or a tombstone once removed.
#[derive(Debug)]
struct Slot {
    seq: InboxSeq,
    appended_at: u64,
    /// `None`: removed (acked), waiting to be compacted away.
    msg: Option<StoredMessage>,
}

/// One user's non-empty inbox.
#[derive(Debug, Default)]
struct UserInbox {
    /// Seq order; first and last are live.
    slots: VecDeque<Slot>,
    /// Live (non-tombstone) slots.
    live: usize,
    /// The live read receipt per (reader, key) (the key names the sender whose messages were
    /// read, see `proto::receipt_key`): a later receipt replaces an earlier one still here
    /// instead of queueing behind it.
    receipts: FastMap<(CompactString, Box<str>), InboxSeq>,
}

impl UserInbox {
    /// Add an entry at the back; a read receipt removes the earlier one with its key (or,
    /// if that one is for a later message, is itself dropped: receipts only move forward).
    /// Returns how many entries that removed (0 or 1).
    fn push(&mut self, slot: Slot) -> usize {
        let key = slot.msg.as_ref().and_then(receipt_key);
        let seq = slot.seq;
        let id = slot.msg.as_ref().map_or(0, |m| m.id);
        self.slots.push_back(slot);
        self.live += 1;
        let Some(key) = key else {
            return 0;
        };
        if self
            .receipts
            .get(&key)
            .is_some_and(|older| self.id_at(*older) > Some(id))
        {
            self.take(seq);
            self.tidy();
            return 1;
        }
        match self.receipts.insert(key, seq) {
            Some(older) if self.take(older) => {
                self.tidy();
                1
            }
            _ => 0,
        }
    }

    /// The id of the live entry at `seq`.
    fn id_at(&self, seq: InboxSeq) -> Option<u64> {
        let i = self.slots.binary_search_by_key(&seq, |s| s.seq).ok()?;
        self.slots[i].msg.as_ref().map(|m| m.id)
    }

    /// Tombstone the entry at `seq`; false if it is not here (any more).
    fn take(&mut self, seq: InboxSeq) -> bool {
        let Ok(i) = self.slots.binary_search_by_key(&seq, |s| s.seq) else {
            return false;
        };
        let Some(msg) = self.slots[i].msg.take() else {
            return false;
        };
        if let Some(key) = receipt_key(&msg) {
            if self.receipts.get(&key) == Some(&seq) {
                self.receipts.remove(&key);
            }
        }
        self.live -= 1;
        true
    }

    /// Pop tombstones at both ends, compact when tombstones outnumber live entries, and give
    /// capacity back after a large shrink. Amortised O(1) per removal: a compaction costs
    /// fewer than twice the tombstones it clears, each of which was one removal.
    fn tidy(&mut self) {
        while self.slots.front().is_some_and(|s| s.msg.is_none()) {
            self.slots.pop_front();
        }
        while self.slots.back().is_some_and(|s| s.msg.is_none()) {
            self.slots.pop_back();
        }
        if self.slots.len() - self.live > self.live {
            self.slots.retain(|s| s.msg.is_some());
        }
        let (len, cap) = (self.slots.len(), self.slots.capacity());
        if cap > SHRINK_FLOOR && cap / 4 > len {
            self.slots.shrink_to(len * 2);
        }
    }

    /// Drop the expired prefix at `now`; returns how many entries it dropped.
    fn expire_front(&mut self, now: u64, max_age_ms: u64) -> usize {
        let mut dropped = 0;
        while let Some(front) = self.slots.front() {
            if !expired(front.appended_at, now, max_age_ms) {
                break;
            }
            // The front is live (tidy keeps it so).
            self.slots.pop_front();
            self.live -= 1;
            dropped += 1;
            self.tidy();
        }
        dropped
    }
}

/// A read receipt's (reader, key); None for a message.
fn receipt_key(msg: &StoredMessage) -> Option<(CompactString, Box<str>)> {
    let key = crate::proto::receipt_key(&msg.cid)?;
    Some((msg.from.clone(), key.into()))
}

fn expired(appended_at: u64, now: u64, max_age_ms: u64) -> bool {
    now.saturating_sub(appended_at) > max_age_ms
}

/// The embedded inbox; see the module documentation.
#[derive(Debug)]
pub struct MemoryInbox {
    limits: InboxLimits,
    /// Only users with at least one live entry.
    users: FastMap<CompactString, UserInbox>,
    /// Next seq to assign, shared by all users.
    next_seq: InboxSeq,
    /// Live entries over all users.
    total: usize,
    /// Expired entries dropped by `append`, not yet reported by `expire`.
    dropped_unreported: usize,
}

impl MemoryInbox {
    /// Empty; allocates nothing until the first append.
    pub fn new(limits: InboxLimits) -> Self {
        MemoryInbox {
            limits,
            users: FastMap::default(),
            next_seq: 1,
            total: 0,
            dropped_unreported: 0,
        }
    }

    pub fn limits(&self) -> &InboxLimits {
        &self.limits
    }

    /// Entries held over all users (for metrics).
    pub fn total_len(&self) -> usize {
        self.total
    }

    /// Users with a non-empty inbox.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Mirror mode (a durable store assigns the seqs): add an entry the store already holds
    /// at `seq`, appended at `appended_at`. No cap check: the store enforced it. Returns false
    /// (and adds nothing) unless `seq` is beyond the user's newest entry, so a stale answer
    /// can never reorder the mirror.
    pub fn insert_at(
        &mut self,
        user: &str,
        seq: InboxSeq,
        msg: StoredMessage,
        appended_at: u64,
    ) -> bool {
        let inbox = match self.users.get_mut(user) {
            Some(inbox) => inbox,
            None => self.users.entry(CompactString::from(user)).or_default(),
        };
        if inbox.slots.back().is_some_and(|last| last.seq >= seq) {
            return false;
        }
        let appended_at = inbox
            .slots
            .back()
            .map_or(appended_at, |s| s.appended_at.max(appended_at));
        // `append` (the embedded store) numbers its entries past every seq ever held.
        self.next_seq = self.next_seq.max(seq + 1);
        let superseded = inbox.push(Slot {
            seq,
            appended_at,
            msg: Some(msg),
        });
        self.total = self.total + 1 - superseded;
        true
    }

    /// The next entry's seq is at least `floor` (the embedded store numbers entries by their
    /// append time, see `store/embedded.rs`).
    pub fn raise_next_seq(&mut self, floor: InboxSeq) {
        self.next_seq = self.next_seq.max(floor);
    }

    /// Mirror mode, store unavailable: add an entry the store does *not* hold at `seq`, past
    /// the user's newest entry; the caller puts it after anything a connection of the user
    /// was already given (`InboxMirror::live_position`). No cap check: the caller bounds
    /// these.
    pub fn append_live(&mut self, user: &str, seq: InboxSeq, msg: StoredMessage, now: u64) {
        let added = self.insert_at(user, seq, msg, now);
        debug_assert!(added, "a live entry goes past the user's newest entry");
    }

    /// The seq of `user`'s newest entry.
    pub fn newest(&self, user: &str) -> Option<InboxSeq> {
        self.users.get(user)?.slots.back().map(|s| s.seq)
    }

    /// `user`'s inbox holds an entry at `seq`.
    pub fn holds(&self, user: &str, seq: InboxSeq) -> bool {
        self.users.get(user).is_some_and(|inbox| {
            let found = inbox.slots.binary_search_by_key(&seq, |s| s.seq);
            found.is_ok_and(|i| inbox.slots[i].msg.is_some())
        })
    }

    /// Mirror mode: the user's entries as the store holds them now (oldest first), replacing
    /// whatever the mirror held. Returns what it held that is not expired at `now`.
    pub fn replace_user(
        &mut self,
        user: &str,
        entries: Vec<(InboxSeq, u64, StoredMessage)>,
        now: u64,
    ) -> Vec<(InboxSeq, StoredMessage)> {
        let max_age_ms = self.limits.max_age_ms;
        let held = match self.users.remove(user) {
            Some(inbox) => {
                self.total -= inbox.live;
                let live = inbox
                    .slots
                    .into_iter()
                    .filter(|s| !expired(s.appended_at, now, max_age_ms));
                live.filter_map(|s| Some((s.seq, s.msg?))).collect()
            }
            None => Vec::new(),
        };
        for (seq, appended_at, msg) in entries {
            self.insert_at(user, seq, msg, appended_at);
        }
        held
    }

    /// Per sender, what waits in `user`'s inbox at `now` (read receipts left out): the big-
    /// inbox summary. Ordered by the newest message, newest first. Reads the inbox once,
    /// copying nothing but the senders' names.
    pub fn summarize(&self, user: &str, now: u64) -> Vec<SenderSummary> {
        let Some(inbox) = self.users.get(user) else {
            return Vec::new();
        };
        let mut by_sender: FastMap<&str, SenderSummary> = FastMap::default();
        let live = inbox
            .slots
            .iter()
            .filter(|s| !expired(s.appended_at, now, self.limits.max_age_ms))
            .filter_map(|s| s.msg.as_ref());
        for msg in live.filter(|m| crate::proto::receipt_sender(&m.cid).is_none()) {
            let entry = by_sender.entry(&msg.from).or_insert_with(|| SenderSummary {
                from: msg.from.clone(),
                count: 0,
                oldest: (msg.id, msg.ts),
                newest: (msg.id, msg.ts),
            });
            entry.count += 1;
            entry.newest = (msg.id, msg.ts);
        }
        let mut out: Vec<SenderSummary> = by_sender.into_values().collect();
        out.sort_by(|a, b| b.newest.cmp(&a.newest).then_with(|| a.from.cmp(&b.from)));
        out
    }

    /// Mirror mode: forget a user's entries (the store still holds them).
    pub fn drop_user(&mut self, user: &str) {
        if let Some(inbox) = self.users.remove(user) {
            self.total -= inbox.live;
        }
    }
}

impl Default for MemoryInbox {
    fn default() -> Self {
        MemoryInbox::new(InboxLimits::default())
    }
}

impl Inbox for MemoryInbox {
    fn append(&mut self, user: &str, msg: StoredMessage, now: u64) -> Result<InboxSeq, StoreError> {
        let limits = self.limits;
        let seq = self.next_seq;
        let slot = |appended_at| Slot {
            seq,
            appended_at,
            msg: Some(msg),
        };
        if let Some(inbox) = self.users.get_mut(user) {
            let dropped = inbox.expire_front(now, limits.max_age_ms);
            self.dropped_unreported += dropped;
            self.total -= dropped;
            if inbox.live >= limits.max_messages {
                let count = inbox.live;
                if count == 0 {
                    // Emptied by expiry (only possible with max_messages == 0).
                    self.users.remove(user);
                }
                return Err(StoreError::Full {
                    user: user.to_owned(),
                    count,
                });
            }
            let appended_at = inbox.slots.back().map_or(now, |s| s.appended_at.max(now));
            let superseded = inbox.push(slot(appended_at));
            self.total -= superseded;
        } else {
            if limits.max_messages == 0 {
                return Err(StoreError::Full {
                    user: user.to_owned(),
                    count: 0,
                });
            }
            let mut inbox = UserInbox::default();
            inbox.push(slot(now));
            self.users.insert(CompactString::from(user), inbox);
        }
        self.next_seq += 1;
        self.total += 1;
        Ok(seq)
    }

    fn read(
        &self,
        user: &str,
        after: InboxSeq,
        limit: usize,
        now: u64,
    ) -> Vec<(InboxSeq, StoredMessage)> {
        let Some(inbox) = self.users.get(user) else {
            return Vec::new();
        };
        let start = inbox.slots.partition_point(|s| s.seq <= after);
        inbox
            .slots
            .range(start..)
            .filter(|s| !expired(s.appended_at, now, self.limits.max_age_ms))
            .filter_map(|s| s.msg.as_ref().map(|m| (s.seq, m.clone())))
            .take(limit)
            .collect()
    }

    fn remove(&mut self, user: &str, seq: InboxSeq) -> bool {
        let Some(inbox) = self.users.get_mut(user) else {
            return false;
        };
        if !inbox.take(seq) {
            return false;
        }
        self.total -= 1;
        if inbox.live == 0 {
            self.users.remove(user);
        } else {
            inbox.tidy();
        }
        true
    }

    fn len(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |inbox| inbox.live)
    }

    fn expire(&mut self, now: u64) -> usize {
        let max_age_ms = self.limits.max_age_ms;
        let mut dropped = 0;
        self.users.retain(|_, inbox| {
            dropped += inbox.expire_front(now, max_age_ms);
            inbox.live > 0
        });
        self.total -= dropped;
        if self.users.is_empty() {
            // Give the table back after the last inbox went.
            self.users = FastMap::default();
        }
        dropped + std::mem::take(&mut self.dropped_unreported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 60 * 60 * 1000;
    const T0: u64 = 1_700_000_000_000;

    fn m(id: u64) -> StoredMessage {
        StoredMessage {
            id,
            from: CompactString::from("alice"),
            cid: format!("\"c{id}\"").into(),
            ts: T0 + id,
            body: format!("{{\"text\":\"hello {id}\"}}").into(),
            msg_type: None,
        }
    }

    fn limits(max_messages: usize, max_age_ms: u64) -> InboxLimits {
        InboxLimits {
            max_messages,
            max_age_ms,
        }
    }

    fn ids(entries: &[(InboxSeq, StoredMessage)]) -> Vec<u64> {
        entries.iter().map(|(_, m)| m.id).collect()
    }

    fn seqs(entries: &[(InboxSeq, StoredMessage)]) -> Vec<InboxSeq> {
        entries.iter().map(|&(s, _)| s).collect()
    }

    #[test]
    fn sizes_and_defaults() {
        println!(
            "size_of::<StoredMessage>() = {}, per entry = {}, per user = {}",
            std::mem::size_of::<StoredMessage>(),
            std::mem::size_of::<Slot>(),
            std::mem::size_of::<(CompactString, UserInbox)>()
        );
        // 88 until backend messages got a `type` (16 bytes, None for nearly every message);
        // 112 since the cid is inline (8 more here, no heap block for a cid of up to 24 bytes).
        assert!(std::mem::size_of::<Slot>() <= 112);
        let l = InboxLimits::default();
        assert_eq!(l.max_messages, 10_000);
        assert_eq!(l.max_age_ms, 72 * HOUR);
        let inbox = MemoryInbox::default();
        assert_eq!(inbox.users.capacity(), 0);
    }

    fn receipt(by: &str, sender: &str, id: u64) -> StoredMessage {
        StoredMessage {
            id,
            from: by.into(),
            cid: crate::proto::receipt_cid(sender, id),
            ts: 0,
            body: "null".into(),
            msg_type: None,
        }
    }

    #[test]
    fn a_later_read_receipt_replaces_the_earlier_one_of_its_reader_and_sender() {
        let mut inbox = MemoryInbox::new(limits(100, HOUR));
        let a1 = inbox
            .append("alice", receipt("bob", "alice", 10), T0)
            .unwrap();
        inbox.append("alice", m(1), T0).unwrap();
        inbox
            .append("alice", receipt("carol", "alice", 11), T0)
            .unwrap();
        let a2 = inbox
            .append("alice", receipt("bob", "alice", 12), T0)
            .unwrap();
        // bob's first receipt is gone; carol's (another reader) stays.
        let all = inbox.read("alice", 0, 10, T0);
        assert_eq!(ids(&all), vec![1, 11, 12]);
        assert_eq!(inbox.len("alice"), 3);
        assert_eq!(inbox.total_len(), 3);
        assert!(!inbox.remove("alice", a1), "already replaced");
        // One for an earlier message does not replace a later one: it is dropped.
        let a0 = inbox
            .append("alice", receipt("bob", "alice", 11), T0)
            .unwrap();
        assert_eq!(ids(&inbox.read("alice", 0, 10, T0)), vec![1, 11, 12]);
        assert!(!inbox.remove("alice", a0));
        assert!(inbox.remove("alice", a2));
        // Mirror mode the same; a receipt already acked is not replaced twice.
        assert!(inbox.insert_at("dave", 5, receipt("erin", "dave", 1), T0));
        assert!(inbox.insert_at("dave", 6, receipt("erin", "dave", 2), T0));
        assert!(inbox.remove("dave", 6));
        assert!(inbox.insert_at("dave", 7, receipt("erin", "dave", 3), T0));
        assert_eq!(ids(&inbox.read("dave", 0, 10, T0)), vec![3]);
        assert_eq!(inbox.total_len(), 3);
    }

    #[test]
    fn a_summary_counts_each_senders_waiting_messages_newest_first() {
        let mut inbox = MemoryInbox::new(limits(100, HOUR));
        let from = |who: &str, id: u64, ts: u64| StoredMessage {
            from: who.into(),
            ts,
            ..m(id)
        };
        inbox.append("bob", from("ann", 1, 10), T0).unwrap();
        inbox.append("bob", from("cy", 2, 20), T0).unwrap();
        let gone = inbox.append("bob", from("ann", 3, 30), T0).unwrap();
        inbox.append("bob", from("ann", 4, 40), T0).unwrap();
        inbox.append("bob", receipt("cy", "bob", 9), T0).unwrap();
        assert!(inbox.remove("bob", gone));
        let s = inbox.summarize("bob", T0);
        assert_eq!(
            s,
            vec![
                SenderSummary {
                    from: "ann".into(),
                    count: 2,
                    oldest: (1, 10),
                    newest: (4, 40)
                },
                SenderSummary {
                    from: "cy".into(),
                    count: 1,
                    oldest: (2, 20),
                    newest: (2, 20)
                },
            ]
        );
        assert!(inbox.summarize("nobody", T0).is_empty());
        assert!(inbox.summarize("bob", T0 + HOUR + 1).is_empty(), "expired");
    }

    #[test]
    fn mirror_mode_keeps_store_seqs_in_order_and_forgets_on_demand() {
        let mut inbox = MemoryInbox::new(limits(2, HOUR));
        assert!(inbox.insert_at("bob", 100, m(1), T0));
        assert!(inbox.insert_at("bob", 205, m(2), T0 + 1));
        // Beyond the cap is fine (the store enforced it); an older seq is refused.
        assert!(inbox.insert_at("bob", 300, m(3), T0 + 2));
        assert!(!inbox.insert_at("bob", 300, m(9), T0 + 3));
        assert!(!inbox.insert_at("bob", 150, m(9), T0 + 3));
        let all = inbox.read("bob", 0, 10, T0 + 5);
        assert_eq!(seqs(&all), vec![100, 205, 300]);
        assert_eq!(ids(&all), vec![1, 2, 3]);
        assert!(inbox.remove("bob", 205));
        assert_eq!(inbox.total_len(), 2);
        // What it held comes back (acked entries are not held), for the mirror to tell which
        // left the store.
        let held = inbox.replace_user("bob", vec![(300, T0, m(3)), (400, T0, m(4))], T0 + 5);
        let held: Vec<(u64, u64)> = held.iter().map(|(seq, msg)| (*seq, msg.id)).collect();
        assert_eq!(held, vec![(100, 1), (300, 3)]);
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0 + 5)), vec![3, 4]);
        // Past the age cap, an entry held is not handed back.
        let held = inbox.replace_user("bob", Vec::new(), T0 + HOUR + 1);
        assert!(held.is_empty());
        assert!(inbox
            .replace_user("bob", vec![(300, T0, m(3)), (400, T0, m(4))], T0)
            .is_empty());
        assert_eq!(inbox.total_len(), 2);
        inbox.drop_user("bob");
        assert_eq!(inbox.total_len(), 0);
        assert_eq!(inbox.len("bob"), 0);
        assert_eq!(inbox.users(), 0);
    }

    #[test]
    fn live_entries_go_where_the_caller_puts_them_and_the_stores_later_ones_after() {
        let mut inbox = MemoryInbox::new(limits(2, HOUR));
        assert!(inbox.insert_at("bob", 500, m(1), T0));
        assert!(inbox.remove("bob", 500));
        inbox.append_live("bob", 700, m(3), T0 + 1);
        inbox.append_live("bob", 701, m(4), T0 + 2);
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0 + 5)), vec![3, 4]);
        // Not capped here (the caller bounds live entries), and the store's later seqs still
        // go after them.
        assert_eq!(inbox.len("bob"), 2);
        assert!(!inbox.insert_at("bob", 600, m(5), T0 + 3), "not below them");
        assert!(inbox.insert_at("bob", 800, m(5), T0 + 3));
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0 + 5)), vec![3, 4, 5]);
    }

    #[test]
    fn keeps_order_and_reads_in_pages() {
        let mut inbox = MemoryInbox::default();
        let got: Vec<InboxSeq> = (1..=10)
            .map(|i| inbox.append("bob", m(i), T0 + i).unwrap())
            .collect();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        assert!(got[0] > 0);
        assert_eq!(inbox.len("bob"), 10);
        let all = inbox.read("bob", 0, 100, T0 + 20);
        assert_eq!(ids(&all), (1..=10).collect::<Vec<_>>());
        assert_eq!(seqs(&all), got);
        // Paging: "after" is exclusive.
        let page1 = inbox.read("bob", 0, 4, T0 + 20);
        assert_eq!(ids(&page1), vec![1, 2, 3, 4]);
        let page2 = inbox.read("bob", page1[3].0, 4, T0 + 20);
        assert_eq!(ids(&page2), vec![5, 6, 7, 8]);
        let page3 = inbox.read("bob", page2[3].0, 4, T0 + 20);
        assert_eq!(ids(&page3), vec![9, 10]);
        assert!(inbox.read("bob", page3[1].0, 4, T0 + 20).is_empty());
        assert!(inbox.read("bob", 0, 0, T0 + 20).is_empty());
        assert!(inbox.read("nobody", 0, 10, T0).is_empty());
        assert_eq!(all[2].1, m(3));
    }

    #[test]
    fn full_inbox_refuses_and_drops_nothing() {
        let mut inbox = MemoryInbox::new(limits(3, HOUR));
        for i in 1..=3 {
            inbox.append("bob", m(i), T0).unwrap();
        }
        let err = inbox.append("bob", m(4), T0 + 1).unwrap_err();
        assert!(matches!(&err, StoreError::Full { user, count: 3 } if user == "bob"));
        assert_eq!(err.to_string(), "inbox of bob is full (3 messages)");
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0 + 1)), vec![1, 2, 3]);
        assert_eq!(inbox.len("bob"), 3);
        // Another user is not affected.
        inbox.append("carol", m(5), T0).unwrap();
        // An ack makes room for exactly one.
        let first = inbox.read("bob", 0, 1, T0)[0].0;
        inbox.remove("bob", first);
        inbox.append("bob", m(4), T0 + 2).unwrap();
        assert!(inbox.append("bob", m(6), T0 + 2).is_err());
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0 + 2)), vec![2, 3, 4]);
    }

    #[test]
    fn zero_cap_refuses_without_keeping_anything() {
        let mut inbox = MemoryInbox::new(limits(0, HOUR));
        assert!(matches!(
            inbox.append("bob", m(1), T0),
            Err(StoreError::Full { count: 0, .. })
        ));
        assert_eq!(inbox.users(), 0);
    }

    #[test]
    fn expiry_by_age_and_read_skips_expired_before_the_sweep() {
        let mut inbox = MemoryInbox::new(limits(100, 10 * HOUR));
        inbox.append("bob", m(1), T0).unwrap();
        inbox.append("bob", m(2), T0 + HOUR).unwrap();
        inbox.append("bob", m(3), T0 + 2 * HOUR).unwrap();
        // Exactly max_age old is not expired yet; one ms more is.
        assert_eq!(
            ids(&inbox.read("bob", 0, 10, T0 + 10 * HOUR)),
            vec![1, 2, 3]
        );
        assert_eq!(
            ids(&inbox.read("bob", 0, 10, T0 + 10 * HOUR + 1)),
            vec![2, 3]
        );
        assert_eq!(ids(&inbox.read("bob", 0, 1, T0 + 11 * HOUR + 1)), vec![3]);
        // Not swept yet: still held.
        assert_eq!(inbox.len("bob"), 3);
        assert_eq!(inbox.expire(T0 + 11 * HOUR + 1), 2);
        assert_eq!(inbox.len("bob"), 1);
        assert_eq!(inbox.total_len(), 1);
        assert_eq!(inbox.expire(T0 + 11 * HOUR + 1), 0);
        assert_eq!(inbox.expire(T0 + 12 * HOUR + 1), 1);
        assert_eq!(inbox.users(), 0);
        assert_eq!(inbox.total_len(), 0);
    }

    #[test]
    fn append_drops_the_expired_prefix_and_expire_reports_it() {
        let mut inbox = MemoryInbox::new(limits(2, HOUR));
        inbox.append("bob", m(1), T0).unwrap();
        inbox.append("bob", m(2), T0 + 10).unwrap();
        assert!(inbox.append("bob", m(3), T0 + 20).is_err());
        // Both expired: the inbox is not full any more.
        inbox.append("bob", m(3), T0 + HOUR + 11).unwrap();
        assert_eq!(inbox.len("bob"), 1);
        assert_eq!(inbox.total_len(), 1);
        // The two dropped by append are reported by the next sweep, not lost silently.
        assert_eq!(inbox.expire(T0 + HOUR + 11), 2);
        assert_eq!(inbox.expire(T0 + HOUR + 11), 0);
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0 + HOUR + 11)), vec![3]);
    }

    #[test]
    fn a_clock_stepping_back_delays_expiry() {
        let mut inbox = MemoryInbox::new(limits(10, HOUR));
        inbox.append("bob", m(1), T0 + 1_000).unwrap();
        inbox.append("bob", m(2), T0).unwrap(); // kept as appended at T0 + 1000
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0 + HOUR + 500)), vec![1, 2]);
        assert_eq!(inbox.expire(T0 + HOUR + 1_000), 0);
        assert_eq!(inbox.expire(T0 + HOUR + 1_001), 2);
    }

    #[test]
    fn out_of_order_removal() {
        let mut inbox = MemoryInbox::default();
        let s: Vec<InboxSeq> = (1..=6)
            .map(|i| inbox.append("bob", m(i), T0).unwrap())
            .collect();
        // Ack entry 5 while 3 and 4 remain, then the rest in a scrambled order.
        assert!(inbox.remove("bob", s[4]));
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0)), vec![1, 2, 3, 4, 6]);
        assert_eq!(inbox.len("bob"), 5);
        assert!(!inbox.remove("bob", s[4])); // already removed: no-op
        assert!(!inbox.remove("bob", 999_999)); // unknown: no-op
        assert!(!inbox.remove("nobody", s[0])); // unknown user: no-op
        assert_eq!(inbox.len("bob"), 5);
        inbox.remove("bob", s[0]);
        inbox.remove("bob", s[2]);
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0)), vec![2, 4, 6]);
        // Reading after a removed seq still works.
        assert_eq!(ids(&inbox.read("bob", s[2], 10, T0)), vec![4, 6]);
        assert_eq!(ids(&inbox.read("bob", s[4], 10, T0)), vec![6]);
        inbox.remove("bob", s[5]);
        inbox.remove("bob", s[1]);
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0)), vec![4]);
        let u = &inbox.users["bob"];
        assert_eq!(u.slots.len(), 1, "tombstones at the ends are popped");
        inbox.remove("bob", s[3]);
        assert_eq!(inbox.len("bob"), 0);
        assert_eq!(inbox.total_len(), 0);
    }

    #[test]
    fn tombstones_stay_bounded() {
        let mut inbox = MemoryInbox::default();
        let s: Vec<InboxSeq> = (0..1_000)
            .map(|i| inbox.append("bob", m(i), T0).unwrap())
            .collect();
        // Keep the first entry unacked and ack everything behind it except the last.
        for &seq in &s[1..999] {
            inbox.remove("bob", seq);
            let u = &inbox.users["bob"];
            assert!(
                u.slots.len() <= 2 * u.live + 1,
                "{} slots for {} live",
                u.slots.len(),
                u.live
            );
        }
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0)), vec![0, 999]);
        let u = &inbox.users["bob"];
        assert!(
            u.slots.capacity() <= 4 * SHRINK_FLOOR,
            "{}",
            u.slots.capacity()
        );
    }

    #[test]
    fn empty_user_holds_no_entry_and_seqs_keep_increasing() {
        let mut inbox = MemoryInbox::default();
        let a = inbox.append("bob", m(1), T0).unwrap();
        inbox.remove("bob", a);
        assert_eq!(inbox.users(), 0);
        assert!(!inbox.users.contains_key("bob"));
        let b = inbox.append("bob", m(2), T0).unwrap();
        assert!(b > a, "{b} <= {a}");
        // Through expiry as well.
        assert_eq!(inbox.expire(T0 + 73 * HOUR), 1);
        assert_eq!(inbox.users(), 0);
        let c = inbox.append("bob", m(3), T0 + 73 * HOUR).unwrap();
        assert!(c > b);
        // Reading "after" an old seq from before the inbox emptied still works.
        assert_eq!(ids(&inbox.read("bob", a, 10, T0 + 73 * HOUR)), vec![3]);
        assert_eq!(
            ids(&inbox.read("bob", c, 10, T0 + 73 * HOUR)),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn users_are_independent() {
        let mut inbox = MemoryInbox::new(limits(2, HOUR));
        let b1 = inbox.append("bob", m(1), T0).unwrap();
        let c1 = inbox.append("carol", m(2), T0).unwrap();
        inbox.append("bob", m(3), T0).unwrap();
        assert!(inbox.append("bob", m(4), T0).is_err());
        inbox.append("carol", m(4), T0).unwrap();
        assert_eq!(ids(&inbox.read("bob", 0, 10, T0)), vec![1, 3]);
        assert_eq!(ids(&inbox.read("carol", 0, 10, T0)), vec![2, 4]);
        // A seq of one user means nothing in another's inbox.
        inbox.remove("carol", b1);
        inbox.remove("bob", c1);
        assert_eq!(inbox.len("bob"), 2);
        assert_eq!(inbox.len("carol"), 2);
        assert_eq!(inbox.total_len(), 4);
        assert_eq!(inbox.users(), 2);
        // Long user ids (not inline) work the same.
        let long = "user-with-a-rather-long-identifier-0123456789";
        inbox.append(long, m(9), T0).unwrap();
        assert_eq!(ids(&inbox.read(long, 0, 10, T0)), vec![9]);
    }

    #[test]
    fn usable_as_a_trait_object() {
        let mut store: Box<dyn Inbox> = Box::new(MemoryInbox::default());
        let s = store.append("bob", m(1), T0).unwrap();
        assert_eq!(store.len("bob"), 1);
        store.remove("bob", s);
        assert_eq!(store.len("bob"), 0);
    }

    use crate::test_rng::Rng;

    /// Reference model: a VecDeque of (seq, msg, appended_at) per user, scanned linearly.
    type Model = FastMap<String, VecDeque<(InboxSeq, StoredMessage, u64)>>;

    fn model_expire(model: &mut Model, user: Option<&str>, now: u64, max_age: u64) -> usize {
        let mut dropped = 0;
        for (name, q) in model.iter_mut() {
            if user.is_some_and(|u| u != name) {
                continue;
            }
            let before = q.len();
            q.retain(|e| !expired(e.2, now, max_age));
            dropped += before - q.len();
        }
        model.retain(|_, q| !q.is_empty());
        dropped
    }

    fn differential(seed: u64, lim: InboxLimits, ops: usize, expect_full: bool) {
        const USERS: [&str; 6] = [
            "a",
            "bob",
            "carol",
            "d",
            "e",
            "user-with-a-long-name-over-24-bytes",
        ];
        let mut rng = Rng(seed);
        let mut inbox = MemoryInbox::new(lim);
        let mut model: Model = FastMap::default();
        let mut now = T0;
        let mut last_seq = 0;
        let mut next_id = 1;
        let mut unreported = 0;
        let mut counts = [0usize; 6];
        for op in 0..ops {
            let kind = rng.below(100);
            if (85..=96).contains(&kind) {
                now += rng.below(lim.max_age_ms / 50 + 1);
            }
            let ctx = || format!("seed {seed:#x}, limits {lim:?}, op {op}, now {now}");
            let user = USERS[rng.below(USERS.len() as u64) as usize];
            match kind {
                0..=39 => {
                    let msg = m(next_id);
                    next_id += 1;
                    let got = inbox.append(user, msg.clone(), now);
                    unreported += model_expire(&mut model, Some(user), now, lim.max_age_ms);
                    let held = model.get(user).map_or(0, |q| q.len());
                    if held >= lim.max_messages {
                        match got {
                            Err(StoreError::Full { user: u, count }) => {
                                assert_eq!((u.as_str(), count), (user, held), "{}", ctx());
                            }
                            other => panic!("expected Full, got {other:?}; {}", ctx()),
                        }
                        counts[1] += 1;
                    } else {
                        let seq = got.unwrap_or_else(|e| panic!("{e}; {}", ctx()));
                        assert!(seq > last_seq, "seq {seq} after {last_seq}; {}", ctx());
                        last_seq = seq;
                        model
                            .entry(user.to_string())
                            .or_default()
                            .push_back((seq, msg, now));
                        counts[0] += 1;
                    }
                }
                // Ack: mostly the oldest few (in-order replay), sometimes anything.
                40..=69 => {
                    let Some(q) = model.get_mut(user) else {
                        inbox.remove(user, rng.below(last_seq + 2));
                        continue;
                    };
                    let seq = match rng.below(10) {
                        0 => rng.below(last_seq + 2), // unknown or someone else's
                        1..=4 => q[rng.below(q.len() as u64) as usize].0,
                        _ => q[rng.below(q.len().min(3) as u64) as usize].0,
                    };
                    inbox.remove(user, seq);
                    if let Some(i) = q.iter().position(|e| e.0 == seq) {
                        q.remove(i);
                        counts[2] += 1;
                    }
                    if q.is_empty() {
                        model.remove(user);
                    }
                }
                70..=84 => {
                    let after = match (rng.below(3), model.get(user)) {
                        (0, Some(q)) => q[rng.below(q.len() as u64) as usize].0,
                        (1, _) => rng.below(last_seq + 2),
                        _ => 0,
                    };
                    let limit = rng.below(8) as usize;
                    let got = inbox.read(user, after, limit, now);
                    let want: Vec<(InboxSeq, StoredMessage)> = model
                        .get(user)
                        .into_iter()
                        .flatten()
                        .filter(|e| e.0 > after && !expired(e.2, now, lim.max_age_ms))
                        .take(limit)
                        .map(|e| (e.0, e.1.clone()))
                        .collect();
                    assert_eq!(
                        got,
                        want,
                        "read {user} after {after} limit {limit}; {}",
                        ctx()
                    );
                    counts[3] += 1;
                }
                85..=96 => {}
                _ => {
                    let got = inbox.expire(now);
                    let want = model_expire(&mut model, None, now, lim.max_age_ms) + unreported;
                    unreported = 0;
                    assert_eq!(got, want, "expire; {}", ctx());
                    counts[4] += got;
                    counts[5] += 1;
                }
            }
            assert_eq!(
                inbox.len(user),
                model.get(user).map_or(0, |q| q.len()),
                "len {user}; {}",
                ctx()
            );
            assert_eq!(inbox.users(), model.len(), "users; {}", ctx());
            assert_eq!(
                inbox.total_len(),
                model.values().map(|q| q.len()).sum::<usize>(),
                "total; {}",
                ctx()
            );
            for (name, u) in &inbox.users {
                assert!(u.live > 0, "empty user {name} kept; {}", ctx());
                assert!(
                    u.slots.len() <= 2 * u.live,
                    "{name}: {} slots, {} live; {}",
                    u.slots.len(),
                    u.live,
                    ctx()
                );
                assert!(
                    u.slots.front().is_some_and(|s| s.msg.is_some()),
                    "{}",
                    ctx()
                );
                assert!(u.slots.back().is_some_and(|s| s.msg.is_some()), "{}", ctx());
            }
        }
        println!(
            "seed {seed:#x}: appended {}, refused {}, removed {}, reads {}, expired {}, sweeps {}",
            counts[0], counts[1], counts[2], counts[3], counts[4], counts[5]
        );
        assert_eq!(counts[1] > 0, expect_full, "refusals: {counts:?}");
        counts[1] = 1;
        assert!(
            counts.iter().all(|&c| c > 0),
            "an operation never happened: {counts:?}"
        );
    }

    #[test]
    fn differential_against_reference_model() {
        // 50,000 operations per configuration.
        differential(0x9E37_79B9_7F4A_7C15, limits(40, 60_000), 50_000, true);
        differential(0x5851_F42D_4C95_7F2D, limits(400, 3_600_000), 50_000, false);
    }
}
