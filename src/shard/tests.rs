//! Shard-level behaviour without sockets: a mock stream stands in for the socket and a real
//! mesh connects two shards, so the full-channel paths can be forced.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_lite::{AsyncRead, AsyncWrite};

use super::{ConnPoll, Shard, Shared};
use crate::clock::ManualClock;
use crate::config::ConfigLayer;
use crate::limit::Limited;
use crate::mesh::{self, CHANNEL_CAPACITY};
use crate::metrics::ShardMetrics;
use crate::shard::msg::{Presence, ShardMsg};
use crate::ws::frame::tests::client_frame;

/// Bytes the client "sent" (read by the shard) and bytes the shard wrote.
#[derive(Default)]
struct MockStream {
    input: VecDeque<u8>,
    output: Vec<u8>,
}

impl AsyncRead for MockStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.input.is_empty() {
            return Poll::Pending;
        }
        let n = buf.len().min(self.input.len());
        for (i, b) in self.input.drain(..n).enumerate() {
            buf[i] = b;
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for MockStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Shard 0 of a two-shard mesh, with shard 1's channel filled to capacity.
fn shard_with_full_neighbour() -> Shard {
    let cfg = ConfigLayer::default().resolve().unwrap();
    let (mut ends, _client) = mesh::build(2).unwrap();
    let (mesh1, _bell1) = ends.pop().unwrap();
    let (mesh0, _bell0) = ends.pop().unwrap();
    for _ in 0..CHANNEL_CAPACITY {
        let (reply, _) = tokio::sync::oneshot::channel();
        assert!(mesh0
            .send(
                1,
                ShardMsg::Presence(Presence::Api {
                    users: vec![],
                    reply
                })
            )
            .is_ok());
    }
    std::mem::forget(mesh1); // keep shard 1's receiver alive (and full) for the test's life
    let mut shard = Shard::new(
        0,
        Shared::new(cfg),
        Arc::new(ShardMetrics::default()),
        Box::new(ManualClock::new(1_000)),
    );
    shard.enable_mesh(mesh0);
    shard
}

fn user_homed_on(shard: usize) -> String {
    (0..)
        .map(|i| format!("u{i}"))
        .find(|u| mesh::home_shard(u, 2) == shard)
        .unwrap()
}

fn upgrade(user: &str) -> Vec<u8> {
    format!("GET /ws?user={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").into_bytes()
}

fn poll(shard: &mut Shard, index: usize, stream: &mut MockStream) -> ConnPoll {
    let mut cx = Context::from_waker(Waker::noop());
    shard.poll_conn(index, stream, &mut cx)
}

/// Send one text frame (masked with `mask`) and read the one unmasked text frame answered.
fn exchange(
    shard: &mut Shard,
    index: usize,
    stream: &mut MockStream,
    text: &str,
    mask: [u8; 4],
) -> serde_json::Value {
    stream.output.clear();
    stream
        .input
        .extend(client_frame(true, 1, text.as_bytes(), mask));
    poll(shard, index, stream);
    serde_json::from_slice(&stream.output[2..]).unwrap()
}

#[test]
fn a_full_home_channel_turns_the_handoff_into_close_1013() {
    let mut shard = shard_with_full_neighbour();
    let index = shard.admit(0).unwrap();
    let mut stream = MockStream::default();
    stream.input.extend(upgrade(&user_homed_on(1)));
    let ConnPoll::Handoff { to } = poll(&mut shard, index, &mut stream) else {
        panic!("a user homed on shard 1 is handed over");
    };
    assert_eq!(to, 1);
    let socket: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    assert!(
        !shard.handoff(index, to, socket),
        "the full channel hands it back"
    );
    assert_eq!(shard.metrics.mesh_full.get(), 1);
    // The connection stays here and is told to come back later: 101, then close 1013.
    poll(&mut shard, index, &mut stream);
    let text = String::from_utf8_lossy(&stream.output).to_string();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // A close frame: 0x88, a one-byte length, then the code.
    let has_1013 = stream
        .output
        .windows(4)
        .any(|w| w[0] == 0x88 && w[2..4] == 1013u16.to_be_bytes());
    assert!(has_1013, "close 1013 expected: {:?}", stream.output);
}

#[test]
fn a_send_that_meets_a_full_channel_is_answered_unavailable_and_not_kept() {
    let mut shard = shard_with_full_neighbour();
    let index = shard.admit(0).unwrap();
    let mut stream = MockStream::default();
    stream.input.extend(upgrade(&user_homed_on(0)));
    assert!(matches!(
        poll(&mut shard, index, &mut stream),
        ConnPoll::Pending { .. }
    ));
    let to = user_homed_on(1);
    let send = format!(r#"{{"op":"send","to":"{to}","cid":"c-9","body":1}}"#);
    // One unmasked text frame: the error.
    let v = exchange(&mut shard, index, &mut stream, &send, [1, 2, 3, 4]);
    assert_eq!(v["op"], "error");
    assert_eq!(v["code"], "unavailable");
    assert_eq!(v["cid"], "c-9");
    assert_eq!(shard.metrics.mesh_full.get(), 1);
    // Kept for the pair's next message to carry to the recipient's shard (whose mirror
    // holds the pair off the live path until it is stored).
    let from = user_homed_on(0);
    assert_eq!(shard.senders.unrouted_of(&from, &to), [r#""c-9""#]);
    // Not kept as pending: the same cid sent again is a new attempt (refused again here).
    let v = exchange(&mut shard, index, &mut stream, &send, [5, 6, 7, 8]);
    assert_eq!(v["code"], "unavailable");
    assert_eq!(
        shard.metrics.dedup_hits.get(),
        0,
        "a refused cid is forgotten, not deduplicated"
    );
    assert_eq!(shard.senders.unrouted_of(&from, &to), [r#""c-9""#], "once");
    // The pair's next message carries c-9; refused on its way too, it puts it back.
    let next = format!(r#"{{"op":"send","to":"{to}","cid":"c-10","body":1}}"#);
    let v = exchange(&mut shard, index, &mut stream, &next, [5, 6, 7, 8]);
    assert_eq!(v["code"], "unavailable");
    let kept = shard.senders.unrouted_of(&from, &to);
    assert_eq!(kept, [r#""c-9""#, r#""c-10""#]);
}

#[test]
fn a_presence_ask_that_meets_a_full_channel_is_held_not_refused() {
    let mut shard = shard_with_full_neighbour();
    let index = shard.admit(0).unwrap();
    let mut stream = MockStream::default();
    let me = user_homed_on(0);
    stream.input.extend(upgrade(&me));
    poll(&mut shard, index, &mut stream);
    let other = user_homed_on(1);
    // The question for shard 1 waits for room in its channel (sent on a later tick, behind
    // whatever else is held): no `unavailable`, which the client could not match to this
    // frame, and the answer comes once shard 1 answers.
    stream.output.clear();
    let ask = format!(r#"{{"op":"presence","users":["{me}","{other}"]}}"#);
    stream
        .input
        .extend(client_frame(true, 1, ask.as_bytes(), [1, 2, 3, 4]));
    poll(&mut shard, index, &mut stream);
    assert!(stream.output.is_empty(), "nothing answered yet");
    assert_eq!(shard.metrics.mesh_full.get(), 1);
    assert_eq!(shard.presence.asks_waiting(), 1, "the question waits");
    assert_eq!(shard.unsent.len(), 1, "held for the next tick");
    // Users homed here only: answered at once, no channel involved.
    let nobody = (0..)
        .map(|i| format!("nobody{i}"))
        .find(|u| mesh::home_shard(u, 2) == 0)
        .unwrap();
    let ask = format!(r#"{{"op":"presence","users":["{me}","{nobody}"]}}"#);
    let v = exchange(&mut shard, index, &mut stream, &ask, [1, 2, 3, 4]);
    assert_eq!(v["online"], serde_json::json!({ me: true, nobody: false }));
}

/// Every unmasked text frame the shard wrote (the HTTP response skipped).
fn text_frames(output: &[u8]) -> Vec<serde_json::Value> {
    let start = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |p| p + 4);
    let mut rest = &output[start..];
    let mut frames = Vec::new();
    while rest.len() >= 2 {
        let (len, head) = match rest[1] & 0x7f {
            126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 => panic!("no 64-bit frames here"),
            n => (n as usize, 2),
        };
        if rest[0] == 0x81 {
            frames.push(serde_json::from_slice(&rest[head..head + len]).unwrap());
        }
        rest = &rest[head + len..];
    }
    frames
}

#[test]
fn a_node_that_missed_room_messages_tells_its_members_gap_and_ignores_late_copies() {
    use crate::store::redis::{self, RedisSettings, RoomJoinAsk, StoreReply};
    use crate::store::StoredMessage;
    // Redis mode against a port nobody listens on: the room's answers are fed by hand, as the
    // node's channel would deliver them.
    let cfg = ConfigLayer::default().resolve().unwrap();
    let settings = RedisSettings {
        url: "redis://127.0.0.1:9".into(),
        pool_size: 1,
        timeout: std::time::Duration::from_millis(50),
        key_prefix: "t:".into(),
        max_messages: 10,
        max_age_ms: 60_000,
        node: "t.1".into(),
        lease_ms: 1_000,
        room_history_max: 10,
        room_history_age_ms: 60_000,
        tls_ca: None,
        watch_offline: false,
    };
    let link = redis::start(settings, 1).unwrap().pop().unwrap();
    let mut shard = Shard::new(
        0,
        Shared::new(cfg),
        Arc::new(ShardMetrics::default()),
        Box::new(ManualClock::new(1_000)),
    );
    shard.enable_store(link);
    let index = shard.admit(0).unwrap();
    let mut stream = MockStream::default();
    stream.input.extend(upgrade("member"));
    poll(&mut shard, index, &mut stream);
    stream.input.extend(client_frame(
        true,
        1,
        br#"{"op":"join","room":"r"}"#,
        [1, 2, 3, 4],
    ));
    poll(&mut shard, index, &mut stream);
    stream.output.clear();
    let ask = RoomJoinAsk {
        room: "r".into(),
        since: None,
        shard: 0,
        conn: index,
        serial: shard.conns[index].serial,
        token: 1, // the shard's first join ask
    };
    let answer = || StoreReply::RoomJoinAnswer {
        ask: Box::new(ask.clone()),
        last: 100,
        recovered: false,
        replay: Vec::new(),
    };
    let pushed = |offset: u64| StoreReply::RoomMessage {
        room: "r".into(),
        offset,
        msg: StoredMessage {
            id: offset,
            from: "p".into(),
            cid: format!("\"c{offset}\"").into(),
            ts: 1,
            body: offset.to_string().into(),
            msg_type: None,
        },
    };
    for reply in [
        answer(),
        pushed(101),
        pushed(104),
        pushed(103),
        pushed(104),
        answer(),
    ] {
        shard.on_store_reply(reply, 1_000);
    }
    poll(&mut shard, index, &mut stream);
    let got: Vec<(String, u64)> = text_frames(&stream.output)
        .iter()
        .map(|f| {
            let n = f["offset"].as_u64().or(f["from"].as_u64()).unwrap();
            (f["op"].as_str().unwrap().to_string(), n)
        })
        .collect();
    let want: Vec<(String, u64)> = [("joined", 100), ("room", 101), ("gap", 102), ("room", 104)]
        .iter()
        .map(|(op, n)| (op.to_string(), *n))
        .collect();
    // The second answer to the same join (asked again after a resync) and the late or repeated
    // copies (103, 104) show nothing.
    assert_eq!(got, want);
    assert_eq!(shard.metrics.room_gaps.get(), 1);
}

/// A shard with parking on (a real epoll set and poller) and a clock the test steps.
fn parking_shard() -> (Shard, std::rc::Rc<ManualClock>) {
    let cfg = ConfigLayer::default().resolve().unwrap();
    let clock = std::rc::Rc::new(ManualClock::new(1_000));
    let mut shard = Shard::new(
        0,
        Shared::new(cfg),
        Arc::new(ShardMetrics::default()),
        Box::new(clock.clone()),
    );
    let (set, _bell) = super::park::ParkSet::new(0).unwrap();
    shard.enable_parking(set);
    (shard, clock)
}

/// What the client end has been sent so far (non-blocking).
fn received(client: &mut std::os::unix::net::UnixStream) -> String {
    use std::io::Read;
    client.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 4096];
    match client.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => String::new(),
        Err(e) => panic!("read: {e}"),
    }
}

#[test]
fn a_parked_handshake_is_judged_on_what_the_client_sent_not_on_what_the_shard_read() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (mut shard, clock) = parking_shard();
    let timeout = shard.cfg().handshake_timeout_ms;

    // Sent in time, but the shard never got to its ready socket (behind under load): at the
    // deadline it is read and upgraded, not refused.
    let (mut late_read, server) = std::os::unix::net::UnixStream::pair().unwrap();
    let index = shard.admit(0).unwrap();
    assert!(shard.park_accepted(index, server.as_raw_fd()));
    drop(server); // the shard keeps its own duplicate
    late_read.write_all(&upgrade("ann")).unwrap();
    clock.advance(timeout + shard.cfg().tick_ms);
    shard.on_tick();
    let answer = received(&mut late_read);
    assert!(answer.starts_with("HTTP/1.1 101"), "got {answer:?}");

    // Never sent: 408 at the deadline.
    let (mut silent, server) = std::os::unix::net::UnixStream::pair().unwrap();
    let index = shard.admit(0).unwrap();
    assert!(shard.park_accepted(index, server.as_raw_fd()));
    drop(server);
    clock.advance(timeout + shard.cfg().tick_ms);
    shard.on_tick();
    let answer = received(&mut silent);
    assert!(answer.starts_with("HTTP/1.1 408"), "got {answer:?}");
}

/// Everything the client end has been sent so far, as bytes (non-blocking).
fn received_bytes(client: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    use std::io::Read;
    client.set_nonblocking(true).unwrap();
    let mut all = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        match client.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return all,
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn a_parked_connection_is_judged_on_the_pongs_it_sent_not_on_what_the_shard_read() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    const PING: [u8; 2] = [0x89, 0x00];
    // A close frame (any reason length under 126) with code 1001.
    let closed_1001 = |got: &[u8]| {
        got.windows(4)
            .any(|w| w[0] == 0x88 && w[2..] == [0x03, 0xE9])
    };
    let (mut shard, clock) = parking_shard();
    let (hb, tick) = (shard.cfg().heartbeat_ms, shard.cfg().tick_ms);
    let open = |shard: &mut Shard, user: &str| {
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let index = shard.admit(0).unwrap();
        assert!(shard.park_accepted(index, server.as_raw_fd()));
        drop(server); // the shard keeps its own duplicate
        client.write_all(&upgrade(user)).unwrap();
        shard.on_tick(); // not yet due: nothing is read
        client
    };
    // Both upgrade when their handshake deadline reads them.
    let mut answering = open(&mut shard, "ann");
    let mut silent = open(&mut shard, "bob");
    clock.advance(shard.cfg().handshake_timeout_ms + tick);
    shard.on_tick();
    for client in [&mut answering, &mut silent] {
        let got = received_bytes(client);
        assert!(
            got.starts_with(b"HTTP/1.1 101"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // Silent for a heartbeat: both are pinged; one answers every ping, but the shard, behind
    // under load, never gets to its ready socket before the 3-heartbeat deadline.
    let mut pinged = [0usize; 2];
    for _ in 0..2 {
        clock.advance(hb);
        shard.on_tick();
        for (n, client) in [&mut answering, &mut silent].into_iter().enumerate() {
            let got = received_bytes(client);
            assert!(!closed_1001(&got), "client {n} closed early");
            if got.windows(2).any(|w| w == PING) {
                pinged[n] += 1;
                if n == 0 {
                    let pong = crate::ws::frame::tests::client_frame(true, 0xA, b"", [1, 2, 3, 4]);
                    client.write_all(&pong).unwrap();
                }
            }
        }
    }
    assert_eq!(pinged, [2, 2], "a ping per silent heartbeat");
    clock.advance(hb);
    shard.on_tick();
    let answered = received_bytes(&mut answering);
    assert!(
        !closed_1001(&answered),
        "closed for silence with its pongs waiting unread: {answered:?}"
    );
    let silence = received_bytes(&mut silent);
    assert!(closed_1001(&silence), "{silence:?}");
}

/// A task's waker and a park request live beside the slab, by slab index: a connection that
/// leaves takes them along, so the next connection given its slot starts without them (a stale
/// request would park it, a stale waker wake a task that is gone).
#[test]
fn a_reused_slab_index_inherits_no_park_request_or_waker() {
    let (mut shard, _clock) = parking_shard();
    let first = shard.admit(0).unwrap();
    shard.park_requests.insert(first);
    shard.set_waker(first, std::task::Waker::noop());
    assert!(shard.park_requested(first) && shard.task_wakers.contains_key(&first));
    shard.remove(first);
    let second = shard.admit(0).unwrap();
    assert_eq!(second, first, "the slab gives the slot out again");
    assert!(!shard.park_requested(second));
    assert!(!shard.task_wakers.contains_key(&second));
}

/// What a parked connection costs the shard in fixed-size state (README, "memory per
/// connection"): its slab slot, its wheel entry and its user-registry slot. Printed so a
/// change that grows them shows in the test log, and bounded so it cannot grow unnoticed.
#[test]
fn a_parked_connection_fits_in_its_slab_slot_wheel_entry_and_registry_slot() {
    // slab's own cell is `enum { Vacant(usize), Occupied(T) }`: the same shape as this Result.
    let slot = std::mem::size_of::<Result<super::Entry, usize>>();
    let wheel = crate::wheel::entry_size::<super::ConnRef>();
    // The users' table holds a u32 slab index and hashbrown's control byte per connection.
    let registry = std::mem::size_of::<u32>() + 1;
    eprintln!(
        "slab slot {slot} B (Connection {} B), wheel entry {wheel} B, registry slot {registry} B",
        std::mem::size_of::<crate::conn::Connection>()
    );
    assert!(
        slot + wheel + registry <= 149,
        "{slot} + {wheel} + {registry}"
    );
}

/// The per-connection tables are reserved at start for the shard's share of
/// `max_connections`, so they never move while connections arrive (see `Shard::new`).
#[test]
fn a_shard_reserves_its_connection_tables_for_its_share_of_max_connections() {
    let cfg = ConfigLayer {
        max_connections: Some(1_001),
        shards: Some(4),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(cfg.connections_per_shard(), 251);
    let shard = Shard::new(
        1,
        Shared::new(cfg),
        Arc::new(ShardMetrics::default()),
        Box::new(ManualClock::new(1_000)),
    );
    assert!(shard.conns.capacity() >= 251, "{}", shard.conns.capacity());
    assert!(shard.wheel.capacity() >= 251, "{}", shard.wheel.capacity());
    assert!(shard.mirror.users_capacity() >= 251);
    // A limit meant as "none" reserves what the process could use, not the limit.
    let cfg = ConfigLayer {
        max_connections: Some(1 << 40),
        shards: Some(1),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let shard = Shard::new(
        0,
        Shared::new(cfg),
        Arc::new(ShardMetrics::default()),
        Box::new(ManualClock::new(1_000)),
    );
    let bound = super::open_files_limit().min(super::MAX_RESERVED_CONNECTIONS);
    assert!(shard.conn_capacity() >= bound.min(1 << 10));
    assert!(
        shard.conn_capacity() <= 2 * bound,
        "{}",
        shard.conn_capacity()
    );
}

/// A message delivered to a parked device puts the ack deadline on the wheel: the delivery
/// only writes to a parked socket (no poll follows to sync the wheel entry), and CI once saw no
/// retransmit for 10 s with `ack_timeout_ms` 100 because the entry kept a later deadline.
#[test]
fn a_message_to_a_parked_device_is_retransmitted_when_its_ack_is_late() {
    use serde_json::json;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (mut shard, clock) = parking_shard();
    let (ack_timeout, tick) = (shard.cfg().ack_timeout_ms, shard.cfg().tick_ms);
    assert!(
        ack_timeout < shard.cfg().heartbeat_ms,
        "the ack is due first"
    );

    let (mut device, server) = std::os::unix::net::UnixStream::pair().unwrap();
    device.write_all(&upgrade("bob")).unwrap();
    let bob = shard.admit(0).unwrap();
    assert!(shard.park_accepted(bob, server.as_raw_fd()));
    drop(server); // the shard keeps its own duplicate
    let welcome = received_bytes(&mut device);
    assert!(welcome.starts_with(b"HTTP/1.1 101"), "{welcome:?}");
    assert_eq!(
        shard.metrics.connections_parked.get(),
        1,
        "bob stays parked"
    );

    let mut alice = MockStream::default();
    alice.input.extend(upgrade("alice"));
    let index = shard.admit(0).unwrap();
    poll(&mut shard, index, &mut alice);
    let sent = r#"{"op":"send","to":"bob","cid":"c1","body":1}"#;
    let answer = exchange(&mut shard, index, &mut alice, sent, [9, 8, 7, 6]);
    assert_eq!(answer["op"], "accepted", "{answer}");
    let first = text_frames(&received_bytes(&mut device));
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        (&first[0]["op"], &first[0]["seq"]),
        (&json!("msg"), &json!(1))
    );
    assert_eq!(shard.metrics.msg_frames_out.get(), 1, "one message out");

    // No ack: past the timeout the same seq comes again, still parked.
    clock.advance(ack_timeout + tick);
    shard.on_tick();
    let again = text_frames(&received_bytes(&mut device));
    assert_eq!(again, first, "retransmitted at the ack deadline");
    assert_eq!(shard.metrics.retransmits.get(), 1);
    assert_eq!(
        shard.metrics.msg_frames_out.get(),
        1,
        "a retransmit is counted apart, not as a second message out"
    );
}

/// A shard of its own (with a manual clock) and two connected devices of ann.
fn ann_on_two_devices(
    cfg: crate::config::Config,
) -> (Shard, std::rc::Rc<ManualClock>, [MockStream; 2], [usize; 2]) {
    let clock = std::rc::Rc::new(ManualClock::new(1_000));
    let mut shard = Shard::new(
        0,
        Shared::new(cfg),
        Arc::new(ShardMetrics::default()),
        Box::new(clock.clone()),
    );
    let mut devices = [MockStream::default(), MockStream::default()];
    let mut index = [0; 2];
    for (d, stream) in devices.iter_mut().enumerate() {
        stream.input.extend(upgrade("ann"));
        index[d] = shard.admit(0).unwrap();
        poll(&mut shard, index[d], stream);
    }
    (shard, clock, devices, index)
}

/// ann's `send` of `cid` to bob.
fn send(cid: &str) -> String {
    format!(r#"{{"op":"send","to":"bob","cid":"{cid}","body":1}}"#)
}

/// A `send` over its connection's frame limit is answered `rate_limited` there, and its cid
/// is kept for the pair's next message to carry to the recipient's shard (see
/// `Senders::refused_unrouted`), until the sender's last connection here closes.
#[test]
fn a_send_over_the_frame_limit_is_kept_for_the_pairs_next_message_until_its_sender_leaves() {
    let cfg = ConfigLayer {
        conn_frame_rate: Some(1),
        conn_frame_burst: Some(1),
        rate_limit_strikes: Some(1000),
        max_frame: Some(1024),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let (mut shard, _clock, mut devices, index) = ann_on_two_devices(cfg);
    let answer = exchange(&mut shard, index[0], &mut devices[0], &send("c1"), [1; 4]);
    assert_eq!(answer["op"], "accepted", "{answer}");
    let answer = exchange(&mut shard, index[0], &mut devices[0], &send("c2"), [1; 4]);
    assert_eq!(answer["code"], "rate_limited", "{answer}");
    assert_eq!(shard.metrics.rate_limited[Limited::Frames.index()].get(), 1);
    assert_eq!(shard.senders.unrouted_of("ann", "bob"), [r#""c2""#]);
    // Not kept: c1 again (accepted: its entry may be stored and seen already, never again),
    // and a send too large to be taken ever (its `msg` would pass `max_frame`).
    let too_large = format!(
        r#"{{"op":"send","to":"bob","cid":"c3","body":"{}"}}"#,
        "x".repeat(960)
    );
    for text in [send("c1"), too_large] {
        let answer = exchange(&mut shard, index[0], &mut devices[0], &text, [1; 4]);
        assert_eq!(answer["code"], "rate_limited", "{answer}");
    }
    assert_eq!(shard.senders.unrouted_of("ann", "bob"), [r#""c2""#]);
    // A resend refused here is kept as a mark on the pair, not as a cid (another attempt of
    // it may be stored already, and its cid never come again).
    let resend = r#"{"op":"send","to":"bob","cid":"c4","body":1,"resend":true}"#;
    let answer = exchange(&mut shard, index[0], &mut devices[0], resend, [1; 4]);
    assert_eq!(answer["code"], "rate_limited", "{answer}");
    assert!(shard.senders.resend_unrouted_of("ann", "bob"));
    assert_eq!(shard.senders.unrouted_of("ann", "bob"), [r#""c2""#]);
    shard.remove(index[0]);
    assert_eq!(
        shard.senders.unrouted_of("ann", "bob"),
        [r#""c2""#],
        "ann has a device here still"
    );
    shard.remove(index[1]);
    assert!(shard.senders.unrouted_of("ann", "bob").is_empty(), "left");
    assert!(!shard.senders.resend_unrouted_of("ann", "bob"), "left");
    // Nor is a refusal of the backend's kept: its messages never go live.
    let backend = super::deliver::BACKEND_SENDER;
    shard.refused_before_routing(backend, "bob", &"\"b1\"".into(), false);
    assert!(shard.senders.unrouted_of(backend, "bob").is_empty());
}

/// `send` + `publish` per user (SPEC 4): one bucket for all of a user's devices, exact because
/// they all live on the user's home shard; a refused send gets `rate_limited` with its cid and
/// `retry_ms`, nothing of it is taken (no `accepted` later, no message stored), and after the
/// wait the same cid goes through. An ack that acknowledges nothing costs a frame.
#[test]
fn sends_are_limited_per_user_across_devices_and_useless_acks_cost_a_frame() {
    use serde_json::json;
    let cfg = ConfigLayer {
        user_send_rate: Some(10),
        user_send_burst: Some(2),
        conn_frame_rate: Some(1),
        conn_frame_burst: Some(10),
        rate_limit_strikes: Some(1000),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let (mut shard, clock, mut devices, index) = ann_on_two_devices(cfg);
    let [a, b] = &mut devices;
    let answer = exchange(&mut shard, index[0], a, &send("c1"), [1, 2, 3, 4]);
    assert_eq!(answer["op"], "accepted", "{answer}");
    let answer = exchange(&mut shard, index[1], b, &send("c2"), [1, 2, 3, 4]);
    assert_eq!(answer["op"], "accepted", "{answer}");
    let answer = exchange(&mut shard, index[0], a, &send("c3"), [1, 2, 3, 4]);
    assert_eq!(
        (&answer["code"], &answer["cid"], &answer["retry_ms"]),
        (&json!("rate_limited"), &json!("c3"), &json!(100)),
        "{answer}"
    );
    assert_eq!(shard.metrics.rate_limited[Limited::Sends.index()].get(), 1);
    assert_eq!(shard.metrics.stored.get(), 2, "nothing of c3 was taken");
    // Kept for the pair's next message to carry to bob's shard (see `refused_unrouted`).
    assert_eq!(shard.senders.unrouted_of("ann", "bob"), [r#""c3""#]);
    clock.advance(100);
    let answer = exchange(&mut shard, index[1], b, &send("c3"), [1, 2, 3, 4]);
    assert_eq!(answer["op"], "accepted", "{answer}");
    assert!(
        shard.senders.unrouted_of("ann", "bob").is_empty(),
        "carried"
    );

    // Acks: nothing was delivered to ann, so every ack acknowledges nothing and costs a frame.
    let frames_before = shard.metrics.rate_limited[Limited::Frames.index()].get();
    for _ in 0..10 {
        a.input.extend(client_frame(
            true,
            1,
            br#"{"op":"ack","seq":0}"#,
            [5, 6, 7, 8],
        ));
    }
    poll(&mut shard, index[0], a);
    assert!(
        shard.metrics.rate_limited[Limited::Frames.index()].get() > frames_before,
        "the frame bucket (10 at once) ran dry on acks that acknowledge nothing"
    );
}
