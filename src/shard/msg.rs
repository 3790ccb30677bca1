//! What shards send each other, nested by feature.
//!
//! The mesh (`crate::mesh`) carries a [`ShardMsg`] without knowing its kinds. One dispatch
//! (`io::mesh_loop`) matches every kind and each feature matches its own kinds in full, with no
//! catch-all arm, so a kind added here and handled nowhere fails to compile.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use compact_str::CompactString;

use crate::conn::Connection;
use crate::delivery::message::{Message, ReplyTo, Report};
use crate::delivery::refusal::SendRefusal;
use crate::delivery::room::RoomMsg;

/// A shard's end of the mesh, and the handle other threads (the admin API) send with.
pub type ShardMesh = crate::mesh::Mesh<ShardMsg>;
pub type ShardMeshClient = crate::mesh::MeshClient<ShardMsg>;

pub enum ShardMsg {
    /// An upgraded `/ws` socket for a user whose home is the receiving shard.
    Handoff {
        socket: OwnedFd,
        conn: Box<Connection>,
        /// Its TLS session on a `wss://` listener (the socket's bytes are encrypted).
        tls: Option<Box<rustls::ServerConnection>>,
    },
    /// Direct (1:1) messages.
    Direct(Direct),
    /// Rooms: the home shard of a room and the shards of its members.
    Room(Room),
    /// Who is online.
    Presence(Presence),
}

/// What an API send came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiOutcome {
    Accepted { id: u64 },
    Refused(SendRefusal),
}

pub enum Direct {
    /// An accepted message for a user homed on the receiving shard.
    Deliver(Box<Message>),
    /// What became of a message, for the sender's home shard.
    Report(Box<Report>),
    /// `from` is typing to `to` (homed on the receiving shard): tell `to`'s devices there.
    Typing {
        from: CompactString,
        to: CompactString,
    },
    /// `POST /api/send`, for the home shard of the backend sender; answered on `reply`.
    ApiSend {
        to: CompactString,
        cid: Box<str>,
        body: Box<str>,
        /// The request's `type`, carried to the recipient in `msg`.
        msg_type: Option<Box<str>>,
        reply: tokio::sync::oneshot::Sender<ApiOutcome>,
    },
}

pub enum Room {
    /// A connection of `shard` joins `room` (homed on the receiving shard); `new_member`:
    /// it was not a member before (the home counts members per shard).
    Join {
        room: CompactString,
        shard: usize,
        conn: usize,
        serial: u32,
        since: Option<u64>,
        new_member: bool,
    },
    /// The room's answer to `Join`, for the joining connection's shard.
    Joined {
        room: CompactString,
        conn: usize,
        serial: u32,
        last: u64,
        recovered: bool,
        replay: Vec<Arc<RoomMsg>>,
    },
    /// One member fewer on `shard`.
    Leave { room: CompactString, shard: usize },
    /// A publish for the room's home shard.
    Publish {
        room: CompactString,
        from: CompactString,
        cid: Box<str>,
        body: Box<str>,
        reply: ReplyTo,
    },
    /// A publish was stored: (id, offset), or why not; for the publisher's shard.
    Accepted {
        reply: ReplyTo,
        cid: Box<str>,
        result: Result<(u64, u64), SendRefusal>,
    },
    /// The room's home could not register the join (Redis unavailable): the member is
    /// dropped and hears `unavailable`.
    JoinRefused {
        room: CompactString,
        conn: usize,
        serial: u32,
    },
    /// Room messages from `from` on were not received by this node (its channel missed
    /// them): members that had not reached `from` hear `gap`.
    Gap { room: CompactString, from: u64 },
    /// A room message for the members on the receiving shard: one per shard, not per member.
    Fanout(Arc<RoomMsg>),
    /// `POST /api/publish`, for the room's home shard; answered on `reply` (id, offset).
    ApiPublish {
        room: CompactString,
        cid: Box<str>,
        body: Box<str>,
        reply: tokio::sync::oneshot::Sender<Result<(u64, u64), SendRefusal>>,
    },
}

pub enum Presence {
    /// `GET /api/presence`: which of `users` are online (asked of their home shards and, with
    /// Redis, of the cluster directory); answered on `reply` in the order asked.
    Api {
        users: Vec<CompactString>,
        reply: tokio::sync::oneshot::Sender<Vec<bool>>,
    },
    /// A `presence` frame's question about users homed on the receiving shard; answered
    /// with `Answer` to `from_shard`, quoting `ask`. `watch`: the question answers a `watch`
    /// (the users' watchers were registered before it), so it is answered with what their
    /// watchers were told, which later changes follow.
    Ask {
        users: Vec<CompactString>,
        from_shard: usize,
        ask: usize,
        watch: bool,
    },
    /// Which of the asked users have a connection, in the order asked.
    Answer {
        ask: usize,
        users: Vec<CompactString>,
        online: Vec<bool>,
    },
    /// For `user`'s home shard: a connection on `shard` watches `user` (see `shard/watch.rs`).
    Watch { user: CompactString, shard: usize },
    /// For `user`'s home shard: one watching registration of `shard` fewer.
    Unwatch { user: CompactString, shard: usize },
    /// For a watching shard: `user` came online or went offline.
    Changed { user: CompactString, online: bool },
}
