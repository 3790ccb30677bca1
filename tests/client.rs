//! The crate's client library against a real gateway: acks, exactly-once display, resend by
//! cid after a lost connection.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ringgate::client::{Client, ClientConfig, Event};
use serde_json::json;

fn client(gw: &Gateway, user: &str) -> Client {
    Client::connect(ClientConfig::dev(&gw.url("/ws"), user)).unwrap()
}

/// Poll every client until `done` says so (bounded).
fn run_until(
    clients: &mut [&mut Client],
    mut done: impl FnMut(&[Vec<Event>]) -> bool,
) -> Vec<Vec<Event>> {
    let mut seen: Vec<Vec<Event>> = vec![Vec::new(); clients.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&seen) {
        assert!(
            Instant::now() < deadline,
            "timed out; events so far: {seen:?}"
        );
        for (i, c) in clients.iter_mut().enumerate() {
            while let Some(e) = c.poll(Duration::from_millis(5)).unwrap() {
                seen[i].push(e);
            }
        }
    }
    seen
}

fn count(events: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

#[test]
fn messages_are_accepted_displayed_once_acked_and_delivered() {
    let gw = Gateway::start(&[]);
    let mut alice = client(&gw, "alice");
    let mut bob = client(&gw, "bob");
    for i in 0..50 {
        alice.send("bob", json!({"n": i})).unwrap();
    }
    let seen = run_until(&mut [&mut alice, &mut bob], |s| {
        count(&s[0], |e| matches!(e, Event::Delivered { .. })) == 50
    });
    assert_eq!(count(&seen[0], |e| matches!(e, Event::Accepted { .. })), 50);
    let bodies: Vec<i64> = seen[1]
        .iter()
        .filter_map(|e| match e {
            Event::Message { body, from, .. } if from == "alice" => body["n"].as_i64(),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, (0..50).collect::<Vec<_>>());
    assert_eq!(alice.pending(), 0);
}

/// `read` through the library: bob reads as messages arrive (one receipt per message), alice
/// is told up to the last one, each id at most once and never backwards; the receipt frames
/// are acked like messages (nothing waits in either inbox afterwards).
#[test]
fn read_receipts_are_told_to_the_sender_once_and_only_forwards() {
    let gw = Gateway::start(&[]);
    let mut alice = client(&gw, "alice");
    let mut bob = client(&gw, "bob");
    for i in 0..20 {
        alice.send("bob", json!({"n": i})).unwrap();
    }
    let mut last_id = None;
    let mut read_ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while last_id.is_none() || read_ids.last() != last_id.as_ref() {
        assert!(Instant::now() < deadline, "told so far: {read_ids:?}");
        while let Some(e) = bob.poll(Duration::from_millis(5)).unwrap() {
            if let Event::Message { from, id, body, .. } = e {
                bob.read(&from, &id);
                if body["n"] == 19 {
                    last_id = Some(id);
                }
            }
        }
        while let Some(e) = alice.poll(Duration::from_millis(5)).unwrap() {
            if let Event::Read { by, from, id } = e {
                assert_eq!((by.as_str(), from.as_str()), ("bob", "alice"));
                read_ids.push(id);
            }
        }
    }
    let told: Vec<u64> = read_ids.iter().map(|id| id.parse().unwrap()).collect();
    assert!(told.windows(2).all(|w| w[0] < w[1]), "{told:?}");
    // Everything in flight acked, then new connections of both find nothing waiting.
    assert!(eventually(Duration::from_secs(10), || {
        let _ = alice.poll(Duration::from_millis(5));
        let _ = bob.poll(Duration::from_millis(5));
        gw.metric_sum("ringgate_acks_pending") == 0
    }));
    drop((alice, bob));
    for user in ["alice", "bob"] {
        let mut again = client(&gw, user);
        let seen = run_until(&mut [&mut again], |s| {
            count(&s[0], |e| matches!(e, Event::Synced { .. })) == 1
        });
        assert!(
            seen[0].contains(&Event::Synced { count: 0 }),
            "{user}: {seen:?}"
        );
    }
}

#[test]
fn typing_is_told_to_the_recipient() {
    let gw = Gateway::start(&[]);
    let mut alice = client(&gw, "alice");
    let mut bob = client(&gw, "bob");
    // Bob is online once his welcome came.
    run_until(&mut [&mut alice, &mut bob], |s| {
        count(&s[1], |e| matches!(e, Event::Synced { .. })) == 1
    });
    alice.typing("bob");
    let seen = run_until(&mut [&mut alice, &mut bob], |s| {
        count(&s[1], |e| matches!(e, Event::Typing { .. })) == 1
    });
    assert!(seen[1].contains(&Event::Typing {
        from: "alice".into()
    }));
}

#[test]
fn a_lost_connection_resends_by_cid_and_nothing_shows_twice() {
    let gw = Gateway::start(&["--ack-timeout-ms", "200"]);
    let mut alice = client(&gw, "alice");
    let mut bob = client(&gw, "bob");
    for i in 0..20 {
        alice.send("bob", json!(i)).unwrap();
    }
    // Both lose their connections at once, before reading anything.
    alice.drop_connection();
    bob.drop_connection();
    let seen = run_until(&mut [&mut alice, &mut bob], |s| {
        count(&s[1], |e| matches!(e, Event::Message { .. })) >= 20
            && count(&s[0], |e| matches!(e, Event::Accepted { .. })) >= 20
    });
    assert!(count(&seen[0], |e| matches!(e, Event::Reconnected { .. })) >= 1);
    let bodies: Vec<i64> = seen[1]
        .iter()
        .filter_map(|e| match e {
            Event::Message { body, .. } => body.as_i64(),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, (0..20).collect::<Vec<_>>(), "each once, in order");
    assert_eq!(alice.pending(), 0);
    // The server stored each message once, however often it was sent.
    assert_eq!(gw.metric_sum("ringgate_stored_total"), 20);
}

/// SPEC section 3: a client that meets a frame it cannot read acks it and reports it, so one
/// bad message never stalls an inbox. The gateway refuses such bodies now, so a small real
/// WebSocket server (tungstenite over a real socket) plays an older or foreign gateway here.
#[test]
fn a_msg_the_client_cannot_read_is_acked_and_reported() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let deep = format!("{}1{}", "[".repeat(30_000), "]".repeat(30_000));
    let bodies = [deep, "1e400".to_string(), r#""\ud800""#.to_string()];
    let server = std::thread::spawn(move || {
        let (socket, _) = listener.accept().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut ws = tungstenite::accept(socket).unwrap();
        let mut send = |text: String| ws.send(tungstenite::Message::text(text)).unwrap();
        send(r#"{"op":"welcome","v":1,"user":"ivy","conn":"1"}"#.into());
        for (i, body) in bodies.iter().enumerate() {
            send(format!(
                r#"{{"op":"msg","seq":{},"id":"{i}","from":"mallory","cid":"bad-{i}","ts":1,"body":{body}}}"#,
                i + 1
            ));
        }
        send(
            r#"{"op":"msg","seq":4,"id":"9","from":"jo","cid":"ok","ts":1,"body":{"t":"hi"}}"#
                .into(),
        );
        send(r#"{"op":"synced","count":4}"#.into());
        let mut acked = Vec::new();
        while acked.last() != Some(&4) {
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["op"] == "ack" {
                        acked.push(v["seq"].as_u64().unwrap());
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("acks so far {acked:?}: {e}"),
            }
        }
        acked
    });
    let mut c = Client::connect(ClientConfig::dev(&url, "ivy")).unwrap();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events.iter().any(|e| matches!(e, Event::Synced { .. })) {
        assert!(Instant::now() < deadline, "{events:?}");
        if let Some(e) = c.poll(Duration::from_millis(5)).unwrap() {
            events.push(e);
        }
    }
    assert_eq!(
        server.join().unwrap(),
        vec![1, 2, 3, 4],
        "every msg acked, in order"
    );
    let unreadable: Vec<Option<u64>> = events
        .iter()
        .filter_map(|e| match e {
            Event::Unreadable { seq, reason, .. } => {
                assert!(!reason.is_empty());
                Some(*seq)
            }
            _ => None,
        })
        .collect();
    assert_eq!(unreadable, vec![Some(1), Some(2), Some(3)], "{events:?}");
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Message { cid, .. } if cid == "ok")));
}

/// Against a scripted real WebSocket server: the first connection takes two sends and drops
/// without answering; on the second the client resends both marked `"resend":true`, and the
/// server answers them in resend order with ids in the other order (the second was stored
/// first, as after a failed first attempt of the first). The client tells `accepted` in id
/// order, the order the recipient sees.
#[test]
fn resends_are_marked_and_accepted_is_told_in_id_order() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for round in 0..2 {
            let (socket, _) = listener.accept().unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut ws = tungstenite::accept(socket).unwrap();
            ws.send(tungstenite::Message::text(
                r#"{"op":"welcome","v":1,"user":"ivy","conn":"1"}"#,
            ))
            .unwrap();
            let mut sends = Vec::new();
            while sends.len() < 2 {
                if let tungstenite::Message::Text(t) = ws.read().unwrap() {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["op"] == "send" {
                        sends.push(v);
                    }
                }
            }
            if round == 1 {
                for (v, id) in sends.iter().zip(["20", "10"]) {
                    let cid = v["cid"].as_str().unwrap();
                    let answer = format!(r#"{{"op":"accepted","cid":"{cid}","id":"{id}"}}"#);
                    ws.send(tungstenite::Message::text(answer)).unwrap();
                }
                // Held until the client has read the answers (it closes first).
                let _ = ws.read();
            }
            seen.extend(sends);
        }
        seen
    });
    let mut c = Client::connect(ClientConfig::dev(&url, "ivy")).unwrap();
    let first = c.send("bob", serde_json::json!(1)).unwrap();
    let second = c.send("bob", serde_json::json!(2)).unwrap();
    let mut accepted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while accepted.len() < 2 {
        assert!(Instant::now() < deadline, "accepted so far {accepted:?}");
        if let Some(Event::Accepted { cid, id }) = c.poll(Duration::from_millis(20)).unwrap() {
            accepted.push((cid, id));
        }
    }
    drop(c);
    let seen = server.join().unwrap();
    let marks: Vec<bool> = seen.iter().map(|v| v["resend"] == true).collect();
    assert_eq!(marks, [false, false, true, true], "{seen:?}");
    assert_eq!(
        accepted,
        [(second, "10".to_string()), (first, "20".to_string())],
        "told in id order"
    );
}
