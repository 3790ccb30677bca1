//! The text forms ringgate writes into Redis and reads back: packed messages, pushes on a
//! node's channel, stream ids as inbox sequence numbers, and reply shapes.

use compact_str::CompactString;
use fred::prelude::*;

use super::{RoomJoinAsk, StoreReply};
use crate::delivery::message::{Outcome, ReplyTo, Report};
use crate::store::{InboxSeq, StoredMessage};

/// A message as one stream field (one field instead of five: less memory per entry and less
/// work in Redis and here): `<id> <ts> <from bytes> <cid bytes> <from><cid><body>`, preceded by
/// `T<type bytes> <type>` when the message has a `type` (the backend's). Lengths make it exact
/// for any content (raw JSON may hold spaces or tabs). A build before `type` existed cannot
/// read a typed entry (its load skips it as unreadable).
pub fn pack(id: u64, ts: u64, from: &str, cid: &str, body: &str, msg_type: Option<&str>) -> String {
    let typed = msg_type.map_or(String::new(), |t| format!("T{} {t}", t.len()));
    format!(
        "{typed}{id} {ts} {} {} {from}{cid}{body}",
        from.len(),
        cid.len()
    )
}

/// The inverse of [`pack`]; None when the text is not one.
pub fn unpack(text: &str) -> Option<StoredMessage> {
    let (msg_type, text) = match text.strip_prefix('T') {
        Some(typed) => {
            let (len, rest) = typed.split_once(' ')?;
            let len: usize = len.parse().ok()?;
            (Some(rest.get(..len)?.into()), rest.get(len..)?)
        }
        None => (None, text),
    };
    let mut head = text.splitn(5, ' ');
    let id = head.next()?.parse().ok()?;
    let ts = head.next()?.parse().ok()?;
    let from_len: usize = head.next()?.parse().ok()?;
    let cid_len: usize = head.next()?.parse().ok()?;
    let rest = head.next()?;
    let from = rest.get(..from_len)?;
    let cid = rest.get(from_len..from_len + cid_len)?;
    let body = rest.get(from_len + cid_len..)?;
    Some(StoredMessage {
        id,
        from: from.into(),
        cid: cid.into(),
        ts,
        body: body.into(),
        msg_type,
    })
}

/// A `delivered` for the sender's other nodes: `d <id> <from bytes> <to bytes> <from><to><cid>`.
pub(super) fn pack_delivered(r: &Report) -> String {
    format!(
        "d {} {} {} {}{}{}",
        r.id,
        r.from.len(),
        r.to.len(),
        r.from,
        r.to,
        r.cid
    )
}

/// A `typing` push (see [`Push::Typing`]).
pub(super) fn pack_typing(from: &str, to: &str) -> String {
    format!("t {} {from}{to}", from.len())
}

/// A read mark (see [`Push::ReadMark`]).
pub(super) fn pack_read_mark(token: u64, user: &str) -> String {
    format!("k {token} {user}")
}

/// What another node published on this node's channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// `m <stream id> <user bytes> <user><packed message>`: appended to `user`'s inbox.
    Entry {
        user: CompactString,
        seq: InboxSeq,
        msg: StoredMessage,
    },
    /// A device acked a message `from` sent (see `pack_delivered`).
    Delivered {
        id: u64,
        from: CompactString,
        to: CompactString,
        cid: Box<str>,
    },
    /// `r <offset> <room bytes> <room><packed message>`: a room message.
    Room {
        room: CompactString,
        offset: u64,
        msg: StoredMessage,
    },
    /// `t <from bytes> <from><to>`: `from` is typing to `to`.
    Typing {
        from: CompactString,
        to: CompactString,
    },
    /// `k <token> <user>`: published by this node's load `token` of `user`'s inbox right after
    /// its read, from the server that holds the inbox: every push of an entry that read
    /// holds, or that was acked before it, came on the channel before this.
    ReadMark { user: CompactString, token: u64 },
    /// `p <user bytes> <user><runs>`: `user`'s directory entry changed and holds `runs`.
    Presence { user: CompactString, runs: u64 },
    /// `j <shard> <conn> <serial> <last> <recovered 0|1> <room bytes> <room>` then per
    /// replayed message `<offset> <packed bytes> <packed>`: the answer to a room join.
    Joined {
        ask: RoomJoinAsk,
        last: u64,
        recovered: bool,
        replay: Vec<(u64, StoredMessage)>,
    },
}

impl Push {
    /// The user whose home shard takes this push.
    pub fn user(&self) -> &str {
        match self {
            Push::Entry { user, .. } => user,
            Push::Delivered { from, .. } => from,
            Push::Room { room, .. } => room,
            Push::Joined { ask, .. } => &ask.room,
            Push::Typing { to, .. } => to,
            Push::Presence { user, .. } => user,
            Push::ReadMark { user, .. } => user,
        }
    }

    /// The answer for the user's home shard among `shards`.
    pub fn into_reply(self, shards: usize) -> StoreReply {
        match self {
            Push::Entry { user, seq, msg } => StoreReply::Pushed { user, seq, msg },
            Push::Delivered { id, from, to, cid } => {
                let home = crate::mesh::home_shard(&from, shards);
                StoreReply::RemoteReport(Box::new(Report {
                    id,
                    from,
                    to,
                    cid: cid.as_ref().into(),
                    reply: ReplyTo::all_devices(home),
                    outcome: Outcome::Delivered,
                    received_us: 0,
                }))
            }
            Push::Room { room, offset, msg } => StoreReply::RoomMessage { room, offset, msg },
            Push::Typing { from, to } => StoreReply::Typing { from, to },
            Push::Presence { user, runs } => StoreReply::PresenceChanged { user, runs },
            Push::ReadMark { user, token } => StoreReply::ReadMarked { user, token },
            Push::Joined {
                ask,
                last,
                recovered,
                replay,
            } => StoreReply::RoomJoinAnswer {
                ask: Box::new(ask),
                last,
                recovered,
                replay,
            },
        }
    }
}

/// `<n> <rest>` -> (n, rest).
pub(super) fn number_then(text: &str) -> Option<(u64, &str)> {
    let (n, rest) = text.split_once(' ')?;
    Some((n.parse().ok()?, rest))
}

/// `<len> <text of len bytes><rest>` -> (text, rest).
pub(super) fn sized(text: &str) -> Option<(&str, &str)> {
    let (len, rest) = number_then(text)?;
    let len = usize::try_from(len).ok()?;
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// Parse a push; None for anything else (logged by the caller, never trusted).
pub fn parse_push(text: &str) -> Option<Push> {
    let (kind, rest) = text.split_once(' ')?;
    match kind {
        "m" => {
            let (xid, rest) = rest.split_once(' ')?;
            let (len, rest) = rest.split_once(' ')?;
            let len: usize = len.parse().ok()?;
            let user = rest.get(..len)?;
            Some(Push::Entry {
                user: user.into(),
                seq: stream_id_to_seq(xid)?,
                msg: unpack(rest.get(len..)?)?,
            })
        }
        "d" => {
            let mut head = rest.splitn(4, ' ');
            let id = head.next()?.parse().ok()?;
            let from_len: usize = head.next()?.parse().ok()?;
            let to_len: usize = head.next()?.parse().ok()?;
            let tail = head.next()?;
            Some(Push::Delivered {
                id,
                from: tail.get(..from_len)?.into(),
                to: tail.get(from_len..from_len + to_len)?.into(),
                cid: tail.get(from_len + to_len..)?.into(),
            })
        }
        "p" => {
            let (user, runs) = sized(rest)?;
            Some(Push::Presence {
                user: user.into(),
                runs: runs.parse().ok()?,
            })
        }
        "k" => {
            let (token, user) = number_then(rest)?;
            Some(Push::ReadMark {
                user: user.into(),
                token,
            })
        }
        "t" => {
            let (from, to) = sized(rest)?;
            Some(Push::Typing {
                from: from.into(),
                to: to.into(),
            })
        }
        "r" => {
            let (offset, rest) = number_then(rest)?;
            let (room, packed) = sized(rest)?;
            Some(Push::Room {
                room: room.into(),
                offset,
                msg: unpack(packed)?,
            })
        }
        "j" => {
            let (shard, rest) = number_then(rest)?;
            let (conn, rest) = number_then(rest)?;
            let (serial, rest) = number_then(rest)?;
            let (token, rest) = number_then(rest)?;
            let (last, rest) = number_then(rest)?;
            let (recovered, rest) = number_then(rest)?;
            let (room, mut rest) = sized(rest)?;
            let mut replay = Vec::new();
            while !rest.is_empty() {
                let (offset, tail) = number_then(rest)?;
                let (packed, tail) = sized(tail)?;
                replay.push((offset, unpack(packed)?));
                rest = tail;
            }
            Some(Push::Joined {
                ask: RoomJoinAsk {
                    room: room.into(),
                    since: None,
                    shard: usize::try_from(shard).ok()?,
                    conn: usize::try_from(conn).ok()?,
                    serial: u32::try_from(serial).ok()?,
                    token,
                },
                last,
                recovered: recovered == 1,
                replay,
            })
        }
        _ => None,
    }
}

/// A node run's name: `node_id` and the run's start (ms since the Unix epoch), decided once
/// by the caller at start-up.
pub fn node_run_id(node_id: &str, started_ms: u64) -> String {
    format!("{node_id}.{started_ms}")
}

/// One `XRANGE` entry: `[id, ["m", packed]]`.
pub(super) fn parse_entry(entry: Value) -> Result<(InboxSeq, StoredMessage), String> {
    let mut parts = array(entry)?.into_iter();
    let id_value = parts.next().ok_or("entry: no id")?;
    let xid = text_ref(&id_value).ok_or("entry: no id")?;
    let seq = stream_id_to_seq(xid).ok_or_else(|| format!("bad stream id {xid}"))?;
    let fields = array(parts.next().ok_or("entry: no fields")?)?;
    let packed = fields.get(1).and_then(text_ref).ok_or("entry: no value")?;
    let msg = unpack(packed).ok_or_else(|| format!("entry {xid} is not a ringgate message"))?;
    Ok((seq, msg))
}

pub(super) fn array(v: Value) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Null => Ok(Vec::new()),
        other => Err(format!("expected an array, got {other:?}")),
    }
}

/// An array of texts (a set's members, say).
pub(super) fn strings(v: Value) -> Result<Vec<String>, String> {
    array(v)?
        .iter()
        .map(|m| text(m).ok_or_else(|| format!("expected a text, got {m:?}")))
        .collect()
}

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => std::str::from_utf8(b).ok().map(str::to_owned),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Like [`text`], borrowed (the replay path reads every entry through it).
pub(super) fn text_ref(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Bytes(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

pub(super) fn integer(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// Bits of an [`InboxSeq`] that hold the stream id's sequence part.
pub(super) const SEQ_BITS: u32 = 20;

/// `ms-n` -> one increasing u64 (`ms << 20 | n`). Redis assigns `n` per millisecond per
/// stream; a million entries to one user's stream within one millisecond is not a case.
pub fn stream_id_to_seq(id: &str) -> Option<InboxSeq> {
    let (ms, n) = id.split_once('-')?;
    let (ms, n) = (ms.parse::<u64>().ok()?, n.parse::<u64>().ok()?);
    (n < (1 << SEQ_BITS) && ms < (1 << (64 - SEQ_BITS))).then_some((ms << SEQ_BITS) | n)
}

/// The inverse of [`stream_id_to_seq`].
pub fn seq_to_stream_id(seq: InboxSeq) -> String {
    format!("{}-{}", seq >> SEQ_BITS, seq & ((1 << SEQ_BITS) - 1))
}

/// The lowest seq of an entry appended at `wall_ms` (an in-process store numbers its
/// entries like Redis's stream ids, so [`seq_time_ms`] holds for both).
pub fn seq_floor_at(wall_ms: u64) -> InboxSeq {
    wall_ms << SEQ_BITS
}

/// Where a mirror's live entries start within a millisecond: the upper half of its
/// sequence part, which Redis reaches only past half a million entries to one stream in
/// one millisecond. A live entry (Redis away, `shard/mirror.rs`) takes a position no entry
/// Redis stores can share (an entry stored in the same millisecond sorts below it).
const LIVE_SEQ_FROM: u64 = 1 << (SEQ_BITS - 1);

/// The lowest position a live entry may take when the mirror's next free one is `next`
/// (see [`LIVE_SEQ_FROM`]).
pub fn live_seq_floor(next: InboxSeq) -> InboxSeq {
    next.max((next & !((1 << SEQ_BITS) - 1)) | LIVE_SEQ_FROM)
}

/// Milliseconds since the Unix epoch at which Redis appended the entry `seq`.
pub fn seq_time_ms(seq: InboxSeq) -> u64 {
    seq >> SEQ_BITS
}
