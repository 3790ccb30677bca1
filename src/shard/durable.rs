//! The shard's side of its store, one path for both kinds (issue 15): the store is the
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
//!   the read already holds are ignored; pushes during the read wait for it.
//! * Pushes are taken only by mirrors loaded in the current *epoch*: every resync (the
//!   channel subscribed again, or this node's lease had lapsed) starts one and reloads every
//!   mirror, so a mirror that may have missed a push never gets later ones before it. A
//!   reload never brings back an entry acked while it ran.
//! * An ack removes the entry from the mirror (first device wins, as in embedded mode) and
//!   from Redis (XDEL, in a later batch; if that cannot be queued the entry is delivered
//!   again later and the client drops it by `(from, cid)`).
//! * The user's last device leaves: the mirror is dropped (Redis still holds everything).
//! * Redis down: the store refuses in bounded time (`redis_timeout_ms`), senders to offline
//!   users get `unavailable`, loads are retried every `LOAD_RETRY_MS`; fred reconnects by
//!   itself, and a shard that has nothing to write probes every `PROBE_MS` to learn it is back.
//! * Live delivery while Redis is down: a message for a user online here (mirror loaded) is
//!   put after everything the mirror ever held (`append_live`) and sent to the devices from
//!   memory; it is *not* accepted yet. The first device's ack makes it safe (SPEC 4: "a
//!   recipient device acknowledged it"): the sender gets `accepted` and `delivered` together.
//!   These *live* entries form a tail per user, bounded by `window`; while a user has one,
//!   new messages to that user join it even if Redis is back, so per-sender order holds
//!   (a durable entry is never placed before a live one). When the user's last device leaves
//!   with live entries unacked, they are appended to Redis in order; if Redis still refuses,
//!   their senders get `unavailable` and resend with the same cid.
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

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};

use compact_str::CompactString;

use super::Shard;
use crate::delivery::ids::{Claimed, IdGrant, MessageIds};
use crate::delivery::message::{Message, Outcome, Report, StoreWrite};
use crate::delivery::refusal::SendRefusal;
use crate::store::redis::{self as store, Appended, Fate, Loaded, StoreLink, StoreOp, StoreReply};
use crate::store::{InboxSeq, Store, StoreCaps, StoreError, StoredMessage};

/// How long a failed inbox load waits before it is tried again.
const LOAD_RETRY_MS: u64 = 500;
/// How often a shard that believes Redis is down checks whether it is back.
const PROBE_MS: u64 = 500;
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

/// Writes kept in doubt per pair of users; beyond it, writes to the pair are refused unsent
/// until a resolve clears them (memory stays bounded while Redis is away).
const MAX_DOUBTS_PER_PAIR: usize = 1024;
/// In-process answers heard per round of [`Shard::hear_store_now`] (each round may ask more).
const HEARD_PER_ROUND: usize = 256;

/// (recipient, sender): the pair of users whose writes keep their order.
type Pair = (CompactString, CompactString);

/// The state of one online user's mirror. `epoch`: the shard's channel epoch when the load
/// was submitted; pushes from other nodes are taken only by mirrors of the current epoch (a
/// mirror loaded before this node's channel was heard may lack an entry whose push was lost,
/// and adding later pushes to it would put them before that entry).
enum Mirror {
    /// A load was submitted. Boxed: a mirror is one entry per online user, and most are
    /// `Ready` (16 bytes instead of 72 each, in a map as large as the shard's users).
    Loading(Box<Loading>),
    /// The last load failed; retried on a tick at or after `retry_at`.
    Failed { retry_at: u64 },
    /// This node's channel has not been heard yet (epoch 0): loaded by the first resync.
    AwaitingChannel,
    /// The mirror holds what Redis holds for this user.
    Ready { epoch: u64 },
}

/// A mirror's load in flight; answers to other tokens are stale.
struct Loading {
    token: u64,
    epoch: u64,
    /// Entries other nodes pushed meanwhile (the read may or may not include them; those past
    /// it are added once it answers).
    pushes: Vec<(InboxSeq, StoredMessage)>,
    /// Entries acked meanwhile: the read may predate their delete, and must not bring them
    /// back (they would be sent again).
    acked: Vec<InboxSeq>,
}

/// The shard's side of its store (embedded or Redis, one path): the link, and the state of
/// the mirrors and writes that the rules above keep.
pub struct StoreClient {
    link: Box<dyn Store>,
    /// Asked in one place ([`Shard::store_shared`]): whether other nodes exist.
    caps: StoreCaps,
    /// In-process answers are being heard: an inline poll of a parked connection on the way
    /// leaves what it asked to the loop already running, so answers are heard in the order
    /// asked (as a link delivers them).
    hearing: bool,
    /// The buffer in-process answers are heard through, kept between turns.
    heard: Vec<StoreReply>,
    /// Users online on this shard (at least one device).
    mirrors: HashMap<CompactString, Mirror>,
    next_token: u64,
    /// The last batch succeeded (starts true: the first write finds out).
    up: bool,
    last_probe_ms: u64,
    /// When shard 0 last queued a lease refresh (None: not yet).
    last_lease_ms: Option<u64>,
    /// Live entries per user (see the module doc), by mirror seq, with what reporting needs.
    tails: HashMap<CompactString, BTreeMap<InboxSeq, Message>>,
    /// Appends on their way to Redis, per recipient.
    writing: HashMap<CompactString, u32>,
    /// Users whose mirror is reloaded once Redis answers and their tail is empty.
    reload_wanted: HashSet<CompactString>,
    /// Users with an entry known to be missing from the mirror (it could not be placed): no
    /// later entry is shown, live or from Redis, until the reload reads them all in order.
    missing: HashSet<CompactString>,
    /// Bumped by every resync (this node's channel is heard again, or its lease had lapsed);
    /// 0 until the channel is first heard.
    epoch: u64,
    /// The attempt number of this shard's next inbox write (see the module doc).
    next_attempt: u64,
    /// Writes whose answer was lost, per pair, in attempt order.
    doubts: HashMap<Pair, Vec<Doubt>>,
    /// Pairs with a resolve on its way to Redis.
    resolving: HashSet<Pair>,
    /// Per pair with a write in doubt: the answers of its writes since the first one in
    /// doubt, by attempt (`None`: still in doubt), told in that order as they become known.
    answers_in_order: HashMap<Pair, BTreeMap<u64, Option<Report>>>,
    /// This shard's appends not answered (or in doubt) yet, by the id of the message written,
    /// with its (recipient, sender, cid): an entry of another attempt of the same cid has
    /// another id. An entry of such a write pushed (or loaded) before the answer waits in
    /// `waiting`, and is shown only if the answer (or the resolve) says stored. (Keyed by id:
    /// one short hash per write and answer, not one over three strings.)
    unanswered: HashMap<u64, Written>,
    /// Per user, entries that must wait to enter the mirror, by seq: `Some(id)` waits for the
    /// answer to the write of message `id`, `None` only for the entries before it (see the
    /// module doc).
    waiting: HashMap<CompactString, BTreeMap<InboxSeq, (StoredMessage, Option<u64>)>>,
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
    /// Entries pushed after an entry known missing are shown (the rule of `missing`).
    ShowPastMissing,
    /// A resent cid pays the send limit like a new one (the rule of `is_resend`).
    LimitResends,
    /// A write whose answer was lost is answered `unavailable` at once (as before
    /// 2026-12-05), though it may have landed: resolved later, it is kept if it landed.
    TellDoubtAtOnce,
}

/// What becomes of an entry pushed or read for a mirror.
enum Admit {
    /// Into the mirror now.
    Now,
    /// Into `waiting`, for the answer to this message's write (`Some(id)`) or behind an
    /// entry that waits.
    Wait(Option<u64>),
}

/// (recipient, sender, cid): one message's write.
type Written = (CompactString, CompactString, CompactString);

fn is_write_of(written: &Written, to: &str, from: &str, cid: &str) -> bool {
    written.0 == to && written.1 == from && written.2 == cid
}

impl StoreClient {
    /// Drop what the store's age cap expired (an in-process store; see [`Store::expire`]).
    pub(super) fn expire(&mut self, now: u64) -> usize {
        self.link.expire(now)
    }

    /// Inbox entries the store holds in the shard's memory.
    pub(super) fn held(&self) -> usize {
        self.link.held()
    }

    /// Some entry of `user` waits to enter the mirror: anything newer waits behind it.
    fn has_waiting(&self, user: &str) -> bool {
        self.waiting.get(user).is_some_and(|q| !q.is_empty())
    }

    pub fn new(link: Box<dyn Store>) -> Self {
        StoreClient {
            caps: link.caps(),
            hearing: false,
            heard: Vec::new(),
            link,
            mirrors: HashMap::new(),
            next_token: 0,
            up: true,
            last_probe_ms: 0,
            last_lease_ms: None,
            tails: HashMap::new(),
            writing: HashMap::new(),
            reload_wanted: HashSet::new(),
            missing: HashSet::new(),
            epoch: 0,
            next_attempt: 1,
            doubts: HashMap::new(),
            resolving: HashSet::new(),
            answers_in_order: HashMap::new(),
            unanswered: HashMap::new(),
            waiting: HashMap::new(),
            #[cfg(test)]
            plant: OrderPlant::None,
        }
    }
}

impl Shard {
    /// Redis: the shard's store from now on (the embedded one serves until then).
    pub fn enable_store(&mut self, link: StoreLink) {
        self.use_store(Box::new(link));
    }

    /// Put `store` behind the shard's one store path.
    pub fn use_store(&mut self, store: Box<dyn Store>) {
        self.store = StoreClient::new(store);
        // Rooms keep their history in a shared store (Redis), else on their home shard.
        let shards = self.mesh.as_ref().map_or(1, |m| m.shards());
        self.rooms_home.configure(shards, self.store_shared());
        if self.store_shared() {
            self.presence.share_directory();
            // Several nodes may share the store: ids come from a slot claimed there.
            self.msg_ids = MessageIds::claimed_under(self.shared.cfg.node_lease_ms);
            self.claim_id_slot(self.clock.now_ms());
        }
    }

    /// Whether other nodes share this shard's store (the one question asked of the store's
    /// kind: see [`StoreCaps`]).
    pub(super) fn store_shared(&self) -> bool {
        self.store.caps.shared
    }

    /// Hear the answers an in-process store gives in this turn, through the same reply
    /// handling as Redis's. Called where a turn's input was handled (each event of a
    /// connection, a mesh message, the tick); what those answers ask is answered in the loop.
    pub(super) fn hear_store_now(&mut self, now: u64) {
        if self.store.hearing || !self.store.link.has_answers_now() {
            return;
        }
        self.store.hearing = true;
        // One buffer for every turn (taken while its answers are handled).
        let mut answers = std::mem::take(&mut self.store.heard);
        while self.store.link.has_answers_now() {
            let wall = self.clock.wall_ms();
            self.store
                .link
                .answers_now(now, wall, &mut answers, HEARD_PER_ROUND);
            for answer in answers.drain(..) {
                self.on_store_reply(answer, now);
            }
        }
        self.store.heard = answers;
        self.store.hearing = false;
    }

    /// Ask for (or renew) this shard's message id slot when due; keep the gauge honest.
    fn claim_id_slot(&mut self, now: u64) {
        let d = &mut self.store;
        if let Some(held) = self.msg_ids.claim_due(now) {
            let claim = StoreOp::ClaimIdSlot {
                held,
                asked_at: now,
            };
            if d.link.submit(claim).is_err() {
                self.msg_ids.not_asked();
            }
        }
        let held = self.msg_ids.slot(now).is_some();
        if held != (self.metrics.id_slot_held.get() == 1) {
            self.metrics.id_slot_held.set(held as u64);
            if !held {
                tracing::warn!(shard = self.id, "message id slot not renewed in time: sends get `unavailable` until Redis answers a claim");
            }
        }
    }

    fn on_id_claim(&mut self, answer: Result<IdGrant, String>, asked_at: u64, now: u64) {
        match self.msg_ids.on_claim(answer, asked_at) {
            Claimed::Renewed => {}
            Claimed::Took { slot, from } => {
                tracing::info!(shard = self.id, slot, ?from, "message id slot claimed")
            }
            Claimed::Failed(why) => {
                tracing::debug!(shard = self.id, %why, "message id slot claim failed; retrying")
            }
        }
        self.metrics
            .id_slot_held
            .set(self.msg_ids.slot(now).is_some() as u64);
    }

    /// The doorbell socket the glue watches for store answers (taken once; None: the store
    /// answers in the shard's turn).
    pub fn take_store_bell(&mut self) -> Option<std::os::unix::net::UnixStream> {
        self.store.link.take_bell_reader()
    }

    pub fn clear_store_bell(&self) {
        self.store.link.clear_bell();
    }

    pub fn take_store_replies(&mut self, max: usize) -> Vec<StoreReply> {
        let mut out = Vec::new();
        self.store.link.take_replies(&mut out, max);
        out
    }

    /// `user`'s mirror is loaded.
    pub(super) fn mirror_ready(&self, user: &str) -> bool {
        matches!(self.store.mirrors.get(user), Some(Mirror::Ready { .. }))
    }

    /// A device of `user` started its session: make sure the user's inbox gets loaded.
    pub(super) fn ensure_mirror(&mut self, user: &str, now: u64) {
        let d = &mut self.store;
        if !d.mirrors.contains_key(user) {
            self.load_mirror(user, now);
        }
    }

    /// A device of `user` left: drop the mirror when it was the last one here.
    pub(super) fn release_mirror(&mut self, user: &str) {
        if !self.devices_of(user).is_empty() {
            return;
        }
        let d = &mut self.store;
        d.mirrors.remove(user);
        d.reload_wanted.remove(user);
        d.missing.remove(user);
        d.waiting.remove(user);
        let tail = d.tails.remove(user);
        self.inbox.drop_user(user);
        // With a shared store, what the user received is kept there at each ack (the next
        // load reads it) and the user may read on another node meanwhile: forgotten here.
        // This shard is the only place that knows it otherwise.
        if self.store_shared() {
            self.receipts.forget(user);
        }
        self.reads_waiting.take(user);
        {
            let d = &mut self.store;
            // If it cannot be queued, the entry stays until this run's lease lapses: other
            // nodes then only push into a channel nobody reads, and presence cleans it.
            let _ = d.link.submit(StoreOp::Leave { user: user.into() });
        }
        // Live entries no device acked: make them durable now, in order (or refuse them).
        for (_, msg) in tail.into_iter().flatten() {
            self.metrics.live_spilled.inc();
            self.store_append(Box::new(msg));
        }
    }

    fn load_mirror(&mut self, user: &str, now: u64) {
        let limit = self.shared.cfg.inbox_max_messages;
        let d = &mut self.store;
        if d.epoch == 0 {
            // Not before this node's channel is heard: a mirror read earlier would miss what
            // other nodes push meanwhile (and a device elsewhere may ack it out of Redis before
            // a later read). The first resync loads every waiting mirror.
            d.mirrors.insert(user.into(), Mirror::AwaitingChannel);
            return;
        }
        d.next_token += 1;
        let token = d.next_token;
        let op = StoreOp::Load {
            user: user.into(),
            token,
            limit,
        };
        let state = match d.link.submit(op) {
            Ok(()) => Mirror::Loading(Box::new(Loading {
                token,
                epoch: d.epoch,
                acked: Vec::new(),
                pushes: Vec::new(),
            })),
            Err(_) => Mirror::Failed {
                retry_at: now + LOAD_RETRY_MS,
            },
        };
        // Whatever was missing, the read (or its retry) brings, in order.
        d.missing.remove(user);
        d.mirrors.insert(user.into(), state);
    }

    /// Periodic Redis-mode work: probe while down, wanted reloads, failed loads.
    /// Nothing of the store waits on this shard's tick: Redis up, no user's inbox mirrored or
    /// loading, no write unanswered, in doubt or being resolved, nothing to reload. The
    /// periodic lease and id-slot renewals are then all the tick has to do.
    pub(super) fn store_quiet(&self) -> bool {
        let d = &self.store;
        !d.link.has_answers_now()
            && d.up
            && d.mirrors.is_empty()
            && d.tails.is_empty()
            && d.writing.is_empty()
            && d.reload_wanted.is_empty()
            && d.missing.is_empty()
            && d.doubts.is_empty()
            && d.resolving.is_empty()
            && d.unanswered.is_empty()
            && d.waiting.is_empty()
            && (!d.caps.shared || self.metrics.id_slot_held.get() == 1)
    }

    pub(super) fn store_tick(&mut self, now: u64) {
        if self.store_shared() {
            let d = &mut self.store;
            // Shard 0 keeps this node's lease: other nodes count it alive (presence,
            // directory).
            let lease_due = d
                .last_lease_ms
                .is_none_or(|last| now >= last + self.shared.cfg.node_lease_ms / 3);
            if self.id == 0 && lease_due {
                d.last_lease_ms = Some(now);
                if d.link.submit(StoreOp::Lease).is_ok() {
                    self.metrics.lease_refreshes.inc();
                }
            }
            self.claim_id_slot(now);
        }
        let d = &mut self.store;
        if !d.up && now >= d.last_probe_ms + PROBE_MS {
            d.last_probe_ms = now;
            let _ = d.link.submit(StoreOp::Probe);
        }
        if d.up && !d.reload_wanted.is_empty() {
            let due: Vec<CompactString> = d
                .reload_wanted
                .iter()
                // A mirror still loading is read again once it has loaded (its read may
                // have missed what was wanted): kept in `reload_wanted` until then.
                .filter(|u| {
                    !d.tails.contains_key(*u)
                        && !matches!(d.mirrors.get(*u), Some(Mirror::Loading(_)))
                })
                .cloned()
                .collect();
            for user in in_stable_order(due) {
                {
                    let d = &mut self.store;
                    d.reload_wanted.remove(&user);
                }
                if self.mirror_ready(&user) {
                    self.load_mirror(&user, now);
                }
            }
        }
        self.retry_loads(now);
        self.resolve_doubts();
    }

    /// Once Redis answers, every pair's writes in doubt are resolved (one call per pair).
    fn resolve_doubts(&mut self) {
        let d = &mut self.store;
        if !d.up || d.doubts.len() == d.resolving.len() {
            return;
        }
        let due: Vec<Pair> = d
            .doubts
            .keys()
            .filter(|p| !d.resolving.contains(*p))
            .cloned()
            .collect();
        for pair in in_stable_order(due) {
            let d = &mut self.store;
            let op = StoreOp::Resolve {
                to: pair.0.clone(),
                from: pair.1.clone(),
                writes: d.doubts[&pair].iter().map(Doubt::write).collect(),
            };
            if d.link.submit(op).is_ok() {
                d.resolving.insert(pair);
            }
        }
    }

    /// Retry the loads that failed.
    fn retry_loads(&mut self, now: u64) {
        let d = &mut self.store;
        let due: Vec<CompactString> = d
            .mirrors
            .iter()
            .filter(|(_, m)| matches!(m, Mirror::Failed { retry_at } if *retry_at <= now))
            .map(|(u, _)| u.clone())
            .collect();
        for user in in_stable_order(due) {
            self.load_mirror(&user, now);
        }
    }

    /// On the recipient's home shard: make the message safe (to the store first, or live from
    /// memory while Redis is away: see the module doc), then tell the sender and feed the
    /// devices. `current`: the connection being polled right now (it writes its own output).
    pub(super) fn deliver(&mut self, msg: Box<Message>, now: u64, current: Option<usize>) {
        let d = &mut self.store;
        let tail_len = d.tails.get(&msg.to).map_or(0, |t| t.len());
        let missing = d.missing.contains(&msg.to);
        if missing && tail_len > 0 {
            // Neither live (it would be shown before the missing entry) nor to Redis (it
            // would be placed before the live ones): once the tail is acked, the reload.
            self.metrics.store_refused.inc();
            return self.report(msg.refused(SendRefusal::Busy(
                "the recipient's inbox is being read again, resend later",
            )));
        }
        // Live only when no write for this user is on its way to Redis: a write confirmed
        // later would land behind the live entry, out of order.
        let live = tail_len > 0
            || (!missing
                && !d.up
                && !d.writing.contains_key(&msg.to)
                && self.mirror_ready(&msg.to)
                && !self.devices_of(&msg.to).is_empty());
        if !live {
            return self.store_append(msg);
        }
        if msg.resent {
            // Another attempt of it may be in Redis (stored by an earlier connection's shard
            // or a node that died): shown live under a new id, its sender would be told an
            // id and a place other than the ones its recipient sees. It waits for Redis.
            self.metrics.store_refused.inc();
            return self.report(msg.refused(SendRefusal::Busy(
                "the offline store is unavailable and this resent message may be in it already; resend later",
            )));
        }
        if tail_len >= self.shared.cfg.window as usize {
            self.metrics.store_refused.inc();
            return self.report(msg.refused(SendRefusal::Busy(
                "the offline store is unavailable and the recipient has a window of unacknowledged messages already; resend later",
            )));
        }
        self.metrics.live_sends.inc();
        let to = msg.to.clone();
        let seq = self.inbox.append_live(&to, msg.stored(), now);
        {
            let d = &mut self.store;
            d.tails.entry(to.clone()).or_default().insert(seq, *msg);
        }
        for device in self.devices_of(&to) {
            self.pump(device, now);
            if Some(device) != current {
                self.kick(device);
            }
        }
    }

    /// A device acked entry `seq` of `user`, the first here to do so. A live entry is now
    /// safe: its sender gets `accepted` here, then `delivered`. A durable one leaves Redis;
    /// `delivered` goes out when Redis confirms this delete removed it.
    pub(super) fn store_acked(&mut self, user: &str, seq: InboxSeq, delivered: Report) {
        let d = &mut self.store;
        if let Some(Mirror::Loading(loading)) = d.mirrors.get_mut(user) {
            loading.acked.push(seq);
        }
        let live = d.tails.get_mut(user).and_then(|tail| tail.remove(&seq));
        let Some(msg) = live else {
            return self.store_remove(user, seq, Some(delivered));
        };
        if d.tails.get(user).is_some_and(|t| t.is_empty()) {
            d.tails.remove(user);
        }
        self.metrics.live_acked.inc();
        let id = msg.id;
        self.report(msg.report(id, Outcome::Stored));
        self.report(delivered);
    }

    /// Queue an operation; it comes back when the queue is full (or the store does not
    /// serve it).
    pub(super) fn submit_store_op(&mut self, op: StoreOp) -> Result<(), StoreOp> {
        self.store.link.submit(op)
    }

    /// The store sends a message to Redis (queued for the shard's next batch).
    pub(super) fn store_append(&mut self, mut msg: Box<Message>) {
        let d = &mut self.store;
        // No key is built in the common case: nothing in doubt on this shard.
        let in_doubt = || {
            d.doubts
                .get(&(msg.to.clone(), msg.from.clone()))
                .map_or(0, Vec::len)
        };
        if !d.doubts.is_empty() && in_doubt() >= MAX_DOUBTS_PER_PAIR {
            self.metrics.store_refused.inc();
            return self.report(msg.refused(SendRefusal::Busy(
                "earlier writes to this recipient are still in doubt; resend later",
            )));
        }
        msg.write = StoreWrite {
            attempt: d.next_attempt,
        };
        d.next_attempt += 1;
        let to = msg.to.clone();
        let written = (to.clone(), msg.from.clone(), msg.cid.clone());
        let id = msg.id;
        match d.link.submit(StoreOp::Append(msg)) {
            Ok(()) => {
                *d.writing.entry(to).or_default() += 1;
                d.unanswered.insert(id, written);
            }
            Err(StoreOp::Append(msg)) => {
                self.metrics.store_refused.inc();
                self.report(msg.refused(SendRefusal::Busy(
                    "the offline store is busy or unreachable, resend later",
                )));
            }
            Err(_) => unreachable!("a refused submit returns its own op"),
        }
    }

    /// An entry was acked: remove it from Redis too (and then report `delivered`). If the
    /// remove cannot be queued the entry is delivered again later and acked again; the
    /// client drops the copy by `(from, cid)`.
    fn store_remove(&mut self, user: &str, seq: InboxSeq, delivered: Option<Report>) {
        let d = &mut self.store;
        let op = StoreOp::Remove {
            user: user.into(),
            seq,
            report: delivered.map(Box::new),
        };
        if d.link.submit(op).is_err() {
            self.metrics.redis_removes_dropped.inc();
        }
    }

    /// What the store answered.
    pub fn on_store_reply(&mut self, reply: StoreReply, now: u64) {
        match reply {
            StoreReply::Appended { msg, result } => self.on_appended(*msg, result, now),
            StoreReply::Removed { ok, report } => {
                if let (true, Some(report)) = (ok, report) {
                    self.report_boxed(report);
                }
            }
            StoreReply::Done => {}
            StoreReply::IdSlot { asked_at, answer } => self.on_id_claim(answer, asked_at, now),
            StoreReply::Typing { from, to } => {
                self.metrics.cross_node_in.inc();
                self.typing_here(&from, &to)
            }
            StoreReply::Resolved {
                to,
                from,
                writes,
                landed,
            } => self.on_resolved((to, from), writes, landed, now),
            StoreReply::Presence { ask, users, online } => {
                self.on_presence_directory(ask, users, online, now)
            }
            StoreReply::PresenceChanged { user, runs } => self.on_presence_changed(user, runs, now),
            StoreReply::Pushed { user, seq, msg } => {
                if self.store_shared() {
                    self.metrics.cross_node_in.inc();
                }
                self.on_pushed(user, seq, msg, now)
            }
            StoreReply::RemoteReport(report) => {
                self.metrics.cross_node_in.inc();
                self.on_report(*report);
            }
            StoreReply::Resync => {
                self.on_resync(now);
                self.ask_pending_joins_again(now);
            }
            StoreReply::RoomPublished { post, result } => {
                self.on_room_published(*post, result, now)
            }
            StoreReply::RoomJoinFailed(ask) => self.on_room_join_failed(*ask, now),
            StoreReply::RoomMessage { room, offset, msg } => {
                self.metrics.cross_node_in.inc();
                self.on_room_pushed(room, offset, msg, now)
            }
            StoreReply::RoomJoinAnswer {
                ask,
                last,
                recovered,
                replay,
            } => self.on_room_join_answer(*ask, last, recovered, replay, now),
            StoreReply::Loaded {
                user,
                token,
                result,
            } => self.on_loaded(user, token, result, now),
            StoreReply::Batch {
                ops,
                latency,
                error,
                expired,
                breaker_open,
            } => {
                self.metrics.redis_breaker_open.set(breaker_open as u64);
                self.metrics.inbox_expired.add(expired);
                self.metrics.redis_batches.inc();
                self.metrics.redis_ops.add(ops as u64);
                self.metrics.redis_latency.observe(latency);
                if error.is_some() {
                    self.metrics.redis_errors.inc();
                }
                self.metrics.redis_up.set(error.is_none() as u64);
                {
                    let d = &mut self.store;
                    d.up = error.is_none();
                }
            }
        }
    }

    fn on_appended(&mut self, msg: Message, result: Result<Appended, StoreError>, now: u64) {
        match result {
            Err(StoreError::Unavailable(why)) if msg.write.attempt > 0 => {
                self.keep_in_doubt(msg, why)
            }
            result => {
                let (attempt, report) = self.settle_write(msg, result, now);
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
        let planted = self.planted_tell_doubt_at_once();
        if planted {
            let refused = SendRefusal::Store(StoreError::Unavailable(why.clone()));
            self.report(msg.clone().refused(refused));
        }
        let d = &mut self.store;
        if !planted {
            let order = d.answers_in_order.entry(pair.clone()).or_default();
            order.insert(msg.write.attempt, None);
        }
        let doubt = Doubt {
            msg: Box::new(msg),
            why,
        };
        d.doubts.entry(pair).or_default().push(doubt);
    }

    /// A write's answer is known (from the store, or by resolving it): its entry may show;
    /// returns its attempt and what its sender is to be told.
    fn settle_write(
        &mut self,
        msg: Message,
        result: Result<Appended, StoreError>,
        now: u64,
    ) -> (u64, Report) {
        {
            let d = &mut self.store;
            if let Entry::Occupied(mut writes) = d.writing.entry(msg.to.clone()) {
                *writes.get_mut() -= 1;
                if *writes.get() == 0 {
                    writes.remove();
                }
            }
            // An entry of this write that came before its answer: shown (in its turn) if it
            // is stored, never if not (then it cannot exist: the answer or the resolve ran
            // in the same call as the write, or after its attempt was fenced).
            if let Entry::Occupied(entry) = d.unanswered.entry(msg.id) {
                if is_write_of(entry.get(), &msg.to, &msg.from, &msg.cid) {
                    entry.remove();
                }
            }
            if let Some(queue) = d.waiting.get_mut(&msg.to) {
                match result {
                    Ok(_) => queue
                        .values_mut()
                        .filter(|(_, awaited)| *awaited == Some(msg.id))
                        .for_each(|(_, awaited)| *awaited = None),
                    Err(_) => queue.retain(|_, (_, awaited)| *awaited != Some(msg.id)),
                }
                self.release_waiting(msg.to.clone(), now);
            }
        }
        let attempt = msg.write.attempt;
        let report = match result {
            Ok(Appended::Stored {
                pushed,
                offline,
                seq,
            }) => {
                self.metrics.stored.inc();
                // Nobody holds a device anywhere; the store told this shard alone. A shared
                // store is asked whether the entry is still there before the push goes out;
                // an embedded one's push is cancelled by the ack instead.
                let shared = self.store_shared();
                if offline {
                    self.offer_push(&msg, shared.then_some(seq));
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
                msg.report(id, Outcome::Stored)
            }
            Err(e) => {
                self.metrics.store_refused.inc();
                msg.refused(SendRefusal::Store(e))
            }
        };
        (attempt, report)
    }

    /// Tell a write's answer: an `accepted` after the answers of the pair's earlier writes
    /// in doubt; a refusal at once (nothing was taken, so it has no place in the order).
    fn tell_in_order(&mut self, attempt: u64, report: Report) {
        let d = &mut self.store;
        // The common case: no write in doubt anywhere here, no key built.
        if d.answers_in_order.is_empty() {
            return self.report(report);
        }
        let pair: Pair = (report.to.clone(), report.from.clone());
        let Some(order) = d.answers_in_order.get_mut(&pair) else {
            return self.report(report);
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
            d.answers_in_order.remove(&pair);
        }
        for report in ready {
            self.report(report);
        }
    }

    /// A resolve was answered: each write it named had landed (kept, answered `accepted`),
    /// or never will but its cid is stored by another attempt (answered `accepted` with that
    /// id: an earlier run's or a dead node's entry, which lies before anything this run
    /// stored after it), or never will (answered `unavailable`). Failed: the tick asks again.
    fn on_resolved(
        &mut self,
        pair: Pair,
        writes: Vec<(Box<str>, u64)>,
        landed: Option<Vec<Fate>>,
        now: u64,
    ) {
        let d = &mut self.store;
        d.resolving.remove(&pair);
        let Some(landed) = landed else {
            return;
        };
        let Some(doubts) = d.doubts.get_mut(&pair) else {
            return;
        };
        let mut settled = Vec::with_capacity(writes.len());
        for (write, landed) in writes.iter().zip(landed) {
            if let Some(at) = doubts.iter().position(|d| d.is(write)) {
                settled.push((doubts.remove(at), landed));
            }
        }
        if doubts.is_empty() {
            d.doubts.remove(&pair);
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
            let (attempt, report) = self.settle_write(*msg, result, now);
            // (Planted) its sender was told `unavailable` already.
            if !told_at_once {
                self.tell_in_order(attempt, report);
            }
        }
    }

    /// Another node appended an entry to the inbox of a user homed here: put it in the
    /// mirror like a confirmed local append. A mirror still loading may or may not see it in
    /// its read: it is read again once loaded.
    fn on_pushed(&mut self, user: CompactString, seq: InboxSeq, msg: StoredMessage, now: u64) {
        let d = &mut self.store;
        let current = d.epoch;
        match d.mirrors.get(&user) {
            // (No mirror is read before the first epoch: see `load_mirror`.)
            Some(Mirror::Ready { epoch }) if *epoch == current => {}
            Some(Mirror::Loading(loading)) if loading.epoch == current => {}
            // Not online here, a failed load that reads everything when retried, or a mirror
            // of an earlier epoch (being reloaded since the resync).
            _ => return,
        }
        // Judged now, also while the mirror loads: by the time the load answers, the write
        // of this entry may have been answered.
        match self.admit_entry(&user, &msg) {
            Admit::Now => self.add_to_mirror(user, seq, msg, now, false),
            Admit::Wait(awaited) => self.wait(user, seq, msg, awaited),
        }
    }

    /// Whether an entry pushed or read for `user`'s mirror may go in now: not one of this
    /// shard's writes still unanswered or in doubt (it waits for the answer or the resolve),
    /// nor one behind an entry that waits.
    fn admit_entry(&mut self, user: &CompactString, msg: &StoredMessage) -> Admit {
        let d = &mut self.store;
        // The common case (always, with the embedded store, once its answer came): nothing
        // unanswered (or in doubt) or waiting; no keys are built.
        if d.unanswered.is_empty() && !d.has_waiting(user) {
            return Admit::Now;
        }
        if d.unanswered
            .get(&msg.id)
            .is_some_and(|w| is_write_of(w, user, &msg.from, &msg.cid))
        {
            return Admit::Wait(Some(msg.id));
        }
        if d.has_waiting(user) {
            return Admit::Wait(None);
        }
        Admit::Now
    }

    /// The simulation's planted `TellDoubtAtOnce` (always false outside tests).
    fn planted_tell_doubt_at_once(&self) -> bool {
        #[cfg(test)]
        return self.store.plant == OrderPlant::TellDoubtAtOnce;
        #[cfg(not(test))]
        false
    }

    #[cfg(test)]
    pub(crate) fn plant_order_bug(&mut self, plant: OrderPlant) {
        {
            let d = &mut self.store;
            d.plant = plant;
        }
    }

    /// Whether the simulation planted this bug.
    #[cfg(test)]
    pub(super) fn planted(&self, plant: OrderPlant) -> bool {
        self.store.plant == plant
    }

    fn wait(
        &mut self,
        user: CompactString,
        seq: InboxSeq,
        msg: StoredMessage,
        awaited: Option<u64>,
    ) {
        {
            let d = &mut self.store;
            d.waiting
                .entry(user)
                .or_default()
                .insert(seq, (msg, awaited));
        }
    }

    /// Let into the mirror, in order, the waiting entries of `user` that wait for nothing
    /// before them.
    fn release_waiting(&mut self, user: CompactString, now: u64) {
        loop {
            let d = &mut self.store;
            let Some(queue) = d.waiting.get_mut(&user) else {
                return;
            };
            let Some(entry) = queue.first_entry() else {
                d.waiting.remove(&user);
                return;
            };
            if entry.get().1.is_some() {
                return; // the first still waits for its answer
            }
            let (seq, (msg, _)) = entry.remove_entry();
            self.add_to_mirror(user.clone(), seq, msg, now, true);
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
        held: bool,
    ) {
        let window = self.shared.cfg.window as usize;
        let d = &mut self.store;
        match d.mirrors.get_mut(&user) {
            Some(Mirror::Ready { epoch }) if *epoch == d.epoch => {}
            // Waits for the read (which may hold it already, see `on_loaded`).
            Some(Mirror::Loading(loading)) if loading.epoch == d.epoch => {
                if d.missing.contains(&user) {
                    // Missing since the read went out: read again.
                    return;
                }
                if loading.pushes.len() < window {
                    loading.pushes.push((seq, msg));
                } else {
                    // A long load under a stream of pushes: read again instead of holding more.
                    d.reload_wanted.insert(user);
                }
                return;
            }
            _ => return,
        }
        // An entry found missing waits for the reload that reads it; one after it, added
        // now, would be shown before it (found by the simulation's writer on another node,
        // seed 7924047624999685062: a pushed entry below live ones waited for the reload,
        // and its sender's next one, above them, was shown first).
        #[cfg(test)]
        let planted = d.plant == OrderPlant::ShowPastMissing;
        #[cfg(not(test))]
        let planted = false;
        if d.missing.contains(&user) && !planted {
            return;
        }
        let age = self.clock.wall_ms().saturating_sub(store::seq_time_ms(seq));
        // Not added: the mirror holds it already (a load read it before the push came) or
        // was given it and it was acked; or a live entry sits above it (Redis was away here):
        // only then can it be missing, and a reload finds it.
        if !self
            .inbox
            .insert_at(&user, seq, msg, now.saturating_sub(age))
        {
            // A held entry below a later one (another sender's) is missing too.
            if held || d.tails.contains_key(&user) {
                d.reload_wanted.insert(user.clone());
                d.missing.insert(user);
            }
            return;
        }
        for device in self.devices_of(&user) {
            self.pump(device, now);
            self.kick(device);
        }
    }

    /// Pushes may have been missed: a new epoch, and every online user's inbox is read again
    /// now (each load also registers the user in the directory again). A user with live
    /// entries out is read once they are acked or spilled (a reload would not keep them).
    fn on_resync(&mut self, now: u64) {
        let d = &mut self.store;
        d.epoch += 1;
        if d.caps.shared {
            self.metrics.cluster_epoch.set(d.epoch);
        }
        let (now_users, later): (Vec<CompactString>, Vec<CompactString>) = d
            .mirrors
            .keys()
            .cloned()
            .partition(|u| !d.tails.contains_key(u));
        d.reload_wanted.extend(later);
        for user in in_stable_order(now_users) {
            self.load_mirror(&user, now);
        }
        self.watch_resync();
    }

    fn on_loaded(
        &mut self,
        user: CompactString,
        token: u64,
        result: Result<Loaded, StoreError>,
        now: u64,
    ) {
        let d = &mut self.store;
        // Only the newest load of a user still online counts.
        if !matches!(d.mirrors.get(&user), Some(Mirror::Loading(l)) if l.token == token) {
            return;
        }
        match result {
            Ok(Loaded {
                entries,
                expired,
                received,
            }) => {
                for (sender, id) in &received {
                    self.receipts.sent(&user, sender, *id);
                }
                let d = &mut self.store;
                let (pushes, acked) = match d.mirrors.remove(&user) {
                    Some(Mirror::Loading(loading)) => {
                        let Loading {
                            epoch,
                            pushes,
                            acked,
                            ..
                        } = *loading;
                        d.mirrors.insert(user.clone(), Mirror::Ready { epoch });
                        (pushes, acked)
                    }
                    _ => unreachable!("checked to be loading above"),
                };
                if d.caps.shared {
                    self.metrics.redis_loads.inc();
                }
                self.metrics.inbox_expired.add(expired);
                let wall = self.clock.wall_ms();
                // What waited before this read: the read holds what came before its end, and
                // judges it again; what came after waits on as it was.
                let read_end = entries.last().map(|(seq, _)| *seq);
                let before = d.waiting.remove(&user).unwrap_or_default();
                let mut shown = Vec::with_capacity(entries.len());
                for (seq, m) in entries {
                    if acked.contains(&seq) {
                        continue;
                    }
                    match self.admit_entry(&user, &m) {
                        Admit::Now => {
                            let age = wall.saturating_sub(store::seq_time_ms(seq));
                            shown.push((seq, now.saturating_sub(age), m));
                        }
                        Admit::Wait(awaited) => self.wait(user.clone(), seq, m, awaited),
                    }
                }
                self.inbox.replace_user(&user, shown);
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
                    if self.store.has_waiting(&user) {
                        self.wait(user.clone(), seq, msg, None);
                    } else {
                        let age = wall.saturating_sub(store::seq_time_ms(seq));
                        self.inbox
                            .insert_at(&user, seq, msg, now.saturating_sub(age));
                    }
                }
                self.release_waiting(user.clone(), now);
                for device in self.devices_of(&user) {
                    self.pump(device, now);
                    self.kick(device);
                }
                // `read`s that came before the load: judged now that what the user
                // received is known.
                for (index, serial, sender, id) in self.reads_waiting.take(&user) {
                    if self.is_live(index, serial) {
                        self.on_read(index, sender, id, now);
                        self.kick(index);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(shard = self.id, %user, error = %e, "inbox load failed; retrying");
                d.mirrors.insert(
                    user,
                    Mirror::Failed {
                        retry_at: now + LOAD_RETRY_MS,
                    },
                );
            }
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
