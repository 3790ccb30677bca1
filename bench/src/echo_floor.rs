//! `ringgate-bench echo-floor`: the least server work the `/echo` benchmark's frames need, so
//! that bench/echo_vs_uws.sh can tell what the kernel allows from what a server costs (the
//! echo's counterpart of `upgrade-floor`). One thread, one of two loops:
//! - `--io epoll`: uWebSockets' pattern and nothing else. Level-triggered epoll; per readable
//!   socket one `recv` into a buffer shared by all sockets, its frames echoed into one `send`.
//! - `--io uring`: ringgate's uring driver's pattern and nothing else. Its ring flags (single
//!   issuer, deferred task run), registered files, one multishot accept, one multishot receive
//!   per socket from a provided buffer ring (1,024 x 4 KiB, its default), and one send per
//!   socket per batch of completions, submitted with the next wait; with `--batch-wait-us`,
//!   the driver's batch wait after a busy batch.
//!
//! Frames: masked client frames of up to 65,535 bytes, each echoed unmasked as one frame with
//! the opcode it came with; a close frame (or a 64-bit length, or an unmasked frame) closes the
//! socket. No UTF-8 check, no fragments, no routes, no auth: whatever CPU per message it
//! spends is the kernel's moving of the bytes, its loop's system calls, and a few dozen
//! instructions per frame.

use std::alloc::Layout;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use clap::{Args, ValueEnum};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;

use crate::engine::INTERRUPTED;
use crate::upgrade_floor::{read_head, Head, BAD_REQUEST};

#[derive(Args, Debug)]
pub struct EchoFloorArgs {
    /// Address to listen on (loopback only)
    #[arg(long, default_value = "127.0.0.1:9003")]
    listen: String,
    /// The loop: `epoll` (uWebSockets' system calls) or `uring` (ringgate's uring driver's)
    #[arg(long, value_enum, default_value_t = FloorIo::Uring)]
    io: FloorIo,
    /// Sockets held at most; more are closed as they are accepted
    #[arg(long, default_value_t = 4096)]
    max_conns: usize,
    /// `--io uring`: after a busy batch (4 completions or more), wait for 64 completions or
    /// this many microseconds once one is there (the uring driver's `uring_batch_wait_us`,
    /// Linux 6.12's minimum wait); 0 = return at the first completion
    #[arg(long, default_value_t = 0)]
    batch_wait_us: u32,
    /// `--io uring`: buffers in the provided ring, 4 KiB each (a power of two; the uring
    /// driver's default is 1,024: the ring then cycles through 4 MiB, so a receive may land in
    /// a buffer no longer in cache)
    #[arg(long, default_value_t = 1024)]
    recv_buffers: u16,
}

/// What both loops are told.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub max_conns: usize,
    pub batch_wait_us: u32,
    pub recv_buffers: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FloorIo {
    Epoll,
    Uring,
}

pub fn run(a: EchoFloorArgs) -> Result<i32, String> {
    let addr: SocketAddr = a
        .listen
        .parse()
        .map_err(|e| format!("--listen {}: {e}", a.listen))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr}: only loopback addresses are load targets"));
    }
    crate::upgrade_floor::install_stop_signals();
    if !a.recv_buffers.is_power_of_two() || a.recv_buffers > 32_768 {
        return Err("--recv-buffers: a power of two up to 32768".into());
    }
    let listener = TcpListener::bind(addr).map_err(|e| format!("{addr}: {e}"))?;
    let limits = Limits {
        max_conns: a.max_conns,
        batch_wait_us: a.batch_wait_us,
        recv_buffers: a.recv_buffers,
    };
    let echoed = match a.io {
        FloorIo::Epoll => serve_epoll(listener, limits, &INTERRUPTED),
        FloorIo::Uring => serve_uring(listener, limits, &INTERRUPTED),
    }
    .map_err(|e| format!("echo-floor: {e}"))?;
    eprintln!("echo-floor: {echoed} frames echoed");
    Ok(0)
}

/// Echo every whole frame at the front of `input` into `out`. Returns the bytes taken (a frame
/// cut by the read's end stays for the next read), or None to close the socket.
pub(crate) fn echo_frames(input: &[u8], out: &mut Vec<u8>, echoed: &mut u64) -> Option<usize> {
    let mut at = 0;
    loop {
        let rest = &input[at..];
        if rest.len() < 2 {
            return Some(at);
        }
        let (first, second) = (rest[0], rest[1]);
        if second & 0x80 == 0 || first & 0x0f == 0x8 {
            return None; // unmasked (RFC 6455 5.1), or a close
        }
        let (len, head) = match second & 0x7f {
            127 => return None,
            126 if rest.len() < 4 => return Some(at),
            126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            short => (short as usize, 2),
        };
        let Some(frame) = rest.get(..head + 4 + len) else {
            return Some(at);
        };
        let mask: [u8; 4] = frame[head..head + 4].try_into().unwrap();
        out.push(first);
        match len < 126 {
            true => out.push(len as u8),
            false => {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
        }
        let start = out.len();
        out.extend_from_slice(&frame[head + 4..]);
        ringgate::ws::frame::unmask(&mut out[start..], mask);
        *echoed += 1;
        at += frame.len();
    }
}

/// One socket's protocol state: its request head until the 101, then its frames.
#[derive(Default)]
struct Peer {
    upgraded: bool,
    /// The head read so far, or the start of a frame the last read cut.
    pending: Vec<u8>,
}

impl Peer {
    /// Take bytes read; what to send is added to `out`. Returns false to close the socket
    /// (after `out` is sent).
    fn take(&mut self, bytes: &[u8], out: &mut Vec<u8>, echoed: &mut u64) -> bool {
        if self.upgraded && self.pending.is_empty() {
            // The common case: whole frames, nothing carried over, nothing copied.
            let Some(taken) = echo_frames(bytes, out, echoed) else {
                return false;
            };
            self.pending.extend_from_slice(&bytes[taken..]);
            return true;
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(bytes);
        let mut start = 0;
        if !self.upgraded {
            match read_head(&pending) {
                Head::Incomplete => {
                    self.pending = pending;
                    return true;
                }
                Head::Bad => {
                    out.extend_from_slice(BAD_REQUEST);
                    return false;
                }
                Head::Upgrade { len, response } => {
                    out.extend_from_slice(response.as_bytes());
                    self.upgraded = true;
                    start = len;
                }
            }
        }
        let Some(taken) = echo_frames(&pending[start..], out, echoed) else {
            return false;
        };
        pending.drain(..start + taken);
        self.pending = pending;
        true
    }
}

const LISTENER: u64 = u64::MAX;

struct EpollConn {
    stream: TcpStream,
    peer: Peer,
    /// Echoes the socket did not take yet; EPOLLOUT is asked for while there are some.
    out: Vec<u8>,
    /// A close frame (or a bad head) came: nothing more is read, and the socket closes once
    /// what was gathered before it is sent.
    closing: bool,
}

/// The epoll loop (see the module doc). Returns the frames echoed once `stop` is set.
pub(crate) fn serve_epoll(
    listener: TcpListener,
    limits: Limits,
    stop: &AtomicBool,
) -> io::Result<u64> {
    listener.set_nonblocking(true)?;
    // SAFETY: plain system calls; every descriptor passed is open.
    let ep = unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
    epoll_ctl(
        &ep,
        libc::EPOLL_CTL_ADD,
        listener.as_raw_fd(),
        libc::EPOLLIN,
        LISTENER,
    )?;
    let mut conns: Slab<EpollConn> = Slab::new();
    let mut scratch = vec![0u8; 64 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut echoed = 0u64;
    eprintln!(
        "echo-floor: epoll loop listening on {}",
        listener.local_addr()?
    );
    while !stop.load(Relaxed) {
        // SAFETY: `events` is valid for its length.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), 256, 100) };
        if n < 0 {
            match io::Error::last_os_error() {
                e if e.kind() == ErrorKind::Interrupted => continue,
                e => return Err(e),
            }
        }
        for event in &events[..n as usize] {
            let (key, ready) = (event.u64, event.events as i32);
            if key == LISTENER {
                while let Ok((stream, _)) = listener.accept() {
                    if conns.len() >= limits.max_conns || stream.set_nonblocking(true).is_err() {
                        continue; // closed as it drops
                    }
                    let _ = stream.set_nodelay(true);
                    let (fd, entry) = (stream.as_raw_fd(), conns.vacant_entry());
                    if epoll_ctl(
                        &ep,
                        libc::EPOLL_CTL_ADD,
                        fd,
                        libc::EPOLLIN,
                        entry.key() as u64,
                    )
                    .is_ok()
                    {
                        entry.insert(EpollConn {
                            stream,
                            peer: Peer::default(),
                            out: Vec::new(),
                            closing: false,
                        });
                    }
                }
                continue;
            }
            let Some(conn) = conns.get_mut(key as usize) else {
                continue;
            };
            let was_waiting = !conn.out.is_empty();
            let mut open = true;
            if !conn.closing && ready & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
                match conn.stream.read(&mut scratch) {
                    Ok(0) => open = false,
                    Ok(n) => {
                        conn.closing = !conn.peer.take(&scratch[..n], &mut conn.out, &mut echoed)
                    }
                    Err(e) => {
                        open = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
                    }
                }
            }
            // One write, as uWebSockets does: what the socket does not take waits for EPOLLOUT.
            if !conn.out.is_empty() {
                match conn.stream.write(&conn.out) {
                    Ok(n) => drop(conn.out.drain(..n)),
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(_) => open = false,
                }
            }
            if !open || (conn.closing && conn.out.is_empty()) {
                let conn = conns.remove(key as usize);
                let _ = epoll_ctl(&ep, libc::EPOLL_CTL_DEL, conn.stream.as_raw_fd(), 0, 0);
            } else if conn.closing || was_waiting == conn.out.is_empty() {
                // Echoes began or stopped waiting for the socket: ask for EPOLLOUT only then
                // (and only for it while closing).
                let interest = match (conn.closing, conn.out.is_empty()) {
                    (true, _) => libc::EPOLLOUT,
                    (false, true) => libc::EPOLLIN,
                    (false, false) => libc::EPOLLIN | libc::EPOLLOUT,
                };
                epoll_ctl(
                    &ep,
                    libc::EPOLL_CTL_MOD,
                    conn.stream.as_raw_fd(),
                    interest,
                    key,
                )?;
            }
        }
    }
    Ok(echoed)
}

fn epoll_ctl(ep: &OwnedFd, op: i32, fd: RawFd, interest: i32, key: u64) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: interest as u32,
        u64: key,
    };
    // SAFETY: both descriptors are open; `event` outlives the call.
    check(unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut event) }).map(drop)
}

fn check(result: i32) -> io::Result<i32> {
    match result {
        r if r < 0 => Err(io::Error::last_os_error()),
        r => Ok(r),
    }
}

const RING_ENTRIES: u32 = 4096;
const BUFFER_BYTES: usize = 4096;
const GROUP: u16 = 0;
const OP_ACCEPT: u64 = 0;
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;

struct UringConn {
    stream: TcpStream,
    peer: Peer,
    /// Echoes gathered since the last send was submitted.
    out: Vec<u8>,
    /// The send the kernel has: its bytes stay put until its completion; `sent` of them went.
    in_kernel: Vec<u8>,
    sent: usize,
    receiving: bool,
    /// The peer closed, failed or sent a close: what is gathered goes, then the socket
    /// closes once nothing of it is in the kernel.
    done: bool,
}

impl UringConn {
    /// Hand what is gathered to the kernel, unless a send is out already.
    fn start_send(&mut self, ring: &mut IoUring, slot: usize) {
        if self.in_kernel.is_empty() && !self.out.is_empty() {
            std::mem::swap(&mut self.in_kernel, &mut self.out);
            self.sent = 0;
            push(ring, send(slot, &self.in_kernel));
        }
    }
}

/// The provided buffer ring: the kernel picks a buffer per receive, the loop gives it back as
/// soon as the frames in it are echoed.
struct Buffers {
    count: u16,
    entries: *mut types::BufRingEntry,
    bytes: Box<[u8]>,
    tail: u16,
}

impl Buffers {
    fn new(ring: &IoUring, count: u16) -> io::Result<Self> {
        let entries_len = count as usize * std::mem::size_of::<types::BufRingEntry>();
        // The kernel wants the entries page aligned.
        let layout = Layout::from_size_align(entries_len, 4096).unwrap();
        // SAFETY: a layout of non-zero size; checked for failure.
        let map = unsafe { std::alloc::alloc_zeroed(layout) };
        if map.is_null() {
            return Err(io::Error::from(ErrorKind::OutOfMemory));
        }
        let mut buffers = Buffers {
            count,
            entries: map.cast(),
            bytes: vec![0u8; count as usize * BUFFER_BYTES].into_boxed_slice(),
            tail: 0,
        };
        // SAFETY: the entries are page aligned and `count` long; they and the buffers are
        // never freed while the ring may use them (`serve_uring` leaks them after the ring).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(map as u64, count, GROUP, 0)?
        };
        (0..count).for_each(|bid| buffers.give_back(bid));
        Ok(buffers)
    }

    fn filled(&self, bid: u16, len: usize) -> &[u8] {
        &self.bytes[bid as usize * BUFFER_BYTES..][..len]
    }

    fn give_back(&mut self, bid: u16) {
        let index = (self.tail & (self.count - 1)) as usize;
        // SAFETY: the index is masked into the entries, past the tail the kernel reads to.
        let entry = unsafe { &mut *self.entries.add(index) };
        entry.set_addr(self.bytes.as_ptr() as u64 + (bid as usize * BUFFER_BYTES) as u64);
        entry.set_len(BUFFER_BYTES as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail overlays entry 0's reserved field, as the kernel defines it.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

/// The io_uring loop (see the module doc). Returns the frames echoed once `stop` is set.
pub(crate) fn serve_uring(
    listener: TcpListener,
    limits: Limits,
    stop: &AtomicBool,
) -> io::Result<u64> {
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(RING_ENTRIES * 2)
        .build(RING_ENTRIES)?;
    let mut buffers = Buffers::new(&ring, limits.recv_buffers)?;
    let mut conns: Slab<UringConn> = Slab::new();
    let served = uring_loop(&mut ring, &mut buffers, &mut conns, &listener, limits, stop);
    // The kernel may still hold receives into the buffers and sends from the connections'
    // bytes until the ring is gone (its teardown is asynchronous): both are leaked, not freed.
    drop(ring);
    std::mem::forget(buffers);
    std::mem::forget(conns);
    served
}

fn uring_loop(
    ring: &mut IoUring,
    buffers: &mut Buffers,
    conns: &mut Slab<UringConn>,
    listener: &TcpListener,
    limits: Limits,
    stop: &AtomicBool,
) -> io::Result<u64> {
    ring.submitter()
        .register_files_sparse(limits.max_conns as u32)?;
    // Linux 6.12's minimum wait; without it, every wait returns at the first completion.
    let batch_wait_us = match ring.params().is_feature_min_timeout() {
        true => limits.batch_wait_us,
        false => 0,
    };
    let (mut to_send, mut to_close) = (Vec::new(), Vec::new());
    let mut completions: Vec<(u64, i32, u32)> = Vec::new();
    let (mut echoed, mut busy) = (0u64, false);
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .build()
        .user_data(OP_ACCEPT);
    push(ring, accept.clone());
    eprintln!(
        "echo-floor: uring loop listening on {}",
        listener.local_addr()?
    );
    while !stop.load(Relaxed) {
        let ts = types::Timespec::new().nsec(100_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let (want, args) = match batch_wait_us {
            us if us > 0 && busy => (64, args.min_wait_usec(us)),
            _ => (1, args),
        };
        match ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        completions.clear();
        completions.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        busy = completions.len() >= 4;
        for &(user_data, result, flags) in &completions {
            let (slot, op) = ((user_data >> 2) as usize, user_data & 3);
            match op {
                OP_ACCEPT => {
                    if !cqueue::more(flags) {
                        if result < 0 {
                            // Out of descriptors, say: not a spin on accept.
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                        push(ring, accept.clone());
                    }
                    if result < 0 {
                        continue;
                    }
                    // SAFETY: a completed accept's result is a descriptor nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(result) };
                    let entry = conns.vacant_entry();
                    let slot = entry.key();
                    if slot >= limits.max_conns
                        || (ring.submitter())
                            .register_files_update(slot as u32, &[result])
                            .is_err()
                    {
                        continue; // closed as it drops
                    }
                    let stream = TcpStream::from(fd);
                    let _ = stream.set_nodelay(true);
                    entry.insert(UringConn {
                        stream,
                        peer: Peer::default(),
                        out: Vec::new(),
                        in_kernel: Vec::new(),
                        sent: 0,
                        receiving: true,
                        done: false,
                    });
                    push(ring, receive(slot));
                }
                OP_RECV => {
                    let conn = &mut conns[slot];
                    if !cqueue::more(flags) {
                        conn.receiving = false;
                    }
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        let bytes = buffers.filled(bid, result.max(0) as usize);
                        if !conn.done && !conn.peer.take(bytes, &mut conn.out, &mut echoed) {
                            conn.done = true;
                        }
                        buffers.give_back(bid);
                    }
                    if result <= 0 && result != -libc::ENOBUFS {
                        conn.done = true;
                    }
                    // The receive ended without an end of stream: the buffer ring ran dry
                    // (every buffer is back already) or the completion queue was full.
                    if !conn.receiving && !conn.done {
                        conn.receiving = true;
                        push(ring, receive(slot));
                    }
                    if conn.done {
                        to_close.push(slot);
                    }
                    if !conn.out.is_empty() {
                        to_send.push(slot);
                    }
                }
                _ => {
                    let conn = &mut conns[slot];
                    if result <= 0 {
                        conn.in_kernel.clear();
                        conn.done = true;
                        to_close.push(slot);
                        continue;
                    }
                    conn.sent += result as usize;
                    if conn.sent < conn.in_kernel.len() {
                        push(ring, send(slot, &conn.in_kernel[conn.sent..]));
                        continue;
                    }
                    conn.in_kernel.clear();
                    match conn.done {
                        true => to_close.push(slot),
                        false => to_send.push(slot),
                    }
                }
            }
        }
        // One send per socket for everything this batch of completions echoed on it.
        for slot in to_send.drain(..) {
            if let Some(conn) = conns.get_mut(slot) {
                conn.start_send(ring, slot);
            }
        }
        for slot in to_close.drain(..) {
            let Some(conn) = conns.get_mut(slot) else {
                continue;
            };
            conn.start_send(ring, slot); // the last echoes (or the 400) go first
            if conn.receiving {
                // Ends the receive (an end of stream): closed once its completion is in.
                let _ = conn.stream.shutdown(std::net::Shutdown::Read);
            } else if conn.in_kernel.is_empty() {
                let _ = ring.submitter().register_files_update(slot as u32, &[-1]);
                conns.remove(slot);
            }
        }
    }
    Ok(echoed)
}

fn receive(slot: usize) -> squeue::Entry {
    opcode::RecvMulti::new(types::Fixed(slot as u32), GROUP)
        .build()
        .user_data((slot as u64) << 2 | OP_RECV)
}

fn send(slot: usize, bytes: &[u8]) -> squeue::Entry {
    opcode::Send::new(
        types::Fixed(slot as u32),
        bytes.as_ptr(),
        bytes.len() as u32,
    )
    .flags(libc::MSG_NOSIGNAL)
    .build()
    .user_data((slot as u64) << 2 | OP_SEND)
}

/// Queue a submission, submitting what is queued first when the queue is full.
fn push(ring: &mut IoUring, entry: squeue::Entry) {
    // SAFETY: every entry's buffers (the send's bytes, the provided ring) outlive it: a send's
    // bytes stay in `in_kernel` until its completion, and both are leaked, never freed, while
    // the ring lives (`serve_uring`).
    while unsafe { ring.submission().push(&entry) }.is_err() {
        let _ = ring.submit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    /// A client frame as RFC 6455 5.2 has it: FIN text, masked, 7- or 16-bit length.
    fn client_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![0x81];
        match payload.len() < 126 {
            true => frame.push(0x80 | payload.len() as u8),
            false => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        frame
    }

    fn server_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x81];
        match payload.len() < 126 {
            true => frame.push(payload.len() as u8),
            false => {
                frame.push(126);
                frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    fn payload(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + seed * 7) as u8).collect()
    }

    /// Frames of every length class, cut at every byte: each whole frame is echoed unmasked
    /// exactly once, and a cut frame waits for the rest.
    #[test]
    fn frames_are_echoed_unmasked_once_whatever_the_cut() {
        let lengths = [0, 1, 7, 8, 9, 64, 125, 126, 127, 300, 4099];
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (i, &len) in lengths.iter().enumerate() {
            let p = payload(len, i);
            stream.extend(client_frame(&p, [i as u8, 0x5a, 0xa5, 0xff]));
            expected.extend(server_frame(&p));
        }
        for cut in 0..=stream.len() {
            let (mut peer, mut out, mut echoed) = (
                Peer {
                    upgraded: true,
                    ..Peer::default()
                },
                Vec::new(),
                0,
            );
            assert!(peer.take(&stream[..cut], &mut out, &mut echoed));
            assert!(peer.take(&stream[cut..], &mut out, &mut echoed));
            assert_eq!(out, expected, "cut at {cut}");
            assert_eq!(echoed, lengths.len() as u64);
            assert!(peer.pending.is_empty());
        }
    }

    #[test]
    fn a_close_an_unmasked_frame_or_a_64_bit_length_closes() {
        let mut out = Vec::new();
        let close = [0x88, 0x80, 1, 2, 3, 4];
        assert_eq!(echo_frames(&close, &mut out, &mut 0), None);
        assert_eq!(echo_frames(&[0x81, 0x01, b'x'], &mut out, &mut 0), None);
        assert_eq!(echo_frames(&[0x82, 0xff], &mut out, &mut 0), None);
        assert!(out.is_empty());
    }

    /// The head and the first frames in one read: the 101, then the echoes.
    #[test]
    fn the_head_and_the_frames_behind_it_in_one_read() {
        let mut bytes =
            b"GET /echo HTTP/1.1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec();
        bytes.extend(client_frame(b"hi", [1, 2, 3, 4]));
        let (mut peer, mut out, mut echoed) = (Peer::default(), Vec::new(), 0);
        assert!(peer.take(&bytes[..10], &mut out, &mut echoed) && out.is_empty());
        assert!(peer.take(&bytes[10..], &mut out, &mut echoed));
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
        assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");
        assert!(out.ends_with(&server_frame(b"hi")) && echoed == 1);
    }

    type Serve = fn(TcpListener, Limits, &AtomicBool) -> io::Result<u64>;

    /// A loop serving on a free loopback port in its own thread, until `stop` is set.
    fn start(
        serve: Serve,
        recv_buffers: u16,
    ) -> (SocketAddr, Arc<AtomicBool>, JoinHandle<io::Result<u64>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            let limits = Limits {
                max_conns: 16,
                batch_wait_us: 50,
                recv_buffers,
            };
            std::thread::spawn(move || serve(listener, limits, &stop))
        };
        (addr, stop, server)
    }

    /// Read the upgrade's answer, byte by byte up to its blank line: a 101.
    fn read_101(s: &mut TcpStream) {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101 "), "{head:?}");
    }

    /// Each loop serves real clients over real sockets: an upgrade, then 2,000 frames of mixed
    /// sizes written in uneven pieces by three clients at once, every echo back in order. The
    /// uring loop has two receive buffers, so its ring runs dry and its receives end and
    /// start again.
    fn serves_real_clients(serve: Serve) {
        let (addr, stop, server) = start(serve, 2);
        let clients: Vec<_> = (0..3)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                    s.write_all(b"GET /echo HTTP/1.1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
                        .unwrap();
                    let (mut sent, mut expected) = (Vec::new(), Vec::new());
                    for i in 0..2000 {
                        let p = payload([64, 3, 200, 1000][i % 4], i + c);
                        sent.extend(client_frame(&p, [i as u8, c as u8, 7, 9]));
                        expected.extend(server_frame(&p));
                    }
                    let writer = {
                        let mut s = s.try_clone().unwrap();
                        std::thread::spawn(move || {
                            for piece in sent.chunks(997) {
                                s.write_all(piece).unwrap();
                            }
                        })
                    };
                    read_101(&mut s);
                    let mut echoes = vec![0u8; expected.len()];
                    s.read_exact(&mut echoes).unwrap();
                    assert!(echoes == expected, "client {c}: echoes differ");
                    writer.join().unwrap();
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
        stop.store(true, Relaxed);
        assert_eq!(server.join().unwrap().unwrap(), 6000);
    }

    fn set_receive_buffer(s: &TcpStream, bytes: libc::c_int) {
        // SAFETY: an open socket; the option's value outlives the call.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_RCVBUF: {}", io::Error::last_os_error());
    }

    /// A client that reads nothing until it has written twice: the first echoes (more than
    /// the kernel's largest send buffer, `tcp_wmem`) fill its receive buffer and the server's
    /// send buffer, so the server's send waits while the second write's echoes gather behind
    /// it. They must follow once it ends, even though a close frame ends the second write.
    fn echoes_gathered_behind_a_waiting_send_follow_it(serve: Serve) {
        let wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap();
        let send_buffer_max: usize = wmem.split_whitespace().last().unwrap().parse().unwrap();
        let first_frames = (send_buffer_max + (1 << 20)) / 4000;
        let (addr, stop, server) = start(serve, 64);
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        set_receive_buffer(&s, 64 * 1024);
        let mut head =
            b"GET /echo HTTP/1.1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec();
        let (mut first, mut second, mut expected) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..first_frames + 100 {
            let p = payload(4000, i);
            let frames = if i < first_frames {
                &mut first
            } else {
                &mut second
            };
            frames.extend(client_frame(&p, [i as u8, 1, 2, 3]));
            expected.extend(server_frame(&p));
        }
        head.extend(first);
        s.write_all(&head).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // A close frame last: what was gathered before it still goes, then the socket closes.
        second.extend_from_slice(&[0x88, 0x80, 9, 9, 9, 9]);
        s.write_all(&second).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        read_101(&mut s);
        let mut echoes = vec![0u8; expected.len()];
        s.read_exact(&mut echoes)
            .expect("every echo back within 10 s");
        assert!(echoes == expected, "echoes differ");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("closed by the server within 10 s");
        assert!(rest.is_empty(), "{} bytes after the echoes", rest.len());
        stop.store(true, Relaxed);
        assert_eq!(server.join().unwrap().unwrap(), first_frames as u64 + 100);
    }

    /// 40 clients one after another on a loop that holds 16 sockets: each echo comes back and
    /// each socket closes (by the client's close frame, after its echo, or its end of stream),
    /// so its slot serves the next.
    fn closed_sockets_free_their_slots(serve: Serve) {
        let (addr, stop, server) = start(serve, 64);
        for c in 0..40 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut sent =
                b"GET /echo HTTP/1.1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                    .to_vec();
            sent.extend(client_frame(&payload(100, c), [1, 2, 3, 4]));
            if c % 2 == 0 {
                sent.extend_from_slice(&[0x88, 0x80, 9, 9, 9, 9]); // a close frame behind it
            }
            s.write_all(&sent).unwrap();
            read_101(&mut s);
            let mut echo = vec![0u8; server_frame(&payload(100, c)).len()];
            s.read_exact(&mut echo).expect("the echo within 10 s");
            assert_eq!(echo, server_frame(&payload(100, c)), "client {c}");
            if c % 2 == 0 {
                let mut rest = Vec::new();
                s.read_to_end(&mut rest)
                    .expect("closed by the server within 10 s");
            }
        }
        stop.store(true, Relaxed);
        assert_eq!(server.join().unwrap().unwrap(), 40);
    }

    #[test]
    fn the_epoll_loop_frees_closed_sockets_slots() {
        closed_sockets_free_their_slots(serve_epoll);
    }

    #[test]
    fn the_uring_loop_frees_closed_sockets_slots() {
        closed_sockets_free_their_slots(serve_uring);
    }

    #[test]
    fn the_epoll_loop_sends_what_gathered_behind_a_waiting_send() {
        echoes_gathered_behind_a_waiting_send_follow_it(serve_epoll);
    }

    #[test]
    fn the_uring_loop_sends_what_gathered_behind_a_waiting_send() {
        echoes_gathered_behind_a_waiting_send_follow_it(serve_uring);
    }

    #[test]
    fn the_epoll_loop_serves_real_clients() {
        serves_real_clients(serve_epoll);
    }

    #[test]
    fn the_uring_loop_serves_real_clients() {
        serves_real_clients(serve_uring);
    }
}
