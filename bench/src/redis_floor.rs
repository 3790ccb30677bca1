//! `ringgate-bench redis-floor`: what one redis-server can take of the least work any
//! exactly-once spill needs, with no gateway: per message one dedup record (`HSETNX` of the
//! cid into the pair's hash) and one append (`XADD` to the recipient's stream), on
//! `connections` sockets (a writer and a reader thread each). No `XADD` carries `MAXLEN`
//! (until 2026-12-07 they had `MAXLEN ~ 10000`, which never trimmed at these sizes): ringgate's
//! own appends carry none since its script checks the count cap itself.
//! * default: raw pipelined commands (not atomic: a resend could be appended twice);
//! * `--script`: the same two as one atomic check-and-append per message, `--batch` messages
//!   per `EVAL` (the shape of ringgate's batch script, without its length cap, directory and
//!   dedup generations);
//! * `--append-only`: the `XADD`s alone;
//! * `--script --fence`: the script plus the least that ringgate's contract adds to it, once
//!   per pair (and recipient) and call: the order fence read and written back (`HMGET` of two
//!   fields before, `HSET` of two after), the inbox length for its cap (`XLEN`) and the
//!   recipient's node directory (`SMEMBERS`, for other nodes' pushes). Run with `--batch` at
//!   ringgate's batch size, since these are paid per pair and call, not per message.
//!
//! The same users, bodies and key shapes as `ringgate-bench store`, so they compare in one
//! session. Every reply is read and checked to be no error; the keys are deleted after.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

#[derive(Args, Debug)]
pub struct RedisFloorArgs {
    /// Redis to measure against, host:port (loopback only)
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
    /// Connections (like the store bench's shards), each a writer and a reader thread
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Recipients (one stream and one dedup hash each)
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Messages to each recipient
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Body bytes per message
    #[arg(long, default_value_t = 64)]
    body: usize,
    /// Only the appends (`XADD`), no dedup record
    #[arg(long, conflicts_with = "script")]
    append_only: bool,
    /// Check-and-append as one script call per `--batch` messages (atomic, like ringgate)
    #[arg(long)]
    script: bool,
    /// Messages per script call with `--script`
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// With `--script`: also the per-pair work ringgate's contract adds (see the module doc)
    #[arg(long, requires = "script", conflicts_with = "append_only")]
    fence: bool,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

/// The least atomic check-and-append: KEYS are (dedup hash, inbox) per message, ARGV
/// (cid, id, packed message) per message; a known cid answers its first id.
const CHECK_AND_APPEND: &str = "local out = {}
for n = 1, #KEYS / 2 do
  local d, s = KEYS[2 * n - 1], KEYS[2 * n]
  if redis.call('HSETNX', d, ARGV[3 * n - 2], ARGV[3 * n - 1]) == 1 then
    out[n] = redis.call('XADD', s, '*', 'm', ARGV[3 * n])
  else
    out[n] = redis.call('HGET', d, ARGV[3 * n - 2])
  end
end
return out";

/// `CHECK_AND_APPEND` plus the contract's per-pair work: KEYS are (dedup hash, inbox,
/// directory) per message, ARGV as there.
const FENCED_CHECK_AND_APPEND: &str = "local out, top = {}, {}
for n = 1, #KEYS / 3 do
  local d, s, loc = KEYS[3 * n - 2], KEYS[3 * n - 1], KEYS[3 * n]
  if top[d] == nil then
    top[d] = redis.call('HMGET', d, '~w', '~top')[2] or ''
    redis.call('XLEN', s)
    redis.call('SMEMBERS', loc)
  end
  if redis.call('HSETNX', d, ARGV[3 * n - 2], ARGV[3 * n - 1]) == 1 then
    out[n] = redis.call('XADD', s, '*', 'm', ARGV[3 * n])
    top[d] = ARGV[3 * n - 1]
  else
    out[n] = redis.call('HGET', d, ARGV[3 * n - 2])
  end
end
for d, t in pairs(top) do redis.call('HSET', d, '~w', '1', '~top', t) end
return out";

/// One message's keys and arguments.
struct Spill {
    dedup: String,
    inbox: String,
    directory: String,
    cid: String,
    id: String,
    packed: String,
}

pub fn run(a: RedisFloorArgs) -> Result<i32, String> {
    if !(a.redis.starts_with("127.") || a.redis.starts_with("localhost:")) {
        return Err(format!("{}: only loopback Redis is a load target", a.redis));
    }
    if a.connections == 0 || a.users < a.connections || a.messages == 0 || a.batch == 0 {
        return Err(
            "need connections >= 1, users >= connections, messages >= 1, batch >= 1".into(),
        );
    }
    let prefix = format!("rgfloor:{}:", std::process::id());
    let body = json!("x".repeat(a.body.saturating_sub(2))).to_string();
    // Each connection's commands and how many replies they get, built before the clock.
    let loads: Vec<(Vec<u8>, usize)> = (0..a.connections)
        .map(|c| {
            let users: Vec<usize> = (c..a.users).step_by(a.connections).collect();
            let total = users.len() * a.messages;
            let messages: Vec<Spill> = (0..total)
                .map(|i| {
                    let user = format!("r{}", users[i % users.len()]);
                    let (id, cid) = ((c as u64) << 40 | i as u64, format!("\"{c}-{i}\""));
                    Spill {
                        dedup: format!("{prefix}dd:{}:{{u:{user}}}:s0", user.len()),
                        inbox: format!("{prefix}in:{{u:{user}}}"),
                        directory: format!("{prefix}loc:{{u:{user}}}"),
                        packed: format!("{id} {i} 2 {} s0{cid}{body}", cid.len()),
                        id: id.to_string(),
                        cid,
                    }
                })
                .collect();
            let mut out = Vec::new();
            if a.script {
                for chunk in messages.chunks(a.batch) {
                    script_call(&mut out, chunk, a.fence);
                }
                (out, total.div_ceil(a.batch))
            } else {
                for m in &messages {
                    if !a.append_only {
                        let (d, cid, id) = (m.dedup.as_bytes(), m.cid.as_bytes(), m.id.as_bytes());
                        command(&mut out, &[b"HSETNX", d, cid, id]);
                    }
                    append(&mut out, m);
                }
                (out, total * if a.append_only { 1 } else { 2 })
            }
        })
        .collect();
    let started = Instant::now();
    let threads: Vec<_> = loads
        .into_iter()
        .map(|(commands, replies)| {
            let addr = a.redis.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let mut stream = TcpStream::connect(&addr).map_err(|e| format!("{addr}: {e}"))?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(120)))
                    .map_err(|e| e.to_string())?;
                let reader = stream.try_clone().map_err(|e| e.to_string())?;
                let counting = std::thread::spawn(move || read_replies(reader, replies));
                stream.write_all(&commands).map_err(|e| e.to_string())?;
                counting.join().map_err(|_| "reader panicked".to_string())?
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "a connection thread panicked")??;
    }
    let elapsed = started.elapsed();
    cleanup(&a.redis, &prefix, a.users)?;
    let total = a.users * a.messages;
    let rate = total as f64 / elapsed.as_secs_f64();
    if a.json {
        println!(
            "{}",
            json!({"messages": total, "shape": shape(&a), "per_s": rate.round(),
                   "seconds": elapsed.as_secs_f64(), "connections": a.connections})
        );
    } else {
        println!(
            "redis-floor: {total} messages ({} users x {}), {}: {rate:.0} msg/s ({:.2} s)",
            a.users,
            a.messages,
            shape(&a),
            elapsed.as_secs_f64()
        );
    }
    Ok(0)
}

fn shape(a: &RedisFloorArgs) -> String {
    if a.fence {
        format!(
            "HSETNX + XADD per message, fence, length and directory per pair, one script call per {}",
            a.batch
        )
    } else if a.script {
        format!("HSETNX + XADD per message, one script call per {}", a.batch)
    } else if a.append_only {
        "XADD only, pipelined".into()
    } else {
        "HSETNX + XADD per message, pipelined".into()
    }
}

/// One command in RESP.
fn command(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
}

fn append(out: &mut Vec<u8>, m: &Spill) {
    let (inbox, packed) = (m.inbox.as_bytes(), m.packed.as_bytes());
    command(out, &[b"XADD", inbox, b"*", b"m", packed]);
}

fn script_call(out: &mut Vec<u8>, chunk: &[Spill], fence: bool) {
    let (script, per_message) = match fence {
        true => (FENCED_CHECK_AND_APPEND, 3),
        false => (CHECK_AND_APPEND, 2),
    };
    let keys = (chunk.len() * per_message).to_string();
    let mut parts: Vec<&[u8]> = vec![b"EVAL", script.as_bytes(), keys.as_bytes()];
    for m in chunk {
        parts.extend([m.dedup.as_bytes(), m.inbox.as_bytes()]);
        if fence {
            parts.push(m.directory.as_bytes());
        }
    }
    for m in chunk {
        parts.extend([m.cid.as_bytes(), m.id.as_bytes(), m.packed.as_bytes()]);
    }
    command(out, &parts);
}

/// Read `count` replies (integers, bulk strings, arrays of them); fails on an error reply.
fn read_replies(stream: TcpStream, count: usize) -> Result<(), String> {
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut line = Vec::with_capacity(64);
    // Items still to read: an array's elements are added when its header is read.
    let mut pending = count as i64;
    while pending > 0 {
        line.clear();
        reader
            .read_until(b'\n', &mut line)
            .map_err(|e| e.to_string())?;
        pending -= 1;
        match line.first() {
            Some(b':') => {}
            Some(b'*') => pending += header_number(&line)?.max(0),
            Some(b'$') => {
                let len = header_number(&line)?;
                if len >= 0 {
                    line.clear();
                    reader
                        .read_until(b'\n', &mut line)
                        .map_err(|e| e.to_string())?;
                    if line.len() as i64 != len + 2 {
                        return Err("bulk reply of the wrong length".into());
                    }
                }
            }
            _ => return Err(format!("reply: {}", String::from_utf8_lossy(&line))),
        }
    }
    Ok(())
}

/// The number in a `*n\r\n` or `$n\r\n` header.
fn header_number(line: &[u8]) -> Result<i64, String> {
    let digits = line
        .get(1..line.len().saturating_sub(2))
        .unwrap_or_default();
    std::str::from_utf8(digits)
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("bad reply header {}", String::from_utf8_lossy(line)))
}

/// Delete every key under `prefix` on the redis-server at `addr` (not timed; one server,
/// not a cluster): a script that scans and deletes, so the caller need not know the names.
pub fn delete_prefixed(addr: &str, prefix: &str) -> Result<(), String> {
    const SCAN_AND_DELETE: &str = "local c = '0'
repeat
  local r = redis.call('SCAN', c, 'MATCH', ARGV[1] .. '*', 'COUNT', 1000)
  c = r[1]
  for _, k in ipairs(r[2]) do redis.call('DEL', k) end
until c == '0'
return 1";
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    command(
        &mut out,
        &[b"EVAL", SCAN_AND_DELETE.as_bytes(), b"0", prefix.as_bytes()],
    );
    stream.write_all(&out).map_err(|e| e.to_string())?;
    read_replies(stream, 1)
}

/// Delete the run's keys (not timed).
fn cleanup(addr: &str, prefix: &str, users: usize) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for u in 0..users {
        let user = format!("r{u}");
        let dedup = format!("{prefix}dd:{}:{{u:{user}}}:s0", user.len());
        let inbox = format!("{prefix}in:{{u:{user}}}");
        command(&mut out, &[b"DEL", dedup.as_bytes(), inbox.as_bytes()]);
    }
    stream.write_all(&out).map_err(|e| e.to_string())?;
    read_replies(stream, users)
}
