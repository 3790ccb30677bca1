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
use ringgate::delivery::message::{Message, ReplyTo};
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
    if a.shards == 0 || a.users < a.shards || a.messages == 0 {
        return Err("need shards >= 1, users >= shards, messages >= 1".into());
    }
    let prefix = format!("rgbench:{}:", std::process::id());
    let settings = RedisSettings {
        url: a.redis_url.clone(),
        pool_size: a.shards,
        timeout: Duration::from_secs(10),
        key_prefix: prefix.clone(),
        max_messages: a.messages.max(10_000),
        // Whatever a run leaves behind expires within 20 minutes.
        max_age_ms: 10 * 60 * 1000,
    };
    let links = redis::start(settings, a.shards).map_err(|e| e.to_string())?;
    let body: Box<str> = json!("x".repeat(a.body.saturating_sub(2)))
        .to_string()
        .into();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(a.shards));
    let handles: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(shard, link)| {
            let users: Vec<CompactString> = (shard..a.users)
                .step_by(a.shards)
                .map(|u| CompactString::from(format!("r{u}")))
                .collect();
            let (body, barrier, messages, in_flight) =
                (body.clone(), barrier.clone(), a.messages, a.in_flight);
            std::thread::spawn(move || {
                run_shard(shard, link, users, messages, body, in_flight, &barrier)
            })
        })
        .collect();
    let mut runs = Vec::new();
    for h in handles {
        runs.push(
            h.join()
                .map_err(|_| "a shard thread panicked".to_string())??,
        );
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
        "shards": a.shards, "users": a.users, "messages_per_user": a.messages, "body_bytes": a.body,
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
            "store: {} messages ({} users x {}), {} B bodies, {} shard(s)\n  spill  {:>10.0} msg/s  ({:.2} s)\n  replay {:>10.0} msg/s  ({:.2} s)\n  remove {:>10.0} msg/s  ({:.2} s)\n  {} Redis batches; every message stored once, read back once in order, removed once",
            total, a.users, a.messages, a.body, a.shards,
            rate(total, spill), spill.as_secs_f64(),
            rate(total, replay), replay.as_secs_f64(),
            rate(total, ack), ack.as_secs_f64(),
            sum(|r| r.batches),
        );
    }
    Ok(0)
}

/// Wait for answers: the store rings the shard's doorbell after each batch.
fn next_replies(link: &StoreLink, bell: &mut std::os::unix::net::UnixStream) -> Vec<StoreReply> {
    loop {
        let mut out = Vec::new();
        link.take_replies(&mut out, usize::MAX);
        if !out.is_empty() {
            return out;
        }
        let mut buf = [0u8; 64];
        let _ = bell.read(&mut buf);
        link.clear_bell();
    }
}

fn run_shard(
    shard: usize,
    mut link: StoreLink,
    users: Vec<CompactString>,
    messages: usize,
    body: Box<str>,
    in_flight: usize,
    barrier: &std::sync::Barrier,
) -> Result<ShardRun, String> {
    let mut bell = link.bell_reader.take().expect("bell");
    bell.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut batches = 0u64;
    let mut queued = 0usize;
    let count_batches = |replies: &[StoreReply]| {
        replies
            .iter()
            .filter(|r| matches!(r, StoreReply::Batch { .. }))
            .count() as u64
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let check_time = || {
        if Instant::now() > deadline {
            Err("a phase took over 10 minutes".to_string())
        } else {
            Ok(())
        }
    };

    // Spill: message k to user u, interleaved over users like real traffic.
    barrier.wait();
    let started = Instant::now();
    let mut next = 0usize;
    let total = users.len() * messages;
    let mut stored = 0u64;
    let mut seqs: Vec<Vec<u64>> = vec![Vec::with_capacity(messages); users.len()];
    while stored < total as u64 {
        while next < total && queued < in_flight {
            let (k, u) = (next / users.len(), next % users.len());
            let msg = Message {
                id: (shard as u64) << 40 | next as u64,
                from: "bench-sender".into(),
                to: users[u].clone(),
                cid: format!("\"{shard}-{next}\"").into(),
                ts: k as u64,
                body: body.clone(),
                reply: ReplyTo::all_devices(shard),
                received: Instant::now(),
            };
            if link.submit(StoreOp::Append(Box::new(msg))).is_err() {
                break;
            }
            next += 1;
            queued += 1;
        }
        let replies = next_replies(&link, &mut bell);
        batches += count_batches(&replies);
        for r in replies {
            if let StoreReply::Appended { msg, result } = r {
                queued -= 1;
                match result {
                    Ok(Appended::Stored { seq, .. }) => {
                        stored += 1;
                        // The id carries the message's index (see the submit loop).
                        let index = (msg.id & ((1 << 40) - 1)) as usize;
                        seqs[index % users.len()].push(seq);
                    }
                    other => return Err(format!("append of {} failed: {other:?}", msg.cid)),
                }
            }
        }
        check_time()?;
    }
    let spill = started.elapsed();

    // Replay: read every inbox, as on connect (one load per user, up to `messages`).
    barrier.wait();
    let started = Instant::now();
    let mut replayed = 0u64;
    let mut loads_left = users.len();
    let mut next = 0usize;
    while loads_left > 0 {
        while next < users.len() && queued < in_flight {
            let op = StoreOp::Load {
                user: users[next].clone(),
                token: next as u64,
                limit: messages,
            };
            if link.submit(op).is_err() {
                break;
            }
            next += 1;
            queued += 1;
        }
        let replies = next_replies(&link, &mut bell);
        batches += count_batches(&replies);
        for r in replies {
            if let StoreReply::Loaded { token, result, .. } = r {
                queued -= 1;
                loads_left -= 1;
                let loaded = result.map_err(|e| format!("load failed: {e}"))?;
                let got: Vec<u64> = loaded.entries.iter().map(|(s, _)| *s).collect();
                if got != seqs[token as usize] {
                    return Err(format!(
                        "inbox {} read back differently",
                        users[token as usize]
                    ));
                }
                replayed += got.len() as u64;
            }
        }
        check_time()?;
    }
    let replay = started.elapsed();

    // Ack: remove every entry, as the acks of the replayed messages would.
    barrier.wait();
    let started = Instant::now();
    let mut removed = 0u64;
    let all: Vec<(usize, u64)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(u, s)| s.iter().map(move |&q| (u, q)))
        .collect();
    let mut next = 0usize;
    while removed < all.len() as u64 {
        while next < all.len() && queued < in_flight {
            let (u, seq) = all[next];
            let op = StoreOp::Remove {
                user: users[u].clone(),
                seq,
            };
            if link.submit(op).is_err() {
                break;
            }
            next += 1;
            queued += 1;
        }
        let replies = next_replies(&link, &mut bell);
        batches += count_batches(&replies);
        for r in replies {
            if let StoreReply::Removed { ok } = r {
                queued -= 1;
                if !ok {
                    return Err("a remove failed".into());
                }
                removed += 1;
            }
        }
        check_time()?;
    }
    let ack = started.elapsed();
    Ok(ShardRun {
        spill,
        replay,
        ack,
        stored,
        replayed,
        removed,
        batches,
    })
}
