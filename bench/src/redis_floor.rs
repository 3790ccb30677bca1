//! `ringgate-bench redis-floor`: what one redis-server can take of the least work any
//! exactly-once spill needs, with no script and no gateway: per message one dedup record
//! (`HSETNX` of the cid into the pair's hash) and one append (`XADD` to the recipient's
//! stream), sent as raw pipelined commands on `connections` sockets (a writer and a reader
//! thread each). `--append-only` sends the `XADD`s alone. The same users, bodies and key
//! shapes as `ringgate-bench store`, so the two compare in one session: the distance
//! between them is what ringgate's script adds (length cap, directory, dedup generations).
//! Every reply is counted and checked to be no error; the keys are deleted after the run.

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
    #[arg(long)]
    append_only: bool,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
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

/// Read `count` replies (integers or bulk strings); fails on an error reply.
fn read_replies(stream: TcpStream, count: usize) -> Result<(), String> {
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut line = Vec::with_capacity(64);
    for _ in 0..count {
        line.clear();
        reader
            .read_until(b'\n', &mut line)
            .map_err(|e| e.to_string())?;
        match line.first() {
            Some(b':') => {}
            Some(b'$') => {
                let len: usize = std::str::from_utf8(&line[1..line.len() - 2])
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .ok_or("bad bulk length")?;
                line.clear();
                reader
                    .read_until(b'\n', &mut line)
                    .map_err(|e| e.to_string())?;
                if line.len() != len + 2 {
                    return Err("bulk reply of the wrong length".into());
                }
            }
            _ => return Err(format!("reply: {}", String::from_utf8_lossy(&line))),
        }
    }
    Ok(())
}

pub fn run(a: RedisFloorArgs) -> Result<i32, String> {
    if !(a.redis.starts_with("127.") || a.redis.starts_with("localhost:")) {
        return Err(format!("{}: only loopback Redis is a load target", a.redis));
    }
    if a.connections == 0 || a.users < a.connections || a.messages == 0 {
        return Err("need connections >= 1, users >= connections, messages >= 1".into());
    }
    let prefix = format!("rgfloor:{}:", std::process::id());
    let body = json!("x".repeat(a.body.saturating_sub(2))).to_string();
    // Each connection's commands, built before the clock starts.
    let per_message = if a.append_only { 1 } else { 2 };
    let loads: Vec<(Vec<u8>, usize)> = (0..a.connections)
        .map(|c| {
            let users: Vec<usize> = (c..a.users).step_by(a.connections).collect();
            let mut out = Vec::new();
            let total = users.len() * a.messages;
            for i in 0..total {
                let user = format!("r{}", users[i % users.len()]);
                let (id, cid) = ((c as u64) << 40 | i as u64, format!("\"{c}-{i}\""));
                if !a.append_only {
                    let dedup = format!("{prefix}dd:{}:{{u:{user}}}:s0", user.len());
                    command(
                        &mut out,
                        &[
                            b"HSETNX",
                            dedup.as_bytes(),
                            cid.as_bytes(),
                            id.to_string().as_bytes(),
                        ],
                    );
                }
                let packed = format!("{id} {i} 2 {} s0{cid}{body}", cid.len());
                let inbox = format!("{prefix}in:{{u:{user}}}");
                command(
                    &mut out,
                    &[
                        b"XADD",
                        inbox.as_bytes(),
                        b"MAXLEN",
                        b"~",
                        b"10000",
                        b"*",
                        b"m",
                        packed.as_bytes(),
                    ],
                );
            }
            (out, total * per_message)
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
            json!({"messages": total, "append_only": a.append_only, "per_s": rate.round(),
                   "seconds": elapsed.as_secs_f64(), "connections": a.connections})
        );
    } else {
        println!(
            "redis-floor: {total} messages ({} users x {}), {}: {rate:.0} msg/s ({:.2} s)",
            a.users,
            a.messages,
            if a.append_only {
                "XADD only"
            } else {
                "HSETNX + XADD each"
            },
            elapsed.as_secs_f64()
        );
    }
    Ok(0)
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
