//! `ringgate stats`: a live per-shard table read from the admin `/metrics` endpoint (SPEC 6).
//! Two scrapes `interval` apart give the rates; nothing here touches a running shard.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::metrics;

/// (series name, shard) -> value, from Prometheus text.
pub type Sample = BTreeMap<(String, usize), f64>;

/// Scrape `/metrics` once.
pub fn scrape(admin: SocketAddr) -> Result<Sample, String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2))
        .map_err(|e| format!("cannot reach the admin listener at {admin}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: ringgate\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    let text = body.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok(parse(text))
}

/// Parse the unlabelled-by-anything-but-shard series of the exposition text.
pub fn parse(text: &str) -> Sample {
    let mut out = Sample::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let Some(shard) = labels
            .strip_prefix("shard=\"")
            .and_then(|r| r.strip_suffix("\"}"))
            .and_then(|s| s.parse().ok())
        else {
            continue; // series with more labels (refusals by reason, histogram buckets)
        };
        if let Ok(v) = value.parse() {
            out.insert((name.to_string(), shard), v);
        }
    }
    out
}

/// (header, series summed, is a rate). Messages in: sends (resends included) and room
/// publishes taken; out: `msg` frames written once each and room messages fanned out.
const COLUMNS: &[(&str, &[&str], bool)] = &[
    ("conns", &[metrics::CONNECTIONS_OPEN], false),
    ("parked", &[metrics::CONNECTIONS_PARKED], false),
    (
        "msgs_in/s",
        &[metrics::SENDS, metrics::ROOM_PUBLISHES],
        true,
    ),
    (
        "msgs_out/s",
        &[metrics::MSG_FRAMES_OUT, metrics::ROOM_DELIVERIES],
        true,
    ),
    ("frames_in/s", &[metrics::FRAMES_IN], true),
    ("frames_out/s", &[metrics::FRAMES_OUT], true),
    ("acks_pending", &[metrics::ACKS_PENDING], false),
    ("retransmits", &[metrics::RETRANSMITS], false),
    ("spilled", &[metrics::STORED], false),
    ("replayed", &[metrics::REPLAYED], false),
    ("cross_shard", &[metrics::CROSS_SHARD], false),
];

/// The mean Redis batch time (ms) between two samples from the histogram's `_sum` (seconds)
/// and `_count`; None when no batch finished in between.
fn redis_ms(before: &Sample, after: &Sample, shards: &[usize]) -> Option<f64> {
    let sum_name = format!("{}_sum", metrics::REDIS_LATENCY);
    let count_name = format!("{}_count", metrics::REDIS_LATENCY);
    let delta = |name: &str| -> f64 {
        shards
            .iter()
            .map(|s| {
                let key = (name.to_string(), *s);
                let now = after.get(&key).copied().unwrap_or(0.0);
                (now - before.get(&key).copied().unwrap_or(now)).max(0.0)
            })
            .sum()
    };
    let batches = delta(&count_name);
    (batches > 0.0).then(|| delta(&sum_name) * 1e3 / batches)
}

/// The table for two samples `secs` apart.
pub fn table(before: &Sample, after: &Sample, secs: f64) -> String {
    let shards: Vec<usize> = after
        .keys()
        .filter(|(n, _)| n == metrics::CONNECTIONS_OPEN)
        .map(|(_, s)| *s)
        .collect();
    // `ringgate_redis_up` is exported only for shards whose store is Redis.
    let redis_shards: Vec<usize> = shards
        .iter()
        .copied()
        .filter(|s| after.contains_key(&(metrics::REDIS_UP.to_string(), *s)))
        .collect();
    let redis_cell = |shards: &[usize]| match redis_ms(before, after, shards) {
        Some(ms) => format!(" {ms:>10.2}"),
        None => format!(" {:>10}", "-"),
    };
    // Each column as wide as its header (numbers up to 7 digits): the table fits 132 columns.
    let width = |i: usize| COLUMNS[i].0.len().max(7);
    let mut out = format!("{:>5}", "shard");
    for (i, (h, _, _)) in COLUMNS.iter().enumerate() {
        out.push_str(&format!(" {h:>w$}", w = width(i)));
    }
    out.push_str(&format!(" {:>10}\n", "redis_ms"));
    let mut totals = vec![0.0; COLUMNS.len()];
    for shard in &shards {
        out.push_str(&format!("{shard:>5}"));
        for (i, (_, series, rate)) in COLUMNS.iter().enumerate() {
            let value =
                |sample: &Sample, name: &str| sample.get(&(name.to_string(), *shard)).copied();
            let v: f64 = series
                .iter()
                .map(|name| {
                    let now = value(after, name).unwrap_or(0.0);
                    if *rate {
                        let then = value(before, name).unwrap_or(now);
                        (now - then).max(0.0) / secs.max(1e-3)
                    } else {
                        now
                    }
                })
                .sum();
            totals[i] += v;
            out.push_str(&format!(" {v:>w$.0}", w = width(i)));
        }
        let own: &[usize] = match redis_shards.contains(shard) {
            true => std::slice::from_ref(shard),
            false => &[],
        };
        out.push_str(&redis_cell(own));
        out.push('\n');
    }
    out.push_str(&format!("{:>5}", "all"));
    for (i, v) in totals.iter().enumerate() {
        out.push_str(&format!(" {v:>w$.0}", w = width(i)));
    }
    out.push_str(&redis_cell(&redis_shards));
    out.push('\n');
    out
}

/// Print `count` tables (0 = until interrupted), `interval` apart.
pub fn run(admin: SocketAddr, interval: Duration, count: u64) -> Result<(), String> {
    let mut before = scrape(admin)?;
    let mut printed = 0;
    loop {
        std::thread::sleep(interval);
        let after = scrape(admin)?;
        let table = table(&before, &after, interval.as_secs_f64());
        if !crate::cli::to_stdout(&format!("{table}\n")) {
            return Ok(()); // nobody reads the table any more
        }
        before = after;
        printed += 1;
        if count != 0 && printed >= count {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_totals_per_shard() {
        let before = parse("ringgate_connections_open{shard=\"0\"} 2\nringgate_frames_in_total{shard=\"0\"} 100\nringgate_connections_open{shard=\"1\"} 1\nringgate_frames_in_total{shard=\"1\"} 0\n");
        let after = parse("# HELP x\nringgate_connections_open{shard=\"0\"} 3\nringgate_frames_in_total{shard=\"0\"} 300\nringgate_connections_open{shard=\"1\"} 1\nringgate_frames_in_total{shard=\"1\"} 50\nringgate_connections_refused_total{shard=\"0\",reason=\"x\",status=\"401\"} 9\n");
        let t = table(&before, &after, 2.0);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("conns")
                && lines[0].contains("frames_in/s")
                && lines[0].contains("acks_pending")
        );
        let cols = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        // shard, conns, parked, msgs_in/s, msgs_out/s, frames_in/s
        assert_eq!(cols(lines[1])[..6], ["0", "3", "0", "0", "0", "100"]);
        assert_eq!(cols(lines[2])[..6], ["1", "1", "0", "0", "0", "25"]);
        assert_eq!(cols(lines[3])[..6], ["all", "4", "0", "0", "0", "125"]);
    }

    /// Redis latency per shard and over all: the mean batch time in the interval from the
    /// histogram `/metrics` serves; `-` for a shard without batches in it, or without Redis.
    #[test]
    fn redis_latency_is_the_mean_batch_time_of_the_interval() {
        use crate::metrics::{render, ShardMetrics};
        use std::sync::Arc;
        let ms = Duration::from_millis;
        let shards: Vec<_> = (0..3).map(|_| Arc::new(ShardMetrics::default())).collect();
        shards.iter().for_each(|m| m.redis_store.set(1));
        shards[0].redis_latency.observe(ms(100)); // before the interval: not in its mean
        let before = parse(&render(&shards));
        shards[0].redis_latency.observe(ms(2));
        shards[0].redis_latency.observe(ms(4));
        shards[1].redis_latency.observe(ms(9));
        let t = table(&before, &parse(&render(&shards)), 1.0);
        let redis = |line: &str| line.split_whitespace().last().unwrap().to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("redis_ms"), "{t}");
        assert_eq!(redis(lines[1]), "3.00", "{t}");
        assert_eq!(redis(lines[2]), "9.00", "{t}");
        assert_eq!(redis(lines[3]), "-", "shard 2 had no batch: {t}");
        assert_eq!(
            redis(lines[4]),
            "5.00",
            "(2 + 4 + 9) / 3 over all shards: {t}"
        );

        // The embedded store: no Redis series to read, `-` everywhere.
        let embedded = vec![Arc::new(ShardMetrics::default())];
        let before = parse(&render(&embedded));
        let t = table(&before, &parse(&render(&embedded)), 1.0);
        assert!(t.lines().skip(1).all(|l| redis(l) == "-"), "{t}");
    }

    /// SPEC 6's msgs/s in/out: in, the sends and room publishes a shard took; out, the `msg`
    /// frames it wrote (once each) and the room messages it fanned out to members.
    #[test]
    fn messages_in_and_out_per_second() {
        use crate::metrics::{render, ShardMetrics};
        use std::sync::Arc;
        let shards: Vec<_> = (0..2).map(|_| Arc::new(ShardMetrics::default())).collect();
        let before = parse(&render(&shards));
        shards[0].sends.add(6);
        shards[0].room_publishes.add(2);
        shards[1].msg_frames_out.add(4);
        shards[1].room_deliveries.add(10);
        shards[1].retransmits.add(3); // its own column, not a message out
        let t = table(&before, &parse(&render(&shards)), 2.0);
        let lines: Vec<&str> = t.lines().collect();
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        let (m_in, m_out) = (
            header.iter().position(|h| *h == "msgs_in/s").unwrap(),
            header.iter().position(|h| *h == "msgs_out/s").unwrap(),
        );
        let cell = |line: usize, col: usize| lines[line].split_whitespace().nth(col).unwrap();
        assert_eq!((cell(1, m_in), cell(1, m_out)), ("4", "0"), "{t}");
        assert_eq!((cell(2, m_in), cell(2, m_out)), ("0", "7"), "{t}");
        assert_eq!((cell(3, m_in), cell(3, m_out)), ("4", "7"), "{t}");
    }
}
