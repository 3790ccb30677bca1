//! The durable offline inbox in Redis (SPEC section 4), through fred on its own thread.
//!
//! # Who owns what
//! * One thread, `ringgate-redis`, runs a tokio runtime and a fred pool. It owns every Redis
//!   connection; no shard ever waits on Redis.
//! * Each shard talks to it through a [`StoreLink`]: a bounded lock-free channel of
//!   [`StoreOp`]s in, an answer channel of [`StoreReply`]s out, and a doorbell each way (the
//!   same wake-up as the mesh: one byte per wake-up, not per message).
//! * Per shard, one task on the Redis thread takes the queued operations in batches and sends
//!   each batch as **one pipeline** on the shard's own connection: runs of appends and removes
//!   as one script call each, loads as plain `XTRIM` + `XRANGE` (see `batch.rs`). A batch is
//!   one round trip and batches run in submission order. That order is what the shard relies
//!   on (a load sees every append submitted before it; see `shard/mirror.rs`).
//! * A batch that failed or timed out may still have been written, or be written later
//!   (commands are sent fail-fast and never retried, yet fred keeps what it had queued across
//!   a reconnect). Such a write is *in doubt*: the script refuses an append older than one of
//!   the same shard that landed for the same pair (`stale`), and the shard resolves its
//!   writes in doubt once Redis answers (landed or not; none lands later). See
//!   "Order" in `shard/mirror.rs`. Across writers (another node's shard, a dead run's), the
//!   script keeps each pair's highest stored message id (`~top` in its dedup hash) and
//!   refuses an append below it (`stale` too; a resend of a stored cid is answered `dup`
//!   all the same): a pair's ids increase in store order, the order clients tell held
//!   `accepted` answers in (`client/order.rs`).
//!
//! # Data layout (prefix `rg:` by default)
//! Keys of one user carry the hash tag `{u:<user>}`, keys of one room `{r:<room>}` (see
//! `keys.rs`); they are written short below.
//! * `rg:in:<user>`: a stream per user; one field `m` per entry, the message packed by
//!   [`pack`] (id, ts, from, cid and body, length-prefixed). A load reads from the age cap on
//!   (`XRANGE` from `now - max_age`) and trims what is past it (`XTRIM MINID`, counted as
//!   expired); an append that finds the stream at the count cap trims the same way first, then
//!   refuses if it is still full (`full`, never a silent drop), else `XADD` (no `MAXLEN`:
//!   every append goes through that check, so it would never trim). `PEXPIRE` of twice the
//!   age cap deletes the stream of a user who never comes back (everything in it is past the
//!   age cap by then; those entries are not counted). It is set when an append finds the
//!   stream empty and whenever a pair appending to it has its own TTL set (created, rotated,
//!   every half window = 12 h, or when the appending node's age cap is larger than the pair's
//!   `~age`), not on every append: each append comes through a pair whose TTL was set at
//!   most half a window ago, the stream's with it, so the stream outlives every entry's age
//!   cap by at least half the cap while the dedup window is within the age cap (24 h and 72 h
//!   by default; with a shorter age cap it is set on every append). It is set right after
//!   the write that needs it, so a script call that fails later leaves no stream without a
//!   TTL.
//! * `rg:dd:<recipient>:<sender>` and `rg:dd-old:..`: the dedup window of one pair, cid ->
//!   `<message id> <run>/<shard>/<attempt>` (older builds wrote `<message id> <stream id>
//!   <run>/<shard>/<attempt>`, or the bare id; read alike), and
//!   `~w:<run>/<shard>` -> the highest attempt of that shard landed or resolved, `~top` ->
//!   the highest message id the pair stored (any writer; receipts aside), in the
//!   recipient's slot, checked by the same script before any append, so a resend after a gateway restart is answered
//!   with the first id and stored once (a new message is appended, then `HSETNX` checks and
//!   records its cid with the full record in one call; a known cid takes the entry back). Fields
//!   `~born` (when the generation started), `~old` (1: an older one was kept; 0 or absent:
//!   none), `~fresh` (when its TTL was last set) and `~age` (the inbox age cap then) are read
//!   once per pair per batch; the older generation only when `~old` says it exists. A generation is rotated into `dd-old` only when it is older than the
//!   window (24 h) *and* holds more cids than the minimum (10,000): every cid is kept at
//!   least 24 h, and the newest 10,000 of the pair always, which include every one of the
//!   sender's newest 10,000 to that recipient (SPEC: 24 h or 10,000 per sender, whichever is
//!   larger; a cid names one message, so it has one recipient).
//!
//! # Several nodes (one Redis)
//! * `node:<run>`: a node run's lease (`PX lease_ms`); `<run>` = `node_id.<start ms>`.
//! * `loc:<user>`: the runs holding a device of the user. A load adds this run just before
//!   its read, in the same pipeline; a leave removes it. Every later append to the user's
//!   inbox, by any node, is published by the same script (`m` push) to every run in it, this
//!   one included, so a node's mirror is fed from one connection in Redis order. A remove
//!   that deleted the entry publishes the sender's `delivered` (`d` push) to the sender's
//!   other runs. Presence questions count runs with a live lease and drop the others.
//! * `ch:<run>`: the run's pub/sub channel, heard by one connection per node (`listen`);
//!   pushes go to the home shard of the user or room they name. A load publishes its read's
//!   mark (`k` push) on it right after the read, from the inbox's server: the shard takes the
//!   read in once the mark came, behind every push of an entry appended before the read.
//!   Each (re)subscription makes every shard resync (reload mirrors, ask pending room joins
//!   again; a mark lost with the old subscription belonged to a load the resync replaces).
//! * Rooms: `rh:<room>` history (ids `0-<offset>`, exact `MAXLEN`), `rd:<room>` the offset
//!   counter `~last` and the publish dedup, `rn:<room>` the runs with members. A publish is
//!   pushed (`r`) to every run with members, this one included; a join's answer (`j`) is
//!   published to the joining run only, by the script that registers it, so it arrives in
//!   order with the room's messages.
//! * `ids`: message id slots, slot -> `<run>/<shard> <expiry>` (Redis time). Each shard claims
//!   one and renews it every third of the lease (`ClaimIdSlot`, one small script); what a
//!   shard does with it is in `delivery/ids.rs`.
//! * `typing` is published (`t` push) to every other run in the recipient's `loc:` entry by
//!   one small script; never stored.
//!
//! # Redis Cluster
//! `redis-cluster://` URLs work (Redis >= 7.0: the script is flagged `allow-cross-slot-keys`);
//! how a batch is split per primary, and what runs after its answer, is in `batch.rs`.
//! Pub/sub is the classic kind (a `PUBLISH` reaches subscribers on every primary). Standalone
//! and Sentinel URLs work as well.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compact_str::CompactString;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use fred::prelude::*;

use super::{InboxSeq, StoreError, StoredMessage};
use crate::delivery::message::{Message, ReplyTo, Report};
use crate::mesh::Doorbell;

mod batch;
pub mod breaker;
mod keys;
#[cfg(test)]
mod tests;
mod wire;

use batch::{run_batch, Answer, TIMED_OUT};
use keys::*;
pub use wire::*;

/// Operations a shard may have queued for Redis; beyond it, sends get `unavailable` (bounded
/// memory while Redis is away).
pub const OPS_PER_SHARD: usize = 16_384;
/// Pushes from other nodes buffered between the Redis connection and the routing task; beyond
/// it the oldest are lost and every shard resyncs (reloads from Redis).
const PUSH_BUFFER: usize = 16_384;
/// Operations sent in one script call at most.
pub const BATCH_OPS: usize = 1_024;
/// Upkeep operations (`Leave`, `RoomLeave`, `Lease`) kept per shard while the breaker is open.
const MAX_HELD_BACK: usize = 16_384;
/// SPEC dedup window: at least 24 h ...
pub const DEDUP_MIN_AGE_MS: u64 = 24 * 60 * 60 * 1000;
/// ... or at least 10,000 cids per sender, whichever is larger.
pub const DEDUP_MIN_ENTRIES: u64 = 10_000;

/// What a shard asks of the store. Answers come back in the order asked.
pub enum StoreOp {
    /// Make `msg` durable in its recipient's inbox (unless its cid was already stored), and
    /// push it to the other nodes holding the recipient.
    Append(Box<Message>),
    /// An entry was acked: delete it. `report`: the sender's `delivered`, sent (here and to
    /// the sender's other nodes) only when this delete removed the entry, so a message is
    /// reported once however many devices on however many nodes ack it.
    Remove {
        user: CompactString,
        seq: InboxSeq,
        report: Option<Box<Report>>,
    },
    /// Register this node in `user`'s directory entry, then read the inbox, oldest first, up
    /// to `limit` entries (in that order: see the cluster notes in the module doc).
    Load {
        user: CompactString,
        token: u64,
        limit: usize,
    },
    /// `user`'s last device here left: take this node out of the user's directory entry.
    Leave { user: CompactString },
    /// Refresh this node's lease (shard 0, from its tick).
    Lease,
    /// Which of `users` have a device on a live node; answered with `ask` quoted.
    Presence {
        users: Vec<CompactString>,
        ask: usize,
    },
    /// Give a room message the room's next offset, keep it in the room's history and push
    /// it to every node with members (this one included: see "Rooms" in the module doc).
    RoomPublish(Box<RoomPost>),
    /// Register this node with `room`'s nodes and have the room's current offset (and, with
    /// `since`, what the history holds after it) pushed back on this node's channel, in
    /// order with the room's messages. The answer itself is only `Done`.
    RoomJoin(Box<RoomJoinAsk>),
    /// This node's last member of `room` left.
    RoomLeave { room: CompactString },
    /// `from` is typing to `to`: published to the other runs holding a device of `to`.
    Typing {
        from: CompactString,
        to: CompactString,
    },
    /// A connection on this node watches `user` (`on`), or the last one stopped: this node
    /// is added to (or taken out of) the runs told when `user`'s directory entry changes.
    WatchPresence { user: CompactString, on: bool },
    /// Claim a message id slot for this shard, or renew `held` (see `delivery/ids.rs`);
    /// answered with [`StoreReply::IdSlot`].
    ClaimIdSlot {
        held: Option<u16>,
        /// When the shard asked (its clock), echoed in the answer.
        asked_at: u64,
    },
    /// Touch nothing: a shard that stopped writing while Redis was away uses it to learn
    /// that Redis is back (the batch's own answer says so).
    Probe,
    /// Appends of this shard from `from` to `to` whose answers were lost, as (cid, attempt):
    /// whether each landed, and none of them can land from now on.
    Resolve {
        to: CompactString,
        from: CompactString,
        writes: Vec<(Box<str>, u64)>,
    },
}

/// What became of a write whose answer was lost, once resolved (none lands later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It landed: its entry is in the inbox under its own id.
    Landed,
    /// It never landed, and its cid is not stored: the sender is told `unavailable`.
    Never,
    /// It never landed, but its cid is stored by another attempt (an earlier run's, a dead
    /// node's) under this id: the sender is told `accepted` with it, as a resend would be.
    Duplicate(u64),
}

/// A publish on its way to a room's history.
pub struct RoomPost {
    pub room: CompactString,
    pub from: CompactString,
    pub cid: Box<str>,
    pub body: Box<str>,
    pub id: u64,
    pub ts: u64,
    pub reply: RoomReply,
}

/// Who hears how a publish went.
pub enum RoomReply {
    /// A connection: `accepted` (with the offset) or `error`.
    Conn(ReplyTo),
    /// `POST /api/publish`: (id, offset), or why it was refused.
    Api(tokio::sync::oneshot::Sender<Result<(u64, u64), crate::delivery::refusal::SendRefusal>>),
}

/// A member joining, as the room's home shard asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomJoinAsk {
    pub room: CompactString,
    pub since: Option<u64>,
    /// The joining connection: its shard, slab index and serial.
    pub shard: usize,
    pub conn: usize,
    pub serial: u32,
    /// The home's number for this ask, echoed in its answer: an answer matches its own ask,
    /// never a newer join of the same connection (an ask sent again after a resync can be
    /// answered twice).
    pub token: u64,
}

/// How an append went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Written at `seq`; `pushed`: other nodes the entry was published to (they hold a
    /// device of the recipient). Entries the age cap trimmed on the way are counted in
    /// [`StoreReply::Batch`], whatever the append's answer.
    /// `offline`: nobody holds a device of the recipient on any node (the directory entry
    /// was empty; only asked for when `RedisSettings::watch_offline` is set): a push is due.
    Stored {
        seq: InboxSeq,
        pushed: u64,
        offline: bool,
    },
    /// The sender's cid was already stored as message `id`.
    Duplicate { id: u64 },
}

/// A user's inbox as read from Redis.
#[derive(Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Per sender, the highest message id a device of the user acked (read receipts).
    pub received: Vec<(CompactString, u64)>,
    /// Oldest first.
    pub entries: Vec<(InboxSeq, StoredMessage)>,
    /// Entries the age cap trimmed just before the read.
    pub expired: u64,
}

/// The store's answers.
pub enum StoreReply {
    Appended {
        msg: Box<Message>,
        result: Result<Appended, StoreError>,
    },
    /// `ran`: Redis answered the delete (false: it failed or its answer was lost, and it may
    /// not have run); `ok`: it removed the entry (another node's delete had not).
    Removed {
        user: CompactString,
        seq: InboxSeq,
        ran: bool,
        ok: bool,
        report: Option<Box<Report>>,
    },
    Loaded {
        user: CompactString,
        token: u64,
        result: Result<Loaded, StoreError>,
    },
    /// `Leave`, `Lease` and `Probe` done (or failed: the batch's answer says so).
    Done,
    /// On this node's channel: load `token` of `user`'s inbox has read, and every push that
    /// came before its read is on the channel before this (see `Push::ReadMark`).
    ReadMarked { user: CompactString, token: u64 },
    /// From another node: `from` is typing to `to` (homed here).
    Typing {
        from: CompactString,
        to: CompactString,
    },
    /// The answer to `ClaimIdSlot`: the slot this shard holds now, or why there is none.
    IdSlot {
        asked_at: u64,
        answer: Result<crate::delivery::ids::IdGrant, String>,
    },
    /// How a `Resolve` went: per write, what became of it (`None`: the call failed).
    Resolved {
        to: CompactString,
        from: CompactString,
        writes: Vec<(Box<str>, u64)>,
        landed: Option<Vec<Fate>>,
    },
    /// The answer to `Presence`; `None` when Redis could not answer.
    Presence {
        ask: usize,
        users: Vec<CompactString>,
        online: Option<Vec<bool>>,
    },
    /// From another node: `user`'s directory entry changed and now holds `runs` node runs
    /// (the user is homed here and watched on this node).
    PresenceChanged { user: CompactString, runs: u64 },
    /// From another node: an entry appended to `user`'s inbox (the user is homed here).
    Pushed {
        user: CompactString,
        seq: InboxSeq,
        msg: StoredMessage,
    },
    /// From another node: a device there acked a message this shard's user sent.
    RemoteReport(Box<Report>),
    /// Pushes may have been missed (the node's channel was resubscribed, or its lease had
    /// lapsed and other nodes may have dropped it from directory entries): reload every
    /// mirror, which registers again.
    Resync,
    /// How a `RoomPublish` went: (id, offset), the first copy's for a resent cid.
    RoomPublished {
        post: Box<RoomPost>,
        result: Result<(u64, u64), StoreError>,
    },
    /// A `RoomJoin` could not be made: the member hears `unavailable`.
    RoomJoinFailed(Box<RoomJoinAsk>),
    /// Pushed on this node's channel: a room message, in the room's offset order.
    RoomMessage {
        room: CompactString,
        offset: u64,
        msg: StoredMessage,
    },
    /// Pushed on this node's channel: the answer to a `RoomJoin`, in order with the room's
    /// messages (nothing after `last` was pushed before it, everything after it follows).
    RoomJoinAnswer {
        ask: Box<RoomJoinAsk>,
        last: u64,
        recovered: bool,
        replay: Vec<(u64, StoredMessage)>,
    },
    /// One per batch, after its answers: for the shard's metrics and its Redis-up state.
    Batch {
        ops: usize,
        latency: Duration,
        error: Option<String>,
        /// Inbox entries the age cap trimmed on the way to this batch's appends (stored,
        /// duplicate or refused alike; loads report their own in [`Loaded`]).
        expired: u64,
        /// The shard's Redis circuit breaker is open after this batch ([`breaker`]).
        breaker_open: bool,
    },
}

/// A shard's end of the store.
pub struct StoreLink {
    ops: Sender<StoreOp>,
    replies: Receiver<StoreReply>,
    wake_store: Arc<Doorbell>,
    own_bell: Arc<Doorbell>,
    /// The socket the shard reads its doorbell from (taken by the glue).
    pub bell_reader: Option<std::os::unix::net::UnixStream>,
    /// Redis is shared by nodes; the simulation's embedded mode stands at the end of a link
    /// with one shard's store.
    caps: super::StoreCaps,
}

impl super::Store for StoreLink {
    fn submit(&mut self, op: StoreOp) -> Result<(), StoreOp> {
        StoreLink::submit(self, op)
    }

    fn caps(&self) -> super::StoreCaps {
        self.caps
    }

    fn take_bell_reader(&mut self) -> Option<std::os::unix::net::UnixStream> {
        self.bell_reader.take()
    }

    fn clear_bell(&self) {
        StoreLink::clear_bell(self)
    }

    fn take_replies(&mut self, out: &mut Vec<StoreReply>, max: usize) {
        StoreLink::take_replies(self, out, max)
    }
}

impl StoreLink {
    /// Queue `op`; it comes back when the queue is full.
    pub fn submit(&self, op: StoreOp) -> Result<(), StoreOp> {
        match self.ops.try_send(op) {
            Ok(()) => {
                self.wake_store.ring();
                Ok(())
            }
            Err(TrySendError::Full(op)) | Err(TrySendError::Disconnected(op)) => Err(op),
        }
    }

    /// The doorbell was read: clear it before draining.
    pub fn clear_bell(&self) {
        self.own_bell.clear();
    }

    /// Answers ready now, at most `max`.
    pub fn take_replies(&self, out: &mut Vec<StoreReply>, max: usize) {
        out.extend(self.replies.try_iter().take(max));
    }
}

/// Whether a line logged at most once per `every` is due now (`last`: when it last was);
/// if so, it counts as logged.
fn log_due(last: &mut Option<Instant>, every: Duration) -> bool {
    let due = last.is_none_or(|at| at.elapsed() >= every);
    if due {
        *last = Some(Instant::now());
    }
    due
}

/// Say why Redis cannot be reached (a refused connection, a certificate that does not verify,
/// a wrong password): fred retries by itself and would otherwise keep it to itself. The first
/// error of a run of them is logged, then at most one every `QUIET`.
async fn log_connection_errors(client: Client) {
    const QUIET: Duration = Duration::from_secs(30);
    let mut errors = client.error_rx();
    let mut last: Option<Instant> = None;
    loop {
        match errors.recv().await {
            Ok((error, server)) => {
                if log_due(&mut last, QUIET) {
                    let server = server.map(|s| s.to_string()).unwrap_or_default();
                    tracing::warn!(%error, %server, "Redis connection error (retrying)");
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Redirections a Redis Cluster command may follow, and its write attempts: a `MOVED` is
/// followed once (the slot map is read again first), and an `ASK` fails the command. fred
/// 10.1 cannot follow an `ASK`: it sends `ASKING` to the slot's new owner but the command to
/// the old one again, so every `ASK` costs an attempt and a redirection, and when attempts
/// run out first fred ends the client's connection task (see `keep_connected`). With one
/// redirection and two attempts the redirections run out first: the command fails with
/// "Too many redirections" and the client goes on. The second attempt is also spent when a
/// write to a socket fails; what the shards send is fail-fast besides (`batch::once`), so
/// nothing is resent after a dropped connection.
pub(super) fn redirect_once(c: &mut fred::types::config::ConnectionConfig) {
    c.max_command_attempts = REDIRECT_ATTEMPTS;
    c.max_redirections = REDIRECTIONS;
}

/// See [`redirect_once`]: attempts must exceed redirections.
pub(super) const REDIRECT_ATTEMPTS: u32 = 2;
pub(super) const REDIRECTIONS: u32 = 1;
const _: () = assert!(REDIRECT_ATTEMPTS > REDIRECTIONS);

/// Keep `client`'s connection task running for the life of the process. fred ends that task
/// for good on some routing errors while the client still reports itself connected: when an
/// `ASK` redirection during a Redis Cluster slot migration finds no attempt left, it fails
/// "Max attempts reached" and ends it, and from then on every command and every forced
/// reconnection waits in a queue no one reads (a store stuck for good mid-reshard, until
/// `redirect_once`). A backstop since: the task is started again; commands queued meanwhile
/// are sent by the new one, as any command that outlived its timeout may be (the store's
/// watermarks fence such writes).
async fn keep_connected(client: Client, role: &'static str) {
    let mut pause = Duration::ZERO;
    // One line per 30 s at most: a task that cannot start (a config error) ends every second.
    let mut logged: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let ended = client.connect().await;
        let why = match ended {
            Ok(Ok(())) => return,
            Ok(Err(e)) if e.is_canceled() => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        pause = restart_pause(pause, started.elapsed());
        if log_due(&mut logged, Duration::from_secs(30)) {
            tracing::warn!(error = %why, role, "the Redis client's connection task ended; starting it again");
        }
        tokio::time::sleep(pause).await;
    }
}

/// How long to wait before starting a connection task again, after the last wait `pause`
/// and a task that `lived` this long: at once after a task that ran a while, doubling from
/// 50 ms up to 1 s while it keeps ending at once (nothing to gain from a tight loop).
fn restart_pause(pause: Duration, lived: Duration) -> Duration {
    if lived > Duration::from_secs(10) {
        Duration::ZERO
    } else {
        (pause * 2).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// Refuse URLs this store cannot serve (checked with the config, before start): fred must
/// parse it, and a CA file is only for a TLS URL.
pub fn check_url(url: &str, tls_ca: Option<&Path>) -> Result<(), String> {
    let config = Config::from_url(url).map_err(|e| format!("`{url}`: {e}"))?;
    if tls_ca.is_some() && config.tls.is_none() {
        return Err(format!(
            "redis_tls_ca is set but `{url}` is not a TLS URL (use rediss://)"
        ));
    }
    Ok(())
}

/// The fred config for `settings`: the URL's, with the operator's CA for `rediss://` when one
/// is given (otherwise fred trusts the system's roots).
pub fn fred_config(settings: &RedisSettings) -> Result<Config, String> {
    let mut config = Config::from_url(&settings.url).map_err(|e| e.to_string())?;
    if let (Some(tls), Some(path)) = (config.tls.as_mut(), &settings.tls_ca) {
        tls.connector = tls_connector(path)?;
    }
    Ok(config)
}

/// A rustls connector that trusts exactly the certificates in the PEM file at `path`.
pub fn tls_connector(path: &Path) -> Result<fred::types::config::TlsConnector, String> {
    use fred::rustls::pki_types::pem::PemObject;
    use fred::rustls::pki_types::CertificateDer;
    let mut roots = fred::rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("redis_tls_ca {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("redis_tls_ca {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("redis_tls_ca {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "redis_tls_ca {}: no PEM certificate in it",
            path.display()
        ));
    }
    let config = fred::rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        fred::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config.into())
}

/// Settings the Redis thread needs.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub pool_size: usize,
    pub timeout: Duration,
    pub key_prefix: String,
    pub max_messages: usize,
    pub max_age_ms: u64,
    /// This run of this node (`node_id` plus start time): directory entries and the node's
    /// channel name it, so a restarted node never inherits a dead run's entries.
    pub node: String,
    /// Lease of `node`; refreshed by shard 0 every third of it.
    pub lease_ms: u64,
    /// Room history: messages kept per room, and their age cap.
    pub room_history_max: usize,
    pub room_history_age_ms: u64,
    /// PEM file of the CAs to trust for `rediss://` (None: the system's roots).
    pub tls_ca: Option<std::path::PathBuf>,
    /// Appends answer whether the recipient was offline everywhere (the push webhook is on).
    pub watch_offline: bool,
}

/// The store's end of a link that no Redis thread serves: a simulation answers the shard's
/// operations itself (`src/sim/`).
#[cfg(test)]
pub struct StoreEnd {
    pub ops: Receiver<StoreOp>,
    pub replies: Sender<StoreReply>,
    /// The doorbells' read ends, kept open (a ring into a closed socketpair is SIGPIPE).
    _bells: [std::os::unix::net::UnixStream; 2],
}

#[cfg(test)]
impl StoreLink {
    pub fn simulated() -> (StoreLink, StoreEnd) {
        let (ops_tx, ops_rx) = crossbeam_channel::bounded(OPS_PER_SHARD);
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        let (wake_store, store_bell) = Doorbell::pair().expect("socketpair");
        let (own_bell, shard_bell) = Doorbell::pair().expect("socketpair");
        let link = StoreLink {
            ops: ops_tx,
            replies: reply_rx,
            wake_store,
            own_bell,
            bell_reader: None,
            caps: super::StoreCaps::SHARED,
        };
        let end = StoreEnd {
            ops: ops_rx,
            replies: reply_tx,
            _bells: [store_bell, shard_bell],
        };
        (link, end)
    }

    /// A link whose far end plays the embedded store (the simulation's embedded mode).
    pub fn single_node(mut self) -> StoreLink {
        self.caps = super::StoreCaps::SINGLE_NODE;
        self
    }
}

/// Start the Redis thread and return one link per shard. The gateway starts even when Redis
/// is down (sends that need it get `unavailable` until it is back; fred reconnects).
pub fn start(settings: RedisSettings, shards: usize) -> std::io::Result<Vec<StoreLink>> {
    let mut links = Vec::with_capacity(shards);
    let mut pipes: Vec<ShardPipe> = Vec::with_capacity(shards);
    for shard in 0..shards {
        let (ops_tx, ops_rx) = crossbeam_channel::bounded(OPS_PER_SHARD);
        // Unbounded in type, bounded in fact: at most one answer per queued op plus one per batch.
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        let (wake_store, store_reader) = Doorbell::pair()?;
        let (own_bell, shard_reader) = Doorbell::pair()?;
        store_reader.set_nonblocking(true)?;
        links.push(StoreLink {
            ops: ops_tx,
            replies: reply_rx,
            wake_store: wake_store.clone(),
            own_bell: own_bell.clone(),
            bell_reader: Some(shard_reader),
            caps: super::StoreCaps::SHARED,
        });
        pipes.push(ShardPipe {
            shard,
            ops: ops_rx,
            replies: reply_tx,
            wake_store,
            shard_bell: own_bell,
            reader: store_reader,
        });
    }
    let all = AllShards(Arc::new(
        pipes
            .iter()
            .map(|p| (p.replies.clone(), p.shard_bell.clone()))
            .collect(),
    ));
    std::thread::Builder::new()
        .name("ringgate-redis".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime for Redis");
            runtime.block_on(run(settings, pipes, all));
        })?;
    Ok(links)
}

/// Every shard's answer channel and doorbell, for what is not the answer to one shard's
/// operation (pushes from other nodes, resyncs).
#[derive(Clone)]
struct AllShards(Arc<Vec<(Sender<StoreReply>, Arc<Doorbell>)>>);

impl AllShards {
    fn send(&self, shard: usize, reply: StoreReply) {
        let (tx, bell) = &self.0[shard];
        let _ = tx.send(reply);
        bell.ring();
    }

    fn resync(&self, why: &str) {
        tracing::info!(
            why,
            "cluster: every shard reloads its online users' inboxes"
        );
        for shard in 0..self.0.len() {
            self.send(shard, StoreReply::Resync);
        }
    }
}

/// Listen on this node's channel: pushes go to the home shard of the user they name. Every
/// (re)connection subscribes again and makes every shard resync (pushes published while the
/// channel was not heard are lost by pub/sub, never by the inbox, which a reload reads).
async fn listen(config: Config, settings: Arc<RedisSettings>, shards: AllShards) {
    let client = match Builder::from_config(config)
        // Retry the first connection too (by the policy), as after any later loss.
        .with_config(|c| c.fail_fast = false)
        .with_performance_config(|c| c.broadcast_channel_capacity = PUSH_BUFFER)
        .with_connection_config(|c| c.connection_timeout = settings.timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the Redis subscriber; other nodes' messages arrive only on reload");
            return;
        }
    };
    let mut messages = client.message_rx();
    let mut reconnects = client.reconnect_rx();
    let channel = channel_name(&settings);
    tokio::spawn(keep_connected(client.clone(), "cluster channel"));
    let count = shards.0.len();
    loop {
        tokio::select! {
            m = messages.recv() => match m {
                Ok(m) => {
                    let Some(push) = text_ref(&m.value).and_then(parse_push) else {
                        tracing::warn!(channel = %m.channel, "cluster channel: ignored a message that is not a ringgate push");
                        continue;
                    };
                    let home = crate::mesh::home_shard(push.user(), count);
                    shards.send(home, push.into_reply(count));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    shards.resync(&format!("{n} pushes were not read in time"));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            r = reconnects.recv() => match r {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Inline: no push of the new subscription is routed before every shard
                    // has its resync (messages wait in the broadcast buffer meanwhile).
                    // Until it works or the connection drops (the next reconnect retries).
                    loop {
                        match client.subscribe(channel.as_str()).await {
                            Ok(()) => {
                                shards.resync("subscribed to this node's channel");
                                break;
                            }
                            Err(e) if client.is_connected() => {
                                tracing::warn!(error = %e, "cluster channel: subscribe failed; retrying");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// The Redis thread's end of one shard's link.
struct ShardPipe {
    shard: usize,
    ops: Receiver<StoreOp>,
    replies: Sender<StoreReply>,
    wake_store: Arc<Doorbell>,
    shard_bell: Arc<Doorbell>,
    reader: std::os::unix::net::UnixStream,
}

async fn run(settings: RedisSettings, pipes: Vec<ShardPipe>, all: AllShards) {
    let config = match fred_config(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot configure the Redis client; every store operation will fail");
            return fail_forever(pipes).await;
        }
    };
    let pool = match Builder::from_config(config)
        .with_config(|c| c.fail_fast = false)
        .with_connection_config(|c| {
            c.connection_timeout = settings.timeout;
            redirect_once(c);
        })
        .with_performance_config(|c| c.default_command_timeout = settings.timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2))
        .build_pool(settings.pool_size.max(1))
    {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the Redis client; every store operation will fail");
            return fail_forever(pipes).await;
        }
    };
    // Connect in the background: shards are served at once, with `unavailable` until then.
    for client in pool.clients() {
        tokio::spawn(log_connection_errors(client.clone()));
        tokio::spawn(keep_connected(client.clone(), "store"));
    }
    // Give the first connection up to one timeout before serving: operations queue meanwhile
    // (bounded), and a gateway started next to a healthy Redis does not refuse its first sends.
    let deadline = Instant::now() + settings.timeout;
    while !pool.clients().iter().all(|c| c.is_connected()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Take this run's lease before any shard registers a user: other nodes drop directory
    // entries of runs without one (shard 0 refreshes it from then on).
    let lease = Expiration::PX(settings.lease_ms as i64);
    if let Err(e) = pool
        .set::<(), _, _>(
            lease_key(&settings.key_prefix, &settings.node),
            1,
            Some(lease),
            None,
            false,
        )
        .await
    {
        tracing::warn!(error = %e, "cannot take this node's lease yet; shard 0 keeps trying");
    }
    let settings = Arc::new(settings);
    let mut tasks = Vec::new();
    if let Ok(config) = fred_config(&settings) {
        tasks.push(tokio::spawn(listen(config, settings.clone(), all.clone())));
    }
    for pipe in pipes {
        let client = pool.clients()[pipe.shard % pool.clients().len()].clone();
        tasks.push(tokio::spawn(serve_shard(
            client,
            settings.clone(),
            pipe,
            all.clone(),
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// No client could be built: answer every operation with an error, forever.
async fn fail_forever(pipes: Vec<ShardPipe>) {
    let mut tasks = Vec::new();
    for pipe in pipes {
        tasks.push(tokio::spawn(async move {
            let Ok(reader) = pipe.reader.try_clone() else {
                return;
            };
            let Ok(mut bell) = tokio::net::UnixStream::from_std(reader) else {
                return;
            };
            let mut buf = [0u8; 64];
            while wait_bell(&mut bell, &mut buf).await {
                pipe.wake_store.clear();
                let batch: Vec<StoreOp> = pipe.ops.try_iter().collect();
                answer_failed(
                    &pipe,
                    batch,
                    "the Redis client could not be built".into(),
                    false,
                );
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn wait_bell(bell: &mut tokio::net::UnixStream, buf: &mut [u8]) -> bool {
    use tokio::io::AsyncReadExt;
    matches!(bell.read(buf).await, Ok(n) if n > 0)
}

/// Inbox entries one batch's loads are expected to bring back: a load's entries are parsed on
/// the Redis thread once its batch is answered, and Redis waits meanwhile unless another
/// shard's batch is there. Big inboxes want a few loads per batch, so that one shard's parse
/// overlaps another's batch in Redis; small ones want many, as each batch costs a round trip.
/// Measured (docs/performance.md "Replay at 16 loads per batch"): 200-entry inboxes (the store
/// bench) replayed 1.19x faster at 16 loads per batch than at 64 (and 64 1.34x faster than at
/// 1,024); a reconnect storm of 2-entry inboxes took 1.81 s at 16 against 1.52-1.60 s at 64,
/// 256 and 1,024. 16 loads of 200 entries.
const LOAD_ENTRIES_PER_BATCH: usize = 3_200;
/// The fewest loads a batch may carry (inboxes of 200 entries and more).
const LOADS_PER_BATCH_MIN: usize = 16;

/// The entries this shard's loads brought back lately, and from them how many loads a batch
/// carries: `LOAD_ENTRIES_PER_BATCH` worth, within `LOADS_PER_BATCH_MIN..=BATCH_OPS`.
struct LoadSizes {
    /// Mean entries per load, each load weighing 1/8 (a storm's first loads set it quickly).
    mean: f64,
}

impl LoadSizes {
    /// Assumes big inboxes until loads say otherwise: a first batch of many big loads would
    /// keep Redis idle through its whole parse.
    fn new() -> Self {
        LoadSizes {
            mean: (LOAD_ENTRIES_PER_BATCH / LOADS_PER_BATCH_MIN) as f64,
        }
    }

    fn loaded(&mut self, entries: usize) {
        self.mean += (entries as f64 - self.mean) / 8.0;
    }

    fn loads_per_batch(&self) -> usize {
        let loads = LOAD_ENTRIES_PER_BATCH as f64 / self.mean.max(1.0);
        (loads as usize).clamp(LOADS_PER_BATCH_MIN, BATCH_OPS)
    }
}

/// The next batch: upkeep the open breaker held back first (all of it goes before anything
/// newer), then new operations in order, up to `max_loads` loads (`is_load`). Returns the
/// batch and how many were held back.
fn next_batch<T>(
    held_back: &mut Vec<T>,
    queue: impl Iterator<Item = T>,
    max_loads: usize,
    is_load: impl Fn(&T) -> bool,
) -> (Vec<T>, usize) {
    let from_held = held_back.len().min(BATCH_OPS);
    let mut batch: Vec<T> = held_back.drain(..from_held).collect();
    let mut loads = 0;
    for op in queue.take(BATCH_OPS - from_held) {
        loads += usize::from(is_load(&op));
        batch.push(op);
        if loads == max_loads {
            break;
        }
    }
    (batch, from_held)
}

/// The breaker refused `batch` (its first `from_held` were held back before): held upkeep
/// goes back to the front in its order, new upkeep joins it at the back, and what is left is
/// to be answered as refused. When the batch brought nothing new (held upkeep filled it), the
/// operations queued behind it are taken from `queue`, so that their senders hear
/// `unavailable` now, not when Redis is back. None: nothing is waiting.
fn refuse_batch<T>(
    held_back: &mut Vec<T>,
    mut batch: Vec<T>,
    from_held: usize,
    queue: impl Iterator<Item = T>,
    is_upkeep: impl Fn(&T) -> bool,
) -> Option<Vec<T>> {
    let mut new_ops = batch.split_off(from_held);
    held_back.splice(0..0, batch);
    if new_ops.is_empty() {
        new_ops.extend(queue.take(BATCH_OPS));
        if new_ops.is_empty() {
            return None;
        }
    }
    let (upkeep, rest): (Vec<T>, Vec<T>) = new_ops.into_iter().partition(|op| is_upkeep(op));
    held_back.extend(upkeep);
    Some(rest)
}

/// One shard's operations, batch after batch, in order.
async fn serve_shard(
    client: Client,
    settings: Arc<RedisSettings>,
    pipe: ShardPipe,
    all: AllShards,
) {
    let shard = pipe.shard;
    let mut bell = match tokio::net::UnixStream::from_std(pipe.reader.try_clone().expect("dup")) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, shard, "Redis task cannot watch its doorbell");
            return;
        }
    };
    let mut buf = [0u8; 64];
    let mut up = true;
    let mut breaker = breaker::Breaker::default();
    // Directory and lease upkeep the open breaker held back: sent first once it closes (a lost
    // `Leave` would keep this node in a user's directory entry, online for presence).
    let mut held_back: Vec<StoreOp> = Vec::new();
    // When a failed probe was last logged (at most one line per PROBE_LOG_EVERY).
    let mut probe_logged: Option<Instant> = None;
    let mut load_sizes = LoadSizes::new();
    while wait_bell(&mut bell, &mut buf).await {
        pipe.wake_store.clear();
        loop {
            let max_loads = load_sizes.loads_per_batch();
            let (mut batch, from_held) =
                next_batch(&mut held_back, pipe.ops.try_iter(), max_loads, |op| {
                    matches!(op, StoreOp::Load { .. })
                });
            if batch.is_empty() {
                break;
            }
            let started = Instant::now();
            let gate = pass_breaker(
                &mut breaker,
                &client,
                &settings,
                (shard, &mut probe_logged),
                started,
            )
            .await;
            // While disconnected, or while the breaker is open, fail at once instead of
            // queueing inside fred or waiting out a timeout: memory stays bounded while Redis
            // is away or slow, and senders hear `unavailable` without waiting.
            if gate == breaker::Gate::Refuse {
                let refused = refuse_batch(
                    &mut held_back,
                    batch,
                    from_held,
                    pipe.ops.try_iter(),
                    is_upkeep,
                );
                if held_back.len() > MAX_HELD_BACK {
                    let over = held_back.len() - MAX_HELD_BACK;
                    held_back.drain(..over);
                    tracing::warn!(shard, dropped = over, "Redis circuit breaker open: directory upkeep over its bound dropped (presence may show users online until their entries expire)");
                }
                match refused {
                    // Nothing new: wait for the next operation (the shard probes every 500 ms
                    // while Redis is away, which rings the bell).
                    None => break,
                    Some(rest) if rest.is_empty() => continue, // only upkeep came: more may wait
                    Some(rest) => batch = rest,
                }
            }
            let ops = batch.len();
            // Asked once: what is sent is what the answers below say may have happened.
            let connected = client.is_connected();
            let sent = gate != breaker::Gate::Refuse && connected;
            let outcome = if gate == breaker::Gate::Refuse {
                Err(format!(
                    "Redis circuit breaker open ({} batches in a row got no answer in time; probing every {} ms)",
                    breaker::OPEN_AFTER,
                    breaker::OPEN_FOR.as_millis()
                ))
            } else if !connected {
                Err("not connected to Redis (reconnecting)".to_string())
            } else {
                let outcome = run_batch(&client, &settings, shard, &batch).await;
                if breaker.sent(timed_out(&outcome), Instant::now()) {
                    tracing::warn!(
                        shard,
                        "Redis circuit breaker open: {} batches in a row got no answer within {} ms; sends that need the store get `unavailable` at once until a probe answers",
                        breaker::OPEN_AFTER,
                        settings.timeout.as_millis()
                    );
                }
                outcome
            };
            let mut expired = 0;
            let error = match outcome {
                Ok(answers) => {
                    expired = answers.iter().flatten().map(Answer::trimmed).sum();
                    let first_error = answers.iter().find_map(|a| a.as_ref().err().cloned());
                    if answers
                        .iter()
                        .any(|a| matches!(a, Ok(Answer::Leased(false))))
                    {
                        all.resync("this node's lease had lapsed (or was just taken)");
                    }
                    for (op, answer) in batch.into_iter().zip(answers) {
                        if let Ok(Answer::Loaded(loaded)) = &answer {
                            load_sizes.loaded(loaded.entries.len());
                        }
                        let reply = match answer {
                            Ok(answer) => answer.into_reply(op),
                            Err(why) => failed_reply(op, why),
                        };
                        let _ = pipe.replies.send(reply);
                    }
                    first_error
                }
                Err(why) => {
                    answer_failed(&pipe, batch, why.clone(), sent);
                    Some(why)
                }
            };
            match (&error, up) {
                (None, false) => {
                    tracing::info!(shard, "Redis is back: the durable store answers again");
                    up = true;
                }
                (Some(why), true) => {
                    tracing::warn!(shard, error = %why, "Redis unavailable: sends that need the store get `unavailable`; live delivery goes on");
                    up = false;
                }
                _ => {}
            }
            let _ = pipe.replies.send(StoreReply::Batch {
                ops,
                latency: started.elapsed(),
                error,
                expired,
                breaker_open: breaker.is_open(),
            });
            pipe.shard_bell.ring();
        }
    }
}

/// At most one line per this long about probes that got no answer.
const PROBE_LOG_EVERY: Duration = Duration::from_secs(10);

/// The breaker's word on the next batch, probing with a `PING` when it is due. A probe that
/// gets no answer is logged with its reason (at most once per `PROBE_LOG_EVERY`): a breaker
/// that stays open while Redis itself answers others points at the client's state.
async fn pass_breaker(
    breaker: &mut breaker::Breaker,
    client: &Client,
    settings: &RedisSettings,
    (shard, logged): (usize, &mut Option<Instant>),
    now: Instant,
) -> breaker::Gate {
    let unanswered = match breaker.gate(now) {
        // Disconnected: nothing to probe (fred reconnects; the batch fails at once).
        breaker::Gate::Probe if !client.is_connected() => "the client is not connected".to_string(),
        breaker::Gate::Probe => {
            let ping = tokio::time::timeout(settings.timeout, client.ping::<Value>(None)).await;
            let answered = matches!(ping, Ok(Ok(_)));
            if breaker.probed(answered, Instant::now()) {
                tracing::info!(shard, "Redis answered the probe: circuit breaker closed");
            }
            match ping {
                Ok(Ok(_)) => return breaker::Gate::Send,
                Ok(Err(e)) => format!("the PING failed: {e}"),
                Err(_) => format!(
                    "no answer to the PING within {} ms",
                    settings.timeout.as_millis()
                ),
            }
        }
        gate => return gate,
    };
    if log_due(logged, PROBE_LOG_EVERY) {
        tracing::warn!(shard, why = %unanswered, "Redis circuit breaker stays open: the probe got no answer");
    }
    breaker::Gate::Refuse
}

/// Directory and lease upkeep: held back (not refused) while the breaker is open.
fn is_upkeep(op: &StoreOp) -> bool {
    matches!(
        op,
        StoreOp::Leave { .. }
            | StoreOp::RoomLeave { .. }
            | StoreOp::Lease
            | StoreOp::WatchPresence { on: false, .. }
    )
}

/// The batch, or one of its operations, got no answer in time (what the breaker counts).
fn timed_out(outcome: &Result<Vec<Result<Answer, String>>, String>) -> bool {
    match outcome {
        Err(why) => why.starts_with(TIMED_OUT),
        Ok(answers) => answers
            .iter()
            .any(|a| matches!(a, Err(why) if why.starts_with(TIMED_OUT))),
    }
}

/// `sent`: the batch went to Redis (its writes may have happened); else none of it did.
fn answer_failed(pipe: &ShardPipe, batch: Vec<StoreOp>, why: String, sent: bool) {
    for op in batch {
        let reply = match sent {
            true => failed_reply(op, why.clone()),
            false => unsent_reply(op, why.clone()),
        };
        let _ = pipe.replies.send(reply);
    }
    pipe.shard_bell.ring();
}

/// The answer to an operation that was not sent (the breaker is open, or Redis is not
/// connected): like [`failed_reply`], but a write is known not to have happened.
pub(crate) fn unsent_reply(op: StoreOp, why: String) -> StoreReply {
    match op {
        StoreOp::Append(msg) => StoreReply::Appended {
            msg,
            result: Err(StoreError::Unsent(why)),
        },
        op => failed_reply(op, why),
    }
}

/// The answer to an operation that failed, or was sent and got no answer: a write may
/// still have happened (or happen).
pub(crate) fn failed_reply(op: StoreOp, why: String) -> StoreReply {
    match op {
        StoreOp::Append(msg) => StoreReply::Appended {
            msg,
            result: Err(StoreError::Unavailable(why)),
        },
        StoreOp::Remove { user, seq, report } => StoreReply::Removed {
            user,
            seq,
            ran: false,
            ok: false,
            report,
        },
        StoreOp::Load { user, token, .. } => StoreReply::Loaded {
            user,
            token,
            result: Err(StoreError::Unavailable(why)),
        },
        StoreOp::Presence { ask, users } => StoreReply::Presence {
            ask,
            users,
            online: None,
        },
        StoreOp::RoomPublish(post) => StoreReply::RoomPublished {
            post,
            result: Err(StoreError::Unavailable(why)),
        },
        StoreOp::RoomJoin(ask) => StoreReply::RoomJoinFailed(ask),
        StoreOp::Resolve { to, from, writes } => StoreReply::Resolved {
            to,
            from,
            writes,
            landed: None,
        },
        StoreOp::ClaimIdSlot { asked_at, .. } => StoreReply::IdSlot {
            asked_at,
            answer: Err(why),
        },
        StoreOp::Leave { .. }
        | StoreOp::Lease
        | StoreOp::Probe
        | StoreOp::RoomLeave { .. }
        | StoreOp::WatchPresence { .. }
        | StoreOp::Typing { .. } => StoreReply::Done,
    }
}

/// A client for the push worker's checks (`push/mod.rs`): its own connection, so a push check
/// never waits behind a shard's batch; connected in the background.
pub fn check_client(settings: &RedisSettings) -> Result<fred::clients::Client, String> {
    let config = fred_config(settings)?;
    let client = Builder::from_config(config)
        .with_config(|c| c.fail_fast = false)
        .with_connection_config(|c| {
            c.connection_timeout = settings.timeout;
            redirect_once(c);
        })
        .with_performance_config(|c| c.default_command_timeout = settings.timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2))
        .build()
        .map_err(|e| e.to_string())?;
    tokio::spawn(keep_connected(client.clone(), "push checks"));
    Ok(client)
}

/// Which of these inbox entries (user, seq) are still stored: one pipelined XRANGE each.
/// An entry whose check fails counts as stored (a push too many, never one too few).
pub async fn entries_stored(
    client: &fred::clients::Client,
    prefix: &str,
    entries: &[(&str, InboxSeq)],
) -> Vec<bool> {
    use fred::interfaces::StreamsInterface;
    let pipeline = client.pipeline();
    for (user, seq) in entries {
        let id = seq_to_stream_id(*seq);
        let _: Result<(), _> = pipeline
            .xrange(
                keys::inbox_key(prefix, user),
                id.as_str(),
                id.as_str(),
                Some(1),
            )
            .await;
    }
    match pipeline
        .try_all::<Value>()
        .await
        .into_iter()
        .collect::<Vec<_>>()
    {
        answers if answers.len() == entries.len() => answers
            .into_iter()
            .map(|a| !matches!(a, Ok(Value::Array(v)) if v.is_empty()))
            .collect(),
        _ => vec![true; entries.len()],
    }
}
