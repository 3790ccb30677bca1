//! The shard's side of presence: each input is one call on the [`PresenceMachine`], and its
//! effects are performed here and nowhere else (what could not be performed goes back in).

use std::collections::VecDeque;

use compact_str::CompactString;
use slab::Slab;

use super::{Asker, Count, DevicesHere, Effect, PresenceMachine, Wrote};
use crate::shard::msg::{Presence, ShardMsg};
use crate::shard::users::Users;
use crate::shard::{conn_user, Entry, Shard};

/// Whether `user` has an open session on this shard (as `Shard::devices_of`, without the list).
fn has_device(users: &Users, conns: &Slab<Entry>, user: &str) -> bool {
    users.has(user, |i| conn_user(conns, i))
}

impl Shard {
    /// One input to presence, then its effects.
    fn presence_input(
        &mut self,
        now: u64,
        input: impl FnOnce(&mut PresenceMachine, DevicesHere) -> Vec<Effect>,
    ) {
        let (users, conns) = (&self.users, &self.conns);
        let here = |user: &str| has_device(users, conns, user);
        let effects = input(&mut self.presence, &here);
        self.perform_presence(effects, now);
    }

    /// A connection's `presence` frame.
    pub(in crate::shard) fn on_presence(
        &mut self,
        index: usize,
        users: Vec<CompactString>,
        now: u64,
    ) {
        let asker = Asker::Conn((index, self.conns[index].serial));
        self.presence_input(now, |p, here| p.ask(asker, users, here));
    }

    /// A connection's `watch` frame.
    pub(in crate::shard) fn on_watch(&mut self, index: usize, users: Vec<CompactString>, now: u64) {
        let conn = (index, self.conns[index].serial);
        self.presence_input(now, |p, here| p.watch(conn, users, here));
    }

    /// A connection's `unwatch` frame (no answer).
    pub(in crate::shard) fn on_unwatch(&mut self, index: usize, users: &[CompactString], now: u64) {
        self.presence_input(now, |p, _| p.unwatch(index, users));
    }

    /// The connection at `index` is going away: everything it watched.
    pub(in crate::shard) fn forget_watches(&mut self, index: usize, now: u64) {
        self.presence_input(now, |p, _| p.conn_closed(index));
    }

    /// On the user's home shard: its first device here came, or its last left.
    pub(in crate::shard) fn local_presence(&mut self, user: &str, online: bool, now: u64) {
        self.presence_input(now, |p, _| p.device_here(user, online, now));
    }

    /// A message of the presence kind from another shard (or the admin API).
    pub(in crate::shard) fn on_presence_msg(&mut self, msg: Presence, now: u64) {
        self.presence_input(now, |p, here| p.on_mesh(msg, here));
    }

    /// The directory answered a question (None: Redis could not).
    pub(in crate::shard) fn on_presence_directory(
        &mut self,
        ask: usize,
        users: Vec<CompactString>,
        online: Option<Vec<bool>>,
        now: u64,
    ) {
        self.presence_input(now, |p, _| p.directory_answered(ask, users, online, now));
    }

    /// Another node's push: `user`'s directory entry holds `runs` runs now.
    pub(in crate::shard) fn on_presence_changed(
        &mut self,
        user: CompactString,
        runs: u64,
        now: u64,
    ) {
        self.presence_input(now, |p, here| p.directory_changed(&user, runs, now, here));
    }

    pub(in crate::shard) fn watch_tick(&mut self, now: u64) {
        self.presence_input(now, |p, _| p.tick(now));
    }

    /// Pushes may have been missed and Redis may have lost this node's registrations.
    pub(in crate::shard) fn watch_resync(&mut self) {
        self.presence.resync();
    }

    #[cfg(test)]
    pub(crate) fn plant_presence_bug(&mut self, plant: super::PresencePlant) {
        self.presence.plant(plant);
    }

    /// The one place presence's effects happen.
    fn perform_presence(&mut self, effects: Vec<Effect>, now: u64) {
        let mut queue = VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Write { conns, frame, why } => {
                    for (index, serial) in conns {
                        if self.is_live(index, serial) {
                            if why == Wrote::Change {
                                self.metrics.presence_told.inc();
                            }
                            self.write_text(index, &frame);
                            self.kick(index);
                        }
                    }
                }
                Effect::BadRequest {
                    conn: (index, serial),
                    why,
                } => {
                    if self.is_live(index, serial) {
                        self.reply_bad_request(index, why, now);
                    }
                }
                // The admin may have given up (timeout): nothing to do then.
                Effect::ApiAnswer { reply, online } => drop(reply.send(online)),
                Effect::Tell { shard, msg } => self.send_or_hold(shard, ShardMsg::Presence(msg)),
                Effect::Store(op) => {
                    if let Err(op) = self.submit_store_op(op) {
                        queue.extend(self.presence.store_refused(op, now));
                    }
                }
                Effect::Count(count) => match count {
                    Count::WatchRefused => self.metrics.watch_refused.inc(),
                    Count::DirectoryLookup => self.metrics.presence_lookups.inc(),
                },
            }
        }
        self.metrics
            .watched
            .set(self.presence.watched_here() as u64);
    }
}
