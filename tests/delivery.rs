//! Reliable 1:1 delivery over real sockets (SPEC sections 3 and 4): send -> accepted (safe in
//! the store) -> msg on every device -> ack -> delivered; offline inbox replay; dedup by cid;
//! retransmits then close; window; inbox cap. The gateway runs 2 shards and users are chosen so
//! that sender and recipient share a home shard or not, as each test needs.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SHARDS: usize = 2;

fn gateway(extra: &[&str]) -> Gateway {
    Gateway::start_shards(SHARDS, extra)
}

fn user_on(prefix: &str, shard: usize) -> String {
    common::user_on(prefix, shard, SHARDS)
}

fn online_pair(shard_a: usize, shard_b: usize) {
    let gw = gateway(&[]);
    let alice = user_on("alice", shard_a);
    let bob = user_on("bob", shard_b);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    let (mut b, _) = connect_replay(&gw, &format!("/ws?user={bob}"));
    send(&mut a, &bob, "c-1", json!({"text":"hi"}));
    let accepted = next_op(&mut a, "accepted");
    assert_eq!(accepted["cid"], "c-1");
    let id = accepted["id"].clone();
    let msg = next_op(&mut b, "msg");
    assert_eq!(msg["seq"], 1);
    assert_eq!(
        gw.metric_sum("ringgate_acks_pending"),
        1,
        "sent, not yet acked"
    );
    assert_eq!(msg["id"], id);
    assert_eq!(msg["from"], alice.as_str());
    assert_eq!(msg["cid"], "c-1");
    assert_eq!(msg["body"], json!({"text":"hi"}));
    assert!(msg["ts"].as_u64().unwrap() > 1_600_000_000_000);
    ack(&mut b, 1);
    let delivered = next_op(&mut a, "delivered");
    assert_eq!(
        delivered,
        json!({"op":"delivered","cid":"c-1","id":id,"to":bob})
    );
    assert_eq!(gw.metric_sum("ringgate_acks_pending"), 0);
}

#[test]
fn online_delivery_on_the_same_shard() {
    online_pair(0, 0);
}

#[test]
fn online_delivery_across_shards() {
    online_pair(0, 1);
    online_pair(1, 0);
}

#[test]
fn offline_recipient_gets_the_inbox_on_connect_in_order() {
    let gw = gateway(&[]);
    let alice = user_on("alice", 0);
    let carol = user_on("carol", 1);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    for i in 0..5 {
        send(&mut a, &carol, &format!("c{i}"), json!(i));
        assert_eq!(next_op(&mut a, "accepted")["cid"], format!("c{i}"));
    }
    let (mut c, msgs) = connect_replay(&gw, &format!("/ws?user={carol}"));
    let bodies: Vec<i64> = msgs.iter().map(|m| m["body"].as_i64().unwrap()).collect();
    assert_eq!(bodies, [0, 1, 2, 3, 4]);
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    ack(&mut c, 5); // cumulative
    for i in 0..5 {
        assert_eq!(next_op(&mut a, "delivered")["cid"], format!("c{i}"));
    }
    // Every accepted went through the latency histogram.
    assert_eq!(gw.metric_sum("ringgate_send_accepted_seconds_count"), 5);
    // Acked entries are gone: a new connection replays nothing.
    drop(c);
    let (_c2, again) = connect_replay(&gw, &format!("/ws?user={carol}"));
    assert!(again.is_empty());
}

#[test]
fn unacked_messages_are_replayed_after_a_reconnect_without_gaps() {
    let gw = gateway(&[]);
    let alice = user_on("alice", 1);
    let bob = user_on("bob", 0);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    let (mut b, _) = connect_replay(&gw, &format!("/ws?user={bob}"));
    for i in 0..10 {
        send(&mut a, &bob, &format!("m{i}"), json!(i));
    }
    let first: Vec<Value> = (0..10).map(|_| next_op(&mut b, "msg")).collect();
    ack(&mut b, 4); // the first four are done
    std::thread::sleep(Duration::from_millis(100));
    drop(b); // six unacked
    let (_b2, replay) = connect_replay(&gw, &format!("/ws?user={bob}"));
    let bodies: Vec<i64> = replay.iter().map(|m| m["body"].as_i64().unwrap()).collect();
    assert_eq!(
        bodies,
        [4, 5, 6, 7, 8, 9],
        "the unacked, in order, once each"
    );
    // Same ids as the first time: the client can drop what it already showed.
    assert_eq!(replay[0]["id"], first[4]["id"]);
}

#[test]
fn a_resent_cid_is_accepted_again_with_the_same_id_and_delivered_once() {
    let gw = gateway(&[]);
    let alice = user_on("alice", 0);
    let bob = user_on("bob", 1);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    send(&mut a, &bob, "dup", json!("once"));
    let id = next_op(&mut a, "accepted")["id"].clone();
    // The sender reconnects and resends the same cid.
    drop(a);
    let (mut a2, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    send(&mut a2, &bob, "dup", json!("once"));
    assert_eq!(next_op(&mut a2, "accepted")["id"], id);
    let (_b, msgs) = connect_replay(&gw, &format!("/ws?user={bob}"));
    assert_eq!(msgs.len(), 1, "one message, not two: {msgs:?}");
    assert!(gw.metric_sum("ringgate_dedup_hits_total") >= 1);
}

#[test]
fn delivered_waits_for_the_recipients_ack() {
    let gw = gateway(&[]);
    let alice = user_on("alice", 0);
    let bob = user_on("bob", 0);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    let (mut b, _) = connect_replay(&gw, &format!("/ws?user={bob}"));
    send(&mut a, &bob, "hold", json!(1));
    next_op(&mut a, "accepted");
    next_op(&mut b, "msg");
    // Bob holds his ack: alice must not hear `delivered`.
    a.get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    match a.read() {
        Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("nothing may arrive before the ack, got {other:?}"),
    }
    a.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    ack(&mut b, 1);
    assert_eq!(next_op(&mut a, "delivered")["cid"], "hold");
}

#[test]
fn every_device_gets_the_message_and_one_ack_makes_it_delivered() {
    let gw = gateway(&[]);
    let alice = user_on("alice", 1);
    let bob = user_on("bob", 0);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    let (mut phone, _) = connect_replay(&gw, &format!("/ws?user={bob}&device=phone"));
    let (mut laptop, _) = connect_replay(&gw, &format!("/ws?user={bob}&device=laptop"));
    send(&mut a, &bob, "md", json!("both"));
    next_op(&mut a, "accepted");
    let m1 = next_op(&mut phone, "msg");
    let m2 = next_op(&mut laptop, "msg");
    assert_eq!(m1["id"], m2["id"]);
    ack(&mut phone, 1);
    ack(&mut laptop, 1);
    assert_eq!(next_op(&mut a, "delivered")["cid"], "md");
    // Exactly one delivered.
    a.get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        matches!(a.read(), Err(tungstenite::Error::Io(_))),
        "one delivered only"
    );
    assert_eq!(gw.metric_sum("ringgate_delivered_total"), 1);
}

/// `welcome` tells clients `max_frame` (SPEC 2): a send whose `msg` frame would be longer is
/// refused `too_large` with its cid, nothing accepted, nothing sent. The same for a publish's
/// `room` frame and for `POST /api/send` (413). Before, a 65,536-byte send was accepted and
/// its recipient got a 65,590-byte frame (found by an acceptance tester).
#[test]
fn a_message_whose_frame_would_pass_max_frame_is_refused_too_large() {
    const MAX: usize = 1024;
    let gw = gateway(&["--max-frame", "1024", "--api-key", "too-large-api-key-0123"]);
    let alice = user_on("alice", 1);
    let bob = user_on("bob", 0);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    let (mut b, _) = connect_replay(&gw, &format!("/ws?user={bob}"));
    // The send frame fits in 1,024 bytes; the msg frame (seq, id, from, ts) would not.
    let big = "x".repeat(MAX - 80 - bob.len());
    let frame = json!({"op":"send","to":bob,"cid":"big","body":big}).to_string();
    assert!(frame.len() <= MAX, "{}", frame.len());
    send_text(&mut a, &frame);
    let e = next_op(&mut a, "error");
    assert_eq!(
        (e["code"].as_str(), e["cid"].as_str()),
        (Some("too_large"), Some("big")),
        "{e}"
    );
    let fits = "y".repeat(MAX - 300);
    send(&mut a, &bob, "fits", json!(fits));
    assert_eq!(next_op(&mut a, "accepted")["cid"], "fits");
    let m = next_op(&mut b, "msg");
    assert_eq!(m["cid"], "fits", "the refused one was never sent");
    assert!(m.to_string().len() <= MAX);
    // A publish: the room frame adds the room and its offset.
    join(&mut a, "r", None);
    let frame = json!({"op":"publish","room":"r","cid":"pbig","body":big}).to_string();
    assert!(frame.len() <= MAX);
    send_text(&mut a, &frame);
    let e = next_op(&mut a, "error");
    assert_eq!(
        (e["code"].as_str(), e["cid"].as_str()),
        (Some("too_large"), Some("pbig")),
        "{e}"
    );
    let body = json!({"to":bob,"body":big}).to_string();
    assert!(body.len() <= MAX);
    let (status, answer) = post_json(&gw, "/api/send", &body, "too-large-api-key-0123");
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().starts_with("too_large"),
        "{answer}"
    );
}

/// SPEC section 2: each device gets every message. The laptop acks at once, which removes each
/// entry from the inbox; the phone's window (2) is full until it acks. It must still get all
/// six, in order, once it acks (before, it got the first two and nothing more).
#[test]
fn a_device_with_a_full_window_gets_what_another_device_acked_first() {
    let gw = gateway(&["--window", "2"]);
    let alice = user_on("alice", 1);
    let bob = user_on("bob", 0);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    let (mut phone, _) = connect_replay(&gw, &format!("/ws?user={bob}&device=phone"));
    let (mut laptop, _) = connect_replay(&gw, &format!("/ws?user={bob}&device=laptop"));
    let cids: Vec<String> = (1..=6).map(|i| format!("w{i}")).collect();
    for cid in &cids {
        send(&mut a, &bob, cid, json!(cid));
        assert_eq!(next_op(&mut a, "accepted")["cid"], cid.as_str());
    }
    for seq in 1..=6 {
        let m = next_op(&mut laptop, "msg");
        assert_eq!(
            (m["seq"].as_u64(), m["cid"].as_str()),
            (Some(seq), Some(cids[seq as usize - 1].as_str()))
        );
        ack(&mut laptop, seq);
    }
    for _ in &cids {
        next_op(&mut a, "delivered");
    }
    let mut got = Vec::new();
    while got.len() < cids.len() {
        let m = next_op(&mut phone, "msg");
        got.push(m["cid"].as_str().unwrap().to_string());
        ack(&mut phone, m["seq"].as_u64().unwrap());
    }
    assert_eq!(got, cids, "the phone gets every message, in order");
    assert_eq!(
        gw.metric_sum("ringgate_delivered_total"),
        6,
        "one delivered each"
    );
}

#[test]
fn a_recipient_that_never_acks_gets_three_retransmits_then_is_closed_and_keeps_its_inbox() {
    let gw = gateway(&["--ack-timeout-ms", "100"]);
    let alice = user_on("alice", 0);
    let bob = user_on("bob", 1);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    let mut b = RawWs::connect(gw.public, &format!("/ws?user={bob}"));
    assert_eq!(b.recv_json()["op"], "welcome");
    assert_eq!(b.recv_json()["op"], "synced");
    send(&mut a, &bob, "lost", json!("again"));
    next_op(&mut a, "accepted");
    let (before, close) = b.until_close();
    let mut copies = 0;
    for f in before.iter().filter(|f| f.opcode == 1) {
        let v: Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(
            (v["op"].as_str(), v["seq"].as_u64()),
            (Some("msg"), Some(1))
        );
        copies += 1;
    }
    assert_eq!(copies, 4, "the first send and 3 retransmits, same seq");
    assert_eq!(close.close_code(), Some(1011));
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_ack_timeouts_total")
        == 1));
    assert_eq!(gw.metric_sum("ringgate_retransmits_total"), 3);
    let (_b2, replay) = connect_replay(&gw, &format!("/ws?user={bob}"));
    assert_eq!(replay.len(), 1, "still in the inbox");
}

#[test]
fn a_full_window_waits_for_acks_and_keeps_order() {
    let gw = gateway(&["--window", "2"]);
    let alice = user_on("alice", 0);
    let bob = user_on("bob", 1);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    let (mut b, _) = connect_replay(&gw, &format!("/ws?user={bob}"));
    for i in 0..5 {
        send(&mut a, &bob, &format!("w{i}"), json!(i));
        next_op(&mut a, "accepted");
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        let m1 = next_op(&mut b, "msg");
        got.push(m1["body"].as_i64().unwrap());
        // Never more than the window in flight: ack after every second message.
        if got.len() % 2 == 0 || got.len() == 5 {
            ack(&mut b, m1["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);
    assert!(gw.metric_sum("ringgate_window_full_total") >= 1);
}

#[test]
fn a_full_inbox_refuses_with_unavailable_and_loses_nothing_accepted() {
    let gw = gateway(&["--inbox-max-messages", "3"]);
    let alice = user_on("alice", 0);
    let dave = user_on("dave", 1);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    for i in 0..3 {
        send(&mut a, &dave, &format!("f{i}"), json!(i));
        next_op(&mut a, "accepted");
    }
    send(&mut a, &dave, "f3", json!(3));
    let err = next_op(&mut a, "error");
    assert_eq!(
        (err["code"].as_str(), err["cid"].as_str()),
        (Some("unavailable"), Some("f3"))
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("is full (3 messages)"),
        "{err}"
    );
    // Counted once, by where the refusal came from (dave's home shard is 1, alice's is 0:
    // the sender's shard answers and counts).
    assert_eq!(
        gw.metric("ringgate_sends_refused_total{shard=\"0\",source=\"store\"}"),
        1
    );
    assert_eq!(gw.metric_sum("ringgate_sends_refused_total"), 1);
    let (mut d, msgs) = connect_replay(&gw, &format!("/ws?user={dave}"));
    assert_eq!(msgs.len(), 3);
    ack(&mut d, 3);
    // Room again: the same cid is now accepted (it was never taken).
    std::thread::sleep(Duration::from_millis(100));
    send(&mut a, &dave, "f3", json!(3));
    let got = loop {
        let v = recv_json(&mut a);
        if v["op"] == "accepted" {
            break v;
        }
    };
    assert_eq!(got["cid"], "f3");
}

#[test]
fn bad_sends_and_acks_get_errors_and_nothing_is_accepted() {
    let gw = gateway(&[]);
    let (mut a, _) = connect_replay(&gw, "/ws?user=erin");
    send_text(&mut a, r#"{"op":"send","to":"x","body":1}"#);
    assert_eq!(next_op(&mut a, "error")["code"], "bad_request");
    send_text(&mut a, r#"{"op":"send","to":7,"cid":"k","body":1}"#);
    let e = next_op(&mut a, "error");
    assert_eq!(
        (e["code"].as_str(), e["cid"].as_str()),
        (Some("bad_request"), Some("k"))
    );
    send_text(&mut a, r#"{"op":"ack","seq":5}"#);
    assert_eq!(next_op(&mut a, "error")["code"], "bad_request");
    assert_eq!(gw.metric_sum("ringgate_stored_total"), 0);
    send_text(&mut a, r#"{"op":"ping"}"#);
    assert_eq!(next_op(&mut a, "pong")["op"], "pong");
}

#[test]
fn inbox_entries_expire_by_age_and_are_counted() {
    let gw = gateway(&["--inbox-max-age-ms", "200"]);
    let alice = user_on("alice", 0);
    let bob = user_on("bob", 1);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    send(&mut a, &bob, "old", json!(1));
    next_op(&mut a, "accepted");
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_inbox_expired_total")
        == 1));
    let (_b, msgs) = connect_replay(&gw, &format!("/ws?user={bob}"));
    assert!(msgs.is_empty());
}

#[test]
fn a_replay_longer_than_the_window_counts_every_message_in_synced() {
    let gw = gateway(&["--window", "3"]);
    let alice = user_on("alice", 0);
    let bob = user_on("bob", 1);
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    for i in 0..7 {
        send(&mut a, &bob, &format!("r{i}"), json!(i));
        next_op(&mut a, "accepted");
    }
    let mut b = connect(&gw, &format!("/ws?user={bob}"));
    assert_eq!(recv_json(&mut b)["op"], "welcome");
    let mut bodies = Vec::new();
    let synced = loop {
        let v = recv_json(&mut b);
        match v["op"].as_str().unwrap() {
            "msg" => {
                bodies.push(v["body"].as_i64().unwrap());
                let seq = v["seq"].as_u64().unwrap();
                if seq.is_multiple_of(3) {
                    ack(&mut b, seq); // the window refills only after acks
                }
            }
            "synced" => break v,
            other => panic!("{other}"),
        }
    };
    assert_eq!(bodies, [0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(synced["count"], 7);
    // Later messages continue the same seq numbering on this connection.
    ack(&mut b, 7);
    send(&mut a, &bob, "later", json!(7));
    // Alice hears `delivered` for the seven (bob acked them) and `accepted` for the new one, in
    // either order: bob's last ack and alice's send reach bob's shard by different paths.
    let (mut delivered, mut accepted) = (0, false);
    while delivered < 7 || !accepted {
        let v = recv_json(&mut a);
        match v["op"].as_str().unwrap() {
            "delivered" => delivered += 1,
            "accepted" => accepted = true,
            other => panic!("{other}"),
        }
    }
    assert_eq!(delivered, 7);
    assert_eq!(next_op(&mut b, "msg")["seq"], 8);
}

/// SPEC section 3, `typing`: every online device of the recipient hears it, on its home shard
/// whichever shard the sender is on; it is not stored, acked or answered.
#[test]
fn typing_reaches_every_online_device_of_the_recipient_and_is_never_stored() {
    for (shard_a, shard_b) in [(0, 0), (0, 1)] {
        let gw = gateway(&[]);
        let (alice, bob) = (user_on("alice", shard_a), user_on("bob", shard_b));
        // On alice's shard: her typing to carol is served before her `pong` (a typing still
        // crossing shards when carol connects would reach her, rightly: she is online then).
        let carol = user_on("carol", shard_a);
        let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
        let (mut b1, _) = connect_replay(&gw, &format!("/ws?user={bob}"));
        let (mut b2, _) = connect_replay(&gw, &format!("/ws?user={bob}"));
        send_text(&mut a, &json!({"op":"typing","to":bob}).to_string());
        for b in [&mut b1, &mut b2] {
            assert_eq!(recv_json(b), json!({"op":"typing","from":alice}));
            assert!(frames_before_pong(b).is_empty());
        }
        // Nothing answers the sender; an offline recipient gets nothing later.
        send_text(&mut a, &json!({"op":"typing","to":carol}).to_string());
        assert!(frames_before_pong(&mut a).is_empty());
        let (_c, replayed) = connect_replay(&gw, &format!("/ws?user={carol}"));
        assert!(replayed.is_empty());
        // A bad `to` is a bad_request, and the connection stays.
        send_text(&mut a, r#"{"op":"typing","to":""}"#);
        assert_eq!(next_op(&mut a, "error")["code"], "bad_request");
        assert_eq!(gw.metric_sum("ringgate_typing_total"), 2);
        assert_eq!(gw.metric_sum("ringgate_typing_delivered_total"), 2);
        assert_eq!(gw.metric_sum("ringgate_typing_dropped_total"), 0);
    }
}

/// Read receipts (SPEC section 3, `read`), with the embedded store, on one shard and across.
#[test]
fn read_receipts_reach_the_senders_and_the_readers_devices_and_supersede() {
    for (shard_a, shard_b) in [(0, 0), (0, 1)] {
        let gw = gateway(&[]);
        let (alice, bob) = (user_on("alice", shard_a), user_on("bob", shard_b));
        receipts_scenario(&gw, &alice, &bob, &user_on("carol", shard_a));
    }
}

/// A big inbox, summarised (issue 17), with the embedded store.
#[test]
fn a_big_inbox_is_summarised_fetched_per_sender_and_replayed_on_request() {
    let gw = gateway(&["--inbox-summary-over", "10"]);
    summary_scenario(&gw, &user_on("bob", 1), ["ann", "cy", "dee"]);
}

/// `typing` shares the per-user send limit (SPEC section 4, "Limits"): past it, `rate_limited`
/// with `retry_ms` (no cid), and nothing is relayed. (The three frames go in one write: served
/// at one instant, no token refills between them however slow the machine.)
#[test]
fn typing_is_limited_with_the_users_sends() {
    let gw = gateway(&["--user-send-rate", "1", "--user-send-burst", "2"]);
    let (alice, bob) = (user_on("alice", 0), user_on("bob", 1));
    let (mut a, _) = connect_replay(&gw, &format!("/ws?user={alice}"));
    let (mut b, _) = connect_replay(&gw, &format!("/ws?user={bob}"));
    let send_frame = json!({"op":"send","to":bob,"cid":"c1","body":1}).to_string();
    let typing = json!({"op":"typing","to":bob}).to_string();
    send_texts(&mut a, &[&send_frame, &typing, &typing]);
    let limited = next_op(&mut a, "error");
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    assert!(
        limited["retry_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{limited}"
    );
    assert!(limited.get("cid").is_none(), "{limited}");
    assert_eq!(next_op(&mut a, "accepted")["cid"], "c1");
    let mut got = [recv_json(&mut b), recv_json(&mut b)];
    got.sort_by_key(|v| v["op"].as_str().unwrap_or_default().to_string());
    assert_eq!(got[0]["cid"], "c1");
    assert_eq!(got[1], json!({"op":"typing","from":alice}));
    assert!(
        frames_before_pong(&mut b).is_empty(),
        "one typing relayed, one refused"
    );
}
