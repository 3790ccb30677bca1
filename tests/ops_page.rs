//! The live operator page (`GET /ops`, fed by `GET /api/live`) in a real headless Chromium
//! against a real gateway under load, and the live stream on its own.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::browser::{Browser, Page};
use common::*;
use serde_json::json;

/// The driver itself: values, awaited promises, exceptions with their text, two pages at once.
#[test]
fn browser_driver_evaluates_waits_and_reports_exceptions() {
    let browser = Browser::launch();
    let a = browser.new_page("data:text/html,<title>a</title><p id=x>hello</p>");
    let b = browser.new_page("data:text/html,<title>b</title>");
    assert_eq!(
        a.eval("document.getElementById('x').textContent").unwrap(),
        "hello"
    );
    assert_eq!(b.eval("document.title").unwrap(), "b");
    assert_eq!(
        a.eval("new Promise(r => setTimeout(() => r(41 + 1), 50))")
            .unwrap(),
        42
    );
    let err = a
        .eval("(() => { throw new Error('boom here') })()")
        .unwrap_err();
    assert!(err.contains("boom here"), "{err}");
    a.eval("console.log('logged', 7); setTimeout(() => { window.late = true }, 200)")
        .unwrap();
    a.wait_for("window.late === true", Duration::from_secs(10))
        .unwrap();
    let never = a.wait_for("false", Duration::from_millis(300)).unwrap_err();
    assert!(
        never.contains("logged 7"),
        "the failure shows the console: {never}"
    );
    // Pages are driven at once: an eval awaiting a promise on one page holds up neither the
    // other page nor a second eval on the same page (which here is what resolves it).
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| a.eval("new Promise(r => { window.release = r })"));
        a.wait_for(
            "typeof window.release === 'function'",
            Duration::from_secs(10),
        )
        .unwrap();
        for i in 0..3 {
            assert_eq!(b.eval(&format!("{i} * 2")).unwrap(), i * 2);
        }
        a.eval("window.release(5)").unwrap();
        assert_eq!(waiting.join().unwrap().unwrap(), 5);
    });
    b.eval("window.kept = 1").unwrap();
    b.reload();
    assert_eq!(
        b.eval("typeof window.kept").unwrap(),
        "undefined",
        "reload gave a new document"
    );
}

const KEY: &str = "ops-page-test-key";

/// A raw HTTP/1.1 client of `/api/live`: the response head, then the events of the chunked
/// body one by one.
struct Live {
    stream: TcpStream,
    raw: Vec<u8>,
    body: String,
    pub head: String,
}

impl Live {
    fn open(addr: SocketAddr, key: Option<&str>) -> Live {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        write!(
            stream,
            "GET /api/live HTTP/1.1\r\nHost: {addr}\r\n{auth}Accept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut live = Live {
            stream,
            raw: Vec::new(),
            body: String::new(),
            head: String::new(),
        };
        let end = loop {
            if let Some(p) = live.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            assert!(live.fill(), "closed before the response head");
        };
        live.head = String::from_utf8_lossy(&live.raw[..end]).to_string();
        live.raw.drain(..end);
        live
    }

    fn status(&self) -> u16 {
        self.head
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// Read more bytes; false at end of stream.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk).expect("read /api/live");
        self.raw.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next whole event (`data: ...\n\n`), de-chunked.
    fn next_event(&mut self) -> String {
        loop {
            if let Some(at) = self.body.find("\n\n") {
                let event = self.body[..at + 2].to_string();
                self.body.drain(..at + 2);
                return event;
            }
            // One chunk: `<hex size>\r\n<data>\r\n`.
            let chunk = loop {
                if let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") {
                    let size = usize::from_str_radix(
                        std::str::from_utf8(&self.raw[..eol]).unwrap().trim(),
                        16,
                    )
                    .expect("chunk size");
                    if self.raw.len() >= eol + 2 + size + 2 {
                        let data = self.raw[eol + 2..eol + 2 + size].to_vec();
                        assert_eq!(&self.raw[eol + 2 + size..eol + 4 + size], b"\r\n");
                        self.raw.drain(..eol + 4 + size);
                        break data;
                    }
                }
                assert!(self.fill(), "stream ended inside an event");
            };
            assert!(!chunk.is_empty(), "the stream ended (last chunk)");
            self.body.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event's JSON snapshot.
    fn next_snapshot(&mut self) -> serde_json::Value {
        let event = self.next_event();
        let data = event
            .strip_prefix("data: ")
            .and_then(|d| d.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("not one `data:` line: {event:?}"));
        assert!(!data.contains('\n'), "one line per snapshot: {event:?}");
        serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"))
    }
}

#[test]
fn live_stream_needs_the_key_is_an_event_stream_and_is_bounded() {
    let closed = Gateway::start(&[]);
    let refused = Live::open(closed.admin, Some("anything"));
    assert_eq!(refused.status(), 403, "{}", refused.head);

    let gw = Gateway::start(&["--api-key", KEY]);
    assert_eq!(Live::open(gw.admin, None).status(), 401);
    assert_eq!(Live::open(gw.admin, Some("wrong-key")).status(), 401);
    // The page itself holds no data: served without a key, with a strict policy.
    let (status, page) = gw.admin_get("/ops");
    assert_eq!(status, 200);
    assert!(
        page.contains("id=\"shards\"") && page.contains("/ops/app.js"),
        "{page}"
    );
    for file in ["/ops/app.js", "/ops/style.css"] {
        assert_eq!(gw.admin_get(file).0, 200, "{file}");
    }

    let mut live = Live::open(gw.admin, Some(KEY));
    assert_eq!(live.status(), 200, "{}", live.head);
    assert_eq!(
        live.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(live.header("transfer-encoding").as_deref(), Some("chunked"));
    let first = live.next_snapshot();
    assert_eq!(first["node"]["shards"], 2);
    assert_eq!(first["node"]["store"], "embedded");
    assert!(first["node"]["node_id"]
        .as_str()
        .is_some_and(|n| !n.is_empty()));
    assert_eq!(first["shards"].as_array().unwrap().len(), 2);
    assert_eq!(first["total"]["shard"], "all");
    assert!(
        first["total"]["frames_in_s"].is_null(),
        "no rate before an interval"
    );
    assert!(
        !first.to_string().contains(KEY),
        "the snapshot shows no secret"
    );
    let second = live.next_snapshot();
    assert!(second["interval_s"].as_f64().unwrap() > 0.0, "{second}");
    assert!(second["total"]["frames_in_s"].is_number(), "{second}");
    assert!(second["ts_ms"].as_u64() > first["ts_ms"].as_u64());

    // The bound: MAX_LIVE_STREAMS open (this one included), the next refused and counted.
    let mut open = vec![live];
    while open.len() < ringgate::admin::MAX_LIVE_STREAMS {
        let l = Live::open(gw.admin, Some(KEY));
        assert_eq!(
            l.status(),
            200,
            "stream {} of the bound: {}",
            open.len() + 1,
            l.head
        );
        open.push(l);
    }
    let over = Live::open(gw.admin, Some(KEY));
    assert_eq!(over.status(), 503, "{}", over.head);
    assert!(over.header("retry-after").is_some(), "{}", over.head);
    assert_eq!(
        gw.metric("ringgate_ops_streams_refused_total{shard=\"admin\"}"),
        1
    );
    assert_eq!(gw.metric("ringgate_ops_streams{shard=\"admin\"}"), 16);
    // A closed stream frees its slot (noticed at its next write).
    drop(open.pop());
    let mut again = None;
    assert!(
        eventually(Duration::from_secs(20), || {
            let l = Live::open(gw.admin, Some(KEY));
            let ok = l.status() == 200;
            again = ok.then_some(l);
            ok
        }),
        "a closed stream's slot was never freed"
    );
    // The others still stream.
    assert!(open[0].next_snapshot()["shards"].is_array());
    // Open streams do not hold up a graceful shutdown.
    let mut gw = gw;
    gw.sigterm();
    assert_eq!(
        gw.wait_exit(Duration::from_secs(30)),
        Some(0),
        "SIGTERM with {} live streams open",
        open.len() + 1
    );
}

/// Users sending to each other (every message acked by its recipient) until `stop`: a
/// steady load for the page to show. Each thread returns (sent, accepted, received).
fn start_load(
    gw: &Gateway,
    users: &[String],
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(u64, u64, u64)>> {
    // Everyone connected before anyone sends: each welcome is followed by `synced` at once.
    let sockets: Vec<Ws> = users.iter().map(|u| connect_app(gw, u).0).collect();
    let mut handles = Vec::new();
    for (i, mut ws) in sockets.into_iter().enumerate() {
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let peer = users[(i + 1) % users.len()].clone();
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            let (mut sent, mut accepted, mut received) = (0u64, 0u64, 0u64);
            // 10 sends a second: under the default per-user limit (20/s), so none is refused.
            let mut next_send = Instant::now();
            let give_up = Instant::now() + LOAD_BOUND;
            while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
                if Instant::now() >= next_send {
                    send(&mut ws, &peer, &format!("c{sent}"), json!({"n": sent}));
                    sent += 1;
                    next_send += Duration::from_millis(100);
                }
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        match v["op"].as_str() {
                            Some("accepted") => accepted += 1,
                            Some("msg") => {
                                received += 1;
                                ack(&mut ws, v["seq"].as_u64().unwrap());
                            }
                            Some("delivered") => {}
                            _ => panic!("unexpected under load: {v}"),
                        }
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("load client: {e}"),
                }
            }
            (sent, accepted, received)
        }));
    }
    handles
}

/// The longest the load runs (the test stops it earlier).
const LOAD_BOUND: Duration = Duration::from_secs(240);

/// What the page's table shows: per row (shard number or "all"), per column, the cell's text
/// and title (the rate columns' titles hold the total since start).
#[derive(Debug)]
struct Reading {
    seq: u64,
    ts_ms: u64,
    rows: HashMap<String, HashMap<String, (String, String)>>,
}

impl Reading {
    fn take(page: &Page) -> Reading {
        let v = page
            .eval(
                "(() => { const t = document.getElementById('shards'); return {
                    seq: +t.dataset.seq, ts: +t.dataset.ts,
                    rows: Array.from(t.querySelectorAll('tbody tr, tfoot tr')).map(tr => ({
                        shard: tr.dataset.shard,
                        cells: Array.from(tr.querySelectorAll('td[data-col]'))
                            .map(td => [td.dataset.col, td.textContent, td.title]) })) } })()",
            )
            .unwrap_or_else(|e| panic!("reading the table: {e}"));
        let mut rows = HashMap::new();
        for r in v["rows"].as_array().unwrap() {
            let cells = r["cells"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c[0].as_str().unwrap().to_string(),
                        (
                            c[1].as_str().unwrap().to_string(),
                            c[2].as_str().unwrap().to_string(),
                        ),
                    )
                })
                .collect();
            rows.insert(r["shard"].as_str().unwrap().to_string(), cells);
        }
        Reading {
            seq: v["seq"].as_u64().unwrap(),
            ts_ms: v["ts"].as_u64().unwrap(),
            rows,
        }
    }

    /// A cell as a number ("–" is not one).
    fn value(&self, shard: &str, col: &str) -> f64 {
        let (text, _) = &self.rows[shard][col];
        text.parse()
            .unwrap_or_else(|_| panic!("shard {shard} {col}: {text:?} is not a number ({self:?})"))
    }

    /// A rate column's total since start, from its title `N since start`.
    fn total(&self, shard: &str, col: &str) -> u64 {
        let (_, title) = &self.rows[shard][col];
        title
            .strip_suffix(" since start")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("shard {shard} {col}: title {title:?}"))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The whole story in a real Chromium: a gateway under load, the page opened with the key in
/// its fragment shows it live, its numbers move and agree with /metrics, a wrong key shows an
/// authorization error, and the page comes back by itself after the gateway restarts.
#[test]
fn ops_page_in_chromium_shows_the_live_load_as_metrics_count_it() {
    let gw = Gateway::start(&["--api-key", KEY]);
    // Six users, three on each shard, each sending to the next (so across shards too).
    let users: Vec<String> = (0..6)
        .map(|i| user_on(&format!("op{i}-"), i % 2, 2))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&gw, &users, &stop);
    assert!(
        eventually(Duration::from_secs(20), || gw
            .metric_sum("ringgate_connections_open")
            == 6),
        "the load's six connections did not open"
    );

    let browser = Browser::launch();
    let page = browser.new_page(&format!("http://{}/ops#key={KEY}", gw.admin));
    let table = "document.getElementById('shards')";
    let live = format!(
        "(() => {{ const c = {table}.querySelector('tfoot td[data-col=connections]'),
                    m = {table}.querySelector('tfoot td[data-col=msgs_in_s]');
                  return !!c && +c.textContent > 0 && !!m && parseFloat(m.textContent) > 0 }})()"
    );
    page.wait_for(&live, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the page never showed the load: {e}"));
    assert_eq!(
        page.eval("location.hash").unwrap(),
        "",
        "the key leaves the address bar once read"
    );
    let node = page
        .eval("document.getElementById('node').textContent")
        .unwrap();
    let node = node.as_str().unwrap();
    assert!(
        node.contains("2 shards") && node.contains("store embedded"),
        "{node}"
    );

    // A reading, then /metrics, then a reading made after the scrape: the page's counters
    // bracket the scrape's, and its connections equal them (the load neither opens nor
    // closes any now).
    let before = Reading::take(&page);
    let scraped_from = now_ms();
    assert!(before.ts_ms <= scraped_from);
    let (_, text) = gw.admin_get("/metrics");
    let scraped_to = now_ms();
    let m = ringgate::stats::parse(&text);
    let metric = |name: &str, shard: usize| -> u64 {
        *m.get(&(name.to_string(), shard))
            .unwrap_or_else(|| panic!("{name} shard {shard} not in /metrics")) as u64
    };
    page.wait_for(
        &format!("+{table}.dataset.ts > {scraped_to}"),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("no snapshot after the scrape: {e}"));
    let after = Reading::take(&page);
    assert!(after.seq > before.seq, "{before:?} {after:?}");
    for shard in 0..2usize {
        let s = shard.to_string();
        for r in [&before, &after] {
            assert_eq!(
                r.value(&s, "connections") as u64,
                metric("ringgate_connections_open", shard),
                "shard {shard}: page {r:?}"
            );
        }
        let bracket = |what: &str, page_before: u64, scraped: u64, page_after: u64| {
            assert!(
                page_before <= scraped && scraped <= page_after,
                "shard {shard} {what}: page {page_before} then {page_after}, /metrics {scraped} in between"
            );
        };
        bracket(
            "frames in",
            before.total(&s, "frames_in_s"),
            metric("ringgate_frames_in_total", shard),
            after.total(&s, "frames_in_s"),
        );
        bracket(
            "messages in",
            before.total(&s, "msgs_in_s"),
            metric("ringgate_sends_total", shard) + metric("ringgate_room_publishes_total", shard),
            after.total(&s, "msgs_in_s"),
        );
        bracket(
            "cross-shard",
            before.value(&s, "cross_shard") as u64,
            metric("ringgate_cross_shard_total", shard),
            after.value(&s, "cross_shard") as u64,
        );
    }
    // The numbers move, and the total row adds up.
    assert!(after.total("all", "frames_in_s") > before.total("all", "frames_in_s"));
    assert!(after.total("all", "msgs_in_s") > before.total("all", "msgs_in_s"));
    assert!(after.value("all", "msgs_in_s") > 0.0 && after.value("all", "msgs_out_s") > 0.0);
    assert_eq!(after.value("all", "connections"), 6.0);
    for col in ["frames_in_s", "msgs_in_s", "msgs_out_s"] {
        assert_eq!(
            after.total("0", col) + after.total("1", col),
            after.total("all", col),
            "{col}: {after:?}"
        );
        // Each row's rate is rounded to a tenth on its own.
        let sum = after.value("0", col) + after.value("1", col);
        assert!(
            (sum - after.value("all", col)).abs() <= 0.15,
            "{col}: {after:?}"
        );
    }

    // Some history for the charts, then the README's screenshot.
    let shot_at = after.seq + 20;
    page.wait_for(
        &format!("+{table}.dataset.seq >= {shot_at}"),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("the page stopped updating: {e}"));
    // Every run leaves one in target/; the README's (committed) is rewritten only when
    // missing or asked for, so a test run leaves the tree clean.
    let root = env!("CARGO_MANIFEST_DIR");
    page.screenshot(format!("{root}/target/ops-page.png"));
    let readme_shot = format!("{root}/docs/ops-page.png");
    if std::env::var_os("RINGGATE_UPDATE_SCREENSHOT").is_some()
        || !std::path::Path::new(&readme_shot).exists()
    {
        page.screenshot(&readme_shot);
    }

    // A wrong key: an authorization error on the page, no data, the key form shown.
    let wrong = browser.new_page(&format!("http://{}/ops#key=wrong-key", gw.admin));
    wrong
        .wait_for(
            "(() => { const s = document.getElementById('status');
                      return s.dataset.state === 'unauthorized'
                          && s.textContent.includes('authorization error (HTTP 401)') })()",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("a wrong key did not show an authorization error: {e}"));
    assert_eq!(wrong.eval(&format!("+{table}.dataset.seq")).unwrap(), 0);
    assert_eq!(
        wrong
            .eval("document.getElementById('keyform').hidden")
            .unwrap(),
        false
    );

    // No key: the form asks for one; given there, the page goes live and keeps the key for
    // this tab across a reload.
    let form = browser.new_page(&format!("http://{}/ops", gw.admin));
    form.wait_for(
        "document.getElementById('status').dataset.state === 'idle'
         && !document.getElementById('keyform').hidden",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("no key form without a key: {e}"));
    form.eval(&format!(
        "document.getElementById('key').value = '{KEY}';
         document.getElementById('keyform').requestSubmit()"
    ))
    .unwrap();
    let shows_data = format!("+{table}.dataset.seq > 0");
    form.wait_for(&shows_data, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the key from the form did not open the stream: {e}"));
    form.reload();
    form.wait_for(&shows_data, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the key did not survive a reload of the tab: {e}"));
    drop(form);

    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for h in load {
        let (s, accepted, received) = h.join().expect("a load client failed");
        assert!(
            s > 0 && accepted > 0 && received > 0,
            "{s} {accepted} {received}"
        );
        sent += s;
    }
    eprintln!("ops page test: {sent} messages sent under the page");

    // The stream drops (the gateway is killed) and the page reconnects by itself to the new
    // one on the same admin address.
    let admin = gw.admin;
    drop(gw);
    page.wait_for(
        "document.getElementById('status').dataset.state === 'error'",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("the page did not notice the stream drop: {e}"));
    let seq_before = page.eval(&format!("+{table}.dataset.seq")).unwrap();
    let admin_arg = admin.to_string();
    let _gw2 = Gateway::start_raw(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin_arg,
            "--shards",
            "2",
            "--api-key",
            KEY,
        ],
        &[],
    );
    page.wait_for(
        &format!(
            "document.getElementById('status').dataset.state === 'live'
             && +{table}.dataset.seq > {seq_before}
             && {table}.querySelector('tfoot td[data-col=connections]').textContent === '0'"
        ),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("the page did not reconnect to the restarted gateway: {e}"));
}

/// With Redis: the store is named (its URL is not shown), and Redis latency is the mean batch
/// time over the interval, a number once messages are spilled.
#[test]
fn live_stream_with_redis_shows_its_batch_latency() {
    let redis = common::redis::RedisServer::start();
    let url = redis.url();
    let gw = Gateway::start(&["--api-key", KEY, "--redis-url", &url]);
    assert!(
        eventually(Duration::from_secs(20), || gw.admin_get("/readyz").0 == 200),
        "the gateway never became ready on Redis"
    );
    let mut live = Live::open(gw.admin, Some(KEY));
    assert_eq!(live.status(), 200, "{}", live.head);
    let first = live.next_snapshot();
    assert_eq!(first["node"]["store"], "redis");
    assert!(
        !first.to_string().contains(&url),
        "the Redis URL is not shown"
    );
    // Messages to an offline user are spilled to Redis, a batch each (or a few together).
    let (mut ws, _) = connect_app(&gw, "ops-sender");
    for i in 0..20 {
        send(&mut ws, "ops-offline", &format!("r{i}"), json!({"n": i}));
        assert_eq!(next_op(&mut ws, "accepted")["cid"], format!("r{i}"));
    }
    let mut seen = Vec::new();
    let latency = (0..30).find_map(|_| {
        let s = live.next_snapshot();
        seen.push(s["total"].clone());
        s["total"]["redis_ms"].as_f64()
    });
    let latency = latency.unwrap_or_else(|| panic!("no Redis latency in 30 snapshots: {seen:#?}"));
    assert!(latency > 0.0, "{latency}");
    let spilled = live.next_snapshot()["total"]["spilled"].as_u64().unwrap();
    assert!(spilled >= 20, "{spilled} spilled");
}
