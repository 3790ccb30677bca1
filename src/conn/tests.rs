//! Unit tests for the sans-IO [`Connection`] state machine.
//!
//! No sockets and no sleeping: every event carries `now` in milliseconds, bytes go in through
//! `on_bytes`, and the server's answer is read back from `conn.out`, which each test takes
//! (and thereby releases) after every step, exactly like the shard's I/O glue does after a
//! write. Server output is decoded by a small independent parser below (HTTP head, then
//! unmasked frames) so assertions are on concrete bytes, not on the code under test.

use super::*;
use crate::auth::Claims;
use crate::config::ConfigLayer;
use crate::config::DEFAULT_CLOSE_LINGER_MS as CLOSE_LINGER_MS;
use crate::limit::Limited;
use crate::ws::frame::tests::client_frame;

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

const HB: u64 = 1000;
const HANDSHAKE_MS: u64 = 500;
const MAX_FRAME: usize = 1024;
const ABUSE_LIMIT: u32 = 3;
const SECRET: &str = "conn-tests-secret-0123456789";
/// Accept time of most connections: far from 0 so a deadline computed from 0 would show.
const T0: u64 = 50_000;
const SHARD: usize = 3;
const SERIAL: u32 = 7;

/// RFC 6455 section 1.3 example key and its accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

const APP_PING: &[u8] = br#"{"op":"ping"}"#;
const APP_PONG: &[u8] = br#"{"op":"pong"}"#;

fn layer() -> ConfigLayer {
    ConfigLayer {
        heartbeat_ms: Some(HB),
        handshake_timeout_ms: Some(HANDSHAKE_MS),
        max_frame: Some(MAX_FRAME),
        abuse_limit: Some(ABUSE_LIMIT),
        echo_route: Some(true),
        node_id: Some("n1".into()),
        ..Default::default()
    }
}

/// What a shard owns and lends to its connections through [`Ctx`].
struct Env {
    cfg: Config,
    auth: Authenticator,
    metrics: ShardMetrics,
    host_open: AtomicUsize,
    ips: IpLimits,
    draining: bool,
    events: std::cell::RefCell<Vec<AppEvent>>,
}

impl Env {
    /// Dev mode (`?user=` trusted).
    fn new() -> Self {
        Self::with(layer(), None)
    }

    fn with(layer: ConfigLayer, secret: Option<&str>) -> Self {
        let cfg = layer.resolve().unwrap();
        Env {
            ips: cfg.ip_limits(),
            cfg,
            auth: Authenticator::new(secret),
            metrics: ShardMetrics::default(),
            host_open: AtomicUsize::new(0),
            draining: false,
            events: Default::default(),
        }
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            cfg: &self.cfg,
            auth: &self.auth,
            metrics: &self.metrics,
            host_open: &self.host_open,
            ips: &self.ips,
            draining: self.draining,
            shard: SHARD,
            events: &self.events,
        }
    }

    /// A socket was accepted: the glue creates the connection and counts the handshake.
    fn accept(&self, now: u64) -> Connection {
        let conn = Connection::new(now);
        self.metrics.handshakes_pending.inc();
        conn
    }

    fn host(&self) -> usize {
        self.host_open.load(Ordering::Relaxed)
    }

    /// Count one more connection the test does not drive, so a double decrement of a gauge
    /// (which saturates at 0) becomes visible.
    fn bystander_handshake(&self) {
        self.metrics.handshakes_pending.inc();
    }

    /// Same for an open connection the test does not drive.
    fn bystander_open(&self) {
        self.metrics.connections_open.inc();
    }
}

fn request(target: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
    .into_bytes()
}

/// A masked client frame with a fixed, non-trivial mask.
fn cf(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(fin, opcode, payload, [0x37, 0xfa, 0x21, 0x3d])
}

fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    cf(true, OP_CLOSE, &payload)
}

/// The glue hands the connection its scratch buffer, which the connection may unmask in place.
/// Feed bytes as the glue does; a session waiting for its home shard starts here (this shard
/// is the home shard in these tests).
fn feed(conn: &mut Connection, env: &Env, now: u64, bytes: &[u8]) {
    let mut scratch = bytes.to_vec();
    conn.on_bytes(now, &mut scratch, &env.ctx());
    if conn.awaiting_session() {
        // As the shard does with an empty inbox: welcome, then synced.
        conn.start_session(SERIAL, &env.ctx());
        conn.push_text(br#"{"op":"synced","count":0}"#, &env.ctx());
        conn.resume_input(now, &env.ctx());
    }
}

/// What the glue does once `out` is written: take the bytes and release the buffer.
fn flush(conn: &mut Connection) -> Vec<u8> {
    std::mem::take(&mut conn.out).into_vec()
}

/// Flush and decode: the output must be whole server frames and nothing else.
fn frames(conn: &mut Connection) -> Vec<Out> {
    parse_frames(&flush(conn))
}

/// Accept and upgrade at `now`; returns the open connection with its output flushed.
fn open(env: &Env, now: u64, target: &str) -> Connection {
    let mut conn = env.accept(now);
    feed(&mut conn, env, now, &request(target));
    let out = flush(&mut conn);
    let (resp, _) = split_http(&out);
    assert_eq!(resp.status, 101, "{}", resp.head);
    assert_eq!(conn.phase(), Phase::Open);
    conn
}

// ---------------------------------------------------------------------------------------------
// Decoding server output
// ---------------------------------------------------------------------------------------------

struct Http {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Split an HTTP response (head up to `\r\n\r\n`, then `content-length` body) off the front.
fn split_http(bytes: &[u8]) -> (Http, &[u8]) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(bytes)))
        + 4;
    let head = String::from_utf8(bytes[..end].to_vec()).expect("head is UTF-8");
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
    let status = head[9..12].parse().expect("status code");
    let mut resp = Http {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = resp
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap());
    assert!(bytes.len() >= end + len, "body shorter than content-length");
    resp.body = bytes[end..end + len].to_vec();
    (resp, &bytes[end + len..])
}

/// One server frame.
#[derive(Clone, PartialEq, Eq)]
struct Out {
    op: u8,
    payload: Vec<u8>,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Out(op={:#x}, {:?})",
            self.op,
            String::from_utf8_lossy(&self.payload)
        )
    }
}

impl Out {
    fn new(op: u8, payload: &[u8]) -> Self {
        Out {
            op,
            payload: payload.to_vec(),
        }
    }

    fn json(&self) -> serde_json::Value {
        assert_eq!(self.op, OP_TEXT, "{self:?}");
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| panic!("{self:?}: {e}"))
    }

    /// The status code of a close frame.
    fn close_code(&self) -> u16 {
        assert_eq!(self.op, OP_CLOSE, "expected a close frame, got {self:?}");
        assert!(self.payload.len() >= 2, "{self:?}");
        assert!(std::str::from_utf8(&self.payload[2..]).is_ok());
        u16::from_be_bytes([self.payload[0], self.payload[1]])
    }
}

/// Decode unmasked, final server frames; panics on anything truncated or malformed.
fn parse_frames(mut bytes: &[u8]) -> Vec<Out> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 2, "truncated frame header {bytes:?}");
        assert_eq!(bytes[0] & 0xf0, 0x80, "server frames are final without RSV");
        assert_eq!(bytes[1] & 0x80, 0, "server frames must not be masked");
        let (len, header) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert!(bytes.len() >= header + len, "truncated frame payload");
        out.push(Out::new(bytes[0] & 0x0f, &bytes[header..header + len]));
        bytes = &bytes[header + len..];
    }
    out
}

/// A small deterministic PRNG (xorshift64*), so failures replay from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn mask(&mut self) -> [u8; 4] {
        (self.next() as u32).to_ne_bytes()
    }
    /// Random bytes, at most `max` of them.
    fn bytes_upto(&mut self, max: usize) -> Vec<u8> {
        let n = self.range(0, max);
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Valid UTF-8 of at most `max` bytes, with multi-byte characters so that fragment
    /// boundaries land inside characters.
    fn text(&mut self, max: usize) -> Vec<u8> {
        const CHARS: [&str; 6] = ["a", "Z", " ", "é", "漢", "🙂"];
        let mut s = String::new();
        let target = self.range(0, max);
        loop {
            let c = CHARS[self.range(0, CHARS.len() - 1)];
            if s.len() + c.len() > target {
                return s.into_bytes();
            }
            s.push_str(c);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1-2. Upgrade
// ---------------------------------------------------------------------------------------------

#[test]
fn dev_mode_upgrade_sends_101_welcome_and_synced() {
    let env = Env::new();
    env.bystander_handshake();
    let mut conn = env.accept(T0);
    assert_eq!(conn.phase(), Phase::Handshaking);
    assert_eq!(env.metrics.handshakes_pending.get(), 2);

    feed(
        &mut conn,
        &env,
        T0 + 5,
        &request("/ws?user=alice&device=phone"),
    );
    let out = flush(&mut conn);
    let (resp, rest) = split_http(&out);
    assert_eq!(resp.status, 101);
    assert_eq!(resp.header("sec-websocket-accept"), Some(ACCEPT));
    assert_eq!(resp.header("upgrade"), Some("websocket"));
    assert_eq!(resp.header("connection"), Some("Upgrade"));

    let f = parse_frames(rest);
    assert_eq!(f.len(), 2, "{f:?}");
    let welcome = f[0].json();
    assert_eq!(
        welcome,
        serde_json::json!({
            "op": "welcome", "v": 1, "user": "alice", "conn": format!("n1-{SHARD}-{SERIAL}"),
            "heartbeat_ms": HB, "max_frame": MAX_FRAME,
        })
    );
    assert_eq!(f[1], Out::new(OP_TEXT, br#"{"op":"synced","count":0}"#));

    assert_eq!(conn.phase(), Phase::Open);
    assert_eq!(conn.route(), Some(Route::App));
    assert_eq!(conn.user(), Some("alice"));
    assert_eq!(conn.device(), Some("phone"));
    assert_eq!(env.host(), 1);
    assert_eq!(env.metrics.connections_open.get(), 1);
    assert_eq!(env.metrics.connections_accepted.get(), 1);
    assert_eq!(
        env.metrics.handshakes_pending.get(),
        1,
        "only the bystander"
    );
    assert_eq!(env.metrics.frames_out.get(), 2);
    // The heartbeat clock starts at the upgrade, not at accept.
    assert_eq!(conn.deadline(&env.cfg), T0 + 5 + HB);
}

#[test]
fn echo_route_upgrades_without_welcome() {
    let env = Env::new();
    let mut conn = env.accept(T0);
    feed(&mut conn, &env, T0, &request("/echo"));
    let out = flush(&mut conn);
    let (resp, rest) = split_http(&out);
    assert_eq!(resp.status, 101);
    assert!(rest.is_empty(), "no app frames on /echo: {rest:?}");
    assert_eq!(conn.route(), Some(Route::Echo));
    assert_eq!(conn.user(), None);
    assert_eq!(env.host(), 1);
}

#[test]
fn head_fed_byte_by_byte_upgrades() {
    let env = Env::new();
    let mut conn = env.accept(T0);
    let req = request("/ws?user=bob");
    for (i, b) in req[..req.len() - 1].iter().enumerate() {
        feed(&mut conn, &env, T0 + i as u64 % 100, &[*b]);
        assert_eq!(conn.phase(), Phase::Handshaking, "after byte {i}");
        assert!(conn.out.is_empty(), "answered early at byte {i}");
        assert!(conn.buffered_in() > i, "head bytes are kept");
    }
    feed(&mut conn, &env, T0 + 100, &req[req.len() - 1..]);
    let out = flush(&mut conn);
    let (resp, rest) = split_http(&out);
    assert_eq!(resp.status, 101);
    assert_eq!(resp.header("sec-websocket-accept"), Some(ACCEPT));
    assert_eq!(parse_frames(rest)[0].json()["user"], "bob");
    assert_eq!(conn.phase(), Phase::Open);
    assert_eq!(conn.buffered_in(), 0, "the head buffer is released");
}

#[test]
fn frames_pipelined_behind_the_head_are_processed() {
    let env = Env::new();
    let mut conn = env.accept(T0);
    let req = request("/ws?user=bob");
    let (head_start, head_end) = req.split_at(req.len() - 3);
    feed(&mut conn, &env, T0, head_start);
    // One read: the end of the head, a ws ping, an app ping, and half of another app ping.
    let tail_frame = client_frame(true, OP_TEXT, APP_PING, [9, 8, 7, 6]);
    let mut read = head_end.to_vec();
    read.extend(cf(true, OP_PING, b"hb"));
    read.extend(cf(true, OP_TEXT, APP_PING));
    read.extend(&tail_frame[..5]);
    feed(&mut conn, &env, T0 + 1, &read);

    let out = flush(&mut conn);
    let (resp, rest) = split_http(&out);
    assert_eq!(resp.status, 101);
    let f = parse_frames(rest);
    assert_eq!(f.len(), 4, "{f:?}");
    assert_eq!(f[0].json()["op"], "welcome");
    assert_eq!(f[1].json()["op"], "synced");
    assert_eq!(f[2], Out::new(OP_PONG, b"hb"));
    assert_eq!(f[3], Out::new(OP_TEXT, APP_PONG));
    assert!(conn.buffered_in() > 0, "half a frame is kept");

    feed(&mut conn, &env, T0 + 2, &tail_frame[5..]);
    assert_eq!(frames(&mut conn), vec![Out::new(OP_TEXT, APP_PONG)]);
    assert_eq!(conn.buffered_in(), 0);
    assert_eq!(conn.phase(), Phase::Open);
}

// ---------------------------------------------------------------------------------------------
// 3. Refusals
// ---------------------------------------------------------------------------------------------

/// Run a handshake that must be refused and check what every refusal shares.
fn expect_refusal(env: &Env, request: &[u8], reason: Refusal, status: u16) -> Http {
    env.bystander_handshake();
    let host_before = env.host();
    let open_before = env.metrics.connections_open.get();
    let mut conn = env.accept(T0);
    feed(&mut conn, env, T0 + 1, request);
    assert_eq!(
        conn.phase(),
        Phase::Done {
            until_ms: T0 + 1 + CLOSE_LINGER_MS
        }
    );
    assert!(!conn.finished(), "the response is not flushed yet");
    let out = flush(&mut conn);
    assert!(conn.finished());
    let (resp, rest) = split_http(&out);
    assert_eq!(resp.status, status, "{}", resp.head);
    assert!(rest.is_empty(), "nothing follows a refusal");
    assert_eq!(resp.header("connection"), Some("close"));
    for r in Refusal::ALL {
        let want = u64::from(r == reason);
        assert_eq!(env.metrics.refused[r.index()].get(), want, "refused[{r:?}]");
    }
    assert_eq!(
        env.metrics.handshakes_pending.get(),
        1,
        "only the bystander"
    );
    assert_eq!(env.metrics.connections_open.get(), open_before);
    assert_eq!(env.metrics.connections_accepted.get(), open_before);
    assert_eq!(env.host(), host_before);
    assert_eq!(conn.route(), None);

    // Later bytes are ignored, and closing the socket touches no counter.
    feed(&mut conn, env, T0 + 2, request);
    assert!(conn.out.is_empty());
    conn.on_closed(&env.ctx());
    assert_eq!(env.metrics.handshakes_pending.get(), 1);
    assert_eq!(env.host(), host_before);
    resp
}

#[test]
fn unknown_path_is_refused_with_404() {
    let env = Env::new();
    expect_refusal(&env, &request("/nope?user=a"), Refusal::NotFound, 404);
}

#[test]
fn plain_http_is_refused_with_426() {
    let env = Env::new();
    let resp = expect_refusal(
        &env,
        b"GET /ws?user=a HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Refusal::UpgradeRequired,
        426,
    );
    assert_eq!(resp.header("upgrade"), Some("websocket"));
    assert_eq!(resp.header("sec-websocket-version"), Some("13"));
}

#[test]
fn missing_user_is_refused_with_401() {
    let env = Env::new();
    let resp = expect_refusal(&env, &request("/ws"), Refusal::Unauthorized, 401);
    assert_eq!(resp.body, b"dev mode: pass ?user=<id>\n");
}

#[test]
fn host_at_capacity_is_refused_with_503_retry_after() {
    let env = Env::with(
        ConfigLayer {
            max_connections: Some(2),
            retry_after_s: Some(7),
            ..layer()
        },
        None,
    );
    env.host_open.store(1, Ordering::Relaxed);
    // One slot left: this one fits and takes it.
    let mut last = open(&env, T0, "/ws?user=a");
    assert_eq!(env.host(), 2);
    let resp = expect_refusal(&env, &request("/ws?user=b"), Refusal::Overloaded, 503);
    assert_eq!(resp.header("retry-after"), Some("7"));
    assert_eq!(env.host(), 2);
    // A slot frees up: the next client gets in.
    last.on_closed(&env.ctx());
    assert_eq!(env.host(), 1);
    open(&env, T0, "/ws?user=c");
    assert_eq!(env.host(), 2);
}

#[test]
fn draining_shard_refuses_with_503() {
    let mut env = Env::new();
    env.draining = true;
    let resp = expect_refusal(&env, &request("/ws?user=a"), Refusal::Draining, 503);
    assert_eq!(resp.header("retry-after"), Some("5"));
}

// ---------------------------------------------------------------------------------------------
// 4. Handshake timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn handshake_times_out_with_408_at_the_deadline() {
    let env = Env::new();
    env.bystander_handshake();
    let mut conn = env.accept(T0);
    assert_eq!(conn.deadline(&env.cfg), T0 + HANDSHAKE_MS);
    let req = request("/ws?user=a");
    // A slow client trickling its head does not extend the deadline.
    feed(&mut conn, &env, T0 + 100, &req[..10]);
    assert_eq!(conn.deadline(&env.cfg), T0 + HANDSHAKE_MS);

    conn.on_timer(T0 + HANDSHAKE_MS - 1, &env.ctx());
    assert!(conn.out.is_empty());
    assert_eq!(conn.phase(), Phase::Handshaking);
    assert_eq!(env.metrics.handshake_timeouts.get(), 0);

    conn.on_timer(T0 + HANDSHAKE_MS, &env.ctx());
    assert_eq!(
        conn.phase(),
        Phase::Done {
            until_ms: T0 + HANDSHAKE_MS + CLOSE_LINGER_MS
        }
    );
    let out = flush(&mut conn);
    let (resp, rest) = split_http(&out);
    assert_eq!(resp.status, 408);
    assert!(rest.is_empty());
    assert_eq!(env.metrics.handshake_timeouts.get(), 1);
    assert_eq!(
        env.metrics.handshakes_pending.get(),
        1,
        "only the bystander"
    );
    assert!(conn.finished());

    // The rest of the head arrives too late: ignored, nothing is upgraded.
    feed(&mut conn, &env, T0 + HANDSHAKE_MS + 1, &req[10..]);
    assert!(conn.out.is_empty());
    assert_eq!(env.host(), 0);
    conn.on_closed(&env.ctx());
    assert_eq!(env.metrics.handshakes_pending.get(), 1);
}

// ---------------------------------------------------------------------------------------------
// 5. Application protocol on /ws
// ---------------------------------------------------------------------------------------------

#[test]
fn app_ping_gets_pong() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    feed(&mut conn, &env, T0 + 1, &cf(true, OP_TEXT, APP_PING));
    assert_eq!(frames(&mut conn), vec![Out::new(OP_TEXT, APP_PONG)]);
    assert_eq!(conn.phase(), Phase::Open);
    assert_eq!(env.metrics.bad_frames.get(), 0);
}

#[test]
fn unknown_op_is_answered_with_its_cid() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    feed(
        &mut conn,
        &env,
        T0 + 1,
        &cf(true, OP_TEXT, br#"{"op":"nope","cid":"c1"}"#),
    );
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    let v = f[0].json();
    assert_eq!(v["op"], "error");
    assert_eq!(v["code"], "unknown_op");
    assert_eq!(v["cid"], "c1");
    assert_eq!(conn.phase(), Phase::Open);
    assert_eq!(env.metrics.bad_frames.get(), 1);
}

#[test]
fn room_ops_go_to_the_shard_as_events() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    feed(
        &mut conn,
        &env,
        T0 + 1,
        &cf(true, OP_TEXT, br#"{"op":"join","room":"r","since":3}"#),
    );
    feed(
        &mut conn,
        &env,
        T0 + 2,
        &cf(
            true,
            OP_TEXT,
            br#"{"op":"publish","room":"r","cid":7,"body":1}"#,
        ),
    );
    assert!(frames(&mut conn).is_empty(), "answered by the shard");
    assert_eq!(
        *env.events.borrow(),
        vec![
            AppEvent::Frame(ClientFrame::Join {
                room: "r".into(),
                since: Some(3)
            }),
            AppEvent::Frame(ClientFrame::Publish {
                room: "r".into(),
                cid: "7".into(),
                body: "1".into()
            })
        ]
    );
    assert_eq!(conn.phase(), Phase::Open);
}

#[test]
fn non_json_text_is_bad_request() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    feed(&mut conn, &env, T0 + 1, &cf(true, OP_TEXT, b"not json"));
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    let v = f[0].json();
    assert_eq!(v["op"], "error");
    assert_eq!(v["code"], "bad_request");
    assert!(v.get("cid").is_none(), "{v}");
    assert_eq!(conn.phase(), Phase::Open);
}

#[test]
fn binary_frame_on_ws_is_bad_request() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    feed(&mut conn, &env, T0 + 1, &cf(true, OP_BINARY, APP_PING));
    let v = frames(&mut conn)[0].json();
    assert_eq!(v["code"], "bad_request");
    assert_eq!(conn.phase(), Phase::Open);
    assert_eq!(env.metrics.bad_frames.get(), 1);
}

#[test]
fn too_many_bad_frames_close_with_1008() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    for i in 1..=u64::from(ABUSE_LIMIT) {
        feed(&mut conn, &env, T0 + i, &cf(true, OP_TEXT, b"not json"));
        let f = frames(&mut conn);
        assert_eq!(f.len(), 1, "bad frame {i}: {f:?}");
        assert_eq!(f[0].json()["code"], "bad_request");
        assert_eq!(conn.phase(), Phase::Open, "bad frame {i} is tolerated");
    }
    // Good frames do not reset the count.
    feed(&mut conn, &env, T0 + 10, &cf(true, OP_TEXT, APP_PING));
    assert_eq!(frames(&mut conn), vec![Out::new(OP_TEXT, APP_PONG)]);

    feed(&mut conn, &env, T0 + 11, &cf(true, OP_TEXT, b"not json"));
    let f = frames(&mut conn);
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(f[0].json()["code"], "bad_request");
    assert_eq!(f[1].close_code(), 1008);
    assert_eq!(
        conn.phase(),
        Phase::Closing {
            until_ms: T0 + 11 + CLOSE_LINGER_MS
        }
    );
    assert_eq!(env.metrics.abuse_closes.get(), 1);
    assert_eq!(env.metrics.bad_frames.get(), u64::from(ABUSE_LIMIT) + 1);
}

// ---------------------------------------------------------------------------------------------
// 6. WebSocket control frames
// ---------------------------------------------------------------------------------------------

#[test]
fn ws_ping_gets_pong_with_the_same_payload() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    let payload: Vec<u8> = (0..125).map(|i| (i * 7) as u8).collect();
    feed(&mut conn, &env, T0 + 1, &cf(true, OP_PING, &payload));
    assert_eq!(frames(&mut conn), vec![Out::new(OP_PONG, &payload)]);
    feed(&mut conn, &env, T0 + 2, &cf(true, OP_PING, b""));
    assert_eq!(frames(&mut conn), vec![Out::new(OP_PONG, b"")]);
    assert_eq!(conn.phase(), Phase::Open);
}

#[test]
fn client_pong_only_counts_as_activity() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    feed(&mut conn, &env, T0 + 600, &cf(true, OP_PONG, b"whatever"));
    assert!(conn.out.is_empty(), "a pong is not answered");
    assert_eq!(conn.phase(), Phase::Open);
    assert_eq!(conn.deadline(&env.cfg), T0 + 600 + HB);
    // The old wheel entry fires early: nothing happens.
    conn.on_timer(T0 + HB, &env.ctx());
    assert!(conn.out.is_empty());
    assert_eq!(env.metrics.pings_sent.get(), 0);
}

// ---------------------------------------------------------------------------------------------
// 7. Size limits
// ---------------------------------------------------------------------------------------------

#[test]
fn frame_at_max_frame_is_fine_and_over_it_closes_1009() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    let exact = vec![b'x'; MAX_FRAME];
    feed(&mut conn, &env, T0 + 1, &cf(true, OP_BINARY, &exact));
    assert_eq!(frames(&mut conn), vec![Out::new(OP_BINARY, &exact)]);

    // Only the header of an oversize frame: refused before any payload is buffered.
    let big = cf(true, OP_BINARY, &vec![b'x'; MAX_FRAME + 1]);
    feed(&mut conn, &env, T0 + 2, &big[..8]);
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].close_code(), 1009);
    assert_eq!(
        conn.phase(),
        Phase::Closing {
            until_ms: T0 + 2 + CLOSE_LINGER_MS
        }
    );
    assert_eq!(conn.buffered_in(), 0);
    assert_eq!(env.metrics.oversize_closes.get(), 1);
    assert_eq!(env.metrics.protocol_closes.get(), 0);
}

#[test]
fn fragmented_message_over_max_frame_closes_1009() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    // Exactly max_frame in three fragments is still fine.
    let mut read = cf(false, OP_TEXT, &[b'a'; 600]);
    read.extend(cf(false, OP_CONT, &[b'b'; 400]));
    read.extend(cf(true, OP_CONT, &[b'c'; MAX_FRAME - 1000]));
    feed(&mut conn, &env, T0 + 1, &read);
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].payload.len(), MAX_FRAME);

    // One byte more, although every fragment is small.
    let mut read = cf(false, OP_TEXT, &[b'a'; 600]);
    read.extend(cf(false, OP_CONT, &[b'b'; 400]));
    feed(&mut conn, &env, T0 + 2, &read);
    assert!(conn.out.is_empty());
    feed(
        &mut conn,
        &env,
        T0 + 3,
        &cf(true, OP_CONT, &[b'c'; MAX_FRAME - 999]),
    );
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].close_code(), 1009);
    assert!(matches!(conn.phase(), Phase::Closing { .. }));
    assert_eq!(env.metrics.oversize_closes.get(), 1);
    assert_eq!(conn.buffered_in(), 0, "the partial message is dropped");
}

// ---------------------------------------------------------------------------------------------
// 8. Fragmentation
// ---------------------------------------------------------------------------------------------

/// Three text fragments with a ping between the first two, and the expected answers.
fn fragmented_stream(parts: [&[u8]; 3]) -> Vec<u8> {
    let mut s = client_frame(false, OP_TEXT, parts[0], [1, 2, 3, 4]);
    s.extend(client_frame(true, OP_PING, b"mid", [5, 6, 7, 8]));
    s.extend(client_frame(
        false,
        OP_CONT,
        parts[1],
        [0xa0, 0xb1, 0xc2, 0xd3],
    ));
    s.extend(client_frame(true, OP_CONT, parts[2], [0xff, 0, 0xff, 0]));
    s
}

#[test]
fn fragmented_echo_reassembles_at_every_chunk_size() {
    let env = Env::new();
    let parts: [&[u8]; 3] = [b"Hel", "lo, fragmé".as_bytes(), b"nted world"];
    let whole = parts.concat();
    let stream = fragmented_stream(parts);
    // Every chunk size (1 = byte by byte) and every single cut cover all awkward boundaries:
    // inside headers, inside masks, inside payloads and right between frames.
    let mut cuts: Vec<Vec<usize>> = (1..=stream.len())
        .map(|size| (size..stream.len()).step_by(size).collect())
        .collect();
    cuts.extend((1..stream.len()).map(|at| vec![at]));
    for cut in cuts {
        let mut conn = open(&env, T0, "/echo");
        let mut out = Vec::new();
        let mut start = 0;
        for end in cut.iter().copied().chain([stream.len()]) {
            feed(&mut conn, &env, T0 + 1, &stream[start..end]);
            out.extend(frames(&mut conn));
            start = end;
        }
        assert_eq!(
            out,
            vec![Out::new(OP_PONG, b"mid"), Out::new(OP_TEXT, &whole)],
            "cuts at {cut:?}"
        );
        assert_eq!(conn.phase(), Phase::Open, "cuts at {cut:?}");
        assert_eq!(conn.buffered_in(), 0, "cuts at {cut:?}");
    }
}

#[test]
fn fragmented_binary_echo_keeps_its_opcode() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    let mut read = cf(false, OP_BINARY, &[0xff, 0x00]);
    read.extend(cf(true, OP_CONT, &[0xfe]));
    feed(&mut conn, &env, T0 + 1, &read);
    assert_eq!(
        frames(&mut conn),
        vec![Out::new(OP_BINARY, &[0xff, 0x00, 0xfe])]
    );
}

#[test]
fn fragmented_app_ping_gets_pong() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    let stream = fragmented_stream([br#"{"op""#, br#":"pi"#, br#"ng"}"#]);
    for (i, chunk) in stream.chunks(5).enumerate() {
        feed(&mut conn, &env, T0 + i as u64, chunk);
    }
    assert_eq!(
        frames(&mut conn),
        vec![Out::new(OP_PONG, b"mid"), Out::new(OP_TEXT, APP_PONG)]
    );
    assert_eq!(conn.phase(), Phase::Open);
    assert_eq!(env.metrics.bad_frames.get(), 0);
}

#[test]
fn utf8_character_split_across_fragments_is_valid() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    let e_acute = "é".as_bytes();
    let mut read = cf(false, OP_TEXT, &e_acute[..1]);
    read.extend(cf(true, OP_CONT, &e_acute[1..]));
    feed(&mut conn, &env, T0 + 1, &read);
    assert_eq!(frames(&mut conn), vec![Out::new(OP_TEXT, e_acute)]);
    assert_eq!(conn.phase(), Phase::Open);
}

// ---------------------------------------------------------------------------------------------
// 9. Protocol violations
// ---------------------------------------------------------------------------------------------

/// Send `bytes` on an open /echo connection; expect exactly one close frame with `code`.
fn expect_violation(bytes: &[u8], code: u16) {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    feed(&mut conn, &env, T0 + 1, bytes);
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].close_code(), code);
    assert_eq!(
        conn.phase(),
        Phase::Closing {
            until_ms: T0 + 1 + CLOSE_LINGER_MS
        }
    );
    assert_eq!(env.metrics.protocol_closes.get(), 1);
    assert_eq!(env.metrics.oversize_closes.get(), 0);
    assert_eq!(conn.buffered_in(), 0);
}

#[test]
fn unmasked_client_frame_closes_1002() {
    expect_violation(&[0x81, 0x02, b'h', b'i'], 1002);
}

#[test]
fn continuation_without_start_closes_1002() {
    expect_violation(&cf(true, OP_CONT, b"orphan"), 1002);
}

#[test]
fn new_message_inside_a_fragmented_one_closes_1002() {
    let mut bytes = cf(false, OP_TEXT, b"first half");
    bytes.extend(cf(true, OP_TEXT, b"another message"));
    expect_violation(&bytes, 1002);
}

#[test]
fn invalid_utf8_text_closes_1007() {
    expect_violation(&cf(true, OP_TEXT, &[b'o', b'k', 0xff, 0xfe]), 1007);
}

#[test]
fn invalid_utf8_across_fragments_closes_1007() {
    // A lone lead byte at the very end of the message.
    let mut bytes = cf(false, OP_TEXT, b"abc");
    bytes.extend(cf(true, OP_CONT, &[0xc3]));
    expect_violation(&bytes, 1007);
}

#[test]
fn invalid_utf8_in_a_first_fragment_fails_before_the_message_ends() {
    // Fail fast (Autobahn 6.4.x): the message never finishes, yet the close is 1007 now.
    expect_violation(&cf(false, OP_TEXT, &[b'o', b'k', 0xff]), 1007);
    let mut bytes = cf(false, OP_TEXT, b"fine so far ");
    bytes.extend(cf(false, OP_CONT, &[0xed, 0xa0, 0x80])); // a UTF-16 surrogate: never valid
    expect_violation(&bytes, 1007);
}

#[test]
fn reserved_opcode_closes_1002() {
    expect_violation(&cf(true, 0x3, b"x"), 1002);
    expect_violation(&cf(true, 0xB, b"x"), 1002);
}

#[test]
fn rsv_bit_and_fragmented_ping_close_1002() {
    let mut rsv = cf(true, OP_TEXT, b"x");
    rsv[0] |= 0x40;
    expect_violation(&rsv, 1002);
    expect_violation(&cf(false, OP_PING, b"x"), 1002);
    expect_violation(&cf(true, OP_PING, &[0; 126]), 1002);
}

/// The connection's reaction to a violation must not depend on where reads were cut. Here the
/// client's close frame right behind an invalid frame is split across reads; the close frame
/// must still be understood (phase Done) whichever way the invalid frame itself arrived.
fn close_after_violation(split_bad_frame: bool) -> Phase {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    let bad = cf(true, OP_TEXT, &[0xff, 0xfe]);
    // With this mask, the close frame's tail read from the wrong offset looks like the start of
    // an incomplete masked frame, so mis-framing shows as a connection stuck in Closing.
    let close = client_frame(
        true,
        OP_CLOSE,
        &1000u16.to_be_bytes(),
        [0x10, 0x81, 0x85, 0x20],
    );
    let mut second = Vec::new();
    if split_bad_frame {
        feed(&mut conn, &env, T0 + 1, &bad[..3]);
        second.extend(&bad[3..]);
    } else {
        second.extend(&bad);
    }
    second.extend(&close[..3]);
    feed(&mut conn, &env, T0 + 2, &second);
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].close_code(), 1007);
    assert!(
        conn.buffered_in() >= 3,
        "the first 3 bytes of the close frame must be kept, buffered_in = {}",
        conn.buffered_in()
    );
    feed(&mut conn, &env, T0 + 3, &close[3..]);
    assert!(conn.out.is_empty(), "our close was already sent");
    conn.phase()
}

#[test]
fn close_frame_split_after_a_violation_is_understood() {
    assert_eq!(
        close_after_violation(false),
        Phase::Done {
            until_ms: T0 + 3 + CLOSE_LINGER_MS
        }
    );
}

#[test]
fn close_frame_split_after_a_violation_in_a_split_frame_is_understood() {
    assert_eq!(
        close_after_violation(true),
        Phase::Done {
            until_ms: T0 + 3 + CLOSE_LINGER_MS
        }
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Close handshake
// ---------------------------------------------------------------------------------------------

#[test]
fn client_close_is_echoed_and_finishes() {
    let env = Env::new();
    env.bystander_open();
    let mut conn = open(&env, T0, "/ws?user=a");
    feed(&mut conn, &env, T0 + 1, &close_frame(1000, "bye"));
    assert_eq!(
        conn.phase(),
        Phase::Done {
            until_ms: T0 + 1 + CLOSE_LINGER_MS
        }
    );
    assert!(!conn.finished(), "our close frame is not flushed yet");
    // The code is echoed, without a reason.
    assert_eq!(flush(&mut conn), [0x88, 0x02, 0x03, 0xE8]);
    assert!(conn.finished());
    // Nothing is read any more.
    feed(&mut conn, &env, T0 + 2, &cf(true, OP_PING, b"late"));
    assert!(conn.out.is_empty());
    conn.on_closed(&env.ctx());
    assert_eq!(env.host(), 0);
    assert_eq!(env.metrics.connections_open.get(), 1, "only the bystander");
}

#[test]
fn client_close_with_application_code_is_echoed() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    feed(&mut conn, &env, T0 + 1, &close_frame(4321, ""));
    let f = frames(&mut conn);
    assert_eq!(f, vec![Out::new(OP_CLOSE, &4321u16.to_be_bytes())]);
    assert!(matches!(conn.phase(), Phase::Done { .. }));
}

#[test]
fn empty_client_close_is_answered_1000() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    feed(&mut conn, &env, T0 + 1, &cf(true, OP_CLOSE, b""));
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].close_code(), 1000);
    assert!(matches!(conn.phase(), Phase::Done { .. }));
}

#[test]
fn client_close_with_invalid_code_is_answered_1002() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    feed(&mut conn, &env, T0 + 1, &close_frame(1005, ""));
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].close_code(), 1002);
    assert_eq!(
        conn.phase(),
        Phase::Closing {
            until_ms: T0 + 1 + CLOSE_LINGER_MS
        }
    );
    assert_eq!(env.metrics.protocol_closes.get(), 1);
}

#[test]
fn one_byte_close_payload_is_answered_1002() {
    expect_violation(&cf(true, OP_CLOSE, &[0x03]), 1002);
}

// ---------------------------------------------------------------------------------------------
// 11. Heartbeats
// ---------------------------------------------------------------------------------------------

#[test]
fn silence_gets_two_pings_then_close_1001() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    assert_eq!(conn.deadline(&env.cfg), T0 + HB);

    conn.on_timer(T0 + HB - 1, &env.ctx());
    assert!(conn.out.is_empty(), "early timer is a no-op");
    assert_eq!(env.metrics.pings_sent.get(), 0);

    conn.on_timer(T0 + HB, &env.ctx());
    assert_eq!(frames(&mut conn), vec![Out::new(OP_PING, b"")]);
    assert_eq!(env.metrics.pings_sent.get(), 1);
    assert_eq!(conn.phase(), Phase::Open);
    assert_eq!(conn.deadline(&env.cfg), T0 + 2 * HB);

    conn.on_timer(T0 + 2 * HB - 1, &env.ctx());
    assert!(conn.out.is_empty());
    conn.on_timer(T0 + 2 * HB, &env.ctx());
    assert_eq!(frames(&mut conn), vec![Out::new(OP_PING, b"")]);
    assert_eq!(env.metrics.pings_sent.get(), 2);
    assert_eq!(conn.deadline(&env.cfg), T0 + 3 * HB);

    conn.on_timer(T0 + 3 * HB - 1, &env.ctx());
    assert!(conn.out.is_empty());
    conn.on_timer(T0 + 3 * HB, &env.ctx());
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].close_code(), 1001);
    assert_eq!(
        conn.phase(),
        Phase::Closing {
            until_ms: T0 + 3 * HB + CLOSE_LINGER_MS
        }
    );
    assert_eq!(env.metrics.heartbeat_closes.get(), 1);
    assert_eq!(env.metrics.pings_sent.get(), 2);
}

#[test]
fn late_timer_after_long_silence_closes_at_once() {
    // The wheel may fire late; 3 x heartbeat of silence closes without pinging first.
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    conn.on_timer(T0 + 5 * HB, &env.ctx());
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].close_code(), 1001);
    assert_eq!(env.metrics.pings_sent.get(), 0);
}

#[test]
fn late_ping_does_not_postpone_the_silence_close() {
    // A ping sent late (busy shard) must not push the close past 3 x heartbeat of silence.
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    conn.on_timer(T0 + 2 * HB + HB / 2, &env.ctx());
    assert_eq!(frames(&mut conn), vec![Out::new(OP_PING, b"")]);
    assert_eq!(conn.deadline(&env.cfg), T0 + 3 * HB);
    conn.on_timer(T0 + 3 * HB, &env.ctx());
    assert_eq!(frames(&mut conn)[0].close_code(), 1001);
    assert!(matches!(conn.phase(), Phase::Closing { .. }));
}

#[test]
fn activity_pushes_the_heartbeat_deadline() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    // Half a frame is activity too.
    let ping = cf(true, OP_PING, b"x");
    feed(&mut conn, &env, T0 + 700, &ping[..3]);
    assert_eq!(conn.deadline(&env.cfg), T0 + 700 + HB);
    conn.on_timer(T0 + HB, &env.ctx());
    assert!(conn.out.is_empty(), "stale wheel entry fires early: no-op");
    feed(&mut conn, &env, T0 + 800, &ping[3..]);
    assert_eq!(frames(&mut conn), vec![Out::new(OP_PONG, b"x")]);
    assert_eq!(conn.deadline(&env.cfg), T0 + 800 + HB);

    // Server ping, then the client answers a bit later: the next ping is one period later.
    let t1 = T0 + 800 + HB;
    conn.on_timer(t1, &env.ctx());
    assert_eq!(frames(&mut conn), vec![Out::new(OP_PING, b"")]);
    feed(&mut conn, &env, t1 + 10, &cf(true, OP_PONG, b""));
    assert!(conn.out.is_empty());
    assert_eq!(conn.deadline(&env.cfg), t1 + 10 + HB);

    // Silence from t1 + 10: two pings, then close at 3 x heartbeat after the last byte.
    let t2 = t1 + 10;
    conn.on_timer(t2 + HB, &env.ctx());
    conn.on_timer(t2 + 2 * HB, &env.ctx());
    assert_eq!(
        frames(&mut conn),
        vec![Out::new(OP_PING, b""), Out::new(OP_PING, b"")]
    );
    assert_eq!(conn.phase(), Phase::Open);
    conn.on_timer(t2 + 3 * HB, &env.ctx());
    assert_eq!(frames(&mut conn)[0].close_code(), 1001);
    assert!(matches!(conn.phase(), Phase::Closing { .. }));
    assert_eq!(env.metrics.pings_sent.get(), 3);
}

// ---------------------------------------------------------------------------------------------
// 12. Closing linger
// ---------------------------------------------------------------------------------------------

/// An open /ws connection that just sent close 1007 at `T0 + 1`.
fn closing_conn(env: &Env) -> Connection {
    let mut conn = open(env, T0, "/ws?user=a");
    feed(&mut conn, env, T0 + 1, &cf(true, OP_TEXT, &[0xff]));
    assert_eq!(frames(&mut conn)[0].close_code(), 1007);
    assert_eq!(
        conn.phase(),
        Phase::Closing {
            until_ms: T0 + 1 + CLOSE_LINGER_MS
        }
    );
    conn
}

#[test]
fn closing_ignores_data_until_the_clients_close() {
    let env = Env::new();
    let mut conn = closing_conn(&env);
    let frames_in = env.metrics.frames_in.get();
    let mut read = cf(true, OP_TEXT, APP_PING);
    read.extend(cf(true, OP_TEXT, b"not json"));
    read.extend(cf(false, OP_TEXT, b"frag"));
    read.extend(cf(true, OP_CONT, b"ment"));
    read.extend(cf(true, OP_PING, b"p"));
    read.extend(cf(true, OP_BINARY, b"b"));
    feed(&mut conn, &env, T0 + 2, &read);
    assert!(conn.out.is_empty(), "nothing is answered while closing");
    assert_eq!(
        env.metrics.frames_in.get(),
        frames_in + 6,
        "frames are still read"
    );
    assert_eq!(env.metrics.bad_frames.get(), 0);
    assert!(matches!(conn.phase(), Phase::Closing { .. }));

    feed(&mut conn, &env, T0 + 3, &close_frame(1000, ""));
    assert!(conn.out.is_empty(), "our close frame was already sent");
    assert_eq!(
        conn.phase(),
        Phase::Done {
            until_ms: T0 + 3 + CLOSE_LINGER_MS
        }
    );
    assert!(conn.finished());
}

#[test]
fn closing_gives_up_at_the_linger_deadline() {
    let env = Env::new();
    let mut conn = closing_conn(&env);
    let until = T0 + 1 + CLOSE_LINGER_MS;
    assert_eq!(conn.deadline(&env.cfg), until);
    // The peer stopped reading: output piles up and is never flushed.
    conn.out.buf().extend_from_slice(b"unsent bytes");
    conn.on_timer(until - 1, &env.ctx());
    assert_eq!(&conn.out[..], b"unsent bytes");
    assert!(matches!(conn.phase(), Phase::Closing { .. }));

    conn.on_timer(until, &env.ctx());
    assert_eq!(conn.phase(), Phase::Done { until_ms: until });
    assert!(conn.out.is_empty());
    assert_eq!(conn.out.capacity(), 0, "the output buffer is released");
    assert!(conn.finished());
}

#[test]
fn done_gives_up_at_its_deadline_too() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    feed(&mut conn, &env, T0 + 1, &close_frame(1000, ""));
    let until = T0 + 1 + CLOSE_LINGER_MS;
    assert_eq!(conn.deadline(&env.cfg), until);
    assert!(!conn.out.is_empty(), "the echoed close is not written yet");
    conn.on_timer(until, &env.ctx());
    assert!(conn.finished());
    assert_eq!(conn.out.capacity(), 0);
}

// ---------------------------------------------------------------------------------------------
// 13. Shutdown and socket close
// ---------------------------------------------------------------------------------------------

#[test]
fn shutdown_sends_1012_to_open_connections() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    conn.on_shutdown(T0 + 5, &env.ctx());
    let f = frames(&mut conn);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].close_code(), 1012);
    assert_eq!(
        conn.phase(),
        Phase::Closing {
            until_ms: T0 + 5 + CLOSE_LINGER_MS
        }
    );
    // A second shutdown signal does not send a second close.
    conn.on_shutdown(T0 + 6, &env.ctx());
    assert!(conn.out.is_empty());
}

#[test]
fn shutdown_refuses_handshakes_in_flight_with_503() {
    let env = Env::new();
    let mut conn = env.accept(T0);
    conn.on_bytes(
        T0,
        &mut b"GET /ws?user=a HTTP/1.1\r\nHost: x\r\n".to_vec(),
        &env.ctx(),
    );
    let pending = env.metrics.handshakes_pending.get();
    conn.on_shutdown(T0 + 1, &env.ctx());
    let text = String::from_utf8_lossy(&conn.out).to_string();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("retry-after: "), "{text}");
    assert!(matches!(conn.phase(), Phase::Done { .. }));
    assert_eq!(env.metrics.handshakes_pending.get(), pending - 1);
    assert_eq!(env.metrics.refused[Refusal::Draining.index()].get(), 1);
    assert_eq!(conn.buffered_in(), 0, "the half-read head is released");
}

#[test]
fn on_closed_releases_the_host_slot_exactly_once() {
    let env = Env::new();
    env.host_open.store(4, Ordering::Relaxed);
    env.bystander_open();
    let mut conn = open(&env, T0, "/ws?user=a");
    assert_eq!(env.host(), 5);
    assert_eq!(env.metrics.connections_open.get(), 2);

    conn.on_closed(&env.ctx());
    assert_eq!(env.host(), 4);
    assert_eq!(env.metrics.connections_open.get(), 1);
    assert!(conn.finished());
    assert_eq!(conn.route(), None);

    conn.on_closed(&env.ctx());
    assert_eq!(env.host(), 4, "second on_closed must not release again");
    assert_eq!(env.metrics.connections_open.get(), 1);
}

#[test]
fn on_closed_during_handshake_ends_the_pending_handshake_once() {
    let env = Env::new();
    env.bystander_handshake();
    let mut conn = env.accept(T0);
    feed(&mut conn, &env, T0, b"GET /ws HT");
    conn.on_closed(&env.ctx());
    conn.on_closed(&env.ctx());
    assert_eq!(
        env.metrics.handshakes_pending.get(),
        1,
        "only the bystander"
    );
    assert_eq!(env.host(), 0);
    assert_eq!(conn.buffered_in(), 0);
}

// ---------------------------------------------------------------------------------------------
// 14. Memory
// ---------------------------------------------------------------------------------------------

#[test]
fn idle_connection_holds_no_buffers() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    assert_eq!(conn.buffered_in(), 0);
    assert_eq!(conn.out.capacity(), 0);
    // Work that leaves nothing behind allocates nothing.
    feed(&mut conn, &env, T0 + 1, &cf(true, OP_PONG, b""));
    conn.on_timer(T0 + 2, &env.ctx());
    assert_eq!(conn.buffered_in(), 0);
    assert_eq!(conn.out.capacity(), 0);

    feed(&mut conn, &env, T0 + 3, &cf(true, OP_TEXT, APP_PING));
    assert!(conn.out.capacity() > 0);
    conn.out = OutBuf::default();
    assert_eq!(conn.out.capacity(), 0);
    assert_eq!(conn.buffered_in(), 0);
}

#[test]
fn split_frame_is_buffered_only_until_complete() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    let frame = cf(true, OP_BINARY, &[7; 300]);
    feed(&mut conn, &env, T0 + 1, &frame[..100]);
    assert!(conn.buffered_in() >= 100, "{}", conn.buffered_in());
    feed(&mut conn, &env, T0 + 2, &frame[100..200]);
    assert!(conn.buffered_in() >= 200, "{}", conn.buffered_in());
    assert!(conn.out.is_empty());
    feed(&mut conn, &env, T0 + 3, &frame[200..]);
    assert_eq!(frames(&mut conn), vec![Out::new(OP_BINARY, &[7; 300])]);
    assert_eq!(conn.buffered_in(), 0);
}

#[test]
fn fragmented_message_is_buffered_only_until_complete() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/echo");
    feed(&mut conn, &env, T0 + 1, &cf(false, OP_TEXT, &[b'a'; 200]));
    assert!(conn.buffered_in() >= 200, "{}", conn.buffered_in());
    feed(&mut conn, &env, T0 + 2, &cf(true, OP_CONT, b"b"));
    assert_eq!(frames(&mut conn)[0].payload.len(), 201);
    assert_eq!(conn.buffered_in(), 0);
}

#[test]
fn connection_struct_is_small() {
    let size = std::mem::size_of::<Connection>();
    eprintln!("size_of::<Connection>() = {size} bytes");
    assert!(size <= 80, "Connection grew to {size} bytes");
}

// ---------------------------------------------------------------------------------------------
// 15. JWT
// ---------------------------------------------------------------------------------------------

fn jwt_env() -> Env {
    Env::with(layer(), Some(SECRET))
}

#[test]
fn valid_token_upgrades_as_its_subject() {
    let env = jwt_env();
    let token = crate::auth::mint(SECRET, "carol", None, 60);
    let mut conn = env.accept(T0);
    // `?user=` is ignored once a secret is configured.
    feed(
        &mut conn,
        &env,
        T0,
        &request(&format!("/ws?user=mallory&token={token}")),
    );
    let out = flush(&mut conn);
    let (resp, rest) = split_http(&out);
    assert_eq!(resp.status, 101);
    assert_eq!(parse_frames(rest)[0].json()["user"], "carol");
    assert_eq!(conn.user(), Some("carol"));
    assert_eq!(env.host(), 1);
}

#[test]
fn expired_token_is_refused_with_401() {
    let env = jwt_env();
    let claims = Claims {
        sub: "carol".into(),
        exp: crate::auth::now_unix() - 3600,
        rooms: None,
    };
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let resp = expect_refusal(
        &env,
        &request(&format!("/ws?token={token}")),
        Refusal::Unauthorized,
        401,
    );
    assert_eq!(resp.body, b"token expired\n");
}

#[test]
fn token_signed_with_another_secret_is_refused_with_401() {
    let env = jwt_env();
    let token = crate::auth::mint("some-other-secret-98765", "carol", None, 60);
    let resp = expect_refusal(
        &env,
        &request(&format!("/ws?token={token}")),
        Refusal::Unauthorized,
        401,
    );
    assert!(resp.body.starts_with(b"invalid token"), "{:?}", resp.body);
}

#[test]
fn dev_user_without_token_is_refused_when_a_secret_is_set() {
    let env = jwt_env();
    let resp = expect_refusal(&env, &request("/ws?user=carol"), Refusal::Unauthorized, 401);
    assert_eq!(resp.body, b"missing token\n");
}

// ---------------------------------------------------------------------------------------------
// 15b. Authentication in the first frame (`?auth=frame`, browsers) and in-band refusals
// ---------------------------------------------------------------------------------------------

fn auth_frame(json: &str) -> Vec<u8> {
    cf(true, OP_TEXT, json.as_bytes())
}

/// Upgrade with `?auth=frame`: 101 and nothing else (no welcome before the auth frame).
fn open_awaiting_auth(env: &Env, now: u64, target: &str) -> Connection {
    let mut conn = env.accept(now);
    feed(&mut conn, env, now, &request(target));
    let out = flush(&mut conn);
    let (resp, rest) = split_http(&out);
    assert_eq!(resp.status, 101, "{}", resp.head);
    assert!(rest.is_empty(), "nothing before the auth frame: {rest:?}");
    assert_eq!(conn.user(), None);
    assert!(!conn.awaiting_session());
    conn
}

/// The refusal an `?auth=frame` client reads: an `error` frame, then a close with `close`.
fn expect_in_band(frames: &[Out], close: u16, code: &str) -> serde_json::Value {
    assert_eq!(frames.len(), 2, "{frames:?}");
    let err = frames[0].json();
    assert_eq!(err["op"], "error", "{err}");
    assert_eq!(err["code"], code, "{err}");
    assert_eq!(frames[1].close_code(), close);
    err
}

#[test]
fn auth_frame_starts_the_session_and_frames_behind_it_wait_for_it() {
    let env = jwt_env();
    let mut conn = open_awaiting_auth(&env, T0, "/ws?auth=frame&device=tab");
    assert_eq!(env.metrics.connections_open.get(), 1);
    let token = crate::auth::mint(SECRET, "carol", Some(vec!["lobby".into()]), 60);
    // The auth frame and a ping in one write: the ping is answered after `welcome`.
    let mut bytes = auth_frame(&format!(r#"{{"op":"auth","token":"{token}"}}"#));
    bytes.extend(cf(true, OP_TEXT, APP_PING));
    feed(&mut conn, &env, T0 + 10, &bytes);
    let f = frames(&mut conn);
    assert_eq!(f.len(), 3, "{f:?}");
    assert_eq!(f[0].json()["op"], "welcome");
    assert_eq!(f[0].json()["user"], "carol");
    assert_eq!(f[1].json()["op"], "synced");
    assert_eq!(f[2], Out::new(OP_TEXT, APP_PONG));
    assert_eq!(conn.user(), Some("carol"));
    assert_eq!(conn.device(), Some("tab"));
    assert_eq!(conn.rooms(), Some(&["lobby".into()][..]));
    // Authenticated: the heartbeat applies from now on, no auth deadline.
    assert_eq!(conn.deadline(&env.cfg), T0 + 10 + HB);
    for r in Refusal::ALL {
        assert_eq!(env.metrics.refused[r.index()].get(), 0, "{r:?}");
    }
}

#[test]
fn dev_mode_auth_frame_takes_a_user() {
    let env = Env::new();
    let mut conn = open_awaiting_auth(&env, T0, "/ws?auth=frame");
    feed(
        &mut conn,
        &env,
        T0 + 1,
        &auth_frame(r#"{"op":"auth","user":"dora"}"#),
    );
    let f = frames(&mut conn);
    assert_eq!(f[0].json()["user"], "dora", "{f:?}");
}

#[test]
fn bad_auth_frames_are_refused_in_band_with_4001() {
    let expired = {
        let claims = Claims {
            sub: "carol".into(),
            exp: crate::auth::now_unix() - 3600,
            rooms: None,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let cases: [(Vec<u8>, &str); 5] = [
        (
            auth_frame(&format!(r#"{{"op":"auth","token":"{expired}"}}"#)),
            "token expired",
        ),
        (auth_frame(r#"{"op":"auth"}"#), "missing token"),
        (
            auth_frame(r#"{"op":"auth","token":"x.y.z"}"#),
            "invalid token",
        ),
        (cf(true, OP_TEXT, APP_PING), "the first frame must be"),
        (cf(true, OP_BINARY, b"\x01"), "the first frame must be"),
    ];
    for (bytes, message) in cases {
        let env = jwt_env();
        let mut conn = open_awaiting_auth(&env, T0, "/ws?auth=frame");
        feed(&mut conn, &env, T0 + 1, &bytes);
        let err = expect_in_band(&frames(&mut conn), 4001, "unauthorized");
        let text = err["message"].as_str().unwrap();
        assert!(text.starts_with(message), "{text} / {message}");
        assert!(err.get("retry_ms").is_none(), "{err}");
        assert_eq!(conn.user(), None);
        assert!(!conn.awaiting_session());
        assert_eq!(
            env.metrics.refused[Refusal::Unauthorized.index()].get(),
            1,
            "{message}"
        );
        // The client answers our close: done, and its host slot is given back.
        feed(&mut conn, &env, T0 + 2, &close_frame(4001, ""));
        assert!(matches!(conn.phase(), Phase::Done { .. }));
        conn.on_closed(&env.ctx());
        assert_eq!(env.host(), 0);
        assert_eq!(env.metrics.connections_open.get(), 0);
    }
}

#[test]
fn no_auth_frame_within_the_handshake_timeout_is_refused_with_4001() {
    let env = jwt_env();
    let mut conn = open_awaiting_auth(&env, T0, "/ws?auth=frame");
    assert_eq!(conn.deadline(&env.cfg), T0 + HANDSHAKE_MS);
    assert!(
        !conn.parkable(T0 + HANDSHAKE_MS - 1, 1),
        "never parked unauthenticated"
    );
    // A trickled auth frame does not buy time.
    let whole = auth_frame(r#"{"op":"auth","token":"x.y.z"}"#);
    feed(&mut conn, &env, T0 + HANDSHAKE_MS - 1, &whole[..3]);
    assert_eq!(conn.deadline(&env.cfg), T0 + HANDSHAKE_MS);
    assert!(!conn.silence_would_end_it(T0 + HANDSHAKE_MS - 1, &env.cfg));
    assert!(conn.silence_would_end_it(T0 + HANDSHAKE_MS, &env.cfg));
    conn.on_timer(T0 + HANDSHAKE_MS - 1, &env.ctx());
    assert!(conn.out.is_empty(), "not before the deadline");
    conn.on_timer(T0 + HANDSHAKE_MS, &env.ctx());
    let err = expect_in_band(&frames(&mut conn), 4001, "unauthorized");
    assert_eq!(err["message"], "no auth frame within handshake_timeout_ms");
    assert_eq!(env.metrics.refused[Refusal::Unauthorized.index()].get(), 1);
}

#[test]
fn auth_frame_refusals_of_the_upgrade_are_told_in_band() {
    // Origin not allowed: 4003, permanent (no retry_ms).
    let env = Env::with(
        ConfigLayer {
            allowed_origins: Some(vec!["https://chat.example".into()]),
            ..layer()
        },
        None,
    );
    let mut conn = env.accept(T0);
    feed(&mut conn, &env, T0, &request("/ws?auth=frame"));
    let out = flush(&mut conn);
    let (resp, rest) = split_http(&out);
    assert_eq!(resp.status, 101);
    let err = expect_in_band(&parse_frames(rest), 4003, "forbidden");
    assert!(err.get("retry_ms").is_none());
    assert_eq!(env.metrics.refused[Refusal::Forbidden.index()].get(), 1);
    assert_eq!(env.metrics.connections_accepted.get(), 0);
    assert_eq!(env.metrics.handshakes_pending.get(), 0);
    assert_eq!(env.host(), 0, "an in-band refusal takes no host slot");
    conn.on_closed(&env.ctx());
    assert_eq!(env.host(), 0);

    // Draining, and the host limit: 4503 with retry_ms from retry_after_s.
    let mut env = Env::with(
        ConfigLayer {
            max_connections: Some(1),
            retry_after_s: Some(7),
            ..layer()
        },
        None,
    );
    env.draining = true;
    let mut conn = env.accept(T0);
    feed(&mut conn, &env, T0, &request("/ws?auth=frame"));
    let out = flush(&mut conn);
    let err = expect_in_band(&parse_frames(split_http(&out).1), 4503, "unavailable");
    assert_eq!(err["retry_ms"], 7000);
    assert_eq!(env.metrics.refused[Refusal::Draining.index()].get(), 1);
    env.draining = false;
    let _first = open(&env, T0, "/ws?user=a");
    let mut conn = env.accept(T0);
    feed(&mut conn, &env, T0, &request("/ws?auth=frame"));
    let out = flush(&mut conn);
    let err = expect_in_band(&parse_frames(split_http(&out).1), 4503, "unavailable");
    assert_eq!(err["retry_ms"], 7000);
    assert_eq!(env.metrics.refused[Refusal::Overloaded.index()].get(), 1);
    assert_eq!(env.host(), 1);
}

#[test]
fn without_auth_frame_refusals_stay_plain_http() {
    // The SPEC's plain-HTTP refusals are unchanged for every client that did not ask.
    let env = jwt_env();
    expect_refusal(&env, &request("/ws"), Refusal::Unauthorized, 401);
    let env = jwt_env();
    let token = crate::auth::mint(SECRET, "carol", None, 60);
    let resp = expect_refusal(
        &env,
        &request(&format!("/ws?auth=frame&token={token}")),
        Refusal::BadRequest,
        400,
    );
    assert!(resp.body.starts_with(b"auth=frame takes the token"));
}

// ---------------------------------------------------------------------------------------------
// 16. Randomized streams
// ---------------------------------------------------------------------------------------------

fn push_frame(rng: &mut Rng, stream: &mut Vec<u8>, fin: bool, op: u8, payload: &[u8]) {
    stream.extend(client_frame(fin, op, payload, rng.mask()));
}

/// A random stream of valid client frames and the exact server answers it must produce.
/// `app` selects /ws (app pings answered with pong) instead of /echo (data echoed).
fn random_stream(rng: &mut Rng, app: bool) -> (Vec<u8>, Vec<Out>) {
    let mut stream = Vec::new();
    let mut expect = Vec::new();
    for _ in 0..rng.range(30, 120) {
        match rng.range(0, 5) {
            0 => {
                let p = rng.bytes_upto(125);
                push_frame(rng, &mut stream, true, OP_PING, &p);
                expect.push(Out::new(OP_PONG, &p));
            }
            1 => {
                // A client pong is only activity.
                let p = rng.bytes_upto(125);
                push_frame(rng, &mut stream, true, OP_PONG, &p);
            }
            2 => {
                push_frame(rng, &mut stream, true, OP_TEXT, APP_PING);
                expect.push(Out::new(OP_TEXT, if app { APP_PONG } else { APP_PING }));
            }
            3 if !app => {
                let (op, p) = if rng.chance(50) {
                    (OP_TEXT, rng.text(MAX_FRAME))
                } else {
                    (OP_BINARY, rng.bytes_upto(MAX_FRAME))
                };
                push_frame(rng, &mut stream, true, op, &p);
                expect.push(Out::new(op, &p));
            }
            _ => {
                // Fragmented, with control frames between fragments.
                let (op, msg) = if app {
                    (OP_TEXT, APP_PING.to_vec())
                } else if rng.chance(50) {
                    (OP_TEXT, rng.text(MAX_FRAME))
                } else {
                    (OP_BINARY, rng.bytes_upto(MAX_FRAME))
                };
                let n = rng.range(2, 5);
                let mut cuts: Vec<usize> = (0..n - 1).map(|_| rng.range(0, msg.len())).collect();
                cuts.sort_unstable();
                let mut bounds = vec![0];
                bounds.extend(cuts);
                bounds.push(msg.len());
                for (i, w) in bounds.windows(2).enumerate() {
                    let first = i == 0;
                    let last = i == n - 1;
                    let fop = if first { op } else { OP_CONT };
                    push_frame(rng, &mut stream, last, fop, &msg[w[0]..w[1]]);
                    if !last && rng.chance(30) {
                        let p = rng.bytes_upto(20);
                        push_frame(rng, &mut stream, true, OP_PING, &p);
                        expect.push(Out::new(OP_PONG, &p));
                    }
                    if !last && rng.chance(15) {
                        push_frame(rng, &mut stream, true, OP_PONG, b"");
                    }
                }
                let answer = if app { APP_PONG.to_vec() } else { msg };
                expect.push(Out::new(op, &answer));
            }
        }
    }
    (stream, expect)
}

fn run_random(seed: u64, app: bool) {
    let env = Env::new();
    let mut rng = Rng::new(seed);
    let (stream, expect) = random_stream(&mut rng, app);
    let data = expect.iter().filter(|o| o.op != OP_PONG).count();
    eprintln!(
        "seed {seed}: {} bytes, {} answers ({data} data)",
        stream.len(),
        expect.len()
    );
    let mut conn = open(&env, T0, if app { "/ws?user=r" } else { "/echo" });
    let mut now = T0;
    let mut got = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let size = if rng.chance(10) {
            rng.range(1, 3000)
        } else {
            rng.range(1, 40)
        };
        let end = (pos + size).min(stream.len());
        now += rng.range(0, 50) as u64;
        feed(&mut conn, &env, now, &stream[pos..end]);
        // A timer right after activity is always early: it must be a no-op.
        conn.on_timer(now, &env.ctx());
        got.extend(frames(&mut conn));
        assert_eq!(
            conn.phase(),
            Phase::Open,
            "seed {seed}: closed at byte {end}"
        );
        pos = end;
    }
    assert_eq!(got.len(), expect.len(), "seed {seed}: answer count");
    for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
        assert_eq!(g, e, "seed {seed}: answer {i}");
    }
    assert_eq!(conn.buffered_in(), 0, "seed {seed}");
    assert_eq!(env.metrics.pings_sent.get(), 0, "seed {seed}");
    assert_eq!(env.metrics.bad_frames.get(), 0, "seed {seed}");
}

/// Seeds for the randomized tests; every failure message names its seed.
const SEEDS: [u64; 12] = [
    1,
    2,
    3,
    42,
    0xdead_beef,
    0x1234_5678_9abc,
    7_777_777,
    u64::MAX,
    99,
    1 << 40,
    31337,
    2024,
];

#[test]
fn randomized_echo_stream_cut_anywhere() {
    for seed in SEEDS {
        run_random(seed, false);
    }
}

#[test]
fn randomized_app_stream_cut_anywhere() {
    for seed in SEEDS {
        run_random(seed, true);
    }
}

/// After an oversized frame (1009) its payload is stepped over as it comes, and the peer's
/// answering close frame ends the connection at once (no wait for the linger); nothing of the
/// payload is kept.
#[test]
fn after_an_oversized_frame_the_peers_close_ends_it_at_once() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    // Only the header of a frame far over max_frame arrives first.
    let big = cf(true, OP_TEXT, &vec![b'x'; MAX_FRAME * 4]);
    feed(&mut conn, &env, T0 + 1, &big[..14]);
    let out = frames(&mut conn);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].close_code(), 1009);
    assert!(matches!(conn.phase(), Phase::Closing { .. }));
    assert!(conn.wants_fin(), "our close is out: shut the write side");
    conn.fin_sent();
    assert!(!conn.wants_fin());
    // The payload keeps coming (ignored, not kept), then the peer's close.
    feed(&mut conn, &env, T0 + 2, &big[14..big.len() / 2]);
    assert_eq!(conn.buffered_in(), 0, "nothing is kept");
    let mut rest = big[big.len() / 2..].to_vec();
    rest.extend(cf(true, OP_CLOSE, &1000u16.to_be_bytes()));
    feed(&mut conn, &env, T0 + 3, &rest);
    assert!(conn.out.is_empty(), "nothing more is said");
    assert!(conn.finished(), "{:?}", conn.phase());
}

/// A refusal the shard answers after our close frame (a late presence reply) is not written:
/// no data frame follows a close (RFC 6455 5.5.1), the write side stays shut, the deadline
/// stays (review finding: a second close once reopened the FIN and moved the deadline).
#[test]
fn once_closing_a_late_refusal_writes_nothing_and_keeps_the_fin_and_deadline() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    let big = cf(true, OP_TEXT, &vec![b'x'; MAX_FRAME * 4]);
    feed(&mut conn, &env, T0 + 1, &big[..14]);
    assert_eq!(frames(&mut conn)[0].close_code(), 1009);
    conn.fin_sent();
    let closing = conn.phase();
    for n in 0..5 {
        let err = FrameError {
            code: crate::proto::ErrorCode::BadRequest,
            message: "late".into(),
            cid: None,
        };
        conn.reply_error(T0 + 10 + n, err, &env.ctx());
    }
    assert!(conn.out.is_empty(), "nothing after our close frame");
    assert!(!conn.wants_fin(), "the write side is shut already");
    assert_eq!(conn.phase(), closing, "the same deadline");
}

/// Every protocol error whose frame header reads: the right close code, then the peer's close
/// (in the same read or the next) ends the connection at once.
#[test]
fn after_a_protocol_error_the_peers_close_ends_it_at_once() {
    let env = Env::new();
    let unmasked = vec![0x81, 0x02, b'h', b'i'];
    let mut rsv = cf(true, OP_TEXT, b"x");
    rsv[0] |= 0x40;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", unmasked, 1002),
        ("rsv bits", rsv, 1002),
        ("reserved opcode", cf(true, 0x3, b"x"), 1002),
        ("reserved control opcode", cf(true, 0xB, b"x"), 1002),
        ("control over 125", cf(true, OP_PING, &[0; 126]), 1002),
        ("fragmented control", cf(false, OP_PING, b"x"), 1002),
        (
            "over max_frame",
            cf(true, OP_BINARY, &vec![0; MAX_FRAME + 1]),
            1009,
        ),
    ];
    let close = cf(true, OP_CLOSE, &1000u16.to_be_bytes());
    for (what, bad, code) in cases {
        for split in [false, true] {
            let mut conn = open(&env, T0, "/ws?user=a");
            if split {
                feed(&mut conn, &env, T0 + 1, &bad);
                feed(&mut conn, &env, T0 + 2, &close);
            } else {
                feed(
                    &mut conn,
                    &env,
                    T0 + 1,
                    &[bad.clone(), close.clone()].concat(),
                );
            }
            let out = frames(&mut conn);
            assert_eq!(out.len(), 1, "{what}");
            assert_eq!(out[0].close_code(), code, "{what}");
            assert!(
                conn.finished(),
                "{what} (split {split}): {:?}",
                conn.phase()
            );
        }
    }
}

/// The bad frame and the peer's close cut anywhere across reads (a bad frame that began in an
/// earlier read; a close frame cut in two): the close is still read and ends it at once.
#[test]
fn a_bad_frame_and_the_close_after_it_cut_across_reads_still_end_it_at_once() {
    let env = Env::new();
    let bad = [0x81u8, 0x02, b'h', b'i'];
    let close = cf(true, OP_CLOSE, &1000u16.to_be_bytes());
    let all = [&bad[..], &close[..]].concat();
    for first in 1..all.len() {
        for second in first..all.len() {
            let mut conn = open(&env, T0, "/ws?user=a");
            feed(&mut conn, &env, T0 + 1, &all[..first]);
            feed(&mut conn, &env, T0 + 2, &all[first..second]);
            feed(&mut conn, &env, T0 + 3, &all[second..]);
            let out = frames(&mut conn);
            assert_eq!(out.len(), 1, "cut at {first}, {second}");
            assert_eq!(out[0].close_code(), 1002);
            assert!(
                conn.finished(),
                "cut at {first}, {second}: {:?}",
                conn.phase()
            );
        }
    }
}

/// A 64-bit length with the top bit set: framing is lost, so later bytes (even a close frame)
/// are dropped; the write side is shut so the peer closes, and its EOF (or the linger) ends it.
#[test]
fn after_framing_is_lost_input_is_dropped_until_eof_or_the_linger() {
    let env = Env::new();
    let mut conn = open(&env, T0, "/ws?user=a");
    feed(
        &mut conn,
        &env,
        T0 + 1,
        &[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4],
    );
    let out = frames(&mut conn);
    assert_eq!(out[0].close_code(), 1002);
    assert!(conn.wants_fin());
    feed(
        &mut conn,
        &env,
        T0 + 2,
        &cf(true, OP_CLOSE, &1000u16.to_be_bytes()),
    );
    assert!(
        matches!(conn.phase(), Phase::Closing { .. }),
        "{:?}",
        conn.phase()
    );
    assert_eq!(conn.buffered_in(), 0, "nothing is kept");
    conn.on_timer(conn.deadline(&env.cfg), &env.ctx());
    assert!(conn.finished());
}

// ---------------------------------------------------------------------------------------------
// 17. Rate limits (SPEC section 4, "Limits")
// ---------------------------------------------------------------------------------------------

const FRAME_RATE: u32 = 10;
const FRAME_BURST: u32 = 5;
const STRIKES: u32 = 4;

fn limited_env() -> Env {
    Env::with(
        ConfigLayer {
            conn_frame_rate: Some(FRAME_RATE),
            conn_frame_burst: Some(FRAME_BURST),
            rate_limit_strikes: Some(STRIKES),
            ip_connect_rate: Some(1),
            ip_connect_burst: Some(1),
            ip_max_open: Some(1),
            ..layer()
        },
        None,
    )
}

fn app_frames(n: usize, text: &[u8]) -> Vec<u8> {
    (0..n).flat_map(|_| cf(true, OP_TEXT, text)).collect()
}

/// Over the burst, each frame gets `rate_limited` with its cid and `retry_ms`, and nothing of
/// it reaches the shard but, for a `send`, that it was refused (the shard keeps its cid for
/// the pair's next message to carry); a client that waits as told gets through again.
#[test]
fn frames_over_the_limit_get_rate_limited_with_their_cid_and_retry_ms() {
    let env = limited_env();
    let mut conn = open(&env, T0, "/ws?user=a");
    frames(&mut conn); // welcome, synced
    let send = br#"{"op":"send","to":"b","cid":"c9","body":1}"#;
    feed(
        &mut conn,
        &env,
        T0,
        &app_frames(FRAME_BURST as usize + 1, send),
    );
    let events: Vec<AppEvent> = env.events.borrow_mut().drain(..).collect();
    let passed = events
        .iter()
        .filter(|e| matches!(e, AppEvent::Frame(ClientFrame::Send(_))))
        .count();
    assert_eq!(passed, FRAME_BURST as usize);
    assert!(
        matches!(events.last(), Some(AppEvent::SendRefused(req)) if req.cid == "\"c9\""),
        "{:?}",
        events.last()
    );
    let out = frames(&mut conn);
    assert_eq!(out.len(), 1, "{out:?}");
    let v = out[0].json();
    assert_eq!(v["op"], "error");
    assert_eq!(v["code"], "rate_limited");
    assert_eq!(v["cid"], "c9");
    assert_eq!(
        v["retry_ms"], 200,
        "100 ms refill + the refused frame's own cost"
    );
    assert_eq!(env.metrics.rate_limited[Limited::Frames.index()].get(), 1);
    // Waiting as told: the next frame passes.
    feed(&mut conn, &env, T0 + 200, &cf(true, OP_TEXT, APP_PING));
    assert_eq!(frames(&mut conn), vec![Out::new(OP_TEXT, APP_PONG)]);
    assert_eq!(conn.phase(), Phase::Open);
}

/// A connection that keeps sending past its limit is closed with 1008 once its refused frames
/// pass `rate_limit_strikes`; the close is counted.
#[test]
fn a_connection_that_keeps_flooding_is_closed_with_1008() {
    let env = limited_env();
    let mut conn = open(&env, T0, "/ws?user=a");
    frames(&mut conn);
    let flood = app_frames(FRAME_BURST as usize + STRIKES as usize + 1, APP_PING);
    feed(&mut conn, &env, T0, &flood);
    let out = frames(&mut conn);
    let pongs = out
        .iter()
        .filter(|f| f.op == OP_TEXT && f.payload == APP_PONG)
        .count();
    let limited = out
        .iter()
        .filter(|f| f.op == OP_TEXT && f.json()["code"] == "rate_limited")
        .count();
    assert_eq!(pongs, FRAME_BURST as usize);
    assert_eq!(limited, STRIKES as usize, "{out:?}");
    assert_eq!(out.last().unwrap().close_code(), 1008);
    assert!(
        matches!(conn.phase(), Phase::Done { .. }),
        "no closing handshake with a flood: the socket closes once the close frame is out"
    );
    assert_eq!(env.metrics.rate_limit_closes.get(), 1);
    assert_eq!(
        env.metrics.rate_limited[Limited::Frames.index()].get(),
        u64::from(STRIKES) + 1
    );
}

/// A flood of sends: those answered `rate_limited` reach the shard as refused (it keeps their
/// cids), those that passed go with the connection, and the one whose strike closed it was
/// not answered, so it is not reported either.
#[test]
fn a_send_flood_closed_with_1008_reports_the_sends_it_answered_rate_limited() {
    let env = limited_env();
    let mut conn = open(&env, T0, "/ws?user=a");
    frames(&mut conn);
    let n = FRAME_BURST + STRIKES + 1;
    let flood: Vec<u8> = (0..n)
        .flat_map(|i| {
            let send = format!(r#"{{"op":"send","to":"b","cid":"c{i}","body":1}}"#);
            cf(true, OP_TEXT, send.as_bytes())
        })
        .collect();
    feed(&mut conn, &env, T0, &flood);
    assert!(matches!(conn.phase(), Phase::Done { .. }));
    let refused: Vec<String> = (env.events.borrow_mut().drain(..))
        .map(|e| match e {
            AppEvent::SendRefused(req) => req.cid.to_string(),
            other => panic!("only refused sends are left: {other:?}"),
        })
        .collect();
    let answered: Vec<String> = (FRAME_BURST..n - 1).map(|i| format!("\"c{i}\"")).collect();
    assert_eq!(refused, answered);
    let limited = frames(&mut conn)
        .iter()
        .filter(|f| f.op == OP_TEXT && f.json()["code"] == "rate_limited")
        .count();
    assert_eq!(limited, answered.len());
}

/// Acks are not charged by the connection (the shard charges those that acknowledge nothing),
/// so a client acking every message of a big replay is never limited for it.
#[test]
fn acks_pass_the_connection_limit_to_the_shard() {
    let env = limited_env();
    let mut conn = open(&env, T0, "/ws?user=a");
    frames(&mut conn);
    let acks: Vec<u8> = (1..=100)
        .flat_map(|seq| {
            cf(
                true,
                OP_TEXT,
                format!(r#"{{"op":"ack","seq":{seq}}}"#).as_bytes(),
            )
        })
        .collect();
    feed(&mut conn, &env, T0, &acks);
    assert_eq!(env.events.borrow_mut().drain(..).count(), 100);
    assert!(frames(&mut conn).is_empty());
    assert_eq!(env.metrics.rate_limited[Limited::Frames.index()].get(), 0);
}

/// On /echo a frame over the limit is not echoed, a WebSocket ping over it is not answered,
/// and fragments count too: a flood of empty continuation frames is closed with 1008.
#[test]
fn echo_pings_and_fragments_are_limited_too() {
    let env = limited_env();
    let mut conn = open(&env, T0, "/echo");
    feed(
        &mut conn,
        &env,
        T0,
        &app_frames(FRAME_BURST as usize + 1, b"x"),
    );
    assert_eq!(
        frames(&mut conn).len(),
        FRAME_BURST as usize,
        "the last one dropped"
    );
    feed(&mut conn, &env, T0 + 1_000, &cf(true, OP_PING, b"p"));
    assert_eq!(frames(&mut conn), vec![Out::new(OP_PONG, b"p")]);
    let pings: Vec<u8> = (0..FRAME_BURST)
        .flat_map(|_| cf(true, OP_PING, b"p"))
        .collect();
    feed(&mut conn, &env, T0 + 1_000, &pings);
    assert_eq!(
        frames(&mut conn).len(),
        FRAME_BURST as usize - 1,
        "the last not answered"
    );

    let mut frag = open(&env, T0, "/echo");
    let mut flood = cf(false, OP_TEXT, b"a");
    for _ in 0..(FRAME_BURST + STRIKES + 1) {
        flood.extend(cf(false, OP_CONT, b""));
    }
    feed(&mut frag, &env, T0, &flood);
    assert_eq!(frames(&mut frag).last().unwrap().close_code(), 1008);
}

/// Per address: a connection accepted over the connect rate gets 429 with the bucket's
/// Retry-After (before authentication), and one over the open limit gets 429 until another
/// connection from the address closes.
#[test]
fn an_address_over_its_limits_gets_429_with_retry_after() {
    let env = limited_env();
    let ip = 0xffff_ffff_0a00_0001;
    let accept = |now| {
        let mut conn = env.accept(now);
        let told = env.ips.on_connect(ip, now);
        conn.set_source(ip, told.refused_for_ms.is_some());
        conn
    };
    let mut first = accept(T0);
    feed(&mut first, &env, T0, &request("/ws?user=a"));
    assert_eq!(split_http(&flush(&mut first)).0.status, 101);

    let mut too_fast = accept(T0 + 300);
    feed(&mut too_fast, &env, T0 + 300, &request("/ws?user=a"));
    let (resp, _) = split_http(&flush(&mut too_fast));
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), Some("1"), "{}", resp.head);
    assert_eq!(env.metrics.refused[Refusal::IpRate.index()].get(), 1);

    // A second later the rate allows it, but the address has its one open connection.
    let mut too_many = accept(T0 + 1_300);
    feed(&mut too_many, &env, T0 + 1_300, &request("/ws?user=a"));
    let (resp, _) = split_http(&flush(&mut too_many));
    assert_eq!(resp.status, 429);
    assert_eq!(
        resp.header("retry-after"),
        Some(&*env.cfg.retry_after_s.to_string())
    );
    assert_eq!(env.metrics.refused[Refusal::IpOpen.index()].get(), 1);
    assert_eq!(env.host(), 1, "the refused upgrade holds no host slot");

    first.on_closed(&env.ctx());
    assert_eq!(env.ips.open_count(ip), 0);
    let mut after_close = accept(T0 + 2_300);
    feed(&mut after_close, &env, T0 + 2_300, &request("/ws?user=a"));
    assert_eq!(split_http(&flush(&mut after_close)).0.status, 101);
}
