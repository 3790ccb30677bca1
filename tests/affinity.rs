//! User affinity inside a node: every connection of a user is owned by the user's home shard,
//! whichever shard the kernel handed the socket to (SO_REUSEPORT). Real process, real sockets.

mod common;

use std::io::Write;

use common::*;

fn shard_of(welcome: &serde_json::Value) -> String {
    // conn = "<node>-<shard>-<serial>"
    let conn = welcome["conn"].as_str().unwrap();
    conn.rsplit('-').nth(1).unwrap().to_string()
}

#[test]
fn every_device_of_a_user_lands_on_its_home_shard() {
    let gw = Gateway::start_shards(4, &[]);
    let mut devices = Vec::new();
    let mut shards = std::collections::BTreeSet::new();
    for d in 0..16 {
        let mut ws = connect(&gw, &format!("/ws?user=alice&device=d{d}"));
        let welcome = recv_json(&mut ws);
        assert_eq!(welcome["op"], "welcome");
        assert_eq!(recv_json(&mut ws)["op"], "synced");
        shards.insert(shard_of(&welcome));
        devices.push(ws);
    }
    assert_eq!(
        shards.len(),
        1,
        "all of alice's devices on one shard: {shards:?}"
    );
    let home = shards.into_iter().next().unwrap();
    for s in 0..4 {
        let open = gw.metric(&format!("ringgate_connections_open{{shard=\"{s}\"}}"));
        let expected = if s.to_string() == home { 16 } else { 0 };
        assert_eq!(open, expected, "shard {s}");
    }
    // The kernel spreads sockets over 4 listeners, so most were handed over, and every one
    // handed out was adopted (a hand-off is counted out once its message is sent: the
    // count in may be seen first).
    assert!(gw.metric_sum("ringgate_handoffs_out_total") > 0);
    assert!(eventually(std::time::Duration::from_secs(10), || gw
        .metric_sum("ringgate_handoffs_out_total")
        == gw.metric_sum("ringgate_handoffs_in_total")));
    // Handed-over connections serve normally.
    for ws in devices.iter_mut() {
        send_text(ws, r#"{"op":"ping"}"#);
        assert_eq!(recv_json(ws)["op"], "pong");
    }
}

#[test]
fn frames_sent_with_the_request_are_answered_after_welcome_even_across_shards() {
    let gw = Gateway::start_shards(4, &[]);
    for i in 0..24 {
        // Request head and a masked {"op":"ping"} text frame in one write.
        let mut s = std::net::TcpStream::connect(gw.public).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut bytes = format!("GET /ws?user=eager{i} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").into_bytes();
        let payload = br#"{"op":"ping"}"#;
        let mask = [1u8, 2, 3, 4];
        bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
        bytes.extend_from_slice(&mask);
        bytes.extend(payload.iter().enumerate().map(|(j, b)| b ^ mask[j % 4]));
        s.write_all(&bytes).unwrap();
        let mut raw = RawWs::after_upgrade(s);
        let ops: Vec<String> = (0..3)
            .map(|_| raw.recv_json()["op"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ops, ["welcome", "synced", "pong"], "user eager{i}");
    }
    assert!(gw.metric_sum("ringgate_handoffs_out_total") > 0);
}
