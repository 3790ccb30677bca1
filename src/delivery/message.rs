//! A direct message as it travels between shards, and the report that travels back.

use compact_str::CompactString;

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
    pub cid: Box<str>,
    /// Milliseconds since the Unix epoch, when the gateway took the message.
    pub ts: u64,
    pub body: Box<str>,
    pub reply: ReplyTo,
    /// When the sender's home shard took the `send` (for the send -> accepted histogram).
    pub received: std::time::Instant,
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
    Refused(String),
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
