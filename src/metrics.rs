//! Per-shard metrics and their Prometheus text rendering.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer, so counters are plain
//! relaxed load+store (no locked read-modify-write, no cache line shared between shards: the
//! struct is 128-byte aligned). The admin thread only reads them when `/metrics` is scraped.
//! Every series name is a constant below and every series carries a `shard` label.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::delivery::refusal::RefusalSource;
use crate::limit::Limited;
use crate::ws::upgrade::Refusal;

/// A monotonically increasing count written by one thread.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: load+store is enough and avoids a locked instruction per message.
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down, written by one thread.
#[derive(Default, Debug)]
pub struct Gauge(AtomicU64);

impl Gauge {
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed)
    }
    #[inline]
    pub fn inc(&self) {
        self.set(self.get() + 1)
    }
    #[inline]
    pub fn dec(&self) {
        self.sub(1)
    }
    #[inline]
    pub fn sub(&self, n: u64) {
        self.set(self.get().saturating_sub(n))
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

pub const CONNECTIONS_OPEN: &str = "ringgate_connections_open";
pub const HANDSHAKES_PENDING: &str = "ringgate_handshakes_pending";
pub const CONNECTIONS_ACCEPTED: &str = "ringgate_connections_accepted_total";
pub const CONNECTIONS_REFUSED: &str = "ringgate_connections_refused_total";
pub const FRAMES_IN: &str = "ringgate_frames_in_total";
pub const FRAMES_OUT: &str = "ringgate_frames_out_total";
pub const BYTES_IN: &str = "ringgate_bytes_in_total";
pub const BYTES_OUT: &str = "ringgate_bytes_out_total";
pub const PINGS_SENT: &str = "ringgate_heartbeat_pings_total";
pub const HEARTBEAT_CLOSES: &str = "ringgate_heartbeat_closes_total";
pub const HANDSHAKE_TIMEOUTS: &str = "ringgate_handshake_timeouts_total";
pub const BAD_FRAMES: &str = "ringgate_bad_frames_total";
pub const PROTOCOL_CLOSES: &str = "ringgate_protocol_closes_total";
pub const OVERSIZE_CLOSES: &str = "ringgate_oversize_closes_total";
pub const ABUSE_CLOSES: &str = "ringgate_abuse_closes_total";
pub const RATE_LIMITED: &str = "ringgate_rate_limited_total";
pub const RATE_LIMIT_CLOSES: &str = "ringgate_rate_limit_closes_total";
pub const IP_ENTRIES_FORGOTTEN: &str = "ringgate_ip_limit_entries_forgotten_total";
pub const WHEEL_ENTRIES: &str = "ringgate_wheel_entries";
pub const CONNECTIONS_PARKED: &str = "ringgate_connections_parked";
pub const USERS: &str = "ringgate_users_online";
pub const ACKS_PENDING: &str = "ringgate_acks_pending";
pub const INBOX_EXPIRED: &str = "ringgate_inbox_expired_total";
pub const SENDS: &str = "ringgate_sends_total";
pub const DEDUP_HITS: &str = "ringgate_dedup_hits_total";
pub const STORED: &str = "ringgate_stored_total";
pub const STORE_REFUSED: &str = "ringgate_store_refused_total";
pub const DELIVERED: &str = "ringgate_delivered_total";
pub const ACKS: &str = "ringgate_acks_total";
pub const RETRANSMITS: &str = "ringgate_retransmits_total";
pub const ACK_TIMEOUTS: &str = "ringgate_ack_timeouts_total";
pub const REPLAYED: &str = "ringgate_replayed_total";
pub const CROSS_SHARD: &str = "ringgate_cross_shard_total";
pub const CROSS_NODE_OUT: &str = "ringgate_cross_node_out_total";
pub const CROSS_NODE_IN: &str = "ringgate_cross_node_in_total";
pub const LEASE_REFRESHES: &str = "ringgate_node_lease_refreshes_total";
pub const PRESENCE_LOOKUPS: &str = "ringgate_presence_directory_lookups_total";
pub const CLUSTER_EPOCH: &str = "ringgate_cluster_epoch";
pub const ID_SLOT_HELD: &str = "ringgate_message_id_slot_held";
pub const WINDOW_FULL: &str = "ringgate_window_full_total";
pub const HANDOFFS_OUT: &str = "ringgate_handoffs_out_total";
pub const HANDOFFS_IN: &str = "ringgate_handoffs_in_total";
pub const MESH_FULL: &str = "ringgate_mesh_full_total";
pub const PARKS: &str = "ringgate_parks_total";
pub const UNPARKS: &str = "ringgate_unparks_total";
pub const STALLS: &str = "ringgate_shard_stalls_total";
pub const STALL_MAX: &str = "ringgate_shard_stall_max_ms";
pub const WATCHDOG_NUDGES: &str = "ringgate_shard_watchdog_nudges_total";
pub const REDIS_UP: &str = "ringgate_redis_up";
pub const REDIS_BREAKER_OPEN: &str = "ringgate_redis_breaker_open";
pub const REDIS_BATCHES: &str = "ringgate_redis_batches_total";
pub const REDIS_OPS: &str = "ringgate_redis_ops_total";
pub const REDIS_ERRORS: &str = "ringgate_redis_errors_total";
pub const REDIS_SPILLED_BYTES: &str = "ringgate_redis_spilled_bytes_total";
pub const REDIS_LOADS: &str = "ringgate_redis_loads_total";
pub const REDIS_REMOVES_DROPPED: &str = "ringgate_redis_removes_dropped_total";
pub const INBOX_MIRRORED: &str = "ringgate_inbox_mirrored_entries";
pub const ROOMS: &str = "ringgate_rooms";
pub const ROOM_MEMBERS: &str = "ringgate_room_members";
pub const ROOM_PUBLISHES: &str = "ringgate_room_publishes_total";
pub const ROOM_DELIVERIES: &str = "ringgate_room_deliveries_total";
pub const ROOM_GAPS: &str = "ringgate_room_gaps_total";
pub const SLOW_CLOSES: &str = "ringgate_slow_closes_total";
pub const LIVE_SENDS: &str = "ringgate_live_sends_total";
pub const TYPING: &str = "ringgate_typing_total";
pub const TYPING_DELIVERED: &str = "ringgate_typing_delivered_total";
pub const TYPING_DROPPED: &str = "ringgate_typing_dropped_total";
pub const READS: &str = "ringgate_reads_total";
pub const WATCHED: &str = "ringgate_watched_users";
pub const SUMMARIES: &str = "ringgate_inbox_summaries_total";
pub const WATCH_REFUSED: &str = "ringgate_watch_refused_total";
pub const PRESENCE_TOLD: &str = "ringgate_presence_told_total";
pub const READS_REDUNDANT: &str = "ringgate_reads_redundant_total";
pub const READS_REFUSED: &str = "ringgate_reads_refused_total";
pub const PUSH_QUEUED: &str = "ringgate_push_queued_total";
pub const PUSH_DROPPED: &str = "ringgate_push_dropped_total";
pub const LIVE_ACKED: &str = "ringgate_live_acked_total";
pub const LIVE_SPILLED: &str = "ringgate_live_spilled_total";
pub const STORE_WRITES_IN_DOUBT: &str = "ringgate_store_writes_in_doubt";
pub const STORE_REVOKED: &str = "ringgate_store_revoked_total";
pub const SENDS_REFUSED: &str = "ringgate_sends_refused_total";

/// Upper bounds (microseconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A latency histogram written by one thread (fixed buckets, Prometheus layout).
#[derive(Default, Debug)]
pub struct Histogram {
    buckets: [Counter; LATENCY_BUCKETS_US.len()],
    count: Counter,
    sum_us: Counter,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = LATENCY_BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].inc();
        }
        self.count.inc();
        self.sum_us.add(us);
    }

    pub fn count(&self) -> u64 {
        self.count.get()
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.get()
    }
}

pub const SEND_ACCEPTED: &str = "ringgate_send_accepted_seconds";
pub const REDIS_LATENCY: &str = "ringgate_redis_batch_seconds";

#[derive(Default, Debug)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// `send` received -> `accepted` decided (on the sender's home shard).
    pub send_accepted: Histogram,
    /// One Redis batch (script call) from submit to answer, as the Redis thread saw it.
    pub redis_latency: Histogram,
    pub connections_open: Gauge,
    pub handshakes_pending: Gauge,
    pub connections_accepted: Counter,
    pub refused: [Counter; Refusal::ALL.len()],
    /// Sends and publishes answered `unavailable` (or 503 on the API), by where the refusal
    /// came from (`delivery::refusal`).
    pub refusals: [Counter; RefusalSource::ALL.len()],
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub pings_sent: Counter,
    pub heartbeat_closes: Counter,
    pub handshake_timeouts: Counter,
    pub bad_frames: Counter,
    pub protocol_closes: Counter,
    pub oversize_closes: Counter,
    pub abuse_closes: Counter,
    /// Frames answered `rate_limited` (or, on /echo and for pings, dropped), by limit.
    pub rate_limited: [Counter; Limited::ALL.len()],
    pub rate_limit_closes: Counter,
    pub ip_entries_forgotten: Counter,
    pub wheel_entries: Gauge,
    pub connections_parked: Gauge,
    pub users: Gauge,
    pub acks_pending: Gauge,
    pub inbox_expired: Counter,
    pub sends: Counter,
    pub dedup_hits: Counter,
    pub stored: Counter,
    pub store_refused: Counter,
    pub delivered: Counter,
    pub acks: Counter,
    pub retransmits: Counter,
    pub ack_timeouts: Counter,
    pub replayed: Counter,
    pub cross_shard: Counter,
    pub cross_node_out: Counter,
    pub cross_node_in: Counter,
    pub lease_refreshes: Counter,
    pub presence_lookups: Counter,
    pub cluster_epoch: Gauge,
    pub id_slot_held: Gauge,
    pub window_full: Counter,
    pub handoffs_out: Counter,
    pub handoffs_in: Counter,
    pub mesh_full: Counter,
    pub parks: Counter,
    pub unparks: Counter,
    pub stalls: Counter,
    pub stall_max_ms: Gauge,
    pub watchdog_nudges: Gauge,
    pub redis_up: Gauge,
    pub redis_breaker_open: Gauge,
    pub redis_batches: Counter,
    pub redis_ops: Counter,
    pub redis_errors: Counter,
    pub redis_spilled_bytes: Counter,
    pub redis_loads: Counter,
    pub redis_removes_dropped: Counter,
    pub inbox_mirrored: Gauge,
    pub live_sends: Counter,
    pub typing: Counter,
    pub typing_delivered: Counter,
    pub typing_dropped: Counter,
    pub reads: Counter,
    pub watched: Gauge,
    pub summaries: Counter,
    pub watch_refused: Counter,
    pub presence_told: Counter,
    pub reads_redundant: Counter,
    pub reads_refused: Counter,
    /// Offline pushes handed to the push worker, and those dropped (its queue was full).
    pub push_queued: Counter,
    pub push_dropped: Counter,
    pub live_acked: Counter,
    pub live_spilled: Counter,
    pub store_writes_in_doubt: Gauge,
    pub store_revoked: Counter,
    pub rooms: Gauge,
    pub room_members: Gauge,
    pub room_publishes: Counter,
    pub room_deliveries: Counter,
    pub room_gaps: Counter,
    pub slow_closes: Counter,
}

enum Kind {
    Counter,
    Gauge,
}

type Read = fn(&ShardMetrics) -> u64;

/// (name, help, kind, reader) for every unlabelled series.
const SERIES: &[(&str, &str, Kind, Read)] = &[
    (
        CONNECTIONS_OPEN,
        "Open WebSocket connections.",
        Kind::Gauge,
        |m| m.connections_open.get(),
    ),
    (
        HANDSHAKES_PENDING,
        "Sockets accepted but not yet upgraded.",
        Kind::Gauge,
        |m| m.handshakes_pending.get(),
    ),
    (
        CONNECTIONS_ACCEPTED,
        "WebSocket upgrades completed.",
        Kind::Counter,
        |m| m.connections_accepted.get(),
    ),
    (
        FRAMES_IN,
        "WebSocket frames received.",
        Kind::Counter,
        |m| m.frames_in.get(),
    ),
    (FRAMES_OUT, "WebSocket frames sent.", Kind::Counter, |m| {
        m.frames_out.get()
    }),
    (
        BYTES_IN,
        "Bytes received on WebSocket connections.",
        Kind::Counter,
        |m| m.bytes_in.get(),
    ),
    (
        BYTES_OUT,
        "Bytes sent on WebSocket connections.",
        Kind::Counter,
        |m| m.bytes_out.get(),
    ),
    (
        PINGS_SENT,
        "Heartbeat pings sent to silent connections.",
        Kind::Counter,
        |m| m.pings_sent.get(),
    ),
    (
        HEARTBEAT_CLOSES,
        "Connections closed (1001) after 3 x heartbeat_ms of silence.",
        Kind::Counter,
        |m| m.heartbeat_closes.get(),
    ),
    (
        HANDSHAKE_TIMEOUTS,
        "Sockets closed for not completing the upgrade in time.",
        Kind::Counter,
        |m| m.handshake_timeouts.get(),
    ),
    (
        BAD_FRAMES,
        "Client frames answered with an error (bad_request, unknown_op, ...).",
        Kind::Counter,
        |m| m.bad_frames.get(),
    ),
    (
        PROTOCOL_CLOSES,
        "Connections closed for RFC 6455 violations (1002/1007).",
        Kind::Counter,
        |m| m.protocol_closes.get(),
    ),
    (
        OVERSIZE_CLOSES,
        "Connections closed (1009) for a frame over max_frame.",
        Kind::Counter,
        |m| m.oversize_closes.get(),
    ),
    (
        ABUSE_CLOSES,
        "Connections closed (1008) after too many bad frames.",
        Kind::Counter,
        |m| m.abuse_closes.get(),
    ),
    (
        RATE_LIMIT_CLOSES,
        "Connections closed (1008) for flooding past their frame limit (rate_limit_strikes).",
        Kind::Counter,
        |m| m.rate_limit_closes.get(),
    ),
    (
        IP_ENTRIES_FORGOTTEN,
        "Per-address limit entries forgotten to keep the table bounded (their next connect starts a full bucket).",
        Kind::Counter,
        |m| m.ip_entries_forgotten.get(),
    ),
    (
        SENDS,
        "`send` frames received (including resends).",
        Kind::Counter,
        |m| m.sends.get(),
    ),
    (
        DEDUP_HITS,
        "Resent cids answered without a second message.",
        Kind::Counter,
        |m| m.dedup_hits.get(),
    ),
    (
        STORED,
        "Messages appended to an offline inbox (made safe).",
        Kind::Counter,
        |m| m.stored.get(),
    ),
    (
        STORE_REFUSED,
        "Messages the inbox refused (full): the sender got `unavailable`.",
        Kind::Counter,
        |m| m.store_refused.get(),
    ),
    (
        DELIVERED,
        "`delivered` answers: a device of the recipient acked.",
        Kind::Counter,
        |m| m.delivered.get(),
    ),
    (ACKS, "`ack` frames received.", Kind::Counter, |m| {
        m.acks.get()
    }),
    (
        RETRANSMITS,
        "`msg` frames sent again after the ack timeout.",
        Kind::Counter,
        |m| m.retransmits.get(),
    ),
    (
        ACK_TIMEOUTS,
        "Connections closed after the last retransmit went unacked.",
        Kind::Counter,
        |m| m.ack_timeouts.get(),
    ),
    (
        REPLAYED,
        "Inbox entries replayed to a connection before `synced`.",
        Kind::Counter,
        |m| m.replayed.get(),
    ),
    (
        CROSS_SHARD,
        "Messages sent to another shard (the recipient's home).",
        Kind::Counter,
        |m| m.cross_shard.get(),
    ),
    (
        CROSS_NODE_OUT,
        "Inbox entries pushed to other nodes holding a device of the recipient (through Redis).",
        Kind::Counter,
        |m| m.cross_node_out.get(),
    ),
    (
        CROSS_NODE_IN,
        "Messages this shard took from its node's Redis channel: inbox entries and room messages (from every node, this one included) and `delivered` reports from other nodes.",
        Kind::Counter,
        |m| m.cross_node_in.get(),
    ),
    (
        LEASE_REFRESHES,
        "Node lease refreshes queued (shard 0; the presence directory counts a node alive while its lease lives).",
        Kind::Counter,
        |m| m.lease_refreshes.get(),
    ),
    (
        PRESENCE_LOOKUPS,
        "Presence questions sent to the Redis directory (users on other nodes).",
        Kind::Counter,
        |m| m.presence_lookups.get(),
    ),
    (
        CLUSTER_EPOCH,
        "With Redis: resyncs with this node's channel so far (0: not heard yet, and /readyz answers 503).",
        Kind::Gauge,
        |m| m.cluster_epoch.get(),
    ),
    (
        ID_SLOT_HELD,
        "1 while this shard holds a message id slot (with Redis: claimed there and renewed in time; see README \"Message ids\"), 0 while it does not and its sends get `unavailable` (/readyz answers 503).",
        Kind::Gauge,
        |m| m.id_slot_held.get(),
    ),
    (
        WINDOW_FULL,
        "Times a connection's window filled while its inbox had more.",
        Kind::Counter,
        |m| m.window_full.get(),
    ),
    (
        INBOX_EXPIRED,
        "Offline inbox entries dropped for age (inbox_max_age_ms).",
        Kind::Counter,
        |m| m.inbox_expired.get(),
    ),
    (
        ACKS_PENDING,
        "`msg` frames sent and not yet acknowledged (all connections of the shard).",
        Kind::Gauge,
        |m| m.acks_pending.get(),
    ),
    (
        USERS,
        "Users with at least one connection, counted on their home shard.",
        Kind::Gauge,
        |m| m.users.get(),
    ),
    (
        HANDOFFS_OUT,
        "Upgraded sockets handed to their user's home shard.",
        Kind::Counter,
        |m| m.handoffs_out.get(),
    ),
    (
        HANDOFFS_IN,
        "Upgraded sockets adopted from another shard (this is the user's home).",
        Kind::Counter,
        |m| m.handoffs_in.get(),
    ),
    (
        MESH_FULL,
        "Messages another shard's full mesh channel handed back.",
        Kind::Counter,
        |m| m.mesh_full.get(),
    ),
    (
        REDIS_UP,
        "1 while this shard's last Redis batch succeeded (0 also without Redis).",
        Kind::Gauge,
        |m| m.redis_up.get(),
    ),
    (
        REDIS_BREAKER_OPEN,
        "1 while this shard's Redis circuit breaker is open: Redis left 3 batches in a row unanswered in time, and store operations fail at once until a probe answers.",
        Kind::Gauge,
        |m| m.redis_breaker_open.get(),
    ),
    (
        REDIS_BATCHES,
        "Redis round trips (one script call carries many operations).",
        Kind::Counter,
        |m| m.redis_batches.get(),
    ),
    (
        REDIS_OPS,
        "Store operations sent to Redis (append, remove, load).",
        Kind::Counter,
        |m| m.redis_ops.get(),
    ),
    (
        REDIS_ERRORS,
        "Redis batches that failed or timed out (their sends got `unavailable`).",
        Kind::Counter,
        |m| m.redis_errors.get(),
    ),
    (
        REDIS_SPILLED_BYTES,
        "Message bytes (body + cid) written to Redis inboxes.",
        Kind::Counter,
        |m| m.redis_spilled_bytes.get(),
    ),
    (
        REDIS_LOADS,
        "Inboxes read from Redis when a user's first device connected.",
        Kind::Counter,
        |m| m.redis_loads.get(),
    ),
    (
        REDIS_REMOVES_DROPPED,
        "Acked entries whose removal could not be queued (redelivered later, deduped by clients).",
        Kind::Counter,
        |m| m.redis_removes_dropped.get(),
    ),
    (
        TYPING,
        "`typing` frames taken from this shard's clients (within the per-user send limit).",
        Kind::Counter,
        |m| m.typing.get(),
    ),
    (
        TYPING_DELIVERED,
        "`typing` frames written to recipient devices on this shard.",
        Kind::Counter,
        |m| m.typing_delivered.get(),
    ),
    (
        TYPING_DROPPED,
        "`typing` notices dropped instead of queued: a shard's channel or the Redis queue was full (typing is ephemeral).",
        Kind::Counter,
        |m| m.typing_dropped.get(),
    ),
    (
        SUMMARIES,
        "Connections that got an inbox `summary` instead of the replay (more than `inbox_summary_over` waiting).",
        Kind::Counter,
        |m| m.summaries.get(),
    ),
    (
        WATCHED,
        "Users homed on this shard that some connection of this node watches (`watch`).",
        Kind::Gauge,
        |m| m.watched.get(),
    ),
    (
        WATCH_REFUSED,
        "`watch` frames refused: the connection would watch more than 100 users.",
        Kind::Counter,
        |m| m.watch_refused.get(),
    ),
    (
        PRESENCE_TOLD,
        "`presence` change frames written to watching connections on this shard.",
        Kind::Counter,
        |m| m.presence_told.get(),
    ),
    (
        READS,
        "Read receipts taken from this shard's clients and sent on to the store for the sender's and the reader's devices.",
        Kind::Counter,
        |m| m.reads.get(),
    ),
    (
        READS_REDUNDANT,
        "`read` frames at or below a receipt the reader already sent (nothing to tell).",
        Kind::Counter,
        |m| m.reads_redundant.get(),
    ),
    (
        READS_REFUSED,
        "`read` frames refused: no message of that sender with that id (or a later one) was sent to the reader.",
        Kind::Counter,
        |m| m.reads_refused.get(),
    ),
    (
        PUSH_QUEUED,
        "Offline pushes this shard handed to the push worker (a direct message stored for a user with no device on any node).",
        Kind::Counter,
        |m| m.push_queued.get(),
    ),
    (
        PUSH_DROPPED,
        "Offline pushes dropped because the push queue was full (push_queue_max); the messages stay in the inbox.",
        Kind::Counter,
        |m| m.push_dropped.get(),
    ),
    (
        LIVE_SENDS,
        "Messages sent to online recipients from memory while Redis was unavailable (accepted on their ack).",
        Kind::Counter,
        |m| m.live_sends.get(),
    ),
    (
        LIVE_ACKED,
        "Of those, acked by a device (accepted then).",
        Kind::Counter,
        |m| m.live_acked.get(),
    ),
    (
        LIVE_SPILLED,
        "Of those, unacked when the recipient's last device left: appended to Redis (or refused).",
        Kind::Counter,
        |m| m.live_spilled.get(),
    ),
    (
        STORE_WRITES_IN_DOUBT,
        "Inbox writes reported as failed that may still land, not yet revoked (SPEC 4, Order).",
        Kind::Gauge,
        |m| m.store_writes_in_doubt.get(),
    ),
    (
        STORE_REVOKED,
        "Inbox writes reported as failed, revoked: removed if they had landed, refused if they land later.",
        Kind::Counter,
        |m| m.store_revoked.get(),
    ),
    (
        ROOMS,
        "Rooms whose home is this shard (history or members).",
        Kind::Gauge,
        |m| m.rooms.get(),
    ),
    (
        ROOM_MEMBERS,
        "Room memberships of this shard's connections.",
        Kind::Gauge,
        |m| m.room_members.get(),
    ),
    (
        ROOM_PUBLISHES,
        "Room messages published (offsets handed out) by this home shard.",
        Kind::Counter,
        |m| m.room_publishes.get(),
    ),
    (
        ROOM_DELIVERIES,
        "Room messages written to this shard's members (fan-out).",
        Kind::Counter,
        |m| m.room_deliveries.get(),
    ),
    (
        ROOM_GAPS,
        "`gap` frames: room messages skipped for a slow member.",
        Kind::Counter,
        |m| m.room_gaps.get(),
    ),
    (
        SLOW_CLOSES,
        "Members closed with 1013 for staying over their outbound buffer.",
        Kind::Counter,
        |m| m.slow_closes.get(),
    ),
    (
        INBOX_MIRRORED,
        "Inbox entries held in memory (embedded store: all; Redis: online users' mirror).",
        Kind::Gauge,
        |m| m.inbox_mirrored.get(),
    ),
    (
        CONNECTIONS_PARKED,
        "Idle connections parked outside glommio (no task, no buffer).",
        Kind::Gauge,
        |m| m.connections_parked.get(),
    ),
    (
        PARKS,
        "Connections parked after park_idle_ms without input.",
        Kind::Counter,
        |m| m.parks.get(),
    ),
    (
        UNPARKS,
        "Parked connections handed back to a socket task.",
        Kind::Counter,
        |m| m.unparks.get(),
    ),
    (
        STALLS,
        "Times the shard's tick ran over a second late (its loop was held up: starved of CPU or by a task that did not yield).",
        Kind::Counter,
        |m| m.stalls.get(),
    ),
    (
        WATCHDOG_NUDGES,
        "Times the park poller woke the shard thread because it had not ticked for 250 ms (glommio slept through its timer, or the thread waited for CPU).",
        Kind::Counter,
        |m| m.watchdog_nudges.get(),
    ),
    (
        STALL_MAX,
        "Longest gap between two ticks of the shard since start, in ms.",
        Kind::Gauge,
        |m| m.stall_max_ms.get(),
    ),
    (
        WHEEL_ENTRIES,
        "Deadlines pending in the shard's timing wheel.",
        Kind::Gauge,
        |m| m.wheel_entries.get(),
    ),
];

/// Prometheus text exposition of all shards.
pub fn render(shards: &[std::sync::Arc<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(4096 * shards.len().max(1));
    for (name, help, kind, read) in SERIES {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", read(m));
        }
    }
    render_histogram(
        &mut out,
        shards,
        SEND_ACCEPTED,
        "Time from a `send` reaching the sender's home shard to its `accepted`.",
        |m| &m.send_accepted,
    );
    render_histogram(
        &mut out,
        shards,
        REDIS_LATENCY,
        "Round trip of one Redis batch (many store operations in one script call).",
        |m| &m.redis_latency,
    );
    let _ = writeln!(
        out,
        "# HELP {SENDS_REFUSED} Sends and publishes refused (`unavailable`), by where the refusal came from.\n# TYPE {SENDS_REFUSED} counter"
    );
    for (i, m) in shards.iter().enumerate() {
        for s in RefusalSource::ALL {
            let _ = writeln!(
                out,
                "{SENDS_REFUSED}{{shard=\"{i}\",source=\"{}\"}} {}",
                s.as_str(),
                m.refusals[s.index()].get()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP {RATE_LIMITED} Frames over a rate limit: answered `rate_limited` (dropped on /echo, and for pings and acks), by limit.\n# TYPE {RATE_LIMITED} counter"
    );
    for (i, m) in shards.iter().enumerate() {
        for l in Limited::ALL {
            let _ = writeln!(
                out,
                "{RATE_LIMITED}{{shard=\"{i}\",limit=\"{}\"}} {}",
                l.label(),
                m.rate_limited[l.index()].get()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP {CONNECTIONS_REFUSED} Upgrades refused before the handshake, by reason.\n# TYPE {CONNECTIONS_REFUSED} counter"
    );
    for (i, m) in shards.iter().enumerate() {
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "{CONNECTIONS_REFUSED}{{shard=\"{i}\",reason=\"{}\",status=\"{}\"}} {}",
                r.label(),
                r.status().0,
                m.refused[r.index()].get()
            );
        }
    }
    out
}

fn render_histogram(
    out: &mut String,
    shards: &[std::sync::Arc<ShardMetrics>],
    name: &str,
    help: &str,
    pick: fn(&ShardMetrics) -> &Histogram,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (i, m) in shards.iter().enumerate() {
        let h = pick(m);
        let mut cumulative = 0;
        for (b, bound) in h.buckets.iter().zip(LATENCY_BUCKETS_US) {
            cumulative += b.get();
            let le = bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{i}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let count = h.count.get();
        let _ = writeln!(out, "{name}_bucket{{shard=\"{i}\",le=\"+Inf\"}} {count}");
        let sum = h.sum_us.get() as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{shard=\"{i}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{shard=\"{i}\"}} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn every_series_line_has_a_shard_label() {
        let shards: Vec<_> = (0..2).map(|_| Arc::new(ShardMetrics::default())).collect();
        shards[1].frames_in.add(7);
        shards[0].refused[Refusal::Unauthorized.index()].inc();
        let text = render(&shards);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains("shard=\""), "{line}");
        }
        assert!(text.contains("ringgate_frames_in_total{shard=\"1\"} 7"));
        assert!(text.contains(
            "ringgate_connections_refused_total{shard=\"0\",reason=\"unauthorized\",status=\"401\"} 1"
        ));
    }

    #[test]
    fn latency_histogram_is_cumulative_with_sum_and_count() {
        let shards = vec![Arc::new(ShardMetrics::default())];
        let h = &shards[0].send_accepted;
        h.observe(std::time::Duration::from_micros(80));
        h.observe(std::time::Duration::from_micros(900));
        h.observe(std::time::Duration::from_secs(3)); // beyond the last bound: only +Inf
        let text = render(&shards);
        assert!(
            text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"0.0001\"} 1"),
            "{text}"
        );
        assert!(text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"0.001\"} 2"));
        assert!(text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"1\"} 2"));
        assert!(text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"+Inf\"} 3"));
        assert!(text.contains("ringgate_send_accepted_seconds_count{shard=\"0\"} 3"));
        assert!(text.contains("ringgate_send_accepted_seconds_sum{shard=\"0\"} 3.00098"));
    }

    #[test]
    fn shard_metrics_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<ShardMetrics>(), 128);
    }
}
