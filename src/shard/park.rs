//! Parking: idle connections leave glommio and wait in one per-shard epoll set.
//!
//! Why: a socket served by glommio costs a task plus an io_uring poll `Source` (measured
//! ~1.6 KiB RSS per idle socket for a bare glommio task holding a `TcpStream`), more than the
//! whole per-connection budget. Most connections of a messaging gateway are idle most of the
//! time, so after `park_idle_ms` without input a connection's task ends and its socket is
//! registered here (EPOLLONESHOT) with the slab index and serial as the token. A parked
//! connection owns its fd, its slab entry and its wheel entry, nothing else.
//!
//! glommio cannot wait on an arbitrary fd, so one small poller thread per shard blocks in
//! `poll(epfd)` when the shard asks it to (`arm`) and rings a doorbell socket that the shard
//! reads through glommio. The shard then takes the events itself with `epoll_wait(0)`. The
//! busy path never touches this: active sockets stay on glommio/io_uring.
//!
//! The poller is also the shard's watchdog. glommio sleeps in `io_uring_enter` and relies on
//! a timeout in a second ring to wake it for timers; at scale here that wake-up was seen
//! missing for minutes (a gateway that never finished its SIGTERM drain woke the moment a
//! debugger attached; glommio issue #326 describes the same). When the shard's tick count has
//! not moved for [`WATCHDOG_MS`], the poller sends the shard thread [`NUDGE_SIGNAL`], whose
//! empty handler makes the sleeping `io_uring_enter` return (EINTR, which glommio retries
//! after firing its due timers). The shard does no other blocking call, so nothing else sees it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Once};
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

/// Events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;

/// No tick for this long wakes the shard thread (see the module header).
pub const WATCHDOG_MS: i32 = 250;

/// The signal that wakes a sleeping shard thread (an empty handler, installed once).
const NUDGE_SIGNAL: libc::c_int = libc::SIGURG;

/// What the shard and its poller share: the shard's tick count (the shard writes it) and the
/// nudges sent (the poller writes it).
#[derive(Default)]
struct Watch {
    ticks: AtomicU64,
    nudges: AtomicU64,
    /// How much longer than usual the shard means to sleep before its next tick (an idle
    /// shard ticks once a second): no tick for that long is not a stall (the shard writes it).
    quiet_ms: AtomicU64,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub struct ParkSet {
    epfd: OwnedFd,
    /// Shard -> poller: one byte = "wait for readiness now". Closing it stops the poller.
    arm_w: Option<OwnedFd>,
    poller: Option<std::thread::JoinHandle<()>>,
    events: Vec<libc::epoll_event>,
    watch: Arc<Watch>,
}

impl ParkSet {
    /// The set, and the doorbell end the shard reads (through glommio) to learn of events.
    /// Call on the shard's thread: the watchdog wakes the thread that created the set.
    pub fn new(shard: usize) -> io::Result<(ParkSet, std::os::unix::net::UnixStream)> {
        install_nudge_handler()?;
        // SAFETY: plain syscalls; every fd returned is wrapped into an owner at once.
        let epfd = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let (arm_r, arm_w) = pipe()?;
        let (bell_shard, bell_poller) = std::os::unix::net::UnixStream::pair()?;
        let ep = epfd.as_raw_fd();
        let watch = Arc::new(Watch::default());
        // SAFETY: gettid has no preconditions.
        let shard_thread = unsafe { libc::gettid() };
        let poller_watch = watch.clone();
        let poller = std::thread::Builder::new()
            .name(format!("shard-{shard}-park"))
            .stack_size(64 * 1024)
            .spawn(move || poller_loop(ep, arm_r, bell_poller, shard_thread, &poller_watch))?;
        Ok((
            ParkSet {
                epfd,
                arm_w: Some(arm_w),
                poller: Some(poller),
                events: Vec::with_capacity(EVENTS_PER_WAIT),
                watch,
            },
            bell_shard,
        ))
    }

    /// The shard ticked (the watchdog's sign of life).
    pub fn ticked(&self) {
        let w = &self.watch.ticks;
        w.store(w.load(Relaxed) + 1, Relaxed);
    }

    /// The shard's next tick comes `ms` later than a tick period (0: on time).
    pub fn expect_quiet(&self, ms: u64) {
        self.watch.quiet_ms.store(ms, Relaxed);
    }

    /// Times the watchdog woke the shard thread.
    pub fn nudges(&self) -> u64 {
        self.watch.nudges.load(Relaxed)
    }

    /// Watch `fd` for input, one shot: `rearm` = false adds it, true re-arms it after an event.
    pub fn watch(&self, fd: RawFd, token: u64, rearm: bool) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token,
        };
        let op = if rearm {
            libc::EPOLL_CTL_MOD
        } else {
            libc::EPOLL_CTL_ADD
        };
        // SAFETY: valid epoll fd and event struct.
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    /// Stop watching `fd` (before it goes back to glommio). Epoll keys an entry by fd number
    /// and open file: a stale entry would outlive this fd number once the socket is parked
    /// again under a new duplicate, so it is removed explicitly.
    pub fn unwatch(&self, fd: RawFd) {
        // SAFETY: valid epoll fd; a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Ask the poller to ring the doorbell once something is ready.
    pub fn arm(&self) {
        if let Some(w) = &self.arm_w {
            // SAFETY: writing one byte from a valid buffer to a pipe we own.
            unsafe { libc::write(w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }

    /// Tokens of parked sockets with input, without blocking: at most [`EVENTS_PER_WAIT`]
    /// per call, so one round of serving them stays short (the rest stay ready in the set
    /// and ring again).
    pub fn take_ready(&mut self, out: &mut Vec<u64>) {
        self.events.clear();
        // SAFETY: the buffer has capacity for EVENTS_PER_WAIT events.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                self.events.as_mut_ptr(),
                EVENTS_PER_WAIT as i32,
                0,
            )
        };
        if n <= 0 {
            return;
        }
        // SAFETY: the kernel initialised n entries.
        unsafe { self.events.set_len(n as usize) };
        out.extend(self.events.iter().map(|e| e.u64));
    }
}

impl Drop for ParkSet {
    fn drop(&mut self) {
        self.arm_w.take(); // EOF tells the poller to stop
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we wrap at once.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn install_nudge_handler() -> io::Result<()> {
    extern "C" fn nudged(_: libc::c_int) {}
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: an empty handler, and a zeroed sigaction with only it and an empty mask set.
        // No SA_RESTART: the point is that the interrupted wait returns.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = nudged as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(NUDGE_SIGNAL, &action, std::ptr::null_mut()) != 0 {
                result = Err(io::Error::last_os_error());
            }
        }
    });
    result
}

/// Wait for an arm byte, then for readiness of the set, then ring; until the arm pipe closes.
/// Every wait ends after [`WATCHDOG_MS`] (plus an idle shard's planned sleep) to look at the
/// shard's tick count.
fn poller_loop(
    epfd: RawFd,
    arm_r: OwnedFd,
    bell: std::os::unix::net::UnixStream,
    shard_thread: libc::pid_t,
    watch: &Watch,
) {
    use std::io::Write;
    let mut bell = bell;
    let mut byte = [0u8; 1];
    let mut last_ticks = watch.ticks.load(Relaxed);
    // How long the tick count has not moved, as counted in whole waits.
    let mut stale_ms = 0u64;
    // Wait until one of `fds` is ready, waking the shard whenever it stopped ticking.
    // False on a poll error.
    let mut wait = |fds: &mut [libc::pollfd]| -> bool {
        loop {
            // An idle shard ticks once a second: look at it as rarely (the poller's wake-ups
            // were most of an idle gateway's remaining cost).
            let quiet = watch.quiet_ms.load(Relaxed);
            let timeout = WATCHDOG_MS as u64 + quiet;
            // SAFETY: valid pollfd entries.
            let r = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    timeout.min(i32::MAX as u64) as i32,
                )
            };
            if r > 0 {
                return true;
            }
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return false;
            }
            let ticks = watch.ticks.load(Relaxed);
            stale_ms = if ticks == last_ticks {
                stale_ms + timeout
            } else {
                0
            };
            if stale_ms > watch.quiet_ms.load(Relaxed) {
                // SAFETY: a signal with an installed empty handler, to a thread of this process.
                unsafe {
                    libc::syscall(libc::SYS_tgkill, libc::getpid(), shard_thread, NUDGE_SIGNAL)
                };
                watch.nudges.store(watch.nudges.load(Relaxed) + 1, Relaxed);
            }
            last_ticks = ticks;
        }
    };
    let arm = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        if !wait(&mut [arm(arm_r.as_raw_fd())]) {
            return;
        }
        // SAFETY: reading into a valid one-byte buffer from a pipe we own.
        let n = unsafe { libc::read(arm_r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        if n == 0 {
            return;
        }
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let mut fds = [arm(epfd), arm(arm_r.as_raw_fd())];
        if !wait(&mut fds) || fds[1].revents != 0 {
            return; // the shard closed the arm pipe
        }
        if bell.write_all(&[1]).is_err() {
            return;
        }
    }
}

/// A parked socket served inline with non-blocking syscalls: `Pending` means EAGAIN, and no
/// waker is kept (the epoll set is the wake-up).
pub struct RawSocket(pub RawFd);

impl AsyncRead for RawSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        // SAFETY: recv into a valid mutable buffer.
        let n = unsafe {
            libc::recv(
                self.0,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        would_block(n)
    }
}

impl AsyncWrite for RawSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // SAFETY: send from a valid buffer; MSG_NOSIGNAL so a reset peer is an error, not SIGPIPE.
        let n = unsafe {
            libc::send(
                self.0,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        would_block(n)
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    /// Shut the write side (FIN), as glommio's stream does; the descriptor stays open.
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown on the socket this value borrows; no memory is passed.
        let done = unsafe { libc::shutdown(self.0, libc::SHUT_WR) };
        if done == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err(io::Error::last_os_error()))
        }
    }
}

fn would_block(n: isize) -> Poll<io::Result<usize>> {
    if n >= 0 {
        return Poll::Ready(Ok(n as usize));
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Poll::Pending
    } else {
        Poll::Ready(Err(e))
    }
}

/// Duplicate a socket fd (the parked copy outlives the glommio stream that owned the original).
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: dup of a valid fd, wrapped at once.
    Ok(unsafe { OwnedFd::from_raw_fd(cvt(libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0))?) })
}
