//! Rooms in the simulation (issue 15, item 4), at the level of the room machines: two shards'
//! [`RoomHomes`] and [`RoomMembers`] (embedded history) joined by FIFO mesh queues, members on
//! both shards that join (with and without `since`), drop, rejoin with `since` = the last
//! offset they saw, stop reading (slow consumers: their outbound buffer fills and they hear
//! `gap`, then rejoin from what they saw), and publishers on both shards. Not yet the real
//! `Shard` over pipes.
//!
//! **Redis mode** (`history_in_store`): the homes' store operations go to a model of the
//! script's room keys (`RedisRooms`: history, offset counter, publish dedup, the node's
//! registration) and come back as the Redis thread answers them: a publish's answer to the
//! home, room messages and join answers on the node's channel, in Redis order. Faults: a call
//! that fails before it runs, a publish that runs while its answer is lost (the publisher hears
//! `unavailable`; its resend is answered with the first copy's offset), and the channel
//! dropping what it carried (a resubscription: `Resync`).
//!
//! Checked for every member segment (from a `joined` to the member's next join or drop):
//! offsets shown in order, each once, each the one after the previous unless a `gap` said
//! exactly where the skip began; at the end, each member that stays reached the room's last
//! offset; every accepted publish has its own offset and is in the history a rejoin replays.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::delivery::message::ReplyTo;
use crate::delivery::room::HistoryLimits;
use crate::metrics::ShardMetrics;
use crate::shard::msg::Room;
use crate::shard::rooms::{dispatch_room, Effects, RoomEffect, RoomHomes, RoomMembers, RoomTime};
use crate::store::redis::{RoomJoinAsk, RoomPost, StoreOp};
use crate::store::{StoreError, StoredMessage};
use crate::test_rng::Rng;

const SHARDS: usize = 2;
const MEMBERS: usize = 4;
/// Publishers are connections `PUBLISHER..PUBLISHER + 2`, one per shard.
const PUBLISHER: usize = 100;
const MAX_OUTBOUND: usize = 600;

#[derive(Default)]
struct Client {
    member: bool,
    reading: bool,
    /// Bytes the shard wrote that the client has not read.
    unread: usize,
    frames: VecDeque<serde_json::Value>,
    /// The connection's serial: a new one after each drop (a new connection).
    serial: u32,
    /// The newest offset shown in this segment, and whether a gap began right after it.
    last: Option<u64>,
    gap_after_last: bool,
}

#[derive(Default, Debug)]
pub(crate) struct RoomCounts {
    pub publishes: u64,
    pub deliveries: u64,
    pub gaps: u64,
    pub drops: u64,
    pub checks: u64,
    /// Redis mode: store calls failed, answers lost, channel drops, refusals heard.
    pub store_faults: u64,
    pub lost_answers: u64,
    pub channel_drops: u64,
    pub refused: u64,
}

/// A publish's answer: (id, offset) or why not.
type PublishResult = Result<(u64, u64), StoreError>;

/// What the node's channel carries for the room (Redis mode), in Redis order.
enum Push {
    Message {
        offset: u64,
        msg: StoredMessage,
    },
    JoinAnswer {
        ask: RoomJoinAsk,
        last: u64,
        recovered: bool,
        replay: Vec<(u64, StoredMessage)>,
    },
}

/// The script's keys for one room (`rh:`, `rd:`, `rn:`; store/redis/mod.rs), as both room
/// simulations model them. History is never trimmed here: every `since` is recovered.
#[derive(Default)]
pub(super) struct RoomScript {
    pub(super) history: Vec<(u64, StoredMessage)>,
    /// Publish dedup: (from, cid) -> (id, offset) of the first copy.
    first: HashMap<(String, String), (u64, u64)>,
    /// The offset counter (`~last`); a new room starts at the clock in microseconds, as the
    /// script's does (0: not started).
    last: u64,
    /// The node is in `rn:<room>` (it has members): publishes are pushed to it.
    registered: bool,
    /// The counter starts at 0 instead of the clock (a store whose offsets start low: the
    /// home must not take any offset value for "not joined").
    from_zero: bool,
}

impl RoomScript {
    fn start(&mut self, now_us: u64) {
        if self.last == 0 && !self.from_zero {
            self.last = now_us;
        }
    }

    /// A publish runs: (id, offset) of its first copy, and the entry pushed to the node's
    /// channel when it is new and the node is registered.
    pub(super) fn publish(
        &mut self,
        post: &RoomPost,
        now_us: u64,
    ) -> ((u64, u64), Option<(u64, StoredMessage)>) {
        let key = (post.from.to_string(), post.cid.to_string());
        if let Some(&first) = self.first.get(&key) {
            return (first, None);
        }
        self.start(now_us);
        self.last += 1;
        let offset = self.last;
        let msg = StoredMessage {
            id: post.id,
            from: post.from.clone(),
            cid: post.cid.as_ref().into(),
            ts: post.ts,
            body: post.body.as_ref().into(),
            msg_type: None,
        };
        self.history.push((offset, msg.clone()));
        self.first.insert(key, (post.id, offset));
        ((post.id, offset), self.registered.then_some((offset, msg)))
    }

    /// A join runs: the node is registered; the answer (ask without `since`, as the script's
    /// push names it; last offset; recovered; replay) for the node's channel.
    pub(super) fn join(
        &mut self,
        ask: RoomJoinAsk,
        now_us: u64,
    ) -> (RoomJoinAsk, u64, bool, Vec<(u64, StoredMessage)>) {
        self.registered = true;
        self.start(now_us);
        let replay = match ask.since {
            Some(since) => self
                .history
                .iter()
                .filter(|(o, _)| *o > since)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let recovered = ask.since.is_some();
        (
            RoomJoinAsk { since: None, ..ask },
            self.last,
            recovered,
            replay,
        )
    }

    /// The node's last member left: no more pushes.
    pub(super) fn leave(&mut self) {
        self.registered = false;
    }

    /// The newest offset the room handed out, if any.
    pub(super) fn last_offset(&self) -> Option<u64> {
        self.history.last().map(|(o, _)| *o)
    }

    /// Whether `offset` is in the history.
    pub(super) fn holds(&self, offset: u64) -> bool {
        self.history.iter().any(|(o, _)| *o == offset)
    }
}

/// The room's keys and this node's channel (Redis mode).
#[derive(Default)]
struct RedisRooms {
    script: RoomScript,
    /// Calls submitted by the room's home shard, not run yet.
    calls: VecDeque<StoreOp>,
    /// Publish answers on their way back to the home.
    answers: VecDeque<(RoomPost, PublishResult)>,
    channel: VecDeque<Push>,
}

struct RoomSim {
    rng: Rng,
    now: u64,
    homes: Vec<RoomHomes>,
    members: Vec<RoomMembers>,
    /// Per (from, to) shard: room messages on their way, in order.
    mesh: BTreeMap<(usize, usize), VecDeque<Room>>,
    clients: BTreeMap<(usize, usize), Client>,
    accepted: Vec<u64>,
    cid: u64,
    counts: RoomCounts,
    /// Redis mode: the model, and the room's home shard (where the calls come from).
    redis: Option<RedisRooms>,
    home: usize,
    /// Refused publishes (shard, cid JSON), resent as a client does.
    resends: Vec<(usize, String)>,
}

impl RoomSim {
    fn new(seed: u64, plant_no_gap: bool, in_redis: bool) -> RoomSim {
        let metrics = Arc::new(ShardMetrics::default());
        let limits = HistoryLimits {
            max: 10_000,
            max_age_ms: u64::MAX / 2,
        };
        let mut sim = RoomSim {
            rng: Rng(seed.max(1)),
            now: 0,
            homes: Vec::new(),
            members: Vec::new(),
            mesh: BTreeMap::new(),
            clients: BTreeMap::new(),
            accepted: Vec::new(),
            cid: 0,
            counts: RoomCounts::default(),
            redis: in_redis.then(RedisRooms::default),
            home: crate::mesh::home_shard("r", SHARDS),
            resends: Vec::new(),
        };
        for shard in 0..SHARDS {
            let mut home = RoomHomes::new(limits, metrics.clone());
            home.configure(SHARDS, in_redis);
            sim.homes.push(home);
            let mut m = RoomMembers::new(shard, MAX_OUTBOUND, 1_000_000, metrics.clone());
            m.configure(SHARDS);
            m.plant_no_gap = plant_no_gap;
            sim.members.push(m);
            for to in 0..SHARDS {
                sim.mesh.insert((shard, to), VecDeque::new());
            }
        }
        for c in 0..MEMBERS {
            let client = Client {
                reading: true,
                ..Client::default()
            };
            sim.clients.insert((c % SHARDS, c), client);
        }
        for s in 0..SHARDS {
            sim.clients.insert((s, PUBLISHER + s), Client::default());
        }
        sim
    }

    fn time(&self) -> RoomTime {
        RoomTime {
            now: self.now,
            wall_ms: 1,
        }
    }

    fn perform(&mut self, at: usize, effects: Effects) -> Result<(), String> {
        for effect in effects {
            match effect {
                RoomEffect::Send { conn, frame } | RoomEffect::Answer { conn, frame, .. } => {
                    self.sent(at, conn, &frame)
                }
                RoomEffect::SendRoom { conn, msg } => self.sent(at, conn, &msg.frame),
                RoomEffect::CloseSlow { .. } => return Err("closed for slowness".into()),
                RoomEffect::ToShard { shard, msg } if shard == at => self.handle(at, msg)?,
                RoomEffect::ToShard { shard, msg } => {
                    self.mesh.get_mut(&(at, shard)).unwrap().push_back(msg)
                }
                RoomEffect::Store(op) => match &mut self.redis {
                    Some(redis) if at == self.home => redis.calls.push_back(op),
                    Some(_) => return Err(format!("a store call from shard {at}, not the home")),
                    None => return Err("no store in embedded mode".into()),
                },
                RoomEffect::ApiAnswer { .. } => return Err("no API here".into()),
            }
        }
        Ok(())
    }

    fn sent(&mut self, shard: usize, conn: usize, frame: &[u8]) {
        if let Some(c) = self.clients.get_mut(&(shard, conn)) {
            c.unread += frame.len();
            c.frames
                .push_back(serde_json::from_slice(frame).expect("JSON"));
        }
    }

    fn handle(&mut self, shard: usize, msg: Room) -> Result<(), String> {
        let t = self.time();
        if matches!(msg, Room::ApiPublish { .. }) {
            return Err("no API here".into());
        }
        let id = self.cid;
        let clients = &self.clients;
        let view = |conn| clients.get(&(shard, conn)).map(|c| c.unread);
        let (homes, members) = (&mut self.homes[shard], &mut self.members[shard]);
        let effects = dispatch_room(homes, members, msg, t, || Some(id), view);
        self.perform(shard, effects)
    }

    fn join(&mut self, key: (usize, usize)) -> Result<(), String> {
        let c = self.clients.get_mut(&key).unwrap();
        c.member = true;
        c.gap_after_last = false;
        c.frames.clear();
        c.unread = 0;
        let since = c.last;
        let serial = c.serial;
        let e = self.members[key.0].join(key.1, serial, "r".into(), since, true);
        self.perform(key.0, e)
    }

    fn step(&mut self, faults: bool) -> Result<(), String> {
        self.now += 1 + self.rng.below(5);
        let branches = if self.redis.is_some() { 13 } else { 10 };
        match self.rng.below(branches) {
            10 | 11 => self.run_redis_call(faults)?,
            12 => self.hear_redis(faults)?,
            0 | 1 => {
                let (s, cid) = if !self.resends.is_empty() && self.rng.below(2) == 0 {
                    self.resends.remove(0)
                } else {
                    self.cid += 1;
                    let s = self.rng.below(SHARDS as u64) as usize;
                    (s, format!("\"{}\"", self.cid))
                };
                let reply = ReplyTo {
                    shard: s as u32,
                    conn: (PUBLISHER + s) as u32,
                    serial: 1,
                };
                let body = "x".repeat(self.rng.below(60) as usize);
                let body = format!("\"{body}\"");
                let e = self.members[s].publish(
                    reply,
                    Some("p"),
                    "r".into(),
                    cid.into(),
                    body.into(),
                    true,
                );
                self.perform(s, e)?;
            }
            2 => {
                let m = self.rng.below(MEMBERS as u64) as usize;
                let key = (m % SHARDS, m);
                let c = &self.clients[&key];
                if !c.member {
                    self.join(key)?;
                } else if faults && self.rng.below(100) < 30 {
                    // The client drops; it keeps the last offset it saw for its rejoin.
                    self.counts.drops += 1;
                    let c = self.clients.get_mut(&key).unwrap();
                    c.member = false;
                    c.serial += 1;
                    c.frames.clear();
                    c.unread = 0;
                    let e = self.members[key.0].closed(key.1);
                    self.perform(key.0, e)?;
                } else if faults {
                    let c = self.clients.get_mut(&key).unwrap();
                    c.reading = !c.reading; // stops (or resumes) reading: a slow consumer
                }
            }
            3..=5 => {
                let from = self.rng.below(SHARDS as u64) as usize;
                let to = self.rng.below(SHARDS as u64) as usize;
                for _ in 0..1 + self.rng.below(4) {
                    let Some(msg) = self.mesh.get_mut(&(from, to)).unwrap().pop_front() else {
                        break;
                    };
                    self.handle(to, msg)?;
                }
            }
            _ => self.read_all(!faults)?,
        }
        Ok(())
    }

    /// Redis runs the oldest call the home submitted (Redis mode).
    fn run_redis_call(&mut self, faults: bool) -> Result<(), String> {
        let roll = if faults { self.rng.below(100) } else { 100 };
        let now_us = (self.now + 1) * 1000;
        let Some(redis) = &mut self.redis else {
            return Ok(());
        };
        let Some(op) = redis.calls.pop_front() else {
            return Ok(());
        };
        if roll < 8 {
            // Redis is down: the call fails before it runs (the shard hears it unsent).
            self.counts.store_faults += 1;
            let effects = match op {
                StoreOp::RoomPublish(post) => {
                    let down = StoreError::Unsent("redis down".into());
                    redis.answers.push_back((*post, Err(down)));
                    return Ok(());
                }
                StoreOp::RoomJoin(ask) => self.homes[self.home].join_failed(*ask),
                _ => return Ok(()),
            };
            return self.perform(self.home, effects);
        }
        match op {
            StoreOp::RoomPublish(post) => {
                let (first, pushed) = redis.script.publish(&post, now_us);
                if let Some((offset, msg)) = pushed {
                    redis.channel.push_back(Push::Message { offset, msg });
                }
                let answer = if roll < 12 {
                    // It ran; its answer is lost (the shard's timeout answers instead).
                    self.counts.lost_answers += 1;
                    Err(StoreError::Unavailable("timed out".into()))
                } else {
                    Ok(first)
                };
                redis.answers.push_back((*post, answer));
            }
            StoreOp::RoomJoin(ask) => {
                let (ask, last, recovered, replay) = redis.script.join(*ask, now_us);
                redis.channel.push_back(Push::JoinAnswer {
                    ask,
                    last,
                    recovered,
                    replay,
                });
            }
            StoreOp::RoomLeave { .. } => redis.script.leave(),
            _ => return Err("a call that is not a room's".into()),
        }
        Ok(())
    }

    /// The home hears Redis (Redis mode): a publish's answer, or the next push on the node's
    /// channel; or the channel drops what it carried and the node resyncs.
    fn hear_redis(&mut self, faults: bool) -> Result<(), String> {
        let t = self.time();
        let home = self.home;
        let drop_channel = faults && self.rng.below(100) < 3;
        let answer_first = self.rng.below(2) == 0;
        let Some(redis) = &mut self.redis else {
            return Ok(());
        };
        if drop_channel && !redis.channel.is_empty() {
            // A resubscription: what the channel carried is lost, then `Resync`.
            self.counts.channel_drops += 1;
            redis.channel.clear();
            let effects = self.homes[home].resynced();
            return self.perform(home, effects);
        }
        let answer = if answer_first || redis.channel.is_empty() {
            redis.answers.pop_front()
        } else {
            None
        };
        let effects = if let Some((post, result)) = answer {
            self.homes[home].store_published(post, result)
        } else if let Some(push) = redis.channel.pop_front() {
            match push {
                Push::Message { offset, msg } => {
                    self.homes[home].pushed("r".into(), offset, msg, t)
                }
                Push::JoinAnswer {
                    ask,
                    last,
                    recovered,
                    replay,
                } => self.homes[home].join_answer(ask, last, recovered, replay, t),
            }
        } else {
            return Ok(());
        };
        self.perform(home, effects)
    }

    fn redis_busy(&self) -> bool {
        self.redis
            .as_ref()
            .is_some_and(|r| !(r.calls.is_empty() && r.answers.is_empty() && r.channel.is_empty()))
    }

    /// Clients that read take what they were sent and check each segment as they go.
    fn read_all(&mut self, everyone: bool) -> Result<(), String> {
        let keys: Vec<(usize, usize)> = self.clients.keys().copied().collect();
        for key in keys {
            let c = self.clients.get_mut(&key).unwrap();
            if everyone {
                c.reading = true;
            }
            if !c.reading && key.1 < PUBLISHER {
                continue;
            }
            c.unread = 0;
            let mut rejoin = false;
            while let Some(v) = c.frames.pop_front() {
                self.counts.checks += 1;
                let op = v["op"].as_str().unwrap_or_default();
                match op {
                    "accepted" => self.accepted.push(v["offset"].as_u64().ok_or("offset")?),
                    "joined" => {
                        let offset = v["offset"].as_u64().ok_or("offset")?;
                        if c.last.is_some_and(|l| l != offset) {
                            return Err(format!(
                                "{key:?}: joined at {offset} after replay up to {:?}",
                                c.last
                            ));
                        }
                        c.last = Some(offset);
                    }
                    "room" => {
                        let offset = v["offset"].as_u64().ok_or("offset")?;
                        self.counts.deliveries += 1;
                        if let Some(last) = c.last {
                            let next = offset == last + 1;
                            if offset <= last {
                                return Err(format!("{key:?}: offset {offset} shown twice or out of order (after {last})"));
                            }
                            if !next && !c.gap_after_last {
                                return Err(format!(
                                    "{key:?}: skipped from {} to {offset} without a gap",
                                    last + 1
                                ));
                            }
                        }
                        c.last = Some(offset);
                        c.gap_after_last = false;
                    }
                    "gap" => {
                        self.counts.gaps += 1;
                        let from = v["from"].as_u64().ok_or("from")?;
                        if c.last.is_some_and(|l| from != l + 1) {
                            return Err(format!("{key:?}: gap from {from} after {:?}", c.last));
                        }
                        c.gap_after_last = true;
                        // As a client does: recover with join + since.
                        rejoin = true;
                    }
                    // Redis mode: a refused publish (the publisher resends it), a join the
                    // store could not register (the member joins again).
                    "error" if self.redis.is_some() && v["code"] == "unavailable" => {
                        self.counts.refused += 1;
                        if key.1 >= PUBLISHER {
                            let cid = v["cid"].as_str().ok_or("cid")?;
                            self.resends.push((key.0, format!("\"{cid}\"")));
                        } else {
                            c.member = false;
                        }
                    }
                    "left" | "error" => return Err(format!("{key:?}: {v}")),
                    _ => return Err(format!("{key:?}: unexpected {v}")),
                }
            }
            if rejoin && c.member {
                self.join(key)?;
            }
        }
        Ok(())
    }

    fn run(&mut self, steps: u64) -> Result<(), String> {
        for _ in 0..steps {
            self.step(true)?;
        }
        for m in 0..MEMBERS {
            let key = (m % SHARDS, m);
            if !self.clients[&key].member {
                self.join(key)?;
            }
        }
        // Settle: every refused publish resent, everything delivered and read, no faults.
        loop {
            let mut moved = false;
            while let Some((s, cid)) = self.resends.pop() {
                moved = true;
                let reply = ReplyTo {
                    shard: s as u32,
                    conn: (PUBLISHER + s) as u32,
                    serial: 1,
                };
                let e = self.members[s].publish(
                    reply,
                    Some("p"),
                    "r".into(),
                    cid.into(),
                    "\"x\"".into(),
                    true,
                );
                self.perform(s, e)?;
            }
            while self.redis_busy() {
                moved = true;
                self.run_redis_call(false)?;
                self.hear_redis(false)?;
            }
            let pairs: Vec<(usize, usize)> = self.mesh.keys().copied().collect();
            for (from, to) in pairs {
                while let Some(msg) = self.mesh.get_mut(&(from, to)).unwrap().pop_front() {
                    moved = true;
                    self.handle(to, msg)?;
                }
            }
            self.read_all(true)?;
            for m in 0..MEMBERS {
                let key = (m % SHARDS, m);
                if !self.clients[&key].member {
                    moved = true;
                    self.join(key)?;
                }
            }
            if !moved && self.clients.values().all(|c| c.frames.is_empty()) {
                break;
            }
        }
        self.check()
    }

    fn check(&mut self) -> Result<(), String> {
        self.counts.publishes = self.accepted.len() as u64;
        let mut offsets = self.accepted.clone();
        offsets.sort_unstable();
        offsets.dedup();
        self.counts.checks += 1;
        if offsets.len() != self.accepted.len() {
            return Err(format!("an offset accepted twice: {:?}", self.accepted));
        }
        let mut last = offsets.last().copied();
        if let Some(redis) = &self.redis {
            // Every publish that ran, its answer lost or not.
            last = redis.script.last_offset();
            if let Some(o) = offsets.iter().find(|o| !redis.script.holds(**o)) {
                return Err(format!("offset {o} accepted but not in the room's history"));
            }
        }
        for m in 0..MEMBERS {
            self.counts.checks += 1;
            let c = &self.clients[&(m % SHARDS, m)];
            if last.is_some() && c.last < last {
                return Err(format!(
                    "member {m} ended at {:?}, the room at {last:?}",
                    c.last
                ));
            }
        }
        Ok(())
    }
}

/// Run `count` seeds (see `super::seeds`); the counts, or the first failure with its seed.
fn sweep(
    count: u64,
    steps: u64,
    plant_no_gap: bool,
    in_redis: bool,
) -> Result<RoomCounts, (u64, String)> {
    sweep_with(count, steps, plant_no_gap, in_redis, false)
}

fn sweep_with(
    count: u64,
    steps: u64,
    plant_no_gap: bool,
    in_redis: bool,
    from_zero: bool,
) -> Result<RoomCounts, (u64, String)> {
    let mut total = RoomCounts::default();
    for seed in super::seeds(count) {
        let mut sim = RoomSim::new(seed, plant_no_gap, in_redis);
        if let Some(redis) = sim.redis.as_mut() {
            redis.script.from_zero = from_zero;
        }
        sim.run(steps).map_err(|e| (seed, e))?;
        let c = &sim.counts;
        total.publishes += c.publishes;
        total.deliveries += c.deliveries;
        total.gaps += c.gaps;
        total.drops += c.drops;
        total.checks += c.checks;
        total.store_faults += c.store_faults;
        total.lost_answers += c.lost_answers;
        total.channel_drops += c.channel_drops;
        total.refused += c.refused;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEDS: u64 = 2_000;

    #[test]
    fn room_members_get_every_offset_once_in_order_or_a_gap() {
        match sweep(SEEDS, 600, false, false) {
            Ok(c) => println!("room simulation: {} seeds, {c:?}", super::super::seeds(SEEDS).len()),
            Err((seed, e)) => panic!(
                "seed {seed} failed: {e}\nreplay: RINGGATE_SIM_SEED={seed} cargo test --lib sim::rooms"
            ),
        }
    }

    #[test]
    fn a_skip_without_gap_is_found() {
        match sweep(SEEDS, 600, true, false) {
            Ok(c) => panic!("the planted silent skip was not found ({c:?})"),
            Err((seed, e)) => {
                println!("silent skip found by seed {seed}: {e}");
                assert!(e.contains("without a gap"), "another rule broke: {e}");
            }
        }
    }

    #[test]
    fn with_redis_room_members_get_every_offset_once_in_order_or_a_gap() {
        match sweep(SEEDS, 600, false, true) {
            Ok(c) => println!(
                "room simulation, Redis mode: {} seeds, {c:?}",
                super::super::seeds(SEEDS).len()
            ),
            Err((seed, e)) => panic!(
                "seed {seed} failed: {e}\nreplay: RINGGATE_SIM_SEED={seed} cargo test --lib sim::rooms"
            ),
        }
    }

    /// Offsets from 1 (a counter starting at 0): the home once took offset 0 for "not
    /// joined yet" and dropped the first pushes (found while building the model).
    #[test]
    fn with_redis_offsets_from_one_reach_every_member() {
        match sweep_with(500, 600, false, true, true) {
            Ok(c) => println!("room simulation (Redis, offsets from 1): {c:?}"),
            Err((seed, e)) => panic!("seed {seed}: {e}"),
        }
    }

    #[test]
    fn with_redis_a_skip_without_gap_is_found() {
        match sweep(SEEDS, 600, true, true) {
            Ok(c) => panic!("the planted silent skip was not found ({c:?})"),
            Err((seed, e)) => {
                println!("silent skip found by seed {seed} (Redis mode): {e}");
                assert!(e.contains("without a gap"), "another rule broke: {e}");
            }
        }
    }

    /// A room message lost with the node's channel (a resubscription) and nothing published
    /// after it: the members still get it (or a `gap`), by the resync.
    #[test]
    fn with_redis_the_last_message_lost_with_the_channel_still_reaches_members() {
        let mut sim = RoomSim::new(1, false, true);
        for m in 0..MEMBERS {
            // The joins run and are answered; the members read `joined`.
            sim.join((m % SHARDS, m)).unwrap();
            drain_mesh(&mut sim);
            sim.run_redis_call(false).unwrap();
            sim.hear_redis(false).unwrap();
            drain_mesh(&mut sim);
        }
        sim.read_all(true).unwrap();
        let reply = ReplyTo {
            shard: 0,
            conn: PUBLISHER as u32,
            serial: 1,
        };
        let e = sim.members[0].publish(
            reply,
            Some("p"),
            "r".into(),
            "\"c1\"".into(),
            "1".into(),
            true,
        );
        sim.perform(0, e).unwrap();
        drain_mesh(&mut sim);
        sim.run_redis_call(false).unwrap(); // stored, pushed on the channel
        let redis = sim.redis.as_mut().unwrap();
        assert_eq!(redis.channel.len(), 1);
        redis.channel.clear(); // lost with the channel
        let effects = sim.homes[sim.home].resynced();
        sim.perform(sim.home, effects).unwrap();
        sim.run(0).unwrap();
    }

    fn drain_mesh(sim: &mut RoomSim) {
        loop {
            let pairs: Vec<(usize, usize)> = sim.mesh.keys().copied().collect();
            let mut moved = false;
            for (from, to) in pairs {
                while let Some(msg) = sim.mesh.get_mut(&(from, to)).unwrap().pop_front() {
                    moved = true;
                    sim.handle(to, msg).unwrap();
                }
            }
            if !moved {
                break;
            }
        }
    }
}
