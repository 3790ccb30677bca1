//! Rooms (SPEC sections 3-4, issue 6), one gateway with several shards, real sockets:
//! fan-out to members on every shard, recovery with `since` (and an honest `recovered`),
//! publish dedup, leave, the token's `rooms` claim, bad input, slow consumers (`gap`, then
//! 1013), and `POST /api/publish`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SHARDS: usize = 4;
const KEY: &str = "rooms-api-key-0123";

fn publish(ws: &mut Ws, room: &str, cid: &str, body: Value) -> Value {
    send_text(
        ws,
        &json!({"op":"publish","room":room,"cid":cid,"body":body}).to_string(),
    );
    let a = next_op(ws, "accepted");
    assert_eq!(a["cid"], cid);
    a
}

fn offset(v: &Value) -> u64 {
    v["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset in {v}"))
}

/// Nothing more is waiting on `ws`: a ping is answered next.
fn nothing_pending(ws: &mut Ws) {
    send_text(ws, r#"{"op":"ping"}"#);
    let v = recv_json(ws);
    assert_eq!(v["op"], "pong", "expected nothing before pong, got {v}");
}

#[test]
fn a_publish_reaches_every_member_on_every_shard_once() {
    let gw = Gateway::start_shards(SHARDS, &[]);
    let users: Vec<String> = (0..SHARDS).map(|s| user_on("m", s, SHARDS)).collect();
    let mut members: Vec<Ws> = users.iter().map(|u| connect_app(&gw, u).0).collect();
    members.push(connect_app(&gw, &users[0]).0); // a second device of the same user
    let start: Vec<u64> = members
        .iter_mut()
        .map(|ws| offset(&join(ws, "lobby", None).1))
        .collect();
    assert!(
        start.windows(2).all(|w| w[0] == w[1]),
        "one room, one offset"
    );
    let (mut outsider, _) = connect_app(&gw, "outsider");
    let (mut publisher, _) = connect_app(&gw, &user_on("pub", 1, SHARDS));

    let accepted: Vec<Value> = (0..5)
        .map(|i| publish(&mut publisher, "lobby", &format!("p{i}"), json!({"n": i})))
        .collect();
    let offsets: Vec<u64> = accepted.iter().map(offset).collect();
    assert_eq!(offsets, (1..=5).map(|i| start[0] + i).collect::<Vec<_>>());
    for ws in members.iter_mut() {
        for (i, a) in accepted.iter().enumerate() {
            let m = next_op(ws, "room");
            assert_eq!(
                (
                    m["room"].as_str(),
                    offset(&m),
                    &m["id"],
                    &m["cid"],
                    &m["body"]["n"]
                ),
                (
                    Some("lobby"),
                    offsets[i],
                    &a["id"],
                    &json!(format!("p{i}")),
                    &json!(i)
                )
            );
            assert!(m["from"].as_str().unwrap().starts_with("pub"));
        }
        nothing_pending(ws);
    }
    nothing_pending(&mut outsider);
    assert_eq!(gw.metric_sum("ringgate_room_publishes_total"), 5);
    assert_eq!(gw.metric_sum("ringgate_room_deliveries_total"), 5 * 5);
    assert_eq!(gw.metric_sum("ringgate_room_members"), 5);
    assert_eq!(gw.metric_sum("ringgate_rooms"), 1);
}

#[test]
fn join_with_since_recovers_what_was_missed() {
    let gw = Gateway::start_shards(SHARDS, &["--room-history-max", "3"]);
    let (mut publisher, _) = connect_app(&gw, "pub");
    let (mut m, _) = connect_app(&gw, "member");
    let seen = offset(&join(&mut m, "news", None).1);
    drop(m);
    for i in 0..2 {
        publish(&mut publisher, "news", &format!("a{i}"), json!(i));
    }
    // Back within the history: everything missed, then joined with recovered:true.
    let (mut m, _) = connect_app(&gw, "member");
    let (replay, joined) = join(&mut m, "news", Some(seen));
    assert_eq!(
        replay.iter().map(offset).collect::<Vec<_>>(),
        [seen + 1, seen + 2]
    );
    assert_eq!(
        (offset(&joined), &joined["recovered"]),
        (seen + 2, &json!(true))
    );
    // Already up to date: nothing replayed, recovered.
    let (replay, joined) = join(&mut m, "news", Some(seen + 2));
    assert!(replay.is_empty());
    assert_eq!(joined["recovered"], true);
    // Further behind than the history (3): what is left, and recovered:false.
    drop(m);
    for i in 0..4 {
        publish(&mut publisher, "news", &format!("b{i}"), json!(i));
    }
    let (mut m, _) = connect_app(&gw, "member");
    let (replay, joined) = join(&mut m, "news", Some(seen + 2));
    assert_eq!(
        replay.iter().map(offset).collect::<Vec<_>>(),
        [seen + 4, seen + 5, seen + 6]
    );
    assert_eq!(
        (offset(&joined), &joined["recovered"]),
        (seen + 6, &json!(false))
    );
    // An offset the room never gave (e.g. from before a restart): nothing, not recovered.
    let (replay, joined) = join(&mut m, "news", Some(seen + 1000));
    assert!(replay.is_empty());
    assert_eq!(joined["recovered"], false);
    // Without since nothing is replayed and nothing is claimed.
    let (replay, joined) = join(&mut m, "news", None);
    assert!(replay.is_empty());
    assert_eq!(joined["recovered"], false);
    // Live messages follow the join, none twice.
    let a = publish(&mut publisher, "news", "c", json!(0));
    assert_eq!(offset(&next_op(&mut m, "room")), offset(&a));
    nothing_pending(&mut m);
}

#[test]
fn a_resent_publish_cid_is_published_once_and_leave_stops_delivery() {
    let gw = Gateway::start_shards(SHARDS, &[]);
    let (mut publisher, _) = connect_app(&gw, "pub");
    let (mut m, _) = connect_app(&gw, "member");
    join(&mut m, "r", None);
    let first = publish(&mut publisher, "r", "same", json!(1));
    let again = publish(&mut publisher, "r", "same", json!(1));
    assert_eq!(
        (&first["id"], offset(&first)),
        (&again["id"], offset(&again))
    );
    assert_eq!(offset(&next_op(&mut m, "room")), offset(&first));
    nothing_pending(&mut m);
    send_text(&mut m, r#"{"op":"leave","room":"r"}"#);
    assert_eq!(next_op(&mut m, "left")["room"], "r");
    publish(&mut publisher, "r", "after", json!(2));
    nothing_pending(&mut m);
    // Leaving a room one is not in is answered the same way (idempotent).
    send_text(&mut m, r#"{"op":"leave","room":"never"}"#);
    assert_eq!(next_op(&mut m, "left")["room"], "never");
    assert_eq!(gw.metric_sum("ringgate_room_members"), 0);
}

#[test]
fn the_tokens_rooms_claim_and_bad_input() {
    let secret = "rooms-test-secret-0123456789";
    let gw = Gateway::start_shards(2, &["--jwt-secret", secret]);
    let token = ringgate::auth::mint(secret, "carol", Some(vec!["allowed".into()]), 600);
    let mut ws = connect(&gw, &format!("/ws?token={token}"));
    next_op(&mut ws, "welcome");
    next_op(&mut ws, "synced");
    send_text(&mut ws, r#"{"op":"join","room":"secret"}"#);
    assert_eq!(next_op(&mut ws, "error")["code"], "forbidden");
    send_text(
        &mut ws,
        r#"{"op":"publish","room":"secret","cid":"x","body":1}"#,
    );
    let e = next_op(&mut ws, "error");
    assert_eq!(
        (e["code"].as_str(), &e["cid"]),
        (Some("forbidden"), &json!("x"))
    );
    let (_, joined) = join(&mut ws, "allowed", None);
    assert_eq!(joined["room"], "allowed");
    for bad in [
        r#"{"op":"join"}"#,
        r#"{"op":"join","room":7}"#,
        r#"{"op":"join","room":"allowed","since":"x"}"#,
        r#"{"op":"leave"}"#,
        r#"{"op":"publish","room":"allowed","body":1}"#,
        r#"{"op":"publish","room":"allowed","cid":"c"}"#,
        r#"{"op":"publish","cid":"c","body":1}"#,
    ] {
        send_text(&mut ws, bad);
        assert_eq!(next_op(&mut ws, "error")["code"], "bad_request", "{bad}");
    }
    // Still a member, still served: as a member the publisher gets its own message too (the
    // fan-out and the `accepted` may come in either order).
    send_text(
        &mut ws,
        r#"{"op":"publish","room":"allowed","cid":"ok","body":1}"#,
    );
    let two = [recv_json(&mut ws), recv_json(&mut ws)];
    let ops: std::collections::HashSet<&str> =
        two.iter().map(|v| v["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["room", "accepted"].into_iter().collect());
    assert_eq!(offset(&two[0]), offset(&two[1]));
}

/// A member whose socket takes little (16 KiB receive buffer, set before connecting), so the
/// kernel cannot hide that it does not read.
fn connect_small_rcvbuf(gw: &Gateway, user: &str) -> Ws {
    use std::os::fd::FromRawFd;
    let addr = match gw.public {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("IPv4 loopback expected, got {other}"),
    };
    // SAFETY: plain socket calls on a descriptor this function owns until it is handed to
    // TcpStream (which then owns and closes it).
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let size: libc::c_int = 16 * 1024;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect");
        std::net::TcpStream::from_raw_fd(fd)
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let url = gw.url(&format!("/ws?user={user}"));
    let (mut ws, _) = tungstenite::client(url, stream).expect("upgrade");
    next_op(&mut ws, "welcome");
    next_op(&mut ws, "synced");
    ws
}

#[test]
fn a_slow_member_gets_a_gap_then_1013_and_the_room_goes_on() {
    slow_member_case(&[]);
}

/// The same with the room's history and offsets in Redis (the cluster's path: every message
/// reaches the node through its channel before the fan-out).
#[test]
fn with_redis_a_slow_member_gets_a_gap_then_1013_and_recovers_from_the_history() {
    let redis = common::redis::RedisServer::start();
    let url = redis.url();
    slow_member_case(&["--redis-url", &url, "--node-id", "solo"]);
}

fn slow_member_case(store_args: &[&str]) {
    // The publisher bursts past the frame and send limits on purpose (tests/limits.rs has
    // those).
    let mut args = vec![
        "--max-outbound",
        "65536",
        "--slow-close-ms",
        "300",
        "--user-send-rate",
        "0",
        "--conn-frame-rate",
        "0",
    ];
    args.extend_from_slice(store_args);
    let gw = Gateway::start_shards(2, &args);
    let (mut publisher, _) = connect_app(&gw, "pub");
    let mut slow = connect_small_rcvbuf(&gw, "slow");
    join(&mut slow, "big", None);
    // The member reads nothing for now.
    let body = "x".repeat(16 * 1024);
    let total = 1000;
    // Enough to fill the kernel's socket buffers and the member's 64 KiB outbound buffer.
    for i in 0..total {
        send_text(
            &mut publisher,
            &json!({"op":"publish","room":"big","cid":format!("b{i}"),"body":body}).to_string(),
        );
    }
    for _ in 0..total {
        next_op(&mut publisher, "accepted");
    }
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_room_gaps_total")
        >= 1));
    // It never reads, so it stays behind: publishing on, a message that does not fit
    // slow_close_ms after the first skip closes it with 1013.
    let mut extra = 0;
    while gw.metric_sum("ringgate_slow_closes_total") == 0 {
        for _ in 0..50 {
            extra += 1;
            publish(&mut publisher, "big", &format!("late{extra}"), json!(body));
        }
        assert!(extra <= 5000, "a member that never reads was not closed");
    }
    assert_eq!(gw.metric_sum("ringgate_slow_closes_total"), 1);
    // What the slow member finally reads: room frames without holes except right after a
    // gap, each gap naming the offset after the last message it got, then close 1013.
    let (mut last, mut open_gap, mut rooms, mut gaps) = (None::<u64>, None::<u64>, 0, 0);
    loop {
        match slow.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["op"].as_str() {
                    Some("room") => {
                        let o = offset(&v);
                        match (open_gap.take(), last) {
                            (Some(from), _) => assert!(o > from, "{o} after gap from {from}"),
                            (None, Some(l)) => assert_eq!(o, l + 1, "a hole without a gap"),
                            (None, None) => {}
                        }
                        last = Some(o);
                        rooms += 1;
                    }
                    Some("gap") => {
                        let from = v["from"].as_u64().unwrap();
                        if let Some(l) = last {
                            assert_eq!(from, l + 1, "the gap starts after the last delivered");
                        }
                        open_gap = Some(from);
                        gaps += 1;
                    }
                    _ => panic!("unexpected {v}"),
                }
            }
            Ok(tungstenite::Message::Close(Some(c))) => {
                assert_eq!(u16::from(c.code), 1013);
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("expected close 1013, got {e}"),
        }
    }
    assert!(gaps >= 1, "at least one gap");
    assert_eq!(gaps as u64, gw.metric_sum("ringgate_room_gaps_total"));
    println!(
        "slow member: {rooms} room frames, {gaps} gap(s), then 1013 ({extra} extra publishes)"
    );
    // The room goes on for members that keep up.
    let (mut late, _) = connect_app(&gw, "late");
    join(&mut late, "big", None);
    let a = publish(&mut publisher, "big", "after", json!(1));
    assert_eq!(offset(&next_op(&mut late, "room")), offset(&a));
    // The slow member comes back and recovers from the last offset it got: the history's
    // messages after it, contiguous up to now, and `recovered` exactly when nothing is missing.
    let seen = last.expect("it got some room messages before falling behind");
    let (mut back, _) = connect_app(&gw, "slow");
    let (replay, joined) = join(&mut back, "big", Some(seen));
    let offsets: Vec<u64> = replay.iter().map(offset).collect();
    assert_eq!(offsets.last(), Some(&offset(&a)), "replayed up to now");
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "no hole in the replay"
    );
    assert_eq!(joined["recovered"], offsets[0] == seen + 1);
    println!(
        "slow member back: {} replayed, recovered {}",
        offsets.len(),
        joined["recovered"]
    );
}

#[test]
fn the_backend_publishes_through_the_api() {
    let gw = Gateway::start_shards(SHARDS, &["--api-key", KEY]);
    let (mut m, _) = connect_app(&gw, "member");
    join(&mut m, "alerts", None);
    let (status, v) = post_json(
        &gw,
        "/api/publish",
        r#"{"room":"alerts","body":{"level":2},"cid":"b-1"}"#,
        KEY,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["op"].as_str(), &v["cid"]),
        (Some("accepted"), &json!("b-1"))
    );
    let got = next_op(&mut m, "room");
    assert_eq!(
        (offset(&got), &got["from"], &got["body"]),
        (offset(&v), &json!("@backend"), &json!({"level":2}))
    );
    // The same cid again: the same offset, nothing new for members.
    let (_, again) = post_json(
        &gw,
        "/api/publish",
        r#"{"room":"alerts","body":{"level":2},"cid":"b-1"}"#,
        KEY,
    );
    assert_eq!(offset(&again), offset(&v));
    nothing_pending(&mut m);
    for bad in [
        r#"{"body":1}"#,
        r#"{"room":"alerts"}"#,
        r#"{"room":"","body":1}"#,
        "nope",
    ] {
        assert_eq!(post_json(&gw, "/api/publish", bad, KEY).0, 400, "{bad}");
    }
    assert_eq!(
        post_json(
            &gw,
            "/api/publish",
            r#"{"room":"alerts","body":1}"#,
            "wrong"
        )
        .0,
        401
    );
}
