//! Rate limits (SPEC section 4, "Limits") against a real gateway over real sockets: what a
//! flooding client gets, what a polite client beside it keeps, per-address upgrade limits, and
//! that the limits never cost a well-behaved client a message.
//! (How fast the polite client stays under a flood is measured by `ringgate-bench flood`.)

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use ringgate::client::{Client, ClientConfig, Event};

/// 8,000 `send` frames in one write from one connection (as in the issue, with the default
/// limits): the flood gets `rate_limited` with cids and `retry_ms` and is closed with 1008;
/// exactly the sends answered `accepted` reach the recipient (a frame not answered before
/// the close is not taken); a polite client on the same
/// shard sending meanwhile has every send accepted and is never limited.
#[test]
fn a_flood_is_limited_and_closed_while_a_polite_client_on_the_same_shard_is_not() {
    let gw = Gateway::start_shards(1, &[]);
    let mut flood = RawWs::connect(gw.public, "/ws?user=flood");
    assert_eq!(flood.recv_json()["op"], "welcome");
    assert_eq!(flood.recv_json()["op"], "synced");
    let mut polite = Client::connect(ClientConfig::dev(&gw.url("/ws"), "polite")).unwrap();

    let mut burst = Vec::new();
    for i in 0..8_000 {
        let text = format!(r#"{{"op":"send","to":"sink","cid":"f{i}","body":{i}}}"#);
        burst.extend(masked_text(text.as_bytes()));
    }
    let mut writer = flood.stream.try_clone().unwrap();
    let write = std::thread::spawn(move || {
        // The gateway may close and stop reading before all of it is written.
        let _ = writer.write_all(&burst);
    });
    for i in 0..50 {
        polite.send("sink", serde_json::json!({ "n": i })).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }

    let (frames, close) = flood.until_close();
    assert_eq!(close.close_code(), Some(1008), "a flood is closed");
    let mut accepted = BTreeSet::new();
    let mut limited = 0;
    for f in &frames {
        let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
        match v["op"].as_str() {
            Some("accepted") => {
                accepted.insert(v["cid"].as_str().unwrap().to_string());
            }
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert!(v["cid"].as_str().unwrap().starts_with('f'), "{v}");
                assert!(v["retry_ms"].as_u64().unwrap() >= 1, "{v}");
                limited += 1;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    let _ = write.join();
    assert!(limited > 0);
    // At most the user's burst is taken; how much of it depends on how the 8,000 frames were
    // split into reads (frames of the read that ends in the close are not taken at all).
    assert!(
        accepted.len() <= 200,
        "the user burst bounds what is accepted: {}",
        accepted.len()
    );

    // The polite client: every send accepted, none limited.
    let mut polite_accepted = 0;
    let mut polite_errors = Vec::new();
    assert!(eventually(Duration::from_secs(20), || {
        while let Ok(Some(event)) = polite.poll(Duration::from_millis(50)) {
            match event {
                Event::Accepted { .. } => polite_accepted += 1,
                Event::Error { code, .. } => polite_errors.push(code),
                _ => {}
            }
        }
        polite_accepted == 50
    }));
    assert!(polite_errors.is_empty(), "{polite_errors:?}");

    // The recipient gets exactly what was accepted from the flood, and all of polite's.
    let mut sink = Client::connect(ClientConfig::dev(&gw.url("/ws"), "sink")).unwrap();
    let mut from_flood = BTreeSet::new();
    let mut from_polite = 0;
    assert!(eventually(Duration::from_secs(20), || {
        while let Ok(Some(event)) = sink.poll(Duration::from_millis(50)) {
            if let Event::Message { from, cid, .. } = event {
                match from.as_str() {
                    "flood" => assert!(from_flood.insert(cid.as_str().unwrap().to_string())),
                    _ => from_polite += 1,
                }
            }
        }
        from_flood.len() == accepted.len() && from_polite == 50
    }));
    assert_eq!(from_flood, accepted, "nothing taken from a refused frame");
    assert_eq!(
        gw.metric(r#"ringgate_rate_limit_closes_total{shard="0"}"#),
        1
    );
    let counted = gw.metric(r#"ringgate_rate_limited_total{shard="0",limit="frames"}"#)
        + gw.metric(r#"ringgate_rate_limited_total{shard="0",limit="sends"}"#);
    assert!(counted >= limited, "{counted} counted, {limited} answered");
}

/// Per source address, at the upgrade: past `ip_max_open` open connections, and past the
/// connect rate, 429 with Retry-After; another address is not affected; a closed connection
/// gives its slot back.
#[test]
fn an_address_over_its_open_or_connect_limit_gets_429_and_others_do_not() {
    let gw = Gateway::start(&[
        "--ip-connect-rate",
        "1",
        "--ip-connect-burst",
        "3",
        "--ip-max-open",
        "2",
    ]);
    let one = connect(&gw, "/ws?user=a1");
    let _two = connect(&gw, "/ws?user=a2");
    let (status, head) = upgrade_from(gw.public, [127, 0, 0, 1]);
    assert_eq!(status, 429, "third open connection: {head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 5"),
        "{head}"
    );
    let (status, head) = upgrade_from(gw.public, [127, 0, 0, 1]);
    assert_eq!(status, 429, "fourth connect in a second: {head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let (status, head) = upgrade_from(gw.public, [127, 0, 0, 2]);
    assert_eq!(status, 101, "another address: {head}");
    assert_eq!(
        gw.metric_sum_where("ringgate_connections_refused_total", "reason=\"ip_open\""),
        1
    );
    assert_eq!(
        gw.metric_sum_where("ringgate_connections_refused_total", "reason=\"ip_rate\""),
        1
    );

    drop(one);
    // The close is seen and a token is back (1 a second): the address may connect again.
    assert!(eventually(Duration::from_secs(10), || {
        upgrade_from(gw.public, [127, 0, 0, 1]).0 == 101
    }));
}

/// A client that acks every message of a replay bigger than its frame burst is never limited
/// for it: acks that acknowledge something are free (the gateway paces them itself).
#[test]
fn a_big_replay_acked_message_by_message_is_never_rate_limited() {
    let gw = Gateway::start(&[
        "--conn-frame-rate",
        "5",
        "--conn-frame-burst",
        "20",
        "--api-key",
        "limits-test-api-key",
    ]);
    for i in 0..300 {
        let body = format!(r#"{{"to":"reader","body":{{"n":{i}}}}}"#);
        let (status, answer) = post_json(&gw, "/api/send", &body, "limits-test-api-key");
        assert_eq!(status, 200, "{answer}");
    }
    let mut reader = Client::connect(ClientConfig::dev(&gw.url("/ws"), "reader")).unwrap();
    let mut got = Vec::new();
    let mut errors = Vec::new();
    assert!(eventually(Duration::from_secs(30), || {
        while let Ok(Some(event)) = reader.poll(Duration::from_millis(50)) {
            match event {
                Event::Message { body, .. } => got.push(body["n"].as_u64().unwrap()),
                Event::Error { code, .. } => errors.push(code),
                _ => {}
            }
        }
        got.len() >= 300
    }));
    assert_eq!(got, (0..300).collect::<Vec<_>>());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        gw.metric_sum_where("ringgate_rate_limited_total", "limit=\"frames\""),
        0
    );
}

/// `ringgate::client` resends a send refused with `rate_limited` after the `retry_ms` it was
/// told: 60 sends through a user limit of 5 at once and 50 a second all arrive, exactly once,
/// in the order they were accepted.
#[test]
fn the_client_resends_what_was_rate_limited_and_loses_nothing() {
    let gw = Gateway::start(&["--user-send-rate", "50", "--user-send-burst", "5"]);
    let mut reader = Client::connect(ClientConfig::dev(&gw.url("/ws"), "bo")).unwrap();
    let mut writer = Client::connect(ClientConfig::dev(&gw.url("/ws"), "al")).unwrap();
    let mut cid_of = HashMap::new();
    for i in 0..60u64 {
        let cid = writer.send("bo", serde_json::json!(i)).unwrap();
        cid_of.insert(cid, i);
    }
    let mut accepted_order = Vec::new();
    let mut limited = 0;
    let mut received = Vec::new();
    assert!(eventually(Duration::from_secs(30), || {
        while let Ok(Some(event)) = writer.poll(Duration::from_millis(10)) {
            match event {
                Event::Accepted { cid, .. } => accepted_order.push(cid_of[&cid]),
                Event::Error { code, .. } if code == "rate_limited" => limited += 1,
                Event::Error { code, .. } => panic!("{code}"),
                _ => {}
            }
        }
        while let Ok(Some(event)) = reader.poll(Duration::from_millis(10)) {
            if let Event::Message { body, .. } = event {
                received.push(body.as_u64().unwrap());
            }
        }
        received.len() >= 60 && accepted_order.len() >= 60
    }));
    assert!(limited > 0, "the limit was met");
    assert_eq!(received, accepted_order, "order as accepted, nothing twice");
    let distinct: BTreeSet<_> = received.iter().collect();
    assert_eq!(distinct.len(), 60);
}

/// A masked text frame (the mask is fixed; the gateway only needs one).
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![0x81];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// Upgrade from the loopback address `from` (any of 127.0.0.0/8): (status, response head).
fn upgrade_from(to: SocketAddr, from: [u8; 4]) -> (u16, String) {
    use std::io::Read;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local = SocketAddr::from((from, 0));
    socket.bind(&local.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!("GET /ws?user=x{} HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", from[3]);
    stream.write_all(head.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}
