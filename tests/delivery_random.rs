//! Randomized end-to-end test of the delivery promise: many senders and recipients on two
//! shards, random sends, random partial acks, abrupt disconnects and reconnects, resends by
//! cid after reconnect (as a correct client does). At the end every accepted message has been
//! displayed exactly once by its recipient, in send order per sender. Seeded; prints its counts.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[derive(Default)]
struct Counts {
    sent: u64,
    resent: u64,
    accepted: u64,
    displayed: u64,
    duplicates_dropped: u64,
    reconnects: u64,
    disconnects: u64,
    unavailable: u64,
}

struct Client {
    user: String,
    ws: Option<Ws>,
    next_cid: u64,
    /// Sent and not yet accepted: resent with the same cid after a reconnect.
    unaccepted: BTreeMap<u64, (usize, i64)>,
    accepted: HashSet<u64>,
    /// What this user displayed, per sender, in display order.
    shown: HashMap<String, Vec<u64>>,
    shown_set: HashSet<(String, u64)>,
}

fn cid_num(v: &Value) -> u64 {
    v["cid"]
        .as_str()
        .unwrap()
        .trim_start_matches('c')
        .parse()
        .unwrap()
}

impl Client {
    fn connect(&mut self, gw: &Gateway, counts: &mut Counts) {
        let ws = connect(gw, &format!("/ws?user={}", self.user));
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(2)))
            .unwrap();
        self.ws = Some(ws);
        counts.reconnects += 1;
        // A correct client resends, in order, what was never accepted.
        let pending: Vec<(u64, (usize, i64))> =
            self.unaccepted.iter().map(|(k, v)| (*k, *v)).collect();
        for (cid, (_, body)) in pending {
            let to = self.unaccepted[&cid].0;
            self.send_raw(to, cid, body);
            counts.resent += 1;
        }
    }

    fn send_raw(&mut self, to: usize, cid: u64, body: i64) {
        let frame = json!({"op":"send","to":format!("r{to}"),"cid":format!("c{cid}"),"body":body});
        if let Some(ws) = self.ws.as_mut() {
            if ws
                .send(tungstenite::Message::text(frame.to_string()))
                .is_err()
            {
                self.ws = None;
            }
        }
    }

    /// Read what is there; display msgs (dropping duplicates by (from, cid)), ack some.
    fn poll(&mut self, rng: &mut Rng, counts: &mut Counts, ack_all: bool) -> usize {
        let mut frames = 0;
        loop {
            let Some(ws) = self.ws.as_mut() else {
                return frames;
            };
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    frames += 1;
                    let v: Value = serde_json::from_str(&t).unwrap();
                    match v["op"].as_str().unwrap() {
                        "accepted" => {
                            let c = cid_num(&v);
                            if self.unaccepted.remove(&c).is_some() {
                                counts.accepted += 1;
                            }
                            self.accepted.insert(c);
                        }
                        "msg" => {
                            let from = v["from"].as_str().unwrap().to_string();
                            let c = cid_num(&v);
                            if self.shown_set.insert((from.clone(), c)) {
                                self.shown.entry(from).or_default().push(c);
                                counts.displayed += 1;
                            } else {
                                counts.duplicates_dropped += 1;
                            }
                            if ack_all || rng.below(10) < 8 {
                                let seq = v["seq"].as_u64().unwrap();
                                let _ = ws.send(tungstenite::Message::text(
                                    json!({"op":"ack","seq":seq}).to_string(),
                                ));
                            }
                        }
                        "error" => {
                            assert_eq!(v["code"], "unavailable", "{v}");
                            counts.unavailable += 1;
                        }
                        "welcome" | "synced" | "delivered" | "pong" => {}
                        other => panic!("unexpected op {other}"),
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    let _ = ws.flush();
                    return frames;
                }
                Err(_) => {
                    self.ws = None;
                    return frames;
                }
            }
        }
    }
}

#[test]
fn every_accepted_message_is_displayed_exactly_once_in_order_per_sender() {
    let seed = test_seed(0x5eed_1234_abcd_0001u64);
    eprintln!("randomized delivery test seed {seed} (set RINGGATE_SEED to replay)");
    let mut rng = Rng(seed);
    let gw = Gateway::start(&["--window", "8", "--ack-timeout-ms", "200"]);
    const USERS: usize = 8;
    let mut counts = Counts::default();
    let mut clients: Vec<Client> = (0..USERS)
        .map(|i| Client {
            user: format!("r{i}"),
            ws: None,
            next_cid: 0,
            unaccepted: BTreeMap::new(),
            accepted: HashSet::new(),
            shown: HashMap::new(),
            shown_set: HashSet::new(),
        })
        .collect();
    for c in clients.iter_mut() {
        c.connect(&gw, &mut counts);
    }
    let started = Instant::now();
    for _step in 0..3000 {
        let i = rng.below(USERS as u64) as usize;
        let roll = rng.below(100);
        let client = &mut clients[i];
        if client.ws.is_none() {
            if roll < 50 {
                client.connect(&gw, &mut counts);
            }
            continue;
        }
        match roll {
            0..=54 => {
                let to = (i + 1 + rng.below(USERS as u64 - 1) as usize) % USERS;
                client.next_cid += 1;
                let cid = client.next_cid;
                let body = rng.below(1_000_000) as i64;
                client.unaccepted.insert(cid, (to, body));
                client.send_raw(to, cid, body);
                counts.sent += 1;
            }
            55..=93 => {
                client.poll(&mut rng, &mut counts, false);
            }
            _ => {
                client.ws = None; // abrupt: the socket is dropped mid-stream
                counts.disconnects += 1;
            }
        }
    }
    // Settle: everyone online, everything resent, read and ack until quiet.
    for c in clients.iter_mut().filter(|c| c.ws.is_none()) {
        c.connect(&gw, &mut counts);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_rounds = 0;
    while quiet_rounds < 50 && Instant::now() < deadline {
        let mut frames = 0;
        for c in clients.iter_mut() {
            if c.ws.is_none() {
                c.connect(&gw, &mut counts);
            }
            frames += c.poll(&mut rng, &mut counts, true);
        }
        let waiting: usize = clients.iter().map(|c| c.unaccepted.len()).sum();
        if frames == 0 && waiting == 0 {
            quiet_rounds += 1;
        } else {
            quiet_rounds = 0;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let waiting: usize = clients.iter().map(|c| c.unaccepted.len()).sum();
    assert_eq!(
        waiting, 0,
        "every send was eventually accepted (seed {seed})"
    );
    // Exactly once, in order, for every accepted message.
    for (s, sender) in clients.iter().enumerate() {
        let mut by_recipient: HashMap<String, Vec<u64>> = HashMap::new();
        for cid in sender.accepted.iter() {
            // Recover the recipient from what was displayed (each cid went to one user).
            let holder = clients
                .iter()
                .filter(|r| r.shown_set.contains(&(sender.user.clone(), *cid)))
                .count();
            assert_eq!(
                holder, 1,
                "sender r{s} cid c{cid} displayed by {holder} users (seed {seed})"
            );
        }
        for r in clients.iter() {
            if let Some(order) = r.shown.get(&sender.user) {
                let mut sorted = order.clone();
                sorted.sort();
                assert_eq!(order, &sorted, "order r{s} -> {} (seed {seed})", r.user);
                by_recipient.insert(r.user.clone(), order.clone());
            }
        }
        let displayed: usize = by_recipient.values().map(Vec::len).sum();
        assert_eq!(
            displayed,
            sender.accepted.len(),
            "sender r{s}: accepted vs displayed (seed {seed})"
        );
    }
    // Server-side dedup: each message was stored once, however often it was resent.
    assert_eq!(
        gw.metric_sum("ringgate_stored_total"),
        counts.accepted,
        "stored once per accepted message (seed {seed})"
    );
    eprintln!(
        "randomized delivery: {} users, sent {}, resent after reconnect {}, accepted {}, displayed {}, \
         duplicates dropped by clients {}, disconnects {}, reconnects {}, unavailable {}, {:.1} s",
        USERS,
        counts.sent,
        counts.resent,
        counts.accepted,
        counts.displayed,
        counts.duplicates_dropped,
        counts.disconnects,
        counts.reconnects,
        counts.unavailable,
        started.elapsed().as_secs_f64()
    );
}
