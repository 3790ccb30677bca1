//! One event loop (one thread): a mio poll over many nonblocking client
//! sockets kept in a slab of small structs. There is one scratch read buffer
//! per loop; a connection owns heap memory only while it holds a partial
//! frame, unsent bytes or a fragmented message (`Ext`), or, in echo mode, its
//! fixed ring of send timestamps.

use crate::chat::{self, ChatConn, CtrSet};
use crate::net;
use crate::ring::LatRing;
use crate::ws;
use hdrhistogram::Histogram;
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Deserialize;
use slab::Slab;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest server frame or reassembled message accepted.
pub const MAX_SERVER_MESSAGE: u64 = 16 << 20;
/// Scratch read buffer per loop.
const SCRATCH: usize = 64 * 1024;
const NO_PENDING: u32 = u32::MAX;
const MS: u64 = 1_000_000;
/// How far behind schedule the connect pacing may catch up, ns.
const PACING_SLACK: u64 = 10 * MS;

/// Set by SIGINT: loops stop early and results are still printed.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route {
    /// `/ws`: authenticated, established at the welcome frame.
    Ws,
    /// `/echo`: no auth, established at the 101.
    Echo,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Ws => "/ws",
            Route::Echo => "/echo",
        }
    }
}

pub enum Auth {
    /// `?user=<id>` (gateway without a secret).
    Dev,
    /// `?token=<HS256 JWT>`.
    Jwt {
        key: jsonwebtoken::EncodingKey,
        ttl_secs: u64,
    },
}

pub enum Mode {
    Idle,
    Echo {
        /// Payload of every request frame (unmasked).
        payload: Vec<u8>,
        opcode: u8,
        inflight: usize,
        /// /ws route: replies are `{"op":"pong"}`; /echo: replies equal `payload`.
        expect_pong: bool,
    },
    /// 1:1 messages between paired users (2k <-> 2k+1) on /ws.
    Send {
        /// Most sends per connection without `accepted`.
        inflight: usize,
        /// High bits of this run's cids (see `chat`).
        nonce: u64,
        /// `"` + JSON-escaped user prefix (for `to`).
        to_prefix_json: Vec<u8>,
        /// Send a read receipt for every this many messages received (0: none).
        read_every: u64,
    },
    /// Room members on /ws: join `room` after `welcome`, then time every `room` frame
    /// (its body's `t` is the publisher's send time, ns since `Config::base`).
    Fanout {
        /// The `join` frame's JSON text.
        join: Vec<u8>,
    },
}

/// Settings shared by all loops of a run.
pub struct Config {
    pub target: SocketAddr,
    /// Where odd-numbered connections go instead, when set (pairs across two nodes).
    pub odd_target: Option<SocketAddr>,
    pub host: String,
    pub sources: Vec<Ipv4Addr>,
    pub route: Route,
    pub auth: Auth,
    pub user_prefix: String,
    pub user_offset: u64,
    pub device: Option<String>,
    pub handshake_timeout: Duration,
    pub nodelay: bool,
    pub mode: Mode,
    /// Common time origin of all loops (timestamps are ns since this).
    pub base: Instant,
    /// CLOCK_MONOTONIC at `base`, ns: stamps that other processes on this host can compare
    /// (the fanout publisher stamps `base_mono_ns + now`).
    pub base_mono_ns: u64,
}

impl Config {
    pub fn user_id(&self, global_idx: u64) -> String {
        format!("{}{}", self.user_prefix, self.user_offset + global_idx)
    }

    /// Request target (path and query) for connection `global_idx`.
    pub fn request_target(&self, global_idx: u64) -> String {
        if self.route == Route::Echo {
            return "/echo".to_string();
        }
        let user = self.user_id(global_idx);
        let mut p = String::with_capacity(320);
        match &self.auth {
            Auth::Dev => {
                p.push_str("/ws?user=");
                ws::pct_encode(&user, &mut p);
            }
            Auth::Jwt { key, ttl_secs } => {
                #[derive(serde::Serialize)]
                struct Claims<'a> {
                    sub: &'a str,
                    exp: u64,
                }
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let claims = Claims {
                    sub: &user,
                    exp: now + ttl_secs,
                };
                let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, key)
                    .expect("HS256 signing cannot fail");
                p.push_str("/ws?token=");
                p.push_str(&token);
            }
        }
        if let Some(d) = &self.device {
            p.push_str("&device=");
            ws::pct_encode(d, &mut p);
        }
        p
    }
}

/// Counters the main thread reads while loops run.
#[derive(Default)]
pub struct Shared {
    pub established: AtomicU64,
    pub failed: AtomicU64,
    pub lost: AtomicU64,
    pub pings: AtomicU64,
    pub ramp_done: AtomicUsize,
    pub stop: AtomicBool,
    /// Echo: instant (ns since base) at which all loops start sending.
    pub t0_ns: AtomicU64,
    /// Send mode: accepted sends, this run's msgs received (unique), and
    /// sends not accepted yet; the main thread ends the grace period early
    /// once nothing is outstanding and everything accepted was received.
    pub chat_accepted: AtomicU64,
    pub chat_received: AtomicU64,
    pub chat_outstanding: AtomicU64,
    pub chat_sent: AtomicU64,
    /// Fanout mode: members that got `joined`, and `room` frames received.
    pub room_joined: AtomicU64,
    pub room_received: AtomicU64,
    /// Idle mode: connections that got `synced` (their waiting messages all replayed), and
    /// when the last one did (ns since `Config::base`).
    pub synced: AtomicU64,
    pub last_synced_ns: AtomicU64,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct WelcomeInfo {
    pub heartbeat_ms: Option<u64>,
    pub max_frame: Option<u64>,
}

pub struct Stats {
    pub started: u64,
    pub established: u64,
    pub failed: u64,
    pub lost: u64,
    pub not_started: u64,
    pub closed_by_us: u64,
    pub failures: BTreeMap<String, u64>,
    pub lost_reasons: BTreeMap<String, u64>,
    pub closes: BTreeMap<u16, u64>,
    pub pings_received: u64,
    pub pongs_sent: u64,
    pub pongs_received: u64,
    pub messages: u64,
    pub messages_by_op: BTreeMap<String, u64>,
    pub messages_before_welcome: u64,
    pub fragmented_messages: u64,
    pub welcome: Option<WelcomeInfo>,
    pub welcome_user_mismatch: u64,
    /// Connect start to established (welcome on /ws, 101 on /echo), µs.
    pub handshake_us: Histogram<u64>,
    pub ramp_end_ns: u64,
    // Echo only.
    pub latency_ns: Option<Histogram<u64>>,
    pub replies_in_window: u64,
    pub replies_total: u64,
    pub sent: u64,
    pub bad_replies: u64,
    pub unexpected_replies: u64,
    pub other_messages: u64,
    // Send mode (`latency_ns` holds send -> accepted).
    pub msg_latency_ns: Option<Histogram<u64>>,
    pub accepted_in_window: u64,
    pub accepted_total: u64,
    pub msgs_in_window: u64,
    pub msgs_total: u64,
    pub delivered_in_window: u64,
    pub delivered_total: u64,
    /// Read receipts sent, and `read` frames received (both users' devices are told).
    pub reads_sent: u64,
    pub reads_in_window: u64,
    pub reads_total: u64,
    pub sent_in_window: u64,
    pub resent: u64,
    pub abandoned: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    pub duplicates: u64,
    pub foreign_msgs: u64,
    pub unexpected_accepted: u64,
    pub unexpected_delivered: u64,
    pub unparsed: u64,
    pub acks_sent: u64,
    pub msgs_without_t: u64,
    /// Per connection at its end: (global index, accepted counters,
    /// counters received from the partner, sends still pending).
    pub chat_sets: Vec<(u64, CtrSet, CtrSet, u64)>,
    // Fanout mode (`latency_ns` holds publish -> this member, per delivery).
    pub room_msgs: u64,
    /// Wire bytes of those room frames (header included): what `floor --bytes` should carry.
    pub room_wire_bytes: u64,
    pub room_gaps: u64,
    pub room_duplicates: u64,
    /// Offsets skipped without a `gap` frame announcing them.
    pub room_holes: u64,
    /// Per offset: members that got it and the slowest of them (ns after the publish).
    pub room_by_offset: std::collections::HashMap<u64, (u32, u64)>,
}

impl Stats {
    fn new(mode: &Mode) -> Stats {
        let echo = !matches!(mode, Mode::Idle);
        let send = matches!(mode, Mode::Send { .. });
        Stats {
            started: 0,
            established: 0,
            failed: 0,
            lost: 0,
            not_started: 0,
            closed_by_us: 0,
            failures: BTreeMap::new(),
            lost_reasons: BTreeMap::new(),
            closes: BTreeMap::new(),
            pings_received: 0,
            pongs_sent: 0,
            pongs_received: 0,
            messages: 0,
            messages_by_op: BTreeMap::new(),
            messages_before_welcome: 0,
            fragmented_messages: 0,
            welcome: None,
            welcome_user_mismatch: 0,
            handshake_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap(),
            ramp_end_ns: 0,
            latency_ns: echo.then(|| Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()),
            replies_in_window: 0,
            replies_total: 0,
            sent: 0,
            bad_replies: 0,
            unexpected_replies: 0,
            other_messages: 0,
            msg_latency_ns: send.then(|| Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()),
            accepted_in_window: 0,
            accepted_total: 0,
            msgs_in_window: 0,
            msgs_total: 0,
            delivered_in_window: 0,
            delivered_total: 0,
            reads_sent: 0,
            reads_in_window: 0,
            reads_total: 0,
            sent_in_window: 0,
            resent: 0,
            abandoned: 0,
            errors_by_code: BTreeMap::new(),
            duplicates: 0,
            foreign_msgs: 0,
            unexpected_accepted: 0,
            unexpected_delivered: 0,
            unparsed: 0,
            acks_sent: 0,
            msgs_without_t: 0,
            chat_sets: Vec::new(),
            room_msgs: 0,
            room_wire_bytes: 0,
            room_gaps: 0,
            room_duplicates: 0,
            room_holes: 0,
            room_by_offset: std::collections::HashMap::new(),
        }
    }

    pub fn merge(&mut self, o: &Stats) {
        fn add<K: Ord + Clone>(a: &mut BTreeMap<K, u64>, b: &BTreeMap<K, u64>) {
            for (k, v) in b {
                *a.entry(k.clone()).or_default() += v;
            }
        }
        self.started += o.started;
        self.established += o.established;
        self.failed += o.failed;
        self.lost += o.lost;
        self.not_started += o.not_started;
        self.closed_by_us += o.closed_by_us;
        add(&mut self.failures, &o.failures);
        add(&mut self.lost_reasons, &o.lost_reasons);
        add(&mut self.closes, &o.closes);
        self.pings_received += o.pings_received;
        self.pongs_sent += o.pongs_sent;
        self.pongs_received += o.pongs_received;
        self.messages += o.messages;
        add(&mut self.messages_by_op, &o.messages_by_op);
        self.messages_before_welcome += o.messages_before_welcome;
        self.fragmented_messages += o.fragmented_messages;
        if self.welcome.is_none() {
            self.welcome = o.welcome;
        }
        self.welcome_user_mismatch += o.welcome_user_mismatch;
        self.handshake_us.add(&o.handshake_us).unwrap();
        self.ramp_end_ns = self.ramp_end_ns.max(o.ramp_end_ns);
        if let (Some(a), Some(b)) = (self.latency_ns.as_mut(), o.latency_ns.as_ref()) {
            a.add(b).unwrap();
        }
        self.replies_in_window += o.replies_in_window;
        self.replies_total += o.replies_total;
        self.sent += o.sent;
        self.bad_replies += o.bad_replies;
        self.unexpected_replies += o.unexpected_replies;
        self.other_messages += o.other_messages;
        if let (Some(a), Some(b)) = (self.msg_latency_ns.as_mut(), o.msg_latency_ns.as_ref()) {
            a.add(b).unwrap();
        }
        self.accepted_in_window += o.accepted_in_window;
        self.accepted_total += o.accepted_total;
        self.msgs_in_window += o.msgs_in_window;
        self.msgs_total += o.msgs_total;
        self.delivered_in_window += o.delivered_in_window;
        self.delivered_total += o.delivered_total;
        self.reads_sent += o.reads_sent;
        self.reads_in_window += o.reads_in_window;
        self.reads_total += o.reads_total;
        self.sent_in_window += o.sent_in_window;
        self.resent += o.resent;
        self.abandoned += o.abandoned;
        add(&mut self.errors_by_code, &o.errors_by_code);
        self.duplicates += o.duplicates;
        self.foreign_msgs += o.foreign_msgs;
        self.unexpected_accepted += o.unexpected_accepted;
        self.unexpected_delivered += o.unexpected_delivered;
        self.unparsed += o.unparsed;
        self.acks_sent += o.acks_sent;
        self.msgs_without_t += o.msgs_without_t;
        self.chat_sets.extend(o.chat_sets.iter().cloned());
        self.room_msgs += o.room_msgs;
        self.room_wire_bytes += o.room_wire_bytes;
        self.room_gaps += o.room_gaps;
        self.room_duplicates += o.room_duplicates;
        self.room_holes += o.room_holes;
        for (offset, (n, worst)) in &o.room_by_offset {
            let e = self.room_by_offset.entry(*offset).or_default();
            e.0 += n;
            e.1 = e.1.max(*worst);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Connecting,
    Handshake,
    AwaitWelcome,
    Open,
}

/// Heap state a connection needs only now and then.
#[derive(Default)]
struct Ext {
    /// Received bytes not yet forming a complete response head or frame.
    rbuf: Vec<u8>,
    /// Bytes the socket did not accept yet (`wbuf[wpos..]`).
    wbuf: Vec<u8>,
    wpos: usize,
    /// Fragmented message being reassembled.
    frag: Vec<u8>,
}

impl Ext {
    fn is_idle(&self) -> bool {
        self.rbuf.is_empty() && self.wpos >= self.wbuf.len() && self.frag.is_empty()
    }
}

/// Per-connection state: 40 bytes plus the slab's tag.
struct Conn {
    sock: TcpStream,
    phase: Phase,
    /// Opcode of the fragmented message in progress, 0 = none.
    frag_op: u8,
    /// Index in `Loop::pending` while not established.
    pidx: u32,
    /// Index within this loop's share of connections.
    idx: u32,
    /// Connect start, ns since base.
    t_start: u64,
    ext: Option<Box<Ext>>,
    /// Echo ring or send-mode state, once established.
    traffic: Option<Box<Traffic>>,
}

enum Traffic {
    Echo(LatRing),
    Chat(ChatConn),
    /// Fanout: the newest offset this member got (0: none yet).
    Room {
        last: u64,
    },
}

impl Conn {
    fn ext_mut(&mut self) -> &mut Ext {
        self.ext.get_or_insert_with(Default::default)
    }

    fn has_unsent(&self) -> bool {
        self.ext.as_ref().is_some_and(|e| e.wpos < e.wbuf.len())
    }

    /// Idle connections give their buffers back as soon as they are empty.
    fn gc(&mut self) {
        if self.traffic.is_none() && self.ext.as_ref().is_some_and(|e| e.is_idle()) {
            self.ext = None;
        }
    }
}

enum Fail {
    Io(&'static str, io::Error),
    Eof,
    Http(u16),
    BadResponse(&'static str),
    BadUpgrade(&'static str),
    Protocol(&'static str),
    PeerClose(u16),
    Timeout,
    Deadline,
    Interrupted,
}

fn reason(f: &Fail, phase: Phase) -> String {
    use Phase::*;
    match (f, phase) {
        (Fail::Io(step, e), Connecting) => format!("{step}:{}", net::errno_name(e)),
        (Fail::Timeout, Connecting) => "timeout:connect".into(),
        (Fail::Timeout, Handshake) => "timeout:handshake".into(),
        (Fail::Timeout, AwaitWelcome) => "timeout:welcome".into(),
        (Fail::Timeout, Open) => "timeout".into(),
        (Fail::Deadline, _) => "timeout:run_deadline".into(),
        (Fail::Interrupted, _) => "interrupted".into(),
        (Fail::Http(code), _) => format!("http:{code}"),
        (Fail::BadResponse(w), _) => format!("bad_response:{w}"),
        (Fail::BadUpgrade(w), _) => format!("bad_upgrade:{w}"),
        (Fail::Protocol(w), _) => format!("protocol:{w}"),
        (Fail::Eof, Handshake | Connecting) => "eof_before_response".into(),
        (Fail::Io(_, e), Handshake) => format!("io_before_response:{}", net::errno_name(e)),
        (Fail::Eof, AwaitWelcome) => "closed_before_welcome".into(),
        (Fail::PeerClose(c), AwaitWelcome) => format!("closed_before_welcome:close_{c}"),
        (Fail::Io(_, e), AwaitWelcome) => {
            format!("closed_before_welcome:{}", net::errno_name(e))
        }
        (Fail::Eof, Open) => "eof".into(),
        (Fail::PeerClose(c), _) => format!("close_{c}"),
        (Fail::Io(_, e), Open) => format!("io:{}", net::errno_name(e)),
    }
}

#[derive(Deserialize)]
struct Msg {
    op: String,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    heartbeat_ms: Option<u64>,
    #[serde(default)]
    max_frame: Option<u64>,
}

/// Borrowed pieces of the loop handed to the frame processor.
/// A frame context borrowing only the loop's fields it needs (a method would borrow the whole
/// loop and block `&mut self.conns[tok]` next to it).
macro_rules! frame_ctx {
    ($lp:expr) => {
        Ctx {
            out: &mut $lp.out,
            stats: &mut $lp.stats,
            cfg: &$lp.cfg,
            shared: &$lp.shared,
            rng: &mut $lp.rng,
            now: $lp.now,
            window: $lp.window,
            send_until: $lp.send_until,
            key_seed: $lp.key_seed,
            first: $lp.first,
            opened: false,
            tokens: &mut $lp.tokens,
            tmp: &mut $lp.tmp,
            retry_scheduled: &mut $lp.retry_scheduled,
        }
    };
}

struct Ctx<'a> {
    out: &'a mut Vec<u8>,
    stats: &'a mut Stats,
    cfg: &'a Config,
    shared: &'a Shared,
    rng: &'a mut u64,
    now: u64,
    window: (u64, u64),
    send_until: u64,
    key_seed: u64,
    first: u64,
    opened: bool,
    /// Send mode: budget of new sends (infinite when unpaced), scratch for
    /// JSON payloads, and whether some resend is scheduled.
    tokens: &'a mut f64,
    tmp: &'a mut Vec<u8>,
    retry_scheduled: &'a mut bool,
}

fn xorshift(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    x
}

impl Ctx<'_> {
    fn mask(&mut self) -> [u8; 4] {
        (xorshift(self.rng) as u32).to_ne_bytes()
    }
}

/// Parse what `buf` holds for `conn`; returns how many bytes were consumed.
fn process(conn: &mut Conn, buf: &[u8], cx: &mut Ctx) -> Result<usize, Fail> {
    let mut pos = 0;
    if conn.phase == Phase::Handshake {
        match ws::parse_response(buf) {
            ws::ResponseParse::Incomplete => return Ok(0),
            ws::ResponseParse::Invalid(w) => return Err(Fail::BadResponse(w)),
            ws::ResponseParse::Done(resp) => {
                if resp.status != 101 {
                    return Err(Fail::Http(resp.status));
                }
                let key = ws::key_from_nonce(cx.key_seed.wrapping_add(cx.first + conn.idx as u64));
                ws::check_upgrade(&resp, &key).map_err(Fail::BadUpgrade)?;
                pos = resp.head_len;
                if cx.cfg.route == Route::Ws {
                    conn.phase = Phase::AwaitWelcome;
                } else {
                    conn.phase = Phase::Open;
                    cx.opened = true;
                }
            }
        }
    }
    while pos < buf.len() {
        let Some(h) = ws::parse_frame_head(&buf[pos..]) else {
            break;
        };
        ws::validate_server_frame(&h, MAX_SERVER_MESSAGE).map_err(Fail::Protocol)?;
        let total = h.head_len + h.payload_len as usize;
        if buf.len() - pos < total {
            break;
        }
        let payload = &buf[pos + h.head_len..pos + total];
        pos += total;
        on_frame(conn, &h, payload, cx)?;
    }
    // Send mode: one cumulative ack per read for the msgs it held.
    if let Some(Traffic::Chat(ch)) = conn.traffic.as_deref_mut() {
        if let Some(seq) = ch.ack_due() {
            cx.tmp.clear();
            chat::write_ack(cx.tmp, seq);
            let m = cx.mask();
            ws::encode_frame(cx.out, true, ws::OP_TEXT, cx.tmp, m);
            cx.stats.acks_sent += 1;
        }
    }
    Ok(pos)
}

fn on_frame(conn: &mut Conn, h: &ws::FrameHead, payload: &[u8], cx: &mut Ctx) -> Result<(), Fail> {
    match h.opcode {
        ws::OP_PING => {
            cx.stats.pings_received += 1;
            cx.shared.pings.fetch_add(1, Relaxed);
            let m = cx.mask();
            ws::encode_frame(cx.out, true, ws::OP_PONG, payload, m);
            cx.stats.pongs_sent += 1;
        }
        ws::OP_PONG => cx.stats.pongs_received += 1,
        ws::OP_CLOSE => {
            let code = ws::close_code(payload);
            *cx.stats.closes.entry(code).or_default() += 1;
            let m = cx.mask();
            ws::encode_close(cx.out, (payload.len() >= 2).then_some(code), m);
            return Err(Fail::PeerClose(code));
        }
        ws::OP_TEXT | ws::OP_BINARY => {
            if conn.frag_op != 0 {
                return Err(Fail::Protocol("expected_continuation"));
            }
            if h.fin {
                deliver(conn, h.opcode, payload, cx)?;
            } else {
                conn.frag_op = h.opcode;
                let e = conn.ext_mut();
                e.frag.clear();
                e.frag.extend_from_slice(payload);
            }
        }
        ws::OP_CONT => {
            if conn.frag_op == 0 {
                return Err(Fail::Protocol("unexpected_continuation"));
            }
            let e = conn.ext_mut();
            e.frag.extend_from_slice(payload);
            if e.frag.len() as u64 > MAX_SERVER_MESSAGE {
                return Err(Fail::Protocol("message_too_large"));
            }
            if h.fin {
                let msg = std::mem::take(&mut e.frag);
                let op = conn.frag_op;
                conn.frag_op = 0;
                cx.stats.fragmented_messages += 1;
                deliver(conn, op, &msg, cx)?;
            }
        }
        _ => return Err(Fail::Protocol("reserved_opcode")),
    }
    Ok(())
}

/// A complete data message arrived.
fn deliver(conn: &mut Conn, op: u8, msg: &[u8], cx: &mut Ctx) -> Result<(), Fail> {
    match conn.phase {
        Phase::AwaitWelcome => {
            if op == ws::OP_TEXT {
                if let Ok(m) = serde_json::from_slice::<Msg>(msg) {
                    if m.op == "welcome" {
                        if cx.stats.welcome.is_none() {
                            cx.stats.welcome = Some(WelcomeInfo {
                                heartbeat_ms: m.heartbeat_ms,
                                max_frame: m.max_frame,
                            });
                        }
                        if let Some(u) = m.user {
                            if u != cx.cfg.user_id(cx.first + conn.idx as u64) {
                                cx.stats.welcome_user_mismatch += 1;
                            }
                        }
                        conn.phase = Phase::Open;
                        cx.opened = true;
                        if let Mode::Send { inflight, .. } = cx.cfg.mode {
                            conn.traffic = Some(Box::new(Traffic::Chat(ChatConn::new(inflight))));
                        }
                        if let Mode::Fanout { join } = &cx.cfg.mode {
                            conn.traffic = Some(Box::new(Traffic::Room { last: 0 }));
                            let m = cx.mask();
                            ws::encode_frame(cx.out, true, ws::OP_TEXT, join, m);
                        }
                        return Ok(());
                    }
                }
            }
            cx.stats.messages_before_welcome += 1;
            Ok(())
        }
        Phase::Open => match &cx.cfg.mode {
            Mode::Idle => {
                cx.stats.messages += 1;
                let parsed = (op == ws::OP_TEXT)
                    .then(|| serde_json::from_slice::<Msg>(msg).ok())
                    .flatten();
                // As a client would: ack every replayed message (the replay goes on past
                // the window only then), and note when the replay is over.
                match parsed.as_ref().map(|m| (m.op.as_str(), m.seq)) {
                    Some(("msg", Some(seq))) => {
                        cx.tmp.clear();
                        chat::write_ack(cx.tmp, seq);
                        let m = cx.mask();
                        ws::encode_frame(cx.out, true, ws::OP_TEXT, cx.tmp, m);
                        cx.stats.acks_sent += 1;
                    }
                    Some(("synced", _)) => {
                        cx.shared.synced.fetch_add(1, Relaxed);
                        cx.shared.last_synced_ns.fetch_max(cx.now, Relaxed);
                    }
                    _ => {}
                }
                let op_name = match (op == ws::OP_TEXT, parsed) {
                    (true, Some(m)) => m.op,
                    (true, None) => "text".into(),
                    (false, _) => "binary".into(),
                };
                *cx.stats.messages_by_op.entry(op_name).or_default() += 1;
                Ok(())
            }
            Mode::Echo {
                payload,
                opcode,
                expect_pong,
                ..
            } => {
                if *expect_pong {
                    let is_pong = op == ws::OP_TEXT
                        && (msg == b"{\"op\":\"pong\"}"
                            || serde_json::from_slice::<Msg>(msg).is_ok_and(|m| m.op == "pong"));
                    if !is_pong {
                        cx.stats.other_messages += 1;
                        return Ok(());
                    }
                } else if op != *opcode || msg != payload.as_slice() {
                    cx.stats.bad_replies += 1;
                }
                let now = cx.now;
                let Some(Traffic::Echo(ring)) = conn.traffic.as_deref_mut() else {
                    cx.stats.unexpected_replies += 1;
                    return Ok(());
                };
                let Some(sent_at) = ring.pop() else {
                    cx.stats.unexpected_replies += 1;
                    return Ok(());
                };
                cx.stats.replies_total += 1;
                if now >= cx.window.0 && now < cx.window.1 {
                    cx.stats.replies_in_window += 1;
                    if let Some(h) = cx.stats.latency_ns.as_mut() {
                        h.saturating_record(now.saturating_sub(sent_at).max(1));
                    }
                }
                if now < cx.send_until && ring.push(now) {
                    let m = cx.mask();
                    ws::encode_frame(cx.out, true, *opcode, payload, m);
                    cx.stats.sent += 1;
                }
                Ok(())
            }
            Mode::Send { .. } => on_chat_message(conn, op, msg, cx),
            Mode::Fanout { .. } => on_room_message(conn, op, msg, cx),
        },
        Phase::Connecting | Phase::Handshake => Ok(()),
    }
}

/// Send mode: keep a connection's counter sets for the end-of-run check.
fn save_chat(stats: &mut Stats, shared: &Shared, first: u64, conn: &mut Conn) {
    if let Some(Traffic::Chat(ch)) = conn.traffic.as_deref_mut() {
        let gidx = first + conn.idx as u64;
        let pending = ch.pending.len() as u64;
        shared.chat_outstanding.fetch_sub(pending, Relaxed);
        stats.chat_sets.push((
            gidx,
            std::mem::take(&mut ch.accepted),
            std::mem::take(&mut ch.received),
            pending,
        ));
        conn.traffic = None;
    }
}

/// Encode one `send` (new or again after `unavailable`) into `out`.
#[allow(clippy::too_many_arguments)]
fn encode_send(
    out: &mut Vec<u8>,
    tmp: &mut Vec<u8>,
    prefix: &[u8],
    to_num: u64,
    nonce: u64,
    ctr: u64,
    sent_ns: u64,
    mask: [u8; 4],
) {
    tmp.clear();
    chat::write_send(
        tmp,
        prefix,
        to_num,
        chat::encode_cid(nonce, ctr),
        sent_ns / 1000,
    );
    ws::encode_frame(out, true, ws::OP_TEXT, tmp, mask);
}

/// Start new sends on a connection while its window, the pacing budget and
/// the send period allow.
fn chat_fill(ch: &mut ChatConn, gidx: u64, cx: &mut Ctx) {
    let Mode::Send {
        nonce,
        ref to_prefix_json,
        ..
    } = cx.cfg.mode
    else {
        return;
    };
    let to_num = cx.cfg.user_offset + (gidx ^ 1);
    while cx.now < cx.send_until && ch.has_room() && *cx.tokens >= 1.0 {
        *cx.tokens -= 1.0;
        let ctr = ch.start(cx.now);
        let m = cx.mask();
        encode_send(
            cx.out,
            cx.tmp,
            to_prefix_json,
            to_num,
            nonce,
            ctr,
            cx.now,
            m,
        );
        cx.stats.sent += 1;
        if cx.now >= cx.window.0 {
            cx.stats.sent_in_window += 1;
        }
        cx.shared.chat_sent.fetch_add(1, Relaxed);
        cx.shared.chat_outstanding.fetch_add(1, Relaxed);
    }
}

fn bump(m: &mut BTreeMap<String, u64>, k: &str) {
    match m.get_mut(k) {
        Some(v) => *v += 1,
        None => {
            m.insert(k.to_string(), 1);
        }
    }
}

/// A data message on an open connection in send mode.
fn on_chat_message(conn: &mut Conn, op: u8, msg: &[u8], cx: &mut Ctx) -> Result<(), Fail> {
    let Mode::Send { nonce, .. } = cx.cfg.mode else {
        return Ok(());
    };
    cx.stats.messages += 1;
    let gidx = cx.first + conn.idx as u64;
    let Some(Traffic::Chat(ch)) = conn.traffic.as_deref_mut() else {
        cx.stats.other_messages += 1;
        return Ok(());
    };
    let f = if op == ws::OP_TEXT {
        chat::parse_frame(msg)
    } else {
        None
    };
    let Some(f) = f else {
        cx.stats.unparsed += 1;
        bump(&mut cx.stats.messages_by_op, "unparsed");
        return Ok(());
    };
    let op_name = f.op.as_deref().unwrap_or("none");
    bump(&mut cx.stats.messages_by_op, op_name);
    let now = cx.now;
    let in_window = now >= cx.window.0 && now < cx.window.1;
    let ctr = f.cid.and_then(|c| chat::decode_cid(nonce, c));
    match op_name {
        "accepted" => match ctr.and_then(|k| ch.accept(k)) {
            Some(sent_ns) => {
                cx.stats.accepted_total += 1;
                cx.shared.chat_accepted.fetch_add(1, Relaxed);
                cx.shared.chat_outstanding.fetch_sub(1, Relaxed);
                if in_window {
                    cx.stats.accepted_in_window += 1;
                    if let Some(h) = cx.stats.latency_ns.as_mut() {
                        h.saturating_record(now.saturating_sub(sent_ns).max(1));
                    }
                }
                chat_fill(ch, gidx, cx);
            }
            None => cx.stats.unexpected_accepted += 1,
        },
        "delivered" => {
            if ctr.is_some() {
                cx.stats.delivered_total += 1;
                if in_window {
                    cx.stats.delivered_in_window += 1;
                }
            } else {
                cx.stats.unexpected_delivered += 1;
            }
        }
        "msg" => {
            if let Some(seq) = f.seq {
                ch.saw_seq(seq);
            }
            let partner = cx.cfg.user_offset + (gidx ^ 1);
            let ours = f
                .from
                .as_deref()
                .is_some_and(|from| chat::from_matches(from, &cx.cfg.user_prefix, partner));
            match ctr.filter(|_| ours) {
                Some(k) if ch.received.insert(k) => {
                    cx.stats.msgs_total += 1;
                    if let (Mode::Send { read_every, .. }, Some(id)) = (&cx.cfg.mode, &f.id) {
                        if *read_every > 0 && cx.stats.msgs_total.is_multiple_of(*read_every) {
                            cx.tmp.clear();
                            let prefix = chat::json_prefix(&cx.cfg.user_prefix);
                            chat::write_read(cx.tmp, &prefix, partner, id);
                            let m = cx.mask();
                            ws::encode_frame(cx.out, true, ws::OP_TEXT, cx.tmp, m);
                            cx.stats.reads_sent += 1;
                        }
                    }
                    cx.shared.chat_received.fetch_add(1, Relaxed);
                    if in_window {
                        cx.stats.msgs_in_window += 1;
                        match f.body {
                            Some(t_us) => {
                                if let Some(h) = cx.stats.msg_latency_ns.as_mut() {
                                    h.saturating_record(now.saturating_sub(t_us * 1000).max(1));
                                }
                            }
                            None => cx.stats.msgs_without_t += 1,
                        }
                    }
                }
                Some(_) => cx.stats.duplicates += 1,
                // Left over from another run (replayed at connect) or not from the partner.
                None => cx.stats.foreign_msgs += 1,
            }
        }
        "read" => {
            if let Some(seq) = f.seq {
                ch.saw_seq(seq);
            }
            cx.stats.reads_total += 1;
            if in_window {
                cx.stats.reads_in_window += 1;
            }
        }
        "error" => {
            let code = f.code.as_deref().unwrap_or("none");
            bump(&mut cx.stats.errors_by_code, code);
            if let Some(k) = ctr {
                if code == "unavailable" {
                    if ch.schedule_retry(k, now + chat::RETRY_DELAY_NS) {
                        *cx.retry_scheduled = true;
                    }
                } else if ch.abandon(k) {
                    // Not retryable: give the window slot back.
                    cx.stats.abandoned += 1;
                    cx.shared.chat_outstanding.fetch_sub(1, Relaxed);
                    chat_fill(ch, gidx, cx);
                }
            }
        }
        _ => cx.stats.other_messages += 1,
    }
    Ok(())
}

/// What a member reads of a frame: borrowed and skipped where it can (every member parses
/// every delivery on the CPUs the gateway runs on, so this is part of what `fanout` measures).
#[derive(Deserialize)]
struct RoomFrame<'a> {
    #[serde(borrow)]
    op: std::borrow::Cow<'a, str>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    from: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    body: Option<RoomBody>,
}

#[derive(Deserialize)]
struct RoomBody {
    t: u64,
}

/// The offset and the body's `t` of a room frame as ringgate writes it (`proto::write_room`:
/// `{"op":"room","room":"..","offset":N,` first, the body last) with a body whose last key is
/// `t` (the publisher's `{"pad":..,"t":N}`), found without a JSON parser; None for any other
/// shape, which serde reads. A member reads every delivery on the CPUs the gateway runs on,
/// and serde was a fifth of the generator's CPU per delivery (`perf`, 2026-12-07).
fn scan_room_frame(msg: &[u8]) -> Option<(u64, u64)> {
    let rest = msg.strip_prefix(b"{\"op\":\"room\",\"room\":\"")?;
    let quote = rest.iter().position(|&b| b == b'"')?;
    if rest[..quote].contains(&b'\\') {
        return None;
    }
    let rest = rest[quote + 1..].strip_prefix(b",\"offset\":")?;
    let (offset, _) = leading_u64(rest)?;
    // In valid JSON an unescaped `"` is never inside a string, so the last `,"t":` followed
    // by digits and the two closing braces is the body's own last key.
    let key = b",\"t\":";
    let at = msg.windows(key.len()).rposition(|w| w == key)?;
    let (t, tail) = leading_u64(&msg[at + key.len()..])?;
    (tail == b"}}").then_some((offset, t))
}

/// The decimal number at the start of `bytes`, and what follows it.
fn leading_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let value = bytes[..digits].iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })?;
    Some((value, &bytes[digits..]))
}

/// A data message on an open connection in fanout mode.
fn on_room_message(conn: &mut Conn, op: u8, msg: &[u8], cx: &mut Ctx) -> Result<(), Fail> {
    cx.stats.messages += 1;
    if op == ws::OP_TEXT {
        if let Some((offset, t)) = scan_room_frame(msg) {
            bump(&mut cx.stats.messages_by_op, "room");
            return on_room_delivery(conn, msg, offset, t, cx);
        }
    }
    let f = (op == ws::OP_TEXT)
        .then(|| serde_json::from_slice::<RoomFrame>(msg).ok())
        .flatten();
    let Some(f) = f else {
        cx.stats.unparsed += 1;
        return Ok(());
    };
    bump(&mut cx.stats.messages_by_op, &f.op);
    let Some(Traffic::Room { last }) = conn.traffic.as_deref_mut() else {
        return Ok(());
    };
    match (f.op.as_ref(), f.offset, f.body) {
        ("joined", Some(offset), _) => {
            *last = offset;
            cx.shared.room_joined.fetch_add(1, Relaxed);
        }
        ("room", Some(offset), Some(body)) => {
            return on_room_delivery(conn, msg, offset, body.t, cx)
        }
        ("gap", _, _) => {
            cx.stats.room_gaps += 1;
            // The skipped offsets are announced, not holes: do not count the next jump.
            let _ = f.from;
            *last = 0;
        }
        _ => cx.stats.other_messages += 1,
    }
    Ok(())
}

/// A room message at `offset` whose body was stamped `t`: checked against the member's last
/// offset (duplicates, holes) and its latency recorded.
fn on_room_delivery(
    conn: &mut Conn,
    msg: &[u8],
    offset: u64,
    t: u64,
    cx: &mut Ctx,
) -> Result<(), Fail> {
    let Some(Traffic::Room { last }) = conn.traffic.as_deref_mut() else {
        return Ok(());
    };
    if offset <= *last {
        cx.stats.room_duplicates += 1;
        return Ok(());
    }
    if *last != 0 && offset > *last + 1 {
        cx.stats.room_holes += offset - *last - 1;
    }
    *last = offset;
    let latency = (cx.cfg.base_mono_ns + cx.now).saturating_sub(t).max(1);
    cx.stats.room_msgs += 1;
    cx.stats.room_wire_bytes += ws::server_frame_len(msg.len()) as u64;
    cx.shared.room_received.fetch_add(1, Relaxed);
    if let Some(h) = cx.stats.latency_ns.as_mut() {
        h.saturating_record(latency);
    }
    let e = cx.stats.room_by_offset.entry(offset).or_default();
    e.0 += 1;
    e.1 = e.1.max(latency);
    Ok(())
}

/// Write `data`, keeping whatever the socket does not take.
fn write_or_buffer(conn: &mut Conn, data: &[u8]) -> Result<(), Fail> {
    if conn.has_unsent() {
        conn.ext_mut().wbuf.extend_from_slice(data);
        return Ok(());
    }
    let mut off = 0;
    while off < data.len() {
        match (&conn.sock).write(&data[off..]) {
            Ok(0) => return Err(Fail::Io("write", io::ErrorKind::WriteZero.into())),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let e = conn.ext_mut();
                e.wbuf.clear();
                e.wpos = 0;
                e.wbuf.extend_from_slice(&data[off..]);
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Fail::Io("write", e)),
        }
    }
    Ok(())
}

fn flush_unsent(conn: &mut Conn) -> Result<(), Fail> {
    let Some(e) = conn.ext.as_mut() else {
        return Ok(());
    };
    while e.wpos < e.wbuf.len() {
        match (&conn.sock).write(&e.wbuf[e.wpos..]) {
            Ok(0) => return Err(Fail::Io("write", io::ErrorKind::WriteZero.into())),
            Ok(n) => e.wpos += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(Fail::Io("write", err)),
        }
    }
    e.wbuf.clear();
    e.wpos = 0;
    conn.gc();
    Ok(())
}

pub struct Loop {
    cfg: std::sync::Arc<Config>,
    shared: std::sync::Arc<Shared>,
    /// Global index of this loop's first connection.
    first: u64,
    count: usize,
    concurrency: usize,
    /// New connections per second for this loop, 0 = unpaced.
    rate: f64,
    poll: Poll,
    events: Option<Events>,
    conns: Slab<Conn>,
    /// Tokens of connections not yet established (bounded by concurrency).
    pending: Vec<u32>,
    next: usize,
    scratch: Box<[u8]>,
    out: Vec<u8>,
    rng: u64,
    key_seed: u64,
    now: u64,
    last_scan: u64,
    window: (u64, u64),
    send_until: u64,
    tokens: f64,
    tmp: Vec<u8>,
    retry_scheduled: bool,
    pub stats: Stats,
}

impl Loop {
    pub fn new(
        cfg: std::sync::Arc<Config>,
        shared: std::sync::Arc<Shared>,
        first: u64,
        count: usize,
        concurrency: usize,
        rate: f64,
    ) -> io::Result<Loop> {
        let seed = ws::splitmix64(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                ^ first.rotate_left(32),
        ) | 1;
        Ok(Loop {
            poll: Poll::new()?,
            events: Some(Events::with_capacity(1024)),
            conns: Slab::with_capacity(count),
            pending: Vec::with_capacity(concurrency.min(count)),
            next: 0,
            scratch: vec![0u8; SCRATCH].into_boxed_slice(),
            out: Vec::with_capacity(SCRATCH),
            rng: seed,
            key_seed: ws::splitmix64(seed),
            now: 0,
            last_scan: 0,
            window: (0, 0),
            send_until: 0,
            tokens: f64::INFINITY,
            tmp: Vec::with_capacity(256),
            retry_scheduled: false,
            stats: Stats::new(&cfg.mode),
            cfg,
            shared,
            first,
            count,
            concurrency: concurrency.max(1),
            rate,
        })
    }

    /// Touch the loop's fixed buffers and warm this thread's allocator on
    /// the allocation sizes a handshake uses, so that a memory baseline taken
    /// afterwards leaves only per-connection memory in the RSS delta.
    pub fn prefault(&mut self) {
        self.scratch.fill(0);
        self.out.resize(self.out.capacity(), 0);
        self.out.clear();
        self.stats.handshake_us.reset();
        if let Some(h) = self.stats.latency_ns.as_mut() {
            h.reset();
        }
        if let Some(h) = self.stats.msg_latency_ns.as_mut() {
            h.reset();
        }
        for i in 0..64u64 {
            let t = self.cfg.request_target(self.first + i);
            let key = ws::key_from_nonce(i);
            ws::write_request(&mut self.out, &self.cfg.host, &t, &key);
            let _ = serde_json::from_slice::<Msg>(
                br#"{"op":"welcome","v":1,"user":"u1","conn":"c1","heartbeat_ms":1,"max_frame":1}"#,
            );
            let _ = ws::accept_for_key(&key);
            let _ = Box::new(Ext::default());
            self.out.clear();
        }
    }

    fn now_ns(&self) -> u64 {
        self.cfg.base.elapsed().as_nanos() as u64
    }

    fn stop_requested(&self) -> bool {
        self.shared.stop.load(Relaxed) || INTERRUPTED.load(Relaxed)
    }

    fn start_conn(&mut self) {
        let idx = self.next;
        self.next += 1;
        self.stats.started += 1;
        let gidx = self.first + idx as u64;
        let src = (!self.cfg.sources.is_empty())
            .then(|| self.cfg.sources[(gidx % self.cfg.sources.len() as u64) as usize]);
        self.now = self.now_ns();
        let target = match self.cfg.odd_target {
            Some(odd) if gidx % 2 == 1 => odd,
            _ => self.cfg.target,
        };
        let mut sock = match net::connect_nonblocking(target, src, self.cfg.nodelay) {
            Ok(s) => s,
            Err((step, e)) => {
                self.count_failure(format!("{step}:{}", net::errno_name(&e)));
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        let tok = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(tok),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.count_failure(format!("register:{}", net::errno_name(&e)));
            return;
        }
        entry.insert(Conn {
            sock,
            phase: Phase::Connecting,
            frag_op: 0,
            pidx: self.pending.len() as u32,
            idx: idx as u32,
            t_start: self.now,
            ext: None,
            traffic: None,
        });
        self.pending.push(tok as u32);
    }

    fn count_failure(&mut self, why: String) {
        self.stats.failed += 1;
        self.shared.failed.fetch_add(1, Relaxed);
        *self.stats.failures.entry(why).or_default() += 1;
    }

    fn remove_pending(&mut self, pidx: u32) {
        if pidx == NO_PENDING {
            return;
        }
        let i = pidx as usize;
        self.pending.swap_remove(i);
        if let Some(&moved) = self.pending.get(i) {
            self.conns[moved as usize].pidx = i as u32;
        }
    }

    fn drop_conn(&mut self, tok: usize, f: Fail) {
        let mut conn = self.conns.remove(tok);
        self.save_chat(&mut conn);
        let why = reason(&f, conn.phase);
        self.remove_pending(conn.pidx);
        if conn.phase == Phase::Open {
            self.stats.lost += 1;
            self.shared.lost.fetch_add(1, Relaxed);
            *self.stats.lost_reasons.entry(why).or_default() += 1;
        } else {
            self.count_failure(why);
        }
        // Dropping the stream closes the fd, which also removes it from epoll.
    }

    fn on_opened(&mut self, tok: usize) {
        let now = self.now;
        let conn = &mut self.conns[tok];
        let pidx = std::mem::replace(&mut conn.pidx, NO_PENDING);
        let took_us = now.saturating_sub(conn.t_start) / 1000;
        if let Mode::Echo { inflight, .. } = self.cfg.mode {
            conn.traffic = Some(Box::new(Traffic::Echo(LatRing::new(inflight))));
        }
        conn.gc();
        self.remove_pending(pidx);
        self.stats.established += 1;
        self.shared.established.fetch_add(1, Relaxed);
        self.stats.handshake_us.saturating_record(took_us.max(1));
    }

    fn flush_out(&mut self, tok: usize) -> Result<(), Fail> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = write_or_buffer(&mut self.conns[tok], &self.out);
        self.out.clear();
        r
    }

    /// Feed `scratch[..n]` (after any buffered bytes) to the connection.
    fn ingest(&mut self, tok: usize, n: usize) -> Result<(), Fail> {
        let conn = &mut self.conns[tok];
        let mut cx = frame_ctx!(self);
        let buffered = conn.ext.as_ref().is_some_and(|e| !e.rbuf.is_empty());
        let res = if !buffered {
            let data = &self.scratch[..n];
            process(conn, data, &mut cx).map(|used| {
                if used < n {
                    conn.ext_mut().rbuf.extend_from_slice(&data[used..]);
                }
            })
        } else {
            let mut rb = std::mem::take(&mut conn.ext_mut().rbuf);
            rb.extend_from_slice(&self.scratch[..n]);
            process(conn, &rb, &mut cx).map(|used| {
                rb.drain(..used);
                conn.ext_mut().rbuf = rb;
            })
        };
        // Even when a later frame in the same read failed (e.g. a close right
        // after the welcome), the connection did get established first.
        let opened = cx.opened;
        conn.gc();
        if opened {
            self.on_opened(tok);
        }
        res
    }

    fn read_all(&mut self, tok: usize, ev_closed: bool) -> Result<(), Fail> {
        loop {
            let conn = &mut self.conns[tok];
            let n = match (&conn.sock).read(&mut self.scratch) {
                Ok(0) => return Err(Fail::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Io("read", e)),
            };
            self.now = self.now_ns();
            self.ingest(tok, n)?;
            self.flush_out(tok)?;
            // A short read drained the socket: later data raises a new edge,
            // so skip the extra read() that would only return EAGAIN. Not when
            // the peer half-closed, since the FIN raises no further edge.
            if n < self.scratch.len() && !ev_closed {
                return Ok(());
            }
        }
    }

    fn connect_result(sock: &TcpStream) -> Result<bool, io::Error> {
        match sock.take_error() {
            Ok(Some(e)) | Err(e) => return Err(e),
            Ok(None) => {}
        }
        match sock.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn on_event(&mut self, ev: &Event) {
        let tok = ev.token().0;
        let Some(conn) = self.conns.get_mut(tok) else {
            return;
        };
        let closed = ev.is_read_closed() || ev.is_error();
        if conn.phase == Phase::Connecting {
            match Self::connect_result(&conn.sock) {
                Ok(false) => return,
                Err(e) => return self.drop_conn(tok, Fail::Io("connect", e)),
                Ok(true) => {}
            }
            conn.phase = Phase::Handshake;
            let gidx = self.first + conn.idx as u64;
            let key = ws::key_from_nonce(self.key_seed.wrapping_add(gidx));
            let target = self.cfg.request_target(gidx);
            ws::write_request(&mut self.out, &self.cfg.host, &target, &key);
            if let Err(f) = self.flush_out(tok) {
                return self.drop_conn(tok, f);
            }
        } else if ev.is_writable() {
            if let Err(f) = flush_unsent(&mut self.conns[tok]) {
                return self.drop_conn(tok, f);
            }
        }
        if ev.is_readable() || closed {
            if let Err(f) = self.read_all(tok, closed) {
                // Best effort: deliver a queued close reply before closing.
                if !self.out.is_empty() {
                    let _ = write_or_buffer(&mut self.conns[tok], &self.out);
                    self.out.clear();
                }
                self.drop_conn(tok, f);
            }
        }
    }

    fn poll_once(&mut self, timeout: Duration) {
        let mut events = self.events.take().expect("events");
        if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                panic!("epoll_wait failed: {e}");
            }
        }
        self.now = self.now_ns();
        for ev in events.iter() {
            self.on_event(ev);
        }
        self.events = Some(events);
    }

    fn scan_timeouts(&mut self) {
        let limit = self.cfg.handshake_timeout.as_nanos() as u64;
        let mut i = 0;
        while i < self.pending.len() {
            let tok = self.pending[i] as usize;
            if self.now.saturating_sub(self.conns[tok].t_start) >= limit {
                self.drop_conn(tok, Fail::Timeout); // swap_remove refills slot i
            } else {
                i += 1;
            }
        }
    }

    /// Open this loop's connections (paced by rate and concurrency) until all
    /// are established or failed, or `deadline` (ns since base) passes.
    pub fn ramp(&mut self, deadline: u64) {
        let start = self.now_ns();
        self.now = start;
        self.last_scan = start;
        // Pacing: one start per interval; a late wake-up may catch up on at
        // most PACING_SLACK worth of starts, so no second sees a big burst.
        let interval = if self.rate > 0.0 {
            1e9 / self.rate
        } else {
            0.0
        };
        let mut next_due = start as f64;
        loop {
            if self.now < deadline && !self.stop_requested() {
                while self.next < self.count && self.pending.len() < self.concurrency {
                    if self.rate > 0.0 {
                        if (self.now as f64) < next_due {
                            break;
                        }
                        next_due =
                            (next_due + interval).max(self.now.saturating_sub(PACING_SLACK) as f64);
                    }
                    self.start_conn();
                }
            }
            if self.next >= self.count && self.pending.is_empty() {
                break;
            }
            if self.now >= deadline || self.stop_requested() {
                while let Some(&tok) = self.pending.last() {
                    let f = if INTERRUPTED.load(Relaxed) {
                        Fail::Interrupted
                    } else {
                        Fail::Deadline
                    };
                    self.drop_conn(tok as usize, f);
                }
                self.stats.not_started += (self.count - self.next) as u64;
                self.next = self.count;
                break;
            }
            let mut wait = 50 * MS;
            if self.rate > 0.0 && self.next < self.count && self.pending.len() < self.concurrency {
                wait = wait.min((next_due as u64).saturating_sub(self.now));
            }
            wait = wait.min(deadline.saturating_sub(self.now));
            self.poll_once(Duration::from_nanos(wait));
            if self.now.saturating_sub(self.last_scan) >= 100 * MS {
                self.last_scan = self.now;
                self.scan_timeouts();
            }
        }
        self.stats.ramp_end_ns = self.now_ns();
    }

    /// Keep answering pings until the main thread says stop or `deadline`.
    pub fn serve(&mut self, deadline: u64) {
        loop {
            self.now = self.now_ns();
            if self.stop_requested() || self.now >= deadline {
                break;
            }
            self.poll_once(Duration::from_nanos((100 * MS).min(deadline - self.now)));
        }
    }

    /// Echo: send `inflight` messages on every open connection at `t0`, then
    /// keep the pipe full until `window_end`; only replies received inside
    /// [window_start, window_end) are counted.
    pub fn run_echo(&mut self, t0: u64, window_start: u64, window_end: u64) {
        self.window = (window_start, window_end);
        self.send_until = window_end;
        let now = self.now_ns();
        if t0 > now {
            std::thread::sleep(Duration::from_nanos(t0 - now));
        }
        let cfg = self.cfg.clone();
        let Mode::Echo {
            ref payload,
            opcode,
            inflight,
            ..
        } = cfg.mode
        else {
            return;
        };
        let toks: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
        self.now = self.now_ns();
        for tok in toks {
            let conn = &mut self.conns[tok];
            let Some(Traffic::Echo(ring)) = conn.traffic.as_deref_mut() else {
                continue;
            };
            for _ in 0..inflight {
                if !ring.push(self.now) {
                    break;
                }
                let m = (xorshift(&mut self.rng) as u32).to_ne_bytes();
                ws::encode_frame(&mut self.out, true, opcode, payload, m);
                self.stats.sent += 1;
            }
            if let Err(f) = self.flush_out(tok) {
                self.drop_conn(tok, f);
            }
        }
        loop {
            self.now = self.now_ns();
            if self.now >= window_end || INTERRUPTED.load(Relaxed) {
                break;
            }
            self.poll_once(Duration::from_nanos((100 * MS).min(window_end - self.now)));
        }
    }

    fn save_chat(&mut self, conn: &mut Conn) {
        save_chat(&mut self.stats, &self.shared, self.first, conn);
    }

    /// Run `f` on connection `tok`'s send state with a frame context, then
    /// flush what it queued.
    fn with_chat(&mut self, tok: usize, f: impl FnOnce(&mut ChatConn, u64, &mut Ctx)) {
        let Some(conn) = self.conns.get_mut(tok) else {
            return;
        };
        let gidx = self.first + conn.idx as u64;
        let Some(Traffic::Chat(ch)) = conn.traffic.as_deref_mut() else {
            return;
        };
        let mut cx = frame_ctx!(self);
        f(ch, gidx, &mut cx);
        if let Err(e) = self.flush_out(tok) {
            self.drop_conn(tok, e);
        }
    }

    /// Send due resends (same cid, after `unavailable`).
    fn resend_due(&mut self, toks: &[usize]) {
        let mut any_left = false;
        let mut due = Vec::new();
        for &tok in toks {
            self.with_chat(tok, |ch, gidx, cx| {
                due.clear();
                ch.take_due(cx.now, &mut due);
                let Mode::Send {
                    nonce,
                    ref to_prefix_json,
                    ..
                } = cx.cfg.mode
                else {
                    return;
                };
                let to_num = cx.cfg.user_offset + (gidx ^ 1);
                for p in &due {
                    let m = cx.mask();
                    encode_send(
                        cx.out,
                        cx.tmp,
                        to_prefix_json,
                        to_num,
                        nonce,
                        p.ctr,
                        p.sent_ns,
                        m,
                    );
                    cx.stats.resent += 1;
                }
                any_left |= ch.retries_scheduled();
            });
        }
        self.retry_scheduled = any_left;
    }

    /// Send mode: from `t0`, every connection sends to its partner (at most
    /// `inflight` without `accepted`, paced to `rate` per second for this
    /// loop when above 0) until `window_end`; then keeps reading and acking
    /// until the main thread sets `stop` (end of the grace period) or
    /// `deadline`.
    pub fn run_send(
        &mut self,
        t0: u64,
        window_start: u64,
        window_end: u64,
        rate: f64,
        deadline: u64,
    ) {
        self.window = (window_start, window_end);
        self.send_until = window_end;
        let now = self.now_ns();
        if t0 > now {
            std::thread::sleep(Duration::from_nanos(t0 - now));
        }
        let toks: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
        self.now = self.now_ns();
        let paced = rate > 0.0;
        // At most 10 ms worth of sends (and at least one) may be caught up.
        let max_tokens = (rate * PACING_SLACK as f64 / 1e9).max(1.0);
        self.tokens = if paced { 0.0 } else { f64::INFINITY };
        if !paced {
            for &tok in &toks {
                self.with_chat(tok, chat_fill);
            }
        }
        let mut last_tick = self.now;
        let mut cursor = 0usize;
        let mut last_retry_scan = self.now;
        loop {
            self.now = self.now_ns();
            if self.stop_requested() || self.now >= deadline {
                break;
            }
            let sending = self.now < window_end;
            if paced && sending && !toks.is_empty() {
                self.tokens = (self.tokens
                    + self.now.saturating_sub(last_tick) as f64 * rate / 1e9)
                    .min(max_tokens);
                last_tick = self.now;
                // Hand the budget out round-robin to connections with room.
                let mut visited = 0;
                while self.tokens >= 1.0 && visited < toks.len() {
                    let tok = toks[cursor % toks.len()];
                    cursor = cursor.wrapping_add(1);
                    visited += 1;
                    self.with_chat(tok, |ch, gidx, cx| {
                        if ch.has_room() {
                            // One per visit, so the budget is spread evenly.
                            let saved = *cx.tokens;
                            *cx.tokens = 1.0;
                            chat_fill(ch, gidx, cx);
                            *cx.tokens = saved - (1.0 - *cx.tokens);
                        }
                    });
                }
            }
            if self.retry_scheduled && self.now.saturating_sub(last_retry_scan) >= 10 * MS {
                last_retry_scan = self.now;
                self.resend_due(&toks);
            }
            let mut wait = if paced && sending { MS } else { 100 * MS };
            if self.retry_scheduled {
                wait = wait.min(10 * MS);
            }
            if sending {
                wait = wait.min(window_end - self.now);
            }
            wait = wait.min(deadline - self.now).max(1);
            self.poll_once(Duration::from_nanos(wait));
        }
    }

    /// Send a close (1000) on every open connection and close them all.
    pub fn close_all(&mut self) {
        for (_, conn) in self.conns.iter_mut() {
            save_chat(&mut self.stats, &self.shared, self.first, conn);
        }
        let mut closed = 0;
        for (_, conn) in self.conns.iter_mut() {
            if conn.phase == Phase::Open && !conn.has_unsent() {
                let m = (xorshift(&mut self.rng) as u32).to_ne_bytes();
                self.out.clear();
                ws::encode_close(&mut self.out, Some(1000), m);
                let _ = (&conn.sock).write(&self.out);
                closed += 1;
            }
        }
        self.out.clear();
        self.stats.closed_by_us += closed;
        self.conns.clear();
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    //! The event loop against tiny scripted servers on 127.0.0.1 (no gateway needed).
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream as StdStream};
    use std::sync::Arc;

    /// The scanner reads what serde reads from a room frame as ringgate writes it, with the
    /// body the publisher sends; any other shape falls back to serde (None).
    #[test]
    fn a_room_frame_is_scanned_as_serde_reads_it() {
        let body = serde_json::json!({"t": 1_796_628_662_405_001u64, "pad": "xxxx"}).to_string();
        let mut frame = Vec::new();
        ringgate::proto::write_room(
            &mut frame,
            "bench-room",
            17,
            99,
            "api",
            "\"f1-2\"",
            5,
            &body,
        );
        let parsed: RoomFrame = serde_json::from_slice(&frame).unwrap();
        let serde_read = (parsed.offset.unwrap(), parsed.body.unwrap().t);
        assert_eq!(scan_room_frame(&frame), Some(serde_read));
        assert_eq!(serde_read, (17, 1_796_628_662_405_001));
        let shapes = [
            // `t` not the body's last key, or not its own key at all
            r#"{"op":"room","room":"r","offset":3,"id":"1","from":"a","cid":1,"ts":1,"body":{"t":5,"u":1}}"#,
            r#"{"op":"room","room":"r","offset":3,"id":"1","from":"a","cid":1,"ts":1,"body":{"x":{"a":1,"t":5}}}"#,
            // an escaped room name, another op, a number too long for u64
            r#"{"op":"room","room":"r\"","offset":3,"id":"1","from":"a","cid":1,"ts":1,"body":{"t":5}}"#,
            r#"{"op":"gap","room":"r","from":3}"#,
            r#"{"op":"room","room":"r","offset":3,"id":"1","from":"a","cid":1,"ts":1,"body":{"a":1,"t":99999999999999999999}}"#,
        ];
        for shape in shapes {
            assert_eq!(scan_room_frame(shape.as_bytes()), None, "{shape}");
        }
    }

    fn read_head(s: &mut StdStream) -> String {
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut b).unwrap(),
                1,
                "client closed before request end"
            );
            buf.push(b[0]);
        }
        String::from_utf8(buf).unwrap()
    }

    fn accept_header(req: &str) -> String {
        let key = req
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("key header");
        ws::accept_for_key(key.trim().as_bytes())
    }

    /// Read one client frame; returns (opcode, unmasked payload) and checks
    /// masking; None when the client went away first.
    fn try_read_client_frame(s: &mut StdStream) -> Option<(u8, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        loop {
            if let Some(h) = ws::parse_frame_head(&buf) {
                let total = h.head_len + h.payload_len as usize;
                while buf.len() < total {
                    if s.read(&mut b).ok()? != 1 {
                        return None;
                    }
                    buf.push(b[0]);
                }
                let mut p = buf[h.head_len..].to_vec();
                ws::apply_mask(&mut p, h.mask.expect("client frame must be masked"));
                return Some((h.opcode, p));
            }
            if s.read(&mut b).ok()? != 1 {
                return None;
            }
            buf.push(b[0]);
        }
    }

    fn read_client_frame(s: &mut StdStream) -> (u8, Vec<u8>) {
        try_read_client_frame(s).expect("client frame")
    }

    fn server_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut v = vec![((fin as u8) << 7) | op, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    fn config(addr: SocketAddr, route: Route, mode: Mode) -> Arc<Config> {
        Arc::new(Config {
            target: addr,
            odd_target: None,
            host: net::host_header(&addr),
            sources: Vec::new(),
            route,
            auth: Auth::Dev,
            user_prefix: "t".into(),
            user_offset: 7,
            device: Some("d 1".into()),
            handshake_timeout: Duration::from_secs(5),
            nodelay: true,
            mode,
            base: Instant::now(),
            base_mono_ns: 0,
        })
    }

    fn deadline(lp: &Loop, secs: u64) -> u64 {
        lp.now_ns() + secs * 1_000_000_000
    }

    #[test]
    fn ws_handshake_fragmented_welcome_ping_and_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let req = read_head(&mut s);
            assert!(
                req.starts_with("GET /ws?user=t7&device=d%201 HTTP/1.1\r\n"),
                "{req}"
            );
            assert!(req.contains("\r\nSec-WebSocket-Version: 13\r\n"));
            let welcome =
                br#"{"op":"welcome","v":1,"user":"t7","conn":"c1","heartbeat_ms":1234,"max_frame":65536}"#;
            let mut out = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                accept_header(&req)
            )
            .into_bytes();
            out.extend(server_frame(false, ws::OP_TEXT, &welcome[..20]));
            out.extend(server_frame(true, ws::OP_PING, b"abc"));
            let split = out.len() - 3;
            s.write_all(&out[..split]).unwrap(); // the head and a partial frame
            s.flush().unwrap();
            std::thread::sleep(Duration::from_millis(30));
            s.write_all(&out[split..]).unwrap();
            let mut rest = server_frame(true, ws::OP_CONT, &welcome[20..]);
            rest.extend(server_frame(
                true,
                ws::OP_TEXT,
                br#"{"op":"synced","count":0}"#,
            ));
            s.write_all(&rest).unwrap();
            assert_eq!(read_client_frame(&mut s), (ws::OP_PONG, b"abc".to_vec()));
            s.write_all(&server_frame(true, ws::OP_CLOSE, &1001u16.to_be_bytes()))
                .unwrap();
            let (op, p) = read_client_frame(&mut s);
            assert_eq!((op, ws::close_code(&p)), (ws::OP_CLOSE, 1001));
        });
        let shared = Arc::new(Shared::default());
        let cfg = config(addr, Route::Ws, Mode::Idle);
        let mut lp = Loop::new(cfg, shared.clone(), 0, 1, 10, 0.0).unwrap();
        let dl = deadline(&lp, 5);
        lp.ramp(dl);
        while lp.stats.lost == 0 && lp.now_ns() < dl {
            let d = lp.now_ns() + 20_000_000;
            lp.serve(d);
        }
        srv.join().unwrap();
        let st = &lp.stats;
        assert_eq!((st.established, st.failed, st.lost), (1, 0, 1));
        assert_eq!(shared.established.load(Relaxed), 1);
        assert_eq!((st.pings_received, st.pongs_sent), (1, 1));
        assert_eq!(st.fragmented_messages, 1);
        assert_eq!(st.welcome.unwrap().heartbeat_ms, Some(1234));
        assert_eq!(st.welcome_user_mismatch, 0);
        assert_eq!(st.messages_by_op.get("synced"), Some(&1));
        assert_eq!(st.closes.get(&1001), Some(&1));
        assert_eq!(st.lost_reasons.get("close_1001"), Some(&1));
        assert!(lp.pending.is_empty() && lp.conns.is_empty());
    }

    #[test]
    fn connection_state_stays_small() {
        // What an idle connection costs in user space besides the slab tag.
        // mio's TcpStream is the bare fd in release builds; debug builds add
        // a selector id to it.
        let limit = if cfg!(debug_assertions) { 56 } else { 40 };
        let size = std::mem::size_of::<Conn>();
        assert!(size <= limit, "Conn is {size} bytes");
    }

    #[test]
    fn rate_pacing_is_respected() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // Nobody accepts: connects complete in the backlog and wait for a
        // response that never comes; only the start times matter here.
        let shared = Arc::new(Shared::default());
        let cfg = Arc::new(Config {
            handshake_timeout: Duration::from_millis(300),
            ..Arc::try_unwrap(config(addr, Route::Ws, Mode::Idle))
                .ok()
                .unwrap()
        });
        let mut lp = Loop::new(cfg, shared, 0, 40, 1000, 100.0).unwrap();
        let t = Instant::now();
        let dl = deadline(&lp, 5);
        lp.ramp(dl);
        let took = t.elapsed().as_secs_f64();
        // 40 starts at 100/s take ~0.39 s, plus the 0.3 s handshake timeout.
        assert!(took > 0.6 && took < 2.0, "{took}");
        assert_eq!(lp.stats.failures.get("timeout:handshake"), Some(&40));
        drop(l);
    }

    #[test]
    fn http_status_and_bad_accept_are_failures() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            for i in 0..2 {
                let (mut s, _) = l.accept().unwrap();
                read_head(&mut s);
                let resp: &[u8] = if i == 0 {
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
                };
                s.write_all(resp).unwrap();
                // Keep the socket open until the client hangs up.
                let _ = s.read(&mut [0u8; 64]);
            }
        });
        let shared = Arc::new(Shared::default());
        let cfg = config(addr, Route::Ws, Mode::Idle);
        // concurrency 1: the server handles the two connections in order.
        let mut lp = Loop::new(cfg, shared, 0, 2, 1, 0.0).unwrap();
        let dl = deadline(&lp, 5);
        lp.ramp(dl);
        srv.join().unwrap();
        assert_eq!((lp.stats.established, lp.stats.failed), (0, 2));
        assert_eq!(lp.stats.failures.get("http:401"), Some(&1));
        assert_eq!(lp.stats.failures.get("bad_upgrade:bad_accept"), Some(&1));
    }

    #[test]
    fn echo_pipelined_latency_ring() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let req = read_head(&mut s);
            assert!(req.starts_with("GET /echo HTTP/1.1\r\n"));
            s.write_all(
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    accept_header(&req)
                )
                .as_bytes(),
            )
            .unwrap();
            let mut echoed = 0u64;
            loop {
                let Some((op, p)) = try_read_client_frame(&mut s) else {
                    return echoed;
                };
                if op == ws::OP_CLOSE {
                    return echoed;
                }
                // The client closes right after its close frame: a late
                // echo may hit a closed socket.
                if s.write_all(&server_frame(true, op, &p)).is_err() {
                    return echoed;
                }
                echoed += 1;
            }
        });
        let mode = Mode::Echo {
            payload: b"0123456789abcdef0123".to_vec(),
            opcode: ws::OP_TEXT,
            inflight: 3,
            expect_pong: false,
        };
        let shared = Arc::new(Shared::default());
        let cfg = config(addr, Route::Echo, mode);
        let mut lp = Loop::new(cfg, shared, 0, 1, 10, 0.0).unwrap();
        let dl = deadline(&lp, 5);
        lp.ramp(dl);
        assert_eq!(lp.stats.established, 1);
        let t0 = lp.now_ns();
        lp.run_echo(t0, t0 + 50_000_000, t0 + 250_000_000);
        lp.close_all();
        let echoed = srv.join().unwrap();
        let st = &lp.stats;
        assert_eq!((st.bad_replies, st.unexpected_replies, st.lost), (0, 0, 0));
        assert!(st.replies_in_window > 10, "{}", st.replies_in_window);
        assert!(
            st.replies_total > st.replies_in_window,
            "warmup replies excluded"
        );
        assert_eq!(st.latency_ns.as_ref().unwrap().len(), st.replies_in_window);
        // At most `inflight` messages were outstanding when the window closed.
        assert!(st.sent >= st.replies_total && st.sent - st.replies_total <= 3);
        assert!(echoed >= st.replies_total);
        assert_eq!(st.closed_by_us, 1);
    }

    #[test]
    fn send_mode_retry_ack_duplicates_and_missing() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let nonce = 5u64;
        let srv = std::thread::spawn(move || {
            let mut socks: Vec<Option<StdStream>> = vec![None, None];
            for _ in 0..2 {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let req = read_head(&mut s);
                let (i, user) = if req.contains("user=t7") {
                    (0, "t7")
                } else {
                    (1, "t8")
                };
                let mut out = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    accept_header(&req)
                )
                .into_bytes();
                out.extend(server_frame(
                    true,
                    ws::OP_TEXT,
                    format!(r#"{{"op":"welcome","user":"{user}"}}"#).as_bytes(),
                ));
                s.write_all(&out).unwrap();
                socks[i] = Some(s);
            }
            let (mut a, mut b) = (socks[0].take().unwrap(), socks[1].take().unwrap());
            let json = |p: &[u8]| serde_json::from_slice::<serde_json::Value>(p).unwrap();
            // t7's first send: unavailable; the resend (same cid) is accepted.
            let (_, p) = read_client_frame(&mut a);
            let v = json(&p);
            assert_eq!(
                (v["op"].as_str(), v["to"].as_str()),
                (Some("send"), Some("t8"))
            );
            let cid = v["cid"].as_u64().unwrap();
            let t = v["body"]["t"].as_u64().unwrap();
            a.write_all(&server_frame(
                true,
                ws::OP_TEXT,
                format!(r#"{{"op":"error","code":"unavailable","cid":{cid}}}"#).as_bytes(),
            ))
            .unwrap();
            let (_, p) = read_client_frame(&mut a);
            assert_eq!(json(&p)["cid"].as_u64(), Some(cid));
            a.write_all(&server_frame(
                true,
                ws::OP_TEXT,
                format!(r#"{{"op":"accepted","cid":{cid},"id":"1"}}"#).as_bytes(),
            ))
            .unwrap();
            // To t8: the msg, a foreign one, the same msg again.
            let m = |seq: u64| {
                format!(
                    r#"{{"op":"msg","seq":{seq},"id":"1","from":"t7","cid":{cid},"ts":1,"body":{{"t":{t}}}}}"#
                )
            };
            let mut out = server_frame(true, ws::OP_TEXT, m(1).as_bytes());
            out.extend(server_frame(
                true,
                ws::OP_TEXT,
                br#"{"op":"msg","seq":2,"from":"x","cid":"old","body":1}"#,
            ));
            out.extend(server_frame(true, ws::OP_TEXT, m(3).as_bytes()));
            b.write_all(&out).unwrap();
            // t8 sent its own message first (never answered), then acks.
            let mut acked = 0;
            while acked < 3 {
                let (op, p) = read_client_frame(&mut b);
                assert_eq!(op, ws::OP_TEXT);
                let v = json(&p);
                if v["op"] == "ack" {
                    acked = v["seq"].as_u64().unwrap();
                }
            }
            a.write_all(&server_frame(
                true,
                ws::OP_TEXT,
                format!(r#"{{"op":"delivered","cid":{cid},"id":"1","to":"t8"}}"#).as_bytes(),
            ))
            .unwrap();
            // Keep both open until the client closes.
            let _ = try_read_client_frame(&mut a);
            let _ = try_read_client_frame(&mut b);
        });
        let mode = Mode::Send {
            inflight: 1,
            nonce,
            to_prefix_json: chat::json_prefix("t"),
            read_every: 0,
        };
        let cfg = Arc::new(Config {
            device: None,
            ..Arc::try_unwrap(config(addr, Route::Ws, mode)).ok().unwrap()
        });
        let shared = Arc::new(Shared::default());
        let mut lp = Loop::new(cfg, shared.clone(), 0, 2, 10, 0.0).unwrap();
        let dl = deadline(&lp, 5);
        lp.ramp(dl);
        assert_eq!(lp.stats.established, 2);
        let t0 = lp.now_ns();
        lp.run_send(t0, t0, t0 + 400_000_000, 0.0, t0 + 600_000_000);
        lp.close_all();
        srv.join().unwrap();
        let st = &lp.stats;
        assert_eq!((st.sent, st.resent, st.accepted_total), (3, 1, 1));
        assert_eq!(st.errors_by_code.get("unavailable"), Some(&1));
        assert_eq!((st.msgs_total, st.duplicates, st.foreign_msgs), (1, 1, 1));
        assert_eq!(st.delivered_total, 1);
        assert_eq!(st.msg_latency_ns.as_ref().unwrap().len(), 1);
        assert_eq!(st.chat_sets.len(), 2);
        for (g, acc, recv, pending) in &st.chat_sets {
            let partner = &st.chat_sets.iter().find(|x| x.0 == g ^ 1).unwrap().2;
            assert_eq!(chat::missing(acc, partner), 0);
            // t7: 1 accepted and its next send pending; t8: 1 received, its own send pending.
            assert_eq!(
                (acc.len(), recv.len(), *pending),
                if *g == 0 { (1, 0, 1) } else { (0, 1, 1) }
            );
        }
        assert_eq!(shared.chat_outstanding.load(Relaxed), 0);
    }
}
