//! `ringgate-bench store`: spill and replay throughput of ringgate's Redis store, measured
//! through the same code a shard uses (`ringgate::store::redis`: the Redis thread, its batch
//! script, the lock-free links), against a real redis-server. One thread per simulated shard
//! keeps up to `in_flight` operations queued, like a busy shard would.
//!
//! Phases, each timed on its own: spill (append `messages` to each of `users` offline
//! inboxes), replay (load every inbox, as on connect), ack (remove every entry, as after the
//! acks). Every answer is checked: the run fails unless every message was stored once and read
//! back once, in order.

use std::io::Read;
use std::time::{Duration, Instant};

use clap::Args;
use compact_str::CompactString;
use ringgate::delivery::message::{Message, Outcome, ReplyTo, Report, StoreWrite};
use ringgate::store::redis::{self, Appended, RedisSettings, StoreLink, StoreOp, StoreReply};
use serde_json::json;

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// Redis to measure against (loopback only)
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Simulated shards (one link, one Redis connection and one thread each)
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Offline users (inboxes), spread over the shards
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Messages spilled to each user's inbox
    #[arg(long, default_value_t = 100)]
    messages: usize,
    /// Body bytes per message
    #[arg(long, default_value_t = 64)]
    body: usize,
    /// Distinct senders the messages come from (each has its own dedup window in Redis)
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Operations each shard keeps queued at most
    #[arg(long, default_value_t = 4096)]
    in_flight: usize,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

struct ShardRun {
    spill: Duration,
    replay: Duration,
    ack: Duration,
    stored: u64,
    replayed: u64,
    removed: u64,
    batches: u64,
}

pub fn run(a: StoreArgs) -> Result<i32, String> {
    let host = a
        .redis_url
        .split("://")
        .nth(1)
        .and_then(|r| r.rsplit('@').next())
        .unwrap_or("");
    if !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")) {
        return Err(format!(
            "{}: only loopback Redis is a load target",
            a.redis_url
        ));
    }
    if a.shards == 0 || a.users < a.shards || a.messages == 0 || a.senders == 0 {
        return Err("need shards >= 1, users >= shards, messages >= 1, senders >= 1".into());
    }
    let homed = |s: usize| {
        (0..a.users).any(|u| ringgate::mesh::home_shard(&format!("r{u}"), a.shards) == s)
    };
    if !(0..a.shards).all(homed) {
        return Err("every shard needs a user homed on it: more users".into());
    }
    let prefix = format!("rgbench:{}:", std::process::id());
    let settings = RedisSettings {
        url: a.redis_url.clone(),
        pool_size: a.shards,
        timeout: Duration::from_secs(10),
        key_prefix: prefix.clone(),
        max_messages: a.messages.max(10_000),
        // The gateway's default age cap: a shorter one than the dedup window makes every
        // append refresh its inbox's TTL (see script.lua), which a deployment does not pay.
        // The keys are deleted after the run.
        max_age_ms: ringgate::store::DEFAULT_INBOX_MAX_AGE_MS,
        node: format!("bench-{}", std::process::id()),
        lease_ms: 10_000,
        room_history_max: 1_000,
        room_history_age_ms: 60_000,
        tls_ca: None,
        watch_offline: false,
    };
    let links = redis::start(settings, a.shards).map_err(|e| e.to_string())?;
    let body: std::sync::Arc<str> = json!("x".repeat(a.body.saturating_sub(2)))
        .to_string()
        .into();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(a.shards));
    let handles: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(shard, link)| {
            // Each simulated shard spills to the users homed on it, as a gateway's mirrors
            // are: the store sends a user's read marks to the user's home shard.
            let users: Vec<CompactString> = (0..a.users)
                .map(|u| CompactString::from(format!("r{u}")))
                .filter(|u| ringgate::mesh::home_shard(u, a.shards) == shard)
                .collect();
            let senders: Vec<CompactString> = (0..a.senders)
                .map(|s| CompactString::from(format!("s{s}")))
                .collect();
            let (body, barrier, messages, in_flight) =
                (body.clone(), barrier.clone(), a.messages, a.in_flight);
            std::thread::spawn(move || {
                let load = Load {
                    users,
                    senders,
                    messages,
                    body,
                };
                run_shard(shard, link, load, in_flight, &barrier)
            })
        })
        .collect();
    // The first shard to fail ends the run: the others may be waiting at a phase's barrier
    // for it, which would never open.
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut runs = Vec::new();
    while runs.len() < pending.len() {
        for slot in pending.iter_mut() {
            if slot.as_ref().is_some_and(|h| h.is_finished()) {
                let h = slot.take().expect("checked");
                runs.push(
                    h.join()
                        .map_err(|_| "a shard thread panicked".to_string())??,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match a.redis_url.strip_prefix("redis://") {
        Some(addr) => crate::redis_floor::delete_prefixed(addr.trim_end_matches('/'), &prefix)
            .map_err(|e| format!("deleting the run's keys ({prefix}*): {e}"))?,
        None => eprintln!("store: keys under {prefix} left in Redis (deleted only on redis://)"),
    }
    let total = (a.users * a.messages) as u64;
    let sum = |f: fn(&ShardRun) -> u64| runs.iter().map(f).sum::<u64>();
    let slowest = |f: fn(&ShardRun) -> Duration| runs.iter().map(f).max().unwrap_or_default();
    let (stored, replayed, removed) = (sum(|r| r.stored), sum(|r| r.replayed), sum(|r| r.removed));
    if stored != total || replayed != total || removed != total {
        return Err(format!(
            "counts differ: expected {total}, stored {stored}, replayed {replayed}, removed {removed}"
        ));
    }
    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    let (spill, replay, ack) = (
        slowest(|r| r.spill),
        slowest(|r| r.replay),
        slowest(|r| r.ack),
    );
    let out = json!({
        "scenario": "store",
        "shards": a.shards, "users": a.users, "senders": a.senders, "messages_per_user": a.messages, "body_bytes": a.body,
        "messages": total,
        "spill_per_s": rate(total, spill).round(),
        "replay_per_s": rate(total, replay).round(),
        "ack_remove_per_s": rate(total, ack).round(),
        "redis_batches": sum(|r| r.batches),
        "spill_s": spill.as_secs_f64(), "replay_s": replay.as_secs_f64(), "ack_s": ack.as_secs_f64(),
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "store: {} messages ({} users x {}, from {} sender(s)), {} B bodies, {} shard(s)\n  spill  {:>10.0} msg/s  ({:.2} s)\n  replay {:>10.0} msg/s  ({:.2} s)\n  remove {:>10.0} msg/s  ({:.2} s)\n  {} Redis batches; every message stored once, read back once in order, removed once",
            total, a.users, a.messages, a.senders, a.body, a.shards,
            rate(total, spill), spill.as_secs_f64(),
            rate(total, replay), replay.as_secs_f64(),
            rate(total, ack), ack.as_secs_f64(),
            sum(|r| r.batches),
        );
    }
    Ok(0)
}

/// Wait for answers: the store rings the shard's doorbell after each batch. Empty when the
/// bell's read timed out (the caller checks its deadline).
fn next_replies(link: &StoreLink, bell: &mut std::os::unix::net::UnixStream) -> Vec<StoreReply> {
    let mut out = Vec::new();
    link.take_replies(&mut out, usize::MAX);
    if out.is_empty() {
        let mut buf = [0u8; 64];
        let _ = bell.read(&mut buf);
        link.clear_bell();
        link.take_replies(&mut out, usize::MAX);
    }
    out
}

/// One simulated shard's end of the store: submits a phase's operations keeping at most
/// `in_flight` queued, and hands every answer to the phase.
struct Driver {
    link: StoreLink,
    bell: std::os::unix::net::UnixStream,
    in_flight: usize,
    batches: u64,
    /// Read marks come on the node's channel, one behind each load's read.
    read_marks: usize,
}

impl Driver {
    /// Submit `ops` operations (`make(i)` builds the i-th) and pass each answer to `answer`,
    /// until all are answered and `read_marks` marks have come (a shard shows a load's
    /// entries only then). Returns the phase's duration.
    fn phase(
        &mut self,
        ops: usize,
        read_marks: usize,
        mut make: impl FnMut(usize) -> StoreOp,
        mut answer: impl FnMut(StoreReply) -> Result<(), String>,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(600);
        // Read marks come right behind their loads' reads: 20 s after the last answer is a
        // mark lost (published while the node's channel was being subscribed again, say).
        let mut marks_by: Option<Instant> = None;
        let mut resyncs = 0usize;
        let (mut next, mut answered) = (0usize, 0usize);
        while answered < ops || self.read_marks < read_marks {
            while next < ops && next - answered < self.in_flight {
                if self.link.submit(make(next)).is_err() {
                    break; // the queue is full: wait for answers
                }
                next += 1;
            }
            for reply in next_replies(&self.link, &mut self.bell) {
                // Notices on the node's channel are not answers: cluster notices (this bench's
                // node joins the directory), and the loads' read marks (counted).
                if matches!(reply, StoreReply::ReadMarked { .. }) {
                    self.read_marks += 1;
                    continue;
                }
                if matches!(reply, StoreReply::Resync) {
                    resyncs += 1;
                    continue;
                }
                if matches!(reply, StoreReply::Pushed { .. }) {
                    continue;
                }
                if matches!(reply, StoreReply::Batch { .. }) {
                    self.batches += 1;
                } else {
                    answered += 1;
                    answer(reply)?;
                }
            }
            let now = Instant::now();
            if answered == ops && marks_by.is_none() {
                marks_by = Some(now + Duration::from_secs(20));
            }
            if now > deadline || marks_by.is_some_and(|by| now > by) {
                return Err(format!(
                    "a phase ran out of time ({} s): {answered} of {ops} answers, {} of {read_marks} read marks, {resyncs} resyncs meanwhile",
                    now.duration_since(started).as_secs(),
                    self.read_marks
                ));
            }
        }
        Ok(started.elapsed())
    }
}

/// What one simulated shard spills.
struct Load {
    users: Vec<CompactString>,
    senders: Vec<CompactString>,
    messages: usize,
    body: std::sync::Arc<str>,
}

fn run_shard(
    shard: usize,
    mut link: StoreLink,
    load: Load,
    in_flight: usize,
    barrier: &std::sync::Barrier,
) -> Result<ShardRun, String> {
    let Load {
        users,
        senders,
        messages,
        body,
    } = load;
    let bell = link.bell_reader.take().expect("bell");
    bell.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut driver = Driver {
        link,
        bell,
        in_flight,
        batches: 0,
        read_marks: 0,
    };
    let n_users = users.len();
    // The node's channel is heard once the store has subscribed to it, which it tells every
    // shard with a resync (a gateway's mirrors reload then); read marks published before are
    // lost, so the loads wait for it.
    let subscribed_by = Instant::now() + Duration::from_secs(10);
    while !next_replies(&driver.link, &mut driver.bell)
        .iter()
        .any(|r| matches!(r, StoreReply::Resync))
    {
        if Instant::now() > subscribed_by {
            return Err("the store did not subscribe to the node's channel in 10 s".into());
        }
    }

    // Spill: message k to user u, interleaved over users like real traffic. The message id
    // carries its index, so an answer finds its user: shaped like a gateway's (ms | issuer
    // slot | seq, `delivery::ids`), one millisecond per message and the shard as the slot,
    // so that each pair's ids are issued in order by the script's rule (`~top`).
    barrier.wait();
    let mut seqs: Vec<Vec<u64>> = vec![Vec::with_capacity(messages); n_users];
    let mut stored = 0u64;
    let spill = driver.phase(
        n_users * messages,
        0,
        |i| {
            StoreOp::Append(Box::new(Message {
                id: (i as u64 + 1) << 22 | (shard as u64) << 9,
                from: senders[i % senders.len()].clone(),
                to: users[i % n_users].clone(),
                cid: format!("\"{shard}-{i}\"").into(),
                ts: (i / n_users) as u64,
                body: body.clone(),
                msg_type: None,
                reply: ReplyTo::all_devices(shard),
                received_us: 0,
                // Increasing per shard, as the shard numbers its writes (older ones are stale).
                write: StoreWrite {
                    attempt: i as u64 + 1,
                    to_mirror: false,
                },
                // First attempts: a live delivery could go past the store.
                resent: false,
                // (Read only on the live path, which the store never takes.)
                sender_arrived_ms: 0,
                refused_earlier: None,
            }))
        },
        |reply| match reply {
            StoreReply::Appended {
                msg,
                result: Ok(Appended::Stored { seq, .. }),
            } => {
                let index = (msg.id >> 22) as usize - 1;
                seqs[index % n_users].push(seq);
                stored += 1;
                Ok(())
            }
            StoreReply::Appended { msg, result } => {
                Err(format!("append of {} failed: {result:?}", msg.cid))
            }
            _ => Err("unexpected answer during spill".into()),
        },
    )?;

    // Replay: read every inbox, as on connect (one load per user, up to `messages`).
    barrier.wait();
    let mut replayed = 0u64;
    let replay = driver.phase(
        n_users,
        n_users,
        |u| StoreOp::Load {
            user: users[u].clone(),
            token: u as u64,
            limit: messages,
        },
        |reply| {
            let StoreReply::Loaded { token, result, .. } = reply else {
                return Err("unexpected answer during replay".into());
            };
            let loaded = result.map_err(|e| format!("load failed: {e}"))?;
            let got: Vec<u64> = loaded.entries.iter().map(|(s, _)| *s).collect();
            if got != seqs[token as usize] {
                return Err(format!(
                    "inbox {} read back differently",
                    users[token as usize]
                ));
            }
            replayed += got.len() as u64;
            Ok(())
        },
    )?;

    // Ack: remove every entry, as the acks of the replayed messages would.
    barrier.wait();
    let all: Vec<(usize, u64)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(u, s)| s.iter().map(move |&q| (u, q)))
        .collect();
    let mut removed = 0u64;
    let ack = driver.phase(
        all.len(),
        0,
        // As a gateway removes: with the `delivered` report for the sender's other nodes.
        |i| StoreOp::Remove {
            user: users[all[i].0].clone(),
            seq: all[i].1,
            report: Some(Box::new(Report {
                id: i as u64,
                from: "bench-sender".into(),
                to: users[all[i].0].clone(),
                cid: format!("\"{i}\"").into(),
                reply: ReplyTo::all_devices(0),
                outcome: Outcome::Delivered,
                received_us: 0,
            })),
        },
        |reply| match reply {
            StoreReply::Removed { ok: true, .. } => {
                removed += 1;
                Ok(())
            }
            _ => Err("a remove failed".into()),
        },
    )?;
    if driver.read_marks != n_users {
        return Err(format!(
            "{} read marks for {n_users} loads",
            driver.read_marks
        ));
    }
    Ok(ShardRun {
        spill,
        replay,
        ack,
        stored,
        replayed,
        removed,
        batches: driver.batches,
    })
}
