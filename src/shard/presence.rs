//! Presence (SPEC sections 3 and 6): which of up to 100 users have a connection, for the
//! `presence` op and for `GET /api/presence` alike.
//!
//! Each user's home shard knows this node's answer. The asking shard answers its own users at
//! once and sends one `PresenceAsk` to every other home shard involved; with Redis it also
//! asks the cluster directory about every user (devices on *other* live nodes; entries of
//! nodes whose lease expired count as offline and are dropped). A user is online when any of
//! them says so; the answer goes out when the last part came back. Shards of one process
//! always answer (answers refused by a full channel are held and retried, never dropped); an
//! ask a full channel refuses is answered `unavailable` right away, so no ask waits forever on
//! a message that was never sent. If Redis cannot answer, this node's own answer stands.

use std::collections::HashMap;

use compact_str::CompactString;

use super::msg::{Presence, ShardMsg};
use super::Shard;
use crate::mesh;
use crate::proto::{self, ErrorCode, FrameError};
use crate::store::redis::StoreOp;

/// Who waits for a presence answer.
pub enum Asker {
    /// A connection (slab index, serial).
    Conn(usize, u32),
    /// `GET /api/presence`: the answers in the order asked.
    Api(tokio::sync::oneshot::Sender<Vec<bool>>),
    /// Already answered `unavailable`; late parts only free the slot.
    Gone,
}

/// A presence question waiting for other shards or the directory.
pub struct PresenceAsk {
    asker: Asker,
    /// The users in the order asked.
    users: Vec<CompactString>,
    online: HashMap<CompactString, bool>,
    /// Parts (shards, the directory) that have not answered yet.
    waiting: usize,
}

impl Shard {
    /// A connection's `presence` frame.
    pub(super) fn on_presence(&mut self, index: usize, users: Vec<CompactString>) {
        let asker = Asker::Conn(index, self.conns[index].serial);
        self.ask_presence(asker, users);
    }

    pub fn ask_presence(&mut self, asker: Asker, users: Vec<CompactString>) {
        let shards = self.mesh.as_ref().map_or(1, |m| m.shards());
        let mut by_shard: HashMap<usize, Vec<CompactString>> = HashMap::new();
        let mut online = HashMap::with_capacity(users.len());
        for u in &users {
            let home = mesh::home_shard(u, shards);
            if home == self.id {
                online.insert(u.clone(), !self.devices_of(u).is_empty());
            } else {
                online.insert(u.clone(), false);
                by_shard.entry(home).or_default().push(u.clone());
            }
        }
        let asks_directory = self.store_shared();
        let waiting = by_shard.len() + asks_directory as usize;
        let ask = PresenceAsk {
            asker,
            users,
            online,
            waiting,
        };
        if waiting == 0 {
            return self.answer_presence(ask);
        }
        let key = self.presence_asks.insert(ask);
        if asks_directory {
            let users = self.presence_asks[key].users.clone();
            self.metrics.presence_lookups.inc();
            if self
                .submit_store_op(StoreOp::Presence { users, ask: key })
                .is_err()
            {
                // The store's queue is full: this node's answer stands.
                self.on_presence_answer(key, Vec::new(), Vec::new());
            }
        }
        if by_shard.is_empty() {
            return;
        }
        let mesh = self.mesh.as_ref().expect("several shards have a mesh");
        let shards_waiting = by_shard.len();
        let mut sent = 0;
        for (shard, users) in by_shard {
            let msg = ShardMsg::Presence(Presence::Ask {
                users,
                from_shard: self.id,
                ask: key,
            });
            if mesh.send(shard, msg).is_err() {
                break;
            }
            sent += 1;
        }
        if sent == shards_waiting {
            return;
        }
        // A full channel refused: the asker hears now; answers to what was sent still
        // arrive and only free the slot.
        self.metrics.mesh_full.inc();
        let Some(ask) = self.presence_asks.get_mut(key) else {
            return;
        };
        ask.waiting -= shards_waiting - sent;
        let asker = std::mem::replace(&mut ask.asker, Asker::Gone);
        if ask.waiting == 0 {
            self.presence_asks.remove(key);
        }
        if let Asker::Conn(index, serial) = asker {
            if self.is_live(index, serial) {
                let err = FrameError {
                    code: ErrorCode::Unavailable,
                    message: "a shard is busy, ask again".into(),
                    cid: None,
                };
                let mut out = Vec::with_capacity(96);
                proto::write_error(&mut out, &err);
                self.write_text(index, &out);
                self.kick(index);
            }
        }
        // An API asker's channel is dropped: the admin answers 503.
    }

    /// On a user's home shard: answer another shard's ask.
    pub(super) fn on_presence_ask(
        &mut self,
        users: Vec<CompactString>,
        from_shard: usize,
        ask: usize,
    ) {
        let online = users
            .iter()
            .map(|u| !self.devices_of(u).is_empty())
            .collect();
        let answer = Presence::Answer { ask, users, online };
        self.send_or_hold(from_shard, ShardMsg::Presence(answer));
    }

    /// On the asking shard: one home shard answered.
    pub(super) fn on_presence_answer(
        &mut self,
        key: usize,
        users: Vec<CompactString>,
        online: Vec<bool>,
    ) {
        let Some(ask) = self.presence_asks.get_mut(key) else {
            return;
        };
        for (u, on) in users.into_iter().zip(online) {
            *ask.online.entry(u).or_default() |= on;
        }
        ask.waiting -= 1;
        if ask.waiting == 0 {
            let ask = self.presence_asks.remove(key);
            self.answer_presence(ask);
        }
    }

    /// The cluster directory answered about every asked user (None: Redis could not).
    pub(super) fn on_presence_directory(&mut self, key: usize, online: Option<Vec<bool>>) {
        let Some(ask) = self.presence_asks.get(key) else {
            return;
        };
        let online = online.unwrap_or_default();
        let users = if online.is_empty() {
            Vec::new()
        } else {
            ask.users.clone()
        };
        self.on_presence_answer(key, users, online);
    }

    fn answer_presence(&mut self, ask: PresenceAsk) {
        let online: Vec<bool> = ask
            .users
            .iter()
            .map(|u| ask.online.get(u).copied().unwrap_or(false))
            .collect();
        let (conn, serial) = match ask.asker {
            Asker::Conn(conn, serial) => (conn, serial),
            Asker::Api(reply) => {
                // The admin may have given up (timeout): nothing to do then.
                let _ = reply.send(online);
                return;
            }
            Asker::Gone => return,
        };
        // The connection may have closed (and its slot been reused) while others answered.
        if self.conns.get(conn).is_none_or(|e| e.serial != serial) {
            return;
        }
        let mut out = Vec::with_capacity(32 + 24 * ask.users.len());
        proto::write_presence(&mut out, ask.users.iter().map(|u| u.as_str()).zip(online));
        self.write_text(conn, &out);
        self.kick(conn);
    }
}
