//! One shard = one core: owns its connections (a `slab`), all their deadlines (one timing
//! wheel), its scratch read buffer, its metrics and its clock. Nothing here is shared with
//! other shards; other threads only read the metrics and set the shutdown flag.
//!
//! The glommio glue is in [`io`]: one accept task, one small task per socket that calls
//! [`Shard::poll_conn`], and one tick task that calls [`Shard::on_tick`].

/// The connection context of a shard, borrowing only the fields it needs (a method would borrow
/// the whole shard and block `&mut self.conns` next to it).
macro_rules! shard_ctx {
    ($shard:expr) => {
        make_ctx(
            &$shard.shared,
            &$shard.metrics,
            &$shard.events,
            $shard.drain_started.is_some(),
            $shard.id,
        )
    };
}

pub mod deliver;
pub mod durable;
pub mod io;
pub mod mirror;
pub mod msg;
pub mod park;
pub mod presence;
pub mod rooms;
pub mod uring;
pub mod users;

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_lite::{AsyncRead, AsyncWrite};
use slab::Slab;

use crate::auth::Authenticator;
use crate::clock::Clock;
use crate::config::Config;
use crate::conn::{AppEvent, Connection, Ctx, OutBuf, Phase};
use crate::delivery::reader::{Reader, Write};
use crate::hash::{FastMap, FastSet};
use crate::limit::ip::{IpKey, IpLimits};
use crate::limit::UserBuckets;
use crate::mesh;
use crate::metrics::ShardMetrics;
use crate::wheel::{TimerKey, TimingWheel};
use crate::ws::upgrade::Refusal;
use msg::{ShardMesh, ShardMsg};
use park::{ParkSet, RawSocket};
use std::cell::RefCell;
use users::Users;

/// Shard-wide read buffer: every socket reads into it, so idle sockets own no read buffer.
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// How often a shard sweeps its inboxes for entries past `inbox_max_age_ms`.
const INBOX_SWEEP_MS: u64 = 1_000;
/// A tick this late after the previous one counts as a stall (`ringgate_shard_stalls_total`).
pub const STALL_MS: u64 = 1_000;
/// The tick period of a shard with nothing pending (see `Shard::next_tick_ms`): a 10 ms tick
/// on 2 idle shards cost 2.9% of a core; one a second costs too little to measure (README,
/// "Idle cost"). At most the inbox sweep's period, so sweeps keep their pace.
pub const IDLE_TICK_MS: u64 = INBOX_SWEEP_MS;
/// Capacity of the lent output buffer; a larger one (after a burst) is freed, not kept.
const SPARE_OUT_BYTES: usize = 16 * 1024;
/// Reads served per socket per poll before yielding to other sockets (fairness).
const READS_PER_POLL: usize = 16;
/// Sockets accepted but not upgraded, per shard, beyond which new sockets are closed at once
/// (bounds the memory and descriptors a slowloris flood can hold).
pub const MAX_PENDING_HANDSHAKES: u64 = 16_384;

/// State every shard shares with the process: read-mostly, never on the per-message path.
pub struct Shared {
    pub cfg: Config,
    pub auth: Authenticator,
    /// Host-wide open WebSocket connections (changed at upgrade and close only).
    pub host_open: AtomicUsize,
    /// Set by the signal handler; each shard notices on its next tick.
    pub draining: AtomicBool,
    /// Per source address limits (the kernel spreads an address over every shard).
    pub ips: IpLimits,
    /// The public listener's certificate (`tls_cert`), replaced on SIGHUP.
    pub tls: Option<crate::tls::Tls>,
}

impl Shared {
    /// HS256 (or dev mode) only: for tests; `server` builds it [`Shared::with_auth`].
    pub fn new(cfg: Config) -> Arc<Self> {
        let auth = Authenticator::new(cfg.jwt_secret.as_deref())
            .with_claims(cfg.jwt_audience.as_deref(), cfg.jwt_issuer.as_deref());
        Self::with(cfg, auth, None)
    }

    /// As `new`, with the authenticator (JWKS) and TLS (`wss://`) the caller set up and
    /// reported errors of.
    pub fn with(cfg: Config, auth: Authenticator, tls: Option<crate::tls::Tls>) -> Arc<Self> {
        Arc::new(Shared {
            ips: cfg.ip_limits(),
            cfg,
            auth,
            host_open: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            tls,
        })
    }
}

/// What the wheel stores per connection: the slab index and the connection's serial, so an
/// entry for a connection that has gone (and whose slot was reused) is ignored.
#[derive(Clone, Copy, Debug)]
struct ConnRef {
    index: u32,
    serial: u32,
}

struct Entry {
    conn: Connection,
    serial: u32,
    timer: Option<TimerKey>,
    /// The socket while parked (see `park`): owned here, no glommio task exists.
    parked: Option<OwnedFd>,
    /// The recipient's side of direct delivery on this connection (window, inbox cursor,
    /// `synced`): 16 bytes inline, boxed state only while `msg` frames are in flight.
    reader: Reader,
}

impl Entry {
    fn token(&self, index: usize) -> u64 {
        ((self.serial as u64) << 32) | index as u64
    }
}

pub struct Shard {
    pub id: usize,
    shared: Arc<Shared>,
    metrics: Arc<ShardMetrics>,
    clock: Box<dyn Clock>,
    conns: Slab<Entry>,
    wheel: TimingWheel<ConnRef>,
    scratch: Box<[u8]>,
    /// An empty output buffer lent to the socket being polled and taken back once flushed,
    /// so the per-message path does not allocate and idle sockets keep no write buffer.
    spare_out: OutBuf,
    /// What a connection's `Reader` returned, performed and emptied at once: one buffer the
    /// shard reuses, so a delivered message allocates no list of its own.
    reader_writes: Vec<Write>,
    /// A frame being written (an answer, a reader's `msg`), reused: no allocation per frame.
    frame: Vec<u8>,
    fired: Vec<(TimerKey, ConnRef)>,
    next_serial: u64,
    /// When this shard began draining (ms), once it has.
    drain_started: Option<u64>,
    /// The connections whose poll is in progress, innermost last: serving one connection can
    /// serve a parked one inline (see `kick`), which can produce output for the first.
    polling: Vec<usize>,
    /// Requests connections made while handling input (sends, acks), served right after.
    events: RefCell<Vec<AppEvent>>,
    /// The mirror of the offline inboxes of the users online here, and the rules that keep it
    /// in the store's order (see `mirror`).
    mirror: mirror::InboxMirror,
    /// The store link (embedded or Redis) and what the shard keeps about it (see `durable`).
    store: durable::StoreClient,
    /// The offline push worker's link (None: no `push_webhook_url`).
    push: Option<crate::push::PushLink>,
    /// The sender's side of direct delivery: dedup windows of the senders whose home is this
    /// shard, connections waiting for the answer to a cid they resent.
    senders: crate::delivery::senders::Senders,
    msg_ids: crate::delivery::ids::MessageIds,
    /// Read receipts of the users whose home is this shard (what they were sent, told).
    receipts: crate::delivery::receipts::ReadReceipts,
    reads_waiting: crate::delivery::receipts::ReadsWaiting,
    /// Presence and presence watch: questions out, watchers here, watched users homed here.
    presence: presence::PresenceMachine,
    last_expire_ms: u64,
    /// `POST /api/send` requests waiting for their message to be safe, by cid.
    api_waiters: std::collections::HashMap<Box<str>, tokio::sync::oneshot::Sender<msg::ApiOutcome>>,
    /// Answers (reports, presence) another shard's full channel refused: retried on every
    /// tick, never dropped.
    unsent: Vec<(usize, ShardMsg)>,
    /// Rooms whose home is this shard (the home side of rooms).
    rooms_home: rooms::RoomHomes,
    /// This shard's connections in each room (the member side of rooms).
    room_members: rooms::RoomMembers,
    /// Where idle connections wait (None when `park_idle_ms = 0`).
    park: Option<ParkSet>,
    /// TLS sessions of this shard's connections, by slab index (`wss://` only; beside the
    /// slab so that plain connections pay nothing for them).
    tls_sessions: std::collections::HashMap<usize, Box<rustls::ServerConnection>>,
    ready_tokens: Vec<u64>,
    /// Parked sockets that became busy: the glue hands each to a new socket task.
    unparked: Vec<(usize, OwnedFd)>,
    /// With the io_uring driver (no socket tasks, no wakers): connections a timer or another
    /// connection gave output or work, for the driver to poll (None with glommio's tasks).
    kicked: Option<Vec<usize>>,
    /// The glommio driver's running socket tasks' wakers, by slab index, to write what a timer
    /// produced (a parked connection has none), and the connections the tick found idle, whose
    /// task parks them on its next poll. Beside the slab, not in each slot: the uring driver
    /// has no tasks, and a slot's bytes are what every idle connection pays (shard/tests.rs).
    task_wakers: FastMap<usize, Waker>,
    park_requests: FastSet<usize>,
    /// Users whose home is this shard, with their connections here.
    users: Users,
    /// `send`/`publish` buckets of those users (only of the ones that sent lately).
    send_buckets: UserBuckets,
    /// This shard's end of the mesh (None in tests that build a lone shard).
    mesh: Option<ShardMesh>,
    /// Connections parked or closed since memory was last given back (see `alloc`).
    released_since_collect: u64,
    last_collect_ms: u64,
    /// When the last tick ran (ms), to see the loop held up (`stalls`).
    last_tick_ms: Option<u64>,
    /// How long past a tick period the run loop chose to sleep before this tick (an idle
    /// shard's long sleep): not a stall (`note_tick_gap`).
    planned_extra_ms: u64,
}

/// What the socket task should do after a poll.
pub enum ConnPoll {
    /// Wait. `read_blocked`: the last read would block (a wake-up is registered for input).
    /// `write_blocked`: output is left that the socket would not take.
    Pending {
        read_blocked: bool,
        write_blocked: bool,
    },
    /// Drop the socket: the connection is finished or the peer went away.
    Close,
    /// The connection belongs on its user's home shard `to`: hand the socket over.
    Handoff { to: usize },
}

impl Shard {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        metrics: Arc<ShardMetrics>,
        clock: Box<dyn Clock>,
    ) -> Self {
        let start_tick = clock.now_ms() / shared.cfg.tick_ms;
        let presence = presence::PresenceMachine::new(presence::PresenceConfig {
            shard: id,
            shards: 1,
            grace_ms: shared.cfg.presence_grace_ms,
            recheck_every_ms: shared.cfg.node_lease_ms / 4,
            nodes_share_directory: false,
        });
        // The per-connection tables are reserved for the shard's share of `max_connections`:
        // address space only, touched as connections come. A table that grows by doubling
        // instead moves to a block the allocator hands back dirty from earlier frees, and the
        // block it leaves stays resident: ~65 B more per idle connection at 19,000 on one shard
        // (docs/performance.md, "Tables that never move"). No more than the process may open
        // sockets: a `max_connections` meant as "no limit" reserves no more than can be used.
        let reserve = shared
            .cfg
            .connections_per_shard()
            .min(open_files_limit())
            .min(MAX_RESERVED_CONNECTIONS);
        let wheel = TimingWheel::with_capacity(shared.cfg.wheel_slots, start_tick, reserve);
        let limits = crate::store::InboxLimits {
            max_messages: shared.cfg.inbox_max_messages,
            max_age_ms: shared.cfg.inbox_max_age_ms,
        };
        let history = crate::delivery::room::HistoryLimits {
            max: shared.cfg.room_history_max,
            max_age_ms: shared.cfg.room_history_age_ms,
        };
        let mut rooms_home = rooms::RoomHomes::new(history, metrics.clone());
        rooms_home.started_at(clock.wall_ms() * 1000);
        let room_members = rooms::RoomMembers::new(
            id,
            shared.cfg.max_outbound,
            shared.cfg.slow_close_ms,
            metrics.clone(),
        );
        let mut mirror = mirror::InboxMirror::new(
            mirror::MirrorConfig {
                window: shared.cfg.window as usize,
                load_limit: shared.cfg.inbox_max_messages,
                shared: false,
                push: false,
            },
            crate::store::MemoryInbox::new(limits),
            metrics.clone(),
        );
        mirror.reserve_users(reserve);
        let senders = crate::delivery::senders::Senders::new(metrics.clone());
        Shard {
            id,
            shared,
            metrics,
            clock,
            conns: Slab::with_capacity(reserve),
            wheel,
            scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
            spare_out: OutBuf::with_capacity(SPARE_OUT_BYTES),
            reader_writes: Vec::new(),
            frame: Vec::with_capacity(256),
            fired: Vec::new(),
            next_serial: 0,
            drain_started: None,
            polling: Vec::new(),
            events: RefCell::new(Vec::new()),
            mirror,
            store: durable::StoreClient::new(Box::new(crate::store::embedded::InProcess::new(
                limits,
            ))),
            push: None,
            senders,
            msg_ids: crate::delivery::ids::MessageIds::for_shard(id),
            receipts: Default::default(),
            reads_waiting: Default::default(),
            presence,
            last_expire_ms: 0,
            api_waiters: Default::default(),
            unsent: Vec::new(),
            rooms_home,
            room_members,
            park: None,
            tls_sessions: Default::default(),
            ready_tokens: Vec::new(),
            unparked: Vec::new(),
            kicked: None,
            task_wakers: FastMap::default(),
            park_requests: FastSet::default(),
            users: Users::default(),
            send_buckets: UserBuckets::default(),
            mesh: None,
            released_since_collect: 0,
            last_collect_ms: 0,
            last_tick_ms: None,
            planned_extra_ms: 0,
        }
    }

    pub fn enable_mesh(&mut self, mesh: ShardMesh) {
        self.rooms_home
            .configure(mesh.shards(), self.store_shared());
        self.room_members.configure(mesh.shards());
        self.presence.set_shards(mesh.shards());
        self.mesh = Some(mesh);
    }

    /// The io_uring driver serves the sockets: kicked connections are listed for it to poll
    /// (`take_kicked`), there being no socket task to wake.
    pub fn enable_kick_list(&mut self) {
        self.kicked = Some(Vec::new());
    }

    /// Sockets went quiet after a burst (accepts, handshakes) with the io_uring driver, which
    /// has no park wave to count: let the next tick give freed memory back (see `alloc`).
    pub fn note_quiet_after_burst(&mut self) {
        self.released_since_collect += 1;
    }

    /// Connections were kicked since `take_kicked` was last called.
    pub fn has_kicked(&self) -> bool {
        self.kicked.as_ref().is_some_and(|k| !k.is_empty())
    }

    /// The connections kicked since the last call (with the io_uring driver).
    pub fn take_kicked(&mut self) -> Vec<usize> {
        self.kicked.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The io_uring driver's receive buffers ran out for one socket (counted per shard).
    pub fn count_recv_buffers_exhausted(&self) {
        self.metrics.recv_buffers_exhausted.inc();
    }

    /// Let idle connections park in `set` (the glue reads the doorbell).
    pub fn enable_parking(&mut self, set: ParkSet) {
        self.park = Some(set);
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// A turn of the glue begins: the clock is read afresh (see [`crate::clock::TurnClock`]).
    pub fn new_turn(&self) {
        self.clock.new_turn()
    }

    pub fn cfg(&self) -> &Config {
        &self.shared.cfg
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn draining(&self) -> bool {
        self.drain_started.is_some()
    }

    /// Take a connection's slab slot, and what lives beside it under its index.
    fn remove_slot(&mut self, index: usize) -> Entry {
        self.task_wakers.remove(&index);
        self.park_requests.remove(&index);
        self.conns.remove(index)
    }

    /// Give `conn` this shard's next serial and a slab slot.
    fn insert_conn(&mut self, conn: Connection) -> usize {
        self.next_serial += 1;
        let serial = self.next_serial;
        self.conns.insert(Entry {
            conn,
            serial: serial as u32,
            timer: None,
            parked: None,
            reader: Reader::default(),
        })
    }

    /// Some limit applies per source address (else accept need not look the address up).
    pub fn limits_addresses(&self) -> bool {
        let cfg = &self.shared.cfg;
        cfg.ip_connect_rate > 0 || cfg.ip_max_open > 0
    }

    /// A socket from `ip` (0 = not known) was accepted: returns its slab index, or None to
    /// close it at once.
    pub fn admit(&mut self, ip: IpKey) -> Option<usize> {
        if self.metrics.handshakes_pending.get() >= MAX_PENDING_HANDSHAKES {
            self.metrics.refused[Refusal::Overloaded.index()].inc();
            return None;
        }
        let now = self.clock.now_ms();
        let told = self.shared.ips.on_connect(ip, now);
        self.metrics.ip_entries_forgotten.add(told.forgotten as u64);
        let mut conn = Connection::new(now);
        conn.set_source(ip, told.refused_for_ms.is_some());
        let index = self.insert_conn(conn);
        self.metrics.handshakes_pending.inc();
        self.sync_timer(index);
        Some(index)
    }

    /// Drive one socket: read what is there, let the connection react, serve what it asked
    /// of the shard, write what it says.
    pub fn poll_conn<S>(&mut self, index: usize, stream: &mut S, cx: &mut Context<'_>) -> ConnPoll
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Serving one connection can produce output for others (and kick them); the one being
        // polled writes its own output below and must not be re-entered.
        self.polling.push(index);
        let session = match self.tls_sessions.is_empty() {
            true => None,
            false => self.tls_sessions.remove(&index),
        };
        let result = match session {
            None => self.poll_conn_once(index, stream, cx),
            Some(mut tls) => {
                let mut io = crate::tls::TlsIo {
                    io: stream,
                    tls: &mut tls,
                };
                let result = self.poll_conn_once(index, &mut io, cx);
                // Closed: the session goes with it; else it stays with the slot (a handoff
                // takes it from there).
                if !matches!(result, ConnPoll::Close) {
                    self.tls_sessions.insert(index, tls);
                }
                result
            }
        };
        self.polling.pop();
        // What closing asked of an embedded store (a leave, a spill).
        self.hear_store_now(self.clock.now_ms());
        result
    }

    /// A socket just accepted on a `wss://` listener gets its TLS session.
    pub fn start_tls(&mut self, index: usize) -> bool {
        let Some(tls) = &self.shared.tls else {
            return true;
        };
        match tls.session() {
            Ok(session) => {
                self.tls_sessions.insert(index, session);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a TLS session");
                self.remove(index);
                false
            }
        }
    }

    /// A parked socket is served with raw syscalls that would bypass its TLS session.
    fn may_park(&self, index: usize) -> bool {
        self.tls_sessions.is_empty() || !self.tls_sessions.contains_key(&index)
    }

    fn poll_conn_once<S>(&mut self, index: usize, stream: &mut S, cx: &mut Context<'_>) -> ConnPoll
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let now = self.clock.now_ms();
        let Some((mut peer_gone, read_armed)) = self.read_phase(index, stream, cx, now) else {
            return ConnPoll::Close;
        };
        if !peer_gone && self.conns[index].conn.awaiting_session() {
            let home = match &self.mesh {
                Some(m) => {
                    mesh::home_shard(self.conns[index].conn.user().unwrap_or(""), m.shards())
                }
                None => self.id,
            };
            if home != self.id {
                return ConnPoll::Handoff { to: home };
            }
            self.start_session(index, now);
        }
        self.serve_events(index, now);
        let Shard {
            metrics,
            conns,
            spare_out,
            shared,
            ..
        } = self;
        let conn = &mut conns[index].conn;
        while !peer_gone && !conn.out.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, &conn.out) {
                Poll::Ready(Ok(n)) => {
                    metrics.bytes_out.add(n as u64);
                    conn.out.consume(n);
                }
                Poll::Ready(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Poll::Ready(Err(_)) => peer_gone = true,
                Poll::Pending => break,
            }
        }
        // Bytes a layer under the connection still holds (TLS records the socket would not
        // take): they go out now or when the socket is writable (plain sockets hold none).
        let mut flush_pending = false;
        if !peer_gone {
            match Pin::new(&mut *stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => peer_gone = true,
                Poll::Pending => flush_pending = true,
            }
        }
        // Our close frame is out: shut the write side, so a peer that waits for the server to
        // close TCP first (RFC 6455 7.1.1) closes its side now, not at the linger deadline.
        if !peer_gone && !flush_pending && conn.wants_fin() {
            if let Poll::Ready(result) = Pin::new(&mut *stream).poll_close(cx) {
                if result.is_err() {
                    peer_gone = true;
                }
                conn.fin_sent();
            }
        }
        // The read loop stopped on the outbound cap, not on a Pending read, so nothing will
        // wake us for input: if the writes made room, come back and read.
        if !read_armed
            && !peer_gone
            && !matches!(conn.phase(), Phase::Done { .. })
            && conn.out.len() < shared.cfg.max_outbound
        {
            cx.waker().wake_by_ref();
        }
        if conn.out.is_empty() {
            let mut out = std::mem::take(&mut conn.out);
            if out.capacity() <= 4 * SPARE_OUT_BYTES && out.capacity() > spare_out.capacity() {
                out.clear();
                *spare_out = out;
            }
        }
        if peer_gone || (conn.finished() && !flush_pending) {
            self.remove(index);
            return ConnPoll::Close;
        }
        let write_blocked = !conn.out.is_empty() || flush_pending;
        self.sync_timer(index);
        ConnPoll::Pending {
            read_blocked: read_armed,
            write_blocked,
        }
    }

    /// Read while there is room to answer (outbound bytes bound what a client can make us
    /// buffer). Returns (peer gone, read would block), or None for an unknown slot.
    fn read_phase<S>(
        &mut self,
        index: usize,
        stream: &mut S,
        cx: &mut Context<'_>,
        now: u64,
    ) -> Option<(bool, bool)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Shard {
            shared,
            metrics,
            conns,
            scratch,
            spare_out,
            id,
            drain_started,
            events,
            ..
        } = self;
        let ctx = make_ctx(shared, metrics, events, drain_started.is_some(), *id);
        let conn = &mut conns.get_mut(index)?.conn;
        if conn.out.capacity() == 0 {
            conn.out = std::mem::take(spare_out);
        }
        let mut reads = 0;
        while !matches!(conn.phase(), Phase::Done { .. }) && conn.out.len() < ctx.cfg.max_outbound {
            match Pin::new(&mut *stream).poll_read(cx, scratch) {
                Poll::Ready(Ok(0)) => return Some((true, false)),
                Poll::Ready(Ok(n)) => {
                    metrics.bytes_in.add(n as u64);
                    conn.on_bytes(now, &mut scratch[..n], &ctx);
                    reads += 1;
                    if conn.awaiting_session() {
                        break; // its home shard decides what happens next
                    }
                    if reads == READS_PER_POLL {
                        cx.waker().wake_by_ref();
                        break;
                    }
                }
                Poll::Ready(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Poll::Ready(Err(_)) => return Some((true, false)),
                Poll::Pending => return Some((false, true)),
            }
        }
        Some((false, false))
    }

    /// Send the connection at `index` (upgraded, session not started) with `socket` (a
    /// duplicate of its fd) to its home shard. On success the slot is freed and the caller drops
    /// its stream; when the home shard's channel is full the connection stays here and is
    /// told to reconnect (1013), and false is returned.
    pub fn handoff(&mut self, index: usize, to: usize, socket: OwnedFd) -> bool {
        let now = self.clock.now_ms();
        let mesh = self.mesh.as_ref().expect("handoff needs the mesh");
        let entry = &mut self.conns[index];
        let conn = std::mem::replace(&mut entry.conn, Connection::new(now));
        // Counted out before it is sent: once sent, the new shard may count it in, welcome
        // the client and be asked for its metrics before this thread runs again (seen in
        // tests/affinity.rs on a loaded machine: a shard still counting a handed-off socket).
        self.metrics.connections_open.dec();
        let tls = match self.tls_sessions.is_empty() {
            true => None,
            false => self.tls_sessions.remove(&index),
        };
        match mesh.send(
            to,
            ShardMsg::Handoff {
                socket,
                conn: Box::new(conn),
                tls,
            },
        ) {
            Ok(()) => {
                // The connection moved: no `on_closed` here, its new shard owns the slot count.
                let entry = self.remove_slot(index);
                if let Some(key) = entry.timer {
                    self.wheel.cancel(key);
                }
                self.metrics.handoffs_out.inc();
                true
            }
            Err(returned) => {
                let ShardMsg::Handoff { conn, tls, .. } = returned else {
                    unreachable!("a refused send returns the message it was given");
                };
                if let Some(session) = tls {
                    self.tls_sessions.insert(index, session);
                }
                self.metrics.mesh_full.inc();
                self.metrics.connections_open.inc();
                let ctx = shard_ctx!(self);
                let entry = &mut self.conns[index];
                entry.conn = *conn;
                entry.conn.reject_session(now, &ctx);
                false
            }
        }
    }

    /// A connection handed over by another shard (this is its user's home): start its session.
    pub fn adopt(&mut self, conn: Connection) -> usize {
        let now = self.clock.now_ms();
        let index = self.insert_conn(conn);
        self.metrics.connections_open.inc();
        self.metrics.handoffs_in.inc();
        self.start_session(index, now);
        self.serve_events(index, now);
        if self.drain_started.is_some() {
            let ctx = make_ctx(&self.shared, &self.metrics, &self.events, true, self.id);
            self.conns[index].conn.on_shutdown(now, &ctx);
        }
        self.sync_timer(index);
        index
    }

    /// This shard's connections of `user` (with a session).
    pub(crate) fn devices_of(&self, user: &str) -> users::Devices {
        self.users.devices(user, |i| conn_user(&self.conns, i))
    }

    /// The connection at slab `index` is still the one with `serial` (slots are reused).
    fn is_live(&self, index: usize, serial: u32) -> bool {
        self.conns.get(index).is_some_and(|e| e.serial == serial)
    }

    /// A bounded batch of what other shards sent (the caller clears the bell first).
    pub fn take_mesh_batch(&mut self) -> Vec<ShardMsg> {
        let mut batch = Vec::new();
        if let Some(m) = &self.mesh {
            m.take_batch(&mut batch);
        }
        batch
    }

    /// One message from another shard. A handed-off connection is adopted and returned as
    /// (slab index, socket) for the glue to drive; everything else is served here.
    pub fn on_mesh_msg(&mut self, msg: ShardMsg, now: u64) -> Option<(usize, OwnedFd)> {
        match msg {
            ShardMsg::Handoff { socket, conn, tls } => {
                let index = self.adopt(*conn);
                if let Some(session) = tls {
                    self.tls_sessions.insert(index, session);
                }
                return Some((index, socket));
            }
            ShardMsg::Direct(direct) => match direct {
                msg::Direct::Deliver(m) => self.deliver(m, now, None),
                msg::Direct::Report(r) => self.on_report(*r),
                msg::Direct::Typing { from, to } => self.typing_here(&from, &to),
                msg::Direct::ApiSend {
                    to,
                    cid,
                    body,
                    msg_type,
                    reply,
                } => self.on_api_send(to, cid, body, msg_type, reply, now),
            },
            ShardMsg::Presence(presence) => self.on_presence_msg(presence, now),
            ShardMsg::Room(room_msg) => self.on_room_msg(room_msg, now),
        }
        self.hear_store_now(now);
        None
    }

    pub fn clear_mesh_bell(&self) {
        if let Some(m) = &self.mesh {
            m.clear_bell();
        }
    }

    /// Remember the socket task's waker (for timer output and park requests).
    pub fn set_waker(&mut self, index: usize, waker: &Waker) {
        if self.conns.contains(index)
            && !self
                .task_wakers
                .get(&index)
                .is_some_and(|w| w.will_wake(waker))
        {
            self.task_wakers.insert(index, waker.clone());
        }
    }

    /// Called by the socket task before polling: should it park instead?
    pub fn park_requested(&self, index: usize) -> bool {
        self.park_requests.contains(&index)
    }

    /// Park the connection whose task holds socket `fd`: on success the task ends (dropping
    /// its glommio stream) and a duplicate of the socket waits in the park set.
    pub fn park(&mut self, index: usize, fd: RawFd) -> bool {
        self.park_requests.remove(&index);
        let entry = &mut self.conns[index];
        // (A TLS connection is refused by `watch_parked`, the one way into the park set.)
        if !entry.conn.parkable(self.clock.now_ms(), 0) {
            return false;
        }
        self.watch_parked(index, fd)
    }

    /// A socket just accepted (`admit`): its handshake is served from the park set, and it
    /// stays there while it is quiet. Why: at scale a freshly accepted glommio socket was
    /// seen to miss its read wake-up (the request waiting unread until the 408; README,
    /// "A million connections"), and an idle connection ends up parked anyway. Serves the
    /// request at once when it is already there. False: keep the socket on glommio.
    pub fn park_accepted(&mut self, index: usize, fd: RawFd) -> bool {
        if !self.watch_parked(index, fd) {
            return false;
        }
        self.poll_parked(index);
        true
    }

    /// Put a duplicate of `fd` into the park set under the entry's token.
    fn watch_parked(&mut self, index: usize, fd: RawFd) -> bool {
        let Some(set) = &self.park else {
            return false;
        };
        if self.drain_started.is_some() || !self.may_park(index) {
            return false;
        }
        let Ok(copy) = park::dup(fd) else {
            return false; // out of descriptors: stay on glommio
        };
        let entry = &mut self.conns[index];
        if set
            .watch(copy.as_raw_fd(), entry.token(index), false)
            .is_err()
        {
            return false;
        }
        entry.parked = Some(copy);
        self.task_wakers.remove(&index);
        self.metrics.connections_parked.inc();
        self.metrics.parks.inc();
        self.released_since_collect += 1;
        true
    }

    /// Ask the poller to ring once a parked socket has input.
    pub fn arm_parking(&self) {
        if let Some(set) = &self.park {
            set.arm();
        }
    }

    /// The doorbell rang: serve parked sockets with input.
    pub fn on_parked_ready(&mut self) {
        let Some(set) = self.park.as_mut() else {
            return;
        };
        let mut tokens = std::mem::take(&mut self.ready_tokens);
        set.take_ready(&mut tokens);
        for token in tokens.drain(..) {
            let (index, serial) = ((token & 0xffff_ffff) as usize, (token >> 32) as u32);
            if self
                .conns
                .get(index)
                .is_some_and(|e| e.serial == serial && e.parked.is_some())
            {
                self.poll_parked(index);
            }
        }
        self.ready_tokens = tokens;
    }

    /// Serve a parked socket inline with non-blocking syscalls. It stays parked if it only
    /// exchanged a little (a heartbeat) after a long silence; otherwise it goes back to glommio.
    fn poll_parked(&mut self, index: usize) {
        let now = self.clock.now_ms();
        let park_idle = self.shared.cfg.park_idle_ms;
        let entry = &self.conns[index];
        let fd = entry.parked.as_ref().expect("parked").as_raw_fd();
        // Quiet = no input for park_idle_ms before this event (output from a timer, such as a
        // heartbeat ping, does not count).
        let was_quiet = now >= entry.conn.last_rx_ms() + park_idle;
        // A handshake (born parked) stays parked after it while quiet, like an idle socket.
        let was_handshaking = entry.conn.phase() == Phase::Handshaking;
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let quiet_io = match self.poll_conn(index, &mut RawSocket(fd), &mut cx) {
            ConnPoll::Close => {
                self.metrics.connections_parked.dec();
                return;
            }
            // Reading stops at the end of a handshake (the session starts) before the socket
            // would block: what may follow raises the re-armed epoll entry at once.
            ConnPoll::Pending {
                read_blocked,
                write_blocked,
            } => (read_blocked || was_handshaking) && !write_blocked,
            // The user's home is another shard: its socket task hands the socket over.
            ConnPoll::Handoff { .. } => false,
        };
        let entry = &mut self.conns[index];
        let stay = quiet_io
            && (was_quiet || was_handshaking)
            && self.drain_started.is_none()
            && matches!(entry.conn.phase(), Phase::Open | Phase::Handshaking);
        let token = entry.token(index);
        let set = self.park.as_ref().expect("parking enabled");
        if stay && set.watch(fd, token, true).is_ok() {
            return;
        }
        set.unwatch(fd);
        let socket = entry.parked.take().expect("parked");
        self.metrics.connections_parked.dec();
        self.metrics.unparks.inc();
        self.unparked.push((index, socket));
    }

    /// Parked sockets that need a socket task again.
    pub fn take_unparked(&mut self) -> Vec<(usize, OwnedFd)> {
        std::mem::take(&mut self.unparked)
    }

    /// After a timer or shutdown wrote to a connection: get the bytes moving.
    fn kick(&mut self, index: usize) {
        if self.polling.contains(&index) {
            return; // its ongoing poll writes the output
        }
        let Some(entry) = self.conns.get(index) else {
            return;
        };
        if let Some(parked) = &entry.parked {
            if !entry.conn.out.is_empty() || entry.conn.finished() {
                // Output only (a parked socket has no input pending, or epoll would have
                // said so): send it without the full inline poll (read attempt, re-arm).
                let fd = parked.as_raw_fd();
                let plain_output = !entry.conn.finished() && entry.conn.phase() == Phase::Open;
                if plain_output && self.send_now(index, fd) {
                    return;
                }
                self.poll_parked(index);
            }
        } else if !entry.conn.out.is_empty()
            || entry.conn.finished()
            || self.park_requests.contains(&index)
        {
            // A live task writes when it runs: several outputs produced meanwhile go out in
            // one write (sending here at once measured 2x the CPU per message in `send`).
            if let Some(w) = self.task_wakers.get(&index) {
                w.wake_by_ref();
            } else if let Some(kicked) = &mut self.kicked {
                kicked.push(index);
            }
        }
    }

    /// Output for a parked socket (fan-out, a delivery, a heartbeat): one non-blocking `send`
    /// from the head of `out`, instead of a full inline poll (a read attempt and an epoll
    /// re-arm). Returns true when nothing is left to do: all sent, and reads were not paused
    /// by a full outbound buffer.
    fn send_now(&mut self, index: usize, fd: RawFd) -> bool {
        let max_outbound = self.shared.cfg.max_outbound;
        let entry = &mut self.conns[index];
        let out = &entry.conn.out;
        let reads_paused = out.len() >= max_outbound;
        // SAFETY: a send from a valid buffer on the parked socket this entry owns.
        let sent = unsafe {
            libc::send(
                fd,
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if sent <= 0 {
            return false; // would block, or an error the task will meet itself
        }
        self.metrics.bytes_out.add(sent as u64);
        entry.conn.out.consume(sent as usize);
        if !entry.conn.out.is_empty() {
            return false;
        }
        let mut out = std::mem::take(&mut entry.conn.out);
        if out.capacity() <= 4 * SPARE_OUT_BYTES && out.capacity() > self.spare_out.capacity() {
            out.clear();
            self.spare_out = out;
        }
        !reads_paused
    }

    /// Keep the connection's single wheel entry at or before its deadline. Lazy: when the
    /// deadline moves later (activity), the old entry stays and fires early, and `on_timer`
    /// re-checks; so reading a frame never touches the wheel.
    fn sync_timer(&mut self, index: usize) {
        let tick_ms = self.shared.cfg.tick_ms;
        let may_park = self.may_park(index);
        let entry = &mut self.conns[index];
        let mut want_ms = entry.conn.deadline(&self.shared.cfg);
        if let Some(d) = entry.reader.next_deadline() {
            want_ms = want_ms.min(d);
        }
        // The park check is a deadline only for a connection that may park: for one that may
        // not (TLS, waiting for its auth frame) it would be due again on every tick.
        if self.park.is_some()
            && may_park
            && !entry.conn.awaiting_auth()
            && entry.parked.is_none()
            && entry.conn.phase() == Phase::Open
        {
            want_ms = want_ms.min(entry.conn.last_rx_ms() + self.shared.cfg.park_idle_ms);
        }
        let want = want_ms.div_ceil(tick_ms);
        if let Some(key) = entry.timer {
            match self.wheel.deadline(key) {
                Some(at) if at <= want => return,
                Some(_) => {
                    self.wheel.cancel(key);
                }
                None => {}
            }
        }
        entry.timer = Some(self.wheel.insert(
            want,
            ConnRef {
                index: index as u32,
                serial: entry.serial,
            },
        ));
    }

    fn remove(&mut self, index: usize) {
        self.released_since_collect += 1;
        let mut entry = self.remove_slot(index);
        if !self.tls_sessions.is_empty() {
            self.tls_sessions.remove(&index);
        }
        self.metrics
            .acks_pending
            .sub(entry.reader.in_flight() as u64);
        if let Some(key) = entry.timer.take() {
            self.wheel.cancel(key);
        }
        let now = self.clock.now_ms();
        self.leave_all_rooms(index, now);
        self.forget_watches(index, now);
        if let Some(user) = entry.conn.user() {
            if !entry.conn.awaiting_session() {
                let none_left = (self.users).remove(user, index, |i| conn_user(&self.conns, i));
                self.metrics.users.set(self.users.len() as u64);
                if none_left {
                    self.senders.departed(user);
                    self.release_mirror(user, now);
                    self.local_presence(user, false, now);
                }
            }
        }
        let ctx = shard_ctx!(self);
        entry.conn.on_closed(&ctx);
    }

    /// Periodic: fire due deadlines, notice shutdown. Returns true when the shard is done.
    pub fn on_tick(&mut self) -> bool {
        let now = self.clock.now_ms();
        self.note_tick_gap(now);
        if let Some(set) = &self.park {
            set.ticked();
            self.metrics.watchdog_nudges.set(set.nudges());
        }
        if self.drain_started.is_none() && self.shared.draining.load(Ordering::Relaxed) {
            self.begin_drain(now);
        }
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel
            .advance(now / self.shared.cfg.tick_ms, |key, r| fired.push((key, r)));
        for (key, r) in fired.drain(..) {
            let index = r.index as usize;
            let live = |s: &Self| s.is_live(index, r.serial);
            if !live(self) {
                continue;
            }
            // Only the entry that fired is gone: handling an earlier one (a parked socket's
            // input delivering here) may have armed a new entry, which stays.
            if self.conns[index].timer == Some(key) {
                self.conns[index].timer = None;
            }
            // A parked socket is read before a silence deadline is judged: under load the
            // shard can be behind on its ready sockets, and the timeouts are for clients that
            // do not send, not for a gateway that has not read yet (seen at 64 gateways: every
            // 408 had its whole request waiting in the socket; at a million held at once,
            // 43,594 clients that answer every ping were closed 1001 for heartbeat silence).
            let entry = &self.conns[index];
            if entry.parked.is_some() && entry.conn.silence_would_end_it(now, &self.shared.cfg) {
                self.poll_parked(index);
                if !live(self) {
                    continue;
                }
            }
            let ctx = shard_ctx!(self);
            let entry = &mut self.conns[index];
            entry.conn.on_timer(now, &ctx);
            self.poll_window(index, now);
            let may_park = self.may_park(index);
            let entry = &mut self.conns[index];
            let park_idle = self.shared.cfg.park_idle_ms;
            if self.park.is_some()
                && self.drain_started.is_none()
                && entry.parked.is_none()
                && entry.conn.parkable(now, park_idle)
                && may_park
            {
                self.park_requests.insert(index);
            }
            self.kick(index);
            if self.is_live(index, r.serial) {
                self.sync_timer(index);
            }
        }
        self.fired = fired;
        self.retry_unsent();
        self.store_tick(now);
        self.watch_tick(now);
        if now >= self.last_expire_ms + INBOX_SWEEP_MS {
            self.last_expire_ms = now;
            self.sweep_rooms(now);
            self.send_buckets.sweep(now);
            // The mirror only forgets; the store counts what its age cap drops (Redis with
            // its answers, the embedded store here).
            crate::store::Inbox::expire(self.mirror.inbox_mut(), now);
            let expired = self.store.expire(now);
            self.metrics
                .inbox_mirrored
                .set((self.mirror.inbox().total_len() + self.store.held()) as u64);
            if expired > 0 {
                // Counted and logged, never silent (SPEC: 72 h age cap).
                self.metrics.inbox_expired.add(expired as u64);
                tracing::info!(
                    shard = self.id,
                    expired,
                    "offline inbox entries expired (age cap)"
                );
            }
        }
        self.hear_store_now(now);
        self.metrics.wheel_entries.set(self.wheel.len() as u64);
        if self.released_since_collect > 0
            && now >= self.last_collect_ms + crate::alloc::RELEASE_EVERY_MS
        {
            crate::alloc::release_free_memory();
            self.released_since_collect = 0;
            self.last_collect_ms = now;
        }
        match self.drain_started {
            Some(started) => self.conns.is_empty() || now >= started + self.shared.cfg.drain_ms,
            None => false,
        }
    }

    /// How long the run loop may sleep before the next tick. `tick_ms` while anything is
    /// pending (connections, deadlines, retries, Redis, watchers, a drain); with nothing at
    /// all, [`IDLE_TICK_MS`]: the periodic sweeps are per second anyway, and new input (an
    /// accept, a mesh message, a store reply) wakes the loop at once (`io::run`). Also tells
    /// the park set's watchdog not to count the longer sleep as a stall.
    pub fn next_tick_ms(&mut self) -> u64 {
        let busy = !self.conns.is_empty()
            || !self.wheel.is_empty()
            || self.drain_started.is_some()
            || self.shared.draining.load(Ordering::Relaxed)
            || !self.unsent.is_empty()
            || !self.store_quiet()
            || self.presence.is_busy()
            || !self.api_waiters.is_empty()
            || self.senders.has_waiters()
            || !self.unparked.is_empty();
        let tick = self.shared.cfg.tick_ms;
        // With Redis the node lease and the id slot are renewed every lease/3: an idle tick
        // stays well inside that (a test's short lease included).
        let idle = match self.store_shared() {
            true => IDLE_TICK_MS.min(self.shared.cfg.node_lease_ms / 6),
            false => IDLE_TICK_MS,
        };
        let next = if busy { tick } else { idle.max(tick) };
        self.planned_extra_ms = next - tick;
        if let Some(set) = &self.park {
            set.expect_quiet(self.planned_extra_ms);
        }
        next
    }

    /// A tick is due (one tick period since the last one ran).
    pub fn tick_due(&self) -> bool {
        let now = self.clock.now_ms();
        self.last_tick_ms
            .is_none_or(|last| now >= last + self.shared.cfg.tick_ms)
    }

    /// Count a tick that came over [`STALL_MS`] after the previous one (beyond an idle
    /// shard's planned sleep): nothing else of the shard (deadlines, heartbeats, handshake
    /// timeouts) ran on time meanwhile either.
    fn note_tick_gap(&mut self, now: u64) {
        if let Some(last) = self.last_tick_ms.replace(now) {
            let gap = now
                .saturating_sub(last)
                .saturating_sub(self.planned_extra_ms);
            if gap > self.metrics.stall_max_ms.get() {
                self.metrics.stall_max_ms.set(gap);
            }
            if gap >= STALL_MS {
                self.metrics.stalls.inc();
            }
        }
    }

    /// Stop: tell every open connection to reconnect (1012); handshakes now get 503.
    fn begin_drain(&mut self, now: u64) {
        self.drain_started = Some(now);
        self.park_requests.clear();
        let indices: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for index in indices {
            let ctx = make_ctx(&self.shared, &self.metrics, &self.events, true, self.id);
            let entry = &mut self.conns[index];
            entry.conn.on_shutdown(now, &ctx);
            let serial = entry.serial;
            self.kick(index);
            if self.is_live(index, serial) {
                self.sync_timer(index);
            }
        }
    }
}

fn make_ctx<'a>(
    shared: &'a Shared,
    metrics: &'a ShardMetrics,
    events: &'a RefCell<Vec<AppEvent>>,
    draining: bool,
    shard: usize,
) -> Ctx<'a> {
    Ctx {
        cfg: &shared.cfg,
        auth: &shared.auth,
        metrics,
        host_open: &shared.host_open,
        ips: &shared.ips,
        draining,
        shard,
        events,
    }
}

impl Shard {
    /// Connections the shard's table holds without moving (see `Shard::new`).
    pub fn conn_capacity(&self) -> usize {
        self.conns.capacity()
    }
}

/// The most connections a shard's tables are reserved for at start (beyond, they grow).
const MAX_RESERVED_CONNECTIONS: usize = 1 << 22;

/// The process' soft limit on open files (`usize::MAX` when unlimited or unknown;
/// `RLIM_INFINITY` is `u64::MAX`).
fn open_files_limit() -> usize {
    let limit = crate::preflight::open_files_soft().unwrap_or(u64::MAX);
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// The user of the connection at slab `index`, as the users' table reads it. A registered
/// connection is in the slab with its user (see `users`), but for the moment `remove` takes it
/// out of the slab before the table: meanwhile (leaving rooms, watches) it matches no one.
pub(in crate::shard) fn conn_user(conns: &Slab<Entry>, index: usize) -> &str {
    conns
        .get(index)
        .and_then(|e| e.conn.user())
        .unwrap_or_default()
}

#[cfg(test)]
impl Shard {
    /// Each mirror's state and what is kept beside it agree (checked by the simulation).
    pub(crate) fn mirror_state_consistent(&self) -> Result<(), String> {
        self.mirror.side_state_consistent()
    }

    /// The load of `user`'s inbox this shard waits for (an answer to another is stale).
    pub(crate) fn load_awaited(&self, user: &str) -> Option<u64> {
        self.mirror.load_awaited(user)
    }
}

#[cfg(test)]
mod tests;
