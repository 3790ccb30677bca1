//! The sender's side of direct delivery, as a machine (issue 15): on a user's home shard,
//! the dedup window of each sender homed there, the connections waiting for the answer to a
//! cid they resent, and what each answer becomes (the frame, and who gets it). No sockets, no
//! clock: the time comes with each input; the shard routes the messages and writes the frames.
//!
//! A `send` is submitted here: a cid this sender's window holds is answered from it (accepted
//! already, or on its way: the connection then waits for the first copy's answer); a new one
//! gets its id and goes to the recipient's home shard. Its answer (a [`Report`]) comes back
//! here: the window learns the id (`accepted`) or forgets the cid (refused: the client
//! resends it), and the frame goes to the sending connection and to those that resent it
//! meanwhile; `delivered` to every device of the sender.

use crate::hash::FastMap;
use std::sync::Arc;

use compact_str::CompactString;

use crate::delivery::ids::MessageIds;
use crate::delivery::message::{Message, Outcome, RefusedCids, ReplyTo, Report};
use crate::delivery::refusal::SendRefusal;
use crate::delivery::{Dedup, DedupConfig, Seen};
use crate::metrics::ShardMetrics;
use crate::proto;

/// A send or publish while this shard holds no message id slot (Redis has not granted or
/// renewed it in time: see `delivery/ids.rs`).
pub const NO_ID_SLOT: &str =
    "no message id slot (the offline store has not answered this shard's claim), resend later";

/// The clocks a submission reads: `now` (monotonic ms: the dedup window's age), the wall
/// clock (the message's `ts` and id) and `now_us` (the send -> accepted histogram).
#[derive(Debug, Clone, Copy)]
pub struct SendTime {
    pub now: u64,
    pub wall_ms: u64,
    pub now_us: u64,
}

/// One `send` (a client's, or `POST /api/send`'s for the backend sender).
pub struct Submission {
    pub from: CompactString,
    pub to: CompactString,
    pub cid: CompactString,
    pub body: Arc<str>,
    /// The backend's `type` (None for a client's message).
    pub msg_type: Option<Box<str>>,
    pub reply: ReplyTo,
    /// The client marked it `resend`.
    pub resent: bool,
}

/// What became of a submission.
pub enum Submitted {
    /// New: route it to the recipient's home shard.
    Route(Box<Message>),
    /// New, but no id could be given: answer this (as if it came back refused).
    Refused(Report),
    /// The first copy is on its way; its answer reaches this connection too
    /// ([`Senders::wait_for`]).
    InFlight,
    /// Accepted already under this id: answer `accepted` again, deliver nothing.
    AlreadyAccepted(u64),
}

/// Who gets an answer's frame.
pub enum Targets {
    /// Every device of the sender on this shard (`delivered`).
    AllDevices,
    /// These connections, each if it is still the one with that serial (slots are reused):
    /// the sending connection first, then those that resent the cid meanwhile.
    Conns(smallvec::SmallVec<[(usize, u32); 2]>),
}

/// What this shard keeps of a sender homed here.
struct Sender {
    dedup: Dedup,
    /// Wall-clock ms when it last arrived here (see [`Message::sender_arrived_ms`]).
    arrived_ms: u64,
}

/// Cids of a sender's first attempts refused before routing kept at once, over all its
/// recipients ([`Senders::refused_unrouted`]); past it every message of the sender carries
/// `overflowed` until its last connection here closes.
const MAX_UNROUTED_PER_SENDER: usize = 64;

/// A sender's attempts refused on this shard before they reached their recipients' home
/// shards, not carried there yet (see [`Senders::refused_unrouted`]).
#[derive(Default)]
struct Unrouted {
    /// By recipient, first attempts oldest first.
    by_recipient: FastMap<CompactString, Vec<CompactString>>,
    /// Recipients a resend to was refused (their cids are not kept: see
    /// [`RefusedCids::resend_refused`]).
    resends_to: Vec<CompactString>,
    /// More were refused than `MAX_UNROUTED_PER_SENDER`: which ones is not known, so every
    /// message of the sender carries `overflowed`.
    overflowed: bool,
}

impl Unrouted {
    /// Cids and resend marks kept, over all recipients (at most `MAX_UNROUTED_PER_SENDER`
    /// lists: counted on a refusal only).
    fn kept(&self) -> usize {
        self.by_recipient.values().map(Vec::len).sum::<usize>() + self.resends_to.len()
    }

    fn is_empty(&self) -> bool {
        self.by_recipient.is_empty() && self.resends_to.is_empty() && !self.overflowed
    }
}

/// The sender's side of direct delivery on one shard.
pub struct Senders {
    metrics: Arc<ShardMetrics>,
    /// The senders whose home is this shard, from their first send on.
    senders: FastMap<CompactString, Sender>,
    /// Connections that resent a cid whose first copy was still on its way, by (sender,
    /// cid): they get its answer too.
    waiters: FastMap<(CompactString, CompactString), Vec<(usize, u32)>>,
    /// By sender: see [`Senders::refused_unrouted`].
    unrouted: FastMap<CompactString, Unrouted>,
}

impl Senders {
    pub fn new(metrics: Arc<ShardMetrics>) -> Self {
        Senders {
            metrics,
            senders: FastMap::default(),
            waiters: FastMap::default(),
            unrouted: FastMap::default(),
        }
    }

    /// A send of `cid` from `from` to `to` was refused here before it reached the recipient's
    /// home shard (no message id slot, a full shard channel, `rate_limited`), so the
    /// recipient's mirror, which holds a pair's later messages back from the live path while
    /// a first attempt it refused is unstored (`InboxMirror::refused_unstored`) or after a
    /// resend it refused (`InboxMirror::unsure`), does not know of it. A first attempt's cid
    /// is kept, a resend only as a mark on the pair, until the pair's next message carries
    /// them there ([`Senders::carry_unrouted`]). The caller leaves out read receipts, as the
    /// mirror does.
    pub fn refused_unrouted(&mut self, from: &str, to: &str, cid: &CompactString, resent: bool) {
        let sender = self.unrouted.entry(from.into()).or_default();
        let known = match resent {
            true => sender.resends_to.iter().any(|r| r == to),
            false => (sender.by_recipient.get(to)).is_some_and(|cids| cids.contains(cid)),
        };
        if known {
            return;
        }
        if sender.kept() == MAX_UNROUTED_PER_SENDER {
            sender.overflowed = true;
            return;
        }
        match resent {
            true => sender.resends_to.push(to.into()),
            false => sender
                .by_recipient
                .entry(to.into())
                .or_default()
                .push(cid.clone()),
        }
    }

    /// `msg` is on its way to its recipient's home shard: it carries what its pair had
    /// refused before routing ([`Senders::refused_unrouted`]), and `overflowed` if the
    /// sender's refusals outgrew what is kept. A message refused on its way puts them back.
    /// A read receipt carries nothing: its id is the read message's, issued before the
    /// refusals maybe, and a resend's mark takes the pair's confirmation back from the
    /// carrier's id (`InboxMirror::unsure`).
    pub fn carry_unrouted(&mut self, msg: &mut Message) {
        // The common case: nothing refused before routing, no key hashed.
        if self.unrouted.is_empty() || !RefusedCids::holds_back(&msg.cid) {
            return;
        }
        let Some(sender) = self.unrouted.get_mut(&msg.from) else {
            return;
        };
        let cids = sender.by_recipient.remove(&msg.to).unwrap_or_default();
        let resend_refused = match sender.resends_to.iter().position(|r| *r == msg.to) {
            Some(at) => {
                sender.resends_to.swap_remove(at);
                true
            }
            None => false,
        };
        let carried = RefusedCids {
            cids,
            overflowed: sender.overflowed,
            order_unknown: false,
            resend_refused,
        };
        if sender.is_empty() {
            self.unrouted.remove(&msg.from);
        }
        if !carried.is_empty() {
            msg.refused_earlier = Some(Box::new(carried));
        }
    }

    /// `msg` was refused on its way after [`Senders::carry_unrouted`]: what it carried is kept
    /// again for the pair's next message.
    pub fn put_back_carried(&mut self, msg: &mut Message) {
        let Some(carried) = msg.refused_earlier.take() else {
            return;
        };
        for cid in &carried.cids {
            self.refused_unrouted(&msg.from, &msg.to, cid, false);
        }
        if carried.resend_refused {
            self.refused_unrouted(&msg.from, &msg.to, &msg.cid, true);
        }
        if carried.overflowed {
            self.unrouted
                .entry(msg.from.clone())
                .or_default()
                .overflowed = true;
        }
    }

    /// The cids [`Senders::refused_unrouted`] keeps for the pair, oldest first.
    #[cfg(test)]
    pub fn unrouted_of(&self, from: &str, to: &str) -> Vec<&str> {
        let pair = self.unrouted.get(from).and_then(|s| s.by_recipient.get(to));
        pair.map_or_else(Vec::new, |cids| cids.iter().map(|c| c.as_str()).collect())
    }

    /// Whether [`Senders::refused_unrouted`] keeps a refused resend's mark for the pair.
    #[cfg(test)]
    pub fn resend_unrouted_of(&self, from: &str, to: &str) -> bool {
        let sender = self.unrouted.get(from);
        sender.is_some_and(|s| s.resends_to.iter().any(|r| r == to))
    }

    /// `from`'s last connection here closed: its client resends what was not accepted, in
    /// send order, when it connects again, before anything new; those resends are marked
    /// and so never go live (see docs/operations.md, "Live delivery", for what is left).
    pub fn departed(&mut self, from: &str) {
        if !self.unrouted.is_empty() {
            self.unrouted.remove(from);
        }
    }

    /// Some connection waits for an answer.
    pub fn has_waiters(&self) -> bool {
        !self.waiters.is_empty()
    }

    /// `user`'s dedup window holds `cid` (accepted, or on its way).
    pub fn knows(&self, user: &str, cid: &str) -> bool {
        self.senders
            .get(user)
            .is_some_and(|s| !matches!(s.dedup.check(cid), Seen::New))
    }

    /// `user` arrived at `wall_ms`: a connection of theirs opened here (or, for the backend
    /// sender, a request came). A sender not known yet arrives with its first send.
    pub fn arrived(&mut self, user: &str, wall_ms: u64) {
        if let Some(sender) = self.senders.get_mut(user) {
            sender.arrived_ms = wall_ms;
        }
    }

    /// When `user` last arrived here ([`Senders::arrived`]); `wall_ms` if not known yet.
    pub fn arrived_ms(&self, user: &str, wall_ms: u64) -> u64 {
        self.senders.get(user).map_or(wall_ms, |s| s.arrived_ms)
    }

    /// Dedup, then an id; the message to route, or the answer from the window.
    pub fn submit(&mut self, s: Submission, ids: &mut MessageIds, t: SendTime) -> Submitted {
        self.metrics.sends.inc();
        let sender = self
            .senders
            .entry(s.from.clone())
            .or_insert_with(|| Sender {
                dedup: Dedup::new(DedupConfig::default()),
                arrived_ms: t.wall_ms,
            });
        let id = match sender
            .dedup
            .begin_new(&s.cid, t.now, || ids.next(t.wall_ms, t.now))
        {
            Ok(id) => id,
            Err(Seen::Accepted { id }) => {
                self.metrics.dedup_hits.inc();
                return Submitted::AlreadyAccepted(id);
            }
            Err(_) => {
                self.metrics.dedup_hits.inc();
                return Submitted::InFlight;
            }
        };
        // The box first, then the message written into it: built in a local and then boxed,
        // its ~170 bytes were copied once more (3% of a shard's samples at send 100 x 16).
        let msg = Box::write(
            Box::<Message>::new_uninit(),
            Message {
                id: id.unwrap_or(0),
                from: s.from,
                to: s.to,
                cid: s.cid,
                ts: t.wall_ms,
                body: s.body,
                msg_type: s.msg_type,
                reply: s.reply,
                received_us: t.now_us,
                write: Default::default(),
                resent: s.resent,
                sender_arrived_ms: sender.arrived_ms,
                refused_earlier: None,
            },
        );
        match id {
            Some(_) => Submitted::Route(msg),
            None => Submitted::Refused(msg.refused(SendRefusal::Busy(NO_ID_SLOT))),
        }
    }

    /// Connection `conn` (`serial`) resent `cid` while its first copy was on its way.
    pub fn wait_for(&mut self, from: CompactString, cid: CompactString, conn: usize, serial: u32) {
        let waiters = self.waiters.entry((from, cid)).or_default();
        if !waiters.contains(&(conn, serial)) {
            waiters.push((conn, serial));
        }
    }

    /// An answer came back: the sender's window learns it (its id, or that the cid may be
    /// sent again). Counted; the send -> accepted time observed (`now_us`, read only then).
    pub fn settle(&mut self, r: &Report, now_us: impl FnOnce() -> u64) {
        match &r.outcome {
            Outcome::Stored => {
                let took_us = now_us().saturating_sub(r.received_us);
                self.metrics
                    .send_accepted
                    .observe(std::time::Duration::from_micros(took_us));
                if let Some(s) = self.senders.get_mut(&r.from) {
                    s.dedup.accept_as(&r.cid, r.id);
                }
            }
            Outcome::Delivered => {}
            Outcome::Refused(why) => {
                if let Some(s) = self.senders.get_mut(&r.from) {
                    s.dedup.forget_pending(&r.cid);
                }
                self.metrics.refusals[why.source().index()].inc();
            }
        }
    }

    /// The answer to a client's send, settled ([`Senders::settle`]): its frame into `out`,
    /// and who gets it.
    pub fn answer(
        &mut self,
        r: &Report,
        now_us: impl FnOnce() -> u64,
        out: &mut Vec<u8>,
    ) -> Targets {
        self.settle(r, now_us);
        match &r.outcome {
            Outcome::Stored => proto::write_accepted(out, &r.cid, r.id),
            Outcome::Delivered => {
                self.metrics.delivered.inc();
                proto::write_delivered(out, &r.cid, r.id, &r.to);
            }
            Outcome::Refused(why) => {
                proto::write_error(out, &why.frame("not accepted", r.cid.as_str().into()))
            }
        }
        // `delivered`: every connection of the sender. An answer to a `send`: the sending
        // connection if it is still there, and any that resent the cid meanwhile; nobody else.
        // (Not every device of the sender: a connection that replaced the sending one would
        // then hear this `accepted` before the answers to the cids it resent first, although
        // those were accepted earlier: its order of `accepted` would not be the store's. It
        // resends this cid too, and hears it in its turn; found by tests/client_random.rs.)
        if r.reply.conn == u32::MAX {
            return Targets::AllDevices;
        }
        let mut conns = smallvec::smallvec![(r.reply.conn as usize, r.reply.serial)];
        // (Usually none wait: no key is built then.)
        if !self.waiters.is_empty() {
            let key = (r.from.clone(), r.cid.clone());
            conns.extend(self.waiters.remove(&key).unwrap_or_default());
        }
        Targets::Conns(conns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: SendTime = SendTime {
        now: 1_000,
        wall_ms: 1_700_000_000_000,
        now_us: 1_000_000,
    };

    fn senders() -> Senders {
        Senders::new(Arc::new(ShardMetrics::default()))
    }

    fn send(cid: &str, conn: u32) -> Submission {
        Submission {
            from: "ann".into(),
            to: "bob".into(),
            cid: cid.into(),
            body: "{}".into(),
            msg_type: None,
            reply: ReplyTo {
                shard: 0,
                conn,
                serial: 7,
            },
            resent: false,
        }
    }

    fn routed(s: Submitted) -> Box<Message> {
        match s {
            Submitted::Route(msg) => msg,
            _ => panic!("a new message expected"),
        }
    }

    #[test]
    fn a_resent_cid_waits_for_the_first_copy_and_both_connections_hear_its_answer() {
        let (mut s, mut ids) = (senders(), MessageIds::for_shard(0));
        let first = routed(s.submit(send("c1", 1), &mut ids, T));
        assert!(matches!(
            s.submit(send("c1", 2), &mut ids, T),
            Submitted::InFlight
        ));
        s.wait_for("ann".into(), "c1".into(), 2, 7);
        let id = first.id;
        let mut frame = Vec::new();
        let targets = s.answer(&first.report(id, Outcome::Stored), || T.now_us, &mut frame);
        assert!(matches!(targets, Targets::Conns(c) if c.as_slice() == [(1, 7), (2, 7)]));
        assert!(std::str::from_utf8(&frame)
            .unwrap()
            .contains("\"accepted\""));
        assert!(!s.has_waiters());
        // Accepted now: a third copy is answered from the window, under the same id.
        assert!(matches!(
            s.submit(send("c1", 3), &mut ids, T),
            Submitted::AlreadyAccepted(again) if again == id
        ));
    }

    #[test]
    fn a_refused_cid_may_be_sent_again_as_new() {
        let (mut s, mut ids) = (senders(), MessageIds::for_shard(0));
        let first = routed(s.submit(send("c1", 1), &mut ids, T));
        let refused = first.refused(SendRefusal::Busy("full"));
        let mut frame = Vec::new();
        s.answer(&refused, || T.now_us, &mut frame);
        assert!(std::str::from_utf8(&frame).unwrap().contains("\"error\""));
        assert!(!s.knows("ann", "c1"));
        routed(s.submit(send("c1", 1), &mut ids, T));
    }

    #[test]
    fn a_message_carries_when_its_sender_last_arrived() {
        let (mut s, mut ids) = (senders(), MessageIds::for_shard(0));
        s.arrived("ann", T.wall_ms - 50);
        let first = routed(s.submit(send("c1", 1), &mut ids, T));
        assert_eq!(
            first.sender_arrived_ms, T.wall_ms,
            "unknown until its first send"
        );
        s.arrived("ann", T.wall_ms + 5);
        let later = SendTime {
            wall_ms: T.wall_ms + 9,
            ..T
        };
        let second = routed(s.submit(send("c2", 1), &mut ids, later));
        assert_eq!(
            second.sender_arrived_ms,
            T.wall_ms + 5,
            "its connection opened then"
        );
        assert_eq!(s.arrived_ms("ann", 0), T.wall_ms + 5);
        assert_eq!(s.arrived_ms("cat", 42), 42);
    }

    #[test]
    fn delivered_goes_to_every_device_of_the_sender() {
        let (mut s, mut ids) = (senders(), MessageIds::for_shard(0));
        let mut msg = routed(s.submit(send("c1", 1), &mut ids, T));
        msg.reply = ReplyTo::all_devices(0);
        let id = msg.id;
        let mut frame = Vec::new();
        let targets = s.answer(&msg.report(id, Outcome::Delivered), || T.now_us, &mut frame);
        assert!(matches!(targets, Targets::AllDevices));
    }

    fn carried(msg: &Message) -> Option<(Vec<&str>, bool)> {
        let refused = msg.refused_earlier.as_ref()?;
        Some((
            refused.cids.iter().map(|c| c.as_str()).collect(),
            refused.overflowed,
        ))
    }

    /// A first attempt refused before routing is carried by the pair's next message, once:
    /// not by another pair's; a message refused on its way puts back what it carried.
    #[test]
    fn a_first_attempt_refused_before_routing_rides_with_the_pairs_next_message() {
        let (mut s, mut ids) = (senders(), MessageIds::for_shard(0));
        s.refused_unrouted("ann", "bob", &"c1".into(), false);
        s.refused_unrouted("ann", "bob", &"c1".into(), false);
        s.refused_unrouted("ann", "bob", &"c2".into(), false);
        let mut to_carl = routed(s.submit(send("k1", 1), &mut ids, T));
        to_carl.to = "carl".into();
        s.carry_unrouted(&mut to_carl);
        assert_eq!(carried(&to_carl), None, "another pair");
        let mut c3 = routed(s.submit(send("c3", 1), &mut ids, T));
        s.carry_unrouted(&mut c3);
        assert_eq!(carried(&c3), Some((vec!["c1", "c2"], false)));
        // c3 finds the recipient's shard channel full: c1, c2 (and c3) wait for c4.
        s.put_back_carried(&mut c3);
        s.refused_unrouted("ann", "bob", &"c3".into(), false);
        let mut c4 = routed(s.submit(send("c4", 1), &mut ids, T));
        s.carry_unrouted(&mut c4);
        assert_eq!(carried(&c4), Some((vec!["c1", "c2", "c3"], false)));
        let mut c5 = routed(s.submit(send("c5", 1), &mut ids, T));
        s.carry_unrouted(&mut c5);
        assert_eq!(carried(&c5), None, "carried once");
        assert!(s.unrouted.is_empty());
    }

    /// A resend refused before routing is carried as a mark on the pair, not as a cid: once,
    /// by the pair's next message, and put back with the rest when that one is refused on
    /// its way. Marks count toward the sender's cap.
    #[test]
    fn a_resend_refused_before_routing_marks_the_pairs_next_message() {
        let (mut s, mut ids) = (senders(), MessageIds::for_shard(0));
        s.refused_unrouted("ann", "bob", &"c1".into(), true);
        s.refused_unrouted("ann", "bob", &"c2".into(), true);
        s.refused_unrouted("ann", "bob", &"c3".into(), false);
        assert_eq!(s.unrouted["ann"].kept(), 2, "one mark per pair, and c3");
        let mark = |m: &Message| m.refused_earlier.as_ref().is_some_and(|r| r.resend_refused);
        let mut to_carl = routed(s.submit(send("k1", 1), &mut ids, T));
        to_carl.to = "carl".into();
        s.carry_unrouted(&mut to_carl);
        assert!(!mark(&to_carl), "another pair");
        // A read receipt of the pair: its id is the read message's, not issued after these.
        let mut receipt = routed(s.submit(send("k2", 1), &mut ids, T));
        receipt.cid = crate::proto::receipt_cid("ann", 1);
        s.carry_unrouted(&mut receipt);
        assert!(
            receipt.refused_earlier.is_none(),
            "a read receipt carries nothing"
        );
        let mut c4 = routed(s.submit(send("c4", 1), &mut ids, T));
        s.carry_unrouted(&mut c4);
        assert!(mark(&c4));
        assert_eq!(carried(&c4), Some((vec!["c3"], false)));
        s.put_back_carried(&mut c4);
        assert!(s.resend_unrouted_of("ann", "bob"));
        assert_eq!(s.unrouted_of("ann", "bob"), ["c3"]);
        let mut c5 = routed(s.submit(send("c5", 1), &mut ids, T));
        s.carry_unrouted(&mut c5);
        assert!(mark(&c5));
        let mut c6 = routed(s.submit(send("c6", 1), &mut ids, T));
        s.carry_unrouted(&mut c6);
        assert!(c6.refused_earlier.is_none(), "carried once");
        assert!(s.unrouted.is_empty());
        for n in 0..MAX_UNROUTED_PER_SENDER {
            s.refused_unrouted("ann", &format!("u{n}"), &format!("c{n}").into(), n % 2 == 0);
        }
        s.refused_unrouted("ann", "bob", &"c9".into(), true);
        assert!(s.unrouted["ann"].overflowed, "past the cap");
        assert!(!s.resend_unrouted_of("ann", "bob"));
    }

    /// Bounded per sender: past `MAX_UNROUTED_PER_SENDER` cids over all its recipients, no
    /// more are kept (nor their recipients), and every message of the sender carries
    /// `overflowed` (its pair is then held back until the recipient's mirror is dropped),
    /// until its last connection here closes.
    #[test]
    fn past_its_cap_a_sender_overflows_until_it_departs() {
        let (mut s, mut ids) = (senders(), MessageIds::for_shard(0));
        for n in 0..MAX_UNROUTED_PER_SENDER + 10 {
            s.refused_unrouted("ann", &format!("u{n}"), &format!("c{n}").into(), false);
        }
        let kept = &s.unrouted["ann"];
        assert_eq!(
            (kept.by_recipient.len(), kept.kept(), kept.overflowed),
            (MAX_UNROUTED_PER_SENDER, MAX_UNROUTED_PER_SENDER, true)
        );
        let mut sent = 0;
        let mut next = |s: &mut Senders, to: &str| {
            sent += 1;
            let mut msg = routed(s.submit(send(&format!("x{sent}"), 1), &mut ids, T));
            msg.to = to.into();
            s.carry_unrouted(&mut msg);
            msg
        };
        let u0 = next(&mut s, "u0");
        assert_eq!(carried(&u0), Some((vec!["c0"], true)));
        let last = format!("u{MAX_UNROUTED_PER_SENDER}");
        assert_eq!(carried(&next(&mut s, &last)), Some((vec![], true)));
        assert_eq!(carried(&next(&mut s, "never")), Some((vec![], true)));
        s.departed("ann");
        assert_eq!(carried(&next(&mut s, "u1")), None);
        assert!(s.unrouted.is_empty());
    }
}
