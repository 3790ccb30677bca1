//! Configuration: TOML file -> CLI flags / `RINGGATE_*` env vars on top -> validated [`Config`].
//!
//! Precedence, highest first: command-line flag, environment variable, config file, built-in
//! default. Every key is named the same way everywhere (`heartbeat_ms` in TOML,
//! `--heartbeat-ms` on the command line, `RINGGATE_HEARTBEAT_MS` in the environment), and an
//! invalid value is refused at start with a message that names the key.
//! This module owns nothing at run time: it produces an immutable `Config` that shards share.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limit::ip::IpLimits;
use crate::limit::Rate;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Host-wide cap on open WebSocket connections. Large on purpose: the host's own limits
/// (file descriptors, memory) are the real bound; this one exists so an operator can set a
/// lower one and get clean 503s instead of accept errors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_000_000;
pub const DEFAULT_MAX_FRAME: usize = 65_536;
pub const DEFAULT_HEARTBEAT_MS: u64 = 30_000;
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// How long a closing connection waits for a peer that neither answers our close frame nor
/// closes TCP, or does not read what is left to send.
pub const DEFAULT_CLOSE_LINGER_MS: u64 = 3_000;
/// How long a watched user must stay offline before watchers are told (`watch`).
pub const DEFAULT_PRESENCE_GRACE_MS: u64 = 3_000;
/// Messages waiting at connect beyond which a client gets a `summary` instead of the replay.
pub const DEFAULT_INBOX_SUMMARY_OVER: usize = 1_000;
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_WINDOW: u32 = 256;
pub const DEFAULT_DRAIN_MS: u64 = 10_000;
/// Granularity of every shard deadline. 10 ms keeps ack timeouts precise while a tick on an
/// idle shard costs one slot visit.
pub const DEFAULT_TICK_MS: u64 = 10;
/// 4096 slots x 10 ms = 40.96 s per wheel round: heartbeat deadlines (<= 3 x 30 s) need at
/// most a few rounds, so slot lists stay short.
pub const DEFAULT_WHEEL_SLOTS: usize = 4096;
/// Bad frames (bad_request / unknown_op) tolerated per connection before close 1008.
pub const DEFAULT_ABUSE_LIMIT: u32 = 20;
/// Outbound bytes a connection may have queued before the gateway stops reading from it.
pub const DEFAULT_MAX_OUTBOUND: usize = 1 << 20;
/// SPEC 4: room history, last 1,000 messages / 24 h.
pub const DEFAULT_ROOM_HISTORY_MAX: usize = 1000;
pub const DEFAULT_ROOM_HISTORY_AGE_MS: u64 = 24 * 60 * 60 * 1000;
pub const DEFAULT_SLOW_CLOSE_MS: u64 = 10_000;
pub const DEFAULT_RETRY_AFTER_S: u64 = 5;
/// Input silence after which a connection leaves its glommio task and parks (0 = never).
pub const DEFAULT_PARK_IDLE_MS: u64 = 1_000;
/// Receive buffers (4 KiB each) in each shard's provided buffer ring (`io_driver = "uring"`):
/// 4 MiB per shard, what one shard's busiest moment has in flight between two turns.
pub const DEFAULT_URING_RECV_BUFFERS: u16 = 1024;
/// `io_driver = "uring"`: how long a shard's wait may gather completions before it handles
/// the first (docs/configuration.md): fewer system calls and larger sends per turn, for at
/// most this much added latency.
pub const DEFAULT_URING_BATCH_WAIT_US: u32 = 50;
/// How often the JWKS (`jwks_url`) is fetched again: key rotation is seen within this.
pub const DEFAULT_JWKS_REFRESH_MS: u64 = 300_000;
/// Fewest ms between two refetches for unknown `kid`s: a flood of made-up kids costs one
/// fetch per period, a rotated-in key waits at most this long.
pub const DEFAULT_JWKS_REFETCH_MIN_MS: u64 = 10_000;

// Rate limits (SPEC 4). What a normal chat client never meets and a flood always does; the
// reasons are in README ("Limits"). A rate of 0 turns that limit off.
/// New connections per second per source address, and the burst allowed at once: a NAT'd
/// office reconnecting after a restart gets 200 at once, then 50 a second (clients back off).
pub const DEFAULT_IP_CONNECT_RATE: u32 = 50;
pub const DEFAULT_IP_CONNECT_BURST: u32 = 200;
/// Open WebSocket connections per source address.
pub const DEFAULT_IP_MAX_OPEN: u32 = 1_000;
/// Frames per connection per second (acks that acknowledge something are free: the server
/// paces those itself), and the burst: a reconnect that resends an outbox fits in it.
pub const DEFAULT_CONN_FRAME_RATE: u32 = 100;
pub const DEFAULT_CONN_FRAME_BURST: u32 = 1_000;
/// `send` + `publish` per user per second across the user's devices, and the burst.
pub const DEFAULT_USER_SEND_RATE: u32 = 20;
pub const DEFAULT_USER_SEND_BURST: u32 = 200;
/// Frames a connection may send past its frame limit (each refused frame still costs one)
/// before it is closed with 1008.
pub const DEFAULT_RATE_LIMIT_STRIKES: u32 = 100;

// Offline push webhook (SPEC 4). The delay lets a device that reconnects at once ack the
// message before its notification goes out (the push is then cancelled).
pub const DEFAULT_PUSH_DELAY_MS: u64 = 1_000;
pub const DEFAULT_PUSH_BATCH_MAX: usize = 100;
/// Notifications waiting in the push worker (all shards together); beyond it they are
/// dropped and counted (the messages stay in the inbox).
pub const DEFAULT_PUSH_QUEUE_MAX: usize = 10_000;
pub const DEFAULT_PUSH_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_PUSH_PREVIEW_CHARS: usize = 100;
pub const DEFAULT_PUSH_BODY: &str = "full";
/// Shortest `jwt_secret`: HS256 with a short secret is guessable.
pub const MIN_JWT_SECRET: usize = 16;
/// Shortest `push_webhook_secret` (as for `jwt_secret`).
pub const MIN_PUSH_SECRET: usize = 16;
/// Shortest `api_key`: a bearer key that opens the send/publish API to whoever guesses it.
pub const MIN_API_KEY: usize = 16;
/// `redis_url` schemes the Redis client (fred) takes with the features built in: plain,
/// TLS (`s`), Redis Cluster (`-cluster`) and Sentinel (`-sentinel`), `redis` or `valkey`.
pub const REDIS_SCHEMES: [&str; 12] = [
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
    "valkey",
    "valkeys",
    "valkey-cluster",
    "valkeys-cluster",
    "valkey-sentinel",
    "valkeys-sentinel",
];

/// How log lines are written to stderr (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event (colour only when stderr is a terminal).
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Who performs a shard's socket I/O (`io_driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// glommio's streams, one task per busy socket, idle sockets parked in epoll (shard/io.rs).
    Glommio,
    /// The shard's own io_uring beside glommio: multishot accept and receive into a provided
    /// buffer ring, sends gathered per loop turn (shard/uring.rs).
    Uring,
}

/// What a push notification carries of the message body (`push_body`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PushBody {
    /// The body as sent (JSON).
    Full,
    /// `preview`: the first `push_preview_chars` characters of the body's text.
    Preview,
}

/// The offline push webhook, when `push_webhook_url` is set (validated).
#[derive(Debug, Clone, Serialize)]
pub struct PushConfig {
    /// `http://host[:port]/path` (https is refused at start: put a TLS proxy in front).
    pub url: String,
    pub secret: String,
    pub delay_ms: u64,
    pub batch_max: usize,
    pub queue_max: usize,
    pub timeout_ms: u64,
    pub body: PushBody,
    pub preview_chars: usize,
}

/// The effective, validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub listen: SocketAddr,
    /// Join another process already listening on `listen` (SO_REUSEPORT) instead of
    /// refusing to start.
    pub share_listen: bool,
    pub admin_listen: SocketAddr,
    pub log_format: LogFormat,
    /// None: not set, chosen at start (`server::pick_io_driver`).
    pub io_driver: Option<IoDriver>,
    pub shards: usize,
    pub jwt_secret: Option<String>,
    pub jwks_url: Option<String>,
    pub jwks_ca_file: Option<PathBuf>,
    pub jwks_refresh_ms: u64,
    pub jwks_refetch_min_ms: u64,
    /// When set, a token must carry this `aud` (else `aud` is not checked).
    pub jwt_audience: Option<String>,
    /// When set, a token must carry this `iss` (else `iss` is not checked).
    pub jwt_issuer: Option<String>,
    pub api_key: Option<String>,
    pub allowed_origins: Vec<String>,
    pub max_connections: usize,
    pub max_frame: usize,
    pub heartbeat_ms: u64,
    pub handshake_timeout_ms: u64,
    pub close_linger_ms: u64,
    pub presence_grace_ms: u64,
    pub inbox_summary_over: usize,
    pub ack_timeout_ms: u64,
    pub window: u32,
    pub drain_ms: u64,
    pub echo_route: bool,
    pub huge_pages: bool,
    pub redis_url: Option<String>,
    pub redis_tls_ca: Option<PathBuf>,
    /// PEM certificate chain and key for `wss://` on the public listener (both or neither).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub node_id: String,
    pub tick_ms: u64,
    pub wheel_slots: usize,
    pub abuse_limit: u32,
    pub max_outbound: usize,
    pub retry_after_s: u64,
    pub park_idle_ms: u64,
    pub uring_recv_buffers: u16,
    pub uring_batch_wait_us: u32,
    pub inbox_max_messages: usize,
    pub inbox_max_age_ms: u64,
    pub redis_pool_size: usize,
    pub redis_timeout_ms: u64,
    pub redis_key_prefix: String,
    pub node_lease_ms: u64,
    pub room_history_max: usize,
    pub room_history_age_ms: u64,
    pub slow_close_ms: u64,
    pub ip_connect_rate: u32,
    pub ip_connect_burst: u32,
    pub ip_max_open: u32,
    pub conn_frame_rate: u32,
    pub conn_frame_burst: u32,
    pub user_send_rate: u32,
    pub user_send_burst: u32,
    pub rate_limit_strikes: u32,
    /// The offline push webhook (None: `push_webhook_url` unset, nothing is pushed).
    #[serde(flatten, serialize_with = "serialize_push")]
    pub push: Option<PushConfig>,
    /// `conn_frame_rate` / `conn_frame_burst` as a bucket rate, made once (read per frame;
    /// `None` = no limit).
    #[serde(skip)]
    pub frame_limit: Option<Rate>,
    /// `user_send_rate` / `user_send_burst` as a bucket rate (`None` = no limit).
    #[serde(skip)]
    pub send_limit: Option<Rate>,
}

/// Every key as optional: what one source (file, or flags+env) says.
/// clap fills it from flags and env; serde fills it from TOML.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// Public WebSocket listener address [default: 127.0.0.1:8080]
    #[arg(long, env = "RINGGATE_LISTEN")]
    pub listen: Option<String>,
    /// Start even when another process already listens on `listen`, sharing the port with it
    /// (SO_REUSEPORT: new connections are split between the processes) [default: false]
    #[arg(long, env = "RINGGATE_SHARE_LISTEN", num_args = 0..=1, default_missing_value = "true")]
    pub share_listen: Option<bool>,
    /// Log lines on stderr: "text" or "json" (one object per line) [default: text]
    #[arg(long, env = "RINGGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Socket I/O of the shards: "uring" (the shard's own io_uring: multishot receive into a
    /// provided buffer ring, gathered sends), "glommio" (its streams, idle sockets parked), or
    /// "auto": uring where the kernel has what it needs (6.1), else glommio [default: auto]
    #[arg(long, env = "RINGGATE_IO_DRIVER")]
    pub io_driver: Option<String>,
    /// Admin HTTP listener (metrics, health, API) [default: 127.0.0.1:9090]
    #[arg(long, env = "RINGGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Number of shards (one pinned thread per shard) [default: number of CPUs]
    #[arg(long, env = "RINGGATE_SHARDS")]
    pub shards: Option<usize>,
    /// HS256 secret for client JWTs; unset = dev mode (loopback only)
    #[arg(long, env = "RINGGATE_JWT_SECRET")]
    pub jwt_secret: Option<String>,
    /// http(s):// URL of a JWKS: RS256/ES256 client JWTs are verified with its keys (by kid)
    #[arg(long, env = "RINGGATE_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// PEM file of the CA certificates to trust for an https:// jwks_url [default: the system's]
    #[arg(long, env = "RINGGATE_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<String>,
    /// How often the JWKS is fetched again [default: 300000]
    #[arg(long, env = "RINGGATE_JWKS_REFRESH_MS")]
    pub jwks_refresh_ms: Option<u64>,
    /// Fewest ms between two JWKS refetches for unknown kids [default: 10000]
    #[arg(long, env = "RINGGATE_JWKS_REFETCH_MIN_MS")]
    pub jwks_refetch_min_ms: Option<u64>,
    /// The `aud` every token must carry [default: unset = aud not checked]
    #[arg(long, env = "RINGGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The `iss` every token must carry [default: unset = iss not checked]
    #[arg(long, env = "RINGGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Bearer key for the admin /api endpoints
    #[arg(long, env = "RINGGATE_API_KEY")]
    pub api_key: Option<String>,
    /// Allowed Origin values (comma separated on the command line); empty or "*" = any
    #[arg(long, env = "RINGGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Host-wide cap on open WebSocket connections [default: 1000000]
    #[arg(long, env = "RINGGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Largest accepted message in bytes; larger closes with 1009 [default: 65536]
    #[arg(long, env = "RINGGATE_MAX_FRAME")]
    pub max_frame: Option<usize>,
    /// Silence before the server pings; 3x closes with 1001 [default: 30000]
    #[arg(long, env = "RINGGATE_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Time a client has to complete the HTTP upgrade [default: 10000]
    #[arg(long, env = "RINGGATE_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// After our close frame: longest wait for a peer that neither answers it nor closes TCP
    /// (one that does is closed at once) [default: 3000]
    #[arg(long, env = "RINGGATE_CLOSE_LINGER_MS")]
    pub close_linger_ms: Option<u64>,
    /// A watched user who went offline is told offline only after staying so this long (a
    /// reconnect within it is told nothing) [default: 3000]
    #[arg(long, env = "RINGGATE_PRESENCE_GRACE_MS")]
    pub presence_grace_ms: Option<u64>,
    /// More entries than this waiting at connect: a `summary` per sender instead of the
    /// replay, which waits for `replay` (`fetch` pages one sender); 0 = always replay
    /// [default: 1000]
    #[arg(long, env = "RINGGATE_INBOX_SUMMARY_OVER")]
    pub inbox_summary_over: Option<usize>,
    /// Ack timeout for direct messages [default: 5000]
    #[arg(long, env = "RINGGATE_ACK_TIMEOUT_MS")]
    pub ack_timeout_ms: Option<u64>,
    /// Unacknowledged direct messages per connection [default: 256]
    #[arg(long, env = "RINGGATE_WINDOW")]
    pub window: Option<u32>,
    /// Graceful shutdown budget on SIGTERM [default: 10000]
    #[arg(long, env = "RINGGATE_DRAIN_MS")]
    pub drain_ms: Option<u64>,
    /// Enable the unauthenticated /echo diagnostics route [default: false]
    #[arg(long, env = "RINGGATE_ECHO_ROUTE", num_args = 0..=1, default_missing_value = "true")]
    pub echo_route: Option<bool>,
    /// Let the heap use transparent huge pages: ~3% less CPU on a busy 1:1 path, ~40% more memory per idle connection [default: false]
    #[arg(long, env = "RINGGATE_HUGE_PAGES", num_args = 0..=1, default_missing_value = "true")]
    pub huge_pages: Option<bool>,
    /// Redis URL for the durable store; unset = embedded store
    #[arg(long, env = "RINGGATE_REDIS_URL")]
    pub redis_url: Option<String>,
    /// PEM file of the CA certificates to trust for a rediss:// URL [default: the system's]
    #[arg(long, env = "RINGGATE_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<String>,
    /// PEM certificate chain (leaf first) to serve wss:// on the public listener; reloaded on SIGHUP
    #[arg(long, env = "RINGGATE_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// PEM private key of tls_cert
    #[arg(long, env = "RINGGATE_TLS_KEY")]
    pub tls_key: Option<String>,
    /// Node id in a cluster [default: hostname-pid]
    #[arg(long, env = "RINGGATE_NODE_ID")]
    pub node_id: Option<String>,
    /// Timing wheel tick in ms [default: 10]
    #[arg(long, env = "RINGGATE_TICK_MS")]
    pub tick_ms: Option<u64>,
    /// Timing wheel slots, a power of two [default: 4096]
    #[arg(long, env = "RINGGATE_WHEEL_SLOTS")]
    pub wheel_slots: Option<usize>,
    /// Bad frames tolerated per connection before close 1008 [default: 20]
    #[arg(long, env = "RINGGATE_ABUSE_LIMIT")]
    pub abuse_limit: Option<u32>,
    /// Outbound bytes queued per connection before reads pause [default: 1048576]
    #[arg(long, env = "RINGGATE_MAX_OUTBOUND")]
    pub max_outbound: Option<usize>,
    /// Retry-After seconds on 503 refusals [default: 5]
    #[arg(long, env = "RINGGATE_RETRY_AFTER_S")]
    pub retry_after_s: Option<u64>,
    /// Input silence before an idle connection parks outside glommio; 0 = never [default: 1000]
    #[arg(long, env = "RINGGATE_PARK_IDLE_MS")]
    pub park_idle_ms: Option<u64>,
    /// io_driver "uring": 4 KiB receive buffers per shard, a power of two [default: 1024]
    #[arg(long, env = "RINGGATE_URING_RECV_BUFFERS")]
    pub uring_recv_buffers: Option<u32>,
    /// io_driver "uring": microseconds a busy shard's wait gathers completions; 0 = off [default: 50]
    #[arg(long, env = "RINGGATE_URING_BATCH_WAIT_US")]
    pub uring_batch_wait_us: Option<u32>,
    /// Offline inbox cap per user; a send beyond it gets `unavailable` [default: 10000]
    #[arg(long, env = "RINGGATE_INBOX_MAX_MESSAGES")]
    pub inbox_max_messages: Option<usize>,
    /// Offline inbox entries older than this expire [default: 259200000 = 72 h]
    #[arg(long, env = "RINGGATE_INBOX_MAX_AGE_MS")]
    pub inbox_max_age_ms: Option<u64>,
    /// Redis connections; 0 = one per shard [default: 0]
    #[arg(long, env = "RINGGATE_REDIS_POOL_SIZE")]
    pub redis_pool_size: Option<usize>,
    /// A Redis batch not answered within this many ms fails: its sends get `unavailable` [default: 2000]
    #[arg(long, env = "RINGGATE_REDIS_TIMEOUT_MS")]
    pub redis_timeout_ms: Option<u64>,
    /// Prefix of every Redis key ringgate writes [default: "rg:"]
    #[arg(long, env = "RINGGATE_REDIS_KEY_PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// With Redis: a node whose lease is not refreshed for this long counts as dead (its users
    /// read offline; refreshed every third of it) [default: 10000]
    #[arg(long, env = "RINGGATE_NODE_LEASE_MS")]
    pub node_lease_ms: Option<u64>,
    /// Messages kept per room for recovery with `join`+`since` [default: 1000]
    #[arg(long, env = "RINGGATE_ROOM_HISTORY_MAX")]
    pub room_history_max: Option<usize>,
    /// Room messages older than this leave the history [default: 86400000 = 24 h]
    #[arg(long, env = "RINGGATE_ROOM_HISTORY_AGE_MS")]
    pub room_history_age_ms: Option<u64>,
    /// A member whose outbound buffer stays full this long is closed with 1013 [default: 10000]
    #[arg(long, env = "RINGGATE_SLOW_CLOSE_MS")]
    pub slow_close_ms: Option<u64>,
    /// New connections per second per source address (IPv6: per /64); over it the upgrade
    /// gets 429; 0 = no limit [default: 50]
    #[arg(long, env = "RINGGATE_IP_CONNECT_RATE")]
    pub ip_connect_rate: Option<u32>,
    /// New connections a source address may open at once before its rate applies [default: 200]
    #[arg(long, env = "RINGGATE_IP_CONNECT_BURST")]
    pub ip_connect_burst: Option<u32>,
    /// Open WebSocket connections per source address; over it the upgrade gets 429; 0 = no
    /// limit [default: 1000]
    #[arg(long, env = "RINGGATE_IP_MAX_OPEN")]
    pub ip_max_open: Option<u32>,
    /// Frames per connection per second; over it a frame gets `rate_limited`; 0 = no limit
    /// [default: 100]
    #[arg(long, env = "RINGGATE_CONN_FRAME_RATE")]
    pub conn_frame_rate: Option<u32>,
    /// Frames a connection may send at once before its rate applies [default: 1000]
    #[arg(long, env = "RINGGATE_CONN_FRAME_BURST")]
    pub conn_frame_burst: Option<u32>,
    /// `send` + `publish` + `typing` + `read` per user per second, all devices together; 0 = no limit [default: 20]
    #[arg(long, env = "RINGGATE_USER_SEND_RATE")]
    pub user_send_rate: Option<u32>,
    /// Sends a user may make at once before the rate applies [default: 200]
    #[arg(long, env = "RINGGATE_USER_SEND_BURST")]
    pub user_send_burst: Option<u32>,
    /// Frames sent past the frame limit before the connection is closed with 1008 [default: 100]
    #[arg(long, env = "RINGGATE_RATE_LIMIT_STRIKES")]
    pub rate_limit_strikes: Option<u32>,
    /// Offline push: POST direct messages stored for users with no connected device to this
    /// `http://` URL; unset = no push
    #[arg(long, env = "RINGGATE_PUSH_WEBHOOK_URL")]
    pub push_webhook_url: Option<String>,
    /// HMAC-SHA256 key signing each push (>= 16 bytes); required with push_webhook_url
    #[arg(long, env = "RINGGATE_PUSH_WEBHOOK_SECRET")]
    pub push_webhook_secret: Option<String>,
    /// How long a push waits before it is sent (an ack meanwhile cancels it) [default: 1000]
    #[arg(long, env = "RINGGATE_PUSH_DELAY_MS")]
    pub push_delay_ms: Option<u64>,
    /// Messages per webhook POST, at most [default: 100]
    #[arg(long, env = "RINGGATE_PUSH_BATCH_MAX")]
    pub push_batch_max: Option<usize>,
    /// Pushes waiting to be sent, all shards together; beyond it they are dropped and counted [default: 10000]
    #[arg(long, env = "RINGGATE_PUSH_QUEUE_MAX")]
    pub push_queue_max: Option<usize>,
    /// A webhook POST not answered within this many ms fails and is retried [default: 5000]
    #[arg(long, env = "RINGGATE_PUSH_TIMEOUT_MS")]
    pub push_timeout_ms: Option<u64>,
    /// "full" (the body as sent) or "preview" (its first push_preview_chars characters) [default: full]
    #[arg(long, env = "RINGGATE_PUSH_BODY")]
    pub push_body: Option<String>,
    /// Characters of the body a "preview" push carries [default: 100]
    #[arg(long, env = "RINGGATE_PUSH_PREVIEW_CHARS")]
    pub push_preview_chars: Option<usize>,
}

/// A refused configuration: always names the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl ConfigLayer {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// `self` wins over `lower` key by key.
    pub fn over(self, lower: ConfigLayer) -> ConfigLayer {
        macro_rules! pick {
            ($($f:ident),*) => { ConfigLayer { $($f: self.$f.or(lower.$f)),* } };
        }
        pick!(
            listen,
            share_listen,
            log_format,
            io_driver,
            admin_listen,
            shards,
            jwt_secret,
            jwks_url,
            jwks_ca_file,
            jwks_refresh_ms,
            jwks_refetch_min_ms,
            jwt_audience,
            jwt_issuer,
            api_key,
            allowed_origins,
            max_connections,
            max_frame,
            heartbeat_ms,
            handshake_timeout_ms,
            close_linger_ms,
            presence_grace_ms,
            inbox_summary_over,
            ack_timeout_ms,
            window,
            drain_ms,
            echo_route,
            huge_pages,
            redis_url,
            redis_tls_ca,
            tls_cert,
            tls_key,
            node_id,
            tick_ms,
            wheel_slots,
            abuse_limit,
            max_outbound,
            retry_after_s,
            park_idle_ms,
            uring_recv_buffers,
            uring_batch_wait_us,
            inbox_max_messages,
            inbox_max_age_ms,
            redis_pool_size,
            redis_timeout_ms,
            redis_key_prefix,
            node_lease_ms,
            room_history_max,
            room_history_age_ms,
            slow_close_ms,
            ip_connect_rate,
            ip_connect_burst,
            ip_max_open,
            conn_frame_rate,
            conn_frame_burst,
            user_send_rate,
            user_send_burst,
            rate_limit_strikes,
            push_webhook_url,
            push_webhook_secret,
            push_delay_ms,
            push_batch_max,
            push_queue_max,
            push_timeout_ms,
            push_body,
            push_preview_chars
        )
    }

    /// Fill defaults and validate.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let push = self.push_config()?;
        let addr = |key: &'static str, v: Option<String>, default: &str| {
            let text = v.unwrap_or_else(|| default.to_string());
            listen_addr(&text).map_err(|m| invalid(key, m))
        };
        let listen = addr("listen", self.listen, DEFAULT_LISTEN)?;
        let admin_listen = addr("admin_listen", self.admin_listen, DEFAULT_ADMIN_LISTEN)?;
        let shards = self.shards.unwrap_or_else(default_shards);
        if shards == 0 || shards > 1024 {
            return Err(invalid("shards", "must be between 1 and 1024"));
        }
        let jwt_secret = self.jwt_secret.filter(|s| !s.is_empty());
        if let Some(s) = &jwt_secret {
            check_jwt_secret(s).map_err(|m| invalid("jwt_secret", m))?;
        }
        let jwks_url = self.jwks_url.filter(|s| !s.is_empty());
        let jwks_ca_file = self
            .jwks_ca_file
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if let Some(url) = &jwks_url {
            let source =
                crate::http_url::HttpUrl::parse(url).map_err(|m| invalid("jwks_url", m))?;
            if jwks_ca_file.is_some() && !source.tls {
                return Err(invalid(
                    "jwks_ca_file",
                    format!("set but `{url}` is not an https:// jwks_url"),
                ));
            }
        }
        if let Some(path) = &jwks_ca_file {
            if jwks_url.is_none() {
                return Err(invalid("jwks_ca_file", "set without a jwks_url"));
            }
            crate::auth::jwks::tls_config(Some(path)).map_err(|m| invalid("jwks_ca_file", m))?;
        }
        let jwks_refresh_ms = self.jwks_refresh_ms.unwrap_or(DEFAULT_JWKS_REFRESH_MS);
        if jwks_refresh_ms < 100 {
            return Err(invalid("jwks_refresh_ms", "must be at least 100"));
        }
        let jwks_refetch_min_ms = self
            .jwks_refetch_min_ms
            .unwrap_or(DEFAULT_JWKS_REFETCH_MIN_MS);
        if jwks_refetch_min_ms < 100 {
            return Err(invalid("jwks_refetch_min_ms", "must be at least 100"));
        }
        if jwt_secret.is_none()
            && jwks_url.is_none()
            && !(listen.ip().is_loopback() && admin_listen.ip().is_loopback())
        {
            return Err(invalid(
                "jwt_secret",
                "jwt_secret or jwks_url required when a listener is not on loopback (dev mode is loopback-only)",
            ));
        }
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        let max_frame = self.max_frame.unwrap_or(DEFAULT_MAX_FRAME);
        if !(125..=(64 << 20)).contains(&max_frame) {
            return Err(invalid(
                "max_frame",
                "must be between 125 and 67108864 bytes",
            ));
        }
        let heartbeat_ms = self.heartbeat_ms.unwrap_or(DEFAULT_HEARTBEAT_MS);
        if heartbeat_ms < 100 {
            return Err(invalid("heartbeat_ms", "must be at least 100"));
        }
        let handshake_timeout_ms = self
            .handshake_timeout_ms
            .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_MS);
        if handshake_timeout_ms < 10 {
            return Err(invalid("handshake_timeout_ms", "must be at least 10"));
        }
        let close_linger_ms = self.close_linger_ms.unwrap_or(DEFAULT_CLOSE_LINGER_MS);
        if close_linger_ms < 10 {
            return Err(invalid(
                "close_linger_ms",
                "must be at least 10 (time to flush a close frame)",
            ));
        }
        let ack_timeout_ms = self.ack_timeout_ms.unwrap_or(DEFAULT_ACK_TIMEOUT_MS);
        if ack_timeout_ms < 10 {
            return Err(invalid("ack_timeout_ms", "must be at least 10"));
        }
        let window = self.window.unwrap_or(DEFAULT_WINDOW);
        if window == 0 || window > 65_536 {
            return Err(invalid("window", "must be between 1 and 65536"));
        }
        let tick_ms = self.tick_ms.unwrap_or(DEFAULT_TICK_MS);
        if tick_ms == 0 || tick_ms > 1000 {
            return Err(invalid("tick_ms", "must be between 1 and 1000"));
        }
        let wheel_slots = self.wheel_slots.unwrap_or(DEFAULT_WHEEL_SLOTS);
        if !wheel_slots.is_power_of_two() || wheel_slots < 16 {
            return Err(invalid("wheel_slots", "must be a power of two >= 16"));
        }
        let max_outbound = self.max_outbound.unwrap_or(DEFAULT_MAX_OUTBOUND);
        if max_outbound < max_frame {
            return Err(invalid("max_outbound", "must be at least max_frame"));
        }
        let node_id = self.node_id.unwrap_or_else(default_node_id);
        if node_id.is_empty() || node_id.len() > 64 {
            return Err(invalid("node_id", "must be 1 to 64 characters"));
        }
        let redis_url = self.redis_url.filter(|s| !s.is_empty());
        let redis_tls_ca = self
            .redis_tls_ca
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if let Some(url) = &redis_url {
            check_redis_scheme(url).map_err(|m| invalid("redis_url", m))?;
            crate::store::redis::check_url(url, redis_tls_ca.as_deref())
                .map_err(|m| invalid("redis_url", m))?;
        }
        if let Some(path) = &redis_tls_ca {
            if redis_url.is_none() {
                return Err(invalid("redis_tls_ca", "set without a redis_url"));
            }
            crate::store::redis::tls_connector(path).map_err(|m| invalid("redis_tls_ca", m))?;
        }
        let tls_cert = self.tls_cert.filter(|s| !s.is_empty()).map(PathBuf::from);
        let tls_key = self.tls_key.filter(|s| !s.is_empty()).map(PathBuf::from);
        match (&tls_cert, &tls_key) {
            (Some(cert), Some(key)) => {
                // Read now, so a bad file stops `config` and `serve` with the key named.
                crate::tls::Tls::load(cert, key).map_err(|m| invalid("tls_cert", m))?;
            }
            (Some(_), None) => return Err(invalid("tls_key", "required with tls_cert")),
            (None, Some(_)) => return Err(invalid("tls_cert", "required with tls_key")),
            (None, None) => {}
        }
        let redis_timeout_ms = self.redis_timeout_ms.unwrap_or(2_000);
        if redis_timeout_ms < 10 {
            return Err(invalid("redis_timeout_ms", "must be at least 10"));
        }
        let redis_key_prefix = self.redis_key_prefix.unwrap_or_else(|| "rg:".into());
        // Braces would start a Redis Cluster hash tag in the prefix (every key in one slot).
        if redis_key_prefix.len() > 64
            || redis_key_prefix.contains(|c: char| c.is_whitespace() || c == '{' || c == '}')
        {
            return Err(invalid(
                "redis_key_prefix",
                "must be at most 64 characters, without spaces or braces",
            ));
        }
        let node_lease_ms = self.node_lease_ms.unwrap_or(10_000);
        if node_lease_ms < 300 {
            return Err(invalid("node_lease_ms", "must be at least 300"));
        }
        if node_id.contains(char::is_whitespace) {
            return Err(invalid("node_id", "must not contain spaces"));
        }
        let user_send_rate = self.user_send_rate.unwrap_or(DEFAULT_USER_SEND_RATE);
        let user_send_burst = self.user_send_burst.unwrap_or(DEFAULT_USER_SEND_BURST);
        let conn_frame_rate = self.conn_frame_rate.unwrap_or(DEFAULT_CONN_FRAME_RATE);
        let conn_frame_burst = self.conn_frame_burst.unwrap_or(DEFAULT_CONN_FRAME_BURST);
        let rate_limit_strikes = self
            .rate_limit_strikes
            .unwrap_or(DEFAULT_RATE_LIMIT_STRIKES);
        // A connection keeps its frame debt in microseconds in a u32 (memory per connection).
        if u64::from(conn_frame_burst) + u64::from(rate_limit_strikes)
            > 3600 * u64::from(conn_frame_rate.max(1))
        {
            return Err(invalid(
                "conn_frame_burst",
                "conn_frame_burst + rate_limit_strikes must be at most an hour of conn_frame_rate",
            ));
        }
        let allowed_origins: Vec<String> = self
            .allowed_origins
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect();
        // `*` means any origin, as an empty list does (the check is then skipped): stored as
        // the empty list so there is one meaning of "any". Mixed with names, it is a mistake.
        let allowed_origins = if allowed_origins.iter().any(|o| o == "*") {
            if allowed_origins.len() > 1 {
                return Err(invalid(
                    "allowed_origins",
                    "\"*\" (any origin) cannot be combined with other origins",
                ));
            }
            Vec::new()
        } else {
            for o in &allowed_origins {
                // Browsers send `scheme://host[:port]` exactly: a path or a missing scheme
                // would never match, and every browser would get 403 without a word.
                let shaped = o.split_once("://").is_some_and(|(scheme, host)| {
                    !scheme.is_empty() && !host.is_empty() && !host.contains('/')
                });
                if !shaped {
                    return Err(invalid(
                        "allowed_origins",
                        format!("`{o}` is not an origin: write scheme://host[:port] as browsers send it, e.g. https://chat.example.com (no path, no trailing /), or \"*\" for any"),
                    ));
                }
            }
            allowed_origins
        };
        let api_key = self.api_key.filter(|s| !s.is_empty());
        if api_key.as_ref().is_some_and(|k| k.len() < MIN_API_KEY) {
            return Err(invalid(
                "api_key",
                format!("must be at least {MIN_API_KEY} bytes (a short bearer key is guessable)"),
            ));
        }
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("must be \"text\" or \"json\", not {other:?}"),
                ))
            }
        };
        // Unset (or "auto"): chosen at start, uring where the host has what it needs.
        let io_driver = match self.io_driver.as_deref().unwrap_or("auto") {
            "auto" => None,
            "glommio" => Some(IoDriver::Glommio),
            "uring" => Some(IoDriver::Uring),
            other => {
                return Err(invalid(
                    "io_driver",
                    format!("must be \"auto\", \"glommio\" or \"uring\", not {other:?}"),
                ))
            }
        };
        let uring_recv_buffers = self
            .uring_recv_buffers
            .unwrap_or(DEFAULT_URING_RECV_BUFFERS.into());
        if !uring_recv_buffers.is_power_of_two() || !(2..=32_768).contains(&uring_recv_buffers) {
            return Err(invalid(
                "uring_recv_buffers",
                "must be a power of two from 2 to 32768",
            ));
        }
        let uring_recv_buffers = uring_recv_buffers as u16;
        Ok(Config {
            listen,
            share_listen: self.share_listen.unwrap_or(false),
            admin_listen,
            log_format,
            io_driver,
            shards,
            jwt_secret,
            jwks_url,
            jwks_ca_file,
            jwks_refresh_ms,
            jwks_refetch_min_ms,
            jwt_audience: self.jwt_audience.filter(|s| !s.is_empty()),
            jwt_issuer: self.jwt_issuer.filter(|s| !s.is_empty()),
            api_key,
            allowed_origins,
            max_connections,
            max_frame,
            heartbeat_ms,
            handshake_timeout_ms,
            close_linger_ms,
            presence_grace_ms: self.presence_grace_ms.unwrap_or(DEFAULT_PRESENCE_GRACE_MS),
            inbox_summary_over: self
                .inbox_summary_over
                .unwrap_or(DEFAULT_INBOX_SUMMARY_OVER),
            ack_timeout_ms,
            window,
            drain_ms: self.drain_ms.unwrap_or(DEFAULT_DRAIN_MS),
            echo_route: self.echo_route.unwrap_or(false),
            huge_pages: self.huge_pages.unwrap_or(false),
            redis_url,
            redis_tls_ca,
            tls_cert,
            tls_key,
            node_id,
            tick_ms,
            wheel_slots,
            abuse_limit: self.abuse_limit.unwrap_or(DEFAULT_ABUSE_LIMIT),
            max_outbound,
            retry_after_s: self.retry_after_s.unwrap_or(DEFAULT_RETRY_AFTER_S),
            park_idle_ms: self.park_idle_ms.unwrap_or(DEFAULT_PARK_IDLE_MS),
            uring_recv_buffers,
            uring_batch_wait_us: match self.uring_batch_wait_us {
                Some(us) if us > 10_000 => {
                    return Err(invalid("uring_batch_wait_us", "must be at most 10000"))
                }
                us => us.unwrap_or(DEFAULT_URING_BATCH_WAIT_US),
            },
            inbox_max_messages: match self.inbox_max_messages {
                Some(0) => return Err(invalid("inbox_max_messages", "must be at least 1")),
                v => v.unwrap_or(crate::store::DEFAULT_INBOX_MAX_MESSAGES),
            },
            inbox_max_age_ms: self
                .inbox_max_age_ms
                .unwrap_or(crate::store::DEFAULT_INBOX_MAX_AGE_MS),
            redis_pool_size: self.redis_pool_size.unwrap_or(0),
            redis_timeout_ms,
            redis_key_prefix,
            node_lease_ms,
            room_history_max: self.room_history_max.unwrap_or(DEFAULT_ROOM_HISTORY_MAX),
            room_history_age_ms: self
                .room_history_age_ms
                .unwrap_or(DEFAULT_ROOM_HISTORY_AGE_MS),
            slow_close_ms: self.slow_close_ms.unwrap_or(DEFAULT_SLOW_CLOSE_MS),
            ip_connect_rate: self.ip_connect_rate.unwrap_or(DEFAULT_IP_CONNECT_RATE),
            ip_connect_burst: self.ip_connect_burst.unwrap_or(DEFAULT_IP_CONNECT_BURST),
            ip_max_open: self.ip_max_open.unwrap_or(DEFAULT_IP_MAX_OPEN),
            conn_frame_rate,
            conn_frame_burst,
            user_send_rate,
            user_send_burst,
            rate_limit_strikes,
            push,
            frame_limit: Rate::new(conn_frame_rate, conn_frame_burst),
            send_limit: Rate::new(user_send_rate, user_send_burst),
        })
    }
}

impl ConfigLayer {
    /// The push webhook keys, validated; None when `push_webhook_url` is unset (the other
    /// push keys are then ignored).
    fn push_config(&self) -> Result<Option<PushConfig>, ConfigError> {
        let Some(url) = self.push_webhook_url.clone().filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        crate::push::http::Target::parse(&url).map_err(|m| invalid("push_webhook_url", m))?;
        let secret = match self.push_webhook_secret.clone().filter(|s| !s.is_empty()) {
            None => {
                return Err(invalid(
                    "push_webhook_secret",
                    "required when push_webhook_url is set (it signs every push)",
                ))
            }
            Some(s) if s.len() < MIN_PUSH_SECRET => {
                return Err(invalid("push_webhook_secret", "must be at least 16 bytes"))
            }
            Some(s) => s,
        };
        let at_least_1 = |key: &'static str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(invalid(key, "must be at least 1")),
            v => Ok(v.unwrap_or(default)),
        };
        let timeout_ms = self.push_timeout_ms.unwrap_or(DEFAULT_PUSH_TIMEOUT_MS);
        if timeout_ms < 10 {
            return Err(invalid("push_timeout_ms", "must be at least 10"));
        }
        let body = match self.push_body.as_deref().unwrap_or(DEFAULT_PUSH_BODY) {
            "full" => PushBody::Full,
            "preview" => PushBody::Preview,
            other => {
                return Err(invalid(
                    "push_body",
                    format!("must be \"full\" or \"preview\", not {other:?}"),
                ))
            }
        };
        Ok(Some(PushConfig {
            url,
            secret,
            delay_ms: self.push_delay_ms.unwrap_or(DEFAULT_PUSH_DELAY_MS),
            batch_max: at_least_1(
                "push_batch_max",
                self.push_batch_max,
                DEFAULT_PUSH_BATCH_MAX,
            )?,
            queue_max: at_least_1(
                "push_queue_max",
                self.push_queue_max,
                DEFAULT_PUSH_QUEUE_MAX,
            )?,
            timeout_ms,
            body,
            preview_chars: at_least_1(
                "push_preview_chars",
                self.push_preview_chars,
                DEFAULT_PUSH_PREVIEW_CHARS,
            )?,
        }))
    }
}

/// `push` as its TOML keys (`push_webhook_url` ..), none when push is off.
fn serialize_push<S: serde::Serializer>(
    push: &Option<PushConfig>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(None)?;
    if let Some(p) = push {
        map.serialize_entry("push_webhook_url", &p.url)?;
        map.serialize_entry("push_webhook_secret", &p.secret)?;
        map.serialize_entry("push_delay_ms", &p.delay_ms)?;
        map.serialize_entry("push_batch_max", &p.batch_max)?;
        map.serialize_entry("push_queue_max", &p.queue_max)?;
        map.serialize_entry("push_timeout_ms", &p.timeout_ms)?;
        map.serialize_entry("push_body", &p.body)?;
        map.serialize_entry("push_preview_chars", &p.preview_chars)?;
    }
    map.end()
}

/// `ip:port`, or `host:port` resolved once, here, to its first address (IPv4 first: the
/// usual `localhost` answers ::1 and 127.0.0.1). A listener binds one address.
pub fn resolve_addr(text: &str) -> Result<SocketAddr, String> {
    listen_addr(text)
}

fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    let found: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("`{text}` is not an address (ip:port or host:port): {e}"))?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("`{text}`: the host name resolves to no address"))
}

/// The scheme of `url` is one the Redis client takes (see [`REDIS_SCHEMES`]).
fn check_redis_scheme(url: &str) -> Result<(), String> {
    // The URL itself is not repeated: it may carry a password.
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme {
        Some(s) if REDIS_SCHEMES.contains(&s.as_str()) => Ok(()),
        found => Err(format!(
            "not a Redis URL (scheme {}): the scheme must be one of {} (e.g. redis://127.0.0.1:6379)",
            found.map_or("missing".to_string(), |s| format!("`{s}`")),
            REDIS_SCHEMES.join(", ")
        )),
    }
}

fn default_shards() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into());
    format!("{host}-{}", std::process::id())
}

impl Config {
    /// What the Redis thread needs, when a `redis_url` is set, for the node run `run` (see
    /// `store::redis::node_run_id`). (Here, not in the store: the store does not depend on
    /// the config.)
    pub fn redis_settings(&self, run: &str) -> Option<crate::store::redis::RedisSettings> {
        Some(crate::store::redis::RedisSettings {
            url: self.redis_url.clone()?,
            pool_size: if self.redis_pool_size == 0 {
                self.shards
            } else {
                self.redis_pool_size
            },
            timeout: std::time::Duration::from_millis(self.redis_timeout_ms),
            key_prefix: self.redis_key_prefix.clone(),
            max_messages: self.inbox_max_messages,
            max_age_ms: self.inbox_max_age_ms,
            node: run.to_string(),
            lease_ms: self.node_lease_ms,
            room_history_max: self.room_history_max,
            room_history_age_ms: self.room_history_age_ms,
            tls_ca: self.redis_tls_ca.clone(),
            watch_offline: self.push.is_some(),
        })
    }

    /// One shard's share of `max_connections`: what its per-connection tables reserve at
    /// start (see `Shard::new`).
    pub fn connections_per_shard(&self) -> usize {
        self.max_connections.div_ceil(self.shards.max(1))
    }

    /// The per-address limits the shards share.
    pub fn ip_limits(&self) -> IpLimits {
        IpLimits::new(
            Rate::new(self.ip_connect_rate, self.ip_connect_burst),
            self.ip_max_open,
        )
    }

    /// Dev mode: no secret and no JWKS, so `?user=` is trusted. Only ever true on loopback
    /// (see resolve).
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwks_url.is_none()
    }

    /// What the JWKS fetcher needs, when a `jwks_url` is set.
    pub fn jwks_settings(&self) -> Option<crate::auth::jwks::JwksSettings> {
        Some(crate::auth::jwks::JwksSettings {
            url: self.jwks_url.clone()?,
            ca_file: self.jwks_ca_file.clone(),
            refresh: std::time::Duration::from_millis(self.jwks_refresh_ms),
            refetch_min: std::time::Duration::from_millis(self.jwks_refetch_min_ms),
        })
    }

    /// TOML of the effective config, secrets redacted.
    pub fn to_toml_redacted(&self) -> String {
        let mut shown = self.clone();
        let redact = |s: &mut Option<String>| {
            if s.is_some() {
                *s = Some("<redacted>".into());
            }
        };
        redact(&mut shown.jwt_secret);
        redact(&mut shown.api_key);
        if let Some(p) = &mut shown.push {
            p.secret = "<redacted>".into();
        }
        // A password in the Redis URL (`redis://user:pass@host`) is a secret too.
        if let Some(url) = &mut shown.redis_url {
            if let (Some(scheme_end), Some(at)) = (url.find("://"), url.rfind('@')) {
                if at > scheme_end {
                    url.replace_range(scheme_end + 3..at, "<redacted>");
                }
            }
        }
        toml::to_string(&shown).expect("config serialises")
    }

    /// `config --print`: the effective config as TOML, secrets redacted, and every key that
    /// is unset listed as a comment (TOML has no null, and a missing key reads as forgotten);
    /// a `node_id` nobody set is said to be made per serving process (`<host>-<pid>`), not
    /// shown with the printing command's own pid.
    pub fn to_toml_shown(&self, node_id_set: bool) -> String {
        let mut text = self.to_toml_redacted();
        if !node_id_set {
            let lines: Vec<String> = text
                .lines()
                .map(|l| match l.starts_with("node_id = ") {
                    true => {
                        "# node_id = \"<hostname>-<pid>\" (unset: made by each serving process)"
                            .to_string()
                    }
                    false => l.to_string(),
                })
                .collect();
            text = lines.join("\n") + "\n";
        }
        // Every key there is: the config layer's flags, named as the keys.
        let keys = <ConfigLayer as clap::Args>::augment_args(clap::Command::new("keys"));
        let unset: Vec<String> = keys
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|k| !text.lines().any(|l| l.starts_with(&format!("{k} = "))))
            .filter(|k| k != "node_id")
            .collect();
        // Push off: its tuning keys take effect with a push_webhook_url, and then as these.
        let push_defaults = [
            ("push_delay_ms", DEFAULT_PUSH_DELAY_MS.to_string()),
            ("push_batch_max", DEFAULT_PUSH_BATCH_MAX.to_string()),
            ("push_queue_max", DEFAULT_PUSH_QUEUE_MAX.to_string()),
            ("push_timeout_ms", DEFAULT_PUSH_TIMEOUT_MS.to_string()),
            ("push_body", format!("{DEFAULT_PUSH_BODY:?}")),
            ("push_preview_chars", DEFAULT_PUSH_PREVIEW_CHARS.to_string()),
        ];
        for key in unset {
            match push_defaults.iter().find(|(k, _)| *k == key) {
                Some((_, default)) => {
                    text.push_str(&format!("# {key} = (default {default}, push off)\n"))
                }
                None => text.push_str(&format!("# {key} = (unset)\n")),
            }
        }
        text
    }

    /// Per-shard share of the host wheel deadlines etc. are shard-local; this is a helper for
    /// converting ms to wheel ticks, rounding up so a deadline never fires early.
    pub fn ms_to_ticks(&self, ms: u64) -> u64 {
        ms.div_ceil(self.tick_ms)
    }
}

/// The rule for `jwt_secret`, also applied by `ringgate token` (a token signed with a secret
/// `serve` refuses is of no use to anyone).
pub fn check_jwt_secret(secret: &str) -> Result<(), &'static str> {
    if secret.len() < MIN_JWT_SECRET {
        return Err("must be at least 16 bytes (HS256 with a short secret is guessable)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve_in_dev_mode_on_loopback() {
        let c = ConfigLayer::default().resolve().unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.dev_mode());
        assert!(!c.echo_route);
        assert!(
            !c.huge_pages,
            "memory per idle connection first (docs/performance.md)"
        );
    }

    /// The push webhook: off without a URL; with one, a secret of 16 bytes or more is
    /// required, https and malformed URLs and bad values are refused naming their key.
    #[test]
    fn push_webhook_keys_are_checked_at_start() {
        let layer = |url: &str, secret: Option<&str>| ConfigLayer {
            push_webhook_url: Some(url.into()),
            push_webhook_secret: secret.map(Into::into),
            ..ConfigLayer::default()
        };
        let refused = |l: ConfigLayer| l.resolve().unwrap_err().to_string();
        assert!(ConfigLayer::default().resolve().unwrap().push.is_none());
        let secret = Some("0123456789abcdef");
        let p = layer("http://127.0.0.1:8081/hook", secret)
            .resolve()
            .unwrap()
            .push
            .unwrap();
        assert_eq!(p.delay_ms, DEFAULT_PUSH_DELAY_MS);
        assert_eq!(p.batch_max, DEFAULT_PUSH_BATCH_MAX);
        assert_eq!(p.queue_max, DEFAULT_PUSH_QUEUE_MAX);
        assert_eq!(p.body, PushBody::Full);
        let missing = refused(layer("http://h/x", None));
        assert!(missing.contains("push_webhook_secret"), "{missing}");
        let short = refused(layer("http://h/x", Some("short")));
        assert!(
            short.contains("push_webhook_secret") && short.contains("16"),
            "{short}"
        );
        let https = refused(layer("https://h/x", secret));
        assert!(
            https.contains("push_webhook_url") && https.contains("https"),
            "{https}"
        );
        let bad = refused(layer("h:80/x", secret));
        assert!(bad.contains("push_webhook_url"), "{bad}");
        let body = refused(ConfigLayer {
            push_body: Some("all".into()),
            ..layer("http://h/x", secret)
        });
        assert!(body.contains("push_body"), "{body}");
        let batch = refused(ConfigLayer {
            push_batch_max: Some(0),
            ..layer("http://h/x", secret)
        });
        assert!(batch.contains("push_batch_max"), "{batch}");
        let shown = layer("http://h/x", secret)
            .resolve()
            .unwrap()
            .to_toml_redacted();
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(
            shown.contains("push_webhook_url = \"http://h/x\""),
            "{shown}"
        );
    }

    /// TLS URLs are taken (rustls); a CA file must be readable PEM, and only goes with a TLS
    /// URL: each mistake is refused at start naming its key.
    #[test]
    fn tls_redis_urls_are_taken_and_a_bad_ca_file_is_refused_at_start() {
        for url in [
            "rediss://:secret@127.0.0.1:6380",
            "rediss-cluster://127.0.0.1:7000",
            "REDISS://:pw@127.0.0.1:6380",
            "valkeys://:pw@127.0.0.1:6380",
        ] {
            let layer = ConfigLayer {
                redis_url: Some(url.into()),
                ..Default::default()
            };
            assert!(layer.resolve().is_ok(), "{url}");
        }
        let with_ca = |url: &str, ca: &str| {
            ConfigLayer {
                redis_url: Some(url.into()),
                redis_tls_ca: Some(ca.into()),
                ..Default::default()
            }
            .resolve()
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let missing = with_ca("rediss://127.0.0.1:6380", "/nonexistent/ca.pem").unwrap_err();
        assert!(missing.contains("redis_tls_ca"), "{missing}");
        let not_pem = std::env::temp_dir().join(format!("rg-not-pem-{}", std::process::id()));
        std::fs::write(&not_pem, "hello").unwrap();
        let err = with_ca("rediss://127.0.0.1:6380", not_pem.to_str().unwrap()).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
        let plain = with_ca("redis://127.0.0.1:6379", not_pem.to_str().unwrap()).unwrap_err();
        assert!(plain.contains("not a TLS URL"), "{plain}");
        let _ = std::fs::remove_file(not_pem);
    }

    #[test]
    fn non_loopback_without_secret_is_refused_naming_the_key() {
        let layer = ConfigLayer {
            listen: Some("0.0.0.0:8080".into()),
            ..Default::default()
        };
        let err = layer.resolve().unwrap_err().to_string();
        assert!(err.contains("jwt_secret"), "{err}");
    }

    /// A JWKS URL alone is enough off loopback (not dev mode); its keys are checked at start
    /// naming the key: scheme, a CA file only with https://, the minimum periods.
    #[test]
    fn jwks_keys_are_checked_at_start() {
        let layer = |url: &str| ConfigLayer {
            listen: Some("0.0.0.0:8080".into()),
            jwks_url: Some(url.into()),
            ..Default::default()
        };
        let c = layer("https://idp.example/.well-known/jwks.json")
            .resolve()
            .unwrap();
        assert!(!c.dev_mode());
        let s = c.jwks_settings().unwrap();
        assert_eq!(s.refresh.as_millis() as u64, DEFAULT_JWKS_REFRESH_MS);
        assert_eq!(
            s.refetch_min.as_millis() as u64,
            DEFAULT_JWKS_REFETCH_MIN_MS
        );
        assert!(ConfigLayer::default()
            .resolve()
            .unwrap()
            .jwks_settings()
            .is_none());
        let refused = |l: ConfigLayer| l.resolve().unwrap_err().to_string();
        assert!(refused(layer("ftp://idp/keys")).contains("`jwks_url`"));
        let not_pem_file = std::env::temp_dir().join(format!("rg-jwks-ca-{}", std::process::id()));
        std::fs::write(&not_pem_file, "hello").unwrap();
        let not_pem_path = not_pem_file.to_str().unwrap().to_string();
        let ca_with_http = refused(ConfigLayer {
            jwks_ca_file: Some(not_pem_path.clone()),
            ..layer("http://idp/keys")
        });
        assert!(ca_with_http.contains("`jwks_ca_file`"), "{ca_with_http}");
        let ca_alone = refused(ConfigLayer {
            jwks_ca_file: Some(not_pem_path.clone()),
            ..Default::default()
        });
        assert!(ca_alone.contains("`jwks_ca_file`"), "{ca_alone}");
        let not_pem = refused(ConfigLayer {
            jwks_ca_file: Some(not_pem_path.clone()),
            ..layer("https://idp/keys")
        });
        assert!(not_pem.contains("no PEM certificate"), "{not_pem}");
        let fast = refused(ConfigLayer {
            jwks_refresh_ms: Some(10),
            ..layer("https://idp/keys")
        });
        assert!(fast.contains("`jwks_refresh_ms`"), "{fast}");
        let eager = refused(ConfigLayer {
            jwks_refetch_min_ms: Some(0),
            ..layer("https://idp/keys")
        });
        assert!(eager.contains("`jwks_refetch_min_ms`"), "{eager}");
        let _ = std::fs::remove_file(not_pem_file);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: Vec<(ConfigLayer, &str)> = vec![
            (
                ConfigLayer {
                    listen: Some("nope".into()),
                    ..Default::default()
                },
                "`listen`",
            ),
            (
                ConfigLayer {
                    shards: Some(0),
                    ..Default::default()
                },
                "`shards`",
            ),
            (
                ConfigLayer {
                    wheel_slots: Some(1000),
                    ..Default::default()
                },
                "`wheel_slots`",
            ),
            (
                ConfigLayer {
                    jwt_secret: Some("short".into()),
                    ..Default::default()
                },
                "`jwt_secret`",
            ),
            (
                ConfigLayer {
                    max_frame: Some(10),
                    ..Default::default()
                },
                "`max_frame`",
            ),
        ];
        for (layer, key) in cases {
            let err = layer.resolve().unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
    }

    /// Issue 19: values that passed and then failed silently are refused, naming the key.
    #[test]
    fn what_cannot_be_honoured_is_refused_naming_the_key() {
        let refused = |l: ConfigLayer| l.resolve().unwrap_err().to_string();
        let redis = |url: &str| ConfigLayer {
            redis_url: Some(url.into()),
            ..Default::default()
        };
        for url in ["http://x", "127.0.0.1:6379", "unix:///tmp/redis.sock"] {
            let err = refused(redis(url));
            assert!(
                err.contains("`redis_url`") && err.contains("rediss"),
                "{err}"
            );
        }
        let with_password = refused(redis("http://user:hunter2@x"));
        assert!(!with_password.contains("hunter2"), "{with_password}");
        for url in [
            "redis://127.0.0.1:6379",
            "redis-sentinel://127.0.0.1:26379?sentinelServiceName=m",
            "valkey://127.0.0.1:6379",
        ] {
            assert!(redis(url).resolve().is_ok(), "{url}");
        }
        let key = |k: &str| ConfigLayer {
            api_key: Some(k.into()),
            ..Default::default()
        };
        let short = refused(key("x"));
        assert!(
            short.contains("`api_key`") && short.contains("16"),
            "{short}"
        );
        assert!(key("0123456789abcdef").resolve().is_ok());
        let origins = |o: &[&str]| ConfigLayer {
            allowed_origins: Some(o.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        assert!(origins(&["*"])
            .resolve()
            .unwrap()
            .allowed_origins
            .is_empty());
        let mixed = refused(origins(&["*", "https://a.example"]));
        assert!(mixed.contains("`allowed_origins`"), "{mixed}");
        for bad in [
            "chat.example.com",
            "https://chat.example.com/",
            "https://a/b",
        ] {
            let err = refused(origins(&[bad]));
            assert!(err.contains("`allowed_origins`"), "{bad}: {err}");
        }
        let kept = origins(&["https://a.example", "capacitor://localhost"])
            .resolve()
            .unwrap();
        assert_eq!(kept.allowed_origins.len(), 2);
        let format = refused(ConfigLayer {
            log_format: Some("xml".into()),
            ..Default::default()
        });
        assert!(format.contains("`log_format`"), "{format}");
    }

    /// `io_driver`: chosen at start unless set ("auto" = unset); anything else refused naming
    /// the key. `uring_recv_buffers`: a power of two. `uring_batch_wait_us`: 0 to 10 ms.
    #[test]
    fn io_driver_is_chosen_at_start_unless_set_and_refuses_unknown_drivers() {
        let driver = |d: Option<&str>| {
            ConfigLayer {
                io_driver: d.map(str::to_owned),
                ..Default::default()
            }
            .resolve()
        };
        assert_eq!(driver(None).unwrap().io_driver, None);
        assert_eq!(driver(Some("auto")).unwrap().io_driver, None);
        assert_eq!(
            driver(Some("glommio")).unwrap().io_driver,
            Some(IoDriver::Glommio)
        );
        assert_eq!(
            driver(Some("uring")).unwrap().io_driver,
            Some(IoDriver::Uring)
        );
        let err = driver(Some("epoll")).unwrap_err().to_string();
        assert!(
            err.contains("`io_driver`") && err.contains("epoll"),
            "{err}"
        );
        let buffers = |n: u32| {
            ConfigLayer {
                uring_recv_buffers: Some(n),
                ..Default::default()
            }
            .resolve()
        };
        assert_eq!(buffers(64).unwrap().uring_recv_buffers, 64);
        for bad in [0, 1, 100, 65_536] {
            let err = buffers(bad).unwrap_err().to_string();
            assert!(err.contains("`uring_recv_buffers`"), "{bad}: {err}");
        }
        let batch_wait = |us: Option<u32>| {
            ConfigLayer {
                uring_batch_wait_us: us,
                ..Default::default()
            }
            .resolve()
        };
        assert_eq!(batch_wait(None).unwrap().uring_batch_wait_us, 50);
        assert_eq!(batch_wait(Some(0)).unwrap().uring_batch_wait_us, 0);
        assert_eq!(
            batch_wait(Some(10_000)).unwrap().uring_batch_wait_us,
            10_000
        );
        let err = batch_wait(Some(10_001)).unwrap_err().to_string();
        assert!(err.contains("`uring_batch_wait_us`"), "{err}");
    }

    /// A host name in a listen address is resolved once (IPv4 first); one that does not
    /// resolve is refused naming the key.
    #[test]
    fn listen_takes_a_host_name() {
        let c = ConfigLayer {
            listen: Some("localhost:8080".into()),
            admin_listen: Some("localhost:9090".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert!(c.dev_mode(), "localhost is loopback: dev mode allowed");
        let err = ConfigLayer {
            listen: Some("no-such-host.invalid:8080".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("`listen`"), "{err}");
    }

    #[test]
    fn toml_unknown_key_is_refused_and_flags_win_over_file() {
        assert!(ConfigLayer::from_toml("lisen = \"x\"").is_err());
        let file = ConfigLayer::from_toml("heartbeat_ms = 1000\nmax_frame = 4096").unwrap();
        let flags = ConfigLayer {
            heartbeat_ms: Some(2000),
            ..Default::default()
        };
        let c = flags.over(file).resolve().unwrap();
        assert_eq!(c.heartbeat_ms, 2000);
        assert_eq!(c.max_frame, 4096);
    }

    #[test]
    fn redacted_print_hides_secrets() {
        let c = ConfigLayer {
            jwt_secret: Some("0123456789abcdef-secret".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let text = c.to_toml_redacted();
        assert!(!text.contains("0123456789abcdef-secret"));
        assert!(text.contains("jwt_secret = \"<redacted>\""));
    }
}
