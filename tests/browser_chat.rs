//! The JavaScript client (clients/js) in a real headless Chromium against a real gateway
//! (issue 18, item 3): pages chat both ways through a page reload with sends in flight,
//! connections cut from the server side, and the gateway SIGKILLed and restarted with Redis;
//! a slow page in a room. Afterwards every accepted message was displayed exactly once, in the
//! order its sender was told `accepted`, on every page.
//!
//! The pages are served by the gateway itself (dev mode serves the library at
//! `/src/ringgate.js`) through a TCP relay in this test: cutting the relay's sockets is the
//! server side closing them (no close frame, as when a node's network goes). Each page keeps
//! what it displayed in `localStorage`, so a reload is part of the record, not a reset.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::browser::{Browser, Page};
use common::redis::RedisServer;
use common::*;
use serde_json::Value;

/// Installs the client in a page for user `me` (after every load): what the page displays
/// and what its sender was told is kept in `localStorage` under `me:`.
const HARNESS: &str = r#"(async (me, slowMs) => {
  const { RinggateClient } = await import('/src/ringgate.js');
  const load = (k) => JSON.parse(localStorage.getItem(me + ':' + k) || '[]');
  const save = (k, v) => localStorage.setItem(me + ':' + k, JSON.stringify(v));
  const t = { shown: load('shown'), accepted: load('accepted'), sent: load('sent'),
              rooms: load('rooms'), gaps: load('gaps').length, joined: false };
  const c = new RinggateClient({ url: `ws://${location.host}/ws`, user: me,
                                 backoffMinMs: 50, backoffMaxMs: 400, holdMaxMs: 60000 });
  c.on('message', (m) => { t.shown.push([m.from, m.body.n, m.id]); save('shown', t.shown); });
  c.on('accepted', (a) => { t.accepted.push([a.cid, a.id]); save('accepted', t.accepted); });
  c.on('room', (r) => {
    // A slow page: its handler holds the tab's thread, so its socket backs up.
    const end = performance.now() + slowMs;
    while (performance.now() < end) {}
    t.rooms.push([r.offset, r.body.n]); save('rooms', t.rooms);
  });
  c.on('gap', () => { t.gaps += 1; save('gaps', new Array(t.gaps).fill(0)); });
  c.on('joined', () => { t.joined = true; });
  t.send = (to, n) => { const cid = c.send(to, { n }); t.sent.push([cid, to, n]); save('sent', t.sent); return cid; };
  t.c = c;
  window.t = t;
  c.start();
  return true;
})"#;

fn install(page: &Page, me: &str, slow_ms: u64) {
    page.eval(&format!("{HARNESS}('{me}', {slow_ms})"))
        .unwrap_or_else(|e| panic!("install the client for {me}: {e}"));
    page.wait_for("window.t && t.c.state === 'open'", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{me} never connected: {e}"));
}

/// `count` sends from the page to `to`, numbered from `first`, in one go.
fn send_burst(page: &Page, to: &str, first: u64, count: u64) {
    page.eval(&format!(
        "(() => {{ for (let n = {first}; n < {}; n++) t.send('{to}', n); return true; }})()",
        first + count
    ))
    .expect("send");
}

/// A relay from its own port to the gateway's: the pages' only way to it. `cut` closes every
/// socket towards the pages, as a server whose connections are reset.
struct Relay {
    addr: SocketAddr,
    towards_pages: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let towards_pages: Arc<Mutex<Vec<TcpStream>>> = Default::default();
        let kept = towards_pages.clone();
        std::thread::spawn(move || {
            for page in listener.incoming().map_while(Result::ok) {
                let Ok(gateway) = TcpStream::connect(target) else {
                    continue; // the gateway is down: the page's connect fails
                };
                kept.lock().unwrap().push(page.try_clone().unwrap());
                for (mut from, mut to) in [
                    (page.try_clone().unwrap(), gateway.try_clone().unwrap()),
                    (gateway, page),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay {
            addr,
            towards_pages,
        }
    }

    fn cut(&self) -> usize {
        let socks = std::mem::take(&mut *self.towards_pages.lock().unwrap());
        for s in &socks {
            let _ = s.shutdown(Shutdown::Both);
        }
        socks.len()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A dev-mode gateway (it serves the library) on `port` (0: any) with Redis.
fn gateway(port: u16, redis: &RedisServer, extra: &[&str]) -> Gateway {
    let listen = format!("127.0.0.1:{port}");
    let url = redis.url();
    let mut args = vec![
        "serve",
        "--listen",
        &listen,
        "--admin-listen",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--redis-url",
        &url,
        "--ack-timeout-ms",
        "500",
    ];
    args.extend_from_slice(extra);
    Gateway::start_raw(&args, &[])
}

/// What one page recorded.
struct Record {
    /// (from, n, id) in display order.
    shown: Vec<(String, u64, String)>,
    /// (cid, id) in the order `accepted` was told.
    accepted: Vec<(String, String)>,
    /// cid -> (to, n).
    sent: BTreeMap<String, (String, u64)>,
}

fn record(page: &Page) -> Record {
    let v = page
        .eval("JSON.stringify({shown: t.shown, accepted: t.accepted, sent: t.sent})")
        .unwrap();
    let v: Value = serde_json::from_str(v.as_str().unwrap()).unwrap();
    let s = |x: &Value| x.as_str().unwrap().to_string();
    let u = |x: &Value| x.as_u64().unwrap();
    Record {
        shown: v["shown"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (s(&e[0]), u(&e[1]), s(&e[2])))
            .collect(),
        accepted: v["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (s(&e[0]), s(&e[1])))
            .collect(),
        sent: v["sent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (s(&e[0]), (s(&e[1]), u(&e[2]))))
            .collect(),
    }
}

/// Every message `from` sent to `to`: accepted once, displayed once by `to`, in the order
/// `from` was told `accepted`, with the id it was told.
fn check_pair(from: &str, sender: &Record, to: &str, recipient: &Record) -> usize {
    let mut told = Vec::new();
    let mut seen = BTreeSet::new();
    for (cid, id) in &sender.accepted {
        assert!(
            seen.insert(cid.clone()),
            "{from}: `accepted` twice for {cid}"
        );
        let (dest, n) = sender
            .sent
            .get(cid)
            .unwrap_or_else(|| panic!("{from}: unknown cid {cid}"));
        if dest == to {
            told.push((*n, id.clone()));
        }
    }
    let sent_to: BTreeSet<u64> = sender
        .sent
        .values()
        .filter(|(d, _)| d == to)
        .map(|(_, n)| *n)
        .collect();
    let told_ns: BTreeSet<u64> = told.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        told_ns, sent_to,
        "{from} -> {to}: not every send was accepted"
    );
    let shown: Vec<(u64, String)> = recipient
        .shown
        .iter()
        .filter(|(f, _, _)| f == from)
        .map(|(_, n, id)| (*n, id.clone()))
        .collect();
    assert_eq!(
        shown, told,
        "{from} -> {to}: displayed (n, id) differ from the order {from} was told `accepted`"
    );
    told.len()
}

#[test]
fn pages_chat_through_a_reload_server_side_cuts_and_a_gateway_killed_with_redis() {
    let redis = RedisServer::start();
    // Restarted on the same port below: one the kernel does not hand out to clients.
    let port = common::restartable_port(32_000);
    let mut gw = gateway(port, &redis, &[]);
    let relay = Relay::start(gw.public);
    let browser = Browser::launch();
    let origin = relay.url("/src/ringgate.js");
    let ann = browser.new_page(&origin);
    let ben = browser.new_page(&origin);
    install(&ann, "ann", 0);
    install(&ben, "ben", 0);
    let mut n = 0;
    let mut round = |a: u64, b: u64| {
        send_burst(&ann, "ben", n, a);
        send_burst(&ben, "ann", n, b);
        n += a.max(b);
    };

    // Both ways.
    round(15, 15);
    // ann reloads with its sends in flight: its outbox and its dedup memory survive.
    round(20, 5);
    ann.reload();
    install(&ann, "ann", 0);
    // The server side cuts both connections mid-conversation, twice.
    round(20, 20);
    assert!(relay.cut() >= 2, "no connection to cut");
    round(10, 10);
    std::thread::sleep(Duration::from_millis(100));
    relay.cut();
    // The gateway is SIGKILLed with sends in flight and comes back on the same port.
    round(20, 20);
    gw.sigkill();
    round(10, 10);
    gw = gateway(port, &redis, &[]);
    round(10, 10);

    let settled = "t.c.pending().length === 0 && t.c.state === 'open'";
    for (page, who) in [(&ann, "ann"), (&ben, "ben")] {
        page.wait_for(settled, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{who} still has sends not accepted: {e}"));
    }
    let (ra, rb) = (record(&ann), record(&ben));
    // Displays catch up with what the other side was told.
    for (page, who, from_other) in [
        (&ann, "ann", rb.accepted.len()),
        (&ben, "ben", ra.accepted.len()),
    ] {
        page.wait_for(
            &format!("t.shown.length >= {from_other}"),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{who} did not display everything: {e}"));
    }
    let (ra, rb) = (record(&ann), record(&ben));
    let to_ben = check_pair("ann", &ra, "ben", &rb);
    let to_ann = check_pair("ben", &rb, "ann", &ra);
    assert_eq!((to_ben, to_ann), (105, 90));
    println!(
        "browser chat: ann -> ben {to_ben}, ben -> ann {to_ann}, each displayed once in `accepted` order; {} frames out since the restart",
        gw.metric_sum("ringgate_frames_out_total")
    );
}

#[test]
fn a_slow_page_in_a_room_recovers_every_message_once_in_order() {
    let redis = RedisServer::start();
    // A small outbound buffer, so that a page that does not keep up is skipped (`gap`).
    let gw = gateway(
        0,
        &redis,
        // The publisher is a flood by design: no send or frame limit for it.
        &[
            "--max-outbound",
            "65536",
            "--slow-close-ms",
            "600000",
            "--user-send-rate",
            "0",
            "--conn-frame-rate",
            "0",
        ],
    );
    let relay = Relay::start(gw.public);
    let browser = Browser::launch();
    let origin = relay.url("/src/ringgate.js");
    let fast = browser.new_page(&origin);
    let slow = browser.new_page(&origin);
    install(&fast, "fast", 0);
    install(&slow, "slow", 5);
    for page in [&fast, &slow] {
        page.eval("t.c.join('lobby')").unwrap();
        page.wait_for("t.joined", Duration::from_secs(10)).unwrap();
    }
    // A publisher outside the browser: 600 messages of 1 KiB as fast as the gateway takes them.
    let (mut publisher, _) = connect_app(&gw, "pub");
    let pad = "p".repeat(1024);
    let total = 600u64;
    let mut offsets = BTreeMap::new();
    for n in 0..total {
        send_text(
            &mut publisher,
            &serde_json::json!({"op":"publish","room":"lobby","cid":format!("r{n}"),"body":{"n":n,"pad":pad}}).to_string(),
        );
    }
    while offsets.len() < total as usize {
        let v = recv_json(&mut publisher);
        assert_ne!(v["op"], "error", "publish refused: {v}");
        if v["op"] == "accepted" {
            let n: u64 = v["cid"].as_str().unwrap()[1..].parse().unwrap();
            offsets.insert(v["offset"].as_u64().unwrap(), n);
        }
    }
    let order: Vec<(u64, u64)> = offsets.into_iter().collect();
    for (page, who) in [(&fast, "fast"), (&slow, "slow")] {
        page.wait_for(
            &format!("t.rooms.length >= {total}"),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("{who} did not display every room message: {e}"));
        let v = page.eval("JSON.stringify(t.rooms)").unwrap();
        let shown: Vec<(u64, u64)> = serde_json::from_str(v.as_str().unwrap()).unwrap();
        assert_eq!(
            shown, order,
            "{who}: room messages not displayed once each in offset order"
        );
    }
    let gaps = slow.eval("t.gaps").unwrap().as_u64().unwrap();
    assert!(
        gaps > 0,
        "the slow page was never skipped: the test did not test a slow consumer"
    );
    println!(
        "slow page: {gaps} gaps, all {total} room messages displayed once in order on both pages"
    );
}

/// Item 5: the demo page a newcomer opens after `cargo run --release` (dev mode serves it):
/// alice types, bob's pane shows it with alice's tick moving on.
#[test]
fn the_demo_page_served_by_the_gateway_shows_two_users_chatting() {
    let gw = Gateway::start(&[]);
    let browser = Browser::launch();
    let page = browser.new_page(&format!("http://{}/demo/", gw.public));
    let both_open = "['alice','bob'].every((u) => ringgateDemo[u] && ringgateDemo[u].client().state === 'open')";
    page.wait_for(both_open, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the demo's clients never connected: {e}"));
    page.eval(
        "(() => { const f = document.querySelector('#alice form'); f.querySelector('input').value = 'hello bob from the demo'; f.requestSubmit(); return true; })()",
    )
    .unwrap();
    page.wait_for(
        "document.querySelector('#bob ol').textContent.includes('hello bob from the demo')",
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("bob's pane never showed alice's message: {e}"));
    page.wait_for(
        "ringgateDemo.alice.client().pending().length === 0",
        Duration::from_secs(20),
    )
    .unwrap();
    page.screenshot(concat!(env!("CARGO_TARGET_TMPDIR"), "/demo-page.png"));
}
