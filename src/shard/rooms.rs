//! Rooms on a shard (SPEC sections 3-4): `join`, `leave`, `publish`, fan-out, recovery with
//! `since`, and slow consumers, as two state machines the shard owns and drives (issue 15).
//!
//! Who owns what:
//! * [`RoomHomes`], the **home side**: the rooms homed on this shard (`home_shard(room)`),
//!   each with its [`RoomLog`] (offsets, history, publish dedup) and how many members each
//!   shard has. Every publish goes there, gets its offset, and leaves as **one `Fanout` per
//!   shard with members**, never one per member. With Redis (`history_in_store`) the store
//!   holds the log across nodes and the home relays what this node's channel brings.
//! * [`RoomMembers`], the **member side**: which of this shard's connections joined which
//!   room, and per member the last offset it was given and its slow-consumer state.
//!
//! Both take `now` (and what the shard knows of its connections) and an input, and return
//! [`RoomEffect`]s: frames for connections, room messages for shards (this one included),
//! store operations, API answers. `Shard::perform_rooms` is the one place they are carried
//! out; nothing here touches a socket, the mesh, the store link or a clock.
//!
//! Join: the member is registered here as pending, then the home answers with the current
//! offset and, with `since`, what the history still holds after it (`recovered` says whether
//! that is everything). The home sends the answer before any later fan-out on the same FIFO
//! channel, so a pending member skips fan-outs up to the answer's offset and nothing is shown
//! twice or missed.
//!
//! Slow consumers: a room message that would push a member's outbound buffer past
//! `max_outbound` is skipped for that member, which is told with `gap` (from the first skipped
//! offset of each run of skips; control frames are never dropped) and recovers with
//! `join`+`since`. A member that skips again `slow_close_ms` or more after its first skip,
//! without having emptied its outbound buffer in between, is closed with 1013: it is not
//! keeping up, whatever the kernel's socket buffers absorb meanwhile.

use std::collections::HashMap;
use std::sync::Arc;

use compact_str::CompactString;

use super::msg::{Room, ShardMsg};
use super::{make_ctx, Shard};
use crate::delivery::message::ReplyTo;
use crate::delivery::refusal::SendRefusal;
use crate::delivery::room::{HistoryLimits, RoomLog, RoomMsg};
use crate::mesh;
use crate::metrics::ShardMetrics;
use crate::proto::{self, ErrorCode, FrameError};
use crate::store::redis::{RoomJoinAsk, RoomPost, RoomReply, StoreOp};
use crate::store::{StoreError, StoredMessage};

/// The two clocks a room input may need: `now` (monotonic ms, drives timers and the history's
/// age cap) and the wall clock (message timestamps, a new room's offset base).
#[derive(Debug, Clone, Copy)]
pub struct RoomTime {
    pub now: u64,
    pub wall_ms: u64,
}

/// What the room machines ask the shard to do, in order.
pub enum RoomEffect {
    /// Bytes for a connection of this shard (slab key); the shard wakes it to write them.
    Send { conn: usize, frame: Vec<u8> },
    /// A room message's shared frame for a member.
    SendRoom { conn: usize, msg: Arc<RoomMsg> },
    /// Bytes for a connection only if it is still the one that asked (`serial`).
    Answer {
        conn: usize,
        serial: u32,
        frame: Vec<u8>,
    },
    /// Close a member with 1013 (slow consumer).
    CloseSlow { conn: usize },
    /// A room message for a shard; this shard's own go straight back into the machines.
    ToShard { shard: usize, msg: Room },
    /// A store operation (Redis mode); when it cannot be queued the shard gives it back to
    /// [`RoomHomes::store_refused`].
    Store(StoreOp),
    /// The answer to `POST /api/publish`.
    ApiAnswer {
        reply: tokio::sync::oneshot::Sender<Result<(u64, u64), SendRefusal>>,
        result: Result<(u64, u64), SendRefusal>,
    },
}

pub type Effects = Vec<RoomEffect>;

/// A room homed on this shard.
pub struct HomedRoom {
    log: RoomLog,
    /// Member connections per shard (fan-out goes to shards with at least one).
    members_by_shard: Vec<u32>,
    /// With Redis: the newest offset this node received (pushes come in offset order;
    /// a jump means some were missed). None: not joined (no join answered yet, or the
    /// node's last member left); no offset value stands for it.
    last_pushed: Option<u64>,
    /// With Redis: joins whose answer has not come back on the channel yet (asked again
    /// after a resync: an answer published while the channel was not heard is lost).
    pending_joins: Vec<RoomJoinAsk>,
}

/// The connection a catch-up join names (see `RoomHomes::resynced`): the node itself.
const CATCH_UP: usize = usize::MAX;

/// The home side: rooms whose home is this shard.
pub struct RoomHomes {
    rooms: HashMap<CompactString, HomedRoom>,
    shards: usize,
    /// Redis holds the rooms (across nodes): publishes and joins are store operations,
    /// answered on this node's channel.
    history_in_store: bool,
    limits: HistoryLimits,
    metrics: Arc<ShardMetrics>,
    /// The last join ask's number ([`RoomJoinAsk::token`]).
    join_asks: u64,
    /// No room forgotten here held a message after this offset (embedded history): a room
    /// begun again recovers a `since` from then on (`RoomLog::nothing_before`). `u64::MAX`
    /// until the shard says when it started (earlier runs' offsets lie before that).
    forgotten_through: u64,
}

/// One of this shard's connections in a room.
pub struct Member {
    serial: u32,
    /// False until the home answered the join: fan-outs are skipped meanwhile.
    joined: bool,
    /// An offset was skipped for it since its join was answered: what it was given is no
    /// longer everything up to `last`, so a join again replays in full.
    skipped: bool,
    /// The newest offset this member was given (or skipped past).
    last: u64,
    /// First offset skipped since the member last kept up (a `gap` was sent for it).
    gap_from: Option<u64>,
    /// When the member first skipped since its outbound buffer was last empty (ms).
    over_since: Option<u64>,
}

/// The member side: this shard's connections in each room.
pub struct RoomMembers {
    shard: usize,
    shards: usize,
    members: HashMap<CompactString, HashMap<usize, Member>>,
    /// The rooms each connection joined (to leave them all when it closes).
    rooms_of: HashMap<usize, Vec<CompactString>>,
    max_outbound: usize,
    slow_close_ms: u64,
    metrics: Arc<ShardMetrics>,
    /// A planted bug for the simulation: a skipped message is not announced with `gap`.
    #[cfg(test)]
    pub(crate) plant_no_gap: bool,
}

/// How a member's client frame refusal reads.
fn refusal(code: ErrorCode, message: String, cid: Option<Box<str>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    proto::write_error(&mut out, &FrameError { code, message, cid });
    out
}

impl RoomHomes {
    pub fn new(limits: HistoryLimits, metrics: Arc<ShardMetrics>) -> Self {
        RoomHomes {
            rooms: HashMap::new(),
            shards: 1,
            history_in_store: false,
            limits,
            metrics,
            join_asks: 0,
            forgotten_through: u64::MAX,
        }
    }

    /// The node's shape, known once the mesh and the store are set up.
    /// The shard started at this wall clock time (µs): offsets of earlier runs lie before
    /// it, so a room forgotten in this run held nothing after the newest forgotten message.
    pub fn started_at(&mut self, wall_us: u64) {
        self.forgotten_through = wall_us;
    }

    pub fn configure(&mut self, shards: usize, history_in_store: bool) {
        self.shards = shards;
        self.history_in_store = history_in_store;
    }

    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    fn homed(&mut self, room: &CompactString, t: RoomTime) -> &mut HomedRoom {
        if !self.rooms.contains_key(room) {
            self.metrics.rooms.inc();
        }
        let shards = self.shards;
        let forgotten_through = self.forgotten_through;
        self.rooms.entry(room.clone()).or_insert_with(|| HomedRoom {
            // Microseconds of the wall clock: a restarted gateway never reuses an offset.
            log: RoomLog::new(t.wall_ms * 1000).nothing_before(forgotten_through),
            members_by_shard: vec![0; shards],
            last_pushed: None,
            pending_joins: Vec::new(),
        })
    }

    /// A connection of `shard` joins (`new_member`: it was not a member before).
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &mut self,
        room: CompactString,
        shard: usize,
        conn: usize,
        serial: u32,
        since: Option<u64>,
        new_member: bool,
        t: RoomTime,
    ) -> Effects {
        let limits = self.limits;
        let in_store = self.history_in_store;
        self.join_asks += 1;
        let token = self.join_asks;
        let homed = self.homed(&room, t);
        if new_member {
            homed.members_by_shard[shard] += 1;
        }
        if in_store {
            // Redis holds the room: the answer comes back on this node's channel, in order
            // with the room's messages (see `join_answer`).
            let ask = RoomJoinAsk {
                room,
                since,
                shard,
                conn,
                serial,
                token,
            };
            homed.pending_joins.push(ask.clone());
            return vec![RoomEffect::Store(StoreOp::RoomJoin(Box::new(ask)))];
        }
        let last = homed.log.last();
        let (replay, recovered) = match since {
            Some(since) => {
                let r = homed.log.since(since, t.now, limits);
                (r.replay, r.recovered)
            }
            // Nothing was asked for, so nothing is claimed recovered.
            None => (Vec::new(), false),
        };
        let msg = Room::Joined {
            room,
            conn,
            serial,
            last,
            recovered,
            replay,
        };
        vec![RoomEffect::ToShard { shard, msg }]
    }

    /// One member fewer on `shard`.
    pub fn leave(&mut self, room: &CompactString, shard: usize) -> Effects {
        let Some(homed) = self.rooms.get_mut(room) else {
            return Vec::new();
        };
        homed.members_by_shard[shard] = homed.members_by_shard[shard].saturating_sub(1);
        if self.history_in_store && homed.members_by_shard.iter().all(|n| *n == 0) {
            // This node's last member left: other nodes stop pushing the room here. If it
            // cannot be queued, the pushes that still come are dropped here.
            homed.last_pushed = None;
            return vec![RoomEffect::Store(StoreOp::RoomLeave { room: room.clone() })];
        }
        Vec::new()
    }

    /// Store and fan out a message, then answer `reply`. `next_id`: the shard's next message
    /// id, taken only when one is used (None: it holds no id slot now). A resent `(from, cid)` still in the history gets
    /// its first id and offset, and nothing is sent.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &mut self,
        room: CompactString,
        from: CompactString,
        cid: Box<str>,
        body: Box<str>,
        reply: RoomReply,
        next_id: impl FnOnce() -> Option<u64>,
        t: RoomTime,
    ) -> Effects {
        let ts = t.wall_ms;
        if self.history_in_store {
            let Some(id) = next_id() else {
                self.metrics.store_refused.inc();
                let why = SendRefusal::Busy(crate::delivery::senders::NO_ID_SLOT);
                return self.answer_publish(reply, cid, Err(why));
            };
            let post = RoomPost {
                room,
                from,
                cid,
                body,
                id,
                ts,
                reply,
            };
            return vec![RoomEffect::Store(StoreOp::RoomPublish(Box::new(post)))];
        }
        let mut effects = Vec::new();
        let answer = if let Some(first) = self
            .rooms
            .get(&room)
            .and_then(|h| h.log.duplicate(&from, &cid))
        {
            self.metrics.dedup_hits.inc();
            (first.id, first.offset)
        } else {
            let id = next_id().expect("embedded: a shard's slot is its own for good");
            let limits = self.limits;
            let homed = self.homed(&room, t);
            let stored = StoredMessage {
                id,
                from,
                cid: cid.as_ref().into(),
                ts,
                body: body.into(),
                msg_type: None,
            };
            let msg = homed.log.append(
                |offset| room_msg(&room, offset, stored, t.now),
                t.now,
                limits,
            );
            self.metrics.room_publishes.inc();
            let answer = (msg.id, msg.offset);
            effects.extend(self.fan_out(msg));
            answer
        };
        effects.extend(self.answer_publish(reply, cid, Ok(answer)));
        effects
    }

    /// Tell the publisher how it went: a connection hears `accepted` (or `error`), the API
    /// gets (id, offset) or, when refused, a dropped channel (it answers 503).
    fn answer_publish(
        &mut self,
        reply: RoomReply,
        cid: Box<str>,
        result: Result<(u64, u64), SendRefusal>,
    ) -> Effects {
        match reply {
            RoomReply::Api(reply) => {
                if let Err(why) = &result {
                    self.metrics.refusals[why.source().index()].inc();
                }
                vec![RoomEffect::ApiAnswer { reply, result }]
            }
            RoomReply::Conn(reply) => {
                let shard = reply.shard as usize;
                let msg = Room::Accepted { reply, cid, result };
                vec![RoomEffect::ToShard { shard, msg }]
            }
        }
    }

    /// Redis answered a publish.
    pub fn store_published(
        &mut self,
        post: RoomPost,
        result: Result<(u64, u64), StoreError>,
    ) -> Effects {
        match &result {
            Ok(_) => self.metrics.room_publishes.inc(),
            Err(_) => self.metrics.store_refused.inc(),
        }
        self.answer_publish(post.reply, post.cid, result.map_err(SendRefusal::Store))
    }

    /// An operation from [`RoomEffect::Store`] could not be queued (the shard's store
    /// queue is full, or there is no store).
    pub fn store_refused(&mut self, op: StoreOp) -> Effects {
        match op {
            StoreOp::RoomJoin(ask) => self.join_failed(*ask),
            StoreOp::RoomPublish(post) => {
                // As for a direct send: `Busy`, counted as the gateway's refusal, not the
                // store's answer.
                self.metrics.store_refused.inc();
                let why =
                    SendRefusal::Busy("the offline store is busy or unreachable, resend later");
                self.answer_publish(post.reply, post.cid, Err(why))
            }
            _ => Vec::new(),
        }
    }

    /// Redis could not register a join: the member is refused.
    pub fn join_failed(&mut self, ask: RoomJoinAsk) -> Effects {
        if !self.take_pending_join(&ask) || ask.conn == CATCH_UP {
            return Vec::new(); // (a catch-up is asked again by the next resync)
        }
        let msg = Room::JoinRefused {
            room: ask.room,
            conn: ask.conn,
            serial: ask.serial,
        };
        vec![RoomEffect::ToShard {
            shard: ask.shard,
            msg,
        }]
    }

    /// Forget a pending join; false when it was not pending (answered already).
    fn take_pending_join(&mut self, ask: &RoomJoinAsk) -> bool {
        let Some(homed) = self.rooms.get_mut(&ask.room) else {
            return false;
        };
        // By the ask's number: a second answer to an older ask of the same connection (asked
        // again after a resync) must not take a newer join's place (found by the room
        // simulation in Redis mode: the member was told `recovered: false` and skipped).
        let same = |p: &RoomJoinAsk| p.token == ask.token;
        match homed.pending_joins.iter().position(same) {
            Some(i) => {
                homed.pending_joins.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// After a resync: ask again for every join not answered yet (a second answer to the
    /// same join finds it answered and is ignored), and catch up every room this node was
    /// pushed: what the channel carried while it was not heard is lost, and with nothing
    /// published after it, no later push would show the hole (found by the room simulation in
    /// Redis mode). A catch-up is a join of the node itself since its last push: its answer's
    /// replay is fanned out, or members hear `gap` when the history no longer reaches back.
    pub fn resynced(&mut self) -> Effects {
        let mut asks = self.join_asks;
        for (room, homed) in self.rooms.iter_mut() {
            let catching_up = homed.pending_joins.iter().any(|a| a.conn == CATCH_UP);
            let Some(pushed) = homed.last_pushed.filter(|_| !catching_up) else {
                continue; // not pushed here (no member), or its catch-up is asked again below
            };
            asks += 1;
            homed.pending_joins.push(RoomJoinAsk {
                room: room.clone(),
                since: Some(pushed),
                shard: 0,
                conn: CATCH_UP,
                serial: 0,
                token: asks,
            });
        }
        self.join_asks = asks;
        self.rooms
            .values()
            .flat_map(|h| h.pending_joins.iter().cloned())
            .map(|ask| RoomEffect::Store(StoreOp::RoomJoin(Box::new(ask))))
            .collect()
    }

    /// The answer to a catch-up (see `resynced`): what the node missed, fanned out in offset
    /// order; `gap` when the history no longer reaches back to it.
    fn caught_up(
        &mut self,
        room: &CompactString,
        last: u64,
        recovered: bool,
        replay: Vec<(u64, StoredMessage)>,
        t: RoomTime,
    ) -> Effects {
        let Some(homed) = self.rooms.get_mut(room) else {
            return Vec::new();
        };
        let Some(from) = homed.last_pushed.filter(|from| last > *from) else {
            return Vec::new(); // the last member left meanwhile, or nothing was missed
        };
        homed.last_pushed = Some(last);
        if !recovered {
            return self.announce_missed(room, from + 1);
        }
        replay
            .into_iter()
            .filter(|(offset, _)| *offset > from)
            .flat_map(|(offset, m)| self.fan_out(Arc::new(room_msg(room, offset, m, t.now))))
            .collect()
    }

    /// From this node's channel: the answer to a join. Everything the room published after
    /// `last` follows it on the channel; what came before was fanned out already (or is in
    /// `replay`).
    pub fn join_answer(
        &mut self,
        ask: RoomJoinAsk,
        last: u64,
        recovered: bool,
        replay: Vec<(u64, StoredMessage)>,
        t: RoomTime,
    ) -> Effects {
        if !self.take_pending_join(&ask) {
            return Vec::new(); // answered already (asked again after a resync)
        }
        if ask.conn == CATCH_UP {
            return self.caught_up(&ask.room, last, recovered, replay, t);
        }
        let homed = self.homed(&ask.room, t);
        let missed_from = homed.last_pushed.filter(|p| last > *p).map(|p| p + 1);
        homed.last_pushed = Some(homed.last_pushed.map_or(last, |p| p.max(last)));
        let mut effects = Vec::new();
        if let Some(from) = missed_from {
            effects.extend(self.announce_missed(&ask.room, from));
        }
        let replay = replay
            .into_iter()
            .map(|(offset, m)| Arc::new(room_msg(&ask.room, offset, m, t.now)))
            .collect();
        let msg = Room::Joined {
            room: ask.room,
            conn: ask.conn,
            serial: ask.serial,
            last,
            recovered,
            replay,
        };
        effects.push(RoomEffect::ToShard {
            shard: ask.shard,
            msg,
        });
        effects
    }

    /// From this node's channel: a room message, in offset order.
    pub fn pushed(
        &mut self,
        room: CompactString,
        offset: u64,
        msg: StoredMessage,
        t: RoomTime,
    ) -> Effects {
        let Some(homed) = self.rooms.get_mut(&room) else {
            return Vec::new(); // no member here (any more)
        };
        let Some(pushed) = homed.last_pushed.filter(|pushed| offset > *pushed) else {
            return Vec::new(); // not joined yet (the join answer covers it), or seen already
        };
        let missed_from = (offset > pushed + 1).then_some(pushed + 1);
        homed.last_pushed = Some(offset);
        let mut effects = Vec::new();
        if let Some(from) = missed_from {
            effects.extend(self.announce_missed(&room, from));
        }
        effects.extend(self.fan_out(Arc::new(room_msg(&room, offset, msg, t.now))));
        effects
    }

    /// Pushes from `from` on never came (the channel was down): members hear `gap`.
    fn announce_missed(&self, room: &CompactString, from: u64) -> Effects {
        tracing::info!(%room, from, "room messages missed by this node; members hear `gap`");
        self.member_shards(room)
            .into_iter()
            .map(|shard| RoomEffect::ToShard {
                shard,
                msg: Room::Gap {
                    room: room.clone(),
                    from,
                },
            })
            .collect()
    }

    fn member_shards(&self, room: &CompactString) -> Vec<usize> {
        self.rooms.get(room).map_or_else(Vec::new, |h| {
            h.members_by_shard
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(s, _)| s)
                .collect()
        })
    }

    /// One fan-out message per shard with members, this (home) shard's own last: the other
    /// shards start writing while this one stages its members' frames.
    fn fan_out(&self, msg: Arc<RoomMsg>) -> Effects {
        let home = mesh::home_shard(&msg.room, self.shards);
        let mut shards = self.member_shards(&msg.room);
        shards.sort_by_key(|s| *s == home); // stable: the others keep their order
        shards
            .into_iter()
            .map(|shard| RoomEffect::ToShard {
                shard,
                msg: Room::Fanout(msg.clone()),
            })
            .collect()
    }

    /// Periodic: age out room histories; forget rooms with no member and no history.
    pub fn sweep(&mut self, now: u64) {
        let limits = self.limits;
        let before = self.rooms.len();
        let mut forgotten = self.forgotten_through;
        self.rooms.retain(|_, h| {
            let empty = h.log.trim(now, limits);
            let keep = !(empty && h.members_by_shard.iter().all(|n| *n == 0));
            if !keep && h.log.had_messages() {
                forgotten = forgotten.max(h.log.last());
            }
            keep
        });
        self.forgotten_through = forgotten;
        self.metrics.rooms.sub((before - self.rooms.len()) as u64);
    }
}

impl RoomMembers {
    pub fn new(
        shard: usize,
        max_outbound: usize,
        slow_close_ms: u64,
        metrics: Arc<ShardMetrics>,
    ) -> Self {
        RoomMembers {
            shard,
            shards: 1,
            members: HashMap::new(),
            rooms_of: HashMap::new(),
            max_outbound,
            slow_close_ms,
            metrics,
            #[cfg(test)]
            plant_no_gap: false,
        }
    }

    pub fn configure(&mut self, shards: usize) {
        self.shards = shards;
    }

    fn home(&self, room: &str) -> usize {
        mesh::home_shard(room, self.shards)
    }

    /// `join` from a connection; `allowed`: its token's `rooms` claim lets it in.
    pub fn join(
        &mut self,
        conn: usize,
        serial: u32,
        room: CompactString,
        since: Option<u64>,
        allowed: bool,
    ) -> Effects {
        if !allowed {
            let why = format!("room `{room}` is not in this token's rooms");
            let frame = refusal(ErrorCode::Forbidden, why, None);
            return vec![RoomEffect::Send { conn, frame }];
        }
        let members = self.members.entry(room.clone()).or_default();
        // A join sent again keeps what the member was already given (every offset up to
        // `last`, when none was skipped), so that its answer replays only what came after:
        // each offset is shown once.
        let new_member = match members.get(&conn) {
            Some(member) if member.serial == serial && !member.skipped => false,
            stale => {
                let new_member = stale.is_none();
                let member = Member {
                    serial,
                    joined: false,
                    skipped: false,
                    last: 0,
                    gap_from: None,
                    over_since: None,
                };
                members.insert(conn, member);
                new_member
            }
        };
        if new_member {
            self.metrics.room_members.inc();
            self.rooms_of.entry(conn).or_default().push(room.clone());
        }
        let shard = self.home(&room);
        let msg = Room::Join {
            room,
            shard: self.shard,
            conn,
            serial,
            since,
            new_member,
        };
        vec![RoomEffect::ToShard { shard, msg }]
    }

    /// `leave` from a connection: it hears `left` whether or not it was a member.
    pub fn leave(&mut self, conn: usize, room: CompactString) -> Effects {
        let mut effects = self.drop_member(conn, &room);
        let mut frame = Vec::with_capacity(48);
        proto::write_left(&mut frame, &room);
        effects.push(RoomEffect::Send { conn, frame });
        effects
    }

    /// A connection closed: it leaves every room it joined.
    pub fn closed(&mut self, conn: usize) -> Effects {
        let rooms = self.rooms_of.remove(&conn).unwrap_or_default();
        rooms
            .iter()
            .flat_map(|room| self.drop_member(conn, room))
            .collect()
    }

    fn drop_member(&mut self, conn: usize, room: &CompactString) -> Effects {
        let Some(members) = self.members.get_mut(room) else {
            return Vec::new();
        };
        if members.remove(&conn).is_none() {
            return Vec::new();
        }
        if members.is_empty() {
            self.members.remove(room);
        }
        self.metrics.room_members.dec();
        if let Some(rooms) = self.rooms_of.get_mut(&conn) {
            rooms.retain(|r| r != room);
            if rooms.is_empty() {
                self.rooms_of.remove(&conn);
            }
        }
        let msg = Room::Leave {
            room: room.clone(),
            shard: self.shard,
        };
        vec![RoomEffect::ToShard {
            shard: self.home(room),
            msg,
        }]
    }

    /// `publish` from a connection of `user` (None: not signed in, nothing happens).
    pub fn publish(
        &mut self,
        reply: ReplyTo,
        user: Option<&str>,
        room: CompactString,
        cid: Box<str>,
        body: Box<str>,
        allowed: bool,
    ) -> Effects {
        let conn = reply.conn as usize;
        if !allowed {
            let why = format!("room `{room}` is not in this token's rooms");
            let frame = refusal(ErrorCode::Forbidden, why, Some(cid));
            return vec![RoomEffect::Send { conn, frame }];
        }
        let Some(from) = user.map(CompactString::from) else {
            return Vec::new();
        };
        let shard = self.home(&room);
        let msg = Room::Publish {
            room,
            from,
            cid,
            body,
            reply,
        };
        vec![RoomEffect::ToShard { shard, msg }]
    }

    /// The home answered how a publish from one of this shard's connections went.
    pub fn accepted(
        &mut self,
        reply: ReplyTo,
        cid: Box<str>,
        result: Result<(u64, u64), SendRefusal>,
    ) -> Effects {
        let mut frame = Vec::with_capacity(96);
        match result {
            Ok((id, offset)) => proto::write_accepted_offset(&mut frame, &cid, id, offset),
            Err(why) => {
                self.metrics.refusals[why.source().index()].inc();
                proto::write_error(&mut frame, &why.frame("not published", cid));
            }
        }
        vec![RoomEffect::Answer {
            conn: reply.conn as usize,
            serial: reply.serial,
            frame,
        }]
    }

    /// The home could not register a join: the member is dropped and hears `unavailable`.
    pub fn join_refused(&mut self, room: CompactString, conn: usize, serial: u32) -> Effects {
        let member = self.members.get(&room).and_then(|m| m.get(&conn));
        if member.is_none_or(|m| m.serial != serial) {
            return Vec::new();
        }
        let mut effects = self.drop_member(conn, &room);
        let why =
            format!("room `{room}` cannot be joined now (its history is unavailable); join again");
        let frame = refusal(ErrorCode::Unavailable, why, None);
        effects.push(RoomEffect::Send { conn, frame });
        effects
    }

    /// The home answered a join: replay, then `joined`.
    pub fn joined(
        &mut self,
        room: CompactString,
        conn: usize,
        serial: u32,
        last: u64,
        recovered: bool,
        replay: Vec<Arc<RoomMsg>>,
    ) -> Effects {
        let Some(member) = self
            .members
            .get_mut(&room)
            .and_then(|m| m.get_mut(&conn))
            .filter(|m| m.serial == serial)
        else {
            return Vec::new(); // left (or closed) meanwhile
        };
        // The answer to a join sent again: what the member was given since is not replayed.
        let given = member.joined.then_some(member.last);
        let mut effects: Effects = replay
            .into_iter()
            .filter(|msg| given.is_none_or(|given| msg.offset > given))
            .map(|msg| RoomEffect::SendRoom { conn, msg })
            .collect();
        if given.is_none() {
            member.gap_from = None;
            member.over_since = None;
        }
        member.joined = true;
        member.last = last.max(given.unwrap_or(0));
        let mut frame = Vec::with_capacity(64);
        proto::write_joined(&mut frame, &room, member.last, recovered);
        effects.push(RoomEffect::Send { conn, frame });
        effects
    }

    /// Members here that had not reached `from` skipped messages: tell them once.
    pub fn gap(&mut self, room: &CompactString, from: u64) -> Effects {
        let Some(members) = self.members.get_mut(room) else {
            return Vec::new();
        };
        let mut frame = Vec::with_capacity(64);
        proto::write_gap(&mut frame, room, from);
        let mut effects = Vec::new();
        for (conn, member) in members.iter_mut() {
            if member.joined && member.last < from {
                member.skipped = true;
            }
            if member.joined && member.last < from && member.gap_from.is_none() {
                member.gap_from = Some(from);
                effects.push(RoomEffect::Send {
                    conn: *conn,
                    frame: frame.clone(),
                });
            }
        }
        self.metrics.room_gaps.add(effects.len() as u64);
        effects
    }

    /// A room message for this shard's members. `outbound(conn)`: the bytes waiting in an
    /// open connection's outbound buffer (None: it is closing and gets nothing more, as it
    /// may be the one closed for slowness).
    pub fn fan_out(
        &mut self,
        msg: &Arc<RoomMsg>,
        now: u64,
        outbound: impl Fn(usize) -> Option<usize>,
    ) -> Effects {
        let Some(members) = self.members.get_mut(&msg.room) else {
            return Vec::new();
        };
        let mut delivered = Vec::new();
        let mut gaps = Vec::new();
        let mut slow = Vec::new();
        for (conn, member) in members.iter_mut() {
            if !member.joined || msg.offset <= member.last {
                continue;
            }
            let Some(buffered) = outbound(*conn) else {
                continue;
            };
            member.last = msg.offset;
            if buffered + msg.frame.len() <= self.max_outbound {
                // A later skip is a new hole (the client saw this one after the gap).
                member.gap_from = None;
                if buffered == 0 {
                    member.over_since = None; // caught up completely
                }
                delivered.push(*conn);
                continue;
            }
            member.skipped = true;
            if member.gap_from.is_none() {
                member.gap_from = Some(msg.offset);
                #[cfg(test)]
                if self.plant_no_gap {
                    continue;
                }
                gaps.push(*conn);
            }
            match member.over_since {
                None => member.over_since = Some(now),
                Some(since) if now.saturating_sub(since) >= self.slow_close_ms => slow.push(*conn),
                Some(_) => {}
            }
        }
        // In connection order, not the map's: the slab's entries and, as connections mostly
        // come in order, the kernel's sockets are then touched one after the next.
        delivered.sort_unstable();
        self.metrics.room_deliveries.add(delivered.len() as u64);
        self.metrics.room_gaps.add(gaps.len() as u64);
        self.metrics.slow_closes.add(slow.len() as u64);
        let mut effects: Effects = delivered
            .into_iter()
            .map(|conn| RoomEffect::SendRoom {
                conn,
                msg: msg.clone(),
            })
            .collect();
        for conn in gaps {
            let mut frame = Vec::with_capacity(64);
            proto::write_gap(&mut frame, &msg.room, msg.offset);
            effects.push(RoomEffect::Send { conn, frame });
        }
        effects.extend(slow.into_iter().map(|conn| RoomEffect::CloseSlow { conn }));
        effects
    }

    /// Members per room, for tests.
    #[cfg(test)]
    pub fn count(&self, room: &str) -> usize {
        self.members.get(room).map_or(0, HashMap::len)
    }
}

/// The shard's side: feed inputs to the machines and perform what they return.
impl Shard {
    /// The simulation's planted bug: a member's skipped room message is not announced with
    /// `gap`.
    #[cfg(test)]
    pub(crate) fn plant_room_no_gap(&mut self) {
        self.room_members.plant_no_gap = true;
    }

    fn room_time(&self, now: u64) -> RoomTime {
        RoomTime {
            now,
            wall_ms: self.clock.wall_ms(),
        }
    }

    /// The one place room effects are carried out. This shard's own room messages are
    /// handled at once, depth first, so that each connection's frames keep the order the
    /// machines gave them.
    fn perform_rooms(&mut self, effects: Effects, now: u64) {
        for effect in effects {
            match effect {
                RoomEffect::Send { conn, frame } => {
                    self.write_text(conn, &frame);
                    self.kick(conn);
                }
                RoomEffect::SendRoom { conn, msg } => {
                    self.write_text(conn, &msg.frame);
                    self.kick(conn);
                }
                RoomEffect::Answer {
                    conn,
                    serial,
                    frame,
                } => {
                    if self.is_live(conn, serial) {
                        self.write_text(conn, &frame);
                        self.kick(conn);
                    }
                }
                RoomEffect::CloseSlow { conn } => {
                    let ctx = shard_ctx!(self);
                    if let Some(entry) = self.conns.get_mut(conn) {
                        entry.conn.close_slow(now, &ctx);
                    }
                    self.kick(conn);
                }
                RoomEffect::ToShard { shard, msg } if shard == self.id => {
                    self.on_room_msg(msg, now)
                }
                RoomEffect::ToShard { shard, msg } => self.send_or_hold(shard, ShardMsg::Room(msg)),
                RoomEffect::Store(op) => {
                    if let Err(op) = self.submit_store_op(op) {
                        let more = self.rooms_home.store_refused(op);
                        self.perform_rooms(more, now);
                    }
                }
                RoomEffect::ApiAnswer { reply, result } => {
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Room messages from the mesh (or from this shard to itself).
    pub fn on_room_msg(&mut self, msg: Room, now: u64) {
        let t = self.room_time(now);
        let ids = &mut self.msg_ids;
        let conns = &self.conns;
        let outbound = |conn: usize| {
            conns
                .get(conn)
                .filter(|e| e.conn.phase() == crate::conn::Phase::Open)
                .map(|e| e.conn.out.len())
        };
        let effects = dispatch_room(
            &mut self.rooms_home,
            &mut self.room_members,
            msg,
            t,
            || ids.next(t.wall_ms, now),
            outbound,
        );
        self.perform_rooms(effects, now);
    }

    /// The token's `rooms` claim allows `room` (no claim, or `*`: any room).
    fn may_enter(&self, index: usize, room: &str) -> bool {
        self.conns[index]
            .conn
            .rooms()
            .is_none_or(|allowed| allowed.iter().any(|r| &**r == room))
    }

    pub(super) fn on_join(
        &mut self,
        index: usize,
        room: CompactString,
        since: Option<u64>,
        now: u64,
    ) {
        let allowed = self.may_enter(index, &room);
        let serial = self.conns[index].serial;
        let effects = self.room_members.join(index, serial, room, since, allowed);
        self.perform_rooms(effects, now);
    }

    pub(super) fn on_leave(&mut self, index: usize, room: CompactString, now: u64) {
        let effects = self.room_members.leave(index, room);
        self.perform_rooms(effects, now);
    }

    /// A connection leaves every room it joined (it is closing).
    pub(super) fn leave_all_rooms(&mut self, index: usize, now: u64) {
        let effects = self.room_members.closed(index);
        self.perform_rooms(effects, now);
    }

    pub(super) fn on_publish(
        &mut self,
        index: usize,
        room: CompactString,
        cid: Box<str>,
        body: Box<str>,
        now: u64,
    ) {
        let max_frame = self.shared.cfg.max_frame;
        let user = self.conns[index].conn.user().unwrap_or_default();
        if !proto::message_fits(max_frame, Some(&room), user, &cid, None, &body) {
            return self.refuse_too_large(index, &cid, now);
        }
        let allowed = self.may_enter(index, &room);
        let reply = self.reply_to(index);
        let user = self.conns[index].conn.user();
        let effects = self
            .room_members
            .publish(reply, user, room, cid, body, allowed);
        self.perform_rooms(effects, now);
    }

    /// Redis answered a publish (on the room's home shard).
    pub(super) fn on_room_published(
        &mut self,
        post: RoomPost,
        result: Result<(u64, u64), StoreError>,
        now: u64,
    ) {
        let effects = self.rooms_home.store_published(post, result);
        self.perform_rooms(effects, now);
    }

    /// Redis could not register a join.
    pub(super) fn on_room_join_failed(&mut self, ask: RoomJoinAsk, now: u64) {
        let effects = self.rooms_home.join_failed(ask);
        self.perform_rooms(effects, now);
    }

    /// After a resync: the joins not answered yet are asked again.
    pub(super) fn ask_pending_joins_again(&mut self, now: u64) {
        let effects = self.rooms_home.resynced();
        self.perform_rooms(effects, now);
    }

    /// From this node's channel: the answer to a join of a room homed here.
    pub(super) fn on_room_join_answer(
        &mut self,
        ask: RoomJoinAsk,
        last: u64,
        recovered: bool,
        replay: Vec<(u64, StoredMessage)>,
        now: u64,
    ) {
        let t = self.room_time(now);
        let effects = self.rooms_home.join_answer(ask, last, recovered, replay, t);
        self.perform_rooms(effects, now);
    }

    /// From this node's channel: a message of a room homed here, in offset order.
    pub(super) fn on_room_pushed(
        &mut self,
        room: CompactString,
        offset: u64,
        msg: StoredMessage,
        now: u64,
    ) {
        let t = self.room_time(now);
        let effects = self.rooms_home.pushed(room, offset, msg, t);
        self.perform_rooms(effects, now);
    }

    /// Periodic: age out room histories.
    pub(super) fn sweep_rooms(&mut self, now: u64) {
        self.rooms_home.sweep(now);
    }
}

/// A room message with its frame encoded once for every member.
fn room_msg(room: &CompactString, offset: u64, m: StoredMessage, now: u64) -> RoomMsg {
    let mut frame = Vec::with_capacity(96 + room.len() + m.cid.len() + m.body.len());
    proto::write_room(
        &mut frame, room, offset, m.id, &m.from, &m.cid, m.ts, &m.body,
    );
    RoomMsg {
        room: room.clone(),
        offset,
        id: m.id,
        from: m.from,
        cid: m.cid.as_str().into(),
        at_ms: now,
        frame: frame.into_boxed_slice(),
    }
}

/// The one dispatch of a room message from the mesh to the machine it is for (the shard,
/// the machines' tests and the simulation all go through it). `next_id` gives a publish its
/// message id (called only when one is used); `outbound` is the bytes waiting in an open
/// connection's buffer (None: not open), for the fan-out's slow-consumer rule.
pub(crate) fn dispatch_room(
    homes: &mut RoomHomes,
    members: &mut RoomMembers,
    msg: Room,
    t: RoomTime,
    next_id: impl FnOnce() -> Option<u64>,
    outbound: impl Fn(usize) -> Option<usize>,
) -> Effects {
    match msg {
        Room::Join {
            room,
            shard,
            conn,
            serial,
            since,
            new_member,
        } => homes.join(room, shard, conn, serial, since, new_member, t),
        Room::Leave { room, shard } => homes.leave(&room, shard),
        Room::Publish {
            room,
            from,
            cid,
            body,
            reply,
        } => homes.publish(room, from, cid, body, RoomReply::Conn(reply), next_id, t),
        Room::ApiPublish {
            room,
            cid,
            body,
            reply,
        } => {
            let from = CompactString::from(super::deliver::BACKEND_SENDER);
            homes.publish(room, from, cid, body, RoomReply::Api(reply), next_id, t)
        }
        Room::Joined {
            room,
            conn,
            serial,
            last,
            recovered,
            replay,
        } => members.joined(room, conn, serial, last, recovered, replay),
        Room::Accepted { reply, cid, result } => members.accepted(reply, cid, result),
        Room::JoinRefused { room, conn, serial } => members.join_refused(room, conn, serial),
        Room::Gap { room, from } => members.gap(&room, from),
        Room::Fanout(msg) => members.fan_out(&msg, t.now, outbound),
    }
}

#[cfg(test)]
mod tests {
    //! The machines alone: no shard, no socket, time given by the test.
    use super::*;

    const LIMITS: HistoryLimits = HistoryLimits {
        max: 3,
        max_age_ms: 60_000,
    };
    const T0: RoomTime = RoomTime {
        now: 10,
        wall_ms: 1,
    };
    /// Room "r" is homed on shard `home_shard("r", 2)`; members live on both shards.
    const SHARDS: usize = 2;

    struct Node {
        homes: Vec<RoomHomes>,
        members: Vec<RoomMembers>,
        /// Bytes waiting per (shard, conn); a fan-out sees them as the outbound buffer.
        outbound: HashMap<(usize, usize), usize>,
        /// What each (shard, conn) was sent, as JSON, in order.
        frames: HashMap<(usize, usize), Vec<serde_json::Value>>,
        closed: Vec<(usize, usize)>,
        store: Vec<StoreOp>,
        /// Each fan-out handed on, as (from shard, to shard), in order.
        fanouts: Vec<(usize, usize)>,
    }

    impl Node {
        fn new(in_store: bool) -> Node {
            let metrics = Arc::new(ShardMetrics::default());
            let mut homes = Vec::new();
            let mut members = Vec::new();
            for shard in 0..SHARDS {
                let mut home = RoomHomes::new(LIMITS, metrics.clone());
                home.configure(SHARDS, in_store);
                homes.push(home);
                let mut m = RoomMembers::new(shard, 1_000, 100, metrics.clone());
                m.configure(SHARDS);
                members.push(m);
            }
            Node {
                homes,
                members,
                outbound: HashMap::new(),
                frames: HashMap::new(),
                closed: Vec::new(),
                store: Vec::new(),
                fanouts: Vec::new(),
            }
        }

        /// Perform what shard `at` was told to, as `Shard::perform_rooms` does (room
        /// messages are handled at once; the mesh is FIFO and loses nothing here).
        fn perform(&mut self, at: usize, effects: Effects, t: RoomTime) {
            for effect in effects {
                match effect {
                    RoomEffect::Send { conn, frame } | RoomEffect::Answer { conn, frame, .. } => {
                        self.sent(at, conn, &frame)
                    }
                    RoomEffect::SendRoom { conn, msg } => self.sent(at, conn, &msg.frame),
                    RoomEffect::CloseSlow { conn } => self.closed.push((at, conn)),
                    RoomEffect::ToShard { shard, msg } => {
                        if matches!(msg, Room::Fanout(_)) {
                            self.fanouts.push((at, shard));
                        }
                        self.deliver(shard, msg, t)
                    }
                    RoomEffect::Store(op) => self.store.push(op),
                    RoomEffect::ApiAnswer { .. } => {}
                }
            }
        }

        fn sent(&mut self, shard: usize, conn: usize, frame: &[u8]) {
            *self.outbound.entry((shard, conn)).or_default() += frame.len();
            let v = serde_json::from_slice(frame).expect("JSON");
            self.frames.entry((shard, conn)).or_default().push(v);
        }

        fn deliver(&mut self, shard: usize, msg: Room, t: RoomTime) {
            let id = match &msg {
                Room::Publish { cid, .. } => Some(t.now * 100 + cid.len() as u64),
                _ => None,
            };
            let outbound = &self.outbound;
            let view = |conn| Some(*outbound.get(&(shard, conn)).unwrap_or(&0));
            let (homes, members) = (&mut self.homes[shard], &mut self.members[shard]);
            let effects = super::dispatch_room(homes, members, msg, t, || id, view);
            self.perform(shard, effects, t);
        }

        fn join(&mut self, shard: usize, conn: usize, since: Option<u64>, t: RoomTime) {
            self.join_room("r", shard, conn, since, t);
        }

        fn join_room(
            &mut self,
            room: &str,
            shard: usize,
            conn: usize,
            since: Option<u64>,
            t: RoomTime,
        ) {
            let e = self.members[shard].join(conn, 1, room.into(), since, true);
            self.perform(shard, e, t);
        }

        fn publish(&mut self, shard: usize, conn: usize, cid: &str, t: RoomTime) {
            self.publish_room("r", shard, conn, cid, t);
        }

        fn publish_room(&mut self, room: &str, shard: usize, conn: usize, cid: &str, t: RoomTime) {
            let reply = ReplyTo {
                shard: shard as u32,
                conn: conn as u32,
                serial: 1,
            };
            let e = self.members[shard].publish(
                reply,
                Some("u"),
                room.into(),
                format!("\"{cid}\"").into(),
                "1".into(),
                true,
            );
            self.perform(shard, e, t);
        }

        /// The (op, offset or from) of what a connection was sent, and forget it.
        fn take(&mut self, shard: usize, conn: usize) -> Vec<(String, u64)> {
            self.outbound.remove(&(shard, conn));
            self.frames
                .remove(&(shard, conn))
                .unwrap_or_default()
                .iter()
                .map(|v| {
                    let n = v["offset"].as_u64().or(v["from"].as_u64()).unwrap_or(0);
                    (v["op"].as_str().unwrap().to_string(), n)
                })
                .collect()
        }
    }

    fn ops(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(o, n)| (o.to_string(), *n)).collect()
    }

    #[test]
    fn members_on_both_shards_get_each_offset_and_recover_with_since() {
        let mut node = Node::new(false);
        node.join(0, 5, None, T0);
        node.join(1, 7, None, T0);
        let base = 1_000; // the wall clock (1 ms) in microseconds
        assert_eq!(node.take(0, 5), ops(&[("joined", base)]));
        assert_eq!(node.take(1, 7), ops(&[("joined", base)]));
        node.publish(1, 7, "a", T0);
        node.publish(0, 5, "b", T0);
        assert_eq!(
            node.take(0, 5),
            ops(&[
                ("room", base + 1),
                ("room", base + 2),
                ("accepted", base + 2)
            ])
        );
        assert_eq!(
            node.take(1, 7),
            ops(&[
                ("room", base + 1),
                ("accepted", base + 1),
                ("room", base + 2)
            ])
        );
        // A resent cid gets its first offset and is not fanned out again.
        node.publish(0, 5, "b", T0);
        assert_eq!(node.take(0, 5), ops(&[("accepted", base + 2)]));
        assert!(node.take(1, 7).is_empty());
        // Conn 7 drops and comes back with since = the last offset it saw.
        let e = node.members[1].closed(7);
        node.perform(1, e, T0);
        node.publish(0, 5, "c", T0);
        node.take(0, 5);
        assert!(node.take(1, 7).is_empty(), "not a member while away");
        node.join(1, 7, Some(base + 2), T0);
        assert_eq!(
            node.take(1, 7),
            ops(&[("room", base + 3), ("joined", base + 3)])
        );
        // The history keeps 3: a since before it is not recovered.
        for cid in ["d", "e", "f"] {
            node.publish(0, 5, cid, T0);
        }
        node.take(0, 5);
        node.take(1, 7);
        let e = node.members[1].leave(7, "r".into());
        node.perform(1, e, T0);
        assert_eq!(node.take(1, 7), ops(&[("left", 0)]));
        node.join(1, 7, Some(base + 2), T0);
        let got = node.frames[&(1, 7)].last().unwrap().clone();
        assert_eq!(got["recovered"], false, "offset 3 left the history: {got}");
        assert_eq!(node.members[1].count("r"), 1);
        assert_eq!(node.members[0].count("r"), 1);
    }

    #[test]
    fn a_join_sent_again_before_or_after_its_answer_shows_each_offset_once() {
        let mut node = Node::new(false);
        node.join(0, 5, None, T0);
        let base = 1_000;
        for cid in ["a", "b"] {
            node.publish(0, 5, cid, T0);
        }
        node.take(0, 5);
        // Two joins with the same `since` before either is answered.
        let first = node.members[1].join(7, 1, "r".into(), Some(base), true);
        let second = node.members[1].join(7, 1, "r".into(), Some(base), true);
        node.perform(1, first, T0);
        node.publish(0, 5, "c", T0);
        node.perform(1, second, T0);
        // And once more while joined.
        node.join(1, 7, Some(base), T0);
        node.publish(0, 5, "d", T0);
        let shown: Vec<u64> = node
            .take(1, 7)
            .into_iter()
            .filter(|(op, _)| op == "room")
            .map(|(_, offset)| offset)
            .collect();
        assert_eq!(shown, [base + 1, base + 2, base + 3, base + 4]);
        // After a skip, a join again (gap recovery) replays from `since` in full.
        node.outbound.insert((1, 7), 990);
        node.publish(0, 5, "e", T0);
        assert_eq!(node.take(1, 7), ops(&[("gap", base + 5)]));
        node.join(1, 7, Some(base + 4), T0);
        assert_eq!(
            node.take(1, 7),
            ops(&[("room", base + 5), ("joined", base + 5)])
        );
    }

    #[test]
    fn a_member_whose_buffer_is_full_hears_gap_from_the_first_skipped_offset_then_is_closed() {
        let mut node = Node::new(false);
        node.join(0, 1, None, T0);
        node.join(0, 2, None, T0);
        node.take(0, 1);
        node.take(0, 2);
        node.outbound.insert((0, 2), 990); // near the 1,000-byte limit: it stops reading
        node.publish(0, 1, "a", T0);
        node.publish(0, 1, "b", T0);
        let base = 1_000;
        assert_eq!(
            node.take(0, 2),
            ops(&[("gap", base + 1)]),
            "one gap for the run of skips, from its first offset"
        );
        node.outbound.insert((0, 2), 990);
        // Still over the limit `slow_close_ms` (100) after its first skip: closed.
        let later = RoomTime {
            now: T0.now + 100,
            ..T0
        };
        node.publish(0, 1, "c", later);
        assert_eq!(node.closed, vec![(0, 2)]);
        assert!(node.take(0, 2).is_empty(), "no second gap in one run");
        let frames = node.take(0, 1);
        assert_eq!(frames.iter().filter(|(op, _)| op == "room").count(), 3);
    }

    #[test]
    fn the_home_hands_a_fan_out_to_the_other_shards_before_its_own_members() {
        // A room homed on each shard: member shards are listed in shard order, so a home on
        // shard 0 shows the reordering.
        for home in 0..SHARDS {
            let room = (0..)
                .map(|n| format!("room-{n}"))
                .find(|r| mesh::home_shard(r, SHARDS) == home)
                .unwrap();
            let mut node = Node::new(false);
            node.join_room(&room, 0, 5, None, T0);
            node.join_room(&room, 1, 7, None, T0);
            node.publish_room(&room, home, 5 + 2 * home, "a", T0);
            assert_eq!(
                node.fanouts,
                [(home, 1 - home), (home, home)],
                "home {home}"
            );
            let other = (1 - home, 5 + 2 * (1 - home));
            assert_eq!(node.take(other.0, other.1).last().unwrap().0, "room");
        }
    }

    #[test]
    fn with_the_store_joins_and_publishes_are_store_operations_and_a_missed_push_is_a_gap() {
        let mut node = Node::new(true);
        let home = mesh::home_shard("r", SHARDS);
        node.join(0, 1, Some(40), T0);
        let Some(StoreOp::RoomJoin(ask)) = node.store.pop() else {
            panic!("a join is asked of the store");
        };
        assert_eq!(ask.since, Some(40));
        // The queue was full: the member is refused and dropped.
        let e = node.homes[home].store_refused(StoreOp::RoomJoin(ask));
        node.perform(home, e, T0);
        let refused = node.frames[&(0, 1)].clone();
        assert_eq!(refused[0]["code"], "unavailable", "{refused:?}");
        assert_eq!(node.members[0].count("r"), 0);
        node.take(0, 1);
        // Joined again: the answer comes on the channel, then pushes in offset order.
        node.join(0, 1, None, T0);
        let Some(StoreOp::RoomJoin(ask)) = node.store.pop() else {
            panic!("asked again");
        };
        let e = node.homes[home].join_answer(*ask, 50, false, Vec::new(), T0);
        node.perform(home, e, T0);
        let stored = |n: u64| StoredMessage {
            id: n,
            from: "u".into(),
            cid: format!("\"{n}\"").into(),
            ts: 1,
            body: "1".into(),
            msg_type: None,
        };
        for offset in [51, 50, 53] {
            let e = node.homes[home].pushed("r".into(), offset, stored(offset), T0);
            node.perform(home, e, T0);
        }
        assert_eq!(
            node.take(0, 1),
            ops(&[("joined", 50), ("room", 51), ("gap", 52), ("room", 53)]),
            "50 seen already, 52 never came"
        );
        // A publish is a store operation with the shard's id; no id slot: refused at once.
        node.publish(1, 9, "x", T0);
        assert!(matches!(node.store.pop(), Some(StoreOp::RoomPublish(_))));
        let reply = ReplyTo {
            shard: 1,
            conn: 9,
            serial: 1,
        };
        let e = node.homes[home].publish(
            "r".into(),
            "u".into(),
            "\"y\"".into(),
            "1".into(),
            RoomReply::Conn(reply),
            || None,
            T0,
        );
        node.perform(home, e, T0);
        assert_eq!(node.frames[&(1, 9)][0]["op"], "error");
        // The last member leaves: the store stops pushing the room to this node.
        let e = node.members[0].closed(1);
        node.perform(0, e, T0);
        assert!(matches!(node.store.pop(), Some(StoreOp::RoomLeave { .. })));
    }
}
