//! The mesh: how shards talk. One bounded lock-free channel (crossbeam) into every shard, and a
//! doorbell per shard that wakes its executor promptly without busy polling.
//!
//! A sender pushes a message and rings the receiver's doorbell only when the receiver has not
//! been rung since it last looked (one atomic swap per message, one write per wake-up, not per
//! message). The receiver reads the doorbell through glommio, clears the flag *before* draining,
//! and drains in bounded batches, so nothing pushed during a drain is missed and no shard can
//! starve its own sockets. A full channel hands the message back to the sender, which decides
//! (and counts) what to do. Users have a home shard (`home_shard`): all of a user's connections
//! live there, so a message to a user crosses shards at most once.
//!
//! The mesh is a plain transport, generic over what it carries: the message kinds belong to
//! the shard (`shard::msg`), so this module depends on nothing else in the crate.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// Messages queued per receiving shard before senders get `Full`.
pub const CHANNEL_CAPACITY: usize = 4096;
/// Messages a shard takes from its channel before yielding to its sockets.
pub const DRAIN_BATCH: usize = 256;

/// A sending-only handle for threads that are not shards (the admin API).
pub struct MeshClient<M> {
    peers: Vec<Peer<M>>,
}

// Not derived: a derive would ask `M: Clone`, and the messages need not be.
impl<M> Clone for MeshClient<M> {
    fn clone(&self) -> Self {
        MeshClient {
            peers: self.peers.clone(),
        }
    }
}

/// A shard's channel and the doorbell that wakes it.
type Peer<M> = (Sender<M>, Arc<Doorbell>);

impl<M> MeshClient<M> {
    pub fn shards(&self) -> usize {
        self.peers.len()
    }

    /// Same contract as [`Mesh::send`].
    pub fn send(&self, to: usize, msg: M) -> Result<(), M> {
        send_to(&self.peers[to], msg)
    }
}

fn send_to<M>(peer: &Peer<M>, msg: M) -> Result<(), M> {
    let (tx, bell) = peer;
    match tx.try_send(msg) {
        Ok(()) => {
            bell.ring();
            Ok(())
        }
        Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => Err(m),
    }
}

/// Wakes one shard. Shared by every sender to that shard.
pub struct Doorbell {
    rung: AtomicBool,
    write_end: OwnedFd,
}

impl Doorbell {
    /// A doorbell and the socket its rings arrive on (the woken side reads it).
    pub fn pair() -> std::io::Result<(Arc<Doorbell>, std::os::unix::net::UnixStream)> {
        let (read_end, write_end) = std::os::unix::net::UnixStream::pair()?;
        write_end.set_nonblocking(true)?;
        let bell = Arc::new(Doorbell {
            rung: AtomicBool::new(false),
            write_end: write_end.into(),
        });
        Ok((bell, read_end))
    }

    /// The woken side read the socket: clear before draining so a later push rings again.
    pub fn clear(&self) {
        self.rung.store(false, Ordering::Release);
    }

    /// Wake the reader unless it has been rung since it last cleared.
    pub fn ring(&self) {
        if !self.rung.swap(true, Ordering::AcqRel) {
            // SAFETY: one byte from a valid buffer to a socket we own; a full socket buffer
            // (EAGAIN) means a wake-up is already pending, which is all we need.
            unsafe {
                libc::send(
                    self.write_end.as_raw_fd(),
                    [1u8].as_ptr().cast(),
                    1,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }
}

/// One shard's end of the mesh.
pub struct Mesh<M> {
    pub id: usize,
    peers: Vec<Peer<M>>,
    inbox: Receiver<M>,
    bell: Arc<Doorbell>,
}

/// One shard's end of the mesh and the doorbell socket it reads.
pub type ShardEnd<M> = (Mesh<M>, std::os::unix::net::UnixStream);

/// Build the mesh for `shards` shards: each shard's end, and a client for other threads.
#[allow(clippy::type_complexity)]
pub fn build<M>(shards: usize) -> std::io::Result<(Vec<ShardEnd<M>>, MeshClient<M>)> {
    build_with_capacity(shards, CHANNEL_CAPACITY)
}

/// [`build`] with `capacity` messages per channel (the simulation makes them small, so that
/// full channels happen).
#[allow(clippy::type_complexity)]
pub fn build_with_capacity<M>(
    shards: usize,
    capacity: usize,
) -> std::io::Result<(Vec<ShardEnd<M>>, MeshClient<M>)> {
    let mut channels = Vec::with_capacity(shards);
    let mut bells = Vec::with_capacity(shards);
    let mut readers = Vec::with_capacity(shards);
    for _ in 0..shards {
        channels.push(crossbeam_channel::bounded(capacity));
        let (bell, read_end) = Doorbell::pair()?;
        bells.push(bell);
        readers.push(read_end);
    }
    let peers: Vec<Peer<M>> = channels
        .iter()
        .zip(&bells)
        .map(|((tx, _), bell)| (tx.clone(), bell.clone()))
        .collect();
    let client = MeshClient {
        peers: peers.clone(),
    };
    let ends = channels
        .into_iter()
        .zip(bells)
        .zip(readers)
        .enumerate()
        .map(|(id, (((_, rx), bell), reader))| {
            (
                Mesh {
                    id,
                    peers: peers.clone(),
                    inbox: rx,
                    bell,
                },
                reader,
            )
        })
        .collect();
    Ok((ends, client))
}

impl<M> Mesh<M> {
    pub fn shards(&self) -> usize {
        self.peers.len()
    }

    /// Queue `msg` for shard `to` and wake it; the message comes back when the channel is full.
    pub fn send(&self, to: usize, msg: M) -> Result<(), M> {
        send_to(&self.peers[to], msg)
    }

    /// The doorbell was read: clear it before draining so a later push rings again.
    pub fn clear_bell(&self) {
        self.bell.clear();
    }

    /// Up to `DRAIN_BATCH` queued messages, without blocking.
    pub fn take_batch(&self, out: &mut Vec<M>) {
        out.extend(self.inbox.try_iter().take(DRAIN_BATCH));
    }
}

/// The shard that owns `user`: stable for the life of the process (FNV-1a of the id).
pub fn home_shard(user: &str, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.as_bytes() {
        hash ^= *b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn home_shard_is_stable_and_spreads_users() {
        assert_eq!(home_shard("alice", 4), home_shard("alice", 4));
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            counts[home_shard(&format!("u{i}"), 4)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        assert_eq!(home_shard("anyone", 1), 0);
    }

    #[test]
    fn one_ring_per_wakeup_and_full_channels_hand_messages_back() {
        let (mut ends, _) = build::<String>(2).unwrap();
        let (b, mut b_bell) = ends.pop().unwrap();
        let (a, _) = ends.pop().unwrap();
        let fake = || String::from("a message");
        for _ in 0..3 {
            assert!(a.send(1, fake()).is_ok());
        }
        // Three messages, one doorbell byte.
        b_bell.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(b_bell.read(&mut buf).unwrap(), 1);
        assert!(
            b_bell.read(&mut buf).is_err(),
            "no second ring before the bell is cleared"
        );
        b.clear_bell();
        let mut got = Vec::new();
        b.take_batch(&mut got);
        assert_eq!(got.len(), 3);
        // After clearing, the next send rings again.
        assert!(a.send(1, fake()).is_ok());
        assert_eq!(b_bell.read(&mut buf).unwrap(), 1);
        // Fill the channel: the message comes back instead of blocking or vanishing.
        let mut refused = 0;
        for _ in 0..CHANNEL_CAPACITY + 10 {
            if a.send(1, fake()).is_err() {
                refused += 1;
            }
        }
        assert_eq!(
            refused, 11,
            "capacity {CHANNEL_CAPACITY}, one already queued"
        );
        let mut got = Vec::new();
        b.take_batch(&mut got);
        assert_eq!(got.len(), DRAIN_BATCH, "bounded batches");
    }
}
