//! Per-shard metrics and their Prometheus text rendering.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer, so counters are plain
//! relaxed load+store (no locked read-modify-write, no cache line shared between shards: the
//! struct is 128-byte aligned). The admin thread only reads them when `/metrics` is scraped.
//! Every series name is a constant below and every series carries a `shard` label; the
//! process-wide ones (`process_*`, build info) carry `shard="process"`, as the admin
//! listener's and the push worker's carry `shard="admin"` and `shard="push"`.

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
pub const MSG_FRAMES_OUT: &str = "ringgate_msg_frames_out_total";
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
pub const RECV_BUFFERS_EXHAUSTED: &str = "ringgate_recv_buffers_exhausted_total";
pub const PARKS: &str = "ringgate_parks_total";
pub const UNPARKS: &str = "ringgate_unparks_total";
pub const STALLS: &str = "ringgate_shard_stalls_total";
pub const STALL_MAX: &str = "ringgate_shard_stall_max_seconds";
pub const WATCHDOG_NUDGES: &str = "ringgate_shard_watchdog_nudges_total";
pub const REDIS_UP: &str = "ringgate_redis_up";
pub const STORE_UP: &str = "ringgate_store_up";
pub const BUILD_INFO: &str = "ringgate_build_info";
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_START: &str = "process_start_time_seconds";
pub const REDIS_BREAKER_OPEN: &str = "ringgate_redis_breaker_open";
pub const REDIS_BATCHES: &str = "ringgate_redis_batches_total";
pub const REDIS_OPS: &str = "ringgate_redis_ops_total";
pub const REDIS_ERRORS: &str = "ringgate_redis_errors_total";
pub const REDIS_SPILLED_BYTES: &str = "ringgate_redis_spilled_bytes_total";
pub const REDIS_LOADS: &str = "ringgate_redis_loads_total";
pub const REDIS_REMOVES_DROPPED: &str = "ringgate_redis_removes_dropped_total";
pub const REDIS_REMOVES_RETRIED: &str = "ringgate_redis_removes_retried_total";
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
pub const STORE_RESOLVED: &str = "ringgate_store_writes_resolved_total";
pub const SENDS_REFUSED: &str = "ringgate_sends_refused_total";

/// Upper bounds (microseconds) of the latency histogram buckets: past every timeout a send
/// or a Redis batch can wait for (redis_timeout_ms 2 s, ack and push timeouts 5 s; overload
/// p99s were measured at 2.7 s), so a slow tail shows in a bucket, not only in +Inf.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
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
    /// `msg` frames written to clients once each (first delivery or replay): with
    /// `room_deliveries`, the messages going out (`ringgate stats`' msgs_out/s).
    pub msg_frames_out: Counter,
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
    pub recv_buffers_exhausted: Counter,
    pub parks: Counter,
    pub unparks: Counter,
    pub stalls: Counter,
    pub stall_max_ms: Gauge,
    pub watchdog_nudges: Gauge,
    pub redis_up: Gauge,
    /// 1 when this shard's offline store is Redis (set once at start): `ringgate_redis_up`
    /// is exported only then, and `ringgate_store_up` follows it.
    pub redis_store: Gauge,
    pub redis_breaker_open: Gauge,
    pub redis_batches: Counter,
    pub redis_ops: Counter,
    pub redis_errors: Counter,
    pub redis_spilled_bytes: Counter,
    pub redis_loads: Counter,
    pub redis_removes_dropped: Counter,
    pub redis_removes_retried: Counter,
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
    pub store_resolved: Counter,
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
        MSG_FRAMES_OUT,
        "`msg` frames written to clients: first deliveries and replays (retransmits are counted in ringgate_retransmits_total).",
        Kind::Counter,
        |m| m.msg_frames_out.get(),
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
        RECV_BUFFERS_EXHAUSTED,
        "io_driver = \"uring\": receives that ended because the shard's receive buffer ring was empty (the socket is received again once buffers come back).",
        Kind::Counter,
        |m| m.recv_buffers_exhausted.get(),
    ),
    (
        STORE_UP,
        "1 while this shard's offline store answers: always 1 for the embedded store; with Redis, as ringgate_redis_up.",
        Kind::Gauge,
        |m| {
            if m.redis_store.get() == 1 {
                m.redis_up.get()
            } else {
                1
            }
        },
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
        "Acked entries whose removal was given up: more deletes waited to be sent again than a shard keeps (redelivered later, deduped by clients).",
        Kind::Counter,
        |m| m.redis_removes_dropped.get(),
    ),
    (
        REDIS_REMOVES_RETRIED,
        "Deletes of acked entries sent again because Redis did not run them (failed, refused by the queue, or answer lost).",
        Kind::Counter,
        |m| m.redis_removes_retried.get(),
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
        "Inbox writes whose answer was lost (they may have landed), not resolved yet: their senders wait (SPEC 4, Order).",
        Kind::Gauge,
        |m| m.store_writes_in_doubt.get(),
    ),
    (
        STORE_RESOLVED,
        "Inbox writes whose answer was lost, resolved once Redis answered: `accepted` if they had landed, else fenced (they never land) and `unavailable`.",
        Kind::Counter,
        |m| m.store_resolved.get(),
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
        WHEEL_ENTRIES,
        "Deadlines pending in the shard's timing wheel.",
        Kind::Gauge,
        |m| m.wheel_entries.get(),
    ),
];

/// Prometheus text exposition of all shards, then of the process.
pub fn render(shards: &[std::sync::Arc<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(4096 * shards.len().max(1));
    // Only with Redis: without it there is nothing to be up, and an alert on 0 would fire on
    // every embedded-store install (`ringgate_store_up` reads right for both).
    if shards.iter().any(|m| m.redis_store.get() == 1) {
        let _ = writeln!(
            out,
            "# HELP {REDIS_UP} 1 while this shard's last Redis batch succeeded (exported only with a redis_url).\n# TYPE {REDIS_UP} gauge"
        );
        for (i, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{REDIS_UP}{{shard=\"{i}\"}} {}", m.redis_up.get());
        }
    }
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
                "{CONNECTIONS_REFUSED}{{shard=\"{i}\",reason=\"{}\"}} {}",
                r.label(),
                m.refused[r.index()].get()
            );
        }
    }
    // In seconds, the base unit (kept in ms by the shard).
    let _ = writeln!(
        out,
        "# HELP {STALL_MAX} Longest gap between two ticks of the shard since start (an idle shard's planned once-a-second tick not counted).\n# TYPE {STALL_MAX} gauge"
    );
    for (i, m) in shards.iter().enumerate() {
        let seconds = m.stall_max_ms.get() as f64 / 1e3;
        let _ = writeln!(out, "{STALL_MAX}{{shard=\"{i}\"}} {seconds}");
    }
    render_process(&mut out);
    out
}

/// What the process costs, read from /proc/self at scrape time (the names client libraries
/// use, so stock dashboards and alerts work), and which build runs.
pub fn render_process(out: &mut String) {
    let p = ProcessStats::read();
    let mut one = |name: &str, help: &str, kind: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{shard=\"process\"}} {value}"
        );
    };
    if let Some(v) = p.rss_bytes {
        one(
            PROCESS_RSS,
            "Resident memory size in bytes.",
            "gauge",
            v.to_string(),
        );
    }
    if let Some(v) = p.cpu_seconds {
        one(
            PROCESS_CPU,
            "Total user and system CPU time spent in seconds.",
            "counter",
            v.to_string(),
        );
    }
    if let Some(v) = p.open_fds {
        one(
            PROCESS_OPEN_FDS,
            "Number of open file descriptors.",
            "gauge",
            v.to_string(),
        );
    }
    if let Some(v) = p.max_fds {
        one(
            PROCESS_MAX_FDS,
            "Maximum number of open file descriptors (RLIMIT_NOFILE, soft).",
            "gauge",
            v.to_string(),
        );
    }
    if let Some(v) = p.start_time_seconds {
        one(
            PROCESS_START,
            "Start time of the process since unix epoch in seconds.",
            "gauge",
            v.to_string(),
        );
    }
    let _ = writeln!(
        out,
        "# HELP {BUILD_INFO} The running build (always 1).\n# TYPE {BUILD_INFO} gauge\n{BUILD_INFO}{{shard=\"process\",version=\"{}\",profile=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
}

/// The process figures Prometheus client libraries export, from /proc (None: unreadable).
#[derive(Debug, Default)]
pub struct ProcessStats {
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    pub fn read() -> ProcessStats {
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name (which may hold spaces), from field 3 (state) on.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu_seconds = field(14)
            .zip(field(15))
            .map(|(u, s)| (u + s) as f64 / ticks);
        let rss_bytes = field(24).map(|pages| pages * page.max(1) as u64);
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        });
        let start_time_seconds = field(22)
            .zip(boot)
            .map(|(since_boot, boot)| boot as f64 + since_boot as f64 / ticks);
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        let max_fds = crate::preflight::open_files_soft();
        ProcessStats {
            rss_bytes,
            cpu_seconds,
            open_fds,
            max_fds,
            start_time_seconds,
        }
    }
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
        assert!(text
            .contains("ringgate_connections_refused_total{shard=\"0\",reason=\"unauthorized\"} 1"));
    }

    /// Without Redis there is no `ringgate_redis_up` to alert on, and the store reads up.
    #[test]
    fn store_state_reads_right_with_and_without_redis() {
        let shards = vec![Arc::new(ShardMetrics::default())];
        let text = render(&shards);
        assert!(!text.contains("ringgate_redis_up{"), "{text}");
        assert!(text.contains("ringgate_store_up{shard=\"0\"} 1"), "{text}");
        shards[0].redis_store.set(1);
        let text = render(&shards);
        assert!(text.contains("ringgate_redis_up{shard=\"0\"} 0"), "{text}");
        assert!(text.contains("ringgate_store_up{shard=\"0\"} 0"), "{text}");
        shards[0].redis_up.set(1);
        assert!(render(&shards).contains("ringgate_store_up{shard=\"0\"} 1"));
    }

    #[test]
    fn process_series_come_from_proc() {
        let text = render(&[Arc::new(ShardMetrics::default())]);
        let value = |name: &str| -> f64 {
            let prefix = format!("{name}{{shard=\"process\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        assert!(value(PROCESS_RSS) > 1e6, "a process has over 1 MB resident");
        assert!(value(PROCESS_OPEN_FDS) >= 3.0);
        assert!(value(PROCESS_MAX_FDS) >= value(PROCESS_OPEN_FDS));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value(PROCESS_START);
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
        assert!(value(PROCESS_CPU) >= 0.0);
        assert!(text.contains(&format!(
            "ringgate_build_info{{shard=\"process\",version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn latency_histogram_is_cumulative_with_sum_and_count() {
        let shards = vec![Arc::new(ShardMetrics::default())];
        let h = &shards[0].send_accepted;
        h.observe(std::time::Duration::from_micros(80));
        h.observe(std::time::Duration::from_micros(900));
        h.observe(std::time::Duration::from_secs(3));
        let text = render(&shards);
        assert!(
            text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"0.0001\"} 1"),
            "{text}"
        );
        assert!(text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"0.001\"} 2"));
        assert!(text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"1\"} 2"));
        // 3 s lands past the Redis timeout, in a bucket of its own.
        assert!(text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"2.5\"} 2"));
        assert!(text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"5\"} 3"));
        assert!(text.contains("ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"+Inf\"} 3"));
        assert!(text.contains("ringgate_send_accepted_seconds_count{shard=\"0\"} 3"));
        assert!(text.contains("ringgate_send_accepted_seconds_sum{shard=\"0\"} 3.00098"));
    }

    #[test]
    fn shard_metrics_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<ShardMetrics>(), 128);
    }
}
