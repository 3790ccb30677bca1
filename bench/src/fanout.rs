//! `ringgate-bench fanout`: one publisher, one room of M members.
//!
//! The members are this process's connections (the `idle` machinery, joining the room after
//! `welcome`); the publisher is the backend API (`POST /api/publish` on the admin listener,
//! one keep-alive connection), so one process holds both ends and one clock: each message's
//! body carries its send time `t` (ns since the run's base). Measured: per delivery
//! publish -> member latency, and per publish publish -> **last** member latency (the time
//! until every member had it), deliveries/s, plus duplicates, holes and gaps (each member
//! checks its offsets).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::engine::{Mode, Route, Shared};
use crate::{
    build_config, install_sigint, join_threads, make_loops, net, now_ns, ns, secs, spawn_serving,
    sys, Common,
};

#[derive(Args, Debug)]
pub struct FanoutArgs {
    /// Room members (connections)
    #[arg(short = 'm', long, default_value_t = 1000)]
    members: usize,
    /// Room to use
    #[arg(long, default_value = "bench-room")]
    room: String,
    /// Messages to publish
    #[arg(long, default_value_t = 100)]
    publishes: u64,
    /// Publishes per second
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Body bytes beyond the timestamp (padding)
    #[arg(long, default_value_t = 0)]
    pad: usize,
    /// Gateway admin listener (loopback), for POST /api/publish
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: String,
    /// The gateway's api_key
    #[arg(long)]
    api_key: String,
    /// Max handshakes in flight while connecting
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Bound on connecting and joining, seconds
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    timeout: f64,
    /// After the last publish: at most this long for the deliveries, seconds
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    grace: f64,
    /// Members only: another process publishes (`bench/fanout_multi.sh`); wait for
    /// --publishes room messages to reach every member here, then report them per offset
    /// (with --json) for the script to merge
    #[arg(long)]
    members_only: bool,
    #[command(flatten)]
    common: Common,
}

/// One keep-alive HTTP/1.1 connection to the admin listener.
struct ApiClient {
    reader: BufReader<TcpStream>,
    key: String,
}

impl ApiClient {
    fn connect(admin: &str, key: &str) -> Result<ApiClient, String> {
        let addr = net::resolve_target(admin)?;
        let stream = TcpStream::connect(addr).map_err(|e| format!("{admin}: {e}"))?;
        stream.set_nodelay(true).ok();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        Ok(ApiClient {
            reader: BufReader::new(stream),
            key: key.to_string(),
        })
    }

    /// POST /api/publish; returns the answer's offset.
    fn publish(&mut self, body: &str) -> Result<u64, String> {
        let req = format!(
            "POST /api/publish HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.key,
            body.len()
        );
        self.reader
            .get_mut()
            .write_all(req.as_bytes())
            .map_err(|e| format!("publish: {e}"))?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("publish answer: {e}"))?;
        let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader
                .read_line(&mut line)
                .map_err(|e| format!("publish answer: {e}"))?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut answer = vec![0u8; length];
        self.reader
            .read_exact(&mut answer)
            .map_err(|e| format!("publish answer: {e}"))?;
        let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        if status != "200" {
            return Err(format!("publish answered {status}: {v}"));
        }
        v["offset"]
            .as_u64()
            .ok_or_else(|| format!("no offset in {v}"))
    }
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1e6
    }
}

pub fn run(a: FanoutArgs) -> Result<i32, String> {
    let c = &a.common;
    let timeout = secs("timeout", a.timeout, false)?;
    let grace = secs("grace", a.grace, true)?;
    if a.members == 0 || a.publishes == 0 || !(a.rate > 0.0 && a.rate.is_finite()) {
        return Err("need --members >= 1, --publishes >= 1, --rate > 0".into());
    }
    let admin_addr = net::resolve_target(&a.admin)?;
    let join = json!({"op":"join","room":a.room}).to_string().into_bytes();
    let cfg = Arc::new(build_config(
        c,
        Route::Ws,
        Mode::Fanout { join },
        true,
        a.members,
    )?);
    let shared = Arc::new(Shared::default());
    let loops = make_loops(&cfg, &shared, a.members, c.threads, a.concurrency, 0.0)?;
    install_sigint();
    let start = now_ns(&cfg);
    let deadline = start
        + ns(timeout)
        + ns(grace)
        + ns(Duration::from_secs_f64(a.publishes as f64 / a.rate + 5.0));
    let (handles, barrier) = spawn_serving(loops, &shared, deadline);
    barrier.wait(); // ready
    barrier.wait(); // go

    // Everyone connected and joined (or the timeout).
    let join_deadline = start + ns(timeout);
    while shared.room_joined.load(Relaxed) < a.members as u64
        && now_ns(&cfg) < join_deadline
        && !crate::INTERRUPTED.load(Relaxed)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let joined = shared.room_joined.load(Relaxed);
    if !c.quiet {
        eprintln!("{joined}/{} members joined `{}`", a.members, a.room);
    }

    // Publish at the rate, each body stamped with its send time (host-wide monotonic ns).
    let pad = "x".repeat(a.pad);
    let period = 1e9 / a.rate;
    // The gateway's CPU from the first publish to the last delivery (members' upkeep over
    // that span included), for a cost per delivery.
    let pids = &a.common.gateway_pid;
    let gateway_cpu_before = sys::pids_cpu_secs(pids).ok().filter(|_| !pids.is_empty());
    // This process's own CPU over the same span: the members' reading and checking, which
    // shares the machine with the gateway (the floor's reader is its counterpart).
    let generator_cpu_before = sys::self_cpu_secs();
    let t0 = now_ns(&cfg);
    let mut offsets = Vec::with_capacity(a.publishes as usize);
    let mut publish_error = None;
    let mut api = if a.members_only {
        None
    } else {
        Some(ApiClient::connect(&admin_addr.to_string(), &a.api_key)?)
    };
    if api.is_none() {
        // Wait for another process's publishes: every member here got `publishes` of them.
        let wait_end = t0 + ns(Duration::from_secs_f64(a.publishes as f64 / a.rate)) + ns(grace);
        while shared.room_received.load(Relaxed) < a.publishes * joined
            && now_ns(&cfg) < wait_end
            && !crate::INTERRUPTED.load(Relaxed)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    for i in 0..a.publishes {
        let Some(api) = api.as_mut() else {
            break;
        };
        let due = t0 + (i as f64 * period) as u64;
        let now = now_ns(&cfg);
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        if crate::INTERRUPTED.load(Relaxed) {
            break;
        }
        let stamp = cfg.base_mono_ns + now_ns(&cfg);
        let body =
            json!({"room": a.room, "cid": format!("f{t0}-{i}"), "body": {"t": stamp, "pad": pad}})
                .to_string();
        match api.publish(&body) {
            Ok(o) => offsets.push(o),
            Err(e) => {
                publish_error = Some(e);
                break;
            }
        }
    }
    let publish_end = now_ns(&cfg);
    let published = if a.members_only {
        a.publishes
    } else {
        offsets.len() as u64
    };
    let expected = published * joined;
    let grace_end = publish_end + ns(grace);
    while shared.room_received.load(Relaxed) < expected
        && now_ns(&cfg) < grace_end
        && !crate::INTERRUPTED.load(Relaxed)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    shared.stop.store(true, Relaxed);
    let st = join_threads(handles);

    // Publish -> last member: the slowest member of each publish every member received.
    let mut last_member = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).unwrap();
    let mut incomplete = 0u64;
    if a.members_only {
        // The offsets are the ones seen here (the publisher's own list is in its process).
        let mut seen: Vec<u64> = st.room_by_offset.keys().copied().collect();
        seen.sort_unstable();
        offsets = seen;
        incomplete = a.publishes.saturating_sub(offsets.len() as u64);
    }
    for o in &offsets {
        match st.room_by_offset.get(o) {
            Some((n, worst)) if *n as u64 >= joined => {
                last_member.saturating_record(*worst);
            }
            _ => incomplete += 1,
        }
    }
    let empty = Histogram::<u64>::new(3).unwrap();
    let per_delivery = st.latency_ns.as_ref().unwrap_or(&empty);
    let gateway_cpu =
        gateway_cpu_before.and_then(|before| Some(sys::pids_cpu_secs(pids).ok()? - before));
    let gateway_cpu_us_per_delivery =
        gateway_cpu.map(|secs| secs * 1e6 / (st.room_msgs as f64).max(1.0));
    let generator_cpu_us_per_delivery =
        (sys::self_cpu_secs() - generator_cpu_before) * 1e6 / (st.room_msgs as f64).max(1.0);
    let span = (publish_end.saturating_sub(t0)) as f64 / 1e9;
    let missing = expected.saturating_sub(st.room_msgs);
    let ok = publish_error.is_none()
        && joined == a.members as u64
        && missing == 0
        && st.room_duplicates == 0
        && st.room_holes == 0
        && incomplete == 0;
    println!(
        "ringgate-bench fanout  target={} room={} members joined {joined}/{}  publishes {} at {}/s over {span:.1}s",
        cfg.host,
        a.room,
        a.members,
        offsets.len(),
        a.rate
    );
    println!(
        "deliveries   {} ({:.0}/s over the publish span)  missing {missing}  duplicates {}  holes {}  gaps {}",
        st.room_msgs,
        st.room_msgs as f64 / span.max(1e-9),
        st.room_duplicates,
        st.room_holes,
        st.room_gaps
    );
    println!(
        "per delivery  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        pct(per_delivery, 0.5),
        pct(per_delivery, 0.99),
        pct(per_delivery, 0.999),
        per_delivery.max() as f64 / 1e6
    );
    println!(
        "last member   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} publishes complete, {incomplete} incomplete)",
        pct(&last_member, 0.5),
        pct(&last_member, 0.99),
        last_member.max() as f64 / 1e6,
        last_member.len()
    );
    if let Some(e) = &publish_error {
        println!("publisher stopped: {e}");
    }
    println!("result       {}", if ok { "OK" } else { "FAILED" });
    if c.json {
        println!(
            "{}",
            json!({
                "mode": "fanout", "room": a.room, "members": a.members, "joined": joined,
                "publishes": offsets.len(), "rate": a.rate, "publish_span_secs": span,
                "deliveries": st.room_msgs, "deliveries_per_sec": st.room_msgs as f64 / span.max(1e-9),
                "missing": missing, "duplicates": st.room_duplicates, "holes": st.room_holes,
                "gaps": st.room_gaps, "incomplete_publishes": incomplete,
                "per_delivery_ms": {"p50": pct(per_delivery, 0.5), "p99": pct(per_delivery, 0.99), "p999": pct(per_delivery, 0.999), "max": per_delivery.max() as f64 / 1e6},
                "last_member_ms": {"p50": pct(&last_member, 0.5), "p99": pct(&last_member, 0.99), "max": last_member.max() as f64 / 1e6},
                "publish_error": publish_error, "ok": ok,
                "gateway_cpu_secs": gateway_cpu, "gateway_cpu_us_per_delivery": gateway_cpu_us_per_delivery,
                "generator_cpu_us_per_delivery": generator_cpu_us_per_delivery,
                "frame_bytes": st.room_wire_bytes as f64 / (st.room_msgs as f64).max(1.0),
                // For bench/fanout_multi.sh: per offset, members here that got it and the
                // slowest of them (ns).
                "by_offset": offsets.iter().map(|o| {
                    let (n, worst) = st.room_by_offset.get(o).copied().unwrap_or((0, 0));
                    json!([o, n, worst])
                }).collect::<Vec<_>>(),
            })
        );
    }
    Ok(if ok { 0 } else { 1 })
}
