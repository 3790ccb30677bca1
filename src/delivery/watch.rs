//! Presence that tells (`watch`): pure logic, time injected.
//!
//! Two sides, each on one shard:
//! * [`WatchList`], on the watching connection's shard: which of its connections watch whom
//!   (bounded per connection), and so which users this shard needs news of.
//! * [`PresenceViews`], on each watched user's home shard: whether the user is online (a
//!   device on this node, `local`, or on another node, `remote`), what the watchers were last
//!   told, and which shards watch. Going online is told at once; going offline only once the
//!   user has stayed offline for the grace period, so a reconnect or a move to another node
//!   within it is told nothing at all (no offline/online flap).

use std::collections::{HashMap, HashSet};

use compact_str::CompactString;

/// Users one connection may watch at once (SPEC section 3 bounds `presence` the same way).
pub const MAX_WATCHED_PER_CONN: usize = 100;

/// A change the watchers of `user` on `shards` must hear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Told {
    pub user: CompactString,
    pub online: bool,
    pub shards: Vec<usize>,
}

#[derive(Debug, Default)]
struct Viewed {
    local: bool,
    remote: bool,
    /// What the watchers were last told (or, for a new watcher, were answered).
    shown: bool,
    /// Offline since then, not told yet (the grace period runs).
    offline_since: Option<u64>,
    /// Watching shards, with how many registrations each.
    watchers: HashMap<usize, u32>,
}

impl Viewed {
    fn online(&self) -> bool {
        self.local || self.remote
    }
}

/// The home shard's view of its watched users (see the module doc).
#[derive(Debug)]
pub struct PresenceViews {
    grace_ms: u64,
    users: HashMap<CompactString, Viewed>,
    /// Users whose grace period runs.
    pending: HashSet<CompactString>,
}

impl PresenceViews {
    pub fn new(grace_ms: u64) -> Self {
        PresenceViews {
            grace_ms,
            users: HashMap::new(),
            pending: HashSet::new(),
        }
    }

    /// A connection on `shard` watches `user` (one more registration); `local`: a device of
    /// the user is on this shard now. Returns whether the user was not watched before (with
    /// Redis the caller then subscribes this node to the user's changes and asks where else
    /// it is online), and a change to tell: a new watcher was answered with the user's state
    /// now, so a grace period running (watchers told online, the user gone) ends at once and
    /// everyone is told offline; else the newcomer would never hear the user come back.
    pub fn watch(&mut self, user: &str, shard: usize, local: bool) -> (bool, Option<Told>) {
        let first = !self.users.contains_key(user);
        let viewed = self.users.entry(user.into()).or_insert_with(|| Viewed {
            local,
            shown: local,
            ..Viewed::default()
        });
        *viewed.watchers.entry(shard).or_default() += 1;
        if viewed.offline_since.take().is_none() {
            return (first, None);
        }
        self.pending.remove(user);
        viewed.shown = false;
        (first, Some(told(user, viewed)))
    }

    /// One registration of `shard` fewer. True when nobody watches `user` any more.
    pub fn unwatch(&mut self, user: &str, shard: usize) -> bool {
        let Some(viewed) = self.users.get_mut(user) else {
            return false;
        };
        if let Some(n) = viewed.watchers.get_mut(&shard) {
            *n -= 1;
            if *n == 0 {
                viewed.watchers.remove(&shard);
            }
        }
        if !viewed.watchers.is_empty() {
            return false;
        }
        self.users.remove(user);
        self.pending.remove(user);
        true
    }

    /// The user's first device on this node came (`true`) or its last one left.
    pub fn set_local(&mut self, user: &str, online: bool, now: u64) -> Option<Told> {
        let viewed = self.users.get_mut(user)?;
        viewed.local = online;
        self.settle(user, now)
    }

    /// Whether another node holds a device of the user (Redis directory).
    pub fn set_remote(&mut self, user: &str, online: bool, now: u64) -> Option<Told> {
        let viewed = self.users.get_mut(user)?;
        viewed.remote = online;
        self.settle(user, now)
    }

    fn settle(&mut self, user: &str, now: u64) -> Option<Told> {
        let viewed = self.users.get_mut(user)?;
        if viewed.online() {
            viewed.offline_since = None;
            self.pending.remove(user);
            if viewed.shown {
                return None; // back within the grace period, or nothing changed
            }
            viewed.shown = true;
            return Some(told(user, viewed));
        }
        if viewed.shown && viewed.offline_since.is_none() {
            viewed.offline_since = Some(now);
            self.pending.insert(user.into());
        }
        None
    }

    /// Offline users whose grace period ended by `now`: told now.
    pub fn tick(&mut self, now: u64) -> Vec<Told> {
        if self.pending.is_empty() {
            return Vec::new();
        }
        let grace = self.grace_ms;
        let mut due: Vec<CompactString> = self
            .pending
            .iter()
            .filter(|u| {
                self.users
                    .get(*u)
                    .and_then(|v| v.offline_since)
                    .is_none_or(|since| now >= since + grace)
            })
            .cloned()
            .collect();
        // In name order, not the set's (random per process): a seed replays exactly.
        due.sort_unstable();
        let mut out = Vec::new();
        for user in due {
            self.pending.remove(&user);
            if let Some(viewed) = self.users.get_mut(&user) {
                viewed.offline_since = None;
                if !viewed.online() && viewed.shown {
                    viewed.shown = false;
                    out.push(told(&user, viewed));
                }
            }
        }
        out
    }

    /// What the watchers of `user` were last told (None: not watched). A `watch` is
    /// answered with it, so that the changes told later follow on from the answer.
    pub fn shown(&self, user: &str) -> Option<bool> {
        self.users.get(user).map(|v| v.shown)
    }

    /// Watched users believed online on another node.
    #[cfg(test)]
    pub fn remote_online(&self) -> Vec<CompactString> {
        self.users
            .iter()
            .filter(|(_, v)| v.remote)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Watched users with no device here: where else they are is asked again periodically
    /// (a push this node missed, or a node that died, shows up then).
    pub fn not_local(&self) -> Vec<CompactString> {
        self.users
            .iter()
            .filter(|(_, v)| !v.local)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Every watched user (this node's registration as their watcher is renewed).
    pub fn watched(&self) -> Vec<CompactString> {
        self.users.keys().cloned().collect()
    }

    /// Users watched (for metrics).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn told(user: &str, viewed: &Viewed) -> Told {
    let mut shards: Vec<usize> = viewed.watchers.keys().copied().collect();
    shards.sort_unstable();
    Told {
        user: user.into(),
        online: viewed.shown,
        shards,
    }
}

/// A connection, as the watching shard knows it: slab index and serial.
pub type ConnKey = (usize, u32);

/// The watching shard's side (see the module doc).
#[derive(Debug, Default)]
pub struct WatchList {
    by_user: HashMap<CompactString, Vec<ConnKey>>,
    by_conn: HashMap<usize, Vec<CompactString>>,
}

/// A `watch` that would take a connection past [`MAX_WATCHED_PER_CONN`].
#[derive(Debug, PartialEq, Eq)]
pub struct TooMany;

impl WatchList {
    /// `conn` watches `users` too. Returns the users it did not watch before (each one
    /// registration at the user's home shard); none is added if the bound would be passed.
    pub fn add(
        &mut self,
        conn: ConnKey,
        users: &[CompactString],
    ) -> Result<Vec<CompactString>, TooMany> {
        let had = self.by_conn.get(&conn.0).map_or(&[][..], |v| v.as_slice());
        // Each new user once, in the order named (not a set's order, random per process:
        // the registrations go out in this order, and a seed must replay exactly).
        let mut fresh: Vec<&CompactString> = Vec::with_capacity(users.len());
        for u in users {
            if !had.contains(u) && !fresh.contains(&u) {
                fresh.push(u);
            }
        }
        if had.len() + fresh.len() > MAX_WATCHED_PER_CONN {
            return Err(TooMany);
        }
        let mut added = Vec::with_capacity(fresh.len());
        for user in fresh {
            self.by_user.entry(user.clone()).or_default().push(conn);
            self.by_conn.entry(conn.0).or_default().push(user.clone());
            added.push(user.clone());
        }
        Ok(added)
    }

    /// `conn` stops watching `users`. Returns the users it did watch (one registration fewer
    /// each at the user's home shard).
    pub fn remove(&mut self, conn: usize, users: &[CompactString]) -> Vec<CompactString> {
        let mut gone = Vec::new();
        let Some(mine) = self.by_conn.get_mut(&conn) else {
            return gone;
        };
        for user in users {
            let Some(at) = mine.iter().position(|u| u == user) else {
                continue;
            };
            mine.swap_remove(at);
            gone.push(user.clone());
            if let Some(conns) = self.by_user.get_mut(user) {
                conns.retain(|(c, _)| *c != conn);
                if conns.is_empty() {
                    self.by_user.remove(user);
                }
            }
        }
        if mine.is_empty() {
            self.by_conn.remove(&conn);
        }
        gone
    }

    /// The connection closed: everything it watched. Returns as [`WatchList::remove`].
    pub fn drop_conn(&mut self, conn: usize) -> Vec<CompactString> {
        let users = self.by_conn.get(&conn).cloned().unwrap_or_default();
        self.remove(conn, &users)
    }

    /// The connections watching `user`.
    pub fn watchers(&self, user: &str) -> &[ConnKey] {
        self.by_user.get(user).map_or(&[], |v| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 3_000;

    fn told(user: &str, online: bool, shards: &[usize]) -> Option<Told> {
        Some(Told {
            user: user.into(),
            online,
            shards: shards.to_vec(),
        })
    }

    #[test]
    fn online_is_told_at_once_offline_after_the_grace_and_a_quick_return_not_at_all() {
        let mut v = PresenceViews::new(GRACE);
        assert_eq!(v.watch("bob", 1, false), (true, None));
        assert_eq!(v.watch("bob", 0, false), (false, None));
        assert_eq!(v.set_local("bob", true, 100), told("bob", true, &[0, 1]));
        assert_eq!(v.set_local("bob", true, 150), None, "no change");
        // Leaves and comes back within the grace: nothing.
        assert_eq!(v.set_local("bob", false, 200), None);
        assert!(v.tick(200 + GRACE - 1).is_empty());
        assert_eq!(
            v.set_remote("bob", true, 300),
            None,
            "moved to another node"
        );
        assert_eq!(v.set_local("bob", false, 300), None);
        assert!(v.tick(10_000).is_empty(), "still online elsewhere");
        // Gone everywhere: told once the grace ran out, counted from when it went.
        assert_eq!(v.set_remote("bob", false, 20_000), None);
        assert!(v.tick(20_000 + GRACE - 1).is_empty());
        assert_eq!(
            v.tick(20_000 + GRACE),
            vec![Told {
                user: "bob".into(),
                online: false,
                shards: vec![0, 1]
            }]
        );
        assert!(v.tick(99_999).is_empty(), "told once");
        // Unwatched users are not followed; the last unwatch says so.
        assert_eq!(v.set_local("carol", true, 1), None);
        assert!(!v.unwatch("bob", 1));
        assert_eq!(v.set_local("bob", true, 30_000), told("bob", true, &[0]));
        assert!(v.unwatch("bob", 0));
        assert!(v.is_empty());
        assert!(!v.unwatch("bob", 0));
    }

    #[test]
    fn a_new_watch_starts_from_what_the_shard_knows_and_remote_users_are_rechecked() {
        let mut v = PresenceViews::new(GRACE);
        v.watch("ann", 0, true);
        // A watcher arriving while ann's grace runs was answered "offline": everyone is told
        // so now, and ann's return is news again.
        assert_eq!(v.set_local("ann", false, 5), None);
        assert_eq!(
            v.watch("ann", 3, false),
            (false, told("ann", false, &[0, 3]))
        );
        assert_eq!(v.set_local("ann", true, 6), told("ann", true, &[0, 3]));
        assert!(v.tick(1_000_000).is_empty());
        assert!(!v.unwatch("ann", 3));
        assert_eq!(v.set_local("ann", true, 1), None, "answered online already");
        v.watch("zed", 0, false);
        assert_eq!(v.set_remote("zed", true, 1), told("zed", true, &[0]));
        assert_eq!(v.remote_online(), vec![CompactString::from("zed")]);
        // Unwatched while its grace ran: forgotten, nothing told later.
        v.set_remote("zed", false, 2);
        v.unwatch("zed", 0);
        assert!(v.tick(1_000_000).is_empty());
    }

    #[test]
    fn a_connection_watches_at_most_the_bound_and_registers_each_user_it_adds() {
        let mut w = WatchList::default();
        let users: Vec<CompactString> = (0..MAX_WATCHED_PER_CONN)
            .map(|i| format!("u{i}").into())
            .collect();
        assert_eq!(w.add((1, 7), &users).unwrap().len(), MAX_WATCHED_PER_CONN);
        // Again, and with one more: the repeat is free, the extra one is too many.
        assert_eq!(w.add((1, 7), &users[..3]), Ok(vec![]));
        assert_eq!(w.add((1, 7), &["extra".into()]), Err(TooMany));
        // Each connection registers on its own (the home shard counts them).
        assert_eq!(w.add((2, 9), &users[..2]).unwrap().len(), 2);
        assert_eq!(w.watchers("u0"), &[(1, 7), (2, 9)]);
        assert_eq!(w.remove(1, &users[..1]), vec![users[0].clone()]);
        assert_eq!(
            w.remove(1, &users[..1]),
            Vec::<CompactString>::new(),
            "not any more"
        );
        assert_eq!(w.watchers("u0"), &[(2, 9)]);
        let gone = w.drop_conn(1);
        assert_eq!(gone.len(), MAX_WATCHED_PER_CONN - 1);
        assert_eq!(w.drop_conn(2).len(), 2);
        assert!(w.watchers("u1").is_empty());
        // Duplicates within one frame count once.
        let twice: Vec<CompactString> = vec!["a".into(), "a".into()];
        assert_eq!(w.add((3, 1), &twice), Ok(vec![CompactString::from("a")]));
    }
}
