//! A direct message as it travels between shards, and the report that travels back.

use compact_str::CompactString;

use crate::delivery::refusal::SendRefusal;
use crate::store::StoredMessage;

/// Server message ids, unique across shards and across restarts of the gateway (they outlive
/// it in Redis): 42 bits of milliseconds since 2020-01-01 UTC, 10 bits of shard, 12 bits of
/// sequence within the millisecond. A shard issuing more than 4,096 ids in one millisecond
/// borrows the next millisecond, so ids stay unique and increasing per shard. They are
/// 64-bit, so the protocol sends them as decimal strings (exact in every JSON parser).
#[derive(Debug)]
pub struct MessageIds {
    shard: u64,
    last_ms: u64,
    seq: u64,
}

const ID_EPOCH_MS: u64 = 1_577_836_800_000;
const ID_SHARD_BITS: u32 = 10;
const ID_SEQ_BITS: u32 = 12;

impl MessageIds {
    pub fn new(shard: usize) -> Self {
        MessageIds {
            shard: shard as u64 & ((1 << ID_SHARD_BITS) - 1),
            last_ms: 0,
            seq: 0,
        }
    }

    /// The next id at wall-clock time `wall_ms` (ms since the Unix epoch). A clock that steps
    /// back does not make ids repeat: the last millisecond used is kept.
    pub fn next(&mut self, wall_ms: u64) -> u64 {
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
        (self.last_ms << (ID_SHARD_BITS + ID_SEQ_BITS)) | (self.shard << ID_SEQ_BITS) | self.seq
    }
}

/// Where the answer to a `send` goes: the sender's connection on the sender's home shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub shard: u32,
    /// Slab index and serial of the sending connection; `conn == u32::MAX` means "every
    /// connection of the sender" (used for `delivered`, which may come much later).
    pub conn: u32,
    pub serial: u32,
}

impl ReplyTo {
    pub fn all_devices(shard: usize) -> Self {
        ReplyTo {
            shard: shard as u32,
            conn: u32::MAX,
            serial: 0,
        }
    }
}

/// An accepted `send`, on its way to the recipient's home shard.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: u64,
    pub from: CompactString,
    pub to: CompactString,
    pub cid: Box<str>,
    /// Milliseconds since the Unix epoch, when the gateway took the message.
    pub ts: u64,
    pub body: Box<str>,
    pub reply: ReplyTo,
    /// When the sender's home shard took the `send` (for the send -> accepted histogram).
    pub received: std::time::Instant,
    /// How the recipient's shard writes it to Redis (empty until then).
    pub write: StoreWrite,
}

/// A message's write to the Redis store, as its recipient's shard numbers it (see "Order" in
/// `shard/durable.rs`).
#[derive(Debug, Clone, Default)]
pub struct StoreWrite {
    /// Increasing per shard and run (0: not written): Redis refuses a write of a shard older
    /// than one of it that already landed for the same pair of users.
    pub attempt: u64,
    /// The pair's earlier writes that were reported as failed, as (cid, attempt): revoked by
    /// the same script call, before this write.
    pub revoke: Vec<(Box<str>, u64)>,
}

impl Message {
    pub fn stored(&self) -> StoredMessage {
        StoredMessage {
            id: self.id,
            from: self.from.clone(),
            cid: self.cid.clone(),
            ts: self.ts,
            body: self.body.clone(),
        }
    }

    /// What became of this message, for its sender's home shard. `id`: the message's own,
    /// or the first copy's when Redis found the cid already stored.
    pub fn report(self, id: u64, outcome: Outcome) -> Report {
        Report {
            id,
            from: self.from,
            to: self.to,
            cid: self.cid,
            reply: self.reply,
            outcome,
            received: self.received,
        }
    }

    /// Could not be made safe; the client resends later with the same cid.
    pub fn refused(self, why: SendRefusal) -> Report {
        let id = self.id;
        self.report(id, Outcome::Refused(why))
    }
}

/// What became of a message, sent back to the sender's home shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Safe in the recipient's inbox: answer `accepted`.
    Stored,
    /// A device of the recipient acknowledged it: answer `delivered`.
    Delivered,
    /// Could not be made safe (e.g. the inbox is full): answer `error`/`unavailable`; the
    /// client resends later with the same cid.
    Refused(SendRefusal),
}

#[derive(Debug, Clone)]
pub struct Report {
    pub id: u64,
    pub from: CompactString,
    pub to: CompactString,
    pub cid: Box<str>,
    pub reply: ReplyTo,
    pub outcome: Outcome,
    /// `Message::received` of the message reported on.
    pub received: std::time::Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_increasing_and_carry_the_shard() {
        let now = 1_800_000_000_000;
        let mut a = MessageIds::new(3);
        let mut b = MessageIds::new(4);
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        // 10,000 ids in the same millisecond: they borrow later milliseconds, never repeat.
        for _ in 0..10_000 {
            let id = a.next(now);
            assert!(id > last);
            last = id;
            assert!(seen.insert(id));
            assert!(seen.insert(b.next(now)), "another shard never collides");
        }
        // A clock stepping back does not repeat ids either.
        let back = a.next(now - 5_000);
        assert!(back > last);
        assert_eq!((back >> 12) & 1023, 3, "shard bits");
        // A restart a millisecond later starts above the earlier run's first ids.
        let mut restarted = MessageIds::new(3);
        assert!(restarted.next(now + 1) > MessageIds::new(3).next(now));
    }
}
