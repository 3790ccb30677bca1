//! The inbox mirror, the shard's side of its store, one path for both kinds (issue 15): the store is the
//! authority, and the shard's memory inbox is a *mirror* of the inboxes of the users online
//! on this shard. Redis (`redis_url` set) answers from its thread; the embedded store
//! (`store/embedded.rs`) answers in the shard's turn, through the same replies. The rules
//! below are written for Redis; the embedded store never fails, so it never takes the
//! paths of a store that is down, in doubt or pushing from other nodes. Other nodes exist
//! only with Redis: [`Shard::store_shared`] is the one place that asks.
//!
//! * `deliver` sends every message to Redis first (one op in the shard's next batch);
//!   `accepted` goes out only when Redis confirmed the write. A gateway SIGKILL therefore loses
//!   nothing that was accepted: the next run reads it back from Redis.
//! * A user's first device here triggers a *load*: the node registers in the user's
//!   directory entry (`SADD`), then reads the inbox (XRANGE); until it answers, that user's
//!   devices get no `msg` and no `synced`. Every append after the registration, by any node,
//!   is pushed on this node's channel by the same script that writes it, so the mirror is fed
//!   from one connection in the order Redis ran the appends (a local append's own reply only
//!   answers the sender: two connections could deliver two entries out of order). Pushes
//!   the read already holds are ignored; pushes during the read wait for it. The read is
//!   taken in only once its *mark* came on the channel (published right after the read, by
//!   the server that publishes the inbox's pushes): every push of an entry appended before
//!   the read came before it, so what the read lacks of them was acked elsewhere and is
//!   owed in its place (`read_marked`).
//! * Pushes are taken only by mirrors loaded in the current *epoch*: every resync (the
//!   channel subscribed again, or this node's lease had lapsed) starts one and reloads every
//!   mirror, so a mirror that may have missed a push never gets later ones before it. A
//!   reload never brings back an entry acked while it ran.
//! * An ack removes the entry from the mirror (first device wins, as in embedded mode) and
//!   from Redis (XDEL, in a later batch). A delete Redis did not run is sent again once it
//!   answers, and no read takes its entry in meanwhile (`unremoved`).
//! * A device on another node may ack an entry first: this mirror keeps it for its own
//!   devices. When the mirror is read again, an entry it knew of (held, pushed meanwhile, or
//!   left for that read in `left_for_read` because it could not take it in then) that the
//!   read no longer has was acked elsewhere: it is *owed* to each device here not sent it
//!   ([`MirrorEffect::Owed`]), so each connected device still gets every message.
//! * The user's last device leaves: the mirror is dropped (Redis still holds everything).
//! * Redis down: the store refuses in bounded time (`redis_timeout_ms`), senders to offline
//!   users get `unavailable`, loads are retried every `LOAD_RETRY_MS`; fred reconnects by
//!   itself, and a shard that has nothing to write probes every `PROBE_MS` to learn it is back.
//! * Live delivery while Redis is down: a message for a user online here (mirror loaded) is
//!   put past everything its devices here were given (`live_position`) and sent to them from
//!   memory; it is *not* accepted yet. The first device's ack makes it safe (SPEC 4: "a
//!   recipient device acknowledged it"): the sender gets `accepted` and `delivered` together.
//!   These *live* entries form a tail per user, bounded by `window`; while a user has one,
//!   new messages to that user join it even if Redis is back, so per-sender order holds
//!   (a durable entry is never placed before a live one). When the user's last device leaves
//!   with live entries unacked, they are appended to Redis in order; if Redis still refuses,
//!   their senders get `unavailable` and resend with the same cid. Nothing goes live for a
//!   user while an entry of theirs waits to enter the mirror, or while a write this shard
//!   made for them is answered stored but its push has not come (`unpushed`: the answer and
//!   the push travel on two connections; its sender was told `accepted` already). Nor does
//!   a sender's message go live before a write of the pair issued since the sender arrived
//!   on this shard was stored here (`confirmed`): the sender may have been told `accepted`
//!   on another node for a message whose push has not reached this node (a write stored
//!   here later comes after it on the channel, and `~top` keeps one issued earlier from
//!   landing after it). Nor below the pair's highest id the mirror took in: clients tell
//!   held `accepted`s in id order. Other senders to the same user still go live.
//! * A mirror that may have missed an entry (an uncertain write, or a confirmed write that
//!   arrived behind a live entry) is reloaded once Redis answers and the user's tail is
//!   empty (never while live entries are out, whose seqs a reload would not keep). Until
//!   that reload, an entry known to be missing (it could not be placed) holds back every
//!   entry of that user after it: none is shown from Redis, none goes live, and while a tail
//!   is out new messages to the user are refused for now (`missing`).
//! * A write is answered `unavailable` only once it is known never to land (SPEC 4, Order:
//!   "a send answered `unavailable` was not taken"). A write whose answer was lost (it timed
//!   out: fred may send it after a reconnect, Redis may still be working through it; or it
//!   ran and its answer was lost) is kept *in doubt*, its sender told nothing yet. Each
//!   append carries this shard's attempt number, increasing; the script keeps, per pair of
//!   users, the highest attempt of this shard that landed or was resolved, and refuses an
//!   older one (`stale`). Once Redis answers, the shard *resolves* its writes in doubt (from
//!   the tick): the watermark rises past each, so none can land any more, and each that had
//!   landed is kept and answered `accepted`, each that had not is answered `unavailable`. A
//!   pair's answers are told in the order of its writes: one that comes while an earlier
//!   write of the pair is in doubt waits for that write's resolution.
//!   Why not answer `unavailable` at the timeout and remove the entry later, if it landed (as
//!   until 2026-12-05): the entry could be shown before its removal, on another node (its
//!   mirror is fed by pushes from Redis) or after this node died, and the sender's resend
//!   would then be told `accepted` after later messages the recipient saw it before (found by
//!   tests/cluster.rs, a write that timed out and landed later, and by the simulation with
//!   node deaths).
//! * Nor is an entry of a write in doubt shown here before it is resolved: it waits like one
//!   whose write is unanswered (`unanswered`), and everything of its user after it waits
//!   behind it. A node that dies meanwhile has shown nothing past it: the next run shows it
//!   in its place and answers its sender's resend with its id.
//! * A user's entries reach the mirror in the order Redis holds them: while one waits for
//!   its write's answer, every later entry of that user (any sender) waits behind it
//!   (`waiting`). The mirror only grows at its end and a connection is only sent what lies
//!   past what it was sent, so an entry let in after a later one would reach the recipient
//!   after its sender's next message (seen in tests/cluster_random.rs: three pushes of one
//!   sender held for their answers while another sender's entry went in; the first two then
//!   no longer fitted and came after the third).

//!
//! Shape: [`InboxMirror`] is a machine. Each input (a send to deliver, an ack, a store
//! answer, a tick) comes with the time and returns its effects in order ([`MirrorEffect`]):
//! reports for senders, store operations, users whose devices have new entries, push
//! offers. It owns the mirror's entries ([`MemoryInbox`]) and every rule above; it performs
//! no I/O and reads no clock. `durable.rs` is the shard's glue: it owns the store link,
//! turns each store reply into a call here (the one dispatch) and performs the effects.

use std::collections::hash_map::Entry;
use std::collections::BTreeMap;

use crate::hash::{FastMap, FastSet, IdMap};
use std::sync::Arc;

use compact_str::CompactString;

use crate::delivery::ids::issued_ms;
use crate::delivery::message::{Message, Outcome, RefusedCids, Report, StoreWrite};
use crate::delivery::refusal::SendRefusal;
use crate::metrics::ShardMetrics;
use crate::push::PushItem;
use crate::store::redis::{self as store, Appended, Fate, Loaded, StoreOp};
use crate::store::{InboxSeq, MemoryInbox, StoreError, StoredMessage};

/// How long a failed inbox load waits before it is tried again.
pub(crate) const LOAD_RETRY_MS: u64 = 500;
/// How often a shard that believes Redis is down checks whether it is back.
const PROBE_MS: u64 = 500;
/// Writes kept in doubt per pair of users; beyond it, writes to the pair are refused unsent
/// until a resolve clears them (memory stays bounded while Redis is away).
const MAX_DOUBTS_PER_PAIR: usize = 1024;

/// Deletes of acked entries kept to be sent again, per shard: past it one is given up
/// (counted; its entry is delivered again after a reload, and clients drop the copy).
const MAX_UNREMOVED: usize = 100_000;

/// Deletes sent again per tick: well under the store queue, so that a shard back from an
/// outage with many of them still has room for its appends and loads (a review's finding).
const REMOVES_PER_TICK: usize = 512;

/// A delete sent again that did not run again waits before the next round: 100 ms, doubled
/// per round in a row in which one failed again, at most 10 s. (Redis answers, but a delete keeps failing: without
/// it, sent again on every tick.)
const REMOVE_RETRY_MS: u64 = 100;
const REMOVE_RETRY_MAX_MS: u64 = 10_000;

/// How long a load's read waits for its mark on the node's channel (see `read_marked`). A
/// mark lost while the subscription stays up (a Redis Cluster bus link that broke, a
/// Sentinel failover the subscriber did not follow) would otherwise hold the user's devices
/// unfed until the next resync (a review's finding): past it the read is taken in, as
/// before the marks.
const MARK_WAIT_MS: u64 = 10_000;

/// (recipient, sender): the pair of users whose writes keep their order.
type Pair = (CompactString, CompactString);

/// (recipient, sender, cid): one message's write.
type Written = (CompactString, CompactString, CompactString);

fn is_write_of(written: &Written, to: &str, from: &str, cid: &str) -> bool {
    written.0 == to && written.1 == from && written.2 == cid
}

/// What the mirror asks the shard to do, in order.
pub enum MirrorEffect {
    /// Tell a message's sender (through its home shard) what became of it.
    Tell(Report),
    /// The same, as the store handed it back boxed.
    TellBoxed(Box<Report>),
    /// Queue a store operation; when the queue refuses it, the shard gives it back to
    /// [`InboxMirror::store_refused`].
    Store(StoreOp),
    /// `user`'s mirror has entries its devices may not have: pump each device of `user`
    /// here and wake it (the connection being polled writes its own output).
    Feed(CompactString),
    /// A load read what `user` was sent (per sender, the highest id a device acked): for
    /// read receipts, before the entries it read are fed.
    Received {
        user: CompactString,
        received: Vec<(CompactString, u64)>,
    },
    /// `user`'s mirror has loaded: the `read`s that waited for it are judged now.
    Loaded(CompactString),
    /// A reload found these entries gone from the store (a device on another node acked
    /// them): each device of `user` here that was not sent one is owed it (each connected
    /// device gets every message). Comes before the load's `Feed`.
    Owed {
        user: CompactString,
        entries: Vec<(InboxSeq, StoredMessage)>,
        /// Entries this mirror never held, at or below a live entry's position (see
        /// `InboxMirror::live_high`): owed to each device whose replay passed them, which the
        /// inbox's order alone never sends them. (One gone from the store is in both lists.)
        passed: Vec<(InboxSeq, StoredMessage)>,
    },
    /// Nobody holds a device of the recipient anywhere: offer the push webhook.
    Push(Box<PushItem>),
}

/// What the mirror is told once, at start.
#[derive(Debug, Clone, Copy)]
pub struct MirrorConfig {
    /// The connection window: the longest live tail per user and pushes held per load.
    pub window: usize,
    /// Entries read per load.
    pub load_limit: usize,
    /// Other nodes share the store (Redis).
    pub shared: bool,
    /// An offline push worker exists (`push_webhook_url`).
    pub push: bool,
}

/// A write of this shard whose answer was lost: it may have landed. Resolved once Redis
/// answers (see the module doc), then its sender is told.
struct Doubt {
    msg: Box<Message>,
    /// Why its answer was lost (the `unavailable` its sender gets if it never landed).
    why: String,
}

impl Doubt {
    /// As a resolve names it.
    fn write(&self) -> (Box<str>, u64) {
        (self.msg.cid.as_str().into(), self.msg.write.attempt)
    }

    /// Whether a resolve's `(cid, attempt)` names this write.
    fn is(&self, (cid, attempt): &(Box<str>, u64)) -> bool {
        self.msg.write.attempt == *attempt && self.msg.cid.as_str() == &**cid
    }
}

/// The state of one online user's mirror. `epoch`: the shard's channel epoch when the load
/// was submitted; pushes from other nodes are taken only by mirrors of the current epoch (a
/// mirror loaded before this node's channel was heard may lack an entry whose push was lost,
/// and adding later pushes to it would put them before that entry).
///
/// Eight bytes: a mirror is one entry per online user, in a map as large as the shard's
/// users, and most are `Ready`. What a load in flight or a failed one needs is kept beside,
/// in `InboxMirror::loads` and `InboxMirror::retries` (a boxed `Loading` and a `u64` retry
/// time made the state 16 bytes: 14 more per idle connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mirror {
    /// A load was submitted (its state: `InboxMirror::loads`).
    Loading,
    /// The last load failed; retried on a tick at or after its time in `InboxMirror::retries`.
    Failed,
    /// This node's channel has not been heard yet (epoch 0): loaded by the first resync.
    AwaitingChannel,
    /// The mirror holds what Redis holds for this user.
    Ready { epoch: u32 },
}

const _: () = assert!(std::mem::size_of::<Mirror>() == 8);

/// A mirror's load in flight; answers to other tokens are stale.
struct Loading {
    token: u64,
    epoch: u32,
    /// Entries other nodes pushed meanwhile (the read may or may not include them; those past
    /// it are added once it answers).
    pushes: Vec<(InboxSeq, StoredMessage)>,
    /// Entries acked meanwhile, or whose delete sent again ran meanwhile (`unremoved`): the
    /// read may predate their delete, and must not bring them back (they would be sent
    /// again).
    acked: Vec<InboxSeq>,
    /// Shared store: the read, answered before its mark came on the channel (see
    /// `read_marked`), and when it is taken in all the same (`MARK_WAIT_MS`).
    read: Option<(Loaded, u64)>,
    /// Shared store: the read's mark came on the channel before its answer.
    marked: bool,
}

/// The inbox mirror of the users online on this shard, and the state of the writes that the
/// rules above keep (embedded store or Redis, one path).
pub struct InboxMirror {
    cfg: MirrorConfig,
    metrics: Arc<ShardMetrics>,
    /// The entries of the mirrored inboxes, in the order the store holds them.
    inbox: MemoryInbox,
    /// What the last input asked for, taken by the shard ([`InboxMirror::take_effects`]).
    out: Vec<MirrorEffect>,
    /// Users online on this shard (at least one device).
    mirrors: IdMap<Mirror>,
    /// The loads in flight, of the mirrors in state `Loading` (and only those).
    loads: FastMap<CompactString, Loading>,
    /// When each failed load is retried, of the mirrors in state `Failed` (and only those).
    retries: FastMap<CompactString, u64>,
    next_token: u64,
    /// The last batch succeeded (starts true: the first write finds out).
    up: bool,
    last_probe_ms: u64,
    /// No failed load is due before this (a lower bound; None: none failed since the last
    /// retry pass). The tick scans the mirrors for due retries only from then: a scan per
    /// tick cost an idle shard ~1% of a core per 19,000 online users.
    next_load_retry_ms: Option<u64>,
    /// Live entries per user (see the module doc), by mirror seq, with what reporting needs.
    tails: FastMap<CompactString, BTreeMap<InboxSeq, Message>>,
    /// Per user, the highest position a live entry took (kept until the user's mirror is
    /// dropped, also once the entry is acked). Live positions come after everything the
    /// user's devices here were given, but Redis can still store an entry of the user below
    /// one (another writer, the same millisecond): a device sent the live entry has passed
    /// that position and is never sent such an entry by the inbox's order alone. So such an
    /// entry makes the mirror `missing` when pushed (and is left for the read), and when a
    /// read brings it, or no longer has it, each device whose replay passed it is owed it
    /// (`MirrorEffect::Owed::passed`; found by slow-second-device
    /// seed 15780009465165166133: a device skipped two entries for good, and the user was
    /// shown them after the sender's later ones).
    live_high: FastMap<CompactString, InboxSeq>,
    /// Appends on their way to Redis, per recipient.
    writing: FastMap<CompactString, u32>,
    /// Users whose mirror is reloaded once Redis answers and their tail is empty.
    reload_wanted: FastSet<CompactString>,
    /// Users with an entry known to be missing from the mirror (it could not be placed): no
    /// later entry is shown, live or from Redis, until the reload reads them all in order.
    missing: FastSet<CompactString>,
    /// Shared store: this shard's writes answered stored whose entry has not come on the
    /// channel yet (the answer and the push travel on two connections, either first), by
    /// message id, with the recipient. No live entry for that recipient passes one: its
    /// sender was told `accepted` already. Gone when the push comes, or a load is sent for
    /// the recipient (its read holds the entry), or the recipient leaves.
    unpushed: FastMap<u64, CompactString>,
    /// Shared store: per recipient online here, per sender, the highest id of this shard's
    /// writes of the pair answered stored and of the pair's entries this mirror took in (read
    /// or pushed). Every entry of the pair that landed before that one reached the mirror
    /// before it did (one channel, in Redis's order; `unpushed` holds back live entries until
    /// a write's push came), and none issued before it can land after it (the script's
    /// `~top`). So a sender's message goes live only when this id was issued since the
    /// sender arrived here (`Message::sender_arrived_ms`): what it was told `accepted` for on
    /// another node before is then in the mirror; and only when the message was issued after
    /// it (a higher id): clients tell held `accepted`s in id order, and a live entry is shown
    /// after everything the mirror took in (found by two-node seed 18137199437984738542: a
    /// sender's message, long in the mesh from a connection it had since left, went live
    /// after its resend of an earlier cid, stored with a higher id by another node; the
    /// client told the earlier cid's `accepted` last). Dropped with the recipient's mirror.
    confirmed: FastMap<CompactString, FastMap<CompactString, u64>>,
    /// Shared store: per recipient, per sender, the id of the pair's latest resend refused
    /// as possibly stored (its earlier attempt may still land): refused here, or on its
    /// sender's shard, then the id of the pair's message that brought the news
    /// (`resend_refused`). The pair counts as
    /// confirmed again only once its top is above it: by the script's `~top`, no attempt
    /// issued before that resend can land after such an entry. Any entry would not do (two
    /// nodes with slow second devices, seed 16526268307316691065: an entry of the pair with
    /// a lower id than the other node's attempt, stored just before it, confirmed the pair;
    /// later messages went live before that attempt's push came, and the client told the
    /// attempt first). Dropped with the recipient's mirror.
    unsure: FastMap<CompactString, FastMap<CompactString, u64>>,
    /// Shared store: per recipient, per sender, the cids whose first attempt was refused here
    /// and that no entry of the pair has been seen stored with since. Their sender resends
    /// them, maybe on another node, whose ids of one millisecond may sort below the ones
    /// issued here: shown live now, a later message of the pair would come before them,
    /// though the client, telling held answers in id order, tells them first (found by the
    /// simulation with two nodes, slow second devices and resyncs, seed 7832106425874293347:
    /// s0's 3 to 5 went live on node B while its 1 and 2, refused there, were stored on node
    /// A under ids of the same millisecond from a lower slot). None of the pair goes live
    /// while one is kept. So do first attempts refused on the sender's home shard before
    /// they got here (no message id slot, a full shard channel, `rate_limited`), carried
    /// here by the pair's next message ([`Message::refused_earlier`]). Dropped with the
    /// recipient's mirror.
    refused_unstored: FastMap<CompactString, FastMap<CompactString, RefusedCids>>,
    /// Bumped by every resync (this node's channel is heard again, or its lease had lapsed);
    /// 0 until the channel is first heard. (u32: four billion resyncs; a mirror's state then
    /// fits in 8 bytes.)
    epoch: u32,
    /// The attempt number of this shard's next inbox write (see the module doc).
    next_attempt: u64,
    /// Writes whose answer was lost, per pair, in attempt order.
    doubts: FastMap<Pair, Vec<Doubt>>,
    /// Pairs with a resolve on its way to Redis.
    resolving: FastSet<Pair>,
    /// Per pair with a write in doubt: the answers of its writes since the first one in
    /// doubt, by attempt (`None`: still in doubt), told in that order as they become known.
    answers_in_order: FastMap<Pair, BTreeMap<u64, Option<Report>>>,
    /// This shard's appends not answered (or in doubt) yet, by the id of the message written,
    /// with its (recipient, sender, cid): an entry of another attempt of the same cid has
    /// another id. An entry of such a write pushed (or loaded) before the answer waits in
    /// `waiting`, and is shown only if the answer (or the resolve) says stored. (Keyed by id:
    /// one short hash per write and answer, not one over three strings.)
    unanswered: FastMap<u64, Written>,
    /// Per user, entries that must wait to enter the mirror, by seq: `Some(id)` waits for the
    /// answer to the write of message `id`, `None` only for the entries before it (see the
    /// module doc).
    waiting: FastMap<CompactString, BTreeMap<InboxSeq, (StoredMessage, Option<u64>)>>,
    /// Per user, pushed entries the mirror could not take in and left for its next read (one
    /// missing before them, or more pushes than a load holds), with the load under way when
    /// each came: if a read that ran after it no longer has one, a device on another node
    /// acked it out of the store meanwhile, and the devices here are owed it (see `loaded`).
    /// At most `load_limit` per user.
    left_for_read: FastMap<CompactString, BTreeMap<InboxSeq, (StoredMessage, Option<u64>)>>,
    /// Per user, acked entries whose delete Redis did not run (it failed, or its answer was
    /// lost and it may not have), with the `delivered` to tell when a delete removes it. Sent
    /// again on a tick while Redis is up; no read takes them in. Without
    /// it a later read brought the entry back: sent again, and on a device already sent later
    /// entries shown after them (one-node seed 6921874350140192627). Kept when the user
    /// leaves (the next connection's read must not bring them back either).
    unremoved: FastMap<CompactString, BTreeMap<InboxSeq, Unremoved>>,
    /// Some entry of `unremoved` is not on its way.
    removes_due: bool,
    /// Rounds in a row in which a delete sent again did not run again, since one ran or
    /// Redis came back; the next round waits that long after the last (`removes_sent_ms`,
    /// see `REMOVE_RETRY_MS`).
    remove_failures: u32,
    removes_sent_ms: u64,
    /// A delete of the last round did not run again (counted once in `remove_failures`).
    retried_remove_failed: bool,
    /// No stashed read's mark deadline is before this (None: none stashed since the last
    /// pass; see `take_unmarked_reads`).
    next_mark_deadline: Option<u64>,
    /// The entries in `unremoved`, at most `MAX_UNREMOVED`.
    unremoved_count: usize,
    /// The simulation's planted bugs (see [`OrderPlant`]).
    #[cfg(test)]
    plant: OrderPlant,
}

/// Order rules the simulation switches off to show it catches their absence.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum OrderPlant {
    #[default]
    None,
    /// An entry the first ack removes is not owed to the user's other devices here (each
    /// device's window then misses what another device acked before it was sent it).
    OweNothing,
    /// A reload owes nothing of what it no longer has (a device here then misses what a
    /// device on another node acked first).
    OweNoneGone,
    /// A delete Redis did not run is forgotten (as before 2026-12-07: see `unremoved`).
    ForgetUnremoved,
    /// A load's read is taken in without waiting for its mark (as before 2026-12-07: see
    /// `read_marked`).
    ReadBeforeMark,
    /// A refused send's pair may go live before the refused cid is seen stored (as before
    /// its fix: see `refused_unstored`).
    LivePastRefused,
    /// A send refused on its sender's shard before it reached its recipient's is not carried
    /// there by the pair's next message (as before its fix: see `Senders::refused_unrouted`).
    LivePastUnrouted,
    /// The read of a load replaced before its mark came is forgotten (as before the evening
    /// of 2026-12-07: see `keep_for_next_read`).
    ForgetUnmarkedRead,
    /// A reload owes what it lost above an entry left for the next read.
    OweAheadOfLeft,
    /// A reload owes what it lost above an entry of its read that waits for its write's
    /// answer (it looks only at entries waiting on past the read's end, as before).
    OweAheadOfWaiting,
    /// Entries pushed after an entry known missing are shown (the rule of `missing`).
    ShowPastMissing,
    /// A resent cid pays the send limit like a new one (the rule of `is_resend`).
    LimitResends,
    /// A write whose answer was lost is answered `unavailable` at once (as before
    /// 2026-12-05), though it may have landed: resolved later, it is kept if it landed.
    TellDoubtAtOnce,
    /// A pair's later messages go live past its resend refused as possibly stored (its
    /// confirmation is kept).
    LivePastUnsure,
    /// A message goes live while an entry its recipient's shard wrote, answered stored, has
    /// not come on the channel yet (the rule of `unpushed`).
    LivePastUnpushed,
    /// A sender's message goes live without a write of the pair issued since the sender
    /// arrived and confirmed by the store (the rule of `confirmed`).
    LiveUnconfirmed,
    /// A sender's message goes live though an entry of the pair with a higher id is in the
    /// mirror (the second rule of `confirmed`).
    LiveBelowTop,
    /// After a resend refused as possibly stored, any entry of the pair confirms it again
    /// (the rule of `unsure`).
    ConfirmBelowUnsure,
    /// A read's entries at or below a live position are owed to no device that passed them
    /// (the rule of `live_high`).
    OweNonePassed,
    /// A delete sent again that runs while a load is out does not keep the load's read,
    /// which may have run before it, from taking its entry in.
    ReadPastRemoved,
}

/// An acked entry's delete Redis did not run (see `InboxMirror::unremoved`).
struct Unremoved {
    /// The sender's `delivered`, told when a delete removes the entry.
    report: Option<Box<Report>>,
    /// Sent again, not answered yet.
    on_its_way: bool,
}

/// What becomes of an entry pushed or read for a mirror.
enum Admit {
    /// Into the mirror now.
    Now,
    /// Into `waiting`, for the answer to this message's write (`Some(id)`) or behind an
    /// entry that waits.
    Wait(Option<u64>),
}

impl InboxMirror {
    pub fn new(cfg: MirrorConfig, inbox: MemoryInbox, metrics: Arc<ShardMetrics>) -> Self {
        InboxMirror {
            cfg,
            metrics,
            inbox,
            out: Vec::new(),
            mirrors: IdMap::default(),
            loads: FastMap::default(),
            retries: FastMap::default(),
            next_token: 0,
            up: true,
            last_probe_ms: 0,
            next_load_retry_ms: None,
            tails: FastMap::default(),
            live_high: FastMap::default(),
            writing: FastMap::default(),
            reload_wanted: FastSet::default(),
            missing: FastSet::default(),
            unpushed: FastMap::default(),
            confirmed: FastMap::default(),
            unsure: FastMap::default(),
            refused_unstored: FastMap::default(),
            epoch: 0,
            next_attempt: 1,
            doubts: FastMap::default(),
            resolving: FastSet::default(),
            answers_in_order: FastMap::default(),
            unanswered: FastMap::default(),
            waiting: FastMap::default(),
            left_for_read: FastMap::default(),
            unremoved: FastMap::default(),
            removes_due: false,
            remove_failures: 0,
            removes_sent_ms: 0,
            retried_remove_failed: false,
            next_mark_deadline: None,
            unremoved_count: 0,
            #[cfg(test)]
            plant: OrderPlant::None,
        }
    }

    /// Room for `users` mirrors without moving the table (see `Shard::new`).
    pub fn reserve_users(&mut self, users: usize) {
        self.mirrors.reserve(users);
    }

    pub fn users_capacity(&self) -> usize {
        self.mirrors.capacity()
    }

    /// The same mirror behind another store: everything about writes and loads starts over;
    /// the entries stay (none exist before the store is chosen at start).
    pub fn for_store(&mut self, shared: bool) {
        let cfg = MirrorConfig { shared, ..self.cfg };
        let limits = *self.inbox.limits();
        let inbox = std::mem::replace(&mut self.inbox, MemoryInbox::new(limits));
        *self = InboxMirror::new(cfg, inbox, self.metrics.clone());
    }

    /// The offline push worker exists from now on.
    pub fn enable_push(&mut self) {
        self.cfg.push = true;
    }

    /// The effects of the inputs since the last take, in order. The shard hands the buffer
    /// back empty ([`InboxMirror::give_back`]) so that the per-message path reuses it.
    pub fn take_effects(&mut self) -> Vec<MirrorEffect> {
        std::mem::take(&mut self.out)
    }

    pub fn has_effects(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn give_back(&mut self, mut buffer: Vec<MirrorEffect>) {
        if self.out.is_empty() {
            buffer.clear();
            self.out = buffer;
        }
    }

    pub fn inbox(&self) -> &MemoryInbox {
        &self.inbox
    }

    pub fn inbox_mut(&mut self) -> &mut MemoryInbox {
        &mut self.inbox
    }

    fn tell(&mut self, report: Report) {
        self.out.push(MirrorEffect::Tell(report));
    }

    /// Refuse `msg` for now (counted): its sender resends it.
    fn refuse(&mut self, msg: Message, why: SendRefusal) {
        self.metrics.store_refused.inc();
        self.refused_here(&msg);
        self.tell(msg.refused(why));
    }

    /// A first attempt of `msg` was refused: nothing of it is stored, and its pair goes live
    /// no more until an entry of it is (see `refused_unstored`). A resend refused is not
    /// kept: another attempt of it may be stored already and never come again; the pair's
    /// confirmation is taken back instead (`resend_refused`). Nor is a read receipt: it has
    /// no `accepted` to keep in order, and a later receipt replaces it rather than resending
    /// it.
    fn refused_here(&mut self, msg: &Message) {
        if msg.resent {
            return self.resend_refused(&msg.to, &msg.from, msg.id);
        }
        #[cfg(test)]
        if self.plant == OrderPlant::LivePastRefused {
            return;
        }
        if !RefusedCids::holds_back(&msg.cid)
            || !self.cfg.shared
            || !self.mirrors.contains_key(&msg.to)
            || msg.from == crate::shard::deliver::BACKEND_SENDER
        {
            return;
        }
        self.refused_of_pair(&msg.to, &msg.from).keep(&msg.cid);
    }

    /// A resend of the pair (`to`, `from`) was refused, here (`resent` is its id) or on its
    /// sender's shard (`resent` is the id of the pair's message that carried the news).
    /// Another attempt of it may be in Redis (stored by an earlier connection's shard or a
    /// node that died) under an id below the pair's later messages, or land there still:
    /// shown live, those would come before it, while its sender is told its `accepted` in
    /// id order. So the pair's confirmation is forgotten, and none of its messages goes live
    /// until an entry of the pair above `resent` is stored (`unsure`), after which that other
    /// attempt cannot land. Whatever refused it: the live path, a busy store queue, a write
    /// the store did not take.
    fn resend_refused(&mut self, to: &CompactString, from: &CompactString, resent: u64) {
        // (Only where the store is shared: the embedded store has no live path.)
        if self.planted_live_past_unsure() || !self.cfg.shared || !self.mirrors.contains_key(to) {
            return;
        }
        self.forget_confirmed(to, from, resent);
    }

    /// `msg` carries what its pair had refused on its sender's shard before it got here
    /// ([`Message::refused_earlier`]): first attempts kept as if refused here, and a resend's
    /// mark taken as a resend refused here, before `msg` is looked at.
    fn refused_on_the_way(&mut self, msg: &mut Message) {
        let Some(refused) = msg.refused_earlier.take() else {
            return;
        };
        if !self.cfg.shared || !self.mirrors.contains_key(&msg.to) {
            return;
        }
        if refused.resend_refused {
            self.resend_refused(&msg.to, &msg.from, msg.id);
        }
        if !refused.cids.is_empty() || refused.overflowed {
            self.refused_of_pair(&msg.to, &msg.from).take_in(&refused);
        }
    }

    fn refused_of_pair(&mut self, to: &CompactString, from: &CompactString) -> &mut RefusedCids {
        let by_sender = self.refused_unstored.entry(to.clone()).or_default();
        by_sender.entry(from.clone()).or_default()
    }

    /// Whether a cid of `msg`'s pair refused here is not stored yet (see `refused_unstored`),
    /// other than `msg`'s own as the earliest of them: sent again by a client that does not
    /// mark resends (the SPEC asks only for the same cid), it is issued here and now, after
    /// everything issued here before, and shown before the pair's later messages. (Not when
    /// some were carried from the sender's shard: which is earliest is not known then.)
    fn refused_unstored_of(&self, msg: &Message) -> bool {
        let refused = (self.refused_unstored.get(&msg.to)).and_then(|by| by.get(&msg.from));
        refused.is_some_and(|r| r.overflowed || r.order_unknown || r.cids.first() != Some(&msg.cid))
    }

    /// An entry of the pair (`to`, `from`) with `cid` is stored: its cid no longer holds the
    /// pair back (see `refused_unstored`).
    fn stored_after_refusal(&mut self, to: &str, from: &str, cid: &str) {
        // The common case (every entry a read takes in): nothing refused, no key hashed.
        if self.refused_unstored.is_empty() {
            return;
        }
        let Some(by_sender) = self.refused_unstored.get_mut(to) else {
            return;
        };
        if let Some(refused) = by_sender.get_mut(from) {
            refused.cids.retain(|refused| refused != cid);
            if refused.cids.is_empty() && !refused.overflowed {
                by_sender.remove(from);
            }
        }
        if by_sender.is_empty() {
            self.refused_unstored.remove(to);
        }
    }

    fn submit(&mut self, op: StoreOp) {
        self.out.push(MirrorEffect::Store(op));
    }

    /// Some entry of `user` waits to enter the mirror: anything newer waits behind it.
    fn has_waiting(&self, user: &str) -> bool {
        self.waiting.get(user).is_some_and(|q| !q.is_empty())
    }

    /// An entry of `user` this shard wrote is stored but not in the mirror yet. (Scanned:
    /// asked only on the live path, while the store is away, and the map holds only the
    /// writes whose push is on its way.)
    fn awaits_push(&self, user: &str) -> bool {
        !self.unpushed.is_empty() && self.unpushed.values().any(|u| u == user)
    }

    fn forget_unpushed(&mut self, user: &str) {
        if !self.unpushed.is_empty() {
            self.unpushed.retain(|_, u| u != user);
        }
    }

    /// `user`'s mirror is loaded.
    pub fn ready(&self, user: &str) -> bool {
        matches!(self.mirrors.get(user), Some(Mirror::Ready { .. }))
    }

    /// A device of `user` started its session: make sure the user's inbox gets loaded.
    pub fn ensure(&mut self, user: &str) {
        if !self.mirrors.contains_key(user) {
            self.load(user);
        }
    }

    /// The last device of `user` here left: the mirror is dropped (the store keeps
    /// everything); live entries no device acked are made durable now, in order (or
    /// refused).
    pub fn released(&mut self, user: &str) {
        self.set_mirror(user, None);
        self.reload_wanted.remove(user);
        self.missing.remove(user);
        self.waiting.remove(user);
        self.left_for_read.remove(user);
        self.forget_unpushed(user);
        self.confirmed.remove(user);
        self.unsure.remove(user);
        self.refused_unstored.remove(user);
        let tail = self.tails.remove(user);
        self.live_high.remove(user);
        self.inbox.drop_user(user);
        // If it cannot be queued, the entry stays until this run's lease lapses: other
        // nodes then only push into a channel nobody reads, and presence cleans it.
        self.submit(StoreOp::Leave { user: user.into() });
        for (_, msg) in tail.into_iter().flatten() {
            self.metrics.live_spilled.inc();
            self.append(Box::new(msg));
        }
    }

    fn load(&mut self, user: &str) {
        if self.epoch == 0 {
            // Not before this node's channel is heard: a mirror read earlier would miss what
            // other nodes push meanwhile (and a device elsewhere may ack it out of Redis before
            // a later read). The first resync loads every waiting mirror.
            self.set_mirror(user, Some(Mirror::AwaitingChannel));
            return;
        }
        self.next_token += 1;
        let token = self.next_token;
        // Whatever was missing, the read (or its retry) brings, in order. A load the queue
        // refuses fails (`store_refused`) and is retried.
        self.missing.remove(user);
        self.forget_unpushed(user);
        let loading = Loading {
            token,
            epoch: self.epoch,
            acked: Vec::new(),
            pushes: Vec::new(),
            read: None,
            marked: false,
        };
        // A load it replaces (a resync while it was out): see `keep_for_next_read`.
        if let Some(replaced) = self.set_mirror(user, Some(Mirror::Loading)) {
            self.keep_for_next_read(user, replaced);
        }
        self.loads.insert(user.into(), loading);
        self.submit(StoreOp::Load {
            user: user.into(),
            token,
            limit: self.cfg.load_limit,
        });
    }

    /// The store queue refused an operation this mirror asked for: undo what asking it
    /// assumed.
    pub fn store_refused(&mut self, op: StoreOp, now: u64) {
        match op {
            StoreOp::Append(msg) => {
                self.write_not_sent(&msg);
                self.refuse(
                    *msg,
                    SendRefusal::Busy("the offline store is busy or unreachable, resend later"),
                );
            }
            StoreOp::Load { user, token, .. }
                if self.loads.get(&user).is_some_and(|l| l.token == token) =>
            {
                self.load_failed(user, now);
            }
            StoreOp::Resolve { to, from, .. } => {
                self.resolving.remove(&(to, from));
            }
            StoreOp::Remove { user, seq, report } => self.remove_again(user, seq, report),
            // A stale load (a newer one is out, or the user left); a leave that stays until
            // the lease lapses; a probe asked again next time.
            _ => {}
        }
    }

    /// An append the queue refused never left: it is neither on its way nor unanswered.
    fn write_not_sent(&mut self, msg: &Message) {
        if let Entry::Occupied(mut writes) = self.writing.entry(msg.to.clone()) {
            *writes.get_mut() -= 1;
            if *writes.get() == 0 {
                writes.remove();
            }
        }
        self.unanswered.remove(&msg.id);
    }

    /// Nothing of the store waits on this shard's tick: Redis up, no user's inbox mirrored
    /// or loading, no write unanswered, in doubt or being resolved, nothing to reload.
    pub fn quiet(&self) -> bool {
        self.up
            && self.mirrors.is_empty()
            && self.tails.is_empty()
            && self.writing.is_empty()
            && self.reload_wanted.is_empty()
            && self.missing.is_empty()
            && self.doubts.is_empty()
            && self.resolving.is_empty()
            && self.unanswered.is_empty()
            && self.waiting.is_empty()
            && self.unpushed.is_empty()
            && self.unremoved.is_empty()
    }

    /// Periodic work: probe while down, wanted reloads, failed loads, reads whose mark is
    /// late, resolves, deletes to send again.
    pub fn tick(&mut self, now: u64, wall: u64) {
        if !self.up && now >= self.last_probe_ms + PROBE_MS {
            self.last_probe_ms = now;
            self.submit(StoreOp::Probe);
        }
        if self.up && !self.reload_wanted.is_empty() {
            let due: Vec<CompactString> = self
                .reload_wanted
                .iter()
                // A mirror still loading is read again once it has loaded (its read may
                // have missed what was wanted): kept in `reload_wanted` until then.
                .filter(|u| !self.tails.contains_key(*u) && !self.loads.contains_key(*u))
                .cloned()
                .collect();
            for user in in_stable_order(due) {
                self.reload_wanted.remove(&user);
                if self.ready(&user) {
                    self.load(&user);
                }
            }
        }
        self.retry_loads(now);
        self.take_unmarked_reads(now, wall);
        self.resolve_doubts();
        self.send_removes_due(now);
    }

    /// Once Redis answers, the deletes it did not run are sent again (after a back-off once
    /// they fail again: `REMOVE_RETRY_MS`).
    fn send_removes_due(&mut self, now: u64) {
        if std::mem::take(&mut self.retried_remove_failed) {
            self.remove_failures = self.remove_failures.saturating_add(1);
        }
        let back_off = match self.remove_failures {
            0 => 0,
            n => (REMOVE_RETRY_MS << (n - 1).min(16)).min(REMOVE_RETRY_MAX_MS),
        };
        if !self.up || !self.removes_due || now < self.removes_sent_ms + back_off {
            return;
        }
        self.removes_due = false;
        self.removes_sent_ms = now;
        let mut due = Vec::new();
        'users: for (user, seqs) in &mut self.unremoved {
            for (seq, delete) in seqs.iter_mut().filter(|(_, d)| !d.on_its_way) {
                if due.len() == REMOVES_PER_TICK {
                    self.removes_due = true; // the rest on the next tick
                    break 'users;
                }
                delete.on_its_way = true;
                due.push((user.clone(), *seq, delete.report.take()));
            }
        }
        // In a stable order (see `in_stable_order`).
        due.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        for (user, seq, report) in due {
            self.metrics.redis_removes_retried.inc();
            self.submit(StoreOp::Remove { user, seq, report });
        }
    }

    /// A delete of an acked entry did not run (refused by the queue, failed, or its answer
    /// lost): kept, and sent again once Redis answers.
    fn remove_again(&mut self, user: CompactString, seq: InboxSeq, report: Option<Box<Report>>) {
        #[cfg(test)]
        if self.planted(OrderPlant::ForgetUnremoved) {
            return;
        }
        let kept = self
            .unremoved
            .get(&user)
            .is_some_and(|s| s.contains_key(&seq));
        if self.unremoved_count >= MAX_UNREMOVED && !kept {
            // Delivered again after a reload and acked again; the client drops the copy, but
            // a device connected since may be sent it after later entries (the order break
            // `unremoved` prevents below the cap).
            self.metrics.redis_removes_dropped.inc();
            return;
        }
        if kept {
            // Sent again, and it did not run again: the next round backs off (once per round).
            self.retried_remove_failed = true;
        }
        let seqs = self.unremoved.entry(user).or_default();
        let delete = Unremoved {
            report,
            on_its_way: false,
        };
        if seqs.insert(seq, delete).is_none() {
            self.unremoved_count += 1;
        }
        self.removes_due = true;
    }

    /// Once Redis answers, every pair's writes in doubt are resolved (one call per pair).
    fn resolve_doubts(&mut self) {
        if !self.up || self.doubts.len() == self.resolving.len() {
            return;
        }
        let due: Vec<Pair> = self
            .doubts
            .keys()
            .filter(|p| !self.resolving.contains(*p))
            .cloned()
            .collect();
        for pair in in_stable_order(due) {
            let op = StoreOp::Resolve {
                to: pair.0.clone(),
                from: pair.1.clone(),
                writes: self.doubts[&pair].iter().map(Doubt::write).collect(),
            };
            self.resolving.insert(pair);
            self.submit(op);
        }
    }

    /// The one way a mirror's state changes (None: the mirror goes): what the state it leaves
    /// kept beside the map goes with it, so `loads` and `retries` hold exactly the mirrors in
    /// state `Loading` and `Failed`. Returns the load the state ended, if it was loading; the
    /// caller adds what the new state keeps beside.
    fn set_mirror(&mut self, user: &str, state: Option<Mirror>) -> Option<Loading> {
        let old = match state {
            Some(state) => match self.mirrors.get_mut(user) {
                Some(slot) => Some(std::mem::replace(slot, state)),
                None => self.mirrors.insert(user, state),
            },
            None => self.mirrors.remove(user),
        };
        match old {
            Some(Mirror::Loading) => self.loads.remove(user),
            Some(Mirror::Failed) => {
                self.retries.remove(user);
                None
            }
            _ => None,
        }
    }

    /// The token of `user`'s load in flight.
    #[cfg(test)]
    pub(crate) fn load_awaited(&self, user: &str) -> Option<u64> {
        self.loads.get(user).map(|l| l.token)
    }

    /// `loads` and `retries` hold exactly the mirrors in state `Loading` and `Failed`.
    #[cfg(test)]
    pub(crate) fn side_state_consistent(&self) -> Result<(), String> {
        let (mut loading, mut failed) = (0, 0);
        for (user, state) in self.mirrors.iter() {
            let beside = (
                self.loads.contains_key(user),
                self.retries.contains_key(user),
            );
            let expected = match state {
                Mirror::Loading => (true, false),
                Mirror::Failed => (false, true),
                _ => (false, false),
            };
            if beside != expected {
                return Err(format!(
                    "mirror of {user} is {state:?}; in loads, retries: {beside:?}"
                ));
            }
            loading += usize::from(beside.0);
            failed += usize::from(beside.1);
        }
        // What is kept beside the map per user (entries left for a read, a read's end) goes
        // with the user's mirror.
        let mut kept = self.left_for_read.keys();
        if let Some(user) = kept.find(|u| !self.mirrors.contains_key(u)) {
            return Err(format!(
                "entries left for a read, or a read's end, kept for {user}, who has no mirror"
            ));
        }
        if (loading, failed) != (self.loads.len(), self.retries.len()) {
            return Err(format!(
                "{} loads and {} retries kept for {loading} loading and {failed} failed mirrors",
                self.loads.len(),
                self.retries.len()
            ));
        }
        // No failed load is left without a retry: the tick looks from `next_load_retry_ms`.
        let first_retry = self.retries.values().min();
        if first_retry.is_some_and(|&first| self.next_load_retry_ms.is_none_or(|n| n > first)) {
            return Err(format!(
                "first retry at {first_retry:?}, the tick looks from {:?}",
                self.next_load_retry_ms
            ));
        }
        Ok(())
    }

    /// Retry the loads that failed.
    fn retry_loads(&mut self, now: u64) {
        if self.next_load_retry_ms.is_none_or(|first| now < first) {
            return;
        }
        let mut due = Vec::new();
        let mut next = None::<u64>;
        for (user, &retry_at) in &self.retries {
            if retry_at <= now {
                due.push(user.clone());
            } else {
                next = Some(next.map_or(retry_at, |n| n.min(retry_at)));
            }
        }
        self.next_load_retry_ms = next;
        for user in in_stable_order(due) {
            self.load(&user);
        }
    }

    /// A load failed (or the store queue refused it): retried by a tick after LOAD_RETRY_MS.
    fn load_failed(&mut self, user: CompactString, now: u64) {
        let retry_at = now + LOAD_RETRY_MS;
        if let Some(loading) = self.set_mirror(&user, Some(Mirror::Failed)) {
            self.keep_for_next_read(&user, loading);
        }
        self.retries.insert(user, retry_at);
        self.next_load_retry_ms = Some(
            self.next_load_retry_ms
                .map_or(retry_at, |n| n.min(retry_at)),
        );
    }

    /// On the recipient's home shard: make the message safe (to the store first, or live from
    /// memory while Redis is away: see the module doc), then tell the sender and feed the
    /// devices. `here`: a device of the recipient is connected to this shard, and the
    /// furthest inbox position any of them was sent or is owed (`Reader::furthest`).
    pub fn deliver(&mut self, mut msg: Box<Message>, now: u64, here: Option<InboxSeq>) {
        self.refused_on_the_way(&mut msg);
        let online_here = here.is_some();
        let tail_len = self.tails.get(&msg.to).map_or(0, |t| t.len());
        let missing = self.missing.contains(&msg.to);
        if missing && tail_len > 0 {
            // Neither live (it would be shown before the missing entry) nor to Redis (it
            // would be placed before the live ones): once the tail is acked, the reload.
            return self.refuse(
                *msg,
                SendRefusal::Busy("the recipient's inbox is being read again, resend later"),
            );
        }
        // Live only when no write for this user is on its way to Redis: a write confirmed
        // later would land behind the live entry, out of order.
        let live = tail_len > 0
            || (!missing
                && !self.up
                && !self.writing.contains_key(&msg.to)
                && !self.has_waiting(&msg.to)
                && (!self.awaits_push(&msg.to) || self.planted_live_past_unpushed())
                && self.ready(&msg.to)
                && online_here);
        if !live {
            return self.append(msg);
        }
        if msg.resent {
            // Another attempt of it may be in Redis (stored by an earlier connection's shard
            // or a node that died): shown live under a new id, its sender would be told an
            // id and a place other than the ones its recipient sees. It waits for Redis, and
            // so do the pair's later messages (`resend_refused`, by way of `refuse`).
            return self.refuse(*msg, SendRefusal::Busy(
                "the offline store is unavailable and this resent message may be in it already; resend later",
            ));
        }
        if msg.from == crate::shard::deliver::BACKEND_SENDER {
            // Each `POST /api/send` is a new arrival of its sender (`Shard::on_api_send`), so
            // the rule of `confirmed` below lets one go live only past a write of the pair
            // stored since, in the same millisecond: in effect never. As a rule, a refusal of
            // one need not be kept, here (`refused_here`) or before it got here
            // (`Shard::refused_before_routing`).
            return self.refuse(*msg, SendRefusal::Busy(
                "the offline store is unavailable and `POST /api/send` messages wait for it; resend later",
            ));
        }
        if self.refused_unstored_of(&msg) {
            return self.refuse(*msg, SendRefusal::Busy(
                "the offline store is unavailable and an earlier message of yours to this recipient was refused and is not stored yet; resend later",
            ));
        }
        if self.cfg.shared && !self.confirmed_since(&msg) && !self.planted_live_unconfirmed() {
            // The sender may have been told `accepted` for an earlier message on another
            // node, whose entry this mirror has not had yet: shown live now, this one would
            // come first (found by the simulation with two nodes, seed 4749320442185338218).
            return self.refuse(*msg, SendRefusal::Busy(
                "the offline store is unavailable and none of your messages to this recipient since you connected has been stored yet; resend later",
            ));
        }
        if tail_len >= self.cfg.window {
            return self.refuse(*msg, SendRefusal::Busy(
                "the offline store is unavailable and the recipient has a window of unacknowledged messages already; resend later",
            ));
        }
        self.metrics.live_sends.inc();
        let to = msg.to.clone();
        let seq = self.live_position(&to, here.unwrap_or(0));
        self.inbox.append_live(&to, seq, msg.stored(), now);
        self.live_high.insert(to.clone(), seq);
        // Shown here: a later message of the pair goes live only above it.
        self.raise_top(&to, &msg.from, msg.id, &msg.cid);
        self.tails.entry(to.clone()).or_default().insert(seq, *msg);
        self.out.push(MirrorEffect::Feed(to));
    }

    /// Where `user`'s next live entry goes: past every position a device of the user here
    /// was given (the mirror's newest entry, an earlier live entry, and `given`, the furthest
    /// the devices were sent or are owed of what left the mirror), in that millisecond's
    /// upper half (`store::live_seq_floor`). Per user, not past everything the shard ever
    /// held: the user's stream in Redis gives its next entries past what it gave before, so
    /// a later message of the same sender, stored once Redis is back, comes after the live
    /// one (unless Redis is still in that millisecond); past another user's newer entries,
    /// whose ids may come from another Redis Cluster server's clock, it would come before
    /// (a review's finding: a device not yet sent the live entry was then sent it second).
    fn live_position(&self, user: &str, given: InboxSeq) -> InboxSeq {
        let newest = self.inbox.newest(user).unwrap_or(0);
        let live = self.live_high.get(user).copied().unwrap_or(0);
        store::live_seq_floor(newest.max(live).max(given) + 1)
    }

    /// A resend `resent` of the pair (`to`, `from`) was refused as possibly stored: the pair
    /// is confirmed again only by an entry above it (see `unsure`).
    fn forget_confirmed(&mut self, to: &CompactString, from: &CompactString, resent: u64) {
        if let Some(by_sender) = self.confirmed.get_mut(to) {
            by_sender.remove(from);
            if by_sender.is_empty() {
                self.confirmed.remove(to);
            }
        }
        #[cfg(test)]
        if self.plant == OrderPlant::ConfirmBelowUnsure {
            return;
        }
        let floor = self.unsure.entry(to.clone()).or_default();
        let at = floor.entry(from.clone()).or_default();
        *at = (*at).max(resent);
    }

    /// Whether a write of `msg`'s pair issued since its sender arrived here was stored, and
    /// `msg` was issued after every entry of the pair this mirror took in (the rule of
    /// `confirmed`).
    fn confirmed_since(&self, msg: &Message) -> bool {
        let top = self
            .confirmed
            .get(&msg.to)
            .and_then(|from| from.get(&msg.from));
        let above_top = top.is_some_and(|&id| id < msg.id);
        #[cfg(test)]
        let above_top = above_top || self.plant == OrderPlant::LiveBelowTop;
        let unsure = (self.unsure.get(&msg.to)).and_then(|from| from.get(&msg.from));
        let past_unsure = unsure.is_none_or(|&resent| top.is_some_and(|&id| id > resent));
        above_top && past_unsure && top.is_some_and(|&id| issued_ms(id) >= msg.sender_arrived_ms)
    }

    /// An entry `id` of the pair (`to`, `from`) is stored (this shard's write) or entered the
    /// mirror (see `confirmed`). (Only for recipients with a mirror here.)
    fn raise_top(&mut self, to: &CompactString, from: &CompactString, id: u64, cid: &str) {
        self.stored_after_refusal(to, from, cid);
        let by_sender = self.confirmed.entry(to.clone()).or_default();
        match by_sender.get_mut(from) {
            Some(top) => *top = (*top).max(id),
            None => {
                by_sender.insert(from.clone(), id);
            }
        }
    }

    /// A device acked entry `seq` of `user`, the first here to do so. A live entry is now
    /// safe: its sender gets `accepted` here, then `delivered`. A durable one leaves Redis;
    /// `delivered` goes out when Redis confirms this delete removed it.
    pub fn acked(&mut self, user: &str, seq: InboxSeq, delivered: Report) {
        if let Some(loading) = self.loads.get_mut(user) {
            loading.acked.push(seq);
        }
        let live = self.tails.get_mut(user).and_then(|tail| tail.remove(&seq));
        let Some(msg) = live else {
            // An entry was acked: remove it from Redis too (and then report `delivered`).
            return self.submit(StoreOp::Remove {
                user: user.into(),
                seq,
                report: Some(Box::new(delivered)),
            });
        };
        if self.tails.get(user).is_some_and(|t| t.is_empty()) {
            self.tails.remove(user);
        }
        self.metrics.live_acked.inc();
        let id = msg.id;
        self.tell(msg.report(id, Outcome::Stored));
        self.tell(delivered);
    }

    /// Write a message to the store (queued for the shard's next batch).
    fn append(&mut self, mut msg: Box<Message>) {
        // No key is built in the common case: nothing in doubt on this shard.
        if !self.doubts.is_empty()
            && self
                .doubts
                .get(&(msg.to.clone(), msg.from.clone()))
                .map_or(0, Vec::len)
                >= MAX_DOUBTS_PER_PAIR
        {
            return self.refuse(
                *msg,
                SendRefusal::Busy(
                    "earlier writes to this recipient are still in doubt; resend later",
                ),
            );
        }
        msg.write = StoreWrite {
            attempt: self.next_attempt,
            // A load was asked for the recipient (as Redis's directory says it is online;
            // Redis reads that, so the lookup is only made for the embedded store).
            to_mirror: !self.cfg.shared
                && matches!(
                    self.mirrors.get(&msg.to),
                    Some(Mirror::Loading | Mirror::Ready { .. })
                ),
        };
        self.next_attempt += 1;
        *self.writing.entry(msg.to.clone()).or_default() += 1;
        self.unanswered
            .insert(msg.id, (msg.to.clone(), msg.from.clone(), msg.cid.clone()));
        self.submit(StoreOp::Append(msg));
    }

    /// A batch was answered: whether the store is up.
    pub fn batch_answered(&mut self, up: bool) {
        if up && !self.up {
            self.remove_failures = 0; // the failures were the outage's
            self.retried_remove_failed = false;
        }
        self.up = up;
    }

    /// A remove was answered: `delivered` goes out if it removed the entry. One Redis did not
    /// run is sent again (see `unremoved`).
    pub fn removed(
        &mut self,
        user: CompactString,
        seq: InboxSeq,
        ran: bool,
        ok: bool,
        report: Option<Box<Report>>,
    ) {
        if !ran {
            return self.remove_again(user, seq, report);
        }
        if let Entry::Occupied(mut seqs) = self.unremoved.entry(user) {
            if seqs.get_mut().remove(&seq).is_some() {
                self.unremoved_count -= 1;
                self.remove_failures = 0;
                // A read out now may have run before this delete: it must not take the entry
                // in once it answers (one-node seed 8995636101367943396: a read answered after
                // the delete brought it to devices connected since, after later entries).
                let loading = self.loads.get_mut(seqs.key());
                #[cfg(test)]
                let loading = loading.filter(|_| self.plant != OrderPlant::ReadPastRemoved);
                if let Some(loading) = loading {
                    loading.acked.push(seq);
                }
            }
            if seqs.get().is_empty() {
                seqs.remove();
            }
        }
        if let (true, Some(report)) = (ok, report) {
            self.out.push(MirrorEffect::TellBoxed(report));
        }
    }

    /// An append was answered.
    pub fn appended(
        &mut self,
        msg: Message,
        result: Result<Appended, StoreError>,
        now: u64,
        wall: u64,
    ) {
        match result {
            Err(StoreError::Unavailable(why)) if msg.write.attempt > 0 => {
                self.keep_in_doubt(msg, why)
            }
            result => {
                let (attempt, report) = self.settle_write(msg, result, now, wall);
                self.tell_in_order(attempt, report);
            }
        }
    }

    /// A write's answer was lost: its sender is told nothing until it is resolved (see the
    /// module doc). It stays unanswered and on its way (`writing`), so an entry of it waits
    /// in `waiting` and no live delivery to its recipient passes it; the pair's later answers
    /// wait for its resolution (`answers_in_order`).
    fn keep_in_doubt(&mut self, msg: Message, why: String) {
        self.metrics.store_writes_in_doubt.inc();
        let pair: Pair = (msg.to.clone(), msg.from.clone());
        if self.planted_tell_doubt_at_once() {
            let refused = SendRefusal::Store(StoreError::Unavailable(why.clone()));
            self.tell(msg.clone().refused(refused));
        } else {
            let order = self.answers_in_order.entry(pair.clone()).or_default();
            order.insert(msg.write.attempt, None);
        }
        let doubt = Doubt {
            msg: Box::new(msg),
            why,
        };
        self.doubts.entry(pair).or_default().push(doubt);
    }

    /// A write's answer is known (from the store, or by resolving it): its entry may show;
    /// returns its attempt and what its sender is to be told.
    fn settle_write(
        &mut self,
        msg: Message,
        result: Result<Appended, StoreError>,
        now: u64,
        wall: u64,
    ) -> (u64, Report) {
        if let Entry::Occupied(mut writes) = self.writing.entry(msg.to.clone()) {
            *writes.get_mut() -= 1;
            if *writes.get() == 0 {
                writes.remove();
            }
        }
        // An entry of this write that came before its answer: shown (in its turn) if it
        // is stored, never if not (then it cannot exist: the answer or the resolve ran
        // in the same call as the write, or after its attempt was fenced).
        if let Entry::Occupied(entry) = self.unanswered.entry(msg.id) {
            if is_write_of(entry.get(), &msg.to, &msg.from, &msg.cid) {
                entry.remove();
            }
        }
        // Whether the entry came (on the channel, or in a read) before this answer: it waits
        // for it then.
        let mut came = false;
        if let Some(queue) = self.waiting.get_mut(&msg.to) {
            came = queue.values().any(|(_, awaited)| *awaited == Some(msg.id));
            match result {
                Ok(_) => queue
                    .values_mut()
                    .filter(|(_, awaited)| *awaited == Some(msg.id))
                    .for_each(|(_, awaited)| *awaited = None),
                Err(_) => queue.retain(|_, (_, awaited)| *awaited != Some(msg.id)),
            }
            self.release_waiting(msg.to.clone(), now, wall);
        }
        let attempt = msg.write.attempt;
        let report = match result {
            Ok(Appended::Stored {
                pushed,
                offline,
                seq,
            }) => {
                self.metrics.stored.inc();
                if self.cfg.shared && self.mirrors.contains_key(&msg.to) {
                    if !came {
                        self.unpushed.insert(msg.id, msg.to.clone());
                    }
                    self.raise_top(&msg.to, &msg.from, msg.id, &msg.cid);
                }
                // Nobody holds a device anywhere; the store told this shard alone. A shared
                // store is asked whether the entry is still there before the push goes out;
                // an embedded one's push is cancelled by the ack instead.
                let shared = self.cfg.shared;
                if offline && self.cfg.push {
                    if let Some(item) = PushItem::for_message(&msg, shared.then_some(seq)) {
                        self.out.push(MirrorEffect::Push(Box::new(item)));
                    }
                }
                self.metrics.cross_node_out.add(pushed);
                if shared {
                    self.metrics
                        .redis_spilled_bytes
                        .add((msg.body.len() + msg.cid.len()) as u64);
                }
                // The mirror gets the entry from this node's channel (see the module doc).
                let id = msg.id;
                msg.report(id, Outcome::Stored)
            }
            Ok(Appended::Duplicate { id }) => {
                // Stored by an earlier run (or an earlier copy): same id, no second delivery.
                self.metrics.dedup_hits.inc();
                self.stored_after_refusal(&msg.to, &msg.from, &msg.cid);
                msg.report(id, Outcome::Stored)
            }
            Err(e) => {
                self.metrics.store_refused.inc();
                self.refused_here(&msg);
                msg.refused(SendRefusal::Store(e))
            }
        };
        (attempt, report)
    }

    /// Tell a write's answer: an `accepted` after the answers of the pair's earlier writes
    /// in doubt; a refusal at once (nothing was taken, so it has no place in the order).
    fn tell_in_order(&mut self, attempt: u64, report: Report) {
        // The common case: no write in doubt anywhere here, no key built.
        if self.answers_in_order.is_empty() {
            return self.tell(report);
        }
        let pair: Pair = (report.to.clone(), report.from.clone());
        let Some(order) = self.answers_in_order.get_mut(&pair) else {
            return self.tell(report);
        };
        let mut ready = Vec::new();
        if matches!(report.outcome, Outcome::Stored) {
            order.insert(attempt, Some(report));
        } else {
            order.remove(&attempt);
            ready.push(report);
        }
        while let Some(first) = order.first_entry() {
            if first.get().is_none() {
                break; // still in doubt
            }
            ready.extend(first.remove());
        }
        if order.is_empty() {
            self.answers_in_order.remove(&pair);
        }
        for report in ready {
            self.tell(report);
        }
    }

    /// A resolve was answered: each write it named had landed (kept, answered `accepted`),
    /// or never will but its cid is stored by another attempt (answered `accepted` with that
    /// id: an earlier run's or a dead node's entry, which lies before anything this run
    /// stored after it), or never will (answered `unavailable`). Failed: the tick asks again.
    pub fn resolved(
        &mut self,
        pair: Pair,
        writes: Vec<(Box<str>, u64)>,
        landed: Option<Vec<Fate>>,
        now: u64,
        wall: u64,
    ) {
        self.resolving.remove(&pair);
        let Some(landed) = landed else {
            return;
        };
        let Some(doubts) = self.doubts.get_mut(&pair) else {
            return;
        };
        let mut settled = Vec::with_capacity(writes.len());
        for (write, landed) in writes.iter().zip(landed) {
            if let Some(at) = doubts.iter().position(|d| d.is(write)) {
                settled.push((doubts.remove(at), landed));
            }
        }
        if doubts.is_empty() {
            self.doubts.remove(&pair);
        }
        self.metrics.store_writes_in_doubt.sub(settled.len() as u64);
        self.metrics.store_resolved.add(settled.len() as u64);
        let told_at_once = self.planted_tell_doubt_at_once();
        for (Doubt { msg, why }, fate) in settled {
            let result = match fate {
                Fate::Landed => Ok(Appended::Stored {
                    pushed: 0,
                    offline: false,
                    seq: 0,
                }),
                Fate::Duplicate(id) => Ok(Appended::Duplicate { id }),
                Fate::Never => Err(StoreError::Unavailable(why)),
            };
            let (attempt, report) = self.settle_write(*msg, result, now, wall);
            // (Planted) its sender was told `unavailable` already.
            if !told_at_once {
                self.tell_in_order(attempt, report);
            }
        }
    }

    /// Another node appended an entry to the inbox of a user homed here: put it in the
    /// mirror like a confirmed local append. A mirror still loading may or may not see it in
    /// its read: it is read again once loaded.
    pub fn pushed(
        &mut self,
        user: CompactString,
        seq: InboxSeq,
        msg: StoredMessage,
        now: u64,
        wall: u64,
    ) {
        if !self.unpushed.is_empty() {
            self.unpushed.remove(&msg.id);
        }
        let current = self.epoch;
        match self.mirrors.get(&user) {
            // (No mirror is read before the first epoch: see `load`.)
            Some(Mirror::Ready { epoch }) if *epoch == current => {}
            Some(Mirror::Loading) if self.loads[&user].epoch == current => {}
            // A failed load that reads everything when retried, or a mirror of an earlier
            // epoch (being reloaded since the resync): that read brings it, unless a device
            // on another node acks it first.
            Some(_) => return self.leave_for_read(user, seq, msg),
            None => return, // not online here
        }
        // Judged now, also while the mirror loads: by the time the load answers, the write
        // of this entry may have been answered.
        match self.admit_entry(&user, &msg) {
            Admit::Now => self.add_to_mirror(user, seq, msg, now, wall, false),
            Admit::Wait(awaited) => self.wait(user, seq, msg, awaited),
        }
    }

    /// Whether an entry pushed or read for `user`'s mirror may go in now: not one of this
    /// shard's writes still unanswered or in doubt (it waits for the answer or the resolve),
    /// nor one behind an entry that waits.
    fn admit_entry(&self, user: &CompactString, msg: &StoredMessage) -> Admit {
        // The common case (always, with the embedded store, once its answer came): nothing
        // unanswered (or in doubt) or waiting; no keys are built.
        if self.unanswered.is_empty() && !self.has_waiting(user) {
            return Admit::Now;
        }
        if self
            .unanswered
            .get(&msg.id)
            .is_some_and(|w| is_write_of(w, user, &msg.from, &msg.cid))
        {
            return Admit::Wait(Some(msg.id));
        }
        if self.has_waiting(user) {
            return Admit::Wait(None);
        }
        Admit::Now
    }

    /// The simulation's planted `TellDoubtAtOnce` (always false outside tests).
    fn planted_tell_doubt_at_once(&self) -> bool {
        #[cfg(test)]
        return self.plant == OrderPlant::TellDoubtAtOnce;
        #[cfg(not(test))]
        false
    }

    /// The simulation's planted `LivePastUnpushed` (always false outside tests).
    fn planted_live_past_unpushed(&self) -> bool {
        #[cfg(test)]
        return self.plant == OrderPlant::LivePastUnpushed;
        #[cfg(not(test))]
        false
    }

    /// The simulation's planted `LiveUnconfirmed` (always false outside tests).
    fn planted_live_unconfirmed(&self) -> bool {
        #[cfg(test)]
        return self.plant == OrderPlant::LiveUnconfirmed;
        #[cfg(not(test))]
        false
    }

    /// The simulation's planted `LivePastUnsure` (always false outside tests).
    fn planted_live_past_unsure(&self) -> bool {
        #[cfg(test)]
        return self.plant == OrderPlant::LivePastUnsure;
        #[cfg(not(test))]
        false
    }

    #[cfg(test)]
    pub(crate) fn plant_order_bug(&mut self, plant: OrderPlant) {
        self.plant = plant;
    }

    /// Whether the simulation planted this bug.
    #[cfg(test)]
    pub(crate) fn planted(&self, plant: OrderPlant) -> bool {
        self.plant == plant
    }

    fn wait(
        &mut self,
        user: CompactString,
        seq: InboxSeq,
        msg: StoredMessage,
        awaited: Option<u64>,
    ) {
        self.waiting
            .entry(user)
            .or_default()
            .insert(seq, (msg, awaited));
    }

    /// Let into the mirror, in order, the waiting entries of `user` that wait for nothing
    /// before them.
    fn release_waiting(&mut self, user: CompactString, now: u64, wall: u64) {
        loop {
            let Some(queue) = self.waiting.get_mut(&user) else {
                return;
            };
            let Some(entry) = queue.first_entry() else {
                self.waiting.remove(&user);
                return;
            };
            if entry.get().1.is_some() {
                return; // the first still waits for its answer
            }
            let (seq, (msg, _)) = entry.remove_entry();
            self.add_to_mirror(user.clone(), seq, msg, now, wall, true);
        }
    }

    /// Put a pushed (or held) entry into a ready mirror of the current epoch and send it; a
    /// mirror of the current epoch still loading keeps it for when the read answers.
    /// `held`: kept back until its write was answered, so never in the mirror yet.
    fn add_to_mirror(
        &mut self,
        user: CompactString,
        seq: InboxSeq,
        msg: StoredMessage,
        now: u64,
        wall: u64,
        held: bool,
    ) {
        let window = self.cfg.window;
        match self.mirrors.get(&user).copied() {
            Some(Mirror::Ready { epoch }) if epoch == self.epoch => {}
            // Waits for the read (which may hold it already, see `loaded`).
            Some(Mirror::Loading) if self.loads[&user].epoch == self.epoch => {
                if self.missing.contains(&user) {
                    // Missing since the read went out: read again.
                    self.leave_for_read(user, seq, msg);
                    return;
                }
                let loading = self.loads.get_mut(&user).expect("state Loading");
                if loading.pushes.len() < window {
                    loading.pushes.push((seq, msg));
                } else {
                    // A long load under a stream of pushes: read again instead of holding more.
                    // The entry is missing until then: a later push shown before that read
                    // would pass it (found by the simulation once pushes and answers came on
                    // two queues, seed 18389455496100039632).
                    self.reload_wanted.insert(user.clone());
                    self.missing.insert(user.clone());
                    self.leave_for_read(user, seq, msg);
                }
                return;
            }
            // A failed load, or a mirror of an earlier epoch: its next read brings it (or
            // owes it, if gone by then).
            Some(_) => return self.leave_for_read(user, seq, msg),
            None => return,
        }
        // An entry found missing waits for the reload that reads it; one after it, added
        // now, would be shown before it (found by the simulation's writer on another node,
        // seed 7924047624999685062: a pushed entry below live ones waited for the reload,
        // and its sender's next one, above them, was shown first).
        #[cfg(test)]
        let planted = self.plant == OrderPlant::ShowPastMissing;
        #[cfg(not(test))]
        let planted = false;
        if self.missing.contains(&user) && !planted {
            if !self.inbox.holds(&user, seq) {
                self.leave_for_read(user, seq, msg);
            }
            return;
        }
        let age = wall.saturating_sub(store::seq_time_ms(seq));
        // Not added: the mirror holds it already (a load read it before the push came) or
        // was given it and it was acked; or a live entry sits above it (Redis was away here),
        // in the mirror or acked already: only then can it be missing, and a reload finds it.
        let below_live = self.live_high.get(&user).is_some_and(|&high| seq <= high);
        if below_live || self.inbox.newest(&user).is_some_and(|newest| newest >= seq) {
            // A held entry below a later one (another sender's) is missing too.
            // (Not left for the read: the devices may have been sent entries after it, so
            // owed later it would overtake them.)
            let unknown = below_live && !self.inbox.holds(&user, seq);
            if held || unknown || self.tails.contains_key(&user) {
                self.reload_wanted.insert(user.clone());
                self.missing.insert(user.clone());
            }
            if unknown {
                // Left for the read all the same: if a device on another node acks it out of
                // Redis first, the read owes it to every device here, those past it too
                // (none was sent it; a review's finding).
                self.leave_for_read(user, seq, msg);
            }
            return;
        }
        if self.cfg.shared {
            self.raise_top(&user, &msg.from, msg.id, &msg.cid);
        }
        let added = self
            .inbox
            .insert_at(&user, seq, msg, now.saturating_sub(age));
        debug_assert!(added, "past the newest entry");
        self.out.push(MirrorEffect::Feed(user));
    }

    /// A device here acked entry `seq` of `user`: it leaves the mirror (and what was left for
    /// the next read). True if the mirror held it: this is the first ack here.
    pub fn remove_acked(&mut self, user: &str, seq: InboxSeq) -> bool {
        if let Some(left) = self.left_for_read.get_mut(user) {
            left.remove(&seq);
        }
        crate::store::Inbox::remove(&mut self.inbox, user, seq)
    }

    /// A load that failed or that another replaces (a resync while it was out): what it
    /// knew of, the next read brings, or owes if a device on another node acked it meanwhile
    /// (`left_for_read`). That is what it was pushed (found by a review) and, when its read
    /// came but its mark did not (lost with the channel), the entries of that read but those
    /// acked here: dropped, an entry acked elsewhere before the next read reached no device
    /// here (three-node seed 8778964247935763839 with slow second devices and resyncs).
    fn keep_for_next_read(&mut self, user: &str, loading: Loading) {
        let Loading {
            pushes,
            acked,
            read,
            ..
        } = loading;
        for (seq, msg) in pushes {
            self.leave_for_read(user.into(), seq, msg);
        }
        #[cfg(test)]
        let read = read.filter(|_| !self.planted(OrderPlant::ForgetUnmarkedRead));
        let Some((read, _)) = read else { return };
        let unremoved = self.unremoved.get(user);
        let acked_here =
            |seq: &InboxSeq| acked.contains(seq) || unremoved.is_some_and(|u| u.contains_key(seq));
        let known: Vec<_> = (read.entries.into_iter())
            .filter(|(seq, _)| !acked_here(seq))
            .collect();
        for (seq, msg) in known {
            self.leave_for_read(user.into(), seq, msg);
        }
    }

    /// Keep a pushed entry the mirror cannot take in now for its next read (see
    /// `left_for_read`).
    fn leave_for_read(&mut self, user: CompactString, seq: InboxSeq, msg: StoredMessage) {
        let limit = self.cfg.load_limit;
        let during = self.loads.get(&user).map(|l| l.token);
        let left = self.left_for_read.entry(user).or_default();
        if left.len() < limit {
            left.insert(seq, (msg, during));
        }
    }

    /// Pushes may have been missed: a new epoch, and every online user's inbox is read again
    /// now (each load also registers the user in the directory again). A user with live
    /// entries out is read once they are acked or spilled (a reload would not keep them).
    pub fn resynced(&mut self) {
        self.epoch = (self.epoch.checked_add(1)).expect("fewer than 2^32 resyncs in one run");
        if self.cfg.shared {
            self.metrics.cluster_epoch.set(self.epoch.into());
        }
        let (now_users, later): (Vec<CompactString>, Vec<CompactString>) = self
            .mirrors
            .keys()
            .cloned()
            .partition(|u| !self.tails.contains_key(u));
        self.reload_wanted.extend(later);
        for user in in_stable_order(now_users) {
            self.load(&user);
        }
    }

    /// A load answered.
    pub fn loaded(
        &mut self,
        user: CompactString,
        token: u64,
        result: Result<Loaded, StoreError>,
        now: u64,
        wall: u64,
    ) {
        // Only the newest load of a user still online counts.
        let Some(loading) = self.loads.get_mut(&user).filter(|l| l.token == token) else {
            return;
        };
        let read = match result {
            Ok(read) => read,
            Err(e) => {
                tracing::debug!(%user, error = %e, "inbox load failed; retrying");
                self.load_failed(user, now);
                return;
            }
        };
        #[cfg(test)]
        let marked = loading.marked || self.plant == OrderPlant::ReadBeforeMark;
        #[cfg(not(test))]
        let marked = loading.marked;
        if self.cfg.shared && !marked {
            let deadline = now + MARK_WAIT_MS;
            loading.read = Some((read, deadline));
            self.next_mark_deadline = Some(
                self.next_mark_deadline
                    .map_or(deadline, |d| d.min(deadline)),
            );
            return;
        }
        self.take_read(user, read, now, wall);
    }

    /// Shared store: load `token` of `user`'s mark came on this node's channel. Pushes and
    /// reads come on two connections: a push of an entry appended before the read could come
    /// after the read's answer, and if a device on another node acked the entry before the
    /// read, the read lacks it and later entries were sent meanwhile: the devices here never
    /// got it (found by a review, 2026-12-06). The mark is published right after the read,
    /// from the server that publishes the inbox's pushes: once it came, every such push came
    /// (into `Loading::pushes`), and what the read lacks of them is owed in its place.
    /// (A mark lost with the channel comes with a resync, which loads again.)
    pub fn read_marked(&mut self, user: CompactString, token: u64, now: u64, wall: u64) {
        let Some(loading) = self.loads.get_mut(&user).filter(|l| l.token == token) else {
            return;
        };
        match loading.read.take() {
            Some((read, _)) => self.take_read(user, read, now, wall),
            None => loading.marked = true,
        }
    }

    /// Reads whose mark has not come by their deadline are taken in (see `MARK_WAIT_MS`).
    fn take_unmarked_reads(&mut self, now: u64, wall: u64) {
        if self.next_mark_deadline.is_none_or(|first| now < first) {
            return;
        }
        let mut due = Vec::new();
        let mut next = None::<u64>;
        for (user, loading) in &self.loads {
            if let Some((_, deadline)) = &loading.read {
                if *deadline <= now {
                    due.push(user.clone());
                } else {
                    next = Some(next.map_or(*deadline, |n| n.min(*deadline)));
                }
            }
        }
        self.next_mark_deadline = next;
        for user in in_stable_order(due) {
            let stashed = self.loads.get_mut(&user).and_then(|l| l.read.take());
            if let Some((read, _)) = stashed {
                tracing::warn!(%user, "an inbox read's mark did not come on this node's channel in time; taken in without it");
                self.take_read(user, read, now, wall);
            }
        }
    }

    /// A load's read, taken in (its mark came, or the store is not shared).
    fn take_read(&mut self, user: CompactString, read: Loaded, now: u64, wall: u64) {
        let token = self.loads[&user].token;
        let Loaded {
            entries,
            expired,
            received,
        } = read;
        if !received.is_empty() {
            self.out.push(MirrorEffect::Received {
                user: user.clone(),
                received,
            });
        }
        let epoch = self.loads[&user].epoch;
        let Some(Loading { pushes, acked, .. }) =
            self.set_mirror(&user, Some(Mirror::Ready { epoch }))
        else {
            unreachable!("checked to be loading above");
        };
        if self.cfg.shared {
            self.metrics.redis_loads.inc();
        }
        self.metrics.inbox_expired.add(expired);
        // What waited before this read: the read holds what came before its end, and
        // judges it again; what came after waits on as it was.
        let read_end = entries.last().map(|(seq, _)| *seq);
        let read: Vec<InboxSeq> = entries.iter().map(|(seq, _)| *seq).collect();
        let read_all = entries.len() < self.cfg.load_limit;
        let before = self.waiting.remove(&user).unwrap_or_default();
        let unremoved: Vec<InboxSeq> = self
            .unremoved
            .get(&user)
            .map_or(Vec::new(), |u| u.keys().copied().collect());
        let live_high = self.live_high.get(&user).copied();
        let below_live = |seq: InboxSeq| live_high.is_some_and(|high| seq <= high);
        // Entries shown now at or below a live position: a device may have passed them.
        let mut passed = Vec::new();
        let mut shown = Vec::with_capacity(entries.len());
        for (seq, m) in entries {
            if self.cfg.shared {
                self.raise_top(&user, &m.from, m.id, &m.cid);
            }
            if acked.contains(&seq) || unremoved.contains(&seq) {
                continue;
            }
            match self.admit_entry(&user, &m) {
                Admit::Now => {
                    if below_live(seq) {
                        passed.push((seq, m.clone()));
                    }
                    let age = wall.saturating_sub(store::seq_time_ms(seq));
                    shown.push((seq, now.saturating_sub(age), m));
                }
                Admit::Wait(awaited) => self.wait(user.clone(), seq, m, awaited),
            }
        }
        let held = self.inbox.replace_user(&user, shown, now);
        // What the mirror held was sent by the inbox's order: no device passed it unsent.
        let held_seqs: Vec<InboxSeq> = match live_high {
            Some(_) => held.iter().map(|(seq, _)| *seq).collect(),
            None => Vec::new(),
        };
        let never_held = |seq: &InboxSeq| held_seqs.binary_search(seq).is_err();
        passed.retain(|(seq, _)| never_held(seq));
        // What this node knew of and the read no longer has: a device on another node acked it
        // (`XDEL`) meanwhile. Each device here that was not sent it is owed it (each connected
        // device gets every message): the entries the mirror held, those it left for this
        // read, and those pushed or waiting before the read's end.
        // (What came during this load may be newer than its read: only what lies before the
        // read's end is judged, the rest waits for the next read.)
        let before_read = |seq: &InboxSeq| read_end.is_some_and(|end| *seq <= end);
        let mut known: BTreeMap<InboxSeq, StoredMessage> = held.into_iter().collect();
        let mut left = self.left_for_read.remove(&user).unwrap_or_default();
        left.retain(|seq, (m, during)| {
            let newer = *during == Some(token) && !before_read(seq);
            if !newer {
                known.insert(*seq, m.clone());
            }
            *during = None;
            newer
        });
        if !left.is_empty() {
            self.left_for_read.insert(user.clone(), left);
        }
        for (seq, (m, _)) in before.iter().filter(|(seq, _)| before_read(seq)) {
            known.entry(*seq).or_insert_with(|| m.clone());
        }
        for (seq, m) in pushes.iter().filter(|(seq, _)| before_read(seq)) {
            known.entry(*seq).or_insert_with(|| m.clone());
        }
        // Past the read's end, what waited waits on and what was pushed goes in (below).
        let kept_on =
            |seq: &InboxSeq| before.contains_key(seq) || pushes.iter().any(|(s, _)| s == seq);
        let gone: Vec<(InboxSeq, StoredMessage)> = known
            .into_iter()
            .filter(|(seq, _)| read_all || before_read(seq))
            .filter(|(seq, _)| read.binary_search(seq).is_err() && !acked.contains(seq))
            .filter(|(seq, _)| before_read(seq) || !kept_on(seq))
            .collect();
        // Owed before anything below goes in and is fed to the devices: owed after, an entry
        // below one a device was sent counts as passed (two-node seed 17268758816398543147).
        let owe_at = self.out.len();
        for (seq, (m, awaited)) in before {
            if read_end.is_none_or(|end| seq > end) {
                self.wait(user.clone(), seq, m, awaited);
            }
        }
        // Pushed while loading (judged when they came): those past the read are new
        // (the rest it read); behind a waiting entry they wait too.
        for (seq, msg) in pushes {
            if read_end.is_some_and(|end| seq <= end) {
                continue;
            }
            if self.has_waiting(&user) {
                self.wait(user.clone(), seq, msg, None);
            } else {
                self.raise_top(&user, &msg.from, msg.id, &msg.cid);
                if below_live(seq) {
                    passed.push((seq, msg.clone()));
                }
                let age = wall.saturating_sub(store::seq_time_ms(seq));
                self.inbox
                    .insert_at(&user, seq, msg, now.saturating_sub(age));
            }
        }
        // Gone and never held here, at or below a live position: a device that passed it
        // is owed it too (one that did not is owed it as gone).
        let gone_passed: Vec<InboxSeq> = gone
            .iter()
            .map(|(seq, _)| *seq)
            .filter(|seq| below_live(*seq) && never_held(seq))
            .collect();
        self.release_waiting(user.clone(), now, wall);
        self.owe_gone(user.clone(), gone, gone_passed, passed, owe_at);
        self.out.push(MirrorEffect::Feed(user.clone()));
        self.out.push(MirrorEffect::Loaded(user));
    }

    /// Owe `user`'s devices here what a read lost (`gone`, in seq order), but only what lies
    /// below the first entry of the user still on its way into the mirror: owed now, one above
    /// it would overtake it on a device (found by a review's per-device order check, two-node
    /// seeds 10743492468318333425, 3143267144307512625, 2061169335744875953 and
    /// 11461949646555690551). Above an entry that waits for its write's answer it waits
    /// behind it (let in later, it is sent like any entry; its ack removes nothing in Redis,
    /// so tells nothing); above one left for the next read, that read judges it too. The
    /// effect goes at `owe_at`, before what the load let in meanwhile is fed; with it go the
    /// entries a device may have passed unsent (`passed`, and those of `gone` owed now that
    /// are in `gone_passed`: see `live_high`).
    fn owe_gone(
        &mut self,
        user: CompactString,
        mut gone: Vec<(InboxSeq, StoredMessage)>,
        gone_passed: Vec<InboxSeq>,
        mut passed: Vec<(InboxSeq, StoredMessage)>,
        owe_at: usize,
    ) {
        let first_waiting = self
            .waiting
            .get(&user)
            .and_then(|w| w.keys().next())
            .copied();
        let first_left = self
            .left_for_read
            .get(&user)
            .and_then(|l| l.keys().next().copied());
        #[cfg(test)]
        let first_waiting = first_waiting.filter(|_| !self.planted(OrderPlant::OweAheadOfWaiting));
        #[cfg(test)]
        let first_left = first_left.filter(|_| !self.planted(OrderPlant::OweAheadOfLeft));
        let owe_below = first_waiting.into_iter().chain(first_left).min();
        let later = owe_below.map_or(Vec::new(), |below| {
            gone.split_off(gone.partition_point(|(seq, _)| *seq < below))
        });
        for (seq, m) in later {
            if first_left.is_some_and(|left| seq >= left) {
                // Missing until that read: a push after it, let in now, would pass it.
                self.reload_wanted.insert(user.clone());
                self.missing.insert(user.clone());
                self.leave_for_read(user.clone(), seq, m);
            } else {
                self.wait(user.clone(), seq, m, None);
            }
        }
        #[cfg(test)]
        let gone = if self.planted(OrderPlant::OweNoneGone) {
            Vec::new()
        } else {
            gone
        };
        if self.cfg.shared {
            for (_, m) in &gone {
                self.raise_top(&user, &m.from, m.id, &m.cid);
            }
        }
        let gone_passed = gone
            .iter()
            .filter(|(seq, _)| gone_passed.binary_search(seq).is_ok());
        passed.extend(gone_passed.cloned());
        passed.sort_unstable_by_key(|(seq, _)| *seq);
        #[cfg(test)]
        if self.planted(OrderPlant::OweNonePassed) {
            passed.clear();
        }
        if !gone.is_empty() || !passed.is_empty() {
            let owed = MirrorEffect::Owed {
                user,
                entries: gone,
                passed,
            };
            self.out.insert(owe_at, owed);
        }
    }
}

/// Work picked from a hash map goes out sorted: the store sees the same order from the same
/// state, so a simulation seed replays exactly (hash maps iterate in a per-process order).
fn in_stable_order<T: Ord>(mut due: Vec<T>) -> Vec<T> {
    due.sort_unstable();
    due
}

#[cfg(test)]
mod size_tests {
    /// One mirror per online user sits in a map as large as the shard's users: a mirror that
    /// is not loading stays two words (docs/performance.md, "Idle memory").
    #[test]
    fn a_ready_mirror_stays_two_words() {
        assert!(std::mem::size_of::<super::Mirror>() <= 16);
    }
}

/// The machine alone: no shard, no socket, no clock (the time is an argument). Each test
/// feeds inputs and reads the effects, as the shard's glue would perform them.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::message::ReplyTo;
    use crate::proto;
    use crate::store::{Inbox, InboxLimits};

    const NOW: u64 = 1_000;
    const WALL: u64 = 1_700_000_000_000;

    fn machine() -> InboxMirror {
        let cfg = MirrorConfig {
            window: 4,
            load_limit: 100,
            shared: true,
            push: false,
        };
        let limits = InboxLimits {
            max_messages: 100,
            max_age_ms: 3_600_000,
        };
        InboxMirror::new(
            cfg,
            MemoryInbox::new(limits),
            Arc::new(ShardMetrics::default()),
        )
    }

    fn message(id: u64, cid: &str) -> Box<Message> {
        Box::new(Message {
            id,
            from: "ann".into(),
            to: "bob".into(),
            cid: cid.into(),
            ts: WALL,
            body: "{}".into(),
            msg_type: None,
            reply: ReplyTo::all_devices(0),
            received_us: 0,
            write: Default::default(),
            resent: false,
            sender_arrived_ms: 0,
            refused_earlier: None,
        })
    }

    /// What the effects tell senders, as `cid:accepted`, `cid:delivered` or `cid:refused`.
    fn told(effects: &[MirrorEffect]) -> Vec<String> {
        effects
            .iter()
            .filter_map(|e| match e {
                MirrorEffect::Tell(r) => Some(r),
                MirrorEffect::TellBoxed(r) => Some(&**r),
                _ => None,
            })
            .map(|r| match r.outcome {
                Outcome::Stored => format!("{}:accepted", r.cid),
                Outcome::Delivered => format!("{}:delivered", r.cid),
                Outcome::Refused(_) => format!("{}:refused", r.cid),
            })
            .collect()
    }

    /// The appends among the effects (the messages as the store would get them).
    fn appends(effects: Vec<MirrorEffect>) -> Vec<Message> {
        effects
            .into_iter()
            .filter_map(|e| match e {
                MirrorEffect::Store(StoreOp::Append(msg)) => Some(*msg),
                _ => None,
            })
            .collect()
    }

    fn stored() -> Result<Appended, StoreError> {
        Ok(Appended::Stored {
            pushed: 0,
            offline: true,
            seq: 1,
        })
    }

    /// Two writes of the pair ann -> bob; the first one's answer is lost (in doubt). The
    /// second, not answered yet, is returned.
    fn first_of_two_in_doubt(m: &mut InboxMirror) -> Message {
        m.deliver(message(1, "c1"), NOW, None);
        m.deliver(message(2, "c2"), NOW, None);
        let [first, second]: [Message; 2] = appends(m.take_effects()).try_into().ok().unwrap();
        assert!(first.write.attempt < second.write.attempt);
        let lost = Err(StoreError::Unavailable("timeout".into()));
        m.appended(first, lost, NOW, WALL);
        second
    }

    /// The tick asks Redis what became of the write in doubt; Redis answers `fate`.
    fn resolve_as(m: &mut InboxMirror, fate: Fate) {
        m.tick(NOW + 1, WALL);
        let writes = match &m.take_effects()[..] {
            [MirrorEffect::Store(StoreOp::Resolve { writes, .. })] => writes.clone(),
            _ => panic!("one resolve expected"),
        };
        let pair = ("bob".into(), "ann".into());
        m.resolved(pair, writes, Some(vec![fate]), NOW + 2, WALL);
    }

    #[test]
    fn a_later_write_of_the_pair_is_told_after_the_one_in_doubt_is_resolved() {
        let mut m = machine();
        let second = first_of_two_in_doubt(&mut m);
        m.appended(second, stored(), NOW, WALL);
        assert!(told(&m.take_effects()).is_empty(), "c2 waits for c1's fate");
        assert!(!m.quiet());
        resolve_as(&mut m, Fate::Landed);
        assert_eq!(told(&m.take_effects()), ["c1:accepted", "c2:accepted"]);
        assert!(m.quiet());
    }

    #[test]
    fn a_write_in_doubt_that_never_landed_is_refused_and_the_next_is_told_at_once() {
        let mut m = machine();
        let second = first_of_two_in_doubt(&mut m);
        resolve_as(&mut m, Fate::Never);
        assert_eq!(told(&m.take_effects()), ["c1:refused"]);
        m.appended(second, stored(), NOW, WALL);
        assert_eq!(told(&m.take_effects()), ["c2:accepted"]);
    }

    #[test]
    fn an_append_the_store_queue_refuses_is_refused_and_leaves_nothing_waiting() {
        let mut m = machine();
        m.deliver(message(1, "c1"), NOW, None);
        let effects = m.take_effects();
        let op = match effects.into_iter().next() {
            Some(MirrorEffect::Store(op @ StoreOp::Append(_))) => op,
            _ => panic!("an append expected"),
        };
        m.store_refused(op, NOW);
        assert_eq!(told(&m.take_effects()), ["c1:refused"]);
        assert!(m.quiet(), "nothing on its way, unanswered or in doubt");
    }

    /// `from`'s message `id` to bob stored, its entry come on the channel and acked (gone
    /// from the mirror): a write of the pair the store confirmed, so the pair may go live.
    fn confirm(m: &mut InboxMirror, id: u64, from: &str) {
        let mut msg = message(id, &format!("k{id}"));
        msg.from = from.into();
        m.deliver(msg, NOW, Some(0));
        let [write]: [Message; 1] = appends(m.take_effects()).try_into().ok().unwrap();
        let entry = write.stored();
        m.appended(write, stored(), NOW, WALL);
        let seq = id << 40;
        m.pushed("bob".into(), seq, entry, NOW, WALL);
        m.inbox_mut().remove("bob", seq);
        m.take_effects();
    }

    /// `msg` goes live to bob: fed to his devices, nothing told yet.
    fn goes_live(m: &mut InboxMirror, msg: Box<Message>) {
        let cid = msg.cid.clone();
        m.deliver(msg, NOW, Some(0));
        let effects = m.take_effects();
        assert!(
            matches!(&effects[..], [MirrorEffect::Feed(u)] if u == "bob"),
            "{cid}: {:?}",
            told(&effects)
        );
    }

    /// The token of the one load among the effects.
    fn load_token(m: &mut InboxMirror) -> u64 {
        let tokens: Vec<u64> = (m.take_effects().iter())
            .filter_map(|e| match e {
                MirrorEffect::Store(StoreOp::Load { token, .. }) => Some(*token),
                _ => None,
            })
            .collect();
        assert_eq!(tokens.len(), 1, "one load expected");
        tokens[0]
    }

    fn read_of(entries: &[(InboxSeq, &str)]) -> Result<Loaded, StoreError> {
        let entries = entries
            .iter()
            .map(|(seq, cid)| (*seq, message(*seq, cid).stored()))
            .collect();
        Ok(Loaded {
            entries,
            expired: 0,
            received: Vec::new(),
        })
    }

    /// bob's load `token` answers with these entries.
    fn bob_reads(m: &mut InboxMirror, token: u64, entries: &[(InboxSeq, &str)]) {
        bob_answers(m, token, read_of(entries));
    }

    /// bob's load `token` answers, and its mark comes on the channel.
    fn bob_answers(m: &mut InboxMirror, token: u64, read: Result<Loaded, StoreError>) {
        m.loaded("bob".into(), token, read, NOW, WALL);
        m.read_marked("bob".into(), token, NOW, WALL);
    }

    /// The entries the effects owe `bob`'s devices, as (seq, cid).
    fn owed(effects: &[MirrorEffect]) -> Vec<(InboxSeq, String)> {
        effects
            .iter()
            .filter_map(|e| match e {
                MirrorEffect::Owed { user, entries, .. } if user == "bob" => Some(entries),
                _ => None,
            })
            .flatten()
            .map(|(seq, m)| (*seq, m.cid.to_string()))
            .collect()
    }

    fn mirrored(m: &InboxMirror) -> Vec<InboxSeq> {
        m.inbox()
            .read("bob", 0, 100, NOW)
            .iter()
            .map(|(s, _)| *s)
            .collect()
    }

    /// bob's mirror, loaded with entries 10 and 20.
    fn bob_loaded() -> InboxMirror {
        let mut m = machine();
        m.resynced();
        m.batch_answered(true);
        m.ensure("bob");
        let token = load_token(&mut m);
        bob_reads(&mut m, token, &[(10, "a"), (20, "b")]);
        m.take_effects();
        m
    }

    /// A reload (a resync) no longer has entry 10: a device on another node acked it. The
    /// devices here that were not sent it are owed it; 20 is still there and owed to nobody.
    #[test]
    fn a_reload_owes_what_a_device_on_another_node_acked_meanwhile() {
        let mut m = bob_loaded();
        m.resynced();
        let token = load_token(&mut m);
        bob_reads(&mut m, token, &[(20, "b")]);
        assert_eq!(owed(&m.take_effects()), vec![(10, "a".to_string())]);
        assert_eq!(mirrored(&m), vec![20]);
        // Acked here during the reload: not owed (this node's own ack removed it).
        m.resynced();
        let token = load_token(&mut m);
        assert!(m.remove_acked("bob", 20));
        bob_reads(&mut m, token, &[]);
        assert!(owed(&m.take_effects()).is_empty());
    }

    /// Pushed while a load was out that then failed, and while it was failed: left for the
    /// retry, which owes what it no longer has and mirrors the rest.
    #[test]
    fn what_was_pushed_around_a_failed_load_is_owed_if_the_retry_no_longer_has_it() {
        let mut m = bob_loaded();
        m.resynced();
        let token = load_token(&mut m);
        m.pushed("bob".into(), 30, message(30, "c").stored(), NOW, WALL);
        let down = Err(StoreError::Unavailable("down".into()));
        bob_answers(&mut m, token, down);
        m.pushed("bob".into(), 40, message(40, "d").stored(), NOW, WALL);
        m.side_state_consistent().unwrap();
        m.tick(NOW + LOAD_RETRY_MS, WALL);
        let token = load_token(&mut m);
        let read = read_of(&[(10, "a"), (20, "b"), (40, "d")]);
        bob_answers(&mut m, token, read);
        assert_eq!(owed(&m.take_effects()), vec![(30, "c".to_string())]);
        assert_eq!(mirrored(&m), vec![10, 20, 40]);
        assert!(m.left_for_read.is_empty());
    }

    /// A resync while a load is out sends another: what the first was pushed is known to the
    /// second, which owes it if it no longer has it (found by a review: it was dropped).
    #[test]
    fn what_a_load_replaced_by_a_resync_was_pushed_is_owed_if_the_next_read_lacks_it() {
        let mut m = bob_loaded();
        m.resynced();
        let first = load_token(&mut m);
        m.pushed("bob".into(), 30, message(30, "c").stored(), NOW, WALL);
        m.resynced();
        let second = load_token(&mut m);
        assert_ne!(first, second);
        bob_reads(&mut m, second, &[(10, "a"), (20, "b")]);
        assert_eq!(owed(&m.take_effects()), vec![(30, "c".to_string())]);
    }

    /// A read answered before its mark, whose load a resync replaced (the mark was lost with
    /// the channel): the next read no longer has 30, which a device on another node acked
    /// meanwhile; 30 is owed (planted `ForgetUnmarkedRead`, the read dropped as before: it is
    /// not). 20, acked here while the first load was out, is not owed.
    #[test]
    fn a_read_replaced_before_its_mark_is_known_to_the_next_read() {
        for plant in [OrderPlant::None, OrderPlant::ForgetUnmarkedRead] {
            let mut m = bob_loaded();
            m.plant = plant;
            m.resynced();
            let first = load_token(&mut m);
            assert!(m.remove_acked("bob", 20));
            m.acked("bob", 20, message(20, "b").report(20, Outcome::Delivered));
            let read = read_of(&[(10, "a"), (20, "b"), (30, "c")]);
            m.loaded("bob".into(), first, read, NOW, WALL);
            assert!(owed(&m.take_effects()).is_empty(), "waits for its mark");
            m.resynced();
            let second = load_token(&mut m);
            bob_reads(&mut m, second, &[(10, "a")]);
            let expected = match plant {
                OrderPlant::None => vec![(30, "c".to_string())],
                _ => vec![],
            };
            assert_eq!(owed(&m.take_effects()), expected, "{plant:?}");
            assert_eq!(mirrored(&m), vec![10]);
            assert!(m.left_for_read.is_empty());
        }
    }

    /// More pushes during a load than it holds: the rest is left for the next read. Those past
    /// the end of this read may be newer than it, so it does not judge them; the next read,
    /// sent after they came, does.
    #[test]
    fn pushes_past_a_reads_end_are_judged_by_the_next_read() {
        let mut m = bob_loaded();
        m.resynced();
        let token = load_token(&mut m);
        for seq in [30, 40, 50, 60, 70] {
            m.pushed("bob".into(), seq, message(seq, "p").stored(), NOW, WALL);
        }
        // The window (4) holds four pushes; the fifth is left for a read.
        assert_eq!(m.left_for_read["bob"].len(), 1);
        bob_reads(&mut m, token, &[(10, "a"), (20, "b")]);
        assert!(
            owed(&m.take_effects()).is_empty(),
            "70 may be newer than the read"
        );
        m.tick(NOW, WALL);
        let token = load_token(&mut m);
        let read = read_of(&[(10, "a"), (20, "b"), (30, "p"), (40, "p"), (50, "p")]);
        bob_answers(&mut m, token, read);
        let gone = owed(&m.take_effects());
        assert_eq!(gone, vec![(60, "p".to_string()), (70, "p".to_string())]);
    }

    /// A reload reads 10 and 20; 15, appended between them, was acked by a device on another
    /// node before the read, and its push comes after the read's answer (pushes and reads
    /// come on two connections). The read waits for its mark, which comes behind that push:
    /// 15 is owed to bob's devices here, before 20 is fed. Taken in at once (the plant, as
    /// before 2026-12-07), the read let 20 in, and 15's push came past the read: never sent.
    #[test]
    fn a_read_waits_for_its_mark_so_a_push_it_overtook_is_owed_in_its_place() {
        for plant in [OrderPlant::None, OrderPlant::ReadBeforeMark] {
            let mut m = machine();
            m.plant_order_bug(plant);
            m.resynced();
            m.batch_answered(true);
            m.ensure("bob");
            let token = load_token(&mut m);
            bob_reads(&mut m, token, &[(10, "a")]);
            m.take_effects();
            m.resynced();
            let token = load_token(&mut m);
            m.loaded(
                "bob".into(),
                token,
                read_of(&[(10, "a"), (20, "c")]),
                NOW,
                WALL,
            );
            m.pushed("bob".into(), 15, message(15, "b").stored(), NOW, WALL);
            m.pushed("bob".into(), 20, message(20, "c").stored(), NOW, WALL);
            m.read_marked("bob".into(), token, NOW, WALL);
            let effects = m.take_effects();
            if plant == OrderPlant::ReadBeforeMark {
                assert!(owed(&effects).is_empty(), "the plant never owes 15");
                continue;
            }
            assert_eq!(owed(&effects), vec![(15, "b".to_string())]);
            let owed_at = effects
                .iter()
                .position(|e| matches!(e, MirrorEffect::Owed { .. }));
            let fed_at = effects
                .iter()
                .position(|e| matches!(e, MirrorEffect::Feed(_)));
            assert!(owed_at < fed_at, "owed before 20 is fed");
            assert_eq!(mirrored(&m), vec![10, 20]);
        }
    }

    /// A read whose mark does not come (lost while the subscription stayed up) is taken in
    /// after `MARK_WAIT_MS`, not held for good; its mark coming later changes nothing.
    #[test]
    fn a_read_whose_mark_never_comes_is_taken_in_after_its_deadline() {
        let mut m = machine();
        m.resynced();
        m.batch_answered(true);
        m.ensure("bob");
        let token = load_token(&mut m);
        m.loaded("bob".into(), token, read_of(&[(10, "a")]), NOW, WALL);
        m.tick(NOW + MARK_WAIT_MS - 1, WALL);
        assert!(!m.ready("bob"), "waits for its mark");
        m.tick(NOW + MARK_WAIT_MS, WALL);
        assert!(m.ready("bob"));
        assert_eq!(mirrored(&m), vec![10]);
        m.take_effects();
        m.read_marked("bob".into(), token, NOW, WALL);
        assert!(m.take_effects().is_empty());
    }

    /// Deletes to send again go at most `REMOVES_PER_TICK` per tick (a shard back from an
    /// outage keeps room in its store queue for appends and loads).
    #[test]
    fn deletes_to_send_again_go_a_batch_per_tick() {
        let mut m = bob_loaded();
        let n = REMOVES_PER_TICK as u64 + 10;
        for seq in 100..100 + n {
            m.removed("bob".into(), seq, false, false, None);
        }
        m.tick(NOW, WALL);
        assert_eq!(removes(&m.take_effects()).len(), REMOVES_PER_TICK);
        m.tick(NOW, WALL);
        assert_eq!(removes(&m.take_effects()).len(), 10);
        m.tick(NOW, WALL);
        assert!(removes(&m.take_effects()).is_empty());
    }

    /// A delete sent again that fails again while Redis answers waits before the next round,
    /// longer each time (capped); one that runs starts it over, Redis coming back ends it.
    #[test]
    fn a_delete_that_keeps_failing_backs_off() {
        let mut m = bob_loaded();
        // Two deletes failing in each round: the back-off grows once per round.
        let fail_both = |m: &mut InboxMirror| {
            for seq in [100, 101] {
                m.removed("bob".into(), seq, false, false, None);
            }
        };
        fail_both(&mut m);
        let mut at = NOW;
        m.tick(at, WALL);
        assert_eq!(
            removes(&m.take_effects()).len(),
            2,
            "the first time at once"
        );
        for failures in 1..=10u32 {
            fail_both(&mut m);
            let wait = (REMOVE_RETRY_MS << (failures - 1)).min(REMOVE_RETRY_MAX_MS);
            m.tick(at, WALL);
            assert!(removes(&m.take_effects()).is_empty(), "failure {failures}");
            m.tick(at + wait - 1, WALL);
            assert!(removes(&m.take_effects()).is_empty(), "failure {failures}");
            at += wait;
            m.tick(at, WALL);
            assert_eq!(removes(&m.take_effects()).len(), 2, "failure {failures}");
        }
        m.removed("bob".into(), 101, true, true, None);
        // Redis away and back: the next round goes at once.
        m.removed("bob".into(), 100, false, false, None);
        m.batch_answered(false);
        m.batch_answered(true);
        m.tick(at, WALL);
        assert_eq!(removes(&m.take_effects()).len(), 1);
        // It fails again; another delete that runs starts the back-off over.
        m.removed("bob".into(), 100, false, false, None);
        m.removed("bob".into(), 101, false, false, None);
        m.tick(at + REMOVE_RETRY_MS, WALL);
        assert_eq!(removes(&m.take_effects()).len(), 2);
        m.removed("bob".into(), 101, true, true, None);
        m.removed("bob".into(), 100, false, false, None);
        m.tick(at + 2 * REMOVE_RETRY_MS, WALL);
        let again = removes(&m.take_effects()).len();
        assert_eq!(again, 1, "the back-off starts over");
    }

    /// The removes among the effects, as (user, seq, whether it carries a `delivered`).
    fn removes(effects: &[MirrorEffect]) -> Vec<(String, InboxSeq, bool)> {
        effects
            .iter()
            .filter_map(|e| match e {
                MirrorEffect::Store(StoreOp::Remove { user, seq, report }) => {
                    Some((user.to_string(), *seq, report.is_some()))
                }
                _ => None,
            })
            .collect()
    }

    /// A device acks 10; Redis does not run the delete (it fails, or its answer is lost).
    /// A later read still holds 10: it is not taken in again (sent again, it would come after
    /// 20 on a device already sent 20: one-node seed 6921874350140192627), and the delete
    /// goes again once Redis answers, with its `delivered`, told when it removes the entry.
    #[test]
    fn a_delete_redis_did_not_run_is_sent_again_and_a_read_does_not_bring_its_entry_back() {
        for plant in [OrderPlant::None, OrderPlant::ForgetUnremoved] {
            let mut m = bob_loaded();
            m.plant_order_bug(plant);
            ack_10_whose_delete_times_out(&mut m);
            m.tick(NOW, WALL);
            assert!(
                removes(&m.take_effects()).is_empty(),
                "not while Redis is away"
            );
            m.batch_answered(true);
            m.resynced();
            let token = load_token(&mut m);
            bob_reads(&mut m, token, &[(10, "a"), (20, "b")]);
            if plant == OrderPlant::ForgetUnremoved {
                assert_eq!(mirrored(&m), vec![10, 20], "the plant takes 10 in again");
                continue;
            }
            assert_eq!(mirrored(&m), vec![20], "10 was acked here");
            assert!(owed(&m.take_effects()).is_empty());
            m.tick(NOW, WALL);
            assert_eq!(removes(&m.take_effects()), vec![("bob".into(), 10, true)]);
            m.tick(NOW, WALL);
            assert!(
                removes(&m.take_effects()).is_empty(),
                "sent once while on its way"
            );
            m.released("bob");
            let report = Some(Box::new(message(10, "a").report(10, Outcome::Delivered)));
            m.removed("bob".into(), 10, true, true, report);
            assert_eq!(told(&m.take_effects()), vec!["a:delivered"]);
            assert!(m.unremoved.is_empty() && m.unremoved_count == 0);
        }
    }

    /// A device acks bob's entry 10; Redis does not answer its delete (it times out) and is
    /// away after.
    fn ack_10_whose_delete_times_out(m: &mut InboxMirror) {
        assert!(m.remove_acked("bob", 10));
        let delivered = message(10, "a").report(10, Outcome::Delivered);
        m.acked("bob", 10, delivered);
        let effects = m.take_effects();
        let Some(MirrorEffect::Store(delete)) = effects.into_iter().next() else {
            panic!("the ack sends a delete");
        };
        let failed = crate::store::redis::failed_reply(delete, "timed out".into());
        let crate::store::redis::StoreReply::Removed {
            user,
            seq,
            ran,
            ok,
            report,
        } = failed
        else {
            panic!("a delete is answered as one");
        };
        m.batch_answered(false);
        m.removed(user, seq, ran, ok, report);
    }

    /// The delete sent again runs after a reload's read, but is answered first: the read,
    /// answered next, must not take 10 in (one-node seed 8995636101367943396: devices that
    /// connected since were sent it after later entries). Planted away, it does.
    #[test]
    fn a_read_answered_after_a_delete_sent_again_ran_does_not_bring_its_entry_back() {
        for plant in [OrderPlant::None, OrderPlant::ReadPastRemoved] {
            let mut m = bob_loaded();
            m.plant_order_bug(plant);
            ack_10_whose_delete_times_out(&mut m);
            m.batch_answered(true);
            m.resynced();
            let token = load_token(&mut m);
            m.tick(NOW, WALL);
            assert_eq!(removes(&m.take_effects()), vec![("bob".into(), 10, true)]);
            let report = Some(Box::new(message(10, "a").report(10, Outcome::Delivered)));
            m.removed("bob".into(), 10, true, true, report);
            assert_eq!(told(&m.take_effects()), vec!["a:delivered"]);
            bob_reads(&mut m, token, &[(10, "a"), (20, "b")]);
            match plant {
                OrderPlant::None => assert_eq!(mirrored(&m), vec![20], "10 was deleted"),
                _ => assert_eq!(mirrored(&m), vec![10, 20], "the plant takes 10 in again"),
            }
        }
    }

    /// A reload reads an entry of this shard's write whose answer has not come (it waits for
    /// it); what it lost above that entry waits behind it, what it lost below is owed now.
    /// Owed at once, 30 and 40 would be shown before 25 (two-node seed 3143267144307512625).
    #[test]
    fn a_reload_owes_nothing_above_an_entry_of_its_read_that_waits() {
        for plant in [OrderPlant::None, OrderPlant::OweAheadOfWaiting] {
            let mut m = bob_loaded();
            m.plant_order_bug(plant);
            m.pushed("bob".into(), 30, message(30, "c").stored(), NOW, WALL);
            m.pushed("bob".into(), 40, message(40, "d").stored(), NOW, WALL);
            m.deliver(message(25, "w"), NOW, Some(0));
            let [write]: [Message; 1] = appends(m.take_effects()).try_into().ok().unwrap();
            m.resynced();
            let token = load_token(&mut m);
            bob_reads(&mut m, token, &[(25, "w")]);
            let now_owed: Vec<InboxSeq> = owed(&m.take_effects()).iter().map(|e| e.0).collect();
            if plant == OrderPlant::OweAheadOfWaiting {
                assert_eq!(now_owed, vec![10, 20, 30, 40], "the plant owes all at once");
                continue;
            }
            assert_eq!(now_owed, vec![10, 20]);
            assert!(
                mirrored(&m).is_empty(),
                "25 waits for its answer, 30 and 40 behind it"
            );
            m.appended(write, stored(), NOW, WALL);
            assert_eq!(mirrored(&m), vec![25, 30, 40]);
        }
    }

    /// A reload owes nothing above an entry left for the next read (pushed during this load,
    /// past its read's end): that read judges it, and what lies above it with it. Owed at
    /// once, 40 would be shown before 30 (two-node seed 2061169335744875953).
    #[test]
    fn a_reload_owes_nothing_above_what_the_next_read_judges() {
        for plant in [OrderPlant::None, OrderPlant::OweAheadOfLeft] {
            let mut m = bob_loaded();
            m.plant_order_bug(plant);
            m.pushed("bob".into(), 40, message(40, "d").stored(), NOW, WALL);
            m.resynced();
            let token = load_token(&mut m);
            // As a push the loading mirror could not take in (one missing before it).
            m.leave_for_read("bob".into(), 30, message(30, "c").stored());
            bob_reads(&mut m, token, &[]);
            let now_owed: Vec<InboxSeq> = owed(&m.take_effects()).iter().map(|e| e.0).collect();
            if plant == OrderPlant::OweAheadOfLeft {
                assert_eq!(now_owed, vec![10, 20, 40], "the plant owes 40 before 30");
                continue;
            }
            assert_eq!(now_owed, vec![10, 20]);
            m.resynced();
            let token = load_token(&mut m);
            bob_reads(&mut m, token, &[]);
            let later: Vec<InboxSeq> = owed(&m.take_effects()).iter().map(|e| e.0).collect();
            assert_eq!(later, vec![30, 40]);
        }
    }

    /// A mirror through its states (loading, failed, loading again, ready, gone) keeps beside
    /// the map exactly what the state needs; and the check that says so catches each way of
    /// breaking that (a planted stray or missing entry).
    #[test]
    fn what_a_mirror_state_keeps_beside_the_map_comes_and_goes_with_it() {
        let mut m = machine();
        m.resynced();
        m.ensure("bob");
        let token = load_token(&mut m);
        assert_eq!(m.mirrors["bob"], Mirror::Loading);
        m.side_state_consistent().unwrap();
        let down = Err(StoreError::Unavailable("down".into()));
        bob_answers(&mut m, token, down);
        assert_eq!(m.mirrors["bob"], Mirror::Failed);
        assert!(m.loads.is_empty() && m.retries.len() == 1);
        m.side_state_consistent().unwrap();
        let next = m.next_load_retry_ms.take();
        assert!(
            m.side_state_consistent().is_err(),
            "a failed load no tick looks at"
        );
        m.next_load_retry_ms = next;
        m.tick(NOW + LOAD_RETRY_MS, WALL);
        let token = load_token(&mut m);
        assert!(m.retries.is_empty() && m.loads.len() == 1);
        m.side_state_consistent().unwrap();
        let empty = Loaded {
            entries: Vec::new(),
            expired: 0,
            received: Vec::new(),
        };
        bob_answers(&mut m, token, Ok(empty));
        assert_eq!(m.mirrors["bob"], Mirror::Ready { epoch: 1 });
        assert!(m.loads.is_empty() && m.retries.is_empty());
        m.side_state_consistent().unwrap();
        // Planted: a retry left behind, a load kept for a ready mirror, a load lost.
        m.retries.insert("bob".into(), NOW);
        assert!(m.side_state_consistent().is_err());
        m.retries.clear();
        m.ensure("cat");
        let token = load_token(&mut m);
        let loading = m.loads.remove("cat").unwrap();
        assert!(
            m.side_state_consistent().is_err(),
            "a loading mirror without its load"
        );
        m.loads.insert("bob".into(), loading);
        assert!(
            m.side_state_consistent().is_err(),
            "a ready mirror with a load"
        );
        let loading = m.loads.remove("bob").unwrap();
        assert_eq!(loading.token, token);
        m.loads.insert("cat".into(), loading);
        m.side_state_consistent().unwrap();
        m.released("bob");
        m.released("cat");
        assert!(m.mirrors.is_empty() && m.loads.is_empty() && m.retries.is_empty());
    }

    /// A load the store queue refused fails like one Redis refused: retried when due. One it
    /// refused after a newer load went out changes nothing.
    #[test]
    fn a_load_the_queue_refused_is_retried_and_a_stale_one_ignored() {
        /// The load among the effects, as the store queue would have refused it.
        fn the_load(m: &mut InboxMirror) -> StoreOp {
            let ops: Vec<StoreOp> = (m.take_effects().into_iter())
                .filter_map(|e| match e {
                    MirrorEffect::Store(op @ StoreOp::Load { .. }) => Some(op),
                    _ => None,
                })
                .collect();
            <[StoreOp; 1]>::try_from(ops)
                .ok()
                .expect("one load")
                .into_iter()
                .next()
                .unwrap()
        }
        let mut m = machine();
        m.resynced();
        m.ensure("bob");
        let first = the_load(&mut m);
        // A resync reads bob's inbox again: the first load is stale from now on.
        m.resynced();
        let second = the_load(&mut m);
        let StoreOp::Load { token, .. } = second else {
            unreachable!()
        };
        m.store_refused(first, NOW);
        assert_eq!(m.mirrors["bob"], Mirror::Loading, "a stale refusal");
        m.store_refused(second, NOW);
        assert_eq!(m.mirrors["bob"], Mirror::Failed);
        m.side_state_consistent().unwrap();
        m.tick(NOW + LOAD_RETRY_MS - 1, WALL);
        assert!(!m
            .take_effects()
            .iter()
            .any(|e| matches!(e, MirrorEffect::Store(StoreOp::Load { .. }))));
        m.tick(NOW + LOAD_RETRY_MS, WALL);
        assert_ne!(load_token(&mut m), token, "a new load once due");
        assert_eq!(m.mirrors["bob"], Mirror::Loading);
    }

    /// bob's mirror loaded (empty), a message of ann's and one of cat's stored, then a batch
    /// failed: the store is down.
    fn bob_online_and_store_down() -> InboxMirror {
        let mut m = machine();
        m.resynced();
        m.ensure("bob");
        let token = match &m.take_effects()[..] {
            [MirrorEffect::Store(StoreOp::Load { token, .. })] => *token,
            _ => panic!("a load expected"),
        };
        let empty = Loaded {
            entries: Vec::new(),
            expired: 0,
            received: Vec::new(),
        };
        bob_answers(&mut m, token, Ok(empty));
        m.take_effects();
        assert!(m.ready("bob"));
        confirm(&mut m, 1, "ann");
        confirm(&mut m, 2, "cat");
        m.batch_answered(false);
        m
    }

    #[test]
    fn while_the_store_is_down_a_message_for_an_online_user_goes_live_and_is_accepted_on_ack() {
        let mut m = bob_online_and_store_down();
        goes_live(&mut m, message(7, "c7"));
        let entry = m.inbox().read("bob", 0, 10, NOW);
        assert_eq!(
            entry.len(),
            1,
            "the live entry is in the mirror, not in the store"
        );
        let seq = entry[0].0;
        let delivered = message(7, "c7").report(7, Outcome::Delivered);
        m.acked("bob", seq, delivered);
        assert_eq!(told(&m.take_effects()), ["c7:accepted", "c7:delivered"]);
    }

    /// Found by the simulation with two nodes (seed 4749320442185338218): ann was told
    /// `accepted` for a message node A stored, moved to this node, and her next message went
    /// live here before the first one's entry came on the channel. Nothing of a pair goes
    /// live until a write of it issued since the sender arrived here is confirmed.
    #[test]
    fn a_sender_that_arrived_since_the_pairs_last_confirmed_write_waits_for_the_store() {
        for plant in [OrderPlant::None, OrderPlant::LiveUnconfirmed] {
            let mut m = bob_online_and_store_down();
            m.plant_order_bug(plant);
            let confirmed_at = issued_ms(1);
            let mut arrived_since = message(13, "c13");
            arrived_since.sender_arrived_ms = confirmed_at + 1;
            m.deliver(arrived_since, NOW, Some(0));
            let refused = told(&m.take_effects());
            match plant {
                OrderPlant::None => assert_eq!(refused, ["c13:refused"], "not live"),
                _ => assert!(refused.is_empty(), "the plant lets it go live"),
            }
            // A sender that arrived before it (the same millisecond too) goes live (on a
            // mirror where c13 was not refused: that holds the pair back, see
            // `refused_unstored`).
            let mut m = bob_online_and_store_down();
            let mut earlier = message(14, "c14");
            earlier.sender_arrived_ms = confirmed_at;
            m.deliver(earlier, NOW, Some(0));
            assert!(matches!(&m.take_effects()[..], [MirrorEffect::Feed(u)] if u == "bob"));
        }
        // A pair with no write confirmed at all does not go live either.
        let mut m = bob_online_and_store_down();
        let mut dan = message(15, "d15");
        dan.from = "dan".into();
        m.deliver(dan, NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["d15:refused"]);
    }

    /// Found by the simulation with two nodes (seed 18137199437984738542): ann's message,
    /// issued before an entry of hers another node stored and this mirror took in, went live
    /// after it, and her client, telling held answers in id order, told it first. A message
    /// goes live only above the pair's highest id the mirror took in.
    #[test]
    fn a_message_below_an_entry_of_its_pair_in_the_mirror_does_not_go_live() {
        // bob's mirror with ann's c20, pushed.
        let with_c20 = |plant| {
            let mut m = bob_online_and_store_down();
            m.plant_order_bug(plant);
            let c20 = message(20, "c20").stored();
            m.pushed("bob".into(), 20 << 40, c20, NOW, WALL);
            m.take_effects();
            m
        };
        for plant in [OrderPlant::None, OrderPlant::LiveBelowTop] {
            let mut m = with_c20(plant);
            let mut below = message(13, "c13");
            below.sender_arrived_ms = 0;
            m.deliver(below, NOW, Some(0));
            let refused = told(&m.take_effects());
            match plant {
                OrderPlant::None => assert_eq!(refused, ["c13:refused"], "not live"),
                _ => assert!(refused.is_empty(), "the plant lets it go live"),
            }
            // Above it goes live (on a mirror where c13 was not refused: that holds the pair
            // back, see `refused_unstored`).
            let mut m = with_c20(OrderPlant::None);
            let mut above = message(21, "c21");
            above.sender_arrived_ms = 0;
            m.deliver(above, NOW, Some(0));
            assert!(matches!(&m.take_effects()[..], [MirrorEffect::Feed(u)] if u == "bob"));
        }
    }

    /// bob's mirror after c31 went live (Redis away) above c30, was acked, and another
    /// writer's c40, stored in c30's millisecond below c31's position, was pushed; Redis
    /// answers again and bob's reload is out: its token.
    fn pushed_below_a_live_entry(m: &mut InboxMirror, at: impl Fn(u64) -> InboxSeq) -> u64 {
        m.pushed("bob".into(), at(3), message(30, "c30").stored(), NOW, WALL);
        m.deliver(message(31, "c31"), NOW, Some(0));
        let live = *mirrored(m).last().unwrap();
        assert!(
            live > at(4),
            "the live entry sits above what Redis gives next"
        );
        assert_eq!(store::seq_time_ms(live), store::seq_time_ms(at(3)));
        m.remove_acked("bob", live);
        let delivered = message(31, "c31").report(31, Outcome::Delivered);
        m.acked("bob", live, delivered);
        assert_eq!(told(&m.take_effects()), ["c31:accepted", "c31:delivered"]);
        m.pushed("bob".into(), at(4), message(40, "c40").stored(), NOW, WALL);
        assert_eq!(mirrored(m), vec![at(3)], "not shown past the live position");
        m.batch_answered(true);
        m.tick(NOW + 1, WALL);
        load_token(m)
    }

    /// The entries the effects owe bob's devices that passed them, as (seq, cid).
    fn owed_passed(effects: &[MirrorEffect]) -> Vec<(InboxSeq, String)> {
        effects
            .iter()
            .filter_map(|e| match e {
                MirrorEffect::Owed { passed, .. } => Some(passed),
                _ => None,
            })
            .flatten()
            .map(|(seq, m)| (*seq, m.cid.to_string()))
            .collect()
    }

    /// Found by slow-second-device seed 15780009465165166133 (2026-12-07): Redis away, c31
    /// goes live after everything bob's devices were given; another writer's entry stored in
    /// the same millisecond lands below it. Its push finds the mirror missing it (not shown
    /// past the live entry), and the reload's read owes it, as passed, to each device that
    /// was sent c31: the inbox's order alone never sends it to them. Planted away, it is not.
    #[test]
    fn an_entry_stored_below_a_live_position_is_owed_to_the_devices_past_it() {
        let at = |n: u64| (3 << 40) | n; // the n-th entry of one millisecond
        for plant in [OrderPlant::None, OrderPlant::OweNonePassed] {
            let mut m = bob_online_and_store_down();
            m.plant_order_bug(plant);
            let token = pushed_below_a_live_entry(&mut m, at);
            bob_reads(&mut m, token, &[(at(3), "c30"), (at(4), "c40")]);
            let effects = m.take_effects();
            match plant {
                OrderPlant::None => {
                    assert_eq!(owed_passed(&effects), vec![(at(4), "c40".to_string())])
                }
                _ => assert!(
                    owed_passed(&effects).is_empty(),
                    "the plant owes nothing passed"
                ),
            }
            assert!(owed(&effects).is_empty(), "nothing is gone");
            assert_eq!(mirrored(&m), vec![at(3), at(4)]);
        }
    }

    /// As above, but a device on another node acks c40 out of Redis before the reload reads
    /// the inbox: no device here was sent it, so it is owed to every one, those that passed
    /// its position too (kept for the read when pushed; a review's finding).
    #[test]
    fn an_entry_below_a_live_position_acked_elsewhere_first_is_owed_to_every_device() {
        let at = |n: u64| (3 << 40) | n;
        let mut m = bob_online_and_store_down();
        let token = pushed_below_a_live_entry(&mut m, at);
        bob_reads(&mut m, token, &[(at(3), "c30")]);
        let effects = m.take_effects();
        let c40 = vec![(at(4), "c40".to_string())];
        assert_eq!(owed(&effects), c40, "to the devices below it");
        assert_eq!(owed_passed(&effects), c40, "and to those past it");
        assert_eq!(mirrored(&m), vec![at(3)]);
    }

    /// A live entry goes past what the user's devices here were given, in the upper half of
    /// that millisecond, and no further: the user's stream in Redis gives its next entries
    /// past its last one, so a later message of the same sender stored once Redis is back
    /// comes after it (past the shard's newest entry of any user, ids of another Redis
    /// Cluster server's clock, it could come before: a review's finding).
    #[test]
    fn a_live_entry_goes_just_past_what_the_users_devices_were_given() {
        let at = |ms: u64, n: u64| (ms << 20) | n;
        let upper = 1 << 19;
        let mut m = bob_online_and_store_down();
        m.pushed(
            "bob".into(),
            at(3 << 20, 1),
            message(30, "c30").stored(),
            NOW,
            WALL,
        );
        // Another user's newer entry, from another server's clock: no bound for bob's.
        let carol = message(90, "c90").stored();
        assert!(m.inbox_mut().insert_at("carol", at(9 << 20, 0), carol, NOW));
        m.deliver(message(31, "c31"), NOW, Some(0));
        m.deliver(message(32, "c32"), NOW, Some(0));
        let c33 = message(33, "c33");
        // A device of bob is owed an entry of a later millisecond (another device acked it).
        m.deliver(c33, NOW, Some(at(5 << 20, 2)));
        assert_eq!(
            mirrored(&m),
            [
                at(3 << 20, 1),
                at(3 << 20, upper),
                at(3 << 20, upper + 1),
                at(5 << 20, upper)
            ]
        );
    }

    #[test]
    fn a_resent_message_never_goes_live_past_the_store() {
        let mut m = bob_online_and_store_down();
        let mut resent = message(8, "c8");
        resent.resent = true;
        m.deliver(resent, NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["c8:refused"]);
        assert!(m.inbox().read("bob", 0, 10, NOW).is_empty());
    }

    /// cat's message `id` goes live to bob (the store away, bob's mirror empty), and its ack
    /// tells cat `accepted` and `delivered`.
    fn another_sender_goes_live_and_is_acked(m: &mut InboxMirror, id: u64, cid: &str) {
        let cats = || {
            let mut msg = message(id, cid);
            msg.from = "cat".into();
            msg
        };
        m.deliver(cats(), NOW, Some(0));
        assert!(matches!(&m.take_effects()[..], [MirrorEffect::Feed(u)] if u == "bob"));
        let seq = m.inbox().read("bob", 0, 10, NOW)[0].0;
        m.acked("bob", seq, cats().report(id, Outcome::Delivered));
        let told = told(&m.take_effects());
        assert_eq!(
            told,
            [format!("{cid}:accepted"), format!("{cid}:delivered")]
        );
    }

    /// bob's mirror of `bob_online_and_store_down`, with `plant`, where `msg` was sent to the
    /// store (once it answered again): the mirror and that write.
    fn written_with_the_store_up(plant: OrderPlant, msg: Box<Message>) -> (InboxMirror, Message) {
        let mut m = bob_online_and_store_down();
        m.plant_order_bug(plant);
        m.batch_answered(true);
        m.deliver(msg, NOW, Some(0));
        let [write]: [Message; 1] = appends(m.take_effects()).try_into().ok().unwrap();
        (m, write)
    }

    #[test]
    fn a_stored_write_whose_push_has_not_come_keeps_later_messages_from_going_live() {
        for plant in [OrderPlant::None, OrderPlant::LivePastUnpushed] {
            let (mut m, write) = written_with_the_store_up(plant, message(11, "c11"));
            m.appended(write, stored(), NOW, WALL);
            assert_eq!(told(&m.take_effects()), ["c11:accepted"]);
            // The store goes away before c11's entry came on the channel: c12, shown live
            // now, would come before it.
            m.batch_answered(false);
            m.deliver(message(12, "c12"), NOW, Some(0));
            let to_store = appends(m.take_effects()).len();
            match plant {
                OrderPlant::None => assert_eq!(to_store, 1, "to the store, not live past c11"),
                _ => assert_eq!(to_store, 0, "the plant lets it go live"),
            }
        }
    }

    /// A first attempt refused here is resent, maybe on another node, whose ids of one
    /// millisecond may sort below this node's (found by the simulation with two nodes, slow
    /// second devices and resyncs, seed 7832106425874293347). Until an entry with its cid is
    /// seen stored, nothing of the pair goes live; other senders do. A dedup answer for it
    /// counts as stored. Past `RefusedCids::MAX` refused cids, the pair is held back
    /// until its mirror is dropped. (Planted `LivePastRefused`: c3 goes live.)
    #[test]
    fn a_refused_first_attempt_holds_its_pair_back_until_an_entry_of_it_is_stored() {
        let cases = [
            (OrderPlant::None, false),
            (OrderPlant::None, true),
            (OrderPlant::LivePastRefused, false),
            (OrderPlant::LivePastRefused, true),
        ];
        for (plant, answered) in cases {
            // c2 is refused by the store's queue, or answered not written (the store is away).
            let (mut m, write) = written_with_the_store_up(plant, message(2, "c2"));
            if answered {
                let unsent = Err(StoreError::Unsent("down".into()));
                m.appended(write, unsent, NOW, WALL);
            } else {
                m.store_refused(StoreOp::Append(Box::new(write)), NOW);
            }
            assert_eq!(told(&m.take_effects()), ["c2:refused"]);
            m.batch_answered(false);
            m.deliver(message(3, "c3"), NOW, Some(0));
            let live = !told(&m.take_effects()).contains(&"c3:refused".to_string());
            assert_eq!(
                live,
                plant == OrderPlant::LivePastRefused,
                "{plant:?} {answered}"
            );
            if live {
                continue;
            }
            another_sender_goes_live_and_is_acked(&mut m, 4, "d4");
            // c2's resend, stored by another node under a lower id than c3's: c3 is still
            // refused and unstored.
            m.pushed("bob".into(), 3 << 40, message(1, "c2").stored(), NOW, WALL);
            m.take_effects();
            m.deliver(message(5, "c5"), NOW, Some(0));
            assert_eq!(
                told(&m.take_effects()),
                ["c5:refused"],
                "c3 and c5 unstored"
            );
            // c3 and c5 answered as stored already (a dedup answer), here.
            m.batch_answered(true);
            for (id, cid) in [(6, "c3"), (7, "c5")] {
                let mut resent = message(id, cid);
                resent.resent = true;
                m.deliver(resent, NOW, Some(0));
                let [write]: [Message; 1] = appends(m.take_effects()).try_into().ok().unwrap();
                m.appended(write, Ok(Appended::Duplicate { id }), NOW, WALL);
                assert_eq!(told(&m.take_effects()), [format!("{cid}:accepted")]);
            }
            m.batch_answered(false);
            goes_live(&mut m, message(8, "c8"));
        }
        // Bounded: past `RefusedCids::MAX` cids the pair is held back until its mirror is
        // dropped, even once every cid it knows is stored.
        let mut m = bob_online_and_store_down();
        m.pushed("bob".into(), 3 << 40, message(1, "k0").stored(), NOW, WALL);
        m.take_effects();
        let mut refused = Vec::new();
        for id in 10..(11 + RefusedCids::MAX as u64) {
            let mut arrived_later = message(id, &format!("r{id}"));
            arrived_later.sender_arrived_ms = u64::MAX;
            m.deliver(arrived_later, NOW, Some(0));
            refused.extend(told(&m.take_effects()));
        }
        assert_eq!(refused.len(), RefusedCids::MAX + 1);
        let kept = &m.refused_unstored["bob"]["ann"];
        assert_eq!((kept.cids.len(), kept.overflowed), (RefusedCids::MAX, true));
        for id in 10..11 + RefusedCids::MAX as u64 {
            let entry = message(id, &format!("r{id}")).stored();
            m.pushed("bob".into(), (3 << 40) + id, entry, NOW, WALL);
        }
        m.take_effects();
        m.deliver(message(100, "x1"), NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["x1:refused"], "held back");
        m.released("bob");
        m.take_effects();
        assert!(m.refused_unstored.is_empty(), "dropped with the mirror");
    }

    /// A client that does not mark resends (the SPEC asks only for the same cid) sends the
    /// pair's earliest refused cid again: it may go live, issued after everything issued
    /// here; a later refused cid may not before it.
    #[test]
    fn an_unmarked_resend_of_the_earliest_refused_cid_goes_live() {
        let (mut m, write) = written_with_the_store_up(OrderPlant::None, message(2, "c2"));
        m.store_refused(StoreOp::Append(Box::new(write)), NOW);
        m.batch_answered(false);
        m.deliver(message(3, "c3"), NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["c2:refused", "c3:refused"]);
        m.deliver(message(4, "c3"), NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["c3:refused"], "not before c2");
        for (id, cid) in [(5, "c2"), (6, "c3"), (7, "c7")] {
            goes_live(&mut m, message(id, cid));
        }
    }

    /// ann's `msg`, carrying `cids` refused on ann's shard before they got here (and
    /// `overflowed`).
    fn carrying(id: u64, cid: &str, cids: &[&str], overflowed: bool) -> Box<Message> {
        let mut msg = message(id, cid);
        msg.refused_earlier = Some(Box::new(RefusedCids {
            cids: cids.iter().map(|&c| c.into()).collect(),
            overflowed,
            ..Default::default()
        }));
        msg
    }

    /// A first attempt refused on its sender's shard before it got here (no message id slot,
    /// a full shard channel, `rate_limited`) comes with the pair's next message and holds the
    /// pair back as one refused here does, until an entry with its cid is stored; other
    /// senders go live. Which of the pair's refused cids was sent first is no longer known,
    /// so none goes live sent again unmarked. An overflowed set holds the pair until its
    /// mirror is dropped.
    #[test]
    fn a_first_attempt_refused_on_the_way_holds_its_pair_back_like_one_refused_here() {
        let mut m = bob_online_and_store_down();
        m.deliver(carrying(3, "c3", &["c2"], false), NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["c3:refused"], "c2 is unstored");
        another_sender_goes_live_and_is_acked(&mut m, 4, "d4");
        m.deliver(message(5, "c5"), NOW, Some(0));
        assert_eq!(
            told(&m.take_effects()),
            ["c5:refused"],
            "the carried cid is kept"
        );
        // c2, unmarked, again here, carrying itself: c3 may have been sent before it.
        m.deliver(carrying(6, "c2", &["c2"], false), NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["c2:refused"]);
        // c2, c3 and c5, stored by another node: nothing of the pair is unstored any more.
        for (seq, cid) in [(1, "c2"), (2, "c3"), (3, "c5")] {
            m.pushed(
                "bob".into(),
                (3 << 40) + seq,
                message(seq, cid).stored(),
                NOW,
                WALL,
            );
        }
        m.take_effects();
        goes_live(&mut m, message(7, "c7"));
        // Overflowed on the way: held back until bob's mirror is dropped.
        let mut m = bob_online_and_store_down();
        m.deliver(carrying(3, "c3", &[], true), NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["c3:refused"]);
        m.pushed("bob".into(), 3 << 40, message(1, "c3").stored(), NOW, WALL);
        m.take_effects();
        m.deliver(message(4, "c4"), NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["c4:refused"], "held back");
        // Without carried cids, the earliest refused one sent again unmarked goes live (see
        // `an_unmarked_resend_of_the_earliest_refused_cid_goes_live`); carried with itself
        // into an empty set, it does not either: a write of the pair may be out and refused
        // later, though sent before it.
        let mut m = bob_online_and_store_down();
        m.deliver(carrying(3, "c3", &["c3"], false), NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["c3:refused"]);
        // Carried to a recipient without a mirror here: nothing to hold back, nothing kept.
        let mut m = bob_online_and_store_down();
        let mut to_carl = carrying(3, "c3", &["c2"], false);
        to_carl.to = "carl".into();
        m.deliver(to_carl, NOW, None);
        assert!(!m.refused_unstored.contains_key("carl"));
    }

    /// A resend refused before the live path, on its sender's shard (carried here as a mark
    /// by the pair's next message) or by the store (not written), takes the pair's
    /// confirmation back as one refused on the live path does: another attempt of it may be
    /// stored under a lower id. Only an entry above it confirms the pair again. (Planted
    /// `LivePastUnsure`: the pair's next message goes live.)
    #[test]
    fn a_resend_refused_on_the_way_or_by_the_store_holds_its_pair_back_like_one_refused_here() {
        let resend_mark = |id, cid: &str| {
            let mut msg = message(id, cid);
            msg.refused_earlier = Some(Box::new(RefusedCids {
                resend_refused: true,
                ..Default::default()
            }));
            msg
        };
        for plant in [OrderPlant::None, OrderPlant::LivePastUnsure] {
            let mut m = bob_online_and_store_down();
            m.plant_order_bug(plant);
            if plant == OrderPlant::LivePastUnsure {
                goes_live(&mut m, resend_mark(9, "c9"));
                continue;
            }
            m.deliver(resend_mark(9, "c9"), NOW, Some(0));
            assert_eq!(told(&m.take_effects()), ["c9:refused"], "the carrier too");
            let kept = &m.refused_unstored["bob"]["ann"];
            assert_eq!(
                (&kept.cids[..], kept.order_unknown),
                (&["c9".into()][..], false)
            );
            // c9 (kept as refused here) stored by another node below the mark: not enough.
            m.pushed("bob".into(), 3 << 40, message(5, "c9").stored(), NOW, WALL);
            m.take_effects();
            m.deliver(message(10, "c10"), NOW, Some(0));
            assert_eq!(told(&m.take_effects()), ["c10:refused"]);
            let mut cats = message(11, "d11");
            cats.from = "cat".into();
            goes_live(&mut m, cats);
            m.pushed(
                "bob".into(),
                4 << 40,
                message(12, "c10").stored(),
                NOW,
                WALL,
            );
            m.take_effects();
            goes_live(&mut m, message(13, "c13"));
        }
        for plant in [OrderPlant::None, OrderPlant::LivePastUnsure] {
            let mut resent = message(8, "c8");
            resent.resent = true;
            let (mut m, write) = written_with_the_store_up(plant, resent);
            m.appended(
                write,
                Err(StoreError::Unsent("queue full".into())),
                NOW,
                WALL,
            );
            assert_eq!(told(&m.take_effects()), ["c8:refused"]);
            m.batch_answered(false);
            m.deliver(message(9, "c9"), NOW, Some(0));
            let live = !told(&m.take_effects()).contains(&"c9:refused".to_string());
            assert_eq!(live, plant == OrderPlant::LivePastUnsure, "{plant:?}");
        }
    }

    /// The backend's messages (`POST /api/send`) never go live: each request is a new
    /// arrival, past which the pair is rarely confirmed; as a rule, their refusals before
    /// routing need not be kept.
    #[test]
    fn a_backend_message_waits_for_the_store() {
        let mut m = bob_online_and_store_down();
        m.batch_answered(true);
        confirm(&mut m, 3, crate::shard::deliver::BACKEND_SENDER);
        m.batch_answered(false);
        let mut msg = message(9, "b9");
        msg.from = crate::shard::deliver::BACKEND_SENDER.into();
        msg.sender_arrived_ms = 0;
        m.deliver(msg, NOW, Some(0));
        assert_eq!(told(&m.take_effects()), ["b9:refused"]);
    }

    /// A refused read receipt does not hold its pair back: it has no `accepted` to keep in
    /// order, and a later receipt replaces it (a review's finding).
    #[test]
    fn a_refused_read_receipt_does_not_hold_its_pair_back() {
        let mut m = bob_online_and_store_down();
        let mut receipt = message(5, &proto::receipt_cid("bob", 4));
        receipt.sender_arrived_ms = u64::MAX;
        m.deliver(receipt, NOW, Some(0));
        assert_eq!(told(&m.take_effects()).len(), 1, "refused");
        assert!(m.refused_unstored.is_empty());
        goes_live(&mut m, message(6, "c6"));
    }

    /// After a resend refused as possibly stored, an entry of the pair with a lower id (another
    /// node's, whose other attempts may still land) does not confirm the pair again; one above
    /// the resend does (two nodes with slow second devices, seed 16526268307316691065;
    /// planted `ConfirmBelowUnsure`: c9 goes live).
    #[test]
    fn after_a_resend_refused_as_possibly_stored_only_an_entry_above_it_confirms_the_pair() {
        for plant in [OrderPlant::None, OrderPlant::ConfirmBelowUnsure] {
            let mut m = bob_online_and_store_down();
            m.plant_order_bug(plant);
            let mut resent = message(8, "c8");
            resent.resent = true;
            m.deliver(resent, NOW, Some(0));
            assert_eq!(told(&m.take_effects()), ["c8:refused"]);
            // Another node's entry of the pair with a lower id (its other attempts may land
            // after it) comes on the channel.
            m.pushed("bob".into(), 3 << 40, message(5, "c5").stored(), NOW, WALL);
            m.take_effects();
            m.deliver(message(9, "c9"), NOW, Some(0));
            let live = !told(&m.take_effects()).contains(&"c9:refused".to_string());
            assert_eq!(live, plant == OrderPlant::ConfirmBelowUnsure, "{plant:?}");
            // An entry above the refused resend confirms it again: here c9's resend, stored
            // by another node (c9 refused here holds the pair back until it is stored, see
            // `refused_unstored`).
            let above = if live { "c12" } else { "c9" };
            m.pushed(
                "bob".into(),
                4 << 40,
                message(12, above).stored(),
                NOW,
                WALL,
            );
            m.take_effects();
            m.deliver(message(13, "c13"), NOW, Some(0));
            assert!(!told(&m.take_effects()).contains(&"c13:refused".to_string()));
        }
    }

    /// After a resend refused as possibly stored, the pair's next message would be shown live
    /// before it (found by the simulation with several nodes, seed 4196343830758426020): it
    /// is refused for now too, other senders still go live, and once the store answers a
    /// later write of the pair, the pair goes live again.
    /// (Planted `LivePastUnsure`: c9 goes live.)
    #[test]
    fn after_a_resend_that_may_be_stored_the_pairs_next_messages_wait_for_the_store() {
        let mut planted = bob_online_and_store_down();
        planted.plant_order_bug(OrderPlant::LivePastUnsure);
        let mut m = bob_online_and_store_down();
        for m in [&mut planted, &mut m] {
            let mut resent = message(8, "c8");
            resent.resent = true;
            m.deliver(resent, NOW, Some(0));
            assert_eq!(told(&m.take_effects()), ["c8:refused"]);
            m.deliver(message(9, "c9"), NOW, Some(0));
        }
        assert!(matches!(&planted.take_effects()[..], [MirrorEffect::Feed(u)] if u == "bob"));
        assert_eq!(told(&m.take_effects()), ["c9:refused"], "not live past c8");
        another_sender_goes_live_and_is_acked(&mut m, 10, "d1");
        // The store answers again: the pair's next write, c9 resent, goes to it and is
        // answered (c9, refused, held the pair back until stored: see `refused_unstored`).
        m.batch_answered(true);
        let mut c9_resent = message(11, "c9");
        c9_resent.resent = true;
        m.deliver(c9_resent, NOW, Some(0));
        let [write]: [Message; 1] = appends(m.take_effects()).try_into().ok().unwrap();
        m.appended(write, stored(), NOW, WALL);
        assert_eq!(told(&m.take_effects()), ["c9:accepted"]);
        // Down again once its entry came on the channel (stored after d1 went live, so above
        // its position): ann's messages go live again.
        let c11 = message(11, "c9").stored();
        m.pushed("bob".into(), 3 << 40, c11, NOW, WALL);
        m.take_effects();
        m.batch_answered(false);
        m.deliver(message(12, "c12"), NOW, Some(0));
        assert!(
            matches!(&m.take_effects()[..], [MirrorEffect::Feed(u)] if u == "bob"),
            "live again"
        );
    }
}
