//! Offline push webhook (SPEC 4), end to end: real gateways (embedded store, and two nodes on
//! one real redis-server) POST to a real HTTP receiver in this process, which can be told to
//! answer 500, to stall past the gateway's timeout, and to recover. Checked: every message
//! stored for a user with no device is pushed at least once, signed; none for online users;
//! failures are retried until the receiver recovers and counted; an ack before the delay
//! cancels the push; a full queue drops and counts; with Redis exactly one node pushes.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const PUSH_SECRET: &str = "push-test-secret-0123456789";
const WITHIN: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ok,
    Fail,
    Stall,
}

/// One POST the receiver answered 2xx.
struct Post {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct Seen {
    posts: Vec<Post>,
    /// Requests of any outcome (answered 2xx, 500, or stalled).
    attempts: u64,
}

/// A webhook receiver on 127.0.0.1:0: one thread per connection, HTTP/1.1, one request each.
struct Receiver {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Seen>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Ok));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (m, s) = (mode.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (m, s) = (m.clone(), s.clone());
                std::thread::spawn(move || serve(stream, &m, &s));
            }
        });
        Receiver { addr, mode, seen }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn attempts(&self) -> u64 {
        self.seen.lock().unwrap().attempts
    }

    /// Every pushed message (one entry per copy), checking each POST's signature.
    fn messages(&self) -> Vec<Value> {
        let seen = self.seen.lock().unwrap();
        let mut out = Vec::new();
        for post in &seen.posts {
            verify(post);
            let v: Value = serde_json::from_slice(&post.body).unwrap();
            out.extend(v["messages"].as_array().unwrap().iter().cloned());
        }
        out
    }

    fn ids(&self) -> Vec<String> {
        self.messages()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    }
}

fn serve(mut stream: TcpStream, mode: &Mutex<Mode>, seen: &Mutex<Seen>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    assert!(lines.next().unwrap().starts_with("POST /hook HTTP/1.1"));
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers["content-length"].parse().unwrap();
    while raw.len() < head_end + len {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let body = raw[head_end..head_end + len].to_vec();
    seen.lock().unwrap().attempts += 1;
    let current = *mode.lock().unwrap();
    match current {
        Mode::Ok => {
            seen.lock().unwrap().posts.push(Post { headers, body });
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
        Mode::Fail => {
            let _ = stream
                .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nnope");
        }
        Mode::Stall => {
            // Hold the connection unanswered while stalled (the gateway times out first).
            let until = Instant::now() + Duration::from_secs(30);
            while *mode.lock().unwrap() == Mode::Stall && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The README's verification: HMAC-SHA256(secret, "<timestamp>.<body>") in hex, after
/// `sha256=`; the timestamp is recent.
fn verify(post: &Post) {
    assert_eq!(post.headers["content-type"], "application/json");
    let ts = &post.headers["x-ringgate-timestamp"];
    let mut mac = Hmac::<Sha256>::new_from_slice(PUSH_SECRET.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(&post.body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        post.headers["x-ringgate-signature"],
        format!("sha256={hex}"),
        "bad signature"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ts: u64 = ts.parse().unwrap();
    assert!(
        ts <= now && now - ts < 60_000,
        "timestamp {ts} vs now {now}"
    );
}

fn push_args<'a>(url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--push-webhook-url",
        url,
        "--push-webhook-secret",
        PUSH_SECRET,
    ];
    args.extend_from_slice(extra);
    args
}

/// `n` messages from `ws` to `to`; returns their ids (from `accepted`), in order.
fn send_many(ws: &mut Ws, to: &str, tag: &str, n: usize) -> Vec<String> {
    for i in 0..n {
        send(
            ws,
            to,
            &format!("{tag}-{i}"),
            json!({"text": format!("{tag} {i}")}),
        );
    }
    let mut ids = Vec::new();
    while ids.len() < n {
        let v = recv_json(ws);
        if v["op"] == "accepted" {
            ids.push(v["id"].as_str().unwrap().to_string());
        }
    }
    ids
}

fn all_pushed(r: &Receiver, ids: &[String]) -> bool {
    let got: HashSet<String> = r.ids().into_iter().collect();
    ids.iter().all(|id| got.contains(id))
}

/// Embedded store: every message to an offline user is pushed (signed, every field right);
/// an online user's messages are not.
#[test]
fn offline_messages_are_pushed_signed_and_online_ones_are_not() {
    let r = Receiver::start();
    let url = r.url();
    let gw = Gateway::start(&push_args(&url, &["--push-delay-ms", "100"]));
    let (mut alice, _) = connect_app(&gw, "alice");
    let (mut carol, _) = connect_app(&gw, "carol");
    let to_carol = send_many(&mut alice, "carol", "c", 5);
    for _ in 0..5 {
        let m = next_op(&mut carol, "msg");
        ack(&mut carol, m["seq"].as_u64().unwrap());
    }
    let to_bob = send_many(&mut alice, "bob", "b", 30);
    assert!(
        eventually(WITHIN, || all_pushed(&r, &to_bob)),
        "pushed {:?} of {to_bob:?}",
        r.ids()
    );
    let messages = r.messages();
    for m in &messages {
        assert_eq!(m["user"], "bob", "{m}");
        assert_eq!(m["from"], "alice");
        let i = to_bob.iter().position(|id| m["id"] == **id).unwrap();
        assert_eq!(m["cid"], format!("b-{i}"));
        assert_eq!(m["body"], json!({"text": format!("b {i}")}));
        assert!(m["ts"].as_u64().unwrap() > 1_600_000_000_000);
    }
    let pushed: HashSet<&str> = messages.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(to_carol.iter().all(|id| !pushed.contains(id.as_str())));
    assert_eq!(gw.metric_sum("ringgate_push_queued_total"), 30);
    assert_eq!(gw.metric("ringgate_push_sent_total{shard=\"push\"}"), 30);
    assert_eq!(gw.metric_sum("ringgate_push_dropped_total"), 0);
}

/// The receiver answers 500, then stalls past the timeout, then recovers: every message is
/// pushed in the end, and the failed attempts are counted.
#[test]
fn a_failing_then_stalled_receiver_gets_everything_once_it_recovers() {
    let r = Receiver::start();
    let url = r.url();
    let gw = Gateway::start(&push_args(
        &url,
        &[
            "--push-delay-ms",
            "0",
            "--push-timeout-ms",
            "300",
            "--push-batch-max",
            "4",
        ],
    ));
    r.set(Mode::Fail);
    let (mut alice, _) = connect_app(&gw, "alice");
    let ids = send_many(&mut alice, "dave", "d", 10);
    assert!(eventually(WITHIN, || r.attempts() >= 2));
    r.set(Mode::Stall);
    let before = r.attempts();
    assert!(eventually(WITHIN, || r.attempts() > before));
    let failures = "ringgate_push_failures_total{shard=\"push\"}";
    // The stalled POST times out and counts as failed, then the next try stalls again.
    assert!(eventually(WITHIN, || gw.metric(failures) >= 3));
    assert!(r.ids().is_empty(), "nothing is answered 2xx yet");
    r.set(Mode::Ok);
    assert!(
        eventually(WITHIN, || all_pushed(&r, &ids)),
        "pushed {:?} of {ids:?}",
        r.ids()
    );
    assert!(eventually(WITHIN, || gw
        .metric("ringgate_push_queue_depth{shard=\"push\"}")
        == 0));
    assert!(gw.metric(failures) >= 3);
    assert_eq!(gw.metric("ringgate_push_sent_total{shard=\"push\"}"), 10);
}

/// A user who connects and acks before the push delay passes gets no push (counted as
/// cancelled); a message left unacked afterwards still is pushed.
#[test]
fn an_ack_before_the_delay_cancels_the_push() {
    let r = Receiver::start();
    let url = r.url();
    let gw = Gateway::start(&push_args(&url, &["--push-delay-ms", "5000"]));
    let (mut alice, _) = connect_app(&gw, "alice");
    let acked = send_many(&mut alice, "erin", "e", 5);
    {
        let (mut erin, replayed) = connect_replay(&gw, "/ws?user=erin");
        assert_eq!(replayed.len(), 5);
        ack(&mut erin, replayed[4]["seq"].as_u64().unwrap());
        let cancelled = "ringgate_push_cancelled_total{shard=\"push\"}";
        assert!(
            eventually(WITHIN, || gw.metric(cancelled) == 5),
            "cancelled: {}",
            gw.metric(cancelled)
        );
    }
    // Erin is gone again: this one is pushed (the pipeline works, so silence above means
    // cancelled, not lost).
    assert!(eventually(WITHIN, || gw
        .metric("ringgate_users_online{shard=\"0\"}")
        + gw.metric("ringgate_users_online{shard=\"1\"}")
        == 1));
    let later = send_many(&mut alice, "erin", "late", 1);
    assert!(eventually(WITHIN, || all_pushed(&r, &later)));
    let pushed = r.ids();
    assert!(
        acked.iter().all(|id| !pushed.contains(id)),
        "acked messages were pushed: {pushed:?}"
    );
}

/// A stalled receiver and a small queue: what does not fit is dropped and counted, never
/// waited for; what fits is pushed once the receiver answers.
#[test]
fn a_full_queue_drops_and_counts() {
    let r = Receiver::start();
    let url = r.url();
    let gw = Gateway::start(&push_args(
        &url,
        &[
            "--push-delay-ms",
            "0",
            "--push-queue-max",
            "5",
            "--push-timeout-ms",
            "1000",
        ],
    ));
    r.set(Mode::Stall);
    let (mut alice, _) = connect_app(&gw, "alice");
    // Every send is accepted at once: the shard never waits for the push queue.
    let ids = send_many(&mut alice, "frank", "f", 20);
    assert!(eventually(WITHIN, || gw
        .metric_sum("ringgate_push_dropped_total")
        == 15));
    assert_eq!(gw.metric_sum("ringgate_push_queued_total"), 5);
    assert_eq!(gw.metric("ringgate_push_queue_depth{shard=\"push\"}"), 5);
    r.set(Mode::Ok);
    assert!(eventually(WITHIN, || r.ids().len() >= 5));
    let pushed: HashSet<String> = r.ids().into_iter().collect();
    assert_eq!(pushed.len(), 5);
    // The first five fit (the queue fills in send order).
    assert!(ids[..5].iter().all(|id| pushed.contains(id)), "{pushed:?}");
}

fn node(redis: &RedisServer, id: &str, url: &str) -> Gateway {
    let redis_url = redis.url();
    let args = push_args(
        url,
        &[
            "--redis-url",
            &redis_url,
            "--redis-timeout-ms",
            "500",
            "--node-id",
            id,
            "--push-delay-ms",
            "100",
        ],
    );
    Gateway::start_shards(2, &args)
}

/// Two nodes on one Redis: messages to an offline user, sent from both nodes, are pushed by
/// exactly one node each (the one that stored it); a user online on node B gets no push for
/// messages sent from node A.
#[test]
fn with_redis_exactly_one_node_pushes_and_online_users_get_none() {
    one_node_pushes(&RedisServer::start());
}

/// The same on a Redis Cluster of three primaries (the script reads the directory entry
/// there too: a user's keys share one slot).
#[test]
fn on_a_redis_cluster_exactly_one_node_pushes_and_online_users_get_none() {
    one_node_pushes(&RedisServer::start_cluster());
}

fn one_node_pushes(redis: &RedisServer) {
    let (ra, rb) = (Receiver::start(), Receiver::start());
    let (ua, ub) = (ra.url(), rb.url());
    let a = node(redis, "push-a", &ua);
    let b = node(redis, "push-b", &ub);
    let (mut hank, _) = connect_app(&b, "hank");
    let (mut alice, _) = connect_app(&a, "alice");
    let (mut bert, _) = connect_app(&b, "bert");
    let to_hank = send_many(&mut alice, "hank", "h", 5);
    for _ in 0..5 {
        let m = next_op(&mut hank, "msg");
        ack(&mut hank, m["seq"].as_u64().unwrap());
    }
    let from_a = send_many(&mut alice, "gina", "ga", 10);
    let from_b = send_many(&mut bert, "gina", "gb", 10);
    let all: Vec<String> = from_a.iter().chain(&from_b).cloned().collect();
    assert!(
        eventually(WITHIN, || {
            let got: HashSet<String> = ra.ids().into_iter().chain(rb.ids()).collect();
            all.iter().all(|id| got.contains(id))
        }),
        "node A pushed {:?}, node B {:?}, wanted {all:?}",
        ra.ids(),
        rb.ids()
    );
    let (pa, pb): (HashSet<String>, HashSet<String>) = (
        ra.ids().into_iter().collect(),
        rb.ids().into_iter().collect(),
    );
    assert!(
        pa.is_disjoint(&pb),
        "pushed by both nodes: {:?}",
        pa.intersection(&pb)
    );
    assert_eq!(pa, from_a.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(pb, from_b.iter().cloned().collect::<HashSet<_>>());
    for m in ra.messages().iter().chain(&rb.messages()) {
        assert_eq!(m["user"], "gina", "{m}");
    }
    assert!(to_hank
        .iter()
        .all(|id| !pa.contains(id) && !pb.contains(id)));
    assert_eq!(
        a.metric_sum("ringgate_push_queued_total") + b.metric_sum("ringgate_push_queued_total"),
        20
    );
}

/// With Redis, the worker finds an acked entry gone before its POST: not pushed.
#[test]
fn with_redis_an_ack_before_the_delay_cancels_the_push() {
    let redis = RedisServer::start();
    let r = Receiver::start();
    let url = r.url();
    let redis_url = redis.url();
    let gw = Gateway::start_shards(
        2,
        &push_args(
            &url,
            &[
                "--redis-url",
                &redis_url,
                "--redis-timeout-ms",
                "500",
                "--push-delay-ms",
                "5000",
            ],
        ),
    );
    let (mut alice, _) = connect_app(&gw, "alice");
    let acked = send_many(&mut alice, "ivy", "i", 3);
    {
        let (mut ivy, replayed) = connect_replay(&gw, "/ws?user=ivy");
        assert_eq!(replayed.len(), 3);
        ack(&mut ivy, replayed[2]["seq"].as_u64().unwrap());
        let cancelled = "ringgate_push_cancelled_total{shard=\"push\"}";
        assert!(
            eventually(WITHIN, || gw.metric(cancelled) == 3),
            "cancelled: {}",
            gw.metric(cancelled)
        );
    }
    assert!(r.ids().iter().all(|id| !acked.contains(id)));
}

/// SIGTERM: the worker sends what it holds at once (the delay no longer applies) within the
/// drain budget, then the process exits 0.
#[test]
fn shutdown_flushes_the_queue_within_the_drain_budget() {
    let r = Receiver::start();
    let url = r.url();
    let mut gw = Gateway::start(&push_args(
        &url,
        &["--push-delay-ms", "600000", "--drain-ms", "3000"],
    ));
    let (mut alice, _) = connect_app(&gw, "alice");
    let ids = send_many(&mut alice, "jack", "j", 3);
    assert!(r.ids().is_empty(), "the delay holds them");
    let started = Instant::now();
    gw.sigterm();
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(all_pushed(&r, &ids), "pushed {:?} of {ids:?}", r.ids());
}

/// A read receipt stored for an offline sender is no message: it is not pushed (a message
/// stored after it is, which shows the worker had its turn).
#[test]
fn read_receipts_are_not_pushed() {
    let r = Receiver::start();
    let url = r.url();
    let gw = Gateway::start(&push_args(&url, &["--push-delay-ms", "0"]));
    let (mut alice, _) = connect_app(&gw, "alice");
    let (mut carol, _) = connect_app(&gw, "carol");
    let ids = send_many(&mut alice, "carol", "c", 1);
    let m = next_op(&mut carol, "msg");
    ack(&mut carol, m["seq"].as_u64().unwrap());
    drop(alice);
    assert!(eventually(WITHIN, || gw
        .metric_sum("ringgate_connections_open")
        == 1));
    send_text(
        &mut carol,
        &json!({"op":"read","from":"alice","id":ids[0]}).to_string(),
    );
    assert_eq!(next_op(&mut carol, "read")["id"], ids[0].as_str());
    let later = send_many(&mut carol, "alice", "l", 1);
    assert!(eventually(WITHIN, || all_pushed(&r, &later)));
    assert_eq!(r.ids(), later, "only the message, not the receipt");
    assert_eq!(gw.metric_sum("ringgate_push_queued_total"), 1);
}
