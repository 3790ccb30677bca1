//! A Rust client for ringgate's protocol (blocking, over tungstenite), written the way the
//! SPEC asks clients to behave, so tests, tools and applications get exactly-once display:
//! - every `msg` is acked (cumulative `ack`) and displayed at most once, deduplicated by
//!   `(from, cid)` (bounded memory: the last [`SEEN_CAPACITY`] pairs);
//! - every `send` is kept until its `accepted` arrives and is resent with the same `cid` after a
//!   reconnect (the server deduplicates), in send order, marked `"resend":true`;
//! - a lost connection is re-established with exponential backoff and jitter;
//! - a send refused for now (`error` `unavailable` or `rate_limited` with its cid) is resent
//!   with the same cid after a backoff with jitter (it may then land after newer sends that
//!   were accepted meanwhile: order is the order of acceptance);
//! - an `accepted` is told once no send to the same recipient that may have been stored
//!   before it is still without an answer, in id order: the order the recipient sees, also
//!   when answers were lost with a connection or a refused send had been stored by another
//!   attempt (see [`order`]).
//!
//! ```no_run
//! use ringgate::client::{Client, ClientConfig, Event};
//! let mut alice = Client::connect(ClientConfig::dev("ws://127.0.0.1:8080/ws", "alice")).unwrap();
//! let cid = alice.send("bob", serde_json::json!({"text": "hi"})).unwrap();
//! while let Some(event) = alice.poll(std::time::Duration::from_secs(1)).unwrap() {
//!     if let Event::Accepted { cid: c, .. } = &event { if *c == cid { break; } }
//! }
//! ```

pub(crate) mod order;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{client::IntoClientRequest, Message, WebSocket};

/// `(from, cid)` pairs remembered for display dedup.
pub const SEEN_CAPACITY: usize = 100_000;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://host:port/ws`
    pub url: String,
    /// A JWT (`?token=`); None in dev mode.
    pub token: Option<String>,
    /// Dev-mode user (`?user=`), used when there is no token.
    pub user: Option<String>,
    pub device: Option<String>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Give up reconnecting after this long without success.
    pub reconnect_for: Duration,
    /// Without a connection, how long after the last transmission of the send it waits for
    /// an `accepted` is still held back to be told in store order (see [`order`]).
    pub hold_max: Duration,
}

impl ClientConfig {
    /// Dev mode (gateway without `jwt_secret`, on loopback): connect as `user`.
    pub fn dev(url: &str, user: &str) -> Self {
        ClientConfig {
            url: url.into(),
            token: None,
            user: Some(user.into()),
            device: None,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            reconnect_for: Duration::from_secs(30),
            hold_max: Duration::from_secs(10),
        }
    }

    pub fn with_token(url: &str, token: &str) -> Self {
        ClientConfig {
            token: Some(token.into()),
            user: None,
            ..Self::dev(url, "")
        }
    }

    fn request_url(&self) -> String {
        let mut params = Vec::new();
        if let Some(t) = &self.token {
            params.push(format!("token={t}"));
        } else if let Some(u) = &self.user {
            params.push(format!("user={u}"));
        }
        if let Some(d) = &self.device {
            params.push(format!("device={d}"));
        }
        if params.is_empty() {
            self.url.clone()
        } else {
            format!("{}?{}", self.url, params.join("&"))
        }
    }
}

/// What the application sees.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Welcome {
        user: String,
        conn: String,
    },
    /// A message to display (already acked; never the same `(from, cid)` twice).
    Message {
        from: String,
        cid: Value,
        id: String,
        ts: u64,
        body: Value,
        /// The backend's `type` (e.g. `system`); None for a user's message.
        msg_type: Option<String>,
    },
    Synced {
        count: u64,
    },
    Accepted {
        cid: String,
        id: String,
    },
    Delivered {
        cid: String,
        id: String,
        to: String,
    },
    Error {
        code: String,
        message: String,
        cid: Option<Value>,
    },
    /// `from` is typing to this user (ephemeral: never replayed).
    Typing {
        from: String,
    },
    /// More messages were waiting at connect than the gateway replays at once: per sender,
    /// how many, the oldest and the newest (`senders` as the frame has them). Nothing is
    /// replayed until `replay()`; `fetch(from, limit)` pages one sender meanwhile.
    Summary {
        total: u64,
        senders: Value,
    },
    /// The end of a `fetch`: `count` messages of `from` came (as `Event::Message`), `more`
    /// says there may be more.
    Fetched {
        from: String,
        count: u64,
        more: bool,
    },
    /// Presence of some users: the answer to `presence` or `watch`, or a watched user's
    /// change (online at once; offline once it stayed so for the gateway's grace period).
    Presence {
        online: BTreeMap<String, bool>,
    },
    /// `by` has read every message of `from` up to `id` (already acked). `from` is this user
    /// for a receipt of its correspondent, `by` is this user for one of its own other devices
    /// (or this one). Each (by, from) only moves forward: a receipt at or below one already
    /// reported is not reported again.
    Read {
        by: String,
        from: String,
        id: String,
    },
    /// The connection was lost and re-established; unaccepted sends were resent.
    Reconnected {
        resent: usize,
    },
    /// A frame this client could not read (not JSON it can parse, e.g. a body beyond what
    /// serde_json takes). A `msg` among them is acked all the same (`seq`), so that one bad
    /// message never stalls the inbox (SPEC section 3); the caller decides what to show.
    Unreadable {
        seq: Option<u64>,
        reason: String,
        /// The frame's first 200 bytes, for the log.
        start: String,
    },
}

/// The `seq` of a `msg` frame that does not parse as a whole: the gateway writes
/// `{"op":"msg","seq":N,...}`, so the head is readable even when the body is not.
fn seq_of_unreadable_msg(text: &str) -> Option<u64> {
    let rest = text.strip_prefix(r#"{"op":"msg","seq":"#)?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("gave up reconnecting after {0:?}")]
    GaveUp(Duration),
}

struct Pending {
    to: String,
    body: Value,
    /// Written to a connection before: sent again with `"resend":true` (another attempt of
    /// it may be stored, so the gateway never shows it live past the store).
    transmitted: bool,
}

pub struct Client {
    cfg: ClientConfig,
    ws: Option<WebSocket<TcpStream>>,
    cid_prefix: String,
    next_cid: u64,
    /// Sent, not yet accepted; resent in cid order after a reconnect.
    unaccepted: BTreeMap<u64, Pending>,
    /// Sends refused for now, resent at `retry_at`; `retry_backoff` doubles per refusal.
    refused: std::collections::BTreeSet<u64>,
    retry_at: Option<Instant>,
    retry_backoff: Duration,
    seen: HashSet<(String, String)>,
    seen_order: VecDeque<(String, String)>,
    /// Highest receipt id reported per (by, from).
    reads_seen: HashMap<(String, String), u64>,
    /// Users watched (`watch`), watched again after a reconnect.
    watching: HashSet<String>,
    /// The latest read receipt sent per sender, sent again after a reconnect.
    reads_sent: HashMap<String, u64>,
    rng: u64,
    /// Since when no connection is up (None: connected): holds run out from then (see
    /// [`order`]).
    lost_at: Option<Instant>,
    /// `accepted` answers held back until they can be told in store order.
    order: order::AcceptedOrder,
    /// Events decided but not returned yet (`poll` returns one at a time).
    ready: VecDeque<Event>,
}

impl Client {
    pub fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let hold_max = cfg.hold_max;
        let mut client = Client {
            cfg,
            ws: None,
            // cids must be unique per sender across restarts of this program too.
            cid_prefix: format!("{:x}", seed),
            next_cid: 0,
            unaccepted: BTreeMap::new(),
            refused: Default::default(),
            retry_at: None,
            retry_backoff: Duration::ZERO,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            reads_seen: HashMap::new(),
            watching: HashSet::new(),
            reads_sent: HashMap::new(),
            rng: seed,
            order: order::AcceptedOrder::new(hold_max),
            lost_at: None,
            ready: VecDeque::new(),
        };
        client.open().map_err(ClientError::Connect)?;
        Ok(client)
    }

    fn open(&mut self) -> Result<(), String> {
        let req = self
            .cfg
            .request_url()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let host = req.uri().host().unwrap_or("127.0.0.1").to_string();
        let port = req.uri().port_u16().unwrap_or(80);
        let stream = TcpStream::connect((host.as_str(), port)).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).ok();
        let (ws, _) = tungstenite::client(req, stream).map_err(|e| e.to_string())?;
        self.ws = Some(ws);
        Ok(())
    }

    /// Send a message; returns its cid. Kept until accepted, resent after reconnects.
    pub fn send(&mut self, to: &str, body: Value) -> Result<String, ClientError> {
        self.next_cid += 1;
        let n = self.next_cid;
        self.unaccepted.insert(
            n,
            Pending {
                to: to.into(),
                body,
                transmitted: false,
            },
        );
        self.transmit(n);
        Ok(self.cid(n))
    }

    /// Tell `from` (and this user's other devices) that every message of `from` up to `id`
    /// has been read. The latest receipt per sender is sent again after every reconnect (the
    /// gateway drops one it already has), so a receipt lost with a connection is not lost.
    /// The gateway answers only a refusal (`error`, no cid): `bad_request` when no such
    /// message reached this user, `unavailable` when the store could not take the receipt.
    pub fn read(&mut self, from: &str, id: &str) {
        let Ok(n) = id.parse::<u64>() else {
            return self.send_frame(json!({"op":"read","from":from,"id":id}));
        };
        let latest = self.reads_sent.entry(from.to_string()).or_insert(0);
        *latest = (*latest).max(n);
        if self.reads_sent.len() > SEEN_CAPACITY {
            self.reads_sent.clear(); // bounded: only the resend after a reconnect is lost
        }
        self.send_frame(json!({"op":"read","from":from,"id":id}));
    }

    /// After `Event::Summary`: the next `limit` (1 to 1,000) waiting messages of `from`.
    pub fn fetch(&mut self, from: &str, limit: u32) {
        self.send_frame(json!({"op":"fetch","from":from,"limit":limit}));
    }

    /// After `Event::Summary`: replay the whole inbox (then `Event::Synced`).
    pub fn replay(&mut self) {
        self.send_frame(json!({"op":"replay"}));
    }

    /// Ask which of `users` (at most 100) are online: answered with `Event::Presence`.
    pub fn presence(&mut self, users: &[&str]) {
        self.send_frame(json!({"op":"presence","users":users}));
    }

    /// Be told (`Event::Presence`) whenever one of `users` comes online or goes offline;
    /// answered at once with their current state. At most 100 per connection; watched again
    /// after a reconnect (answered again then).
    pub fn watch(&mut self, users: &[&str]) {
        self.watching.extend(users.iter().map(|u| u.to_string()));
        self.send_frame(json!({"op":"watch","users":users}));
    }

    pub fn unwatch(&mut self, users: &[&str]) {
        for u in users {
            self.watching.remove(*u);
        }
        self.send_frame(json!({"op":"unwatch","users":users}));
    }

    fn send_frame(&mut self, frame: Value) {
        if let Some(ws) = self.ws.as_mut() {
            if ws.send(Message::text(frame.to_string())).is_err() {
                self.ws = None;
            }
        }
    }

    /// Tell `to`'s online devices this user is typing. Ephemeral: not kept or resent when
    /// the connection is down (a `rate_limited` answer comes as an `Event::Error`).
    pub fn typing(&mut self, to: &str) {
        self.send_frame(json!({"op":"typing","to":to}));
    }

    fn cid(&self, n: u64) -> String {
        format!("{}-{n}", self.cid_prefix)
    }

    fn transmit(&mut self, n: u64) {
        let cid = self.cid(n);
        let Some(p) = self.unaccepted.get_mut(&n) else {
            return;
        };
        let mut frame = json!({"op":"send","to":p.to,"cid":cid,"body":p.body});
        if p.transmitted {
            frame["resend"] = Value::Bool(true);
        }
        p.transmitted = true;
        let frame = frame.to_string();
        self.order.transmitted(n, &p.to, Instant::now());
        if let Some(ws) = self.ws.as_mut() {
            if ws.send(Message::text(frame)).is_err() {
                self.ws = None; // resent after the reconnect
            }
        }
    }

    /// Sends still waiting for `accepted`.
    pub fn pending(&self) -> usize {
        self.unaccepted.len()
    }

    /// Simulate a network failure (tests): drop the socket without a close frame.
    pub fn drop_connection(&mut self) {
        self.ws = None;
    }

    /// Move to another gateway node (failover, or a load balancer's choice): the connection
    /// is dropped and the next poll connects to `url`, resending what was not accepted and
    /// keeping the display dedup, so nothing is lost or shown twice across the move.
    pub fn switch_url(&mut self, url: &str) {
        self.cfg.url = url.into();
        self.ws = None;
    }

    /// Wait up to `timeout` for the next event. Acks messages, drops duplicates, reconnects
    /// (with backoff and jitter) and resends unaccepted messages when the connection is lost.
    pub fn poll(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if self.ws.is_some() {
                self.lost_at = None;
            } else {
                self.lost_at.get_or_insert(now);
            }
            let released = self.order.expired(now, self.lost_at);
            self.ready.extend(released);
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            if self.ws.is_none() {
                let resent = self.reconnect()?;
                return Ok(Some(Event::Reconnected { resent }));
            }
            if self.retry_at.is_some_and(|at| Instant::now() >= at) {
                self.retry_at = None;
                for n in std::mem::take(&mut self.refused) {
                    self.transmit(n);
                }
            }
            let mut left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if let Some(at) = self.retry_at {
                left = left.min(at.saturating_duration_since(Instant::now()));
            }
            let ws = self.ws.as_mut().expect("connected");
            ws.get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok();
            match ws.read() {
                Ok(Message::Text(text)) => {
                    if let Some(event) = self.on_text(&text) {
                        return Ok(Some(event));
                    }
                }
                Ok(Message::Close(_)) => self.ws = None,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            // A signal during the read: the connection is fine.
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    let _ = self.ws.as_mut().map(|ws| ws.flush());
                }
                Err(_) => self.ws = None,
            }
        }
    }

    /// Ack every `msg` up to `seq` (acks are cumulative).
    fn ack(&mut self, seq: u64) {
        if let Some(ws) = self.ws.as_mut() {
            let _ = ws.send(Message::text(json!({"op":"ack","seq":seq}).to_string()));
        }
    }

    fn on_text(&mut self, text: &str) -> Option<Event> {
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let seq = seq_of_unreadable_msg(text);
                if let Some(seq) = seq {
                    self.ack(seq);
                }
                let cut = (0..=text.len().min(200))
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                return Some(Event::Unreadable {
                    seq,
                    reason: e.to_string(),
                    start: text[..cut].to_string(),
                });
            }
        };
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        match v["op"].as_str()? {
            "welcome" => Some(Event::Welcome {
                user: s("user"),
                conn: s("conn"),
            }),
            "synced" => Some(Event::Synced {
                count: v["count"].as_u64().unwrap_or(0),
            }),
            "msg" => {
                self.ack(v["seq"].as_u64().unwrap_or(0));
                let key = (s("from"), v["cid"].to_string());
                if !self.seen.insert(key.clone()) {
                    return None; // already displayed: a retransmit or a replay
                }
                self.seen_order.push_back(key);
                if self.seen_order.len() > SEEN_CAPACITY {
                    if let Some(old) = self.seen_order.pop_front() {
                        self.seen.remove(&old);
                    }
                }
                Some(Event::Message {
                    from: s("from"),
                    cid: v["cid"].clone(),
                    id: s("id"),
                    ts: v["ts"].as_u64().unwrap_or(0),
                    body: v["body"].clone(),
                    msg_type: v["type"].as_str().map(str::to_string),
                })
            }
            "accepted" => {
                let cid = s("cid");
                let event = Event::Accepted {
                    cid: cid.clone(),
                    id: s("id"),
                };
                let Some((n, sent)) = self
                    .own_cid(&cid)
                    .and_then(|n| Some((n, self.unaccepted.remove(&n)?)))
                else {
                    return Some(event); // a second answer to a resend, or not ours
                };
                self.refused.remove(&n);
                self.retry_backoff = Duration::ZERO;
                let told = self.order.accepted(n, &sent.to, event);
                self.ready.extend(told);
                self.ready.pop_front()
            }
            "typing" => Some(Event::Typing { from: s("from") }),
            "summary" => Some(Event::Summary {
                total: v["total"].as_u64().unwrap_or(0),
                senders: v["senders"].clone(),
            }),
            "fetched" => Some(Event::Fetched {
                from: s("from"),
                count: v["count"].as_u64().unwrap_or(0),
                more: v["more"].as_bool().unwrap_or(false),
            }),
            "presence" => Some(Event::Presence {
                online: v["online"]
                    .as_object()?
                    .iter()
                    .map(|(u, on)| (u.clone(), on.as_bool().unwrap_or(false)))
                    .collect(),
            }),
            "read" => {
                self.ack(v["seq"].as_u64().unwrap_or(0));
                let id: u64 = s("id").parse().ok()?;
                let told = self.reads_seen.entry((s("by"), s("from"))).or_insert(0);
                if id <= *told {
                    return None; // a retransmit, a replay, or superseded already
                }
                *told = id;
                if self.reads_seen.len() > SEEN_CAPACITY {
                    self.reads_seen.clear();
                }
                Some(Event::Read {
                    by: s("by"),
                    from: s("from"),
                    id: id.to_string(),
                })
            }
            "delivered" => {
                let event = Event::Delivered {
                    cid: s("cid"),
                    id: s("id"),
                    to: s("to"),
                };
                self.order.delivered(&s("cid"), event)
            }
            "error" => {
                let cid = v.get("cid").cloned();
                let code = s("code");
                let refused_now = code == "unavailable" || code == "rate_limited";
                if let Some(n) = self.own_cid(&s("cid")).filter(|_| refused_now) {
                    if self.unaccepted.contains_key(&n) {
                        let told = Duration::from_millis(v["retry_ms"].as_u64().unwrap_or(0));
                        self.refuse(n, told);
                    }
                }
                Some(Event::Error {
                    code: s("code"),
                    message: s("message"),
                    cid,
                })
            }
            _ => None,
        }
    }

    /// Resend `n` later: after a backoff that doubles per refusal (from `backoff_min` up to
    /// `backoff_max`, +-50% jitter), reset by the next `accepted`, and never before the
    /// `retry_ms` the gateway asked for (`told`, with `rate_limited`).
    fn refuse(&mut self, n: u64, told: Duration) {
        self.refused.insert(n);
        let earliest = Instant::now() + told;
        let at = match self.retry_at {
            Some(at) => at,
            None => {
                self.retry_backoff = (self.retry_backoff * 2)
                    .max(self.cfg.backoff_min)
                    .min(self.cfg.backoff_max);
                let jitter = 0.5 + self.jitter_fraction();
                Instant::now() + self.retry_backoff.mul_f64(jitter)
            }
        };
        self.retry_at = Some(at.max(earliest));
    }

    fn own_cid(&self, cid: &str) -> Option<u64> {
        cid.strip_prefix(&self.cid_prefix)?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    /// In [0, 1): the jitter of a backoff.
    fn jitter_fraction(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1000) as f64 / 1000.0
    }

    /// Reconnect with exponential backoff and +-50% jitter, then resend what was not accepted.
    fn reconnect(&mut self) -> Result<usize, ClientError> {
        let started = Instant::now();
        let mut backoff = self.cfg.backoff_min;
        loop {
            if self.open().is_ok() {
                self.refused.clear();
                self.retry_at = None;
                let pending: Vec<u64> = self.unaccepted.keys().copied().collect();
                for n in &pending {
                    self.transmit(*n);
                }

                let reads: Vec<(String, u64)> = self
                    .reads_sent
                    .iter()
                    .map(|(f, n)| (f.clone(), *n))
                    .collect();
                for (from, n) in reads {
                    self.send_frame(json!({"op":"read","from":from,"id":n.to_string()}));
                }
                if !self.watching.is_empty() {
                    let users: Vec<String> = self.watching.iter().cloned().collect();
                    self.send_frame(json!({"op":"watch","users":users}));
                }
                return Ok(pending.len());
            }
            if started.elapsed() > self.cfg.reconnect_for {
                return Err(ClientError::GaveUp(self.cfg.reconnect_for));
            }
            let jitter = 0.5 + self.jitter_fraction();
            std::thread::sleep(backoff.mul_f64(jitter));
            backoff = (backoff * 2).min(self.cfg.backoff_max);
        }
    }
}
