//! One batch of a shard's operations as one pipeline: planning (script runs and native
//! commands, in order), the script call's keys and arguments, and pairing answers with
//! operations.

use fred::interfaces::StreamsInterface;
use fred::prelude::*;
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand};

use super::keys::*;
use super::wire::*;
use super::{
    Appended, Loaded, RedisSettings, StoreOp, StoreReply, DEDUP_MIN_AGE_MS, DEDUP_MIN_ENTRIES,
};
use crate::store::StoreError;

/// The script every batch runs (the Lua text is its own file, to be read as Lua).
pub(super) const BATCH_SCRIPT: &str = include_str!("script.lua");

/// How one batch goes to Redis, in one pipeline (one round trip), keeping the batch's order:
/// runs of script operations (appends, removes, presence, probes) as one script call each, and
/// the others as plain commands (a load is `SADD` + `XTRIM` + `XRANGE`: Redis answers those
/// natively, several times faster than through Lua, which would convert every entry to a Lua
/// table and back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Script(std::ops::Range<usize>),
    Native(usize),
}

pub(super) fn is_native(op: &StoreOp) -> bool {
    matches!(
        op,
        StoreOp::Load { .. } | StoreOp::Leave { .. } | StoreOp::Lease | StoreOp::RoomLeave { .. }
    )
}

pub(super) fn plan(batch: &[StoreOp]) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut run_start = None;
    for (i, op) in batch.iter().enumerate() {
        if is_native(op) {
            if let Some(start) = run_start.take() {
                segments.push(Segment::Script(start..i));
            }
            segments.push(Segment::Native(i));
        } else if run_start.is_none() {
            run_start = Some(i);
        }
    }
    if let Some(start) = run_start {
        segments.push(Segment::Script(start..batch.len()));
    }
    segments
}

/// Oldest stream id a load returns: entries older are past the age cap.
pub(super) fn load_minid(settings: &RedisSettings) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(settings.max_age_ms).to_string()
}

/// Send one batch; an answer (or the reason it failed) per operation. `Err`: nothing is
/// known of the whole batch (no answer in time, or the pipeline could not be sent).
pub(super) async fn run_batch(
    client: &Client,
    settings: &RedisSettings,
    batch: &[StoreOp],
) -> Result<Vec<Result<Answer, String>>, String> {
    let segments = plan(batch);
    // Never buffered for a later connection, never retried: a batch answered `unavailable`
    // must not be written behind the shard's back once Redis is back (it would land after
    // messages accepted since, out of order).
    let once = Options {
        fail_fast: true,
        max_attempts: Some(1),
        timeout: Some(settings.timeout),
        ..Options::default()
    };
    let pipeline = fred::clients::Pipeline::from(client.with_options(&once));
    let minid = load_minid(settings);
    let queued = |r: Result<(), Error>| r.map_err(|e| e.to_string());
    for segment in &segments {
        match segment {
            Segment::Script(range) => {
                let call = BatchCall::build(settings, &batch[range.clone()]);
                // EVAL with the text (not EVALSHA): a Redis restarted meanwhile has an empty
                // script cache, and a NOSCRIPT in the middle of a pipeline could not be retried
                // without reordering. The text is ~2 KB per batch of up to 1,024 operations.
                let mut args = Vec::with_capacity(2 + call.keys.len() + call.args.len());
                args.push(BATCH_SCRIPT.to_string());
                args.push(call.keys.len().to_string());
                args.extend(call.keys);
                args.extend(call.args);
                let eval = CustomCommand::new_static("EVAL", ClusterHash::Random, false);
                queued(pipeline.custom(eval, args).await)?;
            }
            Segment::Native(i) => match &batch[*i] {
                StoreOp::Load { user, limit, .. } => {
                    let key = format!("{}in:{user}", settings.key_prefix);
                    // Registered before the read: an append after the read sees this node
                    // in the directory and pushes the entry here (see the module doc).
                    queued(
                        pipeline
                            .sadd(location_key(settings, user), &settings.node)
                            .await,
                    )?;
                    queued(
                        pipeline
                            .xtrim(key.as_str(), ("MINID", "=", minid.as_str()))
                            .await,
                    )?;
                    queued(
                        pipeline
                            .xrange(key.as_str(), minid.as_str(), "+", Some(*limit as u64))
                            .await,
                    )?;
                }
                StoreOp::Leave { user } => {
                    queued(
                        pipeline
                            .srem(location_key(settings, user), &settings.node)
                            .await,
                    )?;
                }
                StoreOp::Lease => {
                    let lease = Expiration::PX(settings.lease_ms as i64);
                    let key = lease_key(settings);
                    queued(pipeline.set(key, 1, Some(lease), None, true).await)?;
                }
                StoreOp::RoomLeave { room } => {
                    let key = format!("{}rn:{room}", settings.key_prefix);
                    queued(pipeline.srem(key, &settings.node).await)?;
                }
                _ => unreachable!("plan puts only native operations in Native segments"),
            },
        }
    }
    let results = tokio::time::timeout(settings.timeout, pipeline.try_all::<Value>())
        .await
        .map_err(|_| format!("no answer within {} ms", settings.timeout.as_millis()))?;
    let mut results = results.into_iter().map(|r| r.map_err(|e| e.to_string()));
    let mut next = || {
        results
            .next()
            .unwrap_or_else(|| Err("the pipeline answered fewer replies than it sent".into()))
    };
    let mut answers = Vec::with_capacity(batch.len());
    for segment in segments {
        match segment {
            Segment::Script(range) => {
                match next().and_then(|v| parse_batch(v, &batch[range.clone()])) {
                    Ok(parsed) => answers.extend(parsed.into_iter().map(Ok)),
                    Err(why) => answers.extend(range.map(|_| Err(why.clone()))),
                }
            }
            Segment::Native(i) => answers.push(match &batch[i] {
                StoreOp::Load { .. } => {
                    let (registered, trimmed, entries) = (next(), next(), next());
                    registered.and_then(|_| parse_load(trimmed, entries))
                }
                // SET .. GET answers the previous value: none means the lease had lapsed.
                StoreOp::Lease => next().map(|v| Answer::Leased(!matches!(v, Value::Null))),
                _ => next().map(|_| Answer::Done),
            }),
        }
    }
    Ok(answers)
}

pub(super) fn parse_load(
    trimmed: Result<Value, String>,
    entries: Result<Value, String>,
) -> Result<Answer, String> {
    let expired = integer(&trimmed?).unwrap_or(0);
    let raw = array(entries?)?;
    let mut parsed = Vec::with_capacity(raw.len());
    for entry in raw {
        parsed.push(parse_entry(entry)?);
    }
    Ok(Answer::Loaded(Loaded {
        entries: parsed,
        expired,
    }))
}

/// Keys and arguments of one script call.
pub(super) struct BatchCall {
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<String>,
}

impl BatchCall {
    pub(super) fn build(settings: &RedisSettings, batch: &[StoreOp]) -> BatchCall {
        let p = &settings.key_prefix;
        let mut keys = Vec::with_capacity(batch.len() * 4);
        let mut args = Vec::with_capacity(6 + batch.len() * 6);
        args.push(settings.max_age_ms.to_string());
        args.push(settings.max_messages.to_string());
        args.push(DEDUP_MIN_AGE_MS.to_string());
        args.push(DEDUP_MIN_ENTRIES.to_string());
        args.push(settings.node.clone());
        args.push(p.clone());
        args.push(settings.room_history_max.to_string());
        args.push(settings.room_history_age_ms.to_string());
        for op in batch {
            match op {
                StoreOp::Append(m) => {
                    keys.push(format!("{p}in:{}", m.to));
                    keys.push(format!("{p}dd:{}", m.from));
                    keys.push(format!("{p}dd:{}:old", m.from));
                    keys.push(location_key(settings, &m.to));
                    args.push("A".into());
                    args.push(m.id.to_string());
                    args.push(m.cid.to_string());
                    args.push(pack(m.id, m.ts, &m.from, &m.cid, &m.body));
                    args.push(m.to.to_string());
                }
                StoreOp::Remove { user, seq, report } => {
                    keys.push(format!("{p}in:{user}"));
                    match report {
                        Some(r) => {
                            keys.push(location_key(settings, &r.from));
                            args.push("D".into());
                            args.push(seq_to_stream_id(*seq));
                            args.push(pack_delivered(r));
                        }
                        None => {
                            args.push("R".into());
                            args.push(seq_to_stream_id(*seq));
                        }
                    }
                }
                StoreOp::Presence { users, .. } => {
                    keys.extend(users.iter().map(|u| location_key(settings, u)));
                    args.push("Q".into());
                    args.push(users.len().to_string());
                }
                StoreOp::RoomPublish(post) => {
                    room_keys(&mut keys, p, &post.room);
                    args.push("B".into());
                    args.push(post.room.to_string());
                    args.push(post.id.to_string());
                    // The dedup field: sender and cid, length-prefixed (ids may hold spaces).
                    args.push(format!("{} {}{}", post.from.len(), post.from, post.cid));
                    args.push(pack(post.id, post.ts, &post.from, &post.cid, &post.body));
                }
                StoreOp::RoomJoin(ask) => {
                    room_keys(&mut keys, p, &ask.room);
                    args.push("J".into());
                    args.push(ask.room.to_string());
                    args.push(ask.since.map_or_else(|| "-".into(), |s| s.to_string()));
                    args.push(format!("{} {} {}", ask.shard, ask.conn, ask.serial));
                }
                StoreOp::Probe => args.push("P".into()),
                StoreOp::Load { .. }
                | StoreOp::Leave { .. }
                | StoreOp::Lease
                | StoreOp::RoomLeave { .. } => {
                    unreachable!("native operations are not script operations (see plan)")
                }
            }
        }
        BatchCall { keys, args }
    }
}

/// One operation's answer, before it is paired with its operation again.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    Appended(Result<Appended, StoreError>),
    Removed(bool),
    Loaded(Loaded),
    Online(Vec<bool>),
    /// A room publish: (id, offset).
    Published(Result<(u64, u64), StoreError>),
    /// The lease was still held (false: it had lapsed; see [`StoreReply::Resync`]).
    Leased(bool),
    Done,
}

impl Answer {
    pub(super) fn into_reply(self, op: StoreOp) -> StoreReply {
        match (self, op) {
            (Answer::Appended(result), StoreOp::Append(msg)) => {
                StoreReply::Appended { msg, result }
            }
            (Answer::Removed(ok), StoreOp::Remove { report, .. }) => {
                StoreReply::Removed { ok, report }
            }
            (Answer::Loaded(loaded), StoreOp::Load { user, token, .. }) => StoreReply::Loaded {
                user,
                token,
                result: Ok(loaded),
            },
            (Answer::Online(online), StoreOp::Presence { ask, .. }) => StoreReply::Presence {
                ask,
                online: Some(online),
            },
            (Answer::Published(result), StoreOp::RoomPublish(post)) => {
                StoreReply::RoomPublished { post, result }
            }
            (Answer::Leased(_) | Answer::Done, _) => StoreReply::Done,
            // parse_batch checks kinds against the batch, so this cannot pair wrongly.
            (_, op) => unreachable!("answer kind differs from its operation: {}", op_name(&op)),
        }
    }
}

pub(super) fn op_name(op: &StoreOp) -> &'static str {
    match op {
        StoreOp::Append(_) => "append",
        StoreOp::Remove { .. } => "remove",
        StoreOp::Load { .. } => "load",
        StoreOp::Leave { .. } => "leave",
        StoreOp::Lease => "lease",
        StoreOp::Presence { .. } => "presence",
        StoreOp::RoomPublish(_) => "room publish",
        StoreOp::RoomJoin(_) => "room join",
        StoreOp::RoomLeave { .. } => "room leave",
        StoreOp::Probe => "probe",
    }
}

/// Pair the script's answers with the batch; any shape mismatch fails the whole batch.
pub(super) fn parse_batch(value: Value, batch: &[StoreOp]) -> Result<Vec<Answer>, String> {
    let Value::Array(items) = value else {
        return Err(format!("script answered {value:?}, not an array"));
    };
    if items.len() != batch.len() {
        return Err(format!(
            "script answered {} items for {} operations",
            items.len(),
            batch.len()
        ));
    }
    items
        .into_iter()
        .zip(batch)
        .map(|(item, op)| parse_answer(item, op))
        .collect()
}

pub(super) fn parse_answer(item: Value, op: &StoreOp) -> Result<Answer, String> {
    match op {
        StoreOp::Append(m) => {
            let parts = array(item)?;
            let status = parts.first().and_then(text).unwrap_or_default();
            let result = match status.as_str() {
                "ok" => {
                    let xid = parts.get(1).and_then(text).ok_or("append: no id")?;
                    Ok(Appended::Stored {
                        seq: stream_id_to_seq(&xid).ok_or_else(|| format!("bad id {xid}"))?,
                        expired: parts.get(2).and_then(integer).unwrap_or(0),
                        pushed: parts.get(3).and_then(integer).unwrap_or(0),
                    })
                }
                "dup" => {
                    let id = parts.get(1).and_then(text).ok_or("dup: no id")?;
                    Ok(Appended::Duplicate {
                        id: id.parse().map_err(|_| format!("bad message id {id}"))?,
                    })
                }
                "full" => Err(StoreError::Full {
                    user: m.to.to_string(),
                    count: parts.get(2).and_then(integer).unwrap_or(0) as usize,
                }),
                other => return Err(format!("append: unknown status {other:?}")),
            };
            Ok(Answer::Appended(result))
        }
        StoreOp::Remove { .. } => Ok(Answer::Removed(integer(&item).unwrap_or(0) > 0)),
        StoreOp::Presence { users, .. } => {
            let online: Vec<bool> = array(item)?.iter().map(|v| integer(v) == Some(1)).collect();
            if online.len() != users.len() {
                return Err(format!(
                    "presence: {} answers for {} users",
                    online.len(),
                    users.len()
                ));
            }
            Ok(Answer::Online(online))
        }
        StoreOp::RoomPublish(_) => {
            let parts = array(item)?;
            let status = parts.first().and_then(text).unwrap_or_default();
            if status != "ok" && status != "dup" {
                return Err(format!("room publish: unknown status {status:?}"));
            }
            // "<id> <offset>", for a new message and a resent cid alike.
            let pair = parts.get(1).and_then(text).unwrap_or_default();
            let parsed = pair
                .split_once(' ')
                .and_then(|(id, offset)| Some((id.parse().ok()?, offset.parse().ok()?)));
            let (id, offset) =
                parsed.ok_or_else(|| format!("room publish: bad answer {pair:?}"))?;
            Ok(Answer::Published(Ok((id, offset))))
        }
        StoreOp::Probe | StoreOp::RoomJoin(_) => match integer(&item) {
            Some(1) => Ok(Answer::Done),
            _ => Err(format!("{}: unexpected answer {item:?}", op_name(op))),
        },
        StoreOp::Load { .. }
        | StoreOp::Leave { .. }
        | StoreOp::Lease
        | StoreOp::RoomLeave { .. } => Err(format!("a {} in a script batch", op_name(op))),
    }
}
