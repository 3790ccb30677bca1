//! The presence machine alone: no sockets, no shard, time given by the test. Two machines
//! stand for two shards; their `Tell`/`Ask` effects are carried by hand.

use std::collections::{BTreeSet, VecDeque};

use compact_str::CompactString;
use serde_json::{json, Value};

use super::*;

const GRACE: u64 = 3_000;
const LEASE: u64 = 8_000;

/// A user id whose home is `shard` of 2.
fn homed_on(shard: usize, tag: &str) -> CompactString {
    homed_on_of(shard, 2, tag)
}

fn homed_on_of(shard: usize, shards: usize, tag: &str) -> CompactString {
    (0..)
        .map(|i| CompactString::from(format!("{tag}{i}")))
        .find(|u| mesh::home_shard(u, shards) == shard)
        .unwrap()
}

fn config(shard: usize, shards: usize, directory: bool) -> PresenceConfig {
    PresenceConfig {
        shard,
        shards,
        grace_ms: GRACE,
        recheck_every_ms: LEASE / 4,
        nodes_share_directory: directory,
    }
}

/// Two (or more) shards' machines, the users with a device on each, and what the effects
/// did.
struct Two {
    m: Vec<PresenceMachine>,
    devices: Vec<BTreeSet<CompactString>>,
    /// Messages between shards wait here, per receiving shard, until `deliver` (None: they
    /// are served at once).
    channels: Option<Vec<VecDeque<Presence>>>,
    /// (shard, connection, frame) written.
    written: Vec<(usize, ConnKey, Value, Wrote)>,
    store: Vec<(usize, StoreOp)>,
    counts: Vec<Count>,
    bad_requests: Vec<ConnKey>,
}

impl Two {
    fn new(directory: bool) -> Two {
        Two::with(2, directory)
    }

    fn with(shards: usize, directory: bool) -> Two {
        Two {
            m: (0..shards)
                .map(|k| PresenceMachine::new(config(k, shards, directory)))
                .collect(),
            devices: vec![BTreeSet::new(); shards],
            channels: None,
            written: Vec::new(),
            store: Vec::new(),
            counts: Vec::new(),
            bad_requests: Vec::new(),
        }
    }

    /// Run `input` on shard `k` and carry every effect (messages to the other machine at once).
    fn on(
        &mut self,
        k: usize,
        input: impl FnOnce(&mut PresenceMachine, DevicesHere) -> Vec<Effect>,
    ) {
        let devices = self.devices[k].clone();
        let here = |u: &str| devices.contains(u);
        let effects = input(&mut self.m[k], &here);
        self.perform(k, effects);
    }

    fn perform(&mut self, k: usize, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Write { conns, frame, why } => {
                    let v: Value = serde_json::from_slice(&frame).unwrap();
                    for c in conns {
                        self.written.push((k, c, v.clone(), why));
                    }
                }
                Effect::BadRequest { conn, .. } => self.bad_requests.push(conn),
                Effect::ApiAnswer { reply, online } => drop(reply.send(online)),
                Effect::Tell { shard, msg } => {
                    assert_ne!(shard, k, "a shard does not message itself");
                    match &mut self.channels {
                        Some(channels) => channels[shard].push_back(msg),
                        None => self.on(shard, |m, here| m.on_mesh(msg, here)),
                    }
                }
                Effect::Store(op) => self.store.push((k, op)),
                Effect::Count(c) => self.counts.push(c),
            }
        }
    }

    /// Shard `k` serves the next message waiting for it.
    fn deliver(&mut self, k: usize) {
        let msg = self.channels.as_mut().unwrap()[k]
            .pop_front()
            .expect("a message waits");
        self.on(k, |m, here| m.on_mesh(msg, here));
    }

    fn frames(&mut self) -> Vec<(usize, ConnKey, Value, Wrote)> {
        std::mem::take(&mut self.written)
    }

    /// A device of `user` (homed on `k`) is the first here or the last gone.
    fn device(&mut self, k: usize, user: &CompactString, online: bool, now: u64) {
        if online {
            self.devices[k].insert(user.clone());
        } else {
            self.devices[k].remove(user);
        }
        self.on(k, |m, _| m.device_here(user, online, now));
    }
}

fn presence(pairs: &[(&CompactString, bool)]) -> Value {
    let online: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(u, on)| (u.to_string(), json!(on)))
        .collect();
    json!({"op": "presence", "online": online})
}

#[test]
fn a_lone_shard_answers_at_once_from_its_devices() {
    let mut m = PresenceMachine::new(config(0, 1, false));
    let here = |u: &str| u == "ann";
    let effects = m.ask(Asker::Conn((3, 9)), vec!["ann".into(), "bob".into()], &here);
    let [Effect::Write { conns, frame, why }] = &effects[..] else {
        panic!("one answer, nothing else");
    };
    assert_eq!((conns.as_slice(), *why), (&[(3, 9)][..], Wrote::Answer));
    let v: Value = serde_json::from_slice(frame).unwrap();
    assert_eq!(
        v,
        json!({"op":"presence","online":{"ann":true,"bob":false}})
    );
    assert!(!m.is_busy());
}

#[test]
fn an_ask_across_shards_waits_for_the_other_home_and_merges() {
    let mut two = Two::new(false);
    let (a, b) = (homed_on(0, "a"), homed_on(1, "b"));
    two.devices[1].insert(b.clone());
    two.on(0, |m, here| {
        m.ask(Asker::Conn((1, 1)), vec![a.clone(), b.clone()], here)
    });
    let frames = two.frames();
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].2, presence(&[(&a, false), (&b, true)]));
    assert_eq!(two.m[0].asks_waiting(), 0, "the slot is freed");
}

#[test]
fn with_a_directory_an_ask_waits_for_it_and_a_refused_store_leaves_this_nodes_answer() {
    let mut two = Two::new(true);
    let a = homed_on(0, "a");
    two.on(0, |m, here| {
        m.ask(Asker::Conn((1, 1)), vec![a.clone()], here)
    });
    assert!(two.frames().is_empty(), "the directory has not answered");
    assert_eq!(two.counts, [Count::DirectoryLookup]);
    let (_, StoreOp::Presence { users, ask }) = two.store.pop().unwrap() else {
        panic!("a directory question");
    };
    // The directory says: online on another node.
    two.on(0, |m, _| {
        m.directory_answered(ask, users, Some(vec![true]), 5)
    });
    assert_eq!(two.frames()[0].2, presence(&[(&a, true)]));
    // A second question meets a full store queue: this node's answer (offline) stands.
    two.on(0, |m, here| {
        m.ask(Asker::Conn((1, 1)), vec![a.clone()], here)
    });
    let (_, op) = two.store.pop().unwrap();
    two.on(0, |m, _| m.store_refused(op, 6));
    assert_eq!(two.frames()[0].2, presence(&[(&a, false)]));
    assert!(!two.m[0].is_busy());
}

#[test]
fn a_watcher_on_another_shard_hears_online_at_once_and_offline_after_the_grace() {
    let mut two = Two::new(false);
    let b = homed_on(1, "b");
    let conn = (4, 2);
    two.on(0, |m, here| m.watch(conn, vec![b.clone()], here));
    assert_eq!(two.frames()[0].2, presence(&[(&b, false)]), "answered now");
    assert_eq!(two.m[1].watched_here(), 1, "registered at the home shard");
    two.device(1, &b, true, 100);
    let told = two.frames();
    assert_eq!(told.len(), 1);
    assert_eq!((told[0].0, told[0].1), (0, conn));
    assert_eq!(
        (&told[0].2, told[0].3),
        (&presence(&[(&b, true)]), Wrote::Change)
    );
    // A quick reconnect is told nothing.
    two.device(1, &b, false, 200);
    two.device(1, &b, true, 300);
    two.on(1, |m, _| m.tick(300 + GRACE));
    assert!(two.frames().is_empty());
    // Gone for good: told once the grace ran out.
    two.device(1, &b, false, 1_000);
    two.on(1, |m, _| m.tick(1_000 + GRACE - 1));
    assert!(two.frames().is_empty());
    two.on(1, |m, _| m.tick(1_000 + GRACE));
    assert_eq!(two.frames()[0].2, presence(&[(&b, false)]));
    // Unwatched: the home forgets the user, and hears nothing more.
    two.on(0, |m, _| m.unwatch(conn.0, std::slice::from_ref(&b)));
    assert_eq!(two.m[1].watched_here(), 0);
    two.device(1, &b, true, 5_000);
    assert!(two.frames().is_empty());
}

#[test]
fn a_closed_watcher_is_unregistered_and_the_bound_is_kept() {
    let mut two = Two::new(false);
    let (a, b) = (homed_on(0, "a"), homed_on(1, "b"));
    two.on(0, |m, here| {
        m.watch((1, 1), vec![a.clone(), b.clone()], here)
    });
    assert_eq!((two.m[0].watched_here(), two.m[1].watched_here()), (1, 1));
    two.on(0, |m, _| m.conn_closed(1));
    assert_eq!((two.m[0].watched_here(), two.m[1].watched_here()), (0, 0));
    assert!(!two.m[0].is_busy() && !two.m[1].is_busy());
    let many: Vec<CompactString> = (0..=MAX_WATCHED_PER_CONN)
        .map(|i| format!("u{i}").into())
        .collect();
    two.frames();
    two.on(0, |m, here| m.watch((2, 1), many, here));
    assert_eq!(two.bad_requests, [(2, 1)]);
    assert_eq!(two.counts, [Count::WatchRefused]);
    assert!(two.frames().is_empty(), "no answer, nothing registered");
    assert_eq!(two.m[1].watched_here(), 0);
}

#[test]
fn with_a_directory_the_home_follows_other_nodes_and_rechecks_them() {
    let mut two = Two::new(true);
    let b = homed_on(1, "b");
    let conn = (7, 1);
    two.on(0, |m, here| m.watch(conn, vec![b.clone()], here));
    // The home subscribed this node to b's changes and asked where else b is.
    let ops: Vec<String> = two
        .store
        .iter()
        .map(|(k, op)| match op {
            StoreOp::WatchPresence { user, on } => format!("{k} watch {user} {on}"),
            StoreOp::Presence { ask, users } if *ask == WATCH_RECHECK_ASK => {
                format!("{k} recheck {users:?}")
            }
            StoreOp::Presence { .. } => format!("{k} ask"),
            _ => "other".into(),
        })
        .collect();
    assert_eq!(
        ops,
        [format!("1 watch {b} true"), format!("1 recheck [{b:?}]")]
    );
    // Answered at once with what b's watchers are told (no device here yet): a `watch`
    // does not wait for the directory; the recheck's news follows as a change.
    assert_eq!(two.frames()[0].2, presence(&[(&b, false)]));
    two.store.clear();
    // The recheck answers: b is on another node.
    two.on(1, |m, _| {
        m.directory_answered(WATCH_RECHECK_ASK, vec![b.clone()], Some(vec![true]), 10)
    });
    assert_eq!(two.frames()[0].2, presence(&[(&b, true)]));
    // A push: b's entry has no run left (no device here either): offline after the grace.
    two.on(1, |m, here| m.directory_changed(&b, 0, 20, here));
    two.on(1, |m, _| m.tick(20 + GRACE));
    assert_eq!(two.frames()[0].2, presence(&[(&b, false)]));
    // A device here and this node's run in the entry is not "elsewhere".
    two.device(1, &b, true, 4_000);
    two.on(1, |m, here| m.directory_changed(&b, 1, 4_001, here));
    assert_eq!(two.frames().len(), 1, "online once (the device), not again");
    // Every quarter lease: the users with no device here are asked about again, and the
    // registration is renewed at once after a resync.
    two.store.clear();
    two.device(1, &b, false, 5_000);
    two.on(1, |m, _| m.tick(6_000));
    let rechecks = |two: &Two| {
        two.store
            .iter()
            .filter(
                |(_, op)| matches!(op, StoreOp::Presence { ask, .. } if *ask == WATCH_RECHECK_ASK),
            )
            .count()
    };
    assert_eq!(rechecks(&two), 1);
    two.on(1, |m, _| m.tick(6_001));
    assert_eq!(rechecks(&two), 1, "not before a quarter lease");
    two.on(1, |m, _| m.tick(6_000 + LEASE / 4));
    assert_eq!(rechecks(&two), 2);
    two.store.clear();
    two.m[1].resync();
    two.on(1, |m, _| m.tick(6_000 + LEASE / 4 + 1));
    let kinds: Vec<bool> = two
        .store
        .iter()
        .map(|(_, op)| matches!(op, StoreOp::WatchPresence { on: true, .. }))
        .collect();
    assert_eq!(kinds, [true, false], "renewed and rechecked at once");
    // The last watcher gone: the node unsubscribes.
    two.store.clear();
    two.on(0, |m, _| m.conn_closed(conn.0));
    assert!(matches!(
        &two.store[..],
        [(1, StoreOp::WatchPresence { on: false, .. })]
    ));
}

#[test]
fn an_api_question_is_answered_on_its_channel() {
    let mut two = Two::new(false);
    let (a, b) = (homed_on(0, "a"), homed_on(1, "b"));
    two.devices[0].insert(a.clone());
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let msg = Presence::Api {
        users: vec![b.clone(), a.clone()],
        reply: tx,
    };
    two.on(0, |m, here| m.on_mesh(msg, here));
    assert_eq!(rx.try_recv().unwrap(), vec![false, true]);
}

/// The simulation's first finding (seed 14727398570297873639): a `watch` of a user already
/// followed was answered from the devices on the home shard (and the directory, which had
/// failed), not from what the watchers were told. The user was online on another node, so
/// no change ever came to correct the answer "offline".
#[test]
fn a_watch_is_answered_with_what_the_watchers_were_told() {
    let mut two = Two::new(true);
    let a = homed_on(0, "a");
    two.on(0, |m, here| m.watch((1, 1), vec![a.clone()], here));
    // The recheck: a is on another node, and the watcher is told.
    two.on(0, |m, _| {
        m.directory_answered(WATCH_RECHECK_ASK, vec![a.clone()], Some(vec![true]), 10)
    });
    assert_eq!(two.frames().last().unwrap().2, presence(&[(&a, true)]));
    // A second `watch` of a by another connection and by the same one: online, with no
    // device of a on this node and no directory question.
    two.store.clear();
    two.on(0, |m, here| m.watch((2, 1), vec![a.clone()], here));
    two.on(0, |m, here| m.watch((1, 1), vec![a.clone()], here));
    let frames = two.frames();
    assert_eq!(frames.len(), 2);
    assert!(frames.iter().all(|f| f.2 == presence(&[(&a, true)])));
    assert!(two.store.is_empty(), "the home's view answers");
}

/// The simulation's second finding (seed 4354685564936845354, then 6181534882423137818 for
/// a first fix that was wrong): an answer that waits for one home shard must not undo what
/// another home told the connection in between. Three shards: the answer to a `watch` of
/// b (home 1) and c (home 2) has b's part, then b comes online (told at once), then c's part
/// comes: the answer says b is online.
#[test]
fn a_watch_answer_that_waited_does_not_undo_a_change_told_meanwhile() {
    let mut three = Two::with(3, false);
    three.channels = Some((0..3).map(|_| VecDeque::new()).collect());
    let (b, c) = (homed_on_of(1, 3, "b"), homed_on_of(2, 3, "c"));
    let conn = (5, 5);
    three.on(0, |m, here| m.watch(conn, vec![b.clone(), c.clone()], here));
    three.deliver(1); // b registered
    three.deliver(1); // b's part (offline) sent back
    three.deliver(0); // ... and heard: the answer still waits for c's part
    assert!(three.frames().is_empty());
    three.device(1, &b, true, 50);
    three.deliver(0); // b came online: told at once
    assert_eq!(three.frames()[0].2, presence(&[(&b, true)]));
    three.deliver(2);
    three.deliver(2);
    three.deliver(0); // c's part: the answer
    let answer = three.frames();
    assert_eq!(answer[0].2, presence(&[(&b, true), (&c, false)]));
    // Changes waiting in the channel ahead of a part of a second `watch`: told in order,
    // and the answer agrees with the last.
    three.device(1, &b, false, 100);
    three.on(1, |m, _| m.tick(100 + GRACE)); // offline told (waits in the channel)
    three.device(1, &b, true, 200 + GRACE); // online again (waits too)
    three.on(0, |m, here| m.watch(conn, vec![b.clone(), c.clone()], here));
    three.deliver(1); // the ask reaches b's home: part "online"
    three.deliver(2);
    for _ in 0..4 {
        three.deliver(0); // offline, online, b's part, c's part
    }
    let told: Vec<Value> = three.frames().into_iter().map(|f| f.2).collect();
    assert_eq!(
        told,
        [
            presence(&[(&b, false)]),
            presence(&[(&b, true)]),
            presence(&[(&b, true), (&c, false)])
        ]
    );
}
