//! The `presence` WebSocket op (SPEC section 3): each user's home shard answers, across shards
//! and devices; bad questions get `bad_request` and the connection stays usable.

mod common;

use std::time::Duration;

use common::*;

const SHARDS: usize = 4;

fn ask(ws: &mut Ws, users: &[&str]) -> serde_json::Value {
    send_text(
        ws,
        &serde_json::json!({"op":"presence","users":users}).to_string(),
    );
    next_op(ws, "presence")["online"].clone()
}

#[test]
fn presence_op_answers_from_every_home_shard() {
    let gw = Gateway::start_shards(SHARDS, &[]);
    let on: Vec<String> = (0..SHARDS).map(|s| user_on("on", s, SHARDS)).collect();
    let off: Vec<String> = (0..SHARDS).map(|s| user_on("off", s, SHARDS)).collect();
    let mut devices: Vec<Ws> = on.iter().map(|u| connect_app(&gw, u).0).collect();
    let second_device = connect_app(&gw, &on[1]).0;
    let (mut asker, _) = connect_app(&gw, "asker");

    let mut users: Vec<&str> = on.iter().chain(off.iter()).map(|s| s.as_str()).collect();
    users.push("asker");
    users.push(&on[0]); // asked twice: answered once
    let online = ask(&mut asker, &users);
    let mut expected = serde_json::Map::new();
    for u in &on {
        expected.insert(u.clone(), true.into());
    }
    for u in &off {
        expected.insert(u.clone(), false.into());
    }
    expected.insert("asker".into(), true.into());
    assert_eq!(online, serde_json::Value::Object(expected));

    // One of two devices leaves: still online. The last one leaves: offline.
    drop(second_device);
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_connections_open")
        == SHARDS as u64 + 1));
    assert_eq!(ask(&mut asker, &[&on[1]])[&on[1]], true);
    let mut leaving = devices.remove(1);
    leaving.close(None).unwrap();
    let _ = recv_close_code(&mut leaving);
    assert!(eventually(Duration::from_secs(5), || {
        ask(&mut asker, &[&on[1]])[&on[1]] == false
    }));
    assert_eq!(ask(&mut asker, &[]), serde_json::json!({}));
}

#[test]
fn presence_with_many_users_spread_over_shards() {
    let gw = Gateway::start_shards(SHARDS, &[]);
    let (mut asker, _) = connect_app(&gw, "asker");
    let names: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    let _online: Vec<Ws> = names
        .iter()
        .step_by(3)
        .map(|u| connect_app(&gw, u).0)
        .collect();
    let users: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let online = ask(&mut asker, &users);
    let map = online.as_object().unwrap();
    assert_eq!(map.len(), 100);
    for (i, u) in names.iter().enumerate() {
        assert_eq!(map[u], i % 3 == 0, "{u}");
    }
}

#[test]
fn bad_presence_frames_get_bad_request_and_the_connection_stays() {
    let gw = Gateway::start_shards(2, &[]);
    let (mut ws, _) = connect_app(&gw, "asker");
    let too_many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let frames = [
        r#"{"op":"presence"}"#.to_string(),
        r#"{"op":"presence","users":"bob"}"#.to_string(),
        r#"{"op":"presence","users":[7]}"#.to_string(),
        r#"{"op":"presence","users":[""]}"#.to_string(),
        serde_json::json!({"op":"presence","users":too_many,"cid":"p1"}).to_string(),
    ];
    let mut last = serde_json::Value::Null;
    for f in &frames {
        send_text(&mut ws, f);
        last = next_op(&mut ws, "error");
        assert_eq!(last["code"], "bad_request", "{f}: {last}");
    }
    assert_eq!(last["cid"], "p1");
    send_text(&mut ws, r#"{"op":"ping"}"#);
    next_op(&mut ws, "pong");
    assert_eq!(ask(&mut ws, &["asker"]), serde_json::json!({"asker": true}));
}

fn watch(ws: &mut Ws, users: &[&str]) -> serde_json::Value {
    send_text(
        ws,
        &serde_json::json!({"op":"watch","users":users}).to_string(),
    );
    next_op(ws, "presence")["online"].clone()
}

/// `watch` (issue 17): answered like `presence`, then told of every change: online at once,
/// offline once the user stayed offline for the grace period; a quick reconnect is told
/// nothing. Watchers on the user's home shard and on another; bounded per connection;
/// forgotten when the watcher leaves.
#[test]
fn watch_tells_online_at_once_and_offline_after_the_grace_without_flapping() {
    let gw = Gateway::start_shards(SHARDS, &["--presence-grace-ms", "1500"]);
    let bob = user_on("bob", 2, SHARDS);
    let carol = user_on("carol", 3, SHARDS);
    let (mut near, _) = connect_app(&gw, &user_on("near", 2, SHARDS));
    let (mut far, _) = connect_app(&gw, &user_on("far", 1, SHARDS));
    for w in [&mut near, &mut far] {
        assert_eq!(
            watch(w, &[&bob, &carol]),
            serde_json::json!({bob.as_str(): false, carol.as_str(): false})
        );
    }
    let on =
        |user: &str, online: bool| serde_json::json!({"op":"presence","online":{user: online}});
    let (b1, _) = connect_app(&gw, &format!("{bob}&device=one"));
    let (b2, _) = connect_app(&gw, &format!("{bob}&device=two"));
    for w in [&mut near, &mut far] {
        assert_eq!(recv_json(w), on(&bob, true));
        assert!(
            frames_before_pong(w).is_empty(),
            "a second device is no news"
        );
    }
    // One device leaves: still online. Both: offline, once the grace ran out.
    drop(b1);
    drop(b2);
    for w in [&mut near, &mut far] {
        assert_eq!(recv_json(w), on(&bob, false));
    }
    // Back, then a reconnect well within the grace: told online once, nothing else.
    let (b3, _) = connect_app(&gw, &bob);
    for w in [&mut near, &mut far] {
        assert_eq!(recv_json(w), on(&bob, true));
    }
    drop(b3);
    let (_b4, _) = connect_app(&gw, &bob);
    // `unwatch` carol on one connection: her change reaches only the other.
    send_text(
        &mut far,
        &serde_json::json!({"op":"unwatch","users":[carol]}).to_string(),
    );
    let _ = frames_before_pong(&mut far);
    let (_c, _) = connect_app(&gw, &carol);
    assert_eq!(recv_json(&mut near), on(&carol, true));
    std::thread::sleep(Duration::from_millis(2_500)); // past the grace: no offline came
    assert!(frames_before_pong(&mut near).is_empty());
    assert!(frames_before_pong(&mut far).is_empty());
    assert_eq!(gw.metric_sum("ringgate_presence_told_total"), 7);
    // At most 100 users per connection (`far` watches bob still).
    let many: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    send_text(
        &mut far,
        &serde_json::json!({"op":"watch","users":many}).to_string(),
    );
    let e = next_op(&mut far, "error");
    assert_eq!(e["code"], "bad_request", "{e}");
    assert_eq!(gw.metric_sum("ringgate_watch_refused_total"), 1);
    // The watchers leave: their home shards forget the users.
    assert!(gw.metric_sum("ringgate_watched_users") >= 2);
    drop((near, far));
    assert!(eventually(Duration::from_secs(10), || gw
        .metric_sum("ringgate_watched_users")
        == 0));
}

/// A watcher that arrives while another's grace period runs is answered "offline"; the grace
/// ends then (the first watcher is told offline too), so both hear the user come back.
#[test]
fn a_watcher_arriving_during_the_grace_hears_the_user_come_back() {
    let gw = Gateway::start_shards(SHARDS, &["--presence-grace-ms", "60000"]);
    let bob = user_on("bob", 2, SHARDS);
    let (mut x, _) = connect_app(&gw, &user_on("x", 1, SHARDS));
    let (b1, _) = connect_app(&gw, &bob);
    assert_eq!(
        watch(&mut x, &[&bob]),
        serde_json::json!({bob.as_str(): true})
    );
    drop(b1);
    assert!(eventually(Duration::from_secs(10), || gw
        .metric_sum("ringgate_users_online")
        == 1));
    // The same shard as x, and another one.
    let (mut y, _) = connect_app(&gw, &user_on("y", 1, SHARDS));
    let (mut z, _) = connect_app(&gw, &user_on("z", 3, SHARDS));
    assert_eq!(
        watch(&mut y, &[&bob]),
        serde_json::json!({bob.as_str(): false})
    );
    let off = serde_json::json!({"op":"presence","online":{bob.as_str(): false}});
    assert_eq!(recv_json(&mut x), off, "the grace ended: x is told too");
    assert_eq!(
        watch(&mut z, &[&bob]),
        serde_json::json!({bob.as_str(): false})
    );
    let (_b2, _) = connect_app(&gw, &bob);
    let on = serde_json::json!({"op":"presence","online":{bob.as_str(): true}});
    for w in [&mut x, &mut y, &mut z] {
        let mut got = frames_before_pong(w);
        if got.is_empty() {
            got.push(recv_json(w));
        }
        assert_eq!(got.last(), Some(&on), "{got:?}");
    }
}
