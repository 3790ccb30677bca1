//! Presence (SPEC sections 3 and 6) as one state machine of a shard: the `presence` op,
//! `GET /api/presence`, and presence that tells (`watch` / `unwatch`). It owns everything
//! presence keeps on a shard and performs nothing: each input takes what it needs (the time,
//! whether a user has a device on this shard) and returns [`Effect`]s (frames for
//! connections, messages for other shards, store operations, counts) that the shard performs
//! in one place (`perform.rs`). What the shard could not perform comes back as an input
//! ([`PresenceMachine::store_refused`]).
//!
//! Asking: each user's home shard knows this node's answer. The asking shard answers its own
//! users at once and sends one `Presence::Ask` to every other home shard involved; when nodes
//! share a directory (Redis) it also asks the directory about every user (devices on *other*
//! live nodes). A user is online when any part says so; the answer goes out when the last part
//! came back. Shards of one process always answer, and every message between them (asks
//! too) goes out as `Effect::Tell`: a full channel holds it for the next tick, behind
//! whatever is held already, so every question is answered with `presence` and a `watch`'s
//! question never overtakes its registration. (Refusing asks with `unavailable`, as before,
//! broke both under small channels: the refused question could not be told from the other
//! questions a connection had out, since neither `presence` nor `watch` carries a cid;
//! clients asking again in step were refused again, round after round; and an ask sent
//! straight past a held `Watch` was answered by a home that did not watch the user yet,
//! from its devices alone, which the changes told later need not correct. Found by the
//! simulation with channels of 1 to 16 messages, seed 17026080507310378593.) If the
//! directory cannot answer, this node's own answer stands.
//!
//! Watching (rules in `delivery/watch.rs`): a `watch` registers the connection on its shard
//! ([`WatchList`]) and, for each user it did not watch yet, at the user's home shard
//! (`Presence::Watch`, counted there per shard, [`PresenceViews`]); it is answered with what
//! the users' watchers are told (the home's view, as this shard last heard it: see `heard`),
//! not with a fresh question, so that the changes told later follow on from the answer.
//! The home shard follows the user: its devices here (the first came, the
//! last left) and, with a shared directory, other nodes: this node registers as the user's
//! watcher there (renewed hourly and after every resync), whose changes are pushed here
//! ([`PresenceMachine::directory_changed`]), and watched users with no device here are
//! checked against the directory every quarter lease, so a node that died turns its users
//! offline within about 1.25 leases (plus the grace), and a missed push is made up. Changes
//! go to the watching shards (`Presence::Changed`), which write
//! `{"op":"presence","online":{"bob":true}}` to each watching connection.

pub mod perform;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

use compact_str::CompactString;
use slab::Slab;

use super::msg::Presence;
use crate::delivery::watch::MAX_WATCHED_PER_CONN;
use crate::delivery::watch::{ConnKey, PresenceViews, Told, TooMany, WatchList};
use crate::mesh;
use crate::proto;
use crate::store::redis::StoreOp;

/// The `ask` of a directory question a home shard puts for its watched users (its answer
/// updates the views; no connection waits for it).
pub const WATCH_RECHECK_ASK: usize = usize::MAX;
/// How often this node renews its registration as a watched user's watcher (its TTL is
/// 72 h, see `store/redis/batch.rs`).
pub const WATCH_RENEW_MS: u64 = 3_600_000;

/// Whether a user has a device (an open session) on this shard now: the shard's registry
/// answers; the machine keeps no copy of it.
pub type DevicesHere<'a> = &'a dyn Fn(&str) -> bool;

/// Facts about the shard the machine lives on, fixed once the shard is set up.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// This shard's id.
    pub shard: usize,
    /// Shards of this node (a user's home is `mesh::home_shard(user, shards)`).
    pub shards: usize,
    /// How long a user must stay offline before watchers are told (`presence_grace_ms`).
    pub grace_ms: u64,
    /// How often watched users with no device here are checked against the directory.
    pub recheck_every_ms: u64,
    /// Several nodes share one directory (Redis mode): asks consult it and watched users
    /// are followed there. False: this node is the whole truth.
    pub nodes_share_directory: bool,
}

/// Who waits for a presence answer.
pub enum Asker {
    /// A connection (slab index, serial).
    Conn(ConnKey),
    /// `GET /api/presence`: the answers in the order asked.
    Api(tokio::sync::oneshot::Sender<Vec<bool>>),
    /// Already answered `unavailable`; late parts only free the slot.
    Gone,
}

/// A presence question waiting for other shards or the directory.
struct PresenceAsk {
    asker: Asker,
    /// The users in the order asked.
    users: Vec<CompactString>,
    online: HashMap<CompactString, bool>,
    /// It answers a `watch`: the parts are what the users' watchers were told.
    watch: bool,
    /// Parts (shards, the directory) that have not answered yet.
    waiting: usize,
}

/// Why a frame is written (the shard counts changes told).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrote {
    /// The answer to a `presence` or `watch` frame.
    Answer,
    /// A watched user came online or went offline.
    Change,
}

/// Counters presence moves (the shard owns the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// A `watch` past the per-connection bound.
    WatchRefused,
    /// A question put to the directory for an asker.
    DirectoryLookup,
}

/// What the shard performs for the machine.
pub enum Effect {
    /// One text frame for each of these connections that is still the one with its serial
    /// (slots are reused), then wake it.
    Write {
        conns: Vec<ConnKey>,
        frame: Vec<u8>,
        why: Wrote,
    },
    /// Refuse a frame of this connection with `bad_request` (it counts toward abuse).
    BadRequest {
        conn: ConnKey,
        why: String,
    },
    /// Answer `GET /api/presence` (the admin may have given up: then nothing).
    ApiAnswer {
        reply: tokio::sync::oneshot::Sender<Vec<bool>>,
        online: Vec<bool>,
    },
    /// A message another shard must get (a question, an answer, a registration, a change):
    /// a full channel holds it for a retry behind what is held already, never drops it (the
    /// home shard's counts must match, every question is answered, and a home hears a
    /// shard's `Watch` before its question).
    Tell {
        shard: usize,
        msg: Presence,
    },
    /// A store operation: a full queue gives it back ([`PresenceMachine::store_refused`]).
    Store(StoreOp),
    Count(Count),
}

/// Presence on one shard (see the module doc).
pub struct PresenceMachine {
    config: PresenceConfig,
    /// This shard's connections that watch users, and whom.
    watch_list: WatchList,
    /// The watched users whose home is this shard.
    views: PresenceViews,
    /// Questions waiting for other shards or the directory.
    asks: Slab<PresenceAsk>,
    /// For users watched here and homed on another shard: what their watchers were last
    /// told, as last heard from the home (its `Changed`, or its part of a `watch` answer:
    /// both come down one channel in the home's order). A `watch` is answered with it when
    /// written, not with the part it waited for: an answer that waited on another shard
    /// would else undo a change told in between, for good (found by the simulation).
    heard: HashMap<CompactString, bool>,
    last_recheck_ms: u64,
    last_renew_ms: Option<u64>,
    #[cfg(test)]
    plant: Option<PresencePlant>,
}

/// Presence rules the simulation switches off to show it catches their absence.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PresencePlant {
    /// Watched users with no device here are never asked about again: a directory change
    /// this node missed (its registration failed, Redis was away) is never made up.
    NoRecheck,
}

impl PresenceMachine {
    pub fn new(config: PresenceConfig) -> Self {
        PresenceMachine {
            views: PresenceViews::new(config.grace_ms),
            config,
            watch_list: WatchList::default(),
            asks: Slab::new(),
            heard: HashMap::new(),
            last_recheck_ms: 0,
            last_renew_ms: None,
            #[cfg(test)]
            plant: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn plant(&mut self, plant: PresencePlant) {
        self.plant = Some(plant);
    }

    /// The shard joined a mesh of `shards`.
    pub fn set_shards(&mut self, shards: usize) {
        self.config.shards = shards;
    }

    /// The shard uses a store shared with other nodes (Redis).
    pub fn share_directory(&mut self) {
        self.config.nodes_share_directory = true;
    }

    fn home_of(&self, user: &str) -> usize {
        mesh::home_shard(user, self.config.shards)
    }

    /// Which of `users` are online, for `asker` (a `presence` frame, or the API).
    pub fn ask(
        &mut self,
        asker: Asker,
        users: Vec<CompactString>,
        here: DevicesHere,
    ) -> Vec<Effect> {
        self.put_question(asker, users, false, here)
    }

    /// One user's part of an answer, on its home shard. A `watch` is answered with what the
    /// user's watchers were told (registration came first, so the user is watched): changes
    /// are told as they differ from that, so a watcher answered anything else could keep a
    /// wrong state for good (the simulation found two ways: a device that came while the
    /// answer waited for the directory, and a directory that failed while the user was
    /// online elsewhere).
    fn home_part(&self, user: &str, watch: bool, here: DevicesHere) -> bool {
        let shown = if watch { self.views.shown(user) } else { None };
        shown.unwrap_or_else(|| here(user))
    }

    fn put_question(
        &mut self,
        asker: Asker,
        users: Vec<CompactString>,
        watch: bool,
        here: DevicesHere,
    ) -> Vec<Effect> {
        // Ordered by shard: the same questions go out in the same order (replayable runs).
        let mut by_shard: BTreeMap<usize, Vec<CompactString>> = BTreeMap::new();
        let mut online = HashMap::with_capacity(users.len());
        for u in &users {
            let home = self.home_of(u);
            if home == self.config.shard {
                online.insert(u.clone(), self.home_part(u, watch, here));
            } else {
                online.insert(u.clone(), false);
                by_shard.entry(home).or_default().push(u.clone());
            }
        }
        // A watch's answer is the home's view, which follows the directory itself.
        let asks_directory = self.config.nodes_share_directory && !watch;
        let waiting = by_shard.len() + asks_directory as usize;
        let ask = PresenceAsk {
            asker,
            users,
            online,
            watch,
            waiting,
        };
        if waiting == 0 {
            return self.answer(ask);
        }
        let mut out = Vec::new();
        let directory_users = asks_directory.then(|| ask.users.clone());
        let key = self.asks.insert(ask);
        if let Some(users) = directory_users {
            out.push(Effect::Count(Count::DirectoryLookup));
            out.push(Effect::Store(StoreOp::Presence { users, ask: key }));
        }
        for (shard, users) in by_shard {
            let msg = Presence::Ask {
                users,
                from_shard: self.config.shard,
                ask: key,
                watch,
            };
            out.push(Effect::Tell { shard, msg });
        }
        out
    }

    /// A message of the presence kind from another shard.
    pub fn on_mesh(&mut self, msg: Presence, here: DevicesHere) -> Vec<Effect> {
        match msg {
            Presence::Api { users, reply } => self.ask(Asker::Api(reply), users, here),
            Presence::Ask {
                users,
                from_shard,
                ask,
                watch,
            } => {
                let online = users
                    .iter()
                    .map(|u| self.home_part(u, watch, here))
                    .collect();
                let msg = Presence::Answer { ask, users, online };
                vec![Effect::Tell {
                    shard: from_shard,
                    msg,
                }]
            }
            Presence::Answer { ask, users, online } => self.part_answered(ask, users, online),
            Presence::Watch { user, shard } => self.watched_at_home(user, shard, here),
            Presence::Unwatch { user, shard } => self.unwatched_at_home(user, shard),
            Presence::Changed { user, online } => self.tell_connections(&user, online),
        }
    }

    /// The store's queue refused an operation: a directory question counts as unanswered
    /// (this node's answer stands; a recheck asks again on its next round); a watcher
    /// registration is renewed on the next round.
    pub fn store_refused(&mut self, op: StoreOp, now: u64) -> Vec<Effect> {
        match op {
            StoreOp::Presence { users, ask } => self.directory_answered(ask, users, None, now),
            _ => Vec::new(),
        }
    }

    /// The directory answered a question (None: it could not).
    pub fn directory_answered(
        &mut self,
        ask: usize,
        users: Vec<CompactString>,
        online: Option<Vec<bool>>,
        now: u64,
    ) -> Vec<Effect> {
        if ask == WATCH_RECHECK_ASK {
            let mut out = Vec::new();
            for (user, on) in users.iter().zip(online.unwrap_or_default()) {
                if let Some(told) = self.views.set_remote(user, on, now) {
                    out.extend(self.tell_watchers(told));
                }
            }
            return out;
        }
        match online {
            Some(online) => self.part_answered(ask, users, online),
            None => self.part_answered(ask, Vec::new(), Vec::new()),
        }
    }

    /// Another node's push: `user`'s directory entry holds `runs` node runs now (this node's
    /// own among them while the user has a device here).
    pub fn directory_changed(
        &mut self,
        user: &str,
        runs: u64,
        now: u64,
        here: DevicesHere,
    ) -> Vec<Effect> {
        let elsewhere = runs > here(user) as u64;
        match self.views.set_remote(user, elsewhere, now) {
            Some(told) => self.tell_watchers(told),
            None => Vec::new(),
        }
    }

    /// On the user's home shard: its first device here came (`online`), or its last left.
    pub fn device_here(&mut self, user: &str, online: bool, now: u64) -> Vec<Effect> {
        match self.views.set_local(user, online, now) {
            Some(told) => self.tell_watchers(told),
            None => Vec::new(),
        }
    }

    /// A connection's `watch` frame: registered, then answered as `presence` is.
    pub fn watch(
        &mut self,
        conn: ConnKey,
        users: Vec<CompactString>,
        here: DevicesHere,
    ) -> Vec<Effect> {
        match self.watch_list.add(conn, &users) {
            Err(TooMany) => {
                let why = format!(
                    "a connection watches at most {MAX_WATCHED_PER_CONN} users; unwatch some first"
                );
                vec![
                    Effect::Count(Count::WatchRefused),
                    Effect::BadRequest { conn, why },
                ]
            }
            Ok(added) => {
                let mut out = Vec::new();
                for user in added {
                    out.extend(self.register_at_home(user, here));
                }
                out.extend(self.put_question(Asker::Conn(conn), users, true, here));
                out
            }
        }
    }

    /// A connection's `unwatch` frame (no answer).
    pub fn unwatch(&mut self, conn: usize, users: &[CompactString]) -> Vec<Effect> {
        let gone = self.watch_list.remove(conn, users);
        gone.into_iter()
            .flat_map(|user| self.unregister_at_home(user))
            .collect()
    }

    /// The connection at slab `conn` is going away: everything it watched.
    pub fn conn_closed(&mut self, conn: usize) -> Vec<Effect> {
        let gone = self.watch_list.drop_conn(conn);
        gone.into_iter()
            .flat_map(|user| self.unregister_at_home(user))
            .collect()
    }

    /// Grace periods that ended, and with a shared directory the renewal of this node's
    /// registrations and the periodic recheck of users with no device here.
    pub fn tick(&mut self, now: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        for told in self.views.tick(now) {
            out.extend(self.tell_watchers(told));
        }
        if !self.config.nodes_share_directory || self.views.is_empty() {
            return out;
        }
        // Renewed well within the registration's TTL, and at once after a resync (Redis may
        // have lost it).
        if self
            .last_renew_ms
            .is_none_or(|at| now >= at + WATCH_RENEW_MS)
        {
            self.last_renew_ms = Some(now);
            let mut users = self.views.watched();
            users.sort_unstable(); // replayable order
            for user in users {
                out.push(Effect::Store(StoreOp::WatchPresence { user, on: true }));
            }
        }
        if now < self.last_recheck_ms + self.config.recheck_every_ms.max(1) {
            return out;
        }
        self.last_recheck_ms = now;
        #[cfg(test)]
        if self.plant == Some(PresencePlant::NoRecheck) {
            return out;
        }
        let mut elsewhere = self.views.not_local();
        elsewhere.sort_unstable();
        for users in elsewhere.chunks(proto::MAX_PRESENCE_USERS) {
            out.push(recheck(users.to_vec()));
        }
        out
    }

    /// The node's channel was heard again, or its lease had lapsed: pushes may have been
    /// missed and Redis may have lost this node's registrations. Renew and recheck on the
    /// next tick.
    pub fn resync(&mut self) {
        self.last_renew_ms = None;
        self.last_recheck_ms = 0;
    }

    /// Anything pending (watched users to follow, questions out): the shard keeps ticking.
    pub fn is_busy(&self) -> bool {
        !self.views.is_empty() || !self.asks.is_empty()
    }

    /// Users watched whose home is this shard (the `watched` gauge).
    pub fn watched_here(&self) -> usize {
        self.views.len()
    }

    /// Questions waiting for parts.
    pub fn asks_waiting(&self) -> usize {
        self.asks.len()
    }

    fn register_at_home(&mut self, user: CompactString, here: DevicesHere) -> Vec<Effect> {
        let home = self.home_of(&user);
        if home == self.config.shard {
            return self.watched_at_home(user, home, here);
        }
        let msg = Presence::Watch {
            user,
            shard: self.config.shard,
        };
        vec![Effect::Tell { shard: home, msg }]
    }

    fn unregister_at_home(&mut self, user: CompactString) -> Vec<Effect> {
        self.forget_heard(&user);
        let home = self.home_of(&user);
        if home == self.config.shard {
            return self.unwatched_at_home(user, home);
        }
        let msg = Presence::Unwatch {
            user,
            shard: self.config.shard,
        };
        vec![Effect::Tell { shard: home, msg }]
    }

    /// On the user's home shard: a connection of `shard` watches `user`.
    fn watched_at_home(
        &mut self,
        user: CompactString,
        shard: usize,
        here: DevicesHere,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        let (first, told) = self.views.watch(&user, shard, here(&user));
        if let Some(told) = told {
            out.extend(self.tell_watchers(told));
        }
        if first && self.config.nodes_share_directory {
            // This node hears the user's directory changes from now on; where else the user
            // is online now comes from a directory question.
            out.push(Effect::Store(StoreOp::WatchPresence {
                user: user.clone(),
                on: true,
            }));
            out.push(recheck(vec![user]));
        }
        out
    }

    /// On the user's home shard: one registration of `shard` fewer.
    fn unwatched_at_home(&mut self, user: CompactString, shard: usize) -> Vec<Effect> {
        if self.views.unwatch(&user, shard) && self.config.nodes_share_directory {
            return vec![Effect::Store(StoreOp::WatchPresence { user, on: false })];
        }
        Vec::new()
    }

    /// One part of a question answered (`users` empty: the part had nothing to add).
    fn part_answered(
        &mut self,
        key: usize,
        users: Vec<CompactString>,
        online: Vec<bool>,
    ) -> Vec<Effect> {
        let Some(ask) = self.asks.get_mut(key) else {
            return Vec::new();
        };
        for (u, on) in users.into_iter().zip(online) {
            if ask.watch && !self.watch_list.watchers(&u).is_empty() {
                self.heard.insert(u.clone(), on);
            }
            *ask.online.entry(u).or_default() |= on;
        }
        ask.waiting -= 1;
        if ask.waiting > 0 {
            return Vec::new();
        }
        let ask = self.asks.remove(key);
        self.answer(ask)
    }

    fn tell_watchers(&mut self, told: Told) -> Vec<Effect> {
        let mut out = Vec::new();
        for shard in told.shards {
            if shard == self.config.shard {
                out.extend(self.tell_connections(&told.user, told.online));
            } else {
                let msg = Presence::Changed {
                    user: told.user.clone(),
                    online: told.online,
                };
                out.push(Effect::Tell { shard, msg });
            }
        }
        out
    }

    /// What the watchers of `user` were last told, as far as this shard knows now (None:
    /// nobody here watches the user any more).
    fn told_now(&self, user: &str) -> Option<bool> {
        if self.home_of(user) == self.config.shard {
            self.views.shown(user)
        } else {
            self.heard.get(user).copied()
        }
    }

    /// `user` has no watcher here any more: forget what was heard of it.
    fn forget_heard(&mut self, user: &str) {
        if self.watch_list.watchers(user).is_empty() {
            self.heard.remove(user);
        }
    }

    /// Every part came back: the asker hears.
    fn answer(&self, ask: PresenceAsk) -> Vec<Effect> {
        let online: Vec<bool> = ask
            .users
            .iter()
            .map(|u| {
                let parts = ask.online.get(u).copied().unwrap_or(false);
                if ask.watch {
                    self.told_now(u).unwrap_or(parts)
                } else {
                    parts
                }
            })
            .collect();
        match ask.asker {
            Asker::Conn(conn) => {
                let mut frame = Vec::with_capacity(32 + 24 * ask.users.len());
                proto::write_presence(&mut frame, ask.users.iter().map(|u| u.as_str()).zip(online));
                vec![Effect::Write {
                    conns: vec![conn],
                    frame,
                    why: Wrote::Answer,
                }]
            }
            Asker::Api(reply) => vec![Effect::ApiAnswer { reply, online }],
            Asker::Gone => Vec::new(),
        }
    }

    /// On a watching shard: every connection here that watches `user` hears the change.
    fn tell_connections(&mut self, user: &str, online: bool) -> Vec<Effect> {
        let conns = self.watch_list.watchers(user).to_vec();
        if conns.is_empty() {
            return Vec::new();
        }
        if self.home_of(user) != self.config.shard {
            self.heard.insert(user.into(), online);
        }
        let mut frame = Vec::with_capacity(48);
        proto::write_presence(&mut frame, [(user, online)]);
        vec![Effect::Write {
            conns,
            frame,
            why: Wrote::Change,
        }]
    }
}

/// A directory question for watched users (no asker).
fn recheck(users: Vec<CompactString>) -> Effect {
    Effect::Store(StoreOp::Presence {
        users,
        ask: WATCH_RECHECK_ASK,
    })
}
