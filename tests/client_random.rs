//! The client library under random faults: clients send, read and lose their connections at
//! random; in the end every message was accepted and displayed exactly once, per sender and
//! recipient in the order the sender was told `accepted`, using only `ringgate::client` (its
//! resend-by-cid and display dedup). A third of the messages shown are marked read: every
//! read receipt reached the sender and the reader, only forwards, ending at the reader's
//! last one (the others superseded). Seeded.

mod common;

use std::time::Duration;

use common::*;
use ringgate::client::{Client, ClientConfig, Event};
use serde_json::json;

#[test]
fn the_client_library_displays_every_message_once_in_order_under_random_disconnects() {
    let seed: u64 = std::env::var("RINGGATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xc11e_47ab_0000_0042);
    eprintln!("client randomized test seed {seed} (set RINGGATE_SEED to replay)");
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let gw = Gateway::start(&["--ack-timeout-ms", "300"]);
    const USERS: usize = 6;
    let mut clients: Vec<Client> = (0..USERS)
        .map(|i| Client::connect(ClientConfig::dev(&gw.url("/ws"), &format!("k{i}"))).unwrap())
        .collect();
    // Per sender: the body counter, so displays can be checked for order.
    let mut sent_counter = [0i64; USERS];
    let ledger = std::cell::RefCell::new(Ledger::default());
    let (mut sent, mut drops, mut reads) = (0u64, 0u64, 0u64);
    let record = |me: usize, e: Event| ledger.borrow_mut().record(&format!("k{me}"), e);
    for _ in 0..1500 {
        let i = next(USERS as u64) as usize;
        match next(100) {
            0..=49 => {
                let to = (i + 1 + next(USERS as u64 - 1) as usize) % USERS;
                sent_counter[i] += 1;
                let cid = clients[i]
                    .send(&format!("k{to}"), json!({"n": sent_counter[i], "to": to}))
                    .unwrap();
                ledger
                    .borrow_mut()
                    .sent(&format!("k{i}"), cid, sent_counter[i]);
                sent += 1;
            }
            50..=94 => {
                while let Some(e) = clients[i].poll(Duration::from_millis(2)).unwrap() {
                    // A third of what is shown is marked read at once (a read receipt).
                    if let Event::Message { from, id, .. } = &e {
                        if next(3) == 0 {
                            clients[i].read(from, id);
                            ledger.borrow_mut().read_sent(&format!("k{i}"), from, id);
                            reads += 1;
                        }
                    }
                    record(i, e);
                }
            }
            _ => {
                clients[i].drop_connection();
                drops += 1;
            }
        }
    }
    // Settle: poll everyone until nothing is pending and everything is quiet.
    settle_clients(&mut clients, seed, record);
    let (displayed, reordered) = ledger.borrow().check(seed);
    let receipts_told = ledger.borrow().check_reads(seed);
    // Each receipt the gateway took is stored twice (for the sender and for the reader).
    assert_eq!(
        gw.metric_sum("ringgate_stored_total"),
        sent + 2 * gw.metric_sum("ringgate_reads_total"),
        "stored once each (seed {seed})"
    );
    eprintln!("client randomized: {USERS} users, sent {sent}, displayed {displayed} ({reordered} accepted out of send order), connection drops {drops}, read receipts sent {reads}, reported {receipts_told}");
}

/// The ledger's order check is the SPEC's: acceptance order, not send order; shown on events
/// made by hand, with a display that breaks it.
#[test]
fn the_ledger_checks_acceptance_order_and_catches_a_display_out_of_it() {
    let msg = |n: i64| Event::Message {
        from: "a".into(),
        cid: json!(format!("c{n}")),
        id: n.to_string(),
        ts: 0,
        body: json!({ "n": n }),
        msg_type: None,
    };
    let accepted = |n: i64| Event::Accepted {
        cid: format!("c{n}"),
        id: n.to_string(),
    };
    let ledger = |display: &[i64]| {
        let mut l = Ledger::default();
        for n in 1..=3 {
            l.sent("a", format!("c{n}"), n);
        }
        // c1 was refused and resent: accepted after c2 and c3.
        for n in [2, 3, 1] {
            l.record("a", accepted(n));
        }
        l.record("a", accepted(2)); // a repeated `accepted` keeps its first place
        for n in display {
            l.record("b", msg(*n));
        }
        l
    };
    assert_eq!(ledger(&[2, 3, 1]).check(0), (3, 1));
    for wrong in [&[1, 2, 3][..], &[2, 1, 3], &[2, 3, 1, 1]] {
        let caught = std::panic::catch_unwind(|| ledger(wrong).check(0)).is_err();
        assert!(caught, "display {wrong:?} should fail the check");
    }
}
