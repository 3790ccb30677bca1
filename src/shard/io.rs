//! glommio glue for a shard: the listener, the accept task, one task per socket, and the tick.
//!
//! The socket task holds only the socket, the slab index and a handle to the shard; all
//! connection state lives in the shard's slab. It performs what [`Shard::poll_conn`] decides.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, TcpStream, UnixStream};

use super::park::{self, ParkSet};
use super::{ConnPoll, Shard};
use crate::limit::ip::{ip_key, IpKey};
use crate::mesh::DRAIN_BATCH;

use super::msg::ShardMesh;

/// Listen backlog requested; the kernel caps it at net.core.somaxconn (see tuning/).
const LISTEN_BACKLOG: i32 = 65_535;

/// A listening socket with SO_REUSEPORT, so every shard (and every gateway process on the
/// host) can bind the same address and the kernel spreads connections between them.
pub fn reuseport_listener(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    Ok(sock)
}

/// Err(AddrInUse) when another socket already listens on `addr`: a plain bind (no
/// SO_REUSEPORT) conflicts with any listener there, where a reuseport bind would join it.
pub fn check_address_free(addr: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As the real listeners: connections of a previous run in TIME_WAIT are no conflict.
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
}

/// Run the shard until it has drained. Call inside the shard's glommio executor.
pub async fn run(
    mut shard: Shard,
    listener: socket2::Socket,
    mesh: Option<(ShardMesh, std::os::unix::net::UnixStream)>,
) {
    let tick_ms = shard.cfg().tick_ms;
    let ms = Duration::from_millis;
    let poke = Rc::new(Poke::default());
    let doorbell = if shard.cfg().park_idle_ms > 0 {
        match ParkSet::new(shard.id) {
            Ok((set, bell)) => {
                shard.enable_parking(set);
                // SAFETY: the fd comes from a connected Unix socket we own and hand over whole.
                Some(unsafe { UnixStream::from_raw_fd(bell.into_raw_fd()) })
            }
            Err(e) => {
                tracing::warn!(error = %e, shard = shard.id, "parking disabled: cannot create the park set");
                None
            }
        }
    } else {
        None
    };
    let mesh_bell = mesh.map(|(m, bell)| {
        shard.enable_mesh(m);
        // SAFETY: the fd comes from a connected Unix socket we own and hand over whole.
        unsafe { UnixStream::from_raw_fd(bell.into_raw_fd()) }
    });
    let store_bell = shard.take_store_bell().map(|bell| {
        // SAFETY: the fd comes from a connected Unix socket we own and hand over whole.
        unsafe { UnixStream::from_raw_fd(bell.into_raw_fd()) }
    });
    let shard = Rc::new(RefCell::new(shard));
    if let Some(bell) = store_bell {
        glommio::spawn_local(store_loop(shard.clone(), bell, poke.clone())).detach();
    }
    if let Some(bell) = mesh_bell {
        let adopt = |shard: &Rc<RefCell<Shard>>, index, socket| {
            glommio::spawn_local(drive(shard.clone(), index, owned_stream(socket))).detach();
        };
        glommio::spawn_local(mesh_loop(shard.clone(), bell, poke.clone(), adopt)).detach();
    }
    if let Some(bell) = doorbell {
        glommio::spawn_local(park_loop(shard.clone(), bell)).detach();
    }
    // SAFETY: the fd comes from a listening socket we own and hand over whole.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    let mut acceptor = Some(glommio::spawn_local(accept_loop(
        shard.clone(),
        listener,
        poke.clone(),
    )));
    loop {
        shard.borrow().new_turn();
        let next = shard.borrow_mut().next_tick_ms();
        if next > tick_ms {
            futures_lite::future::or(glommio::timer::sleep(ms(next)), poke.wait()).await;
            poke.disarm();
        } else {
            glommio::timer::sleep(ms(tick_ms)).await;
        }
        let done = tick_if_due(&shard);
        if acceptor.is_some() && shard.borrow().draining() {
            // Dropping the task closes the listener: the kernel sends new connections to
            // the other processes sharing the port, or refuses them.
            acceptor.take();
        }
        if done {
            break;
        }
    }
}

/// Run the shard with its own io_uring socket driver (`io_driver = "uring"`, shard/uring.rs).
/// This loop is the whole shard: it runs the driver's turns, the tick, and the bells (mesh,
/// store), and waits in the driver's ring when nothing is left (the ring watches the bells,
/// and the wait ends by the next tick). No glommio task of its own: glommio only polls its
/// ring between tasks or when a task queue's time slice is over, so a bell task would wait
/// behind a busy driver. No park set: an idle socket is one multishot receive in the ring,
/// with no task and no buffer.
pub async fn run_uring(
    mut shard: Shard,
    listener: socket2::Socket,
    mesh: Option<(ShardMesh, std::os::unix::net::UnixStream)>,
) {
    shard.enable_kick_list();
    // Accepted sockets inherit it: no setsockopt per connection.
    let _ = listener.set_tcp_nodelay(true);
    let mesh_bell = mesh.map(|(m, bell)| {
        shard.enable_mesh(m);
        bell
    });
    let store_bell = shard.take_store_bell();
    let bells: Vec<_> = mesh_bell.iter().chain(&store_bell).collect();
    for bell in &bells {
        let _ = bell.set_nonblocking(true);
    }
    let bell_fds: Vec<_> = bells.iter().map(|b| b.as_raw_fd()).collect();
    let settings = super::uring::Settings {
        recv_buffers: shard.cfg().uring_recv_buffers,
        batch_wait_us: shard.cfg().uring_batch_wait_us,
        sockets: shard.conn_capacity(),
    };
    let mut driver = match super::uring::Driver::new(listener.into(), &bell_fds, settings) {
        Ok(driver) => driver,
        Err(e) => {
            // The host check passed before any shard started: this is a late failure.
            tracing::error!(error = %e, shard = shard.id, "cannot start the io_uring driver");
            return;
        }
    };
    let shard = RefCell::new(shard);
    let mut accepting = true;
    let mut bells_pending = true;
    // What other shards and Redis sent is also served once per tick, rung or not: a wake-up
    // lost on the way (the bell's poll ended, see `Driver::turn`) then costs a tick, not a
    // shard that never answers again.
    let mut serve_due = true;
    loop {
        // One reading of each clock per loop (the wait is at its end).
        shard.borrow().new_turn();
        if bells_pending || serve_due {
            if std::mem::take(&mut bells_pending) {
                for bell in &bells {
                    drain_bell(bell);
                }
            }
            serve_due = false;
            if mesh_bell.is_some() {
                bells_pending |= serve_mesh_batch(&shard, &mut driver);
            }
            if store_bell.is_some() {
                bells_pending |= serve_store_batch(&shard);
            }
        }
        let report = driver.turn(&shard);
        bells_pending |= report.bell_rang;
        // Read afresh: a tick that came due during a long turn runs now, not a wait later.
        shard.borrow().new_turn();
        let ticked = shard.borrow().tick_due();
        serve_due |= ticked;
        if ticked {
            driver.rearm_ended_bells();
        }
        if ticked && shard.borrow_mut().on_tick() {
            driver.submit(); // the last close frames
            break; // drained
        }
        if accepting && shard.borrow().draining() {
            driver.stop_accepting();
            accepting = false;
        } else if accepting && ticked {
            // An accept that failed (out of descriptors) is tried again once per tick.
            driver.rearm_accept();
        }
        if report.more || bells_pending || ticked {
            driver.submit();
        } else {
            // The turn's sends go out in the same `io_uring_enter` that waits for the next
            // completions: one system call per loop when the shard is not busy.
            if report.progress == 0 && driver.take_accepted() > 0 {
                // A wave of accepts and handshakes is over: their buffers are freed memory
                // that mimalloc keeps until told (the park set's waves do this with glommio).
                shard.borrow_mut().note_quiet_after_burst();
                driver.release_idle_buffers();
            }
            let wait_ms = shard.borrow_mut().next_tick_ms();
            driver.wait(wait_ms);
        }
    }
}

/// Take the bytes of a rung bell (its ring watch fires again on the next ring).
fn drain_bell(bell: &std::os::unix::net::UnixStream) {
    let mut buf = [0u8; 64];
    while let Ok(n) = std::io::Read::read(&mut &*bell, &mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// One bounded batch of what other shards sent; a handed-over socket goes to the driver.
/// True when the batch was full (more may wait).
fn serve_mesh_batch(shard: &RefCell<Shard>, driver: &mut super::uring::Driver) -> bool {
    shard.borrow().clear_mesh_bell();
    let mut batch = shard.borrow_mut().take_mesh_batch();
    let taken = batch.len();
    for msg in batch.drain(..) {
        let mut s = shard.borrow_mut();
        let now = s.now_ms();
        if let Some((index, socket)) = s.on_mesh_msg(msg, now) {
            drop(s);
            driver.add_socket(index, socket);
            driver.poll_soon(index); // its welcome is waiting
        }
    }
    taken == DRAIN_BATCH
}

/// One bounded batch of what Redis answered. True when the batch was full.
fn serve_store_batch(shard: &RefCell<Shard>) -> bool {
    shard.borrow().clear_store_bell();
    let replies = shard.borrow_mut().take_store_replies(DRAIN_BATCH);
    let taken = replies.len();
    let mut s = shard.borrow_mut();
    let now = s.now_ms();
    for reply in replies {
        s.on_store_reply(reply, now);
    }
    taken == DRAIN_BATCH
}

/// Wakes the run loop out of an idle shard's long sleep when input arrives. Armed only
/// during that sleep: a busy shard ticks every `tick_ms` anyway, and its accepts and bells
/// then cost one empty `RefCell` check.
#[derive(Default)]
struct Poke {
    poked: std::cell::Cell<bool>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl Poke {
    /// Wake the run loop if it is in a long sleep (a no-op otherwise: no waker is held).
    fn poke(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            self.poked.set(true);
            w.wake();
        }
    }

    /// The long sleep is over: later input need not wake anything.
    fn disarm(&self) {
        self.waker.borrow_mut().take();
        self.poked.set(false);
    }

    /// Ready once poked (since the last time it was ready).
    fn wait(&self) -> impl std::future::Future<Output = ()> + '_ {
        futures_lite::future::poll_fn(move |cx| {
            if self.poked.replace(false) {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}

async fn accept_loop(shard: Rc<RefCell<Shard>>, listener: TcpListener, poke: Rc<Poke>) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                serve_accepted(&shard, stream);
                poke.poke();
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning on accept.
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
        // `accept` returns at once while the backlog holds connections: end the turn when
        // glommio asks (see `park_loop`).
        glommio::yield_if_needed().await;
    }
}

/// A new socket: its handshake is served from the park set (or by a socket task when it
/// cannot be parked).
fn serve_accepted(shard: &Rc<RefCell<Shard>>, stream: TcpStream) {
    shard.borrow().new_turn();
    let _ = stream.set_nodelay(true);
    let ip = source_key(shard, &stream);
    let Some(index) = shard.borrow_mut().admit(ip) else {
        return;
    };
    if !shard.borrow_mut().start_tls(index) {
        return;
    }
    // Parked: the shard keeps a duplicate and this stream is closed on drop.
    if shard.borrow_mut().park_accepted(index, stream.as_raw_fd()) {
        spawn_unparked(shard);
        return;
    }
    glommio::spawn_local(drive(shard.clone(), index, stream)).detach();
}

/// The peer's address as the per-address limits key it; 0 (unlimited) when no such limit is
/// configured, which saves the `getpeername` call.
fn source_key(shard: &Rc<RefCell<Shard>>, stream: &TcpStream) -> IpKey {
    if !shard.borrow().limits_addresses() {
        return 0;
    }
    stream.peer_addr().map_or(0, |a| ip_key(a.ip()))
}

/// Wait for a doorbell, clear it before draining (anything pushed from then on rings again),
/// then let `drain` take at most `DRAIN_BATCH` items per call, yielding between full batches
/// so the shard's sockets are not starved. `drain` returns how many it took.
async fn serve_bell(
    shard: Rc<RefCell<Shard>>,
    mut bell: UnixStream,
    poke: Rc<Poke>,
    clear: fn(&Shard),
    mut drain: impl FnMut(&Rc<RefCell<Shard>>) -> usize,
) {
    let mut buf = [0u8; 64];
    loop {
        match bell.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        clear(&shard.borrow());
        loop {
            shard.borrow().new_turn();
            if drain(&shard) < DRAIN_BATCH {
                break;
            }
            glommio::yield_if_needed().await;
        }
        // What came in may have left work for the tick (deadlines, retries).
        poke.poke();
        // As in `park_loop`: a bell rung again meanwhile must not keep this task's turn.
        glommio::yield_if_needed().await;
    }
}

/// What other shards sent, in bounded batches; a handed-over socket goes to `adopt`.
async fn mesh_loop(
    shard: Rc<RefCell<Shard>>,
    bell: UnixStream,
    poke: Rc<Poke>,
    adopt: impl Fn(&Rc<RefCell<Shard>>, usize, OwnedFd),
) {
    serve_bell(shard, bell, poke, Shard::clear_mesh_bell, |shard| {
        let mut batch = shard.borrow_mut().take_mesh_batch();
        let taken = batch.len();
        for msg in batch.drain(..) {
            let adopted = {
                let mut s = shard.borrow_mut();
                let now = s.now_ms();
                s.on_mesh_msg(msg, now)
            };
            if let Some((index, socket)) = adopted {
                adopt(shard, index, socket);
            }
        }
        taken
    })
    .await
}

/// What Redis answered, in bounded batches.
async fn store_loop(shard: Rc<RefCell<Shard>>, bell: UnixStream, poke: Rc<Poke>) {
    serve_bell(shard, bell, poke, Shard::clear_store_bell, |shard| {
        let replies = shard.borrow_mut().take_store_replies(DRAIN_BATCH);
        let taken = replies.len();
        let mut s = shard.borrow_mut();
        let now = s.now_ms();
        for reply in replies {
            s.on_store_reply(reply, now);
        }
        taken
    })
    .await
}

/// Wait for the park set's doorbell, serve the parked sockets that have input, repeat.
async fn park_loop(shard: Rc<RefCell<Shard>>, mut bell: UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        shard.borrow().arm_parking();
        match bell.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        shard.borrow().new_turn();
        shard.borrow_mut().on_parked_ready();
        spawn_unparked(&shard);
        tick_if_due(&shard);
        // The poller has often rung again by now, so the read above returns at once and
        // this loop would never end its turn: glommio only reaps io_uring completions and
        // fires timers (the tick) between tasks. Measured at 64 gateways: ticks 3-28 s late.
        glommio::yield_if_needed().await;
    }
}

/// Run the shard's tick when one is due; true once the shard has drained. Called by the
/// tick timer and by the loops that can keep their turn for long (see `park_loop`), so
/// deadlines and heartbeats do not wait for glommio to get back to its timers.
fn tick_if_due(shard: &Rc<RefCell<Shard>>) -> bool {
    shard.borrow().new_turn();
    if !shard.borrow().tick_due() {
        return false;
    }
    let done = shard.borrow_mut().on_tick();
    // Also take parked input on every tick, not only when the doorbell is heard: a lost
    // wake-up then costs one tick, never a stuck socket.
    shard.borrow_mut().on_parked_ready();
    spawn_unparked(shard);
    done
}

/// Give each socket that left the park set a socket task again.
fn spawn_unparked(shard: &Rc<RefCell<Shard>>) {
    let unparked = shard.borrow_mut().take_unparked();
    for (index, socket) in unparked {
        glommio::spawn_local(drive(shard.clone(), index, owned_stream(socket))).detach();
    }
}

fn owned_stream(socket: OwnedFd) -> TcpStream {
    // SAFETY: the fd is a connected TCP socket we own and hand over whole.
    unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) }
}

/// The socket task: polls the shard for this socket until it is closed. A hand-written future
/// (not an `async fn`) so the task holds the stream once: it is most of an idle connection.
struct Drive {
    shard: Rc<RefCell<Shard>>,
    index: usize,
    stream: TcpStream,
}

impl std::future::Future for Drive {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut shard = this.shard.borrow_mut();
        shard.new_turn();
        // Parking ends the task; the shard keeps a duplicate of the socket.
        if shard.park_requested(this.index) && shard.park(this.index, this.stream.as_raw_fd()) {
            return Poll::Ready(());
        }
        match shard.poll_conn(this.index, &mut this.stream, cx) {
            ConnPoll::Pending { .. } => {
                shard.set_waker(this.index, cx.waker());
                Poll::Pending
            }
            // Dropping the task drops the stream, which closes the socket.
            ConnPoll::Close => Poll::Ready(()),
            ConnPoll::Handoff { to } => {
                let moved = park::dup(this.stream.as_raw_fd())
                    .map(|socket| shard.handoff(this.index, to, socket))
                    .unwrap_or(false);
                if moved {
                    return Poll::Ready(()); // the home shard owns the socket now
                }
                // It stays here to be told to reconnect (or the dup failed): keep polling.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

fn drive(shard: Rc<RefCell<Shard>>, index: usize, stream: TcpStream) -> Drive {
    Drive {
        shard,
        index,
        stream,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::ConfigLayer;
    use crate::metrics::ShardMetrics;
    use crate::shard::Shared;
    use std::sync::Arc;

    /// Per-connection footprint of the socket task's pieces (printed; the budget is checked
    /// by the idle benchmark, which sees everything including glommio's allocations).
    #[test]
    fn socket_task_pieces_are_small() {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(|| async {
                let cfg = ConfigLayer::default().resolve().unwrap();
                let shard = Shard::new(
                    0,
                    Shared::new(cfg),
                    Arc::new(ShardMetrics::default()),
                    Box::new(ManualClock::new(0)),
                );
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let client = TcpStream::connect(addr).await.unwrap();
                let fut = drive(Rc::new(RefCell::new(shard)), 0, client);
                let stream = std::mem::size_of::<TcpStream>();
                let future = std::mem::size_of_val(&fut);
                let entry = std::mem::size_of::<super::super::Entry>();
                eprintln!("TcpStream {stream} B, drive future {future} B, slab entry {entry} B");
                assert!(future <= 512, "socket task future grew to {future} B");
                assert!(entry <= 200, "slab entry grew to {entry} B");
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
