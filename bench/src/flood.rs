//! `ringgate-bench flood`: a polite client beside flooding ones, against a gateway with its
//! rate limits on (dev mode, no `--secret`; do not source `bench/no_limits.sh` for this one).
//!
//! One polite connection sends `send` frames at `--polite-rate` and measures send -> accepted
//! for each. Phases alternate, `--rounds` times: quiet (the polite client alone), then flood
//! (`--flooders` connections writing pings or sends as fast as the socket takes them, each
//! reconnecting when the gateway closes it). Reported per phase kind, as the median over the
//! rounds: the polite client's p50 / p99 and refusals, and what the flood got (frames written,
//! answered, `rate_limited`, 1008 closes, refused upgrades).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::{median, net, ws};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FloodKind {
    /// `{"op":"ping"}` frames
    Pings,
    /// `send` frames to a user nobody reads
    Sends,
}

#[derive(Args, Debug)]
pub struct FloodArgs {
    /// Gateway public address (loopback only), dev mode
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// Flooding connections during a flood phase
    #[arg(long, default_value_t = 4)]
    flooders: usize,
    /// What the flooders send
    #[arg(long, value_enum, default_value_t = FloodKind::Pings)]
    kind: FloodKind,
    /// The polite client's sends per second (keep it under the gateway's user_send_rate)
    #[arg(long, default_value_t = 10.0)]
    polite_rate: f64,
    /// Length of each phase, seconds
    #[arg(long, default_value_t = 5.0)]
    phase_secs: f64,
    /// Quiet + flood pairs
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also print one JSON line with the results
    #[arg(long)]
    json: bool,
}

type Answers = Vec<(u64, Option<u64>)>;

/// What the flooders did in one phase.
#[derive(Default)]
struct FloodCounts {
    written_frames: AtomicU64,
    answered: AtomicU64,
    rate_limited: AtomicU64,
    closes_1008: AtomicU64,
    upgrades: AtomicU64,
    upgrades_refused: AtomicU64,
}

pub(crate) fn connect(target: SocketAddr, user: &str) -> Result<(TcpStream, Vec<u8>), u16> {
    let mut stream = TcpStream::connect(target).map_err(|_| 0u16)?;
    stream.set_nodelay(true).ok();
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut req = Vec::new();
    ws::write_request(
        &mut req,
        &net::host_header(&target),
        &format!("/ws?user={user}"),
        &ws::key_from_nonce(user.len() as u64 + 7),
    );
    stream.write_all(&req).map_err(|_| 0u16)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).map_err(|_| 0u16)?;
        if n == 0 {
            return Err(0);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let ws::ResponseParse::Done(r) = ws::parse_response(&buf) {
            if r.status != 101 {
                return Err(r.status);
            }
            let rest = buf[r.head_len..].to_vec();
            return Ok((stream, rest));
        }
    }
}

/// Read server frames from `buf` + `stream` until EOF, calling `each(opcode, payload)`.
pub(crate) fn read_frames(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    mut each: impl FnMut(u8, &[u8]) -> bool,
) {
    let mut chunk = vec![0u8; 65536];
    loop {
        while let Some(h) = ws::parse_frame_head(&buf) {
            let end = h.head_len + h.payload_len as usize;
            if buf.len() < end {
                break;
            }
            if !each(h.opcode, &buf[h.head_len..end]) {
                return;
            }
            buf.drain(..end);
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn flooder(
    target: SocketAddr,
    i: usize,
    kind: FloodKind,
    stop: Arc<AtomicBool>,
    counts: Arc<FloodCounts>,
) {
    let mut batch = Vec::new();
    for n in 0..1000 {
        let text = match kind {
            FloodKind::Pings => r#"{"op":"ping"}"#.to_string(),
            FloodKind::Sends => {
                format!(r#"{{"op":"send","to":"flood-sink","cid":"f{n}","body":{n}}}"#)
            }
        };
        ws::encode_frame(&mut batch, true, 1, text.as_bytes(), [1, 2, 3, 4]);
    }
    while !stop.load(Relaxed) {
        let (stream, rest) = match connect(target, &format!("flood-{i}")) {
            Ok(s) => s,
            Err(status) => {
                if status != 0 {
                    counts.upgrades_refused.fetch_add(1, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        counts.upgrades.fetch_add(1, Relaxed);
        let mut reader = stream.try_clone().expect("clone");
        let c = counts.clone();
        let read = std::thread::spawn(move || {
            read_frames(&mut reader, rest, |op, payload| {
                match op {
                    0x8 => {
                        if ws::close_code(payload) == 1008 {
                            c.closes_1008.fetch_add(1, Relaxed);
                        }
                        return false;
                    }
                    0x1 if payload.windows(12).any(|w| w == b"rate_limited") => {
                        c.rate_limited.fetch_add(1, Relaxed);
                    }
                    0x1 => {
                        c.answered.fetch_add(1, Relaxed);
                    }
                    _ => {}
                }
                true
            });
        });
        let mut writer = stream;
        while !stop.load(Relaxed) {
            if writer.write_all(&batch).is_err() {
                break;
            }
            counts.written_frames.fetch_add(1000, Relaxed);
        }
        let _ = writer.shutdown(std::net::Shutdown::Both);
        let _ = read.join();
    }
}

struct Phase {
    latency: Histogram<u64>,
    polite_refused: u64,
    flood: Option<Arc<FloodCounts>>,
}

pub fn run(a: FloodArgs) -> Result<i32, String> {
    let target = net::resolve_target(&a.target)?;
    let positive = |v: f64| v > 0.0 && v.is_finite();
    if !positive(a.polite_rate) || a.rounds == 0 || !positive(a.phase_secs) {
        return Err("need --polite-rate > 0, --rounds >= 1, --phase-secs > 0".into());
    }
    let (stream, rest) =
        connect(target, "polite").map_err(|s| format!("polite client: upgrade answered {s}"))?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = stream;
    // cid -> send time (ns since `base`), answered by the reader thread.
    let base = Instant::now();
    let sent_at: Arc<Mutex<HashMap<u64, u64>>> = Default::default();
    // Per answer: when, and the latency when it was `accepted` (None: refused).
    let answers: Arc<Mutex<Answers>> = Default::default();
    {
        let (sent_at, answers) = (sent_at.clone(), answers.clone());
        std::thread::spawn(move || {
            read_frames(&mut reader, rest, |op, payload| {
                if op != 1 {
                    return op != 8;
                }
                let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
                let cid = v["cid"]
                    .as_str()
                    .and_then(|c| c.strip_prefix('p')?.parse().ok());
                if let Some(cid) = cid {
                    let now = base.elapsed().as_nanos() as u64;
                    let t = sent_at.lock().unwrap().remove(&cid);
                    let accepted = v["op"] == "accepted";
                    answers
                        .lock()
                        .unwrap()
                        .push((now, t.filter(|_| accepted).map(|t| now - t)));
                }
                true
            });
        });
    }
    let period = Duration::from_secs_f64(1.0 / a.polite_rate);
    let phase_len = Duration::from_secs_f64(a.phase_secs);
    let mut phases: Vec<(bool, Phase)> = Vec::new();
    let mut cid = 0u64;
    for round in 0..a.rounds * 2 {
        let flooding = round % 2 == 1;
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(FloodCounts::default());
        let mut floods = Vec::new();
        if flooding {
            for i in 0..a.flooders {
                let (stop, counts) = (stop.clone(), counts.clone());
                let kind = a.kind;
                floods.push(std::thread::spawn(move || {
                    flooder(target, i, kind, stop, counts)
                }));
            }
        }
        answers.lock().unwrap().clear();
        let start = Instant::now();
        let mut next = start;
        while start.elapsed() < phase_len {
            cid += 1;
            let text = format!(r#"{{"op":"send","to":"polite-sink","cid":"p{cid}","body":{cid}}}"#);
            let mut frame = Vec::new();
            ws::encode_frame(&mut frame, true, 1, text.as_bytes(), [9, 8, 7, 6]);
            sent_at
                .lock()
                .unwrap()
                .insert(cid, base.elapsed().as_nanos() as u64);
            writer
                .write_all(&frame)
                .map_err(|e| format!("polite client: {e}"))?;
            next += period;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        // Let the last answers arrive before the flood stops (they belong to this phase).
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Relaxed);
        for f in floods {
            let _ = f.join();
        }
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        let mut polite_refused = 0;
        for (_, answer) in answers.lock().unwrap().drain(..) {
            match answer {
                Some(ns) => latency.saturating_record(ns),
                None => polite_refused += 1,
            }
        }
        phases.push((
            flooding,
            Phase {
                latency,
                polite_refused,
                flood: flooding.then_some(counts),
            },
        ));
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    let med = |flooding: bool, f: &dyn Fn(&Phase) -> f64| {
        let v: Vec<f64> = phases
            .iter()
            .filter(|(fl, _)| *fl == flooding)
            .map(|(_, p)| f(p))
            .collect();
        median(&v)
    };
    let flood_med = |f: &dyn Fn(&FloodCounts) -> u64| {
        med(true, &|p: &Phase| {
            p.flood.as_ref().map_or(0.0, |c| f(c) as f64)
        })
    };
    let secs = a.phase_secs;
    println!(
        "ringgate-bench flood  target={target}  {} flooders ({:?})  polite {}/s  {} rounds of {secs} s quiet + {secs} s flood (medians)",
        a.flooders, a.kind, a.polite_rate, a.rounds
    );
    for (name, flooding) in [("quiet", false), ("flood", true)] {
        println!(
            "polite, {name}:  accepted {:.0}  send->accepted p50 {:.3} ms  p99 {:.3} ms  refused {:.0}",
            med(flooding, &|p| p.latency.len() as f64),
            med(flooding, &|p| ms(&p.latency, 0.5)),
            med(flooding, &|p| ms(&p.latency, 0.99)),
            med(flooding, &|p| p.polite_refused as f64),
        );
    }
    println!(
        "flood per phase:  frames written {:.0}  answered {:.0}  rate_limited {:.0}  closed 1008 {:.0}  upgrades {:.0}  upgrades refused {:.0}",
        flood_med(&|c| c.written_frames.load(Relaxed)),
        flood_med(&|c| c.answered.load(Relaxed)),
        flood_med(&|c| c.rate_limited.load(Relaxed)),
        flood_med(&|c| c.closes_1008.load(Relaxed)),
        flood_med(&|c| c.upgrades.load(Relaxed)),
        flood_med(&|c| c.upgrades_refused.load(Relaxed)),
    );
    if a.json {
        println!(
            "{}",
            json!({
                "mode": "flood", "flooders": a.flooders, "polite_rate": a.polite_rate,
                "quiet_p50_ms": med(false, &|p| ms(&p.latency, 0.5)),
                "quiet_p99_ms": med(false, &|p| ms(&p.latency, 0.99)),
                "flood_p50_ms": med(true, &|p| ms(&p.latency, 0.5)),
                "flood_p99_ms": med(true, &|p| ms(&p.latency, 0.99)),
                "flood_frames_written": flood_med(&|c| c.written_frames.load(Relaxed)),
                "flood_rate_limited": flood_med(&|c| c.rate_limited.load(Relaxed)),
                "flood_closes_1008": flood_med(&|c| c.closes_1008.load(Relaxed)),
            })
        );
    }
    let polite_refused: u64 = phases.iter().map(|(_, p)| p.polite_refused).sum();
    Ok(if polite_refused == 0 { 0 } else { 1 })
}
