//! `ringgate-bench push`: the offline push webhook's throughput, and what it does while its
//! receiver is down. This process is the webhook receiver (`--listen`, HTTP/1.1, one thread
//! per connection, answers 200, or 503 while "down") and one sender connection that sends
//! `send` frames to `--users` offline users as fast as the gateway accepts them.
//!
//! Start the gateway with the rate limits off (`source bench/no_limits.sh`) and
//! `--push-webhook-url http://<listen>/hook --push-webhook-secret <16+ bytes>
//! --push-delay-ms 0` (the delay would only add itself to the figures), and a
//! `--push-queue-max` above `--messages` (the sender outruns the webhook; past the queue
//! pushes are dropped, by design, and this benchmark then fails).
//!
//! Phase "up": `--messages` sends; reported: sends accepted/s, and pushes received/s from
//! the first send to the last distinct id received. Phase "down": the receiver answers 503;
//! `--messages`/4 more sends, then `--down-secs` of waiting; reported: accepted/s meanwhile
//! (the shards never wait for the webhook), failed POSTs and the queue depth from the
//! gateway's /metrics; then the receiver recovers, and the time until every message of the
//! phase has arrived (the backoff's wait, mostly).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::{flood, net, ws};

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Gateway public address (loopback only), dev mode
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// Gateway admin address (for /metrics)
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: String,
    /// Where this process listens as the webhook receiver
    #[arg(long, default_value = "127.0.0.1:28181")]
    listen: String,
    /// Messages in the "up" phase (a quarter of that in the "down" phase)
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Offline recipients the messages are spread over
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// How long the receiver stays down
    #[arg(long, default_value_t = 10.0)]
    down_secs: f64,
    /// Also print one JSON line with the results
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Received {
    ids: HashSet<String>,
    copies: u64,
    posts: u64,
    /// The first 2xx POST since the last reset (the receiver's recovery).
    first: Option<Instant>,
    last: Option<Instant>,
}

struct Receiver {
    down: AtomicBool,
    refused: AtomicU64,
    got: Mutex<Received>,
}

fn serve(mut s: TcpStream, r: &Receiver) {
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while raw.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
        }
    }
    if r.down.load(Relaxed) {
        r.refused.fetch_add(1, Relaxed);
        let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    let v: Value = serde_json::from_slice(&raw[head_end..head_end + len]).unwrap_or(Value::Null);
    {
        let mut got = r.got.lock().unwrap();
        got.posts += 1;
        for m in v["messages"].as_array().into_iter().flatten() {
            got.copies += 1;
            if let Some(id) = m["id"].as_str() {
                got.ids.insert(id.to_string());
            }
        }
        let now = Instant::now();
        got.first.get_or_insert(now);
        got.last = Some(now);
    }
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
}

/// Send `n` messages (cids `<tag><i>`), wait for every `accepted`; returns (their ids, secs).
fn send_phase(
    target: SocketAddr,
    tag: &str,
    n: usize,
    users: usize,
) -> Result<(Vec<String>, f64), String> {
    let (stream, rest) = flood::connect(target, &format!("pushbench-{tag}-{}", std::process::id()))
        .map_err(|s| format!("cannot connect to {target}: status {s}"))?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = stream;
    reader.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let started = Instant::now();
    let tag_w = tag.to_string();
    let write = std::thread::spawn(move || {
        let mut out = Vec::new();
        for i in 0..n {
            let text = json!({"op":"send","to":format!("pushbench-off-{}", i % users),"cid":format!("{tag_w}{i}"),"body":{"text":"you have a new message"}}).to_string();
            ws::encode_frame(&mut out, true, 1, text.as_bytes(), [1, 2, 3, 4]);
            if out.len() > 256 * 1024 {
                if writer.write_all(&out).is_err() {
                    return;
                }
                out.clear();
            }
        }
        let _ = writer.write_all(&out);
    });
    let mut ids = Vec::with_capacity(n);
    let mut refused = 0u64;
    flood::read_frames(&mut reader, rest, |op, payload| {
        if op == 1 {
            if let Ok(v) = serde_json::from_slice::<Value>(payload) {
                match v["op"].as_str() {
                    Some("accepted") => ids.push(v["id"].as_str().unwrap_or("").to_string()),
                    Some("error") => refused += 1,
                    _ => {}
                }
            }
        }
        ids.len() as u64 + refused < n as u64
    });
    let secs = started.elapsed().as_secs_f64();
    let _ = write.join();
    if refused > 0 {
        return Err(format!(
            "{refused} sends refused (start the gateway with bench/no_limits.sh)"
        ));
    }
    if ids.len() < n {
        return Err(format!("only {} of {n} sends accepted", ids.len()));
    }
    Ok((ids, secs))
}

fn metric(admin: SocketAddr, series: &str) -> u64 {
    let Ok(mut s) = TcpStream::connect(admin) else {
        return 0;
    };
    let _ = s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn wait_all(r: &Receiver, ids: &[String], within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    loop {
        {
            let got = r.got.lock().unwrap();
            if ids.iter().all(|id| got.ids.contains(id)) {
                return got.last;
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn run(a: PushArgs) -> Result<i32, String> {
    let target = net::resolve_target(&a.target)?;
    let admin: SocketAddr = a.admin.parse().map_err(|e| format!("--admin: {e}"))?;
    let listener =
        TcpListener::bind(&a.listen).map_err(|e| format!("--listen {}: {e}", a.listen))?;
    let r = Arc::new(Receiver {
        down: AtomicBool::new(false),
        refused: AtomicU64::new(0),
        got: Mutex::new(Received::default()),
    });
    let rr = r.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().map_while(Result::ok) {
            let rr = rr.clone();
            std::thread::spawn(move || serve(s, &rr));
        }
    });
    let users = a.users.max(1);
    // Up.
    let t0 = Instant::now();
    let (ids, send_secs) = send_phase(target, "up", a.messages, users)?;
    let Some(last) = wait_all(&r, &ids, Duration::from_secs(60)) else {
        let dropped = metric(admin, "ringgate_push_dropped_total");
        return Err(format!("not every message was pushed within 60 s ({dropped} dropped: the queue was full; raise --push-queue-max on the gateway)"));
    };
    let push_secs = last.duration_since(t0).as_secs_f64();
    let (posts, copies) = {
        let got = r.got.lock().unwrap();
        (got.posts, got.copies)
    };
    let up = json!({
        "messages": a.messages,
        "accepted_per_s": (a.messages as f64 / send_secs).round(),
        "pushed_per_s": (a.messages as f64 / push_secs).round(),
        "posts": posts,
        "messages_per_post": (copies as f64 / posts.max(1) as f64 * 10.0).round() / 10.0,
        "duplicates": copies - ids.len() as u64,
    });
    println!("up:   {} messages, accepted {}/s, pushed {}/s (first send to last push), {} POSTs ({} messages each), duplicates {}",
        a.messages, up["accepted_per_s"], up["pushed_per_s"], posts, up["messages_per_post"], up["duplicates"]);
    // Down.
    let failures0 = metric(admin, "ringgate_push_failures_total{shard=\"push\"}");
    r.down.store(true, Relaxed);
    let n = (a.messages / 4).max(1);
    let down_at = Instant::now();
    let (down_ids, down_send_secs) = send_phase(target, "down", n, users)?;
    let rest = a.down_secs - down_at.elapsed().as_secs_f64();
    if rest > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(rest));
    }
    let failed = metric(admin, "ringgate_push_failures_total{shard=\"push\"}") - failures0;
    let depth = metric(admin, "ringgate_push_queue_depth{shard=\"push\"}");
    let dropped = metric(admin, "ringgate_push_dropped_total");
    let refused = r.refused.load(Relaxed);
    let down_secs = down_at.elapsed().as_secs_f64();
    r.got.lock().unwrap().first = None;
    r.down.store(false, Relaxed);
    let back = Instant::now();
    let last = wait_all(&r, &down_ids, Duration::from_secs(300))
        .ok_or("not every message was pushed within 300 s of recovery")?;
    let recovery = last.saturating_duration_since(back).as_secs_f64();
    let first = r.got.lock().unwrap().first.unwrap_or(back);
    // The backlog's drain: first to last POST after the recovery (the webhook's own pace,
    // no sender in front of it).
    let drain_per_s = n as f64
        / last
            .saturating_duration_since(first)
            .as_secs_f64()
            .max(1e-3);
    let down = json!({
        "messages": n,
        "accepted_per_s": (n as f64 / down_send_secs).round(),
        "down_s": (down_secs * 10.0).round() / 10.0,
        "failed_posts": failed,
        "refused_by_receiver": refused,
        "queue_depth": depth,
        "dropped": dropped,
        "all_pushed_after_recovery_s": (recovery * 100.0).round() / 100.0,
        "backlog_pushed_per_s": drain_per_s.round(),
    });
    println!("down: {n} messages accepted at {}/s meanwhile; {:.1} s down: {failed} failed POSTs, queue depth {depth}, dropped {dropped}; every message pushed {:.2} s after the receiver came back (the backlog at {}/s once the retry came)",
        down["accepted_per_s"], down_secs, recovery, down["backlog_pushed_per_s"]);
    if a.json {
        println!("{}", json!({"up": up, "down": down}));
    }
    Ok(0)
}
