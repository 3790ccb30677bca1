//! The connection state machine, sans IO (see `LIFECYCLE.md` beside this file).
//!
//! A [`Connection`] never touches a socket or a clock. The shard's I/O glue feeds it received
//! bytes ([`Connection::on_bytes`]) and timer expiries ([`Connection::on_timer`]), each with `now`
//! in milliseconds; the connection answers by appending bytes to `out`, by moving to another
//! [`Phase`], and through [`Connection::deadline`], the one instant at which it next wants
//! `on_timer`. The glue writes `out`, keeps one wheel entry at `deadline`, and closes the
//! socket once the phase is `Done` and `out` is flushed.
//!
//! Memory: an idle open connection holds no buffer at all. `partial` exists only while a frame
//! or an HTTP head is split across reads, and `out` is released once flushed.

use std::sync::atomic::{AtomicUsize, Ordering};

pub use out::OutBuf;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::config::Config;
use crate::delivery::refusal::ClientRefusal;
use crate::limit::ip::{IpKey, IpLimits};
use crate::limit::Limited;
use crate::metrics::ShardMetrics;
use crate::proto::{self, ClientFrame, FrameError};
use crate::ws::frame::{self, Kind, Violation};
use crate::ws::upgrade::{self, Decision, Policy, Refusal, Route};

/// `retry_ms` told with a 4001 for a token whose key the JWKS does not hold yet (refetching).
const UNKNOWN_KID_RETRY_MS: u64 = 1_000;

/// `skip_input` value for "framing is lost: drop all input".
const SKIP_ALL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP upgrade request; times out at `handshake_timeout_ms`.
    Handshaking,
    /// Upgraded; frames flow; heartbeats apply.
    Open,
    /// We sent a close frame and wait for the peer's, until `until_ms`.
    Closing { until_ms: u64 },
    /// Nothing more to say: flush `out` and close the socket (at the latest at `until_ms`).
    Done { until_ms: u64 },
}

/// `Phase` as a connection keeps it: one byte, with the flags that matter in one phase only.
/// The deadline of `Closing` and `Done` is kept in `mark_ms` (a connection's size is a budget,
/// see shard/tests.rs; a `u64` inside the enum made it 16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// `too_fast`: the address opened connections too fast; the upgrade gets 429 (Retry-After
    /// from the address's bucket when the request head is complete).
    Handshaking {
        too_fast: bool,
    },
    Open,
    /// `fin_sent`: our close frame is out and the write side is shut (FIN): a peer waiting for
    /// the server to close TCP (RFC 6455 7.1.1) sees it at once, and its own FIN ends it.
    Closing {
        fin_sent: bool,
    },
    Done,
}

/// Everything a connection reads from its shard while handling an event.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    pub auth: &'a Authenticator,
    pub metrics: &'a ShardMetrics,
    /// Host-wide count of open WebSocket connections (touched only at upgrade and close).
    pub host_open: &'a AtomicUsize,
    /// Host-wide limits per source address (touched only at accept, upgrade and close).
    pub ips: &'a IpLimits,
    pub draining: bool,
    pub shard: usize,
    /// Requests for the shard (sends, acks), taken by the shard after each event.
    pub events: &'a std::cell::RefCell<Vec<AppEvent>>,
}

/// What a connection asks of its shard (the shard owns users, inboxes, rooms and the mesh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppEvent {
    /// Every parsed frame within the connection's frame limit, except `ping`, which the
    /// connection answers itself.
    Frame(ClientFrame),
    /// A `send` answered `rate_limited` here, over the connection's frame limit: nothing of
    /// it is taken, but the shard keeps a first attempt's cid for the pair's next message to
    /// carry to the recipient's shard (see `Senders::refused_unrouted`).
    SendRefused(proto::SendRequest),
}

/// What a connection carries besides its user id, boxed because it is rare: an idle
/// well-behaved connection holds none (the slab slot is a budget, see shard/tests.rs).
#[derive(Debug, Default)]
struct PeerExtra {
    rooms: Option<Vec<Box<str>>>,
    device: Option<Box<str>>,
    /// Asked for a summary of a big inbox instead of its replay (`?summary=1`).
    summary: bool,
    /// Frames refused so far; past `abuse_limit` the connection is closed.
    bad_frames: u32,
    /// Input bytes to throw away before the next frame: the rest of a bad frame whose length
    /// is known (then the peer's answering close frame is read, and the socket closes at once),
    /// or [`SKIP_ALL`] when framing is lost (then the peer's FIN ends it). Reading on (instead
    /// of closing with unread bytes) keeps the kernel from resetting the connection before the
    /// client has read our close frame.
    skip_input: u32,
}

/// Bytes kept between reads: an unfinished HTTP head or frame, and a fragmented message.
#[derive(Debug, Default)]
struct Partial {
    buf: Vec<u8>,
    message: Option<(Kind, Vec<u8>)>,
    /// Bytes of a fragmented text message already checked as UTF-8, so that each fragment is
    /// validated once when it arrives (fail fast, and no quadratic re-scan).
    utf8_checked: usize,
}

/// What an upgraded `/ws` connection waits for before its session starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Nothing,
    /// `?auth=frame`: the first frame must be `auth`. Until then `user` is empty and
    /// `mark_ms` holds the upgrade time, from which the auth deadline runs.
    Auth,
    /// The user is known; its home shard has not started the session yet.
    Session,
}

#[derive(Debug)]
pub struct Connection {
    stage: Stage,
    /// Set once upgraded; the connection then counts in `host_open`.
    route: Option<Route>,
    /// The authenticated user on `/ws` (empty on `/echo` and before the upgrade). Inline:
    /// long-lived small allocations per connection fragment the heap (see shard/park.rs).
    user: compact_str::CompactString,
    extra: Option<Box<PeerExtra>>,
    partial: Option<Box<Partial>>,
    /// Bytes to send. Released (capacity 0) once flushed so idle connections hold nothing.
    pub out: OutBuf,
    /// Accept time while handshaking; afterwards the last time any byte arrived.
    last_rx_ms: u64,
    /// Open: when the last ping went out (0: none yet), or while waiting for the `auth` frame
    /// the upgrade time, from which the auth deadline runs. Closing and Done: the phase's
    /// `until_ms` (no ping goes out then).
    mark_ms: u64,
    /// What an upgraded `/ws` connection still waits for before its session (one byte: the
    /// per-connection size is a budget, see shard/tests.rs).
    waiting: Waiting,
    /// The peer's address as the per-address limits key it (0 = not limited by address).
    ip: IpKey,
    /// Frame bucket debt (see `limit`), in µs, as of `last_rx_ms`.
    frame_debt_us: u32,
}

impl Connection {
    pub fn new(now_ms: u64) -> Self {
        Connection {
            stage: Stage::Handshaking { too_fast: false },
            route: None,
            user: compact_str::CompactString::const_new(""),
            extra: None,
            partial: None,
            out: OutBuf::default(),
            last_rx_ms: now_ms,
            mark_ms: 0,
            waiting: Waiting::Nothing,
            ip: 0,
            frame_debt_us: 0,
        }
    }

    /// The socket came from the address `ip`; `too_fast`: the per-address limits refused it
    /// when it connected (the upgrade then gets 429).
    pub fn set_source(&mut self, ip: IpKey, too_fast: bool) {
        debug_assert!(matches!(self.stage, Stage::Handshaking { .. }));
        self.ip = ip;
        if let Stage::Handshaking { too_fast: flag } = &mut self.stage {
            *flag = too_fast;
        }
    }

    pub fn phase(&self) -> Phase {
        match self.stage {
            Stage::Handshaking { .. } => Phase::Handshaking,
            Stage::Open => Phase::Open,
            Stage::Closing { .. } => Phase::Closing {
                until_ms: self.mark_ms,
            },
            Stage::Done => Phase::Done {
                until_ms: self.mark_ms,
            },
        }
    }

    /// Into `Closing` (again, from a second close: the write side stays shut if it is).
    fn enter_closing(&mut self, until_ms: u64) {
        let fin_sent = self.stage == (Stage::Closing { fin_sent: true });
        self.stage = Stage::Closing { fin_sent };
        self.mark_ms = until_ms;
    }

    fn enter_done(&mut self, until_ms: u64) {
        self.stage = Stage::Done;
        self.mark_ms = until_ms;
    }

    pub fn route(&self) -> Option<Route> {
        self.route
    }

    /// The authenticated user, on `/ws`.
    pub fn user(&self) -> Option<&str> {
        (!self.user.is_empty()).then_some(self.user.as_str())
    }

    pub fn device(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|e| e.device.as_deref())
    }

    /// The client asked for a summary of a big inbox instead of its replay (`?summary=1`).
    pub fn wants_summary(&self) -> bool {
        self.extra.as_ref().is_some_and(|e| e.summary)
    }

    /// Rooms the token allows; `None` = any.
    pub fn rooms(&self) -> Option<&[Box<str>]> {
        self.extra.as_ref().and_then(|e| e.rooms.as_deref())
    }

    /// Upgraded on `/ws` and waiting for the user's home shard to call [`Self::start_session`].
    pub fn awaiting_session(&self) -> bool {
        self.waiting == Waiting::Session
    }

    /// Upgraded with `?auth=frame` and the `auth` frame not read yet.
    pub fn awaiting_auth(&self) -> bool {
        self.waiting == Waiting::Auth
    }

    /// On the user's home shard: `welcome` (the shard then replays the inbox, sends `synced`
    /// and calls [`Self::resume_input`], so nothing is answered before `welcome`).
    /// `serial`: the home shard's serial for the connection, for the `conn` id in `welcome`.
    pub fn start_session(&mut self, serial: u32, ctx: &Ctx) {
        if std::mem::replace(&mut self.waiting, Waiting::Nothing) != Waiting::Session {
            return;
        }
        let mut body = Vec::with_capacity(160);
        let conn_id = format!("{}-{}-{}", ctx.cfg.node_id, ctx.shard, serial);
        proto::write_welcome(
            &mut body,
            &self.user,
            &conn_id,
            ctx.cfg.heartbeat_ms,
            ctx.cfg.max_frame,
        );
        self.push_frame(Kind::Text, &body, ctx);
        // The shard replays the inbox and sends `synced` next, then calls `resume_input`.
    }

    /// After the session's first frames: handle what the client sent behind its request head.
    pub fn resume_input(&mut self, now: u64, ctx: &Ctx) {
        if let Some(mut buf) = self.partial.take().map(|mut p| std::mem::take(&mut p.buf)) {
            if !buf.is_empty() {
                self.on_frame_bytes(now, &mut buf, ctx);
            }
        }
    }

    /// A text frame from the shard (delivery frames, `synced`, answers to events). Nothing
    /// follows our close frame (RFC 6455): once closing, frames are dropped here, for every
    /// writer at once (what they carried is redelivered or answered again on reconnect).
    pub fn push_text(&mut self, body: &[u8], ctx: &Ctx) {
        if self.stage == Stage::Open {
            self.push_frame(Kind::Text, body, ctx);
        }
    }

    /// Answer a request the shard refused (e.g. an ack beyond the last seq).
    /// Not once closing: no data frame may follow our close frame (RFC 6455 5.5.1), and a
    /// second close would only push the linger deadline later.
    pub fn reply_error(&mut self, now: u64, err: FrameError, ctx: &Ctx) {
        if self.stage == Stage::Open {
            self.bad_frame(now, err, ctx);
        }
    }

    /// Unacknowledged messages ran out of retransmits: the client is considered dead.
    pub fn close_unresponsive(&mut self, now: u64, ctx: &Ctx) {
        if self.stage == Stage::Open {
            self.close(now, frame::CLOSE_INTERNAL, "ack timeout", ctx);
        }
    }

    /// A room member whose outbound buffer stayed full (SPEC 4, slow consumers): 1013.
    pub fn close_slow(&mut self, now: u64, ctx: &Ctx) {
        if self.stage == Stage::Open {
            self.close(now, frame::CLOSE_TRY_AGAIN, "slow consumer", ctx);
        }
    }

    /// The home shard cannot take the connection (its mesh channel is full): tell the client
    /// to come back (1013) instead of serving it on the wrong shard.
    pub fn reject_session(&mut self, now: u64, ctx: &Ctx) {
        self.waiting = Waiting::Nothing;
        self.partial = None;
        self.close(now, frame::CLOSE_TRY_AGAIN, "overloaded, reconnect", ctx);
    }

    /// Last time input arrived (accept time while handshaking).
    pub fn last_rx_ms(&self) -> u64 {
        self.last_rx_ms
    }

    /// Open, nothing buffered either way, and silent for `idle_ms`: it may leave its task.
    pub fn parkable(&self, now: u64, idle_ms: u64) -> bool {
        self.stage == Stage::Open
            && !self.awaiting_auth()
            && self.out.is_empty()
            && self.partial.is_none()
            && now >= self.last_rx_ms + idle_ms
    }

    /// Our close frame is flushed and the write side not shut yet: the glue shuts it (FIN)
    /// and calls [`Connection::fin_sent`].
    pub fn wants_fin(&self) -> bool {
        self.stage == (Stage::Closing { fin_sent: false }) && self.out.is_empty()
    }

    pub fn fin_sent(&mut self) {
        if let Stage::Closing { fin_sent } = &mut self.stage {
            *fin_sent = true;
        }
    }

    /// The socket can be closed: nothing left to say and everything said.
    pub fn finished(&self) -> bool {
        self.stage == Stage::Done && self.out.is_empty()
    }

    /// Bytes buffered for a partial frame or message (reported by memory tests).
    pub fn buffered_in(&self) -> usize {
        self.partial
            .as_ref()
            .map(|p| p.buf.capacity() + p.message.as_ref().map_or(0, |m| m.1.capacity()))
            .unwrap_or(0)
    }

    /// When the connection next needs `on_timer`.
    pub fn deadline(&self, cfg: &Config) -> u64 {
        match self.phase() {
            Phase::Handshaking => self.last_rx_ms + cfg.handshake_timeout_ms,
            // Not renewed by input: a trickled auth frame gets no more time than a head.
            Phase::Open if self.awaiting_auth() => self.mark_ms + cfg.handshake_timeout_ms,
            Phase::Open => {
                let hb = cfg.heartbeat_ms;
                (self.last_rx_ms.max(self.mark_ms) + hb).min(self.last_rx_ms + 3 * hb)
            }
            Phase::Closing { until_ms } | Phase::Done { until_ms } => until_ms,
        }
    }

    /// The deadline due now would refuse (408) or close (1001) the peer for silence: the glue
    /// reads what is waiting in the socket first, so a peer is judged on what it sent.
    pub fn silence_would_end_it(&self, now: u64, cfg: &Config) -> bool {
        match self.phase() {
            Phase::Handshaking => now >= self.deadline(cfg),
            Phase::Open if self.awaiting_auth() => now >= self.deadline(cfg),
            Phase::Open => now >= self.last_rx_ms + 3 * cfg.heartbeat_ms,
            Phase::Closing { .. } | Phase::Done { .. } => false,
        }
    }

    /// Called by the glue when the socket is gone (EOF, error, or after `finished`): releases
    /// the host connection slot. Idempotent.
    pub fn on_closed(&mut self, ctx: &Ctx) {
        if self.route.take().is_some() {
            ctx.host_open.fetch_sub(1, Ordering::Relaxed);
            ctx.ips.close(self.ip);
            ctx.metrics.connections_open.dec();
        } else if matches!(self.stage, Stage::Handshaking { .. }) {
            ctx.metrics.handshakes_pending.dec();
        }
        self.enter_done(0);
        self.out = OutBuf::default();
        self.partial = None;
    }

    /// The shard is shutting down: tell the client to reconnect elsewhere (1012).
    pub fn on_shutdown(&mut self, now: u64, ctx: &Ctx) {
        match self.phase() {
            Phase::Open => self.close(now, 1012, "server restarting, reconnect", ctx),
            // A handshake in flight gets its 503 now rather than waiting for its last bytes.
            Phase::Handshaking => {
                let r = Refusal::Draining;
                self.partial = None;
                self.refuse(
                    now,
                    r,
                    r.response("shutting down, reconnect later", ctx.cfg.retry_after_s),
                    ctx,
                );
            }
            _ => {}
        }
    }

    /// A deadline passed (the wheel may fire early after a lazy reschedule: re-check).
    pub fn on_timer(&mut self, now: u64, ctx: &Ctx) {
        if now < self.deadline(ctx.cfg) {
            return;
        }
        match self.phase() {
            Phase::Handshaking => {
                ctx.metrics.handshake_timeouts.inc();
                ctx.metrics.handshakes_pending.dec();
                self.out
                    .buf()
                    .extend_from_slice(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                self.enter_done(now + ctx.cfg.close_linger_ms);
            }
            Phase::Open if self.awaiting_auth() => {
                let detail = "no auth frame within handshake_timeout_ms";
                self.refuse_in_band(now, Refusal::Unauthorized, detail, 0, ctx);
            }
            Phase::Open => {
                let hb = ctx.cfg.heartbeat_ms;
                if now >= self.last_rx_ms + 3 * hb {
                    ctx.metrics.heartbeat_closes.inc();
                    self.close(now, frame::CLOSE_GOING_AWAY, "heartbeat timeout", ctx);
                } else {
                    ctx.metrics.pings_sent.inc();
                    debug_assert_eq!(self.stage, Stage::Open);
                    self.mark_ms = now;
                    self.push_frame(Kind::Ping, b"", ctx);
                }
            }
            Phase::Closing { .. } | Phase::Done { .. } => {
                // The peer never answered or never read: give up on the socket.
                self.out = OutBuf::default();
                self.enter_done(now);
            }
        }
    }

    /// Bytes arrived. `data` may be modified (frames are unmasked in place).
    pub fn on_bytes(&mut self, now: u64, data: &mut [u8], ctx: &Ctx) {
        match self.phase() {
            Phase::Handshaking => self.on_handshake_bytes(now, data, ctx),
            Phase::Open if self.awaiting_session() => {
                // Kept until the session starts on the home shard.
                self.pay_frame_debt(now);
                self.last_rx_ms = now;
                self.partial
                    .get_or_insert_with(Default::default)
                    .buf
                    .extend_from_slice(data);
            }
            Phase::Open | Phase::Closing { .. } => {
                self.pay_frame_debt(now);
                self.last_rx_ms = now;
                self.on_frame_bytes(now, data, ctx)
            }
            Phase::Done { .. } => {}
        }
    }

    fn on_handshake_bytes(&mut self, now: u64, data: &mut [u8], ctx: &Ctx) {
        let mut partial = self.partial.take().unwrap_or_default();
        partial.buf.extend_from_slice(data);
        let policy = Policy {
            auth: ctx.auth,
            allowed_origins: &ctx.cfg.allowed_origins,
            echo_route: ctx.cfg.echo_route,
            demo: ctx.auth.dev_mode(),
            draining: ctx.draining,
            at_capacity: ctx.host_open.load(Ordering::Relaxed) >= ctx.cfg.max_connections,
            retry_after_s: ctx.cfg.retry_after_s,
            too_fast_retry_s: match self.stage == (Stage::Handshaking { too_fast: true }) {
                true => ctx.ips.connect_retry_ms(self.ip, now).div_ceil(1000).max(1),
                false => 0,
            },
        };
        match upgrade::decide(&partial.buf, &policy) {
            Decision::Incomplete => self.partial = Some(partial),
            Decision::Refuse(reason, response) => self.refuse(now, reason, response, ctx),
            Decision::Serve(response) => {
                ctx.metrics.handshakes_pending.dec();
                self.out = response.into();
                self.enter_done(now + ctx.cfg.close_linger_ms);
            }
            Decision::RefuseInBand {
                refusal,
                detail,
                retry_after_s,
                accepted,
            } => {
                self.upgrade_to_refuse(now, accepted.response, refusal, &detail, retry_after_s, ctx)
            }
            Decision::Upgrade(accepted) => {
                // Reserve the host slot exactly (the policy check above is only a fast path).
                let refused =
                    if ctx.host_open.fetch_add(1, Ordering::Relaxed) >= ctx.cfg.max_connections {
                        Some((Refusal::Overloaded, "connection limit reached"))
                    } else if !ctx.ips.open(self.ip) {
                        Some((
                            Refusal::IpOpen,
                            "too many open connections from your address",
                        ))
                    } else {
                        None
                    };
                if let Some((r, detail)) = refused {
                    ctx.host_open.fetch_sub(1, Ordering::Relaxed);
                    let retry_s = ctx.cfg.retry_after_s;
                    match accepted.auth_in_frame {
                        true => {
                            self.upgrade_to_refuse(now, accepted.response, r, detail, retry_s, ctx)
                        }
                        false => self.refuse(now, r, r.response(detail, retry_s), ctx),
                    }
                    return;
                }
                ctx.metrics.handshakes_pending.dec();
                ctx.metrics.connections_accepted.inc();
                ctx.metrics.connections_open.inc();
                self.route = Some(accepted.route);
                self.stage = Stage::Open;
                self.last_rx_ms = now;
                self.out.buf().extend_from_slice(&accepted.response);
                // A client may send frames right behind its request head.
                let mut rest = partial.buf.split_off(accepted.head_len);
                if accepted.device.is_some() || accepted.summary {
                    self.extra = Some(Box::new(PeerExtra {
                        device: accepted.device,
                        summary: accepted.summary,
                        ..PeerExtra::default()
                    }));
                }
                if accepted.auth_in_frame {
                    self.waiting = Waiting::Auth;
                    self.mark_ms = now;
                }
                match accepted.identity {
                    Some(identity) => self.authenticated(identity, rest, partial),
                    None if !rest.is_empty() => self.on_frame_bytes(now, &mut rest, ctx),
                    None => {}
                }
            }
        }
    }

    /// The user is known (from the request or its `auth` frame): the user's home shard
    /// starts the session; `rest` (frames behind the credentials) waits until then.
    fn authenticated(&mut self, identity: Identity, rest: Vec<u8>, mut partial: Box<Partial>) {
        if identity.rooms.is_some() {
            self.extra.get_or_insert_with(Default::default).rooms = identity.rooms;
        }
        self.user = identity.user;
        // (Open here: `mark_ms` holds the close deadline once closing.)
        debug_assert_eq!(self.stage, Stage::Open);
        self.mark_ms = 0;
        self.waiting = Waiting::Session;
        if !rest.is_empty() {
            partial.buf = rest;
            partial.message = None;
            self.partial = Some(partial);
        }
    }

    /// The first frame of an `?auth=frame` connection.
    fn on_auth_frame(&mut self, now: u64, kind: Kind, payload: &[u8], ctx: &Ctx) {
        let parsed = match kind {
            Kind::Text => proto::parse_auth(payload),
            _ => Err(r#"the first frame must be {"op":"auth","token":"<jwt>"} (text)"#),
        };
        // (detail, retry_ms): a key being refetched is worth a retry (`retry_ms`), the rest
        // needs another token.
        let result = parsed.map_err(|e| (e.to_string(), 0)).and_then(|frame| {
            ctx.auth
                .authenticate(frame.token.as_deref(), frame.user.as_deref())
                .map_err(|e| match e {
                    AuthError::Missing if ctx.auth.dev_mode() => (
                        r#"dev mode: send {"op":"auth","user":"<id>"}"#.to_string(),
                        0,
                    ),
                    AuthError::UnknownKid => (e.to_string(), UNKNOWN_KID_RETRY_MS),
                    e => (e.to_string(), 0),
                })
        });
        match result {
            // Frames behind it stay in the framing buffer (`decode_frames` stops here).
            Ok(identity) => self.authenticated(identity, Vec::new(), Box::default()),
            Err((detail, retry_ms)) => {
                self.refuse_in_band(now, Refusal::Unauthorized, &detail, retry_ms, ctx)
            }
        }
    }

    /// Upgrade an `?auth=frame` request only to say why it is refused: it takes no host slot
    /// and does not count as accepted.
    fn upgrade_to_refuse(
        &mut self,
        now: u64,
        response: Vec<u8>,
        r: Refusal,
        detail: &str,
        retry_after_s: u64,
        ctx: &Ctx,
    ) {
        ctx.metrics.handshakes_pending.dec();
        self.out = response.into();
        self.stage = Stage::Open;
        self.refuse_in_band(now, r, detail, retry_after_s * 1000, ctx);
    }

    /// Tell an upgraded `?auth=frame` client why it is refused: an `error` frame, then a close
    /// with the refusal's 4xxx code (see `Refusal::in_band`). Counted like an HTTP refusal.
    fn refuse_in_band(&mut self, now: u64, r: Refusal, detail: &str, retry_ms: u64, ctx: &Ctx) {
        ctx.metrics.refused[r.index()].inc();
        self.waiting = Waiting::Nothing;
        let (close_code, code, retry) = r.in_band();
        let err = FrameError {
            code,
            message: detail.to_string(),
            cid: None,
        };
        let mut body = Vec::with_capacity(128);
        // A refusal that is retried by nature says when; an `unauthorized` says so only for
        // a token that may pass as it is (its key is being refetched).
        let retry = match retry {
            true => Some(retry_ms.max(1)),
            false => (r == Refusal::Unauthorized && retry_ms > 0).then_some(retry_ms),
        };
        proto::write_error_retry(&mut body, &err, retry);
        self.push_frame(Kind::Text, &body, ctx);
        self.close(now, close_code, detail, ctx);
    }

    fn refuse(&mut self, now: u64, reason: Refusal, response: Vec<u8>, ctx: &Ctx) {
        ctx.metrics.handshakes_pending.dec();
        ctx.metrics.refused[reason.index()].inc();
        self.out = response.into();
        self.enter_done(now + ctx.cfg.close_linger_ms);
    }

    fn on_frame_bytes(&mut self, now: u64, data: &mut [u8], ctx: &Ctx) {
        let skip_input = self.extra.as_ref().map_or(0, |e| e.skip_input);
        if skip_input == SKIP_ALL {
            return;
        }
        let skipped = data.len().min(skip_input as usize);
        if skipped > 0 {
            self.extra_mut().skip_input -= skipped as u32;
        }
        let data = &mut data[skipped..];
        if data.is_empty() {
            return;
        }
        let mut partial = self.partial.take();
        let leftover_from_data;
        match partial.as_mut().filter(|p| !p.buf.is_empty()) {
            Some(p) => {
                p.buf.extend_from_slice(data);
                let mut buf = std::mem::take(&mut p.buf);
                let used = self.decode_frames(now, &mut buf, &mut partial, ctx);
                buf.drain(..used);
                leftover_from_data = None;
                if let Some(p) = partial.as_mut() {
                    p.buf = buf;
                }
            }
            None => {
                let used = self.decode_frames(now, data, &mut partial, ctx);
                leftover_from_data = Some(&data[used..]);
            }
        }
        if let Some(rest) = leftover_from_data.filter(|r| !r.is_empty()) {
            if self.stage != Stage::Done {
                partial
                    .get_or_insert_with(Default::default)
                    .buf
                    .extend_from_slice(rest);
            }
        }
        // Keep `partial` only while it holds something.
        self.partial = partial.filter(|p| !p.buf.is_empty() || p.message.is_some());
    }

    /// Decode and handle whole frames at the front of `buf`; returns the bytes consumed.
    fn decode_frames(
        &mut self,
        now: u64,
        buf: &mut [u8],
        partial: &mut Option<Box<Partial>>,
        ctx: &Ctx,
    ) -> usize {
        let mut pos = 0;
        // Frames behind an `auth` frame wait for the session, like those behind a request head.
        while pos < buf.len() && self.stage != Stage::Done && !self.awaiting_session() {
            match frame::decode(&mut buf[pos..], ctx.cfg.max_frame) {
                Ok(None) => break,
                Ok(Some((f, used))) => {
                    pos += used;
                    ctx.metrics.frames_in.inc();
                    // Frames that end a message are charged once their op is known (a useful
                    // ack is free); a close never is. A fragment over the limit still goes
                    // on (nothing is taken from it until its message ends) but deepens the
                    // debt that closes a flood.
                    let ends_message =
                        f.fin && matches!(f.kind, Kind::Text | Kind::Binary | Kind::Continuation);
                    if !ends_message && f.kind != Kind::Close {
                        let over = self.charge_frame(now, ctx).is_err();
                        if over && f.kind == Kind::Ping {
                            continue; // not answered
                        }
                    }
                    if let Err(v) = self.on_frame(now, f, partial, ctx) {
                        self.violation(now, v, partial, ctx);
                    }
                }
                Err(bad) => {
                    // (`violation` drops the message being reassembled; `partial` keeps the
                    // framing buffer, whose rest after the bad frame may be the peer's close.)
                    self.violation(now, bad.violation, partial, ctx);
                    // Step over the bad frame and keep reading frames (the peer's close);
                    // if its length is unknown, or longer than we count, drop all input.
                    let rest = (buf.len() - pos) as u64;
                    match bad.frame_len {
                        Some(n) if n <= rest => pos += n as usize,
                        Some(n) if n - rest < SKIP_ALL as u64 => {
                            self.extra_mut().skip_input = (n - rest) as u32;
                            return buf.len();
                        }
                        _ => {
                            self.extra_mut().skip_input = SKIP_ALL;
                            return buf.len();
                        }
                    }
                }
            }
        }
        pos
    }

    fn violation(&mut self, now: u64, v: Violation, partial: &mut Option<Box<Partial>>, ctx: &Ctx) {
        // Drop the message being reassembled, but keep the framing buffer: the bytes after
        // the bad frame (often the peer's close) are still well-framed.
        if let Some(p) = partial.as_mut() {
            p.message = None;
        }
        if self.stage != Stage::Open {
            self.enter_done(now + ctx.cfg.close_linger_ms);
            return;
        }
        if v.code == frame::CLOSE_TOO_BIG {
            ctx.metrics.oversize_closes.inc();
        } else {
            ctx.metrics.protocol_closes.inc();
        }
        self.close(now, v.code, v.reason, ctx);
    }

    fn on_frame(
        &mut self,
        now: u64,
        f: frame::Frame<'_>,
        partial: &mut Option<Box<Partial>>,
        ctx: &Ctx,
    ) -> Result<(), Violation> {
        let closing = matches!(self.stage, Stage::Closing { .. });
        match f.kind {
            Kind::Ping if !closing => self.push_frame(Kind::Pong, f.payload, ctx),
            Kind::Ping | Kind::Pong => {}
            Kind::Close => {
                let code = frame::check_close_payload(f.payload)?;
                if !closing {
                    // Echo the peer's code (RFC 6455 5.5.1).
                    frame::encode_close(code, "", self.out.buf());
                    ctx.metrics.frames_out.inc();
                }
                self.enter_done(now + ctx.cfg.close_linger_ms);
            }
            _ if closing => {}
            Kind::Text | Kind::Binary => {
                if partial.as_ref().is_some_and(|p| p.message.is_some()) {
                    return Err(Violation {
                        code: frame::CLOSE_PROTOCOL_ERROR,
                        reason: "new message before the fragmented one ended",
                    });
                }
                if f.fin {
                    self.on_message(now, f.kind, f.payload, ctx)?;
                } else {
                    let checked = match f.kind {
                        Kind::Text => check_utf8_prefix(f.payload, 0, false)?,
                        _ => 0,
                    };
                    let p = partial.get_or_insert_with(Default::default);
                    p.message = Some((f.kind, f.payload.to_vec()));
                    p.utf8_checked = checked;
                }
            }
            Kind::Continuation => {
                let Some((kind, mut body)) = partial.as_mut().and_then(|p| p.message.take()) else {
                    return Err(Violation {
                        code: frame::CLOSE_PROTOCOL_ERROR,
                        reason: "continuation without a message",
                    });
                };
                if body.len() + f.payload.len() > ctx.cfg.max_frame {
                    return Err(Violation {
                        code: frame::CLOSE_TOO_BIG,
                        reason: "message exceeds max_frame",
                    });
                }
                body.extend_from_slice(f.payload);
                if kind == Kind::Text {
                    let checked = partial.as_ref().map_or(0, |p| p.utf8_checked);
                    let checked = check_utf8_prefix(&body, checked, f.fin)?;
                    if let Some(p) = partial.as_mut() {
                        p.utf8_checked = checked;
                    }
                }
                if f.fin {
                    self.on_message(now, kind, &body, ctx)?;
                } else if let Some(p) = partial.as_mut() {
                    p.message = Some((kind, body));
                }
            }
        }
        Ok(())
    }

    /// A whole data message.
    fn on_message(
        &mut self,
        now: u64,
        kind: Kind,
        payload: &[u8],
        ctx: &Ctx,
    ) -> Result<(), Violation> {
        // ASCII first: inlined and word-at-a-time, where `from_utf8` is a call with its own
        // set-up (4% of a shard's samples echoing 64-byte text at 16 in flight).
        if kind == Kind::Text && !payload.is_ascii() && std::str::from_utf8(payload).is_err() {
            return Err(Violation {
                code: frame::CLOSE_INVALID_PAYLOAD,
                reason: "text message is not UTF-8",
            });
        }
        if self.awaiting_auth() {
            self.on_auth_frame(now, kind, payload, ctx);
            return Ok(());
        }
        let route = self.route;
        match route {
            // Over the limit an echo frame is dropped (counted): /echo has no error frames.
            Some(Route::Echo) if self.charge_frame(now, ctx).is_err() => {}
            Some(Route::Echo) => self.push_frame(kind, payload, ctx),
            Some(Route::App) if kind == Kind::Binary => self.bad_frame(
                now,
                ClientRefusal::BadRequest("binary frames are not part of protocol v1".into())
                    .frame(None),
                ctx,
            ),
            Some(Route::App) => {
                let parsed = proto::parse(payload);
                // An ack is charged by the shard, and only when it acknowledges nothing.
                if !matches!(parsed, Ok(ClientFrame::Ack { .. })) {
                    if let Err(retry_ms) = self.charge_frame(now, ctx) {
                        let cid = match &parsed {
                            Ok(frame) => frame.cid(),
                            Err(e) => e.cid.as_deref(),
                        };
                        self.answer_rate_limited("too many frames", cid, retry_ms, ctx);
                        // (Unless its strike closed the connection: then it was not answered.)
                        if let (Ok(ClientFrame::Send(req)), Stage::Open) = (parsed, self.stage) {
                            ctx.events.borrow_mut().push(AppEvent::SendRefused(req));
                        }
                        return Ok(());
                    }
                }
                match parsed {
                    Ok(ClientFrame::Ping) => self.push_frame(Kind::Text, proto::PONG, ctx),
                    Ok(frame) => ctx.events.borrow_mut().push(AppEvent::Frame(frame)),
                    Err(e) => self.bad_frame(now, e, ctx),
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Bring the frame debt to `now`: it is paid off at the rate of real time.
    fn pay_frame_debt(&mut self, now: u64) {
        let paid_us = now.saturating_sub(self.last_rx_ms).saturating_mul(1000);
        self.frame_debt_us = u64::from(self.frame_debt_us).saturating_sub(paid_us) as u32;
    }

    /// Take one frame from the connection's frame bucket (`conn_frame_rate`), or say in how
    /// many ms one will be there. A refused frame still adds its cost to the debt, so a
    /// connection that keeps sending past its limit runs past `rate_limit_strikes` frames'
    /// worth and is closed with 1008; one that waits as told is not.
    pub fn charge_frame(&mut self, now: u64, ctx: &Ctx) -> Result<(), u64> {
        let Some(rate) = ctx.cfg.frame_limit else {
            return Ok(());
        };
        if let Ok(after) = rate.take(u64::from(self.frame_debt_us)) {
            self.frame_debt_us = after as u32; // at most the burst (config bounds it)
            return Ok(());
        }
        ctx.metrics.rate_limited[Limited::Frames.index()].inc();
        self.strike(now, ctx);
        // After the strike: a client that waits this long gets its next frame through.
        Err(rate.take(u64::from(self.frame_debt_us)).err().unwrap_or(1))
    }

    /// Something this connection sent was refused by a rate limit: it costs one frame more,
    /// and a connection deep enough in debt is closed with 1008.
    pub fn strike(&mut self, now: u64, ctx: &Ctx) {
        let Some(rate) = ctx.cfg.frame_limit else {
            return;
        };
        let debt = u64::from(self.frame_debt_us) + rate.interval_us();
        self.frame_debt_us = debt.min(u64::from(u32::MAX)) as u32;
        let strikes = u64::from(ctx.cfg.rate_limit_strikes) * rate.interval_us();
        if debt > rate.burst_us() + strikes && self.stage == Stage::Open {
            ctx.metrics.rate_limit_closes.inc();
            self.close(now, frame::CLOSE_POLICY, "rate limit exceeded", ctx);
            // No closing handshake with a flood: reading on for its answer would mean reading
            // the flood (measured: 500 MB/s for the whole linger). The close frame is flushed,
            // then the socket closed; unread input makes that a reset.
            self.enter_done(now + ctx.cfg.close_linger_ms);
            // The frames of this read that the shard has not served yet go with the
            // connection: none is taken, so none needed an answer the close would drop. Sends
            // answered `rate_limited` before stay: the shard keeps their cids.
            (ctx.events.borrow_mut()).retain(|e| matches!(e, AppEvent::SendRefused(_)));
        }
    }

    /// `rate_limited` for a frame (with its `cid` when it had one).
    pub fn answer_rate_limited(&mut self, what: &str, cid: Option<&str>, retry_ms: u64, ctx: &Ctx) {
        if self.stage != Stage::Open {
            return;
        }
        let mut body = Vec::with_capacity(128);
        proto::write_rate_limited(&mut body, what, cid, retry_ms);
        self.push_frame(Kind::Text, &body, ctx);
    }

    /// The rare per-connection state, allocated on first use.
    fn extra_mut(&mut self) -> &mut PeerExtra {
        self.extra.get_or_insert_with(Default::default)
    }

    fn bad_frame(&mut self, now: u64, err: FrameError, ctx: &Ctx) {
        ctx.metrics.bad_frames.inc();
        let mut body = Vec::with_capacity(96);
        proto::write_error(&mut body, &err);
        self.push_frame(Kind::Text, &body, ctx);
        let extra = self.extra_mut();
        extra.bad_frames += 1;
        if extra.bad_frames > ctx.cfg.abuse_limit {
            ctx.metrics.abuse_closes.inc();
            self.close(now, frame::CLOSE_POLICY, "too many bad frames", ctx);
        }
    }

    fn push_frame(&mut self, kind: Kind, payload: &[u8], ctx: &Ctx) {
        frame::encode(kind, payload, self.out.buf());
        ctx.metrics.frames_out.inc();
    }

    /// Start the closing handshake with `code`.
    fn close(&mut self, now: u64, code: u16, reason: &str, ctx: &Ctx) {
        frame::encode_close(code, reason, self.out.buf());
        ctx.metrics.frames_out.inc();
        self.enter_closing(now + ctx.cfg.close_linger_ms);
    }
}

/// Validate the text bytes after `checked` and return the new checked length. A character cut
/// at the end of a non-final fragment may complete in the next one; anything else invalid is
/// a 1007 at once.
fn check_utf8_prefix(body: &[u8], checked: usize, fin: bool) -> Result<usize, Violation> {
    match std::str::from_utf8(&body[checked..]) {
        Ok(_) => Ok(body.len()),
        Err(e) if e.error_len().is_none() && !fin => Ok(checked + e.valid_up_to()),
        Err(_) => Err(Violation {
            code: frame::CLOSE_INVALID_PAYLOAD,
            reason: "text message is not UTF-8",
        }),
    }
}

mod out;
#[cfg(test)]
mod tests;
