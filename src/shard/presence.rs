//! The `presence` op (SPEC section 3): which of up to 100 users have a connection.
//!
//! Each user's home shard is the one that knows. The asking shard answers its own users at
//! once and sends one `PresenceAsk` to every other home shard involved; the connection gets
//! its `presence` frame when the last shard answered. Shards of one process always answer
//! (answers refused by a full channel are held and retried, never dropped); an ask a full
//! channel refuses is answered `unavailable` right away, so no ask waits forever on a
//! message that was never sent. Users on other nodes are the cluster's job (issue 6).

use std::collections::HashMap;

use compact_str::CompactString;

use super::Shard;
use crate::mesh::{self, MeshMsg};
use crate::proto::{self, ErrorCode, FrameError};

/// A `presence` frame waiting for other shards.
pub struct PresenceAsk {
    /// Slab index and serial of the asking connection (None: already answered `unavailable`).
    reply_to: Option<(usize, u32)>,
    /// The users in the order the client asked.
    users: Vec<CompactString>,
    online: HashMap<CompactString, bool>,
    /// Shards that have not answered yet.
    waiting: usize,
}

impl Shard {
    pub(super) fn on_presence(&mut self, index: usize, users: Vec<CompactString>) {
        let shards = self.mesh.as_ref().map_or(1, |m| m.shards());
        let mut by_shard: HashMap<usize, Vec<CompactString>> = HashMap::new();
        let mut online = HashMap::with_capacity(users.len());
        for u in &users {
            let home = mesh::home_shard(u, shards);
            if home == self.id {
                online.insert(u.clone(), !self.devices_of(u).is_empty());
            } else {
                by_shard.entry(home).or_default().push(u.clone());
            }
        }
        let waiting = by_shard.len();
        let ask = PresenceAsk {
            reply_to: Some((index, self.conns[index].serial)),
            users,
            online,
            waiting,
        };
        if waiting == 0 {
            return self.answer_presence(ask);
        }
        let key = self.presence_asks.insert(ask);
        let mesh = self.mesh.as_ref().expect("several shards have a mesh");
        let mut sent = 0;
        for (shard, users) in by_shard {
            let msg = MeshMsg::PresenceAsk {
                users,
                from_shard: self.id,
                ask: key,
            };
            if mesh.send(shard, msg).is_err() {
                break;
            }
            sent += 1;
        }
        if sent == waiting {
            return;
        }
        // A full channel refused: the client hears now; answers to what was sent still
        // arrive and only free the slot.
        self.metrics.mesh_full.inc();
        let ask = &mut self.presence_asks[key];
        ask.waiting = sent;
        ask.reply_to = None;
        if sent == 0 {
            self.presence_asks.remove(key);
        }
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
        self.send_or_hold(from_shard, MeshMsg::PresenceAnswer { ask, users, online });
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
        ask.online.extend(users.into_iter().zip(online));
        ask.waiting -= 1;
        if ask.waiting == 0 {
            let ask = self.presence_asks.remove(key);
            self.answer_presence(ask);
        }
    }

    fn answer_presence(&mut self, ask: PresenceAsk) {
        // The connection may have closed (and its slot been reused) while others answered.
        let Some((conn, serial)) = ask.reply_to else {
            return;
        };
        if self.conns.get(conn).is_none_or(|e| e.serial != serial) {
            return;
        }
        let mut out = Vec::with_capacity(32 + 24 * ask.users.len());
        let online = &ask.online;
        proto::write_presence(
            &mut out,
            ask.users
                .iter()
                .map(|u| (u.as_str(), online.get(u).copied().unwrap_or(false))),
        );
        self.write_text(conn, &out);
        self.kick(conn);
    }
}
