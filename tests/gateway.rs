//! End-to-end behaviour of the gateway process over real loopback sockets (SPEC sections 2, 3,
//! 6, 7): upgrade and every refusal, welcome, ping/pong, bad frames, limits, heartbeats,
//! handshake timeout, /metrics, /echo, SIGTERM drain, and the command line.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use tungstenite::Message;

fn token(user: &str, ttl: &str) -> String {
    let out = run_ringgate(
        &[
            "token",
            "--user",
            user,
            "--ttl",
            ttl,
            "--jwt-secret",
            SECRET,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn valid_token_upgrades_and_welcome_comes_first() {
    let gw = Gateway::start(&["--jwt-secret", SECRET, "--heartbeat-ms", "15000"]);
    let t = token("alice", "1h");
    // Token in the query string.
    let mut ws = connect(&gw, &format!("/ws?token={t}"));
    let welcome = recv_json(&mut ws);
    assert_eq!(welcome["op"], "welcome");
    assert_eq!(welcome["v"], 1);
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["heartbeat_ms"], 15000);
    assert_eq!(welcome["max_frame"], 65536);
    assert!(welcome["conn"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(
        recv_json(&mut ws),
        serde_json::json!({"op":"synced","count":0})
    );
    // Token in the Authorization header.
    let mut ws2 = connect_with(&gw, "/ws", &[("authorization", &format!("Bearer {t}"))]).unwrap();
    let w2 = recv_json(&mut ws2);
    assert_eq!(w2["user"], "alice");
    assert_ne!(
        w2["conn"], welcome["conn"],
        "each connection has its own id"
    );
}

#[test]
fn refusals_are_plain_http_before_the_upgrade() {
    let gw = Gateway::start(&[
        "--jwt-secret",
        SECRET,
        "--allowed-origins",
        "https://app.example,https://admin.example",
    ]);
    let ok_origin = "Origin: https://app.example";
    let good = token("bob", "1h");
    // 401: missing, garbage, wrong secret, expired.
    assert_eq!(upgrade_status(gw.public, "/ws", &[ok_origin]).0, 401);
    assert_eq!(
        upgrade_status(gw.public, "/ws?token=garbage", &[ok_origin]).0,
        401
    );
    let other = run_ringgate(
        &[
            "token",
            "--user",
            "bob",
            "--jwt-secret",
            "a-completely-different-secret",
        ],
        &[],
    );
    let other = String::from_utf8(other.stdout).unwrap();
    assert_eq!(
        upgrade_status(
            gw.public,
            &format!("/ws?token={}", other.trim()),
            &[ok_origin]
        )
        .0,
        401
    );
    let expired = expired_token("bob");
    let (code, text) = upgrade_status(gw.public, &format!("/ws?token={expired}"), &[ok_origin]);
    assert_eq!(code, 401);
    assert!(text.contains("expired"), "{text}");
    // 403: origin not allowed (and missing origin).
    assert_eq!(
        upgrade_status(
            gw.public,
            &format!("/ws?token={good}"),
            &["Origin: https://evil.example"]
        )
        .0,
        403
    );
    assert_eq!(
        upgrade_status(gw.public, &format!("/ws?token={good}"), &[]).0,
        403
    );
    // The allowed origin passes.
    let mut ws = connect_with(
        &gw,
        &format!("/ws?token={good}"),
        &[("origin", "https://admin.example")],
    )
    .expect("allowed origin upgrades");
    assert_eq!(recv_json(&mut ws)["op"], "welcome");
    // 404 unknown path, 426 plain GET on /ws, 405 wrong method.
    assert_eq!(upgrade_status(gw.public, "/nope", &[]).0, 404);
    let (code, body) = http_get(gw.public, "/ws", &[]);
    assert_eq!(code, 426, "{body}");
    let (code, _) = http_request(
        gw.public,
        "POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(code, 405);
    // Counted per reason.
    assert!(gw.metric_sum("ringgate_connections_refused_total") >= 9);
}

/// RFC 6455 section 4.2.1 and SPEC section 2, over a real socket: each malformed upgrade is a
/// 400 that says what was wrong, a token not valid yet and the gateway's own `@backend` are a
/// 401, and a body on the upgrade is refused instead of being read as WebSocket frames.
#[test]
fn an_upgrade_that_is_not_rfc_6455_exact_is_refused_before_the_upgrade() {
    let gw = Gateway::start(&["--jwt-secret", SECRET]);
    let good = token("bob", "1h");
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let head = |version: &str, headers: &str| {
        format!("GET /ws?token={good} HTTP/{version}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n")
    };
    let with_key = |k: &str| head("1.1", &format!("Host: x\r\nSec-WebSocket-Key: {k}\r\n"));
    // A masked ping after the head: a gateway reading the body as frames would answer it.
    let ping_body = "Content-Length: 6\r\n";
    let cases = [
        (head("1.0", &format!("Host: x\r\n{key}")), "HTTP/1.1"),
        (head("1.1", key), "Host"),
        (
            head("1.1", &format!("Host: x\r\n{key}{key}")),
            "more than one",
        ),
        (with_key("!!!not-base64!!!"), "base64"),
        (with_key("AAAA"), "base64"),
        (with_key(&"A".repeat(300)), "base64"),
        (with_key("dGhlIHNhbXBs ZSBub25jZQ=="), "base64"),
        (with_key("="), "base64"),
        (with_key("dGhlIHNhbXBsZSBub25jZQ"), "base64"),
        (
            head("1.1", &format!("Host: x\r\n{key}{ping_body}")),
            "no body",
        ),
    ];
    for (request, why) in &cases {
        let mut request = request.clone().into_bytes();
        if request.windows(14).any(|w| w == b"Content-Length") {
            request.extend_from_slice(&[0x89, 0x80, 1, 2, 3, 4]);
        }
        let mut s = TcpStream::connect(gw.public).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&request).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{why}: {answer}");
        assert!(answer.contains(why), "{why:?} not in {answer}");
    }
    let signed = |claims: serde_json::Value| {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        encode(&Header::default(), &claims, &key).unwrap()
    };
    let now = ringgate::auth::now_unix();
    let not_yet = signed(serde_json::json!({"sub": "bob", "exp": now + 7200, "nbf": now + 3600}));
    let (code, text) = upgrade_status(gw.public, &format!("/ws?token={not_yet}"), &[]);
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("not valid yet"), "{text}");
    // Signed here: `ringgate token` refuses a user the gateway would refuse.
    let backend = signed(serde_json::json!({"sub": "@backend", "exp": now + 3600}));
    let (code, text) = upgrade_status(gw.public, &format!("/ws?token={backend}"), &[]);
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("gateway's own"), "{text}");
    assert!(
        gw.metric_sum("ringgate_connections_refused_total") >= cases.len() as u64 + 2,
        "every refusal counted"
    );
    // The well-formed upgrade still passes.
    let mut ws = connect(&gw, &format!("/ws?token={good}"));
    assert_eq!(recv_json(&mut ws)["op"], "welcome");
}

/// Write `head` on a new connection to the public listener and read the 101 (panics on a
/// refusal, showing it).
fn raw_upgrade(gw: &Gateway, head: &str) -> RawWs {
    let mut s = TcpStream::connect(gw.public).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    RawWs::after_upgrade(s)
}

/// `request_line`, then `headers` (each ending in CRLF), then the version and a good key.
fn upgrade_head(request_line: &str, headers: &str) -> String {
    format!("{request_line}\r\n{headers}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
}

const UPGRADE_LINES: &str = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";

fn bad_requests(gw: &Gateway) -> u64 {
    gw.metric_sum_where(
        "ringgate_connections_refused_total",
        "reason=\"bad_request\"",
    )
}

/// RFC 6455 section 4.2.1 item 1, over a real socket: an absolute http/https URI names the
/// resource (its query carries the token); ws/wss absolute forms are not in the RFC (404).
#[test]
fn an_absolute_http_uri_upgrades() {
    let gw = Gateway::start(&["--jwt-secret", SECRET]);
    let good = token("bob", "1h");
    let addr = gw.public;
    for scheme in ["http", "https"] {
        let line = format!("GET {scheme}://{addr}/ws?token={good} HTTP/1.1");
        let mut ws = raw_upgrade(&gw, &upgrade_head(&line, UPGRADE_LINES));
        let welcome = ws.recv_json();
        assert_eq!(
            (welcome["op"].as_str(), welcome["user"].as_str()),
            (Some("welcome"), Some("bob"))
        );
    }
    for scheme in ["ws", "wss"] {
        let line = format!("GET {scheme}://{addr}/ws?token={good} HTTP/1.1");
        let (code, text) = exchange(addr, &upgrade_head(&line, UPGRADE_LINES));
        assert_eq!(code, 404, "{scheme}: {text}");
    }
    // The Host header is still required.
    let line = format!("GET http://{addr}/ws?token={good} HTTP/1.1");
    let no_host = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    let (code, text) = exchange(addr, &upgrade_head(&line, no_host));
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("Host"), "{text}");
}

/// RFC 9112 section 2.3, over a real socket: HTTP/1.2 is served as 1.1 (the answer says
/// 1.1); HTTP/1.0 and 2.0 stay a 400, counted as malformed.
#[test]
fn a_later_http_1_minor_version_upgrades() {
    let gw = Gateway::start(&["--jwt-secret", SECRET]);
    let good = token("bob", "1h");
    for version in ["1.2", "1.9"] {
        let line = format!("GET /ws?token={good} HTTP/{version}");
        let mut ws = raw_upgrade(&gw, &upgrade_head(&line, UPGRADE_LINES));
        assert_eq!(ws.recv_json()["user"], "bob", "{version}");
    }
    for (version, why) in [
        ("1.0", "HTTP/1.1 or later"),
        ("2.0", "invalid HTTP version"),
    ] {
        let line = format!("GET /ws?token={good} HTTP/{version}");
        let (code, text) = exchange(gw.public, &upgrade_head(&line, UPGRADE_LINES));
        assert_eq!(code, 400, "{version}: {text}");
        assert!(text.contains(why), "{why:?} not in {text}");
    }
    assert_eq!(bad_requests(&gw), 2);
}

/// RFC 9110 section 5.3, over a real socket: `Connection: keep-alive` and `Connection:
/// Upgrade` on two lines are one list, as on one line.
#[test]
fn connection_on_two_lines_upgrades() {
    let gw = Gateway::start(&["--jwt-secret", SECRET]);
    let good = token("bob", "1h");
    let line = format!("GET /ws?token={good} HTTP/1.1");
    for lines in [
        "Host: x\r\nUpgrade: websocket\r\nConnection: keep-alive\r\nConnection: Upgrade\r\n",
        "Host: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n",
    ] {
        let mut ws = raw_upgrade(&gw, &upgrade_head(&line, lines));
        assert_eq!(ws.recv_json()["user"], "bob", "{lines:?}");
    }
    let no_upgrade =
        "Host: x\r\nUpgrade: websocket\r\nConnection: keep-alive\r\nConnection: close\r\n";
    let (code, text) = exchange(gw.public, &upgrade_head(&line, no_upgrade));
    assert_eq!(code, 426, "{text}");
}

/// RFC 6455 section 4.2.1 (one optional Origin), over a real socket: two Origin headers are a
/// 400 in either order, whether or not allowed_origins is set, counted as malformed.
#[test]
fn two_origin_headers_are_refused_400() {
    let allowed = "Origin: https://app.example\r\n";
    let other = "Origin: https://evil.example\r\n";
    for flags in [
        &["--jwt-secret", SECRET][..],
        &[
            "--jwt-secret",
            SECRET,
            "--allowed-origins",
            "https://app.example",
        ],
    ] {
        let gw = Gateway::start(flags);
        let good = token("bob", "1h");
        let line = format!("GET /ws?token={good} HTTP/1.1");
        for pair in [format!("{allowed}{other}"), format!("{other}{allowed}")] {
            let (code, text) = exchange(
                gw.public,
                &upgrade_head(&line, &format!("{UPGRADE_LINES}{pair}")),
            );
            assert_eq!(code, 400, "{flags:?} {pair:?}: {text}");
            assert!(text.contains("more than one Origin"), "{text}");
        }
        assert_eq!(bad_requests(&gw), 2, "{flags:?}");
        let mut ws = raw_upgrade(
            &gw,
            &upgrade_head(&line, &format!("{UPGRADE_LINES}{allowed}")),
        );
        assert_eq!(ws.recv_json()["user"], "bob", "{flags:?}");
    }
}

/// RFC 9110 section 11.6.1 and RFC 6750 section 3, over a real socket: a 401 on /ws says
/// `WWW-Authenticate: Bearer`, with `error="invalid_token"` when a token came and was refused.
#[test]
fn a_refused_upgrade_401_carries_a_bearer_challenge() {
    let gw = Gateway::start(&["--jwt-secret", SECRET]);
    let challenge = |path: &str, headers: &[&str]| {
        let (code, text) = upgrade_status(gw.public, path, headers);
        assert_eq!(code, 401, "{text}");
        let head = text.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        let challenges: Vec<String> = head
            .lines()
            .filter_map(|l| l.strip_prefix("www-authenticate:"))
            .map(|v| v.trim().to_string())
            .collect();
        challenges
    };
    assert_eq!(challenge("/ws", &[]), ["bearer"]);
    let refused = [r#"bearer error="invalid_token""#];
    assert_eq!(challenge("/ws?token=garbage", &[]), refused);
    assert_eq!(
        challenge("/ws", &["Authorization: Bearer garbage"]),
        refused
    );
    let expired = expired_token("bob");
    assert_eq!(challenge(&format!("/ws?token={expired}"), &[]), refused);
}

fn expired_token(user: &str) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let claims = serde_json::json!({"sub": user, "exp": ringgate::auth::now_unix() - 3600});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[test]
fn dev_mode_only_on_loopback() {
    // Loopback without a secret: dev mode, said loudly, ?user= accepted.
    let gw = Gateway::start(&[]);
    let (_ws, welcome) = connect_app(&gw, "carol");
    assert_eq!(welcome["user"], "carol");
    let said: Vec<String> = gw.stderr.try_iter().collect();
    assert!(said.iter().any(|l| l.contains("dev mode")), "{said:?}");
    assert_eq!(
        upgrade_status(gw.public, "/ws", &[]).0,
        401,
        "dev mode still needs ?user="
    );
    // A secret disables dev mode: ?user= alone is refused.
    let secured = Gateway::start(&["--jwt-secret", SECRET]);
    assert_eq!(upgrade_status(secured.public, "/ws?user=carol", &[]).0, 401);
    // Non-loopback without a secret refuses to start, naming the key.
    let out = run_ringgate(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("jwt_secret"));
}

#[test]
fn app_ping_and_websocket_ping_are_answered() {
    let gw = Gateway::start(&[]);
    let (mut ws, _) = connect_app(&gw, "dave");
    send_text(&mut ws, r#"{"op":"ping"}"#);
    assert_eq!(recv_json(&mut ws), serde_json::json!({"op":"pong"}));
    ws.send(Message::Ping(b"hb-1".to_vec().into())).unwrap();
    loop {
        match ws.read().unwrap() {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"hb-1");
                break;
            }
            Message::Ping(_) => continue,
            other => panic!("expected pong, got {other:?}"),
        }
    }
}

#[test]
fn bad_frames_get_errors_and_the_connection_stays_open() {
    let gw = Gateway::start(&[]);
    let (mut ws, _) = connect_app(&gw, "erin");
    send_text(&mut ws, "this is not json");
    let e = recv_json(&mut ws);
    assert_eq!(e["op"], "error");
    assert_eq!(e["code"], "bad_request");
    send_text(&mut ws, r#"{"op":"teleport","cid":"c-9"}"#);
    let e = recv_json(&mut ws);
    assert_eq!(e["code"], "unknown_op");
    assert_eq!(e["cid"], "c-9");
    send_text(&mut ws, r#"{"op":7}"#);
    assert_eq!(recv_json(&mut ws)["code"], "bad_request");
    ws.send(Message::Binary(vec![1, 2, 3].into())).unwrap();
    assert_eq!(recv_json(&mut ws)["code"], "bad_request");
    // Still open and serving.
    send_text(&mut ws, r#"{"op":"ping"}"#);
    assert_eq!(recv_json(&mut ws)["op"], "pong");
    assert_eq!(gw.metric_sum("ringgate_bad_frames_total"), 4);
}

#[test]
fn repeated_abuse_closes_with_1008() {
    let gw = Gateway::start(&["--abuse-limit", "3"]);
    let (mut ws, _) = connect_app(&gw, "frank");
    for _ in 0..4 {
        send_text(&mut ws, "{");
    }
    for _ in 0..4 {
        assert_eq!(recv_json(&mut ws)["code"], "bad_request");
    }
    assert_eq!(recv_close_code(&mut ws), 1008);
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_abuse_closes_total")
        == 1));
}

#[test]
fn oversized_frame_closes_with_1009() {
    let gw = Gateway::start(&["--max-frame", "1024"]);
    let mut raw = RawWs::connect(gw.public, "/ws?user=gina");
    assert_eq!(raw.recv_json()["op"], "welcome");
    raw.send_frame(true, 1, &vec![b'x'; 4000]);
    let (_, close) = raw.until_close();
    assert_eq!(close.close_code(), Some(1009));
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_oversize_closes_total")
        == 1));
    // A message over the limit built from small fragments is refused the same way.
    let mut raw = RawWs::connect(gw.public, "/ws?user=gina");
    assert_eq!(raw.recv_json()["op"], "welcome");
    raw.send_frame(false, 1, &[b' '; 600]);
    raw.send_frame(true, 0, &[b' '; 600]);
    let (_, close) = raw.until_close();
    assert_eq!(close.close_code(), Some(1009));
}

/// SPEC 2 / RFC 6455 7.1.1, over real sockets: after a protocol-error or 1009 close the server
/// closes TCP as soon as the client has answered with its close frame (or its FIN), not at the
/// linger deadline. The linger is set to 60 s here and each read waits at most 30 s, so an EOF
/// proves the close came from the answer, with no timing in the test.
#[test]
fn after_a_protocol_error_close_tcp_closes_once_the_client_answers() {
    let gw = Gateway::start(&["--close-linger-ms", "60000", "--max-frame", "1024"]);
    // A masked frame with `first` as its first byte (FIN, RSV, opcode) and a 7-bit length.
    let frame = |first: u8, payload: &[u8]| {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![first, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        f
    };
    let mut oversized = vec![0x82, 0x80 | 126, 0x07, 0xD0, 1, 2, 3, 4];
    oversized.extend(std::iter::repeat_n(0u8, 2000));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", vec![0x81, 0x02, b'h', b'i'], 1002),
        ("rsv1", frame(0xC1, b"x"), 1002),
        ("reserved opcode", frame(0x83, b"x"), 1002),
        (
            "control over 125",
            {
                let mut f = vec![0x89, 0x80 | 126, 0, 126, 1, 2, 3, 4];
                f.extend_from_slice(&[0; 126]);
                f
            },
            1002,
        ),
        ("fragmented control", frame(0x09, b"x"), 1002),
        ("over max_frame", oversized, 1009),
    ];
    let mut client_close = frame(0x88, &1000u16.to_be_bytes());
    for (what, bad, code) in &cases {
        let mut raw = RawWs::connect(gw.public, "/ws?user=hank");
        raw.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        assert_eq!(raw.recv_json()["op"], "welcome");
        raw.stream.write_all(bad).unwrap();
        let (_, close) = raw.until_close();
        assert_eq!(close.close_code(), Some(*code), "{what}");
        raw.stream.write_all(&client_close).unwrap();
        let mut rest = Vec::new();
        let end = raw.stream.read_to_end(&mut rest);
        assert!(
            end.is_ok(),
            "{what}: no EOF within 30 s of the client's close: {end:?}"
        );
        assert!(rest.is_empty(), "{what}: nothing after the close frame");
    }
    // Framing lost (a 64-bit length with the top bit set): the server cannot see a close frame,
    // but it shuts its side after its close (FIN), and the client's close ends it.
    let mut raw = RawWs::connect(gw.public, "/ws?user=hank");
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(raw.recv_json()["op"], "welcome");
    raw.stream
        .write_all(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4])
        .unwrap();
    assert!(gw.metric_sum("ringgate_connections_open") >= 1);
    let (_, close) = raw.until_close();
    assert_eq!(close.close_code(), Some(1002));
    assert!(raw.recv().is_none(), "FIN right after the close frame");
    client_close.clear();
    raw.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || gw
            .metric_sum("ringgate_connections_open")
            == 0),
        "every connection closed long before the 60 s linger"
    );
}

#[test]
fn fragmented_messages_reassemble() {
    let gw = Gateway::start(&["--echo-route", "true"]);
    let mut raw = RawWs::connect(gw.public, "/ws?user=hank");
    assert_eq!(raw.recv_json()["op"], "welcome");
    raw.send_frame(false, 1, br#"{"op""#);
    raw.send_frame(true, 9, b"mid"); // a control frame between fragments is legal
    raw.send_frame(false, 0, br#":"pi"#);
    raw.send_frame(true, 0, br#"ng"}"#);
    let mut got_pong_frame = false;
    loop {
        let f = raw.recv().expect("frame");
        match f.opcode {
            10 => {
                assert_eq!(f.payload, b"mid");
                got_pong_frame = true;
            }
            1 => {
                let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
                if v["op"] == "pong" {
                    break;
                }
            }
            _ => {}
        }
    }
    assert!(got_pong_frame);
    // On /echo the whole message comes back as one.
    let mut echo = RawWs::connect(gw.public, "/echo");
    echo.send_frame(false, 2, &[1, 2, 3]);
    echo.send_frame(false, 0, &[4, 5]);
    echo.send_frame(true, 0, &[6]);
    let f = echo.recv().unwrap();
    assert_eq!(
        (f.opcode, f.fin, f.payload),
        (2, true, vec![1, 2, 3, 4, 5, 6])
    );
}

#[test]
fn silent_connection_is_pinged_then_closed_1001() {
    let gw = Gateway::start(&["--heartbeat-ms", "200"]);
    // The raw client never answers pings and sends nothing.
    let mut raw = RawWs::connect(gw.public, "/ws?user=ivy");
    assert_eq!(raw.recv_json()["op"], "welcome");
    let (before, close) = raw.until_close();
    let pings = before.iter().filter(|f| f.opcode == 9).count();
    assert_eq!(close.close_code(), Some(1001));
    assert!(pings >= 1, "pinged before being closed");
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_heartbeat_closes_total")
        == 1));
    assert!(gw.metric_sum("ringgate_heartbeat_pings_total") >= 1);
}

#[test]
fn answering_pings_keeps_a_connection_alive() {
    let gw = Gateway::start(&["--heartbeat-ms", "150"]);
    // tungstenite answers pings by itself: the connection must outlive 3 x heartbeat.
    let (mut ws, _) = connect_app(&gw, "jack");
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let until = std::time::Instant::now() + Duration::from_millis(1200);
    while std::time::Instant::now() < until {
        match ws.read() {
            Ok(Message::Close(c)) => panic!("closed while answering pings: {c:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        let _ = ws.flush();
    }
    assert_eq!(gw.metric_sum("ringgate_heartbeat_closes_total"), 0);
    assert!(gw.metric_sum("ringgate_heartbeat_pings_total") >= 2);
}

#[test]
fn slowloris_handshake_is_closed_at_the_timeout() {
    let gw = Gateway::start(&["--handshake-timeout-ms", "300"]);
    let mut s = TcpStream::connect(gw.public).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /ws?user=kim HTTP/1.1\r\nHost: x\r\nUpgr")
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest); // returns when the server closes
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_handshake_timeouts_total")
        == 1));
    assert_eq!(gw.metric_sum("ringgate_handshakes_pending"), 0);
}

#[test]
fn connection_limit_answers_503_with_retry_after() {
    let gw = Gateway::start(&["--max-connections", "2", "--retry-after-s", "7"]);
    let (_a, _) = connect_app(&gw, "u1");
    let (_b, _) = connect_app(&gw, "u2");
    let (code, text) = upgrade_status(gw.public, "/ws?user=u3", &[]);
    assert_eq!(code, 503);
    assert!(text.to_lowercase().contains("retry-after: 7"), "{text}");
    drop(_a);
    // Once one leaves, there is room again.
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_connections_open")
        == 1));
    let (_c, _) = connect_app(&gw, "u3");
}

#[test]
fn metrics_are_per_shard_and_count_connections() {
    let gw = Gateway::start(&[]);
    let conns: Vec<_> = (0..8)
        .map(|i| connect_app(&gw, &format!("m{i}")).0)
        .collect();
    let (code, body) = gw.admin_get("/metrics");
    assert_eq!(code, 200);
    for series in [
        "ringgate_connections_open",
        "ringgate_connections_accepted_total",
        "ringgate_frames_in_total",
        "ringgate_frames_out_total",
        "ringgate_bytes_in_total",
        "ringgate_bytes_out_total",
        "ringgate_heartbeat_closes_total",
        "ringgate_handshake_timeouts_total",
        "ringgate_wheel_entries",
    ] {
        for shard in ["0", "1"] {
            let line = format!("{series}{{shard=\"{shard}\"}}");
            assert!(body.contains(&line), "missing {line}");
        }
    }
    assert!(
        body.contains("ringgate_connections_refused_total{shard=\"1\",reason=\"unauthorized\"}")
    );
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(line.contains("shard=\""), "unlabelled series: {line}");
    }
    assert_eq!(gw.metric_sum("ringgate_connections_open"), 8);
    assert_eq!(gw.metric_sum("ringgate_connections_accepted_total"), 8);
    // welcome + synced per connection.
    assert_eq!(gw.metric_sum("ringgate_frames_out_total"), 16);
    assert!(eventually(Duration::from_secs(2), || gw
        .metric_sum("ringgate_wheel_entries")
        == 8));
    assert_eq!(gw.admin_get("/healthz").0, 200);
    assert_eq!(gw.admin_get("/readyz").0, 200);
    assert_eq!(gw.admin_get("/nope").0, 404);
    drop(conns);
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_connections_open")
        == 0));
}

#[test]
fn sigterm_closes_every_connection_1012_and_exits_0() {
    let mut gw = Gateway::start(&["--drain-ms", "5000"]);
    let mut clients: Vec<_> = (0..6)
        .map(|i| connect_app(&gw, &format!("s{i}")).0)
        .collect();
    gw.sigterm();
    for ws in clients.iter_mut() {
        assert_eq!(recv_close_code(ws), 1012);
    }
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn echo_route_is_off_by_default_and_echoes_when_on() {
    let off = Gateway::start(&[]);
    assert_eq!(upgrade_status(off.public, "/echo", &[]).0, 404);
    let gw = Gateway::start(&["--echo-route", "true"]);
    let mut ws = connect(&gw, "/echo");
    send_text(&mut ws, "héllo");
    assert_eq!(ws.read().unwrap(), Message::text("héllo"));
    let big: Vec<u8> = (0..65536u32).map(|i| i as u8).collect();
    ws.send(Message::Binary(big.clone().into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Binary(big.into()));
    // Over max_frame closes 1009 on /echo too.
    ws.send(Message::Binary(vec![0u8; 65537].into())).unwrap();
    assert_eq!(recv_close_code(&mut ws), 1009);
}

/// `huge_pages` (off by default): the process opts out of transparent huge pages, which the
/// kernel shows in /proc/<pid>/status (`THP_enabled`, the opt-out flag, inherited across
/// exec); on, it does not.
#[test]
fn the_heap_stays_off_huge_pages_unless_asked() {
    fn thp_enabled(pid: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("THP_enabled:"));
        line.expect("THP_enabled in /proc/<pid>/status (Linux 5.0+)")
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    }
    // On a kernel without transparent huge pages the flag reads 0 whatever a process asks.
    let host_has_thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
    if host_has_thp {
        // Else the gateway would inherit the opt-out and the first check below prove nothing.
        assert_eq!(
            thp_enabled("self"),
            "1",
            "this test runs with transparent huge pages disabled for its own process (PR_SET_THP_DISABLE inherited from its parent): run it from a shell without that"
        );
    }
    let default = Gateway::start(&[]);
    assert_eq!(thp_enabled(&default.child.id().to_string()), "0");
    let asked = Gateway::start(&["--huge-pages"]);
    let expected = if host_has_thp { "1" } else { "0" };
    assert_eq!(thp_enabled(&asked.child.id().to_string()), expected);
}

#[test]
fn invalid_utf8_text_closes_1007() {
    let gw = Gateway::start(&["--echo-route", "true"]);
    let mut raw = RawWs::connect(gw.public, "/echo");
    raw.send_frame(true, 1, &[0xce, 0xba, 0xff, 0xfe]);
    let f = raw.recv().unwrap();
    assert_eq!(f.close_code(), Some(1007));
}

#[test]
fn config_print_token_and_env_overrides() {
    let dir = std::env::temp_dir().join(format!("ringgate-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ringgate.toml");
    std::fs::write(&file, "heartbeat_ms = 1234\nmax_frame = 4096\nshards = 3\n").unwrap();
    // File < env < flag.
    let out = run_ringgate(
        &[
            "config",
            "--print",
            "--config",
            file.to_str().unwrap(),
            "--max-frame",
            "2048",
        ],
        &[("RINGGATE_SHARDS", "5"), ("RINGGATE_JWT_SECRET", SECRET)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let printed: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(printed["heartbeat_ms"].as_integer(), Some(1234));
    assert_eq!(printed["max_frame"].as_integer(), Some(2048));
    assert_eq!(printed["shards"].as_integer(), Some(5));
    assert_eq!(printed["jwt_secret"].as_str(), Some("<redacted>"));
    // Invalid values are refused naming the key (file and flag).
    std::fs::write(&file, "wheel_slots = 1000\n").unwrap();
    let out = run_ringgate(
        &["config", "--print", "--config", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wheel_slots"));
    std::fs::write(&file, "no_such_key = 1\n").unwrap();
    let out = run_ringgate(&["config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_key"));
    // token needs a secret.
    let out = run_ringgate(&["token", "--user", "x"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("jwt_secret"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn both_shards_accept_connections() {
    let gw = Gateway::start(&[]);
    let conns: Vec<_> = (0..64)
        .map(|i| connect_app(&gw, &format!("spread{i}")).0)
        .collect();
    let per_shard: Vec<u64> = (0..2)
        .map(|s| gw.metric(&format!("ringgate_connections_open{{shard=\"{s}\"}}")))
        .collect();
    assert_eq!(per_shard.iter().sum::<u64>(), 64);
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "SO_REUSEPORT spreads over shards: {per_shard:?}"
    );
    drop(conns);
}

/// Backpressure must not lose the read wakeup: a client that pipelines faster than it reads
/// pushes the server's outbound bytes past `max_outbound`; once the client reads again every
/// echo must come back. (With the lost wakeup, the server would only read again at the next
/// heartbeat, here 10 minutes away, and the client's 10 s read timeout fails the test.)
#[test]
fn backpressure_resumes_reading_without_waiting_for_a_timer() {
    let gw = Gateway::start(&[
        "--echo-route",
        "true",
        "--max-frame",
        "65536",
        "--max-outbound",
        "65536",
        "--heartbeat-ms",
        "600000",
    ]);
    let mut raw = RawWs::connect(gw.public, "/echo");
    let mut writer = RawWs::from_stream(raw.stream.try_clone().unwrap());
    const N: usize = 60;
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            writer.send_frame(true, 2, &vec![i as u8; 60_000]);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..N {
        let f = loop {
            let f = raw.recv().expect("echo arrives (read wakeup not lost)");
            if f.opcode == 2 {
                break f;
            }
        };
        assert_eq!((f.payload.len(), f.payload[0]), (60_000, i as u8));
    }
    sender.join().unwrap();
}

#[test]
fn stats_prints_a_live_per_shard_table() {
    let gw = Gateway::start(&[]);
    let _conns: Vec<_> = (0..5)
        .map(|i| connect_app(&gw, &format!("st{i}")).0)
        .collect();
    let out = run_ringgate(
        &[
            "stats",
            "--admin-listen",
            &gw.admin.to_string(),
            "--count",
            "1",
            "--interval-ms",
            "200",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines[0].contains("conns")
            && lines[0].contains("acks_pending")
            && lines[0].contains("redis_ms"),
        "{text}"
    );
    assert_eq!(lines.len(), 4, "header, shard 0, shard 1, all: {text}");
    let all: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!((all[0], all[1]), ("all", "5"), "{text}");
    // Nothing listening: a clear error, not a hang.
    let out = run_ringgate(
        &["stats", "--admin-listen", "127.0.0.1:1", "--count", "1"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin listener"));
}

/// SPEC section 2, "in the first frame for browsers" (issue 18): `GET /ws?auth=frame` upgrades
/// without credentials, the first frame carries the token, and the refusals a browser could
/// not read as HTTP come in-band: an `error` frame and a 4xxx close. Users homed on both
/// shards, so that sessions handed to the other shard after the auth frame are covered.
#[test]
fn browsers_authenticate_in_the_first_frame_and_hear_refusals_in_band() {
    let gw = Gateway::start(&[
        "--jwt-secret",
        SECRET,
        "--allowed-origins",
        "https://app.example",
        // Long enough for a loaded machine to read ~40 auth frames in time; the silence case
        // below waits it out once.
        "--handshake-timeout-ms",
        "2000",
    ]);
    let origin = [("origin", "https://app.example")];
    let users = [user_on("fa", 0, 2), user_on("fb", 1, 2)];
    let mut socks = Vec::new();
    // Until a session was handed to its home shard after its auth frame (the kernel spreads
    // connections over the shards; each lands on the other one with probability 1/2).
    for round in 0.. {
        assert!(round < 20, "no connection ever landed off its home shard");
        for user in &users {
            let mut ws = connect_with(&gw, "/ws?auth=frame", &origin).expect("upgrade");
            let auth = serde_json::json!({"op":"auth","token": token(user, "1h")}).to_string();
            // A frame right behind the auth frame waits for the session on the home shard.
            send_texts(&mut ws, &[&auth, r#"{"op":"ping"}"#]);
            assert_eq!(next_op(&mut ws, "welcome")["user"], user.as_str());
            next_op(&mut ws, "synced");
            next_op(&mut ws, "pong");
            socks.push(ws);
        }
        if gw.metric_sum("ringgate_handoffs_out_total") > 0 {
            break;
        }
    }
    // Sessions work across shards: the first user sends to the second.
    let (a, b) = socks.split_at_mut(1);
    send(&mut a[0], &users[1], "c1", serde_json::json!("hi"));
    assert_eq!(next_op(&mut a[0], "accepted")["cid"], "c1");
    let msg = next_op(&mut b[0], "msg");
    assert_eq!(
        (msg["from"].as_str(), &msg["body"]),
        (Some(users[0].as_str()), &serde_json::json!("hi"))
    );

    // A bad token: `unauthorized`, close 4001.
    let unauthorized = |gw: &Gateway| {
        gw.metric_sum_where(
            "ringgate_connections_refused_total",
            "reason=\"unauthorized\"",
        )
    };
    let before = unauthorized(&gw);
    let mut ws = connect_with(&gw, "/ws?auth=frame", &origin).expect("upgrade");
    send_text(
        &mut ws,
        &serde_json::json!({"op":"auth","token": expired_token("bob")}).to_string(),
    );
    let err = next_op(&mut ws, "error");
    assert_eq!(
        (err["code"].as_str(), err["message"].as_str()),
        (Some("unauthorized"), Some("token expired"))
    );
    assert_eq!(recv_close_code(&mut ws), 4001);
    // Silence: no auth frame within handshake_timeout_ms.
    let mut ws = connect_with(&gw, "/ws?auth=frame", &origin).expect("upgrade");
    assert_eq!(next_op(&mut ws, "error")["code"], "unauthorized");
    assert_eq!(recv_close_code(&mut ws), 4001);
    assert!(eventually(Duration::from_secs(5), || unauthorized(&gw) == before + 2));

    // An origin not allowed: upgraded only to hear `forbidden`, close 4003.
    let mut ws = connect_with(&gw, "/ws?auth=frame", &[("origin", "https://evil.example")])
        .expect("upgraded to be told");
    assert_eq!(next_op(&mut ws, "error")["code"], "forbidden");
    assert_eq!(recv_close_code(&mut ws), 4003);
    // Without `auth=frame` the same refusals stay plain HTTP.
    assert_eq!(
        upgrade_status(gw.public, "/ws", &["Origin: https://app.example"]).0,
        401
    );
    assert_eq!(
        upgrade_status(gw.public, "/ws", &["Origin: https://evil.example"]).0,
        403
    );
}

/// Issue 18, item 5: in dev mode the gateway serves the demo chat page and the client library
/// it imports; with a secret (not dev mode) there is no such page.
#[test]
fn dev_mode_serves_the_demo_page_and_nothing_else_does() {
    let gw = Gateway::start(&[]);
    let (code, page) = http_get(gw.public, "/demo/", &[]);
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("<script type=\"module\" src=\"./demo.js\">"),
        "{page}"
    );
    let (code, script) = http_get(gw.public, "/demo/demo.js", &[]);
    assert_eq!(code, 200);
    assert!(script.contains("from '../src/ringgate.js'"), "{script}");
    let (code, lib) = http_get(gw.public, "/src/ringgate.js", &[]);
    assert_eq!(code, 200);
    assert!(lib.contains("export class RinggateClient"), "the library");
    assert_eq!(http_get(gw.public, "/demo", &[]).0, 308);
    let gw = Gateway::start(&["--jwt-secret", SECRET]);
    assert_eq!(http_get(gw.public, "/demo/", &[]).0, 404);
}

/// `token` refuses, with exit code 2 and the rule, what the gateway would refuse: a reserved
/// (`@`) or over-long user id, a secret `serve` refuses, an empty room name.
#[test]
fn token_refuses_what_the_gateway_would_refuse() {
    let refused = |args: &[&str], rule: &str| {
        let mut all = vec!["token", "--jwt-secret", SECRET];
        all.extend_from_slice(args);
        let out = run_ringgate(&all, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: no token");
        assert!(err.contains(rule), "{args:?}: {err}");
    };
    refused(&["--user", "@backend"], "starting with '@'");
    refused(&["--user", &"u".repeat(129)], "1 to 128 bytes");
    refused(
        &["--user", "bob", "--rooms", "a,,b"],
        r#""" is not a room id"#,
    );
    let out = run_ringgate(&["token", "--user", "bob", "--jwt-secret", "short"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jwt_secret must be at least 16 bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The longest id and a room list with `*` still make a token.
    let out = run_ringgate(
        &[
            "token",
            "--jwt-secret",
            SECRET,
            "--user",
            &"u".repeat(128),
            "--rooms",
            "a,*",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 19's command-line stumbles: `token` and `stats` list only their own options, a bare
/// `--echo-route` means true, a bad environment variable is named as the variable, and
/// `config --print` lists unset keys and does not pass its own pid off as the node id.
#[test]
fn the_command_line_says_what_it_means() {
    let help = |cmd: &str| String::from_utf8(run_ringgate(&[cmd, "--help"], &[]).stdout).unwrap();
    // The user send limit counts `read` too (docs/configuration.md).
    assert!(
        help("serve").contains("`send` + `publish` + `typing` + `read` per user"),
        "{}",
        help("serve")
    );
    for (cmd, own) in [("token", "--jwt-secret"), ("stats", "--admin-listen")] {
        let text = help(cmd);
        assert!(text.contains(own), "{cmd}: {text}");
        assert!(
            !text.contains("--max-frame") && !text.contains("--redis-url"),
            "{cmd}: {text}"
        );
    }
    let print = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["config", "--print"];
        all.extend_from_slice(args);
        let out = run_ringgate(&all, env);
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        (out.status.code(), stdout, stderr)
    };
    let (code, text, _) = print(&["--echo-route"], &[]);
    assert_eq!(code, Some(0));
    assert!(text.contains("echo_route = true"), "{text}");
    assert!(text.contains("# redis_url = (unset)"), "{text}");
    // Push off: its tuning keys show the defaults they take with a push_webhook_url.
    assert!(text.contains("# push_webhook_url = (unset)"), "{text}");
    assert!(
        text.contains("# push_delay_ms = (default 1000, push off)")
            && text.contains("# push_body = (default \"full\", push off)"),
        "{text}"
    );
    toml::from_str::<toml::Value>(&text).expect("the printout reads back as TOML");
    assert!(text.contains("# node_id = \"<hostname>-<pid>\""), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("node_id = ")), "{text}");
    let (_, text, _) = print(&["--node-id", "n7"], &[]);
    assert!(text.contains("node_id = \"n7\""), "{text}");
    let (code, _, err) = print(&[], &[("RINGGATE_ECHO_ROUTE", "maybe")]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("environment variable RINGGATE_ECHO_ROUTE") && err.contains("echo_route"),
        "{err}"
    );
    // `token` reads its secret from a config file too.
    let dir = std::env::temp_dir().join(format!("ringgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ringgate.toml");
    std::fs::write(&file, format!("jwt_secret = \"{SECRET}\"\n")).unwrap();
    let out = run_ringgate(
        &["token", "--user", "zoe", "--config", file.to_str().unwrap()],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and the `aud` a gateway with `jwt_audience` wants, from the same file.
    std::fs::write(
        &file,
        format!("jwt_secret = \"{SECRET}\"\njwt_audience = \"chat\"\n"),
    )
    .unwrap();
    let gw = Gateway::start(&["--config", file.to_str().unwrap()]);
    let out = run_ringgate(
        &["token", "--user", "zoe", "--config", file.to_str().unwrap()],
        &[],
    );
    let with_aud = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut ws = connect(&gw, &format!("/ws?token={with_aud}"));
    assert_eq!(recv_json(&mut ws)["user"], "zoe");
    let without = token("zoe", "1h");
    assert_eq!(
        upgrade_status(gw.public, &format!("/ws?token={without}"), &[]).0,
        401
    );
    let _ = std::fs::remove_dir_all(&dir);
}
