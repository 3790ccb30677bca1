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

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::conn::Connection;

/// Messages queued per receiving shard before senders get `Full`.
pub const CHANNEL_CAPACITY: usize = 4096;
/// Messages a shard takes from its channel before yielding to its sockets.
pub const DRAIN_BATCH: usize = 256;

/// What shards send each other.
pub enum MeshMsg {
    /// An upgraded `/ws` socket for a user whose home is the receiving shard.
    Handoff {
        socket: OwnedFd,
        conn: Box<Connection>,
    },
    /// An accepted message for a user homed on the receiving shard.
    Deliver(Box<crate::delivery::message::Message>),
    /// What became of a message, for the sender's home shard.
    Report(Box<crate::delivery::message::Report>),
    /// `POST /api/send`, for the home shard of the backend sender; answered on `reply`.
    ApiSend {
        to: compact_str::CompactString,
        cid: Box<str>,
        body: Box<str>,
        reply: tokio::sync::oneshot::Sender<crate::shard::deliver::ApiOutcome>,
    },
    /// `GET /api/presence`: which of `users` are online (asked of their home shards and, with
    /// Redis, of the cluster directory); answered on `reply` in the order asked.
    Presence {
        users: Vec<compact_str::CompactString>,
        reply: tokio::sync::oneshot::Sender<Vec<bool>>,
    },
    /// A `presence` frame's question about users homed on the receiving shard; answered
    /// with `PresenceAnswer` to `from_shard`, quoting `ask`.
    PresenceAsk {
        users: Vec<compact_str::CompactString>,
        from_shard: usize,
        ask: usize,
    },
    /// A connection of `shard` joins `room` (homed on the receiving shard); `new_member`:
    /// it was not a member before (the home counts members per shard).
    RoomJoin {
        room: compact_str::CompactString,
        shard: usize,
        conn: usize,
        serial: u32,
        since: Option<u64>,
        new_member: bool,
    },
    /// The room's answer to `RoomJoin`, for the joining connection's shard.
    RoomJoined {
        room: compact_str::CompactString,
        conn: usize,
        serial: u32,
        last: u64,
        recovered: bool,
        replay: Vec<std::sync::Arc<crate::delivery::room::RoomMsg>>,
    },
    /// One member fewer on `shard`.
    RoomLeave {
        room: compact_str::CompactString,
        shard: usize,
    },
    /// A publish for the room's home shard.
    RoomPublish {
        room: compact_str::CompactString,
        from: compact_str::CompactString,
        cid: Box<str>,
        body: Box<str>,
        reply: crate::delivery::message::ReplyTo,
    },
    /// A publish was stored: (id, offset), or why not; for the publisher's shard.
    RoomAccepted {
        reply: crate::delivery::message::ReplyTo,
        cid: Box<str>,
        result: Result<(u64, u64), String>,
    },
    /// The room's home could not register the join (Redis unavailable): the member is
    /// dropped and hears `unavailable`.
    RoomJoinRefused {
        room: compact_str::CompactString,
        conn: usize,
        serial: u32,
    },
    /// Room messages from `from` on were not received by this node (its channel missed
    /// them): members that had not reached `from` hear `gap`.
    RoomGap {
        room: compact_str::CompactString,
        from: u64,
    },
    /// A room message for the members on the receiving shard: one per shard, not per member.
    RoomFanout(std::sync::Arc<crate::delivery::room::RoomMsg>),
    /// `POST /api/publish`, for the room's home shard; answered on `reply` (id, offset).
    ApiPublish {
        room: compact_str::CompactString,
        cid: Box<str>,
        body: Box<str>,
        reply: tokio::sync::oneshot::Sender<(u64, u64)>,
    },
    /// Which of the asked users have a connection, in the order asked.
    PresenceAnswer {
        ask: usize,
        users: Vec<compact_str::CompactString>,
        online: Vec<bool>,
    },
}

/// A sending-only handle for threads that are not shards (the admin API).
#[derive(Clone)]
pub struct MeshClient {
    peers: Vec<(Sender<MeshMsg>, Arc<Doorbell>)>,
}

impl MeshClient {
    pub fn shards(&self) -> usize {
        self.peers.len()
    }

    /// Same contract as [`Mesh::send`].
    pub fn send(&self, to: usize, msg: MeshMsg) -> Result<(), MeshMsg> {
        send_to(&self.peers[to], msg)
    }
}

fn send_to(peer: &(Sender<MeshMsg>, Arc<Doorbell>), msg: MeshMsg) -> Result<(), MeshMsg> {
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
pub struct Mesh {
    pub id: usize,
    peers: Vec<(Sender<MeshMsg>, Arc<Doorbell>)>,
    inbox: Receiver<MeshMsg>,
    bell: Arc<Doorbell>,
}

/// One shard's end of the mesh and the doorbell socket it reads.
pub type ShardEnd = (Mesh, std::os::unix::net::UnixStream);

/// Build the mesh for `shards` shards: each shard's end, and a client for other threads.
pub fn build(shards: usize) -> std::io::Result<(Vec<ShardEnd>, MeshClient)> {
    let mut channels = Vec::with_capacity(shards);
    let mut bells = Vec::with_capacity(shards);
    let mut readers = Vec::with_capacity(shards);
    for _ in 0..shards {
        channels.push(crossbeam_channel::bounded(CHANNEL_CAPACITY));
        let (bell, read_end) = Doorbell::pair()?;
        bells.push(bell);
        readers.push(read_end);
    }
    let peers: Vec<(Sender<MeshMsg>, Arc<Doorbell>)> = channels
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

impl Mesh {
    pub fn shards(&self) -> usize {
        self.peers.len()
    }

    /// Queue `msg` for shard `to` and wake it; the message comes back when the channel is full.
    pub fn send(&self, to: usize, msg: MeshMsg) -> Result<(), MeshMsg> {
        send_to(&self.peers[to], msg)
    }

    /// The doorbell was read: clear it before draining so a later push rings again.
    pub fn clear_bell(&self) {
        self.bell.clear();
    }

    /// Up to `DRAIN_BATCH` queued messages, without blocking.
    pub fn take_batch(&self, out: &mut Vec<MeshMsg>) {
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
        let (mut ends, _) = build(2).unwrap();
        let (b, mut b_bell) = ends.pop().unwrap();
        let (a, _) = ends.pop().unwrap();
        let fake = || MeshMsg::Handoff {
            socket: std::fs::File::open("/dev/null").unwrap().into(),
            conn: Box::new(Connection::new(0, 1)),
        };
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
