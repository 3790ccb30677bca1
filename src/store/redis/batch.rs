//! One batch of a shard's operations as one pipeline: planning (script runs and native
//! commands, in order), the script call's keys and arguments, and pairing answers with
//! operations.
//!
//! # Redis Cluster
//! A script call may only touch keys its server holds. Every key of one user (or room) is in
//! one slot (see `keys.rs`), and the cluster script is flagged `allow-cross-slot-keys`
//! (Redis >= 7.0), so one call per *primary* carries all of that primary's operations of a
//! run (it declares one key, for routing: declared keys must share a slot; the others come
//! as arguments). What would cross servers is done from here instead, after the pipeline answered:
//! a `delivered` for the sender's other nodes (the sender's directory entry may live
//! elsewhere: `NOTIFY_SCRIPT` in the sender's slot), and the lease checks of presence
//! questions and room joins (`node:<run>` keys live anywhere: `EXISTS` each, then drop dead
//! runs from the sets that named them). Order still holds where it matters: a user's (or
//! room's) operations go to one server, on one connection, in batch order.

use std::collections::{HashMap, HashSet};

use fred::interfaces::{HashesInterface, StreamsInterface};
use fred::prelude::*;
use fred::types::cluster::ClusterRouting;
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand};

use super::keys::*;
use super::wire::*;
use super::{
    Appended, Fate, Loaded, RedisSettings, StoreOp, StoreReply, DEDUP_MIN_AGE_MS, DEDUP_MIN_ENTRIES,
};
use crate::delivery::ids::{IdGrant, ID_SLOTS, ID_SLOT_GRACE_MS};
use crate::store::StoreError;

/// The script every batch runs (the Lua text is its own file, to be read as Lua).
pub(super) const BATCH_SCRIPT: &str = include_str!("script.lua");
/// The same for Redis Cluster: one call may carry keys of several slots of one primary.
const CLUSTER_SCRIPT: &str = concat!(
    "#!lua flags=allow-cross-slot-keys\n",
    include_str!("script.lua")
);
/// Cluster only: publish `delivered` reports to the senders' other runs. ARGV: this run, the
/// key prefix, n, then n senders' directory entries and the n reports; KEYS[1]: the first
/// entry (routes the call; the others are on the same primary).
const NOTIFY_SCRIPT: &str = "#!lua flags=allow-cross-slot-keys
local me, prefix, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
for j = 1, n do
  for _, run in ipairs(redis.call('SMEMBERS', ARGV[3 + j])) do
    if run ~= me then redis.call('PUBLISH', prefix .. 'ch:' .. run, ARGV[3 + n + j]) end
  end
end
return 1";

/// Claim or renew a shard's message id slot (`delivery/ids.rs`). KEYS[1]: the `ids` hash,
/// slot -> `<holder> <expiry ms, Redis time>`. ARGV: holder (`<run>/<shard>`), the slot it
/// holds or -1, the lease (ms), the number of slots, where to start looking, the grace (ms).
/// Answers {slot, not before}. The slot held is renewed while no other holder has it (also
/// when its field is gone: a Redis that lost its data gives each holder its slot back at its
/// next renewal). Else a free slot, looking from a random start (the node's: Lua's is seeded
/// the same for every call), or the one expired longest ago if that was more than the grace
/// ago, not before its expiry plus the grace (its holder may issue until then); {-1, 0} when
/// no slot is free.
const ID_SLOT_SCRIPT: &str = "
local key, me, held = KEYS[1], ARGV[1], tonumber(ARGV[2])
local lease, slots, start = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local grace = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = me .. ' ' .. (now + lease)
if held >= 0 then
  local v = redis.call('HGET', key, held)
  if not v or string.sub(v, 1, #me + 1) == me .. ' ' then
    redis.call('HSET', key, held, mine)
    return {held, 0}
  end
end
local all = redis.call('HGETALL', key)
local expiry = {}
for i = 1, #all, 2 do
  expiry[tonumber(all[i])] = tonumber(string.match(all[i + 1], ' (%d+)$'))
end
local pick, after = -1, 0
for i = 0, slots - 1 do
  local s = (start + i) % slots
  local e = expiry[s]
  if e == nil then pick, after = s, 0 break end
  if e + grace <= now and (pick < 0 or e + grace < after) then pick, after = s, e + grace end
end
if pick >= 0 then redis.call('HSET', key, pick, mine) end
return {pick, after}";

/// Publish a `typing` push to every run in the recipient's directory entry but this one.
/// KEYS[1]: the entry; ARGV: this run, the key prefix, the push.
const TYPING_SCRIPT: &str = "
for _, run in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if run ~= ARGV[1] then redis.call('PUBLISH', ARGV[2] .. 'ch:' .. run, ARGV[3]) end
end
return 1";

/// Publish a load's read mark (`k <token> <user>`) on this run's channel. KEYS[1]: the
/// user's inbox, which routes the call to the server that runs the inbox's appends (and
/// publishes their pushes): in Redis Cluster a `PUBLISH` from another server could reach the
/// channel before pushes published earlier. ARGV: the channel, the mark.
const READ_MARK_SCRIPT: &str = "return redis.call('PUBLISH', ARGV[1], ARGV[2])";

/// A user's directory entry gains (`+`) or loses (`-`) this run; if that changed it, every
/// other run watching the user hears the entry's new size (`p <user bytes> <user><runs>`).
/// KEYS: the entry, the user's watchers; ARGV: this run, the key prefix, the user, + or -.
const DIRECTORY_SCRIPT: &str = "
local changed
if ARGV[4] == '+' then
  changed = redis.call('SADD', KEYS[1], ARGV[1])
else
  changed = redis.call('SREM', KEYS[1], ARGV[1])
end
if changed == 1 then
  local watchers = redis.call('SMEMBERS', KEYS[2])
  if #watchers > 0 then
    local push = 'p ' .. string.len(ARGV[3]) .. ' ' .. ARGV[3] .. redis.call('SCARD', KEYS[1])
    for _, run in ipairs(watchers) do
      if run ~= ARGV[1] then redis.call('PUBLISH', ARGV[2] .. 'ch:' .. run, push) end
    end
  end
end
return changed";

/// Add (`+`, with a TTL of ARGV[3] ms) or remove this run from a user's watchers.
const WATCHERS_SCRIPT: &str = "
if ARGV[2] == '+' then
  redis.call('SADD', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('SREM', KEYS[1], ARGV[1])
end
return 1";

/// How long a run stays among a user's watchers without renewing (it renews whenever a
/// connection starts watching the user): a run that died stops being told after it.
const WATCHERS_TTL_MS: u64 = 72 * 3600 * 1000;

/// How one batch goes to Redis, in one pipeline (one round trip), keeping the batch's order:
/// runs of script operations (appends, removes, presence, probes) as one script call each
/// (one per primary in a cluster), and the others as plain commands (a load is `SADD` +
/// `XTRIM` + `XRANGE`: Redis answers those natively, several times faster than through Lua,
/// which would convert every entry to a Lua table and back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    /// Operations (indexes into the batch) for one script call.
    Script(Vec<usize>),
    Native(usize),
}

/// Operations sent as plain commands. In a cluster, a presence question too (one `SMEMBERS`
/// per user: the users' entries are in many slots).
pub(super) fn is_native(op: &StoreOp, cluster: bool) -> bool {
    match op {
        StoreOp::Load { .. }
        | StoreOp::Leave { .. }
        | StoreOp::Lease
        | StoreOp::ClaimIdSlot { .. }
        | StoreOp::Typing { .. }
        | StoreOp::WatchPresence { .. }
        | StoreOp::RoomLeave { .. } => true,
        StoreOp::Presence { .. } => cluster,
        _ => false,
    }
}

/// Split the batch into segments. `server[i]`: which server takes operation `i` (all 0 but
/// in a cluster). Script operations join the open call of their server; a native operation
/// closes every open call, so whatever follows it in the batch also follows it in Redis.
pub(super) fn plan(batch: &[StoreOp], server: &[usize], cluster: bool) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut open: Vec<(usize, usize)> = Vec::new();
    for (i, op) in batch.iter().enumerate() {
        if is_native(op, cluster) {
            open.clear();
            segments.push(Segment::Native(i));
            continue;
        }
        match open.iter().find(|(s, _)| *s == server[i]) {
            Some(&(_, at)) => {
                if let Segment::Script(ops) = &mut segments[at] {
                    ops.push(i);
                }
            }
            None => {
                open.push((server[i], segments.len()));
                segments.push(Segment::Script(vec![i]));
            }
        }
    }
    segments
}

/// The key that decides an operation's server (None: any server will do).
fn routing_key(settings: &RedisSettings, op: &StoreOp) -> Option<String> {
    let p = &settings.key_prefix;
    match op {
        StoreOp::Append(m) => Some(inbox_key(p, &m.to)),
        StoreOp::Resolve { to, .. } => Some(inbox_key(p, to)),
        StoreOp::Remove { user, .. } | StoreOp::Load { user, .. } | StoreOp::Leave { user } => {
            Some(inbox_key(p, user))
        }
        StoreOp::RoomPublish(post) => Some(room_nodes_key(p, &post.room)),
        StoreOp::RoomJoin(ask) => Some(room_nodes_key(p, &ask.room)),
        StoreOp::RoomLeave { room } => Some(room_nodes_key(p, room)),
        StoreOp::Lease => Some(lease_key(p, &settings.node)),
        StoreOp::ClaimIdSlot { .. } => Some(id_slots_key(p)),
        StoreOp::Typing { to, .. } => Some(location_key(p, to)),
        StoreOp::WatchPresence { user, .. } => Some(location_key(p, user)),
        StoreOp::Presence { .. } | StoreOp::Probe => None,
    }
}

/// Which primary serves `key`, as a small number: the index of the first slot range that
/// primary serves (the same number for the same primary within one slot map).
fn server_of(routing: &ClusterRouting, key: &str) -> usize {
    routing
        .get_server(slot(key))
        .and_then(|primary| routing.slots().iter().position(|r| &r.primary == primary))
        .unwrap_or(0)
}

/// Each operation's server, as a small number (0 for every operation off a cluster).
fn servers(
    settings: &RedisSettings,
    batch: &[StoreOp],
    routing: Option<&ClusterRouting>,
) -> Vec<usize> {
    let Some(routing) = routing else {
        return vec![0; batch.len()];
    };
    batch
        .iter()
        .map(|op| routing_key(settings, op).map_or(0, |k| server_of(routing, &k)))
        .collect()
}

/// Oldest stream id a load returns: entries older are past the age cap.
pub(super) fn load_minid(settings: &RedisSettings) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(settings.max_age_ms).to_string()
}

/// Never buffered for a later connection, never resent after one dropped: a batch answered
/// `unavailable` must not be written behind the shard's back once Redis is back (it would
/// land after messages accepted since, out of order). A `MOVED` is followed once, an `ASK`
/// fails the batch (`redirect_once`: one attempt, as before 2026-12-06, let fred end the
/// client's connection task on an `ASK`).
fn once(
    client: &Client,
    settings: &RedisSettings,
) -> fred::clients::Pipeline<fred::clients::WithOptions<Client>> {
    let options = Options {
        fail_fast: true,
        max_attempts: Some(super::REDIRECT_ATTEMPTS),
        max_redirections: Some(super::REDIRECTIONS),
        timeout: Some(settings.timeout),
        ..Options::default()
    };
    fred::clients::Pipeline::from(client.with_options(&options))
}

/// How a batch that got no answer in time is reported (the breaker counts these).
pub(super) const TIMED_OUT: &str = "no answer within";

/// Send one batch; an answer (or the reason it failed) per operation. `Err`: nothing is
/// known of the whole batch (no answer in time, or the pipeline could not be sent).
pub(super) async fn run_batch(
    client: &Client,
    settings: &RedisSettings,
    shard: usize,
    batch: &[StoreOp],
) -> Result<Vec<Result<Answer, String>>, String> {
    let cluster = client.is_clustered();
    let routing = if cluster {
        client.cached_cluster_state()
    } else {
        None
    };
    if cluster && routing.is_none() {
        return Err("the cluster's slot map is not known yet".into());
    }
    let server = servers(settings, batch, routing.as_ref());
    let segments = plan(batch, &server, cluster);
    let pipeline = once(client, settings);
    let minid = load_minid(settings);
    let p = &settings.key_prefix;
    let queued = |r: Result<(), Error>| r.map_err(|e| e.to_string());
    for segment in &segments {
        match segment {
            Segment::Script(ops) => {
                let ops: Vec<&StoreOp> = ops.iter().map(|&i| &batch[i]).collect();
                let call = BatchCall::build(settings, shard, &ops, cluster);
                // EVAL with the text (not EVALSHA): a Redis restarted meanwhile has an empty
                // script cache, and a NOSCRIPT in the middle of a pipeline could not be retried
                // without reordering. The text is ~21 KB per call of up to 1,024 operations:
                // ~12 us of Redis's time for the call itself (docs/performance.md "Replay at 16
                // loads per batch").
                let (script, hash) = match call.keys.first() {
                    Some(key) if cluster => (CLUSTER_SCRIPT, ClusterHash::Custom(slot(key))),
                    _ => (BATCH_SCRIPT, ClusterHash::Random),
                };
                let mut args = Vec::with_capacity(2 + call.keys.len() + call.args.len());
                args.push(script.to_string());
                args.push(call.keys.len().to_string());
                args.extend(call.keys);
                args.extend(call.args);
                let eval = CustomCommand::new_static("EVAL", hash, false);
                queued(pipeline.custom(eval, args).await)?;
            }
            Segment::Native(i) => match &batch[*i] {
                StoreOp::Load {
                    user, limit, token, ..
                } => {
                    let key = inbox_key(p, user);
                    // Registered before the read: an append after the read sees this node
                    // in the directory and pushes the entry here (see the module doc).
                    queued(directory_change(&pipeline, settings, user, '+').await)?;
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
                    queued(pipeline.hgetall(received_key(p, user)).await)?;
                    // After the read, on the same connection: the mark comes on this node's
                    // channel behind every push of an entry appended before the read.
                    let mark = [channel_name(settings), pack_read_mark(*token, user)];
                    queued(eval(&pipeline, READ_MARK_SCRIPT, &[key], mark).await)?;
                }
                StoreOp::Leave { user } => {
                    queued(directory_change(&pipeline, settings, user, '-').await)?;
                }
                StoreOp::WatchPresence { user, on } => {
                    let change = if *on { "+" } else { "-" };
                    let args = [
                        settings.node.clone(),
                        change.into(),
                        WATCHERS_TTL_MS.to_string(),
                    ];
                    let keys = [watchers_key(p, user)];
                    queued(eval(&pipeline, WATCHERS_SCRIPT, &keys, args).await)?;
                }
                StoreOp::Lease => {
                    let lease = Expiration::PX(settings.lease_ms as i64);
                    let key = lease_key(p, &settings.node);
                    queued(pipeline.set(key, 1, Some(lease), None, true).await)?;
                }
                StoreOp::RoomLeave { room } => {
                    queued(pipeline.srem(room_nodes_key(p, room), &settings.node).await)?;
                }
                StoreOp::Typing { from, to } => {
                    let args = [settings.node.clone(), p.clone(), pack_typing(from, to)];
                    let keys = [location_key(p, to)];
                    queued(eval(&pipeline, TYPING_SCRIPT, &keys, args).await)?;
                }
                StoreOp::ClaimIdSlot { held, .. } => {
                    let args = [
                        format!("{}/{shard}", settings.node),
                        held.map_or(-1, i32::from).to_string(),
                        settings.lease_ms.to_string(),
                        ID_SLOTS.to_string(),
                        random_slot().to_string(),
                        ID_SLOT_GRACE_MS.to_string(),
                    ];
                    let keys = [id_slots_key(p)];
                    queued(eval(&pipeline, ID_SLOT_SCRIPT, &keys, args).await)?;
                }
                StoreOp::Presence { users, .. } => {
                    for user in users {
                        queued(pipeline.smembers(location_key(p, user)).await)?;
                    }
                }
                _ => unreachable!("plan puts only native operations in Native segments"),
            },
        }
    }
    let results = tokio::time::timeout(settings.timeout, pipeline.try_all::<Value>())
        .await
        .map_err(|_| format!("{TIMED_OUT} {} ms", settings.timeout.as_millis()))?;
    // fred's own request timeout (the same `timeout`) usually fires first, per command.
    let timeout_ms = settings.timeout.as_millis();
    let mut results = results.into_iter().map(|r| {
        r.map_err(|e| match e.kind() {
            fred::error::ErrorKind::Timeout => format!("{TIMED_OUT} {timeout_ms} ms"),
            _ => e.to_string(),
        })
    });
    let mut next = || {
        results
            .next()
            .unwrap_or_else(|| Err("the pipeline answered fewer replies than it sent".into()))
    };
    let mut answers: Vec<Option<Result<Answer, String>>> = (0..batch.len()).map(|_| None).collect();
    for segment in segments {
        match segment {
            Segment::Script(ops) => {
                let in_call: Vec<&StoreOp> = ops.iter().map(|&i| &batch[i]).collect();
                match next().and_then(|v| parse_batch(v, &in_call)) {
                    Ok(parsed) => {
                        for (i, answer) in ops.into_iter().zip(parsed) {
                            answers[i] = Some(Ok(answer));
                        }
                    }
                    Err(why) => {
                        for i in ops {
                            answers[i] = Some(Err(why.clone()));
                        }
                    }
                }
            }
            Segment::Native(i) => {
                answers[i] = Some(match &batch[i] {
                    StoreOp::Load { .. } => {
                        let (registered, trimmed, entries) = (next(), next(), next());
                        let (received, marked) = (next(), next());
                        registered
                            .and(marked)
                            .and_then(|_| parse_load(trimmed, entries, received))
                    }
                    // SET .. GET answers the previous value: none means the lease had lapsed.
                    StoreOp::Lease => next().map(|v| Answer::Leased(!matches!(v, Value::Null))),
                    StoreOp::ClaimIdSlot { .. } => next().and_then(parse_id_slot),
                    StoreOp::Presence { users, .. } => {
                        let sets: Result<Vec<_>, _> =
                            users.iter().map(|_| next().and_then(strings)).collect();
                        sets.map(Answer::Located)
                    }
                    _ => next().map(|_| Answer::Done),
                });
            }
        }
    }
    let mut answers: Vec<Result<Answer, String>> = answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err("no answer for an operation".into())))
        .collect();
    if let Some(routing) = &routing {
        cross_server_steps(client, settings, routing, batch, &mut answers).await;
        let moved = answers
            .iter()
            .any(|a| matches!(a, Err(why) if slot_map_is_stale(why)));
        if moved {
            refresh_slot_map(client, settings).await;
        }
    }
    Ok(answers)
}

/// Cluster errors that say the cached slot map is out of date. A script call is routed by its
/// first key only: when another of its keys sits in a slot that moved, Redis answers "non
/// local key", not the MOVED that makes fred refresh its map by itself, and every later batch
/// grouped by the old map would fail the same way until some call's first key moved.
/// This run joins (`+`) or leaves (`-`) `user`'s directory entry; watchers elsewhere hear it
/// (`DIRECTORY_SCRIPT`).
async fn directory_change(
    pipeline: &Pipe,
    settings: &RedisSettings,
    user: &str,
    change: char,
) -> Result<(), fred::error::Error> {
    let p = &settings.key_prefix;
    let keys = [location_key(p, user), watchers_key(p, user)];
    let args = [
        settings.node.clone(),
        p.clone(),
        user.to_string(),
        change.to_string(),
    ];
    eval(pipeline, DIRECTORY_SCRIPT, &keys, args).await
}

type Pipe = fred::clients::Pipeline<fred::clients::WithOptions<Client>>;

/// Queue one `EVAL` of a small script whose keys share a slot (the first routes the call):
/// the script text travels each time (no script cache to miss mid-pipeline).
async fn eval<const K: usize, const A: usize>(
    pipeline: &Pipe,
    script: &str,
    keys: &[String; K],
    args: [String; A],
) -> Result<(), fred::error::Error> {
    let route = ClusterHash::Custom(slot(&keys[0]));
    let command = CustomCommand::new_static("EVAL", route, false);
    let mut all = Vec::with_capacity(2 + K + A);
    all.push(script.to_string());
    all.push(K.to_string());
    all.extend(keys.iter().cloned());
    all.extend(args);
    pipeline.custom::<(), _>(command, all).await
}

pub(super) fn slot_map_is_stale(why: &str) -> bool {
    ["non local key", "MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"]
        .iter()
        .any(|sign| why.contains(sign))
}

/// Read the slot map again (bounded: a cluster that does not answer leaves the old one).
async fn refresh_slot_map(client: &Client, settings: &RedisSettings) {
    use fred::interfaces::ClusterInterface;
    match tokio::time::timeout(settings.timeout, client.sync_cluster()).await {
        Ok(Ok(())) => tracing::debug!("cluster slot map read again after a moved slot"),
        Ok(Err(e)) => tracing::debug!(error = %e, "cluster slot map not read again"),
        Err(_) => tracing::debug!("cluster slot map not read again in time"),
    }
}

/// Cluster only: what a script call could not do across servers (see the module doc).
/// Presence answers become `Online` here; a failure fails only the operations it concerns.
async fn cross_server_steps(
    client: &Client,
    settings: &RedisSettings,
    routing: &ClusterRouting,
    batch: &[StoreOp],
    answers: &mut [Result<Answer, String>],
) {
    let p = &settings.key_prefix;
    // Which sets name which other runs: presence entries and room node sets.
    let mut named: Vec<(String, Vec<String>)> = Vec::new();
    // Reports to publish, per primary of the sender's directory entry.
    let mut reports: HashMap<usize, (Vec<String>, Vec<String>)> = HashMap::new();
    for (op, answer) in batch.iter().zip(answers.iter()) {
        match (op, answer) {
            (StoreOp::Presence { users, .. }, Ok(Answer::Located(sets))) => {
                for (user, runs) in users.iter().zip(sets) {
                    named.push((location_key(p, user), runs.clone()));
                }
            }
            (StoreOp::RoomJoin(ask), Ok(Answer::RoomRuns(runs))) => {
                named.push((room_nodes_key(p, &ask.room), runs.clone()));
            }
            (
                StoreOp::Remove {
                    report: Some(r), ..
                },
                Ok(Answer::Removed(true)),
            ) => {
                let loc = location_key(p, &r.from);
                let (locs, packed) = reports.entry(server_of(routing, &loc)).or_default();
                locs.push(loc);
                packed.push(pack_delivered(r));
            }
            _ => {}
        }
    }
    if !reports.is_empty() {
        let notify = once(client, settings);
        for (locs, packed) in reports.into_values() {
            let eval =
                CustomCommand::new_static("EVAL", ClusterHash::Custom(slot(&locs[0])), false);
            let mut args = vec![
                NOTIFY_SCRIPT.to_string(),
                "1".into(),
                locs[0].clone(),
                settings.node.clone(),
                p.clone(),
                locs.len().to_string(),
            ];
            args.extend(locs);
            args.extend(packed);
            let _ = notify.custom::<(), _>(eval, args).await;
        }
        // At most once, like every push: a lost one is a `delivered` the sender's other
        // nodes do not show (the sender's own node reports from the answer).
        if let Some(e) = notify
            .try_all::<Value>()
            .await
            .into_iter()
            .find_map(Result::err)
        {
            tracing::warn!(error = %e, "cluster: a `delivered` for another node was not published");
        }
    }
    let live = if named.is_empty() {
        Ok(HashSet::new())
    } else {
        live_runs(client, settings, &named).await
    };
    for (op, answer) in batch.iter().zip(answers.iter_mut()) {
        let located = match answer {
            Ok(Answer::Located(sets)) => std::mem::take(sets),
            Ok(Answer::RoomRuns(_)) => {
                *answer = Ok(Answer::Done);
                continue;
            }
            _ => continue,
        };
        *answer = match (&live, op) {
            (Ok(live), StoreOp::Presence { .. }) => Ok(Answer::Online(
                located
                    .iter()
                    .map(|runs| runs.iter().any(|r| *r != settings.node && live.contains(r)))
                    .collect(),
            )),
            (Err(why), _) => Err(why.clone()),
            _ => Err("presence answer for another operation".into()),
        };
    }
}

/// Cluster only: which of the runs other than this one named in `named` hold a lease; the
/// others are removed from the sets that named them (they only cost pushes nobody hears).
async fn live_runs(
    client: &Client,
    settings: &RedisSettings,
    named: &[(String, Vec<String>)],
) -> Result<HashSet<String>, String> {
    let p = &settings.key_prefix;
    let mut runs: Vec<&String> = named
        .iter()
        .flat_map(|(_, r)| r)
        .filter(|r| **r != settings.node)
        .collect();
    runs.sort();
    runs.dedup();
    let mut live = HashSet::new();
    if runs.is_empty() {
        return Ok(live);
    }
    let exists = once(client, settings);
    for run in &runs {
        exists
            .exists::<(), _>(lease_key(p, run))
            .await
            .map_err(|e| e.to_string())?;
    }
    let found = exists.try_all::<Value>().await;
    let mut dead = HashSet::new();
    for (run, found) in runs.iter().zip(found) {
        match found.map_err(|e| e.to_string())? {
            Value::Integer(1) => live.insert((*run).clone()),
            _ => dead.insert((*run).clone()),
        };
    }
    if !dead.is_empty() {
        let mut dead_in: HashMap<&str, Vec<&String>> = HashMap::new();
        for (set, named_runs) in named {
            dead_in
                .entry(set)
                .or_default()
                .extend(named_runs.iter().filter(|r| dead.contains(*r)));
        }
        let cleanup = once(client, settings);
        for (set, gone) in dead_in.into_iter().filter(|(_, g)| !g.is_empty()) {
            let gone: Vec<String> = gone.into_iter().cloned().collect();
            let _ = cleanup.srem::<(), _, _>(set, gone).await;
        }
        let _ = cleanup.try_all::<Value>().await;
    }
    Ok(live)
}

pub(super) fn parse_load(
    trimmed: Result<Value, String>,
    entries: Result<Value, String>,
    received: Result<Value, String>,
) -> Result<Answer, String> {
    let expired = integer(&trimmed?).unwrap_or(0);
    let raw = array(entries?)?;
    let mut parsed = Vec::with_capacity(raw.len());
    for entry in raw {
        parsed.push(parse_entry(entry)?);
    }
    // HGETALL: flat field, value pairs (RESP2) or a map (RESP3); an entry that does not
    // read as (sender, id) is skipped (it only costs a receipt refused later).
    let pairs: Vec<(String, String)> = match received? {
        Value::Map(map) => map
            .inner()
            .into_iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_string()?)))
            .collect(),
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?.as_string()?, kv.get(1)?.as_string()?)))
            .collect(),
        _ => Vec::new(),
    };
    let received = pairs
        .into_iter()
        .filter_map(|(sender, id)| Some((sender.into(), id.parse().ok()?)))
        .collect();
    Ok(Answer::Loaded(Loaded {
        entries: parsed,
        expired,
        received,
    }))
}

/// Keys and arguments of one script call.
pub(super) struct BatchCall {
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<String>,
}

impl BatchCall {
    /// `shard`: the writer (with this run) whose attempts the appends carry.
    pub(super) fn build(
        settings: &RedisSettings,
        shard: usize,
        batch: &[&StoreOp],
        cluster: bool,
    ) -> BatchCall {
        let p = &settings.key_prefix;
        let mut keys = Vec::with_capacity(batch.len() * 4);
        let mut args = Vec::with_capacity(10 + batch.len() * 5);
        args.push(settings.max_age_ms.to_string());
        args.push(settings.max_messages.to_string());
        args.push(DEDUP_MIN_AGE_MS.to_string());
        args.push(DEDUP_MIN_ENTRIES.to_string());
        args.push(settings.node.clone());
        args.push(p.clone());
        args.push(settings.room_history_max.to_string());
        args.push(settings.room_history_age_ms.to_string());
        args.push("0".into()); // keys passed in ARGV: none (see below for a cluster)
        args.push(shard.to_string());
        for op in batch {
            match op {
                StoreOp::Append(m) => {
                    // The older dedup generation is named by the script from the current
                    // one, and only read when one exists (rarely: after 24 h and 10,000 cids).
                    keys.push(inbox_key(p, &m.to));
                    keys.push(dedup_key(p, &m.to, &m.from));
                    // The directory entry and the recipient are named by the script from
                    // the inbox key (two strings less per message).
                    // 'a': also answer whether nobody holds a device (a push is due).
                    args.push(if settings.watch_offline { "a" } else { "A" }.into());
                    args.push(m.id.to_string());
                    args.push(m.cid.to_string());
                    args.push(pack(
                        m.id,
                        m.ts,
                        &m.from,
                        &m.cid,
                        &m.body,
                        m.msg_type.as_deref(),
                    ));
                    args.push(m.write.attempt.to_string());
                }
                StoreOp::Resolve { to, from, writes } => {
                    keys.push(inbox_key(p, to));
                    keys.push(dedup_key(p, to, from));
                    args.push("V".into());
                    args.push(writes.len().to_string());
                    for (cid, attempt) in writes {
                        args.push(cid.to_string());
                        args.push(attempt.to_string());
                    }
                }
                StoreOp::Remove { user, seq, report } => {
                    keys.push(inbox_key(p, user));
                    // What the user received (a message, not a receipt), for read receipts.
                    let got = report
                        .as_ref()
                        .filter(|r| crate::proto::receipt_sender(&r.cid).is_none())
                        .map_or((String::new(), 0), |r| (r.from.to_string(), r.id));
                    match report {
                        // In a cluster the sender's entry may live on another server: the
                        // `delivered` is published after the answer (cross_server_steps).
                        Some(r) if !cluster => {
                            keys.push(location_key(p, &r.from));
                            keys.push(received_key(p, user));
                            args.push("D".into());
                            args.push(seq_to_stream_id(*seq));
                            args.extend([got.0, got.1.to_string()]);
                            args.push(pack_delivered(r));
                        }
                        _ => {
                            keys.push(received_key(p, user));
                            args.push("R".into());
                            args.push(seq_to_stream_id(*seq));
                            args.extend([got.0, got.1.to_string()]);
                        }
                    }
                }
                StoreOp::Presence { users, .. } => {
                    keys.extend(users.iter().map(|u| location_key(p, u)));
                    args.push("Q".into());
                    args.push(users.len().to_string());
                }
                StoreOp::RoomPublish(post) => {
                    keys.extend(room_keys(p, &post.room));
                    args.push("B".into());
                    args.push(post.room.to_string());
                    args.push(post.id.to_string());
                    // The dedup field: sender and cid, length-prefixed (ids may hold spaces).
                    args.push(format!("{} {}{}", post.from.len(), post.from, post.cid));
                    args.push(pack(
                        post.id, post.ts, &post.from, &post.cid, &post.body, None,
                    ));
                }
                StoreOp::RoomJoin(ask) => {
                    keys.extend(room_keys(p, &ask.room));
                    args.push("J".into());
                    args.push(ask.room.to_string());
                    args.push(ask.since.map_or_else(|| "-".into(), |s| s.to_string()));
                    let who = (ask.shard, ask.conn, ask.serial, ask.token);
                    args.push(format!("{} {} {} {}", who.0, who.1, who.2, who.3));
                }
                StoreOp::Probe => args.push("P".into()),
                StoreOp::Load { .. }
                | StoreOp::Leave { .. }
                | StoreOp::Lease
                | StoreOp::ClaimIdSlot { .. }
                | StoreOp::Typing { .. }
                | StoreOp::WatchPresence { .. }
                | StoreOp::RoomLeave { .. } => {
                    unreachable!("native operations are not script operations (see plan)")
                }
            }
        }
        if cluster {
            // Declared keys must share one slot (else CROSSSLOT, whatever the script's flags):
            // declare the first (it routes the call and is checked to be served there), pass
            // them all after the count in ARGV[9]; the script reads its keys from there (the
            // writing shard then follows them).
            args[8] = keys.len().to_string();
            let all = std::mem::take(&mut keys);
            keys.extend(all.first().cloned());
            args.splice(9..9, all);
        }
        BatchCall { keys, args }
    }
}

/// One operation's answer, before it is paired with its operation again.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// `trimmed`: inbox entries the age cap trimmed on the way (see [`StoreReply::Batch`]).
    Appended {
        result: Result<Appended, StoreError>,
        trimmed: u64,
    },
    Removed(bool),
    Loaded(Loaded),
    Online(Vec<bool>),
    /// A resolve: per write, what became of it.
    Resolved(Vec<Fate>),
    /// A room publish: (id, offset).
    Published(Result<(u64, u64), StoreError>),
    /// The lease was still held (false: it had lapsed; see [`StoreReply::Resync`]).
    Leased(bool),
    /// A message id slot claim: the slot held now, or why none is.
    IdSlot(Result<IdGrant, String>),
    /// Cluster, until the leases are checked: each asked user's directory entry.
    Located(Vec<Vec<String>>),
    /// Cluster, until the leases are checked: a joined room's other runs.
    RoomRuns(Vec<String>),
    Done,
}

impl Answer {
    /// Inbox entries the age cap trimmed on the way to this answer.
    pub(super) fn trimmed(&self) -> u64 {
        match self {
            Answer::Appended { trimmed, .. } => *trimmed,
            _ => 0,
        }
    }

    pub(super) fn into_reply(self, op: StoreOp) -> StoreReply {
        match (self, op) {
            (Answer::Appended { result, .. }, StoreOp::Append(msg)) => {
                StoreReply::Appended { msg, result }
            }
            (Answer::Removed(ok), StoreOp::Remove { user, seq, report }) => StoreReply::Removed {
                user,
                seq,
                ran: true,
                ok,
                report,
            },
            (Answer::Loaded(loaded), StoreOp::Load { user, token, .. }) => StoreReply::Loaded {
                user,
                token,
                result: Ok(loaded),
            },
            (Answer::Online(online), StoreOp::Presence { ask, users }) => StoreReply::Presence {
                ask,
                users,
                online: Some(online),
            },
            (Answer::Resolved(landed), StoreOp::Resolve { to, from, writes }) => {
                StoreReply::Resolved {
                    to,
                    from,
                    writes,
                    landed: Some(landed),
                }
            }
            (Answer::Published(result), StoreOp::RoomPublish(post)) => {
                StoreReply::RoomPublished { post, result }
            }
            (Answer::IdSlot(answer), StoreOp::ClaimIdSlot { asked_at, .. }) => {
                StoreReply::IdSlot { asked_at, answer }
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
        StoreOp::ClaimIdSlot { .. } => "id slot claim",
        StoreOp::Typing { .. } => "typing",
        StoreOp::WatchPresence { .. } => "presence watch",
        StoreOp::Presence { .. } => "presence",
        StoreOp::RoomPublish(_) => "room publish",
        StoreOp::RoomJoin(_) => "room join",
        StoreOp::RoomLeave { .. } => "room leave",
        StoreOp::Probe => "probe",
        StoreOp::Resolve { .. } => "resolve",
    }
}

/// Pair the script's answers with the batch; any shape mismatch fails the whole batch.
pub(super) fn parse_batch(value: Value, batch: &[&StoreOp]) -> Result<Vec<Answer>, String> {
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
            // The common answer is the bare stream id (nothing expired, no other node).
            if let Some(xid) = text_ref(&item) {
                let seq = stream_id_to_seq(xid).ok_or_else(|| format!("bad id {xid}"))?;
                return Ok(Answer::Appended {
                    result: Ok(Appended::Stored {
                        seq,
                        pushed: 0,
                        offline: false,
                    }),
                    trimmed: 0,
                });
            }
            // {'ok', id, trimmed, pushed[, 1: offline]}, {'dup', first id, trimmed},
            // {'full', trimmed, count}
            let parts = array(item)?;
            let status = parts.first().and_then(text).unwrap_or_default();
            let number = |i: usize| parts.get(i).and_then(integer).unwrap_or(0);
            let (result, trimmed) = match status.as_str() {
                "ok" => {
                    let xid = parts.get(1).and_then(text).ok_or("append: no id")?;
                    let seq = stream_id_to_seq(&xid).ok_or_else(|| format!("bad id {xid}"))?;
                    (
                        Ok(Appended::Stored {
                            seq,
                            pushed: number(3),
                            offline: number(4) == 1,
                        }),
                        number(2),
                    )
                }
                "dup" => {
                    let id = parts.get(1).and_then(text).ok_or("dup: no id")?;
                    let id = id.parse().map_err(|_| format!("bad message id {id}"))?;
                    (Ok(Appended::Duplicate { id }), number(2))
                }
                // A write this shard already reported as failed: nothing was written.
                "stale" => (Err(StoreError::Stale), 0),
                "full" => {
                    let user = m.to.to_string();
                    (
                        Err(StoreError::Full {
                            user,
                            count: number(2) as usize,
                        }),
                        number(1),
                    )
                }
                other => return Err(format!("append: unknown status {other:?}")),
            };
            Ok(Answer::Appended { result, trimmed })
        }
        StoreOp::Remove { .. } => Ok(Answer::Removed(integer(&item).unwrap_or(0) > 0)),
        StoreOp::Resolve { writes, .. } => {
            let fates: Option<Vec<Fate>> = text_ref(&item).and_then(|text| {
                text.split(' ')
                    .map(|fate| match fate {
                        "y" => Some(Fate::Landed),
                        "n" => Some(Fate::Never),
                        dup => dup.strip_prefix('d')?.parse().ok().map(Fate::Duplicate),
                    })
                    .collect()
            });
            match fates {
                Some(fates) if fates.len() == writes.len() => Ok(Answer::Resolved(fates)),
                _ => Err(format!("resolve: unexpected answer {item:?}")),
            }
        }
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
        // In a cluster, a join answers the room's other runs for the lease check.
        StoreOp::RoomJoin(_) if matches!(item, Value::Array(_)) => {
            let mut runs = strings(item)?;
            match runs.first().map(String::as_str) {
                Some("1") => Ok(Answer::RoomRuns(runs.split_off(1))),
                _ => Err(format!("room join: unexpected answer {runs:?}")),
            }
        }
        StoreOp::Probe | StoreOp::RoomJoin(_) => match integer(&item) {
            Some(1) => Ok(Answer::Done),
            _ => Err(format!("{}: unexpected answer {item:?}", op_name(op))),
        },
        StoreOp::Load { .. }
        | StoreOp::Leave { .. }
        | StoreOp::Lease
        | StoreOp::ClaimIdSlot { .. }
        | StoreOp::Typing { .. }
        | StoreOp::WatchPresence { .. }
        | StoreOp::RoomLeave { .. } => Err(format!("a {} in a script batch", op_name(op))),
    }
}

/// The id slot script's answer: {slot, not before} (slot -1: every slot is held).
fn parse_id_slot(v: Value) -> Result<Answer, String> {
    let pair = match &v {
        Value::Array(items) => match items.as_slice() {
            [Value::Integer(slot), Value::Integer(after)] => (Some(*slot), Some(*after)),
            _ => (None, None),
        },
        _ => (None, None),
    };
    match pair {
        (Some(-1), Some(_)) => Ok(Answer::IdSlot(Err(format!(
            "all {ID_SLOTS} message id slots are held by live shards (of every node on this Redis)"
        )))),
        (Some(slot), Some(after)) if (0..ID_SLOTS as i64).contains(&slot) && after >= 0 => {
            Ok(Answer::IdSlot(Ok(IdGrant {
                slot: slot as u16,
                not_before_ms: after as u64,
            })))
        }
        _ => Err(format!("id slot claim: unexpected answer {v:?}")),
    }
}

/// Where a claim starts looking: random bits from the OS, through std's per-process hash keys
/// (a new `RandomState` differs from the last).
fn random_slot() -> u16 {
    use std::hash::BuildHasher;
    (std::collections::hash_map::RandomState::new().hash_one(0u8) % ID_SLOTS as u64) as u16
}
