//! Read receipts on the reader's home shard: what each reader was sent, and what it has told.
//!
//! A `read` names a sender and a message id: "I have read every message of this sender up to
//! this one". It is refused (`bad_request`) unless a message of that sender with an id at
//! least that high was sent to one of the reader's devices through this shard (ids grow with
//! time, so "at least that high" is "that one or a later one"). A receipt at or below one the
//! reader already told is redundant and dropped: each new one supersedes the earlier, so a
//! client may send one per message it shows without flooding its correspondents.
//!
//! State is per (reader, sender) pair and bounded per reader ([`MAX_SENDERS_PER_READER`]: the
//! pair with the oldest message goes first). Pure logic: no I/O, no clock.

use crate::hash::FastMap;

use compact_str::CompactString;

/// Senders remembered per reader; past it, the sender whose last message is oldest is
/// forgotten (a receipt for its messages is then refused as never received).
pub const MAX_SENDERS_PER_READER: usize = 1024;
/// Readers remembered per shard; past it, one is forgotten (with Redis it is read back with
/// its inbox at its next connect; with the embedded store its receipts for what it received
/// before are refused).
pub const MAX_READERS: usize = 200_000;
/// `read`s waiting for their reader's inbox to load (Redis), per shard.
pub const MAX_READS_WAITING: usize = 4096;

/// One (reader, sender) pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PairState {
    /// Highest message id of the sender sent to one of the reader's devices.
    received: u64,
    /// Highest id the reader's receipts have told (0: none).
    told: u64,
    /// Highest id a receipt of the reader was stored for (what `told` falls back to when a
    /// later one could not be stored).
    stored: u64,
}

/// What to do with a `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadVerdict {
    /// A new receipt: store it for the sender's and the reader's devices.
    Tell,
    /// At or below one already told: nothing to do.
    AlreadyTold,
    /// No message of the sender with this id (or a later one) reached the reader.
    NeverReceived,
}

#[derive(Debug, Default)]
pub struct ReadReceipts {
    readers: FastMap<CompactString, FastMap<CompactString, PairState>>,
}

impl ReadReceipts {
    /// A message of `sender` with `id` was sent to a device of `reader`.
    pub fn sent(&mut self, reader: &str, sender: &str, id: u64) {
        // The common case (a pair seen before) looks up twice and allocates nothing.
        if let Some(pair) = self.pair(reader, sender) {
            pair.received = pair.received.max(id);
            return;
        }
        if !self.readers.contains_key(reader) && self.readers.len() >= MAX_READERS {
            let any = self.readers.keys().next().cloned();
            if let Some(any) = any {
                self.readers.remove(&any);
            }
        }
        let pairs = match self.readers.get_mut(reader) {
            Some(pairs) => pairs,
            None => self.readers.entry(reader.into()).or_default(),
        };
        if let Some(pair) = pairs.get_mut(sender) {
            pair.received = pair.received.max(id);
            return;
        }
        if pairs.len() >= MAX_SENDERS_PER_READER {
            let oldest = pairs
                .iter()
                .min_by_key(|(_, p)| p.received)
                .map(|(s, _)| s.clone());
            if let Some(oldest) = oldest {
                pairs.remove(&oldest);
            }
        }
        pairs.insert(
            sender.into(),
            PairState {
                received: id,
                told: 0,
                stored: 0,
            },
        );
    }

    /// Judge `reader`'s `read` of `sender`'s messages up to `id`; a `Tell` is recorded as told.
    pub fn read(&mut self, reader: &str, sender: &str, id: u64) -> ReadVerdict {
        let Some(pair) = self
            .readers
            .get_mut(reader)
            .and_then(|pairs| pairs.get_mut(sender))
        else {
            return ReadVerdict::NeverReceived;
        };
        if id > pair.received {
            return ReadVerdict::NeverReceived;
        }
        if id <= pair.told {
            return ReadVerdict::AlreadyTold;
        }
        pair.told = id;
        ReadVerdict::Tell
    }

    /// The receipt up to `id` could not be stored: a repeat of it is told again (and one
    /// below it, down to the last one stored).
    pub fn not_told(&mut self, reader: &str, sender: &str, id: u64) {
        if let Some(pair) = self.pair(reader, sender) {
            if pair.told == id {
                pair.told = pair.stored;
            }
        }
    }

    /// The receipt up to `id` was stored (for one of the two users it goes to).
    pub fn stored(&mut self, reader: &str, sender: &str, id: u64) {
        if let Some(pair) = self.pair(reader, sender) {
            pair.stored = pair.stored.max(id);
        }
    }

    fn pair(&mut self, reader: &str, sender: &str) -> Option<&mut PairState> {
        self.readers.get_mut(reader)?.get_mut(sender)
    }

    /// Forget a reader (with Redis, when its last device leaves: the store keeps what it was
    /// sent, and the next load brings it back).
    pub fn forget(&mut self, reader: &str) {
        self.readers.remove(reader);
    }

    /// Pairs remembered.
    #[cfg(test)]
    pub fn pairs(&self) -> usize {
        self.readers.values().map(FastMap::len).sum()
    }
}

/// `read`s that came while their reader's inbox was loading (Redis): judged once it loaded.
#[derive(Debug, Default)]
pub struct ReadsWaiting {
    waiting: FastMap<CompactString, Vec<(usize, u32, CompactString, u64)>>,
    count: usize,
}

impl ReadsWaiting {
    /// Keep (connection index, serial, sender, id) for `reader`; false when full.
    pub fn park(&mut self, reader: &str, read: (usize, u32, CompactString, u64)) -> bool {
        if self.count >= MAX_READS_WAITING {
            return false;
        }
        self.count += 1;
        self.waiting.entry(reader.into()).or_default().push(read);
        true
    }

    /// The reader's inbox loaded: its waiting `read`s, in the order they came.
    pub fn take(&mut self, reader: &str) -> Vec<(usize, u32, CompactString, u64)> {
        let reads = self.waiting.remove(reader).unwrap_or_default();
        self.count -= reads.len();
        reads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_needs_a_message_at_or_after_its_id() {
        let mut r = ReadReceipts::default();
        assert_eq!(r.read("bob", "alice", 5), ReadVerdict::NeverReceived);
        r.sent("bob", "alice", 10);
        r.sent("bob", "alice", 7); // an older id later (another node's) keeps the highest
        assert_eq!(r.read("bob", "alice", 11), ReadVerdict::NeverReceived);
        assert_eq!(r.read("bob", "carol", 3), ReadVerdict::NeverReceived);
        assert_eq!(r.read("carol", "alice", 3), ReadVerdict::NeverReceived);
        assert_eq!(r.read("bob", "alice", 7), ReadVerdict::Tell);
        assert_eq!(r.read("bob", "alice", 7), ReadVerdict::AlreadyTold);
        assert_eq!(r.read("bob", "alice", 6), ReadVerdict::AlreadyTold);
        assert_eq!(r.read("bob", "alice", 10), ReadVerdict::Tell);
        r.not_told("bob", "alice", 10);
        assert_eq!(
            r.read("bob", "alice", 8),
            ReadVerdict::Tell,
            "back to 0: none stored"
        );
        r.stored("bob", "alice", 8);
        assert_eq!(r.read("bob", "alice", 10), ReadVerdict::Tell);
        r.not_told("bob", "alice", 10);
        assert_eq!(
            r.read("bob", "alice", 8),
            ReadVerdict::AlreadyTold,
            "8 was stored"
        );
        assert_eq!(r.read("bob", "alice", 10), ReadVerdict::Tell);
        r.not_told("bob", "alice", 9); // not the last told: changes nothing
        assert_eq!(r.read("bob", "alice", 10), ReadVerdict::AlreadyTold);
        r.forget("bob");
        assert_eq!(r.read("bob", "alice", 10), ReadVerdict::NeverReceived);
        assert_eq!(r.pairs(), 0);
    }

    #[test]
    fn senders_per_reader_are_bounded_forgetting_the_oldest() {
        let mut r = ReadReceipts::default();
        for i in 0..MAX_SENDERS_PER_READER as u64 + 1 {
            r.sent("bob", &format!("s{i}"), 100 + i);
        }
        assert_eq!(r.pairs(), MAX_SENDERS_PER_READER);
        assert_eq!(r.read("bob", "s0", 100), ReadVerdict::NeverReceived);
        assert_eq!(r.read("bob", "s1", 101), ReadVerdict::Tell);
        let last = MAX_SENDERS_PER_READER as u64;
        assert_eq!(
            r.read("bob", &format!("s{last}"), 100 + last),
            ReadVerdict::Tell
        );
    }
}
