//! The shard's glue to its store (issue 15): it owns the store link (embedded or Redis, one
//! request/reply path), turns every store reply into a call on the machine that waits for it
//! (the one dispatch: the inbox mirror, rooms, presence, ids), and performs what the inbox
//! mirror asks for ([`MirrorEffect`]). The rules of the mirror live in `mirror.rs`.
//!
//! Redis (`redis_url` set) answers from its thread; the embedded store
//! (`store/embedded.rs`) answers in the shard's turn, through the same replies. Other nodes
//! exist only with Redis: [`Shard::store_shared`] is the one place that asks.

use super::deliver::Owing;
use super::mirror::MirrorEffect;
#[cfg(test)]
pub(crate) use super::mirror::OrderPlant;
use super::Shard;
use crate::delivery::ids::{Claimed, IdGrant, MessageIds};
use crate::delivery::message::{Message, Report};
use crate::store::redis::{StoreLink, StoreOp, StoreReply};
use crate::store::{InboxSeq, Store, StoreCaps, StoredMessage};

/// In-process answers heard per round of [`Shard::hear_store_now`] (each round may ask more).
const HEARD_PER_ROUND: usize = 256;

/// The shard's store link and what the shard keeps about it outside the mirror.
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
    /// When shard 0 last queued a lease refresh (None: not yet).
    last_lease_ms: Option<u64>,
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

    pub fn new(link: Box<dyn Store>) -> Self {
        StoreClient {
            caps: link.caps(),
            hearing: false,
            heard: Vec::new(),
            link,
            last_lease_ms: None,
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
        self.mirror.for_store(self.store_shared());
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
        if let Some(held) = self.msg_ids.claim_due(now) {
            let claim = StoreOp::ClaimIdSlot {
                held,
                asked_at: now,
            };
            if self.store.link.submit(claim).is_err() {
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
        self.mirror.ready(user)
    }

    /// A device of `user` started its session: make sure the user's inbox gets loaded.
    pub(super) fn ensure_mirror(&mut self, user: &str, now: u64) {
        self.mirror.ensure(user);
        self.perform_mirror(now, None);
    }

    /// The last device of `user` here left: drop the mirror.
    pub(super) fn release_mirror(&mut self, user: &str, now: u64) {
        // With a shared store, what the user received is kept there at each ack (the next
        // load reads it) and the user may read on another node meanwhile: forgotten here.
        // This shard is the only place that knows it otherwise.
        if self.store_shared() {
            self.receipts.forget(user);
        }
        self.reads_waiting.take(user);
        self.mirror.released(user);
        self.perform_mirror(now, None);
    }

    /// Nothing of the store waits on this shard's tick (the mirror is quiet, no in-process
    /// answer is due, the id slot is held). The periodic lease and id-slot renewals are then
    /// all the tick has to do.
    pub(super) fn store_quiet(&self) -> bool {
        !self.store.link.has_answers_now()
            && self.mirror.quiet()
            && (!self.store.caps.shared || self.metrics.id_slot_held.get() == 1)
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
        self.mirror.tick(now, self.clock.wall_ms());
        self.perform_mirror(now, None);
    }

    /// On the recipient's home shard: make the message safe, tell its sender, feed the
    /// devices (see `mirror.rs`). `current`: the connection being polled right now (it writes
    /// its own output).
    pub(super) fn deliver(&mut self, msg: Box<Message>, now: u64, current: Option<usize>) {
        let devices = self.devices_of(&msg.to);
        let here = (!devices.is_empty()).then(|| {
            let furthest = devices.iter().map(|&d| self.conns[d].reader.furthest());
            furthest.max().unwrap_or(0)
        });
        self.mirror.deliver(msg, now, here);
        self.perform_mirror(now, current);
    }

    /// A device acked entry `seq` of `user`, the first here to do so (see
    /// [`super::mirror::InboxMirror::acked`]).
    pub(super) fn store_acked(&mut self, user: &str, seq: InboxSeq, delivered: Report, now: u64) {
        self.mirror.acked(user, seq, delivered);
        self.perform_mirror(now, None);
    }

    /// Queue an operation; it comes back when the queue is full (or the store does not
    /// serve it).
    pub(super) fn submit_store_op(&mut self, op: StoreOp) -> Result<(), StoreOp> {
        self.store.link.submit(op)
    }

    /// Do what the mirror asked, in order (what doing it asks of the mirror again, too).
    /// `current`: the connection being polled, which writes its own output.
    fn perform_mirror(&mut self, now: u64, current: Option<usize>) {
        while self.mirror.has_effects() {
            let mut effects = self.mirror.take_effects();
            for effect in effects.drain(..) {
                match effect {
                    MirrorEffect::Tell(report) => self.report(report),
                    MirrorEffect::TellBoxed(report) => self.report_boxed(report),
                    MirrorEffect::Store(op) => {
                        if let Err(op) = self.store.link.submit(op) {
                            self.mirror.store_refused(op, now);
                        }
                    }
                    MirrorEffect::Feed(user) => {
                        for device in self.devices_of(&user) {
                            self.pump(device, now);
                            if Some(device) != current {
                                self.kick(device);
                            }
                        }
                    }
                    MirrorEffect::Received { user, received } => {
                        for (sender, id) in &received {
                            self.receipts.sent(&user, sender, *id);
                        }
                    }
                    MirrorEffect::Loaded(user) => {
                        // `read`s that came before the load: judged now that what the user
                        // received is known.
                        for (index, serial, sender, id) in self.reads_waiting.take(&user) {
                            if self.is_live(index, serial) {
                                self.on_read(index, sender, id, now);
                                self.kick(index);
                            }
                        }
                    }
                    MirrorEffect::Owed {
                        user,
                        entries,
                        passed,
                    } => {
                        let shared = |list: Vec<(InboxSeq, StoredMessage)>| -> Vec<_> {
                            list.into_iter()
                                .map(|(s, m)| (s, std::rc::Rc::new(m)))
                                .collect()
                        };
                        let mut owed_to = super::users::Devices::new();
                        let (left, passed) = (shared(entries), shared(passed));
                        self.owe_devices(&user, None, &left, Owing::LeftInbox, &mut owed_to);
                        self.owe_devices(&user, None, &passed, Owing::PassedBelow, &mut owed_to);
                        self.pump_owed(owed_to, now);
                    }
                    MirrorEffect::Push(item) => self.offer_push(*item),
                }
            }
            self.mirror.give_back(effects);
        }
    }

    /// What the store answered: each reply to the machine that waits for it.
    pub fn on_store_reply(&mut self, reply: StoreReply, now: u64) {
        let wall = self.clock.wall_ms();
        match reply {
            StoreReply::Appended { msg, result } => self.mirror.appended(*msg, result, now, wall),
            StoreReply::Removed {
                user,
                seq,
                ran,
                ok,
                report,
            } => self.mirror.removed(user, seq, ran, ok, report),
            StoreReply::Done => {}
            StoreReply::ReadMarked { user, token } => {
                self.mirror.read_marked(user, token, now, wall)
            }
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
            } => self.mirror.resolved((to, from), writes, landed, now, wall),
            StoreReply::Presence { ask, users, online } => {
                self.on_presence_directory(ask, users, online, now)
            }
            StoreReply::PresenceChanged { user, runs } => self.on_presence_changed(user, runs, now),
            StoreReply::Pushed { user, seq, msg } => {
                if self.store_shared() {
                    self.metrics.cross_node_in.inc();
                }
                self.mirror.pushed(user, seq, msg, now, wall)
            }
            StoreReply::RemoteReport(report) => {
                self.metrics.cross_node_in.inc();
                self.on_report(*report);
            }
            StoreReply::Resync => {
                self.mirror.resynced();
                self.perform_mirror(now, None);
                self.watch_resync();
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
            } => self.mirror.loaded(user, token, result, now, wall),
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
                self.mirror.batch_answered(error.is_none());
            }
        }
        self.perform_mirror(now, None);
    }

    #[cfg(test)]
    pub(crate) fn plant_order_bug(&mut self, plant: OrderPlant) {
        self.mirror.plant_order_bug(plant);
    }

    /// Whether the simulation planted this bug.
    #[cfg(test)]
    pub(super) fn planted(&self, plant: OrderPlant) -> bool {
        self.mirror.planted(plant)
    }
}
