//! The webhook's wire: the target URL, the JSON payload of a batch, its signature, and one
//! HTTP/1.1 POST over a fresh TCP connection (`Connection: close`). Plain `http://` only:
//! a TLS-terminating proxy in front of the receiver covers HTTPS (README, "Offline push").
//! Owns no state; the worker (`push/mod.rs`) calls it.

use std::fmt::Write as _;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::PushItem;
use crate::config::PushBody;
use crate::http_url::HttpUrl;

/// Signature header: `sha256=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "X-Ringgate-Signature";
/// Unix time in ms when the POST was signed (part of the signed text, against replays).
pub const TIMESTAMP_HEADER: &str = "X-Ringgate-Timestamp";
/// A response head larger than this is refused (the status line is all that is read).
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Where the webhook POSTs: `http://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` to connect to (a name is resolved on every connection).
    pub addr: String,
    /// The `Host` header: `host[:port]` as written in the URL.
    pub host: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        if url.starts_with("https://") {
            return Err(format!(
                "`{url}`: https:// is not supported; use http:// to a TLS-terminating proxy or a receiver on a private network"
            ));
        }
        if !url.starts_with("http://") {
            return Err(format!("`{url}`: must start with http://"));
        }
        let url = HttpUrl::parse(url)?;
        Ok(Target {
            addr: url.addr,
            host: url.authority,
            path: url.path,
        })
    }
}

/// Hex HMAC-SHA256 of `"<timestamp>.<body>"` under `secret`.
pub fn sign(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let mut hex = String::with_capacity(64);
    for b in mac.finalize().into_bytes() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// `{"messages":[{"user":..,"from":..,"id":"..","cid":..,"ts":..,"type"?:..,"body"|"preview":..}]}`.
/// `id` is the message id as a string (as in `msg` frames): the receiver's dedup key.
pub fn payload(items: &[PushItem], body: PushBody, preview_chars: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + items.len() * 160);
    out.extend_from_slice(b"{\"messages\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"user\":");
        crate::proto::write_json_str(&mut out, &item.user);
        out.extend_from_slice(b",\"from\":");
        crate::proto::write_json_str(&mut out, &item.from);
        out.extend_from_slice(format!(",\"id\":\"{}\",\"cid\":", item.id).as_bytes());
        // cid and body are raw JSON text, as stored.
        out.extend_from_slice(item.cid.as_bytes());
        out.extend_from_slice(format!(",\"ts\":{}", item.ts).as_bytes());
        if let Some(t) = &item.msg_type {
            out.extend_from_slice(b",\"type\":");
            crate::proto::write_json_str(&mut out, t);
        }
        match body {
            PushBody::Full => {
                out.extend_from_slice(b",\"body\":");
                out.extend_from_slice(item.body.as_bytes());
            }
            PushBody::Preview => {
                out.extend_from_slice(b",\"preview\":");
                crate::proto::write_json_str(&mut out, &preview(&item.body, preview_chars));
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// The text of a body, cut to `chars` characters: a JSON string's content, an object's
/// `"text"` string if it has one, else the JSON text itself.
pub fn preview(body: &str, chars: usize) -> String {
    let text = match serde_json::from_str::<serde_json::Value>(body) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Object(mut o)) => match o.remove("text") {
            Some(serde_json::Value::String(s)) => s,
            _ => body.to_string(),
        },
        _ => body.to_string(),
    };
    text.chars().take(chars).collect()
}

/// Why a POST did not count as delivered.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("connect {0}")]
    Connect(std::io::Error),
    #[error("I/O {0}")]
    Io(std::io::Error),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("bad response: {0}")]
    BadResponse(String),
    #[error("status {0}")]
    Status(u16),
}

/// POST `body` with its timestamp and signature headers; Ok on a 2xx status. The whole
/// exchange (connect, write, status line) is bounded by `timeout`.
pub async fn post(
    target: &Target,
    body: &[u8],
    timestamp_ms: u64,
    signature: &str,
    timeout: Duration,
) -> Result<u16, PostError> {
    let ms = timeout.as_millis() as u64;
    match tokio::time::timeout(timeout, exchange(target, body, timestamp_ms, signature)).await {
        Ok(result) => result,
        Err(_) => Err(PostError::Timeout(ms)),
    }
}

async fn exchange(
    target: &Target,
    body: &[u8],
    timestamp_ms: u64,
    signature: &str,
) -> Result<u16, PostError> {
    let mut stream = tokio::net::TcpStream::connect(target.addr.as_str())
        .await
        .map_err(PostError::Connect)?;
    let _ = stream.set_nodelay(true);
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringgate\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{TIMESTAMP_HEADER}: {timestamp_ms}\r\n{SIGNATURE_HEADER}: sha256={signature}\r\nConnection: close\r\n\r\n",
        target.path,
        target.host,
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).await.map_err(PostError::Io)?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.map_err(PostError::Io)?;
        if n == 0 {
            return Err(PostError::BadResponse("closed before a status line".into()));
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&head) {
            Ok(httparse::Status::Complete(_)) | Ok(httparse::Status::Partial)
                if response.code.is_some() =>
            {
                let code = response.code.unwrap_or(0);
                return if (200..300).contains(&code) {
                    Ok(code)
                } else {
                    Err(PostError::Status(code))
                };
            }
            Ok(_) if head.len() < MAX_RESPONSE_HEAD => {}
            Ok(_) => return Err(PostError::BadResponse("response head too large".into())),
            Err(e) => return Err(PostError::BadResponse(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_http_only_with_host_and_port() {
        let t = Target::parse("http://127.0.0.1:8081/hook").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8081");
        assert_eq!(t.host, "127.0.0.1:8081");
        assert_eq!(t.path, "/hook");
        let t = Target::parse("http://push.internal").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("push.internal:80", "/")
        );
        let t = Target::parse("http://[::1]/x?a=1").unwrap();
        assert_eq!((t.addr.as_str(), t.path.as_str()), ("[::1]:80", "/x?a=1"));
        assert!(Target::parse("https://x/").unwrap_err().contains("https"));
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("http://").is_err());
        assert!(Target::parse("http://h:99999/").is_err());
        assert!(Target::parse("http://u:p@h/").is_err());
    }

    /// A known HMAC-SHA256 vector (RFC 4231 case 2: key "Jefe"), through our framing.
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // "what do ya want " + "." + "for nothing?" is the RFC text split at its dot-free
        // point: we sign "<ts>.<body>", so check against a direct HMAC of that text.
        let direct = {
            let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
            mac.update(b"what do ya want for nothing?");
            mac.finalize().into_bytes()
        };
        let hex: String = direct.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(b"0123456789abcdef").unwrap();
        mac.update(b"1700000000000.{\"messages\":[]}");
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            sign(b"0123456789abcdef", 1_700_000_000_000, b"{\"messages\":[]}"),
            want
        );
    }

    fn item(body: &str) -> PushItem {
        PushItem {
            user: "bob".into(),
            from: "al\"ice".into(),
            id: 42,
            cid: "\"c1\"".into(),
            ts: 7,
            msg_type: None,
            body: body.into(),
            seq: None,
        }
    }

    #[test]
    fn payload_is_json_with_body_or_preview() {
        let full = payload(
            &[item("{\"text\":\"hi\"}"), item("\"x\"")],
            PushBody::Full,
            3,
        );
        let v: serde_json::Value = serde_json::from_slice(&full).unwrap();
        let m = &v["messages"];
        assert_eq!(m.as_array().unwrap().len(), 2);
        assert_eq!(m[0]["user"], "bob");
        assert_eq!(m[0]["from"], "al\"ice");
        assert_eq!(m[0]["id"], "42");
        assert_eq!(m[0]["cid"], "c1");
        assert_eq!(m[0]["ts"], 7);
        assert_eq!(m[0]["body"]["text"], "hi");
        assert!(m[0].get("type").is_none());
        let mut typed = item("\"héllo wörld\"");
        typed.msg_type = Some("system".into());
        let short = payload(&[typed], PushBody::Preview, 4);
        let v: serde_json::Value = serde_json::from_slice(&short).unwrap();
        assert_eq!(v["messages"][0]["preview"], "héll");
        assert_eq!(v["messages"][0]["type"], "system");
        assert!(v["messages"][0].get("body").is_none());
        assert_eq!(preview("{\"text\":\"abcdef\",\"x\":1}", 3), "abc");
        assert_eq!(preview("[1,2,3]", 4), "[1,2");
    }
}
