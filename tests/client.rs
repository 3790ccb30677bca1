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
