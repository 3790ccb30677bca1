//! The embedded store as an implementation of the store protocol: it takes the same
//! [`StoreOp`]s as Redis and answers with the same [`StoreReply`]s, in process, so that a
//! shard's delivery rules do not fork on the store kind (issue 15).
//!
//! # What it owns
//! The offline inboxes of the users homed on one shard (a [`MemoryInbox`], the authority, as
//! Redis is in Redis mode). Appends to a user online on the shard (the append says so) are
//! pushed, as Redis pushes to the runs in `loc:<user>`. Not what a user received (read
//! receipts): with one node the shard's own record is the only one, kept across connects.
//!
//! # What it does not do
//! Nothing another node would need: no directory, lease, rooms, presence, typing, watch or
//! id slots ([`EmbeddedStore::serves`] says no: the shard asks [`super::StoreCaps`] before
//! it would send them). It never answers `unavailable`, so no write of it is ever in doubt
//! and it has nothing to resolve.
//!
//! Seqs carry the wall time of their append in Redis's encoding (`seq_time_ms`), so the
//! shard's mirror ages an entry the same way whichever store holds it. Time is injected.

use std::collections::VecDeque;

use super::redis::{seq_floor_at, Appended, Loaded, StoreOp, StoreReply};
use super::{Inbox, InboxLimits, MemoryInbox, Store, StoreCaps};

/// (Who is online is the mirror's to say: each append carries it, `StoreWrite::to_mirror`.
/// The store's operations run in the order the mirror asked them, so that is what a set of
/// users registered by `Load` and removed by `Leave` would say, without a second copy of
/// every online user id.)
pub struct EmbeddedStore {
    inbox: MemoryInbox,
}

impl EmbeddedStore {
    pub fn new(limits: InboxLimits) -> Self {
        EmbeddedStore {
            inbox: MemoryInbox::new(limits),
        }
    }

    /// Whether this store can answer `op` (the rest are for several nodes).
    pub fn serves(op: &StoreOp) -> bool {
        matches!(
            op,
            StoreOp::Append(_)
                | StoreOp::Remove { .. }
                | StoreOp::Load { .. }
                | StoreOp::Leave { .. }
                | StoreOp::Probe
        )
    }

    /// Entries held (for the shard's memory gauge).
    pub fn held(&self) -> usize {
        self.inbox.total_len()
    }

    /// The seqs of `user`'s entries, oldest first (for the simulation's planted bugs).
    #[cfg(test)]
    pub fn seqs(&self, user: &str) -> Vec<crate::store::InboxSeq> {
        self.inbox
            .read(user, 0, usize::MAX, 0)
            .into_iter()
            .map(|(seq, _)| seq)
            .collect()
    }

    /// Drop expired entries; how many (counted by the shard, never silent).
    pub fn expire(&mut self, now: u64) -> usize {
        self.inbox.expire(now)
    }

    /// Run `op` at `now` (monotonic ms; `wall`: ms since the epoch) and put its answer, and
    /// the push it made, in `out`. `op` must be one it [`serves`](Self::serves).
    pub fn apply(&mut self, op: StoreOp, now: u64, wall: u64, out: &mut Vec<StoreReply>) {
        match op {
            StoreOp::Append(msg) => {
                self.inbox.raise_next_seq(seq_floor_at(wall));
                let loaded = msg.write.to_mirror;
                // A second copy only for the mirror of a user online here.
                let stored = msg.stored();
                let copy = loaded.then(|| stored.clone());
                let result = self.inbox.append(&msg.to, stored, now);
                let pushed = (result.as_ref().ok().copied().zip(copy))
                    .map(|(seq, entry)| (msg.to.clone(), seq, entry));
                out.push(StoreReply::Appended {
                    msg,
                    result: result.map(|seq| Appended::Stored {
                        seq,
                        pushed: 0,
                        offline: !loaded,
                    }),
                });
                // After the answer, as Redis's push usually comes: either order works (the
                // shard holds a push of its own write until the write is answered).
                if let Some((user, seq, msg)) = pushed {
                    out.push(StoreReply::Pushed { user, seq, msg });
                }
            }
            StoreOp::Remove { user, seq, report } => {
                let ok = self.inbox.remove(&user, seq);
                out.push(StoreReply::Removed {
                    user,
                    seq,
                    ran: true,
                    ok,
                    report,
                });
            }
            StoreOp::Load { user, token, limit } => {
                let entries = self.inbox.read(&user, 0, limit, now);
                out.push(StoreReply::Loaded {
                    user,
                    token,
                    result: Ok(Loaded {
                        received: Vec::new(),
                        entries,
                        expired: 0,
                    }),
                });
            }
            StoreOp::Leave { .. } => out.push(StoreReply::Done),
            StoreOp::Probe => out.push(StoreReply::Done),
            _ => unreachable!("asked only what it serves"),
        }
    }
}

/// The embedded store on its shard: an operation is run when the shard next hears its
/// store, in the same turn (`Shard::hear_store_now`), and answered like Redis's.
pub struct InProcess {
    store: EmbeddedStore,
    asked: VecDeque<StoreOp>,
    answers: VecDeque<StoreReply>,
}

impl InProcess {
    pub fn new(limits: InboxLimits) -> Self {
        InProcess {
            store: EmbeddedStore::new(limits),
            asked: VecDeque::new(),
            // The shard's first turn opens its first epoch (as hearing Redis's channel does).
            answers: VecDeque::from([StoreReply::Resync]),
        }
    }
}

impl Store for InProcess {
    fn submit(&mut self, op: StoreOp) -> Result<(), StoreOp> {
        if !EmbeddedStore::serves(&op) {
            return Err(op);
        }
        self.asked.push_back(op);
        Ok(())
    }

    fn caps(&self) -> StoreCaps {
        StoreCaps::SINGLE_NODE
    }

    fn answers_now(&mut self, now: u64, wall: u64, out: &mut Vec<StoreReply>, max: usize) {
        let start = out.len();
        let n = max.min(self.answers.len());
        out.extend(self.answers.drain(..n));
        // Run straight into `out` (an answer is a big value: moved once, not through a
        // queue); what goes past `max` waits for the next round, ahead of anything newer.
        while self.answers.is_empty() && out.len() - start < max {
            let Some(op) = self.asked.pop_front() else {
                break;
            };
            self.store.apply(op, now, wall, out);
        }
        if out.len() - start > max {
            self.answers.extend(out.drain(start + max..));
        }
    }

    fn has_answers_now(&self) -> bool {
        !self.asked.is_empty() || !self.answers.is_empty()
    }

    fn expire(&mut self, now: u64) -> usize {
        self.store.expire(now)
    }

    fn held(&self) -> usize {
        self.store.held()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::message::{Message, ReplyTo};
    use crate::store::redis::seq_time_ms;
    use crate::store::{InboxSeq, StoreError};

    const WALL: u64 = 1_767_225_600_000;

    fn msg(to: &str, cid: &str, id: u64) -> Box<Message> {
        Box::new(Message {
            id,
            from: "alice".into(),
            to: to.into(),
            cid: cid.into(),
            ts: WALL,
            body: "1".into(),
            msg_type: None,
            reply: ReplyTo {
                shard: 0,
                conn: 0,
                serial: 0,
            },
            received_us: 0,
            write: Default::default(),
            resent: false,
            sender_arrived_ms: 0,
            refused_earlier: None,
        })
    }

    /// Runs `op` at `now` (wall time moves with it) and returns the answers.
    fn run(store: &mut EmbeddedStore, op: StoreOp, now: u64) -> Vec<StoreReply> {
        let mut out = Vec::new();
        store.apply(op, now, WALL + now, &mut out);
        out
    }

    fn stored_seq(answer: &StoreReply) -> Result<(InboxSeq, bool), StoreError> {
        match answer {
            StoreReply::Appended { result, .. } => match result.clone()? {
                Appended::Stored { seq, offline, .. } => Ok((seq, offline)),
                Appended::Duplicate { .. } => unreachable!("the embedded store has no dedup"),
            },
            _ => panic!("not an append's answer"),
        }
    }

    #[test]
    fn answers_like_redis_pushes_to_loaded_users_and_refuses_a_full_inbox() {
        let limits = InboxLimits {
            max_messages: 2,
            ..InboxLimits::default()
        };
        let mut store = EmbeddedStore::new(limits);
        // Offline: stored, nobody to push to (the shard offers the webhook push).
        let answers = run(&mut store, StoreOp::Append(msg("bob", "1", 10)), 5);
        assert_eq!(answers.len(), 1);
        let (first, offline) = stored_seq(&answers[0]).unwrap();
        assert!(offline);
        // Seqs carry their append's wall time, as Redis stream ids do.
        assert_eq!(seq_time_ms(first), WALL + 5);
        // A device connects: the load reads the inbox.
        let load = StoreOp::Load {
            user: "bob".into(),
            token: 7,
            limit: 100,
        };
        let answers = run(&mut store, load, 6);
        let [StoreReply::Loaded {
            token: 7,
            result: Ok(loaded),
            ..
        }] = &answers[..]
        else {
            panic!("a load's answer");
        };
        assert_eq!(loaded.entries.len(), 1);
        // Online (the mirror's append says so): the answer, then the push for the mirror,
        // under the same seq.
        let mut online = msg("bob", "2", 11);
        online.write.to_mirror = true;
        let answers = run(&mut store, StoreOp::Append(online), 6);
        let (second, offline) = stored_seq(&answers[0]).unwrap();
        assert!(!offline && second > first);
        assert!(
            matches!(&answers[1], StoreReply::Pushed { seq, msg, .. } if *seq == second && msg.id == 11)
        );
        // At the cap: refused, nothing pushed, nothing dropped to make room.
        let answers = run(&mut store, StoreOp::Append(msg("bob", "3", 12)), 7);
        assert_eq!(answers.len(), 1);
        assert!(matches!(
            stored_seq(&answers[0]),
            Err(StoreError::Full { count: 2, .. })
        ));
        // The first ack removes; a second ack of the same entry finds it gone.
        for ok in [true, false] {
            let remove = StoreOp::Remove {
                user: "bob".into(),
                seq: first,
                report: None,
            };
            let answers = run(&mut store, remove, 8);
            assert!(matches!(answers[..], [StoreReply::Removed { ok: o, .. }] if o == ok));
        }
        // The last device left: appends are offline again (not `to_mirror`).
        assert!(matches!(
            run(&mut store, StoreOp::Leave { user: "bob".into() }, 9)[..],
            [StoreReply::Done]
        ));
        let answers = run(&mut store, StoreOp::Append(msg("bob", "4", 13)), 9);
        assert_eq!(answers.len(), 1);
        assert!(stored_seq(&answers[0]).unwrap().1);
        assert_eq!(store.held(), 2);
    }

    #[test]
    fn only_one_nodes_operations_are_taken() {
        let mut path = InProcess::new(InboxLimits::default());
        assert!(path.submit(StoreOp::Lease).is_err());
        assert!(path
            .submit(StoreOp::Typing {
                from: "a".into(),
                to: "b".into()
            })
            .is_err());
        assert!(path.submit(StoreOp::Probe).is_ok());
        assert_eq!(path.caps(), StoreCaps::SINGLE_NODE);
        // The first answer opens the shard's first epoch, then the operations in order.
        let mut out = Vec::new();
        path.answers_now(0, WALL, &mut out, 10);
        assert!(matches!(out[..], [StoreReply::Resync, StoreReply::Done]));
        assert!(!path.has_answers_now());
    }
}
