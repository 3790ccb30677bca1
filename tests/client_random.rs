//! The client library under random faults: clients send, read and lose their connections at
//! random; in the end every message was accepted and displayed exactly once, in send order per
//! sender, using only `ringgate::client` (its resend-by-cid and display dedup). Seeded.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use ringgate::client::{Client, ClientConfig, Event};
use serde_json::json;

#[test]
fn the_client_library_displays_every_message_once_in_order_under_random_disconnects() {
    let seed: u64 = std::env::var("RINGGATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xc11e_47ab_0000_0042);
    eprintln!("client randomized test seed {seed} (set RINGGATE_SEED to replay)");
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let gw = Gateway::start(&["--ack-timeout-ms", "300"]);
    const USERS: usize = 6;
    let mut clients: Vec<Client> = (0..USERS)
        .map(|i| Client::connect(ClientConfig::dev(&gw.url("/ws"), &format!("k{i}"))).unwrap())
        .collect();
    // Per sender: the body counter, so displays can be checked for order.
    let mut sent_counter = [0i64; USERS];
    let mut shown: HashMap<(String, String), Vec<i64>> = HashMap::new(); // (from, to) -> bodies
    let (mut sent, mut drops) = (0u64, 0u64);
    let mut record = |to: usize, e: Event| {
        if let Event::Message { from, body, .. } = e {
            shown
                .entry((from, format!("k{to}")))
                .or_default()
                .push(body["n"].as_i64().unwrap());
        }
    };
    for _ in 0..1500 {
        let i = next(USERS as u64) as usize;
        match next(100) {
            0..=49 => {
                let to = (i + 1 + next(USERS as u64 - 1) as usize) % USERS;
                sent_counter[i] += 1;
                clients[i]
                    .send(&format!("k{to}"), json!({"n": sent_counter[i], "to": to}))
                    .unwrap();
                sent += 1;
            }
            50..=94 => {
                while let Some(e) = clients[i].poll(Duration::from_millis(2)).unwrap() {
                    record(i, e);
                }
            }
            _ => {
                clients[i].drop_connection();
                drops += 1;
            }
        }
    }
    // Settle: poll everyone until nothing is pending and everything is quiet.
    settle_clients(&mut clients, seed, &mut record);
    let displayed = check_displayed_once_in_order(&shown, sent, seed);
    assert_eq!(
        gw.metric_sum("ringgate_stored_total"),
        sent,
        "stored once each (seed {seed})"
    );
    eprintln!("client randomized: {USERS} users, sent {sent}, displayed {displayed}, connection drops {drops}");
}
