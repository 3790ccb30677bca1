//! Test harness: starts a real `ringgate` process on free loopback ports and talks to it over
//! real sockets, with tungstenite as the WebSocket client and a raw client for frames a
//! well-behaved library will not send.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod browser;
pub mod certs;
pub mod redis;

pub const SECRET: &str = "integration-test-secret-0123";

/// A client frame (masked) as bytes, to be written at once or in pieces.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// A free loopback port below `below` and below the kernel's ephemeral range, for a server a
/// test kills and starts again on the same port: a port from the ephemeral range (the ones
/// `127.0.0.1:0` hands out) can be taken, between the kill and the restart, as the local port
/// of any outgoing connection on the host, and the restart then fails to bind (seen: the
/// browser test's gateway restart refused with "already served").
pub fn restartable_port(below: u16) -> u16 {
    restartable_port_with(below, &[])
}

/// Ports this test process has handed out. Tests run in parallel threads, and a port that was
/// free when one test looked can be picked by another before the first server binds it, or
/// while it is down between a kill and a restart (seen in CI: a Redis Cluster node that never
/// answered PING because its port or bus port had been picked by a concurrent test).
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// As [`restartable_port`], with the ports at `port + offset` for each of `offsets` free and
/// kept for this test too (a Redis Cluster node's bus port).
pub fn restartable_port_with(below: u16, offsets: &[u16]) -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let high = below.min(ephemeral_low);
    let low = 10_000.min(high / 2);
    // Spread the tries so that concurrent tests rarely try the same port first.
    let mut x = std::process::id() as u64;
    x ^= std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = low + (x % u64::from(high - low)) as u16;
        let wanted: Vec<u16> = std::iter::once(port)
            .chain(offsets.iter().filter_map(|o| port.checked_add(*o)))
            .collect();
        if wanted.len() == offsets.len() + 1
            && wanted.iter().all(|p| {
                !handed_out.contains(p) && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
            })
        {
            handed_out.extend(&wanted);
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

pub struct Gateway {
    pub child: Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: mpsc::Receiver<String>,
}

impl Gateway {
    /// Start with `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --shards 2` plus `args`.
    pub fn start(args: &[&str]) -> Gateway {
        Self::start_shards(2, args)
    }

    /// As [`Gateway::start`] with `shards` shards.
    pub fn start_shards(shards: usize, args: &[&str]) -> Gateway {
        let shards = shards.to_string();
        let mut full = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--shards",
            &shards,
        ];
        full.extend_from_slice(args);
        Self::start_raw(&full, &[])
    }

    pub fn start_raw(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringgate"));
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ringgate");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                // The process may have exited (a refused config): its stderr is still being
                // read, so wait for it to end (bounded) rather than take what arrived so far.
                let mut errs = Vec::new();
                while let Ok(line) = err_rx.recv_timeout(Duration::from_secs(5)) {
                    errs.push(line);
                }
                panic!("ringgate did not report its ports; stderr: {errs:#?}")
            });
        let field = |prefix: &str| -> SocketAddr {
            let start = line
                .find(prefix)
                .unwrap_or_else(|| panic!("no {prefix} in {line}"))
                + prefix.len();
            line[start..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        // A run for one driver (tests/run.sh runs the gateway suite on each) tests that one.
        if let Ok(driver) = std::env::var("RINGGATE_IO_DRIVER") {
            assert!(
                line.contains(&format!(" io {driver} ")),
                "RINGGATE_IO_DRIVER={driver}, started with another: {line}"
            );
        }
        Gateway {
            // `wss://` when it serves TLS (tests/tls.rs).
            public: field(if line.contains("wss://") {
                "wss://"
            } else {
                "ws://"
            }),
            admin: field("admin http://"),
            child,
            stderr: err_rx,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.public, path_and_query)
    }

    /// GET on the admin listener; returns (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path, &[])
    }

    /// Value of one series line, e.g. `ringgate_connections_open{shard="0"}`.
    pub fn metric(&self, series: &str) -> u64 {
        let (_, body) = self.admin_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("series {series} not in /metrics:\n{body}"))
    }

    /// Sum of a metric over all shards.
    pub fn metric_sum(&self, name: &str) -> u64 {
        let (_, body) = self.admin_get("/metrics");
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Sum of a metric over the series whose labels contain `label` (e.g. `reason="ip_open"`).
    pub fn metric_sum_where(&self, name: &str, label: &str) -> u64 {
        let (_, body) = self.admin_get("/metrics");
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// SIGKILL and reap: nothing of the gateway's memory survives.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Wait for exit (bounded); returns the exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the gateway said (a panic on a shard, a store error):
        // otherwise its log is lost with the process.
        if std::thread::panicking() {
            let lines: Vec<String> = self.stderr.try_iter().collect();
            let from = lines.len().saturating_sub(200);
            eprintln!(
                "--- the gateway's last {} log lines ---",
                lines.len() - from
            );
            for line in &lines[from..] {
                eprintln!("{line}");
            }
        }
    }
}

/// Run the `ringgate` binary to completion (for `token`, `config`, `stats`, refused starts).
pub fn run_ringgate(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringgate"));
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run ringgate")
}

/// Poll `f` until it returns true or `within` passes (behaviour, not timing, is asserted).
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send a raw request head, read until the server closes; returns (status, whole response).
/// Send `head` raw; the status and the whole answer (head and body) as text.
pub fn exchange(addr: SocketAddr, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}

/// Minimal HTTP/1.1 request; returns (status, body).
pub fn http_request(addr: SocketAddr, head: &str) -> (u16, String) {
    let (status, text) = exchange(addr, head);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

/// `POST path` with a JSON body and a bearer key on the admin listener; the answer as JSON.
pub fn post_json(gw: &Gateway, path: &str, body: &str, key: &str) -> (u16, serde_json::Value) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, text) = http_request(gw.admin, &head);
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

fn head_with(first_line: &str, addr: SocketAddr, headers: &[&str]) -> String {
    let mut head = format!("{first_line}\r\nHost: {addr}\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

pub fn http_get(addr: SocketAddr, path: &str, headers: &[&str]) -> (u16, String) {
    let mut all = vec!["Connection: close"];
    all.extend_from_slice(headers);
    http_request(
        addr,
        &head_with(&format!("GET {path} HTTP/1.1"), addr, &all),
    )
}

/// Status and whole response of a WebSocket upgrade attempt that is expected to be refused.
pub fn upgrade_status(addr: SocketAddr, path: &str, headers: &[&str]) -> (u16, String) {
    let mut all = vec![
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ];
    all.extend_from_slice(headers);
    exchange(
        addr,
        &head_with(&format!("GET {path} HTTP/1.1"), addr, &all),
    )
}

pub type Ws = tungstenite::WebSocket<TcpStream>;

/// A tungstenite client, connected and upgraded; panics on refusal.
pub fn connect(gw: &Gateway, path_and_query: &str) -> Ws {
    connect_with(gw, path_and_query, &[]).expect("upgrade")
}

pub fn connect_with(
    gw: &Gateway,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = gw.url(path_and_query).into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let stream = TcpStream::connect(gw.public).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("interrupted handshake"),
    }
}

/// Next text frame as JSON (pings are answered by tungstenite itself).
pub fn recv_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        let msg = match ws.read() {
            Ok(m) => m,
            // A signal landed in the test process during the read: nothing was lost, read on.
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
                continue
            }
            Err(e) => panic!("read: {e:?}"),
        };
        match msg {
            tungstenite::Message::Text(t) => return serde_json::from_str(&t).expect("json"),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

pub fn send_text(ws: &mut Ws, text: &str) {
    ws.send(tungstenite::Message::text(text)).expect("send");
}

/// Every frame before the answer to a `ping` (answered in order with what came before it).
pub fn frames_before_pong(ws: &mut Ws) -> Vec<serde_json::Value> {
    send_text(ws, r#"{"op":"ping"}"#);
    let mut seen = Vec::new();
    loop {
        let v = recv_json(ws);
        if v["op"] == "pong" {
            return seen;
        }
        seen.push(v);
    }
}

/// Several text frames in one write (served by the gateway in one read, at one instant).
pub fn send_texts(ws: &mut Ws, texts: &[&str]) {
    for text in texts {
        ws.write(tungstenite::Message::text(*text)).expect("queue");
    }
    ws.flush().expect("send");
}

/// Read until the server's close frame; returns its code.
pub fn recv_close_code(ws: &mut Ws) -> u16 {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(f))) => return u16::from(f.code),
            Ok(tungstenite::Message::Close(None)) => return 1005,
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// Upgraded, then welcome + synced consumed; returns the welcome.
pub fn connect_app(gw: &Gateway, user: &str) -> (Ws, serde_json::Value) {
    let mut ws = connect(gw, &format!("/ws?user={user}"));
    let welcome = recv_json(&mut ws);
    assert_eq!(welcome["op"], "welcome");
    let synced = recv_json(&mut ws);
    assert_eq!(synced["op"], "synced");
    (ws, welcome)
}

/// A raw WebSocket client over a socket: sends exactly the frames it is told to (masked),
/// never answers pings on its own.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawWs {
    /// Upgrade and return the client with anything after the 101 head kept buffered.
    pub fn connect(addr: SocketAddr, path: &str) -> RawWs {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        Self::after_upgrade(stream)
    }

    /// The upgrade request was already written on `stream`: read the 101 head, keep the rest.
    pub fn after_upgrade(mut stream: TcpStream) -> RawWs {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            let n = stream.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "closed during upgrade: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..end);
        RawWs { stream, buf }
    }

    /// Wrap a second handle of an upgraded stream (e.g. a writer thread's clone).
    pub fn from_stream(stream: TcpStream) -> RawWs {
        RawWs {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let out = masked_frame(fin, opcode, payload);
        self.stream.write_all(&out).unwrap();
    }

    /// Next frame, or None on EOF, reset or the read timeout.
    pub fn recv(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((f, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(f);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames until the server's close frame: (everything before it, the close frame).
    pub fn until_close(&mut self) -> (Vec<RawFrame>, RawFrame) {
        let mut before: Vec<RawFrame> = Vec::new();
        loop {
            let Some(f) = self.recv() else {
                let kinds: Vec<String> = before
                    .iter()
                    .map(|f: &RawFrame| match f.opcode {
                        1 => String::from_utf8_lossy(&f.payload).into_owned(),
                        op => format!("opcode {op}"),
                    })
                    .collect();
                panic!("no close frame (EOF, reset or the 10 s read timeout); frames before: {kinds:#?}");
            };
            if f.opcode == 8 {
                return (before, f);
            }
            before.push(f);
        }
    }

    /// Next text frame as JSON, skipping control frames.
    pub fn recv_json(&mut self) -> serde_json::Value {
        loop {
            let f = self.recv().expect("frame");
            if f.opcode == 1 {
                return serde_json::from_slice(&f.payload).unwrap();
            }
        }
    }
}

fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    let (len, mut pos) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    if buf.len() < pos + len {
        return None;
    }
    let payload = buf[pos..pos + len].to_vec();
    pos += len;
    Some((
        RawFrame {
            fin,
            opcode,
            payload,
        },
        pos,
    ))
}

// Application-level helpers shared by the delivery and Redis tests.

/// A user name starting with `prefix` whose home shard is `shard`.
pub fn user_on(prefix: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| ringgate::mesh::home_shard(u, shards) == shard)
        .unwrap()
}

pub fn send(ws: &mut Ws, to: &str, cid: &str, body: serde_json::Value) {
    send_text(
        ws,
        &serde_json::json!({"op":"send","to":to,"cid":cid,"body":body}).to_string(),
    );
}

pub fn ack(ws: &mut Ws, seq: u64) {
    send_text(ws, &serde_json::json!({"op":"ack","seq":seq}).to_string());
}

/// The next frame, which must have this op.
pub fn next_op(ws: &mut Ws, op: &str) -> serde_json::Value {
    let v = recv_json(ws);
    assert_eq!(v["op"], op, "expected {op}, got {v}");
    v
}

/// Connect and read welcome, the replayed msgs (and read receipts), and synced; returns (ws,
/// replayed frames).
pub fn connect_replay(gw: &Gateway, path: &str) -> (Ws, Vec<serde_json::Value>) {
    let mut ws = connect(gw, path);
    assert_eq!(recv_json(&mut ws)["op"], "welcome");
    let mut msgs = Vec::new();
    loop {
        let v = recv_json(&mut ws);
        match v["op"].as_str() {
            Some("msg") | Some("read") => msgs.push(v),
            Some("synced") => {
                assert_eq!(v["count"], msgs.len() as u64);
                return (ws, msgs);
            }
            _ => panic!("unexpected before synced: {v}"),
        }
    }
}

/// A small seeded PRNG (xorshift64) for the randomized tests: a failing seed replays exactly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `RINGGATE_SEED` when set (to replay a run), else the test's fixed seed.
pub fn test_seed(default: u64) -> u64 {
    std::env::var("RINGGATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Join `room` (with `since` when given) and read up to `joined`; returns (room frames
/// replayed before it, joined).
pub fn join(
    ws: &mut Ws,
    room: &str,
    since: Option<u64>,
) -> (Vec<serde_json::Value>, serde_json::Value) {
    let mut frame = serde_json::json!({"op":"join","room":room});
    if let Some(s) = since {
        frame["since"] = serde_json::json!(s);
    }
    send_text(ws, &frame.to_string());
    let mut replay = Vec::new();
    loop {
        let v = recv_json(ws);
        match v["op"].as_str() {
            Some("room") => replay.push(v),
            Some("joined") => {
                assert_eq!(v["room"], room);
                return (replay, v);
            }
            _ => panic!("unexpected while joining: {v}"),
        }
    }
}

/// Randomized client tests: poll every client until nothing is pending and nothing arrives
/// for 40 rounds, handing each event to `on_event(client index, event)`. A hang guard, not a
/// time limit: it fails after 60 s without a single event while sends are pending (a run that
/// sent thousands on a loaded machine may take longer than that to settle), or after 10
/// minutes in all.
pub fn settle_clients(
    clients: &mut [ringgate::client::Client],
    seed: u64,
    mut on_event: impl FnMut(usize, ringgate::client::Event),
) {
    let started = Instant::now();
    let mut last_event = started;
    let mut quiet = 0;
    let mut events = 0;
    while quiet < 40 {
        let now = Instant::now();
        let stuck = now.duration_since(last_event) >= Duration::from_secs(60);
        if stuck || now.duration_since(started) >= Duration::from_secs(600) {
            let pending: Vec<usize> = clients.iter().map(|c| c.pending()).collect();
            panic!(
                "did not settle (seed {seed}): {} s since the last event, {} s in all; sends \
                 pending per client {pending:?}, events in the last round {events}",
                now.duration_since(last_event).as_secs(),
                now.duration_since(started).as_secs()
            );
        }
        events = 0;
        for (i, c) in clients.iter_mut().enumerate() {
            while let Some(e) = c.poll(Duration::from_millis(2)).unwrap() {
                events += 1;
                on_event(i, e);
            }
        }
        if events > 0 {
            last_event = Instant::now();
        }
        let pending: usize = clients.iter().map(ringgate::client::Client::pending).sum();
        quiet = if events == 0 && pending == 0 {
            quiet + 1
        } else {
            0
        };
    }
}

/// Randomized client tests: what was sent, accepted and displayed, to check SPEC section 4's
/// order: each recipient sees a sender's messages in the order the sender was told `accepted`
/// (not the order it sent them: a send refused with `unavailable` is resent later and may be
/// accepted after newer ones).
#[derive(Default)]
pub struct Ledger {
    /// (sender, cid) -> the sender's counter in the body.
    counter_of: std::collections::HashMap<(String, String), i64>,
    /// Sender -> counters in the order of their first `accepted`.
    accepted: std::collections::HashMap<String, Vec<i64>>,
    /// (sender, recipient) -> counters in the order displayed.
    shown: std::collections::HashMap<(String, String), Vec<i64>>,
    sent: u64,
    /// (reader, sender) -> the highest id the reader sent a receipt for.
    reads_sent: std::collections::HashMap<(String, String), u64>,
    /// (told, by, from) -> receipt ids reported to user `told`, in order.
    reads_told: std::collections::HashMap<(String, String, String), Vec<u64>>,
}

impl Ledger {
    pub fn sent(&mut self, from: &str, cid: String, counter: i64) {
        self.counter_of.insert((from.to_string(), cid), counter);
        self.sent += 1;
    }

    /// An event of the client of user `me`.
    pub fn record(&mut self, me: &str, event: ringgate::client::Event) {
        use ringgate::client::Event;
        match event {
            Event::Message { from, body, .. } => self
                .shown
                .entry((from, me.to_string()))
                .or_default()
                .push(body["n"].as_i64().expect("a counter body")),
            Event::Read { by, from, id } => self
                .reads_told
                .entry((me.to_string(), by, from))
                .or_default()
                .push(id.parse().expect("a receipt id")),
            Event::Accepted { cid, .. } => {
                let n = self.counter_of[&(me.to_string(), cid)];
                let order = self.accepted.entry(me.to_string()).or_default();
                if !order.contains(&n) {
                    order.push(n); // an `accepted` repeated for a resent cid keeps its place
                }
            }
            _ => {}
        }
    }

    /// `reader` sent a read receipt for `sender`'s messages up to `id`.
    pub fn read_sent(&mut self, reader: &str, sender: &str, id: &str) {
        let n: u64 = id.parse().expect("a message id");
        let max = self
            .reads_sent
            .entry((reader.to_string(), sender.to_string()))
            .or_default();
        *max = (*max).max(n);
    }

    /// Every read receipt reached the sender and the reader's own client: each reported
    /// receipt only moves forward, and the last is the highest the reader sent (earlier ones
    /// were superseded or reported before it). Returns the receipts reported.
    pub fn check_reads(&self, seed: u64) -> u64 {
        let mut reported = 0;
        for ((reader, sender), max) in &self.reads_sent {
            for told in [sender, reader] {
                let key = (told.clone(), reader.clone(), sender.clone());
                let ids = self.reads_told.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                assert!(
                    ids.windows(2).all(|w| w[0] < w[1]),
                    "{told} told {reader}'s receipts for {sender} out of order (seed {seed}): {ids:?}"
                );
                assert_eq!(
                    ids.last(),
                    Some(max),
                    "{told} was not told {reader}'s last receipt for {sender} (seed {seed}): {ids:?}"
                );
                reported += ids.len() as u64;
            }
        }
        let invented = self
            .reads_told
            .keys()
            .find(|(_, by, from)| !self.reads_sent.contains_key(&(by.clone(), from.clone())));
        assert!(
            invented.is_none(),
            "a receipt nobody sent: {invented:?} (seed {seed})"
        );
        reported
    }

    /// Every sent message displayed exactly once, each (sender, recipient) in the order the
    /// sender was told `accepted`. Returns (displayed, accepted out of send order).
    pub fn check(&self, seed: u64) -> (u64, u64) {
        let mut displayed = 0;
        for ((from, to), bodies) in &self.shown {
            let order = self.accepted.get(from).map(Vec::as_slice).unwrap_or(&[]);
            let rank = |n: &i64| order.iter().position(|a| a == n);
            let ranks: Vec<Option<usize>> = bodies.iter().map(rank).collect();
            assert!(
                ranks.iter().all(Option::is_some),
                "{from} -> {to}: displayed a message its sender never saw accepted (seed {seed}): \
                 shown {bodies:?}, accepted {order:?}"
            );
            assert!(
                ranks.windows(2).all(|w| w[0] < w[1]),
                "{from} -> {to}: in the order accepted, no repeats (seed {seed}): shown {bodies:?}, \
                 the sender's accepted order {order:?}"
            );
            displayed += bodies.len() as u64;
        }
        assert_eq!(
            displayed, self.sent,
            "every sent message displayed once (seed {seed})"
        );
        let reordered = self
            .accepted
            .values()
            .map(|o| o.windows(2).filter(|w| w[0] > w[1]).count() as u64)
            .sum();
        (displayed, reordered)
    }
}

/// Read receipts end to end on one gateway (SPEC section 3, `read`), for users `alice` and
/// `bob` (home shards as the caller chose them): online both ways with two devices of bob,
/// the refusals, redundant receipts, and an offline sender who gets only the latest receipt.
pub fn receipts_scenario(gw: &Gateway, alice: &str, bob: &str, carol: &str) {
    let (mut a, _) = connect_replay(gw, &format!("/ws?user={alice}"));
    let (mut b1, _) = connect_replay(gw, &format!("/ws?user={bob}&device=one"));
    let (mut b2, _) = connect_replay(gw, &format!("/ws?user={bob}&device=two"));
    let mut ids = Vec::new();
    for n in 1..=3 {
        send(&mut a, bob, &format!("m{n}"), serde_json::json!({"n": n}));
        ids.push(
            next_op(&mut a, "accepted")["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for b in [&mut b1, &mut b2] {
        for id in &ids {
            let m = next_op(b, "msg");
            assert_eq!(&m["id"], id.as_str());
            ack(b, m["seq"].as_u64().unwrap());
        }
    }
    for _ in &ids {
        next_op(&mut a, "delivered");
    }
    // bob reads up to m2 on device one: alice and both of bob's devices are told.
    send_text(
        &mut b1,
        &serde_json::json!({"op":"read","from":alice,"id":ids[1]}).to_string(),
    );
    let told = next_op(&mut a, "read");
    assert_eq!(told["by"], bob, "{told}");
    assert_eq!(told["from"], alice, "{told}");
    assert_eq!(told["id"], ids[1].as_str(), "{told}");
    ack(&mut a, told["seq"].as_u64().unwrap());
    for b in [&mut b1, &mut b2] {
        let own = next_op(b, "read");
        assert_eq!(
            (&own["by"], &own["from"], &own["id"]),
            (&bob.into(), &alice.into(), &ids[1].as_str().into()),
            "{own}"
        );
        ack(b, own["seq"].as_u64().unwrap());
    }
    // At or below what was told: nothing. An id never sent to bob, a sender who never wrote
    // to him, a bad id: `bad_request`, and the connection stays.
    send_text(
        &mut b2,
        &serde_json::json!({"op":"read","from":alice,"id":ids[0]}).to_string(),
    );
    let beyond = (ids[2].parse::<u64>().unwrap() + 1).to_string();
    for (from, id) in [(alice, beyond.as_str()), (carol, ids[0].as_str())] {
        send_text(
            &mut b2,
            &serde_json::json!({"op":"read","from":from,"id":id}).to_string(),
        );
        let e = next_op(&mut b2, "error");
        assert_eq!(e["code"], "bad_request", "{e}");
        assert!(e.get("cid").is_none(), "{e}");
    }
    send_text(
        &mut b2,
        &serde_json::json!({"op":"read","from":alice,"id":"x"}).to_string(),
    );
    assert_eq!(next_op(&mut b2, "error")["code"], "bad_request");
    for ws in [&mut a, &mut b1, &mut b2] {
        assert!(frames_before_pong(ws).is_empty(), "nothing else");
    }
    assert_eq!(gw.metric_sum("ringgate_reads_total"), 1);
    assert_eq!(gw.metric_sum("ringgate_reads_redundant_total"), 1);
    assert_eq!(gw.metric_sum("ringgate_reads_refused_total"), 2);
    // alice goes offline; bob reads m3, then a later message: alice's inbox keeps only the
    // latest receipt (a later one supersedes, it does not queue behind).
    drop(a);
    let (mut a2, _) = connect_replay(gw, &format!("/ws?user={alice}&device=other"));
    send(&mut a2, bob, "m4", serde_json::json!({"n": 4}));
    let id4 = next_op(&mut a2, "accepted")["id"]
        .as_str()
        .unwrap()
        .to_string();
    drop(a2);
    for b in [&mut b1, &mut b2] {
        let m = next_op(b, "msg");
        ack(b, m["seq"].as_u64().unwrap());
    }
    assert!(eventually(Duration::from_secs(10), || gw
        .metric_sum("ringgate_connections_open")
        == 2));
    for id in [&ids[2], &id4] {
        send_text(
            &mut b1,
            &serde_json::json!({"op":"read","from":alice,"id":id}).to_string(),
        );
    }
    let _ = frames_before_pong(&mut b1);
    // The receipts are stored after the reads were served (with Redis, a write in flight): a
    // replay may come before the later one is stored, and then has the earlier one, the
    // later one following live. Once both are stored, a replay holds the latest alone (a
    // store that queued receipts instead of superseding would replay two, forever).
    let mut last = Vec::new();
    let superseded = eventually(Duration::from_secs(10), || {
        let (_a, replayed) = connect_replay(gw, &format!("/ws?user={alice}"));
        last = replayed.into_iter().filter(|f| f["op"] == "read").collect();
        last.len() == 1 && last[0]["id"] == id4.as_str()
    });
    assert!(
        superseded,
        "alice's replay keeps only the latest receipt: {last:?}"
    );
    assert_eq!(gw.metric_sum("ringgate_reads_total"), 3);
}

/// The big-inbox summary (issue 17): the gateway runs with `--inbox-summary-over 10`. Three
/// senders leave 8, 5 and 2 messages for `bob`; a plain connection gets the replay; one that
/// asks (`?summary=1`) gets a `summary` instead of the replay, pages the first sender with `fetch`, drops the connection with some fetched
/// messages unacked (they are still waiting), asks for the `replay` of the rest, and in the
/// end every message was shown once, each sender's in order, and nothing waits.
pub fn summary_scenario(gw: &Gateway, bob: &str, senders: [&str; 3]) {
    let counts = [8usize, 5, 2];
    let mut ids: Vec<Vec<String>> = Vec::new();
    for (s, n) in senders.iter().zip(counts) {
        let (mut ws, _) = connect_app(gw, s);
        let mut mine = Vec::new();
        for i in 0..n {
            send(&mut ws, bob, &format!("{s}-{i}"), serde_json::json!(i));
            mine.push(
                next_op(&mut ws, "accepted")["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        ids.push(mine);
    }
    // A client that does not ask for a summary gets the plain replay (SPEC section 2), whatever
    // the size of its inbox.
    let (plain, replayed) = connect_replay(gw, &format!("/ws?user={bob}"));
    assert_eq!(replayed.len(), 15);
    drop(plain);
    assert!(eventually(Duration::from_secs(10), || gw
        .metric_sum("ringgate_connections_open")
        == 0));
    let open = |expect_total: u64| {
        let mut ws = connect(gw, &format!("/ws?user={bob}&summary=1"));
        assert_eq!(recv_json(&mut ws)["op"], "welcome");
        let summary = next_op(&mut ws, "summary");
        assert_eq!(summary["total"], expect_total, "{summary}");
        (ws, summary)
    };
    let (mut b, summary) = open(15);
    // Newest first: the last sender wrote last.
    let rows = summary["senders"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{summary}");
    for (row, k) in rows.iter().zip([2, 1, 0]) {
        assert_eq!(row["from"], senders[k], "{summary}");
        assert_eq!(row["count"], counts[k] as u64, "{summary}");
        assert_eq!(row["oldest"]["id"], ids[k][0].as_str(), "{summary}");
        assert_eq!(
            row["newest"]["id"],
            ids[k][counts[k] - 1].as_str(),
            "{summary}"
        );
    }
    assert!(
        frames_before_pong(&mut b).is_empty(),
        "no replay before it is asked"
    );
    let fetch =
        |ws: &mut Ws, from: &str, limit: u32| -> (Vec<serde_json::Value>, serde_json::Value) {
            send_text(
                ws,
                &serde_json::json!({"op":"fetch","from":from,"limit":limit}).to_string(),
            );
            let mut msgs = Vec::new();
            loop {
                let v = recv_json(ws);
                if v["op"] == "fetched" {
                    return (msgs, v);
                }
                assert_eq!(v["op"], "msg", "{v}");
                msgs.push(v);
            }
        };
    let cids = |msgs: &[serde_json::Value]| -> Vec<String> {
        msgs.iter()
            .map(|m| m["cid"].as_str().unwrap().to_string())
            .collect()
    };
    let (first, done) = fetch(&mut b, senders[0], 3);
    assert_eq!(
        cids(&first),
        (0..3)
            .map(|i| format!("{}-{i}", senders[0]))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        (done["count"].as_u64(), done["more"].as_bool()),
        (Some(3), Some(true))
    );
    ack(&mut b, first[1]["seq"].as_u64().unwrap());
    let _ = frames_before_pong(&mut b);
    // Gone with two acked: the third fetched one still waits.
    drop(b);
    assert!(eventually(Duration::from_secs(10), || gw
        .metric_sum("ringgate_connections_open")
        == 0));
    let (mut b, _) = open(13);
    let (rest, done) = fetch(&mut b, senders[0], 100);
    assert_eq!(
        cids(&rest),
        (2..8)
            .map(|i| format!("{}-{i}", senders[0]))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        (done["count"].as_u64(), done["more"].as_bool()),
        (Some(6), Some(false))
    );
    // The replay brings the others (not the ones fetched and unacked), then `synced`.
    send_text(&mut b, r#"{"op":"replay"}"#);
    let mut replayed = Vec::new();
    let synced = loop {
        let v = recv_json(&mut b);
        if v["op"] == "synced" {
            break v;
        }
        assert_eq!(v["op"], "msg", "{v}");
        replayed.push(v);
    };
    let mut expect: Vec<String> = Vec::new();
    for k in [1, 2] {
        expect.extend((0..counts[k]).map(|i| format!("{}-{i}", senders[k])));
    }
    assert_eq!(cids(&replayed), expect);
    assert_eq!(synced["count"], 7);
    // `fetch` now is a bad request; everything acked leaves nothing waiting.
    send_text(
        &mut b,
        &serde_json::json!({"op":"fetch","from":senders[0],"limit":5}).to_string(),
    );
    assert_eq!(next_op(&mut b, "error")["code"], "bad_request");
    ack(&mut b, replayed.last().unwrap()["seq"].as_u64().unwrap());
    let _ = frames_before_pong(&mut b);
    drop(b);
    assert!(eventually(Duration::from_secs(10), || gw
        .metric_sum("ringgate_connections_open")
        == 0));
    let (_b, again) = connect_replay(gw, &format!("/ws?user={bob}"));
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(gw.metric_sum("ringgate_inbox_summaries_total"), 2);
}
