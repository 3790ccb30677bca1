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
    // Every refusal counted, by status.
    let refused = |gw: &Gateway, status: u16| {
        gw.metric(&format!(
            "ringgate_api_refused_total{{shard=\"admin\",status=\"{status}\"}}"
        ))
    };
    assert_eq!(refused(&closed, 403), 1);
    assert_eq!(
        (refused(&gw, 401), refused(&gw, 404), refused(&gw, 400)),
        (2, 1, 0)
    );
}

/// RFC 9110 section 11.6.1 and RFC 6750 section 3: the API's 401 says `WWW-Authenticate:
/// Bearer`, with `error="invalid_token"` for a wrong key; the body stays the JSON error.
#[test]
fn api_401_carries_a_bearer_challenge() {
    let gw = Gateway::start(&["--api-key", KEY]);
    let answer = |headers: &[&str]| {
        let mut all = vec!["Connection: close"];
        all.extend_from_slice(headers);
        let mut head = format!(
            "GET /api/presence?user=a HTTP/1.1\r\nHost: {}\r\n",
            gw.admin
        );
        for h in all {
            head.push_str(&format!("{h}\r\n"));
        }
        head.push_str("\r\n");
        let (status, text) = exchange(gw.admin, &head);
        assert_eq!(status, 401, "{text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let challenges: Vec<String> = head
            .lines()
            .filter_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("www-authenticate:")
                    .map(|v| v.trim().to_string())
            })
            .collect();
        (challenges, body.to_string())
    };
    let (challenges, body) = answer(&[]);
    assert_eq!(challenges, ["bearer"]);
    assert!(body.contains("missing or wrong API key"), "{body}");
    let (challenges, _) = answer(&["Authorization: Bearer wrong-key"]);
    assert_eq!(challenges, [r#"bearer error="invalid_token""#]);
    let (challenges, _) = answer(&["Authorization: Basic YTpi"]);
    assert_eq!(challenges, ["bearer"]);
}

#[test]
fn presence_follows_connections_across_shards_and_devices() {
    let gw = Gateway::start_shards(4, &["--api-key", KEY]);
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
    assert_eq!(
        gw.metric("ringgate_api_refused_total{shard=\"admin\",status=\"400\"}"),
        4
    );
}

fn post_send(gw: &Gateway, body: &str, key: &str) -> (u16, serde_json::Value) {
    post_json(gw, "/api/send", body, key)
}

#[test]
fn backend_send_is_accepted_once_safe_deduped_and_delivered() {
    let gw = Gateway::start(&["--api-key", KEY]);
    // Offline recipient: accepted = stored in the inbox.
    let (status, v) = post_send(
        &gw,
        r#"{"to":"zoe","body":{"alert":"hi"},"cid":"b-1"}"#,
        KEY,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["op"], "accepted");
    assert_eq!(v["cid"], "b-1");
    let id = v["id"].clone();
    // The same cid again: the same id, no second message.
    let (status, again) = post_send(
        &gw,
        r#"{"to":"zoe","body":{"alert":"hi"},"cid":"b-1"}"#,
        KEY,
    );
    assert_eq!((status, &again["id"]), (200, &id));
    // Without a cid one is generated.
    let (status, gen) = post_send(&gw, r#"{"to":"zoe","body":2}"#, KEY);
    assert_eq!(status, 200);
    assert!(gen["cid"].as_str().unwrap().starts_with("api-"));
    let mut ws = connect(&gw, "/ws?user=zoe");
    assert_eq!(recv_json(&mut ws)["op"], "welcome");
    let m1 = recv_json(&mut ws);
    assert_eq!(
        (m1["op"].as_str(), m1["from"].as_str()),
        (Some("msg"), Some("@backend"))
    );
    assert_eq!(m1["body"], serde_json::json!({"alert":"hi"}));
    assert_eq!(m1["id"], id);
    assert_eq!(recv_json(&mut ws)["body"], 2);
    assert_eq!(
        recv_json(&mut ws),
        serde_json::json!({"op":"synced","count":2})
    );
}

#[test]
fn backend_send_refuses_bad_input_and_a_full_inbox() {
    let gw = Gateway::start(&["--api-key", KEY, "--inbox-max-messages", "1"]);
    assert_eq!(post_send(&gw, "not json", KEY).0, 400);
    assert_eq!(post_send(&gw, r#"{"body":1}"#, KEY).0, 400);
    assert_eq!(post_send(&gw, r#"{"to":"x"}"#, KEY).0, 400);
    assert_eq!(
        post_send(&gw, r#"{"to":"x","body":1,"cid":""}"#, KEY).0,
        400
    );
    assert_eq!(post_send(&gw, r#"{"to":"x","body":1}"#, "wrong").0, 401);
    assert_eq!(
        post_send(&gw, r#"{"to":"x","body":1,"cid":"one"}"#, KEY).0,
        200
    );
    let (status, v) = post_send(&gw, r#"{"to":"x","body":1,"cid":"two"}"#, KEY);
    assert_eq!(status, 503);
    assert_eq!(
        (v["error"].as_str(), v["cid"].as_str()),
        (Some("unavailable"), Some("two"))
    );
}

/// SPEC section 3: a `body` that is not I-JSON (nested over 64, a number beyond a double, a
/// lone surrogate) is refused with 400 / `bad_request` on `POST /api/send`, `POST
/// /api/publish` and a client `send` and `publish`, and nothing of it is stored or shown.
#[test]
fn a_body_that_is_not_i_json_is_refused_everywhere() {
    let gw = Gateway::start(&["--api-key", KEY]);
    let deep = format!("{}1{}", "[".repeat(30_000), "]".repeat(30_000));
    let bodies = [
        (deep, "nested deeper"),
        (
            format!("{}1{}", "[".repeat(65), "]".repeat(65)),
            "nested deeper",
        ),
        ("1e400".to_string(), "range of a double"),
        (r#""\ud800""#.to_string(), "lone surrogate"),
    ];
    let (mut sender, _) = connect_replay(&gw, "/ws?user=mallory");
    for (body, why) in &bodies {
        for (path, target) in [
            ("/api/send", r#""to":"victim""#),
            ("/api/publish", r#""room":"lobby""#),
        ] {
            let (status, v) = post_json(&gw, path, &format!(r#"{{{target},"body":{body}}}"#), KEY);
            assert_eq!(status, 400, "{path} {why}: {v}");
            assert!(v.to_string().contains(why), "{path}: {v}");
        }
        for op in [
            r#""op":"send","to":"victim""#,
            r#""op":"publish","room":"lobby""#,
        ] {
            send_text(&mut sender, &format!(r#"{{{op},"cid":"x","body":{body}}}"#));
            let answer = recv_json(&mut sender);
            assert_eq!(
                (
                    answer["op"].as_str(),
                    answer["code"].as_str(),
                    answer["cid"].as_str()
                ),
                (Some("error"), Some("bad_request"), Some("x")),
                "{answer}"
            );
            assert!(
                answer["message"].as_str().unwrap().contains(why),
                "{answer}"
            );
        }
    }
    // The connection stays open and a good send goes through; the victim gets only that one.
    send_text(
        &mut sender,
        r#"{"op":"send","to":"victim","cid":"fine","body":[1e308]}"#,
    );
    assert_eq!(recv_json(&mut sender)["op"], "accepted");
    let (_victim, replay) = connect_replay(&gw, "/ws?user=victim");
    assert_eq!(replay.len(), 1, "{replay:?}");
    assert_eq!(replay[0]["cid"], "fine");
    assert!(gw.metric_sum("ringgate_bad_frames_total") >= 8);
}

/// Issue 17 item 6: a backend message may carry a `type` (e.g. `system`), shown to the
/// recipient in `msg` (a client's message has none); a bad `type`, or one on `/api/publish`,
/// is a 400 that takes nothing.
#[test]
fn a_backend_message_carries_its_type_to_the_recipient() {
    let gw = Gateway::start(&["--api-key", KEY]);
    let (status, v) = post_send(
        &gw,
        r#"{"to":"zoe","body":{"text":"maintenance at 2"},"cid":"t-1","type":"system"}"#,
        KEY,
    );
    assert_eq!(status, 200, "{v}");
    for bad in [
        r#""""#,
        r#""System""#,
        r#""1x""#,
        r#""a b""#,
        "7",
        r#""x\u0000""#,
    ] {
        let body = format!(r#"{{"to":"zoe","body":1,"type":{bad}}}"#);
        let (status, v) = post_send(&gw, &body, KEY);
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains("`type`"), "{v}");
    }
    let long = format!(r#"{{"to":"zoe","body":1,"type":"{}"}}"#, "a".repeat(33));
    assert_eq!(post_send(&gw, &long, KEY).0, 400);
    let (status, _) = post_json(
        &gw,
        "/api/publish",
        r#"{"room":"lobby","body":1,"type":"system"}"#,
        KEY,
    );
    assert_eq!(status, 400);
    let (mut alice, _) = connect_app(&gw, "alice");
    send(&mut alice, "zoe", "c-1", serde_json::json!("hi"));
    assert_eq!(next_op(&mut alice, "accepted")["cid"], "c-1");
    let (_zoe, msgs) = connect_replay(&gw, "/ws?user=zoe");
    assert_eq!(msgs.len(), 2, "the 400s took nothing: {msgs:?}");
    assert_eq!(msgs[0]["type"], "system");
    assert_eq!(msgs[0]["from"], "@backend");
    assert!(msgs[1].get("type").is_none(), "{}", msgs[1]);
}

/// A known admin path asked with the wrong method is a 405 naming what it takes (`Allow`),
/// not a 404; every GET path answers HEAD with its head only (issue 19, item 4).
#[test]
fn wrong_methods_get_405_with_allow_and_head_answers_like_get() {
    let gw = Gateway::start(&["--api-key", KEY]);
    for (method, path, allow) in [
        ("GET", "/api/send", "POST"),
        ("GET", "/api/publish", "POST"),
        ("POST", "/api/presence", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/ops", "GET, HEAD"),
    ] {
        let (status, text) = {
            let head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            exchange(gw.admin, &head)
        };
        assert_eq!(status, 405, "{method} {path}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains(&format!("allow: {}", allow.to_ascii_lowercase())),
            "{method} {path}: {text}"
        );
    }
    assert_eq!(http_get(gw.admin, "/nope", &[]).0, 404);
    // HEAD: the status and headers of GET, no body.
    for path in ["/metrics", "/healthz", "/readyz", "/ops"] {
        let (status, text) = exchange(
            gw.admin,
            &format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 200, "HEAD {path}: {text}");
        let body = text.split_once("\r\n\r\n").map_or("", |x| x.1);
        assert!(body.is_empty(), "HEAD {path} sent a body: {body:?}");
    }
    assert!(gw.metric("ringgate_api_refused_total{shard=\"admin\",status=\"405\"}") >= 3);
}
