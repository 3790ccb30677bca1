//! Presence that tells (`watch` / `unwatch`), on a shard: the glue between a watching
//! connection's shard ([`WatchList`]), each watched user's home shard ([`PresenceViews`]) and,
//! with Redis, the other nodes (see `delivery/watch.rs` for the rules).
//!
//! * A `watch` registers the connection here and, for each user it did not watch yet, at the
//!   user's home shard (`Presence::Watch`, counted there per shard); the connection is then
//!   answered with a `presence` frame for the users it named, exactly as the `presence` op
//!   is. A registration that comes while the user's grace period runs ends it (see
//!   `PresenceViews::watch`).
//! * The home shard follows the user: its devices here (the first came, the last left) and,
//!   with Redis, other nodes: this node joins the user's watchers in Redis (renewed hourly
//!   and after every resync), whose directory changes are then pushed here
//!   (`StoreReply::PresenceChanged`), and watched users with no device here are checked
//!   against the directory every quarter lease, so a node that died turns its users
//!   offline within about 1.25 leases (plus the grace), and a missed push is made up.
//! * Changes go to the watching shards (`Presence::Changed`), which write
//!   `{"op":"presence","online":{"bob":true}}` to each watching connection.

use compact_str::CompactString;

use super::msg::{Presence, ShardMsg};
use super::Shard;
use crate::delivery::watch::{Told, TooMany, MAX_WATCHED_PER_CONN};
use crate::proto;
use crate::store::redis::StoreOp;

/// The `ask` of a presence question a home shard puts to the directory for its watched
/// users (its answer updates the views; no connection waits for it).
pub(super) const WATCH_RECHECK_ASK: usize = usize::MAX;
/// How often this node renews its registration as a watched user's watcher (its TTL is
/// 72 h, see `store/redis/batch.rs`).
const WATCH_RENEW_MS: u64 = 3_600_000;

impl Shard {
    /// A connection's `watch` frame.
    pub(super) fn on_watch(&mut self, index: usize, users: Vec<CompactString>, now: u64) {
        let serial = self.conns[index].serial;
        match self.watch_list.add((index, serial), &users) {
            Err(TooMany) => {
                self.metrics.watch_refused.inc();
                let why = format!(
                    "a connection watches at most {MAX_WATCHED_PER_CONN} users; unwatch some first"
                );
                self.reply_bad_request(index, why, now);
            }
            Ok(added) => {
                for user in added {
                    self.tell_home_watch(user, true);
                }
                self.ask_presence(super::presence::Asker::Conn(index, serial), users);
            }
        }
    }

    /// A connection's `unwatch` frame (no answer).
    pub(super) fn on_unwatch(&mut self, index: usize, users: &[CompactString]) {
        for user in self.watch_list.remove(index, users) {
            self.tell_home_watch(user, false);
        }
    }

    /// The connection at `index` is going away: everything it watched.
    pub(super) fn forget_watches(&mut self, index: usize) {
        for user in self.watch_list.drop_conn(index) {
            self.tell_home_watch(user, false);
        }
    }

    fn tell_home_watch(&mut self, user: CompactString, on: bool) {
        let home = self.home_of(&user);
        if home == self.id {
            return self.on_watch_at_home(user, self.id, on);
        }
        let msg = if on {
            Presence::Watch {
                user,
                shard: self.id,
            }
        } else {
            Presence::Unwatch {
                user,
                shard: self.id,
            }
        };
        // Held and retried if the channel is full (never dropped): the home shard's counts
        // must match.
        self.send_or_hold(home, ShardMsg::Presence(msg));
    }

    /// On the user's home shard: `shard` watches `user` (`on`) or stopped.
    pub(super) fn on_watch_at_home(&mut self, user: CompactString, shard: usize, on: bool) {
        if on {
            let local = !self.devices_of(&user).is_empty();
            let (first, told) = self.presence_views.watch(&user, shard, local);
            if let Some(told) = told {
                self.tell_watchers(told);
            }
            if first && self.store_shared() {
                // This node hears the user's directory changes from now on; where else the
                // user is online now comes from a directory question.
                let _ = self.submit_store_op(StoreOp::WatchPresence {
                    user: user.clone(),
                    on: true,
                });
                self.recheck_remote(vec![user]);
            }
        } else if self.presence_views.unwatch(&user, shard) && self.store_shared() {
            let _ = self.submit_store_op(StoreOp::WatchPresence { user, on: false });
        }
        self.metrics.watched.set(self.presence_views.len() as u64);
    }

    /// Ask the directory whether `users` have a device on another live node.
    fn recheck_remote(&mut self, users: Vec<CompactString>) {
        let op = StoreOp::Presence {
            users,
            ask: WATCH_RECHECK_ASK,
        };
        // A full queue: the next recheck asks again.
        let _ = self.submit_store_op(op);
    }

    /// On the user's home shard: its first device here came, or its last left.
    pub(super) fn local_presence(&mut self, user: &str, online: bool, now: u64) {
        if let Some(told) = self.presence_views.set_local(user, online, now) {
            self.tell_watchers(told);
        }
    }

    /// The directory answered a recheck (None: Redis could not; nothing changes).
    pub(super) fn on_remote_presence(
        &mut self,
        users: Vec<CompactString>,
        online: Option<Vec<bool>>,
        now: u64,
    ) {
        for (user, on) in users.iter().zip(online.unwrap_or_default()) {
            if let Some(told) = self.presence_views.set_remote(user, on, now) {
                self.tell_watchers(told);
            }
        }
    }

    /// Another node's push: `user`'s directory entry holds `runs` runs now (this node's own
    /// entry among them while the user has a device here).
    pub(super) fn on_presence_changed(&mut self, user: CompactString, runs: u64, now: u64) {
        let here = !self.devices_of(&user).is_empty() as u64;
        let elsewhere = runs > here;
        if let Some(told) = self.presence_views.set_remote(&user, elsewhere, now) {
            self.tell_watchers(told);
        }
    }

    /// Grace periods that ended, and (every half lease, with Redis) the recheck of users
    /// believed online on other nodes.
    pub(super) fn watch_tick(&mut self, now: u64) {
        for told in self.presence_views.tick(now) {
            self.tell_watchers(told);
        }
        if !self.store_shared() || self.presence_views.is_empty() {
            return;
        }
        // This node's registration as the users' watcher: renewed well within its TTL, and
        // at once after a resync (Redis may have lost it).
        if self
            .last_watch_renew_ms
            .is_none_or(|at| now >= at + WATCH_RENEW_MS)
        {
            self.last_watch_renew_ms = Some(now);
            for user in self.presence_views.watched() {
                let _ = self.submit_store_op(StoreOp::WatchPresence { user, on: true });
            }
        }
        let every = (self.shared.cfg.node_lease_ms / 4).max(1);
        if now < self.last_watch_recheck_ms + every {
            return;
        }
        self.last_watch_recheck_ms = now;
        let elsewhere = self.presence_views.not_local();
        for users in elsewhere.chunks(proto::MAX_PRESENCE_USERS) {
            self.recheck_remote(users.to_vec());
        }
    }

    /// The node's channel was heard again, or its lease had lapsed: pushes may have been
    /// missed and Redis may have lost this node's registrations. Renew and recheck at once.
    pub(super) fn watch_resync(&mut self) {
        self.last_watch_renew_ms = None;
        self.last_watch_recheck_ms = 0;
    }

    fn tell_watchers(&mut self, told: Told) {
        for shard in told.shards {
            if shard == self.id {
                self.write_presence_change(&told.user, told.online);
            } else {
                let msg = Presence::Changed {
                    user: told.user.clone(),
                    online: told.online,
                };
                self.send_or_hold(shard, ShardMsg::Presence(msg));
            }
        }
    }

    /// On a watching shard: tell every connection here that watches `user`.
    pub(super) fn write_presence_change(&mut self, user: &str, online: bool) {
        let mut out = Vec::with_capacity(48);
        proto::write_presence(&mut out, [(user, online)]);
        let watchers = self.watch_list.watchers(user).to_vec();
        for (index, serial) in watchers {
            if self.is_live(index, serial) {
                self.metrics.presence_told.inc();
                self.write_text(index, &out);
                self.kick(index);
            }
        }
    }
}
