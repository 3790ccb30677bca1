//! The backend API on the admin listener: bearer API key, and presence answered by each
//! user's home shard through the mesh.

mod common;

use std::time::Duration;

use common::*;

const KEY: &str = "api-key-for-tests";

fn presence(gw: &Gateway, query: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}"));
    let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
    let (status, body) = http_get(gw.admin, &format!("/api/presence?{query}"), &headers);
    let v = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (status, v)
}

#[test]
fn api_needs_a_configured_key_and_the_right_one() {
    let closed = Gateway::start(&[]);
    assert_eq!(presence(&closed, "user=a", Some("anything")).0, 403);
    let gw = Gateway::start(&["--api-key", KEY]);
    assert_eq!(presence(&gw, "user=a", None).0, 401);
    assert_eq!(presence(&gw, "user=a", Some("wrong-key")).0, 401);
    assert_eq!(presence(&gw, "user=a", Some(KEY)).0, 200);
    let (status, _) = http_get(
        gw.admin,
        "/api/nope",
        &[&format!("Authorization: Bearer {KEY}")],
    );
    assert_eq!(status, 404);
}

#[test]
fn presence_follows_connections_across_shards_and_devices() {
    let gw = Gateway::start_raw(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--shards",
            "4",
            "--api-key",
            KEY,
        ],
        &[],
    );
    let mut alice_phone = connect_app(&gw, "alice").0;
    let alice_laptop = connect_app(&gw, "alice").0;
    let _bob = connect_app(&gw, "bob").0;
    let (status, v) = presence(&gw, "user=alice&user=bob&user=carol", Some(KEY));
    assert_eq!(status, 200);
    assert_eq!(
        v,
        serde_json::json!({"online": {"alice": true, "bob": true, "carol": false}})
    );
    assert_eq!(gw.metric_sum("ringgate_users_online"), 2);
    // One device leaves: still online. The last one leaves: offline.
    drop(alice_laptop);
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_connections_open")
        == 2));
    assert_eq!(
        presence(&gw, "user=alice", Some(KEY)).1["online"]["alice"],
        true
    );
    alice_phone.close(None).unwrap();
    let _ = recv_close_code(&mut alice_phone);
    assert!(eventually(Duration::from_secs(5), || {
        presence(&gw, "user=alice", Some(KEY)).1["online"]["alice"] == false
    }));
    assert_eq!(gw.metric_sum("ringgate_users_online"), 1);
}

#[test]
fn bad_presence_requests_are_400() {
    let gw = Gateway::start(&["--api-key", KEY]);
    assert_eq!(presence(&gw, "", Some(KEY)).0, 400);
    assert_eq!(presence(&gw, "user=", Some(KEY)).0, 400);
    assert_eq!(presence(&gw, "user=%zz", Some(KEY)).0, 400);
    let many: Vec<String> = (0..101).map(|i| format!("user=u{i}")).collect();
    assert_eq!(presence(&gw, &many.join("&"), Some(KEY)).0, 400);
    let hundred: Vec<String> = (0..100).map(|i| format!("user=u{i}")).collect();
    let (status, v) = presence(&gw, &hundred.join("&"), Some(KEY));
    assert_eq!(status, 200);
    assert_eq!(v["online"].as_object().unwrap().len(), 100);
}
