//! The offline inbox (SPEC section 4) behind one small trait, [`Inbox`], and its embedded
//! implementation, [`MemoryInbox`].
//!
//! # What it owns
//! An [`Inbox`] owns the direct messages waiting for a user's devices: those sent while the
//! user had no connection, those refused by a full window, and those spilled from a dead
//! connection. Per user the inbox is ordered and capped (default 10,000 messages, 72 h); it is
//! replayed in order on connect, and an entry is removed only once a device acked it.
//!
//! # Rules every implementation keeps
//! * [`Inbox::append`] refuses with [`StoreError::Full`] when the user's inbox holds
//!   `max_messages`: the sender gets `error`/`unavailable`; nothing is ever dropped to make
//!   room. [`StoreError::Unavailable`] is for a store that cannot answer (Redis down).
//! * Entries are numbered by [`InboxSeq`], increasing per user and never reused, so a
//!   reader resumes with "after seq N" and a removal can never hit a newer entry.
//! * An entry older than `max_age_ms` is expired: [`Inbox::read`] skips it at once, and
//!   [`Inbox::expire`] drops it and reports how many it dropped, so expiry is counted, never
//!   a silent loss.
//!
//! Time is injected as milliseconds; nothing here reads a clock, spawns or locks.
//!
//! # One store interface
//! A shard talks to its store, embedded or Redis, through one request/reply path, [`Store`]:
//! it submits [`StoreOp`]s and hears [`StoreReply`]s, and its delivery rules
//! (`shard/durable.rs`) do not fork on the kind. The embedded store ([`embedded`]) answers on
//! the shard in the same turn; Redis ([`redis::StoreLink`]) on its own thread; the
//! simulation (`src/sim/`) stands at the other end of a link and puts faults between a
//! request and its reply. What legitimately differs (other nodes exist only with a shared
//! store) is a capability, [`StoreCaps`], asked in one place (`Shard::store_shared`).

pub mod embedded;
pub mod memory;
pub mod redis;

pub use memory::{MemoryInbox, SenderSummary};
pub use redis::{StoreOp, StoreReply};

/// What a store can do beyond one shard's inboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreCaps {
    /// Other gateway nodes share this store: it keeps the user directory and node leases,
    /// answers room joins and presence, carries typing and watch, grants message id slots,
    /// checks an entry before its offline push, and counts what its age cap trims.
    pub shared: bool,
}

impl StoreCaps {
    /// The embedded store: this node is alone.
    pub const SINGLE_NODE: StoreCaps = StoreCaps { shared: false };
    /// Redis: other nodes may use it too.
    pub const SHARED: StoreCaps = StoreCaps { shared: true };
}

/// A shard's end of its store: requests in, replies out, in the order asked.
pub trait Store {
    /// Queue `op`; it comes back when it cannot be queued (a full queue, or an operation this
    /// store does not serve).
    fn submit(&mut self, op: StoreOp) -> Result<(), StoreOp>;

    fn caps(&self) -> StoreCaps;

    /// Answers the shard hears in its current turn, at most `max` (an in-process store runs
    /// what it was asked now, at `now` / `wall` ms). A store on another thread answers
    /// through [`Store::take_replies`] when its doorbell rings instead.
    fn answers_now(&mut self, _now: u64, _wall: u64, _out: &mut Vec<StoreReply>, _max: usize) {}

    /// Something is waiting for [`Store::answers_now`].
    fn has_answers_now(&self) -> bool {
        false
    }

    /// The doorbell socket the glue watches for answers (taken once; None: no doorbell).
    fn take_bell_reader(&mut self) -> Option<std::os::unix::net::UnixStream> {
        None
    }

    /// The doorbell was read: clear it before draining.
    fn clear_bell(&self) {}

    /// Answers that came through the doorbell, at most `max`.
    fn take_replies(&mut self, _out: &mut Vec<StoreReply>, _max: usize) {}

    /// Drop expired entries held here; how many. (A shared store trims by itself and
    /// reports it with its answers.)
    fn expire(&mut self, _now: u64) -> usize {
        0
    }

    /// Inbox entries this store holds in the shard's memory.
    fn held(&self) -> usize {
        0
    }
}

/// Messages kept per user at most (SPEC default 10,000).
pub const DEFAULT_INBOX_MAX_MESSAGES: usize = 10_000;
/// Age after which an inbox entry expires (SPEC default 72 h).
pub const DEFAULT_INBOX_MAX_AGE_MS: u64 = 72 * 60 * 60 * 1000;

/// What the inbox keeps of a direct message: enough to rebuild its `msg` frame (the `seq` is
/// the connection's, assigned at send time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Server message id.
    pub id: u64,
    /// Sender's user id.
    pub from: compact_str::CompactString,
    /// The sender's `cid`, raw JSON text (inline when short: copied around without allocating).
    pub cid: compact_str::CompactString,
    /// Accept time, ms since the Unix epoch.
    pub ts: u64,
    /// The message body, raw JSON text, shared by every copy (store, mirror, replay).
    pub body: std::sync::Arc<str>,
    /// The backend's `type` (`POST /api/send`), e.g. `system`; None for a client's message.
    pub msg_type: Option<Box<str>>,
}

/// Position of an entry in one user's inbox: increasing per user, never reused. 0 is never
/// assigned, so `read(user, 0, ..)` reads from the start.
pub type InboxSeq = u64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The user's inbox is at its cap; the sender gets `unavailable` and resends later.
    #[error("inbox of {user} is full ({count} messages)")]
    Full { user: String, count: usize },
    /// The store cannot answer now. For a write: it may still have happened (or happen).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store cannot answer now, and this write was not sent to it: it did not happen.
    #[error("store unavailable: {0}")]
    Unsent(String),
    /// Not written, for sure: a later write of the same shard to the same pair of users
    /// landed first, or the shard resolved this one (`shard/mirror.rs`).
    #[error("store refused a superseded write")]
    Stale,
}

/// Per-user bounds of an inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxLimits {
    /// Entries per user; `append` refuses beyond it.
    pub max_messages: usize,
    /// Entries older than this (from their append) are expired.
    pub max_age_ms: u64,
}

impl Default for InboxLimits {
    fn default() -> Self {
        InboxLimits {
            max_messages: DEFAULT_INBOX_MAX_MESSAGES,
            max_age_ms: DEFAULT_INBOX_MAX_AGE_MS,
        }
    }
}

/// One offline inbox per user; see the module documentation.
pub trait Inbox {
    /// Add `msg` at the end of `user`'s inbox at `now` and return its seq.
    /// `Err(StoreError::Full)` when the inbox already holds `max_messages` (not counting
    /// expired entries): nothing is dropped to make room.
    fn append(&mut self, user: &str, msg: StoredMessage, now: u64) -> Result<InboxSeq, StoreError>;

    /// Up to `limit` entries with seq > `after`, in order, skipping entries expired at `now`
    /// (even before [`Inbox::expire`] dropped them).
    fn read(
        &self,
        user: &str,
        after: InboxSeq,
        limit: usize,
        now: u64,
    ) -> Vec<(InboxSeq, StoredMessage)>;

    /// Remove one entry (acked). True when it was there; removing an unknown or already
    /// removed entry is a no-op that returns false (the first device's ack wins).
    fn remove(&mut self, user: &str, seq: InboxSeq) -> bool;

    /// Entries held for `user`. May include entries already expired but not yet dropped.
    fn len(&self, user: &str) -> usize;

    /// Drop every expired entry (age > `max_age_ms` at `now`) of every user. Returns how many
    /// were dropped, including any an implementation dropped on the way since the previous
    /// call: the caller counts them as expired (they are not lost silently).
    fn expire(&mut self, now: u64) -> usize;
}
