//! Presence in the simulation: the real shards of [`Sim`] (two, in Redis mode, with its store
//! faults), users with several devices that connect and drop at random on this node and
//! on another node (`n1`, a model in the directory: [`Directory`]), and watchers on both shards
//! that `watch`, `unwatch`, ask `presence`, drop and reconnect (and watch again, as the
//! client library does).
//!
//! Faults: the store's (see the module doc of `sim`), mesh channels of 1 to 16 messages
//! (chosen per seed by `Sim::build`), and a shard's channel made full now and then
//! (questions and news for it are held and retried). Checked during the run: no watcher
//! hears an error (a question is never refused for a full channel: the `unavailable` it got
//! before named no frame, and clients asking again in step could be refused for good); a
//! change names one user, one its connection watched. (Not checked: that news never repeats. A home that forgets a user
//! nobody watched for a moment starts again from its devices, and a watcher that came back
//! in between may hear `online` twice; harmless, and not promised.) Checked once faults stop and everything settled (a lease and a grace of
//! virtual time): every watcher's last told state of each watched user (the `watch` answer,
//! then the changes, in the order written) is the truth (online iff a device of the user is
//! connected on some node), and a `presence` answer is the truth.
//!
//! Replay: `RINGGATE_SIM_SEED=<seed> cargo test --lib sim::presence -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::task::{Context, Waker};

use super::{seeds, trace, Model, Pipe, Plant, Sim};
use crate::shard::presence::PresencePlant;
use crate::shard::ConnPoll;
use crate::store::redis::{StoreOp, StoreReply};

/// Watched users, watchers, devices per user and node.
const USERS: usize = 4;
const WATCHERS: usize = 3;
const MAX_DEVICES: usize = 3;
/// Named in every `watch` and every `presence` frame, never online: an answer names it, a
/// change never does, so the two are told apart.
const WATCH_MARK: &str = "nobody-w";
const ASK_MARK: &str = "nobody-a";

/// The directory as the other node `n1` sees it: its devices, and the users this node is
/// registered as a watcher of (`StoreOp::WatchPresence`).
#[derive(Default)]
pub(super) struct Directory {
    foreign: BTreeMap<String, u32>,
    watched: BTreeSet<String>,
}

impl Model {
    /// A presence operation of this node (the Redis scripts' effect).
    pub(super) fn presence_op(&mut self, op: StoreOp) -> StoreReply {
        let d = &mut self.directory;
        match op {
            StoreOp::WatchPresence { user, on } => {
                if on {
                    d.watched.insert(user.to_string());
                } else {
                    d.watched.remove(user.as_str());
                }
                StoreReply::Done
            }
            // Online on *other* live nodes.
            StoreOp::Presence { users, ask } => StoreReply::Presence {
                online: Some(
                    users
                        .iter()
                        .map(|u| d.foreign.get(u.as_str()).is_some_and(|n| *n > 0))
                        .collect(),
                ),
                users,
                ask,
            },
            _ => unreachable!("presence operations only"),
        }
    }

    /// A device of `user` on `n1` came (`up`) or went. When `n1`'s run joined or left the
    /// user's entry, this node hears it if it watches the user (`runs`: the entry's runs,
    /// this node's own among them while it is located here).
    fn foreign_device(&mut self, user: &str, up: bool) -> Option<StoreReply> {
        let n = self.directory.foreign.entry(user.to_string()).or_default();
        let before = *n > 0;
        if up {
            *n += 1;
        } else if *n > 0 {
            *n -= 1;
        }
        let after = *n > 0;
        if before == after || !self.directory.watched.contains(user) {
            return None;
        }
        let runs = after as u64 + !self.nodes_of(user).is_empty() as u64;
        Some(StoreReply::PresenceChanged {
            user: user.into(),
            runs,
        })
    }
}

/// A connection of the simulation on a shard.
struct Conn {
    shard: usize,
    index: usize,
    pipe: Pipe,
}

struct Device {
    user: usize,
    conn: Conn,
}

struct Watcher {
    conn: Conn,
    /// Users this connection watches (as written by the client).
    watching: BTreeSet<usize>,
    ever_watched: BTreeSet<usize>,
    /// The last state told per user (watch answers and changes, in order).
    told: BTreeMap<usize, bool>,
    /// The last answer to a `presence` frame.
    answer: Option<BTreeMap<String, bool>>,
}

/// Counts printed with a run's seed.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct PresenceCounts {
    pub steps: u64,
    pub store_ops: u64,
    pub faults: u64,
    pub device_moves: u64,
    pub foreign_moves: u64,
    pub watches: u64,
    pub watcher_drops: u64,
    /// Changes heard by watchers.
    pub changes: u64,
    /// Answers to `watch` and `presence`.
    pub answers: u64,
    /// Times a shard's channel was filled.
    pub channels_filled: u64,
    pub checks: u64,
}

pub(crate) struct PresenceSim {
    sim: Sim,
    users: Vec<String>,
    watcher_names: Vec<String>,
    devices: Vec<Device>,
    watchers: Vec<Watcher>,
    /// Dropped connections, until their shard closed them.
    closing: Vec<Conn>,
    pub(crate) counts: PresenceCounts,
}

/// The first names with this prefix homed on each shard in turn (both shards hold some).
fn spread(prefix: &str, count: usize, shards: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < count {
        let want = out.len() % shards;
        let name = format!("{prefix}{i}");
        if crate::mesh::home_shard(&name, shards) == want {
            out.push(name);
        }
        i += 1;
    }
    out
}

impl PresenceSim {
    pub(crate) fn new(seed: u64, plant: Option<PresencePlant>) -> PresenceSim {
        let mut sim = Sim::with_shards(seed, Plant::None, super::SHARDS);
        if let Some(plant) = plant {
            for shard in &mut sim.shards {
                shard.plant_presence_bug(plant);
            }
        }
        let mut p = PresenceSim {
            users: spread("p", USERS, super::SHARDS),
            watcher_names: spread("w", WATCHERS, super::SHARDS),
            sim,
            devices: Vec::new(),
            watchers: Vec::new(),
            closing: Vec::new(),
            counts: PresenceCounts::default(),
        };
        for w in 0..WATCHERS {
            let conn = p.connect(&p.watcher_names[w].clone()).expect("admitted");
            p.watchers.push(Watcher {
                conn,
                watching: BTreeSet::new(),
                ever_watched: BTreeSet::new(),
                told: BTreeMap::new(),
                answer: None,
            });
        }
        p
    }

    fn connect(&mut self, user: &str) -> Option<Conn> {
        let shard = crate::mesh::home_shard(user, self.sim.shards.len());
        let index = self.sim.shards[shard].admit(0)?;
        Some(Conn {
            shard,
            index,
            pipe: Pipe::connect(user),
        })
    }

    fn drop_conn(&mut self, mut conn: Conn) {
        conn.pipe.eof = true;
        self.closing.push(conn);
    }

    /// Run `steps` faulty steps, then settle and check; Err: what broke.
    pub(crate) fn run(&mut self, steps: u64) -> Result<(), String> {
        for _ in 0..steps {
            self.step(true)?;
        }
        self.settle()?;
        // Every watcher asks about everyone once more; only the answer to this question counts.
        for w in 0..WATCHERS {
            self.watchers[w].answer = None;
            self.ask(w);
        }
        self.settle()?;
        self.check()
    }

    fn step(&mut self, faults: bool) -> Result<(), String> {
        self.counts.steps += 1;
        let faults_before = self.sim.counts.faults;
        let ops_before = self.sim.counts.store_ops;
        match self.sim.rng.below(15) {
            0 | 1 => self.device_comes_or_goes(),
            2 => self.foreign_device_moves(),
            3 | 4 => self.watcher_acts(faults),
            5 | 6 => self.sim.store_serves(faults),
            13 if faults && self.sim.chance(1) => self.fill_channel(),
            7 => self.sim.land_late(faults),
            8 | 9 => self.sim.shard_hears_store(),
            10 => {
                let k = self.sim.pick_shard();
                self.sim.shard_drains_mesh(k);
            }
            _ => {
                let k = self.sim.pick_shard();
                let ms = 1 + self.sim.rng.below(100);
                self.sim.clock.advance(ms);
                self.sim.shards[k].on_tick();
            }
        }
        self.counts.faults += self.sim.counts.faults - faults_before;
        self.counts.store_ops += self.sim.counts.store_ops - ops_before;
        self.poll_all();
        self.read_watchers()
    }

    /// A shard's channel is full (a burst from elsewhere): questions and news for it are held
    /// and retried; the filler is a no-op.
    fn fill_channel(&mut self) {
        use crate::shard::msg::{Presence, ShardMsg};
        let k = self.sim.pick_shard();
        self.counts.channels_filled += 1;
        self.note(format!("shard {k}'s channel fills up"));
        loop {
            let filler = Presence::Unwatch {
                user: "filler".into(),
                shard: 0,
            };
            if self
                .sim
                .mesh_client
                .send(k, ShardMsg::Presence(filler))
                .is_err()
            {
                return;
            }
        }
    }

    /// A device of a random user connects on this node, or one drops.
    fn device_comes_or_goes(&mut self) {
        let user = self.sim.rng.below(USERS as u64) as usize;
        let mine: Vec<usize> = (0..self.devices.len())
            .filter(|i| self.devices[*i].user == user)
            .collect();
        self.counts.device_moves += 1;
        if !mine.is_empty() && (mine.len() == MAX_DEVICES || self.sim.chance(50)) {
            let i = mine[self.sim.rng.below(mine.len() as u64) as usize];
            let device = self.devices.swap_remove(i);
            self.note(format!("device of p-user {} drops", self.users[user]));
            self.drop_conn(device.conn);
        } else if let Some(conn) = self.connect(&self.users[user].clone()) {
            self.note(format!("device of {} connects", self.users[user]));
            self.devices.push(Device { user, conn });
        }
    }

    /// A device of a random user connects to or leaves `n1` (while Redis is up).
    fn foreign_device_moves(&mut self) {
        if self.sim.down_until > self.sim.now() {
            return;
        }
        let u = self.sim.rng.below(USERS as u64) as usize;
        let user = self.users[u].clone();
        let now_there = self
            .sim
            .model
            .directory
            .foreign
            .get(&user)
            .copied()
            .unwrap_or(0);
        let up = now_there == 0 || (now_there < MAX_DEVICES as u32 && self.sim.chance(50));
        self.counts.foreign_moves += 1;
        self.note(format!("n1: a device of {user} up={up}"));
        if let Some(push) = self.sim.model.foreign_device(&user, up) {
            self.sim.route(vec![(0, push)]);
        }
    }

    fn watcher_acts(&mut self, faults: bool) {
        let w = self.sim.rng.below(WATCHERS as u64) as usize;
        match self.sim.rng.below(10) {
            0 if faults => self.watcher_reconnects(w),
            0..=4 => {
                let u = self.sim.rng.below(USERS as u64) as usize;
                self.watch(w, &[u]);
            }
            5..=7 => {
                let watched: Vec<usize> = self.watchers[w].watching.iter().copied().collect();
                if watched.is_empty() {
                    return;
                }
                let u = watched[self.sim.rng.below(watched.len() as u64) as usize];
                let text = format!(r#"{{"op":"unwatch","users":["{}"]}}"#, self.users[u]);
                self.note(format!("watcher {w}: {text}"));
                self.watchers[w].conn.pipe.send(&text);
                self.watchers[w].watching.remove(&u);
                self.watchers[w].told.remove(&u);
            }
            _ => self.ask(w),
        }
    }

    fn watch(&mut self, w: usize, users: &[usize]) {
        self.counts.watches += 1;
        let mut names = vec![format!("\"{WATCH_MARK}\"")];
        names.extend(users.iter().map(|u| format!("\"{}\"", self.users[*u])));
        let text = format!(r#"{{"op":"watch","users":[{}]}}"#, names.join(","));
        self.note(format!("watcher {w}: {text}"));
        let watcher = &mut self.watchers[w];
        watcher.conn.pipe.send(&text);
        watcher.watching.extend(users);
        watcher.ever_watched.extend(users);
    }

    fn ask(&mut self, w: usize) {
        let mut names = vec![format!("\"{ASK_MARK}\"")];
        names.extend(self.users.iter().map(|u| format!("\"{u}\"")));
        let text = format!(r#"{{"op":"presence","users":[{}]}}"#, names.join(","));
        self.watchers[w].conn.pipe.send(&text);
    }

    /// The watcher's connection drops; it connects again and watches the same users.
    fn watcher_reconnects(&mut self, w: usize) {
        let name = self.watcher_names[w].clone();
        let Some(conn) = self.connect(&name) else {
            return;
        };
        self.counts.watcher_drops += 1;
        self.note(format!("watcher {w} reconnects"));
        let old = std::mem::replace(&mut self.watchers[w].conn, conn);
        self.drop_conn(old);
        let watcher = &mut self.watchers[w];
        watcher.told.clear();
        watcher.answer = None;
        let users: Vec<usize> = std::mem::take(&mut watcher.watching).into_iter().collect();
        if !users.is_empty() {
            self.watch(w, &users);
        }
    }

    fn note(&self, what: String) {
        if trace() {
            eprintln!("{} {what}", self.sim.now());
        }
    }

    fn poll_all(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        let shards = &mut self.sim.shards;
        let mut poll = |c: &mut Conn| shards[c.shard].poll_conn(c.index, &mut c.pipe, &mut cx);
        for w in &mut self.watchers {
            assert!(
                matches!(poll(&mut w.conn), ConnPoll::Pending { .. }),
                "a watcher's connection stays open"
            );
        }
        for d in &mut self.devices {
            assert!(
                matches!(poll(&mut d.conn), ConnPoll::Pending { .. }),
                "a device's connection stays open"
            );
        }
        self.closing
            .retain_mut(|c| matches!(poll(c), ConnPoll::Pending { .. }));
    }

    fn read_watchers(&mut self) -> Result<(), String> {
        for w in 0..WATCHERS {
            for v in self.watchers[w].conn.pipe.frames() {
                if trace() {
                    eprintln!("{} watcher {w} hears {v}", self.sim.now());
                }
                match v["op"].as_str() {
                    Some("presence") => {}
                    Some("error") => return Err(format!("watcher {w} heard an error: {v}")),
                    _ => continue,
                }
                let online = v["online"].as_object().ok_or(format!("bad presence {v}"))?;
                let is_watch_answer = online.contains_key(WATCH_MARK);
                let watcher = &mut self.watchers[w];
                if is_watch_answer || online.contains_key(ASK_MARK) {
                    self.counts.answers += 1;
                    let mut answer = BTreeMap::new();
                    for (name, on) in online {
                        let on = on.as_bool().ok_or(format!("bad presence {v}"))?;
                        answer.insert(name.clone(), on);
                        if !is_watch_answer {
                            continue;
                        }
                        if let Some(u) = self.users.iter().position(|x| x == name) {
                            if watcher.watching.contains(&u) {
                                watcher.told.insert(u, on);
                            }
                        }
                    }
                    if !is_watch_answer {
                        watcher.answer = Some(answer);
                    }
                    continue;
                }
                self.counts.changes += 1;
                self.counts.checks += 1;
                let [(name, on)] = online.iter().collect::<Vec<_>>()[..] else {
                    return Err(format!("a change names one user: {v}"));
                };
                let on = on.as_bool().ok_or(format!("bad presence {v}"))?;
                let u = self
                    .users
                    .iter()
                    .position(|x| x == name)
                    .ok_or(format!("a change of an unknown user: {v}"))?;
                if !watcher.ever_watched.contains(&u) {
                    return Err(format!("watcher {w} told of {name}, never watched: {v}"));
                }
                if watcher.watching.contains(&u) {
                    watcher.told.insert(u, on);
                }
            }
        }
        Ok(())
    }

    /// The truth: a device of the user is connected on this node or on `n1`.
    fn online(&self, u: usize) -> bool {
        self.devices.iter().any(|d| d.user == u)
            || self
                .sim
                .model
                .directory
                .foreign
                .get(&self.users[u])
                .is_some_and(|n| *n > 0)
    }

    /// Faults stop: Redis up, late writes land, every operation served and answered, every
    /// mesh drained, and virtual time runs past a lease and a grace, ticking.
    fn settle(&mut self) -> Result<(), String> {
        self.sim.down_until = 0;
        let cfg = self.sim.shards[0].cfg();
        let span = cfg.node_lease_ms + cfg.presence_grace_ms + 2_000;
        let end = self.sim.now() + span;
        loop {
            while !self.sim.late.is_empty() {
                self.sim.land_late(false);
            }
            for k in 0..self.sim.shards.len() {
                self.sim.serve_store_ops(k, u64::MAX, false);
                let now = self.sim.now();
                while let Some(reply) = self.sim.to_shard[k].pop_front() {
                    self.sim.shards[k].on_store_reply(reply, now);
                }
                self.sim.shard_drains_mesh(k);
            }
            self.poll_all();
            self.read_watchers()?;
            if self.sim.now() >= end {
                return Ok(());
            }
            self.sim.clock.advance(100);
            for k in 0..self.sim.shards.len() {
                self.sim.shards[k].on_tick();
            }
        }
    }

    fn check(&mut self) -> Result<(), String> {
        for w in 0..WATCHERS {
            let watcher = &self.watchers[w];
            for &u in &watcher.watching {
                self.counts.checks += 1;
                let truth = self.online(u);
                if watcher.told.get(&u) != Some(&truth) {
                    return Err(format!(
                        "watcher {w} was last told {} online={:?}, the truth is {truth}",
                        self.users[u],
                        watcher.told.get(&u)
                    ));
                }
            }
            let answer = watcher
                .answer
                .as_ref()
                .ok_or(format!("watcher {w} got no presence answer"))?;
            for u in 0..USERS {
                self.counts.checks += 1;
                let truth = self.online(u);
                if answer.get(&self.users[u]) != Some(&truth) {
                    return Err(format!(
                        "presence answered {} online={:?} to watcher {w}, the truth is {truth}",
                        self.users[u],
                        answer.get(&self.users[u])
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One line for the trace of a presence message between shards.
pub(super) fn describe(msg: &crate::shard::msg::Presence) -> String {
    use crate::shard::msg::Presence;
    match msg {
        Presence::Api { users, .. } => format!("api ask {users:?}"),
        Presence::Ask { users, ask, .. } => format!("ask {ask} {users:?}"),
        Presence::Answer { ask, users, online } => format!("answer {ask} {users:?} {online:?}"),
        Presence::Watch { user, shard } => format!("watch {user} from {shard}"),
        Presence::Unwatch { user, shard } => format!("unwatch {user} from {shard}"),
        Presence::Changed { user, online } => format!("changed {user} online={online}"),
    }
}

/// Run every seed; the first failure, with its seed.
pub(crate) fn sweep(
    count: u64,
    steps: u64,
    plant: Option<PresencePlant>,
) -> Result<(u64, PresenceCounts), (u64, String)> {
    let mut total = PresenceCounts::default();
    let all = seeds(count);
    for &seed in &all {
        let mut p = PresenceSim::new(seed, plant);
        p.run(steps).map_err(|e| (seed, e))?;
        let c = p.counts;
        total.steps += c.steps;
        total.store_ops += c.store_ops;
        total.faults += c.faults;
        total.device_moves += c.device_moves;
        total.foreign_moves += c.foreign_moves;
        total.watches += c.watches;
        total.watcher_drops += c.watcher_drops;
        total.changes += c.changes;
        total.answers += c.answers;
        total.channels_filled += c.channels_filled;
        total.checks += c.checks;
    }
    Ok((all.len() as u64, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds in every test run.
    const SEEDS: u64 = 1_000;
    const STEPS: u64 = 600;

    #[test]
    fn watchers_and_presence_answers_converge_to_the_truth_under_faults() {
        match sweep(SEEDS, STEPS, None) {
            Ok((n, c)) => {
                println!("presence simulation: {n} seeds, {c:?}");
                assert!(c.changes > 0 && c.answers > 0 && c.watcher_drops > 0);
            }
            Err((seed, e)) => panic!(
                "seed {seed} failed: {e}\nreplay: RINGGATE_SIM_SEED={seed} cargo test --lib sim::presence"
            ),
        }
    }

    /// A seed is a replay (hash-set order inside the machine would break this).
    #[test]
    fn a_presence_seed_replays_exactly() {
        let fingerprint = |seed| {
            let mut p = PresenceSim::new(seed, None);
            let result = p.run(STEPS);
            let told: Vec<_> = p.watchers.iter().map(|w| w.told.clone()).collect();
            format!("{result:?} {:?} {told:?}", p.counts)
        };
        for seed in seeds(20) {
            assert_eq!(
                fingerprint(seed),
                fingerprint(seed),
                "seed {seed} did not replay"
            );
        }
    }

    #[test]
    fn without_the_periodic_recheck_a_missed_change_is_found() {
        match sweep(SEEDS, STEPS, Some(PresencePlant::NoRecheck)) {
            Ok((_, c)) => panic!("NoRecheck was not found ({c:?})"),
            Err((seed, e)) => {
                println!("NoRecheck found by seed {seed}: {e}");
                assert!(e.contains("the truth is"), "another rule broke: {e}");
            }
        }
    }
}
