//! The durable offline inbox in Redis (SPEC section 4), through fred on its own thread.
//!
//! # Who owns what
//! * One thread, `ringgate-redis`, runs a tokio runtime and a fred pool. It owns every Redis
//!   connection; no shard ever waits on Redis.
//! * Each shard talks to it through a [`StoreLink`]: a bounded lock-free channel of
//!   [`StoreOp`]s in, an answer channel of [`StoreReply`]s out, and a doorbell each way (the
//!   same wake-up as the mesh: one byte per wake-up, not per message).
//! * Per shard, one task on the Redis thread takes the queued operations in batches and sends
//!   each batch as **one pipeline** on the shard's own connection: runs of appends and removes
//!   as one script call each, loads as plain `XTRIM` + `XRANGE` (see [`Segment`]). A batch is
//!   one round trip and batches run in submission order. That order is what the shard relies
//!   on (a load sees every append submitted before it; see `shard/durable.rs`).
//! * A batch that failed or timed out may still have been written (uncertain): commands are
//!   sent fail-fast and never retried by fred, but one already on its way can land once Redis
//!   is back. The shard treats such a write as "maybe stored": the sender heard `unavailable`
//!   and resends with the same cid (Redis dedup answers with the first id), and the
//!   recipient's mirror is reloaded. Clients drop a second copy by `(from, cid)`.
//!
//! # Data layout (prefix `rg:` by default)
//! * `rg:in:<user>`: a stream per user; one field `m` per entry, the message packed by
//!   [`pack`] (id, ts, from, cid and body, length-prefixed). A load reads from the age cap on
//!   (`XRANGE` from `now - max_age`) and trims what is past it (`XTRIM MINID`, counted as
//!   expired); an append that finds the stream at the count cap trims the same way first, then
//!   refuses if it is still full (`full`, never a silent drop), else `XADD ... MAXLEN ~` (a
//!   guard: the check keeps it from trimming). `PEXPIRE` of twice the age cap, refreshed on
//!   every append, deletes the stream of a user who never comes back (everything in it is past
//!   the age cap by then; those entries are not counted).
//! * `rg:dd:<sender>` and `rg:dd:<sender>:old`: the dedup window, cid -> message id, checked
//!   by the same script before any append, so a resend after a gateway restart is answered
//!   with the first id and stored once (`HSETNX`: one call checks and records a cid). Fields
//!   `~born` (when the generation started) and `~old` (an older one was kept) are read once per
//!   sender per batch. A generation is rotated into `:old` only when it is
//!   older than the window (24 h) *and* holds more cids than the minimum (10,000): every cid
//!   is kept at least 24 h and the newest 10,000 are always kept (SPEC: whichever is larger).
//!
//! # Several nodes (one Redis)
//! * `node:<run>`: a node run's lease (`PX lease_ms`); `<run>` = `node_id.<start ms>`.
//! * `loc:<user>`: the runs holding a device of the user. A load adds this run just before
//!   its read, in the same pipeline; a leave removes it. Every later append to the user's
//!   inbox, by any node, is published by the same script (`m` push) to every run in it, this
//!   one included, so a node's mirror is fed from one connection in Redis order. A remove
//!   that deleted the entry publishes the sender's `delivered` (`d` push) to the sender's
//!   other runs. Presence questions count runs with a live lease and drop the others.
//! * `ch:<run>`: the run's pub/sub channel, heard by one connection per node (`listen`);
//!   pushes go to the home shard of the user or room they name. Each (re)subscription makes
//!   every shard resync (reload mirrors, ask pending room joins again).
//! * Rooms: `rh:<room>` history (ids `0-<offset>`, exact `MAXLEN`), `rd:<room>` the offset
//!   counter `~last` and the publish dedup, `rn:<room>` the runs with members. A publish is
//!   pushed (`r`) to every run with members, this one included; a join's answer (`j`) is
//!   published to the joining run only, by the script that registers it, so it arrives in
//!   order with the room's messages.
//!
//! Redis Cluster is not supported: a batch touches the keys of many users in one script call,
//! which a cluster refuses across slots. Standalone and Sentinel URLs work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use compact_str::CompactString;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use fred::interfaces::StreamsInterface;
use fred::prelude::*;
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand};

use super::{InboxSeq, StoreError, StoredMessage};
use crate::delivery::message::{Message, Outcome, ReplyTo, Report};
use crate::mesh::Doorbell;

/// Operations a shard may have queued for Redis; beyond it, sends get `unavailable` (bounded
/// memory while Redis is away).
pub const OPS_PER_SHARD: usize = 16_384;
/// Pushes from other nodes buffered between the Redis connection and the routing task; beyond
/// it the oldest are lost and every shard resyncs (reloads from Redis).
const PUSH_BUFFER: usize = 16_384;
/// Operations sent in one script call at most.
pub const BATCH_OPS: usize = 1_024;
/// SPEC dedup window: at least 24 h ...
pub const DEDUP_MIN_AGE_MS: u64 = 24 * 60 * 60 * 1000;
/// ... or at least 10,000 cids per sender, whichever is larger.
pub const DEDUP_MIN_ENTRIES: u64 = 10_000;

/// What a shard asks of the store. Answers come back in the order asked.
pub enum StoreOp {
    /// Make `msg` durable in its recipient's inbox (unless its cid was already stored), and
    /// push it to the other nodes holding the recipient.
    Append(Box<Message>),
    /// An entry was acked: delete it. `report`: the sender's `delivered`, sent (here and to
    /// the sender's other nodes) only when this delete removed the entry, so a message is
    /// reported once however many devices on however many nodes ack it.
    Remove {
        user: CompactString,
        seq: InboxSeq,
        report: Option<Box<Report>>,
    },
    /// Register this node in `user`'s directory entry, then read the inbox, oldest first, up
    /// to `limit` entries (in that order: see the cluster notes in the module doc).
    Load {
        user: CompactString,
        token: u64,
        limit: usize,
    },
    /// `user`'s last device here left: take this node out of the user's directory entry.
    Leave { user: CompactString },
    /// Refresh this node's lease (shard 0, from its tick).
    Lease,
    /// Which of `users` have a device on a live node; answered with `ask` quoted.
    Presence {
        users: Vec<CompactString>,
        ask: usize,
    },
    /// Give a room message the room's next offset, keep it in the room's history and push
    /// it to every node with members (this one included: see "Rooms" in the module doc).
    RoomPublish(Box<RoomPost>),
    /// Register this node with `room`'s nodes and have the room's current offset (and, with
    /// `since`, what the history holds after it) pushed back on this node's channel, in
    /// order with the room's messages. The answer itself is only `Done`.
    RoomJoin(Box<RoomJoinAsk>),
    /// This node's last member of `room` left.
    RoomLeave { room: CompactString },
    /// Touch nothing: a shard that stopped writing while Redis was away uses it to learn
    /// that Redis is back (the batch's own answer says so).
    Probe,
}

/// A publish on its way to a room's history.
pub struct RoomPost {
    pub room: CompactString,
    pub from: CompactString,
    pub cid: Box<str>,
    pub body: Box<str>,
    pub id: u64,
    pub ts: u64,
    pub reply: RoomReply,
}

/// Who hears how a publish went.
pub enum RoomReply {
    /// A connection: `accepted` (with the offset) or `error`.
    Conn(ReplyTo),
    /// `POST /api/publish`: (id, offset); dropped when refused (the API answers 503).
    Api(tokio::sync::oneshot::Sender<(u64, u64)>),
}

/// A member joining, as the room's home shard asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomJoinAsk {
    pub room: CompactString,
    pub since: Option<u64>,
    /// The joining connection: its shard, slab index and serial.
    pub shard: usize,
    pub conn: usize,
    pub serial: u32,
}

/// How an append went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Written at `seq`; `expired`: entries the age cap trimmed on the way; `pushed`: other
    /// nodes the entry was published to (they hold a device of the recipient).
    Stored {
        seq: InboxSeq,
        expired: u64,
        pushed: u64,
    },
    /// The sender's cid was already stored as message `id`.
    Duplicate { id: u64 },
}

/// A user's inbox as read from Redis.
#[derive(Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Oldest first.
    pub entries: Vec<(InboxSeq, StoredMessage)>,
    /// Entries the age cap trimmed just before the read.
    pub expired: u64,
}

/// The store's answers.
pub enum StoreReply {
    Appended {
        msg: Box<Message>,
        result: Result<Appended, StoreError>,
    },
    Removed {
        ok: bool,
        report: Option<Box<Report>>,
    },
    Loaded {
        user: CompactString,
        token: u64,
        result: Result<Loaded, StoreError>,
    },
    /// `Leave`, `Lease` and `Probe` done (or failed: the batch's answer says so).
    Done,
    /// The answer to `Presence`; `None` when Redis could not answer.
    Presence {
        ask: usize,
        online: Option<Vec<bool>>,
    },
    /// From another node: an entry appended to `user`'s inbox (the user is homed here).
    Pushed {
        user: CompactString,
        seq: InboxSeq,
        msg: StoredMessage,
    },
    /// From another node: a device there acked a message this shard's user sent.
    RemoteReport(Box<Report>),
    /// Pushes may have been missed (the node's channel was resubscribed, or its lease had
    /// lapsed and other nodes may have dropped it from directory entries): reload every
    /// mirror, which registers again.
    Resync,
    /// How a `RoomPublish` went: (id, offset), the first copy's for a resent cid.
    RoomPublished {
        post: Box<RoomPost>,
        result: Result<(u64, u64), StoreError>,
    },
    /// A `RoomJoin` could not be made: the member hears `unavailable`.
    RoomJoinFailed(Box<RoomJoinAsk>),
    /// Pushed on this node's channel: a room message, in the room's offset order.
    RoomMessage {
        room: CompactString,
        offset: u64,
        msg: StoredMessage,
    },
    /// Pushed on this node's channel: the answer to a `RoomJoin`, in order with the room's
    /// messages (nothing after `last` was pushed before it, everything after it follows).
    RoomJoinAnswer {
        ask: Box<RoomJoinAsk>,
        last: u64,
        recovered: bool,
        replay: Vec<(u64, StoredMessage)>,
    },
    /// One per batch, after its answers: for the shard's metrics and its Redis-up state.
    Batch {
        ops: usize,
        latency: Duration,
        error: Option<String>,
    },
}

/// A shard's end of the store.
pub struct StoreLink {
    ops: Sender<StoreOp>,
    replies: Receiver<StoreReply>,
    wake_store: Arc<Doorbell>,
    own_bell: Arc<Doorbell>,
    /// The socket the shard reads its doorbell from (taken by the glue).
    pub bell_reader: Option<std::os::unix::net::UnixStream>,
}

impl StoreLink {
    /// Queue `op`; it comes back when the queue is full.
    pub fn submit(&self, op: StoreOp) -> Result<(), StoreOp> {
        match self.ops.try_send(op) {
            Ok(()) => {
                self.wake_store.ring();
                Ok(())
            }
            Err(TrySendError::Full(op)) | Err(TrySendError::Disconnected(op)) => Err(op),
        }
    }

    /// The doorbell was read: clear it before draining.
    pub fn clear_bell(&self) {
        self.own_bell.clear();
    }

    /// Answers ready now, at most `max`.
    pub fn take_replies(&self, out: &mut Vec<StoreReply>, max: usize) {
        out.extend(self.replies.try_iter().take(max));
    }
}

/// Refuse URLs this store cannot serve (checked with the config, before start).
pub fn check_url(url: &str) -> Result<(), String> {
    let config = Config::from_url(url).map_err(|e| format!("`{url}`: {e}"))?;
    if config.server.is_clustered() {
        return Err("Redis Cluster is not supported yet (a batch touches keys of many users in one script call); use a standalone or Sentinel URL".into());
    }
    Ok(())
}

/// Settings the Redis thread needs.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub pool_size: usize,
    pub timeout: Duration,
    pub key_prefix: String,
    pub max_messages: usize,
    pub max_age_ms: u64,
    /// This run of this node (`node_id` plus start time): directory entries and the node's
    /// channel name it, so a restarted node never inherits a dead run's entries.
    pub node: String,
    /// Lease of `node`; refreshed by shard 0 every third of it.
    pub lease_ms: u64,
    /// Room history: messages kept per room, and their age cap.
    pub room_history_max: usize,
    pub room_history_age_ms: u64,
}

impl RedisSettings {
    pub fn from_config(cfg: &crate::config::Config) -> Option<Self> {
        Some(RedisSettings {
            url: cfg.redis_url.clone()?,
            pool_size: if cfg.redis_pool_size == 0 {
                cfg.shards
            } else {
                cfg.redis_pool_size
            },
            timeout: Duration::from_millis(cfg.redis_timeout_ms),
            key_prefix: cfg.redis_key_prefix.clone(),
            max_messages: cfg.inbox_max_messages,
            max_age_ms: cfg.inbox_max_age_ms,
            node: node_run_id(&cfg.node_id),
            lease_ms: cfg.node_lease_ms,
            room_history_max: cfg.room_history_max,
            room_history_age_ms: cfg.room_history_age_ms,
        })
    }
}

/// Start the Redis thread and return one link per shard. The gateway starts even when Redis
/// is down (sends that need it get `unavailable` until it is back; fred reconnects).
pub fn start(settings: RedisSettings, shards: usize) -> std::io::Result<Vec<StoreLink>> {
    let mut links = Vec::with_capacity(shards);
    let mut pipes: Vec<ShardPipe> = Vec::with_capacity(shards);
    for shard in 0..shards {
        let (ops_tx, ops_rx) = crossbeam_channel::bounded(OPS_PER_SHARD);
        // Unbounded in type, bounded in fact: at most one answer per queued op plus one per batch.
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        let (wake_store, store_reader) = Doorbell::pair()?;
        let (own_bell, shard_reader) = Doorbell::pair()?;
        store_reader.set_nonblocking(true)?;
        links.push(StoreLink {
            ops: ops_tx,
            replies: reply_rx,
            wake_store: wake_store.clone(),
            own_bell: own_bell.clone(),
            bell_reader: Some(shard_reader),
        });
        pipes.push(ShardPipe {
            shard,
            ops: ops_rx,
            replies: reply_tx,
            wake_store,
            shard_bell: own_bell,
            reader: store_reader,
        });
    }
    let all = AllShards(Arc::new(
        pipes
            .iter()
            .map(|p| (p.replies.clone(), p.shard_bell.clone()))
            .collect(),
    ));
    std::thread::Builder::new()
        .name("ringgate-redis".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime for Redis");
            runtime.block_on(run(settings, pipes, all));
        })?;
    Ok(links)
}

/// Every shard's answer channel and doorbell, for what is not the answer to one shard's
/// operation (pushes from other nodes, resyncs).
#[derive(Clone)]
struct AllShards(Arc<Vec<(Sender<StoreReply>, Arc<Doorbell>)>>);

impl AllShards {
    fn send(&self, shard: usize, reply: StoreReply) {
        let (tx, bell) = &self.0[shard];
        let _ = tx.send(reply);
        bell.ring();
    }

    fn resync(&self, why: &str) {
        tracing::info!(
            why,
            "cluster: every shard reloads its online users' inboxes"
        );
        for shard in 0..self.0.len() {
            self.send(shard, StoreReply::Resync);
        }
    }
}

/// Listen on this node's channel: pushes go to the home shard of the user they name. Every
/// (re)connection subscribes again and makes every shard resync (pushes published while the
/// channel was not heard are lost by pub/sub, never by the inbox, which a reload reads).
async fn listen(config: Config, settings: Arc<RedisSettings>, shards: AllShards) {
    let client = match Builder::from_config(config)
        // Retry the first connection too (by the policy), as after any later loss.
        .with_config(|c| c.fail_fast = false)
        .with_performance_config(|c| c.broadcast_channel_capacity = PUSH_BUFFER)
        .with_connection_config(|c| c.connection_timeout = settings.timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the Redis subscriber; other nodes' messages arrive only on reload");
            return;
        }
    };
    let mut messages = client.message_rx();
    let mut reconnects = client.reconnect_rx();
    let channel = channel_name(&settings);
    let connecting = client.clone();
    tokio::spawn(async move {
        if let Err(e) = connecting.init().await {
            tracing::warn!(error = %e, "cluster channel: cannot connect to Redis yet; retrying");
        }
    });
    let count = shards.0.len();
    loop {
        tokio::select! {
            m = messages.recv() => match m {
                Ok(m) => {
                    let Some(push) = text_ref(&m.value).and_then(parse_push) else {
                        tracing::warn!(channel = %m.channel, "cluster channel: ignored a message that is not a ringgate push");
                        continue;
                    };
                    let home = crate::mesh::home_shard(push.user(), count);
                    shards.send(home, push.into_reply(count));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    shards.resync(&format!("{n} pushes were not read in time"));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            r = reconnects.recv() => match r {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Inline: no push of the new subscription is routed before every shard
                    // has its resync (messages wait in the broadcast buffer meanwhile).
                    // Until it works or the connection drops (the next reconnect retries).
                    loop {
                        match client.subscribe(channel.as_str()).await {
                            Ok(()) => {
                                shards.resync("subscribed to this node's channel");
                                break;
                            }
                            Err(e) if client.is_connected() => {
                                tracing::warn!(error = %e, "cluster channel: subscribe failed; retrying");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// The Redis thread's end of one shard's link.
struct ShardPipe {
    shard: usize,
    ops: Receiver<StoreOp>,
    replies: Sender<StoreReply>,
    wake_store: Arc<Doorbell>,
    shard_bell: Arc<Doorbell>,
    reader: std::os::unix::net::UnixStream,
}

async fn run(settings: RedisSettings, pipes: Vec<ShardPipe>, all: AllShards) {
    let config = Config::from_url(&settings.url).expect("checked by the config");
    let pool = match Builder::from_config(config)
        .with_config(|c| c.fail_fast = false)
        .with_connection_config(|c| {
            c.connection_timeout = settings.timeout;
            // A retried command could run after a later batch: never retry, fail instead.
            c.max_command_attempts = 1;
        })
        .with_performance_config(|c| c.default_command_timeout = settings.timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2))
        .build_pool(settings.pool_size.max(1))
    {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the Redis client; every store operation will fail");
            return fail_forever(pipes).await;
        }
    };
    // Connect in the background: shards are served at once, with `unavailable` until then.
    let connecting = pool.clone();
    let url = settings.url.clone();
    tokio::spawn(async move {
        if let Err(e) = connecting.init().await {
            tracing::warn!(error = %e, %url, "cannot connect to Redis; sends that need the store get `unavailable`");
        }
    });
    // Give the first connection up to one timeout before serving: operations queue meanwhile
    // (bounded), and a gateway started next to a healthy Redis does not refuse its first sends.
    let deadline = Instant::now() + settings.timeout;
    while !pool.clients().iter().all(|c| c.is_connected()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Take this run's lease before any shard registers a user: other nodes drop directory
    // entries of runs without one (shard 0 refreshes it from then on).
    let lease = Expiration::PX(settings.lease_ms as i64);
    if let Err(e) = pool
        .set::<(), _, _>(lease_key(&settings), 1, Some(lease), None, false)
        .await
    {
        tracing::warn!(error = %e, "cannot take this node's lease yet; shard 0 keeps trying");
    }
    let settings = Arc::new(settings);
    let mut tasks = Vec::new();
    let config = Config::from_url(&settings.url).expect("checked by the config");
    tasks.push(tokio::spawn(listen(config, settings.clone(), all.clone())));
    for pipe in pipes {
        let client = pool.clients()[pipe.shard % pool.clients().len()].clone();
        tasks.push(tokio::spawn(serve_shard(
            client,
            settings.clone(),
            pipe,
            all.clone(),
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// No client could be built: answer every operation with an error, forever.
async fn fail_forever(pipes: Vec<ShardPipe>) {
    let mut tasks = Vec::new();
    for pipe in pipes {
        tasks.push(tokio::spawn(async move {
            let Ok(reader) = pipe.reader.try_clone() else {
                return;
            };
            let Ok(mut bell) = tokio::net::UnixStream::from_std(reader) else {
                return;
            };
            let mut buf = [0u8; 64];
            while wait_bell(&mut bell, &mut buf).await {
                pipe.wake_store.clear();
                let batch: Vec<StoreOp> = pipe.ops.try_iter().collect();
                answer_failed(&pipe, batch, "the Redis client could not be built".into());
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn wait_bell(bell: &mut tokio::net::UnixStream, buf: &mut [u8]) -> bool {
    use tokio::io::AsyncReadExt;
    matches!(bell.read(buf).await, Ok(n) if n > 0)
}

/// One shard's operations, batch after batch, in order.
async fn serve_shard(
    client: Client,
    settings: Arc<RedisSettings>,
    pipe: ShardPipe,
    all: AllShards,
) {
    let shard = pipe.shard;
    let mut bell = match tokio::net::UnixStream::from_std(pipe.reader.try_clone().expect("dup")) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, shard, "Redis task cannot watch its doorbell");
            return;
        }
    };
    let mut buf = [0u8; 64];
    let mut up = true;
    while wait_bell(&mut bell, &mut buf).await {
        pipe.wake_store.clear();
        loop {
            let batch: Vec<StoreOp> = pipe.ops.try_iter().take(BATCH_OPS).collect();
            if batch.is_empty() {
                break;
            }
            let started = Instant::now();
            let ops = batch.len();
            // While disconnected, fail at once instead of queueing inside fred: memory stays
            // bounded while Redis is away, and senders hear `unavailable` without waiting.
            let outcome = if !client.is_connected() {
                Err("not connected to Redis (reconnecting)".to_string())
            } else {
                run_batch(&client, &settings, &batch).await
            };
            let error = match outcome {
                Ok(answers) => {
                    let first_error = answers.iter().find_map(|a| a.as_ref().err().cloned());
                    if answers
                        .iter()
                        .any(|a| matches!(a, Ok(Answer::Leased(false))))
                    {
                        all.resync("this node's lease had lapsed (or was just taken)");
                    }
                    for (op, answer) in batch.into_iter().zip(answers) {
                        let reply = match answer {
                            Ok(answer) => answer.into_reply(op),
                            Err(why) => failed_reply(op, why),
                        };
                        let _ = pipe.replies.send(reply);
                    }
                    first_error
                }
                Err(why) => {
                    answer_failed(&pipe, batch, why.clone());
                    Some(why)
                }
            };
            match (&error, up) {
                (None, false) => {
                    tracing::info!(shard, "Redis is back: the durable store answers again");
                    up = true;
                }
                (Some(why), true) => {
                    tracing::warn!(shard, error = %why, "Redis unavailable: sends that need the store get `unavailable`; live delivery goes on");
                    up = false;
                }
                _ => {}
            }
            let _ = pipe.replies.send(StoreReply::Batch {
                ops,
                latency: started.elapsed(),
                error,
            });
            pipe.shard_bell.ring();
        }
    }
}

fn answer_failed(pipe: &ShardPipe, batch: Vec<StoreOp>, why: String) {
    for op in batch {
        let _ = pipe.replies.send(failed_reply(op, why.clone()));
    }
    pipe.shard_bell.ring();
}

fn failed_reply(op: StoreOp, why: String) -> StoreReply {
    match op {
        StoreOp::Append(msg) => StoreReply::Appended {
            msg,
            result: Err(StoreError::Unavailable(why)),
        },
        StoreOp::Remove { report, .. } => StoreReply::Removed { ok: false, report },
        StoreOp::Load { user, token, .. } => StoreReply::Loaded {
            user,
            token,
            result: Err(StoreError::Unavailable(why)),
        },
        StoreOp::Presence { ask, .. } => StoreReply::Presence { ask, online: None },
        StoreOp::RoomPublish(post) => StoreReply::RoomPublished {
            post,
            result: Err(StoreError::Unavailable(why)),
        },
        StoreOp::RoomJoin(ask) => StoreReply::RoomJoinFailed(ask),
        StoreOp::Leave { .. } | StoreOp::Lease | StoreOp::Probe | StoreOp::RoomLeave { .. } => {
            StoreReply::Done
        }
    }
}

/// How one batch goes to Redis, in one pipeline (one round trip), keeping the batch's order:
/// runs of script operations (appends, removes, presence, probes) as one script call each, and
/// the others as plain commands (a load is `SADD` + `XTRIM` + `XRANGE`: Redis answers those
/// natively, several times faster than through Lua, which would convert every entry to a Lua
/// table and back).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Script(std::ops::Range<usize>),
    Native(usize),
}

fn is_native(op: &StoreOp) -> bool {
    matches!(
        op,
        StoreOp::Load { .. } | StoreOp::Leave { .. } | StoreOp::Lease | StoreOp::RoomLeave { .. }
    )
}

fn plan(batch: &[StoreOp]) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut run_start = None;
    for (i, op) in batch.iter().enumerate() {
        if is_native(op) {
            if let Some(start) = run_start.take() {
                segments.push(Segment::Script(start..i));
            }
            segments.push(Segment::Native(i));
        } else if run_start.is_none() {
            run_start = Some(i);
        }
    }
    if let Some(start) = run_start {
        segments.push(Segment::Script(start..batch.len()));
    }
    segments
}

/// Oldest stream id a load returns: entries older are past the age cap.
fn load_minid(settings: &RedisSettings) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(settings.max_age_ms).to_string()
}

/// Send one batch; an answer (or the reason it failed) per operation. `Err`: nothing is
/// known of the whole batch (no answer in time, or the pipeline could not be sent).
async fn run_batch(
    client: &Client,
    settings: &RedisSettings,
    batch: &[StoreOp],
) -> Result<Vec<Result<Answer, String>>, String> {
    let segments = plan(batch);
    // Never buffered for a later connection, never retried: a batch answered `unavailable`
    // must not be written behind the shard's back once Redis is back (it would land after
    // messages accepted since, out of order).
    let once = Options {
        fail_fast: true,
        max_attempts: Some(1),
        timeout: Some(settings.timeout),
        ..Options::default()
    };
    let pipeline = fred::clients::Pipeline::from(client.with_options(&once));
    let minid = load_minid(settings);
    let queued = |r: Result<(), Error>| r.map_err(|e| e.to_string());
    for segment in &segments {
        match segment {
            Segment::Script(range) => {
                let call = BatchCall::build(settings, &batch[range.clone()]);
                // EVAL with the text (not EVALSHA): a Redis restarted meanwhile has an empty
                // script cache, and a NOSCRIPT in the middle of a pipeline could not be retried
                // without reordering. The text is ~2 KB per batch of up to 1,024 operations.
                let mut args = Vec::with_capacity(2 + call.keys.len() + call.args.len());
                args.push(BATCH_SCRIPT.to_string());
                args.push(call.keys.len().to_string());
                args.extend(call.keys);
                args.extend(call.args);
                let eval = CustomCommand::new_static("EVAL", ClusterHash::Random, false);
                queued(pipeline.custom(eval, args).await)?;
            }
            Segment::Native(i) => match &batch[*i] {
                StoreOp::Load { user, limit, .. } => {
                    let key = format!("{}in:{user}", settings.key_prefix);
                    // Registered before the read: an append after the read sees this node
                    // in the directory and pushes the entry here (see the module doc).
                    queued(
                        pipeline
                            .sadd(location_key(settings, user), &settings.node)
                            .await,
                    )?;
                    queued(
                        pipeline
                            .xtrim(key.as_str(), ("MINID", "=", minid.as_str()))
                            .await,
                    )?;
                    queued(
                        pipeline
                            .xrange(key.as_str(), minid.as_str(), "+", Some(*limit as u64))
                            .await,
                    )?;
                }
                StoreOp::Leave { user } => {
                    queued(
                        pipeline
                            .srem(location_key(settings, user), &settings.node)
                            .await,
                    )?;
                }
                StoreOp::Lease => {
                    let lease = Expiration::PX(settings.lease_ms as i64);
                    let key = lease_key(settings);
                    queued(pipeline.set(key, 1, Some(lease), None, true).await)?;
                }
                StoreOp::RoomLeave { room } => {
                    let key = format!("{}rn:{room}", settings.key_prefix);
                    queued(pipeline.srem(key, &settings.node).await)?;
                }
                _ => unreachable!("plan puts only native operations in Native segments"),
            },
        }
    }
    let results = tokio::time::timeout(settings.timeout, pipeline.try_all::<Value>())
        .await
        .map_err(|_| format!("no answer within {} ms", settings.timeout.as_millis()))?;
    let mut results = results.into_iter().map(|r| r.map_err(|e| e.to_string()));
    let mut next = || {
        results
            .next()
            .unwrap_or_else(|| Err("the pipeline answered fewer replies than it sent".into()))
    };
    let mut answers = Vec::with_capacity(batch.len());
    for segment in segments {
        match segment {
            Segment::Script(range) => {
                match next().and_then(|v| parse_batch(v, &batch[range.clone()])) {
                    Ok(parsed) => answers.extend(parsed.into_iter().map(Ok)),
                    Err(why) => answers.extend(range.map(|_| Err(why.clone()))),
                }
            }
            Segment::Native(i) => answers.push(match &batch[i] {
                StoreOp::Load { .. } => {
                    let (registered, trimmed, entries) = (next(), next(), next());
                    registered.and_then(|_| parse_load(trimmed, entries))
                }
                // SET .. GET answers the previous value: none means the lease had lapsed.
                StoreOp::Lease => next().map(|v| Answer::Leased(!matches!(v, Value::Null))),
                _ => next().map(|_| Answer::Done),
            }),
        }
    }
    Ok(answers)
}

fn parse_load(
    trimmed: Result<Value, String>,
    entries: Result<Value, String>,
) -> Result<Answer, String> {
    let expired = integer(&trimmed?).unwrap_or(0);
    let raw = array(entries?)?;
    let mut parsed = Vec::with_capacity(raw.len());
    for entry in raw {
        parsed.push(parse_entry(entry)?);
    }
    Ok(Answer::Loaded(Loaded {
        entries: parsed,
        expired,
    }))
}

/// Keys and arguments of one script call.
struct BatchCall {
    keys: Vec<String>,
    args: Vec<String>,
}

impl BatchCall {
    fn build(settings: &RedisSettings, batch: &[StoreOp]) -> BatchCall {
        let p = &settings.key_prefix;
        let mut keys = Vec::with_capacity(batch.len() * 4);
        let mut args = Vec::with_capacity(6 + batch.len() * 6);
        args.push(settings.max_age_ms.to_string());
        args.push(settings.max_messages.to_string());
        args.push(DEDUP_MIN_AGE_MS.to_string());
        args.push(DEDUP_MIN_ENTRIES.to_string());
        args.push(settings.node.clone());
        args.push(p.clone());
        args.push(settings.room_history_max.to_string());
        args.push(settings.room_history_age_ms.to_string());
        for op in batch {
            match op {
                StoreOp::Append(m) => {
                    keys.push(format!("{p}in:{}", m.to));
                    keys.push(format!("{p}dd:{}", m.from));
                    keys.push(format!("{p}dd:{}:old", m.from));
                    keys.push(location_key(settings, &m.to));
                    args.push("A".into());
                    args.push(m.id.to_string());
                    args.push(m.cid.to_string());
                    args.push(pack(m.id, m.ts, &m.from, &m.cid, &m.body));
                    args.push(m.to.to_string());
                }
                StoreOp::Remove { user, seq, report } => {
                    keys.push(format!("{p}in:{user}"));
                    match report {
                        Some(r) => {
                            keys.push(location_key(settings, &r.from));
                            args.push("D".into());
                            args.push(seq_to_stream_id(*seq));
                            args.push(pack_delivered(r));
                        }
                        None => {
                            args.push("R".into());
                            args.push(seq_to_stream_id(*seq));
                        }
                    }
                }
                StoreOp::Presence { users, .. } => {
                    keys.extend(users.iter().map(|u| location_key(settings, u)));
                    args.push("Q".into());
                    args.push(users.len().to_string());
                }
                StoreOp::RoomPublish(post) => {
                    room_keys(&mut keys, p, &post.room);
                    args.push("B".into());
                    args.push(post.room.to_string());
                    args.push(post.id.to_string());
                    // The dedup field: sender and cid, length-prefixed (ids may hold spaces).
                    args.push(format!("{} {}{}", post.from.len(), post.from, post.cid));
                    args.push(pack(post.id, post.ts, &post.from, &post.cid, &post.body));
                }
                StoreOp::RoomJoin(ask) => {
                    room_keys(&mut keys, p, &ask.room);
                    args.push("J".into());
                    args.push(ask.room.to_string());
                    args.push(ask.since.map_or_else(|| "-".into(), |s| s.to_string()));
                    args.push(format!("{} {} {}", ask.shard, ask.conn, ask.serial));
                }
                StoreOp::Probe => args.push("P".into()),
                StoreOp::Load { .. }
                | StoreOp::Leave { .. }
                | StoreOp::Lease
                | StoreOp::RoomLeave { .. } => {
                    unreachable!("native operations are not script operations (see plan)")
                }
            }
        }
        BatchCall { keys, args }
    }
}

/// A room's keys: `rh:` its history (a stream whose ids are `0-<offset>`), `rd:` its
/// counter (`~last`) and publish dedup (`<from>|<cid>` -> `<id> <offset>`), `rn:` the node
/// runs with members.
fn room_keys(keys: &mut Vec<String>, p: &str, room: &str) {
    keys.push(format!("{p}rh:{room}"));
    keys.push(format!("{p}rd:{room}"));
    keys.push(format!("{p}rn:{room}"));
}

/// `<prefix>loc:<user>`: the runs of nodes that hold a device of `user` (a set).
fn location_key(settings: &RedisSettings, user: &str) -> String {
    format!("{}loc:{user}", settings.key_prefix)
}

/// `<prefix>node:<run>`: this node run's lease (exists while the node is alive).
fn lease_key(settings: &RedisSettings) -> String {
    format!("{}node:{}", settings.key_prefix, settings.node)
}

/// `<prefix>ch:<run>`: the pub/sub channel a node run listens on.
pub fn channel_name(settings: &RedisSettings) -> String {
    format!("{}ch:{}", settings.key_prefix, settings.node)
}

/// The script every batch runs. ARGV: max_age_ms, max_messages, dedup_ms, dedup_min, this
/// node's run, the key prefix, then the operations; KEYS: the keys each operation names, in
/// order. Returns one answer per operation.
const BATCH_SCRIPT: &str = r#"
local maxage = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
local dedup_ms = tonumber(ARGV[3])
local dedup_min = tonumber(ARGV[4])
local me, prefix = ARGV[5], ARGV[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minid = string.format('%d', math.max(0, now - maxage))
local hmax, hage = tonumber(ARGV[7]), tonumber(ARGV[8])
-- Offsets are near 1.8e15 (microseconds): exact in Lua's doubles, printed without exponent.
local function fmt(n) return string.format('%.0f', n) end
local function room_last(rd)
  local last = redis.call('HGET', rd, '~last')
  if last then return tonumber(last) end
  -- A new (or long idle) room starts at the clock in microseconds, like the embedded one:
  -- offsets a client kept from an earlier life of the room are then below its history.
  last = now * 1000
  redis.call('HSET', rd, '~last', fmt(last))
  return last
end
local room_ttl = fmt(hage + 60000)
-- Work done once per key per batch, not once per message: the length of each stream, each
-- sender's dedup generation (born, has an older one), and the TTL/rotation bookkeeping at the
-- end. The age cap is enforced by loads (they read from minid and trim, counted) and by an
-- append that finds the stream at the count cap (it trims first, so expired entries never
-- cause a refusal); entries past the cap are never returned.
local streams, senders = {}, {}
local function stream(s)
  local st = streams[s]
  if not st then
    st = {len = redis.call('XLEN', s), expired = 0, trimmed = false, touched = false}
    streams[s] = st
  end
  if st.len >= maxlen and not st.trimmed then
    st.trimmed = true
    local expired = redis.call('XTRIM', s, 'MINID', minid)
    st.expired = st.expired + expired
    st.len = st.len - expired
  end
  return st
end
local function sender(dcur, dold)
  local d = senders[dcur]
  if not d then
    -- '~born': when this generation started; '~old': an older generation was kept.
    local meta = redis.call('HMGET', dcur, '~born', '~old')
    d = {old = dold, born = tonumber(meta[1]), has_old = meta[2] ~= false, touched = false}
    senders[dcur] = d
  end
  return d
end
-- Other nodes holding a device of a user (directory entry read once per batch), and a push
-- to each of them over its channel. Entries of dead runs only cost a PUBLISH nobody hears;
-- presence questions clean them up.
-- `to_me`: this node too when it is in the entry (inbox entries: a node's mirror of a user
-- is fed from its channel alone, in the order Redis ran the appends, whichever node made
-- them). Returns how many *other* nodes it went to.
local locations = {}
local function push(loc, payload, to_me)
  local nodes = locations[loc]
  if not nodes then
    nodes = redis.call('SMEMBERS', loc)
    locations[loc] = nodes
  end
  local sent = 0
  for _, n in ipairs(nodes) do
    if n ~= me then
      redis.call('PUBLISH', prefix .. 'ch:' .. n, payload)
      sent = sent + 1
    elseif to_me then
      redis.call('PUBLISH', prefix .. 'ch:' .. n, payload)
    end
  end
  return sent
end
local out = {}
local i, k = 9, 1
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'A' then
    local s, dcur, dold, loc = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
    local id, cid, packed, to = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    k = k + 4
    i = i + 5
    local d = sender(dcur, dold)
    local st = stream(s)
    local expired = st.expired
    local prev
    if st.len >= maxlen then
      prev = redis.call('HGET', dcur, cid)
      if not prev and d.has_old then prev = redis.call('HGET', dold, cid) end
    -- One call checks and records the cid (the common case: a new message).
    elseif redis.call('HSETNX', dcur, cid, id) == 0 then
      prev = redis.call('HGET', dcur, cid)
    elseif d.has_old then
      prev = redis.call('HGET', dold, cid)
      -- Known to the older generation: undo the record just made.
      if prev then redis.call('HDEL', dcur, cid) end
    end
    if prev then
      out[#out + 1] = {'dup', prev}
    elseif st.len >= maxlen then
      st.expired = 0
      out[#out + 1] = {'full', expired, st.len}
    else
      st.expired = 0
      local xid = redis.call('XADD', s, 'MAXLEN', '~', ARGV[2], '*', 'm', packed)
      st.len = st.len + 1
      st.touched = true
      d.touched = true
      local pushed = push(loc, 'm ' .. xid .. ' ' .. string.len(to) .. ' ' .. to .. packed, true)
      out[#out + 1] = {'ok', xid, expired, pushed}
    end
  elseif op == 'R' then
    local n = redis.call('XDEL', KEYS[k], ARGV[i + 1])
    if streams[KEYS[k]] then streams[KEYS[k]].len = streams[KEYS[k]].len - n end
    out[#out + 1] = n
    k = k + 1
    i = i + 2
  elseif op == 'D' then
    -- Removed by this ack (not an earlier one): the sender's other nodes hear `delivered`.
    local n = redis.call('XDEL', KEYS[k], ARGV[i + 1])
    if streams[KEYS[k]] then streams[KEYS[k]].len = streams[KEYS[k]].len - n end
    if n == 1 then push(KEYS[k + 1], ARGV[i + 2], false) end
    out[#out + 1] = n
    k = k + 2
    i = i + 3
  elseif op == 'Q' then
    -- Presence on *other* live nodes (the asking node answers for itself); entries of runs
    -- whose lease expired are dropped on the way.
    local n = tonumber(ARGV[i + 1])
    local online = {}
    for j = 1, n do
      local loc = KEYS[k + j - 1]
      local on = 0
      for _, m in ipairs(redis.call('SMEMBERS', loc)) do
        if m ~= me then
          if redis.call('EXISTS', prefix .. 'node:' .. m) == 1 then
            on = 1
          else
            redis.call('SREM', loc, m)
          end
        end
      end
      online[j] = on
    end
    out[#out + 1] = online
    k = k + n
    i = i + 2
  elseif op == 'B' then
    local rh, rd, rn = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    local room, id, field, packed = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    k = k + 3
    i = i + 5
    local prev = redis.call('HGET', rd, field)
    if prev then
      out[#out + 1] = {'dup', prev}
    else
      local offset = fmt(room_last(rd) + 1)
      redis.call('HSET', rd, '~last', offset, field, id .. ' ' .. offset)
      redis.call('XADD', rh, 'MAXLEN', '=', ARGV[7], '0-' .. offset, 'm', packed)
      -- Publish dedup reaches about as far back as the history: past four times its size
      -- it starts over (the counter stays).
      if redis.call('HLEN', rd) > 4 * hmax + 1 then
        redis.call('DEL', rd)
        redis.call('HSET', rd, '~last', offset)
      end
      redis.call('PEXPIRE', rh, room_ttl)
      redis.call('PEXPIRE', rd, room_ttl)
      -- Every node with members, this one too: each node sees a room's messages in offset
      -- order on one connection (its channel), with the answers to its joins in between.
      local payload = 'r ' .. offset .. ' ' .. string.len(room) .. ' ' .. room .. packed
      for _, n in ipairs(redis.call('SMEMBERS', rn)) do
        redis.call('PUBLISH', prefix .. 'ch:' .. n, payload)
      end
      out[#out + 1] = {'ok', id .. ' ' .. offset}
    end
  elseif op == 'J' then
    local rh, rd, rn = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    local room, since, who = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    k = k + 3
    i = i + 4
    redis.call('SADD', rn, me)
    for _, n in ipairs(redis.call('SMEMBERS', rn)) do
      if n ~= me and redis.call('EXISTS', prefix .. 'node:' .. n) == 0 then
        redis.call('SREM', rn, n)
      end
    end
    local last = room_last(rd)
    local recovered = 0
    local parts = {}
    if since ~= '-' and tonumber(since) <= last then
      local minage = now - hage
      local first
      for _, e in ipairs(redis.call('XRANGE', rh, '(0-' .. since, '+')) do
        local packed = e[2][2]
        local ts = tonumber(string.match(packed, '^%d+ (%d+) '))
        if ts and ts >= minage then
          local off = string.match(e[1], '^0%-(%d+)$')
          first = first or tonumber(off)
          parts[#parts + 1] = off .. ' ' .. string.len(packed) .. ' ' .. packed
        end
      end
      if tonumber(since) + 1 >= (first or last + 1) then recovered = 1 end
    end
    redis.call('PUBLISH', prefix .. 'ch:' .. me, 'j ' .. who .. ' ' .. fmt(last) .. ' ' .. recovered
      .. ' ' .. string.len(room) .. ' ' .. room .. table.concat(parts))
    out[#out + 1] = 1
  elseif op == 'P' then
    out[#out + 1] = 1
    i = i + 1
  else
    return redis.error_reply('ringgate: unknown store op ' .. tostring(op))
  end
end
local stream_ttl = string.format('%d', 2 * maxage)
for s, st in pairs(streams) do
  if st.touched then redis.call('PEXPIRE', s, stream_ttl) end
end
local dedup_ttl = string.format('%d', 2 * dedup_ms)
for dcur, d in pairs(senders) do
  if d.touched then
    if not d.born then
      redis.call('HSET', dcur, '~born', now)
    elseif now - d.born >= dedup_ms and redis.call('HLEN', dcur) > dedup_min + 2 then
      -- Rotate: the current generation becomes the older one (its TTL still runs), and the
      -- new one remembers that an older one exists.
      redis.call('RENAME', dcur, d.old)
      redis.call('HSET', dcur, '~born', now, '~old', 1)
    end
    redis.call('PEXPIRE', dcur, dedup_ttl)
  end
end
return out
"#;

/// One operation's answer, before it is paired with its operation again.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Appended(Result<Appended, StoreError>),
    Removed(bool),
    Loaded(Loaded),
    Online(Vec<bool>),
    /// A room publish: (id, offset).
    Published(Result<(u64, u64), StoreError>),
    /// The lease was still held (false: it had lapsed; see [`StoreReply::Resync`]).
    Leased(bool),
    Done,
}

impl Answer {
    fn into_reply(self, op: StoreOp) -> StoreReply {
        match (self, op) {
            (Answer::Appended(result), StoreOp::Append(msg)) => {
                StoreReply::Appended { msg, result }
            }
            (Answer::Removed(ok), StoreOp::Remove { report, .. }) => {
                StoreReply::Removed { ok, report }
            }
            (Answer::Loaded(loaded), StoreOp::Load { user, token, .. }) => StoreReply::Loaded {
                user,
                token,
                result: Ok(loaded),
            },
            (Answer::Online(online), StoreOp::Presence { ask, .. }) => StoreReply::Presence {
                ask,
                online: Some(online),
            },
            (Answer::Published(result), StoreOp::RoomPublish(post)) => {
                StoreReply::RoomPublished { post, result }
            }
            (Answer::Leased(_) | Answer::Done, _) => StoreReply::Done,
            // parse_batch checks kinds against the batch, so this cannot pair wrongly.
            (_, op) => unreachable!("answer kind differs from its operation: {}", op_name(&op)),
        }
    }
}

fn op_name(op: &StoreOp) -> &'static str {
    match op {
        StoreOp::Append(_) => "append",
        StoreOp::Remove { .. } => "remove",
        StoreOp::Load { .. } => "load",
        StoreOp::Leave { .. } => "leave",
        StoreOp::Lease => "lease",
        StoreOp::Presence { .. } => "presence",
        StoreOp::RoomPublish(_) => "room publish",
        StoreOp::RoomJoin(_) => "room join",
        StoreOp::RoomLeave { .. } => "room leave",
        StoreOp::Probe => "probe",
    }
}

/// Pair the script's answers with the batch; any shape mismatch fails the whole batch.
fn parse_batch(value: Value, batch: &[StoreOp]) -> Result<Vec<Answer>, String> {
    let Value::Array(items) = value else {
        return Err(format!("script answered {value:?}, not an array"));
    };
    if items.len() != batch.len() {
        return Err(format!(
            "script answered {} items for {} operations",
            items.len(),
            batch.len()
        ));
    }
    items
        .into_iter()
        .zip(batch)
        .map(|(item, op)| parse_answer(item, op))
        .collect()
}

fn parse_answer(item: Value, op: &StoreOp) -> Result<Answer, String> {
    match op {
        StoreOp::Append(m) => {
            let parts = array(item)?;
            let status = parts.first().and_then(text).unwrap_or_default();
            let result = match status.as_str() {
                "ok" => {
                    let xid = parts.get(1).and_then(text).ok_or("append: no id")?;
                    Ok(Appended::Stored {
                        seq: stream_id_to_seq(&xid).ok_or_else(|| format!("bad id {xid}"))?,
                        expired: parts.get(2).and_then(integer).unwrap_or(0),
                        pushed: parts.get(3).and_then(integer).unwrap_or(0),
                    })
                }
                "dup" => {
                    let id = parts.get(1).and_then(text).ok_or("dup: no id")?;
                    Ok(Appended::Duplicate {
                        id: id.parse().map_err(|_| format!("bad message id {id}"))?,
                    })
                }
                "full" => Err(StoreError::Full {
                    user: m.to.to_string(),
                    count: parts.get(2).and_then(integer).unwrap_or(0) as usize,
                }),
                other => return Err(format!("append: unknown status {other:?}")),
            };
            Ok(Answer::Appended(result))
        }
        StoreOp::Remove { .. } => Ok(Answer::Removed(integer(&item).unwrap_or(0) > 0)),
        StoreOp::Presence { users, .. } => {
            let online: Vec<bool> = array(item)?.iter().map(|v| integer(v) == Some(1)).collect();
            if online.len() != users.len() {
                return Err(format!(
                    "presence: {} answers for {} users",
                    online.len(),
                    users.len()
                ));
            }
            Ok(Answer::Online(online))
        }
        StoreOp::RoomPublish(_) => {
            let parts = array(item)?;
            let status = parts.first().and_then(text).unwrap_or_default();
            if status != "ok" && status != "dup" {
                return Err(format!("room publish: unknown status {status:?}"));
            }
            // "<id> <offset>", for a new message and a resent cid alike.
            let pair = parts.get(1).and_then(text).unwrap_or_default();
            let parsed = pair
                .split_once(' ')
                .and_then(|(id, offset)| Some((id.parse().ok()?, offset.parse().ok()?)));
            let (id, offset) =
                parsed.ok_or_else(|| format!("room publish: bad answer {pair:?}"))?;
            Ok(Answer::Published(Ok((id, offset))))
        }
        StoreOp::Probe | StoreOp::RoomJoin(_) => match integer(&item) {
            Some(1) => Ok(Answer::Done),
            _ => Err(format!("{}: unexpected answer {item:?}", op_name(op))),
        },
        StoreOp::Load { .. }
        | StoreOp::Leave { .. }
        | StoreOp::Lease
        | StoreOp::RoomLeave { .. } => Err(format!("a {} in a script batch", op_name(op))),
    }
}

/// A stored message as one stream field (one field instead of five: a fifth of the per-entry
/// work in Redis and here): `<id> <ts> <from bytes> <cid bytes> <from><cid><body>`. Lengths
/// make it exact for any content (raw JSON may hold spaces or tabs).
pub fn pack(id: u64, ts: u64, from: &str, cid: &str, body: &str) -> String {
    format!("{id} {ts} {} {} {from}{cid}{body}", from.len(), cid.len())
}

/// The inverse of [`pack`]; None when the text is not one.
pub fn unpack(text: &str) -> Option<StoredMessage> {
    let mut head = text.splitn(5, ' ');
    let id = head.next()?.parse().ok()?;
    let ts = head.next()?.parse().ok()?;
    let from_len: usize = head.next()?.parse().ok()?;
    let cid_len: usize = head.next()?.parse().ok()?;
    let rest = head.next()?;
    let from = rest.get(..from_len)?;
    let cid = rest.get(from_len..from_len + cid_len)?;
    let body = rest.get(from_len + cid_len..)?;
    Some(StoredMessage {
        id,
        from: from.into(),
        cid: cid.into(),
        ts,
        body: body.into(),
    })
}

/// A `delivered` for the sender's other nodes: `d <id> <from bytes> <to bytes> <from><to><cid>`.
fn pack_delivered(r: &Report) -> String {
    format!(
        "d {} {} {} {}{}{}",
        r.id,
        r.from.len(),
        r.to.len(),
        r.from,
        r.to,
        r.cid
    )
}

/// What another node published on this node's channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// `m <stream id> <user bytes> <user><packed message>`: appended to `user`'s inbox.
    Entry {
        user: CompactString,
        seq: InboxSeq,
        msg: StoredMessage,
    },
    /// A device acked a message `from` sent (see `pack_delivered`).
    Delivered {
        id: u64,
        from: CompactString,
        to: CompactString,
        cid: Box<str>,
    },
    /// `r <offset> <room bytes> <room><packed message>`: a room message.
    Room {
        room: CompactString,
        offset: u64,
        msg: StoredMessage,
    },
    /// `j <shard> <conn> <serial> <last> <recovered 0|1> <room bytes> <room>` then per
    /// replayed message `<offset> <packed bytes> <packed>`: the answer to a room join.
    Joined {
        ask: RoomJoinAsk,
        last: u64,
        recovered: bool,
        replay: Vec<(u64, StoredMessage)>,
    },
}

impl Push {
    /// The user whose home shard takes this push.
    pub fn user(&self) -> &str {
        match self {
            Push::Entry { user, .. } => user,
            Push::Delivered { from, .. } => from,
            Push::Room { room, .. } => room,
            Push::Joined { ask, .. } => &ask.room,
        }
    }

    /// The answer for the user's home shard among `shards`.
    pub fn into_reply(self, shards: usize) -> StoreReply {
        match self {
            Push::Entry { user, seq, msg } => StoreReply::Pushed { user, seq, msg },
            Push::Delivered { id, from, to, cid } => {
                let home = crate::mesh::home_shard(&from, shards);
                StoreReply::RemoteReport(Box::new(Report {
                    id,
                    from,
                    to,
                    cid,
                    reply: ReplyTo::all_devices(home),
                    outcome: Outcome::Delivered,
                    received: Instant::now(),
                }))
            }
            Push::Room { room, offset, msg } => StoreReply::RoomMessage { room, offset, msg },
            Push::Joined {
                ask,
                last,
                recovered,
                replay,
            } => StoreReply::RoomJoinAnswer {
                ask: Box::new(ask),
                last,
                recovered,
                replay,
            },
        }
    }
}

/// `<n> <rest>` -> (n, rest).
fn number_then(text: &str) -> Option<(u64, &str)> {
    let (n, rest) = text.split_once(' ')?;
    Some((n.parse().ok()?, rest))
}

/// `<len> <text of len bytes><rest>` -> (text, rest).
fn sized(text: &str) -> Option<(&str, &str)> {
    let (len, rest) = number_then(text)?;
    let len = usize::try_from(len).ok()?;
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// Parse a push; None for anything else (logged by the caller, never trusted).
pub fn parse_push(text: &str) -> Option<Push> {
    let (kind, rest) = text.split_once(' ')?;
    match kind {
        "m" => {
            let (xid, rest) = rest.split_once(' ')?;
            let (len, rest) = rest.split_once(' ')?;
            let len: usize = len.parse().ok()?;
            let user = rest.get(..len)?;
            Some(Push::Entry {
                user: user.into(),
                seq: stream_id_to_seq(xid)?,
                msg: unpack(rest.get(len..)?)?,
            })
        }
        "d" => {
            let mut head = rest.splitn(4, ' ');
            let id = head.next()?.parse().ok()?;
            let from_len: usize = head.next()?.parse().ok()?;
            let to_len: usize = head.next()?.parse().ok()?;
            let tail = head.next()?;
            Some(Push::Delivered {
                id,
                from: tail.get(..from_len)?.into(),
                to: tail.get(from_len..from_len + to_len)?.into(),
                cid: tail.get(from_len + to_len..)?.into(),
            })
        }
        "r" => {
            let (offset, rest) = number_then(rest)?;
            let (room, packed) = sized(rest)?;
            Some(Push::Room {
                room: room.into(),
                offset,
                msg: unpack(packed)?,
            })
        }
        "j" => {
            let (shard, rest) = number_then(rest)?;
            let (conn, rest) = number_then(rest)?;
            let (serial, rest) = number_then(rest)?;
            let (last, rest) = number_then(rest)?;
            let (recovered, rest) = number_then(rest)?;
            let (room, mut rest) = sized(rest)?;
            let mut replay = Vec::new();
            while !rest.is_empty() {
                let (offset, tail) = number_then(rest)?;
                let (packed, tail) = sized(tail)?;
                replay.push((offset, unpack(packed)?));
                rest = tail;
            }
            Some(Push::Joined {
                ask: RoomJoinAsk {
                    room: room.into(),
                    since: None,
                    shard: usize::try_from(shard).ok()?,
                    conn: usize::try_from(conn).ok()?,
                    serial: u32::try_from(serial).ok()?,
                },
                last,
                recovered: recovered == 1,
                replay,
            })
        }
        _ => None,
    }
}

/// This node run's name: `node_id` and the process start in ms (decided once per process).
pub fn node_run_id(node_id: &str) -> String {
    static STARTED_MS: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let ms = STARTED_MS.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    });
    format!("{node_id}.{ms}")
}

/// One `XRANGE` entry: `[id, ["m", packed]]`.
fn parse_entry(entry: Value) -> Result<(InboxSeq, StoredMessage), String> {
    let mut parts = array(entry)?.into_iter();
    let id_value = parts.next().ok_or("entry: no id")?;
    let xid = text_ref(&id_value).ok_or("entry: no id")?;
    let seq = stream_id_to_seq(xid).ok_or_else(|| format!("bad stream id {xid}"))?;
    let fields = array(parts.next().ok_or("entry: no fields")?)?;
    let packed = fields.get(1).and_then(text_ref).ok_or("entry: no value")?;
    let msg = unpack(packed).ok_or_else(|| format!("entry {xid} is not a ringgate message"))?;
    Ok((seq, msg))
}

fn array(v: Value) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Null => Ok(Vec::new()),
        other => Err(format!("expected an array, got {other:?}")),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => std::str::from_utf8(b).ok().map(str::to_owned),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Like [`text`], borrowed (the replay path reads every entry through it).
fn text_ref(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Bytes(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

fn integer(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// Bits of an [`InboxSeq`] that hold the stream id's sequence part.
const SEQ_BITS: u32 = 20;

/// `ms-n` -> one increasing u64 (`ms << 20 | n`). Redis assigns `n` per millisecond per
/// stream; a million entries to one user's stream within one millisecond is not a case.
pub fn stream_id_to_seq(id: &str) -> Option<InboxSeq> {
    let (ms, n) = id.split_once('-')?;
    let (ms, n) = (ms.parse::<u64>().ok()?, n.parse::<u64>().ok()?);
    (n < (1 << SEQ_BITS) && ms < (1 << (64 - SEQ_BITS))).then_some((ms << SEQ_BITS) | n)
}

/// The inverse of [`stream_id_to_seq`].
pub fn seq_to_stream_id(seq: InboxSeq) -> String {
    format!("{}-{}", seq >> SEQ_BITS, seq & ((1 << SEQ_BITS) - 1))
}

/// Milliseconds since the Unix epoch at which Redis appended the entry `seq`.
pub fn seq_time_ms(seq: InboxSeq) -> u64 {
    seq >> SEQ_BITS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::message::ReplyTo;

    fn msg(to: &str) -> Box<Message> {
        Box::new(Message {
            id: 7,
            from: "alice".into(),
            to: to.into(),
            cid: "\"c1\"".into(),
            ts: 1,
            body: "{\"x\":1}".into(),
            reply: ReplyTo::all_devices(0),
            received: Instant::now(),
        })
    }

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    #[test]
    fn stream_ids_map_to_increasing_seqs_and_back() {
        let a = stream_id_to_seq("1700000000000-0").unwrap();
        let b = stream_id_to_seq("1700000000000-1").unwrap();
        let c = stream_id_to_seq("1700000000001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(seq_to_stream_id(b), "1700000000000-1");
        assert_eq!(seq_time_ms(c), 1_700_000_000_001);
        assert_eq!(stream_id_to_seq("12"), None);
        assert_eq!(stream_id_to_seq("1-1048576"), None, "n beyond 20 bits");
        assert_eq!(stream_id_to_seq("x-1"), None);
    }

    fn settings() -> RedisSettings {
        RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            pool_size: 1,
            timeout: Duration::from_millis(10),
            key_prefix: "p:".into(),
            max_messages: 5,
            max_age_ms: 1000,
            node: "n1.5".into(),
            lease_ms: 900,
            room_history_max: 3,
            room_history_age_ms: 4000,
        }
    }

    fn delivered(from: &str, to: &str) -> Box<Report> {
        Box::new(Report {
            id: 7,
            from: from.into(),
            to: to.into(),
            cid: "\"c 1\"".into(),
            reply: ReplyTo::all_devices(0),
            outcome: Outcome::Delivered,
            received: Instant::now(),
        })
    }

    #[test]
    fn batch_keys_and_args_follow_the_operations_in_order() {
        let batch = vec![
            StoreOp::Append(msg("bob")),
            StoreOp::Remove {
                user: "bob".into(),
                seq: stream_id_to_seq("5-1").unwrap(),
                report: None,
            },
            StoreOp::Remove {
                user: "bob".into(),
                seq: stream_id_to_seq("5-2").unwrap(),
                report: Some(delivered("alice", "bob")),
            },
            StoreOp::Presence {
                users: vec!["x".into(), "y".into()],
                ask: 3,
            },
            StoreOp::Probe,
        ];
        let call = BatchCall::build(&settings(), &batch);
        assert_eq!(
            call.keys,
            [
                "p:in:bob",
                "p:dd:alice",
                "p:dd:alice:old",
                "p:loc:bob",
                "p:in:bob",
                "p:in:bob",
                "p:loc:alice",
                "p:loc:x",
                "p:loc:y"
            ]
        );
        assert_eq!(
            &call.args[..8],
            ["1000", "5", "86400000", "10000", "n1.5", "p:", "3", "4000"]
        );
        assert_eq!(
            &call.args[8..],
            [
                "A",
                "7",
                "\"c1\"",
                "7 1 5 4 alice\"c1\"{\"x\":1}",
                "bob",
                "R",
                "5-1",
                "D",
                "5-2",
                "d 7 5 3 alicebob\"c 1\"",
                "Q",
                "2",
                "P"
            ]
        );
    }

    #[test]
    fn pushes_from_other_nodes_parse_exactly_or_not_at_all() {
        // An entry, as the script publishes it: stream id, user length, user, packed message.
        let text = format!(
            "m 9-2 5 b b c{}",
            pack(7, 1, "al ce", "\"c\"", "{\"k\":\" \"}")
        );
        let Some(Push::Entry { user, seq, msg }) = parse_push(&text) else {
            panic!("an entry push parses");
        };
        assert_eq!(user, "b b c");
        assert_eq!(seq, stream_id_to_seq("9-2").unwrap());
        assert_eq!(
            (msg.id, &*msg.from, &*msg.body),
            (7, "al ce", "{\"k\":\" \"}")
        );
        // A delivered report round-trips through pack_delivered.
        let r = delivered("al ice", "b");
        let Some(Push::Delivered { id, from, to, cid }) = parse_push(&pack_delivered(&r)) else {
            panic!("a delivered push parses");
        };
        assert_eq!((id, &*from, &*to, &*cid), (7, "al ice", "b", "\"c 1\""));
        // Its reply goes to every device of the sender on the sender's home shard.
        let StoreReply::RemoteReport(report) =
            parse_push(&pack_delivered(&r)).unwrap().into_reply(4)
        else {
            panic!("a delivered push is a report");
        };
        assert_eq!(
            report.reply,
            ReplyTo::all_devices(crate::mesh::home_shard("al ice", 4))
        );
        for bad in [
            "",
            "m",
            "m 9-2 99 bob",
            "x 1 2",
            "d 1 9 9 ab",
            "m bad 1 b7 1 0 0 ",
        ] {
            assert_eq!(parse_push(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn script_answers_pair_with_their_operations() {
        let batch = vec![
            StoreOp::Append(msg("bob")),
            StoreOp::Append(msg("bob")),
            StoreOp::Append(msg("bob")),
            StoreOp::Remove {
                user: "bob".into(),
                seq: 1,
                report: None,
            },
            StoreOp::Probe,
        ];
        let value = Value::Array(vec![
            Value::Array(vec![
                s("ok"),
                s("9-2"),
                Value::Integer(3),
                Value::Integer(2),
            ]),
            Value::Array(vec![s("dup"), s("42")]),
            Value::Array(vec![s("full"), Value::Integer(0), Value::Integer(5)]),
            Value::Integer(1),
            Value::Integer(1),
        ]);
        let answers = parse_batch(value, &batch).unwrap();
        assert_eq!(
            answers[0],
            Answer::Appended(Ok(Appended::Stored {
                seq: stream_id_to_seq("9-2").unwrap(),
                expired: 3,
                pushed: 2
            }))
        );
        assert_eq!(
            answers[1],
            Answer::Appended(Ok(Appended::Duplicate { id: 42 }))
        );
        assert!(matches!(
            answers[2],
            Answer::Appended(Err(StoreError::Full { count: 5, .. }))
        ));
        assert_eq!(answers[3], Answer::Removed(true));
        assert_eq!(answers[4], Answer::Done);
    }

    #[test]
    fn loads_split_the_batch_into_ordered_segments() {
        let load = |user: &str| StoreOp::Load {
            user: user.into(),
            token: 1,
            limit: 10,
        };
        let remove = || StoreOp::Remove {
            user: "bob".into(),
            seq: 1,
            report: None,
        };
        let batch = vec![
            StoreOp::Append(msg("bob")),
            remove(),
            load("bob"),
            load("carol"),
            StoreOp::Append(msg("carol")),
            StoreOp::Lease,
            StoreOp::Leave { user: "bob".into() },
            StoreOp::Probe,
        ];
        assert_eq!(
            plan(&batch),
            [
                Segment::Script(0..2),
                Segment::Native(2),
                Segment::Native(3),
                Segment::Script(4..5),
                Segment::Native(5),
                Segment::Native(6),
                Segment::Script(7..8)
            ]
        );
        assert_eq!(plan(&[load("a")]), [Segment::Native(0)]);
        assert_eq!(plan(&[remove(), remove()]), [Segment::Script(0..2)]);
        assert!(plan(&[]).is_empty());
    }

    #[test]
    fn a_load_reads_trimmed_count_and_entries() {
        let entry = Value::Array(vec![
            s("9-2"),
            Value::Array(vec![s("m"), s("7 1 5 4 alice\"c1\"{}")]),
        ]);
        let Answer::Loaded(Loaded { entries, expired }) =
            parse_load(Ok(Value::Integer(2)), Ok(Value::Array(vec![entry]))).unwrap()
        else {
            panic!("a load answers Loaded");
        };
        assert_eq!(expired, 2);
        assert_eq!(entries[0].0, stream_id_to_seq("9-2").unwrap());
        assert_eq!(entries[0].1.from, "alice");
        assert_eq!(&*entries[0].1.body, "{}");
        // An empty stream reads as no entries; an error or a foreign entry fails the load.
        assert!(matches!(
            parse_load(Ok(Value::Integer(0)), Ok(Value::Null)),
            Ok(Answer::Loaded(Loaded { ref entries, .. })) if entries.is_empty()
        ));
        assert!(parse_load(Err("boom".into()), Ok(Value::Null)).is_err());
        let foreign = Value::Array(vec![Value::Array(vec![
            s("9-3"),
            Value::Array(vec![s("m"), s("not packed")]),
        ])]);
        assert!(parse_load(Ok(Value::Integer(0)), Ok(foreign)).is_err());
    }

    #[test]
    fn packed_messages_round_trip_whatever_they_hold() {
        let m = StoredMessage {
            id: u64::MAX,
            from: "a b\tc".into(),
            cid: "\"x y\"".into(),
            ts: 17,
            body: "{ \"t\" :\t[1, 2] }".into(),
        };
        let packed = |m: &StoredMessage| pack(m.id, m.ts, &m.from, &m.cid, &m.body);
        assert_eq!(unpack(&packed(&m)), Some(m.clone()));
        let empty_body = StoredMessage {
            body: "".into(),
            ..m
        };
        assert_eq!(unpack(&packed(&empty_body)), Some(empty_body));
        assert_eq!(unpack("1 2 99 1 ab"), None, "lengths past the end");
        assert_eq!(unpack("x 2 1 1 ab"), None);
        assert_eq!(unpack(""), None);
    }

    #[test]
    fn a_malformed_answer_fails_the_whole_batch() {
        let batch = vec![StoreOp::Append(msg("bob"))];
        assert!(parse_batch(Value::Integer(1), &batch).is_err());
        assert!(parse_batch(Value::Array(vec![]), &batch).is_err());
        let weird = Value::Array(vec![Value::Array(vec![s("what")])]);
        assert!(parse_batch(weird, &batch).is_err());
    }

    #[test]
    fn cluster_urls_are_refused_with_the_reason() {
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
        let err = check_url("redis-cluster://127.0.0.1:7000").unwrap_err();
        assert!(err.contains("Cluster"), "{err}");
        assert!(check_url("not a url").is_err());
    }
}
