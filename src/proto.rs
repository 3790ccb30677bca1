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

/// Ops the server understands today.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Ping,
}

/// Ops the SPEC defines but this build does not serve yet (answered `unavailable`, not
/// `unknown_op`, so a client can tell "wrong op" from "not here yet").
const SPEC_OPS_NOT_YET_SERVED: &[&str] = &["send", "ack", "join", "leave", "publish", "presence"];

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    op: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    cid: Option<&'a RawValue>,
}

pub fn parse(text: &[u8]) -> Result<ClientFrame, FrameError> {
    let env: Envelope = serde_json::from_slice(text).map_err(|e| FrameError {
        code: ErrorCode::BadRequest,
        message: format!("frame is not a JSON object with a string `op`: {e}"),
        cid: None,
    })?;
    let cid = env.cid.map(|c| Box::<str>::from(c.get()));
    let Some(op) = env.op else {
        return Err(FrameError {
            code: ErrorCode::BadRequest,
            message: "missing field `op`".into(),
            cid,
        });
    };
    match &*op {
        "ping" => Ok(ClientFrame::Ping),
        other if SPEC_OPS_NOT_YET_SERVED.contains(&other) => Err(FrameError {
            code: ErrorCode::Unavailable,
            message: format!("op `{other}` is not served by this build yet"),
            cid,
        }),
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
    out.extend_from_slice(format!("{{\"op\":\"synced\",\"count\":{count}}}").as_bytes());
}

pub const PONG: &[u8] = b"{\"op\":\"pong\"}";

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
        assert_eq!(err(r#"{"op":"send","cid":7}"#).code, ErrorCode::Unavailable);
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
