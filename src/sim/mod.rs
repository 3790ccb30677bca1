//! A seeded, deterministic simulation of one node of two shards in Redis mode (issue 15): the
//! real [`Shard`]s with in-memory streams for sockets, a manual clock, the real mesh between
//! them, and a model of Redis in place of the Redis thread, all driven by one PRNG over
//! virtual time. No threads, no network (the doorbells of the store links and of the mesh
//! are socketpairs nobody waits on).
//!
//! As in production, every connection lives on its user's home shard (`mesh::home_shard`;
//! the simulation admits it there, so no handoff happens), each shard has its own store link
//! (its own pipeline and answers) to the one Redis, a push goes to its user's home shard (as
//! the node's channel listener routes it), and a message whose recipient is homed on the other
//! shard crosses the mesh: the sender's shard gives it an id and sends it on, the recipient's
//! shard writes it to Redis and sends the sender's answer back through the mesh. The senders
//! and recipients are spread so that both same-shard and cross-shard pairs exist (asserted).
//! A step acts on one shard picked by the PRNG (its store link served, its answers heard, its
//! tick, its mesh drained); settling also drains both meshes.
//!
//! Faults the PRNG injects: a store call that fails at once, one that times out while its
//! write lands later (fred sending it after a reconnect, Redis still working), one whose
//! write never lands, one that ran but whose answer was lost, Redis down for a while, answers
//! held back and pushes interleaved with them, recipient devices that drop at any point,
//! acks lost, mesh channels of 1 to 16 messages (full ones happen in most runs: a send
//! refused for now, a report kept for the next tick), the node dying and starting again
//! (`node_dies`; `RINGGATE_SIM_NODE_DEATHS=0` leaves it out). Senders resend every cid they have no
//! `accepted` for, in cid order, with the upgrade or (half the time) a few steps later, and
//! tell their application `accepted` by the client libraries' rule (`client::order`). A user of
//! another node (`f0`) writes into the same inboxes through the store, in Redis order with
//! this shard's writes (its entries reach the shard as pushes and loads only).
//!
//! Checked at every step: `accepted` only once the message is safe (SPEC section 4: a
//! dedup record under that id in the store, or acked by a device of the recipient); the
//! `seq` of each device connection counts 1, 2, 3... without a gap (a retransmit repeats one).
//! Checked at the end of a run, once faults stop and everything settled: every message of
//! every sender accepted, shown exactly once to its recipient, with the id its sender was
//! told; per sender and recipient, shown in the order of `accepted`; nothing shown that was
//! never sent. Each device shows each sender's messages in `accepted` order; a device sent a
//! message again after it acked it is counted, not refused (clients drop it by (from, cid)).
//!
//! `the model's` [`Model::fence`] is the order fix in the store (the script's watermark and
//! resolve, `store/redis/script.lua`); with it off the simulation finds the hole of issue 15.
//! Replay one seed: `RINGGATE_SIM_SEED=<seed> cargo test --lib sim:: -- --nocapture`
//! (`RINGGATE_SIM_TRACE=1` prints what each shard hears from the store and the mesh);
//! a longer sweep: `RINGGATE_SIM_SEEDS=<count>`. The scripted tests at the end drive one
//! shard alone (`Sim::with_shards(.., 1)`).
//!
//! Several nodes (`Sim::with_nodes`, `tests::two_nodes`): two (or N) real nodes of two shards
//! each, every node its own mesh and store links, all sharing the one model of Redis. Every
//! connection opens on a node the PRNG picks (on its user's home shard there); a recipient
//! now and then has a device on each node. As the script does through the user's directory
//! entry (`loc`, filled by a node's load, emptied by its leave), Redis pushes an append to
//! every node holding the recipient, the writer's own included (`push(nodes, .., to_me)`),
//! and each node's listener routes it to the home shard there; so a sender on one node
//! reaches a recipient online on the other only through Redis (`cross_node_pushes`). A node
//! death kills one node (its half-landed queue, its dead writers and id slots, its directory
//! entries lapsing) while the others keep running; its senders connect again to any node 0-50
//! milliseconds later, its recipients' devices come back on any node. A sender whose
//! connection drops comes back on a node the PRNG picks (the node it left may still have its
//! writes on their way). Same invariants (what they found: `tests::two_nodes`).
//!
//! Presence (`presence.rs`) runs on the same shards, store faults and Redis model, with its own
//! actors (devices on this node and another, watchers) and its own invariants.

mod rooms;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_lite::{AsyncRead, AsyncWrite};

use crate::client::order::AcceptedOrder;
use crate::client::Event;
use crate::clock::{Clock, ManualClock};
use crate::config::ConfigLayer;
use crate::delivery::ids::IdGrant;
use crate::metrics::ShardMetrics;
#[cfg(test)]
use crate::shard::durable::OrderPlant;
use crate::shard::{ConnPoll, Shard, Shared};
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::{
    failed_reply, stream_id_to_seq, unsent_reply, Appended, Fate, Loaded, StoreEnd, StoreLink,
    StoreOp, StoreReply,
};
use crate::store::{InboxLimits, InboxSeq, StoreError, StoredMessage};
use crate::test_rng::Rng;
use crate::ws::frame::tests::client_frame;

mod presence;
mod shard_rooms;

/// A socket as the shard sees it: what the client wrote, what the shard wrote, and whether
/// the client has gone (a read then answers end of stream).
#[derive(Default)]
struct Pipe {
    input: VecDeque<u8>,
    output: Vec<u8>,
    read_at: usize,
    upgraded: bool,
    eof: bool,
    /// The client reads nothing: the socket takes no more bytes (a slow consumer).
    stalled: bool,
}

impl AsyncRead for Pipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.input.is_empty() {
            return if self.eof {
                Poll::Ready(Ok(0))
            } else {
                Poll::Pending
            };
        }
        let n = buf.len().min(self.input.len());
        for (i, b) in self.input.drain(..n).enumerate() {
            buf[i] = b;
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.stalled {
            return Poll::Pending;
        }
        self.output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Pipe {
    fn connect(user: &str) -> Pipe {
        let mut pipe = Pipe::default();
        pipe.input.extend(format!("GET /ws?user={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").bytes());
        pipe
    }

    fn send(&mut self, text: &str) {
        self.input
            .extend(client_frame(true, 1, text.as_bytes(), [7, 1, 3, 9]));
    }

    /// The JSON text frames the shard wrote since the last call.
    fn frames(&mut self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        if !self.upgraded {
            let Some(end) = self.output.windows(4).position(|w| w == b"\r\n\r\n") else {
                return out;
            };
            assert!(self.output.starts_with(b"HTTP/1.1 101"), "upgrade refused");
            self.upgraded = true;
            self.read_at = end + 4;
        }
        loop {
            let buf = &self.output[self.read_at..];
            if buf.len() < 2 {
                return out;
            }
            let (len, head) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => return out,
                n => (n as usize, 2),
            };
            if buf.len() < head + len {
                return out;
            }
            if buf[0] & 0x0f == 1 {
                out.push(serde_json::from_slice(&buf[head..head + len]).expect("a JSON frame"));
            }
            self.read_at += head + len;
        }
    }
}

/// Planted bugs: each must make a run fail (the invariants are shown to catch them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plant {
    None,
    /// A device is not owed what another device of its user acked first
    /// (`OrderPlant::OweNothing`).
    OweNothing,
    /// A reload owes nothing of what the store no longer has (`OrderPlant::OweNoneGone`): a
    /// device misses what a device on another node acked first.
    OweNoneGone,
    /// A load's read is taken in before its mark comes on the channel
    /// (`OrderPlant::ReadBeforeMark`): a device misses an entry whose push came after the
    /// read, acked on another node before it.
    ReadBeforeMark,
    /// The read of a load replaced before its mark came is forgotten
    /// (`OrderPlant::ForgetUnmarkedRead`): a device misses an entry that read had, acked on
    /// another node before the next read.
    ForgetUnmarkedRead,
    /// A pair goes live before a cid refused here is seen stored
    /// (`OrderPlant::LivePastRefused`).
    LivePastRefused,
    /// A send refused on its sender's shard before it reached its recipient's is not carried
    /// there by the pair's next message (`OrderPlant::LivePastUnrouted`).
    LivePastUnrouted,
    /// A delete Redis did not run is forgotten (`OrderPlant::ForgetUnremoved`): a later read
    /// brings its entry back.
    ForgetUnremoved,
    /// A reload owes what it lost above an entry left for the next read
    /// (`OrderPlant::OweAheadOfLeft`).
    OweAheadOfLeft,
    /// A reload owes what it lost above an entry of its read that waits for its write's
    /// answer (`OrderPlant::OweAheadOfWaiting`).
    OweAheadOfWaiting,
    /// The store without the order fix: no watermark (issue 15's hole; a resolve then
    /// answers "not landed" for a write that may still land).
    NoFence,
    /// The store answers every 50th append as stored without keeping it (a lost message,
    /// `accepted` before it was safe).
    DropWrite,
    /// The store's every 50th remove (after an ack) also removes the entry after it: a
    /// message stored, so accepted safely, and lost afterwards.
    RemoveNext,
    /// The senders' clients tell `accepted` answers as they come, without the client
    /// libraries' order rule (`client::order`): after lost answers, the answers to resends
    /// come in resend order, which can differ from store order.
    NoClientOrder,
    /// The senders' clients do not mark resends (`"resend":true`): a resend whose earlier
    /// attempt a dead node stored is shown live while Redis is away, under a new id (found
    /// by seed 11400714819323198485).
    Unflagged,
    /// The glue loses every 200th `msg` frame on its way to a device (the next one's seq
    /// skips a number).
    LoseFrame,
    /// The store keeps every 50th entry under another id than the one its sender was told.
    WrongId,
    /// The shard shows entries after one it could not place (behind live entries, or held
    /// behind a later one) before the reload that reads them in order.
    ShowPastMissing,
    /// A resent cid pays the send limit like a new one: a sender whose connection dropped
    /// is refused the resend of a message already stored, and hears `accepted` for later
    /// ones first.
    LimitResends,
    /// A pair's later messages go live past its resend refused as possibly stored
    /// (`OrderPlant::LivePastUnsure`).
    LivePastUnsure,
    /// A message goes live past an entry its recipient's shard stored whose push has not
    /// come yet (`OrderPlant::LivePastUnpushed`).
    LivePastUnpushed,
    /// A sender's message goes live on a node without a write of the pair issued since the
    /// sender arrived there and confirmed by the store (`OrderPlant::LiveUnconfirmed`):
    /// shown before a message another node stored and told `accepted` earlier.
    LiveUnconfirmed,
    /// A sender's message goes live below the pair's highest id the mirror took in
    /// (`OrderPlant::LiveBelowTop`).
    LiveBelowTop,
    /// A read's entries below a live entry's position are owed to no device that passed
    /// them (`OrderPlant::OweNonePassed`).
    OweNonePassed,
    /// A read that ran before a delete sent again, answered after it, takes the deleted
    /// entry in (`OrderPlant::ReadPastRemoved`).
    ReadPastRemoved,
    /// After a resend refused as possibly stored, any entry of the pair confirms it again
    /// (`OrderPlant::ConfirmBelowUnsure`).
    ConfirmBelowUnsure,
    /// The store lets a write land below the highest id its pair stored (the script's
    /// `~top`): another node's write whose answer was lost lands after the writes of the
    /// node its sender moved to, and ids no longer follow store order.
    NoPairTop,
    /// The store's `~top` compares ids alone: a write whose id is in the millisecond of the
    /// pair's top but from a higher issuer slot lands after it, though its send was read
    /// before the top's (ids of one millisecond order by slot, not by time).
    TopByIdOnly,
}

/// A dedup record: the first write of a cid (id, its writer and attempt).
struct Record {
    id: u64,
    writer: usize,
    attempt: u64,
}

/// Redis as the script (`store/redis/script.lua`) keeps it, reduced to what direct messages
/// use: inboxes, dedup records, each writer's watermark per pair, the directory. One Redis
/// for the whole node: every shard's store link writes into it; a writer is a shard (the
/// script's `writer`: node run and shard).
struct Model {
    plant: Plant,
    inbox: BTreeMap<String, BTreeMap<InboxSeq, StoredMessage>>,
    records: BTreeMap<(String, String, String), Record>,
    /// By (writer, recipient, sender).
    watermark: BTreeMap<(usize, String, String), u64>,
    /// By (recipient, sender): the highest id stored (the script's `~top`).
    top: BTreeMap<(String, String), u64>,
    /// (user, node): the directory of the script (`loc`), the nodes holding a device of the
    /// user; an append is pushed to each of them, the writer's own node too.
    located: BTreeSet<(String, usize)>,
    /// Presence on another node, and this node's watcher registrations (`presence.rs`).
    directory: presence::Directory,
    wall0: u64,
    last_id: (u64, u64),
    appends: u64,
    removes: u64,
    /// Entries a simulated node wrote and Redis pushed to another simulated node.
    cross_node_pushes: u64,
    /// (recipient, sender, id) of every entry ever put in an inbox: a message shown under
    /// an id never stored was shown live (from memory, Redis away).
    ever_stored: BTreeSet<(String, String, u64)>,
}

impl Model {
    fn next_seq(&mut self, now: u64) -> InboxSeq {
        let ms = self.wall0 + now;
        self.last_id = if ms > self.last_id.0 {
            (ms, 0)
        } else {
            (self.last_id.0, self.last_id.1 + 1)
        };
        stream_id_to_seq(&format!("{}-{}", self.last_id.0, self.last_id.1)).unwrap()
    }

    /// The simulated nodes in `user`'s directory entry, in order.
    fn nodes_of(&self, user: &str) -> Vec<usize> {
        self.located
            .range((user.to_string(), 0)..=(user.to_string(), usize::MAX))
            .map(|(_, n)| *n)
            .collect()
    }

    /// The script's `push(nodes, .., to_me)`: an inbox entry goes to every node in the
    /// recipient's directory entry (the writer's own too), each on its channel.
    fn push_entry(
        &mut self,
        writer_node: Option<usize>,
        to: &str,
        seq: InboxSeq,
        msg: &StoredMessage,
        pushes: &mut Vec<(usize, StoreReply)>,
    ) {
        for node in self.nodes_of(to) {
            if writer_node.is_some_and(|w| w != node) {
                self.cross_node_pushes += 1;
            }
            pushes.push((
                node,
                StoreReply::Pushed {
                    user: to.into(),
                    seq,
                    msg: msg.clone(),
                },
            ));
        }
    }

    /// Another node's append (its script call, in Redis order with this shard's): stored
    /// and pushed to every simulated node where the recipient is located.
    fn append_foreign(
        &mut self,
        to: &str,
        msg: StoredMessage,
        now: u64,
        pushes: &mut Vec<(usize, StoreReply)>,
    ) {
        let seq = self.next_seq(now);
        self.inbox
            .entry(to.to_string())
            .or_default()
            .insert(seq, msg.clone());
        self.push_entry(None, to, seq, &msg, pushes);
    }

    fn fence(&self) -> bool {
        self.plant != Plant::NoFence
    }

    /// The script's `~top` (no write lands below the highest id its pair stored). Off for
    /// the plants of the other order rules too: it refuses most late landings by itself, and
    /// would hide what each of them guards against on its own.
    fn pair_top(&self) -> bool {
        !matches!(
            self.plant,
            Plant::NoPairTop | Plant::NoFence | Plant::ShowPastMissing
        )
    }

    /// The script's `resolve`: per write of `pair` by `writer`, whether it landed (its
    /// record is that attempt's), or its cid is stored by another attempt, or neither; none
    /// lands later (without the fence: they still may).
    fn resolve(
        &mut self,
        writer: usize,
        pair: &(String, String),
        writes: &[(Box<str>, u64)],
    ) -> Vec<Fate> {
        let mut landed = Vec::with_capacity(writes.len());
        for (cid, attempt) in writes {
            if self.fence() {
                let wm = self
                    .watermark
                    .entry((writer, pair.0.clone(), pair.1.clone()))
                    .or_default();
                *wm = (*wm).max(*attempt);
            }
            let key = (pair.0.clone(), pair.1.clone(), cid.to_string());
            landed.push(match self.records.get(&key) {
                Some(r) if r.writer == writer && r.attempt == *attempt => Fate::Landed,
                Some(r) => Fate::Duplicate(r.id),
                None => Fate::Never,
            });
        }
        landed
    }

    /// Run one operation of `shard`'s store link (`shard`: its writer, see `Sim::writer`);
    /// its answer, and the pushes it made to the nodes' channels (by node).
    fn apply(
        &mut self,
        shard: usize,
        op: StoreOp,
        now: u64,
        pushes: &mut Vec<(usize, StoreReply)>,
    ) -> StoreReply {
        let node = shard / WRITER_SPACE;
        if trace() {
            match &op {
                StoreOp::Append(m) => eprintln!(
                    "{now} store ({shard}): append {}->{} cid {} id {} attempt {}",
                    m.from, m.to, m.cid, m.id, m.write.attempt
                ),
                StoreOp::Resolve { to, from, writes } => {
                    eprintln!("{now} store ({shard}): resolve {from}->{to} {writes:?}")
                }
                StoreOp::Remove { user, seq, .. } => {
                    eprintln!("{now} store ({shard}): remove {user} {seq}")
                }
                StoreOp::Load { user, .. } => eprintln!("{now} store ({shard}): load {user}"),
                _ => {}
            }
        }
        match op {
            StoreOp::Append(msg) => {
                let pair = (msg.to.to_string(), msg.from.to_string());
                if self.fence() {
                    let wm = self
                        .watermark
                        .entry((shard, pair.0.clone(), pair.1.clone()))
                        .or_default();
                    if msg.write.attempt <= *wm {
                        if trace() {
                            eprintln!("  -> stale (watermark {wm})");
                        }
                        return StoreReply::Appended {
                            msg,
                            result: Err(StoreError::Stale),
                        };
                    }
                    *wm = msg.write.attempt;
                }
                let key = (pair.0.clone(), pair.1.clone(), msg.cid.to_string());
                if let Some(r) = self.records.get(&key) {
                    let id = r.id;
                    if trace() {
                        eprintln!("  -> duplicate of id {id}");
                    }
                    return StoreReply::Appended {
                        msg,
                        result: Ok(Appended::Duplicate { id }),
                    };
                }
                if self.pair_top() {
                    let top = self.top.entry(pair.clone()).or_default();
                    let later = if self.plant == Plant::TopByIdOnly {
                        msg.id > *top
                    } else {
                        crate::delivery::ids::issued_after(msg.id, *top)
                    };
                    if !later {
                        if trace() {
                            eprintln!("  -> stale (pair's top id {top})");
                        }
                        return StoreReply::Appended {
                            msg,
                            result: Err(StoreError::Stale),
                        };
                    }
                    *top = msg.id;
                }
                self.appends += 1;
                let seq = self.next_seq(now);
                if trace() {
                    eprintln!("  -> stored at {seq:?}");
                }
                let planted = self.appends.is_multiple_of(50);
                if !(self.plant == Plant::DropWrite && planted) {
                    let mut entry = msg.stored();
                    if self.plant == Plant::WrongId && planted {
                        entry.id += 1;
                    }
                    self.inbox
                        .entry(pair.0.clone())
                        .or_default()
                        .insert(seq, entry.clone());
                    self.ever_stored
                        .insert((pair.0.clone(), pair.1.clone(), entry.id));
                    self.records.insert(
                        key,
                        Record {
                            id: msg.id,
                            writer: shard,
                            attempt: msg.write.attempt,
                        },
                    );
                    self.push_entry(Some(node), &pair.0, seq, &entry, pushes);
                }
                StoreReply::Appended {
                    msg,
                    result: Ok(Appended::Stored {
                        seq,
                        pushed: 0,
                        offline: false,
                    }),
                }
            }
            StoreOp::Resolve { to, from, writes } => {
                let landed = self.resolve(shard, &(to.to_string(), from.to_string()), &writes);
                StoreReply::Resolved {
                    to,
                    from,
                    writes,
                    landed: Some(landed),
                }
            }
            StoreOp::Remove { user, seq, report } => {
                let inbox = self.inbox.entry(user.to_string()).or_default();
                let ok = inbox.remove(&seq).is_some();
                self.removes += 1;
                if self.plant == Plant::RemoveNext && self.removes.is_multiple_of(50) {
                    let next = inbox.range(seq..).next().map(|(k, _)| *k);
                    if let Some(next) = next {
                        inbox.remove(&next);
                    }
                }
                StoreReply::Removed {
                    user,
                    seq,
                    ran: true,
                    ok,
                    report,
                }
            }
            StoreOp::Load { user, token, limit } => {
                self.located.insert((user.to_string(), node));
                let entries = self
                    .inbox
                    .get(user.as_str())
                    .map(|i| i.iter().take(limit).map(|(s, m)| (*s, m.clone())).collect())
                    .unwrap_or_default();
                // Published right after the read, on the node's channel (see `Push::ReadMark`).
                let mark = StoreReply::ReadMarked {
                    user: user.clone(),
                    token,
                };
                pushes.push((node, mark));
                StoreReply::Loaded {
                    user,
                    token,
                    result: Ok(Loaded {
                        received: Vec::new(),
                        entries,
                        expired: 0,
                    }),
                }
            }
            StoreOp::Leave { user } => {
                self.located.remove(&(user.to_string(), node));
                StoreReply::Done
            }
            StoreOp::Lease | StoreOp::Probe => StoreReply::Done,
            // The slot the shard asks to keep, else one of its own (per node and run).
            StoreOp::ClaimIdSlot { held, asked_at } => StoreReply::IdSlot {
                asked_at,
                answer: Ok(IdGrant {
                    slot: held.unwrap_or((node * 1024 + shard % WRITER_SPACE) as u16),
                    not_before_ms: 0,
                }),
            },
            op @ (StoreOp::Presence { .. } | StoreOp::WatchPresence { .. }) => self.presence_op(op),
            _ => panic!("the simulation has no rooms"),
        }
    }
}

/// One sender's messages to one recipient: cids 0..total, sent in order.
#[derive(Default, Debug)]
struct Conversation {
    sent: usize,
    /// Cids without `accepted`: in flight, or refused and waiting for the next resend round.
    in_flight: BTreeSet<usize>,
    /// When each cid in flight was last sent as a new attempt (first send, or a resend after
    /// a refusal): the order in which the gateway may have stored them.
    sent_at: BTreeMap<usize, u64>,
    /// When each cid was first sent (a count of transmissions): a device welcomed before
    /// that must be sent it (SPEC section 2: each connected device gets every message).
    first_sent: BTreeMap<usize, u64>,
    refused: Vec<usize>,
    /// Cids in the order `accepted` came, with the ids.
    accepted: Vec<(usize, u64)>,
    /// What the recipient showed (first copy of each cid), in order, with the ids.
    shown: Vec<(usize, u64)>,
    /// Cids shown live (Redis away, the recipient online) and then refused to their sender:
    /// a known gap of the live path, left open (issue 15's note), counted, not checked for
    /// order and id.
    shown_then_refused: BTreeSet<usize>,
    /// Cids whose first shown copy was live (its id in no inbox when shown): when its
    /// sender is told another id (the live entry was refused or died with the node, and
    /// the refusal may have been lost with a sender's connection), the same known gap.
    shown_live: BTreeSet<usize>,
    /// Every (cid, id) any device was shown live (its id in no inbox when shown).
    live_ids: BTreeSet<(usize, u64)>,
}

/// A sender's connection, on its home shard.
struct SenderConn {
    name: String,
    shard: usize,
    index: usize,
    pipe: Pipe,
    /// Its resends are not written yet (they go out before any new send).
    resends_due: bool,
}

/// What a simulated sender's client tells its application: `accepted` answers in the order
/// of the client libraries' rule (`client::order`: an answer is held while a send to the
/// same recipient first transmitted before its last transmission is unanswered; held
/// answers are told by id).
struct SenderApp {
    order: AcceptedOrder,
}

/// A recipient's device, on the recipient's home shard.
struct Device {
    user: usize,
    shard: usize,
    index: usize,
    pipe: Pipe,
    /// The highest `seq` this connection was sent (seqs count 1, 2, 3... per connection;
    /// a retransmit repeats one).
    last_seq: u64,
    /// Messages this connection was sent and has not acked yet: seq -> (sender, cid).
    unacked: BTreeMap<u64, (usize, usize)>,
    /// Transmissions counted when its `welcome` was read (its session had started).
    welcomed: Option<u64>,
    /// Every (sender, cid) this connection was sent.
    got: BTreeSet<(usize, usize)>,
    /// The same, in the order of their first copies on this connection, with the id of
    /// that copy and whether it was in the store when shown (not live): what its screen
    /// shows (the client drops a copy it has shown).
    shown_here: Vec<(usize, usize, u64, bool)>,
    /// The chance in 100 that an ack of this device is lost while faults run (10; a slow
    /// second device of `Sim::with_second_devices` loses more, so its window lags).
    ack_loss: u64,
}

/// What a device that went showed: (sender, cid, id, stored) in order.
struct GoneDevice {
    user: usize,
    shard: usize,
    shown: Vec<(usize, usize, u64, bool)>,
}

impl Device {
    fn new(user: usize, shard: usize, index: usize, pipe: Pipe) -> Device {
        Device {
            user,
            shard,
            index,
            pipe,
            last_seq: 0,
            unacked: BTreeMap::new(),
            welcomed: None,
            got: BTreeSet::new(),
            shown_here: Vec::new(),
            ack_loss: 10,
        }
    }
}

/// Counts printed with a run's seed.
#[derive(Default, Debug, PartialEq)]
pub(crate) struct Counts {
    pub steps: u64,
    pub store_ops: u64,
    pub faults: u64,
    pub late_landings: u64,
    pub drops: u64,
    /// Sender connections dropped (and opened again at once, resending).
    pub sender_drops: u64,
    pub acks_lost: u64,
    pub shown_then_refused: u64,
    /// Messages shown live (Redis away) that the node died with before a device's ack made
    /// them safe: the same known gap of the live path (their resends get a new id and
    /// place), counted with `shown_then_refused`'s cids, not checked for order and id.
    pub shown_live_then_died: u64,
    /// Messages shown live whose senders were told another id in the end (the live path's
    /// known gap, however the refusal went; includes most of the two above).
    pub live_told_other: u64,
    /// Messages shown live (from a node's memory while Redis was away from it).
    pub shown_live: u64,
    /// Stored copies a device showed (or the user showed first) of a cid whose sender was
    /// told the id of a live copy shown elsewhere: the same known gap seen from another
    /// device (the sender's resend, made before the live `accepted` reached it, was stored
    /// under a new id, in its place in Redis: a device on another node shows that copy
    /// there). Not checked against the `accepted` order; on a device such copies must
    /// still come in store (id) order among themselves.
    pub live_copy_elsewhere: u64,
    pub shown: u64,
    pub checks: u64,
    /// Messages the shards took from the mesh (deliveries and reports across shards).
    pub mesh_msgs: u64,
    /// Times a shard found another's channel full.
    pub mesh_full: u64,
    /// Times the node died (SIGKILL) and started again.
    pub node_deaths: u64,
    /// Entries written by one simulated node and pushed to another (multi-node runs).
    pub cross_node_pushes: u64,
    /// Resyncs in the middle of a run (`Sim::resyncs`).
    pub resyncs: u64,
    /// `msg` frames of a message a device was sent again after it had acked it: allowed
    /// (delivery is at-least-once; the client drops a `(from, cid)` it has shown), counted.
    pub sent_again_after_ack: u64,
}

/// Which store stands at the far end of the shards' store links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreKind {
    /// The model of Redis, shared by the node's shards (and another node's writer).
    Redis,
    /// The real embedded store, one per shard, as `Shard::new` sets it up, but answering
    /// through the simulation: its answers are held back and interleaved with everything
    /// else (in production they come in the shard's turn), and small inboxes refuse
    /// (`full`). The faults of a remote store (timeouts, lost answers, late landings, down)
    /// and the other node's writer do not apply.
    Embedded,
}

/// Inbox cap in embedded runs: small, so that full inboxes refuse sends.
const EMBEDDED_INBOX_CAP: usize = 3;

pub(crate) struct Sim {
    rng: Rng,
    kind: StoreKind,
    /// Per shard, its embedded store (embedded runs only).
    embedded: Vec<EmbeddedStore>,
    /// Appends the embedded stores ran (for the planted bugs).
    embedded_appends: u64,
    clock: Rc<ManualClock>,
    /// The node's shards, connected by the mesh.
    shards: Vec<Shard>,
    /// Their counters (read for the counts: how often a mesh channel was full).
    metrics: Vec<Arc<ShardMetrics>>,
    /// What a node boots with (again after it died).
    cfg: crate::config::Config,
    mesh_capacity: usize,
    /// Whether the node may die (see `node_dies`): in every Redis run;
    /// `RINGGATE_SIM_NODE_DEATHS=0` turns it off (to tell a finding of deaths from others).
    node_deaths: bool,
    /// Simulated nodes (1, or more in multi-node runs), each of `per_node` shards: the
    /// vectors per shard hold node 0's shards, then node 1's... (global index
    /// `node * per_node + shard`).
    nodes: usize,
    per_node: usize,
    /// Per node, its run: 0, then 1 after its first death... Each run's shards are other
    /// writers to Redis (the script's writer is node run and shard).
    runs: Vec<usize>,
    /// Whether a sender whose connection drops may connect again to another node (several
    /// nodes): the node it left may still have writes of the same pairs on their way.
    sender_moves: bool,
    /// The mesh clients of the nodes after the first (kept as the admin API keeps them).
    other_mesh_clients: Vec<crate::shard::msg::ShardMeshClient>,
    /// Each shard's store link (its own pipeline to the one Redis).
    stores: Vec<StoreEnd>,
    model: Model,
    /// Redis is down until this virtual time.
    down_until: u64,
    /// Operations that timed out but land later, with the time they land and their writer.
    late: Vec<(u64, usize, StoreOp)>,

    /// Per shard: its store link's answers on their way to it, in order.
    to_shard: Vec<VecDeque<StoreReply>>,
    /// Per shard: what its node's channel carries for it (pushes, resyncs), in order. Another
    /// connection than the answers' (fred's subscriber): the two interleave either way, so
    /// a write's answer may come before its push.
    channel: Vec<VecDeque<StoreReply>>,
    senders: Vec<SenderConn>,
    /// Per sender: no frame before this virtual time (the `retry_ms` of its last
    /// `rate_limited`, which the client libraries wait out; a connection that keeps
    /// sending past its frame limit is closed).
    retry_at: Vec<u64>,
    /// Per sender (one client instance for the whole run).
    apps: Vec<SenderApp>,
    /// Virtual time 0 as an `Instant` (the client's order rule takes `Instant`s).
    origin: std::time::Instant,
    /// Sender connections dropped by their client, until their shard closed them.
    closing: Vec<SenderConn>,
    /// Sends written by all senders so far (orders each cid's last new attempt).
    transmissions: u64,
    recipients: Vec<String>,
    devices: Vec<Device>,
    /// Several nodes: (shard, recipient, sender, cid) of each entry a shard was pushed or
    /// read, in its node's current run. A device can only be owed what its node heard of: an
    /// entry appended and acked by a device on another node while this node could not hear
    /// it (its load failed, or came after) never reaches it (docs/protocol.md).
    heard: BTreeSet<(usize, usize, usize, usize)>,
    /// Devices gone (closed, or dead with their node), for the per-device order check at
    /// the end.
    gone_devices: Vec<GoneDevice>,
    /// Whether shards resync now and then in the middle of a run (Redis runs): a lease
    /// found lapsed, or the node's channel subscribed again with what was published
    /// meanwhile lost (`Sim::with_resyncs`).
    resyncs: bool,
    /// One node: the chance in 100 that a recipient's connect event adds a second device on
    /// its home shard (20; `Sim::with_second_devices` raises it), and the chance in 100 that
    /// such a device loses an ack while faults run.
    second_device_chance: u64,
    second_device_ack_loss: u64,
    /// A second device of a recipient may open on its home shard (always with one node).
    same_shard_second_devices: bool,
    conv: BTreeMap<(usize, usize), Conversation>,
    /// (sender, recipient, cid) a device of the recipient acked: safe without the store.
    acked: BTreeSet<(usize, usize, usize)>,
    /// `msg` frames the devices read (the `LoseFrame` plant counts them).
    msg_frames: u64,
    per_pair: usize,
    pub(crate) counts: Counts,
    /// A sender into every shard's channel of node 0 (as the admin API has): fills one to
    /// make it full.
    mesh_client: crate::shard::msg::ShardMeshClient,
}

const SENDERS: usize = 2;
/// The sender index of `f0`, a user of another node whose messages reach the recipients'
/// inboxes (and this shard) only through the store, in Redis order with this shard's writes.
const FOREIGN: usize = SENDERS;
/// A sender's cid to recipient r is r * CID_SPACE + n.
const CID_SPACE: usize = 1_000;
const RECIPIENTS: usize = 2;
/// Shards of the simulated node.
const SHARDS: usize = 2;
/// Writers (see `Sim::writer`) of node `n` are `n * WRITER_SPACE + run * shards + shard`.
const WRITER_SPACE: usize = 1 << 20;

fn trace() -> bool {
    std::env::var("RINGGATE_SIM_TRACE").is_ok()
}

impl Sim {
    /// The simulation: `SHARDS` shards, with same-shard and cross-shard pairs.
    pub(crate) fn new(seed: u64, plant: Plant) -> Sim {
        Sim::of_kind(seed, plant, StoreKind::Redis)
    }

    pub(crate) fn of_kind(seed: u64, plant: Plant, kind: StoreKind) -> Sim {
        let sim = Sim::build(seed, plant, SHARDS, kind);
        let home = |user: &str| crate::mesh::home_shard(user, SHARDS);
        let pairs: Vec<bool> = sim
            .senders
            .iter()
            .flat_map(|s| sim.recipients.iter().map(|r| home(&s.name) == home(r)))
            .collect();
        assert!(
            pairs.contains(&true) && pairs.contains(&false),
            "both same-shard and cross-shard pairs"
        );
        sim
    }

    pub(crate) fn with_shards(seed: u64, plant: Plant, shards: usize) -> Sim {
        Sim::build(seed, plant, shards, StoreKind::Redis)
    }

    /// `nodes` real nodes of `SHARDS` shards each, sharing the model of Redis: every
    /// connection (sender or device) opens on a node the PRNG picks, on its user's home
    /// shard there.
    pub(crate) fn with_nodes(seed: u64, plant: Plant, nodes: usize) -> Sim {
        Sim::build_nodes(seed, plant, SHARDS, nodes, StoreKind::Redis)
    }

    /// As [`Sim::with_nodes`], with shards resyncing in the middle of runs.
    pub(crate) fn with_resyncs(seed: u64, plant: Plant, nodes: usize) -> Sim {
        let mut sim = Sim::with_nodes(seed, plant, nodes);
        sim.resyncs = true;
        sim
    }

    /// One node, where a recipient's connect event adds a second device on its home shard
    /// three times as often, and that device loses most of its acks (its window lags the
    /// first device's): the devices of one user on one shard, each with its window, are what
    /// owing entries is for.
    pub(crate) fn with_second_devices(seed: u64, plant: Plant) -> Sim {
        let mut sim = Sim::new(seed, plant);
        sim.second_device_chance = 60;
        sim.second_device_ack_loss = 70;
        sim
    }

    /// As [`Sim::with_second_devices`] with `nodes` nodes: a recipient's connect event adds
    /// a second device now and then on the other node (as in [`Sim::with_nodes`]), and
    /// otherwise, as often as there, on its home shard, losing most of its acks.
    pub(crate) fn with_nodes_and_second_devices(seed: u64, plant: Plant, nodes: usize) -> Sim {
        let mut sim = Sim::with_nodes(seed, plant, nodes);
        sim.same_shard_second_devices = true;
        sim.second_device_chance = 60;
        sim.second_device_ack_loss = 70;
        sim
    }

    /// Every fault at once: `nodes` nodes with slow second devices
    /// ([`Sim::with_nodes_and_second_devices`]) whose shards also resync
    /// ([`Sim::with_resyncs`]).
    pub(crate) fn with_all_of_it(seed: u64, plant: Plant, nodes: usize) -> Sim {
        let mut sim = Sim::with_nodes_and_second_devices(seed, plant, nodes);
        sim.resyncs = true;
        sim
    }

    fn build(seed: u64, plant: Plant, shards: usize, kind: StoreKind) -> Sim {
        Sim::build_nodes(seed, plant, shards, 1, kind)
    }

    fn build_nodes(seed: u64, plant: Plant, shards: usize, nodes: usize, kind: StoreKind) -> Sim {
        let mut rng = Rng(seed.max(1));
        let clock = Rc::new(ManualClock::new(1_000));
        let embedded = kind == StoreKind::Embedded;
        let layer = ConfigLayer {
            shards: Some(shards),
            window: Some(4),
            ack_timeout_ms: Some(200),
            heartbeat_ms: Some(3_600_000),
            park_idle_ms: Some(0),
            inbox_max_messages: embedded.then_some(EMBEDDED_INBOX_CAP),
            ..ConfigLayer::default()
        };
        let cfg = layer.resolve().unwrap();
        // Channels of 1 to 16 messages: a full channel (a send refused for now, a report
        // kept for the next tick) happens in most runs.
        let capacity = 1 + rng.below(16) as usize;
        let (mut all, mut metrics, mut stores, mesh_client) =
            boot_node(&cfg, capacity, &clock, plant, kind);
        let mut other_mesh_clients = Vec::new();
        for _ in 1..nodes {
            let (more, more_metrics, more_stores, client) =
                boot_node(&cfg, capacity, &clock, plant, kind);
            all.extend(more);
            metrics.extend(more_metrics);
            stores.extend(more_stores);
            other_mesh_clients.push(client);
        }
        let per_pair = 10 + rng.below(30) as usize;
        let limits = InboxLimits {
            max_messages: EMBEDDED_INBOX_CAP,
            ..InboxLimits::default()
        };
        let mut sim = Sim {
            rng,
            kind,
            embedded: match kind {
                StoreKind::Redis => Vec::new(),
                StoreKind::Embedded => (0..shards).map(|_| EmbeddedStore::new(limits)).collect(),
            },
            embedded_appends: 0,
            clock,
            shards: all,
            metrics,
            stores,
            cfg,
            mesh_capacity: capacity,
            // (The embedded store dies with its node: nothing to simulate across a death.)
            node_deaths: kind == StoreKind::Redis
                && std::env::var("RINGGATE_SIM_NODE_DEATHS").as_deref() != Ok("0"),
            nodes,
            per_node: shards,
            runs: vec![0; nodes],
            sender_moves: nodes > 1,
            other_mesh_clients,
            model: Model {
                plant,
                inbox: BTreeMap::new(),
                records: BTreeMap::new(),
                watermark: BTreeMap::new(),
                top: BTreeMap::new(),
                located: BTreeSet::new(),
                directory: presence::Directory::default(),
                wall0: ManualClock::WALL_ORIGIN_MS,
                last_id: (0, 0),
                appends: 0,
                removes: 0,
                cross_node_pushes: 0,
                ever_stored: BTreeSet::new(),
            },
            down_until: 0,
            late: Vec::new(),

            to_shard: (0..shards * nodes).map(|_| VecDeque::new()).collect(),
            channel: (0..shards * nodes)
                .map(|_| VecDeque::from([StoreReply::Resync]))
                .collect(),
            senders: Vec::new(),
            retry_at: vec![0; SENDERS],
            apps: Vec::new(),
            origin: std::time::Instant::now(),
            closing: Vec::new(),
            transmissions: 0,
            recipients: (0..RECIPIENTS).map(|r| format!("r{r}")).collect(),
            devices: Vec::new(),
            heard: BTreeSet::new(),
            gone_devices: Vec::new(),
            resyncs: false,
            second_device_chance: 20,
            second_device_ack_loss: 10,
            same_shard_second_devices: nodes == 1,
            conv: BTreeMap::new(),
            acked: BTreeSet::new(),
            msg_frames: 0,
            per_pair,
            counts: Counts::default(),
            mesh_client,
        };
        for s in 0..SENDERS {
            let name = format!("s{s}");
            let node = sim.pick_node();
            let shard = sim.home(node, &name);
            let index = sim.shards[shard].admit(0).unwrap();
            let pipe = Pipe::connect(&name);
            sim.senders.push(SenderConn {
                name,
                shard,
                index,
                pipe,
                resends_due: false,
            });
            sim.apps.push(SenderApp {
                order: AcceptedOrder::new(std::time::Duration::from_secs(10)),
            });
            for r in 0..RECIPIENTS {
                sim.conv.insert((s, r), Conversation::default());
            }
        }
        for r in 0..RECIPIENTS {
            if kind == StoreKind::Redis {
                sim.conv.insert((FOREIGN, r), Conversation::default());
            }
        }
        sim
    }

    /// Shard `k` (global index) of its node's run as a writer to Redis.
    fn writer(&self, k: usize) -> usize {
        let (node, shard) = (k / self.per_node, k % self.per_node);
        node * WRITER_SPACE + self.runs[node] * self.per_node + shard
    }

    /// The global index of `user`'s home shard on `node`.
    fn home(&self, node: usize, user: &str) -> usize {
        node * self.per_node + crate::mesh::home_shard(user, self.per_node)
    }

    /// A node for a connection or a death (no draw with one node: its runs replay as
    /// before).
    fn pick_node(&mut self) -> usize {
        if self.nodes == 1 {
            0
        } else {
            self.rng.below(self.nodes as u64) as usize
        }
    }

    /// A node dies (SIGKILL) and starts again with the same Redis: every connection to it and
    /// everything in its shards' memory is gone. Of its store operations, those already in
    /// Redis's socket buffer (half of the queued ones, when Redis is up) land at the death,
    /// in order, before the new run can write (it needs a new Redis connection, and its
    /// clients must connect first); the rest, and every retry fred kept, die with it.
    /// (A dead run's write landing after the new run's, Redis stalled for longer than a
    /// restart, is left open: see docs/operations.md.) Its registrations in the directory
    /// lapse (nothing is pushed to a dead run). Its senders connect again, to the new run or
    /// (several nodes) to any node, and resend what has no `accepted`; devices come back
    /// later, on any node. The other nodes keep running.
    fn node_dies(&mut self) {
        let now = self.now();
        let node = self.pick_node();
        let shards = node * self.per_node..(node + 1) * self.per_node;
        if trace() {
            eprintln!("{now} node {node} dies (run {})", self.runs[node]);
        }
        self.counts.node_deaths += 1;
        // Shown and never stored: live entries (Redis away) no ack made safe. They die
        // here; their resends get new ids and places (the live path's known gap, as when
        // a spill is refused; see docs/operations.md). (With several nodes, those shown by
        // a surviving node are counted too: lenient.)
        for ((s, r), c) in self.conv.iter_mut() {
            if *s == FOREIGN {
                continue;
            }
            for (cid, _) in &c.shown {
                let key = (
                    self.recipients[*r].clone(),
                    format!("s{s}"),
                    format!("\"{}\"", r * CID_SPACE + cid),
                );
                let accepted = c.accepted.iter().any(|(a, _)| a == cid);
                if !accepted
                    && !self.model.records.contains_key(&key)
                    && c.shown_then_refused.insert(*cid)
                {
                    self.counts.shown_live_then_died += 1;
                }
            }
        }
        self.counts.mesh_full += self.metrics[shards.clone()]
            .iter()
            .map(|m| m.mesh_full.get())
            .sum::<u64>();
        if self.down_until <= now {
            for k in shards.clone() {
                let writer = self.writer(k);
                while let Ok(op) = self.stores[k].ops.try_recv() {
                    if self.chance(50) {
                        // Its pushes to this node go to its queues, cleared below.
                        let mut pushes = Vec::new();
                        let _ = self.model.apply(writer, op, now, &mut pushes);
                        self.route(pushes);
                        self.counts.late_landings += 1;
                    }
                }
            }
        }
        if self.nodes > 1 {
            // Its clients connect elsewhere 0-50 ms later: in the same millisecond, the
            // ids a survivor gives their resends may be below the dead run's last (ids
            // order by time, then slot), which the script's `~top` refuses. (One clock for
            // every node here: skew between nodes is not simulated.)
            let ms = self.rng.below(51);
            self.clock.advance(ms);
        }
        let now = self.now();
        let first_writer = self.writer(shards.start);
        let this_run = first_writer..first_writer + self.per_node;
        self.late
            .retain(|(_, writer, _)| !this_run.contains(writer));
        self.runs[node] += 1;
        let (new_shards, metrics, stores, mesh_client) = boot_node(
            &self.cfg,
            self.mesh_capacity,
            &self.clock,
            self.model.plant,
            self.kind,
        );
        if node == 0 {
            self.mesh_client = mesh_client;
        } else {
            self.other_mesh_clients[node - 1] = mesh_client;
        }
        self.shards.splice(shards.clone(), new_shards);
        self.metrics.splice(shards.clone(), metrics);
        self.stores.splice(shards.clone(), stores);
        for queue in &mut self.to_shard[shards.clone()] {
            queue.clear();
        }
        for queue in &mut self.channel[shards.clone()] {
            *queue = VecDeque::from([StoreReply::Resync]);
        }
        // The node's registrations die with it (Redis forgets them when its lease runs out;
        // nothing is pushed to a dead run).
        self.model.located.retain(|(_, n)| *n != node);
        self.closing.retain(|c| !shards.contains(&c.shard));
        let (dead, alive) = std::mem::take(&mut self.devices)
            .into_iter()
            .partition(|d| shards.contains(&d.shard));
        self.devices = alive;
        for d in dead {
            self.device_gone(d);
        }
        self.heard.retain(|(k, ..)| !shards.contains(k));
        for s in 0..self.senders.len() {
            if !shards.contains(&self.senders[s].shard) {
                continue;
            }
            let name = self.senders[s].name.clone();
            let to = self.pick_node();
            let shard = self.home(to, &name);
            if trace() {
                eprintln!("{now} {name} connects to node {to} (shard {shard})");
            }
            let Some(index) = self.shards[shard].admit(0) else {
                panic!("shard {shard} admits a sender");
            };
            self.senders[s] = SenderConn {
                name: name.clone(),
                shard,
                index,
                pipe: Pipe::connect(&name),
                resends_due: true,
            };
        }
    }
    /// A shard for a step that acts on one.
    fn pick_shard(&mut self) -> usize {
        self.rng.below(self.shards.len() as u64) as usize
    }

    /// Route the pushes Redis made to each node's channel, as the node's listener does: each
    /// to its user's home shard on that node.
    fn route(&mut self, pushes: Vec<(usize, StoreReply)>) {
        for (node, push) in pushes {
            let (StoreReply::Pushed { user, .. }
            | StoreReply::PresenceChanged { user, .. }
            | StoreReply::ReadMarked { user, .. }) = &push
            else {
                unreachable!("only pushes are routed");
            };
            let home = self.home(node, user);
            self.channel[home].push_back(push);
        }
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    /// Run `steps` faulty steps, then settle without faults; Err: what broke.
    pub(crate) fn run(&mut self, steps: u64) -> Result<(), String> {
        for _ in 0..steps {
            self.step(true)?;
            self.check_mirror_states()?;
        }
        // Settle: Redis up, every late write lands (the worst time for it), no drops.
        self.down_until = 0;
        for _ in 0..200_000 {
            if self.settled() {
                // What is still in the mesh (reports of deliveries) is served too: a second
                // answer to a sender would be found here.
                if self.drain_meshes()? == 0 {
                    return self.check();
                }
                continue;
            }
            self.step(false)?;
        }
        Err(format!("did not settle: {}", self.unsettled()))
    }

    fn step(&mut self, faults: bool) -> Result<(), String> {
        self.counts.steps += 1;
        if faults && self.node_deaths && self.rng.below(2_000) == 0 {
            self.node_dies();
        }
        if faults && self.resyncs && self.rng.below(400) == 0 {
            self.shard_resyncs();
        }
        match self.rng.below(12) {
            0 => self.sender_acts(),
            1 => {
                if faults && self.chance(5) {
                    self.sender_reconnects();
                } else {
                    self.sender_acts();
                }
            }
            10 => self.foreign_sends(),
            11 => {
                let k = self.pick_shard();
                self.shard_drains_mesh(k);
            }
            2 => self.device_comes_or_goes(faults),
            3 | 4 => self.store_serves(faults),
            5 => self.land_late(faults),
            6 | 7 => self.shard_hears_store(),
            _ => {
                let k = self.pick_shard();
                let ms = 1 + self.rng.below(30);
                self.clock.advance(ms);
                self.shards[k].on_tick();
            }
        }
        self.poll_all();
        self.read_senders()?;
        self.read_devices(faults)
    }

    fn sender_acts(&mut self) {
        let s = self.rng.below(SENDERS as u64) as usize;
        if self.now() < self.retry_at[s] {
            return;
        }
        if self.senders[s].resends_due {
            return self.sender_resends(s);
        }
        let r = self.rng.below(RECIPIENTS as u64) as usize;
        let per_pair = self.per_pair;
        let c = self.conv.get_mut(&(s, r)).unwrap();
        let mut cids = Vec::new();
        let resend = !c.refused.is_empty();
        if resend {
            // A resend round: every refused cid, in cid order.
            c.refused.sort_unstable();
            cids = std::mem::take(&mut c.refused);
        } else if c.sent < per_pair && c.in_flight.len() < 8 {
            cids.push(c.sent);
            c.sent += 1;
        }
        c.in_flight.extend(cids.iter().copied());
        for n in &cids {
            self.transmissions += 1;
            c.sent_at.insert(*n, self.transmissions);
            c.first_sent.entry(*n).or_insert(self.transmissions);
        }
        let to = &self.recipients[r];
        for n in cids {
            // Cids are unique per sender: the answers name only the cid.
            let cid = r * CID_SPACE + n;
            let text = send_frame(to, cid, n, resend && self.model.plant != Plant::Unflagged);
            self.senders[s].pipe.send(&text);
            if trace() {
                let (now, shard) = (self.now(), self.senders[s].shard);
                eprintln!("{now} s{s} sends cid \"{cid}\" (shard {shard})");
            }
            let at = self.instant();
            self.apps[s].order.transmitted(cid as u64, to, at);
        }
    }

    /// A sender's connection drops (what the shard wrote to it is never read) and the sender
    /// connects again at once and resends every cid it has no `accepted` for (written with
    /// the upgrade, read by the shard in one poll, as `ringgate::client` writes them right
    /// after its handshake): those in flight in the order they were last sent as new
    /// attempts, then the refused ones. The old connection is closed by its shard in later
    /// polls. (Resends written in a later step, with answers processed in between, find
    /// order edges when answers were lost: see the README, "Known limits".)
    fn sender_reconnects(&mut self) {
        let s = self.rng.below(SENDERS as u64) as usize;
        let shard = if !self.sender_moves {
            self.senders[s].shard
        } else {
            let node = self.pick_node();
            self.home(node, &self.senders[s].name)
        };
        if !self.connect_sender_again(s, shard, true) {
            return;
        }
        self.counts.sender_drops += 1;
        // Written with the upgrade (as `ringgate::client` does), or a few steps later, with
        // answers and store replies served in between.
        // (Planted LimitResends runs the senders as before the client rule: resends with the
        // upgrade, answers told as they come, so that order shows the gateway's own.)
        if self.model.plant == Plant::LimitResends || self.chance(50) {
            self.sender_resends(s);
        }
    }

    /// Sender `s`'s connection is replaced by a new one on `shard` (the old one closes);
    /// false when the shard admits no connection now.
    fn connect_sender_again(&mut self, s: usize, shard: usize, resends_due: bool) -> bool {
        let Some(index) = self.shards[shard].admit(0) else {
            return false;
        };
        let name = self.senders[s].name.clone();
        let fresh = SenderConn {
            pipe: Pipe::connect(&name),
            name,
            shard,
            index,
            resends_due,
        };
        let mut old = std::mem::replace(&mut self.senders[s], fresh);
        old.pipe.eof = true;
        self.closing.push(old);
        true
    }

    fn sender_resends(&mut self, s: usize) {
        self.senders[s].resends_due = false;
        for r in 0..RECIPIENTS {
            let c = self.conv.get_mut(&(s, r)).unwrap();
            let mut cids: Vec<usize> = c.in_flight.iter().copied().collect();
            cids.sort_by_key(|n| c.sent_at.get(n).copied().unwrap_or(0));
            let mut refused = std::mem::take(&mut c.refused);
            refused.sort_unstable();
            for n in &refused {
                self.transmissions += 1;
                c.sent_at.insert(*n, self.transmissions);
            }
            cids.extend(refused);
            c.in_flight.extend(cids.iter().copied());
            let to = &self.recipients[r];
            for n in cids {
                let cid = r * CID_SPACE + n;
                let text = send_frame(to, cid, n, self.model.plant != Plant::Unflagged);
                self.senders[s].pipe.send(&text);
                if trace() {
                    let (now, shard) = (self.now(), self.senders[s].shard);
                    eprintln!("{now} s{s} resends cid \"{cid}\" (shard {shard})");
                }
                let at = self.instant();
                self.apps[s].order.transmitted(cid as u64, to, at);
            }
        }
    }

    /// The virtual time as the client's order rule reads it.
    fn instant(&self) -> std::time::Instant {
        self.origin + std::time::Duration::from_millis(self.now())
    }

    /// Sender `s`'s client tells its application these `accepted` answers, in this order.
    fn told(&mut self, s: usize, events: Vec<Event>) -> Result<(), String> {
        for event in events {
            let Event::Accepted { cid, id } = &event else {
                return Err(format!("the order rule told {event:?}"));
            };
            let cid: usize = cid.parse().map_err(|_| format!("bad cid in {event:?}"))?;
            let id: u64 = id.parse().map_err(|_| format!("bad id in {event:?}"))?;
            let (r, n) = (cid / CID_SPACE, cid % CID_SPACE);
            self.conv.get_mut(&(s, r)).unwrap().accepted.push((n, id));
        }
        Ok(())
    }

    /// `f0` on another node sends its next message to a recipient: when Redis is up, its
    /// append lands (and `f0` is told `accepted`); else it waits for a later step.
    fn foreign_sends(&mut self) {
        let now = self.now();
        if self.kind == StoreKind::Embedded || self.down_until > now {
            return;
        }
        let r = self.rng.below(RECIPIENTS as u64) as usize;
        let per_pair = self.per_pair;
        let c = self.conv.get_mut(&(FOREIGN, r)).unwrap();
        if c.sent == per_pair {
            return;
        }
        let n = c.sent;
        c.sent += 1;
        // Ids of another slot than this shard's (ids are unique across nodes).
        let id = (1 << 40) + (r * CID_SPACE + n) as u64;
        c.accepted.push((n, id));
        let msg = StoredMessage {
            id,
            from: "f0".into(),
            // Raw JSON, as a client's cid travels.
            cid: format!("\"{}\"", r * CID_SPACE + n).into(),
            ts: self.model.wall0 + now,
            body: n.to_string().into(),
            msg_type: None,
        };
        let mut pushes = Vec::new();
        let to = self.recipients[r].clone();
        self.model.append_foreign(&to, msg, now, &mut pushes);
        self.route(pushes);
    }

    fn device_comes_or_goes(&mut self, faults: bool) {
        let user = self.rng.below(RECIPIENTS as u64) as usize;
        match self.devices.iter().position(|d| d.user == user) {
            Some(i) if faults && self.chance(40) => {
                self.counts.drops += 1;
                self.devices[i].pipe.eof = true;
            }
            // Several nodes: now and then a second device, on the other node (the user's
            // directory entry then holds both, and every append is pushed to both).
            Some(i) if self.nodes > 1 && self.chance(30) => {
                let shard = self.devices[i].shard;
                let node = (shard / self.per_node + 1) % self.nodes;
                let taken = self
                    .devices
                    .iter()
                    .any(|d| d.user == user && d.shard / self.per_node == node);
                if !taken {
                    self.device_connects(user, node);
                }
            }
            // Now and then a second device on the same home shard (one node, or
            // `with_nodes_and_second_devices`). Each device has its own window, and the
            // first ack removes an entry.
            Some(i) if self.same_shard_second_devices && self.chance(self.second_device_chance) => {
                let shard = self.devices[i].shard;
                let here = self
                    .devices
                    .iter()
                    .filter(|d| d.user == user && d.shard == shard);
                if here.count() < 2 {
                    self.device_connects(user, shard / self.per_node);
                    let ack_loss = self.second_device_ack_loss;
                    if let Some(second) = self.devices.last_mut().filter(|d| d.user == user) {
                        second.ack_loss = ack_loss;
                    }
                }
            }
            Some(_) => {}
            None => {
                let node = self.pick_node();
                self.device_connects(user, node);
            }
        }
    }

    /// A device of recipient `user` connects to `node`, on its home shard there.
    fn device_connects(&mut self, user: usize, node: usize) {
        let name = &self.recipients[user];
        let shard = self.home(node, name);
        if let Some(index) = self.shards[shard].admit(0) {
            let pipe = Pipe::connect(name);
            self.devices.push(Device::new(user, shard, index, pipe));
        }
    }

    /// The embedded store of one shard runs the next few operations of its link; its
    /// answers (and the pushes to the user's mirror) wait in the shard's queue.
    fn embedded_store_serves(&mut self) {
        let now = self.now();
        let wall = self.clock.wall_ms();
        let k = self.pick_shard();
        for _ in 0..1 + self.rng.below(4) {
            let Ok(op) = self.stores[k].ops.try_recv() else {
                break;
            };
            self.counts.store_ops += 1;
            let mut planted = None;
            let mut remove_next = None;
            match &op {
                StoreOp::Append(msg) => {
                    self.embedded_appends += 1;
                    if self.embedded_appends.is_multiple_of(50) {
                        planted = Some(msg.id);
                    }
                }
                StoreOp::Remove { user, seq, .. } => {
                    self.model.removes += 1;
                    if self.model.plant == Plant::RemoveNext
                        && self.model.removes.is_multiple_of(50)
                    {
                        remove_next = Some((user.clone(), *seq));
                    }
                }
                _ => {}
            }
            let mut answers = Vec::new();
            match (self.model.plant, planted, op) {
                // Answered as stored, never kept.
                (Plant::DropWrite, Some(_), StoreOp::Append(msg)) => {
                    answers.push(StoreReply::Appended {
                        msg,
                        result: Ok(Appended::Stored {
                            seq: u64::MAX,
                            pushed: 0,
                            offline: false,
                        }),
                    })
                }
                // Kept under another id than the one the answer tells.
                (Plant::WrongId, Some(id), StoreOp::Append(mut msg)) => {
                    msg.id += 1;
                    self.embedded[k].apply(StoreOp::Append(msg), now, wall, &mut answers);
                    if let Some(StoreReply::Appended { msg, .. }) = answers.first_mut() {
                        msg.id = id;
                    }
                }
                (_, _, op) => self.embedded[k].apply(op, now, wall, &mut answers),
            }
            // Also removes the entry after the acked one.
            if let Some((user, seq)) = remove_next {
                if let Some(next) = self.embedded[k].seqs(&user).into_iter().find(|s| *s > seq) {
                    let op = StoreOp::Remove {
                        user,
                        seq: next,
                        report: None,
                    };
                    self.embedded[k].apply(op, now, wall, &mut Vec::new());
                }
            }
            for answer in &answers {
                match answer {
                    StoreReply::Appended { result: Err(_), .. } => self.counts.faults += 1, // full
                    // What the per-step check of `accepted` asks: in the store under this id
                    // (the embedded store keeps no dedup record; the simulation does).
                    StoreReply::Appended {
                        msg,
                        result: Ok(Appended::Stored { seq, .. }),
                    } if *seq != u64::MAX => {
                        let key = (
                            msg.to.to_string(),
                            msg.from.to_string(),
                            msg.cid.to_string(),
                        );
                        let record = Record {
                            id: msg.id,
                            writer: k,
                            attempt: 0,
                        };
                        self.model.records.entry(key).or_insert(record);
                    }
                    _ => {}
                }
            }
            self.to_shard[k].extend(answers);
        }
    }

    /// Redis runs the next few operations of one shard's link, with faults.
    fn store_serves(&mut self, faults: bool) {
        if self.kind == StoreKind::Embedded {
            return self.embedded_store_serves();
        }
        let now = self.now();
        if faults && self.down_until <= now && self.chance(3) {
            self.down_until = now + 50 + self.rng.below(400);
            self.counts.faults += 1;
        }
        let k = self.pick_shard();
        let ops = 1 + self.rng.below(4);
        self.serve_store_ops(k, ops, faults);
    }

    /// Redis runs up to `ops` operations of shard `k`'s link, with faults.
    fn serve_store_ops(&mut self, k: usize, ops: u64, faults: bool) {
        let now = self.now();
        let writer = self.writer(k);
        for _ in 0..ops {
            let Ok(op) = self.stores[k].ops.try_recv() else {
                break;
            };
            self.counts.store_ops += 1;
            let down = self.down_until > now;
            let fate = if down {
                100
            } else if faults {
                self.rng.below(100)
            } else {
                0
            };
            if trace() {
                let what = match &op {
                    StoreOp::Append(m) => format!("append {} attempt {}", m.cid, m.write.attempt),
                    StoreOp::Resolve { writes, .. } => format!("resolve {writes:?}"),
                    _ => "other".into(),
                };
                eprintln!("{now} taken from shard {k}: {what} fate {fate}");
            }
            let mut pushes = Vec::new();
            let (reply, error) = match fate {
                0..=79 => (self.model.apply(writer, op, now, &mut pushes), None),
                80..=87 => {
                    // Timed out; the write lands later.
                    let when = now + 1 + self.rng.below(600);
                    self.late.push((when, writer, clone_op(&op)));
                    (failed_reply(op, "timed out".into()), Some("timeout"))
                }
                88..=93 => (failed_reply(op, "timed out".into()), Some("timeout")),
                94..=99 => {
                    // Ran, but the answer was lost.
                    let _ = self.model.apply(writer, clone_op(&op), now, &mut pushes);
                    (failed_reply(op, "connection lost".into()), Some("lost"))
                }
                _ => {
                    // Down: fails at once. Mostly known not sent (the Redis thread saw the
                    // connection down: `unsent_reply`, never lands); now and then it was
                    // handed to fred as the connection broke, which keeps it and sends it once
                    // back (in doubt).
                    if self.chance(30) {
                        let when = self.down_until + self.rng.below(300);
                        self.late.push((when, writer, clone_op(&op)));
                        (failed_reply(op, "connection broke".into()), Some("down"))
                    } else {
                        (unsent_reply(op, "not connected".into()), Some("down"))
                    }
                }
            };
            if error.is_some() {
                self.counts.faults += 1;
            }
            self.route(pushes);
            self.to_shard[k].push_back(reply);
            self.to_shard[k].push_back(StoreReply::Batch {
                ops: 1,
                latency: std::time::Duration::ZERO,
                error: error.map(str::to_string),
                expired: 0,
                breaker_open: false,
            });
        }
    }

    /// A write that timed out lands now (while Redis is up).
    fn land_late(&mut self, faults: bool) {
        let now = self.now();
        if self.down_until > now {
            return;
        }
        if self.late.is_empty() {
            return;
        }
        let i = self.rng.below(self.late.len() as u64) as usize;
        if faults && self.late[i].0 > now {
            return;
        }
        let (_, writer, op) = self.late.swap_remove(i);
        self.counts.late_landings += 1;
        let mut pushes = Vec::new();
        let _ = self.model.apply(writer, op, now, &mut pushes);
        self.route(pushes);
    }

    fn shard_hears_store(&mut self) {
        let now = self.now();
        let k = self.pick_shard();
        for _ in 0..1 + self.rng.below(6) {
            let from_channel = match (self.to_shard[k].is_empty(), self.channel[k].is_empty()) {
                (true, true) => break,
                (true, false) => true,
                (false, true) => false,
                (false, false) => self.rng.below(2) == 0,
            };
            let queue = if from_channel {
                &mut self.channel[k]
            } else {
                &mut self.to_shard[k]
            };
            let Some(reply) = queue.pop_front() else {
                break;
            };
            if trace() {
                eprintln!("{now} shard {k} hears: {}", describe(&reply));
            }
            if self.nodes > 1 {
                self.note_heard(k, &reply);
            }
            self.shards[k].on_store_reply(reply, now);
        }
    }

    /// What shard `k` hears of the recipients' inboxes (see `heard`).
    fn note_heard(&mut self, k: usize, reply: &StoreReply) {
        let entries: Vec<(&str, &StoredMessage)> = match reply {
            StoreReply::Pushed { user, msg, .. } => vec![(user.as_str(), msg)],
            // (An answer to an older load is not read.)
            StoreReply::Loaded {
                user,
                token,
                result: Ok(loaded),
            } if self.shards[k].load_awaited(user) == Some(*token) => loaded
                .entries
                .iter()
                .map(|(_, m)| (user.as_str(), m))
                .collect(),
            _ => return,
        };
        for (user, msg) in entries {
            let Some(r) = self.recipients.iter().position(|name| name == user) else {
                continue;
            };
            let s = match msg.from.as_str() {
                "f0" => Some(FOREIGN),
                from => from.strip_prefix('s').and_then(|n| n.parse().ok()),
            };
            let cid = msg.cid.trim_matches('"').parse::<usize>().ok();
            if let (Some(s), Some(cid)) = (s, cid) {
                self.heard.insert((k, r, s, cid % CID_SPACE));
            }
        }
    }

    /// Shard `k` serves a batch of what the other shards sent it; how many messages.
    fn shard_drains_mesh(&mut self, k: usize) -> usize {
        let now = self.now();
        let n = serve_mesh_batch(&mut self.shards[k], k, now);
        self.counts.mesh_msgs += n as u64;
        n
    }

    /// Settling: every shard serves its mesh until it is empty (connections polled and read
    /// in between); how many messages that took.
    fn drain_meshes(&mut self) -> Result<usize, String> {
        let mut total = 0;
        loop {
            let mut n = 0;
            for k in 0..self.shards.len() {
                n += self.shard_drains_mesh(k);
            }
            self.poll_all();
            self.read_senders()?;
            self.read_devices(false)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    fn poll_all(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        for s in &mut self.senders {
            let polled = self.shards[s.shard].poll_conn(s.index, &mut s.pipe, &mut cx);
            assert!(
                matches!(polled, ConnPoll::Pending { .. }),
                "a sender's connection stays open"
            );
        }
        self.closing.retain_mut(|s| {
            let polled = self.shards[s.shard].poll_conn(s.index, &mut s.pipe, &mut cx);
            matches!(polled, ConnPoll::Pending { .. })
        });
        let mut i = 0;
        while i < self.devices.len() {
            let d = &mut self.devices[i];
            match self.shards[d.shard].poll_conn(d.index, &mut d.pipe, &mut cx) {
                ConnPoll::Pending { .. } => i += 1,
                ConnPoll::Handoff { to } => {
                    panic!("a device handed off to shard {to}: it is on its home shard")
                }
                ConnPoll::Close => {
                    let d = self.devices.swap_remove(i);
                    self.device_gone(d);
                }
            }
        }
    }

    fn read_senders(&mut self) -> Result<(), String> {
        for s in 0..SENDERS {
            for v in self.senders[s].pipe.frames() {
                let op = v["op"].as_str().unwrap_or_default();
                if trace() {
                    eprintln!("sender s{s}: {v}");
                }
                if op != "accepted" && op != "error" {
                    continue;
                }
                let cid: usize = v["cid"]
                    .as_str()
                    .and_then(|c| c.parse().ok())
                    .ok_or(format!("no cid in {v}"))?;
                let (r, cid) = (cid / CID_SPACE, cid % CID_SPACE);
                let c = self
                    .conv
                    .get_mut(&(s, r))
                    .ok_or(format!("unknown cid in {v}"))?;
                if !c.in_flight.remove(&cid) {
                    return Err(format!("an answer for a cid not in flight: {v}"));
                }
                if op == "accepted" {
                    let id: u64 = v["id"]
                        .as_str()
                        .and_then(|i| i.parse().ok())
                        .ok_or(format!("no id in {v}"))?;
                    // SPEC section 4: safe = acked by a device of the recipient, or in the
                    // store (a dedup record under this id; removed entries keep theirs).
                    self.counts.checks += 1;
                    let key = (
                        self.recipients[r].clone(),
                        self.senders[s].name.clone(),
                        v["cid"].to_string(),
                    );
                    let stored = self.model.records.get(&key).is_some_and(|rec| rec.id == id);
                    if !stored && !self.acked.contains(&(s, r, cid)) {
                        return Err(format!(
                            "s{s}->r{r}: cid {cid} accepted as id {id} before it was safe \
                             (not in the store, not acked by a device)"
                        ));
                    }
                    let to = self.recipients[r].clone();
                    let event = Event::Accepted {
                        cid: v["cid"].as_str().unwrap_or_default().to_string(),
                        id: id.to_string(),
                    };
                    let full = (r * CID_SPACE + cid) as u64;
                    let told =
                        if matches!(self.model.plant, Plant::NoClientOrder | Plant::LimitResends) {
                            vec![event]
                        } else {
                            self.apps[s].order.accepted(full, &to, event)
                        };
                    self.told(s, told)?;
                } else {
                    // Only a copy shown live (from a node's memory) and then refused is the
                    // live path's known gap; a resend refused while another attempt of the
                    // cid is stored and shown from Redis is none: that copy is checked for
                    // order with its id.
                    if c.shown_live.contains(&cid)
                        && c.shown.iter().any(|(shown, _)| *shown == cid)
                        && c.shown_then_refused.insert(cid)
                    {
                        self.counts.shown_then_refused += 1;
                    }
                    c.refused.push(cid);
                    if v["code"] == "rate_limited" {
                        let retry_ms = v["retry_ms"].as_u64().unwrap_or(0);
                        let at = self.clock.now_ms() + retry_ms;
                        self.retry_at[s] = self.retry_at[s].max(at);
                    }
                }
            }
            let now = self.instant();
            // (A sender always has a connection here: nothing runs out.)
            let released = self.apps[s].order.expired(now, None);
            self.told(s, released)?;
        }
        Ok(())
    }

    fn read_devices(&mut self, faults: bool) -> Result<(), String> {
        for i in 0..self.devices.len() {
            for v in self.devices[i].pipe.frames() {
                if v["op"] == "welcome" {
                    if trace() {
                        let d = &self.devices[i];
                        eprintln!("device of r{} on shard {}: welcome", d.user, d.shard);
                    }
                    let d = &mut self.devices[i];
                    d.welcomed = d.welcomed.or(Some(self.transmissions));
                }
                if v["op"] != "msg" {
                    continue;
                }
                self.msg_frames += 1;
                if self.model.plant == Plant::LoseFrame && self.msg_frames.is_multiple_of(200) {
                    continue;
                }
                let user = self.devices[i].user;
                let seq = v["seq"].as_u64().ok_or(format!("no seq in {v}"))?;
                let last_seq = self.devices[i].last_seq;
                self.counts.checks += 1;
                if seq > last_seq + 1 || seq == 0 {
                    return Err(format!(
                        "a device of r{user} was sent seq {seq} after seq {last_seq}: \
                         the seq of a connection has a gap"
                    ));
                }
                self.devices[i].last_seq = last_seq.max(seq);
                let from = v["from"].as_str().unwrap_or_default();
                let s: usize = match from {
                    "f0" => FOREIGN,
                    _ => from
                        .strip_prefix('s')
                        .and_then(|n| n.parse().ok())
                        .ok_or(format!("unknown sender in {v}"))?,
                };
                let cid: usize = v["cid"]
                    .as_str()
                    .and_then(|c| c.parse().ok())
                    .ok_or(format!("no cid in {v}"))?;
                let cid = cid % CID_SPACE;
                let id: u64 = v["id"]
                    .as_str()
                    .and_then(|i| i.parse().ok())
                    .ok_or(format!("no id in {v}"))?;
                let c = self
                    .conv
                    .get_mut(&(s, user))
                    .ok_or(format!("unknown pair in {v}"))?;
                // The client shows the first copy of each (from, cid) only.
                if trace() {
                    eprintln!("device of r{user} on shard {}: {v}", self.devices[i].shard);
                }
                let key = (self.recipients[user].clone(), from.to_string(), id);
                let live = self.kind == StoreKind::Redis
                    && s != FOREIGN
                    && !self.model.ever_stored.contains(&key);
                if live {
                    c.live_ids.insert((cid, id));
                }
                if !c.shown.iter().any(|(seen, _)| *seen == cid) {
                    c.shown.push((cid, id));
                    self.counts.shown += 1;
                    if live {
                        c.shown_live.insert(cid);
                    }
                }
                let d = &mut self.devices[i];
                if d.got.insert((s, cid)) {
                    d.shown_here.push((s, cid, id, !live));
                } else if seq > last_seq && !d.unacked.values().any(|m| *m == (s, cid)) {
                    // A new frame of what this connection was sent and acked.
                    self.counts.sent_again_after_ack += 1;
                }
                d.unacked.insert(seq, (s, cid));
                if faults && self.rng.below(100) < d.ack_loss {
                    self.counts.acks_lost += 1;
                    continue;
                }
                d.pipe.send(&format!(r#"{{"op":"ack","seq":{seq}}}"#));
                // Acks are cumulative: everything up to `seq` is the device's now.
                let later = d.unacked.split_off(&(seq + 1));
                for (s, cid) in std::mem::replace(&mut d.unacked, later).into_values() {
                    self.acked.insert((s, user, cid));
                }
            }
        }
        Ok(())
    }

    fn settled(&self) -> bool {
        self.unsettled().is_empty()
    }

    fn unsettled(&self) -> String {
        let mut what = Vec::new();
        for ((s, r), c) in &self.conv {
            if c.accepted.len() < self.per_pair || c.shown.len() < c.accepted.len() {
                let lost = if c.accepted.len() == self.per_pair && self.late.is_empty() {
                    " (lost)"
                } else {
                    ""
                };
                what.push(format!(
                    "s{s}->r{r}: sent {} accepted {} shown {}{lost}",
                    c.sent,
                    c.accepted.len(),
                    c.shown.len()
                ));
            }
        }
        if !self.late.is_empty() {
            what.push(format!("{} late writes", self.late.len()));
        }
        what.extend(self.missing_on_devices());
        what.join("; ")
    }

    /// Each device still connected was sent every message accepted for its user whose first
    /// send came after the device's `welcome` (one line per device short of one). Several
    /// nodes: every such message its node heard of (see `heard`).
    fn missing_on_devices(&self) -> Vec<String> {
        let mut what = Vec::new();
        for d in &self.devices {
            let Some(welcomed) = d.welcomed else { continue };
            for ((s, r), c) in self.conv.iter().filter(|((_, r), _)| *r == d.user) {
                let missing: Vec<usize> = c
                    .accepted
                    .iter()
                    .map(|(cid, _)| *cid)
                    .filter(|cid| c.first_sent.get(cid).is_some_and(|t| *t > welcomed))
                    .filter(|cid| !d.got.contains(&(*s, *cid)))
                    .filter(|cid| self.nodes == 1 || self.heard.contains(&(d.shard, *r, *s, *cid)))
                    .collect();
                if !missing.is_empty() {
                    what.push(format!(
                        "a device of r{r} on shard {} (welcomed at transmission {welcomed}) was \
                         never sent s{s}'s cids {missing:?}",
                        d.shard
                    ));
                }
            }
        }
        what
    }

    /// The invariants, once settled.
    fn check(&mut self) -> Result<(), String> {
        // Per conversation, the cids the order check leaves out (the live path's known gap).
        let mut gaps: BTreeMap<(usize, usize), BTreeSet<usize>> = BTreeMap::new();
        for ((s, r), c) in &self.conv {
            self.counts.checks += 4;
            let accepted: Vec<usize> = c.accepted.iter().map(|(cid, _)| *cid).collect();
            let mut unique = accepted.clone();
            unique.sort_unstable();
            unique.dedup();
            if unique.len() != accepted.len() || unique.len() != self.per_pair {
                return Err(format!("s{s}->r{r}: accepted {accepted:?}"));
            }
            let shown: Vec<usize> = c.shown.iter().map(|(cid, _)| *cid).collect();
            let mut shown_set = shown.clone();
            shown_set.sort_unstable();
            if shown_set != unique {
                return Err(format!(
                    "s{s}->r{r}: lost or never sent: accepted {unique:?}, shown {shown:?}"
                ));
            }
            // The live path's known gap: shown live, then refused (or dead with the node),
            // resent and told another id.
            let told_other: BTreeSet<usize> = c
                .shown
                .iter()
                .filter(|(cid, id)| {
                    c.shown_live.contains(cid)
                        && c.accepted.iter().any(|(a, told)| a == cid && told != id)
                })
                .map(|(cid, _)| *cid)
                .collect();
            self.counts.live_told_other += told_other.len() as u64;
            self.counts.shown_live += c.shown_live.len() as u64;
            // And its mirror image: the first copy was a stored one (the sender's resend, stored
            // under a new id) while the sender was told the id of a live copy shown later.
            let stored_first: BTreeSet<usize> = c
                .shown
                .iter()
                .filter(|(cid, id)| {
                    let told_live = |t: &u64| t != id && c.live_ids.contains(&(*cid, *t));
                    c.accepted.iter().any(|(a, t)| a == cid && told_live(t))
                })
                .map(|(cid, _)| *cid)
                .collect();
            self.counts.live_copy_elsewhere += stored_first.len() as u64;
            let gap: BTreeSet<usize> = (c.shown_then_refused.iter())
                .chain(&told_other)
                .chain(&stored_first)
                .copied()
                .collect();
            let ordered = |cids: &[usize]| -> Vec<usize> {
                cids.iter()
                    .copied()
                    .filter(|cid| !gap.contains(cid))
                    .collect()
            };
            if ordered(&shown) != ordered(&accepted) {
                if trace() {
                    eprintln!("s{s}->r{r}: shown (cid, id) {:?}", c.shown);
                    eprintln!("s{s}->r{r}: accepted (cid, id) {:?}", c.accepted);
                }
                return Err(format!(
                    "s{s}->r{r}: shown in the order {shown:?}, accepted in the order {accepted:?}"
                ));
            }
            for (cid, id) in c.shown.iter().filter(|(cid, _)| !gap.contains(cid)) {
                let told = c.accepted.iter().find(|(a, _)| a == cid).map(|(_, id)| *id);
                if told != Some(*id) {
                    return Err(format!(
                        "s{s}->r{r}: cid {cid} shown as id {id}, its sender was told {told:?}"
                    ));
                }
            }
            gaps.insert((*s, *r), gap);
        }
        self.each_device_showed_in_accepted_order(&gaps)?;
        self.check_mirror_states()
    }

    /// Each device (connected or gone) showed each sender's messages in the order that
    /// sender was told `accepted`: the check above reads the first copy of each message
    /// the user was shown on any device; a device's own screen must be in order too (it
    /// may lack some: it came late, or went).
    fn each_device_showed_in_accepted_order(
        &mut self,
        gaps: &BTreeMap<(usize, usize), BTreeSet<usize>>,
    ) -> Result<(), String> {
        let connected = self
            .devices
            .iter()
            .map(|d| (d.user, d.shard, &d.shown_here));
        let gone = self
            .gone_devices
            .iter()
            .map(|d| (d.user, d.shard, &d.shown));
        for (user, shard, shown) in connected.chain(gone) {
            for ((s, _), c) in self.conv.iter().filter(|((_, r), _)| *r == user) {
                self.counts.checks += 1;
                let place = |cid: &usize| c.accepted.iter().position(|(a, _)| a == cid);
                let told = |cid: &usize| c.accepted.iter().find(|(a, _)| a == cid).map(|t| t.1);
                // A stored copy of a cid whose sender was told the id of a live copy.
                let live_copy_elsewhere = |cid: &usize, id: &u64, stored: &bool| {
                    let told_live = |t: u64| t != *id && c.live_ids.contains(&(*cid, t));
                    *stored && told(cid).is_some_and(told_live)
                };
                // A live copy of a cid whose sender was told the id of a later attempt (its
                // resend, stored elsewhere after the live `accepted` was lost with its
                // connection): the per-user check's `live_told_other`, on one device
                // (three-node seed 16632021380122513067 with slow second devices and
                // resyncs: the user's first copy was the stored one, and a device connected
                // later was sent the live copy still unacked). Not a live copy of a resend
                // told an earlier attempt's id: that is planted `Unflagged`.
                let live_told_other = |cid: &usize, id: &u64, stored: &bool| {
                    !*stored && told(cid).is_some_and(|t| t > *id)
                };
                let theirs = shown.iter().filter(|(from, cid, id, stored)| {
                    from == s
                        && !gaps[&(*s, user)].contains(cid)
                        && !live_told_other(cid, id, stored)
                });
                let (copies, kept): (Vec<&(usize, usize, u64, bool)>, Vec<_>) =
                    theirs.partition(|(_, cid, id, stored)| live_copy_elsewhere(cid, id, stored));
                self.counts.live_copy_elsewhere += copies.len() as u64;
                let cids: Vec<usize> = kept.iter().map(|(_, cid, ..)| *cid).collect();
                // Those copies among themselves: where Redis holds them, in id order.
                let copy_ids: Vec<u64> = copies.iter().map(|(_, _, id, _)| *id).collect();
                if copy_ids.windows(2).any(|w| w[0] > w[1]) {
                    return Err(format!(
                        "a device of r{user} on shard {shard} showed stored copies of s{s}'s \
                         live-accepted cids out of store order: {copies:?}"
                    ));
                }
                if cids.windows(2).any(|w| place(&w[0]) > place(&w[1])) {
                    return Err(format!(
                        "a device of r{user} on shard {shard} showed s{s}'s cids in the order \
                         {cids:?}, accepted in the order {:?}",
                        c.accepted.iter().map(|(cid, _)| *cid).collect::<Vec<_>>()
                    ));
                }
            }
        }
        Ok(())
    }

    /// A device's connection closed (or died with its node): what it showed is kept for
    /// the per-device order check.
    fn device_gone(&mut self, d: Device) {
        self.gone_devices.push(GoneDevice {
            user: d.user,
            shard: d.shard,
            shown: d.shown_here,
        });
    }

    /// A shard of a Redis run resyncs (`Sim::resyncs`): half the time its lease was found
    /// lapsed (the resync comes on the answers' path; pushes on their way still come), half
    /// the time its node's channel was subscribed again (what it had not delivered yet is
    /// lost, then the resync).
    fn shard_resyncs(&mut self) {
        if self.kind != StoreKind::Redis {
            return;
        }
        let k = self.pick_shard();
        self.counts.resyncs += 1;
        if self.rng.below(2) == 0 {
            self.to_shard[k].push_back(StoreReply::Resync);
        } else {
            self.channel[k].clear();
            self.channel[k].push_back(StoreReply::Resync);
        }
    }

    /// Each shard's mirrors and what their states keep beside them agree (after every faulty
    /// step: once settled, nearly every mirror is ready and there is little to disagree).
    fn check_mirror_states(&mut self) -> Result<(), String> {
        for (i, shard) in self.shards.iter().enumerate() {
            self.counts.checks += 1;
            shard
                .mirror_state_consistent()
                .map_err(|e| format!("shard {i}: {e}"))?;
        }
        Ok(())
    }
}

/// A simulated client's `send` of message `n` (`"resend":true` when it was sent before).
fn send_frame(to: &str, cid: usize, n: usize, resend: bool) -> String {
    let flag = if resend { r#","resend":true"# } else { "" };
    format!(r#"{{"op":"send","to":"{to}","cid":"{cid}","body":{n}{flag}}}"#)
}

/// A node's shards joined by a mesh of `capacity` per channel, each with its store link: the
/// shards, their counters and the Redis ends of their links.
fn boot_node(
    cfg: &crate::config::Config,
    capacity: usize,
    clock: &Rc<ManualClock>,
    plant: Plant,
    kind: StoreKind,
) -> (
    Vec<Shard>,
    Vec<Arc<ShardMetrics>>,
    Vec<StoreEnd>,
    crate::shard::msg::ShardMeshClient,
) {
    let shared = Shared::new(cfg.clone());
    let (ends, mesh_client) =
        crate::mesh::build_with_capacity(cfg.shards, capacity).expect("the mesh");
    let mut shards = Vec::new();
    let mut stores = Vec::new();
    let mut metrics = Vec::new();
    for (id, (mesh, _bell)) in ends.into_iter().enumerate() {
        let shard_metrics = Arc::new(ShardMetrics::default());
        metrics.push(shard_metrics.clone());
        let mut shard = Shard::new(id, shared.clone(), shard_metrics, Box::new(clock.clone()));
        shard.enable_mesh(mesh);
        let (link, store) = StoreLink::simulated();
        match kind {
            StoreKind::Redis => shard.enable_store(link),
            StoreKind::Embedded => shard.use_store(Box::new(link.single_node())),
        }
        let planted = match plant {
            Plant::ShowPastMissing => Some(OrderPlant::ShowPastMissing),
            Plant::LimitResends => Some(OrderPlant::LimitResends),
            Plant::OweNothing => Some(OrderPlant::OweNothing),
            Plant::OweNoneGone => Some(OrderPlant::OweNoneGone),
            Plant::ForgetUnremoved => Some(OrderPlant::ForgetUnremoved),
            Plant::ReadBeforeMark => Some(OrderPlant::ReadBeforeMark),
            Plant::ForgetUnmarkedRead => Some(OrderPlant::ForgetUnmarkedRead),
            Plant::LivePastRefused => Some(OrderPlant::LivePastRefused),
            Plant::LivePastUnrouted => Some(OrderPlant::LivePastUnrouted),
            Plant::OweAheadOfLeft => Some(OrderPlant::OweAheadOfLeft),
            Plant::OweAheadOfWaiting => Some(OrderPlant::OweAheadOfWaiting),
            Plant::LivePastUnsure => Some(OrderPlant::LivePastUnsure),
            Plant::LivePastUnpushed => Some(OrderPlant::LivePastUnpushed),
            Plant::LiveUnconfirmed => Some(OrderPlant::LiveUnconfirmed),
            Plant::LiveBelowTop => Some(OrderPlant::LiveBelowTop),
            Plant::OweNonePassed => Some(OrderPlant::OweNonePassed),
            Plant::ReadPastRemoved => Some(OrderPlant::ReadPastRemoved),
            Plant::ConfirmBelowUnsure => Some(OrderPlant::ConfirmBelowUnsure),
            _ => None,
        };
        if let Some(planted) = planted {
            shard.plant_order_bug(planted);
        }
        shards.push(shard);
        stores.push(store);
    }
    (shards, metrics, stores, mesh_client)
}

/// The shard's operations are not `Clone` (replies carry channel ends); the ones a late
/// write repeats are.
fn clone_op(op: &StoreOp) -> StoreOp {
    match op {
        StoreOp::Append(m) => StoreOp::Append(m.clone()),
        StoreOp::Resolve { to, from, writes } => StoreOp::Resolve {
            to: to.clone(),
            from: from.clone(),
            writes: writes.clone(),
        },
        StoreOp::Remove { user, seq, .. } => StoreOp::Remove {
            user: user.clone(),
            seq: *seq,
            report: None,
        },
        // Directory changes are not replayed late (see the closing note of issue 15: a late
        // `Leave` after a later `Load` would unregister an online user's node).
        _ => StoreOp::Probe,
    }
}

/// One line for the trace of what the shard hears from the store.
fn describe(reply: &StoreReply) -> String {
    match reply {
        StoreReply::Appended { msg, result } => format!(
            "appended {}->{} cid {} attempt {}: {result:?}",
            msg.from, msg.to, msg.cid, msg.write.attempt
        ),
        StoreReply::Pushed { user, seq, msg } => {
            format!(
                "pushed {}->{user} cid {} id {} seq {seq}",
                msg.from, msg.cid, msg.id
            )
        }
        StoreReply::Resolved { writes, landed, .. } => format!("resolved {writes:?}: {landed:?}"),
        StoreReply::Loaded { user, result, .. } => match result {
            Ok(l) => format!(
                "loaded {user}: {:?}",
                l.entries
                    .iter()
                    .map(|(s, m)| format!("{}:{}:{}", m.from, m.cid, s))
                    .collect::<Vec<_>>()
            ),
            Err(e) => format!("load of {user} failed: {e:?}"),
        },
        StoreReply::Batch { .. } => "batch".into(),
        StoreReply::Presence { ask, users, online } => {
            format!("presence {ask} {users:?}: {online:?}")
        }
        StoreReply::PresenceChanged { user, runs } => {
            format!("presence changed {user}: {runs} runs")
        }
        _ => "other".into(),
    }
}

/// One line for the trace of what a shard hears from another.
fn describe_mesh(msg: &crate::shard::msg::ShardMsg) -> String {
    use crate::shard::msg::{Direct, ShardMsg};
    match msg {
        ShardMsg::Direct(Direct::Deliver(m)) => {
            format!("deliver {}->{} cid {} id {}", m.from, m.to, m.cid, m.id)
        }
        ShardMsg::Direct(Direct::Report(r)) => format!(
            "report {}->{} cid {} id {}: {:?}",
            r.from, r.to, r.cid, r.id, r.outcome
        ),
        ShardMsg::Handoff { .. } => "handoff".into(),
        ShardMsg::Presence(p) => presence::describe(p),
        ShardMsg::Room(r) => shard_rooms::describe(r),
        _ => "other".into(),
    }
}

/// Shard `k` serves one batch of what the other shards sent it; how many messages.
fn serve_mesh_batch(shard: &mut Shard, k: usize, now: u64) -> usize {
    shard.clear_mesh_bell();
    let batch = shard.take_mesh_batch();
    let n = batch.len();
    for msg in batch {
        if trace() {
            eprintln!(
                "{now} shard {k} hears from the mesh: {}",
                describe_mesh(&msg)
            );
        }
        if shard.on_mesh_msg(msg, now).is_some() {
            panic!("a handoff: every connection is admitted on its user's home shard");
        }
    }
    n
}

/// Seeds to run: `RINGGATE_SIM_SEED` (one, to replay), else `count` from a fixed start
/// (`RINGGATE_SIM_SEEDS` overrides the count; `RINGGATE_SIM_SKIP` skips that many first
/// seeds, so that a longer sweep need not run again the ones a shorter one held).
fn seeds(count: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("RINGGATE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("RINGGATE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(count);
    let skip: u64 = std::env::var("RINGGATE_SIM_SKIP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (skip + 1..=skip + count)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect()
}

/// Run every seed with `plant`; the first failure, with its seed.
pub(crate) fn sweep(count: u64, steps: u64, plant: Plant) -> Result<Counts, (u64, String)> {
    sweep_kind(count, steps, plant, StoreKind::Redis)
}

/// [`sweep`] with the store of `kind`.
pub(crate) fn sweep_kind(
    count: u64,
    steps: u64,
    plant: Plant,
    kind: StoreKind,
) -> Result<Counts, (u64, String)> {
    sweep_with(count, steps, |seed| Sim::of_kind(seed, plant, kind))
}

/// [`sweep`] over `nodes` real nodes sharing the model of Redis ([`Sim::with_nodes`]).
pub(crate) fn sweep_nodes(
    count: u64,
    steps: u64,
    plant: Plant,
    nodes: usize,
) -> Result<Counts, (u64, String)> {
    sweep_with(count, steps, |seed| Sim::with_nodes(seed, plant, nodes))
}

fn sweep_with(
    count: u64,
    steps: u64,
    sim_of: impl Fn(u64) -> Sim,
) -> Result<Counts, (u64, String)> {
    let mut total = Counts::default();
    for seed in seeds(count) {
        let mut sim = sim_of(seed);
        // A panic (a shard's assertion, or the simulation's) is a failure of this seed.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run(steps)));
        run.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("panicked: {what}"))
        })
        .map_err(|e| (seed, e))?;
        let c = &sim.counts;
        total.steps += c.steps;
        total.store_ops += c.store_ops;
        total.faults += c.faults;
        total.late_landings += c.late_landings;
        total.drops += c.drops;
        total.acks_lost += c.acks_lost;
        total.sender_drops += c.sender_drops;
        total.shown += c.shown;
        total.checks += c.checks;
        total.shown_then_refused += c.shown_then_refused;
        total.shown_live_then_died += c.shown_live_then_died;
        total.live_told_other += c.live_told_other;
        total.live_copy_elsewhere += c.live_copy_elsewhere;
        total.shown_live += c.shown_live;
        total.mesh_msgs += c.mesh_msgs;
        total.mesh_full += c.mesh_full + sim.metrics.iter().map(|m| m.mesh_full.get()).sum::<u64>();
        total.node_deaths += c.node_deaths;
        total.cross_node_pushes += sim.model.cross_node_pushes;
        total.resyncs += c.resyncs;
        total.sent_again_after_ack += c.sent_again_after_ack;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds in every test run (about 25 s with two shards). Seed 12757704642094768500, the 5,284th, found a
    /// pushed entry of a revoked write shown during a mirror load (fixed in `on_pushed`).
    const SEEDS: u64 = 6_000;

    #[test]
    fn every_message_is_shown_once_in_accepted_order_under_store_faults() {
        match sweep(SEEDS, 3_000, Plant::None) {
            Ok(c) => println!("simulation: {} seeds, {c:?}", seeds(SEEDS).len()),
            Err((seed, e)) => panic!(
                "seed {seed} failed: {e}\nreplay: RINGGATE_SIM_SEED={seed} cargo test --lib sim::"
            ),
        }
    }

    /// What one run did: its counts and every conversation's accepted and shown (cid, id).
    fn fingerprint(seed: u64) -> String {
        let mut sim = Sim::new(seed, Plant::None);
        let result = sim.run(3_000);
        format!("{result:?} {:?} {:?}", sim.counts, sim.conv)
    }

    /// A seed is a replay: same steps, same ids, same order. Hash-map order (random per
    /// process, and per map) or the host's clock inside the shard would break this.
    #[test]
    fn a_seed_replays_exactly() {
        for seed in seeds(20) {
            assert_eq!(
                fingerprint(seed),
                fingerprint(seed),
                "seed {seed} did not replay"
            );
        }
    }

    /// Each planted bug is found within the seeds the normal run uses.
    fn finds(plant: Plant, what: &str) {
        finds_any(plant, &[what]);
    }

    /// `plant` is found in the seeds of a test run, breaking one of the rules named by `what`.
    fn finds_any(plant: Plant, what: &[&str]) {
        match sweep(SEEDS, 3_000, plant) {
            Ok(c) => panic!(
                "{plant:?} was not found in {} seeds ({c:?})",
                seeds(SEEDS).len()
            ),
            Err((seed, e)) => {
                println!("{plant:?} found by seed {seed}: {e}");
                assert!(
                    what.iter().any(|w| e.contains(w)),
                    "{plant:?} broke another rule: {e}"
                );
            }
        }
    }

    /// Without the fence a write reported failed lands after later ones: found as a broken
    /// order, or (since answers and pushes come on two queues, the first seed that finds it)
    /// as an accepted message never shown (not traced further: the plant is found).
    #[test]
    fn without_the_fence_the_order_hole_of_issue_15_is_found() {
        finds_any(Plant::NoFence, &["order", "(lost)"]);
    }

    /// Found once a write's answer could come before its push (two queues per shard, as
    /// fred's two connections), seed 16428119858726515558: the sender was told `accepted`,
    /// the store went away, its next message went live and was shown before the first one's
    /// push came.
    #[test]
    fn a_live_message_past_a_stored_entry_whose_push_is_on_its_way_is_found() {
        finds(Plant::LivePastUnpushed, "order");
    }

    #[test]
    fn a_write_answered_stored_but_not_kept_is_found_when_accepted() {
        finds(Plant::DropWrite, "before it was safe");
    }

    #[test]
    fn a_message_lost_after_it_was_stored_is_found() {
        finds(Plant::RemoveNext, "lost");
    }

    #[test]
    fn without_the_clients_order_rule_answers_to_resends_break_the_order() {
        finds(Plant::NoClientOrder, "order");
    }

    #[test]
    fn a_frame_lost_by_the_glue_is_found_by_its_seq() {
        finds(Plant::LoseFrame, "gap");
    }

    #[test]
    fn an_entry_under_another_id_is_found() {
        finds(Plant::WrongId, "its sender was told");
    }

    #[test]
    fn showing_entries_past_a_missing_one_breaks_the_order() {
        finds(Plant::ShowPastMissing, "order");
    }

    /// One node with slow second devices (`Sim::with_second_devices`): seeds of every test run.
    const SECOND_DEVICE_SEEDS: u64 = 1_000;

    #[test]
    fn one_node_with_slow_second_devices() {
        sweep_family(
            "one node, slow second devices",
            "one_node_with_slow_second_devices",
            SECOND_DEVICE_SEEDS,
            |seed| Sim::with_second_devices(seed, Plant::None),
        );
    }

    /// Two nodes with slow second devices on the home shard too
    /// (`Sim::with_nodes_and_second_devices`): seeds of every test run.
    const TWO_NODES_SECOND_DEVICE_SEEDS: u64 = 250;

    #[test]
    fn two_nodes_with_slow_second_devices() {
        sweep_family(
            "two nodes, slow second devices",
            "two_nodes_with_slow_second_devices",
            TWO_NODES_SECOND_DEVICE_SEEDS,
            |seed| Sim::with_nodes_and_second_devices(seed, Plant::None, 2),
        );
    }

    /// Three nodes with slow second devices and resyncs (`Sim::with_all_of_it`): seeds of
    /// every test run.
    const ALL_OF_IT_SEEDS: u64 = 100;

    #[test]
    fn three_nodes_with_slow_second_devices_and_resyncs() {
        sweep_family(
            "three nodes, slow second devices, resyncs",
            "three_nodes_with_slow_second_devices_and_resyncs",
            ALL_OF_IT_SEEDS,
            |seed| Sim::with_all_of_it(seed, Plant::None, 3),
        );
    }

    /// Sweep `count` seeds of the runs `sim_of` builds: the counts printed, or a panic naming
    /// the failing seed and how to replay it with `test`.
    fn sweep_family(label: &str, test: &str, count: u64, sim_of: impl Fn(u64) -> Sim) {
        match sweep_with(count, 3_000, sim_of) {
            Ok(c) => println!("simulation ({label}): {} seeds, {c:?}", seeds(count).len()),
            Err((seed, e)) => panic!(
                "seed {seed} failed ({label}): {e}\nreplay: RINGGATE_SIM_SEED={seed} cargo test --lib sim::tests::{test}"
            ),
        }
    }

    /// Found by about one seed in 110 with slow second devices. (In the plain one-node
    /// runs, whose second devices ack as promptly as the first, one seed in 6,000 to
    /// 20,000 found it: too rare to show in a test run.)
    #[test]
    fn a_device_not_owed_what_another_acked_first_is_found() {
        let sim_of = |seed| Sim::with_second_devices(seed, Plant::OweNothing);
        match sweep_with(SECOND_DEVICE_SEEDS, 3_000, sim_of) {
            Ok(c) => panic!("OweNothing was not found ({c:?})"),
            Err((seed, e)) => {
                println!("OweNothing found by seed {seed}: {e}");
                assert!(
                    e.contains("never sent"),
                    "OweNothing broke another rule: {e}"
                );
            }
        }
    }

    #[test]
    fn limiting_resends_of_a_sender_whose_connection_dropped_breaks_the_order() {
        finds(Plant::LimitResends, "order");
    }

    /// Node deaths: a resend not marked as one is shown live under a new id while a dead
    /// run's write of it is in Redis (seed 11400714819323198485). Since a refused first
    /// attempt holds its pair back (`refused_unstored`, which an unmarked resend also meets),
    /// it is rarer than one seed in 6,000: replayed by the first one-node seed that finds it
    /// (10827363251644457744, the 19,152nd, until cids refused on the sender's shard were
    /// carried to the recipient's; since then 8430354949488470051, the 35,159th), which holds
    /// without it.
    #[test]
    fn unmarked_resends_are_shown_under_another_id_when_the_node_dies() {
        replays_in(Sim::new, Plant::Unflagged, 8430354949488470051, &["showed"]);
    }

    /// Embedded runs in every test run: the embedded store answers through the same path,
    /// so the same invariants hold with its answers held back and its inboxes full.
    const EMBEDDED_SEEDS: u64 = 2_000;

    #[test]
    fn embedded_every_message_is_shown_once_in_accepted_order() {
        match sweep_kind(EMBEDDED_SEEDS, 3_000, Plant::None, StoreKind::Embedded) {
            Ok(c) => println!(
                "simulation (embedded): {} seeds, {c:?}",
                seeds(EMBEDDED_SEEDS).len()
            ),
            Err((seed, e)) => panic!(
                "seed {seed} failed (embedded): {e}\nreplay: RINGGATE_SIM_SEED={seed} cargo test --lib sim::tests::embedded"
            ),
        }
    }

    #[test]
    fn embedded_a_seed_replays_exactly() {
        let fingerprint = |seed| {
            let mut sim = Sim::of_kind(seed, Plant::None, StoreKind::Embedded);
            let result = sim.run(3_000);
            format!("{result:?} {:?} {:?}", sim.counts, sim.conv)
        };
        for seed in seeds(10) {
            assert_eq!(fingerprint(seed), fingerprint(seed), "seed {seed}");
        }
    }

    /// The planted bugs that make sense for an in-process store (no fence to remove, no
    /// entry left missing by a store that is away) are found in embedded runs too. (A frame
    /// lost by the glue is not: with inboxes of 3 the lost `msg` is nearly always the last
    /// one out, and its retransmit, same seq, fills the hole before any later seq shows it.)
    fn finds_embedded(plant: Plant, what: &str) {
        match sweep_kind(EMBEDDED_SEEDS, 3_000, plant, StoreKind::Embedded) {
            Ok(c) => panic!("{plant:?} was not found in embedded runs ({c:?})"),
            Err((seed, e)) => {
                println!("{plant:?} found (embedded) by seed {seed}: {e}");
                assert!(e.contains(what), "{plant:?} broke another rule: {e}");
            }
        }
    }

    #[test]
    fn embedded_a_write_answered_stored_but_not_kept_is_found_when_accepted() {
        finds_embedded(Plant::DropWrite, "before it was safe");
    }

    #[test]
    fn embedded_a_message_lost_after_it_was_stored_is_found() {
        finds_embedded(Plant::RemoveNext, "lost");
    }

    #[test]
    fn embedded_an_entry_under_another_id_is_found() {
        finds_embedded(Plant::WrongId, "its sender was told");
    }

    #[test]
    fn embedded_limiting_resends_breaks_the_order() {
        finds_embedded(Plant::LimitResends, "order");
    }

    /// Two-node runs in every test run (`RINGGATE_SIM_SEEDS` for a longer sweep; ~8 s in a
    /// debug build).
    const TWO_NODE_SEEDS: u64 = 1_000;

    /// Two real nodes of two shards each share the model of Redis: senders and devices
    /// connect to either (a recipient now and then on both), appends are pushed to every
    /// node in the recipient's directory entry, and one node dies while the other runs.
    ///
    /// A sender whose connection drops may come back on another node. Found here and fixed
    /// (2026-12-05; the planted-bug tests below show each fix is needed):
    /// * Seed 11400714819323198485: a sender came back on the other node while the node it
    ///   left still had a write of the pair in doubt (fred holding it). That write landed
    ///   after the new node's later ones, under a lower id; the client's rule tells held
    ///   answers by id, the recipient shows Redis order. Fix: the script keeps each pair's
    ///   highest stored id (`~top`) and refuses a write below it (`stale`, answered
    ///   `unavailable`; a resend of a stored cid is still answered with its id): a pair's ids
    ///   increase in store order whichever node writes (`Plant::NoPairTop`).
    /// * Seed 4196343830758426020: with Redis away from one node only, that node refused a
    ///   resend as possibly stored (the other node had stored it) and then sent the pair's
    ///   next message live, shown before it. Fix: after such a refusal the pair's messages
    ///   no longer go live until the store has stored a write of the pair since (then
    ///   `unsure`; now the pair's confirmation is forgotten, `confirmed` in
    ///   `shard/mirror.rs`, `Plant::LivePastUnsure`).
    /// * Seeds 2219511069923295287, 16126179847217348979: after a node death, a resend of a
    ///   cid the dead run stored was refused for over 10 s (no id slot yet, the shard busy)
    ///   and answered in flight even later; the client's hold (`hold_max`, 10 s from the
    ///   first held answer) ran out and told later cids first. Fix: a hold runs out only
    ///   without a connection (`client::order`; the JavaScript client too).
    /// * Seed 17687249107938223735 (one in 30,000): a write of another node landed after the
    ///   pair's top with a higher id of the same millisecond (ids of one millisecond order
    ///   by issuer slot), though its send was read before the top's. Fix: the script lets a
    ///   write land only if it was issued after the top by the clock: a later millisecond,
    ///   or the same one from the same issuer (`ids::issued_after`, `Plant::TopByIdOnly`).
    ///
    /// * Seed 4749320442185338218 (one in 5,000): a sender's message stored by node A,
    ///   then (the sender moved) its next one shown live by node B, which Redis was away
    ///   from, before the first's push reached B. B cannot know of A's write. Fix: a
    ///   sender's message goes live only past a write of the pair issued since the sender
    ///   arrived on that node and confirmed by the store (`confirmed` in
    ///   `shard/mirror.rs`, `Plant::LiveUnconfirmed`): everything stored before it came on
    ///   the channel first. Since answers and pushes come on two queues the sweeps no
    ///   longer meet it (40,000 seeds with the plant: no order break; the messages counted
    ///   as overtaking were all shown-then-refused ones, left out anyway): a scripted test
    ///   shows it (`order_tests`).
    ///
    /// The runs check strictly: only a copy shown live from a node's memory and then
    /// refused is left out of the order check (the live path's known gap).
    ///
    /// Not simulated: clock skew between nodes (one clock here). A node whose clock is
    /// behind sees a pair that just moved from a node ahead refused `stale` for up to the
    /// skew, until its ids pass the other's.
    #[test]
    fn two_nodes() {
        match sweep_nodes(TWO_NODE_SEEDS, 3_000, Plant::None, 2) {
            Ok(c) => println!(
                "simulation (two nodes): {} seeds, {c:?}",
                seeds(TWO_NODE_SEEDS).len()
            ),
            Err((seed, e)) => panic!(
                "seed {seed} failed (two nodes): {e}\nreplay: RINGGATE_SIM_SEED={seed} cargo test --lib sim::tests::two_nodes"
            ),
        }
    }

    /// Three nodes: the same machinery for N (fewer seeds).
    #[test]
    fn three_nodes() {
        match sweep_nodes(TWO_NODE_SEEDS / 5, 3_000, Plant::None, 3) {
            Ok(c) => println!(
                "simulation (three nodes): {} seeds, {c:?}",
                seeds(TWO_NODE_SEEDS / 5).len()
            ),
            Err((seed, e)) => panic!(
                "seed {seed} failed (three nodes): {e}\nreplay: RINGGATE_SIM_SEED={seed} cargo test --lib sim::tests::three_nodes"
            ),
        }
    }

    /// A two-node seed is a replay too.
    #[test]
    fn two_nodes_a_seed_replays_exactly() {
        let fingerprint = |seed| {
            let mut sim = Sim::with_nodes(seed, Plant::None, 2);
            let result = sim.run(3_000);
            format!("{result:?} {:?} {:?}", sim.counts, sim.conv)
        };
        for seed in seeds(10) {
            assert_eq!(fingerprint(seed), fingerprint(seed), "seed {seed}");
        }
    }

    /// Planted bugs are found in two-node runs too.
    fn finds_two_nodes(plant: Plant, what: &str) {
        match sweep_nodes(TWO_NODE_SEEDS, 3_000, plant, 2) {
            Ok(c) => panic!("{plant:?} was not found in two-node runs ({c:?})"),
            Err((seed, e)) => {
                println!("{plant:?} found (two nodes) by seed {seed}: {e}");
                assert!(e.contains(what), "{plant:?} broke another rule: {e}");
            }
        }
    }

    /// The known gap of 2026-12-06 (first seed 10372713005361028285): a node's mirror
    /// reloaded after a device on another node acked entries this node's devices had not been
    /// sent, so they never were.
    #[test]
    fn two_nodes_a_reload_that_owes_nothing_it_no_longer_has_is_found() {
        finds_two_nodes(Plant::OweNoneGone, "never sent");
    }

    #[test]
    fn two_nodes_without_the_fence_the_order_hole_is_found() {
        finds_two_nodes(Plant::NoFence, "order");
    }

    /// Found first by seed 11400714819323198485 (a sender moving nodes while the node it
    /// left had a write of the pair in doubt).
    #[test]
    fn two_nodes_a_write_landing_below_its_pairs_top_id_breaks_the_order() {
        finds_two_nodes(Plant::NoPairTop, "order");
    }

    // `LivePastUnsure` (found first by seed 4196343830758426020: Redis away from one node,
    // not the other) was replayed by seed 8617429930748298993 until the answers and pushes
    // came on two queues; since then, with nothing going live past an entry on its way
    // (`unpushed`, waiting entries), no seed of 40,000 swept with the plant finds it
    // (`seed_for_a_plant`). The rule stays; its unit test in `shard::mirror` holds it.

    /// Found by seed 17687249107938223735 (one in 30,000 two-node seeds): a sender
    /// resent cid 0 on node B, moved to node A and sent cid 4 there; A stored 4, then B's
    /// attempt of 0 landed after it. Its id was higher (the same millisecond, B's slot
    /// higher), so ids agreed with store order, but B read 0 before A read 4 and the
    /// client, whose last write of 0 came before its first of 4, told 0 first. Since the
    /// answers and pushes came on two queues that seed's sequence changed: a seed that finds
    /// it now (and holds without it) is replayed, found by `seed_for_a_plant` (again on
    /// 2026-12-07, when the runs' course changed twice: deletes Redis did not run are sent
    /// again, then reads wait for their marks; the 82nd seed finds it now).
    #[test]
    fn two_nodes_a_write_in_its_pairs_top_millisecond_from_another_node_breaks_the_order() {
        replays(Plant::TopByIdOnly, 12521411499024694970, 2, &["order"]);
    }

    /// `seed` with `nodes` nodes finds `plant`, breaking a rule whose message holds every
    /// one of `what`, and holds without it.
    fn replays(plant: Plant, seed: u64, nodes: usize, what: &[&str]) {
        replays_in(
            |seed, plant| Sim::with_nodes(seed, plant, nodes),
            plant,
            seed,
            what,
        );
    }

    /// [`replays`] for runs built by `sim_of`.
    fn replays_in(sim_of: impl Fn(u64, Plant) -> Sim, plant: Plant, seed: u64, what: &[&str]) {
        let e = sim_of(seed, plant)
            .run(3_000)
            .expect_err("the plant was not found by its seed");
        assert!(
            what.iter().all(|w| e.contains(w)),
            "{plant:?} broke another rule: {e}"
        );
        let fixed = sim_of(seed, Plant::None).run(3_000);
        assert!(fixed.is_ok(), "the same seed without the plant: {fixed:?}");
    }

    /// Found by slow-second-device seed 15780009465165166133 (2026-12-07): with Redis away,
    /// live entries took positions after everything the shard's mirror held; another shard
    /// stored f0's 5 and 6 in the same millisecond, at or below them. Once the reload read
    /// those, the device that had been sent the live entries had passed their positions and
    /// was never sent them; the user was shown them after f0's 7 to 9. Now live positions
    /// lie where Redis gives none, and a read's entry below one is owed to each device past
    /// it (`live_high` in `shard/mirror.rs`); planted away, the seed finds it again.
    /// Two-node seed 737900551321943867 (the 21,007th of a 30,000-seed sweep, 2026-12-07):
    /// s0's 18 to 21 went live on node B and were acked there; s0, moved to node A, had
    /// resent them with 15 before the live `accepted`s reached it, and node A stored the
    /// copies after 15. A device on node A showed 15 before 18's copy, though s0 was told
    /// 18 first: the live path's known gap (docs/operations.md), left out of that device's
    /// order check and counted, and the run holds otherwise. Since a refused first attempt
    /// holds its pair back (`refused_unstored`), runs take another course: the first two-node
    /// seed with such a copy was then 4034809513570961174 (the 4,670th). Since a resend
    /// refused anywhere takes its pair's confirmation back, it is 14769943691059713534 (the
    /// 6,022nd, `seed_for_a_live_copy_elsewhere`).
    #[test]
    fn two_nodes_a_live_messages_copy_stored_elsewhere_is_the_known_gap() {
        let mut sim = Sim::with_nodes(14769943691059713534, Plant::None, 2);
        assert_eq!(sim.run(3_000), Ok(()));
        assert!(sim.counts.live_copy_elsewhere > 0, "{:?}", sim.counts);
    }

    /// Found by two nodes with slow second devices, seed 16526268307316691065 (the 34,773rd
    /// of a 60,000-seed sweep, 2026-12-07): node B refused s1's resend of 14 as possibly
    /// stored; s1's 11, stored by node A just before A's attempt of 14 (a higher id),
    /// confirmed the pair again on B, and 16 and 17 went live there before 14's push came;
    /// the client told 14 first. Now only an entry above the refused resend confirms the
    /// pair (`unsure` in `shard/mirror.rs`). Since a refused first attempt holds its pair
    /// back (`refused_unstored`), runs take another course: no seed of 60,000 in this family
    /// finds the plant (nor, in a search before the deletes' back-off, 60,000 with resyncs
    /// too or 40,000 with three nodes). The seed is kept as a replay that holds; the plant is
    /// shown by the scripted mirror test of the same name.
    #[test]
    fn after_a_resend_refused_as_possibly_stored_only_an_entry_above_it_confirms_the_pair() {
        let run =
            Sim::with_nodes_and_second_devices(16526268307316691065, Plant::None, 2).run(3_000);
        assert_eq!(run, Ok(()));
    }

    /// Found by slow-second-device seed 8995636101367943396 (the 45,652nd of a 50,000-seed
    /// sweep, 2026-12-07): a delete sent again (`unremoved`) ran after a load's read of the
    /// inbox but was answered first; the read, answered next, took the entry in, and the
    /// devices that had connected since (not owed it: another device had acked it) were
    /// sent it after later entries. Planted away, the seed finds it again.
    #[test]
    fn a_read_that_ran_before_a_delete_sent_again_does_not_bring_its_entry_back() {
        replays_in(
            Sim::with_second_devices,
            Plant::ReadPastRemoved,
            8995636101367943396,
            &["showed s0's cids in the order"],
        );
    }

    #[test]
    fn an_entry_stored_below_a_live_position_reaches_the_device_that_passed_it() {
        replays_in(
            Sim::with_second_devices,
            Plant::OweNonePassed,
            15780009465165166133,
            &["s2->r1: shown in the order"],
        );
    }

    /// A plant each device's screen finds and the order of first copies does not (another
    /// device of the user showed the message first, in its place): replayed by the seed
    /// that found the hole (a review's per-device check, 2026-12-06, one or two in 5,000
    /// two-node seeds each), holding without the plant.
    fn a_device_shows_out_of_order_with(plant: Plant, seed: u64) {
        replays(plant, seed, 2, &["a device of", "showed"]);
    }

    /// Found by two-node seed 18137199437984738542 in a 10,000-seed sweep (2026-12-07): with
    /// Redis away from node A, s1's 15 to 18, long in A's mesh from a connection s1 had
    /// since left, went live on r1's shard after s1's resend of 10, stored by node B with a
    /// higher id, was shown there; s1's client, holding answers, told them in id order: 15
    /// to 18 before 10. A message now goes live only above the pair's highest id the mirror
    /// took in (`confirmed` in `shard/mirror.rs`). Since a refused first attempt holds its
    /// pair back (`refused_unstored`), the plant is rarer (no seed in 60,000 two-node runs):
    /// it is replayed by two nodes with slow second devices and resyncs, seed
    /// 3679527174075262693 (the 9,105th), which holds without it.
    #[test]
    fn two_nodes_a_message_below_its_pairs_top_id_in_the_mirror_does_not_go_live() {
        replays_in(
            |seed, plant| Sim::with_all_of_it(seed, plant, 2),
            Plant::LiveBelowTop,
            3679527174075262693,
            &["order"],
        );
    }

    /// A read taken in before its mark came (as before 2026-12-07): a push of an entry
    /// appended before the read, acked on the other node before it, came after the read's
    /// answer; the read lacked it, and the device here that had not been sent it never was
    /// (a review's finding; the check of each connected device left such pushes out until
    /// reads waited for their marks). The first two-node seed that finds it, holding
    /// without the plant. (Before the marks, a push that came after a read past it was also
    /// kept out of the mirror by a rule of its own, `read_ahead`, found by two-node seed
    /// 8820755702083669164 as a device showing f0's 2 after 3: with the marks no such push
    /// comes, and 5,000 seeds with that rule planted away find nothing; the rule is gone.)
    #[test]
    fn two_nodes_a_read_taken_in_before_its_mark_misses_what_was_acked_elsewhere() {
        replays(
            Plant::ReadBeforeMark,
            571666317897564369,
            2,
            &["never sent"],
        );
    }

    /// The live path's known gap on one device: s1's 13 to 16 went live on node B while
    /// Redis was away from it; s1 moved and resent them, and node A stored them, s1 told
    /// A's ids. A device that connected on B later was sent the live 15 and 16 still unacked
    /// there, then A's copies of 13 and 14 (docs/operations.md "Live delivery"). Found at
    /// the end of 2026-12-07 by the 53,183rd seed of this family: the per-device check now
    /// leaves out a live copy whose sender was told a later attempt's id, as the per-user
    /// check does (`live_told_other`).
    #[test]
    fn three_nodes_a_live_copy_told_a_later_attempts_id_is_the_known_gap() {
        let mut sim = Sim::with_all_of_it(16632021380122513067, Plant::None, 3);
        let result = sim.run(3_000);
        assert!(result.is_ok(), "{result:?}");
    }

    /// Three nodes with slow second devices and resyncs, found by seed 8778964247935763839
    /// (in the first sweep of that family, 2026-12-07): node B read r1's inbox with s0's 15 in
    /// it, and the read waited for its mark; the channel dropped, and the resync's load
    /// replaced that one, read and all. A device on node C acked 15 out of Redis before the
    /// next read, so B's device, connected since before 15 was sent, was never sent it. The
    /// replaced load's read is now known to the next one, which owes what it lacks.
    #[test]
    fn three_nodes_a_read_replaced_before_its_mark_still_owes_what_it_had() {
        replays_in(
            |seed, plant| Sim::with_all_of_it(seed, plant, 3),
            Plant::ForgetUnmarkedRead,
            8778964247935763839,
            &["never sent"],
        );
    }

    /// Two nodes with slow second devices and resyncs (`Sim::with_all_of_it`), found by
    /// seed 7832106425874293347 (2026-12-07, evening): Redis away from node B, s0's 1 and 2
    /// were refused there; s0 moved to node A and resent them, and A stored them under ids
    /// of the same millisecond as the ids B had given s0's 3 to 5, from a lower slot. B showed
    /// 3 to 5 live first; the client, telling held answers in id order, told 1 and 2 first.
    /// Now a pair goes live only once every cid refused here is seen stored. Since a resend
    /// refused anywhere takes its pair's confirmation back, that seed's course no longer
    /// meets it; the plant is now found by seed 11091458058628699080 (the 36,520th of the
    /// family, `seed_for_a_plant`), where r0 is shown s0's 11 before its 10.
    #[test]
    fn two_nodes_a_pair_goes_live_only_once_its_refused_cids_are_stored() {
        replays_in(
            |seed, plant| Sim::with_all_of_it(seed, plant, 2),
            Plant::LivePastRefused,
            11091458058628699080,
            &["order"],
        );
    }

    /// One node, found by seed 6921874350140192627 (one in 10,000 one-node seeds): entries of
    /// s1 to r1 were acked and their deletes did not run (timed out or Redis down); a reload
    /// read them again and a device of r1 already sent s1's 22 was sent 11, 12, 19, 13 and 20
    /// after it. Holding since deletes Redis did not run are sent again and kept out of
    /// reads; replayed by the first one-node seed that finds it since reads wait for their
    /// marks (`seed_for_a_plant` with `RINGGATE_SIM_NODES=1`; a device showed s2's 4 before 1).
    #[test]
    fn a_delete_redis_did_not_run_does_not_bring_its_entry_back() {
        replays(
            Plant::ForgetUnremoved,
            6388806903381488071,
            1,
            &["a device of", "showed"],
        );
    }

    /// Found by seeds 2061169335744875953 (a reload's read was empty; pushes of s1's 21 and
    /// 22 had come during it, past its end, left for the next read, while 17 and 19, above
    /// them, were held and gone: owed at once, a device showed 17 and 19 before 21 and 22)
    /// and 11461949646555690551 (entries that waited during a load were let in after it
    /// while the inbox was missing an entry, so left for the next read, below what the load
    /// owed at once). Since deletes Redis did not run are sent again and reads wait for their
    /// marks (2026-12-07) the runs took another course: the seed replayed is the first
    /// two-node seed that finds the plant now (`seed_for_a_plant`; a device showed s0's 27 to
    /// 30 before 16).
    #[test]
    fn two_nodes_a_reload_owes_nothing_above_what_the_next_read_judges() {
        a_device_shows_out_of_order_with(Plant::OweAheadOfLeft, 13642108178726191455);
    }

    /// Found by seed 3143267144307512625: a reload read s0's 22, whose write (landed late)
    /// waited for its resolve; 17 and 25, above it, were gone (acked on the other node):
    /// owed at once, a device showed them before 22. Replayed by the first two-node seed that
    /// finds it since the runs' course changed on 2026-12-07 (a device showed s1's 14 before
    /// 10).
    #[test]
    fn two_nodes_a_reload_owes_nothing_above_an_entry_of_its_read_that_waits() {
        a_device_shows_out_of_order_with(Plant::OweAheadOfWaiting, 2541360246100669508);
    }

    /// Shards also resync in the middle of runs (a lease found lapsed; the channel
    /// subscribed again, losing what it had not delivered): a review's addition, which found
    /// that a load replaced by a resync dropped what it had been pushed (seed
    /// 6424213191511302372, fixed 2026-12-06).
    #[test]
    fn two_nodes_with_resyncs() {
        sweep_family(
            "two nodes, resyncs",
            "two_nodes_with_resyncs",
            TWO_NODE_SEEDS / 4,
            |seed| Sim::with_resyncs(seed, Plant::None, 2),
        );
    }

    /// The plants [`seed_for_a_plant`] can look for, by name.
    const PLANTS: [(&str, Plant); 27] = [
        ("OweNothing", Plant::OweNothing),
        ("OweNoneGone", Plant::OweNoneGone),
        ("ReadBeforeMark", Plant::ReadBeforeMark),
        ("ForgetUnmarkedRead", Plant::ForgetUnmarkedRead),
        ("LivePastRefused", Plant::LivePastRefused),
        ("LivePastUnrouted", Plant::LivePastUnrouted),
        ("ForgetUnremoved", Plant::ForgetUnremoved),
        ("OweAheadOfLeft", Plant::OweAheadOfLeft),
        ("OweAheadOfWaiting", Plant::OweAheadOfWaiting),
        ("NoFence", Plant::NoFence),
        ("DropWrite", Plant::DropWrite),
        ("RemoveNext", Plant::RemoveNext),
        ("NoClientOrder", Plant::NoClientOrder),
        ("Unflagged", Plant::Unflagged),
        ("LoseFrame", Plant::LoseFrame),
        ("WrongId", Plant::WrongId),
        ("ShowPastMissing", Plant::ShowPastMissing),
        ("LimitResends", Plant::LimitResends),
        ("LivePastUnsure", Plant::LivePastUnsure),
        ("LivePastUnpushed", Plant::LivePastUnpushed),
        ("LiveUnconfirmed", Plant::LiveUnconfirmed),
        ("LiveBelowTop", Plant::LiveBelowTop),
        ("OweNonePassed", Plant::OweNonePassed),
        ("ReadPastRemoved", Plant::ReadPastRemoved),
        ("ConfirmBelowUnsure", Plant::ConfirmBelowUnsure),
        ("NoPairTop", Plant::NoPairTop),
        ("TopByIdOnly", Plant::TopByIdOnly),
    ];

    /// Finds a seed for a replay test of a rare plant: `RINGGATE_SIM_PLANT=TopByIdOnly` (or
    /// another of [`PLANTS`]) `RINGGATE_SIM_SEEDS=30000 cargo test --release --lib
    /// sim::tests::seed_for_a_plant -- --ignored --nocapture`: the first seed whose run with
    /// the plant fails on a rule whose message holds `RINGGATE_SIM_RULE` ("order" unless set)
    /// and that holds without it. `RINGGATE_SIM_NODES` nodes (2 unless set), in the family
    /// `RINGGATE_SIM_FAMILY`: `plain` (the default), `resyncs`, `slow` (slow second
    /// devices) or `all` (slow second devices and resyncs).
    #[test]
    #[ignore]
    fn seed_for_a_plant() {
        let wanted = std::env::var("RINGGATE_SIM_PLANT").unwrap_or_default();
        let Some(&(_, plant)) = PLANTS.iter().find(|(name, _)| *name == wanted) else {
            let names: Vec<&str> = PLANTS.iter().map(|(name, _)| *name).collect();
            panic!("RINGGATE_SIM_PLANT: one of {names:?}, not {wanted:?}");
        };
        let rule = std::env::var("RINGGATE_SIM_RULE").unwrap_or_else(|_| "order".into());
        let nodes = std::env::var("RINGGATE_SIM_NODES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(2);
        let family = std::env::var("RINGGATE_SIM_FAMILY").unwrap_or_else(|_| "plain".into());
        let sim_of = |seed, plant| match family.as_str() {
            "plain" if nodes == 1 => Sim::new(seed, plant),
            "plain" => Sim::with_nodes(seed, plant, nodes),
            "resyncs" => Sim::with_resyncs(seed, plant, nodes),
            "slow" if nodes == 1 => Sim::with_second_devices(seed, plant),
            "slow" => Sim::with_nodes_and_second_devices(seed, plant, nodes),
            "all" => Sim::with_all_of_it(seed, plant, nodes),
            other => panic!("RINGGATE_SIM_FAMILY: plain, resyncs, slow or all, not {other:?}"),
        };
        for seed in seeds(TWO_NODE_SEEDS) {
            let Err(e) = sim_of(seed, plant).run(3_000) else {
                continue;
            };
            if e.contains(&rule) && sim_of(seed, Plant::None).run(3_000).is_ok() {
                println!("{plant:?} ({family}, {nodes} nodes): seed {seed}: {e}");
                return;
            }
        }
        panic!("{plant:?}: no seed found");
    }

    /// Finds a seed for `two_nodes_a_live_messages_copy_stored_elsewhere_is_the_known_gap`
    /// when the runs' course changes: `RINGGATE_SIM_SEEDS=20000 cargo test --release --lib
    /// sim::tests::seed_for_a_live_copy_elsewhere -- --ignored --nocapture` prints the first
    /// two-node seed whose run holds and meets the known gap.
    #[test]
    #[ignore]
    fn seed_for_a_live_copy_elsewhere() {
        for seed in seeds(TWO_NODE_SEEDS) {
            let mut sim = Sim::with_nodes(seed, Plant::None, 2);
            if sim.run(3_000).is_ok() && sim.counts.live_copy_elsewhere > 0 {
                println!("seed {seed}: {:?}", sim.counts);
                return;
            }
        }
        panic!("no seed found");
    }

    #[test]
    fn two_nodes_a_message_lost_after_it_was_stored_is_found() {
        finds_two_nodes(Plant::RemoveNext, "lost");
    }

    #[test]
    fn two_nodes_a_write_answered_stored_but_not_kept_is_found_when_accepted() {
        finds_two_nodes(Plant::DropWrite, "before it was safe");
    }
}

#[cfg(test)]
impl Sim {
    /// Scripted tests drive one shard: the simulation's shard 0, alone.
    fn shard(&mut self) -> &mut Shard {
        &mut self.shards[0]
    }

    fn store(&self) -> &StoreEnd {
        &self.stores[0]
    }

    /// Scripted tests: r0's load `token` reads `entries`, and its mark comes on the channel.
    fn r0_reads(&mut self, token: u64, entries: Vec<(InboxSeq, StoredMessage)>, now: u64) {
        let loaded = StoreReply::Loaded {
            user: "r0".into(),
            token,
            result: Ok(Loaded {
                received: Vec::new(),
                entries,
                expired: 0,
            }),
        };
        self.shard().on_store_reply(loaded, now);
        let mark = StoreReply::ReadMarked {
            user: "r0".into(),
            token,
        };
        self.shard().on_store_reply(mark, now);
    }

    /// Scripted tests: the store grants slot 0 to the (only) shard's claim asked at `asked_at`.
    fn grant_id_slot(&mut self, asked_at: u64, now: u64) {
        let granted = StoreReply::IdSlot {
            asked_at,
            answer: Ok(IdGrant {
                slot: 0,
                not_before_ms: 0,
            }),
        };
        self.shard().on_store_reply(granted, now);
    }

    /// Scripted tests: a batch of the (only) shard failed: it takes Redis for away.
    fn redis_goes_away(&mut self, now: u64) {
        let down = StoreReply::Batch {
            ops: 1,
            latency: std::time::Duration::ZERO,
            error: Some("connection lost".into()),
            expired: 0,
            breaker_open: false,
        };
        self.shard().on_store_reply(down, now);
    }

    /// Scripted tests: the (only) shard has heard its first resync and a good batch, and a
    /// device of r0 has connected, so r0's inbox load is out (in `store().ops`).
    fn with_device_of_r0_loading() -> (Sim, u64) {
        let mut sim = Sim::with_shards(1, Plant::None, 1);
        let now = sim.now();
        let resync = sim.channel[0].pop_front().expect("the first resync");
        sim.shard().on_store_reply(resync, now);
        let up = StoreReply::Batch {
            ops: 1,
            latency: std::time::Duration::ZERO,
            error: None,
            expired: 0,
            breaker_open: false,
        };
        sim.shard().on_store_reply(up, now);
        // The shard's message id slot, claimed when the store was enabled.
        let claim = sim.store().ops.try_recv().expect("the id slot claim");
        let StoreOp::ClaimIdSlot {
            held: None,
            asked_at,
        } = claim
        else {
            panic!("the id slot claim first");
        };
        sim.grant_id_slot(asked_at, now);
        let index = sim.shard().admit(0).unwrap();
        sim.devices
            .push(Device::new(0, 0, index, Pipe::connect("r0")));
        sim.poll_all();
        (sim, now)
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;

    /// The tokens of the loads of r0's inbox the shard asked since last called.
    fn loads(sim: &mut Sim) -> Vec<u64> {
        let mut tokens = Vec::new();
        while let Ok(op) = sim.store().ops.try_recv() {
            // (The simulation's two senders load their own inboxes too.)
            match op {
                StoreOp::Load { user, token, .. } if user == "r0" => tokens.push(token),
                _ => {}
            }
        }
        tokens
    }

    /// A reload wanted while the user's mirror is still loading (its push list full) waits for
    /// the load to end; a tick meanwhile used to drop it, and the entries past the full push
    /// list never reached the online user's mirror (review finding, 7e7f976).
    #[test]
    fn a_reload_wanted_during_a_load_happens_after_it() {
        let (mut sim, now) = Sim::with_device_of_r0_loading();
        let first = loads(&mut sim);
        assert_eq!(first.len(), 1, "the device's first load");
        // More pushes than the window while it loads: the last one asks for a reload.
        let window = sim.shard().cfg().window as u64;
        for n in 0..=window {
            let seq = stream_id_to_seq(&format!("{}-{n}", ManualClock::WALL_ORIGIN_MS)).unwrap();
            let msg = StoredMessage {
                id: 100 + n,
                from: "s9".into(),
                cid: format!("\"p{n}\"").into(),
                ts: 1,
                body: "1".into(),
                msg_type: None,
            };
            sim.shard().on_store_reply(
                StoreReply::Pushed {
                    user: "r0".into(),
                    seq,
                    msg,
                },
                now,
            );
        }
        // Ticks while the load is still out.
        for _ in 0..3 {
            sim.clock.advance(20);
            sim.shard().on_tick();
        }
        assert!(
            loads(&mut sim).is_empty(),
            "no second load while the first is out"
        );
        let now = sim.now();
        sim.r0_reads(first[0], Vec::new(), now);
        sim.clock.advance(20);
        sim.shard().on_tick();
        assert_eq!(loads(&mut sim).len(), 1, "the wanted reload, once loaded");
    }

    /// A failed load is asked again once `LOAD_RETRY_MS` have passed, not before (the tick
    /// skips its pass over the mirrors until a retry is due), and again after a second
    /// failure.
    #[test]
    fn a_failed_load_is_retried_when_due_and_after_each_failure() {
        use crate::shard::mirror::LOAD_RETRY_MS;
        let (mut sim, _) = Sim::with_device_of_r0_loading();
        let mut token = loads(&mut sim)[0];
        for round in 0..3 {
            let failed = StoreReply::Loaded {
                user: "r0".into(),
                token,
                result: Err(StoreError::Unavailable("down".into())),
            };
            let now = sim.now();
            sim.shard().on_store_reply(failed, now);
            for _ in 0..LOAD_RETRY_MS / 20 - 1 {
                sim.clock.advance(20);
                sim.shard().on_tick();
            }
            assert!(loads(&mut sim).is_empty(), "round {round}: too early");
            sim.clock.advance(40);
            sim.shard().on_tick();
            let again = loads(&mut sim);
            assert_eq!(again.len(), 1, "round {round}: asked again once due");
            token = again[0];
        }
    }
}

#[cfg(test)]
mod order_tests {
    use super::*;
    use crate::clock::Clock;
    use crate::delivery::ids::MessageIds;
    use crate::delivery::message::Message;

    /// The shard with a resync and a good batch behind it, and recipient r0 online with its
    /// (empty) inbox loaded.
    pub(super) fn with_r0_online() -> (Sim, u64) {
        let (mut sim, now) = Sim::with_device_of_r0_loading();
        let mut load = None;
        while let Ok(op) = sim.store().ops.try_recv() {
            if let StoreOp::Load { user, token, .. } = op {
                if user == "r0" {
                    load = Some(token);
                }
            }
        }
        sim.r0_reads(load.expect("r0's load"), Vec::new(), now);
        sim.poll_all();
        (sim, now)
    }

    /// s0 sends `cid` to r0; returns the append the shard queued.
    pub(super) fn send(sim: &mut Sim, cid: &str) -> Box<Message> {
        let text = format!(r#"{{"op":"send","to":"r0","cid":"{cid}","body":"{cid}"}}"#);
        sim.senders[0].pipe.send(&text);
        sim.poll_all();
        loop {
            match sim.store().ops.try_recv().expect("the send's append") {
                StoreOp::Append(msg) => return msg,
                _ => continue,
            }
        }
    }

    pub(super) fn seq(n: u64) -> InboxSeq {
        stream_id_to_seq(&format!("{}-{n}", ManualClock::WALL_ORIGIN_MS)).unwrap()
    }

    pub(super) fn push(sim: &mut Sim, now: u64, n: u64, msg: StoredMessage) {
        let reply = StoreReply::Pushed {
            user: "r0".into(),
            seq: seq(n),
            msg,
        };
        sim.shard().on_store_reply(reply, now);
    }

    pub(super) fn stored(msg: &Message) -> StoredMessage {
        StoredMessage {
            id: msg.id,
            from: msg.from.clone(),
            cid: msg.cid.clone(),
            ts: msg.ts,
            body: msg.body.clone(),
            msg_type: None,
        }
    }

    pub(super) fn answer(sim: &mut Sim, now: u64, msg: Box<Message>, n: u64) {
        let reply = StoreReply::Appended {
            msg,
            result: Ok(Appended::Stored {
                seq: seq(n),
                pushed: 0,
                offline: false,
            }),
        };
        sim.shard().on_store_reply(reply, now);
    }

    pub(super) fn shown(sim: &mut Sim) -> Vec<String> {
        sim.poll_all();
        sim.devices[0]
            .pipe
            .frames()
            .into_iter()
            .filter(|v| v["op"] == "msg")
            .map(|v| format!("{}:{}", v["from"].as_str().unwrap(), v["cid"]))
            .collect()
    }

    /// What s0 was told: `accepted:<cid>` or `error:<cid>`, in order.
    pub(super) fn told(sim: &mut Sim) -> Vec<String> {
        sim.poll_all();
        sim.senders[0]
            .pipe
            .frames()
            .into_iter()
            .filter(|v| v["op"] == "accepted" || v["op"] == "error")
            .map(|v| {
                format!(
                    "{}:{}",
                    v["op"].as_str().unwrap(),
                    v["cid"].as_str().unwrap()
                )
            })
            .collect()
    }

    /// s0 connects again (here, after a stay on another node), `ms` later.
    fn sender_arrives_again(sim: &mut Sim, ms: u64) {
        sim.clock.advance(ms);
        assert!(sim.connect_sender_again(0, 0, false));
        sim.poll_all();
    }

    /// Found by the two-node simulation (seed 4749320442185338218): s0 was told `accepted`
    /// for "b" by another node and came back here, which Redis is away from, before b's
    /// entry reached this node's channel. Its next message "c" is refused for now (no write
    /// of the pair confirmed here since it arrived), not shown live before "b". Planted
    /// `LiveUnconfirmed`: "c" goes live and r0 sees it before "b", which s0 was told first.
    /// (The sweeps no longer meet this: 40,000 two-node seeds with the plant found no order
    /// break since answers and pushes come on two queues, so it is shown here.)
    #[test]
    fn a_sender_back_from_another_node_goes_live_only_past_a_write_confirmed_since() {
        for plant in [OrderPlant::None, OrderPlant::LiveUnconfirmed] {
            let (mut sim, now) = with_r0_online();
            sim.shard().plant_order_bug(plant);
            // An active conversation: "a" stored here and shown.
            let a = send(&mut sim, "a");
            push(&mut sim, now, 1, stored(&a));
            answer(&mut sim, now, a, 1);
            // s0 moves to another node, which stores "b" (told `accepted` there), and back.
            sim.clock.advance(10);
            let b = StoredMessage {
                id: MessageIds::for_shard(5)
                    .next(sim.clock.wall_ms(), 0)
                    .unwrap(),
                from: "s0".into(),
                cid: "\"b\"".into(),
                ts: 1,
                body: "\"b\"".into(),
                msg_type: None,
            };
            sender_arrives_again(&mut sim, 10);
            let now = sim.now();
            sim.redis_goes_away(now);
            sim.senders[0]
                .pipe
                .send(r#"{"op":"send","to":"r0","cid":"c","body":"c"}"#);
            sim.poll_all();
            push(&mut sim, now, 2, b);
            match plant {
                OrderPlant::None => {
                    assert_eq!(told(&mut sim), ["error:c"], "refused for now");
                    assert_eq!(shown(&mut sim), ["s0:\"a\"", "s0:\"b\""]);
                }
                // b, arriving behind the live entry, waits for a reload: after c.
                _ => assert_eq!(
                    shown(&mut sim),
                    ["s0:\"a\"", "s0:\"c\""],
                    "c shown live before b"
                ),
            }
        }
    }

    /// What r0's device was shown since last read, each acked.
    fn shown_and_acked(sim: &mut Sim) -> Vec<String> {
        sim.poll_all();
        let mut shown = Vec::new();
        for v in sim.devices[0].pipe.frames() {
            if v["op"] == "msg" {
                shown.push(format!("{}:{}", v["from"].as_str().unwrap(), v["cid"]));
                let ack = format!(r#"{{"op":"ack","seq":{}}}"#, v["seq"]);
                sim.devices[0].pipe.send(&ack);
            }
        }
        sim.poll_all();
        shown
    }

    /// Time passes with every claim of the shard's message id slot left unanswered, until the
    /// slot lapses; returns when the last claim was asked (to answer it).
    fn lose_the_id_slot(sim: &mut Sim) -> u64 {
        let mut asked = None;
        for _ in 0..24 * 60 {
            sim.clock.advance(1_000);
            sim.shard().on_tick();
            while let Ok(op) = sim.store().ops.try_recv() {
                if let StoreOp::ClaimIdSlot { asked_at, .. } = op {
                    asked = Some(asked_at);
                }
            }
            if sim.metrics[0].id_slot_held.get() == 0 {
                return asked.expect("a claim was asked");
            }
        }
        panic!("the id slot never lapsed");
    }

    /// A first attempt refused on its sender's shard before it reached the recipient's (here:
    /// no message id slot; also a full shard channel, `rate_limited`) comes to the recipient's
    /// shard with the pair's next message. While Redis is away, that message is refused for
    /// now: shown live, it would come before the refused one, which its sender resends, maybe
    /// on another node that numbers it below (a review's finding, as seed 7832106425874293347
    /// found it for a refusal on the recipient's shard). Planted `LivePastUnrouted`: "c" goes
    /// live before "b".
    #[test]
    fn a_send_refused_before_routing_holds_the_pairs_next_message_off_the_live_path() {
        for plant in [OrderPlant::None, OrderPlant::LivePastUnrouted] {
            let (mut sim, now) = with_r0_online();
            sim.shard().plant_order_bug(plant);
            // An active conversation: "a" stored here and shown.
            let a = send(&mut sim, "a");
            push(&mut sim, now, 1, stored(&a));
            answer(&mut sim, now, a, 1);
            assert_eq!(told(&mut sim), ["accepted:a"]);
            // r0's device shows and acks it (or the wait below would time it out).
            assert_eq!(shown_and_acked(&mut sim), ["s0:\"a\""]);
            let asked_at = lose_the_id_slot(&mut sim);
            sim.senders[0]
                .pipe
                .send(r#"{"op":"send","to":"r0","cid":"b","body":"b"}"#);
            assert_eq!(told(&mut sim), ["error:b"], "no id slot");
            let now = sim.now();
            sim.grant_id_slot(asked_at, now);
            sim.redis_goes_away(now);
            sim.senders[0]
                .pipe
                .send(r#"{"op":"send","to":"r0","cid":"c","body":"c"}"#);
            sim.poll_all();
            match plant {
                OrderPlant::None => {
                    assert_eq!(told(&mut sim), ["error:c"], "refused for now");
                    assert!(shown(&mut sim).is_empty());
                }
                _ => assert_eq!(
                    shown(&mut sim),
                    ["s0:\"c\""],
                    "c shown live while b is unstored"
                ),
            }
        }
    }

    /// Pushes of this shard's own writes came before their answers (so they wait), and another
    /// node's entry came after them: it waits behind them, and the sender's next message comes
    /// after both. Before the fix the other node's entry went in at once, the two waiting ones
    /// no longer fitted below it, and s0's third message reached r0 before its first two (seen
    /// in tests/cluster_random.rs).
    #[test]
    fn an_entry_pushed_behind_waiting_ones_goes_in_after_them() {
        let (mut sim, now) = with_r0_online();
        let first = send(&mut sim, "a");
        let second = send(&mut sim, "b");
        push(&mut sim, now, 1, stored(&first));
        push(&mut sim, now, 2, stored(&second));
        let other = StoredMessage {
            id: 7,
            from: "s9".into(),
            cid: "\"x\"".into(),
            ts: 1,
            body: "1".into(),
            msg_type: None,
        };
        push(&mut sim, now, 3, other);
        assert!(shown(&mut sim).is_empty(), "nothing before the answers");
        answer(&mut sim, now, first, 1);
        answer(&mut sim, now, second, 2);
        let third = send(&mut sim, "c");
        push(&mut sim, now, 4, stored(&third));
        answer(&mut sim, now, third, 4);
        assert_eq!(
            shown(&mut sim),
            ["s0:\"a\"", "s0:\"b\"", "s9:\"x\"", "s0:\"c\""],
            "in the order Redis holds them"
        );
    }
}

#[cfg(test)]
mod doubt_tests {
    use super::order_tests::*;
    use super::*;

    /// The tick's resolve of the pair's writes in doubt, answered `landed`.
    fn resolve(sim: &mut Sim, landed: Vec<Fate>) {
        sim.clock.advance(20);
        sim.shard().on_tick();
        let mut resolve = None;
        while let Ok(op) = sim.store().ops.try_recv() {
            if let StoreOp::Resolve { to, from, writes } = op {
                resolve = Some(StoreReply::Resolved {
                    to,
                    from,
                    writes,
                    landed: Some(landed.clone()),
                });
            }
        }
        let now = sim.now();
        sim.shard()
            .on_store_reply(resolve.expect("the tick resolves the write in doubt"), now);
    }

    fn lose_answer(sim: &mut Sim, now: u64, msg: Box<crate::delivery::message::Message>) {
        let lost = StoreReply::Appended {
            msg,
            result: Err(StoreError::Unavailable("connection lost".into())),
        };
        sim.shard().on_store_reply(lost, now);
    }

    /// The first write's answer is lost after its entry was pushed: it is in doubt and its
    /// sender hears nothing. The second is stored, but neither shown nor told before the
    /// first is resolved. Answered `unavailable` at once (as before), the first would be in
    /// Redis, shown here or on another node, and its resend told `accepted` after the second
    /// (tests/cluster.rs). Resolved as landed: both shown and told, in that order.
    #[test]
    fn a_write_in_doubt_that_landed_is_accepted_before_later_ones() {
        let (mut sim, now) = with_r0_online();
        let first = send(&mut sim, "a");
        let second = send(&mut sim, "b");
        push(&mut sim, now, 1, stored(&first));
        lose_answer(&mut sim, now, first);
        push(&mut sim, now, 2, stored(&second));
        answer(&mut sim, now, second, 2);
        assert!(shown(&mut sim).is_empty(), "held behind the entry in doubt");
        assert!(
            told(&mut sim).is_empty(),
            "nothing told before the first is known"
        );
        resolve(&mut sim, vec![Fate::Landed]);
        assert_eq!(shown(&mut sim), ["s0:\"a\"", "s0:\"b\""]);
        assert_eq!(told(&mut sim), ["accepted:a", "accepted:b"]);
    }

    /// Planted `TellDoubtAtOnce`: the first write, in doubt, is answered `unavailable` at
    /// once though it landed (SPEC 4: a send answered `unavailable` was not taken). (The
    /// sweeps found it as an order break while the client's hold ran out after 10 s; since
    /// holds last while connected, the late `accepted` of the resend is put in its place
    /// and only this check sees it.)
    #[test]
    fn telling_a_write_in_doubt_unavailable_at_once_refuses_a_send_that_was_taken() {
        let (mut sim, now) = with_r0_online();
        sim.shard()
            .plant_order_bug(crate::shard::durable::OrderPlant::TellDoubtAtOnce);
        let first = send(&mut sim, "a");
        push(&mut sim, now, 1, stored(&first));
        lose_answer(&mut sim, now, first);
        assert_eq!(told(&mut sim), ["error:a"], "refused though it may land");
        resolve(&mut sim, vec![Fate::Landed]);
        assert_eq!(shown(&mut sim), ["s0:\"a\""], "and it had landed");
    }

    /// The first write's answer is lost and it never landed (no entry came): the second,
    /// stored after it, may be shown (the first cannot land after it), but is told only after
    /// the first is resolved and answered `unavailable`.
    #[test]
    fn a_write_in_doubt_that_never_landed_is_refused_before_later_ones_are_told() {
        let (mut sim, now) = with_r0_online();
        let first = send(&mut sim, "a");
        let second = send(&mut sim, "b");
        lose_answer(&mut sim, now, first);
        push(&mut sim, now, 2, stored(&second));
        answer(&mut sim, now, second, 2);
        assert_eq!(shown(&mut sim), ["s0:\"b\""]);
        assert!(told(&mut sim).is_empty(), "the second waits for the first");
        resolve(&mut sim, vec![Fate::Never]);
        assert_eq!(told(&mut sim), ["error:a", "accepted:b"]);
    }

    /// The first write's answer is lost and it never landed, but its cid is stored by
    /// another attempt (a dead run's write, in Redis before anything this run wrote): it is
    /// answered `accepted` with that attempt's id, before the second, as its resend would be
    /// (found by the simulation, seed 5607429648130462507: answered `unavailable`, the
    /// resend was told the dead run's lower id after the second).
    #[test]
    fn a_write_in_doubt_whose_cid_another_attempt_stored_is_accepted_with_that_id() {
        let (mut sim, now) = with_r0_online();
        let first = send(&mut sim, "a");
        let second = send(&mut sim, "b");
        lose_answer(&mut sim, now, first);
        answer(&mut sim, now, second, 2);
        assert!(told(&mut sim).is_empty(), "the second waits for the first");
        resolve(&mut sim, vec![Fate::Duplicate(77)]);
        sim.poll_all();
        let frames = sim.senders[0].pipe.frames();
        let accepted: Vec<(&str, &str)> = frames
            .iter()
            .filter(|v| v["op"] == "accepted")
            .map(|v| (v["cid"].as_str().unwrap(), v["id"].as_str().unwrap()))
            .collect();
        assert_eq!(accepted[0], ("a", "77"));
        assert_eq!(accepted[1].0, "b");
    }
}
