//! Idle connections park outside glommio (one epoll set per shard) and must behave exactly
//! like active ones: heartbeats, messages, closes and the SIGTERM drain, over real sockets.
//! The park set belongs to the glommio socket driver, so these gateways run it explicitly
//! (the uring driver, the default where the kernel has it, holds idle sockets in its ring).

mod common;

use std::time::Duration;

use common::*;
use tungstenite::Message;

fn parked(gw: &Gateway) -> u64 {
    gw.metric_sum("ringgate_connections_parked")
}

#[test]
fn idle_connections_park_and_keep_heartbeats_and_messages() {
    let gw = Gateway::start(&[
        "--io-driver",
        "glommio",
        "--park-idle-ms",
        "50",
        "--heartbeat-ms",
        "300",
    ]);
    let (mut a, _) = connect_app(&gw, "pa");
    let (mut b, _) = connect_app(&gw, "pb");
    assert!(
        eventually(Duration::from_secs(5), || parked(&gw) == 2),
        "both park"
    );
    // Sockets are parked from their accept; let them be silent for park_idle_ms, so what
    // follows is "a message after a silence" (input right after the handshake unparks).
    std::thread::sleep(Duration::from_millis(150));
    // A message to a parked connection is answered (inline or after unparking).
    send_text(&mut a, r#"{"op":"ping"}"#);
    assert_eq!(recv_json(&mut a)["op"], "pong");
    send_text(&mut b, "not json");
    assert_eq!(recv_json(&mut b)["code"], "bad_request");
    // Both park again, and answering pings while parked keeps them alive past 3 x heartbeat.
    assert!(eventually(Duration::from_secs(5), || parked(&gw) == 2));
    for ws in [&mut a, &mut b] {
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
    }
    // Sockets start parked and the one whose user lives on the other shard is handed over
    // through a socket task, so unparks are counted from here: the heartbeat phase.
    let unparks_before = gw.metric_sum("ringgate_unparks_total");
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        for ws in [&mut a, &mut b] {
            match ws.read() {
                Ok(Message::Close(c)) => panic!("closed while answering pings: {c:?}"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            let _ = ws.flush(); // send the queued pong
        }
    }
    assert_eq!(gw.metric_sum("ringgate_heartbeat_closes_total"), 0);
    assert!(gw.metric_sum("ringgate_heartbeat_pings_total") >= 4);
    assert_eq!(gw.metric_sum("ringgate_connections_open"), 2);
    // Heartbeats are served inline: still parked, and never handed back to a socket task.
    // (Checked at once: the clients stop answering now.)
    assert_eq!(parked(&gw), 2);
    assert_eq!(gw.metric_sum("ringgate_unparks_total"), unparks_before);
}

#[test]
fn parked_silent_connection_is_pinged_then_closed_1001() {
    let gw = Gateway::start(&[
        "--io-driver",
        "glommio",
        "--park-idle-ms",
        "20",
        "--heartbeat-ms",
        "300",
    ]);
    let mut raw = RawWs::connect(gw.public, "/ws?user=quiet");
    assert_eq!(raw.recv_json()["op"], "welcome");
    let (before, close) = raw.until_close();
    let pings = before.iter().filter(|f| f.opcode == 9).count();
    assert_eq!(close.close_code(), Some(1001));
    assert!(pings >= 1);
    assert!(
        gw.metric_sum("ringgate_parks_total") >= 1,
        "it was parked when pinged"
    );
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_connections_open")
        == 0));
    assert_eq!(parked(&gw), 0);
}

#[test]
fn a_parked_client_that_leaves_is_cleaned_up() {
    let gw = Gateway::start(&["--io-driver", "glommio", "--park-idle-ms", "20"]);
    let conns: Vec<_> = (0..10)
        .map(|i| connect_app(&gw, &format!("gone{i}")).0)
        .collect();
    assert!(eventually(Duration::from_secs(5), || parked(&gw) == 10));
    drop(conns); // FIN on every socket while parked
    assert!(eventually(Duration::from_secs(5), || gw
        .metric_sum("ringgate_connections_open")
        == 0));
    assert_eq!(parked(&gw), 0);
    // The gauge is refreshed on the next wheel tick.
    assert!(eventually(Duration::from_secs(2), || gw
        .metric_sum("ringgate_wheel_entries")
        == 0));
}

#[test]
fn a_burst_to_a_parked_connection_unparks_it_and_loses_nothing() {
    let gw = Gateway::start(&[
        "--io-driver",
        "glommio",
        "--park-idle-ms",
        "200",
        "--echo-route",
        "true",
    ]);
    let mut ws = connect(&gw, "/echo");
    // /echo connections park too.
    assert!(eventually(Duration::from_secs(5), || parked(&gw) == 1));
    // Two bursts back to back: the first, after a long silence, may be served inline (all of
    // it may arrive in one read); the second comes well within park_idle_ms of the first, so
    // the connection is busy and goes back to a socket task.
    for burst in 0..2u32 {
        for i in 0..100u32 {
            ws.send(Message::Binary(
                (burst * 100 + i).to_be_bytes().to_vec().into(),
            ))
            .unwrap();
        }
        for i in 0..100u32 {
            assert_eq!(
                ws.read().unwrap(),
                Message::Binary((burst * 100 + i).to_be_bytes().to_vec().into())
            );
        }
    }
    assert!(gw.metric_sum("ringgate_unparks_total") >= 1);
    // Quiet again: it parks again (under a new descriptor) and still echoes.
    let parks_before = gw.metric_sum("ringgate_parks_total");
    assert!(eventually(Duration::from_secs(5), || parked(&gw) == 1));
    assert!(gw.metric_sum("ringgate_parks_total") > parks_before);
    for round in 0..3u8 {
        for i in 0..50u8 {
            ws.send(Message::Binary(vec![round, i].into())).unwrap();
        }
        for i in 0..50u8 {
            assert_eq!(ws.read().unwrap(), Message::Binary(vec![round, i].into()));
        }
        assert!(eventually(Duration::from_secs(5), || parked(&gw) == 1));
    }
}

#[test]
fn sigterm_reaches_parked_connections_with_1012() {
    let mut gw = Gateway::start(&[
        "--io-driver",
        "glommio",
        "--park-idle-ms",
        "20",
        "--drain-ms",
        "5000",
    ]);
    let mut clients: Vec<_> = (0..6)
        .map(|i| connect_app(&gw, &format!("pz{i}")).0)
        .collect();
    assert!(eventually(Duration::from_secs(5), || parked(&gw) == 6));
    gw.sigterm();
    for ws in clients.iter_mut() {
        assert_eq!(recv_close_code(ws), 1012);
    }
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Parked users in pairs send to each other at the same moments: serving one parked socket
/// inline delivers to its partner, also parked and also with input waiting, which is then
/// served inline too and answers the first (nested). The gateway once panicked here.
#[test]
fn parked_pairs_sending_to_each_other_at_once_lose_nothing() {
    const PAIRS: usize = 60;
    const ROUNDS: usize = 15;
    let gw = Gateway::start_shards(1, &["--io-driver", "glommio", "--park-idle-ms", "20"]);
    let start = std::time::Instant::now() + Duration::from_millis(600);
    let threads: Vec<_> = (0..2 * PAIRS)
        .map(|i| {
            let (me, partner) = (format!("np{i}"), format!("np{}", i ^ 1));
            let (mut ws, _) = connect_app(&gw, &me);
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    // Everyone sends at the same instants, 60 ms apart: idle in between, so
                    // the sockets park (20 ms) and wake together.
                    let at = start + Duration::from_millis(60 * round as u64);
                    std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
                    send(
                        &mut ws,
                        &partner,
                        &format!("{me}-{round}"),
                        serde_json::json!(round),
                    );
                }
                let (mut accepted, mut got) = (0, Vec::new());
                while accepted < ROUNDS || got.len() < ROUNDS {
                    let v = recv_json(&mut ws);
                    match v["op"].as_str() {
                        Some("accepted") => accepted += 1,
                        Some("msg") => {
                            ack(&mut ws, v["seq"].as_u64().unwrap());
                            got.push(v["cid"].as_str().unwrap().to_string());
                        }
                        Some("delivered") => {}
                        _ => panic!("{me}: unexpected {v}"),
                    }
                }
                let expected: Vec<String> = (0..ROUNDS).map(|r| format!("{partner}-{r}")).collect();
                assert_eq!(got, expected, "{me}: every message once, in order");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a user thread failed");
    }
    // The scenario happened: sockets parked between rounds (whether one was handed back to
    // a socket task or served inline all along depends on timing, so it is not asserted;
    // it failed CI once with 0 hand-backs and nothing lost).
    assert!(
        eventually(Duration::from_secs(10), || gw
            .metric_sum("ringgate_parks_total")
            >= 1),
        "sockets parked"
    );
    let (status, _) = gw.admin_get("/healthz");
    assert_eq!(status, 200, "the gateway is alive");
}
