//! The HTTP/1.1 upgrade: parse the request head, decide (route, limits, origin, auth), and write
//! either the `101 Switching Protocols` response or a plain-HTTP refusal (SPEC section 2).
//!
//! Pure: the caller passes the bytes received so far and a [`Policy`] snapshot; nothing here
//! touches sockets, clocks or shard state.

use crate::auth::{
    valid_id, AuthError, Authenticator, Identity, BEARER_CHALLENGE, BEARER_INVALID_TOKEN,
};
use crate::proto::ErrorCode;
use crate::ws::frame::{
    CLOSE_FORBIDDEN, CLOSE_RATE_LIMITED, CLOSE_UNAUTHORIZED, CLOSE_UNAVAILABLE,
};

/// Request heads larger than this are refused with 431 (also bounds per-handshake memory).
pub const MAX_HEAD: usize = 8192;
const MAX_HEADERS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/ws`: the authenticated application protocol.
    App,
    /// `/echo`: unauthenticated diagnostics, echoes data frames.
    Echo,
}

/// Everything the decision needs besides the request itself.
pub struct Policy<'a> {
    pub auth: &'a Authenticator,
    pub allowed_origins: &'a [String],
    pub echo_route: bool,
    /// Dev mode: `GET /demo/` serves the demo chat page (see `ws::demo`).
    pub demo: bool,
    /// Shutdown in progress: refuse with 503.
    pub draining: bool,
    /// The host connection limit is reached: refuse with 503.
    pub at_capacity: bool,
    pub retry_after_s: u64,
    /// Non-zero: the peer's address opened connections too fast; refuse with 429 and this
    /// Retry-After (decided before authentication, so a flood costs no token checks).
    pub too_fast_retry_s: u64,
}

#[derive(Debug)]
pub struct Accepted {
    pub route: Route,
    /// `None` on `/echo`.
    pub identity: Option<Identity>,
    pub device: Option<Box<str>>,
    /// `?summary=1`: a big inbox is summarised at connect instead of replayed (`summary`).
    pub summary: bool,
    /// `?auth=frame`: the identity comes in the first frame (`identity` is `None` until then).
    pub auth_in_frame: bool,
    pub response: Vec<u8>,
    /// Bytes of the request head; anything after it is already WebSocket frames.
    pub head_len: usize,
}

/// Why an upgrade was refused; each maps to one status and one metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    HeadTooLarge,
    NotFound,
    MethodNotAllowed,
    UpgradeRequired,
    Forbidden,
    Unauthorized,
    Overloaded,
    Draining,
    /// New connections from one address came faster than `ip_connect_rate`.
    IpRate,
    /// The address already has `ip_max_open` open connections.
    IpOpen,
}

impl Refusal {
    pub const ALL: [Refusal; 11] = [
        Refusal::BadRequest,
        Refusal::HeadTooLarge,
        Refusal::NotFound,
        Refusal::MethodNotAllowed,
        Refusal::UpgradeRequired,
        Refusal::Forbidden,
        Refusal::Unauthorized,
        Refusal::Overloaded,
        Refusal::Draining,
        Refusal::IpRate,
        Refusal::IpOpen,
    ];

    pub fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::BadRequest => (400, "Bad Request"),
            Refusal::HeadTooLarge => (431, "Request Header Fields Too Large"),
            Refusal::NotFound => (404, "Not Found"),
            Refusal::MethodNotAllowed => (405, "Method Not Allowed"),
            Refusal::UpgradeRequired => (426, "Upgrade Required"),
            Refusal::Forbidden => (403, "Forbidden"),
            Refusal::Unauthorized => (401, "Unauthorized"),
            Refusal::Overloaded | Refusal::Draining => (503, "Service Unavailable"),
            Refusal::IpRate | Refusal::IpOpen => (429, "Too Many Requests"),
        }
    }

    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::NotFound => "not_found",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::UpgradeRequired => "upgrade_required",
            Refusal::Forbidden => "forbidden",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Overloaded => "overloaded",
            Refusal::Draining => "draining",
            Refusal::IpRate => "ip_rate",
            Refusal::IpOpen => "ip_open",
        }
    }

    pub fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap()
    }

    /// How a refusal is told in-band (`?auth=frame`): the close code, the `error` code, and
    /// whether the client should retry after `retry_ms`. Only refusals that come after the
    /// request is known to be a well-formed upgrade are told in-band.
    pub fn in_band(self) -> (u16, ErrorCode, bool) {
        match self {
            Refusal::Forbidden => (CLOSE_FORBIDDEN, ErrorCode::Forbidden, false),
            Refusal::IpRate | Refusal::IpOpen => (CLOSE_RATE_LIMITED, ErrorCode::RateLimited, true),
            Refusal::Overloaded | Refusal::Draining => {
                (CLOSE_UNAVAILABLE, ErrorCode::Unavailable, true)
            }
            _ => (CLOSE_UNAUTHORIZED, ErrorCode::Unauthorized, false),
        }
    }

    /// The complete HTTP response; the connection is closed after it.
    pub fn response(self, detail: &str, retry_after_s: u64) -> Vec<u8> {
        let extra = match self {
            Refusal::Overloaded | Refusal::Draining | Refusal::IpRate | Refusal::IpOpen => {
                format!("retry-after: {retry_after_s}\r\n")
            }
            Refusal::UpgradeRequired => {
                "upgrade: websocket\r\nsec-websocket-version: 13\r\n".into()
            }
            Refusal::MethodNotAllowed => "allow: GET\r\n".into(),
            Refusal::Unauthorized => format!("www-authenticate: {BEARER_CHALLENGE}\r\n"),
            _ => String::new(),
        };
        self.response_with(&extra, detail)
    }

    /// The 401: every one carries a challenge (RFC 9110 section 11.6.1), and the one for a
    /// token that was given says it was refused (RFC 6750 section 3.1).
    pub fn unauthorized_response(detail: &str, token_given: bool) -> Vec<u8> {
        let challenge = match token_given {
            true => BEARER_INVALID_TOKEN,
            false => BEARER_CHALLENGE,
        };
        let extra = format!("www-authenticate: {challenge}\r\n");
        Refusal::Unauthorized.response_with(&extra, detail)
    }

    /// `extra`: header lines, each ending in CRLF.
    fn response_with(self, extra: &str, detail: &str) -> Vec<u8> {
        let (code, text) = self.status();
        let body = format!("{detail}\n");
        format!(
            "HTTP/1.1 {code} {text}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

#[derive(Debug)]
pub enum Decision {
    /// The head is not complete yet: wait for more bytes.
    Incomplete,
    Upgrade(Accepted),
    Refuse(Refusal, Vec<u8>),
    /// A plain HTTP answer that is not a refusal (the dev-mode demo page): the whole response.
    Serve(Vec<u8>),
    /// A `?auth=frame` request refused (browsers cannot read an HTTP refusal): upgrade with
    /// `accepted.response`, then say why in an `error` frame and close with the refusal's
    /// 4xxx code ([`Refusal::in_band`]).
    RefuseInBand {
        refusal: Refusal,
        detail: String,
        retry_after_s: u64,
        accepted: Accepted,
    },
}

fn refuse(r: Refusal, detail: &str, policy: &Policy) -> Decision {
    Decision::Refuse(r, r.response(detail, policy.retry_after_s))
}

/// Decide on the bytes received so far.
pub fn decide(buf: &[u8], policy: &Policy) -> Decision {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() >= MAX_HEAD {
                return refuse(Refusal::HeadTooLarge, "request head too large", policy);
            }
            return Decision::Incomplete;
        }
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
            return refuse(Refusal::HeadTooLarge, "request head too large", policy)
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return refuse(Refusal::HeadTooLarge, "too many headers", policy)
        }
        Err(e) => {
            if e == httparse::Error::Version {
                if let Some(as_http_1_1) = later_http_1(buf) {
                    // At most one level deep: the copy says HTTP/1.1.
                    return decide(&as_http_1_1, policy);
                }
            }
            return refuse(
                Refusal::BadRequest,
                &format!("malformed request: {e}"),
                policy,
            );
        }
    };
    let target = origin_form(req.path.unwrap_or("/"));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if policy.demo && req.method == Some("GET") {
        if let Some(response) = super::demo::response(path) {
            return Decision::Serve(response);
        }
    }
    let route = match path {
        "/ws" => Route::App,
        "/echo" if policy.echo_route => Route::Echo,
        _ => return refuse(Refusal::NotFound, "not found", policy),
    };
    if req.method != Some("GET") {
        return refuse(Refusal::MethodNotAllowed, "use GET to upgrade", policy);
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    // RFC 9110 section 5.3: list lines of one name read as one line joined with commas
    // (`Connection: keep-alive` then `Connection: Upgrade` is `keep-alive, Upgrade`).
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return refuse(
            Refusal::UpgradeRequired,
            "this endpoint only speaks WebSocket",
            policy,
        );
    }
    if header("sec-websocket-version") != Some("13") {
        return refuse(
            Refusal::UpgradeRequired,
            "unsupported Sec-WebSocket-Version (13 required)",
            policy,
        );
    }
    if let Err(detail) = rfc6455_head(&req) {
        return refuse(Refusal::BadRequest, detail, policy);
    }
    let Some(key) = header("sec-websocket-key") else {
        unreachable!("rfc6455_head checked there is exactly one key");
    };
    let mut token = header("authorization")
        .and_then(crate::auth::bearer_credentials)
        .map(|t| t.trim().to_string());
    let mut dev_user = None;
    let mut device = None;
    let mut summary = false;
    let mut auth_in_frame = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(v) = percent_decode(v) else {
            return refuse(Refusal::BadRequest, "bad percent-encoding in query", policy);
        };
        match k {
            "token" if token.is_none() => token = Some(v),
            "user" => dev_user = Some(v),
            "device" => device = Some(v),
            "summary" => summary = matches!(v.as_str(), "1" | "true"),
            "auth" if v == "frame" && route == Route::App => auth_in_frame = true,
            _ => {}
        }
    }
    if let Some(d) = &device {
        if valid_id(d).is_err() {
            return refuse(Refusal::BadRequest, "invalid device id", policy);
        }
    }
    if auth_in_frame && (token.is_some() || dev_user.is_some()) {
        let detail = "auth=frame takes the token in the first frame, not in the request";
        return refuse(Refusal::BadRequest, detail, policy);
    }
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    )
    .into_bytes();
    let accepted = Accepted {
        route,
        identity: None,
        device: device.map(Into::into),
        summary,
        auth_in_frame,
        response,
        head_len,
    };
    // From here on a refusal is about this client, not about its request: a browser that
    // asked (`auth=frame`) is told in-band.
    let late =
        |refusal: Refusal, detail: &str, retry_after_s: u64, accepted: Accepted| match accepted
            .auth_in_frame
        {
            true => Decision::RefuseInBand {
                refusal,
                detail: detail.to_string(),
                retry_after_s,
                accepted,
            },
            false => Decision::Refuse(refusal, refusal.response(detail, retry_after_s)),
        };
    let retry_s = policy.retry_after_s;
    if policy.draining {
        return late(
            Refusal::Draining,
            "shutting down, reconnect later",
            retry_s,
            accepted,
        );
    }
    if policy.at_capacity {
        return late(
            Refusal::Overloaded,
            "connection limit reached",
            retry_s,
            accepted,
        );
    }
    if policy.too_fast_retry_s > 0 {
        let detail = "too many new connections from your address";
        return late(Refusal::IpRate, detail, policy.too_fast_retry_s, accepted);
    }
    if !policy.allowed_origins.is_empty() {
        let origin = header("origin").unwrap_or("");
        if !policy.allowed_origins.iter().any(|o| o == origin) {
            return late(Refusal::Forbidden, "origin not allowed", retry_s, accepted);
        }
    }
    if route == Route::Echo || auth_in_frame {
        return Decision::Upgrade(accepted);
    }
    match policy
        .auth
        .authenticate(token.as_deref(), dev_user.as_deref())
    {
        Ok(identity) => Decision::Upgrade(Accepted {
            identity: Some(identity),
            ..accepted
        }),
        Err(e) => {
            let detail = match e {
                AuthError::Missing if policy.auth.dev_mode() => {
                    "dev mode: pass ?user=<id>".to_string()
                }
                e => e.to_string(),
            };
            Decision::Refuse(
                Refusal::Unauthorized,
                Refusal::unauthorized_response(&detail, token.is_some()),
            )
        }
    }
}

/// The path and query of a request target: the target itself (origin-form), or taken from an
/// absolute `http://` / `https://` URI, which RFC 6455 section 4.2.1 item 1 also allows (its
/// authority is not used: the Host header is still required). Any other absolute form, `ws://`
/// included (not in the RFC), is returned as it is and so is an unknown path.
fn origin_form(target: &str) -> &str {
    let Some((scheme, rest)) = target.split_once("://") else {
        return target;
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return target;
    }
    // The authority ends where the path or the query begins. An empty path (RFC 9112: "/")
    // is no route, as "/" is not one.
    rest.find(['/', '?']).map_or("/", |at| &rest[at..])
}

/// RFC 9112 section 2.3: a request of a later HTTP/1 minor version (1.2 to 1.9) is served as
/// the highest one the gateway speaks, 1.1. httparse knows only 1.0 and 1.1, so it is given a
/// copy whose request line says HTTP/1.1: same length, so the head ends where it did. None
/// when the request line (complete or not) has any other version.
fn later_http_1(buf: &[u8]) -> Option<Vec<u8>> {
    // httparse skips empty lines before the request line.
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let line = buf[start..].split(|&b| b == b'\n').next()?;
    // method SP request-target SP HTTP-version (httparse takes exactly one space each).
    let mut fields = line.splitn(3, |&b| b == b' ');
    let (method, target) = (fields.next()?, fields.next()?);
    match fields.next()?.strip_prefix(b"HTTP/1.")? {
        [b'2'..=b'9'] | [b'2'..=b'9', b'\r'] => {}
        _ => return None,
    }
    let minor_at = start + method.len() + 1 + target.len() + 1 + b"HTTP/1.".len();
    let mut copy = buf.to_vec();
    copy[minor_at] = b'1';
    Some(copy)
}

/// RFC 6455 section 4.2.1 beyond what `decide` checks above: HTTP/1.1 or later, exactly one
/// `Host`, exactly one `Sec-WebSocket-Key` that is base64 of 16 bytes, at most one `Origin`,
/// and no body (bytes after the head are WebSocket frames, so a body would be read as frames).
fn rfc6455_head(req: &httparse::Request) -> Result<(), &'static str> {
    if req.version != Some(1) {
        return Err("HTTP/1.1 or later required");
    }
    let all = |name: &'static str| {
        req.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| std::str::from_utf8(h.value).unwrap_or("\u{fffd}").trim())
    };
    let mut hosts = all("host");
    if !matches!((hosts.next(), hosts.next()), (Some(host), None) if !host.is_empty()) {
        return Err("exactly one Host header required");
    }
    let mut keys = all("sec-websocket-key");
    match (keys.next(), keys.next()) {
        (None, _) => return Err("missing Sec-WebSocket-Key"),
        (Some(_), Some(_)) => return Err("more than one Sec-WebSocket-Key"),
        (Some(key), None) if !is_base64_of_16_bytes(key) => {
            return Err("Sec-WebSocket-Key must be base64 of 16 bytes")
        }
        _ => {}
    }
    // One optional Origin: with two, which one the allowed_origins check reads would decide.
    if all("origin").nth(1).is_some() {
        return Err("more than one Origin header");
    }
    if all("transfer-encoding").next().is_some() || all("content-length").any(|v| v != "0") {
        return Err("an upgrade request has no body");
    }
    Ok(())
}

/// 16 bytes in base64 are 22 characters of the standard alphabet and `==`; the last
/// character carries 2 bits, so it is one of `AQgw` (canonical encoding).
fn is_base64_of_16_bytes(key: &str) -> bool {
    let b = key.as_bytes();
    let alphabet = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    b.len() == 24 && b[..22].iter().all(alphabet) && b"AQgw".contains(&b[21]) && &b[22..] == b"=="
}

/// Decode `%XX` and `+` in a query value; None on malformed escapes or non-UTF-8 results.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    // A JWT has neither: copied whole, not a byte at a time (1.3% of a connect ramp's CPU).
    if !bytes.iter().any(|&b| b == b'%' || b == b'+') {
        return Some(s.to_owned());
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(auth: &Authenticator) -> Policy<'_> {
        Policy {
            auth,
            allowed_origins: &[],
            echo_route: false,
            demo: false,
            draining: false,
            at_capacity: false,
            retry_after_s: 5,
            too_fast_retry_s: 0,
        }
    }

    fn req(target: &str, extra: &str) -> Vec<u8> {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n").into_bytes()
    }

    fn refusal(d: Decision) -> Refusal {
        match d {
            Decision::Refuse(r, _) => r,
            other => panic!("expected refusal, got {other:?}"),
        }
    }

    #[test]
    fn dev_mode_upgrade_has_rfc_accept_key() {
        let auth = Authenticator::new(None);
        match decide(&req("/ws?user=alice&device=phone", ""), &policy(&auth)) {
            Decision::Upgrade(a) => {
                assert_eq!(&*a.identity.unwrap().user, "alice");
                assert_eq!(a.device.as_deref(), Some("phone"));
                let text = String::from_utf8(a.response).unwrap();
                // RFC 6455 section 1.3 example.
                assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn partial_head_waits_and_huge_head_is_refused() {
        let auth = Authenticator::new(None);
        let full = req("/ws?user=a", "");
        assert!(matches!(
            decide(&full[..20], &policy(&auth)),
            Decision::Incomplete
        ));
        let mut huge = b"GET /ws HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        assert_eq!(
            refusal(decide(&huge, &policy(&auth))),
            Refusal::HeadTooLarge
        );
    }

    #[test]
    fn each_refusal_has_its_status() {
        let auth = Authenticator::new(Some("a-secret-of-16-bytes+"));
        let p = policy(&auth);
        assert_eq!(refusal(decide(&req("/nope", ""), &p)), Refusal::NotFound);
        assert_eq!(refusal(decide(&req("/echo", ""), &p)), Refusal::NotFound);
        assert_eq!(refusal(decide(&req("/ws", ""), &p)), Refusal::Unauthorized);
        assert_eq!(
            refusal(decide(&req("/ws?token=abc", ""), &p)),
            Refusal::Unauthorized
        );
        let plain = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(refusal(decide(plain, &p)), Refusal::UpgradeRequired);
        assert_eq!(refusal(decide(b"garbage\r\n\r\n", &p)), Refusal::BadRequest);
        let draining = Policy {
            draining: true,
            ..policy(&auth)
        };
        let d = decide(&req("/ws", ""), &draining);
        match d {
            Decision::Refuse(Refusal::Draining, bytes) => {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.starts_with("HTTP/1.1 503"));
                assert!(text.contains("retry-after: 5"));
            }
            other => panic!("{other:?}"),
        }
        // An address connecting too fast gets 429 with its own Retry-After, before any token
        // check (this policy's authenticator wants a JWT and the request has none).
        let jwt = Authenticator::new(Some("upgrade-tests-secret-0123"));
        let too_fast = Policy {
            too_fast_retry_s: 2,
            ..policy(&jwt)
        };
        match decide(&req("/ws", ""), &too_fast) {
            Decision::Refuse(Refusal::IpRate, bytes) => {
                let text = String::from_utf8(bytes).unwrap();
                assert!(
                    text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
                    "{text}"
                );
                assert!(text.contains("retry-after: 2\r\n"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            refusal(decide(&req("/ws", ""), &policy(&jwt))),
            Refusal::Unauthorized
        );
        let origins = vec!["https://app.example".to_string()];
        let strict = Policy {
            allowed_origins: &origins,
            ..policy(&auth)
        };
        assert_eq!(
            refusal(decide(
                &req("/ws", "Origin: https://evil.example\r\n"),
                &strict
            )),
            Refusal::Forbidden
        );
    }

    /// RFC 6455 section 4.2.1: each malformed head is a 400, with what was wrong.
    #[test]
    fn an_upgrade_that_is_not_rfc_6455_exact_is_refused_400() {
        let auth = Authenticator::new(None);
        let p = policy(&auth);
        let good_key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let head = |version: &str, headers: &str| {
            format!("GET /ws?user=a HTTP/{version}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n").into_bytes()
        };
        let with_key = |key: &str| head("1.1", &format!("Host: x\r\nSec-WebSocket-Key: {key}\r\n"));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (head("1.0", &format!("Host: x\r\n{good_key}")), "HTTP/1.1"),
            (head("1.1", good_key), "Host"),
            (head("1.1", &format!("Host: \r\n{good_key}")), "Host"),
            (
                head("1.1", &format!("Host: x\r\nHost: y\r\n{good_key}")),
                "Host",
            ),
            (head("1.1", "Host: x\r\n"), "missing Sec-WebSocket-Key"),
            (
                head("1.1", &format!("Host: x\r\n{good_key}{good_key}")),
                "more than one",
            ),
            (with_key("!!!not-base64!!!"), "base64 of 16"),
            (with_key("AAAA"), "base64 of 16"),
            (with_key(&"A".repeat(300)), "base64 of 16"),
            (with_key("dGhlIHNhbXBs ZSBub25jZQ=="), "base64 of 16"),
            (with_key("="), "base64 of 16"),
            (with_key("dGhlIHNhbXBsZSBub25jZQ"), "base64 of 16"),
            (with_key("dGhlIHNhbXBsZSBub25jZR=="), "base64 of 16"),
            (with_key("dGhlIHNhbXBsZSBub25jZQ=a"), "base64 of 16"),
            (
                head(
                    "1.1",
                    &format!("Host: x\r\n{good_key}Content-Length: 6\r\n"),
                ),
                "no body",
            ),
            (
                head(
                    "1.1",
                    &format!("Host: x\r\n{good_key}Transfer-Encoding: chunked\r\n"),
                ),
                "no body",
            ),
        ];
        for (request, why) in cases {
            match decide(&request, &p) {
                Decision::Refuse(Refusal::BadRequest, bytes) => {
                    let text = String::from_utf8(bytes).unwrap();
                    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
                    assert!(text.contains(why), "{why:?} not in {text}");
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(&request)),
            }
        }
        // The same head, well formed (an empty body declared as such is no body).
        for ok in [
            head("1.1", &format!("Host: x\r\n{good_key}")),
            head(
                "1.1",
                &format!("Host: x\r\n{good_key}Content-Length: 0\r\n"),
            ),
            with_key("AAAAAAAAAAAAAAAAAAAAAA=="),
            with_key("/////////////////////w=="),
        ] {
            assert!(matches!(decide(&ok, &p), Decision::Upgrade(_)), "{ok:?}");
        }
    }

    fn upgraded_user(d: Decision) -> String {
        match d {
            Decision::Upgrade(a) => a.identity.expect("authenticated").user.to_string(),
            other => panic!("expected an upgrade, got {other:?}"),
        }
    }

    /// RFC 6455 section 4.2.1 item 1: the resource may come as an absolute http/https URI;
    /// ws/wss absolute forms are not in the RFC and stay unknown paths.
    #[test]
    fn an_absolute_http_uri_names_the_resource() {
        let auth = Authenticator::new(None);
        let p = policy(&auth);
        for target in [
            "http://127.0.0.1:8080/ws?user=a",
            "https://gw.example/ws?user=a",
            "HTTP://gw.example:443/ws?user=a",
            // A URI in the query of an origin-form target is only a query.
            "/ws?user=a&next=http://gw.example/ws",
        ] {
            assert_eq!(upgraded_user(decide(&req(target, ""), &p)), "a", "{target}");
        }
        for target in [
            "ws://gw.example/ws?user=a",
            "wss://gw.example/ws?user=a",
            "http://gw.example/nope?user=a",
            "http://gw.example",
            "http://gw.example?user=a",
            "http:/ws?user=a",
        ] {
            let d = decide(&req(target, ""), &p);
            assert_eq!(refusal(d), Refusal::NotFound, "{target}");
        }
        // The Host header is still required.
        let no_host = b"GET http://x/ws?user=a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert_eq!(refusal(decide(no_host, &p)), Refusal::BadRequest);
    }

    /// RFC 9112 section 2.3: HTTP/1.2 to 1.9 are served as 1.1; 1.0, 2.0 and malformed
    /// versions stay 400.
    #[test]
    fn a_later_http_1_minor_version_is_served_as_1_1() {
        let auth = Authenticator::new(None);
        let p = policy(&auth);
        let head = |version: &str| {
            format!("GET /ws?user=a HTTP/{version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        };
        for version in ["1.2", "1.9"] {
            let request = head(version);
            // A frame right behind the head stays behind it.
            let mut bytes = request.clone().into_bytes();
            bytes.extend_from_slice(&[0x89, 0x80, 1, 2, 3, 4]);
            match decide(&bytes, &p) {
                Decision::Upgrade(a) => {
                    assert_eq!(a.head_len, request.len(), "{version}");
                    assert!(a.response.starts_with(b"HTTP/1.1 101 "), "{version}");
                }
                other => panic!("{version}: {other:?}"),
            }
            // Empty lines before the request line are skipped, as httparse does.
            let later = format!("\r\n{request}");
            assert_eq!(
                upgraded_user(decide(later.as_bytes(), &p)),
                "a",
                "{version}"
            );
        }
        // The request line still arriving: wait for it.
        for partial in ["GET /ws?user=a HTTP/1.2", "GET /ws?user=a HTTP/1.2\r"] {
            let d = decide(partial.as_bytes(), &p);
            assert!(matches!(d, Decision::Incomplete), "{partial:?}: {d:?}");
        }
        for (version, why) in [
            ("1.0", "HTTP/1.1 or later"),
            ("2.0", "invalid HTTP version"),
            ("3.0", "invalid HTTP version"),
            ("1.10", "malformed request"),
            ("1.a", "invalid HTTP version"),
            ("1.", "invalid HTTP version"),
        ] {
            match decide(head(version).as_bytes(), &p) {
                Decision::Refuse(Refusal::BadRequest, bytes) => {
                    let text = String::from_utf8(bytes).unwrap();
                    assert!(text.contains(why), "{version}: {why:?} not in {text}");
                }
                other => panic!("{version}: {other:?}"),
            }
        }
    }

    /// RFC 9110 section 5.3: `Connection` (and `Upgrade`) lines of one request are one list.
    #[test]
    fn connection_and_upgrade_lines_are_read_together() {
        let auth = Authenticator::new(None);
        let p = policy(&auth);
        let head = |lines: &str| {
            format!("GET /ws?user=a HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{lines}\r\n").into_bytes()
        };
        for lines in [
            "Connection: keep-alive\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n",
            "Connection: Upgrade\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n",
            "Connection: keep-alive\r\nUpgrade: h2c\r\nConnection: upgrade\r\nUpgrade: WebSocket\r\n",
        ] {
            assert_eq!(upgraded_user(decide(&head(lines), &p)), "a", "{lines:?}");
        }
        for lines in [
            "Connection: keep-alive\r\nConnection: close\r\nUpgrade: websocket\r\n",
            "Connection: Upgrade\r\nUpgrade: h2c\r\nUpgrade: h3\r\n",
            "Connection: keep-alive\r\nUpgrade: websocket\r\n",
        ] {
            let d = decide(&head(lines), &p);
            assert_eq!(refusal(d), Refusal::UpgradeRequired, "{lines:?}");
        }
    }

    /// RFC 6455 section 4.2.1 has one optional Origin: two are a 400 in either order, with
    /// or without allowed_origins.
    #[test]
    fn two_origin_headers_are_refused_400() {
        let auth = Authenticator::new(None);
        let origins = vec!["https://app.example".to_string()];
        let strict = Policy {
            allowed_origins: &origins,
            ..policy(&auth)
        };
        let allowed = "Origin: https://app.example\r\n";
        let other = "Origin: https://evil.example\r\n";
        for p in [&policy(&auth), &strict] {
            for pair in [
                format!("{allowed}{other}"),
                format!("{other}{allowed}"),
                format!("{allowed}{allowed}"),
            ] {
                match decide(&req("/ws?user=a", &pair), p) {
                    Decision::Refuse(Refusal::BadRequest, bytes) => {
                        let text = String::from_utf8(bytes).unwrap();
                        assert!(text.contains("more than one Origin"), "{text}");
                    }
                    other => panic!("{pair:?}: {other:?}"),
                }
            }
            assert_eq!(upgraded_user(decide(&req("/ws?user=a", allowed), p)), "a");
        }
    }

    /// RFC 9110 section 11.6.1: every 401 has a challenge; RFC 6750 section 3.1: a refused
    /// token is told `invalid_token`.
    #[test]
    fn a_401_carries_a_bearer_challenge() {
        let auth = Authenticator::new(Some("a-secret-of-16-bytes+"));
        let p = policy(&auth);
        let challenge = |request: Vec<u8>, p: &Policy| match decide(&request, p) {
            Decision::Refuse(Refusal::Unauthorized, bytes) => {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
                let lines = text.lines().filter(|l| l.starts_with("www-authenticate: "));
                lines.map(str::to_string).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        };
        let plain = vec!["www-authenticate: Bearer".to_string()];
        let refused = vec![r#"www-authenticate: Bearer error="invalid_token""#.to_string()];
        assert_eq!(challenge(req("/ws", ""), &p), plain);
        assert_eq!(
            challenge(req("/ws", "Authorization: Basic YTpi\r\n"), &p),
            plain
        );
        assert_eq!(challenge(req("/ws?token=abc", ""), &p), refused);
        let header = "Authorization: Bearer abc\r\n";
        assert_eq!(challenge(req("/ws", header), &p), refused);
        let foreign = crate::auth::mint("another-secret-of-16-bytes", "bob", None, 60);
        assert_eq!(
            challenge(req(&format!("/ws?token={foreign}"), ""), &p),
            refused
        );
        // Dev mode without ?user=: no token came.
        let dev = Authenticator::new(None);
        assert_eq!(challenge(req("/ws", ""), &policy(&dev)), plain);
        // The other refusals have none.
        let d = decide(&req("/nope", ""), &p);
        let Decision::Refuse(Refusal::NotFound, bytes) = d else {
            panic!("{d:?}")
        };
        assert!(!String::from_utf8(bytes)
            .unwrap()
            .contains("www-authenticate"));
    }

    #[test]
    fn bearer_header_and_query_token_both_work() {
        let secret = "a-secret-of-16-bytes+";
        let auth = Authenticator::new(Some(secret));
        let t = crate::auth::mint(secret, "bob", None, 60);
        let p = policy(&auth);
        for r in [
            req(&format!("/ws?token={t}"), ""),
            req("/ws", &format!("Authorization: Bearer {t}\r\n")),
        ] {
            assert!(matches!(decide(&r, &p), Decision::Upgrade(_)));
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c").unwrap(), "a b c");
        assert_eq!(percent_decode("eyJh.b-c_d").unwrap(), "eyJh.b-c_d");
        assert_eq!(percent_decode("").unwrap(), "");
        assert!(percent_decode("%zz").is_none());
        assert!(percent_decode("%f").is_none());
    }
}
