//! `ringgate-bench upgrade-floor`: the least server work a WebSocket upgrade needs, so that
//! the connect benchmark can tell what its generator and the kernel allow from what a server
//! costs. One thread on epoll (mio). Per connection: one accept, the request read until its
//! blank line, the `Sec-WebSocket-Accept` computed from the key, one write of the 101. The
//! socket is then held idle until the peer closes it. There is no HTTP parser beyond finding
//! the key, no routes, no auth and no frames.
//!
//! `bench/budgets.sh idle` runs it pinned like the servers under test, reached by the same
//! generator: a server doing this little is the reference for the rate the generator and the
//! kernel allow (not a proven bound: another server may land within the runs' spread above it).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::Args;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::engine::INTERRUPTED;

#[derive(Args, Debug)]
pub struct UpgradeFloorArgs {
    /// Address to listen on (loopback only)
    #[arg(long, default_value = "127.0.0.1:9002")]
    listen: String,
    /// Connections held at most (and at most what the open-files limit leaves); more are
    /// closed as they are accepted
    #[arg(long, default_value_t = 20_000)]
    max_conns: usize,
    /// Listen backlog (the kernel caps it at net.core.somaxconn)
    #[arg(long, default_value_t = 4096)]
    backlog: i32,
}

/// The longest request head read before the connection is closed.
const MAX_HEAD: usize = 8192;
const LISTENER: Token = Token(usize::MAX);

struct Conn {
    stream: TcpStream,
    /// The request so far; emptied (and freed) once the 101 is written.
    head: Vec<u8>,
    upgraded: bool,
}

pub fn run(a: UpgradeFloorArgs) -> Result<i32, String> {
    let addr: std::net::SocketAddr = a
        .listen
        .parse()
        .map_err(|e| format!("--listen {}: {e}", a.listen))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr}: only loopback addresses are load targets"));
    }
    install_stop_signals();
    let files = crate::net::raise_nofile_limit();
    let max_conns = a
        .max_conns
        .min(files.saturating_sub(crate::net::fd_margin(1)) as usize);
    let mut listener = TcpListener::bind(addr).map_err(|e| format!("{addr}: {e}"))?;
    // mio listens with its own small backlog; a second listen(2) on Linux sets it again.
    // SAFETY: a valid listening descriptor owned by `listener`.
    if unsafe { libc::listen(listener.as_raw_fd(), a.backlog) } != 0 {
        return Err(format!("listen: {}", std::io::Error::last_os_error()));
    }
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    let mut conns: Slab<Conn> = Slab::with_capacity(max_conns.min(1 << 16));
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 4096];
    let mut counts = Counts::default();
    // The listener's events are edge-triggered: after an accept that failed with the backlog
    // not drained (out of descriptors), no new event may come, so accepting is retried after
    // every poll until it drains.
    let mut accept_pending = false;
    eprintln!("upgrade-floor: listening on {addr}");
    while !INTERRUPTED.load(Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        }
        if accept_pending || events.iter().any(|e| e.token() == LISTENER) {
            accept_pending = accept_all(&listener, &poll, &mut conns, max_conns, &mut counts);
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                continue;
            }
            let key = event.token().0;
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            let (open, upgraded_now) = serve(conn, &mut buf);
            counts.upgrades += upgraded_now as u64;
            if !open {
                let mut conn = conns.remove(key);
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
    eprintln!(
        "upgrade-floor: {} upgrades, {} refused at {max_conns} open, at most {} open",
        counts.upgrades, counts.refused, counts.most
    );
    Ok(0)
}

#[derive(Default)]
struct Counts {
    upgrades: u64,
    refused: u64,
    most: usize,
}

/// Accept until the backlog is drained; returns true when it was not (an error other than
/// "nothing left", e.g. out of descriptors), so that the caller tries again.
fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    conns: &mut Slab<Conn>,
    max_conns: usize,
    counts: &mut Counts,
) -> bool {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                if conns.len() >= max_conns {
                    counts.refused += 1; // closed as it drops
                    continue;
                }
                let entry = conns.vacant_entry();
                // A stream that cannot be registered is closed as it drops.
                if poll
                    .registry()
                    .register(&mut stream, Token(entry.key()), Interest::READABLE)
                    .is_ok()
                {
                    entry.insert(Conn {
                        stream,
                        head: Vec::new(),
                        upgraded: false,
                    });
                    counts.most = counts.most.max(conns.len());
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) => {}
            Err(_) => return true,
        }
    }
}

/// Read what the peer sent: the request head until its blank line (then the 101), afterwards
/// anything, discarded. Returns whether the connection stays open, and whether it upgraded.
fn serve(conn: &mut Conn, buf: &mut [u8]) -> (bool, bool) {
    let mut upgraded_now = false;
    loop {
        match conn.stream.read(buf) {
            Ok(0) => return (false, upgraded_now),
            Ok(_) if conn.upgraded => {}
            Ok(n) => {
                conn.head.extend_from_slice(&buf[..n]);
                let response = match read_head(&conn.head) {
                    Head::Incomplete => continue,
                    Head::Bad => {
                        let _ = conn.stream.write_all(BAD_REQUEST);
                        return (false, upgraded_now);
                    }
                    Head::Upgrade { response, .. } => response,
                };
                // A fresh socket's send buffer holds the ~130 bytes whole.
                if conn.stream.write_all(response.as_bytes()).is_err() {
                    return (false, upgraded_now);
                }
                conn.upgraded = true;
                conn.head = Vec::new();
                upgraded_now = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return (true, upgraded_now),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return (false, upgraded_now),
        }
    }
}

pub(crate) const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\r\n";

/// What a request head read so far calls for.
pub(crate) enum Head {
    /// No blank line yet (and no more than `MAX_HEAD` bytes).
    Incomplete,
    /// Too long, or no `Sec-WebSocket-Key`: answered 400 and closed.
    Bad,
    /// The 101 to write; the head is `len` bytes (what follows is the first frames).
    Upgrade { len: usize, response: String },
}

pub(crate) fn read_head(head: &[u8]) -> Head {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return match head.len() > MAX_HEAD {
            true => Head::Bad,
            false => Head::Incomplete,
        };
    };
    let len = end + 4;
    let Some(key) = websocket_key(&head[..len]) else {
        return Head::Bad;
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        crate::ws::accept_for_key(key)
    );
    Head::Upgrade { len, response }
}

/// The value of the request's `Sec-WebSocket-Key` header (name matched without case).
fn websocket_key(head: &[u8]) -> Option<&[u8]> {
    const NAME: &[u8] = b"sec-websocket-key:";
    head.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let value = line
            .get(..NAME.len())
            .filter(|name| name.eq_ignore_ascii_case(NAME))
            .map(|_| &line[NAME.len()..])?;
        Some(value.trim_ascii())
    })
}

extern "C" fn on_stop(_: libc::c_int) {
    INTERRUPTED.store(true, Relaxed);
}

pub(crate) fn install_stop_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_found_whatever_the_header_name_s_case() {
        let head = b"GET /echo HTTP/1.1\r\nHost: x\r\nsec-WEBSOCKET-key:  dGhlIHNhbXBsZSBub25jZQ== \r\n\r\n";
        assert_eq!(websocket_key(head), Some(&b"dGhlIHNhbXBsZSBub25jZQ=="[..]));
        assert_eq!(websocket_key(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None);
        assert_eq!(
            websocket_key(b"GET / HTTP/1.1\r\nSec-WebSocket-Key\r\n\r\n"),
            None
        );
    }

    /// A real client over a real socket gets the RFC 6455 101 (the example key of section
    /// 1.3), and the server sees the close.
    #[test]
    fn an_upgrade_gets_the_rfc_s_accept_and_a_close_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        // A server that says it upgraded without writing the 101 fails here, not hangs.
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut conn = Conn {
            stream: TcpStream::from_std(server),
            head: Vec::new(),
            upgraded: false,
        };
        let mut buf = [0u8; 64];
        client
            .write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            .unwrap();
        let half = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n".len();
        until(|| {
            assert_eq!(serve(&mut conn, &mut buf), (true, false), "half a head");
            conn.head.len() == half
        });
        client
            .write_all(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            .unwrap();
        until(|| serve(&mut conn, &mut buf) == (true, true));
        assert!(conn.upgraded && conn.head.is_empty());
        let mut response = [0u8; 256];
        let n = client.read(&mut response).unwrap();
        let text = std::str::from_utf8(&response[..n]).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
        assert!(
            text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{text}"
        );
        drop(client);
        until(|| !serve(&mut conn, &mut buf).0);
    }

    /// Edge-triggered readiness needs every read drained to WouldBlock: one call to `serve`
    /// takes a whole head and the frame sent behind it, and leaves nothing unread.
    #[test]
    fn one_call_drains_the_head_and_what_follows_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut sent =
            b"GET /echo HTTP/1.1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec();
        sent.extend_from_slice(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
        client.write_all(&sent).unwrap();
        // One write of a few bytes on loopback arrives whole: wait until it is readable.
        let mut pfd = libc::pollfd {
            fd: server.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(
            unsafe { libc::poll(&mut pfd, 1, 10_000) },
            1,
            "never readable"
        );
        let mut conn = Conn {
            stream: TcpStream::from_std(server),
            head: Vec::new(),
            upgraded: false,
        };
        let mut buf = [0u8; 16]; // smaller than what was sent: the loop must go round
        assert_eq!(serve(&mut conn, &mut buf), (true, true));
        let left = conn.stream.read(&mut buf);
        assert!(
            matches!(&left, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "left unread: {left:?}"
        );
    }

    /// Retry a step on a non-blocking socket until it holds (the bytes are in flight on
    /// loopback), failing after 10 s rather than hanging.
    fn until(mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "not done within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
