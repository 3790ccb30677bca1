//! Two gateway nodes sharing one Redis, under random faults: clients (the crate's client
//! library) send to each other, read, lose their connections and move between the nodes at
//! random; in the end every message was stored once and displayed exactly once, in send order
//! per sender and recipient, whichever nodes the two ends were on. Seeded (`RINGGATE_SEED`).
//! Runs on one `redis-server` and on a Redis Cluster of three primaries.

mod common;

use std::collections::HashMap;
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
    let mut shown: HashMap<(String, String), Vec<i64>> = HashMap::new(); // (from, to) -> bodies
    let (mut sent, mut drops, mut moves, mut cross) = (0u64, 0u64, 0u64, 0u64);
    let mut record = |to: usize, e: Event| {
        if let Event::Message { from, body, .. } = e {
            shown
                .entry((from, format!("r{to}")))
                .or_default()
                .push(body["n"].as_i64().unwrap());
        }
    };
    for _ in 0..1200 {
        let i = rng.below(USERS as u64) as usize;
        match rng.below(100) {
            0..=49 => {
                let to = (i + 1 + rng.below(USERS as u64 - 1) as usize) % USERS;
                sent_counter[i] += 1;
                cross += (on_node[i] != on_node[to]) as u64;
                clients[i]
                    .send(&format!("r{to}"), json!({"n": sent_counter[i]}))
                    .unwrap();
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
    settle_clients(&mut clients, seed, &mut record);
    let displayed = check_displayed_once_in_order(&shown, sent, seed);
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
         displayed {displayed}, pushed between nodes {pushed}, connection drops {drops}, node moves {moves}"
    );
}
