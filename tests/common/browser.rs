//! A small Chrome DevTools Protocol driver for tests: the system headless Chromium, one
//! DevTools WebSocket (tungstenite + serde_json), several pages (targets) on it.
//!
//! `Browser` owns the process and its temp profile. One reader thread owns the DevTools
//! socket: it writes the commands handed to it and reads everything, giving each answer to the
//! command waiting for it and filing events per page (console messages and exceptions for
//! failure messages, load events for navigation waits). So pages may be driven from several
//! threads at once, and a slow `eval` in one page does not hold up another.
//! No Chromium is a loud failure naming the fix, never a skip.
//!
//! ```ignore
//! let browser = Browser::launch();                        // killed, profile removed on drop
//! let a = browser.new_page(&format!("http://{addr}/ops")); // returns once loaded
//! let b = browser.new_page("data:text/html,<p>two</p>");  // pages share the one browser
//! assert_eq!(a.eval("1 + 1")?, 2);                        // promises awaited; throw = Err(text)
//! a.wait_for("window.ready === true", Duration::from_secs(30))?; // Err shows the console
//! a.reload();
//! a.screenshot("target/a.png");
//! eprintln!("{}", a.console().join("\n"));
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where Debian's `chromium` package puts the binary; `RINGGATE_CHROMIUM` overrides.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Start-up and navigation bounds: generous, a loaded 2-core machine is slow.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Console lines kept per page (the newest).
const CONSOLE_KEEP: usize = 200;
/// How long the reader thread waits on the socket before looking for commands to write.
const WRITE_LATENCY: Duration = Duration::from_millis(5);

pub struct Browser {
    child: Child,
    profile: PathBuf,
    cdp: Arc<Cdp>,
    /// Chromium's stderr (for failure messages), filled by a reader thread.
    stderr: Arc<Mutex<Vec<String>>>,
}

pub struct Page {
    cdp: Arc<Cdp>,
    target: String,
    session: String,
}

/// The handle on the DevTools connection: commands go to the reader thread, answers and
/// events come back through `Seen`.
struct Cdp {
    out: mpsc::Sender<String>,
    next_id: AtomicU64,
    seen: Arc<Mutex<Seen>>,
}

/// What the reader thread hands out: answers to the commands waiting, and per page session
/// its console lines and load count.
#[derive(Default)]
struct Seen {
    waiting: HashMap<u64, mpsc::Sender<Result<Value, String>>>,
    console: HashMap<String, Vec<String>>,
    loads: HashMap<String, u64>,
    /// Why the socket is gone, once it is.
    dead: Option<String>,
}

impl Browser {
    /// Start headless Chromium with a fresh profile and connect to its DevTools socket.
    pub fn launch() -> Browser {
        let exe = std::env::var("RINGGATE_CHROMIUM").unwrap_or_else(|_| CHROMIUM.into());
        assert!(
            Path::new(&exe).exists(),
            "FATAL: headless Chromium not found at {exe}: install it with `apt-get install chromium` \
             (tests/run.sh does), or point RINGGATE_CHROMIUM at a Chromium binary"
        );
        let profile = std::env::temp_dir().join(format!(
            "ringgate-chromium-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&profile).expect("create the Chromium profile directory");
        let mut child = Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                // Several pages run at once, none in the foreground: no timer throttling
                // or renderer backgrounding (puppeteer's defaults too).
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("FATAL: cannot start {exe}: {e} (apt-get install chromium)")
            });
        // Read stderr to its end (a full pipe would stall Chromium); the first DevTools line
        // goes to the launcher.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (url_tx, url_rx) = mpsc::channel();
        {
            let pipe = child.stderr.take().unwrap();
            let lines = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(at) = line.find("DevTools listening on ") {
                        let _ = url_tx.send(
                            line[at + "DevTools listening on ".len()..]
                                .trim()
                                .to_string(),
                        );
                    }
                    let mut l = lines.lock().unwrap();
                    if l.len() < 500 {
                        l.push(line);
                    }
                }
            });
        }
        let url = match url_rx.recv_timeout(LAUNCH_TIMEOUT) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&profile);
                panic!(
                    "Chromium printed no DevTools URL within {LAUNCH_TIMEOUT:?}; stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
        };
        let ws = connect_ws(&url);
        let (out, commands) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Seen::default()));
        {
            let seen = seen.clone();
            std::thread::spawn(move || read_loop(ws, commands, seen));
        }
        Browser {
            child,
            profile,
            cdp: Arc::new(Cdp {
                out,
                next_id: AtomicU64::new(0),
                seen,
            }),
            stderr,
        }
    }

    /// A new tab showing `url` (loaded: its `load` event fired).
    pub fn new_page(&self, url: &str) -> Page {
        let cdp = &self.cdp;
        let target = cdp
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .unwrap_or_else(|e| panic!("Target.createTarget: {e}"))["targetId"]
            .as_str()
            .expect("targetId")
            .to_string();
        let session = cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .unwrap_or_else(|e| panic!("Target.attachToTarget: {e}"))["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            cdp.call(Some(&session), domain, json!({}))
                .unwrap_or_else(|e| panic!("{domain}: {e}"));
        }
        let page = Page {
            cdp: self.cdp.clone(),
            target,
            session,
        };
        page.goto(url);
        page
    }

    /// Chromium's stderr so far (for failure messages).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Asked to close, Chromium ends its helper processes too (killed, they may still
        // write into the profile while it is removed); killed after a bounded wait.
        let _ = self
            .cdp
            .out
            .send(json!({"id": 0, "method": "Browser.close"}).to_string());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..50 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn connect_ws(url: &str) -> tungstenite::WebSocket<TcpStream> {
    let addr = url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("unexpected DevTools URL {url}"));
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_nodelay(true).ok();
    match tungstenite::client(url, stream) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("DevTools WebSocket handshake with {url}: {e:?}"),
    }
}

impl Cdp {
    /// Send one command and wait for its answer (the reader thread hands it over).
    fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let (tx, rx) = mpsc::channel();
        {
            let mut seen = self.seen.lock().unwrap();
            if let Some(why) = &seen.dead {
                return Err(format!("{method}: the DevTools socket is gone: {why}"));
            }
            seen.waiting.insert(id, tx);
        }
        let sent = self.out.send(msg.to_string());
        if sent.is_err() {
            self.seen.lock().unwrap().waiting.remove(&id);
            return Err(format!("{method}: the DevTools reader has stopped"));
        }
        match rx.recv_timeout(COMMAND_TIMEOUT) {
            Ok(answer) => answer.map_err(|e| format!("{method}: {e}")),
            Err(_) => {
                self.seen.lock().unwrap().waiting.remove(&id);
                Err(format!("no answer to {method} within {COMMAND_TIMEOUT:?}"))
            }
        }
    }
}

/// The reader thread: the one owner of the socket. Writes what `commands` brings, reads
/// everything, until the socket fails (Chromium was killed) or every handle is gone.
fn read_loop(
    mut ws: tungstenite::WebSocket<TcpStream>,
    commands: mpsc::Receiver<String>,
    seen: Arc<Mutex<Seen>>,
) {
    let _ = ws.get_ref().set_read_timeout(Some(WRITE_LATENCY));
    let why = loop {
        // Write every command waiting, then read for at most WRITE_LATENCY.
        let stop = loop {
            match commands.try_recv() {
                Ok(text) => {
                    if let Err(e) = ws.send(tungstenite::Message::text(text)) {
                        break Some(format!("write: {e}"));
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break None,
                Err(mpsc::TryRecvError::Disconnected) => {
                    break Some("the browser handle was dropped".to_string())
                }
            }
        };
        if let Some(why) = stop {
            break why;
        }
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => match serde_json::from_str::<Value>(&t) {
                Ok(v) => seen.lock().unwrap().take(&v),
                Err(e) => break format!("not JSON from DevTools: {e}"),
            },
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => break e.to_string(),
        }
    };
    let mut seen = seen.lock().unwrap();
    for (_, waiter) in seen.waiting.drain() {
        let _ = waiter.send(Err(format!("the DevTools socket is gone: {why}")));
    }
    seen.dead = Some(why);
}

impl Seen {
    /// An answer to its waiter; an event filed under its page.
    fn take(&mut self, v: &Value) {
        if let Some(id) = v["id"].as_u64() {
            if let Some(waiter) = self.waiting.remove(&id) {
                let _ = waiter.send(match v.get("error") {
                    Some(e) => Err(e.to_string()),
                    None => Ok(v["result"].clone()),
                });
            }
            return;
        }
        self.file_event(v);
    }

    fn file_event(&mut self, v: &Value) {
        let Some(session) = v["sessionId"].as_str() else {
            return;
        };
        let p = &v["params"];
        let line = match v["method"].as_str() {
            Some("Page.loadEventFired") => {
                *self.loads.entry(session.to_string()).or_default() += 1;
                None
            }
            Some("Runtime.consoleAPICalled") => {
                let args: Vec<String> = p["args"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| match &x["value"] {
                                Value::String(s) => s.clone(),
                                Value::Null => x["description"].as_str().unwrap_or("").to_string(),
                                other => other.to_string(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(format!(
                    "console.{}: {}",
                    p["type"].as_str().unwrap_or("?"),
                    args.join(" ")
                ))
            }
            Some("Runtime.exceptionThrown") => Some(format!(
                "exception: {}",
                exception_text(&p["exceptionDetails"])
            )),
            Some("Log.entryAdded") => Some(format!(
                "log.{}: {} {}",
                p["entry"]["level"].as_str().unwrap_or("?"),
                p["entry"]["text"].as_str().unwrap_or(""),
                p["entry"]["url"].as_str().unwrap_or("")
            )),
            _ => None,
        };
        if let Some(line) = line {
            let log = self.console.entry(session.to_string()).or_default();
            if log.len() == CONSOLE_KEEP {
                log.remove(0);
            }
            log.push(line);
        }
    }
}

fn exception_text(details: &Value) -> String {
    details["exception"]["description"]
        .as_str()
        .or_else(|| details["exception"]["value"].as_str())
        .or_else(|| details["text"].as_str())
        .unwrap_or("unknown exception")
        .to_string()
}

impl Page {
    fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        self.cdp.call(Some(&self.session), method, params)
    }

    fn loads(&self) -> u64 {
        let seen = self.cdp.seen.lock().unwrap();
        seen.loads.get(&self.session).copied().unwrap_or(0)
    }

    /// Wait until the page's load count passes `before` (bounded).
    fn wait_load(&self, before: u64, what: &str) {
        let deadline = Instant::now() + LOAD_TIMEOUT;
        while self.loads() <= before {
            assert!(
                Instant::now() < deadline,
                "{what}: no load event within {LOAD_TIMEOUT:?}; console:\n{}",
                self.console().join("\n")
            );
            if let Some(why) = &self.cdp.seen.lock().unwrap().dead {
                panic!("{what}: the DevTools socket is gone: {why}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Navigate to `url` and wait for its load event.
    pub fn goto(&self, url: &str) {
        let before = self.loads();
        let r = self
            .call("Page.navigate", json!({"url": url}))
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
        if let Some(err) = r["errorText"].as_str() {
            panic!("navigate to {url}: {err}");
        }
        self.wait_load(before, &format!("navigate to {url}"));
    }

    /// Reload and wait for the load event.
    pub fn reload(&self) {
        let before = self.loads();
        self.call("Page.reload", json!({}))
            .unwrap_or_else(|e| panic!("reload: {e}"));
        self.wait_load(before, "reload");
    }

    /// Evaluate `js` (an expression; a promise is awaited) and return its value as JSON
    /// (undefined: null). A thrown exception is an error with its text.
    pub fn eval(&self, js: &str) -> Result<Value, String> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "awaitPromise": true, "returnByValue": true}),
        )?;
        if let Some(details) = r.get("exceptionDetails") {
            return Err(exception_text(details));
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Poll `js_condition` every 100 ms until it is truthy; after `timeout`, an error with the
    /// last value or exception and the page's console.
    pub fn wait_for(&self, js_condition: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.eval(js_condition) {
                Ok(v) if truthy(&v) => return Ok(()),
                Ok(v) => format!("last value {v}"),
                Err(e) => format!("last exception {e}"),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "`{js_condition}` not true within {timeout:?} ({last}); console:\n{}",
                    self.console().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Save a PNG of the page: the window's width, the content's height.
    pub fn screenshot(&self, path: impl AsRef<Path>) {
        let size = self
            .eval("[window.innerWidth, Math.ceil(Math.max(document.body.getBoundingClientRect().bottom, 1))]")
            .unwrap_or_else(|e| panic!("page size: {e}"));
        let clip = json!({"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1});
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "clip": clip, "captureBeyondViewport": true}),
            )
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        let png = base64_decode(r["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        if let Some(dir) = path.as_ref().parent() {
            std::fs::create_dir_all(dir).ok();
        }
        std::fs::write(path.as_ref(), png)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.as_ref().display()));
    }

    /// Console messages, exceptions and log entries of this page so far (newest last).
    pub fn console(&self) -> Vec<String> {
        let seen = self.cdp.seen.lock().unwrap();
        seen.console.get(&self.session).cloned().unwrap_or_default()
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        let _ = self
            .cdp
            .call(None, "Target.closeTarget", json!({"targetId": self.target}));
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// Standard base64 (the screenshot's PNG); no crate for twenty lines.
fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            other => panic!("not base64: {:?}", other as char),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
