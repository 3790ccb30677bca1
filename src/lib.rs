//! ringgate: an io_uring, thread-per-core WebSocket edge gateway.
//!
//! Layout (one module per concern; each says what it owns in its header):
//! - [`config`]: file -> flags/env -> validated `Config`.
//! - [`server`]: process start, shards, signals; [`preflight`]: host checks before start;
//!   [`admin`]: the admin HTTP listener.
//! - [`shard`]: one per core, owns its connections, wheel, scratch buffer and metrics.
//! - [`conn`]: the sans-IO connection state machine.
//! - [`ws`]: HTTP upgrade and RFC 6455 frames; [`proto`]: the JSON application protocol.
//! - [`wheel`]: the hashed timing wheel; [`clock`]: injected time.
//! - [`auth`]: JWT and dev mode; [`metrics`]: per-shard counters and Prometheus text.
//! - [`tls`]: rustls sessions between the public sockets and their connections.

pub mod admin;
pub mod alloc;
pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod hash;
pub mod http_url;
pub mod limit;
pub mod mesh;
pub mod metrics;
pub mod preflight;
pub mod proto;
pub mod push;
pub mod server;
pub mod shard;
#[cfg(test)]
mod sim;
pub mod stats;
pub mod store;
#[cfg(test)]
mod test_rng;
pub mod tls;
pub mod wheel;
pub mod ws;
