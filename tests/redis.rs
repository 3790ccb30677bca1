//! The durable inbox in Redis (SPEC section 4, issue 5), against a real `redis-server` each
//! test starts on a free port: accepted messages survive a gateway SIGKILL and SIGTERM,
//! dedup survives a restart, Redis dying mid-burst yields `unavailable` for exactly what was
//! not made safe and loses nothing accepted, caps and expiry hold, and a gateway catches up
//! by itself when Redis comes back.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::redis::RedisServer;
use common::*;
use serde_json::{json, Value};

const SHARDS: usize = 2;

fn gateway(redis: &RedisServer, extra: &[&str]) -> Gateway {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str(), "--redis-timeout-ms", "500"];
    args.extend_from_slice(extra);
    Gateway::start_shards(SHARDS, &args)
}

/// `user`'s inbox stream, as `store/redis/keys.rs` names it.
fn inbox_key(user: &str) -> String {
    format!("rg:in:{{u:{user}}}")
}

fn stream_len(redis: &RedisServer, user: &str) -> i64 {
    redis.int(&["XLEN", &inbox_key(user)])
}

/// Send `n` messages with cids `{prefix}{i}` and wait for each `accepted`; returns the ids.
fn send_accepted(ws: &mut Ws, to: &str, prefix: &str, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let cid = format!("{prefix}{i}");
            send(ws, to, &cid, json!({"n": i}));
            let a = next_op(ws, "accepted");
            assert_eq!(a["cid"], cid);
            id_of(&a)
        })
        .collect()
}

/// Server message ids travel as decimal strings.
fn id_of(v: &Value) -> u64 {
    v["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no id in {v}"))
}

fn cids(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["cid"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn accepted_messages_survive_a_gateway_sigkill() {
    let redis = RedisServer::start();
    let mut gw = gateway(&redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    let ids = send_accepted(&mut a, &bob, "k", 20);
    assert_eq!(
        stream_len(&redis, &bob),
        20,
        "accepted means written to Redis"
    );
    gw.sigkill();
    drop(a);

    let gw2 = gateway(&redis, &[]);
    let (mut b, msgs) = connect_replay(&gw2, &format!("/ws?user={bob}"));
    let expected: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    assert_eq!(cids(&msgs), expected, "everything accepted, in order, once");
    let got_ids: Vec<u64> = msgs.iter().map(id_of).collect();
    assert_eq!(got_ids, ids, "same ids as the first run answered");
    assert_eq!(msgs[3]["from"], alice.as_str());
    assert_eq!(msgs[3]["body"], json!({"n": 3}));
    ack(&mut b, msgs.last().unwrap()["seq"].as_u64().unwrap());
    assert!(
        eventually(Duration::from_secs(10), || stream_len(&redis, &bob) == 0),
        "acked entries are removed from Redis"
    );
    assert!(gw2.metric_sum("ringgate_redis_loads_total") >= 1);
}

/// Read receipts with Redis (SPEC section 3, `read`): the same scenario as the embedded store,
/// then a receipt waiting for an offline sender survives a gateway SIGKILL, and Redis holds
/// only the latest one of the pair.
#[test]
fn read_receipts_go_through_redis_supersede_and_survive_a_sigkill() {
    let redis = RedisServer::start();
    let mut gw = gateway(&redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    receipts_scenario(&gw, &alice, &bob, &user_on("carol", 0, SHARDS));
    // The scenario leaves alice's latest receipt unacked (replayed, not acked): ack it now.
    let (mut a, replayed) = connect_replay(&gw, &format!("/ws?user={alice}"));
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    ack(&mut a, replayed[0]["seq"].as_u64().unwrap());
    let (mut b, _) = connect_replay(&gw, &format!("/ws?user={bob}"));
    let ids = send_accepted(&mut a, &bob, "late", 2);
    drop(a);
    for _ in &ids {
        let m = next_op(&mut b, "msg");
        ack(&mut b, m["seq"].as_u64().unwrap());
    }
    for id in &ids {
        send_text(
            &mut b,
            &json!({"op":"read","from":alice,"id":id.to_string()}).to_string(),
        );
        let own = next_op(&mut b, "read");
        assert_eq!(own["id"], id.to_string());
    }
    // Both copies of bob's latest receipt written before the kill: alice's, and bob's own
    // (unacked on his connection), whose write may come a little after alice's (`read` has
    // no answer, so a receipt still on its way at a SIGKILL is lost: the test waits for it).
    assert!(
        eventually(Duration::from_secs(10), || stream_len(&redis, &alice) == 1
            && stream_len(&redis, &bob) == 1),
        "one receipt of bob waits in alice's inbox ({}) and in bob's ({})",
        stream_len(&redis, &alice),
        stream_len(&redis, &bob)
    );
    gw.sigkill();
    drop(b);
    let gw2 = gateway(&redis, &[]);
    // What bob received is known to the new run (kept in Redis at each ack): his receipts
    // are still checked, not refused for want of memory. Its own copy waits for him too.
    let (mut b, replayed) = connect_replay(&gw2, &format!("/ws?user={bob}"));
    assert_eq!(replayed.len(), 1, "bob's own latest receipt: {replayed:?}");
    assert_eq!(replayed[0]["id"], ids[1].to_string());
    for id in [ids[0], ids[1]] {
        send_text(
            &mut b,
            &json!({"op":"read","from":alice,"id":id.to_string()}).to_string(),
        );
    }
    let beyond = (ids[1] + 1).to_string();
    send_text(
        &mut b,
        &json!({"op":"read","from":alice,"id":beyond}).to_string(),
    );
    assert_eq!(next_op(&mut b, "error")["code"], "bad_request");
    assert!(
        frames_before_pong(&mut b).is_empty(),
        "the same receipts again: no new entry"
    );
    let (_a, replayed) = connect_replay(&gw2, &format!("/ws?user={alice}"));
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    assert_eq!(replayed[0]["op"], "read");
    assert_eq!(replayed[0]["by"], bob.as_str());
    assert_eq!(replayed[0]["id"], ids[1].to_string());
}

/// A big inbox, summarised (issue 17), with Redis (the summary is read from the mirror).
#[test]
fn a_big_inbox_is_summarised_fetched_per_sender_and_replayed_on_request() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &["--inbox-summary-over", "10"]);
    summary_scenario(&gw, &user_on("bob", 1, SHARDS), ["ann", "cy", "dee"]);
}

/// A backend message's `type` is kept in Redis with the message (issue 17 item 6).
#[test]
fn a_backend_messages_type_survives_a_gateway_sigkill() {
    let redis = RedisServer::start();
    let mut gw = gateway(&redis, &["--api-key", "redis-test-api-key"]);
    let (status, v) = post_json(
        &gw,
        "/api/send",
        r#"{"to":"zoe","body":{"text":"hi"},"cid":"t-1","type":"system.notice"}"#,
        "redis-test-api-key",
    );
    assert_eq!(status, 200, "{v}");
    gw.sigkill();
    let gw2 = gateway(&redis, &[]);
    let (_zoe, msgs) = connect_replay(&gw2, "/ws?user=zoe");
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0]["type"], "system.notice");
    assert_eq!(msgs[0]["body"], json!({"text":"hi"}));
}

#[test]
fn unacked_messages_survive_a_sigterm_restart_and_acked_ones_stay_gone() {
    let redis = RedisServer::start();
    let mut gw = gateway(&redis, &["--drain-ms", "2000"]);
    let (alice, bob) = (user_on("alice", 1, SHARDS), user_on("bob", 1, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    let (mut b, _) = connect_app(&gw, &bob);
    send_accepted(&mut a, &bob, "t", 10);
    let msgs: Vec<Value> = (0..10).map(|_| next_op(&mut b, "msg")).collect();
    ack(&mut b, msgs[3]["seq"].as_u64().unwrap());
    assert!(eventually(Duration::from_secs(10), || stream_len(
        &redis, &bob
    ) == 6));
    gw.sigterm();
    assert_eq!(recv_close_code(&mut b), 1012);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));

    let gw2 = gateway(&redis, &[]);
    let (_b, replay) = connect_replay(&gw2, &format!("/ws?user={bob}"));
    let expected: Vec<String> = (4..10).map(|i| format!("t{i}")).collect();
    assert_eq!(cids(&replay), expected);
    let seqs: Vec<u64> = replay.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=6).collect::<Vec<_>>(),
        "a new connection counts from 1"
    );
}

/// alice's `same0` to bob is accepted, the gateway SIGKILLed; `between` runs, a new gateway
/// starts and alice resends `same0`: it is answered with the first id. Returns the new
/// gateway and bob.
fn resend_after_a_sigkill(redis: &RedisServer, between: impl FnOnce(&str)) -> (Gateway, String) {
    let mut gw = gateway(redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 0, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    let first = send_accepted(&mut a, &bob, "same", 1)[0];
    gw.sigkill();
    between(&bob);

    let gw2 = gateway(redis, &[]);
    let (mut a, _) = connect_app(&gw2, &alice);
    send(&mut a, &bob, "same0", json!({"n": 0}));
    let again = next_op(&mut a, "accepted");
    assert_eq!(id_of(&again), first, "same id as before the restart");
    (gw2, bob)
}

#[test]
fn a_resent_cid_after_a_gateway_restart_is_deduplicated_by_redis() {
    let redis = RedisServer::start();
    let (gw2, bob) = resend_after_a_sigkill(&redis, |_| {});
    assert_eq!(stream_len(&redis, &bob), 1, "stored once");
    let (_b, msgs) = connect_replay(&gw2, &format!("/ws?user={bob}"));
    assert_eq!(cids(&msgs), vec!["same0"]);
    assert!(gw2.metric_sum("ringgate_dedup_hits_total") >= 1);
}

/// The dedup window of what `from` sent to `to`: (current generation, older generation), as
/// `store/redis/keys.rs` names them (per pair, in the recipient's hash slot).
fn dedup_keys(to: &str, from: &str) -> (String, String) {
    (
        format!("rg:dd:{}:{{u:{to}}}:{from}", to.len()),
        format!("rg:dd-old:{}:{{u:{to}}}:{from}", to.len()),
    )
}

/// The id a dedup record answers a resent cid with: its first field (the record is
/// `<id> <writer>/<attempt>`; older versions wrote `<id> <stream id> <writer>/<attempt>` or
/// the bare id).
fn record_id(record: &str) -> &str {
    record.split_whitespace().next().unwrap_or("")
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[test]
fn a_cid_in_the_older_dedup_generation_is_still_a_duplicate() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    // As if a rotation (after 24 h and 10,000 cids) moved "old" into the older generation
    // and started a new one that knows about it.
    let (current, older) = dedup_keys(&bob, &alice);
    redis.cli(&["HSET", &older, "\"old\"", "4242"]);
    let born = now_ms().to_string();
    redis.cli(&["HSET", &current, "~born", &born, "~old", "1"]);
    let (mut a, _) = connect_app(&gw, &alice);
    send(&mut a, &bob, "old", json!(1));
    assert_eq!(id_of(&next_op(&mut a, "accepted")), 4242, "the first id");
    assert_eq!(stream_len(&redis, &bob), 0, "not stored again");
    assert_eq!(
        redis.cli(&["HEXISTS", &current, "\"old\""]).trim(),
        "0",
        "not recorded twice"
    );
    // A new cid is stored and recorded in the current generation.
    let id = send_accepted(&mut a, &bob, "new", 1)[0];
    let record = redis.cli(&["HGET", &current, "\"new0\""]);
    assert_eq!(record_id(&record), id.to_string());
    assert_eq!(
        record.split_whitespace().count(),
        2,
        "{record}: id and writer/attempt"
    );
    assert_eq!(stream_len(&redis, &bob), 1);
}

/// SPEC section 4, Order, across nodes: a pair's ids increase in store order (clients tell
/// held `accepted` answers by id). A write below the highest id its pair stored (another
/// node's, whose sender moved here, say) never lands: refused for now, its sender resends it
/// under a new id; a resend of a cid already stored is still answered with its id.
#[test]
fn a_write_below_the_highest_id_its_pair_stored_never_lands() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    let first = send_accepted(&mut a, &bob, "before", 1)[0];
    let (current, _) = dedup_keys(&bob, &alice);
    assert_eq!(
        redis.cli(&["HGET", &current, "~top"]).trim(),
        first.to_string(),
        "the pair's highest stored id is kept"
    );
    // Another node stored an id far ahead of this node's clock for the pair.
    let ahead = (first + (1u64 << 40)).to_string();
    redis.cli(&["HSET", &current, "~top", &ahead]);
    send(&mut a, &bob, "late0", json!(1));
    let refused = next_op(&mut a, "error");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert_eq!(refused["cid"], "late0");
    assert_eq!(stream_len(&redis, &bob), 1, "not stored");
    assert_eq!(redis.cli(&["HEXISTS", &current, "\"late0\""]).trim(), "0");
    // A resend of what is stored is answered with its id all the same.
    send(&mut a, &bob, "before0", json!(0));
    assert_eq!(id_of(&next_op(&mut a, "accepted")), first);
    // Once the pair's ids are below this node's clock again, the resend lands.
    let behind = (first - 1).to_string();
    redis.cli(&["HSET", &current, "~top", &behind]);
    send(&mut a, &bob, "late0", json!(1));
    let id = id_of(&next_op(&mut a, "accepted"));
    assert!(id > first);
    assert_eq!(
        redis.cli(&["HGET", &current, "~top"]).trim(),
        id.to_string()
    );
    assert_eq!(stream_len(&redis, &bob), 2);
}

/// The script decides whether a write was issued after its pair's top id from decimal
/// strings (ids exceed a double's exact range); the gateway's rule is
/// `delivery::ids::issued_after`. The script's own functions, run by a real redis-server on
/// random ids near each other (same millisecond, neighbours, far apart), answer as it does.
#[test]
fn the_scripts_id_clock_agrees_with_the_gateways_rule() {
    use ringgate::delivery::ids::issued_after;
    let redis = RedisServer::start();
    let script = include_str!("../src/store/redis/script.lua");
    let start = script
        .find("local function id_above")
        .expect("id_above in the script");
    let end = script
        .find("local function raise")
        .expect("raise in the script");
    let chunk = format!(
        "{}\nlocal out = {{}}\nfor j = 1, #ARGV, 2 do \
         out[#out + 1] = issued_after(ARGV[j], ARGV[j + 1]) and 1 or 0 end\nreturn out",
        &script[start..end]
    );
    let seed = test_seed(20261205);
    let mut rng = Rng(seed);
    let id = |ms: u64, slot: u64, seq: u64| (ms << 22) | (slot << 9) | seq;
    let mut pairs = Vec::new();
    for _ in 0..2_000 {
        let ms = 220_000_000_000 + rng.below(1 << 30);
        let top = id(ms, rng.below(4), rng.below(512));
        let near_ms = match rng.below(3) {
            0 => ms,
            1 => ms + 1,
            _ => ms - 1,
        };
        let other = id(near_ms, rng.below(4), rng.below(512));
        pairs.push((other, top));
        pairs.push((top + 1 + rng.below(1 << 24), top));
    }
    let mut args = vec!["EVAL".to_string(), chunk, "0".to_string()];
    for (a, b) in &pairs {
        args.extend([a.to_string(), b.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = redis.cli(&args);
    let answers: Vec<&str> = out.lines().collect();
    assert_eq!(answers.len(), pairs.len(), "{out}");
    for ((a, b), got) in pairs.iter().zip(answers) {
        let want = if issued_after(*a, *b) { "1" } else { "0" };
        assert_eq!(got, want, "issued_after({a}, {b}) (seed {seed})");
    }
}

#[test]
fn the_dedup_window_rotates_past_24_hours_and_10000_cids_and_keeps_the_older_generation() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let (current, older) = dedup_keys(&bob, &alice);
    // A generation born 25 h ago holding 10,004 cids (as if alice had sent them to bob).
    let born = (now_ms() - 25 * 3600 * 1000).to_string();
    let fill = "for j = 1, 10004 do redis.call('HSET', KEYS[1], '\"f' .. j .. '\"', j) end \
                redis.call('HSET', KEYS[1], '~born', ARGV[1], '~fresh', ARGV[1]) return 1";
    assert_eq!(redis.cli(&["EVAL", fill, "1", &current, &born]), "1");
    let (mut a, _) = connect_app(&gw, &alice);
    let id = send_accepted(&mut a, &bob, "new", 1)[0];
    // Rotated at the end of the call that recorded the new cid: the filled generation, with
    // it, is now the older one; the current one is new and knows an older one exists.
    assert_eq!(redis.int(&["HLEN", &older]), 10_004 + 2 + 1);
    assert_eq!(
        record_id(&redis.cli(&["HGET", &older, "\"new0\""])),
        id.to_string()
    );
    assert_eq!(redis.cli(&["HGET", &current, "~old"]), "1");
    assert_eq!(
        redis.int(&["HLEN", &current]),
        6,
        "~born, ~old, ~fresh, ~age, the writing shard's watermark and the pair's top id"
    );
    assert_eq!(
        redis.cli(&["HGET", &current, "~top"]).trim(),
        id.to_string(),
        "the pair's top id goes on in the new generation"
    );
    let ttl = redis.int(&["PTTL", &current]);
    assert!(ttl > 47 * 3600 * 1000, "two windows of TTL, got {ttl} ms");
    // A cid of the older generation is still a duplicate: its first id, nothing stored.
    send(&mut a, &bob, "f7", json!("again"));
    assert_eq!(id_of(&next_op(&mut a, "accepted")), 7);
    assert_eq!(stream_len(&redis, &bob), 1);
}

#[test]
fn a_resent_cid_whose_inbox_is_gone_is_not_stored_and_leaves_no_key_without_a_ttl() {
    // The script appends first and takes the entry back when the cid was known: an inbox
    // that append created must not stay behind without a TTL.
    let redis = RedisServer::start();
    let (_gw2, bob) = resend_after_a_sigkill(&redis, |bob| {
        redis.cli(&["DEL", &inbox_key(bob)]);
    });
    assert_eq!(
        stream_len(&redis, &bob),
        0,
        "a duplicate is not stored again"
    );
    let ttl = redis.int(&["PTTL", &inbox_key(&bob)]);
    assert!(
        ttl == -2 || ttl > 0,
        "the inbox is gone or expires, PTTL {ttl}"
    );
}

#[test]
fn an_inbox_ttl_is_set_when_it_starts_and_refreshed_with_its_senders_dedup_window() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let inbox = inbox_key(&bob);
    let (current, _) = dedup_keys(&bob, &alice);
    let hours = |h: i64| h * 3600 * 1000;
    let (mut a, _) = connect_app(&gw, &alice);
    // A new inbox gets twice the age cap (72 h) with its first append.
    send_accepted(&mut a, &bob, "a", 1);
    let ttl = redis.int(&["PTTL", &inbox]);
    assert!(ttl > hours(143), "twice the age cap, got {ttl} ms");
    assert_eq!(
        redis.cli(&["HGET", &current, "~old"]),
        "0",
        "no older generation"
    );
    // Within half a dedup window of the pair's last refresh, appends leave the TTL alone
    // (it was set then, and the entries' age cap ends long before it).
    redis.cli(&["PEXPIRE", &inbox, &hours(100).to_string()]);
    send_accepted(&mut a, &bob, "b", 1);
    let ttl = redis.int(&["PTTL", &inbox]);
    assert!(ttl <= hours(100), "not refreshed by every append: {ttl} ms");
    // Once the pair's TTL is due again (half a window, 12 h), both are refreshed.
    let half_a_day_ago = (now_ms() - 13 * 3600 * 1000).to_string();
    redis.cli(&["HSET", &current, "~fresh", &half_a_day_ago]);
    send_accepted(&mut a, &bob, "c", 1);
    let ttl = redis.int(&["PTTL", &inbox]);
    assert!(
        ttl > hours(143),
        "refreshed with the pair's window: {ttl} ms"
    );
    assert!(redis.int(&["PTTL", &current]) > hours(47));
    // A pair that last saw a smaller age cap (a node configured lower, or before a config
    // change) has the inbox's TTL set for this node's cap at once.
    redis.cli(&["PEXPIRE", &inbox, &hours(100).to_string()]);
    redis.cli(&["HSET", &current, "~age", &hours(24).to_string()]);
    send_accepted(&mut a, &bob, "e", 1);
    let ttl = redis.int(&["PTTL", &inbox]);
    assert!(ttl > hours(143), "set for the larger age cap: {ttl} ms");
    assert_eq!(redis.int(&["HGET", &current, "~age"]), hours(72));
    // An inbox that was emptied (acked) gets it with its next append too.
    let (mut b, msgs) = connect_replay(&gw, &format!("/ws?user={bob}"));
    assert_eq!(cids(&msgs), vec!["a0", "b0", "c0", "e0"]);
    for m in &msgs {
        ack(&mut b, m["seq"].as_u64().unwrap());
        next_op(&mut a, "delivered");
    }
    assert_eq!(stream_len(&redis, &bob), 0);
    drop(b);
    redis.cli(&["PEXPIRE", &inbox, &hours(100).to_string()]);
    send_accepted(&mut a, &bob, "d", 1);
    let ttl = redis.int(&["PTTL", &inbox]);
    assert!(ttl > hours(143), "an empty inbox starts again: {ttl} ms");
}

#[test]
fn online_delivery_goes_through_redis_and_the_ack_removes_the_entry() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    let (mut b, _) = connect_app(&gw, &bob);
    let (mut b2, _) = connect_app(&gw, &bob);
    send(&mut a, &bob, "x", json!("hi"));
    let accepted = next_op(&mut a, "accepted");
    let m1 = next_op(&mut b, "msg");
    let m2 = next_op(&mut b2, "msg");
    assert_eq!(m1["id"], accepted["id"]);
    assert_eq!(m2["id"], accepted["id"], "every device gets it");
    assert_eq!(stream_len(&redis, &bob), 1);
    ack(&mut b, m1["seq"].as_u64().unwrap());
    let d = next_op(&mut a, "delivered");
    assert_eq!(d["cid"], "x");
    assert!(eventually(Duration::from_secs(10), || stream_len(
        &redis, &bob
    ) == 0));
    ack(&mut b2, m2["seq"].as_u64().unwrap());
    // One delivered only: the next frame alice sees answers her next send.
    send(&mut a, &bob, "y", json!("again"));
    assert_eq!(next_op(&mut a, "accepted")["cid"], "y");
    assert!(gw.metric_sum("ringgate_redis_batches_total") >= 2);
    assert_eq!(gw.metric_sum("ringgate_redis_errors_total"), 0);
}

#[test]
fn the_count_cap_refuses_and_the_age_cap_trims_with_a_ttl() {
    let redis = RedisServer::start();
    // The age cap leaves room for a gateway restart on a loaded machine between the cap and
    // the inbox's TTL (twice the cap): past the TTL Redis drops the whole inbox, uncounted.
    let args = ["--inbox-max-messages", "3", "--inbox-max-age-ms", "4000"];
    let mut gw = gateway(&redis, &args);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    let ids = send_accepted(&mut a, &bob, "c", 3);
    send(&mut a, &bob, "c3", json!(3));
    let err = next_op(&mut a, "error");
    assert_eq!(err["code"], "unavailable");
    assert_eq!(err["cid"], "c3");
    assert_eq!(stream_len(&redis, &bob), 3, "nothing dropped to make room");
    let ttl = redis.int(&["PTTL", &inbox_key(&bob)]);
    assert!(
        ttl > 0 && ttl <= 8000,
        "stream TTL is twice the age cap: {ttl}"
    );
    // Past the age cap the old entries are trimmed on the next append, and counted once,
    // even when that append is a resend Redis answers as a duplicate (after a restart, so
    // the gateway's own memory of the cid is gone).
    std::thread::sleep(Duration::from_millis(4200));
    gw.sigkill();
    let gw = gateway(&redis, &args);
    let (mut a, _) = connect_app(&gw, &alice);
    send(&mut a, &bob, "c0", json!(0));
    assert_eq!(id_of(&next_op(&mut a, "accepted")), ids[0], "the first id");
    assert_eq!(stream_len(&redis, &bob), 0);
    assert!(
        eventually(Duration::from_secs(5), || gw
            .metric_sum("ringgate_inbox_expired_total")
            == 3),
        "expired counted: {}",
        gw.metric_sum("ringgate_inbox_expired_total")
    );
    send(&mut a, &bob, "c3", json!(3));
    assert_eq!(next_op(&mut a, "accepted")["cid"], "c3");
    assert_eq!(stream_len(&redis, &bob), 1);
    assert_eq!(gw.metric_sum("ringgate_inbox_expired_total"), 3);
    let (_b, msgs) = connect_replay(&gw, &format!("/ws?user={bob}"));
    assert_eq!(cids(&msgs), vec!["c3"]);
}

#[test]
fn below_the_count_cap_expired_entries_are_skipped_and_trimmed_by_the_load() {
    let redis = RedisServer::start();
    // Room between the age cap and the inbox's TTL (twice the cap) for a loaded machine.
    let gw = gateway(&redis, &["--inbox-max-age-ms", "3000"]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    send_accepted(&mut a, &bob, "old", 2);
    std::thread::sleep(Duration::from_millis(3200));
    send_accepted(&mut a, &bob, "new", 1);
    // Far below the count cap, the append does not trim; the load skips and trims (counted).
    assert_eq!(stream_len(&redis, &bob), 3);
    let (_b, msgs) = connect_replay(&gw, &format!("/ws?user={bob}"));
    assert_eq!(cids(&msgs), vec!["new0"]);
    assert_eq!(stream_len(&redis, &bob), 1);
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_inbox_expired_total")
        == 2));
}

/// What a sender heard: the first answer to each cid, the ids accepted, the cids in the
/// order it was told `accepted`, and the cids whose latest answer is `unavailable`.
#[derive(Default)]
struct Heard {
    first: HashMap<String, &'static str>,
    accepted_ids: HashMap<String, u64>,
    told: Vec<String>,
    refused: Vec<String>,
}

impl Heard {
    fn hear(&mut self, v: Value) {
        let cid = v["cid"].as_str().unwrap_or_default().to_string();
        let kind = match v["op"].as_str() {
            Some("accepted") => {
                let again = self.accepted_ids.insert(cid.clone(), id_of(&v));
                assert!(again.is_none(), "accepted once: {v}");
                self.told.push(cid.clone());
                "accepted"
            }
            Some("error") => {
                assert_eq!(v["code"], "unavailable", "{v}");
                self.refused.push(cid.clone());
                "unavailable"
            }
            Some("delivered") => return,
            _ => panic!("unexpected {v}"),
        };
        self.first.entry(cid).or_insert(kind);
    }
}

/// Redis is SIGKILLed mid-burst: what was accepted survives; a send whose write was never
/// sent (Redis known down) is answered `unavailable` at once; a send whose write was on its
/// way (its answer lost with the connection) is answered once Redis is back and its write
/// resolved (`accepted` if it landed, else `unavailable`). Resending every refused cid until
/// accepted, bob's waiting device is then shown every message once, under the id alice was
/// told, in the order she was told `accepted`.
#[test]
fn redis_killed_mid_burst_loses_nothing_accepted_and_the_gateway_catches_up() {
    let mut redis = RedisServer::start();
    // A burst past the user send limit on purpose: this is about the store (tests/limits.rs).
    let gw = gateway(&redis, &["--user-send-rate", "0"]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    let total = 300;
    let mut heard = Heard::default();
    // Half the burst, Redis dies once some of it is accepted, then the other half.
    for i in 0..total / 2 {
        send(&mut a, &bob, &format!("b{i}"), json!({"n": i}));
    }
    while heard.first.len() < total / 4 {
        heard.hear(recv_json(&mut a));
    }
    redis.kill();
    for i in total / 2..total {
        send(&mut a, &bob, &format!("b{i}"), json!({"n": i}));
    }
    // Every send is answered, but those whose writes may have landed: in doubt until Redis
    // is back.
    assert!(
        eventually(Duration::from_secs(20), || {
            for v in frames_before_pong(&mut a) {
                heard.hear(v);
            }
            heard.first.len() as u64 + gw.metric_sum("ringgate_store_writes_in_doubt")
                == total as u64
        }),
        "{} answered, {} in doubt",
        heard.first.len(),
        gw.metric_sum("ringgate_store_writes_in_doubt")
    );
    let in_doubt = total - heard.first.len();
    println!(
        "burst of {total}: {} accepted before Redis died, {} unavailable, {in_doubt} in doubt",
        heard.accepted_ids.len(),
        heard.refused.len()
    );
    // Redis died mid-burst: some sends were not accepted, refused or in doubt (which of the
    // two depends on whether a shard had noticed yet; on a busy machine all can be in doubt).
    assert!(
        !heard.refused.is_empty() || in_doubt > 0,
        "Redis died mid-burst"
    );
    assert!(gw.metric_sum("ringgate_redis_errors_total") >= 1);
    let bob_shard = format!("{{shard=\"{}\"}}", ringgate::mesh::home_shard(&bob, SHARDS));
    assert_eq!(gw.metric(&format!("ringgate_redis_up{bob_shard}")), 0);

    // A device connecting while Redis is down waits for its inbox (no synced yet).
    let mut b = connect(&gw, &format!("/ws?user={bob}"));
    assert_eq!(recv_json(&mut b)["op"], "welcome");

    redis.restart();
    // The writes in doubt are resolved and answered; the client resends what was refused,
    // with the same cids, until accepted.
    let mut rounds = 0;
    while heard.accepted_ids.len() < total {
        rounds += 1;
        assert!(
            rounds <= 100,
            "Redis came back but {} of {total} stay unaccepted",
            total - heard.accepted_ids.len()
        );
        for cid in std::mem::take(&mut heard.refused) {
            let n: usize = cid[1..].parse().unwrap();
            send(&mut a, &bob, &cid, json!({"n": n}));
        }
        std::thread::sleep(Duration::from_millis(200));
        for v in frames_before_pong(&mut a) {
            heard.hear(v);
        }
    }
    assert_eq!(gw.metric_sum("ringgate_store_writes_in_doubt"), 0);
    assert!(gw.metric_sum("ringgate_store_writes_resolved_total") >= in_doubt as u64);

    // Bob's waiting device catches up by itself: every message exactly once.
    let mut got: Vec<Value> = Vec::new();
    while got.len() < total {
        let v = recv_json(&mut b);
        match v["op"].as_str() {
            Some("msg") => {
                ack(&mut b, v["seq"].as_u64().unwrap());
                got.push(v);
            }
            Some("synced") => {}
            _ => panic!("unexpected {v}"),
        }
    }
    let seen: HashSet<String> = cids(&got).into_iter().collect();
    assert_eq!(seen.len(), total, "each message once");
    for m in &got {
        assert_eq!(
            Some(id_of(m)),
            heard.accepted_ids.get(m["cid"].as_str().unwrap()).copied(),
            "the id alice was given"
        );
    }
    assert_eq!(
        cids(&got),
        heard.told,
        "in the order alice was told accepted"
    );
    assert!(eventually(Duration::from_secs(10), || stream_len(
        &redis, &bob
    ) == 0));
    assert_eq!(gw.metric(&format!("ringgate_redis_up{bob_shard}")), 1);
    println!(
        "recovered after {rounds} round(s); bob displayed {}",
        got.len()
    );
}

#[test]
fn a_gateway_starts_without_redis_and_refuses_only_what_needs_it() {
    let mut redis = RedisServer::start();
    redis.kill();
    let gw = gateway(&redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let mut a = connect(&gw, &format!("/ws?user={alice}"));
    assert_eq!(recv_json(&mut a)["op"], "welcome");
    send(&mut a, &bob, "z", json!(1));
    let err = next_op(&mut a, "error");
    assert_eq!(err["code"], "unavailable");
    assert_eq!(err["cid"], "z");
    send_text(&mut a, r#"{"op":"ping"}"#);
    assert_eq!(next_op(&mut a, "pong")["op"], "pong");
    let (status, _) = gw.admin_get("/healthz");
    assert_eq!(status, 200);
    // Alive, but not ready until its Redis channel is heard.
    assert_eq!(
        gw.admin_get("/readyz"),
        (503, "waiting for this node's Redis channel\n".to_string())
    );
    redis.restart();
    // synced arrives once the inbox could be read, then sends are accepted.
    assert_eq!(next_op(&mut a, "synced")["count"], 0);
    assert!(eventually(Duration::from_secs(10), || {
        send(&mut a, &bob, "z", json!(1));
        recv_json(&mut a)["op"] == "accepted"
    }));
    assert!(eventually(Duration::from_secs(10), || gw
        .admin_get("/readyz")
        .0
        == 200));
}

#[test]
fn redis_urls_and_key_prefixes_are_checked_at_start_with_the_reason() {
    let print = |extra: &[&str]| {
        let mut args = vec!["config", "--print"];
        args.extend_from_slice(extra);
        run_ringgate(&args, &[])
    };
    let cluster = "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001";
    let out = print(&["--redis-url", cluster]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(cluster));
    let out = print(&["--redis-url", "not a url"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis_url"));
    // A brace in the prefix would start a hash tag: a cluster would put every key in one slot.
    let out = print(&["--redis-url", cluster, "--redis-key-prefix", "{rg}:"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("redis_key_prefix") && err.contains("braces"),
        "{err}"
    );
    let out = run_ringgate(
        &[
            "config",
            "--print",
            "--redis-url",
            "redis://u:hunter2@127.0.0.1:6379",
        ],
        &[],
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        !shown.contains("hunter2"),
        "the Redis password is redacted: {shown}"
    );
}

/// Send `cid` until it is accepted, resending after `unavailable` with the same cid (what
/// the client library does). Returns the accepted id.
fn send_until_accepted(a: &mut Ws, to: &str, cid: &str) -> u64 {
    for _ in 0..100 {
        send(a, to, cid, json!({"c": cid}));
        loop {
            let v = recv_json(a);
            // A write in doubt (see `answers`), answered whenever it is resolved.
            if v["cid"].as_str().is_some_and(|c| c.starts_with('z')) && v["cid"] != cid {
                continue;
            }
            match v["op"].as_str() {
                Some("accepted") if v["cid"] == cid => return id_of(&v),
                Some("error") if v["cid"] == cid => {
                    assert_eq!(v["code"], "unavailable", "{v}");
                    break;
                }
                // `accepted`/`delivered` of earlier messages.
                Some("accepted") | Some("delivered") => {}
                _ => panic!("unexpected {v}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{cid} never accepted");
}

/// The next `n` answers to alice's sends (accepted / error), by cid; `delivered` skipped, and
/// answers to cids starting with `z` (a write in doubt, answered whenever it is resolved).
fn answers(a: &mut Ws, n: usize) -> HashMap<String, String> {
    let mut out = HashMap::new();
    while out.len() < n {
        let v = recv_json(a);
        if v["cid"].as_str().is_some_and(|c| c.starts_with('z')) {
            continue;
        }
        let kind = match v["op"].as_str() {
            Some("delivered") => continue,
            Some("accepted") => "accepted".to_string(),
            Some("error") => v["code"].as_str().unwrap().to_string(),
            _ => panic!("unexpected {v}"),
        };
        assert!(out
            .insert(v["cid"].as_str().unwrap().to_string(), kind)
            .is_none());
    }
    out
}

/// Review finding: message ids need a slot renewed in Redis; an outage longer than the node
/// lease must not stop live delivery (the slot stays its holder's for a grace of minutes).
#[test]
fn live_delivery_goes_on_through_an_outage_longer_than_the_node_lease() {
    let mut redis = RedisServer::start();
    let gw = gateway(&redis, &["--node-lease-ms", "300"]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    let (mut b, _) = connect_app(&gw, &bob);
    // Live delivery needs one of alice's messages to bob stored since she connected.
    store_one_of_the_pair(&mut a, &mut b, &bob);
    redis.kill();
    std::thread::sleep(Duration::from_millis(1_500)); // five leases
    send(&mut a, &bob, "late", json!(1));
    let m = next_op(&mut b, "msg");
    assert_eq!(m["cid"], "late");
    ack(&mut b, m["seq"].as_u64().unwrap());
    assert_eq!(next_op(&mut a, "accepted")["cid"], "late");
    assert_eq!(
        gw.metric_sum("ringgate_message_id_slot_held"),
        SHARDS as u64
    );
}

/// A message of `a`'s stored, shown to `b` (acked) and `accepted`: the store confirmed a write
/// of the pair since the sender connected, so the pair's messages may go live while Redis is
/// away (see `confirmed` in src/shard/mirror.rs).
fn store_one_of_the_pair(a: &mut Ws, b: &mut Ws, to: &str) {
    send(a, to, "stored", json!(0));
    assert_eq!(next_op(a, "accepted")["cid"], "stored");
    let m = next_op(b, "msg");
    assert_eq!(m["cid"], "stored");
    ack(b, m["seq"].as_u64().unwrap());
    assert_eq!(next_op(a, "delivered")["cid"], "stored");
}

/// A sender that connected while Redis was away has no message to the recipient confirmed
/// since: it is refused for now (another node may have told it `accepted` for an earlier one
/// whose entry has not reached this node), and resends once Redis is back.
#[test]
fn a_sender_connected_during_an_outage_waits_for_redis_before_going_live() {
    let mut redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let (mut a, _) = connect_app(&gw, &alice);
    let (mut b, _) = connect_app(&gw, &bob);
    store_one_of_the_pair(&mut a, &mut b, &bob);
    redis.kill();
    // bob's shard learns that Redis is down from a write to zed (offline, homed there; see
    // the test below).
    let bob_up = format!(
        "ringgate_redis_up{{shard=\"{}\"}}",
        ringgate::mesh::home_shard(&bob, SHARDS)
    );
    send(&mut a, &user_on("zed", 1, SHARDS), "z0", json!(0));
    assert!(eventually(Duration::from_secs(10), || gw.metric(&bob_up) == 0));
    // alice connects again (another device, or after a drop): nothing of hers goes live.
    // (Her own inbox cannot be read without Redis: no `synced` until it is back.)
    drop(a);
    let mut a = connect(&gw, &format!("/ws?user={alice}"));
    assert_eq!(recv_json(&mut a)["op"], "welcome");
    send(&mut a, &bob, "late", json!(1));
    let err = next_op(&mut a, "error");
    assert_eq!(
        (err["cid"].as_str(), err["code"].as_str()),
        (Some("late"), Some("unavailable")),
        "{err}"
    );
    assert!(frames_before_pong(&mut b).is_empty(), "nothing shown");
    assert_eq!(gw.metric_sum("ringgate_live_sends_total"), 0);
    redis.restart();
    let mut accepted = None;
    assert!(eventually(Duration::from_secs(10), || {
        send(&mut a, &bob, "late", json!(1));
        loop {
            let v = recv_json(&mut a);
            match v["op"].as_str() {
                Some("accepted") => accepted = Some(id_of(&v)),
                Some("error") => assert_eq!(v["code"], "unavailable", "{v}"),
                _ => continue, // `synced`, once her inbox is read
            }
            return accepted.is_some();
        }
    }));
    let m = next_op(&mut b, "msg");
    assert_eq!(
        (m["cid"].as_str(), Some(id_of(&m))),
        (Some("late"), accepted)
    );
}

#[test]
fn live_delivery_between_online_users_goes_on_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let gw = gateway(&redis, &["--window", "4"]);
    let (alice, bob) = (user_on("alice", 0, SHARDS), user_on("bob", 1, SHARDS));
    let bob_up = format!(
        "ringgate_redis_up{{shard=\"{}\"}}",
        ringgate::mesh::home_shard(&bob, SHARDS)
    );
    let (mut a, _) = connect_app(&gw, &alice);
    let (mut b, _) = connect_app(&gw, &bob);
    store_one_of_the_pair(&mut a, &mut b, &bob);
    redis.kill();
    // bob's shard learns that Redis is down from a write to zed (offline, homed there). That
    // write may be in doubt (sent as Redis died): then zed's, not bob's, live delivery waits
    // for Redis, and its answer comes once Redis is back (`answers` skips it).
    let zed = user_on("zed", 1, SHARDS);
    send(&mut a, &zed, "z0", json!(0));
    assert!(eventually(Duration::from_secs(10), || gw.metric(&bob_up) == 0));
    let early: Vec<Value> = frames_before_pong(&mut a);
    assert!(early.iter().all(|v| v["cid"] == "z0"), "{early:?}");

    // A: bob online and acking (a thread of his own, like a real client): every message is
    // accepted on his ack, in order, once, although Redis is down.
    let acker = std::thread::spawn(move || {
        let mut b = b;
        let mut shown: Vec<Value> = Vec::new();
        while shown.len() < 20 {
            let v = next_op(&mut b, "msg");
            ack(&mut b, v["seq"].as_u64().unwrap());
            shown.push(v);
        }
        (b, shown)
    });
    let ids: Vec<u64> = (0..20)
        .map(|i| send_until_accepted(&mut a, &bob, &format!("l{i}")))
        .collect();
    let (mut b, shown) = acker.join().unwrap();
    let expected: Vec<String> = (0..20).map(|i| format!("l{i}")).collect();
    assert_eq!(cids(&shown), expected, "in order, each once");
    assert_eq!(shown.iter().map(id_of).collect::<Vec<_>>(), ids);
    assert_eq!(gw.metric(&bob_up), 0);
    assert_eq!(gw.metric_sum("ringgate_live_acked_total"), 20);
    let refused_first = gw.metric_sum("ringgate_store_refused_total");

    // B: bob stops acking. The live tail is bounded by the window (4): the rest is refused.
    for i in 0..6 {
        send(&mut a, &bob, &format!("h{i}"), json!(i));
    }
    let got: Vec<Value> = (0..4).map(|_| next_op(&mut b, "msg")).collect();
    assert_eq!(cids(&got), ["h0", "h1", "h2", "h3"]);
    let first = answers(&mut a, 2);
    assert_eq!(first["h4"], "unavailable");
    assert_eq!(first["h5"], "unavailable");

    // C: Redis comes back; the shard notices by itself (probe). Bob acks h0..h1: accepted.
    redis.restart();
    assert!(eventually(Duration::from_secs(10), || gw.metric(&bob_up) == 1));
    ack(&mut b, got[1]["seq"].as_u64().unwrap());
    let acked = answers(&mut a, 2);
    assert_eq!(
        (acked["h0"].as_str(), acked["h1"].as_str()),
        ("accepted", "accepted")
    );
    // h2, h3 are still live and unacked. A new message of alice's waits while h4 and h5,
    // refused, are not stored (resent on another node, they could get ids below it).
    send(&mut a, &bob, "h6", json!(6));
    assert_eq!(answers(&mut a, 1)["h6"], "unavailable");
    // h4 and h5 sent again (same cid, unmarked, as the SPEC asks) join the live tail (not
    // Redis), so they can never overtake h2 and h3.
    let live_before = gw.metric_sum("ringgate_live_sends_total");
    for (i, c) in [(4, "h4"), (5, "h5")] {
        send(&mut a, &bob, c, json!(i));
        assert_eq!(next_op(&mut b, "msg")["cid"], c);
    }
    assert_eq!(gw.metric_sum("ringgate_live_sends_total"), live_before + 2);
    // Nothing of phase B/C is in Redis. (The first send of the outage, refused when the
    // connection broke, may have been written once Redis was back: an uncertain write, which
    // bob's client drops by cid because l0 was shown to him live.)
    let stored = redis.cli(&["XRANGE", &inbox_key(&bob), "-", "+"]);
    assert!(!stored.contains("\"h"), "{stored}");

    // D: bob leaves without acking: his live entries go to Redis in order and are accepted.
    drop(b);
    let spilled = answers(&mut a, 4);
    for c in ["h2", "h3", "h4", "h5"] {
        assert_eq!(spilled[c], "accepted", "{c}");
    }
    assert_eq!(gw.metric_sum("ringgate_live_spilled_total"), 4);
    let stored = redis.cli(&["XRANGE", &inbox_key(&bob), "-", "+"]);
    assert_eq!(stored.matches("\"h").count(), 4, "{stored}");
    // Alice resends what was refused; bob reconnects and gets everything not acked, in the
    // order it was accepted (h2 to h5 were shown before: his client drops them by cid).
    send_until_accepted(&mut a, &bob, "h6");
    let mut b = connect(&gw, &format!("/ws?user={bob}"));
    next_op(&mut b, "welcome");
    let mut replay = Vec::new();
    loop {
        // More than a window (4) waits: synced comes once acks let the replay finish.
        let v = recv_json(&mut b);
        match v["op"].as_str() {
            Some("msg") => {
                ack(&mut b, v["seq"].as_u64().unwrap());
                replay.push(v);
            }
            Some("synced") => break,
            _ => panic!("unexpected {v}"),
        }
    }
    let (new, old): (Vec<String>, Vec<String>) =
        cids(&replay).into_iter().partition(|c| c.starts_with('h'));
    assert_eq!(new, ["h2", "h3", "h4", "h5", "h6"]);
    assert!(old.iter().all(|c| expected.contains(c)), "{old:?}");
    assert!(eventually(Duration::from_secs(5), || stream_len(
        &redis, &bob
    ) == 0));
    println!(
        "Redis down: 20 accepted on bob's acks ({refused_first} refused before the shard knew), \
         window-bounded tail refused 2 (sent again, they joined it), 4 live entries spilled in \
         order when bob left"
    );
}

/// Issue 16 item 2: a Redis that stops answering (SIGSTOP: connected, silent) opens each
/// shard's circuit breaker after 3 batches in a row time out; sends that need the store are
/// then answered `unavailable` at once, saying so, and `ringgate_redis_breaker_open` shows it.
/// Once Redis answers again a probe closes it, sends are accepted again, the writes that got
/// no answer are resolved (they ran once Redis went on: accepted), and the recipient gets
/// exactly the accepted messages, in the order their sender was told.
#[test]
fn a_silent_redis_opens_the_breaker_and_a_probe_closes_it() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let (mut alice, _) = connect_replay(&gw, "/ws?user=alice");
    send_accepted(&mut alice, "bob", "before", 1);
    assert_eq!(gw.metric_sum("ringgate_redis_breaker_open"), 0);
    // carol is online (in the directory) and leaves while the breaker is open: her `Leave` is
    // held back and sent once it closes, not lost.
    let carol_dir = "rg:loc:{u:carol}";
    let (carol, _) = connect_replay(&gw, "/ws?user=carol");
    assert!(eventually(Duration::from_secs(5), || redis
        .int(&["SCARD", carol_dir])
        == 1));
    redis.signal(libc::SIGSTOP);
    // One send after another until one is refused at once, the breaker being open. The first
    // ones were sent and got no answer in time: in doubt, their senders told nothing yet.
    let mut heard = Heard::default();
    heard.told.push("before0".into());
    let mut breaker_said = Vec::new();
    let mut sent = 0;
    let opened = eventually(Duration::from_secs(30), || {
        send(&mut alice, "bob", &format!("stopped{sent}"), json!(sent));
        sent += 1;
        for v in frames_before_pong(&mut alice) {
            let message = v["message"].as_str().unwrap_or_default().to_string();
            if message.contains("circuit breaker open") {
                breaker_said.push(message);
            }
            heard.hear(v);
        }
        !breaker_said.is_empty()
    });
    assert!(opened, "{sent} sends, none refused by the open breaker");
    assert!(gw.metric_sum("ringgate_redis_breaker_open") >= 1);
    assert!(
        !heard.first.contains_key("stopped0"),
        "a write that got no answer is not refused: it may have landed"
    );
    assert!(gw.metric_sum("ringgate_store_writes_in_doubt") >= 1);
    drop(carol);
    std::thread::sleep(Duration::from_millis(300)); // her Leave meets the open breaker
    redis.signal(libc::SIGCONT);
    // A probe closes it: resend one cid until it is accepted (bounded); the writes in doubt
    // are resolved meanwhile (they ran once Redis went on: accepted, in their order).
    let back = eventually(Duration::from_secs(30), || {
        if !heard.accepted_ids.contains_key("after") {
            heard.refused.retain(|c| c != "after");
            send(&mut alice, "bob", "after", json!("after"));
            std::thread::sleep(Duration::from_millis(200));
        }
        for v in frames_before_pong(&mut alice) {
            heard.hear(v);
        }
        heard.accepted_ids.contains_key("after")
            && gw.metric_sum("ringgate_store_writes_in_doubt") == 0
    });
    assert!(back, "never accepted again: {:?}", heard.told);
    assert!(
        heard.accepted_ids.contains_key("stopped0"),
        "{:?}",
        heard.told
    );
    assert!(eventually(Duration::from_secs(10), || gw
        .metric_sum("ringgate_redis_breaker_open")
        == 0));
    assert!(
        eventually(Duration::from_secs(10), || redis.int(&["SCARD", carol_dir])
            == 0),
        "carol's Leave was sent once the breaker closed"
    );
    // Bob gets what was accepted, in the order alice was told: nothing refused shows up.
    let (_bob, replay) = connect_replay(&gw, "/ws?user=bob");
    assert_eq!(cids(&replay), heard.told, "{replay:#?}");
}

/// An idle shard with Redis ticks seldom (issue 19: idle costs nothing) but never so seldom
/// that its node lease or its message id slot lapses: with a short lease, after several lease
/// periods with no client, both shards still hold their slots, nothing was logged as not
/// renewed, and a send is accepted at once.
#[test]
fn an_idle_node_keeps_its_lease_and_id_slots() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &["--node-lease-ms", "1500"]);
    assert!(eventually(Duration::from_secs(10), || gw
        .metric_sum("ringgate_message_id_slot_held")
        == SHARDS as u64));
    // The lease key (TTL = the lease) never lapses while the node idles: look every 50 ms.
    let idle_until = std::time::Instant::now() + Duration::from_millis(3 * 1500);
    let mut looks = 0;
    while std::time::Instant::now() < idle_until {
        let leases = redis.cli(&["keys", "rg:node:*"]);
        assert!(
            !leases.trim().is_empty(),
            "the node's lease lapsed after {looks} looks"
        );
        looks += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        gw.metric_sum("ringgate_message_id_slot_held"),
        SHARDS as u64
    );
    let late: Vec<String> = gw
        .stderr
        .try_iter()
        .filter(|l| l.contains("not renewed"))
        .collect();
    assert!(late.is_empty(), "{late:?}");
    let (mut a, _) = connect_app(&gw, "idle-a");
    send(&mut a, "idle-b", "c1", json!("after idle"));
    assert_eq!(next_op(&mut a, "accepted")["cid"], "c1");
}
