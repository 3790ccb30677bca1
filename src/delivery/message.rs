//! A direct message as it travels between shards, and the report that travels back.

use compact_str::CompactString;
use std::sync::Arc;

use crate::delivery::refusal::SendRefusal;
use crate::store::StoredMessage;

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
    pub cid: CompactString,
    /// Milliseconds since the Unix epoch, when the gateway took the message.
    pub ts: u64,
    /// Shared with the copies the store and the mirror keep: never copied per message.
    pub body: Arc<str>,
    /// The backend's `type`, see [`StoredMessage::msg_type`].
    pub msg_type: Option<Box<str>>,
    pub reply: ReplyTo,
    /// When the sender's home shard took the `send`, in µs of the shards' clock (one origin
    /// per process), for the send -> accepted histogram.
    pub received_us: u64,
    /// How the recipient's shard writes it to Redis (empty until then).
    pub write: StoreWrite,
    /// The client marked it `resend`: another attempt of it (an earlier connection's, a dead
    /// node's) may be in the store already, so it is never delivered live past the store.
    pub resent: bool,
    /// Wall-clock ms (Unix epoch) when the sender last arrived on its home shard here: its
    /// latest connection opened (for `POST /api/send`, the request came). While Redis is
    /// away, the message goes live only past a write of the pair issued since then that the
    /// store confirmed (`confirmed` in `shard/mirror.rs`): a message the sender was told
    /// `accepted` for before, on another node, is then known to be in this node's mirror.
    pub sender_arrived_ms: u64,
    /// First attempts of this message's pair refused on the sender's home shard before they
    /// reached the recipient's, and whether a resend was (see `Senders::refused_unrouted`),
    /// carried to it by the pair's next message other than a read receipt; None nearly
    /// always.
    pub refused_earlier: Option<Box<RefusedCids>>,
}

/// A pair's first attempts that were refused and are not known to be stored: on the
/// recipient's home shard, those refused there (`InboxMirror::refused_unstored`); on the
/// sender's, those refused before they got there ([`Message::refused_earlier`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefusedCids {
    pub cids: Vec<CompactString>,
    /// More than [`RefusedCids::MAX`] were: which ones is not known, so no stored entry can
    /// clear them (the pair stays held back until the recipient's mirror is dropped).
    pub overflowed: bool,
    /// On the recipient's shard: some were carried from the sender's, so `cids` is not in the
    /// order they were sent, and none of them may go live before the others are stored (see
    /// `InboxMirror::refused_unstored_of`).
    pub order_unknown: bool,
    /// On the way from the sender's shard: a *resend* of the pair was refused there too. Not
    /// kept as a cid (another attempt of it may be stored already, and its cid never come
    /// again): the recipient's shard takes the pair's confirmation back instead, as for a
    /// resend refused there (`InboxMirror::unsure`).
    pub resend_refused: bool,
}

impl RefusedCids {
    /// Cids kept per pair.
    pub const MAX: usize = 64;

    /// Whether a refused attempt of `cid` holds its pair back at all: not a read receipt (it
    /// has no `accepted` to keep in order, and a later receipt replaces it rather than
    /// resending it).
    pub fn holds_back(cid: &str) -> bool {
        crate::proto::receipt_sender(cid).is_none()
    }

    /// Keep `cid` (once), or mark the set overflowed past [`RefusedCids::MAX`].
    pub fn keep(&mut self, cid: &CompactString) {
        if self.cids.contains(cid) {
            return;
        }
        if self.cids.len() < Self::MAX {
            self.cids.push(cid.clone());
        } else {
            self.overflowed = true;
        }
    }

    /// Everything `other` holds, kept here too, in an order no longer known.
    pub fn take_in(&mut self, other: &RefusedCids) {
        for cid in &other.cids {
            self.keep(cid);
        }
        self.overflowed |= other.overflowed;
        self.order_unknown = true;
    }

    pub fn is_empty(&self) -> bool {
        self.cids.is_empty() && !self.overflowed && !self.resend_refused
    }
}

/// A message's write to the Redis store, as its recipient's shard numbers it (see "Order" in
/// `shard/mirror.rs`).
#[derive(Debug, Clone, Default)]
pub struct StoreWrite {
    /// Increasing per shard and run (0: not written): Redis refuses a write of a shard older
    /// than one of it that already landed for the same pair of users.
    pub attempt: u64,
    /// The recipient's mirror is on the writing shard (a device of theirs is online there):
    /// the embedded store gives the entry back as a push, as Redis pushes to every node
    /// holding the recipient, and answers it not offline. (Redis reads its directory; false
    /// when writing to Redis.)
    pub to_mirror: bool,
}

impl Message {
    pub fn stored(&self) -> StoredMessage {
        StoredMessage {
            id: self.id,
            from: self.from.clone(),
            cid: self.cid.clone(),
            ts: self.ts,
            body: self.body.clone(),
            msg_type: self.msg_type.clone(),
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
            received_us: self.received_us,
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
    pub cid: CompactString,
    pub reply: ReplyTo,
    pub outcome: Outcome,
    /// `Message::received_us` of the message reported on (0 when it came from Redis).
    pub received_us: u64,
}
