//! The live operator page (`GET /ops`, fed by `GET /api/live`) in a real headless Chromium
//! against a real gateway under load, and the live stream on its own.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::browser::Browser;
use common::*;

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
}
