//! Rooms on a shard (SPEC sections 3-4): `join`, `leave`, `publish`, fan-out, recovery with
//! `since`, and slow consumers.
//!
//! Who owns what:
//! * A room's **home shard** (`home_shard(room)`) owns its [`RoomLog`] (offsets, history,
//!   publish dedup) and how many members each shard has. Every publish goes there, gets its
//!   offset, and leaves as **one `RoomFanout` per shard with members**, never one per member.
//! * Every shard owns **its own members**: which of its connections joined which room, and
//!   per member the last offset it was given and its slow-consumer state.
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
use crate::delivery::refusal::SendRefusal;
use crate::delivery::room::{HistoryLimits, RoomLog, RoomMsg};
use crate::mesh;
use crate::proto::{self, ErrorCode, FrameError};
use crate::store::redis::{RoomJoinAsk, RoomPost, RoomReply, StoreOp};
use crate::store::{StoreError, StoredMessage};

/// A room homed on this shard.
pub struct HomedRoom {
    log: RoomLog,
    /// Member connections per shard (fan-out goes to shards with at least one).
    members_by_shard: Vec<u32>,
    /// With Redis: the newest offset this node received (pushes come in offset order;
    /// a jump means some were missed). 0: none yet.
    last_pushed: u64,
    /// With Redis: joins whose answer has not come back on the channel yet (asked again
    /// after a resync: an answer published while the channel was not heard is lost).
    pending_joins: Vec<RoomJoinAsk>,
}

/// One of this shard's connections in a room.
pub struct Member {
    serial: u32,
    /// False until the home answered the join: fan-outs are skipped meanwhile.
    joined: bool,
    /// The newest offset this member was given (or skipped past).
    last: u64,
    /// First offset skipped since the member last kept up (a `gap` was sent for it).
    gap_from: Option<u64>,
    /// When the member first skipped since its outbound buffer was last empty (ms).
    over_since: Option<u64>,
}

impl Shard {
    fn history_limits(&self) -> HistoryLimits {
        HistoryLimits {
            max: self.shared.cfg.room_history_max,
            max_age_ms: self.shared.cfg.room_history_age_ms,
        }
    }

    fn shards(&self) -> usize {
        self.mesh.as_ref().map_or(1, |m| m.shards())
    }

    /// Send to a shard, or handle here when it is this one.
    fn send_room_msg(&mut self, shard: usize, msg: Room, now: u64) {
        if shard == self.id {
            self.on_room_msg(msg, now);
        } else {
            self.send_or_hold(shard, ShardMsg::Room(msg));
        }
    }

    /// Room messages from the mesh (or from this shard to itself).
    pub fn on_room_msg(&mut self, msg: Room, now: u64) {
        match msg {
            Room::Join {
                room,
                shard,
                conn,
                serial,
                since,
                new_member,
            } => self.home_join(room, shard, conn, serial, since, new_member, now),
            Room::Joined {
                room,
                conn,
                serial,
                last,
                recovered,
                replay,
            } => self.on_joined(room, conn, serial, last, recovered, replay),
            Room::Leave { room, shard } => self.home_leave(&room, shard),
            Room::Publish {
                room,
                from,
                cid,
                body,
                reply,
            } => self.home_publish(room, from, cid, body, RoomReply::Conn(reply), now),
            Room::Accepted { reply, cid, result } => {
                let mut out = Vec::with_capacity(96);
                match result {
                    Ok((id, offset)) => proto::write_accepted_offset(&mut out, &cid, id, offset),
                    Err(why) => {
                        self.metrics.refusals[why.source().index()].inc();
                        proto::write_error(&mut out, &why.frame("not published", cid));
                    }
                }
                self.answer(reply.conn as usize, reply.serial, &out);
            }
            Room::JoinRefused { room, conn, serial } => {
                let member = self.room_members.get(&room).and_then(|m| m.get(&conn));
                if member.is_some_and(|m| m.serial == serial) {
                    self.drop_member(conn, &room, now);
                    let why = format!("room `{room}` cannot be joined now (its history is unavailable); join again");
                    self.refuse(conn, ErrorCode::Unavailable, why, None);
                    self.kick(conn);
                }
            }
            Room::Gap { room, from } => self.gap_here(&room, from),
            Room::Fanout(msg) => self.fan_out_here(&msg, now),
            Room::ApiPublish {
                room,
                cid,
                body,
                reply,
            } => {
                let from = CompactString::from(super::deliver::BACKEND_SENDER);
                self.home_publish(room, from, cid, body, RoomReply::Api(reply), now);
            }
        }
    }

    /// Write `frame` to a connection if it is still the one that asked.
    fn answer(&mut self, index: usize, serial: u32, frame: &[u8]) {
        if self.is_live(index, serial) {
            self.write_text(index, frame);
            self.kick(index);
        }
    }

    fn refuse(&mut self, index: usize, code: ErrorCode, message: String, cid: Option<Box<str>>) {
        let mut out = Vec::with_capacity(96);
        proto::write_error(&mut out, &FrameError { code, message, cid });
        self.write_text(index, &out);
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
        if !self.may_enter(index, &room) {
            let why = format!("room `{room}` is not in this token's rooms");
            return self.refuse(index, ErrorCode::Forbidden, why, None);
        }
        let serial = self.conns[index].serial;
        let members = self.room_members.entry(room.clone()).or_default();
        let new_member = members
            .insert(
                index,
                Member {
                    serial,
                    joined: false,
                    last: 0,
                    gap_from: None,
                    over_since: None,
                },
            )
            .is_none();
        if new_member {
            self.metrics.room_members.inc();
            self.conns[index]
                .rooms
                .get_or_insert_with(Default::default)
                .push(room.clone());
        }
        let home = mesh::home_shard(&room, self.shards());
        let msg = Room::Join {
            room,
            shard: self.id,
            conn: index,
            serial,
            since,
            new_member,
        };
        self.send_room_msg(home, msg, now);
    }

    pub(super) fn on_leave(&mut self, index: usize, room: CompactString, now: u64) {
        self.drop_member(index, &room, now);
        let mut out = Vec::with_capacity(48);
        proto::write_left(&mut out, &room);
        self.write_text(index, &out);
    }

    /// A connection leaves every room it joined (it is closing).
    pub(super) fn leave_all_rooms(&mut self, index: usize, rooms: Vec<CompactString>, now: u64) {
        for room in rooms {
            self.drop_member(index, &room, now);
        }
    }

    fn drop_member(&mut self, index: usize, room: &CompactString, now: u64) {
        let Some(members) = self.room_members.get_mut(room) else {
            return;
        };
        if members.remove(&index).is_none() {
            return;
        }
        if members.is_empty() {
            self.room_members.remove(room);
        }
        self.metrics.room_members.dec();
        if let Some(rooms) = self.conns.get_mut(index).and_then(|e| e.rooms.as_mut()) {
            rooms.retain(|r| r != room);
        }
        let home = mesh::home_shard(room, self.shards());
        let msg = Room::Leave {
            room: room.clone(),
            shard: self.id,
        };
        self.send_room_msg(home, msg, now);
    }

    pub(super) fn on_publish(
        &mut self,
        index: usize,
        room: CompactString,
        cid: Box<str>,
        body: Box<str>,
        now: u64,
    ) {
        if !self.may_enter(index, &room) {
            let why = format!("room `{room}` is not in this token's rooms");
            return self.refuse(index, ErrorCode::Forbidden, why, Some(cid));
        }
        let Some(from) = self.conns[index].conn.user().map(CompactString::from) else {
            return;
        };
        let reply = self.reply_to(index);
        let home = mesh::home_shard(&room, self.shards());
        let msg = Room::Publish {
            room,
            from,
            cid,
            body,
            reply,
        };
        self.send_room_msg(home, msg, now);
    }

    fn homed(&mut self, room: &CompactString) -> &mut HomedRoom {
        let shards = self.shards();
        if !self.rooms_home.contains_key(room) {
            self.metrics.rooms.inc();
        }
        self.rooms_home
            .entry(room.clone())
            .or_insert_with(|| HomedRoom {
                // Microseconds of the wall clock: a restarted gateway never reuses an offset.
                log: RoomLog::new(self.clock.wall_ms() * 1000),
                members_by_shard: vec![0; shards],
                last_pushed: 0,
                pending_joins: Vec::new(),
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn home_join(
        &mut self,
        room: CompactString,
        shard: usize,
        conn: usize,
        serial: u32,
        since: Option<u64>,
        new_member: bool,
        now: u64,
    ) {
        let limits = self.history_limits();
        let durable = self.store_shared();
        let homed = self.homed(&room);
        if new_member {
            homed.members_by_shard[shard] += 1;
        }
        if durable {
            // Redis holds the room: the answer comes back on this node's channel, in order
            // with the room's messages (see `on_room_join_answer`).
            let ask = RoomJoinAsk {
                room,
                since,
                shard,
                conn,
                serial,
            };
            homed.pending_joins.push(ask.clone());
            if let Err(StoreOp::RoomJoin(ask)) =
                self.submit_store_op(StoreOp::RoomJoin(Box::new(ask)))
            {
                self.on_room_join_failed(*ask, now);
            }
            return;
        }
        let last = homed.log.last();
        let (replay, recovered) = match since {
            Some(since) => {
                let r = homed.log.since(since, now, limits);
                (r.replay, r.recovered)
            }
            // Nothing was asked for, so nothing is claimed recovered.
            None => (Vec::new(), false),
        };
        let answer = Room::Joined {
            room,
            conn,
            serial,
            last,
            recovered,
            replay,
        };
        self.send_room_msg(shard, answer, now);
    }

    fn home_leave(&mut self, room: &CompactString, shard: usize) {
        let shared = self.store_shared();
        let Some(homed) = self.rooms_home.get_mut(room) else {
            return;
        };
        homed.members_by_shard[shard] = homed.members_by_shard[shard].saturating_sub(1);
        if shared && homed.members_by_shard.iter().all(|n| *n == 0) {
            // This node's last member left: other nodes stop pushing the room here. If it
            // cannot be queued, the pushes that still come are dropped here.
            homed.last_pushed = 0;
            let _ = self.submit_store_op(StoreOp::RoomLeave { room: room.clone() });
        }
    }

    fn refuse_join(&mut self, ask: RoomJoinAsk, now: u64) {
        let msg = Room::JoinRefused {
            room: ask.room,
            conn: ask.conn,
            serial: ask.serial,
        };
        self.send_room_msg(ask.shard, msg, now);
    }

    /// Redis could not register a join.
    pub(super) fn on_room_join_failed(&mut self, ask: RoomJoinAsk, now: u64) {
        if self.take_pending_join(&ask) {
            self.refuse_join(ask, now);
        }
    }

    /// Forget a pending join; false when it was not pending (answered already).
    fn take_pending_join(&mut self, ask: &RoomJoinAsk) -> bool {
        let Some(homed) = self.rooms_home.get_mut(&ask.room) else {
            return false;
        };
        let same =
            |p: &RoomJoinAsk| (p.shard, p.conn, p.serial) == (ask.shard, ask.conn, ask.serial);
        match homed.pending_joins.iter().position(same) {
            Some(i) => {
                homed.pending_joins.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// After a resync: ask again for every join not answered yet (a second answer to the
    /// same join finds it answered and is ignored).
    pub(super) fn ask_pending_joins_again(&mut self, now: u64) {
        let asks: Vec<RoomJoinAsk> = self
            .rooms_home
            .values()
            .flat_map(|h| h.pending_joins.iter().cloned())
            .collect();
        for ask in asks {
            if let Err(StoreOp::RoomJoin(ask)) =
                self.submit_store_op(StoreOp::RoomJoin(Box::new(ask)))
            {
                self.on_room_join_failed(*ask, now);
            }
        }
    }

    /// On the room's home, from this node's channel: the answer to a join. Everything the
    /// room published after `last` follows it on the channel; what came before was fanned
    /// out already (or is in `replay`).
    pub(super) fn on_room_join_answer(
        &mut self,
        ask: RoomJoinAsk,
        last: u64,
        recovered: bool,
        replay: Vec<(u64, StoredMessage)>,
        now: u64,
    ) {
        if !self.take_pending_join(&ask) {
            return; // answered already (asked again after a resync)
        }
        let homed = self.homed(&ask.room);
        let missed_from =
            (homed.last_pushed != 0 && last > homed.last_pushed).then_some(homed.last_pushed + 1);
        homed.last_pushed = homed.last_pushed.max(last);
        if let Some(from) = missed_from {
            self.announce_missed(&ask.room, from, now);
        }
        let replay = replay
            .into_iter()
            .map(|(offset, m)| Arc::new(room_msg(&ask.room, offset, m, now)))
            .collect();
        let answer = Room::Joined {
            room: ask.room,
            conn: ask.conn,
            serial: ask.serial,
            last,
            recovered,
            replay,
        };
        self.send_room_msg(ask.shard, answer, now);
    }

    /// On the room's home, from this node's channel: a room message, in offset order.
    pub(super) fn on_room_pushed(
        &mut self,
        room: CompactString,
        offset: u64,
        msg: StoredMessage,
        now: u64,
    ) {
        let Some(homed) = self.rooms_home.get_mut(&room) else {
            return; // no member here (any more)
        };
        if homed.last_pushed == 0 || offset <= homed.last_pushed {
            return; // not joined yet (the join answer covers it), or seen already
        }
        let missed_from = (offset > homed.last_pushed + 1).then_some(homed.last_pushed + 1);
        homed.last_pushed = offset;
        if let Some(from) = missed_from {
            self.announce_missed(&room, from, now);
        }
        self.fan_out(Arc::new(room_msg(&room, offset, msg, now)), now);
    }

    /// Pushes from `from` on never came (the channel was down): members hear `gap`.
    fn announce_missed(&mut self, room: &CompactString, from: u64, now: u64) {
        tracing::info!(shard = self.id, %room, from, "room messages missed by this node; members hear `gap`");
        for shard in self.member_shards(room) {
            let msg = Room::Gap {
                room: room.clone(),
                from,
            };
            self.send_room_msg(shard, msg, now);
        }
    }

    fn member_shards(&self, room: &CompactString) -> Vec<usize> {
        self.rooms_home.get(room).map_or_else(Vec::new, |h| {
            h.members_by_shard
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(s, _)| s)
                .collect()
        })
    }

    /// One fan-out message per shard with members.
    fn fan_out(&mut self, msg: Arc<RoomMsg>, now: u64) {
        for shard in self.member_shards(&msg.room) {
            self.send_room_msg(shard, Room::Fanout(msg.clone()), now);
        }
    }

    /// Members here that had not reached `from` skipped messages: tell them once.
    fn gap_here(&mut self, room: &CompactString, from: u64) {
        let Some(members) = self.room_members.get_mut(room) else {
            return;
        };
        let mut told = Vec::new();
        for (index, member) in members.iter_mut() {
            if member.joined && member.last < from && member.gap_from.is_none() {
                member.gap_from = Some(from);
                told.push(*index);
            }
        }
        let mut out = Vec::with_capacity(64);
        proto::write_gap(&mut out, room, from);
        self.metrics.room_gaps.add(told.len() as u64);
        for index in told {
            self.write_text(index, &out);
            self.kick(index);
        }
    }

    /// Redis answered a publish (on the room's home shard).
    pub(super) fn on_room_published(
        &mut self,
        post: RoomPost,
        result: Result<(u64, u64), StoreError>,
        now: u64,
    ) {
        match &result {
            Ok(_) => self.metrics.room_publishes.inc(),
            Err(_) => self.metrics.store_refused.inc(),
        }
        self.answer_publish(
            post.reply,
            post.cid,
            result.map_err(SendRefusal::Store),
            now,
        );
    }

    /// Tell the publisher how it went: a connection hears `accepted` (or `error`), the API
    /// gets (id, offset) or, when refused, a dropped channel (it answers 503).
    fn answer_publish(
        &mut self,
        reply: RoomReply,
        cid: Box<str>,
        result: Result<(u64, u64), SendRefusal>,
        now: u64,
    ) {
        match reply {
            RoomReply::Api(tx) => {
                if let Err(why) = &result {
                    self.metrics.refusals[why.source().index()].inc();
                }
                let _ = tx.send(result);
            }
            RoomReply::Conn(reply) => {
                let msg = Room::Accepted { reply, cid, result };
                self.send_room_msg(reply.shard as usize, msg, now);
            }
        }
    }

    /// On the room's home: store the message and fan it out, then answer `reply`. A resent
    /// `(from, cid)` still in the history gets its first id and offset, and nothing is sent.
    fn home_publish(
        &mut self,
        room: CompactString,
        from: CompactString,
        cid: Box<str>,
        body: Box<str>,
        reply: RoomReply,
        now: u64,
    ) {
        let ts = self.clock.wall_ms();
        if self.store_shared() {
            let Some(id) = self.msg_ids.next(ts, now) else {
                self.metrics.store_refused.inc();
                let why = SendRefusal::Busy(super::deliver::NO_ID_SLOT);
                return self.answer_publish(reply, cid, Err(why), now);
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
            if let Err(StoreOp::RoomPublish(post)) =
                self.submit_store_op(StoreOp::RoomPublish(Box::new(post)))
            {
                // Not sent: the shard's store queue is full, as for a direct send (`Busy`,
                // counted as the gateway's refusal, not the store's answer).
                self.metrics.store_refused.inc();
                let why =
                    SendRefusal::Busy("the offline store is busy or unreachable, resend later");
                self.answer_publish(post.reply, post.cid, Err(why), now);
            }
            return;
        }
        let answer = self.publish_here(room, from, cid.clone(), body, ts, now);
        self.answer_publish(reply, cid, Ok(answer), now);
    }

    /// Embedded mode: the room's log here gives the offset and keeps the history.
    fn publish_here(
        &mut self,
        room: CompactString,
        from: CompactString,
        cid: Box<str>,
        body: Box<str>,
        ts: u64,
        now: u64,
    ) -> (u64, u64) {
        let limits = self.history_limits();
        if let Some(first) = self
            .rooms_home
            .get(&room)
            .and_then(|h| h.log.duplicate(&from, &cid))
        {
            self.metrics.dedup_hits.inc();
            return (first.id, first.offset);
        }
        let id = self
            .msg_ids
            .next(ts, now)
            .expect("embedded: a shard's slot is its own for good");
        let homed = self.homed(&room);
        let msg = homed.log.append(
            |offset| {
                room_msg(
                    &room,
                    offset,
                    StoredMessage {
                        id,
                        from,
                        cid,
                        ts,
                        body,
                        msg_type: None,
                    },
                    now,
                )
            },
            now,
            limits,
        );
        self.metrics.room_publishes.inc();
        let answer = (msg.id, msg.offset);
        self.fan_out(msg, now);
        answer
    }

    fn on_joined(
        &mut self,
        room: CompactString,
        conn: usize,
        serial: u32,
        last: u64,
        recovered: bool,
        replay: Vec<Arc<RoomMsg>>,
    ) {
        let Some(member) = self
            .room_members
            .get_mut(&room)
            .and_then(|m| m.get_mut(&conn))
            .filter(|m| m.serial == serial)
        else {
            return; // left (or closed) meanwhile
        };
        member.joined = true;
        member.last = last;
        member.gap_from = None;
        member.over_since = None;
        for msg in &replay {
            self.write_text(conn, &msg.frame);
        }
        let mut out = Vec::with_capacity(64);
        proto::write_joined(&mut out, &room, last, recovered);
        self.write_text(conn, &out);
        self.kick(conn);
    }

    /// A room message for this shard's members.
    fn fan_out_here(&mut self, msg: &Arc<RoomMsg>, now: u64) {
        let Some(members) = self.room_members.get_mut(&msg.room) else {
            return;
        };
        let limit = self.shared.cfg.max_outbound;
        let slow_close_ms = self.shared.cfg.slow_close_ms;
        let mut delivered = Vec::new();
        let mut gaps = Vec::new();
        let mut slow = Vec::new();
        for (index, member) in members.iter_mut() {
            if !member.joined || msg.offset <= member.last {
                continue;
            }
            // A closing connection gets nothing more (it may be the one closed for slowness).
            let Some(entry) = self
                .conns
                .get(*index)
                .filter(|e| e.conn.phase() == crate::conn::Phase::Open)
            else {
                continue;
            };
            member.last = msg.offset;
            let buffered = entry.conn.out.len();
            if buffered + msg.frame.len() <= limit {
                // A later skip is a new hole (the client saw this one after the gap).
                member.gap_from = None;
                if buffered == 0 {
                    member.over_since = None; // caught up completely
                }
                delivered.push(*index);
                continue;
            }
            if member.gap_from.is_none() {
                member.gap_from = Some(msg.offset);
                gaps.push(*index);
            }
            match member.over_since {
                None => member.over_since = Some(now),
                Some(since) if now.saturating_sub(since) >= slow_close_ms => slow.push(*index),
                Some(_) => {}
            }
        }
        let ctx = shard_ctx!(self);
        for index in &delivered {
            self.conns[*index].conn.push_text(&msg.frame, &ctx);
        }
        self.metrics.room_deliveries.add(delivered.len() as u64);
        let mut out = Vec::with_capacity(64);
        for index in &gaps {
            out.clear();
            proto::write_gap(&mut out, &msg.room, msg.offset);
            self.conns[*index].conn.push_text(&out, &ctx);
        }
        self.metrics.room_gaps.add(gaps.len() as u64);
        for index in &slow {
            self.conns[*index].conn.close_slow(now, &ctx);
        }
        self.metrics.slow_closes.add(slow.len() as u64);
        for index in delivered.into_iter().chain(gaps).chain(slow) {
            self.kick(index);
        }
    }

    /// Periodic: age out room histories; forget rooms with no member and no history.
    pub(super) fn sweep_rooms(&mut self, now: u64) {
        let limits = self.history_limits();
        let before = self.rooms_home.len();
        self.rooms_home.retain(|_, h| {
            let empty = h.log.trim(now, limits);
            !(empty && h.members_by_shard.iter().all(|n| *n == 0))
        });
        self.metrics
            .rooms
            .sub((before - self.rooms_home.len()) as u64);
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
        cid: m.cid,
        at_ms: now,
        frame: frame.into_boxed_slice(),
    }
}

/// Connections per room on this shard, for tests and metrics.
pub type RoomMembers = HashMap<CompactString, HashMap<usize, Member>>;
