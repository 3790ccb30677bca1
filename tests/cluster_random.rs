//! Two gateway nodes sharing one Redis, under random faults: clients (the crate's client
//! library) send to each other, read, lose their connections and move between the nodes at
//! random; in the end every message was stored once and displayed exactly once, per sender and
//! recipient in the order the sender was told `accepted` (SPEC section 4; a send refused with
//! `unavailable` is resent later and may be accepted after newer ones), whichever nodes the
//! two ends were on. Seeded (`RINGGATE_SEED`).
//! Runs on one `redis-server` and on a Redis Cluster of three primaries.

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use common::*;
use ringgate::client::{Client, ClientConfig, Event};
use serde_json::json;

fn node(redis: &RedisServer, id: &str) -> Gateway {
    let url = redis.url();
    Gateway::start_shards(
        2,
        &[
            "--redis-url",
            &url,
            "--node-id",
            id,
            "--node-lease-ms",
            "900",
            "--ack-timeout-ms",
            "300",
            // Bursts of thousands of sends and reconnects on purpose: these runs are about the
            // store and the nodes, so the rate limits are off (tests/limits.rs has those).
            "--user-send-rate",
            "0",
            "--conn-frame-rate",
            "0",
            "--ip-connect-rate",
            "0",
        ],
    )
}

#[test]
fn clients_moving_between_nodes_see_every_message_once_in_order() {
    clients_move_between_nodes(RedisServer::start(), "one redis-server");
}

#[test]
fn on_a_redis_cluster_clients_moving_between_nodes_see_every_message_once_in_order() {
    clients_move_between_nodes(RedisServer::start_cluster(), "a Redis Cluster of 3");
}

fn clients_move_between_nodes(redis: RedisServer, store: &str) {
    let seed = test_seed(0xc105_7e40_0000_0007);
    eprintln!("cluster randomized test on {store}, seed {seed} (set RINGGATE_SEED to replay)");
    let mut rng = Rng(seed);
    let nodes = [node(&redis, "a"), node(&redis, "b")];
    let urls: Vec<String> = nodes.iter().map(|n| n.url("/ws")).collect();
    const USERS: usize = 6;
    let mut on_node: Vec<usize> = (0..USERS).map(|i| i % 2).collect();
    let mut clients: Vec<Client> = (0..USERS)
        .map(|i| Client::connect(ClientConfig::dev(&urls[on_node[i]], &format!("r{i}"))).unwrap())
        .collect();
    let mut sent_counter = [0i64; USERS];
    let ledger = std::cell::RefCell::new(Ledger::default());
    let (mut sent, mut drops, mut moves, mut cross) = (0u64, 0u64, 0u64, 0u64);
    let record = |me: usize, e: Event| ledger.borrow_mut().record(&format!("r{me}"), e);
    for _ in 0..1200 {
        let i = rng.below(USERS as u64) as usize;
        match rng.below(100) {
            0..=49 => {
                let to = (i + 1 + rng.below(USERS as u64 - 1) as usize) % USERS;
                sent_counter[i] += 1;
                cross += (on_node[i] != on_node[to]) as u64;
                let cid = clients[i]
                    .send(&format!("r{to}"), json!({"n": sent_counter[i]}))
                    .unwrap();
                ledger
                    .borrow_mut()
                    .sent(&format!("r{i}"), cid, sent_counter[i]);
                sent += 1;
            }
            50..=93 => {
                while let Some(e) = clients[i].poll(Duration::from_millis(2)).unwrap() {
                    record(i, e);
                }
            }
            94..=96 => {
                clients[i].drop_connection();
                drops += 1;
            }
            _ => {
                on_node[i] = 1 - on_node[i];
                clients[i].switch_url(&urls[on_node[i]]);
                moves += 1;
            }
        }
    }
    settle_clients(&mut clients, seed, record);
    let (displayed, reordered) = ledger.borrow().check(seed);
    let stored: u64 = nodes
        .iter()
        .map(|n| n.metric_sum("ringgate_stored_total"))
        .sum();
    assert_eq!(stored, sent, "stored once each (seed {seed})");
    let pushed: u64 = nodes
        .iter()
        .map(|n| n.metric_sum("ringgate_cross_node_out_total"))
        .sum();
    eprintln!(
        "cluster randomized: {USERS} users on 2 nodes, sent {sent} ({cross} to a user last seen on the other node), \
         displayed {displayed} ({reordered} accepted out of send order), pushed between nodes {pushed}, \
         connection drops {drops}, node moves {moves}"
    );
}

/// Slots move between primaries (`redis-cli --cluster reshard`, keys migrated one by one)
/// while senders spill to offline users whose inboxes live in those slots: a call that meets a
/// moving slot fails as a whole and its senders resend (the client library does), a call that
/// wrote part of its work before failing is answered on resend by the dedup window; in the
/// end every message is displayed exactly once, in the order its sender was told `accepted` (a
/// refused send is resent by the client after a backoff, so it may land after newer ones).
#[test]
fn on_a_redis_cluster_slots_moving_under_load_lose_and_repeat_nothing() {
    let seed = test_seed(0x5107_5000_0000_0003);
    let mut rng = Rng(seed);
    let redis = RedisServer::start_cluster();
    let gw = node(&redis, "a");
    let url = gw.url("/ws");
    const SENDERS: usize = 3;
    const RECIPIENTS: usize = 40;
    let mut senders: Vec<Client> = (0..SENDERS)
        .map(|i| Client::connect(ClientConfig::dev(&url, &format!("s{i}"))).unwrap())
        .collect();
    // Keys already there, so the reshard migrates inboxes and dedup windows. Each sender's
    // counter goes up over the whole test: the ledger checks display order against acceptance.
    let ledger = std::cell::RefCell::new(Ledger::default());
    let record = |who: String, e: Event| ledger.borrow_mut().record(&who, e);
    let mut counters = [0i64; SENDERS];
    for (i, s) in senders.iter_mut().enumerate() {
        for r in 0..RECIPIENTS {
            counters[i] += 1;
            let cid = s.send(&format!("t{r}"), json!({"n": counters[i]})).unwrap();
            ledger.borrow_mut().sent(&format!("s{i}"), cid, counters[i]);
        }
    }
    settle_clients(&mut senders, seed, |i, e| record(format!("s{i}"), e));
    let before = redis.keys_per_server();
    let reshard = std::thread::scope(|scope| {
        let mover = scope.spawn(|| redis.move_slots(3000));
        let mut sent = SENDERS as u64 * RECIPIENTS as u64;
        while !mover.is_finished() && sent < 20_000 {
            let i = rng.below(SENDERS as u64) as usize;
            let to = rng.below(RECIPIENTS as u64);
            counters[i] += 1;
            let cid = senders[i]
                .send(&format!("t{to}"), json!({"n": counters[i]}))
                .unwrap();
            ledger.borrow_mut().sent(&format!("s{i}"), cid, counters[i]);
            sent += 1;
            while let Some(e) = senders[i].poll(Duration::from_millis(1)).unwrap() {
                record(format!("s{i}"), e);
            }
        }
        mover.join().unwrap();
        sent
    });
    settle_clients(&mut senders, seed, |i, e| record(format!("s{i}"), e));
    let after = redis.keys_per_server();
    assert!(
        after[0] < before[0] && after[1] > before[1],
        "keys moved from the first primary to the second: {before:?} -> {after:?}"
    );
    let unavailable = gw.metric_sum("ringgate_redis_errors_total");
    // Every recipient connects and displays what it was sent.
    let mut recipients: Vec<Client> = (0..RECIPIENTS)
        .map(|r| Client::connect(ClientConfig::dev(&url, &format!("t{r}"))).unwrap())
        .collect();
    settle_clients(&mut recipients, seed, |r, e| record(format!("t{r}"), e));
    // Exactly once each, in the order each sender was told `accepted` (a send refused during
    // the move is resent after a backoff and may be accepted after newer ones).
    let (displayed, reordered) = ledger.borrow().check(seed);
    assert_eq!(
        displayed, reshard,
        "every sent message displayed (seed {seed})"
    );
    eprintln!(
        "cluster reshard: 3000 slots moved while {SENDERS} senders sent {reshard} to {RECIPIENTS} offline users; \
         displayed {displayed} once each ({reordered} accepted out of send order); keys per primary {before:?} -> {after:?}; \
         Redis errors on the way {unavailable}"
    );
}
