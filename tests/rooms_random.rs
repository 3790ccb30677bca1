//! Randomized rooms test: users on three shards join and leave two rooms, publish, drop their
//! connections and come back, rejoining with `since` = the last offset they saw. After every
//! publish, every current member gets exactly that message next (once, in offset order), and
//! every rejoin replays exactly what the member missed, with `recovered:true` (the history is
//! large enough here). Seeded (`RINGGATE_SEED` replays); prints its counts.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::{json, Value};

const USERS: usize = 9;
const ROOMS: [&str; 2] = ["alpha", "beta"];
const STEPS: usize = 600;

struct User {
    name: String,
    ws: Option<Ws>,
    /// Rooms this connection is in.
    member_of: Vec<&'static str>,
    /// Last offset seen per room (kept across reconnects, like a client would).
    seen: HashMap<&'static str, u64>,
}

#[derive(Default, Debug)]
struct Counts {
    publishes: u64,
    deliveries: u64,
    joins: u64,
    rejoins_with_since: u64,
    replayed: u64,
    leaves: u64,
    drops: u64,
    reconnects: u64,
}

fn offset(v: &Value) -> u64 {
    v["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset in {v}"))
}

#[test]
fn members_get_every_publish_once_in_order_across_joins_leaves_and_drops() {
    let seed = test_seed(0x0dd5_eed5_0000_0007);
    eprintln!("randomized rooms test seed {seed} (set RINGGATE_SEED to replay)");
    let mut rng = Rng(seed);
    let gw = Gateway::start_shards(3, &[]);
    let mut users: Vec<User> = (0..USERS)
        .map(|i| User {
            name: user_on("rr", i % 3, 3) + &format!("x{i}"),
            ws: None,
            member_of: Vec::new(),
            seen: HashMap::new(),
        })
        .collect();
    // Every room's published offsets in order (the test's model of the history).
    let mut published: HashMap<&'static str, Vec<u64>> = HashMap::new();
    let mut c = Counts::default();
    for step in 0..STEPS {
        let u = rng.below(USERS as u64) as usize;
        let room = ROOMS[rng.below(2) as usize];
        if users[u].ws.is_none() {
            users[u].ws = Some(connect_app(&gw, &users[u].name).0);
            c.reconnects += 1;
            continue;
        }
        match rng.below(10) {
            // Join (or rejoin after a drop) with since = the last offset seen, if any.
            0..=2 if !users[u].member_of.contains(&room) => {
                let since = users[u].seen.get(room).copied();
                let mut frame = json!({"op":"join","room":room});
                if let Some(s) = since {
                    frame["since"] = json!(s);
                }
                let ws = users[u].ws.as_mut().unwrap();
                send_text(ws, &frame.to_string());
                let mut replay = Vec::new();
                let joined = loop {
                    let v = recv_json(ws);
                    match v["op"].as_str() {
                        Some("room") => replay.push(offset(&v)),
                        Some("joined") => break v,
                        _ => panic!("step {step}: unexpected {v}"),
                    }
                };
                let all = published.get(room).cloned().unwrap_or_default();
                if let Some(s) = since {
                    let missed: Vec<u64> = all.iter().copied().filter(|o| *o > s).collect();
                    assert_eq!(
                        replay, missed,
                        "step {step}: {} rejoins {room} since {s}",
                        users[u].name
                    );
                    assert_eq!(joined["recovered"], true, "step {step}");
                    c.rejoins_with_since += 1;
                    c.replayed += replay.len() as u64;
                } else {
                    assert!(replay.is_empty());
                }
                let last = offset(&joined);
                if let Some(newest) = all.last() {
                    assert_eq!(last, *newest, "step {step}: joined offset is the newest");
                }
                users[u].seen.insert(room, last);
                users[u].member_of.push(room);
                c.joins += 1;
            }
            3 if users[u].member_of.contains(&room) => {
                let ws = users[u].ws.as_mut().unwrap();
                send_text(ws, &json!({"op":"leave","room":room}).to_string());
                assert_eq!(next_op(ws, "left")["room"], room);
                users[u].member_of.retain(|r| *r != room);
                c.leaves += 1;
            }
            4 => {
                // Abrupt drop: membership ends with the connection.
                users[u].ws = None;
                users[u].member_of.clear();
                c.drops += 1;
            }
            _ => {
                // Publish, then every current member's next frame is this message.
                let cid = format!("s{step}");
                let publisher_is_member = users[u].member_of.contains(&room);
                let ws = users[u].ws.as_mut().unwrap();
                send_text(
                    ws,
                    &json!({"op":"publish","room":room,"cid":cid,"body":step}).to_string(),
                );
                let mut accepted = None;
                let mut own = None;
                while accepted.is_none() || (publisher_is_member && own.is_none()) {
                    let v = recv_json(ws);
                    match v["op"].as_str() {
                        Some("accepted") => accepted = Some(offset(&v)),
                        Some("room") => own = Some(offset(&v)),
                        _ => panic!("step {step}: publisher got {v}"),
                    }
                }
                let o = accepted.unwrap();
                if let Some(prev) = published.get(room).and_then(|p| p.last()) {
                    assert_eq!(o, prev + 1, "step {step}: offsets increase by one");
                }
                published.entry(room).or_default().push(o);
                c.publishes += 1;
                if publisher_is_member {
                    assert_eq!(own, Some(o));
                    users[u].seen.insert(room, o);
                    c.deliveries += 1;
                }
                for (i, other) in users.iter_mut().enumerate() {
                    if i == u || !other.member_of.contains(&room) {
                        continue;
                    }
                    let ws = other.ws.as_mut().unwrap();
                    let m = next_op(ws, "room");
                    assert_eq!(
                        (m["room"].as_str(), offset(&m)),
                        (Some(room), o),
                        "step {step}: {}",
                        other.name
                    );
                    assert_eq!(m["cid"], cid);
                    other.seen.insert(room, o);
                    c.deliveries += 1;
                }
            }
        }
    }
    println!("randomized rooms: seed {seed}, {c:?}");
    assert!(
        c.publishes > 100 && c.rejoins_with_since > 10,
        "the walk exercised little: {c:?}"
    );
}
