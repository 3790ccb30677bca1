//! The application protocol (SPEC section 3): JSON objects in text frames.
//!
//! Client frames are parsed into [`ClientFrame`]; every way a frame can be wrong maps to one of
//! the SPEC's error codes in [`ErrorCode`]. Server frames are written straight into the
//! connection's outbound bytes by the `write_*` functions (no intermediate `Value`).

use serde::Deserialize;
use serde_json::value::RawValue;

/// Protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Error codes of SPEC section 3, the only place they are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    UnknownOp,
    Forbidden,
    RateLimited,
    TooLarge,
    Unavailable,
    /// Only in-band refusals of `?auth=frame` connections (the others get HTTP 401).
    Unauthorized,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }
}

/// A client frame that cannot be served; answered with `error` and the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// The frame's `cid`, raw JSON, when it had one (echoed so the client can match).
    pub cid: Option<Box<str>>,
}

/// A validated 1:1 `send`. `cid` and `body` are kept as the client's raw JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    pub to: compact_str::CompactString,
    pub cid: compact_str::CompactString,
    /// Shared from here on by every copy of the message (see `Message::body`).
    pub body: std::sync::Arc<str>,
    /// `"resend": true`: the client sent this cid before (another attempt of it, on an
    /// earlier connection or node, may be in the store already).
    pub resend: bool,
}

/// Ops the server understands today.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Ping,
    Send(SendRequest),
    /// Cumulative ack of `msg` frames on this connection.
    Ack {
        seq: u64,
    },
    /// Which of `users` have a connection (answered with `presence`).
    Presence {
        users: Vec<compact_str::CompactString>,
    },
    /// Become a member of `room`; with `since`, first replay what came after that offset.
    Join {
        room: compact_str::CompactString,
        since: Option<u64>,
    },
    Leave {
        room: compact_str::CompactString,
    },
    /// `cid` and `body` kept as the client's raw JSON text.
    Publish {
        room: compact_str::CompactString,
        cid: Box<str>,
        body: Box<str>,
    },
    /// Tell `to`'s online devices that this user is typing (ephemeral).
    Typing {
        to: compact_str::CompactString,
    },
    /// Tell this connection when any of `users` comes online or goes offline (answered
    /// with `presence` for them now, then a `presence` per change).
    Watch {
        users: Vec<compact_str::CompactString>,
    },
    /// Stop telling this connection about `users`.
    Unwatch {
        users: Vec<compact_str::CompactString>,
    },
    /// After a `summary`: the next `limit` waiting messages of `from`, in order.
    Fetch {
        from: compact_str::CompactString,
        limit: u32,
    },
    /// After a `summary`: replay the whole inbox as on any connect (then `synced`).
    Replay,
    /// A read receipt: this user has read every message of `from` up to message `id`.
    Read {
        from: compact_str::CompactString,
        id: u64,
    },
}

impl ClientFrame {
    /// The frame's `cid` (raw JSON), for the ops that carry one.
    pub fn cid(&self) -> Option<&str> {
        match self {
            ClientFrame::Send(req) => Some(&req.cid),
            ClientFrame::Publish { cid, .. } => Some(cid),
            _ => None,
        }
    }
}

/// Most messages one `fetch` asks for (it is bounded by the connection's window as well).
pub const MAX_FETCH: u32 = 1000;

/// Most users one `presence` frame may ask about (SPEC section 3).
pub const MAX_PRESENCE_USERS: usize = 100;

/// Longest `cid` accepted (raw JSON text): it is stored in the dedup window per sender.
pub const MAX_CID_LEN: usize = 128;

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    op: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    cid: Option<&'a RawValue>,
    #[serde(borrow)]
    to: Option<&'a RawValue>,
    /// `null` is a valid body: kept as present (a plain Option would read it as missing).
    #[serde(borrow, default, deserialize_with = "present")]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    seq: Option<&'a RawValue>,
    #[serde(borrow)]
    users: Option<&'a RawValue>,
    #[serde(borrow)]
    room: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    #[serde(borrow)]
    from: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    limit: Option<&'a RawValue>,
    #[serde(borrow)]
    resend: Option<&'a RawValue>,
}

/// A field's raw JSON whenever the field is there, `null` included (a plain `Option` reads
/// `null` as missing).
pub(crate) fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn bad(message: impl Into<String>, cid: &Option<Box<str>>) -> FrameError {
    FrameError {
        code: ErrorCode::BadRequest,
        message: message.into(),
        cid: cid.clone(),
    }
}

/// Deepest nesting of arrays and objects a `body` may have (SPEC section 3).
pub const MAX_BODY_DEPTH: usize = 64;

/// Is `raw` (JSON text that already parsed) I-JSON as SPEC section 3 asks of a `body` (RFC
/// 7493): no lone surrogate escapes, no number a double cannot hold (beyond its range, or with
/// more precision than it keeps), no object with a member name twice, nesting at most
/// [`MAX_BODY_DEPTH`]? A body that breaks one of these is one a strict reader (a browser's
/// `JSON.parse` keeps going, Rust's serde_json and others stop) cannot read, or one that
/// readers would read as different values (a number rounded, the first or the last of two
/// members), and a client that cannot read a message cannot ack it. Err says which rule broke.
pub fn check_body(raw: &str) -> Result<(), &'static str> {
    let b = raw.as_bytes();
    let (mut i, mut depth) = (0, 0usize);
    // The member names of the objects open now, innermost last, each with its depth.
    let mut names: Vec<(usize, std::borrow::Cow<'_, str>)> = Vec::new();
    while i < b.len() {
        match b[i] {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_BODY_DEPTH {
                    return Err("`body` is nested deeper than 64");
                }
                i += 1;
            }
            b']' | b'}' => {
                let first = names
                    .iter()
                    .rposition(|(d, _)| *d < depth)
                    .map_or(0, |p| p + 1);
                if has_duplicate(&mut names[first..]) {
                    return Err("`body` has an object with a member name twice");
                }
                names.truncate(first);
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' => {
                let start = i;
                i = check_string(b, i + 1)?;
                let after = b[i..].iter().position(|c| !c.is_ascii_whitespace());
                if after.is_some_and(|n| b[i + n] == b':') {
                    names.push((depth, member_name(&raw[start..i])));
                }
            }
            b'-' | b'0'..=b'9' => {
                let end = b[i..]
                    .iter()
                    .position(|c| !matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                    .map_or(b.len(), |n| i + n);
                match raw[i..end].parse::<f64>() {
                    Ok(x) if x.is_finite() => {
                        if !double_holds(&raw[i..end], x) {
                            return Err(
                                "`body` has a number a double cannot hold (more precision than it keeps, or too small)",
                            );
                        }
                    }
                    _ => return Err("`body` has a number beyond the range of a double"),
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// A member name as readers see it: the quoted text, unescaped only when it has escapes.
fn member_name(quoted: &str) -> std::borrow::Cow<'_, str> {
    let inner = &quoted[1..quoted.len() - 1];
    match inner.contains('\\') {
        false => std::borrow::Cow::Borrowed(inner),
        true => std::borrow::Cow::Owned(serde_json::from_str(quoted).unwrap_or_default()),
    }
}

/// Whether two of one object's member names are the same (sorted in place when many).
fn has_duplicate(names: &mut [(usize, std::borrow::Cow<'_, str>)]) -> bool {
    if names.len() <= 16 {
        return (1..names.len()).any(|j| names[..j].iter().any(|(_, n)| *n == names[j].1));
    }
    names.sort_unstable_by(|a, b| a.1.cmp(&b.1));
    names.windows(2).any(|w| w[0].1 == w[1].1)
}

/// Whether the double `x` read from the number `text` holds it: the text is (in value) the
/// shortest decimal that reads back as `x`, or an integer `x` is exactly. Up to 15
/// significant digits always is (a double keeps 15 decimal digits), so that common case
/// formats nothing. `9007199254740993` (2^53 + 1) is not: it reads as 2^53.
fn double_holds(text: &str, x: f64) -> bool {
    let (digits, exp) = decimal(text);
    if digits.is_empty() || x == 0.0 {
        return digits.is_empty(); // zero, or a number too small that read as zero
    }
    if digits.len() <= 15 && x.abs() >= f64::MIN_POSITIVE {
        return true;
    }
    if decimal(&format!("{x:e}")) == (digits.clone(), exp) {
        return true;
    }
    // An integer a double holds exactly, written out (2^60 is `1152921504606846976`).
    x.fract() == 0.0 && x.abs() < 1e38 && decimal(&format!("{}", x.abs() as u128)) == (digits, exp)
}

/// A JSON number as its significant digits (no leading or trailing zeros, no sign) and the
/// power of ten of the last one; zero is no digits.
fn decimal(text: &str) -> (String, i64) {
    let text = text.trim_start_matches('-');
    let (mantissa, exp) = match text.find(['e', 'E']) {
        Some(e) => (&text[..e], text[e + 1..].parse::<i64>().unwrap_or(0)),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = whole.chars().chain(fraction.chars()).collect();
    let significant = all.trim_start_matches('0');
    let digits = significant.trim_end_matches('0');
    if digits.is_empty() {
        return (String::new(), 0);
    }
    let trailing = (significant.len() - digits.len()) as i64;
    (digits.to_string(), exp - fraction.len() as i64 + trailing)
}

/// Check the string starting after its opening quote at `i`; returns the index after its
/// closing quote. Raw UTF-8 cannot hold a surrogate; only `\u` escapes can.
fn check_string(b: &[u8], mut i: usize) -> Result<usize, &'static str> {
    const LONE: &str = "`body` has a lone surrogate (\\uD800-\\uDFFF without its pair)";
    let hex = |at: usize| {
        b.get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    while i < b.len() {
        match b[i] {
            b'"' => return Ok(i + 1),
            b'\\' if b.get(i + 1) == Some(&b'u') => {
                let unit = hex(i + 2).ok_or(LONE)?;
                i += 6;
                match unit {
                    0xD800..=0xDBFF => {
                        let low = (b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u'))
                            .then(|| hex(i + 2))
                            .flatten();
                        if !matches!(low, Some(0xDC00..=0xDFFF)) {
                            return Err(LONE);
                        }
                        i += 6;
                    }
                    0xDC00..=0xDFFF => return Err(LONE),
                    _ => {}
                }
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

/// A `body`, present and I-JSON.
fn checked_body<'a>(
    body: Option<&'a RawValue>,
    cid: &Option<Box<str>>,
) -> Result<&'a str, FrameError> {
    let body = body.ok_or_else(|| bad("missing field `body`", cid))?.get();
    check_body(body).map_err(|why| bad(why, cid))?;
    Ok(body)
}

fn parse_send(env: &Envelope, cid: &Option<Box<str>>) -> Result<ClientFrame, FrameError> {
    let to = parse_id(env.to, "to", "user", cid)?;
    let checked = checked_cid(cid)?;
    let body = checked_body(env.body, cid)?;
    let resend = match env.resend.map(RawValue::get) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(bad("`resend` must be true or false", cid)),
    };
    Ok(ClientFrame::Send(SendRequest {
        to,
        cid: checked.into(),
        body: body.into(),
        resend,
    }))
}

/// A string field holding a user or room id.
fn parse_id(
    raw: Option<&RawValue>,
    field: &str,
    what: &str,
    cid: &Option<Box<str>>,
) -> Result<compact_str::CompactString, FrameError> {
    let id: String = raw
        .ok_or_else(|| bad(format!("missing field `{field}`"), cid))
        .and_then(|r| {
            serde_json::from_str(r.get())
                .map_err(|_| bad(format!("`{field}` must be a string"), cid))
        })?;
    if crate::auth::valid_id(&id).is_err() {
        return Err(bad(format!("`{field}` is not a valid {what} id"), cid));
    }
    Ok(id.into())
}

fn parse_room(
    env: &Envelope,
    cid: &Option<Box<str>>,
) -> Result<compact_str::CompactString, FrameError> {
    parse_id(env.room, "room", "room", cid)
}

/// A `cid` as the SPEC allows it (raw JSON): a non-empty string or an unsigned integer, at
/// most [`MAX_CID_LEN`] bytes.
pub fn valid_cid(raw: &str) -> bool {
    let shape_ok = match raw.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(raw).is_ok_and(|c| !c.is_empty()),
        _ => serde_json::from_str::<u64>(raw).is_ok(),
    };
    shape_ok && raw.len() <= MAX_CID_LEN
}

/// A `cid` as `send` and `publish` accept it: a non-empty string or an unsigned integer.
fn checked_cid(cid: &Option<Box<str>>) -> Result<&str, FrameError> {
    let Some(raw_cid) = cid else {
        return Err(bad("missing field `cid`", cid));
    };
    if !valid_cid(raw_cid) {
        return Err(bad(
            format!("`cid` must be a non-empty string or an unsigned integer, at most {MAX_CID_LEN} bytes of JSON"),
            cid,
        ));
    }
    Ok(raw_cid)
}

fn parse_join(env: &Envelope, cid: &Option<Box<str>>) -> Result<ClientFrame, FrameError> {
    let room = parse_room(env, cid)?;
    let since = match env.since {
        None => None,
        Some(s) => Some(
            serde_json::from_str::<u64>(s.get())
                .map_err(|_| bad("`since` must be an unsigned integer (a room offset)", cid))?,
        ),
    };
    Ok(ClientFrame::Join { room, since })
}

fn parse_publish(env: &Envelope, cid: &Option<Box<str>>) -> Result<ClientFrame, FrameError> {
    let room = parse_room(env, cid)?;
    let checked = checked_cid(cid)?;
    let body = checked_body(env.body, cid)?;
    Ok(ClientFrame::Publish {
        room,
        cid: checked.into(),
        body: body.into(),
    })
}

/// `read`: `from` a user id, `id` a message id as the server writes it (a string of digits;
/// an unsigned integer is taken too).
fn parse_read(env: &Envelope, cid: &Option<Box<str>>) -> Result<ClientFrame, FrameError> {
    let from = parse_id(env.from, "from", "user", cid)?;
    let raw = env.id.ok_or_else(|| bad("missing field `id`", cid))?.get();
    let digits = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    let id = match digits.as_bytes().first() {
        Some(b'1'..=b'9') => digits.parse::<u64>().ok(),
        _ => None,
    };
    let id = id.ok_or_else(|| bad("`id` must be a message id (a string of digits)", cid))?;
    Ok(ClientFrame::Read { from, id })
}

fn parse_presence(env: &Envelope, cid: &Option<Box<str>>) -> Result<ClientFrame, FrameError> {
    Ok(ClientFrame::Presence {
        users: parse_users(env, "presence", cid)?,
    })
}

/// `users`: an array of at most [`MAX_PRESENCE_USERS`] user ids (`presence`, `watch`,
/// `unwatch`).
fn parse_users(
    env: &Envelope,
    op: &str,
    cid: &Option<Box<str>>,
) -> Result<Vec<compact_str::CompactString>, FrameError> {
    let shape = || {
        bad(
            format!("`{op}` needs `users`, an array of at most {MAX_PRESENCE_USERS} user ids"),
            cid,
        )
    };
    let raw = env.users.ok_or_else(shape)?;
    let users: Vec<String> = serde_json::from_str(raw.get()).map_err(|_| shape())?;
    if users.len() > MAX_PRESENCE_USERS {
        return Err(shape());
    }
    if let Some(bad_id) = users.iter().find(|u| crate::auth::valid_id(u).is_err()) {
        return Err(bad(
            format!("`{}` is not a valid user id", truncate(bad_id, 64)),
            cid,
        ));
    }
    Ok(users.into_iter().map(Into::into).collect())
}

pub fn parse(text: &[u8]) -> Result<ClientFrame, FrameError> {
    let env: Envelope = serde_json::from_slice(text).map_err(|e| FrameError {
        code: ErrorCode::BadRequest,
        message: format!("frame is not a JSON object with a string `op`: {e}"),
        cid: None,
    })?;
    let cid = env.cid.map(|c| Box::<str>::from(c.get()));
    let Some(op) = env.op.as_deref() else {
        return Err(FrameError {
            code: ErrorCode::BadRequest,
            message: "missing field `op`".into(),
            cid,
        });
    };
    match op {
        "ping" => Ok(ClientFrame::Ping),
        "send" => parse_send(&env, &cid),
        "presence" => parse_presence(&env, &cid),
        "join" => parse_join(&env, &cid),
        "leave" => Ok(ClientFrame::Leave {
            room: parse_room(&env, &cid)?,
        }),
        "publish" => parse_publish(&env, &cid),
        "typing" => Ok(ClientFrame::Typing {
            to: parse_id(env.to, "to", "user", &cid)?,
        }),
        "read" => parse_read(&env, &cid),
        "replay" => Ok(ClientFrame::Replay),
        "fetch" => {
            let from = parse_id(env.from, "from", "user", &cid)?;
            let limit = env
                .limit
                .and_then(|l| serde_json::from_str::<u32>(l.get()).ok())
                .filter(|l| (1..=MAX_FETCH).contains(l))
                .ok_or_else(|| bad(format!("`fetch` needs `limit`, 1 to {MAX_FETCH}"), &cid))?;
            Ok(ClientFrame::Fetch { from, limit })
        }
        "watch" => Ok(ClientFrame::Watch {
            users: parse_users(&env, "watch", &cid)?,
        }),
        "unwatch" => Ok(ClientFrame::Unwatch {
            users: parse_users(&env, "unwatch", &cid)?,
        }),
        "ack" => env
            .seq
            .and_then(|s| serde_json::from_str::<u64>(s.get()).ok())
            .map(|seq| ClientFrame::Ack { seq })
            .ok_or_else(|| bad("`ack` needs `seq`, an unsigned integer", &cid)),
        other => Err(FrameError {
            code: ErrorCode::UnknownOp,
            message: format!("unknown op `{}`", truncate(other, 64)),
            cid,
        }),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn write_welcome(
    out: &mut Vec<u8>,
    user: &str,
    conn: &str,
    heartbeat_ms: u64,
    max_frame: usize,
) {
    out.extend_from_slice(b"{\"op\":\"welcome\",\"v\":");
    out.extend_from_slice(PROTOCOL_VERSION.to_string().as_bytes());
    out.extend_from_slice(b",\"user\":");
    write_json_str(out, user);
    out.extend_from_slice(b",\"conn\":");
    write_json_str(out, conn);
    out.extend_from_slice(
        format!(",\"heartbeat_ms\":{heartbeat_ms},\"max_frame\":{max_frame}}}").as_bytes(),
    );
}

pub fn write_synced(out: &mut Vec<u8>, count: u64) {
    out.extend_from_slice(b"{\"op\":\"synced\",\"count\":");
    push_u64(out, count);
    out.push(b'}');
}

/// `n` in decimal, straight into the frame: the frames written per message (`msg`,
/// `accepted`, `delivered`, `room`) carry several numbers, and `format!` cost a `String`
/// each (~5% of a shard's time at send 100 x 16, docs/performance.md).
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// `"n"`: an id, a JSON string (ids pass 2^53, which JSON numbers do not keep exactly).
fn push_quoted_u64(out: &mut Vec<u8>, n: u64) {
    out.push(b'"');
    push_u64(out, n);
    out.push(b'"');
}

pub const PONG: &[u8] = b"{\"op\":\"pong\"}";

/// `{"op":"msg","seq":..,"id":"..",["type":"..",]"from":"..","cid":..,"ts":..,"body":..}`
/// (`type` only on a backend message that has one).
/// A read receipt stored in an inbox is written as `read` (see [`write_read`]).
pub fn write_msg(out: &mut Vec<u8>, seq: u64, msg: &crate::store::StoredMessage) {
    if let Some(sender) = receipt_sender(&msg.cid) {
        return write_read(out, seq, &msg.from, sender, msg.id, msg.ts);
    }
    let id = msg.id;
    out.extend_from_slice(b"{\"op\":\"msg\",\"seq\":");
    push_u64(out, seq);
    out.extend_from_slice(b",\"id\":");
    push_quoted_u64(out, id);
    out.push(b',');
    if let Some(t) = &msg.msg_type {
        out.extend_from_slice(b"\"type\":");
        write_json_str(out, t);
        out.push(b',');
    }
    out.extend_from_slice(b"\"from\":");
    write_message_tail(out, &msg.from, &msg.cid, msg.ts, &msg.body);
}

/// Whether a message's frame (`msg`, or `room` when `room` is given) fits in `max_frame` with
/// every number at its longest. `welcome` tells clients `max_frame` (SPEC section 2); a longer
/// frame is one a client that holds the server to it cannot read, so it would never ack it and
/// the inbox would stall. A send or publish that would not fit is refused `too_large`.
pub fn message_fits(
    max_frame: usize,
    room: Option<&str>,
    from: &str,
    cid: &str,
    msg_type: Option<&str>,
    body: &str,
) -> bool {
    // The frame's names and four numbers take under 200 bytes; a string's escapes at most 6
    // bytes per byte: most messages are decided here, without writing anything.
    let strings = from.len() + room.map_or(0, str::len) + msg_type.map_or(0, str::len);
    let rough = 256 + 6 * strings + cid.len() + body.len();
    if rough <= max_frame {
        return true;
    }
    let mut out = Vec::with_capacity(rough);
    match room {
        Some(room) => write_room(
            &mut out,
            room,
            u64::MAX,
            u64::MAX,
            from,
            cid,
            u64::MAX,
            body,
        ),
        None => {
            let msg = crate::store::StoredMessage {
                id: u64::MAX,
                from: from.into(),
                cid: cid.into(),
                ts: u64::MAX,
                body: body.into(),
                msg_type: msg_type.map(Into::into),
            };
            write_msg(&mut out, u64::MAX, &msg);
        }
    }
    out.len() <= max_frame
}

/// `"from":..,"cid":..,"ts":..,"body":..}`: how `msg` and `room` frames end.
fn write_message_tail(out: &mut Vec<u8>, from: &str, cid: &str, ts: u64, body: &str) {
    write_json_str(out, from);
    out.extend_from_slice(b",\"cid\":");
    out.extend_from_slice(cid.as_bytes());
    out.extend_from_slice(b",\"ts\":");
    push_u64(out, ts);
    out.extend_from_slice(b",\"body\":");
    out.extend_from_slice(body.as_bytes());
    out.push(b'}');
}

/// How a read receipt travels: an inbox entry (reliable like a `msg`: window, acks, replay)
/// whose `cid` is `~r:<sender>:<id>`, `from` the reader and `id` the message read. A client's
/// cid is raw JSON (it starts with `"` or a digit), so it never looks like this.
pub const RECEIPT_CID_PREFIX: &str = "~r:";

/// The cid of `reader`'s receipt for `sender`'s messages up to `id` (unique per receipt, so
/// the store's dedup drops a copy of the same one).
pub fn receipt_cid(sender: &str, id: u64) -> compact_str::CompactString {
    compact_str::format_compact!("{RECEIPT_CID_PREFIX}{sender}:{id}")
}

/// The sender whose messages a receipt marks read, if `cid` is a receipt's.
pub fn receipt_sender(cid: &str) -> Option<&str> {
    let rest = cid.strip_prefix(RECEIPT_CID_PREFIX)?;
    rest.rsplit_once(':').map(|(sender, _)| sender)
}

/// What later receipts of the same reader for the same sender replace in one inbox: the cid
/// without its id (`~r:<sender>`).
pub fn receipt_key(cid: &str) -> Option<&str> {
    receipt_sender(cid)?;
    cid.rsplit_once(':').map(|(key, _)| key)
}

/// `{"op":"read","seq":N,"by":..,"from":..,"id":"..","ts":..}`: `by` has read every message
/// of `from` up to `id`. `seq` as in `msg` (ack it the same way).
pub fn write_read(out: &mut Vec<u8>, seq: u64, by: &str, from: &str, id: u64, ts: u64) {
    out.extend_from_slice(b"{\"op\":\"read\",\"seq\":");
    push_u64(out, seq);
    out.extend_from_slice(b",\"by\":");
    write_json_str(out, by);
    out.extend_from_slice(b",\"from\":");
    write_json_str(out, from);
    out.extend_from_slice(b",\"id\":");
    push_quoted_u64(out, id);
    out.extend_from_slice(b",\"ts\":");
    push_u64(out, ts);
    out.push(b'}');
}

/// `{"op":"summary","total":N,"senders":[{"from":..,"count":N,"oldest":{"id":"..","ts":..},
/// "newest":{..}},..]}`: a big inbox, before any replay.
pub fn write_summary(out: &mut Vec<u8>, senders: &[crate::store::SenderSummary]) {
    let total: u64 = senders.iter().map(|s| s.count).sum();
    out.extend_from_slice(
        format!("{{\"op\":\"summary\",\"total\":{total},\"senders\":[").as_bytes(),
    );
    for (i, s) in senders.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"from\":");
        write_json_str(out, &s.from);
        let ((oid, ots), (nid, nts)) = (s.oldest, s.newest);
        out.extend_from_slice(
            format!(
                ",\"count\":{},\"oldest\":{{\"id\":\"{oid}\",\"ts\":{ots}}},\"newest\":{{\"id\":\"{nid}\",\"ts\":{nts}}}}}",
                s.count
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"]}");
}

/// `{"op":"fetched","from":..,"count":N,"more":bool}`: the answer to `fetch`, after its
/// `msg` frames.
pub fn write_fetched(out: &mut Vec<u8>, from: &str, count: usize, more: bool) {
    out.extend_from_slice(b"{\"op\":\"fetched\",\"from\":");
    write_json_str(out, from);
    out.extend_from_slice(format!(",\"count\":{count},\"more\":{more}}}").as_bytes());
}

/// `{"op":"typing","from":..}`
pub fn write_typing(out: &mut Vec<u8>, from: &str) {
    out.extend_from_slice(b"{\"op\":\"typing\",\"from\":");
    write_json_str(out, from);
    out.push(b'}');
}

/// `{"op":"accepted","cid":..,"id":".."}`
pub fn write_accepted(out: &mut Vec<u8>, cid: &str, id: u64) {
    out.extend_from_slice(b"{\"op\":\"accepted\",\"cid\":");
    out.extend_from_slice(cid.as_bytes());
    out.extend_from_slice(b",\"id\":");
    push_quoted_u64(out, id);
    out.push(b'}');
}

/// `{"op":"delivered","cid":..,"id":"..","to":".."}`
pub fn write_delivered(out: &mut Vec<u8>, cid: &str, id: u64, to: &str) {
    out.extend_from_slice(b"{\"op\":\"delivered\",\"cid\":");
    out.extend_from_slice(cid.as_bytes());
    out.extend_from_slice(b",\"id\":");
    push_quoted_u64(out, id);
    out.extend_from_slice(b",\"to\":");
    write_json_str(out, to);
    out.push(b'}');
}

/// `{"op":"room","room":..,"offset":N,"id":"..","from":..,"cid":..,"ts":..,"body":..}`
#[allow(clippy::too_many_arguments)]
pub fn write_room(
    out: &mut Vec<u8>,
    room: &str,
    offset: u64,
    id: u64,
    from: &str,
    cid: &str,
    ts: u64,
    body: &str,
) {
    out.extend_from_slice(b"{\"op\":\"room\",\"room\":");
    write_json_str(out, room);
    out.extend_from_slice(b",\"offset\":");
    push_u64(out, offset);
    out.extend_from_slice(b",\"id\":");
    push_quoted_u64(out, id);
    out.extend_from_slice(b",\"from\":");
    write_message_tail(out, from, cid, ts, body);
}

/// `{"op":"joined","room":..,"offset":N,"recovered":bool}`
pub fn write_joined(out: &mut Vec<u8>, room: &str, offset: u64, recovered: bool) {
    out.extend_from_slice(b"{\"op\":\"joined\",\"room\":");
    write_json_str(out, room);
    out.extend_from_slice(format!(",\"offset\":{offset},\"recovered\":{recovered}}}").as_bytes());
}

/// `{"op":"left","room":..}`
pub fn write_left(out: &mut Vec<u8>, room: &str) {
    out.extend_from_slice(b"{\"op\":\"left\",\"room\":");
    write_json_str(out, room);
    out.push(b'}');
}

/// `{"op":"gap","room":..,"from":N}`: room messages from offset N were skipped (slow consumer).
pub fn write_gap(out: &mut Vec<u8>, room: &str, from: u64) {
    out.extend_from_slice(b"{\"op\":\"gap\",\"room\":");
    write_json_str(out, room);
    out.extend_from_slice(b",\"from\":");
    push_u64(out, from);
    out.push(b'}');
}

/// `{"op":"accepted","cid":..,"id":"..","offset":N}` (a room publish).
pub fn write_accepted_offset(out: &mut Vec<u8>, cid: &str, id: u64, offset: u64) {
    out.extend_from_slice(b"{\"op\":\"accepted\",\"cid\":");
    out.extend_from_slice(cid.as_bytes());
    out.extend_from_slice(b",\"id\":");
    push_quoted_u64(out, id);
    out.extend_from_slice(b",\"offset\":");
    push_u64(out, offset);
    out.push(b'}');
}

/// `{"op":"presence","online":{"a":true,"b":false}}` (a user asked twice appears once).
pub fn write_presence<'a>(out: &mut Vec<u8>, online: impl IntoIterator<Item = (&'a str, bool)>) {
    out.extend_from_slice(b"{\"op\":\"presence\",\"online\":{");
    let mut seen = std::collections::HashSet::new();
    for (user, on) in online {
        if !seen.insert(user) {
            continue;
        }
        if seen.len() > 1 {
            out.push(b',');
        }
        write_json_str(out, user);
        out.extend_from_slice(if on { b":true" } else { b":false" });
    }
    out.extend_from_slice(b"}}");
}

pub fn write_error(out: &mut Vec<u8>, err: &FrameError) {
    out.extend_from_slice(b"{\"op\":\"error\",\"code\":\"");
    out.extend_from_slice(err.code.as_str().as_bytes());
    out.extend_from_slice(b"\",\"message\":");
    write_json_str(out, &err.message);
    if let Some(cid) = &err.cid {
        out.extend_from_slice(b",\"cid\":");
        out.extend_from_slice(cid.as_bytes());
    }
    out.push(b'}');
}

/// `rate_limited` (SPEC section 3): `what` was over a limit; nothing of the frame was taken,
/// and it may be sent again after `retry_ms`.
pub fn write_rate_limited(out: &mut Vec<u8>, what: &str, cid: Option<&str>, retry_ms: u64) {
    let err = FrameError {
        code: ErrorCode::RateLimited,
        message: format!("{what}: retry in {retry_ms} ms"),
        cid: cid.map(Into::into),
    };
    write_error_retry(out, &err, Some(retry_ms));
}

/// `error` with `retry_ms` when the client should come back after it.
pub fn write_error_retry(out: &mut Vec<u8>, err: &FrameError, retry_ms: Option<u64>) {
    write_error(out, err);
    if let Some(retry_ms) = retry_ms {
        out.pop(); // the closing brace
        out.extend_from_slice(b",\"retry_ms\":");
        out.extend_from_slice(retry_ms.to_string().as_bytes());
        out.push(b'}');
    }
}

/// The first frame of a connection that authenticates in-band (`GET /ws?auth=frame`):
/// `{"op":"auth","token":"<jwt>"}`, or in dev mode `{"op":"auth","user":"<id>"}`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AuthFrame {
    pub token: Option<String>,
    pub user: Option<String>,
}

/// Parse an `auth` frame; the error says what is wrong, for the refusal's message.
pub fn parse_auth(text: &[u8]) -> Result<AuthFrame, &'static str> {
    #[derive(Deserialize)]
    struct Raw {
        op: Option<String>,
        token: Option<String>,
        user: Option<String>,
    }
    const SHAPE: &str = r#"the first frame must be {"op":"auth","token":"<jwt>"}"#;
    let raw: Raw = serde_json::from_slice(text).map_err(|_| SHAPE)?;
    match raw.op.as_deref() {
        Some("auth") => Ok(AuthFrame {
            token: raw.token,
            user: raw.user,
        }),
        _ => Err(SHAPE),
    }
}

/// Append `s` as a JSON string literal.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> FrameError {
        parse(text.as_bytes()).unwrap_err()
    }

    /// SPEC section 3: a `body` that is not I-JSON is `bad_request` on `send` and `publish`,
    /// with the rule it broke; everything a strict reader takes passes.
    #[test]
    fn a_body_that_is_not_i_json_is_refused() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let refused = [
            (deep(65), "nested deeper"),
            (deep(30_000), "nested deeper"),
            (format!("{{\"a\":{}}}", deep(64)), "nested deeper"),
            ("1e400".to_string(), "range of a double"),
            ("[-1e309]".to_string(), "range of a double"),
            (r#""\ud800""#.to_string(), "lone surrogate"),
            (r#""x\udc00y""#.to_string(), "lone surrogate"),
            (r#""\ud800\u0041""#.to_string(), "lone surrogate"),
            (r#"{"\ud83d":1}"#.to_string(), "lone surrogate"),
            ("9007199254740993".to_string(), "cannot hold"),
            ("123456789012345678901234567890".to_string(), "cannot hold"),
            (
                "3.141592653589793238462643383279".to_string(),
                "cannot hold",
            ),
            (
                "0.1000000000000000055511151231257827021181583404541015625123".to_string(),
                "cannot hold",
            ),
            ("[1e-400]".to_string(), "cannot hold"),
            (r#"{"a":1,"a":2}"#.to_string(), "member name twice"),
            (r#"{"a":1,"\u0061":2}"#.to_string(), "member name twice"),
            (
                r#"[{"x":{"a":1},"a":{"a":2,"b":[{"a":1, "a" :1}]}}]"#.to_string(),
                "member name twice",
            ),
            (
                format!(
                    "{{{},\"k3\":0}}",
                    (0..20)
                        .map(|k| format!("\"k{k}\":{k}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                "member name twice",
            ),
        ];
        for (body, why) in &refused {
            for op in [r#""op":"send","to":"bob""#, r#""op":"publish","room":"r""#] {
                let text = format!(r#"{{{op},"cid":"c","body":{body}}}"#);
                let e = err(&text);
                assert_eq!(e.code, ErrorCode::BadRequest, "{body}");
                assert!(e.message.contains(why), "{body}: {}", e.message);
                assert_eq!(e.cid.as_deref(), Some("\"c\""), "the error names the cid");
            }
        }
        let taken = [
            deep(64),
            "1e308".to_string(),
            "-0.0".to_string(),
            "9007199254740992".to_string(),
            "1152921504606846976".to_string(),
            "[0.1, 0.30000000000000004, 1.50000000000000000000, 5e-324, 1.7976931348623157e308]"
                .to_string(),
            r#"{"a":{"a":1},"b":{"a":2},"c":[{"a":1},{"a":1}]}"#.to_string(),
            format!(
                "{{{}}}",
                (0..20)
                    .map(|k| format!("\"k{k}\":{k}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            r#""\ud83d\ude00 and \\ud800 as text""#.to_string(),
            r#"{"e":[true,false,null,"1e999"],"n":-12.5E-3}"#.to_string(),
            "\"\u{1F600}\"".to_string(),
        ];
        for body in &taken {
            assert!(check_body(body).is_ok(), "{body}");
            let text = format!(r#"{{"op":"send","to":"bob","cid":"c","body":{body}}}"#);
            assert!(parse(text.as_bytes()).is_ok(), "{body}");
        }
    }

    /// A message fits when its frame, with every number at its longest, is within max_frame.
    #[test]
    fn a_message_fits_when_its_longest_frame_does() {
        let body = format!("\"{}\"", "x".repeat(900));
        let msg = |max| message_fits(max, None, "alice", "\"c\"", None, &body);
        // `{"op":"msg","seq":N,"id":"N","from":"alice","cid":"c","ts":N,"body":...}`, N 20 digits.
        let longest = 11 + 7 + 20 + 6 + 22 + 8 + 7 + 7 + 3 + 6 + 20 + 8 + body.len() + 1;
        assert!(msg(longest));
        assert!(!msg(longest - 1));
        let room = |max| message_fits(max, Some("r"), "alice", "\"c\"", None, &body);
        assert!(!room(longest), "a room frame names its room too");
        let typed = |max| message_fits(max, None, "alice", "\"c\"", Some("system"), &body);
        assert!(!typed(longest), "and a backend's message its type");
        assert!(message_fits(65_536, None, "alice", "\"c\"", None, "{}"));
    }

    #[test]
    fn ping_parses_with_extra_fields() {
        assert_eq!(parse(br#"{"op":"ping","x":1}"#).unwrap(), ClientFrame::Ping);
    }

    #[test]
    fn every_bad_frame_has_a_code() {
        assert_eq!(err("not json").code, ErrorCode::BadRequest);
        assert_eq!(err("[1,2]").code, ErrorCode::BadRequest);
        assert_eq!(err(r#"{"x":1}"#).code, ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":5}"#).code, ErrorCode::BadRequest);
        let e = err(r#"{"op":"dance","cid":"c-1"}"#);
        assert_eq!(e.code, ErrorCode::UnknownOp);
        assert_eq!(e.cid.as_deref(), Some("\"c-1\""));
        assert_eq!(err(r#"{"op":"join"}"#).code, ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":"join","room":5}"#).code, ErrorCode::BadRequest);
        assert_eq!(
            err(r#"{"op":"join","room":""}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"join","room":"r","since":-1}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(err(r#"{"op":"leave"}"#).code, ErrorCode::BadRequest);
        let e = err(
            r#"{"op":"publish","room":"r","cid":"p","body":1,"x":0,"room2":1}"#
                .replace(",\"body\":1", "")
                .as_str(),
        );
        assert_eq!(
            (e.code, e.cid.as_deref()),
            (ErrorCode::BadRequest, Some("\"p\""))
        );
        assert_eq!(
            err(r#"{"op":"publish","room":"r","body":1}"#).code,
            ErrorCode::BadRequest
        );
        // send: every missing or mistyped field is a bad_request that keeps the cid.
        let e = err(r#"{"op":"send","cid":7,"body":1}"#);
        assert_eq!(
            (e.code, e.cid.as_deref()),
            (ErrorCode::BadRequest, Some("7"))
        );
        assert_eq!(
            err(r#"{"op":"send","to":5,"cid":"a","body":1}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"send","to":"bob","body":1}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"send","to":"bob","cid":"a"}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"send","to":"bob","cid":{"x":1},"body":1}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"send","to":"bob","cid":"","body":1}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"send","to":"","cid":"a","body":1}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(err(r#"{"op":"ack"}"#).code, ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":"ack","seq":-1}"#).code, ErrorCode::BadRequest);
    }

    #[test]
    fn send_and_ack_parse_keeping_raw_json() {
        assert_eq!(
            parse(br#"{"op":"send","to":"bob","cid":"c-1","body":{"text":"hi","n":[1,2]}}"#)
                .unwrap(),
            ClientFrame::Send(SendRequest {
                to: "bob".into(),
                cid: "\"c-1\"".into(),
                body: r#"{"text":"hi","n":[1,2]}"#.into(),
                resend: false,
            })
        );
        let resent = parse(br#"{"op":"send","to":"bob","cid":"c","body":1,"resend":true}"#);
        assert!(matches!(
            resent,
            Ok(ClientFrame::Send(SendRequest { resend: true, .. }))
        ));
        assert_eq!(
            err(r#"{"op":"send","to":"bob","cid":"c","body":1,"resend":1}"#).code,
            ErrorCode::BadRequest
        );
        assert!(matches!(
            parse(br#"{"op":"send","to":"bob","cid":42,"body":null}"#).unwrap(),
            ClientFrame::Send(_)
        ));
        assert_eq!(
            parse(br#"{"op":"ack","seq":17}"#).unwrap(),
            ClientFrame::Ack { seq: 17 }
        );
    }

    #[test]
    fn room_ops_parse() {
        assert_eq!(
            parse(br#"{"op":"join","room":"lobby"}"#).unwrap(),
            ClientFrame::Join {
                room: "lobby".into(),
                since: None
            }
        );
        assert_eq!(
            parse(br#"{"op":"join","room":"lobby","since":42}"#).unwrap(),
            ClientFrame::Join {
                room: "lobby".into(),
                since: Some(42)
            }
        );
        assert_eq!(
            parse(br#"{"op":"leave","room":"lobby"}"#).unwrap(),
            ClientFrame::Leave {
                room: "lobby".into()
            }
        );
        assert_eq!(
            parse(br#"{"op":"publish","room":"lobby","cid":7,"body":{"t":"hi"}}"#).unwrap(),
            ClientFrame::Publish {
                room: "lobby".into(),
                cid: "7".into(),
                body: r#"{"t":"hi"}"#.into()
            }
        );
    }

    #[test]
    fn room_frames_are_valid_json() {
        let mut out = Vec::new();
        write_room(&mut out, "lo\"bby", 9, 3, "al", "\"c\"", 5, r#"{"x":1}"#);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"room","room":"lo\"bby","offset":9,"id":"3","from":"al","cid":"c","ts":5,"body":{"x":1}})
        );
        for (frame, expected) in [
            (
                (|o: &mut Vec<u8>| write_joined(o, "r", 4, true)) as fn(&mut Vec<u8>),
                serde_json::json!({"op":"joined","room":"r","offset":4,"recovered":true}),
            ),
            (
                |o: &mut Vec<u8>| write_left(o, "r"),
                serde_json::json!({"op":"left","room":"r"}),
            ),
            (
                |o: &mut Vec<u8>| write_gap(o, "r", 12),
                serde_json::json!({"op":"gap","room":"r","from":12}),
            ),
            (
                |o: &mut Vec<u8>| write_accepted_offset(o, "\"c\"", 2, 8),
                serde_json::json!({"op":"accepted","cid":"c","id":"2","offset":8}),
            ),
        ] {
            let mut out = Vec::new();
            frame(&mut out);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v, expected);
        }
    }

    #[test]
    fn typing_names_a_valid_user_and_is_answered_with_from() {
        assert_eq!(
            parse(br#"{"op":"typing","to":"bob"}"#).unwrap(),
            ClientFrame::Typing { to: "bob".into() }
        );
        for bad_typing in [
            r#"{"op":"typing"}"#,
            r#"{"op":"typing","to":7}"#,
            r#"{"op":"typing","to":""}"#,
        ] {
            let e = parse(bad_typing.as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad_typing}: {e:?}");
        }
        let mut out = Vec::new();
        write_typing(&mut out, "al\"ice");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            serde_json::json!({"op":"typing","from":"al\"ice"})
        );
    }

    #[test]
    fn read_names_a_sender_and_a_message_id_and_is_written_as_read() {
        for ok in [
            r#"{"op":"read","from":"alice","id":"1234"}"#,
            r#"{"op":"read","from":"alice","id":1234}"#,
        ] {
            assert_eq!(
                parse(ok.as_bytes()).unwrap(),
                ClientFrame::Read {
                    from: "alice".into(),
                    id: 1234
                },
                "{ok}"
            );
        }
        for bad_read in [
            r#"{"op":"read","id":"1"}"#,
            r#"{"op":"read","from":"alice"}"#,
            r#"{"op":"read","from":"alice","id":"0"}"#,
            r#"{"op":"read","from":"alice","id":"01"}"#,
            r#"{"op":"read","from":"alice","id":"x1"}"#,
            r#"{"op":"read","from":"alice","id":-1}"#,
            r#"{"op":"read","from":"alice","id":"99999999999999999999"}"#,
            r#"{"op":"read","from":5,"id":"1"}"#,
        ] {
            let e = parse(bad_read.as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad_read}: {e:?}");
        }
        let cid = receipt_cid("al:ice", 77);
        assert_eq!(receipt_sender(&cid), Some("al:ice"));
        assert_eq!(receipt_key(&cid), Some("~r:al:ice"));
        for client_cid in [r#""~r:a:1""#, "17"] {
            assert_eq!(receipt_sender(client_cid), None, "{client_cid}");
        }
        let receipt = crate::store::StoredMessage {
            id: 77,
            from: "bob".into(),
            cid,
            ts: 5,
            body: "null".into(),
            msg_type: None,
        };
        let mut out = Vec::new();
        write_msg(&mut out, 3, &receipt);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            serde_json::json!({"op":"read","seq":3,"by":"bob","from":"al:ice","id":"77","ts":5})
        );
    }

    #[test]
    fn presence_parses_and_refuses_bad_shapes() {
        assert_eq!(
            parse(br#"{"op":"presence","users":["a","b"]}"#).unwrap(),
            ClientFrame::Presence {
                users: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(
            parse(br#"{"op":"presence","users":[]}"#).unwrap(),
            ClientFrame::Presence { users: vec![] }
        );
        let hundred: Vec<String> = (0..MAX_PRESENCE_USERS).map(|i| format!("u{i}")).collect();
        let frame = serde_json::json!({"op":"presence","users":hundred}).to_string();
        assert!(
            matches!(parse(frame.as_bytes()), Ok(ClientFrame::Presence { users }) if users.len() == 100)
        );
        let too_many: Vec<String> = (0..=MAX_PRESENCE_USERS).map(|i| format!("u{i}")).collect();
        let frame = serde_json::json!({"op":"presence","users":too_many,"cid":"p"}).to_string();
        let e = parse(frame.as_bytes()).unwrap_err();
        assert_eq!(
            (e.code, e.cid.as_deref()),
            (ErrorCode::BadRequest, Some("\"p\""))
        );
        for bad_frame in [
            r#"{"op":"presence"}"#,
            r#"{"op":"presence","users":"a"}"#,
            r#"{"op":"presence","users":[1]}"#,
            r#"{"op":"presence","users":[""]}"#,
            r#"{"op":"presence","users":null}"#,
        ] {
            assert_eq!(err(bad_frame).code, ErrorCode::BadRequest, "{bad_frame}");
        }
    }

    #[test]
    fn presence_answer_is_an_object_without_repeats() {
        let mut out = Vec::new();
        write_presence(&mut out, [("a", true), ("b\"", false), ("a", true)]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"presence","online":{"a":true,"b\"":false}})
        );
        out.clear();
        write_presence(&mut out, []);
        assert_eq!(out, br#"{"op":"presence","online":{}}"#);
    }

    #[test]
    fn numbers_are_written_in_decimal_as_display_writes_them() {
        let mut rng = crate::test_rng::Rng(7);
        let edges = [0, 1, 9, 10, 99, 100, 1 << 53, u64::MAX - 1, u64::MAX];
        for n in edges
            .into_iter()
            .chain((0..2_000).map(|_| rng.next() >> rng.below(64)))
        {
            let mut out = b"x".to_vec();
            push_u64(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
            out.clear();
            push_quoted_u64(&mut out, n);
            assert_eq!(out, format!("\"{n}\"").into_bytes());
        }
    }

    #[test]
    fn delivery_frames_are_valid_json() {
        let mut out = Vec::new();
        let mut msg = crate::store::StoredMessage {
            id: 99,
            from: "al\"ice".into(),
            cid: "\"c-1\"".into(),
            ts: 1700,
            body: r#"{"t":"x"}"#.into(),
            msg_type: None,
        };
        write_msg(&mut out, 3, &msg);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"msg","seq":3,"id":"99","from":"al\"ice","cid":"c-1","ts":1700,"body":{"t":"x"}})
        );
        out.clear();
        msg.msg_type = Some("sys\"tem".into());
        write_msg(&mut out, 4, &msg);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "sys\"tem");
        assert_eq!(v["seq"], 4);
        out.clear();
        write_accepted(&mut out, "7", 99);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"op":"accepted","cid":7,"id":"99"}));
        out.clear();
        write_delivered(&mut out, "\"c\"", 5, "bob");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"delivered","cid":"c","id":"5","to":"bob"})
        );
    }

    #[test]
    fn server_frames_are_valid_json() {
        let mut out = Vec::new();
        write_welcome(&mut out, "al\"ice", "0-1-2", 30000, 65536);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["op"], "welcome");
        assert_eq!(v["user"], "al\"ice");
        assert_eq!(v["v"], 1);
        let mut out = Vec::new();
        write_error(&mut out, &err(r#"{"op":"nope","cid":{"a":1}}"#));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["code"], "unknown_op");
        assert_eq!(v["cid"]["a"], 1);
        let v: serde_json::Value = serde_json::from_slice(PONG).unwrap();
        assert_eq!(v["op"], "pong");
    }
}
