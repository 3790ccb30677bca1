//! glommio glue for a shard: the listener, the accept task, one task per socket, and the tick.
//!
//! The socket task holds only the socket, the slab index and a handle to the shard; all
//! connection state lives in the shard's slab. It performs what [`Shard::poll_conn`] decides.

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};

use super::{ConnPoll, Shard};

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

/// Run the shard until it has drained. Call inside the shard's glommio executor.
pub async fn run(shard: Shard, listener: socket2::Socket) {
    let tick = Duration::from_millis(shard.cfg().tick_ms);
    let shard = Rc::new(RefCell::new(shard));
    // SAFETY: the fd comes from a listening socket we own and hand over whole.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    let mut acceptor = Some(glommio::spawn_local(accept_loop(shard.clone(), listener)));
    loop {
        glommio::timer::sleep(tick).await;
        let done = shard.borrow_mut().on_tick();
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

async fn accept_loop(shard: Rc<RefCell<Shard>>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let Some(index) = shard.borrow_mut().admit() else {
                    continue;
                };
                glommio::spawn_local(drive(shard.clone(), index, stream)).detach();
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning on accept.
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The socket task: polls the shard for this socket until it is closed.
async fn drive(shard: Rc<RefCell<Shard>>, index: usize, mut stream: TcpStream) {
    poll_fn(
        |cx| match shard.borrow_mut().poll_conn(index, &mut stream, cx) {
            ConnPoll::Pending => Poll::Pending,
            ConnPoll::Close => Poll::Ready(()),
        },
    )
    .await;
    // Dropping the stream closes the socket.
}
