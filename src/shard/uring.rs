//! The io_uring socket driver of a shard (`io_driver = "uring"`), beside glommio on the
//! shard's thread: glommio keeps the executor, the timers and the bells; this ring does the
//! sockets. Why not glommio's streams: docs/architecture.md, "Socket I/O on io_uring".
//!
//! What it owns: the ring, the provided buffer ring every receive lands in, the fixed file
//! table the sockets are registered in, the listener, and per socket a 40-byte slot (keyed by
//! the shard's slab index) with its bytes in transit behind one pointer, only while it has some.
//! What it must not touch: connection state. Input goes to [`Shard::poll_conn`] through
//! [`RingSocket`], exactly as glommio's streams feed it, and the shard says what to do.
//!
//! One turn ([`Driver::turn`]): take every completion (accepts, receives, sends), poll the
//! connections they concern, poll the ones the shard kicked (timers), queue one send per
//! connection with staged bytes, then one `io_uring_enter` submits it all and reaps.
//! Each socket has one multishot receive for its life (re-armed only when the kernel ends it:
//! a full CQ, or the buffer ring empty, and then only once buffers have come back).
//! Teardown ends every operation before the buffers they point into are freed (`Drop`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use smallvec::SmallVec;

use super::{ConnPoll, Shard};

/// Submission queue entries; the completion queue is twice that (the kernel keeps overflow).
const RING_ENTRIES: u32 = 4096;
/// Bytes per receive buffer: a 64-byte echo uses one; a 64 KiB frame arrives in 16.
const RECV_BUFFER_BYTES: usize = 4096;
/// A batch wait ends early once this many completions are there (`Driver::wait`).
const BATCH_COMPLETIONS: usize = 64;
/// A turn that handled at least this many completions and polls means a busy shard: its next
/// wait gathers a batch. A quieter shard answers its first completion at once (no added
/// latency when a lone message arrives).
const BUSY_TURN: usize = 4;
/// Receive buffers one socket may hold unread (its connection's output is over the outbound
/// bound), and as many buffers' worth of bytes copied out of the ring (see `spill_held`):
/// beyond either the socket's receive is stopped and TCP pushes back.
const HELD_BUFFERS_MAX: usize = 16;
/// Drained send buffers kept for reuse, per shard (so idle sockets keep none, and the
/// per-message path does not allocate), and the largest one kept.
const SPARE_SENDS_MAX: usize = 256;
const SPARE_SEND_BYTES_MAX: usize = 64 * 1024;
/// The buffer group id of the provided ring.
const BUFFER_GROUP: u16 = 0;

/// What a completion is for: the low byte of its user data (the rest is the socket slot).
const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_CANCEL: u64 = 4;
const OP_BELL: u64 = 5;
/// The close of a socket's entry in the fixed file table (its answer is not looked at).
const OP_CLOSE_FIXED: u64 = 6;

/// Most entries of a shard's fixed file table (the kernel allows 2^20 and no more than the
/// open-files limit): 8 bytes of kernel memory each, allocated at start, so a shard with more
/// sockets gives the rest their plain descriptors.
const FIXED_FILES_MAX: u32 = 65_536;

/// Build an operation on a socket: its fixed file entry when it has one (no file lookup and
/// reference count per operation), else its descriptor.
macro_rules! on_socket {
    ($fixed:expr, $fd:expr, |$t:ident| $op:expr) => {
        match $fixed {
            Some(index) => {
                let $t = types::Fixed(index);
                $op
            }
            None => {
                let $t = types::Fd($fd);
                $op
            }
        }
    };
}

fn user_data(slot: usize, op: u64) -> u64 {
    ((slot as u64) << 8) | op
}

/// Whether this host can run the driver, checked once before any shard starts: None when it
/// can, else why not, for the operator. Each need is tried for real, not only read from the
/// kernel version (a container's seccomp profile or a backport can differ): a ring with
/// single issuer (6.0) and deferred task run (6.1), a provided buffer ring of `recv_buffers`
/// (5.19; locked memory), a sparse fixed file table (5.19), and a multishot receive (6.0) on a
/// registered socket that takes a byte and stays armed.
pub fn unsupported_because(recv_buffers: u16) -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    if let Some(version) = crate::preflight::parse_kernel(release) {
        if version < MIN_KERNEL {
            return Some(format!(
                "Linux {release} is older than {}.{} (multishot receive 6.0, provided buffer rings 5.19, single issuer 6.0, deferred task run 6.1)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ));
        }
    }
    let ring = match new_ring() {
        Ok(ring) => ring,
        Err(e) => {
            return Some(format!(
                "cannot create an io_uring with single issuer and deferred task run: {e}"
            ))
        }
    };
    let bufs = match BufRing::new(&ring, recv_buffers) {
        Ok(bufs) => bufs,
        Err(e) => {
            return Some(format!(
                "cannot register a provided buffer ring of {recv_buffers} buffers ({e}); locked memory (`ulimit -l`) may be too low"
            ))
        }
    };
    if let Err(e) = ring.submitter().register_files_sparse(1) {
        return Some(format!("cannot register a sparse fixed file table: {e}"));
    }
    multishot_receive_problem(ring, bufs)
}

/// The kernel version below which the driver is not tried (see `unsupported_because`).
const MIN_KERNEL: (u32, u32) = (6, 1);

/// Arm a multishot receive on one end of a socket pair (as fixed file 0), write a byte into the other: it must
/// land in a provided buffer with the receive still armed. Ends every operation before the
/// ring is closed and the buffers freed.
fn multishot_receive_problem(mut ring: IoUring, bufs: BufRing) -> Option<String> {
    let (ours, peer) = match std::os::unix::net::UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => return Some(format!("cannot make a socket pair to try a receive: {e}")),
    };
    if let Err(e) = ring
        .submitter()
        .register_files_update(0, &[ours.as_raw_fd()])
    {
        return Some(format!("cannot put a socket in the fixed file table: {e}"));
    }
    let recv = opcode::RecvMulti::new(types::Fixed(0), BUFFER_GROUP)
        .build()
        .user_data(user_data(0, OP_RECV));
    // SAFETY: the socket outlives the operation (it is cancelled and reaped below).
    let _ = unsafe { ring.submission().push(&recv) };
    let _ = std::io::Write::write(&mut &peer, b"x");
    let ts = types::Timespec::new().sec(1);
    let args = types::SubmitArgs::new().timespec(&ts);
    let _ = ring.submitter().submit_with_args(1, &args);
    let first = ring.completion().next().map(|c| (c.result(), c.flags()));
    let why = match first {
        None => Some("a multishot receive got no completion within 1 s".to_string()),
        Some((1, flags)) if cqueue::more(flags) && cqueue::buffer_select(flags).is_some() => None,
        Some((r, _)) if r < 0 => Some(format!(
            "multishot receive into a provided buffer ring is not supported: {}",
            io::Error::from_raw_os_error(-r)
        )),
        Some((r, flags)) => Some(format!(
            "a multishot receive answered {r} (flags {flags:#x}) for one byte"
        )),
    };
    // End the receive (if still armed) before the ring and the buffers go.
    if first.is_some_and(|(_, flags)| cqueue::more(flags)) {
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any().all())
            .build()
            .user_data(user_data(0, OP_CANCEL));
        // SAFETY: a cancel refers to no memory.
        let _ = unsafe { ring.submission().push(&cancel) };
        let deadline = std::time::Instant::now() + TEARDOWN_WAIT;
        let mut ended = false;
        while !ended && std::time::Instant::now() < deadline {
            let _ = ring.submitter().submit_with_args(1, &args);
            ended = ring
                .completion()
                .any(|c| c.user_data() & 0xff == OP_RECV && !cqueue::more(c.flags()));
        }
        if !ended {
            // The kernel may still write into the buffers: never free them.
            std::mem::forget((ring, bufs));
            return why;
        }
    }
    let _ = ring.submitter().unregister_buf_ring(BUFFER_GROUP);
    drop(ring);
    drop(bufs);
    why
}

/// A ring for one thread: single issuer and deferred task work (completions are posted when
/// this thread asks, not by interrupting it).
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(RING_ENTRIES * 2)
        .build(RING_ENTRIES)
}

/// The provided buffer ring: the kernel picks a free buffer for each receive; the driver gives
/// it back as soon as the connection has taken the bytes.
struct BufRing {
    /// Buffers in the ring (a power of two).
    count: u16,
    /// Ring entries (page aligned, mapped): the kernel reads them, the driver fills them.
    entries: *mut types::BufRingEntry,
    entries_len: usize,
    buffers: Box<[u8]>,
    /// Our copy of the tail; published to the kernel in `publish`.
    tail: u16,
    /// Buffers given to the kernel whose receive completions we have not seen: an upper
    /// bound on what it can still pick (it may have filled some whose completions wait).
    in_kernel: u16,
}

impl BufRing {
    fn new(ring: &IoUring, count: u16) -> io::Result<Self> {
        debug_assert!(count.is_power_of_two() && count <= 32_768);
        let entries_len = count as usize * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping; checked for failure below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                entries_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut bufs = BufRing {
            count,
            entries: map.cast(),
            entries_len,
            buffers: vec![0u8; count as usize * RECV_BUFFER_BYTES].into_boxed_slice(),
            tail: 0,
            in_kernel: 0,
        };
        // SAFETY: the mapping is page aligned, `count` entries long, and lives as long as
        // `bufs` (unmapped on drop, after the driver has unregistered it: see `Driver`).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(map as u64, count, BUFFER_GROUP, 0)?
        };
        for bid in 0..count {
            bufs.give_back(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// The bytes `held` names in buffer `bid`.
    fn bytes(&self, held: &Held) -> &[u8] {
        let start = held.bid as usize * RECV_BUFFER_BYTES;
        &self.buffers[start + held.from as usize..start + held.to as usize]
    }

    /// Put buffer `bid` back at the tail (seen by the kernel after `publish`).
    fn give_back(&mut self, bid: u16) {
        let mask = self.count - 1;
        let addr = self.buffers.as_ptr() as u64 + bid as u64 * RECV_BUFFER_BYTES as u64;
        // SAFETY: the index is masked into the mapping; the kernel reads only entries between
        // its head and the published tail, and this one is past the tail until `publish`.
        let entry = unsafe { &mut *self.entries.add((self.tail & mask) as usize) };
        entry.set_addr(addr);
        entry.set_len(RECV_BUFFER_BYTES as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.in_kernel += 1;
    }

    /// A receive completion named buffer `bid`: the kernel filled it and no longer has it.
    fn taken(&mut self) {
        self.in_kernel = self.in_kernel.saturating_sub(1);
    }

    /// Let the kernel see the buffers given back.
    fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's reserved field, as the kernel defines it;
        // it is only ever written here, as an atomic with release order.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl BufRing {
    /// Give the buffers' pages back to the system when the kernel holds every buffer unfilled
    /// (none held by a connection, none picked since): a burst of upgrades cycles the whole
    /// ring through its FIFO, so otherwise all of it (4 MiB by default) stays resident for
    /// good. The next receives fault pages in again (zeroed). Safe against the kernel: with
    /// deferred task run it fills buffers only inside this thread's `io_uring_enter`, and
    /// only the ones from its head on, which this checks are all of them. True if released.
    fn release_pages(&self, ring: &IoUring) -> bool {
        if self.count == 0 || self.in_kernel != self.count {
            return false;
        }
        let Some(head) = buf_ring_head(ring) else {
            return false;
        };
        if self.tail.wrapping_sub(head) != self.count {
            return false;
        }
        let page = 4096;
        let start = (self.buffers.as_ptr() as usize).next_multiple_of(page);
        let end = (self.buffers.as_ptr() as usize + self.buffers.len()) & !(page - 1);
        if end <= start {
            return false;
        }
        // SAFETY: whole pages inside our own allocation, which nothing reads until the kernel
        // has written into it again; MADV_DONTNEED on private anonymous memory reads as zero.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) == 0 }
    }

    /// No ring at all: what is left in a driver whose buffers had to be leaked.
    fn empty() -> Self {
        BufRing {
            count: 0,
            entries: std::ptr::null_mut(),
            entries_len: 0,
            buffers: Box::new([]),
            tail: 0,
            in_kernel: 0,
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.entries_len > 0 {
            // SAFETY: the mapping made in `new`, unmapped once.
            unsafe { libc::munmap(self.entries.cast(), self.entries_len) };
        }
    }
}

/// Received bytes not yet taken by the connection: `from..to` of buffer `bid`.
#[derive(Clone, Copy)]
struct Held {
    bid: u16,
    from: u32,
    to: u32,
}

/// A socket's bytes in transit, only while it has some: an idle socket gives it back to the
/// driver's pool (`Driver::settle`), so it keeps one pointer, not four queues.
#[derive(Default)]
struct SocketIo {
    /// Received bytes the connection has not taken yet (none unless its output is over the
    /// outbound bound), in arrival order: first those copied out of the ring when it ran dry
    /// (`spilled`), then the ring buffers still held.
    spilled: Vec<u8>,
    /// One entry inline: a socket's input is normally taken in the turn it arrives.
    held: SmallVec<[Held; 1]>,
    /// Bytes handed to the kernel by the send in flight (not touched until it completes).
    sending: Vec<u8>,
    sent: u32,
    /// Bytes the connection wrote since; they go in the next send.
    staged: Vec<u8>,
}

impl SocketIo {
    fn unsent(&self) -> usize {
        self.sending.len() - self.sent as usize + self.staged.len()
    }

    fn unread(&self) -> usize {
        self.spilled.len()
            + self
                .held
                .iter()
                .map(|h| (h.to - h.from) as usize)
                .sum::<usize>()
    }
}

/// Idle `SocketIo`s kept for reuse per shard (so the per-message path does not allocate).
const SPARE_IOS_MAX: usize = 256;

/// Take a `SocketIo` from the pool (or a new one) for a socket that has none. The pool holds
/// the boxes themselves (hence `vec_box`): a socket takes one by moving a pointer, with no
/// allocation.
#[allow(clippy::vec_box)]
fn socket_io<'a>(
    io: &'a mut Option<Box<SocketIo>>,
    spare: &mut Vec<Box<SocketIo>>,
) -> &'a mut SocketIo {
    io.get_or_insert_with(|| spare.pop().unwrap_or_default())
}

/// The I/O state of one socket. It lives until the kernel holds no operation on it (a send
/// in flight reads `sending`), which can be after its connection is gone.
struct SocketSlot {
    fd: Option<OwnedFd>,
    /// The shard's slab index of its connection plus one (None once the connection is gone;
    /// read through `conn()`): 4 bytes, the slot is what every idle socket pays.
    conn: Option<NonZeroU32>,
    /// Its bytes in transit (None when it has none).
    io: Option<Box<SocketIo>>,
    /// Operations the kernel holds for this socket (the receive, a send).
    ops_in_kernel: u8,
    /// Its yes/no states, a bit each (see [`Flag`]): 24 bytes a slot instead of 32.
    flags: u16,
    /// The connection belongs on shard `to`: the receive is being cancelled to hand it over.
    handoff_to: Option<u16>,
}

/// A socket slot's yes/no states (bits of `SocketSlot::flags`).
#[derive(Clone, Copy)]
enum Flag {
    /// Its operations name it by its entry in the fixed file table, at its slot index.
    Fixed = 1,
    RecvArmed = 1 << 1,
    /// A send of its bytes is in the kernel.
    SendInKernel = 1 << 2,
    /// In the driver's `to_send` list for this turn.
    SendQueued = 1 << 3,
    /// Its receive ended for want of buffers (ENOBUFS): it waits in `Driver::starved` to be
    /// re-armed once buffers come back, not at once (which would end the same way, a spin).
    Starved = 1 << 4,
    /// The peer closed its side (a receive of 0 bytes).
    Eof = 1 << 5,
    /// The socket failed (receive or send error): the connection sees it as gone.
    Failed = 1 << 6,
    /// Poll the connection again once the staged bytes are out (it was held back by them).
    RepollWhenSent = 1 << 7,
    /// The connection is finished: close the socket once the staged bytes are out.
    CloseWhenSent = 1 << 8,
}

impl SocketSlot {
    fn new(fd: OwnedFd, conn: usize) -> Self {
        SocketSlot {
            fd: Some(fd),
            conn: NonZeroU32::new(u32::try_from(conn + 1).expect("slab index below 2^32 - 1")),
            io: None,
            ops_in_kernel: 0,
            flags: 0,
            handoff_to: None,
        }
    }

    fn is(&self, flag: Flag) -> bool {
        self.flags & flag as u16 != 0
    }

    fn set(&mut self, flag: Flag, on: bool) {
        if on {
            self.flags |= flag as u16;
        } else {
            self.flags &= !(flag as u16);
        }
    }

    fn unsent(&self) -> usize {
        self.io.as_ref().map_or(0, |io| io.unsent())
    }

    /// Received bytes the connection has not taken.
    fn unread(&self) -> usize {
        self.io.as_ref().map_or(0, |io| io.unread())
    }

    /// The shard's slab index of its connection (None once the connection is gone).
    fn conn(&self) -> Option<usize> {
        self.conn.map(|c| c.get() as usize - 1)
    }

    /// The receive may run (again): nothing unread, not ended, not being handed over.
    fn may_receive(&self) -> bool {
        self.conn.is_some()
            && !self.is(Flag::RecvArmed)
            && self.unread() == 0
            && !self.is(Flag::Eof)
            && !self.is(Flag::Failed)
            && self.handoff_to.is_none()
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// Its fixed file index, if it has one (`slot` is its own index).
    fn fixed_index(&self, slot: usize) -> Option<u32> {
        self.is(Flag::Fixed).then_some(slot as u32)
    }
}

/// A socket as [`Shard::poll_conn`] sees it: reads take the bytes of the completion being
/// handled, writes stage bytes for this turn's send.
struct RingSocket<'a> {
    slot: &'a mut SocketSlot,
    bufs: &'a mut BufRing,
    spare_sends: &'a mut Vec<Vec<u8>>,
    #[allow(clippy::vec_box)] // see `socket_io`
    spare_ios: &'a mut Vec<Box<SocketIo>>,
    /// Bound on staged bytes (beyond it the connection keeps its output and stops reading).
    max_staged: usize,
}

impl futures_lite::AsyncRead for RingSocket<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(sio) = this.slot.io.as_deref_mut() {
            if !sio.spilled.is_empty() {
                let n = sio.spilled.len().min(buf.len());
                buf[..n].copy_from_slice(&sio.spilled[..n]);
                sio.spilled.drain(..n);
                if sio.spilled.is_empty() {
                    sio.spilled = Vec::new(); // a slow reader keeps no copy once caught up
                }
                return Poll::Ready(Ok(n));
            }
            if let Some(held) = sio.held.first_mut() {
                let bytes = this.bufs.bytes(held);
                let n = bytes.len().min(buf.len());
                buf[..n].copy_from_slice(&bytes[..n]);
                held.from += n as u32;
                if held.from == held.to {
                    // Taken: the buffer goes back to the kernel at once.
                    let bid = held.bid;
                    sio.held.remove(0);
                    this.bufs.give_back(bid);
                    if sio.held.is_empty() && sio.held.spilled() {
                        sio.held = SmallVec::new(); // a burst's allocation is not kept
                    }
                }
                return Poll::Ready(Ok(n));
            }
        }
        if this.slot.is(Flag::Failed) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if this.slot.is(Flag::Eof) {
            return Poll::Ready(Ok(0));
        }
        // The next receive completion polls the connection again.
        Poll::Pending
    }
}

impl futures_lite::AsyncWrite for RingSocket<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let slot = &mut *self.slot;
        if slot.is(Flag::Failed) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = self.max_staged.saturating_sub(self.slot.unsent());
        if room == 0 {
            self.slot.set(Flag::RepollWhenSent, true);
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        let this = &mut *self;
        let sio = socket_io(&mut this.slot.io, this.spare_ios);
        if sio.staged.capacity() == 0 {
            if let Some(spare) = this.spare_sends.pop() {
                sio.staged = spare;
            }
        }
        sio.staged.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    /// Staged bytes go out at the end of the turn; a finished connection's socket closes only
    /// after them (`close_when_sent`).
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shut the write side once everything staged is out (our close frame first).
    fn poll_close(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.slot.unsent() > 0 {
            self.slot.set(Flag::RepollWhenSent, true);
            return Poll::Pending;
        }
        // SAFETY: shutdown on the socket this slot owns; rare (once per closing connection).
        let rc = unsafe { libc::shutdown(self.slot.raw_fd(), libc::SHUT_WR) };
        if rc < 0 {
            return Poll::Ready(Err(io::Error::last_os_error()));
        }
        Poll::Ready(Ok(()))
    }
}

/// The waker `poll_conn` is given: the connection asked to be polled again (its read loop
/// yielded for fairness, or writes made room to read). Checked right after each poll.
#[derive(Default)]
struct RepollFlag(AtomicBool);

impl Wake for RepollFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a turn did, for the loop to decide whether to wait.
pub struct TurnReport {
    /// Completions handled and connections polled.
    pub progress: usize,
    /// A bell (mesh, store) rang: its glommio task has something to read.
    pub bell_rang: bool,
    /// Work is left for another turn at once (connections to poll, completions to reap);
    /// otherwise the loop submits and waits in one `io_uring_enter`.
    pub more: bool,
}

/// A shard's io_uring socket driver (see the module header).
pub struct Driver {
    // Closing a ring does not stop its operations at once (the kernel tears it down later),
    // so `drop` first cancels them all and waits until each has ended; then the fields drop
    // in this order: the ring, then the buffers and sockets it pointed into.
    ring: IoUring,
    bufs: BufRing,
    slots: Slab<SocketSlot>,
    /// Socket slot of each connection plus one, by the shard's slab index (4 bytes a
    /// connection: `Option<u32>` would be 8).
    slot_of: Vec<Option<NonZeroU32>>,
    listener: Option<OwnedFd>,
    accept_armed: bool,
    /// Bell polls the kernel holds (one per bell: an ended one is polled again, see `turn`).
    bells_armed: usize,
    /// Bells whose poll ended with an error: polled again from the tick, not at once (a poll
    /// that kept failing would otherwise spin the loop).
    bells_ended: SmallVec<[usize; 2]>,
    /// The bells' descriptors, by index (the index is their polls' slot in the user data).
    bells: SmallVec<[RawFd; 2]>,
    /// Slots whose receive ended with ENOBUFS, oldest first (see `rearm_starved`).
    starved: VecDeque<usize>,
    /// A receive ended with ENOBUFS this turn: connections holding buffers copy them out.
    ran_dry: bool,
    /// Slots with staged bytes and no send in the kernel: each gets one send this turn.
    to_send: Vec<usize>,
    /// Connections to poll again this turn (asked to, or their staged bytes went out).
    repoll: VecDeque<usize>,
    flag: Arc<RepollFlag>,
    waker: Waker,
    completions: Vec<(u64, i32, u32)>,
    spare_sends: Vec<Vec<u8>>,
    #[allow(clippy::vec_box)] // see `socket_io`
    spare_ios: Vec<Box<SocketIo>>,
    /// Sockets accepted since the loop last went quiet (see `take_accepted`).
    accepted: u64,
    /// Entries of the fixed file table (0: none could be registered, plain descriptors).
    fixed_files: u32,
    /// `uring_batch_wait_us` when the kernel can (Linux 6.12's minimum wait), else 0.
    batch_wait_us: u32,
    /// The last turn was busy (`BUSY_TURN`).
    busy: bool,
    /// A fixed entry's close is queued but not submitted: a new socket must not take that
    /// entry before it (see `add_socket`).
    fixed_close_queued: bool,
}

/// What a shard's driver is built with (from the config).
pub struct Settings {
    /// `uring_recv_buffers`.
    pub recv_buffers: u16,
    /// `uring_batch_wait_us`.
    pub batch_wait_us: u32,
    /// Sockets the slot table is reserved for (the shard's share of `max_connections`, see
    /// `Shard::new`).
    pub sockets: usize,
}

impl Driver {
    /// A ring for this shard with a multishot accept on `listener` and a multishot poll on
    /// each bell (the mesh's, the store's), so a wait in the ring also ends when they ring.
    pub fn new(listener: OwnedFd, bells: &[RawFd], settings: Settings) -> io::Result<Self> {
        let ring = new_ring()?;
        let batch_wait_us = if ring.params().is_feature_min_timeout() {
            settings.batch_wait_us
        } else {
            0
        };
        let bufs = BufRing::new(&ring, settings.recv_buffers)?;
        let fixed_files = fixed_file_table(&ring);
        let flag = Arc::new(RepollFlag::default());
        let mut driver = Driver {
            ring,
            bufs,
            slots: Slab::with_capacity(settings.sockets),
            slot_of: Vec::with_capacity(settings.sockets),
            listener: Some(listener),
            accept_armed: false,
            bells_armed: 0,
            bells: bells.iter().copied().collect(),
            bells_ended: SmallVec::new(),
            starved: VecDeque::new(),
            ran_dry: false,
            to_send: Vec::new(),
            repoll: VecDeque::new(),
            waker: Waker::from(flag.clone()),
            flag,
            completions: Vec::with_capacity(RING_ENTRIES as usize),
            spare_sends: Vec::new(),
            spare_ios: Vec::new(),
            accepted: 0,
            fixed_files,
            fixed_close_queued: false,
            batch_wait_us,
            busy: false,
        };
        driver.arm_accept();
        for index in 0..bells.len() {
            driver.arm_bell(index);
            driver.bells_armed += 1;
        }
        Ok(driver)
    }

    /// A multishot poll on bell `index`: every ring completes it once, and it stays armed.
    fn arm_bell(&mut self, index: usize) {
        let poll = opcode::PollAdd::new(types::Fd(self.bells[index]), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data(index, OP_BELL));
        self.push(poll);
    }

    fn push(&mut self, sqe: squeue::Entry) {
        // SAFETY: every entry pushed points at memory that outlives its operation: the listener
        // and sockets are owned by the driver until their operations complete (slots live
        // until `ops_in_kernel` is 0), send buffers are not touched while in the kernel.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // Full: submit what is queued (completions stay in the CQ for the next turn).
            let _ = self.ring.submit();
        }
    }

    fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(0, OP_ACCEPT));
        self.accept_armed = true;
        self.push(accept);
    }

    /// Stop accepting (drain): cancel the accept; the listener closes once it completes.
    pub fn stop_accepting(&mut self) {
        if let Some(listener) = &self.listener {
            let cancel = opcode::AsyncCancel2::new(
                types::CancelBuilder::fd(types::Fd(listener.as_raw_fd())).all(),
            )
            .build()
            .user_data(user_data(0, OP_CANCEL));
            self.push(cancel);
            // The cancel names the descriptor: submit it before the number can be reused.
            let _ = self.ring.submit();
        }
        self.listener = None;
    }

    fn arm_recv(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        let recv = on_socket!(s.fixed_index(slot), s.raw_fd(), |t| {
            opcode::RecvMulti::new(t, BUFFER_GROUP).build()
        })
        .user_data(user_data(slot, OP_RECV));
        s.set(Flag::RecvArmed, true);
        s.ops_in_kernel += 1;
        self.push(recv);
    }

    /// Adopt a socket whose connection is at `conn` in the shard's slab (accepted, or handed
    /// over by another shard) and start its one multishot receive.
    pub fn add_socket(&mut self, conn: usize, fd: OwnedFd) {
        let slot = self.slots.insert(SocketSlot::new(fd, conn));
        if (slot as u32) < self.fixed_files {
            if std::mem::take(&mut self.fixed_close_queued) {
                // The queued close may name this entry: it goes first.
                let _ = self.ring.submit();
            }
            // One register call per socket; its operations then skip the file lookup. If it
            // fails (out of kernel memory), the socket works by its descriptor.
            let s = &mut self.slots[slot];
            let fixed = (self.ring.submitter())
                .register_files_update(slot as u32, &[s.raw_fd()])
                .is_ok();
            s.set(Flag::Fixed, fixed);
        }
        if self.slot_of.len() <= conn {
            self.slot_of.resize(conn + 1, None);
        }
        self.slot_of[conn] = NonZeroU32::new(slot as u32 + 1);
        self.arm_recv(slot);
    }

    /// A wave of accepts is over and the loop is quiet: give the receive buffers' pages back
    /// if no connection holds one (see `BufRing::release_pages`).
    pub fn release_idle_buffers(&mut self) {
        self.bufs.release_pages(&self.ring);
    }

    /// Sockets accepted since the last call.
    pub fn take_accepted(&mut self) -> u64 {
        std::mem::take(&mut self.accepted)
    }

    /// Poll the connection at `conn` on the next turn (it has output waiting).
    pub fn poll_soon(&mut self, conn: usize) {
        self.repoll.push_back(conn);
    }

    /// One turn: handle every completion, poll the connections they concern and the ones the
    /// shard kicked, queue the sends, submit and reap with one `io_uring_enter`.
    pub fn turn(&mut self, shard: &RefCell<Shard>) -> TurnReport {
        let mut completions = std::mem::take(&mut self.completions);
        completions.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let mut progress = completions.len();
        let mut bell_rang = false;
        for &(data, result, flags) in &completions {
            let slot = (data >> 8) as usize;
            match data & 0xff {
                OP_ACCEPT => self.on_accept(shard, result, flags),
                OP_RECV => self.on_recv(shard, slot, result, flags),
                OP_SEND => self.on_send(shard, slot, result),
                OP_BELL => {
                    bell_rang = true;
                    // The kernel may end a multishot poll (its completion then lacks `MORE`,
                    // e.g. after a completion queue overflow): without a new one this shard
                    // would never hear its mesh or its store again.
                    if !cqueue::more(flags) {
                        if result >= 0 || result == -libc::ECANCELED {
                            self.arm_bell(slot);
                        } else {
                            self.bells_ended.push(slot);
                        }
                    }
                }
                _ => {} // a cancel's or a fixed close's own answer
            }
        }
        completions.clear();
        self.completions = completions;
        let kicked = shard.borrow_mut().take_kicked();
        self.repoll.extend(kicked);
        progress += self.repoll.len();
        while let Some(conn) = self.repoll.pop_front() {
            if let Some(slot) = self.slot_for(conn) {
                self.poll(shard, slot);
            }
        }
        for slot in std::mem::take(&mut self.to_send) {
            self.queue_send(slot);
        }
        if std::mem::take(&mut self.ran_dry) {
            self.spill_held();
        }
        self.rearm_starved();
        self.bufs.publish();
        self.busy = progress >= BUSY_TURN;
        TurnReport {
            progress,
            bell_rang,
            more: !self.repoll.is_empty()
                || shard.borrow().has_kicked()
                || !self.ring.completion().is_empty(),
        }
    }

    /// Submit what the turn queued (sends, re-arms) without waiting, when the loop has more
    /// to do at once; none when there is nothing to submit and no deferred completion to run.
    pub fn submit(&mut self) {
        let mut sq = self.ring.submission();
        let needed = !sq.is_empty() || sq.taskrun() || sq.cq_overflow();
        sq.sync();
        drop(sq);
        if needed {
            let _ = self.ring.submit();
            self.fixed_close_queued = false;
        }
    }

    /// Submit what is queued and block until a completion arrives (an accept, input, a bell,
    /// a send's answer) or `timeout_ms` passes. After a busy turn, with a batch wait, the
    /// kernel returns once `BATCH_COMPLETIONS` are there, or after `batch_wait_us` when at
    /// least one is.
    pub fn wait(&mut self, timeout_ms: u64) {
        let ts = types::Timespec::new()
            .sec(timeout_ms / 1000)
            .nsec((timeout_ms % 1000) as u32 * 1_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let (want, args) = match self.batch_wait_us {
            us if us > 0 && self.busy => (BATCH_COMPLETIONS, args.min_wait_usec(us)),
            _ => (1, args),
        };
        // ETIME (the timeout) and EINTR are expected; a real failure shows on the next turn.
        let _ = self.ring.submitter().submit_with_args(want, &args);
        self.fixed_close_queued = false;
    }

    fn slot_for(&self, conn: usize) -> Option<usize> {
        self.slot_of
            .get(conn)
            .copied()
            .flatten()
            .map(|s| s.get() as usize - 1)
    }

    fn on_accept(&mut self, shard: &RefCell<Shard>, result: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if result < 0 {
            if result != -libc::ECANCELED {
                // Out of descriptors or memory: the tick re-arms it (no spinning on accept).
                tracing::warn!(error = %io::Error::from_raw_os_error(-result), "accept failed");
            }
            return;
        }
        // SAFETY: a completed accept's result is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(result) };
        if !self.accept_armed && self.listener.is_some() && result >= 0 {
            self.arm_accept();
        }
        let ip = {
            let s = shard.borrow();
            match s.limits_addresses() {
                true => peer_ip_key(fd.as_raw_fd()),
                false => 0,
            }
        };
        self.accepted += 1;
        let Some(conn) = shard.borrow_mut().admit(ip) else {
            return; // dropping the descriptor closes it
        };
        // wss://: the session sits between this socket and the connection, inside
        // `poll_conn` (crate::tls), exactly as on glommio's streams.
        if !shard.borrow_mut().start_tls(conn) {
            return;
        }
        self.add_socket(conn, fd);
    }

    /// The accept ended (an error, or the kernel stopped it): arm it again (from the tick).
    pub fn rearm_accept(&mut self) {
        if !self.accept_armed && self.listener.is_some() {
            self.arm_accept();
        }
    }

    /// Bells whose poll ended with an error are polled again (from the tick).
    pub fn rearm_ended_bells(&mut self) {
        for index in std::mem::take(&mut self.bells_ended) {
            self.arm_bell(index);
        }
    }

    fn on_recv(&mut self, shard: &RefCell<Shard>, slot: usize, result: i32, flags: u32) {
        let s = &mut self.slots[slot];
        if !cqueue::more(flags) {
            s.set(Flag::RecvArmed, false);
            s.ops_in_kernel -= 1;
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.bufs.taken();
            let len = result.max(0) as u32;
            if len == 0 || s.conn.is_none() {
                self.bufs.give_back(bid);
            } else {
                socket_io(&mut s.io, &mut self.spare_ios).held.push(Held {
                    bid,
                    from: 0,
                    to: len,
                });
            }
        }
        match result {
            0 => s.set(Flag::Eof, true),
            // The buffer ring ran dry: the bytes wait in the socket until buffers come back.
            r if r == -libc::ENOBUFS => {
                if !s.is(Flag::RecvArmed) && !s.is(Flag::Starved) {
                    s.set(Flag::Starved, true);
                    self.starved.push_back(slot);
                }
                self.ran_dry = true;
                shard.borrow().count_recv_buffers_exhausted();
            }
            // We stopped it: re-armed in `after_op` when the connection reads again.
            r if r == -libc::ECANCELED => {}
            r if r < 0 => s.set(Flag::Failed, true),
            _ => {}
        }
        let held = s.io.as_ref().map_or(0, |io| io.held.len());
        if s.is(Flag::RecvArmed)
            && (held >= HELD_BUFFERS_MAX || s.unread() >= HELD_BUFFERS_MAX * RECV_BUFFER_BYTES)
        {
            // The connection is not taking its input: stop receiving (TCP pushes back).
            self.cancel_recv(slot);
        }
        if result != -libc::ENOBUFS && result != -libc::ECANCELED {
            self.poll(shard, slot);
        }
        self.after_op(shard, slot);
    }

    fn on_send(&mut self, shard: &RefCell<Shard>, slot: usize, result: i32) {
        let s = &mut self.slots[slot];
        s.ops_in_kernel -= 1;
        s.set(Flag::SendInKernel, false);
        let sio = socket_io(&mut s.io, &mut self.spare_ios);
        let mut more_to_send = false;
        if result < 0 {
            sio.sending.clear();
            sio.sent = 0;
            sio.staged.clear();
            s.set(Flag::Failed, true);
        } else {
            sio.sent += result as u32;
            if sio.sent as usize == sio.sending.len() {
                sio.sending.clear();
                sio.sent = 0;
                std::mem::swap(&mut sio.sending, &mut sio.staged);
            }
            more_to_send = !sio.sending.is_empty();
        }
        if more_to_send && !s.is(Flag::SendQueued) {
            s.set(Flag::SendQueued, true);
            self.to_send.push(slot); // a short write: the rest goes in the next turn
        }
        let drained = self.slots[slot].unsent() == 0;
        self.settle(slot);
        let s = &mut self.slots[slot];
        if (drained && s.is(Flag::RepollWhenSent)) || s.is(Flag::Failed) {
            s.set(Flag::RepollWhenSent, false);
            if let Some(conn) = s.conn() {
                self.repoll.push_back(conn);
            }
        }
        self.after_op(shard, slot);
    }

    /// A socket with no bytes in transit gives its `SocketIo` back to the pool, and the send
    /// buffers in it to theirs: an idle socket keeps neither.
    fn settle(&mut self, slot: usize) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.unsent() > 0 || s.unread() > 0 {
            return;
        }
        let Some(mut sio) = s.io.take() else {
            return;
        };
        for buf in [
            std::mem::take(&mut sio.sending),
            std::mem::take(&mut sio.staged),
        ] {
            let cap = buf.capacity();
            if cap > 0 && cap <= SPARE_SEND_BYTES_MAX && self.spare_sends.len() < SPARE_SENDS_MAX {
                self.spare_sends.push(buf);
            }
        }
        if self.spare_ios.len() < SPARE_IOS_MAX {
            sio.sent = 0;
            sio.spilled = Vec::new();
            sio.held = SmallVec::new();
            self.spare_ios.push(sio);
        }
    }

    /// Poll the connection of `slot`: it reads what the socket holds and writes what it has.
    fn poll(&mut self, shard: &RefCell<Shard>, slot: usize) {
        let Some(conn) = self.slots[slot].conn() else {
            return; // the connection is gone; the socket waits for its operations to end
        };
        let max_staged = shard.borrow().cfg().max_outbound;
        self.flag.0.store(false, Ordering::Relaxed);
        let mut cx = Context::from_waker(&self.waker);
        let mut socket = RingSocket {
            slot: &mut self.slots[slot],
            bufs: &mut self.bufs,
            spare_sends: &mut self.spare_sends,
            spare_ios: &mut self.spare_ios,
            max_staged,
        };
        let outcome = shard.borrow_mut().poll_conn(conn, &mut socket, &mut cx);
        let s = &mut self.slots[slot];
        let staged = s.io.as_ref().is_some_and(|io| !io.staged.is_empty());
        if staged && !s.is(Flag::SendInKernel) && !s.is(Flag::SendQueued) {
            s.set(Flag::SendQueued, true);
            self.to_send.push(slot);
        }
        self.settle(slot);
        match outcome {
            ConnPoll::Pending { .. } => {
                if self.flag.0.load(Ordering::Relaxed) {
                    self.repoll.push_back(conn);
                }
                if self.slots[slot].may_receive() {
                    self.after_op(shard, slot); // a stopped receive starts again
                }
            }
            ConnPoll::Close => self.close(slot),
            ConnPoll::Handoff { to } => self.start_handoff(slot, to),
        }
    }

    /// The connection is gone: the socket closes once its staged bytes are out (our close
    /// frame) and the kernel holds none of its operations.
    fn close(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if let Some(conn) = s.conn() {
            s.conn = None;
            self.slot_of[conn] = None;
        }
        let failed = s.is(Flag::Failed);
        if let Some(sio) = s.io.as_deref_mut() {
            for held in sio.held.drain(..) {
                self.bufs.give_back(held.bid);
            }
            sio.spilled = Vec::new();
            if failed {
                sio.staged.clear(); // (a send in the kernel keeps `sending` until it ends)
            }
        }
        if s.is(Flag::Failed) || s.unsent() == 0 {
            self.cancel_ops(slot);
        } else {
            s.set(Flag::CloseWhenSent, true);
        }
        self.settle(slot);
        self.free_if_done(slot);
    }

    /// Cancel the socket's operations in the kernel, each by its user data: the kernel finds
    /// those in a hash, while a cancel by descriptor walks every operation of the ring (a wave
    /// of 19,000 closes on one shard cost 390-510 ms of CPU that way).
    fn cancel_ops(&mut self, slot: usize) {
        let s = &self.slots[slot];
        let ops = [
            (s.is(Flag::RecvArmed), OP_RECV),
            (s.is(Flag::SendInKernel), OP_SEND),
        ];
        for (in_kernel, op) in ops {
            if in_kernel {
                let cancel =
                    opcode::AsyncCancel2::new(types::CancelBuilder::user_data(user_data(slot, op)))
                        .build()
                        .user_data(user_data(slot, OP_CANCEL));
                self.push(cancel);
            }
        }
    }

    /// The connection's user lives on shard `to`: stop receiving (what arrives until the
    /// receive ends is still fed to the connection), then hand the socket over.
    fn start_handoff(&mut self, slot: usize, to: usize) {
        let s = &mut self.slots[slot];
        if s.handoff_to.is_some() {
            return;
        }
        s.handoff_to = Some(u16::try_from(to).expect("at most 1024 shards (config)"));
        if s.is(Flag::RecvArmed) {
            self.cancel_recv(slot);
        }
    }

    fn cancel_recv(&mut self, slot: usize) {
        let cancel =
            opcode::AsyncCancel2::new(types::CancelBuilder::user_data(user_data(slot, OP_RECV)))
                .build()
                .user_data(user_data(slot, OP_CANCEL));
        self.push(cancel);
    }

    /// After an operation of `slot` completed: finish a hand-off or a deferred close, re-arm
    /// a receive the kernel ended, free the slot once nothing refers to it.
    fn after_op(&mut self, shard: &RefCell<Shard>, slot: usize) {
        let Some(s) = self.slots.get_mut(slot) else {
            return; // freed by the poll that handled the completion
        };
        if let (Some(to), Some(conn)) = (s.handoff_to, s.conn()) {
            let to = to as usize;
            if s.ops_in_kernel == 0 && s.unsent() == 0 && s.unread() == 0 {
                // The shard sends a duplicate (and keeps the connection if the mesh is full).
                let moved = super::park::dup(s.raw_fd())
                    .map(|fd| shard.borrow_mut().handoff(conn, to, fd))
                    .unwrap_or(false);
                let s = &mut self.slots[slot];
                s.handoff_to = None;
                if moved {
                    s.conn = None;
                    self.slot_of[conn] = None;
                } else {
                    self.repoll.push_back(conn); // it is told to reconnect (1013)
                }
            }
        }
        let s = &mut self.slots[slot];
        if s.is(Flag::CloseWhenSent) && s.unsent() == 0 {
            s.set(Flag::CloseWhenSent, false);
            self.cancel_ops(slot);
        }
        let s = &self.slots[slot];
        if !s.is(Flag::Starved) && s.may_receive() {
            self.arm_recv(slot);
        }
        self.free_if_done(slot);
    }

    /// The ring ran dry: connections that are not reading (output over their bound) copy
    /// the buffers they hold and give them back, so slow readers can never keep the ring
    /// empty for everyone else. Each keeps at most `HELD_BUFFERS_MAX` buffers' worth (then
    /// its receive stops).
    fn spill_held(&mut self) {
        for (_, s) in self.slots.iter_mut() {
            let Some(sio) = s.io.as_deref_mut() else {
                continue;
            };
            for held in sio.held.drain(..) {
                sio.spilled.extend_from_slice(self.bufs.bytes(&held));
                self.bufs.give_back(held.bid);
            }
            sio.held = SmallVec::new();
        }
    }

    /// Re-arm the receives that ended with ENOBUFS, oldest first, as many as the kernel has
    /// buffers again (given back by connections that read). One that loses the race ends with
    /// ENOBUFS again and waits for the next buffers: never re-armed into an empty ring.
    fn rearm_starved(&mut self) {
        let mut free = self.bufs.in_kernel;
        while free > 0 {
            let Some(slot) = self.starved.pop_front() else {
                return;
            };
            // A slot freed (and maybe reused) since is no longer marked starved.
            let Some(s) = self.slots.get_mut(slot).filter(|s| s.is(Flag::Starved)) else {
                continue;
            };
            s.set(Flag::Starved, false);
            if s.may_receive() {
                self.arm_recv(slot);
                free -= 1;
            }
        }
    }

    fn free_if_done(&mut self, slot: usize) {
        let s = &self.slots[slot];
        if s.conn.is_none() && s.ops_in_kernel == 0 && !s.is(Flag::CloseWhenSent) {
            let fixed = s.is(Flag::Fixed);
            self.slots.remove(slot); // drops (closes) the descriptor
            if fixed {
                // The table's reference would keep the socket open: drop it too.
                let close = opcode::Close::new(types::Fixed(slot as u32))
                    .build()
                    .user_data(user_data(slot, OP_CLOSE_FIXED));
                self.push(close);
                self.fixed_close_queued = true;
            }
        }
    }

    fn queue_send(&mut self, slot: usize) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        s.set(Flag::SendQueued, false);
        if s.is(Flag::SendInKernel) || s.is(Flag::Failed) {
            return;
        }
        let (fixed, fd) = (s.fixed_index(slot), s.raw_fd());
        let Some(sio) = s.io.as_deref_mut() else {
            return;
        };
        if sio.sending.is_empty() {
            std::mem::swap(&mut sio.sending, &mut sio.staged);
            sio.sent = 0;
        }
        if sio.sending.is_empty() {
            return;
        }
        let rest = &sio.sending[sio.sent as usize..];
        let send = on_socket!(fixed, fd, |t| {
            opcode::Send::new(t, rest.as_ptr(), rest.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        })
        .user_data(user_data(slot, OP_SEND));
        s.set(Flag::SendInKernel, true);
        s.ops_in_kernel += 1;
        self.push(send);
    }
}

/// The kernel's head of the provided buffer ring (`IORING_REGISTER_PBUF_STATUS`, Linux 6.8),
/// or None when the kernel does not say.
fn buf_ring_head(ring: &IoUring) -> Option<u16> {
    #[repr(C)]
    struct BufStatus {
        buf_group: u32,
        head: u32,
        resv: [u32; 8],
    }
    const IORING_REGISTER_PBUF_STATUS: libc::c_long = 26;
    let mut status = BufStatus {
        buf_group: BUFFER_GROUP as u32,
        head: 0,
        resv: [0; 8],
    };
    // SAFETY: the register call reads and writes the struct given, of the kernel's layout.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            IORING_REGISTER_PBUF_STATUS,
            &mut status as *mut BufStatus,
            1,
        )
    };
    (rc == 0).then_some(status.head as u16)
}

/// Register a sparse fixed file table for the ring's sockets, as large as the open-files limit
/// allows (up to `FIXED_FILES_MAX`); its size, or 0 when the kernel refuses one.
fn fixed_file_table(ring: &IoUring) -> u32 {
    let nofile = crate::preflight::open_files_soft().unwrap_or(1024);
    let size = nofile.min(FIXED_FILES_MAX as u64) as u32;
    match ring.submitter().register_files_sparse(size) {
        Ok(()) => size,
        Err(e) => {
            tracing::warn!(error = %e, size, "no fixed file table; sockets are used by descriptor");
            0
        }
    }
}

/// Longest wait at teardown for the kernel to end the ring's operations.
const TEARDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Driver {
    /// Operations the kernel still holds (each ends with a completion without `MORE`).
    fn ops_in_kernel(&self) -> usize {
        let sockets: usize = self
            .slots
            .iter()
            .map(|(_, s)| s.ops_in_kernel as usize)
            .sum();
        sockets + self.accept_armed as usize + self.bells_armed
    }

    /// Cancel every operation and reap until none is left, so that no receive can land in
    /// a buffer, nor a send read one, after it is freed. True when all ended in time.
    fn end_all_operations(&mut self) -> bool {
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any().all())
            .build()
            .user_data(user_data(0, OP_CANCEL));
        self.push(cancel);
        let deadline = std::time::Instant::now() + TEARDOWN_WAIT;
        while self.ops_in_kernel() > 0 && std::time::Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            let ended: Vec<(u64, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.flags()))
                .collect();
            for (data, flags) in ended {
                let slot = (data >> 8) as usize;
                // Multishot operations end with a completion without `MORE`; a send always.
                match (data & 0xff, cqueue::more(flags)) {
                    (OP_ACCEPT, false) => self.accept_armed = false,
                    (OP_BELL, false) => self.bells_armed -= 1,
                    (OP_RECV, false) | (OP_SEND, _) => {
                        if let Some(s) = self.slots.get_mut(slot) {
                            s.ops_in_kernel = s.ops_in_kernel.saturating_sub(1);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.ops_in_kernel() == 0
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.end_all_operations() {
            // Nothing refers to the buffer ring or the file table any more: unregister them
            // (the buffers before they are unmapped).
            let _ = self.ring.submitter().unregister_files();
            let _ = self.ring.submitter().unregister_buf_ring(BUFFER_GROUP);
            return;
        }
        // The kernel may still write into the receive buffers or read send buffers: leak
        // them (and the sockets) rather than free memory it can touch.
        tracing::error!(
            left = self.ops_in_kernel(),
            "io_uring operations did not end at teardown; their buffers are leaked"
        );
        let bufs = std::mem::replace(&mut self.bufs, BufRing::empty());
        std::mem::forget(bufs);
        std::mem::forget(std::mem::take(&mut self.slots));
    }
}

/// The peer address of `fd` as the per-address limits key it (0 when unknown).
fn peer_ip_key(fd: RawFd) -> crate::limit::ip::IpKey {
    let socket = std::mem::ManuallyDrop::new(
        // SAFETY: borrowed for one getpeername; ManuallyDrop keeps it from being closed.
        unsafe { socket2::Socket::from_raw_fd(fd) },
    );
    socket
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or(0, |a| crate::limit::ip::ip_key(a.ip()))
}

#[cfg(test)]
mod tests {
    /// What the driver keeps per idle socket in user space: its slab cell (the connection's
    /// own state is the shard's) and its `slot_of` entry. Printed for the memory breakdown
    /// in docs/performance.md; bounded so that it does not grow unnoticed.
    #[test]
    fn an_idle_socket_slot_stays_small() {
        let cell = std::mem::size_of::<slab::Slab<super::SocketSlot>>(); // the slab header
        let slot = std::mem::size_of::<Result<super::SocketSlot, usize>>();
        let index = std::mem::size_of::<Option<std::num::NonZeroU32>>();
        eprintln!(
            "socket slot {slot} B (SocketSlot {} B), slot_of entry {index} B, slab header {cell} B",
            std::mem::size_of::<super::SocketSlot>()
        );
        let busy = std::mem::size_of::<super::SocketIo>();
        eprintln!("while busy (pooled, not per idle socket): SocketIo {busy} B");
        assert!(slot + index <= 28, "{slot} + {index}");
    }

    /// A bell whose multishot poll the kernel ended (here: cancelled, as an overflow would end
    /// it) is polled again, so a later ring still reaches the shard (a shard that stops
    /// hearing its bells never answers Redis' replies or other shards again).
    #[test]
    fn a_bell_whose_poll_ended_is_polled_again() {
        use super::{opcode, user_data, Driver, Settings, OP_BELL, OP_CANCEL};
        use std::io::Write;
        use std::os::fd::AsRawFd;
        if let Some(why) = super::unsupported_because(64) {
            panic!("this kernel cannot run the uring driver ({why}): the test needs it");
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut ring_it, bell) = std::os::unix::net::UnixStream::pair().unwrap();
        bell.set_nonblocking(true).unwrap();
        let settings = Settings {
            recv_buffers: 64,
            batch_wait_us: 0,
            sockets: 4,
        };
        let mut driver = Driver::new(listener.into(), &[bell.as_raw_fd()], settings).unwrap();
        let cfg = crate::config::ConfigLayer::default().resolve().unwrap();
        let shard = std::cell::RefCell::new(crate::shard::Shard::new(
            0,
            crate::shard::Shared::new(cfg),
            std::sync::Arc::new(crate::metrics::ShardMetrics::default()),
            Box::new(crate::clock::ManualClock::new(1_000)),
        ));
        // Turns until one hears the bell (bounded: each waits at most 100 ms).
        let hears_bell = |driver: &mut Driver| {
            (0..20).any(|_| {
                driver.wait(100);
                driver.turn(&shard).bell_rang
            })
        };
        ring_it.write_all(b"x").unwrap();
        assert!(
            hears_bell(&mut driver),
            "the bell is heard while its poll runs"
        );
        let mut drain = [0u8; 8];
        while std::io::Read::read(&mut &bell, &mut drain).is_ok() {}
        // End the poll: its last completion (no `MORE`) comes in the next turns.
        let cancel = opcode::AsyncCancel::new(user_data(0, OP_BELL))
            .build()
            .user_data(user_data(0, OP_CANCEL));
        driver.push(cancel);
        assert!(hears_bell(&mut driver), "the poll's end is a completion");
        ring_it.write_all(b"x").unwrap();
        assert!(
            hears_bell(&mut driver),
            "a ring after the poll ended is heard"
        );
    }

    /// Each flag is its own bit: setting or clearing one leaves the others as they were.
    #[test]
    fn a_socket_slot_flag_changes_only_itself() {
        use super::Flag::*;
        let all = [
            Fixed,
            RecvArmed,
            SendInKernel,
            SendQueued,
            Starved,
            Eof,
            Failed,
            RepollWhenSent,
            CloseWhenSent,
        ];
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        let mut slot = super::SocketSlot::new(a.into(), 0);
        for (i, &flag) in all.iter().enumerate() {
            slot.set(flag, true);
            for (j, &other) in all.iter().enumerate() {
                assert_eq!(slot.is(other), j <= i, "after setting flag {i}, flag {j}");
            }
        }
        for (i, &flag) in all.iter().enumerate() {
            slot.set(flag, false);
            for (j, &other) in all.iter().enumerate() {
                assert_eq!(slot.is(other), j > i, "after clearing flag {i}, flag {j}");
            }
        }
    }
}
