//! `GET /api/live` (server-sent events, one JSON snapshot a second) and `GET /ops`, the
//! operator page that reads it (SPEC section 6). The page's files are embedded in the binary
//! and hold no data, so they are served without a key; the stream is behind the API key like
//! every `/api/*` request (checked by the admin router before it gets here).
//!
//! Owns the count of open streams (bounded: each costs a snapshot a second) and its refusals.
//! Each stream owns its previous sample, from which it computes the per-second rates; it only
//! reads the shards' counters, never asks a shard anything.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Frame};
use hyper::{Response, StatusCode};

use super::Admin;
use crate::metrics::{Counter, ShardMetrics};

/// Live streams open at once; more get 503 (a browser tab holds one; a handful of operators
/// need a few, and a runaway script should not make the admin thread render hundreds a second).
pub const MAX_LIVE_STREAMS: usize = 16;
/// One snapshot per interval.
pub const LIVE_INTERVAL: Duration = Duration::from_secs(1);

const LIVE_STREAMS: &str = "ringgate_ops_streams";
const LIVE_REFUSED: &str = "ringgate_ops_streams_refused_total";

/// The open live streams and the refused ones (the admin listener's, not a shard's).
pub struct LiveStreams {
    open: AtomicUsize,
    /// Several admin tasks may refuse at once: more than one writer, so a locked add.
    refused: AtomicU64,
    /// For the node's uptime.
    started: Instant,
}

impl LiveStreams {
    pub fn new() -> LiveStreams {
        LiveStreams {
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Take a stream slot, or None at the bound (counted).
    fn open(&self) -> bool {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_LIVE_STREAMS).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {LIVE_STREAMS} Open `/api/live` streams (operator pages), at most {MAX_LIVE_STREAMS} (shard=\"admin\": the admin listener's).\n# TYPE {LIVE_STREAMS} gauge\n{LIVE_STREAMS}{{shard=\"admin\"}} {}", self.open.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP {LIVE_REFUSED} `/api/live` streams refused (503) because {MAX_LIVE_STREAMS} were open.\n# TYPE {LIVE_REFUSED} counter\n{LIVE_REFUSED}{{shard=\"admin\"}} {}", self.refused.load(Ordering::Relaxed));
    }
}

impl Default for LiveStreams {
    fn default() -> Self {
        Self::new()
    }
}

/// What the admin router answers with: a whole body, or a live stream.
pub type Body = http_body_util::Either<Full<Bytes>, LiveBody>;

/// `GET /api/live` once the key was checked: the stream, or 503 at the bound.
pub fn live(admin: &Arc<Admin>) -> Response<Body> {
    if !admin.live.open() {
        let mut refused = super::api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{MAX_LIVE_STREAMS} live streams are open; close one or retry later"),
        );
        refused
            .headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("5"));
        return refused.map(Body::Left);
    }
    let mut tick = tokio::time::interval(LIVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-store")
        // Proxies (nginx) would otherwise hold the events back.
        .header("x-accel-buffering", "no")
        .body(Body::Right(LiveBody {
            admin: admin.clone(),
            tick,
            prev: None,
        }))
        .expect("static response")
}

/// An open stream: a snapshot at every tick, until the client goes away (hyper then drops
/// the body, which frees the slot).
pub struct LiveBody {
    admin: Arc<Admin>,
    tick: tokio::time::Interval,
    prev: Option<(Instant, Vec<Sample>)>,
}

impl Drop for LiveBody {
    fn drop(&mut self) {
        self.admin.live.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl hyper::body::Body for LiveBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.tick.poll_tick(cx).is_pending() {
            return Poll::Pending;
        }
        // The clocks first, then the counters: every count a snapshot shows was read at or
        // after its `ts_ms` (a reader comparing it with a scrape relies on that).
        let now = Instant::now();
        let ts_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let samples: Vec<Sample> = this.admin.metrics.iter().map(|m| Sample::read(m)).collect();
        let json = snapshot(&this.admin, now, ts_ms, this.prev.as_ref(), &samples);
        this.prev = Some((now, samples));
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
            "data: {json}\n\n"
        ))))))
    }
}

/// One shard's counters at one instant: what the page shows, read once.
#[derive(Clone, Copy, Default)]
struct Sample {
    connections: u64,
    parked: u64,
    frames_in: u64,
    frames_out: u64,
    msgs_in: u64,
    msgs_out: u64,
    acks_pending: u64,
    retransmits: u64,
    spilled: u64,
    replayed: u64,
    cross_shard: u64,
    rate_limited: u64,
    redis_batches: u64,
    redis_us: u64,
}

impl Sample {
    fn read(m: &ShardMetrics) -> Sample {
        Sample {
            connections: m.connections_open.get(),
            parked: m.connections_parked.get(),
            frames_in: m.frames_in.get(),
            frames_out: m.frames_out.get(),
            // Direct sends (resends included) and room publishes this shard took.
            msgs_in: m.sends.get() + m.room_publishes.get(),
            // `msg` frames and room messages written to clients: what `ringgate stats` shows
            // as msgs_out/s too (one figure under one name).
            msgs_out: m.msg_frames_out.get() + m.room_deliveries.get(),
            acks_pending: m.acks_pending.get(),
            retransmits: m.retransmits.get(),
            spilled: m.stored.get(),
            replayed: m.replayed.get(),
            cross_shard: m.cross_shard.get(),
            rate_limited: m.rate_limited.iter().map(Counter::get).sum(),
            redis_batches: m.redis_latency.count(),
            redis_us: m.redis_latency.sum_us(),
        }
    }

    fn add(mut self, o: &Sample) -> Sample {
        self.connections += o.connections;
        self.parked += o.parked;
        self.frames_in += o.frames_in;
        self.frames_out += o.frames_out;
        self.msgs_in += o.msgs_in;
        self.msgs_out += o.msgs_out;
        self.acks_pending += o.acks_pending;
        self.retransmits += o.retransmits;
        self.spilled += o.spilled;
        self.replayed += o.replayed;
        self.cross_shard += o.cross_shard;
        self.rate_limited += o.rate_limited;
        self.redis_batches += o.redis_batches;
        self.redis_us += o.redis_us;
        self
    }

    /// The row: gauges and totals as read, rates over `secs` since `prev` (null on the first
    /// snapshot), Redis latency as the mean batch time over the interval (null without batches).
    fn row(&self, shard: serde_json::Value, prev: Option<&Sample>, secs: f64) -> serde_json::Value {
        let rate = |now: u64, then: fn(&Sample) -> u64| -> serde_json::Value {
            match prev {
                Some(p) => {
                    let per_s = now.saturating_sub(then(p)) as f64 / secs.max(1e-3);
                    serde_json::json!((per_s * 10.0).round() / 10.0)
                }
                None => serde_json::Value::Null,
            }
        };
        let redis_ms = prev.and_then(|p| {
            let batches = self.redis_batches.saturating_sub(p.redis_batches);
            (batches > 0).then(|| {
                let ms = self.redis_us.saturating_sub(p.redis_us) as f64 / batches as f64 / 1000.0;
                (ms * 100.0).round() / 100.0
            })
        });
        serde_json::json!({
            "shard": shard,
            "connections": self.connections,
            "parked": self.parked,
            "frames_in_s": rate(self.frames_in, |s| s.frames_in),
            "frames_out_s": rate(self.frames_out, |s| s.frames_out),
            "msgs_in_s": rate(self.msgs_in, |s| s.msgs_in),
            "msgs_out_s": rate(self.msgs_out, |s| s.msgs_out),
            "acks_pending": self.acks_pending,
            "retransmits": self.retransmits,
            "spilled": self.spilled,
            "replayed": self.replayed,
            "cross_shard": self.cross_shard,
            "redis_ms": redis_ms,
            "rate_limited": self.rate_limited,
            "totals": {
                "frames_in": self.frames_in,
                "frames_out": self.frames_out,
                "msgs_in": self.msgs_in,
                "msgs_out": self.msgs_out,
            },
        })
    }
}

/// The whole snapshot: node, config summary (no secrets), one row per shard and a total row.
fn snapshot(
    admin: &Admin,
    now: Instant,
    ts_ms: u64,
    prev: Option<&(Instant, Vec<Sample>)>,
    samples: &[Sample],
) -> String {
    let cfg = &admin.shared.cfg;
    let secs = prev.map_or(0.0, |(at, _)| now.duration_since(*at).as_secs_f64());
    let prev_of = |i: usize| prev.and_then(|(_, p)| p.get(i));
    let shards: Vec<serde_json::Value> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| s.row(i.into(), prev_of(i), secs))
        .collect();
    let total = samples.iter().fold(Sample::default(), |t, s| t.add(s));
    let prev_total = prev.map(|(_, p)| p.iter().fold(Sample::default(), |t, s| t.add(s)));
    let store = match cfg.redis_url.as_deref() {
        None => "embedded",
        Some(u) if u.contains("-cluster://") => "redis-cluster",
        Some(u) if u.contains("-sentinel://") => "redis-sentinel",
        Some(_) => "redis",
    };
    serde_json::json!({
        "ts_ms": ts_ms,
        "interval_s": (secs * 1000.0).round() / 1000.0,
        "node": {
            "node_id": cfg.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": admin.live.started.elapsed().as_secs(),
            "shards": samples.len(),
            "store": store,
        },
        // What an operator checks first; nothing secret (no keys, no Redis URL: it may hold
        // a password).
        "config": {
            "listen": cfg.listen.to_string(),
            "admin_listen": cfg.admin_listen.to_string(),
            "auth": match (cfg.jwt_secret.is_some(), cfg.jwks_url.is_some()) {
                (true, true) => "jwt (HS256) + jwks",
                (true, false) => "jwt (HS256)",
                (false, true) => "jwks",
                (false, false) => "dev mode (?user=)",
            },
            "max_connections": cfg.max_connections,
            "max_frame": cfg.max_frame,
            "heartbeat_ms": cfg.heartbeat_ms,
            "ack_timeout_ms": cfg.ack_timeout_ms,
            "window": cfg.window,
            "drain_ms": cfg.drain_ms,
            "park_idle_ms": cfg.park_idle_ms,
            "allowed_origins": cfg.allowed_origins.len(),
            "echo_route": cfg.echo_route,
            "huge_pages": cfg.huge_pages,
            "user_send_rate": cfg.user_send_rate,
            "conn_frame_rate": cfg.conn_frame_rate,
            "push": cfg.push.is_some(),
            "draining": admin.shared.draining.load(Ordering::Relaxed),
        },
        "shards": shards,
        "total": total.row("all".into(), prev_total.as_ref(), secs),
        "live": {
            "open": admin.live.open.load(Ordering::Relaxed),
            "max": MAX_LIVE_STREAMS,
            "refused": admin.live.refused.load(Ordering::Relaxed),
        },
    })
    .to_string()
}

/// `GET /ops` and its two files: embedded, no data in them, so no key needed. The page reads
/// its key from the URL fragment (never sent) or a form, and sends it only to `/api/live`.
pub fn ops_file(path: &str) -> Option<Response<Full<Bytes>>> {
    let (body, kind): (&'static str, &str) = match path {
        "/ops" | "/ops/" => (include_str!("ops/index.html"), "text/html; charset=utf-8"),
        "/ops/app.js" => (include_str!("ops/app.js"), "text/javascript; charset=utf-8"),
        "/ops/style.css" => (include_str!("ops/style.css"), "text/css; charset=utf-8"),
        _ => return None,
    };
    Some(
        Response::builder()
            .header("content-type", kind)
            .header("cache-control", "no-store")
            // Only our own files and our own stream; no inline script, no framing, and the
            // page's address (which may hold the key's fragment) never leaves as a referrer.
            .header(
                "content-security-policy",
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            )
            .header("referrer-policy", "no-referrer")
            .header("x-content-type-options", "nosniff")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_over_the_interval_and_redis_mean_latency() {
        let before = Sample {
            frames_in: 100,
            msgs_in: 10,
            redis_batches: 4,
            redis_us: 4_000,
            ..Sample::default()
        };
        let after = Sample {
            connections: 3,
            frames_in: 300,
            msgs_in: 30,
            redis_batches: 6,
            redis_us: 10_000,
            ..Sample::default()
        };
        let row = after.row(0.into(), Some(&before), 2.0);
        assert_eq!(row["connections"], 3);
        assert_eq!(row["frames_in_s"], 100.0);
        assert_eq!(row["msgs_in_s"], 10.0);
        assert_eq!(row["redis_ms"], 3.0, "6 ms over 2 batches");
        assert_eq!(row["totals"]["frames_in"], 300);
        let first = after.row(0.into(), None, 0.0);
        assert!(first["frames_in_s"].is_null() && first["redis_ms"].is_null());
        let quiet = after.row(0.into(), Some(&after), 1.0);
        assert_eq!(quiet["frames_in_s"], 0.0);
        assert!(quiet["redis_ms"].is_null(), "no batch, no latency");
    }

    #[test]
    fn the_stream_bound_refuses_and_counts() {
        let live = LiveStreams::new();
        for _ in 0..MAX_LIVE_STREAMS {
            assert!(live.open());
        }
        assert!(!live.open());
        assert_eq!(live.refused.load(Ordering::Relaxed), 1);
        live.open.fetch_sub(1, Ordering::AcqRel);
        assert!(live.open());
    }
}
