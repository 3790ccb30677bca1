//! Direct messages on a shard: `send` -> `accepted`/`delivered`, inbox replay -> `msg` ->
//! `ack` (SPEC sections 3 and 4). Store-first: a message is appended to the recipient's inbox
//! on the recipient's home shard before anything else, so `accepted` means "in the store"
//! (embedded store: in memory, lost on restart, as the README says). Each device connection
//! replays the inbox through its own window (own seq, cumulative acks, retransmit with backoff,
//! dead after the last retransmit); the first ack by any device removes the entry and tells the
//! sender `delivered`. Per-sender order holds because one ordered inbox per user feeds every
//! device, across reconnects and retransmits alike.
//!
//! Who owns what: the sender's home shard owns the sender's dedup window and answers the
//! sender; the recipient's home shard owns the inbox and the device windows. Between them a
//! message crosses the mesh once (`Deliver`) and reports come back (`Report`).
//!
//! The rules of each side are machines without I/O: the sender's in `delivery::senders`, the
//! recipient's (per device connection: window, replay, `synced`, summary and `fetch`) in
//! `delivery::reader`. This file reads the frames and the clock, feeds them the inputs and
//! performs what they return (frames, inbox removals, reports, timers, metrics).

use compact_str::CompactString;

use super::msg::{ApiOutcome, Direct, ShardMsg};
use super::users::Devices;
use super::{make_ctx, Shard};
use crate::conn::{AppEvent, Connection, Ctx, Phase};
use crate::delivery::message::{Message, Outcome, RefusedCids, ReplyTo, Report};
use crate::delivery::reader::{InboxView, Sent, Write};
use crate::delivery::refusal::{ClientRefusal, SendRefusal};
use crate::delivery::senders::{SendTime, Submission, Submitted, Targets};
use crate::delivery::WindowConfig;
use crate::limit::Limited;
use crate::mesh;
use crate::proto::ClientFrame;
use crate::proto::{self, FrameError};
use crate::store::StoredMessage;

/// The sender id of messages posted through `POST /api/send`: reserved, no client connects as
/// it (`auth::RESERVED_PREFIX`).
pub const BACKEND_SENDER: &str = "@backend";
const _: () = assert!(BACKEND_SENDER.as_bytes()[0] == crate::auth::RESERVED_PREFIX as u8);
/// `ReplyTo::conn` of an API send: the answer goes to a waiting HTTP request.
const API_CONN: u32 = u32::MAX - 1;
/// Write one `msg` frame (first send, replay or retransmit: same bytes, same seq).
fn push_msg(conn: &mut Connection, frame: &mut Vec<u8>, seq: u64, msg: &StoredMessage, ctx: &Ctx) {
    frame.clear();
    proto::write_msg(frame, seq, msg);
    conn.push_text(frame, ctx);
}

impl Shard {
    fn window_config(&self) -> WindowConfig {
        WindowConfig {
            capacity: self.shared.cfg.window,
            ack_timeout_ms: self.shared.cfg.ack_timeout_ms,
            ..WindowConfig::default()
        }
    }

    /// On the user's home shard: welcome, inbox replay, synced, then the client's early frames.
    pub(super) fn start_session(&mut self, index: usize, now: u64) {
        let ctx = shard_ctx!(self);
        let entry = &mut self.conns[index];
        entry.conn.start_session(entry.serial, &ctx);
        if let Some(user) = entry.conn.user().map(CompactString::from) {
            let first = (self.users).add(&user, index, |i| super::conn_user(&self.conns, i));
            self.senders.arrived(&user, self.clock.wall_ms());
            self.metrics.users.set(self.users.len() as u64);
            if first {
                self.local_presence(&user, true, now);
            }
            self.ensure_mirror(&user, now);
            // An embedded store reads the inbox now: the replay comes before any answer to
            // the client's early frames.
            self.hear_store_now(now);
            self.pump(index, now);
        }
        let ctx = shard_ctx!(self);
        self.conns[index].conn.resume_input(now, &ctx);
    }

    /// Serve what the connection at `index` asked for while its input was handled.
    pub(super) fn serve_events(&mut self, index: usize, now: u64) {
        loop {
            let events = std::mem::take(&mut *self.events.borrow_mut());
            if events.is_empty() {
                return;
            }
            let open_before = self.conns[index].conn.phase() == Phase::Open;
            for event in events {
                // Closed while serving (flooding past its send limit): what is left of this
                // read goes unanswered and untaken, as on a dropped connection; sends answered
                // `rate_limited` before the close are still kept.
                let closed = open_before && self.conns[index].conn.phase() != Phase::Open;
                let frame = match event {
                    AppEvent::SendRefused(req) => {
                        self.send_refused_by_a_limit(index, &req);
                        continue;
                    }
                    _ if closed => continue,
                    AppEvent::Frame(frame) => frame,
                };
                match frame {
                    ClientFrame::Send(req) => {
                        if self.is_resend(index, &req.cid)
                            || self.within_send_rate(index, Some(&req.cid), now)
                        {
                            self.on_send(index, req, now)
                        } else {
                            self.send_refused_by_a_limit(index, &req);
                        }
                    }
                    ClientFrame::Ack { seq } => self.on_ack(index, seq, now),
                    ClientFrame::Presence { users } => self.on_presence(index, users, now),
                    ClientFrame::Join { room, since } => self.on_join(index, room, since, now),
                    ClientFrame::Leave { room } => self.on_leave(index, room, now),
                    ClientFrame::Publish { room, cid, body } => {
                        if self.within_send_rate(index, Some(&cid), now) {
                            self.on_publish(index, room, cid, body, now)
                        }
                    }
                    ClientFrame::Typing { to } => {
                        if self.within_send_rate(index, None, now) {
                            self.on_typing(index, to)
                        }
                    }
                    ClientFrame::Watch { users } => self.on_watch(index, users, now),
                    ClientFrame::Unwatch { users } => self.on_unwatch(index, &users, now),
                    ClientFrame::Fetch { from, limit } => self.on_fetch(index, from, limit, now),
                    ClientFrame::Replay => self.on_replay(index, now),
                    ClientFrame::Read { from, id } => {
                        if self.within_send_rate(index, None, now) {
                            self.on_read(index, from, id, now)
                        }
                    }
                    ClientFrame::Ping => {} // answered by the connection, never queued
                }
                // What an embedded store answers is heard before the next frame, as its
                // answers were before it went through the store path.
                self.hear_store_now(now);
            }
        }
    }

    /// A `send` of a cid this user's dedup window holds (accepted, or on its way). It costs
    /// no token: it stores nothing, and its answer must not be refused: a client that lost
    /// the first answer with its connection resends the cid, and if that were refused, the
    /// answers to its later sends would come first although their messages were stored
    /// after it (found by the simulation once senders' connections dropped).
    fn is_resend(&self, index: usize, cid: &str) -> bool {
        if self.shared.cfg.send_limit.is_none() {
            return false; // nothing to spare it from
        }
        #[cfg(test)]
        if self.planted(super::durable::OrderPlant::LimitResends) {
            return false;
        }
        let Some(user) = self.conns[index].conn.user() else {
            return false;
        };
        self.senders.knows(user, cid)
    }

    /// `send` + `publish` + `typing` + `read` per user (`user_send_rate`): exact, because every device
    /// of a user lives on this shard, its home. Over the limit the frame gets `rate_limited`
    /// (with its cid, if any), nothing of it is taken, and the connection gets a strike (see
    /// `Connection::strike`).
    fn within_send_rate(&mut self, index: usize, cid: Option<&str>, now: u64) -> bool {
        let Some(rate) = self.shared.cfg.send_limit else {
            return true;
        };
        let Some(user) = self.conns[index].conn.user() else {
            return true;
        };
        let Err(retry_ms) = self.send_buckets.take(user, now, rate) else {
            return true;
        };
        self.metrics.rate_limited[Limited::Sends.index()].inc();
        let ctx = shard_ctx!(self);
        let conn = &mut self.conns[index].conn;
        conn.answer_rate_limited("too many sends", cid, retry_ms, &ctx);
        conn.strike(now, &ctx);
        false
    }

    /// `typing`: to `to`'s devices on its home shard and, with Redis, on the nodes holding
    /// one (the store publishes it to them). Ephemeral: where a queue is full it is dropped
    /// and counted, never queued or retried.
    fn on_typing(&mut self, index: usize, to: CompactString) {
        let Some(from) = self.conns[index].conn.user().map(CompactString::from) else {
            return;
        };
        self.metrics.typing.inc();
        if self.store_shared() {
            let op = crate::store::redis::StoreOp::Typing {
                from: from.clone(),
                to: to.clone(),
            };
            if self.submit_store_op(op).is_err() {
                self.metrics.typing_dropped.inc();
            }
        }
        let home = self.home_of(&to);
        if home == self.id {
            return self.typing_here(&from, &to);
        }
        let mesh = self.mesh.as_ref().expect("several shards have a mesh");
        if mesh
            .send(home, ShardMsg::Direct(Direct::Typing { from, to }))
            .is_err()
        {
            self.metrics.mesh_full.inc();
            self.metrics.typing_dropped.inc();
        }
    }

    /// On `to`'s home shard: `from` is typing, for each of `to`'s devices here that is open
    /// and keeps up (a device whose outbound buffer is full does not get it: dropped, counted).
    pub(crate) fn typing_here(&mut self, from: &str, to: &str) {
        let mut out = Vec::with_capacity(48);
        proto::write_typing(&mut out, from);
        let max_outbound = self.shared.cfg.max_outbound;
        for device in self.devices_of(to) {
            let conn = &self.conns[device].conn;
            if conn.phase() != Phase::Open || conn.out.len() >= max_outbound {
                self.metrics.typing_dropped.inc();
                continue;
            }
            self.write_text(device, &out);
            self.kick(device);
            self.metrics.typing_delivered.inc();
        }
    }

    /// `read`: `reader` has read `sender`'s messages up to `id`. Checked against what was sent
    /// to the reader's devices, then stored as a receipt entry in the sender's inbox and in
    /// the reader's own (for its other devices), each delivered like a `msg` (see
    /// `proto::RECEIPT_CID_PREFIX`). Nothing answers it unless it is refused.
    pub(super) fn on_read(&mut self, index: usize, sender: CompactString, id: u64, now: u64) {
        use crate::delivery::receipts::ReadVerdict;
        let Some(reader) = self.conns[index].conn.user().map(CompactString::from) else {
            return;
        };
        if !self.mirror_ready(&reader) {
            // With Redis, what the reader received is read with its inbox: wait for it.
            let serial = self.conns[index].serial;
            if !self
                .reads_waiting
                .park(&reader, (index, serial, sender, id))
            {
                self.metrics.reads_refused.inc(); // more than a client should ever send
            }
            return;
        }
        match self.receipts.read(&reader, &sender, id) {
            ReadVerdict::Tell => {}
            ReadVerdict::AlreadyTold => return self.metrics.reads_redundant.inc(),
            ReadVerdict::NeverReceived => {
                self.metrics.reads_refused.inc();
                let why = format!(
                    "no message {id} from `{}` was sent to you",
                    sender.escape_default()
                );
                return self.reply_bad_request(index, why, now);
            }
        }
        self.metrics.reads.inc();
        let cid = proto::receipt_cid(&sender, id);
        let ts = self.clock.wall_ms();
        let reply = self.reply_to(index);
        // The gateway's own senders (`@backend`) have no devices to tell.
        let sender_copy = !sender.starts_with(crate::auth::RESERVED_PREFIX);
        let reader_arrived_ms = self.senders.arrived_ms(&reader, ts);
        let to_users = [sender.clone(), reader.clone()];
        for to in to_users.into_iter().skip(usize::from(!sender_copy)) {
            let receipt = Message {
                id,
                from: reader.clone(),
                to,
                cid: cid.clone(),
                ts,
                body: "null".into(),
                msg_type: None,
                reply,
                received_us: self.clock.now_us(),
                write: Default::default(),
                resent: false,
                sender_arrived_ms: reader_arrived_ms,
                refused_earlier: None,
            };
            self.route(Box::new(receipt), now, Some(index));
        }
    }

    fn on_send(&mut self, index: usize, req: proto::SendRequest, now: u64) {
        let proto::SendRequest {
            to,
            cid,
            body,
            resend,
        } = req;
        let Some(from) = self.conns[index].conn.user().map(CompactString::from) else {
            return;
        };
        if !proto::message_fits(self.shared.cfg.max_frame, None, &from, &cid, None, &body) {
            return self.refuse_too_large(index, &cid, now);
        }
        let reply = self.reply_to(index);
        let submission = Submission {
            from: from.clone(),
            to,
            cid: cid.clone(),
            body,
            msg_type: None,
            reply,
            resent: resend,
        };
        let t = self.send_time(now);
        match self.senders.submit(submission, &mut self.msg_ids, t) {
            Submitted::Route(msg) => self.route(msg, now, Some(index)),
            Submitted::Refused(report) => {
                self.refused_before_routing(&report.from, &report.to, &report.cid, resend);
                self.on_report(report)
            }
            Submitted::AlreadyAccepted(id) => {
                let mut out = Vec::with_capacity(64);
                proto::write_accepted(&mut out, &cid, id);
                self.write_text(index, &out);
            }
            // The first copy's answer comes to this connection too.
            Submitted::InFlight => self.senders.wait_for(from, cid, index, reply.serial),
        }
    }

    fn send_time(&self, now: u64) -> SendTime {
        SendTime {
            now,
            wall_ms: self.clock.wall_ms(),
            now_us: self.clock.now_us(),
        }
    }

    /// Where answers for the connection at `index` go (checked against its serial on arrival).
    pub(super) fn reply_to(&self, index: usize) -> ReplyTo {
        ReplyTo {
            shard: self.id as u32,
            conn: index as u32,
            serial: self.conns[index].serial,
        }
    }

    /// `POST /api/send`, on the home shard of [`BACKEND_SENDER`]: answered on `reply` once the
    /// message is safe (or refused), exactly like a client's `send`.
    pub(super) fn on_api_send(
        &mut self,
        to: CompactString,
        cid: Box<str>,
        body: Box<str>,
        msg_type: Option<Box<str>>,
        reply: tokio::sync::oneshot::Sender<ApiOutcome>,
        now: u64,
    ) {
        let target = ReplyTo {
            shard: self.id as u32,
            conn: API_CONN,
            serial: 0,
        };
        // Registered first: a local delivery reports before `submit` returns. A newer waiter
        // for the same cid replaces an older one (that caller has timed out).
        self.api_waiters.insert(cid.clone(), reply);
        let submission = Submission {
            from: BACKEND_SENDER.into(),
            to,
            cid: cid.as_ref().into(),
            body: body.into(),
            msg_type,
            reply: target,
            resent: false,
        };
        let t = self.send_time(now);
        // Each request arrives anew: the caller may have been told `accepted` by another
        // node a moment ago.
        self.senders.arrived(BACKEND_SENDER, t.wall_ms);
        match self.senders.submit(submission, &mut self.msg_ids, t) {
            Submitted::Route(msg) => self.route(msg, now, None),
            Submitted::Refused(report) => {
                self.refused_before_routing(&report.from, &report.to, &report.cid, false);
                self.on_report(report)
            }
            Submitted::AlreadyAccepted(id) => {
                if let Some(waiter) = self.api_waiters.remove(&cid) {
                    let _ = waiter.send(ApiOutcome::Accepted { id });
                }
            }
            Submitted::InFlight => {}
        }
    }

    /// To the recipient's home shard (here, or across the mesh).
    /// Boxed once: the box crosses the mesh and goes on to the store as it is.
    /// It carries its pair's first attempts refused here before routing (see
    /// `Senders::refused_unrouted`).
    fn route(&mut self, mut msg: Box<Message>, now: u64, current: Option<usize>) {
        self.senders.carry_unrouted(&mut msg);
        let home = self.home_of(&msg.to);
        if home == self.id {
            return self.deliver(msg, now, current);
        }
        self.metrics.cross_shard.inc();
        let mesh = self.mesh.as_ref().expect("several shards have a mesh");
        let deliver = ShardMsg::Direct(Direct::Deliver(msg));
        if let Err(ShardMsg::Direct(Direct::Deliver(mut msg))) = mesh.send(home, deliver) {
            self.metrics.mesh_full.inc();
            self.senders.put_back_carried(&mut msg);
            self.refused_before_routing(&msg.from, &msg.to, &msg.cid, msg.resent);
            self.on_report(msg.refused(SendRefusal::Busy(
                "the recipient's shard is busy, resend later",
            )));
        }
    }

    /// A `send` of the connection at `index` answered `rate_limited` (its frame limit, or
    /// its user's send limit): see [`Shard::refused_before_routing`].
    /// Not a cid the user's dedup window holds (accepted, or on its way: its entry may be
    /// stored already and never seen again), nor one too large to be taken ever.
    fn send_refused_by_a_limit(&mut self, index: usize, req: &proto::SendRequest) {
        let Some(from) = self.conns[index].conn.user().map(CompactString::from) else {
            return;
        };
        let max_frame = self.shared.cfg.max_frame;
        if self.senders.knows(&from, &req.cid)
            || !proto::message_fits(max_frame, None, &from, &req.cid, None, &req.body)
        {
            return;
        }
        self.refused_before_routing(&from, &req.to, &req.cid, req.resend);
    }

    /// A send refused here before it reached its recipient's home shard: a first attempt's
    /// cid, or a mark that a resend was refused, is kept for the pair's next message to carry
    /// there (see `Senders::refused_unrouted`), where the mirror treats it as refused there.
    /// Not a read receipt (`RefusedCids::holds_back`), nor the backend's: its messages never go
    /// live (see `InboxMirror::deliver`). (With the embedded store too, where the recipient's
    /// mirror, with no live path, keeps nothing of it: the same path either way.)
    pub(super) fn refused_before_routing(
        &mut self,
        from: &str,
        to: &str,
        cid: &CompactString,
        resent: bool,
    ) {
        if !RefusedCids::holds_back(cid) || from == BACKEND_SENDER {
            return;
        }
        #[cfg(test)]
        if self.planted(super::durable::OrderPlant::LivePastUnrouted) {
            return;
        }
        self.senders.refused_unrouted(from, to, cid, resent);
    }

    pub(super) fn home_of(&self, user: &str) -> usize {
        match &self.mesh {
            Some(m) => mesh::home_shard(user, m.shards()),
            None => self.id,
        }
    }

    /// Start offline push: every direct message this shard stores for a user with no device
    /// (see `push`).
    pub fn enable_push(&mut self, link: crate::push::PushLink) {
        self.push = Some(link);
        self.mirror.enable_push();
    }

    /// Hand a push (of a message stored in Redis, or in the embedded store) to the push
    /// worker; never waits: a full queue drops it, counted.
    pub(super) fn offer_push(&mut self, item: crate::push::PushItem) {
        let Some(push) = &mut self.push else {
            return;
        };
        // Embedded store: remember it, so that an ack cancels it (Redis: the worker checks
        // the entry is still there instead).
        let watch = item.seq.is_none();
        if push.offer(item, watch) {
            self.metrics.push_queued.inc();
        } else {
            self.metrics.push_dropped.inc();
        }
    }

    /// Send a report to the sender's home shard (or handle it here).
    pub(super) fn report(&mut self, report: Report) {
        let to = report.reply.shard as usize;
        if to == self.id {
            return self.on_report(report);
        }
        self.send_or_hold(to, ShardMsg::Direct(Direct::Report(Box::new(report))));
    }

    /// [`Shard::report`] of a report that is boxed already (a store's answer carries it so):
    /// the box crosses the mesh as it is.
    pub(super) fn report_boxed(&mut self, report: Box<Report>) {
        let to = report.reply.shard as usize;
        if to == self.id {
            return self.on_report(*report);
        }
        self.send_or_hold(to, ShardMsg::Direct(Direct::Report(report)));
    }

    /// Send an answer another shard waits for; a full channel holds it for the next tick
    /// (never dropped). While anything is held, later messages queue behind it so that a
    /// shard sees them in the order they were sent.
    pub(super) fn send_or_hold(&mut self, to: usize, msg: ShardMsg) {
        if !self.unsent.is_empty() {
            self.unsent.push((to, msg));
            return;
        }
        let mesh = self.mesh.as_ref().expect("several shards have a mesh");
        if let Err(msg) = mesh.send(to, msg) {
            self.metrics.mesh_full.inc();
            self.unsent.push((to, msg));
        }
    }

    /// Retry what a full channel refused (called on every tick), in the order it was held.
    pub(super) fn retry_unsent(&mut self) {
        if self.unsent.is_empty() {
            return;
        }
        let Some(mesh) = self.mesh.as_ref() else {
            return;
        };
        let pending = std::mem::take(&mut self.unsent);
        let mut refused = std::collections::HashSet::new();
        for (to, msg) in pending {
            // Once a shard refused, everything after for it waits too (order per shard).
            if refused.contains(&to) {
                self.unsent.push((to, msg));
            } else if let Err(msg) = mesh.send(to, msg) {
                refused.insert(to);
                self.unsent.push((to, msg));
            }
        }
    }

    /// On the sender's home shard: answer the sender.
    pub(super) fn on_report(&mut self, r: Report) {
        if let Some(sender) = proto::receipt_sender(&r.cid) {
            return self.on_receipt_report(sender.into(), r);
        }
        let clock = &self.clock;
        if r.reply.conn == API_CONN {
            self.senders.settle(&r, || clock.now_us());
            return self.on_api_report(r);
        }
        let mut out = std::mem::take(&mut self.frame);
        out.clear();
        let targets = match self.senders.answer(&r, || clock.now_us(), &mut out) {
            Targets::AllDevices => self.devices_of(&r.from),
            Targets::Conns(conns) => {
                let mut live = Devices::new();
                for (conn, serial) in conns {
                    if self.is_live(conn, serial) && !live.contains(&conn) {
                        live.push(conn);
                    }
                }
                live
            }
        };
        for t in targets {
            self.write_text(t, &out);
            self.kick(t);
        }
        self.frame = out;
    }

    /// A receipt's store write: nothing to say unless it was refused (then the reader is told,
    /// and may send the `read` again).
    fn on_receipt_report(&mut self, sender: CompactString, r: Report) {
        let Outcome::Refused(why) = &r.outcome else {
            if r.outcome == Outcome::Stored {
                self.receipts.stored(&r.from, &sender, r.id);
            }
            return;
        };
        self.receipts.not_told(&r.from, &sender, r.id);
        self.metrics.refusals[why.source().index()].inc();
        let err = FrameError {
            code: why.code(),
            message: format!("read receipt for {} not stored: {why}", r.id),
            cid: None,
        };
        let mut out = Vec::with_capacity(96);
        proto::write_error(&mut out, &err);
        let origin = r.reply.conn as usize;
        if self.is_live(origin, r.reply.serial) {
            self.write_text(origin, &out);
            self.kick(origin);
        }
    }

    /// The answer to `POST /api/send` (settled by the senders' machine already).
    fn on_api_report(&mut self, r: Report) {
        let outcome = match r.outcome {
            Outcome::Stored => ApiOutcome::Accepted { id: r.id },
            Outcome::Refused(why) => ApiOutcome::Refused(why),
            Outcome::Delivered => return,
        };
        if let Some(waiter) = self.api_waiters.remove(r.cid.as_str()) {
            let _ = waiter.send(outcome);
        }
    }

    fn on_ack(&mut self, index: usize, seq: u64, now: u64) {
        self.metrics.acks.inc();
        let Some(user) = self.conns[index].conn.user().map(CompactString::from) else {
            return;
        };
        let acked = match self.conns[index].reader.ack(seq) {
            Ok(acked) => acked,
            Err(refusal) => return self.reply_bad_request(index, refusal.to_string(), now),
        };
        if acked.is_empty() {
            // An ack that acknowledges nothing costs a frame like any other; useful acks are
            // free because the server itself paces them (one per message it sent).
            let ctx = shard_ctx!(self);
            let _ = self.conns[index].conn.charge_frame(now, &ctx);
        }
        self.metrics.acks_pending.sub(acked.len() as u64);
        let mirror_ready = self.mirror_ready(&user);
        // (One lookup per ack: a user with one device here owes nobody.)
        let other_devices = self.devices_of(&user).len() > 1;
        let mut owed_to = Devices::new();
        for (inbox_seq, msg) in acked {
            // Only the first device's ack removes the entry: one `delivered` per message.
            // (While a Redis mirror reloads the entry may be missing from it: still report.)
            let removed = self.mirror.remove_acked(&user, inbox_seq);
            // Owed before anything pumps the user's other devices past it.
            let owe = removed && other_devices;
            #[cfg(test)]
            let owe = owe && !self.planted(super::durable::OrderPlant::OweNothing);
            if owe {
                let gone = [(inbox_seq, msg.clone())];
                self.owe_devices(&user, Some(index), &gone, Owing::LeftInbox, &mut owed_to);
            }
            if removed || !mirror_ready {
                // Acked before its push went out: cancel it (with a shared store the worker
                // finds the entry gone instead).
                if !self.store_shared() {
                    if let Some(push) = &mut self.push {
                        push.acked(msg.id);
                    }
                }
                let home = self.home_of(&msg.from);
                let delivered = Report {
                    id: msg.id,
                    from: msg.from.clone(),
                    to: user.clone(),
                    cid: msg.cid.clone(),
                    reply: ReplyTo::all_devices(home),
                    outcome: Outcome::Delivered,
                    received_us: self.clock.now_us(),
                };
                // `delivered` waits for the store's delete: only the ack that removed the entry
                // reports it, whichever node its device is on.
                self.store_acked(&user, inbox_seq, delivered, now);
            }
        }
        self.pump(index, now);
        self.pump_owed(owed_to, now);
    }

    /// Entries owed to the devices of `user` here but `except`, by the rule `owing` names; the
    /// devices owed something are added to `owed_to` (pumped by [`Shard::pump_owed`] after).
    pub(super) fn owe_devices(
        &mut self,
        user: &str,
        except: Option<usize>,
        entries: &[Sent],
        owing: Owing,
        owed_to: &mut Devices,
    ) {
        if entries.is_empty() {
            return;
        }
        let window_cfg = self.window_config();
        for device in self.devices_of(user) {
            if Some(device) == except {
                continue;
            }
            let reader = &mut self.conns[device].reader;
            let mut owed = 0;
            for (inbox_seq, msg) in entries {
                owed = match owing {
                    Owing::LeftInbox => reader.owe(window_cfg, *inbox_seq, msg.clone()),
                    Owing::PassedBelow => reader.owe_passed(*inbox_seq, msg.clone()),
                };
            }
            if owed > 0 && !owed_to.contains(&device) {
                owed_to.push(device);
            }
        }
    }

    /// Pump devices that were owed entries; one owed more than the inbox holds at most (it has
    /// not acked for a long while) is closed as a slow consumer (1013): its next connection
    /// gets what is still in the inbox.
    pub(super) fn pump_owed(&mut self, devices: Devices, now: u64) {
        for device in devices {
            if self.conns[device].reader.owed() > self.shared.cfg.inbox_max_messages {
                self.metrics.slow_closes.inc();
                let ctx = shard_ctx!(self);
                self.conns[device].conn.close_slow(now, &ctx);
            } else {
                self.pump(device, now);
            }
            // Another connection's ack (or a reload) got here: write this one's output now,
            // not at its next deadline (as a feed does).
            self.kick(device);
        }
    }

    /// Fill the connection's window from the inbox; `synced` once the replay has caught up
    /// (see `Reader::pump`).
    pub(super) fn pump(&mut self, index: usize, now: u64) {
        let window_cfg = self.window_config();
        let Some(entry) = self.conns.get_mut(index) else {
            return;
        };
        let Some(user) = entry.conn.user().map(CompactString::from) else {
            return;
        };
        if !self.mirror_ready(&user) {
            return; // pumped again when the user's inbox has loaded from Redis
        }
        let over = self.shared.cfg.inbox_summary_over;
        let entry = &mut self.conns[index];
        let summary_over = (over > 0 && entry.conn.wants_summary()).then_some(over);
        let inbox = InboxView {
            inbox: self.mirror.inbox(),
            user: &user,
        };
        let mut writes = std::mem::take(&mut self.reader_writes);
        if entry
            .reader
            .pump(window_cfg, inbox, summary_over, now, &mut writes)
        {
            self.metrics.window_full.inc();
        }
        let pushed = self.write_reader(index, &user, writes);
        // The window has new ack deadlines. A connection in a poll syncs its wheel entry at the
        // end of it; a parked one is only written to (`kick`), so without this its entry kept
        // the old, later deadline and a lost ack was not retransmitted until then (seen in CI:
        // no retransmit within 10 s with `ack_timeout_ms` 100).
        if pushed {
            self.sync_timer(index);
        }
    }

    /// Write what the connection's reader produced, counting it, and keep the emptied buffer
    /// for the next time; true when a `msg` went into its window.
    fn write_reader(&mut self, index: usize, user: &str, mut writes: Vec<Write>) -> bool {
        if writes.is_empty() {
            self.reader_writes = writes;
            return false;
        }
        let ctx = shard_ctx!(self);
        let conn = &mut self.conns[index].conn;
        let mut frame = std::mem::take(&mut self.frame);
        let mut pushed = false;
        for write in writes.drain(..) {
            frame.clear();
            match write {
                Write::Msg { seq, msg, replayed } => {
                    if proto::receipt_sender(&msg.cid).is_none() {
                        self.receipts.sent(user, &msg.from, msg.id);
                    }
                    self.metrics.acks_pending.inc();
                    self.metrics.msg_frames_out.inc();
                    if replayed {
                        self.metrics.replayed.inc();
                    }
                    proto::write_msg(&mut frame, seq, &msg);
                    pushed = true;
                }
                Write::Summary(senders) => {
                    proto::write_summary(&mut frame, &senders);
                    self.metrics.summaries.inc();
                }
                Write::Synced { replayed } => proto::write_synced(&mut frame, replayed),
                Write::Fetched { from, count, more } => {
                    proto::write_fetched(&mut frame, &from, count, more)
                }
            }
            conn.push_text(&frame, &ctx);
        }
        self.frame = frame;
        self.reader_writes = writes;
        pushed
    }

    /// `fetch` (after a `summary`): the next `limit` waiting messages of `from` (at most the
    /// window's room), as `msg` frames through the window like a replay's, then `fetched`.
    fn on_fetch(&mut self, index: usize, from: CompactString, limit: u32, now: u64) {
        let Some(user) = self.conns[index].conn.user().map(CompactString::from) else {
            return;
        };
        let inbox = InboxView {
            inbox: self.mirror.inbox(),
            user: &user,
        };
        let mut writes = std::mem::take(&mut self.reader_writes);
        let fetched = self.conns[index]
            .reader
            .fetch(from, limit, inbox, now, &mut writes);
        if let Err(refusal) = fetched {
            self.reader_writes = writes;
            return self.reply_bad_request(index, refusal.to_string(), now);
        }
        if self.write_reader(index, &user, writes) {
            self.sync_timer(index);
        }
    }

    /// `replay` (after a `summary`): the replay starts (what `fetch` sent and was not acked
    /// yet is stepped over), then `synced`. Without a summary pending it does nothing.
    fn on_replay(&mut self, index: usize, now: u64) {
        if self.conns[index].reader.replay() {
            self.pump(index, now);
        }
    }

    /// The connection's wheel entry fired: retransmit what is due, or give up on the client.
    pub(super) fn poll_window(&mut self, index: usize, now: u64) {
        let Some(entry) = self.conns.get_mut(index) else {
            return;
        };
        let polled = entry.reader.poll(now);
        if polled.resend.is_empty() && polled.expired.is_none() {
            return;
        }
        let ctx = shard_ctx!(self);
        let mut frame = std::mem::take(&mut self.frame);
        for (seq, msg) in polled.resend {
            ctx.metrics.retransmits.inc();
            push_msg(&mut entry.conn, &mut frame, seq, &msg, &ctx);
        }
        self.frame = frame;
        if let Some(dropped) = polled.expired {
            // Its messages stay in the inbox: the next connection of the user replays them.
            self.metrics.ack_timeouts.inc();
            self.metrics.acks_pending.sub(dropped as u64);
            entry.conn.close_unresponsive(now, &ctx);
        }
    }

    /// Refuse a send or publish whose frame would be longer than `max_frame` (`too_large`
    /// with its cid; counted with the bad frames).
    pub(super) fn refuse_too_large(&mut self, index: usize, cid: &str, now: u64) {
        let max = self.shared.cfg.max_frame;
        let why = format!("the message's frame would be longer than max_frame ({max} bytes)");
        let err = ClientRefusal::TooLarge(why).frame(Some(cid.into()));
        let ctx = shard_ctx!(self);
        self.conns[index].conn.reply_error(now, err, &ctx);
    }

    /// Refuse a frame of the connection at `index` that is well formed but wrong here
    /// (`bad_request`, no cid; the connection stays).
    pub(super) fn reply_bad_request(&mut self, index: usize, why: String, now: u64) {
        let err = ClientRefusal::BadRequest(why).frame(None);
        let ctx = shard_ctx!(self);
        self.conns[index].conn.reply_error(now, err, &ctx);
    }

    /// Append a text frame to a connection's output.
    pub(super) fn write_text(&mut self, index: usize, body: &[u8]) {
        let ctx = shard_ctx!(self);
        if let Some(entry) = self.conns.get_mut(index) {
            entry.conn.push_text(body, &ctx);
        }
    }
}

/// Why entries are owed to a user's devices: each has its own rule in the reader.
#[derive(Clone, Copy)]
pub(super) enum Owing {
    /// They left the inbox (a device acked them): owed to each device not sent them
    /// (`Reader::owe`).
    LeftInbox,
    /// They entered the inbox below positions some devices passed, never sent to those
    /// (`Reader::owe_passed`).
    PassedBelow,
}
